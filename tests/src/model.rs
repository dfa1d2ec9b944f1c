//! The host reference model of the datapath's frame parser, shared by the
//! ingress and egress gate tests: an independent reading of the parsing
//! rules that says, for any frame, whether the gates see a TCP SYN they must
//! decide on, a frame their parser gives up on, or neither; and the random
//! frame mutations the datapath is checked against it on.
//!
//! [`parse`] reads a frame with every port guarded; [`Model`] goes on to the
//! whole decision of each gate for given map contents (ranges, ports,
//! policies, rate limits, verdicts, config flags, reject settings), says
//! what the rejector (the sk_lookup program) must do with a connection's
//! socket lookup, and keeps the state the programs keep, for the in-kernel
//! tests and the differential fuzzer (`gatekeeper-fuzz`) alike.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gatekeeper::domain::RangeKind;
use gatekeeper_common::{
    action, addr, config_flags,
    inbound::{self, InboundCounter},
    port_policy,
    reject::{self, quiet_slot, refusal, RejectCounter},
    sourcetab::{seen_slot, HashKey},
    verdict_reason, Counter, EgressCounter, KeyWords, LimitKey, RateLimit, SourceKey, Verdict, MAX_IPV6_EXT_HEADERS,
    MAX_LIMIT_CLASSES,
};
use ipnet::IpNet;

use crate::rng::Rng;
use crate::testrun::{Outcome, SK_DROP, SK_PASS};

/// How [`mutate`] changes a frame.
pub struct Mutation {
    /// Bytes are changed within the first `span` bytes (mostly headers).
    pub span: usize,
    /// Values worth planting (protocol numbers, flags, lengths).
    pub planted: &'static [u8],
    /// One frame in this many is truncated, one in this many extended.
    pub resize_one_in: u64,
    /// An extension adds fewer than this many random bytes.
    pub extend_below: u64,
}

/// Flips one to three bytes of `frame` (random values, single bits, planted
/// values, increments); then sometimes truncates it (to 14 bytes or more)
/// or extends it with random bytes.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, m: &Mutation) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(frame.len().min(m.span) as u64) as usize;
        frame[at] = match rng.below(4) {
            0 => rng.next() as u8,
            1 => frame[at] ^ (1 << rng.below(8)),
            2 => m.planted[rng.below(m.planted.len() as u64) as usize],
            _ => frame[at].wrapping_add(1),
        };
    }
    match rng.below(m.resize_one_in) {
        0 => frame.truncate(14 + rng.below(frame.len() as u64 - 13) as usize),
        1 => {
            let n = rng.below(m.extend_below) as usize;
            frame.extend(rng.bytes(n));
        }
        _ => {}
    }
}

/// Which gate reads the frame: they share the parser, but the egress gate
/// also sees what a frame hides (first fragments, over-long IPv6 chains).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Gate {
    Ingress,
    Egress,
}

/// How the datapath's parser reads a frame.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Parse {
    /// Not a first-fragment TCP SYN: passed without a decision or a counter.
    NotSyn,
    /// The parser cannot read it: passed, counted as parse-skipped.
    Unreadable,
    /// A SYN (first fragment, any flags but ACK and RST) the gate decides
    /// on. `plain`: right after the Ethernet header or VLAN tags (no PPPoE),
    /// IPv4 without options or IPv6 without extension headers, and no
    /// payload (the IP header's length is exactly the TCP header's), so the
    /// egress gate can answer it with a RST.
    Syn { plain: bool },
    /// Egress only: the first fragment of a TCP segment (IPv4 MF set at
    /// offset 0, IPv6 a fragment header with M set at offset 0), whatever
    /// its flags, whether or not its TCP header (or, IPv6, the rest of its
    /// header chain) is all there. From a pool source: dropped, counted as
    /// pool-fragment.
    Fragment,
    /// Egress only: an IPv6 header chain that goes on past
    /// `MAX_IPV6_EXT_HEADERS` extension headers. From a pool source:
    /// dropped, counted as pool-ext-chain.
    LongChain,
}

/// What the parser's walk to the TCP header finds.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Walk {
    /// No TCP segment whose header this frame holds (another protocol, a
    /// fragment after the first, another PPP protocol): passed, uncounted.
    NotTcp,
    /// A header the walk needs is cut off or malformed: passed, counted as
    /// parse-skipped.
    Unreadable,
    /// A TCP segment.
    Tcp(Segment),
}

/// What a segment's headers hide from the egress gate (the ingress gate's
/// walk always says `None`).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Hidden {
    None,
    /// A first fragment (IPv4 MF at offset 0, or an IPv6 fragment header
    /// with M at offset 0): its TCP header may not be all there (for IPv6,
    /// `tcp` may then point at a header the frame does not hold).
    Fragment,
    /// An IPv6 chain that goes on past `MAX_IPV6_EXT_HEADERS` headers
    /// (`tcp` points where the walk stopped).
    Chain,
}

/// Where a TCP segment sits in a frame.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Segment {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub tcp: usize,
    pub v6: bool,
    /// Carried in a PPPoE session.
    pub pppoe: bool,
    pub hidden: Hidden,
    /// The length the IP header gives the TCP segment when the IP header
    /// is plain (IPv4 without options, IPv6 without extension headers).
    pub plain_len: Option<usize>,
}

/// A TCP SYN as the gates read it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct SynHeader {
    pub seg: Segment,
    /// The TCP header's length, options included.
    pub tcp_len: usize,
    pub dport: u16,
    /// Answerable with a RST in place: no PPPoE, a plain IP header and no
    /// payload.
    pub plain: bool,
}

/// Reads `len` bytes at `off` the way the datapath may: inside the frame
/// and starting at or below 4 KiB.
fn get(f: &[u8], off: usize, n: usize) -> Option<&[u8]> {
    if off <= 0xfff && off + n <= f.len() {
        Some(&f[off..off + n])
    } else {
        None
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Walks `f` (an Ethernet frame) to its TCP header the way `gate`'s parser
/// must.
pub fn walk(f: &[u8], gate: Gate) -> Walk {
    let egress = gate == Gate::Egress;
    let Some(b) = get(f, 12, 2) else { return Walk::Unreadable };
    let mut et = be16(b);
    let mut off = 14;
    for _ in 0..2 {
        if et != 0x8100 && et != 0x88a8 {
            break;
        }
        let Some(b) = get(f, off + 2, 2) else { return Walk::Unreadable };
        et = be16(b);
        off += 4;
    }
    // PPPoE session: 6 header bytes, then the PPP protocol in two octets,
    // or one (protocol-field compression) when the first is odd. Neither
    // version, code nor length is checked.
    let mut pppoe = false;
    if et == 0x8864 {
        let Some(b) = get(f, off + 6, 2) else { return Walk::Unreadable };
        let (proto, len) = if b[0] % 2 == 1 { (u16::from(b[0]), 7) } else { (be16(b), 8) };
        et = match proto {
            0x21 => 0x0800,
            0x57 => 0x86dd,
            _ => return Walk::NotTcp,
        };
        off += len;
        pppoe = true;
    }
    let l3 = off;
    let seg = |tcp, v6, hidden, plain_len| Walk::Tcp(Segment { l3, tcp, v6, pppoe, hidden, plain_len });
    match et {
        0x0800 => {
            let Some(ip) = get(f, off, 20) else { return Walk::Unreadable };
            let ihl = (ip[0] & 0x0f) as usize * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Walk::Unreadable;
            }
            let frag = be16(&ip[6..8]);
            if frag & 0x1fff != 0 || ip[9] != 6 {
                return Walk::NotTcp;
            }
            let hidden = if egress && frag & 0x2000 != 0 { Hidden::Fragment } else { Hidden::None };
            let total = be16(&ip[2..4]) as usize;
            seg(off + ihl, false, hidden, (ihl == 20).then(|| total.wrapping_sub(20)))
        }
        0x86dd => {
            let Some(ip) = get(f, off, 8) else { return Walk::Unreadable };
            if ip[0] >> 4 != 6 {
                return Walk::Unreadable;
            }
            let payload = be16(&ip[4..6]) as usize;
            let mut next = ip[6];
            if get(f, off + 8, 16).is_none() {
                return Walk::Unreadable;
            }
            off += 40;
            let mut walked = 0;
            // Egress: a fragment header with M set at offset 0 was walked.
            let mut first = false;
            loop {
                match next {
                    6 => break,
                    0 | 43 | 44 | 51 | 60 if walked == MAX_IPV6_EXT_HEADERS && egress => {
                        return seg(off, true, Hidden::Chain, None)
                    }
                    _ if walked == MAX_IPV6_EXT_HEADERS => return Walk::Unreadable,
                    0 | 43 | 60 => {
                        // A header the walk cannot read: after a first
                        // fragment header, what follows is hidden.
                        let Some(h) = get(f, off, 2) else {
                            return if first { seg(off, true, Hidden::Fragment, None) } else { Walk::Unreadable };
                        };
                        next = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    44 => {
                        let Some(h) = get(f, off, 4) else {
                            return if first { seg(off, true, Hidden::Fragment, None) } else { Walk::Unreadable };
                        };
                        let field = be16(&h[2..4]);
                        if field & 0xfff8 != 0 {
                            return Walk::NotTcp;
                        }
                        first |= egress && field & 1 == 1;
                        next = h[0];
                        off += 8;
                    }
                    51 => return Walk::Unreadable,
                    _ => return Walk::NotTcp,
                }
                walked += 1;
            }
            let hidden = if first { Hidden::Fragment } else { Hidden::None };
            seg(off, true, hidden, (off == l3 + 40).then_some(payload))
        }
        _ => Walk::NotTcp,
    }
}

/// The TCP header of a segment cannot be read: cut off, or a data offset
/// below 5 words (parse-skipped).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Unreadable;

/// Reads the TCP header of `seg`: `Err(Unreadable)` when it is not all there or
/// malformed (parse-skipped), `Ok(None)` when it is no SYN (ACK or RST
/// set, or SYN clear).
pub fn syn_header(f: &[u8], seg: &Segment) -> Result<Option<SynHeader>, Unreadable> {
    let h = get(f, seg.tcp, 16).ok_or(Unreadable)?;
    let tcp_len = (h[12] >> 4) as usize * 4;
    if tcp_len < 20 || get(f, seg.tcp + tcp_len - 2, 2).is_none() {
        return Err(Unreadable);
    }
    if h[13] & 0x16 != 0x02 {
        return Ok(None);
    }
    let plain = !seg.pppoe && seg.plain_len == Some(tcp_len);
    Ok(Some(SynHeader { seg: *seg, tcp_len, dport: be16(&h[2..4]), plain }))
}

/// Reads `f` the way `gate`'s parser must, with every port guarded (so a
/// first fragment to any port is one to a guarded port) and, at the
/// egress gate, every source in a pool.
pub fn parse(f: &[u8], gate: Gate) -> Parse {
    match walk(f, gate) {
        Walk::NotTcp => Parse::NotSyn,
        Walk::Unreadable => Parse::Unreadable,
        Walk::Tcp(seg) => match seg.hidden {
            Hidden::Fragment => Parse::Fragment,
            Hidden::Chain => Parse::LongChain,
            Hidden::None => match syn_header(f, &seg) {
                Err(Unreadable) => Parse::Unreadable,
                Ok(None) => Parse::NotSyn,
                Ok(Some(s)) => Parse::Syn { plain: s.plain },
            },
        },
    }
}

// ---------------------------------------------------------------- decisions

/// A range in the model: what the operator (or the learner) asked for, not
/// what the agent writes to the tries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub kind: RangeKind,
    pub net: IpNet,
    pub id: u32,
    /// A deny range the agent learned (a presumption).
    pub learned: bool,
    /// A pool whose SYNs are answered with a RST (`reject`, and `explain`
    /// while the explain stage is not attached).
    pub reject: bool,
}

/// A reported-sources slot, in the fixed clock situation the model
/// assumes: every time the datapath compares is within the event interval
/// and the hold window, so only "set or not" matters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeenSlot {
    pub key: KeyWords,
    /// `first_ns` is set (the holder's hold window started).
    pub first: bool,
    /// `reported_ns` is set.
    pub reported: bool,
}

/// What a gate program must do with a frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    /// None: pass.
    pub outcome: Option<Outcome>,
    /// The counters (ingress `Counter` or `EgressCounter` slots) that move
    /// by one each.
    pub counters: Vec<u32>,
    /// The range ids whose hits move.
    pub hits: Vec<u32>,
    /// Events queued for the agent.
    pub events: u32,
    /// The reject counters (`RejectCounter` slots) that move by one each.
    pub rej: Vec<u32>,
    /// The inbound limiter's counters (`inbound::in_stat_index` slots) that
    /// move by one each.
    pub inbound: Vec<u32>,
    /// Ingress: the source and destination port of the guarded SYN the
    /// gate decided on. The rejector judges the lookup of its connection
    /// again ([`Model::rejector`]).
    pub decided: Option<(IpAddr, u16)>,
}

impl Expect {
    pub fn outcome(&self) -> Outcome {
        self.outcome.unwrap_or(Outcome::Pass)
    }

    fn skipped(mut self, counter: u32) -> Expect {
        self.counters.push(counter);
        self
    }
}

/// What the rejector (`gatekeeper_rejector`, sk_lookup) must do with a TCP
/// connection's socket lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Not the rejector's connection: SK_PASS with no socket selected and
    /// no counter, so the lookup goes on to the MTA's socket.
    None,
    /// Steered to the listener in `slot` (`reject::SLOT_V4` or `SLOT_V6`),
    /// whose cookie is `cookie`: SK_PASS, counted `Steered`.
    Listener { slot: u32, cookie: u64 },
    /// To be steered, but its slot is empty: SK_DROP (the kernel answers
    /// with a RST; the MTA never sees the connection), counted
    /// `NoRejector`.
    Missing,
    /// To be steered, but dry-run mode is on: SK_PASS with no socket (it
    /// goes to the MTA), counted `DryRun`.
    DryRun,
}

impl Steer {
    /// The program's return value and the cookie of the socket it selected
    /// (0: none), as [`crate::testrun::sk_lookup_run`] reports them.
    pub fn result(&self) -> (u32, u64) {
        match *self {
            Steer::None | Steer::DryRun => (SK_PASS, 0),
            Steer::Listener { cookie, .. } => (SK_PASS, cookie),
            Steer::Missing => (SK_DROP, 0),
        }
    }

    /// The reject counter slot that moves, if any.
    pub fn counter(&self) -> Option<u32> {
        match self {
            Steer::None => None,
            Steer::Listener { .. } => Some(RejectCounter::Steered as u32),
            Steer::Missing => Some(RejectCounter::NoRejector as u32),
            Steer::DryRun => Some(RejectCounter::DryRun as u32),
        }
    }
}

/// A quiet-table slot in the model's clock situation: the source key
/// silenced there, until long after the run (`live`) or until long before
/// it (as good as empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quiet {
    pub key: KeyWords,
    pub live: bool,
}

/// Reject with a reason, as the model sees it (see
/// `gatekeeper_common::reject`): what `GK_REJECT`, `GK_REJ_QUIET` and
/// `GK_REJECTORS` hold.
#[derive(Clone, Debug, Default)]
pub struct RejectSettings {
    /// Bit `1 << code` per `reject::refusal` code whose action is reject
    /// (bits past the codes mean nothing).
    pub actions: u32,
    /// The ports the rejector answers on (`RejectConfig::ports`' first
    /// `nports`; what lies past them does not count).
    pub ports: Vec<u16>,
    /// The agent's lease runs until long after the run; false: it lapsed
    /// long before it.
    pub lease: bool,
    /// Quiet-table slots by index (absent: empty).
    pub quiet: HashMap<u32, Quiet>,
    /// The cookie of the listener in each `GK_REJECTORS` slot (indexed by
    /// `reject::SLOT_V4`, `SLOT_V6`); None: the slot is empty.
    pub listeners: [Option<u64>; 2],
}

impl RejectSettings {
    /// Whether refusal `code`'s action is reject (every code the model
    /// judges is below `refusal::COUNT`).
    fn rejects(&self, code: u32) -> bool {
        self.actions >> code & 1 == 1
    }

    /// Whether a SYN refused for `code` to `port` goes to the rejector, the
    /// lease and the quiet table aside.
    fn steers(&self, code: u32, port: u16) -> bool {
        self.rejects(code) && self.ports.contains(&port)
    }

    /// Whether the source whose own key is `key` is silenced.
    fn is_quiet(&self, key: &KeyWords, hash: &HashKey) -> bool {
        self.quiet.get(&quiet_slot(key, hash)).is_some_and(|q| q.live && q.key == *key)
    }
}

/// The model of one loaded gatekeeper instance: the map contents that
/// decide (ranges, ports, policies, limits, verdicts, config flags, reject
/// settings) and the state the programs keep (reported sources, token
/// buckets), so that, for any frame, [`Model::ingress`] and
/// [`Model::egress`] say what the programs must return and which counters
/// and range hits move, and, for any connection, [`Model::rejector`] says
/// what the sk_lookup program must do with its socket lookup.
///
/// The clock situation is fixed: every live verdict expires long after the
/// run and every expired one long before it; the event interval and the
/// hold window outlast the run; a rate-limit class's interval is 0
/// (unlimited) or outlasts the run, so a source gets exactly `burst`
/// connections of a class; the reject lease and every quiet slot run until
/// long after the run or ended long before it; the event ring never fills
/// (the caller drains it).
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub ranges: Vec<Range>,
    /// Ingress guarded ports.
    pub ports: HashSet<u16>,
    /// Egress policy words by port (absent: 0).
    pub policy: HashMap<u16, u32>,
    /// Egress rate-limit classes.
    pub limits: [RateLimit; MAX_LIMIT_CLASSES as usize],
    pub verdicts: HashMap<SourceKey, Verdict>,
    /// The time against which verdicts are live or expired.
    pub now_ns: u64,
    /// `config_flags`.
    pub flags: u32,
    /// The verdict and reported-sources hash secret.
    pub hash: HashKey,
    /// Reported-sources slots by index (absent: empty).
    pub seen: HashMap<u32, SeenSlot>,
    /// Connections admitted per token bucket.
    pub buckets: HashMap<LimitKey, u64>,
    /// Reject with a reason: actions, ports, lease, quiet sources,
    /// listeners.
    pub reject: RejectSettings,
    /// Inbound limiter: class by destination port (absent: 0).
    pub in_ports: HashMap<u16, u32>,
    /// Inbound rate-limit classes (the same clock situation as `limits`).
    pub in_limits: [RateLimit; MAX_LIMIT_CLASSES as usize],
    /// Connections admitted per inbound token bucket (the table never
    /// evicts in the model: few sources, many buckets).
    pub in_buckets: HashMap<LimitKey, u64>,
}

/// Why the tables refuse a guarded SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refusal {
    /// The gate's decision counter (by reason or deny range), which counts
    /// the SYN whatever its action.
    counter: u32,
    /// The `reject::refusal` code whose action says drop or reject.
    code: u32,
}

/// What the tables say about a source (the programs' `judge`).
enum Judgement {
    /// In an allow range.
    Allowed,
    /// A live pass verdict (or one of an action the gate does not know),
    /// with its reason (clamped as the gate does).
    Passed { reason: u32 },
    /// A deny range or a live drop verdict.
    Refused(Refusal),
    /// No live verdict: reported under `key`, its reported-sources key.
    /// `presumed`: a learned range or a presumed-bad /64 refuses it all the
    /// same.
    Unknown { key: KeyWords, presumed: Option<Refusal> },
}

/// A source's own key: the reported-sources and the quiet table's key
/// (IPv4: its address; IPv6: the address, see `KeyWords::v6_host`).
pub fn own_key(src: &IpAddr) -> KeyWords {
    match src {
        IpAddr::V4(a) => KeyWords::v4(a.octets()),
        IpAddr::V6(a) => KeyWords::v6_host(&a.octets()),
    }
}

/// A source's range in one table, as the operator's rules decide it.
enum Hit {
    /// The winning kind (allow, exempt): the longest range of that kind.
    Winner(u32),
    /// The losing kind (deny, pool): the longest range of that kind.
    Loser(Range),
}

fn ip_at(f: &[u8], off: usize, v6: bool) -> Option<IpAddr> {
    if v6 {
        let b: [u8; 16] = get(f, off, 16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        let b: [u8; 4] = get(f, off, 4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    }
}

/// The source and destination address of a segment.
fn addrs(f: &[u8], seg: &Segment) -> Option<(IpAddr, IpAddr)> {
    if seg.v6 {
        Some((ip_at(f, seg.l3 + 8, true)?, ip_at(f, seg.l3 + 24, true)?))
    } else {
        Some((ip_at(f, seg.l3 + 12, false)?, ip_at(f, seg.l3 + 16, false)?))
    }
}

impl Model {
    /// The longest range of `kind` holding `ip`.
    fn longest(&self, kind: RangeKind, ip: &IpAddr) -> Option<&Range> {
        self.ranges.iter().filter(|r| r.kind == kind && r.net.contains(ip)).max_by_key(|r| r.net.prefix_len())
    }

    /// Allow always wins over deny (exempt over pool), whatever the
    /// prefix lengths.
    fn table(&self, winner: RangeKind, loser: RangeKind, ip: &IpAddr) -> Option<Hit> {
        if let Some(w) = self.longest(winner, ip) {
            return Some(Hit::Winner(w.id));
        }
        self.longest(loser, ip).map(|l| Hit::Loser(l.clone()))
    }

    fn policy_of(&self, port: u16) -> u32 {
        self.policy.get(&port).copied().unwrap_or(0)
    }

    fn live(&self, v: &Verdict) -> bool {
        v.expires_ns > self.now_ns
    }

    fn dry(&self) -> bool {
        self.flags & config_flags::DRY_RUN != 0
    }

    /// Reports `key` at most once (the interval outlasts the run) and keeps
    /// its slot: true when its hold window runs (it holds the slot and its
    /// first SYN started the window).
    fn note(&mut self, key: KeyWords, e: &mut Expect) -> bool {
        let slot = seen_slot(&key, &self.hash);
        let s = self.seen.entry(slot).or_default();
        let ours = s.key == key;
        if ours && s.reported {
            return s.first;
        }
        let free = !ours && !s.first && !s.reported;
        e.events += 1;
        if ours {
            s.reported = true;
            return s.first;
        }
        if !free {
            return false;
        }
        *s = SeenSlot { key, first: true, reported: true };
        true
    }

    fn drop_or_dry(&self, e: &mut Expect, counter: u32, dry_counter: u32) {
        e.counters.push(counter);
        if self.dry() {
            e.counters.push(dry_counter);
        } else {
            e.outcome = Some(Outcome::Drop);
        }
    }

    /// What `gatekeeper_ingress` must do with `f`.
    pub fn ingress(&mut self, f: &[u8]) -> Expect {
        let e = Expect::default();
        let seg = match walk(f, Gate::Ingress) {
            Walk::NotTcp => return e,
            Walk::Unreadable => return e.skipped(Counter::ParseSkipped as u32),
            Walk::Tcp(seg) => seg,
        };
        let syn = match syn_header(f, &seg) {
            Err(Unreadable) => return e.skipped(Counter::ParseSkipped as u32),
            Ok(None) => return e,
            Ok(Some(syn)) => syn,
        };
        if !self.ports.contains(&syn.dport) {
            let class = self.in_ports.get(&syn.dport).copied().unwrap_or(0);
            if class == 0 {
                return e;
            }
            let Some((src, _)) = addrs(f, &seg) else { return e.skipped(Counter::ParseSkipped as u32) };
            return self.limited_only(src, class, e);
        }
        let Some((src, _)) = addrs(f, &seg) else { return e.skipped(Counter::ParseSkipped as u32) };
        self.decide(src, syn.dport, e)
    }

    /// What the tables say about `src`, and the range whose hit moves. It
    /// changes nothing, so that the gate ([`Model::decide`]) and the
    /// rejector's second look ([`Model::rejector`]) read the tables one way.
    fn judge(&self, src: IpAddr) -> (Option<u32>, Judgement) {
        let mut hit = None;
        let mut presumed = None;
        match self.table(RangeKind::Allow, RangeKind::Deny, &src) {
            Some(Hit::Winner(id)) => return (Some(id), Judgement::Allowed),
            Some(Hit::Loser(r)) => {
                let deny = Refusal { counter: Counter::DenyRange as u32, code: refusal::DENY_RANGE };
                if !r.learned {
                    return (Some(r.id), Judgement::Refused(deny));
                }
                hit = Some(r.id);
                presumed = Some(Refusal { code: refusal::LEARNED_RANGE, ..deny });
            }
            None => {}
        }
        let key = own_key(&src);
        let judgement = match self.verdict_of(src) {
            Some(v) => {
                // A reason past the table (never written) is counted as
                // hold, and refused as hold, never as a range.
                let code = if v.reason < verdict_reason::COUNT { v.reason } else { verdict_reason::HOLD };
                let r = Refusal { counter: Counter::verdict_drop(v.reason), code };
                match v.action {
                    action::DROP | action::BAN => Judgement::Refused(r),
                    action::PRESUMED_DROP => Judgement::Unknown { key, presumed: Some(r) },
                    _ => Judgement::Passed { reason: code },
                }
            }
            None => Judgement::Unknown { key, presumed },
        };
        (hit, judgement)
    }

    /// The live verdict of `src`: IPv4: its key's. IPv6: the address's
    /// own while live, else its /64's.
    fn verdict_of(&self, src: IpAddr) -> Option<Verdict> {
        let key = own_key(&src);
        let verdict = match src {
            IpAddr::V4(_) => self.verdicts.get(&key.key()).copied(),
            // A source in ::/64 (IPv4-mapped, loopback, unspecified: never
            // a source on the wire) hashes as the empty key: the tables
            // assume no source does, and the datapath searches the empty
            // key's buckets, where the fuzzer puts no verdict.
            IpAddr::V6(a) if KeyWords::v6(&a.octets()).is_empty() => None,
            IpAddr::V6(a) => {
                let net = KeyWords::v6(&a.octets());
                let hv = self.verdicts.get(&key.key()).copied().filter(|v| self.live(v));
                hv.or_else(|| self.verdicts.get(&net.key()).copied())
            }
        };
        verdict.filter(|v| self.live(v))
    }

    /// A SYN to a limited port that is not guarded: an allow range or a
    /// pass verdict with reason `ok` is exempt, a ban drops; deny ranges
    /// and other verdicts do not count here; the rest meets the limiter.
    /// Nothing is reported.
    fn limited_only(&mut self, src: IpAddr, class: u32, mut e: Expect) -> Expect {
        let slot = |c: InboundCounter| inbound::in_stat_index(class, c as u32);
        if let Some(Hit::Winner(id)) = self.table(RangeKind::Allow, RangeKind::Deny, &src) {
            e.hits.push(id);
            e.inbound.push(slot(InboundCounter::Exempt));
            return e;
        }
        match self.verdict_of(src) {
            Some(v) if v.action == action::BAN => {
                e.inbound.push(slot(InboundCounter::Banned));
                self.in_drop_or_dry(class, &mut e);
            }
            Some(v) if v.action == action::PASS && v.reason == verdict_reason::OK => {
                e.inbound.push(slot(InboundCounter::Exempt));
            }
            _ => self.limit(src, class, &mut e),
        }
        e
    }

    fn in_drop_or_dry(&self, class: u32, e: &mut Expect) {
        if self.dry() {
            e.inbound.push(inbound::in_stat_index(class, InboundCounter::DryRun as u32));
        } else {
            e.outcome = Some(Outcome::Drop);
        }
    }

    /// The inbound limiter for `src` in `class` (a class past the table or
    /// without a limit: nothing).
    fn limit(&mut self, src: IpAddr, class: u32, e: &mut Expect) {
        if class >= MAX_LIMIT_CLASSES {
            return;
        }
        let limit = self.in_limits[class as usize];
        if limit.interval_ns == 0 {
            return;
        }
        e.inbound.push(inbound::in_stat_index(class, InboundCounter::Checked as u32));
        let addr = match src {
            IpAddr::V4(a) => addr::key_v4(a.octets()).addr,
            IpAddr::V6(a) => addr::key_v6(a.octets()).addr,
        };
        let used = self.in_buckets.entry(LimitKey { addr, class }).or_default();
        if *used < limit.burst_ns / limit.interval_ns {
            *used += 1;
            return;
        }
        e.inbound.push(inbound::in_stat_index(class, InboundCounter::Limited as u32));
        self.in_drop_or_dry(class, e);
    }

    /// The limiter of a SYN the guard passed, on a port with a class.
    fn limit_port(&mut self, src: IpAddr, port: u16, e: &mut Expect) {
        let class = self.in_ports.get(&port).copied().unwrap_or(0);
        if class != 0 {
            self.limit(src, class, e);
        }
    }

    /// The ingress decision for a guarded SYN from `src` to `port`: the
    /// gate acts on the judgement and keeps the reported-sources state.
    fn decide(&mut self, src: IpAddr, port: u16, mut e: Expect) -> Expect {
        let (hit, judgement) = self.judge(src);
        e.hits.extend(hit);
        e.decided = Some((src, port));
        match judgement {
            Judgement::Allowed => e.counters.push(Counter::Allowed as u32),
            Judgement::Passed { reason } => {
                e.counters.push(Counter::VerdictPass as u32);
                if reason != verdict_reason::OK {
                    self.limit_port(src, port, &mut e);
                }
            }
            Judgement::Refused(r) => self.refuse(src, port, r, &mut e),
            Judgement::Unknown { key, presumed } => {
                let held = self.note(key, &mut e);
                match presumed {
                    Some(r) => self.refuse(src, port, r, &mut e),
                    // Hold is no refusal: its drops never go to the
                    // rejector.
                    None if self.flags & config_flags::HOLD != 0 && held => {
                        let counter = Counter::verdict_drop(verdict_reason::HOLD);
                        self.drop_or_dry(&mut e, counter, Counter::DryRun as u32);
                    }
                    None => {
                        e.counters.push(Counter::Unknown as u32);
                        self.limit_port(src, port, &mut e);
                    }
                }
            }
        }
        e
    }

    /// A refused SYN: counted by its refusal's counter; passed when the
    /// rejector takes it ([`Model::to_rejector`], never in dry-run mode),
    /// else dropped (dry-run: passed and counted).
    fn refuse(&self, src: IpAddr, port: u16, r: Refusal, e: &mut Expect) {
        if !self.dry() && self.to_rejector(src, port, r.code, e) {
            e.counters.push(r.counter);
        } else {
            self.drop_or_dry(e, r.counter, Counter::DryRun as u32);
        }
    }

    /// Whether the gate passes a SYN refused for `code` to the rejector:
    /// the code's action is reject on `port`, the lease runs and `src` is
    /// not quiet. A SYN whose action is reject is counted by what became of
    /// it (passed by its code, or dropped for the lease or the quiet
    /// table).
    fn to_rejector(&self, src: IpAddr, port: u16, code: u32, e: &mut Expect) -> bool {
        let rs = &self.reject;
        if !rs.steers(code, port) {
            return false;
        }
        let passed = RejectCounter::to_rejector(code);
        let counter = if !rs.lease {
            RejectCounter::Fallback as u32
        } else if rs.is_quiet(&own_key(&src), &self.hash) {
            RejectCounter::Quiet as u32
        } else {
            passed
        };
        e.rej.push(counter);
        counter == passed
    }

    /// The `reject::refusal` code the tables refuse `src` for (a
    /// presumption's too), or None when they do not refuse it (hold is no
    /// refusal).
    pub fn refusal(&self, src: IpAddr) -> Option<u32> {
        match self.judge(src).1 {
            Judgement::Refused(r) | Judgement::Unknown { presumed: Some(r), .. } => Some(r.code),
            _ => None,
        }
    }

    /// What the rejector must do with a TCP connection's socket lookup from
    /// `src` to local port `port`. It judges the source again (no hits, no
    /// reports) and steers it when its refusal's action is reject on that
    /// port, whatever the lease and the quiet table say: those are the XDP
    /// gate's, which drops what they keep from the rejector before any
    /// lookup. Nor does it ask whether the port is guarded: the gate passes
    /// a SYN to an unguarded port undecided, and the rejector steers a
    /// refused source's connection all the same.
    pub fn rejector(&self, src: IpAddr, port: u16) -> Steer {
        if !self.reject.ports.contains(&port) {
            return Steer::None;
        }
        let Some(code) = self.refusal(src) else { return Steer::None };
        if !self.reject.rejects(code) {
            return Steer::None;
        }
        if self.dry() {
            return Steer::DryRun;
        }
        let slot = if src.is_ipv6() { reject::SLOT_V6 } else { reject::SLOT_V4 };
        match self.reject.listeners[slot as usize] {
            Some(cookie) => Steer::Listener { slot, cookie },
            None => Steer::Missing,
        }
    }

    /// What the egress gate programs (`gatekeeper_subscriber`,
    /// `gatekeeper_egress`) must do with `f`.
    pub fn egress(&mut self, f: &[u8]) -> Expect {
        let skipped = EgressCounter::ParseSkipped as u32;
        let mut e = Expect::default();
        let seg = match walk(f, Gate::Egress) {
            Walk::NotTcp => return e,
            Walk::Unreadable => return e.skipped(skipped),
            Walk::Tcp(seg) => seg,
        };
        if seg.hidden != Hidden::None {
            match self.guard_hidden(f, &seg, e) {
                Ok(done) => return done,
                Err(back) => e = back,
            }
            if seg.hidden == Hidden::Chain {
                return e.skipped(skipped);
            }
        }
        let syn = match syn_header(f, &seg) {
            Err(Unreadable) => return e.skipped(skipped),
            Ok(None) => return e,
            Ok(Some(syn)) => syn,
        };
        let policy = self.policy_of(syn.dport);
        if policy == 0 {
            return e;
        }
        let Some((src, dst)) = addrs(f, &seg) else { return e.skipped(skipped) };
        let Some(hit) = self.table(RangeKind::Exempt, RangeKind::Pool, &src) else { return e };
        let dry = EgressCounter::DryRun as u32;
        if policy & port_policy::GUARD != 0 {
            match hit {
                Hit::Loser(pool) => {
                    if let Some(s) = self.longest(RangeKind::Smarthost, &dst) {
                        e.hits.push(s.id);
                        e.counters.push(EgressCounter::SmarthostAllowed as u32);
                    } else {
                        e.hits.push(pool.id);
                        if self.dry() {
                            let c = if pool.reject { EgressCounter::PoolRejected } else { EgressCounter::PoolBlocked };
                            e.counters.extend([c as u32, dry]);
                        } else if pool.reject && syn.plain {
                            e.counters.push(EgressCounter::PoolRejected as u32);
                            e.outcome = Some(Outcome::Reject);
                        } else {
                            e.counters.push(EgressCounter::PoolBlocked as u32);
                            e.outcome = Some(Outcome::Drop);
                        }
                        return e;
                    }
                }
                Hit::Winner(id) => {
                    e.hits.push(id);
                    e.counters.push(EgressCounter::Exempt as u32);
                }
            }
        }
        let class = port_policy::class(policy);
        if class == 0 || class >= MAX_LIMIT_CLASSES {
            return e;
        }
        let limit = self.limits[class as usize];
        if limit.interval_ns == 0 {
            return e;
        }
        let addr = match src {
            IpAddr::V4(a) => addr::key_v4(a.octets()).addr,
            IpAddr::V6(a) => addr::key_v6(a.octets()).addr,
        };
        let used = self.buckets.entry(LimitKey { addr, class }).or_default();
        if *used < limit.burst_ns / limit.interval_ns {
            *used += 1;
            return e;
        }
        self.drop_or_dry(&mut e, EgressCounter::RateLimited as u32, dry);
        e
    }

    /// The egress guard of a segment whose headers hide whether it is a SYN
    /// to a guarded port: `Ok` with the decision when it drops it (a pool
    /// source's, not to a smarthost, to a guarded port or one it cannot
    /// show), else `Err` to go on.
    // The expectation goes in and comes back out either way (moved, not
    // copied): its size does not matter here.
    #[allow(clippy::result_large_err)]
    fn guard_hidden(&self, f: &[u8], seg: &Segment, mut e: Expect) -> Result<Expect, Expect> {
        let counter = if seg.hidden == Hidden::Fragment {
            if let Some(ports) = get(f, seg.tcp, 4) {
                if self.policy_of(be16(&ports[2..4])) & port_policy::GUARD == 0 {
                    return Err(e);
                }
            }
            EgressCounter::PoolFragment
        } else {
            EgressCounter::PoolExtChain
        };
        let Some((src, dst)) = addrs(f, seg) else { return Ok(e.skipped(EgressCounter::ParseSkipped as u32)) };
        let Some(Hit::Loser(pool)) = self.table(RangeKind::Exempt, RangeKind::Pool, &src) else { return Err(e) };
        if self.longest(RangeKind::Smarthost, &dst).is_some() {
            return Err(e);
        }
        e.hits.push(pool.id);
        self.drop_or_dry(&mut e, counter as u32, EgressCounter::DryRun as u32);
        Ok(e)
    }
}
