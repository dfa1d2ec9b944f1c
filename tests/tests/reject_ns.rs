//! Reject with a reason, end to end with real mail software (root; nsd,
//! Postfix and swaks from `cargo xtask setup`): an "mx" namespace runs
//! `gatekeeper run` on its veth, nsd on 127.0.0.1 for reverse DNS, and a
//! real Postfix receiving on port 25; a "client" namespace sends from
//! TEST-NET sources whose reverse DNS is good, missing or dynamic, with
//! swaks and with a second real Postfix acting as a sending MTA.
//!
//! Every agent runs with `first_syn = "hold"`: a source's first SYN waits
//! for its verdict, so a refused source's first connection already meets
//! the rejector and the receiving Postfix never sees it.
//!
//! Waits are bounded polls for a condition; nothing asserts how long
//! something took.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use gatekeeper_tests::{
    agentlab::Instance,
    dnslab::{self, NsdServer, Zone},
    mta::{self, swaks, Postfix, PostfixOptions, SwaksArgs, SwaksRun},
    netlab::{self, tcp_connect, ConnectOutcome, Netns},
};
use serde_json::Value;

const MX_IF: &str = "gkrjmx";
const CL_IF: &str = "gkrjcl";
const SRV4: &str = "192.0.2.1";
const SRV6: &str = "2001:db8::1";
const MX_ADDRS: [&str; 3] = ["192.0.2.1/24", "198.51.100.1/24", "2001:db8::1/32"];
const DOMAIN: &str = "mx.example.test";
const URL: &str = "https://mx.example.test/why";

/// A good mail server: PTR and matching A/AAAA.
const GOOD4: &str = "192.0.2.25";
const GOOD6: &str = "2001:db8:11::25";
const GOOD_NAME: &str = "mail.example.org";
/// No PTR at all.
const NOPTR4: &str = "192.0.2.30";
const NOPTR6: &str = "2001:db8:12::30";
/// A dynamic address (PTR and matching A).
const DYN4: &str = "198.51.100.10";
const DYN4_NAME: &str = "dsl-198-51-100-10.pool.example.net";
/// Banned by the operator: its action stays drop.
const BAN4: &str = "192.0.2.77";
/// The client's sending Postfix listens here (for swaks to inject).
const RELAY: &str = "192.0.2.3";

const CLIENT_ADDRS: [&str; 8] = [
    "192.0.2.2/24",
    "192.0.2.3/24",
    "192.0.2.25/24",
    "192.0.2.30/24",
    "192.0.2.77/24",
    "198.51.100.10/24",
    "2001:db8:11::25/32",
    "2001:db8:12::30/32",
];

/// Bounded polls for what the agent or Postfix does on its own.
const POLL_LIMIT: Duration = Duration::from_secs(30);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn srv(src: &str) -> SocketAddr {
    SocketAddr::new(ip(if ip(src).is_ipv4() { SRV4 } else { SRV6 }), 25)
}

fn zones() -> Vec<Zone> {
    vec![
        Zone::reverse_v4("192.0.2.0/24", &[(ip(GOOD4), GOOD_NAME)]),
        Zone::reverse_v4("198.51.100.0/24", &[(ip(DYN4), DYN4_NAME)]),
        Zone::reverse_v6("2001:db8::/32", &[(ip(GOOD6), GOOD_NAME)]),
        Zone::forward("example.org", &[(GOOD_NAME, ip(GOOD4)), (GOOD_NAME, ip(GOOD6))]),
        Zone::forward("example.net", &[(DYN4_NAME, ip(DYN4))]),
    ]
}

/// mx (agent, nsd, receiving Postfix) -- client (sources). Fields drop in
/// order: the receiving Postfix, nsd, the instance (agent, pins, mx), the
/// client.
struct Lab {
    postfix: Postfix,
    _nsd: NsdServer,
    gk: Instance,
    client: Netns,
}

impl Lab {
    fn new(reject: &str) -> Lab {
        netlab::require_root();
        dnslab::require_nsd();
        mta::require_mta();
        let (mx, client) = netlab::joined(("mx", MX_IF, &MX_ADDRS), ("client", CL_IF, &CLIENT_ADDRS)).unwrap();
        let postfix = Postfix::start(&mx, PostfixOptions::receiver(&[ip(SRV4), ip(SRV6)], DOMAIN)).unwrap();
        let nsd = NsdServer::start_in(&mx, &zones()).unwrap();
        let gk = Instance::new(mx, Some(MX_IF), "gk-reject-ns-", "");
        let mut lab = Lab { postfix, _nsd: nsd, gk, client };
        lab.start(reject);
        lab
    }

    fn config(&self, reject: &str) -> String {
        format!(
            "log_level = \"info,gatekeeper=debug\"\n\
             [policy]\nfirst_syn = \"hold\"\nhold_time = \"5s\"\n\
             [reject]\nurl = \"{URL}\"\nhostname = \"{DOMAIN}\"\n{reject}\n\
             [dns]\nservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 2\n",
            self._nsd.addr()
        )
    }

    fn start(&mut self, reject: &str) {
        self.gk.write_config(&self.config(reject));
        self.gk.start(&[]);
    }

    /// swaks from `src` to the receiving Postfix, one recipient.
    fn swaks(&self, src: &str) -> SwaksRun {
        let args = SwaksArgs::new(srv(src), "postmaster@sender.test", &format!("user@{DOMAIN}"))
            .local(ip(src))
            .helo("client.sender.test")
            .timeout(Duration::from_secs(10));
        swaks(&self.client, args).unwrap()
    }

    /// Asserts `src` is told why at RCPT: `550 5.7.1` and every `needles`.
    #[track_caller]
    fn expect_reason(&self, src: &str, needles: &[&str]) -> String {
        let run = self.swaks(src);
        let (code, line) = run
            .reply_to("RCPT")
            .unwrap_or_else(|| panic!("{src}: no reply to RCPT:\n{}\nagent log:\n{}", run.transcript, self.gk.log()));
        assert_eq!(code, 550, "{src}: {line}\n{}", run.transcript);
        assert!(line.contains("5.7.1"), "{src}: {line}");
        for n in needles {
            assert!(line.contains(n), "{src}: {line:?} lacks {n:?}");
        }
        assert!(!run.success(), "swaks fails on a refused recipient: {}", run.transcript);
        let (banner, _) = run.reply_to("BANNER").expect("a banner");
        assert_eq!(banner, 220, "{}", run.transcript);
        line
    }

    /// Asserts the receiving Postfix never heard from `src`.
    #[track_caller]
    fn postfix_never_saw(&self, src: &str) {
        let log = self.postfix.maillog();
        assert!(!log.contains(&format!("[{src}]")), "Postfix saw {src}:\n{log}");
    }

    fn stats(&self) -> Value {
        self.gk.json(&["stats", "--json"])
    }
}

#[test]
fn refused_senders_hear_why_and_good_ones_reach_postfix() {
    let lab = Lab::new("");
    lab.gk.ok(&["ban", "add", BAN4]);

    let no_ptr = lab.expect_reason(NOPTR4, &[&format!("no reverse DNS (PTR) for {NOPTR4}"), URL]);
    assert!(no_ptr.len() <= 512, "one reply line: {no_ptr}");
    lab.expect_reason(NOPTR6, &[&format!("for {NOPTR6}"), URL]);
    lab.expect_reason(DYN4, &[DYN4, DYN4_NAME, "dynamic"]);
    for src in [NOPTR4, NOPTR6, DYN4] {
        lab.postfix_never_saw(src);
    }

    // Good senders reach the real MTA on the same port.
    for src in [GOOD4, GOOD6] {
        let run = lab.swaks(src);
        assert!(run.success(), "{src}: {}\nagent log:\n{}", run.transcript, lab.gk.log());
        assert_eq!(run.reply_to("RCPT").map(|r| r.0), Some(250), "{}", run.transcript);
    }
    lab.postfix.wait_for_log_count("status=sent", 2, POLL_LIMIT).unwrap();

    // A ban's action is drop: no answer at all, and Postfix never sees it.
    let run = lab.swaks(BAN4);
    assert!(run.reply_to("BANNER").is_none(), "a banned source gets no banner: {}", run.transcript);
    lab.postfix_never_saw(BAN4);
    assert_eq!(
        tcp_connect(&lab.client, ip(BAN4), srv(BAN4), Duration::from_secs(3)),
        ConnectOutcome::TimedOut,
        "a banned source's SYN is dropped"
    );

    let st = lab.stats();
    let rej = &st["reject"];
    assert!(rej["rejected-no-ptr"].as_u64().unwrap() >= 2, "{st:#}");
    assert!(rej["rejected-dynamic"].as_u64().unwrap() >= 1, "{st:#}");
    assert!(rej["rejector-steered"].as_u64().unwrap() >= 3, "{st:#}");
    assert_eq!(rej["rejected-manual-ban"], 0, "{st:#}");
    assert!(st["totals"]["manual-ban"].as_u64().unwrap() >= 1, "{st:#}");
    let status = lab.gk.json(&["status", "--json"]);
    let answered = &status["detail"]["rejector"]["answered"];
    assert!(answered["no-ptr"].as_u64().unwrap() >= 2 && answered["dynamic"].as_u64().unwrap() >= 1, "{status:#}");
    // The rejection is logged with its reply text (once per source).
    let log = lab.gk.log();
    assert!(log.contains("rejected with a reason") && log.contains(&no_ptr[4..]), "agent log:\n{log}");
    // `check` says what a refused source meets.
    let c = lab.gk.json(&["check", NOPTR4, "--json"]);
    assert_eq!(c["datapath"]["refused"]["refusal"], "no-ptr", "{c:#}");
    assert_eq!(c["datapath"]["refused"]["action"], "reject", "{c:#}");
    let c = lab.gk.json(&["check", BAN4, "--json"]);
    assert_eq!(c["datapath"]["refused"]["action"], "drop", "{c:#}");

    // POP3 where it is guarded: the refusal is the greeting (no server
    // listens on 110 here; the rejector answers all the same).
    lab.gk.ok(&["ports", "set", "25", "110"]);
    let greeting = netlab::in_netns(&lab.client, || {
        use std::io::Read as _;
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(ip(NOPTR4), 0).into()).unwrap();
        s.connect_timeout(&SocketAddr::new(ip(SRV4), 110).into(), Duration::from_secs(5)).unwrap();
        let mut stream: std::net::TcpStream = s.into();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    });
    assert!(
        greeting.starts_with("-ERR [SYS/PERM]") && greeting.contains(&format!("no reverse DNS (PTR) for {NOPTR4}")),
        "POP3 greeting: {greeting:?}"
    );
    lab.gk.ok(&["ports", "set", "25"]);

    // The rejector's closed sessions (TIME_WAIT on the MTA's address and
    // port) never keep the MTA from starting again on its port.
    let mut lab = lab;
    lab.postfix.stop().unwrap();
    lab.postfix = Postfix::start(&lab.gk.ns, PostfixOptions::receiver(&[ip(SRV4), ip(SRV6)], DOMAIN))
        .expect("Postfix binds port 25 again right after the rejector's sessions");
    let run = lab.swaks(GOOD4);
    assert!(run.success(), "{}", run.transcript);
}

/// A real Postfix as the sending MTA, relaying from a source without a PTR:
/// the reason ends up in its bounce, not in a connection timeout days later.
#[test]
fn a_sending_postfix_bounces_with_the_reason() {
    let lab = Lab::new("");
    let sender = Postfix::start(
        &lab.client,
        PostfixOptions::relay(&[ip(RELAY)], &[(DOMAIN, srv(NOPTR4))]).with_smtp_bind(ip(NOPTR4)),
    )
    .unwrap();
    let run = swaks(
        &lab.client,
        SwaksArgs::new(SocketAddr::new(ip(RELAY), 25), "alice@sender.test", &format!("bob@{DOMAIN}"))
            .local(ip(RELAY))
            .timeout(Duration::from_secs(10)),
    )
    .unwrap();
    assert!(run.success(), "the sender takes the mail: {}", run.transcript);
    let line = sender
        .wait_for_log("status=bounced", POLL_LIMIT)
        .unwrap_or_else(|e| panic!("{e:#}\nsender log:\n{}\nagent log:\n{}", sender.maillog(), lab.gk.log()));
    assert!(
        line.contains(&format!("host {SRV4}[{SRV4}] said: 550 5.7.1"))
            && line.contains(&format!("no reverse DNS (PTR) for {NOPTR4}"))
            && line.contains("(in reply to RCPT TO command)"),
        "{line}"
    );
    lab.postfix_never_saw(NOPTR4);
}

/// The agent killed: a refused source is refused (a RST while the lease
/// runs, then dropped), never let through to the MTA; good sources still
/// deliver. Restarted: rejections resume (here in banner mode).
#[test]
fn a_dead_agent_never_lets_a_refused_source_through() {
    let mut lab = Lab::new("");
    lab.expect_reason(NOPTR4, &["no reverse DNS"]);
    lab.gk.kill_agent();

    let outcome = tcp_connect(&lab.client, ip(NOPTR4), srv(NOPTR4), Duration::from_secs(3));
    assert!(
        matches!(outcome, ConnectOutcome::Refused | ConnectOutcome::TimedOut),
        "a refused source with the agent dead: {outcome:?}"
    );
    // Once the lease has lapsed, the gate drops again.
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let o = tcp_connect(&lab.client, ip(NOPTR4), srv(NOPTR4), Duration::from_secs(3));
        assert_ne!(o, ConnectOutcome::Connected, "a refused source reached the MTA");
        if o == ConnectOutcome::TimedOut {
            break;
        }
        assert!(Instant::now() < deadline, "still {o:?} after {POLL_LIMIT:?}");
    }
    let st = lab.stats();
    assert!(st["reject"]["reject-fallback-drop"].as_u64().unwrap() >= 1, "{st:#}");
    let run = lab.swaks(GOOD4);
    assert!(run.success(), "a good source delivers with the agent dead: {}", run.transcript);
    lab.postfix.wait_for_log("status=sent", POLL_LIMIT).unwrap();
    lab.postfix_never_saw(NOPTR4);

    // Restarted in banner mode: the pinned sk_lookup link is adopted, and
    // the refusal is in the greeting (554, then 503 until QUIT).
    lab.start("mode = \"banner\"");
    assert!(lab.gk.log().contains("rejector attached") && lab.gk.log().contains("adopted=true"), "{}", lab.gk.log());
    let run = lab.swaks(NOPTR4);
    let (code, line) = run.reply_to("BANNER").unwrap_or_else(|| panic!("no banner: {}", run.transcript));
    assert_eq!(code, 554, "{line}");
    assert!(line.contains("5.7.1") && line.contains(&format!("no reverse DNS (PTR) for {NOPTR4}")), "{line}");
    lab.postfix_never_saw(NOPTR4);

    // `unload` takes the rejector's link with everything else.
    lab.gk.ok(&["unload"]);
    assert!(!lab.gk.pin_dir().exists(), "pins left: {:?}", std::fs::read_dir(lab.gk.pin_dir()).map(|d| d.count()));
}
