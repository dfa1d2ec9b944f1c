//! Following the systemd journal through `journalctl`.
//!
//! [`JournalSource`] runs
//! `journalctl [--directory=DIR] --follow --output=json --no-pager
//! --output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID,_SYSTEMD_UNIT,__REALTIME_TIMESTAMP
//! (--after-cursor=C | --lines=0 | --lines=all | --since=@S) _SYSTEMD_UNIT=U…`
//! and yields one [`JournalEntry`] per JSON line. Several `_SYSTEMD_UNIT=`
//! matches of the one field are alternatives (journalctl(1): matches of the
//! same field are ORed), so no `+` is needed. `_SYSTEMD_UNIT` is set by
//! journald from the cgroup, which a local user cannot forge (unlike
//! `SYSLOG_IDENTIFIER`, which logger(1) sets to anything).
//!
//! Positions: the caller persists [`JournalEntry::position`] (cursor and
//! realtime) of the last entry it consumed, in the same transaction as what
//! the entry changed, and starts the next source with it
//! (`--after-cursor`). journalctl refuses a malformed cursor ("Failed to
//! seek to cursor", exit 1, before any entry): the source then restarts once
//! with `--since=@<stored realtime>` and drops entries at or before that
//! time (counted: [`JournalCounters::cursor_fallbacks`]). Any other exit is an
//! error carrying the tail of journalctl's stderr; the caller restarts with
//! backoff.
//!
//! Message shapes in `-o json`: a string; an array of byte values when the
//! value is not printable UTF-8 (delivered lossily); `null` when it is longer
//! than 4096 bytes (journalctl prints those only with `--all`; skipped and
//! counted); an array of values when a field was repeated (the first is
//! used, counted).
//!
//! The child dies with the source (`kill_on_drop`) and with the agent
//! (`PR_SET_PDEATHSIG`). Linux sends that signal when the *thread* that
//! spawned the child exits, so spawn from an async task on a runtime worker
//! (which lives as long as the runtime), never from `spawn_blocking`.

use std::{
    ffi::OsString,
    fmt, io,
    path::PathBuf,
    process::{ExitStatus, Stdio},
};

use serde::{
    de::{self, Deserializer, SeqAccess, Visitor},
    Deserialize, Serialize,
};
use tokio::{
    io::AsyncReadExt as _,
    process::{Child, ChildStderr, ChildStdout, Command},
};

pub use super::file::Start;

/// The fields asked for (journalctl adds `__CURSOR` and the other `__`
/// fields itself).
pub const OUTPUT_FIELDS: &str = "MESSAGE,SYSLOG_IDENTIFIER,_PID,_SYSTEMD_UNIT,__REALTIME_TIMESTAMP";
/// Longest JSON line accepted; longer ones are skipped up to their newline
/// (counted). A 4096-byte message as an array of byte values is ~16 KiB.
pub const MAX_JSON_LINE: usize = 256 * 1024;
/// Longest cursor accepted (journalctl's are ~120 bytes).
pub const MAX_CURSOR: usize = 1024;
/// Bytes of journalctl's stderr kept for the error message.
const STDERR_TAIL: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;

/// What to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// The journalctl program (default `journalctl`, looked up in `PATH`).
    pub journalctl: PathBuf,
    /// `--directory`: a journal directory other than the system's.
    pub directory: Option<PathBuf>,
    /// `_SYSTEMD_UNIT` values (at least one).
    pub units: Vec<String>,
    /// Where to begin without a stored position.
    pub start: Start,
}

impl JournalConfig {
    pub fn new(units: Vec<String>) -> Self {
        JournalConfig { journalctl: PathBuf::from("journalctl"), directory: None, units, start: Start::End }
    }
}

/// A point in the journal to continue after; persist it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalPosition {
    pub cursor: String,
    /// The entry's `__REALTIME_TIMESTAMP`, for the fallback when journalctl
    /// refuses the cursor.
    pub realtime_us: Option<i64>,
}

/// One journal entry of a followed unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub message: String,
    pub ident: Option<String>,
    pub unit: Option<String>,
    pub pid: Option<u32>,
    pub realtime_us: Option<i64>,
    pub cursor: String,
}

impl JournalEntry {
    pub fn position(&self) -> JournalPosition {
        JournalPosition { cursor: self.cursor.clone(), realtime_us: self.realtime_us }
    }
}

/// What the source has seen, cumulative over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JournalCounters {
    /// Entries delivered.
    pub entries: u64,
    /// Entries without a usable MESSAGE (null: over 4096 bytes; or absent).
    pub null_messages: u64,
    /// Lines that are not a journal entry (bad JSON, no cursor).
    pub bad_entries: u64,
    /// Lines over [`MAX_JSON_LINE`].
    pub oversized: u64,
    /// Entries whose MESSAGE was repeated (the first value was used).
    pub multi_valued: u64,
    /// Restarts with `--since` after journalctl refused the cursor.
    pub cursor_fallbacks: u64,
    /// Entries dropped after such a restart because they were at or before
    /// the stored position.
    pub before_position: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal source: {0}")]
    Config(String),
    #[error("cannot start {}: {source} (is systemd's journalctl installed? the journalctl path is configurable)", .program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {}'s output: {source}", .program.display())]
    Read {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} exited ({status}){}", .program.display(), if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Exited { program: PathBuf, status: ExitStatus, stderr: String },
}

/// Where a journalctl run begins.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Begin {
    Cursor(String),
    /// `--since=@`, unix microseconds.
    Since(i64),
    Tail,
    All,
}

/// journalctl's arguments for `cfg` beginning at `from`.
fn command_args(cfg: &JournalConfig, from: &Begin) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(dir) = &cfg.directory {
        let mut a = OsString::from("--directory=");
        a.push(dir);
        args.push(a);
    }
    for a in ["--follow", "--output=json", "--no-pager"] {
        args.push(a.into());
    }
    args.push(format!("--output-fields={OUTPUT_FIELDS}").into());
    args.push(match from {
        Begin::Cursor(c) => format!("--after-cursor={c}").into(),
        Begin::Since(us) => {
            let us = (*us).max(0);
            format!("--since=@{}.{:06}", us / 1_000_000, us % 1_000_000).into()
        }
        Begin::Tail => "--lines=0".into(),
        Begin::All => "--lines=all".into(),
    });
    for u in &cfg.units {
        args.push(format!("_SYSTEMD_UNIT={u}").into());
    }
    args
}

/// The realtime (`t=`, hex microseconds) inside a journal cursor.
fn cursor_realtime(cursor: &str) -> Option<i64> {
    cursor.split(';').find_map(|kv| kv.strip_prefix("t=")).and_then(|h| i64::from_str_radix(h, 16).ok())
}

fn validate(cfg: &JournalConfig) -> Result<(), JournalError> {
    if cfg.units.is_empty() {
        return Err(JournalError::Config(
            "no unit to follow: a journal source needs at least one systemd unit (the _SYSTEMD_UNIT match)".into(),
        ));
    }
    for u in &cfg.units {
        if u.is_empty() || u.len() > 256 || u.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(JournalError::Config(format!(
                "unit {u:?} is not a systemd unit name (empty, over 256 bytes, or with spaces or control characters)"
            )));
        }
    }
    Ok(())
}

/// A running `journalctl --follow`; see the module docs.
pub struct JournalSource {
    cfg: JournalConfig,
    /// The stored position this source started from, if any.
    stored: Option<JournalPosition>,
    from: Begin,
    child: Child,
    stdout: ChildStdout,
    stderr: Option<ChildStderr>,
    buf: Vec<u8>,
    /// Start of the unparsed part of `buf`.
    pos: usize,
    /// Skipping the rest of an oversized line.
    discarding: bool,
    read_buf: Vec<u8>,
    err_buf: Vec<u8>,
    stderr_tail: Vec<u8>,
    /// Lines read from the current journalctl run.
    lines_this_run: u64,
    fell_back: bool,
    /// After a fallback: drop entries at or before this time.
    skip_upto_us: Option<i64>,
    counters: JournalCounters,
}

impl fmt::Debug for JournalSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalSource").field("cfg", &self.cfg).field("from", &self.from).finish_non_exhaustive()
    }
}

impl JournalSource {
    /// Starts journalctl after `position`, or at `cfg.start` without one.
    /// Must run inside a tokio runtime (see the module docs on which thread).
    pub fn spawn(cfg: JournalConfig, position: Option<JournalPosition>) -> Result<Self, JournalError> {
        validate(&cfg)?;
        let from = match &position {
            Some(p) if p.cursor.len() <= MAX_CURSOR => Begin::Cursor(p.cursor.clone()),
            Some(p) => match p.realtime_us {
                Some(us) => Begin::Since(us),
                None => Begin::Tail,
            },
            None => match cfg.start {
                Start::End => Begin::Tail,
                Start::Beginning => Begin::All,
            },
        };
        let skip_upto_us = match from {
            Begin::Since(us) => Some(us),
            _ => None,
        };
        let (child, stdout, stderr) = start(&cfg, &from)?;
        Ok(JournalSource {
            cfg,
            stored: position,
            from,
            child,
            stdout,
            stderr: Some(stderr),
            buf: Vec::new(),
            pos: 0,
            discarding: false,
            read_buf: vec![0; READ_CHUNK],
            err_buf: vec![0; 4096],
            stderr_tail: Vec::new(),
            lines_this_run: 0,
            fell_back: false,
            skip_upto_us,
            counters: JournalCounters::default(),
        })
    }

    pub fn counters(&self) -> JournalCounters {
        self.counters
    }

    /// The running journalctl's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next entry. Cancel-safe: nothing read is lost if the future is
    /// dropped.
    pub async fn next(&mut self) -> Result<JournalEntry, JournalError> {
        loop {
            if let Some(e) = self.take_buffered() {
                return Ok(e);
            }
            self.fill().await?;
        }
    }

    /// Waits for at least one entry, then appends it and whatever else is
    /// already read (without waiting), up to `max` entries in all.
    pub async fn next_batch(&mut self, out: &mut Vec<JournalEntry>, max: usize) -> Result<(), JournalError> {
        out.push(self.next().await?);
        for _ in 1..max {
            match self.take_buffered() {
                Some(e) => out.push(e),
                None => break,
            }
        }
        Ok(())
    }

    /// An entry from what is already read, if a complete line is there.
    fn take_buffered(&mut self) -> Option<JournalEntry> {
        loop {
            let rest = &self.buf[self.pos..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > MAX_JSON_LINE && !self.discarding {
                    self.counters.oversized += 1;
                    tracing::warn!(program = %self.cfg.journalctl.display(), "journal line over {MAX_JSON_LINE} bytes skipped");
                    self.discarding = true;
                }
                if self.discarding {
                    self.buf.clear();
                    self.pos = 0;
                }
                return None;
            };
            let line_start = self.pos;
            self.pos += nl + 1;
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            self.lines_this_run += 1;
            let line = &self.buf[line_start..line_start + nl];
            if let Some(e) = parse(line, self.skip_upto_us, &mut self.counters) {
                return Some(e);
            }
        }
    }

    /// Reads more of journalctl's output (keeping its stderr's tail); at
    /// its end, handles the exit.
    async fn fill(&mut self) -> Result<(), JournalError> {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos > READ_CHUNK) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        enum Got {
            Out(io::Result<usize>),
            Err(io::Result<usize>),
        }
        let got = {
            let stdout = &mut self.stdout;
            let read_buf = &mut self.read_buf;
            let err_buf = &mut self.err_buf;
            match self.stderr.as_mut() {
                Some(stderr) => tokio::select! {
                    r = stdout.read(read_buf) => Got::Out(r),
                    r = stderr.read(err_buf) => Got::Err(r),
                },
                None => Got::Out(stdout.read(read_buf).await),
            }
        };
        match got {
            Got::Out(Ok(0)) => self.ended().await,
            Got::Out(Ok(n)) => {
                self.buf.extend_from_slice(&self.read_buf[..n]);
                Ok(())
            }
            Got::Out(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Got::Out(Err(source)) => Err(JournalError::Read { program: self.cfg.journalctl.clone(), source }),
            Got::Err(Ok(0)) | Got::Err(Err(_)) => {
                self.stderr = None;
                Ok(())
            }
            Got::Err(Ok(n)) => {
                let chunk = self.err_buf[..n].to_vec();
                self.keep_stderr(&chunk);
                tracing::debug!(stderr = %String::from_utf8_lossy(&chunk).trim_end(), "journalctl");
                Ok(())
            }
        }
    }

    fn keep_stderr(&mut self, chunk: &[u8]) {
        self.stderr_tail.extend_from_slice(chunk);
        if self.stderr_tail.len() > STDERR_TAIL {
            let cut = self.stderr_tail.len() - STDERR_TAIL;
            self.stderr_tail.drain(..cut);
        }
    }

    /// journalctl closed its output: collect its exit, fall back from a
    /// refused cursor once, or fail.
    async fn ended(&mut self) -> Result<(), JournalError> {
        if let Some(mut stderr) = self.stderr.take() {
            let mut rest = Vec::new();
            // Bounded by STDERR_TAIL per read; ends when journalctl's stderr
            // closes (it has exited).
            loop {
                match stderr.read(&mut self.err_buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&self.err_buf[..n]),
                }
                if rest.len() > STDERR_TAIL {
                    rest.drain(..rest.len() - STDERR_TAIL);
                }
            }
            self.keep_stderr(&rest);
        }
        let program = self.cfg.journalctl.clone();
        let status =
            self.child.wait().await.map_err(|source| JournalError::Read { program: program.clone(), source })?;
        let stderr = String::from_utf8_lossy(&self.stderr_tail).trim().to_owned();
        let refused_cursor = matches!(self.from, Begin::Cursor(_))
            && status.code() == Some(1)
            && self.lines_this_run == 0
            && !self.fell_back;
        if !refused_cursor {
            return Err(JournalError::Exited { program, status, stderr });
        }
        let stored = self.stored.as_ref().expect("a cursor run has a stored position");
        let since = stored.realtime_us.or_else(|| cursor_realtime(&stored.cursor));
        self.fell_back = true;
        self.counters.cursor_fallbacks += 1;
        self.from = since.map_or(Begin::Tail, Begin::Since);
        self.skip_upto_us = since;
        tracing::warn!(
            cursor = %stored.cursor, since_us = ?since, stderr = %stderr,
            "journalctl refused the stored cursor; continuing from the stored time"
        );
        let (child, stdout, stderr_pipe) = start(&self.cfg, &self.from)?;
        self.child = child;
        self.stdout = stdout;
        self.stderr = Some(stderr_pipe);
        self.stderr_tail.clear();
        self.buf.clear();
        self.pos = 0;
        self.discarding = false;
        self.lines_this_run = 0;
        Ok(())
    }
}

/// One JSON line → an entry, or `None` (counted).
fn parse(line: &[u8], skip_upto_us: Option<i64>, counters: &mut JournalCounters) -> Option<JournalEntry> {
    let raw: Raw = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            counters.bad_entries += 1;
            tracing::debug!(error = %e, "journalctl printed a line that is not a journal entry");
            return None;
        }
    };
    let Some(cursor) = raw.cursor.text().filter(|c| !c.is_empty() && c.len() <= MAX_CURSOR) else {
        counters.bad_entries += 1;
        return None;
    };
    let realtime_us = raw.realtime.text().and_then(|t| t.parse::<i64>().ok());
    if let (Some(upto), Some(t)) = (skip_upto_us, realtime_us) {
        if t <= upto {
            counters.before_position += 1;
            return None;
        }
    }
    if matches!(raw.message, Field::Many(_)) {
        counters.multi_valued += 1;
    }
    let Some(message) = raw.message.text() else {
        counters.null_messages += 1;
        return None;
    };
    counters.entries += 1;
    Some(JournalEntry {
        message,
        ident: raw.ident.text(),
        unit: raw.unit.text(),
        pid: raw.pid.text().and_then(|p| p.parse().ok()),
        realtime_us,
        cursor,
    })
}

/// Spawns journalctl with pipes, killed on drop and on the agent's death.
fn start(cfg: &JournalConfig, from: &Begin) -> Result<(Child, ChildStdout, ChildStderr), JournalError> {
    let mut cmd = Command::new(&cfg.journalctl);
    cmd.args(command_args(cfg, from))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before the prctl: then nobody would
            // ever stop us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| JournalError::Spawn { program: cfg.journalctl.clone(), source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tracing::debug!(program = %cfg.journalctl.display(), ?from, pid = ?child.id(), "journalctl started");
    Ok((child, stdout, stderr))
}

/// The fields of one `-o json` line that are used.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "MESSAGE", default)]
    message: Field,
    #[serde(rename = "SYSLOG_IDENTIFIER", default)]
    ident: Field,
    #[serde(rename = "_SYSTEMD_UNIT", default)]
    unit: Field,
    #[serde(rename = "_PID", default)]
    pid: Field,
    #[serde(rename = "__REALTIME_TIMESTAMP", default)]
    realtime: Field,
    #[serde(rename = "__CURSOR", default)]
    cursor: Field,
}

/// A field value as journalctl prints it in JSON.
#[derive(Debug, Default, PartialEq, Eq)]
enum Field {
    #[default]
    Absent,
    Null,
    Text(String),
    /// Not printable UTF-8: an array of byte values.
    Bytes(Vec<u8>),
    /// A repeated field: its first value.
    Many(Box<Field>),
}

impl Field {
    fn text(self) -> Option<String> {
        match self {
            Field::Absent | Field::Null => None,
            Field::Text(s) => Some(s),
            Field::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            Field::Many(f) => f.text(),
        }
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a journal field value: a string, an array of byte values, null, or an array of those")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(Field::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Field, E> {
        Ok(Field::Text(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field, E> {
        Ok(Field::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Field, E> {
        Ok(Field::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        let mut bytes = Vec::new();
        let mut first: Option<Field> = None;
        let mut values = 0usize;
        while let Some(el) = seq.next_element::<Elem>()? {
            match el {
                Elem::Byte(b) if values == 0 => bytes.push(b),
                Elem::Value(v) if bytes.is_empty() => {
                    values += 1;
                    first.get_or_insert(v);
                }
                _ => return Err(de::Error::custom("an array mixing byte values and field values")),
            }
        }
        Ok(match first {
            Some(f) => Field::Many(Box::new(f)),
            None => Field::Bytes(bytes),
        })
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

/// An element of an array value: a byte, or (repeated field) a value.
enum Elem {
    Byte(u8),
    Value(Field),
}

struct ElemVisitor;

impl<'de> Visitor<'de> for ElemVisitor {
    type Value = Elem;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte value (0-255), a string, null or an array")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Elem, E> {
        u8::try_from(v).map(Elem::Byte).map_err(|_| E::custom(format!("byte value {v} over 255")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Elem, E> {
        u8::try_from(v).map(Elem::Byte).map_err(|_| E::custom(format!("byte value {v} out of range")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Elem, E> {
        Ok(Elem::Value(Field::Text(v.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Elem, E> {
        Ok(Elem::Value(Field::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Elem, A::Error> {
        match FieldVisitor.visit_seq(seq)? {
            Field::Bytes(b) => Ok(Elem::Value(Field::Bytes(b))),
            _ => Err(de::Error::custom("nested arrays of values")),
        }
    }
}

impl<'de> Deserialize<'de> for Elem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ElemVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Raw {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn fields_in_every_shape() {
        let r = raw(r#"{"MESSAGE":"hi","__CURSOR":"c","_PID":"42","__REALTIME_TIMESTAMP":"1796694425540524"}"#);
        assert_eq!(r.message, Field::Text("hi".into()));
        assert_eq!(r.ident, Field::Absent);
        let r = raw(r#"{"MESSAGE":[98,105,110,27,255]}"#);
        assert_eq!(r.message.text().unwrap(), "bin\u{1b}\u{fffd}");
        let r = raw(r#"{"MESSAGE":null}"#);
        assert_eq!(r.message, Field::Null);
        let r = raw(r#"{"MESSAGE":["first",[255],"third"]}"#);
        assert_eq!(r.message.text().unwrap(), "first");
        let r = raw(r#"{"MESSAGE":[[255,65],"x"]}"#);
        assert_eq!(r.message.text().unwrap(), "\u{fffd}A");
        for bad in [r#"{"MESSAGE":[256]}"#, r#"{"MESSAGE":[1,"x"]}"#, r#"{"MESSAGE":["x",1]}"#, r#"{"MESSAGE":5}"#] {
            assert!(serde_json::from_str::<Raw>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments() {
        let mut cfg = JournalConfig::new(vec!["postfix@-.service".into(), "dovecot.service".into()]);
        cfg.directory = Some("/tmp/j".into());
        let args = |from| command_args(&cfg, &from).into_iter().map(|a| a.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            args(Begin::Tail),
            [
                "--directory=/tmp/j",
                "--follow",
                "--output=json",
                "--no-pager",
                "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID,_SYSTEMD_UNIT,__REALTIME_TIMESTAMP",
                "--lines=0",
                "_SYSTEMD_UNIT=postfix@-.service",
                "_SYSTEMD_UNIT=dovecot.service",
            ]
        );
        assert_eq!(args(Begin::All)[5], "--lines=all");
        assert_eq!(args(Begin::Cursor("s=1;i=2".into()))[5], "--after-cursor=s=1;i=2");
        assert_eq!(args(Begin::Since(1_796_694_425_000_042))[5], "--since=@1796694425.000042");
    }

    #[test]
    fn realtime_from_a_cursor() {
        let c = "s=b44664fe71284f38931573253d0e24a0;i=1;b=0123456789abcdef0123456789abcdef;m=3e9;t=66215850117ac;x=8b3e20b9b3d16170";
        assert_eq!(cursor_realtime(c), Some(0x66215850117ac));
        assert_eq!(cursor_realtime("garbage"), None);
        assert_eq!(cursor_realtime("t=zz"), None);
    }

    #[test]
    fn units_are_required_and_checked() {
        assert!(matches!(validate(&JournalConfig::new(vec![])), Err(JournalError::Config(_))));
        assert!(validate(&JournalConfig::new(vec!["a b".into()])).is_err());
        assert!(validate(&JournalConfig::new(vec!["ssh.service".into()])).is_ok());
    }

    /// A fake journalctl (a shell script) exercises the exit handling
    /// without a journal.
    #[tokio::test]
    async fn a_refused_cursor_falls_back_to_the_stored_time_once() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("journalctl");
        let log = dir.path().join("args");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> {log}\ncase \"$*\" in\n  *--after-cursor=*) echo 'Failed to seek to cursor: Invalid argument' >&2; exit 1;;\n  *--since=@100.000005*) \
                 printf '%s\\n' '{{\"MESSAGE\":\"old\",\"__CURSOR\":\"a\",\"__REALTIME_TIMESTAMP\":\"100000005\"}}' \
                 'not json' '{{\"MESSAGE\":null,\"__CURSOR\":\"b\",\"__REALTIME_TIMESTAMP\":\"100000006\"}}' \
                 '{{\"MESSAGE\":\"new\",\"__CURSOR\":\"c\",\"__REALTIME_TIMESTAMP\":\"100000007\",\"_PID\":\"7\",\"SYSLOG_IDENTIFIER\":\"sshd\"}}'; \
                 echo 'bye' >&2; exit 3;;\nesac\nexit 9\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut cfg = JournalConfig::new(vec!["ssh.service".into()]);
        cfg.journalctl = script.clone();
        let pos = JournalPosition { cursor: "bad".into(), realtime_us: Some(100_000_005) };
        let mut src = JournalSource::spawn(cfg, Some(pos)).unwrap();
        let e = src.next().await.unwrap();
        assert_eq!(
            (e.message.as_str(), e.cursor.as_str(), e.pid, e.ident.as_deref()),
            ("new", "c", Some(7), Some("sshd"))
        );
        let err = src.next().await.unwrap_err();
        match &err {
            JournalError::Exited { status, stderr, .. } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "bye");
            }
            other => panic!("{other:?}"),
        }
        let c = src.counters();
        assert_eq!((c.entries, c.cursor_fallbacks, c.before_position, c.bad_entries, c.null_messages), (1, 1, 1, 1, 1));
        let args = std::fs::read_to_string(&log).unwrap();
        assert_eq!(args.lines().count(), 2, "{args}");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let mut cfg = JournalConfig::new(vec!["ssh.service".into()]);
        cfg.journalctl = "/nonexistent/journalctl".into();
        let err = JournalSource::spawn(cfg, None).unwrap_err();
        assert!(err.to_string().contains("cannot start /nonexistent/journalctl"), "{err}");
    }
}
