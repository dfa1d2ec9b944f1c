//! The heuristics: the source address embedded in the name (every common
//! spelling), tokens, numbered hosts, and the decision they add up to.
#[allow(unused_imports)]
use super::*;

/// How much of the address the name carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Strength {
    None,
    Two,
    Three,
    Full,
}

pub(super) const MAX_RUNS: usize = 48;
pub(super) const MAX_HITS: usize = 12;

#[derive(Clone, Copy, Default)]
pub(super) struct Run {
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
pub(super) fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

#[inline]
pub(super) fn is_sep(b: u8) -> bool {
    matches!(b, b'.' | b'-' | b'_')
}

/// Maximal runs of `pred` bytes (at most MAX_RUNS).
pub(super) fn runs_of(name: &[u8], pred: impl Fn(u8) -> bool, out: &mut [Run; MAX_RUNS]) -> usize {
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
pub(super) fn linked(name: &[u8], a: &Run, b: &Run) -> bool {
    usize::from(b.start) == usize::from(a.end) + 1 && is_sep(name[usize::from(a.end)])
}

/// Reason strings for chain forms: [separator][reversed][padded].
pub(super) const CHAIN_FORMS: [[[&str; 2]; 2]; 4] = [
    [["dotted", "dotted-padded"], ["dotted-reversed", "dotted-reversed-padded"]],
    [["dashed", "dashed-padded"], ["dashed-reversed", "dashed-reversed-padded"]],
    [["underscored", "underscored-padded"], ["underscored-reversed", "underscored-reversed-padded"]],
    [["mixed", "mixed-padded"], ["mixed-reversed", "mixed-reversed-padded"]],
];

pub(super) fn chain_form(name: &[u8], runs: &[Run], reversed: bool) -> &'static str {
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

pub(super) fn lower_hex(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// `needle` occurs inside one of the hex runs of `name`.
pub(super) fn in_hex_runs(name: &[u8], hex_runs: &[Run], needle: &[u8]) -> bool {
    hex_runs
        .iter()
        .filter(|r| r.len() >= needle.len())
        .any(|r| name[r.range()].windows(needle.len()).any(|w| w == needle))
}

pub(super) fn embedded_v4(name: &[u8], ip: Ipv4Addr) -> (Strength, &'static str) {
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

pub(super) fn embedded_v6(name: &[u8], ip: Ipv6Addr) -> (Strength, &'static str) {
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
pub(super) fn nibble_match(seq: &[u8], nib: &[u8; 32]) -> usize {
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
pub(super) enum Hit {
    Token(&'static str),
    Mail(&'static str),
}

pub(super) struct Evidence {
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

pub(super) fn scan_tokens(name: &[u8], host_end: usize, tld_start: usize, ev: &mut Evidence) {
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

pub(super) fn heuristics(ip: IpAddr, name: &[u8], reasons: &mut Vec<Reason>) -> Class {
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
