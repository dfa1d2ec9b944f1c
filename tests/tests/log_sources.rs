//! The two log sources through their public API, on real inputs:
//! [`JournalSource`] follows a journal directory written by systemd's own
//! journal-remote ([`JournalWriter`], package `systemd-journal-remote`,
//! installed by `cargo xtask setup`; the tests fail with that hint without
//! it) while entries are appended: only the configured units arrive, a
//! binary MESSAGE as lossy text, an over-long one not at all (counted);
//! a restart from a stored cursor delivers exactly what came after it; a
//! cursor journalctl refuses falls back to the stored time, still without
//! repeats. [`FileFollower`] follows a file through rotation (rename + new
//! file, with the writer finishing its line in the old one) and a
//! truncation, delivering every line once.
//!
//! Every wait is bounded (a failure, never a timing assertion).

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use gatekeeper::logs::{
    file::{FileFollower, Line, Poll, Start},
    journal::{JournalConfig, JournalEntry, JournalPosition, JournalSource},
};
use gatekeeper_tests::journal::{Entry, JournalWriter};

const POSTFIX: &str = "postfix@-.service";
const DOVECOT: &str = "dovecot.service";
/// Generous: entries arrive within milliseconds, a loaded CI machine later.
const WAIT: Duration = Duration::from_secs(30);

fn writer() -> JournalWriter {
    JournalWriter::start().unwrap_or_else(|e| panic!("{e:#}"))
}

fn config(w: &JournalWriter, units: &[&str], start: Start) -> JournalConfig {
    let mut cfg = JournalConfig::new(units.iter().map(|u| u.to_string()).collect());
    cfg.directory = Some(w.dir());
    cfg.start = start;
    cfg
}

/// The next entry, failing after [`WAIT`].
async fn next(src: &mut JournalSource) -> JournalEntry {
    match tokio::time::timeout(WAIT, src.next()).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("journal source failed: {e}")),
        Err(_) => panic!("no journal entry within {WAIT:?} (counters {:?})", src.counters()),
    }
}

/// `journalctl -f -n 0` starts at the end it sees when it opens the
/// journal, which a test cannot observe: write probes until one arrives.
/// Afterwards everything written arrives in order. Returns the probes seen.
async fn wait_until_live(w: &mut JournalWriter, src: &mut JournalSource) -> usize {
    let deadline = Instant::now() + WAIT;
    let mut written = 0;
    while Instant::now() < deadline {
        w.write(POSTFIX, "probe", format!("probe {written}")).unwrap();
        written += 1;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), src.next()).await {
            let e = r.unwrap();
            assert!(e.message.starts_with("probe "), "before any probe arrived: {e:?}");
            // Probes written after the one that arrived come next.
            for _ in 0..written - 1 - e.message[6..].parse::<usize>().unwrap() {
                assert!(next(src).await.message.starts_with("probe "));
            }
            return written;
        }
    }
    panic!("journalctl delivered none of {written} probes within {WAIT:?}");
}

/// Is `pid` gone (or only a zombie left)?
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

#[tokio::test]
async fn journal_follow_delivers_new_entries_of_the_configured_units() {
    let mut w = writer();
    w.write(POSTFIX, "postfix/smtpd", "written before the start").unwrap();
    w.sync().unwrap();
    let mut src = JournalSource::spawn(config(&w, &[POSTFIX, DOVECOT], Start::End), None).unwrap();
    wait_until_live(&mut w, &mut src).await;

    let t_a = w.write(POSTFIX, "postfix/smtpd", "connect from unknown[192.0.2.66]").unwrap();
    w.write("ssh.service", "sshd", "another unit: never delivered").unwrap();
    w.write(DOVECOT, "dovecot", "imap-login: Info: Disconnected").unwrap();
    let binary = b"bin\x1b\xff\nsecond line";
    w.write_entry(&Entry { unit: POSTFIX, ident: "postfix/smtpd", pid: 77, message: binary, realtime_us: None })
        .unwrap();
    w.write(POSTFIX, "postfix/smtpd", "z".repeat(5000)).unwrap(); // printed as null
    w.write(POSTFIX, "postfix/qmgr", "last").unwrap();

    let a = next(&mut src).await;
    assert_eq!(
        (a.message.as_str(), a.ident.as_deref(), a.unit.as_deref(), a.pid, a.realtime_us),
        ("connect from unknown[192.0.2.66]", Some("postfix/smtpd"), Some(POSTFIX), Some(4242), Some(t_a))
    );
    assert!(a.cursor.starts_with("s="), "{a:?}");
    let b = next(&mut src).await;
    assert_eq!((b.message.as_str(), b.unit.as_deref()), ("imap-login: Info: Disconnected", Some(DOVECOT)));
    let c = next(&mut src).await;
    assert_eq!(c.message, "bin\u{1b}\u{fffd}\nsecond line");
    assert_eq!(c.pid, Some(77));
    let d = next(&mut src).await;
    assert_eq!(d.message, "last");
    let n = src.counters();
    assert_eq!(n.null_messages, 1, "{n:?}");
    assert_eq!(n.bad_entries, 0, "{n:?}");

    // The child goes with the source.
    let pid = src.pid().unwrap();
    drop(src);
    let deadline = Instant::now() + WAIT;
    while !gone(pid) {
        assert!(Instant::now() < deadline, "journalctl {pid} outlived its source");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `n` numbered postfix entries; returns their realtimes.
fn write_numbered(w: &mut JournalWriter, from: usize, n: usize) -> Vec<i64> {
    (from..from + n).map(|i| w.write(POSTFIX, "postfix/smtpd", format!("entry {i}")).unwrap()).collect()
}

async fn expect_numbered(src: &mut JournalSource, from: usize, to: usize) -> Vec<JournalEntry> {
    let mut got = Vec::new();
    for i in from..to {
        let e = next(src).await;
        assert_eq!(e.message, format!("entry {i}"), "after {:?}", got.last().map(|e: &JournalEntry| &e.message));
        got.push(e);
    }
    got
}

#[tokio::test]
async fn journal_restart_from_a_cursor_delivers_exactly_what_follows() {
    let mut w = writer();
    write_numbered(&mut w, 0, 5);
    w.sync().unwrap();
    let mut src = JournalSource::spawn(config(&w, &[POSTFIX], Start::Beginning), None).unwrap();
    let first = expect_numbered(&mut src, 0, 5).await;
    // Consumed up to entry 2 when the agent stops.
    let stored = first[2].position();
    drop(src);

    write_numbered(&mut w, 5, 3);
    w.sync().unwrap();
    let mut src = JournalSource::spawn(config(&w, &[POSTFIX], Start::Beginning), Some(stored.clone())).unwrap();
    expect_numbered(&mut src, 3, 8).await;
    write_numbered(&mut w, 8, 2);
    expect_numbered(&mut src, 8, 10).await;
    assert_eq!(src.counters().cursor_fallbacks, 0);
    assert_eq!(src.counters().entries, 7);
    // Nothing more: a marker written now is the very next entry.
    w.write(POSTFIX, "x", "marker").unwrap();
    assert_eq!(next(&mut src).await.message, "marker");
}

#[tokio::test]
async fn journal_refused_cursor_falls_back_to_the_stored_time() {
    let mut w = writer();
    let times = write_numbered(&mut w, 0, 6);
    w.sync().unwrap();
    // A cursor journalctl cannot parse, stored with entry 2's time.
    let stored = JournalPosition { cursor: "not-a-cursor".into(), realtime_us: Some(times[2]) };
    let mut src = JournalSource::spawn(config(&w, &[POSTFIX], Start::Beginning), Some(stored)).unwrap();
    expect_numbered(&mut src, 3, 6).await;
    write_numbered(&mut w, 6, 1);
    expect_numbered(&mut src, 6, 7).await;
    let c = src.counters();
    assert_eq!(c.cursor_fallbacks, 1, "{c:?}");
    assert_eq!(c.before_position, 1, "entry 2 itself (at the stored time) is dropped: {c:?}");
    assert_eq!(c.entries, 4, "{c:?}");
}

#[tokio::test]
async fn journal_exit_is_an_error_with_journalctl_s_words() {
    let mut cfg = JournalConfig::new(vec![POSTFIX.into()]);
    cfg.directory = Some("/nonexistent/gk-journal".into());
    let mut src = JournalSource::spawn(cfg, None).unwrap();
    let err = tokio::time::timeout(WAIT, src.next()).await.expect("journalctl exits at once").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exited") && msg.contains("/nonexistent/gk-journal"), "{msg}");
}

fn append(path: &Path, data: &str) {
    OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(data.as_bytes()).unwrap();
}

/// Polls until idle, bounded.
fn drain(f: &mut FileFollower) -> Vec<Line> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        if f.poll(&mut out).unwrap() == Poll::Idle {
            return out;
        }
    }
    panic!("the follower never went idle");
}

#[test]
fn file_follow_through_rotation_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    append(&log, "before the start\n");
    let mut f = FileFollower::new(&log, None, Start::End);
    let mut got: Vec<String> = Vec::new();
    let mut take = |f: &mut FileFollower| got.extend(drain(f).into_iter().map(|l| l.text));
    // The first poll opens the file: `end` is where it ends then.
    take(&mut f);

    append(&log, "1 connect\n2 half");
    take(&mut f);
    // logrotate: rename, the writer finishes its line in the old file,
    // then writes to the new one.
    let rotated = dir.path().join("mail.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    append(&rotated, " finished\n3 old\n");
    append(&log, "4 new\n");
    take(&mut f);
    // copytruncate-style truncation mid-stream, then new lines.
    append(&log, "5 new\n");
    take(&mut f);
    OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    append(&log, "6 after truncation\n");
    take(&mut f);
    let pos = f.position().unwrap();
    let c = f.counters();
    drop(f);

    assert_eq!(got, ["1 connect", "2 half finished", "3 old", "4 new", "5 new", "6 after truncation"]);
    assert_eq!((c.rotations, c.truncations, c.lines), (1, 1, 6), "{c:?}");

    // A restart from the position continues without repeats.
    append(&log, "7 while down\n");
    let mut f = FileFollower::new(&log, Some(pos), Start::End);
    assert_eq!(drain(&mut f).into_iter().map(|l| l.text).collect::<Vec<_>>(), ["7 while down"]);
}

/// PR_SET_PDEATHSIG: journalctl dies with the thread that started it even
/// when its source is never dropped (as when the agent is killed).
#[test]
fn journalctl_dies_with_its_parent() {
    let mut w = writer();
    w.write(POSTFIX, "x", "one").unwrap();
    w.sync().unwrap();
    let cfg = config(&w, &[POSTFIX], Start::Beginning);
    let pid = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut src = JournalSource::spawn(cfg, None).unwrap();
            // Running: it has delivered the entry.
            assert_eq!(next(&mut src).await.message, "one");
            let pid = src.pid().unwrap();
            // No drop, so no kill_on_drop: only the death signal can end it.
            std::mem::forget(src);
            pid
        })
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while !gone(pid) {
        assert!(Instant::now() < deadline, "journalctl {pid} outlived the thread that started it");
        std::thread::sleep(Duration::from_millis(10));
    }
}
