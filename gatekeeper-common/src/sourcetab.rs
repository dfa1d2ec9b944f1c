//! Per-source tables the datapath searches without a hash-map call: the
//! verdict table and the reported-sources cache.
//!
//! Both are plain arrays indexed by [`source_slots`], so a lookup is an
//! inlined array access and a few compares (the kernel's hash maps cost a
//! call chain and a jhash per lookup, which is most of a guarded SYN's
//! budget).
//!
//! * Verdicts: buckets of [`VERDICT_WAYS`] slots, two per key. A key lives
//!   in its first bucket, or in its second only while its first is full
//!   (the agent moves it back when a slot frees up), so a search of a first
//!   bucket with a free slot ends there ([`verdict_lookup`]). When both are
//!   full the agent replaces a drop verdict, the one that expires first
//!   (bans and pass verdicts are never replaced).
//!   [`verdict_buckets`] sizes the table at two slots per verdict.
//!   An IPv6 source has two keys, its /64 (bans, pass verdicts, a /64
//!   several of whose addresses failed) and its address (a failed lookup's
//!   drop verdict, which must not reach the rest of the /64); both hash as
//!   the /64, so one read of the pair serves both ([`verdict_lookup_v6`]).
//! * Reported sources: direct-mapped, one slot per hash; a collision only
//!   means an extra event, which the agent deduplicates.
//!
//! An all-zero key marks an empty slot (no source has it: IPv4 keys carry
//! the `::ffff` marker, and `::/64` is never a source).

use crate::{SourceKey, Verdict};

/// Slots per verdict bucket.
pub const VERDICT_WAYS: usize = 4;
/// log2 of the reported-sources cache's slots.
pub const SEEN_BITS: u32 = 16;
/// Slots of the reported-sources cache.
pub const SEEN_SLOTS: u32 = 1 << SEEN_BITS;

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

    /// The words of [`addr::key_v6_host`](crate::addr::key_v6_host): the
    /// address itself, or its /64 when its interface id cannot be a host
    /// key (see [`host_iid`]).
    #[inline(always)]
    pub const fn v6_host(a: &[u8; 16]) -> KeyWords {
        let lo = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let iid = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        KeyWords { lo, hi: if host_iid(iid) { iid } else { 0 } }
    }

    /// The key the tables hash: an IPv6 address key (a /128) hashes as its
    /// /64, so both of a source's keys share one bucket pair and one read
    /// of it finds either.
    #[inline(always)]
    pub const fn bucket_key(&self) -> KeyWords {
        if self.lo != 0 {
            KeyWords { lo: self.lo, hi: 0 }
        } else {
            *self
        }
    }

    /// An IPv6 address key (a /128), not an IPv4 or /64 key.
    pub const fn is_host_v6(&self) -> bool {
        self.lo != 0 && self.hi != 0
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
    /// IPv6 keys never an all-ones prefix or, see [`host_iid`], interface
    /// id) but keeps the bucket full.
    pub const TOMBSTONE: KeyWords = KeyWords { lo: u64::MAX, hi: u64::MAX };

    /// A real key: neither empty nor [`KeyWords::TOMBSTONE`].
    pub const fn is_key(&self) -> bool {
        let tombstone = self.lo == u64::MAX && self.hi == u64::MAX;
        !self.is_empty() && !tombstone
    }
}

/// Whether an IPv6 interface id may key a per-address verdict. Not 0: that
/// key is the /64's. Not all ones: while the agent rewrites a slot, a
/// reader may see half a key next to half of [`KeyWords::TOMBSTONE`]
/// (prefix, all ones), which must match no source. A source with either
/// id is judged by its /64's verdict only (and a drop verdict of its own
/// lookup is never written: see the agent's `Judge`).
#[inline(always)]
pub const fn host_iid(iid: u64) -> bool {
    iid != 0 && iid != u64::MAX
}

/// The secret of the tables' hash: two odd multipliers, random for each
/// new set of pinned maps and kept in the pinned [`Config`](crate::Config)
/// for as long as the maps live, so that nobody outside can pick sources
/// that share a bucket pair (and fill it to evict a chosen verdict).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HashKey {
    pub m1: u64,
    pub m2: u64,
}
const _: () = assert!(core::mem::size_of::<HashKey>() == 16);

impl HashKey {
    /// The key from 128 random bits.
    pub const fn from_random(r: [u64; 2]) -> HashKey {
        HashKey { m1: r[0] | 1, m2: r[1] | 1 }
    }

    /// Whether the key was set (multipliers are odd; a fresh config is 0).
    pub const fn is_set(&self) -> bool {
        self.m1 & 1 == 1 && self.m2 & 1 == 1
    }
}

/// Where a source's key lives: its two verdict buckets and its
/// reported-sources slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub first: u32,
    pub second: u32,
    pub seen: u32,
}

/// The shift that takes a product's top bits as a bucket index, for a
/// table of `buckets` buckets (a power of two, at least 2).
pub const fn verdict_shift(buckets: u32) -> u32 {
    64 - buckets.trailing_zeros()
}

/// The hash both sides index the tables with: the [`KeyWords::bucket_key`]
/// folded to one word (without loss within a family), then multiply-shift
/// with each secret multiplier, whose top bits pick a bucket (first,
/// second) and the reported-sources slot. For a random odd multiplier two
/// distinct words share a first bucket with probability at most 2/buckets
/// (Dietzfelbinger et al.), whatever the words: colliding sources cannot
/// be chosen without the key. The two multiplies are independent, which
/// keeps the lookup's critical path short: it is on every guarded SYN's.
/// `shift` is [`verdict_shift`] of the table.
#[inline(always)]
pub const fn source_slots(k: &KeyWords, hk: &HashKey, shift: u32) -> Slots {
    let x = k.lo ^ k.hi.rotate_left(29);
    let a = x.wrapping_mul(hk.m1);
    let b = x.wrapping_mul(hk.m2);
    let first = (a >> shift) as u32;
    let mut second = (b >> shift) as u32;
    if second == first {
        second ^= 1;
    }
    Slots { first, second, seen: (b >> (64 - SEEN_BITS)) as u32 }
}

/// The reported-sources slot of `k` itself: for an IPv6 address key its
/// own (its report interval and hold window are its own, not its /64's),
/// for any other key the [`source_slots`] one.
#[inline(always)]
pub const fn seen_slot(k: &KeyWords, hk: &HashKey) -> u32 {
    let x = k.lo ^ k.hi.rotate_left(29);
    (x.wrapping_mul(hk.m2) >> (64 - SEEN_BITS)) as u32
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
    /// whether every slot is taken. A slot the agent rewrites under the
    /// read (its key changed between the key's read and its re-read after
    /// the verdict's) counts as not found, so a read never pairs one
    /// source's key with another's verdict (see [`Self::verdict_if`]).
    #[inline(always)]
    pub fn find(&self, key: &KeyWords) -> Result<Verdict, bool> {
        let mut full = true;
        let mut hit = VERDICT_WAYS;
        let mut i = 0;
        while i < VERDICT_WAYS {
            let s = &self.slots[i];
            if s.key.lo == key.lo && s.key.hi == key.hi {
                hit = i;
                break;
            }
            full &= s.key.lo != 0 || s.key.hi != 0;
            i += 1;
        }
        // One verdict read after the search (not one per slot): the
        // program stays short.
        match self.slots.get(hit) {
            Some(s) => match Self::verdict_if(s, key) {
                Some(v) => Ok(v),
                None => Err(false),
            },
            None => Err(full),
        }
    }

    /// The verdict of slot `s`, whose key was just read as `key`, if the
    /// key is still `key` after the verdict was read. The agent changes a
    /// slot's key in three writes (key to [`KeyWords::TOMBSTONE`] keeping
    /// the old verdict, then the new verdict, then the new key: see the
    /// agent's `verdict_table`); read in order (x86-64 keeps loads in
    /// order), a verdict read between the two key reads belongs to the key
    /// read twice: a new verdict is written only after the tombstone, and
    /// the new key only after the new verdict.
    #[inline(always)]
    fn verdict_if(s: &VerdictSlot, key: &KeyWords) -> Option<Verdict> {
        // SAFETY: plain reads of a slot we hold a reference to; volatile
        // so that the key is read again after the verdict.
        let v = unsafe { core::ptr::read_volatile(&s.verdict) };
        let again = unsafe { core::ptr::read_volatile(&s.key) };
        if again.lo == key.lo && again.hi == key.hi {
            Some(v)
        } else {
            None
        }
    }

    /// [`VerdictBucket::find`] for an IPv6 source's two keys at once, its
    /// address key `host` and its /64 (`host.lo`, 0): (address's verdict,
    /// /64's verdict, every slot taken), `Verdict::default()` for a key not
    /// there. When `host` is the /64 (no address key) only the first is
    /// found.
    #[inline(always)]
    pub fn find_v6(&self, host: &KeyWords) -> (Verdict, Verdict, bool) {
        let (mut ia, mut ib) = (VERDICT_WAYS, VERDICT_WAYS);
        let mut full = true;
        let mut i = 0;
        while i < VERDICT_WAYS {
            let (lo, hi) = (self.slots[i].key.lo, self.slots[i].key.hi);
            if lo == host.lo {
                if hi == host.hi {
                    ia = i;
                } else if hi == 0 {
                    ib = i;
                }
            }
            full &= (lo | hi) != 0;
            i += 1;
        }
        let net = KeyWords { lo: host.lo, hi: 0 };
        let of = |i: usize, k: &KeyWords| match self.slots.get(i) {
            Some(s) => Self::verdict_if(s, k).unwrap_or_default(),
            None => Verdict::default(),
        };
        (of(ia, host), of(ib, &net), full)
    }

    pub fn position(&self, key: &KeyWords) -> Option<usize> {
        self.slots.iter().position(|s| s.key == *key)
    }

    pub fn occupied(&self) -> usize {
        self.slots.iter().filter(|s| !s.key.is_empty()).count()
    }
}

/// The verdict of `key` in a table whose bucket `i` is `bucket(i)`: its
/// first bucket, and its second only if the first is full. The datapath
/// calls this with its map for IPv4 sources.
#[inline(always)]
pub fn verdict_lookup<'a, F: Fn(u32) -> Option<&'a VerdictBucket>>(
    bucket: F,
    key: &KeyWords,
    at: &Slots,
) -> Option<Verdict> {
    match bucket(at.first)?.find(key) {
        Ok(v) => Some(v),
        Err(false) => None,
        Err(true) => bucket(at.second)?.find(key).ok(),
    }
}

/// The verdicts of an IPv6 source's two keys, its address (`host`, see
/// [`KeyWords::v6_host`]) and its /64, which share a bucket pair:
/// (address's, /64's), a missing one as `Verdict::default()` (expired long
/// ago, which is what the datapath makes of a missing verdict anyway). One
/// pass over the first bucket, the second only when the first is full and
/// a key is still missing. (Plain values, not `Option`s: the verifier
/// refuses what the compiler makes of merging two optional 16-byte values.)
#[inline(always)]
pub fn verdict_lookup_v6<'a, F: Fn(u32) -> Option<&'a VerdictBucket>>(
    bucket: F,
    host: &KeyWords,
    at: &Slots,
) -> (Verdict, Verdict) {
    let Some(b) = bucket(at.first) else { return (Verdict::default(), Verdict::default()) };
    let (mut h, mut n, full) = b.find_v6(host);
    if full && (h.expires_ns == 0 || n.expires_ns == 0) {
        if let Some(b) = bucket(at.second) {
            let (h2, n2, _) = b.find_v6(host);
            if h.expires_ns == 0 {
                h = h2;
            }
            if n.expires_ns == 0 {
                n = n2;
            }
        }
    }
    (h, n)
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

    /// A fixed key for tests (any odd multipliers).
    const HK: HashKey = HashKey { m1: 0x9e37_79b9_7f4a_7c15, m2: 0xc2b2_ae3d_27d4_eb4f };

    #[test]
    fn bucket_pairs_are_distinct_and_in_range() {
        for buckets in [2u32, 4, 1024, 1 << 20] {
            let shift = verdict_shift(buckets);
            for i in 0..10_000u32 {
                let k = KeyWords::of(&key_v4(i.to_be_bytes()));
                let at = source_slots(&k, &HK, shift);
                assert!(at.first < buckets && at.second < buckets && at.seen < SEEN_SLOTS);
                assert_ne!(at.first, at.second, "{buckets} buckets, key {i}");
            }
        }
    }

    #[test]
    fn hash_spreads_sequential_sources() {
        // 65,536 consecutive IPv4 sources and 65,536 consecutive /64s over
        // 16,384 buckets: a mean of 8, spread as a random hash would
        // (Poisson: ~5 empty buckets, the fullest around 20).
        let shift = verdict_shift(1 << 14);
        let mut load = vec![0u32; 1 << 14];
        let mut load2 = vec![0u32; 1 << 14];
        for i in 0..65_536u32 {
            let k = KeyWords::of(&key_v4((0xc633_0000 | i).to_be_bytes()));
            let at = source_slots(&k, &HK, shift);
            load[at.first as usize] += 1;
            load2[at.second as usize] += 1;
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&(0x2001_0db8_0000_0000u64 | u64::from(i)).to_be_bytes());
            let at = source_slots(&KeyWords::of(&key_v6(a)), &HK, shift);
            load[at.first as usize] += 1;
            load2[at.second as usize] += 1;
        }
        for l in [&load, &load2] {
            let empty = l.iter().filter(|&&n| n == 0).count();
            assert!(empty < 30, "{empty} empty buckets");
            assert!(*l.iter().max().unwrap() < 24, "max bucket load {}", l.iter().max().unwrap());
        }
        let seen: HashSet<u32> =
            (0..4096u32).map(|i| source_slots(&KeyWords::of(&key_v4(i.to_be_bytes())), &HK, shift).seen).collect();
        assert!(seen.len() > 3900, "seen slots used: {}", seen.len());
    }

    #[test]
    fn the_pair_depends_on_the_secret() {
        // Sources that share a bucket pair under one key are spread by
        // another: colliding sets cannot be computed without the key.
        let shift = verdict_shift(64);
        let keys: Vec<KeyWords> =
            (0..1u64 << 18).map(|i| KeyWords { lo: (0x2001_0db8u64 << 32 | i << 8).swap_bytes(), hi: 0 }).collect();
        let at = |k: &KeyWords, hk: &HashKey| {
            let s = source_slots(k, hk, shift);
            (s.first, s.second)
        };
        let target = at(&keys[0], &HK);
        let same: Vec<&KeyWords> = keys.iter().filter(|k| at(k, &HK) == target).take(8).collect();
        assert_eq!(same.len(), 8);
        let other = HashKey::from_random([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
        let t2 = at(same[0], &other);
        assert!(same.iter().filter(|k| at(k, &other) == t2).count() < 3);
        assert!(other.is_set() && !HashKey::default().is_set());
    }

    #[test]
    fn an_address_key_shares_its_64s_buckets() {
        let mut a = [0u8; 16];
        a[..8].copy_from_slice(&0x2001_0db8_0001_0002u64.to_be_bytes());
        a[15] = 0x25;
        let host = KeyWords::v6_host(&a);
        let net = KeyWords::v6(&a);
        assert!(host.is_host_v6() && !net.is_host_v6());
        assert_ne!(host, net);
        assert_eq!(host.bucket_key(), net);
        assert_eq!(source_slots(&host.bucket_key(), &HK, 40), source_slots(&net, &HK, 40));
        assert_eq!(seen_slot(&net, &HK), source_slots(&net, &HK, 40).seen);
        assert_ne!(seen_slot(&host, &HK), seen_slot(&net, &HK), "its own reported-sources slot");
        // Interface ids 0 and all-ones have no address key.
        let mut z = a;
        z[8..].fill(0);
        assert_eq!(KeyWords::v6_host(&z), net);
        z[8..].fill(0xff);
        assert_eq!(KeyWords::v6_host(&z), net);
        // IPv4 keys hash as themselves.
        let k4 = KeyWords::v4([192, 0, 2, 1]);
        assert_eq!(k4.bucket_key(), k4);
        assert!(!k4.is_host_v6());
    }

    #[test]
    fn v6_lookup_finds_both_keys_across_the_pair() {
        let mut a = [0u8; 16];
        a[..8].copy_from_slice(&0x2001_0db8_0001_0002u64.to_be_bytes());
        a[15] = 7;
        let host = KeyWords::v6_host(&a);
        let net = KeyWords::v6(&a);
        let v = |n: u64| Verdict { expires_ns: n, action: 1, reason: 1 };
        let none = Verdict::default();
        let at = Slots { first: 0, second: 1, seen: 0 };
        let mut t = [VerdictBucket::default(); 2];
        t[0].slots[1] = VerdictSlot { key: net, verdict: v(1) };
        assert_eq!(verdict_lookup_v6(|i| t.get(i as usize), &host, &at), (none, v(1)));
        // The first bucket full: the address key waits in the second.
        for s in [0, 2, 3] {
            t[0].slots[s].key = KeyWords::v4([203, 0, 113, s as u8]);
        }
        t[1].slots[3] = VerdictSlot { key: host, verdict: v(2) };
        assert_eq!(verdict_lookup_v6(|i| t.get(i as usize), &host, &at), (v(2), v(1)));
        // Not full: the second bucket is not read.
        t[0].slots[0].key = KeyWords::default();
        assert_eq!(verdict_lookup_v6(|i| t.get(i as usize), &host, &at), (none, v(1)));
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
