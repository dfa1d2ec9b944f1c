//! The mail stream's verbs: what the log readers and the policy service
//! conclude (bans from the abuse score, suspensions) and what the operator
//! says (`abuse forget`, `suspend`, `limit`), each through
//! [`State::change`] like every other change.
use std::net::IpAddr;

use gatekeeper_common::SourceKey;
use tracing::{info, warn};

use super::State;
use crate::{
    domain::{AbuseReason, Action, VerdictReason},
    store::{LimitRecord, SuspensionRecord, VerdictRecord},
    time::unix_now,
    Error, Result,
};

/// A ban the abuse score reached.
#[derive(Clone, Debug, PartialEq)]
pub struct AbuseBan {
    pub key: SourceKey,
    pub reason: AbuseReason,
    /// Unix seconds.
    pub until: i64,
    /// What it is for, shown by `ban list` and `check`.
    pub comment: String,
}

/// A suspended sender's client address, banned on the limited ports until
/// `until` (`None`: until `suspend del`).
pub type AddressBlock = (IpAddr, Option<i64>);

/// What one batch of log lines (or a flush of the policy service's
/// counters) changes, written in one transaction: where each source
/// stopped, the state rows that follow from the lines up to there, and the
/// bans and suspensions they reached. Either all of it is in the database
/// (and the maps), or none: a restart resumes exactly after the last
/// committed batch, counting nothing twice.
#[derive(Debug, Default)]
pub struct MailBatch {
    /// `(source id, position JSON)`.
    pub positions: Vec<(String, String)>,
    /// `(space, key, value)`; `None` removes the row.
    pub rows: Vec<(&'static str, String, Option<String>)>,
    /// Sending counters to add to: `(subject, kind, hour, n)`.
    pub sent: Vec<(String, &'static str, i64, u64)>,
    pub bans: Vec<AbuseBan>,
    /// New suspensions, with the client address to block.
    pub suspensions: Vec<(SuspensionRecord, Option<AddressBlock>)>,
}

impl MailBatch {
    /// Adds `later` after what this batch holds (a later position or row
    /// of the same key wins, as it does when applied in order).
    pub fn append(&mut self, later: MailBatch) {
        self.positions.extend(later.positions);
        self.rows.extend(later.rows);
        self.sent.extend(later.sent);
        self.bans.extend(later.bans);
        self.suspensions.extend(later.suspensions);
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
            && self.rows.is_empty()
            && self.sent.is_empty()
            && self.bans.is_empty()
            && self.suspensions.is_empty()
    }
}

/// Who a ban verdict is for, by its comment: the abuse score's
/// (`auth-abuse: ...`, `conn-rate: ...`), a suspension's (`suspended:
/// SUBJECT`), or the operator's (anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Abuse,
    Suspension,
    Operator,
}

fn owner(v: &VerdictRecord) -> Owner {
    let c = v.comment.as_deref().unwrap_or("");
    if v.action != Action::Ban {
        Owner::Operator
    } else if c.starts_with("suspended: ") {
        Owner::Suspension
    } else if c.starts_with("auth-abuse: ") || c.starts_with("conn-rate: ") {
        Owner::Abuse
    } else {
        Owner::Operator
    }
}

/// The ban verdict for `key`, merged with the verdict already there: a
/// ban never shortens one (an operator's ban without expiry stays without
/// one), the comment says whose it is by precedence (the operator's, then
/// a suspension's, then the abuse score's: only its owner lifts it), and a
/// lookup verdict gives way.
fn merged_ban(
    old: Option<VerdictRecord>,
    key: SourceKey,
    until: Option<i64>,
    comment: String,
    now: i64,
) -> VerdictRecord {
    let fresh = VerdictRecord {
        key,
        action: Action::Ban,
        reason: VerdictReason::ManualBan,
        comment: Some(comment),
        created_at: now,
        expires_at: until,
    };
    match old {
        Some(o) if o.reason == VerdictReason::ManualBan => {
            let keep_old = owner(&o) > owner(&fresh);
            VerdictRecord {
                expires_at: match (o.expires_at, until) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(a.max(b)),
                },
                comment: if keep_old { o.comment } else { fresh.comment },
                created_at: o.created_at,
                ..fresh
            }
        }
        _ => fresh,
    }
}

impl State {
    /// Commits one batch (see [`MailBatch`]); durably when it bans or
    /// suspends.
    pub fn mail_commit(&mut self, batch: &MailBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let durable = !batch.bans.is_empty() || !batch.suspensions.is_empty();
        let bans = batch.bans.clone();
        let susp: Vec<SuspensionRecord> = batch.suspensions.iter().map(|(s, _)| s.clone()).collect();
        self.change_with(durable, |store, t| {
            for (source, pos) in &batch.positions {
                store.set_log_position(source, pos, now)?;
            }
            for (space, key, value) in &batch.rows {
                store.put_mail_state(space, key, value.as_deref())?;
            }
            for (subject, kind, hour, n) in &batch.sent {
                store.add_send_count(subject, kind, *hour, *n)?;
            }
            for b in &batch.bans {
                let rec = merged_ban(store.verdict(b.key)?, b.key, Some(b.until), b.comment.clone(), now);
                store.upsert_verdict(&rec)?;
                t.verdicts.push(b.key);
            }
            for (s, addr) in &batch.suspensions {
                store.put_suspension(s)?;
                if let Some((ip, until)) = addr {
                    let key = SourceKey::from_ip(*ip);
                    let rec = merged_ban(store.verdict(key)?, key, *until, format!("suspended: {}", s.subject), now);
                    store.upsert_verdict(&rec)?;
                    t.verdicts.push(key);
                }
            }
            Ok(())
        })?;
        for b in &bans {
            warn!(source = %b.key.display(), reason = %b.reason, until = b.until, "{}", b.comment);
        }
        for s in &susp {
            warn!(subject = %s.subject, count = s.count, recipients = ?s.evidence, address = ?s.address, "suspended: {}", s.reason);
        }
        Ok(())
    }

    /// Where a log source stopped (JSON), if it ever ran.
    pub fn log_position(&self, source: &str) -> Result<Option<String>> {
        self.store.log_position(source)
    }

    /// Every state row of `space` (for restoring the scorer and counters).
    pub fn mail_state(&self, space: &str) -> Result<Vec<(String, String)>> {
        self.store.mail_state(space)
    }

    /// Deletes sending counters older than `min_hour`.
    pub fn prune_send_counts(&mut self, min_hour: i64) -> Result<()> {
        self.store.prune_send_counts(min_hour)
    }

    /// The sending counters of the last day (older ones are deleted).
    pub fn send_counts(&mut self, min_hour: i64) -> Result<Vec<(String, String, i64, u64)>> {
        self.store.send_counts(min_hour)
    }

    /// Lifts the ban the abuse score put on `key` (an operator's own ban
    /// stays). True if one was lifted.
    pub fn lift_abuse_ban(&mut self, key: SourceKey) -> Result<bool> {
        let Some(v) = self.store.verdict(key)? else { return Ok(false) };
        if v.reason != VerdictReason::ManualBan || owner(&v) != Owner::Abuse {
            return Ok(false);
        }
        self.change(|store, t| {
            store.del_verdict(key)?;
            t.verdicts.push(key);
            Ok(())
        })?;
        info!(source = %key.display(), "abuse ban lifted");
        Ok(true)
    }

    pub fn suspensions(&self) -> Result<Vec<SuspensionRecord>> {
        self.store.suspensions()
    }

    /// Suspends `rec.subject` by hand (and blocks `address` with it).
    pub fn suspend_add(&mut self, rec: SuspensionRecord, address: Option<AddressBlock>) -> Result<()> {
        if self.store.suspension(&rec.subject)?.is_some() {
            return Err(Error::InvalidInput(format!("{} is already suspended", rec.subject)));
        }
        self.mail_commit(&MailBatch { suspensions: vec![(rec, address)], ..MailBatch::default() })
    }

    /// Lifts a suspension and the block of its client address.
    pub fn suspend_del(&mut self, subject: &str) -> Result<SuspensionRecord> {
        let Some(rec) = self.store.suspension(subject)? else {
            return Err(Error::NotFound { what: "suspension", key: subject.to_string() });
        };
        let key = rec.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()).map(SourceKey::from_ip);
        let tag = format!("suspended: {subject}");
        let lifted = self.change(|store, t| {
            store.del_suspension(subject)?;
            if let Some(key) = key {
                if store.verdict(key)?.is_some_and(|v| v.action == Action::Ban && v.comment.as_deref() == Some(&tag)) {
                    store.del_verdict(key)?;
                    t.verdicts.push(key);
                }
            }
            Ok(rec)
        })?;
        info!(subject, "suspension lifted");
        Ok(lifted)
    }

    pub fn limits(&self) -> Result<Vec<LimitRecord>> {
        self.store.limits()
    }

    pub fn limit_set(&mut self, rec: LimitRecord) -> Result<()> {
        self.change(|store, _| store.put_limit(&rec))?;
        info!(subject = %rec.subject, limits = %rec.limits, "sending limit set");
        Ok(())
    }

    pub fn limit_del(&mut self, subject: &str) -> Result<()> {
        if !self.change(|store, _| store.del_limit(subject))? {
            return Err(Error::NotFound { what: "limit", key: subject.to_string() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_never_shortens_or_takes_over_an_operators_ban() {
        let key = SourceKey::from_ip("192.0.2.7".parse().unwrap());
        let op = VerdictRecord {
            key,
            action: Action::Drop,
            reason: VerdictReason::ManualBan,
            comment: Some("spammer".into()),
            created_at: 1,
            expires_at: None,
        };
        let m = merged_ban(Some(op), key, Some(100), "auth-abuse: 7 failed logins".into(), 50);
        assert_eq!((m.action, m.expires_at, m.comment.as_deref()), (Action::Ban, None, Some("spammer")));
        assert_eq!(owner(&m), Owner::Operator, "the operator's still: abuse forget leaves it");
        let lookup = VerdictRecord { reason: VerdictReason::Dynamic, expires_at: Some(10_000), ..m.clone() };
        let m = merged_ban(Some(lookup), key, Some(100), "auth-abuse: 7".into(), 50);
        assert_eq!((m.expires_at, m.comment.as_deref(), m.created_at), (Some(100), Some("auth-abuse: 7"), 50));
        assert_eq!(owner(&m), Owner::Abuse);
        let m = merged_ban(Some(m), key, Some(500), "suspended: account:alice".into(), 60);
        assert_eq!((owner(&m), m.expires_at), (Owner::Suspension, Some(500)), "a suspension outranks the score");
        let m = merged_ban(Some(m), key, Some(200), "conn-rate: 150 connections".into(), 70);
        assert_eq!((owner(&m), m.expires_at), (Owner::Suspension, Some(500)), "and is not shortened by it");
    }
}
