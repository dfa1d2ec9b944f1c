//! The `[egress.explain]` section: what a subscriber of an explain pool is
//! told, and the policy routing the agent installs to answer locally.
use serde::Deserialize;

use gatekeeper_common::explain::{DEFAULT_MARK, DEFAULT_MASK};

/// The default reply: `{port}` is the port the subscriber tried,
/// `{smarthost}` the configured name.
pub const DEFAULT_TEXT: &str =
    "554 5.7.1 port {port} is blocked for dynamic addresses; send through {smarthost} on port 587 with authentication";
/// Named in the default reply when no `smarthost` is set.
pub const DEFAULT_SMARTHOST: &str = "your provider's mail server";
/// Default routing table and rule priority of the agent's policy route.
pub const DEFAULT_TABLE: u32 = 4747;
pub const DEFAULT_PRIORITY: u32 = 4747;
/// Concurrent explain sessions; beyond that, new ones wait in the listen
/// queue (and the kernel drops SYNs once that is full).
pub const DEFAULT_MAX_SESSIONS: u32 = 256;
/// A reply line's limit with its CRLF (RFC 5321 4.5.3.1.5).
pub const MAX_REPLY_OCTETS: usize = 512;

/// How blocked subscribers of explain pools are answered.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Raw")]
pub struct ExplainConfig {
    /// Off: no explain stage, listener or route; explain pools are
    /// answered with a RST (as `reject`).
    pub enabled: bool,
    /// The mail server subscribers should use instead (`{smarthost}`).
    pub smarthost: String,
    /// The reply line, without CRLF, placeholders unexpanded.
    pub text: String,
    /// The fwmark the stage sets in `mask`'s bits and the rule matches.
    pub mark: u32,
    pub mask: u32,
    /// The routing table of the agent's `local default dev lo` routes.
    pub table: u32,
    /// The priority of the agent's `fwmark` rules.
    pub priority: u32,
    pub max_sessions: u32,
}

impl Default for ExplainConfig {
    fn default() -> Self {
        Raw::default().try_into().expect("the defaults are valid")
    }
}

impl ExplainConfig {
    /// The reply line for a connection to `port` (without CRLF).
    pub fn reply(&self, port: u16) -> String {
        self.text.replace("{smarthost}", &self.smarthost).replace("{port}", &port.to_string())
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Raw {
    enabled: bool,
    smarthost: Option<String>,
    text: String,
    mark: u32,
    mask: u32,
    table: u32,
    priority: u32,
    max_sessions: u32,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            enabled: true,
            smarthost: None,
            text: DEFAULT_TEXT.into(),
            mark: DEFAULT_MARK,
            mask: DEFAULT_MASK,
            table: DEFAULT_TABLE,
            priority: DEFAULT_PRIORITY,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

impl TryFrom<Raw> for ExplainConfig {
    type Error = String;
    fn try_from(r: Raw) -> Result<Self, String> {
        let smarthost = match r.smarthost {
            Some(s) => {
                let s = s.trim().to_string();
                if s.is_empty() || s.len() > 255 || s.chars().any(|c| c.is_control()) {
                    return Err(format!(
                        "[egress.explain] smarthost {s:?}: expected a host name (1-255 characters, no control characters)"
                    ));
                }
                s
            }
            None => DEFAULT_SMARTHOST.into(),
        };
        let text = r.text.trim_end().to_string();
        check_text(&text, &smarthost)?;
        if r.mark == 0 || r.mask == 0 || r.mark & !r.mask != 0 {
            return Err(format!(
                "[egress.explain] mark {:#x} / mask {:#x}: both must be non-zero and the mark must lie within the mask",
                r.mark, r.mask
            ));
        }
        // 0 is unspec; 253..=255 are the kernel's default, main and local.
        if r.table == 0 || (253..=255).contains(&r.table) {
            return Err(format!(
                "[egress.explain] table {}: pick a table of its own (not 0, 253 default, 254 main or 255 local)",
                r.table
            ));
        }
        // The rule must come before the main table's (32766).
        if r.priority == 0 || r.priority >= 32766 {
            return Err(format!(
                "[egress.explain] priority {}: expected 1-32765 (before the main table's rule at 32766)",
                r.priority
            ));
        }
        if r.max_sessions == 0 || r.max_sessions > 65_536 {
            return Err(format!("[egress.explain] max_sessions {}: expected 1-65536", r.max_sessions));
        }
        Ok(ExplainConfig {
            enabled: r.enabled,
            smarthost,
            text,
            mark: r.mark,
            mask: r.mask,
            table: r.table,
            priority: r.priority,
            max_sessions: r.max_sessions,
        })
    }
}

/// A reply line: one line, a 4xx or 5xx code and a space, only the known
/// placeholders, at most [`MAX_REPLY_OCTETS`] with CRLF once expanded.
fn check_text(text: &str, smarthost: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("[egress.explain] text {text:?}: {why}"));
    if text.chars().any(|c| c.is_control()) {
        return bad("must be one line without control characters");
    }
    let b = text.as_bytes();
    if b.len() < 5 || !matches!(b[0], b'4' | b'5') || !b[1..3].iter().all(u8::is_ascii_digit) || b[3] != b' ' {
        return bad("must start with a 4xx or 5xx reply code and a space, e.g. \"554 5.7.1 ...\"");
    }
    let mut rest = text;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        match ["{port}", "{smarthost}"].iter().find(|p| tail.starts_with(**p)) {
            Some(p) => rest = &tail[p.len()..],
            None => return bad("unknown placeholder (expected {port} or {smarthost})"),
        }
    }
    let longest = text.replace("{smarthost}", smarthost).replace("{port}", "65535");
    if longest.len() + 2 > MAX_REPLY_OCTETS {
        return bad(&format!(
            "is {} octets with the smarthost's name and CRLF; a reply line may have at most {MAX_REPLY_OCTETS}",
            longest.len() + 2
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ExplainConfig, String> {
        #[derive(Deserialize)]
        struct W {
            explain: ExplainConfig,
        }
        toml::from_str::<W>(text).map(|w| w.explain).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_read_well() {
        let c = ExplainConfig::default();
        assert!(c.enabled);
        assert_eq!(
            c.reply(25),
            "554 5.7.1 port 25 is blocked for dynamic addresses; send through your provider's mail server on port 587 with authentication"
        );
        assert_eq!((c.mark, c.mask, c.table, c.priority), (0x4b47_0000, 0xffff_0000, 4747, 4747));
    }

    #[test]
    fn settings_and_errors() {
        let c =
            parse("[explain]\nsmarthost = \"smtp.example.net\"\nmark = 0x100\nmask = 0x100\ntable = 100\n").unwrap();
        assert_eq!(
            c.reply(25),
            "554 5.7.1 port 25 is blocked for dynamic addresses; send through smtp.example.net on port 587 with authentication"
        );
        assert_eq!((c.mark, c.mask, c.table), (0x100, 0x100, 100));
        let c = parse("[explain]\ntext = \"550 5.7.1 use {smarthost}:587\"\nsmarthost = \"relay.example\"\n").unwrap();
        assert_eq!(c.reply(25), "550 5.7.1 use relay.example:587");
        for (bad, needle) in [
            ("text = \"554 a\\r\\n250 b\"", "one line"),
            ("text = \"250 ok\"", "4xx or 5xx"),
            ("text = \"554 {ip}\"", "unknown placeholder"),
            (&format!("text = \"554 {}\"", "x".repeat(510)), "at most 512"),
            ("mark = 0x1ff\nmask = 0xff", "within the mask"),
            ("mark = 0", "non-zero"),
            ("table = 254", "own"),
            ("priority = 32766", "1-32765"),
            ("smarthost = \"\"", "host name"),
            ("max_sessions = 0", "1-65536"),
            ("port = 25", "unknown field"),
        ] {
            let e = parse(&format!("[explain]\n{bad}\n")).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
