//! The CLI ⇄ agent protocol: one JSON request line, one JSON response line,
//! over a Unix stream socket that only root may open. Each request's reply
//! is a typed struct here, which the agent sends and the CLI reads back.
use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    dns::Lookup,
    domain::{Action, Origin, PoolAction, RangeKind, VerdictReason},
    pipeline::Decision,
    store::{RangeRecord, VerdictRecord},
};

/// A range to add, as the CLI sends it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangeSpec {
    pub net: IpNet,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    RangeAdd {
        kind: RangeKind,
        ranges: Vec<RangeSpec>,
        origin: Origin,
        /// Where the ranges came from (`cli`, `import:<file>`).
        source: String,
        expire_secs: Option<u64>,
        force: bool,
        /// Skip ranges that already exist instead of failing (imports).
        skip_existing: bool,
        /// Remove ranges of this `source` that are not in `ranges` (imports).
        replace: bool,
        /// Pools: what a blocked SYN gets (default drop).
        #[serde(default)]
        action: Option<PoolAction>,
    },
    RangeDel {
        kind: RangeKind,
        nets: Vec<IpNet>,
    },
    RangeList {
        kind: RangeKind,
    },
    BanAdd {
        addrs: Vec<IpAddr>,
        comment: Option<String>,
        expire_secs: Option<u64>,
    },
    BanDel {
        addrs: Vec<IpAddr>,
    },
    BanList,
    /// Per-source verdicts (all reasons, or one).
    VerdictList {
        reason: Option<VerdictReason>,
    },
    VerdictDel {
        addrs: Vec<IpAddr>,
    },
    /// Removes every verdict of `reason`, or every automatic one (not
    /// manual bans) when `None`.
    VerdictFlush {
        reason: Option<VerdictReason>,
    },
    /// Live explanation of what decides for a source.
    Check {
        ip: IpAddr,
    },
    PortsSet {
        ports: Vec<u16>,
    },
    PortsList,
    /// The egress gate's port policy and limit classes.
    EgressPolicy,
    Status,
    /// Detach everything, remove all pins and exit.
    Unload,
    /// Sources with an abuse score (from the mail logs).
    AbuseList,
    /// Forgets a source's score and offences, and lifts its abuse ban.
    AbuseForget {
        ip: IpAddr,
    },
    SuspendList,
    /// Suspends an account or address by hand.
    SuspendAdd {
        subject: Subject,
        reason: Option<String>,
    },
    SuspendDel {
        subject: Subject,
    },
    /// Sets an account's (or address's) sending limits: `none`, or
    /// `N/hour`, `N/day`.
    LimitSet {
        subject: Subject,
        limits: String,
    },
    LimitDel {
        subject: Subject,
    },
    LimitList,
}

/// Who a suspension or a sending limit is for (`account:NAME` or
/// `addr:IP`).
pub use crate::pipeline::abuse::Subject;

// ------------------------------------------------------------------ replies

/// `Ping`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pong {
    pub pong: bool,
}

/// `RangeAdd`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangeAdded {
    pub added: usize,
    /// Given but already present (imports skip them).
    pub unchanged: usize,
    /// Removed by `replace`.
    pub removed: usize,
    /// The records added, for interactive adds (`None` past 1,000).
    pub records: Option<Vec<RangeRecord>>,
}

/// A range with its datapath hits (`RangeList` replies with a list).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangeRow {
    #[serde(flatten)]
    pub record: RangeRecord,
    pub hits: u64,
}

/// `RangeDel`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangesRemoved {
    pub removed: Vec<RangeRecord>,
}

/// `BanDel`, `VerdictDel`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerdictsRemoved {
    pub removed: Vec<VerdictRecord>,
}

/// `VerdictFlush`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flushed {
    pub removed: usize,
}

/// `PortsSet`, `PortsList`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ports {
    pub ports: Vec<u16>,
}

/// `Unload`: what was detached and unpinned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unloaded {
    pub removed: Vec<String>,
}

/// `Check`: the live lookup, the policy's decision, and what decides for
/// the source in the datapath now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReply {
    pub ip: IpAddr,
    /// The verdict table's key (the address, or its /64).
    pub source_key: String,
    pub lookup: Lookup,
    pub decision: Decision,
    pub datapath: CheckDatapath,
    /// Its abuse score from the mail logs, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abuse: Option<AbuseRow>,
}

/// A source's abuse score (`AbuseList`, `check`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbuseRow {
    /// The source key: an IPv4 address or an IPv6 /64.
    pub source: String,
    /// The leaky bucket's level now.
    pub score: f64,
    pub threshold: u32,
    /// Failed logins and connections counted (since it was last forgotten).
    pub failures: u64,
    pub connections: u64,
    /// Bans so far (the next one is longer).
    pub offences: u32,
    /// Unix seconds the current ban ends, if banned.
    pub banned_until: Option<i64>,
    pub reason: Option<crate::domain::AbuseReason>,
    /// Unix seconds of the last event counted.
    pub last_seen: i64,
}

/// `AbuseForget`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AbuseForgotten {
    pub source: String,
    pub had_score: bool,
    pub ban_lifted: bool,
}

/// A subject's sending limits and what it sent (`LimitList`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitRow {
    pub subject: String,
    /// `none` or `N/hour, M/day`.
    pub limits: String,
    /// Where the limits come from: `cli`, `group:NAME`, `default` or
    /// `exempt`.
    pub origin: String,
    pub messages_hour: u64,
    pub messages_day: u64,
    pub recipients_day: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckDatapath {
    /// In words: the range, the verdict, or nothing.
    pub decides: String,
    /// The ingress range holding the source (longest match), if any.
    pub range: Option<CheckRange>,
    /// The source's verdict in the datapath, if any.
    pub verdict: Option<CheckVerdict>,
    /// Why the datapath refuses the source and what its SYNs meet (`drop`:
    /// silence; `reject`: the rejector's reason), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<CheckRefusal>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckRefusal {
    pub refusal: crate::domain::Refusal,
    pub action: crate::domain::ReasonAction,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckRange {
    pub net: IpNet,
    pub kind: RangeKind,
    pub record: Option<RangeRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckVerdict {
    pub action: Action,
    pub reason: VerdictReason,
    /// Not yet expired.
    pub live: bool,
    /// `None`: never expires.
    pub expires_in_secs: Option<u64>,
    pub record: Option<VerdictRecord>,
}

/// The envelope of every reply: `data` is one of the reply types above.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response { ok: true, error: None, data: serde_json::to_value(data).unwrap_or_default() }
    }
    pub fn err(e: impl std::fmt::Display) -> Response {
        Response { ok: false, error: Some(e.to_string()), data: serde_json::Value::Null }
    }
    /// An error with its whole source chain.
    pub fn error(e: &crate::Error) -> Response {
        Response::err(e.report())
    }
    /// The reply of a request: its data, or the error.
    pub fn of<T: Serialize>(r: crate::Result<T>) -> Response {
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(&e),
        }
    }
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the gatekeeper agent is not running (no socket at {0}); start it with `gatekeeper run`, or pass --socket / GATEKEEPER_SOCKET")]
    NotRunning(String),
    #[error("permission denied on {0}: the control socket is for root only")]
    PermissionDenied(String),
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and reads its reply as `T` (imports of 100k ranges
/// take a while, so the read timeout is generous).
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, ClientError> {
    let shown = socket.display().to_string();
    let data = call_raw(socket, req)?;
    serde_json::from_value(data).map_err(|e| ClientError::Io {
        path: shown,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected reply: {e}")),
    })
}

/// Sends one request and returns its reply's data as it came.
fn call_raw(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let shown = socket.display().to_string();
    let io = |source| ClientError::Io { path: shown.clone(), source };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning(shown.clone()),
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(shown.clone()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(300))).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    let resp: Response = serde_json::from_str(&reply).map_err(|e| {
        io(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad response {reply:?}: {e}")))
    })?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(ClientError::Agent(resp.error.unwrap_or_else(|| "unknown error".into())))
    }
}
