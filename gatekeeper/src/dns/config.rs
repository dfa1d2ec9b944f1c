//! The `[dns]` section of the config file: resolvers, timeouts, attempts,
//! how many PTR names are forward-checked; every value checked as it is
//! read.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::lists::parse_duration;

/// Bounds of [`DnsConfig::max_names`].
pub const MAX_NAMES_RANGE: std::ops::RangeInclusive<usize> = 1..=16;
/// Bounds of [`DnsConfig::attempts`].
pub const ATTEMPTS_RANGE: std::ops::RangeInclusive<usize> = 1..=10;
/// Longest [`DnsConfig::timeout`].
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The `[dns]` section of the config file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Look unknown sources up at all. Off: only ranges and bans decide
    /// (unknown sources pass and are just counted).
    pub enabled: bool,
    /// Resolver addresses (`ip` or `ip:port`, `[v6]:port`; port 53 if none);
    /// empty means the nameservers of `/etc/resolv.conf`. Recursive
    /// resolvers: a referral is a temporary failure.
    #[serde(deserialize_with = "de_servers")]
    pub servers: Vec<String>,
    /// Time for one attempt of one query (the config file takes whole
    /// seconds, e.g. `"2s"`).
    #[serde(deserialize_with = "de_timeout")]
    pub timeout: Duration,
    /// Tries per query (1 = no retry).
    #[serde(deserialize_with = "de_attempts")]
    pub attempts: usize,
    /// PTR names forward-checked at most.
    #[serde(deserialize_with = "de_max_names")]
    pub max_names: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { enabled: true, servers: Vec::new(), timeout: Duration::from_secs(2), attempts: 2, max_names: 3 }
    }
}

impl DnsConfig {
    /// Checks every setting (the config file parser does too; this is for
    /// configs built in code).
    pub fn validate(&self) -> Result<()> {
        self.server_addrs()?;
        check_timeout(self.timeout).map_err(Error::Dns)?;
        check_attempts(self.attempts).map_err(Error::Dns)?;
        check_max_names(self.max_names).map_err(Error::Dns)?;
        Ok(())
    }

    /// [`DnsConfig::servers`] as socket addresses.
    pub fn server_addrs(&self) -> Result<Vec<SocketAddr>> {
        self.servers.iter().map(|s| parse_server(s)).collect()
    }
}

/// Parses a resolver address: `192.0.2.53`, `192.0.2.53:5300`,
/// `2001:db8::53`, `[2001:db8::53]` or `[2001:db8::53]:5300`.
pub fn parse_server(input: &str) -> Result<SocketAddr> {
    let err = |reason: &str| Error::InvalidDnsServer { input: input.to_string(), reason: reason.to_string() };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let addr = if let Ok(ip) = s.parse::<IpAddr>() {
        SocketAddr::new(ip, 53)
    } else if let Ok(sa) = s.parse::<SocketAddr>() {
        sa
    } else if let Some(ip) =
        s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|r| r.parse::<IpAddr>().ok())
    {
        SocketAddr::new(ip, 53)
    } else if s.contains('%') {
        return Err(err("scoped (link-local) addresses are not supported"));
    } else {
        return Err(err("not an IP address or IP:port (host names are not allowed)"));
    };
    if addr.port() == 0 {
        return Err(err("port 0"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(err("not a unicast address"));
    }
    Ok(addr)
}

fn check_timeout(d: Duration) -> std::result::Result<(), String> {
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(format!("timeout {d:?} out of range (more than 0, at most {}s)", MAX_TIMEOUT.as_secs()));
    }
    Ok(())
}

fn check_attempts(n: usize) -> std::result::Result<(), String> {
    if !ATTEMPTS_RANGE.contains(&n) {
        return Err(format!("attempts {n} out of range ({}..={})", ATTEMPTS_RANGE.start(), ATTEMPTS_RANGE.end()));
    }
    Ok(())
}

fn check_max_names(n: usize) -> std::result::Result<(), String> {
    if !MAX_NAMES_RANGE.contains(&n) {
        return Err(format!("max_names {n} out of range ({}..={})", MAX_NAMES_RANGE.start(), MAX_NAMES_RANGE.end()));
    }
    Ok(())
}

fn de_servers<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    let servers = Vec::<String>::deserialize(d)?;
    for s in &servers {
        parse_server(s).map_err(serde::de::Error::custom)?;
    }
    Ok(servers)
}

fn de_timeout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let t = parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)?;
    check_timeout(t).map_err(serde::de::Error::custom)?;
    Ok(t)
}

fn de_attempts<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    check_attempts(n).map_err(serde::de::Error::custom)?;
    Ok(n)
}

fn de_max_names<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    check_max_names(n).map_err(serde::de::Error::custom)?;
    Ok(n)
}
