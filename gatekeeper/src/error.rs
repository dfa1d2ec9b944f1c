//! The library's error type. Every variant names what was wrong and where.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CIDR or address that does not parse or is not canonical.
    #[error("invalid CIDR {input:?}: {reason}")]
    InvalidCidr { input: String, reason: String },
    /// A duration such as `7d` that does not parse.
    #[error("invalid duration {input:?}: {reason} (examples: 90s, 30m, 1h, 7d)")]
    InvalidDuration { input: String, reason: String },
    /// Bad lines in a list file; nothing was imported.
    #[error("{path}: {} bad line(s), nothing imported:\n{}", .errors.len(), .errors.iter().map(|e| format!("  line {}: {}", e.line, e.message)).collect::<Vec<_>>().join("\n"))]
    BadListLines { path: String, errors: Vec<LineError> },
    /// A config file that cannot be read or parsed.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// An entry that already exists.
    #[error("{what} {net} already exists{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Duplicate { what: &'static str, net: String, detail: Option<String> },
    /// A deny range that overlaps an allow range, or the other way round.
    #[error("{kind} range {net} overlaps {other_kind} range {other}: where they overlap allow wins and those sources pass; add --force if that is what you want")]
    Overlap { kind: &'static str, net: String, other_kind: &'static str, other: String },
    /// An entry that does not exist.
    #[error("{what} {key} not found")]
    NotFound { what: &'static str, key: String },
    /// A map or id space is full.
    #[error("{what} is full ({capacity} entries)")]
    Full { what: &'static str, capacity: u64 },
    /// Invalid guarded-port set.
    #[error("invalid ports: {0}")]
    InvalidPorts(String),
    /// A request that makes no sense as given (names what is wrong).
    #[error("{0}")]
    InvalidInput(String),
    #[error("state database {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A state database written by a newer gatekeeper (schema version too high).
    #[error("state database {path}: schema version {found} is newer than this gatekeeper supports ({supported}); upgrade gatekeeper or move the file away")]
    StoreVersion { path: PathBuf, found: i64, supported: i64 },
    #[error("bpf: {0}")]
    Bpf(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad lines in a classifier rules file; no rules were loaded.
    #[error("{path}: {} bad line(s), no rules loaded:\n{}", .errors.len(), .errors.iter().map(|e| format!("  line {}: {}", e.line, e.message)).collect::<Vec<_>>().join("\n"))]
    BadRules { path: String, errors: Vec<LineError> },
    /// Input lines `classify` could not read (each was reported as it came);
    /// the other lines were classified.
    #[error("{bad} bad input line(s), the first at line {first_line}; the other lines were classified")]
    ClassifyInput { bad: usize, first_line: usize },
    /// A DNS resolver address that does not parse.
    #[error("invalid DNS server {input:?}: {reason} (expected an IP address or IP:port, e.g. 192.0.2.53 or [2001:db8::53]:5300)")]
    InvalidDnsServer { input: String, reason: String },
    /// A DNS setting that cannot work, or a resolver that cannot be set up.
    #[error("dns: {0}")]
    Dns(String),
}

/// One bad line of a list file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}
