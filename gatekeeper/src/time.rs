//! Clocks: wall-clock seconds for the store, the datapath's monotonic
//! nanoseconds for expiries in the maps, and the conversion between them.
use std::time::Duration;

/// CLOCK_MONOTONIC_COARSE in ns: the clock the datapath reads
/// (`bpf_ktime_get_coarse_ns`), so expiries compare like with like.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).expect("CLOCK_MONOTONIC_COARSE");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Converts a wall-clock expiry (unix seconds, `None` = never) into the
/// datapath's monotonic-ns expiry.
pub fn expiry_ns(expires_at: Option<i64>, unix_now: i64, mono_now: u64) -> u64 {
    match expires_at {
        None => u64::MAX,
        Some(t) if t <= unix_now => mono_now,
        Some(t) => mono_now.saturating_add(Duration::from_secs((t - unix_now) as u64).as_nanos() as u64),
    }
}
