//! One gatekeeper instance run the way an operator runs it, for the root
//! tests that drive the real binary: `gatekeeper run` inside a test
//! namespace, with its own config file, socket, bpffs pin dir and state
//! dir, and the CLI run against it in that namespace, its JSON output
//! parsed and its counters compared.
//!
//! [`Instance`] cleans up on drop, also while a test panics: the agent is
//! SIGKILLed, the pin dir removed (which detaches what the agent attached),
//! the temporary dir removed, then the namespace deleted.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netlab::{self, nsenter_output, AgentProcess, CmdOutput, Netns, PinDirGuard};

/// Any one CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started agent may take to answer on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How the CLI finds an agent: `--socket S --pin-dir P --config C`.
pub fn target_args(socket: &Path, pin_dir: &Path, config: &Path) -> Vec<String> {
    [("--socket", socket), ("--pin-dir", pin_dir), ("--config", config)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// The arguments of `gatekeeper run` with the given files:
/// `--socket S --pin-dir P --config C run --state-dir D EXTRA...`.
pub fn run_args(socket: &Path, pin_dir: &Path, config: &Path, state_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = target_args(socket, pin_dir, config);
    a.extend(["run".to_string(), "--state-dir".to_string(), state_dir.display().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// One agent with its files, in its namespace. Fields drop in order: agent,
/// pins, temporary dir, namespace.
pub struct Instance {
    /// The running agent, once started.
    pub agent: Option<AgentProcess>,
    pins: PinDirGuard,
    dir: tempfile::TempDir,
    /// Where the agent and the CLI run.
    pub ns: Netns,
    bin: PathBuf,
    /// Given to `run` as `--iface`, and where [`Stats::on_iface`] looks.
    iface: Option<String>,
    /// The CLI command that tells the agent answers, and what its output
    /// must contain.
    ready: (&'static [&'static str], &'static str),
}

impl Instance {
    /// An instance that will run in `ns`, its temporary dir named
    /// `tmp_prefix...`, its config file holding `config`. With `iface`,
    /// `run` guards that interface (`--iface`); without, the test gives the
    /// roles as arguments of [`Instance::start`].
    pub fn new(ns: Netns, iface: Option<&str>, tmp_prefix: &str, config: &str) -> Self {
        let pins = PinDirGuard::new().expect("pin dir");
        let dir = tempfile::Builder::new().prefix(tmp_prefix).tempdir().expect("tempdir");
        let bin = netlab::bin_path("gatekeeper").expect("gatekeeper binary (cargo build -p gatekeeper --bins)");
        let gk = Self {
            agent: None,
            pins,
            dir,
            ns,
            bin,
            iface: iface.map(str::to_owned),
            ready: (&["ports", "list", "--json"], ""),
        };
        // Our own config, so /etc/gatekeeper/gatekeeper.toml on the host
        // cannot leak in.
        gk.write_config(config);
        gk
    }

    /// [`Instance::start`] waits until `probe` succeeds with `stdout_has`
    /// in its output (by default until `ports list --json` succeeds).
    pub fn ready_when(mut self, probe: &'static [&'static str], stdout_has: &'static str) -> Self {
        self.ready = (probe, stdout_has);
        self
    }

    /// Replaces the config file (read by the next `run`).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write the config file");
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("gatekeeper.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("gk.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The temporary dir holding config, socket and state.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the temporary dir, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir().join(name).display().to_string()
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The interface given as `--iface` (panics without one).
    pub fn iface(&self) -> &str {
        self.iface.as_deref().expect("an instance with --iface")
    }

    /// Where the CLI finds the agent: `--socket S --pin-dir P --config C`.
    pub fn global_args(&self) -> Vec<String> {
        target_args(&self.socket(), self.pin_dir(), &self.config_path())
    }

    /// `gatekeeper run`'s arguments: this instance's files, `--iface` if
    /// it has one, then `extra`.
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let iface = self.iface.iter().flat_map(|i| ["--iface", i.as_str()]);
        let extra: Vec<&str> = iface.chain(extra.iter().copied()).collect();
        run_args(&self.socket(), self.pin_dir(), &self.config_path(), &self.state_dir(), &extra)
    }

    /// Starts `gatekeeper run EXTRA` and waits (bounded) until it answers on
    /// its socket.
    pub fn start(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already started");
        let args = self.run_args(extra);
        let agent = AgentProcess::spawn_with_env(&self.ns, &self.bin, &args, &[("NO_COLOR", "1")])
            .expect("spawn gatekeeper run");
        self.agent = Some(agent);
        let deadline = Instant::now() + START_TIMEOUT;
        let (probe, needle) = self.ready;
        loop {
            let agent = self.agent.as_mut().unwrap();
            if let Some(st) = agent.try_wait().unwrap() {
                panic!("gatekeeper run exited ({st}) before serving its socket; log:\n{}", agent.log());
            }
            let out = self.cli(probe);
            if out.success() && out.stdout.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not answering after {START_TIMEOUT:?}: {out}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the agent logged so far (empty without one).
    pub fn log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    /// SIGKILLs the agent: it gets no chance to clean up anything.
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("no agent to kill");
        let st = agent.kill().expect("kill agent");
        assert!(!st.success(), "agent exited by itself before SIGKILL: {st}\n{}", agent.log());
    }

    /// `gatekeeper ARGS` (these arguments only) inside the namespace,
    /// whatever its exit status.
    pub fn exec(&self, args: &[String]) -> CmdOutput {
        nsenter_output(&self.ns, &self.bin, args, CLI_TIMEOUT).expect("run gatekeeper CLI")
    }

    /// `gatekeeper --socket S --pin-dir P --config C ARGS` inside the
    /// namespace, whatever its exit status.
    pub fn cli(&self, args: &[&str]) -> CmdOutput {
        let mut all = self.global_args();
        all.extend(args.iter().map(|s| s.to_string()));
        self.exec(&all)
    }

    /// Runs the CLI and expects success.
    pub fn ok_output(&self, args: &[&str]) -> CmdOutput {
        let out = self.cli(args);
        assert!(out.success(), "expected success: {out}\nagent log:\n{}", self.log());
        out
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_output(args).stdout
    }

    /// Runs the CLI and expects failure; returns the output.
    pub fn fails(&self, args: &[&str]) -> CmdOutput {
        let out = self.cli(args);
        assert!(!out.success(), "expected failure: {out}");
        out
    }

    /// Runs the CLI, expects success and JSON on stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    /// Hits of `net` in `KIND list --json` (range, allow, pool, smarthost,
    /// exempt).
    pub fn hits(&self, kind: &str, net: &str) -> u64 {
        let rows = self.json(&[kind, "list", "--json"]);
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["net"] == net)
            .unwrap_or_else(|| panic!("{net} not in `{kind} list`: {rows:#}"));
        row["hits"].as_u64().unwrap_or_else(|| panic!("no hits for {net}: {row:#}"))
    }

    /// The nets of `KIND list --json`, sorted.
    pub fn nets(&self, kind: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .json(&[kind, "list", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["net"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    }

    /// A `stats --json` snapshot of the ingress gate's counters.
    pub fn stats(&self) -> Stats {
        Stats { v: self.json(&["stats", "--json"]), egress: false, iface: self.iface.clone() }
    }

    /// A `stats --json` snapshot of the egress gate's counters on `iface`.
    pub fn egress_stats(&self, iface: &str) -> Stats {
        Stats { v: self.json(&["stats", "--json"]), egress: true, iface: Some(iface.into()) }
    }

    /// The XDP program on [`Instance::iface`], as the kernel has it.
    pub fn xdp_id(&self) -> Option<u32> {
        self.ns.xdp_prog_id(self.iface()).expect("ip -d link show")
    }

    /// `ip -d link show` of [`Instance::iface`].
    /// Where the running agent's verdict table puts a source: a function
    /// giving the two buckets of an address's /64 key (the hash secret is
    /// read from the agent's pinned config).
    pub fn verdict_pair(&self) -> impl Fn(std::net::IpAddr) -> [u32; 2] {
        use gatekeeper::datapath::{Maps, PinLayout};
        use gatekeeper_common::sourcetab::{source_slots, verdict_shift};
        let maps = Maps::open_pinned(&PinLayout::new(self.pin_dir())).expect("pinned maps");
        let (hash, shift) = (maps.verdicts.hash_key(), verdict_shift(maps.verdicts.buckets()));
        assert!(hash.is_set(), "the agent set a hash secret");
        move |ip| {
            let k = gatekeeper_common::KeyWords::of(&gatekeeper_common::SourceKey::from_ip(ip));
            let at = source_slots(&k.bucket_key(), &hash, shift);
            [at.first, at.second]
        }
    }

    pub fn link_details(&self) -> String {
        self.ns.ip(&["-d", "link", "show", "dev", self.iface()]).unwrap()
    }
}

/// A `stats --json` snapshot: the ingress gate's counters (`totals`,
/// `interfaces`) or the egress gate's (the same under `egress`).
pub struct Stats {
    /// All of `stats --json`.
    pub v: Value,
    egress: bool,
    /// The interface [`Stats::on_iface`] reads.
    iface: Option<String>,
}

impl Stats {
    /// The gate's part of the snapshot.
    fn part(&self) -> &Value {
        if self.egress {
            &self.v["egress"]
        } else {
            &self.v
        }
    }

    fn gate(&self) -> &'static str {
        if self.egress {
            "egress "
        } else {
            ""
        }
    }

    pub fn total(&self, counter: &str) -> u64 {
        self.part()["totals"][counter]
            .as_u64()
            .unwrap_or_else(|| panic!("no {}total {counter:?} in {:#}", self.gate(), self.v))
    }

    /// The counter on the snapshot's interface (0 if it has no counters yet).
    pub fn on_iface(&self, counter: &str) -> u64 {
        let iface = self.iface.as_deref().expect("a snapshot of one interface");
        self.part()["interfaces"]
            .as_array()
            .unwrap_or_else(|| panic!("no {}interfaces in {:#}", self.gate(), self.v))
            .iter()
            .find(|i| i["name"] == iface)
            .map(|i| i["counters"][counter].as_u64().unwrap())
            .unwrap_or(0)
    }

    /// How much `counter` grew since `before`.
    pub fn delta(&self, before: &Stats, counter: &str) -> u64 {
        self.total(counter) - before.total(counter)
    }

    /// Asserts `counter` rose since `before`, in the totals and on the
    /// interface.
    #[track_caller]
    pub fn assert_rose(&self, before: &Stats, counter: &str, what: &str) {
        assert!(
            self.total(counter) > before.total(counter) && self.on_iface(counter) > before.on_iface(counter),
            "{what}: {}`{counter}` did not rise on {}: before {:#}\nafter {:#}",
            self.gate(),
            self.iface.as_deref().unwrap_or_default(),
            before.part(),
            self.part()
        );
    }

    /// Asserts `counter` grew by at least `at_least` since `before`.
    #[track_caller]
    pub fn assert_grew(&self, before: &Stats, counter: &str, at_least: u64, what: &str) {
        let d = self.delta(before, counter);
        assert!(
            d >= at_least,
            "{what}: {}`{counter}` grew by {d}, expected at least {at_least}\nbefore {:#}\nafter {:#}",
            self.gate(),
            before.part()["totals"],
            self.part()["totals"]
        );
    }

    /// Asserts `counter` did not move since `before`.
    #[track_caller]
    pub fn assert_same(&self, before: &Stats, counter: &str, what: &str) {
        assert_eq!(
            self.total(counter),
            before.total(counter),
            "{what}: {}`{counter}` moved: before {:#}\nafter {:#}",
            self.gate(),
            before.part(),
            self.part()
        );
    }
}
