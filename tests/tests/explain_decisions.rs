//! In-kernel tests of the explain action through BPF_PROG_TEST_RUN: the
//! subscriber-side XDP gate and the uplink's TC gate with explain pools,
//! and the TC explain stage (`gatekeeper_explain`) itself.
//!
//! What a test run cannot show: `bpf_sk_assign` refuses every skb that is
//! not at TC ingress (`-EOPNOTSUPP`, net/core/filter.c), and a test run's
//! skb never is. Probed on this kernel (6.18) with the stage's listener
//! lookup finding the listener (state 10, TCP_LISTEN) and the assignment
//! returning -95. So here a found socket always ends in the stage's
//! fallback (a RST for a SYN, a drop for a segment of a connection the
//! agent owns), which is what a failed assignment must do; the assignment
//! itself, the mark and the local delivery are covered by the namespace
//! test `explain_ns`.
//!
//! Every test loads its own unpinned instance; the test runs happen on the
//! loopback (XDP with an `xdp_md` naming it, TC without context) and count
//! under its interface slot. Needs root.

use std::collections::BTreeMap;

use aya::{
    maps::{Array, PerCpuArray},
    programs::{Program, TestRun, TestRunOptions},
    Ebpf,
};
use gatekeeper::domain::{PoolAction, RangeKind};
use gatekeeper_common::{
    config_flags,
    counters::egress_counter_name,
    explain::{flags, ExplainConfig, DEFAULT_MARK, DEFAULT_MASK, LISTENER_PRIORITY},
    maps, port_policy, programs, stat_index, Config, EgressCounter, STAT_STRIDE,
};
use gatekeeper_tests::packet::{checksum, hex, ipproto, syn_to, tcp_flags, v4, v6, Packet};
use gatekeeper_tests::ranges::AgentRanges;
use gatekeeper_tests::testrun::{self, loopback, range_hits, test_run, Hook, Outcome};

const SMTP: u16 = 25;
const SUBMISSION: u16 = 587;

// The address plan (TEST-NETs only).
/// Explain pools: 198.51.100.0/24 (id 1), 2001:db8:100::/48 (id 2).
const EXPLAIN4: &str = "198.51.100.0/24";
const EXPLAIN6: &str = "2001:db8:100::/48";
const POOLED4: &str = "198.51.100.10";
const POOLED6: &str = "2001:db8:100::10";
/// A reject pool (id 3) and a drop pool (id 4).
const REJECT4: &str = "203.0.113.0/25";
const DROP4: &str = "203.0.113.128/25";
/// Exempt inside the explain pools (ids 5, 6).
const EXEMPT4: &str = "198.51.100.25";
const EXEMPT6: &str = "2001:db8:100:25::1";
/// Smarthosts (ids 7, 8).
const SMH4: &str = "192.0.2.25";
const SMH6: &str = "2001:db8:25::25";
/// Mail servers that are not smarthosts.
const MX4: &str = "192.0.2.80";
const MX6: &str = "2001:db8:80::80";
const OUTSIDE4: &str = "192.0.2.200";

const TC_SHOT: u32 = testrun::TC_SHOT;
const TC_UNSPEC: u32 = testrun::TC_UNSPEC;
const TC_REDIRECT: u32 = testrun::TC_REDIRECT;

/// One unpinned instance with both egress gates and the explain stage.
struct Gk {
    bpf: Ebpf,
    ranges: AgentRanges,
    ifindex: u32,
    seen: BTreeMap<u32, u64>,
}

impl Gk {
    fn new() -> Gk {
        testrun::require_root("explain_decisions");
        let mut bpf =
            testrun::load(64, |_| {}, &[Hook::Xdp.egress_program(), Hook::Tc.egress_program(), programs::TC_EXPLAIN])
                .unwrap_or_else(|e| panic!("{e:#}"));
        let ranges = AgentRanges::take(&mut bpf);
        let mut gk = Gk { bpf, ranges, ifindex: loopback(), seen: BTreeMap::new() };
        let mut ports: Array<_, u32> = Array::try_from(gk.bpf.map_mut(maps::EG_PORTS).unwrap()).unwrap();
        ports.set(u32::from(SMTP), port_policy::GUARD, 0).unwrap();
        let explain = Some(PoolAction::Explain);
        gk.ranges.add(RangeKind::Pool, EXPLAIN4, 1, explain);
        gk.ranges.add(RangeKind::Pool, EXPLAIN6, 2, explain);
        gk.ranges.add(RangeKind::Pool, REJECT4, 3, Some(PoolAction::Reject));
        gk.ranges.add(RangeKind::Pool, DROP4, 4, Some(PoolAction::Drop));
        gk.ranges.add(RangeKind::Exempt, &format!("{EXEMPT4}/32"), 5, None);
        gk.ranges.add(RangeKind::Exempt, "2001:db8:100:25::/64", 6, None);
        gk.ranges.add(RangeKind::Smarthost, &format!("{SMH4}/32"), 7, None);
        gk.ranges.add(RangeKind::Smarthost, &format!("{SMH6}/128"), 8, None);
        gk
    }

    /// The stage's settings: attached or not, listener ports.
    fn stage(&mut self, staged: bool, port_v4: u16, port_v6: u16) {
        let mut m: Array<_, ExplainConfig> = Array::try_from(self.bpf.map_mut(maps::EXPLAIN).unwrap()).unwrap();
        let c = ExplainConfig {
            mark: DEFAULT_MARK,
            mask: DEFAULT_MASK,
            flags: if staged { flags::STAGED } else { 0 },
            port_v4,
            port_v6,
        };
        m.set(0, c, 0).unwrap();
    }

    fn dry_run(&mut self, on: bool) {
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap()).unwrap();
        cfg.set(0, Config { flags: if on { config_flags::DRY_RUN } else { 0 }, ..Config::default() }, 0).unwrap();
    }

    /// Runs `frame` through a gate (XDP or uplink TC).
    fn gate(&self, hook: Hook, frame: &[u8]) -> (Outcome, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let r = test_run(&self.bpf, hook.egress_program(), frame, Some(self.ifindex), 1, Some(&mut out))
            .unwrap_or_else(|e| panic!("{hook:?} test run: {e:?}: {}", hex(frame)));
        out.truncate(r.data_size_out as usize);
        let o = hook.outcome(r.return_value).unwrap_or_else(|| panic!("{hook:?} returned {}", r.return_value));
        (o, out)
    }

    /// Runs `frame` through the stage: its return value, the frame as it
    /// left it, and the skb mark afterwards.
    fn stage_run(&self, frame: &[u8]) -> (u32, Vec<u8>, u32) {
        let Some(Program::SchedClassifier(p)) = self.bpf.program(programs::TC_EXPLAIN) else { panic!("no stage") };
        let mut out = vec![0u8; frame.len() + 256];
        // A zeroed __sk_buff in and out: the mark the stage leaves is at
        // offset 8.
        let ctx_in = [0u8; 192];
        let mut ctx_out = [0u8; 192];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("stage test run: {e:?}: {}", hex(frame)));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out, u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()))
    }

    fn counters(&self) -> BTreeMap<u32, u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.bpf.map(maps::EG_STATS).unwrap()).unwrap();
        (0..STAT_STRIDE)
            .map(|slot| (slot, stats.get(&stat_index(self.ifindex, slot), 0).unwrap().iter().sum::<u64>()))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Asserts exactly `want` counters moved since the last check.
    #[track_caller]
    fn moved(&mut self, want: &[EgressCounter], what: &str) {
        let now = self.counters();
        let mut got = BTreeMap::new();
        for (k, v) in &now {
            let d = v - self.seen.get(k).copied().unwrap_or(0);
            if d != 0 {
                got.insert(egress_counter_name(*k), d);
            }
        }
        self.seen = now;
        let want: BTreeMap<_, _> = want.iter().map(|&c| (egress_counter_name(c as u32), 1)).collect();
        assert_eq!(got, want, "counters after {what}");
    }
}

/// A segment with `flags` from `src` port 40000 to `dst`:`dport`.
fn segment(src: &str, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    if src.contains(':') {
        Packet::tcp_v6(v6(src), v6(dst), 40000, dport, flags).build()
    } else {
        Packet::tcp_v4(v4(src), v4(dst), 40000, dport, flags).build()
    }
}

/// `out` is the RST|ACK answering `syn`: addresses, ports and MACs
/// swapped, ack = seq + 1, a good TCP checksum.
#[track_caller]
fn assert_rst(syn: &[u8], out: &[u8], what: &str) {
    let ctx = format!("{what}\n  syn {}\n  out {}", hex(syn), hex(out));
    assert_eq!(out.len(), syn.len(), "{ctx}");
    assert_eq!((&out[0..6], &out[6..12]), (&syn[6..12], &syn[0..6]), "{ctx}: MACs");
    let v6 = syn[12..14] == [0x86, 0xdd];
    let (l4, alen, src_at) = if v6 { (14 + 40, 16, 14 + 8) } else { (14 + 20, 4, 14 + 12) };
    let (src, dst) = (&syn[src_at..src_at + alen], &syn[src_at + alen..src_at + 2 * alen]);
    assert_eq!(&out[src_at..src_at + alen], dst, "{ctx}: source = SYN's destination");
    assert_eq!(&out[src_at + alen..src_at + 2 * alen], src, "{ctx}: destination = SYN's source");
    let (t, s) = (&out[l4..], &syn[l4..]);
    assert_eq!((&t[0..2], &t[2..4]), (&s[2..4], &s[0..2]), "{ctx}: ports");
    let ack = u32::from_be_bytes([s[4], s[5], s[6], s[7]]).wrapping_add(1);
    assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), ack, "{ctx}: ack");
    assert_eq!(t[13], tcp_flags::RST | tcp_flags::ACK, "{ctx}: flags");
    let mut pseudo = out[src_at..src_at + 2 * alen].to_vec();
    if v6 {
        pseudo.extend_from_slice(&(t.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ipproto::TCP]);
    } else {
        pseudo.extend_from_slice(&[0, ipproto::TCP]);
        pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    }
    assert_eq!(checksum(&[&pseudo, t]), 0, "{ctx}: TCP checksum");
}

/// Until the stage is attached, both gates answer an explain pool's
/// blocked SYN with a RST, as for reject; once it is, the subscriber-side
/// XDP gate passes it to the stage (counting only the pool's hit), while
/// the uplink's gate, which sees forwarded SYNs after routing, still
/// rejects. Other pools, smarthosts and exempt sources are not affected.
#[test]
fn gates_reject_explain_pools_until_the_stage_is_attached() {
    let mut gk = Gk::new();
    for (src, dst, id) in [(POOLED4, MX4, 1), (POOLED6, MX6, 2)] {
        let syn = syn_to(src, dst, SMTP).build();
        for hook in [Hook::Xdp, Hook::Tc] {
            gk.stage(false, 0, 0);
            let (o, out) = gk.gate(hook, &syn);
            assert_eq!(o, Outcome::Reject, "{hook:?} {src}: not staged");
            assert_rst(&syn, &out, &format!("{hook:?} {src}: not staged"));
            gk.moved(&[EgressCounter::PoolRejected], "not staged");

            gk.stage(true, 0, 0);
            let hits = range_hits(&gk.bpf, id);
            let (o, out) = gk.gate(hook, &syn);
            if hook == Hook::Xdp {
                assert_eq!(o, Outcome::Pass, "XDP {src}: staged");
                assert_eq!(out, syn, "passed unchanged");
                gk.moved(&[], "XDP, staged: the stage counts");
            } else {
                assert_eq!(o, Outcome::Reject, "uplink TC {src}: staged or not");
                gk.moved(&[EgressCounter::PoolRejected], "uplink, staged");
            }
            assert_eq!(range_hits(&gk.bpf, id), hits + 1, "{hook:?} {src}: the pool's hit");

            // Dry-run: the XDP gate still leaves it to the stage.
            gk.dry_run(true);
            let (o, _) = gk.gate(hook, &syn);
            assert_eq!(o, Outcome::Pass, "{hook:?} {src}: dry-run");
            if hook == Hook::Xdp {
                gk.moved(&[], "XDP, staged, dry-run");
            } else {
                gk.moved(&[EgressCounter::PoolRejected, EgressCounter::DryRun], "uplink, dry-run");
            }
            gk.dry_run(false);
        }
        // Smarthost, exempt, another port: as for every pool.
        let smh = if src == POOLED4 { SMH4 } else { SMH6 };
        let exempt = if src == POOLED4 { EXEMPT4 } else { EXEMPT6 };
        for hook in [Hook::Xdp, Hook::Tc] {
            assert_eq!(gk.gate(hook, &syn_to(src, smh, SMTP).build()).0, Outcome::Pass);
            gk.moved(&[EgressCounter::SmarthostAllowed], "to a smarthost");
            assert_eq!(gk.gate(hook, &syn_to(exempt, dst, SMTP).build()).0, Outcome::Pass);
            gk.moved(&[EgressCounter::Exempt], "exempt");
            assert_eq!(gk.gate(hook, &syn_to(src, dst, SUBMISSION).build()).0, Outcome::Pass);
            gk.moved(&[], "unguarded port");
        }
    }
    // Inside a PPPoE session an explain pool's SYN cannot be explained (the
    // PPPoE socket drops the assignment) nor answered: dropped, staged or
    // not, and the stage leaves it alone.
    gk.stage(true, 0, 0);
    let pppoe = syn_to(POOLED4, MX4, SMTP).pppoe(7).build();
    assert_eq!(gk.gate(Hook::Xdp, &pppoe).0, Outcome::Drop, "PPPoE, staged");
    gk.moved(&[EgressCounter::PoolBlocked], "PPPoE");
    assert_eq!(gk.stage_run(&pppoe).0, TC_UNSPEC, "the stage leaves PPPoE alone");
    gk.moved(&[], "PPPoE stage");
    // A VLAN-tagged one is explained like an untagged one.
    let tagged = syn_to(POOLED4, MX4, SMTP).vlan(0x8100, 100).build();
    assert_eq!(gk.gate(Hook::Xdp, &tagged).0, Outcome::Pass, "VLAN, staged");
    gk.moved(&[], "VLAN");
    let (ret, out, _) = gk.stage_run(&tagged);
    assert_eq!(ret, TC_REDIRECT, "VLAN: the stage's fallback (no listener)");
    assert_eq!(&out[12..16], &tagged[12..16], "VLAN tag kept in the RST");
    gk.moved(&[EgressCounter::ExplainFallback], "VLAN stage");
    // Staging changes nothing for the other pools.
    let reject = syn_to("203.0.113.5", MX4, SMTP).build();
    let drop = syn_to("203.0.113.200", MX4, SMTP).build();
    for hook in [Hook::Xdp, Hook::Tc] {
        assert_eq!(gk.gate(hook, &reject).0, Outcome::Reject);
        gk.moved(&[EgressCounter::PoolRejected], "reject pool, staged");
        assert_eq!(gk.gate(hook, &drop).0, Outcome::Drop);
        gk.moved(&[EgressCounter::PoolBlocked], "drop pool, staged");
    }
}

/// The stage touches nothing but an explain pool's segments to a guarded
/// port that are not for a smarthost, and only while it is attached.
#[test]
fn stage_leaves_everything_else_alone() {
    let mut gk = Gk::new();
    gk.stage(true, 0, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a source in no pool", syn_to(OUTSIDE4, MX4, SMTP).build()),
        ("a reject pool", syn_to("203.0.113.5", MX4, SMTP).build()),
        ("a drop pool", syn_to("203.0.113.200", MX4, SMTP).build()),
        ("exempt v4", syn_to(EXEMPT4, MX4, SMTP).build()),
        ("exempt v6", syn_to(EXEMPT6, MX6, SMTP).build()),
        ("to a smarthost v4", syn_to(POOLED4, SMH4, SMTP).build()),
        ("to a smarthost v6", syn_to(POOLED6, SMH6, SMTP).build()),
        ("an unguarded port", syn_to(POOLED4, MX4, SUBMISSION).build()),
        ("UDP to 25", Packet::udp_v4(v4(POOLED4), v4(MX4), 40000, SMTP).build()),
        ("an ACK of no connection", segment(POOLED4, MX4, SMTP, tcp_flags::ACK)),
        ("a FIN|ACK of no connection v6", segment(POOLED6, MX6, SMTP, tcp_flags::FIN | tcp_flags::ACK)),
        ("a RST", segment(POOLED4, MX4, SMTP, tcp_flags::RST)),
        ("a first fragment", syn_to(POOLED4, MX4, SMTP).ipv4_fragment(0, true).build()),
    ];
    for (what, frame) in &cases {
        let (ret, out, mark) = gk.stage_run(frame);
        assert_eq!(ret, TC_UNSPEC, "{what}: passed to the next program");
        assert_eq!(&out, frame, "{what}: unchanged");
        assert_eq!(mark, 0, "{what}: not marked");
        gk.moved(&[], what);
    }
    // Not attached (as far as the agent said): the XDP gate rejected it.
    gk.stage(false, 0, 0);
    let syn = syn_to(POOLED4, MX4, SMTP).build();
    assert_eq!(gk.stage_run(&syn).0, TC_UNSPEC, "not staged");
    gk.moved(&[], "not staged");
}

/// No listener (the agent is down): the stage answers an explain pool's
/// SYN with a RST out of the interface it came in on, or drops one it
/// cannot answer; it is never passed on. Dry-run counts and passes.
#[test]
fn stage_without_a_listener_falls_back_to_a_rst() {
    let mut gk = Gk::new();
    gk.stage(true, 0, 0);
    for (src, dst) in [(POOLED4, MX4), (POOLED6, MX6)] {
        let syn = syn_to(src, dst, SMTP).build();
        let (ret, out, mark) = gk.stage_run(&syn);
        assert_eq!(ret, TC_REDIRECT, "{src}: the RST goes back out");
        assert_rst(&syn, &out, src);
        assert_eq!(mark, 0, "{src}: not marked");
        gk.moved(&[EgressCounter::ExplainFallback], src);

        // A SYN with data cannot be answered cleanly: dropped.
        let odd = syn_to(src, dst, SMTP).payload(b"EHLO").build();
        assert_eq!(gk.stage_run(&odd).0, TC_SHOT, "{src}: SYN with a payload");
        gk.moved(&[EgressCounter::ExplainFallback], "SYN with a payload");

        gk.dry_run(true);
        let (ret, out, _) = gk.stage_run(&syn);
        assert_eq!((ret, &out), (TC_UNSPEC, &syn), "{src}: dry-run");
        gk.moved(&[EgressCounter::PoolExplained, EgressCounter::DryRun], "dry-run");
        gk.dry_run(false);
    }
}

/// A listener there (the lookup finds it), but the assignment fails, as it
/// always does in a test run (see the file's doc): the SYN gets the
/// fallback RST, unmarked, never passed on. Likewise a segment of a
/// connection the agent owns is dropped when it cannot be assigned. The
/// listener lookup must not take a listener on the segment's own tuple (a
/// local MTA) for the agent's connection.
#[test]
fn a_failed_assignment_is_never_forwarded() {
    use socket2::{Domain, Socket, Type};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let mut gk = Gk::new();
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener.set_ip_transparent_v4(true).unwrap();
    listener.set_priority(LISTENER_PRIORITY).unwrap();
    listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    listener.listen(8).unwrap();
    let port = listener.local_addr().unwrap().as_socket().unwrap().port();
    gk.stage(true, port, 0);
    let syn = syn_to(POOLED4, MX4, SMTP).build();
    let (ret, out, mark) = gk.stage_run(&syn);
    assert_eq!(ret, TC_REDIRECT, "listener found, assignment refused: the fallback RST");
    assert_rst(&syn, &out, "failed assignment");
    assert_eq!(mark, 0, "not marked");
    gk.moved(&[EgressCounter::ExplainFallback], "failed assignment");

    // A connection on the loopback, its client in an explain pool.
    gk.ranges.add(RangeKind::Pool, "127.0.0.0/8", 9, Some(PoolAction::Explain));
    let server = TcpListener::bind("127.0.0.2:0").unwrap();
    let sport = server.local_addr().unwrap().port();
    let mut ports: Array<_, u32> = Array::try_from(gk.bpf.map_mut(maps::EG_PORTS).unwrap()).unwrap();
    ports.set(u32::from(sport), port_policy::GUARD, 0).unwrap();
    let client = TcpStream::connect(("127.0.0.2", sport)).unwrap();
    let (_conn, _) = server.accept().unwrap();
    let cport = client.local_addr().unwrap().port();
    let ack = Packet::tcp_v4(v4("127.0.0.1"), v4("127.0.0.2"), cport, sport, tcp_flags::ACK).build();
    let (ret, _, mark) = gk.stage_run(&ack);
    assert_eq!((ret, mark), (TC_SHOT, 0), "an owned connection's segment that cannot be assigned is dropped");
    gk.moved(&[], "owned segment");
    // The same from another port: only the listener matches its tuple.
    let stray = Packet::tcp_v4(v4("127.0.0.1"), v4("127.0.0.2"), cport ^ 1, sport, tcp_flags::ACK).build();
    assert_eq!(gk.stage_run(&stray).0, TC_UNSPEC, "a listener on the segment's tuple is not the agent's connection");
    gk.moved(&[], "stray ACK");
}
