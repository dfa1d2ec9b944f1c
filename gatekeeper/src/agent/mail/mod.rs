//! The mail stream: what sources and accounts do, read from the mail logs
//! (`logs`) and asked by Postfix (`policy`), judged by the pure pieces
//! ([`crate::pipeline::abuse`], [`crate::policy::limits`]) and turned into
//! bans and suspensions through the state verbs ([`State::mail_commit`]).
//!
//! [`MailCore`] holds the in-memory state behind one short `std` mutex
//! (the policy service answers from it without waiting for the database);
//! what changed goes to the store with the log positions it follows from.
mod logs;
mod policy;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use tokio::sync::Mutex;
use tracing::{error, info, warn};

use super::{
    state::{AbuseBan, AddressBlock, MailBatch, State},
    Core,
};
use crate::{
    config::Config,
    domain::AbuseReason,
    pipeline::abuse::{
        AbuseConfig as ScoreConfig, AbuseKey, AbuseRow as ScoreRow, AbuseScores, Change, Exempt, MailStream,
        MailStreamConfig, Offence, OffenceReason, QidRow, SessionRow, Subject, Suspend, UndeliverableRow,
    },
    policy::limits::{CounterKind, CounterRow, Limits, SendLimits, SendLimitsConfig},
    protocol::{AbuseForgotten, AbuseRow, LimitRow, Pong},
    status::MailStats,
    store::{LimitRecord, SuspensionRecord},
    time::unix_now,
    Error, Result,
};

pub use policy::start_policy_service;

/// Spaces of the `mail_state` rows.
const SCORE: &str = "score";
const SESSION: &str = "session";
const QID: &str = "qid";
const UNDELIVERABLE: &str = "undeliverable";

/// How often forgotten scores, queue ids and counters are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Accounts whose last client address is remembered (to block it with a
/// suspension); past it the table starts again.
const MAX_LAST_CLIENTS: usize = 100_000;

/// The in-memory state of the mail stream.
pub struct MailCore {
    pub scores: AbuseScores,
    pub stream: MailStream,
    pub limits: SendLimits,
    /// Suspended subjects (a copy of the store's, for the policy service).
    suspended: HashMap<Subject, SuspensionRecord>,
    /// The last client address each account sent from.
    last_client: HashMap<String, IpAddr>,
    pub stats: MailStats,
}

/// The mail stream's shared handle: the control socket, the log readers and
/// the policy service use it.
pub struct MailHandle {
    core: StdMutex<MailCore>,
    cfg: Config,
    /// Wakes the flusher (the policy service counted something).
    changed: tokio::sync::Notify,
    /// What a commit refused, kept to go with the next one, and how many
    /// times in a row it was refused.
    pending: StdMutex<(MailBatch, u32)>,
    commit_errors: std::sync::atomic::AtomicU64,
}

/// A batch refused this many times in a row is let go (logged): the
/// database then lags what the agent holds in memory until its next change
/// of the same rows.
const MAX_COMMIT_RETRIES: u32 = 30;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The scorer's config from `[abuse]`.
fn score_config(cfg: &Config) -> ScoreConfig {
    let a = &cfg.abuse;
    ScoreConfig {
        connection_weight: a.connection_weight,
        auth_failure_weight: a.auth_failure_weight,
        threshold: a.threshold,
        leak_points: a.leak.per,
        leak_period: Duration::from_secs(u64::from(a.leak.unit_secs)),
        bans: a.ban.clone(),
        forget_after: a.forget_after,
        ..ScoreConfig::default()
    }
}

fn json<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

impl MailCore {
    fn new(cfg: &Config) -> MailCore {
        let sh = &cfg.smarthost;
        let mut groups = BTreeMap::new();
        let mut members = HashMap::new();
        for g in &sh.group {
            groups.insert(g.name.clone(), g.messages);
            for a in &g.accounts {
                members.insert(Subject::account(a), g.name.clone());
            }
        }
        let limits = SendLimits::new(SendLimitsConfig {
            default: sh.messages,
            groups,
            members,
            exempt: Exempt::new(sh.exempt_accounts.iter().cloned(), sh.exempt_addresses.clone()),
            contact: cfg.mail_policy.contact.clone(),
            ..SendLimitsConfig::default()
        });
        let su = &cfg.suspend;
        let stream = MailStream::new(MailStreamConfig {
            threshold: su.threshold,
            exempt: Exempt::new(su.exempt_accounts.iter().cloned(), su.exempt_addresses.clone()),
            redact: su.redact,
            ..MailStreamConfig::default()
        });
        MailCore {
            scores: AbuseScores::new(score_config(cfg)),
            stream,
            limits,
            suspended: HashMap::new(),
            last_client: HashMap::new(),
            stats: MailStats::default(),
        }
    }

    /// Remembers which address an account sent from.
    fn saw_account(&mut self, account: &str, client: IpAddr) {
        if self.last_client.len() >= MAX_LAST_CLIENTS && !self.last_client.contains_key(account) {
            self.last_client.clear();
        }
        self.last_client.insert(account.to_string(), client);
    }

    /// Moves what changed into `batch` (rows to write, counters to add).
    fn drain_dirty(&mut self, batch: &mut MailBatch) {
        let d = self.scores.take_dirty();
        for c in d.sources {
            batch.rows.push(match c {
                Change::Upsert(r) => (SCORE, r.key.to_string(), json(&r)),
                Change::Delete(k) => (SCORE, k.to_string(), None),
            });
        }
        for c in d.sessions {
            batch.rows.push(match c {
                Change::Upsert(r) => (SESSION, format!("{} {}", r.client, r.session), json(&r)),
                Change::Delete((ip, s)) => (SESSION, format!("{ip} {s}"), None),
            });
        }
        let d = self.stream.take_dirty();
        for c in d.qids {
            batch.rows.push(match c {
                Change::Upsert(r) => (QID, r.qid.clone(), json(&r)),
                Change::Delete(q) => (QID, q, None),
            });
        }
        for (subject, rows) in d.undeliverable {
            batch.rows.push((UNDELIVERABLE, subject.to_string(), if rows.is_empty() { None } else { json(&rows) }));
        }
        for r in self.limits.take_dirty() {
            batch.sent.push((r.subject.to_string(), r.kind.as_str(), r.hour, r.n));
        }
    }

    /// The ban an offence reaches, if it still lasts (a catch-up after
    /// downtime may find it over already).
    fn ban_of(&mut self, o: &Offence, now_ms: i64) -> Option<AbuseBan> {
        if o.until_ms <= now_ms {
            return None;
        }
        self.stats.bans += 1;
        let reason = match o.reason {
            OffenceReason::AuthAbuse => AbuseReason::AuthAbuse,
            OffenceReason::ConnRate => AbuseReason::ConnRate,
        };
        Some(AbuseBan {
            key: o.key.source_key(),
            reason,
            until: o.until_ms.div_euclid(1000) + 1,
            comment: format!(
                "{reason}: {} failed logins and {} connections, score {:.0} (offence {}, banned for {})",
                o.failures,
                o.connections,
                o.score,
                o.offence_no,
                humantime::format_duration(o.ban_for)
            ),
        })
    }

    /// The suspension a crossing reaches (none if already suspended).
    fn suspension_of(
        &mut self,
        s: &Suspend,
        cfg: &Config,
        st: &State,
    ) -> Option<(SuspensionRecord, Option<AddressBlock>)> {
        if self.suspended.contains_key(&s.subject) {
            return None;
        }
        // An address without an account is a customer's only inside the
        // customer ranges; elsewhere (a peer MTA on an MX) it is not ours to
        // suspend.
        if let Subject::Addr(ip) = &s.subject {
            if !in_nets(&cfg.mail_policy.customer_ranges, *ip) {
                return None;
            }
        }
        let address = match &s.subject {
            Subject::Addr(ip) => Some(*ip),
            Subject::Account(a) => self.last_client.get(a).copied(),
        }
        // Never the host itself, an exempt address or an allowed one (a
        // webmail host, a partner relay).
        .filter(|ip| !ip.is_loopback() && !in_nets(&cfg.suspend.exempt_addresses, *ip) && !st.good_source(*ip));
        let now = unix_now();
        let rec = SuspensionRecord {
            subject: s.subject.to_string(),
            reason: format!("sent to {} undeliverable recipients within an hour", s.count),
            count: s.count,
            evidence: evidence(&s.recipients),
            address: address.map(|a| a.to_string()),
            created_at: now,
            expires_at: None,
        };
        self.suspended.insert(s.subject.clone(), rec.clone());
        self.stats.suspensions += 1;
        Some((rec, address.map(|a| (a, block_until(cfg, now)))))
    }
}

impl MailHandle {
    /// The mail stream's state restored from the store.
    pub fn restore(st: &mut State) -> Result<MailHandle> {
        let cfg = st.cfg.clone();
        let mut core = MailCore::new(&cfg);
        let bad = |space: &str, key: &str| warn!(space, key, "unreadable mail state row skipped");
        let mut sources = Vec::new();
        for (k, v) in st.mail_state(SCORE)? {
            match serde_json::from_str::<ScoreRow>(&v) {
                Ok(r) => sources.push(r),
                Err(_) => bad(SCORE, &k),
            }
        }
        let mut sessions = Vec::new();
        for (k, v) in st.mail_state(SESSION)? {
            match serde_json::from_str::<SessionRow>(&v) {
                Ok(r) => sessions.push(r),
                Err(_) => bad(SESSION, &k),
            }
        }
        core.scores.restore(sources, sessions);
        let mut qids = Vec::new();
        for (k, v) in st.mail_state(QID)? {
            match serde_json::from_str::<QidRow>(&v) {
                Ok(r) => qids.push(r),
                Err(_) => bad(QID, &k),
            }
        }
        let mut und = Vec::new();
        for (k, v) in st.mail_state(UNDELIVERABLE)? {
            match serde_json::from_str::<Vec<UndeliverableRow>>(&v) {
                Ok(r) => und.extend(r),
                Err(_) => bad(UNDELIVERABLE, &k),
            }
        }
        core.stream.restore(qids, und);
        let now = now_ms();
        let hour = now.div_euclid(crate::policy::limits::HOUR_MS);
        let mut counts = Vec::new();
        for (subject, kind, h, n) in st.send_counts(hour - crate::policy::limits::HOURS as i64 + 1)? {
            match (subject.parse::<Subject>(), kind.parse::<CounterKind>()) {
                (Ok(subject), Ok(kind)) => counts.push(CounterRow { subject, kind, hour: h, n }),
                _ => bad("send_counts", &subject),
            }
        }
        core.limits.restore(counts, now);
        for l in st.limits()? {
            match (l.subject.parse::<Subject>(), Limits::parse(&l.limits)) {
                (Ok(s), Ok(limits)) => core.limits.set_override(s, Some(limits)),
                _ => bad("send_limits", &l.subject),
            }
        }
        for s in st.suspensions()? {
            match s.subject.parse::<Subject>() {
                Ok(subject) => {
                    core.suspended.insert(subject, s);
                }
                Err(_) => bad("suspensions", &s.subject),
            }
        }
        info!(scored = core.scores.len(), suspended = core.suspended.len(), "mail stream state restored");
        Ok(MailHandle {
            core: StdMutex::new(core),
            cfg,
            changed: tokio::sync::Notify::new(),
            pending: StdMutex::new((MailBatch::default(), 0)),
            commit_errors: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailCore> {
        // A panic while holding it leaves counts, never a broken invariant
        // worth stopping the agent for.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Never scored: the host itself and `[abuse] exempt`.
    pub(super) fn abuse_exempt(&self, ip: IpAddr) -> bool {
        ip.to_canonical().is_loopback() || in_nets(&self.cfg.abuse.exempt, ip)
    }

    pub fn stats(&self) -> MailStats {
        let core = self.lock();
        MailStats {
            scored: core.scores.len(),
            commit_errors: self.commit_errors.load(std::sync::atomic::Ordering::Relaxed),
            ..core.stats.clone()
        }
    }

    fn row_of(&self, r: &ScoreRow, now_ms: i64) -> AbuseRow {
        AbuseRow {
            source: r.key.to_string(),
            score: r.score,
            threshold: self.cfg.abuse.threshold,
            failures: r.failures,
            connections: r.connections,
            offences: r.offences,
            banned_until: r.banned_until_ms.filter(|u| *u > now_ms).map(|u| u.div_euclid(1000) + 1),
            reason: None,
            last_seen: r.at_ms.div_euclid(1000),
        }
    }

    /// The score of `ip`'s source key (for `check`).
    pub fn abuse_row(&self, ip: IpAddr) -> Option<AbuseRow> {
        let now = now_ms();
        let row = self.lock().scores.get(&AbuseKey::of(ip), now)?;
        Some(self.with_reason(self.row_of(&row, now), &row))
    }

    fn with_reason(&self, mut row: AbuseRow, r: &ScoreRow) -> AbuseRow {
        if row.banned_until.is_some() {
            row.reason = Some(if r.failures > 0 { AbuseReason::AuthAbuse } else { AbuseReason::ConnRate });
        }
        row
    }

    pub fn abuse_list(&self) -> Vec<AbuseRow> {
        let now = now_ms();
        let rows = self.lock().scores.list(now);
        // A row whose score leaked away and that has no offence says nothing.
        rows.iter()
            .filter(|r| r.score > 0.0 || r.offences > 0 || r.banned(now))
            .map(|r| self.with_reason(self.row_of(r, now), r))
            .collect()
    }

    /// `abuse forget IP`: the score, the offences and the abuse ban go.
    pub fn forget(&self, st: &mut State, ip: IpAddr) -> Result<AbuseForgotten> {
        let key = AbuseKey::of(ip);
        let mut batch = MailBatch::default();
        let had_score = {
            let mut core = self.lock();
            let had = core.scores.forget(&key);
            core.drain_dirty(&mut batch);
            had
        };
        self.commit(st, batch);
        let ban_lifted = st.lift_abuse_ban(key.source_key())?;
        Ok(AbuseForgotten { source: key.to_string(), had_score, ban_lifted })
    }

    /// The operator lifted these verdicts (`ban del`, `verdict del`): the
    /// sources of the abuse bans among them start afresh (their lines are
    /// scored again at once, not ignored until the ban would have ended).
    pub fn bans_lifted(&self, st: &mut State, removed: &[crate::store::VerdictRecord]) {
        let mut batch = MailBatch::default();
        {
            let mut core = self.lock();
            for v in removed.iter().filter(|v| v.action == crate::domain::Action::Ban) {
                core.scores.forget(&AbuseKey::of(v.key.to_ip()));
            }
            core.drain_dirty(&mut batch);
        }
        self.commit(st, batch);
    }

    pub fn suspend_add(&self, st: &mut State, subject: Subject, reason: Option<String>) -> Result<Pong> {
        let address = match &subject {
            Subject::Addr(ip) => Some(*ip),
            Subject::Account(a) => self.lock().last_client.get(a).copied(),
        };
        let rec = SuspensionRecord {
            subject: subject.to_string(),
            reason: reason.unwrap_or_else(|| "suspended by the operator".into()),
            count: 0,
            evidence: Vec::new(),
            address: address.map(|a| a.to_string()),
            created_at: unix_now(),
            expires_at: None,
        };
        st.suspend_add(rec.clone(), address.map(|a| (a, block_until(&self.cfg, unix_now()))))?;
        self.lock().suspended.insert(subject, rec);
        Ok(Pong { pong: true })
    }

    pub fn suspend_del(&self, st: &mut State, subject: &Subject) -> Result<SuspensionRecord> {
        let subject = subject.clone();
        let rec = st.suspend_del(&subject.to_string())?;
        let mut core = self.lock();
        core.suspended.remove(&subject);
        // A fresh start: the recipients that made it no longer count.
        core.stream.clear(&subject);
        Ok(rec)
    }

    pub fn limit_set(&self, st: &mut State, subject: Subject, text: &str) -> Result<Pong> {
        let limits = Limits::parse(text).map_err(Error::InvalidInput)?;
        st.limit_set(LimitRecord { subject: subject.to_string(), limits: limits.to_string(), created_at: unix_now() })?;
        self.lock().limits.set_override(subject, Some(limits));
        Ok(Pong { pong: true })
    }

    pub fn limit_del(&self, st: &mut State, subject: &Subject) -> Result<Pong> {
        let subject = subject.clone();
        st.limit_del(&subject.to_string())?;
        self.lock().limits.set_override(subject, None);
        Ok(Pong { pong: true })
    }

    pub fn limit_list(&self, st: &State) -> Result<Vec<LimitRow>> {
        let now = now_ms();
        let set = st.limits()?;
        let core = self.lock();
        let cfg = core.limits.config();
        let mut subjects: BTreeMap<Subject, String> = BTreeMap::new();
        for l in set {
            if let Ok(s) = l.subject.parse::<Subject>() {
                subjects.insert(s, "cli".into());
            }
        }
        for (s, g) in &cfg.members {
            subjects.entry(s.clone()).or_insert_with(|| format!("group:{g}"));
        }
        for s in core.limits.counted_subjects() {
            subjects.entry(s).or_insert_with(|| "default".into());
        }
        Ok(subjects
            .into_iter()
            .map(|(s, origin)| {
                let limits = core.limits.limits_for(&s, None);
                let u = core.limits.usage(&s, now);
                LimitRow {
                    subject: s.to_string(),
                    limits: limits.as_ref().map_or_else(|| "exempt".into(), Limits::to_string),
                    origin: if limits.is_none() { "exempt".into() } else { origin },
                    messages_hour: u.messages_hour,
                    messages_day: u.messages_day,
                    recipients_day: u.recipients_day,
                }
            })
            .collect())
    }

    /// Writes the policy service's counters as soon as they change (woken
    /// by the service) and at least every second, so a restart keeps them;
    /// prunes what leaked away or fell out of the windows once a minute.
    pub async fn flusher(self: Arc<Self>, state: Arc<Mutex<Core>>) {
        let mut last_prune = std::time::Instant::now();
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.notified()).await;
            let prune = last_prune.elapsed() >= PRUNE_EVERY;
            if prune {
                last_prune = std::time::Instant::now();
            }
            self.flush_with(&state, prune).await;
        }
    }

    /// Writes what changed in memory (the agent also does it on exit).
    pub async fn flush(&self, state: &Arc<Mutex<Core>>) {
        self.flush_with(state, false).await;
    }

    async fn flush_with(&self, state: &Arc<Mutex<Core>>, prune: bool) {
        let mut guard = state.lock().await;
        tokio::task::block_in_place(|| {
            let st = &mut guard.state;
            let now = now_ms();
            let mut batch = MailBatch::default();
            {
                let mut core = self.lock();
                if prune {
                    core.scores.prune(now);
                    core.stream.prune(now);
                    core.limits.prune(now);
                }
                core.drain_dirty(&mut batch);
            }
            if prune {
                let hour = now.div_euclid(crate::policy::limits::HOUR_MS);
                if let Err(e) = st.prune_send_counts(hour - crate::policy::limits::HOURS as i64 + 1) {
                    warn!(error = %e.report(), "could not prune old sending counters");
                }
            }
            self.commit(st, batch);
        });
    }

    /// Commits `batch` after what was refused before, under the state lock
    /// the caller holds. A refused batch is kept for the next commit (its
    /// positions and rows apply in order, so nothing is counted twice); a
    /// ban without room in the verdict table does not hold the rest back.
    pub(super) fn commit(&self, st: &mut State, batch: MailBatch) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = std::mem::take(&mut pending.0);
        all.append(batch);
        if all.is_empty() {
            return;
        }
        let Err(e) = st.mail_commit(&all) else {
            pending.1 = 0;
            return;
        };
        self.commit_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !all.bans.is_empty() {
            let bans = std::mem::take(&mut all.bans);
            if st.mail_commit(&all).is_ok() {
                for b in &bans {
                    warn!(source = %b.key.display(), error = %e.report(), "ban not written (the rest of the batch was); the source stays as it is");
                }
                pending.1 = 0;
                return;
            }
            all.bans = bans;
        }
        pending.1 += 1;
        if pending.1 > MAX_COMMIT_RETRIES {
            error!(error = %e.report(), "the mail stream's changes were refused {MAX_COMMIT_RETRIES} times; letting this batch go (the database lags memory until the rows change again)");
            pending.1 = 0;
            return;
        }
        warn!(error = %e.report(), retry = pending.1, "could not save what the mail logs concluded; retrying with the next batch");
        pending.0 = all;
    }
}

fn in_nets(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// The recipients as evidence: each distinct one (redacted ones are often
/// the same domain) once, with how many times it came.
fn evidence(recipients: &[String]) -> Vec<String> {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for r in recipients {
        *n.entry(r.as_str()).or_default() += 1;
    }
    n.into_iter().map(|(r, c)| if c > 1 { format!("{r} ({c})") } else { r.to_string() }).collect()
}

/// Until when a suspension blocks its client address (`None`: until
/// `suspend del`).
fn block_until(cfg: &Config, now: i64) -> Option<i64> {
    cfg.suspend.address_block.map(|d| now + d.as_secs() as i64)
}

/// Starts the log readers and the counters' flusher; the handle for the
/// control socket and the policy service.
pub fn start(state: &Arc<Mutex<Core>>, handle: Arc<MailHandle>) {
    for lc in handle.cfg.logs.clone() {
        logs::spawn(handle.clone(), state.clone(), lc);
    }
    tokio::spawn(handle.clone().flusher(state.clone()));
}
