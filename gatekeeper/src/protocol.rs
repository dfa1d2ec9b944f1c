//! The CLI ⇄ agent protocol: one JSON request line, one JSON response line,
//! over a Unix stream socket that only root may open.
use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::store::{Origin, PoolAction, RangeKind};

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
        reason: Option<u32>,
    },
    VerdictDel {
        addrs: Vec<IpAddr>,
    },
    /// Removes every verdict of `reason`, or every automatic one (not
    /// manual bans) when `None`.
    VerdictFlush {
        reason: Option<u32>,
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
}

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

/// Sends one request and waits for its response (imports of 100k ranges
/// take a while, so the read timeout is generous).
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
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
