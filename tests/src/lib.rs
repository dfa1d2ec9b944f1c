//! Test support for gatekeeper's root integration tests, the lab and the
//! benchmarks: packet builders, network-namespace scaffolding, DNS servers,
//! the BPF_PROG_TEST_RUN harness, the host reference model of the
//! datapath and the differential fuzzer built on it, a gatekeeper
//! instance driven through its CLI, real mail software (Postfix, Dovecot,
//! swaks) in test namespaces, and a real systemd journal written entry by
//! entry (journal-remote).

pub mod agentlab;
pub mod dnslab;
pub mod dovecot;
pub mod egresslab;
pub mod fuzz;
pub mod journal;
pub mod model;
pub mod mta;
pub mod netlab;
pub mod packet;
pub mod ranges;
pub mod rng;
pub mod testrun;
