//! Ranges (deny, allow, pool, exempt, smarthost) in a test's own datapath
//! instance, kept the way the agent keeps them: database records
//! ([`RangeRecord`]) from which `desired_ranges` decides what the range
//! maps hold, and `RangeMaps` writes it.

use aya::Ebpf;
use gatekeeper::{
    agent::sync::desired_ranges,
    datapath::RangeMaps,
    domain::{Origin, PoolAction, RangeKind},
    store::RangeRecord,
};
use ipnet::IpNet;

/// A manual range record as the agent's database would hold it.
pub fn record(id: u32, kind: RangeKind, net: IpNet, action: Option<PoolAction>) -> RangeRecord {
    RangeRecord { action, ..RangeRecord::manual(id, kind, net) }
}

/// The range records of one datapath instance and its range maps.
pub struct AgentRanges {
    records: Vec<RangeRecord>,
    maps: RangeMaps,
}

impl AgentRanges {
    /// Takes the range maps out of `bpf`; no ranges yet.
    pub fn take(bpf: &mut Ebpf) -> Self {
        AgentRanges { records: Vec::new(), maps: RangeMaps::take(bpf).expect("range maps") }
    }

    /// Adds a range (`net` as text) and writes the maps.
    pub fn add(&mut self, kind: RangeKind, net: &str, id: u32, action: Option<PoolAction>) {
        self.records.push(record(id, kind, net.parse().unwrap(), action));
        self.sync();
    }

    /// Adds a deny range the agent learned (`origin = learned`).
    pub fn add_learned(&mut self, net: &str, id: u32) {
        let r = record(id, RangeKind::Deny, net.parse().unwrap(), None);
        self.records.push(RangeRecord { origin: Origin::Learned, ..r });
        self.sync();
    }

    /// Replaces every range with `records` and writes the maps.
    pub fn replace(&mut self, records: Vec<RangeRecord>) {
        self.records = records;
        self.sync();
    }

    /// Removes the `kind` range `net` (there must be one) and writes the maps.
    pub fn remove(&mut self, kind: RangeKind, net: &str) {
        let net: IpNet = net.parse().unwrap();
        let before = self.records.len();
        self.records.retain(|r| !(r.kind == kind && r.net == net));
        assert_eq!(self.records.len() + 1, before, "no {kind} range {net} to remove");
        self.sync();
    }

    /// Brings the range tables in line with the records, the way the agent
    /// does: `desired_ranges` decides, `RangeMaps` writes.
    fn sync(&mut self) {
        let want = desired_ranges(&self.records);
        for (table, net, _) in self.maps.ranges() {
            if !want.contains_key(&(table, net)) {
                self.maps.del_range(table, net).unwrap();
            }
        }
        for ((table, net), v) in want {
            if self.maps.range(table, net) != Some(v) {
                self.maps.set_range(net, v).unwrap();
            }
        }
    }
}
