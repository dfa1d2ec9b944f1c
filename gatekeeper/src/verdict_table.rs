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

/// Typed access to the verdict array. It keeps the layout rule of
/// `sourcetab` (a key is in its second bucket only while its first is
/// full) at every write the datapath can see:
/// * a slot that gets another key is first given the new verdict under
///   [`KeyWords::TOMBSTONE`], then the key, so no read pairs a key with
///   another source's verdict, and the bucket never looks less full;
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

    /// Writes `s` into `slot` of bucket `i` (as read in `b`): the same key's
    /// verdict at once, another key in two steps (see above).
    fn put(&mut self, i: u32, b: &mut VerdictBucket, slot: usize, s: VerdictSlot) -> Result<()> {
        if b.slots[slot].key != s.key {
            b.slots[slot] = VerdictSlot { key: KeyWords::TOMBSTONE, verdict: s.verdict };
            self.write(i, b)?;
        }
        b.slots[slot] = s;
        self.write(i, b)
    }

    /// Frees `slot` of bucket `i` (as read in `b`): gives it to a key waiting
    /// in its second bucket if there is one, then frees that key's old slot
    /// likewise.
    fn free_slot(&mut self, i: u32, b: VerdictBucket, slot: usize) -> Result<()> {
        let (mut i, mut b, mut slot) = (i, b, slot);
        loop {
            let waiting = self.overflow()?.get_mut(&i).and_then(|v| v.pop());
            let Some(k) = waiting else {
                b.slots[slot] = VerdictSlot::default();
                return self.write(i, &b);
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
