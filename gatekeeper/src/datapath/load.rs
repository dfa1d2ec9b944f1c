//! Loading the eBPF object: map sizes and globals, the clock calibration
//! probe, and the check that pinned maps match this build before they are
//! adopted.
use std::time::Duration;

use aya::{
    maps::MapInfo,
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use gatekeeper_common::{
    maps as names, programs,
    sourcetab::{verdict_buckets, verdict_shift},
    trie::TrieNode,
    Config, RangeEntry, RateLimit, SeenSlot, VerdictBucket, VERDICT_SHIFT_GLOBAL,
};
use tracing::warn;

use crate::{datapath::pins::PinLayout, Error, Result};

/// Expected (key size, value size) of each pinned map, to refuse adopting
/// maps left by an incompatible gatekeeper build.
fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use core::mem::size_of;
    Some(match name {
        names::RANGES | names::SUB_RANGES | names::SMH_RANGES => (4, size_of::<TrieNode>() as u32),
        names::EG_PORTS => (4, 4),
        names::EG_LIMITS => (4, size_of::<RateLimit>() as u32),
        names::EG_BUCKETS => (size_of::<gatekeeper_common::LimitKey>() as u32, 8),
        names::EG_STATS => (4, 8),
        names::RANGE_INDEX => (4, size_of::<RangeEntry>() as u32),
        names::VERDICTS => (4, size_of::<VerdictBucket>() as u32),
        names::SEEN => (4, size_of::<SeenSlot>() as u32),
        names::PORTS => (4, 8),
        names::CONFIG => (4, size_of::<Config>() as u32),
        names::STATS => (4, 8),
        names::RANGE_HITS => (4, 8),
        names::REJECT => (4, size_of::<gatekeeper_common::reject::RejectConfig>() as u32),
        names::REJ_QUIET => (4, size_of::<gatekeeper_common::reject::QuietSlot>() as u32),
        names::REJ_STATS | names::REJ_BUDGET => (4, 8),
        names::IN_PORTS => (4, 4),
        names::IN_LIMITS => (4, size_of::<RateLimit>() as u32),
        names::IN_BUCKETS => (4, size_of::<gatekeeper_common::InBucket>() as u32),
        names::IN_STATS => (4, 8),
        names::EXPLAIN => (4, size_of::<gatekeeper_common::explain::ExplainConfig>() as u32),
        _ => return None,
    })
}

/// Loads the eBPF object with a verdict table of `buckets` buckets (a power
/// of two) and the datapath's bucket shift to match; `setup` adds pin paths
/// or other map sizes. Everything that loads the object goes through here.
pub fn load_object(buckets: u32, setup: impl FnOnce(&mut EbpfLoader<'_>)) -> Result<Ebpf> {
    if !buckets.is_power_of_two() {
        return Err(Error::bpf_msg(format!("verdict table of {buckets} buckets: not a power of two")));
    }
    if buckets < 2 {
        return Err(Error::bpf_msg(format!("verdict table of {buckets} bucket: at least 2 are needed")));
    }
    let shift = verdict_shift(buckets);
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(names::VERDICTS, buckets).override_global(VERDICT_SHIFT_GLOBAL, &shift, true);
    setup(&mut loader);
    loader.load(crate::EBPF_OBJECT).map_err(|e| Error::bpf("load eBPF object", e))
}

/// One reading of the clock probe: (jiffies, CLOCK_MONOTONIC_COARSE ns).
fn clock_sample(prog: &Xdp) -> Result<(u64, u64)> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..TestRunOptions::new() };
    let r = prog.test_run(opts).map_err(|e| Error::bpf(format!("run {}", programs::XDP_CLOCK), e))?;
    const XDP_PASS: u32 = 2;
    if r.return_value != XDP_PASS {
        return Err(Error::bpf_msg(format!("{} returned {}", programs::XDP_CLOCK, r.return_value)));
    }
    let word = |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(1)))
}

/// Calibrates the datapath clock (`Config::clock_ns`) with two probe
/// readings 120 ms apart. `None`, with a warning, when the kernel's tick is
/// not one gatekeeper knows: the datapath then reads the clock helper, which
/// is correct but slower.
pub fn calibrate_clock(ebpf: &mut Ebpf) -> Result<Option<(u64, u64)>> {
    let prog: &mut Xdp = super::program(ebpf, programs::XDP_CLOCK)?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| Error::bpf(format!("load {} (verifier)", programs::XDP_CLOCK), e))?;
    }
    let a = clock_sample(prog)?;
    std::thread::sleep(Duration::from_millis(120));
    let b = clock_sample(prog)?;
    let c = Config::calibrate(a, b);
    if c.is_none() {
        warn!(
            ?a,
            ?b,
            "could not tell the kernel's tick from two clock readings; the datapath reads the clock helper (slower)"
        );
    }
    Ok(c)
}

/// A pinned config left by a gatekeeper whose config had another layout
/// (before the hash secret) is unpinned, with the verdict table and the
/// reported-sources cache placed by its hash: the load makes them anew
/// (programs still attached keep their old maps until the agent swaps its
/// programs in), and reconcile writes the database's verdicts back. They
/// hold nothing the database does not: an upgrade needs no `unload`.
fn renew_derived_maps(layout: &PinLayout) -> Result<()> {
    let path = layout.map(names::CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).map_err(|e| Error::bpf(format!("inspect {}", path.display()), e))?;
    let want = core::mem::size_of::<Config>() as u32;
    if info.value_size() == want {
        return Ok(());
    }
    for name in [names::CONFIG, names::VERDICTS, names::SEEN] {
        let p = layout.map(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("unpin {}", p.display()), e)),
        }
    }
    warn!(
        found = info.value_size(),
        expected = want,
        "the pinned config, verdict table and reported-sources cache were left by an older gatekeeper; made anew (verdicts are written back from the database)"
    );
    Ok(())
}

/// Refuses to adopt pinned maps whose layout differs from this build's;
/// returns the verdict table's buckets and the ingress trie's nodes (the
/// pinned sizes, if any).
pub(crate) fn check_pinned_maps(layout: &PinLayout, max_verdicts: u32, max_range_nodes: u32) -> Result<(u32, u32)> {
    for (name, path) in layout.stale_maps()? {
        warn!(
            map = %path.display(),
            "map {name} was left by an older gatekeeper and is no longer used; `gatekeeper unload` removes it"
        );
    }
    let mut buckets = verdict_buckets(max_verdicts);
    let mut range_nodes = max_range_nodes;
    renew_derived_maps(layout)?;
    for name in names::ALL {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| Error::bpf(format!("inspect {}", path.display()), e))?;
        if let Some((k, v)) = expected_sizes(name) {
            if info.key_size() != k || info.value_size() != v {
                return Err(Error::bpf_msg(format!(
                    "pinned map {} has key/value size {}/{}, this gatekeeper expects {k}/{v}; it was left by an incompatible version: run `gatekeeper unload --pin-dir {}` first",
                    path.display(), info.key_size(), info.value_size(), layout.root.display()
                )));
            }
        }
        if name == names::VERDICTS && info.max_entries() != buckets {
            warn!(
                pinned_buckets = info.max_entries(),
                configured_buckets = buckets,
                max_verdicts,
                "max_verdicts differs from the pinned verdict table; keeping the pinned size (run `gatekeeper unload` to resize)"
            );
            buckets = info.max_entries();
        }
        if name == names::RANGES && info.max_entries() != max_range_nodes {
            warn!(
                pinned = info.max_entries(),
                configured = max_range_nodes,
                "max_range_nodes differs from the pinned range table; keeping the pinned size (run `gatekeeper unload` to resize)"
            );
            range_nodes = info.max_entries();
        }
    }
    Ok((buckets, range_nodes))
}
