//! Explain: answers an explain pool's blocked subscribers on the router
//! itself with one SMTP line saying why, and where to send instead.
//!
//! At start ([`start`]), on a router with subscriber-facing interfaces:
//! transparent listeners on `127.0.0.1` and `::1` (any free port), the
//! policy routing that delivers the stage's marked packets locally, the TC
//! explain stage on every subscriber-facing interface, and last the
//! settings that tell the XDP gate to hand explain pools' blocked SYNs to
//! the stage. Without subscriber-facing interfaces, or with
//! `[egress.explain] enabled = false`, all of that is taken down instead
//! and explain pools are answered with a RST (as `reject`).
//!
//! Each connection ([`session`]) gets the reply as its greeting (a 554 by
//! default, RFC 5321 3.1); then, as that section asks of a server that
//! will not serve, `221` to QUIT and `503` to anything else, until the
//! client quits or goes quiet. The listener's children own the address of
//! the MX the subscriber tried (`IP_TRANSPARENT`), so the subscriber sees
//! the answer come from there.
//!
//! When the agent dies its listeners go with it: the stage answers the
//! blocked SYNs with a RST itself, and nothing is forwarded.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gatekeeper_common::explain::{flags, ExplainConfig as Settings, LISTENER_PRIORITY};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, ExplainConfig},
    datapath::{
        explain::{self as dp, Routing},
        Datapath,
    },
    domain::{PoolAction, RangeKind, Role},
    store::Store,
    Error, Result,
};

/// Listen backlog of each listener (the kernel completes handshakes while
/// the agent is busy, up to this many).
const BACKLOG: i32 = 1024;
/// How long a session waits for the client's next line.
const IDLE: Duration = Duration::from_secs(10);
/// Lines a session answers before it closes.
const MAX_COMMANDS: usize = 16;
/// The longest command line read (RFC 5321 4.5.3.1.4: 512 with CRLF; a
/// little more for sloppy clients).
const MAX_LINE: usize = 1024;
/// A subscriber's explained connection is logged at most once per this.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Subscribers remembered for that (then the memory starts over).
const LOG_MEMORY: usize = 4096;

/// The running explain listeners.
pub struct Listeners {
    v4: std::net::TcpListener,
    v6: Option<std::net::TcpListener>,
    cfg: Arc<ExplainConfig>,
}

/// Sets the explain stage up (or takes it down; see the module doc). Runs
/// at start, after the gates are attached. A failure is logged and leaves
/// the stage off (explain pools get a RST): the gates keep working.
pub fn start(cfg: &Config, store: &Store, dp: &mut Datapath) -> Option<Listeners> {
    match try_start(cfg, store, dp) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e.report(), "explain stage not set up: explain pools are answered with a RST");
            match dp::off(&dp.layout) {
                Ok(done) => done.iter().for_each(|what| info!("explain stage off: removed {what}")),
                Err(e) => error!(error = %e.report(), "explain stage: could not take it down"),
            }
            None
        }
    }
}

fn try_start(cfg: &Config, store: &Store, dp: &mut Datapath) -> Result<Option<Listeners>> {
    let subs = cfg.ifaces(Role::Subscriber);
    let explain_pools =
        store.list_ranges(Some(RangeKind::Pool))?.iter().filter(|r| r.action == Some(PoolAction::Explain)).count();
    let ec = &cfg.egress.explain;
    if subs.is_empty() || !ec.enabled {
        for what in dp::off(&dp.layout)? {
            info!("explain stage off: removed {what}");
        }
        if explain_pools > 0 {
            let why = if ec.enabled {
                "no subscriber-facing interface (--subscriber-iface): an uplink gate sees forwarded SYNs too late to answer them locally"
            } else {
                "[egress.explain] enabled = false"
            };
            warn!(pools = explain_pools, "explain pools are answered with a RST, as reject: {why}");
        }
        return Ok(None);
    }
    let v4 = listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| Error::io("bind the explain listener on 127.0.0.1 (IP_TRANSPARENT needs CAP_NET_ADMIN)", e))?;
    let v6 = match listener(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no IPv6 explain listener: IPv6 subscribers of explain pools get a RST");
            None
        }
    };
    let families: Vec<bool> = if v6.is_some() { vec![false, true] } else { vec![false] };
    let routing = Routing { mark: ec.mark, mask: ec.mask, table: ec.table, priority: ec.priority };
    let report = dp::install_routing(&dp.layout, Some(routing), &families)?;
    for c in &report.removed {
        info!("explain routing: removed `{c}` (no longer configured)");
    }
    for c in &report.added {
        info!("explain routing: `{c}`");
    }
    for c in &report.adopted {
        debug!("explain routing: kept `{c}` (added by an earlier agent)");
    }
    for c in &report.foreign {
        warn!("explain routing: `{c}` is there already, not added by gatekeeper: used, never removed");
    }
    let mut staged = true;
    for ifname in &subs {
        match dp.attach_explain(ifname) {
            Ok(adopted) => info!(iface = %ifname, adopted, "explain stage attached (tcx ingress)"),
            Err(e) => {
                warn!(iface = %ifname, error = %e.report(), "explain stage not attached: explain pools are answered with a RST (tcx needs Linux 6.6)");
                staged = false;
            }
        }
    }
    for gone in dp::detach_except(&dp.layout, &subs)? {
        info!(iface = %gone, "explain stage detached: no longer a subscriber-facing interface");
    }
    let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    let settings = Settings {
        mark: ec.mark,
        mask: ec.mask,
        flags: if staged { flags::STAGED } else { 0 },
        port_v4: port(&v4),
        port_v6: v6.as_ref().map_or(0, port),
    };
    dp::set_config(&dp.layout, settings)?;
    info!(
        port_v4 = settings.port_v4,
        port_v6 = settings.port_v6,
        staged,
        reply = %ec.reply(25),
        "explain listeners ready"
    );
    Ok(Some(Listeners { v4, v6, cfg: Arc::new(ec.clone()) }))
}

/// A transparent listener on `addr`: its children may own any address
/// (the MX the subscriber tried). Free-bind, as a fresh namespace's
/// loopback may still be down; no SO_REUSEPORT (the stage picks the
/// listener itself).
fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let (domain, v6) = if addr.is_ipv6() { (Domain::IPV6, true) } else { (Domain::IPV4, false) };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if v6 {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
        s.set_freebind_v4(true)?;
    }
    // How the stage knows the listener as the agent's.
    s.set_priority(LISTENER_PRIORITY)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Serves both listeners until the agent exits.
pub async fn serve(l: Listeners) {
    let sessions = Arc::new(Semaphore::new(l.cfg.max_sessions as usize));
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut all = vec![l.v4];
    all.extend(l.v6);
    let mut tasks = Vec::new();
    for std_listener in all {
        let listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "explain listener not served");
                continue;
            }
        };
        tasks.push(tokio::spawn(accept_loop(listener, l.cfg.clone(), sessions.clone(), seen.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
}

type Seen = Arc<Mutex<HashMap<IpAddr, Instant>>>;

async fn accept_loop(listener: TcpListener, cfg: Arc<ExplainConfig>, sessions: Arc<Semaphore>, seen: Seen) {
    loop {
        // At the cap, connections wait in the listen queue.
        let Ok(permit) = sessions.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "explain listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cfg = cfg.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let _permit = permit;
            explained(stream, peer, &cfg, &seen).await;
        });
    }
}

async fn explained(stream: TcpStream, peer: SocketAddr, cfg: &ExplainConfig, seen: &Seen) {
    // The MX (address and port) the subscriber tried: the child owns it.
    let mx = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let reply = cfg.reply(mx.port());
    if should_log(seen, peer.ip()) {
        info!(subscriber = %peer.ip(), mx = %mx, %reply, "explained a blocked connection");
    }
    let _ = stream.set_nodelay(true);
    if let Err(e) = session(stream, &reply).await {
        debug!(subscriber = %peer, error = %e, "explain session ended");
    }
}

fn should_log(seen: &Seen, ip: IpAddr) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if seen.get(&ip).is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
        return false;
    }
    if seen.len() >= LOG_MEMORY {
        seen.clear();
    }
    seen.insert(ip, now);
    true
}

/// One session: the reply as greeting; `221` to QUIT, `503` to anything
/// else; closes after QUIT, [`MAX_COMMANDS`] lines, [`IDLE`] without a
/// line, or an over-long line. After `221` the client is left to close
/// first (so the time-wait state stays with it), for at most [`IDLE`].
pub async fn session<S: AsyncRead + AsyncWrite + Unpin>(stream: S, reply: &str) -> io::Result<()> {
    let mut s = BufReader::new(stream);
    timed(s.get_mut().write_all(format!("{reply}\r\n").as_bytes())).await?;
    let mut line = Vec::with_capacity(128);
    for _ in 0..MAX_COMMANDS {
        line.clear();
        let n = timed((&mut s).take(MAX_LINE as u64).read_until(b'\n', &mut line)).await?;
        if n == 0 || !line.ends_with(b"\n") {
            // EOF, or a line too long to be a command.
            break;
        }
        let cmd = String::from_utf8_lossy(&line);
        if cmd.trim().eq_ignore_ascii_case("QUIT") {
            timed(s.get_mut().write_all(b"221 2.0.0 Bye\r\n")).await?;
            timed(s.get_mut().shutdown()).await.ok();
            // Wait for the client's close (bounded).
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(IDLE, (&mut s).take(MAX_LINE as u64).read_to_end(&mut rest)).await;
            return Ok(());
        }
        timed(s.get_mut().write_all(b"503 5.5.1 Error: send QUIT\r\n")).await?;
    }
    timed(s.get_mut().shutdown()).await.ok();
    Ok(())
}

async fn timed<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(IDLE, f).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    const REPLY: &str = "554 5.7.1 port 25 is blocked for dynamic addresses; send through smtp.example.net on port 587 with authentication";

    async fn talk(input: &[u8]) -> String {
        let (mut client, server) = duplex(4096);
        let t = tokio::spawn(async move { session(server, REPLY).await });
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        t.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn greets_with_the_reply_then_waits_for_quit() {
        assert_eq!(talk(b"QUIT\r\n").await, format!("{REPLY}\r\n221 2.0.0 Bye\r\n"));
        assert_eq!(
            talk(b"EHLO x\r\nMAIL FROM:<a@b>\r\nquit\n").await,
            format!("{REPLY}\r\n503 5.5.1 Error: send QUIT\r\n503 5.5.1 Error: send QUIT\r\n221 2.0.0 Bye\r\n")
        );
        // The client just goes away: the greeting was all.
        assert_eq!(talk(b"").await, format!("{REPLY}\r\n"));
    }

    #[tokio::test]
    async fn bounded_by_commands_and_line_length() {
        let many = "NOOP\r\n".repeat(MAX_COMMANDS + 5);
        let out = talk(many.as_bytes()).await;
        assert_eq!(out.matches("503 ").count(), MAX_COMMANDS, "{out}");
        let long = vec![b'x'; MAX_LINE * 2];
        assert_eq!(talk(&long).await, format!("{REPLY}\r\n"));
    }
}
