//! The Postfix policy service (SMTPD_POLICY_README): at RCPT, suspended
//! accounts and addresses are refused (and the request is remembered, so a
//! refusal Postfix logs without a queue id is put down to its account); at
//! DATA, the message counts against the sender's limits, and over them it
//! is deferred. Answers come from memory, never waiting for the database;
//! a dead agent means Postfix's `default_action` (DUNNO): mail flows.
use std::sync::Arc;

use tracing::{info, warn};

use super::{now_ms, MailHandle};
use crate::{
    pipeline::abuse::Subject,
    policy::{
        protocol::{PolicyRequest, Reply},
        server::{bind_socket, serve_with, PolicyCounters, PolicyDecider, ServeOptions},
    },
    Result,
};

struct Decider {
    handle: Arc<MailHandle>,
}

impl PolicyDecider for Decider {
    fn decide(&self, req: &PolicyRequest) -> Reply {
        let Some(client) = req.client_address() else { return Reply::Dunno };
        let account = req.sasl_username().filter(|a| !a.is_empty());
        let subject = Subject::of(account, client);
        let now = now_ms();
        let mut core = self.handle.lock();
        let suspended = core
            .suspended
            .get(&subject)
            .or_else(|| core.suspended.get(&Subject::addr(client)))
            .map(|s| s.reason.clone());
        let contact = &self.handle.cfg.mail_policy.contact;
        match req.protocol_state() {
            Some("RCPT") => {
                if let Some(a) = account {
                    core.saw_account(a, client);
                }
                core.stream.note_rcpt_request(
                    client,
                    req.sender().unwrap_or(""),
                    req.recipient().unwrap_or(""),
                    account,
                    now,
                );
                match suspended {
                    Some(why) => Reply::Reject(format!("5.7.1 account suspended: {why}; contact {contact}")),
                    None => Reply::Dunno,
                }
            }
            Some("DATA") => match suspended {
                Some(why) => Reply::Reject(format!("5.7.1 account suspended: {why}; contact {contact}")),
                // Without an account only a customer address is counted.
                None if account.is_none() && !super::in_nets(&self.handle.cfg.mail_policy.customer_ranges, client) => {
                    Reply::Dunno
                }
                None => {
                    let d = core.limits.check_data(&subject, Some(client), req.recipient_count().unwrap_or(0), now);
                    self.handle.changed.notify_one();
                    d.reply()
                }
            },
            _ => Reply::Dunno,
        }
    }
}

/// Binds `[mail_policy] socket` and serves it; the counters for `status`.
pub fn start_policy_service(handle: Arc<MailHandle>) -> Result<Option<Arc<PolicyCounters>>> {
    let cfg = &handle.cfg.mail_policy;
    let Some(path) = cfg.socket.clone() else { return Ok(None) };
    let listener = bind_socket(&path, cfg.owner.as_deref(), cfg.mode)?;
    let counters = Arc::new(PolicyCounters::default());
    let opts = ServeOptions { counters: counters.clone(), ..ServeOptions::default() };
    info!(socket = %path.display(), "policy service listening (main.cf: check_policy_service {{ unix:..., timeout=2s, default_action=DUNNO, try_limit=1 }})");
    let decider: Arc<dyn PolicyDecider> = Arc::new(Decider { handle });
    tokio::spawn(async move {
        if let Err(e) = serve_with(listener, decider, opts).await {
            warn!(error = %e, "the policy service stopped; Postfix falls back to its default_action (DUNNO)");
        }
    });
    Ok(Some(counters))
}
