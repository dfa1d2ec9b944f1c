//! The reverse-DNS pipeline: unknown-source events from the ring buffer go
//! into a bounded, deduplicated, fair queue (per /24 and /48, retransmitters
//! first); lookups run under the DNS rate limit and the in-flight cap, with
//! a shorter timeout while a backlog waits; each result is judged (policy, classifier, range
//! learner) and written through the state's verbs.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use gatekeeper_common::{Event, KeyWords};
use tokio::{
    io::unix::AsyncFd,
    sync::{Mutex, Notify, Semaphore},
};
use tracing::{debug, error, info};

use crate::{
    agent::{
        fair::{Scheduler, Submitted},
        state::State,
        Core,
    },
    classify::Classifier,
    config::{LearningConfig, LimitsConfig, PolicyConfig},
    dns::{DnsConfig, Lookup, Resolver},
    domain::VerdictReason,
    pipeline::{decide, query_cost, Decision, Learner, LearnerDropped, TokenBucket},
    status::QueueStats,
    store::VerdictRecord,
    time::unix_now,
    Result,
};

/// The queue between the event ring and the resolver: a fair scheduler
/// (see [`fair`](crate::agent::fair): round robin over /24s and /48s,
/// retransmitters first, at most `max_pending` sources waiting or being
/// looked up, each at most once). Its lock is held for a few map operations
/// and is never the state lock.
pub struct Queue {
    sched: std::sync::Mutex<Scheduler>,
    /// Woken when a source is queued.
    ready: Notify,
    /// Lookups run with the shorter timeout of a backlog.
    hurried: AtomicU64,
    /// Events read from the ring buffer.
    events: AtomicU64,
}

impl Queue {
    pub fn new(max_pending: usize) -> Arc<Queue> {
        Arc::new(Queue {
            sched: std::sync::Mutex::new(Scheduler::new(max_pending)),
            ready: Notify::new(),
            hurried: AtomicU64::new(0),
            events: AtomicU64::new(0),
        })
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a source for a lookup; false when it was already pending or
    /// there is no room (the source stays unknown and passes).
    fn submit(&self, ip: IpAddr) -> bool {
        let r = self.sched().submit(ip);
        match r {
            Submitted::Queued(_) | Submitted::Promoted => {
                self.ready.notify_one();
                true
            }
            Submitted::Duplicate | Submitted::TurnedAway => false,
        }
    }

    /// Waits until a source is queued; how many are.
    async fn wait_backlog(&self) -> usize {
        loop {
            let n = self.sched().backlog();
            if n > 0 {
                return n;
            }
            // A permit stored by a `notify_one` that came before this call
            // completes it at once: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    fn next(&self) -> Option<IpAddr> {
        self.sched().pick()
    }

    fn done(&self, ip: IpAddr) {
        self.sched().done(ip);
    }

    pub fn stats(&self) -> QueueStats {
        let s = self.sched();
        let c = s.counters();
        QueueStats {
            queued: c.queued,
            duplicate: c.duplicate,
            overflow: c.overflow,
            pending: s.pending(),
            waiting: s.backlog(),
            retransmit_lane: s.retransmit_backlog(),
            prefixes: s.prefixes(),
            evicted: c.evicted,
            turned_away: c.overflow + c.evicted,
            retransmits: c.retransmits,
            hurried: self.hurried.load(Ordering::Relaxed),
        }
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// The DNS settings of a lookup started while more sources wait than
/// lookups may run at once (`max_inflight`): a quarter of the configured
/// timeout, at least [`HURRIED_TIMEOUT_FLOOR`] (never more than the
/// configured one), and one attempt, so lame reverse zones do not hold every
/// in-flight slot. A timeout is `tempfail`, which always passes.
pub fn hurried(dns: &DnsConfig) -> DnsConfig {
    let timeout = (dns.timeout / 4).max(HURRIED_TIMEOUT_FLOOR).min(dns.timeout);
    DnsConfig { timeout, attempts: 1, ..dns.clone() }
}

/// The shortest timeout [`hurried`] gives.
pub const HURRIED_TIMEOUT_FLOOR: Duration = Duration::from_millis(300);

/// Turns lookups into verdicts and learned ranges, and counts outcomes.
pub struct Judge {
    classifier: Arc<Classifier>,
    policy: PolicyConfig,
    learner: Learner,
    learn_expire: Duration,
    /// Lookups finished, by outcome.
    pub outcomes: BTreeMap<VerdictReason, u64>,
    /// Ranges learned since start.
    pub learned: u64,
}

impl Judge {
    pub fn new(classifier: Arc<Classifier>, policy: PolicyConfig, learning: LearningConfig) -> Judge {
        let learn_expire = learning.expire;
        Judge {
            classifier,
            policy,
            learner: Learner::new(learning),
            learn_expire,
            outcomes: BTreeMap::new(),
            learned: 0,
        }
    }

    /// What the policy makes of a lookup (for `check` too).
    pub fn decide(&self, lookup: &Lookup) -> Decision {
        decide(lookup, &self.classifier, &self.policy)
    }

    pub fn tracked(&self) -> usize {
        self.learner.tracked()
    }

    /// Naming shapes the learner tracks.
    pub fn shapes(&self) -> usize {
        self.learner.shapes()
    }

    /// What the learner forgot to stay within its bounds.
    pub fn learner_dropped(&self) -> LearnerDropped {
        self.learner.dropped()
    }

    /// Writes the verdict a lookup calls for (never over a manual ban) and
    /// feeds dynamic sources to the range learner. A drop reaches only the
    /// address looked up (for IPv6 its own key, see
    /// [`State::drop_v6_prefix`] for the /64); a pass covers the /64.
    fn apply(&mut self, core: &mut State, lookup: &Lookup) -> Result<()> {
        let d = self.decide(lookup);
        *self.outcomes.entry(d.outcome).or_default() += 1;
        let Some(key) = d.key(lookup.ip) else {
            // Interface id 0 or all ones: no key of its own, and its drop
            // must not reach the /64.
            debug!(source = %lookup.ip, "no drop verdict for an IPv6 address with interface id 0 or all ones");
            return Ok(());
        };
        if !KeyWords::of(&key).is_key() {
            // ::/64 (unspecified or loopback, so spoofed) has the verdict
            // table's empty key: it can hold no verdict and stays unknown.
            debug!(source = %lookup.ip, "no verdict for a source in ::/64");
            return Ok(());
        }
        let now = unix_now();
        let name = lookup.confirmed.as_deref().or(lookup.ptr_names.first().map(String::as_str));
        let comment = verdict_comment(d.outcome, name, &d.reasons, &lookup.detail);
        let rec = VerdictRecord {
            key,
            action: d.action,
            reason: d.outcome,
            comment: Some(comment),
            created_at: now,
            expires_at: Some(now + d.ttl.as_secs() as i64),
        };
        if !core.judged(rec)? {
            return Ok(());
        }
        info!(source = %key.display(), outcome = %d.outcome, action = %d.action, ttl = d.ttl.as_secs(), "verdict");
        if key.is_host_v6() {
            if let Some(net) = core.drop_v6_prefix(key.net(), self.policy.v6_prefix_drop_after, now)? {
                info!(source = %net.key.display(), outcome = %net.reason, "verdict for the whole /64: {}", net.comment.as_deref().unwrap_or_default());
            }
        }
        if d.outcome == VerdictReason::Dynamic {
            if let Some(l) = self.learner.observe(lookup.ip, name.unwrap_or_default()) {
                if core.learn(&l, now + self.learn_expire.as_secs() as i64)? {
                    self.learned += 1;
                }
            }
        }
        Ok(())
    }
}

/// A verdict's comment: its outcome, the host name it was judged by and
/// why (`dynamic: dsl-1-2.example.net (ip-in-name)`), or what the lookup
/// found when there is no name (`no-ptr: ...`).
pub fn verdict_comment(outcome: VerdictReason, name: Option<&str>, reasons: &[String], detail: &str) -> String {
    match (name, reasons.is_empty()) {
        (Some(n), false) => format!("{outcome}: {n} ({})", reasons.join(",")),
        (Some(n), true) => format!("{outcome}: {n}; {detail}"),
        (None, _) => format!("{outcome}: {detail}"),
    }
}

/// The host name a verdict's comment (see [`verdict_comment`]) names, for
/// the outcomes that are judged by a name (the rejector's `{ptr}`).
pub fn comment_name(outcome: VerdictReason, comment: &str) -> Option<&str> {
    if !matches!(outcome, VerdictReason::FcrdnsFail | VerdictReason::Dynamic | VerdictReason::Generic) {
        return None;
    }
    let rest = comment.strip_prefix(outcome.as_str())?.strip_prefix(": ")?;
    let name = rest.split([' ', ';']).next()?;
    (!name.is_empty()).then_some(name)
}

/// Reads unknown-source events and queues their lookups; never waits on
/// the state lock.
pub async fn read_events(queue: Arc<Queue>, rb: aya::maps::RingBuf<aya::maps::MapData>, lookups_on: bool) {
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as the AsyncFd owns the RingBuf.
    let mut afd = match unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            error!(error = %std::io::Error::from(e), "cannot poll the event ring buffer; unknown sources will not be reported");
            return;
        }
    };
    loop {
        let mut guard = match afd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "event ring buffer");
                return;
            }
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Event`; read it unaligned.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            let ip = gatekeeper_common::addr::event_ip(ev.addr, ev.family);
            debug!(source = %ip, port = ev.port, ifindex = ev.ifindex, "unknown source");
            if lookups_on {
                queue.submit(ip);
            }
            queue.events.fetch_add(1, Ordering::Relaxed);
        }
        guard.clear_ready();
    }
}

/// Looks sources up at most `dns_rate` queries per second with at most
/// `max_inflight` lookups at once, and applies each result. The next source
/// is picked only once a permit and the DNS budget are there, so a source
/// that arrived meanwhile gets its fair turn; while more sources wait than
/// `max_inflight`, lookups run [`hurried`].
pub async fn run_lookups(
    core: Arc<Mutex<Core>>,
    queue: Arc<Queue>,
    resolver: Arc<Resolver>,
    limits: LimitsConfig,
    dns: DnsConfig,
) {
    let bucket = Arc::new(std::sync::Mutex::new(TokenBucket::new(limits.dns_rate)));
    let inflight = Arc::new(Semaphore::new(limits.max_inflight));
    let quick = hurried(&dns);
    let quick_resolver = if quick == dns {
        resolver.clone()
    } else {
        match Resolver::new(&quick) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                error!(error = %e.report(), "no resolver with the shorter timeout; a backlog is looked up with the configured one");
                resolver.clone()
            }
        }
    };
    // The most one lookup can send: every query resent to the limit.
    let reserve = |d: &DnsConfig| query_cost(d.max_names, Duration::from_secs(86_400), d.attempts, d.timeout);
    loop {
        let Ok(permit) = inflight.clone().acquire_owned().await else { return };
        let backlog = queue.wait_backlog().await;
        let (dns, resolver) = if backlog > limits.max_inflight {
            (quick.clone(), quick_resolver.clone())
        } else {
            (dns.clone(), resolver.clone())
        };
        let reserve = reserve(&dns);
        loop {
            let wait = bucket.lock().unwrap_or_else(|e| e.into_inner()).take(reserve, Instant::now());
            match wait {
                Ok(()) => break,
                Err(d) => tokio::time::sleep(d).await,
            }
        }
        let Some(ip) = queue.next() else {
            // Only this task takes sources out, so none went; but be safe.
            bucket.lock().unwrap_or_else(|e| e.into_inner()).refund(reserve, Instant::now());
            continue;
        };
        if backlog > limits.max_inflight {
            queue.hurried.fetch_add(1, Ordering::Relaxed);
        }
        let (core, queue, bucket) = (core.clone(), queue.clone(), bucket.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let lookup = resolver.lookup(ip).await;
            // Give back what the lookup did not send (resends included).
            let forward = lookup.ptr_names.len().min(dns.max_names);
            let cost = query_cost(forward, started.elapsed(), dns.attempts, dns.timeout);
            bucket.lock().unwrap_or_else(|e| e.into_inner()).refund(reserve - cost, Instant::now());
            let mut guard = core.lock().await;
            let Core { state, judge } = &mut *guard;
            if let Err(e) = tokio::task::block_in_place(|| judge.apply(state, &lookup)) {
                error!(source = %ip, error = %e.report(), "could not apply a lookup");
            }
            drop(guard);
            queue.done(ip);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hurried_lookups_take_a_quarter_of_the_timeout_and_one_attempt() {
        let base = DnsConfig { timeout: Duration::from_secs(4), attempts: 3, ..DnsConfig::default() };
        let h = hurried(&base);
        assert_eq!((h.timeout, h.attempts), (Duration::from_secs(1), 1));
        assert_eq!(h.servers, base.servers);
        assert_eq!(h.max_names, base.max_names);
        h.validate().unwrap();
        // The floor, but never longer than configured.
        let t = |ms| hurried(&DnsConfig { timeout: Duration::from_millis(ms), ..base.clone() }).timeout;
        assert_eq!(t(1000), HURRIED_TIMEOUT_FLOOR);
        assert_eq!(t(200), Duration::from_millis(200));
        // The budget a hurried lookup reserves is smaller.
        let reserve = |d: &DnsConfig| query_cost(d.max_names, Duration::from_secs(86_400), d.attempts, d.timeout);
        assert!(reserve(&h) < reserve(&base));
    }
}

#[cfg(test)]
mod comment_tests {
    use super::*;

    #[test]
    fn the_name_a_comment_holds_is_found_again() {
        let reasons = ["ip-in-name".to_string(), "dsl".to_string()];
        for (outcome, name, reasons) in [
            (VerdictReason::Dynamic, "dsl-1-2-3-4.pool.example.net", &reasons[..]),
            (VerdictReason::Generic, "host.example.org", &[][..]),
            (VerdictReason::FcrdnsFail, "relay.example.org", &[][..]),
        ] {
            let c = verdict_comment(outcome, Some(name), reasons, "A 192.0.2.99 only");
            assert_eq!(comment_name(outcome, &c), Some(name), "{c}");
        }
        let c = verdict_comment(VerdictReason::NoPtr, None, &[], "NXDOMAIN");
        assert_eq!(comment_name(VerdictReason::NoPtr, &c), None);
        assert_eq!(comment_name(VerdictReason::Dynamic, "no-ptr: x"), None, "another outcome's comment");
        assert_eq!(comment_name(VerdictReason::Dynamic, "dynamic: "), None);
    }
}
