//! The IPv4 range table the datapath searches instead of an LPM trie: a
//! [`V4Slot`] per /16 plus a hash of the entries longer than /16. This keeps
//! a guarded SYN to one array lookup plus a hash probe per prefix length
//! that actually occurs inside its /16 (the kernel's LPM trie walks ~20
//! nodes at 100k entries).
//!
//! [`V4Table`] holds every IPv4 entry and says which slots and long entries
//! a change rewrites; [`V4Table::lookup`] is the datapath's algorithm, for
//! tests.
use std::collections::HashMap;

use gatekeeper_common::{v4_long_bit, RangeValue, V4LongKey, V4Slot, V4_SHORT_MAX};
use ipnet::Ipv4Net;

/// What a change asks of the kernel maps.
#[derive(Debug, Default, PartialEq)]
pub struct V4Writes {
    /// Slots to rewrite (first, count), with [`V4Table::slot`].
    pub slots: Option<(u32, u32)>,
    pub long_set: Option<(V4LongKey, RangeValue)>,
    pub long_del: Option<V4LongKey>,
}

#[derive(Default)]
pub struct V4Table {
    entries: HashMap<(u8, u32), RangeValue>,
    /// Per /16: how many long entries of each length (17..=32) it holds.
    long_counts: HashMap<u32, [u32; 16]>,
}

fn key(net: Ipv4Net) -> (u8, u32) {
    (net.prefix_len(), u32::from(net.network()))
}

/// The slots a net of length <= /16 spans.
fn span(net: Ipv4Net) -> (u32, u32) {
    let first = u32::from(net.network()) >> 16;
    (first, 1 << (V4_SHORT_MAX - net.prefix_len()))
}

impl V4Table {
    pub fn from_entries(entries: impl IntoIterator<Item = (Ipv4Net, RangeValue)>) -> V4Table {
        let mut t = V4Table::default();
        for (net, v) in entries {
            t.set(net, v);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, net: Ipv4Net) -> Option<RangeValue> {
        self.entries.get(&key(net)).copied()
    }

    /// Sets the entry for `net` and returns the map writes it needs.
    pub fn set(&mut self, net: Ipv4Net, value: RangeValue) -> V4Writes {
        let k = key(net);
        let old = self.entries.insert(k, value);
        if net.prefix_len() <= V4_SHORT_MAX {
            return V4Writes { slots: Some(span(net)), ..Default::default() };
        }
        let slot = k.1 >> 16;
        if old.is_none() {
            self.long_counts.entry(slot).or_default()[(net.prefix_len() - V4_SHORT_MAX - 1) as usize] += 1;
        }
        V4Writes {
            slots: old.is_none().then_some((slot, 1)),
            long_set: Some((V4LongKey::of(k.1, k.0 as u32), value)),
            long_del: None,
        }
    }

    /// Removes the entry for `net` (if any) and returns the map writes.
    pub fn del(&mut self, net: Ipv4Net) -> V4Writes {
        let k = key(net);
        if self.entries.remove(&k).is_none() {
            return V4Writes::default();
        }
        if net.prefix_len() <= V4_SHORT_MAX {
            return V4Writes { slots: Some(span(net)), ..Default::default() };
        }
        let slot = k.1 >> 16;
        if let Some(c) = self.long_counts.get_mut(&slot) {
            c[(net.prefix_len() - V4_SHORT_MAX - 1) as usize] -= 1;
            if c.iter().all(|&n| n == 0) {
                self.long_counts.remove(&slot);
            }
        }
        V4Writes { slots: Some((slot, 1)), long_set: None, long_del: Some(V4LongKey::of(k.1, k.0 as u32)) }
    }

    /// The slot for the /16 `slot` (0..65536).
    pub fn slot(&self, slot: u32) -> V4Slot {
        let mut out = V4Slot::default();
        if let Some(c) = self.long_counts.get(&slot) {
            for (i, n) in c.iter().enumerate() {
                if *n > 0 {
                    out.long_mask |= v4_long_bit(i as u32 + V4_SHORT_MAX as u32 + 1);
                }
            }
        }
        let base = slot << 16;
        for len in (0..=V4_SHORT_MAX).rev() {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            if let Some(v) = self.entries.get(&(len, base & mask)) {
                out.has_short = 1;
                out.short = *v;
                break;
            }
        }
        out
    }

    /// The datapath's lookup, over this table (for tests).
    pub fn lookup(&self, addr: u32) -> Option<RangeValue> {
        let slot = self.slot(addr >> 16);
        for len in (V4_SHORT_MAX as u32 + 1..=32).rev() {
            if slot.long_mask & v4_long_bit(len) != 0 {
                let k = V4LongKey::of(addr, len);
                if let Some(v) = self.entries.get(&(len as u8, u32::from_be_bytes(k.addr))) {
                    return Some(*v);
                }
            }
        }
        (slot.has_short != 0).then_some(slot.short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: u32) -> RangeValue {
        RangeValue { range_id: id, kind: 0, flags: 0, origin: 0 }
    }

    /// Longest-prefix match the slow, obvious way.
    fn naive(entries: &[(Ipv4Net, RangeValue)], addr: u32) -> Option<RangeValue> {
        entries
            .iter()
            .filter(|(n, _)| n.contains(&std::net::Ipv4Addr::from(addr)))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, v)| *v)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn lookup_matches_longest_prefix_on_random_tables() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20 {
            // Few /16s so that nesting and shared slots are common.
            let mut entries: Vec<(Ipv4Net, RangeValue)> = Vec::new();
            for i in 0..200 {
                let len = (rng.next() % 33) as u8;
                let addr = 0xc000_0000u32 | ((rng.next() as u32) & 0x0003_ffff) | ((round as u32) << 18);
                let net = Ipv4Net::new(addr.into(), len).unwrap().trunc();
                if entries.iter().all(|(n, _)| *n != net) {
                    entries.push((net, v(i)));
                }
            }
            let mut t = V4Table::from_entries(entries.iter().copied());
            // Remove a third again, to exercise deletes.
            let removed: Vec<_> = entries.iter().copied().step_by(3).collect();
            for (n, _) in &removed {
                t.del(*n);
            }
            entries.retain(|e| !removed.contains(e));
            for _ in 0..3000 {
                let probe = if rng.next().is_multiple_of(2) {
                    let (n, _) = entries[(rng.next() as usize) % entries.len()];
                    u32::from(n.network()) | ((rng.next() as u32) & !u32::from(n.netmask()))
                } else {
                    rng.next() as u32
                };
                assert_eq!(
                    t.lookup(probe),
                    naive(&entries, probe),
                    "round {round}, addr {}",
                    std::net::Ipv4Addr::from(probe)
                );
            }
        }
    }

    #[test]
    fn writes_name_the_slots_and_long_entries() {
        let mut t = V4Table::default();
        let short: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert_eq!(t.set(short, v(1)).slots, Some((0x0a00, 256)));
        let long: Ipv4Net = "10.1.2.0/24".parse().unwrap();
        let w = t.set(long, v(2));
        assert_eq!(w.slots, Some((0x0a01, 1)));
        assert_eq!(w.long_set, Some((V4LongKey { prefix_len: 24, addr: [10, 1, 2, 0] }, v(2))));
        assert_eq!(t.slot(0x0a01), V4Slot { long_mask: v4_long_bit(24), has_short: 1, short: v(1) });
        // Replacing a long entry's value needs no slot rewrite.
        assert_eq!(t.set(long, v(3)).slots, None);
        let w = t.del(long);
        assert_eq!(w.long_del, Some(V4LongKey { prefix_len: 24, addr: [10, 1, 2, 0] }));
        assert_eq!(t.slot(0x0a01).long_mask, 0);
        assert_eq!(t.del(long), V4Writes::default(), "deleting twice is a no-op");
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert_eq!(t.set(all, v(9)).slots, Some((0, 65536)));
        assert_eq!(t.lookup(0x0a010203), Some(v(1)));
        assert_eq!(t.lookup(0xc0000201), Some(v(9)));
    }
}
