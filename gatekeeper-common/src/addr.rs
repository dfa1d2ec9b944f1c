//! Address helpers both sides use: the verdict-map key derivation (IPv4 as
//! a mapped /32, IPv6 as its /64 or as the address) and the guarded-port
//! bitmap layout.
use crate::SourceKey;

/// Verdict key of an IPv4 source (network-order octets).
#[inline(always)]
pub const fn key_v4(octets: [u8; 4]) -> SourceKey {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12] = octets[0];
    addr[13] = octets[1];
    addr[14] = octets[2];
    addr[15] = octets[3];
    SourceKey { addr }
}

/// Verdict key of an IPv6 source: its /64.
#[inline(always)]
pub const fn key_v6(octets: [u8; 16]) -> SourceKey {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        addr[i] = octets[i];
        i += 1;
    }
    SourceKey { addr }
}

/// Address key of an IPv6 source (a /128), for the drop verdict of its own
/// failed lookup; `None` when its interface id cannot key one (see
/// [`host_iid`](crate::sourcetab::host_iid)).
#[inline(always)]
pub const fn key_v6_host(octets: [u8; 16]) -> Option<SourceKey> {
    let iid = u64::from_ne_bytes([
        octets[8], octets[9], octets[10], octets[11], octets[12], octets[13], octets[14], octets[15],
    ]);
    if crate::sourcetab::host_iid(iid) {
        Some(SourceKey { addr: octets })
    } else {
        None
    }
}

/// `::ffff:0:0/96` mapped address of an IPv4 source, as in events.
#[inline(always)]
pub const fn mapped_v4(octets: [u8; 4]) -> [u8; 16] {
    key_v4(octets).addr
}

/// Word index and bit mask of `port` in the guarded-port bitmap.
#[inline(always)]
pub const fn port_slot(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

#[cfg(any(test, feature = "user"))]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv6Addr};

    impl SourceKey {
        /// The key for a source address (IPv4 /32, IPv6 /64): bans and
        /// pass verdicts.
        pub fn from_ip(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => key_v4(v4.octets()),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => key_v4(v4.octets()),
                    None => key_v6(v6.octets()),
                },
            }
        }

        /// The narrowest key of a source address: an IPv6 address's own
        /// key (the drop verdict of its failed lookup) where it can have
        /// one, else [`SourceKey::from_ip`].
        pub fn host(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                    key_v6_host(v6.octets()).unwrap_or_else(|| key_v6(v6.octets()))
                }
                _ => SourceKey::from_ip(ip),
            }
        }

        /// An IPv6 address key (a /128), not an IPv4 or /64 key.
        pub fn is_host_v6(&self) -> bool {
            crate::KeyWords::of(self).is_host_v6()
        }

        /// The IPv6 /64 of an address key; other keys unchanged.
        pub fn net(&self) -> SourceKey {
            crate::KeyWords::of(self).bucket_key().key()
        }

        /// The address (or network's first address) the key stands for.
        pub fn to_ip(&self) -> IpAddr {
            let v6 = Ipv6Addr::from(self.addr);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }

        /// Operator-facing form: `192.0.2.1`, `2001:db8:1:2::/64` or, for
        /// an address key, `2001:db8:1:2::25`.
        pub fn display(&self) -> String {
            match self.to_ip() {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) if self.is_host_v6() => v6.to_string(),
                IpAddr::V6(v6) => format!("{v6}/64"),
            }
        }

        /// Inverse of [`SourceKey::display`]; `None` unless `text` is
        /// exactly what `display` gives for some key.
        pub fn parse_display(text: &str) -> Option<SourceKey> {
            let key = match text.strip_suffix("/64") {
                Some(v6) => key_v6(v6.parse::<Ipv6Addr>().ok()?.octets()),
                None => match text.parse::<IpAddr>().ok()? {
                    IpAddr::V4(v4) => key_v4(v4.octets()),
                    IpAddr::V6(v6) => key_v6_host(v6.octets())?,
                },
            };
            (key.display() == text).then_some(key)
        }
    }

    /// The source address of an event.
    pub fn event_ip(addr: [u8; 16], family: u16) -> IpAddr {
        let v6 = Ipv6Addr::from(addr);
        match (family, v6.to_ipv4_mapped()) {
            (crate::family::V4, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    }
}
#[cfg(any(test, feature = "user"))]
pub use user::event_ip;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn v4_keys_are_mapped_slash32() {
        let k = SourceKey::from_ip("192.0.2.7".parse().unwrap());
        assert_eq!(k.display(), "192.0.2.7");
        assert_eq!(k, SourceKey::from_ip("::ffff:192.0.2.7".parse().unwrap()));
        assert_ne!(k, SourceKey::from_ip("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn v6_keys_are_slash64() {
        let a = SourceKey::from_ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = SourceKey::from_ip("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = SourceKey::from_ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.display(), "2001:db8:1:2::/64");
        // A v6 key never collides with a v4 key.
        assert_ne!(SourceKey::from_ip("::".parse().unwrap()), SourceKey::from_ip("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn v6_address_keys_are_the_address() {
        let a = SourceKey::host("2001:db8:1:2::25".parse().unwrap());
        let b = SourceKey::host("2001:db8:1:2::26".parse().unwrap());
        assert_ne!(a, b);
        assert!(a.is_host_v6());
        assert_eq!(a.display(), "2001:db8:1:2::25");
        assert_eq!(a.net(), SourceKey::from_ip("2001:db8:1:2::26".parse().unwrap()));
        // No address key for interface ids 0 and all-ones, nor for IPv4.
        let z = SourceKey::host("2001:db8:1:2::".parse().unwrap());
        assert_eq!(z.display(), "2001:db8:1:2::/64");
        let f = SourceKey::host("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap());
        assert!(!f.is_host_v6());
        let v4 = SourceKey::host("192.0.2.9".parse().unwrap());
        assert_eq!(v4, SourceKey::from_ip("192.0.2.9".parse().unwrap()));
        for k in [a, z, v4] {
            assert_eq!(SourceKey::parse_display(&k.display()), Some(k));
        }
        for bad in ["2001:db8:1:2::", "2001:db8:1:2::1/64", "2001:db8::/48", "192.0.2.1/32", "::ffff:192.0.2.1", "x"] {
            assert_eq!(SourceKey::parse_display(bad), None, "{bad}");
        }
    }

    #[test]
    fn event_ip_round_trips() {
        let ip: IpAddr = "198.51.100.4".parse().unwrap();
        assert_eq!(event_ip(mapped_v4([198, 51, 100, 4]), crate::family::V4), ip);
        let ip6: IpAddr = "2001:db8::4".parse().unwrap();
        let IpAddr::V6(v6) = ip6 else { unreachable!() };
        assert_eq!(event_ip(v6.octets(), crate::family::V6), ip6);
    }

    #[test]
    fn port_bitmap_layout() {
        assert_eq!(port_slot(0), (0, 1));
        assert_eq!(port_slot(25), (0, 1 << 25));
        assert_eq!(port_slot(64), (1, 1));
        assert_eq!(port_slot(65535), (1023, 1 << 63));
        assert!(port_slot(65535).0 < crate::PORT_WORDS);
    }
}
