//! The pinned, fail-static datapath: loading, pinning, attaching (or
//! adopting what a previous agent left attached), map updates and counters.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/gatekeeper`):
//! `maps/<MAP>`, `prog_ingress`, `links/<mode>@<ifname>`. Links and maps
//! stay pinned when the agent exits, so enforcement never stops with it; a
//! new agent reuses the maps and swaps the program in atomically.
use std::{
    collections::{BTreeMap, HashMap as StdMap},
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues, RingBuf,
    },
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use gatekeeper_common::{
    family, maps as names, programs, range_kind, Config, Ipv6Bytes, RangeEntry, RangeValue, SourceKey, StatKey,
    V4LongKey, V4Slot, Verdict, PORT_WORDS,
};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    config::XdpModeSetting,
    store::{RangeKind, RangeRecord},
    v4table::{V4Table, V4Writes},
    Error, Result,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// An aya error with its whole source chain (the errno is at the end).
fn bpf_err(what: impl std::fmt::Display, e: impl std::error::Error) -> Error {
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

/// How an XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Skb,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pinned XDP link found under `links/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkPin {
    pub ifname: String,
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
    pub fn program(&self) -> PathBuf {
        self.root.join("prog_ingress")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// `links/<mode>@<ifname>`, with `%` and `.` in the name percent-encoded:
    /// bpffs refuses dots in pin names (and `eth0.100` has one).
    pub fn link(&self, ifname: &str, mode: AttachMode) -> PathBuf {
        let name = ifname.replace('%', "%25").replace('.', "%2e");
        self.links_dir().join(format!("{mode}@{name}"))
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
            let mode = match mode {
                "native" => AttachMode::Native,
                "skb" => AttachMode::Skb,
                _ => continue,
            };
            out.push(LinkPin { ifname: ifname.to_string(), mode, path: entry.path() });
        }
        out.sort_by(|a, b| a.ifname.cmp(&b.ifname));
        Ok(out)
    }

    /// Detaches everything and removes every pin. Returns what was removed.
    pub fn unload(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for link in self.links()? {
            fs::remove_file(&link.path).map_err(|e| Error::io(format!("remove {}", link.path.display()), e))?;
            removed.push(format!("link {} ({})", link.ifname, link.mode));
        }
        let prog = self.program();
        if prog.exists() {
            fs::remove_file(&prog).map_err(|e| Error::io(format!("remove {}", prog.display()), e))?;
            removed.push("program".into());
        }
        for name in names::ALL {
            let p = self.map(name);
            if p.exists() {
                fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
                removed.push(format!("map {name}"));
            }
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

/// Typed handles on every map but the ring buffer.
pub struct Maps {
    pub ranges: RangeMaps,
    pub verdicts: HashMap<MapData, SourceKey, Verdict>,
    pub ports: Array<MapData, u64>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    pub range_hits: PerCpuArray<MapData, u64>,
}

/// The range tables (IPv4 slots and long entries, IPv6 trie) and the index,
/// with an in-memory mirror of every entry.
pub struct RangeMaps {
    pub v4_slots: Array<MapData, V4Slot>,
    pub v4_long: HashMap<MapData, V4LongKey, RangeValue>,
    pub ranges_v6: LpmTrie<MapData, Ipv6Bytes, RangeValue>,
    pub range_index: HashMap<MapData, u32, RangeEntry>,
    /// Every range entry, as the index holds it (loaded on open).
    entries: StdMap<IpNet, RangeValue>,
    /// The IPv4 entries, organised as the datapath searches them.
    v4: V4Table,
}

/// Expected (key size, value size) of each pinned map, to refuse adopting
/// maps left by an incompatible gatekeeper build.
fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use core::mem::size_of;
    let lpm6 = (4 + size_of::<Ipv6Bytes>()) as u32;
    let range = size_of::<RangeValue>() as u32;
    Some(match name {
        names::V4_SLOTS => (4, size_of::<V4Slot>() as u32),
        names::V4_LONG => (size_of::<V4LongKey>() as u32, range),
        names::RANGES_V6 => (lpm6, range),
        names::RANGE_INDEX => (4, size_of::<RangeEntry>() as u32),
        names::VERDICTS => (size_of::<SourceKey>() as u32, size_of::<Verdict>() as u32),
        names::SEEN => (size_of::<SourceKey>() as u32, 8),
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
        Ok(Maps {
            ranges: RangeMaps::new(RangeMaps {
                v4_slots: typed(open(names::V4_SLOTS)?, names::V4_SLOTS)?,
                v4_long: typed(open(names::V4_LONG)?, names::V4_LONG)?,
                ranges_v6: typed(open(names::RANGES_V6)?, names::RANGES_V6)?,
                range_index: typed(open(names::RANGE_INDEX)?, names::RANGE_INDEX)?,
                entries: StdMap::new(),
                v4: V4Table::default(),
            })?,
            verdicts: typed(open(names::VERDICTS)?, names::VERDICTS)?,
            ports: typed(open(names::PORTS)?, names::PORTS)?,
            config: typed(open(names::CONFIG)?, names::CONFIG)?,
            stats: typed(open(names::STATS)?, names::STATS)?,
            range_hits: typed(open(names::RANGE_HITS)?, names::RANGE_HITS)?,
        })
    }

    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        Ok(Maps {
            ranges: RangeMaps::take(ebpf)?,
            verdicts: typed(ebpf.take_map(names::VERDICTS), names::VERDICTS)?,
            ports: typed(ebpf.take_map(names::PORTS), names::PORTS)?,
            config: typed(ebpf.take_map(names::CONFIG), names::CONFIG)?,
            stats: typed(ebpf.take_map(names::STATS), names::STATS)?,
            range_hits: typed(ebpf.take_map(names::RANGE_HITS), names::RANGE_HITS)?,
        })
    }

    pub fn set_verdict(&mut self, key: SourceKey, v: Verdict) -> Result<()> {
        self.verdicts.insert(key, v, 0).map_err(|e| bpf_err(format!("insert verdict {}", key.display()), e))
    }

    pub fn del_verdict(&mut self, key: SourceKey) -> Result<()> {
        ignore_missing(self.verdicts.remove(&key)).map_err(|e| bpf_err(format!("remove verdict {}", key.display()), e))
    }

    pub fn verdicts(&self) -> Result<Vec<(SourceKey, Verdict)>> {
        self.verdicts.iter().collect::<std::result::Result<_, _>>().map_err(|e| bpf_err("read verdicts", e))
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
        let mut out = BTreeMap::new();
        for (index, v) in self.stats.iter().enumerate() {
            let sum: u64 = v.map_err(|e| bpf_err("read counters", e))?.iter().sum();
            if sum > 0 {
                out.insert(StatKey::from_index(index as u32), sum);
            }
        }
        Ok(out)
    }

    /// Hits of each range id that has any.
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

impl RangeMaps {
    /// Takes the range maps out of a loaded object (the tests and the
    /// benchmark use this beside their own handles on the other maps).
    pub fn take(ebpf: &mut Ebpf) -> Result<RangeMaps> {
        RangeMaps::new(RangeMaps {
            v4_slots: typed(ebpf.take_map(names::V4_SLOTS), names::V4_SLOTS)?,
            v4_long: typed(ebpf.take_map(names::V4_LONG), names::V4_LONG)?,
            ranges_v6: typed(ebpf.take_map(names::RANGES_V6), names::RANGES_V6)?,
            range_index: typed(ebpf.take_map(names::RANGE_INDEX), names::RANGE_INDEX)?,
            entries: StdMap::new(),
            v4: V4Table::default(),
        })
    }

    /// Loads the range mirror from the index.
    fn new(mut maps: RangeMaps) -> Result<RangeMaps> {
        for item in maps.range_index.iter() {
            let (_, e) = item.map_err(|e| bpf_err("read range index", e))?;
            let net = match e.family {
                family::V4 => {
                    ipnet::Ipv4Net::new([e.addr[0], e.addr[1], e.addr[2], e.addr[3]].into(), e.prefix_len as u8)
                        .map(IpNet::V4)
                }
                _ => ipnet::Ipv6Net::new(e.addr.into(), e.prefix_len as u8).map(IpNet::V6),
            }
            .map_err(|err| bpf_err("bad range index entry", err))?;
            maps.entries.insert(net, e.value);
        }
        maps.v4 = V4Table::from_entries(maps.entries.iter().filter_map(|(n, v)| match n {
            IpNet::V4(n) => Some((*n, *v)),
            IpNet::V6(_) => None,
        }));
        Ok(maps)
    }

    /// Writes the range entry for `net` (allow or deny, by `value.kind`).
    pub fn set_range(&mut self, net: IpNet, value: RangeValue) -> Result<()> {
        let err = |e| bpf_err(format!("insert range {net}"), e);
        let old = self.entries.get(&net).copied();
        match net {
            IpNet::V4(n) => {
                let w = self.v4.set(n, value);
                self.apply_v4(w).map_err(err)?;
            }
            IpNet::V6(n) => {
                self.ranges_v6.insert(&Key::new(n.prefix_len() as u32, n.network().octets()), value, 0).map_err(err)?;
            }
        }
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
        self.range_index.insert(value.range_id, entry, 0).map_err(err)?;
        self.entries.insert(net, value);
        Ok(())
    }

    pub fn del_range(&mut self, net: IpNet) -> Result<()> {
        let err = |e| bpf_err(format!("remove range {net}"), e);
        let Some(old) = self.entries.remove(&net) else { return Ok(()) };
        match net {
            IpNet::V4(n) => {
                let w = self.v4.del(n);
                self.apply_v4(w).map_err(err)?;
            }
            IpNet::V6(n) => {
                ignore_missing(self.ranges_v6.remove(&Key::new(n.prefix_len() as u32, n.network().octets())))
                    .map_err(err)?;
            }
        }
        ignore_missing(self.range_index.remove(&old.range_id)).map_err(err)
    }

    /// Writes what an IPv4 change needs: a new long entry before the slot
    /// that points at it, a removed one after.
    fn apply_v4(&mut self, w: V4Writes) -> std::result::Result<(), aya::maps::MapError> {
        if let Some((k, v)) = w.long_set {
            self.v4_long.insert(k, v, 0)?;
        }
        if let Some((first, count)) = w.slots {
            for slot in first..first + count {
                self.v4_slots.set(slot, self.v4.slot(slot), 0)?;
            }
        }
        if let Some(k) = w.long_del {
            ignore_missing(self.v4_long.remove(&k))?;
        }
        Ok(())
    }

    /// Rewrites the IPv4 slots and long entries that differ from the
    /// mirror (the agent does this on start, after reconciling).
    pub fn rebuild_v4(&mut self) -> Result<usize> {
        let err = |e| bpf_err("rebuild IPv4 range table", e);
        let mut writes = 0;
        let want: StdMap<V4LongKey, RangeValue> = self
            .entries
            .iter()
            .filter_map(|(n, v)| match n {
                IpNet::V4(n) if n.prefix_len() > gatekeeper_common::V4_SHORT_MAX => {
                    Some((V4LongKey::of(u32::from(n.network()), n.prefix_len() as u32), *v))
                }
                _ => None,
            })
            .collect();
        let have: Vec<(V4LongKey, RangeValue)> =
            self.v4_long.iter().collect::<std::result::Result<_, _>>().map_err(err)?;
        for (k, v) in &want {
            if !have.iter().any(|(hk, hv)| hk == k && hv == v) {
                self.v4_long.insert(*k, *v, 0).map_err(err)?;
                writes += 1;
            }
        }
        for slot in 0..gatekeeper_common::V4_SLOT_COUNT {
            let want = self.v4.slot(slot);
            if self.v4_slots.get(&slot, 0).map_err(err)? != want {
                self.v4_slots.set(slot, want, 0).map_err(err)?;
                writes += 1;
            }
        }
        for (k, _) in have.iter().filter(|(k, _)| !want.contains_key(k)) {
            ignore_missing(self.v4_long.remove(k)).map_err(err)?;
            writes += 1;
        }
        Ok(writes)
    }

    /// The entry stored for exactly `net`.
    pub fn range(&self, net: IpNet) -> Option<RangeValue> {
        self.entries.get(&net).copied()
    }

    /// Every range entry in the datapath.
    pub fn ranges(&self) -> Vec<(IpNet, RangeValue)> {
        self.entries.iter().map(|(n, v)| (*n, *v)).collect()
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
}

impl Datapath {
    /// Loads the program, reusing maps already pinned under `layout` (a
    /// previous agent's state and counters) or creating and pinning them.
    pub fn load(layout: &PinLayout, max_verdicts: u32) -> Result<Datapath> {
        ensure_bpffs(&layout.root)?;
        for dir in [layout.root.join("maps"), layout.links_dir()] {
            fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        check_pinned_maps(layout, max_verdicts)?;
        let mut loader = EbpfLoader::new();
        for name in names::ALL {
            loader.map_pin_path(name, layout.map(name));
        }
        loader.map_max_entries(names::VERDICTS, max_verdicts);
        let mut ebpf = loader.load(crate::EBPF_OBJECT).map_err(|e| bpf_err("load eBPF object", e))?;
        let prog = xdp_program(&mut ebpf)?;
        prog.load().map_err(|e| bpf_err("load XDP program (verifier)", e))?;
        let prog_pin = layout.program();
        if prog_pin.exists() {
            fs::remove_file(&prog_pin).map_err(|e| Error::io(format!("replace {}", prog_pin.display()), e))?;
        }
        prog.pin(&prog_pin).map_err(|e| bpf_err(format!("pin program at {}", prog_pin.display()), e))?;
        let maps = Maps::take(&mut ebpf)?;
        let events = typed(ebpf.take_map(names::EVENTS), names::EVENTS)?;
        Ok(Datapath { layout: layout.clone(), ebpf, maps, events: Some(events) })
    }

    /// The ring buffer of unknown-source events (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Attaches to `ifname`, or adopts the link a previous agent pinned there
    /// by swapping in this agent's program atomically (no gap).
    pub fn attach(&mut self, ifname: &str, want: XdpModeSetting) -> Result<Attached> {
        let ifindex = ifindex(ifname).ok_or_else(|| Error::Bpf(format!("interface {ifname:?} not found")))?;
        let existing = self.layout.links()?.into_iter().find(|l| l.ifname == ifname);
        let prog = xdp_program(&mut self.ebpf)?;
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
                return Ok(Attached { ifname: ifname.into(), ifindex, mode: pin.mode, adopted: true });
            }
            warn!(iface = ifname, from = %pin.mode, to = %want, "XDP mode change requested: detaching and re-attaching (brief gap)");
            fs::remove_file(&pin.path).map_err(|e| Error::io(format!("remove {}", pin.path.display()), e))?;
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
                    let path = self.layout.link(ifname, mode);
                    fd.pin(&path).map_err(|e| bpf_err(format!("pin link at {}", path.display()), e))?;
                    return Ok(Attached { ifname: ifname.into(), ifindex, mode, adopted: false });
                }
                Err(e) => {
                    if mode == AttachMode::Native && modes.len() > 1 {
                        warn!(iface = ifname, error = %e, "native XDP attach failed; falling back to skb (generic) mode, which is slower");
                    }
                    last_err = Some(bpf_err(format!("attach XDP ({mode}) to {ifname}"), e));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Bpf("no XDP mode to try".into())))
    }

    /// Detaches interfaces pinned earlier but no longer wanted.
    pub fn detach_except(&self, keep: &[String]) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for pin in self.layout.links()? {
            if !keep.contains(&pin.ifname) {
                fs::remove_file(&pin.path).map_err(|e| Error::io(format!("remove {}", pin.path.display()), e))?;
                gone.push(pin.ifname);
            }
        }
        Ok(gone)
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(programs::XDP_INGRESS)
        .ok_or_else(|| Error::Bpf(format!("program {} missing from the eBPF object", programs::XDP_INGRESS)))?
        .try_into()
        .map_err(|e| bpf_err("program type", e))
}

/// Refuses to adopt pinned maps whose layout differs from this build's.
fn check_pinned_maps(layout: &PinLayout, max_verdicts: u32) -> Result<()> {
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
        if name == names::VERDICTS && info.max_entries() != max_verdicts {
            warn!(
                pinned = info.max_entries(),
                configured = max_verdicts,
                "max_verdicts differs from the pinned verdict map; keeping the pinned size (run `gatekeeper unload` to resize)"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- allow wins

pub fn range_value(r: &RangeRecord) -> RangeValue {
    let kind = match r.kind {
        RangeKind::Deny => range_kind::DENY,
        RangeKind::Allow => range_kind::ALLOW,
    };
    RangeValue { range_id: r.id, kind, origin: r.origin.code() }
}

/// The datapath entry for `net`, given the allow ranges and the deny range
/// at exactly `net` (if any). Allow and deny share one longest-prefix trie,
/// so "allow always wins" holds by leaving out every deny range that an
/// allow range covers: the longest match of an allowed source is then always
/// an allow entry.
pub fn desired_entry(net: IpNet, allows: &[RangeRecord], deny: Option<&RangeRecord>) -> Option<RangeValue> {
    if let Some(a) = allows.iter().find(|a| a.net == net) {
        return Some(range_value(a));
    }
    deny.filter(|d| !allows.iter().any(|a| a.net.contains(&d.net))).map(range_value)
}

/// Every datapath entry the database calls for.
pub fn desired_ranges(records: &[RangeRecord]) -> StdMap<IpNet, RangeValue> {
    let allows: Vec<RangeRecord> = records.iter().filter(|r| r.kind == RangeKind::Allow).cloned().collect();
    let mut out: StdMap<IpNet, RangeValue> = allows.iter().map(|a| (a.net, range_value(a))).collect();
    for d in records.iter().filter(|r| r.kind == RangeKind::Deny) {
        if let Some(v) = desired_entry(d.net, &allows, Some(d)) {
            out.insert(d.net, v);
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
        }
    }

    /// Longest-prefix match over the desired entries, as the kernel does.
    fn lookup(entries: &StdMap<IpNet, RangeValue>, ip: &str) -> Option<u16> {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        entries.iter().filter(|(n, _)| n.contains(&ip)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, v)| v.kind)
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
        assert!(!want.contains_key(&"198.51.100.8/30".parse().unwrap()));
        assert_eq!(want[&"203.0.113.0/24".parse().unwrap()].range_id, 5);
        assert_eq!(lookup(&want, "198.51.100.9"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "198.51.100.200"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "203.0.113.7"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:1::25"), Some(range_kind::ALLOW));
        assert_eq!(lookup(&want, "2001:db8:2::25"), Some(range_kind::DENY));
        assert_eq!(lookup(&want, "192.0.2.1"), None);
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
