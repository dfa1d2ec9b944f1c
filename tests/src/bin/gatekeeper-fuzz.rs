//! gatekeeper-fuzz: the differential fuzzer of the datapath.
//!
//! ```text
//! gatekeeper-fuzz [--frames N] [--seed S] [--epoch N] [--per-frame] [--json PATH]
//! ```
//!
//! Loads the object unpinned and runs N random and mutated frames (default
//! 1,000,000) through the ingress gate and both egress gate programs, and
//! socket lookups through the rejector, against the host model
//! (`gatekeeper_tests::model`); see
//! `gatekeeper_tests::fuzz` for what is generated and compared. Every
//! mismatch is printed with the seed, the frame's index and the frame as
//! hex; progress every 1,000,000 frames, a summary at the end, JSON to
//! `--json`. Exits 1 on any mismatch or abort. Needs root.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use gatekeeper_tests::fuzz::{self, Options};

fn main() {
    if let Err(e) = real_main() {
        eprintln!("gatekeeper-fuzz: error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    let mut opts = Options::new(1_000_000, 1);
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--frames" => opts.frames = value("--frames")?.replace('_', "").parse().context("--frames")?,
            "--seed" => opts.seed = value("--seed")?.parse().context("--seed")?,
            "--epoch" => opts.epoch = value("--epoch")?.parse().context("--epoch")?,
            "--per-frame" => opts.per_frame = true,
            "--json" => json = Some(PathBuf::from(value("--json")?)),
            "-h" | "--help" => {
                println!("gatekeeper-fuzz [--frames N] [--seed S] [--epoch N] [--per-frame] [--json PATH]");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if opts.epoch == 0 {
        bail!("--epoch must be at least 1");
    }
    gatekeeper_tests::testrun::require_root("gatekeeper-fuzz");
    println!(
        "gatekeeper-fuzz: {} frames, seed {}, new map contents every {} frames{}",
        opts.frames,
        opts.seed,
        opts.epoch,
        if opts.per_frame { ", counters checked per frame" } else { "" }
    );
    let report = fuzz::run(&opts, &mut |line| println!("{line}"))?;
    println!("frames        {}", report.frames);
    println!("epochs        {}", report.epochs);
    println!(
        "program runs  {} ({} rejector lookups; +{} TC runs the kernel refused, as predicted)",
        report.runs, report.lookups, report.tc_refused
    );
    for (k, n) in &report.kinds {
        println!("  {k:<22} {n}");
    }
    for (k, n) in &report.outcomes {
        println!("  {k:<22} {n}");
    }
    println!("reject counters");
    for (k, n) in &report.reject_counters {
        println!("  {k:<22} {n}");
    }
    println!("mismatches    {}", report.mismatches);
    println!("aborts        {}", report.aborts);
    println!("time          {:.1} s ({} frames/s)", report.seconds, report.frames_per_second);
    if let Some(path) = json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        println!("json          {}", path.display());
    }
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}
