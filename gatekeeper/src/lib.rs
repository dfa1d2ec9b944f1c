//! gatekeeper: agent, datapath control and CLI plumbing.

pub mod agent;
pub mod classify;
pub mod config;
pub mod datapath;
pub mod dns;
pub mod domain;
pub mod error;
pub mod lists;
pub mod logs;
pub mod pipeline;
pub mod policy;
pub mod protocol;
pub mod rejector;
pub mod status;
pub mod store;
#[cfg(test)]
mod test_rng;
pub mod time;
pub mod trie;
pub mod verdict_table;

pub use error::{Error, Result};

/// The compiled eBPF object (built by `build.rs`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper"));
