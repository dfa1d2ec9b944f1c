//! The agent's state and its verbs: the only way to change a range, a ban or
//! a verdict. Each verb changes the database inside one transaction, then
//! the maps ([`sync`]); when the maps refuse, the transaction is rolled back
//! and the maps are brought back in line with the restored database.
use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use gatekeeper_common::{KeyWords, SourceKey, MAX_RANGES};
use ipnet::IpNet;
use tracing::{debug, error, info, warn};

mod mail;

pub use mail::{AbuseBan, AddressBlock, MailBatch};

use crate::{
    agent::sync::{self, Touched},
    config::{validate_ports, Config},
    datapath::{Attached, Datapath},
    domain::{Action, Origin, PoolAction, RangeKind, RangeTable, Refusal, VerdictReason},
    pipeline::Learned,
    protocol::{CheckDatapath, CheckRange, CheckRefusal, CheckVerdict, RangeAdded, RangeRow, RangeSpec},
    status::{AgentInfo, AgentLive, Capacity, Dropped, EgressPolicy, Entries, LimitClassStatus, QueueStats},
    store::{NewRange, RangeRecord, Store, VerdictRecord},
    time::{monotonic_ns, unix_now},
    Error, Result,
};

/// Ports guarded when neither the config nor `ports set` chose any.
pub const DEFAULT_PORTS: &[u16] = &[25];
/// The settings key of the guarded ports.
pub const PORTS_SETTING: &str = "ports";

/// A range change as the CLI asks for it (`range add`, `range import`, ...).
pub struct RangeChange {
    pub kind: RangeKind,
    pub ranges: Vec<RangeSpec>,
    pub origin: Origin,
    /// Where the ranges came from (`cli`, `import:<file>`, `learned`).
    pub source: String,
    pub expires_at: Option<i64>,
    pub force: bool,
    /// Skip ranges that already exist instead of failing (imports).
    pub skip_existing: bool,
    /// Remove ranges of this `source` that are not in `ranges` (imports).
    pub replace: bool,
    pub action: Option<PoolAction>,
}

/// The database, the datapath and what the agent attached.
pub struct State {
    pub cfg: Config,
    store: Store,
    pub dp: Datapath,
    pub attached: Vec<Attached>,
    started_at: i64,
    /// What the start-up reconcile could not fit into the maps.
    unapplied: Vec<String>,
    /// Lookup verdicts dropped to stay within `max_verdicts`, since start.
    pub dropped: VerdictsDropped,
    /// When the last warning about dropped verdicts was logged, and the
    /// counts it reported.
    warned: Option<(Instant, VerdictsDropped)>,
}

/// Lookup verdicts the agent let go to stay within its bounds (`max_verdicts`
/// rows in the database, the verdict table's buckets), since start. Each
/// one leaves its source unknown, and an unknown source passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictsDropped {
    /// Drop verdicts removed to make room for newer ones (those expiring
    /// first, after the expired ones).
    pub evicted: u64,
    /// Verdicts not written: no room among bans and pass verdicts.
    pub refused: u64,
}

/// At most one warning about dropped verdicts per this long.
const DROP_WARN_EVERY: Duration = Duration::from_secs(60);

impl State {
    pub fn new(cfg: Config, store: Store, dp: Datapath, attached: Vec<Attached>, unapplied: Vec<String>) -> State {
        State {
            cfg,
            store,
            dp,
            attached,
            started_at: unix_now(),
            unapplied,
            dropped: VerdictsDropped::default(),
            warned: None,
        }
    }

    /// Logs what was dropped since the last warning, at most once per
    /// [`DROP_WARN_EVERY`] (a flood must not become a log flood).
    fn warn_dropped(&mut self) {
        let (now, d) = (Instant::now(), self.dropped);
        let since = match self.warned {
            Some((at, _)) if now.duration_since(at) < DROP_WARN_EVERY => return,
            Some((_, before)) => before,
            None => VerdictsDropped::default(),
        };
        if d == since {
            return;
        }
        warn!(
            evicted = d.evicted - since.evicted,
            refused = d.refused - since.refused,
            max_verdicts = self.cfg.max_verdicts,
            "lookup verdicts dropped to stay within max_verdicts (their sources stay unknown and pass); `gatekeeper status` counts them"
        );
        self.warned = Some((now, d));
    }

    /// Runs `f` on the store in one transaction, then brings the maps in
    /// line with what it touched; commits only when the maps took it, and
    /// then durably (surviving a power loss): it is an operator's change.
    fn change<T>(&mut self, f: impl FnOnce(&mut Store, &mut Touched) -> Result<T>) -> Result<T> {
        self.change_with(true, f)
    }

    /// As [`State::change`]; `durable: false` for what the agent derives
    /// again by itself (lookup verdicts, expiry), which a crash of the
    /// agent never loses but a power loss may.
    ///
    /// A drop verdict the verdict table evicts to make room leaves the
    /// database in the same transaction (and is counted as dropped).
    fn change_with<T>(&mut self, durable: bool, f: impl FnOnce(&mut Store, &mut Touched) -> Result<T>) -> Result<T> {
        self.store.begin(durable)?;
        let mut touched = Touched::default();
        let mut evicted = 0;
        let result = f(&mut self.store, &mut touched)
            .and_then(|v| {
                for key in sync::sync(&self.store, &mut self.dp.maps, &touched)? {
                    match self.store.del_verdict(key) {
                        Ok(_) => evicted += 1,
                        Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(v)
            })
            .and_then(|v| self.store.commit().map(|()| v));
        if result.is_ok() && evicted > 0 {
            self.dropped.evicted += evicted;
            self.warn_dropped();
        }
        if result.is_err() {
            if let Err(e) = self.store.rollback() {
                debug!(error = %e.report(), "rollback (the transaction may have ended already)");
            }
            // So the database never claims what the datapath lacks, nor the
            // other way round.
            if let Err(e) = sync::sync(&self.store, &mut self.dp.maps, &touched) {
                error!(error = %e.report(), "could not restore the maps after a failed change; the next start reconciles them");
            }
        }
        result
    }

    // ------------------------------------------------------------ ranges

    /// Adds ranges (all or nothing), and with `replace` removes the
    /// source's ranges the list no longer has.
    pub fn add_ranges(&mut self, c: RangeChange) -> Result<RangeAdded> {
        if c.action.is_some() && c.kind != RangeKind::Pool {
            return Err(Error::InvalidInput(format!(
                "an action ({}) applies to pools, not to {} entries",
                PoolAction::expected(),
                c.kind.what()
            )));
        }
        let now = unix_now();
        let new: Vec<NewRange> = c
            .ranges
            .iter()
            .map(|r| NewRange {
                net: r.net,
                origin: c.origin,
                source: c.source.clone(),
                comment: r.comment.clone(),
                expires_at: c.expires_at,
                action: c.action,
            })
            .collect();
        let (added, removed) = self.change(|store, t| {
            t.added = store.add_ranges(c.kind, &new, c.force, c.skip_existing, now)?;
            if c.replace {
                let keep: Vec<IpNet> = c.ranges.iter().map(|r| r.net).collect();
                t.removed = store.del_ranges_from_source_except(c.kind, &c.source, &keep)?;
            }
            Ok((t.added.clone(), t.removed.len()))
        })?;
        info!(kind = %c.kind, added = added.len(), removed, source = %c.source, "ranges changed");
        Ok(RangeAdded {
            added: added.len(),
            unchanged: c.ranges.len() - added.len(),
            removed,
            // Echo records back for interactive adds, not for 100k-line imports.
            records: (added.len() <= 1000).then_some(added),
        })
    }

    /// Removes ranges: all of them, or none when one is missing.
    pub fn del_ranges(&mut self, kind: RangeKind, nets: &[IpNet]) -> Result<Vec<RangeRecord>> {
        let mut seen = HashSet::new();
        let nets: Vec<IpNet> = nets.iter().copied().filter(|n| seen.insert(*n)).collect();
        let removed = self.change(|store, t| {
            for &net in &nets {
                t.removed.push(store.del_range(kind, net)?);
            }
            Ok(t.removed.clone())
        })?;
        info!(%kind, removed = removed.len(), "ranges removed");
        Ok(removed)
    }

    /// The ranges of `kind` with their datapath hits.
    pub fn list_ranges(&self, kind: RangeKind) -> Result<Vec<RangeRow>> {
        let ranges = self.store.list_ranges(Some(kind))?;
        let hits = self.dp.maps.range_hits(ranges.iter().map(|r| r.id))?;
        Ok(ranges.into_iter().map(|r| RangeRow { hits: hits.get(&r.id).copied().unwrap_or(0), record: r }).collect())
    }

    /// Adds a learned deny range, unless a source inside it has a good
    /// name (a learned range beats per-source verdicts, and must never block
    /// a known mail server) or an allow range overlaps it. True if added.
    pub fn learn(&mut self, l: &Learned, expires_at: i64) -> Result<bool> {
        let good = self.store.list_verdicts(None)?.into_iter().find(|v| {
            v.action == Action::Pass
                && matches!(v.reason, VerdictReason::Ok | VerdictReason::Generic)
                && l.net.contains(&v.key.to_ip())
        });
        if let Some(g) = good {
            info!(range = %l.net, good = %g.key.display(), "not learning a dynamic range that holds a host with a good name");
            return Ok(false);
        }
        let change = RangeChange {
            kind: RangeKind::Deny,
            ranges: vec![RangeSpec {
                net: l.net,
                comment: Some(format!("{} dynamic hosts named like {}", l.sources, l.shape)),
            }],
            origin: Origin::Learned,
            source: "learned".into(),
            expires_at: Some(expires_at),
            force: false,
            skip_existing: true,
            replace: false,
            action: None,
        };
        match self.add_ranges(change) {
            Ok(r) if r.added > 0 => {
                info!(range = %l.net, shape = %l.shape, sources = l.sources, "learned a dynamic range");
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(Error::Overlap { .. }) => {
                info!(range = %l.net, "not learning a dynamic range that overlaps an allow range");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    // ------------------------------------------------------------ verdicts

    /// Bans sources (all or nothing).
    pub fn ban(
        &mut self,
        addrs: &[IpAddr],
        comment: Option<String>,
        expires_at: Option<i64>,
    ) -> Result<Vec<VerdictRecord>> {
        if let Some(bad) = addrs.iter().find(|a| !KeyWords::of(&SourceKey::from_ip(**a)).is_key()) {
            return Err(Error::InvalidInput(format!(
                "cannot ban {bad}: ::/64 (the unspecified and loopback addresses) is never a real source"
            )));
        }
        let now = unix_now();
        let recs = self.change(|store, t| {
            let mut out = Vec::new();
            for &addr in addrs {
                let rec = VerdictRecord {
                    key: SourceKey::from_ip(addr),
                    action: Action::Drop,
                    reason: VerdictReason::ManualBan,
                    comment: comment.clone(),
                    created_at: now,
                    expires_at,
                };
                store.upsert_verdict(&rec)?;
                t.verdicts.push(rec.key);
                out.push(rec);
            }
            Ok(out)
        })?;
        for r in &recs {
            info!(source = %r.key.display(), "manual ban");
        }
        Ok(recs)
    }

    /// Writes a verdict the lookup pipeline reached, unless a manual ban
    /// holds the source (a ban is never replaced by a lookup). True if
    /// written.
    ///
    /// The database keeps at most `max_verdicts` lookup verdicts: when full,
    /// the expired ones go, then the drop verdicts that expire first (their
    /// sources become unknown and pass); pass verdicts and bans never do.
    /// A verdict without room is not written. Both are counted in
    /// [`State::dropped`] and warned about at most once a minute.
    pub fn judged(&mut self, rec: VerdictRecord) -> Result<bool> {
        if self.store.verdict(rec.key)?.is_some_and(|v| v.reason == VerdictReason::ManualBan) {
            return Ok(false);
        }
        let (max, now) = (u64::from(self.cfg.max_verdicts), unix_now());
        let mut removed = 0;
        let written = match self.change_with(false, |store, t| {
            let d = store.put_derived_verdict(&rec, max, now)?;
            t.verdicts.extend(d.removed.iter().map(|v| v.key));
            if d.written {
                t.verdicts.push(rec.key);
            }
            Ok((d.written, d.removed.iter().filter(|v| v.expires_at.is_none_or(|e| e > now)).count() as u64))
        }) {
            Ok((written, evicted)) => {
                removed = evicted;
                written
            }
            // Bans and pass verdicts fill both buckets: the source stays
            // unknown (and passes), which is what a lost verdict may do.
            Err(Error::VerdictsFull { .. }) => false,
            Err(e) => return Err(e),
        };
        self.dropped.evicted += removed;
        if !written {
            debug!(source = %rec.key.display(), "no room for this verdict among bans and pass verdicts; the source stays unknown");
            self.dropped.refused += 1;
        }
        if removed > 0 || !written {
            self.warn_dropped();
        }
        Ok(written)
    }

    /// After a lookup dropped an IPv6 address of the /64 `net`: drops the
    /// whole /64 once `after` (0: never) distinct addresses of it have live
    /// drop verdicts and the /64 has no verdict of its own (none of it
    /// passed, no ban). The /64's verdict lives as long as `after` of
    /// them do. Returns it if written.
    pub fn drop_v6_prefix(&mut self, net: SourceKey, after: u32, now: i64) -> Result<Option<VerdictRecord>> {
        if after == 0 || self.store.verdict(net)?.is_some() {
            return Ok(None);
        }
        let drops = self.store.address_drops(net, now)?;
        let Some(nth) = drops.get(after as usize - 1) else { return Ok(None) };
        let shown: Vec<String> = drops.iter().take(3).map(|d| d.key.display()).collect();
        let more = if drops.len() > 3 { format!(" and {} more", drops.len() - 3) } else { String::new() };
        let rec = VerdictRecord {
            key: net,
            action: Action::Drop,
            reason: drops[0].reason,
            comment: Some(format!(
                "{} addresses of this /64 failed and none passed: {}{more}",
                drops.len(),
                shown.join(", ")
            )),
            created_at: now,
            expires_at: nth.expires_at,
        };
        Ok(self.judged(rec.clone())?.then_some(rec))
    }

    /// The verdict keys of `ip` that `verdicts del` reaches: an IPv6
    /// address's own key, then its /64's; an IPv4 address's key.
    fn keys_of(ip: IpAddr) -> Vec<SourceKey> {
        let (host, net) = (SourceKey::host(ip), SourceKey::from_ip(ip));
        if host == net {
            vec![net]
        } else {
            vec![host, net]
        }
    }

    /// Removes the verdicts of `addrs` (of `reason` only, if given): all of
    /// them, or none when one is missing. An IPv6 address loses the
    /// verdicts that apply to it: its own and its /64's.
    pub fn del_verdicts(
        &mut self,
        addrs: &[IpAddr],
        reason: Option<VerdictReason>,
        what: &'static str,
    ) -> Result<Vec<VerdictRecord>> {
        let mut seen = HashSet::new();
        let mut keys = Vec::new();
        for &a in addrs {
            let mut found = false;
            for k in Self::keys_of(a) {
                if self.store.verdict(k)?.is_some_and(|v| reason.is_none_or(|r| v.reason == r)) {
                    found = true;
                    if seen.insert(k) {
                        keys.push(k);
                    }
                }
            }
            if !found {
                return Err(Error::NotFound { what, key: SourceKey::from_ip(a).display() });
            }
        }
        self.change(|store, t| {
            let mut out = Vec::new();
            for &key in &keys {
                out.push(store.del_verdict(key)?);
                t.verdicts.push(key);
            }
            Ok(out)
        })
    }

    /// Removes every verdict of `reason`, or every automatic one (manual
    /// bans stay) when `None`; returns how many.
    pub fn flush_verdicts(&mut self, reason: Option<VerdictReason>) -> Result<usize> {
        let doomed: Vec<SourceKey> = self
            .store
            .list_verdicts(reason)?
            .into_iter()
            .filter(|v| reason.is_some() || v.reason != VerdictReason::ManualBan)
            .map(|v| v.key)
            .collect();
        self.change(|store, t| {
            for &key in &doomed {
                store.del_verdict(key)?;
                t.verdicts.push(key);
            }
            Ok(())
        })?;
        info!(removed = doomed.len(), "verdicts flushed");
        Ok(doomed.len())
    }

    pub fn list_verdicts(&self, reason: Option<VerdictReason>) -> Result<Vec<VerdictRecord>> {
        self.store.list_verdicts(reason)
    }

    /// Removes expired ranges and verdicts from the database and the maps.
    pub fn sweep(&mut self) -> Result<()> {
        let now = unix_now();
        let touched = self.change_with(false, |store, t| {
            t.removed = store.expire_ranges(now)?;
            t.verdicts = store.expire_verdicts(now)?.into_iter().map(|v| v.key).collect();
            Ok((t.removed.clone(), t.verdicts.len()))
        })?;
        for r in &touched.0 {
            info!(kind = %r.kind, net = %r.net, "range expired");
        }
        if touched.1 > 0 {
            debug!(expired = touched.1, "verdicts expired");
        }
        Ok(())
    }

    // ------------------------------------------------------------ ports

    /// The guarded ports: the config's, else those `ports set` stored,
    /// else [`DEFAULT_PORTS`]. The config's are stored, so they win on the
    /// next start too.
    pub fn startup_ports(cfg: &Config, store: &Store) -> Result<Vec<u16>> {
        match &cfg.ports {
            Some(p) => validate_ports(p),
            None => match store.setting(PORTS_SETTING)? {
                Some(s) => crate::config::parse_ports(&s),
                None => Ok(DEFAULT_PORTS.to_vec()),
            },
        }
    }

    pub fn set_ports(&mut self, ports: &[u16]) -> Result<Vec<u16>> {
        let ports = validate_ports(ports)?;
        self.store.set_setting(PORTS_SETTING, &join_ports(&ports))?;
        self.dp.maps.set_ports(&ports)?;
        info!(ports = %join_ports(&ports), "guarded ports changed");
        Ok(ports)
    }

    pub fn ports(&self) -> Result<Vec<u16>> {
        self.dp.maps.ports()
    }

    // ------------------------------------------------------------ reading

    /// The egress gate's policy as the datapath holds it, with the
    /// configured class names.
    pub fn egress_policy(&self) -> Result<EgressPolicy> {
        EgressPolicy::from_maps(&self.dp.maps, |c| {
            let l = self.cfg.egress.limit.get((c as usize).checked_sub(1)?)?;
            Some((l.name.clone(), l.rate.to_string(), l.burst))
        })
    }

    /// The inbound limiter's classes as the datapath holds them, with the
    /// configured names.
    pub fn inbound_limits(&self) -> Result<Vec<LimitClassStatus>> {
        LimitClassStatus::inbound(&self.dp.maps, |c| {
            let l = self.cfg.inbound.limit.get((c as usize).checked_sub(1)?)?;
            Some((l.name.clone(), l.rate.to_string(), l.burst))
        })
    }

    /// Why the datapath refuses `ip` now, as the gates judge it (allow wins,
    /// then deny ranges, then a live verdict, then a learned range), and
    /// the host name its verdict was judged by; `None` when it is not
    /// refused. The rejector's answer to a steered connection.
    pub fn refusal(&self, ip: IpAddr) -> Option<(Refusal, Option<String>)> {
        let mut presumed = None;
        if let Some((_, v)) = self.dp.maps.ranges.longest(RangeTable::Ingress, ip) {
            if v.kind == gatekeeper_common::range_kind::ALLOW {
                return None;
            }
            if v.flags & gatekeeper_common::range_flags::LEARNED == 0 {
                return Some((Refusal::DenyRange, None));
            }
            presumed = Some(Refusal::LearnedRange);
        }
        let mono = monotonic_ns();
        let live = |key: SourceKey| {
            self.dp.maps.verdicts.get(key).ok().flatten().filter(|v| v.expires_ns > mono).map(|v| (key, v))
        };
        let (key, host) = (SourceKey::from_ip(ip), SourceKey::host(ip));
        let found = if host != key { live(host).or_else(|| live(key)) } else { live(key) };
        let Some((key, v)) = found else { return presumed.map(|r| (r, None)) };
        use gatekeeper_common::action;
        if v.action != action::DROP && v.action != action::PRESUMED_DROP && v.action != action::BAN {
            return None;
        }
        let refusal = Refusal::from_code(v.reason)?;
        let ptr = VerdictReason::of_code(v.reason).and_then(|reason| {
            let comment = self.store.verdict(key).ok().flatten()?.comment?;
            crate::agent::lookups::comment_name(reason, &comment).map(str::to_owned)
        });
        Some((refusal, ptr))
    }

    /// Whether the datapath lets `ip` in as a good source: an allow range,
    /// or a live pass verdict with reason `ok` (the mail stream does not
    /// count such a source's connections).
    pub fn good_source(&self, ip: IpAddr) -> bool {
        if let Some((_, v)) = self.dp.maps.ranges.longest(RangeTable::Ingress, ip) {
            if v.kind == gatekeeper_common::range_kind::ALLOW {
                return true;
            }
        }
        let mono = monotonic_ns();
        self.dp.maps.verdicts.get(SourceKey::from_ip(ip)).ok().flatten().is_some_and(|v| {
            v.expires_ns > mono
                && v.action == gatekeeper_common::action::PASS
                && v.reason == gatekeeper_common::verdict_reason::OK
        })
    }

    /// What decides for `ip` in the datapath now (for `check`).
    pub fn explain(&self, ip: IpAddr) -> Result<CheckDatapath> {
        let key = SourceKey::from_ip(ip);
        let range = self
            .dp
            .maps
            .ranges
            .ranges()
            .into_iter()
            .filter(|(t, n, _)| *t == RangeTable::Ingress && n.contains(&ip))
            .max_by_key(|(_, n, _)| n.prefix_len());
        // A learned deny range yields to a live per-source verdict.
        let learned = range.as_ref().is_some_and(|(_, _, v)| v.flags & gatekeeper_common::range_flags::LEARNED != 0);
        let range = match range {
            Some((_, net, v)) => Some(CheckRange {
                net,
                kind: RangeKind::of_code(v.kind),
                record: self.store.list_ranges(None)?.into_iter().find(|r| r.id == v.range_id),
            }),
            None => None,
        };
        let mono = monotonic_ns();
        // As the datapath: the address's own verdict while live, else the
        // /64's (IPv6); the one key's (IPv4).
        let of = |key: SourceKey| {
            self.dp.maps.verdicts.get(key).ok().flatten().map(|v| {
                let check = CheckVerdict {
                    action: Action::of_code(v.action),
                    reason: VerdictReason::of_code(v.reason).unwrap_or(VerdictReason::Hold),
                    live: v.expires_ns > mono,
                    expires_in_secs: (v.expires_ns != u64::MAX)
                        .then(|| v.expires_ns.saturating_sub(mono) / 1_000_000_000),
                    record: self.store.verdict(key).ok().flatten(),
                };
                (check, v.action == gatekeeper_common::action::PRESUMED_DROP)
            })
        };
        let host = SourceKey::host(ip);
        let (verdict, presumed) = match (host != key).then(|| of(host)).flatten() {
            Some((v, p)) if v.live => (Some(v), p),
            _ => of(key).map_or((None, false), |(v, p)| (Some(v), p)),
        };
        let decides = match (&range, &verdict) {
            (Some(r), Some(v)) if learned && v.live => {
                format!("verdict: {} ({}), over the learned range {}", v.action, v.reason, r.net)
            }
            (Some(r), _) if learned => format!("learned range {} (a good verdict of the source would pass it)", r.net),
            (Some(r), _) => format!("{} range {}", r.kind, r.net),
            (None, Some(v)) if v.live && presumed => format!(
                "verdict: {} ({}) for the /64, several of whose addresses failed; a presumption: the address is still looked up and a good one passes",
                v.action, v.reason
            ),
            (None, Some(v)) if v.live => format!("verdict: {} ({})", v.action, v.reason),
            _ => "nothing: the source is unknown, passes, and is looked up".into(),
        };
        // What a refused source meets: silence, or the rejector's reason.
        let refused =
            self.refusal(ip).map(|(refusal, _)| CheckRefusal { refusal, action: self.cfg.reject.action(refusal) });
        Ok(CheckDatapath { decides, range, verdict, refused })
    }

    /// What `status` shows of the running agent; the lookup pipeline adds
    /// its own counters.
    pub fn status(&self, queue: QueueStats) -> Result<AgentLive> {
        let ranges = self.store.list_ranges(None)?;
        Ok(AgentLive {
            agent: AgentInfo {
                running: true,
                pid: Some(std::process::id()),
                started_at: Some(self.started_at),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            },
            pin_dir: self.dp.layout.root.clone(),
            state_dir: self.cfg.state_dir.clone(),
            socket: self.cfg.socket.clone(),
            dry_run: self.cfg.dry_run,
            event_interval_secs: self.cfg.event_interval.as_secs(),
            interfaces: self.attached.clone(),
            ports: self.dp.maps.ports()?,
            egress: self.egress_policy()?,
            inbound: self.inbound_limits()?,
            entries: Entries::count(ranges.iter().map(|r| (r.kind, r.net)), self.store.verdict_count()? as usize),
            capacity: Capacity {
                ranges_per_table: MAX_RANGES,
                verdicts: self.cfg.max_verdicts,
                range_nodes: self.cfg.max_range_nodes,
            },
            events_received: 0,
            lookups: Default::default(),
            learned_ranges: 0,
            learning_prefixes_tracked: 0,
            learning_shapes_tracked: 0,
            dropped: Dropped {
                verdicts_evicted: self.dropped.evicted,
                verdicts_refused: self.dropped.refused,
                ..Dropped::default()
            },
            queue,
            unapplied: self.unapplied.clone(),
            rejector: None,
            mail: Default::default(),
            policy: None,
        })
    }

    /// Detaches everything and removes every pin.
    pub fn unload(&mut self) -> Result<Vec<String>> {
        let removed = self.dp.layout.unload()?;
        info!(removed = removed.len(), "unloaded");
        Ok(removed)
    }
}

pub fn join_ports(p: &[u16]) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}
