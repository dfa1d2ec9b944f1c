//! One task per `[[logs]]` entry: read what is new, parse it, score it,
//! and commit the outcome together with the position it was read up to
//! (so a restart resumes exactly there, counting nothing twice).
use std::{sync::Arc, time::Duration};

use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{now_ms, MailCore, MailHandle};
use crate::{
    agent::{state::MailBatch, Core},
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
fn apply(core: &mut MailCore, handle: &MailHandle, kind: LogKind, rec: &Record<'_>, now: i64, batch: &mut MailBatch) {
    match logs::parse(kind, rec) {
        Parsed::Event(ev) => {
            core.stats.events += 1;
            let at = rec.at_us.map_or(now, |us| us.div_euclid(1000)).clamp(now - MAX_LAG_MS, now);
            match &ev {
                Event::Submitted { account: Some(a), client, .. }
                | Event::RcptReject { account: Some(a), client, .. } => core.saw_account(a, *client),
                _ => {}
            }
            if let Some(o) = core.scores.apply(&ev, at) {
                if let Some(b) = core.ban_of(&o, now) {
                    batch.bans.push(b);
                }
            }
            if handle.cfg.suspend.enabled {
                if let Some(s) = core.stream.apply(&ev, at) {
                    if let Some(x) = core.suspension_of(&s, &handle.cfg) {
                        batch.suspensions.push(x);
                    }
                }
            }
        }
        Parsed::Unparsed(why) => *core.stats.unparsed.entry(format!("{kind}: {why}")).or_default() += 1,
        Parsed::Ignored => {}
    }
}

/// Commits a batch; an error is logged (the lines stay counted in memory,
/// the position is not advanced: after a restart they are read again).
async fn commit(state: &Arc<Mutex<Core>>, batch: MailBatch, id: &str) {
    if batch.is_empty() {
        return;
    }
    let mut core = state.lock().await;
    if let Err(e) = tokio::task::block_in_place(|| core.state.mail_commit(batch)) {
        warn!(source = %id, error = %e.report(), "could not save what the log lines concluded");
    }
}

async fn stored<T: serde::de::DeserializeOwned>(state: &Arc<Mutex<Core>>, id: &str) -> Option<T> {
    let text = match state.lock().await.state.log_position(id) {
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
            let now = now_ms();
            let mut batch = MailBatch::default();
            {
                let mut core = handle.lock();
                *core.stats.lines.entry(id.clone()).or_default() += chunk.len() as u64;
                for line in chunk {
                    if let Some(rec) = logs::split_line(&line.text, now * 1000) {
                        apply(&mut core, &handle, lc.kind, &rec, now, &mut batch);
                    }
                }
                core.drain_dirty(&mut batch);
            }
            if let Some(last) = chunk.last() {
                last_saved = Some(last.end);
                batch.positions.push((id.clone(), serde_json::to_string(&last.end).unwrap_or_default()));
            }
            commit(&state, batch, &id).await;
        }
        // A truncation or rotation moves the position without a line.
        let pos = follower.position();
        if pos.is_some() && pos != last_saved {
            last_saved = pos;
            let batch = MailBatch {
                positions: vec![(id.clone(), serde_json::to_string(&pos).unwrap_or_default())],
                ..MailBatch::default()
            };
            commit(&state, batch, &id).await;
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
            let now = now_ms();
            let mut batch = MailBatch::default();
            {
                let mut core = handle.lock();
                *core.stats.lines.entry(id.clone()).or_default() += entries.len() as u64;
                for e in &entries {
                    let rec = Record { at_us: e.realtime_us, ident: e.ident.as_deref(), message: &e.message };
                    apply(&mut core, &handle, lc.kind, &rec, now, &mut batch);
                }
                core.drain_dirty(&mut batch);
            }
            if let Some(last) = entries.last() {
                position = Some(last.position());
                batch.positions.push((id.clone(), serde_json::to_string(&position).unwrap_or_default()));
            }
            commit(&state, batch, &id).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
