//! Real mail software inside test namespaces: Debian's Postfix as a receiving
//! MX or a sending relay ([`Postfix`]), the `swaks` SMTP client ([`swaks`]),
//! and [`RefusingSmtp`], a tiny server that refuses every recipient.
//!
//! Why real ones: what a refused sender learns is only worth something if
//! real MTAs read it that way — Postfix must log a `550 5.7.1` at RCPT as
//! `status=bounced (host ... said: ...)`, a good source must still reach the
//! real MX behind the gate — and a home-made client would only confirm our
//! own reading of RFC 5321.
//!
//! # Postfix
//!
//! Every [`Postfix`] is a private instance, `postfix -c DIR/conf`, in a
//! fresh directory `/tmp/gk-postfix-<pid>-<n>` (mode 0755, so the daemons,
//! which run as user `postfix`, can reach it):
//!
//! | path            | what |
//! |-----------------|------|
//! | `conf/main.cf`, `conf/master.cf` | written from [`PostfixOptions`] |
//! | `conf/transport` | the relay's `transport_maps` (texthash: no postmap) |
//! | `queue/`        | `queue_directory` (Postfix makes its subdirectories); `queue/pid/master.pid` |
//! | `data/`         | `data_directory` (owned by `postfix`) |
//! | `mail/inbox/`   | the receiver's Maildir: every accepted recipient lands here |
//! | `maillog`       | the log, written by `postlogd` (`maillog_file`; no syslog here) |
//!
//! The system's instance (`/etc/postfix`, `/var/spool/postfix`) is never
//! used; only the package's read-only files under `/etc/postfix`
//! (`postfix-files`, `dynamicmaps.cf`) are read, as by any instance. Every
//! service runs unchrooted (chroot column `n`), so nothing has to be copied
//! into a jail. `postfix start` runs with `nsenter --net=`, so the master,
//! which daemonizes, and every daemon it forks live in the test's
//! namespace; it runs under `script` because postfix(1) reports a failed
//! start only on a terminal (or syslog, which this machine lacks).
//!
//! Roles are just options: a *receiver* ([`PostfixOptions::receiver`])
//! accepts mail for its domains from anyone and delivers it to the Maildir
//! (`virtual_mailbox_*`: log line `relay=virtual ... status=sent`, and a file
//! [`Postfix::mailbox`] returns); a *relay* ([`PostfixOptions::relay`])
//! accepts mail from `mynetworks` and sends it on per `transport_maps`
//! (`domain smtp:[ip]:port`, no DNS). Everything else, bounces included,
//! goes to `default_transport = discard:`, so no mail ever looks for a way
//! out of the namespace.
//!
//! Options for the log and policy tests:
//! - [`PostfixOptions::with_sasl_dovecot`]: SMTP AUTH through a
//!   [`crate::dovecot::Dovecot`] auth socket (plaintext AUTH, no TLS). A
//!   failure logs `warning: unknown[ADDR]: SASL PLAIN authentication failed:
//!   (reason unavailable), sasl_username=U` here *and* a Dovecot
//!   `auth: Info: passwd-file(U,ADDR): Password mismatch` line without a
//!   session (after Dovecot's `auth_failure_delay`, 2 s).
//! - [`PostfixOptions::with_local_users`]: a `mydestination` domain with a
//!   fixed recipient list: others get `550 5.1.1 ... User unknown in local
//!   recipient table` (`NOQUEUE: reject: RCPT ...`, or `QID: reject: ...`
//!   once a recipient of the transaction was accepted). Local mail goes to
//!   the Maildir (`local_transport = virtual`).
//! - [`PostfixOptions::with_bounce_sink`]: a second smtpd (tag
//!   `postfix/sink/smtpd`) on another port of the first listen address
//!   answers every RCPT with 550 5.1.1; mail for [`BOUNCE_DOMAIN`] goes
//!   there, so the queue logs `dsn=5.1.1, status=bounced`. **Pitfall**: the
//!   sink's own `NOQUEUE: reject: RCPT from unknown[LISTEN-ADDR]: 550 5.1.1`
//!   lines land in the same maillog with the instance's own address as
//!   client; a log reader that counts unknown recipients per client address
//!   sees them. Where that matters, use a [`RefusingSmtp`] answering
//!   `550 5.1.1 ...` plus [`PostfixOptions::with_transport`] instead (same
//!   bounce lines, nothing logged for the refusal).
//! - [`PostfixOptions::with_policy`]: `check_policy_service { unix:PATH,
//!   timeout=2s, default_action=DUNNO, try_limit=1 }` first in
//!   `smtpd_recipient_restrictions` and in `smtpd_data_restrictions`. smtpd
//!   runs as user `postfix`, unchrooted: the socket (and its directories)
//!   must let that user connect (e.g. mode 0666 in a 0755 directory, or
//!   owner postfix). A dead socket costs one try, then mail flows (DUNNO).
//! - [`SwaksArgs::auth`], [`SwaksArgs::rcpts`], [`SwaksRun::replies_to`],
//!   [`SwaksRun::expect_reply`] drive and check such sessions.
//!
//! Settings that differ from a stock Postfix, for tests: no TLS, no SMTPUTF8,
//! no DNS (`smtpd_peername_lookup = no`: the namespace has no resolver, the
//! client shows as `unknown[ADDR]`), and `smtp_connect_timeout = 5s`, so a
//! SYN that is dropped defers the mail within seconds. [`Postfix::flush`]
//! retries deferred mail at once.
//!
//! Processes of an instance are found by their working directory: every
//! Postfix daemon `chdir`s to its `queue_directory`, which is unique per
//! instance. [`Postfix::stop`] (and `Drop`) runs `postfix stop`, then
//! `postfix abort`, then SIGKILLs those processes — never anything found by
//! name, since other tests' instances run beside it. `Drop` then removes the
//! directory; [`cleanup_stale`] removes the instances of dead test processes.
//!
//! Requires root (namespaces, `postfix start`) and the Debian packages
//! `postfix`, `swaks` and `libio-socket-inet6-perl` (swaks' IPv6), which
//! `cargo xtask setup` installs. Every wait is bounded.

use std::{
    ffi::OsStr,
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use ipnet::IpNet;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netlab::{
    check_test_net, in_netns, is_allowed_endpoint, is_test_addr, run_capture, CmdOutput, Netns, LISTENER_MAX_LIFETIME,
    TEST_NETS,
};

/// Where Debian installs the programs used here.
pub const POSTFIX: &str = "/usr/sbin/postfix";
pub const POSTQUEUE: &str = "/usr/sbin/postqueue";
pub const SWAKS: &str = "/usr/bin/swaks";
/// Prefix of every instance directory under [`TMP`]; the full name is
/// `gk-postfix-<pid>-<n>`, so [`cleanup_stale`] and `cargo xtask test` can
/// tell a dead test process's leftovers from a running one's.
pub const DIR_PREFIX: &str = "gk-postfix-";
pub const TMP: &str = "/tmp";
/// Bound for `postfix start` (about 2 s here: its checks, then the master).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `postfix stop`, then `postfix abort`, get before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for the other Postfix commands (`postqueue -f`, `postfix stop`).
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// The receiver's Maildir, relative to `DIR/mail`.
const MAILDIR: &str = "inbox";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics with a clear message unless Postfix and swaks are installed.
pub fn require_mta() {
    for bin in [POSTFIX, POSTQUEUE, SWAKS] {
        assert!(Path::new(bin).exists(), "{bin} is missing: run `cargo xtask setup` (Debian packages postfix, swaks)");
    }
}

// ---------------------------------------------------------------------------
// Options

/// What a [`Postfix`] instance listens on and does with mail. Build one with
/// [`Self::receiver`] or [`Self::relay`] and adjust fields or chain the
/// `with_*` methods.
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// `inet_interfaces`: test addresses or loopback, at least one, each
    /// configured in the namespace (else the start fails naming it).
    pub listen: Vec<IpAddr>,
    /// smtpd ports (one `PORT inet ... smtpd` line each in master.cf); 25
    /// unless changed, add 587 for a submission port.
    pub ports: Vec<u16>,
    /// `myhostname` (the banner and the HELO name); must contain a dot.
    pub myhostname: String,
    /// `mynetworks`: clients that may relay through this instance. Default:
    /// loopback and all four test ranges (the namespaces are closed, and
    /// mail for unknown domains is discarded anyway).
    pub mynetworks: Vec<IpNet>,
    /// Domains accepted for every recipient and delivered to the Maildir
    /// (`virtual_mailbox_domains`).
    pub domains: Vec<String>,
    /// `transport_maps`: mail for a domain goes by SMTP to this address
    /// (`domain smtp:[ip]:port`), from `smtp_bind` if set.
    pub transports: Vec<(String, SocketAddr)>,
    /// Source addresses of outgoing SMTP (`smtp_bind_address`,
    /// `smtp_bind_address6`): at most one of each family. Unset, the kernel
    /// picks (Postfix itself uses the listen address when there is only one
    /// IPv4 one).
    pub smtp_bind: Vec<IpAddr>,
    /// `inet_protocols`; `None` derives it from the addresses above
    /// (`ipv4`, `ipv6` or `all`).
    pub inet_protocols: Option<String>,
    /// main.cf lines appended after the generated ones; a parameter set here
    /// overrides the generated one (Postfix takes the last setting).
    pub main_cf: Vec<String>,
    /// master.cf lines appended after the generated services.
    pub master_cf: Vec<String>,
    /// SMTP AUTH through Dovecot: the absolute path of a Dovecot auth
    /// socket ([`crate::dovecot::Dovecot::auth_socket`]). Sets
    /// `smtpd_sasl_type = dovecot`, `smtpd_sasl_path`,
    /// `smtpd_sasl_auth_enable = yes` (every smtpd port but the bounce
    /// sink), `broken_sasl_auth_clients = yes` and
    /// `smtpd_sasl_security_options = noanonymous` (plaintext AUTH without
    /// TLS: `smtpd_tls_security_level = none` is always set here).
    pub sasl_dovecot: Option<PathBuf>,
    /// A policy service (absolute path of a Unix socket that user
    /// `postfix` can connect to): `check_policy_service { unix:PATH,
    /// timeout=2s, default_action=DUNNO, try_limit=1 }` first in
    /// `smtpd_recipient_restrictions` and in `smtpd_data_restrictions`.
    pub policy: Option<PathBuf>,
    /// A local domain (`mydestination`) whose recipients are only
    /// [`Self::local_users`] (`local_recipient_maps`): any other gets
    /// `550 5.1.1 <r>: Recipient address rejected: User unknown in local
    /// recipient table` at RCPT. Mail for the users lands in the Maildir.
    pub local_domain: Option<String>,
    /// Local parts accepted for [`Self::local_domain`].
    pub local_users: Vec<String>,
    /// Bounce sink: a second smtpd on this port of the first listen
    /// address that answers every RCPT with `550 5.1.1 User unknown here`;
    /// mail for [`Self::bounce_domains`] is sent there, so the queue logs
    /// real `dsn=5.1.1, status=bounced` lines.
    pub bounce_sink: Option<u16>,
    /// Domains routed to the bounce sink (default [`BOUNCE_DOMAIN`]).
    pub bounce_domains: Vec<String>,
}

/// The domain [`PostfixOptions::with_bounce_sink`] routes to the sink.
pub const BOUNCE_DOMAIN: &str = "remote.test";
/// The access(5) action the bounce sink takes for every RCPT: the client
/// reads `550 5.1.1 <rcpt>: Recipient address rejected: User unknown here`.
pub const BOUNCE_SINK_REPLY: &str = "550 5.1.1 User unknown here";
/// `syslog_name` of the bounce sink's smtpd: its lines are tagged
/// `postfix/sink/smtpd`.
pub const BOUNCE_SINK_SYSLOG_NAME: &str = "postfix/sink";

impl PostfixOptions {
    fn base(listen: &[IpAddr], myhostname: &str) -> Self {
        let mut mynetworks: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        mynetworks.extend(TEST_NETS.iter().map(|n| n.parse::<IpNet>().unwrap()));
        Self {
            listen: listen.to_vec(),
            ports: vec![25],
            myhostname: myhostname.to_owned(),
            mynetworks,
            domains: Vec::new(),
            transports: Vec::new(),
            smtp_bind: Vec::new(),
            inet_protocols: None,
            main_cf: Vec::new(),
            master_cf: Vec::new(),
            sasl_dovecot: None,
            policy: None,
            local_domain: None,
            local_users: Vec::new(),
            bounce_sink: None,
            bounce_domains: Vec::new(),
        }
    }

    /// An MX for `domain` (hostname `mx.<domain>`) listening on `listen`
    /// port 25: accepts every recipient of the domain from anyone and
    /// delivers to the Maildir.
    pub fn receiver(listen: &[IpAddr], domain: &str) -> Self {
        Self { domains: vec![domain.to_owned()], ..Self::base(listen, &format!("mx.{domain}")) }
    }

    /// A sending relay (hostname `relay.sender.test`) listening on `listen`
    /// port 25: accepts mail from `mynetworks` and sends it per
    /// `transports` (domain → server address).
    pub fn relay(listen: &[IpAddr], transports: &[(&str, SocketAddr)]) -> Self {
        let transports = transports.iter().map(|(d, a)| ((*d).to_owned(), *a)).collect();
        Self { transports, ..Self::base(listen, "relay.sender.test") }
    }

    pub fn with_transport(mut self, domain: &str, to: SocketAddr) -> Self {
        self.transports.push((domain.to_owned(), to));
        self
    }

    pub fn with_smtp_bind(mut self, source: IpAddr) -> Self {
        self.smtp_bind.push(source);
        self
    }

    /// Appends a main.cf line such as `smtp_connect_timeout = 2s`.
    pub fn with_main_cf(mut self, line: &str) -> Self {
        self.main_cf.push(line.to_owned());
        self
    }

    /// SMTP AUTH through the Dovecot auth socket at `socket` (absolute).
    pub fn with_sasl_dovecot(mut self, socket: &Path) -> Self {
        self.sasl_dovecot = Some(socket.to_path_buf());
        self
    }

    /// Asks the policy service at `socket` (absolute) at RCPT and DATA.
    pub fn with_policy(mut self, socket: &Path) -> Self {
        self.policy = Some(socket.to_path_buf());
        self
    }

    /// `domain` becomes local (`mydestination`) with exactly these
    /// recipients (local parts); everyone else there is "User unknown".
    pub fn with_local_users(mut self, domain: &str, users: &[&str]) -> Self {
        self.local_domain = Some(domain.to_owned());
        self.local_users = users.iter().map(|u| (*u).to_owned()).collect();
        self
    }

    /// A bounce sink on `port` of the first listen address, and mail for
    /// [`BOUNCE_DOMAIN`] (and any domain added to `bounce_domains`) routed
    /// to it.
    pub fn with_bounce_sink(mut self, port: u16) -> Self {
        self.bounce_sink = Some(port);
        if self.bounce_domains.is_empty() {
            self.bounce_domains.push(BOUNCE_DOMAIN.to_owned());
        }
        self
    }

    /// Every address the instance's main smtpd listens on (not the sink).
    pub fn smtp_addrs(&self) -> Vec<SocketAddr> {
        self.listen.iter().flat_map(|&ip| self.ports.iter().map(move |&p| SocketAddr::new(ip, p))).collect()
    }

    /// The bounce sink's address, if one is configured.
    pub fn bounce_sink_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(*self.listen.first()?, self.bounce_sink?))
    }

    /// Refuses what could reach outside the test ranges or that Postfix
    /// would reject with a less clear message.
    fn check(&self) -> Result<()> {
        if self.listen.is_empty() {
            bail!("PostfixOptions: no listen address");
        }
        if let Some(ip) = self.listen.iter().find(|ip| !is_allowed_endpoint(**ip) || ip.is_unspecified()) {
            bail!("PostfixOptions: listen address {ip} is neither a test address nor loopback");
        }
        if self.ports.is_empty() || self.ports.contains(&0) {
            bail!("PostfixOptions: ports {:?} must be non-empty and non-zero", self.ports);
        }
        if !self.myhostname.contains('.') || !is_domain(&self.myhostname) {
            bail!("PostfixOptions: myhostname {:?} must be a dotted name", self.myhostname);
        }
        let loopback: [IpNet; 2] = ["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        for net in &self.mynetworks {
            if !loopback.iter().any(|l| l.contains(net)) {
                check_test_net(&net.to_string()).context("PostfixOptions: mynetworks")?;
            }
        }
        for d in self.domains.iter().chain(self.transports.iter().map(|(d, _)| d)) {
            if !is_domain(d) {
                bail!("PostfixOptions: bad domain {d:?}");
            }
        }
        if let Some((d, a)) = self.transports.iter().find(|(_, a)| !is_test_addr(a.ip()) || a.port() == 0) {
            bail!("PostfixOptions: transport {d} -> {a} is not a test address and port");
        }
        for (what, path) in [("sasl_dovecot", &self.sasl_dovecot), ("policy", &self.policy)] {
            if let Some(p) = path {
                let text = p.to_string_lossy();
                if !p.is_absolute() || text.chars().any(|c| c.is_whitespace() || ",{}=".contains(c)) {
                    bail!("PostfixOptions: {what} socket {} must be an absolute path without blanks, commas, braces or '='", p.display());
                }
            }
        }
        if let Some(d) = &self.local_domain {
            if !is_domain(d) {
                bail!("PostfixOptions: bad local domain {d:?}");
            }
            if self.domains.iter().chain(&self.bounce_domains).any(|v| v.eq_ignore_ascii_case(d)) {
                bail!("PostfixOptions: local domain {d} is also a Maildir or bounce domain");
            }
        }
        if let Some(u) = self
            .local_users
            .iter()
            .find(|u| u.is_empty() || !u.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)))
        {
            bail!("PostfixOptions: bad local user {u:?} (letters, digits, . _ - + only)");
        }
        if !self.local_users.is_empty() && self.local_domain.is_none() {
            bail!("PostfixOptions: local users {:?} without a local domain", self.local_users);
        }
        if let Some(port) = self.bounce_sink {
            if port == 0 || self.ports.contains(&port) {
                bail!(
                    "PostfixOptions: bounce sink port {port} must be non-zero and not one of the smtpd ports {:?}",
                    self.ports
                );
            }
            if self.bounce_domains.is_empty() {
                bail!("PostfixOptions: bounce sink on port {port} without a domain routed to it");
            }
        }
        if let Some(d) = self.bounce_domains.iter().find(|d| !is_domain(d)) {
            bail!("PostfixOptions: bad bounce domain {d:?}");
        }
        if !self.bounce_domains.is_empty() && self.bounce_sink.is_none() {
            bail!("PostfixOptions: bounce domains {:?} without a bounce sink port", self.bounce_domains);
        }
        if let Some(ip) = self.smtp_bind.iter().find(|ip| !is_test_addr(**ip)) {
            bail!("PostfixOptions: smtp_bind {ip} is not a test address");
        }
        if self.smtp_bind.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || self.smtp_bind.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            bail!("PostfixOptions: at most one smtp_bind address per family: {:?}", self.smtp_bind);
        }
        Ok(())
    }

    fn inet_protocols(&self) -> String {
        if let Some(p) = &self.inet_protocols {
            return p.clone();
        }
        let ips =
            || self.listen.iter().chain(&self.smtp_bind).copied().chain(self.transports.iter().map(|(_, a)| a.ip()));
        match (ips().any(|ip| ip.is_ipv4()), ips().any(|ip| ip.is_ipv6())) {
            (true, true) => "all".into(),
            (false, true) => "ipv6".into(),
            _ => "ipv4".into(),
        }
    }

    fn main_cf_text(&self, dir: &Path, owner: (u32, u32)) -> String {
        let d = dir.display();
        let v6 = |ip: IpAddr| if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
        let listen: Vec<String> = self.listen.iter().map(|ip| v6(*ip)).collect();
        let mynetworks: Vec<String> = self
            .mynetworks
            .iter()
            .map(|n| if n.addr().is_ipv6() { format!("[{}]/{}", n.addr(), n.prefix_len()) } else { n.to_string() })
            .collect();
        let mut text = format!(
            "# written by gatekeeper-tests (tests/src/mta.rs) for one test\n\
             compatibility_level = 3.6\n\
             queue_directory = {d}/queue\n\
             data_directory = {d}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             myhostname = {host}\n\
             inet_interfaces = {listen}\n\
             inet_protocols = {protocols}\n\
             mynetworks = {mynetworks}\n\
             mydestination = {local_domain}\n\
             relay_domains =\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps = {local_maps}\n\
             # local mail goes to the Maildir too (no local(8) here)\n\
             local_transport = virtual\n\
             smtputf8_enable = no\n\
             biff = no\n\
             smtpd_tls_security_level = none\n\
             smtp_tls_security_level = none\n\
             # no DNS: the namespace has none, and a lookup would only wait\n\
             smtpd_peername_lookup = no\n\
             smtp_connect_timeout = 5s\n\
             maillog_file = {d}/maillog\n\
             maillog_file_prefixes = {d}\n\
             transport_maps = texthash:{d}/conf/transport\n\
             default_transport = discard:not a test destination\n\
             virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {d}/mail\n\
             virtual_mailbox_maps = static:{MAILDIR}/\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n",
            host = self.myhostname,
            listen = listen.join(", "),
            protocols = self.inet_protocols(),
            mynetworks = mynetworks.join(" "),
            domains = self.domains.join(", "),
            uid = owner.0,
            gid = owner.1,
            local_domain = self.local_domain.as_deref().unwrap_or(""),
            local_maps =
                if self.local_domain.is_some() { format!("texthash:{d}/conf/local_recipients") } else { String::new() },
        );
        if let Some(socket) = &self.sasl_dovecot {
            text.push_str(&format!(
                "smtpd_sasl_type = dovecot\n\
                 smtpd_sasl_path = {}\n\
                 smtpd_sasl_auth_enable = yes\n\
                 broken_sasl_auth_clients = yes\n\
                 smtpd_sasl_security_options = noanonymous\n",
                socket.display()
            ));
        }
        if let Some(socket) = &self.policy {
            let check = format!(
                "check_policy_service {{ unix:{}, timeout=2s, default_action=DUNNO, try_limit=1 }}",
                socket.display()
            );
            text.push_str(&format!("smtpd_recipient_restrictions = {check}\nsmtpd_data_restrictions = {check}\n"));
        }
        for ip in &self.smtp_bind {
            let key = if ip.is_ipv6() { "smtp_bind_address6" } else { "smtp_bind_address" };
            text.push_str(&format!("{key} = {ip}\n"));
        }
        for line in &self.main_cf {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn master_cf_text(&self) -> String {
        // Every chroot column is `n`: no jail to fill with copies of /etc.
        let mut text = String::from("# service type private unpriv chroot wakeup maxproc command\n");
        for port in &self.ports {
            text.push_str(&format!("{port} inet n - n - - smtpd\n"));
        }
        if let Some(addr) = self.bounce_sink_addr() {
            // Its own listen address (inet_interfaces still applies), no
            // AUTH, no policy: every RCPT gets BOUNCE_SINK_REPLY.
            let host = if addr.is_ipv6() { format!("[{}]", addr.ip()) } else { addr.ip().to_string() };
            text.push_str(&format!(
                "{host}:{port} inet n - n - - smtpd -o syslog_name={BOUNCE_SINK_SYSLOG_NAME} \
                 -o {{ smtpd_recipient_restrictions = check_recipient_access static:{{{BOUNCE_SINK_REPLY}}}, reject_unauth_destination }} \
                 -o smtpd_sasl_auth_enable=no -o {{ smtpd_relay_restrictions = }} -o {{ smtpd_data_restrictions = }}\n",
                port = addr.port(),
            ));
        }
        text.push_str(
            "pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\n\
             relay unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             virtual unix - n n - - virtual\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n",
        );
        for line in &self.master_cf {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn transport_text(&self) -> String {
        let sink = self.bounce_sink_addr();
        let sinks = self.bounce_domains.iter().filter_map(|d| sink.map(|a| (d, a)));
        self.transports
            .iter()
            .map(|(d, a)| (d, *a))
            .chain(sinks)
            .map(|(domain, to)| format!("{domain} smtp:[{}]:{}\n", to.ip(), to.port()))
            .collect()
    }

    /// `local_recipient_maps` (texthash): each user by local part and by
    /// whole address.
    fn local_recipients_text(&self) -> String {
        let Some(domain) = &self.local_domain else { return String::new() };
        self.local_users.iter().map(|u| format!("{u} ok\n{u}@{domain} ok\n")).collect()
    }
}

fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

// ---------------------------------------------------------------------------
// Postfix

/// A running private Postfix instance inside a namespace (see the module
/// docs). Stops on drop and removes its directory. Declare it after the
/// [`Netns`] it runs in, so it is dropped first and can stop cleanly (if
/// the namespace goes first, its processes are killed with it).
#[derive(Debug)]
pub struct Postfix {
    dir: PathBuf,
    netns: PathBuf,
    netns_name: String,
    addrs: Vec<SocketAddr>,
    sink: Option<SocketAddr>,
    master_pid: i32,
    stopped: bool,
}

impl Postfix {
    /// Writes the instance's files, runs `postfix start` inside `ns` and
    /// returns once the master runs and smtpd listens on every address. On
    /// failure the error carries postfix's own message and the maillog, and
    /// nothing is left running or on disk.
    pub fn start(ns: &Netns, opts: PostfixOptions) -> Result<Postfix> {
        for bin in [POSTFIX, POSTQUEUE] {
            if !Path::new(bin).exists() {
                bail!("{bin} is missing: run `cargo xtask setup` (Debian package postfix)");
            }
        }
        opts.check()?;
        for gone in cleanup_stale() {
            eprintln!("mta: removed a dead test run's {gone}");
        }
        let owner = postfix_ids()?;
        let dir = Path::new(TMP).join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if fs::symlink_metadata(&dir).is_ok() {
            // Same pid and counter as ours: a leftover of a dead process.
            kill_procs_in(&dir);
            fs::remove_dir_all(&dir).with_context(|| format!("remove the stale {}", dir.display()))?;
        }
        // create (not create_all): fails on anything already there, symlinks included.
        fs::DirBuilder::new().mode(0o755).create(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut pf = Postfix {
            dir,
            netns: ns.path().to_path_buf(),
            netns_name: ns.name().to_owned(),
            addrs: opts.smtp_addrs(),
            sink: opts.bounce_sink_addr(),
            master_pid: 0,
            stopped: false,
        };
        // From here on Drop stops whatever started and removes the directory.
        pf.write_files(&opts, owner).with_context(|| format!("write the Postfix files in {}", pf.dir.display()))?;
        pf.run_start().with_context(|| format!("start Postfix in {}", pf.netns_name))?;
        Ok(pf)
    }

    fn write_files(&self, opts: &PostfixOptions, (uid, gid): (u32, u32)) -> Result<()> {
        // umask may be anything: set the modes the daemons (user postfix) need.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))?;
        for sub in ["conf", "queue", "data", "mail"] {
            let p = self.dir.join(sub);
            fs::create_dir(&p).with_context(|| format!("create {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        }
        for sub in ["data", "mail"] {
            std::os::unix::fs::chown(self.dir.join(sub), Some(uid), Some(gid))
                .with_context(|| format!("chown {sub} to postfix"))?;
        }
        let conf = self.conf_dir();
        for (name, text) in [
            ("main.cf", opts.main_cf_text(&self.dir, (uid, gid))),
            ("master.cf", opts.master_cf_text()),
            ("transport", opts.transport_text()),
            ("local_recipients", opts.local_recipients_text()),
        ] {
            let p = conf.join(name);
            fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    }

    fn run_start(&mut self) -> Result<()> {
        // postfix(1) writes its errors to stderr only when that is a
        // terminal: `script` gives it one (and passes the exit status on).
        let start = format!("{POSTFIX} -c {} start", self.conf_dir().display());
        let out = self.nsenter(Path::new("script"), &["-qec", &start, "/dev/null"], START_TIMEOUT)?;
        if !out.success() {
            bail!("`{start}` failed ({}): {}\nmaillog:\n{}", out.status, out.stdout.trim(), self.maillog());
        }
        let pid_file = self.dir.join("queue/pid/master.pid");
        let pid: i32 = fs::read_to_string(&pid_file)
            .with_context(|| format!("read {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("parse {}", pid_file.display()))?;
        if !self.pids().contains(&pid) {
            bail!(
                "master pid {pid} (from {}) is not running in {}; maillog:\n{}",
                pid_file.display(),
                self.dir.display(),
                self.maillog()
            );
        }
        self.master_pid = pid;
        // `postfix start` returns once the master has bound its sockets;
        // check that they are the ones asked for, bounded.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = self.nsenter(Path::new("ss"), &["-Hltn"], CMD_TIMEOUT)?;
            let listening: Vec<&str> = out.stdout.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
            let missing: Vec<&SocketAddr> =
                self.addrs.iter().chain(&self.sink).filter(|a| !listening.contains(&a.to_string().as_str())).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Postfix does not listen on {missing:?} after {START_TIMEOUT:?} (ss: {listening:?}); maillog:\n{}",
                    self.maillog()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `bin args` inside the instance's namespace.
    fn nsenter<S: AsRef<OsStr>>(&self, bin: &Path, args: &[S], timeout: Duration) -> Result<CmdOutput> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display())).arg("--").arg(bin).args(args);
        run_capture(&mut cmd, timeout)
    }

    /// `postfix -c DIR/conf VERB` (stop, abort, ...) inside the namespace.
    fn postfix_cmd(&self, verb: &str) -> Result<CmdOutput> {
        let conf = self.conf_dir();
        self.nsenter(Path::new(POSTFIX), &[OsStr::new("-c"), conf.as_os_str(), OsStr::new(verb)], CMD_TIMEOUT)
    }

    /// The instance directory (`/tmp/gk-postfix-<pid>-<n>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/conf`, for `postfix -c` / `postconf -c`.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }

    /// Every address smtpd listens on (listen addresses × ports).
    pub fn smtp_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bounce sink's address ([`PostfixOptions::with_bounce_sink`]).
    pub fn bounce_sink_addr(&self) -> Option<SocketAddr> {
        self.sink
    }

    /// The master's pid (read from `queue/pid/master.pid` at start).
    pub fn master_pid(&self) -> i32 {
        self.master_pid
    }

    /// Pids of this instance's live processes (master, daemons, and any
    /// postfix command working on it): those whose working directory lies
    /// in the instance directory. Zombies are not counted.
    pub fn pids(&self) -> Vec<i32> {
        procs_in(&self.dir)
    }

    /// The whole maillog so far ("" before it exists).
    pub fn maillog(&self) -> String {
        fs::read(self.dir.join("maillog")).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Maillog lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.maillog().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }

    /// Waits (bounded) until a maillog line contains `needle` and returns
    /// the first such line; fails early if the instance stopped running.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        Ok(self.wait_for_log_count(needle, 1, timeout)?.swap_remove(0))
    }

    /// Waits (bounded) until at least `n` maillog lines contain `needle` and
    /// returns them all.
    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> Result<Vec<String>> {
        wait_for_lines(
            "Postfix",
            &format!("{needle:?}"),
            n,
            timeout,
            || self.log_lines(needle),
            || !self.pids().is_empty(),
            || self.maillog(),
        )
    }

    /// The messages delivered to the receiver's Maildir so far (whole
    /// files, headers and body), oldest first.
    pub fn mailbox(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .filter_map(|sub| fs::read_dir(self.dir.join("mail").join(MAILDIR).join(sub)).ok())
            .flat_map(|rd| rd.flatten().map(|e| e.path()))
            .collect();
        // Maildir names start with the delivery time in seconds.
        files.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
        files.iter().filter_map(|p| fs::read(p).ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).collect()
    }

    /// `postqueue -f`: retry every deferred message now (and forget which
    /// destinations failed), instead of after Postfix's backoff of minutes.
    pub fn flush(&self) -> Result<()> {
        let conf = self.conf_dir();
        let out =
            self.nsenter(Path::new(POSTQUEUE), &[OsStr::new("-c"), conf.as_os_str(), OsStr::new("-f")], CMD_TIMEOUT)?;
        if !out.success() {
            bail!("{out}\nmaillog:\n{}", self.maillog());
        }
        Ok(())
    }

    /// Stops the instance and returns once none of its processes is left:
    /// `postfix stop`, then `postfix abort`, then SIGKILL to each process
    /// of this instance (by working directory, never by name), each step
    /// bounded. The directory stays (the maillog can still be read) until
    /// drop. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        for verb in ["stop", "abort"] {
            if self.pids().is_empty() {
                return Ok(());
            }
            // Fails if the master is gone meanwhile or the namespace is: the
            // wait below and the kill after it cover both.
            let _ = self.postfix_cmd(verb);
            if wait_gone(&self.dir, STOP_TIMEOUT) {
                return Ok(());
            }
        }
        kill_procs_in(&self.dir);
        if wait_gone(&self.dir, STOP_TIMEOUT) {
            return Ok(());
        }
        bail!("Postfix processes {:?} of {} survived stop, abort and SIGKILL", self.pids(), self.dir.display())
    }
}

/// Waits (bounded) until `lines()` holds at least `n` lines (at least one)
/// and returns them, checking every 500 ms that the daemon `what` still runs
/// (`alive`); errors carry its `log`.
pub(crate) fn wait_for_lines(
    what: &str,
    wanted: &str,
    n: usize,
    timeout: Duration,
    lines: impl Fn() -> Vec<String>,
    alive: impl Fn() -> bool,
    log: impl Fn() -> String,
) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut next_alive_check = Instant::now();
    loop {
        let got = lines();
        if got.len() >= n.max(1) {
            return Ok(got);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("{what} did not log {wanted} {n} time(s) within {timeout:?}; log:\n{}", log());
        }
        if now >= next_alive_check {
            if !alive() {
                bail!("{what} is not running (waiting for {wanted}); log:\n{}", log());
            }
            next_alive_check = now + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a daemon instance's Drop does once it is stopped (`stopped`): on a
/// failing test, the tail of its `log` on stderr; the stop's error; its
/// directory removed. `what` names it in the messages.
pub(crate) fn teardown(what: &str, dir: &Path, netns: &str, log: impl FnOnce() -> String, stopped: Result<()>) {
    if std::thread::panicking() {
        let log = log();
        let start = log.len().saturating_sub(6000);
        let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
        eprintln!("{what}: log of {} in {netns} (tail):\n{}", dir.display(), &log[start..]);
    }
    if let Err(e) = stopped {
        eprintln!("{what}: {e:#}");
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("{what}: cannot remove {}: {e}", dir.display());
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let stopped = self.stop();
        teardown("mta", &self.dir, &self.netns_name, || self.maillog(), stopped);
    }
}

/// uid and gid of the `postfix` user (the owner of data_directory and of
/// the Maildir, and the uid virtual(8) delivers as).
fn postfix_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = run_capture(Command::new("id").args([flag, "postfix"]), CMD_TIMEOUT)?;
        if !out.success() {
            bail!("no user postfix (is the postfix package installed?): {out}");
        }
        out.stdout.trim().parse().with_context(|| format!("parse `id {flag} postfix`: {:?}", out.stdout))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Live processes whose working directory lies in `dir` (every Postfix
/// daemon works in its queue_directory). Our own process is never one.
pub(crate) fn procs_in(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me)
        // A zombie's cwd cannot be read: zombies do not count.
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)))
        .collect()
}

pub(crate) fn kill_procs_in(dir: &Path) {
    for pid in procs_in(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Waits (bounded) until no process works in `dir`; true if none is left.
pub(crate) fn wait_gone(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if procs_in(dir).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the processes of, and removes, every `/tmp/gk-postfix-<pid>-<n>`
/// whose creating process is gone (a killed test run); returns what was
/// removed. Those of live processes are left alone. [`Postfix::start`]
/// calls it.
pub fn cleanup_stale() -> Vec<String> {
    cleanup_stale_dirs(DIR_PREFIX)
}

/// [`cleanup_stale`] for any `/tmp/<prefix><pid>-<n>` instance directory
/// (the Dovecot harness uses it too).
pub(crate) fn cleanup_stale_dirs(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(rd) = fs::read_dir(TMP) else { return removed };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else { continue };
        let Ok(owner) = owner.parse::<u32>() else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let path = e.path();
        kill_procs_in(&path);
        wait_gone(&path, Duration::from_secs(5));
        if fs::remove_dir_all(&path).is_ok() {
            removed.push(path.display().to_string());
        }
    }
    removed
}

// ---------------------------------------------------------------------------
// swaks

/// One `swaks` run: [`SwaksArgs::new`] with the server and envelope, then
/// the `with_*`/field adjustments.
#[derive(Clone, Debug)]
pub struct SwaksArgs {
    /// `--server` and `--port`.
    pub server: SocketAddr,
    /// `--local-interface`: the source address (a test address).
    pub local: Option<IpAddr>,
    pub from: String,
    pub to: String,
    /// `--helo`; unset, swaks says the machine's hostname.
    pub helo: Option<String>,
    /// `--quit-after` (CONNECT, BANNER, FIRST-HELO, HELO, MAIL, RCPT, ...).
    pub quit_after: Option<String>,
    /// `--timeout`: how long swaks waits for each step (connect included).
    pub timeout: Duration,
    /// `--auth MECH --auth-user U --auth-password P`: `(mechanism, user,
    /// password)`; see [`Self::auth`].
    pub auth: Option<(String, String, String)>,
    /// More swaks arguments, appended as they are.
    pub extra: Vec<String>,
}

impl SwaksArgs {
    pub fn new(server: SocketAddr, from: &str, to: &str) -> Self {
        Self {
            server,
            local: None,
            from: from.to_owned(),
            to: to.to_owned(),
            helo: None,
            quit_after: None,
            timeout: Duration::from_secs(10),
            auth: None,
            extra: Vec::new(),
        }
    }

    /// SMTP AUTH PLAIN as `user` with `password` (plaintext: the harness's
    /// Postfix offers AUTH without TLS when it has SASL).
    pub fn auth(self, user: &str, password: &str) -> Self {
        self.auth_mech("PLAIN", user, password)
    }

    /// SMTP AUTH with a chosen mechanism (`PLAIN`, `LOGIN`).
    pub fn auth_mech(mut self, mechanism: &str, user: &str, password: &str) -> Self {
        self.auth = Some((mechanism.to_owned(), user.to_owned(), password.to_owned()));
        self
    }

    /// Several recipients in one transaction (one RCPT each, in order;
    /// swaks's `--to a,b`); see [`SwaksRun::replies_to`].
    pub fn rcpts(mut self, rcpts: &[&str]) -> Self {
        self.to = rcpts.join(",");
        self
    }

    pub fn local(mut self, source: IpAddr) -> Self {
        self.local = Some(source);
        self
    }

    pub fn helo(mut self, name: &str) -> Self {
        self.helo = Some(name.to_owned());
        self
    }

    pub fn quit_after(mut self, stop_point: &str) -> Self {
        self.quit_after = Some(stop_point.to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_owned());
        self
    }

    fn argv(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--server".into(),
            self.server.ip().to_string(),
            "--port".into(),
            self.server.port().to_string(),
            "--from".into(),
            self.from.clone(),
            "--to".into(),
            self.to.clone(),
            "--timeout".into(),
            self.timeout.as_secs().max(1).to_string(),
        ];
        if let Some(l) = self.local {
            v.extend(["--local-interface".into(), l.to_string()]);
        }
        if let Some(h) = &self.helo {
            v.extend(["--helo".into(), h.clone()]);
        }
        if let Some(q) = &self.quit_after {
            v.extend(["--quit-after".into(), q.clone()]);
        }
        if let Some((mech, user, pass)) = &self.auth {
            v.extend(["--auth".into(), mech.clone(), "--auth-user".into(), user.clone()]);
            v.extend(["--auth-password".into(), pass.clone()]);
        }
        v.extend(self.extra.iter().cloned());
        v
    }

    /// swaks gets killed after this long: every step may take `timeout`,
    /// and a whole session has fewer than 8 of them.
    fn limit(&self) -> Duration {
        self.timeout.max(Duration::from_secs(1)) * 8 + Duration::from_secs(5)
    }
}

/// What one swaks run left: exit status and its whole transcript.
///
/// swaks's exit codes say where a session ended: 0 delivered (or quit
/// where asked), 2 no connection, 6 closed unexpectedly, 21 bad banner, 22
/// HELO refused, 23 MAIL refused, 24 no RCPT accepted, 25 DATA refused, 26
/// the message refused. In the transcript, `<-` marks a server reply, `<**`
/// an error reply (4xx/5xx), `->` what swaks sent and `***` swaks's own errors.
#[derive(Clone, Debug)]
pub struct SwaksRun {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    /// stdout and stderr, interleaved as written.
    pub transcript: String,
}

/// swaks's transcript prefixes (3 characters and a space): server replies
/// (plain, TLS, error, TLS error) and client lines (plain, TLS, error, TLS error).
const REPLY_MARKS: [&str; 4] = ["<- ", "<~ ", "<**", "<~*"];
const SENT_MARKS: [&str; 4] = [" ->", " ~>", "**>", "*~>"];

fn split_mark<'a>(line: &'a str, marks: &[&str]) -> Option<&'a str> {
    let (mark, rest) = (line.get(..3)?, line.get(3..)?);
    marks.contains(&mark).then(|| rest.strip_prefix(' ').unwrap_or(rest))
}

/// `(code, line)` of a reply line such as `250-PIPELINING`.
fn parse_reply(text: &str) -> Option<(u16, String)> {
    let code = text.get(..3)?.parse().ok()?;
    Some((code, text.to_owned()))
}

impl SwaksRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// swaks's exit code (`None` if a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Every server reply line, in order, as `(code, line)` with the marker
    /// removed, e.g. `(550, "550 5.7.1 no PTR for ...")`. Multi-line replies
    /// give one entry per line (`250-...` lines included).
    pub fn replies(&self) -> Vec<(u16, String)> {
        self.transcript.lines().filter_map(|l| split_mark(l, &REPLY_MARKS)).filter_map(parse_reply).collect()
    }

    /// Server replies that swaks marked as errors (`<**`: 4xx and 5xx).
    pub fn error_replies(&self) -> Vec<(u16, String)> {
        self.transcript.lines().filter_map(|l| split_mark(l, &["<**", "<~*"])).filter_map(parse_reply).collect()
    }

    /// The reply to the first command swaks sent that starts with `command`
    /// (case-insensitive, e.g. "RCPT", "MAIL FROM", "EHLO"): its final code
    /// and all its lines joined by `\n`. `None` if swaks never sent it or
    /// got no reply. "BANNER" gives the greeting.
    pub fn reply_to(&self, command: &str) -> Option<(u16, String)> {
        if command.eq_ignore_ascii_case("BANNER") {
            let mut lines = self.transcript.lines().peekable();
            // The greeting: the replies before swaks sends anything.
            while lines.peek().is_some_and(|l| split_mark(l, &REPLY_MARKS).is_none()) {
                lines.next();
            }
            return joined_reply(lines);
        }
        self.replies_to(command).into_iter().next()
    }

    /// The replies to every command swaks sent that starts with `command`
    /// (case-insensitive), in order: one per RCPT of a run with several
    /// recipients ([`SwaksArgs::rcpts`]). Commands without a reply are left out.
    pub fn replies_to(&self, command: &str) -> Vec<(u16, String)> {
        let want = command.to_ascii_uppercase();
        let lines: Vec<&str> = self.transcript.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                split_mark(l, &SENT_MARKS).is_some_and(|sent| sent.to_ascii_uppercase().starts_with(&want))
            })
            .filter_map(|(i, _)| joined_reply(lines[i + 1..].iter().copied()))
            .collect()
    }

    /// Checks that the reply to the first `command` has code `code` and
    /// contains `text`; the error shows the whole run.
    pub fn expect_reply(&self, command: &str, code: u16, text: &str) -> Result<()> {
        match self.reply_to(command) {
            Some((c, t)) if c == code && t.contains(text) => Ok(()),
            got => bail!("want {code} {text:?} in reply to {command}, got {got:?}\n{self}"),
        }
    }

    /// The queue id Postfix gave the message (`250 2.0.0 Ok: queued as ID`).
    pub fn queue_id(&self) -> Option<String> {
        self.replies().iter().find_map(|(_, l)| l.split("queued as ").nth(1).map(|id| id.trim().to_owned()))
    }
}

/// The reply lines at the start of `lines` (until the next non-reply
/// line): the final code and the lines joined by `\n`.
fn joined_reply<'a>(lines: impl Iterator<Item = &'a str>) -> Option<(u16, String)> {
    let reply: Vec<(u16, String)> = lines.map_while(|l| split_mark(l, &REPLY_MARKS)).filter_map(parse_reply).collect();
    let code = reply.last()?.0;
    Some((code, reply.into_iter().map(|(_, l)| l).collect::<Vec<_>>().join("\n")))
}

impl std::fmt::Display for SwaksRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` -> {}\n--- transcript:\n{}", self.command, self.status, self.transcript.trim_end())
    }
}

/// Runs swaks inside `ns` (`nsenter --net=`) and returns its exit status
/// and transcript, whatever the status. Killed (an error carrying the
/// transcript so far) if it runs longer than 8 × `args.timeout` + 5 s.
pub fn swaks(ns: &Netns, args: SwaksArgs) -> Result<SwaksRun> {
    if !Path::new(SWAKS).exists() {
        bail!("{SWAKS} is missing: run `cargo xtask setup` (Debian package swaks)");
    }
    if !is_allowed_endpoint(args.server.ip()) || args.server.ip().is_unspecified() {
        bail!("swaks: server {} is not a test address", args.server);
    }
    if let Some(l) = args.local.filter(|l| !is_allowed_endpoint(*l)) {
        bail!("swaks: local address {l} is not a test address");
    }
    // One file for stdout and stderr (one open file description), so the
    // transcript keeps swaks's order (it flushes every line).
    let mut out = tempfile::tempfile().context("swaks: temporary transcript file")?;
    let argv = args.argv();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(SWAKS)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?);
    let command = format!("swaks {} (in {})", argv.join(" "), ns.name());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {command}"))?;
    let limit = args.limit();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut bytes = Vec::new();
    out.rewind()?;
    out.read_to_end(&mut bytes)?;
    let transcript = String::from_utf8_lossy(&bytes).into_owned();
    match status {
        Some(status) => Ok(SwaksRun { command, status, transcript }),
        None => bail!("{command} still running after {limit:?}, killed; transcript:\n{transcript}"),
    }
}

// ---------------------------------------------------------------------------
// RefusingSmtp

/// A tiny SMTP server inside a namespace that refuses every recipient with
/// one fixed reply: `220` greeting, `250` to EHLO/HELO, MAIL, RSET and NOOP,
/// the given reply to every RCPT, `503 5.5.1` to anything else, `221` to
/// QUIT. It stands in for a refusing host when a test needs to see how a
/// real sender reports the refusal. One session at a time, on its own
/// thread; it records every command line. Stops on drop (within ~10 ms) or
/// after [`LISTENER_MAX_LIFETIME`]; a session ends after 10 s idle or 100
/// commands.
pub struct RefusingSmtp {
    addr: SocketAddr,
    sessions: Arc<AtomicUsize>,
    commands: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RefusingSmtp {
    /// The reply of the selftest: what a Postfix sender must quote.
    pub const TEST_REPLY: &'static str = "550 5.7.1 test refusal text";

    /// Listens on `addr` (a test address; port 0 picks one) in `ns` and
    /// answers RCPT with `rcpt_reply`, a whole reply line such as
    /// `550 5.7.1 why` or `450 4.7.1 later`.
    pub fn spawn(ns: &Netns, addr: SocketAddr, rcpt_reply: &str) -> Result<Self> {
        if !is_allowed_endpoint(addr.ip()) {
            bail!("RefusingSmtp: {addr} is not a test address");
        }
        if rcpt_reply.get(..3).is_none_or(|c| c.parse::<u16>().is_err()) || rcpt_reply.contains(['\r', '\n']) {
            bail!("RefusingSmtp: {rcpt_reply:?} is not one reply line starting with a code");
        }
        let sock = crate::netlab::listen_socket(ns, addr, 16).context("RefusingSmtp")?;
        let bound = sock.local_addr()?.as_socket().ok_or_else(|| anyhow!("RefusingSmtp: no inet address"))?;
        let sessions = Arc::new(AtomicUsize::new(0));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sessions, commands, stop) = (sessions.clone(), commands.clone(), stop.clone());
            let reply = format!("{rcpt_reply}\r\n");
            std::thread::Builder::new().name(format!("gk-refuse-{}", bound.port())).spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LISTENER_MAX_LIFETIME {
                    match sock.accept() {
                        Ok((conn, _)) => {
                            let _ = refuse_session(conn, &reply, &commands, &stop);
                            sessions.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?
        };
        Ok(Self { addr: bound, sessions, commands, stop, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sessions finished so far.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Every command line received so far, without CRLF.
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (bounded) until at least `n` sessions have finished.
    pub fn wait_for_sessions(&self, n: usize, timeout: Duration) -> bool {
        crate::netlab::poll_until(timeout, || self.sessions() >= n)
    }
}

impl Drop for RefusingSmtp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One SMTP session of [`RefusingSmtp`], bounded in commands and idle time.
fn refuse_session(conn: Socket, rcpt_reply: &str, commands: &Mutex<Vec<String>>, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let stream = std::net::TcpStream::from(conn);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(64 * 1024);
    writer.write_all(b"220 refuser.test ESMTP test refuser\r\n")?;
    for _ in 0..100 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        commands.lock().unwrap_or_else(|e| e.into_inner()).push(line.clone());
        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" | "HELO" => "250 refuser.test\r\n",
            "MAIL" => "250 2.1.0 Ok\r\n",
            "RCPT" => rcpt_reply,
            "RSET" | "NOOP" => "250 2.0.0 Ok\r\n",
            "QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n")?;
                break;
            }
            _ => "503 5.5.1 Error: bad sequence of commands\r\n",
        };
        writer.write_all(reply.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(transcript: &str) -> SwaksRun {
        use std::os::unix::process::ExitStatusExt as _;
        SwaksRun { command: "swaks".into(), status: ExitStatus::from_raw(24 << 8), transcript: transcript.into() }
    }

    const REFUSED: &str = "=== Trying 198.51.100.3:25...\n\
        === Connected to 198.51.100.3.\n\
        <-  220 refuser.test ESMTP\n\
        \x20-> EHLO client.test\n\
        <-  250-refuser.test\n\
        <-  250 PIPELINING\n\
        \x20-> MAIL FROM:<a@sender.test>\n\
        <-  250 2.1.0 Ok\n\
        \x20-> RCPT TO:<b@rx.test>\n\
        <** 550-5.7.1 first line\n\
        <** 550 5.7.1 no reverse DNS (PTR) for 198.51.100.7\n\
        \x20-> QUIT\n\
        <-  221 2.0.0 Bye\n\
        === Connection closed with remote host.\n";

    #[test]
    fn swaks_transcript_replies() {
        let r = run(REFUSED);
        assert_eq!(r.code(), Some(24));
        let replies = r.replies();
        assert_eq!(replies.len(), 7, "{replies:?}");
        assert_eq!(replies[0], (220, "220 refuser.test ESMTP".to_owned()));
        assert_eq!(r.error_replies().len(), 2);
        assert_eq!(r.reply_to("banner"), Some((220, "220 refuser.test ESMTP".to_owned())));
        assert_eq!(r.reply_to("ehlo"), Some((250, "250-refuser.test\n250 PIPELINING".to_owned())));
        let (code, text) = r.reply_to("RCPT TO").unwrap();
        assert_eq!(code, 550);
        assert!(text.ends_with("550 5.7.1 no reverse DNS (PTR) for 198.51.100.7"), "{text}");
        assert_eq!(r.reply_to("QUIT").unwrap().0, 221);
        assert_eq!(r.reply_to("DATA"), None);
        assert_eq!(r.queue_id(), None);
        let queued = run("<-  250 2.0.0 Ok: queued as 1EBEC9AE0AE\n");
        assert_eq!(queued.queue_id().as_deref(), Some("1EBEC9AE0AE"));
    }

    #[test]
    fn replies_to_every_rcpt_and_expect_reply() {
        let r = run("<-  220 mx ESMTP\n\
            \x20-> EHLO c\n\
            <-  250 mx\n\
            \x20-> AUTH PLAIN AGFsaWNlAHNlY3JldA==\n\
            <-  235 2.7.0 Authentication successful\n\
            \x20-> MAIL FROM:<a@example.test>\n\
            <-  250 2.1.0 Ok\n\
            \x20-> RCPT TO:<alice@example.test>\n\
            <-  250 2.1.5 Ok\n\
            \x20-> RCPT TO:<nobody@example.test>\n\
            <** 550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown\n\
            \x20-> DATA\n\
            <** 450 4.7.1 <DATA>: Data command rejected: test\n");
        let rcpts = r.replies_to("rcpt");
        assert_eq!(rcpts.iter().map(|r| r.0).collect::<Vec<_>>(), [250, 550]);
        assert!(rcpts[1].1.contains("<nobody@example.test>"));
        assert_eq!(r.reply_to("RCPT").map(|r| r.0), Some(250));
        assert_eq!(r.reply_to("BANNER").map(|r| r.0), Some(220));
        assert!(r.expect_reply("AUTH", 235, "2.7.0").is_ok());
        assert!(r.expect_reply("DATA", 450, "4.7.1 <DATA>").is_ok());
        let err = r.expect_reply("DATA", 250, "").unwrap_err();
        assert!(format!("{err}").contains("got Some((450"), "{err}");
        assert!(r.replies_to("QUIT").is_empty());
        let args = SwaksArgs::new("192.0.2.1:25".parse().unwrap(), "a@x.test", "")
            .rcpts(&["b@x.test", "c@x.test"])
            .auth("alice", "secret");
        let argv = args.argv();
        assert!(argv.windows(2).any(|w| w == ["--to", "b@x.test,c@x.test"]), "{argv:?}");
        assert!(argv.windows(2).any(|w| w == ["--auth", "PLAIN"]), "{argv:?}");
        assert!(argv.windows(2).any(|w| w == ["--auth-password", "secret"]), "{argv:?}");
    }

    #[test]
    fn sasl_policy_local_users_and_bounce_sink_config() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let o = PostfixOptions::receiver(&[ip("192.0.2.25")], "rx.test")
            .with_sasl_dovecot(Path::new("/tmp/d/run/auth-postfix"))
            .with_policy(Path::new("/tmp/p/policy.sock"))
            .with_local_users("example.test", &["alice", "bob"])
            .with_bounce_sink(2525);
        o.check().unwrap();
        let main = o.main_cf_text(Path::new("/tmp/x"), (104, 107));
        for want in [
            "mydestination = example.test\n",
            "local_recipient_maps = texthash:/tmp/x/conf/local_recipients\n",
            "smtpd_sasl_type = dovecot\n",
            "smtpd_sasl_path = /tmp/d/run/auth-postfix\n",
            "smtpd_sasl_auth_enable = yes\n",
            "smtpd_recipient_restrictions = check_policy_service { unix:/tmp/p/policy.sock, timeout=2s, \
             default_action=DUNNO, try_limit=1 }\n",
            "smtpd_data_restrictions = check_policy_service { unix:/tmp/p/policy.sock,",
        ] {
            assert!(main.contains(want), "{want:?} not in\n{main}");
        }
        assert_eq!(o.local_recipients_text(), "alice ok\nalice@example.test ok\nbob ok\nbob@example.test ok\n");
        assert_eq!(o.transport_text(), "remote.test smtp:[192.0.2.25]:2525\n");
        let master = o.master_cf_text();
        assert!(master.contains("\n192.0.2.25:2525 inet n - n - - smtpd -o syslog_name=postfix/sink "), "{master}");
        assert!(master.contains("static:{550 5.1.1 User unknown here}, reject_unauth_destination }"), "{master}");
        assert_eq!(o.bounce_sink_addr(), Some("192.0.2.25:2525".parse().unwrap()));
        assert_eq!(o.smtp_addrs().len(), 1);

        let base = || PostfixOptions::receiver(&[ip("192.0.2.25")], "rx.test");
        assert!(base().with_policy(Path::new("relative.sock")).check().is_err());
        assert!(base().with_policy(Path::new("/tmp/a b")).check().is_err());
        assert!(base().with_sasl_dovecot(Path::new("/tmp/x,y")).check().is_err());
        assert!(base().with_local_users("rx.test", &["a"]).check().is_err());
        assert!(base().with_local_users("l.test", &["a b"]).check().is_err());
        assert!(base().with_bounce_sink(25).check().is_err());
        let mut no_sink = base();
        no_sink.bounce_domains.push("remote.test".into());
        assert!(no_sink.check().is_err());
    }

    #[test]
    fn config_refuses_addresses_outside_the_test_ranges() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(PostfixOptions::receiver(&[ip("192.0.2.1")], "rx.test").check().is_ok());
        assert!(PostfixOptions::receiver(&[ip("10.0.0.1")], "rx.test").check().is_err());
        assert!(PostfixOptions::receiver(&[], "rx.test").check().is_err());
        assert!(PostfixOptions::relay(&[ip("192.0.2.1")], &[("x.test", sa("8.8.8.8:25"))]).check().is_err());
        let mut o = PostfixOptions::receiver(&[ip("192.0.2.1")], "rx.test");
        o.mynetworks.push("10.0.0.0/8".parse().unwrap());
        assert!(o.check().is_err());
        assert!(PostfixOptions::receiver(&[ip("192.0.2.1")], "rx.test")
            .with_smtp_bind(ip("10.1.1.1"))
            .check()
            .is_err());
    }

    #[test]
    fn config_text() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let o = PostfixOptions::relay(
            &[ip("198.51.100.2"), ip("2001:db8:3::2")],
            &[("refused.test", "[2001:db8:3::3]:25".parse().unwrap())],
        )
        .with_smtp_bind(ip("198.51.100.2"));
        assert_eq!(o.inet_protocols(), "all");
        let main = o.main_cf_text(Path::new("/tmp/x"), (104, 107));
        assert!(main.contains("inet_interfaces = 198.51.100.2, [2001:db8:3::2]\n"), "{main}");
        assert!(main.contains("[2001:db8::]/32"), "{main}");
        assert!(main.contains("smtp_bind_address = 198.51.100.2\n"), "{main}");
        assert!(main.contains("virtual_uid_maps = static:104\n"), "{main}");
        assert_eq!(o.transport_text(), "refused.test smtp:[2001:db8:3::3]:25\n");
        assert!(o.master_cf_text().starts_with("# service"));
        assert!(o.master_cf_text().contains("\n25 inet n - n - - smtpd\n"));
        let v4 = PostfixOptions::receiver(&[ip("192.0.2.1")], "rx.test");
        assert_eq!(v4.inet_protocols(), "ipv4");
        assert_eq!(v4.smtp_addrs(), vec!["192.0.2.1:25".parse::<SocketAddr>().unwrap()]);
    }
}

/// What a sending MTA meets at a mail server, as [`smtp_probe`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// No answer to the SYN (dropped).
    Dropped,
    /// A RST to the SYN.
    Reset,
    /// The server's greeting, and its reply to `RCPT TO` if the greeting
    /// invited one (a `220`).
    Answered { banner: (u16, String), rcpt: Option<(u16, String)> },
    /// Anything else (connected but no greeting, a broken reply, ...).
    Other(String),
}

impl Probe {
    /// A word for tables: `accepted` (RCPT 250), `REJECTED` (a 5xx at RCPT
    /// or in the greeting), `DROPPED`, `RESET`, else what happened.
    pub fn word(&self) -> String {
        match self {
            Probe::Dropped => "DROPPED".into(),
            Probe::Reset => "RESET".into(),
            Probe::Answered { rcpt: Some((250, _)), .. } => "accepted".into(),
            Probe::Answered { banner: (b, _), rcpt } if *b >= 500 || rcpt.as_ref().is_some_and(|r| r.0 >= 500) => {
                "REJECTED".into()
            }
            Probe::Answered { banner, rcpt } => format!("answered {} / {:?}", banner.0, rcpt.as_ref().map(|r| r.0)),
            Probe::Other(e) => format!("error: {e}"),
        }
    }

    /// The refusal's reply line (the 5xx at RCPT, or the greeting's).
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Probe::Answered { rcpt: Some((c, l)), .. } if *c >= 500 => Some(l),
            Probe::Answered { banner: (c, l), .. } if *c >= 500 => Some(l),
            _ => None,
        }
    }
}

/// One SMTP transaction from `src` (inside `ns`) to `dst` up to `RCPT TO:
/// <rcpt>`, then `QUIT`: what a sending MTA meets, in a form tables can
/// show. Bounded by `timeout` per step.
pub fn smtp_probe(ns: &Netns, src: IpAddr, dst: SocketAddr, rcpt: &str, timeout: Duration) -> Probe {
    let rcpt = rcpt.to_owned();
    in_netns(ns, move || probe_in_netns(src, dst, &rcpt, timeout).unwrap_or_else(|e| Probe::Other(format!("{e:#}"))))
}

fn probe_in_netns(src: IpAddr, dst: SocketAddr, rcpt: &str, timeout: Duration) -> Result<Probe> {
    for a in [src, dst.ip()] {
        ensure!(is_test_addr(a), "{a} is not a TEST-NET address");
    }
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    match sock.connect_timeout(&SockAddr::from(dst), timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.raw_os_error() == Some(libc::EINPROGRESS) => {
            return Ok(Probe::Dropped)
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Probe::Reset),
        Err(e) => return Err(e.into()),
    }
    let stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    // A whole (possibly multi-line) reply: its code and last line.
    let mut reply = || -> Result<(u16, String)> {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.by_ref().take(1024).read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            let l = line.trim_end();
            let code: u16 = l.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("not a reply: {l:?}"))?;
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, l.to_owned()));
            }
        }
    };
    let banner = match reply() {
        Ok(b) => b,
        Err(e) => return Ok(Probe::Other(format!("no greeting: {e:#}"))),
    };
    if banner.0 != 220 {
        let _ = writer.write_all(b"QUIT\r\n");
        return Ok(Probe::Answered { banner, rcpt: None });
    }
    let mut rcpt_reply = None;
    for cmd in
        ["EHLO probe.example.org".to_string(), "MAIL FROM:<probe@example.org>".into(), format!("RCPT TO:<{rcpt}>")]
    {
        writer.write_all(format!("{cmd}\r\n").as_bytes())?;
        let r = reply()?;
        if cmd.starts_with("RCPT") {
            rcpt_reply = Some(r);
        } else if r.0 >= 400 {
            break;
        }
    }
    let _ = writer.write_all(b"QUIT\r\n");
    Ok(Probe::Answered { banner, rcpt: rcpt_reply })
}
