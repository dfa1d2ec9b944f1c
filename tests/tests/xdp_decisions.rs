//! In-kernel unit tests of the XDP gate through BPF_PROG_TEST_RUN.
//!
//! Every test loads its own, unpinned instance of the object (so tests are
//! independent and run in parallel), fills the maps through aya's typed maps
//! and runs hand-built frames through `gatekeeper_ingress`. Assertions cover
//! the return value, the exact set of counters that moved (and by how much),
//! range hits and ring-buffer events.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN): `cargo xtask test` runs it as root.
//! Without root every test fails with a message saying so.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf, SockMap},
    Ebpf,
};
use gatekeeper::{datapath::calibrate_clock, domain::RangeKind, verdict_table::VerdictTable};
use gatekeeper_common::{
    action, addr, config_flags,
    counters::counter_name,
    family,
    inbound::{self, inbound_counter_name, IN_COUNTERS},
    maps, programs,
    reject::{self, refusal, QuietSlot, RejectConfig},
    verdict_reason, Config, Counter, Event, KeyWords, RateLimit, SourceKey, StatKey, Verdict, VerdictBucket,
    MAX_IPV6_EXT_HEADERS,
};
use gatekeeper_tests::model::{self, mutate, Gate, Model, Mutation, Parse, Range};
use gatekeeper_tests::packet::{
    ethertype, hex, ipproto, ppp, syn_to, tcp_flags, v4, v6, ExtHeader, Packet, VLAN_STACKS,
};
use gatekeeper_tests::ranges::AgentRanges;
use gatekeeper_tests::rng::Rng;
use gatekeeper_tests::testrun::{
    self, loopback, monotonic_ns, range_hits, stat_totals, test_run, Lookup, Outcome, SkRun, XDP_ABORTED, XDP_DROP,
    XDP_PASS,
};

/// The interface the test runs claim (`xdp_md.ingress_ifindex`): loopback.
const IFINDEX: u32 = 1;
const SMTP: u16 = 25;
/// Verdict-table buckets of [`Gk::new`] (room for 4,096 verdicts).
const VERDICT_BUCKETS: u32 = 2048;

// ---------------------------------------------------------------- fixture

/// One loaded, unpinned gatekeeper instance.
struct Gk {
    bpf: Ebpf,
    events: RingBuf<MapData>,
    /// Counter totals at the last [`Gk::delta`].
    seen: BTreeMap<StatKey, u64>,
    /// Reject counter totals at the last [`Gk::rej_delta`].
    rej_seen: Vec<u64>,
    /// The ranges as the agent's database would hold them.
    ranges: AgentRanges,
    /// The datapath clock's calibration, written with every config.
    clock: Option<(u64, u64)>,
}

/// A counter slot, as expected in [`Gk::delta`].
fn c(counter: Counter) -> u32 {
    counter as u32
}

impl Gk {
    /// Loads the object with small preallocated maps and guards port 25.
    fn new() -> Self {
        Gk::with_buckets(VERDICT_BUCKETS)
    }

    /// As [`Gk::new`], with every source in a deny range: 0.0.0.0/0 (range
    /// 1) and ::/0 (range 2).
    fn denying_all() -> Self {
        let mut gk = Gk::new();
        gk.deny("0.0.0.0/0", 1);
        gk.deny("::/0", 2);
        gk
    }

    /// As [`Gk::new`], with a verdict table of `buckets` buckets.
    fn with_buckets(buckets: u32) -> Self {
        testrun::require_root("xdp_decisions");
        let mut bpf = testrun::load(buckets, |_| {}, &[programs::XDP_INGRESS, programs::SK_REJECTOR])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let events = RingBuf::try_from(bpf.take_map(maps::EVENTS).expect("events map")).unwrap();
        let ranges = AgentRanges::take(&mut bpf);
        let clock = calibrate_clock(&mut bpf).expect("clock probe");
        assert!(clock.is_some(), "the clock calibrates on this kernel");
        let mut gk = Gk { bpf, events, seen: BTreeMap::new(), rej_seen: Vec::new(), ranges, clock };
        gk.set_port(SMTP, true);
        gk.config(0, 0);
        gk
    }

    /// Runs `frame` once as if received on [`IFINDEX`].
    fn run(&self, frame: &[u8]) -> u32 {
        self.run_with(frame, Some(IFINDEX))
    }

    /// Runs `frame` once, claiming `ifindex` as the ingress interface (None:
    /// no context).
    fn run_with(&self, frame: &[u8], ifindex: Option<u32>) -> u32 {
        let ret = test_run(&self.bpf, programs::XDP_INGRESS, frame, ifindex, 1, None)
            .unwrap_or_else(|e| panic!("test run of {} bytes: {e}", frame.len()));
        assert_ne!(ret.return_value, XDP_ABORTED, "XDP_ABORTED for {}", hex(frame));
        ret.return_value
    }

    fn set_port(&mut self, port: u16, on: bool) {
        let mut ports: Array<_, u64> = Array::try_from(self.bpf.map_mut(maps::PORTS).unwrap()).unwrap();
        let (word, bit) = addr::port_slot(port);
        let old = ports.get(&word, 0).unwrap();
        ports.set(word, if on { old | bit } else { old & !bit }, 0).unwrap();
    }

    fn set_all_ports(&mut self) {
        let mut ports: Array<_, u64> = Array::try_from(self.bpf.map_mut(maps::PORTS).unwrap()).unwrap();
        for w in 0..gatekeeper_common::PORT_WORDS {
            ports.set(w, u64::MAX, 0).unwrap();
        }
    }

    /// Writes the config with the calibrated clock (or none, see
    /// [`Gk::uncalibrated`]).
    fn config(&mut self, event_interval_ns: u64, flags: u32) {
        let (tick_ns, clock_offset_ns) = self.clock.unwrap_or_default();
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap()).unwrap();
        cfg.set(0, Config { event_interval_ns, flags, hold_ms: 0, tick_ns, clock_offset_ns, hash: testrun::HASH }, 0)
            .unwrap();
    }

    /// From now on the datapath reads the clock helper, as with a kernel
    /// tick the agent could not calibrate.
    fn uncalibrated(&mut self) {
        self.clock = None;
        self.config(0, 0);
    }

    /// How far the datapath clock may be from CLOCK_MONOTONIC_COARSE.
    fn clock_slack_ns(&self) -> u64 {
        self.clock.map_or(0, |(tick, _)| 2 * tick)
    }

    /// Sets `hold_ms` in the config, keeping the rest.
    fn hold_ms(&mut self, ms: u32) {
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap()).unwrap();
        let c = cfg.get(&0, 0).unwrap();
        cfg.set(0, Config { hold_ms: ms, ..c }, 0).unwrap();
    }

    /// Adds a range the way the agent does: the trie gets what
    /// `desired_ranges` calls for (deny ranges inside allow ranges left out).
    fn range(&mut self, allow: bool, net: &str, range_id: u32) {
        let kind = if allow { RangeKind::Allow } else { RangeKind::Deny };
        self.ranges.add(kind, net, range_id, None);
    }

    fn allow(&mut self, net: &str, range_id: u32) {
        self.range(true, net, range_id);
    }

    fn deny(&mut self, net: &str, range_id: u32) {
        self.range(false, net, range_id);
    }

    fn unrange(&mut self, allow: bool, net: &str) {
        self.ranges.remove(if allow { RangeKind::Allow } else { RangeKind::Deny }, net);
    }

    fn verdicts(&mut self) -> VerdictTable<&mut MapData> {
        VerdictTable::new(Array::try_from(self.bpf.map_mut(maps::VERDICTS).unwrap()).unwrap(), testrun::HASH).unwrap()
    }

    /// Sets a verdict as the agent does; returns the source it evicted.
    fn verdict(&mut self, ip: &str, action: u32, reason: u32, expires_ns: u64) -> Option<SourceKey> {
        let key = SourceKey::from_ip(ip.parse().unwrap());
        self.verdicts().insert(key, Verdict { expires_ns, action, reason }).unwrap()
    }

    /// A verdict under `key` itself (e.g. an IPv6 address's own key).
    fn verdict_key(&mut self, key: SourceKey, action: u32, reason: u32, expires_ns: u64) {
        assert_eq!(self.verdicts().insert(key, Verdict { expires_ns, action, reason }).unwrap(), None);
    }

    fn unverdict(&mut self, ip: &str) {
        let key = SourceKey::from_ip(ip.parse().unwrap());
        assert!(self.verdicts().remove(key).unwrap(), "{ip} had no verdict");
    }

    /// Counters that moved since the last call, as (ifindex, name) -> delta.
    fn delta(&mut self) -> BTreeMap<(u32, &'static str), u64> {
        let now = stat_totals(&self.bpf, maps::STATS).unwrap();
        let mut out = BTreeMap::new();
        for (k, v) in &now {
            let d = v - self.seen.get(k).copied().unwrap_or(0);
            if d != 0 {
                out.insert((k.ifindex, counter_name(k.counter)), d);
            }
        }
        self.seen = now;
        out
    }

    /// Asserts that exactly `expected` counters (slot, delta) moved on
    /// [`IFINDEX`] since the last check, and nothing else anywhere.
    #[track_caller]
    fn expect(&mut self, expected: &[(u32, u64)], what: &str) {
        let want: BTreeMap<_, _> = expected.iter().map(|&(slot, n)| ((IFINDEX, counter_name(slot)), n)).collect();
        assert_eq!(self.delta(), want, "counters after {what}");
    }

    /// Runs `frame`, asserts the verdict and the counters that moved.
    #[track_caller]
    fn check(&mut self, frame: &[u8], ret: u32, counters: &[(u32, u64)], what: &str) {
        assert_eq!(self.run(frame), ret, "return value for {what}");
        self.expect(counters, what);
    }

    fn range_hits(&self, range_id: u32) -> u64 {
        range_hits(&self.bpf, range_id)
    }

    /// Drains the ring buffer.
    fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(item.len(), size_of::<Event>());
            // SAFETY: Event is plain old data of exactly this size.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
        out
    }
}

const DST4: &str = "192.0.2.25";
const DST6: &str = "2001:db8:25::25";

/// A SYN from `src` to the guarded mail server, port 25, with an MSS option.
fn syn(src: &str) -> Packet {
    syn_to(src, if src.contains(':') { DST6 } else { DST4 }, SMTP)
}

fn drop_reason(reason: u32) -> u32 {
    Counter::verdict_drop(reason)
}

// ---------------------------------------------------------------- tests

#[test]
fn counters_use_the_ingress_ifindex_the_kernel_reports() {
    let mut gk = Gk::new();
    let frame = syn("203.0.113.1").build();
    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "SYN with ingress_ifindex 1");
    // Without a context the kernel uses its loopback device's rx queue.
    assert_eq!(gk.run_with(&frame, None), XDP_PASS);
    let lo = loopback();
    assert_eq!(gk.delta(), BTreeMap::from([((lo, "unknown"), 1)]), "no ctx_in counts under lo");
    let ev = gk.events();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].ifindex, IFINDEX);
    assert_eq!(ev[1].ifindex, lo);
}

#[test]
fn allow_beats_deny_beats_verdict() {
    let mut gk = Gk::new();
    for (src, allow, deny, other) in [
        ("198.51.100.7", "198.51.100.7/32", "198.51.100.0/24", "198.51.100.8"),
        ("2001:db8:1:2::7", "2001:db8:1:2::7/128", "2001:db8::/32", "2001:db8:1:2::8"),
    ] {
        let forever = u64::MAX;
        gk.verdict(src, action::DROP, verdict_reason::MANUAL_BAN, forever);
        gk.deny(deny, 10);
        gk.allow(allow, 11);
        let frame = syn(src).build();
        let (deny_hits, allow_hits) = (gk.range_hits(10), gk.range_hits(11));

        gk.check(&frame, XDP_PASS, &[(c(Counter::Allowed), 1)], "allowed + denied + banned source");
        assert_eq!((gk.range_hits(10), gk.range_hits(11)), (deny_hits, allow_hits + 1));
        // Another address in the deny range: the /32 or /128 allow is exact.
        gk.check(&syn(other).build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], "neighbour in deny range");

        gk.unrange(true, allow);
        gk.check(&frame, XDP_DROP, &[(c(Counter::DenyRange), 1)], "denied + banned source");
        assert_eq!((gk.range_hits(10), gk.range_hits(11)), (deny_hits + 2, allow_hits + 1));

        gk.unrange(false, deny);
        gk.check(&frame, XDP_DROP, &[(drop_reason(verdict_reason::MANUAL_BAN), 1)], "banned source");
        // Allow also beats a drop verdict directly.
        gk.allow(allow, 11);
        gk.check(&frame, XDP_PASS, &[(c(Counter::Allowed), 1)], "allowed + banned source");
        gk.unrange(true, allow);
        gk.unverdict(src);
        assert!(gk.events().is_empty());
    }
}

#[test]
fn deny_range_counts_its_range_hits() {
    let mut gk = Gk::new();
    gk.deny("198.51.100.0/24", 7);
    gk.deny("198.51.100.128/25", 8);
    gk.deny("2001:db8:bad::/48", 9);
    for (src, id) in [("198.51.100.1", 7), ("198.51.100.200", 8), ("2001:db8:bad:1::1", 9), ("2001:db8:bad::", 9)] {
        let before = gk.range_hits(id);
        gk.check(&syn(src).build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], src);
        assert_eq!(gk.range_hits(id), before + 1, "range {id} hit by {src}");
    }
    assert_eq!(gk.range_hits(7), 1);
    // Just outside the ranges: unknown.
    for src in ["198.51.101.1", "198.51.99.255", "2001:db8:bae::1"] {
        gk.check(&syn(src).build(), XDP_PASS, &[(c(Counter::Unknown), 1)], src);
    }
    assert_eq!((gk.range_hits(7), gk.range_hits(8), gk.range_hits(9)), (1, 1, 2));
}

#[test]
fn verdict_drop_counts_per_reason_and_verdict_pass() {
    let mut gk = Gk::new();
    let forever = u64::MAX;
    for reason in 0..verdict_reason::COUNT {
        let src = format!("203.0.113.{}", 10 + reason);
        gk.verdict(&src, action::DROP, reason, forever);
        gk.check(&syn(&src).build(), XDP_DROP, &[(drop_reason(reason), 1)], &format!("drop reason {reason}"));
        let src6 = format!("2001:db8:{}::1", 10 + reason);
        gk.verdict(&src6, action::DROP, reason, forever);
        gk.check(&syn(&src6).build(), XDP_DROP, &[(drop_reason(reason), 1)], &format!("v6 drop reason {reason}"));
    }
    // An out-of-range reason lands in the last slot.
    gk.verdict("203.0.113.99", action::DROP, 1000, forever);
    gk.check(&syn("203.0.113.99").build(), XDP_DROP, &[(drop_reason(verdict_reason::HOLD), 1)], "reason 1000");

    gk.verdict("203.0.113.50", action::PASS, verdict_reason::OK, forever);
    gk.check(&syn("203.0.113.50").build(), XDP_PASS, &[(c(Counter::VerdictPass), 1)], "pass verdict");
    gk.verdict("2001:db8:50::1", action::PASS, verdict_reason::OK, monotonic_ns() + 3_600_000_000_000);
    gk.check(&syn("2001:db8:50::1").build(), XDP_PASS, &[(c(Counter::VerdictPass), 1)], "v6 pass verdict");
    assert!(gk.events().is_empty(), "decided sources are not reported");
}

/// Two buckets of four: every source shares them, so the table fills and
/// evicts, and the datapath must agree with the agent's placement.
#[test]
fn verdict_table_fills_both_buckets_then_evicts_the_soonest_expiry() {
    let mut gk = Gk::with_buckets(2);
    let far = monotonic_ns() + 3_600_000_000_000;
    let srcs: Vec<String> = (1..=8).map(|i| format!("203.0.113.{i}")).collect();
    for (i, src) in srcs.iter().enumerate() {
        let evicted = gk.verdict(src, action::DROP, verdict_reason::NO_PTR, far + i as u64 * 1_000_000_000);
        assert_eq!(evicted, None, "{src}: the table has room for eight");
    }
    for src in &srcs {
        gk.check(&syn(src).build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], src);
    }
    // A ninth replaces the verdict that expires first (203.0.113.1).
    let evicted = gk.verdict("2001:db8:9::1", action::DROP, verdict_reason::DYNAMIC, u64::MAX);
    assert_eq!(evicted, Some(SourceKey::from_ip("203.0.113.1".parse().unwrap())));
    gk.check(&syn("2001:db8:9::1").build(), XDP_DROP, &[(drop_reason(verdict_reason::DYNAMIC), 1)], "ninth");
    gk.check(&syn("203.0.113.1").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "evicted");
    for src in &srcs[1..] {
        gk.check(&syn(src).build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], src);
    }
    // Updating a present source keeps its slot; removing frees it.
    assert_eq!(gk.verdict("203.0.113.5", action::PASS, verdict_reason::OK, u64::MAX), None);
    gk.check(&syn("203.0.113.5").build(), XDP_PASS, &[(c(Counter::VerdictPass), 1)], "updated");
    gk.unverdict("203.0.113.6");
    gk.check(&syn("203.0.113.6").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "removed");
    assert_eq!(gk.verdict("203.0.113.1", action::DROP, verdict_reason::NO_PTR, u64::MAX), None, "freed slot reused");
    gk.check(&syn("203.0.113.1").build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], "back");
    // ::/64 is the empty-slot key: it can hold no verdict and is unknown.
    let empty = SourceKey::from_ip("::1".parse().unwrap());
    assert!(gk.verdicts().insert(empty, Verdict { expires_ns: u64::MAX, action: action::DROP, reason: 0 }).is_err());
    gk.check(&syn("::1").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "::1");
    let all = gk.verdicts().all().unwrap();
    assert_eq!(all.len(), 8, "{all:?}");
}

/// Expiry with the calibrated (jiffies) clock and with the helper.
/// Random changes to a small table (8 buckets, 32 slots, 48 sources): after
/// each, the datapath drops exactly the sources the agent's table holds,
/// and no key sits in its second bucket while its first has room (the rule
/// that lets the datapath stop at a first bucket with a free slot).
#[test]
fn verdict_table_stays_searchable_through_random_changes() {
    let mut gk = Gk::with_buckets(8);
    let srcs: Vec<String> = (0..48)
        .map(|i| if i % 2 == 0 { format!("203.0.113.{}", i + 1) } else { format!("2001:db8:{i:x}::1") })
        .collect();
    let mut rng = Rng(0x0bad_5eed_0fc0_ffee);
    let mut live: BTreeMap<SourceKey, u64> = BTreeMap::new();
    let far = monotonic_ns() + 3_600_000_000_000;
    for step in 0..300 {
        let src = &srcs[rng.below(srcs.len() as u64) as usize];
        let key = SourceKey::from_ip(src.parse().unwrap());
        if rng.below(3) == 0 {
            let had = gk.verdicts().remove(key).unwrap();
            assert_eq!(had, live.remove(&key).is_some(), "step {step}: remove {src}");
        } else {
            let expires = far + rng.below(1_000_000) * 1_000_000;
            let evicted = gk.verdict(src, action::DROP, verdict_reason::NO_PTR, expires);
            if let Some(e) = evicted {
                let soonest = live.iter().filter(|(k, _)| **k != key).map(|(_, &t)| t).min().unwrap();
                assert!(live.remove(&e).unwrap() >= soonest, "step {step}: evicted {e:?}");
            }
            live.insert(key, expires);
        }
        for s in &srcs {
            let want = if live.contains_key(&SourceKey::from_ip(s.parse().unwrap())) { XDP_DROP } else { XDP_PASS };
            assert_eq!(gk.run(&syn(s).build()), want, "step {step}: {s}");
        }
        let buckets: Vec<VerdictBucket> = {
            let a: Array<_, VerdictBucket> = Array::try_from(gk.bpf.map(maps::VERDICTS).unwrap()).unwrap();
            a.iter().map(|b| b.unwrap()).collect()
        };
        for (i, b) in buckets.iter().enumerate() {
            for s in b.slots.iter().filter(|s| !s.key.is_empty()) {
                let at = testrun::slots_of(&s.key, 8);
                let (first, second) = (at.first, at.second);
                if i as u32 == second {
                    assert_eq!(
                        buckets[first as usize].occupied(),
                        4,
                        "step {step}: key in its second bucket, first has room"
                    );
                } else {
                    assert_eq!(i as u32, first);
                }
            }
        }
    }
    let held: Vec<SourceKey> = gk.verdicts().all().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(held.len(), live.len());
}

/// IPv6 (issue 10, item 1): a drop verdict under an address's own key
/// reaches that address only; the /64's verdict (pass, ban, a /64 several
/// of whose addresses failed) covers the rest, and a live address verdict
/// decides over it. Both keys share a bucket pair, also when the first
/// bucket is full.
#[test]
fn a_v6_address_verdict_reaches_that_address_only() {
    let mut gk = Gk::new();
    let far = monotonic_ns() + 3_600_000_000_000;
    let past = monotonic_ns().saturating_sub(1_000_000_000);
    let (bad, mx) = ("2001:db8:5:6::bad", "2001:db8:5:6::25");
    let host = |ip: &str| SourceKey::host(ip.parse().unwrap());
    let net = |ip: &str| SourceKey::from_ip(ip.parse().unwrap());
    let (unknown, pass) = (c(Counter::Unknown), c(Counter::VerdictPass));
    let no_ptr = drop_reason(verdict_reason::NO_PTR);

    // Fill the first bucket of the /64's pair, so both keys go to the
    // second (the lookup must read it for either).
    let first = gk.verdicts().pair(&KeyWords::of(&net(mx)))[0];
    let fillers: Vec<String> = (0..u32::MAX)
        .map(|i| std::net::Ipv4Addr::from(0xcb00_7100u32.wrapping_add(i)).to_string())
        .filter(|s| gk.verdicts().pair(&KeyWords::of(&net(s)))[0] == first)
        .take(4)
        .collect();
    for f in &fillers {
        gk.verdict(f, action::DROP, verdict_reason::GENERIC, far);
    }

    gk.verdict_key(host(bad), action::DROP, verdict_reason::NO_PTR, far);
    gk.check(&syn(bad).build(), XDP_DROP, &[(no_ptr, 1)], "the address's own drop");
    gk.check(&syn(mx).build(), XDP_PASS, &[(unknown, 1)], "the rest of the /64 is unknown");
    assert_eq!(gk.events().len(), 1, "and reported");

    // The /64's pass covers the others; the failed address stays dropped.
    gk.verdict_key(net(mx), action::PASS, verdict_reason::OK, far);
    gk.check(&syn(mx).build(), XDP_PASS, &[(pass, 1)], "the /64's pass");
    gk.check(&syn("2001:db8:5:6::26").build(), XDP_PASS, &[(pass, 1)], "another address of the /64");
    gk.check(&syn(bad).build(), XDP_DROP, &[(no_ptr, 1)], "a live own verdict decides over the /64's");

    // An expired own verdict yields to the /64's.
    gk.verdicts()
        .insert(host(bad), Verdict { expires_ns: past, action: action::DROP, reason: verdict_reason::NO_PTR })
        .unwrap();
    gk.check(&syn(bad).build(), XDP_PASS, &[(pass, 1)], "expired own verdict");

    gk.config(60_000_000_000, 0);
    // A /64 presumed bad: every address is dropped and reported (a good
    // one earns a pass of its own); an own pass is never written, so the
    // whole /64's pass lifts it.
    gk.verdicts()
        .insert(net(mx), Verdict { expires_ns: far, action: action::PRESUMED_DROP, reason: verdict_reason::NO_PTR })
        .unwrap();
    gk.events();
    let fresh = "2001:db8:5:6::31";
    gk.check(&syn(fresh).build(), XDP_DROP, &[(no_ptr, 1)], "a presumed-bad /64");
    let ev = gk.events();
    assert_eq!(ev.len(), 1, "reported: {ev:?}");
    assert_eq!(Ipv6Addr::from(ev[0].addr), fresh.parse::<Ipv6Addr>().unwrap(), "the address itself");
    gk.check(&syn(fresh).build(), XDP_DROP, &[(no_ptr, 1)], "still presumed");
    assert!(gk.events().is_empty(), "reported once per interval");
    // A plain /64 drop (a ban) is not reported.
    gk.verdicts()
        .insert(net(mx), Verdict { expires_ns: far, action: action::DROP, reason: verdict_reason::MANUAL_BAN })
        .unwrap();
    gk.check(&syn("2001:db8:5:6::77").build(), XDP_DROP, &[(drop_reason(verdict_reason::MANUAL_BAN), 1)], "banned /64");
    assert!(gk.events().is_empty(), "a ban reports nobody");

    // Interface ids 0 and all ones have no key of their own: the /64's
    // verdict decides.
    for ip in ["2001:db8:5:6::", "2001:db8:5:6:ffff:ffff:ffff:ffff"] {
        assert_eq!(host(ip), net(ip), "{ip}");
        gk.check(&syn(ip).build(), XDP_DROP, &[(drop_reason(verdict_reason::MANUAL_BAN), 1)], ip);
    }
    // The fillers were never disturbed.
    for f in &fillers {
        gk.check(&syn(f).build(), XDP_DROP, &[(drop_reason(verdict_reason::GENERIC), 1)], f);
    }
}

/// The verdict table's hash takes the secret in the config (issue 10, item
/// 5): a verdict placed under one secret is not where a datapath with
/// another secret looks, so without the secret nobody can pick sources
/// that share a bucket pair.
#[test]
fn the_datapath_hashes_with_the_configs_secret() {
    let mut gk = Gk::new();
    let far = monotonic_ns() + 3_600_000_000_000;
    gk.verdict("198.51.100.77", action::DROP, verdict_reason::NO_PTR, far);
    gk.check(&syn("198.51.100.77").build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], "placed and found");
    let mut cfg: Array<_, Config> = Array::try_from(gk.bpf.map_mut(maps::CONFIG).unwrap()).unwrap();
    let c0 = cfg.get(&0, 0).unwrap();
    let other = gatekeeper_common::sourcetab::HashKey::from_random([0x1234_5678_9abc_def1, 0x0fed_cba9_8765_4321]);
    cfg.set(0, Config { hash: other, ..c0 }, 0).unwrap();
    let table = gk.verdicts();
    let k = KeyWords::of(&SourceKey::from_ip("198.51.100.77".parse().unwrap()));
    let mine = table.pair(&k);
    drop(table);
    let theirs =
        VerdictTable::new(Array::try_from(gk.bpf.map_mut(maps::VERDICTS).unwrap()).unwrap(), other).unwrap().pair(&k);
    assert!(mine.iter().all(|b| !theirs.contains(b)), "the secrets give other buckets: {mine:?} {theirs:?}");
    gk.check(
        &syn("198.51.100.77").build(),
        XDP_PASS,
        &[(c(Counter::Unknown), 1)],
        "another secret: looked for elsewhere",
    );
}

#[test]
fn expired_verdict_is_unknown() {
    for calibrated in [true, false] {
        let mut gk = Gk::new();
        if !calibrated {
            gk.uncalibrated();
        }
        let now = monotonic_ns();
        let past = now - gk.clock_slack_ns() - 1;
        gk.verdict("203.0.113.1", action::DROP, verdict_reason::NO_PTR, past);
        gk.verdict("203.0.113.2", action::PASS, verdict_reason::OK, past);
        gk.verdict("2001:db8:1::1", action::DROP, verdict_reason::DYNAMIC, 1);
        gk.verdict("203.0.113.3", action::DROP, verdict_reason::NO_PTR, now + 3_600_000_000_000);
        // Expiring shortly: live now, expired half a second later.
        gk.verdict("203.0.113.4", action::DROP, verdict_reason::NO_PTR, now + 250_000_000);
        gk.check(&syn("203.0.113.4").build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], "live");
        for src in ["203.0.113.1", "203.0.113.2", "2001:db8:1::1"] {
            gk.check(&syn(src).build(), XDP_PASS, &[(c(Counter::Unknown), 1)], &format!("expired verdict {src}"));
        }
        assert_eq!(gk.events().len(), 3);
        gk.check(&syn("203.0.113.3").build(), XDP_DROP, &[(drop_reason(verdict_reason::NO_PTR), 1)], "live verdict");
        while monotonic_ns() < now + 250_000_000 + gk.clock_slack_ns() + 1 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        gk.check(&syn("203.0.113.4").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "expired in the meantime");
    }
}

#[test]
fn unknown_source_is_reported_once_per_interval() {
    let mut gk = Gk::new();
    gk.config(60_000_000_000, 0);
    let before = monotonic_ns();
    let frame = Packet::tcp_v4(v4("203.0.113.77"), v4(DST4), 41000, SMTP, tcp_flags::SYN).build();
    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "first SYN");
    let after = monotonic_ns();
    let ev = gk.events();
    assert_eq!(ev.len(), 1, "one event: {ev:?}");
    let e = ev[0];
    assert_eq!((e.addr, e.port, e.family, e.ifindex), (addr::mapped_v4([203, 0, 113, 77]), SMTP, family::V4, IFINDEX));
    assert_eq!(addr::event_ip(e.addr, e.family), "203.0.113.77".parse::<IpAddr>().unwrap());
    let slack = gk.clock_slack_ns();
    assert!(
        (before - slack..=after + slack).contains(&e.ts_ns),
        "event time {} in [{before}, {after}] +- {slack}",
        e.ts_ns
    );

    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "second SYN");
    assert!(gk.events().is_empty(), "no second event within the interval");

    // Another guarded port from the same source, still within the interval.
    gk.set_port(587, true);
    let sub = Packet::tcp_v4(v4("203.0.113.77"), v4(DST4), 41000, 587, tcp_flags::SYN).build();
    gk.check(&sub, XDP_PASS, &[(c(Counter::Unknown), 1)], "SYN to 587");
    assert!(gk.events().is_empty());

    // IPv6: the event carries the full address, and the interval is the
    // address's own (each address is judged on its own).
    let src6 = v6("2001:db8:77:1::abcd");
    gk.check(&syn("2001:db8:77:1::abcd").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "v6 SYN");
    let ev = gk.events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].addr, ev[0].port, ev[0].family), (src6.octets(), SMTP, family::V6));
    gk.check(&syn("2001:db8:77:1::abcd").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "again");
    assert!(gk.events().is_empty(), "the same address within the interval");
    gk.check(&syn("2001:db8:77:1::1").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "same /64");
    assert_eq!(gk.events().len(), 1, "another address of the /64 is reported");
    gk.check(&syn("2001:db8:77:1::1").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "same /64 again");
    assert!(gk.events().is_empty(), "once per interval");
    gk.check(&syn("2001:db8:77:2::1").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "other /64");
    assert_eq!(gk.events().len(), 1);

    // Sources sharing a reported-sources slot: a fresh slot is never taken
    // (a flood must not make a real sender look new), so the earlier source
    // keeps it and is not reported again within its interval, and the later
    // one, which cannot take it, is reported at each SYN (an extra event,
    // never a missed one).
    let slot_of = |ip: Ipv6Addr| seen_slot_of(&ip.to_string());
    let a = v6("2001:db8:90::1");
    let b = (1..=u32::MAX)
        .map(|i| Ipv6Addr::from(0x2001_0db8_0091_0000_0000_0000_0000_0001u128 | (u128::from(i) << 64)))
        .find(|&x| slot_of(x) == slot_of(a))
        .expect("a colliding source");
    let syn_from = |ip: Ipv6Addr| Packet::tcp_v6(ip, v6(DST6), 41000, SMTP, tcp_flags::SYN).build();
    gk.check(&syn_from(a), XDP_PASS, &[(c(Counter::Unknown), 1)], "a");
    gk.check(&syn_from(a), XDP_PASS, &[(c(Counter::Unknown), 1)], "a again");
    assert_eq!(gk.events().len(), 1, "a reported once");
    gk.check(&syn_from(b), XDP_PASS, &[(c(Counter::Unknown), 1)], "b");
    gk.check(&syn_from(a), XDP_PASS, &[(c(Counter::Unknown), 1)], "a after b");
    gk.check(&syn_from(b), XDP_PASS, &[(c(Counter::Unknown), 1)], "b again");
    let ev: Vec<IpAddr> = gk.events().iter().map(|e| addr::event_ip(e.addr, e.family)).collect();
    assert_eq!(ev, [IpAddr::from(b), IpAddr::from(b)]);

    // A zero interval reports every SYN.
    gk.config(0, 0);
    for _ in 0..3 {
        gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "SYN, interval 0");
    }
    assert_eq!(gk.events().len(), 3);
}

#[test]
fn dry_run_passes_every_drop_and_counts_it() {
    let mut gk = Gk::new();
    gk.config(0, config_flags::DRY_RUN);
    gk.deny("198.51.100.0/24", 1);
    gk.deny("2001:db8:bad::/48", 2);
    let dry = c(Counter::DryRun);
    gk.check(&syn("198.51.100.1").build(), XDP_PASS, &[(c(Counter::DenyRange), 1), (dry, 1)], "v4 deny");
    gk.check(&syn("2001:db8:bad::1").build(), XDP_PASS, &[(c(Counter::DenyRange), 1), (dry, 1)], "v6 deny");
    assert_eq!((gk.range_hits(1), gk.range_hits(2)), (1, 1));
    for reason in 0..verdict_reason::COUNT {
        let src = format!("203.0.113.{}", 10 + reason);
        gk.verdict(&src, action::DROP, reason, u64::MAX);
        gk.check(&syn(&src).build(), XDP_PASS, &[(drop_reason(reason), 1), (dry, 1)], &format!("reason {reason}"));
        let src6 = format!("2001:db8:{}::1", 10 + reason);
        gk.verdict(&src6, action::DROP, reason, u64::MAX);
        gk.check(&syn(&src6).build(), XDP_PASS, &[(drop_reason(reason), 1), (dry, 1)], &format!("v6 reason {reason}"));
    }
    // Passing decisions are not "would drop".
    gk.allow("192.0.2.0/24", 3);
    gk.check(&syn("192.0.2.1").build(), XDP_PASS, &[(c(Counter::Allowed), 1)], "allowed in dry run");
    gk.check(&syn("203.0.113.200").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "unknown in dry run");
    // Leaving dry run drops again.
    gk.config(0, 0);
    gk.check(&syn("198.51.100.1").build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], "v4 deny after dry run");
}

#[test]
fn unguarded_ports_pass_uncounted_and_bitmap_changes_apply() {
    let mut gk = Gk::denying_all();
    let to = |port: u16| Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 40000, port, tcp_flags::SYN).build();
    let to6 = |port: u16| Packet::tcp_v6(v6("2001:db8::1"), v6(DST6), 40000, port, tcp_flags::SYN).build();
    for port in [0, 24, 26, 80, 443, 587, 65535] {
        gk.check(&to(port), XDP_PASS, &[], &format!("SYN to unguarded {port}"));
        gk.check(&to6(port), XDP_PASS, &[], &format!("v6 SYN to unguarded {port}"));
    }
    gk.check(&to(25), XDP_DROP, &[(c(Counter::DenyRange), 1)], "SYN to 25");
    for port in [587, 0, 63, 64, 65535] {
        gk.set_port(port, true);
        gk.check(&to(port), XDP_DROP, &[(c(Counter::DenyRange), 1)], &format!("SYN to newly guarded {port}"));
        gk.check(&to6(port), XDP_DROP, &[(c(Counter::DenyRange), 1)], &format!("v6 SYN to newly guarded {port}"));
    }
    gk.check(&to(26), XDP_PASS, &[], "neighbour ports stay unguarded");
    gk.set_port(25, false);
    gk.check(&to(25), XDP_PASS, &[], "SYN to 25 after unguarding");
    gk.check(&to(587), XDP_DROP, &[(c(Counter::DenyRange), 1)], "587 still guarded");
    assert_eq!(gk.range_hits(1) + gk.range_hits(2), 12);
}

#[test]
fn ipv4_options_every_ihl() {
    let mut gk = Gk::new();
    gk.deny("198.51.100.0/24", 1);
    for words in 1..=10usize {
        // Record-route-ish bytes; any option bytes will do for the parser.
        let opts: Vec<u8> = (0..words * 4).map(|i| if i == 0 { 1 } else { 0x07 }).collect();
        let frame = syn("198.51.100.9").ipv4_options(&opts).build();
        assert_eq!(frame[14] & 0x0f, 5 + words as u8);
        gk.check(&frame, XDP_DROP, &[(c(Counter::DenyRange), 1)], &format!("IHL {}", 5 + words));
        let frame = syn("203.0.113.9").ipv4_options(&opts).build();
        gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], &format!("unknown, IHL {}", 5 + words));
        let ack = Packet::tcp_v4(v4("198.51.100.9"), v4(DST4), 1, SMTP, tcp_flags::ACK).ipv4_options(&opts).build();
        gk.check(&ack, XDP_PASS, &[], &format!("ACK, IHL {}", 5 + words));
    }
    let ev = gk.events();
    assert_eq!(ev.len(), 10);
    assert!(ev.iter().all(|e| e.addr == addr::mapped_v4([203, 0, 113, 9]) && e.port == SMTP));
}

#[test]
fn ipv6_verdicts_are_keyed_by_slash64() {
    let mut gk = Gk::new();
    gk.verdict("2001:db8:1:2::1", action::DROP, verdict_reason::DYNAMIC, u64::MAX);
    for src in ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2:abcd::9"] {
        gk.check(&syn(src).build(), XDP_DROP, &[(drop_reason(verdict_reason::DYNAMIC), 1)], src);
    }
    for src in ["2001:db8:1:3::1", "2001:db8:1:1:ffff:ffff:ffff:ffff"] {
        gk.check(&syn(src).build(), XDP_PASS, &[(c(Counter::Unknown), 1)], src);
    }
    gk.verdict("2001:db8:9:9::", action::PASS, verdict_reason::OK, u64::MAX);
    gk.check(&syn("2001:db8:9:9:1:2:3:4").build(), XDP_PASS, &[(c(Counter::VerdictPass), 1)], "pass /64");
}

#[test]
fn ipv6_extension_headers_reach_the_decision() {
    let mut gk = Gk::new();
    gk.deny("2001:db8:bad::/48", 1);
    let via = v6("2001:db8:ffff::1");
    let chains: Vec<(&str, Vec<ExtHeader>)> = vec![
        ("hop-by-hop", vec![ExtHeader::hop_by_hop()]),
        ("hop-by-hop with options", vec![ExtHeader::HopByHop(vec![5, 2, 0, 0, 1, 3, 1, 2, 3])]),
        ("routing", vec![ExtHeader::routing(&[via, v6(DST6)])]),
        ("dst-opts", vec![ExtHeader::dest_opts()]),
        ("dst-opts 24 bytes", vec![ExtHeader::DestOpts(vec![0x1e, 20].into_iter().chain([0; 20]).collect())]),
        ("first fragment", vec![ExtHeader::fragment(0, true)]),
        ("atomic fragment", vec![ExtHeader::fragment(0, false)]),
        (
            "hbh, dst-opts, routing, fragment, dst-opts",
            vec![
                ExtHeader::hop_by_hop(),
                ExtHeader::dest_opts(),
                ExtHeader::routing(&[via]),
                ExtHeader::fragment(0, true),
                ExtHeader::dest_opts(),
            ],
        ),
        ("bound: six headers", vec![ExtHeader::dest_opts(); MAX_IPV6_EXT_HEADERS]),
    ];
    for (name, chain) in chains {
        let build = |src: &str| chain.iter().cloned().fold(syn(src), Packet::ext).build();
        gk.check(&build("2001:db8:bad::1"), XDP_DROP, &[(c(Counter::DenyRange), 1)], name);
        gk.check(&build("2001:db8:900d::1"), XDP_PASS, &[(c(Counter::Unknown), 1)], name);
        let ev = gk.events();
        assert_eq!(ev.len(), 1, "{name}");
        assert_eq!((ev[0].addr, ev[0].port), (v6("2001:db8:900d::1").octets(), SMTP), "{name}");
    }
}

#[test]
fn ipv6_ah_and_too_many_ext_headers_are_skipped() {
    let mut gk = Gk::new();
    gk.deny("::/0", 1);
    let skipped = [(c(Counter::ParseSkipped), 1)];
    gk.check(&syn("2001:db8::1").ext(ExtHeader::ah()).build(), XDP_PASS, &skipped, "AH");
    let frame = syn("2001:db8::1").ext(ExtHeader::hop_by_hop()).ext(ExtHeader::ah()).build();
    gk.check(&frame, XDP_PASS, &skipped, "hop-by-hop, AH");
    let frame = vec![ExtHeader::dest_opts(); MAX_IPV6_EXT_HEADERS + 1]
        .into_iter()
        .fold(syn("2001:db8::1"), Packet::ext)
        .build();
    gk.check(&frame, XDP_PASS, &skipped, "one header more than the bound");
    let frame = vec![ExtHeader::dest_opts(); 20].into_iter().fold(syn("2001:db8::1"), Packet::ext).build();
    gk.check(&frame, XDP_PASS, &skipped, "twenty headers");
    // Unknown next headers end the walk without a decision or a count.
    for (proto, name) in [(ipproto::ESP, "ESP"), (ipproto::NONE, "no next header"), (ipproto::UDP, "UDP")] {
        let frame = Packet::tcp_v6(v6("2001:db8::1"), v6(DST6), 1, SMTP, tcp_flags::SYN)
            .ext(ExtHeader::hop_by_hop())
            .raw_l4(proto, &[0; 40])
            .build();
        gk.check(&frame, XDP_PASS, &[], name);
    }
    assert_eq!(gk.range_hits(1), 0);
}

#[test]
fn vlan_and_qinq_are_decided() {
    let mut gk = Gk::new();
    gk.deny("198.51.100.0/24", 1);
    gk.deny("2001:db8:bad::/48", 2);
    for (name, tags) in VLAN_STACKS {
        let tag = |p: Packet| p.vlans(tags).build();
        gk.check(&tag(syn("198.51.100.1")), XDP_DROP, &[(c(Counter::DenyRange), 1)], name);
        gk.check(&tag(syn("2001:db8:bad::1")), XDP_DROP, &[(c(Counter::DenyRange), 1)], name);
        gk.check(&tag(syn("203.0.113.1")), XDP_PASS, &[(c(Counter::Unknown), 1)], name);
        gk.check(
            &tag(syn("2001:db8:900d::1").ext(ExtHeader::hop_by_hop())),
            XDP_PASS,
            &[(c(Counter::Unknown), 1)],
            name,
        );
        let ack = Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, tcp_flags::ACK);
        gk.check(&tag(ack), XDP_PASS, &[], name);
        assert_eq!(gk.events().len(), 2, "{name}");
    }
    // A third tag is beyond the parser's bound: passed without a decision.
    let frame = syn("198.51.100.1").vlan(ethertype::QINQ, 1).vlan(ethertype::VLAN, 2).vlan(ethertype::VLAN, 3).build();
    gk.check(&frame, XDP_PASS, &[], "three tags");
}

#[test]
fn non_first_fragments_pass_without_a_decision() {
    let mut gk = Gk::denying_all();
    for (offset, more) in [(1, true), (1, false), (185, true), (0x1fff, false)] {
        let frame = syn("198.51.100.1").ipv4_fragment(offset, more).build();
        gk.check(&frame, XDP_PASS, &[], &format!("v4 fragment offset {offset} MF {more}"));
        let frame = syn("2001:db8::1").ext(ExtHeader::fragment(offset, more)).build();
        gk.check(&frame, XDP_PASS, &[], &format!("v6 fragment offset {offset} M {more}"));
        let frame = syn("2001:db8::1").ext(ExtHeader::hop_by_hop()).ext(ExtHeader::fragment(offset, more)).build();
        gk.check(&frame, XDP_PASS, &[], &format!("v6 hbh + fragment offset {offset} M {more}"));
    }
    // First fragments are decided.
    let frame = syn("198.51.100.1").ipv4_fragment(0, true).build();
    gk.check(&frame, XDP_DROP, &[(c(Counter::DenyRange), 1)], "v4 first fragment");
    let frame = syn("2001:db8::1").ext(ExtHeader::fragment(0, true)).build();
    gk.check(&frame, XDP_DROP, &[(c(Counter::DenyRange), 1)], "v6 first fragment");
    // Unlike the egress gate, the ingress gate never drops what it cannot
    // read: a first fragment too short to show the TCP header passes.
    let skipped = [(c(Counter::ParseSkipped), 1)];
    for bytes in [0, 8] {
        let full = syn("198.51.100.1").build();
        let frame = syn("198.51.100.1").raw_l4(ipproto::TCP, &full[34..34 + bytes]).ipv4_fragment(0, true).build();
        gk.check(&frame, XDP_PASS, &skipped, &format!("v4 first fragment with {bytes} bytes of TCP"));
        let full = syn("2001:db8::1").build();
        let frame =
            syn("2001:db8::1").ext(ExtHeader::fragment(0, true)).raw_l4(ipproto::TCP, &full[54..54 + bytes]).build();
        gk.check(&frame, XDP_PASS, &skipped, &format!("v6 first fragment with {bytes} bytes of TCP"));
    }
}

/// PPPoE session frames (behind VLAN tags too, with or without PPP
/// protocol-field compression) are judged like plain ones.
#[test]
fn pppoe_sessions_are_judged_like_plain_frames() {
    let mut gk = Gk::new();
    gk.deny("198.51.100.0/24", 1);
    gk.deny("2001:db8:bad::/48", 2);
    gk.allow("198.51.100.128/25", 3);
    let drop = [(c(Counter::DenyRange), 1)];
    for (name, tags) in [("untagged", &[][..]), VLAN_STACKS[0], VLAN_STACKS[1]] {
        for compressed in [false, true] {
            let what = |s: &str| format!("{name} PPPoE (compressed {compressed}) {s}");
            let carry = |p: Packet| {
                let p = p.vlans(tags);
                (if compressed { p.pppoe_compressed(0x1234) } else { p.pppoe(0x1234) }).build()
            };
            gk.check(&carry(syn("198.51.100.1")), XDP_DROP, &drop, &what("denied v4"));
            gk.check(&carry(syn("2001:db8:bad::1")), XDP_DROP, &drop, &what("denied v6"));
            let hbh = syn("2001:db8:bad::1").ext(ExtHeader::hop_by_hop());
            gk.check(&carry(hbh), XDP_DROP, &drop, &what("denied v6, hop-by-hop"));
            gk.check(&carry(syn("198.51.100.200")), XDP_PASS, &[(c(Counter::Allowed), 1)], &what("allowed"));
            gk.check(&carry(syn("203.0.113.1")), XDP_PASS, &[(c(Counter::Unknown), 1)], &what("unknown v4"));
            gk.check(&carry(syn("2001:db8:900d::1")), XDP_PASS, &[(c(Counter::Unknown), 1)], &what("unknown v6"));
            let ack = Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, tcp_flags::ACK);
            gk.check(&carry(ack), XDP_PASS, &[], &what("ACK"));
            let f = syn("198.51.100.1").ipv4_fragment(3, false);
            gk.check(&carry(f), XDP_PASS, &[], &what("later fragment"));
            let udp = Packet::udp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP).payload(&[0x02; 24]);
            gk.check(&carry(udp), XDP_PASS, &[], &what("UDP"));
        }
        // Other PPP protocols and the discovery stage carry no IP: passed.
        for proto in [ppp::LCP, ppp::IPCP, 0x0023] {
            let f = syn("198.51.100.1").vlans(tags).pppoe(1).ppp_protocol(proto).build();
            gk.check(&f, XDP_PASS, &[], &format!("{name} PPP protocol {proto:#06x}"));
        }
        let mut f = syn("198.51.100.1").vlans(tags).pppoe(1).build();
        let et = 12 + 4 * tags.len();
        f[et..et + 2].copy_from_slice(&ethertype::PPPOE_DISCOVERY.to_be_bytes());
        gk.check(&f, XDP_PASS, &[], &format!("{name} PPPoE discovery"));
        // A malformed IP header inside is skipped, as outside.
        let mut f = syn("198.51.100.1").vlans(tags).pppoe(1).build();
        f[et + 10] = 0x44;
        gk.check(&f, XDP_PASS, &[(c(Counter::ParseSkipped), 1)], &format!("{name} PPPoE, IHL 4"));
    }
    assert_eq!(gk.events().len(), 12, "unknown sources are reported");
}

#[test]
fn only_a_pure_syn_is_decided() {
    let mut gk = Gk::denying_all();
    use tcp_flags::*;
    for (flags, name) in NOT_SYN {
        let frame = Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, flags).build();
        gk.check(&frame, XDP_PASS, &[], name);
        let frame = Packet::tcp_v6(v6("2001:db8::1"), v6(DST6), 1, SMTP, flags).build();
        gk.check(&frame, XDP_PASS, &[], name);
    }
    for frame in [
        Packet::udp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP).payload(&[0; 32]).build(),
        Packet::udp_v6(v6("2001:db8::1"), v6(DST6), 1, SMTP).payload(&[0; 32]).build(),
        // UDP whose bytes 13 would look like a SYN flag to a TCP parser.
        Packet::udp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP).payload(&[0, 0, 0, 0, 0, 0x02, 0, 0]).build(),
        Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, SYN).raw_l4(ipproto::UDP, &[0; 20]).build(),
    ] {
        gk.check(&frame, XDP_PASS, &[], "UDP to port 25");
    }
    // SYN with other bits (ECN setup, FIN, PSH) is still a connection attempt.
    for flags in SYN_WITH_BITS {
        let frame = Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, flags).build();
        gk.check(&frame, XDP_DROP, &[(c(Counter::DenyRange), 1)], &format!("flags {flags:#04x}"));
    }
}

#[test]
fn truncated_frames_always_pass() {
    let mut gk = Gk::denying_all();
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("v4", syn("198.51.100.1").build()),
        ("v4 options", syn("198.51.100.1").ipv4_options(&[1; 12]).build()),
        ("v4 802.1Q", syn("198.51.100.1").vlan(ethertype::VLAN, 5).build()),
        ("v4 QinQ", syn("198.51.100.1").qinq(6, 7).build()),
        ("v6", syn("2001:db8::1").build()),
        (
            "v6 hbh+routing+fragment+dst-opts",
            syn("2001:db8::1")
                .ext(ExtHeader::hop_by_hop())
                .ext(ExtHeader::routing(&[v6(DST6)]))
                .ext(ExtHeader::fragment(0, true))
                .ext(ExtHeader::dest_opts())
                .build(),
        ),
        ("v6 QinQ dst-opts", syn("2001:db8::1").qinq(6, 7).ext(ExtHeader::dest_opts()).build()),
        ("v4 no TCP options", Packet::tcp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP, tcp_flags::SYN).build()),
        ("v4 PPPoE", syn("198.51.100.1").pppoe(1).build()),
        ("v4 802.1Q PPPoE compressed", syn("198.51.100.1").vlan(ethertype::VLAN, 5).pppoe_compressed(1).build()),
        ("v6 QinQ PPPoE dst-opts", syn("2001:db8::1").qinq(6, 7).pppoe(1).ext(ExtHeader::dest_opts()).build()),
    ];
    for (name, full) in frames {
        let mut skipped = 0;
        for len in 14..full.len() {
            let ret = gk.run(&full[..len]);
            assert_eq!(ret, XDP_PASS, "{name} truncated to {len} of {} bytes", full.len());
            let d = gk.delta();
            // Either the parser gave up (counted) or stopped before it knew
            // enough to count anything (e.g. an Ethernet header only).
            assert!(
                d.is_empty() || d == BTreeMap::from([((IFINDEX, "parse-skipped"), 1)]),
                "{name} truncated to {len}: {d:?}"
            );
            skipped += d.len();
        }
        assert!(skipped > 0, "{name}: truncations are counted as parse-skipped");
        gk.check(&full, XDP_DROP, &[(c(Counter::DenyRange), 1)], name);
    }
}

#[test]
fn malformed_ip_headers_pass_and_are_counted() {
    let mut gk = Gk::denying_all();
    let skipped = [(c(Counter::ParseSkipped), 1)];
    let good = syn("198.51.100.1").build();
    for ihl in 0..5u8 {
        let mut frame = good.clone();
        frame[14] = 0x40 | ihl;
        gk.check(&frame, XDP_PASS, &skipped, &format!("IHL {ihl}"));
    }
    for version in [0u8, 5, 6, 15] {
        let mut frame = good.clone();
        frame[14] = (version << 4) | 5;
        gk.check(&frame, XDP_PASS, &skipped, &format!("IPv4 ethertype, version {version}"));
    }
    // IHL pointing past the end of the frame.
    let mut frame = good.clone();
    frame[14] = 0x4f;
    gk.check(&frame, XDP_PASS, &skipped, "IHL 15 without options");
    let good6 = syn("2001:db8::1").build();
    for version in [0u8, 4, 7] {
        let mut frame = good6.clone();
        frame[14] = version << 4;
        gk.check(&frame, XDP_PASS, &skipped, &format!("IPv6 ethertype, version {version}"));
    }
    // TCP data offset below 5 is not a TCP header.
    for doff in 0..5u8 {
        let mut frame = good.clone();
        frame[34 + 12] = doff << 4;
        gk.check(&frame, XDP_PASS, &skipped, &format!("TCP data offset {doff}"));
    }
    // TCP data offset claiming options the frame does not have.
    let mut frame = good.clone();
    frame[34 + 12] = 0xf0;
    gk.check(&frame, XDP_PASS, &skipped, "TCP data offset 15 without options");
    assert_eq!(gk.range_hits(1) + gk.range_hits(2), 0);
}

/// An extension header whose length points past 4 KiB must not make the
/// parser read the TCP header from somewhere else in the frame.
#[test]
fn huge_extension_header_offsets_do_not_wrap() {
    let mut gk = Gk::new();
    gk.deny("::/0", 1);
    // Two 2048-byte dst-opts headers put the TCP header at 54 + 4096 = 4150.
    // The first header's option bytes (from offset 56) look like a TCP SYN to
    // port 25 for anyone who reads "TCP" at 4150 & 0xfff = 54.
    let mut opts = vec![0u8; 2046];
    opts[0..2].copy_from_slice(&SMTP.to_be_bytes()); // "dport" at 56
    opts[10] = 0x50; // "data offset" at 66
    opts[11] = tcp_flags::SYN; // "flags" at 67
    let full = syn("2001:db8::1").ext(ExtHeader::DestOpts(opts)).ext(ExtHeader::DestOpts(vec![0; 2046])).build();
    assert_eq!(full.len(), 54 + 4096 + 24);
    assert_eq!(&full[56..58], &[0, 25]);
    // XDP test runs only give the program the first ~3.5 KiB linear part;
    // the second header's first bytes (2102..2104) must be in it.
    for len in [2104, 2200, 3000] {
        gk.check(&full[..len], XDP_PASS, &[(c(Counter::ParseSkipped), 1)], &format!("{len} bytes, TCP at 4150"));
    }
    assert_eq!(gk.range_hits(1), 0);
}

#[test]
fn random_garbage_is_never_dropped_or_aborted() {
    let mut gk = Gk::new();
    gk.set_all_ports();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let ethertypes = [0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x0000];
    for i in 0..4000 {
        let len = 14 + rng.below(if i % 4 == 0 { 1500 } else { 120 }) as usize;
        let mut frame = rng.bytes(len);
        // Bias towards the interesting ethertypes and versions so the parser
        // gets past the first header most of the time.
        if i % 8 != 0 {
            let et = ethertypes[rng.below(ethertypes.len() as u64) as usize];
            frame[12..14].copy_from_slice(&et.to_be_bytes());
            if len > 14 {
                frame[14] = match et {
                    0x86dd => 0x60 | (frame[14] & 0x0f),
                    0x0800 => 0x40 | (frame[14] & 0x0f),
                    _ => frame[14],
                };
            }
        }
        let ret = gk.run(&frame);
        assert_eq!(ret, XDP_PASS, "random frame {i}: {}", hex(&frame));
    }
    let d = gk.delta();
    assert!(!d.contains_key(&(IFINDEX, "deny-range")) && d.keys().all(|k| k.0 == IFINDEX), "{d:?}");
}

/// How [`mutated_packets_match_the_parsing_rules`] changes its seeds.
const MUTATION: Mutation =
    Mutation { span: 110, planted: &[0, 6, 0x02, 0x12, 44, 60, 0xff, 0x21, 0x57], resize_one_in: 6, extend_below: 64 };

#[test]
fn mutated_packets_match_the_parsing_rules() {
    let mut gk = Gk::new();
    gk.set_all_ports();
    gk.deny("0.0.0.0/0", 1);
    gk.deny("::/0", 2);
    let deny =
        |net: &str, id| Range { kind: RangeKind::Deny, net: net.parse().unwrap(), id, learned: false, reject: false };
    let mut reading = Model {
        ranges: vec![deny("0.0.0.0/0", 1), deny("::/0", 2)],
        ports: (0..=u16::MAX).collect(),
        hash: testrun::HASH,
        ..Model::default()
    };
    let seeds: Vec<Vec<u8>> = vec![
        syn("198.51.100.1").build(),
        syn("198.51.100.1").ipv4_options(&[1; 8]).vlan(ethertype::VLAN, 3).build(),
        syn("198.51.100.1").qinq(1, 2).build(),
        syn("2001:db8::1").build(),
        syn("2001:db8::1").ext(ExtHeader::hop_by_hop()).ext(ExtHeader::fragment(0, true)).build(),
        syn("2001:db8::1")
            .vlan(ethertype::VLAN, 9)
            .ext(ExtHeader::routing(&[v6(DST6)]))
            .ext(ExtHeader::dest_opts())
            .ext(ExtHeader::dest_opts())
            .build(),
        Packet::udp_v4(v4("198.51.100.1"), v4(DST4), 1, SMTP).payload(&[0x02; 24]).build(),
        syn("198.51.100.1").pppoe(7).build(),
        syn("2001:db8::1").vlan(ethertype::VLAN, 9).pppoe_compressed(7).build(),
    ];
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut outcomes = BTreeMap::new();
    for i in 0..3000 {
        let mut frame = seeds[i % seeds.len()].clone();
        // Flip a few bytes, mostly in the headers; sometimes truncate or extend.
        mutate(&mut rng, &mut frame, &MUTATION);
        // Every source is denied and every port guarded: the model's SYNs
        // are dropped, what it cannot read is skipped.
        let want = match model::parse(&frame, Gate::Ingress) {
            Parse::NotSyn => "Pass",
            Parse::Unreadable => "Skip",
            Parse::Syn { .. } => "Drop",
            p @ (Parse::Fragment | Parse::LongChain) => panic!("the ingress reading gave {p:?}"),
        };
        *outcomes.entry(want).or_insert(0) += 1;
        let expect = reading.ingress(&frame);
        let counters: Vec<(u32, u64)> = expect.counters.iter().map(|&c| (c, 1)).collect();
        let ret = match expect.outcome() {
            Outcome::Pass => XDP_PASS,
            Outcome::Drop => XDP_DROP,
            Outcome::Reject => panic!("the ingress gate answers nothing"),
        };
        gk.check(&frame, ret, &counters, &format!("mutation {i} ({want}): {}", hex(&frame)));
    }
    // The mutations must exercise all three outcomes.
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    eprintln!("mutation outcomes: {outcomes:?}");
}

/// A learned range is a presumption about its hosts: a live per-source
/// verdict decides over it (a good mail server inside a learned dynamic /24
/// passes), its other sources are dropped and still reported, once per
/// interval, so a good one can earn its verdict. An operator's deny range
/// stays absolute.
#[test]
fn learned_ranges_yield_to_per_source_verdicts() {
    let mut gk = Gk::new();
    gk.config(60_000_000_000, 0);
    gk.ranges.add_learned("198.51.100.0/24", 7);
    gk.deny("203.0.113.0/24", 8);
    gk.verdict("198.51.100.25", action::PASS, verdict_reason::OK, u64::MAX);
    gk.verdict("198.51.100.26", action::DROP, verdict_reason::DYNAMIC, u64::MAX);
    gk.verdict("203.0.113.25", action::PASS, verdict_reason::OK, u64::MAX);
    gk.events();
    gk.delta();

    gk.check(
        &syn("198.51.100.25").build(),
        XDP_PASS,
        &[(c(Counter::VerdictPass), 1)],
        "a good verdict in a learned range",
    );
    gk.check(
        &syn("198.51.100.26").build(),
        XDP_DROP,
        &[(drop_reason(verdict_reason::DYNAMIC), 1)],
        "a drop verdict in a learned range",
    );
    assert!(gk.events().is_empty(), "sources with a verdict are not reported");
    let other = syn("198.51.100.9").build();
    gk.check(&other, XDP_DROP, &[(c(Counter::DenyRange), 1)], "a source of the learned range without a verdict");
    let ev = gk.events();
    assert_eq!(ev.len(), 1, "and reported");
    assert_eq!(addr::event_ip(ev[0].addr, ev[0].family), "198.51.100.9".parse::<IpAddr>().unwrap());
    gk.check(&other, XDP_DROP, &[(c(Counter::DenyRange), 1)], "its retransmit");
    assert!(gk.events().is_empty(), "reported once per interval");
    // Hold does not apply inside a range: those SYNs are dropped anyway.
    gk.config(60_000_000_000, config_flags::HOLD);
    gk.hold_ms(60_000);
    gk.check(&syn("198.51.100.10").build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], "learned range under hold");
    // An expired verdict no longer decides.
    gk.verdict("198.51.100.25", action::PASS, verdict_reason::OK, 1);
    gk.check(&syn("198.51.100.25").build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], "an expired good verdict");
    // The operator's own deny range decides over any verdict.
    gk.check(&syn("203.0.113.25").build(), XDP_DROP, &[(c(Counter::DenyRange), 1)], "a good verdict in a manual range");
    assert_eq!(gk.range_hits(7), 6);
    assert_eq!(gk.range_hits(8), 1);
}

// ---------------------------------------------------------------- hold

/// An instance with `first_syn = hold` (reports every 60 s) and a hold
/// window of `ms`, and the counter a held SYN moves.
fn holding(ms: u32) -> (Gk, u32) {
    let mut gk = Gk::new();
    gk.config(60_000_000_000, config_flags::HOLD);
    // hold_ms = 0 in `config`: set the window.
    gk.hold_ms(ms);
    (gk, c(Counter::VerdictDropBase) + verdict_reason::HOLD)
}

/// `first_syn = hold`: an unknown source is dropped from its first SYN
/// while its report is younger than hold_ms, then passes (fail-open); a
/// verdict that lands in between decides as usual.
#[test]
fn hold_drops_unknown_sources_for_a_bounded_time() {
    let (mut gk, hold) = holding(60_000);
    let first = syn("203.0.113.90").build();
    gk.check(&first, XDP_DROP, &[(hold, 1)], "first SYN is held");
    assert_eq!(gk.events().len(), 1, "and reported");
    gk.check(&first, XDP_DROP, &[(hold, 1)], "retransmit within the window is held");
    assert!(gk.events().is_empty(), "reported once");
    // The verdict lands: it decides.
    gk.verdict("203.0.113.90", action::PASS, verdict_reason::OK, u64::MAX);
    gk.check(&first, XDP_PASS, &[(c(Counter::VerdictPass), 1)], "verdict pass after hold");
    // v6 too.
    gk.check(&syn("2001:db8:90::1").build(), XDP_DROP, &[(hold, 1)], "v6 first SYN is held");
    // Dry-run: held SYNs pass but count.
    gk.config(60_000_000_000, config_flags::HOLD | config_flags::DRY_RUN);
    gk.hold_ms(60_000);
    gk.check(&syn("203.0.113.91").build(), XDP_PASS, &[(hold, 1), (c(Counter::DryRun), 1)], "dry-run hold");
}

/// The reported-sources slot of `src`, as the datapath picks it.
fn seen_slot_of(src: &str) -> u32 {
    let key = KeyWords::of(&SourceKey::host(src.parse().unwrap()));
    testrun::slots_of(&key, VERDICT_BUCKETS).seen
}

/// Waits until `ms` milliseconds of the datapath clock have passed.
fn sleep_ms(ms: u64) {
    let start = monotonic_ns();
    while monotonic_ns() < start + ms * 1_000_000 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A dead agent reads no events: once the ring is full no report gets
/// through. A new source is still held only for `hold_ms` from its first
/// SYN, then passes (it used to be held again at every SYN, for ever).
#[test]
fn hold_is_bounded_when_the_agent_is_dead_and_the_ring_full() {
    // Reading the counters between two SYNs takes tens of ms: a window of 1 s.
    let (mut gk, hold) = holding(1000);
    let probe = "203.0.113.200";
    // Nobody drains the ring: fill it with reports of other sources
    // (bounded: the ring holds a few thousand events).
    {
        let lost_slot = gatekeeper_common::stat_index(IFINDEX, c(Counter::EventLost));
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(gk.bpf.map(maps::STATS).unwrap()).unwrap();
        let lost = || stats.get(&lost_slot, 0).unwrap().iter().sum::<u64>();
        let mut fill = 0u32;
        while lost() == 0 {
            assert!(fill < 50_000, "the ring never filled");
            let src = format!("2001:db8:f0:{fill:x}::1");
            fill += 1;
            if seen_slot_of(&src) != seen_slot_of(probe) {
                gk.run(&syn(&src).build());
            }
        }
    }
    gk.delta();
    let frame = syn(probe).build();
    gk.check(&frame, XDP_DROP, &[(hold, 1), (c(Counter::EventLost), 1)], "first SYN held, its report lost");
    gk.check(&frame, XDP_DROP, &[(hold, 1), (c(Counter::EventLost), 1)], "retransmit within hold_ms held");
    sleep_ms(1100);
    gk.check(
        &frame,
        XDP_PASS,
        &[(c(Counter::Unknown), 1), (c(Counter::EventLost), 1)],
        "after hold_ms it passes, never reported",
    );
}

/// A flood of sources colliding with a real sender's slot cannot make its
/// retransmit look new: the sender is held at most `hold_ms` in all, and
/// the colliding sources pass rather than take its slot.
#[test]
fn hold_is_bounded_under_a_colliding_flood() {
    let (mut gk, hold) = holding(20);
    let real = "192.0.2.77";
    let frame = syn(real).build();
    gk.check(&frame, XDP_DROP, &[(hold, 1)], "the real sender's first SYN is held");
    assert_eq!(gk.events().len(), 1);
    // 20,000 spoofed sources, among them every one that shares the real
    // sender's slot; the agent drains the ring as it runs.
    let mut colliders = 0;
    let mut rng = Rng(0xf100d);
    for i in 0..20_000u32 {
        let src = if i % 1000 == 0 {
            // Search a colliding source (the slot hash is public).
            loop {
                let cand = format!("2001:db8:{:x}:{:x}::1", rng.next() as u16, rng.next() as u16);
                if seen_slot_of(&cand) == seen_slot_of(real) {
                    break cand;
                }
            }
        } else {
            format!("2001:db8:{:x}:{:x}::1", rng.next() as u16, rng.next() as u16)
        };
        if seen_slot_of(&src) == seen_slot_of(real) {
            colliders += 1;
            assert_eq!(gk.run(&syn(&src).build()), XDP_PASS, "a source colliding with a fresh slot passes");
        } else {
            gk.run(&syn(&src).build());
        }
        if i % 500 == 0 {
            gk.events();
        }
    }
    assert!(colliders >= 20, "{colliders}");
    gk.events();
    gk.delta();
    sleep_ms(50);
    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "the real sender's retransmit after hold_ms passes");
}

/// An event interval shorter than the hold window: a colliding source
/// still cannot take the real sender's slot before its window is over (and
/// so restart it); the sender passes once its window has run out.
#[test]
fn hold_window_outlasts_a_short_event_interval() {
    let (mut gk, hold) = holding(1000);
    gk.config(1_000_000, config_flags::HOLD);
    gk.hold_ms(1000);
    let real = "192.0.2.78";
    let mut rng = Rng(0x5107);
    let collider = loop {
        let cand = format!("2001:db8:{:x}:{:x}::1", rng.next() as u16, rng.next() as u16);
        if seen_slot_of(&cand) == seen_slot_of(real) {
            break cand;
        }
    };
    let frame = syn(real).build();
    gk.check(&frame, XDP_DROP, &[(hold, 1)], "the real sender's first SYN is held");
    sleep_ms(50);
    gk.check(
        &syn(&collider).build(),
        XDP_PASS,
        &[(c(Counter::Unknown), 1)],
        "a collider after the event interval passes",
    );
    gk.check(&frame, XDP_DROP, &[(hold, 1)], "the real sender is still within its window");
    sleep_ms(1100);
    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "and passes once it is over");
    gk.events();
}

#[test]
fn hold_fails_open_once_the_window_is_over() {
    let (mut gk, hold) = holding(1);
    let frame = syn("203.0.113.92").build();
    gk.check(&frame, XDP_DROP, &[(hold, 1)], "first SYN is held");
    // No verdict ever comes (agent or DNS dead): after the window it passes.
    let start = monotonic_ns();
    while monotonic_ns() < start + 50_000_000 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    gk.check(&frame, XDP_PASS, &[(c(Counter::Unknown), 1)], "after hold_ms the source passes");
    // Without the flag nothing is held.
    gk.config(60_000_000_000, 0);
    gk.check(&syn("203.0.113.93").build(), XDP_PASS, &[(c(Counter::Unknown), 1)], "no hold without the flag");
}

// ---------------------------------------------------------------- reject with a reason

/// The rejector's listeners in a test instance (kept open: a closed socket
/// leaves the sockmap) and their cookies, which a steered lookup reports.
struct Rejectors {
    _v4: std::net::TcpListener,
    _v6: std::net::TcpListener,
    v4: u64,
    v6: u64,
}

impl Gk {
    /// Writes the reject settings: `actions` (refusal codes) reject on
    /// `ports`, with a lease of `lease_ns` on the datapath clock.
    fn reject(&mut self, actions: &[u32], ports: &[u16], lease_ns: u64) {
        let mut rc = RejectConfig {
            actions: actions.iter().fold(0, |a, &c| a | 1 << c),
            nports: ports.len() as u32,
            lease_ns,
            ..RejectConfig::default()
        };
        rc.ports[..ports.len()].copy_from_slice(ports);
        let mut map: Array<_, RejectConfig> = Array::try_from(self.bpf.map_mut(maps::REJECT).unwrap()).unwrap();
        map.set(0, rc, 0).unwrap();
    }

    /// Puts two fresh listeners (loopback, IPv4 and IPv6-only) in the
    /// rejector's slots.
    fn rejectors(&mut self) -> Rejectors {
        let listen = |addr: &str| testrun::listener(addr).unwrap_or_else(|e| panic!("listener on {addr}: {e}"));
        let (v4, c4) = listen("127.0.0.1:0");
        let (v6, c6) = listen("[::1]:0");
        let mut map: SockMap<_> = SockMap::try_from(self.bpf.map_mut(maps::REJECTORS).unwrap()).unwrap();
        map.set(reject::SLOT_V4, &v4, 0).unwrap();
        map.set(reject::SLOT_V6, &v6, 0).unwrap();
        Rejectors { _v4: v4, _v6: v6, v4: c4, v6: c6 }
    }

    /// Silences `src` (its own key) until `until_ns`.
    fn quiet(&mut self, src: &str, until_ns: u64) {
        let key = KeyWords::of(&SourceKey::host(src.parse().unwrap()));
        let mut map: Array<_, QuietSlot> = Array::try_from(self.bpf.map_mut(maps::REJ_QUIET).unwrap()).unwrap();
        map.set(reject::quiet_slot(&key, &testrun::HASH), QuietSlot { key, until_ns }, 0).unwrap();
    }

    /// Runs the rejector on a TCP lookup from `src` to port `port`.
    fn look(&self, src: &str, port: u16) -> SkRun {
        let dst = if src.contains(':') { DST6 } else { DST4 };
        testrun::sk_lookup_run(&self.bpf, programs::SK_REJECTOR, &Lookup::tcp(src, dst, port), 1)
            .unwrap_or_else(|e| panic!("sk_lookup test run from {src}: {e}"))
    }

    /// Reject counters that moved since the last call, by name.
    fn rej_delta(&mut self) -> BTreeMap<&'static str, u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.bpf.map(maps::REJ_STATS).unwrap()).unwrap();
        let now: Vec<u64> = (0..reject::REJECT_COUNTER_SLOTS).map(|i| stats.get(&i, 0).unwrap().iter().sum()).collect();
        let mut out = BTreeMap::new();
        for (i, &v) in now.iter().enumerate() {
            let d = v - self.rej_seen.get(i).copied().unwrap_or(0);
            if d != 0 {
                out.insert(reject::reject_counter_name(i as u32), d);
            }
        }
        self.rej_seen = now;
        out
    }

    /// Runs `src`'s SYN to `port` through the XDP gate and then the
    /// rejector, asserting the gate's return, the rejector's (return,
    /// selected cookie) and the reject counters that moved in all.
    #[track_caller]
    fn check_reject(&mut self, src: &str, port: u16, xdp: u32, sk: (u32, u64), rej: &[(&'static str, u64)]) {
        let dst = if src.contains(':') { DST6 } else { DST4 };
        assert_eq!(self.run(&syn_to(src, dst, port).build()), xdp, "XDP return for {src} to port {port}");
        let r = self.look(src, port);
        assert_eq!((r.retval, r.cookie), sk, "sk_lookup (return, cookie) for {src} to port {port}");
        assert_eq!(self.rej_delta(), rej.iter().copied().collect(), "reject counters for {src} to port {port}");
    }
}

/// Far in the future on every clock the tests use.
const LEASE: u64 = u64::MAX;
const NONE: (u32, u64) = (testrun::SK_PASS, 0);

#[test]
fn a_refused_source_whose_action_is_reject_is_steered_to_the_rejector() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    gk.reject(
        &[verdict_reason::NO_PTR, verdict_reason::FCRDNS_FAIL, verdict_reason::DYNAMIC, verdict_reason::GENERIC],
        &[SMTP],
        LEASE,
    );
    for reason in
        [verdict_reason::NO_PTR, verdict_reason::FCRDNS_FAIL, verdict_reason::DYNAMIC, verdict_reason::GENERIC]
    {
        let name = refusal::name(reason);
        let counted: &'static str = reject::reject_counter_name(reject::RejectCounter::to_rejector(reason));
        for (src, cookie) in
            [(format!("203.0.113.{}", 10 + reason), r.v4), (format!("2001:db8:{}::1", 10 + reason), r.v6)]
        {
            if src.contains(':') {
                gk.verdict_key(SourceKey::host(src.parse().unwrap()), action::DROP, reason, u64::MAX);
            } else {
                gk.verdict(&src, action::DROP, reason, u64::MAX);
            }
            gk.check_reject(&src, SMTP, XDP_PASS, (testrun::SK_PASS, cookie), &[(counted, 1), ("rejector-steered", 1)]);
            // The gate counts the refusal by its reason, whatever its action.
            gk.expect(&[(drop_reason(reason), 1)], &format!("{name} rejected"));
        }
    }
    assert!(gk.events().is_empty(), "sources with a verdict are not reported");
    // A ban's action is drop here: dropped by XDP, never steered.
    gk.verdict("203.0.113.99", action::DROP, verdict_reason::MANUAL_BAN, u64::MAX);
    gk.check_reject("203.0.113.99", SMTP, XDP_DROP, NONE, &[]);
    gk.expect(&[(drop_reason(verdict_reason::MANUAL_BAN), 1)], "ban dropped");
    // Good and unknown sources find their socket as usual.
    gk.verdict("203.0.113.50", action::PASS, verdict_reason::OK, u64::MAX);
    gk.check_reject("203.0.113.50", SMTP, XDP_PASS, NONE, &[]);
    gk.check_reject("203.0.113.51", SMTP, XDP_PASS, NONE, &[]);
    gk.check_reject("2001:db8:77::1", SMTP, XDP_PASS, NONE, &[]);
    // With no reject action at all the rejector does nothing.
    gk.reject(&[], &[SMTP], LEASE);
    gk.check_reject("203.0.113.11", SMTP, XDP_DROP, NONE, &[]);
}

#[test]
fn ranges_are_rejected_by_kind_and_allow_still_wins() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    gk.config(60_000_000_000, 0);
    gk.deny("198.51.100.0/25", 7);
    gk.ranges.add_learned("198.51.100.128/25", 8);
    gk.allow("198.51.100.5/32", 9);
    gk.verdict("198.51.100.5", action::DROP, verdict_reason::MANUAL_BAN, u64::MAX);
    gk.verdict("198.51.100.200", action::PASS, verdict_reason::OK, u64::MAX);
    gk.reject(&[refusal::DENY_RANGE, refusal::LEARNED_RANGE, verdict_reason::MANUAL_BAN], &[SMTP], LEASE);
    let steered = |code: u32| {
        vec![(reject::reject_counter_name(reject::RejectCounter::to_rejector(code)), 1), ("rejector-steered", 1)]
    };
    gk.check_reject("198.51.100.1", SMTP, XDP_PASS, (testrun::SK_PASS, r.v4), &steered(refusal::DENY_RANGE));
    gk.check_reject("198.51.100.129", SMTP, XDP_PASS, (testrun::SK_PASS, r.v4), &steered(refusal::LEARNED_RANGE));
    assert_eq!(gk.events().len(), 1, "a learned range's source is still reported");
    gk.check_reject("198.51.100.5", SMTP, XDP_PASS, NONE, &[]);
    gk.check_reject("198.51.100.200", SMTP, XDP_PASS, NONE, &[]);
    assert_eq!(
        (gk.range_hits(7), gk.range_hits(8), gk.range_hits(9)),
        (1, 2, 1),
        "the rejector's second look counts no hits"
    );
    // Only the deny range's action is reject: the learned range drops.
    gk.reject(&[refusal::DENY_RANGE], &[SMTP], LEASE);
    gk.check_reject("198.51.100.130", SMTP, XDP_DROP, NONE, &[]);
    gk.check_reject("198.51.100.2", SMTP, XDP_PASS, (testrun::SK_PASS, r.v4), &steered(refusal::DENY_RANGE));
}

#[test]
fn the_rejector_answers_only_its_ports_and_only_tcp() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    gk.set_port(587, true);
    gk.set_port(465, true);
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP, 587], LEASE);
    gk.verdict("203.0.113.7", action::DROP, verdict_reason::NO_PTR, u64::MAX);
    let steered = [("rejected-no-ptr", 1), ("rejector-steered", 1)];
    gk.check_reject("203.0.113.7", 587, XDP_PASS, (testrun::SK_PASS, r.v4), &steered);
    // A guarded port the rejector speaks no protocol on (TLS from the
    // first byte): dropped as before.
    gk.check_reject("203.0.113.7", 465, XDP_DROP, NONE, &[]);
    let mut udp = Lookup::tcp("203.0.113.7", DST4, SMTP);
    udp.udp = true;
    let run = testrun::sk_lookup_run(&gk.bpf, programs::SK_REJECTOR, &udp, 1).unwrap();
    assert_eq!((run.retval, run.cookie), NONE, "UDP is never steered");
    assert_eq!(gk.rej_delta(), BTreeMap::new());
}

#[test]
fn without_a_rejector_the_lookup_fails_and_never_reaches_the_mta() {
    let mut gk = Gk::new();
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], LEASE);
    gk.verdict("203.0.113.7", action::DROP, verdict_reason::NO_PTR, u64::MAX);
    gk.check_reject(
        "203.0.113.7",
        SMTP,
        XDP_PASS,
        (testrun::SK_DROP, 0),
        &[("rejected-no-ptr", 1), ("rejector-missing", 1)],
    );
    // Listeners that close leave their slots empty again.
    let r = gk.rejectors();
    gk.check_reject(
        "203.0.113.7",
        SMTP,
        XDP_PASS,
        (testrun::SK_PASS, r.v4),
        &[("rejected-no-ptr", 1), ("rejector-steered", 1)],
    );
    drop(r);
    gk.check_reject(
        "203.0.113.7",
        SMTP,
        XDP_PASS,
        (testrun::SK_DROP, 0),
        &[("rejected-no-ptr", 1), ("rejector-missing", 1)],
    );
}

#[test]
fn a_lapsed_lease_or_a_quiet_source_falls_back_to_drop() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    gk.verdict("203.0.113.7", action::DROP, verdict_reason::NO_PTR, u64::MAX);
    gk.verdict("2001:db8:7::7", action::DROP, verdict_reason::NO_PTR, u64::MAX);
    let now = monotonic_ns();
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], now.saturating_sub(1_000_000_000));
    gk.check_reject(
        "203.0.113.7",
        SMTP,
        XDP_DROP,
        (testrun::SK_PASS, r.v4),
        &[("reject-fallback-drop", 1), ("rejector-steered", 1)],
    );
    gk.expect(&[(drop_reason(verdict_reason::NO_PTR), 1)], "fallback drop");
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], now + 3_600_000_000_000);
    gk.quiet("203.0.113.7", now + 3_600_000_000_000);
    gk.quiet("2001:db8:7::7", now + 3_600_000_000_000);
    let frame = syn("203.0.113.7").build();
    assert_eq!(gk.run(&frame), XDP_DROP, "a quiet source");
    assert_eq!(gk.run(&syn("2001:db8:7::7").build()), XDP_DROP, "a quiet v6 source");
    // Another address of the quiet one's /64 is answered.
    gk.verdict_key(SourceKey::host("2001:db8:7::8".parse().unwrap()), action::DROP, verdict_reason::NO_PTR, u64::MAX);
    assert_eq!(gk.run(&syn("2001:db8:7::8").build()), XDP_PASS, "its neighbour");
    assert_eq!(gk.rej_delta(), BTreeMap::from([("reject-quiet-drop", 2), ("rejected-no-ptr", 1)]));
    gk.quiet("203.0.113.7", now.saturating_sub(1));
    assert_eq!(gk.run(&frame), XDP_PASS, "quiet no more");
    assert_eq!(gk.rej_delta(), BTreeMap::from([("rejected-no-ptr", 1)]));
}

#[test]
fn dry_run_never_steers() {
    let mut gk = Gk::new();
    let _r = gk.rejectors();
    gk.config(0, config_flags::DRY_RUN);
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], LEASE);
    gk.verdict("203.0.113.7", action::DROP, verdict_reason::NO_PTR, u64::MAX);
    gk.check_reject("203.0.113.7", SMTP, XDP_PASS, NONE, &[("dry-run-would-reject", 1)]);
    gk.expect(&[(drop_reason(verdict_reason::NO_PTR), 1), (c(Counter::DryRun), 1)], "dry run");
}

#[test]
fn a_presumed_bad_v6_prefix_is_rejected_per_address() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    gk.config(60_000_000_000, 0);
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], LEASE);
    let net = SourceKey::from_ip("2001:db8:5:6::1".parse().unwrap());
    gk.verdict_key(net, action::PRESUMED_DROP, verdict_reason::NO_PTR, u64::MAX);
    let steered = [("rejected-no-ptr", 1), ("rejector-steered", 1)];
    gk.check_reject("2001:db8:5:6::31", SMTP, XDP_PASS, (testrun::SK_PASS, r.v6), &steered);
    assert_eq!(gk.events().len(), 1, "reported, so a good address can earn its pass");
    gk.verdict_key(SourceKey::host("2001:db8:5:6::32".parse().unwrap()), action::PASS, verdict_reason::OK, u64::MAX);
    gk.check_reject("2001:db8:5:6::33", SMTP, XDP_PASS, (testrun::SK_PASS, r.v6), &steered);
}

#[test]
fn the_syn_budget_bounds_what_reaches_the_rejector() {
    let mut gk = Gk::new();
    let _r = gk.rejectors();
    gk.reject(&[verdict_reason::NO_PTR], &[SMTP], LEASE);
    let mut map: Array<_, RejectConfig> = Array::try_from(gk.bpf.map_mut(maps::REJECT).unwrap()).unwrap();
    let rc = map.get(&0, 0).unwrap();
    // Two SYNs' worth, refilling once an hour.
    let hour = 3_600_000_000_000;
    map.set(
        0,
        RejectConfig { syn_limit: gatekeeper_common::RateLimit { interval_ns: hour, burst_ns: 2 * hour }, ..rc },
        0,
    )
    .unwrap();
    // Each CPU has its own budget: this thread's test runs stay on one.
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
    let mut got = Vec::new();
    for i in 0..4u32 {
        let src = format!("203.0.113.{}", 10 + i);
        gk.verdict(&src, action::DROP, verdict_reason::NO_PTR, u64::MAX);
        got.push(gk.run(&syn(&src).build()));
    }
    assert_eq!(got, [XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP]);
    assert_eq!(gk.rej_delta(), BTreeMap::from([("rejected-no-ptr", 2), ("reject-budget-drop", 2)]));
    gk.expect(&[(drop_reason(verdict_reason::NO_PTR), 4)], "refused, budget or not");
}

// ------------------------------------------------------- inbound limiter

const IMAP: u16 = 143;
/// A token interval that outlasts any test: a source gets exactly `burst`
/// connections.
const HOUR_NS: u64 = 3_600_000_000_000;

impl Gk {
    /// Puts `port` in inbound class `class` (0: not limited).
    fn in_port(&mut self, port: u16, class: u32) {
        let mut ports: Array<_, u32> = Array::try_from(self.bpf.map_mut(maps::IN_PORTS).unwrap()).unwrap();
        ports.set(port as u32, class, 0).unwrap();
    }

    /// Class `class` admits `burst` connections, then one an hour.
    fn in_limit(&mut self, class: u32, burst: u64) {
        let mut limits: Array<_, RateLimit> = Array::try_from(self.bpf.map_mut(maps::IN_LIMITS).unwrap()).unwrap();
        limits.set(class, RateLimit { interval_ns: HOUR_NS, burst_ns: burst * HOUR_NS }, 0).unwrap();
    }

    /// Inbound counters, (class, name) -> total.
    fn in_totals(&self) -> BTreeMap<(u32, &'static str), u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.bpf.map(maps::IN_STATS).unwrap()).unwrap();
        let mut out = BTreeMap::new();
        for (i, v) in stats.iter().enumerate() {
            let total = v.unwrap().iter().sum::<u64>();
            if total > 0 {
                let i = i as u32;
                out.insert((i / IN_COUNTERS, inbound_counter_name(i % IN_COUNTERS)), total);
            }
        }
        out
    }

    /// Runs `frame` `n` times: all must return `ret`; then exactly the
    /// ingress counters `counters` (each moved by `n`) and the inbound
    /// counters `inbound` moved.
    #[track_caller]
    fn check_in(
        &mut self,
        frame: &[u8],
        n: u64,
        ret: u32,
        counters: &[u32],
        inbound: &[(u32, &'static str, u64)],
        what: &str,
    ) {
        let before = self.in_totals();
        for i in 0..n {
            assert_eq!(self.run(frame), ret, "return value of SYN #{} for {what}", i + 1);
        }
        let want: Vec<(u32, u64)> = counters.iter().map(|&c| (c, n)).collect();
        self.expect(&want, what);
        let after = self.in_totals();
        let moved: BTreeMap<(u32, &str), u64> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d != 0).then_some((*k, d))
            })
            .collect();
        let want: BTreeMap<(u32, &str), u64> = inbound.iter().map(|&(c, name, d)| ((c, name), d)).collect();
        assert_eq!(moved, want, "inbound counters after {what}");
    }
}

fn syn_port(src: &str, port: u16) -> Vec<u8> {
    syn_to(src, if src.contains(':') { DST6 } else { DST4 }, port).build()
}

/// The sources of one family for the inbound cases: (allowed, ok verdict,
/// generic pass verdict, unknown, in a deny range, banned, no-ptr drop
/// verdict).
struct InSources {
    allowed: &'static str,
    ok: &'static str,
    generic: &'static str,
    unknown: &'static str,
    denied: &'static str,
    banned: &'static str,
    rdns_drop: &'static str,
}

const IN_V4: InSources = InSources {
    allowed: "192.0.2.10",
    ok: "192.0.2.11",
    generic: "192.0.2.12",
    unknown: "192.0.2.13",
    denied: "198.51.100.14",
    banned: "192.0.2.15",
    rdns_drop: "192.0.2.16",
};
const IN_V6: InSources = InSources {
    allowed: "2001:db8:10::1",
    ok: "2001:db8:11::1",
    generic: "2001:db8:12::1",
    unknown: "2001:db8:13::1",
    denied: "2001:db8:bad:14::1",
    banned: "2001:db8:15::1",
    rdns_drop: "2001:db8:16::1",
};

/// A gate with the inbound sources' ranges and verdicts: allow ranges for
/// `allowed`, deny ranges holding `denied`, and the verdicts.
fn inbound_gate() -> Gk {
    let mut gk = Gk::new();
    let forever = u64::MAX;
    gk.allow("192.0.2.10/32", 1);
    gk.allow("2001:db8:10::/64", 2);
    gk.deny("198.51.100.0/24", 3);
    gk.deny("2001:db8:bad::/48", 4);
    for s in [IN_V4, IN_V6] {
        gk.verdict(s.ok, action::PASS, verdict_reason::OK, forever);
        gk.verdict(s.generic, action::PASS, verdict_reason::GENERIC, forever);
        gk.verdict(s.banned, action::BAN, verdict_reason::MANUAL_BAN, forever);
        gk.verdict(s.rdns_drop, action::DROP, verdict_reason::NO_PTR, forever);
    }
    gk
}

#[test]
fn limited_only_ports_exempt_ban_and_limit_and_ignore_rdns_judgement() {
    for dry in [false, true] {
        let mut gk = inbound_gate();
        gk.config(0, if dry { config_flags::DRY_RUN } else { 0 });
        gk.in_port(IMAP, 1);
        gk.in_limit(1, 3);
        // Over the limit or banned: dropped, or passed and counted in dry-run.
        let (over, dry_row): (u32, &[(u32, &str, u64)]) =
            if dry { (XDP_PASS, &[(1, "dry-run-would-drop", 1)]) } else { (XDP_DROP, &[]) };
        let with = |rows: &[(u32, &'static str, u64)]| -> Vec<(u32, &'static str, u64)> {
            rows.iter().chain(dry_row).copied().collect()
        };
        for s in [IN_V4, IN_V6] {
            let what = |w: &str| format!("{w} to 143 (dry-run {dry})");
            // Exempt: allow range, ok verdict. Never limited, no ingress counter.
            gk.check_in(&syn_port(s.allowed, IMAP), 10, XDP_PASS, &[], &[(1, "exempt", 10)], &what(s.allowed));
            gk.check_in(&syn_port(s.ok, IMAP), 10, XDP_PASS, &[], &[(1, "exempt", 10)], &what(s.ok));
            // Limited: a generic pass verdict, an unknown source, a source in
            // a deny range and one with a reverse-DNS drop verdict: neither
            // deny ranges nor drop verdicts apply on a limited-only port.
            for src in [s.generic, s.unknown, s.denied, s.rdns_drop] {
                gk.check_in(&syn_port(src, IMAP), 3, XDP_PASS, &[], &[(1, "checked", 3)], &what(src));
                gk.check_in(
                    &syn_port(src, IMAP),
                    1,
                    over,
                    &[],
                    &with(&[(1, "checked", 1), (1, "limited", 1)]),
                    &what(src),
                );
            }
            // A ban drops on the limited port.
            gk.check_in(
                &syn_port(s.banned, IMAP),
                2,
                over,
                &[],
                &with(&[(1, "banned", 2)])
                    .iter()
                    .map(|&(c, n, d)| (c, n, if n == "dry-run-would-drop" { 2 } else { d }))
                    .collect::<Vec<_>>(),
                &what(s.banned),
            );
            // Unknown sources of limited-only ports are not reported.
            assert!(gk.events().is_empty(), "{}", what("events"));
        }
    }
}

#[test]
fn guarded_and_limited_ports_limit_only_what_would_pass() {
    let mut gk = inbound_gate();
    gk.in_port(SMTP, 2);
    gk.in_limit(2, 2);
    for s in [IN_V4, IN_V6] {
        let what = |w: &str| format!("{w} to 25");
        // Allowed and `ok`: the guard's counters only, no limiter.
        gk.check_in(&syn_port(s.allowed, SMTP), 5, XDP_PASS, &[c(Counter::Allowed)], &[], &what(s.allowed));
        gk.check_in(&syn_port(s.ok, SMTP), 5, XDP_PASS, &[c(Counter::VerdictPass)], &[], &what(s.ok));
        // Another pass verdict: counted as a pass, then limited.
        gk.check_in(
            &syn_port(s.generic, SMTP),
            2,
            XDP_PASS,
            &[c(Counter::VerdictPass)],
            &[(2, "checked", 2)],
            &what(s.generic),
        );
        gk.check_in(
            &syn_port(s.generic, SMTP),
            1,
            XDP_DROP,
            &[c(Counter::VerdictPass)],
            &[(2, "checked", 1), (2, "limited", 1)],
            &what(s.generic),
        );
        // Unknown: reported and counted as unknown, then limited.
        gk.check_in(
            &syn_port(s.unknown, SMTP),
            2,
            XDP_PASS,
            &[c(Counter::Unknown)],
            &[(2, "checked", 2)],
            &what(s.unknown),
        );
        gk.check_in(
            &syn_port(s.unknown, SMTP),
            1,
            XDP_DROP,
            &[c(Counter::Unknown)],
            &[(2, "checked", 1), (2, "limited", 1)],
            &what(s.unknown),
        );
        // (Event interval 0: every SYN is reported, limited or not.)
        assert_eq!(gk.events().len(), 3, "{}", what("reports"));
        // Refusals as before; the limiter never sees them.
        gk.check_in(&syn_port(s.denied, SMTP), 3, XDP_DROP, &[c(Counter::DenyRange)], &[], &what(s.denied));
        gk.check_in(
            &syn_port(s.rdns_drop, SMTP),
            3,
            XDP_DROP,
            &[drop_reason(verdict_reason::NO_PTR)],
            &[],
            &what(s.rdns_drop),
        );
        // A ban refuses as manual-ban.
        gk.check_in(
            &syn_port(s.banned, SMTP),
            3,
            XDP_DROP,
            &[drop_reason(verdict_reason::MANUAL_BAN)],
            &[],
            &what(s.banned),
        );
    }
    // Dry-run: over the limit passes, counted.
    gk.config(0, config_flags::DRY_RUN);
    gk.check_in(
        &syn_port(IN_V4.generic, SMTP),
        1,
        XDP_PASS,
        &[c(Counter::VerdictPass)],
        &[(2, "checked", 1), (2, "limited", 1), (2, "dry-run-would-drop", 1)],
        "dry-run over the limit",
    );
}

#[test]
fn unguarded_unlimited_ports_pass_everyone_uncounted() {
    let mut gk = inbound_gate();
    gk.in_port(IMAP, 1);
    gk.in_limit(1, 1);
    for s in [IN_V4, IN_V6] {
        for src in [s.allowed, s.ok, s.generic, s.unknown, s.denied, s.banned, s.rdns_drop] {
            gk.check_in(&syn_port(src, 8080), 3, XDP_PASS, &[], &[], &format!("{src} to 8080"));
        }
    }
    // A class without a limit (interval 0) passes and counts nothing.
    gk.in_port(993, 3);
    gk.check_in(&syn_port(IN_V4.unknown, 993), 3, XDP_PASS, &[], &[], "class without a limit");
    // Taking the port out of its class ends its limit.
    gk.check_in(&syn_port(IN_V4.unknown, IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "first");
    gk.check_in(&syn_port(IN_V4.unknown, IMAP), 1, XDP_DROP, &[], &[(1, "checked", 1), (1, "limited", 1)], "second");
    gk.in_port(IMAP, 0);
    gk.check_in(&syn_port(IN_V4.unknown, IMAP), 2, XDP_PASS, &[], &[], "no class");
}

#[test]
fn limits_are_per_source_prefix_and_class() {
    let mut gk = Gk::new();
    gk.in_port(IMAP, 1);
    gk.in_port(110, 2);
    gk.in_limit(1, 1);
    gk.in_limit(2, 1);
    gk.check_in(&syn_port("2001:db8:5:6::1", IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "first of the /64");
    // Another address of the same /64 shares its bucket; another /64 not.
    gk.check_in(
        &syn_port("2001:db8:5:6::2", IMAP),
        1,
        XDP_DROP,
        &[],
        &[(1, "checked", 1), (1, "limited", 1)],
        "same /64",
    );
    gk.check_in(&syn_port("2001:db8:5:7::1", IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "next /64");
    // Another class is another bucket.
    gk.check_in(&syn_port("2001:db8:5:6::1", 110), 1, XDP_PASS, &[], &[(2, "checked", 1)], "other class");
    gk.check_in(&syn_port("192.0.2.1", IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "v4");
    gk.check_in(&syn_port("192.0.2.2", IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "v4 neighbour");
}

#[test]
fn a_full_bucket_gives_its_oldest_slot_to_a_newcomer() {
    let mut gk = Gk::new();
    gk.in_port(IMAP, 1);
    gk.in_limit(1, 1);
    // Five /64s whose (key, class 1) share a bucket under the test secret.
    let mut by_bucket: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut five = None;
    for i in 0..2_000_000u32 {
        let src = format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff);
        let IpAddr::V6(a) = src.parse::<IpAddr>().unwrap() else { unreachable!() };
        let b = inbound::in_bucket(&KeyWords::v6(&a.octets()), 1, &testrun::HASH);
        let v = by_bucket.entry(b).or_default();
        v.push(src);
        if v.len() == inbound::IN_WAYS + 1 {
            five = Some(v.clone());
            break;
        }
    }
    let five = five.expect("five sources in one bucket");
    for src in &five[..4] {
        gk.check_in(&syn_port(src, IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], src);
    }
    // The four are at their limit.
    gk.check_in(&syn_port(&five[3], IMAP), 1, XDP_DROP, &[], &[(1, "checked", 1), (1, "limited", 1)], "fourth again");
    // The fifth takes the slot of the first (the lowest arrival time) ...
    gk.check_in(&syn_port(&five[4], IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "fifth");
    gk.check_in(&syn_port(&five[4], IMAP), 1, XDP_DROP, &[], &[(1, "checked", 1), (1, "limited", 1)], "fifth again");
    // ... so the first starts over with a fresh burst, and the others are
    // still held.
    gk.check_in(&syn_port(&five[0], IMAP), 1, XDP_PASS, &[], &[(1, "checked", 1)], "first after eviction");
    gk.check_in(&syn_port(&five[2], IMAP), 1, XDP_DROP, &[], &[(1, "checked", 1), (1, "limited", 1)], "third");
}

#[test]
fn a_ban_is_a_manual_ban_refusal_for_the_rejector() {
    let mut gk = Gk::new();
    let r = gk.rejectors();
    // Drop by default: XDP drops a ban, the rejector leaves it alone.
    gk.verdict("192.0.2.77", action::BAN, verdict_reason::MANUAL_BAN, u64::MAX);
    gk.check_reject("192.0.2.77", SMTP, XDP_DROP, NONE, &[]);
    gk.expect(&[(drop_reason(verdict_reason::MANUAL_BAN), 1)], "ban dropped");
    // With manual-ban's action reject, both judge it a manual-ban refusal.
    gk.reject(&[verdict_reason::MANUAL_BAN], &[SMTP], LEASE);
    let counted = reject::reject_counter_name(reject::RejectCounter::to_rejector(verdict_reason::MANUAL_BAN));
    gk.check_reject("192.0.2.77", SMTP, XDP_PASS, (testrun::SK_PASS, r.v4), &[(counted, 1), ("rejector-steered", 1)]);
    gk.expect(&[(drop_reason(verdict_reason::MANUAL_BAN), 1)], "ban rejected");
}
