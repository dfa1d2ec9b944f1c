//! gatekeeper's datapath: the XDP ingress gate.
//!
//! Only a TCP SYN (no ACK, no RST) to a guarded destination port reaches a
//! decision; everything else returns `XDP_PASS` after the header walk. A
//! packet the parser cannot read is passed and counted, never dropped.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_NO_PREALLOC},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use gatekeeper_common::{
    action, addr, config_flags, family, range_kind, stat_index, v4_long_bit, verdict_reason, Config, Counter, Event,
    Ipv4Bytes, Ipv6Bytes, RangeEntry, RangeValue, SourceKey, V4LongKey, V4Slot, Verdict, EVENTS_BYTES,
    MAX_IPV6_EXT_HEADERS, MAX_RANGES, MAX_RANGE_IDS, MAX_SEEN, MAX_VERDICTS, MAX_VLAN_TAGS, PORT_WORDS, STAT_ENTRIES,
    V4_SHORT_MAX, V4_SLOT_COUNT,
};

#[map(name = "GK_V4_SLOTS")]
static GK_V4_SLOTS: Array<V4Slot> = Array::with_max_entries(V4_SLOT_COUNT, 0);
#[map(name = "GK_V4_LONG")]
static GK_V4_LONG: HashMap<V4LongKey, RangeValue> = HashMap::with_max_entries(MAX_RANGES, BPF_F_NO_PREALLOC);
#[map(name = "GK_RANGES_V6")]
static GK_RANGES_V6: LpmTrie<Ipv6Bytes, RangeValue> = LpmTrie::with_max_entries(MAX_RANGES, 0);
/// Range entries by id, for userspace readers; never read here.
#[map(name = "GK_RANGE_INDEX")]
static GK_RANGE_INDEX: HashMap<u32, RangeEntry> = HashMap::with_max_entries(MAX_RANGE_IDS, BPF_F_NO_PREALLOC);
#[map(name = "GK_VERDICTS")]
static GK_VERDICTS: LruHashMap<SourceKey, Verdict> = LruHashMap::with_max_entries(MAX_VERDICTS, 0);
/// Unknown sources recently reported to the agent, with the report time.
#[map(name = "GK_SEEN")]
static GK_SEEN: LruHashMap<SourceKey, u64> = LruHashMap::with_max_entries(MAX_SEEN, 0);
#[map(name = "GK_PORTS")]
static GK_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
#[map(name = "GK_CONFIG")]
static GK_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "GK_STATS")]
static GK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_ENTRIES, 0);
#[map(name = "GK_RANGE_HITS")]
static GK_RANGE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_RANGE_IDS, 0);
#[map(name = "GK_EVENTS")]
static GK_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offsets are masked with this so the verifier can bound packet pointers.
const MAX_OFFSET: usize = 0x0fff;

/// The parser could not read what the headers promised: pass and count.
struct Skip;

enum Source {
    V4(Ipv4Bytes),
    V6(Ipv6Bytes),
}

#[xdp]
pub fn gatekeeper_ingress(ctx: XdpContext) -> u32 {
    match try_gatekeeper_ingress(&ctx) {
        Ok(ret) => ret,
        Err(Skip) => {
            count(ctx.ingress_ifindex() as u32, Counter::ParseSkipped as u32);
            xdp_action::XDP_PASS
        }
    }
}

/// The benchmark baseline: the cheapest possible XDP program.
#[xdp]
pub fn gatekeeper_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Reads a `T` at `offset` bytes into the packet, bounds-checked.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Skip> {
    // An offset past the mask (IPv6 extension headers can claim up to 2 KiB
    // each) must fail, not wrap around to an earlier part of the frame.
    if offset > MAX_OFFSET {
        return Err(Skip);
    }
    let offset = offset & MAX_OFFSET;
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Skip);
    }
    // SAFETY: bounds checked above; packet data may be unaligned.
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

#[inline(always)]
fn try_gatekeeper_ingress(ctx: &XdpContext) -> Result<u32, Skip> {
    let mut ether_type = u16::from_be(load::<u16>(ctx, 12)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = u16::from_be(load::<u16>(ctx, offset + 2)?);
        offset += 4;
    }
    let (source, tcp_offset) = match ether_type {
        ETH_P_IP => match parse_ipv4(ctx, offset)? {
            Some(v) => v,
            None => return Ok(xdp_action::XDP_PASS),
        },
        ETH_P_IPV6 => match parse_ipv6(ctx, offset)? {
            Some(v) => v,
            None => return Ok(xdp_action::XDP_PASS),
        },
        _ => return Ok(xdp_action::XDP_PASS),
    };

    // Destination port (bytes 2..4) and flags (byte 13) of the TCP header.
    // Whole-chunk loads: a 1-byte bounds check compiles to a form the
    // verifier cannot use.
    let tcp = load::<[u8; 14]>(ctx, tcp_offset)?;
    // The whole TCP header, options included, must be in the frame: a
    // truncated or malformed header is skipped, never decided.
    let tcp_len = ((tcp[12] >> 4) as usize) * 4;
    if tcp_len < 20 {
        return Err(Skip);
    }
    load::<[u8; 2]>(ctx, tcp_offset + tcp_len - 2)?;
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    if flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Ok(xdp_action::XDP_PASS);
    }
    let (word, bit) = addr::port_slot(dport);
    match GK_PORTS.get(word) {
        Some(w) if *w & bit != 0 => {}
        _ => return Ok(xdp_action::XDP_PASS),
    }
    Ok(decide(ctx.ingress_ifindex() as u32, source, dport))
}

/// IPv4: returns the source and the TCP header offset, or `None` when the
/// packet is not the first fragment of a TCP segment.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Option<(Source, usize)>, Skip> {
    let ip = load::<[u8; 20]>(ctx, offset)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 || ip[9] != IPPROTO_TCP {
        return Ok(None);
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    Ok(Some((Source::V4(src), offset + ihl)))
}

/// IPv6: walks up to [`MAX_IPV6_EXT_HEADERS`] extension headers.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Option<(Source, usize)>, Skip> {
    let ip = load::<[u8; 8]>(ctx, offset)?;
    if ip[0] >> 4 != 6 {
        return Err(Skip);
    }
    let mut next = ip[6];
    let src = load::<Ipv6Bytes>(ctx, offset + 8)?;
    let mut offset = offset + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Ok(Some((Source::V6(src), offset))),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr = load::<[u8; 2]>(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let hdr = load::<[u8; 4]>(ctx, offset)?;
                if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 {
                    return Ok(None); // non-first fragment
                }
                next = hdr[0];
                offset += 8;
            }
            IPPROTO_AH => return Err(Skip),
            _ => return Ok(None),
        }
    }
    if next == IPPROTO_TCP {
        return Ok(Some((Source::V6(src), offset)));
    }
    Err(Skip)
}

/// The decision for a guarded SYN: range (allow passes, deny drops), then
/// live verdict, else unknown (pass and report). One longest-prefix lookup
/// serves both kinds of range (see `RangeValue`); IPv4 searches the slot
/// table (`lookup_v4`), IPv6 the LPM trie.
#[inline(always)]
fn decide(ifindex: u32, source: Source, port: u16) -> u32 {
    let (range, key) = match &source {
        Source::V4(a) => (lookup_v4(u32::from_be_bytes(*a)), addr::key_v4(*a)),
        Source::V6(a) => (GK_RANGES_V6.get(Key::new(128, *a)).copied(), addr::key_v6(*a)),
    };
    if let Some(range) = range {
        hit(range.range_id);
        if range.kind == range_kind::ALLOW {
            count(ifindex, Counter::Allowed as u32);
            return xdp_action::XDP_PASS;
        }
        return drop_or_dry_run(ifindex, Counter::DenyRange as u32);
    }
    // SAFETY: the value is copied out at once; a concurrent update can at
    // worst give a torn read of a verdict that is being replaced.
    let verdict = unsafe { GK_VERDICTS.get(&key) }.copied();
    // The coarse clock (CLOCK_MONOTONIC at the last tick) is plenty for
    // expiries and report intervals measured in seconds, and much cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(v) = verdict {
        if v.expires_ns > now {
            if v.action == action::DROP {
                return drop_or_dry_run(ifindex, Counter::verdict_drop(v.reason));
            }
            count(ifindex, Counter::VerdictPass as u32);
            return xdp_action::XDP_PASS;
        }
    }
    unknown(ifindex, &source, key, port, now)
}

/// Longest-prefix match in the IPv4 table: the lengths present in the
/// source's /16, longest first, then the slot's own entry (<= /16).
#[inline(always)]
fn lookup_v4(addr: u32) -> Option<RangeValue> {
    let slot = GK_V4_SLOTS.get(addr >> 16)?;
    let mask = slot.long_mask;
    if mask != 0 {
        let mut len = 32;
        while len > V4_SHORT_MAX as u32 {
            if mask & v4_long_bit(len) != 0 {
                // SAFETY: the value is copied out at once.
                if let Some(v) = unsafe { GK_V4_LONG.get(&V4LongKey::of(addr, len)) } {
                    return Some(*v);
                }
            }
            len -= 1;
        }
    }
    if slot.has_short != 0 {
        Some(slot.short)
    } else {
        None
    }
}

#[inline(always)]
fn config() -> Config {
    GK_CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn drop_or_dry_run(ifindex: u32, counter: u32) -> u32 {
    count(ifindex, counter);
    if config().flags & config_flags::DRY_RUN != 0 {
        count(ifindex, Counter::DryRun as u32);
        return xdp_action::XDP_PASS;
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(ifindex: u32, counter: u32) {
    if let Some(p) = GK_STATS.get_ptr_mut(stat_index(ifindex, counter)) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn hit(range_id: u32) {
    if let Some(p) = GK_RANGE_HITS.get_ptr_mut(range_id) {
        // SAFETY: per-CPU slot.
        unsafe { *p += 1 };
    }
}

/// An unknown source: report it (at most once per interval) and pass, or
/// with hold, drop while its first report is younger than `hold_ms`.
#[inline(always)]
fn unknown(ifindex: u32, source: &Source, key: SourceKey, port: u16, now: u64) -> u32 {
    let cfg = config();
    // When the source was last reported; 0 = never (the clock is never 0).
    // A plain u64, not an Option of a map pointer: the verifier refuses
    // the pointer arithmetic the compiler makes of the latter.
    // SAFETY: u64 copied out at once.
    let last: u64 = match unsafe { GK_SEEN.get(&key) } {
        Some(t) => *t,
        None => 0,
    };
    let due = last == 0 || now.wrapping_sub(last) >= cfg.event_interval_ns;
    let reported = due && report(ifindex, source, key, port, now);
    if cfg.flags & config_flags::HOLD != 0 {
        let since = if reported { now } else { last };
        // Not reported (ring full) and never before: hold; the next SYN retries.
        let held = since == 0 || now.wrapping_sub(since) < cfg.hold_ms as u64 * 1_000_000;
        if held {
            return drop_or_dry_run(ifindex, Counter::verdict_drop(verdict_reason::HOLD));
        }
    }
    count(ifindex, Counter::Unknown as u32);
    xdp_action::XDP_PASS
}

/// Queues an event for the agent; true when it was queued.
#[inline(always)]
fn report(ifindex: u32, source: &Source, key: SourceKey, port: u16, now: u64) -> bool {
    let (addr, fam) = match source {
        Source::V4(a) => (addr::mapped_v4(*a), family::V4),
        Source::V6(a) => (*a, family::V6),
    };
    match GK_EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event { ts_ns: now, addr, ifindex, port, family: fam });
            entry.submit(0);
            // Only a delivered report silences the source for an interval.
            let _ = GK_SEEN.insert(&key, &now, 0);
            true
        }
        None => {
            count(ifindex, Counter::EventLost as u32);
            false
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
