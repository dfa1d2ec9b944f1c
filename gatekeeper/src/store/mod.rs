//! Persistent state in SQLite: allow/deny ranges, per-source verdicts and
//! settings. The agent is the only writer; operators may inspect the file
//! with the sqlite3 CLI (times are unix seconds, networks are CIDR text).
//! Every mutating method is one transaction (a savepoint): on error nothing
//! changes. [`Store::begin`] opens an outer transaction around several of
//! them, which the agent uses to keep the database and the maps in step
//! (`agent::state`): commit when the maps took the change, roll back when
//! they did not.
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatekeeper_common::SourceKey;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::domain::{Action, VerdictReason};
use crate::error::{Error, Result};

mod mail;
mod ranges;

pub use mail::{LimitRecord, SuspensionRecord};
pub use ranges::{NewRange, RangeRecord};

/// `PRAGMA user_version` of the schema below.
const SCHEMA_VERSION: i64 = 5;

/// The ranges table (schema 2: egress kinds and the pool action; schema 4:
/// the explain pool action).
const RANGES_TABLE: &str = "
CREATE TABLE ranges (
    id         INTEGER PRIMARY KEY,      -- index into the GK_RANGE_HITS map
    kind       TEXT    NOT NULL CHECK (kind IN ('deny', 'allow', 'pool', 'exempt', 'smarthost')),
    net        TEXT    NOT NULL,         -- canonical CIDR, e.g. 192.0.2.0/24
    origin     TEXT    NOT NULL CHECK (origin IN ('manual', 'imported', 'learned')),
    source     TEXT    NOT NULL,         -- who or which list added it
    comment    TEXT,
    created_at INTEGER NOT NULL,         -- unix seconds
    expires_at INTEGER,                  -- unix seconds, NULL = never
    action     TEXT    CHECK (action IN ('drop', 'reject', 'explain')),  -- pools only
    UNIQUE (kind, net)
);
CREATE INDEX ranges_by_source ON ranges (kind, source);
CREATE INDEX ranges_by_expiry ON ranges (expires_at) WHERE expires_at IS NOT NULL;
";

/// Schema 1 -> 2: SQLite cannot widen a CHECK, so the table is rebuilt.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE ranges RENAME TO ranges_v1;
DROP INDEX ranges_by_source;
DROP INDEX ranges_by_expiry;
";

const SCHEMA: &str = "
CREATE TABLE verdicts (
    key        TEXT    PRIMARY KEY,      -- 192.0.2.1, 2001:db8:1:2::/64 or 2001:db8:1:2::25
    action     INTEGER NOT NULL,
    reason     INTEGER NOT NULL,
    comment    TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    net64      TEXT                      -- an IPv6 address key's /64
);
CREATE INDEX verdicts_by_expiry ON verdicts (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX verdicts_by_net64 ON verdicts (net64) WHERE net64 IS NOT NULL;
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Schema 2 -> 3: IPv6 address keys. Lookup drop verdicts of whole /64s
/// (what an older agent wrote for one address) go: the agent judges such
/// addresses again, one by one.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE verdicts ADD COLUMN net64 TEXT;
CREATE INDEX verdicts_by_net64 ON verdicts (net64) WHERE net64 IS NOT NULL;
DELETE FROM verdicts WHERE key LIKE '%/64' AND action = 1 AND reason <> 0;
";

/// Schema 3 -> 4: the pool action's CHECK widened for `explain`; rebuilt
/// as for 1 -> 2, then filled from `ranges_v3` (see `Store::init`).
const MIGRATE_3_TO_4: &str = "
ALTER TABLE ranges RENAME TO ranges_v3;
DROP INDEX IF EXISTS ranges_by_source;
DROP INDEX IF EXISTS ranges_by_expiry;
";

const RANGE_COLS: &str = "id, kind, net, origin, source, comment, created_at, expires_at, action";
const VERDICT_COLS: &str = "key, action, reason, comment, created_at, expires_at";

/// A per-source verdict. On the wire and in the database `action` and
/// `reason` are the datapath's numeric codes, `key` is the source as text
/// (`198.51.100.7`, `2001:db8:1:2::/64`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerdictRecord {
    #[serde(serialize_with = "serialize_key", deserialize_with = "deserialize_key")]
    pub key: SourceKey,
    #[serde(with = "crate::domain::by_code")]
    pub action: Action,
    #[serde(with = "crate::domain::by_code")]
    pub reason: VerdictReason,
    pub comment: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

fn serialize_key<S: serde::Serializer>(key: &SourceKey, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&key.display())
}

fn deserialize_key<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<SourceKey, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse_key(&text).ok_or_else(|| serde::de::Error::custom(format!("invalid source key {text:?}")))
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// How many lookup verdicts (every verdict but manual bans) the
    /// database holds, kept up to date once counted; `None`: count again.
    derived: Option<u64>,
}

/// What [`Store::put_derived_verdict`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Derived {
    /// The verdict was written (false: no room, nothing changed).
    pub written: bool,
    /// Verdicts removed to make room: expired ones, then the drop verdicts
    /// that expire first.
    pub removed: Vec<VerdictRecord>,
}

/// `verdicts.reason` of a manual ban, which is never a derived verdict.
fn ban_code() -> u32 {
    VerdictReason::ManualBan.code()
}

/// Creates the database file with mode 0600, or narrows an existing one
/// (and its WAL files, which SQLite creates with the database's mode) to
/// 0600: verdicts name sources and hostnames, which are nobody else's
/// business.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(|e| io("create", path, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::metadata(&p) {
            Ok(md) if md.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("chmod", &p, e))?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Maps a rusqlite error to [`Error::Store`] for `path`.
fn db(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Store { path: path.to_path_buf(), source }
}

/// A conversion error for a value in the database that does not parse.
fn bad_value(col: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, what.into())
}

fn verdict_row(row: &Row<'_>) -> rusqlite::Result<VerdictRecord> {
    let text: String = row.get(0)?;
    let key = parse_key(&text).ok_or_else(|| bad_value(0, format!("invalid verdict key {text:?}")))?;
    let reason: u32 = row.get(2)?;
    Ok(VerdictRecord {
        key,
        action: Action::of_code(row.get(1)?),
        reason: VerdictReason::of_code(reason)
            .ok_or_else(|| bad_value(2, format!("verdict {text}: unknown reason code {reason}")))?,
        comment: row.get(3)?,
        created_at: row.get(4)?,
        expires_at: row.get(5)?,
    })
}

/// Inverse of `SourceKey::display`; `None` unless `text` is exactly what
/// `display` would give.
fn parse_key(text: &str) -> Option<SourceKey> {
    SourceKey::parse_display(text)
}

impl Store {
    /// Opens (creating if needed) the database at `path`; the parent
    /// directory is created with mode 0700 if missing.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("creating state directory {}", dir.display()), e))?;
        }
        private_file(path)?;
        let conn = Connection::open(path).map_err(db(path))?;
        Store::init(conn, path.to_path_buf())
    }

    pub fn open_in_memory() -> Result<Store> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(db(&path))?;
        Store::init(conn, path)
    }

    fn init(mut conn: Connection, path: PathBuf) -> Result<Store> {
        let e = db(&path);
        conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)).map_err(&e)?;
        // FULL unless a change says otherwise (see `begin`): a change the
        // CLI was told is done (a ban above all) survives a power loss.
        conn.pragma_update(None, "synchronous", "FULL").map_err(&e)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(&e)?;
        match version {
            0 => {
                tx.execute_batch(RANGES_TABLE).map_err(&e)?;
                tx.execute_batch(SCHEMA).map_err(&e)?;
                tx.execute_batch(mail::SCHEMA).map_err(&e)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(&e)?;
            }
            1..=4 => {
                if version == 1 {
                    tx.execute_batch(MIGRATE_1_TO_2).map_err(&e)?;
                    tx.execute_batch(RANGES_TABLE).map_err(&e)?;
                    tx.execute_batch(
                        "INSERT INTO ranges (id, kind, net, origin, source, comment, created_at, expires_at)
                         SELECT id, kind, net, origin, source, comment, created_at, expires_at FROM ranges_v1;
                         DROP TABLE ranges_v1;",
                    )
                    .map_err(&e)?;
                }
                if version <= 2 {
                    tx.execute_batch(MIGRATE_2_TO_3).map_err(&e)?;
                }
                if (2..=3).contains(&version) {
                    // A version 1 table was just made with the wide CHECK.
                    tx.execute_batch(MIGRATE_3_TO_4).map_err(&e)?;
                    tx.execute_batch(RANGES_TABLE).map_err(&e)?;
                    tx.execute_batch(&format!(
                        "INSERT INTO ranges ({RANGE_COLS}) SELECT {RANGE_COLS} FROM ranges_v3; DROP TABLE ranges_v3;"
                    ))
                    .map_err(&e)?;
                }
                // 4 -> 5: the mail stream's tables.
                tx.execute_batch(mail::SCHEMA).map_err(&e)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(&e)?;
            }
            SCHEMA_VERSION => {}
            found => return Err(Error::StoreVersion { path: path.clone(), found, supported: SCHEMA_VERSION }),
        }
        tx.commit().map_err(&e)?;
        drop(e);
        Ok(Store { conn, path, derived: None })
    }

    /// Opens a transaction that the mutating methods then join: nothing is
    /// durable until [`Store::commit`]; [`Store::rollback`] undoes it all.
    ///
    /// `durable`: the commit survives a power loss (`synchronous=FULL`), as
    /// every change the CLI is told is done must; otherwise a crash of the
    /// agent, not of the machine (`NORMAL`), which is enough for what the
    /// agent derives again by itself (lookup verdicts, expiry).
    pub fn begin(&mut self, durable: bool) -> Result<()> {
        let e = db(&self.path);
        self.conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" }).map_err(&e)?;
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(&e)
    }

    pub fn commit(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(db(&self.path))
    }

    /// Undoes everything since [`Store::begin`].
    pub fn rollback(&mut self) -> Result<()> {
        self.derived = None;
        self.conn.execute_batch("ROLLBACK").map_err(db(&self.path))
    }

    /// Inserts or replaces the verdict for `v.key`.
    pub fn upsert_verdict(&mut self, v: &VerdictRecord) -> Result<()> {
        self.derived = None;
        self.write_verdict(v)
    }

    /// How many lookup verdicts (all but manual bans) there are.
    pub fn derived_count(&mut self) -> Result<u64> {
        if let Some(n) = self.derived {
            return Ok(n);
        }
        let n = self
            .conn
            .query_row("SELECT COUNT(*) FROM verdicts WHERE reason != ?1", [ban_code()], |r| r.get::<_, i64>(0))
            .map_err(db(&self.path))? as u64;
        self.derived = Some(n);
        Ok(n)
    }

    /// Writes a verdict the agent derived (a lookup's; never a manual
    /// ban), keeping at most `max` of them: when that many are there and
    /// `v.key` is not one of them, those expired by `now` are purged, and if
    /// none was, the drop verdict that expires first goes (its source
    /// becomes unknown and passes, as a lost verdict may). Pass verdicts and
    /// bans are never removed: when every derived verdict is a pass verdict,
    /// nothing is written. One savepoint: on error nothing changes.
    pub fn put_derived_verdict(&mut self, v: &VerdictRecord, max: u64, now: i64) -> Result<Derived> {
        if v.reason == VerdictReason::ManualBan {
            return Err(Error::InvalidInput("a manual ban is not a derived verdict".into()));
        }
        let replaces = self.verdict(v.key)?;
        if replaces.as_ref().is_some_and(|r| r.reason == VerdictReason::ManualBan) {
            return Err(Error::InvalidInput(format!("{} holds a manual ban", v.key.display())));
        }
        let mut out = Derived::default();
        if replaces.is_none() && self.derived_count()? >= max {
            out.removed = self.make_room(max.saturating_sub(1), now)?;
            if self.derived_count()? >= max {
                return Ok(out);
            }
        }
        self.write_verdict(v)?;
        if replaces.is_none() {
            self.derived = self.derived.map(|n| n + 1);
        }
        out.written = true;
        Ok(out)
    }

    /// Removes derived verdicts until at most `keep` are left: the expired
    /// ones, then drop verdicts that expire first; never a pass verdict or
    /// a ban. Returns what it removed.
    pub fn make_room(&mut self, keep: u64, now: i64) -> Result<Vec<VerdictRecord>> {
        let count = self.derived_count()?;
        if count <= keep {
            return Ok(Vec::new());
        }
        let e = db(&self.path);
        let tx = self.conn.savepoint().map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("DELETE FROM verdicts WHERE reason != ?1 AND expires_at <= ?2 RETURNING {VERDICT_COLS}"))
            .and_then(|mut s| s.query_map(params![ban_code(), now], verdict_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(&e)?;
        let left = count - gone.len() as u64;
        if left > keep {
            let more = tx
                .prepare(&format!(
                    "DELETE FROM verdicts WHERE key IN (
                       SELECT key FROM verdicts WHERE reason != ?1 AND action != ?2
                       ORDER BY expires_at IS NULL, expires_at, key LIMIT ?3)
                     RETURNING {VERDICT_COLS}"
                ))
                .and_then(|mut s| {
                    s.query_map(params![ban_code(), Action::Pass.code(), (left - keep) as i64], verdict_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(&e)?;
            gone.extend(more);
        }
        tx.commit().map_err(&e)?;
        self.derived = Some(count - gone.len() as u64);
        gone.sort_by_key(|v| v.key);
        Ok(gone)
    }

    fn write_verdict(&mut self, v: &VerdictRecord) -> Result<()> {
        if SourceKey::parse_display(&v.key.display()) != Some(v.key) {
            return Err(Error::InvalidCidr {
                input: v.key.display(),
                reason: "not a verdict key: an IPv4 address, an IPv6 /64 or an IPv6 address whose interface id is neither 0 nor all ones".into(),
            });
        }
        let net64 = v.key.is_host_v6().then(|| v.key.net().display());
        self.conn
            .execute(
                &format!(
                    "INSERT INTO verdicts ({VERDICT_COLS}, net64) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (key) DO UPDATE SET action = excluded.action, reason = excluded.reason,
                       comment = excluded.comment, created_at = excluded.created_at, expires_at = excluded.expires_at"
                ),
                params![
                    v.key.display(),
                    v.action.code(),
                    v.reason.code(),
                    v.comment,
                    v.created_at,
                    v.expires_at,
                    net64
                ],
            )
            .map_err(db(&self.path))?;
        Ok(())
    }

    /// Deletes the verdict for `key`; [`Error::NotFound`] if there is none.
    pub fn del_verdict(&mut self, key: SourceKey) -> Result<VerdictRecord> {
        let e = db(&self.path);
        let tx = self.conn.savepoint().map_err(&e)?;
        let rec = tx
            .query_row(
                &format!("DELETE FROM verdicts WHERE key = ?1 RETURNING {VERDICT_COLS}"),
                [key.display()],
                verdict_row,
            )
            .optional()
            .map_err(&e)?
            .ok_or_else(|| Error::NotFound { what: "verdict", key: key.display() })?;
        tx.commit().map_err(&e)?;
        if rec.reason != VerdictReason::ManualBan {
            self.derived = self.derived.map(|n| n.saturating_sub(1));
        }
        Ok(rec)
    }

    /// All verdicts (or those with `reason`), ordered by key.
    pub fn list_verdicts(&self, reason: Option<VerdictReason>) -> Result<Vec<VerdictRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {VERDICT_COLS} FROM verdicts WHERE ?1 IS NULL OR reason = ?1"))
            .map_err(db(&self.path))?;
        let mut out = stmt
            .query_map([reason.map(VerdictReason::code)], verdict_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db(&self.path))?;
        out.sort_by_key(|v| v.key);
        Ok(out)
    }

    /// How many verdicts there are.
    pub fn verdict_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM verdicts", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(db(&self.path))
    }

    /// The verdict for `key`, if any.
    pub fn verdict(&self, key: SourceKey) -> Result<Option<VerdictRecord>> {
        use rusqlite::OptionalExtension as _;
        self.conn
            .query_row(&format!("SELECT {VERDICT_COLS} FROM verdicts WHERE key = ?1"), [key.display()], verdict_row)
            .optional()
            .map_err(db(&self.path))
    }

    /// The live lookup drop verdicts of addresses in the IPv6 /64 `net`
    /// (bans not included), newest expiry first.
    pub fn address_drops(&self, net: SourceKey, now: i64) -> Result<Vec<VerdictRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VERDICT_COLS} FROM verdicts WHERE net64 = ?1 AND action = ?2 AND reason <> ?3
                   AND (expires_at IS NULL OR expires_at > ?4)
                 ORDER BY expires_at IS NULL DESC, expires_at DESC"
            ))
            .map_err(db(&self.path))?;
        stmt.query_map(params![net.display(), Action::Drop.code(), VerdictReason::ManualBan.code(), now], verdict_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db(&self.path))
    }

    /// Deletes and returns the verdicts with `expires_at <= now`.
    pub fn expire_verdicts(&mut self, now: i64) -> Result<Vec<VerdictRecord>> {
        let e = db(&self.path);
        let tx = self.conn.savepoint().map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("DELETE FROM verdicts WHERE expires_at <= ?1 RETURNING {VERDICT_COLS}"))
            .and_then(|mut s| s.query_map([now], verdict_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        let derived = gone.iter().filter(|v| v.reason != VerdictReason::ManualBan).count() as u64;
        self.derived = self.derived.map(|n| n.saturating_sub(derived));
        gone.sort_by_key(|v| v.key);
        Ok(gone)
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(db(&self.path))
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(db(&self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
