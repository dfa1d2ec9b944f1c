//! The mail stream with real mail software (root; Postfix, Dovecot and
//! swaks from `cargo xtask setup`): an "mx" namespace runs the agent on its
//! veth, a real Postfix (SMTP AUTH through Dovecot, the agent's policy
//! service in smtpd's restrictions, a local domain with a few users) and a
//! real Dovecot (IMAP); the agent follows both daemons' log files. A
//! "client" namespace guesses passwords, logs in, sends to unknown users
//! and sends up to its limit.
//!
//! Waits are bounded polls for a condition; nothing asserts how long
//! something took.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use gatekeeper_tests::{
    agentlab::Instance,
    dovecot::{imap_login, Dovecot, DovecotOptions},
    mta::{swaks, Postfix, PostfixOptions, SwaksArgs},
    netlab::{self, poll_until, tcp_connect, ConnectOutcome, Netns},
};
use serde_json::Value;

const MX_IF: &str = "gkmtmx";
const CL_IF: &str = "gkmtcl";
const SRV4: &str = "203.0.113.1";
const MX_ADDRS: [&str; 1] = ["203.0.113.1/24"];
/// Guesses passwords over SMTP AUTH and IMAP.
const GUESSER: &str = "203.0.113.9";
/// Logs in with the right password, over and over.
const GOOD: &str = "203.0.113.10";
/// Alice's usual address (suspended with her), and another one of hers.
const ALICE_AT: &str = "203.0.113.20";
const ALICE_ELSEWHERE: &str = "203.0.113.21";
/// Senders of the limit tests.
const SENDER: &str = "203.0.113.30";
const CLIENT_ADDRS: [&str; 5] =
    ["203.0.113.9/24", "203.0.113.10/24", "203.0.113.20/24", "203.0.113.21/24", "203.0.113.30/24"];
const DOMAIN: &str = "example.test";
const PASSWORD: &str = "right-horse";
const CONTACT: &str = "abuse@example.test";

const WAIT: Duration = Duration::from_secs(20);
const CONNECT: Duration = Duration::from_millis(700);

/// Fields drop in order: the daemons first, then the agent and the
/// namespaces.
struct Lab {
    postfix: Postfix,
    _dovecot: Dovecot,
    gk: Instance,
    cl: Netns,
    _sockdir: tempfile::TempDir,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn smtp() -> SocketAddr {
    SocketAddr::new(ip(SRV4), 25)
}

fn lab(name: &str, extra_config: &str) -> Lab {
    netlab::require_root();
    let (mx, cl) =
        netlab::joined((&format!("gkmt{name}mx"), MX_IF, &MX_ADDRS), (&format!("gkmt{name}cl"), CL_IF, &CLIENT_ADDRS))
            .expect("namespaces");
    // Failures answer at once (Dovecot's auth penalty would slow every
    // further attempt from one address by up to 15 s); the lines are the same.
    let mut opts = DovecotOptions::new(&[ip(SRV4)]).with_auth_socket().without_auth_penalty();
    for u in ["alice", "bob", "carol", "lists", "good"] {
        opts = opts.with_user(u, PASSWORD);
    }
    let dovecot = Dovecot::start(&mx, opts).expect("dovecot");
    let mut gk = Instance::new(mx, Some(MX_IF), "gk-mailmta-", "");
    // smtpd runs as user postfix: the socket's directory must let it in.
    let sockdir = tempfile::Builder::new().prefix("gk-mailmta-pol-").tempdir().expect("tempdir");
    std::fs::set_permissions(sockdir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let policy = sockdir.path().join("policy.sock");
    // The agent creates the policy socket; Postfix only connects when mail comes.
    let popts = PostfixOptions::receiver(&[ip(SRV4)], "other.test")
        .with_sasl_dovecot(dovecot.auth_socket().expect("auth socket"))
        .with_policy(&policy)
        .with_local_users(DOMAIN, &["postmaster", "alice", "bob", "carol", "lists"]);
    let postfix = Postfix::start(&gk.ns, popts).expect("postfix");
    gk.write_config(&format!(
        r#"
[dns]
enabled = false

[[logs]]
kind = "postfix"
source = "file"
file = "{maillog}"
start = "beginning"

[[logs]]
kind = "dovecot"
source = "file"
file = "{dovelog}"
start = "beginning"

[mail_policy]
socket = "{policy}"
owner = "postfix"
mode = "0660"
contact = "{CONTACT}"

[abuse]
leak = "6/min"
{extra_config}
"#,
        maillog = postfix.dir().join("maillog").display(),
        dovelog = dovecot.log_path().display(),
        policy = policy.display(),
    ));
    gk.start(&[]);
    Lab { postfix, _dovecot: dovecot, gk, cl, _sockdir: sockdir }
}

fn abuse_row(gk: &Instance, source: &str) -> Option<Value> {
    let rows = gk.json(&["abuse", "list", "--json"]);
    rows.as_array().expect("a list").iter().find(|r| r["source"] == source).cloned()
}

fn connect(cl: &Netns, src: &str, port: u16) -> ConnectOutcome {
    tcp_connect(cl, ip(src), SocketAddr::new(ip(SRV4), port), CONNECT)
}

fn send(cl: &Netns, src: &str, user: &str, rcpts: &[&str]) -> gatekeeper_tests::mta::SwaksRun {
    let from = format!("{user}@{DOMAIN}");
    let args = SwaksArgs::new(smtp(), &from, rcpts[0]).rcpts(rcpts).local(ip(src)).auth_mech("PLAIN", user, PASSWORD);
    swaks(cl, args).expect("swaks")
}

#[test]
fn failed_logins_over_smtp_auth_and_imap_ban_the_guesser_and_never_the_good_client() {
    let l = lab("a", "");
    // A good client: right passwords, many times.
    for _ in 0..4 {
        assert!(imap_login(&l.cl, ip(GOOD), SocketAddr::new(ip(SRV4), 143), "good", PASSWORD).expect("imap"));
        let run = send(&l.cl, GOOD, "good", &["alice@example.test"]);
        assert!(run.transcript.contains("250"), "{}", run.transcript);
    }
    // The guesser: 4 SMTP AUTH failures (4 x 15 + connections) ...
    for n in 0..4 {
        let run = swaks(
            &l.cl,
            SwaksArgs::new(smtp(), "x@example.test", "alice@example.test").local(ip(GUESSER)).auth_mech(
                "LOGIN",
                "alice",
                &format!("wrong{n}"),
            ),
        )
        .expect("swaks");
        assert!(run.transcript.contains("535"), "a wrong password is refused: {}", run.transcript);
    }
    let ok = poll_until(WAIT, || abuse_row(&l.gk, GUESSER).is_some_and(|r| r["failures"] == 4));
    assert!(ok, "4 SMTP AUTH failures counted once each: {:?}\nlog:\n{}", abuse_row(&l.gk, GUESSER), l.gk.log());
    // ... then IMAP failures until the score is over 100.
    let imap = SocketAddr::new(ip(SRV4), 143);
    for _ in 0..3 {
        if connect(&l.cl, GUESSER, 143) != ConnectOutcome::Connected {
            break;
        }
        let _ = imap_login(&l.cl, ip(GUESSER), imap, "bob", "nope");
    }
    let ok = poll_until(WAIT, || abuse_row(&l.gk, GUESSER).is_some_and(|r| r["banned_until"].is_number()));
    assert!(ok, "banned: {:?}\nlog:\n{}", abuse_row(&l.gk, GUESSER), l.gk.log());
    let row = abuse_row(&l.gk, GUESSER).unwrap();
    assert_eq!(row["reason"], "auth-abuse", "{row}");
    assert!(row["failures"].as_u64().unwrap() >= 7, "weight 15: 7 failures are needed: {row}");
    assert_eq!(connect(&l.cl, GUESSER, 143), ConnectOutcome::TimedOut, "banned on IMAP");
    assert_eq!(connect(&l.cl, GUESSER, 25), ConnectOutcome::TimedOut, "banned on SMTP");
    let good = abuse_row(&l.gk, GOOD);
    assert!(good.as_ref().is_none_or(|r| r["failures"] == 0 && r["banned_until"].is_null()), "{good:?}");
    assert_eq!(connect(&l.cl, GOOD, 143), ConnectOutcome::Connected, "the good client is never banned");
    assert_eq!(connect(&l.cl, GOOD, 25), ConnectOutcome::Connected);
}

#[test]
fn an_account_sending_to_eleven_unknown_users_is_suspended_until_lifted() {
    let l = lab("b", "[suspend]\nthreshold = 10\naddress_block = \"1h\"\n");
    let unknown: Vec<String> = (0..11).map(|i| format!("nobody{i}@{DOMAIN}")).collect();
    // A peer MTA (no account, outside the customer ranges, of which there
    // are none here) sending to the same unknown users is never suspended.
    for chunk in unknown.chunks(4) {
        let rcpts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let args = SwaksArgs::new(smtp(), "peer@example.org", rcpts[0]).rcpts(&rcpts).local(ip(SENDER));
        let run = swaks(&l.cl, args).expect("swaks");
        assert!(run.transcript.contains("550 5.1.1"), "{}", run.transcript);
    }
    for chunk in unknown.chunks(4) {
        let rcpts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let run = send(&l.cl, ALICE_AT, "alice", &rcpts);
        assert!(run.transcript.contains("550 5.1.1"), "unknown users are refused by Postfix: {}", run.transcript);
    }
    let suspended = || {
        let v = l.gk.json(&["suspend", "list", "--json"]);
        v.as_array().unwrap().iter().find(|s| s["subject"] == "account:alice").cloned()
    };
    let ok = poll_until(WAIT, || suspended().is_some());
    assert!(ok, "alice is suspended\nmaillog:\n{}\nlog:\n{}", l.postfix.maillog(), l.gk.log());
    let all = l.gk.json(&["suspend", "list", "--json"]);
    assert!(!all.to_string().contains(SENDER), "a peer's address is not suspended: {all}");
    assert_eq!(connect(&l.cl, SENDER, 25), ConnectOutcome::Connected, "nor blocked");
    let s = suspended().unwrap();
    assert!(s["count"].as_u64().unwrap() > 10, "{s}");
    assert_eq!(s["address"], ALICE_AT, "{s}");
    assert!(
        s["evidence"].to_string().contains(DOMAIN) && !s["evidence"].to_string().contains("nobody"),
        "redacted to domains: {s}"
    );
    // Her address is refused at the connection; the account through the
    // policy service, from anywhere.
    let ok = poll_until(WAIT, || connect(&l.cl, ALICE_AT, 25) == ConnectOutcome::TimedOut);
    assert!(ok, "her address is blocked\nlog:\n{}", l.gk.log());
    let run = send(&l.cl, ALICE_ELSEWHERE, "alice", &["bob@example.test"]);
    assert!(
        run.transcript.contains("5.7.1")
            && run.transcript.contains("account suspended")
            && run.transcript.contains(CONTACT),
        "the policy service refuses the account: {}",
        run.transcript
    );
    // Lifted.
    let out = l.gk.ok(&["suspend", "del", "alice"]);
    assert!(out.contains("lifted"), "{out}");
    let ok = poll_until(WAIT, || connect(&l.cl, ALICE_AT, 25) == ConnectOutcome::Connected);
    assert!(ok, "her address connects again");
    let run = send(&l.cl, ALICE_AT, "alice", &["bob@example.test"]);
    assert!(!run.transcript.contains("account suspended"), "{}", run.transcript);
    assert!(run.success(), "she sends again: {}", run.transcript);
}

#[test]
fn sending_limits_defer_over_the_limit_and_spare_raised_and_exempt_accounts() {
    let l = lab("c", "[smarthost]\nmessages = [\"3/hour\"]\nexempt_accounts = [\"lists\"]\n");
    for n in 0..3 {
        let run = send(&l.cl, SENDER, "bob", &["alice@example.test"]);
        assert!(run.success(), "message {n} within the limit: {}", run.transcript);
    }
    let run = send(&l.cl, SENDER, "bob", &["alice@example.test"]);
    assert!(
        run.transcript.contains("450 4.7.1")
            && run.transcript.contains("sending limit reached")
            && run.transcript.contains(CONTACT),
        "the 4th is deferred at DATA with the reason: {}",
        run.transcript
    );
    l.gk.ok(&["limit", "set", "carol", "none"]);
    for _ in 0..5 {
        assert!(send(&l.cl, SENDER, "carol", &["alice@example.test"]).success(), "carol has no limit");
        assert!(send(&l.cl, SENDER, "lists", &["alice@example.test"]).success(), "lists is exempt");
    }
    let rows = l.gk.json(&["limit", "list", "--json"]);
    let bob = rows.as_array().unwrap().iter().find(|r| r["subject"] == "account:bob").cloned().expect("bob listed");
    assert_eq!(bob["messages_hour"], 3, "{bob}");
    // Counters survive a restart.
    let mut gk = l.gk;
    let mut agent = gk.agent.take().expect("running");
    agent.signal(nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(agent.wait_timeout(WAIT).expect("wait").is_some(), "the agent exits on SIGTERM");
    gk.start(&[]);
    let run = send(&l.cl, SENDER, "bob", &["alice@example.test"]);
    assert!(run.transcript.contains("450 4.7.1"), "still over after a restart: {}", run.transcript);
}
