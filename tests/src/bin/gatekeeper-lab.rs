//! `cargo xtask lab`: gatekeeper end to end in a throwaway lab.
//!
//! A mail host namespace runs the real agent on two veths, one towards an
//! ISP access network and one towards a peer network, each with client hosts
//! on TEST-NET addresses. The lab sends real port-25 connection attempts
//! (IPv4 and IPv6), changes ranges through the CLI while traffic runs, kills
//! and restarts the agent, and prints what connected and what was dropped
//! with the counters from `gatekeeper stats`. Every expectation is checked:
//! the lab exits non-zero if the gate did not do what the table says.
//! Everything is torn down at the end, on failure and on Ctrl-C.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use gatekeeper_tests::netlab::{self, tcp_connect, veth_pair, AgentProcess, ConnectOutcome, Netns, PinDirGuard, TcpListenerGuard};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing the lab down");
    }
    Ok(())
}

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1200);
const MX_V4: &str = "192.0.2.25";
const MX_V6: &str = "2001:db8:25::25";

/// A client host in the lab.
struct Client {
    label: &'static str,
    ns: usize, // 0 = ISP side, 1 = peer side
    src: &'static str,
}

const CLIENTS: &[Client] = &[
    Client { label: "ISP dynamic pool host", ns: 0, src: "198.51.100.10" },
    Client { label: "ISP smarthost (allowed)", ns: 0, src: "198.51.100.20" },
    Client { label: "ISP dynamic pool host v6", ns: 0, src: "2001:db8:100::10" },
    Client { label: "peer MTA", ns: 1, src: "203.0.113.40" },
    Client { label: "peer MTA v6", ns: 1, src: "2001:db8:113::40" },
    Client { label: "abusive host (banned)", ns: 1, src: "203.0.113.66" },
];

struct Lab {
    mx: Netns,
    clients: [Netns; 2],
    bin: PathBuf,
    socket: PathBuf,
    pins: PinDirGuard,
    state: tempfile::TempDir,
    agent: Option<AgentProcess>,
    _listeners: Vec<TcpListenerGuard>,
}

impl Lab {
    fn build() -> Result<Lab> {
        let bin = netlab::bin_path("gatekeeper")?;
        let mx = Netns::new("labmx")?;
        let isp = Netns::new("labisp")?;
        let peer = Netns::new("labpeer")?;
        veth_pair(&mx, "mx-isp", &isp, "isp0")?;
        veth_pair(&mx, "mx-peer", &peer, "peer0")?;
        mx.addr_add("lo", &format!("{MX_V4}/32"))?;
        mx.addr_add("lo", &format!("{MX_V6}/128"))?;
        mx.addr_add("mx-isp", "198.51.100.1/24")?;
        mx.addr_add("mx-isp", "2001:db8:100::1/64")?;
        mx.addr_add("mx-peer", "203.0.113.1/24")?;
        mx.addr_add("mx-peer", "2001:db8:113::1/64")?;
        for (ns, ifname, gw4, gw6, addrs) in [
            (&isp, "isp0", "198.51.100.1", "2001:db8:100::1", ["198.51.100.10/24", "198.51.100.20/24", "2001:db8:100::10/64"]),
            (&peer, "peer0", "203.0.113.1", "2001:db8:113::1", ["203.0.113.40/24", "203.0.113.66/24", "2001:db8:113::40/64"]),
        ] {
            for a in addrs {
                ns.addr_add(ifname, a)?;
            }
            ns.route_add(&format!("192.0.2.0/24 via {gw4}"))?;
            ns.route_add(&format!("2001:db8:25::/64 via {gw6}"))?;
        }
        let mut listeners = Vec::new();
        for addr in [format!("{MX_V4}:25"), format!("[{MX_V6}]:25"), format!("{MX_V4}:587")] {
            listeners.push(TcpListenerGuard::spawn(&mx, addr.parse()?)?);
        }
        let state = tempfile::Builder::new().prefix("gk-lab-state-").tempdir()?;
        let socket = state.path().join("gatekeeper.sock");
        Ok(Lab { mx, clients: [isp, peer], bin, socket, pins: PinDirGuard::new()?, state, agent: None, _listeners: listeners })
    }

    fn start_agent(&mut self) -> Result<()> {
        let args: Vec<String> = [
            "--socket", &self.socket.display().to_string(), "--pin-dir", &self.pins.path().display().to_string(),
            "run", "--iface", "mx-isp", "--iface", "mx-peer", "--state-dir", &self.state.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut agent = AgentProcess::spawn(&self.mx, &self.bin, &args)?;
        agent.wait_for_log("gatekeeper agent running", Duration::from_secs(30)).context("agent did not start")?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Runs the CLI inside the mail host's namespace, showing the command.
    fn gk(&self, args: &[&str]) -> Result<String> {
        check_interrupt()?;
        let shown: Vec<String> = args.iter().map(|a| if a.contains(' ') { format!("{a:?}") } else { a.to_string() }).collect();
        println!("  $ gatekeeper {}", shown.join(" "));
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.mx.path().display()))
            .arg("--")
            .arg(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(self.pins.path())
            .args(args)
            .output()
            .context("run gatekeeper CLI")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in stdout.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("    {line}");
        }
        if !out.status.success() {
            bail!("gatekeeper {} failed", args.join(" "));
        }
        Ok(stdout)
    }

    fn attempt(&self, c: &Client, port: u16) -> Result<ConnectOutcome> {
        check_interrupt()?;
        let src: IpAddr = c.src.parse()?;
        let dst: SocketAddr = match src {
            IpAddr::V4(_) => format!("{MX_V4}:{port}").parse()?,
            IpAddr::V6(_) => format!("[{MX_V6}]:{port}").parse()?,
        };
        Ok(tcp_connect(&self.clients[c.ns], src, dst, CONNECT_TIMEOUT))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Unload first (through the agent if it is up, else from the pins),
        // then the guards remove namespaces, pin dir and state.
        let _ = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(self.pins.path())
            .arg("unload")
            .output();
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
        }
    }
}

fn word(o: &ConnectOutcome) -> String {
    match o {
        ConnectOutcome::Connected => "connected".into(),
        ConnectOutcome::TimedOut => "DROPPED".into(),
        ConnectOutcome::Refused => "refused".into(),
        ConnectOutcome::Other(e) => format!("error: {e}"),
    }
}

fn banner(title: &str) {
    println!("\n=== {title} ===");
}

fn main() {
    netlab::require_root();
    // SAFETY: installing async-signal-safe handlers (an atomic store).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("\nlab: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    println!("gatekeeper lab: a mail host (192.0.2.25, 2001:db8:25::25) guarded by gatekeeper on two interfaces,");
    println!("an ISP access network (198.51.100.0/24, 2001:db8:100::/64) and a peer network (203.0.113.0/24, 2001:db8:113::/64).");
    let mut lab = Lab::build()?;
    lab.start_agent()?;
    let mut failures = Vec::new();

    banner("1. no rules yet: everybody reaches port 25");
    let before: Vec<ConnectOutcome> = CLIENTS.iter().map(|c| lab.attempt(c, 25)).collect::<Result<_>>()?;

    banner("2. the operator adds rules through the CLI");
    lab.gk(&["range", "add", "198.51.100.0/24", "--comment", "ISP dynamic pool"])?;
    let list = lab.state.path().join("drop.txt");
    std::fs::write(&list, "; Spamhaus DROP format, as an operator would fetch it\n2001:db8:100::/48 ; SBL000100\n2001:db8:dead::/48 ; SBL000200\n")?;
    println!("  (drop.txt holds two IPv6 ranges in Spamhaus DROP format)");
    lab.gk(&["range", "import", &list.display().to_string()])?;
    lab.gk(&["allow", "add", "198.51.100.20", "--force", "--comment", "ISP smarthost"])?;
    lab.gk(&["ban", "add", "203.0.113.66", "--expire", "1h", "--comment", "dictionary attack"])?;
    lab.gk(&["range", "list"])?;
    let after: Vec<ConnectOutcome> = CLIENTS.iter().map(|c| lab.attempt(c, 25)).collect::<Result<_>>()?;
    let submission = lab.attempt(&CLIENTS[0], 587)?;

    let expected_after = ["DROPPED", "connected", "DROPPED", "connected", "connected", "DROPPED"];
    let why = ["deny range", "allow range wins", "deny range (v6)", "unlisted", "unlisted", "manual ban"];
    println!("\n{:<26} {:<18} {:<11} {:<11} {}", "CLIENT", "SOURCE", "NO RULES", "RULES ON", "WHY");
    for (i, c) in CLIENTS.iter().enumerate() {
        println!("{:<26} {:<18} {:<11} {:<11} {}", c.label, c.src, word(&before[i]), word(&after[i]), why[i]);
        if word(&before[i]) != "connected" {
            failures.push(format!("{} before any rule: {}", c.src, word(&before[i])));
        }
        if word(&after[i]) != expected_after[i] {
            failures.push(format!("{} with rules: expected {}, got {}", c.src, expected_after[i], word(&after[i])));
        }
    }
    println!("{:<26} {:<18} {:<11} {:<11} {}", "ISP pool host, port 587", CLIENTS[0].src, "-", word(&submission), "587 is not guarded: submission still works");
    if submission != ConnectOutcome::Connected {
        failures.push(format!("port 587 from {}: {}", CLIENTS[0].src, word(&submission)));
    }

    banner("3. a rule changes while traffic runs");
    let pool = &CLIENTS[0];
    let mut timeline = Vec::new();
    for i in 0..6 {
        if i == 3 {
            lab.gk(&["range", "del", "198.51.100.0/24"])?;
            timeline.push("| range del |".to_string());
        }
        let o = lab.attempt(pool, 25)?;
        timeline.push(word(&o));
        if (i < 3) != (o == ConnectOutcome::TimedOut) {
            failures.push(format!("live change, attempt {}: {}", i + 1, word(&o)));
        }
    }
    println!("  {} attempts: {}", pool.src, timeline.join(" "));

    banner("4. fail-static: the agent is killed, enforcement goes on");
    let pid = lab.agent.as_ref().map(|a| a.pid()).unwrap_or(0);
    lab.agent.take().map(|mut a| a.kill()).transpose()?;
    println!("  agent (pid {pid}) killed with SIGKILL");
    let banned = &CLIENTS[5];
    let o = lab.attempt(banned, 25)?;
    println!("  {} while the agent is down: {}", banned.src, word(&o));
    if o != ConnectOutcome::TimedOut {
        failures.push(format!("banned source with the agent down: {}", word(&o)));
    }
    lab.gk(&["status"])?;
    lab.start_agent()?;
    println!("  agent restarted: it adopts the pinned datapath (no detach, counters kept)");
    lab.gk(&["status"])?;

    banner("5. counters");
    lab.gk(&["stats"])?;
    lab.gk(&["range", "list"])?;

    banner("result");
    if failures.is_empty() {
        println!("all expectations met; tearing the lab down");
        Ok(())
    } else {
        for f in &failures {
            println!("UNEXPECTED: {f}");
        }
        bail!("{} expectation(s) not met", failures.len())
    }
}
