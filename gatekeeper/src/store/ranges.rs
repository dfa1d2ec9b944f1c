//! The ranges table: adding (all or nothing, with the overlap, duplicate,
//! capacity and id rules), removing, listing and expiring ranges.
use std::collections::{BTreeSet, HashSet};

use gatekeeper_common::{MAX_RANGES, MAX_RANGE_IDS};
use ipnet::IpNet;
use rusqlite::{params, OptionalExtension, Row};

use super::{bad_value, db, Store, RANGE_COLS};
use crate::domain::{Origin, PoolAction, RangeKind, RangeTable};
use crate::error::{Error, Result};
use crate::lists::check_net;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<PoolAction>,
}

impl RangeRecord {
    /// A manual range with no comment, expiry or pool action (a pool
    /// drops): what code that computes datapath entries without a database
    /// (tests, benchmarks) starts from.
    pub fn manual(id: u32, kind: RangeKind, net: IpNet) -> RangeRecord {
        RangeRecord {
            id,
            kind,
            net,
            origin: Origin::Manual,
            source: "manual".into(),
            comment: None,
            created_at: 0,
            expires_at: None,
            action: None,
        }
    }
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
        kind: kind.parse().map_err(|_| bad_value(1, format!("range id {id}: unknown kind {kind:?}")))?,
        net: net.parse().map_err(|_| bad_value(2, format!("range id {id}: invalid net {net:?}")))?,
        origin: origin.parse().map_err(|_| bad_value(3, format!("range id {id}: unknown origin {origin:?}")))?,
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
        let tx = self.conn.savepoint().map_err(&e)?;

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

    /// The range of `kind` at exactly `net`, if any.
    pub fn range_at(&self, kind: RangeKind, net: IpNet) -> Result<Option<RangeRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {RANGE_COLS} FROM ranges WHERE kind = ?1 AND net = ?2"),
                params![kind.as_str(), net.to_string()],
                range_row,
            )
            .optional()
            .map_err(db(&self.path))
    }

    /// Deletes the range `net` of `kind`; [`Error::NotFound`] if there is none.
    pub fn del_range(&mut self, kind: RangeKind, net: IpNet) -> Result<RangeRecord> {
        let e = db(&self.path);
        let tx = self.conn.savepoint().map_err(&e)?;
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
        let tx = self.conn.savepoint().map_err(&e)?;
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
        let tx = self.conn.savepoint().map_err(&e)?;
        let mut gone = tx
            .prepare(&format!("DELETE FROM ranges WHERE expires_at <= ?1 RETURNING {RANGE_COLS}"))
            .and_then(|mut s| s.query_map([now], range_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        sort_ranges(&mut gone);
        Ok(gone)
    }
}

fn sort_ranges(r: &mut [RangeRecord]) {
    r.sort_by_key(|r| (r.kind, r.net));
}
