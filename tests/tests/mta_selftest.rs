//! Self-test of the mail harness (root; Postfix and swaks installed by
//! `cargo xtask setup`): a real Postfix receiver takes mail from swaks over
//! IPv4 and IPv6; a real Postfix relay sending to [`RefusingSmtp`] logs the
//! refusal's text in its bounce line, and retries a deferred message at once
//! on `flush`; a stopped or dropped instance leaves no process and no
//! directory behind; a start that fails says why. With Dovecot: failed
//! IMAP and POP3 logins are logged with the client's `rip=`; Postfix
//! authenticates through Dovecot's SASL socket, refuses unknown local users
//! with `550 5.1.1` and bounces mail through its bounce sink with
//! `dsn=5.1.1, status=bounced`; a policy service defers at DATA, and a dead
//! one lets mail through.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use gatekeeper_tests::{
    dovecot::{self, imap_login, pop3_login, Dovecot, DovecotOptions},
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

// ---------------------------------------------------------------------------
// Dovecot, SASL, local recipients, bounce sink, policy service

fn require_dovecot() {
    require();
    dovecot::require_dovecot();
}

#[test]
fn dovecot_logs_failed_logins_with_the_client_address() {
    require_dovecot();
    let (client, srv) = joined(
        ("dvc", "vc", &["192.0.2.66/24", "192.0.2.67/24", "192.0.2.68/24", "2001:db8:5::66/64"]),
        ("dvs", "vs", &["192.0.2.25/24", "2001:db8:5::25/64"]),
    )
    .unwrap();
    let mut dv = Dovecot::start(
        &srv,
        DovecotOptions::new(&[ip("192.0.2.25"), ip("2001:db8:5::25")]).with_user("alice", "secret"),
    )
    .unwrap();
    let (imap, pop3) = (dv.imap_addrs()[0], dv.pop3_addrs()[0]);
    assert_eq!(imap, sa("192.0.2.25", 143));
    assert_eq!(dv.imap_addrs()[1], sa("2001:db8:5::25", 143));
    assert!(dv.log_path().starts_with(dv.dir()));

    // One address per attempt: no auth penalty between them.
    assert!(!imap_login(&client, ip("192.0.2.66"), imap, "alice", "wrong").unwrap());
    let line = dv.wait_for_log(&["imap-login: Info: Disconnected", "rip=192.0.2.66,"], WAIT).unwrap();
    assert!(line.contains("(auth failed, 1 attempts in ") && line.contains("user=<alice>"), "{line}");
    assert!(line.contains("lip=192.0.2.25") && line.contains("session=<"), "{line}");
    let auth = dv.wait_for_log(&["auth: Info: passwd-file(alice,192.0.2.66,<"], WAIT).unwrap();
    assert!(auth.ends_with("): Password mismatch"), "{auth}");

    assert!(imap_login(&client, ip("192.0.2.67"), imap, "alice", "secret").unwrap());
    let ok = dv.wait_for_log(&["imap-login: Info: Login: user=<alice>"], WAIT).unwrap();
    assert!(ok.contains("rip=192.0.2.67,"), "{ok}");

    assert!(!pop3_login(&client, ip("192.0.2.68"), pop3, "nosuchuser", "x").unwrap());
    let line = dv.wait_for_log(&["pop3-login: Info: Disconnected", "rip=192.0.2.68,"], WAIT).unwrap();
    assert!(line.contains("auth failed") && line.contains("user=<nosuchuser>"), "{line}");
    dv.wait_for_log(&["passwd-file(nosuchuser,192.0.2.68,<", "unknown user"], WAIT).unwrap();

    // IPv6: the address as Dovecot writes it.
    assert!(!imap_login(&client, ip("2001:db8:5::66"), dv.imap_addrs()[1], "alice", "wrong").unwrap());
    let line = dv.wait_for_log(&["imap-login: Info: Disconnected", "rip=2001:db8:5::66,"], WAIT).unwrap();
    assert!(line.contains("lip=2001:db8:5::25,"), "{line}");

    assert!(dv.dir().join("run/anvil-auth-penalty").exists(), "production settings keep the auth penalty");

    // Stop by run/master.pid: nothing of the instance is left.
    let (dir, pids) = (dv.dir().to_owned(), dv.pids());
    assert!(pids.contains(&dv.master_pid()), "{pids:?}");
    // Login and mail processes come and go: each one listed is in the
    // namespace or already gone.
    let in_ns = srv.pids();
    assert!(pids.iter().all(|&p| in_ns.contains(&p) || gone(p)), "instance {pids:?}, namespace {in_ns:?}");
    assert!(in_ns.contains(&dv.master_pid()), "{in_ns:?}");
    dv.stop().unwrap();
    assert!(pids.iter().all(|&p| gone(p)), "{pids:?}");
    assert!(srv.pids().is_empty(), "{:?}", srv.pids());
    drop(dv);
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn dovecot_without_auth_penalty_takes_many_failures_from_one_address() {
    require_dovecot();
    let (client, srv) = joined(("dvpc", "vc", &["192.0.2.66/24"]), ("dvps", "vs", &["192.0.2.25/24"])).unwrap();
    let dv = Dovecot::start(
        &srv,
        DovecotOptions::new(&[ip("192.0.2.25")]).with_user("alice", "secret").without_auth_penalty(),
    )
    .unwrap();
    // No penalty socket: the auth process tracks none.
    assert!(!dv.dir().join("run/anvil-auth-penalty").exists());
    assert!(dv.dir().join("run/anvil").exists());
    let (imap, pop3) = (dv.imap_addrs()[0], dv.pop3_addrs()[0]);
    for n in 1..=3 {
        assert!(!imap_login(&client, ip("192.0.2.66"), imap, "alice", "wrong").unwrap());
        assert!(!pop3_login(&client, ip("192.0.2.66"), pop3, "alice", "wrong").unwrap());
        let lines =
            dv.wait_for_log_count(&["passwd-file(alice,192.0.2.66,<", "Password mismatch"], 2 * n, WAIT).unwrap();
        assert_eq!(lines.len(), 2 * n, "{lines:?}");
    }
    assert!(imap_login(&client, ip("192.0.2.66"), imap, "alice", "secret").unwrap());
    dv.wait_for_log(&["imap-login: Info: Login: user=<alice>", "rip=192.0.2.66,"], WAIT).unwrap();
}

#[test]
fn postfix_authenticates_through_dovecot_and_refuses_unknown_users() {
    require_dovecot();
    let (client, srv) =
        joined(("sasc", "vc", &["192.0.2.66/24", "192.0.2.67/24"]), ("sass", "vs", &["192.0.2.25/24"])).unwrap();
    let dv =
        Dovecot::start(&srv, DovecotOptions::new(&[ip("192.0.2.25")]).with_user("alice", "secret").with_auth_socket())
            .unwrap();
    let socket = dv.auth_socket().unwrap().to_owned();
    let mut opts = PostfixOptions::receiver(&[ip("192.0.2.25")], "rx.test")
        .with_sasl_dovecot(&socket)
        .with_local_users("example.test", &["alice"])
        .with_bounce_sink(2525);
    // Only authenticated clients may send (the client is not in mynetworks).
    opts.mynetworks.retain(|n| n.addr().is_loopback());
    let pf = Postfix::start(&srv, opts).unwrap();
    let server = sa("192.0.2.25", 25);
    assert_eq!(pf.bounce_sink_addr(), Some(sa("192.0.2.25", 2525)));

    // Wrong password: 535, and the maillog names the client.
    let run = swaks(
        &client,
        SwaksArgs::new(server, "alice@example.test", "alice@example.test")
            .local(ip("192.0.2.66"))
            .auth("alice", "wrong"),
    )
    .unwrap();
    assert!(!run.success(), "{run}");
    run.expect_reply("AUTH", 535, "5.7.8").unwrap();
    let line = pf.wait_for_log("warning: unknown[192.0.2.66]: SASL PLAIN authentication failed", WAIT).unwrap();
    assert!(line.contains("sasl_username=alice"), "{line}");
    // Dovecot logs the same attempt, without a session id (an MTA's lookup).
    let auth = dv.wait_for_log(&["auth: Info: passwd-file(alice,192.0.2.66): Password mismatch"], WAIT).unwrap();
    assert!(!auth.contains("<"), "{auth}");

    // Right password: a known and an unknown local recipient.
    let run = swaks(
        &client,
        SwaksArgs::new(server, "alice@example.test", "")
            .rcpts(&["alice@example.test", "nobody@example.test"])
            .local(ip("192.0.2.67"))
            .auth("alice", "secret"),
    )
    .unwrap();
    assert!(run.success(), "{run}");
    run.expect_reply("AUTH", 235, "2.7.0").unwrap();
    let rcpts = run.replies_to("RCPT");
    assert_eq!(rcpts.len(), 2, "{run}");
    assert_eq!(rcpts[0].0, 250, "{run}");
    assert_eq!(rcpts[1].0, 550, "{run}");
    assert!(rcpts[1].1.contains("5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"), "{run}");
    let id = run.queue_id().unwrap_or_else(|| panic!("no queue id in\n{run}"));
    let reject =
        pf.wait_for_log(": reject: RCPT from unknown[192.0.2.67]: 550 5.1.1 <nobody@example.test>", WAIT).unwrap();
    assert!(reject.contains("User unknown in local recipient table"), "{reject}");
    // After the first accepted recipient the reject carries the queue id.
    assert!(reject.contains(&format!("{id}: reject:")), "{reject}");
    let client_line = pf.wait_for_log(&format!("{id}: client=unknown[192.0.2.67]"), WAIT).unwrap();
    assert!(client_line.contains("sasl_method=PLAIN, sasl_username=alice"), "{client_line}");
    let sent = pf.wait_for_log(&format!("{id}: to=<alice@example.test>"), WAIT).unwrap();
    assert!(sent.contains("status=sent"), "{sent}");

    // Unknown user first: NOQUEUE.
    let run = swaks(
        &client,
        SwaksArgs::new(server, "alice@example.test", "ghost@example.test")
            .local(ip("192.0.2.67"))
            .auth("alice", "secret"),
    )
    .unwrap();
    assert_eq!(run.code(), Some(24), "{run}");
    run.expect_reply("RCPT", 550, "5.1.1").unwrap();
    pf.wait_for_log("NOQUEUE: reject: RCPT from unknown[192.0.2.67]: 550 5.1.1 <ghost@example.test>", WAIT).unwrap();

    // The bounce domain: accepted here, bounced by the sink.
    let run = swaks(
        &client,
        SwaksArgs::new(server, "alice@example.test", "harvested@remote.test")
            .local(ip("192.0.2.67"))
            .auth("alice", "secret"),
    )
    .unwrap();
    assert!(run.success(), "{run}");
    let id = run.queue_id().unwrap_or_else(|| panic!("no queue id in\n{run}"));
    let bounced = pf.wait_for_log(&format!("{id}: to=<harvested@remote.test>"), WAIT).unwrap();
    assert!(bounced.contains("relay=192.0.2.25[192.0.2.25]:2525"), "{bounced}");
    assert!(bounced.contains("dsn=5.1.1, status=bounced"), "{bounced}");
    assert!(
        bounced.contains("said: 550 5.1.1 <harvested@remote.test>: Recipient address rejected: User unknown here"),
        "{bounced}"
    );
    // The sink's own reject line is tagged apart.
    let sink = pf.wait_for_log("<harvested@remote.test>: Recipient address rejected", WAIT).unwrap();
    assert!(sink.contains(&format!("{}/smtpd[", mta::BOUNCE_SINK_SYSLOG_NAME)), "{sink}");
    pf.wait_for_log(&format!("{id}: removed"), WAIT).unwrap();
    drop(pf);
    drop(dv);
}

/// A minimal policy server: answers `action=DEFER_IF_PERMIT 4.7.1 test` at
/// DATA and `DUNNO` otherwise; records each request's protocol_state.
struct PolicyStub {
    path: PathBuf,
    _dir: tempfile::TempDir,
    states: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyStub {
    fn spawn() -> PolicyStub {
        let dir = tempfile::Builder::new().prefix("gk-policy-").tempdir().unwrap();
        // smtpd runs as user postfix: it must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("policy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let states = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (states, stop) = (states.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (states, stop) = (states.clone(), stop.clone());
                            conns.push(std::thread::spawn(move || policy_conn(conn, &states, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        PolicyStub { path, _dir: dir, states, stop, thread: Some(thread) }
    }

    fn states(&self) -> Vec<String> {
        self.states.lock().unwrap().clone()
    }

    /// Stops serving; the socket file stays, so a connect is refused.
    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PolicyStub {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One policy connection: requests until EOF, at most 100, 1 s read timeout
/// so a stop is noticed.
fn policy_conn(conn: UnixStream, states: &Mutex<Vec<String>>, stop: &AtomicBool) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut state = String::new();
    let mut requests = 0;
    let mut line = String::new();
    while requests < 100 && !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("protocol_state=") {
            state = v.to_owned();
        }
        if l.is_empty() {
            requests += 1;
            let action = if state == "DATA" { "DEFER_IF_PERMIT 4.7.1 test" } else { "DUNNO" };
            states.lock().unwrap().push(std::mem::take(&mut state));
            if writer.write_all(format!("action={action}\n\n").as_bytes()).is_err() {
                return;
            }
        }
    }
}

#[test]
fn policy_service_defers_at_data_and_a_dead_one_lets_mail_through() {
    require();
    let (client, srv) = joined(("polc", "vc", &["192.0.2.66/24"]), ("pols", "vs", &["192.0.2.25/24"])).unwrap();
    let server = sa("192.0.2.25", 25);
    let send =
        || swaks(&client, SwaksArgs::new(server, "alice@sender.test", "bob@rx.test").local(ip("192.0.2.66"))).unwrap();

    let mut policy = PolicyStub::spawn();
    let pf = Postfix::start(&srv, PostfixOptions::receiver(&[ip("192.0.2.25")], "rx.test").with_policy(&policy.path))
        .unwrap();
    let run = send();
    assert_eq!(run.code(), Some(25), "{run}");
    run.expect_reply("RCPT", 250, "").unwrap();
    run.expect_reply("DATA", 450, "4.7.1 <DATA>: Data command rejected: test").unwrap();
    // The queue file exists since the accepted RCPT: the line carries its id.
    pf.wait_for_log(": reject: DATA from unknown[192.0.2.66]: 450 4.7.1 <DATA>: Data command rejected: test", WAIT)
        .unwrap();
    assert_eq!(policy.states(), ["RCPT", "DATA"]);
    drop(pf);

    // Nobody listens on the socket any more: DUNNO after one try, mail flows.
    let dead = policy.path.clone();
    policy.halt();
    let pf = Postfix::start(&srv, PostfixOptions::receiver(&[ip("192.0.2.25")], "rx.test").with_policy(&dead)).unwrap();
    let run = send();
    assert!(run.success(), "{run}");
    let id = run.queue_id().unwrap_or_else(|| panic!("no queue id in\n{run}"));
    pf.wait_for_log(&format!("{id}: to=<bob@rx.test>"), WAIT).unwrap();
    let warn = pf.wait_for_log("problem talking to server", WAIT).unwrap();
    assert!(warn.contains(&dead.display().to_string()), "{warn}");
    drop(pf);
    drop(policy);
}

#[test]
fn dovecot_failed_start_says_why_and_leaves_nothing() {
    require_dovecot();
    let ns = Netns::new("dvf").unwrap();
    let own = format!("{}{}-", dovecot::DIR_PREFIX, std::process::id());
    let mine = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(mta::TMP)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(&own))
            .collect()
    };
    let before = mine();
    // 192.0.2.77 is not configured in the namespace.
    let err = Dovecot::start(&ns, DovecotOptions::new(&[ip("192.0.2.77")]).with_user("a", "b")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bind(192.0.2.77, 143) failed: Cannot assign requested address"), "{msg}");
    assert!(ns.pids().is_empty(), "{:?}", ns.pids());
    // Other tests of this process may run instances: only new dirs of a
    // failed start would listen on 192.0.2.77.
    for n in mine().iter().filter(|n| !before.contains(n)) {
        let conf = Path::new(mta::TMP).join(n).join("dovecot.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        assert!(!text.contains("192.0.2.77"), "the failed start left {}", conf.display());
    }
    let err = Dovecot::start(&ns, DovecotOptions::new(&[ip("10.1.2.3")])).unwrap_err();
    assert!(format!("{err:#}").contains("neither a test address nor loopback"), "{err:#}");
}
