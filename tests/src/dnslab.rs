//! Real and fake DNS servers on 127.0.0.1 for the resolver tests.
//!
//! * [`NsdServer`] runs Debian's `nsd` (`/usr/sbin/nsd`, installed by
//!   `cargo xtask setup`) in the foreground on a free port (UDP and TCP),
//!   serving [`Zone`]s written to a temporary directory: config, zone files,
//!   pidfile, logs and state all live there; no privilege drop, no
//!   remote-control. [`NsdServer::start`] returns once nsd answers; the
//!   server is killed on drop. [`NsdServer::stop`] and
//!   [`NsdServer::restart`] make "DNS server down" tests.
//! * [`FakeDns`] is a tiny responder (std threads, UDP and TCP on one port)
//!   for what nsd will not do: SERVFAIL, REFUSED, silence, truncation,
//!   scripted answers. It records the queries it saw.
//!
//! Everything listens on 127.0.0.1 only; every wait is bounded. Names and
//! addresses in zones: addresses only from the documentation ranges
//! (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32), names
//! preferably under `example.`. Tests may run in parallel: each server
//! gets its own port and directory.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::IpNet;
use nix::{
    errno::Errno,
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

use crate::netlab::is_test_addr;

/// Where Debian installs nsd.
pub const NSD: &str = "/usr/sbin/nsd";
/// Default TTL of records added without one.
pub const DEFAULT_TTL: u32 = 3600;
/// Default negative TTL (SOA MINIMUM) of a zone.
pub const NEGATIVE_TTL: u32 = 60;
/// nsd must answer within this long after it was started.
pub const NSD_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Times a start is retried on a new port when the port was taken meanwhile.
const START_TRIES: usize = 5;

/// Record types as numbers, for [`FakeQuery::qtype`].
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;

// ---------------------------------------------------------------------------
// Zones

/// One zone for [`NsdServer`]: SOA (negative TTL [`NEGATIVE_TTL`] unless
/// changed) and NS are added when it is written.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lower case, no trailing dot.
    origin: String,
    soa_ttl: u32,
    negative_ttl: u32,
    /// (owner FQDN, ttl, type, rdata).
    records: Vec<(String, u32, String, String)>,
}

/// `name` as an absolute, lower-case name with the trailing dot.
fn fqdn(name: &str) -> String {
    let n = name.trim().trim_end_matches('.').to_ascii_lowercase();
    format!("{n}.")
}

fn check_test_addr(ip: IpAddr) {
    assert!(
        is_test_addr(ip.to_canonical()),
        "{ip} is not in a documentation range (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)"
    );
}

/// The reverse (`in-addr.arpa.`/`ip6.arpa.`) name of `ip`, with the dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

impl Zone {
    /// An empty zone (SOA and NS only) for `origin`.
    pub fn new(origin: &str) -> Zone {
        let origin = fqdn(origin).trim_end_matches('.').to_string();
        assert!(!origin.is_empty(), "a zone needs an origin");
        Zone { origin, soa_ttl: DEFAULT_TTL, negative_ttl: NEGATIVE_TTL, records: Vec::new() }
    }

    /// The reverse zone of an IPv4 network on an octet boundary
    /// (`192.0.2.0/24` → `2.0.192.in-addr.arpa`) with `(ip, ptr name)`
    /// records (TTL [`DEFAULT_TTL`]; an address may appear several times).
    pub fn reverse_v4(net: &str, ptrs: &[(IpAddr, &str)]) -> Zone {
        let net: IpNet = net.parse().unwrap_or_else(|e| panic!("{net:?}: {e}"));
        let IpNet::V4(v4) = net else { panic!("{net} is not an IPv4 network") };
        assert!(v4.prefix_len() % 8 == 0 && v4.prefix_len() > 0, "{net}: prefix length must be 8, 16 or 24");
        check_test_addr(IpAddr::V4(v4.network()));
        let o = v4.network().octets();
        let labels: Vec<String> = o[..(v4.prefix_len() / 8) as usize].iter().rev().map(|b| b.to_string()).collect();
        let mut zone = Zone::new(&format!("{}.in-addr.arpa", labels.join(".")));
        for (ip, name) in ptrs {
            zone = zone.ptr(*ip, name, DEFAULT_TTL);
        }
        zone
    }

    /// The `ip6.arpa` nibble zone of an IPv6 network whose prefix length is
    /// a multiple of 4 (e.g. a /48 or /64), with `(ip, ptr name)` records.
    pub fn reverse_v6(net: &str, ptrs: &[(IpAddr, &str)]) -> Zone {
        let net: IpNet = net.parse().unwrap_or_else(|e| panic!("{net:?}: {e}"));
        let IpNet::V6(v6) = net else { panic!("{net} is not an IPv6 network") };
        assert!(v6.prefix_len() % 4 == 0 && v6.prefix_len() > 0, "{net}: prefix length must be a multiple of 4");
        check_test_addr(IpAddr::V6(v6.network()));
        let full = reverse_name(IpAddr::V6(v6.network()));
        let nibbles = (v6.prefix_len() / 4) as usize;
        // The full name has 32 nibble labels; keep the last `nibbles` ones.
        let labels: Vec<&str> = full.trim_end_matches('.').split('.').collect();
        let origin = labels[32 - nibbles..].join(".");
        let mut zone = Zone::new(&origin);
        for (ip, name) in ptrs {
            zone = zone.ptr(*ip, name, DEFAULT_TTL);
        }
        zone
    }

    /// A forward zone with `(name, address)` records (A or AAAA, TTL
    /// [`DEFAULT_TTL`]); a name may appear several times.
    pub fn forward(origin: &str, addrs: &[(&str, IpAddr)]) -> Zone {
        let mut zone = Zone::new(origin);
        for (name, ip) in addrs {
            zone = zone.addr(name, *ip, DEFAULT_TTL);
        }
        zone
    }

    /// The origin, lower case, without the trailing dot.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Sets the negative TTL (SOA MINIMUM). The SOA record's own TTL stays
    /// [`DEFAULT_TTL`] unless [`Zone::soa_ttl`] changes it.
    pub fn negative_ttl(mut self, ttl: u32) -> Zone {
        self.negative_ttl = ttl;
        self
    }

    /// Sets the TTL of the SOA record itself.
    pub fn soa_ttl(mut self, ttl: u32) -> Zone {
        self.soa_ttl = ttl;
        self
    }

    /// Adds a record; `owner` is absolute (trailing dot optional) and must
    /// lie in the zone. `rdata` is written as given (names in it should end
    /// with a dot).
    pub fn record(mut self, owner: &str, ttl: u32, rtype: &str, rdata: &str) -> Zone {
        let owner = fqdn(owner);
        let origin = format!("{}.", self.origin);
        assert!(owner == origin || owner.ends_with(&format!(".{origin}")), "{owner} is not in zone {origin}");
        self.records.push((owner, ttl, rtype.to_string(), rdata.to_string()));
        self
    }

    /// Adds a PTR record for `ip` (which must be inside the zone).
    pub fn ptr(self, ip: IpAddr, name: &str, ttl: u32) -> Zone {
        check_test_addr(ip);
        self.record(&reverse_name(ip), ttl, "PTR", &fqdn(name))
    }

    /// Adds an A or AAAA record.
    pub fn addr(self, name: &str, ip: IpAddr, ttl: u32) -> Zone {
        check_test_addr(ip);
        let rtype = if ip.is_ipv4() { "A" } else { "AAAA" };
        self.record(name, ttl, rtype, &ip.to_string())
    }

    /// Adds a CNAME record.
    pub fn cname(self, name: &str, target: &str, ttl: u32) -> Zone {
        self.record(name, ttl, "CNAME", &fqdn(target))
    }

    /// The zone file text.
    pub fn text(&self) -> String {
        let o = &self.origin;
        let mut s = format!(
            "$ORIGIN {o}.\n@ {} IN SOA ns.invalid. hostmaster.invalid. 1 3600 900 604800 {}\n@ {DEFAULT_TTL} IN NS ns.invalid.\n",
            self.soa_ttl, self.negative_ttl
        );
        for (owner, ttl, rtype, rdata) in &self.records {
            s.push_str(&format!("{owner} {ttl} IN {rtype} {rdata}\n"));
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Ports

/// A port free on 127.0.0.1 for both UDP and TCP right now. Someone else
/// may take it before it is used: callers retry.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").context("bind UDP 127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1 after 100 tries")
}

/// Sends a SOA query for `zone` over UDP; true if any DNS answer came back.
fn answers_udp(addr: SocketAddr, zone: &str, wait: Duration) -> bool {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(wait));
    let id: u16 = 0x4744;
    let mut q = vec![(id >> 8) as u8, id as u8, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    encode_name(&mut q, zone);
    q.extend_from_slice(&[0, TYPE_SOA as u8, 0, 1]);
    if sock.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    matches!(sock.recv_from(&mut buf), Ok((n, from)) if n >= 12 && from == addr && buf[0..2] == q[0..2] && buf[2] & 0x80 != 0)
}

/// True once `addr` accepts TCP connections.
fn accepts_tcp(addr: SocketAddr, wait: Duration) -> bool {
    TcpStream::connect_timeout(&addr, wait).is_ok()
}

// ---------------------------------------------------------------------------
// nsd

/// Debian's nsd serving some zones on 127.0.0.1:port (UDP and TCP); killed
/// on drop.
pub struct NsdServer {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    first_zone: String,
    child: Option<Child>,
}

impl fmt::Debug for NsdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NsdServer").field("addr", &self.addr).field("dir", &self.dir.path()).finish()
    }
}

/// Fails with a clear message unless nsd is installed.
pub fn require_nsd() {
    assert!(Path::new(NSD).exists(), "{NSD} is missing: run `cargo xtask setup` (or `apt-get install nsd`) first");
}

impl NsdServer {
    /// Writes the zones and a config to a new temporary directory and starts
    /// nsd on a free port; returns once it answers over UDP and TCP.
    pub fn start(zones: &[Zone]) -> Result<NsdServer> {
        NsdServer::start_where(zones, None)
    }

    /// Starts nsd in the caller's namespace, or in `ns`.
    fn start_where(zones: &[Zone], ns: Option<&Netns>) -> Result<NsdServer> {
        if !Path::new(NSD).exists() {
            bail!("{NSD} is missing: run `cargo xtask setup` (or `apt-get install nsd`)");
        }
        if zones.is_empty() {
            bail!("nsd needs at least one zone");
        }
        let dir = tempfile::Builder::new().prefix("gk-nsd-").tempdir().context("tempdir for nsd")?;
        for (i, z) in zones.iter().enumerate() {
            if zones[..i].iter().any(|o| o.origin == z.origin) {
                bail!("zone {} given twice", z.origin);
            }
            fs::write(dir.path().join(format!("{}.zone", z.origin)), z.text())?;
        }
        let mut server = NsdServer {
            dir,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            first_zone: zones[0].origin.clone(),
            child: None,
        };
        let mut last_err = None;
        for _ in 0..START_TRIES {
            server.addr.set_port(match ns {
                Some(ns) => free_port_in(ns)?,
                None => free_port()?,
            });
            server.write_config(zones)?;
            match server.spawn_where(ns) {
                Ok(()) => return Ok(server),
                Err(e) => {
                    server.kill_all();
                    let log = server.log();
                    // Someone took the port between picking it and nsd's bind.
                    let port_taken = log.contains("Address already in use");
                    let place = ns.map(|n| format!(" in {}", n.name())).unwrap_or_default();
                    let err = e.context(format!("nsd on {}{place}; log:\n{log}", server.addr));
                    if !port_taken {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        Err(last_err.expect("tried at least once"))
    }

    fn write_config(&self, zones: &[Zone]) -> Result<()> {
        let d = self.dir.path().display();
        let port = self.addr.port();
        let mut conf = format!(
            r#"server:
    ip-address: 127.0.0.1@{port}
    port: {port}
    do-ip4: yes
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    logfile: "{d}/nsd.log"
    cookie-secret-file: "{d}/cookiesecrets.txt"
    answer-cookie: no
    server-count: 1
    reuseport: no
    verbosity: 1
    hide-version: yes
    zonefiles-write: 0
    tcp-count: 64
    tcp-timeout: 30
remote-control:
    control-enable: no
"#
        );
        for z in zones {
            conf.push_str(&format!("zone:\n    name: \"{0}\"\n    zonefile: \"{0}.zone\"\n", z.origin));
        }
        fs::write(self.dir.path().join("nsd.conf"), conf)?;
        Ok(())
    }

    /// Starts nsd on the configured port, in the caller's namespace or in
    /// `ns`, and waits (bounded) until it answers there.
    fn spawn_where(&mut self, ns: Option<&Netns>) -> Result<()> {
        let _ = fs::remove_file(self.dir.path().join("nsd.log"));
        let out = File::create(self.dir.path().join("nsd.out"))?;
        // nsenter execs nsd (no fork), so either way the child is nsd itself
        // and its own process group (nsd forks a server and xfrd) is what
        // stopping signals.
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display())).arg("--").arg(NSD);
                c
            }
            None => Command::new(NSD),
        };
        let child = cmd
            .arg("-d")
            .arg("-c")
            .arg(self.dir.path().join("nsd.conf"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {NSD}"))?;
        self.child = Some(child);
        let place = ns.map(|n| format!(" in {}", n.name())).unwrap_or_default();
        let deadline = Instant::now() + NSD_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().expect("just set").try_wait()? {
                bail!("nsd exited during start-up{place} ({status})");
            }
            let (addr, zone) = (self.addr, self.first_zone.clone());
            let probe = move || {
                answers_udp(addr, &zone, Duration::from_millis(100)) && accepts_tcp(addr, Duration::from_millis(200))
            };
            let up = match ns {
                Some(ns) => in_netns(ns, probe),
                None => probe(),
            };
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nsd did not answer on {}{place} within {:?}", self.addr, NSD_START_TIMEOUT);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory with nsd's config, zones and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The address it serves on (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// nsd's log and its stdout/stderr, for failure messages.
    pub fn log(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("nsd.log"), read("nsd.out"))
    }

    /// Is nsd running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops nsd (all its processes) and returns once nothing of it is left,
    /// so nothing answers on [`NsdServer::addr`]. Bounded.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        if self.kill_all() {
            Ok(())
        } else {
            bail!("nsd (process group {:?}) did not go away", self.child.as_ref().map(|c| c.id()))
        }
    }

    /// Starts nsd again on the same port, with the same zones.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_where(None).map_err(|e| e.context(format!("restart nsd on {}; log:\n{}", self.addr, self.log())))
    }

    /// SIGTERM to the group, then SIGKILL; true once no live process of
    /// the group is left (zombies, which hold no sockets, are init's to
    /// reap).
    fn kill_all(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pgid = child.id() as i32;
        for (sig, wait) in [(Signal::SIGTERM, Duration::from_secs(5)), (Signal::SIGKILL, Duration::from_secs(5))] {
            let _ = killpg(Pid::from_raw(pgid), sig);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                let _ = child.try_wait();
                if !group_alive(pgid) {
                    let _ = child.wait();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        false
    }
}

/// Is any process of process group `pgid` alive (not a zombie)?
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return !matches!(kill(Pid::from_raw(-pgid), None), Err(Errno::ESRCH));
    };
    entries.flatten().any(|e| {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut f = rest.split_whitespace();
        let state = f.next();
        let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid) && !matches!(state, Some("Z" | "X"))
    })
}

impl Drop for NsdServer {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ---------------------------------------------------------------------------
// Fake DNS

/// The transport a query came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A query [`FakeDns`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeQuery {
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: u16,
    pub transport: Transport,
}

/// Record data for [`Rr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RrData {
    Ptr(String),
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
}

/// One answer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub data: RrData,
}

impl Rr {
    pub fn ptr(owner: &str, ttl: u32, target: &str) -> Rr {
        Rr { name: owner.into(), ttl, data: RrData::Ptr(target.into()) }
    }
    pub fn addr(owner: &str, ttl: u32, ip: IpAddr) -> Rr {
        let data = match ip {
            IpAddr::V4(v4) => RrData::A(v4),
            IpAddr::V6(v6) => RrData::Aaaa(v6),
        };
        Rr { name: owner.into(), ttl, data }
    }
    pub fn cname(owner: &str, ttl: u32, target: &str) -> Rr {
        Rr { name: owner.into(), ttl, data: RrData::Cname(target.into()) }
    }
}

/// What [`FakeDns`] does with one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// NOERROR with these answer records (written as given, in order).
    Answer(Vec<Rr>),
    /// NXDOMAIN; with `Some(ttl)` an SOA (TTL and MINIMUM `ttl`) in the
    /// authority section.
    NxDomain(Option<u32>),
    /// NOERROR without answers (NODATA); SOA as for `NxDomain`.
    NoData(Option<u32>),
    /// An empty answer with this response code (2 SERVFAIL, 5 REFUSED, ...).
    Rcode(u8),
    /// NOERROR with the TC bit and nothing else.
    Truncated,
    /// No answer at all.
    Silent,
    /// TCP: close the connection without answering; UDP: like `Silent`.
    Close,
}

/// A script for [`FakeMode::Scripted`].
pub type Script = Arc<dyn Fn(&FakeQuery) -> Reply + Send + Sync>;

/// How [`FakeDns`] behaves.
#[derive(Clone)]
pub enum FakeMode {
    /// SERVFAIL to everything.
    ServFail,
    /// REFUSED to everything.
    Refused,
    /// Never answers (TCP connections are accepted and left hanging).
    Silent,
    /// UDP answers have the TC bit; TCP connections are closed at once.
    TruncatedThenTcpFails,
    /// UDP answers have the TC bit; over TCP, PTR queries get this PTR name
    /// (TTL 300) and everything else NXDOMAIN (negative TTL 60).
    TruncatedThenTcpAnswers(String),
    /// NOERROR without answers, SOA (TTL 60) in the authority section.
    NoDataPtr,
    /// Whatever the script says.
    Scripted(Script),
}

impl fmt::Debug for FakeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeMode::ServFail => f.write_str("ServFail"),
            FakeMode::Refused => f.write_str("Refused"),
            FakeMode::Silent => f.write_str("Silent"),
            FakeMode::TruncatedThenTcpFails => f.write_str("TruncatedThenTcpFails"),
            FakeMode::TruncatedThenTcpAnswers(p) => write!(f, "TruncatedThenTcpAnswers({p:?})"),
            FakeMode::NoDataPtr => f.write_str("NoDataPtr"),
            FakeMode::Scripted(_) => f.write_str("Scripted(..)"),
        }
    }
}

impl FakeMode {
    /// A script from a closure.
    pub fn script(f: impl Fn(&FakeQuery) -> Reply + Send + Sync + 'static) -> FakeMode {
        FakeMode::Scripted(Arc::new(f))
    }

    fn reply(&self, q: &FakeQuery) -> Reply {
        match self {
            FakeMode::ServFail => Reply::Rcode(2),
            FakeMode::Refused => Reply::Rcode(5),
            FakeMode::Silent => Reply::Silent,
            FakeMode::TruncatedThenTcpFails => match q.transport {
                Transport::Udp => Reply::Truncated,
                Transport::Tcp => Reply::Close,
            },
            FakeMode::TruncatedThenTcpAnswers(ptr) => match (q.transport, q.qtype) {
                (Transport::Udp, _) => Reply::Truncated,
                (Transport::Tcp, TYPE_PTR) => Reply::Answer(vec![Rr::ptr(&q.name, 300, ptr)]),
                (Transport::Tcp, _) => Reply::NxDomain(Some(60)),
            },
            FakeMode::NoDataPtr => Reply::NoData(Some(60)),
            FakeMode::Scripted(script) => script(q),
        }
    }
}

struct FakeShared {
    mode: FakeMode,
    stop: AtomicBool,
    queries: Mutex<Vec<FakeQuery>>,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A purpose-built DNS responder on 127.0.0.1 (UDP and TCP on one port);
/// its threads stop on drop. UDP answers longer than [`UDP_MAX`] bytes are
/// sent truncated (header and question, TC bit), as a server without EDNS
/// would.
pub struct FakeDns {
    addr: SocketAddr,
    shared: Arc<FakeShared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for FakeDns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeDns").field("addr", &self.addr).field("mode", &self.shared.mode).finish()
    }
}

/// Largest UDP answer [`FakeDns`] sends; larger ones go out truncated (TC).
pub const UDP_MAX: usize = 512;

/// Poll interval of the fake server's threads (bounds how long drop takes).
const FAKE_POLL: Duration = Duration::from_millis(25);

impl FakeDns {
    /// Starts a responder on a free port of 127.0.0.1.
    pub fn start(mode: FakeMode) -> Result<FakeDns> {
        let (udp, tcp) = (0..100)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = TcpListener::bind(("127.0.0.1", port)).ok()?;
                Some((udp, tcp))
            })
            .ok_or_else(|| anyhow!("no port free for both UDP and TCP on 127.0.0.1"))?;
        FakeDns::serve(udp, tcp, mode)
    }

    /// Answers on bound sockets until dropped.
    fn serve(udp: UdpSocket, tcp: TcpListener, mode: FakeMode) -> Result<FakeDns> {
        let addr = udp.local_addr()?;
        udp.set_read_timeout(Some(FAKE_POLL))?;
        tcp.set_nonblocking(true)?;
        let shared = Arc::new(FakeShared {
            mode,
            stop: AtomicBool::new(false),
            queries: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let udp_thread = std::thread::Builder::new().name("fakedns-udp".into()).spawn(move || udp_loop(udp, &s))?;
        let s = shared.clone();
        let tcp_thread = std::thread::Builder::new().name("fakedns-tcp".into()).spawn(move || tcp_loop(tcp, &s))?;
        Ok(FakeDns { addr, shared, threads: vec![udp_thread, tcp_thread] })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The queries received so far, in order.
    pub fn queries(&self) -> Vec<FakeQuery> {
        self.shared.queries.lock().unwrap().clone()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut handles: Vec<JoinHandle<()>> = self.threads.drain(..).collect();
        handles.extend(self.shared.conns.lock().unwrap().drain(..));
        let deadline = Instant::now() + Duration::from_secs(5);
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
            // else: left detached; it exits at its next poll.
        }
    }
}

fn udp_loop(sock: UdpSocket, s: &FakeShared) {
    let mut buf = [0u8; 4096];
    while !s.stop.load(Ordering::SeqCst) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => continue,
        };
        let Some(q) = parse_query(&buf[..n]) else {
            continue;
        };
        let fq = FakeQuery { name: q.name.clone(), qtype: q.qtype, transport: Transport::Udp };
        s.queries.lock().unwrap().push(fq.clone());
        if let Some(mut resp) = build_response(&q, &s.mode.reply(&fq)) {
            // Like a server ignoring EDNS: more than 512 bytes is truncated.
            if resp.len() > UDP_MAX {
                resp = build_response(&q, &Reply::Truncated).expect("truncated reply");
            }
            let _ = sock.send_to(&resp, from);
        }
    }
}

fn tcp_loop(listener: TcpListener, s: &Arc<FakeShared>) {
    while !s.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s2 = s.clone();
                if let Ok(h) =
                    std::thread::Builder::new().name("fakedns-conn".into()).spawn(move || tcp_conn(stream, &s2))
                {
                    s.conns.lock().unwrap().push(h);
                }
            }
            Err(_) => std::thread::sleep(FAKE_POLL),
        }
    }
}

/// Reads exactly `buf.len()` bytes, polling the stop flag; false on EOF,
/// error or stop.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], s: &FakeShared) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if s.stop.load(Ordering::SeqCst) {
            return false;
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

fn tcp_conn(mut stream: TcpStream, s: &FakeShared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(FAKE_POLL));
    loop {
        let mut len = [0u8; 2];
        if !read_full(&mut stream, &mut len, s) {
            return;
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if !read_full(&mut stream, &mut msg, s) {
            return;
        }
        let Some(q) = parse_query(&msg) else { return };
        let fq = FakeQuery { name: q.name.clone(), qtype: q.qtype, transport: Transport::Tcp };
        s.queries.lock().unwrap().push(fq.clone());
        match s.mode.reply(&fq) {
            Reply::Close => return,
            reply => {
                if let Some(resp) = build_response(&q, &reply) {
                    let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&resp);
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The parts of a query needed to answer it.
struct ParsedQuery {
    id: [u8; 2],
    /// Opcode and RD bits of the query's flags.
    flags: u8,
    name: String,
    qtype: u16,
    /// The question section as received (echoed back).
    question: Vec<u8>,
}

fn parse_query(msg: &[u8]) -> Option<ParsedQuery> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression pointers have no place in a query
        }
        let label = msg.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    msg.get(i + 2..i + 4)?;
    Some(ParsedQuery {
        id: [msg[0], msg[1]],
        flags: msg[2] & 0x79,
        name: labels.join("."),
        qtype,
        question: msg[12..i + 4].to_vec(),
    })
}

fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn push_record(out: &mut Vec<u8>, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) {
    encode_name(out, name);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // IN
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

/// The zone a negative answer's SOA is owned by: the query name minus its
/// first label.
fn soa_owner(name: &str) -> &str {
    name.split_once('.').map_or("", |(_, rest)| rest)
}

fn build_response(q: &ParsedQuery, reply: &Reply) -> Option<Vec<u8>> {
    let (rcode, tc, answers, soa): (u8, bool, &[Rr], Option<u32>) = match reply {
        Reply::Silent | Reply::Close => return None,
        Reply::Answer(rrs) => (0, false, rrs, None),
        Reply::NxDomain(soa) => (3, false, &[], *soa),
        Reply::NoData(soa) => (0, false, &[], *soa),
        Reply::Rcode(rc) => (*rc & 0x0f, false, &[], None),
        Reply::Truncated => (0, true, &[], None),
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q.id);
    // QR, opcode and RD from the query, AA, TC.
    out.push(0x80 | q.flags | 0x04 | if tc { 0x02 } else { 0 });
    out.push(0x80 | rcode); // RA
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&(soa.is_some() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&q.question);
    for rr in answers {
        let (rtype, rdata) = match &rr.data {
            RrData::Ptr(n) => (TYPE_PTR, {
                let mut v = Vec::new();
                encode_name(&mut v, n);
                v
            }),
            RrData::Cname(n) => (TYPE_CNAME, {
                let mut v = Vec::new();
                encode_name(&mut v, n);
                v
            }),
            RrData::A(a) => (TYPE_A, a.octets().to_vec()),
            RrData::Aaaa(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        push_record(&mut out, &rr.name, rtype, rr.ttl, &rdata);
    }
    if let Some(ttl) = soa {
        let mut rdata = Vec::new();
        encode_name(&mut rdata, "ns.invalid");
        encode_name(&mut rdata, "hostmaster.invalid");
        for v in [1u32, 3600, 900, 604800, ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        push_record(&mut out, soa_owner(&q.name), TYPE_SOA, ttl, &rdata);
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Servers inside a network namespace

use crate::netlab::{in_netns, Netns};

/// A port free for both UDP and TCP on 127.0.0.1 inside `ns` right now.
pub fn free_port_in(ns: &Netns) -> Result<u16> {
    in_netns(ns, free_port)
}

impl NsdServer {
    /// Like [`NsdServer::start`], but nsd runs inside `ns` (started with
    /// `nsenter --net=/run/netns/NAME`) and listens on 127.0.0.1 *there*:
    /// processes in `ns` (e.g. an agent started with
    /// [`crate::netlab::AgentProcess`]) reach it at [`NsdServer::addr`];
    /// the host's namespace does not. [`NsdServer::stop`] works as usual;
    /// to start it again use [`NsdServer::restart_in`] with the same `ns`
    /// ([`NsdServer::restart`] would start it in the caller's namespace).
    pub fn start_in(ns: &Netns, zones: &[Zone]) -> Result<NsdServer> {
        NsdServer::start_where(zones, Some(ns))
    }

    /// Starts nsd again inside `ns` (the namespace it was started in with
    /// [`NsdServer::start_in`]) on the same port, with the same zones.
    pub fn restart_in(&mut self, ns: &Netns) -> Result<()> {
        self.stop()?;
        self.spawn_where(Some(ns))
            .map_err(|e| e.context(format!("restart nsd on {} in {}; log:\n{}", self.addr, ns.name(), self.log())))
    }
}

impl FakeDns {
    /// Like [`FakeDns::start`], but listening on 127.0.0.1 inside `ns`
    /// (the sockets are made there; the threads serving them need not be).
    pub fn start_in(ns: &Netns, mode: FakeMode) -> Result<FakeDns> {
        let (udp, tcp) = in_netns(ns, || {
            (0..100).find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = TcpListener::bind(("127.0.0.1", port)).ok()?;
                Some((udp, tcp))
            })
        })
        .ok_or_else(|| anyhow!("no port free for both UDP and TCP on 127.0.0.1 in {}", ns.name()))?;
        FakeDns::serve(udp, tcp, mode)
    }

    /// How many queries were received so far.
    pub fn query_count(&self) -> usize {
        self.shared.queries.lock().unwrap().len()
    }
}

impl FakeMode {
    /// Answers like an authoritative server for a fixed set of records:
    /// PTR queries from `ptrs` (address, name), A/AAAA queries from `addrs`
    /// (name, address), all with TTL `ttl`; a name that has records of
    /// another type only gets NODATA, anything else NXDOMAIN (both with an
    /// SOA of negative TTL [`NEGATIVE_TTL`]). Names compare case-insensitively.
    pub fn table(ptrs: &[(IpAddr, &str)], addrs: &[(&str, IpAddr)], ttl: u32) -> FakeMode {
        let norm = |n: &str| n.trim().trim_end_matches('.').to_ascii_lowercase();
        let ptrs: Vec<(String, String)> = ptrs
            .iter()
            .map(|(ip, name)| {
                check_test_addr(*ip);
                (norm(&reverse_name(*ip)), norm(name))
            })
            .collect();
        let addrs: Vec<(String, IpAddr)> = addrs
            .iter()
            .map(|(name, ip)| {
                check_test_addr(*ip);
                (norm(name), *ip)
            })
            .collect();
        FakeMode::script(move |q| {
            let answers: Vec<Rr> = match q.qtype {
                TYPE_PTR => ptrs
                    .iter()
                    .filter(|(owner, _)| *owner == q.name)
                    .map(|(_, target)| Rr::ptr(&q.name, ttl, target))
                    .collect(),
                TYPE_A | TYPE_AAAA => addrs
                    .iter()
                    .filter(|(owner, ip)| *owner == q.name && ip.is_ipv4() == (q.qtype == TYPE_A))
                    .map(|(_, ip)| Rr::addr(&q.name, ttl, *ip))
                    .collect(),
                _ => Vec::new(),
            };
            if !answers.is_empty() {
                return Reply::Answer(answers);
            }
            let exists =
                ptrs.iter().any(|(owner, _)| *owner == q.name) || addrs.iter().any(|(owner, _)| *owner == q.name);
            if exists {
                Reply::NoData(Some(NEGATIVE_TTL))
            } else {
                Reply::NxDomain(Some(NEGATIVE_TTL))
            }
        })
    }
}
