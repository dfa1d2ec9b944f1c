//! The pinned, fail-static datapath: loading, pinning, attaching (or
//! adopting what a previous agent left attached), map updates and counters.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/gatekeeper`):
//! `maps/<MAP>`, `prog_ingress`, `prog_subscriber`, `prog_egress`, and
//! `links/<mode>@<ifname>`: `native@`/`skb@` for the ingress gate,
//! `sub-native@`/`sub-skb@` for subscriber-facing XDP, `tcx@` for uplink
//! TC links, and an empty `clsact@` directory marking a netlink (clsact)
//! filter on kernels without tcx. Links and maps stay pinned when the agent
//! exits, so enforcement never stops with it; a new agent reuses the maps
//! and swaps its programs in atomically.
use std::{
    collections::{BTreeMap, HashMap as StdMap},
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        links::FdLink,
        links::PinnedLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use gatekeeper_common::{
    family, maps as names, port_policy, programs, range_flags, range_kind, sourcetab::verdict_buckets, trie::TrieNode,
    Config, RangeEntry, RangeValue, RateLimit, SeenSlot, SourceKey, StatKey, Verdict, VerdictBucket, EG_PORT_ENTRIES,
    MAX_LIMIT_CLASSES, PORT_WORDS, VERDICT_MASK_GLOBAL,
};
use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::{
    config::XdpModeSetting,
    store::{PoolAction, RangeKind, RangeRecord, RangeTable},
    trie::{MmapStore, Trie},
    verdict_table::VerdictTable,
    Error, Result,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// An aya error with its whole source chain (the errno is at the end).
pub(crate) fn bpf_err(what: impl std::fmt::Display, e: impl std::error::Error) -> Error {
    let mut msg = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Bpf(msg)
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Makes sure `pin_dir` is on a bpf filesystem, mounting bpffs at
/// `/sys/fs/bpf` when it is missing there (a fresh machine has none).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new(BPF_FS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        fs::create_dir_all(root).map_err(|e| Error::io(format!("create {BPF_FS_ROOT}"), e))?;
        nix::mount::mount(Some("bpffs"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| bpf_err(format!("mount bpffs at {BPF_FS_ROOT}"), e))?;
        info!("mounted bpffs at {BPF_FS_ROOT}");
    }
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(probe) {
        return Err(Error::Bpf(format!(
            "pin directory {} is not on a bpf filesystem (mount one with `mount -t bpf bpffs DIR`)",
            pin_dir.display()
        )));
    }
    Ok(())
}

/// An exclusive lock on a pin directory, held for an agent's lifetime: a
/// second agent for the same datapath is refused before it touches it.
pub struct PinLock(#[allow(dead_code)] fs::File);

impl PinLock {
    pub fn acquire(layout: &PinLayout) -> Result<PinLock> {
        ensure_bpffs(&layout.root)?;
        fs::create_dir_all(&layout.root).map_err(|e| Error::io(format!("create {}", layout.root.display()), e))?;
        let dir = fs::File::open(&layout.root).map_err(|e| Error::io(format!("open {}", layout.root.display()), e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&dir), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Bpf(format!(
                    "another gatekeeper agent is running on the datapath pinned at {}; nothing was changed (stop it first, or give this one its own --pin-dir and --socket)",
                    layout.root.display()
                )));
            }
            return Err(Error::io(format!("lock {}", layout.root.display()), err));
        }
        Ok(PinLock(dir))
    }
}

/// How a program is attached: XDP in native or skb mode, TC through a
/// tcx link or a clsact (netlink) filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Skb,
    Tcx,
    Clsact,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Skb => XdpMode::Skb,
            _ => XdpMode::Driver,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// What an attached interface does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The ingress gate (XDP): inbound SYNs to guarded ports.
    Ingress,
    /// Uplink (TC egress): the egress gate on forwarded and local traffic.
    Uplink,
    /// Subscriber-facing (XDP): the egress gate on subscribers' SYNs as
    /// they arrive.
    Subscriber,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingress => "ingress",
            Role::Uplink => "uplink",
            Role::Subscriber => "subscriber",
        }
    }
    fn program(self) -> &'static str {
        match self {
            Role::Ingress => programs::XDP_INGRESS,
            Role::Uplink => programs::TC_EGRESS,
            Role::Subscriber => programs::XDP_SUBSCRIBER,
        }
    }
    fn pin_prefix(self) -> &'static str {
        match self {
            Role::Ingress | Role::Uplink => "",
            Role::Subscriber => "sub-",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to attach the uplink TC program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcModeSetting {
    /// tcx where the kernel has it (6.6+), clsact otherwise.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

impl std::str::FromStr for TcModeSetting {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(TcModeSetting::Auto),
            "tcx" => Ok(TcModeSetting::Tcx),
            "clsact" => Ok(TcModeSetting::Clsact),
            _ => Err(format!("unknown TC mode {s:?} (expected auto, tcx or clsact)")),
        }
    }
}

/// Priority and handle of gatekeeper's clsact filter (fixed, so a
/// restarted agent can replace it in place).
const CLSACT_PRIORITY: u16 = 0xc0de;
const CLSACT_HANDLE: u16 = 0x25;

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pinned link (or clsact marker) found under `links/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkPin {
    pub ifname: String,
    pub role: Role,
    pub mode: AttachMode,
    #[serde(skip)]
    pub path: PathBuf,
}

/// Paths under the pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }
    pub fn program(&self, role: Role) -> PathBuf {
        self.root.join(match role {
            Role::Ingress => "prog_ingress",
            Role::Subscriber => "prog_subscriber",
            Role::Uplink => "prog_egress",
        })
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// `links/[sub-]<mode>@<ifname>`, with `%` and `.` in the name
    /// percent-encoded: bpffs refuses dots in pin names (and `eth0.100` has
    /// one).
    pub fn link(&self, role: Role, ifname: &str, mode: AttachMode) -> PathBuf {
        let name = ifname.replace('%', "%25").replace('.', "%2e");
        self.links_dir().join(format!("{}{mode}@{name}", role.pin_prefix()))
    }
    /// Whether a datapath is pinned here.
    pub fn is_loaded(&self) -> bool {
        self.map(names::CONFIG).exists()
    }
    /// The pinned links, sorted by interface name.
    pub fn links(&self) -> Result<Vec<LinkPin>> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((mode, ifname)) = name.split_once('@') else { continue };
            let ifname = ifname.replace("%2e", ".").replace("%25", "%");
            let (role, mode) = match mode {
                "native" => (Role::Ingress, AttachMode::Native),
                "skb" => (Role::Ingress, AttachMode::Skb),
                "sub-native" => (Role::Subscriber, AttachMode::Native),
                "sub-skb" => (Role::Subscriber, AttachMode::Skb),
                "tcx" => (Role::Uplink, AttachMode::Tcx),
                "clsact" => (Role::Uplink, AttachMode::Clsact),
                _ => continue,
            };
            out.push(LinkPin { ifname: ifname.to_string(), role, mode, path: entry.path() });
        }
        out.sort_by(|a, b| (a.role, &a.ifname).cmp(&(b.role, &b.ifname)));
        Ok(out)
    }

    /// Detaches everything and removes every pin. Returns what was removed.
    /// Map pins of ours (`GK_*`) that this build does not use: left by an
    /// older gatekeeper whose tables had other names.
    pub fn stale_maps(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.root.join("maps");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))? {
            let e = e.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("GK_") && !names::ALL.contains(&name.as_str()) {
                out.push((name, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn unload(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for link in self.links()? {
            let gone = link.mode != AttachMode::Clsact || ifindex(&link.ifname).is_some();
            remove_link(&link)?;
            removed.push(format!("link {} ({} {})", link.ifname, link.role, link.mode));
            if !gone {
                removed.push(format!(
                    "WARNING: interface {} is not in this network namespace: if it still exists elsewhere, remove its filter there with `tc filter del dev {} egress pref {CLSACT_PRIORITY} handle {CLSACT_HANDLE:#x} bpf`",
                    link.ifname, link.ifname
                ));
            }
        }
        for role in [Role::Ingress, Role::Subscriber, Role::Uplink] {
            let prog = self.program(role);
            if prog.exists() {
                fs::remove_file(&prog).map_err(|e| Error::io(format!("remove {}", prog.display()), e))?;
                removed.push(format!("program {role}"));
            }
        }
        for name in names::ALL {
            let p = self.map(name);
            if p.exists() {
                fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
                removed.push(format!("map {name}"));
            }
        }
        for (name, p) in self.stale_maps()? {
            fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
            removed.push(format!("map {name} (left by an older gatekeeper)"));
        }
        for dir in [self.links_dir(), self.root.join("maps"), self.root.clone()] {
            if dir.exists() {
                fs::remove_dir(&dir)
                    .map_err(|e| Error::io(format!("remove {} (is something else pinned there?)", dir.display()), e))?;
            }
        }
        Ok(removed)
    }
}

/// Detaches a pinned link: unpinning a link detaches it; a clsact filter
/// is removed through netlink (gone with its interface already is fine).
fn remove_link(link: &LinkPin) -> Result<()> {
    if link.mode == AttachMode::Clsact {
        if ifindex(&link.ifname).is_some() {
            match tc::qdisc_detach_program(&link.ifname, TcAttachType::Egress, programs::TC_EGRESS) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(bpf_err(format!("remove clsact filter on {}", link.ifname), e)),
            }
        }
        return fs::remove_dir(&link.path).map_err(|e| Error::io(format!("remove {}", link.path.display()), e));
    }
    fs::remove_file(&link.path).map_err(|e| Error::io(format!("remove {}", link.path.display()), e))
}

pub fn ifindex(ifname: &str) -> Option<u32> {
    let c = CString::new(ifname).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

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

/// Typed handles on every map but the ring buffer and the token buckets.
pub struct Maps {
    pub ranges: RangeMaps,
    pub verdicts: VerdictTable<MapData>,
    pub ports: Array<MapData, u64>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    pub range_hits: PerCpuArray<MapData, u64>,
    pub eg_ports: Array<MapData, u32>,
    pub eg_limits: Array<MapData, RateLimit>,
    pub eg_stats: PerCpuArray<MapData, u64>,
}

/// A rate-limit class as the datapath holds it: (class, its ports, limit).
pub type LimitClassState = (u32, Vec<u16>, RateLimit);

/// One range table: its trie (nodes in the kernel map) and every entry it
/// holds, as the index has it.
pub struct TableMaps {
    trie: Trie<MmapStore>,
    entries: StdMap<IpNet, RangeValue>,
}

/// The three range tables (ingress, subscriber, smarthost) and the shared
/// index of every entry by range id.
pub struct RangeMaps {
    tables: [TableMaps; 3],
    pub range_index: HashMap<MapData, u32, RangeEntry>,
}

/// The map of a table's trie nodes.
pub fn table_map(t: RangeTable) -> &'static str {
    match t {
        RangeTable::Ingress => names::RANGES,
        RangeTable::Subscriber => names::SUB_RANGES,
        RangeTable::Smarthost => names::SMH_RANGES,
    }
}

/// The table a datapath entry of kind `code` lives in.
pub fn table_of(code: u8) -> RangeTable {
    match code {
        range_kind::POOL | range_kind::EXEMPT => RangeTable::Subscriber,
        range_kind::SMARTHOST => RangeTable::Smarthost,
        _ => RangeTable::Ingress,
    }
}

/// The store's kind of a datapath kind code.
pub fn kind_of(code: u8) -> RangeKind {
    match code {
        range_kind::ALLOW => RangeKind::Allow,
        range_kind::POOL => RangeKind::Pool,
        range_kind::EXEMPT => RangeKind::Exempt,
        range_kind::SMARTHOST => RangeKind::Smarthost,
        _ => RangeKind::Deny,
    }
}

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
        _ => return None,
    })
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Option<Map>, name: &str) -> Result<T> {
    let map = map.ok_or_else(|| Error::Bpf(format!("map {name} missing from the eBPF object")))?;
    T::try_from(map).map_err(|e| bpf_err(format!("map {name}"), e))
}

impl Maps {
    /// Opens the maps a running (or departed) agent pinned under `layout`.
    pub fn open_pinned(layout: &PinLayout) -> Result<Maps> {
        if !layout.is_loaded() {
            return Err(Error::Bpf(format!(
                "no gatekeeper datapath is pinned at {} (start one with `gatekeeper run`)",
                layout.root.display()
            )));
        }
        let open = |name: &str| -> Result<Option<Map>> {
            let path = layout.map(name);
            let data = MapData::from_pin(&path).map_err(|e| bpf_err(format!("open {}", path.display()), e))?;
            Map::from_map_data(data).map(Some).map_err(|e| bpf_err(format!("map {name}"), e))
        };
        let mut get = |name: &str| open(name);
        Maps::build(&mut get)
    }

    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        Maps::build(&mut |name: &str| Ok(ebpf.take_map(name)))
    }

    fn build(get: &mut dyn FnMut(&str) -> Result<Option<Map>>) -> Result<Maps> {
        Ok(Maps {
            ranges: RangeMaps::build(get)?,
            verdicts: VerdictTable::new(typed(get(names::VERDICTS)?, names::VERDICTS)?)?,
            ports: typed(get(names::PORTS)?, names::PORTS)?,
            config: typed(get(names::CONFIG)?, names::CONFIG)?,
            stats: typed(get(names::STATS)?, names::STATS)?,
            range_hits: typed(get(names::RANGE_HITS)?, names::RANGE_HITS)?,
            eg_ports: typed(get(names::EG_PORTS)?, names::EG_PORTS)?,
            eg_limits: typed(get(names::EG_LIMITS)?, names::EG_LIMITS)?,
            eg_stats: typed(get(names::EG_STATS)?, names::EG_STATS)?,
        })
    }

    /// Writes the egress port policy: `guarded` ports are blocked from
    /// pools, `classes[i]` = (ports, limit) is rate-limit class `i + 1`.
    /// Only words that change are written; a port keeps its old policy
    /// until its new word lands (each write is atomic).
    pub fn set_egress_policy(&mut self, guarded: &[u16], classes: &[(Vec<u16>, RateLimit)]) -> Result<()> {
        if classes.len() >= MAX_LIMIT_CLASSES as usize {
            return Err(Error::Bpf(format!("at most {} rate-limit classes", MAX_LIMIT_CLASSES - 1)));
        }
        let mut want = vec![0u32; EG_PORT_ENTRIES as usize];
        for &p in guarded {
            want[p as usize] |= port_policy::GUARD;
        }
        for (i, (ports, _)) in classes.iter().enumerate() {
            for &p in ports {
                want[p as usize] |= port_policy::word(false, i as u32 + 1);
            }
        }
        // Limits first, so a port never points at a class not yet written.
        for class in 1..MAX_LIMIT_CLASSES {
            let lim = classes.get(class as usize - 1).map(|(_, l)| *l).unwrap_or_default();
            self.eg_limits.set(class, lim, 0).map_err(|e| bpf_err("write rate limits", e))?;
        }
        for (port, &w) in want.iter().enumerate() {
            let cur = self.eg_ports.get(&(port as u32), 0).map_err(|e| bpf_err("read egress ports", e))?;
            if cur != w {
                self.eg_ports.set(port as u32, w, 0).map_err(|e| bpf_err("write egress ports", e))?;
            }
        }
        Ok(())
    }

    /// The egress port policy: (guarded ports, ports of each class 1..).
    pub fn egress_policy(&self) -> Result<(Vec<u16>, Vec<LimitClassState>)> {
        let mut guarded = Vec::new();
        let mut classes: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
        for (port, w) in self.eg_ports.iter().enumerate() {
            let w = w.map_err(|e| bpf_err("read egress ports", e))?;
            if w & port_policy::GUARD != 0 {
                guarded.push(port as u16);
            }
            let c = port_policy::class(w);
            if c != 0 {
                classes.entry(c).or_default().push(port as u16);
            }
        }
        let mut out = Vec::new();
        for (c, ports) in classes {
            let lim = self.eg_limits.get(&c, 0).map_err(|e| bpf_err("read rate limits", e))?;
            out.push((c, ports, lim));
        }
        Ok((guarded, out))
    }

    pub fn set_verdict(&mut self, key: SourceKey, v: Verdict) -> Result<()> {
        if let Some(evicted) = self.verdicts.insert(key, v)? {
            debug!(
                source = %key.display(),
                evicted = %evicted.display(),
                "verdict table: both buckets full, replaced the verdict expiring first"
            );
        }
        Ok(())
    }

    pub fn del_verdict(&mut self, key: SourceKey) -> Result<()> {
        self.verdicts.remove(key).map(|_| ())
    }

    pub fn verdicts(&self) -> Result<Vec<(SourceKey, Verdict)>> {
        self.verdicts.all()
    }

    /// Writes the guarded-port bitmap. Words are written one at a time, each
    /// atomically; new bits are set before old ones are cleared, so a port in
    /// both sets is never unguarded in between.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        let mut want = vec![0u64; PORT_WORDS as usize];
        for &p in ports {
            let (w, bit) = gatekeeper_common::addr::port_slot(p);
            want[w as usize] |= bit;
        }
        for (i, &w) in want.iter().enumerate() {
            let cur = self.ports.get(&(i as u32), 0).map_err(|e| bpf_err("read ports", e))?;
            if cur | w != cur {
                self.ports.set(i as u32, cur | w, 0).map_err(|e| bpf_err("write ports", e))?;
            }
        }
        for (i, &w) in want.iter().enumerate() {
            let cur = self.ports.get(&(i as u32), 0).map_err(|e| bpf_err("read ports", e))?;
            if cur != w {
                self.ports.set(i as u32, w, 0).map_err(|e| bpf_err("write ports", e))?;
            }
        }
        Ok(())
    }

    pub fn ports(&self) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for (i, w) in self.ports.iter().enumerate() {
            let w = w.map_err(|e| bpf_err("read ports", e))?;
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    out.push((i * 64 + bit) as u16);
                }
            }
        }
        Ok(out)
    }

    pub fn set_config(&mut self, c: Config) -> Result<()> {
        self.config.set(0, c, 0).map_err(|e| bpf_err("write config", e))
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).map_err(|e| bpf_err("read config", e))
    }

    /// Decision counters summed over CPUs, by (interface slot, counter);
    /// only counters that moved.
    pub fn counters(&self) -> Result<BTreeMap<StatKey, u64>> {
        sum_counters(&self.stats)
    }

    /// The egress gate's counters, as [`Maps::counters`].
    pub fn egress_counters(&self) -> Result<BTreeMap<StatKey, u64>> {
        sum_counters(&self.eg_stats)
    }

    /// Hits of the range ids in use (`ids`), read one id at a time: the
    /// whole per-CPU array is 262,144 slots, most of them unused.
    pub fn range_hits(&self, ids: impl IntoIterator<Item = u32>) -> Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for id in ids {
            let sum: u64 = self.range_hits.get(&id, 0).map_err(|e| bpf_err("read range hits", e))?.iter().sum();
            if sum > 0 {
                out.insert(id, sum);
            }
        }
        Ok(out)
    }

    /// Zeroes a range id's hit counter (when the id is given to a new range).
    pub fn reset_range_hits(&mut self, id: u32) -> Result<()> {
        let ncpu = aya::util::nr_cpus().map_err(|(w, e)| bpf_err(w, e))?;
        let zeros = PerCpuValues::try_from(vec![0u64; ncpu]).map_err(|e| bpf_err("zero range hits", e))?;
        self.range_hits.set(id, zeros, 0).map_err(|e| bpf_err(format!("reset hits of range id {id}"), e))
    }
}

/// Per-CPU counters summed, by (interface slot, counter); only those that
/// moved.
fn sum_counters(stats: &PerCpuArray<MapData, u64>) -> Result<BTreeMap<StatKey, u64>> {
    let mut out = BTreeMap::new();
    for (index, v) in stats.iter().enumerate() {
        let sum: u64 = v.map_err(|e| bpf_err("read counters", e))?.iter().sum();
        if sum > 0 {
            out.insert(StatKey::from_index(index as u32), sum);
        }
    }
    Ok(out)
}

impl RangeMaps {
    /// Takes the range maps out of a loaded object (the tests and the
    /// benchmark use this beside their own handles on the other maps).
    pub fn take(ebpf: &mut Ebpf) -> Result<RangeMaps> {
        RangeMaps::build(&mut |name: &str| Ok(ebpf.take_map(name)))
    }

    /// Opens the tables with the entries the index holds.
    fn build(get: &mut dyn FnMut(&str) -> Result<Option<Map>>) -> Result<RangeMaps> {
        let range_index: HashMap<MapData, u32, RangeEntry> = typed(get(names::RANGE_INDEX)?, names::RANGE_INDEX)?;
        let mut entries: [StdMap<IpNet, RangeValue>; 3] = Default::default();
        for item in range_index.iter() {
            let (_, e) = item.map_err(|e| bpf_err("read range index", e))?;
            let net = match e.family {
                family::V4 => {
                    ipnet::Ipv4Net::new([e.addr[0], e.addr[1], e.addr[2], e.addr[3]].into(), e.prefix_len as u8)
                        .map(IpNet::V4)
                }
                _ => ipnet::Ipv6Net::new(e.addr.into(), e.prefix_len as u8).map(IpNet::V6),
            }
            .map_err(|err| bpf_err("bad range index entry", err))?;
            entries[table_of(e.value.kind) as usize].insert(net, e.value);
        }
        let mut table = |t: RangeTable, entries: StdMap<IpNet, RangeValue>| -> Result<TableMaps> {
            let name = table_map(t);
            let data = match get(name)? {
                Some(Map::Array(d)) => d,
                Some(_) => return Err(Error::Bpf(format!("map {name} is not an array"))),
                None => return Err(Error::Bpf(format!("map {name} missing from the eBPF object"))),
            };
            let trie = Trie::open(MmapStore::new(data, name)?, entries.iter().map(|(n, v)| (*n, *v)));
            Ok(TableMaps { trie, entries })
        };
        let [ingress, sub, smh] = entries;
        let tables = [
            table(RangeTable::Ingress, ingress)?,
            table(RangeTable::Subscriber, sub)?,
            table(RangeTable::Smarthost, smh)?,
        ];
        Ok(RangeMaps { tables, range_index })
    }

    fn table(&self, t: RangeTable) -> &TableMaps {
        &self.tables[t as usize]
    }

    fn table_mut(&mut self, t: RangeTable) -> &mut TableMaps {
        &mut self.tables[t as usize]
    }

    /// Writes the range entry for `net` in the table of `value.kind`.
    pub fn set_range(&mut self, net: IpNet, value: RangeValue) -> Result<()> {
        let err = |e| bpf_err(format!("insert range {net}"), e);
        let t = self.table_mut(table_of(value.kind));
        let old = t.entries.get(&net).copied();
        t.trie.insert(net, value)?;
        t.entries.insert(net, value);
        if let Some(old) = old.filter(|o| o.range_id != value.range_id) {
            ignore_missing(self.range_index.remove(&old.range_id)).map_err(err)?;
        }
        let (addr, fam) = match net {
            IpNet::V4(n) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&n.network().octets());
                (a, family::V4)
            }
            IpNet::V6(n) => (n.network().octets(), family::V6),
        };
        let entry = RangeEntry { addr, value, prefix_len: net.prefix_len() as u16, family: fam, _pad: 0 };
        self.range_index.insert(value.range_id, entry, 0).map_err(err)
    }

    /// Removes the entry for `net` from `table`.
    pub fn del_range(&mut self, table: RangeTable, net: IpNet) -> Result<()> {
        let err = |e| bpf_err(format!("remove range {net}"), e);
        let t = self.table_mut(table);
        let Some(old) = t.entries.remove(&net) else { return Ok(()) };
        t.trie.remove(net)?;
        ignore_missing(self.range_index.remove(&old.range_id)).map_err(err)
    }

    /// Rewrites the trie entries that differ from what the entries call for
    /// (the agent does this on start, after reconciling); returns how many.
    pub fn rebuild(&mut self) -> Result<usize> {
        let mut writes = 0;
        for t in &mut self.tables {
            writes += t.trie.rebuild()?;
        }
        Ok(writes)
    }

    /// Trie nodes (used, capacity) of a table.
    pub fn usage(&self, table: RangeTable) -> (u32, u32) {
        self.table(table).trie.usage()
    }

    /// The entry stored for exactly `net` in `table`.
    pub fn range(&self, table: RangeTable, net: IpNet) -> Option<RangeValue> {
        self.table(table).entries.get(&net).copied()
    }

    /// Every range entry in the datapath, with its table.
    pub fn ranges(&self) -> Vec<(RangeTable, IpNet, RangeValue)> {
        RangeTable::ALL.into_iter().flat_map(|t| self.table(t).entries.iter().map(move |(n, v)| (t, *n, *v))).collect()
    }
}

fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// How an interface ended up attached.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attached {
    pub ifname: String,
    pub ifindex: u32,
    pub role: Role,
    pub mode: AttachMode,
    /// An existing pinned link was kept and given the new program.
    pub adopted: bool,
}

/// The agent's handle on the datapath.
pub struct Datapath {
    pub layout: PinLayout,
    ebpf: Ebpf,
    pub maps: Maps,
    events: Option<RingBuf<MapData>>,
    /// The datapath clock's calibration (`Config::tick_ns`,
    /// `Config::clock_offset_ns`); `None`: the datapath reads the helper.
    pub clock: Option<(u64, u64)>,
}

impl Datapath {
    /// Loads the programs, reusing maps already pinned under `layout` (a
    /// previous agent's state and counters) or creating and pinning them.
    pub fn load(layout: &PinLayout, max_verdicts: u32, max_range_nodes: u32) -> Result<Datapath> {
        ensure_bpffs(&layout.root)?;
        for dir in [layout.root.join("maps"), layout.links_dir()] {
            fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let (buckets, range_nodes) = check_pinned_maps(layout, max_verdicts, max_range_nodes)?;
        let mut ebpf = load_object(buckets, |loader| {
            loader.map_max_entries(names::RANGES, range_nodes);
            for name in names::ALL {
                loader.map_pin_path(name, layout.map(name));
            }
        })?;
        for role in [Role::Ingress, Role::Subscriber] {
            let prog = xdp_program(&mut ebpf, role)?;
            prog.load().map_err(|e| bpf_err(format!("load XDP program {} (verifier)", role.program()), e))?;
            pin_program(layout, role, |p| prog.pin(p))?;
        }
        let prog = tc_program(&mut ebpf)?;
        prog.load().map_err(|e| bpf_err(format!("load TC program {} (verifier)", programs::TC_EGRESS), e))?;
        pin_program(layout, Role::Uplink, |p| prog.pin(p))?;
        let clock = calibrate_clock(&mut ebpf)?;
        let maps = Maps::take(&mut ebpf)?;
        let events = typed(ebpf.take_map(names::EVENTS), names::EVENTS)?;
        Ok(Datapath { layout: layout.clone(), ebpf, maps, events: Some(events), clock })
    }

    /// The ring buffer of unknown-source events (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Attaches an XDP role (ingress gate or subscriber side) to `ifname`,
    /// or adopts the link a previous agent pinned there by swapping in this
    /// agent's program atomically (no gap).
    pub fn attach(&mut self, role: Role, ifname: &str, want: XdpModeSetting) -> Result<Attached> {
        if role == Role::Uplink {
            return Err(Error::Bpf("uplinks are attached with attach_uplink".into()));
        }
        let ifindex = ifindex(ifname).ok_or_else(|| Error::Bpf(format!("interface {ifname:?} not found")))?;
        let existing = self.layout.links()?.into_iter().find(|l| l.ifname == ifname && l.role == role);
        let prog = xdp_program(&mut self.ebpf, role)?;
        if let Some(pin) = existing {
            let compatible = match want {
                XdpModeSetting::Auto => true,
                XdpModeSetting::Native => pin.mode == AttachMode::Native,
                XdpModeSetting::Skb => pin.mode == AttachMode::Skb,
            };
            if compatible {
                let pinned =
                    PinnedLink::from_pin(&pin.path).map_err(|e| bpf_err(format!("open {}", pin.path.display()), e))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| bpf_err(format!("link {}", pin.path.display()), e))?;
                let id = prog.attach_to_link(link).map_err(|e| bpf_err(format!("update XDP link on {ifname}"), e))?;
                // The link stays attached through its pin; drop our fd.
                drop(prog.take_link(id).map_err(|e| bpf_err("take link", e))?);
                return Ok(Attached { ifname: ifname.into(), ifindex, role, mode: pin.mode, adopted: true });
            }
            warn!(iface = ifname, %role, from = %pin.mode, to = %want, "XDP mode change requested: detaching and re-attaching (brief gap)");
            remove_link(&pin)?;
        }
        let modes: &[AttachMode] = match want {
            XdpModeSetting::Auto => &[AttachMode::Native, AttachMode::Skb],
            XdpModeSetting::Native => &[AttachMode::Native],
            XdpModeSetting::Skb => &[AttachMode::Skb],
        };
        let mut last_err = None;
        for &mode in modes {
            match prog.attach_to_if_index(ifindex, mode.xdp_mode()) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(|e| bpf_err("take link", e))?;
                    let fd = FdLink::try_from(link).map_err(|e| {
                        bpf_err(
                            format!("{ifname}: the kernel attached XDP without a bpf_link, which cannot be pinned"),
                            e,
                        )
                    })?;
                    let path = self.layout.link(role, ifname, mode);
                    fd.pin(&path).map_err(|e| bpf_err(format!("pin link at {}", path.display()), e))?;
                    return Ok(Attached { ifname: ifname.into(), ifindex, role, mode, adopted: false });
                }
                Err(e) => {
                    if mode == AttachMode::Native && modes.len() > 1 {
                        warn!(iface = ifname, %role, error = %e, "native XDP attach failed; falling back to skb (generic) mode, which is slower");
                    }
                    last_err = Some(bpf_err(format!("attach XDP ({mode}) to {ifname}"), e));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Bpf("no XDP mode to try".into())))
    }

    /// Attaches the egress gate to an uplink's TC egress hook: a tcx link
    /// (pinned) where the kernel has tcx, else a clsact filter (marked by an
    /// empty `clsact@` directory). A previous agent's attachment is adopted
    /// by replacing its program in place.
    pub fn attach_uplink(&mut self, ifname: &str, want: TcModeSetting) -> Result<Attached> {
        let ifindex = ifindex(ifname).ok_or_else(|| Error::Bpf(format!("interface {ifname:?} not found")))?;
        let role = Role::Uplink;
        let existing = self.layout.links()?.into_iter().find(|l| l.ifname == ifname && l.role == role);
        let prog = tc_program(&mut self.ebpf)?;
        if let Some(pin) = existing {
            let compatible = match want {
                TcModeSetting::Auto => true,
                TcModeSetting::Tcx => pin.mode == AttachMode::Tcx,
                TcModeSetting::Clsact => pin.mode == AttachMode::Clsact,
            };
            if compatible {
                let link = if pin.mode == AttachMode::Tcx {
                    let pinned = PinnedLink::from_pin(&pin.path)
                        .map_err(|e| bpf_err(format!("open {}", pin.path.display()), e))?;
                    SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| bpf_err(format!("link {}", pin.path.display()), e))?
                } else {
                    SchedClassifierLink::attached(
                        ifname,
                        TcAttachType::Egress,
                        CLSACT_PRIORITY,
                        TcHandle::new(0, CLSACT_HANDLE),
                        None,
                    )
                    .map_err(|e| Error::io(format!("clsact filter on {ifname}"), e))?
                };
                let id = prog.attach_to_link(link).map_err(|e| bpf_err(format!("update TC link on {ifname}"), e))?;
                let link = prog.take_link(id).map_err(|e| bpf_err("take link", e))?;
                // tcx: the pin keeps it; clsact: the filter lives in the
                // kernel. Neither may be detached when this handle goes.
                std::mem::forget(link);
                return Ok(Attached { ifname: ifname.into(), ifindex, role, mode: pin.mode, adopted: true });
            }
            warn!(iface = ifname, from = %pin.mode, "TC mode change requested: detaching and re-attaching (brief gap)");
            remove_link(&pin)?;
        }
        let tcx_ok =
            aya::util::KernelVersion::current().map(|v| v >= aya::util::KernelVersion::new(6, 6, 0)).unwrap_or(false);
        let mode = match want {
            TcModeSetting::Tcx => AttachMode::Tcx,
            TcModeSetting::Clsact => AttachMode::Clsact,
            TcModeSetting::Auto if tcx_ok => AttachMode::Tcx,
            TcModeSetting::Auto => {
                info!(iface = ifname, "kernel older than 6.6 has no tcx: attaching through a clsact qdisc");
                AttachMode::Clsact
            }
        };
        let path = self.layout.link(role, ifname, mode);
        if mode == AttachMode::Tcx {
            let id = prog
                .attach_with_options(ifname, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| bpf_err(format!("attach TC (tcx) to {ifname} egress"), e))?;
            let link = prog.take_link(id).map_err(|e| bpf_err("take link", e))?;
            let fd = FdLink::try_from(link).map_err(|e| bpf_err(format!("{ifname}: tcx link"), e))?;
            fd.pin(&path).map_err(|e| bpf_err(format!("pin link at {}", path.display()), e))?;
        } else {
            match tc::qdisc_add_clsact(ifname) {
                Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(bpf_err(format!("add clsact qdisc to {ifname}"), e)),
            }
            let opts =
                NlOptions { priority: CLSACT_PRIORITY, handle: TcHandle::new(0, CLSACT_HANDLE), ..Default::default() };
            let id = prog
                .attach_with_options(ifname, TcAttachType::Egress, TcAttachOptions::Netlink(opts))
                .map_err(|e| bpf_err(format!("attach TC (clsact) to {ifname} egress"), e))?;
            std::mem::forget(prog.take_link(id).map_err(|e| bpf_err("take link", e))?);
            fs::create_dir(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        }
        Ok(Attached { ifname: ifname.into(), ifindex, role, mode, adopted: false })
    }

    /// Detaches the interfaces of `role` pinned earlier but no longer wanted.
    pub fn detach_except(&self, role: Role, keep: &[String]) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for pin in self.layout.links()? {
            if pin.role == role && !keep.contains(&pin.ifname) {
                remove_link(&pin)?;
                gone.push(pin.ifname);
            }
        }
        Ok(gone)
    }
}

fn pin_program(
    layout: &PinLayout,
    role: Role,
    pin: impl FnOnce(&Path) -> std::result::Result<(), aya::pin::PinError>,
) -> Result<()> {
    let path = layout.program(role);
    if path.exists() {
        fs::remove_file(&path).map_err(|e| Error::io(format!("replace {}", path.display()), e))?;
    }
    pin(&path).map_err(|e| bpf_err(format!("pin program at {}", path.display()), e))
}

fn xdp_program(ebpf: &mut Ebpf, role: Role) -> Result<&mut Xdp> {
    let name = role.program();
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Bpf(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e| bpf_err("program type", e))
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let name = programs::TC_EGRESS;
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Bpf(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e| bpf_err("program type", e))
}

/// Loads the eBPF object with a verdict table of `buckets` buckets (a power
/// of two) and the datapath's bucket mask to match; `setup` adds pin paths
/// or other map sizes. Everything that loads the object goes through here.
pub fn load_object(buckets: u32, setup: impl FnOnce(&mut EbpfLoader<'_>)) -> Result<Ebpf> {
    if !buckets.is_power_of_two() {
        return Err(Error::Bpf(format!("verdict table of {buckets} buckets: not a power of two")));
    }
    let mask = buckets - 1;
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(names::VERDICTS, buckets).override_global(VERDICT_MASK_GLOBAL, &mask, true);
    setup(&mut loader);
    loader.load(crate::EBPF_OBJECT).map_err(|e| bpf_err("load eBPF object", e))
}

/// One reading of the clock probe: (jiffies, CLOCK_MONOTONIC_COARSE ns).
fn clock_sample(prog: &Xdp) -> Result<(u64, u64)> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..TestRunOptions::new() };
    let r = prog.test_run(opts).map_err(|e| bpf_err(format!("run {}", programs::XDP_CLOCK), e))?;
    const XDP_PASS: u32 = 2;
    if r.return_value != XDP_PASS {
        return Err(Error::Bpf(format!("{} returned {}", programs::XDP_CLOCK, r.return_value)));
    }
    let word = |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(1)))
}

/// Calibrates the datapath clock (`Config::clock_ns`) with two probe
/// readings 120 ms apart. `None`, with a warning, when the kernel's tick is
/// not one gatekeeper knows: the datapath then reads the clock helper, which
/// is correct but slower.
pub fn calibrate_clock(ebpf: &mut Ebpf) -> Result<Option<(u64, u64)>> {
    let prog: &mut Xdp = ebpf
        .program_mut(programs::XDP_CLOCK)
        .ok_or_else(|| Error::Bpf(format!("program {} missing from the eBPF object", programs::XDP_CLOCK)))?
        .try_into()
        .map_err(|e| bpf_err("program type", e))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| bpf_err(format!("load {} (verifier)", programs::XDP_CLOCK), e))?;
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

/// Refuses to adopt pinned maps whose layout differs from this build's;
/// returns the verdict table's buckets and the ingress trie's nodes (the
/// pinned sizes, if any).
fn check_pinned_maps(layout: &PinLayout, max_verdicts: u32, max_range_nodes: u32) -> Result<(u32, u32)> {
    for (name, path) in layout.stale_maps()? {
        warn!(
            map = %path.display(),
            "map {name} was left by an older gatekeeper and is no longer used; `gatekeeper unload` removes it"
        );
    }
    let mut buckets = verdict_buckets(max_verdicts);
    let mut range_nodes = max_range_nodes;
    for name in names::ALL {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| bpf_err(format!("inspect {}", path.display()), e))?;
        if let Some((k, v)) = expected_sizes(name) {
            if info.key_size() != k || info.value_size() != v {
                return Err(Error::Bpf(format!(
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

// ---------------------------------------------------------------- allow wins

pub fn range_value(r: &RangeRecord) -> RangeValue {
    let flags = if r.action == Some(PoolAction::Reject) { range_flags::REJECT } else { 0 };
    RangeValue { range_id: r.id, kind: r.kind.code(), flags, origin: r.origin.code() }
}

/// The datapath entry for `net` in one table, given the table's winning
/// ranges (allow, exempt, smarthost) and its losing range at exactly `net`
/// (deny, pool), if any. Both kinds share one longest-prefix table, so
/// "allow (exempt) always wins" holds by leaving out every losing range
/// that a winning range covers: the longest match of a covered source is
/// then always a winning entry.
pub fn desired_entry(net: IpNet, winners: &[RangeRecord], loser: Option<&RangeRecord>) -> Option<RangeValue> {
    if let Some(a) = winners.iter().find(|a| a.net == net) {
        return Some(range_value(a));
    }
    loser.filter(|d| !winners.iter().any(|a| a.net.contains(&d.net))).map(range_value)
}

/// Every datapath entry the database calls for, by table.
pub fn desired_ranges(records: &[RangeRecord]) -> StdMap<(RangeTable, IpNet), RangeValue> {
    let mut out = StdMap::new();
    for table in RangeTable::ALL {
        let winners: Vec<RangeRecord> = records.iter().filter(|r| r.kind == table.winner()).cloned().collect();
        out.extend(winners.iter().map(|a| ((table, a.net), range_value(a))));
        for d in records.iter().filter(|r| Some(r.kind) == table.loser()) {
            if let Some(v) = desired_entry(d.net, &winners, Some(d)) {
                out.insert((table, d.net), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Origin;

    fn rec(id: u32, kind: RangeKind, net: &str) -> RangeRecord {
        RangeRecord {
            id,
            kind,
            net: net.parse().unwrap(),
            origin: Origin::Manual,
            source: "test".into(),
            comment: None,
            created_at: 0,
            expires_at: None,
            action: (kind == RangeKind::Pool).then_some(PoolAction::Drop),
        }
    }

    /// Longest-prefix match over the desired entries of a table, as the
    /// kernel does.
    fn lookup_in(entries: &StdMap<(RangeTable, IpNet), RangeValue>, table: RangeTable, ip: &str) -> Option<u8> {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        entries
            .iter()
            .filter(|((t, n), _)| *t == table && n.contains(&ip))
            .max_by_key(|((_, n), _)| n.prefix_len())
            .map(|(_, v)| v.kind)
    }

    fn lookup(entries: &StdMap<(RangeTable, IpNet), RangeValue>, ip: &str) -> Option<u8> {
        lookup_in(entries, RangeTable::Ingress, ip)
    }

    #[test]
    fn allow_always_wins_under_longest_prefix_match() {
        let records = vec![
            rec(1, RangeKind::Deny, "198.51.100.0/24"),
            rec(2, RangeKind::Allow, "198.51.100.0/28"),
            // Inside the allow range: must be left out, or it would win LPM.
            rec(3, RangeKind::Deny, "198.51.100.8/30"),
            // Same net as an allow range (added with --force): allow wins.
            rec(4, RangeKind::Deny, "203.0.113.0/24"),
            rec(5, RangeKind::Allow, "203.0.113.0/24"),
            rec(6, RangeKind::Deny, "2001:db8::/32"),
            rec(7, RangeKind::Allow, "2001:db8:1::/48"),
        ];
        let want = desired_ranges(&records);
        let ing = |n: &str| (RangeTable::Ingress, n.parse::<IpNet>().unwrap());
        assert!(!want.contains_key(&ing("198.51.100.8/30")));
        assert_eq!(want[&ing("203.0.113.0/24")].range_id, 5);
        assert_eq!(lookup(&want, "198.51.100.9"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "198.51.100.200"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "203.0.113.7"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:1::25"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:2::25"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "192.0.2.1"), None);
    }

    #[test]
    fn exempt_wins_over_pool_and_tables_stay_apart() {
        let mut reject = rec(1, RangeKind::Pool, "198.51.100.0/24");
        reject.action = Some(PoolAction::Reject);
        let records = vec![
            reject,
            rec(2, RangeKind::Exempt, "198.51.100.25/32"),
            // Inside an exempt range: left out.
            rec(3, RangeKind::Pool, "203.0.113.0/28"),
            rec(4, RangeKind::Exempt, "203.0.113.0/24"),
            rec(5, RangeKind::Smarthost, "192.0.2.25/32"),
            // The same net as a deny range, in another table: both stay.
            rec(6, RangeKind::Deny, "198.51.100.0/24"),
            rec(7, RangeKind::Pool, "2001:db8:100::/40"),
        ];
        let want = desired_ranges(&records);
        let sub = |ip| lookup_in(&want, RangeTable::Subscriber, ip);
        assert_eq!(sub("198.51.100.7"), Some(range_kind::POOL));
        assert_eq!(sub("198.51.100.25"), Some(range_kind::EXEMPT));
        assert_eq!(sub("203.0.113.5"), Some(range_kind::EXEMPT));
        assert_eq!(sub("2001:db8:100:5::1"), Some(range_kind::POOL));
        assert_eq!(sub("192.0.2.25"), None);
        assert_eq!(lookup_in(&want, RangeTable::Smarthost, "192.0.2.25"), Some(range_kind::SMARTHOST));
        assert_eq!(lookup(&want, "198.51.100.7"), Some(range_kind::DENY));
        let pool = want[&(RangeTable::Subscriber, "198.51.100.0/24".parse().unwrap())];
        assert_eq!(pool.flags, range_flags::REJECT);
        assert_eq!(want[&(RangeTable::Ingress, "198.51.100.0/24".parse().unwrap())].flags, 0);
        assert_eq!(want.len(), 6);
    }

    #[test]
    fn removing_the_allow_brings_the_inner_deny_back() {
        let allows = vec![rec(2, RangeKind::Allow, "198.51.100.0/28")];
        let inner = rec(3, RangeKind::Deny, "198.51.100.8/30");
        assert_eq!(desired_entry(inner.net, &allows, Some(&inner)), None);
        assert_eq!(desired_entry(inner.net, &[], Some(&inner)), Some(range_value(&inner)));
        assert_eq!(desired_entry(inner.net, &[], None), None);
    }
}
