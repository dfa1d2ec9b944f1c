//! What sources do, scored from their log events (pure, in memory, time
//! passed in as `now_ms`, unix milliseconds of the line):
//!
//! - [`AbuseScores`]: a leaky bucket per source (IPv4 /32, IPv6 /64). A
//!   connection adds `connection_weight`, a failed login `auth_failure_weight`
//!   per attempt; reaching `threshold` is an [`Offence`] with an escalating
//!   ban. While banned, a source's events are ignored (blackhole).
//! - [`MailStream`]: distinct undeliverable recipients per hour per
//!   [`Subject`] (an authenticated account, or the client address of
//!   unauthenticated mail), with the queue-id and policy-request joins; over
//!   the threshold a [`Suspend`].
//!
//! Both keep bounded tables (least recently used out) and report the rows
//! they changed (`take_dirty`) so the agent persists only those, and take
//! them back with `restore`.
use std::{
    borrow::Borrow,
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use gatekeeper_common::SourceKey;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::logs::{Count, DeliveryStatus, Event};

// ---------------------------------------------------------------------------
// A bounded map, least recently used out.

/// A map of at most `cap` entries; inserting into a full map evicts the
/// entry used least recently (`get_mut` and `insert` count as use).
pub(crate) struct BoundedMap<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Use order; stale pairs (an older generation) are skipped lazily.
    order: VecDeque<(K, u64)>,
    next: u64,
    cap: usize,
}

impl<K: Clone + Eq + Hash, V> BoundedMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        BoundedMap { map: HashMap::new(), order: VecDeque::new(), next: 0, cap: cap.max(1) }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(k).map(|(v, _)| v)
    }

    /// The entry, marked as used.
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let generation = self.next;
        let slot = self.map.get_mut(k)?;
        slot.1 = generation;
        self.next += 1;
        self.order.push_back((k.clone(), generation));
        self.compact();
        self.map.get_mut(k).map(|(v, _)| v)
    }

    /// Inserts or replaces; returns the entry evicted to make room.
    pub(crate) fn insert(&mut self, k: K, v: V) -> Option<(K, V)> {
        let evicted = if !self.map.contains_key(&k) && self.map.len() >= self.cap { self.evict_oldest() } else { None };
        let generation = self.next;
        self.next += 1;
        self.map.insert(k.clone(), (v, generation));
        self.order.push_back((k, generation));
        self.compact();
        evicted
    }

    pub(crate) fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(k).map(|(v, _)| v)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }

    /// Removes the entries `keep` refuses; returns their keys.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) -> Vec<K> {
        let mut gone = Vec::new();
        self.map.retain(|k, (v, _)| {
            let kept = keep(k, v);
            if !kept {
                gone.push(k.clone());
            }
            kept
        });
        self.compact();
        gone
    }

    fn evict_oldest(&mut self) -> Option<(K, V)> {
        while let Some((k, generation)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|(_, g)| *g == generation) {
                return self.map.remove(&k).map(|(v, _)| (k, v));
            }
        }
        None
    }

    fn compact(&mut self) {
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(k, g)| map.get(k).is_some_and(|(_, live)| live == g));
        }
    }
}

/// A changed row for the store: write it, or delete the row of that key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change<R, K> {
    Upsert(R),
    Delete(K),
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// Abuse scores.

/// The key a source is scored under: an IPv4 address, or an IPv6 address's
/// /64 (low 64 bits zero). `::ffff:a.b.c.d` is IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbuseKey {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl AbuseKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => AbuseKey::V4(a),
            IpAddr::V6(a) => AbuseKey::V6(Ipv6Addr::from(u128::from(a) & (u128::MAX << 64))),
        }
    }

    /// The network it stands for (/32 or /64).
    pub fn net(&self) -> IpNet {
        match *self {
            AbuseKey::V4(a) => IpNet::new(IpAddr::V4(a), 32).expect("32 is a valid prefix"),
            AbuseKey::V6(a) => IpNet::new(IpAddr::V6(a), 64).expect("64 is a valid prefix"),
        }
    }

    /// The address (or first address of the /64).
    pub fn ip(&self) -> IpAddr {
        match *self {
            AbuseKey::V4(a) => IpAddr::V4(a),
            AbuseKey::V6(a) => IpAddr::V6(a),
        }
    }

    /// The datapath key of its ban (same /32 or /64).
    pub fn source_key(&self) -> SourceKey {
        SourceKey::from_ip(self.ip())
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        AbuseKey::of(ip) == *self
    }
}

impl fmt::Display for AbuseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbuseKey::V4(a) => write!(f, "{a}"),
            AbuseKey::V6(a) => write!(f, "{a}/64"),
        }
    }
}

impl FromStr for AbuseKey {
    type Err = crate::Error;
    /// An address (any address of an IPv6 /64 names it) or the key as shown
    /// (`192.0.2.1`, `192.0.2.1/32`, `2001:db8::/64`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = |reason: &str| crate::Error::InvalidInput(format!("invalid source {s:?}: {reason}"));
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let ip: IpAddr =
            addr.parse().map_err(|_| bad("expected an IP address, e.g. 192.0.2.1 or 2001:db8:1:2::/64"))?;
        let key = AbuseKey::of(ip);
        match (prefix, key) {
            (None, _) | (Some("32"), AbuseKey::V4(_)) => Ok(key),
            (Some("64"), AbuseKey::V6(_)) if key.ip() == ip => Ok(key),
            (Some("64"), AbuseKey::V6(_)) => Err(bad("host bits set in a /64")),
            _ => Err(bad("sources are IPv4 /32 or IPv6 /64")),
        }
    }
}

impl Serialize for AbuseKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AbuseKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a source was banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffenceReason {
    /// At least one failed login counted in the score.
    AuthAbuse,
    /// Connections alone.
    ConnRate,
}

impl OffenceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            OffenceReason::AuthAbuse => "auth-abuse",
            OffenceReason::ConnRate => "conn-rate",
        }
    }
}

/// How scores are kept.
#[derive(Clone, Debug, PartialEq)]
pub struct AbuseConfig {
    pub connection_weight: u32,
    pub auth_failure_weight: u32,
    /// A score reaching this is an offence.
    pub threshold: u32,
    /// `leak_points` leak away every `leak_period` (zero period: no leak).
    pub leak_points: u32,
    pub leak_period: Duration,
    /// Ban length of the 1st, 2nd, ... offence; the last one repeats.
    pub bans: Vec<Duration>,
    /// Offences are forgotten this long after the last ban ended.
    pub forget_after: Duration,
    /// A session's dedup entry is dropped after this long without lines.
    pub session_ttl: Duration,
    pub max_sources: usize,
    pub max_sessions: usize,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            connection_weight: 1,
            auth_failure_weight: 15,
            threshold: 100,
            leak_points: 1,
            leak_period: Duration::from_secs(10),
            bans: [15 * 60, 3600, 6 * 3600, 86_400].map(Duration::from_secs).to_vec(),
            forget_after: Duration::from_secs(7 * 86_400),
            session_ttl: Duration::from_secs(3600),
            max_sources: 100_000,
            max_sessions: 100_000,
        }
    }
}

/// A source's state, as `abuse list` shows it and the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbuseRow {
    pub key: AbuseKey,
    /// The bucket's level at `at_ms`.
    pub score: f64,
    pub at_ms: i64,
    /// Failed attempts and connections in the bucket since it was last
    /// empty (or since the last offence).
    pub failures: u64,
    pub connections: u64,
    /// Offences not yet forgotten.
    pub offences: u32,
    pub last_offence_ms: Option<i64>,
    /// End of the last ban (in the past once it is over).
    pub banned_until_ms: Option<i64>,
}

impl AbuseRow {
    fn new(key: AbuseKey, now_ms: i64) -> Self {
        AbuseRow {
            key,
            score: 0.0,
            at_ms: now_ms,
            failures: 0,
            connections: 0,
            offences: 0,
            last_offence_ms: None,
            banned_until_ms: None,
        }
    }

    pub fn banned(&self, now_ms: i64) -> bool {
        self.banned_until_ms.is_some_and(|until| now_ms < until)
    }
}

/// The dedup state of one session (connection) of a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub client: IpAddr,
    pub session: String,
    /// Sum of `Count::Add`.
    pub added: u32,
    /// Highest `Count::AtLeast`.
    pub floor: u32,
    pub at_ms: i64,
}

#[derive(Clone, Copy, Debug)]
struct SessionState {
    added: u32,
    floor: u32,
    at_ms: i64,
}

/// A source crossed the threshold: ban it for `ban_for`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offence {
    pub key: AbuseKey,
    pub reason: OffenceReason,
    /// The score that crossed the threshold.
    pub score: f64,
    pub failures: u64,
    pub connections: u64,
    #[serde(with = "duration_secs")]
    pub ban_for: Duration,
    /// 1 for a first offence (since offences were last forgotten).
    pub offence_no: u32,
    pub until_ms: i64,
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// What changed since the last `take_dirty`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AbuseDirty {
    pub sources: Vec<Change<AbuseRow, AbuseKey>>,
    pub sessions: Vec<Change<SessionRow, (IpAddr, String)>>,
}

impl AbuseDirty {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.sessions.is_empty()
    }
}

/// Longest session id kept (longer ones are cut).
pub const MAX_SESSION_LEN: usize = 128;

type SessionKey = (IpAddr, String);

/// Leaky-bucket scores per source, with session dedup and escalating bans.
pub struct AbuseScores {
    cfg: AbuseConfig,
    sources: BoundedMap<AbuseKey, AbuseRow>,
    sessions: BoundedMap<SessionKey, SessionState>,
    dirty_sources: HashSet<AbuseKey>,
    dirty_sessions: HashSet<SessionKey>,
}

impl AbuseScores {
    pub fn new(cfg: AbuseConfig) -> Self {
        AbuseScores {
            sources: BoundedMap::new(cfg.max_sources),
            sessions: BoundedMap::new(cfg.max_sessions),
            cfg,
            dirty_sources: HashSet::new(),
            dirty_sessions: HashSet::new(),
        }
    }

    pub fn config(&self) -> &AbuseConfig {
        &self.cfg
    }

    /// Scores one event (`Connect` and `AuthFail`; others are no-ops).
    pub fn apply(&mut self, event: &Event, now_ms: i64) -> Option<Offence> {
        match event {
            Event::Connect { client, .. } => self.connection(*client, now_ms),
            Event::AuthFail { client, session, count, .. } => {
                self.auth_failure(*client, session.as_deref(), *count, now_ms)
            }
            _ => None,
        }
    }

    /// A connection from `client`.
    pub fn connection(&mut self, client: IpAddr, now_ms: i64) -> Option<Offence> {
        self.add(client, f64::from(self.cfg.connection_weight), 0, 1, now_ms)
    }

    /// Failed logins from `client`. With a session, only what raises the
    /// session's total counts: a session's failures are `max(sum of Add,
    /// highest AtLeast)`.
    pub fn auth_failure(
        &mut self,
        client: IpAddr,
        session: Option<&str>,
        count: Count,
        now_ms: i64,
    ) -> Option<Offence> {
        let n = match session {
            None => match count {
                Count::Add(n) | Count::AtLeast(n) => n,
            },
            Some(s) => self.session_increase(client.to_canonical(), truncate(s, MAX_SESSION_LEN), count, now_ms),
        };
        if n == 0 {
            return None;
        }
        let points = f64::from(self.cfg.auth_failure_weight) * f64::from(n);
        self.add(client, points, u64::from(n), 0, now_ms)
    }

    fn session_increase(&mut self, client: IpAddr, session: &str, count: Count, now_ms: i64) -> u32 {
        let key: SessionKey = (client, session.to_string());
        let ttl = ms(self.cfg.session_ttl);
        let live = self.sessions.get(&key).is_some_and(|s| now_ms.saturating_sub(s.at_ms) <= ttl);
        if !live {
            let fresh = SessionState { added: 0, floor: 0, at_ms: now_ms };
            if let Some((gone, _)) = self.sessions.insert(key.clone(), fresh) {
                self.dirty_sessions.insert(gone);
            }
        }
        let state = self.sessions.get_mut(&key).expect("present");
        let before = state.added.max(state.floor);
        match count {
            Count::Add(n) => state.added = state.added.saturating_add(n),
            Count::AtLeast(n) => state.floor = state.floor.max(n),
        }
        state.at_ms = state.at_ms.max(now_ms);
        let after = state.added.max(state.floor);
        self.dirty_sessions.insert(key);
        after - before
    }

    /// Brings a row to `now_ms`: ban over, leak, offences forgotten.
    fn refresh(cfg: &AbuseConfig, row: &mut AbuseRow, now_ms: i64) {
        if now_ms > row.at_ms {
            let period = ms(cfg.leak_period);
            if period > 0 {
                let leaked = (now_ms - row.at_ms) as f64 * f64::from(cfg.leak_points) / period as f64;
                row.score = (row.score - leaked).max(0.0);
            }
            row.at_ms = now_ms;
            if row.score == 0.0 {
                row.failures = 0;
                row.connections = 0;
            }
        }
        if row.offences > 0 {
            let clean_since = row.banned_until_ms.or(row.last_offence_ms).unwrap_or(row.at_ms);
            if now_ms.saturating_sub(clean_since) >= ms(cfg.forget_after) {
                row.offences = 0;
            }
        }
    }

    fn add(&mut self, client: IpAddr, points: f64, failures: u64, connections: u64, now_ms: i64) -> Option<Offence> {
        let key = AbuseKey::of(client);
        if self.sources.get(&key).is_none() {
            if let Some((gone, _)) = self.sources.insert(key, AbuseRow::new(key, now_ms)) {
                self.dirty_sources.insert(gone);
            }
        }
        let cfg = &self.cfg;
        let row = self.sources.get_mut(&key).expect("present");
        if row.banned(now_ms) {
            // Blackhole: a banned source's lines neither add nor re-ban.
            return None;
        }
        Self::after_ban(row, now_ms);
        Self::refresh(cfg, row, now_ms);
        row.score += points;
        row.failures += failures;
        row.connections += connections;
        self.dirty_sources.insert(key);
        if row.score < f64::from(cfg.threshold) {
            return None;
        }
        row.offences = row.offences.saturating_add(1);
        let ban_for = cfg
            .bans
            .get((row.offences as usize - 1).min(cfg.bans.len().saturating_sub(1)))
            .copied()
            .unwrap_or(Duration::from_secs(15 * 60));
        let until_ms = now_ms.saturating_add(ms(ban_for));
        let offence = Offence {
            key,
            reason: if row.failures > 0 { OffenceReason::AuthAbuse } else { OffenceReason::ConnRate },
            score: row.score,
            failures: row.failures,
            connections: row.connections,
            ban_for,
            offence_no: row.offences,
            until_ms,
        };
        // The counts stay as they were while the ban lasts (`abuse list`
        // shows what earned it); the source starts afresh when it ends.
        row.last_offence_ms = Some(now_ms);
        row.banned_until_ms = Some(until_ms);
        Some(offence)
    }

    /// After a ban ended, the counts that earned it are gone.
    fn after_ban(row: &mut AbuseRow, now_ms: i64) {
        if let Some(until) = row.banned_until_ms {
            if now_ms >= until && row.at_ms < until {
                row.score = 0.0;
                row.failures = 0;
                row.connections = 0;
                row.at_ms = until;
            }
        }
    }

    /// A source's state brought to `now_ms` (score leaked), if it has one.
    pub fn get(&self, key: &AbuseKey, now_ms: i64) -> Option<AbuseRow> {
        let mut row = self.sources.get(key)?.clone();
        if !row.banned(now_ms) {
            Self::after_ban(&mut row, now_ms);
            Self::refresh(&self.cfg, &mut row, now_ms);
        }
        Some(row)
    }

    /// Every source, brought to `now_ms`, highest score first.
    pub fn list(&self, now_ms: i64) -> Vec<AbuseRow> {
        let mut rows: Vec<AbuseRow> = self.sources.iter().filter_map(|(k, _)| self.get(k, now_ms)).collect();
        rows.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key)));
        rows
    }

    /// Drops a source's score, offences and sessions. False if it had none.
    pub fn forget(&mut self, key: &AbuseKey) -> bool {
        let had = self.sources.remove(key).is_some();
        if had {
            self.dirty_sources.insert(*key);
        }
        let gone = self.sessions.retain(|(ip, _), _| !key.contains(*ip));
        self.dirty_sessions.extend(gone);
        had
    }

    /// Drops what carries no information any more: sources with an empty
    /// bucket, no ban and no remembered offence; sessions past their TTL.
    /// Returns how many entries went.
    pub fn prune(&mut self, now_ms: i64) -> usize {
        let cfg = &self.cfg;
        let gone = self.sources.retain(|_, row| {
            if row.banned(now_ms) {
                return true;
            }
            Self::refresh(cfg, row, now_ms);
            row.score > 0.0 || row.offences > 0
        });
        let ttl = ms(cfg.session_ttl);
        let gone_sessions = self.sessions.retain(|_, s| now_ms.saturating_sub(s.at_ms) <= ttl);
        let n = gone.len() + gone_sessions.len();
        self.dirty_sources.extend(gone);
        self.dirty_sessions.extend(gone_sessions);
        n
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.len() == 0
    }

    /// The rows changed since the last call.
    pub fn take_dirty(&mut self) -> AbuseDirty {
        let sources = self
            .dirty_sources
            .drain()
            .map(|k| match self.sources.get(&k) {
                Some(row) => Change::Upsert(row.clone()),
                None => Change::Delete(k),
            })
            .collect();
        let sessions = self
            .dirty_sessions
            .drain()
            .map(|k| match self.sessions.get(&k) {
                Some(s) => Change::Upsert(SessionRow {
                    client: k.0,
                    session: k.1.clone(),
                    added: s.added,
                    floor: s.floor,
                    at_ms: s.at_ms,
                }),
                None => Change::Delete(k),
            })
            .collect();
        AbuseDirty { sources, sessions }
    }

    /// Loads persisted rows (not marked dirty). Table bounds apply.
    pub fn restore(
        &mut self,
        sources: impl IntoIterator<Item = AbuseRow>,
        sessions: impl IntoIterator<Item = SessionRow>,
    ) {
        for mut row in sources {
            // A damaged row must not ban (NaN compares as "not below").
            if !row.score.is_finite() || row.score < 0.0 {
                row.score = 0.0;
            }
            self.sources.insert(row.key, row);
        }
        for s in sessions {
            let session = truncate(&s.session, MAX_SESSION_LEN).to_string();
            self.sessions.insert(
                (s.client.to_canonical(), session),
                SessionState { added: s.added, floor: s.floor, at_ms: s.at_ms },
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Mail stream: undeliverable recipients.

/// Longest account name kept (longer ones are cut).
pub const MAX_ACCOUNT_LEN: usize = 320;
/// Longest recipient kept (longer ones are cut).
pub const MAX_RCPT_LEN: usize = 320;
/// Longest queue id kept.
pub const MAX_QID_LEN: usize = 64;

/// Who mail is counted against: an authenticated account, or the client
/// address of unauthenticated mail. Shown and stored as `account:NAME` or
/// `addr:IP`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Account(String),
    Addr(IpAddr),
}

impl Subject {
    /// An account (cut to [`MAX_ACCOUNT_LEN`]).
    pub fn account(name: &str) -> Self {
        Subject::Account(truncate(name, MAX_ACCOUNT_LEN).to_string())
    }

    /// A client address (`::ffff:` IPv4 as IPv4); an IPv6 client counts by
    /// its /64 (the first address of it), as its bans do, so rotating
    /// addresses inside the /64 changes nothing.
    pub fn addr(ip: IpAddr) -> Self {
        Subject::Addr(AbuseKey::of(ip).ip())
    }

    /// The account if there is one (non-empty), else the client address.
    pub fn of(account: Option<&str>, client: IpAddr) -> Self {
        match account {
            Some(a) if !a.is_empty() => Subject::account(a),
            _ => Subject::addr(client),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Account(a) => write!(f, "account:{a}"),
            Subject::Addr(ip) => write!(f, "addr:{ip}"),
        }
    }
}

impl FromStr for Subject {
    type Err = crate::Error;
    /// `account:NAME`, `addr:IP`, a bare IP address (an address) or a bare
    /// account name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| crate::Error::InvalidInput(format!("invalid subject {s:?}: {reason}"));
        if let Some(name) = s.strip_prefix("account:") {
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(bad("empty account name or control characters"));
            }
            return Ok(Subject::account(name));
        }
        if let Some(addr) = s.strip_prefix("addr:") {
            return addr.trim().parse::<IpAddr>().map(Subject::addr).map_err(|_| bad("expected addr:IP"));
        }
        if let Ok(ip) = s.trim().parse::<IpAddr>() {
            return Ok(Subject::addr(ip));
        }
        // A bare account name (what an operator types: `suspend add alice`).
        let name = s.trim();
        if name.is_empty() || name.len() > MAX_ACCOUNT_LEN || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad("expected an account name (no spaces), account:NAME, addr:IP or an IP address"));
        }
        Ok(Subject::account(name))
    }
}

impl Serialize for Subject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How recipients appear in a suspension's evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redact {
    /// `*@domain`.
    #[default]
    Domain,
    /// The whole address.
    None,
}

/// Exemptions: mailing-list servers and the like.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exempt {
    /// Accounts, compared case-insensitively.
    pub accounts: HashSet<String>,
    pub addresses: Vec<IpNet>,
}

impl Exempt {
    pub fn new(accounts: impl IntoIterator<Item = String>, addresses: Vec<IpNet>) -> Self {
        Exempt { accounts: accounts.into_iter().map(|a| a.to_lowercase()).collect(), addresses }
    }

    pub fn address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addresses.iter().any(|n| n.contains(&ip))
    }

    /// `subject` is exempt, or the mail came from an exempt address.
    pub fn covers(&self, subject: &Subject, client: Option<IpAddr>) -> bool {
        let by_subject = match subject {
            Subject::Account(a) => self.accounts.contains(&a.to_lowercase()),
            Subject::Addr(ip) => self.address(*ip),
        };
        by_subject || client.is_some_and(|ip| self.address(ip))
    }
}

/// How the mail stream is judged.
#[derive(Clone, Debug, PartialEq)]
pub struct MailStreamConfig {
    /// More distinct undeliverable recipients than this within `window`
    /// suspend the subject.
    pub threshold: u32,
    pub window: Duration,
    /// A NOQUEUE reject joins a policy RCPT request this recent.
    pub join_window: Duration,
    /// A queue id without `removed` is forgotten after this long.
    pub qid_ttl: Duration,
    pub exempt: Exempt,
    pub redact: Redact,
    pub max_subjects: usize,
    pub max_qids: usize,
    pub max_requests: usize,
}

impl Default for MailStreamConfig {
    fn default() -> Self {
        MailStreamConfig {
            threshold: 10,
            window: Duration::from_secs(3600),
            join_window: Duration::from_secs(60),
            qid_ttl: Duration::from_secs(5 * 86_400),
            exempt: Exempt::default(),
            redact: Redact::Domain,
            max_subjects: 100_000,
            max_qids: 100_000,
            max_requests: 50_000,
        }
    }
}

/// A subject sent to too many undeliverable recipients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suspend {
    pub subject: Subject,
    /// Distinct undeliverable recipients within the window.
    pub count: u32,
    /// The evidence, redacted as configured.
    pub recipients: Vec<String>,
    pub at_ms: i64,
}

/// A queue id's origin, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QidRow {
    pub qid: String,
    pub account: Option<String>,
    pub client: IpAddr,
    pub at_ms: i64,
}

/// One counted undeliverable recipient of a subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeliverableRow {
    pub subject: Subject,
    /// Lower-cased, cut to [`MAX_RCPT_LEN`].
    pub rcpt: String,
    pub at_ms: i64,
}

/// What changed since the last `take_dirty`. `undeliverable` holds each
/// changed subject with *all* its current rows: replace that subject's rows
/// (none: delete them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MailStreamDirty {
    pub qids: Vec<Change<QidRow, String>>,
    pub undeliverable: Vec<(Subject, Vec<UndeliverableRow>)>,
}

impl MailStreamDirty {
    pub fn is_empty(&self) -> bool {
        self.qids.is_empty() && self.undeliverable.is_empty()
    }
}

#[derive(Clone, Debug)]
struct QidEntry {
    account: Option<String>,
    client: IpAddr,
    at_ms: i64,
}

/// Whether a refusal names an undeliverable recipient: an enhanced status
/// `5.1.x` other than the sender codes (5.1.0 is Postfix's sender reject,
/// 5.1.7/5.1.8 bad sender), or without one a 550/551/553 reply (the parser
/// emits those only for "User unknown"/"unknown user"/"Unrouteable" texts).
pub fn undeliverable(code: Option<u16>, dsn: Option<&str>) -> bool {
    match dsn {
        Some(d) => {
            let mut parts = d.trim().split('.');
            let (Some("5"), Some("1"), Some(detail), None) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return false;
            };
            matches!(detail.parse::<u16>(), Ok(n) if !matches!(n, 0 | 7 | 8) && detail.len() <= 3)
        }
        None => matches!(code, Some(550 | 551 | 553)),
    }
}

/// A recipient as counted: no angle brackets or surrounding space, lower
/// case, control characters as `?`, cut to [`MAX_RCPT_LEN`].
fn normalize_rcpt(rcpt: &str) -> String {
    let r = rcpt.trim();
    let r = r.strip_prefix('<').unwrap_or(r);
    let r = r.strip_suffix('>').unwrap_or(r);
    let r: String = r.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    truncate(&r.to_lowercase(), MAX_RCPT_LEN).to_string()
}

/// A recipient as evidence shows it.
pub fn redact(rcpt: &str, how: Redact) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | '\\') { c } else { '?' }).collect()
    };
    match how {
        Redact::None => clean(rcpt),
        Redact::Domain => match rcpt.rsplit_once('@') {
            Some((_, domain)) if !domain.is_empty() => format!("*@{}", clean(truncate(domain, 255))),
            _ => "*".to_string(),
        },
    }
}

type RequestKey = (IpAddr, String, String);

/// Undeliverable recipients per subject, with the joins that find the
/// subject of a refusal or bounce.
pub struct MailStream {
    cfg: MailStreamConfig,
    qids: BoundedMap<String, QidEntry>,
    /// Policy RCPT requests of authenticated clients: (client, sender,
    /// recipient) → (account, at).
    requests: BoundedMap<RequestKey, (String, i64)>,
    /// Per subject: (recipient, last seen), at most threshold + 1.
    subjects: BoundedMap<Subject, Vec<(String, i64)>>,
    dirty_qids: HashSet<String>,
    dirty_subjects: HashSet<Subject>,
}

impl MailStream {
    pub fn new(cfg: MailStreamConfig) -> Self {
        MailStream {
            qids: BoundedMap::new(cfg.max_qids),
            requests: BoundedMap::new(cfg.max_requests),
            subjects: BoundedMap::new(cfg.max_subjects),
            cfg,
            dirty_qids: HashSet::new(),
            dirty_subjects: HashSet::new(),
        }
    }

    pub fn config(&self) -> &MailStreamConfig {
        &self.cfg
    }

    /// The policy service saw an RCPT request: a NOQUEUE refusal of the
    /// same (client, sender, recipient) within the join window is the
    /// account's. Requests without an account are not kept.
    pub fn note_rcpt_request(&mut self, client: IpAddr, sender: &str, rcpt: &str, account: Option<&str>, now_ms: i64) {
        let Some(account) = account.filter(|a| !a.is_empty()) else { return };
        let key = (client.to_canonical(), normalize_rcpt(sender), normalize_rcpt(rcpt));
        self.requests.insert(key, (truncate(account, MAX_ACCOUNT_LEN).to_string(), now_ms));
    }

    /// [`MailStream::note_rcpt_request`] for a policy request at RCPT
    /// (other states and requests without a client address are skipped).
    pub fn note_policy_request(&mut self, req: &crate::policy::PolicyRequest, now_ms: i64) {
        if req.protocol_state() != Some("RCPT") {
            return;
        }
        let (Some(client), Some(rcpt)) = (req.client_address(), req.recipient()) else { return };
        self.note_rcpt_request(client, req.sender().unwrap_or(""), rcpt, req.sasl_username(), now_ms);
    }

    /// Follows one event; a suspension when a subject crosses the threshold.
    pub fn apply(&mut self, event: &Event, now_ms: i64) -> Option<Suspend> {
        match event {
            Event::Submitted { qid, client, account } => {
                let qid = truncate(qid, MAX_QID_LEN).to_string();
                let entry = QidEntry {
                    account: account.as_deref().filter(|a| !a.is_empty()).map(|a| truncate(a, MAX_ACCOUNT_LEN).into()),
                    client: client.to_canonical(),
                    at_ms: now_ms,
                };
                if let Some((gone, _)) = self.qids.insert(qid.clone(), entry) {
                    self.dirty_qids.insert(gone);
                }
                self.dirty_qids.insert(qid);
                None
            }
            Event::Removed { qid } => {
                let qid = truncate(qid, MAX_QID_LEN);
                if self.qids.remove(qid).is_some() {
                    self.dirty_qids.insert(qid.to_string());
                }
                None
            }
            Event::RcptReject { qid, client, account, sender, rcpt, code, dsn } => {
                if !undeliverable(Some(*code), dsn.as_deref()) {
                    return None;
                }
                let client = client.to_canonical();
                let subject = if let Some(a) = account.as_deref().filter(|a| !a.is_empty()) {
                    Subject::account(a)
                } else if let Some(q) = qid.as_deref().and_then(|q| self.qids.get(truncate(q, MAX_QID_LEN))) {
                    Subject::of(q.account.as_deref(), q.client)
                } else {
                    let key = (client, normalize_rcpt(sender), normalize_rcpt(rcpt));
                    match self.requests.get(&key) {
                        Some((account, at)) if now_ms.saturating_sub(*at) <= ms(self.cfg.join_window) => {
                            Subject::account(account)
                        }
                        _ => Subject::addr(client),
                    }
                };
                self.count(subject, client, rcpt, now_ms)
            }
            Event::Delivery { qid, rcpt, dsn, status: DeliveryStatus::Bounced } => {
                if !undeliverable(None, dsn.as_deref()) {
                    return None;
                }
                let q = self.qids.get(truncate(qid, MAX_QID_LEN))?;
                let (subject, client) = (Subject::of(q.account.as_deref(), q.client), q.client);
                self.count(subject, client, rcpt, now_ms)
            }
            _ => None,
        }
    }

    fn count(&mut self, subject: Subject, client: IpAddr, rcpt: &str, now_ms: i64) -> Option<Suspend> {
        if self.cfg.exempt.covers(&subject, Some(client)) {
            return None;
        }
        let rcpt = normalize_rcpt(rcpt);
        if rcpt.is_empty() {
            return None;
        }
        if self.subjects.get(&subject).is_none() {
            if let Some((gone, _)) = self.subjects.insert(subject.clone(), Vec::new()) {
                self.dirty_subjects.insert(gone);
            }
        }
        let window = ms(self.cfg.window);
        let threshold = self.cfg.threshold as usize;
        let entries = self.subjects.get_mut(&subject).expect("present");
        entries.retain(|(_, at)| now_ms.saturating_sub(*at) < window);
        match entries.iter_mut().find(|(r, _)| *r == rcpt) {
            Some(e) => e.1 = e.1.max(now_ms),
            None => entries.push((rcpt, now_ms)),
        }
        self.dirty_subjects.insert(subject.clone());
        if entries.len() <= threshold {
            return None;
        }
        let recipients = entries.iter().map(|(r, _)| redact(r, self.cfg.redact)).collect();
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        entries.clear();
        Some(Suspend { subject, count, recipients, at_ms: now_ms })
    }

    /// Distinct undeliverable recipients of `subject` within the window.
    pub fn count_of(&self, subject: &Subject, now_ms: i64) -> u32 {
        let window = ms(self.cfg.window);
        self.subjects
            .get(subject)
            .map_or(0, |e| e.iter().filter(|(_, at)| now_ms.saturating_sub(*at) < window).count() as u32)
    }

    /// Forgets a subject's counted recipients (after `suspend del`).
    pub fn clear(&mut self, subject: &Subject) {
        if self.subjects.remove(subject).is_some() {
            self.dirty_subjects.insert(subject.clone());
        }
    }

    /// Drops expired queue ids, recipients and requests; returns how many.
    pub fn prune(&mut self, now_ms: i64) -> usize {
        let (qid_ttl, window, join) = (ms(self.cfg.qid_ttl), ms(self.cfg.window), ms(self.cfg.join_window));
        let qids = self.qids.retain(|_, q| now_ms.saturating_sub(q.at_ms) <= qid_ttl);
        let mut changed = Vec::new();
        let subjects = self.subjects.retain(|s, e| {
            let before = e.len();
            e.retain(|(_, at)| now_ms.saturating_sub(*at) < window);
            if e.len() != before && !e.is_empty() {
                changed.push(s.clone());
            }
            !e.is_empty()
        });
        let requests = self.requests.retain(|_, (_, at)| now_ms.saturating_sub(*at) <= join);
        let n = qids.len() + subjects.len() + requests.len() + changed.len();
        self.dirty_qids.extend(qids);
        self.dirty_subjects.extend(subjects);
        self.dirty_subjects.extend(changed);
        n
    }

    /// The rows changed since the last call.
    pub fn take_dirty(&mut self) -> MailStreamDirty {
        let qids = self
            .dirty_qids
            .drain()
            .map(|q| match self.qids.get(&q) {
                Some(e) => {
                    Change::Upsert(QidRow { qid: q, account: e.account.clone(), client: e.client, at_ms: e.at_ms })
                }
                None => Change::Delete(q),
            })
            .collect();
        let undeliverable = self
            .dirty_subjects
            .drain()
            .map(|s| {
                let rows = self
                    .subjects
                    .get(&s)
                    .map(|e| {
                        e.iter()
                            .map(|(r, at)| UndeliverableRow { subject: s.clone(), rcpt: r.clone(), at_ms: *at })
                            .collect()
                    })
                    .unwrap_or_default();
                (s, rows)
            })
            .collect();
        MailStreamDirty { qids, undeliverable }
    }

    /// Loads persisted rows (not marked dirty). Bounds apply; a subject
    /// keeps at most threshold + 1 recipients.
    pub fn restore(
        &mut self,
        qids: impl IntoIterator<Item = QidRow>,
        rows: impl IntoIterator<Item = UndeliverableRow>,
    ) {
        for q in qids {
            let entry = QidEntry { account: q.account, client: q.client.to_canonical(), at_ms: q.at_ms };
            self.qids.insert(truncate(&q.qid, MAX_QID_LEN).to_string(), entry);
        }
        let cap = self.cfg.threshold as usize + 1;
        for r in rows {
            if self.subjects.get(&r.subject).is_none() {
                self.subjects.insert(r.subject.clone(), Vec::new());
            }
            let entries = self.subjects.get_mut(&r.subject).expect("present");
            let rcpt = normalize_rcpt(&r.rcpt);
            if entries.len() < cap && !entries.iter().any(|(x, _)| *x == rcpt) {
                entries.push((rcpt, r.at_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests;
