//! Typed handles on the pinned maps: the three range tables (tries plus
//! their shared index), the verdict table, ports, config, egress policy and
//! the counters. Each write keeps the datapath's view consistent at every
//! moment (see each method).
use std::collections::{BTreeMap, HashMap as StdMap};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use gatekeeper_common::{
    family,
    inbound::{IN_COUNTERS, IN_PORT_ENTRIES},
    maps as names, port_policy,
    reject::{quiet_slot, QuietSlot, RejectConfig, REJECT_COUNTER_SLOTS},
    sourcetab::HashKey,
    Config, KeyWords, RangeEntry, RangeValue, RateLimit, SourceKey, StatKey, Verdict, EG_PORT_ENTRIES,
    MAX_LIMIT_CLASSES, PORT_WORDS,
};
use ipnet::IpNet;
use tracing::debug;

use crate::{
    datapath::pins::PinLayout,
    domain::RangeTable,
    trie::{MmapStore, Trie},
    verdict_table::VerdictTable,
    Error, Result,
};

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
    /// `None`: opened from pins an older gatekeeper left, which has none.
    pub reject: Option<RejectMaps>,
    /// The inbound limiter; `None` as for `reject`.
    pub inbound: Option<InboundMaps>,
}

/// The inbound limiter: port classes, limits and counters (the token
/// buckets are the datapath's alone).
pub struct InboundMaps {
    pub ports: Array<MapData, u32>,
    pub limits: Array<MapData, RateLimit>,
    pub stats: PerCpuArray<MapData, u64>,
}

impl InboundMaps {
    fn build(get: &mut dyn FnMut(&str) -> Result<Option<Map>>) -> Result<Option<InboundMaps>> {
        let Some(ports) = get(names::IN_PORTS)? else { return Ok(None) };
        Ok(Some(InboundMaps {
            ports: typed(Some(ports), names::IN_PORTS)?,
            limits: typed(get(names::IN_LIMITS)?, names::IN_LIMITS)?,
            stats: typed(get(names::IN_STATS)?, names::IN_STATS)?,
        }))
    }

    /// Writes the classes: `classes[i]` = (ports, limit) is class `i + 1`;
    /// every other port is not limited. Limits are written first, so a port
    /// never points at a class not yet written, and only port words that
    /// change are written (each write is atomic).
    pub fn set(&mut self, classes: &[(Vec<u16>, RateLimit)]) -> Result<()> {
        if classes.len() >= MAX_LIMIT_CLASSES as usize {
            return Err(Error::bpf_msg(format!("at most {} inbound limit classes", MAX_LIMIT_CLASSES - 1)));
        }
        let mut want = vec![0u32; IN_PORT_ENTRIES as usize];
        for (i, (ports, _)) in classes.iter().enumerate() {
            for &p in ports {
                want[p as usize] = i as u32 + 1;
            }
        }
        for class in 1..MAX_LIMIT_CLASSES {
            let lim = classes.get(class as usize - 1).map(|(_, l)| *l).unwrap_or_default();
            self.limits.set(class, lim, 0).map_err(|e| Error::bpf("write inbound limits", e))?;
        }
        for (port, &w) in want.iter().enumerate() {
            let cur = self.ports.get(&(port as u32), 0).map_err(|e| Error::bpf("read inbound ports", e))?;
            if cur != w {
                self.ports.set(port as u32, w, 0).map_err(|e| Error::bpf("write inbound ports", e))?;
            }
        }
        Ok(())
    }

    /// The classes as the datapath holds them: (class, ports, limit).
    pub fn classes(&self) -> Result<Vec<LimitClassState>> {
        let mut classes: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
        for (port, c) in self.ports.iter().enumerate() {
            let c = c.map_err(|e| Error::bpf("read inbound ports", e))?;
            if c != 0 {
                classes.entry(c).or_default().push(port as u16);
            }
        }
        let mut out = Vec::new();
        for (c, ports) in classes {
            let lim = self.limits.get(&c, 0).map_err(|e| Error::bpf("read inbound limits", e))?;
            out.push((c, ports, lim));
        }
        Ok(out)
    }

    /// The counters summed over CPUs: (class, counter) → count, only those
    /// that moved.
    pub fn counters(&self) -> Result<BTreeMap<(u32, u32), u64>> {
        let mut out = BTreeMap::new();
        for (index, v) in self.stats.iter().enumerate() {
            let sum: u64 = v.map_err(|e| Error::bpf("read inbound counters", e))?.iter().sum();
            if sum > 0 {
                let i = index as u32;
                out.insert((i / IN_COUNTERS, i % IN_COUNTERS), sum);
            }
        }
        Ok(out)
    }
}

/// Reject with a reason: the datapath's settings and lease, the quiet table
/// and the counters (the listener sockmap is the agent's alone, see
/// `datapath::rejector`).
pub struct RejectMaps {
    pub config: Array<MapData, RejectConfig>,
    pub quiet: Array<MapData, QuietSlot>,
    pub stats: PerCpuArray<MapData, u64>,
}

impl RejectMaps {
    fn build(get: &mut dyn FnMut(&str) -> Result<Option<Map>>) -> Result<Option<RejectMaps>> {
        let Some(config) = get(names::REJECT)? else { return Ok(None) };
        Ok(Some(RejectMaps {
            config: typed(Some(config), names::REJECT)?,
            quiet: typed(get(names::REJ_QUIET)?, names::REJ_QUIET)?,
            stats: typed(get(names::REJ_STATS)?, names::REJ_STATS)?,
        }))
    }

    pub fn get(&self) -> Result<RejectConfig> {
        self.config.get(&0, 0).map_err(|e| Error::bpf("read reject settings", e))
    }

    /// Writes the settings and lease in one update.
    pub fn set(&mut self, rc: RejectConfig) -> Result<()> {
        self.config.set(0, rc, 0).map_err(|e| Error::bpf("write reject settings", e))
    }

    /// Silences a source (its refused SYNs are dropped, not answered) until
    /// `until_ns` on the datapath clock. Takes the source's slot whoever
    /// held it.
    pub fn quiet(&mut self, key: KeyWords, until_ns: u64, hash: &HashKey) -> Result<()> {
        let slot = quiet_slot(&key, hash);
        self.quiet.set(slot, QuietSlot { key, until_ns }, 0).map_err(|e| Error::bpf("write quiet table", e))
    }

    /// The reject counters summed over CPUs, by slot (all of them).
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..REJECT_COUNTER_SLOTS)
            .map(|i| self.stats.get(&i, 0).map(|v| v.iter().sum()).map_err(|e| Error::bpf("read reject counters", e)))
            .collect()
    }
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

pub(crate) fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Option<Map>, name: &str) -> Result<T> {
    let map = map.ok_or_else(|| Error::bpf_msg(format!("map {name} missing from the eBPF object")))?;
    T::try_from(map).map_err(|e| Error::bpf(format!("map {name}"), e))
}

impl Maps {
    /// Opens the maps a running (or departed) agent pinned under `layout`.
    pub fn open_pinned(layout: &PinLayout) -> Result<Maps> {
        if !layout.is_loaded() {
            return Err(Error::bpf_msg(format!(
                "no gatekeeper datapath is pinned at {} (start one with `gatekeeper run`)",
                layout.root.display()
            )));
        }
        let open = |name: &str| -> Result<Option<Map>> {
            let path = layout.map(name);
            let data = MapData::from_pin(&path).map_err(|e| Error::bpf(format!("open {}", path.display()), e))?;
            Map::from_map_data(data).map(Some).map_err(|e| Error::bpf(format!("map {name}"), e))
        };
        let mut get = |name: &str| {
            // An older gatekeeper's pins have no reject or inbound maps.
            if [
                names::REJECT,
                names::REJ_QUIET,
                names::REJ_STATS,
                names::REJ_BUDGET,
                names::IN_PORTS,
                names::IN_LIMITS,
                names::IN_STATS,
            ]
            .contains(&name)
                && !layout.map(name).exists()
            {
                return Ok(None);
            }
            open(name)
        };
        Maps::build(&mut get)
    }

    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        Maps::build(&mut |name: &str| Ok(ebpf.take_map(name)))
    }

    fn build(get: &mut dyn FnMut(&str) -> Result<Option<Map>>) -> Result<Maps> {
        let config: Array<MapData, Config> = typed(get(names::CONFIG)?, names::CONFIG)?;
        let hash = config.get(&0, 0).map_err(|e| Error::bpf("read config", e))?.hash;
        Ok(Maps {
            ranges: RangeMaps::build(get)?,
            verdicts: VerdictTable::new(typed(get(names::VERDICTS)?, names::VERDICTS)?, hash)?,
            ports: typed(get(names::PORTS)?, names::PORTS)?,
            config,
            stats: typed(get(names::STATS)?, names::STATS)?,
            range_hits: typed(get(names::RANGE_HITS)?, names::RANGE_HITS)?,
            eg_ports: typed(get(names::EG_PORTS)?, names::EG_PORTS)?,
            eg_limits: typed(get(names::EG_LIMITS)?, names::EG_LIMITS)?,
            eg_stats: typed(get(names::EG_STATS)?, names::EG_STATS)?,
            reject: RejectMaps::build(get)?,
            inbound: InboundMaps::build(get)?,
        })
    }

    /// Writes the egress port policy: `guarded` ports are blocked from
    /// pools, `classes[i]` = (ports, limit) is rate-limit class `i + 1`.
    /// Only words that change are written; a port keeps its old policy
    /// until its new word lands (each write is atomic).
    pub fn set_egress_policy(&mut self, guarded: &[u16], classes: &[(Vec<u16>, RateLimit)]) -> Result<()> {
        if classes.len() >= MAX_LIMIT_CLASSES as usize {
            return Err(Error::bpf_msg(format!("at most {} rate-limit classes", MAX_LIMIT_CLASSES - 1)));
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
            self.eg_limits.set(class, lim, 0).map_err(|e| Error::bpf("write rate limits", e))?;
        }
        for (port, &w) in want.iter().enumerate() {
            let cur = self.eg_ports.get(&(port as u32), 0).map_err(|e| Error::bpf("read egress ports", e))?;
            if cur != w {
                self.eg_ports.set(port as u32, w, 0).map_err(|e| Error::bpf("write egress ports", e))?;
            }
        }
        Ok(())
    }

    /// The egress port policy: (guarded ports, ports of each class 1..).
    pub fn egress_policy(&self) -> Result<(Vec<u16>, Vec<LimitClassState>)> {
        let mut guarded = Vec::new();
        let mut classes: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
        for (port, w) in self.eg_ports.iter().enumerate() {
            let w = w.map_err(|e| Error::bpf("read egress ports", e))?;
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
            let lim = self.eg_limits.get(&c, 0).map_err(|e| Error::bpf("read rate limits", e))?;
            out.push((c, ports, lim));
        }
        Ok((guarded, out))
    }

    /// Sets the verdict of `key`; returns the source whose (drop) verdict
    /// was evicted to make room, if any.
    pub fn set_verdict(&mut self, key: SourceKey, v: Verdict) -> Result<Option<SourceKey>> {
        let evicted = self.verdicts.insert(key, v)?;
        if let Some(evicted) = evicted {
            debug!(
                source = %key.display(),
                evicted = %evicted.display(),
                "verdict table: both buckets full, replaced the verdict expiring first"
            );
        }
        Ok(evicted)
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
            let cur = self.ports.get(&(i as u32), 0).map_err(|e| Error::bpf("read ports", e))?;
            if cur | w != cur {
                self.ports.set(i as u32, cur | w, 0).map_err(|e| Error::bpf("write ports", e))?;
            }
        }
        for (i, &w) in want.iter().enumerate() {
            let cur = self.ports.get(&(i as u32), 0).map_err(|e| Error::bpf("read ports", e))?;
            if cur != w {
                self.ports.set(i as u32, w, 0).map_err(|e| Error::bpf("write ports", e))?;
            }
        }
        Ok(())
    }

    pub fn ports(&self) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for (i, w) in self.ports.iter().enumerate() {
            let w = w.map_err(|e| Error::bpf("read ports", e))?;
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    out.push((i * 64 + bit) as u16);
                }
            }
        }
        Ok(out)
    }

    /// Writes the config; its hash secret is always the one the verdict
    /// table is placed with (see [`Maps::ensure_hash_key`]).
    pub fn set_config(&mut self, c: Config) -> Result<()> {
        let c = Config { hash: self.verdicts.hash_key(), ..c };
        self.config.set(0, c, 0).map_err(|e| Error::bpf("write config", e))
    }

    /// Gives maps just created their hash secret, random, kept in the
    /// pinned config for as long as the maps live (a restarted agent finds
    /// its verdicts where they were placed). Maps without one are emptied
    /// first: what they held was placed without it (reconcile writes the
    /// database's verdicts back). True if a new secret was made.
    pub fn ensure_hash_key(&mut self) -> Result<bool> {
        let c = self.config()?;
        if c.hash.is_set() {
            return Ok(false);
        }
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| Error::bpf_msg(format!("no random numbers for the hash secret: {e}")))?;
        let r = [
            u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(bytes[8..].try_into().expect("8 bytes")),
        ];
        let hash = HashKey::from_random(r);
        self.verdicts.reset(hash)?;
        self.set_config(c)?;
        Ok(true)
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).map_err(|e| Error::bpf("read config", e))
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
            let sum: u64 = self.range_hits.get(&id, 0).map_err(|e| Error::bpf("read range hits", e))?.iter().sum();
            if sum > 0 {
                out.insert(id, sum);
            }
        }
        Ok(out)
    }

    /// Zeroes a range id's hit counter (when the id is given to a new range).
    pub fn reset_range_hits(&mut self, id: u32) -> Result<()> {
        let ncpu = aya::util::nr_cpus().map_err(|(w, e)| Error::bpf(w, e))?;
        let zeros = PerCpuValues::try_from(vec![0u64; ncpu]).map_err(|e| Error::bpf("zero range hits", e))?;
        self.range_hits.set(id, zeros, 0).map_err(|e| Error::bpf(format!("reset hits of range id {id}"), e))
    }
}

/// Per-CPU counters summed, by (interface slot, counter); only those that
/// moved.
fn sum_counters(stats: &PerCpuArray<MapData, u64>) -> Result<BTreeMap<StatKey, u64>> {
    let mut out = BTreeMap::new();
    for (index, v) in stats.iter().enumerate() {
        let sum: u64 = v.map_err(|e| Error::bpf("read counters", e))?.iter().sum();
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
            let (_, e) = item.map_err(|e| Error::bpf("read range index", e))?;
            let net = match e.family {
                family::V4 => {
                    ipnet::Ipv4Net::new([e.addr[0], e.addr[1], e.addr[2], e.addr[3]].into(), e.prefix_len as u8)
                        .map(IpNet::V4)
                }
                _ => ipnet::Ipv6Net::new(e.addr.into(), e.prefix_len as u8).map(IpNet::V6),
            }
            .map_err(|err| Error::bpf("bad range index entry", err))?;
            entries[RangeTable::of_code(e.value.kind) as usize].insert(net, e.value);
        }
        let mut table = |t: RangeTable, entries: StdMap<IpNet, RangeValue>| -> Result<TableMaps> {
            let name = table_map(t);
            let data = match get(name)? {
                Some(Map::Array(d)) => d,
                Some(_) => return Err(Error::bpf_msg(format!("map {name} is not an array"))),
                None => return Err(Error::bpf_msg(format!("map {name} missing from the eBPF object"))),
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
        let err = |e| Error::bpf(format!("insert range {net}"), e);
        let t = self.table_mut(RangeTable::of_code(value.kind));
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
        let err = |e| Error::bpf(format!("remove range {net}"), e);
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

    /// The longest entry of `table` holding `ip`, as the datapath's
    /// lookup finds it (at most 33 or 129 probes of the entry map).
    pub fn longest(&self, table: RangeTable, ip: std::net::IpAddr) -> Option<(IpNet, RangeValue)> {
        let entries = &self.table(table).entries;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (0..=max).rev().find_map(|len| {
            let net = IpNet::new(ip, len).ok()?.trunc();
            entries.get(&net).map(|v| (net, *v))
        })
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
