//! Self-test of the netlab scaffolding (root): two namespaces joined by a
//! veth pair with IPv4 and IPv6 addresses, a listener, connects that succeed,
//! are refused and time out, processes inside a namespace, bpffs pin dirs,
//! and cleanup after drop — also when a test panics.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use gatekeeper_tests::netlab::{
    self, in_netns, tcp_connect, veth_pair, AgentProcess, ConnectOutcome, Netns, PinDirGuard, TcpListenerGuard,
};

const A4: &str = "192.0.2.1";
const B4: &str = "192.0.2.2";
const A6: &str = "2001:db8:1::1";
const B6: &str = "2001:db8:1::2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip_: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_), port)
}

/// Client `a` and server `b`, joined by veth `va` -- `vb`.
fn pair() -> (Netns, Netns) {
    netlab::require_root();
    let a = Netns::new("sta").unwrap();
    let b = Netns::new("stb").unwrap();
    veth_pair(&a, "va", &b, "vb").unwrap();
    a.addr_add("va", &format!("{A4}/24")).unwrap();
    b.addr_add("vb", &format!("{B4}/24")).unwrap();
    a.addr_add("va", &format!("{A6}/64")).unwrap();
    b.addr_add("vb", &format!("{B6}/64")).unwrap();
    (a, b)
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
        || std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.split_whitespace().next() == Some(name)))
            .unwrap_or(false)
}

#[test]
fn connect_refused_timeout_v4_v6_and_cleanup() {
    let (a, b) = pair();
    let (a_name, b_name) = (a.name().to_owned(), b.name().to_owned());
    assert!(a_name.starts_with("gk-sta-") && netns_exists(&a_name));

    // Addresses are there and usable at once (no DAD).
    let addrs = a.ip(&["-o", "addr", "show", "dev", "va"]).unwrap();
    assert!(addrs.contains(A4) && addrs.contains(A6), "{addrs}");
    assert!(!addrs.contains("tentative"), "{addrs}");

    let l4 = TcpListenerGuard::spawn(&b, sa(B4, 2525)).unwrap();
    let l6 = TcpListenerGuard::spawn(&b, sa(B6, 2525)).unwrap();
    let t = Duration::from_secs(3);

    assert_eq!(tcp_connect(&a, ip(A4), sa(B4, 2525), t), ConnectOutcome::Connected);
    assert_eq!(tcp_connect(&a, ip(A6), sa(B6, 2525), t), ConnectOutcome::Connected);
    assert!(l4.wait_for_accepts(1, Duration::from_secs(2)), "v4 accepts: {}", l4.accepts());
    assert!(l6.wait_for_accepts(1, Duration::from_secs(2)), "v6 accepts: {}", l6.accepts());

    // Nothing listens on 2526: RST.
    assert_eq!(tcp_connect(&a, ip(A4), sa(B4, 2526), t), ConnectOutcome::Refused);
    assert_eq!(tcp_connect(&a, ip(A6), sa(B6, 2526), t), ConnectOutcome::Refused);

    // A host that is not there: `a` routes to it via `b`, `b` blackholes it
    // (silently), so the SYN gets no answer.
    a.route_add(&format!("203.0.113.0/24 via {B4}")).unwrap();
    b.route_add("blackhole 203.0.113.0/24").unwrap();
    a.route_add(&format!("2001:db8:ff::/48 via {B6}")).unwrap();
    b.route_add("blackhole 2001:db8:ff::/48").unwrap();
    let short = Duration::from_millis(300);
    let start = Instant::now();
    assert_eq!(tcp_connect(&a, ip(A4), sa("203.0.113.7", 25), short), ConnectOutcome::TimedOut);
    assert_eq!(tcp_connect(&a, ip(A6), sa("2001:db8:ff::7", 25), short), ConnectOutcome::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(3), "timeouts took {:?}", start.elapsed());

    // No route at all inside a namespace: nothing leads outside.
    match tcp_connect(&a, ip(A4), sa("198.51.100.1", 25), short) {
        ConnectOutcome::Other(e) => assert!(e.contains("unreachable"), "{e}"),
        other => panic!("expected network unreachable, got {other:?}"),
    }
    let routes = a.ip(&["route", "show", "default"]).unwrap();
    assert!(routes.trim().is_empty(), "namespace has a default route: {routes}");

    assert_eq!(l4.accepts(), 1);
    assert_eq!(l6.accepts(), 1);
    drop((l4, l6));
    drop(a);
    drop(b);
    assert!(!netns_exists(&a_name), "{a_name} still exists");
    assert!(!netns_exists(&b_name), "{b_name} still exists");
}

#[test]
fn listener_on_port_zero_and_in_netns() {
    let (a, b) = pair();
    let l = TcpListenerGuard::spawn(&b, sa(B4, 0)).unwrap();
    assert_ne!(l.addr().port(), 0);
    // The closure runs inside `b`: `vb` exists there, `va` does not.
    let (vb, va) =
        in_netns(&b, || unsafe { (libc::if_nametoindex(c"vb".as_ptr()), libc::if_nametoindex(c"va".as_ptr())) });
    assert!(vb > 0 && va == 0, "vb={vb} va={va}");
    assert_eq!(vb, b.if_index("vb").unwrap());
    assert_eq!(b.mac("vb").unwrap().len(), 6);
    for _ in 0..3 {
        assert_eq!(tcp_connect(&a, ip(A4), l.addr(), Duration::from_secs(3)), ConnectOutcome::Connected);
    }
    assert!(l.wait_for_accepts(3, Duration::from_secs(2)));
    // Commands inside the namespace.
    let out = a.run(&["ip", "-o", "addr", "show", "dev", "va"]).unwrap();
    assert!(out.contains(A4), "{out}");
    let err = a.run(&["ip", "link", "show", "dev", "nonexistent0"]).unwrap_err().to_string();
    assert!(err.contains("nonexistent0"), "{err}");
}

#[test]
fn agent_process_runs_in_namespace_and_is_killed() {
    let (a, _b) = pair();
    let mut p = AgentProcess::spawn(&a, Path::new("/bin/sh"), &["-c", "echo ready; exec sleep 30"]).unwrap();
    p.wait_for_log("ready", Duration::from_secs(5)).unwrap();
    let link = std::fs::read_link(format!("/proc/{}/ns/net", p.pid())).unwrap();
    assert_eq!(link.to_string_lossy(), format!("net:[{}]", a.inode().unwrap()));
    // nsenter leaves the mount namespace alone: bpffs is visible.
    netlab::ensure_bpffs().unwrap();
    let mut ls =
        AgentProcess::spawn(&a, Path::new("/bin/sh"), &["-c", "grep -c ' /sys/fs/bpf ' /proc/self/mountinfo"]).unwrap();
    assert!(ls.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    assert_ne!(ls.log().trim(), "0", "bpffs not visible via nsenter");
    assert!(a.pids().contains(&(p.pid() as i32)));
    assert!(p.is_running());
    let st = p.kill().unwrap();
    assert!(!st.success());
    assert!(!p.is_running());

    // A process left running in a namespace is killed when the namespace goes.
    // (Not an AgentProcess, whose guard would stop it and whose log
    // directory would be left behind by a forget.)
    let q = std::process::Command::new("nsenter")
        .arg(format!("--net={}", a.path().display()))
        .args(["--", "/bin/sleep", "30"])
        .spawn()
        .unwrap();
    let qpid = q.id() as i32;
    drop(q); // a Child's drop neither waits nor kills: a process nobody stops
             // nsenter enters the namespace, then execs: wait until it is in there.
    let ino = a.inode().unwrap();
    let inside = || {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/proc/{qpid}/ns/net")).is_ok_and(|m| m.ino() == ino)
    };
    assert!(netlab::poll_until(Duration::from_secs(5), inside), "pid {qpid} never entered the namespace");
    drop(a);
    let state = std::fs::read_to_string(format!("/proc/{qpid}/stat")).unwrap_or_default();
    let state = state.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next()).unwrap_or(None);
    assert!(matches!(state, None | Some('Z')), "pid {qpid} still alive: {state:?}");
}

#[test]
fn namespace_removed_when_test_panics() {
    netlab::require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let (a, _b) = pair();
        let _l = TcpListenerGuard::spawn(&a, sa(A4, 25)).unwrap();
        let _pins = PinDirGuard::new().unwrap();
        tx.send((a.name().to_owned(), _pins.path().to_owned())).unwrap();
        panic!("deliberate panic to test cleanup");
    })
    .join();
    assert!(r.is_err());
    let (name, pins) = rx.recv().unwrap();
    assert!(!netns_exists(&name), "{name} survived a panic");
    assert!(!pins.exists(), "{} survived a panic", pins.display());
}

#[test]
fn pin_dir_guard() {
    netlab::require_root();
    let g = PinDirGuard::new().unwrap();
    let p = g.path().to_owned();
    assert!(p.file_name().unwrap().to_string_lossy().starts_with("gk-test-"));
    std::fs::create_dir(p.join("sub")).unwrap();
    drop(g);
    assert!(!p.exists());
}

#[test]
fn refuses_non_test_addresses() {
    netlab::require_root();
    let a = Netns::new("strf").unwrap();
    let b = Netns::new("strg").unwrap();
    veth_pair(&a, "d0", &b, "d1").unwrap();
    assert!(a.addr_add("d0", "10.0.0.1/24").is_err());
    assert!(a.addr_add("d0", "192.0.2.1/16").is_err());
    assert!(a.addr_add("d0", "2001:db9::1/64").is_err());
    assert!(a.route_add("default via 10.0.0.1").is_err());
    assert!(a.route_add("8.8.8.0/24 dev d0").is_err());
    assert!(Netns::new("Bad-Prefix").is_err());
    assert!(veth_pair(&a, "eth0", &b, "x").is_err());
    assert!(veth_pair(&a, "a-very-long-interface", &b, "x").is_err());
}

#[test]
fn bin_path_reports_missing_binary_clearly() {
    let err = netlab::bin_path("no-such-gatekeeper-binary").unwrap_err().to_string();
    assert!(err.contains("cargo build -p gatekeeper --bins"), "{err}");
}
