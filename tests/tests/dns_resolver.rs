//! `gatekeeper::dns::Resolver` against a real authoritative server (Debian's
//! nsd) and a fake one for failure modes (root; nsd from `cargo xtask
//! setup`). Every test has its own server on its own 127.0.0.1 port, so the
//! tests run in parallel. Timeouts are short (300 ms × 1 attempt) where a
//! failure is expected.
//!
//! The rule under test: only an answer from DNS (NXDOMAIN, NOERROR) may
//! give `no-ptr` or `fcrdns-fail`; anything else is `tempfail`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use gatekeeper::dns::{DnsConfig, DnsOutcome, Lookup, Resolver};
use gatekeeper_tests::{
    dnslab::{
        self, reverse_name, FakeDns, FakeMode, FakeQuery, NsdServer, Reply, Rr, Transport, Zone, TYPE_A, TYPE_PTR,
    },
    netlab,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn setup() {
    netlab::require_root();
    dnslab::require_nsd();
}

/// For servers expected to answer.
fn cfg(addr: SocketAddr) -> DnsConfig {
    DnsConfig { servers: vec![addr.to_string()], ..DnsConfig::default() }
}

/// For servers expected to fail: 300 ms × 1 attempt.
fn fast(addr: SocketAddr) -> DnsConfig {
    DnsConfig {
        servers: vec![addr.to_string()],
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..DnsConfig::default()
    }
}

/// One lookup with a new resolver (printed: shown for failing tests).
async fn lookup(cfg: &DnsConfig, addr: &str) -> Lookup {
    let start = Instant::now();
    let l = Resolver::new(cfg).unwrap().lookup(ip(addr)).await;
    eprintln!("{addr} via {:?} in {:?}: {l:?}", cfg.servers, start.elapsed());
    l
}

fn secs(s: u64) -> Option<Duration> {
    Some(Duration::from_secs(s))
}

/// Reverse zone 192.0.2.0/24 and forward zone `example` shared by several
/// tests.
fn v4_zones() -> Vec<Zone> {
    vec![
        Zone::reverse_v4("192.0.2.0/24", &[])
            .ptr(ip("192.0.2.7"), "mail.example", 3600)
            .ptr(ip("192.0.2.20"), "ghost.example", 3600)
            .ptr(ip("192.0.2.21"), "other.example", 3600)
            // Two names, the 2nd (sorted) confirms.
            .ptr(ip("192.0.2.22"), "a-first.example", 3600)
            .ptr(ip("192.0.2.22"), "b-second.example", 3600)
            // NODATA: the name exists, without a PTR.
            .record("9.2.0.192.in-addr.arpa", 3600, "TXT", "\"no ptr here\"")
            // RFC 2317 style: CNAME into a classless sub-zone.
            .cname("10.2.0.192.in-addr.arpa", "10.0-25.2.0.192.in-addr.arpa", 200)
            .record("10.0-25.2.0.192.in-addr.arpa", 400, "PTR", "classless.example.")
            .negative_ttl(45),
        Zone::forward("example", &[])
            .addr("mail.example", ip("192.0.2.7"), 3600)
            .addr("other.example", ip("192.0.2.1"), 600)
            .addr("a-first.example", ip("192.0.2.99"), 3600)
            .addr("b-second.example", ip("192.0.2.22"), 3600)
            .addr("classless.example", ip("192.0.2.10"), 3600)
            .negative_ttl(45),
    ]
}

// ------------------------------------------------------------------ nsd

#[tokio::test]
async fn nsd_confirmed_v4_and_mapped() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let l = lookup(&cfg(nsd.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ptr_names, ["mail.example"]);
    assert_eq!(l.confirmed.as_deref(), Some("mail.example"));
    assert_eq!(l.ttl, secs(3600));
    assert_eq!(l.detail, "mail.example. A 192.0.2.7 = 192.0.2.7", "{l:?}");

    // An IPv4-mapped IPv6 source is looked up as IPv4.
    let l = lookup(&cfg(nsd.addr()), "::ffff:192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ip, ip("192.0.2.7"));
}

#[tokio::test]
async fn nsd_confirmed_v6_uses_aaaa() {
    setup();
    let zones = [
        Zone::reverse_v6(
            "2001:db8:1::/48",
            &[(ip("2001:db8:1::25"), "mx6.example"), (ip("2001:db8:1::26"), "v4only.example")],
        ),
        Zone::forward("example", &[("mx6.example", ip("2001:db8:1::25")), ("v4only.example", ip("192.0.2.26"))]),
    ];
    assert_eq!(zones[0].origin(), "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa");
    let nsd = NsdServer::start(&zones).unwrap();
    let l = lookup(&cfg(nsd.addr()), "2001:db8:1::25").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.confirmed.as_deref(), Some("mx6.example"));
    assert!(l.detail.starts_with("mx6.example. AAAA 2001:db8:1::25"), "{l:?}");

    // A name with only an A record does not confirm an IPv6 source.
    let l = lookup(&cfg(nsd.addr()), "2001:db8:1::26").await;
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.detail, "v4only.example. AAAA NODATA");

    // /64 zones work too.
    let zones = [
        Zone::reverse_v6("2001:db8:2::/64", &[(ip("2001:db8:2::9"), "host.example")]),
        Zone::forward("example", &[("host.example", ip("2001:db8:2::9"))]),
    ];
    let nsd = NsdServer::start(&zones).unwrap();
    assert_eq!(lookup(&cfg(nsd.addr()), "2001:db8:2::9").await.outcome, DnsOutcome::Confirmed);
    let l = lookup(&cfg(nsd.addr()), "2001:db8:2::10").await;
    assert_eq!((l.outcome, l.detail.as_str()), (DnsOutcome::NoPtr, "PTR NXDOMAIN"));
}

#[tokio::test]
async fn nsd_no_ptr_nxdomain_and_nodata_with_negative_ttl() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let l = lookup(&cfg(nsd.addr()), "192.0.2.8").await;
    assert_eq!(l.outcome, DnsOutcome::NoPtr, "{l:?}");
    assert_eq!(l.detail, "PTR NXDOMAIN");
    assert!(l.ptr_names.is_empty() && l.confirmed.is_none());
    assert_eq!(l.ttl, secs(45), "negative TTL from the SOA");

    let l = lookup(&cfg(nsd.addr()), "192.0.2.9").await;
    assert_eq!(l.outcome, DnsOutcome::NoPtr, "{l:?}");
    assert_eq!(l.detail, "PTR NODATA");
    assert_eq!(l.ttl, secs(45));

    // The negative TTL is the smaller of the SOA's TTL and its MINIMUM.
    let nsd = NsdServer::start(&[Zone::reverse_v4("198.51.100.0/24", &[]).soa_ttl(30).negative_ttl(45)]).unwrap();
    let l = lookup(&cfg(nsd.addr()), "198.51.100.1").await;
    assert_eq!((l.outcome, l.ttl), (DnsOutcome::NoPtr, secs(30)), "{l:?}");
}

#[tokio::test]
async fn nsd_fcrdns_fail() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    // The PTR name does not exist.
    let l = lookup(&cfg(nsd.addr()), "192.0.2.20").await;
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.ptr_names, ["ghost.example"]);
    assert_eq!(l.confirmed, None);
    assert_eq!(l.detail, "ghost.example. A NXDOMAIN");
    assert_eq!(l.ttl, secs(45), "min of the PTR TTL and the forward negative TTL");

    // The PTR name resolves to another address.
    let l = lookup(&cfg(nsd.addr()), "192.0.2.21").await;
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.detail, "other.example. A 192.0.2.1 != 192.0.2.21");
    assert_eq!(l.ttl, secs(600));
}

#[tokio::test]
async fn nsd_second_ptr_name_confirms() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let l = lookup(&cfg(nsd.addr()), "192.0.2.22").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ptr_names, ["a-first.example", "b-second.example"]);
    assert_eq!(l.confirmed.as_deref(), Some("b-second.example"));
}

#[tokio::test]
async fn nsd_cname_in_reverse_zone_is_followed() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let l = lookup(&cfg(nsd.addr()), "192.0.2.10").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ptr_names, ["classless.example"]);
    assert_eq!(l.ttl, secs(200), "the CNAME's TTL counts");
}

#[tokio::test]
async fn nsd_more_ptr_names_than_max_names() {
    setup();
    let src = ip("203.0.113.5");
    let names = ["n1.example", "n2.example", "n3.example", "n4.example", "n5.example"];
    let mut rev = Zone::reverse_v4("203.0.113.0/24", &[]);
    let mut fwd = Zone::forward("example", &[]);
    // Listed in reverse order: the resolver sorts. Only n5 confirms.
    for (i, n) in names.iter().enumerate().rev() {
        rev = rev.ptr(src, n, 3600);
        fwd = fwd.addr(n, if i == 4 { src } else { ip("203.0.113.99") }, 3600);
    }
    let nsd = NsdServer::start(&[rev, fwd]).unwrap();

    let two = DnsConfig { max_names: 2, ..cfg(nsd.addr()) };
    let l = lookup(&two, "203.0.113.5").await;
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.ptr_names, ["n1.example", "n2.example"]);
    assert!(l.detail.contains("3 more PTR name(s) not checked (max_names 2)"), "{l:?}");

    let five = DnsConfig { max_names: 5, ..cfg(nsd.addr()) };
    let l = lookup(&five, "203.0.113.5").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ptr_names, names);
    assert_eq!(l.confirmed.as_deref(), Some("n5.example"));
}

#[tokio::test]
async fn nsd_ttl_is_the_smallest_of_the_deciding_answers() {
    setup();
    let zones = [
        Zone::reverse_v4("198.51.100.0/24", &[]).ptr(ip("198.51.100.1"), "short-a.example", 300).ptr(
            ip("198.51.100.2"),
            "short-ptr.example",
            90,
        ),
        Zone::reverse_v6("2001:db8:3::/48", &[]).ptr(ip("2001:db8:3::1"), "six.example", 700),
        Zone::forward("example", &[])
            .addr("short-a.example", ip("198.51.100.1"), 120)
            .addr("short-ptr.example", ip("198.51.100.2"), 500)
            .addr("six.example", ip("2001:db8:3::1"), 800)
            .addr("six.example", ip("2001:db8:3::2"), 650),
    ];
    let nsd = NsdServer::start(&zones).unwrap();
    let l = lookup(&cfg(nsd.addr()), "198.51.100.1").await;
    assert_eq!((l.outcome, l.ttl), (DnsOutcome::Confirmed, secs(120)), "{l:?}");
    let l = lookup(&cfg(nsd.addr()), "198.51.100.2").await;
    assert_eq!((l.outcome, l.ttl), (DnsOutcome::Confirmed, secs(90)), "{l:?}");
    // One RRset has one TTL (nsd uses the first record's for the set).
    let l = lookup(&cfg(nsd.addr()), "2001:db8:3::1").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert!(l.ttl == secs(700) || l.ttl == secs(650), "{l:?}");
}

#[tokio::test]
async fn nsd_stopped_mid_test_is_tempfail() {
    setup();
    let mut nsd = NsdServer::start(&v4_zones()).unwrap();
    let resolver = Resolver::new(&fast(nsd.addr())).unwrap();
    assert_eq!(resolver.lookup(ip("192.0.2.7")).await.outcome, DnsOutcome::Confirmed);
    assert_eq!(resolver.lookup(ip("192.0.2.8")).await.outcome, DnsOutcome::NoPtr);

    nsd.stop().unwrap();
    for addr in ["192.0.2.7", "192.0.2.8"] {
        let l = resolver.lookup(ip(addr)).await;
        assert_eq!(l.outcome, DnsOutcome::TempFail, "no cache may answer for a stopped server: {l:?}");
        assert!(l.detail.starts_with("PTR "), "{l:?}");
        assert!(l.ttl.is_none() && l.ptr_names.is_empty());
    }

    nsd.restart().unwrap();
    assert_eq!(resolver.lookup(ip("192.0.2.7")).await.outcome, DnsOutcome::Confirmed);
}

#[tokio::test]
async fn one_dead_server_of_two_is_survived() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let silent = FakeDns::start(FakeMode::Silent).unwrap();
    let two = DnsConfig {
        servers: vec![silent.addr().to_string(), nsd.addr().to_string()],
        timeout: Duration::from_secs(1),
        ..DnsConfig::default()
    };
    let resolver = Resolver::new(&two).unwrap();
    for _ in 0..3 {
        let l = resolver.lookup(ip("192.0.2.7")).await;
        assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    }
}

#[tokio::test]
async fn one_failing_server_of_two_is_survived() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    for mode in [FakeMode::Refused, FakeMode::ServFail, FakeMode::TruncatedThenTcpFails] {
        let bad = FakeDns::start(mode.clone()).unwrap();
        for order in [[bad.addr(), nsd.addr()], [nsd.addr(), bad.addr()]] {
            let two = DnsConfig { servers: order.iter().map(|a| a.to_string()).collect(), ..cfg(nsd.addr()) };
            let resolver = Resolver::new(&two).unwrap();
            for (addr, want) in [("192.0.2.7", DnsOutcome::Confirmed), ("192.0.2.8", DnsOutcome::NoPtr)] {
                for _ in 0..3 {
                    let l = resolver.lookup(ip(addr)).await;
                    assert_eq!(l.outcome, want, "{mode:?} {order:?}: {l:?}");
                }
            }
        }
    }
    // When every server fails, it is tempfail.
    let (a, b) = (FakeDns::start(FakeMode::ServFail).unwrap(), FakeDns::start(FakeMode::Refused).unwrap());
    let two = DnsConfig { servers: vec![a.addr().to_string(), b.addr().to_string()], ..fast(a.addr()) };
    let l = lookup(&two, "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
}

// ------------------------------------------------------------ fake DNS

#[tokio::test]
async fn servfail_is_tempfail_never_no_ptr() {
    setup();
    let fake = FakeDns::start(FakeMode::ServFail).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert_eq!(l.detail, format!("PTR SERVFAIL from {}", fake.addr()));
    assert_eq!(l.ttl, None);

    // `attempts` counts tries: 2 attempts ask twice.
    let fake = FakeDns::start(FakeMode::ServFail).unwrap();
    let l = lookup(&DnsConfig { attempts: 2, ..fast(fake.addr()) }, "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert_eq!(fake.queries().len(), 2, "{:?}", fake.queries());
}

#[tokio::test]
async fn refused_is_tempfail() {
    setup();
    let fake = FakeDns::start(FakeMode::Refused).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert_eq!(l.detail, format!("PTR REFUSED from {}", fake.addr()));
}

#[tokio::test]
async fn silent_server_is_tempfail_after_the_timeout() {
    setup();
    let fake = FakeDns::start(FakeMode::Silent).unwrap();
    let start = Instant::now();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    let took = start.elapsed();
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert!(l.detail.contains("timed out") || l.detail.contains("no answer"), "{l:?}");
    assert!(took >= Duration::from_millis(250), "gave up after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?} for a 300 ms timeout");
    assert!(!fake.queries().is_empty());
}

#[tokio::test]
async fn nothing_listening_is_tempfail() {
    setup();
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let l = lookup(&fast(addr), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert!(l.detail.starts_with("PTR "), "{l:?}");
}

#[tokio::test]
async fn truncated_with_tcp_failing_is_tempfail() {
    setup();
    let fake = FakeDns::start(FakeMode::TruncatedThenTcpFails).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    let q = fake.queries();
    assert!(q.iter().any(|q| q.transport == Transport::Udp), "{q:?}");
    assert!(q.iter().any(|q| q.transport == Transport::Tcp), "the TCP retry was not tried: {q:?}");
}

#[tokio::test]
async fn truncated_then_tcp_answer_is_used() {
    setup();
    let fake = FakeDns::start(FakeMode::TruncatedThenTcpAnswers("host.example".into())).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    // The PTR came over TCP; the forward lookup got NXDOMAIN (also over TCP).
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.ptr_names, ["host.example"]);
    assert_eq!(l.detail, "host.example. A NXDOMAIN");
    let q = fake.queries();
    let ptr = reverse_name(ip("192.0.2.7")).trim_end_matches('.').to_string();
    assert_eq!(q[0], FakeQuery { name: ptr.clone(), qtype: TYPE_PTR, transport: Transport::Udp }, "{q:?}");
    assert_eq!(q[1], FakeQuery { name: ptr, qtype: TYPE_PTR, transport: Transport::Tcp }, "{q:?}");

    // A complete FCrDNS over TCP.
    let fake = FakeDns::start(FakeMode::script(|q| match (q.transport, q.qtype) {
        (Transport::Udp, _) => Reply::Truncated,
        (Transport::Tcp, TYPE_PTR) => Reply::Answer(vec![Rr::ptr(&q.name, 300, "tcp.example")]),
        (Transport::Tcp, TYPE_A) => Reply::Answer(vec![Rr::addr(&q.name, 200, ip("192.0.2.7"))]),
        _ => Reply::NxDomain(Some(60)),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ttl, secs(200));
}

#[tokio::test]
async fn nodata_ptr_is_no_ptr_with_soa_ttl() {
    setup();
    let fake = FakeDns::start(FakeMode::NoDataPtr).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::NoPtr, "{l:?}");
    assert_eq!(l.detail, "PTR NODATA");
    assert_eq!(l.ttl, secs(60));

    // Without an SOA the TTL is unknown.
    let fake = FakeDns::start(FakeMode::script(|_| Reply::NxDomain(None))).unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!((l.outcome, l.ttl), (DnsOutcome::NoPtr, None), "{l:?}");
}

#[tokio::test]
async fn forward_servfail_after_good_ptr_is_tempfail() {
    setup();
    let fake = FakeDns::start(FakeMode::script(|q| match q.qtype {
        TYPE_PTR => Reply::Answer(vec![Rr::ptr(&q.name, 300, "mail.example")]),
        _ => Reply::Rcode(2),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert_eq!(l.ptr_names, ["mail.example"]);
    assert_eq!(l.detail, format!("mail.example. A SERVFAIL from {}", fake.addr()));
    assert_eq!(l.ttl, None);
}

#[tokio::test]
async fn forward_failures_mixed_with_answers() {
    setup();
    // a: NXDOMAIN, b: SERVFAIL -> tempfail, not fcrdns-fail.
    let fake = FakeDns::start(FakeMode::script(|q| match (q.qtype, q.name.as_str()) {
        (TYPE_PTR, _) => Reply::Answer(vec![Rr::ptr(&q.name, 300, "a.example"), Rr::ptr(&q.name, 300, "b.example")]),
        (_, "a.example") => Reply::NxDomain(Some(60)),
        _ => Reply::Rcode(2),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::TempFail, "{l:?}");
    assert!(l.detail.starts_with("b.example. A SERVFAIL"), "{l:?}");
    assert!(l.detail.contains("a.example. A NXDOMAIN"), "{l:?}");

    // a: timeout, b: confirms -> confirmed.
    let fake = FakeDns::start(FakeMode::script(|q| match (q.qtype, q.name.as_str()) {
        (TYPE_PTR, _) => Reply::Answer(vec![Rr::ptr(&q.name, 300, "a.example"), Rr::ptr(&q.name, 300, "b.example")]),
        (_, "a.example") => Reply::Silent,
        _ => Reply::Answer(vec![Rr::addr(&q.name, 100, ip("192.0.2.7"))]),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.confirmed.as_deref(), Some("b.example"));
    assert_eq!(l.ttl, secs(100));
}

#[tokio::test]
async fn hostile_answers_are_filtered() {
    setup();
    let fake = FakeDns::start(FakeMode::script(|q| match q.qtype {
        TYPE_PTR => Reply::Answer(vec![
            Rr::ptr(&q.name, 300, "MAIL.Example"),
            // Not PTR records, or not for the queried name: ignored.
            Rr::addr(&q.name, 300, ip("192.0.2.7")),
            Rr::ptr("8.2.0.192.in-addr.arpa", 300, "evil.example"),
            Rr::cname("unrelated.example", 300, "evil.example"),
            // A duplicate in another case.
            Rr::ptr(&q.name, 300, "mail.EXAMPLE"),
            Rr::ptr(&q.name, 300, "b.example"),
        ]),
        _ if q.name == "mail.example" => Reply::Answer(vec![Rr::addr(&q.name, 300, ip("192.0.2.7"))]),
        _ => Reply::NxDomain(Some(60)),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::Confirmed, "{l:?}");
    assert_eq!(l.ptr_names, ["b.example", "mail.example"]);
    assert_eq!(l.confirmed.as_deref(), Some("mail.example"));
    let forward: Vec<String> = fake.queries().into_iter().filter(|q| q.qtype != TYPE_PTR).map(|q| q.name).collect();
    assert!(!forward.iter().any(|n| n.contains("evil")), "{forward:?}");
}

#[tokio::test]
async fn only_max_names_forward_lookups_are_sent() {
    setup();
    let fake = FakeDns::start(FakeMode::script(|q| match q.qtype {
        TYPE_PTR => Reply::Answer((0..40).map(|i| Rr::ptr(&q.name, 300, &format!("h{i:02}.example"))).collect()),
        _ => Reply::NxDomain(Some(60)),
    }))
    .unwrap();
    let l = lookup(&fast(fake.addr()), "192.0.2.7").await;
    assert_eq!(l.outcome, DnsOutcome::FcrdnsFail, "{l:?}");
    assert_eq!(l.ptr_names, ["h00.example", "h01.example", "h02.example"]);
    assert!(l.detail.contains("37 more PTR name(s) not checked"), "{l:?}");
    let q = fake.queries();
    // 40 PTR records do not fit 512 bytes: the PTR answer came over TCP.
    assert!(q.iter().any(|q| q.qtype == TYPE_PTR && q.transport == Transport::Tcp), "{q:?}");
    let forward: Vec<&FakeQuery> = q.iter().filter(|q| q.qtype != TYPE_PTR).collect();
    assert_eq!(forward.len(), 3, "{forward:?}");
}

#[tokio::test]
async fn many_lookups_in_parallel() {
    setup();
    let nsd = NsdServer::start(&v4_zones()).unwrap();
    let resolver = std::sync::Arc::new(Resolver::new(&cfg(nsd.addr())).unwrap());
    let cases = [
        ("192.0.2.7", DnsOutcome::Confirmed),
        ("192.0.2.8", DnsOutcome::NoPtr),
        ("192.0.2.20", DnsOutcome::FcrdnsFail),
        ("192.0.2.22", DnsOutcome::Confirmed),
    ];
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (addr, want) in cases {
            let r = resolver.clone();
            tasks.push(tokio::spawn(async move { (round, addr, want, r.lookup(ip(addr)).await) }));
        }
    }
    for t in tasks {
        let (round, addr, want, l) = t.await.unwrap();
        assert_eq!(l.outcome, want, "round {round} {addr}: {l:?}");
    }
}
