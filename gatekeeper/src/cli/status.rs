//! `status`, `stats`, `ports` and `unload`: what the datapath does and
//! holds. `status` and `stats` read the pinned maps directly, so they work
//! while the agent is down.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use gatekeeper::{
    datapath::{ifindex, Maps, PinLayout},
    domain::{RangeKind, RangeTable},
    protocol::{call, ClientError, Ports, Request, Unloaded},
    status::{AgentInfo, AgentLive, AgentStatus, DatapathStatus, LimitClassStatus, Status},
};
use gatekeeper_common::{
    counters::{counter_name, egress_counter_name, COUNTER_SLOTS, EGRESS_COUNTER_SLOTS},
    inbound::{inbound_counter_name, IN_COUNTERS},
    reject::reject_counter_name,
    Counter, StatKey,
};
use serde_json::{json, Value};

use super::{
    args::PortsCmd,
    output::{join, print_json, table},
    Target,
};

/// The agent's view (if it runs) and the pins' view.
pub fn read_status(t: &Target) -> Result<Status> {
    // A running agent's reply is read as such: a reply that does not parse
    // is an error, never taken for "not running".
    let detail = match call::<AgentLive>(&t.socket, &Request::Status) {
        Ok(live) => AgentStatus::Running(Box::new(live)),
        Err(ClientError::NotRunning(_)) => AgentStatus::Down { agent: AgentInfo::default() },
        Err(e) => return Err(e.into()),
    };
    let agent = match &detail {
        AgentStatus::Running(live) => live.agent.clone(),
        AgentStatus::Down { agent } => agent.clone(),
    };
    let datapath = DatapathStatus::read(&PinLayout::new(&t.pin_dir))?;
    Ok(Status { agent, pin_dir: t.pin_dir.clone(), datapath, detail })
}

pub fn status(t: &Target, as_json: bool) -> Result<()> {
    let st = read_status(t)?;
    if as_json {
        return print_json(&st);
    }
    print_status(&st);
    Ok(())
}

/// A limit class's name, rate and burst in words: as configured when the
/// agent reports them (`named`), else from the maps.
fn limit_words(l: &LimitClassStatus, named: Option<&LimitClassStatus>) -> (String, String, String) {
    match named {
        Some(n) => (
            n.name.clone().unwrap_or_default(),
            n.rate.clone().unwrap_or_default(),
            n.burst.map_or("-".into(), |b| b.to_string()),
        ),
        None => {
            let burst = l.burst_ns.checked_div(l.interval_ns).map_or("-".into(), |b| b.to_string());
            (format!("class {}", l.class), format!("1 per {} ns", l.interval_ns), burst)
        }
    }
}

/// `status` for people.
fn print_status(st: &Status) {
    let live = match &st.detail {
        AgentStatus::Running(live) => Some(live),
        AgentStatus::Down { .. } => None,
    };
    let dp = match &st.datapath {
        DatapathStatus::Loaded(p) => Some(p),
        DatapathStatus::NotLoaded { .. } => None,
    };
    match (&live, &dp) {
        (Some(l), _) => println!(
            "agent:      running (pid {}, version {})",
            l.agent.pid.unwrap_or_default(),
            l.agent.version.as_deref().unwrap_or("-")
        ),
        (None, Some(_)) => println!("agent:      NOT RUNNING — the pinned datapath keeps enforcing its last state"),
        (None, None) => println!("agent:      not running"),
    }
    let Some(dp) = dp else {
        println!("datapath:   not loaded (nothing pinned at {})", st.pin_dir.display());
        return;
    };
    let (id, tag) =
        dp.program.as_ref().map_or(("null".to_string(), "-".to_string()), |p| (p.id.to_string(), p.tag.clone()));
    println!("datapath:   pinned at {} (program id {id}, tag {tag})", st.pin_dir.display());
    // The agent sees its own network namespace; the CLI may not.
    let links: Vec<(String, String, Option<u32>, String, bool)> = match live {
        Some(l) => l
            .interfaces
            .iter()
            .map(|a| (a.ifname.clone(), a.role.to_string(), Some(a.ifindex), a.mode.to_string(), a.adopted))
            .collect(),
        None => dp
            .links
            .iter()
            .map(|l| (l.ifname.clone(), l.role.to_string(), l.ifindex, l.mode.to_string(), false))
            .collect(),
    };
    for (ifname, role, idx, mode, adopted) in links {
        let idx = idx.map_or_else(|| "not in this namespace".to_string(), |i| format!("ifindex {i}"));
        let adopted = if adopted { ", adopted from a previous agent" } else { "" };
        println!("interface:  {ifname} ({role}, {idx}, {mode} mode{adopted})");
    }
    println!("ports:      {} (ingress gate)", join(&dp.ports));
    let guarded = join(&dp.egress.guarded_ports);
    println!("egress:     ports {} blocked from pools", if guarded.is_empty() { "none" } else { &guarded });
    for l in &dp.egress.limits {
        let named = live.and_then(|a| a.egress.limits.iter().find(|n| n.class == l.class));
        let (name, rate, burst) = limit_words(l, named);
        println!("limit:      {name}: ports {} at {rate}, burst {burst}", join(&l.ports));
    }
    if dp.inbound.is_empty() {
        println!("inbound:    no limited ports");
    }
    for l in &dp.inbound {
        let named = live.and_then(|a| a.inbound.iter().find(|n| n.class == l.class));
        let (name, rate, burst) = limit_words(l, named);
        println!("inbound:    {name}: ports {} limited to {rate} per source, burst {burst}", join(&l.ports));
    }
    if let Some(x) = dp.explain.as_ref().filter(|x| x.staged || !x.interfaces.is_empty()) {
        let listeners = match (x.port_v4, x.port_v6) {
            (0, 0) => "no listener (the stage answers with a RST)".to_string(),
            (p4, 0) => format!("listener 127.0.0.1:{p4} (none for IPv6)"),
            (p4, p6) => format!("listeners 127.0.0.1:{p4}, [::1]:{p6}"),
        };
        let on = if x.staged { "on" } else { "NOT staged (explain pools get a RST)" };
        println!("explain:    {on}, stage on {}; {listeners}", x.interfaces.join(", "));
        for r in &x.routing {
            println!("explain:    routing `{r}`");
        }
    }
    println!("dry-run:    {}", if dp.dry_run { "YES (nothing is dropped)" } else { "no" });
    let e = &dp.entries;
    let cap = gatekeeper_common::MAX_RANGES;
    println!(
        "deny:       {} v4, {} v6 in the datapath (deny ranges inside allow ranges are left out)",
        e.deny_v4, e.deny_v6
    );
    println!(
        "allow:      {} v4, {} v6 (at most {cap} entries per family, allow and deny together)",
        e.allow_v4, e.allow_v6
    );
    let nodes = |t: RangeTable| dp.range_nodes.get(&t).map_or("-".into(), |n| format!("{}/{}", n.used, n.capacity));
    println!(
        "trie nodes: ingress {}, pools {}, smarthosts {} (used/capacity, 1 KiB each)",
        nodes(RangeTable::Ingress),
        nodes(RangeTable::Subscriber),
        nodes(RangeTable::Smarthost)
    );
    println!(
        "pools:      {} v4, {} v6; exempt {} v4, {} v6; smarthosts {} v4, {} v6",
        e.pool_v4, e.pool_v6, e.exempt_v4, e.exempt_v6, e.smarthost_v4, e.smarthost_v6
    );
    println!("verdicts:   {} (capacity {})", e.verdicts, dp.verdict_capacity);
    if let Some(l) = live {
        println!("events:     {} unknown-source reports received", l.events_received);
        let q = &l.queue;
        println!(
            "lookups:    {} pending ({} waiting in {} /24s and /48s, {} of them retransmitters, served first); since start: {} queued, {} retransmits, {} turned away ({} on arrival, {} evicted for fairness), {} looked up with the backlog's shorter timeout",
            q.pending, q.waiting, q.prefixes, q.retransmit_lane, q.queued, q.retransmits, q.turned_away, q.overflow, q.evicted, q.hurried
        );
        let d = &l.dropped;
        println!(
            "bounds:     learner {} prefixes, {} shapes tracked; dropped since start: {} learner prefixes, {} shapes, {} verdicts evicted, {} refused, {} sources over max_pending",
            l.learning_prefixes_tracked,
            l.learning_shapes_tracked,
            d.learning_prefixes,
            d.learning_shapes,
            d.verdicts_evicted,
            d.verdicts_refused,
            l.queue.overflow
        );
        if let Some(r) = &l.rejector {
            let answered: Vec<String> =
                r.answered.iter().filter(|(_, &n)| n > 0).map(|(k, n)| format!("{k} {n}")).collect();
            println!(
                "rejector:   {} sessions active{}; answered since start: {}; closed at once: {} at the session cap, {} over the per-source rate, {} not refused, {} on a port without a protocol",
                r.active,
                if r.at_capacity { " (AT CAPACITY: refused sources are dropped)" } else { "" },
                if answered.is_empty() { "none".to_string() } else { answered.join(", ") },
                r.closed_at_cap,
                r.over_rate,
                r.misrouted,
                r.unknown_port
            );
        }
        let m = &l.mail;
        if !m.lines.is_empty() || l.policy.is_some() {
            let lines: Vec<String> = m.lines.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let unparsed: u64 = m.unparsed.values().sum();
            println!(
                "mail logs:  lines read: {}; events {}; unparsed {unparsed}; source errors {}; commit errors {}; {} sources scored; {} bans and {} suspensions since start",
                if lines.is_empty() { "none".to_string() } else { lines.join(", ") },
                m.events,
                m.source_errors,
                m.commit_errors,
                m.scored,
                m.bans,
                m.suspensions
            );
        }
        if let Some(p) = &l.policy {
            println!(
                "policy:     {} requests ({} bad); answered DUNNO {}, REJECT {}, DEFER_IF_PERMIT {}",
                p.requests, p.bad_requests, p.dunno, p.reject, p.defer_if_permit
            );
        }
        if !l.unapplied.is_empty() {
            println!(
                "NOT APPLIED: {} database entries did not fit into the datapath at start (it runs with what fits; raise max_range_nodes, then `gatekeeper unload` and restart):",
                l.unapplied.len()
            );
            for u in l.unapplied.iter().take(10) {
                println!("            {u}");
            }
            if l.unapplied.len() > 10 {
                println!("            ... and {} more (`status --json` lists all)", l.unapplied.len() - 10);
            }
        }
    }
}

pub fn ports(t: &Target, cmd: &PortsCmd) -> Result<()> {
    match cmd {
        PortsCmd::Set { ports } => {
            let ports = gatekeeper::config::parse_ports(&ports.join(","))?;
            let set: Ports = call(&t.socket, &Request::PortsSet { ports })?;
            println!("guarded ports: {}", join(&set.ports));
        }
        PortsCmd::List(l) => {
            let p: Ports = call(&t.socket, &Request::PortsList)?;
            if l.json {
                return print_json(&p);
            }
            println!("{}", join(&p.ports));
        }
    }
    Ok(())
}

/// Through the agent if it runs (it exits), else straight on the pins.
pub fn unload(t: &Target) -> Result<()> {
    let removed: Vec<String> = match call::<Unloaded>(&t.socket, &Request::Unload) {
        Ok(u) => {
            println!("agent unloaded the datapath and exited");
            u.removed
        }
        Err(ClientError::NotRunning(_)) => {
            if !t.pin_dir.exists() {
                println!("nothing to unload: nothing pinned at {}", t.pin_dir.display());
                return Ok(());
            }
            PinLayout::new(&t.pin_dir).unload()?
        }
        Err(e) => return Err(e.into()),
    };
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}

struct Snapshot {
    at: Instant,
    counters: BTreeMap<StatKey, u64>,
    egress: BTreeMap<StatKey, u64>,
    /// The reject counters by slot (empty: pins of an older gatekeeper).
    reject: Vec<u64>,
    /// The inbound limiter's classes and counters by (class, counter).
    inbound: Vec<LimitClassStatus>,
    inbound_counts: BTreeMap<(u32, u32), u64>,
    /// (hits, kind, net) of ranges with hits, most first.
    top: Vec<(u64, RangeKind, String)>,
}

fn snapshot(maps: &Maps) -> Result<Snapshot> {
    let ranges = maps.ranges.ranges();
    let hits = maps.range_hits(ranges.iter().map(|(_, _, v)| v.range_id))?;
    let mut top = Vec::new();
    for (_, net, v) in ranges {
        if let Some(h) = hits.get(&v.range_id) {
            top.push((*h, RangeKind::of_code(v.kind), net.to_string()));
        }
    }
    top.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
    let reject = match &maps.reject {
        Some(r) => r.counters()?,
        None => Vec::new(),
    };
    let inbound_counts = match &maps.inbound {
        Some(m) => m.counters()?,
        None => BTreeMap::new(),
    };
    Ok(Snapshot {
        at: Instant::now(),
        counters: maps.counters()?,
        egress: maps.egress_counters()?,
        reject,
        inbound: LimitClassStatus::inbound(maps, |_| None)?,
        inbound_counts,
        top,
    })
}

/// Interface names by stats slot: the agent's own view when it runs (it
/// may sit in another network namespace than this CLI), else a local
/// lookup, trusted only for names the datapath is pinned on.
struct Names {
    ifaces: BTreeMap<u32, String>,
    /// Inbound class names, as the agent reports them.
    classes: BTreeMap<u32, String>,
}

impl Names {
    fn new(socket: &Path, layout: &PinLayout) -> Names {
        let mut m = BTreeMap::new();
        let mut classes = BTreeMap::new();
        if let Ok(live) = call::<AgentLive>(socket, &Request::Status) {
            for i in &live.interfaces {
                m.insert(i.ifindex % gatekeeper_common::STAT_IF_SLOTS, i.ifname.clone());
            }
            classes.extend(live.inbound.iter().filter_map(|l| Some((l.class, l.name.clone()?))));
        } else if let Ok(links) = layout.links() {
            for l in links {
                if let Some(idx) = ifindex(&l.ifname) {
                    m.insert(idx % gatekeeper_common::STAT_IF_SLOTS, l.ifname);
                }
            }
        }
        Names { ifaces: m, classes }
    }

    fn label(&self, slot: u32) -> String {
        self.ifaces.get(&slot).cloned().unwrap_or_else(|| format!("if{slot}"))
    }
}

/// One gate's counters as JSON: totals and per interface.
fn counters_json(counters: &BTreeMap<StatKey, u64>, slots: u32, name: fn(u32) -> &'static str, names: &Names) -> Value {
    let ifaces: BTreeSet<u32> = counters.keys().map(|k| k.ifindex).collect();
    let mut totals = serde_json::Map::new();
    for slot in 0..slots {
        let sum: u64 = counters.iter().filter(|(k, _)| k.counter == slot).map(|(_, v)| v).sum();
        totals.insert(name(slot).into(), sum.into());
    }
    let per_if: Vec<Value> = ifaces
        .iter()
        .map(|&i| {
            let c: serde_json::Map<String, Value> = (0..slots)
                .map(|slot| {
                    (
                        name(slot).to_string(),
                        counters.get(&StatKey { ifindex: i, counter: slot }).copied().unwrap_or(0).into(),
                    )
                })
                .collect();
            json!({ "ifindex": i, "name": names.label(i), "counters": c })
        })
        .collect();
    json!({ "totals": totals, "interfaces": per_if })
}

/// The inbound limiter's rows: a class's ports and counters, for every
/// class the maps hold and every class that counted something.
fn inbound_rows(snap: &Snapshot) -> Vec<(u32, Vec<u16>, Vec<u64>)> {
    let mut classes: BTreeSet<u32> = snap.inbound.iter().map(|l| l.class).collect();
    classes.extend(snap.inbound_counts.keys().map(|k| k.0));
    classes
        .into_iter()
        .map(|c| {
            let ports = snap.inbound.iter().find(|l| l.class == c).map(|l| l.ports.clone()).unwrap_or_default();
            let counts = (0..IN_COUNTERS).map(|i| snap.inbound_counts.get(&(c, i)).copied().unwrap_or(0)).collect();
            (c, ports, counts)
        })
        .collect()
}

fn inbound_json(snap: &Snapshot, names: &Names) -> Value {
    let mut totals = serde_json::Map::new();
    for i in 0..IN_COUNTERS {
        let sum: u64 = snap.inbound_counts.iter().filter(|(k, _)| k.1 == i).map(|(_, v)| v).sum();
        totals.insert(inbound_counter_name(i).into(), sum.into());
    }
    let classes: Vec<Value> = inbound_rows(snap)
        .into_iter()
        .map(|(c, ports, counts)| {
            let counters: serde_json::Map<String, Value> = counts
                .iter()
                .enumerate()
                .map(|(i, v)| (inbound_counter_name(i as u32).to_string(), (*v).into()))
                .collect();
            let mut v = json!({ "class": c, "ports": ports, "counters": counters });
            if let Some(n) = names.classes.get(&c) {
                v["name"] = n.clone().into();
            }
            v
        })
        .collect();
    json!({ "totals": totals, "classes": classes })
}

fn stats_json(snap: &Snapshot, names: &Names, top: usize) -> Value {
    let ingress = counters_json(&snap.counters, COUNTER_SLOTS, counter_name, names);
    let egress = counters_json(&snap.egress, EGRESS_COUNTER_SLOTS, egress_counter_name, names);
    let top: Vec<Value> =
        snap.top.iter().take(top).map(|(h, k, n)| json!({ "range": n, "kind": k, "hits": h })).collect();
    let reject: serde_json::Map<String, Value> =
        snap.reject.iter().enumerate().map(|(i, v)| (reject_counter_name(i as u32).to_string(), (*v).into())).collect();
    json!({
        "totals": ingress["totals"],
        "interfaces": ingress["interfaces"],
        "egress": egress,
        "reject": reject,
        "inbound": inbound_json(snap, names),
        "top_ranges": top,
    })
}

/// One gate's counters as a table: a row per counter `shown`, a column per
/// interface, the total and (with `prev`) the rate.
fn counter_table(
    title: &str,
    now: (&BTreeMap<StatKey, u64>, Instant),
    prev: Option<(&BTreeMap<StatKey, u64>, Instant)>,
    slots: u32,
    name: fn(u32) -> &'static str,
    shown: &dyn Fn(u32, u64) -> bool,
    names: &Names,
) {
    let (counters, at) = now;
    let ifaces: Vec<u32> = counters.keys().map(|k| k.ifindex).collect::<BTreeSet<_>>().into_iter().collect();
    let mut header: Vec<String> = vec![title.into()];
    header.extend(ifaces.iter().map(|&i| names.label(i)));
    header.push("TOTAL".into());
    if prev.is_some() {
        header.push("RATE/s".into());
    }
    let total = |c: &BTreeMap<StatKey, u64>, slot: u32| -> u64 {
        c.iter().filter(|(k, _)| k.counter == slot).map(|(_, v)| v).sum()
    };
    let rows: Vec<Vec<String>> = (0..slots)
        .filter(|&slot| shown(slot, total(counters, slot)))
        .map(|slot| {
            let mut row = vec![name(slot).to_string()];
            row.extend(
                ifaces
                    .iter()
                    .map(|&i| counters.get(&StatKey { ifindex: i, counter: slot }).copied().unwrap_or(0).to_string()),
            );
            row.push(total(counters, slot).to_string());
            if let Some((p, p_at)) = prev {
                let dt = at.duration_since(p_at).as_secs_f64().max(1e-3);
                row.push(format!("{:.1}", total(counters, slot).saturating_sub(total(p, slot)) as f64 / dt));
            }
            row
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &rows);
}

fn print_stats(snap: &Snapshot, prev: Option<&Snapshot>, names: &Names, top: usize) {
    // Verdict-reason rows that never counted anything are noise (most
    // outcomes pass by default); the decision rows always show.
    counter_table(
        "COUNTER",
        (&snap.counters, snap.at),
        prev.map(|p| (&p.counters, p.at)),
        COUNTER_SLOTS,
        counter_name,
        &|slot, total| slot < Counter::VerdictDropBase as u32 || total > 0,
        names,
    );
    if !snap.egress.is_empty() {
        println!();
        counter_table(
            "EGRESS",
            (&snap.egress, snap.at),
            prev.map(|p| (&p.egress, p.at)),
            EGRESS_COUNTER_SLOTS,
            egress_counter_name,
            &|_, _| true,
            names,
        );
    }
    let rows = inbound_rows(snap);
    if !rows.is_empty() {
        println!();
        let mut header: Vec<String> = vec!["INBOUND".into(), "PORTS".into()];
        header.extend((0..IN_COUNTERS).map(|i| inbound_counter_name(i).to_uppercase()));
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|(c, ports, counts)| {
                let mut row =
                    vec![names.classes.get(&c).cloned().unwrap_or_else(|| format!("class {c}")), join(&ports)];
                row.extend(counts.iter().map(u64::to_string));
                row
            })
            .collect();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(&header, &rows);
    }
    if snap.reject.iter().any(|&v| v > 0) {
        // What became of refused SYNs whose action is reject (the refusals
        // themselves are counted above, by reason).
        println!();
        let rows: Vec<Vec<String>> = snap
            .reject
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0)
            .map(|(i, &v)| {
                let mut row = vec![reject_counter_name(i as u32).to_string(), v.to_string()];
                if let Some(p) = prev.filter(|p| p.reject.len() == snap.reject.len()) {
                    let dt = snap.at.duration_since(p.at).as_secs_f64().max(1e-3);
                    row.push(format!("{:.1}", v.saturating_sub(p.reject[i]) as f64 / dt));
                }
                row
            })
            .collect();
        let header: &[&str] = if prev.is_some() { &["REJECT", "TOTAL", "RATE/s"] } else { &["REJECT", "TOTAL"] };
        table(header, &rows);
    }
    println!();
    if snap.top.is_empty() {
        println!("(no range hits yet)");
    } else {
        let rows: Vec<Vec<String>> =
            snap.top.iter().take(top).map(|(h, k, n)| vec![n.clone(), k.to_string(), h.to_string()]).collect();
        table(&["RANGE", "KIND", "HITS"], &rows);
    }
}

pub fn stats(socket: &Path, pin_dir: &Path, as_json: bool, watch: Option<u64>, top: usize) -> Result<()> {
    let layout = PinLayout::new(pin_dir);
    let maps = Maps::open_pinned(&layout)?;
    let names = Names::new(socket, &layout);
    let mut prev: Option<Snapshot> = None;
    loop {
        let snap = snapshot(&maps)?;
        if as_json {
            println!(
                "{}",
                if watch.is_some() {
                    serde_json::to_string(&stats_json(&snap, &names, top))?
                } else {
                    serde_json::to_string_pretty(&stats_json(&snap, &names, top))?
                }
            );
        } else {
            if watch.is_some() {
                print!("\x1b[2J\x1b[H");
                println!("gatekeeper stats — {} (every {}s, Ctrl-C to stop)\n", pin_dir.display(), watch.unwrap_or(1));
            }
            print_stats(&snap, prev.as_ref(), &names, top);
        }
        let Some(secs) = watch else { return Ok(()) };
        prev = Some(snap);
        std::thread::sleep(Duration::from_secs(secs.max(1)));
    }
}
