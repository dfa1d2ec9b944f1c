//! Headers of log *file* lines: where the time, the program tag and the
//! message are.
//!
//! - RFC3164 (`Dec  8 01:02:03 host tag[pid]: msg`): no year and no zone.
//!   The year is `now`'s, rolled back one when the date would lie more than
//!   a day in the future (a December line read in January). The time is
//!   taken as UTC: a host logging in another local zone shifts `at_us` by
//!   its offset, which only moves events within the scorer's window bounds.
//! - RFC3339 (`2026-12-08T01:02:03.123456+00:00 host tag[pid]: msg`).
//! - Dovecot `log_path` (`Dec 08 01:02:03 imap-login: Info: msg`, no host):
//!   the first word ends in `:` or is a Dovecot event prefix such as
//!   `auth(user,ip)<session>:` (which holds client text, so the whole prefix
//!   stays in the message for the Dovecot parser).
//! - Exim mainlog (`2026-12-08 01:02:03[.mmm][ +zzzz] [[pid]] msg`): no tag.
use super::Record;

const US_PER_SEC: i64 = 1_000_000;
const US_PER_DAY: i64 = 86_400 * US_PER_SEC;

/// Splits a file line into its header and message. `now_us` (unix µs)
/// resolves RFC3164's missing year. `None` when no known header starts the
/// line.
pub fn split_line(line: &str, now_us: i64) -> Option<Record<'_>> {
    let line = line.trim_end_matches(['\n', '\r']);
    let b = line.as_bytes();
    if b.len() >= 16 && b[3] == b' ' && b[0].is_ascii_uppercase() {
        let (at_us, rest) = rfc3164(line, now_us)?;
        return Some(tagged(at_us, rest));
    }
    if b.len() >= 20 && b[4] == b'-' && b[7] == b'-' {
        match b[10] {
            b'T' => {
                let (at_us, rest) = rfc3339(line)?;
                return Some(tagged(at_us, rest));
            }
            b' ' => return exim_mainlog(line),
            _ => return None,
        }
    }
    None
}

/// `host tag[pid]: msg`, or (Dovecot `log_path`) `tag: msg` /
/// `tag(…)…: msg` without a host.
fn tagged(at_us: i64, rest: &str) -> Record<'_> {
    let first = rest.split(' ').next().unwrap_or("");
    if first.ends_with(':') || first.contains(['(', '<']) {
        // No host: a Dovecot log_path line. A plain `name:` prefix is the
        // tag; an event prefix (`auth(user,ip)<s>:`, `imap(user)<pid><s>:`)
        // holds client text and stays in the message.
        let name_end = first.find([':', '(', '<', '[']).unwrap_or(first.len());
        let ident = Some(&first[..name_end]).filter(|s| !s.is_empty());
        if first.contains(['(', '<']) {
            return Record { at_us: Some(at_us), ident, message: rest };
        }
        let message = rest.get(first.len() + 1..).unwrap_or("");
        return Record { at_us: Some(at_us), ident, message };
    }
    let after_host = rest.get(first.len() + 1..).unwrap_or("");
    let tag = after_host.split(' ').next().unwrap_or("");
    if let Some(t) = tag.strip_suffix(':') {
        let name = match t.find('[') {
            Some(i) if t.ends_with(']') => &t[..i],
            _ => t,
        };
        let message = after_host.get(tag.len() + 1..).unwrap_or("");
        let ident = Some(name).filter(|s| !s.is_empty());
        return Record { at_us: Some(at_us), ident, message };
    }
    Record { at_us: Some(at_us), ident: None, message: after_host }
}

fn month(m: &[u8]) -> Option<u32> {
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    MONTHS.iter().position(|x| x.as_slice() == m).map(|i| i as u32 + 1)
}

fn num(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
}

/// `HH:MM:SS` at `b[0..8]` → seconds of the day.
fn hms(b: &[u8]) -> Option<i64> {
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (num(&b[0..2])?, num(&b[3..5])?, num(&b[6..8])?);
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil year of a unix µs time.
fn year_of(us: i64) -> i64 {
    let days = us.div_euclid(US_PER_DAY);
    // Inverse of days_from_civil, year only.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

fn valid_day(y: i64, m: u32, d: u32) -> bool {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let max = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    (1..=max).contains(&d)
}

/// `Mmm dd HH:MM:SS ` (day space- or zero-padded).
fn rfc3164(line: &str, now_us: i64) -> Option<(i64, &str)> {
    let b = line.as_bytes();
    let m = month(&b[0..3])?;
    let d = if b[4] == b' ' { num(&b[5..6])? } else { num(&b[4..6])? };
    if b[6] != b' ' || b[15] != b' ' {
        return None;
    }
    let secs = hms(&b[7..15])?;
    let mut y = year_of(now_us);
    let at = |y: i64| valid_day(y, m, d).then(|| (days_from_civil(y, m, d) * 86_400 + secs) * US_PER_SEC);
    let mut at_us = at(y);
    if at_us.is_none_or(|t| t > now_us.saturating_add(US_PER_DAY)) {
        y -= 1;
        at_us = at(y);
    }
    Some((at_us?, line.get(16..)?))
}

/// `.ffffff` then `Z` or `±hh:mm` (RFC3339) / ` ±hhmm` (Exim); returns
/// (µs fraction, offset seconds east, bytes used).
fn fraction(b: &[u8]) -> (i64, usize) {
    if b.first() != Some(&b'.') {
        return (0, 0);
    }
    let n = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut us = 0i64;
    for (i, c) in b[1..1 + n].iter().enumerate().take(6) {
        us += i64::from(c - b'0') * 10i64.pow(5 - i as u32);
    }
    (us, 1 + n)
}

fn date(b: &[u8]) -> Option<i64> {
    let (y, m, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    if !(1..=12).contains(&m) || !valid_day(i64::from(y), m, d) {
        return None;
    }
    Some(days_from_civil(i64::from(y), m, d))
}

/// `YYYY-MM-DDTHH:MM:SS[.f](Z|±hh:mm) `.
fn rfc3339(line: &str) -> Option<(i64, &str)> {
    let b = line.as_bytes();
    let days = date(b)?;
    let secs = hms(&b[11..19])?;
    let (frac, used) = fraction(&b[19..]);
    let mut i = 19 + used;
    let off = match b.get(i)? {
        b'Z' => {
            i += 1;
            0
        }
        s @ (b'+' | b'-') => {
            let z = b.get(i + 1..i + 6)?;
            if z[2] != b':' {
                return None;
            }
            let o = i64::from(num(&z[0..2])?) * 3600 + i64::from(num(&z[3..5])?) * 60;
            i += 6;
            if *s == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    if b.get(i) != Some(&b' ') {
        return None;
    }
    let at = (days * 86_400 + secs - off) * US_PER_SEC + frac;
    Some((at, line.get(i + 1..)?))
}

/// `YYYY-MM-DD HH:MM:SS[.mmm][ ±hhmm] [[pid] ]msg`.
fn exim_mainlog(line: &str) -> Option<Record<'_>> {
    let b = line.as_bytes();
    let days = date(b)?;
    let secs = hms(&b[11..19])?;
    let (frac, used) = fraction(&b[19..]);
    let mut i = 19 + used;
    let mut off = 0;
    if let (Some(b' '), Some(s @ (b'+' | b'-'))) = (b.get(i), b.get(i + 1)) {
        if let Some(z) = b.get(i + 2..i + 6) {
            if let (Some(h), Some(m)) = (num(&z[0..2]), num(&z[2..4])) {
                if b.get(i + 6) == Some(&b' ') {
                    off = i64::from(h) * 3600 + i64::from(m) * 60;
                    if *s == b'-' {
                        off = -off;
                    }
                    i += 6;
                }
            }
        }
    }
    if b.get(i) != Some(&b' ') {
        return None;
    }
    let mut message = line.get(i + 1..)?;
    if let Some(r) = message.strip_prefix('[') {
        if let Some((pid, rest)) = r.split_once("] ") {
            if num(pid.as_bytes()).is_some() {
                message = rest;
            }
        }
    }
    let at = (days * 86_400 + secs - off) * US_PER_SEC + frac;
    Some(Record { at_us: Some(at), ident: None, message })
}
