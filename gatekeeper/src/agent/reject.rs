//! The mail host's rejector, wired to the datapath: the sk_lookup program
//! attached to this namespace with the agent's listeners in its slots, the
//! rejector answering what it steers there (`crate::rejector`), and the
//! lease that lets the XDP gate pass refused SYNs to it.
//!
//! The lease (`RejectConfig::lease_ns`) runs [`LEASE`] ahead and is renewed
//! every [`RENEW`]; it is set lapsed at once while every session slot is
//! taken. A dead agent stops renewing it, so within [`LEASE`] refused
//! sources are dropped by the gate again, as they were before this feature
//! (and until then the sk_lookup program, finding no listener, fails their
//! lookup: a RST, never the MTA).
use std::{net::IpAddr, sync::Arc, time::Duration};

use gatekeeper_common::{
    reject::{RejectConfig, MAX_REJECT_PORTS},
    KeyWords, SourceKey,
};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{error, info, warn};

use super::Core;
use crate::{
    config::RejectSettings,
    datapath::{Datapath, Listeners, RejectorAttach},
    rejector::{Rejector, RejectorHandle},
    time::monotonic_ns,
    Result,
};

/// How far ahead the lease runs.
pub const LEASE: Duration = Duration::from_secs(3);
/// How often it is renewed.
const RENEW: Duration = Duration::from_secs(1);
/// Quiet-table writes waiting for the lock; beyond, a source is answered
/// (rate-limited in the agent) instead of dropped.
const QUIET_QUEUE: usize = 1024;

/// Attaches the rejector to this namespace and binds its listeners when
/// any refusal's action is reject and the agent guards mail (ingress
/// interfaces); otherwise detaches a rejector an earlier run left here and
/// turns the datapath's reject settings off.
pub fn prepare(dp: &mut Datapath, settings: &RejectSettings, ingress: bool) -> Result<Option<Listeners>> {
    if settings.action_bits() == 0 || !ingress {
        if let Some(r) = dp.maps.reject.as_mut() {
            r.set(RejectConfig::default())?;
        }
        if dp.detach_rejector()? {
            info!("rejector detached: no refusal's action is reject here");
        }
        return Ok(None);
    }
    let how = dp.attach_rejector()?;
    let listeners = dp.rejector_listeners()?;
    info!(adopted = how == RejectorAttach::Adopted, "rejector attached; refused sources hear why");
    Ok(Some(listeners))
}

/// The settings the datapath needs: the reject actions, and the ports the
/// rejector answers on that are guarded (`guarded`).
pub fn datapath_settings(settings: &RejectSettings, guarded: &[u16], lease_ns: u64) -> RejectConfig {
    let mut rc = RejectConfig {
        actions: settings.action_bits(),
        lease_ns,
        syn_limit: syn_limit(settings.syn_rate, nr_cpus()),
        ..RejectConfig::default()
    };
    let ports: Vec<u16> =
        settings.ports().into_iter().map(|(p, _)| p).filter(|p| guarded.contains(p)).take(MAX_REJECT_PORTS).collect();
    rc.ports[..ports.len()].copy_from_slice(&ports);
    rc.nports = ports.len() as u32;
    rc
}

/// The per-CPU budget of `rate` (each CPU keeps its own, so each gets its
/// share; the burst is one unit's worth).
pub fn syn_limit(rate: crate::config::Rate, cpus: u32) -> gatekeeper_common::RateLimit {
    let unit_ns = rate.unit_secs as u64 * 1_000_000_000;
    let per_cpu = (rate.per as u64).div_ceil(cpus.max(1) as u64).max(1);
    gatekeeper_common::RateLimit { interval_ns: unit_ns / per_cpu, burst_ns: unit_ns }
}

fn nr_cpus() -> u32 {
    aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1)
}

/// Starts the rejector on `listeners` and the task that keeps its lease.
pub fn start(core: Arc<Mutex<Core>>, settings: RejectSettings, listeners: Listeners) -> Result<RejectorHandle> {
    let resolver = core.clone();
    let resolve = Arc::new(move |ip: IpAddr| {
        // Called from a session task of the multi-threaded runtime.
        tokio::task::block_in_place(|| {
            let core = tokio::runtime::Handle::current().block_on(resolver.lock());
            core.state.refusal(ip)
        })
    });
    let (quiet_tx, quiet_rx) = mpsc::channel(QUIET_QUEUE);
    let socks: Vec<std::net::TcpListener> = std::iter::once(listeners.v4).chain(listeners.v6).collect();
    let handle = Rejector::new(socks, settings.clone(), resolve)
        .on_quiet(move |ip, d| {
            let _ = quiet_tx.try_send((ip, d));
        })
        .spawn()?;
    tokio::spawn(lease(core.clone(), settings, handle.at_capacity()));
    tokio::spawn(quiet(core, quiet_rx));
    Ok(handle)
}

/// Renews the lease every [`RENEW`], and at once when the session cap is
/// reached or left; also follows `ports set` (the rejector answers on
/// guarded ports only).
async fn lease(core: Arc<Mutex<Core>>, settings: RejectSettings, mut full: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RENEW);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = full.changed() => {
                if changed.is_err() {
                    return; // The rejector is gone: the lease lapses.
                }
            }
        }
        let at_cap = *full.borrow_and_update();
        let mut guard = core.lock().await;
        let state = &mut guard.state;
        let guarded = match state.ports() {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e.report(), "rejector lease: cannot read the guarded ports");
                continue;
            }
        };
        let lease_ns = if at_cap { 0 } else { monotonic_ns() + LEASE.as_nanos() as u64 };
        let rc = datapath_settings(&settings, &guarded, lease_ns);
        if rc.nports == 0 && !warned {
            warn!(guarded = ?guarded, "the rejector speaks no protocol on any guarded port: refused sources are dropped");
            warned = true;
        }
        if let Some(r) = state.dp.maps.reject.as_mut() {
            if let Err(e) = r.set(rc) {
                error!(error = %e.report(), "rejector lease: cannot write the datapath's reject settings");
            }
        }
    }
}

/// Writes sources over the rejector's rate into the quiet table, on the
/// datapath clock.
async fn quiet(core: Arc<Mutex<Core>>, mut rx: mpsc::Receiver<(IpAddr, Duration)>) {
    while let Some((ip, d)) = rx.recv().await {
        let mut guard = core.lock().await;
        let maps = &mut guard.state.dp.maps;
        let hash = maps.verdicts.hash_key();
        let key = KeyWords::of(&SourceKey::host(ip));
        if let Some(r) = maps.reject.as_mut() {
            if let Err(e) = r.quiet(key, monotonic_ns() + d.as_nanos() as u64, &hash) {
                error!(error = %e.report(), source = %ip, "cannot silence a source in the quiet table");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekeeper_common::verdict_reason;

    #[test]
    fn the_datapath_answers_on_guarded_ports_only() {
        let s = RejectSettings::default();
        let rc = datapath_settings(&s, &[25, 465], 7);
        assert_eq!((rc.nports, &rc.ports[..1], rc.lease_ns), (1, &[25][..], 7));
        assert!(rc.rejects(verdict_reason::NO_PTR) && !rc.rejects(verdict_reason::MANUAL_BAN));
        let rc = datapath_settings(&s, &[25, 587, 110, 143, 465], 7);
        assert_eq!(&rc.ports[..rc.nports as usize], &[25, 587, 110, 143]);
        assert_eq!(datapath_settings(&s, &[2525], 7).nports, 0);
    }

    #[test]
    fn the_syn_budget_is_shared_among_the_cpus() {
        let r = |s: &str| s.parse::<crate::config::Rate>().unwrap();
        let l = syn_limit(r("200/s"), 2);
        assert_eq!((l.interval_ns, l.burst_ns), (10_000_000, 1_000_000_000));
        // 100 back to back on one CPU, then it is spent.
        let mut tat = 0;
        for _ in 0..100 {
            tat = l.admit(tat, 5_000_000_000).unwrap();
        }
        assert_eq!(l.admit(tat, 5_000_000_000), None);
        assert_eq!(syn_limit(r("1/h"), 64).interval_ns, 3_600_000_000_000, "never below one per unit");
    }
}
