//! The status types: what `gatekeeper status` shows, as the agent reports
//! it (`Request::Status`) and as the pinned maps show it (read by the CLI,
//! so it works while the agent is down). One type per part, filled from
//! either side and rendered by one function (`cli::status`).
use std::{collections::BTreeMap, path::PathBuf};

use gatekeeper_common::{config_flags, sourcetab::VERDICT_WAYS};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{ifindex, Attached, LimitClassState, Maps, PinLayout},
    domain::{AttachMode, RangeKind, RangeTable, Role, VerdictReason},
    Result,
};

/// `gatekeeper status --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub pin_dir: PathBuf,
    /// What the pins show.
    pub datapath: DatapathStatus,
    /// What the agent reports (only `agent` when it is down).
    pub detail: AgentStatus,
}

/// Whether the agent runs, and which.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The agent's reply to `Request::Status`, or just "not running".
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AgentStatus {
    Running(Box<AgentLive>),
    Down { agent: AgentInfo },
}

/// What a running agent reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentLive {
    pub agent: AgentInfo,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub dry_run: bool,
    pub event_interval_secs: u64,
    /// As the agent attached them (in its own network namespace).
    pub interfaces: Vec<Attached>,
    pub ports: Vec<u16>,
    pub egress: EgressPolicy,
    /// The inbound limiter's classes (with their configured names).
    #[serde(default)]
    pub inbound: Vec<LimitClassStatus>,
    /// Counted in the database.
    pub entries: Entries,
    pub capacity: Capacity,
    pub events_received: u64,
    /// Lookups finished, by outcome.
    pub lookups: BTreeMap<VerdictReason, u64>,
    /// Ranges learned since start.
    pub learned_ranges: u64,
    pub learning_prefixes_tracked: usize,
    /// Naming shapes the learner tracks, over all prefixes.
    #[serde(default)]
    pub learning_shapes_tracked: usize,
    /// What was let go to stay within the configured bounds, since start.
    #[serde(default)]
    pub dropped: Dropped,
    pub queue: QueueStats,
    /// Entries of the database that did not fit into the maps at start
    /// (none when everything fits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unapplied: Vec<String>,
    /// The mail host's rejector, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejector: Option<crate::rejector::RejectorStats>,
    /// The mail stream: log sources, scores, bans, suspensions.
    #[serde(default)]
    pub mail: MailStats,
    /// The Postfix policy service, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::server::PolicyCountersSnapshot>,
}

/// Counters of the mail stream since start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MailStats {
    /// Lines read, per `[[logs]]` entry id.
    pub lines: BTreeMap<String, u64>,
    /// Events the parsers produced.
    pub events: u64,
    /// Lines of a known kind that could not be read safely, per reason.
    pub unparsed: BTreeMap<String, u64>,
    /// Bans the abuse score reached.
    pub bans: u64,
    pub suspensions: u64,
    /// Log source errors (a file that cannot be read, journalctl exits).
    pub source_errors: u64,
    /// Sources with a score now.
    #[serde(default)]
    pub scored: usize,
    /// Commits of what the logs concluded that the database refused (each
    /// is retried with the next batch).
    #[serde(default)]
    pub commit_errors: u64,
}

/// What the agent let go to stay within its configured bounds, since
/// start; none of it blocks anyone (a forgotten learner entry delays
/// learning, a dropped verdict leaves its source unknown, and it passes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// Prefixes the learner forgot (`learning.max_prefixes`).
    pub learning_prefixes: u64,
    /// Naming shapes the learner forgot (`learning.max_shapes`).
    pub learning_shapes: u64,
    /// Drop verdicts of lookups removed for newer ones (`max_verdicts`
    /// rows in the database, or both buckets full in the verdict table).
    pub verdicts_evicted: u64,
    /// Verdicts of lookups not written for lack of room among bans and
    /// pass verdicts.
    pub verdicts_refused: u64,
}

/// The lookup queue's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueStats {
    pub queued: u64,
    /// Already queued or being looked up.
    pub duplicate: u64,
    /// Refused because the queue was full (the source stays unknown).
    pub overflow: u64,
    /// Sources waiting or being looked up (at most `max_pending`).
    pub pending: usize,
    /// Of them, waiting for their turn.
    #[serde(default)]
    pub waiting: usize,
    /// Of them, waiting in the retransmit lane (served first).
    #[serde(default)]
    pub retransmit_lane: usize,
    /// /24s and /48s with sources waiting.
    #[serde(default)]
    pub prefixes: usize,
    /// Queued sources that gave their place to a source of a shorter
    /// prefix queue or to a retransmitter (they stay unknown).
    #[serde(default)]
    pub evicted: u64,
    /// Sources that got no lookup for lack of room: `overflow` + `evicted`.
    #[serde(default)]
    pub turned_away: u64,
    /// Reports recognised as a retransmitting sender.
    #[serde(default)]
    pub retransmits: u64,
    /// Lookups run with the shorter timeout of a backlog.
    #[serde(default)]
    pub hurried: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Capacity {
    pub ranges_per_table: u32,
    pub verdicts: u32,
    pub range_nodes: u32,
}

/// Entries per kind and family, and verdicts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Entries {
    pub deny_v4: usize,
    pub deny_v6: usize,
    pub allow_v4: usize,
    pub allow_v6: usize,
    pub pool_v4: usize,
    pub pool_v6: usize,
    pub exempt_v4: usize,
    pub exempt_v6: usize,
    pub smarthost_v4: usize,
    pub smarthost_v6: usize,
    pub verdicts: usize,
}

impl Entries {
    /// Counts ranges by kind and family.
    pub fn count(ranges: impl IntoIterator<Item = (RangeKind, IpNet)>, verdicts: usize) -> Entries {
        let mut e = Entries { verdicts, ..Entries::default() };
        for (kind, net) in ranges {
            let v6 = net.addr().is_ipv6();
            let slot = match (kind, v6) {
                (RangeKind::Deny, false) => &mut e.deny_v4,
                (RangeKind::Deny, true) => &mut e.deny_v6,
                (RangeKind::Allow, false) => &mut e.allow_v4,
                (RangeKind::Allow, true) => &mut e.allow_v6,
                (RangeKind::Pool, false) => &mut e.pool_v4,
                (RangeKind::Pool, true) => &mut e.pool_v6,
                (RangeKind::Exempt, false) => &mut e.exempt_v4,
                (RangeKind::Exempt, true) => &mut e.exempt_v6,
                (RangeKind::Smarthost, false) => &mut e.smarthost_v4,
                (RangeKind::Smarthost, true) => &mut e.smarthost_v6,
            };
            *slot += 1;
        }
        e
    }
}

/// The egress gate's port policy: ports blocked from pools, and the
/// rate-limit classes (with their configured names when the agent reports).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub guarded_ports: Vec<u16>,
    pub limits: Vec<LimitClassStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitClassStatus {
    pub class: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub ports: Vec<u16>,
    /// As configured, e.g. `30/min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    pub interval_ns: u64,
    pub burst_ns: u64,
}

impl LimitClassStatus {
    fn of(state: LimitClassState, named: Option<(String, String, u32)>) -> LimitClassStatus {
        let (class, ports, lim) = state;
        LimitClassStatus {
            class,
            name: named.as_ref().map(|n| n.0.clone()),
            ports,
            rate: named.as_ref().map(|n| n.1.clone()),
            burst: named.as_ref().map(|n| n.2),
            interval_ns: lim.interval_ns,
            burst_ns: lim.burst_ns,
        }
    }

    /// The inbound limiter's classes the maps hold (none when the maps have
    /// no limiter); `name_of` as for [`EgressPolicy::from_maps`].
    pub fn inbound(
        maps: &Maps,
        name_of: impl Fn(u32) -> Option<(String, String, u32)>,
    ) -> Result<Vec<LimitClassStatus>> {
        let Some(m) = &maps.inbound else { return Ok(Vec::new()) };
        Ok(m.classes()?
            .into_iter()
            .map(|c| {
                let named = name_of(c.0);
                LimitClassStatus::of(c, named)
            })
            .collect())
    }
}

impl EgressPolicy {
    /// The policy the maps hold; `name_of(class)` gives (name, rate, burst)
    /// as configured, where known.
    pub fn from_maps(maps: &Maps, name_of: impl Fn(u32) -> Option<(String, String, u32)>) -> Result<EgressPolicy> {
        let (guarded_ports, classes) = maps.egress_policy()?;
        let limits = classes
            .into_iter()
            .map(|(class, ports, lim): LimitClassState| {
                let named = name_of(class);
                LimitClassStatus {
                    class,
                    name: named.as_ref().map(|n| n.0.clone()),
                    ports,
                    rate: named.as_ref().map(|n| n.1.clone()),
                    burst: named.as_ref().map(|n| n.2),
                    interval_ns: lim.interval_ns,
                    burst_ns: lim.burst_ns,
                }
            })
            .collect();
        Ok(EgressPolicy { guarded_ports, limits })
    }
}

/// What the pins show, or that nothing is pinned.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DatapathStatus {
    Loaded(Box<PinnedStatus>),
    NotLoaded { loaded: bool },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinnedStatus {
    /// Always true.
    pub loaded: bool,
    /// The ingress program.
    pub program: Option<ProgramStatus>,
    pub programs: BTreeMap<Role, Option<ProgramStatus>>,
    pub links: Vec<LinkStatus>,
    pub ports: Vec<u16>,
    pub egress: EgressPolicy,
    /// The inbound limiter's classes (empty: none, or pins without the
    /// limiter's maps).
    #[serde(default)]
    pub inbound: Vec<LimitClassStatus>,
    pub dry_run: bool,
    /// In the datapath (deny ranges inside allow ranges are left out).
    pub entries: Entries,
    pub range_nodes: BTreeMap<RangeTable, NodeUse>,
    pub verdict_capacity: usize,
    /// The explain stage (`None`: pins without its map).
    #[serde(default)]
    pub explain: Option<ExplainStatus>,
}

/// The explain stage as pinned: whether the XDP gate hands it explain
/// pools' SYNs, where it is attached, the agent's listener ports (0: none)
/// and the routing recorded as gatekeeper's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainStatus {
    pub staged: bool,
    pub interfaces: Vec<String>,
    pub port_v4: u16,
    pub port_v6: u16,
    pub routing: Vec<String>,
}

impl ExplainStatus {
    fn read(layout: &PinLayout) -> Result<Option<ExplainStatus>> {
        let Some(c) = crate::datapath::explain::config(layout)? else { return Ok(None) };
        Ok(Some(ExplainStatus {
            staged: c.staged(),
            interfaces: layout.explain_links()?.into_iter().map(|(i, _)| i).collect(),
            port_v4: c.port_v4,
            port_v6: c.port_v6,
            routing: layout.explain_routes()?.into_iter().map(|(r, _)| r.command("add")).collect(),
        }))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub id: u32,
    pub tag: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    pub ifname: String,
    /// `None` when the interface is not in this network namespace.
    pub ifindex: Option<u32>,
    pub role: Role,
    pub mode: AttachMode,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeUse {
    pub used: u32,
    pub capacity: u32,
}

impl DatapathStatus {
    /// Reads the pins under `layout`.
    pub fn read(layout: &PinLayout) -> Result<DatapathStatus> {
        if !layout.is_loaded() {
            return Ok(DatapathStatus::NotLoaded { loaded: false });
        }
        let maps = Maps::open_pinned(layout)?;
        let ranges = maps.ranges.ranges();
        let program = |role: Role| {
            aya::programs::ProgramInfo::from_pin(layout.program(role))
                .ok()
                .map(|p| ProgramStatus { id: p.id(), tag: format!("{:016x}", p.tag()) })
        };
        let links = layout
            .links()?
            .into_iter()
            .map(|l| LinkStatus { ifindex: ifindex(&l.ifname), ifname: l.ifname, role: l.role, mode: l.mode })
            .collect();
        Ok(DatapathStatus::Loaded(Box::new(PinnedStatus {
            loaded: true,
            program: program(Role::Ingress),
            programs: Role::ALL.into_iter().map(|r| (r, program(r))).collect(),
            links,
            ports: maps.ports()?,
            egress: EgressPolicy::from_maps(&maps, |_| None)?,
            inbound: LimitClassStatus::inbound(&maps, |_| None)?,
            dry_run: maps.config()?.flags & config_flags::DRY_RUN != 0,
            entries: Entries::count(
                ranges.iter().map(|(_, n, v)| (RangeKind::of_code(v.kind), *n)),
                maps.verdicts()?.len(),
            ),
            range_nodes: RangeTable::ALL
                .into_iter()
                .map(|t| {
                    let (used, capacity) = maps.ranges.usage(t);
                    (t, NodeUse { used, capacity })
                })
                .collect(),
            verdict_capacity: maps.verdicts.buckets() as usize * VERDICT_WAYS / 2,
            explain: ExplainStatus::read(layout)?,
        })))
    }
}
