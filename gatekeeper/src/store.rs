//! Persistent state in SQLite: allow/deny ranges, per-source verdicts and
//! settings. The agent is the only writer; operators may inspect the file
//! with the sqlite3 CLI (times are unix seconds, networks are CIDR text).
//! Every mutating method is one transaction: on error nothing changes.
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatekeeper_common::{SourceKey, MAX_RANGES, MAX_RANGE_IDS};
use ipnet::IpNet;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::{Error, Result};
use crate::lists::check_net;

/// `PRAGMA user_version` of the schema below.
const SCHEMA_VERSION: i64 = 2;

/// The ranges table (schema 2: egress kinds and the pool action).
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
    action     TEXT    CHECK (action IN ('drop', 'reject')),  -- pools only
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
    key        TEXT    PRIMARY KEY,      -- 192.0.2.1 or 2001:db8:1:2::/64
    action     INTEGER NOT NULL,
    reason     INTEGER NOT NULL,
    comment    TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX verdicts_by_expiry ON verdicts (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const RANGE_COLS: &str = "id, kind, net, origin, source, comment, created_at, expires_at, action";
const VERDICT_COLS: &str = "key, action, reason, comment, created_at, expires_at";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeKind {
    /// Ingress: guarded SYNs from here are dropped.
    Deny,
    /// Ingress: always passes; wins over deny.
    Allow,
    /// Egress: a subscriber dynamic pool, blocked from guarded ports.
    Pool,
    /// Egress: subscribers who may send to guarded ports; wins over pool.
    Exempt,
    /// Egress: destinations pool subscribers may always reach.
    Smarthost,
}

/// The datapath table a kind of range lives in. Each table holds a
/// "winning" kind and possibly a "losing" one, and a longest-prefix lookup
/// in it must find the winner wherever the two overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RangeTable {
    /// Source ranges of the ingress gate: allow over deny.
    Ingress,
    /// Source ranges of the egress gate: exempt over pool.
    Subscriber,
    /// Destination ranges of the egress gate.
    Smarthost,
}

impl RangeTable {
    pub const ALL: [RangeTable; 3] = [RangeTable::Ingress, RangeTable::Subscriber, RangeTable::Smarthost];
    /// The kind that wins over the other in this table.
    pub fn winner(self) -> RangeKind {
        match self {
            RangeTable::Ingress => RangeKind::Allow,
            RangeTable::Subscriber => RangeKind::Exempt,
            RangeTable::Smarthost => RangeKind::Smarthost,
        }
    }
    /// The kind that an overlapping winner overrides, if any.
    pub fn loser(self) -> Option<RangeKind> {
        match self {
            RangeTable::Ingress => Some(RangeKind::Deny),
            RangeTable::Subscriber => Some(RangeKind::Pool),
            RangeTable::Smarthost => None,
        }
    }
    pub fn kinds(self) -> Vec<RangeKind> {
        std::iter::once(self.winner()).chain(self.loser()).collect()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RangeTable::Ingress => "ingress",
            RangeTable::Subscriber => "subscriber",
            RangeTable::Smarthost => "smarthost",
        }
    }
}

impl RangeKind {
    pub const ALL: [RangeKind; 5] =
        [RangeKind::Deny, RangeKind::Allow, RangeKind::Pool, RangeKind::Exempt, RangeKind::Smarthost];

    pub fn as_str(self) -> &'static str {
        match self {
            RangeKind::Deny => "deny",
            RangeKind::Allow => "allow",
            RangeKind::Pool => "pool",
            RangeKind::Exempt => "exempt",
            RangeKind::Smarthost => "smarthost",
        }
    }
    pub fn table(self) -> RangeTable {
        match self {
            RangeKind::Deny | RangeKind::Allow => RangeTable::Ingress,
            RangeKind::Pool | RangeKind::Exempt => RangeTable::Subscriber,
            RangeKind::Smarthost => RangeTable::Smarthost,
        }
    }
    /// The kind a range of this kind must not overlap (without `--force`).
    /// Exempt entries are meant to sit inside pools, so those two may.
    fn other(self) -> Option<RangeKind> {
        match self {
            RangeKind::Deny => Some(RangeKind::Allow),
            RangeKind::Allow => Some(RangeKind::Deny),
            RangeKind::Pool | RangeKind::Exempt | RangeKind::Smarthost => None,
        }
    }
    /// "deny range", "pool", ... as errors name it.
    pub fn what(self) -> &'static str {
        match self {
            RangeKind::Deny => "deny range",
            RangeKind::Allow => "allow range",
            RangeKind::Pool => "pool",
            RangeKind::Exempt => "exempt range",
            RangeKind::Smarthost => "smarthost range",
        }
    }
    /// The datapath code ([`gatekeeper_common::range_kind`]).
    pub fn code(self) -> u8 {
        use gatekeeper_common::range_kind::*;
        match self {
            RangeKind::Deny => DENY,
            RangeKind::Allow => ALLOW,
            RangeKind::Pool => POOL,
            RangeKind::Exempt => EXEMPT,
            RangeKind::Smarthost => SMARTHOST,
        }
    }
}

/// What a pool does with a blocked SYN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolAction {
    /// Drop it: the subscriber's client times out.
    #[default]
    Drop,
    /// Answer with a TCP RST: the client fails at once.
    Reject,
}

impl PoolAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolAction::Drop => "drop",
            PoolAction::Reject => "reject",
        }
    }
}

impl std::str::FromStr for PoolAction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "drop" => Ok(PoolAction::Drop),
            "reject" => Ok(PoolAction::Reject),
            _ => Err(format!("unknown pool action {s:?} (expected drop or reject)")),
        }
    }
}

impl fmt::Display for RangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Manual,
    Imported,
    Learned,
}

impl Origin {
    /// The [`gatekeeper_common::range_origin`] code.
    pub fn code(self) -> u16 {
        use gatekeeper_common::range_origin::*;
        match self {
            Origin::Manual => MANUAL,
            Origin::Imported => IMPORTED,
            Origin::Learned => LEARNED,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Manual => "manual",
            Origin::Imported => "imported",
            Origin::Learned => "learned",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RangeRecord {
    pub id: u32,
    pub kind: RangeKind,
    pub net: IpNet,
    pub origin: Origin,
    pub source: String,
    pub comment: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// Pools only: what a blocked SYN gets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<PoolAction>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewRange {
    pub net: IpNet,
    pub origin: Origin,
    pub source: String,
    pub comment: Option<String>,
    pub expires_at: Option<i64>,
    /// Pools only (`None` for a pool means drop).
    pub action: Option<PoolAction>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VerdictRecord {
    #[serde(serialize_with = "serialize_key")]
    pub key: SourceKey,
    pub action: u32,
    pub reason: u32,
    pub comment: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

fn serialize_key<S: serde::Serializer>(key: &SourceKey, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&key.display())
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// Maps a rusqlite error to [`Error::Store`] for `path`.
fn db(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Store { path: path.to_path_buf(), source }
}

/// A conversion error for a value in the database that does not parse.
fn bad_value(col: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, what.into())
}

fn range_row(row: &Row<'_>) -> rusqlite::Result<RangeRecord> {
    let id: i64 = row.get(0)?;
    let kind: String = row.get(1)?;
    let net: String = row.get(2)?;
    let origin: String = row.get(3)?;
    Ok(RangeRecord {
        id: u32::try_from(id)
            .ok()
            .filter(|&i| i < MAX_RANGE_IDS)
            .ok_or_else(|| bad_value(0, format!("range id {id} is outside 0..{MAX_RANGE_IDS}")))?,
        kind: parse_kind(&kind).ok_or_else(|| bad_value(1, format!("range id {id}: unknown kind {kind:?}")))?,
        net: net.parse().map_err(|_| bad_value(2, format!("range id {id}: invalid net {net:?}")))?,
        origin: match origin.as_str() {
            "manual" => Origin::Manual,
            "imported" => Origin::Imported,
            "learned" => Origin::Learned,
            _ => return Err(bad_value(3, format!("range id {id}: unknown origin {origin:?}"))),
        },
        source: row.get(4)?,
        comment: row.get(5)?,
        created_at: row.get(6)?,
        expires_at: row.get(7)?,
        action: match row.get::<_, Option<String>>(8)? {
            None => None,
            Some(a) => Some(a.parse().map_err(|e: String| bad_value(8, format!("range id {id}: {e}")))?),
        },
    })
}

fn parse_kind(s: &str) -> Option<RangeKind> {
    RangeKind::ALL.into_iter().find(|k| k.as_str() == s)
}

fn verdict_row(row: &Row<'_>) -> rusqlite::Result<VerdictRecord> {
    let text: String = row.get(0)?;
    let key = parse_key(&text).ok_or_else(|| bad_value(0, format!("invalid verdict key {text:?}")))?;
    Ok(VerdictRecord {
        key,
        action: row.get(1)?,
        reason: row.get(2)?,
        comment: row.get(3)?,
        created_at: row.get(4)?,
        expires_at: row.get(5)?,
    })
}

/// Inverse of `SourceKey::display`; `None` unless `text` is exactly what
/// `display` would give.
fn parse_key(text: &str) -> Option<SourceKey> {
    let ip: IpAddr = match text.strip_suffix("/64") {
        Some(v6) => IpAddr::V6(v6.parse().ok()?),
        None => IpAddr::V4(text.parse().ok()?),
    };
    let key = SourceKey::from_ip(ip);
    (key.display() == text).then_some(key)
}

/// Nets indexed for "which member contains (or equals) this net" lookups:
/// one hash probe per prefix length present, so cheap when either side is
/// large and uses few distinct prefix lengths.
struct Cover {
    nets: HashSet<IpNet>,
    v4_lens: BTreeSet<u8>,
    v6_lens: BTreeSet<u8>,
}

impl Cover {
    fn new(nets: impl IntoIterator<Item = IpNet>) -> Cover {
        let mut c = Cover { nets: HashSet::new(), v4_lens: BTreeSet::new(), v6_lens: BTreeSet::new() };
        for n in nets {
            match n {
                IpNet::V4(_) => c.v4_lens.insert(n.prefix_len()),
                IpNet::V6(_) => c.v6_lens.insert(n.prefix_len()),
            };
            c.nets.insert(n);
        }
        c
    }

    fn covering(&self, net: IpNet) -> Option<IpNet> {
        let lens = if net.addr().is_ipv4() { &self.v4_lens } else { &self.v6_lens };
        lens.range(..=net.prefix_len())
            .filter_map(|&len| IpNet::new(net.addr(), len).ok().map(|n| n.trunc()))
            .find(|n| self.nets.contains(n))
    }
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
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(&e)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(&e)?;
        match version {
            0 => {
                tx.execute_batch(RANGES_TABLE).map_err(&e)?;
                tx.execute_batch(SCHEMA).map_err(&e)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(&e)?;
            }
            1 => {
                tx.execute_batch(MIGRATE_1_TO_2).map_err(&e)?;
                tx.execute_batch(RANGES_TABLE).map_err(&e)?;
                tx.execute_batch(
                    "INSERT INTO ranges (id, kind, net, origin, source, comment, created_at, expires_at)
                     SELECT id, kind, net, origin, source, comment, created_at, expires_at FROM ranges_v1;
                     DROP TABLE ranges_v1;",
                )
                .map_err(&e)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(&e)?;
            }
            SCHEMA_VERSION => {}
            found => return Err(Error::StoreVersion { path: path.clone(), found, supported: SCHEMA_VERSION }),
        }
        tx.commit().map_err(&e)?;
        drop(e);
        Ok(Store { conn, path })
    }

    /// Adds all or nothing and returns the records added. Each record gets
    /// the smallest free id in `0..MAX_RANGE_IDS` (allow and deny share the
    /// id space).
    ///
    /// Errors: [`Error::InvalidCidr`] for a non-canonical net;
    /// [`Error::Duplicate`] if a net of the same kind exists (unless
    /// `skip_existing`, which silently skips those) or is given twice;
    /// [`Error::Overlap`] if a net overlaps one of the other kind (unless
    /// `force`); [`Error::Full`] if a kind would exceed [`MAX_RANGES`] per
    /// address family or the id space would be exhausted.
    pub fn add_ranges(
        &mut self,
        kind: RangeKind,
        new: &[NewRange],
        force: bool,
        skip_existing: bool,
        now: i64,
    ) -> Result<Vec<RangeRecord>> {
        for n in new {
            check_net(n.net).map_err(|reason| Error::InvalidCidr { input: n.net.to_string(), reason })?;
        }
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;

        // Duplicates, by the (kind, net) index.
        let mut batch: HashSet<IpNet> = HashSet::with_capacity(new.len());
        let mut todo: Vec<&NewRange> = Vec::with_capacity(new.len());
        {
            let mut find =
                tx.prepare("SELECT id, source, comment FROM ranges WHERE kind = ?1 AND net = ?2").map_err(&e)?;
            for n in new {
                if !batch.insert(n.net) {
                    return Err(Error::Duplicate {
                        what: kind.what(),
                        net: n.net.to_string(),
                        detail: Some("given twice in this batch".into()),
                    });
                }
                let existing = find
                    .query_row(params![kind.as_str(), n.net.to_string()], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
                    })
                    .optional()
                    .map_err(&e)?;
                match existing {
                    None => todo.push(n),
                    Some(_) if skip_existing => {}
                    Some((id, source, comment)) => {
                        let comment = comment.map(|c| format!(", comment {c:?}")).unwrap_or_default();
                        let detail = format!("id {id}, source {source:?}{comment}");
                        return Err(Error::Duplicate {
                            what: kind.what(),
                            net: n.net.to_string(),
                            detail: Some(detail),
                        });
                    }
                }
            }
        }

        if let (false, Some(other_kind)) = (force, kind.other()) {
            let mut other: Vec<IpNet> = tx
                .prepare("SELECT net FROM ranges WHERE kind = ?1")
                .and_then(|mut s| {
                    let rows = s.query_map([other_kind.as_str()], |r| {
                        let net: String = r.get(0)?;
                        net.parse().map_err(|_| bad_value(0, format!("invalid net {net:?}")))
                    })?;
                    rows.collect::<rusqlite::Result<Vec<IpNet>>>()
                })
                .map_err(&e)?;
            let overlap = |net: IpNet, other_net: IpNet| Error::Overlap {
                kind: kind.as_str(),
                net: net.to_string(),
                other_kind: other_kind.as_str(),
                other: other_net.to_string(),
            };
            // New nets inside (or equal to) an existing one of the other kind…
            let others = Cover::new(other.iter().copied());
            if let Some((n, o)) = todo.iter().find_map(|n| others.covering(n.net).map(|o| (n.net, o))) {
                return Err(overlap(n, o));
            }
            // …and existing nets of the other kind inside a new one.
            other.sort_unstable();
            let news = Cover::new(todo.iter().map(|n| n.net));
            if let Some((n, o)) = other.iter().find_map(|&o| news.covering(o).map(|n| (n, o))) {
                return Err(overlap(n, o));
            }
        }

        // Capacity per datapath table and family (IPv6 CIDR text contains
        // ':', IPv4 never does).
        let table = kind.table();
        let kinds = table.kinds();
        let (have_v4, have_v6): (i64, i64) = tx
            .query_row(
                "SELECT count(*) FILTER (WHERE instr(net, ':') = 0), count(*) FILTER (WHERE instr(net, ':') > 0)
                 FROM ranges WHERE kind = ?1 OR kind = ?2",
                params![kinds[0].as_str(), kinds.last().copied().unwrap_or(kind).as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&e)?;
        for (v4, have) in [(true, have_v4), (false, have_v6)] {
            let adding = todo.iter().filter(|n| n.net.addr().is_ipv4() == v4).count();
            if adding > 0 && usize::try_from(have).unwrap_or(usize::MAX).saturating_add(adding) > MAX_RANGES as usize {
                let what = match (table, v4) {
                    (RangeTable::Ingress, true) => "IPv4 allow and deny ranges",
                    (RangeTable::Ingress, false) => "IPv6 allow and deny ranges",
                    (RangeTable::Subscriber, true) => "IPv4 pool and exempt ranges",
                    (RangeTable::Subscriber, false) => "IPv6 pool and exempt ranges",
                    (RangeTable::Smarthost, true) => "IPv4 smarthost ranges",
                    (RangeTable::Smarthost, false) => "IPv6 smarthost ranges",
                };
                return Err(Error::Full { what, capacity: MAX_RANGES.into() });
            }
        }
        let used: Vec<u32> = tx
            .prepare("SELECT id FROM ranges WHERE id >= 0 AND id < ?1 ORDER BY id")
            .and_then(|mut s| s.query_map([MAX_RANGE_IDS], |r| r.get(0))?.collect::<rusqlite::Result<Vec<u32>>>())
            .map_err(&e)?;
        let full_ids = || Error::Full { what: "range id space", capacity: MAX_RANGE_IDS.into() };
        if used.len() + todo.len() > MAX_RANGE_IDS as usize {
            return Err(full_ids());
        }

        // Smallest free ids: walk the sorted used ids and take the gaps.
        let mut ids = Vec::with_capacity(todo.len());
        let mut used_iter = used.iter().copied().peekable();
        let mut candidate = 0u32;
        while ids.len() < todo.len() {
            if candidate >= MAX_RANGE_IDS {
                return Err(full_ids());
            }
            while used_iter.next_if(|&u| u < candidate).is_some() {}
            if used_iter.next_if_eq(&candidate).is_none() {
                ids.push(candidate);
            }
            candidate += 1;
        }

        let mut added = Vec::with_capacity(todo.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO ranges (id, kind, net, origin, source, comment, created_at, expires_at, action)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(&e)?;
            for (n, id) in todo.into_iter().zip(ids) {
                let rec = RangeRecord {
                    id,
                    kind,
                    net: n.net,
                    origin: n.origin,
                    source: n.source.clone(),
                    comment: n.comment.clone(),
                    created_at: now,
                    expires_at: n.expires_at,
                    action: if kind == RangeKind::Pool { Some(n.action.unwrap_or_default()) } else { None },
                };
                insert
                    .execute(params![
                        rec.id,
                        kind.as_str(),
                        rec.net.to_string(),
                        rec.origin.as_str(),
                        rec.source,
                        rec.comment,
                        rec.created_at,
                        rec.expires_at,
                        rec.action.map(PoolAction::as_str)
                    ])
                    .map_err(&e)?;
                added.push(rec);
            }
        }
        tx.commit().map_err(&e)?;
        Ok(added)
    }

    /// Deletes the range `net` of `kind`; [`Error::NotFound`] if there is none.
    pub fn del_range(&mut self, kind: RangeKind, net: IpNet) -> Result<RangeRecord> {
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let rec = tx
            .query_row(
                &format!("DELETE FROM ranges WHERE kind = ?1 AND net = ?2 RETURNING {RANGE_COLS}"),
                params![kind.as_str(), net.to_string()],
                range_row,
            )
            .optional()
            .map_err(&e)?
            .ok_or_else(|| Error::NotFound { what: kind.what(), key: net.to_string() })?;
        tx.commit().map_err(&e)?;
        Ok(rec)
    }

    /// Deletes the ranges of `kind` from `source` whose net is not in `keep`
    /// (list re-import with `--replace`) and returns them.
    pub fn del_ranges_from_source_except(
        &mut self,
        kind: RangeKind,
        source: &str,
        keep: &[IpNet],
    ) -> Result<Vec<RangeRecord>> {
        let keep: HashSet<IpNet> = keep.iter().copied().collect();
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("SELECT {RANGE_COLS} FROM ranges WHERE kind = ?1 AND source = ?2"))
            .and_then(|mut s| {
                s.query_map(params![kind.as_str(), source], range_row)?.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(&e)?;
        gone.retain(|r| !keep.contains(&r.net));
        {
            let mut del = tx.prepare("DELETE FROM ranges WHERE id = ?1").map_err(&e)?;
            for r in &gone {
                del.execute([r.id]).map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)?;
        sort_ranges(&mut gone);
        Ok(gone)
    }

    /// All ranges (or those of `kind`), ordered by kind (deny first), family,
    /// address and prefix length.
    pub fn list_ranges(&self, kind: Option<RangeKind>) -> Result<Vec<RangeRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {RANGE_COLS} FROM ranges WHERE ?1 IS NULL OR kind = ?1"))
            .map_err(db(&self.path))?;
        let mut out = stmt
            .query_map([kind.map(RangeKind::as_str)], range_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db(&self.path))?;
        sort_ranges(&mut out);
        Ok(out)
    }

    /// Deletes and returns the ranges with `expires_at <= now`.
    pub fn expire_ranges(&mut self, now: i64) -> Result<Vec<RangeRecord>> {
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("DELETE FROM ranges WHERE expires_at <= ?1 RETURNING {RANGE_COLS}"))
            .and_then(|mut s| s.query_map([now], range_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        sort_ranges(&mut gone);
        Ok(gone)
    }

    /// Inserts or replaces the verdict for `v.key`.
    pub fn upsert_verdict(&mut self, v: &VerdictRecord) -> Result<()> {
        if SourceKey::from_ip(v.key.to_ip()) != v.key {
            return Err(Error::InvalidCidr {
                input: v.key.display(),
                reason: "not a verdict key: an IPv6 key must be a /64 with its low 64 bits zero".into(),
            });
        }
        self.conn
            .execute(
                &format!(
                    "INSERT INTO verdicts ({VERDICT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (key) DO UPDATE SET action = excluded.action, reason = excluded.reason,
                       comment = excluded.comment, created_at = excluded.created_at, expires_at = excluded.expires_at"
                ),
                params![v.key.display(), v.action, v.reason, v.comment, v.created_at, v.expires_at],
            )
            .map_err(db(&self.path))?;
        Ok(())
    }

    /// Deletes the verdict for `key`; [`Error::NotFound`] if there is none.
    pub fn del_verdict(&mut self, key: SourceKey) -> Result<VerdictRecord> {
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
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
        Ok(rec)
    }

    /// All verdicts (or those with `reason`), ordered by key.
    pub fn list_verdicts(&self, reason: Option<u32>) -> Result<Vec<VerdictRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {VERDICT_COLS} FROM verdicts WHERE ?1 IS NULL OR reason = ?1"))
            .map_err(db(&self.path))?;
        let mut out = stmt
            .query_map([reason], verdict_row)
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

    /// Deletes and returns the verdicts with `expires_at <= now`.
    pub fn expire_verdicts(&mut self, now: i64) -> Result<Vec<VerdictRecord>> {
        let e = db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("DELETE FROM verdicts WHERE expires_at <= ?1 RETURNING {VERDICT_COLS}"))
            .and_then(|mut s| s.query_map([now], verdict_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
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

fn sort_ranges(r: &mut [RangeRecord]) {
    r.sort_by_key(|r| (r.kind, r.net));
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekeeper_common::{action, verdict_reason};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nr(s: &str) -> NewRange {
        NewRange {
            net: net(s),
            origin: Origin::Manual,
            source: "manual".into(),
            comment: None,
            expires_at: None,
            action: None,
        }
    }

    fn nets(store: &Store, kind: RangeKind) -> Vec<String> {
        store.list_ranges(Some(kind)).unwrap().iter().map(|r| r.net.to_string()).collect()
    }

    fn verdict(ip: &str, reason: u32, expires_at: Option<i64>) -> VerdictRecord {
        VerdictRecord {
            key: SourceKey::from_ip(ip.parse().unwrap()),
            action: action::DROP,
            reason,
            comment: None,
            created_at: 100,
            expires_at,
        }
    }

    #[test]
    fn verdict_point_lookup() {
        let mut s = Store::open_in_memory().unwrap();
        let key = SourceKey::from_ip("2001:db8:1:2::9".parse().unwrap());
        assert_eq!(s.verdict(key).unwrap(), None);
        assert_eq!(s.verdict_count().unwrap(), 0);
        let v =
            VerdictRecord { key, action: 1, reason: 3, comment: Some("x".into()), created_at: 5, expires_at: Some(50) };
        s.upsert_verdict(&v).unwrap();
        assert_eq!(s.verdict(key).unwrap(), Some(v));
        assert_eq!(s.verdict_count().unwrap(), 1);
        assert_eq!(s.verdict(SourceKey::from_ip("192.0.2.1".parse().unwrap())).unwrap(), None);
    }

    #[test]
    fn add_list_and_order() {
        let mut s = Store::open_in_memory().unwrap();
        let added = s
            .add_ranges(
                RangeKind::Deny,
                &[nr("2001:db8::/32"), nr("198.51.100.0/24"), nr("192.0.2.0/25"), nr("192.0.2.0/24")],
                false,
                false,
                7,
            )
            .unwrap();
        assert_eq!(added.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(added.iter().all(|r| r.created_at == 7 && r.kind == RangeKind::Deny));
        s.add_ranges(RangeKind::Allow, &[nr("203.0.113.5/32")], false, false, 8).unwrap();
        assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24", "192.0.2.0/25", "198.51.100.0/24", "2001:db8::/32"]);
        let all = s.list_ranges(None).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[4].kind, RangeKind::Allow);
        assert_eq!(all[4].id, 4);
        assert_eq!(Origin::Learned.code(), gatekeeper_common::range_origin::LEARNED);
        assert_eq!(RangeKind::Allow.to_string(), "allow");
        let json = serde_json::to_string(&all[4]).unwrap();
        assert!(json.contains(r#""kind":"allow""#) && json.contains(r#""net":"203.0.113.5/32""#), "{json}");
    }

    #[test]
    fn schema_1_database_is_migrated_with_its_ranges() {
        let dir = std::env::temp_dir().join(format!("gk-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gatekeeper.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ranges (id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('deny', 'allow')),
                   net TEXT NOT NULL, origin TEXT NOT NULL, source TEXT NOT NULL, comment TEXT,
                   created_at INTEGER NOT NULL, expires_at INTEGER, UNIQUE (kind, net));
                 CREATE INDEX ranges_by_source ON ranges (kind, source);
                 CREATE INDEX ranges_by_expiry ON ranges (expires_at) WHERE expires_at IS NOT NULL;
                 CREATE TABLE verdicts (key TEXT PRIMARY KEY, action INTEGER NOT NULL, reason INTEGER NOT NULL,
                   comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER);
                 CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO ranges VALUES (7, 'deny', '192.0.2.0/24', 'manual', 'cli', 'old', 5, NULL);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        let all = s.list_ranges(None).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].id, all[0].kind, all[0].comment.as_deref(), all[0].action),
            (7, RangeKind::Deny, Some("old"), None)
        );
        let mut pool = nr("198.51.100.0/24");
        pool.action = Some(PoolAction::Reject);
        let added = s.add_ranges(RangeKind::Pool, &[pool], false, false, 0).unwrap();
        assert_eq!(added[0].action, Some(PoolAction::Reject));
        // Exempt inside a pool is the point of exempt entries: no --force.
        s.add_ranges(RangeKind::Exempt, &[nr("198.51.100.25/32")], false, false, 0).unwrap();
        s.add_ranges(RangeKind::Smarthost, &[nr("192.0.2.25/32")], false, false, 0).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let pools = s.list_ranges(Some(RangeKind::Pool)).unwrap();
        assert_eq!(pools[0].action, Some(PoolAction::Reject));
        assert_eq!(s.list_ranges(None).unwrap().len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_canonical_net_rejected() {
        let mut s = Store::open_in_memory().unwrap();
        let bad = NewRange { net: IpNet::new("192.0.2.1".parse().unwrap(), 24).unwrap(), ..nr("0.0.0.0/0") };
        assert!(matches!(
            s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), bad], false, false, 0),
            Err(Error::InvalidCidr { .. })
        ));
        assert!(s.list_ranges(None).unwrap().is_empty());
    }

    #[test]
    fn duplicate_rejected_and_nothing_added() {
        let mut s = Store::open_in_memory().unwrap();
        let first = NewRange { comment: Some("office".into()), ..nr("192.0.2.0/24") };
        s.add_ranges(RangeKind::Deny, &[first], false, false, 0).unwrap();
        let err = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("192.0.2.0/24")], false, false, 0).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Duplicate { .. }));
        assert!(msg.contains("192.0.2.0/24") && msg.contains("id 0") && msg.contains("office"), "{msg}");
        assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
        // Twice in one batch.
        let err = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("10.0.0.0/8")], false, true, 0).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
        // skip_existing: the existing one is skipped and not returned.
        let added = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("192.0.2.0/24")], false, true, 0).unwrap();
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].net, net("10.0.0.0/8"));
        assert_eq!(s.list_ranges(None).unwrap().iter().find(|r| r.id == 0).unwrap().comment.as_deref(), Some("office"));
        // The same net may be both allow and deny only with force.
        assert!(matches!(
            s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], false, false, 0),
            Err(Error::Overlap { .. })
        ));
        s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], true, false, 0).unwrap();
    }

    #[test]
    fn overlap_both_directions_and_force() {
        let mut s = Store::open_in_memory().unwrap();
        s.add_ranges(RangeKind::Allow, &[nr("192.0.2.0/24"), nr("2001:db8:1::/48")], false, false, 0).unwrap();
        s.add_ranges(RangeKind::Deny, &[nr("198.51.100.0/24")], false, false, 0).unwrap();
        let cases = [
            (RangeKind::Deny, "192.0.2.128/25", "192.0.2.0/24"), // deny inside allow
            (RangeKind::Deny, "192.0.0.0/16", "192.0.2.0/24"),   // deny contains allow
            (RangeKind::Deny, "2001:db8::/32", "2001:db8:1::/48"),
            (RangeKind::Allow, "198.51.100.7/32", "198.51.100.0/24"), // allow inside deny
            (RangeKind::Allow, "0.0.0.0/0", "198.51.100.0/24"),       // allow contains deny
        ];
        for (kind, n, other) in cases {
            match s.add_ranges(kind, &[nr("203.0.113.0/24"), nr(n)], false, false, 0) {
                Err(Error::Overlap { kind: k, net: got, other: o, .. }) => {
                    assert_eq!((k, got.as_str(), o.as_str()), (kind.as_str(), n, other));
                }
                r => panic!("{n}: expected overlap, got {r:?}"),
            }
        }
        assert_eq!(s.list_ranges(None).unwrap().len(), 3);
        // Neighbours and other families do not overlap.
        s.add_ranges(RangeKind::Deny, &[nr("192.0.3.0/24"), nr("2001:db8:2::/48"), nr("::/0")], false, false, 0)
            .unwrap_err();
        s.add_ranges(RangeKind::Deny, &[nr("192.0.3.0/24"), nr("2001:db8:2::/48")], false, false, 0).unwrap();
        let added = s.add_ranges(RangeKind::Deny, &[nr("192.0.2.128/25")], true, false, 0).unwrap();
        assert_eq!(added.len(), 1);
    }

    #[test]
    fn ids_reuse_freed_and_never_collide() {
        let mut s = Store::open_in_memory().unwrap();
        let batch: Vec<NewRange> = (0..10).map(|i| nr(&format!("10.0.{i}.0/24"))).collect();
        s.add_ranges(RangeKind::Deny, &batch, false, false, 0).unwrap();
        s.del_range(RangeKind::Deny, net("10.0.3.0/24")).unwrap();
        s.del_range(RangeKind::Deny, net("10.0.7.0/24")).unwrap();
        let added = s
            .add_ranges(
                RangeKind::Allow,
                &[nr("172.16.0.0/16"), nr("172.17.0.0/16"), nr("172.18.0.0/16")],
                false,
                false,
                0,
            )
            .unwrap();
        assert_eq!(added.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 7, 10]);
        let all = s.list_ranges(None).unwrap();
        let ids: HashSet<u32> = all.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), all.len());
        assert_eq!(ids, (0..11).collect());
    }

    #[test]
    fn full_family_is_rejected_whole() {
        let mut s = Store::open_in_memory().unwrap();
        // MAX_RANGES + 1 IPv4 /32s; nothing may be added.
        let batch: Vec<NewRange> =
            (0..=MAX_RANGES).map(|i| nr(&format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))).collect();
        match s.add_ranges(RangeKind::Deny, &batch, false, false, 0) {
            Err(Error::Full { what, capacity }) => {
                assert_eq!(what, "IPv4 allow and deny ranges");
                assert_eq!(capacity, u64::from(MAX_RANGES));
            }
            r => panic!("expected Full, got {:?}", r.map(|v| v.len())),
        }
        assert!(s.list_ranges(None).unwrap().is_empty());
    }

    #[test]
    fn id_space_exhaustion() {
        let mut s = Store::open_in_memory().unwrap();
        // Fill every id: 131072 deny and 131072 pool IPv4 /32s.
        s.conn
            .execute(
                "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1)
                 INSERT INTO ranges SELECT i, CASE WHEN i < ?2 THEN 'deny' ELSE 'pool' END,
                   printf('10.%d.%d.%d/32', (i >> 16) & 255, (i >> 8) & 255, i & 255), 'manual', 'test', NULL, 0, NULL, NULL FROM c",
                [MAX_RANGE_IDS, MAX_RANGES],
            )
            .unwrap();
        match s.add_ranges(RangeKind::Deny, &[nr("2001:db8::/32")], true, false, 0) {
            Err(Error::Full { what: "range id space", capacity }) => assert_eq!(capacity, u64::from(MAX_RANGE_IDS)),
            r => panic!("expected Full, got {r:?}"),
        }
        s.del_range(RangeKind::Pool, net("10.3.255.255/32")).unwrap();
        let added = s.add_ranges(RangeKind::Deny, &[nr("2001:db8::/32")], true, false, 0).unwrap();
        assert_eq!(added[0].id, MAX_RANGE_IDS - 1);
    }

    #[test]
    fn delete_and_not_found() {
        let mut s = Store::open_in_memory().unwrap();
        s.add_ranges(RangeKind::Deny, &[nr("192.0.2.0/24")], false, false, 0).unwrap();
        assert!(matches!(
            s.del_range(RangeKind::Allow, net("192.0.2.0/24")),
            Err(Error::NotFound { what: "allow range", .. })
        ));
        assert_eq!(s.del_range(RangeKind::Deny, net("192.0.2.0/24")).unwrap().net, net("192.0.2.0/24"));
        let err = s.del_range(RangeKind::Deny, net("192.0.2.0/24")).unwrap_err();
        assert_eq!(err.to_string(), "deny range 192.0.2.0/24 not found");
    }

    #[test]
    fn replace_by_source() {
        let mut s = Store::open_in_memory().unwrap();
        let from = |n: &str, src: &str| NewRange { source: src.into(), origin: Origin::Imported, ..nr(n) };
        s.add_ranges(
            RangeKind::Deny,
            &[from("10.0.0.0/8", "drop"), from("11.0.0.0/8", "drop"), from("12.0.0.0/8", "other")],
            false,
            false,
            0,
        )
        .unwrap();
        s.add_ranges(RangeKind::Allow, &[from("13.0.0.0/8", "drop")], false, false, 0).unwrap();
        let gone = s.del_ranges_from_source_except(RangeKind::Deny, "drop", &[net("11.0.0.0/8")]).unwrap();
        assert_eq!(gone.iter().map(|r| r.net.to_string()).collect::<Vec<_>>(), ["10.0.0.0/8"]);
        assert_eq!(nets(&s, RangeKind::Deny), ["11.0.0.0/8", "12.0.0.0/8"]);
        assert_eq!(nets(&s, RangeKind::Allow), ["13.0.0.0/8"]);
    }

    #[test]
    fn range_expiry() {
        let mut s = Store::open_in_memory().unwrap();
        let exp = |n: &str, at: Option<i64>| NewRange { expires_at: at, ..nr(n) };
        s.add_ranges(
            RangeKind::Deny,
            &[exp("10.0.0.0/8", Some(100)), exp("11.0.0.0/8", Some(200)), exp("12.0.0.0/8", None)],
            false,
            false,
            0,
        )
        .unwrap();
        assert!(s.expire_ranges(99).unwrap().is_empty());
        let gone = s.expire_ranges(100).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].expires_at, Some(100));
        assert_eq!(nets(&s, RangeKind::Deny), ["11.0.0.0/8", "12.0.0.0/8"]);
        assert_eq!(s.expire_ranges(i64::MAX).unwrap().len(), 1);
        assert_eq!(nets(&s, RangeKind::Deny), ["12.0.0.0/8"]);
    }

    #[test]
    fn verdicts_upsert_list_delete_expire() {
        let mut s = Store::open_in_memory().unwrap();
        s.upsert_verdict(&verdict("192.0.2.1", verdict_reason::NO_PTR, Some(500))).unwrap();
        s.upsert_verdict(&verdict("2001:db8:1:2::99", verdict_reason::DYNAMIC, None)).unwrap();
        let mut replaced = verdict("192.0.2.1", verdict_reason::MANUAL_BAN, Some(900));
        replaced.comment = Some("spam run".into());
        s.upsert_verdict(&replaced).unwrap();
        let all = s.list_verdicts(None).unwrap();
        assert_eq!(all.len(), 2);
        // IPv4 keys (::ffff:a.b.c.d) sort before global IPv6 keys.
        assert_eq!(all[0], replaced);
        assert_eq!(all[1].key.display(), "2001:db8:1:2::/64");
        assert_eq!(s.list_verdicts(Some(verdict_reason::DYNAMIC)).unwrap().len(), 1);
        assert!(s.list_verdicts(Some(verdict_reason::NO_PTR)).unwrap().is_empty());
        let json = serde_json::to_string(&all[0]).unwrap();
        assert!(json.contains(r#""key":"192.0.2.1""#), "{json}");

        assert_eq!(s.expire_verdicts(899).unwrap().len(), 0);
        assert_eq!(s.expire_verdicts(900).unwrap(), [replaced]);
        let k = SourceKey::from_ip("2001:db8:1:2::1".parse().unwrap());
        assert_eq!(s.del_verdict(k).unwrap().reason, verdict_reason::DYNAMIC);
        assert_eq!(s.del_verdict(k).unwrap_err().to_string(), "verdict 2001:db8:1:2::/64 not found");
        // A v6 key with host bits is not a valid key.
        let mut bad = verdict("2001:db8::1", 0, None);
        bad.key.addr[15] = 1;
        assert!(matches!(s.upsert_verdict(&bad), Err(Error::InvalidCidr { .. })));
    }

    #[test]
    fn key_text_round_trips() {
        for ip in ["192.0.2.1", "0.0.0.0", "2001:db8:1:2::5", "::1"] {
            let k = SourceKey::from_ip(ip.parse().unwrap());
            assert_eq!(parse_key(&k.display()), Some(k));
        }
        assert_eq!(parse_key("2001:db8::1/64"), None);
        assert_eq!(parse_key("192.0.2.1/64"), None);
        assert_eq!(parse_key("garbage"), None);
    }

    #[test]
    fn settings() {
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(s.setting("ports").unwrap(), None);
        s.set_setting("ports", "25").unwrap();
        s.set_setting("ports", "25,587").unwrap();
        assert_eq!(s.setting("ports").unwrap().as_deref(), Some("25,587"));
    }

    #[test]
    fn reopen_persists_and_checks_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/gatekeeper.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.add_ranges(RangeKind::Deny, &[nr("192.0.2.0/24")], false, false, 5).unwrap();
            s.upsert_verdict(&verdict("198.51.100.1", verdict_reason::OK, None)).unwrap();
            s.set_setting("k", "v").unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let s = Store::open(&path).unwrap();
        assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
        assert_eq!(s.list_verdicts(None).unwrap().len(), 1);
        assert_eq!(s.setting("k").unwrap().as_deref(), Some("v"));
        let wal: String = s.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(wal, "wal");
        s.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        assert!(matches!(Store::open(&path), Err(Error::StoreVersion { found: 99, .. })));
    }

    #[test]
    fn corrupt_rows_are_errors_not_panics() {
        let s = Store::open_in_memory().unwrap();
        s.conn
            .execute("INSERT INTO ranges VALUES (0, 'deny', 'nonsense', 'manual', 'x', NULL, 0, NULL, NULL)", [])
            .unwrap();
        let err = s.list_ranges(None).unwrap_err().to_string();
        assert!(err.contains(":memory:") && err.contains("nonsense"), "{err}");
    }

    #[test]
    fn bulk_add_110k() {
        let mut s = Store::open_in_memory().unwrap();
        s.add_ranges(RangeKind::Allow, &[nr("203.0.113.0/24"), nr("2001:db8:ffff::/48")], false, false, 0).unwrap();
        let batch: Vec<NewRange> = (0..110_000u32)
            .map(|i| {
                let n = if i % 10 == 0 {
                    format!("2001:db8:{:x}::/48", i / 10)
                } else {
                    format!("{}/{}", std::net::Ipv4Addr::from(0x0a00_0000 + (i << 4)), 28)
                };
                NewRange { origin: Origin::Imported, source: "drop".into(), ..nr(&n) }
            })
            .collect();
        let added = s.add_ranges(RangeKind::Deny, &batch, false, false, 0).unwrap();
        assert_eq!(added.len(), 110_000);
        assert_eq!(added.last().unwrap().id, 110_001);
        // Re-import is idempotent with skip_existing.
        assert!(s.add_ranges(RangeKind::Deny, &batch, false, true, 0).unwrap().is_empty());
        // An allow covering one of them is refused.
        assert!(matches!(
            s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], false, false, 0),
            Err(Error::Overlap { .. })
        ));
        assert_eq!(s.list_ranges(Some(RangeKind::Deny)).unwrap().len(), 110_000);
    }
}
