//! The README's main job, `cargo xtask lab`, run as a test (root, nsd): the
//! whole self-contained demo (agents in namespaces, a real DNS server,
//! listeners, both gates) must meet every expectation it prints, so a
//! change that breaks the demo cannot land.
use std::{process::Command, time::Duration};

use gatekeeper_tests::{dnslab, netlab};

/// The lab takes about a minute here; its own waits are bounded.
const LAB_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn the_lab_meets_every_expectation() {
    netlab::require_root();
    dnslab::require_nsd();
    netlab::bin_path("gatekeeper").expect("gatekeeper binary (cargo build -p gatekeeper --bins)");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatekeeper-lab"));
    let out = netlab::run_capture(&mut cmd, LAB_TIMEOUT).expect("run the lab");
    assert!(
        out.status.success() && out.stdout.contains("all expectations met"),
        "the lab failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}
