//! The agent and the CLI as an operator uses them, with real TCP over veth
//! (root): a "mx" namespace runs `gatekeeper run` on its veth with listeners
//! on port 25 (guarded) and 2525 (unguarded); a "client" namespace connects
//! from several TEST-NET source addresses, IPv4 and IPv6. A dropped SYN shows
//! as a connect that times out (the kernel retransmits the SYN after 1 s, so
//! a 1.5 s timeout sees two SYNs dropped).
//!
//! Every test has its own namespaces, bpffs pin dir, socket and state dir, so
//! the tests run in parallel. Assertions never depend on how long something
//! took; waits are bounded polls for a condition.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use gatekeeper_tests::agentlab::{run_args, Instance, CLI_TIMEOUT};
use gatekeeper_tests::netlab::{
    self, in_netns, nsenter_output, tcp_connect, tcp_connect_stream, veth_pair, ConnectOutcome, Netns,
};

// ----------------------------------------------------------------- addresses

/// The mail server (listeners) in the mx namespace.
const SRV4: &str = "192.0.2.1";
const SRV6: &str = "2001:db8:1::1";
/// mx's address in each of the client's subnets (connected routes both ways).
const MX_ADDRS: [&str; 8] = [
    "192.0.2.1/24",
    "198.51.100.1/24",
    "203.0.113.1/24",
    "2001:db8:1::1/64",
    "2001:db8:2::1/64",
    "2001:db8:3::1/64",
    "2001:db8:4::1/64",
    "2001:db8:5::1/64",
];

const DENY4_NET: &str = "198.51.100.0/24";
const DENIED4: &str = "198.51.100.7";
const ALLOW4_NET: &str = "198.51.100.16/28";
const ALLOWED4: &str = "198.51.100.20";
const UNLISTED4: &str = "203.0.113.9";
const BAN4: &str = "203.0.113.10";

const DENY6_NET: &str = "2001:db8:2::/64";
const DENIED6: &str = "2001:db8:2::7";
const ALLOW6_NET: &str = "2001:db8:2::20/124";
const ALLOWED6: &str = "2001:db8:2::20";
const UNLISTED6: &str = "2001:db8:3::9";
const BAN6: &str = "2001:db8:4::5";
const BAN6_SAME64: &str = "2001:db8:4::6";
const BAN6_OTHER64: &str = "2001:db8:5::6";

/// The client's source addresses (prefix lengths match mx's subnets).
const CLIENT_ADDRS: [&str; 13] = [
    "192.0.2.2/24",
    "198.51.100.7/24",
    "198.51.100.20/24",
    "203.0.113.9/24",
    "203.0.113.10/24",
    "2001:db8:1::2/64",
    "2001:db8:2::7/64",
    "2001:db8:2::20/64",
    "2001:db8:3::9/64",
    "2001:db8:4::5/64",
    "2001:db8:4::6/64",
    "2001:db8:5::6/64",
    "2001:db8:5::7/64",
];

const SMTP: u16 = 25;
const UNGUARDED: u16 = 2525;
const MX_IF: &str = "gkmx";
const CLIENT_IF: &str = "gkcl";

/// The config file every agent here runs with.
const TEST_CONFIG: &str = "[dns]\nenabled = false\n";

/// A connect that should succeed gets this long (it normally takes < 1 ms).
const CONNECT_OK: Duration = Duration::from_secs(5);
/// A connect whose SYNs are dropped times out after this long.
const CONNECT_DROP: Duration = Duration::from_millis(1500);

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn srv(src: &str, port: u16) -> SocketAddr {
    let dst = if ip(src).is_ipv4() { SRV4 } else { SRV6 };
    SocketAddr::new(ip(dst), port)
}

// -------------------------------------------------------------- echo server

/// A listener in a namespace that echoes what each connection sends (so an
/// established connection can be checked end to end), counting accepts.
/// Stops on drop; every connection thread ends within 10 s of going idle.
struct EchoServer {
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn spawn(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = in_netns(ns, || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepts, stop) = (accepts.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < netlab::LISTENER_MAX_LIFETIME {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            accepts.fetch_add(1, Ordering::SeqCst);
                            std::thread::spawn(move || echo(conn));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self { accepts, stop, thread: Some(thread) }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` connections were accepted; returns the count.
    fn wait_accepts(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.accepts() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.accepts()
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 64];
    for _ in 0..1000 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one byte through `s` and expects it back.
fn roundtrip(s: &mut TcpStream, byte: u8, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[byte]).unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap_or_else(|e| panic!("{what}: receive: {e}"));
    assert_eq!(b[0], byte, "{what}: echo");
}

// --------------------------------------------------------- gatekeeper instance

/// A gatekeeper instance guarding `ifname` in `mx`, with the test config
/// (no reverse-DNS lookups: these tests are about ranges and bans; unknown
/// sources just pass and are counted).
fn instance(mx: Netns, ifname: &str) -> Instance {
    Instance::new(mx, Some(ifname), "gk-agent-ns-", TEST_CONFIG)
}

/// Nets of `range list --json`.
fn range_nets(gk: &Instance) -> BTreeSet<String> {
    gk.nets("range").into_iter().collect()
}

// ------------------------------------------------------------------- the lab

/// mx (agent, listeners) -- client (sources), joined by one veth pair.
/// Fields drop in order: listeners, instance (agent, pins, dirs, mx), client.
struct Lab {
    _listeners: Vec<EchoServer>,
    gk: Instance,
    client: Netns,
}

impl Lab {
    fn new() -> Self {
        netlab::require_root();
        let (mx, client) = netlab::joined(("mx", MX_IF, &MX_ADDRS), ("client", CLIENT_IF, &CLIENT_ADDRS)).unwrap();
        let listeners = [SRV4, SRV6]
            .iter()
            .flat_map(|s| [SMTP, UNGUARDED].map(|p| EchoServer::spawn(&mx, SocketAddr::new(ip(s), p))))
            .collect();
        let lab = Self { _listeners: listeners, gk: instance(mx, MX_IF), client };
        // Before any agent: everything connects (the lab itself works).
        for src in ["192.0.2.2", "2001:db8:1::2", DENIED4, DENIED6] {
            lab.expect_connect(src, SMTP, "lab check before the agent runs");
        }
        lab
    }

    fn connect(&self, src: &str, port: u16, timeout: Duration) -> ConnectOutcome {
        tcp_connect(&self.client, ip(src), srv(src, port), timeout)
    }

    fn expect_connect(&self, src: &str, port: u16, what: &str) {
        let r = self.connect(src, port, CONNECT_OK);
        assert_eq!(r, ConnectOutcome::Connected, "{what}: {src} -> port {port}");
    }

    fn expect_dropped(&self, src: &str, port: u16, what: &str) {
        let r = self.connect(src, port, CONNECT_DROP);
        assert_eq!(r, ConnectOutcome::TimedOut, "{what}: {src} -> port {port} should time out (SYN dropped)");
    }

    /// Polls (bounded by `limit`) until a connect from `src` succeeds.
    fn wait_connects(&self, src: &str, port: u16, limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        loop {
            match self.connect(src, port, CONNECT_DROP) {
                ConnectOutcome::Connected => return,
                ConnectOutcome::TimedOut if Instant::now() < deadline => {}
                other => panic!("{what}: {src} -> port {port}: still {other:?} after {limit:?}"),
            }
        }
    }
}

impl Lab {
    /// Polls (bounded by `limit`) until a connect from `src` times out.
    fn wait_dropped(&self, src: &str, port: u16, limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        loop {
            match self.connect(src, port, CONNECT_DROP) {
                ConnectOutcome::TimedOut => return,
                ConnectOutcome::Connected if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                other => panic!("{what}: {src} -> port {port}: still {other:?} after {limit:?}"),
            }
        }
    }

    /// Connects from `src` and checks that exactly the decision `counter` rose.
    fn expect_decision(&self, src: &str, counter: &str, what: &str) {
        let s0 = self.gk.stats();
        if counter == "deny-range" || counter == "manual-ban" {
            self.expect_dropped(src, SMTP, what);
        } else {
            self.expect_connect(src, SMTP, what);
        }
        let s1 = self.gk.stats();
        s1.assert_rose(&s0, counter, what);
        for c in ["allowed", "deny-range", "unknown", "manual-ban"] {
            if c != counter {
                s1.assert_same(&s0, c, what);
            }
        }
    }
}

fn assert_xdp_mode(gk: &Instance, mode: &str) {
    let st = gk.status();
    let ifs = st["detail"]["interfaces"].as_array().unwrap_or_else(|| panic!("no interfaces: {st:#}"));
    assert_eq!(ifs.len(), 1, "{st:#}");
    assert_eq!(ifs[0]["ifname"], gk.iface(), "{st:#}");
    assert_eq!(ifs[0]["mode"], mode, "{st:#}");
    assert_eq!(ifs[0]["ifindex"], gk.ns.if_index(gk.iface()).unwrap(), "{st:#}");
    let links = st["datapath"]["links"].as_array().unwrap();
    assert_eq!(links.len(), 1, "{st:#}");
    assert_eq!(links[0]["ifname"], gk.iface(), "{st:#}");
    assert_eq!(links[0]["mode"], mode, "{st:#}");
    assert_eq!(st["agent"]["running"], true, "{st:#}");
    // The kernel agrees: `xdp` is native (driver) mode, `xdpgeneric` skb mode.
    let link = gk.link_details();
    let flag = if mode == "native" { " xdp " } else { " xdpgeneric " };
    assert!(link.contains(flag), "{} not attached in {mode} mode: {link}", gk.iface());
    assert!(gk.xdp_id().is_some(), "{link}");
}

// ====================================================================== tests

/// Test 1: deny / allow / unknown / unguarded port, v4 and v6, in one mode.
fn gate_in_mode(mode: &str) {
    let mut lab = Lab::new();
    lab.gk.start(&["--xdp-mode", mode]);
    assert_xdp_mode(&lab.gk, mode);
    let gk = &lab.gk;
    gk.ok(&["range", "add", DENY4_NET, DENY6_NET, "--comment", "snowshoe"]);
    gk.ok(&["allow", "add", ALLOW4_NET, ALLOW6_NET, "--force", "--comment", "partner"]);

    for (denied, allowed, unlisted, deny_net, allow_net) in
        [(DENIED4, ALLOWED4, UNLISTED4, DENY4_NET, ALLOW4_NET), (DENIED6, ALLOWED6, UNLISTED6, DENY6_NET, ALLOW6_NET)]
    {
        let what = format!("{mode}, {denied}");
        // A deny-listed source: dropped, counted, range hits.
        let hits0 = gk.hits("range", deny_net);
        let s0 = gk.stats();
        lab.expect_dropped(denied, SMTP, &what);
        let s1 = gk.stats();
        s1.assert_rose(&s0, "deny-range", &what);
        for c in ["allowed", "unknown", "dry-run-would-drop"] {
            s1.assert_same(&s0, c, &what);
        }
        assert!(gk.hits("range", deny_net) > hits0, "{what}: no hits on {deny_net}");
        let top = s1.v["top_ranges"].as_array().unwrap();
        assert!(
            top.iter().any(|t| t["range"] == deny_net && t["kind"] == "deny" && t["hits"].as_u64() > Some(0)),
            "{what}: {deny_net} not in top_ranges: {:#}",
            s1.v
        );

        // An allow range inside the deny range: passes, `allowed`.
        let ahits0 = gk.hits("allow", allow_net);
        lab.expect_connect(allowed, SMTP, &what);
        let s2 = gk.stats();
        s2.assert_rose(&s1, "allowed", &what);
        s2.assert_same(&s1, "deny-range", &what);
        assert!(gk.hits("allow", allow_net) > ahits0, "{what}: no hits on allow {allow_net}");

        // A source on no list: passes, `unknown`.
        lab.expect_connect(unlisted, SMTP, &what);
        let s3 = gk.stats();
        s3.assert_rose(&s2, "unknown", &what);
        s3.assert_same(&s2, "deny-range", &what);
        s3.assert_same(&s2, "allowed", &what);

        // An unguarded port from the listed source: passes, no decision.
        lab.expect_connect(denied, UNGUARDED, &what);
        let s4 = gk.stats();
        for c in ["deny-range", "allowed", "unknown"] {
            s4.assert_same(&s3, c, &what);
        }
    }
    // Still attached in the same mode after all that.
    assert_xdp_mode(&lab.gk, mode);
}

#[test]
fn gate_native_mode_v4_v6() {
    gate_in_mode("native");
}

#[test]
fn gate_skb_mode_v4_v6() {
    gate_in_mode("skb");
}

/// Test 2: CLI changes take effect at once, for new SYNs only.
#[test]
fn cli_changes_apply_while_connected() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    let gk = &lab.gk;

    // Established connections survive a range that covers them.
    for (src, net) in [(DENIED4, DENY4_NET), (DENIED6, DENY6_NET)] {
        let mut est = tcp_connect_stream(&lab.client, ip(src), srv(src, SMTP), CONNECT_OK)
            .unwrap_or_else(|e| panic!("{src}: {e:?}"));
        roundtrip(&mut est, b'a', "before range add");
        gk.ok(&["range", "add", net]);
        roundtrip(&mut est, b'b', "established connection after range add");
        lab.expect_dropped(src, SMTP, "new connect after range add");
        roundtrip(&mut est, b'c', "established connection after a dropped SYN");
        assert!(gk.hits("range", net) > 0, "{net}: no hits");
        gk.ok(&["range", "del", net]);
        lab.expect_connect(src, SMTP, "after range del");
        roundtrip(&mut est, b'd', "established connection after range del");
        assert!(!range_nets(gk).contains(net));
        // Added again, it is a new range: its hits start from zero.
        gk.ok(&["range", "add", net]);
        assert_eq!(gk.hits("range", net), 0, "{net}: re-added range inherited old hits");
        gk.ok(&["range", "del", net]);
    }

    // A v6 ban covers the /64: the address, another in the same /64; not another /64.
    let s0 = gk.stats();
    let out = gk.ok(&["ban", "add", BAN6, "--comment", "test"]);
    assert!(out.contains("2001:db8:4::/64"), "{out}");
    let bans = gk.json(&["ban", "list", "--json"]);
    assert!(bans.as_array().unwrap().iter().any(|b| b["key"] == "2001:db8:4::/64"), "{bans:#}");
    lab.expect_dropped(BAN6, SMTP, "banned address");
    lab.expect_dropped(BAN6_SAME64, SMTP, "same /64 as a banned address");
    lab.expect_connect(BAN6_OTHER64, SMTP, "other /64 than a banned address");
    let s1 = gk.stats();
    s1.assert_rose(&s0, "manual-ban", "v6 ban");
    s1.assert_same(&s0, "deny-range", "v6 ban");
    gk.ok(&["ban", "del", BAN6_SAME64]);
    lab.expect_connect(BAN6, SMTP, "ban lifted via another address of the /64");

    // A ban with --expire lifts itself (datapath and listing).
    let s0 = gk.stats();
    gk.ok(&["ban", "add", BAN4, "--expire", "2s"]);
    // One SYN, well within the 2 s (a retransmit would come after 1 s).
    assert_eq!(
        lab.connect(BAN4, SMTP, Duration::from_millis(600)),
        ConnectOutcome::TimedOut,
        "{BAN4} right after `ban add --expire 2s`"
    );
    gk.stats().assert_rose(&s0, "manual-ban", "expiring ban");
    lab.wait_connects(BAN4, SMTP, Duration::from_secs(10), "ban --expire 2s");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bans = gk.json(&["ban", "list", "--json"]);
        if !bans.as_array().unwrap().iter().any(|b| b["key"].as_str().is_some_and(|k| k.starts_with(BAN4))) {
            break;
        }
        assert!(Instant::now() < deadline, "expired ban still listed after 10 s: {bans:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Guarded ports change at once.
    gk.ok(&["range", "add", DENY4_NET]);
    lab.expect_dropped(DENIED4, SMTP, "port 25 guarded");
    lab.expect_connect(DENIED4, UNGUARDED, "port 2525 not guarded yet");
    let out = gk.ok(&["ports", "set", "2525"]);
    assert!(out.contains("2525"), "{out}");
    assert_eq!(gk.json(&["ports", "list", "--json"])["ports"], serde_json::json!([2525]));
    lab.expect_dropped(DENIED4, UNGUARDED, "after ports set 2525");
    lab.expect_connect(DENIED4, SMTP, "port 25 no longer guarded");
    lab.expect_connect(UNLISTED4, UNGUARDED, "unlisted source on the guarded 2525");
}

/// Test 2b: allow and deny ranges that overlap (added with --force) keep
/// "allow wins" through every change: allow added / removed / expiring inside
/// a deny range, a deny range removed / re-added around an allow range, an
/// allow range covering a deny range, and an agent restart.
#[test]
fn allow_and_deny_changes_interplay() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    for (denied, allowed, deny_net, allow_net) in
        [(DENIED4, ALLOWED4, DENY4_NET, ALLOW4_NET), (DENIED6, ALLOWED6, DENY6_NET, ALLOW6_NET)]
    {
        let gk = &lab.gk;
        gk.ok(&["range", "add", deny_net]);
        gk.ok(&["allow", "add", allow_net, "--force"]);
        lab.expect_decision(allowed, "allowed", "allow inside deny");
        lab.expect_decision(denied, "deny-range", "deny around allow");
        gk.ok(&["allow", "del", allow_net]);
        lab.expect_decision(allowed, "deny-range", "allow removed from inside deny");
        gk.ok(&["allow", "add", allow_net, "--force"]);
        lab.expect_decision(allowed, "allowed", "allow re-added inside deny");
        gk.ok(&["range", "del", deny_net]);
        lab.expect_decision(denied, "unknown", "deny removed around allow");
        lab.expect_decision(allowed, "allowed", "allow alone");
        gk.ok(&["range", "add", deny_net, "--force"]);
        lab.expect_decision(denied, "deny-range", "deny re-added around allow");
        lab.expect_decision(allowed, "allowed", "allow inside re-added deny");
    }

    // An allow range covering a deny range.
    lab.gk.ok(&["range", "add", "203.0.113.8/29"]);
    lab.expect_decision(UNLISTED4, "deny-range", "203.0.113.8/29");
    lab.gk.ok(&["allow", "add", "203.0.113.0/24", "--force"]);
    lab.expect_decision(UNLISTED4, "allowed", "allow covering a deny");
    lab.gk.ok(&["allow", "del", "203.0.113.0/24"]);
    lab.expect_decision(UNLISTED4, "deny-range", "allow covering a deny removed");

    // An allow range inside a deny range that expires: the deny applies again.
    lab.gk.ok(&["allow", "del", ALLOW4_NET]);
    lab.gk.ok(&["allow", "add", ALLOW4_NET, "--force", "--expire", "3s"]);
    lab.expect_connect(ALLOWED4, SMTP, "expiring allow, not expired yet");
    lab.wait_dropped(ALLOWED4, SMTP, Duration::from_secs(15), "allow expired inside a deny");
    let allows = lab.gk.json(&["allow", "list", "--json"]);
    assert!(!allows.as_array().unwrap().iter().any(|r| r["net"] == ALLOW4_NET), "{allows:#}");

    // A restart keeps all of it.
    lab.gk.kill_agent();
    lab.gk.start(&[]);
    lab.expect_decision(ALLOWED4, "deny-range", "after restart: expired allow");
    lab.expect_decision(DENIED6, "deny-range", "after restart");
    lab.expect_decision(ALLOWED6, "allowed", "after restart");
    lab.expect_decision(UNLISTED4, "deny-range", "after restart");
}

/// Test 3: the datapath outlives a SIGKILLed agent; a new agent adopts it
/// without the interface ever losing XDP, and counters and ranges carry on.
#[test]
fn fail_static_and_adopt() {
    let mut lab = Lab::new();
    lab.gk.start(&["--xdp-mode", "native"]);
    lab.gk.ok(&["range", "add", DENY4_NET, "--comment", "persist me"]);
    lab.gk.ok(&["ports", "set", "25,587"]);
    lab.expect_dropped(DENIED4, SMTP, "agent up");
    let xdp_before = lab.gk.xdp_id().expect("xdp attached");
    let ifindex = lab.gk.ns.if_index(MX_IF).unwrap();

    lab.gk.kill_agent();

    // Enforcement goes on; read-only commands work from the pins.
    let s0 = lab.gk.stats();
    lab.expect_dropped(DENIED4, SMTP, "agent SIGKILLed");
    lab.expect_connect(UNLISTED4, SMTP, "agent SIGKILLed");
    let s1 = lab.gk.stats();
    s1.assert_rose(&s0, "deny-range", "agent down");
    s1.assert_rose(&s0, "unknown", "agent down");
    let st = lab.gk.status();
    assert_eq!(st["agent"]["running"], false, "{st:#}");
    assert_eq!(st["datapath"]["loaded"], true, "{st:#}");
    assert_eq!(st["datapath"]["entries"]["deny_v4"], 1, "{st:#}");
    assert_eq!(st["datapath"]["links"][0]["ifname"], MX_IF, "{st:#}");
    assert_eq!(st["datapath"]["links"][0]["mode"], "native", "{st:#}");
    let text = lab.gk.ok(&["status"]);
    assert!(text.contains("NOT RUNNING"), "{text}");
    assert_eq!(lab.gk.xdp_id(), Some(xdp_before), "{}", lab.gk.link_details());

    // Changes need the agent: a clear error, non-zero exit.
    for args in [
        &["range", "add", "203.0.113.0/24"][..],
        &["range", "del", DENY4_NET],
        &["ban", "add", BAN4],
        &["ports", "set", "25"],
        &["range", "list", "--json"],
    ] {
        let out = lab.gk.fails(args);
        assert!(out.stderr.contains("not running"), "{args:?}: {out}");
        assert_eq!(out.code(), Some(1), "{out}");
    }

    // Restart while watching the interface: XDP must never be missing.
    let gaps = Mutex::new(Vec::<String>::new());
    let stop = AtomicBool::new(false);
    let ns_name = lab.gk.ns.name().to_owned();
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // `ip` straight away (the Instance is busy restarting its agent).
                let out = std::process::Command::new("ip")
                    .args(["-n", &ns_name, "-d", "link", "show", "dev", MX_IF])
                    .output();
                match out {
                    Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("prog/xdp id") => {}
                    Ok(o) => gaps.lock().unwrap().push(format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => gaps.lock().unwrap().push(format!("ip: {e}")),
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        });
        lab.gk.start(&["--xdp-mode", "native"]);
        // A few more samples after the agent is up.
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let samples = watcher.join().unwrap();
        assert!(samples > 0);
    });
    let gaps = gaps.into_inner().unwrap();
    assert!(gaps.is_empty(), "interface lost XDP during the restart ({} samples): {gaps:#?}", gaps.len());

    let st = lab.gk.status();
    let ifs = &st["detail"]["interfaces"];
    assert_eq!(ifs.as_array().map(Vec::len), Some(1), "{st:#}");
    assert_eq!(ifs[0]["ifname"], MX_IF, "{st:#}");
    assert_eq!(ifs[0]["ifindex"], ifindex, "{st:#}");
    assert_eq!(ifs[0]["mode"], "native", "{st:#}");
    assert_eq!(ifs[0]["adopted"], true, "{st:#}");
    assert!(lab.gk.xdp_id().is_some(), "{}", lab.gk.link_details());
    assert!(lab.gk.link_details().contains(" xdp "), "{}", lab.gk.link_details());

    // Counters and ranges carried over; enforcement continues.
    let s2 = lab.gk.stats();
    for c in ["deny-range", "unknown"] {
        assert!(s2.total(c) >= s1.total(c), "`{c}` reset by the restart: before {:#}\nafter {:#}", s1.v, s2.v);
    }
    let rows = lab.gk.json(&["range", "list", "--json"]);
    let row = rows.as_array().unwrap().iter().find(|r| r["net"] == DENY4_NET).unwrap_or_else(|| panic!("{rows:#}"));
    assert_eq!(row["comment"], "persist me");
    let hits_before = s1.v["top_ranges"].as_array().unwrap().iter().find(|t| t["range"] == DENY4_NET).unwrap()["hits"]
        .as_u64()
        .unwrap();
    assert!(row["hits"].as_u64().unwrap() >= hits_before, "range hits reset by the restart: {rows:#}");
    assert_eq!(lab.gk.json(&["ports", "list", "--json"])["ports"], serde_json::json!([25, 587]));
    lab.expect_dropped(DENIED4, SMTP, "after adoption");
    lab.gk.stats().assert_rose(&s2, "deny-range", "after adoption");
    // The new agent takes changes again.
    lab.gk.ok(&["range", "del", DENY4_NET]);
    lab.expect_connect(DENIED4, SMTP, "after range del on the new agent");
}

/// Test 4: dry-run counts what it would drop and drops nothing.
#[test]
fn dry_run_counts_but_passes() {
    let mut lab = Lab::new();
    lab.gk.start(&["--dry-run"]);
    let st = lab.gk.status();
    assert_eq!(st["datapath"]["dry_run"], true, "{st:#}");
    lab.gk.ok(&["range", "add", DENY4_NET, DENY6_NET]);
    for src in [DENIED4, DENIED6] {
        let s0 = lab.gk.stats();
        lab.expect_connect(src, SMTP, "dry-run");
        let s1 = lab.gk.stats();
        s1.assert_rose(&s0, "dry-run-would-drop", src);
        s1.assert_rose(&s0, "deny-range", src);
        assert_eq!(
            s1.total("dry-run-would-drop") - s0.total("dry-run-would-drop"),
            s1.total("deny-range") - s0.total("deny-range"),
            "every would-be drop counted once in each: {:#}",
            s1.v
        );
    }
    let text = lab.gk.ok(&["status"]);
    assert!(text.contains("YES"), "status should say dry-run: {text}");
}

/// Test 5a: `unload` with the agent running.
#[test]
fn unload_with_agent() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    lab.gk.ok(&["range", "add", DENY4_NET]);
    lab.expect_dropped(DENIED4, SMTP, "before unload");
    let out = lab.gk.ok(&["unload"]);
    assert!(out.contains("unloaded"), "{out}");
    let agent = lab.gk.agent.as_mut().unwrap();
    let st = agent.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(st.is_some(), "agent still running 20 s after unload; log:\n{}", agent.log());
    assert!(st.unwrap().success(), "agent exit after unload: {st:?}\n{}", agent.log());
    assert!(!lab.gk.pin_dir().exists(), "pin dir {} still exists", lab.gk.pin_dir().display());
    assert!(!lab.gk.socket().exists(), "socket left behind");
    assert_eq!(lab.gk.xdp_id(), None, "{}", lab.gk.link_details());
    lab.expect_connect(DENIED4, SMTP, "after unload");
    // The database stays: status says nothing is loaded ...
    let st = lab.gk.status();
    assert_eq!(st["datapath"]["loaded"], false, "{st:#}");
    assert_eq!(st["agent"]["running"], false, "{st:#}");
    // ... and the next `gatekeeper run` restores the same state.
    lab.gk.agent = None;
    lab.gk.start(&[]);
    assert!(range_nets(&lab.gk).contains(DENY4_NET));
    assert!(lab.gk.xdp_id().is_some(), "{}", lab.gk.link_details());
    lab.expect_dropped(DENIED4, SMTP, "agent started again after unload");
}

/// SIGTERM: the agent exits cleanly, removes its socket, and the datapath
/// keeps enforcing.
#[test]
fn sigterm_leaves_the_datapath_enforcing() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    lab.gk.ok(&["range", "add", DENY4_NET]);
    let mut agent = lab.gk.agent.take().unwrap();
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = agent.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(matches!(st, Some(s) if s.success()), "exit after SIGTERM: {st:?}\n{}", agent.log());
    assert!(!lab.gk.socket().exists(), "socket left behind after SIGTERM");
    assert!(lab.gk.xdp_id().is_some(), "{}", lab.gk.link_details());
    lab.expect_dropped(DENIED4, SMTP, "agent stopped with SIGTERM");
    lab.expect_connect(UNLISTED4, SMTP, "agent stopped with SIGTERM");
    let out = lab.gk.fails(&["range", "del", DENY4_NET]);
    assert!(out.stderr.contains("not running"), "{out}");
}

/// Test 5b: `unload` without an agent (after SIGKILL) removes the pins.
#[test]
fn unload_without_agent() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    lab.gk.ok(&["range", "add", DENY6_NET]);
    lab.expect_dropped(DENIED6, SMTP, "before kill");
    lab.gk.kill_agent();
    lab.expect_dropped(DENIED6, SMTP, "after kill");
    // A map an older gatekeeper pinned under a name this one does not use.
    let stale = lab.gk.pin_dir().join("maps/GK_V4_SLOTS");
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args(["type", "array", "key", "4", "value", "16", "entries", "1", "name", "GK_V4_SLOTS"])
        .status()
        .expect("run bpftool");
    assert!(made.success(), "bpftool map create {}", stale.display());
    let out = lab.gk.ok(&["unload"]);
    assert!(out.contains("removed link"), "{out}");
    assert!(out.contains("GK_V4_SLOTS (left by an older gatekeeper)"), "{out}");
    assert!(!lab.gk.pin_dir().exists(), "pin dir {} still exists", lab.gk.pin_dir().display());
    assert_eq!(lab.gk.xdp_id(), None, "{}", lab.gk.link_details());
    lab.expect_connect(DENIED6, SMTP, "after unload");
    // A second unload has nothing left to do, and says so.
    let out = lab.gk.ok(&["unload"]);
    assert!(out.contains("nothing"), "{out}");
}

/// Test 6: concurrent CLIs never lose an update.
#[test]
fn concurrent_cli_updates_are_not_lost() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    let sample = ["203.0.113.100", "203.0.113.150", "203.0.113.199"];
    for a in sample {
        lab.client.addr_add(CLIENT_IF, &format!("{a}/24")).unwrap();
    }
    let gk = &lab.gk;
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for half in 0..2u32 {
            let failures = &failures;
            s.spawn(move || {
                std::thread::scope(|s| {
                    for i in 0..50u32 {
                        s.spawn(move || {
                            let net = format!("203.0.113.{}/32", 100 + 2 * i + half);
                            let out = gk.cli(&["range", "add", &net, "--comment", &format!("thread {half}")]);
                            if !out.success() {
                                failures.lock().unwrap().push(out.to_string());
                            }
                        });
                    }
                });
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of 100 adds failed: {failures:#?}", failures.len());
    let want: BTreeSet<String> = (100..200).map(|n| format!("203.0.113.{n}/32")).collect();
    assert_eq!(range_nets(gk), want);
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["deny_v4"], 100, "{st:#}");
    let s0 = gk.stats();
    for a in sample {
        lab.expect_dropped(a, SMTP, "one of 100 concurrently added /32s");
    }
    lab.expect_connect(UNLISTED4, SMTP, "203.0.113.9 is not one of them");
    gk.stats().assert_rose(&s0, "deny-range", "concurrent adds");
}

/// Test 7: a range that expired while no agent ran is gone after a restart.
#[test]
fn restart_drops_ranges_expired_while_down() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    lab.gk.ok(&["range", "add", DENY4_NET, "--expire", "3s"]);
    lab.gk.ok(&["range", "add", DENY6_NET]);
    let rows = lab.gk.json(&["range", "list", "--json"]);
    let expires_at = rows.as_array().unwrap().iter().find(|r| r["net"] == DENY4_NET).unwrap()["expires_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("no expires_at: {rows:#}"));
    lab.gk.kill_agent();
    let st = lab.gk.status();
    assert_eq!(
        st["datapath"]["entries"]["deny_v4"], 1,
        "the range should still be in the datapath when the agent was killed: {st:#}"
    );
    lab.expect_dropped(DENIED4, SMTP, "agent down, range not yet expired");

    // Wait (bounded) until the range's expiry has passed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while unix_now() <= expires_at {
        assert!(Instant::now() < deadline, "clock did not reach {expires_at}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.gk.start(&[]);
    let nets = range_nets(&lab.gk);
    assert!(!nets.contains(DENY4_NET), "expired range still listed: {nets:?}");
    assert!(nets.contains(DENY6_NET), "unexpired range lost: {nets:?}");
    let st = lab.gk.status();
    assert_eq!(st["datapath"]["entries"]["deny_v4"], 0, "{st:#}");
    assert_eq!(st["datapath"]["entries"]["deny_v6"], 1, "{st:#}");
    lab.expect_connect(DENIED4, SMTP, "expired range gone from the datapath");
    lab.expect_dropped(DENIED6, SMTP, "unexpired range still enforced");
}

/// Test 8: two instances side by side, each guarding its own interface
/// (both named `gkmx`, in two namespaces), with separate pins and sockets.
#[test]
fn two_instances_side_by_side() {
    netlab::require_root();
    let client = Netns::new("client").unwrap();
    let mx1 = Netns::new("mxa").unwrap();
    let mx2 = Netns::new("mxb").unwrap();
    veth_pair(&mx1, MX_IF, &client, "gkc1").unwrap();
    veth_pair(&mx2, MX_IF, &client, "gkc2").unwrap();
    mx1.addr_add(MX_IF, "192.0.2.1/24").unwrap();
    client.addr_add("gkc1", "192.0.2.2/24").unwrap();
    mx2.addr_add(MX_IF, "198.51.100.1/24").unwrap();
    client.addr_add("gkc2", "198.51.100.2/24").unwrap();
    // Sources on the client's loopback, routed by each mx back via its veth.
    let (src_a, src_b, src_c) = ("203.0.113.5", "203.0.113.6", "203.0.113.7");
    for a in [src_a, src_b, src_c] {
        client.addr_add("lo", &format!("{a}/32")).unwrap();
    }
    mx1.route_add("203.0.113.0/24 via 192.0.2.2").unwrap();
    mx2.route_add("203.0.113.0/24 via 198.51.100.2").unwrap();
    let dst1 = SocketAddr::new(ip("192.0.2.1"), SMTP);
    let dst2 = SocketAddr::new(ip("198.51.100.1"), SMTP);
    let l1 = EchoServer::spawn(&mx1, dst1);
    let l2 = EchoServer::spawn(&mx2, dst2);
    let mut gk1 = instance(mx1, MX_IF);
    let mut gk2 = instance(mx2, MX_IF);
    gk1.start(&[]);
    gk2.start(&[]);
    let connect = |src: &str, dst: SocketAddr, t: Duration| tcp_connect(&client, ip(src), dst, t);

    gk1.ok(&["range", "add", &format!("{src_a}/32")]);
    gk2.ok(&["range", "add", &format!("{src_b}/32")]);
    assert_eq!(range_nets(&gk1), BTreeSet::from([format!("{src_a}/32")]));
    assert_eq!(range_nets(&gk2), BTreeSet::from([format!("{src_b}/32")]));

    let (s1, s2) = (gk1.stats(), gk2.stats());
    assert_eq!(connect(src_a, dst1, CONNECT_DROP), ConnectOutcome::TimedOut, "a -> instance 1 (listed there)");
    assert_eq!(connect(src_a, dst2, CONNECT_OK), ConnectOutcome::Connected, "a -> instance 2 (not listed there)");
    let (t1, t2) = (gk1.stats(), gk2.stats());
    t1.assert_rose(&s1, "deny-range", "instance 1");
    t2.assert_same(&s2, "deny-range", "instance 2");
    t2.assert_rose(&s2, "unknown", "instance 2");
    assert_eq!(connect(src_b, dst1, CONNECT_OK), ConnectOutcome::Connected, "b -> instance 1 (not listed there)");
    assert_eq!(connect(src_b, dst2, CONNECT_DROP), ConnectOutcome::TimedOut, "b -> instance 2 (listed there)");
    let (u1, u2) = (gk1.stats(), gk2.stats());
    u1.assert_same(&t1, "deny-range", "instance 1");
    u2.assert_rose(&t2, "deny-range", "instance 2");
    assert_eq!(connect(src_c, dst1, CONNECT_OK), ConnectOutcome::Connected);
    assert_eq!(connect(src_c, dst2, CONNECT_OK), ConnectOutcome::Connected);
    // Each server saw exactly the connects that were let through to it.
    assert_eq!((l1.wait_accepts(2), l2.wait_accepts(2)), (2, 2));

    // Status of each names only its own pins.
    for gk in [&gk1, &gk2] {
        let st = gk.status();
        assert_eq!(st["detail"]["pin_dir"], gk.pin_dir().display().to_string(), "{st:#}");
        assert_eq!(st["datapath"]["entries"]["deny_v4"], 1, "{st:#}");
    }

    // Unloading one leaves the other enforcing.
    gk1.ok(&["unload"]);
    assert!(gk1.agent.as_mut().unwrap().wait_timeout(Duration::from_secs(20)).unwrap().is_some());
    assert_eq!(gk1.xdp_id(), None);
    assert!(gk2.xdp_id().is_some());
    assert!(gk2.pin_dir().exists());
    assert_eq!(connect(src_a, dst1, CONNECT_OK), ConnectOutcome::Connected, "instance 1 unloaded");
    assert_eq!(connect(src_b, dst2, CONNECT_DROP), ConnectOutcome::TimedOut, "instance 2 unaffected");
    gk2.ok(&["ports", "list"]);
}

/// Test 9: a pin dir that is not on bpffs is refused, naming the path, and
/// nothing is attached.
#[test]
fn run_refuses_pin_dir_outside_bpffs() {
    netlab::require_root();
    let mx = Netns::new("mx").unwrap();
    let client = Netns::new("client").unwrap();
    veth_pair(&mx, MX_IF, &client, CLIENT_IF).unwrap();
    let bin = netlab::bin_path("gatekeeper").unwrap();
    let tmp = tempfile::Builder::new().prefix("gk-not-bpffs-").tempdir().unwrap();
    std::fs::write(tmp.path().join("gatekeeper.toml"), TEST_CONFIG).unwrap();
    // An existing directory, and one that does not exist yet.
    for pin_dir in [tmp.path().join("pins"), tmp.path().join("deeper/still/pins")] {
        if !pin_dir.starts_with(tmp.path().join("deeper")) {
            std::fs::create_dir(&pin_dir).unwrap();
        }
        let sock = tmp.path().join("gk.sock");
        let (config, state) = (tmp.path().join("gatekeeper.toml"), tmp.path().join("state"));
        let args = run_args(&sock, &pin_dir, &config, &state, &["--iface", MX_IF]);
        let out = nsenter_output(&mx, &bin, &args, CLI_TIMEOUT).unwrap();
        assert!(!out.success(), "{out}");
        assert!(out.stderr.contains(&pin_dir.display().to_string()), "error does not name the pin dir: {out}");
        assert!(out.stderr.contains("bpf"), "error does not say why: {out}");
        assert_eq!(mx.xdp_prog_id(MX_IF).unwrap(), None, "XDP attached despite the error");
        assert!(!sock.exists(), "socket created despite the error");
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("pins"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "something created in the non-bpffs dir: {left:?}");
    }
}

/// A second `gatekeeper run` pointed at the socket and pin dir of a running
/// agent must be refused without touching the running datapath: not its
/// ranges (reconciled against another state database), not its dry-run flag
/// or ports, not its program.
#[test]
fn second_agent_on_the_same_pins_changes_nothing() {
    let mut lab = Lab::new();
    lab.gk.start(&[]);
    lab.gk.ok(&["range", "add", DENY4_NET, DENY6_NET]);
    lab.expect_dropped(DENIED4, SMTP, "first agent");
    let before = lab.gk.status();
    let xdp_before = lab.gk.xdp_id();
    let other_state = lab.gk.dir().join("other-state");
    let mut args = lab.gk.run_args(&["--dry-run", "--ports", "2525"]);
    // Same socket and pin dir, another (empty) state dir.
    let i = args.iter().position(|a| a == "--state-dir").unwrap();
    args[i + 1] = other_state.display().to_string();
    let out = lab.gk.exec(&args);
    assert!(!out.success(), "second agent should be refused: {out}");
    assert!(out.stderr.contains("already"), "{out}");

    // Collect everything the refused agent changed, then report it at once.
    let after = lab.gk.status();
    let mut changed = Vec::new();
    if after["datapath"]["entries"] != before["datapath"]["entries"] {
        changed.push(format!("datapath entries {} -> {}", before["datapath"]["entries"], after["datapath"]["entries"]));
    }
    if after["datapath"]["dry_run"] != false {
        changed.push("dry-run switched on".into());
    }
    if after["datapath"]["ports"] != serde_json::json!([25]) {
        changed.push(format!("guarded ports -> {}", after["datapath"]["ports"]));
    }
    if after["datapath"]["program"] != before["datapath"]["program"] {
        changed.push(format!("pinned program {} -> {}", before["datapath"]["program"], after["datapath"]["program"]));
    }
    if lab.gk.xdp_id() != xdp_before {
        changed.push(format!("program on {MX_IF}: {xdp_before:?} -> {:?}", lab.gk.xdp_id()));
    }
    for src in [DENIED4, DENIED6] {
        let r = lab.connect(src, SMTP, CONNECT_DROP);
        if r != ConnectOutcome::TimedOut {
            changed.push(format!("deny-listed {src} -> port 25: {r:?}"));
        }
    }
    assert!(
        changed.is_empty(),
        "a refused second `gatekeeper run` changed the running datapath:\n  {}\nits output: {out}",
        changed.join("\n  ")
    );
    assert!(lab.gk.agent.as_mut().unwrap().is_running());
}
