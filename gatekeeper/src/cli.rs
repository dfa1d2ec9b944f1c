//! Output of the read-only commands. `status` and `stats` read the pinned
//! maps directly, so they work while the agent is down.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use gatekeeper::{
    datapath::{ifindex, Maps, PinLayout},
    lists::format_duration_short,
    protocol::{call, ClientError, Request},
    store::{RangeKind, RangeTable},
};

use gatekeeper::datapath::{kind_of, Role};
use gatekeeper_common::{
    config_flags,
    counters::{counter_name, egress_counter_name, COUNTER_SLOTS, EGRESS_COUNTER_SLOTS},
    range_kind, Counter, StatKey,
};
use serde_json::{json, Value};

/// Prints rows as left-aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = width[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn join(v: &Value) -> String {
    v.as_array().into_iter().flatten().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

fn expires(v: &Value) -> String {
    match v.as_i64() {
        None => "never".into(),
        Some(t) => {
            let left = t - gatekeeper::datapath::unix_now();
            if left <= 0 {
                "expired".into()
            } else {
                format!("in {}", format_duration_short(Duration::from_secs(left as u64)))
            }
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn print_ranges(rows: &[Value]) {
    if rows.is_empty() {
        println!("(no ranges)");
        return;
    }
    // Pools carry an action; other kinds do not.
    let with_action = rows.iter().any(|r| !r["action"].is_null());
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![s(&r["net"])];
            if with_action {
                row.push(s(&r["action"]));
            }
            row.extend([s(&r["origin"]), s(&r["source"]), s(&r["hits"]), expires(&r["expires_at"]), s(&r["comment"])]);
            row
        })
        .collect();
    let header: &[&str] = if with_action {
        &["RANGE", "ACTION", "ORIGIN", "SOURCE", "HITS", "EXPIRES", "COMMENT"]
    } else {
        &["RANGE", "ORIGIN", "SOURCE", "HITS", "EXPIRES", "COMMENT"]
    };
    table(header, &rows);
}

pub fn print_bans(rows: &[Value]) {
    if rows.is_empty() {
        println!("(no bans)");
        return;
    }
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| vec![s(&r["key"]), expires(&r["expires_at"]), s(&r["comment"])]).collect();
    table(&["SOURCE", "EXPIRES", "COMMENT"], &rows);
}

/// `gatekeeper check` for people.
pub fn print_check(v: &Value) {
    let l = &v["lookup"];
    let d = &v["decision"];
    println!("source:     {} (verdicts key {})", s(&v["ip"]), s(&v["source_key"]));
    let names: Vec<String> = l["ptr_names"].as_array().into_iter().flatten().map(s).collect();
    println!("PTR:        {}", if names.is_empty() { "none".to_string() } else { names.join(", ") });
    println!("DNS:        {} ({})", s(&l["outcome"]), s(&l["detail"]));
    if let Some(c) = l["confirmed"].as_str() {
        println!("confirmed:  {c}");
    }
    let reasons: Vec<String> = d["reasons"].as_array().into_iter().flatten().map(s).collect();
    let act = if d["action"].as_u64() == Some(gatekeeper_common::action::DROP as u64) { "drop" } else { "pass" };
    println!(
        "outcome:    {}{} -> {act} for {}",
        s(&d["outcome"]),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
        format_duration_short(Duration::from_secs(d["ttl"].as_u64().unwrap_or(0)))
    );
    println!("datapath:   decided by {}", s(&v["datapath"]["decides"]));
    if let Some(vd) = v["datapath"]["verdict"].as_object() {
        let left = vd
            .get("expires_in_secs")
            .and_then(Value::as_u64)
            .map(|x| format!("expires in {}", format_duration_short(Duration::from_secs(x))))
            .unwrap_or_else(|| "never expires".into());
        println!("verdict:    {} ({}), {}", s(&vd["action"]), s(&vd["reason"]), left);
    }
}

pub fn print_verdicts(rows: &[Value]) {
    if rows.is_empty() {
        println!("(no verdicts)");
        return;
    }
    let reason = |v: &Value| {
        let r = v.as_u64().unwrap_or(u64::MAX) as u32;
        counter_name(gatekeeper_common::Counter::verdict_drop(r)).to_string()
    };
    let act = |v: &Value| {
        if v.as_u64() == Some(gatekeeper_common::action::DROP as u64) { "drop" } else { "pass" }.to_string()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![s(&r["key"]), act(&r["action"]), reason(&r["reason"]), expires(&r["expires_at"]), s(&r["comment"])]
        })
        .collect();
    table(&["SOURCE", "ACTION", "REASON", "EXPIRES", "DETAIL"], &rows);
}

/// What the pins say, for `status` with or without an agent.
fn pinned_status(layout: &PinLayout) -> Result<Value> {
    if !layout.is_loaded() {
        return Ok(json!({ "loaded": false }));
    }
    let maps = Maps::open_pinned(layout)?;
    let ranges = maps.ranges.ranges();
    let count =
        |kind: u8, v6: bool| ranges.iter().filter(|(_, n, v)| v.kind == kind && n.addr().is_ipv6() == v6).count();
    let nodes = |t: RangeTable| {
        let (used, capacity) = maps.ranges.usage(t);
        json!({ "used": used, "capacity": capacity })
    };
    let program = |role: Role| {
        aya::programs::ProgramInfo::from_pin(layout.program(role))
            .map(|p| json!({ "id": p.id(), "tag": format!("{:016x}", p.tag()) }))
            .unwrap_or(Value::Null)
    };
    let links: Vec<Value> = layout
        .links()?
        .into_iter()
        .map(|l| json!({ "ifname": l.ifname, "ifindex": ifindex(&l.ifname), "role": l.role, "mode": l.mode }))
        .collect();
    let (guarded, classes) = maps.egress_policy()?;
    let classes: Vec<Value> = classes
        .into_iter()
        .map(
            |(c, ports, l)| json!({ "class": c, "ports": ports, "interval_ns": l.interval_ns, "burst_ns": l.burst_ns }),
        )
        .collect();
    Ok(json!({
        "loaded": true,
        "program": program(Role::Ingress),
        "programs": { "ingress": program(Role::Ingress), "subscriber": program(Role::Subscriber), "uplink": program(Role::Uplink) },
        "links": links,
        "ports": maps.ports()?,
        "egress": { "guarded_ports": guarded, "limits": classes },
        "dry_run": maps.config()?.flags & config_flags::DRY_RUN != 0,
        "entries": {
            "deny_v4": count(range_kind::DENY, false),
            "deny_v6": count(range_kind::DENY, true),
            "allow_v4": count(range_kind::ALLOW, false),
            "allow_v6": count(range_kind::ALLOW, true),
            "pool_v4": count(range_kind::POOL, false),
            "pool_v6": count(range_kind::POOL, true),
            "exempt_v4": count(range_kind::EXEMPT, false),
            "exempt_v6": count(range_kind::EXEMPT, true),
            "smarthost_v4": count(range_kind::SMARTHOST, false),
            "smarthost_v6": count(range_kind::SMARTHOST, true),
            "verdicts": maps.verdicts()?.len(),
        },
        "range_nodes": {
            "ingress": nodes(RangeTable::Ingress),
            "subscriber": nodes(RangeTable::Subscriber),
            "smarthost": nodes(RangeTable::Smarthost),
        },
        "verdict_capacity": maps.verdicts.buckets() as usize * gatekeeper_common::sourcetab::VERDICT_WAYS / 2,
    }))
}

pub fn status(socket: &Path, pin_dir: &Path, as_json: bool) -> Result<()> {
    let layout = PinLayout::new(pin_dir);
    let agent = match call(socket, &Request::Status) {
        Ok(v) => v,
        Err(ClientError::NotRunning(_)) => json!({ "agent": { "running": false } }),
        Err(e) => return Err(e.into()),
    };
    let datapath = pinned_status(&layout)?;
    let out = json!({ "agent": agent["agent"], "pin_dir": pin_dir, "datapath": datapath, "detail": agent });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let running = agent["agent"]["running"].as_bool().unwrap_or(false);
    let loaded = datapath["loaded"].as_bool().unwrap_or(false);
    match (running, loaded) {
        (true, _) => {
            println!("agent:      running (pid {}, version {})", agent["agent"]["pid"], s(&agent["agent"]["version"]))
        }
        (false, true) => println!("agent:      NOT RUNNING — the pinned datapath keeps enforcing its last state"),
        (false, false) => println!("agent:      not running"),
    }
    if !loaded {
        println!("datapath:   not loaded (nothing pinned at {})", pin_dir.display());
        return Ok(());
    }
    println!(
        "datapath:   pinned at {} (program id {}, tag {})",
        pin_dir.display(),
        datapath["program"]["id"],
        s(&datapath["program"]["tag"])
    );
    // The agent sees its own network namespace; the CLI may not.
    let links = if running { &agent["interfaces"] } else { &datapath["links"] };
    for l in links.as_array().into_iter().flatten() {
        let idx = if l["ifindex"].is_null() {
            "not in this namespace".to_string()
        } else {
            format!("ifindex {}", l["ifindex"])
        };
        let adopted = if l["adopted"].as_bool() == Some(true) { ", adopted from a previous agent" } else { "" };
        println!("interface:  {} ({}, {}, {} mode{adopted})", s(&l["ifname"]), s(&l["role"]), idx, s(&l["mode"]));
    }
    println!("ports:      {} (ingress gate)", join(&datapath["ports"]));
    let eg = &datapath["egress"];
    println!("egress:     ports {} blocked from pools", {
        let p = join(&eg["guarded_ports"]);
        if p.is_empty() {
            "none".to_string()
        } else {
            p
        }
    });
    let names: Vec<Value> = agent["egress"]["limits"].as_array().cloned().unwrap_or_default();
    for l in eg["limits"].as_array().into_iter().flatten() {
        let named = names.iter().find(|n| n["class"] == l["class"]);
        let (name, rate, burst) = match named {
            Some(n) => (s(&n["name"]), s(&n["rate"]), s(&n["burst"])),
            None => (format!("class {}", l["class"]), format!("1 per {} ns", l["interval_ns"]), "-".into()),
        };
        println!("limit:      {name}: ports {} at {rate}, burst {burst}", join(&l["ports"]));
    }
    println!(
        "dry-run:    {}",
        if datapath["dry_run"].as_bool().unwrap_or(false) { "YES (nothing is dropped)" } else { "no" }
    );
    let e = &datapath["entries"];
    let cap = gatekeeper_common::MAX_RANGES;
    println!(
        "deny:       {} v4, {} v6 in the datapath (deny ranges inside allow ranges are left out)",
        e["deny_v4"], e["deny_v6"]
    );
    println!(
        "allow:      {} v4, {} v6 (at most {cap} entries per family, allow and deny together)",
        e["allow_v4"], e["allow_v6"]
    );
    let n = &datapath["range_nodes"];
    let nodes = |t: &str| format!("{}/{}", n[t]["used"], n[t]["capacity"]);
    println!(
        "trie nodes: ingress {}, pools {}, smarthosts {} (used/capacity, 1 KiB each)",
        nodes("ingress"),
        nodes("subscriber"),
        nodes("smarthost")
    );
    println!(
        "pools:      {} v4, {} v6; exempt {} v4, {} v6; smarthosts {} v4, {} v6",
        e["pool_v4"], e["pool_v6"], e["exempt_v4"], e["exempt_v6"], e["smarthost_v4"], e["smarthost_v6"]
    );
    println!("verdicts:   {} (capacity {})", e["verdicts"], datapath["verdict_capacity"]);
    if running {
        println!("events:     {} unknown-source reports received", agent["events_received"]);
    }
    Ok(())
}

struct Snapshot {
    at: Instant,
    counters: BTreeMap<StatKey, u64>,
    egress: BTreeMap<StatKey, u64>,
    /// (hits, kind, net) of ranges with hits, most first.
    top: Vec<(u64, RangeKind, String)>,
}

fn snapshot(maps: &Maps) -> Result<Snapshot> {
    let ranges = maps.ranges.ranges();
    let hits = maps.range_hits(ranges.iter().map(|(_, _, v)| v.range_id))?;
    let mut top = Vec::new();
    for (_, net, v) in ranges {
        if let Some(h) = hits.get(&v.range_id) {
            top.push((*h, kind_of(v.kind), net.to_string()));
        }
    }
    top.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
    Ok(Snapshot { at: Instant::now(), counters: maps.counters()?, egress: maps.egress_counters()?, top })
}

/// Interface names by stats slot: the agent's own view when it runs (it
/// may sit in another network namespace than this CLI), else a local
/// lookup, trusted only for names the datapath is pinned on.
struct Names(BTreeMap<u32, String>);

impl Names {
    fn new(socket: &Path, layout: &PinLayout) -> Names {
        let mut m = BTreeMap::new();
        if let Ok(v) = call(socket, &Request::Status) {
            for i in v["interfaces"].as_array().into_iter().flatten() {
                if let (Some(idx), Some(name)) = (i["ifindex"].as_u64(), i["ifname"].as_str()) {
                    m.insert(idx as u32 % gatekeeper_common::STAT_IF_SLOTS, name.to_string());
                }
            }
        } else if let Ok(links) = layout.links() {
            for l in links {
                if let Some(idx) = ifindex(&l.ifname) {
                    m.insert(idx % gatekeeper_common::STAT_IF_SLOTS, l.ifname);
                }
            }
        }
        Names(m)
    }

    fn label(&self, slot: u32) -> String {
        self.0.get(&slot).cloned().unwrap_or_else(|| format!("if{slot}"))
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

fn stats_json(snap: &Snapshot, names: &Names, top: usize) -> Value {
    let ingress = counters_json(&snap.counters, COUNTER_SLOTS, counter_name, names);
    let egress = counters_json(&snap.egress, EGRESS_COUNTER_SLOTS, egress_counter_name, names);
    let top: Vec<Value> =
        snap.top.iter().take(top).map(|(h, k, n)| json!({ "range": n, "kind": k, "hits": h })).collect();
    json!({ "totals": ingress["totals"], "interfaces": ingress["interfaces"], "egress": egress, "top_ranges": top })
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
