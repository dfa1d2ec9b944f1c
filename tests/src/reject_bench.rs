//! `gatekeeper-bench reject`: what answering refused sources with a reason
//! costs, in one run.
//!
//! 1. The sk_lookup program on a good source's SYN: ns per lookup through
//!    BPF_PROG_TEST_RUN (`repeat`, the kernel's mean), beside a pass-only
//!    sk_lookup program; the median of several rounds. The target
//!    is under 30 ns added.
//! 2. The rejector's sessions per second on one core: the agent pinned to
//!    CPU 0, clients on CPU 1 in another namespace, each session a whole
//!    refusal (connect, `220`, pipelined `EHLO`/`MAIL`/`RCPT`/`QUIT`, the
//!    `550` at RCPT, close). Beside it the peer: a real Postfix smtpd, also
//!    on CPU 0, refusing every RCPT (`smtpd_recipient_restrictions =
//!    reject`): what saying no costs a real MTA.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use aya::maps::{Array, SockMap};
use gatekeeper::{datapath::calibrate_clock, verdict_table::VerdictTable};
use gatekeeper_common::{
    action, maps, programs,
    reject::{self, RejectConfig},
    verdict_reason, Config, SourceKey, Verdict,
};
use gatekeeper_tests::{
    agentlab::Instance,
    mta::{self, Postfix, PostfixOptions},
    netlab::{self, in_netns, Netns},
    testrun::{self, Lookup},
};
use serde_json::{json, Value};

const GATE_IF: &str = "gkrbgate";
const CLIENT_IF: &str = "gkrbcl";
const SERVER: &str = "192.0.2.1";
/// Client sources (banned, with the ban's action set to reject).
const SOURCES: usize = 16;
const ROUNDS: usize = 5;
const AGENT_CPU: usize = 0;
const CLIENT_CPU: usize = 1;

fn usage() -> ! {
    eprintln!("usage: gatekeeper-bench reject [--repeat N] [--seconds S] [--clients N] [--json PATH]");
    std::process::exit(2)
}

pub fn run(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut repeat: u32 = 1_000_000;
    let mut seconds: u64 = 5;
    let mut clients: usize = 16;
    let mut json_path = PathBuf::from("target/bench/reject.json");
    while let Some(a) = args.next() {
        let mut number =
            || args.next().and_then(|v| v.parse::<u64>().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage());
        match a.as_str() {
            "--repeat" => repeat = number().min(100_000_000) as u32,
            "--seconds" => seconds = number().min(60),
            "--clients" => clients = number().min(256) as usize,
            "--json" => json_path = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    netlab::require_root();
    mta::require_mta();

    eprintln!("reject: sk_lookup cost");
    let lookups = sk_lookup_cost(repeat)?;
    let duration = Duration::from_secs(seconds);
    eprintln!("reject: gatekeeper's rejector");
    let (gate, client) =
        netlab::joined(("rjgate", GATE_IF, &[format!("{SERVER}/24")]), ("rjclient", CLIENT_IF, &client_addrs()))?;
    let mut gk = Instance::new(gate, Some(GATE_IF), "gk-reject-bench-", REJECTOR_CONFIG);
    let gks = rejector_sessions(&mut gk, &client, duration, clients)?;
    eprintln!("reject: postfix smtpd");
    let pf = postfix_sessions(&gk.ns, &client, duration, clients)?;
    let gk = gks;

    println!("\nsk_lookup on a SYN (ns per lookup, median of {ROUNDS} rounds of {repeat}; target: under 30 ns added)");
    println!("{:<44} {:>9} {:>9} {:>7}", "case", "rejector", "baseline", "added");
    for c in &lookups {
        println!("{:<44} {:>9.1} {:>9.1} {:>7.1}", c.name, c.ns, c.baseline, c.ns - c.baseline);
    }
    println!("\nrefusals answered per second, server on one core ({seconds} s, {clients} clients)");
    println!("{:<44} {:>10} {:>10} {:>8}", "contender", "sessions/s", "sessions", "errors");
    for s in [&gk, &pf] {
        println!("{:<44} {:>10.0} {:>10} {:>8}", s.name, s.per_sec(), s.sessions, s.errors);
    }
    let out = json!({
        "repeat": repeat,
        "rounds": ROUNDS,
        "seconds": seconds,
        "clients": clients,
        "server_cpu": AGENT_CPU,
        "client_cpu": CLIENT_CPU,
        "sk_lookup": lookups.iter().map(LookupCase::json).collect::<Vec<_>>(),
        "sessions": { "gatekeeper": gk.json(), "postfix": pf.json() },
    });
    if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    println!("\nwrote {}", json_path.display());
    ensure!(gk.sessions > 0, "the rejector answered no session");
    Ok(())
}

fn client_addrs() -> Vec<String> {
    let mut v = vec!["192.0.2.2/24".to_string()];
    v.extend((0..SOURCES).map(|i| format!("192.0.2.{}/24", 100 + i)));
    v
}

fn source(i: usize) -> IpAddr {
    format!("192.0.2.{}", 100 + i % SOURCES).parse().expect("an address")
}

// ------------------------------------------------------------ sk_lookup

struct LookupCase {
    name: &'static str,
    ns: f64,
    baseline: f64,
}

impl LookupCase {
    fn json(&self) -> Value {
        json!({ "case": self.name, "ns": self.ns, "baseline_ns": self.baseline, "added_ns": self.ns - self.baseline })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rejector program's cost per lookup on an unpinned instance with the
/// default reject actions, a few ranges and verdicts, and listeners in its
/// slots.
fn sk_lookup_cost(repeat: u32) -> Result<Vec<LookupCase>> {
    let mut bpf = testrun::load(2048, |_| {}, &[programs::SK_REJECTOR, programs::SK_BASELINE])?;
    let clock = calibrate_clock(&mut bpf)?;
    let (tick_ns, clock_offset_ns) = clock.unwrap_or_default();
    let mut cfg: Array<_, Config> = Array::try_from(bpf.map_mut(maps::CONFIG).context("config map")?)?;
    cfg.set(
        0,
        Config {
            event_interval_ns: 60_000_000_000,
            tick_ns,
            clock_offset_ns,
            hash: testrun::HASH,
            ..Config::default()
        },
        0,
    )?;
    let mut ranges = gatekeeper_tests::ranges::AgentRanges::take(&mut bpf);
    ranges.add(gatekeeper::domain::RangeKind::Deny, "198.51.100.0/24", 1, None);
    ranges.add(gatekeeper::domain::RangeKind::Deny, "2001:db8:bad::/48", 2, None);
    {
        let mut v =
            VerdictTable::new(Array::try_from(bpf.map_mut(maps::VERDICTS).context("verdicts")?)?, testrun::HASH)?;
        let pass = Verdict { expires_ns: u64::MAX, action: action::PASS, reason: verdict_reason::OK };
        v.insert(SourceKey::from_ip("203.0.113.50".parse()?), pass)?;
        v.insert(SourceKey::from_ip("2001:db8:50::1".parse()?), pass)?;
        let drop = Verdict { expires_ns: u64::MAX, action: action::DROP, reason: verdict_reason::NO_PTR };
        v.insert(SourceKey::from_ip("203.0.113.7".parse()?), drop)?;
    }
    let mut rc = RejectConfig { actions: default_actions(), nports: 2, lease_ns: u64::MAX, ..RejectConfig::default() };
    rc.ports[..2].copy_from_slice(&[25, 587]);
    let mut map: Array<_, RejectConfig> = Array::try_from(bpf.map_mut(maps::REJECT).context("reject map")?)?;
    map.set(0, rc, 0)?;
    let v4 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut slots: SockMap<_> = SockMap::try_from(bpf.map_mut(maps::REJECTORS).context("rejectors map")?)?;
    slots.set(reject::SLOT_V4, &v4, 0)?;

    let cases: [(&str, Lookup, bool); 6] = [
        ("good: unknown IPv4 source, port 25", Lookup::tcp("203.0.113.9", SERVER, 25), true),
        ("good: IPv4 pass verdict, port 25", Lookup::tcp("203.0.113.50", SERVER, 25), true),
        ("good: IPv6 pass verdict (/64), port 25", Lookup::tcp("2001:db8:50::1", "2001:db8::1", 25), true),
        ("any: a port the rejector does not answer", Lookup::tcp("203.0.113.9", SERVER, 80), true),
        ("refused: IPv4 no-ptr, steered to the rejector", Lookup::tcp("203.0.113.7", SERVER, 25), true),
        ("good: reject off (no action is reject)", Lookup::tcp("203.0.113.9", SERVER, 25), false),
    ];
    let mut out = Vec::new();
    for (name, lookup, on) in cases {
        if !on {
            let mut map: Array<_, RejectConfig> = Array::try_from(bpf.map_mut(maps::REJECT).context("reject map")?)?;
            map.set(0, RejectConfig::default(), 0)?;
        }
        let (mut ns, mut base) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let r = testrun::sk_lookup_run(&bpf, programs::SK_REJECTOR, &lookup, repeat)?;
            let b = testrun::sk_lookup_run(&bpf, programs::SK_BASELINE, &lookup, repeat)?;
            ensure!(r.retval == testrun::SK_PASS, "{name}: the rejector returned {}", r.retval);
            ns.push(r.duration_ns as f64);
            base.push(b.duration_ns as f64);
        }
        out.push(LookupCase { name, ns: median(ns), baseline: median(base) });
    }
    drop(v4);
    Ok(out)
}

/// The refusals whose action is reject by default (`[reject.actions]`).
fn default_actions() -> u32 {
    gatekeeper::config::RejectSettings::default().action_bits()
}

// ------------------------------------------------------------ sessions

struct Sessions {
    name: &'static str,
    sessions: u64,
    errors: u64,
    secs: f64,
}

impl Sessions {
    fn per_sec(&self) -> f64 {
        self.sessions as f64 / self.secs.max(1e-9)
    }
    fn json(&self) -> Value {
        json!({ "name": self.name, "sessions": self.sessions, "errors": self.errors, "seconds": self.secs, "per_second": self.per_sec() })
    }
}

/// Pins every thread of `pid` (and what it starts later) to `cpu`.
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let st = Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()]).output()?;
    ensure!(st.status.success(), "taskset {pid}: {}", String::from_utf8_lossy(&st.stderr));
    Ok(())
}

/// The agent of the sessions bench: its bans are answered with the
/// reason, no source is rate-limited, the SYN budget is out of the way
/// (its default, 200/s for the host, would be what is measured), DNS is
/// off.
const REJECTOR_CONFIG: &str = "log_level = \"warn\"\n\
    [dns]\nenabled = false\n\
    [reject]\nmax_sessions = 4096\nper_source_rate = \"1000000/s\"\nsyn_rate = \"1000000/s\"\n\
    [reject.actions]\nmanual-ban = \"reject\"\n";

/// The agent's rejector (it is unloaded afterwards, leaving the gate
/// namespace to the peer).
fn rejector_sessions(gk: &mut Instance, client: &Netns, duration: Duration, clients: usize) -> Result<Sessions> {
    gk.start(&[]);
    let sources: Vec<String> = (0..SOURCES).map(|i| source(i).to_string()).collect();
    let mut ban = vec!["ban", "add"];
    ban.extend(sources.iter().map(String::as_str));
    gk.ok(&ban);
    pin(gk.agent.as_ref().expect("agent").pid(), AGENT_CPU)?;
    let s = sessions("gatekeeper rejector (one core)", client, duration, clients, "550 5.7.1");
    gk.ok(&["unload"]);
    s
}

fn postfix_sessions(gate: &Netns, client: &Netns, duration: Duration, clients: usize) -> Result<Sessions> {
    let opts = PostfixOptions::receiver(&[SERVER.parse()?], "bench.test")
        .with_main_cf("smtpd_recipient_restrictions = reject")
        .with_main_cf("smtpd_relay_restrictions = permit");
    let pf = Postfix::start(gate, opts)?;
    pin(pf.master_pid() as u32, AGENT_CPU)?;
    sessions("postfix smtpd, reject at RCPT (one core)", client, duration, clients, " 5.7.1 ")
}

/// `clients` threads on [`CLIENT_CPU`] in `ns` run whole refusals against
/// the server for `duration`; a session counts when the RCPT reply holds
/// `want`.
fn sessions(
    name: &'static str,
    ns: &Netns,
    duration: Duration,
    clients: usize,
    want: &'static str,
) -> Result<Sessions> {
    let ok = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    in_netns(ns, || {
        std::thread::scope(|s| {
            for c in 0..clients {
                let (ok, errors, stop) = (&ok, &errors, &stop);
                s.spawn(move || {
                    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &{
                        let mut set = nix::sched::CpuSet::new();
                        let _ = set.set(CLIENT_CPU);
                        set
                    });
                    let server = SocketAddr::new(SERVER.parse().expect("an address"), 25);
                    while !stop.load(Relaxed) && started.elapsed() < duration {
                        match refusal(source(c), server, want) {
                            Ok(()) => ok.fetch_add(1, Relaxed),
                            Err(_) => errors.fetch_add(1, Relaxed),
                        };
                    }
                });
            }
            std::thread::sleep(duration);
            stop.store(true, Relaxed);
        })
    });
    Ok(Sessions { name, sessions: ok.into_inner(), errors: errors.into_inner(), secs: started.elapsed().as_secs_f64() })
}

/// One whole refusal from `src`.
fn refusal(src: IpAddr, server: SocketAddr, want: &str) -> Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&server.into(), Duration::from_secs(2))?;
    let mut stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The greeting first (a client must not pipeline before it).
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk)?;
        ensure!(n > 0, "closed before the greeting");
        buf.extend_from_slice(&chunk[..n]);
    }
    ensure!(buf.starts_with(b"220"), "greeting {:?}", String::from_utf8_lossy(&buf));
    stream.write_all(b"EHLO bench.test\r\nMAIL FROM:<a@bench.test>\r\nRCPT TO:<b@bench.test>\r\nQUIT\r\n")?;
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"221 ") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    ensure!(text.contains(want), "no {want:?} in {text:?}");
    Ok(())
}
