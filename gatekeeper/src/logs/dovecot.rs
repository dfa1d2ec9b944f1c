//! Dovecot 2.3 and 2.4: login-process lines (one per connection) and
//! auth-process lines (one per attempt, with `auth_verbose=yes`).
//!
//! Login lines: the client address is the *last* `rip=`: the only client
//! text before it is `user=<…>`, and everything after it (lip, mpid, TLS,
//! session) is Dovecot's own.
//! Auth lines: `<passdb>(<user>,<ip>[,<session>]): <outcome>` (2.3) or
//! `auth(<user>,<ip>[,sasl:<mech>][,master])[<pid>]<session>: …: <outcome>`
//! (2.4): the group is read from the right, and the outcome must occur
//! exactly once in the line.
use super::{count_up_to, digits_u32, ip, Count, Event, Parsed, Service};

const LEVELS: [&str; 6] = ["Info: ", "Warning: ", "Error: ", "Fatal: ", "Panic: ", "Debug: "];

fn strip_level(s: &str) -> Option<&str> {
    LEVELS.iter().find_map(|l| s.strip_prefix(l))
}

/// `name: ` or `name(pid): ` at the start, `name` a Dovecot process name.
fn strip_process(s: &str) -> Option<(&str, &str)> {
    let n = s.bytes().take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-').count();
    if n == 0 || n > 32 {
        return None;
    }
    let (name, rest) = s.split_at(n);
    if let Some(r) = rest.strip_prefix(": ") {
        return Some((name, r));
    }
    let r = rest.strip_prefix('(')?;
    let (pid, r) = r.split_once("): ")?;
    digits_u32(pid)?;
    Some((name, r))
}

fn is_dovecot_ident(id: &str) -> bool {
    id == "dovecot" || id.ends_with("-login") || id == "auth" || id == "auth-worker"
}

pub(super) fn parse(ident: Option<&str>, msg: &str) -> Parsed {
    let mut process = match ident {
        None | Some("dovecot") => None,
        Some(id) if is_dovecot_ident(id) => Some(id),
        Some(_) => return Parsed::Ignored,
    };
    let mut s = msg;
    for _ in 0..4 {
        if let Some(r) = strip_level(s) {
            s = r;
        } else if let Some((name, r)) = strip_process(s) {
            process = Some(name);
            s = r;
        } else {
            break;
        }
    }
    let login_shape = s.starts_with("Disconnected")
        || s.starts_with("Login aborted")
        || s.starts_with("Login: ")
        || s.starts_with("Aborted login");
    match process {
        Some(p) if p.ends_with("-login") => {
            if login_shape {
                login(service_of(p), s)
            } else {
                Parsed::Ignored
            }
        }
        Some("auth" | "auth-worker") => auth(s),
        Some(_) => Parsed::Ignored,
        None if login_shape && s.contains("rip=") => login(Service::Other, s),
        None => auth(s),
    }
}

fn service_of(process: &str) -> Service {
    match process {
        "imap-login" => Service::Imap,
        "pop3-login" => Service::Pop3,
        "submission-login" => Service::Smtp,
        _ => Service::Other,
    }
}

/// `Disconnected[:] <why> (<extra>): <elements>` (2.3 and older) or
/// `Login aborted: <why> (<human>) (<reason>): <elements>` (2.4), or
/// `Login: <elements>`.
fn login(service: Service, s: &str) -> Parsed {
    let Some(r) = s.rfind("rip=") else { return Parsed::Unparsed("dovecot login: no rip") };
    let after = &s[r + "rip=".len()..];
    // Dovecot's own elements (lip, mpid, session) always follow the address:
    // a line cut inside it must not yield a shorter address.
    let Some(end) = after.find(',') else { return Parsed::Unparsed("dovecot login: rip") };
    let Some(client) = ip(&after[..end]) else { return Parsed::Unparsed("dovecot login: rip") };
    let session = after
        .find("session=<")
        .and_then(|i| after[i + "session=<".len()..].split_once('>'))
        .map(|(v, _)| v)
        .filter(|v| !v.is_empty() && v.len() <= 64);
    // The "(auth failed, N attempts in S secs)" part comes before the
    // elements, i.e. before the first "): " (or before rip=).
    let head_end = s.find("): ").map_or(r, |i| i.min(r));
    let head = &s[..head_end];
    const FAILED: &str = "(auth failed, ";
    let Some(f) = head.rfind(FAILED) else {
        return Parsed::Event(Event::Connect { client, service });
    };
    let n = &head[f + FAILED.len()..];
    let n = &n[..n.bytes().take_while(u8::is_ascii_digit).count()];
    let Some(n) = digits_u32(n).filter(|n| *n > 0) else {
        return Parsed::Unparsed("dovecot login: attempts");
    };
    let user = s[..r]
        .find("user=<")
        .map(|i| &s[i + "user=<".len()..r])
        .and_then(|u| u.rfind('>').map(|j| &u[..j]))
        .filter(|u| !u.is_empty())
        .map(str::to_owned);
    let (session, count) = match session {
        Some(v) => (Some(v.to_owned()), Count::AtLeast(n)),
        None => (None, Count::Add(n)),
    };
    Parsed::Event(Event::AuthFail { client, service, session, count, user })
}

/// An auth-process line; see the module doc.
fn auth(s: &str) -> Parsed {
    const OUTCOMES: [&str; 2] = ["Password mismatch", "unknown user"];
    let hits: usize = OUTCOMES.iter().map(|o| count_up_to(s, o, 2)).sum();
    if hits == 0 {
        return Parsed::Ignored;
    }
    if !s.contains('(') {
        return Parsed::Ignored;
    }
    if hits > 1 {
        return Parsed::Unparsed("dovecot auth: ambiguous");
    }
    let Some(pos) = OUTCOMES.iter().find_map(|o| s.find(o)) else { return Parsed::Ignored };
    let prefix = &s[..pos];
    let Some(close) = prefix.rfind(')') else { return Parsed::Unparsed("dovecot auth: group") };
    // Between the group and the outcome only Dovecot's own text:
    // `<pid>`/`<session>` groups, then `: ` and words like `request [12]: Info: sql: `.
    let mut t = &prefix[close + 1..];
    let mut tail_session = None;
    for _ in 0..4 {
        let Some(r) = t.strip_prefix('<') else { break };
        let Some((g, rest)) = r.split_once('>') else { return Parsed::Unparsed("dovecot auth: group") };
        if !g.is_empty() && !g.bytes().all(|b| b.is_ascii_digit()) {
            tail_session = Some(g);
        }
        t = rest;
    }
    let Some(words) = t.strip_prefix(": ") else { return Parsed::Unparsed("dovecot auth: group") };
    if !words.bytes().all(|b| b.is_ascii_alphanumeric() || b" -_[]:.".contains(&b)) {
        return Parsed::Unparsed("dovecot auth: group");
    }
    let Some(open) = prefix[..close].rfind('(') else { return Parsed::Unparsed("dovecot auth: group") };
    // Inside the parentheses, from the right: [,<session>] [,master] [,sasl:mech] then the ip.
    let mut inner = &prefix[open + 1..close];
    let mut session = None;
    let mut client = None;
    let mut user = "";
    for i in 0..4 {
        let Some((l, last)) = inner.rsplit_once(',') else {
            // `passdb(user)`: no remote address (a local lookup).
            return Parsed::Ignored;
        };
        if i == 0 && last.len() > 2 && last.starts_with('<') && last.ends_with('>') {
            session = Some(&last[1..last.len() - 1]);
        } else if last == "master" || last.starts_with("sasl:") {
        } else {
            client = Some(last);
            user = l;
            break;
        }
        inner = l;
    }
    let Some(client) = client else { return Parsed::Unparsed("dovecot auth: group") };
    let Some(client) = ip(client) else { return Parsed::Unparsed("dovecot auth: ip") };
    let session = session.or(tail_session);
    let Some(session) = session.filter(|v| v.len() <= 64) else {
        // Without a session: an MTA's SASL lookup; the MTA's own line counts.
        return Parsed::Ignored;
    };
    if s.starts_with("auth-worker(") && tail_session.is_some() {
        // 2.4 logs a blocking passdb's failure from the worker *and* from
        // `auth(…)`: the latter counts.
        return Parsed::Ignored;
    }
    let user = (!user.is_empty() && user != "?").then(|| user.to_owned());
    Parsed::Event(Event::AuthFail {
        client,
        service: Service::Other,
        session: Some(session.to_owned()),
        count: Count::Add(1),
        user,
    })
}
