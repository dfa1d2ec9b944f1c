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

mod heuristics;
mod lines;
mod rules;
#[cfg(test)]
mod tests;
mod vocab;

use heuristics::*;
pub use lines::*;
pub use rules::*;
use vocab::*;
