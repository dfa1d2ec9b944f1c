//! The agent's side of the range tables (layout and lookup in
//! `gatekeeper_common::trie`): building and updating the trie nodes in place
//! while the datapath reads them.
//!
//! The prefixes live here in a `BTreeMap`; the nodes live in the kernel map,
//! mapped into this process, so reading them costs nothing and every entry
//! is written with one atomic store. A change rewrites only the entries it
//! affects: along the changed prefix's path, and everything under its span
//! (leaf pushing copies a range into the nodes below it). Writes are ordered
//! so that a concurrent lookup always sees either the old or the new answer
//! for its address:
//! * a new child node is filled before the entry pointing at it;
//! * a child that is no longer needed is unlinked before it is freed, and
//!   freed nodes are reused only by a later change, and only once every
//!   datapath program that might still be reading them has finished: after
//!   an RCU grace period ([`GracePeriod`]) that started after they were
//!   unlinked.
use std::{
    collections::{BTreeMap, HashSet},
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::maps::MapData;
use gatekeeper_common::{
    trie::{leaf, root_node, TrieNode, CHILD, FANOUT, INDEX_MASK, ROOT_NODES},
    RangeValue,
};
use ipnet::IpNet;

use crate::{Error, Result};

/// Waits until no datapath program can still be reading what the agent
/// unlinked before the wait began.
pub trait GracePeriod: Send {
    /// Returns once every datapath program that was running when it was
    /// called has finished. `unlinked_at`: when the newest node waiting for
    /// it was unlinked (for a fallback that can only wait a while).
    fn wait(&mut self, unlinked_at: Instant);
}

/// `MEMBARRIER_CMD_GLOBAL` of membarrier(2).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// `membarrier(MEMBARRIER_CMD_GLOBAL, 0)`: the kernel runs
/// `synchronize_rcu()` (kernel/sched/membarrier.c), and XDP and TC programs
/// run inside RCU read-side critical sections, so on return every program
/// run that began before the call has ended. The kernel refuses it (EINVAL)
/// under `nohz_full`; older kernels lack it (ENOSYS); a seccomp filter may
/// deny it.
pub fn membarrier_global() -> std::io::Result<()> {
    // SAFETY: membarrier takes two integers (and an unused cpu id) and
    // touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0 as libc::c_uint, 0 as libc::c_int) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Warned once per process that membarrier is unavailable.
static MEMBARRIER_WARNED: AtomicBool = AtomicBool::new(false);

/// The grace period of the real datapath: [`membarrier_global`], or where
/// the kernel refuses it, a wait of [`REUSE_AFTER`] since the unlink (with a
/// one-time warning).
pub struct Membarrier {
    call: fn() -> std::io::Result<()>,
    /// membarrier failed once: it always will (the kernel's contract for
    /// EINVAL and ENOSYS), so only wait from then on.
    fallback: bool,
}

impl Membarrier {
    pub fn new() -> Membarrier {
        Membarrier::with_call(membarrier_global)
    }

    /// With another system call (tests).
    pub fn with_call(call: fn() -> std::io::Result<()>) -> Membarrier {
        Membarrier { call, fallback: false }
    }

    /// Whether it fell back to waiting.
    pub fn fallen_back(&self) -> bool {
        self.fallback
    }
}

impl Default for Membarrier {
    fn default() -> Self {
        Membarrier::new()
    }
}

impl GracePeriod for Membarrier {
    fn wait(&mut self, unlinked_at: Instant) {
        if !self.fallback {
            match (self.call)() {
                Ok(()) => return,
                Err(e) => {
                    self.fallback = true;
                    if !MEMBARRIER_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "membarrier(MEMBARRIER_CMD_GLOBAL) is not available (nohz_full, an old kernel or a seccomp filter); trie nodes removed from the range tables are reused {} ms after the change instead of after an RCU grace period",
                            REUSE_AFTER.as_millis()
                        );
                    }
                }
            }
        }
        let age = unlinked_at.elapsed();
        if age < REUSE_AFTER {
            std::thread::sleep(REUSE_AFTER - age);
        }
    }
}

/// Where the nodes are.
pub trait NodeStore {
    /// Number of nodes.
    fn nodes(&self) -> u32;
    fn get(&self, node: u32, i: usize) -> u32;
    fn set(&mut self, node: u32, i: usize, v: u32);
}

/// Nodes in memory (tests).
pub struct VecStore(pub Vec<TrieNode>);

impl NodeStore for VecStore {
    fn nodes(&self) -> u32 {
        self.0.len() as u32
    }
    fn get(&self, node: u32, i: usize) -> u32 {
        self.0[node as usize].e[i]
    }
    fn set(&mut self, node: u32, i: usize, v: u32) {
        self.0[node as usize].e[i] = v;
    }
}

/// The kernel's node array, mapped shared (the map is `BPF_F_MMAPABLE`).
pub struct MmapStore {
    ptr: NonNull<u32>,
    nodes: u32,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is owned by this value; entries are only accessed
// through atomics.
unsafe impl Send for MmapStore {}

impl MmapStore {
    pub fn new(map: MapData, name: &str) -> Result<MmapStore> {
        let info = map.info().map_err(|e| Error::bpf(format!("inspect map {name}"), e))?;
        if info.value_size() as usize != size_of::<TrieNode>() {
            return Err(Error::bpf_msg(format!("map {name}: value size {} is not a trie node", info.value_size())));
        }
        let nodes = info.max_entries();
        if nodes < ROOT_NODES {
            return Err(Error::bpf_msg(format!("map {name}: {nodes} nodes, at least {ROOT_NODES} needed")));
        }
        let len = nodes as usize * size_of::<TrieNode>();
        // SAFETY: a fresh shared mapping of the map's whole value area.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&map.fd().as_fd()),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                format!("mmap map {name} (it must be BPF_F_MMAPABLE)"),
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = NonNull::new(p.cast::<u32>()).expect("mmap returned a non-null address");
        Ok(MmapStore { ptr, nodes, len, _map: map })
    }

    fn entry(&self, node: u32, i: usize) -> &AtomicU32 {
        assert!(node < self.nodes && i < FANOUT, "trie entry {node}/{i} out of range");
        // SAFETY: in bounds of the mapping (checked above), u32-aligned.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(node as usize * FANOUT + i)) }
    }
}

impl Drop for MmapStore {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl NodeStore for MmapStore {
    fn nodes(&self) -> u32 {
        self.nodes
    }
    fn get(&self, node: u32, i: usize) -> u32 {
        self.entry(node, i).load(Ordering::Acquire)
    }
    fn set(&mut self, node: u32, i: usize, v: u32) {
        self.entry(node, i).store(v, Ordering::Release)
    }
}

/// A prefix: (family: 0 IPv4, 1 IPv6; network left-aligned in 128 bits;
/// length in the family's bits).
type PKey = (u8, u128, u8);

fn pkey(net: IpNet) -> PKey {
    match net {
        IpNet::V4(n) => (0, u128::from(u32::from(n.network())) << 96, n.prefix_len()),
        IpNet::V6(n) => (1, u128::from(n.network()), n.prefix_len()),
    }
}

const fn bits(fam: u8) -> u8 {
    if fam == 0 {
        32
    } else {
        128
    }
}

/// The first `len` bits of `a`.
const fn mask(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - len as u32))
    }
}

/// The last address of `a`'s /len.
const fn span_end(a: u128, len: u8) -> u128 {
    if len == 0 {
        u128::MAX
    } else {
        mask(a, len) | (u128::MAX >> len as u32)
    }
}

/// How long an unlinked node stays unused when no grace period can be
/// waited for (a datapath lookup takes nanoseconds, but its CPU may be a
/// vCPU the hypervisor stops for a while).
pub const REUSE_AFTER: Duration = Duration::from_millis(50);

/// Which entries of a node an update must recompute.
#[derive(Clone, Copy)]
enum Scope {
    /// All of them (a new node, or one inside the changed prefix).
    All,
    /// Those overlapping this prefix (fam, net, len).
    Prefix(u128, u8),
}

/// One range table.
pub struct Trie<S> {
    store: S,
    prefixes: BTreeMap<PKey, u32>,
    /// Free nodes (taken from the end): no datapath program can be inside
    /// them.
    free: Vec<u32>,
    /// Nodes unlinked by earlier changes: free after the next grace period.
    cooling: Vec<u32>,
    /// When the newest of `cooling` was unlinked.
    cooled_at: Instant,
    /// Nodes unlinked by the change in progress: cooling after it.
    unlinked: Vec<u32>,
    /// Nodes in use (the roots included).
    used: u32,
    grace: Box<dyn GracePeriod>,
    /// Grace periods waited for.
    graces: u64,
}

impl<S: NodeStore> Trie<S> {
    /// Takes over `store` as a previous agent left it, with the entries the
    /// table should hold (call [`Trie::rebuild`] to make the nodes match).
    /// Nodes are reused after a [`Membarrier`] grace period.
    pub fn open(store: S, entries: impl IntoIterator<Item = (IpNet, RangeValue)>) -> Trie<S> {
        Trie::open_with(store, entries, Box::new(Membarrier::new()))
    }

    /// As [`Trie::open`], reusing nodes after `grace`. The nodes no entry
    /// reaches wait for a grace period too: an agent that died mid-change
    /// may have unlinked them moments ago.
    pub fn open_with(
        store: S,
        entries: impl IntoIterator<Item = (IpNet, RangeValue)>,
        grace: Box<dyn GracePeriod>,
    ) -> Trie<S> {
        let n = store.nodes();
        let mut reachable = vec![false; n as usize];
        let mut stack: Vec<u32> = (0..ROOT_NODES.min(n)).collect();
        while let Some(node) = stack.pop() {
            for i in 0..FANOUT {
                let e = store.get(node, i);
                if e & CHILD != 0 {
                    let c = e & INDEX_MASK;
                    if c >= ROOT_NODES && c < n && !reachable[c as usize] {
                        reachable[c as usize] = true;
                        stack.push(c);
                    }
                }
            }
        }
        let cooling: Vec<u32> = (ROOT_NODES..n).rev().filter(|&i| !reachable[i as usize]).collect();
        let used = n - cooling.len() as u32;
        let prefixes = entries.into_iter().map(|(net, v)| (pkey(net), leaf(&v))).collect();
        Trie {
            store,
            prefixes,
            free: Vec::new(),
            cooling,
            cooled_at: Instant::now(),
            unlinked: Vec::new(),
            used,
            grace,
            graces: 0,
        }
    }

    /// Grace periods waited for so far.
    pub fn grace_periods(&self) -> u64 {
        self.graces
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Nodes in use and the capacity, roots included.
    pub fn usage(&self) -> (u32, u32) {
        (self.used, self.store.nodes())
    }

    /// Sets the entry for `net`. On error (the table is full) nothing
    /// changes: the entries written so far are put back.
    pub fn insert(&mut self, net: IpNet, v: RangeValue) -> Result<()> {
        let k = pkey(net);
        let lf = leaf(&v);
        let old = self.prefixes.insert(k, lf);
        if old == Some(lf) {
            return Ok(());
        }
        if let Err(e) = self.update(k) {
            match old {
                Some(o) => self.prefixes.insert(k, o),
                None => self.prefixes.remove(&k),
            };
            // The previous state fitted, and the failed change freed what it
            // took, so this needs no more nodes than there are.
            self.update(k)?;
            return Err(e);
        }
        Ok(())
    }

    /// Removes the entry for `net` (nothing if absent).
    pub fn remove(&mut self, net: IpNet) -> Result<()> {
        let k = pkey(net);
        if self.prefixes.remove(&k).is_none() {
            return Ok(());
        }
        self.update(k)
    }

    /// Rewrites every entry that differs from what the prefixes call for
    /// (after a previous agent died mid-change); returns how many.
    pub fn rebuild(&mut self) -> Result<usize> {
        let mut writes = 0;
        for fam in [0u8, 1] {
            writes += self.apply(fam, Scope::All)?;
        }
        Ok(writes)
    }

    fn update(&mut self, (fam, net, len): PKey) -> Result<()> {
        self.apply(fam, Scope::Prefix(net, len)).map(drop)
    }

    /// Recomputes the roots of family `fam` within `scope`.
    fn apply(&mut self, fam: u8, scope: Scope) -> Result<usize> {
        let (first, count) = match scope {
            Scope::All => (0u32, 256u32),
            Scope::Prefix(net, len) if len < 8 => ((net >> 120) as u32, 1 << (8 - len)),
            Scope::Prefix(net, _) => ((net >> 120) as u32, 1),
        };
        let mut writes = 0;
        let mut result = Ok(());
        for b in first..first + count {
            let p = (b as u128) << 120;
            let inherited = self.best(fam, p, 0, 8).unwrap_or(0);
            let node_scope = match scope {
                Scope::Prefix(_, len) if len <= 8 => Scope::All,
                s => s,
            };
            if let Err(e) = self.node(fam, root_node(fam == 1, b as u8), 8, p, inherited, node_scope, &mut writes) {
                result = Err(e);
                break;
            }
        }
        // What this change unlinked may be reused once no lookup can still
        // be inside it: after a grace period that starts from now on.
        if !self.unlinked.is_empty() {
            self.used -= self.unlinked.len() as u32;
            self.cooling.append(&mut self.unlinked);
            self.cooled_at = Instant::now();
        }
        result.map(|_| writes)
    }

    /// The longest prefix of length `min..=max` covering `q`.
    fn best(&self, fam: u8, q: u128, min: u8, max: u8) -> Option<u32> {
        (min..=max).rev().find_map(|len| self.prefixes.get(&(fam, mask(q, len), len)).copied())
    }

    /// Whether some prefix longer than `len` lies inside `q`'s /len.
    fn has_longer(&self, fam: u8, q: u128, len: u8) -> bool {
        self.prefixes.range((fam, q, len + 1)..=(fam, span_end(q, len), u8::MAX)).next().is_some()
    }

    /// A free node. Nodes unlinked by earlier changes become free only
    /// after a grace period that began after their unlink: when no free node
    /// is left, one grace period frees all of them at once (so a change
    /// waits for at most one, however many nodes it takes).
    fn alloc(&mut self) -> Result<u32> {
        if self.free.is_empty() && !self.cooling.is_empty() {
            self.grace.wait(self.cooled_at);
            self.graces += 1;
            self.free.append(&mut self.cooling);
        }
        let n = self
            .free
            .pop()
            .ok_or(Error::Full { what: "range table (trie nodes)", capacity: self.store.nodes() as u64 })?;
        self.used += 1;
        Ok(n)
    }

    /// Recomputes the entries of node `idx` (depth `d`: it covers the
    /// prefix `p`/d, entries are its /d+8s) within `scope`; `inherited` is
    /// the longest prefix of length <= d covering `p`.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        fam: u8,
        idx: u32,
        d: u8,
        p: u128,
        inherited: u32,
        scope: Scope,
        writes: &mut usize,
    ) -> Result<()> {
        let elen = d + 8;
        let shift = 128 - elen as u32;
        let (lo, hi) = match scope {
            Scope::All => (0usize, FANOUT),
            Scope::Prefix(net, len) if len <= elen => {
                let i = ((net >> shift) & 0xff) as usize;
                (i, i + (1usize << (elen - len)))
            }
            Scope::Prefix(net, _) => {
                let i = ((net >> shift) & 0xff) as usize;
                (i, i + 1)
            }
        };
        // Leaves and "has longer prefixes" of the entries in scope.
        let mut leaves = [inherited; FANOUT];
        let mut longer = [false; FANOUT];
        if hi - lo == FANOUT {
            // Paint every prefix of length d+1..=d+8 inside p, shortest first.
            let mut inside: Vec<(u8, u128, u32)> = Vec::new();
            for (&(_, net, len), &lf) in self.prefixes.range((fam, p, d + 1)..=(fam, span_end(p, d), u8::MAX)) {
                if len <= elen {
                    inside.push((len, net, lf));
                } else {
                    longer[((net >> shift) & 0xff) as usize] = true;
                }
            }
            inside.sort_unstable_by_key(|x| x.0);
            for (len, net, lf) in inside {
                let i = ((net >> shift) & 0xff) as usize;
                leaves[i..i + (1usize << (elen - len))].fill(lf);
            }
        } else {
            for (i, leaf) in leaves.iter_mut().enumerate().take(hi).skip(lo) {
                let q = p | ((i as u128) << shift);
                if let Some(lf) = self.best(fam, q, d + 1, elen) {
                    *leaf = lf;
                }
                longer[i] = elen < bits(fam) && self.has_longer(fam, q, elen);
            }
        }
        for i in lo..hi {
            let q = p | ((i as u128) << shift);
            let old = self.store.get(idx, i);
            let old_child =
                (old & CHILD != 0).then_some(old & INDEX_MASK).filter(|c| (ROOT_NODES..self.store.nodes()).contains(c));
            let new = if longer[i] && elen < bits(fam) {
                let (child, child_scope) = match (old_child, scope) {
                    (Some(c), Scope::Prefix(net, len)) if len > elen => (c, Scope::Prefix(net, len)),
                    (Some(c), _) => (c, Scope::All),
                    (None, _) => (self.alloc()?, Scope::All),
                };
                let fresh = old_child.is_none();
                if old_child.is_none() {
                    // A fresh node: whatever a previous use left is rewritten.
                    for j in 0..FANOUT {
                        self.store.set(child, j, 0);
                    }
                }
                if let Err(e) = self.node(fam, child, elen, q, leaves[i], child_scope, writes) {
                    if fresh {
                        // Never linked: it and what was linked under it
                        // go back.
                        self.unlink(child);
                    }
                    return Err(e);
                }
                CHILD | child
            } else {
                leaves[i]
            };
            if new != old {
                self.store.set(idx, i, new);
                *writes += 1;
                if let Some(c) = old_child.filter(|_| new & CHILD == 0) {
                    self.unlink(c);
                }
            }
        }
        Ok(())
    }

    /// Collects node `c` and its descendants for freeing.
    fn unlink(&mut self, c: u32) {
        let mut stack = vec![c];
        let mut seen = HashSet::new();
        while let Some(n) = stack.pop() {
            if !seen.insert(n) {
                continue;
            }
            self.unlinked.push(n);
            for i in 0..FANOUT {
                let e = self.store.get(n, i);
                if e & CHILD != 0 && (ROOT_NODES..self.store.nodes()).contains(&(e & INDEX_MASK)) {
                    stack.push(e & INDEX_MASK);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekeeper_common::trie::lookup;
    use std::net::{Ipv4Addr, Ipv6Addr};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn value(id: u32) -> RangeValue {
        RangeValue { range_id: id, kind: (id % 3) as u8 + 1, flags: (id % 2) as u8, origin: 0 }
    }

    fn empty(nodes: usize) -> Trie<VecStore> {
        Trie::open(VecStore(vec![TrieNode::default(); nodes]), [])
    }

    /// Brute-force longest match over the model.
    fn reference(set: &BTreeMap<IpNet, RangeValue>, ip: std::net::IpAddr) -> Option<RangeValue> {
        set.iter().filter(|(n, _)| n.contains(&ip)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, v)| *v)
    }

    fn look(t: &Trie<VecStore>, ip: std::net::IpAddr) -> Option<RangeValue> {
        let nodes = &t.store().0;
        let get = |i: u32| nodes.get(i as usize);
        match ip {
            std::net::IpAddr::V4(a) => lookup(get, &a.octets()),
            std::net::IpAddr::V6(a) => lookup(get, &a.octets()),
        }
    }

    fn random_net(r: &mut Rng) -> IpNet {
        if r.next().is_multiple_of(3) {
            // Clustered in 2001:db8::/32 so that prefixes nest.
            let len = 20 + (r.next() % 109) as u8;
            let a = (0x2001_0db8u128 << 96) | (u128::from(r.next() % 16) << 80) | u128::from(r.next());
            IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
        } else {
            let len = (r.next() % 33) as u8;
            let a = 0xc633_0000u32 | (r.next() as u32 & 0x0003_ffff) ^ ((r.next() as u32 % 4) << 28);
            IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc())
        }
    }

    fn probe(r: &mut Rng, set: &BTreeMap<IpNet, RangeValue>) -> std::net::IpAddr {
        // Mostly addresses inside or next to known prefixes.
        let nets: Vec<&IpNet> = set.keys().collect();
        if nets.is_empty() || r.next().is_multiple_of(4) {
            return match random_net(r) {
                IpNet::V4(n) => n.network().into(),
                IpNet::V6(n) => n.network().into(),
            };
        }
        let n = nets[(r.next() % nets.len() as u64) as usize];
        match n {
            IpNet::V4(n) => {
                Ipv4Addr::from(u32::from(n.network()).wrapping_add((r.next() % 600) as u32).wrapping_sub(100)).into()
            }
            IpNet::V6(n) => {
                Ipv6Addr::from(u128::from(n.network()).wrapping_add(u128::from(r.next() % 600)).wrapping_sub(100))
                    .into()
            }
        }
    }

    #[test]
    fn matches_a_brute_force_lpm_through_inserts_and_removals() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = empty(4096);
        let mut set = BTreeMap::new();
        for step in 0..1500u32 {
            if step % 3 == 2 && !set.is_empty() {
                let k = *set.keys().nth((r.next() % set.len() as u64) as usize).unwrap();
                set.remove(&k);
                t.remove(k).unwrap();
            } else {
                let n = random_net(&mut r);
                set.insert(n, value(step));
                t.insert(n, value(step)).unwrap();
            }
            for _ in 0..20 {
                let ip = probe(&mut r, &set);
                let want = reference(&set, ip).map(|v| RangeValue { origin: 0, ..v });
                assert_eq!(look(&t, ip), want, "step {step}, {ip}");
            }
        }
        // Removing everything frees every node but the roots.
        for k in set.keys().copied().collect::<Vec<_>>() {
            t.remove(k).unwrap();
        }
        assert_eq!(t.usage(), (ROOT_NODES, 4096));
        let roots = &t.store().0[..ROOT_NODES as usize];
        assert!(roots.iter().all(|n| n.e.iter().all(|&e| e == 0)), "every root entry cleared");
    }

    #[test]
    fn reopening_finds_the_used_nodes_and_rebuild_repairs() {
        let mut t = empty(2048);
        let nets: Vec<IpNet> =
            ["198.51.100.0/24", "198.51.100.128/25", "198.51.100.7/32", "2001:db8::/32", "2001:db8:1:2::/64"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        for (i, n) in nets.iter().enumerate() {
            t.insert(*n, value(i as u32)).unwrap();
        }
        let (used, _) = t.usage();
        assert_eq!(used, ROOT_NODES + 2 + 6, "v4: /16 and /24 nodes; v6: /16../56 nodes");
        let entries: Vec<(IpNet, RangeValue)> = nets.iter().enumerate().map(|(i, n)| (*n, value(i as u32))).collect();
        let VecStore(mut nodes) = std::mem::replace(&mut t.store, VecStore(Vec::new()));
        // Damage a leaf, as an agent dying mid-change could leave it.
        let n24 = (0..nodes.len()).find(|&i| nodes[i].e[7] == leaf(&value(2))).unwrap();
        nodes[n24].e[7] = 0;
        let mut t = Trie::open(VecStore(nodes), entries.clone());
        assert_eq!(t.usage().0, used);
        assert_eq!(t.rebuild().unwrap(), 1);
        assert_eq!(t.rebuild().unwrap(), 0);
        assert_eq!(look(&t, "198.51.100.7".parse().unwrap()), Some(value(2)));
        // A fresh store rebuilt from the entries alone.
        let mut fresh = Trie::open(VecStore(vec![TrieNode::default(); 2048]), entries);
        assert!(fresh.rebuild().unwrap() > 0);
        assert_eq!(look(&fresh, "2001:db8:1:2::9".parse().unwrap()), Some(value(4)));
        assert_eq!(look(&fresh, "2001:db8:1:3::9".parse().unwrap()), Some(value(3)));
    }

    #[test]
    fn full_table_is_an_error_and_keeps_answers_right() {
        // Roots plus 4 nodes; two /32s in 198.51.100/24 and .101/24 take 3.
        let mut t = empty(ROOT_NODES as usize + 4);
        t.insert("198.51.100.1/32".parse().unwrap(), value(1)).unwrap();
        t.insert("198.51.101.1/32".parse().unwrap(), value(2)).unwrap();
        let before = t.usage();
        // A /32 in a new /16 needs 2: its /16 node fits, its /24 node does
        // not; the /16 node must come back and nothing change.
        let err = t.insert("203.0.113.1/32".parse().unwrap(), value(4)).unwrap_err();
        assert!(err.to_string().contains("trie nodes"), "{err}");
        assert_eq!(t.usage(), before, "nodes of the failed insert released");
        assert_eq!(look(&t, "203.0.113.1".parse().unwrap()), None);
        // The freed node is reused (after the reuse delay).
        t.insert("198.51.102.1/32".parse().unwrap(), value(3)).unwrap();
        let err = t.insert("198.51.103.1/32".parse().unwrap(), value(5)).unwrap_err();
        assert!(err.to_string().contains("trie nodes"), "{err}");
        for (ip, v) in [("198.51.100.1", Some(1)), ("198.51.101.1", Some(2)), ("198.51.102.1", Some(3))] {
            assert_eq!(look(&t, ip.parse().unwrap()), v.map(value), "{ip}");
        }
        assert_eq!(look(&t, "198.51.103.1".parse().unwrap()), None);
        // Room made by a removal is used again.
        t.remove("198.51.101.1/32".parse().unwrap()).unwrap();
        t.insert("198.51.103.1/32".parse().unwrap(), value(5)).unwrap();
        assert_eq!(look(&t, "198.51.103.1".parse().unwrap()), Some(value(5)));
        assert_eq!(look(&t, "198.51.101.1".parse().unwrap()), None);
    }
    /// A grace period that only counts: each wait ends an epoch.
    struct Epochs(std::sync::Arc<std::sync::atomic::AtomicU64>);
    impl GracePeriod for Epochs {
        fn wait(&mut self, _: Instant) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Nodes in memory, logging each write with the epoch it happened in.
    struct Watched {
        nodes: VecStore,
        epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
        writes: Vec<(u32, u64)>,
    }
    impl NodeStore for Watched {
        fn nodes(&self) -> u32 {
            self.nodes.nodes()
        }
        fn get(&self, node: u32, i: usize) -> u32 {
            self.nodes.get(node, i)
        }
        fn set(&mut self, node: u32, i: usize, v: u32) {
            self.writes.push((node, self.epoch.load(Ordering::SeqCst)));
            self.nodes.set(node, i, v)
        }
    }

    /// Nodes reachable from the roots.
    fn reachable(t: &Trie<Watched>) -> HashSet<u32> {
        let mut out = HashSet::new();
        let mut stack: Vec<u32> = (0..ROOT_NODES).collect();
        while let Some(n) = stack.pop() {
            for i in 0..FANOUT {
                let e = t.store().get(n, i);
                if e & CHILD != 0 && out.insert(e & INDEX_MASK) {
                    stack.push(e & INDEX_MASK);
                }
            }
        }
        out
    }

    #[test]
    fn unlinked_nodes_are_reused_only_after_a_grace_period_one_per_change() {
        let epoch = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Roots and 8 nodes: four /32s in distinct /16s take them all.
        let store = Watched {
            nodes: VecStore(vec![TrieNode::default(); ROOT_NODES as usize + 8]),
            epoch: epoch.clone(),
            writes: Vec::new(),
        };
        let mut t = Trie::open_with(store, [], Box::new(Epochs(epoch.clone())));
        let first: Vec<IpNet> = (0..4).map(|i| format!("198.{}.100.1/32", 51 + i).parse().unwrap()).collect();
        for n in &first {
            t.insert(*n, value(1)).unwrap();
        }
        assert_eq!(t.grace_periods(), 1, "the nodes found unused at open wait for one grace period too");
        let old = reachable(&t);
        assert_eq!(old.len(), 8);
        // Removing unlinks them: no grace period yet, nothing written into
        // them (a lookup may still be inside).
        let before = epoch.load(Ordering::SeqCst);
        t.store.writes.clear();
        for n in &first {
            t.remove(*n).unwrap();
        }
        assert_eq!(t.grace_periods(), 1);
        assert!(
            t.store().writes.iter().all(|(n, _)| !old.contains(n)),
            "an unlinked node was written before a grace period"
        );
        // A change that needs four nodes again reuses them after exactly
        // one grace period, begun after the unlink.
        t.insert("203.0.113.0/32".parse().unwrap(), value(2)).unwrap();
        t.insert("203.1.113.0/32".parse().unwrap(), value(2)).unwrap();
        assert_eq!(t.grace_periods(), 2, "one grace period for all the nodes");
        let reused: Vec<&(u32, u64)> = t.store().writes.iter().filter(|(n, _)| old.contains(n)).collect();
        assert!(!reused.is_empty());
        assert!(reused.iter().all(|(_, e)| *e > before), "a node was reused before its grace period ended");
        // Nodes already past a grace period are used without another.
        t.insert("203.2.113.0/32".parse().unwrap(), value(2)).unwrap();
        t.insert("203.3.113.0/32".parse().unwrap(), value(2)).unwrap();
        assert_eq!(t.grace_periods(), 2);
        // Full: what a removal unlinks is reused after one more.
        t.remove("203.0.113.0/32".parse().unwrap()).unwrap();
        let before = epoch.load(Ordering::SeqCst);
        t.store.writes.clear();
        t.insert("192.0.2.1/32".parse().unwrap(), value(3)).unwrap();
        assert_eq!(t.grace_periods(), 3);
        assert!(t.store().writes.iter().all(|(_, e)| *e > before));
        assert_eq!(look_w(&t, "192.0.2.1"), Some(value(3)));
        assert_eq!(look_w(&t, "203.1.113.0"), Some(value(2)));
        assert_eq!(look_w(&t, "203.0.113.0"), None);
    }

    fn look_w(t: &Trie<Watched>, ip: &str) -> Option<RangeValue> {
        let nodes = &t.store().nodes.0;
        let a: Ipv4Addr = ip.parse().unwrap();
        lookup(|i: u32| nodes.get(i as usize), &a.octets())
    }

    #[test]
    fn without_membarrier_nodes_wait_the_fixed_delay() {
        fn refused() -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        }
        let mut g = Membarrier::with_call(refused);
        let t0 = Instant::now();
        g.wait(t0);
        assert!(g.fallen_back());
        assert!(t0.elapsed() >= REUSE_AFTER, "waited {:?}", t0.elapsed());
        // Long since unlinked: no wait.
        let t1 = Instant::now();
        g.wait(t1 - REUSE_AFTER * 4);
        assert!(t1.elapsed() < REUSE_AFTER);
        // The real call works here, or fails as the kernel documents.
        match membarrier_global() {
            Ok(()) => {}
            Err(e) => assert!(matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)), "{e}"),
        }
    }
}
