//! The mail stream's tables: where each log source stopped, the state the
//! scorer and the counters keep between restarts (opaque rows by space and
//! key, written in the same transaction as the positions they follow
//! from), suspensions and per-account sending limits.
use rusqlite::{params, OptionalExtension};

use super::{db, Store};
use crate::error::Result;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log_positions (
    source     TEXT PRIMARY KEY,         -- the [[logs]] entry's id
    position   TEXT NOT NULL,            -- JSON: file position or journal cursor
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mail_state (
    space TEXT NOT NULL,                 -- score, session, qid, sent, undeliverable, ...
    key   TEXT NOT NULL,
    value TEXT NOT NULL,                 -- JSON
    PRIMARY KEY (space, key)
);
CREATE TABLE IF NOT EXISTS suspensions (
    subject    TEXT PRIMARY KEY,         -- account:NAME or address:IP
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,         -- undeliverable recipients within the hour
    evidence   TEXT NOT NULL,            -- JSON list (redacted recipients)
    address    TEXT,                     -- the client address blocked with it
    created_at INTEGER NOT NULL,
    expires_at INTEGER                   -- NULL: until `suspend del`
);
CREATE TABLE IF NOT EXISTS send_counts (
    subject TEXT NOT NULL,               -- account:NAME or addr:IP
    kind    TEXT NOT NULL,               -- msg | rcpt
    hour    INTEGER NOT NULL,            -- unix hours
    n       INTEGER NOT NULL,
    PRIMARY KEY (subject, kind, hour)
);
CREATE TABLE IF NOT EXISTS send_limits (
    subject    TEXT PRIMARY KEY,         -- account:NAME or address:IP
    limits     TEXT NOT NULL,            -- none | 100/hour, 500/day
    created_at INTEGER NOT NULL
);
";

/// A suspended account or address.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SuspensionRecord {
    /// `account:NAME` or `address:IP`.
    pub subject: String,
    pub reason: String,
    pub count: u32,
    /// Recipients (redacted as configured) that made it.
    pub evidence: Vec<String>,
    /// The client address blocked on the limited ports with it.
    pub address: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A per-account (or per-address) sending limit set with `limit set`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LimitRecord {
    pub subject: String,
    /// `none` or `N/hour, M/day`.
    pub limits: String,
    pub created_at: i64,
}

impl Store {
    /// Where the log source `source` stopped (JSON), if it ever ran.
    pub fn log_position(&self, source: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT position FROM log_positions WHERE source = ?1", [source], |r| r.get(0))
            .optional()
            .map_err(db(&self.path))
    }

    pub fn set_log_position(&mut self, source: &str, position: &str, now: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO log_positions (source, position, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
                params![source, position, now],
            )
            .map(drop)
            .map_err(db(&self.path))
    }

    /// Writes (`Some`) or removes (`None`) one state row.
    pub fn put_mail_state(&mut self, space: &str, key: &str, value: Option<&str>) -> Result<()> {
        let r = match value {
            Some(v) => self.conn.execute(
                "INSERT INTO mail_state (space, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (space, key) DO UPDATE SET value = excluded.value",
                params![space, key, v],
            ),
            None => self.conn.execute("DELETE FROM mail_state WHERE space = ?1 AND key = ?2", params![space, key]),
        };
        r.map(drop).map_err(db(&self.path))
    }

    /// Every row of `space`, as `(key, value)`.
    pub fn mail_state(&self, space: &str) -> Result<Vec<(String, String)>> {
        let e = db(&self.path);
        let mut st =
            self.conn.prepare("SELECT key, value FROM mail_state WHERE space = ?1 ORDER BY key").map_err(&e)?;
        let rows = st.query_map([space], |r| Ok((r.get(0)?, r.get(1)?))).map_err(&e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&e)
    }

    /// Adds `n` to a sending counter (several agents sharing a store add
    /// up, never overwrite).
    pub fn add_send_count(&mut self, subject: &str, kind: &str, hour: i64, n: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO send_counts (subject, kind, hour, n) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (subject, kind, hour) DO UPDATE SET n = n + excluded.n",
                params![subject, kind, hour, n as i64],
            )
            .map(drop)
            .map_err(db(&self.path))
    }

    /// Deletes sending counters older than `min_hour`.
    pub fn prune_send_counts(&mut self, min_hour: i64) -> Result<()> {
        self.conn.execute("DELETE FROM send_counts WHERE hour < ?1", [min_hour]).map(drop).map_err(db(&self.path))
    }

    /// Sending counters from `min_hour` on, as `(subject, kind, hour, n)`;
    /// older ones are deleted.
    pub fn send_counts(&mut self, min_hour: i64) -> Result<Vec<(String, String, i64, u64)>> {
        let e = db(&self.path);
        self.conn.execute("DELETE FROM send_counts WHERE hour < ?1", [min_hour]).map_err(&e)?;
        let mut st = self.conn.prepare("SELECT subject, kind, hour, n FROM send_counts").map_err(&e)?;
        let rows =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))).map_err(&e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&e)
    }

    pub fn put_suspension(&mut self, s: &SuspensionRecord) -> Result<()> {
        let evidence = serde_json::to_string(&s.evidence).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "INSERT OR REPLACE INTO suspensions (subject, reason, count, evidence, address, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![s.subject, s.reason, s.count, evidence, s.address, s.created_at, s.expires_at],
            )
            .map(drop)
            .map_err(db(&self.path))
    }

    /// Removes a suspension; the removed record, if there was one.
    pub fn del_suspension(&mut self, subject: &str) -> Result<Option<SuspensionRecord>> {
        let old = self.suspension(subject)?;
        self.conn.execute("DELETE FROM suspensions WHERE subject = ?1", [subject]).map_err(db(&self.path))?;
        Ok(old)
    }

    pub fn suspension(&self, subject: &str) -> Result<Option<SuspensionRecord>> {
        Ok(self.suspensions()?.into_iter().find(|s| s.subject == subject))
    }

    pub fn suspensions(&self) -> Result<Vec<SuspensionRecord>> {
        let e = db(&self.path);
        let mut st = self
            .conn
            .prepare(
                "SELECT subject, reason, count, evidence, address, created_at, expires_at FROM suspensions ORDER BY created_at, subject",
            )
            .map_err(&e)?;
        let rows = st
            .query_map([], |r| {
                let evidence: String = r.get(3)?;
                Ok(SuspensionRecord {
                    subject: r.get(0)?,
                    reason: r.get(1)?,
                    count: r.get(2)?,
                    evidence: serde_json::from_str(&evidence).unwrap_or_default(),
                    address: r.get(4)?,
                    created_at: r.get(5)?,
                    expires_at: r.get(6)?,
                })
            })
            .map_err(&e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&e)
    }

    pub fn put_limit(&mut self, l: &LimitRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO send_limits (subject, limits, created_at) VALUES (?1, ?2, ?3)",
                params![l.subject, l.limits, l.created_at],
            )
            .map(drop)
            .map_err(db(&self.path))
    }

    pub fn del_limit(&mut self, subject: &str) -> Result<bool> {
        let n = self.conn.execute("DELETE FROM send_limits WHERE subject = ?1", [subject]).map_err(db(&self.path))?;
        Ok(n > 0)
    }

    pub fn limits(&self) -> Result<Vec<LimitRecord>> {
        let e = db(&self.path);
        let mut st =
            self.conn.prepare("SELECT subject, limits, created_at FROM send_limits ORDER BY subject").map_err(&e)?;
        let rows = st
            .query_map([], |r| Ok(LimitRecord { subject: r.get(0)?, limits: r.get(1)?, created_at: r.get(2)? }))
            .map_err(&e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_tables_round_trip() {
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(s.log_position("postfix:file:/x").unwrap(), None);
        s.set_log_position("postfix:file:/x", "{\"offset\":5}", 1).unwrap();
        s.set_log_position("postfix:file:/x", "{\"offset\":9}", 2).unwrap();
        assert_eq!(s.log_position("postfix:file:/x").unwrap().as_deref(), Some("{\"offset\":9}"));
        s.put_mail_state("score", "192.0.2.1", Some("{}")).unwrap();
        s.put_mail_state("score", "192.0.2.2", Some("{\"a\":1}")).unwrap();
        s.put_mail_state("score", "192.0.2.1", None).unwrap();
        assert_eq!(s.mail_state("score").unwrap(), vec![("192.0.2.2".into(), "{\"a\":1}".into())]);
        s.add_send_count("account:a", "msg", 10, 2).unwrap();
        s.add_send_count("account:a", "msg", 10, 3).unwrap();
        s.add_send_count("account:a", "msg", 5, 1).unwrap();
        assert_eq!(s.send_counts(9).unwrap(), vec![("account:a".into(), "msg".into(), 10, 5)]);
        assert_eq!(s.send_counts(0).unwrap().len(), 1, "hour 5 was deleted as too old");
        let rec = SuspensionRecord {
            subject: "account:alice".into(),
            reason: "sent to 11 undeliverable recipients within an hour".into(),
            count: 11,
            evidence: vec!["example.test".into()],
            address: Some("192.0.2.66".into()),
            created_at: 5,
            expires_at: None,
        };
        s.put_suspension(&rec).unwrap();
        assert_eq!(s.suspensions().unwrap(), vec![rec.clone()]);
        assert_eq!(s.del_suspension("account:alice").unwrap(), Some(rec));
        assert_eq!(s.del_suspension("account:alice").unwrap(), None);
        s.put_limit(&LimitRecord { subject: "account:bulk".into(), limits: "none".into(), created_at: 1 }).unwrap();
        assert_eq!(s.limits().unwrap().len(), 1);
        assert!(s.del_limit("account:bulk").unwrap());
        assert!(!s.del_limit("account:bulk").unwrap());
    }
}
