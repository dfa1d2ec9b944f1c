//! The differential fuzzer's core: random and mutated frames through the
//! ingress gate (`gatekeeper_ingress`) and both egress gate programs
//! (`gatekeeper_subscriber`, XDP; `gatekeeper_egress`, TC) of one unpinned
//! instance, and socket lookups through its rejector (`gatekeeper_rejector`,
//! sk_lookup), against the host model ([`crate::model::Model`]).
//!
//! The run is split into epochs. Each epoch fills the maps afresh from the
//! seed: ranges of every kind (deny, learned deny, allow, pool that drops,
//! pool that rejects or explains, exempt, smarthost; TEST-NET prefixes, now
//! and then a whole family), guarded ingress ports, egress port policies
//! and rate-limit classes, verdicts of every action under IPv4, IPv6 /64
//! and IPv6 address keys (live or expired, some evicting others from a
//! small verdict table), the config flags (dry-run, hold), and the reject
//! settings: which refusal codes reject (range kinds too), up to eight
//! rejector ports (mostly guarded ones, with junk past the ones that
//! count), the agent's lease (running or lapsed), quiet sources among the
//! epoch's sources (quiet or quiet long ago), and real loopback listeners
//! in none, one or both of the rejector's sockmap slots. Then it runs
//! frames:
//!
//! - SYNs (and other segments, UDP) built with [`crate::packet`] across
//!   every layer: VLAN and QinQ tags (up to three), PPPoE sessions (both
//!   protocol-field forms, other PPP protocols), IPv4 options and
//!   fragments, IPv6 extension chains (hop-by-hop, routing, destination
//!   options, fragment, AH; past the walk's bound), TCP flags, options and
//!   payloads; from sources and to destinations in and around the ranges;
//! - the same, mutated ([`crate::model::mutate`]) or truncated at a random
//!   length;
//! - random bytes, mostly under an interesting ethertype.
//!
//! For every frame and program it compares the return value with the
//! model's (an XDP_ABORTED, an unknown return code or a refused test run
//! the model does not predict is an abort) and checks that a frame not
//! answered is not rewritten and an answered one is a RST|ACK. For every
//! guarded SYN the ingress gate decided on, and for one frame in four a
//! random source and port besides, it runs the rejector on the lookup of
//! that connection and compares its return value and the socket it
//! selected (by cookie) with the model's. Counters (the gates' and the
//! reject counters), range hits and events are compared at the end of each
//! epoch (or after every frame with `per_frame`).
//!
//! Covered state: the reported-sources slots (so hold mode and learned
//! ranges' reports are modelled exactly, in a clock situation where the
//! event interval and hold window outlast the run) and the rate-limit
//! buckets (an interval that outlasts the run: a source gets exactly its
//! burst). Not covered: what time does (verdicts expiring during the run,
//! hold windows ending, tokens coming back), which the in-kernel tests
//! check with a real clock, and a full event ring (drained every 1,000
//! frames; the model expects no lost event).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, SockMap},
    programs::ProgramError,
    Ebpf,
};
use gatekeeper::{
    datapath::calibrate_clock,
    domain::{Origin, PoolAction, RangeKind},
    store::RangeRecord,
    verdict_table::VerdictTable,
};
use gatekeeper_common::{
    action, addr,
    inbound::{self, inbound_counter_name, IN_COUNTERS, IN_STAT_ENTRIES},
    maps, port_policy, programs,
    reject::{
        self, quiet_slot, refusal, reject_counter_name, QuietSlot, RejectConfig, MAX_REJECT_PORTS, REJECT_COUNTER_SLOTS,
    },
    sourcetab::{source_slots, verdict_shift, SeenSlot as BpfSeenSlot},
    stat_index, Config, InBucket, KeyWords, LimitKey, RateLimit, SourceKey, Verdict, MAX_LIMIT_CLASSES, STAT_STRIDE,
};
use ipnet::IpNet;
use serde::Serialize;

use crate::model::{self, Expect, Model, Mutation, Quiet, Range, Steer};
use crate::packet::{ethertype, hex, tcp_flags, ExtHeader, Packet, L4};
use crate::ranges::{record, AgentRanges};
use crate::rng::Rng;
use crate::testrun::{self, skb_refuses, test_run, Hook, Lookup, Outcome, XDP_ABORTED};

/// Verdict-table buckets: small, so that verdicts share buckets and evict.
const VERDICT_BUCKETS: u32 = 256;
/// Token-bucket LRU entries: far more than an epoch's sources.
const LIMIT_BUCKETS: u32 = 262_144;
/// A rate-limit interval that outlasts any run (about 11 days).
const LONG_NS: u64 = 1_000_000_000_000_000;
/// Frames between two drains of the event ring.
const DRAIN_EVERY: u64 = 1000;
/// Mismatches printed in full before the run stops.
const MAX_REPORTED: u64 = 20;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub frames: u64,
    pub seed: u64,
    /// Frames per epoch (new map contents).
    pub epoch: u64,
    /// Compare counters after every frame rather than every epoch.
    pub per_frame: bool,
    /// Print progress every this many frames (0: never).
    pub progress_every: u64,
}

impl Options {
    pub fn new(frames: u64, seed: u64) -> Options {
        Options { frames, seed, epoch: 50_000, per_frame: false, progress_every: 1_000_000 }
    }
}

/// The result of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub frames: u64,
    pub epochs: u64,
    /// Program runs (three per frame, less the TC runs the kernel refuses,
    /// plus the rejector's lookups).
    pub runs: u64,
    /// Rejector runs (socket lookups).
    pub lookups: u64,
    /// "gate outcome" -> frames (e.g. "ingress drop", "egress reject"), and
    /// "rejector what" -> lookups (e.g. "rejector steered").
    pub outcomes: BTreeMap<String, u64>,
    /// Reject counters by name: what moved in the run (the model's
    /// expectation, which the datapath's counters matched unless a
    /// mismatch says otherwise).
    pub reject_counters: BTreeMap<String, u64>,
    /// Inbound limiter counters by name, over all classes (as
    /// `reject_counters`).
    pub inbound_counters: BTreeMap<String, u64>,
    /// Frames by kind of generation.
    pub kinds: BTreeMap<String, u64>,
    /// TC test runs the kernel refused, as predicted (frames too short for
    /// an skb of their ethertype).
    pub tc_refused: u64,
    pub mismatches: u64,
    pub aborts: u64,
    pub seconds: f64,
    pub frames_per_second: f64,
    /// The first mismatches, in full.
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.mismatches == 0 && self.aborts == 0
    }
}

/// The addresses and ports of an epoch that frames are built from.
#[derive(Default)]
struct Plan {
    src4: Vec<Ipv4Addr>,
    src6: Vec<Ipv6Addr>,
    dst4: Vec<Ipv4Addr>,
    dst6: Vec<Ipv6Addr>,
    ports: Vec<u16>,
}

/// The loaded instance and the maps the fuzzer writes and reads.
struct Instance {
    bpf: Ebpf,
    ifindex: u32,
    ranges: AgentRanges,
    verdicts: VerdictTable<MapData>,
    events: RingBuf<MapData>,
    ports: Array<MapData, u64>,
    config: Array<MapData, Config>,
    seen: Array<MapData, BpfSeenSlot>,
    eg_ports: Array<MapData, u32>,
    limits: Array<MapData, RateLimit>,
    buckets: BpfHashMap<MapData, LimitKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    eg_stats: PerCpuArray<MapData, u64>,
    hits: PerCpuArray<MapData, u64>,
    reject: Array<MapData, RejectConfig>,
    rejectors: SockMap<MapData>,
    quiet: Array<MapData, QuietSlot>,
    rej_stats: PerCpuArray<MapData, u64>,
    in_ports: Array<MapData, u32>,
    in_limits: Array<MapData, RateLimit>,
    in_buckets: Array<MapData, InBucket>,
    in_stats: PerCpuArray<MapData, u64>,
    /// The listeners in the `rejectors` slots (v4, v6), kept open: a closed
    /// socket leaves the sockmap.
    listeners: [Option<TcpListener>; 2],
    clock: (u64, u64),
}

fn take<T>(bpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let m = bpf.take_map(name).with_context(|| format!("map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name}"))
}

impl Instance {
    fn load() -> Result<Instance> {
        let progs = [programs::XDP_INGRESS, programs::XDP_SUBSCRIBER, programs::TC_EGRESS, programs::SK_REJECTOR];
        let mut bpf = testrun::load(
            VERDICT_BUCKETS,
            |l| {
                l.map_max_entries(maps::EG_BUCKETS, LIMIT_BUCKETS);
            },
            &progs,
        )?;
        let clock = calibrate_clock(&mut bpf)?.context("the datapath clock does not calibrate on this kernel")?;
        let ranges = AgentRanges::take(&mut bpf);
        let verdicts = VerdictTable::new(take(&mut bpf, maps::VERDICTS)?, testrun::HASH)?;
        Ok(Instance {
            ifindex: testrun::loopback(),
            ranges,
            verdicts,
            events: take(&mut bpf, maps::EVENTS)?,
            ports: take(&mut bpf, maps::PORTS)?,
            config: take(&mut bpf, maps::CONFIG)?,
            seen: take(&mut bpf, maps::SEEN)?,
            eg_ports: take(&mut bpf, maps::EG_PORTS)?,
            limits: take(&mut bpf, maps::EG_LIMITS)?,
            buckets: take(&mut bpf, maps::EG_BUCKETS)?,
            stats: take(&mut bpf, maps::STATS)?,
            eg_stats: take(&mut bpf, maps::EG_STATS)?,
            hits: take(&mut bpf, maps::RANGE_HITS)?,
            reject: take(&mut bpf, maps::REJECT)?,
            rejectors: take(&mut bpf, maps::REJECTORS)?,
            quiet: take(&mut bpf, maps::REJ_QUIET)?,
            rej_stats: take(&mut bpf, maps::REJ_STATS)?,
            in_ports: take(&mut bpf, maps::IN_PORTS)?,
            in_limits: take(&mut bpf, maps::IN_LIMITS)?,
            in_buckets: take(&mut bpf, maps::IN_BUCKETS)?,
            in_stats: take(&mut bpf, maps::IN_STATS)?,
            listeners: [None, None],
            clock,
            bpf,
        })
    }

    /// The counters of the test runs' interface slot, summed over CPUs.
    fn counters(&self, egress: bool) -> Result<Vec<u64>> {
        let map = if egress { &self.eg_stats } else { &self.stats };
        (0..STAT_STRIDE).map(|c| Ok(map.get(&stat_index(self.ifindex, c), 0)?.iter().sum::<u64>())).collect()
    }

    /// The reject counters, summed over CPUs.
    fn reject_counters(&self) -> Result<Vec<u64>> {
        (0..REJECT_COUNTER_SLOTS).map(|c| Ok(self.rej_stats.get(&c, 0)?.iter().sum::<u64>())).collect()
    }

    /// The inbound counters, summed over CPUs.
    fn inbound_counters(&self) -> Result<Vec<u64>> {
        (0..IN_STAT_ENTRIES).map(|c| Ok(self.in_stats.get(&c, 0)?.iter().sum::<u64>())).collect()
    }

    fn range_hits(&self, id: u32) -> Result<u64> {
        Ok(self.hits.get(&id, 0)?.iter().sum())
    }

    fn drain_events(&mut self) -> u64 {
        let mut n = 0;
        while self.events.next().is_some() {
            n += 1;
        }
        n
    }
}

/// A random address in `net`.
fn inside(rng: &mut Rng, net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = (rng.next() as u32) & !u32::from(n.netmask());
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            let host = r & !u128::from(n.netmask());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

const TEST_NETS4: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];

fn test_net4(rng: &mut Rng) -> Ipv4Addr {
    let [a, b, c] = TEST_NETS4[rng.below(3) as usize];
    Ipv4Addr::new(a, b, c, rng.next() as u8)
}

/// 2001:db8::/32 with a random rest, most of it in a few /48s so that
/// ranges, verdicts and sources meet.
fn test_net6(rng: &mut Rng) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    for x in &mut b[4..] {
        *x = rng.next() as u8;
    }
    if rng.below(4) != 0 {
        b[4] = 0;
        b[5] = rng.below(4) as u8;
        for x in &mut b[6..8] {
            *x = rng.below(3) as u8;
        }
        if rng.below(2) == 0 {
            for x in &mut b[8..15] {
                *x = 0;
            }
        }
    }
    Ipv6Addr::from(b)
}

fn random_net(rng: &mut Rng) -> IpNet {
    match rng.below(20) {
        0 => "0.0.0.0/0".parse().unwrap(),
        1 => "::/0".parse().unwrap(),
        2..=10 => {
            let a = test_net4(rng);
            let len = 24 + rng.below(9) as u8;
            IpNet::new(IpAddr::V4(a), len).unwrap().trunc()
        }
        _ => {
            let a = test_net6(rng);
            let lens = [32u8, 40, 48, 56, 60, 64, 64, 80, 96, 112, 120, 127, 128];
            let len = lens[rng.below(lens.len() as u64) as usize];
            IpNet::new(IpAddr::V6(a), len).unwrap().trunc()
        }
    }
}

/// Odd addresses worth having among the sources: IPv4-mapped, the
/// unspecified and loopback addresses, interface ids 0 and all ones.
fn odd_source6(rng: &mut Rng) -> Ipv6Addr {
    match rng.below(5) {
        0 => test_net4(rng).to_ipv6_mapped(),
        1 => Ipv6Addr::UNSPECIFIED,
        2 => Ipv6Addr::LOCALHOST,
        3 => {
            let s = u128::from(test_net6(rng)) & !u128::from(u64::MAX);
            Ipv6Addr::from(s)
        }
        _ => {
            let s = u128::from(test_net6(rng)) | u128::from(u64::MAX);
            Ipv6Addr::from(s)
        }
    }
}

/// Fills the maps (and the model) for a new epoch.
fn new_epoch(rng: &mut Rng, inst: &mut Instance, m: &mut Model, plan: &mut Plan) -> Result<()> {
    // Ranges: unique nets per kind; ids unique in the run's instance.
    let mut records = Vec::new();
    let mut ranges = Vec::new();
    let n = rng.below(40);
    let mut taken = std::collections::HashSet::new();
    for i in 0..n {
        let kind = [
            RangeKind::Deny,
            RangeKind::Deny,
            RangeKind::Allow,
            RangeKind::Pool,
            RangeKind::Pool,
            RangeKind::Exempt,
            RangeKind::Smarthost,
        ][rng.below(7) as usize];
        let net = random_net(rng);
        // One range of a table per net (the agent's database has one), but
        // allow and deny (exempt and pool) may share one.
        if !taken.insert((kind, net)) {
            continue;
        }
        let id = 1 + i as u32;
        let learned = kind == RangeKind::Deny && rng.below(3) == 0;
        let reject = kind == RangeKind::Pool && rng.below(2) == 0;
        // Explain pools (every other rejecting one, no extra draw): with the
        // explain stage not attached, both gates reject them.
        let action = (kind == RangeKind::Pool).then_some(match (reject, id % 2) {
            (false, _) => PoolAction::Drop,
            (true, 0) => PoolAction::Explain,
            (true, _) => PoolAction::Reject,
        });
        let r = record(id, kind, net, action);
        records.push(if learned { RangeRecord { origin: Origin::Learned, ..r } } else { r });
        ranges.push(Range { kind, net, id, learned, reject });
    }
    inst.ranges.replace(records);
    m.ranges = ranges;

    // Sources and destinations: in and around the ranges, odd ones, random.
    *plan = Plan::default();
    for r in &m.ranges {
        for _ in 0..3 {
            match inside(rng, &r.net) {
                IpAddr::V4(a) if r.kind == RangeKind::Smarthost => plan.dst4.push(a),
                IpAddr::V6(a) if r.kind == RangeKind::Smarthost => plan.dst6.push(a),
                IpAddr::V4(a) => plan.src4.push(a),
                IpAddr::V6(a) => plan.src6.push(a),
            }
        }
    }
    for _ in 0..16 {
        plan.src4.push(test_net4(rng));
        plan.src6.push(test_net6(rng));
        plan.dst4.push(test_net4(rng));
        plan.dst6.push(test_net6(rng));
    }
    for _ in 0..4 {
        plan.src6.push(odd_source6(rng));
        plan.src4.push(Ipv4Addr::from(rng.next() as u32));
        plan.src6.push(Ipv6Addr::from((u128::from(rng.next()) << 64) | u128::from(rng.next())));
    }
    plan.dst4.extend(plan.src4.iter().take(4).copied());
    plan.dst6.extend(plan.src6.iter().take(4).copied());

    // Ports: 25 and a few more guarded at ingress; egress policies.
    for &p in &m.ports {
        let (w, _) = addr::port_slot(p);
        inst.ports.set(w, 0, 0)?;
    }
    for &p in m.policy.keys() {
        inst.eg_ports.set(u32::from(p), 0, 0)?;
    }
    plan.ports = vec![25, 587, 465, 2525, 0, 65535, 80, rng.next() as u16, rng.next() as u16];
    m.ports.clear();
    m.policy.clear();
    for &p in &plan.ports {
        if p == 25 || rng.below(3) == 0 {
            m.ports.insert(p);
        }
        if rng.below(4) != 0 {
            let word = if rng.below(8) == 0 {
                rng.next() as u32 & 0xffff
            } else {
                port_policy::word(p == 25 || rng.below(2) == 0, rng.below(MAX_LIMIT_CLASSES as u64 + 2) as u32)
            };
            m.policy.insert(p, word);
        }
    }
    let mut words: HashMap<u32, u64> = HashMap::new();
    for &p in &m.ports {
        let (w, bit) = addr::port_slot(p);
        *words.entry(w).or_default() |= bit;
    }
    for (w, bits) in words {
        inst.ports.set(w, bits, 0)?;
    }
    for (&p, &word) in &m.policy {
        inst.eg_ports.set(u32::from(p), word, 0)?;
    }
    for class in 0..MAX_LIMIT_CLASSES {
        let l = match rng.below(3) {
            0 => RateLimit::default(),
            _ => {
                let burst = rng.below(4);
                RateLimit { interval_ns: LONG_NS, burst_ns: burst * LONG_NS }
            }
        };
        inst.limits.set(class, l, 0)?;
        m.limits[class as usize] = l;
    }
    // Token buckets: empty.
    let keys: Vec<LimitKey> = inst.buckets.keys().collect::<Result<_, _>>()?;
    for k in keys {
        inst.buckets.remove(&k)?;
    }
    m.buckets.clear();

    // Inbound limiter: classes on some ports (guarded or not; sometimes
    // past the table), limits like the egress gate's, buckets emptied.
    for &p in m.in_ports.keys() {
        inst.in_ports.set(u32::from(p), 0, 0)?;
    }
    m.in_ports.clear();
    for &p in &plan.ports {
        if rng.below(2) == 0 {
            let class =
                if rng.below(10) == 0 { rng.next() as u32 } else { rng.below(MAX_LIMIT_CLASSES as u64 + 2) as u32 };
            m.in_ports.insert(p, class);
            inst.in_ports.set(u32::from(p), class, 0)?;
        }
    }
    for class in 0..MAX_LIMIT_CLASSES {
        let l = match rng.below(3) {
            0 => RateLimit::default(),
            _ => RateLimit { interval_ns: LONG_NS, burst_ns: rng.below(4) * LONG_NS },
        };
        inst.in_limits.set(class, l, 0)?;
        m.in_limits[class as usize] = l;
    }
    for k in std::mem::take(&mut m.in_buckets).into_keys() {
        let a = &k.addr;
        let words = KeyWords::of(&SourceKey { addr: *a });
        inst.in_buckets.set(inbound::in_bucket(&words, k.class, &testrun::HASH), InBucket::default(), 0)?;
    }

    // Reported sources: empty.
    for &slot in m.seen.keys() {
        inst.seen.set(slot, BpfSeenSlot::default(), 0)?;
    }
    m.seen.clear();

    // Verdicts: of every action, live or expired, under every kind of key.
    for key in std::mem::take(&mut m.verdicts).into_keys() {
        inst.verdicts.remove(key)?;
    }
    let now = testrun::monotonic_ns();
    m.now_ns = now;
    let day = 86_400_000_000_000;
    let shift = verdict_shift(VERDICT_BUCKETS);
    let empty = source_slots(&KeyWords::default(), &testrun::HASH, shift);
    for _ in 0..rng.below(400) {
        let ip: IpAddr = if rng.below(2) == 0 {
            IpAddr::V4(plan.src4[rng.below(plan.src4.len() as u64) as usize])
        } else {
            IpAddr::V6(plan.src6[rng.below(plan.src6.len() as u64) as usize])
        };
        let key = match rng.below(2) {
            0 => SourceKey::from_ip(ip),
            _ => SourceKey::host(ip),
        };
        // Not where a source in ::/64 (whose /64 key is the empty key)
        // searches: see `Model`.
        let at = source_slots(&KeyWords::of(&key).bucket_key(), &testrun::HASH, shift);
        if KeyWords::of(&key).is_empty()
            || [at.first, at.second].iter().any(|b| [empty.first, empty.second].contains(b))
        {
            continue;
        }
        let expires_ns = match rng.below(5) {
            0 => 1,
            1 => now.saturating_sub(day).max(1),
            2 => now + 10 * day,
            _ => u64::MAX,
        };
        let action =
            [action::PASS, action::DROP, action::DROP, action::PRESUMED_DROP, action::BAN, 9][rng.below(6) as usize];
        let v = Verdict { expires_ns, action, reason: rng.below(10) as u32 };
        // An error: both buckets hold nothing evictable, nothing written.
        if let Ok(evicted) = inst.verdicts.insert(key, v) {
            if let Some(e) = evicted {
                m.verdicts.remove(&e);
            }
            m.verdicts.insert(key, v);
        }
    }

    // Config: dry-run and hold at random; the interval and the hold
    // window outlast the run.
    m.flags = rng.below(4) as u32;
    m.hash = testrun::HASH;
    let (tick_ns, clock_offset_ns) = inst.clock;
    let cfg = Config {
        event_interval_ns: 1 << 62,
        flags: m.flags,
        hold_ms: u32::MAX,
        tick_ns,
        clock_offset_ns,
        hash: testrun::HASH,
    };
    inst.config.set(0, cfg, 0)?;
    reject_settings(rng, inst, m, plan, now)
}

/// The reject settings of a new epoch (see the module's doc), `now` the
/// datapath clock's time about now.
fn reject_settings(rng: &mut Rng, inst: &mut Instance, m: &mut Model, plan: &Plan, now: u64) -> Result<()> {
    let day = 86_400_000_000_000;
    let codes = (1u32 << refusal::COUNT) - 1;
    let actions = match rng.below(8) {
        0 => 0,
        1 => codes,
        2 => rng.next() as u32,
        _ => rng.next() as u32 & codes,
    };
    // The guarded ports in a fixed order, so that the seed decides.
    let mut guarded: Vec<u16> = m.ports.iter().copied().collect();
    guarded.sort_unstable();
    let mut ports = [0u16; MAX_REJECT_PORTS];
    for p in &mut ports {
        *p = match rng.below(8) {
            0 => pick(rng, &plan.ports),
            1 => rng.next() as u16,
            _ => pick(rng, &guarded),
        };
    }
    let nports = rng.below(MAX_REJECT_PORTS as u64 + 1) as usize;
    let lease = rng.below(4) != 0;
    let lease_ns =
        if lease { pick(rng, &[u64::MAX, now + 10 * day]) } else { pick(rng, &[0, 1, now.saturating_sub(day)]) };
    // No SYN budget: its state is per CPU, which the model cannot follow
    // (`xdp_decisions` tests it on one pinned CPU).
    let syn_limit = gatekeeper_common::RateLimit::default();
    inst.reject.set(0, RejectConfig { actions, nports: nports as u32, lease_ns, ports, syn_limit }, 0)?;

    // Quiet sources: half of them among the refused ones, which alone the
    // quiet table can keep from the rejector.
    let sources: Vec<IpAddr> =
        plan.src4.iter().map(|&a| IpAddr::V4(a)).chain(plan.src6.iter().map(|&a| IpAddr::V6(a))).collect();
    let refused: Vec<IpAddr> = sources.iter().copied().filter(|&a| m.refusal(a).is_some()).collect();
    let rs = &mut m.reject;
    rs.actions = actions;
    rs.ports = ports[..nports].to_vec();
    rs.lease = lease;
    for &slot in rs.quiet.keys() {
        inst.quiet.set(slot, QuietSlot::default(), 0)?;
    }
    rs.quiet.clear();
    for _ in 0..rng.below(13) {
        let src = if refused.is_empty() || rng.below(2) == 0 { pick(rng, &sources) } else { pick(rng, &refused) };
        let key = model::own_key(&src);
        let live = rng.below(4) != 0;
        let until_ns =
            if live { pick(rng, &[u64::MAX, now + 10 * day]) } else { pick(rng, &[1, now.saturating_sub(day)]) };
        let slot = quiet_slot(&key, &testrun::HASH);
        inst.quiet.set(slot, QuietSlot { key, until_ns }, 0)?;
        rs.quiet.insert(slot, Quiet { key, live });
    }

    // Listeners: none, one or both slots; a slot that keeps one gets a
    // new one (a new cookie).
    let present = match rng.below(4) {
        0 => [false, false],
        1 => [true, false],
        2 => [false, true],
        _ => [true, true],
    };
    for (slot, addr) in [(reject::SLOT_V4, "127.0.0.1:0"), (reject::SLOT_V6, "[::1]:0")] {
        let i = slot as usize;
        if present[i] {
            let (l, cookie) = testrun::listener(addr).with_context(|| format!("listener on {addr}"))?;
            inst.rejectors.set(slot, &l, 0)?;
            // The old listener (if any) closes once its slot holds the new one.
            inst.listeners[i] = Some(l);
            rs.listeners[i] = Some(cookie);
        } else if let Some(old) = inst.listeners[i].take() {
            inst.rejectors.clear_index(&slot)?;
            drop(old);
            rs.listeners[i] = None;
        }
    }
    Ok(())
}

fn pick<T: Copy>(rng: &mut Rng, v: &[T]) -> T {
    v[rng.below(v.len() as u64) as usize]
}

/// A random segment (mostly a SYN) over random layers.
fn random_packet(rng: &mut Rng, plan: &Plan) -> Packet {
    let v6 = rng.below(2) == 0;
    let dport = if rng.below(8) == 0 { rng.next() as u16 } else { pick(rng, &plan.ports) };
    let sport = rng.next() as u16;
    let flags = match rng.below(10) {
        0..=5 => tcp_flags::SYN,
        6 => tcp_flags::SYN | [0x40, 0x80, tcp_flags::FIN, tcp_flags::PSH, tcp_flags::URG][rng.below(5) as usize],
        7 => pick(rng, &tcp_flags::NOT_SYN).0,
        _ => rng.next() as u8,
    };
    let mut p = if v6 {
        let s = if rng.below(10) == 0 { odd_source6(rng) } else { pick(rng, &plan.src6) };
        let d = pick(rng, &plan.dst6);
        match rng.below(12) {
            0 => Packet::udp_v6(s, d, sport, dport),
            _ => Packet::tcp_v6(s, d, sport, dport, flags),
        }
    } else {
        let s = pick(rng, &plan.src4);
        let d = pick(rng, &plan.dst4);
        match rng.below(12) {
            0 => Packet::udp_v4(s, d, sport, dport),
            _ => Packet::tcp_v4(s, d, sport, dport, flags),
        }
    };
    if let L4::Tcp { seq, .. } = &mut p.l4 {
        *seq = rng.next() as u32;
    }
    if matches!(p.l4, L4::Tcp { .. }) && rng.below(2) == 0 {
        let n = rng.below(41) as usize;
        p = p.tcp_options(&rng.bytes(n));
    }
    if rng.below(5) == 0 {
        let n = 1 + rng.below(64) as usize;
        p = p.payload(&rng.bytes(n));
    }
    if v6 {
        if rng.below(2) == 0 {
            let n = if rng.below(8) == 0 { 5 + rng.below(4) } else { rng.below(4) };
            for _ in 0..n {
                let h = match rng.below(12) {
                    0..=2 => {
                        let n = rng.below(14) as usize;
                        ExtHeader::HopByHop(rng.bytes(n))
                    }
                    3..=5 => {
                        let n = rng.below(30) as usize;
                        ExtHeader::DestOpts(rng.bytes(n))
                    }
                    6 | 7 => ExtHeader::routing(&[pick(rng, &plan.dst6)]),
                    8 | 9 => ExtHeader::fragment(
                        if rng.below(2) == 0 { 0 } else { rng.below(0x2000) as u16 },
                        rng.below(2) == 0,
                    ),
                    10 => ExtHeader::fragment(0, true),
                    _ => ExtHeader::ah(),
                };
                p = p.ext(h);
            }
        }
    } else {
        if rng.below(4) == 0 {
            let n = rng.below(41) as usize;
            p = p.ipv4_options(&rng.bytes(n));
        }
        if rng.below(6) == 0 {
            let off = if rng.below(2) == 0 { 0 } else { rng.below(0x2000) as u16 };
            p = p.ipv4_fragment(off, rng.below(2) == 0);
        }
    }
    match rng.below(8) {
        0 => p = p.vlan(ethertype::VLAN, rng.next() as u16),
        1 => p = p.qinq(rng.next() as u16, rng.next() as u16),
        2 => {
            for _ in 0..3 {
                p = p.vlan(pick(rng, &[ethertype::VLAN, ethertype::QINQ]), rng.next() as u16);
            }
        }
        _ => {}
    }
    match rng.below(6) {
        0 => p = p.pppoe(rng.next() as u16),
        1 => p = p.pppoe_compressed(rng.next() as u16),
        2 if rng.below(4) == 0 => p = p.pppoe(1).ppp_protocol(pick(rng, &[0xc021, 0x8021, 0x0023, 0x0021, 0x0057])),
        _ => {}
    }
    p
}

/// How mutated frames are changed.
const MUTATION: Mutation = Mutation {
    span: 140,
    planted: &[
        0, 1, 4, 5, 6, 0x02, 0x12, 0x20, 0x11, 43, 44, 51, 59, 60, 0xff, 0x45, 0x50, 0x21, 0x57, 0x81, 0x88, 0x86,
    ],
    resize_one_in: 5,
    extend_below: 64,
};

/// Random bytes, mostly under an interesting ethertype.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let max = if rng.below(4) == 0 { 1500 } else { 120 };
    let len = 14 + rng.below(max) as usize;
    let mut f = rng.bytes(len);
    if rng.below(8) != 0 {
        let et = pick(rng, &[0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x8864, 0x0806]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        if len > 14 {
            f[14] = match et {
                0x86dd => 0x60 | (f[14] & 0x0f),
                0x0800 => 0x40 | (f[14] & 0x0f),
                _ => f[14],
            };
        }
    }
    f
}

/// The next frame and what kind it is.
fn next_frame(rng: &mut Rng, plan: &Plan) -> (&'static str, Vec<u8>) {
    match rng.below(20) {
        0..=6 => ("built", random_packet(rng, plan).build()),
        7..=14 => {
            let mut f = random_packet(rng, plan).build();
            model::mutate(rng, &mut f, &MUTATION);
            ("mutated", f)
        }
        15..=17 => {
            let f = random_packet(rng, plan).build();
            let len = 14 + rng.below(f.len() as u64 - 13) as usize;
            ("truncated", f[..len].to_vec())
        }
        _ => ("random", random_frame(rng)),
    }
}

/// What one program run gave.
enum Ran {
    Code(u32, Vec<u8>),
    /// The kernel refused the test run (EINVAL).
    Refused,
}

fn run_prog(inst: &Instance, prog: &str, frame: &[u8]) -> Result<Ran, String> {
    let mut out = vec![0u8; frame.len() + 256];
    match test_run(&inst.bpf, prog, frame, Some(inst.ifindex), 1, Some(&mut out)) {
        Ok(r) => {
            out.truncate(r.data_size_out as usize);
            Ok(Ran::Code(r.return_value, out))
        }
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => Ok(Ran::Refused),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// A source and a port for a lookup of a connection no frame stands for:
/// the epoch's sources (now and then an odd one), to the rejector's ports,
/// the epoch's ports or any.
fn random_lookup(rng: &mut Rng, plan: &Plan, m: &Model) -> (IpAddr, u16) {
    let src = match rng.below(10) {
        0 => IpAddr::V6(odd_source6(rng)),
        1..=4 => IpAddr::V6(pick(rng, &plan.src6)),
        _ => IpAddr::V4(pick(rng, &plan.src4)),
    };
    let port = match rng.below(4) {
        0 | 1 if !m.reject.ports.is_empty() => pick(rng, &m.reject.ports),
        0..=2 => pick(rng, &plan.ports),
        _ => rng.next() as u16,
    };
    (src, port)
}

/// The lookup of a TCP connection from `src` to `port` on one of the
/// epoch's destinations of its family, from any source port (the program
/// reads neither the destination address nor the source port).
fn lookup_of(rng: &mut Rng, plan: &Plan, src: IpAddr, port: u16) -> Lookup {
    let dst = match src {
        IpAddr::V4(_) => IpAddr::V4(pick(rng, &plan.dst4)),
        IpAddr::V6(_) => IpAddr::V6(pick(rng, &plan.dst6)),
    };
    Lookup { src: (src, rng.next() as u16).into(), dst: (dst, port).into(), udp: false }
}

fn steer_name(s: &Steer) -> &'static str {
    match s {
        Steer::None => "none",
        Steer::Listener { .. } => "steered",
        Steer::Missing => "missing",
        Steer::DryRun => "dry-run",
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Drop => "drop",
        Outcome::Reject => "reject",
    }
}

/// Checks one program's run of `frame` against `want`; Err(abort?, what).
fn check_run(hook: Option<Hook>, ran: Ran, frame: &[u8], want: &Expect) -> Result<(), (bool, String)> {
    let want_o = want.outcome();
    let (code, out) = match ran {
        Ran::Refused if hook == Some(Hook::Tc) && skb_refuses(frame) => return Ok(()),
        Ran::Refused => return Err((true, "the test run was refused (EINVAL)".into())),
        Ran::Code(_, _) if hook == Some(Hook::Tc) && skb_refuses(frame) => {
            return Err((false, "the TC test run took a frame the kernel should refuse".into()))
        }
        Ran::Code(c, o) => (c, o),
    };
    let got = match hook {
        None => {
            if code == XDP_ABORTED {
                return Err((true, "XDP_ABORTED".into()));
            }
            Hook::Xdp.outcome(code).filter(|&o| o != Outcome::Reject)
        }
        Some(h) => {
            if h == Hook::Xdp && code == XDP_ABORTED {
                return Err((true, "XDP_ABORTED".into()));
            }
            h.outcome(code)
        }
    };
    let Some(got) = got else { return Err((true, format!("return code {}", code as i32))) };
    if got != want_o {
        return Err((
            false,
            format!("expected {}, got {} (return code {})", outcome_name(want_o), outcome_name(got), code as i32),
        ));
    }
    if got == Outcome::Reject {
        // The answer: a RST|ACK with the ports swapped, in place.
        let model::Walk::Tcp(seg) = model::walk(frame, model::Gate::Egress) else {
            return Err((false, "a reject of a frame the model cannot walk".into()));
        };
        let t = seg.tcp;
        let ok = out.len() == frame.len()
            && out[t + 13] == tcp_flags::RST | tcp_flags::ACK
            && out[t..t + 2] == frame[t + 2..t + 4]
            && out[t + 2..t + 4] == frame[t..t + 2];
        if !ok {
            return Err((false, format!("the answer is no RST|ACK to the SYN: {}", hex(&out))));
        }
    } else if out != frame {
        return Err((false, format!("a frame not answered was rewritten: {}", hex(&out))));
    }
    Ok(())
}

/// Expected counter, hit and event totals since the last comparison.
#[derive(Default)]
struct Tally {
    ingress: BTreeMap<u32, u64>,
    egress: BTreeMap<u32, u64>,
    rej: BTreeMap<u32, u64>,
    inbound: BTreeMap<u32, u64>,
    hits: BTreeMap<u32, u64>,
    events: u64,
}

impl Tally {
    fn add(&mut self, e: &Expect, egress: bool) {
        let counters = if egress { &mut self.egress } else { &mut self.ingress };
        for &c in &e.counters {
            *counters.entry(c).or_default() += 1;
        }
        for &c in &e.rej {
            *self.rej.entry(c).or_default() += 1;
        }
        for &c in &e.inbound {
            *self.inbound.entry(c).or_default() += 1;
        }
        for &h in &e.hits {
            *self.hits.entry(h).or_default() += 1;
        }
        self.events += u64::from(e.events);
    }

    fn add_lookup(&mut self, steer: &Steer) {
        if let Some(c) = steer.counter() {
            *self.rej.entry(c).or_default() += 1;
        }
    }
}

impl Report {
    /// Adds a compared batch's reject counters to the run's.
    fn absorb(&mut self, tally: &Tally) {
        for (&c, &n) in &tally.rej {
            *self.reject_counters.entry(reject_counter_name(c).into()).or_default() += n;
        }
        for (&c, &n) in &tally.inbound {
            *self.inbound_counters.entry(inbound_counter_name(c % IN_COUNTERS).into()).or_default() += n;
        }
    }
}

/// The datapath's counters and hits as of now, to compare deltas against.
struct Snapshot {
    ingress: Vec<u64>,
    egress: Vec<u64>,
    rej: Vec<u64>,
    inbound: Vec<u64>,
    hits: BTreeMap<u32, u64>,
}

fn snapshot(inst: &Instance, ids: impl Iterator<Item = u32>) -> Result<Snapshot> {
    let mut hits = BTreeMap::new();
    for id in ids {
        hits.insert(id, inst.range_hits(id)?);
    }
    Ok(Snapshot {
        ingress: inst.counters(false)?,
        egress: inst.counters(true)?,
        rej: inst.reject_counters()?,
        inbound: inst.inbound_counters()?,
        hits,
    })
}

/// Compares what moved since `before` (and the events drained) with the
/// tally; a description of every difference.
fn compare(inst: &Instance, before: &Snapshot, tally: &Tally, events: u64) -> Result<Vec<String>> {
    let mut diffs = Vec::new();
    let now = snapshot(inst, before.hits.keys().copied())?;
    for (name, was, is, want) in [
        ("ingress", &before.ingress, &now.ingress, &tally.ingress),
        ("egress", &before.egress, &now.egress, &tally.egress),
    ] {
        for c in 0..STAT_STRIDE {
            let got = is[c as usize] - was[c as usize];
            let w = want.get(&c).copied().unwrap_or(0);
            if got != w {
                let label = if name == "ingress" {
                    gatekeeper_common::counters::counter_name(c)
                } else {
                    gatekeeper_common::counters::egress_counter_name(c)
                };
                diffs.push(format!("{name} counter {label}: expected +{w}, got +{got}"));
            }
        }
    }
    for c in 0..REJECT_COUNTER_SLOTS {
        let got = now.rej[c as usize] - before.rej[c as usize];
        let w = tally.rej.get(&c).copied().unwrap_or(0);
        if got != w {
            diffs.push(format!("reject counter {}: expected +{w}, got +{got}", reject_counter_name(c)));
        }
    }
    for c in 0..IN_STAT_ENTRIES {
        let got = now.inbound[c as usize] - before.inbound[c as usize];
        let w = tally.inbound.get(&c).copied().unwrap_or(0);
        if got != w {
            diffs.push(format!(
                "inbound counter class {} {}: expected +{w}, got +{got}",
                c / IN_COUNTERS,
                inbound_counter_name(c % IN_COUNTERS)
            ));
        }
    }
    for (id, was) in &before.hits {
        let got = now.hits[id] - was;
        let w = tally.hits.get(id).copied().unwrap_or(0);
        if got != w {
            diffs.push(format!("range {id} hits: expected +{w}, got +{got}"));
        }
    }
    if events != tally.events {
        diffs.push(format!("events: expected {}, got {events}", tally.events));
    }
    Ok(diffs)
}

/// Runs the fuzzer; `log` gets progress lines and mismatches as they come.
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Report> {
    let mut inst = Instance::load()?;
    let mut rng = Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut m = Model::default();
    let mut plan = Plan::default();
    let mut report = Report { seed: opts.seed, ..Report::default() };
    let started = Instant::now();
    let ids = |m: &Model| m.ranges.iter().map(|r| r.id).collect::<Vec<_>>();
    let mut tally = Tally::default();
    let mut events = 0u64;
    let mut before = snapshot(&inst, std::iter::empty())?;
    let mut epoch_start = 0u64;
    let fail = |report: &mut Report, abort: bool, text: String, log: &mut dyn FnMut(&str)| {
        if abort {
            report.aborts += 1;
        } else {
            report.mismatches += 1;
        }
        if report.failures.len() < MAX_REPORTED as usize {
            log(&text);
            report.failures.push(text);
        }
    };
    for i in 0..opts.frames {
        if i % opts.epoch == 0 {
            if i > 0 {
                events += inst.drain_events();
                for d in compare(&inst, &before, &tally, events)? {
                    let text =
                        format!("seed {} epoch {} (frames {epoch_start}..{i}): {d}", opts.seed, report.epochs - 1);
                    fail(&mut report, false, text, log);
                }
                report.absorb(&tally);
            }
            new_epoch(&mut rng, &mut inst, &mut m, &mut plan)?;
            report.epochs += 1;
            epoch_start = i;
            inst.drain_events();
            tally = Tally::default();
            events = 0;
            before = snapshot(&inst, ids(&m).into_iter())?;
        }
        let (kind, frame) = next_frame(&mut rng, &plan);
        *report.kinds.entry(kind.into()).or_default() += 1;
        report.frames += 1;

        // Ingress.
        let want = m.ingress(&frame);
        let ran = run_prog(&inst, programs::XDP_INGRESS, &frame);
        report.runs += 1;
        *report.outcomes.entry(format!("ingress {}", outcome_name(want.outcome()))).or_default() += 1;
        let verdict = ran.map_err(|e| (true, e)).and_then(|r| check_run(None, r, &frame, &want));
        if let Err((abort, what)) = verdict {
            let text = format!(
                "seed {} frame {i} ({kind}) ingress: {what}\n  expected {want:?}\n  frame {}",
                opts.seed,
                hex(&frame)
            );
            fail(&mut report, abort, text, log);
        }
        tally.add(&want, false);

        // The rejector: the lookup of the guarded SYN's connection, and
        // now and then one of a random source and port.
        let mut lookups = Vec::new();
        if let Some((src, port)) = want.decided {
            lookups.push(("syn", src, port));
        }
        if rng.below(4) == 0 {
            let (src, port) = random_lookup(&mut rng, &plan, &m);
            lookups.push(("random", src, port));
        }
        for (what, src, port) in lookups {
            let steer = m.rejector(src, port);
            let lookup = lookup_of(&mut rng, &plan, src, port);
            report.runs += 1;
            report.lookups += 1;
            *report.outcomes.entry(format!("rejector {}", steer_name(&steer))).or_default() += 1;
            tally.add_lookup(&steer);
            let want = steer.result();
            let text = |got: String| {
                format!(
                    "seed {} frame {i} ({kind}) rejector, {what} lookup from {src} to port {port}: expected {steer:?} \
                     (return {}, cookie {}), got {got}\n  frame {}",
                    opts.seed,
                    want.0,
                    want.1,
                    hex(&frame)
                )
            };
            match testrun::sk_lookup_run(&inst.bpf, programs::SK_REJECTOR, &lookup, 1) {
                Ok(run) if (run.retval, run.cookie) == want => {}
                Ok(run) => fail(&mut report, false, text(format!("return {}, cookie {}", run.retval, run.cookie)), log),
                Err(e) => fail(&mut report, true, text(format!("a refused test run: {e}")), log),
            }
        }

        // Egress: both programs read the same maps; the model's state moves
        // once per program run.
        for hook in [Hook::Xdp, Hook::Tc] {
            let refused = hook == Hook::Tc && skb_refuses(&frame);
            let want = if refused { Expect::default() } else { m.egress(&frame) };
            let ran = run_prog(&inst, hook.egress_program(), &frame);
            if refused {
                report.tc_refused += 1;
            } else {
                report.runs += 1;
                tally.add(&want, true);
            }
            if hook == Hook::Tc {
                *report.outcomes.entry(format!("egress {}", outcome_name(want.outcome()))).or_default() += 1;
            }
            let verdict = ran.map_err(|e| (true, e)).and_then(|r| check_run(Some(hook), r, &frame, &want));
            if let Err((abort, what)) = verdict {
                let text = format!(
                    "seed {} frame {i} ({kind}) egress {}: {what}\n  expected {want:?}\n  frame {}",
                    opts.seed,
                    hook.label(),
                    hex(&frame)
                );
                fail(&mut report, abort, text, log);
            }
        }

        if (i + 1) % DRAIN_EVERY == 0 {
            events += inst.drain_events();
        }
        if opts.per_frame {
            events += inst.drain_events();
            let diffs = compare(&inst, &before, &tally, events)?;
            for d in diffs {
                let text = format!("seed {} frame {i} ({kind}): {d}\n  frame {}", opts.seed, hex(&frame));
                fail(&mut report, false, text, log);
            }
            report.absorb(&tally);
            tally = Tally::default();
            events = 0;
            before = snapshot(&inst, ids(&m).into_iter())?;
        }
        if report.mismatches + report.aborts >= MAX_REPORTED {
            log(&format!("stopping after {} failures", MAX_REPORTED));
            break;
        }
        if opts.progress_every > 0 && (i + 1) % opts.progress_every == 0 {
            let secs = started.elapsed().as_secs_f64();
            log(&format!(
                "{} frames, {} mismatches, {} aborts, {:.0} frames/s",
                i + 1,
                report.mismatches,
                report.aborts,
                (i + 1) as f64 / secs
            ));
        }
    }
    if report.frames > 0 && report.mismatches + report.aborts < MAX_REPORTED {
        events += inst.drain_events();
        for d in compare(&inst, &before, &tally, events)? {
            let text = format!("seed {} last epoch (frames {epoch_start}..): {d}", opts.seed);
            fail(&mut report, false, text, log);
        }
        report.absorb(&tally);
    }
    let secs = started.elapsed().as_secs_f64();
    report.seconds = (secs * 10.0).round() / 10.0;
    report.frames_per_second = (report.frames as f64 / secs.max(1e-9)).round();
    Ok(report)
}
