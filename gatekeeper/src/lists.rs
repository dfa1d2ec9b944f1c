//! Parsing of CIDRs, durations and list files (plain, Spamhaus DROP/EDROP
//! and Spamhaus JSON-lines). Pure functions, no I/O.
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{Error, LineError, Result};

/// Longest duration accepted (100 years), so that `now + ttl` in unix
/// seconds can never overflow.
const MAX_DURATION_SECS: u64 = 100 * 31_557_600;

/// Parses a CIDR (`192.0.2.0/24`, `2001:db8::/32`) or a bare address (a /32
/// or /128). The network must be canonical (no host bits set) and IPv4 must
/// be written as IPv4, not as `::ffff:a.b.c.d`.
pub fn parse_net(s: &str) -> Result<IpNet> {
    let input = s.trim();
    let err = |reason: String| Error::InvalidCidr { input: input.to_string(), reason };
    if input.is_empty() {
        return Err(err("empty".into()));
    }
    let (addr, prefix) = match input.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (input, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| err(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| err(format!("prefix length /{p} is too long (at most /{max})")))?
        }
        Some(p) => return Err(err(format!("prefix length {p:?} is not a number"))),
    };
    let net = IpNet::new(addr, prefix).map_err(|_| {
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        err(format!("prefix length /{prefix} is too long for {family} (at most /{max})"))
    })?;
    check_net(net).map_err(err)?;
    Ok(net)
}

/// Why `net` is not acceptable as a stored range, if it is not: host bits
/// set, or an IPv4-mapped IPv6 network.
pub(crate) fn check_net(net: IpNet) -> std::result::Result<(), String> {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let v4net = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map(|n| n.trunc());
            let hint = v4net.map(|n| n.to_string()).unwrap_or_else(|_| v4.to_string());
            return Err(format!("IPv4-mapped IPv6 address; use the IPv4 form {hint}"));
        }
    }
    if net.trunc() != net {
        return Err(format!("host bits set; did you mean {}?", net.trunc()));
    }
    Ok(())
}

/// Parses a duration: `90s`, `30m`, `1h`, `7d`, `1w`, `1h30m`. Must be a
/// whole number of seconds, more than zero and at most 100 years.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let input = s.trim();
    let err = |reason: String| Error::InvalidDuration { input: input.to_string(), reason };
    if input.starts_with('-') {
        return Err(err("must not be negative".into()));
    }
    if !input.is_empty() && input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("a unit is needed, e.g. {input}s, {input}m or {input}d")));
    }
    let d = humantime::parse_duration(input).map_err(|e| err(e.to_string()))?;
    if d.is_zero() {
        return Err(err("must be greater than zero".into()));
    }
    if d.subsec_nanos() != 0 {
        return Err(err("must be a whole number of seconds".into()));
    }
    if d.as_secs() > MAX_DURATION_SECS {
        return Err(err("too long (at most 100 years)".into()));
    }
    Ok(d)
}

/// Short form for listings: the two most significant units, rounded down
/// (`6d23h`, `59m`, `1m30s`, `12s`).
pub fn format_duration_short(d: Duration) -> String {
    let secs = d.as_secs();
    let parts = [(secs / 86_400, "d"), (secs / 3600 % 24, "h"), (secs / 60 % 60, "m"), (secs % 60, "s")];
    let Some(first) = parts.iter().position(|&(v, _)| v > 0) else {
        return "0s".into();
    };
    let mut out = format!("{}{}", parts[first].0, parts[first].1);
    if let Some(&(v, unit)) = parts.get(first + 1) {
        if v > 0 {
            out.push_str(&format!("{v}{unit}"));
        }
    }
    out
}

/// One network of a list file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    /// 1-based line number.
    pub line: usize,
    pub net: IpNet,
    pub comment: Option<String>,
}

/// A line of the Spamhaus JSON-lines format.
#[derive(serde::Deserialize)]
struct JsonLine {
    #[serde(rename = "type")]
    kind: Option<String>,
    cidr: Option<String>,
    sblid: Option<String>,
}

/// Parses a list file: one network per line, with an optional trailing
/// `# comment` or `; comment` (Spamhaus DROP/EDROP), or Spamhaus JSON lines.
/// Blank lines and lines starting with `#` or `;` are ignored. Returns the
/// entries and the bad lines; the caller imports nothing if there are any.
pub fn parse_list(text: &str) -> (Vec<ListEntry>, Vec<LineError>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<IpNet, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let parsed = if trimmed.starts_with('{') {
            parse_json_line(trimmed)
        } else {
            let (net, comment) = match trimmed.find(['#', ';']) {
                Some(at) => (&trimmed[..at], Some(trimmed[at + 1..].trim())),
                None => (trimmed, None),
            };
            let comment = comment.filter(|c| !c.is_empty()).map(str::to_string);
            parse_net(net).map(|net| Some((net, comment))).map_err(|e| e.to_string())
        };
        match parsed {
            Ok(None) => {}
            Ok(Some((net, comment))) => match seen.get(&net) {
                Some(first) => {
                    errors.push(LineError { line, message: format!("{net} is a duplicate of line {first}") })
                }
                None => {
                    seen.insert(net, line);
                    entries.push(ListEntry { line, net, comment });
                }
            },
            Err(message) => errors.push(LineError { line, message }),
        }
    }
    (entries, errors)
}

/// `Ok(None)` for the metadata line.
fn parse_json_line(line: &str) -> std::result::Result<Option<(IpNet, Option<String>)>, String> {
    let j: JsonLine = serde_json::from_str(line).map_err(|e| {
        // serde_json's own "at line 1 column N" would contradict the file's line number.
        let text = e.to_string();
        let msg = text.rsplit_once(" at line ").map_or(text.as_str(), |(m, _)| m);
        format!("invalid JSON at column {}: {msg}", e.column())
    })?;
    if j.kind.as_deref() == Some("metadata") {
        return Ok(None);
    }
    let cidr = j.cidr.ok_or("JSON line has no \"cidr\" field")?;
    let net = parse_net(&cidr).map_err(|e| e.to_string())?;
    Ok(Some((net, j.sblid.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: Result<IpNet>) -> String {
        match r {
            Err(Error::InvalidCidr { reason, .. }) => reason,
            other => panic!("expected InvalidCidr, got {other:?}"),
        }
    }

    #[test]
    fn parse_net_accepts_cidrs_and_bare_addresses() {
        assert_eq!(parse_net("192.0.2.0/24").unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(parse_net("  2001:db8::/32\t").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_net("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        assert_eq!(parse_net("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(parse_net("::/0").unwrap().to_string(), "::/0");
    }

    #[test]
    fn parse_net_rejects_bad_input_with_reasons() {
        assert!(reason(parse_net("")).contains("empty"));
        assert!(reason(parse_net("example.com")).contains("not an IPv4 or IPv6 address"));
        assert!(reason(parse_net("192.0.2.0/")).contains("not a number"));
        assert!(reason(parse_net("192.0.2.0/+24")).contains("not a number"));
        assert!(reason(parse_net("192.0.2.0/24/1")).contains("not a number"));
        assert!(reason(parse_net("192.0.2.0/33")).contains("at most /32"));
        assert!(reason(parse_net("192.0.2.0/999")).contains("too long"));
        assert!(reason(parse_net("2001:db8::/129")).contains("at most /128"));
        assert_eq!(reason(parse_net("192.0.2.1/24")), "host bits set; did you mean 192.0.2.0/24?");
        assert!(reason(parse_net("2001:db8::1/32")).contains("did you mean 2001:db8::/32?"));
        let e = parse_net(" 192.0.2.1/24 ").unwrap_err().to_string();
        assert!(e.contains("\"192.0.2.1/24\""), "{e}");
    }

    #[test]
    fn parse_net_rejects_ipv4_mapped() {
        assert_eq!(reason(parse_net("::ffff:1.2.3.4/128")), "IPv4-mapped IPv6 address; use the IPv4 form 1.2.3.4/32");
        assert!(reason(parse_net("::ffff:1.2.3.4")).contains("1.2.3.4/32"));
        assert!(reason(parse_net("::ffff:1.2.3.4/120")).contains("use the IPv4 form 1.2.3.0/24"));
        // A v6 network that merely contains the mapped range is fine.
        assert!(parse_net("::/64").is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration(" 7d ").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "0s", "0", "abc", "5", "-5m", "1.5.5h", "500ms", "1000y", "99999999999999999999s"] {
            assert!(matches!(parse_duration(bad), Err(Error::InvalidDuration { .. })), "{bad:?} accepted");
        }
        assert!(parse_duration("0s").unwrap_err().to_string().contains("greater than zero"));
        assert!(parse_duration("5").unwrap_err().to_string().contains("a unit is needed, e.g. 5s"));
        assert!(parse_duration("-5m").unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn short_durations() {
        let f = |s| format_duration_short(Duration::from_secs(s));
        assert_eq!(f(0), "0s");
        assert_eq!(f(12), "12s");
        assert_eq!(f(90), "1m30s");
        assert_eq!(f(59 * 60 + 59), "59m59s");
        assert_eq!(f(3600), "1h");
        assert_eq!(f(7 * 86400 - 1), "6d23h");
        assert_eq!(f(86400 + 300), "1d");
        assert_eq!(f(400 * 86400), "400d");
        assert_eq!(format_duration_short(Duration::from_millis(999)), "0s");
    }

    #[test]
    fn plain_list_with_comments() {
        let text = "\u{feff}# header\n\n192.0.2.0/24  # office\r\n2001:db8::/32\n  198.51.100.7 #\n";
        let (entries, errors) = parse_list(text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0],
            ListEntry { line: 3, net: parse_net("192.0.2.0/24").unwrap(), comment: Some("office".into()) }
        );
        assert_eq!(entries[1].line, 4);
        assert_eq!(entries[1].comment, None);
        assert_eq!(entries[2].net.to_string(), "198.51.100.7/32");
        assert_eq!(entries[2].comment, None);
    }

    #[test]
    fn spamhaus_drop_format() {
        let text =
            "; Spamhaus DROP List 2024/01/01\n; Last-Modified: x\n1.10.16.0/20 ; SBL256894\n1.19.0.0/16 ; SBL434604\n";
        let (entries, errors) = parse_list(text);
        assert!(errors.is_empty());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].net.to_string(), "1.10.16.0/20");
        assert_eq!(entries[0].comment.as_deref(), Some("SBL256894"));
        assert_eq!(entries[1].line, 4);
    }

    #[test]
    fn spamhaus_json_format() {
        let text = r#"{"cidr":"1.10.16.0/20","sblid":"SBL256894","rir":"apnic"}
{"cidr":"2001:db8::/32","rir":"ripencc"}
{"type":"metadata","timestamp":1700000000,"size":1234,"records":2,"copyright":"x","terms":"y"}
{"sblid":"SBL1"}
{"cidr":"1.2.3.4/8","sblid":"SBL2"}
{not json
"#;
        let (entries, errors) = parse_list(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].comment.as_deref(), Some("SBL256894"));
        assert_eq!(entries[1].net.to_string(), "2001:db8::/32");
        assert_eq!(entries[1].comment, None);
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [4, 5, 6]);
        assert!(errors[0].message.contains("no \"cidr\""));
        assert!(errors[1].message.contains("did you mean 1.0.0.0/8"));
        assert!(errors[2].message.starts_with("invalid JSON at column 2:"), "{}", errors[2].message);
        assert!(!errors[2].message.contains("line"), "{}", errors[2].message);
    }

    #[test]
    fn bad_and_duplicate_lines_are_reported_with_line_numbers() {
        let text = "192.0.2.0/24\nnot-an-ip\n10.0.0.0/8 extra\n192.0.2.0/24 ; again\n192.0.2.1/24\n";
        let (entries, errors) = parse_list(text);
        assert_eq!(entries.len(), 1);
        assert_eq!(errors.len(), 4);
        assert_eq!(errors[0].line, 2);
        assert!(errors[0].message.contains("not-an-ip"));
        assert_eq!(errors[1].line, 3);
        assert_eq!(errors[2], LineError { line: 4, message: "192.0.2.0/24 is a duplicate of line 1".into() });
        assert_eq!(errors[3].line, 5);
        assert!(errors[3].message.contains("host bits set"));
    }
}
