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
    /// Both verdict buckets of a source hold only bans and pass verdicts,
    /// which are never evicted.
    #[error("the verdict table has no room for {key}: both of its buckets hold only bans and pass verdicts, which are never evicted; nothing was changed (raise max_verdicts, then `gatekeeper unload` and restart)")]
    VerdictsFull { key: String },
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
    /// A BPF operation (load, pin, attach, map access) that failed; the
    /// aya error, if any, is kept as the source (its errno is at the end of
    /// the chain).
    #[error("bpf: {what}")]
    Bpf {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    /// An interface to attach to that does not exist (in this network
    /// namespace); `refused`: found before anything was changed.
    #[error("interface {name:?}{} not found{}", .role.map(|r| format!(" ({r})")).unwrap_or_default(), if *.refused { "; nothing was changed" } else { "" })]
    NoSuchInterface { name: String, role: Option<crate::domain::Role>, refused: bool },
    /// Another agent holds this socket or pin directory (the message says
    /// which, and whether anything was changed).
    #[error("{0} (stop it first, or give this one its own --pin-dir and --socket)")]
    AlreadyRunning(String),
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

/// A boxed source error (aya's error types, kept whole).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// A BPF failure with its aya error as the source.
    pub fn bpf(what: impl std::fmt::Display, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Bpf { what: what.to_string(), source: Some(Box::new(source)) }
    }

    /// A BPF-side failure that has no underlying error.
    pub fn bpf_msg(what: impl std::fmt::Display) -> Self {
        Error::Bpf { what: what.to_string(), source: None }
    }

    /// The message with every source appended (`a: b: c`), for replies to
    /// the CLI and log lines, which carry one string.
    pub fn report(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_errors_keep_their_source_chain() {
        let io = std::io::Error::from_raw_os_error(libc::EPERM);
        let e = Error::bpf("attach XDP (native) to veth0", io);
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.report().starts_with("bpf: attach XDP (native) to veth0: "), "{}", e.report());
        assert!(e.report().contains("not permitted"), "{}", e.report());
        let e = Error::NoSuchInterface { name: "eth9".into(), role: Some(crate::domain::Role::Uplink), refused: true };
        assert_eq!(e.to_string(), "interface \"eth9\" (uplink) not found; nothing was changed");
    }
}
