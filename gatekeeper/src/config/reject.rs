//! The `[reject]` section: per refusal, drop silently or answer with the
//! reason; how and on which ports the rejector answers, within which
//! bounds, and the reply texts (`[reject.templates]`).
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

#[allow(unused_imports)]
use super::*;
use crate::domain::{Protocol, ReasonAction, Refusal, RejectMode};

/// Bounds of `max_sessions`.
pub const MAX_SESSIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=65_536;
/// Bounds of `idle_timeout`, in seconds.
pub const IDLE_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=300;
/// Bounds of `session_timeout`, in seconds.
pub const SESSION_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=3600;
/// Longest `url`: it shares a 512-octet reply line with the reason.
pub const MAX_URL_LEN: usize = 200;
/// Longest template source.
pub const MAX_TEMPLATE_LEN: usize = 400;

/// How refused sources are answered.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RejectSettings {
    /// What each refusal does; complete (the file's entries over the
    /// defaults, see [`default_action`]).
    #[serde(deserialize_with = "de_actions")]
    pub actions: BTreeMap<Refusal, ReasonAction>,
    /// SMTP: refuse at RCPT TO (default) or in the greeting.
    pub mode: RejectMode,
    /// A page or contact appended to every reply ("- see {url}").
    #[serde(deserialize_with = "de_url")]
    pub url: Option<String>,
    /// The name in the SMTP greeting and replies; default: this machine's.
    #[serde(deserialize_with = "de_hostname")]
    pub hostname: String,
    #[serde(deserialize_with = "de_reject_ports")]
    pub smtp_ports: Vec<u16>,
    #[serde(deserialize_with = "de_reject_ports")]
    pub pop3_ports: Vec<u16>,
    #[serde(deserialize_with = "de_reject_ports")]
    pub imap_ports: Vec<u16>,
    /// Concurrent sessions at most; beyond, the gate drops again.
    #[serde(deserialize_with = "de_max_sessions")]
    pub max_sessions: u32,
    /// Connections one source gets answered (a bucket of N that refills
    /// at the rate); beyond, it is silenced in the kernel (dropped).
    pub per_source_rate: Rate,
    /// SYNs of refused sources the gate passes to the rejector, for the
    /// whole host (a burst of N, then N per unit); beyond, it drops them.
    /// Each passed SYN is answered with a SYN-ACK, also when its source
    /// is spoofed: this bounds what a flood can make the host send.
    pub syn_rate: Rate,
    /// A session that sends nothing for this long is closed.
    #[serde(deserialize_with = "de_idle_timeout")]
    pub idle_timeout: Duration,
    /// No session lasts longer than this.
    #[serde(deserialize_with = "de_session_timeout")]
    pub session_timeout: Duration,
    /// The reason text per refusal; complete, like `actions`.
    #[serde(deserialize_with = "de_templates")]
    pub templates: BTreeMap<Refusal, Template>,
}

/// The default action of a refusal. A DNS outcome is answered with its
/// reason: the sender may be a legitimate mail server with broken DNS, and
/// the reply tells its admin what to fix. Bans and deny ranges (floods,
/// known spammers, whole networks) are dropped: answering them costs
/// sessions and tells a spammer which addresses are burnt. Learned ranges
/// too: a range is learned from many dynamic hosts, which are bots far
/// more often than mail servers.
pub fn default_action(r: Refusal) -> ReasonAction {
    match r {
        Refusal::NoPtr | Refusal::FcrdnsFail | Refusal::Dynamic | Refusal::Generic => ReasonAction::Reject,
        Refusal::ManualBan | Refusal::DenyRange | Refusal::LearnedRange => ReasonAction::Drop,
    }
}

/// The default reason text of a refusal: what was found and what fixes it.
pub fn default_template(r: Refusal) -> &'static str {
    match r {
        Refusal::NoPtr => "no reverse DNS (PTR) for {ip}; give the sending host a PTR record that resolves back to it",
        Refusal::FcrdnsFail => "reverse DNS of {ip} ({ptr}) does not resolve back to {ip}",
        Refusal::Dynamic => {
            "{ip} ({ptr}) looks like a dynamic/end-user address; send through your provider's mail relay"
        }
        Refusal::Generic => "{ip} has a generic reverse DNS name ({ptr}); give the mail server a name of its own",
        Refusal::ManualBan | Refusal::DenyRange | Refusal::LearnedRange => "mail from {ip} is refused by local policy",
    }
}

fn builtin_template(r: Refusal) -> Template {
    default_template(r).parse().expect("the default templates parse")
}

impl Default for RejectSettings {
    fn default() -> Self {
        RejectSettings {
            actions: Refusal::ALL.into_iter().map(|r| (r, default_action(r))).collect(),
            mode: RejectMode::Rcpt,
            url: None,
            hostname: system_hostname(),
            smtp_ports: vec![25, 587],
            pop3_ports: vec![110],
            imap_ports: vec![143],
            max_sessions: 256,
            per_source_rate: Rate { per: 10, unit_secs: 60 },
            syn_rate: Rate { per: 200, unit_secs: 1 },
            idle_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(120),
            templates: Refusal::ALL.into_iter().map(|r| (r, builtin_template(r))).collect(),
        }
    }
}

impl RejectSettings {
    pub fn action(&self, r: Refusal) -> ReasonAction {
        self.actions.get(&r).copied().unwrap_or_else(|| default_action(r))
    }

    /// The kernel's [`RejectConfig::actions`](gatekeeper_common::reject::RejectConfig::actions):
    /// bit `1 << code` per refusal answered with its reason.
    pub fn action_bits(&self) -> u32 {
        Refusal::ALL.into_iter().filter(|&r| self.action(r) == ReasonAction::Reject).fold(0, |b, r| b | 1 << r.code())
    }

    /// Every answered port with its protocol: SMTP's, then POP3's, then IMAP's.
    pub fn ports(&self) -> Vec<(u16, Protocol)> {
        let lists = [
            (&self.smtp_ports, Protocol::Smtp),
            (&self.pop3_ports, Protocol::Pop3),
            (&self.imap_ports, Protocol::Imap),
        ];
        lists.into_iter().flat_map(|(ports, p)| ports.iter().map(move |&port| (port, p))).collect()
    }

    /// The protocol spoken on `port`, if any.
    pub fn protocol_on(&self, port: u16) -> Option<Protocol> {
        self.ports().into_iter().find(|&(p, _)| p == port).map(|(_, proto)| proto)
    }

    pub fn template(&self, r: Refusal) -> Template {
        self.templates.get(&r).cloned().unwrap_or_else(|| builtin_template(r))
    }

    /// Checks across keys: the `(table, key)` to name and the message.
    pub(super) fn validate(&self) -> std::result::Result<(), (&'static str, String, String)> {
        let ports = self.ports();
        for (i, (port, proto)) in ports.iter().enumerate() {
            if let Some((_, other)) = ports[..i].iter().find(|(p, _)| p == port) {
                return Err((
                    "reject",
                    format!("{proto}_ports"),
                    format!("port {port} is in {other}_ports too; a port speaks one protocol"),
                ));
            }
        }
        let max = gatekeeper_common::reject::MAX_REJECT_PORTS;
        if ports.len() > max {
            return Err((
                "reject",
                "smtp_ports".into(),
                format!("{} ports in smtp_ports, pop3_ports and imap_ports, at most {max}", ports.len()),
            ));
        }
        if self.session_timeout < self.idle_timeout {
            return Err((
                "reject",
                "session_timeout".into(),
                format!("{}s is below idle_timeout ({}s)", self.session_timeout.as_secs(), self.idle_timeout.as_secs()),
            ));
        }
        if self.url.is_none() {
            if let Some((r, _)) = self.templates.iter().find(|(_, t)| t.uses_url()) {
                return Err((
                    "reject.templates",
                    r.as_str().into(),
                    "the template uses {url} but `reject.url` is not set".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A reply text with `{ip}`, `{reason}`, `{ptr}` and `{url}` placeholders,
/// checked when the config is read: one line of printable ASCII (a reply
/// line may hold nothing else, RFC 5321 §4.5.3.1.5), known placeholders
/// only, `{{` and `}}` for literal braces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// A piece of a [`Template`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// The source address.
    Ip,
    /// The refusal's name.
    Reason,
    /// The source's reverse DNS name, as DNS gave it (hostile input).
    Ptr,
    /// `reject.url`.
    Url,
}

impl Template {
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }
    pub fn as_str(&self) -> &str {
        &self.source
    }
    pub fn uses_url(&self) -> bool {
        self.parts.contains(&Part::Url)
    }
}

impl FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.trim().is_empty() {
            return Err("a template must not be empty".into());
        }
        if s.len() > MAX_TEMPLATE_LEN {
            return Err(format!("a template is at most {MAX_TEMPLATE_LEN} characters ({} given)", s.len()));
        }
        if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(format!("{c:?} is not allowed in a template: one line of printable ASCII"));
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".into()),
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    let part = match name.as_str() {
                        _ if !closed => return Err(format!("unclosed `{{{name}` (write `{{{{` for a brace)")),
                        "ip" => Part::Ip,
                        "reason" => Part::Reason,
                        "ptr" => Part::Ptr,
                        "url" => Part::Url,
                        _ => {
                            return Err(format!(
                                "unknown placeholder `{{{name}}}` (expected {{ip}}, {{reason}}, {{ptr}} or {{url}}; `{{{{` for a brace)"
                            ))
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { source: s.to_string(), parts })
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// This machine's hostname (its UTS namespace's), cut down to what a
/// greeting may hold; "localhost" when there is none.
pub fn system_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String =
        raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').take(253).collect();
    let clean = clean.trim_matches(|c| c == '.' || c == '-');
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean.to_string()
    }
}

/// A refusal as a key of `[reject.actions]` and `[reject.templates]`: its
/// name, with `_` for `-` as `[policy]` spells them, or `ban` (the CLI's
/// word) for manual-ban.
fn refusal_key(key: &str) -> std::result::Result<Refusal, String> {
    let k = key.trim().replace('_', "-");
    if k.eq_ignore_ascii_case("ban") {
        return Ok(Refusal::ManualBan);
    }
    k.parse::<Refusal>()
        .map_err(|_| format!("unknown refusal `{key}` (expected {}; `ban` means manual-ban)", Refusal::expected()))
}

/// A table keyed by refusal, over the defaults; a refusal given twice
/// (`ban` and `manual-ban`) is an error. Keys are read through a seed, so
/// a bad one is reported at its own line.
fn de_refusal_table<'de, D, V>(
    d: D,
    defaults: impl Fn(Refusal) -> V,
) -> std::result::Result<BTreeMap<Refusal, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Key<'a>(&'a [(Refusal, String)]);
    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = (Refusal, String);
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
            let key = String::deserialize(d)?;
            let r = refusal_key(&key).map_err(serde::de::Error::custom)?;
            if let Some((_, first)) = self.0.iter().find(|(o, _)| *o == r) {
                return Err(serde::de::Error::custom(format!("`{key}` and `{first}` are both {r}")));
            }
            Ok((r, key))
        }
    }
    struct Table<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Table<V> {
        type Value = Vec<(Refusal, V)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a table keyed by refusal ({})", Refusal::expected())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = Vec::new();
            let mut out = Vec::new();
            while let Some((r, key)) = map.next_key_seed(Key(&seen))? {
                out.push((r, map.next_value()?));
                seen.push((r, key));
            }
            Ok(out)
        }
    }
    let mut table: BTreeMap<Refusal, V> = Refusal::ALL.into_iter().map(|r| (r, defaults(r))).collect();
    table.extend(d.deserialize_map(Table(PhantomData))?);
    Ok(table)
}

fn de_actions<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<BTreeMap<Refusal, ReasonAction>, D::Error> {
    de_refusal_table(d, default_action)
}

fn de_templates<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<BTreeMap<Refusal, Template>, D::Error> {
    de_refusal_table(d, builtin_template)
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    let url = String::deserialize(d)?;
    let u = url.trim();
    if u.is_empty() || u.len() > MAX_URL_LEN || !u.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(serde::de::Error::custom(format!(
            "url must be 1 to {MAX_URL_LEN} characters of printable ASCII on one line, e.g. \"https://example.net/mail-policy\""
        )));
    }
    Ok(Some(u.to_string()))
}

fn de_hostname<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(serde::de::Error::custom(format!("{name:?} is not a hostname (e.g. \"mx1.example.net\")")));
    }
    Ok(name)
}

/// A port list: no port 0; duplicates collapse; may be empty (the
/// protocol is not answered).
fn de_reject_ports<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u16>, D::Error> {
    let mut ports = Vec::<u16>::deserialize(d)?;
    if ports.contains(&0) {
        return Err(serde::de::Error::custom("port 0 is not a valid port (1-65535)"));
    }
    let mut seen = Vec::with_capacity(ports.len());
    ports.retain(|p| {
        !seen.contains(p) && {
            seen.push(*p);
            true
        }
    });
    Ok(ports)
}

fn de_max_sessions<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "max_sessions", MAX_SESSIONS_RANGE)
}

fn de_secs_within<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> std::result::Result<Duration, D::Error> {
    let t = de_duration(d)?;
    if !range.contains(&t.as_secs()) {
        return Err(serde::de::Error::custom(format!("{key} must be {}s to {}s", range.start(), range.end())));
    }
    Ok(t)
}

fn de_idle_timeout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    de_secs_within(d, "idle_timeout", IDLE_TIMEOUT_SECS)
}

fn de_session_timeout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    de_secs_within(d, "session_timeout", SESSION_TIMEOUT_SECS)
}
