//! Judging what sources do: the log sources (`[[logs]]`), the abuse score
//! (`[abuse]`), the Postfix policy service (`[mail_policy]`), the
//! smarthost's sending limits (`[smarthost]`) and suspensions
//! (`[suspend]`).
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

#[allow(unused_imports)]
use super::*;
use crate::domain::{LogKind, LogSourceKind};

/// One log the agent follows.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Whose lines: postfix, dovecot, exim or sshd.
    pub kind: LogKind,
    /// `file` or `journal`.
    pub source: LogSourceKind,
    /// The file (`source = "file"`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Journal units whose entries are read (`source = "journal"`); the
    /// unit is a field journald sets itself, so a local user cannot forge
    /// lines for it. Empty: the kind's Debian unit.
    #[serde(default)]
    pub unit: Vec<String>,
    /// A journal directory instead of the system journal
    /// (`journalctl --directory`).
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// The journalctl binary (default: from PATH).
    #[serde(default)]
    pub journalctl: Option<PathBuf>,
    /// Where a first start (nothing stored) begins: `end` (default) or
    /// `beginning`.
    #[serde(default)]
    pub start: LogStart,
    /// sshd: the port its clients connect to; with it, the port joins the
    /// limited ports (class `ssh`) and bans cover it.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Where a first start begins (the log followers' own type).
pub use crate::logs::file::Start as LogStart;

impl LogConfig {
    /// The key its position is stored under: stable across restarts and
    /// distinct per source.
    pub fn id(&self) -> String {
        match self.source {
            LogSourceKind::File => {
                format!("{}:file:{}", self.kind, self.file.as_deref().unwrap_or(Path::new("")).display())
            }
            LogSourceKind::Journal => format!(
                "{}:journal:{}:{}",
                self.kind,
                self.directory.as_deref().map(|d| d.display().to_string()).unwrap_or_default(),
                self.units().join(",")
            ),
        }
    }

    /// The journal units to match.
    pub fn units(&self) -> Vec<String> {
        if !self.unit.is_empty() {
            return self.unit.clone();
        }
        let default = match self.kind {
            LogKind::Postfix => "postfix@-.service",
            LogKind::Dovecot => "dovecot.service",
            LogKind::Exim => "exim4.service",
            LogKind::Sshd => "ssh.service",
        };
        vec![default.to_string()]
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match self.source {
            LogSourceKind::File => match &self.file {
                None => return Err("`file` is needed with source = \"file\"".into()),
                Some(f) if !f.is_absolute() => return Err(format!("file {f:?} must be an absolute path")),
                Some(_) if self.directory.is_some() || !self.unit.is_empty() => {
                    return Err("`unit` and `directory` are for source = \"journal\"".into())
                }
                Some(_) => {}
            },
            LogSourceKind::Journal => {
                if self.file.is_some() {
                    return Err("`file` is for source = \"file\"".into());
                }
                if let Some(d) = self.directory.as_ref().filter(|d| !d.is_absolute()) {
                    return Err(format!("directory {d:?} must be an absolute path"));
                }
            }
        }
        if self.port.is_some() && self.kind != LogKind::Sshd {
            return Err("`port` is for kind = \"sshd\"".into());
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        Ok(())
    }
}

/// The per-source abuse score: a leaky bucket that connections and failed
/// logins fill; over the threshold the source is banned on the limited
/// ports for an escalating time.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbuseConfig {
    /// What one failed login adds (a connection adds `connection_weight`).
    #[serde(deserialize_with = "de_weight")]
    pub auth_failure_weight: u32,
    #[serde(deserialize_with = "de_conn_weight")]
    pub connection_weight: u32,
    /// A score above this bans.
    #[serde(deserialize_with = "de_threshold")]
    pub threshold: u32,
    /// How fast the score drains: `N/s`, `N/min` or `N/h` points.
    pub leak: Rate,
    /// Ban lengths for the first, second, ... offence (the last repeats).
    #[serde(deserialize_with = "de_bans")]
    pub ban: Vec<Duration>,
    /// Offences are forgotten after this long without one.
    #[serde(deserialize_with = "de_duration")]
    pub forget_after: Duration,
    /// Sources never scored (the host itself always is exempt): e.g. a
    /// webmail host or a content filter that reinjects mail.
    pub exempt: Vec<IpNet>,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            auth_failure_weight: 15,
            connection_weight: 1,
            threshold: 100,
            leak: Rate { per: 30, unit_secs: 60 },
            ban: [15 * 60, 3600, 6 * 3600, 86_400].map(Duration::from_secs).to_vec(),
            forget_after: Duration::from_secs(7 * 86_400),
            exempt: Vec::new(),
        }
    }
}

/// The Postfix policy service (SMTPD_POLICY_README): suspensions and
/// sending limits, answered live.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailPolicyConfig {
    /// The Unix socket; unset: no policy service. Debian's smtpd runs
    /// chrooted, so the socket belongs under Postfix's queue directory:
    /// `/var/spool/postfix/private/gatekeeper-policy`, named in main.cf as
    /// `unix:private/gatekeeper-policy`.
    pub socket: Option<PathBuf>,
    /// The socket's owner (smtpd runs as this user).
    pub owner: Option<String>,
    /// The socket's mode, octal text ("0660").
    #[serde(deserialize_with = "de_mode")]
    pub mode: u32,
    /// Who a suspended or limited customer should contact; in every reply.
    pub contact: String,
    /// The ISP's customer ranges: mail without an account from these is
    /// counted (limits, suspensions) per client address. Elsewhere (peer
    /// MTAs delivering to an MX) an address is never limited or suspended.
    pub customer_ranges: Vec<IpNet>,
}

impl Default for MailPolicyConfig {
    fn default() -> Self {
        MailPolicyConfig {
            socket: None,
            owner: Some("postfix".into()),
            mode: 0o660,
            contact: "your provider's support".into(),
            customer_ranges: Vec::new(),
        }
    }
}

/// Sending limits, as the policy service applies them.
pub use crate::policy::limits::Limits;

/// `messages = "none"`, `"100/hour, 500/day"` or `["100/hour", "500/day"]`.
fn de_limits<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Limits, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        List(Vec<String>),
    }
    let text = match Raw::deserialize(d)? {
        Raw::One(s) => s,
        Raw::List(l) => l.join(", "),
    };
    Limits::parse(&text).map_err(serde::de::Error::custom)
}

/// The smarthost's transmission limits per authenticated account (and per
/// client address for unauthenticated relaying).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmarthostConfig {
    /// Per account: e.g. `["100/hour", "500/day"]` (messages; recipients as
    /// `"1000 rcpt/day"`), or `"none"`.
    #[serde(deserialize_with = "de_limits")]
    pub messages: Limits,
    /// Accounts and addresses never limited (mailing-list servers).
    pub exempt_accounts: Vec<String>,
    pub exempt_addresses: Vec<IpNet>,
    /// Groups of accounts with their own limits.
    pub group: Vec<LimitGroup>,
}

impl Default for SmarthostConfig {
    fn default() -> Self {
        SmarthostConfig {
            messages: Limits { messages_hour: Some(100), messages_day: Some(500), ..Limits::NONE },
            exempt_accounts: Vec::new(),
            exempt_addresses: Vec::new(),
            group: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitGroup {
    pub name: String,
    pub accounts: Vec<String>,
    #[serde(deserialize_with = "de_limits")]
    pub messages: Limits,
}

/// Suspending senders to undeliverable recipients.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuspendConfig {
    pub enabled: bool,
    /// Distinct undeliverable recipients within an hour that suspend.
    #[serde(deserialize_with = "de_suspend_threshold")]
    pub threshold: u32,
    /// How long a suspended sender's client address stays blocked on the
    /// limited ports: a duration, or "never" (the address may be a
    /// dynamic one that the next customer gets). Account suspensions never
    /// expire by themselves.
    #[serde(deserialize_with = "de_opt_duration")]
    pub address_block: Option<Duration>,
    /// Recipients in logs and `suspend list`: `domain` (default: only
    /// their domains) or `none` (whole addresses).
    pub redact: Redact,
    pub exempt_accounts: Vec<String>,
    pub exempt_addresses: Vec<IpNet>,
}

pub use crate::pipeline::abuse::Redact;

impl Default for SuspendConfig {
    fn default() -> Self {
        SuspendConfig {
            enabled: true,
            threshold: 10,
            address_block: Some(Duration::from_secs(86_400)),
            redact: Redact::Domain,
            exempt_accounts: Vec::new(),
            exempt_addresses: Vec::new(),
        }
    }
}

impl AbuseConfig {
    /// One mistyped password must never ban: the threshold is above one
    /// failure's weight.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.threshold <= self.auth_failure_weight {
            return Err(format!(
                "threshold {} is not above auth_failure_weight {}: one failed login would ban",
                self.threshold, self.auth_failure_weight
            ));
        }
        Ok(())
    }
}

/// Checks across entries; `(table, key, message)` on error.
pub fn validate_logs(logs: &[LogConfig]) -> std::result::Result<(), (String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut via = std::collections::HashSet::new();
    for (i, l) in logs.iter().enumerate() {
        l.validate().map_err(|m| (format!("logs[{i}]"), m))?;
        if !seen.insert(l.id()) {
            return Err((format!("logs[{i}]"), "the same source twice (its lines would count twice)".into()));
        }
        // One service read through the journal and a file counts twice.
        via.insert((l.kind, l.source));
        if via.contains(&(l.kind, LogSourceKind::Journal)) && via.contains(&(l.kind, LogSourceKind::File)) {
            return Err((
                format!("logs[{i}]"),
                format!("{} is read from both the journal and a file: its lines would count twice", l.kind),
            ));
        }
    }
    Ok(())
}

fn de_weight<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "auth_failure_weight", 1..=1000)
}

fn de_conn_weight<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "connection_weight", 0..=1000)
}

fn de_threshold<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "threshold", 1..=1_000_000)
}

fn de_suspend_threshold<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "threshold", 1..=100_000)
}

fn de_bans<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Duration>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    if raw.is_empty() || raw.len() > 16 {
        return Err(serde::de::Error::custom("ban: 1 to 16 durations, e.g. [\"15m\", \"1h\", \"6h\", \"1d\"]"));
    }
    raw.iter().map(|s| parse_duration(s).map_err(|e| serde::de::Error::custom(e.to_string()))).collect()
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    parse_duration(&s).map(Some).map_err(|e| serde::de::Error::custom(e.to_string()))
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    match u32::from_str_radix(s.trim().trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 && m & 0o600 == 0o600 && m & 0o007 == 0 => Ok(m),
        _ => Err(serde::de::Error::custom(format!(
            "mode {s:?}: octal text such as \"0660\": owner read and write, nothing for others (anyone who can write to the socket can use up an account's limits)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_validate() {
        let file = |k: LogKind| LogConfig {
            kind: k,
            source: LogSourceKind::File,
            file: Some("/var/log/mail.log".into()),
            unit: vec![],
            directory: None,
            journalctl: None,
            start: LogStart::End,
            port: None,
        };
        assert!(validate_logs(&[file(LogKind::Postfix)]).is_ok());
        let e = validate_logs(&[file(LogKind::Postfix), file(LogKind::Postfix)]).unwrap_err();
        assert!(e.1.contains("twice"), "{e:?}");
        let mut j = file(LogKind::Postfix);
        j.source = LogSourceKind::Journal;
        j.file = None;
        let e = validate_logs(&[file(LogKind::Postfix), j.clone()]).unwrap_err();
        assert!(e.1.contains("both the journal and a file"), "{e:?}");
        assert_eq!(j.units(), vec!["postfix@-.service".to_string()]);
        let mut p = file(LogKind::Postfix);
        p.port = Some(22);
        assert!(validate_logs(&[p]).unwrap_err().1.contains("sshd"));
        let mut rel = file(LogKind::Dovecot);
        rel.file = Some("dovecot.log".into());
        assert!(validate_logs(&[rel]).unwrap_err().1.contains("absolute"));
    }
}
