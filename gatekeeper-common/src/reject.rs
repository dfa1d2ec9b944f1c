//! Reject with a reason: the contract between the XDP gate, the sk_lookup
//! rejector program and the agent's rejector.
//!
//! A refused source's SYN is dropped unless its refusal's action is
//! `reject` ([`RejectConfig::actions`]). Then the XDP gate passes it, and
//! the sk_lookup program, which judges the source again from the same
//! tables, steers the connection to the agent's listener in
//! [`maps::REJECTORS`](crate::maps::REJECTORS) instead of the MTA; the
//! agent answers with the reason.
//!
//! Nothing here may let a refused source through to the MTA:
//! - the XDP gate passes a rejected SYN only while the agent's lease
//!   ([`RejectConfig::lease_ns`]) runs and the source is not quiet
//!   ([`QuietSlot`]); otherwise it drops it as before (counted
//!   [`RejectCounter::Fallback`] / [`RejectCounter::Quiet`]);
//! - the sk_lookup program answers a rejected source's lookup with
//!   `SK_DROP` (the kernel then sends a RST) when no rejector socket is in
//!   its slot ([`RejectCounter::NoRejector`]).

use crate::{sourcetab, verdict_reason, KeyWords, RateLimit};

/// Why a guarded SYN is refused: the verdict reasons by their codes, then
/// the two kinds of range.
pub mod refusal {
    use crate::verdict_reason;

    /// A deny range the operator set or imported.
    pub const DENY_RANGE: u32 = verdict_reason::COUNT;
    /// A range the agent learned (a presumption).
    pub const LEARNED_RANGE: u32 = verdict_reason::COUNT + 1;
    /// Number of refusal codes.
    pub const COUNT: u32 = verdict_reason::COUNT + 2;

    /// The operator-facing name of a refusal code.
    pub const fn name(code: u32) -> &'static str {
        if code < verdict_reason::COUNT {
            verdict_reason::NAMES[code as usize]
        } else if code == DENY_RANGE {
            "deny-range"
        } else if code == LEARNED_RANGE {
            "learned-range"
        } else {
            "invalid"
        }
    }
}

/// Ports the rejector can answer on (one protocol each); the first
/// `nports` of [`RejectConfig::ports`] count.
pub const MAX_REJECT_PORTS: usize = 8;

/// The single entry of [`maps::REJECT`](crate::maps::REJECT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RejectConfig {
    /// Bit `1 << code` per [`refusal`] code whose action is reject. 0: the
    /// feature is off and both programs skip everything here.
    pub actions: u32,
    /// How many of `ports` count.
    pub nports: u32,
    /// The agent's lease, on the datapath clock: rejected SYNs are passed
    /// to the rejector only while `now < lease_ns`. The agent renews it
    /// every second while it can take sessions and lets it lapse (or sets
    /// 0) when it cannot, so a dead or saturated agent means drops.
    pub lease_ns: u64,
    /// Guarded ports the rejector speaks a protocol on (host order); a
    /// refused source's SYN to another port is dropped as before.
    pub ports: [u16; MAX_REJECT_PORTS],
    /// The budget of SYNs passed to the rejector, per CPU (a GCRA whose
    /// state is [`maps::REJ_BUDGET`](crate::maps::REJ_BUDGET)); beyond it
    /// they are dropped ([`RejectCounter::OverBudget`]). A passed SYN is
    /// answered with a SYN-ACK, and spoofed ones are answered to whoever
    /// owns the address: the budget bounds that backscatter, which no
    /// per-source limit in the agent can (spoofed sources never finish a
    /// handshake). Interval 0: no budget.
    pub syn_limit: RateLimit,
}
const _: () = assert!(core::mem::size_of::<RejectConfig>() == 48);

impl RejectConfig {
    /// Whether `code`'s action is reject.
    #[inline(always)]
    pub const fn rejects(&self, code: u32) -> bool {
        code < refusal::COUNT && self.actions & (1 << code) != 0
    }

    /// Whether the rejector answers on `port`.
    #[inline(always)]
    pub fn answers_on(&self, port: u16) -> bool {
        let mut i = 0;
        let mut found = false;
        // A fixed trip count the verifier unrolls.
        while i < MAX_REJECT_PORTS {
            if (i as u32) < self.nports && self.ports[i] == port {
                found = true;
            }
            i += 1;
        }
        found
    }

    /// Whether a SYN refused for `code` to `port` goes to the rejector
    /// (lease and quiet table aside).
    #[inline(always)]
    pub fn steers(&self, code: u32, port: u16) -> bool {
        self.rejects(code) && self.answers_on(port)
    }
}

/// Slots of [`maps::REJECTORS`](crate::maps::REJECTORS): the agent's
/// listener for IPv4 and for IPv6.
pub const SLOT_V4: u32 = 0;
pub const SLOT_V6: u32 = 1;
pub const REJECTOR_SLOTS: u32 = 2;

/// Bits of the quiet table's index.
pub const QUIET_BITS: u32 = 12;
/// Entries of [`maps::REJ_QUIET`](crate::maps::REJ_QUIET).
pub const QUIET_SLOTS: u32 = 1 << QUIET_BITS;

/// A source over the rejector's per-source rate: its refused SYNs are
/// dropped until `until_ns`. Direct-mapped (a collision only means one
/// source is answered rather than dropped). IPv6 sources by their own
/// address (`KeyWords::v6_host`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuietSlot {
    pub key: KeyWords,
    pub until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<QuietSlot>() == 24);

/// The quiet-table slot of a source key.
#[inline(always)]
pub const fn quiet_slot(key: &KeyWords, hk: &sourcetab::HashKey) -> u32 {
    sourcetab::seen_slot(key, hk) >> (sourcetab::SEEN_BITS - QUIET_BITS)
}

/// Counters of [`maps::REJ_STATS`](crate::maps::REJ_STATS) (per CPU, not
/// per interface). The refused SYN itself is counted by the gate's decision
/// counters as before (by reason, whatever its action); these say what
/// became of it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectCounter {
    /// XDP: passed to the rejector; one slot per [`refusal`] code from here.
    ToRejectorBase = 0,
    /// XDP: the action was reject but the lease had lapsed (agent dead or
    /// at its session cap): dropped.
    Fallback = refusal::COUNT,
    /// XDP: the source was over the per-source rate: dropped.
    Quiet = refusal::COUNT + 1,
    /// sk_lookup: steered to the rejector.
    Steered = refusal::COUNT + 2,
    /// sk_lookup: no rejector socket: the lookup failed (the kernel sends
    /// a RST), never the MTA.
    NoRejector = refusal::COUNT + 3,
    /// sk_lookup in dry-run mode: would have been steered; went to the MTA.
    DryRun = refusal::COUNT + 4,
    /// XDP: over the budget of SYNs passed to the rejector
    /// ([`RejectConfig::syn_limit`]): dropped.
    OverBudget = refusal::COUNT + 5,
}

/// Number of reject counter slots.
pub const REJECT_COUNTER_SLOTS: u32 = RejectCounter::OverBudget as u32 + 1;

impl RejectCounter {
    /// The slot counting SYNs refused for `code` passed to the rejector.
    #[inline(always)]
    pub const fn to_rejector(code: u32) -> u32 {
        let c = if code < refusal::COUNT { code } else { refusal::COUNT - 1 };
        RejectCounter::ToRejectorBase as u32 + c
    }
}

/// The operator-facing name of a reject counter slot.
pub fn reject_counter_name(slot: u32) -> &'static str {
    const ROUTED: [&str; refusal::COUNT as usize] = [
        "rejected-manual-ban",
        "rejected-no-ptr",
        "rejected-fcrdns-fail",
        "rejected-dynamic",
        "rejected-generic",
        "rejected-ok",
        "rejected-tempfail",
        "rejected-hold",
        "rejected-deny-range",
        "rejected-learned-range",
    ];
    match slot {
        s if s < refusal::COUNT => ROUTED[s as usize],
        s if s == RejectCounter::Fallback as u32 => "reject-fallback-drop",
        s if s == RejectCounter::Quiet as u32 => "reject-quiet-drop",
        s if s == RejectCounter::Steered as u32 => "rejector-steered",
        s if s == RejectCounter::NoRejector as u32 => "rejector-missing",
        s if s == RejectCounter::DryRun as u32 => "dry-run-would-reject",
        s if s == RejectCounter::OverBudget as u32 => "reject-budget-drop",
        _ => "invalid",
    }
}

const _: () = assert!(verdict_reason::COUNT == 8, "update reject_counter_name's table");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_extend_the_verdict_reasons() {
        assert_eq!(refusal::name(verdict_reason::NO_PTR), "no-ptr");
        assert_eq!(refusal::name(refusal::DENY_RANGE), "deny-range");
        assert_eq!(refusal::name(refusal::LEARNED_RANGE), "learned-range");
        assert_eq!(refusal::name(refusal::COUNT), "invalid");
        for code in 0..refusal::COUNT {
            assert_eq!(
                reject_counter_name(RejectCounter::to_rejector(code)),
                format!("rejected-{}", refusal::name(code))
            );
        }
        let names: std::collections::BTreeSet<_> = (0..REJECT_COUNTER_SLOTS).map(reject_counter_name).collect();
        assert_eq!(names.len(), REJECT_COUNTER_SLOTS as usize, "names are unique");
        assert!(!names.contains("invalid"));
        assert_eq!(reject_counter_name(REJECT_COUNTER_SLOTS), "invalid");
    }

    #[test]
    fn actions_and_ports() {
        let mut rc = RejectConfig {
            actions: 1 << verdict_reason::NO_PTR | 1 << refusal::LEARNED_RANGE,
            nports: 2,
            ..RejectConfig::default()
        };
        rc.ports[..3].copy_from_slice(&[25, 587, 143]);
        assert!(rc.steers(verdict_reason::NO_PTR, 25));
        assert!(rc.steers(refusal::LEARNED_RANGE, 587));
        assert!(!rc.steers(verdict_reason::NO_PTR, 143), "only the first nports count");
        assert!(!rc.steers(verdict_reason::MANUAL_BAN, 25));
        assert!(!rc.rejects(40), "out-of-range codes never reject");
        assert!(!RejectConfig::default().answers_on(0));
    }

    #[test]
    fn quiet_slots_stay_in_the_table() {
        let hk = sourcetab::HashKey::from_random([0x1234_5678_9abc_def1, 0x0fed_cba9_8765_4321]);
        for i in 0..1000u32 {
            let k = KeyWords::v4(i.to_be_bytes());
            assert!(quiet_slot(&k, &hk) < QUIET_SLOTS);
        }
    }
}
