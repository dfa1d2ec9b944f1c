//! Postfix (smtpd.c, smtpd_check.c, smtpd_sasl_glue.c, log_adhoc.c).
//!
//! The client is always the `NA` (`name[addr]` or, with
//! `smtpd_client_port_logging`, `name[addr]:port`) right after a fixed
//! prefix: nothing the client sends is logged before it. `name` is
//! `unknown` or a forward-confirmed hostname, which holds no `[`, `]` or
//! space.
use std::net::IpAddr;

use super::{count_up_to, digits_u32, ip, is_dsn, DeliveryStatus, Event, Parsed, Service};

/// Postfix programs whose lines we read (the last component of the tag:
/// `postfix/smtpd`, `postfix/submission/smtpd`, `postfix-out/smtp`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Smtpd,
    Delivery,
    Qmgr,
    /// Another Postfix program (cleanup, pickup, bounce, …).
    Other,
    /// No tag: recognise the message by its shape.
    Any,
}

/// `None` for a tag of another daemon (a shared mail log).
fn prog(ident: Option<&str>) -> Option<Prog> {
    let Some(id) = ident else { return Some(Prog::Any) };
    if !(id.contains('/') || id.starts_with("postfix")) {
        return None;
    }
    Some(match id.rsplit('/').next().unwrap_or(id) {
        "smtpd" => Prog::Smtpd,
        "smtp" | "lmtp" | "local" | "virtual" | "pipe" | "discard" | "error" | "retry" => Prog::Delivery,
        "qmgr" => Prog::Qmgr,
        _ => Prog::Other,
    })
}

pub(super) fn parse(ident: Option<&str>, msg: &str) -> Parsed {
    let p = match prog(ident) {
        None | Some(Prog::Other) => return Parsed::Ignored,
        Some(p) => p,
    };
    let any = p == Prog::Any;
    if p == Prog::Smtpd || any {
        if let Some(rest) = msg.strip_prefix("connect from ") {
            return connect(rest);
        }
        if let Some(rest) = msg.strip_prefix("warning: ") {
            return warning(rest);
        }
        if msg.starts_with("disconnect from ") || msg.starts_with("lost connection ") {
            return Parsed::Ignored;
        }
    }
    // `QID: …` or `NOQUEUE: …`.
    let Some((qid, rest)) = msg.split_once(": ") else { return Parsed::Ignored };
    let noqueue = qid == "NOQUEUE";
    if !noqueue && !is_qid(qid) {
        return Parsed::Ignored;
    }
    if p == Prog::Smtpd || any {
        if let Some(r) = rest.strip_prefix("reject: RCPT from ") {
            return reject(if noqueue { None } else { Some(qid) }, r);
        }
        if noqueue {
            return Parsed::Ignored;
        }
        if let Some(r) = rest.strip_prefix("client=") {
            return client(qid, r);
        }
    }
    if noqueue {
        return Parsed::Ignored;
    }
    if p == Prog::Delivery || any {
        if let Some(r) = rest.strip_prefix("to=<") {
            return delivery(qid, r);
        }
    }
    if (p == Prog::Qmgr || any) && rest == "removed" {
        return Parsed::Event(Event::Removed { qid: qid.to_owned() });
    }
    Parsed::Ignored
}

/// Short (`[0-9A-F]{6,}`) and long (`[0-9A-Za-z]{10,}`) queue ids.
fn is_qid(s: &str) -> bool {
    (5..=24).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `name[addr][:port]` at the start of `s`: the address and the rest.
/// `Err(())` when the shape is wrong; `Ok(None)` for `unknown[unknown]`.
#[allow(clippy::result_unit_err)]
pub(super) fn namaddr(s: &str) -> Result<(Option<IpAddr>, &str), ()> {
    let open = s.find('[').ok_or(())?;
    if s[..open].contains(' ') {
        return Err(());
    }
    let after = &s[open + 1..];
    let close = after.find(']').ok_or(())?;
    let addr = &after[..close];
    let mut rest = &after[close + 1..];
    if let Some(p) = rest.strip_prefix(':').filter(|p| p.starts_with(|c: char| c.is_ascii_digit())) {
        let n = p.bytes().take_while(u8::is_ascii_digit).count();
        if n > 5 {
            return Err(());
        }
        rest = &p[n..];
    }
    if addr == "unknown" {
        return Ok((None, rest));
    }
    let a = addr.strip_prefix("IPv6:").unwrap_or(addr);
    Ok((Some(ip(a).ok_or(())?), rest))
}

fn connect(rest: &str) -> Parsed {
    match namaddr(rest) {
        Ok((Some(client), "")) => Parsed::Event(Event::Connect { client, service: Service::Smtp }),
        Ok((None, _)) => Parsed::Ignored,
        _ => Parsed::Unparsed("postfix connect: client"),
    }
}

/// `warning: NA: SASL <mech> authentication failed: <reason>[, sasl_username=<user>]`.
fn warning(rest: &str) -> Parsed {
    // Most warnings are about Postfix itself ("connect to …", "database …").
    let Some(open) = rest.find('[') else { return Parsed::Ignored };
    if rest[..open].contains(' ') {
        return Parsed::Ignored;
    }
    let Ok((addr, after)) = namaddr(rest) else {
        return if rest.contains(": SASL ") { Parsed::Unparsed("postfix sasl: client") } else { Parsed::Ignored };
    };
    let Some(after) = after.strip_prefix(": SASL ") else { return Parsed::Ignored };
    // The mechanism is client text (%.100s): find the fixed words after it.
    let Some(i) = after.find(" authentication failed") else { return Parsed::Ignored };
    if i > 100 {
        return Parsed::Unparsed("postfix sasl: mechanism");
    }
    let Some(client) = addr else { return Parsed::Ignored };
    let user = after.find(", sasl_username=").map(|j| after[j + ", sasl_username=".len()..].to_owned());
    Parsed::Event(Event::AuthFail { client, service: Service::Smtp, session: None, count: super::Count::Add(1), user })
}

/// `QID: client=NA[, sasl_method=M][, sasl_username=U][, sasl_sender=S][, orig_…]`.
fn client(qid: &str, rest: &str) -> Parsed {
    let Ok((addr, after)) = namaddr(rest) else { return Parsed::Unparsed("postfix client=: client") };
    let Some(client) = addr else { return Parsed::Ignored };
    if !(after.is_empty() || after.starts_with(", ")) {
        return Parsed::Unparsed("postfix client=: client");
    }
    const KEY: &str = ", sasl_username=";
    let account = after.find(KEY).map(|i| {
        let u = &after[i + KEY.len()..];
        // U is the authenticated account (an admin's name); the client's
        // sasl_sender and the orig_ fields come after it.
        let end = [", sasl_sender=", ", orig_queue_id=", ", orig_client="]
            .iter()
            .filter_map(|k| u.find(k))
            .min()
            .unwrap_or(u.len());
        u[..end].to_owned()
    });
    Parsed::Event(Event::Submitted { qid: qid.to_owned(), client, account })
}

/// `NA: CODE DSN <text>; from=<S> to=<R> proto=P helo=<H>`.
fn reject(qid: Option<&str>, rest: &str) -> Parsed {
    let Ok((addr, after)) = namaddr(rest) else { return Parsed::Unparsed("postfix reject: client") };
    let Some(client) = addr else { return Parsed::Ignored };
    let Some(after) = after.strip_prefix(": ") else { return Parsed::Unparsed("postfix reject: client") };
    // Postfix's own reply code and DSN, right after the client.
    let code = after.get(..3).and_then(digits_u32);
    let (Some(code), Some(b' ')) = (code, after.as_bytes().get(3)) else {
        return Parsed::Unparsed("postfix reject: code");
    };
    let t = &after[4..];
    let (dsn, text) = match t.split_once(' ') {
        Some((d, text)) if is_dsn(d) => (Some(d), text),
        _ => (None, t),
    };
    let Some((sender, rcpt)) = tail(text).or_else(|| head_rcpt(text).map(|r| ("", r))) else {
        return Parsed::Unparsed("postfix reject: recipient");
    };
    Parsed::Event(Event::RcptReject {
        qid: qid.map(str::to_owned),
        client,
        account: None,
        sender: sender.to_owned(),
        rcpt: rcpt.to_owned(),
        code: code as u16,
        dsn: dsn.map(str::to_owned),
    })
}

/// The tail `; from=<S> to=<R>[ proto=P][ helo=<H>]` when each of its
/// markers occurs exactly once in the text (S, R and H are client text:
/// more than one marker makes the split ambiguous).
fn tail(text: &str) -> Option<(&str, &str)> {
    for m in ["; from=<", "> to=<", " proto=", " helo=<"] {
        if count_up_to(text, m, 2) > 1 {
            return None;
        }
    }
    let f = text.find("; from=<")?;
    let t = &text[f + "; from=<".len()..];
    let (sender, r) = t.split_once("> to=<")?;
    let end = r.find("> proto=").or_else(|| r.find("> helo=<")).or_else(|| r.strip_suffix('>').map(str::len))?;
    Some((sender, &r[..end]))
}

/// `<R>: Recipient address rejected` right after the DSN.
fn head_rcpt(text: &str) -> Option<&str> {
    let r = text.strip_prefix('<')?;
    let end = r.find(">: Recipient address rejected")?;
    Some(&r[..end])
}

/// `to=<R>[, orig_to=<O>], relay=…, [conn_use=N, ]delay=…, delays=…, dsn=X, status=S (…)`.
fn delivery(qid: &str, rest: &str) -> Parsed {
    // Every position where the fixed middle matches; R (the customer's) and
    // the remote's reason may both imitate it.
    let mut chosen: Option<(usize, &str, &str)> = None;
    let mut from = 0;
    let mut guard = 0;
    while let Some(i) = rest.get(from..).and_then(|r| r.find(", relay=")) {
        guard += 1;
        if guard > 64 {
            break;
        }
        let at = from + i;
        from = at + 1;
        if let Some((dsn, status)) = middle(&rest[at + ", relay=".len()..]) {
            let bounce_51 = status == "bounced" && dsn.starts_with("5.1.");
            match chosen {
                None => chosen = Some((at, dsn, status)),
                Some((_, d, s)) if bounce_51 && !(s == "bounced" && d.starts_with("5.1.")) => {
                    chosen = Some((at, dsn, status))
                }
                _ => {}
            }
        }
    }
    let Some((at, dsn, status)) = chosen else { return Parsed::Unparsed("postfix delivery: fields") };
    let r = &rest[..at];
    let r = match r.find(">, orig_to=<") {
        Some(j) => &r[..j],
        None => r.strip_suffix('>').unwrap_or(r),
    };
    let status = match status {
        "sent" => DeliveryStatus::Sent,
        "deferred" => DeliveryStatus::Deferred,
        "bounced" => DeliveryStatus::Bounced,
        _ => DeliveryStatus::Other,
    };
    Parsed::Event(Event::Delivery { qid: qid.to_owned(), rcpt: r.to_owned(), dsn: Some(dsn.to_owned()), status })
}

/// `\S+, (conn_use=\d+, )?delay=[\d.]+, delays=[\d./]+, dsn=(D), status=([a-z]+) \(`
/// at the start of `s` (after `relay=`).
fn middle(s: &str) -> Option<(&str, &str)> {
    let (relay, s) = s.split_once(", ")?;
    if relay.is_empty() || relay.contains(' ') {
        return None;
    }
    let s = match s.strip_prefix("conn_use=") {
        Some(c) => {
            let (n, r) = c.split_once(", ")?;
            digits_u32(n)?;
            r
        }
        None => s,
    };
    let (d, s) = s.strip_prefix("delay=")?.split_once(", ")?;
    if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let (ds, s) = s.strip_prefix("delays=")?.split_once(", ")?;
    if ds.is_empty() || !ds.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'/') {
        return None;
    }
    let (dsn, s) = s.strip_prefix("dsn=")?.split_once(", ")?;
    if !is_dsn(dsn) {
        return None;
    }
    let (status, _) = s.strip_prefix("status=")?.split_once(" (")?;
    if status.is_empty() || !status.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    Some((dsn, status))
}
