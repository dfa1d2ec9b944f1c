//! Exim 4 main log (smtp_in.c, receive.c, deliver.c, host.c).
//!
//! A remote host is logged as `[name ][(helo) ][ip][:port]`: the HELO, which
//! the client chooses, comes *before* the address, so the address is read
//! only through the exact grammar `(?:\S+ )?(?:\([^)]*\) )?\[IP\](?::\d+)?`
//! (Exim refuses a HELO with `)` unless `helo_allow_chars` or
//! `helo_accept_junk_hosts` are widened; such lines are `Unparsed`).
use std::net::IpAddr;

use super::{digits_u32, ip, is_dsn, Count, DeliveryStatus, Event, Parsed, Service};

pub(super) fn parse(ident: Option<&str>, msg: &str) -> Parsed {
    match ident {
        None | Some("exim" | "exim4") => {}
        Some(_) => return Parsed::Ignored,
    }
    if let Some(r) = msg.strip_prefix("H=") {
        return rejected_rcpt(r);
    }
    if let Some(r) = msg.strip_prefix("SMTP connection from ") {
        return connection(r);
    }
    if let Some((id, rest)) = msg.split_once(' ') {
        if is_msgid(id) {
            return message(id, rest);
        }
        // `<driver> authenticator failed for …`: the driver name (the admin's)
        // is the first word.
        if let Some(r) = rest.strip_prefix("authenticator failed for ") {
            return auth_failed(r);
        }
    }
    Parsed::Ignored
}

/// `1xajd5-0001Qg-0n` (4.96) or `1xajd5-00000001Qg-0000` (4.97+).
fn is_msgid(s: &str) -> bool {
    let mut parts = s.split('-');
    let ok = |p: Option<&str>, lens: std::ops::RangeInclusive<usize>| {
        p.is_some_and(|p| lens.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
    };
    ok(parts.next(), 6..=6) && ok(parts.next(), 6..=11) && ok(parts.next(), 2..=4) && parts.next().is_none()
}

/// The host grammar at the start of `s`: the address and the rest.
pub(super) fn host(s: &str) -> Option<(IpAddr, &str)> {
    let mut t = s;
    if !t.starts_with('(') && !t.starts_with('[') {
        // A looked-up name: one word.
        let (name, r) = t.split_once(' ')?;
        if name.is_empty() || name.contains(['(', ')', '[', ']']) {
            return None;
        }
        t = r;
    }
    if let Some(r) = t.strip_prefix('(') {
        let close = r.find(')')?;
        t = r[close + 1..].strip_prefix(' ')?;
    }
    let r = t.strip_prefix('[')?;
    let (a, mut rest) = r.split_once(']')?;
    let addr = ip(a)?;
    if let Some(p) = rest.strip_prefix(':').filter(|p| p.starts_with(|c: char| c.is_ascii_digit())) {
        let n = p.bytes().take_while(u8::is_ascii_digit).count();
        if n > 5 {
            return None;
        }
        rest = &p[n..];
    }
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with(':')) {
        return None;
    }
    Some((addr, rest))
}

/// `SMTP connection from <host> I=[…]:25 (TCP/IP connection count = N)`
/// opens a connection (log selector `smtp_connection`, on by default); the
/// same prefix with `closed by QUIT`, `lost`, … ends one and is ignored.
fn connection(r: &str) -> Parsed {
    if !r.ends_with(')') || !r.contains(" (TCP/IP connection count = ") {
        return Parsed::Ignored;
    }
    match host(r) {
        Some((client, _)) => Parsed::Event(Event::Connect { client, service: Service::Smtp }),
        None => Parsed::Unparsed("exim connection: host"),
    }
}

/// `<driver> authenticator failed for <host>: 535 Incorrect authentication data (set_id=<user>)`.
fn auth_failed(r: &str) -> Parsed {
    let Some((client, rest)) = host(r) else { return Parsed::Unparsed("exim auth: host") };
    // An ident (` U=name`) may follow the host.
    let rest = match rest.strip_prefix(" U=") {
        Some(u) => u.split_once(':').map_or("", |(_, r)| r),
        None => rest.strip_prefix(':').unwrap_or(""),
    };
    let Some(text) = rest.strip_prefix(' ') else { return Parsed::Unparsed("exim auth: host") };
    if !text.starts_with("535") {
        return Parsed::Ignored; // a temporary failure (435, 454) is not the client's
    }
    let user = text
        .find("(set_id=")
        .map(|i| &text[i + "(set_id=".len()..])
        .map(|u| u.strip_suffix(')').unwrap_or(u).to_owned());
    Parsed::Event(Event::AuthFail { client, service: Service::Smtp, session: None, count: Count::Add(1), user })
}

/// `H=<host> [U=ident ]F=<sender> [A=auth:id ]rejected RCPT <rcpt>: <message>`.
fn rejected_rcpt(r: &str) -> Parsed {
    const RCPT: &str = " rejected RCPT <";
    if !r.contains(RCPT) {
        return Parsed::Ignored; // rejected MAIL, lost connections, …
    }
    let Some((client, rest)) = host(r) else { return Parsed::Unparsed("exim rcpt: host") };
    let mut rest = rest;
    if let Some(u) = rest.strip_prefix(" U=") {
        rest = u.find(' ').map_or("", |i| &u[i..]);
    }
    let Some(rest) = rest.strip_prefix(" F=<") else { return Parsed::Unparsed("exim rcpt: sender") };
    // Sender and recipient are client text: the structural marker must be unique.
    if super::count_up_to(rest, RCPT, 2) != 1 {
        return Parsed::Unparsed("exim rcpt: ambiguous");
    }
    let Some(i) = rest.find(RCPT) else { return Parsed::Unparsed("exim rcpt: ambiguous") };
    let seg = &rest[..i];
    let tail = &rest[i + RCPT.len()..];
    // seg is `S>` or `S> A=auth:id`. A real A= ends the segment with the id
    // (no space, no `>`); a sender imitating one ends it with `>`.
    let (sender, account) = match seg.rfind("> A=") {
        Some(j) if !seg.ends_with('>') => {
            let a = &seg[j + "> A=".len()..];
            if a.contains(' ') {
                return Parsed::Unparsed("exim rcpt: account");
            }
            let account = a.split_once(':').map_or(a, |(_, id)| id);
            (&seg[..j], Some(account))
        }
        _ => (seg.strip_suffix('>').unwrap_or(seg), None),
    };
    let Some((rcpt, text)) = tail.split_once(">: ") else { return Parsed::Unparsed("exim rcpt: recipient") };
    let (code, dsn) = classify(text);
    Parsed::Event(Event::RcptReject {
        qid: None,
        client,
        account: account.filter(|a| !a.is_empty()).map(str::to_owned),
        sender: sender.to_owned(),
        rcpt: rcpt.to_owned(),
        code,
        dsn,
    })
}

/// Exim logs the reason of a refused recipient without its code: 550 and,
/// for an unknown or unroutable address, the DSN Exim sends with it (5.1.1).
fn classify(text: &str) -> (u16, Option<String>) {
    if let Some((code, dsn)) = code_dsn(text) {
        return (code, dsn);
    }
    let unknown = text.starts_with("Unrouteable address")
        || text.starts_with("Unknown user")
        || text.contains("User unknown")
        || text.contains("unknown user");
    (550, unknown.then(|| "5.1.1".to_owned()))
}

/// `ddd[ d.d.d] …` at the start of `text`.
fn code_dsn(text: &str) -> Option<(u16, Option<String>)> {
    let code = digits_u32(text.get(..3)?)?;
    if !(200..600).contains(&code) || !matches!(text.as_bytes().get(3), None | Some(b' ' | b'-')) {
        return None;
    }
    let dsn = text.get(4..).and_then(|t| t.split(' ').next()).filter(|d| is_dsn(d)).map(str::to_owned);
    let dsn = dsn.or_else(|| (code >= 500 && text.contains("nknown user")).then(|| "5.1.1".to_owned()));
    Some((code as u16, dsn))
}

/// Lines that start with a message id.
fn message(id: &str, rest: &str) -> Parsed {
    if rest == "Completed" {
        return Parsed::Event(Event::Removed { qid: id.to_owned() });
    }
    if let Some(r) = rest.strip_prefix("<= ") {
        return arrival(id, r);
    }
    if let Some(r) = rest.strip_prefix("** ") {
        return bounce(id, r);
    }
    if let Some(r) = rest.strip_prefix("=> ").or_else(|| rest.strip_prefix("-> ")) {
        let rcpt = r.split(' ').next().unwrap_or("");
        return delivery(id, rcpt, None, DeliveryStatus::Sent);
    }
    if let Some(r) = rest.strip_prefix("== ") {
        let rcpt = r.split(' ').next().unwrap_or("");
        return delivery(id, rcpt, None, DeliveryStatus::Deferred);
    }
    Parsed::Ignored
}

fn delivery(id: &str, rcpt: &str, dsn: Option<String>, status: DeliveryStatus) -> Parsed {
    let rcpt = rcpt.strip_suffix(':').unwrap_or(rcpt);
    if rcpt.is_empty() {
        return Parsed::Unparsed("exim delivery: recipient");
    }
    Parsed::Event(Event::Delivery { qid: id.to_owned(), rcpt: rcpt.to_owned(), dsn, status })
}

/// `<id> <= <sender> H=<host> … [A=auth:id] …`.
fn arrival(id: &str, r: &str) -> Parsed {
    if r.starts_with('"') {
        // A quoted local part may hold spaces and imitate H=.
        return Parsed::Unparsed("exim arrival: quoted sender");
    }
    let Some((_, rest)) = r.split_once(' ') else { return Parsed::Ignored };
    let Some(h) = rest.strip_prefix("H=") else { return Parsed::Ignored }; // local submission
    let Some((client, after)) = host(h) else { return Parsed::Unparsed("exim arrival: host") };
    // After the host: Exim's fields (U=, P=, X=, A=, S=) before the client's id=/T=.
    let mut account = None;
    for f in after.split(' ') {
        if let Some(a) = f.strip_prefix("A=") {
            account = a.split_once(':').map(|(_, id)| id).filter(|id| !id.is_empty());
            break;
        }
        if f.starts_with("S=") || f.starts_with("id=") || f.starts_with("T=") {
            break;
        }
    }
    Parsed::Event(Event::Submitted { qid: id.to_owned(), client, account: account.map(str::to_owned) })
}

/// `<id> ** <rcpt>[ <orig>] [R=… T=… H=host [ip]]: <message>`.
fn bounce(id: &str, r: &str) -> Parsed {
    let rcpt = r.split(' ').next().unwrap_or("");
    let rcpt = rcpt.strip_suffix(':').unwrap_or(rcpt);
    if rcpt.is_empty() {
        return Parsed::Unparsed("exim bounce: recipient");
    }
    // The remote's answer to *this* recipient: `after RCPT TO:<rcpt>: ddd d.d.d`.
    let marker = format!("after RCPT TO:<{rcpt}>: ");
    let dsn = if let Some(i) = r.find(&marker) {
        code_dsn(&r[i + marker.len()..]).and_then(|(code, dsn)| if code >= 500 { dsn } else { None })
    } else {
        let local = r[rcpt.len()..].trim_start_matches(':');
        let text = local.rsplit_once(": ").map_or(local.trim_start(), |(_, t)| t);
        if text == "Unrouteable address" || text.starts_with("Unrouteable address") {
            Some("5.1.1".to_owned())
        } else {
            None
        }
    };
    delivery(id, rcpt, dsn, DeliveryStatus::Bounced)
}
