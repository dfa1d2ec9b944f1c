//! The egress gate on a router, with real TCP through three namespaces
//! (root): a "sub" namespace holds the subscribers (several TEST-NET source
//! addresses on one veth), a "rtr" namespace forwards IPv4 and IPv6 and runs
//! the real `gatekeeper run` with `--uplink` (TC egress towards the
//! internet) and/or `--subscriber-iface` (XDP on the subscriber side), and a
//! "net" namespace plays the internet: an outside MTA and the ISP's
//! smarthost, both listening on 25 and 587.
//!
//! ```text
//!  sub: gksub ------------ gkrsub :rtr: gkrup ------------ gknet :net
//!                          198.51.100.1      203.0.113.1/30   203.0.113.2/30
//!                          2001:db8:51::1    2001:db8:ff::1   2001:db8:ff::2
//!                          (forwarding)                       lo: MTA 203.0.113.25, 2001:db8:113::25
//!                                                                 smarthost 192.0.2.25, 2001:db8:2::25
//!  pool 198.51.100.0/25: .10 and .11 pooled, .25 exempt; .200 not pooled
//!  pool 2001:db8:51::/48: ::10, ::11 (same /64), 51:1::10 (other /64), ::25 exempt;
//!  2001:db8:52::10 not pooled
//! ```
//!
//! A dropped SYN shows as a connect that times out after [`CONNECT_DROP`];
//! a rejected one as "connection refused" (a RST came back). Native-mode
//! reject sends the RST back with XDP_TX, which a veth only delivers when
//! its peer (the subscriber's end) has an XDP program too: that test puts a
//! pass-only program there ([`attach_xdp_pass`]). Every test has
//! its own namespaces (distinct prefixes), pin dir, socket and state dir;
//! assertions never depend on how long something took, waits are bounded
//! polls for a condition.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::{
    programs::{tc::TcAttachType, SchedClassifier, Xdp, XdpMode},
    Ebpf,
};
use gatekeeper::datapath::load_object;
use gatekeeper_common::programs;
use gatekeeper_tests::agentlab::{Instance, Stats};
use gatekeeper_tests::netlab::{self, in_netns, tcp_connect, veth_pair, ConnectOutcome, Netns, TcpListenerGuard};
use serde_json::Value;

// ----------------------------------------------------------------- addresses

const SUB_IF: &str = "gksub";
/// The router's subscriber-facing interface (XDP egress gate).
const RTR_SUB_IF: &str = "gkrsub";
/// The router's uplink (TC egress gate).
const RTR_UP_IF: &str = "gkrup";
const NET_IF: &str = "gknet";

/// The subscribers (prefix lengths match the router's subnets).
const SUB_ADDRS: [&str; 9] = [
    "198.51.100.10/24",
    "198.51.100.11/24",
    "198.51.100.25/24",
    "198.51.100.200/24",
    "2001:db8:51::10/64",
    "2001:db8:51::11/64",
    "2001:db8:51::25/64",
    "2001:db8:51:1::10/64",
    "2001:db8:52::10/64",
];
const RTR_SUB_ADDRS: [&str; 4] = ["198.51.100.1/24", "2001:db8:51::1/64", "2001:db8:51:1::1/64", "2001:db8:52::1/64"];

const POOL4: &str = "198.51.100.0/25";
const POOLED4: &str = "198.51.100.10";
const POOLED4_B: &str = "198.51.100.11";
const EXEMPT4: &str = "198.51.100.25";
const OTHER4: &str = "198.51.100.200";
const MTA4: &str = "203.0.113.25";
const SMH4: &str = "192.0.2.25";

/// The v6 pool: 2001:db8:51::/64 and its neighbours.
const POOL6: &str = "2001:db8:51::/48";
const POOLED6: &str = "2001:db8:51::10";
/// In the same /64 as [`POOLED6`] (one rate-limit bucket).
const POOLED6_SAME64: &str = "2001:db8:51::11";
/// Another /64 of the pool.
const POOLED6_B: &str = "2001:db8:51:1::10";
const EXEMPT6: &str = "2001:db8:51::25";
const OTHER6: &str = "2001:db8:52::10";
const MTA6: &str = "2001:db8:113::25";
const SMH6: &str = "2001:db8:2::25";

const SMTP: u16 = 25;
const SUBMISSION: u16 = 587;

/// A connect that should succeed gets this long (it normally takes < 1 ms).
const CONNECT_OK: Duration = Duration::from_secs(5);
/// A connect whose SYN is dropped times out after this long.
const CONNECT_DROP: Duration = Duration::from_secs(1);
/// A rejected connect must end with "refused" before this (far less in practice).
const CONNECT_REJECT: Duration = Duration::from_secs(5);

/// Every agent here: no DNS at all (the system resolver points outside).
const BASE_CONFIG: &str = "[dns]\nenabled = false\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// One address family's cast.
struct Fam {
    pooled: &'static str,
    exempt: &'static str,
    other: &'static str,
    mta: &'static str,
    smh: &'static str,
    pool: &'static str,
    smh_net: &'static str,
    exempt_net: &'static str,
}

const V4: Fam = Fam {
    pooled: POOLED4,
    exempt: EXEMPT4,
    other: OTHER4,
    mta: MTA4,
    smh: SMH4,
    pool: POOL4,
    smh_net: "192.0.2.25/32",
    exempt_net: "198.51.100.25/32",
};
const V6: Fam = Fam {
    pooled: POOLED6,
    exempt: EXEMPT6,
    other: OTHER6,
    mta: MTA6,
    smh: SMH6,
    pool: POOL6,
    smh_net: "2001:db8:2::25/128",
    exempt_net: "2001:db8:51::25/128",
};

// ------------------------------------------------------------------ topology

/// sub -- rtr (agent) -- net, with listeners in net. Fields drop in order:
/// listeners, the instance (agent, pins: unpinning detaches the links,
/// state dir, rtr), then the other namespaces.
struct Topo {
    _listeners: Vec<TcpListenerGuard>,
    /// The agent in the router namespace.
    gk: Instance,
    sub: Netns,
    _net: Netns,
}

impl Topo {
    /// Builds the three namespaces; `tag` (1-10 chars of [a-z0-9]) makes
    /// their prefixes distinct per test. `extra_config` is appended to the
    /// agent's config file.
    fn new(tag: &str, extra_config: &str) -> Topo {
        netlab::require_root();
        let sub = Netns::new(&format!("{tag}s")).unwrap();
        let rtr = Netns::new(&format!("{tag}r")).unwrap();
        let net = Netns::new(&format!("{tag}n")).unwrap();
        veth_pair(&sub, SUB_IF, &rtr, RTR_SUB_IF).unwrap();
        veth_pair(&rtr, RTR_UP_IF, &net, NET_IF).unwrap();
        for a in SUB_ADDRS {
            sub.addr_add(SUB_IF, a).unwrap();
        }
        for a in RTR_SUB_ADDRS {
            rtr.addr_add(RTR_SUB_IF, a).unwrap();
        }
        rtr.addr_add(RTR_UP_IF, "203.0.113.1/30").unwrap();
        rtr.addr_add(RTR_UP_IF, "2001:db8:ff::1/64").unwrap();
        net.addr_add(NET_IF, "203.0.113.2/30").unwrap();
        net.addr_add(NET_IF, "2001:db8:ff::2/64").unwrap();
        for a in ["203.0.113.25/32", "192.0.2.25/32", "2001:db8:113::25/128", "2001:db8:2::25/128"] {
            net.addr_add("lo", a).unwrap();
        }
        rtr.sysctl(&[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")]).unwrap();
        // Routes only to the lab's own nets, never a default.
        for r in [
            "203.0.113.0/24 via 198.51.100.1",
            "192.0.2.0/24 via 198.51.100.1",
            "2001:db8:113::/48 via 2001:db8:51::1",
            "2001:db8:2::/48 via 2001:db8:51::1",
        ] {
            sub.route_add(r).unwrap();
        }
        for r in [
            "203.0.113.0/24 via 203.0.113.2",
            "192.0.2.0/24 via 203.0.113.2",
            "2001:db8:113::/48 via 2001:db8:ff::2",
            "2001:db8:2::/48 via 2001:db8:ff::2",
        ] {
            rtr.route_add(r).unwrap();
        }
        for r in [
            "198.51.100.0/24 via 203.0.113.1",
            "2001:db8:51::/48 via 2001:db8:ff::1",
            "2001:db8:52::/64 via 2001:db8:ff::1",
        ] {
            net.route_add(r).unwrap();
        }
        let mut listeners = Vec::new();
        for host in [MTA4, MTA6, SMH4, SMH6] {
            for port in [SMTP, SUBMISSION] {
                listeners.push(TcpListenerGuard::spawn(&net, sa(host, port)).unwrap());
            }
        }
        let gk = Instance::new(rtr, None, "gk-egress-ns-", &format!("{BASE_CONFIG}{extra_config}"))
            .ready_when(&["status", "--json"], "\"running\": true");
        let t = Topo { _listeners: listeners, gk, sub, _net: net };
        // Before any agent: every path works (the lab itself is sound).
        for (src, dst) in [(POOLED4, MTA4), (POOLED6, MTA6), (OTHER4, SMH4), (OTHER6, SMH6)] {
            t.expect(src, dst, SMTP, ConnectOutcome::Connected, "lab check before the agent runs");
        }
        t
    }

    /// The router's namespace.
    fn rtr(&self) -> &Netns {
        &self.gk.ns
    }

    fn stats(&self, iface: &str) -> Stats {
        self.gk.egress_stats(iface)
    }

    fn connect(&self, src: &str, dst: &str, port: u16, timeout: Duration) -> ConnectOutcome {
        tcp_connect(&self.sub, ip(src), sa(dst, port), timeout)
    }

    /// Connects from `src` to `dst:port` and expects `want` (a timeout for
    /// a dropped SYN, "refused" for a reject).
    fn expect(&self, src: &str, dst: &str, port: u16, want: ConnectOutcome, what: &str) {
        let timeout = match want {
            ConnectOutcome::Connected => CONNECT_OK,
            ConnectOutcome::Refused => CONNECT_REJECT,
            _ => CONNECT_DROP,
        };
        let got = self.connect(src, dst, port, timeout);
        assert_eq!(got, want, "{what}: {src} -> {dst} port {port}\nagent log:\n{}", self.gk.log());
    }

    /// Polls (bounded by `limit`) until a connect from `src` gets `want`.
    fn wait_for(&self, src: &str, dst: &str, port: u16, want: ConnectOutcome, limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.connect(src, dst, port, CONNECT_DROP);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {src} -> {dst} port {port}: still {got:?} (want {want:?}) after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts the agent and the pins show `ifname` attached with `role`
    /// and `mode`, and the pin `links/<pin>` exists.
    fn assert_attached(&self, ifname: &str, role: &str, mode: &str, pin: &str) {
        let st = self.gk.status();
        let find = |list: &Value| -> Option<Value> {
            list.as_array()?.iter().find(|l| l["ifname"] == ifname && l["role"] == role).cloned()
        };
        let a = find(&st["detail"]["interfaces"]).unwrap_or_else(|| panic!("{ifname} ({role}) not attached: {st:#}"));
        assert_eq!(a["mode"], mode, "{st:#}");
        let l = find(&st["datapath"]["links"]).unwrap_or_else(|| panic!("{ifname} ({role}) not pinned: {st:#}"));
        assert_eq!(l["mode"], mode, "{st:#}");
        let p = self.gk.pin_dir().join("links").join(pin);
        assert!(p.exists(), "{} missing; status {st:#}", p.display());
    }

    /// Names of the tcx programs on the uplink's egress, as the kernel has them.
    fn tcx_egress_progs(&self) -> Vec<String> {
        in_netns(self.rtr(), || {
            let (_, progs) = SchedClassifier::query_tcx(RTR_UP_IF, TcAttachType::Egress).expect("query tcx egress");
            progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect()
        })
    }

    fn tc_egress_filters(&self) -> String {
        self.rtr().run(&["tc", "filter", "show", "dev", RTR_UP_IF, "egress"]).expect("tc filter show")
    }

    /// `gatekeeper unload` with the agent running: the agent exits cleanly.
    fn unload(&mut self) {
        let out = self.gk.ok(&["unload"]);
        assert!(out.contains("unloaded"), "{out}");
        let mut agent = self.gk.agent.take().expect("agent");
        let st = agent.wait_timeout(Duration::from_secs(20)).unwrap();
        assert!(st.is_some_and(|s| s.success()), "agent after unload: {st:?}\n{}", agent.log());
    }
}

// ------------------------------------------------ XDP_TX back over a veth

/// Attaches a pass-only XDP program (gatekeeper's benchmark baseline) in
/// native mode to `ifname` inside `ns`; it stays attached while the
/// returned object lives. A veth hands frames sent back with XDP_TX by its
/// peer to its own receive ring, but only wakes that ring up when it has an
/// XDP program itself: GRO alone (`ethtool -K IF gro on`) is not enough,
/// the RST would sit in the ring until other traffic woke it.
fn attach_xdp_pass(ns: &Netns, ifname: &str) -> Ebpf {
    let mut bpf = load_object(64, |_| {}).expect("load the gatekeeper object");
    let prog: &mut Xdp = bpf.program_mut(programs::XDP_BASELINE).expect("baseline program").try_into().unwrap();
    prog.load().expect("load the baseline program");
    in_netns(ns, || prog.attach(ifname, XdpMode::Driver).map(drop))
        .unwrap_or_else(|e| panic!("attach XDP pass to {ifname} in {}: {e}", ns.name()));
    let link = ns.ip(&["-d", "link", "show", "dev", ifname]).unwrap();
    assert!(link.contains(" xdp "), "pass program not attached in native mode: {link}");
    bpf
}

// ================================================================ the checks

/// Pools, smarthosts and exempt entries as an ISP sets them up.
fn add_policy(t: &Topo, action: &str) {
    t.gk.ok(&["pool", "add", POOL4, POOL6, "--action", action, "--comment", "dynamic DSL"]);
    t.gk.ok(&["smarthost", "add", V4.smh_net, V6.smh_net, "--comment", "ISP relay"]);
    t.gk.ok(&["exempt", "add", V4.exempt_net, V6.exempt_net, "--comment", "business line with own MTA"]);
}

/// The core policy, IPv4 and IPv6, with the counters on `iface`: pooled
/// sources are blocked from outside port 25 but reach the smarthost on 25
/// and 587 and the outside MTA on 587; exempt and non-pooled sources reach
/// outside port 25.
fn core_policy(t: &Topo, iface: &str, what: &str) {
    add_policy(t, "drop");
    for f in [&V4, &V6] {
        let what = format!("{what}, {}", f.pooled);
        let hits0 = t.gk.hits("pool", f.pool);
        let s0 = t.stats(iface);
        t.expect(f.pooled, f.mta, SMTP, ConnectOutcome::TimedOut, &format!("{what}: pooled to outside MTA:25"));
        let s1 = t.stats(iface);
        s1.assert_rose(&s0, "pool-blocked", &what);
        for c in ["pool-rejected", "smarthost-allowed", "exempt", "rate-limited", "dry-run-would-drop"] {
            s1.assert_same(&s0, c, &what);
        }
        assert!(t.gk.hits("pool", f.pool) > hits0, "{what}: pool {} hits did not rise", f.pool);

        let smh0 = t.gk.hits("smarthost", f.smh_net);
        t.expect(f.pooled, f.smh, SMTP, ConnectOutcome::Connected, &format!("{what}: pooled to smarthost:25"));
        t.expect(f.pooled, f.smh, SUBMISSION, ConnectOutcome::Connected, &format!("{what}: pooled to smarthost:587"));
        t.expect(f.pooled, f.mta, SUBMISSION, ConnectOutcome::Connected, &format!("{what}: pooled to MTA:587"));
        let s2 = t.stats(iface);
        s2.assert_rose(&s1, "smarthost-allowed", &what);
        s2.assert_same(&s1, "pool-blocked", &what);
        assert!(t.gk.hits("smarthost", f.smh_net) > smh0, "{what}: smarthost {} hits did not rise", f.smh_net);

        let ex0 = t.gk.hits("exempt", f.exempt_net);
        t.expect(f.exempt, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: exempt to MTA:25"));
        let s3 = t.stats(iface);
        s3.assert_rose(&s2, "exempt", &what);
        s3.assert_same(&s2, "pool-blocked", &what);
        assert!(t.gk.hits("exempt", f.exempt_net) > ex0, "{what}: exempt {} hits did not rise", f.exempt_net);

        t.expect(f.other, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: non-pooled to MTA:25"));
        let s4 = t.stats(iface);
        for c in ["pool-blocked", "exempt", "smarthost-allowed"] {
            s4.assert_same(&s3, c, &format!("{what}: non-pooled source"));
        }
    }
    // The pools show among the top ranges, by kind.
    let st = t.gk.json(&["stats", "--json"]);
    let top = st["top_ranges"].as_array().unwrap_or_else(|| panic!("no top_ranges: {st:#}"));
    for pool in [POOL4, POOL6] {
        assert!(
            top.iter().any(|r| r["range"] == pool && r["kind"] == "pool" && r["hits"].as_u64() > Some(0)),
            "{what}: {pool} not in top_ranges as a pool: {st:#}"
        );
    }
}

// ====================================================================== tests

/// Test 1: the egress gate on the uplink's TC egress (tcx): forwarded SYNs.
#[test]
fn uplink_tcx_blocks_pools_but_not_smarthosts_exempt_or_others() {
    let mut t = Topo::new("egtcx", "");
    t.gk.start(&["--uplink", RTR_UP_IF, "--tc-mode", "tcx"]);
    t.assert_attached(RTR_UP_IF, "uplink", "tcx", &format!("tcx@{RTR_UP_IF}"));
    assert_eq!(t.tcx_egress_progs().len(), 1, "one tcx program on {RTR_UP_IF} egress");
    core_policy(&t, RTR_UP_IF, "uplink tcx");
}

/// Test 2: the egress gate as XDP on the router's subscriber-facing side.
fn subscriber_xdp(tag: &str, mode: &str) {
    let mut t = Topo::new(tag, "");
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", mode]);
    t.assert_attached(RTR_SUB_IF, "subscriber", mode, &format!("sub-{mode}@{RTR_SUB_IF}"));
    let link = t.rtr().ip(&["-d", "link", "show", "dev", RTR_SUB_IF]).unwrap();
    let flag = if mode == "native" { " xdp " } else { " xdpgeneric " };
    assert!(link.contains(flag), "{RTR_SUB_IF} not attached in {mode} mode: {link}");
    core_policy(&t, RTR_SUB_IF, &format!("subscriber XDP {mode}"));
}

#[test]
fn subscriber_xdp_native_blocks_pools() {
    subscriber_xdp("egxdpn", "native");
}

#[test]
fn subscriber_xdp_skb_blocks_pools() {
    subscriber_xdp("egxdps", "skb");
}

/// Test 3: `pool add --action reject`: the blocked SYN is answered with a
/// RST, so the subscriber's connect fails at once with "refused".
fn reject(t: &Topo, iface: &str, what: &str) {
    add_policy(t, "reject");
    let rows = t.gk.json(&["pool", "list", "--json"]);
    assert!(
        rows.as_array().unwrap().iter().all(|r| r["action"] == "reject"),
        "{what}: pools not marked reject: {rows:#}"
    );
    for f in [&V4, &V6] {
        let what = format!("{what}, {}", f.pooled);
        let s0 = t.stats(iface);
        t.expect(f.pooled, f.mta, SMTP, ConnectOutcome::Refused, &format!("{what}: pooled to outside MTA:25"));
        let s1 = t.stats(iface);
        s1.assert_rose(&s0, "pool-rejected", &what);
        s1.assert_same(&s0, "pool-blocked", &what);
        // Everything else as with drop pools.
        t.expect(f.pooled, f.smh, SMTP, ConnectOutcome::Connected, &format!("{what}: pooled to smarthost:25"));
        t.expect(f.pooled, f.mta, SUBMISSION, ConnectOutcome::Connected, &format!("{what}: pooled to MTA:587"));
        t.expect(f.exempt, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: exempt to MTA:25"));
        t.expect(f.other, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: non-pooled to MTA:25"));
    }
}

#[test]
fn reject_pool_on_uplink_tcx_refuses_at_once() {
    let mut t = Topo::new("egrjt", "");
    t.gk.start(&["--uplink", RTR_UP_IF, "--tc-mode", "tcx"]);
    reject(&t, RTR_UP_IF, "reject, uplink tcx");
}

#[test]
fn reject_pool_on_subscriber_xdp_native_refuses_at_once() {
    let mut t = Topo::new("egrjn", "");
    // XDP_TX out of the router's veth reaches the subscriber only if the
    // subscriber's veth end has an XDP program of its own.
    let _pass = attach_xdp_pass(&t.sub, SUB_IF);
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "native"]);
    reject(&t, RTR_SUB_IF, "reject, subscriber XDP native");
}

#[test]
fn reject_pool_on_subscriber_xdp_skb_refuses_at_once() {
    let mut t = Topo::new("egrjs", "");
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb"]);
    reject(&t, RTR_SUB_IF, "reject, subscriber XDP skb");
}

/// Test 4: a limit class on 587 with a burst of 3 and a slow rate: each
/// subscriber source (IPv6: each /64) gets 3 connections, then its SYNs are
/// dropped; other sources keep theirs; non-subscribers are not limited.
#[test]
fn rate_limit_per_subscriber_source() {
    let limit = "\n[[egress.limit]]\nname = \"submission\"\nports = [587]\nrate = \"1/h\"\nburst = 3\n";
    let mut t = Topo::new("egrl", limit);
    t.gk.start(&["--uplink", RTR_UP_IF]);
    let st = t.gk.json(&["status", "--json"]);
    let classes = st["datapath"]["egress"]["limits"].as_array().unwrap_or_else(|| panic!("no limits: {st:#}"));
    assert_eq!(classes.len(), 1, "only the configured class (it replaces the defaults): {st:#}");
    assert_eq!(classes[0]["ports"], serde_json::json!([587]), "{st:#}");
    add_policy(&t, "drop");

    for (src, dst, same_bucket) in [(POOLED4, MTA4, None), (EXEMPT4, MTA4, None), (POOLED6, MTA6, Some(POOLED6_SAME64))]
    {
        let what = format!("limit 3 on 587, {src}");
        let s0 = t.stats(RTR_UP_IF);
        for i in 1..=3 {
            t.expect(src, dst, SUBMISSION, ConnectOutcome::Connected, &format!("{what}: connection {i} of the burst"));
        }
        t.expect(src, dst, SUBMISSION, ConnectOutcome::TimedOut, &format!("{what}: connection 4, over the burst"));
        let s1 = t.stats(RTR_UP_IF);
        s1.assert_rose(&s0, "rate-limited", &what);
        s1.assert_same(&s0, "pool-blocked", &what);
        if let Some(same) = same_bucket {
            t.expect(same, dst, SUBMISSION, ConnectOutcome::TimedOut, &format!("{what}: {same}, same /64"));
        }
        // Port 25 has no limit class now (the configured classes replace the defaults).
        if src == EXEMPT4 {
            t.expect(src, dst, SMTP, ConnectOutcome::Connected, &format!("{what}: port 25 is not limited"));
        }
    }
    // Other subscriber sources still have their own buckets (POOLED4_B has
    // not used 587 yet; 2001:db8:51:1::/64 is another /64 of the pool).
    for src in [POOLED4_B, POOLED6_B] {
        let dst = if ip(src).is_ipv4() { MTA4 } else { MTA6 };
        t.expect(src, dst, SUBMISSION, ConnectOutcome::Connected, &format!("limit: {src} has its own bucket"));
    }
    // Sources outside pools and exempt entries are not limited at all.
    for src in [OTHER4, OTHER6] {
        let dst = if ip(src).is_ipv4() { MTA4 } else { MTA6 };
        for i in 1..=5 {
            t.expect(src, dst, SUBMISSION, ConnectOutcome::Connected, &format!("limit: non-subscriber {src}, #{i}"));
        }
    }
}

/// Test 5: CLI changes apply to a running agent at once, on both
/// attachments together; `unload` leaves nothing attached or pinned.
#[test]
fn changes_apply_live_and_unload_removes_everything() {
    let mut t = Topo::new("eglive", "");
    t.gk.start(&["--uplink", RTR_UP_IF, "--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb"]);
    t.assert_attached(RTR_UP_IF, "uplink", "tcx", &format!("tcx@{RTR_UP_IF}"));
    t.assert_attached(RTR_SUB_IF, "subscriber", "skb", &format!("sub-skb@{RTR_SUB_IF}"));
    let limit = Duration::from_secs(3);

    // Nothing configured yet: nothing blocked.
    t.expect(POOLED4, MTA4, SMTP, ConnectOutcome::Connected, "no pools yet");
    t.gk.ok(&["pool", "add", POOL4]);
    t.wait_for(POOLED4, MTA4, SMTP, ConnectOutcome::TimedOut, limit, "after pool add");
    t.gk.ok(&["pool", "del", POOL4]);
    t.wait_for(POOLED4, MTA4, SMTP, ConnectOutcome::Connected, limit, "after pool del");
    let rows = t.gk.json(&["pool", "list", "--json"]);
    assert_eq!(rows, serde_json::json!([]), "pool list after del");

    t.gk.ok(&["pool", "add", POOL4, POOL6]);
    t.wait_for(POOLED6, MTA6, SMTP, ConnectOutcome::TimedOut, limit, "v6 after pool add");
    t.gk.ok(&["smarthost", "add", SMH4]);
    t.wait_for(POOLED4, SMH4, SMTP, ConnectOutcome::Connected, limit, "after smarthost add");
    t.gk.ok(&["smarthost", "del", SMH4]);
    t.wait_for(POOLED4, SMH4, SMTP, ConnectOutcome::TimedOut, limit, "after smarthost del");
    t.gk.ok(&["exempt", "add", POOLED4]);
    t.wait_for(POOLED4, MTA4, SMTP, ConnectOutcome::Connected, limit, "after exempt add");
    t.gk.ok(&["exempt", "del", POOLED4]);
    t.wait_for(POOLED4, MTA4, SMTP, ConnectOutcome::TimedOut, limit, "after exempt del");

    // Both attachments are in the kernel before unload.
    assert!(t.rtr().xdp_prog_id(RTR_SUB_IF).unwrap().is_some(), "no XDP on {RTR_SUB_IF}");
    assert_eq!(t.tcx_egress_progs().len(), 1, "tcx on {RTR_UP_IF}");
    let net = t.rtr().run(&["bpftool", "net", "show"]).unwrap();
    assert!(net.contains(&format!("{RTR_SUB_IF}(")), "bpftool net show before unload: {net}");

    t.unload();
    assert!(!t.gk.pin_dir().join("links").exists(), "links/ still pinned after unload");
    assert!(!t.gk.pin_dir().join("maps").exists(), "maps/ still pinned after unload");
    let link = t.rtr().ip(&["-d", "link", "show", "dev", RTR_SUB_IF]).unwrap();
    assert!(!link.contains("prog/xdp"), "XDP still on {RTR_SUB_IF} after unload: {link}");
    assert_eq!(t.tcx_egress_progs(), Vec::<String>::new(), "tcx programs on {RTR_UP_IF} after unload");
    let net = t.rtr().run(&["bpftool", "net", "show"]).unwrap();
    assert!(
        !net.contains(RTR_SUB_IF) && !net.contains(RTR_UP_IF) && !net.contains("gatekeeper"),
        "bpftool net show after unload: {net}"
    );
    for (src, dst) in [(POOLED4, MTA4), (POOLED6, MTA6)] {
        t.expect(src, dst, SMTP, ConnectOutcome::Connected, "after unload");
    }
}

/// Test 6: `--tc-mode clsact`: the same gate through a clsact qdisc filter,
/// which `unload` removes.
#[test]
fn clsact_fallback_blocks_and_unload_removes_the_filter() {
    let mut t = Topo::new("egcls", "");
    t.gk.start(&["--uplink", RTR_UP_IF, "--tc-mode", "clsact"]);
    t.assert_attached(RTR_UP_IF, "uplink", "clsact", &format!("clsact@{RTR_UP_IF}"));
    assert!(t.gk.pin_dir().join("links").join(format!("clsact@{RTR_UP_IF}")).is_dir(), "clsact marker is a directory");
    let filters = t.tc_egress_filters();
    assert!(filters.contains("bpf") && filters.contains("gatekeeper"), "no gatekeeper filter: {filters}");
    assert!(t.tcx_egress_progs().is_empty(), "clsact mode must not attach tcx too");

    add_policy(&t, "drop");
    for f in [&V4, &V6] {
        let s0 = t.stats(RTR_UP_IF);
        t.expect(f.pooled, f.mta, SMTP, ConnectOutcome::TimedOut, "clsact: pooled to MTA:25");
        t.stats(RTR_UP_IF).assert_rose(&s0, "pool-blocked", "clsact");
        t.expect(f.pooled, f.smh, SMTP, ConnectOutcome::Connected, "clsact: pooled to smarthost:25");
        t.expect(f.exempt, f.mta, SMTP, ConnectOutcome::Connected, "clsact: exempt to MTA:25");
        t.expect(f.other, f.mta, SMTP, ConnectOutcome::Connected, "clsact: non-pooled to MTA:25");
    }

    t.unload();
    let filters = t.tc_egress_filters();
    assert!(filters.trim().is_empty(), "filters left on {RTR_UP_IF} egress after unload: {filters}");
    assert!(!t.gk.pin_dir().join("links").exists(), "links/ still pinned after unload");
    t.expect(POOLED4, MTA4, SMTP, ConnectOutcome::Connected, "clsact: after unload");
}
