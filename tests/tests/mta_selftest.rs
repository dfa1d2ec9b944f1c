//! Self-test of the mail harness (root; Postfix and swaks installed by
//! `cargo xtask setup`): a real Postfix receiver takes mail from swaks over
//! IPv4 and IPv6; a real Postfix relay sending to [`RefusingSmtp`] logs the
//! refusal's text in its bounce line, and retries a deferred message at once
//! on `flush`; a stopped or dropped instance leaves no process and no
//! directory behind; a start that fails says why.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use gatekeeper_tests::{
    mta::{self, swaks, Postfix, PostfixOptions, RefusingSmtp, SwaksArgs},
    netlab::{self, joined, Netns},
};

/// Generous: a delivery takes milliseconds, a loaded CI machine longer.
const WAIT: Duration = Duration::from_secs(30);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip_: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_), port)
}

fn require() {
    netlab::require_root();
    mta::require_mta();
}

/// Is `pid` gone (or only a zombie left)?
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

#[test]
fn receiver_takes_mail_from_swaks_v4_and_v6() {
    require();
    let (client, mx) = joined(
        ("mtac", "vc", &["192.0.2.2/24", "2001:db8:2::2/64"]),
        ("mtam", "vm", &["192.0.2.1/24", "2001:db8:2::1/64"]),
    )
    .unwrap();
    let pf = Postfix::start(&mx, PostfixOptions::receiver(&[ip("192.0.2.1"), ip("2001:db8:2::1")], "rx.test")).unwrap();

    for (server, local, to) in
        [("192.0.2.1", "192.0.2.2", "bob@rx.test"), ("2001:db8:2::1", "2001:db8:2::2", "carol@rx.test")]
    {
        let run = swaks(
            &client,
            SwaksArgs::new(sa(server, 25), "alice@sender.test", to).local(ip(local)).helo("client.sender.test"),
        )
        .unwrap();
        assert!(run.success(), "{run}");
        assert_eq!(run.reply_to("BANNER").map(|r| r.0), Some(220), "{run}");
        assert_eq!(run.reply_to("RCPT").map(|r| r.0), Some(250), "{run}");
        assert!(run.error_replies().is_empty(), "{run}");
        let id = run.queue_id().unwrap_or_else(|| panic!("no queue id in\n{run}"));
        let line = pf.wait_for_log(&format!("{id}: to=<{to}>"), WAIT).unwrap();
        assert!(line.contains("relay=virtual") && line.contains("status=sent"), "{line}");
        // The client's address as Postfix saw it: the source swaks was given.
        pf.wait_for_log(&format!("{id}: client=unknown[{local}]"), WAIT).unwrap();
    }
    let mail = pf.mailbox();
    assert_eq!(mail.len(), 2, "{mail:?}");
    assert!(mail.iter().any(|m| m.contains("To: bob@rx.test")), "{mail:?}");
    assert!(mail.iter().any(|m| m.contains("To: carol@rx.test")), "{mail:?}");

    // A recipient of another domain from a client outside mynetworks: no relaying.
    let mut opts = PostfixOptions::receiver(&[ip("192.0.2.1")], "rx.test");
    opts.mynetworks.clear();
    drop(pf);
    let pf = Postfix::start(&mx, opts).unwrap();
    let run = swaks(
        &client,
        SwaksArgs::new(sa("192.0.2.1", 25), "alice@sender.test", "x@elsewhere.test").local(ip("192.0.2.2")),
    )
    .unwrap();
    assert_eq!(run.code(), Some(24), "{run}");
    let (code, text) = run.reply_to("RCPT").unwrap();
    assert_eq!(code, 454, "{run}");
    assert!(text.contains("Relay access denied"), "{run}");
    drop(pf);
}

#[test]
fn relay_logs_the_refusal_text_and_flush_retries_a_deferral() {
    require();
    let (snd, dst) = joined(
        ("mtas", "vs", &["198.51.100.2/24", "2001:db8:3::2/64"]),
        ("mtad", "vd", &["198.51.100.3/24", "2001:db8:3::3/64"]),
    )
    .unwrap();
    let refuse4 = RefusingSmtp::spawn(&dst, sa("198.51.100.3", 25), RefusingSmtp::TEST_REPLY).unwrap();
    let refuse6 = RefusingSmtp::spawn(&dst, sa("2001:db8:3::3", 25), RefusingSmtp::TEST_REPLY).unwrap();
    let later = RefusingSmtp::spawn(&dst, sa("198.51.100.3", 2525), "450 4.7.1 test deferral text").unwrap();
    let opts = PostfixOptions::relay(
        &[ip("198.51.100.2"), ip("2001:db8:3::2")],
        &[("refused.test", refuse4.addr()), ("refused6.test", refuse6.addr()), ("later.test", later.addr())],
    );
    let pf = Postfix::start(&snd, opts).unwrap();

    // Mail injected through the relay's own smtpd (the client is in mynetworks).
    let inject = |to: &str| {
        let run =
            swaks(&snd, SwaksArgs::new(sa("198.51.100.2", 25), "alice@sender.test", to).local(ip("198.51.100.2")))
                .unwrap();
        assert!(run.success(), "{run}");
        run.queue_id().unwrap_or_else(|| panic!("no queue id in\n{run}"))
    };

    for (n, (to, host)) in
        [("bob@refused.test", "198.51.100.3"), ("bob@refused6.test", "2001:db8:3::3")].into_iter().enumerate()
    {
        let id = inject(to);
        let line = pf.wait_for_log(&format!("{id}: to=<{to}>"), WAIT).unwrap();
        let want = format!(
            "status=bounced (host {host}[{host}] said: 550 5.7.1 test refusal text (in reply to RCPT TO command))"
        );
        assert!(line.contains(&want), "want {want:?} in\n{line}");
        // The bounce to alice@sender.test went to discard:, nowhere.
        let bounces = pf.wait_for_log_count("to=<alice@sender.test>, relay=none", n + 1, WAIT).unwrap();
        assert!(bounces.iter().all(|l| l.contains("status=sent (not a test destination)")), "{bounces:?}");
    }
    assert!(refuse4.commands().contains(&"RCPT TO:<bob@refused.test>".to_owned()), "{:?}", refuse4.commands());
    assert!(refuse6.commands().contains(&"RCPT TO:<bob@refused6.test>".to_owned()), "{:?}", refuse6.commands());

    // 4xx: deferred, and retried at once on flush instead of after minutes.
    let id = inject("carol@later.test");
    let needle = format!("{id}: to=<carol@later.test>");
    let first = pf.wait_for_log(&needle, WAIT).unwrap();
    let want = "status=deferred (host 198.51.100.3[198.51.100.3] said: 450 4.7.1 test deferral text";
    assert!(first.contains(want), "{first}");
    assert!(later.wait_for_sessions(1, WAIT));
    pf.flush().unwrap();
    let lines = pf.wait_for_log_count(&needle, 2, WAIT).unwrap();
    assert!(lines.iter().all(|l| l.contains(want)), "{lines:?}");
    assert!(later.wait_for_sessions(2, WAIT), "sessions: {}", later.sessions());
}

#[test]
fn stop_and_drop_leave_nothing_behind() {
    require();
    let ns = Netns::new("mtax").unwrap();
    let opts = PostfixOptions::receiver(&[ip("127.0.0.1")], "rx.test");

    // stop(): no process of the instance is left; the maillog stays readable until drop.
    let mut pf = Postfix::start(&ns, opts.clone()).unwrap();
    let (dir, pids) = (pf.dir().to_owned(), pf.pids());
    assert!(dir.starts_with("/tmp") && dir.is_dir(), "{}", dir.display());
    assert!(pids.contains(&pf.master_pid()), "master {} not among {pids:?}", pf.master_pid());
    assert!(pids.len() >= 2, "master and at least qmgr/pickup: {pids:?}");
    let in_ns = ns.pids();
    assert!(pids.iter().all(|p| in_ns.contains(p)), "instance {pids:?}, namespace {in_ns:?}");
    pf.stop().unwrap();
    assert!(pf.pids().is_empty(), "{:?}", pf.pids());
    assert!(pids.iter().all(|&p| gone(p)), "{pids:?}");
    assert!(ns.pids().is_empty(), "{:?}", ns.pids());
    assert!(pf.maillog().contains("stopping the Postfix mail system"), "{}", pf.maillog());
    pf.stop().unwrap();
    drop(pf);
    assert!(!dir.exists(), "{} still exists", dir.display());

    // Drop without stop: the same.
    let pf = Postfix::start(&ns, opts).unwrap();
    let (dir, pids) = (pf.dir().to_owned(), pf.pids());
    assert!(!pids.is_empty());
    drop(pf);
    assert!(pids.iter().all(|&p| gone(p)), "{pids:?}");
    assert!(ns.pids().is_empty(), "{:?}", ns.pids());
    assert!(!Path::new(&dir).exists(), "{} still exists", dir.display());
}

#[test]
fn failed_start_says_why_and_leaves_nothing() {
    require();
    let ns = Netns::new("mtaf").unwrap();
    let before: Vec<_> = std::fs::read_dir(mta::TMP).unwrap().flatten().map(|e| e.file_name()).collect();
    // 192.0.2.77 is not configured in the namespace.
    let err = Postfix::start(&ns, PostfixOptions::receiver(&[ip("192.0.2.77")], "rx.test")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no local interface found for 192.0.2.77"), "{msg}");
    assert!(ns.pids().is_empty(), "{:?}", ns.pids());
    let own = format!("{}{}-", mta::DIR_PREFIX, std::process::id());
    let left: Vec<_> = std::fs::read_dir(mta::TMP)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !before.contains(n) && n.to_string_lossy().starts_with(&own))
        .collect();
    // Other tests of this process may have live instances: only a dir of
    // this failed start would be one that no running instance owns.
    for n in &left {
        let main_cf = Path::new(mta::TMP).join(n).join("conf/main.cf");
        let text = std::fs::read_to_string(&main_cf).unwrap_or_default();
        assert!(!text.contains("192.0.2.77"), "the failed start left {}", main_cf.display());
    }
    // Options outside the test ranges never get as far as Postfix.
    let err = Postfix::start(&ns, PostfixOptions::receiver(&[ip("10.1.2.3")], "rx.test")).unwrap_err();
    assert!(format!("{err:#}").contains("neither a test address nor loopback"), "{err:#}");
}
