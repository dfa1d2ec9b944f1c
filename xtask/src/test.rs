//! `cargo xtask test`, `cargo xtask bench` and `cargo xtask fuzz`.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    setup,
    util::{self, output, run, status},
};

/// Prefix of every network namespace netlab creates (`gk-<prefix>-<pid>-<n>`).
const NETNS_PREFIX: &str = "gk-";
/// Prefix of every bpffs directory netlab's `PinDirGuard` creates.
const PIN_PREFIX: &str = "gk-test-";
/// Prefix of every Postfix instance directory `tests/src/mta.rs` creates
/// (`/tmp/gk-postfix-<pid>-<n>`).
const POSTFIX_DIR_PREFIX: &str = "gk-postfix-";
/// Prefix of every Dovecot instance directory `tests/src/dovecot.rs` creates
/// (`/tmp/gk-dovecot-<pid>-<n>`).
const DOVECOT_DIR_PREFIX: &str = "gk-dovecot-";
const TMP: &str = "/tmp";

/// Build the agent binary (integration tests run it as a separate process and
/// it is not built by `cargo test` for `gatekeeper-tests`, which only depends
/// on the library), then `cargo test` at the workspace root, which covers the
/// `default-members` (everything but `gatekeeper-ebpf`; that crate is built
/// for the BPF target by gatekeeper's build.rs and must not be built for the
/// host, so no `--workspace`).
pub fn test(cargo_args: &[String], test_args: &[String]) -> Result<()> {
    setup::setup()?;
    let before = Leftovers::scan()?;
    println!("xtask: cargo build -p gatekeeper --bins");
    run(util::cargo().args(["build", "-p", "gatekeeper", "--bins"]))?;

    let mut cmd = util::cargo();
    // Every test binary runs even after one fails: CI shows all failures.
    cmd.args(["test", "--no-fail-fast"]).args(cargo_args);
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    let shown: Vec<&str> = cmd.get_args().filter_map(|a| a.to_str()).collect();
    println!("xtask: cargo {}", shown.join(" "));
    let test_status = status(&mut cmd)?;

    let after = Leftovers::scan()?;
    let leaked = after.leaked_since(&before);
    let preexisting: Vec<_> = before.all().collect();
    if !preexisting.is_empty() {
        eprintln!("xtask: warning: left over from before this run (not counted): {}", preexisting.join(", "));
    }
    if !leaked.is_empty() {
        eprintln!("xtask: the tests left these behind:");
        for l in &leaked {
            eprintln!("  {l}");
        }
        eprintln!(
            "  remove with: ip netns del NAME (after killing `ip netns pids NAME`); rm -r /sys/fs/bpf/gk-test-*; \
             for /tmp/gk-postfix-*: `postfix -c DIR/conf stop`, then rm -r DIR; \
             for /tmp/gk-dovecot-*: `kill $(cat DIR/run/master.pid)`, then rm -r DIR"
        );
    }
    if !test_status.success() {
        bail!("cargo test failed: {test_status}");
    }
    if !leaked.is_empty() {
        bail!("tests passed but left {} namespace(s)/pin dir(s)/Postfix or Dovecot dir(s) behind", leaked.len());
    }
    println!("xtask: tests passed, no namespaces, bpffs pins or Postfix/Dovecot instances left behind");
    Ok(())
}

/// What netlab-made things exist now: `gk-*` namespaces,
/// `/sys/fs/bpf/gk-test-*` entries and `/tmp/gk-postfix-*` instances.
struct Leftovers {
    netns: BTreeSet<String>,
    pins: BTreeSet<String>,
    postfix: BTreeSet<String>,
}

impl Leftovers {
    fn scan() -> Result<Self> {
        let list = output(Command::new("ip").args(["netns", "list"]))?;
        let netns = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(NETNS_PREFIX))
            .map(str::to_owned)
            .collect();
        let entries = |dir: &str, prefix: &str| -> BTreeSet<String> {
            let Ok(rd) = fs::read_dir(dir) else { return BTreeSet::new() };
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        };
        let pins = entries(setup::BPFFS, PIN_PREFIX);
        let mut postfix = entries(TMP, POSTFIX_DIR_PREFIX);
        postfix.extend(entries(TMP, DOVECOT_DIR_PREFIX));
        Ok(Self { netns, pins, postfix })
    }

    fn all(&self) -> impl Iterator<Item = String> + '_ {
        self.netns
            .iter()
            .map(|n| format!("netns {n}"))
            .chain(self.pins.iter().map(|p| format!("{}/{p}", setup::BPFFS)))
            .chain(self.postfix.iter().map(|p| format!("{TMP}/{p}")))
    }

    /// New since `before`, and not owned by a process that is still alive
    /// (names carry the creating pid as the second-to-last `-` field, so a
    /// concurrent test run by someone else on this machine is not blamed).
    fn leaked_since(&self, before: &Self) -> Vec<String> {
        let dead_owner = |name: &str| match owner_pid(name) {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            None => true,
        };
        let netns = self.netns.difference(&before.netns).filter(|n| dead_owner(n)).map(|n| format!("netns {n}"));
        let pins =
            self.pins.difference(&before.pins).filter(|p| dead_owner(p)).map(|p| format!("{}/{p}", setup::BPFFS));
        let postfix = self.postfix.difference(&before.postfix).filter(|p| dead_owner(p)).map(|p| format!("{TMP}/{p}"));
        netns.chain(pins).chain(postfix).collect()
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    let mut it = name.rsplit('-');
    it.next()?;
    it.next()?.parse().ok()
}

/// Benchmarks `gatekeeper-bench` knows; `cargo xtask bench all` runs each.
pub const BENCHES: &[&str] = &["xdp", "egress", "classify", "flood", "reject", "logs"];

/// `cargo run --release -p gatekeeper-tests --bin gatekeeper-bench -- NAME ARGS`
/// for `which` (or every one of [`BENCHES`] for `all`). Results are JSON in
/// `<target>/bench/NAME.json` (passed as `--json` unless ARGS has one; the
/// binary's working directory is the workspace root).
pub fn bench(which: &str, args: &[String]) -> Result<()> {
    setup::setup()?;
    let dir = target_dir()?.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let names: Vec<&str> = if which == "all" { BENCHES.to_vec() } else { vec![which] };
    // Build once, quietly, so each run below starts at once (the flood
    // bench runs the release agent beside it).
    run(util::cargo().args([
        "build",
        "--release",
        "-p",
        "gatekeeper-tests",
        "--bin",
        "gatekeeper-bench",
        "-p",
        "gatekeeper",
        "--bin",
        "gatekeeper",
    ]))?;
    for name in names {
        let started = SystemTime::now();
        let mut cmd = util::cargo();
        cmd.args(["run", "--quiet", "--release", "-p", "gatekeeper-tests", "--bin", "gatekeeper-bench", "--"])
            .arg(name)
            .args(args);
        if !args.iter().any(|a| a == "--json" || a.starts_with("--json=")) {
            cmd.arg("--json").arg(dir.join(format!("{name}.json")));
        }
        println!("xtask: bench {name}");
        run(&mut cmd)?;
        let fresh: Vec<PathBuf> = fs::read_dir(&dir)?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= started))
            .map(|e| e.path())
            .collect();
        if fresh.is_empty() {
            eprintln!("xtask: warning: bench {name} wrote no JSON file in {}", dir.display());
        }
        for f in fresh {
            println!("xtask: bench {name}: {}", f.display());
        }
    }
    Ok(())
}

/// `cargo run --release -p gatekeeper-tests --bin gatekeeper-fuzz`: the
/// differential fuzzer, `frames` frames from `seed`; with `json` its
/// summary goes to `<target>/bench/fuzz.json`. Fails when the fuzzer found
/// a mismatch or an abort.
pub fn fuzz(frames: u64, seed: u64, json: bool) -> Result<()> {
    setup::setup()?;
    run(util::cargo().args(["build", "--release", "-p", "gatekeeper-tests", "--bin", "gatekeeper-fuzz"]))?;
    let mut cmd = util::cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "gatekeeper-tests", "--bin", "gatekeeper-fuzz", "--"]).args([
        "--frames",
        &frames.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    if json {
        let dir = target_dir()?.join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        cmd.arg("--json").arg(dir.join("fuzz.json"));
    }
    run(&mut cmd)
}

/// The cargo target directory (honours CARGO_TARGET_DIR and .cargo config).
fn target_dir() -> Result<PathBuf> {
    let out = output(util::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse cargo metadata")?;
    match v.get("target_directory").and_then(|t| t.as_str()) {
        Some(t) => Ok(PathBuf::from(t)),
        None => Ok(util::workspace_root().join("target")),
    }
}

/// `cargo xtask lab`: setup, build the agent, then the lab binary (which
/// builds its namespaces, runs the agent, and tears everything down).
pub fn lab(args: &[String]) -> Result<()> {
    setup::setup()?;
    println!("xtask: cargo build -p gatekeeper --bins");
    run(util::cargo().args(["build", "-p", "gatekeeper", "--bins"]))?;
    let mut cmd = util::cargo();
    cmd.args(["run", "--quiet", "-p", "gatekeeper-tests", "--bin", "gatekeeper-lab", "--"]).args(args);
    run(&mut cmd)
}
