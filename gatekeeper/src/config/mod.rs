//! The agent's config file (TOML). Every key is optional; unknown keys and
//! bad values are errors naming the line, column and key.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::domain::Action;
use crate::domain::{Role, TcModeSetting, XdpModeSetting};
use crate::error::{Error, Result};
use crate::lists::parse_duration;

mod egress;
mod explain;
mod inbound;
mod mailstream;
mod reject;
#[cfg(test)]
mod tests;

pub use egress::{EgressConfig, LimitClass, Rate};
pub use explain::ExplainConfig;
pub use inbound::InboundConfig;
pub use mailstream::{
    AbuseConfig, LimitGroup, Limits, LogConfig, LogStart, MailPolicyConfig, Redact, SmarthostConfig, SuspendConfig,
};
pub use reject::{default_action, default_template, system_hostname, Part, RejectSettings, Template};

/// Bounds of `max_verdicts`.
pub const MAX_VERDICTS_RANGE: std::ops::RangeInclusive<u32> = 1024..=16_777_216;
/// Bounds of `max_range_nodes` (1 KiB each).
pub const MAX_RANGE_NODES_RANGE: std::ops::RangeInclusive<u32> = 1024..=1_048_576;

/// An interface and what gatekeeper does on it. In the config file an
/// entry of `interfaces` is either a name (the ingress gate) or a table
/// `{ name = "eth2", role = "uplink" }`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InterfaceSpec {
    pub name: String,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    #[serde(deserialize_with = "de_interfaces")]
    pub interfaces: Vec<InterfaceSpec>,
    pub xdp_mode: XdpModeSetting,
    /// How uplink TC programs attach: auto (tcx, else clsact), tcx, clsact.
    pub tc_mode: TcModeSetting,
    /// `None` when the file does not set it.
    #[serde(deserialize_with = "de_ports")]
    pub ports: Option<Vec<u16>>,
    pub dry_run: bool,
    #[serde(deserialize_with = "de_abs_path")]
    pub state_dir: PathBuf,
    #[serde(deserialize_with = "de_abs_path")]
    pub socket: PathBuf,
    #[serde(deserialize_with = "de_abs_path")]
    pub pin_dir: PathBuf,
    #[serde(deserialize_with = "de_duration")]
    pub event_interval: Duration,
    #[serde(deserialize_with = "de_max_verdicts")]
    pub max_verdicts: u32,
    /// Trie nodes of the ingress range table.
    #[serde(deserialize_with = "de_max_range_nodes")]
    pub max_range_nodes: u32,
    #[serde(deserialize_with = "de_log_level")]
    pub log_level: String,
    /// What each reverse-DNS outcome does.
    pub policy: PolicyConfig,
    /// Learning whole dynamic ranges.
    pub learning: LearningConfig,
    /// Operator rules and trusted suffixes for the hostname classifier.
    pub classifier: ClassifierConfig,
    /// Bounds that hold under a flood of spoofed sources.
    pub limits: LimitsConfig,
    /// The resolver for reverse-DNS lookups.
    pub dns: crate::dns::DnsConfig,
    /// The egress gate: guarded ports and outbound connection limits.
    pub egress: EgressConfig,
    /// The ingress gate's inbound connection limits (`[[inbound.limit]]`).
    pub inbound: InboundConfig,
    /// Refused sources: drop, or answer with the reason.
    pub reject: RejectSettings,
    /// `[[logs]]`: the mail (and ssh) logs the agent follows.
    pub logs: Vec<LogConfig>,
    /// The abuse score from those logs.
    pub abuse: AbuseConfig,
    /// The Postfix policy service.
    pub mail_policy: MailPolicyConfig,
    /// The smarthost's sending limits.
    pub smarthost: SmarthostConfig,
    /// Suspending senders to undeliverable recipients.
    pub suspend: SuspendConfig,
}

/// What the datapath does with a SYN from a source it knows nothing about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstSyn {
    /// Pass it; the verdict applies from the next connection on.
    #[default]
    Pass,
    /// Drop SYNs until the verdict is in (for at most `hold_time`); real
    /// MTAs retransmit the SYN after about a second.
    Hold,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(deserialize_with = "de_policy_action")]
    pub no_ptr: Action,
    #[serde(deserialize_with = "de_policy_action")]
    pub fcrdns_fail: Action,
    #[serde(deserialize_with = "de_policy_action")]
    pub dynamic: Action,
    #[serde(deserialize_with = "de_policy_action")]
    pub generic: Action,
    #[serde(deserialize_with = "de_policy_action")]
    pub ok: Action,
    pub first_syn: FirstSyn,
    /// With `first_syn = "hold"`: after this long an unanswered source
    /// passes, so a dead resolver or agent never blocks anyone.
    #[serde(deserialize_with = "de_hold_time")]
    pub hold_time: Duration,
    /// Verdicts live as long as the DNS answers' TTL, within these bounds.
    #[serde(deserialize_with = "de_duration")]
    pub ttl_min: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub ttl_max: Duration,
    /// A temporary DNS failure passes (always) and is retried after this.
    #[serde(deserialize_with = "de_duration")]
    pub tempfail_ttl: Duration,
    /// A failed lookup drops the IPv6 address it was for, never its /64;
    /// the whole /64 is dropped once this many distinct addresses of it
    /// failed while none passed (0: never).
    #[serde(deserialize_with = "de_v6_prefix_drop_after")]
    pub v6_prefix_drop_after: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            no_ptr: Action::Drop,
            fcrdns_fail: Action::Drop,
            dynamic: Action::Drop,
            generic: Action::Pass,
            ok: Action::Pass,
            first_syn: FirstSyn::Pass,
            hold_time: Duration::from_secs(3),
            ttl_min: Duration::from_secs(300),
            ttl_max: Duration::from_secs(86_400),
            tempfail_ttl: Duration::from_secs(30),
            v6_prefix_drop_after: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearningConfig {
    pub enabled: bool,
    /// Dynamic sources with the same naming shape in one IPv4 /24 or IPv6
    /// /48 that promote it to a learned deny range.
    #[serde(deserialize_with = "de_min_sources")]
    pub min_sources: u32,
    /// Lifetime of a learned range.
    #[serde(deserialize_with = "de_duration")]
    pub expire: Duration,
    /// Prefixes tracked at once (memory bound): past it the prefix tracked
    /// longest is forgotten.
    #[serde(deserialize_with = "de_positive_usize")]
    pub max_prefixes: usize,
    /// Naming shapes tracked per prefix (memory bound: a hostile reverse
    /// zone can give every address a name of its own shape): past it the
    /// prefix's oldest shape is forgotten.
    #[serde(deserialize_with = "de_max_shapes")]
    pub max_shapes: usize,
}

/// Bounds of `learning.min_sources`: a /24 holds 256 addresses, so more
/// could never promote an IPv4 prefix.
pub const MIN_SOURCES_RANGE: std::ops::RangeInclusive<u32> = 2..=256;
/// Bounds of `learning.max_shapes`.
pub const MAX_SHAPES_RANGE: std::ops::RangeInclusive<usize> = 1..=256;

impl Default for LearningConfig {
    fn default() -> Self {
        LearningConfig {
            enabled: true,
            min_sources: 3,
            expire: Duration::from_secs(7 * 86_400),
            max_prefixes: 65_536,
            max_shapes: 4,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Operator rules: `class regex` lines or a Postfix pcre table.
    pub rules: Option<PathBuf>,
    /// Domain suffixes whose hosts always pass (e.g. "example.net").
    pub trusted: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// DNS queries per second at most.
    #[serde(deserialize_with = "de_positive_u32")]
    pub dns_rate: u32,
    /// Sources queued or being looked up at most; the rest stay unknown
    /// (pass) and are counted as overflow. The queue is fair per /24 and
    /// /48 (see `agent::fair`): when full, the longest prefix queue gives
    /// way to a source of a shorter one.
    #[serde(deserialize_with = "de_positive_usize")]
    pub max_pending: usize,
    /// Lookups in flight at most. Also the backlog beyond which lookups
    /// are hurried: a quarter of `[dns] timeout` (at least 300 ms) and one
    /// attempt, so lame reverse zones cannot hold every in-flight slot.
    #[serde(deserialize_with = "de_positive_usize")]
    pub max_inflight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { dns_rate: 500, max_pending: 10_000, max_inflight: 64 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interfaces: Vec::new(),
            xdp_mode: XdpModeSetting::Auto,
            tc_mode: TcModeSetting::Auto,
            ports: None,
            dry_run: false,
            state_dir: "/var/lib/gatekeeper".into(),
            socket: "/run/gatekeeper/gatekeeper.sock".into(),
            pin_dir: "/sys/fs/bpf/gatekeeper".into(),
            event_interval: Duration::from_secs(30),
            max_verdicts: 262_144,
            max_range_nodes: gatekeeper_common::RANGE_NODES,
            log_level: "info".into(),
            policy: PolicyConfig::default(),
            learning: LearningConfig::default(),
            classifier: ClassifierConfig::default(),
            limits: LimitsConfig::default(),
            dns: crate::dns::DnsConfig::default(),
            egress: EgressConfig::default(),
            inbound: InboundConfig::default(),
            reject: RejectSettings::default(),
            logs: Vec::new(),
            abuse: AbuseConfig::default(),
            mail_policy: MailPolicyConfig::default(),
            smarthost: SmarthostConfig::default(),
            suspend: SuspendConfig::default(),
        }
    }
}

impl Config {
    /// The interfaces with `role`, in config order.
    pub fn ifaces(&self, role: Role) -> Vec<String> {
        self.interfaces.iter().filter(|i| i.role == role).map(|i| i.name.clone()).collect()
    }

    /// Replaces the interfaces of `role` (command-line flags do this).
    pub fn set_ifaces(&mut self, role: Role, names: &[String]) -> Result<()> {
        self.interfaces.retain(|i| i.role != role);
        self.interfaces.extend(names.iter().map(|n| InterfaceSpec { name: n.clone(), role }));
        check_interfaces(&self.interfaces).map_err(|message| Error::Config { path: "<command line>".into(), message })
    }

    /// Reads `path`. A missing file gives the defaults unless `required`.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Config::default()),
            Err(e) => Err(Error::Config { path: path.to_path_buf(), message: format!("cannot read: {e}") }),
        }
    }

    /// Parses config text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| Error::Config { path: path.to_path_buf(), message: describe(text, &e) })?;
        let p = &cfg.policy;
        if p.ttl_min > p.ttl_max {
            let at = line_of(text, "policy", "ttl_min").map(|l| format!("line {l}, ")).unwrap_or_default();
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "{at}key `policy.ttl_min`: {}s is above ttl_max ({}s)",
                    p.ttl_min.as_secs(),
                    p.ttl_max.as_secs()
                ),
            });
        }
        if let Err((table, key, msg)) = cfg.reject.validate() {
            let at = line_of(text, table, &key).map(|l| format!("line {l}, ")).unwrap_or_default();
            return Err(Error::Config { path: path.to_path_buf(), message: format!("{at}key `{table}.{key}`: {msg}") });
        }
        if let Err((table, msg)) = mailstream::validate_logs(&cfg.logs) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("[[logs]] entry {}: {msg}", table.trim_start_matches("logs")),
            });
        }
        if let Err(msg) = cfg.abuse.validate() {
            let at = line_of(text, "abuse", "threshold").map(|l| format!("line {l}, ")).unwrap_or_default();
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("{at}key `abuse.threshold`: {msg}"),
            });
        }
        let mut cfg = cfg;
        cfg.inbound.add_ssh(&cfg.logs.iter().filter_map(|l| l.port).collect::<Vec<_>>());
        cfg.dns.validate().map_err(|e| Error::Config { path: path.to_path_buf(), message: format!("[dns] {e}") })?;
        Ok(cfg)
    }
}

/// A `[policy]` action: drop or pass. A ban is what the agent makes of
/// abuse, never a reverse-DNS outcome's action.
fn de_policy_action<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Action, D::Error> {
    match Action::deserialize(d)? {
        Action::Ban => Err(serde::de::Error::custom(
            "\"ban\" is not a policy action (expected drop or pass); bans come from `gatekeeper ban` and from log-driven abuse scores",
        )),
        a => Ok(a),
    }
}

/// `line L, column C: [key `k`: ]message` for a toml error.
fn describe(text: &str, e: &toml::de::Error) -> String {
    // Some toml messages span several lines ("invalid array\nexpected `]`").
    let msg = e.message().trim().replace('\n', "; ");
    let msg = msg.as_str();
    let Some(span) = e.span() else { return msg.to_string() };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    // Name the key whose value holds the error (`table.key` inside a
    // `[table]`), unless the message already does (as for unknown fields).
    let key = key_at(text, start).filter(|k| {
        let leaf = k.rsplit('.').next().unwrap_or(k);
        !msg.contains(&format!("`{leaf}`"))
    });
    match key {
        Some(k) => format!("line {line}, column {column}: key `{k}`: {msg}"),
        None => format!("line {line}, column {column}: {msg}"),
    }
}

/// The line (1-based) of `key = ..` inside `[table]`.
fn line_of(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') && l.ends_with(']') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == table && l.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            return Some(i + 1);
        }
    }
    None
}

fn de_hold_time<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let t = de_duration(d)?;
    if t > Duration::from_secs(30) {
        return Err(serde::de::Error::custom("hold_time must be at most 30s: a held source gets no mail at all"));
    }
    Ok(t)
}

fn de_v6_prefix_drop_after<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 1 {
        return Err(serde::de::Error::custom(
            "v6_prefix_drop_after must be 0 (never) or at least 2: with 1, one spoofed address would block its whole /64",
        ));
    }
    Ok(n)
}

fn de_min_sources<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "min_sources", MIN_SOURCES_RANGE)
}

fn de_max_shapes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if !MAX_SHAPES_RANGE.contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "max_shapes {n} out of range ({}..={})",
            MAX_SHAPES_RANGE.start(),
            MAX_SHAPES_RANGE.end()
        )));
    }
    Ok(n)
}

fn de_positive_u32<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

fn de_positive_usize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

/// The dotted key whose `key = value` line holds byte `pos`, with the
/// `[table]` it sits in (or the table whose header line holds it).
fn key_at(text: &str, pos: usize) -> Option<String> {
    let line_start = text[..pos.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    // An error spanning a table (`[[inbound.limit]]` whose entries clash)
    // names the table.
    let header = line.trim();
    if header.starts_with('[') && header.ends_with(']') {
        return Some(header.trim_matches(|c| c == '[' || c == ']').trim().to_string()).filter(|t| !t.is_empty());
    }
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string()).filter(|k| !k.is_empty())?;
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// Checks a guarded-port set: non-empty, no port 0, at most
/// [`gatekeeper_common::MAX_GUARDED_PORTS`]. Returns it sorted and deduplicated.
pub fn validate_ports(ports: &[u16]) -> Result<Vec<u16>> {
    if ports.is_empty() {
        return Err(Error::InvalidPorts("no ports given; at least one port must be guarded".into()));
    }
    if ports.contains(&0) {
        return Err(Error::InvalidPorts("port 0 is not a valid port (1-65535)".into()));
    }
    let mut out = ports.to_vec();
    out.sort_unstable();
    out.dedup();
    let max = gatekeeper_common::MAX_GUARDED_PORTS;
    if out.len() > max {
        return Err(Error::InvalidPorts(format!("{} ports given, at most {max} can be guarded", out.len())));
    }
    Ok(out)
}

/// Parses a port list such as `25,587` or `25 587` and validates it.
pub fn parse_ports(s: &str) -> Result<Vec<u16>> {
    let ports = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u16>().map_err(|_| Error::InvalidPorts(format!("{t:?} is not a port number (1-65535)"))))
        .collect::<Result<Vec<_>>>()?;
    validate_ports(&ports)
}

fn de_ports<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<u16>>, D::Error> {
    let ports = Vec::<u16>::deserialize(d)?;
    validate_ports(&ports).map(Some).map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn bounded<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    range: std::ops::RangeInclusive<u32>,
) -> std::result::Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !range.contains(&n) {
        return Err(serde::de::Error::custom(format!("{key} {n} out of range ({}..={})", range.start(), range.end())));
    }
    Ok(n)
}

fn de_max_verdicts<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "max_verdicts", MAX_VERDICTS_RANGE)
}

fn de_max_range_nodes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    bounded(d, "max_range_nodes", MAX_RANGE_NODES_RANGE)
}

fn de_abs_path<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<PathBuf, D::Error> {
    let p = PathBuf::deserialize(d)?;
    if !p.is_absolute() {
        return Err(serde::de::Error::custom(format!("path {p:?} must be absolute")));
    }
    Ok(p)
}

fn de_interfaces<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<InterfaceSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Table {
        name: String,
        role: Role,
    }
    let values = Vec::<toml::Value>::deserialize(d)?;
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        out.push(match v {
            toml::Value::String(name) => InterfaceSpec { name, role: Role::Ingress },
            toml::Value::Table(t) => {
                let t: Table = toml::Value::Table(t).try_into().map_err(|e: toml::de::Error| {
                    serde::de::Error::custom(format!(
                        "an interface entry is a name or {{ name = \"eth2\", role = \"ingress|uplink|subscriber\" }}: {}",
                        e.message().trim()
                    ))
                })?;
                InterfaceSpec { name: t.name, role: t.role }
            }
            other => {
                return Err(serde::de::Error::custom(format!(
                    "an interface entry is a name or {{ name = .., role = .. }}, not {}",
                    other.type_str()
                )))
            }
        });
    }
    check_interfaces(&out).map_err(serde::de::Error::custom)?;
    Ok(out)
}

/// Valid names; no interface twice in one role; the XDP roles (ingress and
/// subscriber) exclude each other on one interface.
fn check_interfaces(list: &[InterfaceSpec]) -> std::result::Result<(), String> {
    for (i, spec) in list.iter().enumerate() {
        let n = &spec.name;
        // The kernel's IFNAMSIZ is 16 including the NUL.
        let bad = n.is_empty()
            || n.len() > 15
            || n == "."
            || n == ".."
            || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(format!("{n:?} is not a valid interface name"));
        }
        for other in &list[..i] {
            if other.name != *n {
                continue;
            }
            if other.role == spec.role {
                return Err(format!("interface {n:?} is listed twice as {}", spec.role));
            }
            if other.role != Role::Uplink && spec.role != Role::Uplink {
                return Err(format!(
                    "interface {n:?} cannot be both {} and {}: both roles are XDP programs on its ingress",
                    other.role, spec.role
                ));
            }
        }
    }
    Ok(())
}

fn de_log_level<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let s = String::deserialize(d)?;
    // A level, or comma-separated `level` / `target=level` directives.
    let ok = !s.trim().is_empty()
        && s.split(',').all(|dir| {
            let level =
                dir.rsplit_once('=').map_or(dir, |(target, level)| if target.trim().is_empty() { "" } else { level });
            LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
        });
    if !ok {
        return Err(serde::de::Error::custom(format!(
            "invalid log level {s:?} (expected trace, debug, info, warn, error or off, or target=level directives)"
        )));
    }
    Ok(s)
}
