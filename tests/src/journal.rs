//! A real systemd journal directory written entry by entry, for the journal
//! source's tests: [`JournalWriter`] runs systemd's own
//! `systemd-journal-remote --split-mode=none --output=DIR/journal/gk.journal`
//! reading a FIFO in the journal export format, so `journalctl --directory`
//! (and a follower with `-f`) reads exactly what a journald would have
//! written, without journald (this machine has no systemd as PID 1).
//!
//! Export format: `KEY=value` lines, an empty line after each entry; a value
//! with a newline or bytes that are not printable UTF-8 is written as
//! `KEY\n<le64 length><bytes>\n`. The writer supplies the fields journald
//! would (`__REALTIME_TIMESTAMP`, `__MONOTONIC_TIMESTAMP`, `_BOOT_ID`,
//! `_SYSTEMD_UNIT`, `_PID`) and the message's `SYSLOG_IDENTIFIER` and
//! `MESSAGE`.
//!
//! The FIFO stays open for the writer's life (one long-lived
//! journal-remote); dropping the writer closes it, which makes
//! journal-remote finish its file and exit (waited for, bounded, then
//! SIGKILLed by its pid), and removes the directory.
//!
//! Requires the Debian package `systemd-journal-remote` (and `journalctl`,
//! from `systemd`), which `cargo xtask setup` installs.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};

/// systemd's journal-remote (Debian: package `systemd-journal-remote`).
pub const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

/// Fails with the install hint when journal-remote is not installed.
pub fn require_journal_remote() -> Result<()> {
    ensure!(
        Path::new(JOURNAL_REMOTE).exists(),
        "{JOURNAL_REMOTE} is missing: run `cargo xtask setup` (or `apt-get install systemd-journal-remote`); \
         the journal source tests write a real journal with it"
    );
    Ok(())
}

/// One entry to write.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub unit: &'a str,
    pub ident: &'a str,
    pub pid: u32,
    pub message: &'a [u8],
    /// `None`: now (kept strictly increasing per writer).
    pub realtime_us: Option<i64>,
}

/// A journal directory with a live journal-remote appending to it.
pub struct JournalWriter {
    dir: tempfile::TempDir,
    child: Child,
    fifo: Option<File>,
    boot_id: String,
    last_realtime_us: i64,
    monotonic_us: u64,
    written: usize,
}

impl JournalWriter {
    /// Starts journal-remote on a fresh directory.
    pub fn start() -> Result<Self> {
        require_journal_remote()?;
        let dir = tempfile::Builder::new().prefix("gk-journal-").tempdir().context("create a temp dir")?;
        let journal = dir.path().join("journal");
        std::fs::create_dir(&journal).with_context(|| format!("create {}", journal.display()))?;
        let fifo_path = dir.path().join("entries.fifo");
        nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("mkfifo {}", fifo_path.display()))?;
        let mut child = Command::new(JOURNAL_REMOTE)
            .arg("--split-mode=none")
            .arg(format!("--output={}", journal.join("gk.journal").display()))
            .arg(&fifo_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("journal-remote.log")).context("create the journal-remote log")?)
            .spawn()
            .with_context(|| format!("spawn {JOURNAL_REMOTE}"))?;
        // Open the write end without blocking (ENXIO until journal-remote
        // has opened the read end), bounded; then make writes blocking.
        let deadline = Instant::now() + Duration::from_secs(10);
        let fifo = loop {
            match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo_path) {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e).with_context(|| format!("open {}", fifo_path.display()));
                }
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("journal-remote.log")).unwrap_or_default();
                bail!("{JOURNAL_REMOTE} exited ({status}) before reading its FIFO: {}", log.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{JOURNAL_REMOTE} did not open its FIFO within 10 s");
            }
            sleep(Duration::from_millis(10));
        };
        let flags =
            nix::fcntl::fcntl(fifo.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).context("F_GETFL on the FIFO")?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fifo.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).context("F_SETFL on the FIFO")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let boot_id = format!("{:016x}{:016x}", now.as_nanos() as u64, (u64::from(std::process::id()) << 20) ^ 0x6b17);
        Ok(JournalWriter {
            dir,
            child,
            fifo: Some(fifo),
            boot_id,
            last_realtime_us: 0,
            monotonic_us: 1_000_000,
            written: 0,
        })
    }

    /// The journal directory (`journalctl --directory`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    /// Entries written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Writes a message of `unit` now; returns its realtime.
    pub fn write(&mut self, unit: &str, ident: &str, message: impl AsRef<[u8]>) -> Result<i64> {
        self.write_entry(&Entry { unit, ident, pid: 4242, message: message.as_ref(), realtime_us: None })
    }

    /// Writes one entry; returns its realtime.
    pub fn write_entry(&mut self, e: &Entry<'_>) -> Result<i64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
        let realtime = e.realtime_us.unwrap_or_else(|| now.max(self.last_realtime_us + 1));
        self.last_realtime_us = self.last_realtime_us.max(realtime);
        self.monotonic_us += 1000;
        let mut buf = Vec::new();
        field(&mut buf, "__REALTIME_TIMESTAMP", realtime.to_string().as_bytes());
        field(&mut buf, "__MONOTONIC_TIMESTAMP", self.monotonic_us.to_string().as_bytes());
        field(&mut buf, "_BOOT_ID", self.boot_id.as_bytes());
        field(&mut buf, "_SYSTEMD_UNIT", e.unit.as_bytes());
        field(&mut buf, "_PID", e.pid.to_string().as_bytes());
        field(&mut buf, "SYSLOG_IDENTIFIER", e.ident.as_bytes());
        field(&mut buf, "MESSAGE", e.message);
        buf.push(b'\n');
        let fifo = self.fifo.as_mut().context("the writer is closed")?;
        fifo.write_all(&buf).context("write an entry to journal-remote's FIFO")?;
        self.written += 1;
        Ok(realtime)
    }

    /// Everything in the journal now, as `journalctl -o json` prints it.
    pub fn read_back(&self) -> Result<Vec<serde_json::Value>> {
        let out = Command::new("journalctl")
            .arg(format!("--directory={}", self.dir().display()))
            .args(["--output=json", "--no-pager", "--lines=all"])
            .stdin(Stdio::null())
            .output()
            .context("run journalctl")?;
        ensure!(out.status.success(), "journalctl failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        out.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).context("journalctl printed bad JSON"))
            .collect()
    }

    /// Waits (bounded) until journalctl reads every entry written so far.
    pub fn sync(&self) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.read_back()?;
            if all.len() >= self.written {
                return Ok(all);
            }
            if Instant::now() > deadline {
                bail!("the journal holds {} of {} entries written after 20 s", all.len(), self.written);
            }
            sleep(Duration::from_millis(20));
        }
    }
}

fn field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    let plain = std::str::from_utf8(value).is_ok_and(|s| !s.chars().any(|c| c.is_control()));
    buf.extend_from_slice(key.as_bytes());
    if plain {
        buf.push(b'=');
        buf.extend_from_slice(value);
    } else {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value);
    }
    buf.push(b'\n');
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        // EOF on the FIFO: journal-remote finishes its file and exits.
        drop(self.fifo.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => break,
                Ok(None) => sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_encoding() {
        let mut b = Vec::new();
        field(&mut b, "MESSAGE", b"plain text");
        field(&mut b, "MESSAGE", b"two\nlines");
        assert_eq!(&b[..19], b"MESSAGE=plain text\n");
        assert_eq!(&b[19..27], b"MESSAGE\n");
        assert_eq!(&b[27..35], &9u64.to_le_bytes());
        assert_eq!(&b[35..], b"two\nlines\n");
    }
}
