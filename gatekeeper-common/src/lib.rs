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
    /// IPv4 ranges: one [`V4Slot`](crate::V4Slot) per /16 (entries up to /16
    /// and which longer lengths exist inside it) ...
    pub const V4_SLOTS: &str = "GK_V4_SLOTS";
    /// ... and the entries longer than /16, by (length, network).
    pub const V4_LONG: &str = "GK_V4_LONG";
    /// IPv6 ranges: an LPM trie.
    pub const RANGES_V6: &str = "GK_RANGES_V6";
    /// Every range entry by range id, for userspace readers only (`status`,
    /// `stats` and restarts read the ranges back from here).
    pub const RANGE_INDEX: &str = "GK_RANGE_INDEX";
    pub const VERDICTS: &str = "GK_VERDICTS";
    pub const SEEN: &str = "GK_SEEN";
    pub const PORTS: &str = "GK_PORTS";
    pub const CONFIG: &str = "GK_CONFIG";
    pub const STATS: &str = "GK_STATS";
    pub const RANGE_HITS: &str = "GK_RANGE_HITS";
    pub const EVENTS: &str = "GK_EVENTS";

    /// Every map, for pinning and unloading.
    pub const ALL: [&str; 11] =
        [V4_SLOTS, V4_LONG, RANGES_V6, RANGE_INDEX, VERDICTS, SEEN, PORTS, CONFIG, STATS, RANGE_HITS, EVENTS];
}

/// Program names in the ELF object.
pub mod programs {
    /// The ingress gate.
    pub const XDP_INGRESS: &str = "gatekeeper_ingress";
    /// A program that only returns XDP_PASS: the benchmark baseline.
    pub const XDP_BASELINE: &str = "gatekeeper_baseline_pass";
}

/// Capacity of the range tables, per family, allow and deny entries
/// together.
pub const MAX_RANGES: u32 = 131_072;
/// IPv4 slots: one per /16.
pub const V4_SLOT_COUNT: u32 = 65_536;
/// IPv4 entries up to this prefix length live in the slots.
pub const V4_SHORT_MAX: u8 = 16;
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
    /// Drop SYNs from unknown sources until their verdict is in, for at
    /// most `Config::hold_ms` after the first report (then pass: a dead
    /// agent or DNS must never block anyone).
    pub const HOLD: u32 = 2;
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

/// One /16 of the IPv4 range table. A lookup probes, longest first, only the
/// lengths in `long_mask` in the long-entry hash, then falls back to
/// `short`: the longest entry of length <= /16 covering this /16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct V4Slot {
    /// Bit `len - 17` set: some entry of length `len` (17..=32) lies here.
    pub long_mask: u32,
    /// Non-zero when `short` holds an entry.
    pub has_short: u32,
    pub short: RangeValue,
}
const _: () = assert!(core::mem::size_of::<V4Slot>() == 16);

/// Key of the IPv4 long-entry hash: the network, masked, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct V4LongKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<V4LongKey>() == 8);

impl V4LongKey {
    /// The key of `addr`'s network of length `prefix_len` (17..=32).
    #[inline(always)]
    pub const fn of(addr: u32, prefix_len: u32) -> V4LongKey {
        let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
        V4LongKey { prefix_len, addr: (addr & mask).to_be_bytes() }
    }
}

/// Bit of `long_mask` for prefix length `len` (17..=32).
#[inline(always)]
pub const fn v4_long_bit(len: u32) -> u32 {
    1 << (len - V4_SHORT_MAX as u32 - 1)
}

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
    /// With [`config_flags::HOLD`]: how long after its first report an
    /// unknown source is held.
    pub hold_ms: u32,
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
    unsafe impl aya::Pod for V4Slot {}
    unsafe impl aya::Pod for V4LongKey {}
    unsafe impl aya::Pod for RangeEntry {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Event {}
}
