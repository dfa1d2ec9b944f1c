//! The host reference model of the datapath's frame parser, shared by the
//! ingress and egress gate tests: an independent reading of the parsing
//! rules that says, for any frame, whether the gates see a TCP SYN they must
//! decide on, a frame their parser gives up on, or neither; and the random
//! frame mutations the datapath is checked against it on.
//!
//! It models the gates with every port guarded; what a gate then does with
//! a SYN (drop it, answer it) is the test's to say.

use gatekeeper_common::MAX_IPV6_EXT_HEADERS;

use crate::rng::Rng;

/// How [`mutate`] changes a frame.
pub struct Mutation {
    /// Bytes are changed within the first `span` bytes (mostly headers).
    pub span: usize,
    /// Values worth planting (protocol numbers, flags, lengths).
    pub planted: &'static [u8],
    /// One frame in this many is truncated, one in this many extended.
    pub resize_one_in: u64,
    /// An extension adds fewer than this many random bytes.
    pub extend_below: u64,
}

/// Flips one to three bytes of `frame` (random values, single bits, planted
/// values, increments); then sometimes truncates it (to 14 bytes or more)
/// or extends it with random bytes.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, m: &Mutation) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(frame.len().min(m.span) as u64) as usize;
        frame[at] = match rng.below(4) {
            0 => rng.next() as u8,
            1 => frame[at] ^ (1 << rng.below(8)),
            2 => m.planted[rng.below(m.planted.len() as u64) as usize],
            _ => frame[at].wrapping_add(1),
        };
    }
    match rng.below(m.resize_one_in) {
        0 => frame.truncate(14 + rng.below(frame.len() as u64 - 13) as usize),
        1 => {
            let n = rng.below(m.extend_below) as usize;
            frame.extend(rng.bytes(n));
        }
        _ => {}
    }
}

/// Which gate reads the frame: they share the parser, but the egress gate
/// also sees what a frame hides (first fragments, over-long IPv6 chains).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Gate {
    Ingress,
    Egress,
}

/// How the datapath's parser reads a frame.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Parse {
    /// Not a first-fragment TCP SYN: passed without a decision or a counter.
    NotSyn,
    /// The parser cannot read it: passed, counted as parse-skipped.
    Unreadable,
    /// A SYN (first fragment, any flags but ACK and RST) the gate decides
    /// on. `plain`: right after the Ethernet header or VLAN tags (no PPPoE),
    /// IPv4 without options or IPv6 without extension headers, and no
    /// payload (the IP header's length is exactly the TCP header's), so the
    /// egress gate can answer it with a RST.
    Syn { plain: bool },
    /// Egress only: the first fragment of a TCP segment (IPv4 MF set at
    /// offset 0, IPv6 a fragment header with M set at offset 0), whatever
    /// its flags, whether or not its TCP header (or, IPv6, the rest of its
    /// header chain) is all there. From a pool source: dropped, counted as
    /// pool-fragment.
    Fragment,
    /// Egress only: an IPv6 header chain that goes on past
    /// `MAX_IPV6_EXT_HEADERS` extension headers. From a pool source:
    /// dropped, counted as pool-ext-chain.
    LongChain,
}

/// Reads `f` (an Ethernet frame) the way `gate`'s parser must, with every
/// port guarded (so a first fragment to any port is one to a guarded port).
pub fn parse(f: &[u8], gate: Gate) -> Parse {
    let egress = gate == Gate::Egress;
    // Every read must lie in the frame and start below 4 KiB.
    let get = |off: usize, n: usize| if off <= 0xfff && off + n <= f.len() { Some(&f[off..off + n]) } else { None };
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let Some(b) = get(12, 2) else { return Parse::Unreadable };
    let mut et = be16(b);
    let mut off = 14;
    for _ in 0..2 {
        if et != 0x8100 && et != 0x88a8 {
            break;
        }
        let Some(b) = get(off + 2, 2) else { return Parse::Unreadable };
        et = be16(b);
        off += 4;
    }
    // PPPoE session: 6 header bytes, then the PPP protocol in two octets,
    // or one (protocol-field compression) when the first is odd. Neither
    // version, code nor length is checked.
    let mut pppoe = false;
    if et == 0x8864 {
        let Some(b) = get(off + 6, 2) else { return Parse::Unreadable };
        let (proto, len) = if b[0] % 2 == 1 { (u16::from(b[0]), 7) } else { (be16(b), 8) };
        et = match proto {
            0x21 => 0x0800,
            0x57 => 0x86dd,
            _ => return Parse::NotSyn,
        };
        off += len;
        pppoe = true;
    }
    let l3 = off;
    // (TCP offset, the length the IP header gives the TCP segment or None
    // when the segment is not plain)
    let (tcp, seg_len) = match et {
        0x0800 => {
            let Some(ip) = get(off, 20) else { return Parse::Unreadable };
            let ihl = (ip[0] & 0x0f) as usize * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Parse::Unreadable;
            }
            let frag = be16(&ip[6..8]);
            if frag & 0x1fff != 0 || ip[9] != 6 {
                return Parse::NotSyn;
            }
            if egress && frag & 0x2000 != 0 {
                return Parse::Fragment;
            }
            let total = be16(&ip[2..4]) as usize;
            (off + ihl, (ihl == 20).then(|| total.wrapping_sub(20)))
        }
        0x86dd => {
            let Some(ip) = get(off, 8) else { return Parse::Unreadable };
            if ip[0] >> 4 != 6 {
                return Parse::Unreadable;
            }
            let payload = be16(&ip[4..6]) as usize;
            let mut next = ip[6];
            if get(off + 8, 16).is_none() {
                return Parse::Unreadable;
            }
            off += 40;
            let mut walked = 0;
            // Egress: a fragment header with M set at offset 0 was walked.
            let mut first = false;
            // A header the walk cannot read: after a first fragment header,
            // what follows is hidden.
            let cut = |first: bool| if first { Parse::Fragment } else { Parse::Unreadable };
            let tcp = loop {
                match next {
                    6 => break off,
                    0 | 43 | 44 | 51 | 60 if walked == MAX_IPV6_EXT_HEADERS && egress => return Parse::LongChain,
                    _ if walked == MAX_IPV6_EXT_HEADERS => return Parse::Unreadable,
                    0 | 43 | 60 => {
                        let Some(h) = get(off, 2) else { return cut(first) };
                        next = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    44 => {
                        let Some(h) = get(off, 4) else { return cut(first) };
                        let field = be16(&h[2..4]);
                        if field & 0xfff8 != 0 {
                            return Parse::NotSyn;
                        }
                        first |= egress && field & 1 == 1;
                        next = h[0];
                        off += 8;
                    }
                    51 => return Parse::Unreadable,
                    _ => return Parse::NotSyn,
                }
                walked += 1;
            };
            if first {
                return Parse::Fragment;
            }
            (tcp, (tcp == l3 + 40).then_some(payload))
        }
        _ => return Parse::NotSyn,
    };
    let Some(h) = get(tcp, 14) else { return Parse::Unreadable };
    let doff = (h[12] >> 4) as usize * 4;
    if doff < 20 || tcp + doff > f.len() {
        return Parse::Unreadable;
    }
    if h[13] & 0x16 != 0x02 {
        return Parse::NotSyn;
    }
    Parse::Syn { plain: !pppoe && seg_len == Some(doff) }
}
