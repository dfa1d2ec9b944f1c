//! Reverse DNS with forward confirmation (FCrDNS) for the classifier.
//!
//! [`Resolver::lookup`] asks for the PTR records of a source address, then
//! for the A (IPv4 source) or AAAA (IPv6 source) records of at most
//! [`DnsConfig::max_names`] of the PTR names, and reports one
//! [`DnsOutcome`]:
//!
//! | outcome | when |
//! |---|---|
//! | `no-ptr` | the PTR query was answered NXDOMAIN, or NOERROR without a (usable) PTR record |
//! | `fcrdns-fail` | PTR names exist and every forward lookup was answered (NXDOMAIN, NODATA or addresses without the source) |
//! | `confirmed` | a PTR name's A/AAAA records contain the source |
//! | `tempfail` | anything else: SERVFAIL, REFUSED or any other error code, a timeout, a truncated answer that the TCP retry could not fix, an unreachable resolver, a referral; and when no name confirmed but a forward lookup failed like that |
//!
//! The outcome is decided on the DNS response code, never on the error type
//! alone: a negative answer is `no-ptr`/`fcrdns-fail` only when the server
//! said NXDOMAIN or NOERROR; every other code is `tempfail`. DNS being down
//! must never look like "no reverse DNS".
//!
//! Details that matter:
//! * **No cache.** hickory's response cache is switched off
//!   (`cache_size = 0`, which makes its moka map a no-op), so every lookup
//!   asks the servers: TTLs are the servers' TTLs, an outage shows at once,
//!   and results do not depend on earlier lookups. Callers keep verdicts
//!   for [`Lookup::ttl`] themselves. hickory's TTL ceiling (one day) is
//!   lifted too, so TTLs are reported as the server sent them (values above
//!   2^31-1 count as 0, RFC 2181 §8).
//! * **TTL** ([`Lookup::ttl`]): the smallest TTL of the records that
//!   decided (the PTR RRset and CNAMEs leading to it, and the confirming
//!   A/AAAA RRset, or every forward answer for `fcrdns-fail`); for negative
//!   answers the SOA's negative TTL (min of the SOA record's TTL and its
//!   MINIMUM field, RFC 2308). `None` when unknown (negative answer without
//!   SOA) and for `tempfail`.
//! * **Truncation**: a UDP answer with the TC bit is asked again over TCP
//!   (same server); if that fails too the result is `tempfail`.
//! * **Hostile answers**: only PTR records owned by the queried name (or by
//!   a CNAME target reached from it) count; other records are ignored. Names
//!   are lower-cased, the root name and names longer than 253 characters are
//!   dropped, at most [`MAX_PTR_NAMES`] are read, duplicates removed, and
//!   they are sorted so the same RRset in any order gives the same result;
//!   the first `max_names` of them are forward-checked (concurrently).
//! * **Several servers**: hickory's pool asks them (two at a time, fastest
//!   first) and fails over on timeouts and unreachable servers, but returns
//!   an error code (SERVFAIL, REFUSED, ...) or a failed TCP retry from the
//!   first server that sends one. Then each server is asked on its own (side
//!   by side) and the first real answer wins, so one broken resolver among
//!   several does not turn every lookup into `tempfail`.
//! * IPv4-mapped IPv6 sources (`::ffff:192.0.2.7`) are looked up as IPv4,
//!   and [`Lookup::ip`] is the IPv4 address.
//! * `/etc/hosts` is not consulted. hickory answers names under
//!   `localhost.`/`127.in-addr.arpa.` itself and NXDOMAIN for `.invalid`
//!   and `.onion` (RFC 6761), without asking a server.
//! * Time: one query takes at most `timeout` per attempt, `attempts`
//!   times (the UDP try and its TCP retry share one attempt's `timeout`); a
//!   lookup is the PTR query plus the forward queries run side by side
//!   (with several servers, an error-code failure adds one round of
//!   per-server queries), and each query is also capped by a hard deadline
//!   of `2 × timeout × attempts + 1s` in case hickory misbehaves.
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{runtime::TokioRuntimeProvider, DnsError, NetError, NoRecords},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, Record, RecordType},
    },
    TokioResolver,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

mod config;
#[cfg(test)]
mod tests;

pub use config::*;

/// Longest usable PTR name, in characters without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// PTR records read from one answer at most (before duplicates are removed).
pub const MAX_PTR_NAMES: usize = 64;
/// CNAME hops followed inside one answer when collecting records.
const MAX_CNAME_HOPS: usize = 8;

pub use crate::domain::DnsOutcome;

/// The result of [`Resolver::lookup`].
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Lookup {
    /// The source looked up (IPv4 for an IPv4-mapped IPv6 source).
    pub ip: IpAddr,
    pub outcome: DnsOutcome,
    /// The PTR names considered: lower-case, no trailing dot, sorted, at
    /// most `max_names`.
    pub ptr_names: Vec<String>,
    /// The PTR name whose A/AAAA records contain `ip`.
    pub confirmed: Option<String>,
    /// How long the answers that decided may be kept (serialized as whole
    /// seconds); `None` if unknown.
    #[serde(serialize_with = "ser_ttl", deserialize_with = "de_ttl")]
    pub ttl: Option<Duration>,
    /// Human-readable account, e.g. `PTR NXDOMAIN`,
    /// `PTR SERVFAIL from 127.0.0.1:5300`,
    /// `a.example. A 192.0.2.1 != 192.0.2.7`.
    pub detail: String,
}

fn ser_ttl<S: Serializer>(ttl: &Option<Duration>, s: S) -> std::result::Result<S::Ok, S::Error> {
    ttl.map(|d| d.as_secs()).serialize(s)
}

fn de_ttl<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
}

/// What one query came back with.
#[derive(Debug)]
enum Answer {
    /// NOERROR with records of the asked type: the records (owned by the
    /// query name or a CNAME target reached from it) and the smallest TTL of
    /// them and of the CNAMEs leading there.
    Records { records: Vec<Record>, ttl: u32 },
    /// NXDOMAIN (`nxdomain`) or NOERROR without records of the asked type;
    /// `ttl` from the SOA if there was one.
    Negative { nxdomain: bool, ttl: Option<u32> },
    /// No usable answer: the reason, and whether asking the servers one by
    /// one may help (a server answered with an error code or a referral, or
    /// TCP after truncation failed: hickory's pool returns such failures
    /// at once instead of trying the other servers; it does fail over on
    /// timeouts and unreachable servers).
    Failed { why: String, retry_singly: bool },
}

/// One forward check of one PTR name.
#[derive(Debug)]
enum Forward {
    Match {
        ttl: u32,
        detail: String,
    },
    /// Answered, does not contain the source.
    NoMatch {
        ttl: Option<u32>,
        detail: String,
    },
    Failed(String),
}

/// A reverse-DNS resolver. Cheap to share behind an `Arc`; lookups may run
/// concurrently.
///
/// [`Resolver::new`] needs no runtime, but every lookup must run inside a
/// tokio runtime with IO and time enabled, and always the same runtime: the
/// resolver keeps connections (e.g. TCP after a truncated answer) whose
/// tasks live on the runtime that opened them.
pub struct Resolver {
    /// All servers in one hickory pool.
    all: Upstream,
    /// With several servers, one resolver per server, asked (side by side)
    /// when the pool failed with an error code (see [`Answer::Failed`]).
    singles: Vec<Upstream>,
    max_names: usize,
    timeout: Duration,
    attempts: usize,
    deadline: Duration,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.all.desc)
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .field("max_names", &self.max_names)
            .finish()
    }
}

impl Resolver {
    /// Builds a resolver for `cfg`; with no servers configured, reads the
    /// nameservers (only) from `/etc/resolv.conf`. Sends nothing.
    pub fn new(cfg: &DnsConfig) -> Result<Resolver> {
        cfg.validate()?;
        let addrs = cfg.server_addrs()?;
        let name_servers: Vec<NameServerConfig> = if addrs.is_empty() {
            let (sys, _) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| Error::Dns(format!("no DNS servers configured and /etc/resolv.conf is unusable: {e}")))?;
            sys.name_servers().to_vec()
        } else {
            addrs
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect()
        };
        if name_servers.is_empty() {
            return Err(Error::Dns("no DNS servers".into()));
        }
        let desc = |ns: &NameServerConfig| {
            let port = ns.connections.first().map_or(53, |c| c.port);
            SocketAddr::new(ns.ip, port).to_string()
        };

        let mut opts = ResolverOpts::default();
        opts.timeout = cfg.timeout;
        // hickory counts retries after the first try.
        opts.attempts = cfg.attempts - 1;
        // No cache: a moka cache of capacity 0 stores nothing.
        opts.cache_size = 0;
        // Report TTLs as sent (hickory clamps record TTLs to one day
        // otherwise, even without a cache).
        opts.positive_max_ttl = Some(Duration::from_secs(u64::from(u32::MAX)));
        opts.negative_max_ttl = Some(Duration::from_secs(u64::from(u32::MAX)));
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.ndots = 1;

        let build = |servers: Vec<NameServerConfig>| -> Result<Upstream> {
            let desc = servers.iter().map(desc).collect::<Vec<_>>().join(", ");
            let resolver = hickory_resolver::Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts.clone())
            .build()
            .map_err(|e| Error::Dns(format!("cannot build the DNS resolver: {e}")))?;
            Ok(Upstream { resolver, desc })
        };
        let singles = if name_servers.len() > 1 {
            name_servers.iter().map(|ns| build(vec![ns.clone()])).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let all = build(name_servers)?;

        let deadline = cfg.timeout * 2 * cfg.attempts as u32 + Duration::from_secs(1);
        Ok(Resolver { all, singles, max_names: cfg.max_names, timeout: cfg.timeout, attempts: cfg.attempts, deadline })
    }

    /// Reverse-resolves and forward-confirms `ip`. Never fails: every
    /// failure is a [`DnsOutcome::TempFail`] with the reason in `detail`.
    pub async fn lookup(&self, ip: IpAddr) -> Lookup {
        let ip = ip.to_canonical();
        let mut out = Lookup {
            ip,
            outcome: DnsOutcome::TempFail,
            ptr_names: Vec::new(),
            confirmed: None,
            ttl: None,
            detail: String::new(),
        };
        let rname = reverse_name(ip);
        let (ptr_records, ptr_ttl) = match self.query(&rname, RecordType::PTR).await {
            Answer::Failed { why, .. } => {
                out.detail = format!("PTR {why}");
                return out;
            }
            Answer::Negative { nxdomain, ttl } => {
                out.outcome = DnsOutcome::NoPtr;
                out.ttl = ttl.map(ttl_duration);
                out.detail = if nxdomain { "PTR NXDOMAIN".into() } else { "PTR NODATA".into() };
                return out;
            }
            Answer::Records { records, ttl } => (records, ttl),
        };

        let (names, rejected) = ptr_names(&ptr_records);
        if names.is_empty() {
            out.outcome = DnsOutcome::NoPtr;
            out.ttl = Some(ttl_duration(ptr_ttl));
            out.detail = format!(
                "PTR: no usable name ({rejected} rejected: root name or longer than {MAX_NAME_LEN} characters)"
            );
            return out;
        }
        let total = names.len();
        let checked: Vec<(String, Name)> = names.into_iter().take(self.max_names).collect();
        out.ptr_names = checked.iter().map(|(s, _)| s.clone()).collect();

        let rtype = if ip.is_ipv4() { RecordType::A } else { RecordType::AAAA };
        let forwards =
            futures_util::future::join_all(checked.iter().map(|(s, name)| self.forward(s, name, rtype, ip))).await;

        let mut notes = Vec::new();
        if total > checked.len() {
            notes.push(format!(
                "{} more PTR name(s) not checked (max_names {})",
                total - checked.len(),
                self.max_names
            ));
        }
        if rejected > 0 {
            notes.push(format!("{rejected} PTR name(s) rejected"));
        }
        let suffix = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };

        if let Some((i, (ttl, detail))) = forwards.iter().enumerate().find_map(|(i, f)| match f {
            Forward::Match { ttl, detail } => Some((i, (*ttl, detail))),
            _ => None,
        }) {
            out.outcome = DnsOutcome::Confirmed;
            out.confirmed = Some(checked[i].0.clone());
            out.ttl = Some(ttl_duration(ptr_ttl.min(ttl)));
            out.detail = format!("{detail}{suffix}");
            return out;
        }
        let details: Vec<&str> = forwards
            .iter()
            .map(|f| match f {
                Forward::Match { detail, .. } | Forward::NoMatch { detail, .. } | Forward::Failed(detail) => {
                    detail.as_str()
                }
            })
            .collect();
        if forwards.iter().any(|f| matches!(f, Forward::Failed(_))) {
            // Failures first: they are why this is not fcrdns-fail.
            let mut ordered: Vec<&str> = forwards
                .iter()
                .zip(&details)
                .filter(|(f, _)| matches!(f, Forward::Failed(_)))
                .map(|(_, d)| *d)
                .collect();
            ordered.extend(
                forwards.iter().zip(&details).filter(|(f, _)| !matches!(f, Forward::Failed(_))).map(|(_, d)| *d),
            );
            out.outcome = DnsOutcome::TempFail;
            out.detail = format!("{}{suffix}", ordered.join("; "));
            return out;
        }
        let ttl = forwards
            .iter()
            .filter_map(|f| match f {
                Forward::NoMatch { ttl, .. } => *ttl,
                _ => None,
            })
            .fold(ptr_ttl, u32::min);
        out.outcome = DnsOutcome::FcrdnsFail;
        out.ttl = Some(ttl_duration(ttl));
        out.detail = format!("{}{suffix}", details.join("; "));
        out
    }

    /// The forward check of one PTR name.
    async fn forward(&self, shown: &str, name: &Name, rtype: RecordType, ip: IpAddr) -> Forward {
        match self.query(name, rtype).await {
            Answer::Failed { why, .. } => Forward::Failed(format!("{shown}. {rtype} {why}")),
            Answer::Negative { nxdomain, ttl } => Forward::NoMatch {
                ttl,
                detail: format!("{shown}. {rtype} {}", if nxdomain { "NXDOMAIN" } else { "NODATA" }),
            },
            Answer::Records { records, ttl } => {
                let addrs: Vec<IpAddr> = records
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                let list = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
                if addrs.contains(&ip) {
                    Forward::Match { ttl, detail: format!("{shown}. {rtype} {list} = {ip}") }
                } else {
                    Forward::NoMatch { ttl: Some(ttl), detail: format!("{shown}. {rtype} {list} != {ip}") }
                }
            }
        }
    }

    /// One query, classified by response code. When the pool fails with an
    /// error code and there are several servers, the servers are asked one
    /// by one (side by side); the first answer wins.
    async fn query(&self, name: &Name, rtype: RecordType) -> Answer {
        let first = self.query_on(&self.all, name, rtype).await;
        if self.singles.is_empty() || !matches!(first, Answer::Failed { retry_singly: true, .. }) {
            return first;
        }
        let mut tries: FuturesUnordered<_> = self.singles.iter().map(|u| self.query_on(u, name, rtype)).collect();
        while let Some(answer) = tries.next().await {
            if !matches!(answer, Answer::Failed { .. }) {
                return answer;
            }
        }
        first
    }

    async fn query_on(&self, up: &Upstream, name: &Name, rtype: RecordType) -> Answer {
        let result = match tokio::time::timeout(self.deadline, up.resolver.lookup(name.clone(), rtype)).await {
            Ok(r) => r,
            Err(_) => {
                return Answer::Failed {
                    why: format!("no answer from {} within {:?} (hard deadline)", up.desc, self.deadline),
                    retry_singly: false,
                }
            }
        };
        match result {
            Ok(lookup) => {
                let (records, ttl) = collect_answer(lookup.answers(), name, rtype);
                match ttl {
                    Some(ttl) if !records.is_empty() => Answer::Records { records, ttl },
                    // NOERROR without records of the type asked for.
                    _ => Answer::Negative { nxdomain: false, ttl: None },
                }
            }
            Err(e) => self.classify_error(e, &up.desc),
        }
    }

    /// Only NXDOMAIN and NOERROR are answers; everything else fails.
    fn classify_error(&self, e: NetError, servers: &str) -> Answer {
        let fail = |why: String, retry_singly: bool| Answer::Failed { why, retry_singly };
        let rcode_failure = |rc: ResponseCode| fail(format!("{} from {servers}", rcode_name(rc)), true);
        match e {
            NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, soa, ns, negative_ttl, .. })) => {
                match response_code {
                    ResponseCode::NXDomain => Answer::Negative { nxdomain: true, ttl: negative_ttl },
                    ResponseCode::NoError if soa.is_none() && ns.is_some() => {
                        fail(format!("referral instead of an answer from {servers} (not a recursive resolver?)"), true)
                    }
                    ResponseCode::NoError => Answer::Negative { nxdomain: false, ttl: negative_ttl },
                    // e.g. SERVFAIL surfaced as "no records found".
                    rc => rcode_failure(rc),
                }
            }
            NetError::Dns(DnsError::ResponseCode(rc)) => rcode_failure(rc),
            NetError::Timeout => fail(
                format!("timed out: no answer from {servers} ({:?} × {} attempt(s))", self.timeout, self.attempts),
                false,
            ),
            NetError::Truncated => fail(format!("truncated answer from {servers} and the TCP retry failed"), true),
            NetError::Io(io) => fail(format!("{servers} ({io})"), false),
            NetError::NoConnections => fail(format!("no connection to {servers}"), false),
            other => fail(format!("{servers} ({other})"), true),
        }
    }
}

/// A hickory resolver and the servers it asks, for messages
/// (`127.0.0.1:5300` or `192.0.2.53:53, 192.0.2.54:53`).
struct Upstream {
    resolver: TokioResolver,
    desc: String,
}

/// `SERVFAIL`, `REFUSED`, ... for messages.
fn rcode_name(rc: ResponseCode) -> String {
    match rc {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        other => format!("RCODE {}", u16::from(other)),
    }
}

/// TTL seconds as a duration; values with the top bit set count as 0
/// (RFC 2181 §8).
fn ttl_duration(ttl: u32) -> Duration {
    Duration::from_secs(if ttl > i32::MAX as u32 { 0 } else { u64::from(ttl) })
}

/// The records of type `rtype` owned by `qname` or by a CNAME target
/// reached from it within `answers`, and the smallest TTL among them and the
/// CNAMEs on the way (`None` if there are none). Everything else is ignored.
fn collect_answer(answers: &[Record], qname: &Name, rtype: RecordType) -> (Vec<Record>, Option<u32>) {
    let mut owners = vec![qname.to_lowercase()];
    let mut ttl: Option<u32> = None;
    for _ in 0..MAX_CNAME_HOPS {
        let last = owners.last().expect("not empty").clone();
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if r.name.to_lowercase() == last => Some((c.0.to_lowercase(), r.ttl)),
            _ => None,
        });
        match next {
            Some((target, t)) if !owners.contains(&target) => {
                owners.push(target);
                ttl = Some(ttl.map_or(t, |m| m.min(t)));
            }
            _ => break,
        }
    }
    let records: Vec<Record> = answers
        .iter()
        .filter(|r| r.record_type() == rtype && owners.contains(&r.name.to_lowercase()))
        .cloned()
        .collect();
    if records.is_empty() {
        return (records, None);
    }
    let min = records.iter().map(|r| r.ttl).fold(ttl.unwrap_or(u32::MAX), u32::min);
    (records, Some(min))
}

/// The usable PTR names in `records` (lower-case, no trailing dot, sorted,
/// deduplicated; at most [`MAX_PTR_NAMES`] records read) with their DNS
/// names, and how many were rejected.
fn ptr_names(records: &[Record]) -> (Vec<(String, Name)>, usize) {
    let mut names = Vec::new();
    let mut rejected = 0;
    for r in records.iter().filter(|r| matches!(r.data, RData::PTR(_))).take(MAX_PTR_NAMES) {
        let RData::PTR(p) = &r.data else { continue };
        let mut name = p.0.to_lowercase();
        name.set_fqdn(true);
        match usable_name(&name.to_ascii()) {
            Some(s) => names.push((s, name)),
            None => rejected += 1,
        }
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names.dedup_by(|a, b| a.0 == b.0);
    (names, rejected)
}

/// `name` lower-cased without its trailing dot, if it can be a host name
/// here: not the root, at most [`MAX_NAME_LEN`] characters.
pub fn usable_name(name: &str) -> Option<String> {
    let s = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.starts_with('.') {
        return None;
    }
    Some(s)
}

/// `7.2.0.192.in-addr.arpa.` / nibble `ip6.arpa.` name of `ip`.
pub fn reverse_name(ip: IpAddr) -> Name {
    let text = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    Name::from_ascii(&text).expect("a reverse name is a valid name")
}
