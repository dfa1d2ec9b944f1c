use super::*;
use crate::logs::Service;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const T0: i64 = 1_796_691_240_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg(weight: u32) -> AbuseConfig {
    AbuseConfig { auth_failure_weight: weight, ..AbuseConfig::default() }
}

/// A threshold never reached, to watch the counts.
fn no_ban() -> AbuseConfig {
    AbuseConfig { threshold: 1_000_000, ..AbuseConfig::default() }
}

fn fail(client: &str, session: Option<&str>, count: Count) -> Event {
    Event::AuthFail {
        client: ip(client),
        service: Service::Imap,
        session: session.map(str::to_string),
        count,
        user: Some("alice".into()),
    }
}

fn connect(client: &str) -> Event {
    Event::Connect { client: ip(client), service: Service::Smtp }
}

/// Postfix-style failures (one attempt each, no session) until an offence;
/// returns how many it took and the offence.
fn failures_until_offence(s: &mut AbuseScores, client: &str, at: i64) -> (u32, Offence) {
    for n in 1..=1000 {
        if let Some(o) = s.apply(&fail(client, None, Count::Add(1)), at) {
            return (n, o);
        }
    }
    panic!("no offence after 1000 failures");
}

#[test]
fn failure_weight_decides_how_many_failures_ban() {
    for (weight, expected) in [(10, 10), (15, 7), (20, 5)] {
        let mut s = AbuseScores::new(cfg(weight));
        let (n, o) = failures_until_offence(&mut s, "192.0.2.66", T0);
        assert_eq!(n, expected, "weight {weight}");
        assert_eq!(o.failures, u64::from(expected));
        assert_eq!(o.reason, OffenceReason::AuthAbuse);
        assert_eq!(o.offence_no, 1);
        assert_eq!(o.ban_for, Duration::from_secs(15 * 60));
        assert_eq!(o.until_ms, T0 + 15 * MIN);
        assert_eq!(o.key, AbuseKey::of(ip("192.0.2.66")));
    }
}

#[test]
fn connections_alone_are_conn_rate() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let mut offence = None;
    for i in 1..=100 {
        offence = s.apply(&connect("198.51.100.7"), T0);
        assert_eq!(offence.is_some(), i == 100, "connection {i}");
    }
    let o = offence.unwrap();
    assert_eq!(o.reason, OffenceReason::ConnRate);
    assert_eq!((o.connections, o.failures), (100, 0));
}

#[test]
fn one_failure_among_connections_makes_it_auth_abuse() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&fail("198.51.100.7", None, Count::Add(1)), T0);
    let o = (0..100).find_map(|_| s.apply(&connect("198.51.100.7"), T0)).unwrap();
    assert_eq!(o.reason, OffenceReason::AuthAbuse);
    assert_eq!((o.failures, o.connections), (1, 85));
}

#[test]
fn the_bucket_leaks() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let key = AbuseKey::of(ip("192.0.2.66"));
    for _ in 0..6 {
        assert!(s.apply(&fail("192.0.2.66", None, Count::Add(1)), T0).is_none());
    }
    assert_eq!(s.get(&key, T0).unwrap().score, 90.0);
    // 1 point per 10 s: 100 s later 10 points are gone.
    assert_eq!(s.get(&key, T0 + 100_000).unwrap().score, 80.0);
    // The 7th failure after that leak does not reach 100 (80 + 15 = 95).
    assert!(s.apply(&fail("192.0.2.66", None, Count::Add(1)), T0 + 100_000).is_none());
    assert_eq!(s.get(&key, T0 + 100_000).unwrap().score, 95.0);
    // A slow guesser (one failure per 150 s) is never banned.
    let mut slow = AbuseScores::new(AbuseConfig::default());
    for i in 0..200 {
        assert!(slow.apply(&fail("192.0.2.67", None, Count::Add(1)), T0 + i * 150_000).is_none(), "failure {i}");
    }
    // Empty bucket: the counts start again.
    let row = s.get(&key, T0 + DAY).unwrap();
    assert_eq!((row.score, row.failures, row.connections), (0.0, 0, 0));
}

#[test]
fn time_going_backwards_neither_leaks_nor_panics() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&fail("192.0.2.66", None, Count::Add(1)), T0);
    s.apply(&fail("192.0.2.66", None, Count::Add(1)), T0 - HOUR);
    let row = s.get(&AbuseKey::of(ip("192.0.2.66")), T0).unwrap();
    assert_eq!((row.score, row.at_ms), (30.0, T0));
}

#[test]
fn bans_escalate_and_stay_at_the_last_step() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let mut at = T0;
    let mut bans = Vec::new();
    for _ in 0..6 {
        let (_, o) = failures_until_offence(&mut s, "192.0.2.66", at);
        bans.push((o.offence_no, o.ban_for.as_secs()));
        at = o.until_ms + 1; // right after the ban ends
    }
    assert_eq!(bans, vec![(1, 900), (2, 3600), (3, 21_600), (4, 86_400), (5, 86_400), (6, 86_400)]);
}

#[test]
fn banned_sources_are_a_blackhole() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let (_, o) = failures_until_offence(&mut s, "192.0.2.66", T0);
    // Lines still arriving during the ban neither score nor re-ban.
    for i in 0..100 {
        assert!(s.apply(&fail("192.0.2.66", None, Count::Add(1)), T0 + i * 1000).is_none());
    }
    let row = s.get(&o.key, T0 + 100_000).unwrap();
    assert_eq!((row.score, row.failures, row.offences), (o.score, o.failures, 1), "what earned the ban stays shown");
    assert!(row.banned(T0 + 100_000));
    let after = s.get(&o.key, o.until_ms).unwrap();
    assert_eq!((after.score, after.failures, after.connections), (0.0, 0, 0), "the ban over, it starts afresh");
    // After the ban: scored again, and the next offence escalates.
    let (n, o2) = failures_until_offence(&mut s, "192.0.2.66", o.until_ms);
    assert_eq!((n, o2.offence_no, o2.ban_for.as_secs()), (7, 2, 3600));
}

#[test]
fn offences_are_forgotten_after_clean_days() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let (_, o1) = failures_until_offence(&mut s, "192.0.2.66", T0);
    // 7 days after the ban ended minus a minute: still remembered.
    let (_, o2) = failures_until_offence(&mut s, "192.0.2.66", o1.until_ms + 7 * DAY - MIN);
    assert_eq!(o2.offence_no, 2);
    // 7 clean days after the second ban: a first offence again.
    let (_, o3) = failures_until_offence(&mut s, "192.0.2.66", o2.until_ms + 7 * DAY);
    assert_eq!((o3.offence_no, o3.ban_for.as_secs()), (1, 900));
}

#[test]
fn dovecot_auth_and_login_lines_of_one_session_count_once() {
    let mut s = AbuseScores::new(no_ban());
    let key = AbuseKey::of(ip("192.0.2.66"));
    // Three auth-process lines (one per attempt), then the login process's
    // summary "auth failed, 3 attempts".
    for _ in 0..3 {
        s.apply(&fail("192.0.2.66", Some("Zm0K1RRinYvAAAJC"), Count::Add(1)), T0);
    }
    s.apply(&fail("192.0.2.66", Some("Zm0K1RRinYvAAAJC"), Count::AtLeast(3)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 3);
    // Without auth_verbose only the summary comes: it counts in full.
    s.apply(&fail("192.0.2.66", Some("nJkvOtherSess"), Count::AtLeast(2)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 5);
    // A summary above what the auth lines showed adds the difference.
    s.apply(&fail("192.0.2.66", Some("third"), Count::Add(1)), T0);
    s.apply(&fail("192.0.2.66", Some("third"), Count::AtLeast(4)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 9);
    // The same session id from another client is another session.
    s.apply(&fail("192.0.2.67", Some("third"), Count::AtLeast(4)), T0);
    assert_eq!(s.get(&AbuseKey::of(ip("192.0.2.67")), T0).unwrap().failures, 4);
}

#[test]
fn sshd_invalid_user_and_failed_password_of_one_connection_count_once() {
    let mut s = AbuseScores::new(no_ban());
    let key = AbuseKey::of(ip("203.0.113.9"));
    // One attempt: "Invalid user" (AtLeast 1) and "Failed password ... invalid user" (Add 1).
    s.apply(&fail("203.0.113.9", Some("55893"), Count::AtLeast(1)), T0);
    s.apply(&fail("203.0.113.9", Some("55893"), Count::Add(1)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 1);
    // Two more passwords on the same connection.
    s.apply(&fail("203.0.113.9", Some("55893"), Count::Add(1)), T0);
    s.apply(&fail("203.0.113.9", Some("55893"), Count::Add(1)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 3);
    // Key-only server: "Invalid user" alone counts one per connection.
    s.apply(&fail("203.0.113.9", Some("55894"), Count::AtLeast(1)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 4);
    // Postfix SASL: no session, every line counts.
    s.apply(&fail("203.0.113.9", None, Count::Add(1)), T0);
    s.apply(&fail("203.0.113.9", None, Count::Add(1)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 6);
}

#[test]
fn a_session_forgotten_after_its_ttl_counts_anew() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let key = AbuseKey::of(ip("203.0.113.9"));
    s.apply(&fail("203.0.113.9", Some("40000"), Count::AtLeast(1)), T0);
    s.apply(&fail("203.0.113.9", Some("40000"), Count::AtLeast(1)), T0 + 2 * HOUR);
    assert_eq!(s.get(&key, T0 + 2 * HOUR).unwrap().failures, 1, "the first failure leaked away");
    assert_eq!(s.take_dirty().sessions.len(), 1);
}

#[test]
fn ipv6_sources_aggregate_per_64() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let mut offence = None;
    for i in 1..=7u32 {
        offence = s.apply(&fail(&format!("2001:db8:1:2::{i:x}"), None, Count::Add(1)), T0);
    }
    let o = offence.expect("7 failures from one /64 ban it");
    assert_eq!(o.key.to_string(), "2001:db8:1:2::/64");
    assert_eq!(o.key.net().to_string(), "2001:db8:1:2::/64");
    assert_eq!(o.key.source_key(), SourceKey::from_ip(ip("2001:db8:1:2::1")));
    // Another /64 is another source; mapped IPv4 is the IPv4 source.
    assert!(s.get(&AbuseKey::of(ip("2001:db8:1:3::1")), T0).is_none());
    assert_eq!(AbuseKey::of(ip("::ffff:192.0.2.66")), AbuseKey::of(ip("192.0.2.66")));
}

#[test]
fn abuse_key_text_round_trips() {
    for (input, shown) in [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1/32", "192.0.2.1"),
        ("2001:db8:1:2::99", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
    ] {
        let k: AbuseKey = input.parse().unwrap();
        assert_eq!(k.to_string(), shown, "{input}");
        assert_eq!(k.to_string().parse::<AbuseKey>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<AbuseKey>(&json).unwrap(), k);
    }
    for bad in ["", "x", "192.0.2.0/24", "2001:db8::1/64", "2001:db8::/48"] {
        assert!(bad.parse::<AbuseKey>().is_err(), "{bad:?}");
    }
}

#[test]
fn list_get_and_forget() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&fail("192.0.2.66", Some("a"), Count::Add(2)), T0);
    s.apply(&connect("192.0.2.67"), T0);
    let list = s.list(T0);
    assert_eq!(list.iter().map(|r| r.key.to_string()).collect::<Vec<_>>(), ["192.0.2.66", "192.0.2.67"]);
    let key = AbuseKey::of(ip("192.0.2.66"));
    assert!(s.forget(&key));
    assert!(!s.forget(&key));
    assert!(s.get(&key, T0).is_none());
    // The session went with it: its summary counts in full again.
    s.apply(&fail("192.0.2.66", Some("a"), Count::AtLeast(2)), T0);
    assert_eq!(s.get(&key, T0).unwrap().failures, 2);
}

#[test]
fn tables_are_bounded_least_recently_used_out() {
    let mut s = AbuseScores::new(AbuseConfig { max_sources: 3, max_sessions: 2, ..AbuseConfig::default() });
    for i in 1..=3 {
        s.apply(&connect(&format!("192.0.2.{i}")), T0 + i);
    }
    s.apply(&connect("192.0.2.1"), T0 + 10); // used again: .2 is now the oldest
    s.apply(&connect("192.0.2.4"), T0 + 11);
    assert_eq!(s.len(), 3);
    assert!(s.get(&AbuseKey::of(ip("192.0.2.2")), T0 + 11).is_none());
    assert!(s.get(&AbuseKey::of(ip("192.0.2.1")), T0 + 11).is_some());
    let dirty = s.take_dirty();
    assert!(dirty.sources.contains(&Change::Delete(AbuseKey::of(ip("192.0.2.2")))));
    for i in 0..10 {
        s.apply(&fail("192.0.2.9", Some(&format!("s{i}")), Count::Add(1)), T0 + 20);
    }
    assert!(s.sessions.len() <= 2);
    // Hostile session ids are cut.
    s.apply(&fail("192.0.2.9", Some(&"x".repeat(10_000)), Count::Add(1)), T0 + 20);
    assert!(s.sessions.iter().all(|((_, id), _)| id.len() <= MAX_SESSION_LEN));
}

#[test]
fn many_sources_keep_the_use_order_compact() {
    let mut m: BoundedMap<u32, u32> = BoundedMap::new(10);
    for i in 0..10_000 {
        m.insert(i % 20, i);
        m.get_mut(&(i % 7));
    }
    assert!(m.len() <= 10);
    assert!(m.order.len() <= 2 * m.len() + 65);
}

#[test]
fn dirty_rows_restore_to_the_same_state() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&fail("192.0.2.66", Some("sess"), Count::Add(2)), T0);
    let (_, o) = failures_until_offence(&mut s, "192.0.2.67", T0);
    let dirty = s.take_dirty();
    assert!(s.take_dirty().is_empty(), "taken once");
    let rows: Vec<AbuseRow> =
        dirty.sources.into_iter().filter_map(|c| if let Change::Upsert(r) = c { Some(r) } else { None }).collect();
    let sessions: Vec<SessionRow> =
        dirty.sessions.into_iter().filter_map(|c| if let Change::Upsert(r) = c { Some(r) } else { None }).collect();
    assert_eq!((rows.len(), sessions.len()), (2, 1));
    let json = serde_json::to_string(&rows).unwrap();
    let rows: Vec<AbuseRow> = serde_json::from_str(&json).unwrap();

    let mut r = AbuseScores::new(AbuseConfig::default());
    r.restore(rows, sessions);
    assert!(r.take_dirty().is_empty(), "restore marks nothing dirty");
    assert_eq!(r.list(T0), s.list(T0));
    // The session continues: its summary adds nothing new.
    r.apply(&fail("192.0.2.66", Some("sess"), Count::AtLeast(2)), T0);
    assert_eq!(r.get(&AbuseKey::of(ip("192.0.2.66")), T0).unwrap().failures, 2);
    // The ban continues: a blackhole until it ends, then the 2nd offence.
    assert!(r.apply(&fail("192.0.2.67", None, Count::Add(50)), T0 + 1000).is_none());
    let (_, o2) = failures_until_offence(&mut r, "192.0.2.67", o.until_ms);
    assert_eq!(o2.offence_no, 2);
}

#[test]
fn prune_drops_only_what_carries_nothing() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&connect("192.0.2.1"), T0);
    failures_until_offence(&mut s, "192.0.2.2", T0);
    s.apply(&fail("192.0.2.3", Some("x"), Count::Add(1)), T0);
    s.take_dirty();
    assert_eq!(s.prune(T0 + 5_000), 0, "everything still live");
    // After two hours: .1 leaked to zero, .3's score too, its session is past
    // its TTL; .2 keeps its offence.
    assert_eq!(s.prune(T0 + 2 * HOUR), 3);
    assert_eq!(s.list(T0 + 2 * HOUR).len(), 1);
    let d = s.take_dirty();
    assert_eq!((d.sources.len(), d.sessions.len()), (2, 1));
    // Once the offence is forgotten, .2 goes too.
    assert_eq!(s.prune(T0 + 8 * DAY), 1);
    assert!(s.is_empty());
}

#[test]
fn other_events_do_not_score() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    s.apply(&Event::Removed { qid: "8CC3F99808D".into() }, T0);
    s.apply(&Event::Submitted { qid: "8CC3F99808D".into(), client: ip("192.0.2.66"), account: None }, T0);
    assert!(s.is_empty());
    assert!(s.apply(&fail("192.0.2.66", Some("s"), Count::AtLeast(0)), T0).is_none());
}

// ---------------------------------------------------------------------------
// Mail stream.

fn noqueue(client: &str, sender: &str, rcpt: &str) -> Event {
    Event::RcptReject {
        qid: None,
        client: ip(client),
        account: None,
        sender: sender.into(),
        rcpt: rcpt.into(),
        code: 550,
        dsn: Some("5.1.1".into()),
    }
}

fn submitted(qid: &str, client: &str, account: Option<&str>) -> Event {
    Event::Submitted { qid: qid.into(), client: ip(client), account: account.map(str::to_string) }
}

fn bounce(qid: &str, rcpt: &str, dsn: &str) -> Event {
    Event::Delivery { qid: qid.into(), rcpt: rcpt.into(), dsn: Some(dsn.into()), status: DeliveryStatus::Bounced }
}

fn stream() -> MailStream {
    MailStream::new(MailStreamConfig::default())
}

#[test]
fn which_refusals_count() {
    for (code, dsn, counts) in [
        (550, Some("5.1.1"), true),
        (550, Some("5.1.2"), true),
        (553, Some("5.1.3"), true),
        (550, Some("5.1.10"), true),
        (553, Some("5.1.0"), false), // Postfix's sender reject
        (553, Some("5.1.7"), false),
        (554, Some("5.7.1"), false),
        (450, Some("4.1.1"), false),
        (550, Some("5.1"), false),
        (550, Some("5.1.1.1"), false),
        (550, Some("5.1.x"), false),
        (550, None, true),
        (551, None, true),
        (553, None, true),
        (554, None, false),
        (450, None, false),
    ] {
        assert_eq!(undeliverable(Some(code), dsn), counts, "{code} {dsn:?}");
    }
}

#[test]
fn eleven_unknown_recipients_in_an_hour_suspend_the_address() {
    let mut m = stream();
    for i in 1..=10 {
        assert!(m.apply(&noqueue("192.0.2.67", "alice@example.test", &format!("u{i}@remote.test")), T0 + i).is_none());
    }
    // Repeats of a counted recipient are not distinct.
    assert!(m.apply(&noqueue("192.0.2.67", "alice@example.test", "U1@Remote.Test"), T0 + 11).is_none());
    let s = m.apply(&noqueue("192.0.2.67", "alice@example.test", "u11@other.test"), T0 + 12).unwrap();
    assert_eq!(s.subject, Subject::Addr(ip("192.0.2.67")));
    assert_eq!(s.count, 11);
    assert_eq!(s.recipients.len(), 11);
    assert!(s.recipients.iter().all(|r| r == "*@remote.test" || r == "*@other.test"), "{:?}", s.recipients);
    assert_eq!(m.count_of(&s.subject, T0 + 12), 0, "counted afresh after a suspension");
}

#[test]
fn the_window_slides() {
    let mut m = stream();
    let subject = Subject::addr(ip("192.0.2.67"));
    for i in 0..10 {
        m.apply(&noqueue("192.0.2.67", "a@example.test", &format!("u{i}@remote.test")), T0 + i * 5 * MIN);
    }
    assert_eq!(m.count_of(&subject, T0 + 45 * MIN), 10);
    // At T0+61min the first (T0) is out of the hour, the second (T0+5min) not.
    assert!(m.apply(&noqueue("192.0.2.67", "a@example.test", "late@remote.test"), T0 + 61 * MIN).is_none());
    assert_eq!(m.count_of(&subject, T0 + 61 * MIN), 10);
    assert!(m.apply(&noqueue("192.0.2.67", "a@example.test", "later@remote.test"), T0 + 62 * MIN).is_some());
}

#[test]
fn queue_id_join_counts_rejects_and_bounces_for_the_account() {
    let mut m = stream();
    m.apply(&submitted("8CC3F99808D", "192.0.2.66", Some("alice")), T0);
    for i in 0..5 {
        let rej = Event::RcptReject {
            qid: Some("8CC3F99808D".into()),
            client: ip("192.0.2.66"),
            account: None,
            sender: "alice@example.test".into(),
            rcpt: format!("r{i}@remote.test"),
            code: 550,
            dsn: Some("5.1.1".into()),
        };
        assert!(m.apply(&rej, T0 + 1).is_none());
    }
    for i in 0..5 {
        assert!(m.apply(&bounce("8CC3F99808D", &format!("b{i}@remote.test"), "5.1.1"), T0 + 2).is_none());
    }
    // Sent, deferred, and bounces for other reasons do not count.
    m.apply(&bounce("8CC3F99808D", "full@remote.test", "5.2.2"), T0 + 3);
    let sent = Event::Delivery {
        qid: "8CC3F99808D".into(),
        rcpt: "ok@remote.test".into(),
        dsn: Some("2.0.0".into()),
        status: DeliveryStatus::Sent,
    };
    m.apply(&sent, T0 + 3);
    let alice = Subject::account("alice");
    assert_eq!(m.count_of(&alice, T0 + 3), 10);
    assert_eq!(m.count_of(&Subject::addr(ip("192.0.2.66")), T0 + 3), 0, "an account's mail is not the address's");
    let s = m.apply(&bounce("8CC3F99808D", "b5@remote.test", "5.1.1"), T0 + 4).unwrap();
    assert_eq!((s.subject, s.count), (alice, 11));
}

#[test]
fn removed_ends_a_queue_id() {
    let mut m = stream();
    m.apply(&submitted("9865D9980F1", "192.0.2.66", Some("alice")), T0);
    m.apply(&Event::Removed { qid: "9865D9980F1".into() }, T0 + 1);
    // A later bounce of that id (or a reused id) is not attributed.
    m.apply(&bounce("9865D9980F1", "x@remote.test", "5.1.1"), T0 + 2);
    assert_eq!(m.count_of(&Subject::account("alice"), T0 + 2), 0);
    // Bounces of unknown ids (bounce notices, local mail) are never counted.
    m.apply(&bounce("UNKNOWN1", "y@remote.test", "5.1.1"), T0 + 2);
    assert!(m.take_dirty().undeliverable.is_empty());
}

#[test]
fn noqueue_reject_joins_the_policy_request_within_a_minute() {
    let mut m = stream();
    let client = ip("192.0.2.67");
    m.note_rcpt_request(client, "alice@example.test", "nobody@example.test", Some("alice"), T0);
    m.apply(&noqueue("192.0.2.67", "Alice@Example.test", "<NOBODY@example.test>"), T0 + 1000);
    assert_eq!(m.count_of(&Subject::account("alice"), T0 + 1000), 1);
    // Too late: counted for the address.
    m.note_rcpt_request(client, "alice@example.test", "late@example.test", Some("alice"), T0);
    m.apply(&noqueue("192.0.2.67", "alice@example.test", "late@example.test"), T0 + 61_000);
    assert_eq!(m.count_of(&Subject::addr(client), T0 + 61_000), 1);
    // Another client with the same envelope does not match.
    m.note_rcpt_request(ip("192.0.2.68"), "alice@example.test", "x@example.test", Some("alice"), T0);
    m.apply(&noqueue("192.0.2.67", "alice@example.test", "x@example.test"), T0 + 1000);
    assert_eq!(m.count_of(&Subject::addr(client), T0 + 1000), 2);
    // Requests without an account are not kept.
    m.note_rcpt_request(client, "s@example.test", "y@example.test", None, T0);
    m.note_rcpt_request(client, "s@example.test", "y@example.test", Some(""), T0);
    assert_eq!(m.requests.len(), 3);
}

#[test]
fn exim_reject_names_its_account() {
    let mut m = stream();
    let e = Event::RcptReject {
        qid: None,
        client: ip("192.0.2.66"),
        account: Some("alice".into()),
        sender: "alice@example.test".into(),
        rcpt: "nobody@example.test".into(),
        code: 550,
        dsn: None,
    };
    m.apply(&e, T0);
    assert_eq!(m.count_of(&Subject::account("alice"), T0), 1);
}

#[test]
fn hostile_recipients_are_bounded_and_redacted() {
    let mut m = stream();
    let long = format!("{}@remote.test", "a".repeat(20_000));
    for (i, r) in [
        long.as_str(),
        "evil\n@remote.test",
        "x@remote.test>, sasl_username=bob",
        "no-at-sign",
        "<>",
        "",
        "q@\u{1b}[31mred.test",
        "a@b.test",
        "b@b.test",
        "c@b.test",
        "d@b.test",
    ]
    .into_iter()
    .enumerate()
    {
        m.apply(&noqueue("192.0.2.67", "s@example.test", r), T0 + i as i64);
    }
    let subject = Subject::addr(ip("192.0.2.67"));
    assert_eq!(m.count_of(&subject, T0 + 20), 9, "empty recipients are not counted");
    let s = m.apply(&noqueue("192.0.2.67", "s@example.test", "e@b.test"), T0 + 21);
    assert!(s.is_none(), "10 distinct do not suspend");
    let s = m.apply(&noqueue("192.0.2.67", "s@example.test", "f@b.test"), T0 + 22).unwrap();
    for r in &s.recipients {
        assert!(r.len() <= 260 && r.starts_with('*'), "{r:?}");
        assert!(r.chars().all(|c| c.is_ascii_graphic()), "{r:?}");
    }
    assert!(s.recipients.contains(&"*".to_string()), "no domain: *");
    assert!(s.recipients.iter().any(|r| r.contains("sasl_username=bob")), "shown, but only as text");
    let dirty = m.take_dirty();
    assert!(dirty.undeliverable.iter().all(|(_, rows)| rows.iter().all(|r| r.rcpt.len() <= MAX_RCPT_LEN)));
}

#[test]
fn redaction() {
    assert_eq!(redact("Bob@Remote.Test", Redact::Domain), "*@Remote.Test");
    assert_eq!(redact("bob@remote.test", Redact::None), "bob@remote.test");
    assert_eq!(redact("b ob@re\u{7}mote.test", Redact::None), "b?ob@re?mote.test");
    assert_eq!(redact("bob@", Redact::Domain), "*");
}

#[test]
fn exempt_subjects_are_never_counted() {
    let cfg = MailStreamConfig {
        exempt: Exempt::new(["Lists".to_string()], vec!["198.51.100.0/24".parse().unwrap()]),
        ..MailStreamConfig::default()
    };
    let mut m = MailStream::new(cfg);
    m.apply(&submitted("Q1", "192.0.2.66", Some("lists")), T0);
    m.apply(&submitted("Q2", "198.51.100.5", Some("bob")), T0);
    for i in 0..50 {
        assert!(m.apply(&bounce("Q1", &format!("u{i}@remote.test"), "5.1.1"), T0).is_none());
        assert!(m.apply(&bounce("Q2", &format!("u{i}@remote.test"), "5.1.1"), T0).is_none());
        assert!(m.apply(&noqueue("198.51.100.9", "x@example.test", &format!("u{i}@remote.test")), T0).is_none());
    }
    assert!(m.take_dirty().undeliverable.is_empty());
}

#[test]
fn subject_text_round_trips() {
    for (s, shown) in [
        ("account:alice", "account:alice"),
        ("addr:192.0.2.1", "addr:192.0.2.1"),
        ("addr:::ffff:192.0.2.1", "addr:192.0.2.1"),
        ("2001:db8::1", "addr:2001:db8::"),
        ("addr:2001:db8:0:7:a:b:c:d", "addr:2001:db8:0:7::"),
        ("alice", "account:alice"),
    ] {
        let subject: Subject = s.parse().unwrap();
        assert_eq!(subject.to_string(), shown);
        let json = serde_json::to_string(&subject).unwrap();
        assert_eq!(serde_json::from_str::<Subject>(&json).unwrap(), subject);
    }
    for bad in ["account:", "addr:x", "al ice", "", "account:a\nb"] {
        assert!(bad.parse::<Subject>().is_err(), "{bad:?}");
    }
    assert_eq!(Subject::of(Some(""), ip("192.0.2.1")), Subject::addr(ip("192.0.2.1")));
    assert_eq!(Subject::account(&"a".repeat(1000)).to_string().len(), "account:".len() + MAX_ACCOUNT_LEN);
}

#[test]
fn mail_stream_dirty_rows_restore() {
    let mut m = stream();
    m.apply(&submitted("Q1", "192.0.2.66", Some("alice")), T0);
    m.apply(&submitted("Q2", "192.0.2.66", None), T0);
    for i in 0..4 {
        m.apply(&bounce("Q1", &format!("u{i}@remote.test"), "5.1.1"), T0 + i);
    }
    m.apply(&Event::Removed { qid: "Q2".into() }, T0 + 5);
    let d = m.take_dirty();
    assert!(m.take_dirty().is_empty());
    assert!(d.qids.contains(&Change::Delete("Q2".into())));
    let qids: Vec<QidRow> =
        d.qids.into_iter().filter_map(|c| if let Change::Upsert(q) = c { Some(q) } else { None }).collect();
    assert_eq!(qids.len(), 1);
    let rows: Vec<UndeliverableRow> = d.undeliverable.into_iter().flat_map(|(_, r)| r).collect();
    assert_eq!(rows.len(), 4);

    let mut r = stream();
    r.restore(qids, rows);
    assert!(r.take_dirty().is_empty());
    assert_eq!(r.count_of(&Subject::account("alice"), T0 + 10), 4);
    for i in 4..10 {
        assert!(r.apply(&bounce("Q1", &format!("u{i}@remote.test"), "5.1.1"), T0 + 10).is_none());
    }
    assert!(r.apply(&bounce("Q1", "u10@remote.test", "5.1.1"), T0 + 10).is_some(), "the restored qid joins");
}

#[test]
fn mail_stream_prune() {
    let mut m = stream();
    m.apply(&submitted("Q1", "192.0.2.66", Some("alice")), T0);
    m.apply(&bounce("Q1", "u@remote.test", "5.1.1"), T0);
    m.note_rcpt_request(ip("192.0.2.66"), "a@x.test", "b@x.test", Some("alice"), T0);
    m.take_dirty();
    assert_eq!(m.prune(T0 + 30_000), 0);
    assert_eq!(m.prune(T0 + 2 * HOUR), 2, "the recipient and the request");
    assert_eq!(m.prune(T0 + 6 * DAY), 1, "the queue id");
    let d = m.take_dirty();
    assert_eq!(d.undeliverable, vec![(Subject::account("alice"), vec![])]);
    assert_eq!(d.qids, vec![Change::Delete("Q1".into())]);
}

#[test]
fn policy_rcpt_requests_feed_the_join() {
    use crate::policy::PolicyRequest;
    let mut m = stream();
    let rcpt = PolicyRequest::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("client_address", "192.0.2.67"),
        ("sender", "alice@example.test"),
        ("recipient", "nobody@example.test"),
        ("sasl_username", "alice"),
    ])
    .unwrap();
    let data = PolicyRequest::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "DATA"),
        ("client_address", "192.0.2.67"),
        ("sender", "alice@example.test"),
        ("recipient", "other@example.test"),
        ("sasl_username", "alice"),
    ])
    .unwrap();
    m.note_policy_request(&rcpt, T0);
    m.note_policy_request(&data, T0);
    m.apply(&noqueue("192.0.2.67", "alice@example.test", "nobody@example.test"), T0 + 5);
    m.apply(&noqueue("192.0.2.67", "alice@example.test", "other@example.test"), T0 + 5);
    assert_eq!(m.count_of(&Subject::account("alice"), T0 + 5), 1);
    assert_eq!(m.count_of(&Subject::addr(ip("192.0.2.67")), T0 + 5), 1, "DATA requests are not RCPT joins");
}

#[test]
fn damaged_rows_do_not_ban() {
    let mut s = AbuseScores::new(AbuseConfig::default());
    let mut row = AbuseRow::new(AbuseKey::of(ip("192.0.2.66")), T0);
    row.score = f64::NAN;
    s.restore([row], []);
    assert!(s.apply(&connect("192.0.2.66"), T0).is_none());
    assert_eq!(s.get(&AbuseKey::of(ip("192.0.2.66")), T0).unwrap().score, 1.0);
}

use crate::test_rng::Rng;

#[test]
fn random_event_streams_keep_every_bound() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut scores = AbuseScores::new(AbuseConfig { max_sources: 50, max_sessions: 40, ..AbuseConfig::default() });
    let mut mail = MailStream::new(MailStreamConfig {
        max_subjects: 30,
        max_qids: 20,
        max_requests: 10,
        ..MailStreamConfig::default()
    });
    let mut now = T0;
    let mut offences = 0;
    for _ in 0..50_000 {
        // Time mostly forward, sometimes back (lines from several sources).
        now += rng.below(3000) as i64 - 500;
        let client = if rng.below(2) == 0 {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, rng.below(100) as u8))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, rng.below(60) as u16, 0, 0, 0, 0, rng.below(9) as u16))
        };
        let session = match rng.below(3) {
            0 => None,
            _ => Some(format!("s{}", rng.below(30))),
        };
        let count =
            if rng.below(2) == 0 { Count::Add(rng.below(4) as u32) } else { Count::AtLeast(rng.below(6) as u32) };
        let qid = format!("Q{}", rng.below(40));
        let rcpt = format!("u{}@d{}.test", rng.below(25), rng.below(3));
        let account = ["alice", "bob", ""][rng.below(3)].to_string();
        let event = match rng.below(7) {
            0 => connect(&client.to_string()),
            1 => Event::AuthFail { client, service: Service::Imap, session, count, user: None },
            2 => Event::Submitted { qid, client, account: Some(account) },
            3 => Event::Removed { qid },
            4 => Event::RcptReject {
                qid: (rng.below(2) == 0).then_some(qid),
                client,
                account: None,
                sender: "s@example.test".into(),
                rcpt,
                code: 550,
                dsn: Some("5.1.1".into()),
            },
            5 => bounce(&qid, &rcpt, "5.1.1"),
            _ => {
                mail.note_rcpt_request(client, "s@example.test", &rcpt, Some(&account), now);
                continue;
            }
        };
        if let Some(o) = scores.apply(&event, now) {
            offences += 1;
            assert!(o.score >= 100.0 && o.offence_no >= 1);
            assert!(scores.get(&o.key, now).unwrap().banned(now));
        }
        if let Some(s) = mail.apply(&event, now) {
            assert_eq!(s.count, 11);
            assert!(s.recipients.iter().all(|r| r.starts_with("*@d")));
        }
        assert!(scores.len() <= 50 && scores.sessions.len() <= 40);
        assert!(mail.subjects.len() <= 30 && mail.qids.len() <= 20 && mail.requests.len() <= 10);
        assert!(mail.subjects.iter().all(|(_, e)| e.len() <= 11));
        if rng.below(1000) == 0 {
            scores.prune(now);
            mail.prune(now);
            scores.take_dirty();
            mail.take_dirty();
        }
    }
    assert!(offences > 0, "the stream should have crossed the threshold somewhere");
}
