//! The agent's side of the datapath's verdict table (layout and lookup in
//! `gatekeeper_common::sourcetab`): where a verdict goes, keeping keys in
//! their first bucket whenever it has room, and writing so that a
//! concurrent datapath read never pairs one source's key with another's
//! verdict.
use std::{
    borrow::{Borrow, BorrowMut},
    collections::HashMap,
};

use aya::maps::{Array, MapData};
use gatekeeper_common::{
    action,
    sourcetab::{source_slots, verdict_shift, HashKey},
    verdict_reason, KeyWords, SourceKey, Verdict, VerdictBucket, VerdictSlot,
};

use crate::{Error, Result};

/// Where a new verdict goes, given its key's two buckets.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement {
    /// 0: the first bucket, 1: the second.
    pub bucket: usize,
    pub slot: usize,
    /// The key evicted (both buckets were full), if any.
    pub replaces: Option<KeyWords>,
}

/// Whether a verdict may be evicted to make room for another: automatic
/// drop verdicts may. Manual bans never (an evicted ban lets its source in),
/// nor pass verdicts (an evicted one could leave a good host inside a
/// learned range to the range).
pub fn evictable(v: &Verdict) -> bool {
    v.reason != verdict_reason::MANUAL_BAN && v.action != action::PASS
}

/// The slot for a key in neither of its buckets: a free slot of the first
/// bucket, else of the second (the datapath searches the second only when
/// the first is full); else, both full, the [`evictable`] slot that expires
/// first; `None` when every slot of both holds a ban or a pass verdict.
pub fn place(buckets: [&VerdictBucket; 2], key: &KeyWords) -> Option<Placement> {
    debug_assert!(buckets.iter().all(|b| b.position(key).is_none()));
    for (bucket, b) in buckets.iter().enumerate() {
        if let Some(slot) = b.slots.iter().position(|s| s.key.is_empty()) {
            return Some(Placement { bucket, slot, replaces: None });
        }
    }
    let (bucket, slot, s) = buckets
        .iter()
        .enumerate()
        .flat_map(|(bi, b)| b.slots.iter().enumerate().map(move |(si, s)| (bi, si, s)))
        .filter(|(_, _, s)| evictable(&s.verdict))
        .min_by_key(|(_, _, s)| s.verdict.expires_ns)?;
    Some(Placement { bucket, slot, replaces: Some(s.key) })
}

/// The writes that take a slot from `old` to `new`, each a whole bucket
/// write with only this slot changed: the same key's new verdict at once;
/// otherwise the old key (if any) becomes [`KeyWords::TOMBSTONE`] keeping
/// its verdict, then the new verdict goes in under the tombstone, then the
/// new key (or, to free the slot, zeros). A datapath read takes a slot's
/// verdict only if the slot's key reads the same before and after it
/// (`VerdictBucket::find`), so no read, at any point of these writes, pairs
/// a key with a verdict that is not its own (`handover_never_misjudges`).
/// Keys change only to or from the tombstone: half of a key next to half
/// of the tombstone, (prefix, all ones) or (all ones, ...), matches no
/// source, whereas half a key over zeros could be (prefix, 0), an IPv6
/// address key's /64.
pub fn slot_writes(old: VerdictSlot, new: VerdictSlot) -> Vec<VerdictSlot> {
    if old.key == new.key {
        return vec![new];
    }
    let mut steps = Vec::with_capacity(3);
    if !old.key.is_empty() && old.key != KeyWords::TOMBSTONE {
        steps.push(VerdictSlot { key: KeyWords::TOMBSTONE, verdict: old.verdict });
    }
    if !new.key.is_empty() {
        steps.push(VerdictSlot { key: KeyWords::TOMBSTONE, verdict: new.verdict });
    }
    steps.push(new);
    steps
}

/// Typed access to the verdict array. It keeps the layout rule of
/// `sourcetab` (a key is in its second bucket only while its first is
/// full) at every write the datapath can see:
/// * a slot that gets another key is tombstoned, given the new verdict,
///   then the key (see `put`), so no read pairs a key with another
///   source's verdict, and the bucket never looks less full;
/// * a freed slot of a bucket that keys wait on (in their second bucket) is
///   given one of them instead of being emptied, then that key's old slot is
///   freed the same way, and so on: each move takes a key out of a second
///   bucket, so the chain ends.
pub struct VerdictTable<T> {
    buckets: Array<T, VerdictBucket>,
    n: u32,
    /// The datapath's hash secret and shift (see `sourcetab::source_slots`).
    hash: HashKey,
    shift: u32,
    /// Keys held in their second bucket, by their first bucket (built when
    /// first needed, by reading the whole table).
    overflow: Option<HashMap<u32, Vec<KeyWords>>>,
}

impl<T: Borrow<MapData>> VerdictTable<T> {
    /// The table in `buckets`, placed with the hash secret `hash` (the one
    /// in the datapath's config).
    pub fn new(buckets: Array<T, VerdictBucket>, hash: HashKey) -> Result<Self> {
        let n = buckets.len();
        if !n.is_power_of_two() || n < 2 {
            return Err(Error::bpf_msg(format!("verdict table has {n} buckets, expected a power of two")));
        }
        Ok(VerdictTable { buckets, n, hash, shift: verdict_shift(n), overflow: None })
    }

    /// Number of buckets.
    pub fn buckets(&self) -> u32 {
        self.n
    }

    /// The hash secret the table is placed with.
    pub fn hash_key(&self) -> HashKey {
        self.hash
    }

    /// A key's two buckets (an IPv6 address key's are its /64's).
    pub fn pair(&self, key: &KeyWords) -> [u32; 2] {
        let at = source_slots(&key.bucket_key(), &self.hash, self.shift);
        [at.first, at.second]
    }

    fn bucket(&self, i: u32) -> Result<VerdictBucket> {
        self.buckets.get(&i, 0).map_err(|e| Error::bpf("read verdict table", e))
    }

    /// The verdict the datapath would find for `key`.
    pub fn get(&self, key: SourceKey) -> Result<Option<Verdict>> {
        let k = KeyWords::of(&key);
        let [first, second] = self.pair(&k);
        Ok(match self.bucket(first)?.find(&k) {
            Ok(v) => Some(v),
            Err(false) => None,
            Err(true) => self.bucket(second)?.find(&k).ok(),
        })
    }

    /// Every verdict in the table.
    pub fn all(&self) -> Result<Vec<(SourceKey, Verdict)>> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            let b = b.map_err(|e| Error::bpf("read verdict table", e))?;
            out.extend(b.slots.iter().filter(|s| s.key.is_key()).map(|s| (s.key.key(), s.verdict)));
        }
        Ok(out)
    }
}

impl<T: BorrowMut<MapData>> VerdictTable<T> {
    /// Empties the table and places from now on with `hash` (for maps just
    /// created, before the datapath reads them).
    pub fn reset(&mut self, hash: HashKey) -> Result<()> {
        for i in 0..self.n {
            self.write(i, &VerdictBucket::default())?;
        }
        self.hash = hash;
        self.overflow = None;
        Ok(())
    }

    fn write(&mut self, i: u32, b: &VerdictBucket) -> Result<()> {
        self.buckets.set(i, b, 0).map_err(|e| Error::bpf("write verdict table", e))
    }

    /// Writes `s` into `slot` of bucket `i` (as read in `b`), in the steps
    /// of [`slot_writes`].
    fn put(&mut self, i: u32, b: &mut VerdictBucket, slot: usize, s: VerdictSlot) -> Result<()> {
        for step in slot_writes(b.slots[slot], s) {
            b.slots[slot] = step;
            self.write(i, b)?;
        }
        Ok(())
    }

    /// Frees `slot` of bucket `i` (as read in `b`): gives it to a key waiting
    /// in its second bucket if there is one, then frees that key's old slot
    /// likewise.
    fn free_slot(&mut self, i: u32, b: VerdictBucket, slot: usize) -> Result<()> {
        let (mut i, mut b, mut slot) = (i, b, slot);
        loop {
            let waiting = self.overflow()?.get_mut(&i).and_then(|v| v.pop());
            let Some(k) = waiting else {
                let mut b = b;
                return self.put(i, &mut b, slot, VerdictSlot::default());
            };
            let second = self.pair(&k)[1];
            let s = self.bucket(second)?;
            let Some(at) = s.position(&k) else { continue };
            self.put(i, &mut b, slot, s.slots[at])?;
            (i, b, slot) = (second, s, at);
        }
    }

    fn overflow(&mut self) -> Result<&mut HashMap<u32, Vec<KeyWords>>> {
        if self.overflow.is_none() {
            let mut ix: HashMap<u32, Vec<KeyWords>> = HashMap::new();
            for i in 0..self.n {
                for s in self.bucket(i)?.slots.iter().filter(|s| s.key.is_key()) {
                    let [first, second] = self.pair(&s.key);
                    if i == second && i != first {
                        ix.entry(first).or_default().push(s.key);
                    }
                }
            }
            self.overflow = Some(ix);
        }
        Ok(self.overflow.as_mut().expect("built above"))
    }

    /// Records that `key` (first bucket `first`) left or entered its second
    /// bucket, if the index exists (it is built complete when needed).
    fn note(&mut self, first: u32, key: KeyWords, held: bool) {
        if let Some(ix) = self.overflow.as_mut() {
            let v = ix.entry(first).or_default();
            v.retain(|k| *k != key);
            if held {
                v.push(key);
            }
        }
    }

    /// Sets the verdict of `key`; returns the source evicted to make room,
    /// if both of the key's buckets were full. [`Error::VerdictsFull`] when
    /// they hold nothing [`evictable`] (nothing is written).
    pub fn insert(&mut self, key: SourceKey, v: Verdict) -> Result<Option<SourceKey>> {
        let k = KeyWords::of(&key);
        if k.is_empty() {
            return Err(Error::InvalidInput(format!("no verdict can be held for {}", key.display())));
        }
        let slot = VerdictSlot { key: k, verdict: v };
        let [first, second] = self.pair(&k);
        let mut bf = self.bucket(first)?;
        if let Some(at) = bf.position(&k) {
            self.put(first, &mut bf, at, slot)?;
            return Ok(None);
        }
        let mut bs = self.bucket(second)?;
        if let Some(at) = bs.position(&k) {
            match bf.slots.iter().position(|s| s.key.is_empty()) {
                // Room in the first bucket again (a move cut short by an
                // earlier error): move there.
                Some(free) => {
                    self.put(first, &mut bf, free, slot)?;
                    self.note(first, k, false);
                    self.free_slot(second, bs, at)?;
                }
                None => self.put(second, &mut bs, at, slot)?,
            }
            return Ok(None);
        }
        let Some(p) = place([&bf, &bs], &k) else {
            return Err(Error::VerdictsFull { key: key.display() });
        };
        if let Some(old) = p.replaces {
            // An evicted key held in its second bucket leaves the index.
            let [of, os] = self.pair(&old);
            if os == [first, second][p.bucket] {
                self.note(of, old, false);
            }
        }
        if p.bucket == 0 {
            self.put(first, &mut bf, p.slot, slot)?;
        } else {
            self.put(second, &mut bs, p.slot, slot)?;
            self.note(first, k, true);
        }
        Ok(p.replaces.map(|e| e.key()))
    }

    /// Removes the verdict of `key`; false when it had none.
    pub fn remove(&mut self, key: SourceKey) -> Result<bool> {
        let k = KeyWords::of(&key);
        if k.is_empty() {
            return Ok(false);
        }
        let [first, second] = self.pair(&k);
        for (i, b) in [(first, self.bucket(first)?), (second, self.bucket(second)?)] {
            if let Some(at) = b.position(&k) {
                if i == second {
                    self.note(first, k, false);
                }
                self.free_slot(i, b, at)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> KeyWords {
        KeyWords::of(&gatekeeper_common::addr::key_v4(i.to_be_bytes()))
    }

    fn slot(i: u32, expires_ns: u64) -> VerdictSlot {
        VerdictSlot {
            key: key(i),
            verdict: Verdict { expires_ns, action: action::DROP, reason: verdict_reason::NO_PTR },
        }
    }

    /// A reader of the datapath's protocol (key, verdict, key again) run
    /// against every interleaving with the writes of a handover: each
    /// write stores the slot's four 8-byte words in some order (forward or
    /// backward copy), and the reader's five loads (key lo, key hi,
    /// verdict, key lo, key hi; the verdict as two words) see the words as
    /// they are at five non-decreasing instants.
    #[test]
    fn handover_never_misjudges() {
        use gatekeeper_common::SourceKey;
        let host = |s: &str| KeyWords::of(&SourceKey::host(s.parse().unwrap()));
        let v = |e: u64, a: u32, r: u32| Verdict { expires_ns: e, action: a, reason: r };
        let (h1, h2) = (host("2001:db8:1:2::25"), host("2001:db8:1:2::26"));
        let (n, v4) = (host("2001:db8:1:2::").bucket_key(), key(7));
        let cases = [
            (VerdictSlot::default(), VerdictSlot { key: h1, verdict: v(9, 1, 1) }),
            (VerdictSlot { key: h1, verdict: v(9, 1, 1) }, VerdictSlot { key: n, verdict: v(5, 0, 5) }),
            (VerdictSlot { key: n, verdict: v(5, 0, 5) }, VerdictSlot { key: h2, verdict: v(8, 1, 2) }),
            (VerdictSlot { key: h2, verdict: v(8, 1, 2) }, VerdictSlot::default()),
            (VerdictSlot { key: v4, verdict: v(3, 1, 3) }, VerdictSlot { key: h1, verdict: v(4, 1, 1) }),
            (VerdictSlot { key: h1, verdict: v(4, 1, 1) }, VerdictSlot { key: h1, verdict: v(6, 0, 5) }),
        ];
        let words = |s: &VerdictSlot| -> [u64; 4] {
            let ar = u64::from(s.verdict.action) | u64::from(s.verdict.reason) << 32;
            [s.key.lo, s.key.hi, s.verdict.expires_ns, ar]
        };
        for (old, new) in cases {
            let steps = slot_writes(old, new);
            // Every instant's memory, for each choice of copy direction per
            // write (3 writes at most: 8 choices).
            for dirs in 0..1u32 << steps.len() {
                let mut mem = vec![words(&old)];
                let mut cur = words(&old);
                for (w, step) in steps.iter().enumerate() {
                    let target = words(step);
                    let order: Vec<usize> = if dirs >> w & 1 == 0 { (0..4).collect() } else { (0..4).rev().collect() };
                    for i in order {
                        if cur[i] != target[i] {
                            cur[i] = target[i];
                            mem.push(cur);
                        }
                    }
                }
                let t = mem.len();
                for reader in [old.key, new.key, h1, h2, n, v4] {
                    if reader.is_empty() {
                        continue;
                    }
                    // Own verdicts the reader may legitimately get.
                    let own: Vec<Verdict> = [old, new].iter().filter(|s| s.key == reader).map(|s| s.verdict).collect();
                    // Loads at instants a <= b <= c <= d <= e <= f: key lo,
                    // key hi, verdict (two words), key lo, key hi.
                    let mut at = [0usize; 6];
                    loop {
                        let (k1, k2) = ((mem[at[0]][0], mem[at[1]][1]), (mem[at[4]][0], mem[at[5]][1]));
                        if k1 == (reader.lo, reader.hi) && k2 == k1 {
                            // Each verdict word is one of the reader's own
                            // (a verdict replaced under the same key may be
                            // read half old, half new: both are its own).
                            let got = [mem[at[2]][2], mem[at[3]][3]];
                            let ok = (0..2).all(|w| {
                                own.iter().any(|o| words(&VerdictSlot { key: reader, verdict: *o })[2 + w] == got[w])
                            });
                            assert!(ok, "{old:?} -> {new:?} (dirs {dirs}): reader {reader:?} got {got:?} at {at:?}");
                        }
                        // Next non-decreasing tuple.
                        let Some(i) = (0..6).rev().find(|&i| at[i] + 1 < t) else { break };
                        at[i] += 1;
                        for j in i + 1..6 {
                            at[j] = at[i];
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn places_in_the_first_bucket_while_it_has_room() {
        let mut a = VerdictBucket::default();
        let b = VerdictBucket::default();
        assert_eq!(place([&a, &b], &key(9)).unwrap(), Placement { bucket: 0, slot: 0, replaces: None });
        a.slots[0] = slot(1, 5);
        assert_eq!(place([&a, &b], &key(9)).unwrap(), Placement { bucket: 0, slot: 1, replaces: None });
        // A freed slot in the middle is reused.
        a.slots[2] = slot(2, 5);
        assert_eq!(place([&a, &b], &key(9)).unwrap(), Placement { bucket: 0, slot: 1, replaces: None });
        a.slots[1] = slot(3, 5);
        a.slots[3] = slot(4, 5);
        assert_eq!(place([&a, &b], &key(9)).unwrap(), Placement { bucket: 1, slot: 0, replaces: None }, "first full");
    }

    #[test]
    fn full_buckets_evict_the_soonest_expiry() {
        let mut a = VerdictBucket::default();
        let mut b = VerdictBucket::default();
        for s in 0..4 {
            a.slots[s] = slot(s as u32 + 1, 100 + s as u64);
            b.slots[s] = slot(s as u32 + 11, 50 + s as u64 * 100);
        }
        a.slots[2].verdict.expires_ns = u64::MAX;
        assert_eq!(place([&a, &b], &key(99)).unwrap(), Placement { bucket: 1, slot: 0, replaces: Some(key(11)) });
    }

    #[test]
    fn bans_and_pass_verdicts_are_never_evicted() {
        let mut a = VerdictBucket::default();
        let mut b = VerdictBucket::default();
        for s in 0..4 {
            a.slots[s] = slot(s as u32 + 1, 100 + s as u64);
            b.slots[s] = slot(s as u32 + 11, 200 + s as u64);
        }
        // The soonest-expiring slots hold a ban and a pass verdict.
        a.slots[0].verdict.reason = verdict_reason::MANUAL_BAN;
        a.slots[1].verdict.action = action::PASS;
        assert_eq!(place([&a, &b], &key(99)).unwrap(), Placement { bucket: 0, slot: 2, replaces: Some(key(3)) });
        // Nothing evictable left: no place, nothing replaced.
        for s in 0..4 {
            a.slots[s].verdict.reason = verdict_reason::MANUAL_BAN;
            b.slots[s].verdict.action = action::PASS;
        }
        assert_eq!(place([&a, &b], &key(99)), None);
    }
}
