//! Real Dovecot (Debian's 2.3) inside test namespaces: an IMAP/POP3 server
//! whose login failures the log tests read, and the SASL server behind a
//! test [`crate::mta::Postfix`] (`smtpd_sasl_type = dovecot`).
//!
//! Every [`Dovecot`] is a private instance, `dovecot -c DIR/dovecot.conf`,
//! in a fresh directory `/tmp/gk-dovecot-<pid>-<n>` (mode 0755: the login
//! processes run as `dovenull`, the auth process as `dovecot`, Postfix's
//! smtpd as `postfix`):
//!
//! | path            | what |
//! |-----------------|------|
//! | `dovecot.conf`  | written from [`DovecotOptions`]; no `/etc/dovecot` file is read |
//! | `users`         | the `passwd-file` (passdb and userdb): `user:{PLAIN}password:65534:65534::DIR/home/user` |
//! | `run/`          | `base_dir`: sockets, `run/master.pid` |
//! | `run/auth-postfix` | the SASL socket for Postfix (mode 0666), when [`DovecotOptions::auth_socket`] |
//! | `state/`        | `state_dir` (Dovecot's `instances` list goes here, not to /var/lib/dovecot) |
//! | `home/USER/`    | each user's home and Maildir (owned by `nobody`) |
//! | `dovecot.log`   | `log_path`: every line, `auth_verbose = yes` |
//!
//! Settings that differ from a stock Dovecot, for tests: `ssl = no`,
//! `disable_plaintext_auth = no` (LOGIN/PLAIN over plain TCP, and Postfix's
//! SASL requests, which carry no `secured` flag without TLS, are accepted),
//! `auth_mechanisms = plain login`, `auth_verbose = yes` (the per-attempt
//! `auth: Info: passwd-file(user,ip,<session>): Password mismatch` lines;
//! Debian's default is no), `first_valid_uid = 1` (mail users are `nobody`).
//!
//! The master runs with `nsenter --net=` (it daemonizes; every process it
//! forks lives in the namespace and works in the instance directory: the
//! master in `run/`, login processes chrooted below it, mail processes in
//! the homes). [`Dovecot::stop`] (and `Drop`) sends SIGTERM to the pid in
//! `run/master.pid`, waits, then SIGKILLs whatever still works in the
//! directory — never anything found by name.
//!
//! # Auth penalty: slow failures from one address
//!
//! Dovecot delays authentication from an address that recently failed
//! (`auth-penalty.h`: 2, 4, 8, then 15 s per further failure; IPv6 per /48;
//! no setting names it), on top of `auth_failure_delay` (2 s) before each
//! failure reply. This applies to Postfix's SASL requests too (they carry
//! the SMTP client's address). Even a *successful* login from a penalised
//! address waits. Three ways for a test:
//! - spread attempts over several client addresses (production settings);
//! - allow ~15 s per attempt ([`LOGIN_TIMEOUT`] is 40 s; give swaks a
//!   `timeout` over 17 s);
//! - [`DovecotOptions::without_auth_penalty`]: the auth process finds no
//!   `anvil-auth-penalty` socket (a listener with `mode = 0` is not
//!   created) and so tracks no penalty, and `auth_failure_delay = 0`:
//!   every failure answers at once. The log lines are unchanged.
//!
//! Requires root and the Debian packages `dovecot-imapd` and
//! `dovecot-pop3d` (`cargo xtask setup`). Every wait is bounded.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{
    mta::{cleanup_stale_dirs, kill_procs_in, procs_in, wait_gone, TMP},
    netlab::{is_allowed_endpoint, nsenter_output, run_capture, tcp_connect_stream, ConnectOutcome, Netns},
};

pub const DOVECOT: &str = "/usr/sbin/dovecot";
/// Prefix of every instance directory under [`TMP`] (`gk-dovecot-<pid>-<n>`).
pub const DIR_PREFIX: &str = "gk-dovecot-";
/// Name of the Postfix SASL socket in `base_dir` (`run/`).
pub const AUTH_SOCKET: &str = "auth-postfix";
/// uid/gid mail processes run as (`nobody`/`nogroup` on Debian).
const MAIL_ID: u32 = 65534;
/// Bound for `dovecot` to start and listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the master gets after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for one IMAP/POP3 reply in [`imap_login`]/[`pop3_login`]: longer
/// than the longest auth penalty (15 s) plus `auth_failure_delay` (2 s).
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound for the TCP connect of a login helper.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line a login helper reads.
const MAX_LINE: u64 = 8 * 1024;
/// Most lines a login helper reads while waiting for one tagged reply.
const MAX_LINES: usize = 64;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics with a clear message unless Dovecot (with IMAP and POP3) is installed.
pub fn require_dovecot() {
    for p in [DOVECOT, "/usr/lib/dovecot/imap-login", "/usr/lib/dovecot/pop3-login"] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: run `cargo xtask setup` (Debian packages dovecot-imapd, dovecot-pop3d)"
        );
    }
}

// ---------------------------------------------------------------------------
// Options

/// What a [`Dovecot`] instance listens on and who may log in.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// `listen`: test addresses or loopback, each configured in the namespace.
    pub listen: Vec<IpAddr>,
    /// IMAP port (`None`: no IMAP listener).
    pub imap_port: Option<u16>,
    /// POP3 port (`None`: no POP3 listener).
    pub pop3_port: Option<u16>,
    /// `(user, password)` pairs of the passwd-file (plaintext scheme).
    pub users: Vec<(String, String)>,
    /// Serve Postfix's SASL socket `run/auth-postfix` (mode 0666).
    pub auth_socket: bool,
    /// Dovecot's per-address auth penalty and `auth_failure_delay` (the
    /// default, `true`); see the module docs.
    pub auth_penalty: bool,
    /// dovecot.conf lines appended after the generated ones.
    pub extra_conf: Vec<String>,
}

impl DovecotOptions {
    /// IMAP on 143 and POP3 on 110 of `listen`, no users yet, no SASL socket.
    pub fn new(listen: &[IpAddr]) -> Self {
        Self {
            listen: listen.to_vec(),
            imap_port: Some(143),
            pop3_port: Some(110),
            users: Vec::new(),
            auth_socket: false,
            auth_penalty: true,
            extra_conf: Vec::new(),
        }
    }

    /// Failures answer at once, however many come from one address: no
    /// auth penalty, `auth_failure_delay = 0` (see the module docs).
    pub fn without_auth_penalty(mut self) -> Self {
        self.auth_penalty = false;
        self
    }

    pub fn with_user(mut self, user: &str, password: &str) -> Self {
        self.users.push((user.to_owned(), password.to_owned()));
        self
    }

    /// Also serve the SASL socket for Postfix ([`Dovecot::auth_socket`]).
    pub fn with_auth_socket(mut self) -> Self {
        self.auth_socket = true;
        self
    }

    /// Appends a dovecot.conf line such as `auth_failure_delay = 0`.
    pub fn with_conf(mut self, line: &str) -> Self {
        self.extra_conf.push(line.to_owned());
        self
    }

    /// Every address IMAP listens on.
    pub fn imap_addrs(&self) -> Vec<SocketAddr> {
        self.imap_port.map_or_else(Vec::new, |p| self.listen.iter().map(|&ip| SocketAddr::new(ip, p)).collect())
    }

    /// Every address POP3 listens on.
    pub fn pop3_addrs(&self) -> Vec<SocketAddr> {
        self.pop3_port.map_or_else(Vec::new, |p| self.listen.iter().map(|&ip| SocketAddr::new(ip, p)).collect())
    }

    fn check(&self) -> Result<()> {
        if self.listen.is_empty() {
            bail!("DovecotOptions: no listen address");
        }
        if let Some(ip) = self.listen.iter().find(|ip| !is_allowed_endpoint(**ip) || ip.is_unspecified()) {
            bail!("DovecotOptions: listen address {ip} is neither a test address nor loopback");
        }
        if self.imap_port.is_none() && self.pop3_port.is_none() && !self.auth_socket {
            bail!("DovecotOptions: neither IMAP, POP3 nor the auth socket: nothing to serve");
        }
        if self.imap_port == Some(0)
            || self.pop3_port == Some(0)
            || (self.imap_port.is_some() && self.imap_port == self.pop3_port)
        {
            bail!(
                "DovecotOptions: ports imap {:?} pop3 {:?} must be non-zero and distinct",
                self.imap_port,
                self.pop3_port
            );
        }
        for (user, pass) in &self.users {
            if user.is_empty()
                || user.len() > 64
                || !user.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
            {
                bail!("DovecotOptions: bad user name {user:?} (1-64 of letters, digits, . _ - @)");
            }
            if pass.is_empty() || pass.len() > 256 || pass.chars().any(|c| c == ':' || c.is_control()) {
                bail!("DovecotOptions: bad password for {user} (1-256 characters, no ':' or control characters)");
            }
        }
        let mut names: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("DovecotOptions: user {} given twice", w[0]);
        }
        Ok(())
    }

    fn conf_text(&self, dir: &Path) -> String {
        let d = dir.display();
        let listen: Vec<String> = self.listen.iter().map(IpAddr::to_string).collect();
        let protocols: Vec<&str> = [("imap", self.imap_port), ("pop3", self.pop3_port)]
            .iter()
            .filter(|(_, p)| p.is_some())
            .map(|(n, _)| *n)
            .collect();
        let mut text = format!(
            "# written by gatekeeper-tests (tests/src/dovecot.rs) for one test\n\
             base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             instance_name = gk-dovecot-{name}\n\
             log_path = {d}/dovecot.log\n\
             auth_verbose = yes\n\
             protocols = {protocols}\n\
             listen = {listen}\n\
             ssl = no\n\
             disable_plaintext_auth = no\n\
             auth_mechanisms = plain login\n\
             first_valid_uid = 1\n\
             mail_location = maildir:~/Maildir\n\
             namespace inbox {{\n  inbox = yes\n}}\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/users\n}}\n\
             userdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n",
            name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            protocols = if protocols.is_empty() { "none".to_owned() } else { protocols.join(" ") },
            listen = listen.join(", "),
        );
        for (service, port) in [("imap", self.imap_port), ("pop3", self.pop3_port)] {
            if let Some(port) = port {
                text.push_str(&format!(
                    "service {service}-login {{\n  inet_listener {service} {{\n    port = {port}\n  }}\n}}\n"
                ));
            }
        }
        if !self.auth_penalty {
            // A listener of mode 0 is not created: auth finds no penalty
            // socket (ENOENT) and runs without penalties.
            text.push_str(
                "auth_failure_delay = 0\n\
                 service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n",
            );
        }
        if self.auth_socket {
            text.push_str(&format!("service auth {{\n  unix_listener {AUTH_SOCKET} {{\n    mode = 0666\n  }}\n}}\n"));
        }
        for line in &self.extra_conf {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn users_text(&self, dir: &Path) -> String {
        self.users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}:{MAIL_ID}:{MAIL_ID}::{}\n", dir.join("home").join(u).display()))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Dovecot

/// A running private Dovecot instance inside a namespace (see the module
/// docs). Stops on drop and removes its directory. Declare it after the
/// [`Netns`] it runs in.
#[derive(Debug)]
pub struct Dovecot {
    dir: PathBuf,
    netns: PathBuf,
    netns_name: String,
    imap: Vec<SocketAddr>,
    pop3: Vec<SocketAddr>,
    auth_socket: Option<PathBuf>,
    master_pid: i32,
    stopped: bool,
}

impl Dovecot {
    /// Writes the instance's files, starts `dovecot` inside `ns` and returns
    /// once the master runs, every listener listens and the SASL socket (if
    /// asked for) exists. On failure the error carries Dovecot's message and
    /// log, and nothing is left running or on disk.
    pub fn start(ns: &Netns, opts: DovecotOptions) -> Result<Dovecot> {
        if !Path::new(DOVECOT).exists() {
            bail!("{DOVECOT} is missing: run `cargo xtask setup` (Debian packages dovecot-imapd, dovecot-pop3d)");
        }
        opts.check()?;
        for gone in cleanup_stale() {
            eprintln!("dovecot: removed a dead test run's {gone}");
        }
        let dir = Path::new(TMP).join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if fs::symlink_metadata(&dir).is_ok() {
            kill_procs_in(&dir);
            fs::remove_dir_all(&dir).with_context(|| format!("remove the stale {}", dir.display()))?;
        }
        fs::DirBuilder::new().mode(0o755).create(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut dv = Dovecot {
            auth_socket: opts.auth_socket.then(|| dir.join("run").join(AUTH_SOCKET)),
            dir,
            netns: ns.path().to_path_buf(),
            netns_name: ns.name().to_owned(),
            imap: opts.imap_addrs(),
            pop3: opts.pop3_addrs(),
            master_pid: 0,
            stopped: false,
        };
        // From here on Drop stops whatever started and removes the directory.
        dv.write_files(&opts).with_context(|| format!("write the Dovecot files in {}", dv.dir.display()))?;
        dv.run_start(ns).with_context(|| format!("start Dovecot in {}", dv.netns_name))?;
        Ok(dv)
    }

    fn write_files(&self, opts: &DovecotOptions) -> Result<()> {
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))?;
        for sub in ["run", "state", "home"] {
            let p = self.dir.join(sub);
            fs::create_dir(&p).with_context(|| format!("create {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        }
        for (user, _) in &opts.users {
            let home = self.dir.join("home").join(user);
            fs::create_dir(&home).with_context(|| format!("create {}", home.display()))?;
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(&home, Some(MAIL_ID), Some(MAIL_ID))
                .with_context(|| format!("chown {} to nobody", home.display()))?;
        }
        for (name, text) in [("dovecot.conf", opts.conf_text(&self.dir)), ("users", opts.users_text(&self.dir))] {
            let p = self.dir.join(name);
            fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    }

    fn run_start(&mut self, ns: &Netns) -> Result<()> {
        let conf = self.dir.join("dovecot.conf");
        // dovecot forks the master and exits; its errors go to stderr (and the log).
        let out =
            nsenter_output(ns, Path::new(DOVECOT), &[std::ffi::OsStr::new("-c"), conf.as_os_str()], START_TIMEOUT)?;
        if !out.success() {
            bail!("`dovecot -c {}` failed: {out}\nlog:\n{}", conf.display(), self.log());
        }
        let pid_file = self.dir.join("run/master.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let pid = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| self.pids().contains(p)) {
                self.master_pid = pid;
                break;
            }
            if Instant::now() >= deadline {
                bail!("no running master in {} after {START_TIMEOUT:?}; log:\n{}", pid_file.display(), self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            let out = self.nsenter(Path::new("ss"), &["-Hltn"])?;
            let listening: Vec<&str> = out.stdout.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
            let missing: Vec<&SocketAddr> =
                self.imap.iter().chain(&self.pop3).filter(|a| !listening.contains(&a.to_string().as_str())).collect();
            let socket_missing = self.auth_socket.as_ref().is_some_and(|s| !s.exists());
            if missing.is_empty() && !socket_missing {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Dovecot does not listen on {missing:?} (auth socket missing: {socket_missing}) after \
                     {START_TIMEOUT:?} (ss: {listening:?}); log:\n{}",
                    self.log()
                );
            }
            if self.pids().is_empty() {
                bail!("Dovecot exited during start; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn nsenter(&self, bin: &Path, args: &[&str]) -> Result<crate::netlab::CmdOutput> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display())).arg("--").arg(bin).args(args);
        run_capture(&mut cmd, START_TIMEOUT)
    }

    /// The instance directory (`/tmp/gk-dovecot-<pid>-<n>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/dovecot.log` (`log_path`): what a `file` log source follows.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dovecot.log")
    }

    /// The absolute path of Postfix's SASL socket, if asked for
    /// ([`DovecotOptions::with_auth_socket`]): give it to
    /// [`crate::mta::PostfixOptions::with_sasl_dovecot`].
    pub fn auth_socket(&self) -> Option<&Path> {
        self.auth_socket.as_deref()
    }

    /// Every address IMAP listens on.
    pub fn imap_addrs(&self) -> &[SocketAddr] {
        &self.imap
    }

    /// Every address POP3 listens on.
    pub fn pop3_addrs(&self) -> &[SocketAddr] {
        &self.pop3
    }

    /// The master's pid (from `run/master.pid` at start).
    pub fn master_pid(&self) -> i32 {
        self.master_pid
    }

    /// Pids of this instance's live processes (by working directory).
    pub fn pids(&self) -> Vec<i32> {
        procs_in(&self.dir)
    }

    /// The whole log so far ("" before it exists).
    pub fn log(&self) -> String {
        fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned).collect()
    }

    /// Waits (bounded) until a log line contains every one of `needles` and
    /// returns the first such line; fails early if the instance stopped.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        Ok(self.wait_for_log_count(needles, 1, timeout)?.swap_remove(0))
    }

    /// Waits (bounded) until at least `n` log lines contain every one of
    /// `needles` and returns them all. Lines reach the file through
    /// Dovecot's log process, possibly after the client got its reply: wait,
    /// never just read.
    pub fn wait_for_log_count(&self, needles: &[&str], n: usize, timeout: Duration) -> Result<Vec<String>> {
        let (lines, alive, log) = (|| self.log_lines(needles), || !self.pids().is_empty(), || self.log());
        crate::mta::wait_for_lines("Dovecot", &format!("{needles:?}"), n, timeout, lines, alive, log)
    }

    /// Stops the instance and returns once none of its processes is left:
    /// SIGTERM to the pid in `run/master.pid` (if that process still works
    /// in the instance directory), then SIGKILL to each process of the
    /// instance (by working directory, never by name), each step bounded.
    /// The directory stays (the log can still be read) until drop. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pids = self.pids();
        if pids.is_empty() {
            return Ok(());
        }
        let pid_file = self.dir.join("run/master.pid");
        let master =
            fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()).unwrap_or(self.master_pid);
        // Only a pid that is one of ours: never a recycled stranger.
        if master > 0 && pids.contains(&master) {
            let _ = kill(Pid::from_raw(master), Signal::SIGTERM);
            if wait_gone(&self.dir, STOP_TIMEOUT) {
                return Ok(());
            }
        }
        kill_procs_in(&self.dir);
        if wait_gone(&self.dir, STOP_TIMEOUT) {
            return Ok(());
        }
        bail!("Dovecot processes {:?} of {} survived SIGTERM and SIGKILL", self.pids(), self.dir.display())
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let stopped = self.stop();
        crate::mta::teardown("dovecot", &self.dir, &self.netns_name, || self.log(), stopped);
    }
}

/// Kills the processes of, and removes, every `/tmp/gk-dovecot-<pid>-<n>`
/// whose creating process is gone; returns what was removed.
/// [`Dovecot::start`] calls it.
pub fn cleanup_stale() -> Vec<String> {
    cleanup_stale_dirs(DIR_PREFIX)
}

// ---------------------------------------------------------------------------
// Login clients

/// One IMAP `LOGIN` from `client` (a test address in `ns`) to `server`:
/// greeting, `a1 LOGIN "user" "pass"`, then `a2 LOGOUT`. `Ok(true)` on a
/// tagged `OK`, `Ok(false)` on `NO`; anything else (no greeting, `BAD`, a
/// closed connection, no reply within [`LOGIN_TIMEOUT`]) is an error. See
/// the module docs on the auth penalty: a failure from an address that
/// failed before answers only after seconds.
pub fn imap_login(ns: &Netns, client: IpAddr, server: SocketAddr, user: &str, pass: &str) -> Result<bool> {
    let what = format!("IMAP LOGIN {user:?} from {client} to {server}");
    let quote = |s: &str| -> Result<String> {
        if s.chars().any(|c| c.is_control()) {
            bail!("{what}: control characters in a quoted string");
        }
        Ok(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
    };
    let login = format!("a1 LOGIN {} {}\r\n", quote(user)?, quote(pass)?);
    let mut conn = LineConn::connect(ns, client, server).with_context(|| what.clone())?;
    let greeting = conn.line().with_context(|| format!("{what}: greeting"))?;
    if !greeting.starts_with("* OK") {
        bail!("{what}: greeting {greeting:?}");
    }
    conn.send(&login).with_context(|| what.clone())?;
    let reply = conn.tagged("a1 ").with_context(|| format!("{what}: reply"))?;
    let ok = match reply.split_whitespace().nth(1) {
        Some("OK") => true,
        Some("NO") => false,
        _ => bail!("{what}: reply {reply:?}"),
    };
    // A polite end; its outcome does not matter.
    if conn.send("a2 LOGOUT\r\n").is_ok() {
        let _ = conn.tagged("a2 ");
    }
    Ok(ok)
}

/// One POP3 `USER`/`PASS` from `client` to `server`, then `QUIT`:
/// `Ok(true)` on `+OK` to PASS, `Ok(false)` on `-ERR` (to USER or PASS);
/// anything else is an error. Bounded like [`imap_login`].
pub fn pop3_login(ns: &Netns, client: IpAddr, server: SocketAddr, user: &str, pass: &str) -> Result<bool> {
    let what = format!("POP3 USER {user:?} from {client} to {server}");
    if user.chars().chain(pass.chars()).any(|c| c.is_control()) {
        bail!("{what}: control characters in the user or password");
    }
    let mut conn = LineConn::connect(ns, client, server).with_context(|| what.clone())?;
    let greeting = conn.line().with_context(|| format!("{what}: greeting"))?;
    if !greeting.starts_with("+OK") {
        bail!("{what}: greeting {greeting:?}");
    }
    let mut ok = true;
    for cmd in [format!("USER {user}\r\n"), format!("PASS {pass}\r\n")] {
        conn.send(&cmd).with_context(|| what.clone())?;
        let reply = conn.line().with_context(|| format!("{what}: reply"))?;
        if reply.starts_with("-ERR") {
            ok = false;
            break;
        }
        if !reply.starts_with("+OK") {
            bail!("{what}: reply {reply:?}");
        }
    }
    if conn.send("QUIT\r\n").is_ok() {
        let _ = conn.line();
    }
    Ok(ok)
}

/// A line-oriented TCP client with bounded reads.
struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConn {
    fn connect(ns: &Netns, client: IpAddr, server: SocketAddr) -> Result<Self> {
        if !is_allowed_endpoint(client) || !is_allowed_endpoint(server.ip()) || server.ip().is_unspecified() {
            bail!("{client} -> {server}: not test addresses");
        }
        let stream = match tcp_connect_stream(ns, client, server, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(ConnectOutcome::Refused) => bail!("connect: refused"),
            Err(ConnectOutcome::TimedOut) => bail!("connect: timed out after {CONNECT_TIMEOUT:?}"),
            Err(e) => bail!("connect: {e:?}"),
        };
        stream.set_read_timeout(Some(LOGIN_TIMEOUT))?;
        stream.set_write_timeout(Some(LOGIN_TIMEOUT))?;
        Ok(Self { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn send(&mut self, text: &str) -> Result<()> {
        self.writer.write_all(text.as_bytes()).context("send")
    }

    /// One line without CRLF, at most [`MAX_LINE`] bytes.
    fn line(&mut self) -> Result<String> {
        let mut buf = Vec::new();
        let n = self.reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf).context("read")?;
        if n == 0 {
            bail!("connection closed");
        }
        if buf.last() != Some(&b'\n') {
            bail!("line longer than {MAX_LINE} bytes or cut off");
        }
        Ok(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Reads lines (at most [`MAX_LINES`]) until one starts with `tag`.
    fn tagged(&mut self, tag: &str) -> Result<String> {
        for _ in 0..MAX_LINES {
            let line = self.line()?;
            if line.starts_with(tag) {
                return Ok(line);
            }
        }
        Err(anyhow!("no {tag:?} reply within {MAX_LINES} lines"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn options_refuse_bad_input() {
        let ok = DovecotOptions::new(&[ip("192.0.2.25")]).with_user("alice", "secret");
        assert!(ok.check().is_ok());
        assert!(DovecotOptions::new(&[ip("10.0.0.1")]).check().is_err());
        assert!(DovecotOptions::new(&[]).check().is_err());
        assert!(ok.clone().with_user("bob:x", "p").check().is_err());
        assert!(ok.clone().with_user("bob", "p:q").check().is_err());
        assert!(ok.clone().with_user("bob", "p\nq").check().is_err());
        assert!(ok.clone().with_user("alice", "again").check().is_err());
        let mut same = ok.clone();
        same.pop3_port = Some(143);
        assert!(same.check().is_err());
        let mut none = ok;
        none.imap_port = None;
        none.pop3_port = None;
        assert!(none.check().is_err());
        assert!(none.with_auth_socket().check().is_ok());
    }

    #[test]
    fn config_text() {
        let o =
            DovecotOptions::new(&[ip("192.0.2.25"), ip("2001:db8::25")]).with_user("alice", "s3").with_auth_socket();
        let dir = Path::new("/tmp/gk-dovecot-1-0");
        let conf = o.conf_text(dir);
        for want in [
            "base_dir = /tmp/gk-dovecot-1-0/run\n",
            "log_path = /tmp/gk-dovecot-1-0/dovecot.log\n",
            "auth_verbose = yes\n",
            "protocols = imap pop3\n",
            "listen = 192.0.2.25, 2001:db8::25\n",
            "ssl = no\n",
            "disable_plaintext_auth = no\n",
            "service imap-login {\n  inet_listener imap {\n    port = 143\n",
            "unix_listener auth-postfix {\n    mode = 0666\n",
        ] {
            assert!(conf.contains(want), "{want:?} not in\n{conf}");
        }
        assert_eq!(o.users_text(dir), "alice:{PLAIN}s3:65534:65534::/tmp/gk-dovecot-1-0/home/alice\n");
        assert_eq!(o.imap_addrs().len(), 2);
        let mut imap_only = o;
        imap_only.pop3_port = None;
        assert!(imap_only.conf_text(dir).contains("protocols = imap\n"));
        assert!(imap_only.pop3_addrs().is_empty());
        assert!(!conf.contains("anvil-auth-penalty"));
        let fast = imap_only.without_auth_penalty().conf_text(dir);
        assert!(fast.contains("auth_failure_delay = 0\n"), "{fast}");
        assert!(fast.contains("unix_listener anvil-auth-penalty {\n    mode = 0\n"), "{fast}");
    }
}
