//! `ban`, `verdict`, `check` and `classify`: per-source verdicts, the live
//! explanation of a source, and the offline classifier.
use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{bail, Result};
use gatekeeper::{
    classify::{classify_lines, load_rules, Classifier},
    config::Config,
    lists::format_duration_short,
    protocol::{call, CheckReply, Flushed, Request, VerdictsRemoved},
    store::VerdictRecord,
};

use super::{
    args::{BanCmd, VerdictCmd},
    output::{expires, opt, print_json, table},
    Target,
};

pub fn ban(t: &Target, cmd: &BanCmd) -> Result<()> {
    match cmd {
        BanCmd::Add { addrs, comment, expire } => {
            let req = Request::BanAdd {
                addrs: addrs.clone(),
                comment: comment.clone(),
                expire_secs: expire.map(|d| d.as_secs()),
            };
            let banned: Vec<VerdictRecord> = call(&t.socket, &req)?;
            for b in banned {
                println!("banned {}", b.key.display());
            }
        }
        BanCmd::Del { addrs } => {
            let done: VerdictsRemoved = call(&t.socket, &Request::BanDel { addrs: addrs.clone() })?;
            for b in done.removed {
                println!("lifted ban on {}", b.key.display());
            }
        }
        BanCmd::List(l) => {
            let rows: Vec<VerdictRecord> = call(&t.socket, &Request::BanList)?;
            if l.json {
                return print_json(&rows);
            }
            if rows.is_empty() {
                println!("(no bans)");
                return Ok(());
            }
            let cells: Vec<Vec<String>> =
                rows.iter().map(|r| vec![r.key.display(), expires(r.expires_at), opt(&r.comment)]).collect();
            table(&["SOURCE", "EXPIRES", "COMMENT"], &cells);
        }
    }
    Ok(())
}

pub fn verdict(t: &Target, cmd: &VerdictCmd) -> Result<()> {
    match cmd {
        VerdictCmd::List { json, reason } => {
            let rows: Vec<VerdictRecord> = call(&t.socket, &Request::VerdictList { reason: *reason })?;
            if *json {
                return print_json(&rows);
            }
            if rows.is_empty() {
                println!("(no verdicts)");
                return Ok(());
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.key.display(),
                        r.action.to_string(),
                        r.reason.to_string(),
                        expires(r.expires_at),
                        opt(&r.comment),
                    ]
                })
                .collect();
            table(&["SOURCE", "ACTION", "REASON", "EXPIRES", "DETAIL"], &cells);
        }
        VerdictCmd::Del { addrs } => {
            let done: VerdictsRemoved = call(&t.socket, &Request::VerdictDel { addrs: addrs.clone() })?;
            for v in done.removed {
                println!("forgot the verdict for {}", v.key.display());
            }
        }
        VerdictCmd::Flush { reason } => {
            let done: Flushed = call(&t.socket, &Request::VerdictFlush { reason: *reason })?;
            println!("removed {} verdict(s)", done.removed);
        }
    }
    Ok(())
}

/// `gatekeeper check`.
pub fn check(t: &Target, ip: IpAddr, json: bool) -> Result<()> {
    let c: CheckReply = call(&t.socket, &Request::Check { ip })?;
    if json {
        return print_json(&c);
    }
    let (l, d) = (&c.lookup, &c.decision);
    println!("source:     {} (verdicts key {})", c.ip, c.source_key);
    println!("PTR:        {}", if l.ptr_names.is_empty() { "none".to_string() } else { l.ptr_names.join(", ") });
    println!("DNS:        {} ({})", l.outcome, l.detail);
    if let Some(name) = &l.confirmed {
        println!("confirmed:  {name}");
    }
    println!(
        "outcome:    {}{} -> {} for {}",
        d.outcome,
        if d.reasons.is_empty() { String::new() } else { format!(" ({})", d.reasons.join(", ")) },
        d.action,
        format_duration_short(d.ttl)
    );
    println!("datapath:   decided by {}", c.datapath.decides);
    if let Some(r) = &c.datapath.refused {
        let meets = match r.action {
            gatekeeper::domain::ReasonAction::Reject => {
                "answered by the rejector with the reason (on the ports it speaks)"
            }
            gatekeeper::domain::ReasonAction::Drop => "dropped silently",
        };
        println!(
            "refused:    {} ([reject.actions] {} = {}): its connections are {meets}",
            r.refusal, r.refusal, r.action
        );
    }
    if let Some(v) = &c.datapath.verdict {
        let left = v
            .expires_in_secs
            .map(|x| format!("expires in {}", format_duration_short(Duration::from_secs(x))))
            .unwrap_or_else(|| "never expires".into());
        println!("verdict:    {} ({}), {}", v.action, v.reason, left);
    }
    if let Some(a) = &c.abuse {
        let banned = match (a.banned_until, a.reason) {
            (Some(u), Some(r)) => format!("; banned ({r}) {}", expires(Some(u))),
            _ => String::new(),
        };
        println!(
            "abuse:      score {:.0} of {} ({} failed logins, {} connections, {} offences){banned}",
            a.score, a.threshold, a.failures, a.connections, a.offences
        );
    }
    Ok(())
}

/// `gatekeeper classify`: offline, from arguments or standard input.
pub fn classify(cfg: &Config, rules: Option<&Path>, trusted: &[String], json: bool, pair: &[String]) -> Result<()> {
    if pair.len() == 1 {
        bail!("give both an address and a hostname, or none to read `IP HOSTNAME` lines from standard input");
    }
    let rules = match rules.or(cfg.classifier.rules.as_deref()) {
        Some(p) => Some(load_rules(p)?),
        None => None,
    };
    let trusted = if trusted.is_empty() { cfg.classifier.trusted.clone() } else { trusted.to_vec() };
    let classifier = Classifier::new(rules, trusted);
    let stdout = std::io::stdout().lock();
    if pair.len() == 2 {
        let line = format!("{} {}\n", pair[0], pair[1]);
        classify_lines(&classifier, line.as_bytes(), stdout, json)?;
    } else {
        classify_lines(&classifier, std::io::stdin().lock(), stdout, json)?;
    }
    Ok(())
}
