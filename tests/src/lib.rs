//! Test support for gatekeeper's root integration tests, the lab and the
//! benchmarks: packet builders and network-namespace scaffolding.

pub mod netlab;
pub mod packet;
