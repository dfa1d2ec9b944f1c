//! In-kernel unit tests of the egress gate through BPF_PROG_TEST_RUN.
//!
//! Every test loads its own, unpinned instance of the object and runs
//! hand-built frames through both egress programs: `gatekeeper_subscriber`
//! (XDP, a subscriber-facing interface's ingress) and `gatekeeper_egress`
//! (TC, an uplink's egress). Both share the maps, so the same fixture drives
//! both; the tests assert the return value, the exact set of egress counters
//! that moved (and by how much), range hits, token buckets and, for rejected
//! SYNs, the RST|ACK the program wrote (checked with an independent
//! ones'-complement implementation, not the packet builder's).
//!
//! The XDP runs claim the loopback as their ingress interface (`xdp_md`
//! context); the TC runs have no context, so the kernel's test skb sits on
//! the loopback as well. Both count under the loopback's interface slot.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN): `cargo xtask test` runs it as root.
//! Without root every test fails with a message saying so.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::ProgramError,
    Ebpf,
};
use gatekeeper::domain::{PoolAction, RangeKind};
use gatekeeper_common::{
    addr, config_flags, counters::egress_counter_name, maps, port_policy, stat_index, Config, EgressCounter, LimitKey,
    RateLimit, EG_PORT_ENTRIES, MAX_IPV6_EXT_HEADERS, STAT_STRIDE,
};
use gatekeeper_tests::model::{self, mutate, Gate, Model, Mutation, Parse, Range};
use gatekeeper_tests::packet::{
    ethertype, hex, ipproto, mss_option, ppp, syn_to, tcp_flags, v4, v6, ExtHeader, Ip, Packet, L4, VLAN_STACKS,
};
use gatekeeper_tests::ranges::AgentRanges;
use gatekeeper_tests::rng::Rng;
use gatekeeper_tests::testrun::{
    self, loopback, monotonic_ns, range_hits, skb_refuses, stat_totals, test_run, Hook, Outcome, XDP_ABORTED,
};

const SMTP: u16 = 25;
const SUBMISSION: u16 = 587;
const SUBMISSIONS: u16 = 465;
/// A long GCRA interval: no token comes back during a test.
const HOUR_NS: u64 = 3_600_000_000_000;

// The address plan (TEST-NETs only).
/// Pool (drop) 198.51.100.0/24, id 10; 2001:db8:100::/48, id 11.
const POOL4: &str = "198.51.100.0/24";
const POOL6: &str = "2001:db8:100::/48";
/// Pool (reject) 203.0.113.0/25, id 12; 2001:db8:200::/48, id 13.
const REJECT4: &str = "203.0.113.0/25";
const REJECT6: &str = "2001:db8:200::/48";
/// Smarthosts 192.0.2.25/32, id 20; 2001:db8:25::25/128, id 21.
const SMARTHOST4: &str = "192.0.2.25";
const SMARTHOST6: &str = "2001:db8:25::25";
/// Exempt inside the drop pools: 198.51.100.25/32, id 30; 2001:db8:100:25::/64, id 31.
const EXEMPT4: &str = "198.51.100.25/32";
const EXEMPT6: &str = "2001:db8:100:25::/64";
/// Mail servers that are not smarthosts.
const MX4: &str = "192.0.2.80";
const MX6: &str = "2001:db8:80::80";
/// Sources in no subscriber range.
const OUTSIDE4: &str = "203.0.113.200";
const OUTSIDE6: &str = "2001:db8:900::1";

/// Both egress programs: `gatekeeper_subscriber` (XDP) and
/// `gatekeeper_egress` (TC).
const PROGS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

// ---------------------------------------------------------------- fixture

/// One loaded, unpinned gatekeeper instance with both egress programs.
struct Gk {
    bpf: Ebpf,
    /// The loopback: where both programs' test runs happen.
    ifindex: u32,
    /// Counter totals (slot -> total) on `ifindex` at the last [`Gk::delta`].
    seen: BTreeMap<u32, u64>,
    /// The ranges as the agent's database would hold them.
    ranges: AgentRanges,
}

impl Gk {
    /// Loads the object with a small verdict table and token-bucket LRU; port 25 guarded,
    /// no limits, no ranges.
    fn new() -> Self {
        testrun::require_root("egress_decisions");
        let mut bpf = testrun::load(
            64,
            |l| {
                l.map_max_entries(maps::EG_BUCKETS, 4096);
            },
            &[Hook::Xdp.egress_program(), Hook::Tc.egress_program()],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let ranges = AgentRanges::take(&mut bpf);
        let mut gk = Gk { bpf, ifindex: loopback(), seen: BTreeMap::new(), ranges };
        gk.policy(SMTP, true, 0);
        gk
    }

    /// The standard address plan: drop and reject pools, exempt entries
    /// inside the drop pools, smarthosts.
    fn standard() -> Self {
        let mut gk = Gk::new();
        gk.pool(POOL4, 10);
        gk.pool(POOL6, 11);
        gk.reject_pool(REJECT4, 12);
        gk.reject_pool(REJECT6, 13);
        gk.smarthost(&format!("{SMARTHOST4}/32"), 20);
        gk.smarthost(&format!("{SMARTHOST6}/128"), 21);
        gk.exempt(EXEMPT4, 30);
        gk.exempt(EXEMPT6, 31);
        gk
    }

    /// Runs `frame` once through `prog`; returns the return value and the
    /// frame as the program left it.
    fn run(&self, prog: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, frame)
            .unwrap_or_else(|e| panic!("{prog:?} test run of {} bytes: {e:?}: {}", frame.len(), hex(frame)))
    }

    fn try_run(&self, prog: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = test_run(&self.bpf, prog.egress_program(), frame, Some(self.ifindex), 1, Some(&mut out))?;
        assert_ne!((prog, r.return_value), (Hook::Xdp, XDP_ABORTED), "XDP_ABORTED for {}", hex(frame));
        assert!(
            prog.outcome(r.return_value).is_some(),
            "{prog:?} returned {} for {}",
            r.return_value as i32,
            hex(frame)
        );
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Runs a frame that may be too short for the kernel's test skb (see
    /// [`skb_refuses`]): `None` when the TC test run refused it.
    fn run_maybe_short(&self, prog: Hook, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        if prog == Hook::Tc && skb_refuses(frame) {
            self.assert_skb_refuses(frame);
            return None;
        }
        Some(self.run(prog, frame))
    }

    #[track_caller]
    fn assert_skb_refuses(&self, frame: &[u8]) {
        match self.try_run(Hook::Tc, frame) {
            Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
            other => panic!("expected the skb test run to refuse {}: {other:?}", hex(frame)),
        }
    }

    // ------------------------------------------------------------ policy

    fn set_policy_word(&mut self, port: u16, word: u32) {
        let mut ports: Array<_, u32> = Array::try_from(self.bpf.map_mut(maps::EG_PORTS).unwrap()).unwrap();
        ports.set(u32::from(port), word, 0).unwrap();
    }

    /// The policy of `port`: guarded from pools, rate-limit class.
    fn policy(&mut self, port: u16, guard: bool, class: u32) {
        self.set_policy_word(port, port_policy::word(guard, class));
    }

    fn guard_all_ports(&mut self) {
        let mut ports: Array<_, u32> = Array::try_from(self.bpf.map_mut(maps::EG_PORTS).unwrap()).unwrap();
        for p in 0..EG_PORT_ENTRIES {
            ports.set(p, port_policy::GUARD, 0).unwrap();
        }
    }

    /// Rate-limit class `class`: a burst of `burst`, then one per `interval_ns`.
    fn limit(&mut self, class: u32, interval_ns: u64, burst: u64) {
        let mut limits: Array<_, RateLimit> = Array::try_from(self.bpf.map_mut(maps::EG_LIMITS).unwrap()).unwrap();
        limits.set(class, RateLimit { interval_ns, burst_ns: burst * interval_ns }, 0).unwrap();
    }

    fn dry_run(&mut self, on: bool) {
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap()).unwrap();
        let flags = if on { config_flags::DRY_RUN } else { 0 };
        cfg.set(0, Config { flags, ..Config::default() }, 0).unwrap();
    }

    /// Token buckets: (source key, class) -> GCRA arrival time.
    fn buckets(&self) -> Vec<(LimitKey, u64)> {
        let b: HashMap<_, LimitKey, u64> = HashMap::try_from(self.bpf.map(maps::EG_BUCKETS).unwrap()).unwrap();
        let mut v: Vec<_> = b.iter().map(|r| r.unwrap()).collect();
        v.sort_by_key(|(k, _)| (k.addr, k.class));
        v
    }

    // ------------------------------------------------------------ ranges

    fn range(&mut self, kind: RangeKind, net: &str, id: u32, action: Option<PoolAction>) {
        self.ranges.add(kind, net, id, action);
    }

    fn pool(&mut self, net: &str, id: u32) {
        self.range(RangeKind::Pool, net, id, Some(PoolAction::Drop));
    }

    fn reject_pool(&mut self, net: &str, id: u32) {
        self.range(RangeKind::Pool, net, id, Some(PoolAction::Reject));
    }

    fn exempt(&mut self, net: &str, id: u32) {
        self.range(RangeKind::Exempt, net, id, None);
    }

    fn smarthost(&mut self, net: &str, id: u32) {
        self.range(RangeKind::Smarthost, net, id, None);
    }

    fn unrange(&mut self, kind: RangeKind, net: &str) {
        self.ranges.remove(kind, net);
    }

    fn range_hits(&self, range_id: u32) -> u64 {
        range_hits(&self.bpf, range_id)
    }

    fn hits(&self, ids: &[u32]) -> Vec<u64> {
        ids.iter().map(|&id| self.range_hits(id)).collect()
    }

    // ------------------------------------------------------------ counters

    /// The egress counters of the loopback's slot, summed over CPUs.
    fn counters(&self) -> BTreeMap<u32, u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.bpf.map(maps::EG_STATS).unwrap()).unwrap();
        (0..STAT_STRIDE)
            .map(|slot| (slot, stats.get(&stat_index(self.ifindex, slot), 0).unwrap().iter().sum::<u64>()))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Counters that moved since the last call, by name.
    /// Every truncation of `full` (past the Ethernet addresses) passes
    /// unchanged, and the parser either gives up, counted as
    /// `parse-skipped`, or stops before it knows enough to count anything
    /// (an Ethernet header only); at least one is counted.
    fn truncations_pass(&mut self, prog: Hook, name: &str, full: &[u8]) {
        let mut skipped = 0;
        for len in 14..full.len() {
            let Some((ret, out)) = self.run_maybe_short(prog, &full[..len]) else { continue };
            assert_eq!(prog.outcome(ret), Some(Outcome::Pass), "{prog:?}: {name} truncated to {len} of {}", full.len());
            assert_eq!(out, &full[..len], "{prog:?}: {name} truncated to {len}: rewritten");
            let d = self.delta();
            assert!(
                d.is_empty() || d == BTreeMap::from([("parse-skipped", 1)]),
                "{prog:?}: {name} truncated to {len}: {d:?}"
            );
            skipped += d.len();
        }
        assert!(skipped > 0, "{prog:?}: {name}: truncations are counted as parse-skipped");
    }

    fn delta(&mut self) -> BTreeMap<&'static str, u64> {
        let now = self.counters();
        let mut out = BTreeMap::new();
        for (k, v) in &now {
            let d = v - self.seen.get(k).copied().unwrap_or(0);
            if d != 0 {
                out.insert(egress_counter_name(*k), d);
            }
        }
        self.seen = now;
        out
    }

    /// Asserts that exactly `expected` counters moved since the last check.
    #[track_caller]
    fn expect(&mut self, expected: &[(EgressCounter, u64)], what: &str) {
        let want: BTreeMap<_, _> = expected.iter().map(|&(c, n)| (egress_counter_name(c as u32), n)).collect();
        assert_eq!(self.delta(), want, "counters after {what}");
    }

    /// Runs `frame` through `prog`, asserts the outcome and the counters
    /// that moved; returns the frame as the program left it.
    #[track_caller]
    fn check(
        &mut self,
        prog: Hook,
        frame: &[u8],
        want: Outcome,
        counters: &[(EgressCounter, u64)],
        what: &str,
    ) -> Vec<u8> {
        let (ret, out) = self.run(prog, frame);
        assert_eq!(prog.outcome(ret), Some(want), "{prog:?}: outcome of {what} (returned {})", ret as i32);
        self.expect(counters, &format!("{prog:?}: {what}"));
        if want != Outcome::Reject {
            assert_eq!(hex(&out), hex(frame), "{prog:?}: {what}: a frame that is not rejected is not rewritten");
        }
        out
    }

    /// Every egress counter anywhere moved only in the loopback's slot, and
    /// the ingress gate's counters never moved.
    #[track_caller]
    fn done(&self) {
        let per_slot = |name: &str| stat_totals(&self.bpf, name).unwrap();
        let eg = per_slot(maps::EG_STATS);
        let slot = self.ifindex % gatekeeper_common::STAT_IF_SLOTS;
        assert!(eg.keys().all(|k| k.ifindex == slot), "egress counters outside slot {slot}: {eg:?}");
        assert!(per_slot(maps::STATS).is_empty(), "the egress programs moved ingress counters");
    }
}

/// A SYN from `src` to a mail server that is not a smarthost, port 25.
fn syn(src: &str) -> Packet {
    syn_to(src, if src.contains(':') { MX6 } else { MX4 }, SMTP)
}

/// The same segment with other flags.
fn segment(src: &str, flags: u8) -> Packet {
    let mut p = syn(src);
    if let L4::Tcp { flags: f, ack, .. } = &mut p.l4 {
        *f = flags;
        *ack = if flags & tcp_flags::ACK != 0 { 0x0200_0000 } else { 0 };
    }
    p
}

fn with_seq(mut p: Packet, seq: u32) -> Packet {
    if let L4::Tcp { seq: s, .. } = &mut p.l4 {
        *s = seq;
    }
    p
}

fn with_ports(mut p: Packet, sport: u16, dport: u16) -> Packet {
    if let L4::Tcp { src_port, dst_port, .. } = &mut p.l4 {
        (*src_port, *dst_port) = (sport, dport);
    }
    p
}

fn without_options(mut p: Packet) -> Packet {
    if let L4::Tcp { options, .. } = &mut p.l4 {
        options.clear();
    }
    p
}

fn with_ttl(mut p: Packet, hops: u8) -> Packet {
    match &mut p.ip {
        Ip::V4 { ttl, .. } => *ttl = hops,
        Ip::V6 { hop_limit, .. } => *hop_limit = hops,
    }
    p
}

use EgressCounter::{
    DryRun, Exempt, ParseSkipped, PoolBlocked, PoolExtChain, PoolFragment, PoolRejected, RateLimited, SmarthostAllowed,
};

// ---------------------------------------------------------------- checksums

/// The RFC 1071 ones'-complement sum of `bytes` (an odd last byte padded
/// with zero), folded to 16 bits. Written here rather than taken from the
/// packet builder so the datapath's checksums are checked independently.
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    for pair in bytes.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u64::from);
        acc += hi | lo;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A header (or header plus pseudo-header) whose checksum field is right
/// sums to 0xffff.
fn sums_to_ffff(bytes: &[u8]) -> bool {
    ones_sum(bytes) == 0xffff
}

/// Where the IP header starts and which family: walks the VLAN tags.
fn l3_of(frame: &[u8]) -> (usize, u16) {
    let mut off = 12;
    loop {
        let et = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if et != ethertype::VLAN && et != ethertype::QINQ {
            return (off + 2, et);
        }
        off += 4;
    }
}

/// The IPv4 header checksum is right.
fn ipv4_header_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    sums_to_ffff(&frame[l3..l3 + ihl])
}

/// The TCP checksum over the pseudo-header is right. The segment length is
/// what the IP header says (Ethernet padding is not part of it).
fn tcp_checksum_ok(frame: &[u8], l3: usize, l4: usize, v6: bool) -> bool {
    let mut buf = Vec::new();
    let end = if v6 {
        buf.extend_from_slice(&frame[l3 + 8..l3 + 40]);
        let len = usize::from(u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]])) - (l4 - l3 - 40);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, ipproto::TCP]);
        l4 + len
    } else {
        buf.extend_from_slice(&frame[l3 + 12..l3 + 20]);
        let total = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
        let len = total - (l4 - l3);
        buf.extend_from_slice(&[0, ipproto::TCP]);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
        l4 + len
    };
    buf.extend_from_slice(&frame[l4..end]);
    sums_to_ffff(&buf)
}

#[test]
fn own_checksum_agrees_with_known_values() {
    // RFC 1071's example words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert_eq!(ones_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    // A well-known IPv4 header (checksum b861) and one bit off.
    let mut hdr = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];
    assert!(sums_to_ffff(&hdr));
    hdr[19] ^= 1;
    assert!(!sums_to_ffff(&hdr));
    // Odd length pads with a zero byte.
    assert_eq!(ones_sum(&[0x12]), 0x1200);
    // The builder's SYNs check out under this implementation.
    for p in [syn("198.51.100.7"), syn("2001:db8:100::7")] {
        let f = p.build();
        let (l3, et) = l3_of(&f);
        let v6 = et == ethertype::IPV6;
        if !v6 {
            assert!(ipv4_header_ok(&f, l3));
        }
        assert!(tcp_checksum_ok(&f, l3, l3 + if v6 { 40 } else { 20 }, v6));
    }
}

/// Asserts that `out` is the RST|ACK answering the SYN `syn` as `prog`
/// writes it: MACs, addresses and ports swapped, seq 0, ack = seq + 1,
/// flags RST|ACK, window and urgent pointer 0, options turned into NOPs,
/// TTL/hop limit 64 (XDP) or as it was (TC), checksums right, nothing else
/// changed.
#[track_caller]
fn assert_rst(prog: Hook, syn: &[u8], out: &[u8], what: &str) {
    let ctx = format!("{prog:?}: {what}\n  syn {}\n  out {}", hex(syn), hex(out));
    assert_eq!(out.len(), syn.len(), "{ctx}: length");
    assert_eq!(&out[0..6], &syn[6..12], "{ctx}: destination MAC");
    assert_eq!(&out[6..12], &syn[0..6], "{ctx}: source MAC");
    let (l3, et) = l3_of(syn);
    assert_eq!(&out[12..l3], &syn[12..l3], "{ctx}: VLAN tags and ethertype");
    let v6 = et == ethertype::IPV6;
    let l4 = if v6 {
        assert_eq!(&out[l3..l3 + 7], &syn[l3..l3 + 7], "{ctx}: version, flow, payload length, next header");
        let hops = if prog == Hook::Xdp { 64 } else { syn[l3 + 7] };
        assert_eq!(out[l3 + 7], hops, "{ctx}: hop limit");
        assert_eq!(&out[l3 + 8..l3 + 24], &syn[l3 + 24..l3 + 40], "{ctx}: source = SYN's destination");
        assert_eq!(&out[l3 + 24..l3 + 40], &syn[l3 + 8..l3 + 24], "{ctx}: destination = SYN's source");
        l3 + 40
    } else {
        assert_eq!(&out[l3..l3 + 8], &syn[l3..l3 + 8], "{ctx}: version, IHL, length, id, fragment");
        let ttl = if prog == Hook::Xdp { 64 } else { syn[l3 + 8] };
        assert_eq!(out[l3 + 8], ttl, "{ctx}: TTL");
        assert_eq!(out[l3 + 9], ipproto::TCP, "{ctx}: protocol");
        assert_eq!(&out[l3 + 12..l3 + 16], &syn[l3 + 16..l3 + 20], "{ctx}: source = SYN's destination");
        assert_eq!(&out[l3 + 16..l3 + 20], &syn[l3 + 12..l3 + 16], "{ctx}: destination = SYN's source");
        assert!(ipv4_header_ok(out, l3), "{ctx}: IPv4 header checksum");
        l3 + 20
    };
    let t = &out[l4..];
    let s = &syn[l4..];
    assert_eq!(&t[0..2], &s[2..4], "{ctx}: source port = SYN's destination port");
    assert_eq!(&t[2..4], &s[0..2], "{ctx}: destination port = SYN's source port");
    assert_eq!(&t[4..8], &[0, 0, 0, 0], "{ctx}: sequence number");
    let ack = u32::from_be_bytes([s[4], s[5], s[6], s[7]]).wrapping_add(1);
    assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), ack, "{ctx}: ack = SYN's seq + 1");
    assert_eq!(t[12] >> 4, s[12] >> 4, "{ctx}: data offset");
    assert_eq!(t[13], tcp_flags::RST | tcp_flags::ACK, "{ctx}: flags");
    assert_eq!(&t[14..16], &[0, 0], "{ctx}: window");
    assert_eq!(&t[18..20], &[0, 0], "{ctx}: urgent pointer");
    let doff = usize::from(s[12] >> 4) * 4;
    assert!(t[20..doff].iter().all(|&b| b == 1), "{ctx}: options are NOPs");
    assert_eq!(&out[l4 + doff..], &syn[l4 + doff..], "{ctx}: bytes after the TCP header");
    assert!(tcp_checksum_ok(out, l3, l4, v6), "{ctx}: TCP checksum");
}

// ---------------------------------------------------------------- tests

#[test]
fn rst_checker_refuses_broken_answers() {
    let gk = Gk::standard();
    for src in ["203.0.113.7", "2001:db8:200::7"] {
        let syn = syn(src).build();
        for prog in PROGS {
            let (ret, out) = gk.run(prog, &syn);
            assert_eq!(prog.outcome(ret), Some(Outcome::Reject));
            assert_rst(prog, &syn, &out, "as written");
            let (l3, et) = l3_of(&syn);
            let l4 = l3 + if et == ethertype::IPV6 { 40 } else { 20 };
            // Each byte a wrong answer would get wrong: a MAC, the TTL or
            // hop limit, an address, a port, seq, ack, flags, window, an
            // option byte, the TCP checksum, and (IPv4) the header checksum.
            let ttl = if et == ethertype::IPV6 { l3 + 7 } else { l3 + 8 };
            let mut spots = vec![0, 11, ttl, l3 + 12, l4, l4 + 3, l4 + 7, l4 + 11, l4 + 13, l4 + 14, l4 + 21, l4 + 16];
            if et == ethertype::IPV4 {
                spots.push(l3 + 10);
            }
            for at in spots {
                let mut bad = out.clone();
                bad[at] ^= 0x40;
                let r = std::panic::catch_unwind(|| assert_rst(prog, &syn, &bad, "broken"));
                assert!(r.is_err(), "{prog:?} {src}: byte {at} flipped went unnoticed");
            }
        }
    }
}

#[test]
fn both_programs_count_under_the_loopback() {
    let mut gk = Gk::standard();
    assert_eq!(gk.ifindex, loopback());
    for prog in PROGS {
        gk.check(prog, &syn("198.51.100.7").build(), Outcome::Drop, &[(PoolBlocked, 1)], "pool SYN");
    }
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(gk.bpf.map(maps::EG_STATS).unwrap()).unwrap();
    let at = stats.get(&stat_index(loopback(), PoolBlocked as u32), 0).unwrap().iter().sum::<u64>();
    assert_eq!(at, 2, "one pool-blocked per program under lo's slot");
    gk.done();
}

#[test]
fn pool_to_a_guarded_port_is_dropped() {
    let mut gk = Gk::standard();
    for prog in PROGS {
        for (src, id) in [
            ("198.51.100.7", 10),
            ("198.51.100.0", 10),
            ("198.51.100.255", 10),
            ("2001:db8:100::7", 11),
            ("2001:db8:100:ffff:ffff:ffff:ffff:ffff", 11),
        ] {
            let before = gk.range_hits(id);
            let frame = syn(src).build();
            gk.check(prog, &frame, Outcome::Drop, &[(PoolBlocked, 1)], &format!("pool {src} -> 25"));
            assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: pool {id} hit by {src}");
        }
        // The neighbours just outside the pools are no subscribers.
        for src in ["198.51.99.255", "198.51.101.0", "2001:db8:101::1", "2001:db8:ff:ffff::1"] {
            gk.check(prog, &syn(src).build(), Outcome::Pass, &[], &format!("{src} outside the pools"));
        }
    }
    assert_eq!(gk.hits(&[10, 11, 20, 21, 30, 31]), [6, 4, 0, 0, 0, 0]);
    gk.done();
}

#[test]
fn pool_to_a_smarthost_passes() {
    let mut gk = Gk::standard();
    gk.smarthost("192.0.2.128/25", 22);
    for prog in PROGS {
        for (src, dst, smh) in [
            ("198.51.100.7", SMARTHOST4, 20),
            ("198.51.100.7", "192.0.2.200", 22),
            ("203.0.113.7", SMARTHOST4, 20), // a reject pool too
            ("2001:db8:100::7", SMARTHOST6, 21),
            ("2001:db8:200::7", SMARTHOST6, 21),
        ] {
            let pool = if src.contains(':') { [11, 13] } else { [10, 12] };
            let before = (gk.range_hits(smh), gk.hits(&pool));
            let frame = syn_to(src, dst, SMTP).build();
            gk.check(prog, &frame, Outcome::Pass, &[(SmarthostAllowed, 1)], &format!("{src} -> smarthost {dst}"));
            assert_eq!((gk.range_hits(smh), gk.hits(&pool)), (before.0 + 1, before.1), "{prog:?}: hits {src} -> {dst}");
        }
        // Next to a smarthost is not a smarthost.
        for (src, dst) in
            [("198.51.100.7", "192.0.2.24"), ("198.51.100.7", "192.0.2.26"), ("2001:db8:100::7", "2001:db8:25::26")]
        {
            gk.check(
                prog,
                &syn_to(src, dst, SMTP).build(),
                Outcome::Drop,
                &[(PoolBlocked, 1)],
                &format!("{src} -> {dst}"),
            );
        }
    }
    // The smarthost table answers for destinations only: a smarthost
    // address as a source is no subscriber.
    for prog in PROGS {
        gk.check(prog, &syn_to(SMARTHOST4, MX4, SMTP).build(), Outcome::Pass, &[], "smarthost as a source");
    }
    gk.done();
}

#[test]
fn exempt_sources_inside_pools_pass() {
    let mut gk = Gk::standard();
    // An exempt range covering a whole pool: the pool entry is left out.
    gk.pool("192.0.2.64/28", 40);
    gk.exempt("192.0.2.64/26", 41);
    // The same net as pool and exempt: exempt wins.
    gk.pool("2001:db8:300::/48", 42);
    gk.exempt("2001:db8:300::/48", 43);
    for prog in PROGS {
        for (src, id) in [
            ("198.51.100.25", 30),
            ("192.0.2.65", 41),
            ("192.0.2.127", 41),
            ("2001:db8:100:25::1", 31),
            ("2001:db8:100:25:ffff::1", 31),
            ("2001:db8:300:1::1", 43),
        ] {
            let before = gk.range_hits(id);
            gk.check(prog, &syn(src).build(), Outcome::Pass, &[(Exempt, 1)], &format!("exempt {src}"));
            assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: exempt {id} hit by {src}");
        }
        // Their neighbours in the pool are blocked.
        for src in ["198.51.100.24", "198.51.100.26", "2001:db8:100:24::1", "2001:db8:100:26::1"] {
            gk.check(prog, &syn(src).build(), Outcome::Drop, &[(PoolBlocked, 1)], &format!("pool {src}"));
        }
        // Exempt to an unguarded port: nothing to count.
        gk.check(prog, &syn_to("198.51.100.25", MX4, 80).build(), Outcome::Pass, &[], "exempt -> 80");
    }
    assert_eq!(gk.hits(&[40, 42]), [0, 0], "covered pools are not in the table");
    // Removing the exempt entry exposes the pool again.
    gk.unrange(RangeKind::Exempt, "192.0.2.64/26");
    gk.unrange(RangeKind::Exempt, EXEMPT6);
    for prog in PROGS {
        gk.check(prog, &syn("192.0.2.65").build(), Outcome::Drop, &[(PoolBlocked, 1)], "pool after unexempt");
        gk.check(prog, &syn("2001:db8:100:25::1").build(), Outcome::Drop, &[(PoolBlocked, 1)], "v6 after unexempt");
    }
    assert_eq!(gk.hits(&[40, 11]), [2, 6]);
    gk.done();
}

#[test]
fn non_subscriber_sources_pass_uncounted() {
    let mut gk = Gk::standard();
    // Ingress ranges are another table: they mean nothing here.
    gk.range(RangeKind::Deny, "0.0.0.0/0", 50, None);
    gk.range(RangeKind::Allow, "203.0.113.128/25", 51, None);
    gk.range(RangeKind::Deny, "::/0", 52, None);
    gk.policy(SMTP, true, 1);
    gk.policy(SUBMISSION, false, 1);
    gk.limit(1, HOUR_NS, 1);
    for prog in PROGS {
        for src in [OUTSIDE4, "192.0.2.1", SMARTHOST4, OUTSIDE6, "2001:db8:101::1", "2001:db8:ff:ffff::1"] {
            for port in [SMTP, SUBMISSION] {
                let frame = syn_to(src, if src.contains(':') { MX6 } else { MX4 }, port).build();
                for i in 0..5 {
                    gk.check(prog, &frame, Outcome::Pass, &[], &format!("outsider {src} -> {port} #{i}"));
                }
            }
        }
    }
    assert!(gk.buckets().is_empty(), "outsiders got buckets: {:?}", gk.buckets());
    assert_eq!(gk.hits(&[50, 51, 52]), [0, 0, 0]);
    // The limit is live: a subscriber gets one, then is limited.
    let frame = syn_to("198.51.100.7", MX4, SUBMISSION).build();
    gk.check(Hook::Xdp, &frame, Outcome::Pass, &[], "subscriber within the burst");
    gk.check(Hook::Tc, &frame, Outcome::Drop, &[(RateLimited, 1)], "subscriber over the limit");
    assert_eq!(gk.buckets().len(), 1);
    gk.done();
}

#[test]
fn unguarded_ports_pass_and_policy_changes_apply() {
    let mut gk = Gk::standard();
    for prog in PROGS {
        for src in ["198.51.100.7", "203.0.113.7", "2001:db8:100::7", "2001:db8:200::7"] {
            for port in [0, 24, 26, 80, 443, SUBMISSIONS, SUBMISSION, 2525, 65535] {
                let frame = syn_to(src, if src.contains(':') { MX6 } else { MX4 }, port).build();
                gk.check(prog, &frame, Outcome::Pass, &[], &format!("{src} -> unguarded {port}"));
            }
        }
    }
    assert_eq!(gk.hits(&[10, 11, 12, 13]), [0, 0, 0, 0]);
    for port in [SUBMISSION, 0, 65535] {
        gk.policy(port, true, 0);
        for prog in PROGS {
            for src in ["198.51.100.7", "2001:db8:100::7"] {
                let frame = syn_to(src, if src.contains(':') { MX6 } else { MX4 }, port).build();
                gk.check(prog, &frame, Outcome::Drop, &[(PoolBlocked, 1)], &format!("{src} -> newly guarded {port}"));
            }
        }
    }
    gk.policy(SMTP, false, 0);
    for prog in PROGS {
        gk.check(prog, &syn("198.51.100.7").build(), Outcome::Pass, &[], "25 after unguarding");
        gk.check(prog, &syn("2001:db8:100::7").build(), Outcome::Pass, &[], "v6 25 after unguarding");
    }
    gk.done();
}

#[test]
fn only_a_pure_syn_is_decided() {
    let mut gk = Gk::standard();
    use tcp_flags::*;
    for prog in PROGS {
        for src in ["198.51.100.7", "203.0.113.7", "2001:db8:100::7", "2001:db8:200::7"] {
            for (flags, name) in NOT_SYN {
                gk.check(prog, &segment(src, flags).build(), Outcome::Pass, &[], &format!("{name} from pool {src}"));
            }
            // UDP to 25, and "TCP" bytes under another protocol number.
            let udp = match src.parse::<IpAddr>().unwrap() {
                IpAddr::V4(s) => Packet::udp_v4(s, v4(MX4), 1, SMTP),
                IpAddr::V6(s) => Packet::udp_v6(s, v6(MX6), 1, SMTP),
            };
            gk.check(prog, &udp.payload(&[0x02; 32]).build(), Outcome::Pass, &[], &format!("UDP from {src}"));
            let f = syn(src).build();
            let (l3, et) = l3_of(&f);
            let l4 = l3 + if et == ethertype::IPV6 { 40 } else { 20 };
            let raw = syn(src).raw_l4(ipproto::UDP, &f[l4..]).build();
            gk.check(prog, &raw, Outcome::Pass, &[], &format!("SYN bytes as UDP from {src}"));
        }
        // A SYN with other bits (ECN setup, FIN, PSH, URG) is still a connection attempt.
        for flags in SYN_WITH_BITS {
            gk.check(prog, &segment("198.51.100.7", flags).build(), Outcome::Drop, &[(PoolBlocked, 1)], "SYN+bits");
        }
    }
    assert_eq!(gk.hits(&[10, 11, 12, 13]), [8, 0, 0, 0]);
    gk.done();
}

#[test]
fn reject_pools_answer_with_a_valid_rst() {
    let mut gk = Gk::standard();
    let full_options: Vec<u8> = [
        &mss_option(1460)[..],
        &[4, 2],                                 // SACK permitted
        &[8, 10, 1, 2, 3, 4, 0, 0, 0, 0],        // timestamps
        &[1, 3, 3, 7],                           // NOP, window scale
        &[30, 20, 0xde, 0xad, 0xbe, 0xef, 0xaa], // something unknown
        &[0xbb; 12],
        &[0],
    ]
    .concat();
    assert_eq!(full_options.len(), 40);
    gk.policy(1, true, 0);
    for prog in PROGS {
        for (src, id) in [("203.0.113.7", 12), ("2001:db8:200::7", 13)] {
            let base = || with_ttl(syn(src), 9);
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("MSS", base().build()),
                ("no options", without_options(with_ttl(syn(src), 200)).build()),
                ("40 option bytes", base().tcp_options(&full_options).build()),
                ("seq 0xffffffff", with_seq(base(), u32::MAX).build()),
                ("seq 0x12345678", with_seq(base(), 0x1234_5678).build()),
                ("802.1Q", base().vlans(&[(ethertype::VLAN, 10)]).build()),
                ("QinQ", base().qinq(100, 10).build()),
                ("Ethernet padding", [base().build(), vec![0; 6]].concat()),
                ("port 1 from port 65535", with_ports(base(), 65535, 1).build()),
            ];
            for (name, frame) in cases {
                let what = format!("{src} {name}");
                let before = gk.range_hits(id);
                let out = gk.check(prog, &frame, Outcome::Reject, &[(PoolRejected, 1)], &what);
                assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: {what}: pool hit");
                assert_rst(prog, &frame, &out, &what);
            }
        }
    }
    gk.done();
}

#[test]
fn reject_falls_back_to_drop_when_the_syn_cannot_be_answered() {
    let mut gk = Gk::standard();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 options", syn("203.0.113.7").ipv4_options(&[1, 1, 1, 1]).build()),
        ("IPv4 40 option bytes", syn("203.0.113.7").ipv4_options(&[1; 40]).build()),
        ("IPv4 SYN with data", syn("203.0.113.7").payload(b"EHLO").build()),
        ("IPv6 hop-by-hop", syn("2001:db8:200::7").ext(ExtHeader::hop_by_hop()).build()),
        ("IPv6 dst-opts", syn("2001:db8:200::7").ext(ExtHeader::dest_opts()).build()),
        ("IPv6 fragment", syn("2001:db8:200::7").ext(ExtHeader::fragment(0, false)).build()),
        (
            "IPv6 routing + dst-opts",
            syn("2001:db8:200::7").ext(ExtHeader::routing(&[v6(MX6)])).ext(ExtHeader::dest_opts()).build(),
        ),
        ("IPv6 SYN with data", syn("2001:db8:200::7").payload(b"EHLO").build()),
        ("802.1Q IPv4 options", syn("203.0.113.7").vlan(ethertype::VLAN, 5).ipv4_options(&[1; 8]).build()),
    ];
    for prog in PROGS {
        for (name, frame) in &cases {
            let id = if name.starts_with("IPv6") { 13 } else { 12 };
            let before = gk.range_hits(id);
            gk.check(prog, frame, Outcome::Drop, &[(PoolBlocked, 1)], name);
            assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: {name}: pool hit");
        }
    }
    gk.done();
}

#[test]
fn vlan_tagged_pool_syns_are_decided() {
    let mut gk = Gk::standard();
    for prog in PROGS {
        for (name, tags) in VLAN_STACKS {
            let tag = |p: Packet| p.vlans(tags).build();
            gk.check(prog, &tag(syn("198.51.100.7")), Outcome::Drop, &[(PoolBlocked, 1)], name);
            gk.check(prog, &tag(syn("2001:db8:100::7")), Outcome::Drop, &[(PoolBlocked, 1)], name);
            gk.check(prog, &tag(syn("198.51.100.25")), Outcome::Pass, &[(Exempt, 1)], name);
            let smh = syn_to("2001:db8:100::7", SMARTHOST6, SMTP);
            gk.check(prog, &tag(smh), Outcome::Pass, &[(SmarthostAllowed, 1)], name);
            gk.check(prog, &tag(syn(OUTSIDE4)), Outcome::Pass, &[], name);
            gk.check(prog, &tag(segment("198.51.100.7", tcp_flags::ACK)), Outcome::Pass, &[], name);
            for src in ["203.0.113.7", "2001:db8:200::7"] {
                let frame = tag(syn(src));
                let out = gk.check(prog, &frame, Outcome::Reject, &[(PoolRejected, 1)], name);
                assert_rst(prog, &frame, &out, &format!("{name} {src}"));
            }
        }
        // A third tag is beyond the parser's bound: passed without a decision.
        let frame = syn("198.51.100.7").vlans(&[(ethertype::QINQ, 1), (ethertype::VLAN, 2), (ethertype::VLAN, 3)]);
        gk.check(prog, &frame.build(), Outcome::Pass, &[], "three tags");
    }
    gk.done();
}

#[test]
fn dry_run_passes_and_counts() {
    let mut gk = Gk::standard();
    gk.dry_run(true);
    gk.policy(SUBMISSION, false, 1);
    gk.limit(1, HOUR_NS, 1);
    for prog in PROGS {
        for (src, id) in [("198.51.100.7", 10), ("2001:db8:100::7", 11)] {
            let before = gk.range_hits(id);
            gk.check(prog, &syn(src).build(), Outcome::Pass, &[(PoolBlocked, 1), (DryRun, 1)], &format!("dry {src}"));
            assert_eq!(gk.range_hits(id), before + 1);
        }
        for src in ["203.0.113.7", "2001:db8:200::7"] {
            // Passed unchanged: no RST in dry-run.
            gk.check(prog, &syn(src).build(), Outcome::Pass, &[(PoolRejected, 1), (DryRun, 1)], &format!("dry {src}"));
        }
        // Passing decisions are not "would drop".
        gk.check(prog, &syn("198.51.100.25").build(), Outcome::Pass, &[(Exempt, 1)], "dry exempt");
        let smh = syn_to("198.51.100.7", SMARTHOST4, SMTP).build();
        gk.check(prog, &smh, Outcome::Pass, &[(SmarthostAllowed, 1)], "dry smarthost");
        gk.check(prog, &syn(OUTSIDE4).build(), Outcome::Pass, &[], "dry outsider");
        // Rate limits: the first is within the burst, the rest would drop.
        let src = if prog == Hook::Xdp { "198.51.100.50" } else { "198.51.100.51" };
        let frame = syn_to(src, MX4, SUBMISSION).build();
        gk.check(prog, &frame, Outcome::Pass, &[], "dry within the burst");
        for i in 0..3 {
            gk.check(
                prog,
                &frame,
                Outcome::Pass,
                &[(RateLimited, 1), (DryRun, 1)],
                &format!("dry over the limit #{i}"),
            );
        }
    }
    // Leaving dry-run drops, rejects and limits again.
    gk.dry_run(false);
    for prog in PROGS {
        gk.check(prog, &syn("198.51.100.7").build(), Outcome::Drop, &[(PoolBlocked, 1)], "after dry-run");
        let frame = syn("2001:db8:200::7").build();
        let out = gk.check(prog, &frame, Outcome::Reject, &[(PoolRejected, 1)], "reject after dry-run");
        assert_rst(prog, &frame, &out, "reject after dry-run");
        let frame = syn_to("198.51.100.50", MX4, SUBMISSION).build();
        gk.check(prog, &frame, Outcome::Drop, &[(RateLimited, 1)], "limit after dry-run");
    }
    gk.done();
}

#[test]
fn rate_limit_lets_a_burst_through_per_source_then_drops() {
    for prog in PROGS {
        let mut gk = Gk::standard();
        gk.policy(SUBMISSION, false, 3);
        gk.limit(3, HOUR_NS, 3);
        let to = |src: &str| syn_to(src, if src.contains(':') { MX6 } else { MX4 }, SUBMISSION).build();
        let burst = |gk: &mut Gk, src: &str, n: usize| {
            for i in 0..n {
                gk.check(prog, &to(src), Outcome::Pass, &[], &format!("{src} #{i} within the burst"));
            }
        };
        let over = |gk: &mut Gk, src: &str| {
            gk.check(prog, &to(src), Outcome::Drop, &[(RateLimited, 1)], &format!("{src} over the limit"));
        };
        // Exactly three, then drops; drops use no tokens.
        burst(&mut gk, "198.51.100.7", 3);
        over(&mut gk, "198.51.100.7");
        over(&mut gk, "198.51.100.7");
        // Another source has its own bucket; so do exempt sources.
        burst(&mut gk, "198.51.100.8", 3);
        over(&mut gk, "198.51.100.8");
        burst(&mut gk, "198.51.100.25", 3);
        over(&mut gk, "198.51.100.25");
        over(&mut gk, "198.51.100.7");
        // IPv6: the bucket is the /64.
        burst(&mut gk, "2001:db8:100:1::1", 2);
        burst(&mut gk, "2001:db8:100:1:ffff::2", 1);
        over(&mut gk, "2001:db8:100:1::3");
        burst(&mut gk, "2001:db8:100:2::1", 3);
        over(&mut gk, "2001:db8:100:2::1");
        // Outsiders are never limited.
        for i in 0..6 {
            gk.check(prog, &to(OUTSIDE4), Outcome::Pass, &[], &format!("outsider #{i}"));
        }
        let keys: Vec<LimitKey> = gk.buckets().into_iter().map(|(k, _)| k).collect();
        let want: Vec<LimitKey> = {
            let mut w: Vec<LimitKey> = ["198.51.100.7", "198.51.100.8", "198.51.100.25"]
                .into_iter()
                .map(|s| LimitKey { addr: addr::key_v4(v4(s).octets()).addr, class: 3 })
                .chain(
                    ["2001:db8:100:1::", "2001:db8:100:2::"]
                        .into_iter()
                        .map(|s| LimitKey { addr: addr::key_v6(v6(s).octets()).addr, class: 3 }),
                )
                .collect();
            w.sort_by_key(|k| (k.addr, k.class));
            w
        };
        assert_eq!(keys, want, "{prog:?}: one bucket per /32 and /64");
        // Each stored arrival time is within three hours of now.
        let now = monotonic_ns();
        for (k, tat) in gk.buckets() {
            assert!(tat > now && tat <= now + 3 * HOUR_NS + 1_000_000_000, "{prog:?}: {k:?} tat {tat} now {now}");
        }
        gk.done();
    }
}

#[test]
fn rate_limits_apply_after_the_guard_and_per_class() {
    for prog in PROGS {
        let mut gk = Gk::standard();
        gk.policy(SMTP, true, 1);
        gk.limit(1, HOUR_NS, 2);
        gk.policy(SUBMISSION, false, 2);
        gk.policy(SUBMISSIONS, false, 2);
        gk.limit(2, HOUR_NS, 1);
        // Pool to a smarthost: counted as allowed by the guard, then
        // limited; an over-limit SYN moves both counters (as exempt below).
        // That is the datapath as written; `EgressCounter`'s doc promises
        // "at most one decision counter" per SYN.
        let smh = syn_to("198.51.100.7", SMARTHOST4, SMTP).build();
        for _ in 0..2 {
            gk.check(prog, &smh, Outcome::Pass, &[(SmarthostAllowed, 1)], "pool -> smarthost within the burst");
        }
        gk.check(prog, &smh, Outcome::Drop, &[(SmarthostAllowed, 1), (RateLimited, 1)], "pool -> smarthost over");
        // Blocked SYNs from that source neither pass nor use tokens of
        // another class; the blocked decision comes first.
        gk.check(prog, &syn("198.51.100.7").build(), Outcome::Drop, &[(PoolBlocked, 1)], "pool -> mx");
        // Class 2 is shared by 587 and 465: one bucket.
        let sub = syn_to("198.51.100.7", MX4, SUBMISSION).build();
        let subs = syn_to("198.51.100.7", MX4, SUBMISSIONS).build();
        gk.check(prog, &sub, Outcome::Pass, &[], "587 within class 2");
        gk.check(prog, &subs, Outcome::Drop, &[(RateLimited, 1)], "465 shares class 2");
        // Exempt to a guarded, limited port.
        let ex = syn("198.51.100.25").build();
        for _ in 0..2 {
            gk.check(prog, &ex, Outcome::Pass, &[(Exempt, 1)], "exempt within the burst");
        }
        gk.check(prog, &ex, Outcome::Drop, &[(Exempt, 1), (RateLimited, 1)], "exempt over");
        // Reject pools to a smarthost are limited too (and dropped, not answered).
        let rsmh = syn_to("2001:db8:200::7", SMARTHOST6, SMTP).build();
        for _ in 0..2 {
            gk.check(prog, &rsmh, Outcome::Pass, &[(SmarthostAllowed, 1)], "reject pool -> smarthost");
        }
        gk.check(
            prog,
            &rsmh,
            Outcome::Drop,
            &[(SmarthostAllowed, 1), (RateLimited, 1)],
            "reject pool -> smarthost over",
        );
        // A class whose limit is unset (interval 0) does not limit, nor does
        // a class number beyond the table.
        gk.policy(2525, false, 5);
        gk.set_policy_word(2526, 9 << port_policy::CLASS_SHIFT);
        gk.limit(5, 0, 0);
        for port in [2525, 2526] {
            let f = syn_to("198.51.100.7", MX4, port).build();
            for i in 0..5 {
                gk.check(prog, &f, Outcome::Pass, &[], &format!("port {port} #{i}"));
            }
        }
        let classes: Vec<u32> = gk.buckets().into_iter().map(|(k, _)| k.class).collect();
        assert_eq!(classes.iter().filter(|&&c| c == 5 || c == 9).count(), 0, "{prog:?}: {classes:?}");
        gk.done();
    }
}

#[test]
fn rate_limit_tokens_come_back_with_time() {
    let mut gk = Gk::standard();
    gk.policy(SUBMISSION, false, 1);
    // Two at once, then one per 500 ms (generous: the clock is the coarse
    // one, and a busy machine may pause the test between two runs).
    gk.limit(1, 500_000_000, 2);
    let frame = |prog: Hook| {
        let src = if prog == Hook::Xdp { "198.51.100.7" } else { "2001:db8:100::7" };
        syn_to(src, if prog == Hook::Xdp { MX4 } else { MX6 }, SUBMISSION).build()
    };
    for prog in PROGS {
        gk.check(prog, &frame(prog), Outcome::Pass, &[], "first");
        gk.check(prog, &frame(prog), Outcome::Pass, &[], "second");
        gk.check(prog, &frame(prog), Outcome::Drop, &[(RateLimited, 1)], "third at once");
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The whole burst is back, no more.
    for prog in PROGS {
        gk.check(prog, &frame(prog), Outcome::Pass, &[], "after a pause");
        gk.check(prog, &frame(prog), Outcome::Pass, &[], "after a pause, second");
        gk.check(prog, &frame(prog), Outcome::Drop, &[(RateLimited, 1)], "after a pause, third");
    }
    gk.done();
}

#[test]
fn truncated_pool_syns_pass_and_never_abort() {
    let mut gk = Gk::standard();
    let frames: Vec<(&str, Outcome, Vec<u8>)> = vec![
        ("v4", Outcome::Drop, syn("198.51.100.7").build()),
        ("v4 reject", Outcome::Reject, syn("203.0.113.7").build()),
        (
            "v4 reject no options",
            Outcome::Reject,
            Packet::tcp_v4(v4("203.0.113.7"), v4(MX4), 1, SMTP, tcp_flags::SYN).build(),
        ),
        ("v4 options", Outcome::Drop, syn("198.51.100.7").ipv4_options(&[1; 12]).build()),
        ("v4 802.1Q reject", Outcome::Reject, syn("203.0.113.7").vlan(ethertype::VLAN, 5).build()),
        ("v4 QinQ", Outcome::Drop, syn("198.51.100.7").qinq(6, 7).build()),
        ("v6", Outcome::Drop, syn("2001:db8:100::7").build()),
        ("v6 reject", Outcome::Reject, syn("2001:db8:200::7").build()),
        (
            "v6 reject hbh+routing+atomic fragment+dst-opts",
            Outcome::Drop,
            syn("2001:db8:200::7")
                .ext(ExtHeader::hop_by_hop())
                .ext(ExtHeader::routing(&[v6(MX6)]))
                .ext(ExtHeader::fragment(0, false))
                .ext(ExtHeader::dest_opts())
                .build(),
        ),
        ("v6 QinQ reject", Outcome::Reject, syn("2001:db8:200::7").qinq(6, 7).build()),
    ];
    for prog in PROGS {
        for (name, want, full) in &frames {
            gk.truncations_pass(prog, name, full);
            let c = match want {
                Outcome::Reject => PoolRejected,
                _ => PoolBlocked,
            };
            let out = gk.check(prog, full, *want, &[(c, 1)], name);
            if *want == Outcome::Reject {
                assert_rst(prog, full, &out, name);
            }
        }
    }
    gk.done();
}

#[test]
fn malformed_headers_pass_and_are_counted() {
    let mut gk = Gk::standard();
    let skipped = [(ParseSkipped, 1)];
    for prog in PROGS {
        for (src, l3) in [("198.51.100.7", 14), ("203.0.113.7", 14)] {
            let good = syn(src).build();
            for ihl in 0..5u8 {
                let mut f = good.clone();
                f[l3] = 0x40 | ihl;
                gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} IHL {ihl}"));
            }
            for version in [0u8, 5, 6, 15] {
                let mut f = good.clone();
                f[l3] = (version << 4) | 5;
                gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} IPv4 ethertype, version {version}"));
            }
            let mut f = good.clone();
            f[l3] = 0x4f;
            gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} IHL 15 without options"));
            for doff in 0..5u8 {
                let mut f = good.clone();
                f[l3 + 20 + 12] = doff << 4;
                gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} TCP data offset {doff}"));
            }
            let mut f = good.clone();
            f[l3 + 20 + 12] = 0xf0;
            gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} TCP data offset 15 without options"));
        }
        for src in ["2001:db8:100::7", "2001:db8:200::7"] {
            let good = syn(src).build();
            for version in [0u8, 4, 7] {
                let mut f = good.clone();
                f[14] = version << 4;
                gk.check(prog, &f, Outcome::Pass, &skipped, &format!("{src} IPv6 ethertype, version {version}"));
            }
            gk.check(prog, &syn(src).ext(ExtHeader::ah()).build(), Outcome::Pass, &skipped, &format!("{src} AH"));
        }
    }
    assert_eq!(gk.hits(&[10, 11, 12, 13]), [0, 0, 0, 0]);
    gk.done();
}

/// A reject pool as the model keeps it.
fn pool_range(net: &str, id: u32) -> Range {
    Range { kind: RangeKind::Pool, net: net.parse().unwrap(), id, learned: false, reject: true }
}

/// How [`mutated_pool_syns_match_the_decision_model`] changes its seeds.
const MUTATION: Mutation = Mutation {
    span: 100,
    planted: &[0, 6, 0x02, 0x12, 0x20, 44, 60, 0xff, 0x45, 0x50, 0x21, 0x57],
    resize_one_in: 8,
    extend_below: 24,
};

#[test]
fn mutated_pool_syns_match_the_decision_model() {
    for prog in PROGS {
        let mut gk = Gk::new();
        gk.guard_all_ports();
        gk.reject_pool("0.0.0.0/0", 1);
        gk.reject_pool("::/0", 2);
        let mut reading = Model {
            ranges: vec![pool_range("0.0.0.0/0", 1), pool_range("::/0", 2)],
            policy: (0..=u16::MAX).map(|p| (p, port_policy::GUARD)).collect(),
            ..Model::default()
        };
        let seeds: Vec<Vec<u8>> = vec![
            syn("198.51.100.1").build(),
            syn("198.51.100.1").build(),
            Packet::tcp_v4(v4("198.51.100.1"), v4(MX4), 1, SMTP, tcp_flags::SYN).build(),
            syn("198.51.100.1").ipv4_options(&[1; 8]).vlan(ethertype::VLAN, 3).build(),
            syn("198.51.100.1").qinq(1, 2).build(),
            syn("2001:db8::1").build(),
            syn("2001:db8::1").build(),
            syn("2001:db8::1").vlan(ethertype::VLAN, 9).build(),
            syn("2001:db8::1").ext(ExtHeader::hop_by_hop()).ext(ExtHeader::fragment(0, true)).build(),
            Packet::udp_v4(v4("198.51.100.1"), v4(MX4), 1, SMTP).payload(&[0x02; 24]).build(),
            syn("198.51.100.1").pppoe(7).build(),
            syn("2001:db8::1").vlan(ethertype::VLAN, 9).pppoe_compressed(7).build(),
            syn("198.51.100.1").ipv4_fragment(0, true).payload(&[0; 8]).build(),
            vec![ExtHeader::dest_opts(); MAX_IPV6_EXT_HEADERS]
                .into_iter()
                .fold(syn("2001:db8::1"), Packet::ext)
                .build(),
            vec![ExtHeader::dest_opts(); MAX_IPV6_EXT_HEADERS + 1]
                .into_iter()
                .fold(syn("2001:db8::1"), Packet::ext)
                .build(),
        ];
        let mut rng = Rng(0x00e9_7e55_5eed_0001 ^ (prog as u64 * 0x9e37_79b9));
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..3000 {
            let mut frame = seeds[i % seeds.len()].clone();
            // Flip a few bytes, mostly in the headers; sometimes truncate or extend.
            mutate(&mut rng, &mut frame, &MUTATION);
            // Every port is guarded and every source in a reject pool: the
            // model's plain SYNs are answered, its other SYNs dropped, what
            // it cannot read is skipped, what hides a SYN is dropped.
            let want = match model::parse(&frame, Gate::Egress) {
                Parse::NotSyn => "Pass",
                Parse::Unreadable => "Skip",
                Parse::Syn { plain: true } => "Reject",
                Parse::Syn { plain: false } => "Drop",
                Parse::Fragment => "Fragment",
                Parse::LongChain => "LongChain",
            };
            let what = format!("mutation {i} ({want}): {}", hex(&frame));
            if prog == Hook::Tc && skb_refuses(&frame) {
                gk.assert_skb_refuses(&frame);
                continue;
            }
            *outcomes.entry(want).or_insert(0) += 1;
            let expect = reading.egress(&frame);
            let w = expect.outcome();
            let (ret, out) = gk.run(prog, &frame);
            assert_eq!(prog.outcome(ret), Some(w), "{prog:?}: outcome of {what}");
            let counters: BTreeMap<&str, u64> = expect.counters.iter().map(|&c| (egress_counter_name(c), 1)).collect();
            assert_eq!(gk.delta(), counters, "{prog:?}: counters after {what}");
            if w != Outcome::Reject {
                assert_eq!(hex(&out), hex(&frame), "{prog:?}: {what}: a frame that is not rejected is not rewritten");
            }
            if w == Outcome::Reject {
                let (l3, et) = l3_of(&frame);
                let v6 = et == ethertype::IPV6;
                let l4 = l3 + if v6 { 40 } else { 20 };
                let t = &out[l4..];
                assert_eq!(t[13], tcp_flags::RST | tcp_flags::ACK, "{prog:?}: {what}");
                assert_eq!((&t[0..2], &t[2..4]), (&frame[l4 + 2..l4 + 4], &frame[l4..l4 + 2]), "{prog:?}: {what}");
                // XDP computes the checksums afresh: always right. TC
                // updates them incrementally: right when they were.
                let sums = |f: &[u8]| (v6 || ipv4_header_ok(f, l3), tcp_checksum_ok(f, l3, l4, v6));
                let want_sums = if prog == Hook::Xdp { (true, true) } else { sums(&frame) };
                assert_eq!(sums(&out), want_sums, "{prog:?}: checksums of the RST for {what}\n  out {}", hex(&out));
            }
        }
        // The mutations must exercise every outcome.
        assert_eq!(outcomes.len(), 6, "{prog:?}: {outcomes:?}");
        eprintln!("{prog:?} mutation outcomes: {outcomes:?}");
        gk.done();
    }
}

// ---------------------------------------------------------------- hidden SYNs and PPPoE

/// A SYN to port 25 carried in PPPoE session 0x2a.
fn pppoe_syn(src: &str) -> Packet {
    syn(src).pppoe(0x2a)
}

#[test]
fn pppoe_session_syns_are_decided() {
    let mut gk = Gk::standard();
    for prog in PROGS {
        for (name, tags) in [("untagged", &[][..]), VLAN_STACKS[0], VLAN_STACKS[1]] {
            for compressed in [false, true] {
                let what = |s: &str| format!("{name} PPPoE (compressed {compressed}) {s}");
                let carry = |p: Packet| {
                    let p = p.vlans(tags);
                    (if compressed { p.pppoe_compressed(9) } else { p.pppoe(9) }).build()
                };
                for (src, id) in [("198.51.100.7", 10), ("2001:db8:100::7", 11)] {
                    let before = gk.range_hits(id);
                    gk.check(prog, &carry(syn(src)), Outcome::Drop, &[(PoolBlocked, 1)], &what(src));
                    assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: {}: pool hit", what(src));
                }
                // Reject pools: a PPPoE SYN is dropped, never answered.
                for src in ["203.0.113.7", "2001:db8:200::7"] {
                    gk.check(prog, &carry(syn(src)), Outcome::Drop, &[(PoolBlocked, 1)], &what(src));
                }
                gk.check(prog, &carry(syn("198.51.100.25")), Outcome::Pass, &[(Exempt, 1)], &what("exempt"));
                let smh = syn_to("2001:db8:100::7", SMARTHOST6, SMTP);
                gk.check(prog, &carry(smh), Outcome::Pass, &[(SmarthostAllowed, 1)], &what("to a smarthost"));
                for src in [OUTSIDE4, OUTSIDE6] {
                    gk.check(prog, &carry(syn(src)), Outcome::Pass, &[], &what(src));
                }
                let ack = segment("198.51.100.7", tcp_flags::ACK);
                gk.check(prog, &carry(ack), Outcome::Pass, &[], &what("ACK"));
                let udp = Packet::udp_v4(v4("198.51.100.7"), v4(MX4), 1, SMTP).payload(&[0x02; 24]);
                gk.check(prog, &carry(udp), Outcome::Pass, &[], &what("UDP"));
            }
            // Other PPP protocols and the discovery stage carry no IP: passed.
            for proto in [ppp::LCP, ppp::IPCP, 0x0023] {
                let f = pppoe_syn("198.51.100.7").vlans(tags).ppp_protocol(proto).build();
                gk.check(prog, &f, Outcome::Pass, &[], &format!("{name} PPP protocol {proto:#06x}"));
            }
            let mut f = syn("198.51.100.7").vlans(tags).pppoe(9).build();
            let et = 12 + 4 * tags.len();
            f[et..et + 2].copy_from_slice(&ethertype::PPPOE_DISCOVERY.to_be_bytes());
            gk.check(prog, &f, Outcome::Pass, &[], &format!("{name} PPPoE discovery"));
        }
    }
    gk.done();
}

#[test]
fn truncated_pppoe_frames_pass() {
    let mut gk = Gk::standard();
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("v4", pppoe_syn("198.51.100.7").build()),
        ("v4 compressed", syn("198.51.100.7").pppoe_compressed(1).build()),
        ("v6 802.1Q", syn("2001:db8:100::7").vlan(ethertype::VLAN, 5).pppoe(1).build()),
        ("v6 QinQ compressed", syn("2001:db8:100::7").qinq(6, 7).pppoe_compressed(1).build()),
    ];
    for prog in PROGS {
        for (name, full) in &frames {
            gk.truncations_pass(prog, name, full);
            gk.check(prog, full, Outcome::Drop, &[(PoolBlocked, 1)], name);
        }
    }
    gk.done();
}

/// The first fragment of a TCP segment with only `tcp_bytes` bytes of the
/// TCP header of `p` (its own checksum left as it is).
fn tiny_first_fragment(p: Packet, tcp_bytes: usize) -> Packet {
    let frame = p.build();
    let l4 = p.l3_offset() + if matches!(p.ip, Ip::V6 { .. }) { 40 } else { 20 };
    let head = frame[l4..l4 + tcp_bytes].to_vec();
    match p.ip {
        Ip::V4 { .. } => p.raw_l4(ipproto::TCP, &head).ipv4_fragment(0, true),
        Ip::V6 { .. } => p.ext(ExtHeader::fragment(0, true)).raw_l4(ipproto::TCP, &head),
    }
}

#[test]
fn pool_first_fragments_to_guarded_ports_are_dropped_and_counted() {
    let mut gk = Gk::standard();
    let frag = [(PoolFragment, 1)];
    for prog in PROGS {
        for (src, id) in [("198.51.100.7", 10), ("203.0.113.7", 12), ("2001:db8:100::7", 11), ("2001:db8:200::7", 13)] {
            let is_v6 = src.contains(':');
            let first = |p: Packet| if is_v6 { p.ext(ExtHeader::fragment(0, true)) } else { p.ipv4_fragment(0, true) };
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("SYN, whole header", first(syn(src)).payload(&[0; 16]).build()),
                ("SYN, no payload", first(syn(src)).build()),
                // Flags a later, overlapping fragment may rewrite (RFC 1858).
                ("ACK", first(segment(src, tcp_flags::ACK)).payload(&[0; 16]).build()),
                ("8 bytes of TCP", tiny_first_fragment(syn(src), 8).build()),
                ("4 bytes of TCP", tiny_first_fragment(syn(src), 4).build()),
                // Too short to show its port: counted as guarded.
                ("2 bytes of TCP", tiny_first_fragment(syn(src), 2).build()),
                ("0 bytes of TCP", tiny_first_fragment(syn(src), 0).build()),
                ("802.1Q", first(syn(src)).vlan(ethertype::VLAN, 5).payload(&[0; 8]).build()),
                ("PPPoE", tiny_first_fragment(syn(src).pppoe(3), 8).build()),
            ];
            for (name, f) in &cases {
                let before = gk.range_hits(id);
                gk.check(prog, f, Outcome::Drop, &frag, &format!("{src} first fragment, {name}"));
                assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: {src} {name}: pool hit");
            }
            if is_v6 {
                // The header chain cut after the fragment header.
                let cut = syn(src).ext(ExtHeader::fragment(0, true)).ext(ExtHeader::dest_opts()).build();
                let end = 14 + 40 + 8 + 1;
                gk.check(prog, &cut[..end], Outcome::Drop, &frag, &format!("{src} first fragment, chain cut"));
            }
            // Later fragments carry no TCP header: passed, as is the rest.
            for offset in [1, 2, 185] {
                let f = if is_v6 {
                    syn(src).ext(ExtHeader::fragment(offset, true)).build()
                } else {
                    syn(src).ipv4_fragment(offset, false).build()
                };
                gk.check(prog, &f, Outcome::Pass, &[], &format!("{src} fragment at {offset}"));
            }
            // Unguarded ports, a smarthost, UDP: as before.
            let to80 = with_ports(syn(src), 40000, 80);
            gk.check(prog, &first(to80.clone()).build(), Outcome::Pass, &[], &format!("{src} first fragment to 80"));
            let f = tiny_first_fragment(to80, 8).build();
            gk.check(prog, &f, Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} tiny first fragment to 80"));
            let smh = syn_to(src, if is_v6 { SMARTHOST6 } else { SMARTHOST4 }, SMTP);
            let f = first(smh.clone()).build();
            gk.check(prog, &f, Outcome::Pass, &[(SmarthostAllowed, 1)], &format!("{src} first fragment to smarthost"));
            let f = tiny_first_fragment(smh, 8).build();
            gk.check(prog, &f, Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} tiny fragment to smarthost"));
            let udp = match src.parse::<IpAddr>().unwrap() {
                IpAddr::V4(s) => Packet::udp_v4(s, v4(MX4), 1, SMTP).ipv4_fragment(0, true),
                IpAddr::V6(s) => Packet::udp_v6(s, v6(MX6), 1, SMTP).ext(ExtHeader::fragment(0, true)),
            };
            gk.check(prog, &udp.payload(&[0; 32]).build(), Outcome::Pass, &[], &format!("{src} UDP first fragment"));
        }
        // Exempt and outside sources: as before (a whole SYN is decided,
        // a short one skipped).
        for (src, whole) in [
            ("198.51.100.25", &[(Exempt, 1)][..]),
            ("2001:db8:100:25::1", &[(Exempt, 1)][..]),
            (OUTSIDE4, &[][..]),
            (OUTSIDE6, &[][..]),
        ] {
            let is_v6 = src.contains(':');
            let first = |p: Packet| if is_v6 { p.ext(ExtHeader::fragment(0, true)) } else { p.ipv4_fragment(0, true) };
            gk.check(prog, &first(syn(src)).build(), Outcome::Pass, whole, &format!("{src} first fragment"));
            let f = tiny_first_fragment(syn(src), 8).build();
            gk.check(prog, &f, Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} tiny first fragment"));
        }
    }
    // Dry-run counts and passes.
    gk.dry_run(true);
    for prog in PROGS {
        let f = tiny_first_fragment(syn("198.51.100.7"), 8).build();
        gk.check(prog, &f, Outcome::Pass, &[(PoolFragment, 1), (DryRun, 1)], "dry-run tiny first fragment");
    }
    gk.done();
}

#[test]
fn pool_ipv6_chains_too_long_to_walk_are_dropped_and_counted() {
    let mut gk = Gk::standard();
    let chain = |src: &str, n: usize| vec![ExtHeader::dest_opts(); n].into_iter().fold(syn(src), Packet::ext);
    let long = MAX_IPV6_EXT_HEADERS + 1;
    for prog in PROGS {
        for (src, id) in [("2001:db8:100::7", 11), ("2001:db8:200::7", 13)] {
            let cases: Vec<(String, Vec<u8>)> = vec![
                (format!("{long} dst-opts"), chain(src, long).build()),
                ("20 dst-opts".into(), chain(src, 20).build()),
                (
                    "hbh, 5 dst-opts, routing".into(),
                    chain(src, 0)
                        .ext(ExtHeader::hop_by_hop())
                        .ext(ExtHeader::dest_opts())
                        .ext(ExtHeader::dest_opts())
                        .ext(ExtHeader::dest_opts())
                        .ext(ExtHeader::dest_opts())
                        .ext(ExtHeader::dest_opts())
                        .ext(ExtHeader::routing(&[v6(MX6)]))
                        .build(),
                ),
                (format!("{long} dst-opts, UDP"), chain(src, long).raw_l4(ipproto::UDP, &[0; 16]).build()),
                (format!("{long} dst-opts, PPPoE"), chain(src, long).pppoe(4).build()),
            ];
            for (name, f) in &cases {
                let before = gk.range_hits(id);
                gk.check(prog, f, Outcome::Drop, &[(PoolExtChain, 1)], &format!("{src} {name}"));
                assert_eq!(gk.range_hits(id), before + 1, "{prog:?}: {src} {name}: pool hit");
            }
            // As many as the walk reads: decided as a SYN.
            let f = chain(src, MAX_IPV6_EXT_HEADERS).build();
            gk.check(prog, &f, Outcome::Drop, &[(PoolBlocked, 1)], &format!("{src} {MAX_IPV6_EXT_HEADERS} headers"));
            // The walk ends on something else: skipped as before.
            let f = chain(src, MAX_IPV6_EXT_HEADERS).raw_l4(ipproto::UDP, &[0; 16]).build();
            gk.check(prog, &f, Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} {MAX_IPV6_EXT_HEADERS}, UDP"));
            // To a smarthost: not the guard's to drop; skipped as before.
            let smh = vec![ExtHeader::dest_opts(); long].into_iter().fold(syn_to(src, SMARTHOST6, SMTP), Packet::ext);
            gk.check(prog, &smh.build(), Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} to a smarthost"));
        }
        // Other sources: skipped as before.
        for src in ["2001:db8:100:25::1", OUTSIDE6] {
            let f = chain(src, long).build();
            gk.check(prog, &f, Outcome::Pass, &[(ParseSkipped, 1)], &format!("{src} {long} headers"));
        }
    }
    gk.dry_run(true);
    for prog in PROGS {
        let f = chain("2001:db8:100::7", long).build();
        gk.check(prog, &f, Outcome::Pass, &[(PoolExtChain, 1), (DryRun, 1)], "dry-run long chain");
    }
    gk.done();
}
