//! The agent's side of the datapath's verdict table (layout and lookup in
//! `gatekeeper_common::sourcetab`): where a verdict goes, and writing it so
//! that a concurrent datapath read never pairs one source's key with
//! another's verdict.
use std::borrow::{Borrow, BorrowMut};

use aya::maps::{Array, MapData};
use gatekeeper_common::{
    sourcetab::{source_hash, verdict_bucket_pair},
    KeyWords, SourceKey, Verdict, VerdictBucket, VerdictSlot,
};

use crate::{datapath::bpf_err, Error, Result};

/// Where a verdict for a key goes, given the key's two buckets.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement {
    /// 0: the first bucket, 1: the second.
    pub bucket: usize,
    pub slot: usize,
    /// The key already there: the same key (an update), another key (an
    /// eviction: both buckets were full), or `None` (a free slot).
    pub replaces: Option<KeyWords>,
}

/// The slot for `key`: its own slot if present; else a free slot in the
/// emptier bucket (the first on a tie); else, both full, the slot whose
/// verdict expires first.
pub fn place(buckets: [&VerdictBucket; 2], key: &KeyWords) -> Placement {
    for (bucket, b) in buckets.iter().enumerate() {
        if let Some(slot) = b.position(key) {
            return Placement { bucket, slot, replaces: Some(*key) };
        }
    }
    let bucket = if buckets[1].occupied() < buckets[0].occupied() { 1 } else { 0 };
    if let Some(slot) = buckets[bucket].slots.iter().position(|s| s.key.is_empty()) {
        return Placement { bucket, slot, replaces: None };
    }
    let (bucket, slot, s) = buckets
        .iter()
        .enumerate()
        .flat_map(|(bi, b)| b.slots.iter().enumerate().map(move |(si, s)| (bi, si, s)))
        .min_by_key(|(_, _, s)| s.verdict.expires_ns)
        .expect("buckets have slots");
    Placement { bucket, slot, replaces: Some(s.key) }
}

/// Typed access to the verdict array.
pub struct VerdictTable<T> {
    buckets: Array<T, VerdictBucket>,
    mask: u32,
}

impl<T: Borrow<MapData>> VerdictTable<T> {
    pub fn new(buckets: Array<T, VerdictBucket>) -> Result<Self> {
        let n = buckets.len();
        if !n.is_power_of_two() || n < 2 {
            return Err(Error::Bpf(format!("verdict table has {n} buckets, expected a power of two")));
        }
        Ok(VerdictTable { buckets, mask: n - 1 })
    }

    /// Number of buckets.
    pub fn buckets(&self) -> u32 {
        self.mask + 1
    }

    fn pair(&self, key: &KeyWords) -> [u32; 2] {
        let (a, b) = verdict_bucket_pair(source_hash(key), self.mask);
        [a, b]
    }

    fn bucket(&self, i: u32) -> Result<VerdictBucket> {
        self.buckets.get(&i, 0).map_err(|e| bpf_err("read verdict table", e))
    }

    /// The verdict the datapath would find for `key`.
    pub fn get(&self, key: SourceKey) -> Result<Option<Verdict>> {
        let k = KeyWords::of(&key);
        for i in self.pair(&k) {
            if let Some(v) = self.bucket(i)?.find(&k) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Every verdict in the table.
    pub fn all(&self) -> Result<Vec<(SourceKey, Verdict)>> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            let b = b.map_err(|e| bpf_err("read verdict table", e))?;
            out.extend(b.slots.iter().filter(|s| !s.key.is_empty()).map(|s| (s.key.key(), s.verdict)));
        }
        Ok(out)
    }
}

impl<T: BorrowMut<MapData>> VerdictTable<T> {
    /// Writes `slot` of bucket `i` and leaves the rest of the bucket as read.
    fn write(&mut self, i: u32, mut b: VerdictBucket, slot: usize, s: VerdictSlot) -> Result<VerdictBucket> {
        b.slots[slot] = s;
        self.buckets.set(i, b, 0).map_err(|e| bpf_err("write verdict table", e))?;
        Ok(b)
    }

    /// Sets the verdict of `key`; returns the source evicted to make room,
    /// if both of the key's buckets were full.
    pub fn insert(&mut self, key: SourceKey, v: Verdict) -> Result<Option<SourceKey>> {
        let k = KeyWords::of(&key);
        if k.is_empty() {
            return Err(Error::InvalidInput(format!("no verdict can be held for {}", key.display())));
        }
        let idx = self.pair(&k);
        let bs = [self.bucket(idx[0])?, self.bucket(idx[1])?];
        let p = place([&bs[0], &bs[1]], &k);
        let (i, b) = (idx[p.bucket], bs[p.bucket]);
        if p.replaces == Some(k) {
            self.write(i, b, p.slot, VerdictSlot { key: k, verdict: v })?;
            return Ok(None);
        }
        // Two writes: the verdict under an empty key, then the key, so no
        // read sees the new key with the old slot's verdict.
        let b = self.write(i, b, p.slot, VerdictSlot { key: KeyWords::default(), verdict: v })?;
        self.write(i, b, p.slot, VerdictSlot { key: k, verdict: v })?;
        Ok(p.replaces.map(|e| e.key()))
    }

    /// Removes the verdict of `key`; false when it had none.
    pub fn remove(&mut self, key: SourceKey) -> Result<bool> {
        let k = KeyWords::of(&key);
        for i in self.pair(&k) {
            let b = self.bucket(i)?;
            if let Some(slot) = b.position(&k) {
                if k.is_empty() {
                    return Ok(false);
                }
                self.write(i, b, slot, VerdictSlot::default())?;
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
        VerdictSlot { key: key(i), verdict: Verdict { expires_ns, action: 1, reason: 0 } }
    }

    #[test]
    fn places_in_the_emptier_bucket_then_the_first() {
        let mut a = VerdictBucket::default();
        let b = VerdictBucket::default();
        assert_eq!(place([&a, &b], &key(9)), Placement { bucket: 0, slot: 0, replaces: None });
        a.slots[0] = slot(1, 5);
        assert_eq!(place([&a, &b], &key(9)), Placement { bucket: 1, slot: 0, replaces: None });
        // A freed slot in the middle is reused.
        let mut c = VerdictBucket::default();
        c.slots[0] = slot(2, 5);
        c.slots[2] = slot(3, 5);
        assert_eq!(place([&a, &c], &key(9)), Placement { bucket: 0, slot: 1, replaces: None });
    }

    #[test]
    fn finds_the_key_in_either_bucket() {
        let mut a = VerdictBucket::default();
        let mut b = VerdictBucket::default();
        a.slots[0] = slot(1, 5);
        b.slots[3] = slot(9, 5);
        assert_eq!(place([&a, &b], &key(9)), Placement { bucket: 1, slot: 3, replaces: Some(key(9)) });
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
        assert_eq!(place([&a, &b], &key(99)), Placement { bucket: 1, slot: 0, replaces: Some(key(11)) });
    }
}
