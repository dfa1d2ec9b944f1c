//! Smarthost transmission limits: messages and recipients per subject (an
//! authenticated account, or the client address of unauthenticated relaying)
//! per hour and per 24 hours, counted in 24 hourly buckets
//! (`hour = now_ms / 3_600_000`). A message is counted when it is allowed.
//!
//! The counters are persisted as `(subject, kind, hour, n)` rows. The rows
//! [`SendLimits::take_dirty`] returns are *increments* since the last call,
//! meant for an UPSERT `n = n + excluded.n`, so several smarthosts sharing
//! one store count together; [`SendLimits::restore`] loads absolute values.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
};

use serde::{Deserialize, Serialize};

pub use crate::pipeline::abuse::Subject;
use crate::pipeline::abuse::{BoundedMap, Exempt};

/// Milliseconds per bucket.
pub const HOUR_MS: i64 = 3_600_000;
/// Buckets in the day window.
pub const HOURS: usize = 24;

/// Who a request's mail counts against: its SASL account, else its client
/// address. None without either.
pub fn subject_of(req: &super::protocol::PolicyRequest) -> Option<Subject> {
    match (req.sasl_username(), req.client_address()) {
        (Some(account), _) => Some(Subject::account(account)),
        (None, Some(ip)) => Some(Subject::addr(ip)),
        (None, None) => None,
    }
}

/// Limits of one subject; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub messages_hour: Option<u32>,
    pub messages_day: Option<u32>,
    pub recipients_hour: Option<u32>,
    pub recipients_day: Option<u32>,
}

impl Limits {
    /// No limit at all.
    pub const NONE: Limits =
        Limits { messages_hour: None, messages_day: None, recipients_hour: None, recipients_day: None };

    pub fn is_unlimited(&self) -> bool {
        *self == Limits::NONE
    }

    /// The config's and the CLI's text: `none`, or limits separated by
    /// commas or spaces, each `N/hour` or `N/day` (messages), or
    /// `N rcpt/hour`, `N rcpt/day` (recipients): `"100/hour, 500/day"`.
    pub fn parse(text: &str) -> Result<Limits, String> {
        if text.trim().eq_ignore_ascii_case("none") {
            return Ok(Limits::NONE);
        }
        let mut out = Limits::NONE;
        let mut words = text.split([',', ' ']).filter(|w| !w.is_empty()).peekable();
        let mut any = false;
        while let Some(w) = words.next() {
            let bad =
                || format!("invalid limit {w:?} in {text:?} (expected N/hour, N/day, N rcpt/hour, N rcpt/day or none)");
            let (n, per, rcpt) = match w.split_once('/') {
                Some((n, per)) => (n, per, false),
                None => match (w.parse::<u32>(), words.next().and_then(|r| r.strip_prefix("rcpt/"))) {
                    (Ok(_), Some(per)) => (w, per, true),
                    _ => return Err(bad()),
                },
            };
            let n: u32 = n.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?;
            let slot = match (per, rcpt) {
                ("hour" | "h", false) => &mut out.messages_hour,
                ("day" | "d", false) => &mut out.messages_day,
                ("hour" | "h", true) => &mut out.recipients_hour,
                ("day" | "d", true) => &mut out.recipients_day,
                _ => return Err(bad()),
            };
            if slot.replace(n).is_some() {
                return Err(format!("{text:?} gives the same limit twice"));
            }
            any = true;
        }
        if !any {
            return Err("no limit given (use \"none\" for no limit)".into());
        }
        Ok(out)
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("none");
        }
        let parts: Vec<String> = [
            self.messages_hour.map(|n| format!("{n}/hour")),
            self.messages_day.map(|n| format!("{n}/day")),
            self.recipients_hour.map(|n| format!("{n} rcpt/hour")),
            self.recipients_day.map(|n| format!("{n} rcpt/day")),
        ]
        .into_iter()
        .flatten()
        .collect();
        f.write_str(&parts.join(", "))
    }
}

impl Default for SendLimitsConfig {
    fn default() -> Self {
        SendLimitsConfig {
            default: Limits {
                messages_hour: Some(100),
                messages_day: Some(500),
                recipients_hour: None,
                recipients_day: None,
            },
            groups: BTreeMap::new(),
            members: HashMap::new(),
            exempt: Exempt::default(),
            contact: String::new(),
            max_subjects: 100_000,
        }
    }
}

/// How limits are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SendLimitsConfig {
    /// For subjects without an override or group.
    pub default: Limits,
    /// Named groups.
    pub groups: BTreeMap<String, Limits>,
    /// Subject → group name.
    pub members: HashMap<Subject, String>,
    /// Never limited, never counted.
    pub exempt: Exempt,
    /// Put after `; contact ` in refusals (omitted when empty).
    pub contact: String,
    pub max_subjects: usize,
}

/// What to do with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refuse for now: `text` is `sending limit reached (...); contact C`.
    Defer {
        text: String,
    },
}

impl Decision {
    /// The policy reply: `DEFER_IF_PERMIT 4.7.1 <text>` or `DUNNO`.
    pub fn reply(&self) -> super::protocol::Reply {
        match self {
            Decision::Allow => super::protocol::Reply::Dunno,
            Decision::Defer { text } => super::protocol::Reply::DeferIfPermit(format!("4.7.1 {text}")),
        }
    }
}

/// What a counter row counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CounterKind {
    Msg,
    Rcpt,
}

impl CounterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CounterKind::Msg => "msg",
            CounterKind::Rcpt => "rcpt",
        }
    }
}

impl fmt::Display for CounterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CounterKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "msg" => Ok(CounterKind::Msg),
            "rcpt" => Ok(CounterKind::Rcpt),
            _ => Err(crate::Error::InvalidInput(format!("invalid counter kind {s:?}: expected msg or rcpt"))),
        }
    }
}

/// One persisted counter: `n` of `kind` in `hour` (ms / 3,600,000).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRow {
    pub subject: Subject,
    pub kind: CounterKind,
    pub hour: i64,
    pub n: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    hour: i64,
    msgs: u64,
    rcpts: u64,
}

/// A subject's usage now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub messages_hour: u64,
    pub messages_day: u64,
    pub recipients_hour: u64,
    pub recipients_day: u64,
}

#[derive(Clone, Debug, Default)]
struct Counters {
    /// Indexed by hour % 24; a bucket of another hour is stale.
    buckets: [Bucket; HOURS],
}

impl Counters {
    fn usage(&self, hour: i64) -> Usage {
        let mut u = Usage::default();
        for b in &self.buckets {
            if b.hour <= hour && b.hour > hour - HOURS as i64 {
                u.messages_day += b.msgs;
                u.recipients_day += b.rcpts;
                if b.hour == hour {
                    u.messages_hour += b.msgs;
                    u.recipients_hour += b.rcpts;
                }
            }
        }
        u
    }

    fn bucket(&mut self, hour: i64) -> Option<&mut Bucket> {
        let b = &mut self.buckets[hour.rem_euclid(HOURS as i64) as usize];
        if b.hour > hour {
            return None; // an older hour than the one stored: too late to count
        }
        if b.hour != hour {
            *b = Bucket { hour, msgs: 0, rcpts: 0 };
        }
        Some(b)
    }

    fn empty_at(&self, hour: i64) -> bool {
        self.buckets.iter().all(|b| b.hour <= hour - HOURS as i64 || (b.msgs == 0 && b.rcpts == 0))
    }
}

/// Per-subject counters and limits.
pub struct SendLimits {
    cfg: SendLimitsConfig,
    overrides: HashMap<Subject, Limits>,
    counters: BoundedMap<Subject, Counters>,
    /// Increments not yet taken: (subject, kind, hour) → n.
    dirty: HashMap<(Subject, CounterKind, i64), u64>,
}

impl SendLimits {
    pub fn new(cfg: SendLimitsConfig) -> Self {
        SendLimits {
            counters: BoundedMap::new(cfg.max_subjects),
            cfg,
            overrides: HashMap::new(),
            dirty: HashMap::new(),
        }
    }

    /// Subjects with something counted (for `limit list`).
    pub fn counted_subjects(&self) -> Vec<Subject> {
        self.counters.iter().map(|(s, _)| s.clone()).collect()
    }

    pub fn config(&self) -> &SendLimitsConfig {
        &self.cfg
    }

    /// For live changes of the default, groups, members and exemptions
    /// (counters are kept).
    pub fn config_mut(&mut self) -> &mut SendLimitsConfig {
        &mut self.cfg
    }

    /// Sets (Some) or removes (None) a subject's own limits
    /// ([`Limits::NONE`]: no limit).
    pub fn set_override(&mut self, subject: Subject, limits: Option<Limits>) {
        match limits {
            Some(l) => self.overrides.insert(subject, l),
            None => self.overrides.remove(&subject),
        };
    }

    pub fn overrides(&self) -> impl Iterator<Item = (&Subject, &Limits)> {
        self.overrides.iter()
    }

    /// The limits that apply: the subject's own, else its group's, else the
    /// default. None for an exempt subject.
    pub fn limits_for(&self, subject: &Subject, client: Option<std::net::IpAddr>) -> Option<Limits> {
        if self.cfg.exempt.covers(subject, client) {
            return None;
        }
        if let Some(l) = self.overrides.get(subject) {
            return Some(*l);
        }
        let group = self.cfg.members.get(subject).and_then(|g| self.cfg.groups.get(g));
        Some(group.copied().unwrap_or(self.cfg.default))
    }

    /// A subject's usage at `now_ms`.
    pub fn usage(&self, subject: &Subject, now_ms: i64) -> Usage {
        self.counters.get(subject).map(|c| c.usage(now_ms.div_euclid(HOUR_MS))).unwrap_or_default()
    }

    /// A message with `recipients` accepted recipients at DATA, from
    /// `client` (checked against the exempt addresses too). Counted only
    /// when allowed; exempt subjects are neither limited nor counted.
    pub fn check_data(
        &mut self,
        subject: &Subject,
        client: Option<std::net::IpAddr>,
        recipients: u32,
        now_ms: i64,
    ) -> Decision {
        let Some(limits) = self.limits_for(subject, client) else { return Decision::Allow };
        let hour = now_ms.div_euclid(HOUR_MS);
        let u = self.usage(subject, now_ms);
        let r = u64::from(recipients);
        let over = |used: u64, add: u64, limit: Option<u32>| limit.is_some_and(|l| used + add > u64::from(l));
        let refusal = if over(u.messages_day, 1, limits.messages_day) {
            Some(format!("{} messages in 24h", u.messages_day))
        } else if over(u.messages_hour, 1, limits.messages_hour) {
            Some(format!("{} messages in the last hour", u.messages_hour))
        } else if over(u.recipients_day, r, limits.recipients_day) {
            Some(format!("{} recipients in 24h", u.recipients_day))
        } else if over(u.recipients_hour, r, limits.recipients_hour) {
            Some(format!("{} recipients in the last hour", u.recipients_hour))
        } else {
            None
        };
        if let Some(what) = refusal {
            let contact =
                if self.cfg.contact.is_empty() { String::new() } else { format!("; contact {}", self.cfg.contact) };
            return Decision::Defer { text: format!("sending limit reached ({what}){contact}") };
        }
        self.count(subject, hour, 1, r);
        Decision::Allow
    }

    fn count(&mut self, subject: &Subject, hour: i64, msgs: u64, rcpts: u64) {
        if self.counters.get(subject).is_none() {
            self.counters.insert(subject.clone(), Counters::default());
        }
        let counters = self.counters.get_mut(subject).expect("present");
        let Some(b) = counters.bucket(hour) else { return };
        b.msgs += msgs;
        b.rcpts += rcpts;
        *self.dirty.entry((subject.clone(), CounterKind::Msg, hour)).or_default() += msgs;
        if rcpts > 0 {
            *self.dirty.entry((subject.clone(), CounterKind::Rcpt, hour)).or_default() += rcpts;
        }
    }

    /// Increments since the last call (add them to the stored rows).
    pub fn take_dirty(&mut self) -> Vec<CounterRow> {
        let mut rows: Vec<CounterRow> =
            self.dirty.drain().map(|((subject, kind, hour), n)| CounterRow { subject, kind, hour, n }).collect();
        rows.sort_by(|a, b| (&a.subject, a.kind, a.hour).cmp(&(&b.subject, b.kind, b.hour)));
        rows
    }

    /// Loads stored rows (absolute values; rows older than 24 hours before
    /// `now_ms` are skipped). Not marked dirty.
    pub fn restore(&mut self, rows: impl IntoIterator<Item = CounterRow>, now_ms: i64) {
        let hour = now_ms.div_euclid(HOUR_MS);
        for row in rows {
            if row.hour <= hour - HOURS as i64 || row.hour > hour {
                continue;
            }
            if self.counters.get(&row.subject).is_none() {
                self.counters.insert(row.subject.clone(), Counters::default());
            }
            let c = self.counters.get_mut(&row.subject).expect("present");
            if let Some(b) = c.bucket(row.hour) {
                match row.kind {
                    CounterKind::Msg => b.msgs = row.n,
                    CounterKind::Rcpt => b.rcpts = row.n,
                }
            }
        }
    }

    /// Drops subjects with nothing counted in the last 24 hours; returns how
    /// many. Stored rows with `hour <= now_ms / HOUR_MS - 24` can go too.
    pub fn prune(&mut self, now_ms: i64) -> usize {
        let hour = now_ms.div_euclid(HOUR_MS);
        self.counters.retain(|_, c| !c.empty_at(hour)).len()
    }
}

#[cfg(test)]
mod tests;
