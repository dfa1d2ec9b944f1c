//! BPF_PROG_TEST_RUN harness for the in-kernel tests and the benchmarks:
//! loads the gatekeeper object unpinned with the programs a caller needs,
//! runs frames through its XDP and TC programs and socket lookups through
//! its sk_lookup programs, and reads the counters and range hits they leave
//! in the per-CPU maps.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::PerCpuArray,
    programs::{Program, ProgramError, TestRun, TestRunOptions, TestRunResult},
    Ebpf, EbpfLoader,
};
use gatekeeper::datapath::load_object;
use gatekeeper_common::{maps, programs, StatKey};

/// The hash secret tests write into the config of the instances they load
/// (the agent makes a random one; tests need to know which sources share a
/// bucket pair).
pub const HASH: gatekeeper_common::sourcetab::HashKey =
    gatekeeper_common::sourcetab::HashKey { m1: 0x9e37_79b9_7f4a_7c15, m2: 0xc2b2_ae3d_27d4_eb4f };

/// The verdict buckets of `key` in a table of `buckets` buckets placed
/// with [`HASH`], and its reported-sources slot.
pub fn slots_of(key: &gatekeeper_common::KeyWords, buckets: u32) -> gatekeeper_common::sourcetab::Slots {
    use gatekeeper_common::sourcetab::{seen_slot, source_slots, verdict_shift};
    let at = source_slots(&key.bucket_key(), &HASH, verdict_shift(buckets));
    gatekeeper_common::sourcetab::Slots { seen: seen_slot(key, &HASH), ..at }
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// TC_ACT_UNSPEC (-1) as the test run reports it.
pub const TC_UNSPEC: u32 = u32::MAX;
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;

/// What a gate program does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Drop,
    /// Answer with a RST|ACK: XDP_TX, or TC redirect to the ingress.
    Reject,
}

/// Where an egress gate program runs. (The order is part of the tests'
/// random seeds: `hook as u64`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `gatekeeper_subscriber`: XDP on a subscriber-facing interface.
    Xdp,
    /// `gatekeeper_egress`: TC on an uplink's egress.
    Tc,
}

impl Hook {
    /// The egress gate's program for this hook.
    pub fn egress_program(self) -> &'static str {
        match self {
            Hook::Xdp => programs::XDP_SUBSCRIBER,
            Hook::Tc => programs::TC_EGRESS,
        }
    }

    /// The pass-only program of this hook (the benchmarks' baseline).
    pub fn baseline(self) -> &'static str {
        match self {
            Hook::Xdp => programs::XDP_BASELINE,
            Hook::Tc => programs::TC_BASELINE,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }

    /// The return code that means `outcome` here.
    pub fn code(self, outcome: Outcome) -> u32 {
        match (self, outcome) {
            (Hook::Xdp, Outcome::Pass) => XDP_PASS,
            (Hook::Xdp, Outcome::Drop) => XDP_DROP,
            (Hook::Xdp, Outcome::Reject) => XDP_TX,
            (Hook::Tc, Outcome::Pass) => TC_UNSPEC,
            (Hook::Tc, Outcome::Drop) => TC_SHOT,
            (Hook::Tc, Outcome::Reject) => TC_REDIRECT,
        }
    }

    /// What a return code means here (None: none a gate returns).
    pub fn outcome(self, code: u32) -> Option<Outcome> {
        [Outcome::Pass, Outcome::Drop, Outcome::Reject].into_iter().find(|&o| self.code(o) == code)
    }
}

/// The kernel's skb test run refuses (EINVAL, before any program runs) a
/// frame whose ethertype is IPv4 (IPv6) without a whole IPv4 (IPv6) header
/// after it. Such a frame never reaches a TC program as an skb either, so
/// there is nothing to test; the XDP programs still get them.
pub fn skb_refuses(frame: &[u8]) -> bool {
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    (et == 0x0800 && frame.len() < 14 + 20) || (et == 0x86dd && frame.len() < 14 + 40)
}

/// Panics unless running as root; `what` names the test file.
pub fn require_root(what: &str) {
    assert!(
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() } == 0,
        "{what} loads eBPF programs and needs root (CAP_BPF, CAP_NET_ADMIN); \
         run it through `cargo xtask test` or with sudo"
    );
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock verdict expiry is measured on.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The loopback's interface index.
pub fn loopback() -> u32 {
    // SAFETY: a NUL-terminated interface name.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert_ne!(lo, 0, "no lo");
    lo
}

/// Loads the gatekeeper object unpinned with a verdict table of
/// `verdict_buckets` buckets (`setup` may change other map sizes), then
/// loads (verifies) each of `progs`, XDP or TC.
pub fn load(verdict_buckets: u32, setup: impl FnOnce(&mut EbpfLoader<'_>), progs: &[&str]) -> Result<Ebpf> {
    let mut bpf = load_object(verdict_buckets, setup).context("loading the gatekeeper object")?;
    for &name in progs {
        match bpf.program_mut(name).with_context(|| format!("program {name}"))? {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            Program::SkLookup(p) => p.load(),
            _ => bail!("{name} is neither an XDP, a TC nor an sk_lookup program"),
        }
        .with_context(|| format!("the verifier refuses {name}"))?;
    }
    Ok(bpf)
}

/// Runs `frame` `repeat` times through program `prog` (XDP or TC). An XDP
/// program gets an `xdp_md` context naming `ifindex` as its ingress
/// interface if one is given (without, the kernel uses its loopback's rx
/// queue); a TC program gets no context (the test skb sits on the
/// loopback). With `out`, the frame as the program left it is written there
/// (`data_size_out` long). For `repeat > 1` the duration is the kernel's
/// integer mean per run.
pub fn test_run(
    bpf: &Ebpf,
    prog: &str,
    frame: &[u8],
    ifindex: Option<u32>,
    repeat: u32,
    out: Option<&mut [u8]>,
) -> Result<TestRunResult, ProgramError> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: data_end must equal the size.
    let ctx: Option<Vec<u8>> =
        ifindex.map(|i| [0, frame.len() as u32, 0, i, 0, 0].iter().flat_map(|w: &u32| w.to_ne_bytes()).collect());
    let opts = TestRunOptions { data_in: Some(frame), data_out: out, repeat, ..TestRunOptions::new() };
    match bpf.program(prog).unwrap_or_else(|| panic!("no program {prog}")) {
        Program::Xdp(p) => p.test_run(TestRunOptions { ctx_in: ctx.as_deref(), ..opts }),
        Program::SchedClassifier(p) => p.test_run(opts),
        _ => panic!("{prog} is neither an XDP nor a TC program"),
    }
}

/// Every nonzero slot of the per-CPU counter map `map` (STATS or
/// EG_STATS), summed over CPUs.
pub fn stat_totals(bpf: &Ebpf, map: &str) -> Result<BTreeMap<StatKey, u64>> {
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(bpf.map(map).with_context(|| format!("map {map}"))?)?;
    let mut out = BTreeMap::new();
    for (i, v) in stats.iter().enumerate() {
        let total = v?.iter().sum::<u64>();
        if total > 0 {
            out.insert(StatKey::from_index(i as u32), total);
        }
    }
    Ok(out)
}

/// The hits of range `range_id`, summed over CPUs.
pub fn range_hits(bpf: &Ebpf, range_id: u32) -> u64 {
    let hits: PerCpuArray<_, u64> = PerCpuArray::try_from(bpf.map(maps::RANGE_HITS).unwrap()).unwrap();
    hits.get(&range_id, 0).unwrap().iter().sum()
}

pub const SK_DROP: u32 = 0;
pub const SK_PASS: u32 = 1;

/// A socket lookup as the kernel hands it to an sk_lookup program.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub udp: bool,
}

impl Lookup {
    /// A TCP lookup from `src` (port 40000) to `dst`:`port`.
    pub fn tcp(src: &str, dst: &str, port: u16) -> Lookup {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        Lookup { src: (ip(src), 40000).into(), dst: (ip(dst), port).into(), udp: false }
    }
}

/// What an sk_lookup program did: its return value and the cookie of the
/// socket it selected (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkRun {
    pub retval: u32,
    pub cookie: u64,
    /// Mean ns per run (the kernel's integer mean for `repeat > 1`).
    pub duration_ns: u32,
}

/// Runs sk_lookup program `prog` `repeat` times on `lookup` through
/// BPF_PROG_TEST_RUN, which aya 0.14 does not offer for sk_lookup. The
/// context is a `struct bpf_sk_lookup`; the kernel wants every byte after
/// `local_port` zero (so no ingress interface).
pub fn sk_lookup_run(bpf: &Ebpf, prog: &str, lookup: &Lookup, repeat: u32) -> std::io::Result<SkRun> {
    use std::net::IpAddr;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let Some(Program::SkLookup(p)) = bpf.program(prog) else { panic!("{prog} is not an sk_lookup program") };
    let fd = p.fd().map_err(std::io::Error::other)?.as_fd().as_raw_fd();
    // struct bpf_sk_lookup (72 bytes).
    let mut ctx = [0u8; 72];
    let put = |ctx: &mut [u8; 72], at: usize, b: &[u8]| ctx[at..at + b.len()].copy_from_slice(b);
    let family: u32 = if lookup.src.is_ipv6() { 10 } else { 2 };
    put(&mut ctx, 8, &family.to_ne_bytes());
    put(&mut ctx, 12, &(if lookup.udp { 17u32 } else { 6u32 }).to_ne_bytes());
    match (lookup.src.ip(), lookup.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put(&mut ctx, 16, &s.octets());
            put(&mut ctx, 40, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            put(&mut ctx, 20, &s.octets());
            put(&mut ctx, 44, &d.octets());
        }
        _ => panic!("mixed families in {lookup:?}"),
    }
    put(&mut ctx, 36, &lookup.src.port().to_be_bytes());
    put(&mut ctx, 60, &(lookup.dst.port() as u32).to_ne_bytes());
    let mut out = [0u8; 72];
    // The BPF_PROG_TEST_RUN part of union bpf_attr.
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        prog_fd: fd as u32,
        repeat,
        ctx_size_in: ctx.len() as u32,
        ctx_size_out: out.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ctx_out: out.as_mut_ptr() as u64,
        ..Attr::default()
    };
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: a bpf_attr the kernel reads and writes within its size; the
    // buffers outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr, size_of::<Attr>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cookie = u64::from_ne_bytes(out[..8].try_into().expect("8 bytes"));
    Ok(SkRun { retval: attr.retval, cookie, duration_ns: attr.duration })
}

/// A listening TCP socket for the rejector's sockmap (`GK_REJECTORS`) on
/// `addr` (the tests' are on loopback, port 0), and its socket cookie, which an sk_lookup
/// test run reports when the program selects it. An IPv6 address gets an
/// IPv6-only socket, as the agent's IPv6 slot holds; no SO_REUSEPORT, as
/// the kernel's test run refuses to report a reuseport socket. Keep it
/// open: a closed socket leaves the sockmap.
pub fn listener(addr: &str) -> std::io::Result<(std::net::TcpListener, u64)> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(16)?;
    let cookie = s.cookie()?;
    Ok((std::net::TcpListener::from(s), cookie))
}
