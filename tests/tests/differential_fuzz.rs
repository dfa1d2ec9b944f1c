//! The differential fuzzer, short and seeded: 20,000 random and mutated
//! frames through the ingress gate and both egress gate programs against
//! the host model, with counters, range hits and events compared after
//! every frame (`cargo xtask fuzz` runs the long version).
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN): `cargo xtask test` runs it as root.

use gatekeeper_tests::fuzz::{self, Options};
use gatekeeper_tests::testrun;

#[test]
fn twenty_thousand_frames_match_the_model() {
    testrun::require_root("differential_fuzz");
    let opts = Options { epoch: 2000, per_frame: true, progress_every: 0, ..Options::new(20_000, 0x5eed) };
    let report = fuzz::run(&opts, &mut |line| eprintln!("{line}")).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{report:?}");
    assert_eq!(report.frames, 20_000);
    assert!(report.ok(), "{} mismatches, {} aborts:\n{}", report.mismatches, report.aborts, report.failures.join("\n"));
    // Every outcome of both gates is reached.
    for o in ["ingress pass", "ingress drop", "egress pass", "egress drop", "egress reject"] {
        assert!(report.outcomes.get(o).copied().unwrap_or(0) > 0, "no {o}: {:?}", report.outcomes);
    }
}
