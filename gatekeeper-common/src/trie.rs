//! The range tables' layout: a multibit trie of 256-entry nodes in one
//! array map per table, searched by the datapath with inlined array lookups
//! only (the kernel's LPM trie and hash maps cost a call chain per lookup,
//! which alone is more than a guarded SYN's budget).
//!
//! * Nodes `0..256` are the IPv4 root, `256..512` the IPv6 root: node
//!   `root_node(v6, a[0])`, entry `a[1]` covers the address's /16.
//! * Every further node covers the next 8 bits: an entry for byte `i` of
//!   the address either points at a child node ([`CHILD`] | index) or holds
//!   the longest matching range for everything under it (leaf pushing: a
//!   node's entries already include what its ancestors cover).
//! * A leaf packs what the datapath needs of a [`RangeValue`]: range id + 1,
//!   kind and flags. 0 is "no range".
//!
//! So an IPv4 lookup reads at most 3 entries, an IPv6 one at most 15 (9 for
//! ranges up to /64). The agent builds and updates the nodes
//! (`gatekeeper::trie`); [`lookup`] is the one search both sides use.

use crate::RangeValue;

/// Entries per node.
pub const FANOUT: usize = 256;
/// Fixed root nodes (IPv4 then IPv6).
pub const ROOT_NODES: u32 = 512;
/// An entry pointing at a child node (the low bits are its index).
pub const CHILD: u32 = 1 << 31;
pub const INDEX_MASK: u32 = CHILD - 1;
const ID_MASK: u32 = (1 << 24) - 1;
const KIND_SHIFT: u32 = 24;
const FLAGS_SHIFT: u32 = 28;

/// One node: 256 entries, 1 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrieNode {
    pub e: [u32; FANOUT],
}
const _: () = assert!(core::mem::size_of::<TrieNode>() == 1024);

impl Default for TrieNode {
    fn default() -> Self {
        TrieNode { e: [0; FANOUT] }
    }
}

/// The root node holding `first_byte`'s entries.
#[inline(always)]
pub const fn root_node(v6: bool, first_byte: u8) -> u32 {
    (if v6 { 256 } else { 0 }) + first_byte as u32
}

/// The leaf of a range value. Range ids must be below 2^24 - 1, kinds
/// below 16, flags below 8.
pub const fn leaf(v: &RangeValue) -> u32 {
    ((v.range_id + 1) & ID_MASK) | ((v.kind as u32 & 0xf) << KIND_SHIFT) | ((v.flags as u32 & 0x7) << FLAGS_SHIFT)
}

/// The range value of a leaf entry (`origin` is not kept: 0).
#[inline(always)]
pub const fn leaf_value(e: u32) -> Option<RangeValue> {
    if e == 0 || e & CHILD != 0 {
        return None;
    }
    Some(RangeValue {
        range_id: (e & ID_MASK).wrapping_sub(1),
        kind: ((e >> KIND_SHIFT) & 0xf) as u8,
        flags: ((e >> FLAGS_SHIFT) & 0x7) as u8,
        origin: 0,
    })
}

/// Longest-prefix match of address `a` (4 or 16 bytes, network order),
/// with `node(i)` giving node `i`. The datapath calls this with its map.
#[inline(always)]
pub fn lookup<'a, const N: usize, F: Fn(u32) -> Option<&'a TrieNode>>(node: F, a: &[u8; N]) -> Option<RangeValue> {
    let root = node(root_node(N == 16, a[0]))?;
    let mut e = root.e[a[1] as usize];
    let mut i = 2;
    while i < N {
        if e & CHILD == 0 {
            break;
        }
        e = node(e & INDEX_MASK)?.e[a[i] as usize];
        i += 1;
    }
    leaf_value(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_round_trip() {
        let v = RangeValue { range_id: 262_143, kind: 5, flags: 1, origin: 0 };
        assert_eq!(leaf_value(leaf(&v)), Some(v));
        let z = RangeValue::default();
        assert_ne!(leaf(&z), 0, "range id 0 is a leaf");
        assert_eq!(leaf_value(leaf(&z)), Some(z));
        assert_eq!(leaf(&v) & CHILD, 0);
        assert_eq!(leaf_value(0), None);
        assert_eq!(leaf_value(CHILD | 7), None);
    }

    #[test]
    fn lookup_follows_children_and_stops_at_leaves() {
        let mut nodes = vec![TrieNode::default(); ROOT_NODES as usize + 2];
        let deny = RangeValue { range_id: 1, kind: 1, flags: 0, origin: 0 };
        let allow = RangeValue { range_id: 2, kind: 2, flags: 0, origin: 0 };
        // 198.51.0.0/16 -> node 512; 198.51.100.0/24 -> node 513 with
        // 198.51.100.7/32 allowed and the rest of the /24 denied.
        nodes[root_node(false, 198) as usize].e[51] = CHILD | 512;
        nodes[512].e[100] = CHILD | 513;
        nodes[513].e = [leaf(&deny); FANOUT];
        nodes[513].e[7] = leaf(&allow);
        let get = |i: u32| nodes.get(i as usize);
        assert_eq!(lookup(get, &[198, 51, 100, 7]), Some(allow));
        assert_eq!(lookup(get, &[198, 51, 100, 8]), Some(deny));
        assert_eq!(lookup(get, &[198, 51, 101, 8]), None);
        assert_eq!(lookup(get, &[198, 52, 100, 7]), None);
        // A dangling child index is no match, never a panic.
        nodes[512].e[9] = CHILD | 9999;
        let get = |i: u32| nodes.get(i as usize);
        assert_eq!(lookup(get, &[198, 51, 9, 1]), None);
        // IPv6 roots are separate.
        let mut a6 = [0u8; 16];
        a6[0] = 198;
        a6[1] = 51;
        assert_eq!(lookup(get, &a6), None);
    }
}
