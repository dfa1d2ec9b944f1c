//! `gatekeeper-bench logs`: what reading the mail logs costs, and how soon
//! a log line becomes a ban in the datapath.
//!
//! 1. Throughput on one core (the thread pinned to CPU 1): a deterministic
//!    corpus of each daemon's lines (for Postfix the mix of a busy MX:
//!    connects and disconnects, SASL failures, RCPT rejects, `client=`,
//!    queue manager and delivery lines, with RFC 3164 and RFC 3339
//!    headers), parsed only, and parsed and scored (the abuse score and the
//!    undeliverable tracker, in memory); the median of several rounds.
//!    Beside it the peer operators run for this today, fail2ban's
//!    `fail2ban-regex` with its stock filter on the same file. The target
//!    is 500,000 Postfix lines/s.
//! 2. Latency: an agent follows a log file while a writer appends noise
//!    (mostly disconnects, a tenth connects from random IPv6 /64s); every so often the writer appends the
//!    failed logins that push a fresh source over the threshold and notes
//!    the time; a client then connects from that source every few
//!    milliseconds until its SYN goes unanswered (dropped by the XDP gate).
//!    The time between the write and the first unanswered SYN's send is the
//!    sample. The target is a p99 under 1 s.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use gatekeeper::{
    domain::LogKind,
    logs::{self, Parsed},
    pipeline::abuse::{AbuseConfig, AbuseScores, MailStream, MailStreamConfig},
};
use serde_json::{json, Value};

use gatekeeper_tests::{
    agentlab::Instance,
    netlab::{self, tcp_connect, ConnectOutcome, TcpListenerGuard},
    rng::Rng,
};

const ROUNDS: usize = 5;
const BENCH_CPU: usize = 1;
const MX_IF: &str = "gklbmx";
const CL_IF: &str = "gklbcl";
const SERVER: &str = "203.0.113.1";

fn usage() -> ! {
    eprintln!("usage: gatekeeper-bench logs [--lines N] [--samples N] [--json PATH]");
    std::process::exit(2)
}

pub fn run(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut lines: usize = 200_000;
    let mut samples: usize = 40;
    let mut json_path = PathBuf::from("target/bench/logs.json");
    while let Some(a) = args.next() {
        let mut number =
            || args.next().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage());
        match a.as_str() {
            "--lines" => lines = number().min(10_000_000),
            "--samples" => samples = number().min(200),
            "--json" => json_path = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    netlab::require_root();
    pin_to(BENCH_CPU);
    let mut rows = Vec::new();
    for kind in [LogKind::Postfix, LogKind::Dovecot, LogKind::Sshd, LogKind::Exim] {
        eprintln!("logs: {kind} throughput");
        rows.push(throughput(kind, lines)?);
    }
    eprintln!("logs: latency from a log line to a dropped SYN ({samples} samples)");
    let lat = latency(samples)?;

    println!(
        "\nlog lines per second on one core (median of {ROUNDS} rounds of {lines} lines; target: 500,000 for Postfix)"
    );
    println!("{:<10} {:>14} {:>16} {:>16} {:>10}", "log", "parse only", "parse and score", "fail2ban-regex", "events");
    for r in &rows {
        let peer = r.peer.map_or_else(|| "-".to_string(), |p| format!("{p:.0}"));
        println!("{:<10} {:>14.0} {:>16.0} {:>16} {:>10}", r.kind.as_str(), r.parse, r.score, peer, r.events);
    }
    println!("\nfrom a log line written to the ban in the datapath (ms; target p99 under 1000)");
    println!("{:<10} {:>8} {:>8} {:>8} {:>8} {:>8}", "samples", "p50", "p90", "p99", "max", "noise/s");
    println!(
        "{:<10} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8}",
        lat.ms.len(),
        pct(&lat.ms, 50.0),
        pct(&lat.ms, 90.0),
        pct(&lat.ms, 99.0),
        pct(&lat.ms, 100.0),
        lat.noise_per_sec
    );
    let out = json!({
        "lines": lines,
        "rounds": ROUNDS,
        "cpu": BENCH_CPU,
        "throughput": rows.iter().map(Row::json).collect::<Vec<Value>>(),
        "latency_ms": {
            "samples": lat.ms.len(),
            "p50": pct(&lat.ms, 50.0),
            "p90": pct(&lat.ms, 90.0),
            "p99": pct(&lat.ms, 99.0),
            "max": pct(&lat.ms, 100.0),
            "noise_lines_per_sec": lat.noise_per_sec,
        },
    });
    if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    println!("\nwrote {}", json_path.display());
    Ok(())
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_err() {
        eprintln!("logs: could not pin to CPU {cpu}; numbers are noisier");
    }
}

/// The `q`th percentile (nearest rank) of `v`.
fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    kind: LogKind,
    parse: f64,
    score: f64,
    peer: Option<f64>,
    events: usize,
}

impl Row {
    fn json(&self) -> Value {
        json!({ "log": self.kind.as_str(), "parse_lines_per_sec": self.parse, "parse_and_score_lines_per_sec": self.score,
                "fail2ban_regex_lines_per_sec": self.peer, "events_per_round": self.events })
    }
}

// ------------------------------------------------------------- the corpus

fn v4(rng: &mut Rng) -> String {
    let nets = ["192.0.2", "198.51.100", "203.0.113"];
    format!("{}.{}", nets[rng.below(3) as usize], rng.range(1, 254))
}

fn v6(rng: &mut Rng) -> String {
    format!("2001:db8:{:x}:{:x}::{:x}", rng.below(65536), rng.below(65536), rng.range(1, 65535))
}

fn addr(rng: &mut Rng) -> String {
    if rng.below(5) == 0 {
        v6(rng)
    } else {
        v4(rng)
    }
}

fn qid(rng: &mut Rng) -> String {
    format!("{:011X}", rng.below(1 << 44))
}

/// A header in one of the two styles files carry, for `tag[pid]`.
fn header(rng: &mut Rng, tag: &str) -> String {
    let s = 10 + rng.below(50);
    if rng.below(2) == 0 {
        format!("Dec  8 03:{:02}:{s:02} mx {tag}[{}]: ", rng.below(60), rng.range(100, 60000))
    } else {
        format!(
            "2026-12-08T03:{:02}:{s:02}.{:06}+00:00 mx {tag}[{}]: ",
            rng.below(60),
            rng.below(1_000_000),
            rng.range(100, 60000)
        )
    }
}

/// `n` lines of `kind`'s log, deterministic.
pub fn corpus(kind: LogKind, n: usize) -> Vec<String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ kind as u64);
    (0..n).map(|_| line(kind, &mut rng)).collect()
}

fn line(kind: LogKind, rng: &mut Rng) -> String {
    let (c, q) = (addr(rng), qid(rng));
    let roll = rng.below(100);
    match kind {
        LogKind::Postfix => {
            let smtpd = header(rng, "postfix/smtpd");
            match roll {
                0..=29 => format!("{smtpd}connect from unknown[{c}]"),
                30..=59 => format!("{smtpd}disconnect from unknown[{c}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"),
                60..=69 => format!(
                    "{smtpd}warning: unknown[{c}]: SASL LOGIN authentication failed: (reason unavailable), sasl_username=user{}",
                    rng.below(1000)
                ),
                70..=74 => format!(
                    "{smtpd}NOQUEUE: reject: RCPT from unknown[{c}]: 550 5.1.1 <u{}@example.test>: Recipient address rejected: User unknown in local recipient table; from=<s@example.org> to=<u{}@example.test> proto=ESMTP helo=<h.example.org>",
                    rng.below(500),
                    rng.below(500)
                ),
                75..=82 => format!("{smtpd}{q}: client=unknown[{c}], sasl_method=PLAIN, sasl_username=user{}", rng.below(1000)),
                83..=87 => format!("{}{q}: message-id=<{}@example.org>", header(rng, "postfix/cleanup"), rng.next()),
                88..=92 => format!(
                    "{}{q}: from=<s@example.org>, size={}, nrcpt=1 (queue active)",
                    header(rng, "postfix/qmgr"),
                    rng.range(500, 90000)
                ),
                93..=97 => format!(
                    "{}{q}: to=<r{}@example.net>, relay=mx.example.net[198.51.100.25]:25, delay=0.4, delays=0.1/0.01/0.1/0.2, dsn={}, status={}",
                    header(rng, "postfix/smtp"),
                    rng.below(1000),
                    if roll == 97 { "5.1.1" } else { "2.0.0" },
                    if roll == 97 { "bounced (host said: 550 5.1.1 no such user)" } else { "sent (250 2.0.0 Ok)" }
                ),
                _ => format!("{}{q}: removed", header(rng, "postfix/qmgr")),
            }
        }
        LogKind::Dovecot => {
            let s = format!("{:016x}", rng.next());
            match roll {
                0..=39 => format!(
                    "{}imap-login: Login: user=<u{}>, method=PLAIN, rip={c}, lip=192.0.2.1, mpid={}, session=<{s}>",
                    header(rng, "dovecot"),
                    rng.below(1000),
                    rng.range(100, 60000)
                ),
                40..=69 => format!(
                    "{}imap-login: Disconnected: Connection closed (auth failed, {} attempts in 4 secs): user=<u{}>, method=PLAIN, rip={c}, lip=192.0.2.1, session=<{s}>",
                    header(rng, "dovecot"),
                    rng.range(1, 3),
                    rng.below(1000)
                ),
                70..=89 => format!("{}auth: passwd-file(u{},{c},<{s}>): Password mismatch", header(rng, "dovecot"), rng.below(1000)),
                _ => format!("{}imap(u{}): Logged out in=42 out=1024", header(rng, "dovecot"), rng.below(1000)),
            }
        }
        LogKind::Sshd => {
            let p = rng.range(1024, 65535);
            match roll {
                0..=39 => format!("{}Failed password for root from {c} port {p} ssh2", header(rng, "sshd")),
                40..=59 => format!("{}Invalid user admin{} from {c} port {p}", header(rng, "sshd"), rng.below(100)),
                60..=79 => format!("{}Connection closed by {c} port {p} [preauth]", header(rng, "sshd")),
                _ => format!(
                    "{}Accepted publickey for deploy from {c} port {p} ssh2: ED25519 SHA256:x",
                    header(rng, "sshd")
                ),
            }
        }
        LogKind::Exim => {
            let id = format!("1x{:04}-{:06}-{:02}", rng.below(10000), rng.below(1_000_000), rng.below(100));
            let at = format!("2026-12-08 03:{:02}:{:02}", rng.below(60), rng.below(60));
            match roll {
                0..=29 => format!("{at} SMTP connection from (h.example.org) [{c}]:{} (TCP/IP connection count = 3)", rng.range(1024, 65535)),
                30..=49 => format!("{at} plain_server authenticator failed for (h.example.org) [{c}]: 535 Incorrect authentication data (set_id=u{})", rng.below(1000)),
                50..=64 => format!("{at} H=(h.example.org) [{c}] F=<s@example.org> rejected RCPT <u{}@example.test>: Unrouteable address", rng.below(1000)),
                65..=79 => format!("{at} {id} <= s@example.org H=(h.example.org) [{c}] P=esmtpa A=plain_server:u{} S=1234", rng.below(1000)),
                80..=89 => format!("{at} {id} ** r@example.net R=dnslookup T=remote_smtp H=mx.example.net [198.51.100.25]: SMTP error from remote mail server after RCPT TO:<r@example.net>: 550 5.1.1 no such user"),
                _ => format!("{at} {id} Completed"),
            }
        }
    }
}

// ------------------------------------------------------------- throughput

fn throughput(kind: LogKind, n: usize) -> Result<Row> {
    let lines = corpus(kind, n);
    let now_us = 1_796_700_000_000_000;
    let mut events = 0;
    let mut parse = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        events = 0;
        for l in &lines {
            if let Some(rec) = logs::split_line(l, now_us) {
                if let Parsed::Event(_) = logs::parse(kind, &rec) {
                    events += 1;
                }
            }
        }
        parse.push(n as f64 / t.elapsed().as_secs_f64());
    }
    ensure!(events > 0, "{kind}: the corpus gave no event");
    let mut score = Vec::new();
    for _ in 0..ROUNDS {
        let mut scores = AbuseScores::new(AbuseConfig::default());
        let mut stream = MailStream::new(MailStreamConfig::default());
        let t = Instant::now();
        for (i, l) in lines.iter().enumerate() {
            if let Some(rec) = logs::split_line(l, now_us) {
                if let Parsed::Event(ev) = logs::parse(kind, &rec) {
                    let at = now_us / 1000 + i as i64;
                    let _ = scores.apply(&ev, at);
                    let _ = stream.apply(&ev, at);
                }
            }
        }
        score.push(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Row { kind, parse: median(parse), score: median(score), peer: fail2ban(kind, &lines)?, events })
}

/// `fail2ban-regex FILE FILTER` on the same lines, lines per second (wall
/// time, its start-up included); `None` when fail2ban is not installed.
fn fail2ban(kind: LogKind, lines: &[String]) -> Result<Option<f64>> {
    let bin = Path::new("/usr/bin/fail2ban-regex");
    if !bin.exists() {
        eprintln!("logs: fail2ban-regex is missing (Debian package fail2ban, `cargo xtask setup`): no peer row");
        return Ok(None);
    }
    let filter = match kind {
        LogKind::Postfix => "/etc/fail2ban/filter.d/postfix.conf",
        LogKind::Dovecot => "/etc/fail2ban/filter.d/dovecot.conf",
        LogKind::Sshd => "/etc/fail2ban/filter.d/sshd.conf",
        LogKind::Exim => "/etc/fail2ban/filter.d/exim.conf",
    };
    let dir = tempfile::Builder::new().prefix("gk-logs-bench-").tempdir()?;
    let file = dir.path().join("log");
    let mut f = std::fs::File::create(&file)?;
    for l in lines {
        writeln!(f, "{l}")?;
    }
    drop(f);
    let t = Instant::now();
    let out = Command::new(bin).arg(&file).arg(filter).output().context("run fail2ban-regex")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("fail2ban-regex {filter} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Some(lines.len() as f64 / secs))
}

// ---------------------------------------------------------------- latency

struct Latency {
    ms: Vec<f64>,
    noise_per_sec: u64,
}

/// The noise: connect lines from many sources, this many per second.
const NOISE_PER_SEC: u64 = 20_000;

fn stamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string().replace('Z', "+00:00")
}

fn latency(samples: usize) -> Result<Latency> {
    let clients: Vec<String> = (0..samples).map(|i| format!("203.0.113.{}/24", 10 + i)).collect();
    let (mx, cl) = netlab::joined(("lbmx", MX_IF, &[format!("{SERVER}/24")]), ("lbcl", CL_IF, &clients))?;
    let server = SocketAddr::new(SERVER.parse()?, 25);
    let _smtp = TcpListenerGuard::spawn(&mx, server)?;
    let mut gk = Instance::new(mx, Some(MX_IF), "gk-logs-bench-", "");
    let log = gk.dir().join("maillog");
    std::fs::write(&log, "")?;
    gk.write_config(&format!(
        "[dns]\nenabled = false\n\n[[logs]]\nkind = \"postfix\"\nsource = \"file\"\nfile = \"{}\"\n",
        log.display()
    ));
    gk.start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&log)?;
            let mut rng = Rng(7);
            let tick = Duration::from_millis(10);
            let per_tick = NOISE_PER_SEC / 100;
            // Bounded: at most ten minutes of noise.
            let until = Instant::now() + Duration::from_secs(600);
            while !stop.load(Relaxed) && Instant::now() < until {
                let t = Instant::now();
                let mut buf = String::new();
                let s = stamp();
                for _ in 0..per_tick {
                    // Mostly lines the scorer passes over, a tenth connects
                    // from a botnet's worth of IPv6 /64s.
                    if rng.below(10) == 0 {
                        let (a, b) = (rng.below(65536), rng.below(65536));
                        buf.push_str(&format!(
                            "{s} mx postfix/smtpd[77]: connect from unknown[2001:db8:{a:x}:{b:x}::1]\n"
                        ));
                    } else {
                        let c = rng.range(1, 254);
                        buf.push_str(&format!(
                            "{s} mx postfix/smtpd[77]: disconnect from unknown[198.51.100.{c}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5\n"
                        ));
                    }
                }
                f.write_all(buf.as_bytes())?;
                std::thread::sleep(tick.saturating_sub(t.elapsed()));
            }
            Ok(())
        })
    };
    let mut ms = Vec::new();
    let mut log_f = std::fs::OpenOptions::new().append(true).open(&log)?;
    for i in 0..samples {
        let src: IpAddr = format!("203.0.113.{}", 10 + i).parse()?;
        ensure!(
            tcp_connect(&cl, src, server, Duration::from_millis(500)) == ConnectOutcome::Connected,
            "{src} connects before"
        );
        let mut lines = String::new();
        for _ in 0..8 {
            lines.push_str(&format!(
                "{} mx postfix/smtpd[78]: warning: unknown[{src}]: SASL LOGIN authentication failed: (reason unavailable), sasl_username=x\n",
                stamp()
            ));
        }
        log_f.write_all(lines.as_bytes())?;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(10);
        let sample = loop {
            let sent = Instant::now();
            if tcp_connect(&cl, src, server, Duration::from_millis(200)) == ConnectOutcome::TimedOut {
                break Some(sent.duration_since(t0).as_secs_f64() * 1000.0);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match sample {
            Some(m) => ms.push(m),
            None => eprintln!("logs: {src} was not banned within 10 s (sample lost)\n{}", gk.log()),
        }
    }
    stop.store(true, Relaxed);
    noise.join().map_err(|_| anyhow::anyhow!("noise writer panicked"))??;
    ensure!(!ms.is_empty(), "no source was banned");
    Ok(Latency { ms, noise_per_sec: NOISE_PER_SEC })
}
