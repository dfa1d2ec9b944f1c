//! The control socket: binds it (root only), checks each peer, reads one
//! request line, dispatches it to the state's verbs and writes one reply
//! line.
use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Mutex},
};
use tracing::{debug, warn};

use crate::{
    agent::{lookups::Queue, state::RangeChange, Core},
    dns::Resolver,
    domain::VerdictReason,
    protocol::{CheckReply, Flushed, Pong, Ports, RangesRemoved, Request, Response, Unloaded, VerdictsRemoved},
    status::AgentStatus,
    time::unix_now,
    Error, Result,
};

/// Binds the control socket (mode 0600, its directory 0700 if created); a
/// live socket means another agent serves it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
        }
    }
    if path.exists() {
        if is_served(path) {
            return Err(Error::AlreadyRunning(format!("another agent is already serving {}", path.display())));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(format!("remove stale socket {}", path.display()), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Whether an agent answers on `path`.
pub fn is_served(path: &Path) -> bool {
    path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// What a connection needs besides the state.
#[derive(Clone)]
pub struct Ctx {
    pub core: Arc<Mutex<Core>>,
    pub queue: Arc<Queue>,
    pub resolver: Arc<Resolver>,
    /// Set once `unload` has been answered: the agent exits.
    pub stop: watch::Sender<bool>,
    /// The mail host's rejector, when it runs.
    pub rejector: Option<Arc<crate::rejector::RejectorHandle>>,
    /// The mail stream: abuse scores, suspensions, sending limits.
    pub mail: Option<Arc<crate::agent::mail::MailHandle>>,
    /// The policy service's counters, when it runs.
    pub policy: Option<Arc<crate::policy::server::PolicyCounters>>,
}

/// Accepts connections forever, one task each.
pub async fn serve(listener: UnixListener, ctx: Ctx) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accept on control socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, ctx).await {
                debug!(error = %e, "control connection");
            }
        });
    }
}

async fn connection(stream: UnixStream, ctx: Ctx) -> std::io::Result<()> {
    let root = matches!(stream.peer_cred(), Ok(cred) if cred.uid() == 0);
    let (r, mut w) = stream.into_split();
    let (resp, unload) = if !root {
        (Response::err("the control socket is for root only"), false)
    } else {
        let mut lines = BufReader::new(r).lines();
        let Some(line) = lines.next_line().await? else { return Ok(()) };
        match serde_json::from_str::<Request>(&line) {
            Err(e) => (Response::err(format!("bad request: {e}")), false),
            Ok(req) => {
                let unload = matches!(req, Request::Unload);
                (dispatch(req, &ctx).await, unload)
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.flush().await?;
    if unload && resp.ok {
        let _ = ctx.stop.send(true);
    }
    Ok(())
}

/// The mail stream's handle (always there in a running agent).
fn mail(ctx: &Ctx) -> crate::Result<&crate::agent::mail::MailHandle> {
    ctx.mail.as_deref().ok_or_else(|| crate::Error::InvalidInput("the mail stream is not running".into()))
}

/// One request against the state, holding its lock for the request (the
/// live lookup of `check` runs before taking it).
async fn dispatch(req: Request, ctx: &Ctx) -> Response {
    let lookup = match &req {
        Request::Check { ip } => Some(ctx.resolver.lookup(*ip).await),
        _ => None,
    };
    let mut guard = ctx.core.lock().await;
    let Core { state: st, judge } = &mut *guard;
    tokio::task::block_in_place(|| {
        let now = unix_now();
        let at = |secs: Option<u64>| secs.map(|s| now + s as i64);
        match req {
            Request::Ping => Response::ok(Pong { pong: true }),
            Request::RangeAdd { kind, ranges, origin, source, expire_secs, force, skip_existing, replace, action } => {
                Response::of(st.add_ranges(RangeChange {
                    kind,
                    ranges,
                    origin,
                    source,
                    expires_at: at(expire_secs),
                    force,
                    skip_existing,
                    replace,
                    action,
                }))
            }
            Request::RangeDel { kind, nets } => {
                Response::of(st.del_ranges(kind, &nets).map(|removed| RangesRemoved { removed }))
            }
            Request::RangeList { kind } => Response::of(st.list_ranges(kind)),
            Request::BanAdd { addrs, comment, expire_secs } => Response::of(st.ban(&addrs, comment, at(expire_secs))),
            Request::BanDel { addrs } => {
                let r = st.del_verdicts(&addrs, Some(VerdictReason::ManualBan), "ban");
                if let (Ok(removed), Some(m)) = (&r, ctx.mail.as_deref()) {
                    m.bans_lifted(st, removed);
                }
                Response::of(r.map(|removed| VerdictsRemoved { removed }))
            }
            Request::BanList => Response::of(st.list_verdicts(Some(VerdictReason::ManualBan))),
            Request::VerdictList { reason } => Response::of(st.list_verdicts(reason)),
            Request::VerdictDel { addrs } => {
                let r = st.del_verdicts(&addrs, None, "verdict");
                if let (Ok(removed), Some(m)) = (&r, ctx.mail.as_deref()) {
                    m.bans_lifted(st, removed);
                }
                Response::of(r.map(|removed| VerdictsRemoved { removed }))
            }
            Request::VerdictFlush { reason } => {
                Response::of(st.flush_verdicts(reason).map(|removed| Flushed { removed }))
            }
            Request::Check { ip } => {
                let _ = ip;
                let lookup = lookup.expect("looked up above");
                // The looked-up address (IPv4 for an IPv4-mapped source).
                let ip = lookup.ip;
                let decision = judge.decide(&lookup);
                Response::of(st.explain(ip).map(|datapath| {
                    CheckReply {
                        ip,
                        source_key: decision
                            .key(ip)
                            .map_or_else(|| "none (no verdict is written for this address)".into(), |k| k.display()),
                        decision,
                        lookup,
                        datapath,
                        abuse: ctx.mail.as_ref().and_then(|m| m.abuse_row(ip)),
                    }
                }))
            }
            Request::PortsSet { ports } => Response::of(st.set_ports(&ports).map(|ports| Ports { ports })),
            Request::PortsList => Response::of(st.ports().map(|ports| Ports { ports })),
            Request::EgressPolicy => Response::of(st.egress_policy()),
            Request::Status => Response::of(st.status(ctx.queue.stats()).map(|mut s| {
                s.events_received = ctx.queue.events();
                s.lookups = judge.outcomes.clone();
                s.learned_ranges = judge.learned;
                s.learning_prefixes_tracked = judge.tracked();
                s.learning_shapes_tracked = judge.shapes();
                let l = judge.learner_dropped();
                (s.dropped.learning_prefixes, s.dropped.learning_shapes) = (l.prefixes, l.shapes);
                s.rejector = ctx.rejector.as_ref().map(|r| r.stats());
                s.mail = ctx.mail.as_ref().map(|m| m.stats()).unwrap_or_default();
                s.policy = ctx.policy.as_ref().map(|p| p.snapshot());
                AgentStatus::Running(Box::new(s))
            })),
            Request::Unload => Response::of(st.unload().map(|removed| Unloaded { removed })),
            Request::AbuseList => Response::of(mail(ctx).map(|m| m.abuse_list())),
            Request::AbuseForget { ip } => Response::of(mail(ctx).and_then(|m| m.forget(st, ip))),
            Request::SuspendList => Response::of(st.suspensions()),
            Request::SuspendAdd { subject, reason } => Response::of(match mail(ctx) {
                Ok(m) => m.suspend_add(st, subject, reason),
                Err(e) => Err(e),
            }),
            Request::SuspendDel { subject } => Response::of(match mail(ctx) {
                Ok(m) => m.suspend_del(st, &subject),
                Err(e) => Err(e),
            }),
            Request::LimitSet { subject, limits } => Response::of(match mail(ctx) {
                Ok(m) => m.limit_set(st, subject, &limits),
                Err(e) => Err(e),
            }),
            Request::LimitDel { subject } => Response::of(match mail(ctx) {
                Ok(m) => m.limit_del(st, &subject),
                Err(e) => Err(e),
            }),
            Request::LimitList => Response::of(mail(ctx).and_then(|m| m.limit_list(st))),
        }
    })
}
