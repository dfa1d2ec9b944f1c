//! One task per `[[logs]]` entry: read what is new, parse it, score it,
//! and commit the outcome together with the position it was read up to
//! (so a restart resumes exactly there, counting nothing twice).
//!
//! A batch is applied, drained and committed under the state lock (taken
//! first, then the mail stream's, as the control socket does): what one
//! commit holds is exactly what the lines up to its position changed, never
//! another reader's changes, and commits land in the order they were made.
use std::{sync::Arc, time::Duration};

use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{now_ms, MailCore, MailHandle};
use crate::{
    agent::{
        state::{MailBatch, State},
        Core,
    },
    config::LogConfig,
    domain::{LogKind, LogSourceKind},
    logs::{
        self,
        file::{FileFollower, FilePosition, Poll},
        journal::{JournalConfig, JournalPosition, JournalSource},
        Event, Parsed, Record,
    },
};

/// Lines (or entries) at most per batch.
const BATCH: usize = 1000;
/// How often an idle file is looked at again.
const FILE_POLL: Duration = Duration::from_millis(100);
/// Line times older than this (a catch-up after downtime) count as this old.
const MAX_LAG_MS: i64 = 3_600_000;

pub fn spawn(handle: Arc<MailHandle>, state: Arc<Mutex<Core>>, lc: LogConfig) {
    tokio::spawn(async move {
        let id = lc.id();
        info!(source = %id, "following");
        match lc.source {
            LogSourceKind::File => follow_file(handle, state, lc, id).await,
            LogSourceKind::Journal => follow_journal(handle, state, lc, id).await,
        }
    });
}

/// Applies one record to the core; what it reaches goes into `batch`.
/// `st` tells good sources (allow ranges, `ok` verdicts), whose connections
/// do not count.
fn apply(
    core: &mut MailCore,
    handle: &MailHandle,
    st: &State,
    kind: LogKind,
    rec: &Record<'_>,
    now: i64,
    batch: &mut MailBatch,
) {
    match logs::parse(kind, rec) {
        Parsed::Event(ev) => {
            core.stats.events += 1;
            let at = rec.at_us.map_or(now, |us| us.div_euclid(1000)).clamp(now - MAX_LAG_MS, now);
            match &ev {
                Event::Submitted { account: Some(a), client, .. }
                | Event::RcptReject { account: Some(a), client, .. } => core.saw_account(a, *client),
                _ => {}
            }
            let scored = match &ev {
                Event::Connect { client, .. } => !handle.abuse_exempt(*client) && !st.good_source(*client),
                Event::AuthFail { client, .. } => !handle.abuse_exempt(*client),
                _ => false,
            };
            if scored {
                if let Some(o) = core.scores.apply(&ev, at) {
                    if let Some(b) = core.ban_of(&o, now) {
                        batch.bans.push(b);
                    }
                }
            }
            if handle.cfg.suspend.enabled {
                if let Some(s) = core.stream.apply(&ev, at) {
                    if let Some(x) = core.suspension_of(&s, &handle.cfg, st) {
                        batch.suspensions.push(x);
                    }
                }
            }
        }
        Parsed::Unparsed(why) => *core.stats.unparsed.entry(format!("{kind}: {why}")).or_default() += 1,
        Parsed::Ignored => {}
    }
}

/// Applies `records` and commits what they changed with `position`, all
/// under the state lock.
async fn apply_and_commit<'a>(
    handle: &MailHandle,
    state: &Arc<Mutex<Core>>,
    lc: &LogConfig,
    id: &str,
    records: impl Iterator<Item = Record<'a>>,
    count: usize,
    position: Option<String>,
) {
    let mut guard = state.lock().await;
    tokio::task::block_in_place(|| {
        let st = &mut guard.state;
        let now = now_ms();
        let mut batch = MailBatch::default();
        {
            let mut core = handle.lock();
            *core.stats.lines.entry(id.to_string()).or_default() += count as u64;
            for rec in records {
                apply(&mut core, handle, st, lc.kind, &rec, now, &mut batch);
            }
            core.drain_dirty(&mut batch);
        }
        if let Some(p) = position {
            batch.positions.push((id.to_string(), p));
        }
        handle.commit(st, batch);
    });
}

async fn stored<T: serde::de::DeserializeOwned>(state: &Arc<Mutex<Core>>, id: &str) -> Option<T> {
    let read = {
        let guard = state.lock().await;
        tokio::task::block_in_place(|| guard.state.log_position(id))
    };
    let text = match read {
        Ok(t) => t?,
        Err(e) => {
            warn!(source = %id, error = %e.report(), "cannot read the stored position; starting as configured");
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(p) => Some(p),
        Err(e) => {
            warn!(source = %id, error = %e, "the stored position is unreadable; starting as configured");
            None
        }
    }
}

async fn follow_file(handle: Arc<MailHandle>, state: Arc<Mutex<Core>>, lc: LogConfig, id: String) {
    let Some(path) = lc.file.clone() else { return };
    let resume: Option<FilePosition> = stored(&state, &id).await;
    let mut follower = FileFollower::new(path, resume, lc.start);
    let mut lines = Vec::new();
    let mut last_saved = resume;
    let mut errors = 0u32;
    loop {
        lines.clear();
        let polled = tokio::task::block_in_place(|| follower.poll(&mut lines));
        let more = match polled {
            Ok(p) => {
                errors = 0;
                p == Poll::More
            }
            Err(e) => {
                errors += 1;
                handle.lock().stats.source_errors += 1;
                if errors == 1 || errors.is_power_of_two() {
                    warn!(source = %id, error = %e, "cannot read the log file; retrying");
                }
                tokio::time::sleep(FILE_POLL * 10).await;
                continue;
            }
        };
        for chunk in lines.chunks(BATCH) {
            let Some(last) = chunk.last() else { continue };
            last_saved = Some(last.end);
            let now_us = now_ms() * 1000;
            let records = chunk.iter().filter_map(|l| logs::split_line(&l.text, now_us));
            let pos = serde_json::to_string(&last.end).ok();
            apply_and_commit(&handle, &state, &lc, &id, records, chunk.len(), pos).await;
        }
        // A truncation or rotation moves the position without a line.
        let pos = follower.position();
        if pos.is_some() && pos != last_saved {
            last_saved = pos;
            apply_and_commit(&handle, &state, &lc, &id, std::iter::empty(), 0, serde_json::to_string(&pos).ok()).await;
        }
        if !more {
            tokio::time::sleep(FILE_POLL).await;
        }
    }
}

async fn follow_journal(handle: Arc<MailHandle>, state: Arc<Mutex<Core>>, lc: LogConfig, id: String) {
    let mut position: Option<JournalPosition> = stored(&state, &id).await;
    let mut backoff = Duration::from_secs(1);
    let cfg = JournalConfig {
        journalctl: lc.journalctl.clone().unwrap_or_else(|| "journalctl".into()),
        directory: lc.directory.clone(),
        units: lc.units(),
        start: lc.start,
    };
    loop {
        let mut src = match JournalSource::spawn(cfg.clone(), position.clone()) {
            Ok(s) => s,
            Err(e) => {
                handle.lock().stats.source_errors += 1;
                warn!(source = %id, error = %e, "cannot start journalctl; retrying in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut entries = Vec::new();
        loop {
            entries.clear();
            if let Err(e) = src.next_batch(&mut entries, BATCH).await {
                handle.lock().stats.source_errors += 1;
                warn!(source = %id, error = %e, "journalctl stopped; restarting in {}s", backoff.as_secs());
                break;
            }
            backoff = Duration::from_secs(1);
            let Some(last) = entries.last() else { continue };
            position = Some(last.position());
            let pos = serde_json::to_string(&position).ok();
            let records =
                entries.iter().map(|e| Record { at_us: e.realtime_us, ident: e.ident.as_deref(), message: &e.message });
            apply_and_commit(&handle, &state, &lc, &id, records, entries.len(), pos).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
