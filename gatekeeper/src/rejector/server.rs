//! The rejector's listener side: accepts steered connections and serves
//! each within bounds, so answering refused sources can never cost more
//! than the operator allowed.
//!
//! Beyond a bound a connection is closed at once, never queued: at the
//! session cap, the caller sees `at_capacity` and lets the datapath lease
//! lapse (the gate drops again); a source over its rate is reported
//! through `on_quiet`, so the caller can silence it in the kernel.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use super::{mail, serve_session, Protocol, SessionInfo, LAST_WORD};
use crate::config::{Rate, RejectSettings};
use crate::domain::Refusal;
use crate::error::{Error, Result};

/// Says why a source is refused, and its reverse DNS name; `None`: it is
/// not refused (the connection should not be here).
pub type Resolve = Arc<dyn Fn(IpAddr) -> Option<(Refusal, Option<String>)> + Send + Sync>;
/// Called for a source over the per-source rate, with how long it should
/// be silenced.
pub type OnQuiet = Arc<dyn Fn(IpAddr, Duration) + Send + Sync>;

/// Sources tracked at once by the rate limiter and by the log limiter.
pub const MAX_TRACKED_SOURCES: usize = 16_384;

/// Accepts refused sources' connections on listeners the caller bound.
pub struct Rejector {
    listeners: Vec<std::net::TcpListener>,
    settings: RejectSettings,
    resolve: Resolve,
    on_quiet: OnQuiet,
    log_interval: Duration,
}

/// The running rejector. Dropping it (or [`abort`](Self::abort)) stops
/// accepting; sessions under way finish within `session_timeout`.
pub struct RejectorHandle {
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// Counters for `stats` and status.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RejectorStats {
    /// Sessions answered with the reason, per refusal.
    pub answered: BTreeMap<Refusal, u64>,
    /// Connections closed at once: the session cap was reached.
    pub closed_at_cap: u64,
    /// Connections closed at once: the source was over its rate.
    pub over_rate: u64,
    /// Connections from sources that are not refused (answered "try again
    /// later").
    pub misrouted: u64,
    /// Connections to a port no protocol is configured on (closed).
    pub unknown_port: u64,
    /// Sessions under way.
    pub active: u32,
    pub at_capacity: bool,
}

struct Shared {
    settings: RejectSettings,
    resolve: Resolve,
    on_quiet: OnQuiet,
    log_interval: Duration,
    sessions: Arc<Semaphore>,
    at_capacity: watch::Sender<bool>,
    rates: Mutex<RateLimiter>,
    logged: Mutex<HashMap<IpAddr, Instant>>,
    answered: [AtomicU64; Refusal::ALL.len()],
    closed_at_cap: AtomicU64,
    over_rate: AtomicU64,
    misrouted: AtomicU64,
    unknown_port: AtomicU64,
}

impl Rejector {
    /// A rejector on `listeners` (already listening; any address: the
    /// sockets receive steered connections, and an accepted socket's local
    /// port picks the protocol from `settings`).
    pub fn new(listeners: Vec<std::net::TcpListener>, settings: RejectSettings, resolve: Resolve) -> Rejector {
        Rejector { listeners, settings, resolve, on_quiet: Arc::new(|_, _| {}), log_interval: Duration::from_secs(300) }
    }

    /// Sets the over-rate callback.
    pub fn on_quiet(mut self, f: impl Fn(IpAddr, Duration) + Send + Sync + 'static) -> Rejector {
        self.on_quiet = Arc::new(f);
        self
    }

    /// Logs a source's rejection at most once per `interval` (default 5 min).
    pub fn log_interval(mut self, interval: Duration) -> Rejector {
        self.log_interval = interval;
        self
    }

    /// Starts accepting (within a tokio runtime).
    pub fn spawn(self) -> Result<RejectorHandle> {
        let max = self.settings.max_sessions as usize;
        let shared = Arc::new(Shared {
            rates: Mutex::new(RateLimiter::new(self.settings.per_source_rate)),
            settings: self.settings,
            resolve: self.resolve,
            on_quiet: self.on_quiet,
            log_interval: self.log_interval,
            sessions: Arc::new(Semaphore::new(max)),
            at_capacity: watch::Sender::new(false),
            logged: Mutex::new(HashMap::new()),
            answered: Default::default(),
            closed_at_cap: AtomicU64::new(0),
            over_rate: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            unknown_port: AtomicU64::new(0),
        });
        let mut tasks = Vec::with_capacity(self.listeners.len());
        for l in self.listeners {
            let addr = l.local_addr().map_err(|e| Error::io("rejector listener", e))?;
            l.set_nonblocking(true).map_err(|e| Error::io(format!("rejector listener {addr}"), e))?;
            let l = TcpListener::from_std(l).map_err(|e| Error::io(format!("rejector listener {addr}"), e))?;
            tasks.push(tokio::spawn(accept_loop(l, shared.clone())));
        }
        Ok(RejectorHandle { tasks, shared })
    }
}

impl RejectorHandle {
    pub fn stats(&self) -> RejectorStats {
        let s = &self.shared;
        RejectorStats {
            answered: Refusal::ALL.into_iter().zip(&s.answered).map(|(r, n)| (r, n.load(Relaxed))).collect(),
            closed_at_cap: s.closed_at_cap.load(Relaxed),
            over_rate: s.over_rate.load(Relaxed),
            misrouted: s.misrouted.load(Relaxed),
            unknown_port: s.unknown_port.load(Relaxed),
            active: (s.settings.max_sessions as usize).saturating_sub(s.sessions.available_permits()) as u32,
            at_capacity: *s.at_capacity.borrow(),
        }
    }

    /// Whether every session slot is taken: while true, the caller should
    /// let the datapath lease lapse so refused SYNs are dropped again.
    pub fn at_capacity(&self) -> watch::Receiver<bool> {
        self.shared.at_capacity.subscribe()
    }

    /// Stops accepting (as dropping the handle does).
    pub fn abort(self) {}
}

impl Drop for RejectorHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => shared.admit(stream, peer),
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                warn!(error = %e, "rejector: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Shared {
    /// Admits a connection, or closes it at once (by dropping it).
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Ok(local) = stream.local_addr() else { return };
        let Some(protocol) = self.settings.protocol_on(local.port()) else {
            self.unknown_port.fetch_add(1, Relaxed);
            return;
        };
        let ip = peer.ip().to_canonical();
        let rate = self.rates.lock().unwrap_or_else(|e| e.into_inner()).check(ip, Instant::now());
        if let Err(quiet) = rate {
            self.over_rate.fetch_add(1, Relaxed);
            if let Some(d) = quiet {
                debug!(source = %ip, quiet_for = ?d, "rejector: source over its rate");
                (self.on_quiet)(ip, d);
            }
            return;
        }
        let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
            self.closed_at_cap.fetch_add(1, Relaxed);
            self.refresh_capacity();
            return;
        };
        self.refresh_capacity();
        let slot = Slot { permit: Some(permit), shared: self.clone() };
        tokio::spawn(self.clone().session(stream, ip, local, protocol, slot));
    }

    /// Sets `at_capacity` from the semaphore as it is now: every update
    /// reads the current count under the watch's lock, so the last one
    /// is right whatever the interleaving.
    fn refresh_capacity(&self) {
        self.at_capacity.send_if_modified(|v| {
            let full = self.sessions.available_permits() == 0;
            std::mem::replace(v, full) != full
        });
    }

    async fn session(
        self: Arc<Self>,
        mut stream: TcpStream,
        ip: IpAddr,
        local: SocketAddr,
        protocol: Protocol,
        _slot: Slot,
    ) {
        let _ = stream.set_nodelay(true);
        let Some((refusal, ptr)) = (self.resolve)(ip) else {
            self.misrouted.fetch_add(1, Relaxed);
            debug!(source = %ip, port = local.port(), "rejector: a source that is not refused; told to try again later");
            let line = mail::misrouted(protocol, &self.settings.hostname) + "\r\n";
            let _ = timeout(LAST_WORD, async {
                stream.write_all(line.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            return;
        };
        // The variants are declared in `Refusal::ALL`'s order.
        self.answered[refusal as usize].fetch_add(1, Relaxed);
        let info = SessionInfo { peer: ip, local, protocol, refusal, ptr };
        let report = serve_session(stream, &info, &self.settings).await;
        if self.should_log(ip, Instant::now()) {
            info!(
                source = %ip, port = local.port(), %protocol, %refusal, commands = report.commands,
                rcpts = report.rcpts_rejected, ended = ?report.ended, reply = %report.reply,
                "rejected with a reason"
            );
        }
    }

    /// Whether to log `ip`'s rejection now: once per `log_interval` per
    /// source. At [`MAX_TRACKED_SOURCES`] the entries past their interval
    /// go, and if none has, all go (some sources are logged twice).
    fn should_log(&self, ip: IpAddr, now: Instant) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.get(&ip).is_some_and(|&t| now.duration_since(t) < self.log_interval) {
            return false;
        }
        if logged.len() >= MAX_TRACKED_SOURCES && !logged.contains_key(&ip) {
            logged.retain(|_, t| now.duration_since(*t) < self.log_interval);
            if logged.len() >= MAX_TRACKED_SOURCES {
                logged.clear();
            }
        }
        logged.insert(ip, now);
        true
    }
}

/// A session's slot: frees the permit, then updates `at_capacity`.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.permit.take();
        self.shared.refresh_capacity();
    }
}

/// Per-source token buckets kept as a theoretical arrival time (GCRA): a
/// source may open `per` connections at once, then one per interval.
struct RateLimiter {
    interval: Duration,
    /// How far ahead of now a source's arrival time may run.
    burst: Duration,
    tat: HashMap<IpAddr, Source>,
}

struct Source {
    /// When the source's bucket is full again.
    tat: Instant,
    /// Reported to `on_quiet` until then.
    quiet_until: Option<Instant>,
}

impl RateLimiter {
    fn new(rate: Rate) -> RateLimiter {
        let interval = Duration::from_nanos(rate.interval_ns());
        RateLimiter { interval, burst: interval * (rate.per - 1), tat: HashMap::new() }
    }

    /// `Ok` if `ip` may connect now; else `Err(Some(quiet))` the first
    /// time it is over (silence it that long), `Err(None)` after.
    fn check(&mut self, ip: IpAddr, now: Instant) -> std::result::Result<(), Option<Duration>> {
        if self.tat.len() >= MAX_TRACKED_SOURCES && !self.tat.contains_key(&ip) {
            self.evict(now);
        }
        let src = self.tat.entry(ip).or_insert(Source { tat: now, quiet_until: None });
        let tat = src.tat.max(now);
        let ahead = tat - now;
        if ahead <= self.burst {
            src.tat = tat + self.interval;
            return Ok(());
        }
        let wait = (ahead - self.burst).max(Duration::from_secs(1));
        if src.quiet_until.is_some_and(|q| now < q) {
            return Err(None);
        }
        src.quiet_until = Some(now + wait);
        Err(Some(wait))
    }

    /// Makes room: a source whose bucket is full again is no different
    /// from one never seen; if none is, the one seen longest ago goes.
    fn evict(&mut self, now: Instant) {
        self.tat.retain(|_, s| s.tat > now);
        if self.tat.len() >= MAX_TRACKED_SOURCES {
            if let Some(oldest) = self.tat.iter().min_by_key(|(_, s)| s.tat).map(|(ip, _)| *ip) {
                self.tat.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream as StdStream;

    use tokio::sync::mpsc;

    use super::*;

    fn listener() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    fn settings(port: u16) -> RejectSettings {
        RejectSettings {
            hostname: "mx.test".into(),
            smtp_ports: vec![port],
            pop3_ports: vec![],
            imap_ports: vec![],
            ..RejectSettings::default()
        }
    }

    fn no_ptr() -> Resolve {
        Arc::new(|_| Some((Refusal::NoPtr, None)))
    }

    /// A blocking client (on its own thread): what it reads until the
    /// server closes, after sending `input` once the greeting came.
    async fn client(port: u16, input: &'static [u8]) -> String {
        tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut got = String::new();
            if r.read_line(&mut got).unwrap_or(0) > 0 {
                s.write_all(input).unwrap();
                let _ = r.read_to_string(&mut got);
            }
            got
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_refused_source_hears_why_at_rcpt() {
        let (l, port) = listener();
        let h = Rejector::new(vec![l], settings(port), no_ptr()).spawn().unwrap();
        let got = client(port, b"EHLO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@mx.test>\r\nQUIT\r\n").await;
        assert!(got.starts_with("220 mx.test ESMTP\r\n"), "{got}");
        assert!(got.contains("\r\n550 5.7.1 no reverse DNS (PTR) for 127.0.0.1; give"), "{got}");
        assert!(got.ends_with("221 2.0.0 Bye\r\n"), "{got}");
        assert_eq!(h.stats().answered[&Refusal::NoPtr], 1);
    }

    #[tokio::test]
    async fn a_source_that_is_not_refused_is_told_to_retry() {
        let (l, port) = listener();
        let h = Rejector::new(vec![l], settings(port), Arc::new(|_| None)).spawn().unwrap();
        assert_eq!(client(port, b"").await, "421 4.3.2 mx.test try again later\r\n");
        let s = h.stats();
        assert_eq!((s.misrouted, s.answered.values().sum::<u64>()), (1, 0));
    }

    #[tokio::test]
    async fn a_port_without_a_protocol_is_closed_at_once() {
        let (l, port) = listener();
        let h = Rejector::new(vec![l], settings(port + 1), no_ptr()).spawn().unwrap();
        assert_eq!(client(port, b"").await, "");
        assert_eq!(h.stats().unknown_port, 1);
    }

    #[tokio::test]
    async fn at_the_session_cap_new_connections_are_closed() {
        let (l, port) = listener();
        let h = Rejector::new(vec![l], RejectSettings { max_sessions: 1, ..settings(port) }, no_ptr()).spawn().unwrap();
        let mut cap = h.at_capacity();
        // The first session stays open until its client says QUIT.
        let (quit_tx, quit_rx) = std::sync::mpsc::channel::<()>();
        let first = tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(("127.0.0.1", port)).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut greeting = String::new();
            r.read_line(&mut greeting).unwrap();
            quit_rx.recv().unwrap();
            s.write_all(b"QUIT\r\n").unwrap();
            greeting
        });
        timeout(Duration::from_secs(10), cap.wait_for(|&full| full)).await.unwrap().unwrap();
        assert_eq!(client(port, b"").await, "", "the second connection is closed at once");
        let s = h.stats();
        assert_eq!((s.closed_at_cap, s.active, s.at_capacity), (1, 1, true));
        quit_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "220 mx.test ESMTP\r\n");
        timeout(Duration::from_secs(10), cap.wait_for(|&full| !full)).await.unwrap().unwrap();
        assert!(client(port, b"QUIT\r\n").await.starts_with("220"), "a slot is free again");
    }

    #[tokio::test]
    async fn a_source_over_its_rate_is_silenced() {
        let (l, port) = listener();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = RejectSettings { per_source_rate: "2/min".parse().unwrap(), ..settings(port) };
        let h = Rejector::new(vec![l], s, no_ptr()).on_quiet(move |ip, d| tx.send((ip, d)).unwrap()).spawn().unwrap();
        for _ in 0..2 {
            assert!(client(port, b"QUIT\r\n").await.starts_with("220"));
        }
        assert_eq!(client(port, b"QUIT\r\n").await, "", "the third is closed at once");
        assert_eq!(client(port, b"QUIT\r\n").await, "");
        let (ip, quiet) = rx.recv().await.unwrap();
        assert_eq!(ip, IpAddr::from([127, 0, 0, 1]));
        assert!(quiet > Duration::from_secs(20) && quiet <= Duration::from_secs(30), "{quiet:?}");
        assert!(rx.try_recv().is_err(), "reported once while quiet");
        assert_eq!(h.stats().over_rate, 2);
    }

    #[test]
    fn rate_limiter_refills_and_stays_bounded() {
        let mut r = RateLimiter::new("3/min".parse().unwrap());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| r.check(ip, t0).is_ok()));
        assert_eq!(r.check(ip, t0), Err(Some(Duration::from_secs(20))));
        assert_eq!(r.check(ip, t0 + Duration::from_secs(5)), Err(None));
        assert_eq!(r.check(ip, t0 + Duration::from_secs(20)), Ok(()), "one token per 20 s");
        for i in 0..(MAX_TRACKED_SOURCES as u32 + 10) {
            let _ = r.check(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(r.tat.len() <= MAX_TRACKED_SOURCES);
        // Sources whose buckets refilled are forgotten first.
        let later = t0 + Duration::from_secs(3600);
        assert!(r.check("198.51.100.1".parse().unwrap(), later).is_ok());
        assert_eq!(r.tat.len(), 1);
    }
}
