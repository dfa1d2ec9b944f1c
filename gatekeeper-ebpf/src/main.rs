//! gatekeeper's datapath: the XDP ingress gate, and the egress gate (XDP on
//! subscriber-facing interfaces, TC on uplink egress).
//!
//! Only a TCP SYN (no ACK, no RST) to a guarded destination port reaches a
//! decision; everything else passes after the header walk. A packet the
//! parser cannot read is passed and counted, never dropped, with one
//! exception at the egress gate: a frame from a pool source that hides
//! whether it is a SYN to a guarded port (see [`guard_hidden`]).
//!
//! Both gates read Ethernet, up to [`MAX_VLAN_TAGS`] VLAN tags, then IPv4,
//! IPv6 or a PPPoE session carrying either.
#![no_std]
#![no_main]

mod explain;

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        xdp_action, BPF_F_INGRESS, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect},
    macros::{classifier, map, sk_lookup, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockMap},
    programs::{SkLookupContext, TcContext, XdpContext},
};
use gatekeeper_common::{
    action, addr, config_flags, family,
    inbound::{self, InboundCounter, IN_BUCKETS, IN_PORT_ENTRIES, IN_STAT_ENTRIES},
    port_policy, range_flags, range_kind,
    reject::{
        self, quiet_slot, refusal, QuietSlot, RejectConfig, RejectCounter, QUIET_SLOTS, REJECTOR_SLOTS,
        REJECT_COUNTER_SLOTS,
    },
    sourcetab, stat_index, trie,
    trie::TrieNode,
    verdict_reason, Config, Counter, EgressCounter, Event, InBucket, Ipv4Bytes, Ipv6Bytes, KeyWords, LimitKey,
    RangeEntry, RangeValue, RateLimit, SeenSlot, VerdictBucket, EG_PORT_ENTRIES, EVENTS_BYTES, MAX_BUCKETS,
    MAX_IPV6_EXT_HEADERS, MAX_LIMIT_CLASSES, MAX_RANGE_IDS, MAX_VERDICTS, MAX_VLAN_TAGS, PORT_WORDS, RANGE_NODES,
    SEEN_SLOTS, SMH_RANGE_NODES, STAT_ENTRIES, SUB_RANGE_NODES,
};

/// Ingress ranges: trie nodes (see `gatekeeper_common::trie`), written by
/// the agent through a shared mapping.
#[map(name = "GK_RANGES")]
static GK_RANGES: Array<TrieNode> = Array::with_max_entries(RANGE_NODES, BPF_F_MMAPABLE);
/// Range entries by id, for userspace readers; never read here.
#[map(name = "GK_RANGE_INDEX")]
static GK_RANGE_INDEX: HashMap<u32, RangeEntry> = HashMap::with_max_entries(MAX_RANGE_IDS, BPF_F_NO_PREALLOC);
/// Per-source verdicts (see `gatekeeper_common::sourcetab`); the loader sizes
/// the array and sets [`GK_VERDICT_SHIFT`] to match.
#[map(name = "GK_VERDICTS")]
static GK_VERDICTS: Array<VerdictBucket> = Array::with_max_entries(sourcetab::verdict_buckets(MAX_VERDICTS), 0);
/// `sourcetab::verdict_shift` of `GK_VERDICTS` (a read-only global set at
/// load).
#[no_mangle]
static GK_VERDICT_SHIFT: u32 = sourcetab::verdict_shift(sourcetab::verdict_buckets(MAX_VERDICTS));
/// Unknown sources recently reported to the agent, with the report time.
#[map(name = "GK_SEEN")]
static GK_SEEN: Array<SeenSlot> = Array::with_max_entries(SEEN_SLOTS, 0);
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

// Reject with a reason (see `gatekeeper_common::reject`).
#[map(name = "GK_REJECT")]
static GK_REJECT: Array<RejectConfig> = Array::with_max_entries(1, 0);
/// The agent's rejector listeners, one per family.
#[map(name = "GK_REJECTORS")]
static GK_REJECTORS: SockMap = SockMap::with_max_entries(REJECTOR_SLOTS, 0);
#[map(name = "GK_REJ_QUIET")]
static GK_REJ_QUIET: Array<QuietSlot> = Array::with_max_entries(QUIET_SLOTS, 0);
#[map(name = "GK_REJ_STATS")]
static GK_REJ_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REJECT_COUNTER_SLOTS, 0);
#[map(name = "GK_REJ_BUDGET")]
static GK_REJ_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// The egress gate's tables: subscriber sources (pool and exempt entries,
// exempt winning as allow does) and smarthost destinations, each laid out
// like the ingress range table.
#[map(name = "GK_SUB_RANGES")]
static GK_SUB_RANGES: Array<TrieNode> = Array::with_max_entries(SUB_RANGE_NODES, BPF_F_MMAPABLE);
#[map(name = "GK_SMH_RANGES")]
static GK_SMH_RANGES: Array<TrieNode> = Array::with_max_entries(SMH_RANGE_NODES, BPF_F_MMAPABLE);
/// Policy word per destination port (see `port_policy`).
#[map(name = "GK_EG_PORTS")]
static GK_EG_PORTS: Array<u32> = Array::with_max_entries(EG_PORT_ENTRIES, 0);
#[map(name = "GK_EG_LIMITS")]
static GK_EG_LIMITS: Array<RateLimit> = Array::with_max_entries(MAX_LIMIT_CLASSES, 0);
/// GCRA theoretical arrival time per (source, class).
#[map(name = "GK_EG_BUCKETS")]
static GK_EG_BUCKETS: LruHashMap<LimitKey, u64> = LruHashMap::with_max_entries(MAX_BUCKETS, 0);
#[map(name = "GK_EG_STATS")]
static GK_EG_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_ENTRIES, 0);

// The inbound limiter (see `gatekeeper_common::inbound`).
/// Rate-limit class per destination port (0 = not limited).
#[map(name = "GK_IN_PORTS")]
static GK_IN_PORTS: Array<u32> = Array::with_max_entries(IN_PORT_ENTRIES, 0);
#[map(name = "GK_IN_LIMITS")]
static GK_IN_LIMITS: Array<RateLimit> = Array::with_max_entries(MAX_LIMIT_CLASSES, 0);
/// GCRA theoretical arrival time per (source, class): 4-way buckets.
#[map(name = "GK_IN_BUCKETS")]
static GK_IN_BUCKETS: Array<InBucket> = Array::with_max_entries(IN_BUCKETS, 0);
#[map(name = "GK_IN_STATS")]
static GK_IN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(IN_STAT_ENTRIES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// PPPoE session stage (RFC 2516).
const ETH_P_PPP_SES: u16 = 0x8864;
/// The PPPoE session header before the PPP protocol field: version and
/// type, code, session id, length.
const PPPOE_HLEN: usize = 6;
/// PPP protocol numbers for IPv4 and IPv6 (RFC 1332, RFC 5072).
const PPP_IP: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
/// IPv4 flags and fragment offset: more fragments, offset.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
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

/// What a TCP segment's headers hide from the egress gate (only the egress
/// gate's parser tells; the ingress gate's always says `NONE`).
mod hidden {
    /// Nothing: the segment is read as it is.
    pub const NONE: u8 = 0;
    /// The first fragment of a fragmented segment (IPv4: MF set at offset
    /// 0; IPv6: a fragment header with M set at offset 0). Its flags cannot
    /// be trusted (a later, overlapping fragment may rewrite them, RFC
    /// 1858) and its TCP header may not be all there.
    pub const FRAGMENT: u8 = 1;
    /// IPv6: the header chain goes on past `MAX_IPV6_EXT_HEADERS`.
    pub const CHAIN: u8 = 2;
}

/// Where a TCP segment sits in the frame.
#[derive(Clone, Copy)]
struct Segment {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header (for `hidden::CHAIN`, of the header the walk
    /// stopped at; for a first IPv6 fragment whose header chain runs past
    /// the frame, of the header it could not read).
    tcp: usize,
    v6: bool,
    /// One of [`hidden`].
    hidden: u8,
}

/// Where a TCP SYN sits in the frame.
#[derive(Clone, Copy)]
struct Syn {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header.
    tcp: usize,
    /// Length of the TCP header, options included (20..=60).
    tcp_len: usize,
    dport: u16,
    v6: bool,
}

/// What the context gives the parser: the packet's bounds. XDP and TC
/// programs share one parser through this.
trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
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

/// The clock probe the agent calibrates the datapath clock with (see
/// `Config::clock_ns`): writes the jiffies counter and
/// CLOCK_MONOTONIC_COARSE, read at one instant, into the first 16 bytes of
/// the (test-run) frame. Never attached.
#[xdp]
pub fn gatekeeper_clock(ctx: XdpContext) -> u32 {
    // SAFETY: plain helper calls.
    let (j, ns) = unsafe { (bpf_jiffies64(), bpf_ktime_get_coarse_ns()) };
    if store(&ctx, 0, [j, ns]).is_ok() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// The egress gate on a subscriber-facing interface: subscribers' SYNs as
/// they arrive, before routing. A rejected SYN goes back out as a RST.
#[xdp]
pub fn gatekeeper_subscriber(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    match egress::<_, true>(&ctx, ifindex) {
        Ok(Egress::Pass) => xdp_action::XDP_PASS,
        Ok(Egress::Drop) => xdp_action::XDP_DROP,
        Ok(Egress::Reject(syn)) => {
            if reject_xdp(&ctx, &syn).is_ok() {
                count_egress(ifindex, EgressCounter::PoolRejected as u32);
                xdp_action::XDP_TX
            } else {
                count_egress(ifindex, EgressCounter::PoolBlocked as u32);
                xdp_action::XDP_DROP
            }
        }
        Err(Skip) => {
            count_egress(ifindex, EgressCounter::ParseSkipped as u32);
            xdp_action::XDP_PASS
        }
    }
}

/// The egress gate on an uplink's egress: forwarded and locally generated
/// SYNs. A rejected SYN is turned into a RST and redirected to the uplink's
/// own ingress, so the kernel routes it back to the sender.
#[classifier]
pub fn gatekeeper_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the kernel's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match egress::<_, false>(&ctx, ifindex) {
        // UNSPEC: let later tcx / clsact programs run; the default passes.
        Ok(Egress::Pass) => TC_ACT_UNSPEC,
        Ok(Egress::Drop) => TC_ACT_SHOT as i32,
        Ok(Egress::Reject(syn)) => {
            if reject_tc(&ctx, &syn).is_ok() {
                count_egress(ifindex, EgressCounter::PoolRejected as u32);
                // SAFETY: plain helper call.
                unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) as i32 }
            } else {
                count_egress(ifindex, EgressCounter::PoolBlocked as u32);
                TC_ACT_SHOT as i32
            }
        }
        Err(Skip) => {
            count_egress(ifindex, EgressCounter::ParseSkipped as u32);
            TC_ACT_UNSPEC
        }
    }
}

/// The egress benchmark baseline: a TC program that only passes.
#[classifier]
pub fn gatekeeper_tc_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The address of a `T` at `offset` bytes into the packet, bounds-checked.
#[inline(always)]
fn ptr_at<T, P: Packet>(ctx: &P, offset: usize) -> Result<usize, Skip> {
    // An offset past the mask (IPv6 extension headers can claim up to 2 KiB
    // each) must fail, not wrap around to an earlier part of the frame.
    if offset > MAX_OFFSET {
        return Err(Skip);
    }
    let offset = offset & MAX_OFFSET;
    let start = ctx.start();
    if start + offset + size_of::<T>() > ctx.end() {
        return Err(Skip);
    }
    Ok(start + offset)
}

/// Reads a `T` at `offset` bytes into the packet, bounds-checked.
#[inline(always)]
fn load<T: Copy, P: Packet>(ctx: &P, offset: usize) -> Result<T, Skip> {
    let p = ptr_at::<T, P>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at; packet data may be unaligned.
    Ok(unsafe { core::ptr::read_unaligned(p as *const T) })
}

/// Reads a `T` at `offset` bytes into the packet with one load per word.
/// `load` compiles to byte loads on BPF (LLVM assumes no unaligned access);
/// packet data is only 2-byte aligned, but the verifier lets wide packet
/// loads through where the CPU handles unaligned access (x86-64, arm64).
#[inline(always)]
fn load_wide<T: Copy, P: Packet>(ctx: &P, offset: usize) -> Result<T, Skip> {
    let p = ptr_at::<T, P>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at; see above for the alignment.
    Ok(unsafe { core::ptr::read(p as *const T) })
}

/// Writes a `T` at `offset` bytes into the packet (XDP), bounds-checked.
#[inline(always)]
fn store<T: Copy>(ctx: &XdpContext, offset: usize, v: T) -> Result<(), Skip> {
    let p = ptr_at::<T, _>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { core::ptr::write_unaligned(p as *mut T, v) };
    Ok(())
}

/// Walks to the TCP header. `Ok(None)`: nothing to decide (not the first
/// fragment of a TCP segment, or not a plain SYN).
#[inline(always)]
fn parse_syn<P: Packet>(ctx: &P) -> Result<Option<Syn>, Skip> {
    match parse_segment::<P, false>(ctx)? {
        Some(seg) => parse_tcp(ctx, &seg),
        None => Ok(None),
    }
}

/// Walks Ethernet, VLAN tags, a PPPoE session header and the IP headers to
/// a TCP segment. `Ok(None)`: no TCP segment whose header this frame holds
/// (another protocol, or a fragment after the first). With `EGRESS`, the
/// segment also says what its headers hide (see [`hidden`]); without, first
/// fragments are read like whole segments and a chain too long to walk is
/// skipped.
#[inline(always)]
fn parse_segment<P: Packet, const EGRESS: bool>(ctx: &P) -> Result<Option<Segment>, Skip> {
    let mut ether_type = u16::from_be(load_wide::<u16, P>(ctx, 12)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = u16::from_be(load_wide::<u16, P>(ctx, offset + 2)?);
        offset += 4;
    }
    // PPPoE on the branch of the other ethertypes: plain IPv4 and IPv6 pay
    // nothing for it.
    let v6 = match ether_type {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        ETH_P_PPP_SES => match pppoe(ctx, offset)? {
            Some((len, v6)) => {
                offset += len;
                v6
            }
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let found = if v6 { parse_ipv6::<P, EGRESS>(ctx, offset)? } else { parse_ipv4::<P, EGRESS>(ctx, offset)? };
    Ok(found.map(|(tcp, hidden)| Segment { l3: offset, tcp, v6, hidden }))
}

/// A PPPoE session frame (its header at `offset`): the length of the PPPoE
/// and PPP headers before the IP header it carries and whether that is
/// IPv6, or `None` for another PPP protocol (LCP, IPCP, ...).
/// The PPPoE header's version, code and length are not checked: a frame
/// the PPPoE peer would refuse is judged all the same, which can only make
/// the gate decide on frames that reach nobody.
#[inline(always)]
fn pppoe<P: Packet>(ctx: &P, offset: usize) -> Result<Option<(usize, bool)>, Skip> {
    let proto = load_wide::<u16, P>(ctx, offset + PPPOE_HLEN)?.to_ne_bytes();
    // With protocol-field compression (RFC 1661 6.5) the number takes one
    // octet; a two-octet number's first octet is always even.
    let (number, len) =
        if proto[0] & 1 != 0 { (proto[0] as u16, PPPOE_HLEN + 1) } else { (u16::from_be_bytes(proto), PPPOE_HLEN + 2) };
    match number {
        PPP_IP => Ok(Some((len, false))),
        PPP_IPV6 => Ok(Some((len, true))),
        _ => Ok(None),
    }
}

/// Reads the TCP header of `seg`: `Ok(None)` when it is not a plain SYN.
#[inline(always)]
fn parse_tcp<P: Packet>(ctx: &P, seg: &Segment) -> Result<Option<Syn>, Skip> {
    let tcp_offset = seg.tcp;
    // Destination port (bytes 2..4) and flags (byte 13) of the TCP header.
    // Whole-chunk loads: a 1-byte bounds check compiles to a form the
    // verifier cannot use.
    // SAFETY: same sizes, any bits valid, packet order kept.
    let tcp: [u8; 16] = unsafe { core::mem::transmute(load_wide::<[u32; 4], P>(ctx, tcp_offset)?) };
    // The whole TCP header, options included, must be in the frame: a
    // truncated or malformed header is skipped, never decided.
    let tcp_len = ((tcp[12] >> 4) as usize) * 4;
    if tcp_len < 20 {
        return Err(Skip);
    }
    ptr_at::<[u8; 2], P>(ctx, tcp_offset + tcp_len - 2)?;
    if tcp[13] & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Ok(None);
    }
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    Ok(Some(Syn { l3: seg.l3, tcp: tcp_offset, tcp_len, dport, v6: seg.v6 }))
}

#[inline(always)]
fn try_gatekeeper_ingress(ctx: &XdpContext) -> Result<u32, Skip> {
    let Some(syn) = parse_syn(ctx)? else { return Ok(xdp_action::XDP_PASS) };
    let (word, bit) = addr::port_slot(syn.dport);
    let guarded = match GK_PORTS.get(word) {
        Some(w) => *w & bit != 0,
        None => false,
    };
    if !guarded {
        // Limited-only ports: one array read for every unguarded SYN.
        let class = in_class(syn.dport);
        if class == 0 {
            return Ok(xdp_action::XDP_PASS);
        }
        let source = source_of(ctx, &syn)?;
        return Ok(limited_only(&source, class));
    }
    let source = source_of(ctx, &syn)?;
    Ok(decide(ctx.ingress_ifindex() as u32, source, syn.dport))
}

#[inline(always)]
fn source_of(ctx: &XdpContext, syn: &Syn) -> Result<Source, Skip> {
    Ok(if syn.v6 {
        // SAFETY: two u64s and 16 bytes have the same size, any bits valid.
        Source::V6(unsafe { core::mem::transmute::<[u64; 2], Ipv6Bytes>(load_wide(ctx, syn.l3 + 8)?) })
    } else {
        Source::V4(load_wide::<u32, _>(ctx, syn.l3 + 12)?.to_ne_bytes())
    })
}

/// The inbound rate-limit class of a destination port (0: none).
#[inline(always)]
fn in_class(port: u16) -> u32 {
    match GK_IN_PORTS.get(port as u32) {
        Some(c) => *c,
        None => 0,
    }
}

#[inline(always)]
fn count_in(class: u32, counter: InboundCounter) {
    if let Some(p) = GK_IN_STATS.get_ptr_mut(inbound::in_stat_index(class, counter as u32)) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

/// A SYN to a limited port that is not guarded: an allow range or a pass
/// verdict with reason `ok` passes (exempt), a ban drops, and everything
/// else goes through the limiter. Deny ranges and other drop verdicts
/// (reverse-DNS judgements) do not apply here, and unknown sources are not
/// reported. A BPF function of its own: the program stays within the
/// verifier's budget.
#[inline(never)]
fn limited_only(source: &Source, class: u32) -> u32 {
    let cfg = config();
    let range = match source {
        Source::V4(a) => lookup(&GK_RANGES, a),
        Source::V6(a) => lookup(&GK_RANGES, a),
    };
    if let Some(r) = range {
        if r.kind == range_kind::ALLOW {
            hit(r.range_id);
            count_in(class, InboundCounter::Exempt);
            return xdp_action::XDP_PASS;
        }
    }
    let now = now_ns(&cfg);
    let (key, _, v) = verdict_of(source, &cfg, now);
    if v.expires_ns > now {
        if v.action == action::BAN {
            count_in(class, InboundCounter::Banned);
            if cfg.flags & config_flags::DRY_RUN != 0 {
                count_in(class, InboundCounter::DryRun);
                return xdp_action::XDP_PASS;
            }
            return xdp_action::XDP_DROP;
        }
        if v.action == action::PASS && v.reason == verdict_reason::OK {
            count_in(class, InboundCounter::Exempt);
            return xdp_action::XDP_PASS;
        }
    }
    limit(&limiter_key_of(source, &key), class, &cfg, now)
}

/// A SYN that passed the guard's judgement, on a port with an inbound
/// class: the limiter decides (no class: pass). `key`: the source's
/// limiter key (IPv4 address, IPv6 /64), which the caller already has.
#[inline(always)]
fn limit_port(key: &KeyWords, port: u16, cfg: &Config, now: u64) -> u32 {
    let class = in_class(port);
    if class == 0 {
        return xdp_action::XDP_PASS;
    }
    limit(key, class, cfg, now)
}

/// The limiter key of a source: its IPv4 address, or its IPv6 /64.
#[inline(always)]
fn limiter_key(source: &Source) -> KeyWords {
    match source {
        Source::V4(a) => KeyWords::v4(*a),
        Source::V6(a) => KeyWords::v6(a),
    }
}

/// [`limiter_key`] from the key the source was judged by (the IPv4
/// address, or an IPv6 address's own key, whose first word is its /64's):
/// no second pass over the address bytes.
#[inline(always)]
fn limiter_key_of(source: &Source, judged: &KeyWords) -> KeyWords {
    match source {
        Source::V4(_) => *judged,
        Source::V6(_) => KeyWords { lo: judged.lo, hi: 0 },
    }
}

/// The inbound limiter: the source's (IPv4 /32, IPv6 /64) GCRA state for
/// `class` in its bucket; conforming SYNs store their new arrival time in
/// place (or take a slot, see `InBucket::pick`), others are dropped and
/// counted (dry-run: counted and passed). A racing CPU's update can at
/// worst be lost, which errs toward the source. Inlined at its three call
/// sites: as a BPF function of its own it cost the guarded path ~8 ns more
/// (a call and a return, with the return-stack mitigations on), and the
/// program stays well within the verifier's limits without it.
#[inline(always)]
fn limit(key: &KeyWords, class: u32, cfg: &Config, now: u64) -> u32 {
    if class >= MAX_LIMIT_CLASSES {
        return xdp_action::XDP_PASS;
    }
    let lim = match GK_IN_LIMITS.get(class) {
        Some(l) => *l,
        None => return xdp_action::XDP_PASS,
    };
    if lim.interval_ns == 0 {
        return xdp_action::XDP_PASS;
    }
    count_in(class, InboundCounter::Checked);
    let key = *key;
    let Some(b) = GK_IN_BUCKETS.get_ptr_mut(inbound::in_bucket(&key, class, &cfg.hash)) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a bucket of an array map; torn reads and racing writes only
    // misplace one source's arrival time (see above).
    let (way, tat) = unsafe { (*b).pick(&key, class, now) };
    match lim.admit(tat, now) {
        Some(next) => {
            if let Some(s) = unsafe { (*b).slots.get_mut(way) } {
                s.key = key;
                s.class = class;
                s.tat = next;
            }
            xdp_action::XDP_PASS
        }
        None => {
            count_in(class, InboundCounter::Limited);
            if cfg.flags & config_flags::DRY_RUN != 0 {
                count_in(class, InboundCounter::DryRun);
                return xdp_action::XDP_PASS;
            }
            xdp_action::XDP_DROP
        }
    }
}

/// IPv4: the TCP header offset and what it hides (see [`hidden`]), or
/// `None` when the packet is not the first fragment of a TCP segment.
#[inline(always)]
fn parse_ipv4<P: Packet, const EGRESS: bool>(ctx: &P, offset: usize) -> Result<Option<(usize, u8)>, Skip> {
    // SAFETY: same sizes, any bits valid; the bytes keep their packet order.
    let ip: [u8; 20] = unsafe { core::mem::transmute(load_wide::<[u32; 5], P>(ctx, offset)?) };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // One test on the common path (a whole TCP segment): the egress gate
    // sorts out first fragments behind it.
    let mask = if EGRESS { IP_MF | IP_OFFSET } else { IP_OFFSET };
    if frag & mask != 0 || ip[9] != IPPROTO_TCP {
        if EGRESS && frag & IP_OFFSET == 0 && ip[9] == IPPROTO_TCP {
            return Ok(Some((offset + ihl, hidden::FRAGMENT)));
        }
        return Ok(None);
    }
    Ok(Some((offset + ihl, hidden::NONE)))
}

/// IPv6: walks up to [`MAX_IPV6_EXT_HEADERS`] extension headers to the TCP
/// header; its offset and what it hides (see [`hidden`]), or `None` when
/// the packet is no TCP segment or not its first fragment.
#[inline(always)]
fn parse_ipv6<P: Packet, const EGRESS: bool>(ctx: &P, offset: usize) -> Result<Option<(usize, u8)>, Skip> {
    let ip = load_wide::<u64, P>(ctx, offset)?.to_ne_bytes();
    if ip[0] >> 4 != 6 {
        return Err(Skip);
    }
    let mut next = ip[6];
    // The source address must be there too (the destination is read when
    // needed).
    ptr_at::<Ipv6Bytes, P>(ctx, offset + 8)?;
    let mut offset = offset + 40;
    // Egress: a first fragment header was walked. Then a header the frame
    // does not hold hides what follows (RFC 7112 wants the whole chain in
    // the first fragment; a sender that cuts it is hiding something).
    let mut first = hidden::NONE;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Ok(Some((offset, first))),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr = match load_wide::<u16, P>(ctx, offset) {
                    Ok(h) => h.to_ne_bytes(),
                    Err(_) if EGRESS && first != hidden::NONE => return Ok(Some((offset, first))),
                    Err(e) => return Err(e),
                };
                next = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let hdr = match load_wide::<u32, P>(ctx, offset) {
                    Ok(h) => h.to_ne_bytes(),
                    Err(_) if EGRESS && first != hidden::NONE => return Ok(Some((offset, first))),
                    Err(e) => return Err(e),
                };
                let field = u16::from_be_bytes([hdr[2], hdr[3]]);
                if field & 0xfff8 != 0 {
                    return Ok(None); // non-first fragment
                }
                if EGRESS && field & 1 != 0 {
                    first = hidden::FRAGMENT;
                }
                next = hdr[0];
                offset += 8;
            }
            IPPROTO_AH => return Err(Skip),
            _ => return Ok(None),
        }
    }
    if next == IPPROTO_TCP {
        return Ok(Some((offset, first)));
    }
    if EGRESS {
        if let IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS = next {
            return Ok(Some((offset, hidden::CHAIN)));
        }
    }
    Err(Skip)
}

/// What the tables say about a guarded SYN's source. The XDP gate acts on
/// it; the sk_lookup rejector judges again from the same tables (it cannot
/// see what XDP decided) to steer the refused sources whose action is
/// reject.
enum Outcome {
    /// In an allow range.
    Allowed,
    /// A live pass verdict, with its reason.
    Passed { reason: u32, now: u64 },
    /// Refused: a deny range or a live drop verdict. `counter` is the
    /// gate's decision counter, `refusal` the `reject::refusal` code.
    Refused { counter: u32, refusal: u32 },
    /// No live verdict: reported. `presumed` is the counter of a
    /// presumption (a learned range, a presumed-bad /64) that refuses it,
    /// [`NOT_PRESUMED`] if none, with its `refusal` code.
    Unknown { key: KeyWords, seen: u32, now: u64, presumed: u32, refusal: u32 },
}

/// Judges a source: range (allow wins, deny refuses), then live verdict,
/// else unknown. One longest-prefix lookup serves both kinds of range (see
/// `RangeValue`), in the range trie. `HITS`: count the range's hit (the XDP
/// gate does; the rejector's second look does not).
#[inline(always)]
fn judge<const HITS: bool>(source: &Source, cfg: &Config) -> Outcome {
    let range = match source {
        Source::V4(a) => lookup(&GK_RANGES, a),
        Source::V6(a) => lookup(&GK_RANGES, a),
    };
    // A learned range is a presumption about the hosts in it: a live
    // per-source verdict decides over it, and its sources are still
    // reported (once per interval) so that a good one earns its verdict.
    let mut presumed = NOT_PRESUMED;
    let mut refused_for = refusal::LEARNED_RANGE;
    if let Some(range) = range {
        if HITS {
            hit(range.range_id);
        }
        if range.kind == range_kind::ALLOW {
            return Outcome::Allowed;
        }
        if range.flags & range_flags::LEARNED == 0 {
            return Outcome::Refused { counter: Counter::DenyRange as u32, refusal: refusal::DENY_RANGE };
        }
        presumed = Counter::DenyRange as u32;
    }
    let now = now_ns(cfg);
    let (key, seen, v) = verdict_of(source, cfg, now);
    if v.expires_ns > now {
        // A reason past the table (never written) cannot be taken for
        // a range's refusal code.
        let reason = if v.reason < verdict_reason::COUNT { v.reason } else { verdict_reason::HOLD };
        // A ban refuses on guarded ports as a drop verdict does (its
        // reason is manual-ban).
        if v.action == action::DROP || v.action == action::BAN {
            return Outcome::Refused { counter: Counter::verdict_drop(reason), refusal: reason };
        }
        if v.action == action::PRESUMED_DROP {
            // A /64 several of whose addresses failed: this one may be
            // good, so it is reported too (once per interval), as a
            // learned range's sources are.
            presumed = Counter::verdict_drop(reason);
            refused_for = reason;
        } else {
            return Outcome::Passed { reason, now };
        }
    }
    Outcome::Unknown { key, seen, now, presumed, refusal: refused_for }
}

/// The live-or-not verdict of a source (a missing one as
/// `Verdict::default()`, long expired), with the key it was found under
/// and the source's reported-sources slot. IPv4: one key. IPv6: the
/// address's own key (the drop verdict of its own failed lookup) decides
/// while live, else the /64's (bans, pass verdicts, a /64 several of whose
/// addresses failed); both share one bucket pair. The address has a
/// reported-sources slot of its own.
#[inline(always)]
fn verdict_of(source: &Source, cfg: &Config, now: u64) -> (KeyWords, u32, gatekeeper_common::Verdict) {
    // SAFETY: a read-only global the loader sets.
    let shift = unsafe { core::ptr::read_volatile(&GK_VERDICT_SHIFT) };
    match source {
        Source::V4(a) => {
            let key = KeyWords::v4(*a);
            let at = sourcetab::source_slots(&key, &cfg.hash, shift);
            let v = sourcetab::verdict_lookup(|i| GK_VERDICTS.get(i), &key, &at).unwrap_or_default();
            (key, at.seen, v)
        }
        Source::V6(a) => {
            let net = KeyWords::v6(a);
            let host = KeyWords::v6_host(a);
            let at = sourcetab::source_slots(&net, &cfg.hash, shift);
            let (hv, nv) = sourcetab::verdict_lookup_v6(|i| GK_VERDICTS.get(i), &host, &at);
            (host, sourcetab::seen_slot(&host, &cfg.hash), if hv.expires_ns > now { hv } else { nv })
        }
    }
}

/// The XDP gate's decision for a guarded SYN (see [`judge`]).
#[inline(always)]
fn decide(ifindex: u32, source: Source, port: u16) -> u32 {
    let cfg = config();
    match judge::<true>(&source, &cfg) {
        Outcome::Allowed => {
            count(ifindex, Counter::Allowed as u32);
            xdp_action::XDP_PASS
        }
        Outcome::Passed { reason, now } => {
            count(ifindex, Counter::VerdictPass as u32);
            // A confirmed good name (`ok`) pays nothing for the limiter.
            if reason == verdict_reason::OK {
                return xdp_action::XDP_PASS;
            }
            limit_port(&limiter_key(&source), port, &cfg, now)
        }
        Outcome::Refused { counter, refusal } => refuse(ifindex, counter, refusal, &source, port, &cfg),
        Outcome::Unknown { key, seen, now, presumed, refusal } => {
            unknown(ifindex, &source, &key, seen, port, now, &cfg, presumed, refusal)
        }
    }
}

/// A refused SYN: counted by `counter`; dropped, or passed when dry-run
/// mode is on or the refusal's action is reject and the rejector takes it
/// (see [`to_rejector`]).
#[inline(always)]
fn refuse(ifindex: u32, counter: u32, refusal: u32, source: &Source, port: u16, cfg: &Config) -> u32 {
    // The action is read here, inline: a refusal whose action is drop (all
    // of them with the feature off) pays one array read, not a call.
    if cfg.flags & config_flags::DRY_RUN == 0 {
        if let Some(rc) = GK_REJECT.get(0) {
            if rc.rejects(refusal) && to_rejector(rc, source, refusal, port, cfg) {
                count(ifindex, counter);
                return xdp_action::XDP_PASS;
            }
        }
    }
    drop_or_dry_run(ifindex, counter, cfg)
}

/// Whether a SYN refused for `refusal` goes to the rejector: its action is
/// reject, on a port the rejector answers, the agent's lease runs, the
/// source is not quiet and the CPU's SYN budget has room. Only refused SYNs get here, so accepted ones pay
/// nothing for the feature. A BPF function of its own: it has three call
/// sites.
#[inline(never)]
fn to_rejector(rc: &RejectConfig, source: &Source, refusal: u32, port: u16, cfg: &Config) -> bool {
    if !rc.answers_on(port) {
        return false;
    }
    let now = now_ns(cfg);
    if now >= rc.lease_ns {
        count_reject(RejectCounter::Fallback as u32);
        return false;
    }
    let key = match source {
        Source::V4(a) => KeyWords::v4(*a),
        Source::V6(a) => KeyWords::v6_host(a),
    };
    if let Some(q) = GK_REJ_QUIET.get(quiet_slot(&key, &cfg.hash)) {
        if q.key.lo == key.lo && q.key.hi == key.hi && now < q.until_ns {
            count_reject(RejectCounter::Quiet as u32);
            return false;
        }
    }
    if rc.syn_limit.interval_ns != 0 {
        let Some(tat) = GK_REJ_BUDGET.get_ptr_mut(0) else { return false };
        // SAFETY: this CPU's slot; only this CPU writes it.
        match rc.syn_limit.admit(unsafe { *tat }, now) {
            Some(next) => unsafe { *tat = next },
            None => {
                count_reject(RejectCounter::OverBudget as u32);
                return false;
            }
        }
    }
    count_reject(RejectCounter::to_rejector(refusal));
    true
}

#[inline(always)]
fn count_reject(counter: u32) {
    if let Some(p) = GK_REJ_STATS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

/// The rejector: attached to the agent's network namespace, it runs when a
/// TCP SYN looks for a listening socket. A source the tables refuse for a
/// reason whose action is reject, to a port the rejector answers, is
/// steered to the agent's listener ([`GK_REJECTORS`]); with no listener
/// there the lookup fails (the kernel answers with a RST), so a refused
/// source never reaches the MTA. Everything else finds its socket as
/// usual: drops are the XDP gate's job, not this program's.
#[sk_lookup]
pub fn gatekeeper_rejector(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel's context; each field read once, at its own width
    // (the verifier refuses merged context loads).
    let l = ctx.lookup;
    let field = |p: *const u32| unsafe { core::ptr::read_volatile(p) };
    if field(unsafe { &(*l).protocol }) != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    let Some(rc) = GK_REJECT.get(0) else { return SK_PASS };
    if rc.actions == 0 {
        return SK_PASS;
    }
    let port = field(unsafe { &(*l).local_port });
    if port > u16::MAX as u32 || !rc.answers_on(port as u16) {
        return SK_PASS;
    }
    let (source, slot) = match field(unsafe { &(*l).family }) {
        AF_INET => (Source::V4(field(unsafe { &(*l).remote_ip4 }).to_ne_bytes()), reject::SLOT_V4),
        AF_INET6 => {
            let mut a = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                a[i * 4..i * 4 + 4].copy_from_slice(&field(unsafe { &(*l).remote_ip6[i] }).to_ne_bytes());
                i += 1;
            }
            (Source::V6(a), reject::SLOT_V6)
        }
        _ => return SK_PASS,
    };
    let cfg = config();
    let code = match judge::<false>(&source, &cfg) {
        Outcome::Refused { refusal, .. } => refusal,
        Outcome::Unknown { presumed, refusal, .. } if presumed != NOT_PRESUMED => refusal,
        _ => return SK_PASS,
    };
    if !rc.rejects(code) {
        return SK_PASS;
    }
    if cfg.flags & config_flags::DRY_RUN != 0 {
        count_reject(RejectCounter::DryRun as u32);
        return SK_PASS;
    }
    match GK_REJECTORS.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => {
            count_reject(RejectCounter::Steered as u32);
            SK_PASS
        }
        Err(_) => {
            count_reject(RejectCounter::NoRejector as u32);
            SK_DROP
        }
    }
}

/// The rejector's benchmark baseline: an sk_lookup program that only
/// passes.
#[sk_lookup]
pub fn gatekeeper_sk_baseline(_ctx: SkLookupContext) -> u32 {
    SK_PASS
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// No presumption holds the source (see [`unknown`]).
const NOT_PRESUMED: u32 = u32::MAX;

/// CLOCK_MONOTONIC_COARSE: from jiffies (inlined) once the agent has
/// calibrated the clock, else from the helper. The tick's resolution is
/// plenty for expiries and report intervals measured in seconds.
#[inline(always)]
fn now_ns(cfg: &Config) -> u64 {
    // SAFETY: plain helper calls.
    match cfg.clock_ns(unsafe { bpf_jiffies64() }) {
        Some(ns) => ns,
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Longest-prefix match of `a` in a range table.
#[inline(always)]
fn lookup<const N: usize>(table: &Array<TrieNode>, a: &[u8; N]) -> Option<RangeValue> {
    trie::lookup(|i| table.get(i), a)
}

#[inline(always)]
fn config() -> Config {
    GK_CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn drop_or_dry_run(ifindex: u32, counter: u32, cfg: &Config) -> u32 {
    count(ifindex, counter);
    if cfg.flags & config_flags::DRY_RUN != 0 {
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

/// A source without a live verdict: report it (at most once per interval);
/// refuse it if `presumed` is a counter (a learned range or a presumed-bad
/// /64 holds it: that counter counts it; see [`refuse`]), else pass it, or with hold
/// drop it while its first SYN is younger than `hold_ms`. One call site, so
/// the reporting code is in the program once.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn unknown(
    ifindex: u32,
    source: &Source,
    key: &KeyWords,
    seen: u32,
    port: u16,
    now: u64,
    cfg: &Config,
    presumed: u32,
    refusal: u32,
) -> u32 {
    let since = note(ifindex, source, key, seen, port, now, cfg);
    if presumed != NOT_PRESUMED {
        return refuse(ifindex, presumed, refusal, source, port, cfg);
    }
    if cfg.flags & config_flags::HOLD != 0 && since != 0 && now.wrapping_sub(since) < cfg.hold_ms as u64 * 1_000_000 {
        return drop_or_dry_run(ifindex, Counter::verdict_drop(verdict_reason::HOLD), cfg);
    }
    count(ifindex, Counter::Unknown as u32);
    // The judged key (an IPv6 address's own, or the IPv4 address) as the
    // limiter's: its /64 for IPv6, already in registers.
    limit_port(&limiter_key_of(source, key), port, cfg, now)
}

/// Reports a source the agent should look up, at most once per
/// `event_interval`, and keeps its reported-sources slot. Returns when its
/// first SYN took the slot (the start of its hold window), or 0 when
/// another, fresh source holds the slot: it is then never held, so a flood
/// of colliding sources can never make a real sender's retransmits look
/// new. The window is kept whether or not the report got through, so a
/// dead agent (a full ring) holds nobody for longer than `hold_ms`.
#[inline(always)]
fn note(ifindex: u32, source: &Source, key: &KeyWords, seen: u32, port: u16, now: u64, cfg: &Config) -> u64 {
    // The index is within the map's size: the lookup cannot fail.
    let Some(p) = GK_SEEN.get_ptr_mut(seen) else { return 0 };
    // SAFETY (every access below): a slot of an array map; torn reads and
    // racing writes are harmless here (at worst one extra event, or one SYN
    // passed instead of held). The clock is never 0.
    let ours = unsafe { (*p).key.lo == key.lo && (*p).key.hi == key.hi };
    if ours {
        let last = unsafe { (*p).reported_ns };
        if last != 0 && now.wrapping_sub(last) < cfg.event_interval_ns {
            // Its own slot, reported within the interval: the common case.
            return unsafe { (*p).first_ns };
        }
    }
    let free =
        !ours && unsafe { sourcetab::seen_free(&*p, now, sourcetab::seen_window(cfg.event_interval_ns, cfg.hold_ms)) };
    let reported = report(ifindex, source, port, now);
    if ours {
        // Only a delivered report silences the source.
        if reported {
            unsafe { (*p).reported_ns = now };
        }
        return unsafe { (*p).first_ns };
    }
    if !free {
        // A fresh other source holds the slot: reported, never held.
        return 0;
    }
    unsafe {
        (*p).key = *key;
        (*p).first_ns = now;
        (*p).reported_ns = if reported { now } else { 0 };
    }
    now
}

/// Queues an event for the agent; true when it was queued. A BPF function
/// of its own (a call on the rare reporting path): inlined, the optimizer
/// copies it into each branch of [`note`], which makes the whole program a
/// quarter longer and slows unrelated paths by several ns.
#[inline(never)]
fn report(ifindex: u32, source: &Source, port: u16, now: u64) -> bool {
    let (addr, fam) = match source {
        Source::V4(a) => (addr::mapped_v4(*a), family::V4),
        Source::V6(a) => (*a, family::V6),
    };
    match GK_EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event { ts_ns: now, addr, ifindex, port, family: fam });
            entry.submit(0);
            true
        }
        None => {
            count(ifindex, Counter::EventLost as u32);
            false
        }
    }
}

// ------------------------------------------------------------ egress gate

/// What the egress gate does with a packet.
enum Egress {
    Pass,
    Drop,
    /// Answer with a RST (the caller rewrites the frame, or drops it when
    /// it cannot).
    Reject(Syn),
}

/// The egress decision for a SYN to a port with a policy: from a pool to a
/// guarded port, blocked unless the destination is a smarthost or the
/// source is exempt (exempt entries win over pools in the one source
/// table); then the rate limit of the port's class, for every subscriber
/// source (pool or exempt). `EXPLAIN`: the gate runs before the TC explain
/// stage (XDP on a subscriber-facing interface), so an explain pool's
/// blocked SYN passes to the stage while it is attached; elsewhere an
/// explain pool is a reject pool (it carries both flags).
#[inline(always)]
fn egress<P: Packet, const EXPLAIN: bool>(ctx: &P, ifindex: u32) -> Result<Egress, Skip> {
    let Some(seg) = parse_segment::<P, true>(ctx)? else { return Ok(Egress::Pass) };
    if seg.hidden != hidden::NONE {
        if let Some(e) = guard_hidden(ctx, ifindex, &seg)? {
            return Ok(e);
        }
        // Not a pool source's, or to a smarthost or an unguarded port: as
        // before, a first fragment is read as a segment; a chain too long
        // to walk is skipped.
        if seg.hidden == hidden::CHAIN {
            return Err(Skip);
        }
    }
    let Some(syn) = parse_tcp(ctx, &seg)? else { return Ok(Egress::Pass) };
    let policy = match GK_EG_PORTS.get(syn.dport as u32) {
        Some(p) => *p,
        None => 0,
    };
    if policy == 0 {
        return Ok(Egress::Pass);
    }
    let (range, key) = if syn.v6 {
        let src = load::<Ipv6Bytes, P>(ctx, syn.l3 + 8)?;
        (lookup(&GK_SUB_RANGES, &src), addr::key_v6(src))
    } else {
        let src = load::<Ipv4Bytes, P>(ctx, syn.l3 + 12)?;
        (lookup(&GK_SUB_RANGES, &src), addr::key_v4(src))
    };
    let Some(range) = range else { return Ok(Egress::Pass) };
    if policy & port_policy::GUARD != 0 {
        if range.kind == range_kind::POOL {
            let smarthost = if syn.v6 {
                lookup(&GK_SMH_RANGES, &load::<Ipv6Bytes, P>(ctx, syn.l3 + 24)?)
            } else {
                lookup(&GK_SMH_RANGES, &load::<Ipv4Bytes, P>(ctx, syn.l3 + 16)?)
            };
            match smarthost {
                Some(s) => {
                    hit(s.range_id);
                    count_egress(ifindex, EgressCounter::SmarthostAllowed as u32);
                }
                None => {
                    hit(range.range_id);
                    if EXPLAIN
                        && range.flags & range_flags::EXPLAIN != 0
                        && explain::explainable(ctx, syn.l3, syn.v6)
                        && explain::staged()
                    {
                        // The stage decides and counts (dry-run too).
                        return Ok(Egress::Pass);
                    }
                    let reject = range.flags & range_flags::REJECT != 0;
                    if config().flags & config_flags::DRY_RUN != 0 {
                        let c = if reject { EgressCounter::PoolRejected } else { EgressCounter::PoolBlocked };
                        count_egress(ifindex, c as u32);
                        count_egress(ifindex, EgressCounter::DryRun as u32);
                        return Ok(Egress::Pass);
                    }
                    if reject {
                        return Ok(Egress::Reject(syn));
                    }
                    count_egress(ifindex, EgressCounter::PoolBlocked as u32);
                    return Ok(Egress::Drop);
                }
            }
        } else {
            hit(range.range_id);
            count_egress(ifindex, EgressCounter::Exempt as u32);
        }
    }
    let class = port_policy::class(policy);
    if class == 0 || class >= MAX_LIMIT_CLASSES {
        return Ok(Egress::Pass);
    }
    let limit = match GK_EG_LIMITS.get(class) {
        Some(l) => *l,
        None => return Ok(Egress::Pass),
    };
    if limit.interval_ns == 0 {
        return Ok(Egress::Pass);
    }
    let bucket = LimitKey { addr: key.addr, class };
    // A plain u64 (0 = never seen), not an Option of a map pointer.
    // SAFETY: copied out at once.
    let tat: u64 = match unsafe { GK_EG_BUCKETS.get(&bucket) } {
        Some(t) => *t,
        None => 0,
    };
    let now = now_ns(&config());
    match limit.admit(tat, now) {
        Some(next) => {
            // Update in place when the bucket exists: an LRU-hash update
            // allocates a new element, several times the cost of a store.
            match GK_EG_BUCKETS.get_ptr_mut(&bucket) {
                // SAFETY: a u64 in a map value; a racing CPU's update can at
                // worst be lost, which errs toward the subscriber.
                Some(p) if tat != 0 => unsafe { *p = next },
                _ => {
                    let _ = GK_EG_BUCKETS.insert(&bucket, &next, 0);
                }
            }
            Ok(Egress::Pass)
        }
        None => {
            count_egress(ifindex, EgressCounter::RateLimited as u32);
            if config().flags & config_flags::DRY_RUN != 0 {
                count_egress(ifindex, EgressCounter::DryRun as u32);
                return Ok(Egress::Pass);
            }
            Ok(Egress::Drop)
        }
    }
}

/// The guard for a segment whose headers hide whether it is a SYN to a
/// guarded port (see [`hidden`]): from a pool source, not to a smarthost,
/// it is dropped and counted (`pool-fragment`, `pool-ext-chain`), never
/// answered. `None`: the guard has nothing to say (another source, a
/// smarthost, or a first fragment that shows an unguarded port).
///
/// - A TCP first fragment to a guarded port is dropped whatever its flags
///   say, as a later fragment overlapping the TCP header may rewrite them
///   (RFC 1858); one too short to show its port counts as guarded. Real
///   stacks set DF on TCP (path MTU discovery) and send whole headers, so a
///   subscriber's mail to a smarthost, and everything to other ports, is
///   untouched; only the first fragment is dropped, which is enough: the
///   rest cannot be reassembled without it.
/// - An IPv6 chain longer than the walk is dropped whatever it carries:
///   real stacks do not send seven or more extension headers on a SYN (or,
///   in practice, on anything), so nothing legitimate is lost.
///
/// Other sources are not touched. Nor are headers the receiver would refuse
/// on its own (an AH- or ESP-protected SYN reaches a mail server only with
/// a security association it agreed to).
#[inline(always)]
fn guard_hidden<P: Packet>(ctx: &P, ifindex: u32, seg: &Segment) -> Result<Option<Egress>, Skip> {
    let counter = if seg.hidden == hidden::FRAGMENT {
        // The ports, when the fragment shows them (4 bytes).
        if let Ok(ports) = load_wide::<[u8; 4], P>(ctx, seg.tcp) {
            let dport = u16::from_be_bytes([ports[2], ports[3]]);
            let policy = match GK_EG_PORTS.get(dport as u32) {
                Some(p) => *p,
                None => 0,
            };
            if policy & port_policy::GUARD == 0 {
                return Ok(None);
            }
        }
        EgressCounter::PoolFragment
    } else {
        EgressCounter::PoolExtChain
    };
    let (range, smarthost) = if seg.v6 {
        let src = load::<Ipv6Bytes, P>(ctx, seg.l3 + 8)?;
        let Some(range) = lookup(&GK_SUB_RANGES, &src) else { return Ok(None) };
        if range.kind != range_kind::POOL {
            return Ok(None);
        }
        (range, lookup(&GK_SMH_RANGES, &load::<Ipv6Bytes, P>(ctx, seg.l3 + 24)?))
    } else {
        let src = load::<Ipv4Bytes, P>(ctx, seg.l3 + 12)?;
        let Some(range) = lookup(&GK_SUB_RANGES, &src) else { return Ok(None) };
        if range.kind != range_kind::POOL {
            return Ok(None);
        }
        (range, lookup(&GK_SMH_RANGES, &load::<Ipv4Bytes, P>(ctx, seg.l3 + 16)?))
    };
    if smarthost.is_some() {
        return Ok(None);
    }
    hit(range.range_id);
    count_egress(ifindex, counter as u32);
    if config().flags & config_flags::DRY_RUN != 0 {
        count_egress(ifindex, EgressCounter::DryRun as u32);
        return Ok(Some(Egress::Pass));
    }
    Ok(Some(Egress::Drop))
}

#[inline(always)]
fn count_egress(ifindex: u32, counter: u32) {
    if let Some(p) = GK_EG_STATS.get_ptr_mut(stat_index(ifindex, counter)) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

/// The parts of a SYN a RST answer is made from. Only plain segments are
/// answered: IPv4 without options or IPv6 without extension headers, and
/// no payload, right after the Ethernet header or VLAN tags (anything else,
/// a PPPoE session's SYN too, is dropped instead).
struct RstPlan {
    /// Source and destination address as the SYN had them (v4: first 8
    /// bytes; v6: all 32).
    addrs: [u8; 32],
    /// The SYN's sequence number, raw bytes.
    seq: [u8; 4],
}

#[inline(always)]
fn plan_rst<P: Packet>(ctx: &P, syn: &Syn) -> Result<RstPlan, Skip> {
    // The ethertype right before the IP header (a PPPoE session has its PPP
    // protocol number there, never one of these).
    let ether_type = u16::from_be(load::<u16, P>(ctx, syn.l3 - 2)?);
    if ether_type != if syn.v6 { ETH_P_IPV6 } else { ETH_P_IP } {
        return Err(Skip);
    }
    let mut addrs = [0u8; 32];
    if syn.v6 {
        let ip = load::<[u8; 40], P>(ctx, syn.l3)?;
        let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if syn.tcp != syn.l3 + 40 || payload != syn.tcp_len {
            return Err(Skip);
        }
        addrs.copy_from_slice(&ip[8..40]);
    } else {
        let ip = load::<[u8; 20], P>(ctx, syn.l3)?;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if syn.tcp != syn.l3 + 20 || total != 20 + syn.tcp_len {
            return Err(Skip);
        }
        addrs[..8].copy_from_slice(&ip[12..20]);
    }
    let tcp = load::<[u8; 8], P>(ctx, syn.tcp)?;
    Ok(RstPlan { addrs, seq: [tcp[4], tcp[5], tcp[6], tcp[7]] })
}

/// The frame's destination and source MAC, swapped.
#[inline(always)]
fn swapped_macs<P: Packet>(ctx: &P) -> Result<[u8; 12], Skip> {
    let eth = load::<[u8; 12], P>(ctx, 0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..12]);
    swapped[6..].copy_from_slice(&eth[..6]);
    Ok(swapped)
}

const TCP_RST_ACK: u8 = TCP_RST | TCP_ACK;
/// The options of an answered SYN become NOPs: same length, no meaning.
const NOP4: [u8; 4] = [1, 1, 1, 1];
const MAX_TCP_OPTION_WORDS: usize = 10;

#[inline(always)]
fn sum16(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// XDP: rewrites the SYN in place into the RST|ACK its receiver would have
/// sent (addresses and ports swapped, ack = seq + 1, options as NOPs) with
/// fresh checksums, to go back out the interface it came in on.
#[inline(always)]
fn reject_xdp(ctx: &XdpContext, syn: &Syn) -> Result<(), Skip> {
    let plan = plan_rst(ctx, syn)?;
    let swapped = swapped_macs(ctx)?;
    store(ctx, 0, swapped)?;
    let a = &plan.addrs;
    let pseudo = if syn.v6 {
        let mut ip = load::<[u8; 40], _>(ctx, syn.l3)?;
        ip[7] = 64; // hop limit
        ip[8..24].copy_from_slice(&a[16..32]);
        ip[24..40].copy_from_slice(&a[..16]);
        store(ctx, syn.l3, ip)?;
        sum16(&a[..32])
    } else {
        let mut ip = load::<[u8; 20], _>(ctx, syn.l3)?;
        ip[8] = 64; // TTL
        ip[10] = 0;
        ip[11] = 0;
        ip[12..16].copy_from_slice(&a[4..8]);
        ip[16..20].copy_from_slice(&a[..4]);
        let csum = fold(sum16(&ip)).to_be_bytes();
        ip[10] = csum[0];
        ip[11] = csum[1];
        store(ctx, syn.l3, ip)?;
        sum16(&a[..8])
    };
    let old = load::<[u8; 20], _>(ctx, syn.tcp)?;
    let ack = u32::from_be_bytes(plan.seq).wrapping_add(1).to_be_bytes();
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&old[2..4]);
    tcp[2..4].copy_from_slice(&old[0..2]);
    tcp[8..12].copy_from_slice(&ack);
    tcp[12] = old[12] & 0xf0;
    tcp[13] = TCP_RST_ACK;
    let option_words = (syn.tcp_len - 20) / 4;
    let mut i = 0;
    while i < MAX_TCP_OPTION_WORDS {
        if i < option_words {
            store(ctx, syn.tcp + 20 + i * 4, NOP4)?;
        }
        i += 1;
    }
    let sum = pseudo
        + IPPROTO_TCP as u32
        + syn.tcp_len as u32
        + sum16(&tcp)
        + option_words as u32 * 2 * u16::from_be_bytes([1, 1]) as u32;
    let csum = fold(sum).to_be_bytes();
    tcp[16] = csum[0];
    tcp[17] = csum[1];
    store(ctx, syn.tcp, tcp)
}

/// TC: the same rewrite through the skb helpers, which keep the checksum
/// right whatever offload state the skb is in (a locally generated or
/// forwarded SYN usually carries a partial checksum). Swapping addresses
/// and ports leaves every checksum as it is; the changed TCP words are
/// folded in with `bpf_l4_csum_replace`.
#[inline(always)]
fn reject_tc(ctx: &TcContext, syn: &Syn) -> Result<(), Skip> {
    let plan = plan_rst(ctx, syn)?;
    let swapped = swapped_macs(ctx)?;
    let put = |offset: usize, bytes: &[u8]| -> Result<(), Skip> {
        if offset > MAX_OFFSET {
            return Err(Skip);
        }
        // SAFETY: the helper bounds-checks against the skb.
        let r = unsafe {
            aya_ebpf::helpers::bpf_skb_store_bytes(
                ctx.skb.skb as *mut _,
                (offset & MAX_OFFSET) as u32,
                bytes.as_ptr() as *const _,
                bytes.len() as u32,
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(Skip)
        }
    };
    let csum_off = syn.tcp + 16;
    let fix = |from: u32, to: u32, size: u64| -> Result<(), Skip> {
        ctx.l4_csum_replace(csum_off & MAX_OFFSET, from as u64, to as u64, size).map_err(|_| Skip)
    };
    let a = &plan.addrs;
    put(0, &swapped)?;
    if syn.v6 {
        let mut addrs = [0u8; 32];
        addrs[..16].copy_from_slice(&a[16..32]);
        addrs[16..].copy_from_slice(&a[..16]);
        put(syn.l3 + 8, &addrs)?;
    } else {
        let mut addrs = [0u8; 8];
        addrs[..4].copy_from_slice(&a[4..8]);
        addrs[4..].copy_from_slice(&a[..4]);
        put(syn.l3 + 12, &addrs)?;
    }
    let old = load::<[u8; 20], _>(ctx, syn.tcp)?;
    let ack = u32::from_be_bytes(plan.seq).wrapping_add(1).to_be_bytes();
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let half = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]) as u32;
    // Ports swapped: the sum is unchanged.
    put(syn.tcp, &[old[2], old[3], old[0], old[1]])?;
    fix(word(&old[4..8]), 0, 4)?;
    fix(word(&old[8..12]), word(&ack), 4)?;
    let flags = [old[12] & 0xf0, TCP_RST_ACK];
    fix(half(&old[12..14]), half(&flags), 2)?;
    fix(half(&old[14..16]), 0, 2)?;
    fix(half(&old[18..20]), 0, 2)?;
    let mut hdr = [0u8; 16];
    hdr[4..8].copy_from_slice(&ack);
    hdr[8..10].copy_from_slice(&flags);
    put(syn.tcp + 4, &hdr[..12])?;
    put(syn.tcp + 18, &[0, 0])?;
    let option_words = (syn.tcp_len - 20) / 4;
    let mut i = 0;
    while i < MAX_TCP_OPTION_WORDS {
        if i < option_words {
            let at = syn.tcp + 20 + i * 4;
            let opt = load::<[u8; 4], _>(ctx, at)?;
            fix(word(&opt), word(&NOP4), 4)?;
            put(at, &NOP4)?;
        }
        i += 1;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
