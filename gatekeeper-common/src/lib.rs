//! The kernel/user contract of gatekeeper: map names, sizes, `#[repr(C)]`
//! value types and the counter layout. Everything the eBPF programs and the
//! agent must agree on lives here and nowhere else.
//!
//! Pod rules: explicit padding, no `bool`/`Option`, sizes asserted at compile
//! time. With the `user` feature the types implement `aya::Pod`.
#![cfg_attr(not(any(test, feature = "user")), no_std)]

pub mod addr;
pub mod counters;
pub mod explain;
pub mod inbound;
pub mod reject;
pub mod sourcetab;
pub mod trie;

pub use counters::{Counter, EgressCounter};
pub use inbound::{InBucket, InSlot, InboundCounter};
pub use sourcetab::{KeyWords, SeenSlot, VerdictBucket, VerdictSlot, SEEN_SLOTS};

/// Map names (as in the ELF object and as pinned under `<pin-dir>/maps/`).
pub mod maps {
    /// Ingress ranges (allow and deny), IPv4 and IPv6: the nodes of a
    /// multibit trie (see [`trie`](crate::trie)), an mmap-able array.
    pub const RANGES: &str = "GK_RANGES";
    /// Every range entry by range id, for userspace readers only (`status`,
    /// `stats` and restarts read the ranges back from here).
    pub const RANGE_INDEX: &str = "GK_RANGE_INDEX";
    /// Per-source verdicts: an array of [`VerdictBucket`](crate::VerdictBucket)s
    /// (see [`sourcetab`](crate::sourcetab)).
    pub const VERDICTS: &str = "GK_VERDICTS";
    /// Recently reported unknown sources: an array of
    /// [`SeenSlot`](crate::SeenSlot)s.
    pub const SEEN: &str = "GK_SEEN";
    pub const PORTS: &str = "GK_PORTS";
    pub const CONFIG: &str = "GK_CONFIG";
    pub const STATS: &str = "GK_STATS";
    pub const RANGE_HITS: &str = "GK_RANGE_HITS";
    pub const EVENTS: &str = "GK_EVENTS";

    /// Egress gate: subscriber source ranges (pool and exempt entries share
    /// one table, as allow and deny do), laid out like the ingress table.
    pub const SUB_RANGES: &str = "GK_SUB_RANGES";
    /// Egress gate: smarthost destination ranges.
    pub const SMH_RANGES: &str = "GK_SMH_RANGES";
    /// Egress port policy: one u32 per destination port (see [`port_policy`](crate::port_policy)).
    pub const EG_PORTS: &str = "GK_EG_PORTS";
    /// Rate-limit classes ([`RateLimit`](crate::RateLimit)), index = class.
    pub const EG_LIMITS: &str = "GK_EG_LIMITS";
    /// Token-bucket state per (source, class): an LRU of GCRA arrival times.
    pub const EG_BUCKETS: &str = "GK_EG_BUCKETS";
    /// Egress decision counters, laid out like [`STATS`].
    pub const EG_STATS: &str = "GK_EG_STATS";

    /// Reject with a reason: the single [`RejectConfig`](crate::reject::RejectConfig).
    pub const REJECT: &str = "GK_REJECT";
    /// The agent's rejector listeners (a sockmap; slots in
    /// [`reject`](crate::reject)).
    pub const REJECTORS: &str = "GK_REJECTORS";
    /// Sources over the rejector's per-source rate
    /// ([`QuietSlot`](crate::reject::QuietSlot)s).
    pub const REJ_QUIET: &str = "GK_REJ_QUIET";
    /// Reject counters ([`RejectCounter`](crate::reject::RejectCounter)), per CPU.
    pub const REJ_STATS: &str = "GK_REJ_STATS";
    /// The per-CPU state (GCRA arrival time) of the budget of SYNs passed
    /// to the rejector.
    pub const REJ_BUDGET: &str = "GK_REJ_BUDGET";

    /// Explain: the single [`ExplainConfig`](crate::explain::ExplainConfig)
    /// (mark, listener ports, whether the TC stage is attached).
    pub const EXPLAIN: &str = "GK_EXPLAIN";

    /// Inbound limiter: the rate-limit class of each destination port (a
    /// u32 per port, 0 = not limited; see [`inbound`](crate::inbound)).
    pub const IN_PORTS: &str = "GK_IN_PORTS";
    /// Inbound limiter: [`RateLimit`](crate::RateLimit) per class.
    pub const IN_LIMITS: &str = "GK_IN_LIMITS";
    /// Inbound limiter: GCRA state per (source, class), an array of
    /// [`InBucket`](crate::InBucket)s.
    pub const IN_BUCKETS: &str = "GK_IN_BUCKETS";
    /// Inbound limiter counters per class, per CPU
    /// ([`InboundCounter`](crate::InboundCounter)).
    pub const IN_STATS: &str = "GK_IN_STATS";

    /// Every map, for pinning and unloading.
    pub const ALL: [&str; 25] = [
        RANGES,
        RANGE_INDEX,
        VERDICTS,
        SEEN,
        PORTS,
        CONFIG,
        STATS,
        RANGE_HITS,
        EVENTS,
        SUB_RANGES,
        SMH_RANGES,
        EG_PORTS,
        EG_LIMITS,
        EG_BUCKETS,
        EG_STATS,
        REJECT,
        REJECTORS,
        REJ_QUIET,
        REJ_STATS,
        REJ_BUDGET,
        EXPLAIN,
        IN_PORTS,
        IN_LIMITS,
        IN_BUCKETS,
        IN_STATS,
    ];
}

/// Program names in the ELF object.
pub mod programs {
    /// The ingress gate.
    pub const XDP_INGRESS: &str = "gatekeeper_ingress";
    /// A program that only returns XDP_PASS: the benchmark baseline.
    pub const XDP_BASELINE: &str = "gatekeeper_baseline_pass";
    /// The clock probe (test-run only; see `Config::clock_ns`).
    pub const XDP_CLOCK: &str = "gatekeeper_clock";
    /// The egress gate on subscriber-facing interfaces (XDP, their ingress).
    pub const XDP_SUBSCRIBER: &str = "gatekeeper_subscriber";
    /// The egress gate on uplinks (TC egress: forwarded and local traffic).
    pub const TC_EGRESS: &str = "gatekeeper_egress";
    /// A TC program that only passes: the egress benchmark baseline.
    pub const TC_BASELINE: &str = "gatekeeper_tc_baseline";
    /// The rejector's sk_lookup program, attached to the agent's network
    /// namespace: steers rejected sources' connections to the agent.
    pub const SK_REJECTOR: &str = "gatekeeper_rejector";
    /// An sk_lookup program that only passes: the rejector's benchmark
    /// baseline.
    pub const SK_BASELINE: &str = "gatekeeper_sk_baseline";
    /// The explain stage: TC on subscriber-facing interfaces' ingress,
    /// hands explain pools' blocked connections to the agent's listener.
    pub const TC_EXPLAIN: &str = "gatekeeper_explain";
}

/// Capacity of each range table, per family (allow and deny entries
/// together; pool and exempt entries together; smarthosts).
pub const MAX_RANGES: u32 = 131_072;
/// Default nodes of the ingress range table (1 KiB each; the 512 root
/// nodes included). How many a set of ranges needs depends on how they
/// spread: about one per /16 holding ranges longer than /16, one per /24
/// holding ranges longer than /24, and so on.
pub const RANGE_NODES: u32 = 32_768;
/// Default nodes of the subscriber-pool and smarthost tables.
pub const SUB_RANGE_NODES: u32 = 8_192;
pub const SMH_RANGE_NODES: u32 = 2_048;
/// Range ids index [`maps::RANGE_HITS`]; every kind of range shares the id
/// space.
pub const MAX_RANGE_IDS: u32 = 2 * MAX_RANGES;
/// Default capacity of the per-source verdict table (verdicts; the table
/// has [`sourcetab::verdict_buckets`] buckets for it).
pub const MAX_VERDICTS: u32 = 1_048_576;
/// The read-only global holding the verdict table's
/// [`sourcetab::verdict_shift`], set when the object is loaded.
pub const VERDICT_SHIFT_GLOBAL: &str = "GK_VERDICT_SHIFT";
/// How many guarded ports the operator may configure.
pub const MAX_GUARDED_PORTS: usize = 64;
/// Guarded ports are a 65536-bit bitmap stored as this many u64 words.
pub const PORT_WORDS: u32 = 1024;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Interfaces are counted in `ifindex % STAT_IF_SLOTS` (the agent warns
/// when two attached interfaces share a slot).
pub const STAT_IF_SLOTS: u32 = 1024;
/// Counter slots reserved per interface (>= `counters::COUNTER_SLOTS`).
pub const STAT_STRIDE: u32 = 16;
/// Entries of the per-CPU stats array.
pub const STAT_ENTRIES: u32 = STAT_IF_SLOTS * STAT_STRIDE;
const _: () = assert!(counters::COUNTER_SLOTS <= STAT_STRIDE);
const _: () = assert!(counters::EGRESS_COUNTER_SLOTS <= STAT_STRIDE);
/// Entries of the egress port-policy array: one per port.
pub const EG_PORT_ENTRIES: u32 = 65_536;
/// Rate-limit classes; class 0 means "no limit", so 1..MAX_LIMIT_CLASSES.
pub const MAX_LIMIT_CLASSES: u32 = 8;
/// Capacity of the token-bucket LRU (sources sending to limited ports).
pub const MAX_BUCKETS: u32 = 131_072;

/// Bits of an egress port-policy word ([`maps::EG_PORTS`]).
pub mod port_policy {
    /// SYNs to this port from pool sources are blocked (unless to a smarthost).
    pub const GUARD: u32 = 1;
    /// The rate-limit class of the port sits in bits 8..16 (0 = none).
    pub const CLASS_SHIFT: u32 = 8;
    pub const CLASS_MASK: u32 = 0xff;

    /// The policy word for a port.
    #[inline(always)]
    pub const fn word(guard: bool, class: u32) -> u32 {
        (if guard { GUARD } else { 0 }) | ((class & CLASS_MASK) << CLASS_SHIFT)
    }
    /// The rate-limit class of a policy word.
    #[inline(always)]
    pub const fn class(word: u32) -> u32 {
        (word >> CLASS_SHIFT) & CLASS_MASK
    }
}

/// Index of (interface, counter) in the stats array.
#[inline(always)]
pub const fn stat_index(ifindex: u32, counter: u32) -> u32 {
    (ifindex % STAT_IF_SLOTS) * STAT_STRIDE + counter
}
/// IPv6 extension headers walked before giving up: the ingress gate passes
/// a longer chain, the egress gate drops one from a pool source.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// VLAN tags parsed (802.1Q / 802.1ad), outside a PPPoE session header.
pub const MAX_VLAN_TAGS: usize = 2;

/// Verdict actions in [`Verdict::action`].
pub mod action {
    pub const PASS: u32 = 0;
    pub const DROP: u32 = 1;
    /// Drop, and report the source (once per interval) so that a good one
    /// earns a verdict of its own: an IPv6 /64 dropped because several of
    /// its addresses failed is a presumption about the others. Any other
    /// value passes.
    pub const PRESUMED_DROP: u32 = 2;
    /// A ban: drop on guarded *and* limited ports (see
    /// [`inbound`](crate::inbound)), whatever else holds the source (an
    /// allow range still wins). Its reason is `MANUAL_BAN` (never evicted);
    /// the agent keeps the real cause. A datapath older than this reads it
    /// as a pass.
    pub const BAN: u32 = 3;
}

/// Why a verdict exists ([`Verdict::reason`]). The classifier issue adds its
/// outcomes here; the datapath counts drops per reason.
pub mod verdict_reason {
    pub const MANUAL_BAN: u32 = 0;
    pub const NO_PTR: u32 = 1;
    pub const FCRDNS_FAIL: u32 = 2;
    pub const DYNAMIC: u32 = 3;
    pub const GENERIC: u32 = 4;
    pub const OK: u32 = 5;
    pub const TEMPFAIL: u32 = 6;
    pub const HOLD: u32 = 7;
    /// Number of reasons; counters reserve this many slots.
    pub const COUNT: u32 = 8;
    /// The operator-facing name of each reason, by code: the one table the
    /// counters, the CLI and the agent name reasons by.
    pub const NAMES: [&str; COUNT as usize] =
        ["manual-ban", "no-ptr", "fcrdns-fail", "dynamic", "generic", "ok", "tempfail", "hold"];
}

/// What a range entry does ([`RangeValue::kind`]).
pub mod range_kind {
    /// Ingress table: drop guarded SYNs from here.
    pub const DENY: u8 = 0;
    /// Ingress table: always pass (wins over deny).
    pub const ALLOW: u8 = 1;
    /// Subscriber table: a dynamic pool, blocked from egress-guarded ports.
    pub const POOL: u8 = 2;
    /// Subscriber table: may send to guarded ports (wins over pool).
    pub const EXEMPT: u8 = 3;
    /// Smarthost table: pool sources may reach these destinations.
    pub const SMARTHOST: u8 = 4;
}

/// Bits of [`RangeValue::flags`].
pub mod range_flags {
    /// Pool: answer a blocked SYN with a TCP RST instead of dropping it.
    pub const REJECT: u8 = 1;
    /// Deny range the agent learned: a presumption, over which a live
    /// per-source verdict decides (the trie leaf keeps flags, not origins).
    pub const LEARNED: u8 = 2;
    /// Pool: answer a blocked SYN locally with an explanation (the agent's
    /// listener, through the TC explain stage; see
    /// [`explain`](crate::explain)). Always set together with [`REJECT`],
    /// which is what a gate that cannot explain does.
    pub const EXPLAIN: u8 = 4;
}

/// Where a range came from ([`RangeValue::origin`]).
pub mod range_origin {
    pub const MANUAL: u16 = 0;
    pub const IMPORTED: u16 = 1;
    pub const LEARNED: u16 = 2;
}

/// Flags in [`Config::flags`].
pub mod config_flags {
    /// Count everything, drop nothing.
    pub const DRY_RUN: u32 = 1;
    /// Drop SYNs from unknown sources until their verdict is in, for at
    /// most `Config::hold_ms` after the first report (then pass: a dead
    /// agent or DNS must never block anyone).
    pub const HOLD: u32 = 2;
}

/// Addresses in network byte order.
pub type Ipv4Bytes = [u8; 4];
pub type Ipv6Bytes = [u8; 16];

/// A range entry as the agent keeps it (the trie's leaves pack all but
/// `origin`, see [`trie`]). Allow and deny share one table so a guarded SYN
/// costs one longest-prefix lookup; "allow always wins" holds because the
/// agent leaves out deny entries that an allow range covers, so the longest
/// match of an allowed source is always an allow entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RangeValue {
    /// Index into [`maps::RANGE_HITS`], unique per range.
    pub range_id: u32,
    /// One of [`range_kind`].
    pub kind: u8,
    /// Bits of [`range_flags`].
    pub flags: u8,
    /// One of [`range_origin`].
    pub origin: u16,
}
const _: () = assert!(core::mem::size_of::<RangeValue>() == 8);

/// An entry of the range index (userspace only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RangeEntry {
    /// Network address; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub value: RangeValue,
    pub prefix_len: u16,
    /// One of [`family`].
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RangeEntry>() == 32);

/// Key of the verdict and seen maps: IPv4 as `::ffff:a.b.c.d` (a /32), IPv6
/// as its /64 (low 64 bits zero) or as the address itself (see [`addr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SourceKey {
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 16);

/// Value of the verdict map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) after which the
    /// verdict is ignored; `u64::MAX` never expires.
    pub expires_ns: u64,
    /// One of [`action`].
    pub action: u32,
    /// One of [`verdict_reason`].
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<Verdict>() == 16);

/// The single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Minimum time between two events for the same unknown source.
    pub event_interval_ns: u64,
    /// Bits of [`config_flags`].
    pub flags: u32,
    /// With [`config_flags::HOLD`]: how long after its first report an
    /// unknown source is held.
    pub hold_ms: u32,
    /// The datapath clock (see [`Config::clock_ns`]): ns per jiffy, 0 when
    /// not calibrated.
    pub tick_ns: u64,
    /// ... and CLOCK_MONOTONIC_COARSE - jiffies * tick_ns (wrapping).
    pub clock_offset_ns: u64,
    /// The per-source tables' secret (see [`sourcetab::source_slots`]):
    /// set once when the maps are created, then kept.
    pub hash: sourcetab::HashKey,
}
const _: () = assert!(core::mem::size_of::<Config>() == 48);

impl Config {
    /// CLOCK_MONOTONIC_COARSE in ns from the jiffies counter, which the
    /// verifier inlines (`bpf_ktime_get_coarse_ns` is a helper call that
    /// costs more than the rest of a guarded SYN's decision). Both clocks
    /// advance together from the timekeeping tick, so one calibration holds
    /// while the system runs; `None` when not calibrated.
    #[inline(always)]
    pub const fn clock_ns(&self, jiffies: u64) -> Option<u64> {
        if self.tick_ns == 0 {
            return None;
        }
        Some(jiffies.wrapping_mul(self.tick_ns).wrapping_add(self.clock_offset_ns))
    }

    /// The calibration from two simultaneous (jiffies, CLOCK_MONOTONIC_COARSE)
    /// samples taken apart: (tick_ns, clock_offset_ns). The tick is the
    /// kernel's TICK_NSEC of the nearest usual HZ (100, 250, 300, 1000);
    /// `None` when the samples fit none of them within 5 %.
    pub const fn calibrate(a: (u64, u64), b: (u64, u64)) -> Option<(u64, u64)> {
        let (dj, dns) = (b.0.wrapping_sub(a.0), b.1.wrapping_sub(a.1));
        if dj == 0 || dns == 0 || dj > dns {
            return None;
        }
        let hz_x1000 = (dj as u128 * 1_000_000_000_000 / dns as u128) as u64;
        let candidates = [100u64, 250, 300, 1000];
        let mut i = 0;
        while i < candidates.len() {
            let hz = candidates[i];
            let lo = hz * 1000 * 95 / 100;
            let hi = hz * 1000 * 105 / 100;
            if hz_x1000 >= lo && hz_x1000 <= hi {
                let tick = (1_000_000_000 + hz / 2) / hz;
                return Some((tick, b.1.wrapping_sub(b.0.wrapping_mul(tick))));
            }
            i += 1;
        }
        None
    }
}

/// A counter of an interface slot, as userspace reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct StatKey {
    /// The interface's slot: its ifindex modulo [`STAT_IF_SLOTS`].
    pub ifindex: u32,
    /// A [`Counter`] as u32.
    pub counter: u32,
}

impl StatKey {
    /// The key of a stats-array index.
    pub const fn from_index(index: u32) -> StatKey {
        StatKey { ifindex: index / STAT_STRIDE, counter: index % STAT_STRIDE }
    }
}

/// Address families in [`Event::family`].
pub mod family {
    pub const V4: u16 = 4;
    pub const V6: u16 = 6;
}

/// Ring-buffer event: an unknown source sent a guarded SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `bpf_ktime_get_coarse_ns()` when seen.
    pub ts_ns: u64,
    /// The full source address (IPv4 mapped into `::ffff:0:0/96`).
    pub addr: [u8; 16],
    pub ifindex: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// One of [`family`].
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<Event>() == 32);

/// One rate-limit class: a GCRA ("virtual scheduling") token bucket. A
/// source may open `burst` connections at once and one more every
/// `interval_ns` after that.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// Nanoseconds per token (1e9 * 60 / per-minute rate); 0 = unlimited.
    pub interval_ns: u64,
    /// `burst * interval_ns`: how far ahead of now the arrival time may run.
    pub burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateLimit>() == 16);

impl RateLimit {
    /// The GCRA step: given the stored theoretical arrival time `tat` (0 =
    /// never seen) and the clock, the new arrival time to store if this
    /// connection conforms, or `None` when it is over the limit (and nothing
    /// is stored, so blocked attempts do not use up tokens).
    #[inline(always)]
    pub const fn admit(&self, tat: u64, now: u64) -> Option<u64> {
        if self.interval_ns == 0 {
            return Some(tat);
        }
        let base = if tat > now { tat } else { now };
        let next = base.saturating_add(self.interval_ns);
        if next - now > self.burst_ns {
            None
        } else {
            Some(next)
        }
    }
}

/// Key of the token-bucket LRU: the source (as [`SourceKey`]: IPv4 /32,
/// IPv6 /64) and the rate-limit class.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LimitKey {
    pub addr: [u8; 16],
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<LimitKey>() == 20);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for RangeValue {}
    unsafe impl aya::Pod for trie::TrieNode {}
    unsafe impl aya::Pod for RangeEntry {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for LimitKey {}
    unsafe impl aya::Pod for KeyWords {}
    unsafe impl aya::Pod for VerdictSlot {}
    unsafe impl aya::Pod for VerdictBucket {}
    unsafe impl aya::Pod for SeenSlot {}
    unsafe impl aya::Pod for crate::reject::RejectConfig {}
    unsafe impl aya::Pod for crate::reject::QuietSlot {}
    unsafe impl aya::Pod for crate::explain::ExplainConfig {}
    unsafe impl aya::Pod for crate::inbound::InSlot {}
    unsafe impl aya::Pod for crate::inbound::InBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_lets_a_burst_through_then_one_per_interval() {
        let lim = RateLimit { interval_ns: 1_000, burst_ns: 3_000 };
        let now = 1_000_000;
        let mut tat = 0;
        for i in 0..3 {
            tat = lim.admit(tat, now).unwrap_or_else(|| panic!("burst connection {i} refused"));
        }
        // The fourth at the same instant is over, and does not use a token.
        assert_eq!(lim.admit(tat, now), None);
        assert_eq!(lim.admit(tat, now + 999), None);
        // One interval later exactly one more conforms.
        let t2 = lim.admit(tat, now + 1_000).unwrap();
        assert_eq!(lim.admit(t2, now + 1_000), None);
        // After a long pause the whole burst is back, no more.
        let mut tat = t2;
        let later = now + 1_000_000;
        for _ in 0..3 {
            tat = lim.admit(tat, later).unwrap();
        }
        assert_eq!(lim.admit(tat, later), None);
    }

    #[test]
    fn gcra_unlimited_and_burst_of_one() {
        let none = RateLimit::default();
        assert_eq!(none.admit(5, 10), Some(5));
        let one = RateLimit { interval_ns: 100, burst_ns: 100 };
        let t = one.admit(0, 1_000).unwrap();
        assert_eq!(one.admit(t, 1_050), None);
        assert!(one.admit(t, 1_100).is_some());
        // No overflow near the end of the clock.
        let _ = one.admit(u64::MAX - 10, u64::MAX - 5);
    }

    #[test]
    fn clock_calibration_snaps_to_the_kernel_tick() {
        // HZ=250, jiffies starting near 2^32 - 300 * HZ as the kernel's do.
        let j0 = (1u64 << 32) - 300 * 250 + 12_345;
        let ns0 = 5_000_000_000;
        let (tick, off) = Config::calibrate((j0, ns0), (j0 + 26, ns0 + 104_000_000)).unwrap();
        assert_eq!(tick, 4_000_000);
        let c = Config { tick_ns: tick, clock_offset_ns: off, ..Config::default() };
        assert_eq!(c.clock_ns(j0 + 26), Some(ns0 + 104_000_000));
        assert_eq!(c.clock_ns(j0 + 26 + 250), Some(ns0 + 1_104_000_000));
        // HZ=300 and 1000 are told apart from 250; nonsense is refused.
        assert_eq!(Config::calibrate((0, 0), (30, 100_000_000)).unwrap().0, 3_333_333);
        assert_eq!(Config::calibrate((0, 0), (101, 100_000_000)).unwrap().0, 1_000_000);
        assert_eq!(Config::calibrate((0, 0), (50, 100_000_000)), None);
        assert_eq!(Config::calibrate((7, 0), (7, 100_000_000)), None);
        assert_eq!(Config::default().clock_ns(123), None);
    }

    #[test]
    fn port_policy_words() {
        let w = port_policy::word(true, 3);
        assert_eq!(w & port_policy::GUARD, 1);
        assert_eq!(port_policy::class(w), 3);
        assert_eq!(port_policy::word(false, 0), 0);
    }
}
