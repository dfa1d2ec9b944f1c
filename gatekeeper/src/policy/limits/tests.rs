use std::net::IpAddr;

use super::*;
use crate::policy::protocol::{format_reply, Reply};

/// The start of an hour.
const T0: i64 = 499_080 * HOUR_MS;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn alice() -> Subject {
    Subject::account("alice")
}

fn limits(cfg: SendLimitsConfig) -> SendLimits {
    SendLimits::new(SendLimitsConfig { contact: "abuse@isp.example".into(), ..cfg })
}

/// Messages of `rcpts` recipients until one is deferred; returns how many
/// were allowed and the refusal text.
fn send_until_deferred(l: &mut SendLimits, s: &Subject, rcpts: u32, at: i64) -> (u32, String) {
    for n in 0..100_000 {
        if let Decision::Defer { text } = l.check_data(s, Some(ip("192.0.2.66")), rcpts, at) {
            return (n, text);
        }
    }
    panic!("never deferred");
}

#[test]
fn default_is_100_an_hour_and_500_a_day() {
    let mut l = limits(SendLimitsConfig::default());
    let (n, text) = send_until_deferred(&mut l, &alice(), 1, T0);
    assert_eq!(n, 100);
    assert_eq!(text, "sending limit reached (100 messages in the last hour); contact abuse@isp.example");
    // Five more hours of 100 reach the day limit in the 5th hour.
    let mut total = 100;
    for h in 1..5 {
        let (n, _) = send_until_deferred(&mut l, &alice(), 1, T0 + h * HOUR_MS + 10);
        total += n;
    }
    assert_eq!(total, 500);
    let (n, text) = send_until_deferred(&mut l, &alice(), 1, T0 + 5 * HOUR_MS);
    assert_eq!(n, 0);
    assert_eq!(text, "sending limit reached (500 messages in 24h); contact abuse@isp.example");
    // 24 hours after the first hour, its 100 are out of the window.
    let (n, _) = send_until_deferred(&mut l, &alice(), 1, T0 + 24 * HOUR_MS);
    assert_eq!(n, 100);
    assert_eq!(l.usage(&alice(), T0 + 24 * HOUR_MS).messages_day, 500);
}

#[test]
fn the_hour_rolls_over_at_the_bucket_boundary() {
    let mut l = limits(SendLimitsConfig::default());
    let (n, _) = send_until_deferred(&mut l, &alice(), 1, T0 + HOUR_MS - 1);
    assert_eq!(n, 100);
    assert!(matches!(l.check_data(&alice(), None, 1, T0 + HOUR_MS), Decision::Allow));
    let u = l.usage(&alice(), T0 + HOUR_MS);
    assert_eq!((u.messages_hour, u.messages_day), (1, 101));
}

#[test]
fn deferred_messages_are_not_counted() {
    let mut l = limits(SendLimitsConfig::default());
    send_until_deferred(&mut l, &alice(), 2, T0);
    for _ in 0..10 {
        l.check_data(&alice(), None, 2, T0);
    }
    let u = l.usage(&alice(), T0);
    assert_eq!((u.messages_hour, u.recipients_hour), (100, 200));
}

#[test]
fn recipient_limits() {
    let cfg = SendLimitsConfig {
        default: Limits { recipients_hour: Some(10), recipients_day: Some(15), ..Limits::NONE },
        ..SendLimitsConfig::default()
    };
    let mut l = limits(cfg);
    assert_eq!(l.check_data(&alice(), None, 6, T0), Decision::Allow);
    let Decision::Defer { text } = l.check_data(&alice(), None, 5, T0) else { panic!("6 + 5 > 10") };
    assert_eq!(text, "sending limit reached (6 recipients in the last hour); contact abuse@isp.example");
    assert_eq!(l.check_data(&alice(), None, 4, T0), Decision::Allow);
    let Decision::Defer { text } = l.check_data(&alice(), None, 6, T0 + HOUR_MS) else { panic!("10 + 6 > 15") };
    assert!(text.contains("(10 recipients in 24h)"), "{text}");
}

#[test]
fn groups_overrides_and_no_limit() {
    let mut groups = BTreeMap::new();
    groups.insert("bulk".to_string(), Limits { messages_hour: Some(1000), messages_day: Some(5000), ..Limits::NONE });
    groups.insert("unlimited".to_string(), Limits::NONE);
    let mut members = HashMap::new();
    members.insert(Subject::account("news"), "bulk".to_string());
    members.insert(Subject::account("relay"), "unlimited".to_string());
    members.insert(Subject::addr(ip("192.0.2.10")), "bulk".to_string());
    let mut l = limits(SendLimitsConfig { groups, members, ..SendLimitsConfig::default() });

    assert_eq!(send_until_deferred(&mut l, &Subject::account("news"), 1, T0).0, 1000);
    assert_eq!(send_until_deferred(&mut l, &Subject::addr(ip("192.0.2.10")), 1, T0).0, 1000);
    for _ in 0..3000 {
        assert_eq!(l.check_data(&Subject::account("relay"), None, 50, T0), Decision::Allow);
    }
    // An override wins over the group, and goes live at once.
    l.set_override(Subject::account("news"), Some(Limits { messages_hour: Some(2000), ..Limits::NONE }));
    assert_eq!(send_until_deferred(&mut l, &Subject::account("news"), 1, T0).0, 1000);
    l.set_override(alice(), Some(Limits::NONE));
    for _ in 0..600 {
        assert_eq!(l.check_data(&alice(), None, 1, T0), Decision::Allow);
    }
    // Removing the override brings the default back.
    l.set_override(alice(), None);
    assert!(matches!(l.check_data(&alice(), None, 1, T0), Decision::Defer { .. }));
    assert_eq!(l.overrides().count(), 1);
    assert_eq!(l.limits_for(&Subject::account("nobody"), None), Some(SendLimitsConfig::default().default));
}

#[test]
fn exempt_accounts_and_addresses_are_neither_limited_nor_counted() {
    let exempt = crate::pipeline::abuse::Exempt::new(["lists".to_string()], vec!["198.51.100.0/24".parse().unwrap()]);
    let mut l = limits(SendLimitsConfig { exempt, ..SendLimitsConfig::default() });
    for _ in 0..1000 {
        assert_eq!(l.check_data(&Subject::account("LISTS"), None, 5, T0), Decision::Allow);
        assert_eq!(l.check_data(&Subject::addr(ip("198.51.100.7")), None, 5, T0), Decision::Allow);
        // An account relaying from an exempt address.
        assert_eq!(l.check_data(&alice(), Some(ip("198.51.100.7")), 5, T0), Decision::Allow);
    }
    assert!(l.take_dirty().is_empty());
    assert_eq!(l.limits_for(&alice(), Some(ip("198.51.100.7"))), None);
}

#[test]
fn without_a_contact_the_text_ends_at_the_count() {
    let mut l = SendLimits::new(SendLimitsConfig::default());
    let (_, text) = send_until_deferred(&mut l, &alice(), 1, T0);
    assert_eq!(text, "sending limit reached (100 messages in the last hour)");
}

#[test]
fn the_reply_is_a_4_7_1_defer() {
    let d = Decision::Defer { text: "sending limit reached (500 messages in 24h); contact abuse@isp.example".into() };
    assert_eq!(
        format_reply(&d.reply()),
        "action=DEFER_IF_PERMIT 4.7.1 sending limit reached (500 messages in 24h); contact abuse@isp.example\n\n"
    );
    assert_eq!(Decision::Allow.reply(), Reply::Dunno);
}

#[test]
fn dirty_rows_are_increments_and_restore_sets_absolutes() {
    let mut l = limits(SendLimitsConfig::default());
    for _ in 0..3 {
        l.check_data(&alice(), None, 2, T0);
    }
    l.check_data(&Subject::addr(ip("192.0.2.66")), None, 1, T0 + HOUR_MS);
    let rows = l.take_dirty();
    let hour = T0 / HOUR_MS;
    assert_eq!(
        rows,
        vec![
            CounterRow { subject: alice(), kind: CounterKind::Msg, hour, n: 3 },
            CounterRow { subject: alice(), kind: CounterKind::Rcpt, hour, n: 6 },
            CounterRow { subject: Subject::addr(ip("192.0.2.66")), kind: CounterKind::Msg, hour: hour + 1, n: 1 },
            CounterRow { subject: Subject::addr(ip("192.0.2.66")), kind: CounterKind::Rcpt, hour: hour + 1, n: 1 },
        ]
    );
    l.check_data(&alice(), None, 2, T0);
    assert_eq!(l.take_dirty()[0].n, 1, "only the increment since the last take");
    let json = serde_json::to_string(&rows).unwrap();
    assert!(json.contains(r#""subject":"account:alice","kind":"msg""#), "{json}");

    // Another host's store says alice sent 99 this hour, and 1 a day ago.
    let mut r = limits(SendLimitsConfig::default());
    r.restore(
        [
            CounterRow { subject: alice(), kind: CounterKind::Msg, hour, n: 99 },
            CounterRow { subject: alice(), kind: CounterKind::Msg, hour: hour - 24, n: 1000 },
            CounterRow { subject: alice(), kind: CounterKind::Msg, hour: hour + 5, n: 1000 },
        ],
        T0,
    );
    assert!(r.take_dirty().is_empty());
    assert_eq!(r.usage(&alice(), T0).messages_day, 99, "rows outside the 24 hours are skipped");
    assert_eq!(send_until_deferred(&mut r, &alice(), 1, T0).0, 1);
}

#[test]
fn prune_drops_idle_subjects() {
    let mut l = limits(SendLimitsConfig::default());
    l.check_data(&alice(), None, 1, T0);
    assert_eq!(l.prune(T0 + 23 * HOUR_MS), 0);
    assert_eq!(l.prune(T0 + 24 * HOUR_MS), 1);
    assert_eq!(l.usage(&alice(), T0), Usage::default());
}

#[test]
fn subject_tables_are_bounded() {
    let mut l = limits(SendLimitsConfig { max_subjects: 10, ..SendLimitsConfig::default() });
    for i in 0..100 {
        l.check_data(&Subject::account(&format!("u{i}")), None, 1, T0);
    }
    assert_eq!(l.counters.len(), 10);
}

#[test]
fn counter_kind_names() {
    for k in [CounterKind::Msg, CounterKind::Rcpt] {
        assert_eq!(k.as_str().parse::<CounterKind>().unwrap(), k);
    }
    assert!("messages".parse::<CounterKind>().is_err());
}

#[test]
fn the_subject_of_a_request() {
    use crate::policy::protocol::PolicyRequest;
    let req = |attrs: &[(&str, &str)]| {
        PolicyRequest::from_attrs([("request", "smtpd_access_policy")].iter().chain(attrs).copied()).unwrap()
    };
    assert_eq!(subject_of(&req(&[("sasl_username", "alice"), ("client_address", "192.0.2.1")])), Some(alice()));
    assert_eq!(
        subject_of(&req(&[("sasl_username", ""), ("client_address", "::ffff:192.0.2.1")])),
        Some(Subject::addr(ip("192.0.2.1")))
    );
    assert_eq!(subject_of(&req(&[])), None);
}

#[test]
fn limits_text_round_trips() {
    for t in ["none", "100/hour, 500/day", "5000/day", "10/hour, 20 rcpt/hour, 200 rcpt/day"] {
        assert_eq!(Limits::parse(t).unwrap().to_string(), t);
    }
    assert!(Limits::parse("1/day 2/day").unwrap_err().contains("twice"));
    assert!(Limits::parse("0/day").is_err());
    assert!(Limits::parse("10/week").is_err());
    assert!(Limits::parse("").is_err());
    assert!(Limits::parse("10 msgs/day").is_err());
}
