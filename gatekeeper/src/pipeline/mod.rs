//! The pure parts of the agent's reverse-DNS pipeline: turning a lookup
//! into a verdict, bounding the DNS query rate, and learning dynamic
//! ranges. The agent wires these to the event ring, the resolver and the
//! datapath.
pub mod abuse;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use gatekeeper_common::SourceKey;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    classify::{Class, Classifier},
    config::{LearningConfig, PolicyConfig},
    dns::{DnsOutcome, Lookup},
    domain::{Action, VerdictReason},
};

/// What the policy made of a lookup: the outcome (a verdict reason) and
/// what the datapath does about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "DecisionWire", from = "DecisionWire")]
pub struct Decision {
    /// `no-ptr`, `fcrdns-fail`, `dynamic`, `generic`, `ok` or `tempfail`.
    pub outcome: VerdictReason,
    pub action: Action,
    /// How long the verdict lives.
    pub ttl: Duration,
    /// The classifier's reasons, for a confirmed name.
    pub reasons: Vec<String>,
}

impl Decision {
    /// The key its verdict for `ip` is written under: a drop reaches only
    /// the address (an IPv6 address's own key; one spoofed SYN must not
    /// block the rest of its /64), a pass the source's /64. `None` for a
    /// drop of an IPv6 address without a key of its own (interface id 0 or
    /// all ones): it is not written, the source stays unknown.
    pub fn key(&self, ip: std::net::IpAddr) -> Option<SourceKey> {
        match self.action {
            Action::Pass | Action::Ban => Some(SourceKey::from_ip(ip)),
            Action::Drop => {
                let key = SourceKey::host(ip);
                let v6 = matches!(ip, std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none());
                (!v6 || key.is_host_v6()).then_some(key)
            }
        }
    }
}

/// A decision as `check --json` shows it: the outcome by name and again as
/// the verdict's numeric reason, the action's code, the TTL in seconds.
#[derive(Serialize, Deserialize)]
struct DecisionWire {
    outcome: VerdictReason,
    #[serde(with = "crate::domain::by_code")]
    action: Action,
    #[serde(with = "crate::domain::by_code")]
    reason: VerdictReason,
    ttl: u64,
    reasons: Vec<String>,
}

impl From<Decision> for DecisionWire {
    fn from(d: Decision) -> Self {
        DecisionWire {
            outcome: d.outcome,
            action: d.action,
            reason: d.outcome,
            ttl: d.ttl.as_secs(),
            reasons: d.reasons,
        }
    }
}

impl From<DecisionWire> for Decision {
    fn from(w: DecisionWire) -> Self {
        Decision { outcome: w.outcome, action: w.action, ttl: Duration::from_secs(w.ttl), reasons: w.reasons }
    }
}

/// The verdict for a finished lookup. A temporary failure always passes,
/// with the short retry TTL: a DNS outage never blocks anyone.
pub fn decide(lookup: &Lookup, classifier: &Classifier, policy: &PolicyConfig) -> Decision {
    let ttl = lookup.ttl.unwrap_or(policy.ttl_min).clamp(policy.ttl_min, policy.ttl_max);
    let d = |outcome, action, reasons| Decision { outcome, action, ttl, reasons };
    match lookup.outcome {
        DnsOutcome::TempFail => Decision {
            outcome: VerdictReason::TempFail,
            action: Action::Pass,
            ttl: policy.tempfail_ttl,
            reasons: Vec::new(),
        },
        DnsOutcome::NoPtr => d(VerdictReason::NoPtr, policy.no_ptr, Vec::new()),
        DnsOutcome::FcrdnsFail => d(VerdictReason::FcrdnsFail, policy.fcrdns_fail, Vec::new()),
        DnsOutcome::Confirmed => {
            let name = lookup.confirmed.as_deref().unwrap_or_default();
            let c = classifier.classify(lookup.ip, name);
            let reasons = c.reasons.iter().map(|r| r.to_string()).collect();
            match c.class {
                Class::Dynamic => d(VerdictReason::Dynamic, policy.dynamic, reasons),
                Class::Generic => d(VerdictReason::Generic, policy.generic, reasons),
                Class::Named => d(VerdictReason::Ok, policy.ok, reasons),
            }
        }
    }
}

/// A token bucket over DNS queries: a lookup takes the most it could send
/// ([`query_cost`] of its worst case) before it starts and gets back what it
/// did not use, so queries never go out faster than `rate` per second,
/// whatever arrives and however slow the DNS server is.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> TokenBucket {
        let rate = rate.max(1) as f64;
        // A burst of a tenth of a second's worth (at least one).
        let burst = (rate / 10.0).max(1.0);
        TokenBucket { rate, burst, tokens: burst, last: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens if they are there; otherwise how long to wait.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= n.min(self.burst) {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n.min(self.burst) - self.tokens) / self.rate))
        }
    }

    /// Gives back `n` tokens taken up front but not used.
    pub fn refund(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.burst);
    }
}

/// hickory resends an unanswered UDP query every 333 ms at the least, at
/// most 3 sends per attempt (hickory-net's `retry`), which the bucket must
/// pay for too.
const RESEND_FLOOR: Duration = Duration::from_millis(333);
const SENDS_PER_ATTEMPT: u64 = 3;

/// An upper bound on the UDP queries a lookup sent: its PTR query and
/// `forward` forward queries. Each query is sent once per attempt used (a
/// further attempt only after a `timeout`), plus a resend per
/// [`RESEND_FLOOR`] of the lookup's `elapsed` time, and at most
/// [`SENDS_PER_ATTEMPT`] times per attempt. A prompt answer costs exactly
/// one per query.
pub fn query_cost(forward: usize, elapsed: Duration, attempts: usize, timeout: Duration) -> f64 {
    let used = (1 + (elapsed.as_millis() / timeout.as_millis().max(1)) as u64).min(attempts.max(1) as u64);
    let resends = (elapsed.as_millis() / RESEND_FLOOR.as_millis()) as u64;
    let per_query = (used + resends).min(SENDS_PER_ATTEMPT * used);
    ((1 + forward as u64) * per_query) as f64
}

/// A hostname with its numbers masked: `dsl-1-2-3-4.pool.isp.net` and
/// `dsl-1-2-3-9.pool.isp.net` share the shape `dsl-#-#-#-#.pool.isp.net`.
pub fn shape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_digits = false;
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c.to_ascii_lowercase());
            in_digits = false;
        }
    }
    out
}

/// The prefix a source's range would be learned at: IPv4 /24, IPv6 /48.
pub fn learning_prefix(ip: IpAddr) -> IpNet {
    let net = match ip {
        IpAddr::V4(_) => IpNet::new(ip, 24),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), 24),
            None => IpNet::new(ip, 48),
        },
    };
    net.expect("valid prefix length").trunc()
}

/// A range the learner wants denied.
#[derive(Clone, Debug, PartialEq)]
pub struct Learned {
    pub net: IpNet,
    pub shape: String,
    pub sources: usize,
}

/// What the learner forgot to stay within its bounds, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnerDropped {
    /// Prefixes forgotten (the one tracked longest) for `max_prefixes`.
    pub prefixes: u64,
    /// Shapes forgotten (a prefix's oldest) for `max_shapes`.
    pub shapes: u64,
}

/// One tracked prefix: its shapes in the order first seen, each with the
/// distinct sources seen under it (fewer than `min_sources`: a shape that
/// reaches it promotes the prefix, which is then forgotten).
struct Tracked {
    seq: u64,
    shapes: VecDeque<(String, Vec<SourceKey>)>,
}

/// Counts dynamic sources per (prefix, naming shape) and promotes a prefix
/// once `min_sources` distinct sources share a shape.
///
/// Memory is bounded, whatever the reverse zones answer: at most
/// `max_prefixes` prefixes (past it the one tracked longest is forgotten),
/// at most `max_shapes` shapes per prefix (past it the prefix's oldest shape
/// is forgotten) and fewer than `min_sources` sources per shape. Forgetting
/// only delays learning a range, which blocks nothing.
pub struct Learner {
    cfg: LearningConfig,
    seen: HashMap<IpNet, Tracked>,
    /// The tracked prefixes by the order they were first tracked in.
    order: BTreeMap<u64, IpNet>,
    next_seq: u64,
    dropped: LearnerDropped,
}

impl Learner {
    pub fn new(cfg: LearningConfig) -> Learner {
        Learner { cfg, seen: HashMap::new(), order: BTreeMap::new(), next_seq: 0, dropped: LearnerDropped::default() }
    }

    /// Records a source judged `dynamic` under `name`; returns the range to
    /// learn when this completes one.
    pub fn observe(&mut self, ip: IpAddr, name: &str) -> Option<Learned> {
        if !self.cfg.enabled {
            return None;
        }
        let net = learning_prefix(ip);
        let shape = shape(name);
        if !self.seen.contains_key(&net) {
            while self.seen.len() >= self.cfg.max_prefixes.max(1) {
                let Some((_, old)) = self.order.pop_first() else { break };
                self.seen.remove(&old);
                self.dropped.prefixes += 1;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.order.insert(seq, net);
            self.seen.insert(net, Tracked { seq, shapes: VecDeque::new() });
        }
        let t = self.seen.get_mut(&net).expect("tracked above");
        let at = match t.shapes.iter().position(|(s, _)| *s == shape) {
            Some(at) => at,
            None => {
                while t.shapes.len() >= self.cfg.max_shapes.max(1) {
                    t.shapes.pop_front();
                    self.dropped.shapes += 1;
                }
                t.shapes.push_back((shape, Vec::new()));
                t.shapes.len() - 1
            }
        };
        let (shape, sources) = &mut t.shapes[at];
        let key = SourceKey::from_ip(ip);
        if !sources.contains(&key) {
            sources.push(key);
        }
        if sources.len() >= self.cfg.min_sources as usize {
            let learned = Learned { net, shape: std::mem::take(shape), sources: sources.len() };
            let seq = t.seq;
            self.seen.remove(&net);
            self.order.remove(&seq);
            return Some(learned);
        }
        None
    }

    /// Prefixes tracked now.
    pub fn tracked(&self) -> usize {
        self.seen.len()
    }

    /// Shapes tracked now, over all prefixes.
    pub fn shapes(&self) -> usize {
        self.seen.values().map(|t| t.shapes.len()).sum()
    }

    /// What was forgotten to stay within the bounds.
    pub fn dropped(&self) -> LearnerDropped {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(outcome: DnsOutcome, name: Option<&str>, ttl: Option<u64>) -> Lookup {
        Lookup {
            ip: "198.51.100.7".parse().unwrap(),
            outcome,
            ptr_names: name.map(|n| vec![n.to_string()]).unwrap_or_default(),
            confirmed: name.map(str::to_string),
            ttl: ttl.map(Duration::from_secs),
            detail: String::new(),
        }
    }

    #[test]
    fn outcomes_map_to_the_default_policy() {
        let c = Classifier::default();
        let p = PolicyConfig::default();
        let d = decide(&lookup(DnsOutcome::NoPtr, None, Some(60)), &c, &p);
        assert_eq!(
            (d.outcome, d.action, d.outcome.code()),
            (VerdictReason::NoPtr, Action::Drop, VerdictReason::NoPtr.code())
        );
        assert_eq!(d.ttl, p.ttl_min, "short TTLs are clamped up");
        let d = decide(&lookup(DnsOutcome::FcrdnsFail, None, Some(1_000_000)), &c, &p);
        assert_eq!((d.outcome, d.action), (VerdictReason::FcrdnsFail, Action::Drop));
        assert_eq!(d.ttl, p.ttl_max, "long TTLs are clamped down");
        let d = decide(&lookup(DnsOutcome::Confirmed, Some("dsl-198-51-100-7.pool.example.net"), Some(3600)), &c, &p);
        assert_eq!((d.outcome, d.action, d.ttl), (VerdictReason::Dynamic, Action::Drop, Duration::from_secs(3600)));
        assert!(!d.reasons.is_empty());
        let d = decide(&lookup(DnsOutcome::Confirmed, Some("mail.example.org"), Some(3600)), &c, &p);
        assert_eq!((d.outcome, d.action), (VerdictReason::Ok, Action::Pass));
    }

    #[test]
    fn tempfail_always_passes_whatever_the_policy() {
        let c = Classifier::default();
        let p = PolicyConfig { no_ptr: Action::Drop, fcrdns_fail: Action::Drop, ..PolicyConfig::default() };
        let d = decide(&lookup(DnsOutcome::TempFail, None, None), &c, &p);
        assert_eq!((d.outcome, d.action, d.ttl), (VerdictReason::TempFail, Action::Pass, p.tempfail_ttl));
    }

    #[test]
    fn token_bucket_bounds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100);
        let mut started = 0;
        // Simulate 2 s in 1 ms steps with unbounded demand: each lookup
        // reserves 8 and uses 4.
        for ms in 0..2000u64 {
            let now = t0 + Duration::from_millis(ms);
            while b.take(8.0, now).is_ok() {
                b.refund(4.0, now);
                started += 1;
            }
        }
        let queries = started * 4;
        assert!(queries <= 100 * 2 + 10 + 4, "{queries} queries in 2 s at 100/s");
        assert!(queries >= 150, "the bucket must not starve: {queries}");
        assert!(b.take(8.0, t0 + Duration::from_millis(1999)).is_err(), "demand used the bucket up");
    }

    #[test]
    fn query_cost_bounds_resends() {
        let t = Duration::from_secs(2);
        // A prompt answer: one packet per query, whatever `attempts` allows.
        assert_eq!(query_cost(0, Duration::from_millis(5), 2, t), 1.0);
        assert_eq!(query_cost(3, Duration::from_millis(50), 2, t), 4.0);
        // A silent server: each query sent up to 3 times per attempt.
        assert_eq!(query_cost(0, Duration::from_secs(4), 2, t), 6.0);
        assert_eq!(query_cost(2, Duration::from_secs(60), 1, t), 9.0);
        // In between: one resend per 333 ms.
        assert_eq!(query_cost(0, Duration::from_millis(700), 1, t), 3.0);
    }

    #[test]
    fn a_drop_is_keyed_by_the_address_a_pass_by_the_64() {
        let d =
            |action| Decision { outcome: VerdictReason::NoPtr, action, ttl: Duration::from_secs(1), reasons: vec![] };
        let key = |action, ip: &str| d(action).key(ip.parse().unwrap()).map(|k| k.display());
        assert_eq!(key(Action::Drop, "2001:db8:1:2::25").as_deref(), Some("2001:db8:1:2::25"));
        assert_eq!(key(Action::Pass, "2001:db8:1:2::25").as_deref(), Some("2001:db8:1:2::/64"));
        assert_eq!(key(Action::Drop, "2001:db8:1:2::"), None, "interface id 0: not the /64");
        assert_eq!(key(Action::Drop, "2001:db8:1:2:ffff:ffff:ffff:ffff"), None);
        assert_eq!(key(Action::Drop, "192.0.2.7").as_deref(), Some("192.0.2.7"));
        assert_eq!(key(Action::Drop, "::ffff:192.0.2.7").as_deref(), Some("192.0.2.7"));
        assert_eq!(key(Action::Pass, "192.0.2.7").as_deref(), Some("192.0.2.7"));
    }

    #[test]
    fn shapes_mask_numbers() {
        assert_eq!(shape("dsl-1-2-3-4.pool.isp.net"), "dsl-#-#-#-#.pool.isp.net");
        assert_eq!(shape("DSL-10-20-30-40.Pool.ISP.net"), "dsl-#-#-#-#.pool.isp.net");
        assert_eq!(shape("c-73-12-5-9.hsd1.ca.comcast.net"), "c-#-#-#-#.hsd#.ca.comcast.net");
    }

    #[test]
    fn learner_promotes_a_prefix_after_min_sources_of_one_shape() {
        let mut l = Learner::new(LearningConfig { min_sources: 3, ..LearningConfig::default() });
        assert_eq!(l.observe("198.51.100.1".parse().unwrap(), "dsl-198-51-100-1.pool.example.net"), None);
        // Same source twice counts once; another shape does not add up.
        assert_eq!(l.observe("198.51.100.1".parse().unwrap(), "dsl-198-51-100-1.pool.example.net"), None);
        assert_eq!(l.observe("198.51.100.2".parse().unwrap(), "cable-2.other.example.net"), None);
        assert_eq!(l.observe("198.51.100.3".parse().unwrap(), "dsl-198-51-100-3.pool.example.net"), None);
        let got = l.observe("198.51.100.4".parse().unwrap(), "dsl-198-51-100-4.pool.example.net").unwrap();
        assert_eq!(got.net, "198.51.100.0/24".parse::<IpNet>().unwrap());
        assert_eq!(got.shape, "dsl-#-#-#-#.pool.example.net");
        assert_eq!(got.sources, 3);
        // IPv6 learns per /48.
        let mut l = Learner::new(LearningConfig { min_sources: 2, ..LearningConfig::default() });
        l.observe("2001:db8:5:1::1".parse().unwrap(), "dyn-1.v6.example.net");
        let got = l.observe("2001:db8:5:2::1".parse().unwrap(), "dyn-2.v6.example.net").unwrap();
        assert_eq!(got.net, "2001:db8:5::/48".parse::<IpNet>().unwrap());
    }

    #[test]
    fn learner_memory_is_bounded_and_can_be_off() {
        let mut l = Learner::new(LearningConfig { max_prefixes: 10, min_sources: 5, ..LearningConfig::default() });
        for i in 0..1000u32 {
            l.observe(IpAddr::V4((0xc000_0000 + (i << 8)).into()), "dyn-1.example.net");
        }
        assert!(l.tracked() <= 10);
        let mut off = Learner::new(LearningConfig { enabled: false, min_sources: 2, ..LearningConfig::default() });
        off.observe("198.51.100.1".parse().unwrap(), "dyn-1.example.net");
        assert_eq!(off.observe("198.51.100.2".parse().unwrap(), "dyn-2.example.net"), None);
    }
    /// A name of a shape of its own: letters, which `shape` keeps.
    fn odd_name(i: u32) -> String {
        let mut s = String::from("h");
        let mut n = i;
        loop {
            s.push((b'a' + (n % 26) as u8) as char);
            n /= 26;
            if n == 0 {
                break;
            }
        }
        s + ".hostile.example"
    }

    #[test]
    fn a_hostile_zone_keeps_shapes_per_prefix_at_the_bound() {
        let cfg = LearningConfig { min_sources: 3, max_shapes: 4, ..LearningConfig::default() };
        let mut l = Learner::new(cfg);
        // A real pool's shape, seen once, then a flood of names of shapes
        // of their own in the same /48.
        l.observe("2001:db8:7:1::1".parse().unwrap(), "dyn-1.pool.example.net");
        for i in 0..100_000u32 {
            let ip =
                IpAddr::V6(std::net::Ipv6Addr::from((0x2001_0db8_0007u128 << 80) | (u128::from(i & 0xffff) << 64)));
            assert_eq!(l.observe(ip, &odd_name(i)), None);
            assert!(l.shapes() <= 4, "at {i}: {} shapes", l.shapes());
        }
        assert_eq!((l.tracked(), l.shapes()), (1, 4), "one prefix, at the bound and staying there");
        assert_eq!(l.dropped(), LearnerDropped { prefixes: 0, shapes: 100_001 - 4 });
        // The oldest went first: the pool's shape is forgotten, so two more
        // of its hosts are not enough...
        l.observe("2001:db8:7:2::1".parse().unwrap(), "dyn-2.pool.example.net");
        assert_eq!(l.observe("2001:db8:7:3::1".parse().unwrap(), "dyn-3.pool.example.net"), None);
        // ...while the newest shapes survived: two more hosts of the last
        // one promote the prefix.
        l.observe("2001:db8:7:4::1".parse().unwrap(), &odd_name(99_999));
        let got = l.observe("2001:db8:7:5::1".parse().unwrap(), &odd_name(99_999)).unwrap();
        assert_eq!((got.net, got.sources), ("2001:db8:7::/48".parse().unwrap(), 3));
    }

    #[test]
    fn promoted_prefixes_leave_no_trace_and_eviction_takes_the_oldest() {
        let mut l = Learner::new(LearningConfig { min_sources: 2, max_prefixes: 2, ..LearningConfig::default() });
        for i in 0..100_000u32 {
            let net = 0xc000_0000 + (i << 8);
            l.observe(IpAddr::V4(net.into()), "dyn-1.example.net");
            assert!(l.observe(IpAddr::V4((net + 1).into()), "dyn-2.example.net").is_some());
        }
        assert_eq!((l.tracked(), l.order.len()), (0, 0), "promoted prefixes are no longer tracked");
        // P is promoted, then tracked again: it is now newer than Q, so R
        // pushes Q out, not P.
        let p = |h: u8| IpAddr::from([198, 51, 100, h]);
        let q: IpAddr = "203.0.113.1".parse().unwrap();
        let r: IpAddr = "192.0.2.1".parse().unwrap();
        let mut l = Learner::new(LearningConfig { min_sources: 2, max_prefixes: 2, ..LearningConfig::default() });
        l.observe(p(1), "dyn-1.example.net");
        l.observe(q, "dyn-1.example.org");
        assert!(l.observe(p(2), "dyn-2.example.net").is_some());
        l.observe(p(3), "dyn-3.example.net");
        l.observe(r, "dyn-1.example.com");
        assert_eq!(l.dropped().prefixes, 1);
        assert!(l.observe(p(4), "dyn-4.example.net").is_some(), "P's progress was kept");
        assert_eq!(l.observe("203.0.113.2".parse().unwrap(), "dyn-2.example.org"), None, "Q was forgotten");
    }
}
