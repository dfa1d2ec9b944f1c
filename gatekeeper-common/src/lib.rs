//! The kernel/user contract of gatekeeper: map names, sizes, `#[repr(C)]`
//! value types and the counter layout. Everything the eBPF programs and the
//! agent must agree on lives here and nowhere else.
//!
//! Pod rules: explicit padding, no `bool`/`Option`, sizes asserted at compile
//! time. With the `user` feature the types implement `aya::Pod`.
#![cfg_attr(not(any(test, feature = "user")), no_std)]

pub mod addr;
pub mod counters;

pub use counters::Counter;

/// Map names (as in the ELF object and as pinned under `<pin-dir>/maps/`).
pub mod maps {
    /// Allow and deny ranges in one LPM trie per family (see [`RangeValue`]).
    pub const RANGES_V4: &str = "GK_RANGES_V4";
    pub const RANGES_V6: &str = "GK_RANGES_V6";
    pub const VERDICTS: &str = "GK_VERDICTS";
    pub const SEEN: &str = "GK_SEEN";
    pub const PORTS: &str = "GK_PORTS";
    pub const CONFIG: &str = "GK_CONFIG";
    pub const STATS: &str = "GK_STATS";
    pub const RANGE_HITS: &str = "GK_RANGE_HITS";
    pub const EVENTS: &str = "GK_EVENTS";

    /// Every map, for pinning and unloading.
    pub const ALL: [&str; 9] = [RANGES_V4, RANGES_V6, VERDICTS, SEEN, PORTS, CONFIG, STATS, RANGE_HITS, EVENTS];
}

/// Program names in the ELF object.
pub mod programs {
    /// The ingress gate.
    pub const XDP_INGRESS: &str = "gatekeeper_ingress";
    /// A program that only returns XDP_PASS: the benchmark baseline.
    pub const XDP_BASELINE: &str = "gatekeeper_baseline_pass";
}

/// Capacity of each range trie (v4 and v6 separately), allow and deny
/// entries together.
pub const MAX_RANGES: u32 = 131_072;
/// Range ids index [`maps::RANGE_HITS`]; allow and deny share the id space.
pub const MAX_RANGE_IDS: u32 = 2 * MAX_RANGES;
/// Capacity of the per-source verdict LRU map.
pub const MAX_VERDICTS: u32 = 1_048_576;
/// Capacity of the "recently reported unknown source" LRU map.
pub const MAX_SEEN: u32 = 65_536;
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

/// Index of (interface, counter) in the stats array.
#[inline(always)]
pub const fn stat_index(ifindex: u32, counter: u32) -> u32 {
    (ifindex % STAT_IF_SLOTS) * STAT_STRIDE + counter
}
/// IPv6 extension headers walked before giving up (and passing).
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// VLAN tags parsed (802.1Q / 802.1ad).
pub const MAX_VLAN_TAGS: usize = 2;

/// Verdict actions in [`Verdict::action`].
pub mod action {
    pub const PASS: u32 = 0;
    pub const DROP: u32 = 1;
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
}

/// What a range entry does ([`RangeValue::kind`]).
pub mod range_kind {
    pub const DENY: u16 = 0;
    pub const ALLOW: u16 = 1;
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
}

/// Key of the LPM tries: aya's `Key<[u8; 4]>` / `Key<[u8; 16]>` carries the
/// prefix length, the data is the address in network byte order.
pub type Ipv4Bytes = [u8; 4];
pub type Ipv6Bytes = [u8; 16];

/// Value of the range tries. Allow and deny share one trie so a guarded SYN
/// costs one longest-prefix lookup; "allow always wins" holds because the
/// agent leaves out deny entries that an allow range covers, so the longest
/// match of an allowed source is always an allow entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RangeValue {
    /// Index into [`maps::RANGE_HITS`], unique per range.
    pub range_id: u32,
    /// One of [`range_kind`].
    pub kind: u16,
    /// One of [`range_origin`].
    pub origin: u16,
}
const _: () = assert!(core::mem::size_of::<RangeValue>() == 8);

/// Key of the verdict and seen maps: IPv4 as `::ffff:a.b.c.d` (a /32), IPv6
/// masked to its /64 (see [`addr`]).
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
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

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

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for RangeValue {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Event {}
}
