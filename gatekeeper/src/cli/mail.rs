//! `abuse`, `suspend` and `limit`: what the agent concluded from the mail
//! logs and the policy service, and the operator's say over it.
use anyhow::Result;
use gatekeeper::{
    protocol::{call, AbuseForgotten, AbuseRow, LimitRow, Pong, Request},
    store::SuspensionRecord,
};

use super::{
    args::{AbuseCmd, LimitCmd, SuspendCmd},
    output::{expires, opt, print_json, print_list},
    Target,
};

/// "5m ago".
fn ago(at: i64) -> String {
    let secs = (gatekeeper::time::unix_now() - at).max(0) as u64;
    format!("{} ago", gatekeeper::lists::format_duration_short(std::time::Duration::from_secs(secs)))
}

pub fn abuse(t: &Target, cmd: &AbuseCmd) -> Result<()> {
    match cmd {
        AbuseCmd::List(l) => {
            let rows: Vec<AbuseRow> = call(&t.socket, &Request::AbuseList)?;
            let header = ["SOURCE", "SCORE", "FAILED LOGINS", "CONNECTIONS", "OFFENCES", "BANNED", "REASON"];
            print_list(&rows, l.json, "(no source has a score)", &header, |r| {
                vec![
                    r.source.clone(),
                    format!("{:.0}/{}", r.score, r.threshold),
                    r.failures.to_string(),
                    r.connections.to_string(),
                    r.offences.to_string(),
                    r.banned_until.map_or_else(|| "-".into(), |u| expires(Some(u))),
                    opt(&r.reason),
                ]
            })?;
        }
        AbuseCmd::Forget { ip, json } => {
            let done: AbuseForgotten = call(&t.socket, &Request::AbuseForget { ip: *ip })?;
            if *json {
                return print_json(&done);
            }
            match (done.had_score, done.ban_lifted) {
                (_, true) => println!("forgot {} and lifted its abuse ban", done.source),
                (true, false) => println!("forgot {}", done.source),
                (false, false) => println!("{} had no score and no abuse ban", done.source),
            }
        }
    }
    Ok(())
}

pub fn suspend(t: &Target, cmd: &SuspendCmd) -> Result<()> {
    match cmd {
        SuspendCmd::List(l) => {
            let rows: Vec<SuspensionRecord> = call(&t.socket, &Request::SuspendList)?;
            let header = ["SUBJECT", "COUNT", "ADDRESS", "EXPIRES", "SINCE", "REASON"];
            print_list(&rows, l.json, "(nothing suspended)", &header, |r| {
                vec![
                    r.subject.clone(),
                    r.count.to_string(),
                    opt(&r.address),
                    expires(r.expires_at),
                    ago(r.created_at),
                    r.reason.clone(),
                ]
            })?;
        }
        SuspendCmd::Add { subject, reason, json } => {
            let _: Pong = call(&t.socket, &Request::SuspendAdd { subject: subject.clone(), reason: reason.clone() })?;
            if *json {
                return print_json(&serde_json::json!({ "suspended": subject }));
            }
            println!("suspended {subject}");
        }
        SuspendCmd::Del { subject, json } => {
            let r: SuspensionRecord = call(&t.socket, &Request::SuspendDel { subject: subject.clone() })?;
            if *json {
                return print_json(&r);
            }
            match &r.address {
                Some(a) => println!("lifted the suspension of {} and the block of {a}", r.subject),
                None => println!("lifted the suspension of {}", r.subject),
            }
        }
    }
    Ok(())
}

pub fn limit(t: &Target, cmd: &LimitCmd) -> Result<()> {
    match cmd {
        LimitCmd::Set { subject, limits, json } => {
            let _: Pong = call(&t.socket, &Request::LimitSet { subject: subject.clone(), limits: limits.clone() })?;
            if *json {
                return print_json(&serde_json::json!({ "subject": subject, "limits": limits }));
            }
            println!("{subject}: {limits}");
        }
        LimitCmd::Del { subject, json } => {
            let _: Pong = call(&t.socket, &Request::LimitDel { subject: subject.clone() })?;
            if *json {
                return print_json(&serde_json::json!({ "subject": subject, "removed": true }));
            }
            println!("{subject}: own limits removed");
        }
        LimitCmd::List(l) => {
            let rows: Vec<LimitRow> = call(&t.socket, &Request::LimitList)?;
            let header = ["SUBJECT", "LIMITS", "FROM", "MSGS/HOUR", "MSGS/DAY", "RCPTS/DAY"];
            print_list(&rows, l.json, "(no limits set and nothing sent)", &header, |r| {
                vec![
                    r.subject.clone(),
                    r.limits.clone(),
                    r.origin.clone(),
                    r.messages_hour.to_string(),
                    r.messages_day.to_string(),
                    r.recipients_day.to_string(),
                ]
            })?;
        }
    }
    Ok(())
}
