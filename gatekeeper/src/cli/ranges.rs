//! `range`, `allow`, `pool`, `smarthost`, `exempt`: adding, removing,
//! listing, importing and exporting ranges.
use std::{io::Read as _, path::Path};

use anyhow::{bail, Context as _, Result};
use gatekeeper::{
    domain::{Origin, PoolAction, RangeKind},
    lists,
    protocol::{call, RangeAdded, RangeRow, RangeSpec, RangesRemoved, Request},
};
use ipnet::IpNet;

use super::{
    args::{AddArgs, DelArgs},
    output::{expires, opt, print_json, table},
    Target,
};

fn parse_nets(args: &[String]) -> Result<Vec<IpNet>> {
    args.iter().map(|s| lists::parse_net(s).map_err(Into::into)).collect()
}

pub fn add(t: &Target, kind: RangeKind, a: &AddArgs, action: Option<PoolAction>) -> Result<()> {
    let nets = parse_nets(&a.nets)?;
    let ranges = nets.iter().map(|n| RangeSpec { net: *n, comment: a.comment.clone() }).collect();
    let _: RangeAdded = call(
        &t.socket,
        &Request::RangeAdd {
            kind,
            ranges,
            origin: Origin::Manual,
            source: "cli".into(),
            expire_secs: a.expire.map(|d| d.as_secs()),
            force: a.force,
            skip_existing: false,
            replace: false,
            action,
        },
    )?;
    let what = match action {
        Some(a) => format!("{} ({a})", kind.what()),
        None => kind.what().to_string(),
    };
    for n in &nets {
        println!("added {what} {n}");
    }
    if action == Some(PoolAction::Explain) {
        explain_note(t);
    }
    Ok(())
}

/// After `pool add --action explain`: says so when the explain stage is not
/// on (the pinned settings tell), as the pools then get a RST.
fn explain_note(t: &Target) {
    let layout = gatekeeper::datapath::PinLayout::new(&t.pin_dir);
    if let Ok(Some(c)) = gatekeeper::datapath::explain::config(&layout) {
        if !c.staged() {
            eprintln!(
                "note: the explain stage is not on (it needs an agent with --subscriber-iface and [egress.explain] enabled, and tcx): these pools are answered with a RST (as reject) until it is"
            );
        }
    }
}

pub fn del(t: &Target, kind: RangeKind, a: &DelArgs) -> Result<()> {
    let nets = parse_nets(&a.nets)?;
    let _: RangesRemoved = call(&t.socket, &Request::RangeDel { kind, nets: nets.clone() })?;
    for n in &nets {
        println!("removed {} {n}", kind.what());
    }
    Ok(())
}

fn rows(t: &Target, kind: RangeKind, origin: Option<Origin>) -> Result<Vec<RangeRow>> {
    let mut rows: Vec<RangeRow> = call(&t.socket, &Request::RangeList { kind })?;
    rows.retain(|r| origin.is_none_or(|o| r.record.origin == o));
    Ok(rows)
}

pub fn list(t: &Target, kind: RangeKind, json: bool, origin: Option<Origin>) -> Result<()> {
    let rows = rows(t, kind, origin)?;
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("(no ranges)");
        return Ok(());
    }
    // Pools carry an action; other kinds do not.
    let with_action = rows.iter().any(|r| r.record.action.is_some());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let rec = &r.record;
            let mut row = vec![rec.net.to_string()];
            if with_action {
                row.push(opt(&rec.action));
            }
            row.extend([
                rec.origin.to_string(),
                rec.source.clone(),
                r.hits.to_string(),
                expires(rec.expires_at),
                opt(&rec.comment),
            ]);
            row
        })
        .collect();
    let header: &[&str] = if with_action {
        &["RANGE", "ACTION", "ORIGIN", "SOURCE", "HITS", "EXPIRES", "COMMENT"]
    } else {
        &["RANGE", "ORIGIN", "SOURCE", "HITS", "EXPIRES", "COMMENT"]
    };
    table(header, &cells);
    Ok(())
}

/// Deny ranges in a format `range import` reads back.
pub fn export(t: &Target, origin: Option<Origin>) -> Result<()> {
    println!("# gatekeeper deny ranges; re-import with `gatekeeper range import FILE`");
    for r in rows(t, RangeKind::Deny, origin)? {
        match r.record.comment.as_deref() {
            Some(c) if !c.is_empty() => println!("{} # {}", r.record.net, c.replace('\n', " ")),
            _ => println!("{}", r.record.net),
        }
    }
    Ok(())
}

pub struct ImportOpts {
    pub skip_bad: bool,
    pub replace: bool,
    pub expire: Option<std::time::Duration>,
    pub force: bool,
    pub allow_empty: bool,
}

pub fn import(t: &Target, file: &Path, o: ImportOpts) -> Result<()> {
    let ImportOpts { skip_bad, replace, expire, force, allow_empty } = o;
    let (text, name) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("read standard input")?;
        (s, "stdin".to_string())
    } else {
        let s = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        (s, file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
    };
    let (entries, errors) = lists::parse_list(&text);
    if !errors.is_empty() {
        if !skip_bad {
            return Err(gatekeeper::Error::BadListLines { path: file.display().to_string(), errors }.into());
        }
        for e in &errors {
            eprintln!("warning: {}: line {}: {} (skipped)", file.display(), e.line, e.message);
        }
    }
    if replace && entries.is_empty() && !allow_empty {
        bail!(
            "{} has no entries: with --replace that would remove every range imported from it (a failed download?); nothing was changed. Pass --allow-empty if that is what you want",
            file.display()
        );
    }
    let ranges: Vec<RangeSpec> = entries.into_iter().map(|e| RangeSpec { net: e.net, comment: e.comment }).collect();
    let total = ranges.len();
    let done: RangeAdded = call(
        &t.socket,
        &Request::RangeAdd {
            kind: RangeKind::Deny,
            ranges,
            origin: Origin::Imported,
            source: format!("import:{name}"),
            expire_secs: expire.map(|d| d.as_secs()),
            force,
            skip_existing: true,
            replace,
            action: None,
        },
    )?;
    println!(
        "imported {} from {}: {} new, {} already present, {} removed, {} bad line(s) skipped",
        total,
        file.display(),
        done.added,
        done.unchanged,
        done.removed,
        errors.len()
    );
    Ok(())
}
