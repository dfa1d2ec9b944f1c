//! `gatekeeper run`: loads (or adopts) the datapath, reconciles the maps
//! with the state database, serves the control socket, expires entries and
//! reads unknown-source events.
//!
//! Exiting never detaches anything: the pinned datapath keeps enforcing the
//! last state until a new agent adopts it or `gatekeeper unload` runs.
use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::Duration,
};

use gatekeeper_common::{action, config_flags, verdict_reason, Event, KeyWords, RangeValue, SourceKey, Verdict};
use ipnet::IpNet;
use serde::Serialize;
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, watch, Mutex},
};
use tracing::{debug, error, info, warn};

use crate::{
    classify::{load_rules, Classifier},
    config::{validate_ports, Config, FirstSyn},
    datapath::{
        desired_entry, desired_ranges, expiry_ns, monotonic_ns, unix_now, Attached, Datapath, PinLayout, PinLock, Role,
    },
    dns::{Lookup, Resolver},
    pipeline::{decide, query_cost, Learned, Learner, TokenBucket},
    protocol::{Request, Response},
    store::Origin,
    store::{NewRange, RangeKind, RangeRecord, RangeTable, Store, VerdictRecord},
    Error, Result,
};

/// Ports guarded when neither the config nor `ports set` chose any.
pub const DEFAULT_PORTS: &[u16] = &[25];
const PORTS_SETTING: &str = "ports";

/// The agent's mutable state; one request at a time holds it, so
/// concurrent CLIs never lose an update.
struct State {
    cfg: Config,
    store: Store,
    dp: Datapath,
    attached: Vec<Attached>,
    started_at: i64,
    events: u64,
    classifier: Arc<Classifier>,
    learner: Learner,
    /// Lookups finished, by outcome.
    outcomes: BTreeMap<&'static str, u64>,
    /// Ranges learned since start.
    learned: u64,
}

/// The queue between the event ring and the resolver: bounded, and each
/// source is in it (or being looked up) at most once.
struct Queue {
    tx: mpsc::Sender<IpAddr>,
    /// Sources queued or being looked up at most.
    max_pending: usize,
    pending: std::sync::Mutex<HashSet<SourceKey>>,
    queued: AtomicU64,
    duplicate: AtomicU64,
    overflow: AtomicU64,
}

impl Queue {
    /// Queues a source for a lookup; false when it was already pending or
    /// the queue is full (the source stays unknown and passes).
    fn submit(&self, ip: IpAddr) -> bool {
        let key = SourceKey::from_ip(ip);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.contains(&key) {
            self.duplicate.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if pending.len() >= self.max_pending {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(ip) {
            Ok(()) => {
                pending.insert(key);
                self.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.overflow.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn done(&self, ip: IpAddr) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&SourceKey::from_ip(ip));
    }
}

/// Runs the agent until SIGINT/SIGTERM or `gatekeeper unload`.
pub async fn run(cfg: Config) -> Result<()> {
    if cfg.interfaces.is_empty() {
        return Err(Error::Config {
            path: PathBuf::from("<command line>"),
            message: "no interfaces to guard: pass --iface IFACE (ingress gate), --uplink IFACE or --subscriber-iface IFACE (egress gate), or set `interfaces = [..]` in the config".into(),
        });
    }
    let rules = match &cfg.classifier.rules {
        Some(p) => Some(load_rules(p)?),
        None => None,
    };
    let classifier = Arc::new(Classifier::new(rules, cfg.classifier.trusted.clone()));
    let resolver = Arc::new(Resolver::new(&cfg.dns)?);
    // Everything that can refuse to start does so before the datapath or
    // the database is touched: a refused agent changes nothing.
    if let Some(missing) = cfg.interfaces.iter().find(|i| crate::datapath::ifindex(&i.name).is_none()) {
        return Err(Error::Bpf(format!(
            "interface {:?} ({}) not found; nothing was changed",
            missing.name, missing.role
        )));
    }
    if cfg.socket.exists() && std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(Error::Bpf(format!(
            "another agent is already serving {}; nothing was changed (use --socket and --pin-dir to run a second instance)",
            cfg.socket.display()
        )));
    }
    let layout = PinLayout::new(&cfg.pin_dir);
    let _lock = PinLock::acquire(&layout)?;
    let db = cfg.state_dir.join("gatekeeper.db");
    let mut store = Store::open(&db)?;
    let ports = match &cfg.ports {
        Some(p) => validate_ports(p)?,
        None => match store.setting(PORTS_SETTING)? {
            Some(s) => crate::config::parse_ports(&s)?,
            None => DEFAULT_PORTS.to_vec(),
        },
    };

    let adopting = layout.is_loaded();
    let mut dp = Datapath::load(&layout, cfg.max_verdicts, cfg.max_range_nodes)?;
    dp.maps.set_config(gatekeeper_common::Config {
        event_interval_ns: cfg.event_interval.as_nanos() as u64,
        flags: if cfg.dry_run { config_flags::DRY_RUN } else { 0 }
            | if cfg.policy.first_syn == FirstSyn::Hold { config_flags::HOLD } else { 0 },
        hold_ms: cfg.policy.hold_time.as_millis() as u32,
        tick_ns: dp.clock.map_or(0, |c| c.0),
        clock_offset_ns: dp.clock.map_or(0, |c| c.1),
    })?;
    dp.maps.set_ports(&ports)?;
    let classes: Vec<(Vec<u16>, gatekeeper_common::RateLimit)> =
        cfg.egress.limit.iter().map(|c| (c.ports.clone(), c.rate_limit())).collect();
    dp.maps.set_egress_policy(&cfg.egress.ports, &classes)?;
    if cfg.ports.is_some() {
        // The configured ports win over `ports set`, and are kept as such.
        store.set_setting(PORTS_SETTING, &join_ports(&ports))?;
    }
    let (added, removed) = reconcile(&mut store, &mut dp)?;
    info!(written = added, removed, "datapath reconciled with {}", db.display());

    let mut attached = Vec::new();
    for spec in &cfg.interfaces {
        let a = match spec.role {
            Role::Uplink => dp.attach_uplink(&spec.name, cfg.tc_mode)?,
            role => dp.attach(role, &spec.name, cfg.xdp_mode)?,
        };
        let what = match a.role {
            Role::Ingress => "XDP ingress gate attached",
            Role::Uplink => "TC egress gate attached to uplink",
            Role::Subscriber => "XDP egress gate attached to subscriber side",
        };
        info!(iface = %a.ifname, ifindex = a.ifindex, mode = %a.mode, adopted = a.adopted, "{what}");
        attached.push(a);
    }
    for role in [Role::Ingress, Role::Uplink, Role::Subscriber] {
        for gone in dp.detach_except(role, &cfg.ifaces(role))? {
            info!(iface = %gone, %role, "detached: no longer configured");
        }
    }
    let events = dp.take_events();
    info!(
        pin_dir = %layout.root.display(),
        ports = %join_ports(&ports),
        dry_run = cfg.dry_run,
        adopted = adopting,
        "gatekeeper agent running"
    );

    let listener = bind_socket(&cfg.socket)?;
    let socket_path = cfg.socket.clone();
    let limits = cfg.limits.clone();
    let dns_cfg = cfg.dns.clone();
    let learner = Learner::new(cfg.learning.clone());
    let state = Arc::new(Mutex::new(State {
        cfg,
        store,
        dp,
        attached,
        started_at: unix_now(),
        events: 0,
        classifier,
        learner,
        outcomes: BTreeMap::new(),
        learned: 0,
    }));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(limits.max_pending);
    let queue = Arc::new(Queue {
        tx,
        max_pending: limits.max_pending,
        pending: Default::default(),
        queued: AtomicU64::new(0),
        duplicate: AtomicU64::new(0),
        overflow: AtomicU64::new(0),
    });

    tokio::spawn(sweeper(state.clone()));
    if let Some(rb) = events {
        tokio::spawn(event_reader(state.clone(), queue.clone(), rb));
    }
    tokio::spawn(lookups(state.clone(), queue.clone(), rx, resolver.clone(), limits, dns_cfg));
    tokio::spawn(serve(listener, state.clone(), queue, resolver, stop_tx.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("install SIGTERM handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; the datapath stays pinned and keeps enforcing"),
        _ = term.recv() => info!("SIGTERM: exiting; the datapath stays pinned and keeps enforcing"),
        _ = stop_rx.changed() => info!("unloaded: everything detached and unpinned; exiting"),
    }
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

fn join_ports(p: &[u16]) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// Makes the maps match the database: what the database holds is the truth.
fn reconcile(store: &mut Store, dp: &mut Datapath) -> Result<(usize, usize)> {
    let now = unix_now();
    store.expire_ranges(now)?;
    store.expire_verdicts(now)?;
    let (mut added, mut removed) = (0, 0);
    let want = desired_ranges(&store.list_ranges(None)?);
    let have: StdHashMap<(RangeTable, IpNet), RangeValue> =
        dp.maps.ranges.ranges().into_iter().map(|(t, n, v)| ((t, n), v)).collect();
    for (table, net) in have.keys().filter(|k| !want.contains_key(k)) {
        dp.maps.ranges.del_range(*table, *net)?;
        removed += 1;
    }
    for (key, v) in &want {
        if have.get(key) != Some(v) {
            dp.maps.ranges.set_range(key.1, *v)?;
            added += 1;
        }
    }
    // Repairs whatever an agent that died mid-update left half-written.
    added += dp.maps.ranges.rebuild()?;
    let mono = monotonic_ns();
    let want: StdHashMap<SourceKey, Verdict> =
        store.list_verdicts(None)?.iter().map(|v| (v.key, verdict_value(v, now, mono))).collect();
    for (key, _) in dp.maps.verdicts()? {
        if !want.contains_key(&key) {
            dp.maps.del_verdict(key)?;
            removed += 1;
        }
    }
    for (key, v) in want {
        if !KeyWords::of(&key).is_key() {
            warn!(source = %key.display(), "the database holds a verdict for ::/64, which the datapath cannot hold; ignored");
            continue;
        }
        dp.maps.set_verdict(key, v)?;
        added += 1;
    }
    Ok((added, removed))
}

fn verdict_value(v: &VerdictRecord, now: i64, mono: u64) -> Verdict {
    Verdict { expires_ns: expiry_ns(v.expires_at, now, mono), action: v.action, reason: v.reason }
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Bpf(format!(
                "another agent is already serving {} (use --socket and --pin-dir to run a second instance)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(format!("remove stale socket {}", path.display()), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    queue: Arc<Queue>,
    resolver: Arc<Resolver>,
    stop: watch::Sender<bool>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accept on control socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let stop = stop.clone();
        let ctx = (queue.clone(), resolver.clone());
        tokio::spawn(async move {
            if let Err(e) = handle_conn(stream, state, ctx, stop).await {
                debug!(error = %e, "control connection");
            }
        });
    }
}

async fn handle_conn(
    stream: UnixStream,
    state: Arc<Mutex<State>>,
    (queue, resolver): (Arc<Queue>, Arc<Resolver>),
    stop: watch::Sender<bool>,
) -> std::io::Result<()> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        _ => {
            let (_, mut w) = stream.into_split();
            let mut line =
                serde_json::to_vec(&Response::err("the control socket is for root only")).unwrap_or_default();
            line.push(b'\n');
            return w.write_all(&line).await;
        }
    }
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let Some(line) = lines.next_line().await? else { return Ok(()) };
    let (resp, unload) = match serde_json::from_str::<Request>(&line) {
        Err(e) => (Response::err(format!("bad request: {e}")), false),
        Ok(Request::Check { ip }) => {
            // The live lookup runs outside the state lock.
            let lookup = resolver.lookup(ip).await;
            let st = state.lock().await;
            match tokio::task::block_in_place(|| st.check(&lookup)) {
                Ok(v) => (Response::ok(v), false),
                Err(e) => (Response::err(e), false),
            }
        }
        Ok(req) => {
            let unload = matches!(req, Request::Unload);
            let mut st = state.lock().await;
            let resp = match tokio::task::block_in_place(|| st.handle(req)) {
                Ok(mut v) => {
                    if let Some(obj) = v.as_object_mut().filter(|o| o.contains_key("events_received")) {
                        obj.insert(
                            "queue".into(),
                            serde_json::json!({
                                "queued": queue.queued.load(Ordering::Relaxed),
                                "duplicate": queue.duplicate.load(Ordering::Relaxed),
                                "overflow": queue.overflow.load(Ordering::Relaxed),
                                "pending": queue.pending.lock().map(|p| p.len()).unwrap_or(0),
                            }),
                        );
                    }
                    Response::ok(v)
                }
                Err(e) => Response::err(e),
            };
            (resp, unload)
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.flush().await?;
    if unload && resp.ok {
        let _ = stop.send(true);
    }
    Ok(())
}

#[derive(Serialize)]
struct RangeOut {
    #[serde(flatten)]
    record: RangeRecord,
    hits: u64,
}

impl State {
    fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        let now = unix_now();
        let json = |v: serde_json::Value| Ok(v);
        match req {
            Request::Ping => json(serde_json::json!({ "pong": true })),
            Request::RangeAdd { kind, ranges, origin, source, expire_secs, force, skip_existing, replace, action } => {
                if action.is_some() && kind != RangeKind::Pool {
                    return Err(Error::InvalidInput(format!(
                        "an action (drop or reject) applies to pools, not to {} entries",
                        kind.what()
                    )));
                }
                let expires_at = expire_secs.map(|s| now + s as i64);
                let new: Vec<NewRange> = ranges
                    .iter()
                    .map(|r| NewRange {
                        net: r.net,
                        origin,
                        source: source.clone(),
                        comment: r.comment.clone(),
                        expires_at,
                        action,
                    })
                    .collect();
                let added = self.store.add_ranges(kind, &new, force, skip_existing, now)?;
                for r in &added {
                    self.dp.maps.reset_range_hits(r.id)?;
                }
                if let Err(e) = self.sync_ranges(&added, true) {
                    // Roll back so the database never claims what the datapath lacks.
                    for r in &added {
                        let _ = self.store.del_range(kind, r.net);
                    }
                    let _ = self.sync_ranges(&added, false);
                    return Err(e);
                }
                let mut removed = Vec::new();
                if replace {
                    let keep: Vec<IpNet> = ranges.iter().map(|r| r.net).collect();
                    removed = self.store.del_ranges_from_source_except(kind, &source, &keep)?;
                    self.sync_ranges(&removed, false)?;
                }
                info!(%kind, added = added.len(), removed = removed.len(), %source, "ranges changed");
                json(serde_json::json!({
                    "added": added.len(),
                    "unchanged": ranges.len() - added.len(),
                    "removed": removed.len(),
                    // Echo records back for interactive adds, not for 100k-line imports.
                    "records": if added.len() <= 1000 { serde_json::to_value(&added).unwrap_or_default() } else { serde_json::Value::Null },
                }))
            }
            Request::RangeDel { kind, nets } => {
                let existing = self.store.list_ranges(Some(kind))?;
                if let Some(missing) = nets.iter().find(|n| !existing.iter().any(|r| r.net == **n)) {
                    return Err(Error::NotFound { what: kind.what(), key: missing.to_string() });
                }
                let mut removed = Vec::new();
                for net in nets {
                    removed.push(self.store.del_range(kind, net)?);
                }
                self.sync_ranges(&removed, false)?;
                info!(%kind, removed = removed.len(), "ranges removed");
                json(serde_json::json!({ "removed": removed }))
            }
            Request::RangeList { kind } => {
                let ranges = self.store.list_ranges(Some(kind))?;
                let hits = self.dp.maps.range_hits(ranges.iter().map(|r| r.id))?;
                let out: Vec<RangeOut> = ranges
                    .into_iter()
                    .map(|r| RangeOut { hits: hits.get(&r.id).copied().unwrap_or(0), record: r })
                    .collect();
                json(serde_json::to_value(out).unwrap_or_default())
            }
            Request::BanAdd { addrs, comment, expire_secs } => {
                let expires_at = expire_secs.map(|s| now + s as i64);
                let mono = monotonic_ns();
                // All or nothing: refuse before any write.
                if let Some(bad) = addrs.iter().find(|a| !KeyWords::of(&SourceKey::from_ip(**a)).is_key()) {
                    return Err(Error::InvalidInput(format!(
                        "cannot ban {bad}: ::/64 (the unspecified and loopback addresses) is never a real source"
                    )));
                }
                let mut out = Vec::new();
                for addr in addrs {
                    let rec = VerdictRecord {
                        key: SourceKey::from_ip(addr),
                        action: action::DROP,
                        reason: verdict_reason::MANUAL_BAN,
                        comment: comment.clone(),
                        created_at: now,
                        expires_at,
                    };
                    self.store.upsert_verdict(&rec)?;
                    self.dp.maps.set_verdict(rec.key, verdict_value(&rec, now, mono))?;
                    info!(source = %rec.key.display(), "manual ban");
                    out.push(rec);
                }
                json(serde_json::to_value(out).unwrap_or_default())
            }
            Request::BanDel { addrs } => self.del_verdicts(&addrs, Some(verdict_reason::MANUAL_BAN), "ban"),
            Request::BanList => json(
                serde_json::to_value(self.store.list_verdicts(Some(verdict_reason::MANUAL_BAN))?).unwrap_or_default(),
            ),
            Request::VerdictList { reason } => {
                json(serde_json::to_value(self.store.list_verdicts(reason)?).unwrap_or_default())
            }
            Request::VerdictDel { addrs } => self.del_verdicts(&addrs, None, "verdict"),
            Request::VerdictFlush { reason } => {
                let doomed: Vec<VerdictRecord> = self
                    .store
                    .list_verdicts(reason)?
                    .into_iter()
                    .filter(|v| reason.is_some() || v.reason != verdict_reason::MANUAL_BAN)
                    .collect();
                for v in &doomed {
                    self.store.del_verdict(v.key)?;
                    self.dp.maps.del_verdict(v.key)?;
                }
                info!(removed = doomed.len(), "verdicts flushed");
                json(serde_json::json!({ "removed": doomed.len() }))
            }
            Request::Check { .. } => Err(Error::Bpf("check is answered by the pipeline".into())),
            Request::PortsSet { ports } => {
                let ports = validate_ports(&ports)?;
                self.store.set_setting(PORTS_SETTING, &join_ports(&ports))?;
                self.dp.maps.set_ports(&ports)?;
                info!(ports = %join_ports(&ports), "guarded ports changed");
                json(serde_json::json!({ "ports": ports }))
            }
            Request::PortsList => json(serde_json::json!({ "ports": self.dp.maps.ports()? })),
            Request::EgressPolicy => json(self.egress_policy()?),
            Request::Status => {
                let ranges = self.store.list_ranges(None)?;
                let count = |k: RangeKind, v6: bool| {
                    ranges.iter().filter(|r| r.kind == k && r.net.addr().is_ipv6() == v6).count()
                };
                json(serde_json::json!({
                    "agent": { "running": true, "pid": std::process::id(), "started_at": self.started_at, "version": env!("CARGO_PKG_VERSION") },
                    "pin_dir": self.dp.layout.root,
                    "state_dir": self.cfg.state_dir,
                    "socket": self.cfg.socket,
                    "dry_run": self.cfg.dry_run,
                    "event_interval_secs": self.cfg.event_interval.as_secs(),
                    "interfaces": self.attached,
                    "ports": self.dp.maps.ports()?,
                    "egress": self.egress_policy()?,
                    "entries": {
                        "deny_v4": count(RangeKind::Deny, false),
                        "deny_v6": count(RangeKind::Deny, true),
                        "allow_v4": count(RangeKind::Allow, false),
                        "allow_v6": count(RangeKind::Allow, true),
                        "pool_v4": count(RangeKind::Pool, false),
                        "pool_v6": count(RangeKind::Pool, true),
                        "exempt_v4": count(RangeKind::Exempt, false),
                        "exempt_v6": count(RangeKind::Exempt, true),
                        "smarthost_v4": count(RangeKind::Smarthost, false),
                        "smarthost_v6": count(RangeKind::Smarthost, true),
                        "verdicts": self.store.verdict_count()?,
                    },
                    "capacity": {
                        "ranges_per_table": gatekeeper_common::MAX_RANGES,
                        "verdicts": self.cfg.max_verdicts,
                        "range_nodes": self.cfg.max_range_nodes,
                    },
                    "events_received": self.events,
                    "lookups": self.outcomes,
                    "learned_ranges": self.learned,
                    "learning_prefixes_tracked": self.learner.tracked(),
                }))
            }
            Request::Unload => {
                let removed = self.dp.layout.unload()?;
                info!(removed = removed.len(), "unloaded");
                json(serde_json::json!({ "removed": removed }))
            }
        }
    }

    /// Removes the verdicts of `addrs` (of `reason` only, if given): all of
    /// them, or none when one is missing.
    fn del_verdicts(&mut self, addrs: &[IpAddr], reason: Option<u32>, what: &'static str) -> Result<serde_json::Value> {
        let keys: Vec<SourceKey> = addrs.iter().map(|a| SourceKey::from_ip(*a)).collect();
        for k in &keys {
            let found = self.store.verdict(*k)?.filter(|v| reason.is_none_or(|r| v.reason == r));
            if found.is_none() {
                return Err(Error::NotFound { what, key: k.display() });
            }
        }
        let mut out = Vec::new();
        for key in keys {
            out.push(self.store.del_verdict(key)?);
            self.dp.maps.del_verdict(key)?;
        }
        Ok(serde_json::json!({ "removed": out }))
    }

    /// The egress gate's policy as the datapath holds it, with the
    /// configured class names.
    fn egress_policy(&self) -> Result<serde_json::Value> {
        let (guarded, classes) = self.dp.maps.egress_policy()?;
        let classes: Vec<serde_json::Value> = classes
            .into_iter()
            .map(|(c, ports, lim)| {
                let cfg = self.cfg.egress.limit.get(c as usize - 1);
                serde_json::json!({
                    "class": c,
                    "name": cfg.map(|l| l.name.clone()),
                    "ports": ports,
                    "rate": cfg.map(|l| l.rate.to_string()),
                    "burst": cfg.map(|l| l.burst),
                    "interval_ns": lim.interval_ns,
                })
            })
            .collect();
        Ok(serde_json::json!({ "guarded_ports": guarded, "limits": classes }))
    }

    /// Brings the datapath in line with the database for the ranges in
    /// `changed`, which were just added (`present`) or just removed: each
    /// such net, and for a changed winning range (allow, exempt) every
    /// losing range (deny, pool) inside it, gets the entry [`desired_entry`]
    /// calls for in its table.
    fn sync_ranges(&mut self, changed: &[RangeRecord], present: bool) -> Result<()> {
        for table in RangeTable::ALL {
            let changed: Vec<&RangeRecord> = changed.iter().filter(|r| r.kind.table() == table).collect();
            if changed.is_empty() {
                continue;
            }
            let winners = self.store.list_ranges(Some(table.winner()))?;
            let winner_changed: Vec<IpNet> =
                changed.iter().filter(|r| r.kind == table.winner()).map(|r| r.net).collect();
            // The losing range at each net whose entry may change.
            let mut losers: StdHashMap<IpNet, RangeRecord> = StdHashMap::new();
            if let Some(loser) = table.loser() {
                if present {
                    losers.extend(changed.iter().filter(|r| r.kind == loser).map(|r| (r.net, (*r).clone())));
                }
                if !winner_changed.is_empty() {
                    let inside = self
                        .store
                        .list_ranges(Some(loser))?
                        .into_iter()
                        .filter(|d| winner_changed.iter().any(|a| a.contains(&d.net)));
                    losers.extend(inside.map(|d| (d.net, d)));
                }
            }
            let mut nets: Vec<IpNet> = changed.iter().map(|r| r.net).chain(losers.keys().copied()).collect();
            nets.sort();
            nets.dedup();
            for net in nets {
                let want = desired_entry(net, &winners, losers.get(&net));
                let have = self.dp.maps.ranges.range(table, net);
                match want {
                    Some(v) if have != Some(v) => self.dp.maps.ranges.set_range(net, v)?,
                    None if have.is_some() => self.dp.maps.ranges.del_range(table, net)?,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Removes expired ranges and verdicts from the database and the maps.
    fn sweep(&mut self) -> Result<()> {
        let now = unix_now();
        let expired = self.store.expire_ranges(now)?;
        for r in &expired {
            info!(kind = %r.kind, net = %r.net, "range expired");
        }
        self.sync_ranges(&expired, false)?;
        for v in self.store.expire_verdicts(now)? {
            self.dp.maps.del_verdict(v.key)?;
            debug!(source = %v.key.display(), "verdict expired");
        }
        Ok(())
    }
}

async fn sweeper(state: Arc<Mutex<State>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut st = state.lock().await;
        if let Err(e) = tokio::task::block_in_place(|| st.sweep()) {
            error!(error = %e, "expiry sweep failed");
        }
    }
}

async fn event_reader(state: Arc<Mutex<State>>, queue: Arc<Queue>, rb: aya::maps::RingBuf<aya::maps::MapData>) {
    let lookups_on = state.lock().await.cfg.dns.enabled;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as the AsyncFd owns the RingBuf.
    let mut afd = match unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            error!(error = %std::io::Error::from(e), "cannot poll the event ring buffer; unknown sources will not be reported");
            return;
        }
    };
    loop {
        let mut guard = match afd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "event ring buffer");
                return;
            }
        };
        let mut n = 0u64;
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Event`; read it unaligned.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            let ip = gatekeeper_common::addr::event_ip(ev.addr, ev.family);
            debug!(source = %ip, port = ev.port, ifindex = ev.ifindex, "unknown source");
            if lookups_on {
                queue.submit(ip);
            }
            n += 1;
        }
        guard.clear_ready();
        if n > 0 {
            state.lock().await.events += n;
        }
    }
}

/// Looks sources up at most `dns_rate` queries per second with at most
/// `max_inflight` lookups at once, and applies each result.
async fn lookups(
    state: Arc<Mutex<State>>,
    queue: Arc<Queue>,
    mut rx: mpsc::Receiver<IpAddr>,
    resolver: Arc<Resolver>,
    limits: crate::config::LimitsConfig,
    dns: crate::dns::DnsConfig,
) {
    let bucket = Arc::new(std::sync::Mutex::new(TokenBucket::new(limits.dns_rate)));
    let inflight = Arc::new(tokio::sync::Semaphore::new(limits.max_inflight));
    // The most one lookup can send: every query resent to the limit.
    let reserve = query_cost(dns.max_names, Duration::from_secs(86_400), dns.attempts, dns.timeout);
    while let Some(ip) = rx.recv().await {
        loop {
            let wait = bucket.lock().unwrap_or_else(|e| e.into_inner()).take(reserve, std::time::Instant::now());
            match wait {
                Ok(()) => break,
                Err(d) => tokio::time::sleep(d).await,
            }
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else { return };
        let (state, queue, resolver, bucket, dns) =
            (state.clone(), queue.clone(), resolver.clone(), bucket.clone(), dns.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let lookup = resolver.lookup(ip).await;
            // Give back what the lookup did not send (resends included).
            let forward = lookup.ptr_names.len().min(dns.max_names);
            let cost = query_cost(forward, started.elapsed(), dns.attempts, dns.timeout);
            bucket.lock().unwrap_or_else(|e| e.into_inner()).refund(reserve - cost, std::time::Instant::now());
            let mut st = state.lock().await;
            if let Err(e) = tokio::task::block_in_place(|| st.apply(&lookup)) {
                error!(source = %ip, error = %e, "could not apply a lookup");
            }
            drop(st);
            queue.done(ip);
            drop(permit);
        });
    }
}

impl State {
    /// Writes the verdict a lookup calls for (never over a manual ban) and
    /// feeds dynamic sources to the range learner.
    fn apply(&mut self, lookup: &Lookup) -> Result<()> {
        let d = decide(lookup, &self.classifier, &self.cfg.policy);
        *self.outcomes.entry(d.outcome).or_default() += 1;
        let key = SourceKey::from_ip(lookup.ip);
        if !KeyWords::of(&key).is_key() {
            // ::/64 (unspecified or loopback, so spoofed) has the verdict
            // table's empty key: it can hold no verdict and stays unknown.
            debug!(source = %lookup.ip, "no verdict for a source in ::/64");
            return Ok(());
        }
        if self.store.verdict(key)?.is_some_and(|v| v.reason == verdict_reason::MANUAL_BAN) {
            return Ok(());
        }
        let now = unix_now();
        let name = lookup.confirmed.as_deref().or(lookup.ptr_names.first().map(String::as_str));
        let comment = match (name, d.reasons.is_empty()) {
            (Some(n), false) => format!("{}: {n} ({})", d.outcome, d.reasons.join(",")),
            (Some(n), true) => format!("{}: {n}; {}", d.outcome, lookup.detail),
            (None, _) => format!("{}: {}", d.outcome, lookup.detail),
        };
        let rec = VerdictRecord {
            key,
            action: d.action,
            reason: d.reason,
            comment: Some(comment),
            created_at: now,
            expires_at: Some(now + d.ttl.as_secs() as i64),
        };
        self.store.upsert_verdict(&rec)?;
        self.dp.maps.set_verdict(key, verdict_value(&rec, now, monotonic_ns()))?;
        info!(source = %key.display(), outcome = d.outcome, action = if d.action == action::DROP { "drop" } else { "pass" }, ttl = d.ttl.as_secs(), "verdict");
        if d.outcome == "dynamic" {
            if let Some(l) = self.learner.observe(lookup.ip, name.unwrap_or_default()) {
                self.learn(l, now)?;
            }
        }
        Ok(())
    }

    /// Adds a learned deny range, unless an allow range overlaps it or a
    /// source inside it has a good name (a learned range beats per-source
    /// verdicts, and must never block a known mail server).
    fn learn(&mut self, l: Learned, now: i64) -> Result<()> {
        let good = self.store.list_verdicts(None)?.into_iter().find(|v| {
            v.action == action::PASS
                && (v.reason == verdict_reason::OK || v.reason == verdict_reason::GENERIC)
                && l.net.contains(&v.key.to_ip())
        });
        if let Some(g) = good {
            info!(range = %l.net, good = %g.key.display(), "not learning a dynamic range that holds a host with a good name");
            return Ok(());
        }
        let new = NewRange {
            net: l.net,
            origin: Origin::Learned,
            source: "learned".into(),
            comment: Some(format!("{} dynamic hosts named like {}", l.sources, l.shape)),
            expires_at: Some(now + self.cfg.learning.expire.as_secs() as i64),
            action: None,
        };
        match self.store.add_ranges(RangeKind::Deny, &[new], false, true, now) {
            Ok(added) => {
                for r in &added {
                    self.dp.maps.reset_range_hits(r.id)?;
                }
                self.sync_ranges(&added, true)?;
                if !added.is_empty() {
                    self.learned += 1;
                    info!(range = %l.net, shape = %l.shape, sources = l.sources, "learned a dynamic range");
                }
                Ok(())
            }
            Err(Error::Overlap { .. }) => {
                info!(range = %l.net, "not learning a dynamic range that overlaps an allow range");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `gatekeeper check`: the lookup, the policy, and what decides for the
    /// source in the datapath now.
    fn check(&self, lookup: &Lookup) -> Result<serde_json::Value> {
        let d = decide(lookup, &self.classifier, &self.cfg.policy);
        let ip = lookup.ip;
        let key = SourceKey::from_ip(ip);
        let range = self
            .dp
            .maps
            .ranges
            .ranges()
            .into_iter()
            .filter(|(t, n, _)| *t == RangeTable::Ingress && n.contains(&ip))
            .max_by_key(|(_, n, _)| n.prefix_len());
        let range = match range {
            Some((_, net, v)) => {
                let rec = self.store.list_ranges(None)?.into_iter().find(|r| r.id == v.range_id);
                Some(serde_json::json!({
                    "net": net,
                    "kind": crate::datapath::kind_of(v.kind),
                    "record": rec,
                }))
            }
            None => None,
        };
        let mono = monotonic_ns();
        let verdict = self.dp.maps.verdicts.get(key).ok().flatten().map(|v| {
            serde_json::json!({
                "action": if v.action == action::DROP { "drop" } else { "pass" },
                "reason": gatekeeper_common::counters::counter_name(gatekeeper_common::Counter::verdict_drop(v.reason)),
                "live": v.expires_ns > mono,
                "expires_in_secs": if v.expires_ns == u64::MAX { None } else { Some(v.expires_ns.saturating_sub(mono) / 1_000_000_000) },
                "record": self.store.verdict(key).ok().flatten(),
            })
        });
        let decides = match (&range, &verdict) {
            (Some(r), _) => format!("{} range {}", r["kind"].as_str().unwrap_or("?"), r["net"].as_str().unwrap_or("?")),
            (None, Some(v)) if v["live"] == true => {
                format!("verdict: {} ({})", v["action"].as_str().unwrap_or("?"), v["reason"].as_str().unwrap_or("?"))
            }
            _ => "nothing: the source is unknown, passes, and is looked up".into(),
        };
        Ok(serde_json::json!({
            "ip": ip,
            "source_key": key.display(),
            "lookup": lookup,
            "decision": d,
            "datapath": { "decides": decides, "range": range, "verdict": verdict },
        }))
    }
}
