//! Keeping the pinned maps in step with the state database: the rule that
//! decides which datapath entry each range calls for (allow and exempt
//! always win), the full reconcile at start, and the sync of what one
//! change touched, which `state` runs after every store change.
use std::collections::HashMap as StdMap;

use gatekeeper_common::{action, range_flags, verdict_reason, KeyWords, RangeValue, SourceKey, Verdict};
use ipnet::IpNet;
use tracing::warn;

use crate::{
    datapath::Maps,
    domain::{Action, Origin, PoolAction, RangeKind, RangeTable, VerdictReason},
    store::{RangeRecord, Store, VerdictRecord},
    time::{expiry_ns, monotonic_ns, unix_now},
    Error, Result,
};

/// What one change touched in the store: the ranges added or removed and
/// the verdict keys written or deleted. [`sync`] brings exactly these in
/// line with the store.
#[derive(Debug, Default)]
pub struct Touched {
    /// Ranges added (their ids are new: hit counters start at zero).
    pub added: Vec<RangeRecord>,
    pub removed: Vec<RangeRecord>,
    pub verdicts: Vec<SourceKey>,
}

/// Brings the maps in line with the store for everything `t` touched.
/// Returns the sources whose verdicts the verdict table evicted to make room
/// (drop verdicts only), which the store still holds.
pub fn sync(store: &Store, maps: &mut Maps, t: &Touched) -> Result<Vec<SourceKey>> {
    for r in &t.added {
        maps.reset_range_hits(r.id)?;
    }
    let ranges: Vec<&RangeRecord> = t.added.iter().chain(&t.removed).collect();
    sync_ranges(store, maps, &ranges)?;
    let (now, mono) = (unix_now(), monotonic_ns());
    let mut evicted = Vec::new();
    for &key in &t.verdicts {
        if !KeyWords::of(&key).is_key() {
            // ::/64 has the verdict table's empty key: it holds no verdict.
            continue;
        }
        match store.verdict(key)? {
            Some(v) => evicted.extend(maps.set_verdict(key, verdict_value(&v, now, mono))?),
            None => maps.del_verdict(key)?,
        }
    }
    // A key evicted and then written again by this change is held.
    evicted.retain(|k| !t.verdicts.contains(k));
    Ok(evicted)
}

/// Up to this many touched nets, the losing range at each is read with one
/// query per net; past it, all ranges of the losing kind are read once.
const POINT_QUERIES: usize = 256;

/// For the ranges in `changed` (added or removed): each such net, and for a
/// changed winning range (allow, exempt) every losing range (deny, pool)
/// inside it, gets the entry [`desired_entry`] calls for in its table.
fn sync_ranges(store: &Store, maps: &mut Maps, changed: &[&RangeRecord]) -> Result<()> {
    for table in RangeTable::ALL {
        let changed: Vec<&RangeRecord> = changed.iter().copied().filter(|r| r.kind.table() == table).collect();
        if changed.is_empty() {
            continue;
        }
        let winners = store.list_ranges(Some(table.winner()))?;
        let mut nets: Vec<IpNet> = changed.iter().map(|r| r.net).collect();
        // The losing range at each net whose entry may change.
        let mut losers: StdMap<IpNet, RangeRecord> = StdMap::new();
        if let Some(loser) = table.loser() {
            if nets.len() > POINT_QUERIES {
                // A big change (an import): one read of the losing kind.
                let all: StdMap<IpNet, RangeRecord> =
                    store.list_ranges(Some(loser))?.into_iter().map(|r| (r.net, r)).collect();
                losers.extend(nets.iter().filter_map(|n| all.get(n).map(|r| (*n, r.clone()))));
            } else {
                for &net in &nets {
                    if let Some(r) = store.range_at(loser, net)? {
                        losers.insert(net, r);
                    }
                }
            }
            let winner_changed: Vec<IpNet> =
                changed.iter().filter(|r| r.kind == table.winner()).map(|r| r.net).collect();
            if !winner_changed.is_empty() {
                let inside = store
                    .list_ranges(Some(loser))?
                    .into_iter()
                    .filter(|d| winner_changed.iter().any(|a| a.contains(&d.net)));
                losers.extend(inside.map(|d| (d.net, d)));
            }
        }
        nets.extend(losers.keys().copied());
        nets.sort();
        nets.dedup();
        for net in nets {
            let want = desired_entry(net, &winners, losers.get(&net));
            let have = maps.ranges.range(table, net);
            match want {
                Some(v) if have != Some(v) => maps.ranges.set_range(net, v)?,
                None if have.is_some() => maps.ranges.del_range(table, net)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Writes the inbound limiter's port classes and limits (at start, with
/// the rest of the config the datapath holds).
pub fn set_inbound(maps: &mut Maps, cfg: &crate::config::InboundConfig) -> Result<()> {
    match maps.inbound.as_mut() {
        Some(m) => m.set(&cfg.classes()),
        // Only maps opened from an older gatekeeper's pins lack them; the
        // agent loads its own object, so this is not reached in `run`.
        None => Err(Error::bpf_msg("the datapath has no inbound limiter maps")),
    }
}

/// What a reconcile did.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Map entries written or rewritten.
    pub written: usize,
    pub removed: usize,
    /// What the database holds but the maps could not (a full table), in
    /// words; empty when everything fits.
    pub unapplied: Vec<String>,
}

/// Makes the maps match the database (what the database holds is the
/// truth), after removing what expired. Never refuses for lack of room:
/// what does not fit is left out, and always so that nothing is blocked by
/// it. Winning ranges (allow, exempt, smarthost) go in first; a losing range
/// (deny, pool) that overlaps a winner that did not fit is left out too,
/// since without its winner it would block what the winner lets through.
///
/// Lookup verdicts beyond `max_derived` (a database written with a larger
/// `max_verdicts`) are trimmed first, as [`Store::make_room`] does.
pub fn reconcile(store: &mut Store, maps: &mut Maps, max_derived: u64) -> Result<Reconciled> {
    let now = unix_now();
    store.expire_ranges(now)?;
    store.expire_verdicts(now)?;
    let trimmed = store.make_room(max_derived, now)?;
    if !trimmed.is_empty() {
        warn!(
            removed = trimmed.len(),
            max_verdicts = max_derived,
            "the database held more lookup verdicts than max_verdicts; removed the drop verdicts that expire first"
        );
    }
    let mut out = Reconciled::default();
    let want = desired_ranges(&store.list_ranges(None)?);
    let have: StdMap<(RangeTable, IpNet), RangeValue> =
        maps.ranges.ranges().into_iter().map(|(t, n, v)| ((t, n), v)).collect();
    for (table, net) in have.keys().filter(|k| !want.contains_key(k)) {
        maps.ranges.del_range(*table, *net)?;
        out.removed += 1;
    }
    let is_loser = |t: RangeTable, v: &RangeValue| t.loser() == Some(RangeKind::of_code(v.kind));
    let mut todo: Vec<(&(RangeTable, IpNet), &RangeValue)> =
        want.iter().filter(|(k, v)| have.get(k) != Some(*v)).collect();
    todo.sort_by_key(|((t, n), v)| (is_loser(*t, v), *t, n.prefix_len(), *n));
    let mut lost_winners: Vec<(RangeTable, IpNet)> = Vec::new();
    let overlaps_lost = |lost: &[(RangeTable, IpNet)], t: RangeTable, n: IpNet| {
        lost.iter().any(|(lt, w)| *lt == t && (n.contains(w) || w.contains(&n)))
    };
    for (&(table, net), &v) in todo {
        let kind = RangeKind::of_code(v.kind);
        if is_loser(table, &v) && overlaps_lost(&lost_winners, table, net) {
            out.unapplied.push(format!(
                "{} {net}: left out, it overlaps a {} that did not fit",
                kind.what(),
                table.winner().what()
            ));
            continue;
        }
        match maps.ranges.set_range(net, v) {
            Ok(()) => out.written += 1,
            Err(e @ Error::Full { .. }) => {
                out.unapplied.push(format!("{} {net}: {e}", kind.what()));
                if !is_loser(table, &v) {
                    lost_winners.push((table, net));
                }
            }
            Err(e) => return Err(e),
        }
    }
    // Losing ranges applied earlier that overlap a winner that did not fit.
    for (t, n, v) in maps.ranges.ranges() {
        if is_loser(t, &v) && overlaps_lost(&lost_winners, t, n) {
            maps.ranges.del_range(t, n)?;
            out.removed += 1;
            out.unapplied.push(format!(
                "{} {n}: removed, it overlaps a {} that did not fit",
                RangeKind::of_code(v.kind).what(),
                t.winner().what()
            ));
        }
    }
    // Repairs whatever an agent that died mid-update left half-written.
    out.written += maps.ranges.rebuild()?;
    let mono = monotonic_ns();
    let records = store.list_verdicts(None)?;
    let want: StdMap<SourceKey, Verdict> = records.iter().map(|v| (v.key, verdict_value(v, now, mono))).collect();
    for (key, _) in maps.verdicts()? {
        if !want.contains_key(&key) {
            maps.del_verdict(key)?;
            out.removed += 1;
        }
    }
    // Bans first, then pass verdicts (neither is ever evicted), then the
    // drop verdicts, which may make room for nothing but each other.
    let mut order: Vec<(SourceKey, Verdict)> = want.into_iter().collect();
    order.sort_by_key(|(k, v)| (v.reason != verdict_reason::MANUAL_BAN, v.action != action::PASS, *k));
    // Drop verdicts the table evicted for others: the database lets them go
    // too (their sources become unknown and pass).
    let mut lost = Vec::new();
    for (key, v) in order {
        if !KeyWords::of(&key).is_key() {
            warn!(source = %key.display(), "the database holds a verdict for ::/64, which the datapath cannot hold; ignored");
            continue;
        }
        match maps.set_verdict(key, v) {
            Ok(None) => out.written += 1,
            Ok(Some(evicted)) => {
                out.written += 1;
                lost.push(evicted);
            }
            Err(e @ Error::VerdictsFull { .. }) => out.unapplied.push(format!("verdict for {}: {e}", key.display())),
            Err(e) => return Err(e),
        }
    }
    // (A key evicted before its own turn came was written again then.)
    for key in lost {
        if maps.verdicts.get(key)?.is_some() {
            continue;
        }
        match store.del_verdict(key) {
            Ok(_) | Err(Error::NotFound { .. }) => out.removed += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A verdict record as the datapath holds it. A lookup drop verdict of a
/// whole IPv6 /64 (several of its addresses failed, see
/// `State::drop_v6_prefix`) is a presumption: its sources are still
/// reported, so a good one earns a pass. A ban (`Action::Ban`) is written
/// with the datapath reason `manual-ban` whatever its cause (the database
/// keeps the cause): the table never evicts it, and it refuses as one.
pub fn verdict_value(v: &VerdictRecord, now: i64, mono: u64) -> Verdict {
    let presumed = v.action == Action::Drop
        && v.reason != VerdictReason::ManualBan
        && v.key.to_ip().is_ipv6()
        && !v.key.is_host_v6();
    let action = if presumed { action::PRESUMED_DROP } else { v.action.code() };
    let reason = if v.action == Action::Ban { verdict_reason::MANUAL_BAN } else { v.reason.code() };
    Verdict { expires_ns: expiry_ns(v.expires_at, now, mono), action, reason }
}

pub fn range_value(r: &RangeRecord) -> RangeValue {
    let mut flags = match r.action {
        Some(PoolAction::Reject) => range_flags::REJECT,
        // Explain falls back to reject wherever it cannot explain.
        Some(PoolAction::Explain) => range_flags::REJECT | range_flags::EXPLAIN,
        _ => 0,
    };
    if r.kind == RangeKind::Deny && r.origin == Origin::Learned {
        flags |= range_flags::LEARNED;
    }
    RangeValue { range_id: r.id, kind: r.kind.code(), flags, origin: r.origin.code() }
}

/// The datapath entry for `net` in one table, given the table's winning
/// ranges (allow, exempt, smarthost) and its losing range at exactly `net`
/// (deny, pool), if any. Both kinds share one longest-prefix table, so
/// "allow (exempt) always wins" holds by leaving out every losing range
/// that a winning range covers: the longest match of a covered source is
/// then always a winning entry.
pub fn desired_entry(net: IpNet, winners: &[RangeRecord], loser: Option<&RangeRecord>) -> Option<RangeValue> {
    if let Some(a) = winners.iter().find(|a| a.net == net) {
        return Some(range_value(a));
    }
    loser.filter(|d| !winners.iter().any(|a| a.net.contains(&d.net))).map(range_value)
}

/// Every datapath entry the database calls for, by table.
pub fn desired_ranges(records: &[RangeRecord]) -> StdMap<(RangeTable, IpNet), RangeValue> {
    let mut out = StdMap::new();
    for table in RangeTable::ALL {
        let winners: Vec<RangeRecord> = records.iter().filter(|r| r.kind == table.winner()).cloned().collect();
        out.extend(winners.iter().map(|a| ((table, a.net), range_value(a))));
        for d in records.iter().filter(|r| Some(r.kind) == table.loser()) {
            if let Some(v) = desired_entry(d.net, &winners, Some(d)) {
                out.insert((table, d.net), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekeeper_common::range_kind;

    fn rec(id: u32, kind: RangeKind, net: &str) -> RangeRecord {
        RangeRecord::manual(id, kind, net.parse().unwrap())
    }

    /// Longest-prefix match over the desired entries of a table, as the
    /// kernel does.
    fn lookup_in(entries: &StdMap<(RangeTable, IpNet), RangeValue>, table: RangeTable, ip: &str) -> Option<u8> {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        entries
            .iter()
            .filter(|((t, n), _)| *t == table && n.contains(&ip))
            .max_by_key(|((_, n), _)| n.prefix_len())
            .map(|(_, v)| v.kind)
    }

    fn lookup(entries: &StdMap<(RangeTable, IpNet), RangeValue>, ip: &str) -> Option<u8> {
        lookup_in(entries, RangeTable::Ingress, ip)
    }

    #[test]
    fn allow_always_wins_under_longest_prefix_match() {
        let records = vec![
            rec(1, RangeKind::Deny, "198.51.100.0/24"),
            rec(2, RangeKind::Allow, "198.51.100.0/28"),
            // Inside the allow range: must be left out, or it would win LPM.
            rec(3, RangeKind::Deny, "198.51.100.8/30"),
            // Same net as an allow range (added with --force): allow wins.
            rec(4, RangeKind::Deny, "203.0.113.0/24"),
            rec(5, RangeKind::Allow, "203.0.113.0/24"),
            rec(6, RangeKind::Deny, "2001:db8::/32"),
            rec(7, RangeKind::Allow, "2001:db8:1::/48"),
        ];
        let want = desired_ranges(&records);
        let ing = |n: &str| (RangeTable::Ingress, n.parse::<IpNet>().unwrap());
        assert!(!want.contains_key(&ing("198.51.100.8/30")));
        assert_eq!(want[&ing("203.0.113.0/24")].range_id, 5);
        assert_eq!(lookup(&want, "198.51.100.9"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "198.51.100.200"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "203.0.113.7"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:1::25"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:2::25"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "192.0.2.1"), None);
    }

    #[test]
    fn exempt_wins_over_pool_and_tables_stay_apart() {
        let mut reject = rec(1, RangeKind::Pool, "198.51.100.0/24");
        reject.action = Some(PoolAction::Reject);
        let records = vec![
            reject,
            rec(2, RangeKind::Exempt, "198.51.100.25/32"),
            // Inside an exempt range: left out.
            rec(3, RangeKind::Pool, "203.0.113.0/28"),
            rec(4, RangeKind::Exempt, "203.0.113.0/24"),
            rec(5, RangeKind::Smarthost, "192.0.2.25/32"),
            // The same net as a deny range, in another table: both stay.
            rec(6, RangeKind::Deny, "198.51.100.0/24"),
            rec(7, RangeKind::Pool, "2001:db8:100::/40"),
        ];
        let want = desired_ranges(&records);
        let sub = |ip| lookup_in(&want, RangeTable::Subscriber, ip);
        assert_eq!(sub("198.51.100.7"), Some(range_kind::POOL));
        assert_eq!(sub("198.51.100.25"), Some(range_kind::EXEMPT));
        assert_eq!(sub("203.0.113.5"), Some(range_kind::EXEMPT));
        assert_eq!(sub("2001:db8:100:5::1"), Some(range_kind::POOL));
        assert_eq!(sub("192.0.2.25"), None);
        assert_eq!(lookup_in(&want, RangeTable::Smarthost, "192.0.2.25"), Some(range_kind::SMARTHOST));
        assert_eq!(lookup(&want, "198.51.100.7"), Some(range_kind::DENY));
        let pool = want[&(RangeTable::Subscriber, "198.51.100.0/24".parse().unwrap())];
        assert_eq!(pool.flags, range_flags::REJECT);
        assert_eq!(want[&(RangeTable::Ingress, "198.51.100.0/24".parse().unwrap())].flags, 0);
        assert_eq!(want.len(), 6);
    }

    #[test]
    fn a_ban_is_written_as_the_ban_action_with_reason_manual_ban() {
        let rec = |action, reason, ip: &str| VerdictRecord {
            key: SourceKey::from_ip(ip.parse().unwrap()),
            action,
            reason,
            comment: None,
            created_at: 0,
            expires_at: None,
        };
        let v = verdict_value(&rec(Action::Ban, VerdictReason::Dynamic, "2001:db8:1::"), 0, 0);
        assert_eq!((v.action, v.reason, v.expires_ns), (action::BAN, verdict_reason::MANUAL_BAN, u64::MAX));
        // A /64 drop from lookups stays a presumption; a ban of a /64 does not.
        let v = verdict_value(&rec(Action::Drop, VerdictReason::NoPtr, "2001:db8:1::"), 0, 0);
        assert_eq!((v.action, v.reason), (action::PRESUMED_DROP, verdict_reason::NO_PTR));
        assert_eq!(Action::of_code(v.action), Action::Drop);
        assert_eq!(Action::of_code(action::BAN), Action::Ban);
        assert_eq!(Action::Ban.code(), action::BAN);
    }

    #[test]
    fn removing_the_allow_brings_the_inner_deny_back() {
        let allows = vec![rec(2, RangeKind::Allow, "198.51.100.0/28")];
        let inner = rec(3, RangeKind::Deny, "198.51.100.8/30");
        assert_eq!(desired_entry(inner.net, &allows, Some(&inner)), None);
        assert_eq!(desired_entry(inner.net, &[], Some(&inner)), Some(range_value(&inner)));
        assert_eq!(desired_entry(inner.net, &[], None), None);
    }
}
