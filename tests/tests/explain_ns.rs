//! The explain pool action on a router, with real TCP and a real SMTP
//! client (`swaks`) through the egress lab's three namespaces
//! (`gatekeeper_tests::egresslab`; root): the subscriber of an explain pool
//! who tries an outside MTA on port 25 is answered by the agent on the
//! router (`554 5.7.1 port 25 is blocked ...`), from the MTA's address,
//! and the MTA never sees the connection; smarthosts, exempt sources and
//! other ports go through as before.
//!
//! That the MTA never sees it: swaks gets the router's 554 (the MTA's
//! listener only accepts and closes, it sends nothing), the MTA's listener
//! counts no accept for it, and with the uplink gate attached too its
//! counters show that no blocked SYN got that far.
//!
//! Waits are bounded polls for a condition; no assertion depends on how
//! long something took.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
};

use aya::programs::TcAttachType;
use gatekeeper_tests::egresslab::*;
use gatekeeper_tests::netlab::{tcp_connect_stream, CmdOutput, ConnectOutcome, TcpListenerGuard};
use serde_json::json;

const SMARTHOST_NAME: &str = "smtp.example.net";
const EXPLAIN_CONFIG: &str = "[egress.explain]\nsmarthost = \"smtp.example.net\"\n";
/// The reply an explain pool's subscriber gets on port 25.
const REPLY: &str =
    "554 5.7.1 port 25 is blocked for dynamic addresses; send through smtp.example.net on port 587 with authentication";
const RULE: &str = "fwmark 0x4b470000/0xffff0000 lookup 4747";
const TABLE: &str = "4747";
/// The stage's program name as the kernel keeps it (15 characters).
const STAGE: &str = "gatekeeper_expl";

#[test]
fn stage_name_is_the_programs() {
    assert!(gatekeeper_common::programs::TC_EXPLAIN.starts_with(STAGE));
}

/// Explain pools, smarthosts and exempt entries as an ISP sets them up.
/// Returns what `pool add` said.
fn add_policy(t: &Topo) -> CmdOutput {
    let added = t.gk.ok_output(&["pool", "add", POOL4, POOL6, "--action", "explain", "--comment", "dynamic DSL"]);
    t.gk.ok(&["smarthost", "add", V4.smh_net, V6.smh_net]);
    t.gk.ok(&["exempt", "add", V4.exempt_net, V6.exempt_net]);
    added
}

/// swaks from `src` to `dst:25` saw the explanation as the greeting (and
/// quit politely).
#[track_caller]
fn assert_explained(t: &Topo, out: &CmdOutput, what: &str) {
    assert!(
        out.stdout.contains(&format!("<** {REPLY}")) && out.stdout.contains("<-  221 2.0.0 Bye"),
        "{what}: swaks did not get the explanation:\n{out}\nagent log:\n{}",
        t.gk.log()
    );
}

/// The router's policy routing, as `ip` shows it (both families).
fn routing(t: &Topo) -> String {
    let r = |args: &[&str]| t.rtr().ip(args).unwrap_or_else(|e| format!("({e})"));
    [
        r(&["-4", "rule", "show"]),
        r(&["-6", "rule", "show"]),
        r(&["-4", "route", "show", "table", TABLE]),
        r(&["-6", "route", "show", "table", TABLE]),
    ]
    .join("\n")
}

#[track_caller]
fn assert_routing_installed(t: &Topo) {
    let r = routing(t);
    assert_eq!(r.matches(RULE).count(), 2, "one fwmark rule per family:\n{r}");
    assert_eq!(r.matches("local default dev lo").count(), 2, "one local default route per family:\n{r}");
}

#[track_caller]
fn assert_routing_gone(t: &Topo) {
    let r = routing(t);
    assert!(!r.contains(RULE) && !r.contains("local default dev lo"), "explain routing left behind:\n{r}");
}

/// The explained connection as a plain TCP client sees it: connected to
/// the MTA's address, greeted with the explanation.
fn greeting(t: &Topo, src: &str, dst: &str) -> (SocketAddr, String) {
    let s = tcp_connect_stream(&t.sub, ip(src), sa(dst, SMTP), CONNECT_OK)
        .unwrap_or_else(|o| panic!("{src} -> {dst}:25: {o:?}\n{}", t.gk.log()));
    s.set_read_timeout(Some(CONNECT_OK)).unwrap();
    let peer = s.peer_addr().unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    (peer, line)
}

/// Everything an explain pool's subscriber and the others see, IPv4 and
/// IPv6, with the counters of `iface` (the subscriber side). With
/// `uplink`, the uplink's gate is attached too and must never see a
/// blocked SYN.
fn explains(t: &Topo, uplink: bool, what: &str) {
    let added = add_policy(t);
    assert!(!added.stderr.contains("note"), "{what}: the stage is on: {added}");
    let rows = t.gk.json(&["pool", "list", "--json"]);
    assert!(rows.as_array().unwrap().iter().all(|r| r["action"] == "explain"), "{what}: {rows:#}");
    let listed = t.gk.ok(&["pool", "list"]);
    assert!(listed.contains("explain"), "{what}: pool list: {listed}");
    assert_routing_installed(t);
    let st = t.gk.status();
    let x = &st["datapath"]["explain"];
    assert_eq!((&x["staged"], &x["interfaces"]), (&json!(true), &json!([RTR_SUB_IF])), "{what}: status {x:#}");
    assert_eq!(x["routing"].as_array().map(Vec::len), Some(4), "{what}: status {x:#}");
    let text = t.gk.ok(&["status"]);
    assert!(text.contains(&format!("explain:    on, stage on {RTR_SUB_IF}")), "{what}: status: {text}");
    assert_eq!(
        t.tcx_progs(RTR_SUB_IF, TcAttachType::Ingress),
        [STAGE],
        "{what}: the stage on the subscriber side's ingress"
    );
    for f in [&V4, &V6] {
        let what = format!("{what}, {}", f.pooled);
        let mta = t.listener(f.mta, SMTP);
        let accepts = mta.accepts();
        let (s0, u0) = (t.stats(RTR_SUB_IF), t.stats(RTR_UP_IF));

        let out = t.swaks(f.pooled, f.mta, SMTP);
        assert_explained(t, &out, &what);
        assert!(out.stdout.contains(&format!("Connected to {}", f.mta)), "{what}: {out}");
        let (peer, line) = greeting(t, f.pooled, f.mta);
        assert_eq!(peer, sa(f.mta, SMTP), "{what}: the answer comes from the MTA's address");
        assert_eq!(line, format!("{REPLY}\r\n"), "{what}: plain TCP client");
        let s1 = t.stats(RTR_SUB_IF);
        s1.assert_grew(&s0, "pool-explained", 2, &what);
        for c in ["explain-fallback", "pool-rejected", "pool-blocked"] {
            s1.assert_same(&s0, c, &what);
        }
        if uplink {
            let u1 = t.stats(RTR_UP_IF);
            for c in ["pool-rejected", "pool-blocked", "pool-explained"] {
                assert_eq!(u1.on_iface(c), u0.on_iface(c), "{what}: {c} on the uplink: a blocked SYN got there");
            }
        }

        // Smarthost, exempt, non-pooled, other ports: through to the net.
        let smh = t.listener(f.smh, SMTP);
        let smh_accepts = smh.accepts();
        t.expect(f.pooled, f.smh, SMTP, ConnectOutcome::Connected, &format!("{what}: to the smarthost:25"));
        assert!(smh.wait_for_accepts(smh_accepts + 1, CONNECT_OK), "{what}: the smarthost accepted");
        t.expect(f.pooled, f.mta, SUBMISSION, ConnectOutcome::Connected, &format!("{what}: to MTA:587"));
        t.expect(f.exempt, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: exempt to MTA:25"));
        t.expect(f.other, f.mta, SMTP, ConnectOutcome::Connected, &format!("{what}: non-pooled to MTA:25"));
        // The MTA accepted the exempt and non-pooled connections, and
        // nothing of the explained ones (made before them).
        assert!(mta.wait_for_accepts(accepts + 2, CONNECT_OK), "{what}: MTA accepts");
        assert_eq!(mta.accepts(), accepts + 2, "{what}: the MTA saw an explained connection");
        let s2 = t.stats(RTR_SUB_IF);
        s2.assert_same(&s1, "pool-explained", &what);
        s2.assert_rose(&s1, "exempt", &what);
        s2.assert_rose(&s1, "smarthost-allowed", &what);
    }
    let log = t.gk.log();
    assert!(log.contains("explained a blocked connection") && log.contains(SMARTHOST_NAME), "{what}: log:\n{log}");
}

/// The subscriber side alone (native XDP): no uplink gate behind it, so a
/// SYN the stage let through would reach the MTA.
#[test]
fn explain_pool_subscribers_get_the_reason_and_the_mta_nothing() {
    let mut t = Topo::new("exnat", EXPLAIN_CONFIG);
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "native"]);
    explains(&t, false, "subscriber XDP native");
}

/// Both gates (XDP in skb mode on the subscriber side, tcx on the uplink):
/// the uplink never sees a blocked SYN. Then the same pools with the
/// uplink gate alone: it cannot explain forwarded traffic, so it rejects
/// (RST), the agent says so, and the stage and its routing are gone.
#[test]
fn explain_with_the_uplink_gate_and_without_the_subscriber_side() {
    let mut t = Topo::new("exupl", EXPLAIN_CONFIG);
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb", "--uplink", RTR_UP_IF]);
    explains(&t, true, "subscriber XDP skb + uplink tcx");

    t.gk.kill_agent();
    t.gk.start(&["--uplink", RTR_UP_IF]);
    let log = t.gk.log();
    assert!(log.contains("explain pools are answered with a RST, as reject"), "no warning:\n{log}");
    assert_routing_gone(&t);
    assert!(t.tcx_progs(RTR_SUB_IF, TcAttachType::Ingress).is_empty(), "stage left on {RTR_SUB_IF}");
    let added = t.gk.ok_output(&["pool", "add", "198.51.100.192/26", "--action", "explain"]);
    assert!(added.stderr.contains("answered with a RST"), "no note at pool add: {added}");
    for f in [&V4, &V6] {
        let accepts = t.listener(f.mta, SMTP).accepts();
        let u0 = t.stats(RTR_UP_IF);
        t.expect(f.pooled, f.mta, SMTP, ConnectOutcome::Refused, "uplink only: explain pools are rejected");
        t.stats(RTR_UP_IF).assert_rose(&u0, "pool-rejected", "uplink only");
        t.expect(f.pooled, f.smh, SMTP, ConnectOutcome::Connected, "uplink only: smarthost");
        assert_eq!(t.listener(f.mta, SMTP).accepts(), accepts, "uplink only: the MTA saw a pooled connection");
    }
}

/// The agent SIGKILLed: its listeners are gone, the pinned stage answers
/// blocked SYNs with a RST itself (counted `explain-fallback`), nothing
/// reaches the MTA. A new agent adopts the stage and the routing (no
/// duplicate rule) and explains again.
#[test]
fn dead_agent_falls_back_to_rst_and_a_new_one_explains_again() {
    let mut t = Topo::new("exkil", EXPLAIN_CONFIG);
    let args = ["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb"];
    t.gk.start(&args);
    add_policy(&t);
    assert_explained(&t, &t.swaks(POOLED4, MTA4, SMTP), "before the kill");

    let explain = t.gk.status()["datapath"]["explain"].clone();
    assert_eq!(explain["staged"], true, "{explain:#}");
    let port = explain["port_v4"].as_u64().and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0).expect("port");

    t.gk.kill_agent();
    assert_routing_installed(&t);
    // Whoever binds the departed agent's port without its privileges gets
    // nothing (the stage checks the listener's priority).
    let squatter = TcpListenerGuard::spawn(t.rtr(), SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    for f in [&V4, &V6] {
        let mta = t.listener(f.mta, SMTP);
        let accepts = mta.accepts();
        let s0 = t.stats(RTR_SUB_IF);
        t.expect(f.pooled, f.mta, SMTP, ConnectOutcome::Refused, "agent dead: the stage's RST");
        let out = t.swaks(f.pooled, f.mta, SMTP);
        assert!(!out.success() && !out.stdout.contains("554"), "agent dead: swaks: {out}");
        let s1 = t.stats(RTR_SUB_IF);
        s1.assert_grew(&s0, "explain-fallback", 2, "agent dead");
        s1.assert_same(&s0, "pool-explained", "agent dead");
        // Others still pass, and the MTA saw none of the pooled attempts.
        t.expect(f.exempt, f.mta, SMTP, ConnectOutcome::Connected, "agent dead: exempt");
        assert!(mta.wait_for_accepts(accepts + 1, CONNECT_OK), "agent dead: MTA accepts");
        assert_eq!(mta.accepts(), accepts + 1, "agent dead: a pooled SYN reached the MTA");
    }
    assert_eq!(squatter.accepts(), 0, "the squatter on the agent's port got a connection");
    drop(squatter);

    t.gk.start(&args);
    assert_routing_installed(&t);
    assert_eq!(t.tcx_progs(RTR_SUB_IF, TcAttachType::Ingress), [STAGE], "one stage, adopted");
    assert!(t.gk.log().contains("adopted=true"), "the stage's link was adopted:\n{}", t.gk.log());
    for f in [&V4, &V6] {
        assert_explained(&t, &t.swaks(f.pooled, f.mta, SMTP), "after the restart");
    }
}

/// `unload` removes the stage, its routing and its pins, and nothing the
/// operator set up (a rule and a table of their own); afterwards nothing
/// is blocked.
#[test]
fn unload_removes_the_stage_and_only_its_own_routing() {
    let mut t = Topo::new("exunl", EXPLAIN_CONFIG);
    // The operator's own policy routing, before gatekeeper runs.
    t.rtr().ip(&["rule", "add", "from", "198.51.100.200", "lookup", "200", "priority", "200"]).unwrap();
    t.rtr().ip(&["route", "add", "192.0.2.0/24", "via", "203.0.113.2", "table", "200"]).unwrap();
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb"]);
    add_policy(&t);
    assert_routing_installed(&t);
    assert!(t.gk.pin_dir().join("explain").is_dir(), "explain/ pinned");
    assert_explained(&t, &t.swaks(POOLED4, MTA4, SMTP), "before unload");

    t.unload();
    assert_routing_gone(&t);
    let rules = t.rtr().ip(&["rule", "show"]).unwrap();
    assert!(rules.contains("from 198.51.100.200 lookup 200"), "the operator's rule went: {rules}");
    let table = t.rtr().ip(&["route", "show", "table", "200"]).unwrap();
    assert!(table.contains("192.0.2.0/24 via 203.0.113.2"), "the operator's table went: {table}");
    assert!(t.tcx_progs(RTR_SUB_IF, TcAttachType::Ingress).is_empty(), "stage left after unload");
    assert!(!t.gk.pin_dir().exists(), "pin dir left after unload");
    t.expect(POOLED4, MTA4, SMTP, ConnectOutcome::Connected, "after unload");
}

/// A configured table that holds routes of someone else's is refused: the
/// agent runs, explain pools get the RST, the table and the rules stay as
/// they were.
#[test]
fn a_table_in_use_is_left_alone_and_explain_pools_get_a_rst() {
    let mut t = Topo::new("extbl", EXPLAIN_CONFIG);
    t.rtr().ip(&["route", "add", "192.0.2.0/24", "via", "203.0.113.2", "table", TABLE]).unwrap();
    t.gk.start(&["--subscriber-iface", RTR_SUB_IF, "--xdp-mode", "skb"]);
    add_policy(&t);
    let log = t.gk.log();
    assert!(log.contains("holds routes gatekeeper did not add"), "no error logged:\n{log}");
    let rules = t.rtr().ip(&["rule", "show"]).unwrap();
    assert!(!rules.contains(RULE), "rule added anyway: {rules}");
    let table = t.rtr().ip(&["route", "show", "table", TABLE]).unwrap();
    assert_eq!(table.trim(), "192.0.2.0/24 via 203.0.113.2 dev gkrup", "the table changed");
    let accepts = t.listener(MTA4, SMTP).accepts();
    t.expect(POOLED4, MTA4, SMTP, ConnectOutcome::Refused, "no stage: the XDP gate's RST");
    assert_eq!(t.listener(MTA4, SMTP).accepts(), accepts, "the MTA saw the pooled connection");
}
