//! The inbound limiter as an operator runs it, with real TCP over veth
//! (root): a "mx" namespace runs `gatekeeper run` with an `[[inbound.limit]]`
//! class on port 143 (limited, not guarded) and listeners on 143 and 25; a
//! "client" namespace connects from TEST-NET sources. A source's burst of
//! connections to 143 gets through, the next is dropped (its SYN and the
//! kernel's retransmit); an allowed source is never limited; `stats --json`
//! counts it all under `inbound`, `status --json` shows the limited ports.
//!
//! The class's rate is one an hour, so no token comes back during the test:
//! nothing depends on how long anything takes. Waits are bounded.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use gatekeeper_tests::agentlab::Instance;
use gatekeeper_tests::netlab::{self, tcp_connect, ConnectOutcome, Netns, TcpListenerGuard};
use serde_json::Value;

const SRV4: &str = "192.0.2.1";
const SRV6: &str = "2001:db8:1::1";
const MX_ADDRS: [&str; 3] = ["192.0.2.1/24", "203.0.113.1/24", "2001:db8:1::1/64"];
const CLIENT_ADDRS: [&str; 5] =
    ["192.0.2.2/24", "203.0.113.9/24", "203.0.113.20/24", "2001:db8:1::9/64", "2001:db8:1::20/64"];
/// Sources: limited ones and allowed ones (each family).
const LIMITED4: &str = "203.0.113.9";
const LIMITED6: &str = "2001:db8:1::9";
const ALLOWED4: &str = "203.0.113.20";
const ALLOWED6: &str = "2001:db8:1::20";

const IMAP: u16 = 143;
const SMTP: u16 = 25;
const BURST: usize = 4;
const MX_IF: &str = "gkinmx";
const CLIENT_IF: &str = "gkincl";

const CONFIG: &str =
    "[dns]\nenabled = false\n\n[[inbound.limit]]\nname = \"imap\"\nports = [143]\nrate = \"1/h\"\nburst = 4\n";

const CONNECT_OK: Duration = Duration::from_secs(5);
/// A connect whose SYNs are dropped times out (the SYN and one retransmit).
const CONNECT_DROP: Duration = Duration::from_millis(1500);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn srv(src: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(if ip(src).is_ipv4() { SRV4 } else { SRV6 }), port)
}

/// Fields drop in order: listeners, instance (agent, pins, dirs, mx), client.
struct Lab {
    _listeners: Vec<TcpListenerGuard>,
    gk: Instance,
    client: Netns,
}

impl Lab {
    fn new() -> Lab {
        netlab::require_root();
        let (mx, client) = netlab::joined(("inmx", MX_IF, &MX_ADDRS), ("incl", CLIENT_IF, &CLIENT_ADDRS)).unwrap();
        let listeners = [SRV4, SRV6]
            .iter()
            .flat_map(|s| [IMAP, SMTP].map(|p| (s, p)))
            .map(|(s, p)| TcpListenerGuard::spawn(&mx, SocketAddr::new(ip(s), p)).unwrap())
            .collect();
        let gk = Instance::new(mx, Some(MX_IF), "gk-inbound-ns-", CONFIG);
        Lab { _listeners: listeners, gk, client }
    }

    fn connect(&self, src: &str, port: u16, timeout: Duration) -> ConnectOutcome {
        tcp_connect(&self.client, ip(src), srv(src, port), timeout)
    }

    #[track_caller]
    fn expect(&self, src: &str, port: u16, want: ConnectOutcome, what: &str) {
        let timeout = if want == ConnectOutcome::Connected { CONNECT_OK } else { CONNECT_DROP };
        assert_eq!(self.connect(src, port, timeout), want, "{what}: {src} -> port {port}");
    }
}

fn inbound(stats: &Value, counter: &str) -> u64 {
    stats["inbound"]["totals"][counter].as_u64().unwrap_or_else(|| panic!("no inbound {counter}: {stats:#}"))
}

#[test]
fn a_burst_to_a_limited_port_is_cut_after_its_burst_and_allowed_sources_never() {
    let mut lab = Lab::new();
    // Before the agent: the lab works.
    lab.expect(LIMITED4, IMAP, ConnectOutcome::Connected, "before the agent");
    lab.gk.start(&[]);
    let gk = &lab.gk;
    gk.ok(&["allow", "add", &format!("{ALLOWED4}/32"), &format!("{ALLOWED6}/128"), "--comment", "imap users"]);

    // status shows the limited ports, as the pins and as the agent has them.
    let st = gk.status();
    let pinned = &st["datapath"]["inbound"];
    assert_eq!(pinned[0]["ports"], serde_json::json!([IMAP]), "{st:#}");
    assert_eq!(st["detail"]["inbound"][0]["name"], "imap", "{st:#}");
    assert_eq!(st["detail"]["inbound"][0]["rate"], "1/h", "{st:#}");
    let text = gk.ok(&["status"]);
    assert!(text.contains("inbound:    imap: ports 143 limited to 1/h per source, burst 4"), "{text}");

    let s0 = gk.json(&["stats", "--json"]);
    for src in [LIMITED4, LIMITED6] {
        // A bounded burst: the first BURST connect, the next is dropped.
        for i in 0..BURST {
            lab.expect(src, IMAP, ConnectOutcome::Connected, &format!("connection {} of the burst", i + 1));
        }
        lab.expect(src, IMAP, ConnectOutcome::TimedOut, "over the burst");
        // The guarded port is another matter (unknown sources pass there;
        // port 25 is in no class here).
        lab.expect(src, SMTP, ConnectOutcome::Connected, "port 25, not limited");
    }
    // Allowed sources are never limited.
    for src in [ALLOWED4, ALLOWED6] {
        for i in 0..3 * BURST {
            lab.expect(src, IMAP, ConnectOutcome::Connected, &format!("allowed connection {}", i + 1));
        }
    }

    let s1 = gk.json(&["stats", "--json"]);
    let d = |c: &str| inbound(&s1, c) - inbound(&s0, c);
    // Both limited sources: BURST passed, then at least the SYN and a
    // retransmit dropped.
    let limited = d("limited");
    assert!(limited >= 2 * 2, "limited {limited}: {s1:#}");
    assert_eq!(d("checked"), 2 * BURST as u64 + limited, "{s1:#}");
    assert_eq!(d("exempt"), 2 * 3 * BURST as u64, "{s1:#}");
    assert_eq!((d("banned"), d("dry-run-would-drop")), (0, 0), "{s1:#}");
    let class = &s1["inbound"]["classes"][0];
    assert_eq!((class["class"].as_u64(), class["name"].as_str()), (Some(1), Some("imap")), "{s1:#}");
    assert_eq!(class["ports"], serde_json::json!([IMAP]), "{s1:#}");
    // The guard counted port 25's SYNs only: two unknown sources.
    assert_eq!(s1["totals"]["unknown"].as_u64().unwrap() - s0["totals"]["unknown"].as_u64().unwrap(), 2, "{s1:#}");

    // The counters read from the pins with the agent down, as today.
    lab.gk.kill_agent();
    let s2 = lab.gk.json(&["stats", "--json"]);
    assert_eq!(inbound(&s2, "limited"), inbound(&s1, "limited"), "{s2:#}");
    let text = lab.gk.ok(&["stats"]);
    assert!(text.contains("INBOUND") && text.contains("LIMITED"), "{text}");
    // The pinned datapath keeps limiting.
    lab.expect(LIMITED4, IMAP, ConnectOutcome::TimedOut, "agent down");
}
