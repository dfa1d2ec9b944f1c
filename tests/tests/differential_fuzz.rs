//! The differential fuzzer, short and seeded: 20,000 random and mutated
//! frames through the ingress gate and both egress gate programs, and the
//! socket lookups of their connections (and random ones) through the
//! rejector, against the host model, with counters, range hits and events
//! compared after every frame (`cargo xtask fuzz` runs the long version).
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN): `cargo xtask test` runs it as root.

use gatekeeper_common::reject::{refusal, reject_counter_name, RejectCounter};
use gatekeeper_tests::fuzz::{self, Options};
use gatekeeper_tests::testrun;

#[test]
fn twenty_thousand_frames_match_the_model() {
    testrun::require_root("differential_fuzz");
    let opts = Options { epoch: 500, per_frame: true, progress_every: 0, ..Options::new(20_000, 0x5eed) };
    let report = fuzz::run(&opts, &mut |line| eprintln!("{line}")).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{report:?}");
    assert_eq!(report.frames, 20_000);
    assert!(report.ok(), "{} mismatches, {} aborts:\n{}", report.mismatches, report.aborts, report.failures.join("\n"));
    // Every outcome of both gates and of the rejector is reached.
    for o in [
        "ingress pass",
        "ingress drop",
        "egress pass",
        "egress drop",
        "egress reject",
        "rejector none",
        "rejector steered",
        "rejector missing",
        "rejector dry-run",
    ] {
        assert!(report.outcomes.get(o).copied().unwrap_or(0) > 0, "no {o}: {:?}", report.outcomes);
    }
    // Every inbound limiter counter moves.
    for name in ["checked", "limited", "dry-run-would-drop", "banned", "exempt"] {
        assert!(
            report.inbound_counters.get(name).copied().unwrap_or(0) > 0,
            "inbound {name} never counted: {:?}",
            report.inbound_counters
        );
    }
    // So is every fate of a SYN whose action is reject: passed to the
    // rejector (under some refusal code), kept from it by a lapsed lease or
    // the quiet table; and every counter of the rejector's.
    let rej = |name: &str| report.reject_counters.get(name).copied().unwrap_or(0);
    let passed: u64 = (0..refusal::COUNT).map(|c| rej(reject_counter_name(RejectCounter::to_rejector(c)))).sum();
    assert!(passed > 0, "no SYN reached the rejector: {:?}", report.reject_counters);
    for c in [
        RejectCounter::Fallback,
        RejectCounter::Quiet,
        RejectCounter::Steered,
        RejectCounter::NoRejector,
        RejectCounter::DryRun,
    ] {
        let name = reject_counter_name(c as u32);
        assert!(rej(name) > 0, "no {name}: {:?}", report.reject_counters);
    }
}
