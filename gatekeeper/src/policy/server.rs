//! The policy service's listener: one task per connection, each answering
//! requests in turn on the same connection (Postfix reuses it). A request
//! that cannot be read closes the connection without an answer, so Postfix
//! applies its `default_action` (configure `DUNNO`); so does a connection
//! over `max_conns`, and one idle longer than `idle_timeout`.
use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    task::JoinSet,
};

use super::protocol::{format_reply, read_request, PolicyRequest, ProtocolError, Reply};
use crate::Error;

/// Decides a request. Called on the connection's task: answer quickly.
pub trait PolicyDecider: Send + Sync {
    fn decide(&self, req: &PolicyRequest) -> Reply;
}

impl<F: Fn(&PolicyRequest) -> Reply + Send + Sync> PolicyDecider for F {
    fn decide(&self, req: &PolicyRequest) -> Reply {
        self(req)
    }
}

/// What the service did, for `stats` and `status`.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    pub connections: AtomicU64,
    /// Closed at once: `max_conns` connections were open.
    pub refused_connections: AtomicU64,
    pub idle_closed: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
    pub dunno: AtomicU64,
    pub reject: AtomicU64,
    pub defer_if_permit: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyCountersSnapshot {
    pub connections: u64,
    pub refused_connections: u64,
    pub idle_closed: u64,
    pub requests: u64,
    pub bad_requests: u64,
    pub dunno: u64,
    pub reject: u64,
    pub defer_if_permit: u64,
}

impl PolicyCounters {
    pub fn snapshot(&self) -> PolicyCountersSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PolicyCountersSnapshot {
            connections: g(&self.connections),
            refused_connections: g(&self.refused_connections),
            idle_closed: g(&self.idle_closed),
            requests: g(&self.requests),
            bad_requests: g(&self.bad_requests),
            dunno: g(&self.dunno),
            reject: g(&self.reject),
            defer_if_permit: g(&self.defer_if_permit),
        }
    }

    fn replied(&self, reply: &Reply) {
        let c = match reply {
            Reply::Dunno => &self.dunno,
            Reply::Reject(_) => &self.reject,
            Reply::DeferIfPermit(_) => &self.defer_if_permit,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// How the listener runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Connections served at once; more are closed at once.
    pub max_conns: usize,
    /// A connection silent this long (between or within requests) is closed.
    /// Postfix closes its own idle connections after `max_idle` (300 s).
    pub idle_timeout: Duration,
    pub counters: Arc<PolicyCounters>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { max_conns: 256, idle_timeout: Duration::from_secs(330), counters: Arc::default() }
    }
}

/// Serves `listener` until the task is dropped (which also ends every
/// connection) or accepting fails for good (transient errors such as
/// EMFILE are logged and retried).
pub async fn serve(listener: UnixListener, decider: Arc<dyn PolicyDecider>, max_conns: usize) -> std::io::Result<()> {
    serve_with(listener, decider, ServeOptions { max_conns, ..ServeOptions::default() }).await
}

/// [`serve`] with every option (and the counters) given.
pub async fn serve_with(
    listener: UnixListener,
    decider: Arc<dyn PolicyDecider>,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(opts.max_conns.max(1)));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if transient(&e) => {
                // Out of descriptors or memory: wait a little rather than
                // spin or give up; Postfix applies its default meanwhile.
                tracing::warn!(error = %e, "policy service: accept failed, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        opts.counters.connections.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            opts.counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max_conns = opts.max_conns,
                "policy service: connection limit reached, closing a new connection"
            );
            drop(stream);
            continue;
        };
        let (decider, counters, idle) = (decider.clone(), opts.counters.clone(), opts.idle_timeout);
        conns.spawn(async move {
            connection(stream, decider.as_ref(), &counters, idle).await;
            drop(permit);
        });
    }
}

/// Accept errors that pass (the listener itself is fine).
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO))
}

/// Answers requests on one connection until it closes, errs or idles.
async fn connection(stream: UnixStream, decider: &dyn PolicyDecider, counters: &PolicyCounters, idle: Duration) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let req = match tokio::time::timeout(idle, read_request(&mut r)).await {
            Err(_) => {
                counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(req))) => req,
            Ok(Err(ProtocolError::Io(e))) => {
                tracing::debug!(error = %e, "policy service: read failed");
                return;
            }
            Ok(Err(e)) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "policy service: bad request, closing without an answer");
                return;
            }
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let reply = decider.decide(&req);
        counters.replied(&reply);
        let out = format_reply(&reply);
        if let Err(e) = w.write_all(out.as_bytes()).await {
            tracing::debug!(error = %e, "policy service: write failed");
            return;
        }
    }
}

/// Creates the listening socket at `path`: a stale socket there is removed
/// (anything else is an error), then it is given to `owner` (a user name;
/// its group unchanged) and `mode`. Call inside a tokio runtime.
pub fn bind_socket(path: &Path, owner: Option<&str>, mode: u32) -> Result<UnixListener, Error> {
    let io = |what: &str, source| Error::Io { context: format!("policy socket {}: {what}", path.display()), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?
        }
        Ok(_) => {
            return Err(Error::InvalidInput(format!(
                "policy socket {}: something that is not a socket is in the way; nothing was removed",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("checking the path", e)),
    }
    let uid = match owner {
        None => None,
        Some(name) => {
            let user = nix::unistd::User::from_name(name)
                .map_err(|e| io(&format!("looking up user {name:?}"), std::io::Error::from(e)))?
                .ok_or_else(|| Error::InvalidInput(format!("policy socket owner {name:?}: no such user")))?;
            Some(user.uid)
        }
    };
    let listener = UnixListener::bind(path).map_err(|e| io("bind", e))?;
    let cleanup = |e: Error| {
        let _ = std::fs::remove_file(path);
        e
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| cleanup(io(&format!("chmod {mode:o}"), e)))?;
    if let Some(uid) = uid {
        nix::unistd::chown(path, Some(uid), None)
            .map_err(|e| cleanup(io(&format!("chown to uid {uid}"), std::io::Error::from(e))))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests;
