//! Explain: the contract between the egress gates, the TC explain stage on
//! subscriber-facing interfaces and the agent's explain listeners.
//!
//! A pool whose action is `explain` carries both
//! [`range_flags::EXPLAIN`](crate::range_flags::EXPLAIN) and
//! [`range_flags::REJECT`](crate::range_flags::REJECT): every gate that
//! cannot explain (the uplink's TC egress gate, or the subscriber-side XDP
//! gate while the explain stage is not attached) answers its blocked SYNs
//! with a RST, as for `reject`.
//!
//! When the stage is attached ([`flags::STAGED`]), the XDP gate passes an
//! explain pool's blocked SYN and the stage, a TC program on the same
//! interface's ingress, judges it again from the same tables and hands it
//! to the agent's transparent listener with `bpf_sk_assign`, marking the
//! packet ([`ExplainConfig::mark`]) so that the agent's policy route
//! delivers it locally. The agent answers with one SMTP line and closes.
//! Later segments of that connection find their socket with
//! `bpf_skc_lookup_tcp` and are assigned and marked the same way.
//!
//! Nothing here may let a blocked SYN through: with no listener (the agent
//! is dead, or its port is not set yet) the stage answers the SYN with a
//! RST itself, or drops it when it cannot ([`crate::EgressCounter::ExplainFallback`]).

/// Bits of [`ExplainConfig::flags`].
pub mod flags {
    /// The explain stage is attached to the subscriber-facing interfaces:
    /// their XDP gate passes explain pools' blocked SYNs to it. Without it
    /// they are rejected (RST) there.
    pub const STAGED: u32 = 1;
}

/// Default fwmark value and mask the stage sets and the agent's policy
/// rule matches ("GK" in the top 16 bits; the other bits of a packet's
/// mark are kept).
pub const DEFAULT_MARK: u32 = 0x4b47_0000;
pub const DEFAULT_MASK: u32 = 0xffff_0000;

/// `SO_PRIORITY` of the agent's listeners. Above 6, which only
/// CAP_NET_ADMIN may set: the stage hands connections only to a listener
/// with it, so a process that binds the port of a departed agent's listener
/// gets nothing. (Its low four bits are 0, best effort, for the qdiscs
/// that map priorities to bands.)
pub const LISTENER_PRIORITY: u32 = 0x4b40;

/// The single entry of [`maps::EXPLAIN`](crate::maps::EXPLAIN).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExplainConfig {
    /// The value written into the mask's bits of an explained packet's
    /// `skb->mark`.
    pub mark: u32,
    pub mask: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// The agent's listeners: ports (host order) on `127.0.0.1` and `::1`;
    /// 0 when there is none (the stage falls back at once).
    pub port_v4: u16,
    pub port_v6: u16,
}
const _: () = assert!(core::mem::size_of::<ExplainConfig>() == 16);

impl ExplainConfig {
    /// Whether the explain stage is attached.
    #[inline(always)]
    pub const fn staged(&self) -> bool {
        self.flags & flags::STAGED != 0
    }

    /// `mark` with the mask's bits set to this config's mark (the other
    /// bits kept).
    #[inline(always)]
    pub const fn apply_mark(&self, mark: u32) -> u32 {
        (mark & !self.mask) | (self.mark & self.mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_keeps_other_bits() {
        let c = ExplainConfig { mark: DEFAULT_MARK, mask: DEFAULT_MASK, ..Default::default() };
        assert_eq!(c.apply_mark(0), 0x4b47_0000);
        assert_eq!(c.apply_mark(0x1234_00ff), 0x4b47_00ff);
        assert!(!c.staged());
        assert!(ExplainConfig { flags: flags::STAGED, ..c }.staged());
    }
}
