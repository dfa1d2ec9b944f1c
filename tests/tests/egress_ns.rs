//! The egress gate on a router, with real TCP through three namespaces
//! (root; the topology is `gatekeeper_tests::egresslab`): a "sub" namespace
//! holds the subscribers (several TEST-NET source addresses on one veth), a
//! "rtr" namespace forwards IPv4 and IPv6 and runs the real `gatekeeper
//! run` with `--uplink` (TC egress towards the internet) and/or
//! `--subscriber-iface` (XDP on the subscriber side), and a "net" namespace
//! plays the internet: an outside MTA and the ISP's smarthost, both
//! listening on 25 and 587.
//!
//! A dropped SYN shows as a connect that times out after [`CONNECT_DROP`];
//! a rejected one as "connection refused" (a RST came back). Native-mode
//! reject sends the RST back with XDP_TX, which a veth only delivers when
//! its peer (the subscriber's end) has an XDP program too: that test puts a
//! pass-only program there ([`attach_xdp_pass`]). Every test has
//! its own namespaces (distinct prefixes), pin dir, socket and state dir;
//! assertions never depend on how long something took, waits are bounded
//! polls for a condition.

use gatekeeper_tests::egresslab::*;
use gatekeeper_tests::netlab::ConnectOutcome;
use std::time::Duration;

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
