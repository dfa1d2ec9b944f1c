//! Per-source tables the datapath searches without a hash-map call: the
//! verdict table and the reported-sources cache.
//!
//! Both are plain arrays indexed by [`source_hash`], so a lookup is an
//! inlined array access and a few compares (the kernel's hash maps cost a
//! call chain and a jhash per lookup, which is most of a guarded SYN's
//! budget).
//!
//! * Verdicts: buckets of [`VERDICT_WAYS`] slots, two per key. A key lives
//!   in its first bucket, or in its second only while its first is full
//!   (the agent moves it back when a slot frees up), so a search of a first
//!   bucket with a free slot ends there ([`verdict_lookup`]). When both are
//!   full the agent replaces the slot that expires first.
//!   [`verdict_buckets`] sizes the table at two slots per verdict.
//! * Reported sources: direct-mapped, one slot per hash; a collision only
//!   means an extra event, which the agent deduplicates.
//!
//! An all-zero key marks an empty slot (no source has it: IPv4 keys carry
//! the `::ffff` marker, and `::/64` is never a source).

use crate::{SourceKey, Verdict};

/// Slots per verdict bucket.
pub const VERDICT_WAYS: usize = 4;
/// Slots of the reported-sources cache (power of two).
pub const SEEN_SLOTS: u32 = 65_536;
const _: () = assert!(SEEN_SLOTS.is_power_of_two());

/// A source key as two words, the form the tables compare.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct KeyWords {
    pub lo: u64,
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<KeyWords>() == 16);

impl KeyWords {
    #[inline(always)]
    pub const fn of(key: &SourceKey) -> KeyWords {
        let a = &key.addr;
        KeyWords {
            lo: u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
            hi: u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
        }
    }

    /// The words of [`addr::key_v4`](crate::addr::key_v4).
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> KeyWords {
        KeyWords { lo: 0, hi: u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]) }
    }

    /// The words of [`addr::key_v6`](crate::addr::key_v6): the /64.
    #[inline(always)]
    pub const fn v6(a: &[u8; 16]) -> KeyWords {
        KeyWords { lo: u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]), hi: 0 }
    }

    pub const fn key(&self) -> SourceKey {
        let lo = self.lo.to_ne_bytes();
        let hi = self.hi.to_ne_bytes();
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 8 {
            addr[i] = lo[i];
            addr[i + 8] = hi[i];
            i += 1;
        }
        SourceKey { addr }
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.lo == 0 && self.hi == 0
    }

    /// A slot being rewritten: matches no source (IPv4 keys have `lo` 0,
    /// IPv6 keys `hi` 0) but keeps the bucket full.
    pub const TOMBSTONE: KeyWords = KeyWords { lo: u64::MAX, hi: u64::MAX };

    /// A real key: neither empty nor [`KeyWords::TOMBSTONE`].
    pub const fn is_key(&self) -> bool {
        let tombstone = self.lo == u64::MAX && self.hi == u64::MAX;
        !self.is_empty() && !tombstone
    }
}

/// The hash both sides index the tables with: the key folded to one word,
/// then two multiply-xorshift hashes of it side by side in one u64 (high
/// half: the first verdict bucket; low half: the second bucket and the
/// reported-sources slot). The two multiplies are independent, which keeps
/// the lookup's critical path short: it is on every guarded SYN's.
#[inline(always)]
pub const fn source_hash(k: &KeyWords) -> u64 {
    let mut x = k.lo ^ k.hi.rotate_left(29);
    x ^= x >> 32;
    let a = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = x.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    ((a ^ (a >> 32)) << 32) | ((b ^ (b >> 32)) & 0xffff_ffff)
}

/// The two buckets of a key, for a table of `mask + 1` buckets. They differ
/// whenever the table has more than one bucket.
#[inline(always)]
pub const fn verdict_bucket_pair(h: u64, mask: u32) -> (u32, u32) {
    let first = (h >> 32) as u32 & mask;
    let mut second = h as u32 & mask;
    if second == first {
        second ^= 1 & mask;
    }
    (first, second)
}

/// Buckets of a verdict table for `max_verdicts` (two slots per verdict,
/// a power of two).
pub const fn verdict_buckets(max_verdicts: u32) -> u32 {
    let slots = (max_verdicts as u64) * 2;
    let buckets = slots.div_ceil(VERDICT_WAYS as u64);
    let b = buckets.next_power_of_two();
    if b > u32::MAX as u64 / 2 {
        1 << 30
    } else if b < 2 {
        2
    } else {
        b as u32
    }
}

/// The reported-sources slot of a key.
#[inline(always)]
pub const fn seen_slot(h: u64) -> u32 {
    (h >> 16) as u32 & (SEEN_SLOTS - 1)
}

/// One verdict slot: the key and its verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictSlot {
    pub key: KeyWords,
    pub verdict: Verdict,
}
const _: () = assert!(core::mem::size_of::<VerdictSlot>() == 32);

/// A bucket of the verdict table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictBucket {
    pub slots: [VerdictSlot; VERDICT_WAYS],
}
const _: () = assert!(core::mem::size_of::<VerdictBucket>() == 32 * VERDICT_WAYS);

impl VerdictBucket {
    /// The verdict of `key` in this bucket: `Ok`, or `Err(full)` with
    /// whether every slot is taken.
    #[inline(always)]
    pub fn find(&self, key: &KeyWords) -> Result<Verdict, bool> {
        let mut full = true;
        let mut i = 0;
        while i < VERDICT_WAYS {
            let s = &self.slots[i];
            if s.key.lo == key.lo && s.key.hi == key.hi {
                return Ok(s.verdict);
            }
            full &= s.key.lo != 0 || s.key.hi != 0;
            i += 1;
        }
        Err(full)
    }

    pub fn position(&self, key: &KeyWords) -> Option<usize> {
        self.slots.iter().position(|s| s.key == *key)
    }

    pub fn occupied(&self) -> usize {
        self.slots.iter().filter(|s| !s.key.is_empty()).count()
    }
}

/// The verdict of `key` (hash `h`) in a table of `mask + 1` buckets, with
/// `bucket(i)` giving bucket `i`: its first bucket, and its second only if
/// the first is full. The datapath calls this with its map.
#[inline(always)]
pub fn verdict_lookup<'a, F: Fn(u32) -> Option<&'a VerdictBucket>>(
    bucket: F,
    key: &KeyWords,
    h: u64,
    mask: u32,
) -> Option<Verdict> {
    let (first, second) = verdict_bucket_pair(h, mask);
    match bucket(first)?.find(key) {
        Ok(v) => Some(v),
        Err(false) => None,
        Err(true) => bucket(second)?.find(key).ok(),
    }
}

/// A slot of the reported-sources cache: which source holds it, when it
/// was last reported (0: its report is still owed) and when its first SYN
/// claimed the slot (the start of its `first_syn = hold` window), both in
/// the datapath clock. A source takes a slot only when it is free or its
/// holder has been quiet for an `event_interval`; see [`seen_free`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SeenSlot {
    pub key: KeyWords,
    pub reported_ns: u64,
    /// 0 in slots written by gatekeeper before 0.1 round 2 (never held).
    pub first_ns: u64,
}

/// Whether another source may take `slot` at `now`: it is empty, or its
/// holder was neither first seen nor reported within `window_ns` (the
/// longer of the event interval and the hold window, see
/// [`seen_window`]). A slot whose holder is fresh is left alone, so a
/// flood of sources colliding with a real sender can never make its
/// retransmits look new (and be held again).
#[inline(always)]
pub const fn seen_free(slot: &SeenSlot, now: u64, window_ns: u64) -> bool {
    let last = if slot.first_ns > slot.reported_ns { slot.first_ns } else { slot.reported_ns };
    last == 0 || now.wrapping_sub(last) >= window_ns
}

/// How long a slot's holder keeps it: its report interval, and at least
/// its whole hold window (an event interval shorter than `hold_time` must
/// not let a colliding source restart a real sender's window).
#[inline(always)]
pub const fn seen_window(event_interval_ns: u64, hold_ms: u32) -> u64 {
    let hold = hold_ms as u64 * 1_000_000;
    if hold > event_interval_ns {
        hold
    } else {
        event_interval_ns
    }
}
const _: () = assert!(core::mem::size_of::<SeenSlot>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seen_slot_is_free_only_when_empty_or_quiet() {
        let interval = 30_000_000_000;
        let empty = SeenSlot::default();
        assert!(seen_free(&empty, 5, interval));
        let fresh = SeenSlot { key: KeyWords::v4([192, 0, 2, 1]), reported_ns: 0, first_ns: 1_000 };
        assert!(!seen_free(&fresh, 1_000 + interval - 1, interval), "a held, unreported source keeps its slot");
        assert!(seen_free(&fresh, 1_000 + interval, interval));
        let reported = SeenSlot { reported_ns: 90_000_000_000, ..fresh };
        assert!(!seen_free(&reported, 100_000_000_000, interval), "a recent report keeps it too");
        assert!(seen_free(&reported, 120_000_000_000, interval));
        assert_eq!(seen_window(1_000_000_000, 3_000), 3_000_000_000, "the hold window when it is longer");
        assert_eq!(seen_window(30_000_000_000, 3_000), 30_000_000_000);
    }
    use crate::addr::{key_v4, key_v6};
    use std::collections::HashSet;

    #[test]
    fn key_words_round_trip_and_are_never_empty_for_sources() {
        let k4 = key_v4([192, 0, 2, 1]);
        assert_eq!(KeyWords::of(&k4).key(), k4);
        assert!(!KeyWords::of(&k4).is_empty());
        assert!(!KeyWords::of(&key_v4([0, 0, 0, 0])).is_empty());
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[1] = 0x01;
        let k6 = key_v6(a);
        assert_eq!(KeyWords::of(&k6).key(), k6);
        assert!(KeyWords::of(&key_v6([0; 16])).is_empty());
        // The datapath's direct constructors agree with the byte keys.
        assert_eq!(KeyWords::v4([192, 0, 2, 1]), KeyWords::of(&k4));
        let mut b = a;
        b[9] = 0x77; // beyond the /64
        assert_eq!(KeyWords::v6(&b), KeyWords::of(&k6));
    }

    #[test]
    fn bucket_pairs_are_distinct_and_in_range() {
        for mask in [1u32, 3, 1023, (1 << 20) - 1] {
            for i in 0..10_000u32 {
                let k = KeyWords::of(&key_v4(i.to_be_bytes()));
                let (a, b) = verdict_bucket_pair(source_hash(&k), mask);
                assert!(a <= mask && b <= mask);
                assert_ne!(a, b, "mask {mask} key {i}");
            }
        }
    }

    #[test]
    fn hash_spreads_sequential_sources() {
        // 65,536 consecutive IPv4 sources and 65,536 consecutive /64s over
        // 16,384 buckets: a mean of 8, spread as a random hash would
        // (Poisson: ~5 empty buckets, the fullest around 20).
        let mask = (1u32 << 14) - 1;
        let mut load = vec![0u32; mask as usize + 1];
        for i in 0..65_536u32 {
            let k = KeyWords::of(&key_v4((0xc633_0000 | i).to_be_bytes()));
            let (first, _) = verdict_bucket_pair(source_hash(&k), mask);
            load[first as usize] += 1;
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&(0x2001_0db8_0000_0000u64 | u64::from(i)).to_be_bytes());
            let k = KeyWords::of(&key_v6(a));
            let (first, _) = verdict_bucket_pair(source_hash(&k), mask);
            load[first as usize] += 1;
        }
        let empty = load.iter().filter(|&&n| n == 0).count();
        assert!(empty < 30, "{empty} empty buckets");
        assert!(*load.iter().max().unwrap() < 24, "max bucket load {}", load.iter().max().unwrap());
        // The second choice spreads as well.
        let mut load2 = vec![0u32; mask as usize + 1];
        for i in 0..131_072u32 {
            let k = KeyWords::of(&key_v4((0xcb00_0000 | i).to_be_bytes()));
            load2[(source_hash(&k) as u32 & mask) as usize] += 1;
        }
        assert!(load2.iter().filter(|&&n| n == 0).count() < 30 && *load2.iter().max().unwrap() < 24);
        let seen: HashSet<u32> =
            (0..4096u32).map(|i| seen_slot(source_hash(&KeyWords::of(&key_v4(i.to_be_bytes()))))).collect();
        assert!(seen.len() > 3900, "seen slots used: {}", seen.len());
    }

    #[test]
    fn verdict_table_size() {
        assert_eq!(verdict_buckets(1024), 512);
        assert_eq!(verdict_buckets(1_000_000), 524_288);
        assert_eq!(verdict_buckets(1_048_576), 524_288);
        assert_eq!(verdict_buckets(1_048_577), 1_048_576);
        assert_eq!(verdict_buckets(1), 2);
        assert!(verdict_buckets(u32::MAX).is_power_of_two());
    }

    #[test]
    fn bucket_find() {
        let k = KeyWords::of(&key_v4([198, 51, 100, 1]));
        let mut b = VerdictBucket::default();
        assert_eq!(b.find(&k), Err(false));
        b.slots[2] = VerdictSlot { key: k, verdict: Verdict { expires_ns: 9, action: 1, reason: 2 } };
        assert_eq!(b.find(&k).unwrap().expires_ns, 9);
        let other = KeyWords::of(&key_v4([198, 51, 100, 2]));
        assert_eq!(b.find(&other), Err(false), "a free slot: not full");
        for s in [0, 1, 3] {
            b.slots[s].key = KeyWords::of(&key_v4([203, 0, 113, s as u8]));
        }
        assert_eq!(b.find(&other), Err(true), "every slot taken");
        assert_eq!(b.position(&k), Some(2));
        assert_eq!(b.occupied(), 4);
    }
}
