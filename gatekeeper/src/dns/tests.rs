//! Unit tests.
use super::*;
use hickory_resolver::proto::rr::rdata::{A, CNAME, PTR};
use std::net::Ipv4Addr;
use std::str::FromStr;

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

#[test]
fn servers_parse() {
    assert_eq!(parse_server("192.0.2.53").unwrap(), "192.0.2.53:53".parse().unwrap());
    assert_eq!(parse_server(" 192.0.2.53:5300 ").unwrap(), "192.0.2.53:5300".parse().unwrap());
    assert_eq!(parse_server("2001:db8::53").unwrap(), "[2001:db8::53]:53".parse().unwrap());
    assert_eq!(parse_server("[2001:db8::53]").unwrap(), "[2001:db8::53]:53".parse().unwrap());
    assert_eq!(parse_server("[2001:db8::53]:5300").unwrap(), "[2001:db8::53]:5300".parse().unwrap());
    for bad in
        ["", "dns.example", "192.0.2.53:0", "192.0.2.300", "0.0.0.0", "224.0.0.1", "192.0.2.53:99999", "fe80::1%eth0"]
    {
        let e = parse_server(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("{:?}", bad.trim())), "{bad:?}: {e}");
    }
    let cfg = DnsConfig { servers: vec!["192.0.2.53".into(), "nope".into()], ..DnsConfig::default() };
    let e = Resolver::new(&cfg).unwrap_err().to_string();
    assert!(e.contains("invalid DNS server \"nope\""), "{e}");
}

#[test]
fn config_from_toml() {
    #[derive(Deserialize)]
    struct Wrap {
        dns: DnsConfig,
    }
    let parse = |t: &str| toml::from_str::<Wrap>(t).map(|w| w.dns);
    assert_eq!(parse("[dns]\n").unwrap(), DnsConfig::default());
    let c = parse(
        "[dns]\nservers = [\"192.0.2.53\", \"[2001:db8::53]:5300\"]\ntimeout = \"3s\"\nattempts = 1\nmax_names = 5\n",
    )
    .unwrap();
    assert_eq!(c.servers.len(), 2);
    assert_eq!(c.timeout, Duration::from_secs(3));
    assert_eq!((c.attempts, c.max_names), (1, 5));
    for (bad, needle) in [
        ("servers = [\"ns.example\"]", "ns.example"),
        ("timeout = \"0s\"", "timeout"),
        ("timeout = \"2m\"", "out of range"),
        ("attempts = 0", "attempts 0"),
        ("max_names = 0", "max_names 0"),
        ("max_names = 100", "max_names 100"),
        ("retries = 2", "retries"),
    ] {
        let e = parse(&format!("[dns]\n{bad}\n")).unwrap_err().to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
}

#[test]
fn resolver_builds_without_a_runtime_and_rejects_bad_settings() {
    let cfg = DnsConfig { servers: vec!["127.0.0.1:5300".into()], ..DnsConfig::default() };
    let r = Resolver::new(&cfg).unwrap();
    assert_eq!(r.all.desc, "127.0.0.1:5300");
    assert!(r.singles.is_empty());
    let two = DnsConfig { servers: vec!["127.0.0.1:5300".into(), "[::1]".into()], ..DnsConfig::default() };
    let r = Resolver::new(&two).unwrap();
    assert_eq!(r.all.desc, "127.0.0.1:5300, [::1]:53");
    assert_eq!(r.singles.len(), 2);
    for bad in [
        DnsConfig { attempts: 0, ..cfg.clone() },
        DnsConfig { max_names: 0, ..cfg.clone() },
        DnsConfig { timeout: Duration::ZERO, ..cfg.clone() },
    ] {
        assert!(matches!(Resolver::new(&bad), Err(Error::Dns(_))), "{bad:?}");
    }
}

#[test]
fn reverse_names() {
    assert_eq!(reverse_name("192.0.2.7".parse().unwrap()).to_ascii(), "7.2.0.192.in-addr.arpa.");
    assert_eq!(
        reverse_name("2001:db8::1".parse().unwrap()).to_ascii(),
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
    );
    let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
    assert_eq!(reverse_name(mapped.to_canonical()).to_ascii(), "7.2.0.192.in-addr.arpa.");
}

#[test]
fn names_are_checked() {
    assert_eq!(usable_name("Mail.Example.").as_deref(), Some("mail.example"));
    assert_eq!(usable_name("."), None);
    assert_eq!(usable_name(""), None);
    let long = format!("{}.example", "a".repeat(250));
    assert!(long.len() > MAX_NAME_LEN);
    assert_eq!(usable_name(&long), None);
    let ok = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
    assert_eq!(ok.len(), MAX_NAME_LEN);
    assert_eq!(usable_name(&format!("{ok}.")), Some(ok));
}

#[test]
fn answers_are_filtered() {
    let q = name("7.2.0.192.in-addr.arpa.");
    let answers = vec![
        Record::from_rdata(q.clone(), 300, RData::CNAME(CNAME(name("7.0-25.2.0.192.in-addr.arpa.")))),
        Record::from_rdata(name("7.0-25.2.0.192.IN-ADDR.arpa."), 120, RData::PTR(PTR(name("B.Example.")))),
        Record::from_rdata(name("7.0-25.2.0.192.in-addr.arpa."), 200, RData::PTR(PTR(name("a.example.")))),
        Record::from_rdata(name("7.0-25.2.0.192.in-addr.arpa."), 200, RData::PTR(PTR(name("b.example.")))),
        // Not ours: another owner, another type.
        Record::from_rdata(name("8.2.0.192.in-addr.arpa."), 5, RData::PTR(PTR(name("evil.example.")))),
        Record::from_rdata(q.clone(), 1, RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))),
    ];
    let (records, ttl) = collect_answer(&answers, &q, RecordType::PTR);
    assert_eq!(records.len(), 3);
    assert_eq!(ttl, Some(120));
    let (names, rejected) = ptr_names(&records);
    assert_eq!(names.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["a.example", "b.example"]);
    assert_eq!(rejected, 0);
    assert_eq!(names[0].1, name("a.example."));
    // A root PTR is rejected.
    let root = vec![Record::from_rdata(q.clone(), 60, RData::PTR(PTR(Name::root())))];
    assert_eq!(ptr_names(&root), (vec![], 1));
    // Nothing of the asked type.
    assert_eq!(collect_answer(&answers[5..], &q, RecordType::PTR), (vec![], None));
}

#[test]
fn ttls() {
    assert_eq!(ttl_duration(60), Duration::from_secs(60));
    assert_eq!(ttl_duration(u32::MAX), Duration::ZERO);
    assert_eq!(ttl_duration(i32::MAX as u32), Duration::from_secs(i32::MAX as u64));
}

#[test]
fn outcome_names() {
    for (o, s) in [
        (DnsOutcome::NoPtr, "no-ptr"),
        (DnsOutcome::FcrdnsFail, "fcrdns-fail"),
        (DnsOutcome::Confirmed, "confirmed"),
        (DnsOutcome::TempFail, "tempfail"),
    ] {
        assert_eq!(o.to_string(), s);
        assert_eq!(serde_json::to_value(o).unwrap(), serde_json::json!(s));
    }
    let l = Lookup {
        ip: "192.0.2.7".parse().unwrap(),
        outcome: DnsOutcome::Confirmed,
        ptr_names: vec!["a.example".into()],
        confirmed: Some("a.example".into()),
        ttl: Some(Duration::from_secs(120)),
        detail: String::new(),
    };
    let v = serde_json::to_value(&l).unwrap();
    assert_eq!(v["ttl"], 120);
    assert_eq!(v["outcome"], "confirmed");
}
