//! Judging what sources do, end to end: an agent in an "mx" namespace
//! follows mail logs (a file the test writes with our own lines, and a real
//! journal directory written by systemd-journal-remote), scores each
//! source, and bans it on the limited ports (25 and 143 here) once failed
//! logins push its score over the threshold. Restarts and rotations count
//! every line exactly once.
//!
//! Waits are bounded polls for a condition; nothing asserts how long
//! something took.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime},
};

use gatekeeper_tests::{
    agentlab::Instance,
    netlab::{self, poll_until, tcp_connect, ConnectOutcome, Netns, TcpListenerGuard},
};
use serde_json::Value;

const MX_IF: &str = "gkmsmx";
const CL_IF: &str = "gkmscl";
const SRV4: &str = "203.0.113.1";
const MX_ADDRS: [&str; 1] = ["203.0.113.1/24"];
/// Guesses passwords.
const GUESSER: &str = "203.0.113.9";
/// Logs in fine, often.
const GOOD: &str = "203.0.113.10";
/// Named inside a guesser's user name: must never be scored.
const FRAMED: &str = "203.0.113.77";
const CLIENT_ADDRS: [&str; 3] = ["203.0.113.9/24", "203.0.113.10/24", "203.0.113.77/24"];

const WAIT: Duration = Duration::from_secs(15);
const CONNECT: Duration = Duration::from_millis(700);

/// An RFC 3339 time stamp of now, as rsyslog writes it.
fn now_stamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string().replace('Z', "+00:00")
}

fn sasl_failure(client: &str, user: &str) -> String {
    format!(
        "{} mx postfix/smtpd[4242]: warning: unknown[{client}]: SASL LOGIN authentication failed: (reason unavailable), sasl_username={user}\n",
        now_stamp()
    )
}

fn connect_line(client: &str) -> String {
    format!("{} mx postfix/smtpd[4242]: connect from unknown[{client}]\n", now_stamp())
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the log");
    f.write_all(text.as_bytes()).expect("append to the log");
}

fn mx_config(log: &Path) -> String {
    format!(
        r#"
[dns]
enabled = false

[[logs]]
kind = "postfix"
source = "file"
file = "{}"
start = "beginning"

[abuse]
auth_failure_weight = 15
threshold = 100
leak = "6/min"
"#,
        log.display()
    )
}

/// The abuse row of `source` (`abuse list --json`), if it has one.
fn abuse_row(gk: &Instance, source: &str) -> Option<Value> {
    let rows = gk.json(&["abuse", "list", "--json"]);
    rows.as_array().expect("a list").iter().find(|r| r["source"] == source).cloned()
}

fn failures(gk: &Instance, source: &str) -> u64 {
    abuse_row(gk, source).map_or(0, |r| r["failures"].as_u64().unwrap_or(0))
}

fn wait_failures(gk: &Instance, source: &str, n: u64) {
    let ok = poll_until(WAIT, || failures(gk, source) >= n);
    assert!(ok, "{source}: {} failures counted, expected {n}\nlog:\n{}", failures(gk, source), gk.log());
    assert_eq!(failures(gk, source), n, "{source}: counted more than written\nlog:\n{}", gk.log());
}

fn connect(cl: &Netns, src: &str, port: u16) -> ConnectOutcome {
    let dst = SocketAddr::new(SRV4.parse().unwrap(), port);
    tcp_connect(cl, src.parse::<IpAddr>().unwrap(), dst, CONNECT)
}

#[test]
fn failed_logins_in_a_followed_file_ban_on_the_limited_ports_and_count_once_across_restart_and_rotation() {
    netlab::require_root();
    let (mx, cl) = netlab::joined(("gkmsmx", MX_IF, &MX_ADDRS), ("gkmscl", CL_IF, &CLIENT_ADDRS)).expect("namespaces");
    let smtp = TcpListenerGuard::spawn(&mx, SocketAddr::new(SRV4.parse().unwrap(), 25)).expect("listener 25");
    let imap = TcpListenerGuard::spawn(&mx, SocketAddr::new(SRV4.parse().unwrap(), 143)).expect("listener 143");
    let mut gk = Instance::new(mx, Some(MX_IF), "gk-mailstream-", "");
    let log = gk.dir().join("maillog");
    gk.write_config(&mx_config(&log));
    // Lines written before the first start are read (start = "beginning").
    for _ in 0..2 {
        append(&log, &connect_line(GUESSER));
        append(&log, &sasl_failure(GUESSER, "admin"));
    }
    // A guesser naming another address in its user name scores itself.
    append(&log, &sasl_failure(GUESSER, &format!("x]: unknown[{FRAMED}]")));
    for _ in 0..5 {
        append(&log, &connect_line(GOOD));
    }
    gk.start(&[]);
    wait_failures(&gk, GUESSER, 3);
    assert!(abuse_row(&gk, FRAMED).is_none(), "an address inside a user name was scored: {:?}", abuse_row(&gk, FRAMED));
    assert_eq!(connect(&cl, GUESSER, 143), ConnectOutcome::Connected, "below the threshold it connects");

    // Killed mid-stream: what was committed is not read again, what was
    // written while it was down is read once.
    gk.kill_agent();
    append(&log, &sasl_failure(GUESSER, "root"));
    append(&log, &sasl_failure(GUESSER, "root"));
    gk.start(&[]);
    wait_failures(&gk, GUESSER, 5);

    // Rotation: the old file is renamed, a new one appears.
    std::fs::rename(&log, gk.dir().join("maillog.1")).expect("rotate");
    append(&gk.dir().join("maillog.1"), &sasl_failure(GUESSER, "test"));
    append(&log, &sasl_failure(GUESSER, "guest"));
    wait_failures(&gk, GUESSER, 7);

    // 7 failures x 15 + connections > 100: banned on every limited port.
    let row = abuse_row(&gk, GUESSER).expect("scored");
    assert!(row["banned_until"].is_number(), "banned: {row}");
    assert_eq!(row["reason"], "auth-abuse", "{row}");
    let ok = poll_until(WAIT, || connect(&cl, GUESSER, 143) == ConnectOutcome::TimedOut);
    assert!(ok, "the ban reaches the datapath on 143\nlog:\n{}", gk.log());
    assert_eq!(connect(&cl, GUESSER, 25), ConnectOutcome::TimedOut, "and on 25");
    assert_eq!(connect(&cl, GOOD, 143), ConnectOutcome::Connected, "a source that only connects is not banned");
    assert_eq!(connect(&cl, GOOD, 25), ConnectOutcome::Connected);
    let check = gk.json(&["check", GUESSER, "--json"]);
    assert_eq!(check["abuse"]["failures"], 7, "check shows the score: {check}");
    let bans = gk.json(&["ban", "list", "--json"]);
    assert!(bans.to_string().contains("auth-abuse"), "the ban says why: {bans}");

    // Forgotten: score and ban go.
    let out = gk.ok(&["abuse", "forget", GUESSER]);
    assert!(out.contains("lifted its abuse ban"), "{out}");
    assert!(abuse_row(&gk, GUESSER).is_none());
    let ok = poll_until(WAIT, || connect(&cl, GUESSER, 143) == ConnectOutcome::Connected);
    assert!(ok, "forgotten, it connects again");

    // Banned again; the operator lifts the ban with `ban del`: the source
    // starts afresh (its next lines count at once).
    for _ in 0..7 {
        append(&log, &sasl_failure(GUESSER, "again"));
    }
    let ok = poll_until(WAIT, || connect(&cl, GUESSER, 25) == ConnectOutcome::TimedOut);
    assert!(ok, "banned again\nlog:\n{}", gk.log());
    gk.ok(&["ban", "del", GUESSER]);
    assert_eq!(connect(&cl, GUESSER, 25), ConnectOutcome::Connected, "ban del lifts it");
    assert!(abuse_row(&gk, GUESSER).is_none(), "and its score: {:?}", abuse_row(&gk, GUESSER));
    append(&log, &sasl_failure(GUESSER, "once"));
    wait_failures(&gk, GUESSER, 1);
    drop((smtp, imap));
}

/// A Dovecot login line without a session id: its attempts add up (with a
/// session they would be deduplicated, which would hide a line read twice).
fn dovecot_failure(client: &str, attempts: u32) -> String {
    format!(
        "imap-login: Disconnected: Connection closed (auth failed, {attempts} attempts in 9 secs): user=<bob>, method=PLAIN, rip={client}, lip={SRV4}"
    )
}

#[test]
fn a_real_journal_is_followed_by_unit_and_resumed_at_its_cursor() {
    netlab::require_root();
    gatekeeper_tests::journal::require_journal_remote().expect("systemd-journal-remote (cargo xtask setup)");
    let mut journal = gatekeeper_tests::journal::JournalWriter::start().expect("journal writer");
    let (mx, _cl) =
        netlab::joined(("gkmjmx", "gkmjmx", &MX_ADDRS), ("gkmjcl", "gkmjcl", &CLIENT_ADDRS)).expect("namespaces");
    let mut gk = Instance::new(mx, Some("gkmjmx"), "gk-mailjournal-", "");
    gk.write_config(&format!(
        r#"
[dns]
enabled = false

[[logs]]
kind = "dovecot"
source = "journal"
directory = "{}"
unit = ["dovecot.service"]
start = "beginning"
"#,
        journal.dir().display()
    ));
    // 2 failed logins; the same line from another unit
    // (anyone can log as "dovecot" with logger(1)) is not read.
    journal.write("dovecot.service", "dovecot", dovecot_failure(GUESSER, 2)).unwrap();
    journal.write("user@1000.service", "dovecot", dovecot_failure(GUESSER, 3)).unwrap();
    journal.sync().unwrap();
    gk.start(&[]);
    wait_failures(&gk, GUESSER, 2);
    // Appended while following.
    journal.write("dovecot.service", "dovecot", dovecot_failure(GUESSER, 1)).unwrap();
    wait_failures(&gk, GUESSER, 3);
    // Killed; entries written meanwhile are read once after the restart,
    // the ones before are not read again.
    gk.kill_agent();
    journal.write("dovecot.service", "dovecot", dovecot_failure(GUESSER, 1)).unwrap();
    journal.sync().unwrap();
    gk.start(&[]);
    wait_failures(&gk, GUESSER, 4);
    let status = gk.status();
    assert!(status.to_string().contains("dovecot:journal"), "status counts the source's lines: {status}");
}
