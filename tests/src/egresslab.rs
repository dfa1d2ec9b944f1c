//! The egress lab: a router between subscribers and "the internet", with
//! the real `gatekeeper run` on the router (see `tests/tests/egress_ns.rs`
//! and `tests/tests/explain_ns.rs`), in three namespaces (root):
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
//! The net namespace listens on 25 and 587 of the MTA and the smarthost,
//! counting accepts ([`Topo::listener`]). Every topology has its own
//! namespaces (distinct prefixes), pin dir, socket and state dir; waits are
//! bounded polls for a condition.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    programs::{tc::TcAttachType, SchedClassifier, Xdp, XdpMode},
    Ebpf,
};
use gatekeeper::datapath::load_object;
use gatekeeper_common::programs;
use serde_json::Value;

use crate::agentlab::{Instance, Stats};
use crate::netlab::{self, in_netns, tcp_connect, veth_pair, CmdOutput, ConnectOutcome, Netns, TcpListenerGuard};

// ----------------------------------------------------------------- addresses

pub const SUB_IF: &str = "gksub";
/// The router's subscriber-facing interface (XDP egress gate).
pub const RTR_SUB_IF: &str = "gkrsub";
/// The router's uplink (TC egress gate).
pub const RTR_UP_IF: &str = "gkrup";
pub const NET_IF: &str = "gknet";

/// The subscribers (prefix lengths match the router's subnets).
pub const SUB_ADDRS: [&str; 9] = [
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
pub const RTR_SUB_ADDRS: [&str; 4] =
    ["198.51.100.1/24", "2001:db8:51::1/64", "2001:db8:51:1::1/64", "2001:db8:52::1/64"];

pub const POOL4: &str = "198.51.100.0/25";
pub const POOLED4: &str = "198.51.100.10";
pub const POOLED4_B: &str = "198.51.100.11";
pub const EXEMPT4: &str = "198.51.100.25";
pub const OTHER4: &str = "198.51.100.200";
pub const MTA4: &str = "203.0.113.25";
pub const SMH4: &str = "192.0.2.25";

/// The v6 pool: 2001:db8:51::/64 and its neighbours.
pub const POOL6: &str = "2001:db8:51::/48";
pub const POOLED6: &str = "2001:db8:51::10";
/// In the same /64 as [`POOLED6`] (one rate-limit bucket).
pub const POOLED6_SAME64: &str = "2001:db8:51::11";
/// Another /64 of the pool.
pub const POOLED6_B: &str = "2001:db8:51:1::10";
pub const EXEMPT6: &str = "2001:db8:51::25";
pub const OTHER6: &str = "2001:db8:52::10";
pub const MTA6: &str = "2001:db8:113::25";
pub const SMH6: &str = "2001:db8:2::25";

pub const SMTP: u16 = 25;
pub const SUBMISSION: u16 = 587;

/// A connect that should succeed gets this long (it normally takes < 1 ms).
pub const CONNECT_OK: Duration = Duration::from_secs(5);
/// A connect whose SYN is dropped times out after this long.
pub const CONNECT_DROP: Duration = Duration::from_secs(1);
/// A rejected connect must end with "refused" before this (far less in practice).
pub const CONNECT_REJECT: Duration = Duration::from_secs(5);

/// The SMTP client the namespace tests drive (Debian package `swaks`).
pub const SWAKS: &str = "/usr/bin/swaks";

/// Every agent here: no DNS at all (the system resolver points outside).
pub const BASE_CONFIG: &str = "[dns]\nenabled = false\n";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// One address family's cast.
pub struct Fam {
    pub pooled: &'static str,
    pub exempt: &'static str,
    pub other: &'static str,
    pub mta: &'static str,
    pub smh: &'static str,
    pub pool: &'static str,
    pub smh_net: &'static str,
    pub exempt_net: &'static str,
}

pub const V4: Fam = Fam {
    pooled: POOLED4,
    exempt: EXEMPT4,
    other: OTHER4,
    mta: MTA4,
    smh: SMH4,
    pool: POOL4,
    smh_net: "192.0.2.25/32",
    exempt_net: "198.51.100.25/32",
};
pub const V6: Fam = Fam {
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
pub struct Topo {
    listeners: Vec<TcpListenerGuard>,
    /// The agent in the router namespace.
    pub gk: Instance,
    pub sub: Netns,
    pub net: Netns,
}

impl Topo {
    /// Builds the three namespaces; `tag` (1-10 chars of [a-z0-9]) makes
    /// their prefixes distinct per test. `extra_config` is appended to the
    /// agent's config file.
    pub fn new(tag: &str, extra_config: &str) -> Topo {
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
        let t = Topo { listeners, gk, sub, net };
        // Before any agent: every path works (the lab itself is sound).
        for (src, dst) in [(POOLED4, MTA4), (POOLED6, MTA6), (OTHER4, SMH4), (OTHER6, SMH6)] {
            t.expect(src, dst, SMTP, ConnectOutcome::Connected, "lab check before the agent runs");
        }
        t
    }

    /// The listener of the net namespace on `host:port` (the MTA's or the
    /// smarthost's, on 25 or 587).
    pub fn listener(&self, host: &str, port: u16) -> &TcpListenerGuard {
        let want = sa(host, port);
        self.listeners.iter().find(|l| l.addr() == want).unwrap_or_else(|| panic!("no listener on {want}"))
    }

    /// The router's namespace.
    pub fn rtr(&self) -> &Netns {
        &self.gk.ns
    }

    pub fn stats(&self, iface: &str) -> Stats {
        self.gk.egress_stats(iface)
    }

    pub fn connect(&self, src: &str, dst: &str, port: u16, timeout: Duration) -> ConnectOutcome {
        tcp_connect(&self.sub, ip(src), sa(dst, port), timeout)
    }

    /// Connects from `src` to `dst:port` and expects `want` (a timeout for
    /// a dropped SYN, "refused" for a reject).
    pub fn expect(&self, src: &str, dst: &str, port: u16, want: ConnectOutcome, what: &str) {
        let timeout = match want {
            ConnectOutcome::Connected => CONNECT_OK,
            ConnectOutcome::Refused => CONNECT_REJECT,
            _ => CONNECT_DROP,
        };
        let got = self.connect(src, dst, port, timeout);
        assert_eq!(got, want, "{what}: {src} -> {dst} port {port}\nagent log:\n{}", self.gk.log());
    }

    /// Polls (bounded by `limit`) until a connect from `src` gets `want`.
    pub fn wait_for(&self, src: &str, dst: &str, port: u16, want: ConnectOutcome, limit: Duration, what: &str) {
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
    pub fn assert_attached(&self, ifname: &str, role: &str, mode: &str, pin: &str) {
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
    pub fn tcx_egress_progs(&self) -> Vec<String> {
        self.tcx_progs(RTR_UP_IF, TcAttachType::Egress)
    }

    /// Names of the tcx programs on `ifname`'s `hook` in the router, in
    /// their order, as the kernel has them.
    pub fn tcx_progs(&self, ifname: &str, hook: TcAttachType) -> Vec<String> {
        in_netns(self.rtr(), || {
            let (_, progs) = SchedClassifier::query_tcx(ifname, hook).expect("query tcx");
            progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect()
        })
    }

    /// `swaks` (a real SMTP client) from subscriber `src` to `dst:port`,
    /// quitting after the greeting; its transcript whatever its exit status.
    pub fn swaks(&self, src: &str, dst: &str, port: u16) -> CmdOutput {
        let port = port.to_string();
        let args =
            ["--server", dst, "--port", &port, "--local-interface", src, "--quit-after", "CONNECT", "--timeout", "5"];
        netlab::nsenter_output(&self.sub, Path::new(SWAKS), &args, Duration::from_secs(30)).expect("run swaks")
    }

    pub fn tc_egress_filters(&self) -> String {
        self.rtr().run(&["tc", "filter", "show", "dev", RTR_UP_IF, "egress"]).expect("tc filter show")
    }

    /// `gatekeeper unload` with the agent running: the agent exits cleanly.
    pub fn unload(&mut self) {
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
pub fn attach_xdp_pass(ns: &Netns, ifname: &str) -> Ebpf {
    let mut bpf = load_object(64, |_| {}).expect("load the gatekeeper object");
    let prog: &mut Xdp = bpf.program_mut(programs::XDP_BASELINE).expect("baseline program").try_into().unwrap();
    prog.load().expect("load the baseline program");
    in_netns(ns, || prog.attach(ifname, XdpMode::Driver).map(drop))
        .unwrap_or_else(|e| panic!("attach XDP pass to {ifname} in {}: {e}", ns.name()));
    let link = ns.ip(&["-d", "link", "show", "dev", ifname]).unwrap();
    assert!(link.contains(" xdp "), "pass program not attached in native mode: {link}");
    bpf
}
