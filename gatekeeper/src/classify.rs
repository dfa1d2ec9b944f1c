//! Reverse-DNS name classifier: is the PTR name of a connecting address the
//! name of an end-user line (`dynamic`), an address-derived name that says
//! nothing about the line (`generic`), or a real host name (`named`)?
//!
//! Pure functions, no I/O except [`load_rules`] and [`classify_lines`]. The
//! heuristics use no regular expressions and allocate once per call (the
//! `reasons` vector; [`Classifier::classify_into`] reuses a caller's vector).
//!
//! # Decision order
//!
//! The name is lowercased and a trailing dot dropped, then:
//!
//! 1. **Trusted suffix** — a name equal to, or ending on a label boundary in,
//!    one of the operator's trusted suffixes (`google.com` trusts
//!    `mail-yw1-f171.google.com`, not `notgoogle.com`) is `named`
//!    (`trusted-suffix`).
//! 2. **Operator rules** — the first matching rule of the rules file decides
//!    (`rule:<file>:<line>`). See [`load_rules`].
//! 3. **Heuristics**, below. An empty name, a name longer than 255 bytes, a
//!    single label (`localhost`) or a private/placeholder top-level label
//!    (`.localdomain`, `.lan`, `.home`, `.arpa`, ...) is `generic`
//!    (`empty-name`, `overlong-name`, `single-label`, `bogus-tld`).
//!
//! # Evidence
//!
//! **The embedded source address** (`ip-embedded:<form>`), looked for in the
//! whole name:
//! - the four IPv4 octets as a chain of numbers joined by single `.`, `-` or
//!   `_`, forwards or backwards, zero-padded or not (`dotted`, `dashed`,
//!   `underscored`, `mixed`, each possibly `-reversed` and/or `-padded`);
//!   `1-2-3-4`, `001-002-003-004`, `4.3.2.1`, `a1-2-3-4`, `ip-1-2-3-4`;
//! - the octets spread over two chains (`split`: `12.red-83-45-67`,
//!   `host34-12-dynamic.45-79-r`);
//! - the 32-bit value in hex (`hex`: `p5b0a1c2d`, `ip5f5ad5cc`, `c0000207`,
//!   also byte-reversed), as a decimal integer (`decimal`), or the octets
//!   concatenated (`concat-padded`: `softbank126012062002`; `concat`, only
//!   with 8 or more digits, so `host1234` is *not* an address);
//! - only two or three consecutive octets (`partial`: `3-4.pool`,
//!   `w90-89.abo`, `ip-51-12-34.eu`);
//! - IPv6: all 32 nibbles or the 64-bit interface id as one hex string
//!   (`v6-hex`: `p200300cbc709...dip0`), single-nibble labels forwards or
//!   backwards (`v6-nibbles`), dash/dot-separated groups with or without
//!   leading zeros covering the interface id (`v6-groups`:
//!   `dynamic-2a01-0c23-...`), or only three or more leading groups
//!   (`v6-prefix`).
//!
//! An IPv4-mapped IPv6 source is treated as IPv4.
//!
//! **Tokens**, matched as whole words: the name is split on `.`, `-`, `_`,
//! digits and any other non-letter, so `dsl` never fires inside `mudslide`
//! nor `pool` inside `liverpool` or `user` inside `userp2040`. A word made of
//! exactly two known words also counts (`dynamicip`, `dyndsl`, `mailout`).
//! `3g`/`4g`/`5g` count as whole pieces. End-user, static and hint tokens
//! count only left of the registrable domain (the last two labels, three
//! under `co.uk`-style second levels), so `umts-forum.org` or `cable.net.co`
//! don't fire; mail tokens count anywhere but the top-level label.
//! - *end-user, strong* (`token:<word>`): `dyn`, `dynamic`, `dhcp`, `dial`,
//!   `dialup`, `ppp`, `pppoe`, `dsl`, `adsl`, `vdsl`, `xdsl`, `pool`, `pools`,
//!   `residential`, Spanish/Portuguese `dinamico`...;
//! - *end-user, weak*: `cable`, `docsis`, `cm`, `cpe`, `catv`, `hsd`, `res`,
//!   `broadband`, `bb`, `ftth`..., `client(s)`, `cust(omer)`, `subs`, `abo`,
//!   `user(s)`, `home`, `mobile`, `umts`, `lte`, `gprs`, `3g`-`5g`,
//!   `wireless`, `wifi`, `wlan`, `nat`, `cgnat`, `dip`, `ipoe`, `access`...;
//! - *static/business/hosting*: `static`, `fixed`, `biz`, `business`, `corp`,
//!   `dedicated`, `colo`, `hosting`, `server`, `srv`, `vps`, `cloud`,
//!   `compute`, `sdsl`, ...;
//! - *mail* (`mail-token:<word>`): `mail`, `email`, `mailer`, `smtp`, `mta`,
//!   `mx`, `relay`, `outbound`, `mout`, `sender`, `bounce`, ...; *weak mail*:
//!   `out`, `outgoing`;
//! - *hints*: `ip`, `host`, `rev`, `reverse`, `ptr`, `addr` (generated-name
//!   markers, not end-user markers); *unassigned*: `unknown`, `unassigned`,
//!   `noname`, `unused`, `generic`, ...
//!
//! **Numbered host** (`numbered-host`): four or more digits left of the
//! registrable domain (`cpc86377-aztw32-2-0-cust226`, `p1975138-ipoe`).
//!
//! # Decision
//!
//! Let *address* be any embedded form, *full* a form covering the whole
//! IPv4 address / interface id, *three* at least three octets.
//!
//! | evidence | class |
//! |---|---|
//! | strong mail token, no end-user token | `named` (even with an address: `a9-92.smtp-out.amazonses.com`, `66-220-144-178.mail-mail.facebook.com`) |
//! | strong mail token + end-user token + address | `generic` (a mail token never yields `dynamic`) |
//! | static token + (address or numbered host) | `generic` (`static.88-198-12-34.clients.your-server.de`) |
//! | end-user token + (address or numbered host) | `dynamic` |
//! | strong end-user token alone (`dynamic.isp.example`) | `dynamic` |
//! | weak mail token (`out`), no end-user token | `named` |
//! | unassigned token | `generic` |
//! | full or three-octet address, no token | `generic` |
//! | two-octet address + hint token (`ip-12-34.example`) | `generic` |
//! | anything else (no address; two octets without a hint: `m43-7.mailgun.net`; a weak end-user or static token without numbers: `home.example.org`) | `named` |
//!
//! `named` with no reasons means "nothing generic about this name".
//!
//! # Operator rules
//!
//! See [`load_rules`]: first match wins and beats the heuristics.
use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Error, LineError, Result};

/// Longest name (after dropping a trailing dot) that is looked at.
const MAX_NAME: usize = 255;

// ------------------------------------------------------------ public types

/// What a reverse-DNS name says about the host behind an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// An end-user / access line (DSL, cable, dial-up, mobile, FTTH pool).
    Dynamic,
    /// Generated from the address but not saying end-user, or a static /
    /// business / hosting name, or a placeholder name.
    Generic,
    /// A real host name (mail servers and everything with no generic sign).
    Named,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Dynamic, Class::Generic, Class::Named];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Dynamic => "dynamic",
            Class::Generic => "generic",
            Class::Named => "named",
        }
    }

    /// The matching [`gatekeeper_common::verdict_reason`] slot.
    pub fn verdict_reason(self) -> u32 {
        use gatekeeper_common::verdict_reason as vr;
        match self {
            Class::Dynamic => vr::DYNAMIC,
            Class::Generic => vr::GENERIC,
            Class::Named => vr::OK,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "dynamic" => Ok(Class::Dynamic),
            "generic" => Ok(Class::Generic),
            "named" => Ok(Class::Named),
            _ => Err(format!("unknown class {s:?} (expected dynamic, generic or named)")),
        }
    }
}

/// One piece of evidence. Displays (and serializes) as a short stable
/// kebab-case string: `ip-embedded:dashed`, `token:dsl`, `mail-token:smtp`,
/// `numbered-host`, `trusted-suffix`, `rule:<file>:<line>`, `bogus-tld`...
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The name ends in a trusted suffix.
    TrustedSuffix,
    /// An operator rule matched: file name (not the full path) and line.
    Rule { file: Arc<str>, line: usize },
    /// The source address is embedded in the name, in this form.
    IpEmbedded(&'static str),
    /// An end-user, static/business or hint token.
    Token(&'static str),
    /// A mail-infrastructure token.
    MailToken(&'static str),
    /// Four or more digits left of the registrable domain.
    NumberedHost,
    /// Something about the name as a whole (`empty-name`, `single-label`,
    /// `bogus-tld`, `overlong-name`).
    Name(&'static str),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::TrustedSuffix => f.write_str("trusted-suffix"),
            Reason::Rule { file, line } => write!(f, "rule:{file}:{line}"),
            Reason::IpEmbedded(form) => write!(f, "ip-embedded:{form}"),
            Reason::Token(t) => write!(f, "token:{t}"),
            Reason::MailToken(t) => write!(f, "mail-token:{t}"),
            Reason::NumberedHost => f.write_str("numbered-host"),
            Reason::Name(s) => f.write_str(s),
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The class of a name and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub class: Class,
    pub reasons: Vec<Reason>,
}

/// Classifies with the built-in heuristics only (no rules, no trusted
/// suffixes); the same as `Classifier::default().classify(ip, hostname)`.
pub fn classify(ip: IpAddr, hostname: &str) -> Classification {
    Classifier::default().classify(ip, hostname)
}

/// Operator rules, trusted suffixes and the heuristics, ready to classify.
/// Cheap to share (`&Classifier` is all `classify` needs).
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    rules: Option<Rules>,
    trusted: HashSet<Box<str>>,
}

impl Classifier {
    /// `trusted`: domain suffixes whose names are always `named`
    /// (`google.com`, `.outlook.com`; case and leading/trailing dots don't
    /// matter, empty entries are ignored).
    pub fn new(rules: Option<Rules>, trusted: Vec<String>) -> Classifier {
        let trusted = trusted
            .iter()
            .map(|s| s.trim().trim_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .map(String::into_boxed_str)
            .collect();
        Classifier { rules, trusted }
    }

    pub fn rules(&self) -> Option<&Rules> {
        self.rules.as_ref()
    }

    pub fn classify(&self, ip: IpAddr, hostname: &str) -> Classification {
        let mut reasons = Vec::new();
        let class = self.classify_into(ip, hostname, &mut reasons);
        Classification { class, reasons }
    }

    /// Like [`Classifier::classify`], into a caller's vector (cleared first)
    /// so a loop can reuse it and not allocate at all.
    pub fn classify_into(&self, ip: IpAddr, hostname: &str, reasons: &mut Vec<Reason>) -> Class {
        reasons.clear();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let trimmed = hostname.trim();
        let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
        if trimmed.is_empty() {
            reasons.push(Reason::Name("empty-name"));
            return Class::Generic;
        }
        if trimmed.len() > MAX_NAME {
            reasons.push(Reason::Name("overlong-name"));
            return Class::Generic;
        }
        let mut buf = [0u8; MAX_NAME];
        // Lowercased copy on the stack: no allocation.
        for (d, s) in buf.iter_mut().zip(trimmed.bytes()) {
            *d = s.to_ascii_lowercase();
        }
        let name = &buf[..trimmed.len()];

        if !self.trusted.is_empty() && self.is_trusted(name) {
            reasons.push(Reason::TrustedSuffix);
            return Class::Named;
        }
        if let Some(rules) = &self.rules {
            // ASCII lowercasing keeps UTF-8 valid.
            let s = std::str::from_utf8(name).unwrap_or_default();
            if let Some((class, line)) = rules.first_match(s) {
                reasons.push(Reason::Rule { file: rules.file.clone(), line });
                return class;
            }
        }
        heuristics(ip, name, reasons)
    }

    fn is_trusted(&self, name: &[u8]) -> bool {
        let s = std::str::from_utf8(name).unwrap_or_default();
        if self.trusted.contains(s) {
            return true;
        }
        s.match_indices('.').any(|(i, _)| self.trusted.contains(&s[i + 1..]))
    }
}

// ------------------------------------------------------------ vocabulary

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// End-user token that is enough on its own.
    Strong,
    /// End-user token that needs an address or a numbered host.
    Weak,
    /// Static / business / hosting.
    Static,
    /// Mail infrastructure; never `dynamic`.
    Mail,
    /// Mail infrastructure, but weak (`out`): loses to end-user tokens.
    WeakMail,
    /// Marks a generated name, says nothing about the line.
    Hint,
    /// Placeholder for an unassigned address.
    Unassigned,
}

#[rustfmt::skip]
const VOCAB: &[(Kind, &[&str])] = &[
    (Kind::Strong, &[
        "dyn", "dyna", "dynamic", "dynamicip", "dynip", "dinamic", "dinamico", "dinamica", "dinamicas", "dinamicos",
        "dhcp", "dial", "dialup", "dialin", "ppp", "pppoe", "pppoa", "dsl", "adsl", "vdsl", "xdsl", "pool", "pools",
        "residential",
    ]),
    (Kind::Weak, &[
        "res", "resi", "cable", "cablemodem", "catv", "docsis", "cm", "cpe", "hfc", "hsd", "hsi", "broadband", "bb",
        "ftth", "fttx", "fttb", "fttc", "fttp", "fttn", "gpon", "fibra", "ipoe", "client", "clients", "cliente",
        "clientes", "cust", "customer", "customers", "subs", "subscriber", "subscribers", "abo", "abonne", "abonnes",
        "kunde", "kunden", "user", "users", "usuario", "usuarios", "home", "mobile", "mob", "movil", "gprs", "umts",
        "lte", "wireless", "wifi", "wlan", "wimax", "nat", "cgnat", "dip", "access", "acceso", "acesso", "isdn",
        "modem", "hdsl",
    ]),
    (Kind::Static, &[
        "static", "statik", "staticip", "estatica", "estatico", "fixed", "fix", "fixo", "fija", "fijo", "biz",
        "business", "empresa", "empresas", "corp", "corporate", "enterprise", "ded", "dedicated", "colo", "colocation",
        "hosting", "hosted", "server", "servers", "srv", "vps", "vds", "cloud", "compute", "datacenter", "leased",
        "sdsl", "managed",
    ]),
    (Kind::Mail, &[
        "mail", "mails", "email", "mailer", "mailout", "mailhost", "mailgw", "mailrelay", "mailgate", "mailserver",
        "smtp", "smtps", "smtpout", "esmtp", "mta", "mx", "mxout", "relay", "outbound", "mout", "sender", "bounce",
        "bounces", "postfix", "exim",
    ]),
    (Kind::WeakMail, &["out", "outgoing"]),
    (Kind::Hint, &["ip", "host", "rev", "reverse", "ptr", "addr"]),
    (Kind::Unassigned, &["unknown", "unassigned", "unallocated", "noname", "unnamed", "unused", "generic"]),
];

/// The vocabulary: words of at most 16 ASCII letters packed into a u128,
/// sorted for binary search (a `match` on 200 strings compiles to a linear
/// chain), and a bitmap of the two-letter prefixes that start a word, which
/// turns most non-words away before any search.
struct Vocab {
    table: Vec<(u128, Kind, &'static str)>,
    prefix2: [u32; 26],
}

fn vocab() -> &'static Vocab {
    static VOCAB_TABLE: OnceLock<Vocab> = OnceLock::new();
    VOCAB_TABLE.get_or_init(|| {
        let mut table: Vec<_> =
            VOCAB.iter().flat_map(|(kind, words)| words.iter().map(move |w| (pack(w.as_bytes()), *kind, *w))).collect();
        table.sort_by_key(|e| e.0);
        table.dedup_by_key(|e| e.0);
        let mut prefix2 = [0u32; 26];
        for (_, _, w) in &table {
            let b = w.as_bytes();
            prefix2[usize::from(b[0] - b'a')] |= 1 << (b[1] - b'a');
        }
        Vocab { table, prefix2 }
    })
}

#[inline]
fn pack(w: &[u8]) -> u128 {
    let mut v = 0u128;
    for &b in w {
        v = v << 8 | u128::from(b);
    }
    v
}

impl Vocab {
    /// Could a vocabulary word start with the first two letters of `w`?
    /// (`w` is lowercase ASCII letters.)
    #[inline]
    fn may_start(&self, w: &[u8]) -> bool {
        w.len() >= 2 && self.prefix2[usize::from(w[0] - b'a')] & (1 << (w[1] - b'a')) != 0
    }

    #[inline]
    fn lookup(&self, w: &[u8]) -> Option<(Kind, &'static str)> {
        if w.len() > 16 || !self.may_start(w) {
            return None;
        }
        let key = pack(w);
        self.table.binary_search_by_key(&key, |e| e.0).ok().map(|i| (self.table[i].1, self.table[i].2))
    }
}

/// Private or placeholder top-level labels that no real mail server uses.
fn bogus_tld(tld: &[u8]) -> bool {
    matches!(
        tld,
        b"local"
            | b"localdomain"
            | b"localhost"
            | b"lan"
            | b"home"
            | b"internal"
            | b"intranet"
            | b"invalid"
            | b"test"
            | b"example"
            | b"arpa"
            | b"corp"
            | b"domain"
            | b"belkin"
            | b"config"
            | b"setup"
            | b"private"
            | b"workgroup"
    )
}

/// Second-level labels under which registrations sit one level deeper
/// (`example.co.uk`, `example.com.br`, `example.ne.jp`).
fn generic_second_level(l: &[u8]) -> bool {
    matches!(
        l,
        b"co"
            | b"com"
            | b"net"
            | b"org"
            | b"ac"
            | b"edu"
            | b"gov"
            | b"gob"
            | b"mil"
            | b"ne"
            | b"or"
            | b"ad"
            | b"go"
            | b"gr"
            | b"lg"
            | b"ed"
            | b"nic"
            | b"ltd"
            | b"plc"
            | b"sch"
            | b"nom"
            | b"int"
            | b"info"
            | b"biz"
            | b"web"
    )
}

// ------------------------------------------------------------ heuristics

/// How much of the address the name carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Strength {
    None,
    Two,
    Three,
    Full,
}

const MAX_RUNS: usize = 48;
const MAX_HITS: usize = 12;

#[derive(Clone, Copy, Default)]
struct Run {
    start: u8,
    end: u8,
    val: u64,
}

impl Run {
    #[inline]
    fn len(&self) -> usize {
        usize::from(self.end - self.start)
    }
    #[inline]
    fn range(&self) -> std::ops::Range<usize> {
        usize::from(self.start)..usize::from(self.end)
    }
    #[inline]
    fn octet(&self, o: u8) -> bool {
        self.len() <= 3 && self.val == u64::from(o)
    }
    #[inline]
    fn padded(&self) -> bool {
        self.len() > digits(self.val)
    }
}

#[inline]
fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

#[inline]
fn is_sep(b: u8) -> bool {
    matches!(b, b'.' | b'-' | b'_')
}

/// Maximal runs of `pred` bytes (at most MAX_RUNS).
fn runs_of(name: &[u8], pred: impl Fn(u8) -> bool, out: &mut [Run; MAX_RUNS]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < name.len() && n < MAX_RUNS {
        if !pred(name[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < name.len() && pred(name[i]) {
            i += 1;
        }
        // Names are at most MAX_NAME (255) bytes.
        out[n] = Run { start: start as u8, end: i as u8, val: 0 };
        n += 1;
    }
    n
}

/// Runs `a` and `b` are joined by exactly one separator.
#[inline]
fn linked(name: &[u8], a: &Run, b: &Run) -> bool {
    usize::from(b.start) == usize::from(a.end) + 1 && is_sep(name[usize::from(a.end)])
}

/// Reason strings for chain forms: [separator][reversed][padded].
const CHAIN_FORMS: [[[&str; 2]; 2]; 4] = [
    [["dotted", "dotted-padded"], ["dotted-reversed", "dotted-reversed-padded"]],
    [["dashed", "dashed-padded"], ["dashed-reversed", "dashed-reversed-padded"]],
    [["underscored", "underscored-padded"], ["underscored-reversed", "underscored-reversed-padded"]],
    [["mixed", "mixed-padded"], ["mixed-reversed", "mixed-reversed-padded"]],
];

fn chain_form(name: &[u8], runs: &[Run], reversed: bool) -> &'static str {
    let mut sep: Option<u8> = None;
    let mut mixed = false;
    for w in runs.windows(2) {
        let c = name[usize::from(w[0].end)];
        match sep {
            None => sep = Some(c),
            Some(s) if s != c => mixed = true,
            _ => {}
        }
    }
    let si = if mixed {
        3
    } else {
        match sep {
            Some(b'.') => 0,
            Some(b'_') => 2,
            _ => 1,
        }
    };
    let padded = runs.iter().any(Run::padded);
    CHAIN_FORMS[si][usize::from(reversed)][usize::from(padded)]
}

fn lower_hex(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// `needle` occurs inside one of the hex runs of `name`.
fn in_hex_runs(name: &[u8], hex_runs: &[Run], needle: &[u8]) -> bool {
    hex_runs
        .iter()
        .filter(|r| r.len() >= needle.len())
        .any(|r| name[r.range()].windows(needle.len()).any(|w| w == needle))
}

fn embedded_v4(name: &[u8], ip: Ipv4Addr) -> (Strength, &'static str) {
    let o = ip.octets();
    let mut runs = [Run::default(); MAX_RUNS];
    let n = runs_of(name, |b| b.is_ascii_digit(), &mut runs);
    let runs = &mut runs[..n];
    for r in runs.iter_mut() {
        r.val = name[r.range()]
            .iter()
            .try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .unwrap_or(u64::MAX);
    }

    // Chains of numbers joined by single separators.
    let mut best: (usize, &'static str) = (0, "");
    let mut cover = 0u8;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && linked(name, &runs[j - 1], &runs[j]) {
            j += 1;
        }
        for s in i..j {
            if runs[s].len() > 3 || runs[s].val > 255 {
                continue;
            }
            for k in 0..4 {
                if !runs[s].octet(o[k]) {
                    continue;
                }
                let mut t = 1;
                while s + t < j && k + t < 4 && runs[s + t].octet(o[k + t]) {
                    t += 1;
                }
                if t >= 2 {
                    cover |= (((1u16 << t) - 1) << k) as u8;
                    if t > best.0 {
                        best = (t, chain_form(name, &runs[s..s + t], false));
                    }
                }
                let mut t = 1;
                while s + t < j && k >= t && runs[s + t].octet(o[k - t]) {
                    t += 1;
                }
                if t >= 2 {
                    cover |= (((1u16 << t) - 1) << (k + 1 - t)) as u8;
                    if t > best.0 {
                        best = (t, chain_form(name, &runs[s..s + t], true));
                    }
                }
            }
        }
        i = j;
    }
    if best.0 == 4 {
        return (Strength::Full, best.1);
    }
    if cover.count_ones() == 3 {
        let missing = (0..4).find(|&k| cover & (1 << k) == 0).unwrap_or(0);
        if runs.iter().any(|r| r.octet(o[missing])) {
            cover = 0xf;
        }
    }
    if cover.count_ones() == 4 {
        return (Strength::Full, "split");
    }

    // One number: concatenated octets or the 32-bit value.
    let value = u64::from(u32::from(ip));
    let padded = |o: [u8; 4]| o.iter().fold(0u64, |acc, &x| acc * 1000 + u64::from(x));
    let plain = |o: [u8; 4]| {
        o.iter().fold((0u64, 0usize), |(acc, len), &x| {
            let d = digits(u64::from(x));
            (acc * 10u64.pow(d as u32) + u64::from(x), len + d)
        })
    };
    let mut rev = o;
    rev.reverse();
    for r in runs.iter().filter(|r| r.len() >= 8 && r.len() <= 12) {
        if r.len() == 12 {
            if r.val == padded(o) {
                return (Strength::Full, "concat-padded");
            }
            if r.val == padded(rev) {
                return (Strength::Full, "concat-padded-reversed");
            }
        }
        if !r.padded() {
            if (r.val, r.len()) == plain(o) {
                return (Strength::Full, "concat");
            }
            if (r.val, r.len()) == plain(rev) {
                return (Strength::Full, "concat-reversed");
            }
            if r.val == value {
                return (Strength::Full, "decimal");
            }
        }
    }

    // Hex.
    let mut hex_runs = [Run::default(); MAX_RUNS];
    let nh = runs_of(name, |b| b.is_ascii_hexdigit(), &mut hex_runs);
    let hex_runs = &hex_runs[..nh];
    if hex_runs.iter().any(|r| r.len() >= 8) {
        let mut h = [0u8; 8];
        lower_hex(&o, &mut h);
        if in_hex_runs(name, hex_runs, &h) {
            return (Strength::Full, "hex");
        }
        lower_hex(&rev, &mut h);
        if in_hex_runs(name, hex_runs, &h) {
            return (Strength::Full, "hex-reversed");
        }
    }

    match cover.count_ones() {
        3 => (Strength::Three, "partial"),
        2 => (Strength::Two, "partial"),
        _ => (Strength::None, ""),
    }
}

fn embedded_v6(name: &[u8], ip: Ipv6Addr) -> (Strength, &'static str) {
    let mut nib = [0u8; 32];
    lower_hex(&ip.octets(), &mut nib);

    // One hex string: the whole address or the interface id; the /64 prefix.
    let mut hex_runs = [Run::default(); MAX_RUNS];
    let nh = runs_of(name, |b| b.is_ascii_hexdigit(), &mut hex_runs);
    let hex_runs = &hex_runs[..nh];
    let mut prefix = false;
    if hex_runs.iter().any(|r| r.len() >= 16) {
        if in_hex_runs(name, hex_runs, &nib) || in_hex_runs(name, hex_runs, &nib[16..]) {
            return (Strength::Full, "v6-hex");
        }
        prefix = in_hex_runs(name, hex_runs, &nib[..16]);
    }

    // Single-nibble labels (ip6.arpa style), either direction.
    let mut seq = [0u8; 32];
    let mut len = 0usize;
    let mut best_seq = 0usize;
    for label in name.split(|&b| b == b'.') {
        if label.len() == 1 && label[0].is_ascii_hexdigit() {
            if len < 32 {
                seq[len] = label[0];
                len += 1;
            }
            continue;
        }
        best_seq = best_seq.max(nibble_match(&seq[..len], &nib));
        len = 0;
    }
    best_seq = best_seq.max(nibble_match(&seq[..len], &nib));
    if best_seq >= 16 {
        return (Strength::Full, "v6-nibbles");
    }

    // Groups of 1-4 hex digits joined by single separators.
    let groups = ip.segments();
    let mut runs = [Run::default(); MAX_RUNS];
    let n = runs_of(name, |b| b.is_ascii_alphanumeric(), &mut runs);
    let runs = &mut runs[..n];
    for r in runs.iter_mut() {
        let s = &name[r.range()];
        r.val = if s.len() <= 4 && s.iter().all(u8::is_ascii_hexdigit) {
            s.iter().fold(0u64, |acc, &c| acc << 4 | u64::from((c as char).to_digit(16).unwrap_or(0)))
        } else {
            u64::MAX
        };
    }
    let mut best = (0usize, false);
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && runs[j - 1].val != u64::MAX && runs[j].val != u64::MAX && linked(name, &runs[j - 1], &runs[j]) {
            j += 1;
        }
        for s in i..j {
            for k in 0..8 {
                if runs[s].val != u64::from(groups[k]) {
                    continue;
                }
                let mut t = 1;
                while s + t < j && k + t < 8 && runs[s + t].val == u64::from(groups[k + t]) {
                    t += 1;
                }
                best.0 = best.0.max(t);
                best.1 |= t >= 4 && k + t > 4;
            }
        }
        i = j;
    }
    if best.1 {
        return (Strength::Full, "v6-groups");
    }
    if best.0 >= 3 || prefix {
        return (Strength::Three, "v6-prefix");
    }
    (Strength::None, "")
}

/// Longest run of `seq` that occurs in the nibbles forwards or backwards.
fn nibble_match(seq: &[u8], nib: &[u8; 32]) -> usize {
    if seq.len() < 16 {
        return 0;
    }
    let mut rev = [0u8; 32];
    for (i, &c) in nib.iter().enumerate() {
        rev[31 - i] = c;
    }
    let hay_has = |hay: &[u8; 32]| hay.windows(seq.len()).any(|w| w == seq);
    if hay_has(nib) || hay_has(&rev) {
        seq.len()
    } else {
        0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hit {
    Token(&'static str),
    Mail(&'static str),
}

struct Evidence {
    strong: bool,
    weak: bool,
    stat: bool,
    mail: bool,
    weak_mail: bool,
    hint: bool,
    unassigned: bool,
    hits: [Option<Hit>; MAX_HITS],
    n: usize,
}

impl Evidence {
    fn add(&mut self, kind: Kind, word: &'static str, in_host: bool) {
        let hit = match kind {
            Kind::Mail | Kind::WeakMail => Hit::Mail(word),
            _ if !in_host => return,
            _ => Hit::Token(word),
        };
        match kind {
            Kind::Strong => self.strong = true,
            Kind::Weak => self.weak = true,
            Kind::Static => self.stat = true,
            Kind::Mail => self.mail = true,
            Kind::WeakMail => self.weak_mail = true,
            Kind::Hint => self.hint = true,
            Kind::Unassigned => self.unassigned = true,
        }
        if self.n < MAX_HITS && !self.hits[..self.n].contains(&Some(hit)) {
            self.hits[self.n] = Some(hit);
            self.n += 1;
        }
    }

    fn end_user(&self) -> bool {
        self.strong || self.weak
    }
}

fn scan_tokens(name: &[u8], host_end: usize, tld_start: usize, ev: &mut Evidence) {
    let vocab = vocab();
    let mut i = 0;
    let limit = tld_start;
    while i < limit {
        // One piece: between separators (anything that is not a letter or digit).
        if !name[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let pstart = i;
        while i < limit && name[i].is_ascii_alphanumeric() {
            i += 1;
        }
        let piece = &name[pstart..i];
        let in_host = pstart < host_end;
        if in_host && piece.len() == 2 && matches!(piece, b"3g" | b"4g" | b"5g") {
            ev.add(Kind::Weak, ["3g", "4g", "5g"][usize::from(piece[0] - b'3')], true);
            continue;
        }
        // Words: letter runs inside the piece.
        let mut k = 0;
        while k < piece.len() {
            if !piece[k].is_ascii_alphabetic() {
                k += 1;
                continue;
            }
            let ws = k;
            while k < piece.len() && piece[k].is_ascii_alphabetic() {
                k += 1;
            }
            let word = &piece[ws..k];
            if let Some((kind, w)) = vocab.lookup(word) {
                ev.add(kind, w, in_host);
            } else if in_host && word.len() >= 4 && word.len() <= 16 && vocab.may_start(word) {
                // Two known words run together: dynamicip, dyndsl, mailout.
                for cut in 2..=word.len() - 2 {
                    if let Some((k1, w1)) = vocab.lookup(&word[..cut]) {
                        if let Some((k2, w2)) = vocab.lookup(&word[cut..]) {
                            ev.add(k1, w1, true);
                            ev.add(k2, w2, true);
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn heuristics(ip: IpAddr, name: &[u8], reasons: &mut Vec<Reason>) -> Class {
    // Labels: where the registrable domain and the top-level label start.
    let mut dots = [0usize; 4]; // positions of the last up to 3 dots, newest last
    let mut ndots = 0usize;
    for (i, &b) in name.iter().enumerate() {
        if b == b'.' {
            if ndots == 3 {
                dots.copy_within(1..3, 0);
                ndots = 2;
            }
            dots[ndots] = i;
            ndots += 1;
        }
    }
    if ndots == 0 {
        reasons.push(Reason::Name("single-label"));
        return Class::Generic;
    }
    let tld_start = dots[ndots - 1] + 1;
    let tld = &name[tld_start..];
    let numeric_tld = tld.iter().all(u8::is_ascii_digit);
    if bogus_tld(tld) {
        reasons.push(Reason::Name("bogus-tld"));
        return Class::Generic;
    }
    let sld_start = if ndots >= 2 { dots[ndots - 2] + 1 } else { 0 };
    let sld = &name[sld_start..tld_start - 1];
    let host_end = if numeric_tld {
        name.len()
    } else if ndots >= 2 && tld.len() == 2 && generic_second_level(sld) {
        if ndots >= 3 {
            dots[ndots - 3] + 1
        } else {
            0
        }
    } else {
        sld_start
    };

    let mut ev = Evidence {
        strong: false,
        weak: false,
        stat: false,
        mail: false,
        weak_mail: false,
        hint: false,
        unassigned: false,
        hits: [None; MAX_HITS],
        n: 0,
    };
    scan_tokens(name, host_end, tld_start, &mut ev);
    let numbered = name[..host_end].iter().filter(|b| b.is_ascii_digit()).count() >= 4;
    let (strength, form) = match ip {
        IpAddr::V4(v4) => embedded_v4(name, v4),
        IpAddr::V6(v6) => embedded_v6(name, v6),
    };
    let addr = strength != Strength::None;

    let class = if ev.mail && !(ev.end_user() && addr) {
        Class::Named
    } else if ev.mail || ev.stat && (addr || numbered) {
        // A mail token with end-user evidence is never dynamic; nor is a
        // static/business/hosting name.
        Class::Generic
    } else if ev.end_user() && (addr || numbered) || ev.strong {
        Class::Dynamic
    } else if ev.weak_mail {
        Class::Named
    } else if ev.unassigned
        || strength >= Strength::Three
        || strength == Strength::Two && (ev.hint || ev.stat || ev.end_user())
    {
        Class::Generic
    } else {
        Class::Named
    };

    let numbered_counts = class == Class::Dynamic && !addr && numbered || class == Class::Generic && ev.stat && !addr;
    reasons.reserve_exact(usize::from(addr) + ev.n + usize::from(numbered_counts));
    if addr {
        reasons.push(Reason::IpEmbedded(form));
    }
    if numbered_counts {
        reasons.push(Reason::NumberedHost);
    }
    for hit in ev.hits[..ev.n].iter().flatten() {
        reasons.push(match *hit {
            Hit::Token(t) => Reason::Token(t),
            Hit::Mail(t) => Reason::MailToken(t),
        });
    }
    class
}

// ------------------------------------------------------------ operator rules

/// Compiled operator rules. First match wins.
#[derive(Clone, Debug)]
pub struct Rules {
    /// File name shown in `rule:<file>:<line>` reasons.
    file: Arc<str>,
    set: RegexSet,
    rules: Vec<Rule>,
    /// `if` conditions.
    conds: RegexSet,
}

#[derive(Clone, Debug)]
struct Rule {
    class: Class,
    line: usize,
    negate: bool,
    /// Enclosing `if` blocks: (index into `conds`, negated).
    conds: Vec<(usize, bool)>,
}

impl Rules {
    /// Number of rules (not counting `if` lines).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching `name` (lowercase, no trailing dot): its class
    /// and line.
    pub fn first_match(&self, name: &str) -> Option<(Class, usize)> {
        if self.rules.is_empty() {
            return None;
        }
        let hits = self.set.matches(name);
        let mut cond_hits = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if hits.matched(i) == rule.negate {
                continue;
            }
            let conds_ok = rule.conds.iter().all(|&(c, negate)| {
                let ch = cond_hits.get_or_insert_with(|| self.conds.matches(name));
                ch.matched(c) != negate
            });
            if conds_ok {
                return Some((rule.class, rule.line));
            }
        }
        None
    }

    /// Parses rules text; `source` names it in errors (a path) and its last
    /// path component names it in reasons. See [`load_rules`].
    pub fn parse(source: &str, text: &str) -> Result<Rules> {
        let file = Path::new(source)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| source.to_string());
        let file: String = file.chars().map(|c| if c.is_whitespace() || c == ',' { '_' } else { c }).collect();

        let mut errors = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        let mut cond_patterns: Vec<String> = Vec::new();
        // Open `if` blocks: (cond index, negated, line).
        let mut stack: Vec<(usize, bool, usize)> = Vec::new();

        for (line_no, logical) in logical_lines(text) {
            let mut err = |message: String| errors.push(LineError { line: line_no, message });
            let line = logical.trim();
            if line == "endif" {
                if stack.pop().is_none() {
                    err("endif without if".into());
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("if").filter(|r| r.starts_with(char::is_whitespace)) {
                match parse_pcre(rest.trim_start()) {
                    Ok((negate, pattern, tail)) => {
                        if !tail.trim().is_empty() {
                            err(format!("unexpected text after the if pattern: {:?}", tail.trim()));
                        } else if let Err(e) = check_regex(&pattern) {
                            err(e);
                        } else {
                            cond_patterns.push(pattern);
                            stack.push((cond_patterns.len() - 1, negate, line_no));
                        }
                    }
                    Err(e) => err(e),
                }
                continue;
            }
            let first = line.chars().next().unwrap_or(' ');
            let parsed = if first == '!' || !first.is_alphanumeric() {
                parse_pcre(line).and_then(|(negate, pattern, tail)| {
                    let class = pcre_action(tail.trim())?;
                    Ok((negate, pattern, class))
                })
            } else {
                let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
                match word.parse::<Class>() {
                    Ok(class) if !rest.trim().is_empty() => Ok((false, format!("(?i){}", rest.trim()), class)),
                    Ok(_) => Err(format!("{word}: the regular expression is missing")),
                    Err(_) => Err(format!(
                        "expected `dynamic|generic|named REGEX` or a Postfix pcre line `/REGEX/flags ACTION`, found {word:?}"
                    )),
                }
            };
            match parsed.and_then(|(negate, pattern, class)| check_regex(&pattern).map(|_| (negate, pattern, class))) {
                Ok((negate, pattern, class)) => {
                    patterns.push(pattern);
                    let conds = stack.iter().map(|&(c, n, _)| (c, n)).collect();
                    rules.push(Rule { class, line: line_no, negate, conds });
                }
                Err(e) => err(e),
            }
        }
        for &(_, _, line) in &stack {
            errors.push(LineError { line, message: "if without endif".into() });
        }
        errors.sort_by_key(|e| e.line);
        if !errors.is_empty() {
            return Err(Error::BadRules { path: source.to_string(), errors });
        }
        let build = |p: &[String]| {
            RegexSetBuilder::new(p).size_limit(512 << 20).dfa_size_limit(64 << 20).build().map_err(|e| {
                Error::BadRules {
                    path: source.to_string(),
                    errors: vec![LineError { line: 0, message: format!("the rules together are too large: {e}") }],
                }
            })
        };
        Ok(Rules { file: file.into(), set: build(&patterns)?, rules, conds: build(&cond_patterns)? })
    }
}

/// Loads operator rules from `path`. One rule a line, first match wins,
/// operator rules beat the heuristics; blank lines and lines whose first
/// non-blank character is `#` are ignored; a line starting with whitespace
/// continues the previous line (as in Postfix tables).
///
/// Native lines: `dynamic REGEX`, `generic REGEX` or `named REGEX` — the
/// rest of the line is the regular expression (Rust `regex` syntax,
/// case-insensitive, unanchored: write `^...$` to anchor).
///
/// Postfix pcre_table(5) lines, so existing generic-rDNS lists load as they
/// are:
/// - `/REGEX/flags ACTION [text]` and `!/REGEX/flags ACTION` (match when the
///   pattern does not match); any non-alphanumeric, non-space delimiter;
///   flags `i` (toggles case-insensitivity, on by default as in Postfix),
///   `m`, `s`, `x`, `U`, `A` (anchored), `E` and `X` (no effect);
/// - `if /REGEX/flags` / `if !/REGEX/flags` ... `endif` blocks, nested;
/// - ACTION `REJECT`, `DEFER`, `DEFER_IF_PERMIT`, `DISCARD`, `4NN`/`5NN`
///   codes → `dynamic`; `OK`, `DUNNO`, `PERMIT` → `named`; the class words
///   `dynamic`, `generic`, `named` are accepted too. Any other action
///   (`WARN`, `PREPEND`, `HOLD`, `FILTER`, ...) is an error.
///
/// Regular expressions are PCRE-like but compiled with Rust's `regex`:
/// look-around and back-references are errors. Names are lowercased before
/// matching and have no trailing dot.
///
/// Every bad line is reported (file and line number) and then nothing is
/// loaded: [`Error::BadRules`].
pub fn load_rules(path: impl AsRef<Path>) -> Result<Rules> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading rules {}", path.display()), e))?;
    Rules::parse(&path.display().to_string(), &text)
}

/// Logical lines with the number of their first physical line; comments and
/// blank lines dropped, continuation lines joined.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut continuable = false;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if raw.starts_with(char::is_whitespace) && continuable {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(trimmed);
            }
            continue;
        }
        out.push((i + 1, trimmed.to_string()));
        continuable = true;
    }
    out
}

/// `[!]/pattern/flags rest` → (negated, regex with inline flags, rest).
fn parse_pcre(s: &str) -> std::result::Result<(bool, String, &str), String> {
    let (negate, s) = match s.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let mut chars = s.char_indices();
    let delim = match chars.next() {
        Some((_, c)) if !c.is_alphanumeric() && !c.is_whitespace() && c != '\\' => c,
        _ => return Err(format!("expected a pattern like /REGEX/, found {s:?}")),
    };
    let mut end = None;
    let mut escaped = false;
    for (i, c) in chars.by_ref() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            end = Some(i);
            break;
        }
    }
    let Some(end) = end else {
        return Err(format!("no closing {delim} after the pattern"));
    };
    let body = &s[delim.len_utf8()..end];
    let after = &s[end + delim.len_utf8()..];
    let flags_len = after.find(char::is_whitespace).unwrap_or(after.len());
    let (flags, rest) = after.split_at(flags_len);
    let (mut icase, mut multi, mut dotall, mut ext, mut ungreedy, mut anchored) =
        (true, false, false, false, false, false);
    for f in flags.chars() {
        match f {
            'i' => icase = !icase,
            'm' => multi = true,
            's' => dotall = true,
            'x' => ext = true,
            'U' => ungreedy = true,
            'A' => anchored = true,
            'E' | 'X' => {}
            other => return Err(format!("unknown pattern flag {other:?} (Postfix pcre flags: i m s x A E U X)")),
        }
    }
    let mut inline = String::new();
    for (on, c) in [(icase, 'i'), (multi, 'm'), (dotall, 's'), (ext, 'x'), (ungreedy, 'U')] {
        if on {
            inline.push(c);
        }
    }
    let mut pattern = if inline.is_empty() { String::new() } else { format!("(?{inline})") };
    if anchored {
        pattern.push_str(&format!("^(?:{body})"));
    } else {
        pattern.push_str(body);
    }
    Ok((negate, pattern, rest))
}

fn pcre_action(action: &str) -> std::result::Result<Class, String> {
    let word = action.split_whitespace().next().unwrap_or("");
    if word.is_empty() {
        return Err("the action is missing (e.g. REJECT or OK)".into());
    }
    let upper = word.to_ascii_uppercase();
    let code = word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit());
    match upper.as_str() {
        "REJECT" | "DEFER" | "DEFER_IF_PERMIT" | "DISCARD" => Ok(Class::Dynamic),
        _ if code && (word.starts_with('4') || word.starts_with('5')) => Ok(Class::Dynamic),
        "OK" | "DUNNO" | "PERMIT" => Ok(Class::Named),
        "DYNAMIC" => Ok(Class::Dynamic),
        "GENERIC" => Ok(Class::Generic),
        "NAMED" => Ok(Class::Named),
        _ => Err(format!(
            "action {word:?} has no meaning for gatekeeper (REJECT, DEFER, DISCARD, 4NN, 5NN → dynamic; OK, DUNNO → named; or dynamic/generic/named)"
        )),
    }
}

fn check_regex(pattern: &str) -> std::result::Result<(), String> {
    RegexBuilder::new(pattern)
        .size_limit(16 << 20)
        .build()
        .map(|_: Regex| ())
        .map_err(|e| format!("bad regular expression: {}", e.to_string().lines().last().unwrap_or("").trim()))
}

// ------------------------------------------------------------ CLI glue

#[derive(Serialize)]
struct OutputLine<'a> {
    ip: IpAddr,
    hostname: &'a str,
    class: Class,
    reasons: &'a [Reason],
}

/// Reads `IP HOSTNAME` lines from `input` and writes one line per name to
/// `out`: `IP HOSTNAME CLASS reason,reason` (`-` when there are no reasons),
/// or with `json` one object per line: `{"ip":..,"hostname":..,"class":..,
/// "reasons":[..]}`. Blank lines and lines starting with `#` are skipped; a
/// trailing `# comment` after the hostname is allowed.
///
/// Bad lines (an address that does not parse, a missing or malformed
/// hostname, extra fields, invalid UTF-8) are **reported on stderr as they
/// come** (`input line N: ...`) and skipped; the other lines are still
/// classified, and at the end the call returns [`Error::ClassifyInput`]
/// (count and first bad line) so the command exits non-zero. Output is
/// flushed before returning. Errors writing `out` stop at once.
pub fn classify_lines(classifier: &Classifier, input: impl BufRead, out: impl Write, json: bool) -> Result<()> {
    classify_lines_with(classifier, input, out, std::io::stderr().lock(), json)
}

/// [`classify_lines`] with bad-line reports going to `diag` instead of stderr.
pub fn classify_lines_with(
    classifier: &Classifier,
    mut input: impl BufRead,
    mut out: impl Write,
    mut diag: impl Write,
    json: bool,
) -> Result<()> {
    let mut raw = Vec::new();
    let mut reasons = Vec::new();
    let mut text = String::new();
    let mut line_no = 0usize;
    let mut bad = 0usize;
    let mut first_bad = 0usize;
    let write_err = |e: std::io::Error| Error::io("writing classifications", e);
    loop {
        raw.clear();
        let n = input.read_until(b'\n', &mut raw).map_err(|e| Error::io("reading input", e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        match parse_input_line(&raw) {
            Ok(None) => {}
            Ok(Some((ip, host))) => {
                let class = classifier.classify_into(ip, host, &mut reasons);
                if json {
                    let line = OutputLine { ip, hostname: host, class, reasons: &reasons };
                    serde_json::to_writer(&mut out, &line).map_err(|e| write_err(e.into()))?;
                    out.write_all(b"\n").map_err(write_err)?;
                } else {
                    text.clear();
                    for (i, r) in reasons.iter().enumerate() {
                        if i > 0 {
                            text.push(',');
                        }
                        use std::fmt::Write as _;
                        let _ = write!(text, "{r}");
                    }
                    if text.is_empty() {
                        text.push('-');
                    }
                    writeln!(out, "{ip} {host} {class} {text}").map_err(write_err)?;
                }
            }
            Err(message) => {
                bad += 1;
                if first_bad == 0 {
                    first_bad = line_no;
                }
                // Diagnostics are best effort: a closed stderr must not stop the run.
                let _ = writeln!(diag, "input line {line_no}: {message}");
            }
        }
    }
    out.flush().map_err(write_err)?;
    if bad > 0 {
        return Err(Error::ClassifyInput { bad, first_line: first_bad });
    }
    Ok(())
}

/// `Ok(None)` for a blank or comment line.
fn parse_input_line(raw: &[u8]) -> std::result::Result<Option<(IpAddr, &str)>, String> {
    let line = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_whitespace();
    let ip_s = fields.next().unwrap_or("");
    let ip: IpAddr = ip_s.parse().map_err(|_| format!("{ip_s:?} is not an IPv4 or IPv6 address"))?;
    let host = fields.next().ok_or_else(|| format!("hostname missing after {ip_s} (expected `IP HOSTNAME`)"))?;
    if host.starts_with('#') {
        return Err(format!("hostname missing after {ip_s} (expected `IP HOSTNAME`)"));
    }
    if let Some(extra) = fields.next() {
        if !extra.starts_with('#') {
            return Err(format!("unexpected field {extra:?} after the hostname (expected `IP HOSTNAME`)"));
        }
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty()
        || name.len() > 253
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        || name.split('.').any(|l| l.is_empty() || l.len() > 63)
    {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok(Some((ip, host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ip: &str, name: &str) -> Classification {
        classify(ip.parse().unwrap(), name)
    }

    fn class(ip: &str, name: &str) -> Class {
        c(ip, name).class
    }

    fn reasons(ip: &str, name: &str) -> Vec<String> {
        c(ip, name).reasons.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn vocab_is_packed_without_collisions() {
        let total: usize = VOCAB.iter().map(|(_, w)| w.len()).sum();
        assert_eq!(vocab().table.len(), total, "a word appears twice in VOCAB");
        for (_, words) in VOCAB {
            for w in *words {
                assert!(w.len() >= 2 && w.len() <= 16 && w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
                assert!(vocab().lookup(w.as_bytes()).is_some());
            }
        }
    }

    #[test]
    fn embedded_forms_v4() {
        let ip = "73.47.72.35";
        assert_eq!(reasons(ip, "c-73-47-72-35.hsd1.nh.comcast.net"), ["ip-embedded:dashed", "token:hsd"]);
        assert_eq!(reasons(ip, "73.47.72.35.example.net")[0], "ip-embedded:dotted");
        assert_eq!(reasons(ip, "35.72.47.73.rev.example.net")[0], "ip-embedded:dotted-reversed");
        assert_eq!(reasons(ip, "35-72-47-73.example.net")[0], "ip-embedded:dashed-reversed");
        assert_eq!(reasons(ip, "ip_73_47_72_35.example.net")[0], "ip-embedded:underscored");
        assert_eq!(reasons(ip, "073-047-072-035.example.net")[0], "ip-embedded:dashed-padded");
        assert_eq!(reasons(ip, "x073047072035.example.net")[0], "ip-embedded:concat-padded");
        assert_eq!(reasons(ip, "h73477235.example.net")[0], "ip-embedded:concat");
        assert_eq!(reasons(ip, "p492f4823.dip0.t-ipconnect.de")[0], "ip-embedded:hex");
        assert_eq!(reasons(ip, "n1227835427.example.net")[0], "ip-embedded:decimal");
        assert_eq!(reasons(ip, "35.red-73-47-72.dynamicip.rima-tde.net")[0], "ip-embedded:split");
        assert_eq!(reasons(ip, "host35-72-dynamic.47-73-r.retail.example.it")[0], "ip-embedded:split");
        assert_eq!(reasons(ip, "72-35.pool.example.net")[0], "ip-embedded:partial");
        assert_eq!(reasons("192.0.2.7", "c0000207.example.net")[0], "ip-embedded:hex");
        // host1234 is not an address, nor are unrelated numbers.
        assert_eq!(class("10.20.12.34", "host1234.example.net"), Class::Named);
        assert_eq!(class(ip, "www2.example.com"), Class::Named);
    }

    #[test]
    fn embedded_forms_v6() {
        let ip = "2003:cb:c709:6200:16ba:af70:999d:6a1a";
        assert_eq!(
            reasons(ip, "p200300cbc709620016baaf70999d6a1a.dip0.t-ipconnect.de"),
            ["ip-embedded:v6-hex", "token:dip"]
        );
        let ip2 = "2a01:c23:b916:4400:b786:57bd:b8fa:4b8b";
        assert_eq!(
            c(ip2, "dynamic-2a01-0c23-b916-4400-b786-57bd-b8fa-4b8b.c23.pool.telefonica.de"),
            Classification {
                class: Class::Dynamic,
                reasons: vec![Reason::IpEmbedded("v6-groups"), Reason::Token("dynamic"), Reason::Token("pool")]
            }
        );
        assert_eq!(reasons(ip2, "2a01-c23-b916-4400-b786-57bd-b8fa-4b8b.rev.example.net")[0], "ip-embedded:v6-groups");
        let arpa = "a.1.a.6.d.9.9.9.0.7.f.a.a.b.6.1.customer.example.net";
        assert_eq!(reasons(ip, arpa)[0], "ip-embedded:v6-nibbles");
        assert_eq!(class(ip, arpa), Class::Dynamic);
        assert_eq!(reasons("2001:db8:1:2::1", "2001-db8-1.cust.example.net")[0], "ip-embedded:v6-prefix");
        assert_eq!(class("2001:db8::25", "mx.example.net"), Class::Named);
        // IPv4-mapped sources are IPv4.
        assert_eq!(reasons("::ffff:73.47.72.35", "c-73-47-72-35.hsd1.nh.comcast.net")[0], "ip-embedded:dashed");
    }

    #[test]
    fn tokens_need_word_boundaries() {
        assert_eq!(class("81.2.3.4", "mudslide.example.com"), Class::Named);
        assert_eq!(class("81.2.3.4", "mail.liverpool.ac.uk"), Class::Named);
        assert_eq!(class("81.2.3.4", "www.liverpoolfc.com"), Class::Named);
        assert_eq!(reasons("141.146.126.1", "userp2040.oracle.com"), Vec::<String>::new());
        assert_eq!(class("81.2.3.4", "smtp.pppl.gov"), Class::Named);
        // Tokens inside the registrable domain do not count.
        assert_eq!(class("81.2.3.4", "www.umts-forum.org"), Class::Named);
        assert_eq!(class("81.2.3.4", "mx1.dyn.com"), Class::Named);
        // Split on digits: dsl2, ppp91.
        assert_eq!(class("91.78.12.34", "ppp91-78-12-34.pppoe.mtu-net.ru"), Class::Dynamic);
        // Compounds of two known words.
        assert_eq!(
            reasons("77.1.2.3", "dyndsl-077-001-002-003.example.ru"),
            ["ip-embedded:dashed-padded", "token:dyn", "token:dsl"]
        );
        assert_eq!(reasons("77.1.2.3", "adslpool-77-1-2-3.example.ru")[1..], ["token:adsl", "token:pool"]);
    }

    #[test]
    fn mail_servers_are_named() {
        for (ip, name) in [
            ("54.240.9.92", "a9-92.smtp-out.amazonses.com"),
            ("69.72.43.7", "m43-7.mailgun.net"),
            ("198.2.187.32", "mail187-32.suw11.mandrillapp.com"),
            ("209.85.219.171", "mail-yw1-f171.google.com"),
            ("40.107.244.71", "mail-mw2nam12on2071.outbound.protection.outlook.com"),
            ("66.220.144.178", "66-220-144-178.mail-mail.facebook.com"),
            ("168.245.5.182", "o1682455182.outbound-mail.sendgrid.net"),
            ("98.137.69.146", "sonic310-20.consmr.mail.gq1.yahoo.com"),
            ("17.58.6.43", "pv50p00im-hyfv10011601.me.com"),
        ] {
            assert_eq!(class(ip, name), Class::Named, "{name}");
        }
    }

    #[test]
    fn decision_table() {
        assert_eq!(class("88.198.12.34", "static.88-198-12-34.clients.your-server.de"), Class::Generic);
        assert_eq!(class("3.12.34.56", "ec2-3-12-34-56.us-east-2.compute.amazonaws.com"), Class::Generic);
        assert_eq!(class("86.162.184.27", "host86-162-184-27.range86-162.btcentralplus.com"), Class::Generic);
        assert_eq!(class("82.4.196.95", "cpc149474-cmbg20-2-0-cust94.5-4.cable.virginm.net"), Class::Dynamic);
        assert_eq!(
            reasons("82.4.196.95", "cpc149474-cmbg20-2-0-cust94.5-4.cable.virginm.net"),
            ["numbered-host", "token:cust", "token:cable"]
        );
        assert_eq!(class("1.2.3.4", "dynamic.example.net"), Class::Dynamic);
        assert_eq!(class("1.2.3.4", "home.example.org"), Class::Named);
        assert_eq!(class("1.2.3.4", "unknown.example.net"), Class::Generic);
        // Mail token + end-user token + address: generic, never dynamic.
        assert_eq!(class("1.2.3.4", "mail-1-2-3-4.dsl.example.net"), Class::Generic);
        // Weak mail token loses to end-user tokens.
        assert_eq!(class("1.2.3.4", "out-ab-3-4.wireless.example.com"), Class::Dynamic);
        assert_eq!(class("51.12.34.5", "ns3012345.ip-51-12-34.eu"), Class::Generic);
        assert_eq!(class("1.2.3.4", "ip-3-4.example.net"), Class::Generic);
        assert_eq!(class("1.2.3.4", "1.2.3.4"), Class::Generic);
        assert_eq!(reasons("1.2.3.4", "localhost"), ["single-label"]);
        assert_eq!(reasons("1.2.3.4", "box.localdomain"), ["bogus-tld"]);
        assert_eq!(reasons("1.2.3.4", ""), ["empty-name"]);
        assert_eq!(class("1.2.3.4", "MAIL.Example.COM."), Class::Named);
        assert_eq!(class("1.2.3.4", "mail.example.com"), Class::Named);
    }

    #[test]
    fn trusted_suffixes_on_label_boundaries() {
        let cl = Classifier::new(None, vec!["Google.com.".into(), ".example.net".into(), "".into()]);
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        assert_eq!(cl.classify(ip, "dsl-1-2-3-4.google.com").reasons, [Reason::TrustedSuffix]);
        assert_eq!(cl.classify(ip, "google.com").class, Class::Named);
        assert_eq!(cl.classify(ip, "dsl-1-2-3-4.notgoogle.com").class, Class::Dynamic);
        assert_eq!(cl.classify(ip, "pool-1-2-3-4.EXAMPLE.net.").class, Class::Named);
    }

    const SAMPLE: &str = "\
# comment
dynamic  ^[a-z]+-\\d+-\\d+\\.isp\\.example$
named    \\.partner\\.example$
/^static-[0-9-]+\\.biz\\.example$/   OK
!/\\./   REJECT no dots
if /\\.cable\\.example$/
/^cm-/   554 5.7.1 cable modem
/^cx-/   reject
endif
/\\.gen\\.example$/ generic
";

    #[test]
    fn rules_native_and_pcre() {
        let rules = Rules::parse("/etc/gatekeeper/my rules.txt", SAMPLE).unwrap();
        assert_eq!(rules.len(), 7);
        let cl = Classifier::new(Some(rules), vec![]);
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let check = |name: &str| {
            let c = cl.classify(ip, name);
            (c.class, c.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","))
        };
        assert_eq!(check("abc-1-2.ISP.example"), (Class::Dynamic, "rule:my_rules.txt:2".into()));
        assert_eq!(check("dsl-1-2-3-4.partner.example"), (Class::Named, "rule:my_rules.txt:3".into()));
        assert_eq!(check("static-1-2-3-4.biz.example"), (Class::Named, "rule:my_rules.txt:4".into()));
        assert_eq!(check("nodots"), (Class::Dynamic, "rule:my_rules.txt:5".into()));
        assert_eq!(check("cm-1.cable.example"), (Class::Dynamic, "rule:my_rules.txt:7".into()));
        assert_eq!(check("cx-1.cable.example"), (Class::Dynamic, "rule:my_rules.txt:8".into()));
        // Outside the if block the cm- rule does not apply: heuristics decide.
        assert_eq!(check("cm-9.other.example.org"), (Class::Named, "token:cm".into()));
        assert_eq!(check("x.gen.example"), (Class::Generic, "rule:my_rules.txt:10".into()));
    }

    #[test]
    fn pcre_flags_and_delimiters() {
        let r = Rules::parse("t", "/^ABC/i OK\n#x\n|a/b| REJECT\n/^q/A DUNNO\n").unwrap();
        // `i` makes the pattern case-sensitive: names are lowercased, so ABC never matches.
        assert_eq!(r.first_match("abc.example"), None);
        assert_eq!(r.first_match("xa/b"), Some((Class::Dynamic, 3)));
        assert_eq!(r.first_match("qq"), Some((Class::Named, 4)));
        let r = Rules::parse("t", "/a\\/b/ REJECT\n/multi/\n  OK\n").unwrap();
        assert_eq!(r.first_match("xa/b"), Some((Class::Dynamic, 1)));
        assert_eq!(r.first_match("multi"), Some((Class::Named, 2)));
    }

    #[test]
    fn bad_rules_name_every_line_and_load_nothing() {
        let text =
            "dynamic\n/ok/ OK\n/(?<=x)y/ REJECT\n/z/ WARN hmm\nbogus foo\n/unclosed REJECT\n/a/q OK\nendif\nif /x/\n";
        let Err(Error::BadRules { path, errors }) = Rules::parse("r.pcre", text) else { panic!("expected BadRules") };
        assert_eq!(path, "r.pcre");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 3, 4, 5, 6, 7, 8, 9], "{errors:?}");
        assert!(errors[2].message.contains("WARN"), "{errors:?}");
        let msg = Error::BadRules { path, errors }.to_string();
        assert!(msg.starts_with("r.pcre: 8 bad line(s), no rules loaded"), "{msg}");
    }

    #[test]
    fn sample_pcre_file_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/rdns/sample-generic.pcre");
        let rules = load_rules(path).unwrap();
        assert!(rules.len() >= 10);
        let cl = Classifier::new(Some(rules), vec![]);
        let c = cl.classify("77.1.2.3".parse().unwrap(), "dynamic-077-001-002-003.77.1.pool.telefonica.de");
        assert_eq!(c.class, Class::Dynamic);
        assert!(c.reasons[0].to_string().starts_with("rule:sample-generic.pcre:"), "{c:?}");
        assert!(matches!(load_rules("/nonexistent/rules"), Err(Error::Io { .. })));
    }

    #[test]
    fn classify_lines_text_json_and_bad_lines() {
        let input = "# header\n\n192.0.2.7 c-192-0-2-7.hsd1.ca.example.net.\nbogus name.example\n2001:db8::25 mx.example.org # ok\n192.0.2.8\n192.0.2.9 a b\n";
        let mut out = Vec::new();
        let mut diag = Vec::new();
        let r = classify_lines_with(&Classifier::default(), input.as_bytes(), &mut out, &mut diag, false);
        assert!(matches!(r, Err(Error::ClassifyInput { bad: 3, first_line: 4 })), "{r:?}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 c-192-0-2-7.hsd1.ca.example.net. dynamic ip-embedded:dashed,token:hsd\n2001:db8::25 mx.example.org named mail-token:mx\n"
        );
        let diag = String::from_utf8(diag).unwrap();
        assert!(
            diag.starts_with("input line 4: \"bogus\" is not an IPv4 or IPv6 address\ninput line 6: hostname missing"),
            "{diag}"
        );
        assert!(diag.contains("input line 7: unexpected field \"b\""), "{diag}");

        let mut out = Vec::new();
        classify_lines_with(
            &Classifier::default(),
            "192.0.2.1 www.example.com\n".as_bytes(),
            &mut out,
            std::io::sink(),
            true,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ip": "192.0.2.1", "hostname": "www.example.com", "class": "named", "reasons": []})
        );
        let mut out = Vec::new();
        classify_lines_with(
            &Classifier::default(),
            "192.0.2.1 dsl-192-0-2-1.example.com\n".as_bytes(),
            &mut out,
            std::io::sink(),
            true,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["class"], "dynamic");
        assert_eq!(v["reasons"], serde_json::json!(["ip-embedded:dashed", "token:dsl"]));
    }

    #[test]
    fn class_round_trips() {
        for c in Class::ALL {
            assert_eq!(c.to_string().parse::<Class>().unwrap(), c);
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        assert!("Dynamic".parse::<Class>().is_ok());
        assert!("bad".parse::<Class>().is_err());
    }
}
