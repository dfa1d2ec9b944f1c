//! Network-namespace scaffolding for the root integration tests, the lab and
//! the benchmarks.
//!
//! Everything here is a guard that cleans up on `Drop`, also while a test
//! panics: [`Netns`] (a namespace), [`TcpListenerGuard`] (an accept-and-close
//! server), [`AgentProcess`] (a process started inside a namespace) and
//! [`PinDirGuard`] (a bpffs directory). Commands shell out to `ip` (iproute2)
//! and `nsenter` (util-linux); `cargo xtask setup` installs both.
//!
//! Safety rules, enforced where a function takes an address:
//! * interfaces are only created inside namespaces made here (`ip -n NS ...`);
//!   nothing touches the host's namespace or its interfaces;
//! * addresses only from the documentation ranges 192.0.2.0/24,
//!   198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 ([`is_test_addr`]);
//!   routes only to and via those (plus `default` and IPv6 link-local
//!   gateways) — a namespace has nothing but veths to other namespaces, so no
//!   route leads out of the machine;
//! * every wait is bounded in time; commands time out after [`CMD_TIMEOUT`].
//!
//! Names: namespaces are `gk-<prefix>-<pid>-<n>`, bpffs dirs
//! `/sys/fs/bpf/gk-test-<pid>-<n>`; `cargo xtask test` fails if any is left
//! behind once the tests are done. The pid in the name also lets
//! [`cleanup_stale`] remove leftovers of dead processes only.
//!
//! Requires root. Tests may run in parallel (names are unique per process and
//! counter).

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{self, Read as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::IpNet;
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Prefix of every namespace made here.
pub const NETNS_PREFIX: &str = "gk-";
/// Prefix of every directory [`PinDirGuard`] makes under [`BPFFS`].
pub const PIN_PREFIX: &str = "gk-test-";
pub const BPFFS: &str = "/sys/fs/bpf";
/// Upper bound for any one command run by this module.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// A [`TcpListenerGuard`] stops by itself after this long.
pub const LISTENER_MAX_LIFETIME: Duration = Duration::from_secs(15 * 60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Panics with a clear message unless running as root (the root tests need
/// it for namespaces, XDP and bpffs; run them with `cargo xtask test`).
pub fn require_root() {
    assert!(is_root(), "this test needs root (network namespaces, XDP, bpffs): run `cargo xtask test` as root");
}

// ---------------------------------------------------------------------------
// Address safety

/// The documentation ranges, the only addresses the tests may use.
pub const TEST_NETS: [&str; 4] = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"];

/// Is `ip` in one of the documentation ranges the tests may use?
pub fn is_test_addr(ip: IpAddr) -> bool {
    TEST_NETS.iter().any(|n| n.parse::<IpNet>().unwrap().contains(&ip))
}

/// Test ranges, loopback (namespace-local), or unspecified (any).
pub fn is_allowed_endpoint(ip: IpAddr) -> bool {
    is_test_addr(ip) || ip.is_loopback() || ip.is_unspecified()
}

fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `cidr` (`addr/len` or a bare address) lies wholly inside a test range.
pub fn check_test_net(cidr: &str) -> Result<IpNet> {
    let net: IpNet = match cidr.parse() {
        Ok(n) => n,
        Err(_) => IpNet::from(cidr.parse::<IpAddr>().map_err(|_| anyhow!("not an address: {cidr:?}"))?),
    };
    let ok = TEST_NETS.iter().any(|t| t.parse::<IpNet>().unwrap().contains(&net));
    if !ok {
        bail!("{cidr} is outside the test ranges {TEST_NETS:?}");
    }
    Ok(net)
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name == "lo"
        || name.starts_with("eth")
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("bad test interface name {name:?}: 1-15 chars [A-Za-z0-9._-], not lo/eth*");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running commands

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `cmd` (stdin closed), wait at most `timeout` (then SIGKILL), return its
/// stdout; on failure the error names the command and carries its stderr.
fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = run_capture(cmd, timeout)?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let detail = if out.stderr.trim().is_empty() { out.stdout.trim() } else { out.stderr.trim() };
    bail!("`{}` failed ({}): {detail}", out.command, out.status)
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args), CMD_TIMEOUT)
}

// ---------------------------------------------------------------------------
// Netns

/// A network namespace `gk-<prefix>-<pid>-<n>` with `lo` up and IPv6 DAD
/// off. Dropping it kills every process still in it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// `prefix`: 1-12 chars of `[a-z0-9]` (e.g. "cli", "mx").
    pub fn new(prefix: &str) -> Result<Self> {
        if prefix.is_empty()
            || prefix.len() > 12
            || !prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!("bad namespace prefix {prefix:?}: 1-12 chars of [a-z0-9]");
        }
        let name = format!("{NETNS_PREFIX}{prefix}-{}-{}", std::process::id(), next_id());
        let path = PathBuf::from("/run/netns").join(&name);
        if path.exists() {
            // Same pid and counter as ours: a leftover of a dead process.
            let _ = ip(&["netns", "del", &name]);
        }
        {
            // The first `ip netns add` on a machine makes /run/netns a shared
            // mount; parallel tests racing there could stack two of them.
            static ADD_LOCK: Mutex<()> = Mutex::new(());
            let _g = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ip(&["netns", "add", &name])?;
        }
        // From here on Drop deletes it, also if the rest fails.
        let ns = Self { name, path };
        ns.ip(&["link", "set", "lo", "up"])?;
        // IPv6 usable at once: no duplicate address detection (also for the
        // link-local addresses of interfaces made later: `default`).
        ns.sysctl(&[
            ("net.ipv6.conf.all.disable_ipv6", "0"),
            ("net.ipv6.conf.default.disable_ipv6", "0"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.all.dad_transmits", "0"),
            ("net.ipv6.conf.default.dad_transmits", "0"),
        ])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode (what `/proc/PID/ns/net` of a member links to).
    pub fn inode(&self) -> Result<u64> {
        Ok(fs::metadata(&self.path)?.ino())
    }

    /// Run a command inside with `ip netns exec` (which remounts /sys, so
    /// /sys/fs/bpf is not visible: use [`AgentProcess`] for bpf users).
    /// Returns stdout; the error carries stderr. Bounded by [`CMD_TIMEOUT`].
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.run_timeout(args, CMD_TIMEOUT)
    }

    pub fn run_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<String> {
        if args.is_empty() {
            bail!("Netns::run: no command");
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        run_cmd(&mut cmd, timeout)
    }

    /// `ip -n NAME ARGS...` (iproute2 acting inside the namespace).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_cmd(&mut cmd, CMD_TIMEOUT)
    }

    /// Set sysctls inside the namespace (`sysctl -q -w k=v ...`).
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let mut args = vec!["sysctl".to_owned(), "-q".to_owned(), "-w".to_owned()];
        args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
        self.run(&args).map(drop)
    }

    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"]).map(drop)
    }

    /// Add `cidr` (e.g. "192.0.2.1/24", "2001:db8:1::1/64") to `ifname`;
    /// IPv6 addresses with `nodad`, so they work at once.
    pub fn addr_add(&self, ifname: &str, cidr: &str) -> Result<()> {
        if ifname != "lo" {
            check_ifname(ifname)?;
        }
        let net = check_test_net(cidr)?;
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        if matches!(net, IpNet::V6(_)) {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// `ip -n NAME route add ROUTE`, e.g. "203.0.113.0/24 via 192.0.2.2",
    /// "blackhole 203.0.113.0/24", "default via 2001:db8:1::1 dev veth0".
    /// Every address in it must be in the test ranges (gateways may also be
    /// IPv6 link-local).
    pub fn route_add(&self, route: &str) -> Result<()> {
        let words: Vec<&str> = route.split_whitespace().collect();
        if words.is_empty() {
            bail!("route_add: empty route");
        }
        for w in &words {
            let addr_part = w.split('/').next().unwrap_or(w);
            if let Ok(a) = addr_part.parse::<IpAddr>() {
                if !is_link_local_v6(a) {
                    check_test_net(w).with_context(|| format!("route {route:?}"))?;
                }
            }
        }
        let mut args = vec!["route", "add"];
        args.extend(&words);
        self.ip(&args).map(drop)
    }

    /// Index of `ifname` inside the namespace.
    pub fn if_index(&self, ifname: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| anyhow!("cannot read the index of {ifname} from {out:?}"))
    }

    /// MAC address of `ifname` inside the namespace.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let hex = words
            .iter()
            .position(|w| *w == "link/ether")
            .and_then(|i| words.get(i + 1))
            .ok_or_else(|| anyhow!("{ifname} has no link/ether address: {out:?}"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = hex.split(':').collect();
        if parts.len() != 6 {
            bail!("bad MAC {hex:?}");
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {hex:?}"))?;
        }
        Ok(mac)
    }

    /// Wait (bounded) until `ifname` is up with carrier and its qdisc is
    /// attached: right after `link set up` a veth drops packets until the
    /// kernel's link watcher has run (up to ~1 s).
    pub fn wait_link_ready(&self, ifname: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
            let ready = out.contains("LOWER_UP") && out.contains(",UP") && !out.contains("qdisc noop");
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{ifname} in {} not ready after {timeout:?}: {}", self.name, out.trim());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids of the processes in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        ip(&["netns", "pids", &self.name])
            .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        let pids: Vec<i32> = self.pids().into_iter().filter(|&p| p != me && p > 1).collect();
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        // Bounded wait for them to go (zombies of our own children count as gone).
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && pids.iter().any(|p| proc_state(*p).is_some_and(|s| s != 'Z')) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netlab: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}

/// State letter of /proc/PID/stat (R, S, Z, ...), None if there is no such process.
fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up and ready. It is made
/// inside `a` with the peer put straight into `b`, so it never appears in
/// the host's namespace; it goes away with either namespace.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.link_up(a_if)?;
    b.link_up(b_if)?;
    a.wait_link_ready(a_if, Duration::from_secs(5))?;
    b.wait_link_ready(b_if, Duration::from_secs(5))?;
    Ok(())
}

/// Two fresh namespaces joined by one veth pair: each end given as
/// (namespace prefix, interface name, addresses of that interface).
pub fn joined<A: AsRef<str>, B: AsRef<str>>(a: (&str, &str, &[A]), b: (&str, &str, &[B])) -> Result<(Netns, Netns)> {
    let (a_ns, b_ns) = (Netns::new(a.0)?, Netns::new(b.0)?);
    veth_pair(&a_ns, a.1, &b_ns, b.1)?;
    for addr in a.2 {
        a_ns.addr_add(a.1, addr.as_ref())?;
    }
    for addr in b.2 {
        b_ns.addr_add(b.1, addr.as_ref())?;
    }
    Ok((a_ns, b_ns))
}

/// Run `f` on a fresh thread that first joins `ns`'s network namespace
/// (`setns(CLONE_NEWNET)`), and return its result. Sockets made in `f` stay
/// in the namespace after `f` returns. Panics in `f` propagate.
pub fn in_netns<T, F>(ns: &Netns, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = ns.path().to_path_buf();
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("in_netns: open {}: {e}", path.display()));
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("in_netns: setns {}: {e}", path.display()));
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

// ---------------------------------------------------------------------------
// TCP helpers

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    Connected,
    /// No answer within the timeout (e.g. the SYN was dropped).
    TimedOut,
    /// RST (nothing listening, or a reject).
    Refused,
    Other(String),
}

/// Connect from `src` (port 0) to `dst` inside `ns`; the stream on success.
/// Panics if either address is outside the test ranges (or loopback).
pub fn tcp_connect_stream(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> std::result::Result<TcpStream, ConnectOutcome> {
    assert!(is_allowed_endpoint(src), "tcp_connect: source {src} is not a test address");
    assert!(
        is_allowed_endpoint(dst.ip()) && !dst.ip().is_unspecified(),
        "tcp_connect: destination {dst} is not a test address"
    );
    in_netns(ns, || {
        let other = |what: &str, e: io::Error| ConnectOutcome::Other(format!("{what}: {e}"));
        let sock =
            Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)).map_err(|e| other("socket", e))?;
        sock.bind(&SockAddr::from(SocketAddr::new(src, 0))).map_err(|e| other(&format!("bind {src}"), e))?;
        match sock.connect_timeout(&SockAddr::from(dst), timeout) {
            Ok(()) => Ok(TcpStream::from(sock)),
            Err(e) => Err(match e.kind() {
                io::ErrorKind::ConnectionRefused => ConnectOutcome::Refused,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectOutcome::TimedOut,
                _ => other(&format!("connect {dst}"), e),
            }),
        }
    })
}

/// Connect from `src` to `dst` inside `ns` and close at once.
pub fn tcp_connect(ns: &Netns, src: IpAddr, dst: SocketAddr, timeout: Duration) -> ConnectOutcome {
    match tcp_connect_stream(ns, src, dst, timeout) {
        Ok(_stream) => ConnectOutcome::Connected,
        Err(outcome) => outcome,
    }
}

/// A TCP listener inside a namespace that accepts and immediately closes,
/// counting accepts, on its own thread. Stops on drop (within ~10 ms) or
/// after [`LISTENER_MAX_LIFETIME`].
pub struct TcpListenerGuard {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A non-blocking TCP listener on `addr` inside `ns` (SO_REUSEADDR; an
/// IPv6 one is IPv6-only), for the harness's own servers.
pub fn listen_socket(ns: &Netns, addr: SocketAddr, backlog: i32) -> Result<Socket> {
    in_netns(ns, || -> Result<Socket> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.bind(&SockAddr::from(addr)).with_context(|| format!("bind {addr}"))?;
        sock.listen(backlog)?;
        sock.set_nonblocking(true)?;
        Ok(sock)
    })
    .with_context(|| format!("listen on {addr} in {}", ns.name()))
}

impl TcpListenerGuard {
    /// Listen on `addr` (a test address; port 0 picks one, see [`Self::addr`]).
    pub fn spawn(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        if !is_allowed_endpoint(addr.ip()) {
            bail!("listener address {addr} is not a test address");
        }
        let sock = listen_socket(ns, addr, 128)?;
        let bound = sock.local_addr()?.as_socket().ok_or_else(|| anyhow!("listener has no inet address"))?;
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepts, stop) = (accepts.clone(), stop.clone());
            std::thread::Builder::new().name(format!("gk-listen-{}", bound.port())).spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LISTENER_MAX_LIFETIME {
                    match sock.accept() {
                        Ok((conn, _)) => {
                            accepts.fetch_add(1, Ordering::SeqCst);
                            drop(conn);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?
        };
        Ok(Self { addr: bound, accepts, stop, thread: Some(thread) })
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until at least `n` connections were accepted.
    pub fn wait_for_accepts(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.accepts() >= n)
    }
}

impl Drop for TcpListenerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `done` every 5 ms until it holds (true) or `timeout` has passed
/// (false): the harness's bounded wait for something another thread or
/// process does.
pub fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// Processes in a namespace

/// A process started inside a namespace with
/// `nsenter --net=/run/netns/NAME -- BIN ARGS` (only the network namespace
/// changes, so /sys/fs/bpf stays visible, unlike with `ip netns exec`).
/// stdout and stderr go to one log file in a temporary directory. Dropping it
/// SIGKILLs the process (and prints the log's tail if a test is panicking).
///
/// The process also gets SIGKILL if the *thread* that spawned it exits
/// (`PR_SET_PDEATHSIG`), so a killed test runner leaves no agent behind:
/// spawn it on the thread that keeps the guard (not inside [`in_netns`]).
pub struct AgentProcess {
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
    _dir: tempfile::TempDir,
    what: String,
}

impl AgentProcess {
    pub fn spawn<S: AsRef<OsStr>>(ns: &Netns, bin: &Path, args: &[S]) -> Result<Self> {
        Self::spawn_with_env(ns, bin, args, &[])
    }

    /// Like [`Self::spawn`], with extra environment variables.
    pub fn spawn_with_env<S: AsRef<OsStr>>(ns: &Netns, bin: &Path, args: &[S], env: &[(&str, &str)]) -> Result<Self> {
        if !bin.is_file() {
            bail!("{} does not exist (see netlab::bin_path)", bin.display());
        }
        let dir = tempfile::Builder::new().prefix("gk-agent-").tempdir()?;
        let name = bin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let log = dir.path().join(format!("{name}.log"));
        let file = File::create(&log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let what = format!("{} in {}", describe(&cmd), ns.name());
        let child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
        let mut agent = Self { child, status: None, log, _dir: dir, what };
        agent.wait_in_netns(ns)?;
        Ok(agent)
    }

    /// Wait (bounded) until nsenter has switched namespaces, so that on
    /// return the process is inside `ns` (and `Netns`'s drop will find it),
    /// or has already exited.
    fn wait_in_netns(&mut self, ns: &Netns) -> Result<()> {
        let want = format!("net:[{}]", ns.inode()?);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let link = fs::read_link(format!("/proc/{}/ns/net", self.pid()));
            if link.is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Ok(());
            }
            if self.try_wait()?.is_some() {
                // Already done (a short command): nothing left to find.
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} did not enter the namespace within 5 s", self.what);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_none() {
            kill(Pid::from_raw(self.child.id() as i32), sig)?;
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(10))?.ok_or_else(|| anyhow!("{} survived SIGKILL for 10 s", self.what))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait_timeout(grace)? {
            Some(st) => Ok(st),
            None => self.kill(),
        }
    }

    /// Wait (bounded) until the log contains `needle`; fails early, with the
    /// log, if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.try_wait()? {
                // It may have written the line just before exiting.
                if self.log().contains(needle) {
                    return Ok(());
                }
                bail!("{} exited ({st}) before logging {needle:?}; log:\n{}", self.what, self.log());
            }
            if Instant::now() >= deadline {
                bail!("{} did not log {needle:?} within {timeout:?}; log:\n{}", self.what, self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = {
                let start = log.len().saturating_sub(4000);
                let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
                log[start..].to_owned()
            };
            eprintln!("netlab: log of {} (tail):\n{tail}", self.what);
        }
    }
}

/// Path of a workspace binary such as `gatekeeper`, built by
/// `cargo build -p gatekeeper --bins` (`cargo xtask test` does this first;
/// plain `cargo test` does NOT build it, since gatekeeper-tests depends only
/// on the library). Looks in `$GK_BIN_DIR`, then beside the running test
/// executable (`target/<profile>/deps/..`), then `$CARGO_TARGET_DIR/debug`,
/// then the workspace's `target/debug`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("GK_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(mut dir) = exe.parent().map(Path::to_path_buf) {
            if dir.file_name() == Some(OsStr::new("deps")) {
                dir.pop();
            }
            dirs.push(dir);
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join("debug"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "binary {name:?} not found in {dirs:?}: build it with `cargo build -p gatekeeper --bins` \
         (`cargo xtask test` does that before running the tests)"
    )
}

// ---------------------------------------------------------------------------
// bpffs

static BPFFS_LOCK: Mutex<()> = Mutex::new(());

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|line| {
            let Some((left, right)) = line.split_once(" - ") else {
                return false;
            };
            left.split(' ').nth(4) == Some(BPFFS) && right.split(' ').next() == Some("bpf")
        })
    })
}

/// Mount bpffs at /sys/fs/bpf unless it is mounted already.
pub fn ensure_bpffs() -> Result<()> {
    let _g = BPFFS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if bpffs_mounted() {
        return Ok(());
    }
    fs::create_dir_all(BPFFS)?;
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mount bpffs at {BPFFS}"))?;
    Ok(())
}

/// A fresh directory `/sys/fs/bpf/gk-test-<pid>-<n>` for pinning maps and
/// links; removed recursively on drop.
#[derive(Debug)]
pub struct PinDirGuard {
    path: PathBuf,
}

impl PinDirGuard {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let path = Path::new(BPFFS).join(format!("{PIN_PREFIX}{}-{}", std::process::id(), next_id()));
        if path.exists() {
            // Same pid and counter as ours: a leftover of a dead process.
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("netlab: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Leftovers

/// Pid encoded in a `...-<pid>-<n>` name.
fn owner_pid(name: &str) -> Option<i32> {
    let mut it = name.rsplit('-');
    it.next()?;
    it.next()?.parse().ok()
}

/// Remove `gk-*` namespaces and `/sys/fs/bpf/gk-test-*` directories whose
/// creating process is gone (leftovers of a killed test run); returns what
/// was removed. Those of live processes are left alone.
pub fn cleanup_stale() -> Vec<String> {
    // Names without a pid are not ours to judge: leave them.
    let alive = |name: &str| owner_pid(name).is_none_or(|p| Path::new(&format!("/proc/{p}")).exists());
    let mut removed = Vec::new();
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(NETNS_PREFIX) && !alive(name) {
                drop(Netns { name: name.to_owned(), path: PathBuf::from("/run/netns").join(name) });
                removed.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(BPFFS) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PIN_PREFIX) && !alive(&name) && fs::remove_dir_all(e.path()).is_ok() {
                removed.push(e.path().display().to_string());
            }
        }
    }
    removed
}

// ---------------------------------------------------------------------------
// Commands inside a namespace, keeping their exit status

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// `describe`d command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (`None` if a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Like `run_cmd`, but any exit status is a result: only failing to start
/// or running past `timeout` (then SIGKILL) is an error.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_err, mut pipe) in [
        (false, Box::new(child.stdout.take().unwrap()) as Box<dyn io::Read + Send>),
        (true, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((is_err, buf));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let pipe_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = pipe_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => err = b,
            Ok((false, b)) => out = b,
            Err(_) => break,
        }
    }
    let (stdout, stderr) = (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned());
    match status {
        None => bail!("`{what}` timed out after {timeout:?}; stderr: {}", stderr.trim()),
        Some(status) => Ok(CmdOutput { command: what, status, stdout, stderr }),
    }
}

/// Run `bin ARGS` inside `ns` with `nsenter --net=/run/netns/NAME` (only the
/// network namespace changes, so bpffs stays visible), stdin closed, for at
/// most `timeout`. Returns the output whatever the exit status.
pub fn nsenter_output<S: AsRef<OsStr>>(ns: &Netns, bin: &Path, args: &[S], timeout: Duration) -> Result<CmdOutput> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display())).arg("--").arg(bin).args(args);
    run_capture(&mut cmd, timeout)
}

impl Netns {
    /// Id of the XDP program attached to `ifname` (any mode), from
    /// `ip -d link show`; `None` if none is attached.
    pub fn xdp_prog_id(&self, ifname: &str) -> Result<Option<u32>> {
        let out = self.ip(&["-d", "link", "show", "dev", ifname])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        Ok(words.windows(3).find(|w| w[0] == "prog/xdp" && w[1] == "id").and_then(|w| w[2].parse().ok()))
    }
}

// ---------------------------------------------------------------------------
// Raw frames

/// Most frames [`send_frames`] sends in one call.
pub const MAX_RAW_FRAMES: usize = 100_000;
/// [`send_frames`] gives up after this long.
pub const RAW_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Source and destination address of an Ethernet frame carrying IPv4 or
/// IPv6 (after up to two VLAN tags), if it does.
fn frame_addrs(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        off += 4;
        ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    let l3 = off + 2;
    match ethertype {
        0x0800 => {
            let b = frame.get(l3 + 12..l3 + 20)?;
            Some((IpAddr::from([b[0], b[1], b[2], b[3]]), IpAddr::from([b[4], b[5], b[6], b[7]])))
        }
        0x86dd => {
            let b = frame.get(l3 + 8..l3 + 40)?;
            let src: [u8; 16] = b[..16].try_into().ok()?;
            let dst: [u8; 16] = b[16..].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

/// Sends complete Ethernet frames (e.g. from [`crate::packet::Packet::build`])
/// out of `ifname` inside `ns` through an AF_PACKET socket, in order, and
/// returns how many went out. Every frame must carry IPv4 or IPv6 with both
/// addresses in the test ranges. Bounded: at most [`MAX_RAW_FRAMES`] frames
/// and [`RAW_SEND_TIMEOUT`]; it pauses 2 ms after every 32 frames (and
/// backs off while the device queue is full) so that a veth peer's receive
/// ring keeps up instead of dropping the burst.
pub fn send_frames(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) -> Result<usize> {
    check_ifname(ifname)?;
    if frames.len() > MAX_RAW_FRAMES {
        bail!("send_frames: {} frames, at most {MAX_RAW_FRAMES}", frames.len());
    }
    for (i, f) in frames.iter().enumerate() {
        let (src, dst) =
            frame_addrs(f).ok_or_else(|| anyhow!("send_frames: frame {i} is not IPv4/IPv6 over Ethernet"))?;
        if !is_test_addr(src) || !is_test_addr(dst) {
            bail!("send_frames: frame {i} ({src} -> {dst}) is outside the test ranges");
        }
    }
    let name = std::ffi::CString::new(ifname)?;
    in_netns(ns, move || -> Result<usize> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        // SAFETY: plain libc calls on a fd we own; the sockaddr_ll is fully
        // initialized before use.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("send_frames: no interface {ifname} in {}", ns.name());
        }
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let deadline = Instant::now() + RAW_SEND_TIMEOUT;
        let mut sent = 0;
        for (i, frame) in frames.iter().enumerate() {
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            loop {
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if n >= 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                let busy = matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR));
                if !busy {
                    return Err(e).with_context(|| format!("send frame {i} on {ifname}"));
                }
                if Instant::now() >= deadline {
                    bail!("send_frames: {ifname} still busy after {RAW_SEND_TIMEOUT:?} ({sent} sent)");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent += 1;
            if sent % 32 == 0 {
                if Instant::now() >= deadline {
                    bail!("send_frames: not done after {RAW_SEND_TIMEOUT:?} ({sent} sent)");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(sent)
    })
}
