//! The explain stage: a TC program on a subscriber-facing interface's
//! ingress (after its XDP egress gate) that hands an explain pool's blocked
//! connections to the agent's transparent listener (see
//! `gatekeeper_common::explain`).
//!
//! For a TCP segment from a pool source whose action is explain, to a
//! guarded port, not to a smarthost (exempt sources are not pool sources):
//! 1. a segment of a connection the agent already owns (a request, an
//!    established or a time-wait socket found by the segment's own tuple)
//!    is assigned to that socket;
//! 2. a SYN is assigned to the agent's listener (found by its loopback
//!    address and port);
//!
//! and marked, so that the agent's policy route (`fwmark` → `local
//! default dev lo`) delivers it locally instead of forwarding it. A SYN no
//! listener takes is answered with a RST (or dropped when it cannot be
//! answered), never forwarded. Other segments pass untouched.
//!
//! Every socket reference the lookups return is released on every path.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use gatekeeper_common::{
    config_flags,
    explain::{ExplainConfig, LISTENER_PRIORITY},
    port_policy, range_flags, range_kind, EgressCounter, Ipv4Bytes, Ipv6Bytes,
};

use super::{
    config, count_egress, hidden, load, load_wide, lookup, parse_segment, parse_tcp, reject_tc, Packet, Skip, ETH_P_IP,
    ETH_P_IPV6, GK_EG_PORTS, GK_SMH_RANGES, GK_SUB_RANGES, TCP_ACK, TCP_RST, TCP_SYN,
};

#[map(name = "GK_EXPLAIN")]
static GK_EXPLAIN: Array<ExplainConfig> = Array::with_max_entries(1, 0);

/// Whether the explain stage is attached (the XDP gate then passes explain
/// pools' blocked SYNs to it). Read on the XDP gate's block path only.
#[inline(always)]
pub(crate) fn staged() -> bool {
    match GK_EXPLAIN.get(0) {
        Some(c) => c.staged(),
        None => false,
    }
}

/// Whether a segment whose IP header is at `l3` can be explained: IP right
/// after the Ethernet header or VLAN tags. Not inside a PPPoE session: the
/// kernel hands such a frame to the PPPoE socket, which drops the socket
/// assignment, so the gates treat explain as reject there (and a PPPoE SYN,
/// which cannot be answered with a RST, is dropped).
#[inline(always)]
pub(crate) fn explainable<P: Packet>(ctx: &P, l3: usize, v6: bool) -> bool {
    match load::<u16, P>(ctx, l3.wrapping_sub(2)) {
        Ok(et) => u16::from_be(et) == if v6 { ETH_P_IPV6 } else { ETH_P_IP },
        Err(_) => false,
    }
}

/// `127.0.0.1` and `::1`, as the packet has addresses (network order).
const LOOPBACK4: Ipv4Bytes = [127, 0, 0, 1];
const LOOPBACK6: Ipv6Bytes = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[classifier]
pub fn gatekeeper_explain(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the kernel's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // A frame the parser cannot read passes: the XDP gate before this one
    // has judged (and counted) it already.
    stage(&ctx, ifindex).unwrap_or(TC_ACT_UNSPEC)
}

/// A segment's addresses and ports, for the socket lookups.
struct Flow {
    v6: bool,
    src: Ipv6Bytes,
    dst: Ipv6Bytes,
    /// Network order, as in the packet.
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn stage(ctx: &TcContext, ifindex: u32) -> Result<i32, Skip> {
    let Some(seg) = parse_segment::<_, true>(ctx)? else { return Ok(TC_ACT_UNSPEC) };
    if seg.hidden != hidden::NONE || !explainable(ctx, seg.l3, seg.v6) {
        // The XDP gate drops what hides its flags or ports from a pool, and
        // rejects (or drops) what cannot be explained.
        return Ok(TC_ACT_UNSPEC);
    }
    // Ports (0..4) and flags (byte 13): whole-word loads, as parse_tcp.
    // SAFETY: same sizes, any bits valid, packet order kept.
    let tcp: [u8; 16] = unsafe { core::mem::transmute(load_wide::<[u32; 4], _>(ctx, seg.tcp)?) };
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let policy = match GK_EG_PORTS.get(dport as u32) {
        Some(p) => *p,
        None => 0,
    };
    if policy & port_policy::GUARD == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    let mut flow = Flow {
        v6: seg.v6,
        src: [0; 16],
        dst: [0; 16],
        sport: u16::from_ne_bytes([tcp[0], tcp[1]]),
        dport: u16::from_ne_bytes([tcp[2], tcp[3]]),
    };
    let (range, smarthost) = if seg.v6 {
        flow.src = load::<Ipv6Bytes, _>(ctx, seg.l3 + 8)?;
        flow.dst = load::<Ipv6Bytes, _>(ctx, seg.l3 + 24)?;
        (lookup(&GK_SUB_RANGES, &flow.src), lookup(&GK_SMH_RANGES, &flow.dst))
    } else {
        let src = load::<Ipv4Bytes, _>(ctx, seg.l3 + 12)?;
        let dst = load::<Ipv4Bytes, _>(ctx, seg.l3 + 16)?;
        flow.src[..4].copy_from_slice(&src);
        flow.dst[..4].copy_from_slice(&dst);
        (lookup(&GK_SUB_RANGES, &src), lookup(&GK_SMH_RANGES, &dst))
    };
    let Some(range) = range else { return Ok(TC_ACT_UNSPEC) };
    if range.kind != range_kind::POOL || range.flags & range_flags::EXPLAIN == 0 || smarthost.is_some() {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(ec) = GK_EXPLAIN.get(0) else { return Ok(TC_ACT_UNSPEC) };
    if !ec.staged() {
        // Not attached as far as the agent knows: the XDP gate rejects.
        return Ok(TC_ACT_UNSPEC);
    }
    let syn = tcp[13] & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
    if config().flags & config_flags::DRY_RUN != 0 {
        if syn {
            count_egress(ifindex, EgressCounter::PoolExplained as u32);
            count_egress(ifindex, EgressCounter::DryRun as u32);
        }
        return Ok(TC_ACT_UNSPEC);
    }
    // 1. A connection the agent owns already (not a listener: a local MTA
    // on the same port must never get the subscriber's segments).
    match assign_owned(ctx, &flow) {
        Owned::Assigned => {
            mark(ctx, ec);
            return Ok(TC_ACT_OK);
        }
        Owned::Failed => return Ok(TC_ACT_SHOT as i32),
        Owned::None => {}
    }
    let Some(syn) = (if syn { parse_tcp(ctx, &seg)? } else { None }) else {
        // Not the agent's, not a SYN: as the gates do with every non-SYN.
        return Ok(TC_ACT_UNSPEC);
    };
    // 2. A new connection: the agent's listener.
    let port = if flow.v6 { ec.port_v6 } else { ec.port_v4 };
    if port != 0 && assign_listener(ctx, &flow, port) {
        mark(ctx, ec);
        count_egress(ifindex, EgressCounter::PoolExplained as u32);
        return Ok(TC_ACT_OK);
    }
    // 3. No listener: the pool's RST, straight back out this interface.
    count_egress(ifindex, EgressCounter::ExplainFallback as u32);
    if reject_tc(ctx, &syn).is_ok() {
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(ifindex, 0) as i32 });
    }
    Ok(TC_ACT_SHOT as i32)
}

#[inline(always)]
fn mark(ctx: &TcContext, ec: &ExplainConfig) {
    // SAFETY: the context pointer is the kernel's __sk_buff.
    let old = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(ec.apply_mark(old));
}

enum Owned {
    /// No socket of the agent's holds this segment's connection.
    None,
    Assigned,
    /// Found, but the assignment failed: dropped rather than forwarded.
    Failed,
}

/// The lookup tuple of `flow`, with the destination (address, port in
/// network order) replaced if given.
#[inline(always)]
fn tuple(flow: &Flow, dst: Option<(&Ipv6Bytes, u16)>) -> (bpf_sock_tuple, u32) {
    // SAFETY: a plain C union of integers; all-zero is a valid value.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (daddr, dport) = match dst {
        Some((a, p)) => (a, p),
        None => (&flow.dst, flow.dport),
    };
    // SAFETY: writing union fields of plain integers.
    let size = unsafe {
        if flow.v6 {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            v6.saddr = words(&flow.src);
            v6.daddr = words(daddr);
            v6.sport = flow.sport;
            v6.dport = dport;
            core::mem::size_of_val(v6) as u32
        } else {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([flow.src[0], flow.src[1], flow.src[2], flow.src[3]]);
            v4.daddr = u32::from_ne_bytes([daddr[0], daddr[1], daddr[2], daddr[3]]);
            v4.sport = flow.sport;
            v4.dport = dport;
            core::mem::size_of_val(v4) as u32
        }
    };
    (t, size)
}

#[inline(always)]
fn words(a: &Ipv6Bytes) -> [u32; 4] {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        w[i] = u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
        i += 1;
    }
    w
}

/// The socket state (`sk->state`), read at its own width.
#[inline(always)]
fn state(sk: *mut bpf_sock) -> u32 {
    // SAFETY: a non-null socket pointer the lookup returned.
    unsafe { core::ptr::read_volatile(&(*sk).state) }
}

/// Step 1: assigns the segment to the request, established or time-wait
/// socket its own tuple finds (a listener found there is not the agent's
/// connection and is left alone).
#[inline(always)]
fn assign_owned(ctx: &TcContext, flow: &Flow) -> Owned {
    let (mut t, size) = tuple(flow, None);
    // SAFETY: helper call with a stack tuple of the size given; the
    // reference it returns is released below on every path.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.skb.skb as *mut _, &mut t, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Owned::None;
    }
    let out = if state(sk) == BPF_TCP_LISTEN as u32 {
        Owned::None
    } else {
        // SAFETY: a socket reference we hold.
        match unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) } {
            0 => Owned::Assigned,
            _ => Owned::Failed,
        }
    };
    // SAFETY: releases the reference the lookup returned.
    unsafe { bpf_sk_release(sk as *mut _) };
    out
}

/// Step 2: assigns a SYN to the agent's listener on the loopback address
/// of its family and `port` (host order). False: no listener there, or not
/// the agent's (see `LISTENER_PRIORITY`), or the assignment failed.
#[inline(always)]
fn assign_listener(ctx: &TcContext, flow: &Flow, port: u16) -> bool {
    let lo = if flow.v6 {
        LOOPBACK6
    } else {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&LOOPBACK4);
        a
    };
    let (mut t, size) = tuple(flow, Some((&lo, port.to_be())));
    // SAFETY: as in assign_owned.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.skb.skb as *mut _, &mut t, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a full socket the lookup returned; read at its own width.
    let priority = unsafe { core::ptr::read_volatile(&(*sk).priority) };
    let ok = state(sk) == BPF_TCP_LISTEN as u32
        && priority == LISTENER_PRIORITY
        // SAFETY: a socket reference we hold.
        && unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) } == 0;
    // SAFETY: releases the reference the lookup returned.
    unsafe { bpf_sk_release(sk as *mut _) };
    ok
}
