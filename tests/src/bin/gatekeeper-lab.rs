//! `cargo xtask lab`: gatekeeper end to end in a throwaway lab.
//!
//! A mail host namespace runs the real agent on two veths, one towards an
//! ISP access network and one towards a peer network, each with client hosts
//! on TEST-NET addresses, and an authoritative DNS server (Debian's nsd)
//! with their reverse and forward zones: dynamic pool hosts, mail servers,
//! a host without PTR, a forged PTR. The lab sends real port-25 connection
//! attempts (IPv4 and IPv6), lets the agent judge every source by reverse
//! DNS, changes rules through the CLI while traffic runs, shows a range
//! being learned, kills and restarts the agent, and prints what connected
//! and what was dropped with the counters from `gatekeeper stats`. A last
//! scene builds an ISP router of its own (subscribers, router, internet
//! with an outside MTA and the ISP's smarthost) and runs a second agent
//! instance there with `--uplink`: the egress gate keeps dynamic pools off
//! port 25 except towards the smarthost, lets an exempt business line
//! through and answers a reject pool with a RST. Every expectation is
//! A mail-log scene has a password guesser with a good name banned on
//! every mail port from what Postfix logged. Every expectation is
//! checked: the lab exits non-zero if the gate did not do what the table
//! says. Everything is torn down at the end, on failure and
//! on Ctrl-C.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use gatekeeper_tests::{
    dnslab::{NsdServer, Zone},
    dovecot::{Dovecot, DovecotOptions},
    mta::{self, smtp_probe, swaks, Postfix, PostfixOptions, Probe, SwaksArgs},
    netlab::{self, tcp_connect, veth_pair, AgentProcess, ConnectOutcome, Netns, PinDirGuard, TcpListenerGuard},
};

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
const MX_DOMAIN: &str = "mx.lab.example";

/// A client host in the lab.
struct Client {
    label: &'static str,
    ns: usize, // 0 = ISP side, 1 = peer side
    src: &'static str,
    /// Its PTR name (none: NXDOMAIN).
    ptr: Option<&'static str>,
    /// What the second connection should see, and why.
    second: &'static str,
    why: &'static str,
}

const CLIENTS: &[Client] = &[
    Client {
        label: "ISP DSL pool host",
        ns: 0,
        src: "198.51.100.10",
        ptr: Some("dsl-198-51-100-10.pool.isp.example.net"),
        second: "REJECTED",
        why: "dynamic",
    },
    Client {
        label: "ISP smarthost",
        ns: 0,
        src: "198.51.100.20",
        ptr: Some("smtp.isp.example.net"),
        second: "accepted",
        why: "ok",
    },
    Client {
        label: "ISP DSL pool host v6",
        ns: 0,
        src: "2001:db8:100::10",
        ptr: Some("dsl-2001-db8-100-0--10.dyn.isp.example.net"),
        second: "REJECTED",
        why: "dynamic",
    },
    Client {
        label: "peer MTA",
        ns: 1,
        src: "203.0.113.40",
        ptr: Some("mail.peer.example.org"),
        second: "accepted",
        why: "ok",
    },
    Client {
        label: "peer MTA v6",
        ns: 1,
        src: "2001:db8:113::40",
        ptr: Some("mail.peer.example.org"),
        second: "accepted",
        why: "ok",
    },
    Client { label: "host without PTR", ns: 1, src: "203.0.113.50", ptr: None, second: "REJECTED", why: "no-ptr" },
    Client {
        label: "forged PTR",
        ns: 1,
        src: "203.0.113.60",
        ptr: Some("mail.bank.example.com"),
        second: "REJECTED",
        why: "fcrdns-fail",
    },
    Client {
        label: "abusive MTA (banned later)",
        ns: 1,
        src: "203.0.113.66",
        ptr: Some("mx2.peer.example.org"),
        second: "accepted",
        why: "ok",
    },
];

/// More dynamic hosts of the ISP's IPv6 pool, in other /64s of one /48.
const POOL6: &[(&str, &str)] = &[
    ("2001:db8:100:1::10", "dsl-2001-db8-100-1--10.dyn.isp.example.net"),
    ("2001:db8:100:2::10", "dsl-2001-db8-100-2--10.dyn.isp.example.net"),
];
/// A pool host nobody has looked up yet.
const POOL6_NEW: &str = "2001:db8:100:77::1";

fn zones() -> Vec<Zone> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut rev4a = Vec::new();
    let mut rev4b = Vec::new();
    let mut rev6a = Vec::new();
    let mut rev6b = Vec::new();
    let mut isp = Vec::new();
    let mut peer = Vec::new();
    for c in CLIENTS {
        let Some(name) = c.ptr else { continue };
        let a = ip(c.src);
        match (c.ns, a.is_ipv4()) {
            (0, true) => rev4a.push((a, name)),
            (1, true) => rev4b.push((a, name)),
            (0, false) => rev6a.push((a, name)),
            _ => rev6b.push((a, name)),
        }
        // The forged PTR's name resolves elsewhere (below).
        if name.ends_with("isp.example.net") {
            isp.push((name, a));
        } else if name.ends_with("peer.example.org") {
            peer.push((name, a));
        }
    }
    for (a, name) in POOL6 {
        rev6a.push((ip(a), *name));
        isp.push((*name, ip(a)));
    }
    vec![
        Zone::reverse_v4("198.51.100.0/24", &rev4a),
        Zone::reverse_v4("203.0.113.0/24", &rev4b),
        Zone::reverse_v6("2001:db8:100::/48", &rev6a),
        Zone::reverse_v6("2001:db8:113::/48", &rev6b),
        Zone::forward("isp.example.net", &isp),
        Zone::forward("peer.example.org", &peer),
        Zone::forward("bank.example.com", &[("mail.bank.example.com", ip("192.0.2.99"))]),
    ]
}

/// One agent of the lab with its own socket, pin dir, config and state, in
/// a namespace its scene owns. Dropping it unloads its datapath (through the
/// agent if it is up, else from the pins) and kills the agent; then its
/// pins and files go.
struct LabAgent {
    process: Option<AgentProcess>,
    pins: PinDirGuard,
    /// Holds the config file, the socket and the state dir.
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl LabAgent {
    /// An agent (not started yet) whose config file holds `config`.
    fn new(bin: PathBuf, tmp_prefix: &str, config: &str) -> Result<LabAgent> {
        let dir = tempfile::Builder::new().prefix(tmp_prefix).tempdir()?;
        std::fs::write(dir.path().join("gatekeeper.toml"), config)?;
        Ok(LabAgent { process: None, pins: PinDirGuard::new()?, dir, bin })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("gatekeeper.sock")
    }

    /// Starts `gatekeeper run ROLES` in `ns` and waits (bounded) until it
    /// says it runs.
    fn start(&mut self, ns: &Netns, roles: &[&str], what: &str) -> Result<()> {
        let dir = self.dir.path();
        let mut args: Vec<String> = [
            "--socket",
            &self.socket().display().to_string(),
            "--pin-dir",
            &self.pins.path().display().to_string(),
            "--config",
            &dir.join("gatekeeper.toml").display().to_string(),
            "run",
        ]
        .iter()
        .chain(roles)
        .map(|s| s.to_string())
        .collect();
        args.extend(["--state-dir".to_string(), dir.join("state").display().to_string()]);
        let mut agent = AgentProcess::spawn(ns, &self.bin, &args)?;
        agent.wait_for_log("gatekeeper agent running", Duration::from_secs(30)).with_context(|| what.to_string())?;
        self.process = Some(agent);
        Ok(())
    }

    /// Runs `gatekeeper --socket SOCKET --pin-dir PINS ARGS` inside `ns`
    /// (with nsenter, so bpffs stays visible). With `show`, prints the
    /// command and its output; the output is printed on failure either way.
    fn gk(&self, ns: &Netns, args: &[&str], show: bool) -> Result<String> {
        check_interrupt()?;
        if show {
            let shown: Vec<String> =
                args.iter().map(|a| if a.contains(' ') { format!("{a:?}") } else { a.to_string() }).collect();
            println!("  $ gatekeeper {}", shown.join(" "));
        }
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(&self.bin)
            .arg("--socket")
            .arg(self.socket())
            .arg("--pin-dir")
            .arg(self.pins.path())
            .args(args)
            .output()
            .context("run gatekeeper CLI")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if show || !out.status.success() {
            for line in stdout.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
                println!("    {line}");
            }
        }
        if !out.status.success() {
            bail!("gatekeeper {} failed", args.join(" "));
        }
        Ok(stdout)
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .arg("--socket")
            .arg(self.socket())
            .arg("--pin-dir")
            .arg(self.pins.path())
            .arg("unload")
            .output();
        if let Some(mut a) = self.process.take() {
            let _ = a.kill();
        }
    }
}

/// The mail host scene. Fields drop in order: the agent (unloaded first),
/// the namespaces, the DNS server, the listeners.
struct Lab {
    agent: LabAgent,
    mx: Netns,
    clients: [Netns; 2],
    _dns: NsdServer,
    /// The mail host's MTA: a real Postfix on 25 and 587, SMTP AUTH
    /// through Dovecot, whose log the agent follows.
    _postfix: Postfix,
    /// Dovecot: IMAP on 143 and Postfix's SASL server.
    _dovecot: Dovecot,
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
        mx.addr_add("mx-isp", "2001:db8:100::1/48")?;
        mx.addr_add("mx-peer", "203.0.113.1/24")?;
        mx.addr_add("mx-peer", "2001:db8:113::1/48")?;
        for (ns, side, ifname, gw4, gw6) in [
            (&isp, 0, "isp0", "198.51.100.1", "2001:db8:100::1"),
            (&peer, 1, "peer0", "203.0.113.1", "2001:db8:113::1"),
        ] {
            let mut addrs: Vec<String> = CLIENTS
                .iter()
                .filter(|c| c.ns == side)
                .map(|c| format!("{}/{}", c.src, if c.src.contains(':') { 48 } else { 24 }))
                .collect();
            if side == 0 {
                addrs.extend(POOL6.iter().map(|(a, _)| format!("{a}/48")));
                addrs.push(format!("{POOL6_NEW}/48"));
            }
            for a in &addrs {
                ns.addr_add(ifname, a)?;
            }
            ns.route_add(&format!("192.0.2.0/24 via {gw4}"))?;
            ns.route_add(&format!("2001:db8:25::/64 via {gw6}"))?;
        }
        let dovecot = Dovecot::start(
            &mx,
            DovecotOptions::new(&[MX_V4.parse()?])
                .with_auth_socket()
                .without_auth_penalty()
                .with_user("postmaster", "lab-secret"),
        )?;
        let postfix = Postfix::start(
            &mx,
            PostfixOptions {
                ports: vec![25, 587],
                ..PostfixOptions::receiver(&[MX_V4.parse()?, MX_V6.parse()?], MX_DOMAIN)
                    .with_sasl_dovecot(dovecot.auth_socket().context("Dovecot's SASL socket")?)
            },
        )?;
        let dns = NsdServer::start_in(&mx, &zones())?;
        let config = format!(
            "# The lab's agent config\n[dns]\nservers = [\"{}\"]\ntimeout = \"1s\"\n\n[learning]\nmin_sources = 3\n\n\
             [[logs]]\nkind = \"postfix\"\nsource = \"file\"\nfile = \"{}\"\n",
            dns.addr(),
            postfix.dir().join("maillog").display()
        );
        let agent = LabAgent::new(bin, "gk-lab-state-", &config)?;
        Ok(Lab { agent, mx, clients: [isp, peer], _dns: dns, _postfix: postfix, _dovecot: dovecot })
    }

    fn start_agent(&mut self) -> Result<()> {
        self.agent.start(&self.mx, &["--iface", "mx-isp", "--iface", "mx-peer"], "agent did not start")
    }

    /// Runs the CLI inside the mail host's namespace, showing the command.
    fn gk(&self, args: &[&str]) -> Result<String> {
        self.agent.gk(&self.mx, args, true)
    }

    /// Runs the CLI without showing it.
    fn gk_quiet(&self, args: &[&str]) -> Result<String> {
        self.agent.gk(&self.mx, args, false)
    }

    fn attempt(&self, c: &Client, port: u16) -> Result<Probe> {
        self.attempt_from(c.ns, c.src, port)
    }

    /// One SMTP transaction from `src` up to `RCPT TO`, as a sending MTA
    /// would start it.
    fn attempt_from(&self, side: usize, src: &str, port: u16) -> Result<Probe> {
        check_interrupt()?;
        let src: IpAddr = src.parse()?;
        let dst: SocketAddr = match src {
            IpAddr::V4(_) => format!("{MX_V4}:{port}").parse()?,
            IpAddr::V6(_) => format!("[{MX_V6}]:{port}").parse()?,
        };
        Ok(smtp_probe(&self.clients[side], src, dst, &format!("postmaster@{MX_DOMAIN}"), CONNECT_TIMEOUT))
    }

    /// Waits (bounded) until the agent has a verdict for each of `srcs`.
    fn wait_verdicts(&self, srcs: &[&str]) -> Result<()> {
        use gatekeeper_common::SourceKey;
        // A source's verdict: an IPv6 address's own (a drop), else its
        // /64's (a pass).
        let keys: Vec<[String; 2]> = srcs
            .iter()
            .map(|s| {
                let ip = s.parse().unwrap();
                [SourceKey::host(ip).display(), SourceKey::from_ip(ip).display()]
            })
            .collect();
        for _ in 0..100 {
            check_interrupt()?;
            let out = self.gk_quiet(&["verdict", "list", "--json"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let have: Vec<&str> = v.as_array().into_iter().flatten().filter_map(|r| r["key"].as_str()).collect();
            if keys.iter().all(|k| k.iter().any(|k| have.contains(&k.as_str()))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the agent did not judge {srcs:?} within 10 s")
    }
}

// ------------------------------------------------------------- router scene
//
// An ISP's router between its subscribers and the internet, with its own
// agent (own socket and pin dir) guarding the uplink's TC egress:
//
//   labsub: sub0 ---- rtr-sub :labrtr: rtr-up ---- net0 :labnet
//   subscribers       gatekeeper run --uplink rtr-up     outside MTA, ISP smarthost

const R_SUB_IF: &str = "sub0";
const R_RTR_SUB_IF: &str = "rtr-sub";
const R_RTR_UP_IF: &str = "rtr-up";
const R_NET_IF: &str = "net0";
const R_MTA4: &str = "203.0.113.25";
const R_MTA6: &str = "2001:db8:113::25";
const R_SMH4: &str = "192.0.2.25";
const R_SMH6: &str = "2001:db8:2::25";
/// DSL pool (drop), mobile pool (reject), the business line inside the DSL pool.
const R_POOL4: &str = "198.51.100.0/25";
const R_POOL6: &str = "2001:db8:51::/48";
const R_REJECT_POOL4: &str = "198.51.100.128/26";
const R_EXEMPT4: &str = "198.51.100.25/32";
/// A pool whose blocked subscribers are told why (`--action explain`), and
/// one of its subscribers.
const R_EXPLAIN_POOL4: &str = "198.51.100.224/27";
const R_EXPLAIN_SUB4: &str = "198.51.100.230";
const R_SMH_NAME: &str = "smtp.isp.example.net";

/// One subscriber connection in the router scene.
struct Flow {
    label: &'static str,
    src: &'static str,
    dst: &'static str,
    dst_label: &'static str,
    port: u16,
    /// What the connection should see once the pools are in.
    after: &'static str,
    /// The egress counter that attempt raises, if any.
    counter: Option<&'static str>,
    why: &'static str,
}

const FLOWS: &[Flow] = &[
    Flow {
        label: "DSL pool host",
        src: "198.51.100.10",
        dst: R_MTA4,
        dst_label: "outside MTA",
        port: 25,
        after: "DROPPED",
        counter: Some("pool-blocked"),
        why: "pool: port 25 only via the smarthost",
    },
    Flow {
        label: "DSL pool host",
        src: "198.51.100.10",
        dst: R_SMH4,
        dst_label: "ISP smarthost",
        port: 25,
        after: "connected",
        counter: Some("smarthost-allowed"),
        why: "smarthost",
    },
    Flow {
        label: "DSL pool host",
        src: "198.51.100.10",
        dst: R_SMH4,
        dst_label: "ISP smarthost",
        port: 587,
        after: "connected",
        counter: None,
        why: "smarthost, submission",
    },
    Flow {
        label: "DSL pool host",
        src: "198.51.100.10",
        dst: R_MTA4,
        dst_label: "outside MTA",
        port: 587,
        after: "connected",
        counter: None,
        why: "587 is not blocked",
    },
    Flow {
        label: "DSL pool host v6",
        src: "2001:db8:51::10",
        dst: R_MTA6,
        dst_label: "outside MTA",
        port: 25,
        after: "DROPPED",
        counter: Some("pool-blocked"),
        why: "pool",
    },
    Flow {
        label: "DSL pool host v6",
        src: "2001:db8:51::10",
        dst: R_SMH6,
        dst_label: "ISP smarthost",
        port: 25,
        after: "connected",
        counter: Some("smarthost-allowed"),
        why: "smarthost",
    },
    Flow {
        label: "business line (exempt)",
        src: "198.51.100.25",
        dst: R_MTA4,
        dst_label: "outside MTA",
        port: 25,
        after: "connected",
        counter: Some("exempt"),
        why: "exempt inside the DSL pool",
    },
    Flow {
        label: "mobile pool host",
        src: "198.51.100.130",
        dst: R_MTA4,
        dst_label: "outside MTA",
        port: 25,
        after: "refused",
        counter: Some("pool-rejected"),
        why: "reject pool: RST at once, no timeout",
    },
    Flow {
        label: "static host",
        src: "198.51.100.200",
        dst: R_MTA4,
        dst_label: "outside MTA",
        port: 25,
        after: "connected",
        counter: None,
        why: "not in a pool",
    },
];

/// The router scene's namespaces, listeners and agent. Dropping it unloads
/// the router's datapath and kills its agent; the guards then remove
/// pins, state, listeners and namespaces.
struct Router {
    agent: LabAgent,
    _listeners: Vec<TcpListenerGuard>,
    sub: Netns,
    rtr: Netns,
    _net: Netns,
}

impl Router {
    fn build(bin: PathBuf) -> Result<Router> {
        let sub = Netns::new("labsub")?;
        let rtr = Netns::new("labrtr")?;
        let net = Netns::new("labnet")?;
        veth_pair(&sub, R_SUB_IF, &rtr, R_RTR_SUB_IF)?;
        veth_pair(&rtr, R_RTR_UP_IF, &net, R_NET_IF)?;
        let mut srcs: Vec<&str> = FLOWS.iter().map(|f| f.src).collect();
        srcs.sort();
        srcs.dedup();
        srcs.push(R_EXPLAIN_SUB4);
        for src in srcs {
            sub.addr_add(R_SUB_IF, &format!("{src}/{}", if src.contains(':') { 64 } else { 24 }))?;
        }
        for a in ["198.51.100.1/24", "2001:db8:51::1/64"] {
            rtr.addr_add(R_RTR_SUB_IF, a)?;
        }
        rtr.addr_add(R_RTR_UP_IF, "203.0.113.1/30")?;
        rtr.addr_add(R_RTR_UP_IF, "2001:db8:ff::1/64")?;
        net.addr_add(R_NET_IF, "203.0.113.2/30")?;
        net.addr_add(R_NET_IF, "2001:db8:ff::2/64")?;
        for a in [R_MTA4, R_SMH4] {
            net.addr_add("lo", &format!("{a}/32"))?;
        }
        for a in [R_MTA6, R_SMH6] {
            net.addr_add("lo", &format!("{a}/128"))?;
        }
        rtr.sysctl(&[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")])?;
        for r in [
            "203.0.113.0/24 via 198.51.100.1",
            "192.0.2.0/24 via 198.51.100.1",
            "2001:db8:113::/48 via 2001:db8:51::1",
            "2001:db8:2::/48 via 2001:db8:51::1",
        ] {
            sub.route_add(r)?;
        }
        for r in [
            "203.0.113.0/24 via 203.0.113.2",
            "192.0.2.0/24 via 203.0.113.2",
            "2001:db8:113::/48 via 2001:db8:ff::2",
            "2001:db8:2::/48 via 2001:db8:ff::2",
        ] {
            rtr.route_add(r)?;
        }
        net.route_add("198.51.100.0/24 via 203.0.113.1")?;
        net.route_add("2001:db8:51::/48 via 2001:db8:ff::1")?;
        let mut listeners = Vec::new();
        for host in [R_MTA4, R_MTA6, R_SMH4, R_SMH6] {
            for port in [25, 587] {
                listeners.push(TcpListenerGuard::spawn(&net, SocketAddr::new(host.parse()?, port))?);
            }
        }
        // No reverse DNS on the router: the egress gate does not use it.
        let agent = LabAgent::new(
            bin,
            "gk-lab-router-",
            &format!(
                "# The router's agent config\n[dns]\nenabled = false\n[egress.explain]\nsmarthost = \"{R_SMH_NAME}\"\n"
            ),
        )?;
        Ok(Router { agent, _listeners: listeners, sub, rtr, _net: net })
    }

    fn start_agent(&mut self) -> Result<()> {
        // The subscriber side too (skb mode: a veth delivers an XDP_TX'd RST
        // only with a program at its peer in native mode), for the explain
        // stage on its ingress.
        let roles = ["--uplink", R_RTR_UP_IF, "--subscriber-iface", R_RTR_SUB_IF, "--xdp-mode", "skb"];
        self.agent.start(&self.rtr, &roles, "router agent did not start")?;
        // The socket is bound right after that line: wait (bounded) for it.
        for _ in 0..100 {
            if self.gk_quiet(&["pool", "list", "--json"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the router agent does not answer on {}", self.agent.socket().display())
    }

    fn gk(&self, args: &[&str]) -> Result<String> {
        self.agent.gk(&self.rtr, args, true)
    }

    fn gk_quiet(&self, args: &[&str]) -> Result<String> {
        self.agent.gk(&self.rtr, args, false)
    }

    fn attempt(&self, f: &Flow) -> Result<ConnectOutcome> {
        check_interrupt()?;
        Ok(tcp_connect(&self.sub, f.src.parse()?, SocketAddr::new(f.dst.parse()?, f.port), CONNECT_TIMEOUT))
    }
}

/// The router scene; returns the expectations it saw unmet.
fn router_scene(bin: PathBuf) -> Result<Vec<String>> {
    banner("7. router: an ISP keeps its dynamic pools off port 25, and tells a subscriber why");
    println!(
        "  subscribers (198.51.100.0/24, 2001:db8:51::/48) -> router (second agent, --subscriber-iface {R_RTR_SUB_IF} --uplink {R_RTR_UP_IF})"
    );
    println!("  -> internet: outside MTA {R_MTA4} / {R_MTA6}, ISP smarthost {R_SMH4} / {R_SMH6}, both on 25 and 587");
    let mut r = Router::build(bin)?;
    r.start_agent()?;
    let mut failures = Vec::new();
    println!("  the router's agent runs on {R_RTR_UP_IF} with no pools yet: every connection passes (BEFORE)");
    let before: Vec<ConnectOutcome> = FLOWS.iter().map(|f| r.attempt(f)).collect::<Result<_>>()?;
    println!("  the ISP adds its pools, its smarthost and a business line's exemption (AFTER):");
    r.gk(&["pool", "add", R_POOL4, R_POOL6, "--comment", "DSL dynamic pool"])?;
    r.gk(&["pool", "add", R_REJECT_POOL4, "--action", "reject", "--comment", "mobile pool"])?;
    r.gk(&["smarthost", "add", R_SMH4, R_SMH6, "--comment", "ISP relay"])?;
    r.gk(&["exempt", "add", R_EXEMPT4, "--comment", "business line with its own MTA"])?;
    r.gk(&["pool", "add", R_EXPLAIN_POOL4, "--action", "explain", "--comment", "cable pool: told why"])?;
    let after: Vec<ConnectOutcome> = FLOWS.iter().map(|f| r.attempt(f)).collect::<Result<_>>()?;
    println!("\n{:<24} {:<16} {:<36} {:<10} {:<10} WHY", "SUBSCRIBER", "SOURCE", "DESTINATION", "BEFORE", "AFTER");
    for (i, f) in FLOWS.iter().enumerate() {
        let dst = if f.dst.contains(':') { format!("[{}]:{}", f.dst, f.port) } else { format!("{}:{}", f.dst, f.port) };
        println!(
            "{:<24} {:<16} {:<36} {:<10} {:<10} {}",
            f.label,
            f.src,
            format!("{} {dst}", f.dst_label),
            word(&before[i]),
            word(&after[i]),
            f.why
        );
        let what = format!("router: {} -> {dst}", f.src);
        if word(&before[i]) != "connected" {
            failures.push(format!("{what} before the pools: expected connected, got {}", word(&before[i])));
        }
        if word(&after[i]) != f.after {
            failures.push(format!("{what}: expected {}, got {}", f.after, word(&after[i])));
        }
    }
    // The explain pool's subscriber, as its mail client would try: the
    // router answers in the outside MTA's name, which never sees it.
    let probe = smtp_probe(
        &r.sub,
        R_EXPLAIN_SUB4.parse()?,
        SocketAddr::new(R_MTA4.parse()?, 25),
        "someone@example.org",
        Duration::from_secs(5),
    );
    println!(
        "\n  explain pool host {R_EXPLAIN_SUB4} -> outside MTA {R_MTA4}:25: {}",
        probe.refusal().map(str::to_owned).unwrap_or_else(|| probe.word())
    );
    if !probe.refusal().is_some_and(|l| l.starts_with("554 5.7.1") && l.contains(R_SMH_NAME)) {
        failures
            .push(format!("router: the explain pool host should hear why (554 naming {R_SMH_NAME}), got {probe:?}"));
    }
    println!();
    r.gk(&["pool", "list"])?;
    r.gk(&["stats"])?;
    let stats: serde_json::Value = serde_json::from_str(&r.gk_quiet(&["stats", "--json"])?)?;
    for counter in ["pool-blocked", "pool-rejected", "smarthost-allowed", "exempt"] {
        // At least once per attempt (a dropped SYN may be retried within the timeout).
        let at_least = FLOWS.iter().filter(|f| f.counter == Some(counter)).count();
        let got = stats["egress"]["totals"][counter].as_u64().unwrap_or(0);
        println!("  egress {counter}: {got} (expected at least {at_least})");
        if got < at_least as u64 {
            failures.push(format!("router: egress counter {counter} is {got}, expected at least {at_least}"));
        }
    }
    Ok(failures)
}

/// A connect outcome as the router scene's table shows it.
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
    println!("gatekeeper lab: a mail host (192.0.2.25, 2001:db8:25::25; a real Postfix on 25 and 587) guarded by");
    println!("gatekeeper on two interfaces, an ISP access network (198.51.100.0/24, 2001:db8:100::/48) and a peer");
    println!("network (203.0.113.0/24, 2001:db8:113::/48), and an nsd server with their reverse and forward zones;");
    println!("then an ISP router with its own agent guarding its uplink against its subscribers' dynamic pools.");
    println!("Every attempt is an SMTP transaction up to RCPT TO, as a sending MTA starts one.");
    mta::require_mta();
    let mut lab = Lab::build()?;
    lab.start_agent()?;
    let mut failures = Vec::new();
    let mut expect = |what: String, got: &Probe, want: &[&str]| {
        if !want.contains(&got.word().as_str()) {
            failures.push(format!("{what}: expected {}, got {}", want.join(" or "), got.word()));
        }
    };

    banner("1. first contact: every first SYN passes while the agent looks the source up");
    let first: Vec<Probe> = CLIENTS.iter().map(|c| lab.attempt(c, 25)).collect::<Result<_>>()?;
    lab.wait_verdicts(&CLIENTS.iter().map(|c| c.src).collect::<Vec<_>>())?;
    lab.gk(&["verdict", "list"])?;

    banner("2. second contact: the verdicts apply; refused senders hear why, at RCPT");
    let second: Vec<Probe> = CLIENTS.iter().map(|c| lab.attempt(c, 25)).collect::<Result<_>>()?;
    let submission = lab.attempt(&CLIENTS[0], 587)?;
    println!("\n{:<27} {:<17} {:<40} {:<10} {:<10} WHY", "CLIENT", "SOURCE", "PTR", "FIRST", "SECOND");
    for (i, c) in CLIENTS.iter().enumerate() {
        println!(
            "{:<27} {:<17} {:<40} {:<10} {:<10} {}",
            c.label,
            c.src,
            c.ptr.unwrap_or("(none)"),
            first[i].word(),
            second[i].word(),
            c.why
        );
        expect(format!("{} first contact", c.src), &first[i], &["accepted"]);
        expect(format!("{} second contact", c.src), &second[i], &[c.second]);
    }
    println!(
        "{:<27} {:<17} {:<40} {:<10} {:<10} 587 is not guarded: submission works",
        "ISP DSL pool host, 587",
        CLIENTS[0].src,
        "",
        "-",
        submission.word()
    );
    expect("port 587 from the DSL host".into(), &submission, &["accepted"]);
    println!("\nwhat the refused senders were told (the gate's rejector, never Postfix):");
    for (i, c) in CLIENTS.iter().enumerate() {
        if let Some(line) = second[i].refusal() {
            println!("  {:<17} {line}", c.src);
        }
    }
    lab.gk(&["check", CLIENTS[0].src])?;

    banner("3. the operator changes rules while traffic runs: a reason for DNS, silence for a ban");
    let partner = &CLIENTS[5];
    let abuser = &CLIENTS[7];
    let mut timeline = Vec::new();
    for i in 0..4 {
        if i == 2 {
            lab.gk(&["allow", "add", partner.src, "--comment", "partner relay without reverse DNS"])?;
            lab.gk(&["ban", "add", abuser.src, "--expire", "1h", "--comment", "dictionary attack"])?;
            timeline.push("| allow add |".to_string());
        }
        let o = lab.attempt(partner, 25)?;
        expect(format!("{} attempt {}", partner.src, i + 1), &o, &[if i < 2 { "REJECTED" } else { "accepted" }]);
        timeline.push(o.word());
    }
    println!("  {} ({}): {}", partner.src, partner.label, timeline.join(" "));
    let o = lab.attempt(abuser, 25)?;
    println!("  {} after `ban add` (a ban's action is drop: nothing to tell a spammer): {}", abuser.src, o.word());
    expect(format!("{} banned", abuser.src), &o, &["DROPPED"]);
    let list = lab.agent.dir.path().join("drop.txt");
    std::fs::write(&list, "; Spamhaus DROP format, as an operator would fetch it\n2001:db8:dead::/48 ; SBL000100\n198.51.100.128/25 ; SBL000200\n")?;
    println!("  (drop.txt: two ranges in Spamhaus DROP format)");
    lab.gk(&["range", "import", &list.display().to_string()])?;

    banner("4. learning: dynamic hosts named alike in one /48 become a deny range");
    for (a, _) in POOL6 {
        let o = lab.attempt_from(0, a, 25)?;
        println!("  {a} first contact: {}", o.word());
    }
    lab.wait_verdicts(&POOL6.iter().map(|(a, _)| *a).collect::<Vec<_>>())?;
    lab.gk(&["range", "list", "--origin", "learned"])?;
    let o = lab.attempt_from(0, POOL6_NEW, 25)?;
    println!(
        "  {POOL6_NEW}, never looked up: {} (the learned range drops its first SYN and reports it; if its own lookup is in before the retransmission, its own verdict answers that)",
        o.word()
    );
    expect(format!("{POOL6_NEW} inside the learned range"), &o, &["DROPPED", "REJECTED"]);

    banner("5. what sources do: a password guesser with a good name is banned on every mail port");
    let guesser = &CLIENTS[3];
    let mut later = Vec::new();
    let submission: SocketAddr = format!("{MX_V4}:587").parse()?;
    let mut refused = 0;
    for n in 0..8 {
        check_interrupt()?;
        let args = SwaksArgs::new(submission, "x@peer.example.org", &format!("postmaster@{MX_DOMAIN}"))
            .local(guesser.src.parse()?)
            .auth_mech("LOGIN", "postmaster", &format!("guess{n}"))
            .quit_after("AUTH");
        if swaks(&lab.clients[1], args)?.transcript.contains("535") {
            refused += 1;
        }
    }
    println!(
        "  {} ({}): 8 wrong passwords over SMTP AUTH on 587, {refused} refused with 535 by Postfix",
        guesser.src,
        guesser.ptr.unwrap_or("")
    );
    let banned = netlab::poll_until(Duration::from_secs(10), || {
        lab.gk_quiet(&["abuse", "list", "--json"]).is_ok_and(|o| o.contains(guesser.src) && o.contains("auth-abuse"))
    });
    if !banned {
        later.push(format!("{} not banned after 8 failed logins", guesser.src));
    }
    lab.gk(&["abuse", "list"])?;
    let o = lab.attempt(guesser, 25)?;
    println!("  {} to port 25 now: {} (its name is fine; what it did is not)", guesser.src, o.word());
    expect(format!("{} banned for guessing passwords", guesser.src), &o, &["DROPPED"]);
    let imap = tcp_connect(&lab.clients[1], guesser.src.parse()?, format!("{MX_V4}:143").parse()?, CONNECT_TIMEOUT);
    println!("  {} to IMAP (143): {}", guesser.src, word(&imap));
    if imap != ConnectOutcome::TimedOut {
        later.push(format!("{} to 143 while banned: {}", guesser.src, word(&imap)));
    }
    lab.gk(&["abuse", "forget", guesser.src])?;
    let o = lab.attempt(guesser, 25)?;
    println!("  {} after `abuse forget`: {}", guesser.src, o.word());
    expect(format!("{} forgiven", guesser.src), &o, &["accepted"]);

    banner("6. fail-static: the agent is killed, enforcement goes on");
    let pid = lab.agent.process.as_ref().map(|a| a.pid()).unwrap_or(0);
    lab.agent.process.take().map(|mut a| a.kill()).transpose()?;
    println!("  agent (pid {pid}) killed with SIGKILL");
    for c in [&CLIENTS[0], abuser] {
        let o = lab.attempt(c, 25)?;
        println!("  {} while the agent is down: {}", c.src, o.word());
        // A rejected source: a RST until the agent's lease lapses (3 s),
        // then dropped; never Postfix.
        expect(format!("{} with the agent down", c.src), &o, &["DROPPED", "RESET"]);
    }
    lab.gk(&["status"])?;
    lab.start_agent()?;
    println!("  agent restarted: it adopts the pinned datapath (no detach, counters and verdicts kept)");
    lab.gk(&["status"])?;
    let o = lab.attempt(&CLIENTS[0], 25)?;
    println!("  {} again: {}", CLIENTS[0].src, o.word());
    expect(format!("{} after the restart", CLIENTS[0].src), &o, &["REJECTED"]);

    banner("7. counters");
    lab.gk(&["stats"])?;
    lab.gk(&["range", "list"])?;

    failures.extend(later);
    failures.extend(router_scene(lab.agent.bin.clone())?);

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
