//! The `[egress]` section: the ports blocked from pools and the
//! connection-rate classes (`[[egress.limit]]`) with their defaults
//! (`[egress.explain]` is in `explain`).
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

#[allow(unused_imports)]
use super::*;

/// The egress gate's policy.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// SYNs to these ports from pool sources are blocked unless they go to
    /// a smarthost (empty: nothing is blocked, limits still apply).
    #[serde(deserialize_with = "de_egress_ports")]
    pub ports: Vec<u16>,
    /// Connection-rate classes for subscriber sources (pool and exempt).
    /// Setting `[[egress.limit]]` replaces the defaults; `limit = []`
    /// turns limits off.
    #[serde(deserialize_with = "de_limits")]
    pub limit: Vec<LimitClass>,
    /// `[egress.explain]`: how explain pools' blocked subscribers are
    /// answered.
    pub explain: super::ExplainConfig,
}

/// One rate-limit class: every subscriber source gets its own token bucket
/// per class.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitClass {
    pub name: String,
    pub ports: Vec<u16>,
    /// `N/s`, `N/min` or `N/h`.
    pub rate: Rate,
    /// Connections a quiet source may open at once.
    pub burst: u32,
}

/// A connection rate, kept as the time between two tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rate {
    pub per: u32,
    pub unit_secs: u32,
}

impl Rate {
    pub fn interval_ns(self) -> u64 {
        self.unit_secs as u64 * 1_000_000_000 / self.per as u64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit_secs {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.per)
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("invalid rate {s:?} (expected N/s, N/min or N/h with N >= 1, e.g. \"30/min\")");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let per: u32 = n.trim().parse().map_err(|_| bad())?;
        let unit_secs = match unit.trim() {
            "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        if per == 0 || per > 1_000_000 {
            return Err(bad());
        }
        Ok(Rate { per, unit_secs })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl LimitClass {
    /// The datapath's form of this class.
    pub fn rate_limit(&self) -> gatekeeper_common::RateLimit {
        let interval_ns = self.rate.interval_ns();
        gatekeeper_common::RateLimit { interval_ns, burst_ns: interval_ns.saturating_mul(self.burst as u64) }
    }
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            ports: vec![25],
            limit: vec![
                LimitClass { name: "smtp".into(), ports: vec![25], rate: Rate { per: 30, unit_secs: 60 }, burst: 20 },
                LimitClass {
                    name: "submission".into(),
                    ports: vec![465, 587],
                    rate: Rate { per: 120, unit_secs: 60 },
                    burst: 60,
                },
            ],
            explain: super::ExplainConfig::default(),
        }
    }
}

fn de_egress_ports<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u16>, D::Error> {
    let ports = Vec::<u16>::deserialize(d)?;
    if ports.is_empty() {
        return Ok(ports);
    }
    validate_ports(&ports).map_err(serde::de::Error::custom)
}

pub(super) fn de_limits<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<LimitClass>, D::Error> {
    let classes = Vec::<LimitClass>::deserialize(d)?;
    let max = gatekeeper_common::MAX_LIMIT_CLASSES as usize - 1;
    if classes.len() > max {
        return Err(serde::de::Error::custom(format!("{} limit classes given, at most {max}", classes.len())));
    }
    let mut seen: Vec<(u16, &str)> = Vec::new();
    for (i, c) in classes.iter().enumerate() {
        if c.name.trim().is_empty() {
            return Err(serde::de::Error::custom(format!("limit class #{} has an empty name", i + 1)));
        }
        if classes[..i].iter().any(|o| o.name == c.name) {
            return Err(serde::de::Error::custom(format!("limit class {:?} is defined twice", c.name)));
        }
        if c.ports.is_empty() || c.ports.contains(&0) {
            return Err(serde::de::Error::custom(format!(
                "limit class {:?}: ports must be a non-empty list of ports 1-65535",
                c.name
            )));
        }
        if c.burst == 0 {
            return Err(serde::de::Error::custom(format!("limit class {:?}: burst must be at least 1", c.name)));
        }
        for &p in &c.ports {
            if let Some((_, other)) = seen.iter().find(|(q, _)| *q == p) {
                return Err(serde::de::Error::custom(format!(
                    "port {p} is in limit classes {other:?} and {:?}; a port belongs to one class",
                    c.name
                )));
            }
            seen.push((p, &c.name));
        }
    }
    Ok(classes)
}
