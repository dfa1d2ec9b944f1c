//! Developer and CI tasks for gatekeeper: `cargo xtask <command>`.
//!
//! * `cargo xtask setup` — install what a fresh Debian 12 machine lacks (as
//!   root): nightly rust-src, bpf-linker 0.13.0 against the nightly's libLLVM,
//!   Debian packages, bpffs at /sys/fs/bpf. Quick and idempotent.
//! * `cargo xtask test [CARGO_TEST_ARGS] [-- TEST_ARGS]` — setup, build the
//!   `gatekeeper` binary, `cargo test` (default members), then fail if any
//!   `gk-*` network namespace or `/sys/fs/bpf/gk-test-*` pin dir was left
//!   behind. Tests run with libtest's default `--test-threads` (one per core):
//!   every netlab namespace/pin name is unique per process and counter, so
//!   root tests may run in parallel; pass `-- --test-threads=1` to serialise.
//! * `cargo xtask bench xdp|egress|classify|flood|reject|logs|all [-- ARGS]` — setup, then the release
//!   `gatekeeper-bench` binary; JSON results land in `target/bench/`.
//! * `cargo xtask fuzz [--frames N] [--seed S] [--json]` — setup, then the
//!   release `gatekeeper-fuzz` binary: random and mutated frames through
//!   the gates, and socket lookups through the rejector, against the host
//!   model; `--json` writes
//!   `target/bench/fuzz.json`. Fails on any mismatch or abort.
//! * `cargo xtask lab` — setup, build, then the `gatekeeper-lab` binary: a
//!   throwaway namespace lab running the real agent, torn down at the end.

mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "gatekeeper developer and CI tasks", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build and test gatekeeper (root; idempotent).
    Setup,
    /// Setup, build the agent binary, run the whole test suite as root, check for leftovers.
    ///
    /// Example: `cargo xtask test -p gatekeeper-tests netlab -- --nocapture`.
    Test {
        /// Extra arguments for `cargo test` (package selection, test name filter, ...).
        #[arg(allow_hyphen_values = true)]
        cargo_args: Vec<String>,
        /// Arguments after `--` go to the test binaries (`--nocapture`, `--test-threads=1`, ...).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Setup, then run the release benchmark binary; JSON results go to target/bench/.
    Bench {
        /// Which benchmark to run.
        which: Bench,
        /// Arguments after `--` are passed to gatekeeper-bench.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then run the release differential fuzzer (root): frames through the gates against the host model.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Seed of the run (the same seed gives the same frames and maps).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the summary to target/bench/fuzz.json.
        #[arg(long)]
        json: bool,
    },
    /// Build everything and run the self-contained namespace lab (root).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// XDP ns/packet through BPF_PROG_TEST_RUN beside a pass-only baseline.
    Xdp,
    /// Egress gate (XDP subscriber and TC uplink programs) ns/packet beside pass-only baselines.
    Egress,
    /// Hostname classifications per second on one core.
    Classify,
    /// A spoofed SYN flood against gatekeeper, xdp-filter and nftables, side by side.
    Flood,
    /// Reject with a reason: the sk_lookup program's ns per good SYN, and refusals answered per second on one core beside Postfix.
    Reject,
    /// The mail logs: lines parsed and scored per second on one core beside fail2ban-regex, and the time from a log line to the ban in the datapath.
    Logs,
    All,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { cargo_args, test_args } => test::test(&cargo_args, &test_args),
        Cmd::Bench { which, args } => {
            let which = match which {
                Bench::Xdp => "xdp",
                Bench::Egress => "egress",
                Bench::Classify => "classify",
                Bench::Flood => "flood",
                Bench::Reject => "reject",
                Bench::Logs => "logs",
                Bench::All => "all",
            };
            test::bench(which, &args)
        }
        Cmd::Fuzz { frames, seed, json } => test::fuzz(frames, seed, json),
        Cmd::Lab { args } => test::lab(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
