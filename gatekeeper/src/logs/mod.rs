//! Mail and login log lines, read into the few events the abuse scorer and
//! the mail-stream tracker need.
//!
//! Everything here is pure: a source ([`split_line`] for file lines, or a
//! journal entry) hands a [`Record`] to [`parse`], which returns an
//! [`Event`], `Ignored` for lines that do not matter, or `Unparsed` with a
//! short reason for a line of a known kind that cannot be read safely.
//!
//! Every client address is read only at its *anchor*, a position no
//! client-controlled text (usernames, HELO names, envelope addresses,
//! remote replies) can reach or shift:
//! - Postfix: the `name[addr]` right after a fixed prefix, from the left;
//! - Dovecot: the last `rip=` of a login line, the rightmost elements of an
//!   auth line's `(user,ip[,<session>])` group;
//! - Exim: the `[addr]` after an optional name and `(helo)` group, with the
//!   exact grammar `(?:\S+ )?(?:\([^)]*\) )?\[IP\](?::\d+)?`;
//! - sshd: `from IP port N[ ssh2]` at the end of the line.
//!
//! Usernames, HELO names and recipients are display text (or, for the
//! recipient, a distinct-count key of the sender's own mail), never the key
//! of an action against someone else.
use std::net::IpAddr;

mod dovecot;
mod exim;
pub mod file;
pub mod journal;
mod postfix;
mod sshd;
mod syslog;

pub use syslog::split_line;

pub use crate::domain::LogKind;

/// One log record as a source delivers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Unix microseconds, if the source knows them (journal
    /// `__REALTIME_TIMESTAMP`, a parsed header).
    pub at_us: Option<i64>,
    /// The syslog identifier / program tag without `[pid]`: `postfix/smtpd`,
    /// `postfix/submission/smtpd`, `dovecot`, `imap-login`, `auth`, `sshd`,
    /// `sshd-session`, `exim`. `None` when the line carries none (Exim's
    /// mainlog, bare stderr lines).
    pub ident: Option<&'a str>,
    /// The text after `tag[pid]: `.
    pub message: &'a str,
}

/// What [`parse`] made of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Event(Event),
    /// A line that does not matter (or belongs to another daemon).
    Ignored,
    /// A line of a kind the parser knows but cannot read safely; the reason
    /// is short and fixed, for a counter.
    Unparsed(&'static str),
}

/// What the line says the client talked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Smtp,
    Imap,
    Pop3,
    Ssh,
    Other,
}

/// How a line's failures combine with others of the same (client, session):
/// the scorer keeps `added` and `floor` per session, `Add(n)` adds to
/// `added`, `AtLeast(n)` raises `floor`, and the session's failures are
/// `max(added, floor)` (only the increase counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Add(u32),
    AtLeast(u32),
}

/// The result of one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    Sent,
    Deferred,
    Bounced,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client connected (Postfix `connect from`, a Dovecot login-process
    /// line of a connection that did not fail auth, sshd's pre-auth close).
    Connect { client: IpAddr, service: Service },
    /// Failed authentication. `session`: a key unique to one connection
    /// (Dovecot `session=<..>`, sshd's client port), `None` where each line
    /// is one attempt (Postfix, Exim). `user`: display text only.
    AuthFail { client: IpAddr, service: Service, session: Option<String>, count: Count, user: Option<String> },
    /// An RCPT refused by the MTA.
    RcptReject {
        qid: Option<String>,
        client: IpAddr,
        account: Option<String>,
        sender: String,
        rcpt: String,
        code: u16,
        dsn: Option<String>,
    },
    /// A message accepted from a client.
    Submitted { qid: String, client: IpAddr, account: Option<String> },
    /// A delivery attempt's result.
    Delivery { qid: String, rcpt: String, dsn: Option<String>, status: DeliveryStatus },
    /// The queue entry is gone.
    Removed { qid: String },
}

/// Reads one record of a `kind` log. Total: never panics, whatever the
/// bytes (callers cap lines at 16 KiB). Lines whose identifier belongs to
/// another daemon (a shared `mail.log`) are `Ignored`; with no identifier
/// the message is recognised by its shape.
pub fn parse(kind: LogKind, rec: &Record<'_>) -> Parsed {
    let msg = rec.message.trim_end_matches(['\n', '\r']);
    if let Some(r) = msg.strip_prefix("message repeated ") {
        return repeated(kind, rec.ident, r);
    }
    parse_one(kind, rec.ident, msg)
}

fn parse_one(kind: LogKind, ident: Option<&str>, msg: &str) -> Parsed {
    match kind {
        LogKind::Postfix => postfix::parse(ident, msg),
        LogKind::Dovecot => dovecot::parse(ident, msg),
        LogKind::Exim => exim::parse(ident, msg),
        LogKind::Sshd => sshd::parse(ident, msg),
    }
}

/// rsyslog's `message repeated N times: [ <msg>]` (RepeatedMsgReduction):
/// N identical lines, e.g. an sshd connection's further `Failed password`
/// lines. Per-attempt counts are multiplied; other events are one event.
fn repeated(kind: LogKind, ident: Option<&str>, r: &str) -> Parsed {
    let Some((n, inner)) = r.split_once(" times: [") else { return Parsed::Ignored };
    let Some(n) = digits_u32(n).filter(|n| (1..=100_000).contains(n)) else {
        return Parsed::Unparsed("repeated: count");
    };
    let inner = inner.strip_suffix(']').unwrap_or(inner);
    let inner = inner.strip_prefix(' ').unwrap_or(inner);
    match parse_one(kind, ident, inner) {
        Parsed::Event(Event::AuthFail { client, service, session, count: Count::Add(k), user }) => {
            Parsed::Event(Event::AuthFail { client, service, session, count: Count::Add(k.saturating_mul(n)), user })
        }
        other => other,
    }
}

/// An IP literal, `::ffff:a.b.c.d` normalised to IPv4.
pub(crate) fn ip(s: &str) -> Option<IpAddr> {
    // The shortest literal is "::" (2), the longest textual IPv6 with an
    // embedded IPv4 is 45 bytes; refuse anything else before parsing.
    if s.len() < 2 || s.len() > 45 {
        return None;
    }
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// `n` ASCII digits as a number (no sign, no overflow: `None`).
pub(crate) fn digits_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Is `s` a DSN status `d.ddd.ddd` (class 2, 4 or 5)?
pub(crate) fn is_dsn(s: &str) -> bool {
    let mut parts = s.split('.');
    let (Some(a), Some(b), Some(c), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    matches!(a, "2" | "4" | "5")
        && (1..=3).contains(&b.len())
        && (1..=3).contains(&c.len())
        && b.bytes().all(|x| x.is_ascii_digit())
        && c.bytes().all(|x| x.is_ascii_digit())
}

/// Occurrences of `needle` in `hay`, stopping at `limit` (enough to tell
/// "none", "one" and "more than one" apart cheaply).
pub(crate) fn count_up_to(hay: &str, needle: &str, limit: usize) -> usize {
    let mut n = 0;
    let mut from = 0;
    while n < limit {
        match hay.get(from..).and_then(|h| h.find(needle)) {
            Some(i) => {
                n += 1;
                from += i + needle.len();
            }
            None => break,
        }
    }
    n
}

#[cfg(test)]
mod tests;
