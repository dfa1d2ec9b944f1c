//! The domain's vocabulary: every enum the agent, the store, the config and
//! the CLI share, each with the one table of its operator-facing names.
//!
//! A name is spelled once, in its enum's table here (verdict reasons: in
//! [`gatekeeper_common::verdict_reason::NAMES`], which the datapath counters
//! share). Serde, `FromStr`, `Display` and the CLI's "expected ..." hints
//! all read that table; nothing compares outcomes as strings.
use std::fmt;

use gatekeeper_common::reject::refusal;
use gatekeeper_common::{action, range_kind, range_origin, verdict_reason};

/// `FromStr` (trimmed, case-insensitive, over `ALL`), `TryFrom<String>`,
/// `Display` and serde's `into` for a type with `ALL`, `as_str` and
/// `expected`.
macro_rules! impl_names {
    ($name:ident, $what:literal) => {
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let t = s.trim();
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(t))
                    .ok_or_else(|| format!("unknown {} {s:?} (expected {})", $what, Self::expected()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> &'static str {
                v.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Declares a fieldless enum with one name per variant and derives from
/// that table: `ALL`, `as_str`, `FromStr` (trimmed, case-insensitive),
/// `Display`, serde (by name) and `expected()` ("a, b or c").
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $var:ident = $s:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(into = "&'static str", try_from = "String")]
        $vis enum $name {
            $($(#[$vmeta])* $var,)+
        }

        impl $name {
            pub const ALL: [$name; [$($s),+].len()] = [$($name::$var),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s,)+
                }
            }

            /// The names, as an error message lists them: "a, b or c".
            pub fn expected() -> String {
                expected(Self::ALL.iter().map(|v| v.as_str()))
            }
        }

        impl_names!($name, $what);
    };
}

/// "a, b or c".
fn expected<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.to_string(),
        None => String::new(),
    }
}

named_enum! {
    /// A kind of range the operator manages.
    pub enum RangeKind ("range kind") {
        /// Ingress: guarded SYNs from here are dropped.
        Deny = "deny",
        /// Ingress: always passes; wins over deny.
        Allow = "allow",
        /// Egress: a subscriber dynamic pool, blocked from guarded ports.
        Pool = "pool",
        /// Egress: subscribers who may send to guarded ports; wins over pool.
        Exempt = "exempt",
        /// Egress: destinations pool subscribers may always reach.
        Smarthost = "smarthost",
    }
}

impl RangeKind {
    pub fn table(self) -> RangeTable {
        match self {
            RangeKind::Deny | RangeKind::Allow => RangeTable::Ingress,
            RangeKind::Pool | RangeKind::Exempt => RangeTable::Subscriber,
            RangeKind::Smarthost => RangeTable::Smarthost,
        }
    }
    /// The kind a range of this kind must not overlap (without `--force`).
    /// Exempt entries are meant to sit inside pools, so those two may.
    pub fn other(self) -> Option<RangeKind> {
        match self {
            RangeKind::Deny => Some(RangeKind::Allow),
            RangeKind::Allow => Some(RangeKind::Deny),
            RangeKind::Pool | RangeKind::Exempt | RangeKind::Smarthost => None,
        }
    }
    /// "deny range", "pool", ... as errors name it.
    pub fn what(self) -> &'static str {
        match self {
            RangeKind::Deny => "deny range",
            RangeKind::Allow => "allow range",
            RangeKind::Pool => "pool",
            RangeKind::Exempt => "exempt range",
            RangeKind::Smarthost => "smarthost range",
        }
    }
    /// The datapath code ([`gatekeeper_common::range_kind`]).
    pub fn code(self) -> u8 {
        match self {
            RangeKind::Deny => range_kind::DENY,
            RangeKind::Allow => range_kind::ALLOW,
            RangeKind::Pool => range_kind::POOL,
            RangeKind::Exempt => range_kind::EXEMPT,
            RangeKind::Smarthost => range_kind::SMARTHOST,
        }
    }
    /// The kind of a datapath code (unknown codes read as deny, the
    /// datapath's own default).
    pub fn of_code(code: u8) -> RangeKind {
        match code {
            range_kind::ALLOW => RangeKind::Allow,
            range_kind::POOL => RangeKind::Pool,
            range_kind::EXEMPT => RangeKind::Exempt,
            range_kind::SMARTHOST => RangeKind::Smarthost,
            _ => RangeKind::Deny,
        }
    }
}

named_enum! {
    /// The datapath table a kind of range lives in. Each table holds a
    /// "winning" kind and possibly a "losing" one, and a longest-prefix
    /// lookup in it must find the winner wherever the two overlap.
    pub enum RangeTable ("range table") {
        /// Source ranges of the ingress gate: allow over deny.
        Ingress = "ingress",
        /// Source ranges of the egress gate: exempt over pool.
        Subscriber = "subscriber",
        /// Destination ranges of the egress gate.
        Smarthost = "smarthost",
    }
}

impl RangeTable {
    /// The kind that wins over the other in this table.
    pub fn winner(self) -> RangeKind {
        match self {
            RangeTable::Ingress => RangeKind::Allow,
            RangeTable::Subscriber => RangeKind::Exempt,
            RangeTable::Smarthost => RangeKind::Smarthost,
        }
    }
    /// The kind that an overlapping winner overrides, if any.
    pub fn loser(self) -> Option<RangeKind> {
        match self {
            RangeTable::Ingress => Some(RangeKind::Deny),
            RangeTable::Subscriber => Some(RangeKind::Pool),
            RangeTable::Smarthost => None,
        }
    }
    pub fn kinds(self) -> Vec<RangeKind> {
        std::iter::once(self.winner()).chain(self.loser()).collect()
    }
    /// The table a datapath entry of kind `code` lives in.
    pub fn of_code(code: u8) -> RangeTable {
        RangeKind::of_code(code).table()
    }
}

named_enum! {
    /// Where a range came from.
    pub enum Origin ("origin") {
        Manual = "manual",
        Imported = "imported",
        Learned = "learned",
    }
}

impl Origin {
    /// The [`gatekeeper_common::range_origin`] code.
    pub fn code(self) -> u16 {
        match self {
            Origin::Manual => range_origin::MANUAL,
            Origin::Imported => range_origin::IMPORTED,
            Origin::Learned => range_origin::LEARNED,
        }
    }
}

named_enum! {
    /// What a pool does with a blocked SYN.
    #[derive(Default)]
    pub enum PoolAction ("pool action") {
        /// Drop it: the subscriber's client times out.
        #[default]
        Drop = "drop",
        /// Answer with a TCP RST: the client fails at once.
        Reject = "reject",
        /// Answer locally with one SMTP line saying why and where to send
        /// instead (the agent's explain listener, through the TC explain
        /// stage on subscriber-facing interfaces); where that cannot be
        /// done (an uplink gate, a dead agent), as `reject`.
        Explain = "explain",
    }
}

named_enum! {
    /// What a verdict (or a policy entry) does with a guarded SYN.
    pub enum Action ("action") {
        Drop = "drop",
        Pass = "pass",
        /// Drop on guarded and limited ports (a log-driven or manual ban
        /// of a source; see `gatekeeper_common::action::BAN`).
        Ban = "ban",
    }
}

impl Action {
    /// The [`gatekeeper_common::action`] code.
    pub fn code(self) -> u32 {
        match self {
            Action::Drop => action::DROP,
            Action::Pass => action::PASS,
            Action::Ban => action::BAN,
        }
    }
    /// The action of a datapath code (anything but the drops and the ban
    /// passes).
    pub fn of_code(code: u32) -> Action {
        match code {
            action::DROP | action::PRESUMED_DROP => Action::Drop,
            action::BAN => Action::Ban,
            _ => Action::Pass,
        }
    }
}

/// Why a per-source verdict exists. The names are the datapath counters'
/// ([`verdict_reason::NAMES`]), so `stats`, `verdict list --reason` and
/// `check` agree. Serialized by name; records keep the numeric code on the
/// wire and in the database (see [`by_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum VerdictReason {
    ManualBan,
    NoPtr,
    FcrdnsFail,
    Dynamic,
    Generic,
    Ok,
    TempFail,
    Hold,
}

impl VerdictReason {
    pub const ALL: &'static [VerdictReason] = &[
        VerdictReason::ManualBan,
        VerdictReason::NoPtr,
        VerdictReason::FcrdnsFail,
        VerdictReason::Dynamic,
        VerdictReason::Generic,
        VerdictReason::Ok,
        VerdictReason::TempFail,
        VerdictReason::Hold,
    ];
    /// The [`gatekeeper_common::verdict_reason`] code.
    pub const fn code(self) -> u32 {
        match self {
            VerdictReason::ManualBan => verdict_reason::MANUAL_BAN,
            VerdictReason::NoPtr => verdict_reason::NO_PTR,
            VerdictReason::FcrdnsFail => verdict_reason::FCRDNS_FAIL,
            VerdictReason::Dynamic => verdict_reason::DYNAMIC,
            VerdictReason::Generic => verdict_reason::GENERIC,
            VerdictReason::Ok => verdict_reason::OK,
            VerdictReason::TempFail => verdict_reason::TEMPFAIL,
            VerdictReason::Hold => verdict_reason::HOLD,
        }
    }
    pub fn of_code(code: u32) -> Option<VerdictReason> {
        Self::ALL.iter().copied().find(|r| r.code() == code)
    }
    pub fn as_str(self) -> &'static str {
        verdict_reason::NAMES[self.code() as usize]
    }
    /// The reasons an operator may name (`hold` is the datapath's own).
    pub fn expected() -> String {
        expected(Self::ALL.iter().filter(|r| **r != VerdictReason::Hold).map(|r| r.as_str()))
    }
}

impl_names!(VerdictReason, "reason");

/// Serde by datapath code, for the fields that keep numbers on the wire
/// (`action` and `reason` of verdict records and decisions).
pub mod by_code {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use super::{Action, VerdictReason};

    /// A domain enum with a numeric datapath code.
    pub trait Code: Sized {
        fn to_code(&self) -> u32;
        fn from_code(code: u32) -> Option<Self>;
    }
    impl Code for Action {
        fn to_code(&self) -> u32 {
            self.code()
        }
        fn from_code(code: u32) -> Option<Self> {
            Some(Action::of_code(code))
        }
    }
    impl Code for VerdictReason {
        fn to_code(&self) -> u32 {
            self.code()
        }
        fn from_code(code: u32) -> Option<Self> {
            VerdictReason::of_code(code)
        }
    }

    pub fn serialize<T: Code, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(v.to_code())
    }
    pub fn deserialize<'de, T: Code, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let c = u32::deserialize(d)?;
        T::from_code(c).ok_or_else(|| D::Error::custom(format!("unknown code {c}")))
    }
}

named_enum! {
    /// What reverse DNS says about a source.
    pub enum DnsOutcome ("DNS outcome") {
        /// NXDOMAIN, or NOERROR without a PTR record.
        NoPtr = "no-ptr",
        /// PTR names exist, none maps back to the source.
        FcrdnsFail = "fcrdns-fail",
        /// A PTR name maps back to the source.
        Confirmed = "confirmed",
        /// DNS could not tell (error code, timeout, unreachable, ...). Never
        /// a reason to refuse anyone.
        TempFail = "tempfail",
    }
}

named_enum! {
    /// What an attached interface does.
    pub enum Role ("role") {
        /// The ingress gate (XDP): inbound SYNs to guarded ports.
        Ingress = "ingress",
        /// Uplink (TC egress): the egress gate on forwarded and local traffic.
        Uplink = "uplink",
        /// Subscriber-facing (XDP): the egress gate on subscribers' SYNs as
        /// they arrive.
        Subscriber = "subscriber",
    }
}

named_enum! {
    /// How a program is attached: XDP in native or skb mode, TC through a
    /// tcx link or a clsact (netlink) filter.
    pub enum AttachMode ("attach mode") {
        Native = "native",
        Skb = "skb",
        Tcx = "tcx",
        Clsact = "clsact",
    }
}

named_enum! {
    /// How to attach the XDP programs.
    #[derive(Default)]
    pub enum XdpModeSetting ("XDP mode") {
        /// Native (driver) mode, falling back to generic (skb) mode.
        #[default]
        Auto = "auto",
        Native = "native",
        Skb = "skb",
    }
}

named_enum! {
    /// How to attach the uplink TC program.
    #[derive(Default)]
    pub enum TcModeSetting ("TC mode") {
        /// tcx where the kernel has it (6.6+), clsact otherwise.
        #[default]
        Auto = "auto",
        Tcx = "tcx",
        Clsact = "clsact",
    }
}

named_enum! {
    /// Why a guarded SYN is refused: the refusing verdict reasons, then the
    /// two kinds of deny range. Each has an action ([`ReasonAction`]), and
    /// the rejector's reply names it.
    pub enum Refusal ("refusal") {
        ManualBan = "manual-ban",
        NoPtr = "no-ptr",
        FcrdnsFail = "fcrdns-fail",
        Dynamic = "dynamic",
        Generic = "generic",
        /// A deny range the operator set or imported.
        DenyRange = "deny-range",
        /// A deny range the agent learned.
        LearnedRange = "learned-range",
    }
}

impl Refusal {
    /// The [`gatekeeper_common::reject::refusal`] code (the verdict
    /// reason's own code for the verdict reasons).
    pub const fn code(self) -> u32 {
        match self {
            Refusal::ManualBan => verdict_reason::MANUAL_BAN,
            Refusal::NoPtr => verdict_reason::NO_PTR,
            Refusal::FcrdnsFail => verdict_reason::FCRDNS_FAIL,
            Refusal::Dynamic => verdict_reason::DYNAMIC,
            Refusal::Generic => verdict_reason::GENERIC,
            Refusal::DenyRange => refusal::DENY_RANGE,
            Refusal::LearnedRange => refusal::LEARNED_RANGE,
        }
    }
    /// The refusal of a datapath code; `None` for the reasons that never
    /// refuse (ok, tempfail, hold) and unknown codes.
    pub fn from_code(code: u32) -> Option<Refusal> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

named_enum! {
    /// What the gate does with a refused source's SYN.
    pub enum ReasonAction ("reject action") {
        /// Drop it silently: the sender retries and finally times out.
        Drop = "drop",
        /// Hand the connection to the agent's rejector, which answers with
        /// the reason.
        Reject = "reject",
    }
}

named_enum! {
    /// When the SMTP rejector says no.
    #[derive(Default)]
    pub enum RejectMode ("reject mode") {
        /// Greet with 220, refuse every RCPT TO with 550 5.7.1 and the
        /// reason. Every client records that reply; a 5xx greeting is
        /// skipped by some (Postfix `smtp_skip_5xx_greeting`), which then
        /// try the next MX and lose the reason.
        #[default]
        Rcpt = "rcpt",
        /// Greet with 554 5.7.1 and the reason (RFC 5321 §3.1), then answer
        /// 503 to everything but QUIT.
        Banner = "banner",
    }
}

named_enum! {
    /// The protocol the rejector speaks on a port.
    pub enum Protocol ("protocol") {
        Smtp = "smtp",
        Pop3 = "pop3",
        Imap = "imap",
    }
}

named_enum! {
    /// Whose log lines a `[[logs]]` entry reads.
    pub enum LogKind ("log kind") {
        Postfix = "postfix",
        Dovecot = "dovecot",
        Exim = "exim",
        Sshd = "sshd",
    }
}

named_enum! {
    /// Where a `[[logs]]` entry reads from.
    pub enum LogSourceKind ("log source") {
        /// A plain file, followed across rotation and truncation.
        File = "file",
        /// The systemd journal, through `journalctl`.
        Journal = "journal",
    }
}

named_enum! {
    /// Why the agent banned a source from what it did (its log lines).
    pub enum AbuseReason ("abuse reason") {
        /// Failed logins (weighted) pushed its score over the threshold.
        AuthAbuse = "auth-abuse",
        /// Connections alone did.
        ConnRate = "conn-rate",
        /// Its account or address was suspended (undeliverable recipients).
        Suspended = "suspended",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_every_path() {
        for k in RangeKind::ALL {
            assert_eq!(k.as_str().parse::<RangeKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(RangeKind::of_code(k.code()), k);
        }
        for r in VerdictReason::ALL {
            assert_eq!(VerdictReason::of_code(r.code()), Some(*r));
            assert_eq!(r.as_str().parse::<VerdictReason>().unwrap(), *r);
            assert_eq!(
                gatekeeper_common::counters::counter_name(gatekeeper_common::Counter::verdict_drop(r.code())),
                r.as_str(),
                "the counters and the CLI name reasons alike"
            );
        }
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            assert_eq!(gatekeeper_common::reject::refusal::name(r.code()), r.as_str(), "one name per refusal");
        }
        assert_eq!(Refusal::from_code(verdict_reason::OK), None);
        assert_eq!(Refusal::from_code(gatekeeper_common::reject::refusal::COUNT), None);
        assert_eq!(serde_json::from_str::<Role>("\"uplink\"").unwrap(), Role::Uplink);
        assert_eq!(" Native ".parse::<XdpModeSetting>().unwrap(), XdpModeSetting::Native);
    }

    #[test]
    fn errors_list_the_names() {
        let e = "drv".parse::<XdpModeSetting>().unwrap_err();
        assert!(e.contains("expected auto, native or skb"), "{e}");
        let e = "x".parse::<VerdictReason>().unwrap_err();
        assert_eq!(
            e,
            "unknown reason \"x\" (expected manual-ban, no-ptr, fcrdns-fail, dynamic, generic, ok or tempfail)"
        );
        assert!(serde_json::from_str::<PoolAction>("\"rst\"")
            .unwrap_err()
            .to_string()
            .contains("drop, reject or explain"));
    }

    #[test]
    fn codes_serialize_as_numbers() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct R {
            #[serde(with = "by_code")]
            action: Action,
            #[serde(with = "by_code")]
            reason: VerdictReason,
        }
        let v = serde_json::to_value(R { action: Action::Drop, reason: VerdictReason::Dynamic }).unwrap();
        assert_eq!(v, serde_json::json!({ "action": action::DROP, "reason": verdict_reason::DYNAMIC }));
        let back: R = serde_json::from_value(v).unwrap();
        assert_eq!((back.action, back.reason), (Action::Drop, VerdictReason::Dynamic));
    }
}
