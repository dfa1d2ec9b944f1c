//! Counter layout: every guarded SYN (and every packet the parser gave up
//! on) bumps exactly one decision counter, plus [`Counter::DryRun`] when a
//! drop was suppressed.

/// Decision counters, stored per interface in the stats map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Source in an allow range: passed.
    Allowed = 0,
    /// Source in a deny range: dropped.
    DenyRange = 1,
    /// No range and no live verdict: passed (and reported to the agent).
    Unknown = 2,
    /// A drop was due but dry-run mode passed the packet.
    DryRun = 3,
    /// The parser could not read the packet to the TCP header: passed.
    ParseSkipped = 4,
    /// An event could not be queued because the ring buffer was full.
    EventLost = 5,
    /// A live verdict said pass.
    VerdictPass = 6,
    /// A live verdict said drop; one counter per verdict reason follows.
    VerdictDropBase = 7,
}

/// Number of counter slots (the verdict-drop counters take
/// `verdict_reason::COUNT` slots starting at `VerdictDropBase`).
pub const COUNTER_SLOTS: u32 = Counter::VerdictDropBase as u32 + crate::verdict_reason::COUNT;

impl Counter {
    /// Counter slot for a drop by a verdict with `reason`.
    #[inline(always)]
    pub const fn verdict_drop(reason: u32) -> u32 {
        let r = if reason < crate::verdict_reason::COUNT { reason } else { crate::verdict_reason::COUNT - 1 };
        Counter::VerdictDropBase as u32 + r
    }
}

/// Stable, operator-facing name of a counter slot (used by `stats` and JSON).
pub fn counter_name(slot: u32) -> &'static str {
    match slot {
        0 => "allowed",
        1 => "deny-range",
        2 => "unknown",
        3 => "dry-run-would-drop",
        4 => "parse-skipped",
        5 => "event-lost",
        6 => "verdict-pass",
        s if s >= Counter::VerdictDropBase as u32 && s < COUNTER_SLOTS => {
            crate::verdict_reason::NAMES[(s - Counter::VerdictDropBase as u32) as usize]
        }
        _ => "invalid",
    }
}

/// Egress-gate decision counters, stored per interface in
/// [`maps::EG_STATS`](crate::maps::EG_STATS) with the same layout as the
/// ingress counters. A SYN to a guarded port from a subscriber source bumps
/// one guard counter (pool-blocked, pool-rejected, smarthost-allowed or
/// exempt; for an explain pool on a subscriber-facing interface, the TC
/// explain stage bumps pool-explained or explain-fallback instead); one the
/// guard let through may then also bump [`EgressCounter::RateLimited`]
/// when its class's limit drops it; and [`EgressCounter::DryRun`] counts
/// every drop dry-run suppressed. A frame
/// from a pool source that hides whether it is such a SYN (a TCP first
/// fragment, an IPv6 header chain too long to walk) bumps
/// [`EgressCounter::PoolFragment`] or [`EgressCounter::PoolExtChain`]
/// instead.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EgressCounter {
    /// Pool source to a guarded port, not a smarthost: dropped.
    PoolBlocked = 0,
    /// As above, answered with a TCP RST (pool action `reject`).
    PoolRejected = 1,
    /// Pool source to a smarthost: passed the guard (the rate limit may
    /// still drop it).
    SmarthostAllowed = 2,
    /// Exempt source to a guarded port: passed the guard (the rate limit
    /// may still drop it).
    Exempt = 3,
    /// Over the source's connection rate for the port's class: dropped.
    RateLimited = 4,
    /// A drop was due but dry-run mode passed the packet.
    DryRun = 5,
    /// The parser could not read the packet to the TCP header: passed.
    ParseSkipped = 6,
    /// Pool source, the first fragment of a TCP segment to a guarded port
    /// (or one too short to show its port), not to a smarthost: dropped,
    /// whatever its flags say (a later fragment may rewrite them).
    PoolFragment = 7,
    /// Pool source, an IPv6 header chain longer than the parser walks
    /// (`MAX_IPV6_EXT_HEADERS`), not to a smarthost: dropped, as it cannot
    /// be judged.
    PoolExtChain = 8,
    /// Pool source whose action is explain, to a guarded port, not a
    /// smarthost: the SYN went to the agent's explain listener (counted by
    /// the TC explain stage).
    PoolExplained = 9,
    /// As above, but no listener took it (the agent is down): answered
    /// with a RST, or dropped when it could not be answered.
    ExplainFallback = 10,
}

/// Number of egress counter slots.
pub const EGRESS_COUNTER_SLOTS: u32 = EgressCounter::ExplainFallback as u32 + 1;

/// Stable, operator-facing name of an egress counter slot.
pub fn egress_counter_name(slot: u32) -> &'static str {
    match slot {
        0 => "pool-blocked",
        1 => "pool-rejected",
        2 => "smarthost-allowed",
        3 => "exempt",
        4 => "rate-limited",
        5 => "dry-run-would-drop",
        6 => "parse-skipped",
        7 => "pool-fragment",
        8 => "pool-ext-chain",
        9 => "pool-explained",
        10 => "explain-fallback",
        _ => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_cover_all_slots() {
        let names: Vec<_> = (0..COUNTER_SLOTS).map(counter_name).collect();
        assert!(!names.contains(&"invalid"));
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "{names:?}");
        assert_eq!(counter_name(COUNTER_SLOTS), "invalid");
    }

    #[test]
    fn egress_names_are_unique_and_cover_all_slots() {
        let names: Vec<_> = (0..EGRESS_COUNTER_SLOTS).map(egress_counter_name).collect();
        assert!(!names.contains(&"invalid"));
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "{names:?}");
        assert_eq!(egress_counter_name(EGRESS_COUNTER_SLOTS), "invalid");
    }

    #[test]
    fn stat_index_round_trips() {
        use crate::{stat_index, StatKey, STAT_ENTRIES};
        for (ifindex, counter) in [(1, 0), (7, COUNTER_SLOTS - 1), (1023, 3)] {
            let i = stat_index(ifindex, counter);
            assert!(i < STAT_ENTRIES);
            assert_eq!(StatKey::from_index(i), StatKey { ifindex, counter });
        }
        // ifindexes beyond the slot count wrap into a slot.
        assert_eq!(StatKey::from_index(stat_index(1024 + 5, 2)), StatKey { ifindex: 5, counter: 2 });
    }

    #[test]
    fn verdict_drop_slots_are_clamped() {
        assert_eq!(Counter::verdict_drop(0), Counter::VerdictDropBase as u32);
        assert_eq!(counter_name(Counter::verdict_drop(crate::verdict_reason::MANUAL_BAN)), "manual-ban");
        assert_eq!(Counter::verdict_drop(999), COUNTER_SLOTS - 1);
    }
}
