//! A small packet builder for tests and benchmarks (std only).
//!
//! A [`Packet`] is Ethernet, up to two VLAN tags, optionally a PPPoE session
//! header, IPv4 or IPv6 (with options or a chain of extension headers) and
//! TCP, UDP or raw payload. Lengths and
//! checksums (IPv4 header, TCP/UDP over the pseudo-header) are computed by
//! [`Packet::build`].
//!
//! ```
//! use gatekeeper_tests::packet::{Packet, tcp_flags};
//! let syn = Packet::tcp_v4([192, 0, 2, 1], [198, 51, 100, 1], 40000, 25, tcp_flags::SYN)
//!     .vlan(0x8100, 10)
//!     .build();
//! assert_eq!(syn.len(), 14 + 4 + 20 + 20);
//! ```
//!
//! Builder setters that do not apply to the packet's family or transport
//! (e.g. [`Packet::ipv4_options`] on an IPv6 packet) panic: that is a bug in
//! the test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherType values.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (the outer tag of QinQ).
    pub const QINQ: u16 = 0x88a8;
    /// PPPoE discovery stage.
    pub const PPPOE_DISCOVERY: u16 = 0x8863;
    /// PPPoE session stage.
    pub const PPPOE_SESSION: u16 = 0x8864;
}

/// PPP protocol numbers (the field after the PPPoE session header).
pub mod ppp {
    pub const IPV4: u16 = 0x0021;
    pub const IPV6: u16 = 0x0057;
    /// Link control protocol.
    pub const LCP: u16 = 0xc021;
    /// IPv4 control protocol.
    pub const IPCP: u16 = 0x8021;
}

/// A PPPoE session header (RFC 2516) and the PPP protocol field after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pppoe {
    pub session: u16,
    /// PPP protocol-field compression: the protocol in one octet.
    pub compressed: bool,
    /// The PPP protocol number; `None`: the one for the IP version.
    pub protocol: Option<u16>,
}

/// IP protocol / IPv6 next-header numbers.
pub mod ipproto {
    pub const HOPOPTS: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;

    /// Segments that are no connection attempt (no SYN, or a SYN with ACK
    /// or RST), by name: a gate passes them undecided.
    pub const NOT_SYN: [(u8, &str); 9] = [
        (SYN | ACK, "SYN+ACK"),
        (RST, "RST"),
        (SYN | RST, "SYN+RST"),
        (ACK, "ACK"),
        (ACK | PSH, "ACK+PSH"),
        (FIN | ACK, "FIN+ACK"),
        (RST | ACK, "RST+ACK"),
        (SYN | ACK | RST, "SYN+ACK+RST"),
        (0, "no flags"),
    ];

    /// SYNs with other bits (ECN setup, FIN, PSH, URG): still connection
    /// attempts.
    pub const SYN_WITH_BITS: [u8; 4] = [SYN | 0x40 | 0x80, SYN | FIN, SYN | PSH, SYN | URG];
}

/// VLAN tag stacks (TPID, VLAN id; outermost first) a gate must see
/// through, by name.
pub const VLAN_STACKS: [(&str, &[(u16, u16)]); 4] = [
    ("802.1Q", &[(ethertype::VLAN, 10)]),
    ("QinQ 802.1ad+802.1Q", &[(ethertype::QINQ, 100), (ethertype::VLAN, 10)]),
    ("double 802.1Q", &[(ethertype::VLAN, 100), (ethertype::VLAN, 10)]),
    ("802.1ad only", &[(ethertype::QINQ, 100)]),
];

/// The MSS option (kind 2, length 4) of a typical SYN.
pub fn mss_option(mss: u16) -> Vec<u8> {
    let m = mss.to_be_bytes();
    vec![2, 4, m[0], m[1]]
}

/// A SYN from `src`:40000 to `dst`:`dport` with the MSS option of a typical
/// connection attempt (1460, or 1440 over IPv6). Both addresses are text of
/// the same family.
pub fn syn_to(src: &str, dst: &str, dport: u16) -> Packet {
    match (src.parse::<IpAddr>().unwrap(), dst.parse::<IpAddr>().unwrap()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Packet::tcp_v4(s, d, 40000, dport, tcp_flags::SYN).tcp_options(&mss_option(1460))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Packet::tcp_v6(s, d, 40000, dport, tcp_flags::SYN).tcp_options(&mss_option(1440))
        }
        _ => panic!("mixed families {src} -> {dst}"),
    }
}

/// An IPv4 address from text (panics on bad text: a bug in the test).
pub fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// An IPv6 address from text (panics on bad text: a bug in the test).
pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// A frame as one hex string, for failure messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An IPv6 extension header. Lengths, padding and the next-header field are
/// filled in by the builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// Hop-by-hop options; the option bytes are padded (Pad1/PadN) to a
    /// multiple of 8 with the 2-byte header.
    HopByHop(Vec<u8>),
    /// Destination options, padded like [`ExtHeader::HopByHop`].
    DestOpts(Vec<u8>),
    /// Routing header: type, segments left and the type-specific data after
    /// the 4 fixed bytes (zero-padded to a multiple of 8).
    Routing { routing_type: u8, segments_left: u8, data: Vec<u8> },
    /// Fragment header: offset in 8-byte units (13 bits), the M flag and the
    /// identification.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication header: SPI, sequence number and ICV (zero-padded so
    /// the header is a multiple of 8 bytes).
    Ah { spi: u32, seq: u32, icv: Vec<u8> },
}

impl ExtHeader {
    /// An empty hop-by-hop header (8 bytes).
    pub fn hop_by_hop() -> Self {
        ExtHeader::HopByHop(Vec::new())
    }
    /// An empty destination-options header (8 bytes).
    pub fn dest_opts() -> Self {
        ExtHeader::DestOpts(Vec::new())
    }
    /// A segment routing header (type 4) listing `segments`.
    pub fn routing(segments: &[Ipv6Addr]) -> Self {
        let mut data = vec![segments.len().saturating_sub(1) as u8, 0, 0, 0];
        for s in segments {
            data.extend_from_slice(&s.octets());
        }
        ExtHeader::Routing { routing_type: 4, segments_left: segments.len() as u8, data }
    }
    /// A fragment header.
    pub fn fragment(offset: u16, more: bool) -> Self {
        ExtHeader::Fragment { offset, more, id: 0x1234_5678 }
    }
    /// An authentication header with a 12-byte ICV (HMAC-SHA1-96).
    pub fn ah() -> Self {
        ExtHeader::Ah { spi: 0x100, seq: 1, icv: vec![0xab; 12] }
    }

    fn proto(&self) -> u8 {
        match self {
            ExtHeader::HopByHop(_) => ipproto::HOPOPTS,
            ExtHeader::DestOpts(_) => ipproto::DSTOPTS,
            ExtHeader::Routing { .. } => ipproto::ROUTING,
            ExtHeader::Fragment { .. } => ipproto::FRAGMENT,
            ExtHeader::Ah { .. } => ipproto::AH,
        }
    }

    fn write(&self, next: u8, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            ExtHeader::HopByHop(opts) | ExtHeader::DestOpts(opts) => {
                out.extend_from_slice(&[next, 0]);
                out.extend_from_slice(opts);
                let pad = (8 - (2 + opts.len()) % 8) % 8;
                match pad {
                    0 => {}
                    1 => out.push(0), // Pad1
                    n => {
                        out.extend_from_slice(&[1, (n - 2) as u8]); // PadN
                        out.resize(out.len() + n - 2, 0);
                    }
                }
                out[start + 1] = ((out.len() - start) / 8 - 1) as u8;
            }
            ExtHeader::Routing { routing_type, segments_left, data } => {
                out.extend_from_slice(&[next, 0, *routing_type, *segments_left]);
                out.extend_from_slice(data);
                out.resize(start + (out.len() - start).div_ceil(8) * 8, 0);
                out[start + 1] = ((out.len() - start) / 8 - 1) as u8;
            }
            ExtHeader::Fragment { offset, more, id } => {
                let field = (offset << 3) | u16::from(*more);
                out.extend_from_slice(&[next, 0]);
                out.extend_from_slice(&field.to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            ExtHeader::Ah { spi, seq, icv } => {
                out.extend_from_slice(&[next, 0, 0, 0]);
                out.extend_from_slice(&spi.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(icv);
                out.resize(start + (out.len() - start).div_ceil(8) * 8, 0);
                // AH counts 4-byte units, minus 2.
                out[start + 1] = ((out.len() - start) / 4 - 2) as u8;
            }
        }
    }
}

/// Network layer of a [`Packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ip {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        /// Option bytes, zero-padded (EOL) to a multiple of 4; at most 40.
        options: Vec<u8>,
        /// Fragment offset in 8-byte units (13 bits).
        frag_offset: u16,
        more_fragments: bool,
        dont_fragment: bool,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        ext: Vec<ExtHeader>,
    },
}

/// Transport layer of a [`Packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        /// Option bytes, zero-padded (EOL) to a multiple of 4; at most 40.
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: Vec<u8>,
    },
    /// Any protocol number with opaque bytes after the IP headers.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

/// A packet description; [`Packet::build`] serializes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN tags, outermost first, as (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// A PPPoE session header after the tags.
    pub pppoe: Option<Pppoe>,
    pub ip: Ip,
    pub l4: L4,
}

impl Packet {
    fn new(ip: Ip, l4: L4) -> Self {
        Packet {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlans: Vec::new(),
            pppoe: None,
            ip,
            l4,
        }
    }

    fn v4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, l4: L4) -> Self {
        let ip = Ip::V4 {
            src: src.into(),
            dst: dst.into(),
            ttl: 64,
            options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            dont_fragment: true,
        };
        Self::new(ip, l4)
    }

    fn v6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, l4: L4) -> Self {
        let ip = Ip::V6 { src: src.into(), dst: dst.into(), hop_limit: 64, ext: Vec::new() };
        Self::new(ip, l4)
    }

    fn tcp(src_port: u16, dst_port: u16, flags: u8) -> L4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
            seq: 0x0100_0000,
            ack: if flags & tcp_flags::ACK != 0 { 0x0200_0000 } else { 0 },
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// IPv4 TCP segment with `flags` (see [`tcp_flags`]).
    pub fn tcp_v4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, sport: u16, dport: u16, flags: u8) -> Self {
        Self::v4(src, dst, Self::tcp(sport, dport, flags))
    }

    /// IPv6 TCP segment with `flags` (see [`tcp_flags`]).
    pub fn tcp_v6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, sport: u16, dport: u16, flags: u8) -> Self {
        Self::v6(src, dst, Self::tcp(sport, dport, flags))
    }

    /// IPv4 UDP datagram.
    pub fn udp_v4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, sport: u16, dport: u16) -> Self {
        Self::v4(src, dst, L4::Udp { src_port: sport, dst_port: dport, payload: Vec::new() })
    }

    /// IPv6 UDP datagram.
    pub fn udp_v6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, sport: u16, dport: u16) -> Self {
        Self::v6(src, dst, L4::Udp { src_port: sport, dst_port: dport, payload: Vec::new() })
    }

    /// Appends a VLAN tag inside the existing ones (call the outer one first).
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid & 0x0fff));
        self
    }

    /// Appends the VLAN tags `tags` (TPID, VLAN id), outermost first.
    pub fn vlans(self, tags: &[(u16, u16)]) -> Self {
        tags.iter().fold(self, |p, &(tpid, vid)| p.vlan(tpid, vid))
    }

    /// QinQ: an 802.1ad outer tag and an 802.1Q inner tag.
    pub fn qinq(self, outer: u16, inner: u16) -> Self {
        self.vlan(ethertype::QINQ, outer).vlan(ethertype::VLAN, inner)
    }

    /// Carries the packet in PPPoE session `session` (after any VLAN tags),
    /// with the two-octet PPP protocol number of its IP version.
    pub fn pppoe(mut self, session: u16) -> Self {
        self.pppoe = Some(Pppoe { session, compressed: false, protocol: None });
        self
    }

    /// As [`Packet::pppoe`] with PPP protocol-field compression (the
    /// protocol number in one octet).
    pub fn pppoe_compressed(mut self, session: u16) -> Self {
        self.pppoe = Some(Pppoe { session, compressed: true, protocol: None });
        self
    }

    /// Sets the PPP protocol number of the PPPoE session header (the IP
    /// packet after it is left as it is).
    pub fn ppp_protocol(mut self, protocol: u16) -> Self {
        let p = self.pppoe.as_mut().expect("ppp_protocol without pppoe");
        p.protocol = Some(protocol);
        self
    }

    /// IPv4 options (padded to a multiple of 4, so IHL = 5 + len/4).
    pub fn ipv4_options(mut self, bytes: &[u8]) -> Self {
        let Ip::V4 { options, .. } = &mut self.ip else { panic!("ipv4_options on an IPv6 packet") };
        assert!(bytes.len() <= 40, "IPv4 options are at most 40 bytes");
        *options = bytes.to_vec();
        self
    }

    /// IPv4 fragment offset (8-byte units) and MF flag; clears DF.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        let Ip::V4 { frag_offset, more_fragments, dont_fragment, .. } = &mut self.ip else {
            panic!("ipv4_fragment on an IPv6 packet")
        };
        assert!(offset < 0x2000, "fragment offset is 13 bits");
        (*frag_offset, *more_fragments, *dont_fragment) = (offset, more, false);
        self
    }

    /// Appends an IPv6 extension header after the ones already present.
    pub fn ext(mut self, header: ExtHeader) -> Self {
        let Ip::V6 { ext, .. } = &mut self.ip else { panic!("ext on an IPv4 packet") };
        ext.push(header);
        self
    }

    /// TCP options (padded to a multiple of 4, so data offset = 5 + len/4).
    pub fn tcp_options(mut self, bytes: &[u8]) -> Self {
        let L4::Tcp { options, .. } = &mut self.l4 else { panic!("tcp_options on a non-TCP packet") };
        assert!(bytes.len() <= 40, "TCP options are at most 40 bytes");
        *options = bytes.to_vec();
        self
    }

    /// Transport payload (TCP, UDP or raw).
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } | L4::Raw { payload, .. } => *payload = bytes.to_vec(),
        }
        self
    }

    /// Replaces the transport with raw bytes under protocol number `proto`.
    pub fn raw_l4(mut self, proto: u8, bytes: &[u8]) -> Self {
        self.l4 = L4::Raw { proto, payload: bytes.to_vec() };
        self
    }

    /// Offset of the IP header in the built frame.
    pub fn l3_offset(&self) -> usize {
        let ppp = self.pppoe.map_or(0, |p| if p.compressed { 7 } else { 8 });
        14 + 4 * self.vlans.len() + ppp
    }

    /// Serializes the frame.
    pub fn build(&self) -> Vec<u8> {
        let (proto, l4) = self.build_l4();
        let mut out = Vec::with_capacity(128 + l4.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        let ether = match self.ip {
            Ip::V4 { .. } => ethertype::IPV4,
            Ip::V6 { .. } => ethertype::IPV6,
        };
        for &(tpid, vid) in &self.vlans {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        // The PPPoE header's length is filled in once the IP packet is there.
        let pppoe_at = self.pppoe.map(|p| {
            out.extend_from_slice(&ethertype::PPPOE_SESSION.to_be_bytes());
            out.extend_from_slice(&[0x11, 0x00]); // version 1, type 1; code 0 (session data)
            out.extend_from_slice(&p.session.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            let at = out.len();
            let proto = p.protocol.unwrap_or(if ether == ethertype::IPV4 { ppp::IPV4 } else { ppp::IPV6 });
            if p.compressed {
                out.push(proto as u8);
            } else {
                out.extend_from_slice(&proto.to_be_bytes());
            }
            at
        });
        if pppoe_at.is_none() {
            out.extend_from_slice(&ether.to_be_bytes());
        }
        match &self.ip {
            Ip::V4 { src, dst, ttl, options, frag_offset, more_fragments, dont_fragment } => {
                let opt_len = options.len().div_ceil(4) * 4;
                let hdr_len = 20 + opt_len;
                let flags = (u16::from(*dont_fragment) << 14) | (u16::from(*more_fragments) << 13);
                let start = out.len();
                out.push(0x40 | (hdr_len / 4) as u8);
                out.push(0); // DSCP/ECN
                out.extend_from_slice(&((hdr_len + l4.len()) as u16).to_be_bytes());
                out.extend_from_slice(&0x4242u16.to_be_bytes()); // identification
                out.extend_from_slice(&(flags | frag_offset).to_be_bytes());
                out.extend_from_slice(&[*ttl, proto, 0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(options);
                out.resize(start + hdr_len, 0);
                let sum = checksum(&[&out[start..]]);
                out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
                out.extend_from_slice(&self.l4_with_checksum(l4, proto));
            }
            Ip::V6 { src, dst, hop_limit, ext } => {
                let mut exts = Vec::new();
                for (i, h) in ext.iter().enumerate() {
                    h.write(ext.get(i + 1).map_or(proto, ExtHeader::proto), &mut exts);
                }
                let first = ext.first().map_or(proto, ExtHeader::proto);
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
                out.extend_from_slice(&[first, *hop_limit]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&exts);
                out.extend_from_slice(&self.l4_with_checksum(l4, proto));
            }
        }
        if let Some(at) = pppoe_at {
            // The PPP payload: protocol field and IP packet.
            let len = (out.len() - at) as u16;
            out[at - 2..at].copy_from_slice(&len.to_be_bytes());
        }
        out
    }

    /// Transport bytes with a zero checksum, and their protocol number.
    fn build_l4(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp { src_port, dst_port, flags, seq, ack, window, options, payload } => {
                let hdr_len = 20 + options.len().div_ceil(4) * 4;
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&ack.to_be_bytes());
                out.extend_from_slice(&[((hdr_len / 4) as u8) << 4, *flags]);
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                out.extend_from_slice(options);
                out.resize(hdr_len, 0);
                out.extend_from_slice(payload);
                (ipproto::TCP, out)
            }
            L4::Udp { src_port, dst_port, payload } => {
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(payload);
                (ipproto::UDP, out)
            }
            L4::Raw { proto, payload } => (*proto, payload.clone()),
        }
    }

    /// Fills in the TCP/UDP checksum over the pseudo-header (for IPv6 the
    /// header's destination, even with a routing header).
    fn l4_with_checksum(&self, mut l4: Vec<u8>, proto: u8) -> Vec<u8> {
        let at = match self.l4 {
            L4::Tcp { .. } => 16,
            L4::Udp { .. } => 6,
            L4::Raw { .. } => return l4,
        };
        let len = l4.len() as u32;
        let pseudo: Vec<u8> = match &self.ip {
            Ip::V4 { src, dst, .. } => {
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&src.octets());
                p.extend_from_slice(&dst.octets());
                p.extend_from_slice(&[0, proto]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
                p
            }
            Ip::V6 { src, dst, .. } => {
                let mut p = Vec::with_capacity(40);
                p.extend_from_slice(&src.octets());
                p.extend_from_slice(&dst.octets());
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, proto]);
                p
            }
        };
        let mut sum = checksum(&[&pseudo, &l4]);
        if sum == 0 && proto == ipproto::UDP {
            sum = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`
/// (each part but the last must have even length).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            let word =
                if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_syn_layout_and_checksums() {
        let p = Packet::tcp_v4([192, 0, 2, 1], [198, 51, 100, 2], 40000, 25, tcp_flags::SYN)
            .ipv4_options(&[1, 1, 1, 1, 1])
            .tcp_options(&mss_option(1460))
            .build();
        assert_eq!(&p[12..14], &[0x08, 0x00]);
        assert_eq!(p[14], 0x47); // IHL 7 (5 option bytes padded to 8)
        assert_eq!(u16::from_be_bytes([p[16], p[17]]) as usize, p.len() - 14);
        assert_eq!(checksum(&[&p[14..42]]), 0, "IPv4 header checksum");
        let tcp = &p[42..];
        assert_eq!(tcp[12] >> 4, 6);
        assert_eq!(tcp[13], tcp_flags::SYN);
        let mut pseudo = vec![192, 0, 2, 1, 198, 51, 100, 2, 0, 6];
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, tcp]), 0, "TCP checksum");
    }

    #[test]
    fn vlan_tags_and_fragments() {
        let p = Packet::udp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2).qinq(100, 200).ipv4_fragment(3, true).build();
        assert_eq!(&p[12..22], &[0x88, 0xa8, 0, 100, 0x81, 0x00, 0, 200, 0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([p[28], p[29]]), (1 << 13) | 3);
    }

    #[test]
    fn pppoe_session_header() {
        let p = Packet::udp_v4([192, 0, 2, 1], [192, 0, 2, 2], 1, 2).vlan(ethertype::VLAN, 7).pppoe(0x1234);
        let f = p.build();
        assert_eq!(p.l3_offset(), 26);
        assert_eq!(&f[12..26], &[0x81, 0x00, 0, 7, 0x88, 0x64, 0x11, 0x00, 0x12, 0x34, 0, 30, 0x00, 0x21]);
        assert_eq!(f.len(), 26 + 28);
        assert_eq!(f[26], 0x45);
        let p = Packet::udp_v6(v6("2001:db8::1"), v6("2001:db8::2"), 1, 2).pppoe_compressed(1);
        let f = p.build();
        assert_eq!(p.l3_offset(), 21);
        assert_eq!(&f[12..21], &[0x88, 0x64, 0x11, 0x00, 0, 1, 0, 49, 0x57]);
        assert_eq!(f[21], 0x60);
        let f = Packet::udp_v4([192, 0, 2, 1], [192, 0, 2, 2], 1, 2).pppoe(1).ppp_protocol(ppp::LCP).build();
        assert_eq!(&f[20..22], &[0xc0, 0x21]);
    }

    #[test]
    fn ipv6_extension_chain() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let p = Packet::tcp_v6(src, dst, 1, 25, tcp_flags::SYN)
            .ext(ExtHeader::hop_by_hop())
            .ext(ExtHeader::routing(&[dst]))
            .ext(ExtHeader::fragment(0, true))
            .ext(ExtHeader::DestOpts(vec![0x1e, 3, 1, 2, 3]))
            .ext(ExtHeader::ah())
            .build();
        let mut off = 54;
        assert_eq!(p[20], ipproto::HOPOPTS);
        let mut next = p[20];
        let mut seen = Vec::new();
        while next != ipproto::TCP {
            seen.push(next);
            let len = match next {
                ipproto::FRAGMENT => 8,
                ipproto::AH => (p[off + 1] as usize + 2) * 4,
                _ => (p[off + 1] as usize + 1) * 8,
            };
            assert_eq!(len % 8, 0);
            next = p[off];
            off += len;
        }
        assert_eq!(seen, [ipproto::HOPOPTS, ipproto::ROUTING, ipproto::FRAGMENT, ipproto::DSTOPTS, ipproto::AH]);
        assert_eq!(u16::from_be_bytes([p[off + 2], p[off + 3]]), 25);
        assert_eq!(off + 20, p.len());
        assert_eq!(u16::from_be_bytes([p[18], p[19]]) as usize, p.len() - 54);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, ipproto::TCP]);
        assert_eq!(checksum(&[&pseudo, &p[off..]]), 0, "TCP checksum over the IPv6 pseudo-header");
    }
}
