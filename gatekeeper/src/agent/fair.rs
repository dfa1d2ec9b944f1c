//! The lookup scheduler: which reported source is looked up next, and which
//! is turned away when there is no room. Pure (no I/O, no clock), so the
//! lookup task and the ring reader share it behind a plain mutex that is
//! held for a few map operations only.
//!
//! **Fair lanes.** Sources wait in one queue per prefix: the source's /24
//! for IPv4 (and IPv4-mapped IPv6), its /48 for IPv6. The prefixes take
//! turns, one lookup each (round robin: deficit round robin with a quantum
//! of one lookup, every lookup costing the same), so a prefix, or a spray
//! of sources over one prefix, gets its share of the lookups and no more: a
//! source in a prefix of its own waits for at most one lookup per other
//! prefix with sources waiting, however many sources those prefixes hold.
//!
//! **Retransmitters first.** The datapath reports a source at most once per
//! `event_interval`, unless that report was lost (a full ring) or a fresh
//! source shares its reported-sources slot. A source reported again while
//! it still waits, or reported again after it was turned away here, is a
//! real TCP stack that is retransmitting its SYN (a spoofed flood sends one
//! SYN per source): it moves to the retransmit lane, which is fair by prefix
//! too and is served before the fair lane. Every [`FAIR_EVERY`]th pick goes
//! to the fair lane when both have sources waiting, so sources made to look
//! like retransmitters cannot starve first-time senders altogether.
//!
//! **Bounded.** At most `max_pending` sources are waiting or being looked up
//! (taken by [`Scheduler::pick`] until [`Scheduler::done`]). When full, a
//! newcomer takes the place of the newest source of the longest fair prefix
//! queue if that queue is longer than the newcomer's own would become (so a
//! flood of one prefix gives way to everyone else, and a spray of single
//! sources does not churn); a retransmitter takes the place of any
//! first-time source (the longest prefix's newest), and of another
//! retransmitter only on the same longest-queue rule. Otherwise the newcomer
//! is turned away: it stays unknown and passes. What was turned away (on
//! arrival or evicted) is remembered in a bounded set of `max_pending`
//! addresses, so that its retransmit's report goes to the retransmit lane.
//! The memory held is a fixed amount per pending source and per remembered
//! address (see [`Scheduler::footprint`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
};

/// One in this many picks serves the fair lane first.
pub const FAIR_EVERY: u64 = 4;

/// A source's /24 (IPv4, IPv4-mapped IPv6) or /48 (IPv6), as the high
/// bits of its IPv6 (or IPv4-mapped) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(u128);

impl Prefix {
    pub fn of(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(a) => Prefix(u128::from(a.to_ipv6_mapped()) & !0xff),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Prefix::of(IpAddr::V4(v4)),
                None => Prefix(u128::from(a) & !((1u128 << 80) - 1)),
            },
        }
    }
}

/// The two lanes, served retransmit first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneId {
    Retransmit = 0,
    Fair = 1,
}

/// What [`Scheduler::submit`] did with a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Queued for a lookup (in the retransmit lane if it was turned away
    /// before).
    Queued(LaneId),
    /// It was waiting in the fair lane: moved to the retransmit lane.
    Promoted,
    /// Already in the retransmit lane or being looked up.
    Duplicate,
    /// No room: it stays unknown (and passes).
    TurnedAway,
}

/// What the scheduler did since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reports queued for a lookup.
    pub queued: u64,
    /// Reports of a source already waiting or being looked up.
    pub duplicate: u64,
    /// Reports turned away on arrival for lack of room.
    pub overflow: u64,
    /// Queued sources that gave their place to a newcomer of a shorter
    /// prefix queue or to a retransmitter.
    pub evicted: u64,
    /// Reports recognised as a retransmit (promoted, or back after being
    /// turned away).
    pub retransmits: u64,
}

/// Where a pending source is.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Queued {
        lane: LaneId,
        prefix: Prefix,
        seq: u64,
    },
    /// Handed out by [`Scheduler::pick`], not yet [`Scheduler::done`].
    Taken,
}

/// One prefix's waiting sources, oldest first (by arrival number).
struct PrefixQueue {
    /// Tells this queue from an earlier, removed one of the same prefix in
    /// the round-robin list.
    gen: u64,
    items: BTreeMap<u64, IpAddr>,
}

/// Sources waiting in one lane, one queue per prefix.
#[derive(Default)]
struct Lane {
    queues: HashMap<Prefix, PrefixQueue>,
    /// Round-robin order of the prefixes with a queue; an entry whose gen
    /// is not its prefix's queue's is left over from a removed queue and
    /// skipped (and compacted away before they outnumber the queues).
    turns: VecDeque<(Prefix, u64)>,
    /// Queue lengths, to find the longest.
    by_len: BTreeSet<(usize, Prefix)>,
    len: usize,
}

impl Lane {
    fn queue_len(&self, p: Prefix) -> usize {
        self.queues.get(&p).map_or(0, |q| q.items.len())
    }

    fn push(&mut self, p: Prefix, seq: u64, ip: IpAddr, gen: &mut u64) {
        let q = self.queues.entry(p).or_insert_with(|| {
            *gen += 1;
            self.turns.push_back((p, *gen));
            PrefixQueue { gen: *gen, items: BTreeMap::new() }
        });
        let old = q.items.len();
        q.items.insert(seq, ip);
        if old > 0 {
            self.by_len.remove(&(old, p));
        }
        self.by_len.insert((old + 1, p));
        self.len += 1;
    }

    /// Book-keeping after prefix `p`'s queue lost one of its `old` entries.
    fn shrunk(&mut self, p: Prefix, old: usize) {
        self.by_len.remove(&(old, p));
        self.len -= 1;
        if old > 1 {
            self.by_len.insert((old - 1, p));
        } else {
            self.queues.remove(&p);
            if self.turns.len() > 2 * self.queues.len() + 16 {
                let queues = &self.queues;
                self.turns.retain(|(p, g)| queues.get(p).is_some_and(|q| q.gen == *g));
            }
        }
    }

    fn remove(&mut self, p: Prefix, seq: u64) -> Option<IpAddr> {
        let q = self.queues.get_mut(&p)?;
        let ip = q.items.remove(&seq)?;
        let old = q.items.len() + 1;
        self.shrunk(p, old);
        Some(ip)
    }

    /// The oldest source of the prefix whose turn it is.
    fn pop(&mut self) -> Option<IpAddr> {
        while let Some((p, gen)) = self.turns.pop_front() {
            let Some(q) = self.queues.get_mut(&p).filter(|q| q.gen == gen) else { continue };
            let Some((_, ip)) = q.items.pop_first() else { continue };
            let left = q.items.len();
            if left > 0 {
                self.turns.push_back((p, gen));
            }
            self.shrunk(p, left + 1);
            return Some(ip);
        }
        None
    }

    /// Takes out the newest source of the longest prefix queue, if that
    /// queue holds more than `than` sources.
    fn evict_longest(&mut self, than: usize) -> Option<IpAddr> {
        let &(len, p) = self.by_len.last()?;
        if len <= than {
            return None;
        }
        let (_, ip) = self.queues.get_mut(&p)?.items.pop_last()?;
        self.shrunk(p, len);
        Some(ip)
    }
}

/// The lookup scheduler (see the module docs).
pub struct Scheduler {
    max_pending: usize,
    /// Indexed by [`LaneId`].
    lanes: [Lane; 2],
    /// Every source waiting or being looked up.
    pending: HashMap<IpAddr, Slot>,
    /// Sources recently turned away (a set, and its arrival order to
    /// forget the oldest; an address forgotten early is harmless).
    turned_away: HashSet<IpAddr>,
    turned_order: VecDeque<IpAddr>,
    seq: u64,
    gen: u64,
    picks: u64,
    counters: Counters,
}

/// Sizes of the scheduler's structures, for tests of its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub pending: usize,
    pub queued: usize,
    pub prefixes: usize,
    pub turns: usize,
    pub remembered: usize,
}

impl Scheduler {
    pub fn new(max_pending: usize) -> Scheduler {
        Scheduler {
            max_pending: max_pending.max(1),
            lanes: Default::default(),
            pending: HashMap::new(),
            turned_away: HashSet::new(),
            turned_order: VecDeque::new(),
            seq: 0,
            gen: 0,
            picks: 0,
            counters: Counters::default(),
        }
    }

    /// Takes a report of `ip` from the datapath.
    pub fn submit(&mut self, ip: IpAddr) -> Submitted {
        match self.pending.get(&ip).copied() {
            Some(Slot::Queued { lane: LaneId::Fair, prefix, seq }) => {
                // Reported again while waiting: a retransmitting sender.
                self.lanes[LaneId::Fair as usize].remove(prefix, seq);
                self.enqueue(LaneId::Retransmit, ip);
                self.counters.duplicate += 1;
                self.counters.retransmits += 1;
                return Submitted::Promoted;
            }
            Some(_) => {
                self.counters.duplicate += 1;
                return Submitted::Duplicate;
            }
            None => {}
        }
        let lane = if self.turned_away.remove(&ip) {
            self.counters.retransmits += 1;
            LaneId::Retransmit
        } else {
            LaneId::Fair
        };
        if self.pending.len() >= self.max_pending && !self.make_room(lane, Prefix::of(ip)) {
            self.counters.overflow += 1;
            self.remember(ip);
            return Submitted::TurnedAway;
        }
        self.enqueue(lane, ip);
        self.counters.queued += 1;
        Submitted::Queued(lane)
    }

    /// The next source to look up, if any waits; it stays pending (taken)
    /// until [`Scheduler::done`].
    pub fn pick(&mut self) -> Option<IpAddr> {
        let fair_turn = (self.picks + 1).is_multiple_of(FAIR_EVERY);
        let order = if fair_turn { [LaneId::Fair, LaneId::Retransmit] } else { [LaneId::Retransmit, LaneId::Fair] };
        let ip = order.iter().find_map(|l| self.lanes[*l as usize].pop())?;
        self.picks += 1;
        self.pending.insert(ip, Slot::Taken);
        Some(ip)
    }

    /// The lookup of `ip` has finished.
    pub fn done(&mut self, ip: IpAddr) {
        if matches!(self.pending.get(&ip), Some(Slot::Taken)) {
            self.pending.remove(&ip);
        }
    }

    /// Sources waiting (not yet taken).
    pub fn backlog(&self) -> usize {
        self.lanes.iter().map(|l| l.len).sum()
    }

    /// Sources waiting in the retransmit lane.
    pub fn retransmit_backlog(&self) -> usize {
        self.lanes[LaneId::Retransmit as usize].len
    }

    /// Sources waiting or being looked up.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Prefixes with sources waiting (in either lane).
    pub fn prefixes(&self) -> usize {
        let [r, f] = &self.lanes;
        f.queues.len() + r.queues.keys().filter(|p| !f.queues.contains_key(p)).count()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn footprint(&self) -> Footprint {
        Footprint {
            pending: self.pending.len(),
            queued: self.lanes.iter().map(|l| l.queues.values().map(|q| q.items.len()).sum::<usize>()).sum(),
            prefixes: self.lanes.iter().map(|l| l.queues.len()).sum(),
            turns: self.lanes.iter().map(|l| l.turns.len()).sum(),
            remembered: self.turned_order.len(),
        }
    }

    fn enqueue(&mut self, lane: LaneId, ip: IpAddr) {
        self.seq += 1;
        let prefix = Prefix::of(ip);
        self.lanes[lane as usize].push(prefix, self.seq, ip, &mut self.gen);
        self.pending.insert(ip, Slot::Queued { lane, prefix, seq: self.seq });
    }

    /// Evicts a waiting source for a newcomer to `lane` from `prefix`, by
    /// the rules in the module docs; false when the newcomer must go.
    fn make_room(&mut self, lane: LaneId, prefix: Prefix) -> bool {
        let [retr, fair] = &mut self.lanes;
        let victim = match lane {
            LaneId::Fair => fair.evict_longest(fair.queue_len(prefix) + 1),
            LaneId::Retransmit => fair.evict_longest(0).or_else(|| retr.evict_longest(retr.queue_len(prefix) + 1)),
        };
        let Some(ip) = victim else { return false };
        self.pending.remove(&ip);
        self.counters.evicted += 1;
        self.remember(ip);
        true
    }

    fn remember(&mut self, ip: IpAddr) {
        if self.turned_away.insert(ip) {
            self.turned_order.push_back(ip);
        }
        while self.turned_order.len() > self.max_pending {
            if let Some(old) = self.turned_order.pop_front() {
                self.turned_away.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    /// The `i`th source of 2001:db8:8000::/48 (one per /64).
    fn flood6(i: usize) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x8000, i as u16, (i >> 16) as u16, 0, 0, 1))
    }

    /// Picks until `want` comes out; how many picks that took (bounded).
    fn picks_until(s: &mut Scheduler, want: IpAddr, limit: usize) -> Option<usize> {
        for n in 1..=limit {
            let ip = s.pick()?;
            s.done(ip);
            if ip == want {
                return Some(n);
            }
        }
        None
    }

    #[test]
    fn prefixes_are_the_slash_24_and_the_slash_48() {
        assert_eq!(Prefix::of(v4("192.0.2.1")), Prefix::of(v4("192.0.2.254")));
        assert_ne!(Prefix::of(v4("192.0.2.1")), Prefix::of(v4("192.0.3.1")));
        assert_eq!(Prefix::of(v4("192.0.2.1")), Prefix::of("::ffff:192.0.2.9".parse().unwrap()));
        let a: IpAddr = "2001:db8:1:ffff::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1::2".parse().unwrap();
        let c: IpAddr = "2001:db8:2::1".parse().unwrap();
        assert_eq!(Prefix::of(a), Prefix::of(b));
        assert_ne!(Prefix::of(a), Prefix::of(c));
        // An IPv6 /48 never equals an IPv4 /24.
        assert_ne!(Prefix::of("::".parse().unwrap()), Prefix::of(v4("0.0.0.0")));
    }

    /// A flood of 100k sources from one /48 and of every address of one
    /// /24 fills the queue; one real source in another /24 arrives last and
    /// is served within the first few picks. A FIFO would have turned it
    /// away (the queue was full).
    #[test]
    fn a_real_source_is_served_within_a_few_picks_of_a_flood() {
        let mut s = Scheduler::new(1000);
        for i in 0..100_000 {
            s.submit(flood6(i));
            if i < 256 {
                s.submit(v4(&format!("198.51.100.{i}")));
            }
        }
        assert_eq!(s.pending(), 1000);
        let real = v4("203.0.113.7");
        assert_eq!(s.submit(real), Submitted::Queued(LaneId::Fair), "it takes a flood source's place");
        assert_eq!(s.pending(), 1000);
        let n = picks_until(&mut s, real, 1000).expect("the real source is served");
        assert!(n <= 3, "served at pick {n}: three prefixes take turns");
        let c = s.counters();
        assert!(c.overflow > 0 && c.evicted >= 1, "{c:?}");
    }

    /// Without a flood, sources of one prefix are served in arrival order
    /// and prefixes take turns.
    #[test]
    fn prefixes_take_turns_and_each_keeps_its_order() {
        let mut s = Scheduler::new(100);
        for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "198.51.100.1", "198.51.100.2"] {
            s.submit(v4(ip));
        }
        let order: Vec<IpAddr> = std::iter::from_fn(|| s.pick()).collect();
        let want: Vec<IpAddr> =
            ["192.0.2.1", "198.51.100.1", "192.0.2.2", "198.51.100.2", "192.0.2.3"].into_iter().map(v4).collect();
        assert_eq!(order, want);
        assert_eq!(s.backlog(), 0);
        assert_eq!(s.pending(), 5, "taken until done");
        for ip in order {
            s.done(ip);
        }
        assert_eq!(s.pending(), 0);
    }

    /// A source reported again while it waits jumps a flood spread over
    /// many prefixes (where fairness by prefix alone cannot help it), and so
    /// does one reported again after it was turned away.
    #[test]
    fn a_retransmitter_jumps_the_flood() {
        let mut s = Scheduler::new(500);
        // A spray: one source per /48, so every prefix queue holds one.
        let spray = |i: usize| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1));
        let real = v4("203.0.113.7");
        s.submit(real);
        for i in 0..600 {
            s.submit(spray(i));
        }
        assert_eq!(s.submit(real), Submitted::Promoted);
        assert_eq!(s.retransmit_backlog(), 1);
        assert_eq!(picks_until(&mut s, real, 10), Some(1), "first in line");
        s.submit(spray(600));

        // Turned away on arrival (the queue is full of single sources), then
        // reported again: it takes a first-time source's place at the front.
        let late = v4("192.0.2.9");
        assert_eq!(s.submit(late), Submitted::TurnedAway);
        assert_eq!(s.submit(late), Submitted::Queued(LaneId::Retransmit));
        assert_eq!(s.pending(), 500);
        assert_eq!(picks_until(&mut s, late, 10), Some(1));
        let c = s.counters();
        assert_eq!(c.retransmits, 2, "{c:?}");
        assert_eq!(c.queued + c.duplicate + c.overflow, 605, "every report counted once: {c:?}");
    }

    /// Retransmitters come first, but every FAIR_EVERYth pick is the fair
    /// lane's, so a lane full of fake retransmitters cannot starve it.
    #[test]
    fn the_fair_lane_gets_every_fourth_pick() {
        let mut s = Scheduler::new(1000);
        let first = v4("192.0.2.1");
        s.submit(first);
        for i in 0..100 {
            let ip = flood6(i);
            s.submit(ip);
            s.submit(ip);
        }
        assert_eq!(s.retransmit_backlog(), 100);
        assert_eq!(picks_until(&mut s, first, 100), Some(FAIR_EVERY as usize));
    }

    /// Whatever arrives, the scheduler's structures stay within their
    /// bounds: `max_pending` sources, as many prefixes, a round-robin list
    /// at most about twice that, `max_pending` remembered addresses.
    #[test]
    fn memory_stays_at_the_bound() {
        let max = 1000;
        let mut s = Scheduler::new(max);
        let mut taken = VecDeque::new();
        for i in 0..200_000usize {
            // A mix: one big /48, a spray over many /48s, repeats, and a
            // lookup served (and finished later) every tenth report.
            let ip = match i % 3 {
                0 => flood6(i),
                1 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, (i % 5000) as u16, 1, 0, 0, 0, (i % 7) as u16)),
                _ => v4(&format!("198.51.100.{}", i % 256)),
            };
            s.submit(ip);
            if i % 10 == 0 {
                if let Some(t) = s.pick() {
                    taken.push_back(t);
                }
                if taken.len() > 50 {
                    s.done(taken.pop_front().unwrap());
                }
            }
            let f = s.footprint();
            assert!(f.pending <= max, "{f:?} at {i}");
            assert!(f.queued <= max && f.queued == s.backlog(), "{f:?} at {i}");
            assert!(f.prefixes <= max, "{f:?} at {i}");
            assert!(f.turns <= 2 * f.prefixes + 32, "{f:?} at {i}");
            assert!(f.remembered <= max, "{f:?} at {i}");
        }
        let f = s.footprint();
        assert_eq!(f.pending, max, "the bound is used: {f:?}");
        let c = s.counters();
        assert_eq!(c.queued + c.duplicate + c.overflow, 200_000, "{c:?}");
        // Drained, nothing is left behind.
        while let Some(ip) = s.pick() {
            s.done(ip);
        }
        for ip in taken {
            s.done(ip);
        }
        let f = s.footprint();
        assert_eq!((f.pending, f.queued, f.prefixes), (0, 0, 0), "{f:?}");
    }
}
