//! The inbound limiter: a connection-rate limit per source on *limited*
//! ports (mail submission, IMAP, POP3, ... and SMTP), independent of the
//! reverse-DNS judgement of *guarded* ports.
//!
//! * [`maps::IN_PORTS`](crate::maps::IN_PORTS): one u32 per destination
//!   port, its rate-limit class (1..[`MAX_LIMIT_CLASSES`], 0 = not limited).
//! * [`maps::IN_LIMITS`](crate::maps::IN_LIMITS): the
//!   [`RateLimit`](crate::RateLimit) of each class (GCRA, as the egress gate).
//! * [`maps::IN_BUCKETS`](crate::maps::IN_BUCKETS): the GCRA state, an array
//!   of [`InBucket`]s of [`IN_WAYS`] slots, each `{source, class, tat}`; a
//!   source's bucket is [`in_bucket`] (multiply-shift with the maps' secret,
//!   as the verdict table). It is not an LRU hash: a lookup is an inlined
//!   array access and four compares. A newcomer takes an idle slot
//!   (`tat <= now`: GCRA treats it as a full bucket, so taking it loses
//!   nothing), else the slot with the lowest arrival time ([`InBucket::pick`]).
//!   A flood of spoofed sources can churn a bucket and hand a real offender
//!   a fresh burst; the log-driven bans still catch it.
//! * [`maps::IN_STATS`](crate::maps::IN_STATS): per-CPU counters per class
//!   ([`in_stat_index`], names in [`inbound_counter_name`]).
//!
//! Sources keyed as the verdicts of pass and ban: IPv4 /32, IPv6 /64
//! ([`KeyWords::v4`], [`KeyWords::v6`]).
use crate::{sourcetab::HashKey, KeyWords, MAX_LIMIT_CLASSES};

/// Slots per bucket.
pub const IN_WAYS: usize = 4;
/// log2 of the buckets of [`maps::IN_BUCKETS`](crate::maps::IN_BUCKETS).
pub const IN_BUCKET_BITS: u32 = 15;
/// Buckets of the limiter table (4 MiB: 32,768 × 128 bytes).
pub const IN_BUCKETS: u32 = 1 << IN_BUCKET_BITS;
/// Entries of [`maps::IN_PORTS`](crate::maps::IN_PORTS): one per port.
pub const IN_PORT_ENTRIES: u32 = 65_536;

/// One limiter slot: a source key, its class and its GCRA theoretical
/// arrival time (datapath clock). An all-zero key is an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InSlot {
    pub key: KeyWords,
    pub class: u32,
    pub _pad: u32,
    pub tat: u64,
}
const _: () = assert!(core::mem::size_of::<InSlot>() == 32);

/// A bucket of the limiter table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InBucket {
    pub slots: [InSlot; IN_WAYS],
}
const _: () = assert!(core::mem::size_of::<InBucket>() == 32 * IN_WAYS);

impl InBucket {
    /// Where (`key`, `class`) lives in this bucket and its arrival time:
    /// its own slot, or (not there) the slot a newcomer takes with arrival
    /// time 0 (never seen). The newcomer's slot is the first idle one
    /// (`tat <= now`, empty slots included), else the one with the lowest
    /// arrival time (the source closest to having its whole burst back).
    #[inline(always)]
    pub fn pick(&self, key: &KeyWords, class: u32, now: u64) -> (usize, u64) {
        let mut victim = 0;
        let mut lowest = u64::MAX;
        let mut i = 0;
        while i < IN_WAYS {
            let s = &self.slots[i];
            if s.key.lo == key.lo && s.key.hi == key.hi && s.class == class {
                return (i, s.tat);
            }
            // An idle slot scores 0 and is taken first (the first of them).
            let score = if s.tat <= now { 0 } else { s.tat };
            if score < lowest {
                lowest = score;
                victim = i;
            }
            i += 1;
        }
        (victim, 0)
    }
}

/// The bucket of (`key`, `class`): the key folded to one word as the
/// verdict table does, the class mixed in, then multiply-shift with a
/// multiplier derived from the maps' secret (distinct from the verdict
/// table's two), whose top [`IN_BUCKET_BITS`] bits pick the bucket.
#[inline(always)]
pub const fn in_bucket(key: &KeyWords, class: u32, hk: &HashKey) -> u32 {
    let x = key.lo ^ key.hi.rotate_left(29) ^ (class as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let m = (hk.m1 ^ hk.m2.rotate_left(32)) | 1;
    (x.wrapping_mul(m) >> (64 - IN_BUCKET_BITS)) as u32
}

/// Inbound counters, per class, in [`maps::IN_STATS`](crate::maps::IN_STATS).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InboundCounter {
    /// A SYN the limiter looked at (its class has a limit).
    Checked = 0,
    /// Over the source's rate for the class: dropped.
    Limited = 1,
    /// A drop was due (limited or banned) but dry-run mode passed it.
    DryRun = 2,
    /// A live ban verdict (`action::BAN`) on a limited-only port: dropped
    /// (on a guarded port a ban counts as the ingress counter `manual-ban`).
    Banned = 3,
    /// On a limited-only port: an allow range or a pass verdict with reason
    /// `ok`, passed without a limit.
    Exempt = 4,
}

/// Counters per class.
pub const IN_COUNTERS: u32 = InboundCounter::Exempt as u32 + 1;
/// Entries of the inbound counter array.
pub const IN_STAT_ENTRIES: u32 = MAX_LIMIT_CLASSES * IN_COUNTERS;

/// Index of (class, counter) in the inbound counters.
#[inline(always)]
pub const fn in_stat_index(class: u32, counter: u32) -> u32 {
    (class % MAX_LIMIT_CLASSES) * IN_COUNTERS + counter
}

/// Stable, operator-facing name of an inbound counter (`stats`, JSON).
pub fn inbound_counter_name(counter: u32) -> &'static str {
    match counter {
        0 => "checked",
        1 => "limited",
        2 => "dry-run-would-drop",
        3 => "banned",
        4 => "exempt",
        _ => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sourcetab::HashKey;

    fn slot(n: u64, class: u32, tat: u64) -> InSlot {
        InSlot { key: KeyWords { lo: 0, hi: n }, class, _pad: 0, tat }
    }

    #[test]
    fn pick_finds_the_source_and_class() {
        let mut b = InBucket::default();
        b.slots[2] = slot(7, 1, 500);
        b.slots[3] = slot(7, 2, 900);
        assert_eq!(b.pick(&KeyWords { lo: 0, hi: 7 }, 1, 100), (2, 500));
        assert_eq!(b.pick(&KeyWords { lo: 0, hi: 7 }, 2, 100), (3, 900));
        // Another class of the same source is another bucket state.
        assert_eq!(b.pick(&KeyWords { lo: 0, hi: 7 }, 3, 100).1, 0);
    }

    #[test]
    fn pick_takes_an_idle_slot_first_else_the_lowest_arrival_time() {
        let now = 1_000;
        let mut b = InBucket { slots: [slot(1, 1, 5_000), slot(2, 1, 3_000), slot(3, 1, 900), slot(4, 1, 4_000)] };
        let newcomer = KeyWords { lo: 0, hi: 99 };
        // Slot 2 is idle (tat <= now): lossless to take.
        assert_eq!(b.pick(&newcomer, 1, now), (2, 0));
        // No idle slot: the lowest arrival time goes.
        b.slots[2].tat = 7_000;
        assert_eq!(b.pick(&newcomer, 1, now), (1, 0));
        // An empty slot is idle; the first idle one is taken.
        b.slots[3] = InSlot::default();
        b.slots[0].tat = now;
        assert_eq!(b.pick(&newcomer, 1, now), (0, 0));
        assert_eq!(InBucket::default().pick(&newcomer, 1, now), (0, 0));
    }

    #[test]
    fn bucket_is_in_range_and_mixes_key_class_and_secret() {
        let hk = HashKey::from_random([0x1234_5678_9abc_def1, 0x0fed_cba9_8765_4321]);
        let other = HashKey::from_random([0x5555_aaaa_1111_3333, 0x7777_9999_bbbb_dddd]);
        let mut same_class = 0;
        let mut same_secret = 0;
        let mut seen = std::collections::HashSet::new();
        for i in 0..2_000u32 {
            let k = KeyWords::v4([198, 51, (i >> 8) as u8, i as u8]);
            let b = in_bucket(&k, 1, &hk);
            assert!(b < IN_BUCKETS);
            seen.insert(b);
            same_class += (in_bucket(&k, 2, &hk) == b) as u32;
            same_secret += (in_bucket(&k, 1, &other) == b) as u32;
            let v6 = KeyWords::v6(&[0x20, 0x01, 0x0d, 0xb8, (i >> 8) as u8, i as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            assert!(in_bucket(&v6, 1, &hk) < IN_BUCKETS);
        }
        assert!(seen.len() > 1_900, "{} distinct buckets of 2000 keys", seen.len());
        assert!(same_class < 10 && same_secret < 10, "{same_class} {same_secret}");
    }

    #[test]
    fn counter_names_are_unique_and_indexes_in_range() {
        let names: Vec<_> = (0..IN_COUNTERS).map(inbound_counter_name).collect();
        assert!(!names.contains(&"invalid"));
        let mut d = names.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), names.len());
        assert_eq!(inbound_counter_name(IN_COUNTERS), "invalid");
        assert_eq!(in_stat_index(MAX_LIMIT_CLASSES - 1, IN_COUNTERS - 1), IN_STAT_ENTRIES - 1);
        assert_eq!(in_stat_index(1, InboundCounter::Limited as u32), IN_COUNTERS + 1);
    }
}
