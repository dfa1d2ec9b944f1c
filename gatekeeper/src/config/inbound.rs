//! The `[inbound]` section: connection-rate classes for inbound SYNs
//! (`[[inbound.limit]]`), per source (IPv4 /32, IPv6 /64) and class, on the
//! ingress gate's interfaces. A limited port need not be guarded: limits
//! and bans apply on it, reverse-DNS judgement does not.
use serde::Deserialize;

use super::egress::{de_limits, LimitClass, Rate};

/// The inbound limiter's classes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Setting `[[inbound.limit]]` replaces the defaults; `limit = []`
    /// turns the limiter off. A port belongs to at most one class.
    #[serde(deserialize_with = "de_limits")]
    pub limit: Vec<LimitClass>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        let class = |name: &str, ports: &[u16], per: u32, burst: u32| LimitClass {
            name: name.into(),
            ports: ports.to_vec(),
            rate: Rate { per, unit_secs: 60 },
            burst,
        };
        InboundConfig {
            limit: vec![
                class("smtp", &[25], 60, 30),
                class("submission", &[465, 587], 120, 60),
                class("imap", &[143, 993], 120, 60),
                class("pop3", &[110, 995], 60, 30),
            ],
        }
    }
}

impl InboundConfig {
    /// Every limited port, sorted.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.limit.iter().flat_map(|c| c.ports.iter().copied()).collect();
        p.sort_unstable();
        p
    }

    /// sshd's ports (`[[logs]] kind = "sshd"`, `port`) join the limited
    /// ports as class `ssh` (30/min, burst 10) unless a class has them, so
    /// its abusers' bans cover them.
    pub fn add_ssh(&mut self, ports: &[u16]) {
        let limited = self.ports();
        let mut new: Vec<u16> = ports.iter().copied().filter(|p| !limited.contains(p)).collect();
        new.sort_unstable();
        new.dedup();
        if new.is_empty() || self.limit.len() >= gatekeeper_common::MAX_LIMIT_CLASSES as usize - 1 {
            return;
        }
        self.limit.push(LimitClass {
            name: "ssh".into(),
            ports: new,
            rate: Rate { per: 30, unit_secs: 60 },
            burst: 10,
        });
    }

    /// The datapath's form: (ports, limit) of class `i + 1` at `i`.
    pub fn classes(&self) -> Vec<(Vec<u16>, gatekeeper_common::RateLimit)> {
        self.limit.iter().map(|c| (c.ports.clone(), c.rate_limit())).collect()
    }
}
