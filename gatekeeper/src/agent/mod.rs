//! `gatekeeper run`: the agent's wiring. Refuses to start before touching
//! anything when it cannot run, loads (or adopts) the datapath, reconciles
//! it with the state database, attaches, then runs its tasks until
//! SIGINT/SIGTERM or `gatekeeper unload`.
//!
//! The rooms, and the one job of each:
//! - [`state`]: the verbs that change ranges, bans and verdicts (database,
//!   then maps, in one transaction);
//! - [`sync`]: which datapath entry the database calls for (allow wins),
//!   reconcile at start, and the sync after each change;
//! - [`control`]: the control socket and the dispatch of CLI requests;
//! - [`lookups`]: the event ring → lookup queue → resolver → judge pipeline;
//! - [`fair`]: the lookup queue's scheduler (fair per /24 and /48,
//!   retransmitters first, bounded);
//! - [`reject`]: the mail host's rejector wired to the datapath (its
//!   listeners, its lease, its quiet table);
//! - [`explain`]: the explain stage's listeners and set-up (routers);
//! - [`mail`]: the mail stream: log readers, abuse scores, suspensions, the
//!   Postfix policy service and its sending limits.
//!
//! Exiting never detaches anything: the pinned datapath keeps enforcing the
//! last state until a new agent adopts it or `gatekeeper unload` runs.
pub mod control;
pub mod explain;
pub mod fair;
pub mod lookups;
pub mod mail;
pub mod reject;
pub mod state;
pub mod sync;

use std::{path::PathBuf, sync::Arc, time::Duration};

use gatekeeper_common::config_flags;
use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use crate::{
    classify::{load_rules, Classifier},
    config::{Config, FirstSyn},
    datapath::{ifindex, Datapath, PinLayout, PinLock},
    dns::Resolver,
    domain::Role,
    store::Store,
    Error, Result,
};
use lookups::{Judge, Queue};
use state::{join_ports, State, PORTS_SETTING};

/// What the control socket and the lookup pipeline share, behind one lock:
/// one request or lookup result at a time, so concurrent CLIs never lose an
/// update.
pub struct Core {
    pub state: State,
    pub judge: Judge,
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
    if let Some(missing) = cfg.interfaces.iter().find(|i| ifindex(&i.name).is_none()) {
        return Err(Error::NoSuchInterface { name: missing.name.clone(), role: Some(missing.role), refused: true });
    }
    if control::is_served(&cfg.socket) {
        return Err(Error::AlreadyRunning(format!(
            "another agent is already serving {}; nothing was changed",
            cfg.socket.display()
        )));
    }
    let layout = PinLayout::new(&cfg.pin_dir);
    let _lock = PinLock::acquire(&layout)?;
    let db = cfg.state_dir.join("gatekeeper.db");
    let mut store = Store::open(&db)?;
    let ports = State::startup_ports(&cfg, &store)?;

    let adopting = layout.is_loaded();
    let mut dp = Datapath::load(&layout, cfg.max_verdicts, cfg.max_range_nodes)?;
    dp.maps.set_config(gatekeeper_common::Config {
        event_interval_ns: cfg.event_interval.as_nanos() as u64,
        flags: if cfg.dry_run { config_flags::DRY_RUN } else { 0 }
            | if cfg.policy.first_syn == FirstSyn::Hold { config_flags::HOLD } else { 0 },
        hold_ms: cfg.policy.hold_time.as_millis() as u32,
        tick_ns: dp.clock.map_or(0, |c| c.0),
        clock_offset_ns: dp.clock.map_or(0, |c| c.1),
        // Kept by set_config: the secret the verdict table is placed with.
        hash: Default::default(),
    })?;
    dp.maps.set_ports(&ports)?;
    let classes: Vec<(Vec<u16>, gatekeeper_common::RateLimit)> =
        cfg.egress.limit.iter().map(|c| (c.ports.clone(), c.rate_limit())).collect();
    dp.maps.set_egress_policy(&cfg.egress.ports, &classes)?;
    sync::set_inbound(&mut dp.maps, &cfg.inbound)?;
    if cfg.ports.is_some() {
        // The configured ports win over `ports set`, and are kept as such.
        store.set_setting(PORTS_SETTING, &join_ports(&ports))?;
    }
    let rec = sync::reconcile(&mut store, &mut dp.maps, u64::from(cfg.max_verdicts))?;
    info!(written = rec.written, removed = rec.removed, "datapath reconciled with {}", db.display());
    for (i, what) in rec.unapplied.iter().enumerate().take(20) {
        warn!("not in the datapath ({} of {}): {what}", i + 1, rec.unapplied.len());
    }
    if !rec.unapplied.is_empty() {
        warn!(
            left_out = rec.unapplied.len(),
            "the database holds more than the datapath's tables fit; running with what fits (raise max_range_nodes, then `gatekeeper unload` and restart to resize); `gatekeeper status` lists them"
        );
    }

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
    for role in Role::ALL {
        for gone in dp.detach_except(role, &cfg.ifaces(role))? {
            info!(iface = %gone, %role, "detached: no longer configured");
        }
    }
    let ingress = attached.iter().any(|a| a.role == Role::Ingress);
    let rejector = reject::prepare(&mut dp, &cfg.reject, ingress)?;
    let reject_settings = cfg.reject.clone();
    let explain = explain::start(&cfg, &store, &mut dp);
    let events = dp.take_events();
    info!(
        pin_dir = %layout.root.display(),
        ports = %join_ports(&ports),
        dry_run = cfg.dry_run,
        adopted = adopting,
        "gatekeeper agent running"
    );

    let listener = control::bind(&cfg.socket)?;
    let socket_path = cfg.socket.clone();
    let (limits, dns_cfg, lookups_on) = (cfg.limits.clone(), cfg.dns.clone(), cfg.dns.enabled);
    let judge = Judge::new(classifier, cfg.policy.clone(), cfg.learning.clone());
    let core = Arc::new(Mutex::new(Core { state: State::new(cfg, store, dp, attached, rec.unapplied), judge }));
    let (stop, mut stopped) = watch::channel(false);
    let queue = Queue::new(limits.max_pending);

    // Kept until exit: dropping it stops answering (the lease then lapses).
    let rejector = match rejector {
        Some(listeners) => Some(Arc::new(reject::start(core.clone(), reject_settings, listeners)?)),
        None => None,
    };
    let mail = {
        let mut guard = core.lock().await;
        Arc::new(tokio::task::block_in_place(|| mail::MailHandle::restore(&mut guard.state))?)
    };
    mail::start(&core, mail.clone());
    let policy = mail::start_policy_service(mail.clone())?;
    tokio::spawn(sweeper(core.clone()));
    if let Some(l) = explain {
        tokio::spawn(explain::serve(l));
    }
    if let Some(rb) = events {
        tokio::spawn(lookups::read_events(queue.clone(), rb, lookups_on));
    }
    tokio::spawn(lookups::run_lookups(core.clone(), queue.clone(), resolver.clone(), limits, dns_cfg));
    tokio::spawn(control::serve(
        listener,
        control::Ctx { core: core.clone(), queue, resolver, stop, rejector, mail: Some(mail.clone()), policy },
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("install SIGTERM handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; the datapath stays pinned and keeps enforcing"),
        _ = term.recv() => info!("SIGTERM: exiting; the datapath stays pinned and keeps enforcing"),
        _ = stopped.changed() => info!("unloaded: everything detached and unpinned; exiting"),
    }
    let _ = std::fs::remove_file(&socket_path);
    mail.flush(&core).await;
    Ok(())
}

/// Expires ranges and verdicts once a second.
async fn sweeper(core: Arc<Mutex<Core>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut guard = core.lock().await;
        if let Err(e) = tokio::task::block_in_place(|| guard.state.sweep()) {
            error!(error = %e.report(), "expiry sweep failed");
        }
    }
}
