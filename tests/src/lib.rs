//! Test support for gatekeeper's root integration tests, the lab and the
//! benchmarks: packet builders, network-namespace scaffolding and DNS servers.

pub mod dnslab;
pub mod netlab;
pub mod packet;
pub mod rng;
