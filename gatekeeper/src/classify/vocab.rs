//! The classifier's vocabulary: end-user, static, mail and hint tokens,
//! and the top-level and second-level labels that say nothing.
#[allow(unused_imports)]
use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
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
pub(super) const VOCAB: &[(Kind, &[&str])] = &[
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
pub(super) struct Vocab {
    pub(super) table: Vec<(u128, Kind, &'static str)>,
    prefix2: [u32; 26],
}

pub(super) fn vocab() -> &'static Vocab {
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
pub(super) fn pack(w: &[u8]) -> u128 {
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
    pub(super) fn may_start(&self, w: &[u8]) -> bool {
        w.len() >= 2 && self.prefix2[usize::from(w[0] - b'a')] & (1 << (w[1] - b'a')) != 0
    }

    #[inline]
    pub(super) fn lookup(&self, w: &[u8]) -> Option<(Kind, &'static str)> {
        if w.len() > 16 || !self.may_start(w) {
            return None;
        }
        let key = pack(w);
        self.table.binary_search_by_key(&key, |e| e.0).ok().map(|i| (self.table[i].1, self.table[i].2))
    }
}

/// Private or placeholder top-level labels that no real mail server uses.
pub(super) fn bogus_tld(tld: &[u8]) -> bool {
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
pub(super) fn generic_second_level(l: &[u8]) -> bool {
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
