//! `gatekeeper-bench flood`: a spoofed SYN flood against the ingress gate,
//! xdp-filter and an nftables `inet` set, one after the other, on the same
//! traffic (see the README's Benchmarks section).
//!
//! Two namespaces joined by one veth pair: `gen` (the generator and a real
//! sender, 192.0.2.25) and `gate` (the contender on its veth in native XDP
//! mode, a listener on 192.0.2.1:25, nsd). The generator sends from gen
//! with `sendmmsg` on an AF_PACKET socket, rewriting each frame's source
//! (see [`flood_source`]): SYNs to port 25 of a non-local address (what a
//! contender passes, the stack discards), 20 % IPv4 and 80 % IPv6, sources
//! among 2^20 (IPv4: the 512 addresses of 198.51.100.0/24 and
//! 203.0.113.0/24; IPv6: 2001:db8:8000::/44, and one frame in 16 from
//! 2001:db8:4000::/44, which no deny list covers). (A generator of live
//! XDP frames, BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, is what
//! xdp-trafficgen does; this VM's kernel answers EPERM to that flag even
//! for a two-instruction program, so the bench sends from user space.) The
//! flood thread is pinned to CPU 1; the gate's veth receive runs in the
//! softirq of the CPU that transmitted, so generator and contender share
//! that one core: "dropped per second" is what one core does generating
//! and gating together, the same for every contender.
//!
//! Deny lists (100,000 entries each): gatekeeper and nftables get the same
//! prefixes (198.51.100.0/24, 203.0.113.0/24, 2001:db8:8000::/33 and 99,997
//! random ones outside the TEST-NETs); xdp-filter matches exact addresses
//! only, in hash maps of at most 10,000 entries per family, so it gets the
//! 512 IPv4 flood sources, 9,488 random IPv4 addresses and the first 10,000
//! IPv6 flood sources.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuHashMap, PerCpuValues},
    programs::{xdp::XdpMode, Xdp},
    Ebpf,
};
use gatekeeper_common::{programs, SourceKey};
use gatekeeper_tests::{
    agentlab::Instance,
    dnslab::{self, NsdServer, Zone},
    netlab::{self, in_netns, tcp_connect, ConnectOutcome, Netns, TcpListenerGuard},
    packet::{tcp_flags, Packet},
    rng::Rng,
    testrun,
};
use serde_json::{json, Value};

const GEN_IF: &str = "gkfgen";
const GATE_IF: &str = "gkfgate";
const SERVER: &str = "192.0.2.1";
const SENDER: &str = "192.0.2.25";
const SENDER_NAME: &str = "mail.example.org";
const FLOOD_DST4: &str = "192.0.2.200";
const FLOOD_DST6: &str = "2001:db8::200";
const DNS_RATE: u64 = 200;
const HOLD_TIME: &str = "3s";
const DENY: usize = 100_000;
const XDP_FILTER_MAX: usize = 10_000;
const XDP_FILTER_PINS: &str = "/sys/fs/bpf/xdp-filter";
/// Frames per `sendmmsg`.
const BATCH: u32 = 256;
/// The real sender starts this long after the flood.
const SENDER_DELAY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const GEN_CPU: usize = 1;

fn usage() -> ! {
    eprintln!("usage: gatekeeper-bench flood [--frames N] [--seconds S] [--json PATH]");
    std::process::exit(2)
}

pub fn run(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut frames: u64 = 40_000_000;
    let mut seconds: u64 = 15;
    let mut json_path = PathBuf::from("target/bench/flood.json");
    while let Some(a) = args.next() {
        let mut number =
            || args.next().and_then(|v| v.parse::<u64>().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage());
        match a.as_str() {
            "--frames" => frames = number(),
            "--seconds" => seconds = number().min(120),
            "--json" => json_path = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    netlab::require_root();
    dnslab::require_nsd();
    for tool in ["/usr/sbin/xdp-filter", "/usr/sbin/nft"] {
        ensure!(Path::new(tool).exists(), "{tool} is missing: run `cargo xtask setup`");
    }
    let limits = Limits { frames, time: Duration::from_secs(seconds) };
    let mut lab = Lab::new()?;
    let mut rng = Rng(0x0066_6c6f_6f64);
    let deny = deny_list(&mut rng);

    eprintln!("flood: gatekeeper");
    let gk = lab.gatekeeper(&deny, limits)?;
    eprintln!("flood: xdp-filter");
    let xf = lab.xdp_filter(&mut rng, limits)?;
    eprintln!("flood: nftables");
    let nf = lab.nftables(&deny, limits)?;

    print_table(&gk, &xf, &nf);
    let out = json!({
        "frames_cap": frames,
        "seconds_cap": seconds,
        "deny_entries": DENY,
        "dns_rate": DNS_RATE,
        "hold_time": HOLD_TIME,
        "generator_cpu": GEN_CPU,
        "contenders": { "gatekeeper": gk.json(), "xdp-filter": xf.json(), "nftables": nf.json() },
    });
    if let Some(dir) = json_path.parent() {
        fs::create_dir_all(dir).ok();
    }
    fs::write(&json_path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    ensure!(gk.dns_ok(), "DNS queries went over dns_rate: {} in {:.1} s", gk.dns_queries.unwrap_or(0), gk.flood.secs);
    Ok(())
}

#[derive(Clone, Copy)]
struct Limits {
    frames: u64,
    time: Duration,
}

/// What one flood sent.
#[derive(Clone, Copy, Default)]
struct Sent {
    frames: u64,
    secs: f64,
}

#[derive(Default)]
struct Result1 {
    flood: Sent,
    dropped: u64,
    rss_kib: Option<[u64; 3]>,
    dns_queries: Option<u64>,
    verdict_s: Option<f64>,
    connect_s: Option<f64>,
    connect: Option<String>,
    note: &'static str,
}

impl Result1 {
    fn pps(&self) -> f64 {
        self.dropped as f64 / self.flood.secs.max(1e-9)
    }
    fn dns_rate(&self) -> Option<f64> {
        self.dns_queries.map(|q| q as f64 / self.flood.secs.max(1e-9))
    }
    /// At most `dns_rate` per second over the flood, plus one second's
    /// burst of the token bucket.
    fn dns_ok(&self) -> bool {
        self.dns_queries.is_none_or(|q| q as f64 <= DNS_RATE as f64 * (self.flood.secs + 1.0))
    }
    fn json(&self) -> Value {
        json!({
            "frames_sent": self.flood.frames,
            "seconds": self.flood.secs,
            "sent_per_s": self.flood.frames as f64 / self.flood.secs.max(1e-9),
            "dropped": self.dropped,
            "dropped_per_s": self.pps(),
            "dropped_share": self.dropped as f64 / self.flood.frames.max(1) as f64,
            "rss_kib": self.rss_kib.map(|[b, d, a]| json!({ "before": b, "peak_during": d, "after": a })),
            "dns_queries": self.dns_queries,
            "dns_queries_per_s": self.dns_rate(),
            "sender_time_to_verdict_s": self.verdict_s,
            "sender_time_to_connect_s": self.connect_s,
            "sender_connect": self.connect,
            "note": self.note,
        })
    }
}

// ----------------------------------------------------------------- the lab

/// gen -- gate. Drops in order: listener, the gatekeeper instance (agent,
/// pins, files, the gate namespace), nsd's guard lives in the runs, gen.
struct Lab {
    _listener: TcpListenerGuard,
    gk: Instance,
    gen: Netns,
    bpf: Ebpf,
    templates: [Vec<u8>; 2],
}

impl Lab {
    fn new() -> Result<Lab> {
        let (gate, gen) = netlab::joined(
            ("fgate", GATE_IF, &["192.0.2.1/24", "2001:db8::1/64"]),
            ("fgen", GEN_IF, &["192.0.2.25/24", "2001:db8::25/64"]),
        )?;
        let listener = TcpListenerGuard::spawn(&gate, SocketAddr::new(ip(SERVER), 25))?;
        let dst_mac = gate.mac(GATE_IF)?;
        let src_mac = gen.mac(GEN_IF)?;
        let template = |src: IpAddr, dst: &str| {
            let mut p = match (src, ip(dst)) {
                (IpAddr::V4(s), IpAddr::V4(d)) => Packet::tcp_v4(s, d, 40_000, 25, tcp_flags::SYN),
                (IpAddr::V6(s), IpAddr::V6(d)) => Packet::tcp_v6(s, d, 40_000, 25, tcp_flags::SYN),
                _ => unreachable!(),
            };
            p.dst_mac = dst_mac;
            p.src_mac = src_mac;
            p.build()
        };
        let templates = [
            template(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)), FLOOD_DST4),
            template(ip("2001:db8:8000::1"), FLOOD_DST6),
        ];
        let bpf =
            testrun::load(gatekeeper_common::sourcetab::verdict_buckets(1024), |_| {}, &[programs::XDP_BASELINE])?;
        let gk = Instance::new(gate, Some(GATE_IF), "gk-flood-", "");
        Ok(Lab { _listener: listener, gk, gen, bpf, templates })
    }

    fn gate(&self) -> &Netns {
        &self.gk.ns
    }

    /// Sends the flood from gen (pinned to [`GEN_CPU`]) until `limits`;
    /// meanwhile runs `during` on this thread.
    fn flood<T: Send>(&self, limits: Limits, during: impl FnOnce() -> T) -> Result<(Sent, T)> {
        let ifindex = self.gen.if_index(GEN_IF)?;
        std::thread::scope(|s| {
            let gen = s.spawn(|| in_netns(&self.gen, || self.send(ifindex, limits)));
            let t = during();
            let sent = gen.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
            Ok((sent, t))
        })
    }

    /// The generator: frames from [`Lab::templates`] with the source of
    /// each rewritten (see [`flood_source`]; the IPv4 header checksum is
    /// fixed, as the stack checks it before netfilter), sent in batches of
    /// [`BATCH`] by `sendmmsg` on an AF_PACKET socket bound to the gen veth
    /// (bypassing the qdisc): veth hands each frame to the gate's veth,
    /// whose native XDP program sees it first.
    fn send(&self, ifindex: u32, limits: Limits) -> Result<Sent> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        pin_to_cpu(GEN_CPU);
        // SAFETY: plain libc calls on a descriptor this function owns; every
        // struct passed is fully initialized and outlives the call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        ensure!(fd >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_protocol = 0;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(r == 0, "bind(AF_PACKET, {GEN_IF}): {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        // PACKET_QDISC_BYPASS (20): straight to the driver, as a generator wants.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                20,
                &one as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            )
        };
        let width = self.templates.iter().map(Vec::len).max().unwrap_or(0);
        let mut bufs = vec![vec![0u8; width]; BATCH as usize];
        let mut lens = vec![0usize; BATCH as usize];
        let start = Instant::now();
        let (mut sent, mut idx) = (0u64, 0u64);
        while sent < limits.frames && start.elapsed() < limits.time {
            let n = (BATCH as u64).min(limits.frames - sent) as usize;
            for i in 0..n {
                let src = flood_source(idx);
                idx += 1;
                let t = &self.templates[usize::from(src.is_ipv6())];
                let b = &mut bufs[i];
                b[..t.len()].copy_from_slice(t);
                lens[i] = t.len();
                match src {
                    IpAddr::V4(a) => {
                        b[14 + 12..14 + 16].copy_from_slice(&a.octets());
                        b[14 + 10..14 + 12].fill(0);
                        let c = ipv4_checksum(&b[14..14 + 20]);
                        b[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
                    }
                    IpAddr::V6(a) => b[14 + 8..14 + 24].copy_from_slice(&a.octets()),
                }
            }
            let mut iov: Vec<libc::iovec> =
                (0..n).map(|i| libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: lens[i] }).collect();
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    // SAFETY: an all-zero msghdr is valid; the iovec lives on.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_iov = v;
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            // SAFETY: msgs and the buffers they point to live across the call.
            let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                // A full device queue: try again.
                if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                bail!("sendmmsg on {GEN_IF}: {e}");
            }
            sent += r as u64;
        }
        Ok(Sent { frames: sent, secs: start.elapsed().as_secs_f64() })
    }

    // ------------------------------------------------------- gatekeeper

    fn gatekeeper(&mut self, deny: &[String], limits: Limits) -> Result<Result1> {
        let nsd = NsdServer::start_in(self.gate(), &zones())?;
        let dns = nsd.addr();
        self.gk.write_config(&format!(
            "log_level = \"warn\"\nmax_range_nodes = 131072\n\
             [policy]\nfirst_syn = \"hold\"\nhold_time = \"{HOLD_TIME}\"\n\
             [limits]\ndns_rate = {DNS_RATE}\n\
             [dns]\nservers = [\"{dns}\"]\ntimeout = \"2s\"\nattempts = 1\n"
        ));
        self.gk.start(&[]);
        let r = self.gatekeeper_flood(deny, limits, dns.port());
        self.gk.kill_agent();
        self.gk.ok(&["unload"]);
        drop(nsd);
        r
    }

    fn gatekeeper_flood(&self, deny: &[String], limits: Limits, dns_port: u16) -> Result<Result1> {
        let me = &self.gk;
        {
            let list = me.path("deny.txt");
            fs::write(&list, deny.join("\n") + "\n")?;
            let t = Instant::now();
            me.ok(&["range", "import", &list]);
            eprintln!("flood: imported {} deny ranges in {:.1} s", deny.len(), t.elapsed().as_secs_f64());
            let pid = me.agent.as_ref().context("agent")?.pid();
            let _dnsctr = DnsCounter::new(self.gate(), dns_port)?;
            std::thread::sleep(Duration::from_secs(1));
            let rss_before = rss_kib(pid)?;
            let s0 = drops_gk(&me.stats().v);
            let q0 = _dnsctr.queries()?;
            let key = SourceKey::from_ip(ip(SENDER)).display();
            let (sent, (peak, verdict_s, connect)) = self.flood(limits, || {
                let t0 = Instant::now();
                let mut peak = rss_before;
                std::thread::scope(|s| {
                    let mut sender = None;
                    let mut verdict_s = None;
                    while t0.elapsed() < limits.time + Duration::from_secs(5) {
                        peak = peak.max(rss_kib(pid).unwrap_or(0));
                        if sender.is_none() && t0.elapsed() >= SENDER_DELAY {
                            sender = Some((
                                Instant::now(),
                                s.spawn(|| {
                                    let t = Instant::now();
                                    let o = tcp_connect(&self.gen, ip(SENDER), srv(), CONNECT_TIMEOUT);
                                    (o, t.elapsed().as_secs_f64())
                                }),
                            ));
                        }
                        if let Some((at, _)) = &sender {
                            if verdict_s.is_none() && has_verdict(me, &key) {
                                verdict_s = Some(at.elapsed().as_secs_f64());
                            }
                        }
                        let done = sender.as_ref().is_some_and(|(_, h)| h.is_finished()) && verdict_s.is_some();
                        if done && t0.elapsed() >= Duration::from_secs(3) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let connect = sender.map(|(_, h)| h.join().expect("sender thread"));
                    (peak, verdict_s, connect)
                })
            })?;
            let dropped = drops_gk(&me.stats().v) - s0;
            let queries = _dnsctr.queries()? - q0;
            std::thread::sleep(Duration::from_secs(2));
            let rss_after = rss_kib(pid)?;
            let (o, secs) = connect.unwrap_or((ConnectOutcome::Other("not started".into()), 0.0));
            Ok(Result1 {
                flood: sent,
                dropped,
                rss_kib: Some([rss_before, peak, rss_after]),
                dns_queries: Some(queries),
                verdict_s,
                connect_s: (o == ConnectOutcome::Connected).then_some(secs),
                connect: Some(format!("{o:?}")),
                note: "first_syn = hold: deny-range hits and held unknown sources are dropped",
            })
        }
    }

    // ------------------------------------------------------- xdp-filter

    fn xdp_filter(&self, rng: &mut Rng, limits: Limits) -> Result<Result1> {
        let _guard = XdpFilter::load(self.gate())?;
        // The first entry through the CLI; its value (flags) is copied into
        // the maps for the rest.
        xdp_filter(self.gate(), &["ip", "198.51.100.2", "--mode", "src"])?;
        let mut v4: PerCpuHashMap<MapData, [u8; 4], u64> = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(
            MapData::from_pin(Path::new(XDP_FILTER_PINS).join("filter_ipv4"))?,
        ))?;
        let value = v4.get(&[198, 51, 100, 2], 0)?;
        let flags = value.iter().copied().max().unwrap_or(0);
        let ncpu = value.len();
        let val = || PerCpuValues::try_from(vec![flags; ncpu]).expect("per-cpu values");
        let mut n4 = BTreeSet::new();
        for net in [[198u8, 51, 100], [203, 0, 113]] {
            for last in 2..=255u8 {
                n4.insert([net[0], net[1], net[2], last]);
            }
            n4.insert([net[0], net[1], net[2], 0]);
            n4.insert([net[0], net[1], net[2], 1]);
        }
        while n4.len() < XDP_FILTER_MAX {
            let a = (rng.next() as u32).to_be_bytes();
            if a[0] != 0 && a[0] < 224 && !netlab::is_test_addr(IpAddr::V4(Ipv4Addr::from(a))) {
                n4.insert(a);
            }
        }
        for a in &n4 {
            v4.insert(a, val(), 0)?;
        }
        let mut v6: PerCpuHashMap<MapData, [u8; 16], u64> = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(
            MapData::from_pin(Path::new(XDP_FILTER_PINS).join("filter_ipv6"))?,
        ))?;
        for idx in 0..XDP_FILTER_MAX as u32 {
            v6.insert(flood_v6(idx).octets(), val(), 0)?;
        }
        let d0 = xdp_filter_drops(self.gate())?;
        let (sent, ()) = self.flood(limits, || ())?;
        let dropped = xdp_filter_drops(self.gate())? - d0;
        Ok(Result1 {
            flood: sent,
            dropped,
            note: "exact source addresses only, at most 10,000 per family (its map size)",
            ..Result1::default()
        })
    }

    // ------------------------------------------------------- nftables

    fn nftables(&mut self, deny: &[String], limits: Limits) -> Result<Result1> {
        // A veth only takes XDP_TX'd frames when its peer runs XDP: the
        // pass-only baseline, in native mode (gone with the namespace if
        // this panics).
        let prog: &mut Xdp = self.bpf.program_mut(programs::XDP_BASELINE).context("baseline")?.try_into()?;
        let link = in_netns(&self.gk.ns, || prog.attach(GATE_IF, XdpMode::Driver))?;
        let r = self.nftables_flood(deny, limits);
        let prog: &mut Xdp = self.bpf.program_mut(programs::XDP_BASELINE).context("baseline")?.try_into()?;
        prog.detach(link)?;
        r
    }

    fn nftables_flood(&self, deny: &[String], limits: Limits) -> Result<Result1> {
        let (v4, v6): (Vec<&String>, Vec<&String>) = deny.iter().partition(|n| !n.contains(':'));
        let join = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",\n");
        let rules = format!(
            "table inet gkflood {{\n\
             set deny4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}\n\
             set deny6 {{ type ipv6_addr; flags interval; auto-merge; elements = {{ {} }} }}\n\
             chain pre {{ type filter hook prerouting priority -300; policy accept;\n\
             tcp dport 25 ip saddr @deny4 counter drop\n\
             tcp dport 25 ip6 saddr @deny6 counter drop\n }}\n}}\n",
            join(&v4),
            join(&v6)
        );
        let file = self.gk.path("nft.rules");
        fs::write(&file, rules)?;
        let _table = NftTable::load(self.gate(), &file, "gkflood")?;
        let d0 = nft_counters(self.gate(), "gkflood", "pre")?;
        let (sent, ()) = self.flood(limits, || ())?;
        let dropped = nft_counters(self.gate(), "gkflood", "pre")? - d0;
        Ok(Result1 {
            flood: sent,
            dropped,
            note: "prerouting at priority -300 (before conntrack); the baseline XDP pass program on the veth",
            ..Result1::default()
        })
    }
}

/// xdp-filter loaded on the gate's veth; unloaded on drop, and the bpffs
/// directories it (libxdp) made are removed when empty.
struct XdpFilter<'a>(&'a Netns, Vec<PathBuf>);

/// Where xdp-filter and libxdp's dispatcher pin.
const XDP_PIN_DIRS: [&str; 2] = [XDP_FILTER_PINS, "/sys/fs/bpf/xdp"];

impl<'a> XdpFilter<'a> {
    fn load(ns: &'a Netns) -> Result<Self> {
        let made = XDP_PIN_DIRS.iter().map(PathBuf::from).filter(|d| !d.exists()).collect();
        let guard = XdpFilter(ns, made);
        xdp_filter(ns, &["load", GATE_IF, "--mode", "native", "--features", "tcp,ipv4,ipv6"])?;
        Ok(guard)
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        let _ = xdp_filter(self.0, &["unload", GATE_IF]);
        for d in &self.1 {
            // Only when empty: anything else there is not ours to remove.
            let _ = fs::remove_dir(d);
        }
    }
}

/// An nftables table in a namespace; deleted on drop.
struct NftTable<'a>(&'a Netns, &'static str);

impl<'a> NftTable<'a> {
    fn load(ns: &'a Netns, file: &str, name: &'static str) -> Result<Self> {
        ns.run_timeout(&["nft", "-f", file], Duration::from_secs(300))?;
        Ok(NftTable(ns, name))
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["nft", "delete", "table", "inet", self.1]);
    }
}

/// Counts the agent's DNS queries to nsd (UDP and TCP to its port, on the
/// output hook of the gate namespace).
struct DnsCounter<'a>(NftTable<'a>);

impl<'a> DnsCounter<'a> {
    fn new(ns: &'a Netns, port: u16) -> Result<Self> {
        let file = std::env::temp_dir().join(format!("gk-flood-dns-{}.nft", std::process::id()));
        fs::write(
            &file,
            format!(
                "table inet gkflooddns {{ chain out {{ type filter hook output priority 0; policy accept;\n\
                 udp dport {port} counter\n tcp dport {port} tcp flags & (syn|ack) == syn counter\n }}\n}}\n"
            ),
        )?;
        let t = NftTable::load(ns, &file.display().to_string(), "gkflooddns");
        let _ = fs::remove_file(&file);
        Ok(DnsCounter(t?))
    }

    fn queries(&self) -> Result<u64> {
        nft_counters(self.0 .0, "gkflooddns", "out")
    }
}

/// Sum of the packet counters of a chain.
fn nft_counters(ns: &Netns, table: &str, chain: &str) -> Result<u64> {
    let out = ns.run(&["nft", "list", "chain", "inet", table, chain])?;
    let mut sum = 0;
    let words: Vec<&str> = out.split_whitespace().collect();
    for w in words.windows(3) {
        if w[0] == "counter" && w[1] == "packets" {
            sum += w[2].parse::<u64>().context("nft counter")?;
        }
    }
    Ok(sum)
}

/// Runs xdp-filter in `ns` through nsenter (which keeps bpffs in view,
/// where it pins its maps); its stdout.
fn xdp_filter(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = netlab::nsenter_output(ns, Path::new("/usr/sbin/xdp-filter"), args, Duration::from_secs(60))?;
    ensure!(out.success(), "xdp-filter {args:?} failed: {out}");
    Ok(out.stdout)
}

/// XDP_DROP packets from `xdp-filter status`.
fn xdp_filter_drops(ns: &Netns) -> Result<u64> {
    let out = xdp_filter(ns, &["status"])?;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() == Some(&"XDP_DROP") {
            return w.get(1).context("xdp-filter status")?.parse().context("xdp-filter XDP_DROP");
        }
    }
    bail!("no XDP_DROP line in xdp-filter status:\n{out}")
}

/// Every drop counter of the ingress gate (all but the passes and the
/// bookkeeping ones).
fn drops_gk(stats: &Value) -> u64 {
    const NOT_DROPS: [&str; 6] =
        ["allowed", "unknown", "dry-run-would-drop", "parse-skipped", "event-lost", "verdict-pass"];
    stats["totals"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| !NOT_DROPS.contains(&k.as_str())).filter_map(|(_, v)| v.as_u64()).sum())
        .unwrap_or(0)
}

fn has_verdict(gk: &Instance, key: &str) -> bool {
    let out = gk.cli(&["verdict", "list", "--json"]);
    out.success()
        && serde_json::from_str::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.iter().any(|r| r["key"] == key)))
            .unwrap_or(false)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t, filled with CPU_SET, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn srv() -> SocketAddr {
    SocketAddr::new(ip(SERVER), 25)
}

/// The IPv6 flood source of index `idx` in the covered /33.
fn flood_v6(idx: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x8000 | (idx >> 16) as u16, idx as u16, 0, 0, 0, 1)
}

/// The source of the flood's frame `i`: one in five IPv4 (the 512
/// addresses of 198.51.100.0/24 and 203.0.113.0/24), the others IPv6 among
/// 2^20 addresses of 2001:db8:8000::/44, one in sixteen of those from
/// 2001:db8:4000::/44, which no deny list covers (unknown sources: they
/// load the lookup queue and DNS). Scrambled, so consecutive frames come
/// from unrelated sources.
fn flood_source(i: u64) -> IpAddr {
    let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ i;
    let idx = (r >> 8) as u32 & 0xf_ffff;
    if r.is_multiple_of(5) {
        let net = if idx & 0x100 == 0 { [198, 51, 100] } else { [203, 0, 113] };
        return IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], idx as u8));
    }
    let hi = if (r >> 40).is_multiple_of(16) { 0x4000 } else { 0x8000 };
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, hi | (idx >> 16) as u16, idx as u16, 0, 0, 0, 1))
}

/// The IPv4 header checksum of `h` (its checksum field zeroed).
fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The real sender's zones: a PTR and a matching A record.
fn zones() -> Vec<Zone> {
    vec![
        Zone::reverse_v4("192.0.2.0/24", &[(ip(SENDER), SENDER_NAME)]),
        Zone::reverse_v6("2001:db8::/32", &[]),
        Zone::forward("example.org", &[(SENDER_NAME, ip(SENDER))]),
    ]
}

/// 100,000 deny prefixes: the three covering the flood's denied sources
/// and random ones outside the TEST-NETs (90 % IPv4).
fn deny_list(rng: &mut Rng) -> Vec<String> {
    let mut out: Vec<String> = vec!["198.51.100.0/24".into(), "203.0.113.0/24".into(), "2001:db8:8000::/33".into()];
    let v6 = DENY / 10;
    let v4 = DENY - v6 - out.len();
    for (net, len) in crate::random_v4_ranges(rng, v4) {
        out.push(format!("{}/{len}", Ipv4Addr::from(net)));
    }
    for (net, len) in crate::random_v6_ranges(rng, v6) {
        out.push(format!("{}/{len}", Ipv6Addr::from(net)));
    }
    out
}

// ------------------------------------------------------------------ output

fn print_table(gk: &Result1, xf: &Result1, nf: &Result1) {
    let all = [gk, xf, nf];
    let row = |name: &str, f: &dyn Fn(&Result1) -> String| {
        print!("{name:<36}");
        for r in all {
            print!(" {:>18}", f(r));
        }
        println!();
    };
    let mpps = |v: f64| format!("{:.2} M", v / 1e6);
    let opt = |v: Option<f64>, unit: &str| v.map(|v| format!("{v:.2}{unit}")).unwrap_or_else(|| "-".into());
    println!();
    row("", &|r| {
        ["gatekeeper", "xdp-filter", "nftables"][all.iter().position(|x| std::ptr::eq(*x, r)).unwrap()].into()
    });
    row("frames sent (per s)", &|r| mpps(r.flood.frames as f64 / r.flood.secs.max(1e-9)));
    row("dropped per s (one core)", &|r| mpps(r.pps()));
    row("dropped share of the flood", &|r| format!("{:.1} %", 100.0 * r.dropped as f64 / r.flood.frames.max(1) as f64));
    let rss = |i: usize| {
        move |r: &Result1| r.rss_kib.map(|v| format!("{:.1} MiB", v[i] as f64 / 1024.0)).unwrap_or("-".into())
    };
    row("agent RSS before", &rss(0));
    row("agent RSS during (peak)", &rss(1));
    row("agent RSS after", &rss(2));
    row(&format!("DNS queries per s (dns_rate {DNS_RATE})"), &|r| opt(r.dns_rate(), ""));
    row("real sender: time to verdict", &|r| opt(r.verdict_s, " s"));
    row("real sender: time to connect", &|r| opt(r.connect_s, " s"));
    println!();
    for (name, r) in [("gatekeeper", gk), ("xdp-filter", xf), ("nftables", nf)] {
        println!("{name}: {}", r.note);
    }
}
