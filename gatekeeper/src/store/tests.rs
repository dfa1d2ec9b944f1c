//! The store's unit tests.
use std::collections::HashSet;
use std::net::IpAddr;

use gatekeeper_common::{MAX_RANGES, MAX_RANGE_IDS};
use ipnet::IpNet;

use super::*;
use crate::domain::VerdictReason as R;
use crate::domain::{Origin, PoolAction, RangeKind};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn nr(s: &str) -> NewRange {
    NewRange {
        net: net(s),
        origin: Origin::Manual,
        source: "manual".into(),
        comment: None,
        expires_at: None,
        action: None,
    }
}

fn nets(store: &Store, kind: RangeKind) -> Vec<String> {
    store.list_ranges(Some(kind)).unwrap().iter().map(|r| r.net.to_string()).collect()
}

fn verdict(ip: &str, reason: R, expires_at: Option<i64>) -> VerdictRecord {
    VerdictRecord {
        key: SourceKey::from_ip(ip.parse().unwrap()),
        action: Action::Drop,
        reason,
        comment: None,
        created_at: 100,
        expires_at,
    }
}

#[test]
fn verdict_point_lookup() {
    let mut s = Store::open_in_memory().unwrap();
    let key = SourceKey::from_ip("2001:db8:1:2::9".parse().unwrap());
    assert_eq!(s.verdict(key).unwrap(), None);
    assert_eq!(s.verdict_count().unwrap(), 0);
    let v = VerdictRecord {
        key,
        action: Action::Drop,
        reason: R::Dynamic,
        comment: Some("x".into()),
        created_at: 5,
        expires_at: Some(50),
    };
    s.upsert_verdict(&v).unwrap();
    assert_eq!(s.verdict(key).unwrap(), Some(v));
    assert_eq!(s.verdict_count().unwrap(), 1);
    assert_eq!(s.verdict(SourceKey::from_ip("192.0.2.1".parse().unwrap())).unwrap(), None);
}

#[test]
fn add_list_and_order() {
    let mut s = Store::open_in_memory().unwrap();
    let added = s
        .add_ranges(
            RangeKind::Deny,
            &[nr("2001:db8::/32"), nr("198.51.100.0/24"), nr("192.0.2.0/25"), nr("192.0.2.0/24")],
            false,
            false,
            7,
        )
        .unwrap();
    assert_eq!(added.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(added.iter().all(|r| r.created_at == 7 && r.kind == RangeKind::Deny));
    s.add_ranges(RangeKind::Allow, &[nr("203.0.113.5/32")], false, false, 8).unwrap();
    assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24", "192.0.2.0/25", "198.51.100.0/24", "2001:db8::/32"]);
    let all = s.list_ranges(None).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[4].kind, RangeKind::Allow);
    assert_eq!(all[4].id, 4);
    assert_eq!(Origin::Learned.code(), gatekeeper_common::range_origin::LEARNED);
    assert_eq!(RangeKind::Allow.to_string(), "allow");
    let json = serde_json::to_string(&all[4]).unwrap();
    assert!(json.contains(r#""kind":"allow""#) && json.contains(r#""net":"203.0.113.5/32""#), "{json}");
}

#[test]
fn schema_1_database_is_migrated_with_its_ranges() {
    let dir = std::env::temp_dir().join(format!("gk-migrate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gatekeeper.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE ranges (id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('deny', 'allow')),
               net TEXT NOT NULL, origin TEXT NOT NULL, source TEXT NOT NULL, comment TEXT,
               created_at INTEGER NOT NULL, expires_at INTEGER, UNIQUE (kind, net));
             CREATE INDEX ranges_by_source ON ranges (kind, source);
             CREATE INDEX ranges_by_expiry ON ranges (expires_at) WHERE expires_at IS NOT NULL;
             CREATE TABLE verdicts (key TEXT PRIMARY KEY, action INTEGER NOT NULL, reason INTEGER NOT NULL,
               comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER);
             CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO ranges VALUES (7, 'deny', '192.0.2.0/24', 'manual', 'cli', 'old', 5, NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let mut s = Store::open(&path).unwrap();
    let all = s.list_ranges(None).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].id, all[0].kind, all[0].comment.as_deref(), all[0].action),
        (7, RangeKind::Deny, Some("old"), None)
    );
    let mut pool = nr("198.51.100.0/24");
    pool.action = Some(PoolAction::Reject);
    let added = s.add_ranges(RangeKind::Pool, &[pool], false, false, 0).unwrap();
    assert_eq!(added[0].action, Some(PoolAction::Reject));
    // Exempt inside a pool is the point of exempt entries: no --force.
    s.add_ranges(RangeKind::Exempt, &[nr("198.51.100.25/32")], false, false, 0).unwrap();
    s.add_ranges(RangeKind::Smarthost, &[nr("192.0.2.25/32")], false, false, 0).unwrap();
    drop(s);
    let s = Store::open(&path).unwrap();
    let pools = s.list_ranges(Some(RangeKind::Pool)).unwrap();
    assert_eq!(pools[0].action, Some(PoolAction::Reject));
    assert_eq!(s.list_ranges(None).unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_canonical_net_rejected() {
    let mut s = Store::open_in_memory().unwrap();
    let bad = NewRange { net: IpNet::new("192.0.2.1".parse().unwrap(), 24).unwrap(), ..nr("0.0.0.0/0") };
    assert!(matches!(
        s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), bad], false, false, 0),
        Err(Error::InvalidCidr { .. })
    ));
    assert!(s.list_ranges(None).unwrap().is_empty());
}

#[test]
fn duplicate_rejected_and_nothing_added() {
    let mut s = Store::open_in_memory().unwrap();
    let first = NewRange { comment: Some("office".into()), ..nr("192.0.2.0/24") };
    s.add_ranges(RangeKind::Deny, &[first], false, false, 0).unwrap();
    let err = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("192.0.2.0/24")], false, false, 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Duplicate { .. }));
    assert!(msg.contains("192.0.2.0/24") && msg.contains("id 0") && msg.contains("office"), "{msg}");
    assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
    // Twice in one batch.
    let err = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("10.0.0.0/8")], false, true, 0).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
    // skip_existing: the existing one is skipped and not returned.
    let added = s.add_ranges(RangeKind::Deny, &[nr("10.0.0.0/8"), nr("192.0.2.0/24")], false, true, 0).unwrap();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].net, net("10.0.0.0/8"));
    assert_eq!(s.list_ranges(None).unwrap().iter().find(|r| r.id == 0).unwrap().comment.as_deref(), Some("office"));
    // The same net may be both allow and deny only with force.
    assert!(matches!(s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], false, false, 0), Err(Error::Overlap { .. })));
    s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], true, false, 0).unwrap();
}

#[test]
fn overlap_both_directions_and_force() {
    let mut s = Store::open_in_memory().unwrap();
    s.add_ranges(RangeKind::Allow, &[nr("192.0.2.0/24"), nr("2001:db8:1::/48")], false, false, 0).unwrap();
    s.add_ranges(RangeKind::Deny, &[nr("198.51.100.0/24")], false, false, 0).unwrap();
    let cases = [
        (RangeKind::Deny, "192.0.2.128/25", "192.0.2.0/24"), // deny inside allow
        (RangeKind::Deny, "192.0.0.0/16", "192.0.2.0/24"),   // deny contains allow
        (RangeKind::Deny, "2001:db8::/32", "2001:db8:1::/48"),
        (RangeKind::Allow, "198.51.100.7/32", "198.51.100.0/24"), // allow inside deny
        (RangeKind::Allow, "0.0.0.0/0", "198.51.100.0/24"),       // allow contains deny
    ];
    for (kind, n, other) in cases {
        match s.add_ranges(kind, &[nr("203.0.113.0/24"), nr(n)], false, false, 0) {
            Err(Error::Overlap { kind: k, net: got, other: o, .. }) => {
                assert_eq!((k, got.as_str(), o.as_str()), (kind.as_str(), n, other));
            }
            r => panic!("{n}: expected overlap, got {r:?}"),
        }
    }
    assert_eq!(s.list_ranges(None).unwrap().len(), 3);
    // Neighbours and other families do not overlap.
    s.add_ranges(RangeKind::Deny, &[nr("192.0.3.0/24"), nr("2001:db8:2::/48"), nr("::/0")], false, false, 0)
        .unwrap_err();
    s.add_ranges(RangeKind::Deny, &[nr("192.0.3.0/24"), nr("2001:db8:2::/48")], false, false, 0).unwrap();
    let added = s.add_ranges(RangeKind::Deny, &[nr("192.0.2.128/25")], true, false, 0).unwrap();
    assert_eq!(added.len(), 1);
}

#[test]
fn ids_reuse_freed_and_never_collide() {
    let mut s = Store::open_in_memory().unwrap();
    let batch: Vec<NewRange> = (0..10).map(|i| nr(&format!("10.0.{i}.0/24"))).collect();
    s.add_ranges(RangeKind::Deny, &batch, false, false, 0).unwrap();
    s.del_range(RangeKind::Deny, net("10.0.3.0/24")).unwrap();
    s.del_range(RangeKind::Deny, net("10.0.7.0/24")).unwrap();
    let added = s
        .add_ranges(RangeKind::Allow, &[nr("172.16.0.0/16"), nr("172.17.0.0/16"), nr("172.18.0.0/16")], false, false, 0)
        .unwrap();
    assert_eq!(added.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 7, 10]);
    let all = s.list_ranges(None).unwrap();
    let ids: HashSet<u32> = all.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), all.len());
    assert_eq!(ids, (0..11).collect());
}

#[test]
fn full_family_is_rejected_whole() {
    let mut s = Store::open_in_memory().unwrap();
    // MAX_RANGES + 1 IPv4 /32s; nothing may be added.
    let batch: Vec<NewRange> =
        (0..=MAX_RANGES).map(|i| nr(&format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))).collect();
    match s.add_ranges(RangeKind::Deny, &batch, false, false, 0) {
        Err(Error::Full { what, capacity }) => {
            assert_eq!(what, "IPv4 allow and deny ranges");
            assert_eq!(capacity, u64::from(MAX_RANGES));
        }
        r => panic!("expected Full, got {:?}", r.map(|v| v.len())),
    }
    assert!(s.list_ranges(None).unwrap().is_empty());
}

#[test]
fn id_space_exhaustion() {
    let mut s = Store::open_in_memory().unwrap();
    // Fill every id: 131072 deny and 131072 pool IPv4 /32s.
    s.conn
        .execute(
            "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1)
             INSERT INTO ranges SELECT i, CASE WHEN i < ?2 THEN 'deny' ELSE 'pool' END,
               printf('10.%d.%d.%d/32', (i >> 16) & 255, (i >> 8) & 255, i & 255), 'manual', 'test', NULL, 0, NULL, NULL FROM c",
            [MAX_RANGE_IDS, MAX_RANGES],
        )
        .unwrap();
    match s.add_ranges(RangeKind::Deny, &[nr("2001:db8::/32")], true, false, 0) {
        Err(Error::Full { what: "range id space", capacity }) => assert_eq!(capacity, u64::from(MAX_RANGE_IDS)),
        r => panic!("expected Full, got {r:?}"),
    }
    s.del_range(RangeKind::Pool, net("10.3.255.255/32")).unwrap();
    let added = s.add_ranges(RangeKind::Deny, &[nr("2001:db8::/32")], true, false, 0).unwrap();
    assert_eq!(added[0].id, MAX_RANGE_IDS - 1);
}

#[test]
fn delete_and_not_found() {
    let mut s = Store::open_in_memory().unwrap();
    s.add_ranges(RangeKind::Deny, &[nr("192.0.2.0/24")], false, false, 0).unwrap();
    assert!(matches!(
        s.del_range(RangeKind::Allow, net("192.0.2.0/24")),
        Err(Error::NotFound { what: "allow range", .. })
    ));
    assert_eq!(s.del_range(RangeKind::Deny, net("192.0.2.0/24")).unwrap().net, net("192.0.2.0/24"));
    let err = s.del_range(RangeKind::Deny, net("192.0.2.0/24")).unwrap_err();
    assert_eq!(err.to_string(), "deny range 192.0.2.0/24 not found");
}

#[test]
fn replace_by_source() {
    let mut s = Store::open_in_memory().unwrap();
    let from = |n: &str, src: &str| NewRange { source: src.into(), origin: Origin::Imported, ..nr(n) };
    s.add_ranges(
        RangeKind::Deny,
        &[from("10.0.0.0/8", "drop"), from("11.0.0.0/8", "drop"), from("12.0.0.0/8", "other")],
        false,
        false,
        0,
    )
    .unwrap();
    s.add_ranges(RangeKind::Allow, &[from("13.0.0.0/8", "drop")], false, false, 0).unwrap();
    let gone = s.del_ranges_from_source_except(RangeKind::Deny, "drop", &[net("11.0.0.0/8")]).unwrap();
    assert_eq!(gone.iter().map(|r| r.net.to_string()).collect::<Vec<_>>(), ["10.0.0.0/8"]);
    assert_eq!(nets(&s, RangeKind::Deny), ["11.0.0.0/8", "12.0.0.0/8"]);
    assert_eq!(nets(&s, RangeKind::Allow), ["13.0.0.0/8"]);
}

#[test]
fn range_expiry() {
    let mut s = Store::open_in_memory().unwrap();
    let exp = |n: &str, at: Option<i64>| NewRange { expires_at: at, ..nr(n) };
    s.add_ranges(
        RangeKind::Deny,
        &[exp("10.0.0.0/8", Some(100)), exp("11.0.0.0/8", Some(200)), exp("12.0.0.0/8", None)],
        false,
        false,
        0,
    )
    .unwrap();
    assert!(s.expire_ranges(99).unwrap().is_empty());
    let gone = s.expire_ranges(100).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].expires_at, Some(100));
    assert_eq!(nets(&s, RangeKind::Deny), ["11.0.0.0/8", "12.0.0.0/8"]);
    assert_eq!(s.expire_ranges(i64::MAX).unwrap().len(), 1);
    assert_eq!(nets(&s, RangeKind::Deny), ["12.0.0.0/8"]);
}

#[test]
fn verdicts_upsert_list_delete_expire() {
    let mut s = Store::open_in_memory().unwrap();
    s.upsert_verdict(&verdict("192.0.2.1", R::NoPtr, Some(500))).unwrap();
    s.upsert_verdict(&verdict("2001:db8:1:2::99", R::Dynamic, None)).unwrap();
    let mut replaced = verdict("192.0.2.1", R::ManualBan, Some(900));
    replaced.comment = Some("spam run".into());
    s.upsert_verdict(&replaced).unwrap();
    let all = s.list_verdicts(None).unwrap();
    assert_eq!(all.len(), 2);
    // IPv4 keys (::ffff:a.b.c.d) sort before global IPv6 keys.
    assert_eq!(all[0], replaced);
    assert_eq!(all[1].key.display(), "2001:db8:1:2::/64");
    assert_eq!(s.list_verdicts(Some(R::Dynamic)).unwrap().len(), 1);
    assert!(s.list_verdicts(Some(R::NoPtr)).unwrap().is_empty());
    let json = serde_json::to_string(&all[0]).unwrap();
    assert!(json.contains(r#""key":"192.0.2.1""#), "{json}");

    assert_eq!(s.expire_verdicts(899).unwrap().len(), 0);
    assert_eq!(s.expire_verdicts(900).unwrap(), [replaced]);
    let k = SourceKey::from_ip("2001:db8:1:2::1".parse().unwrap());
    assert_eq!(s.del_verdict(k).unwrap().reason, R::Dynamic);
    assert_eq!(s.del_verdict(k).unwrap_err().to_string(), "verdict 2001:db8:1:2::/64 not found");
    // An IPv6 address key is a key of its own; interface id all ones is
    // not a valid key (nor is 0: that is the /64's).
    let mut host = verdict("2001:db8::1", R::NoPtr, None);
    host.key = SourceKey::host("2001:db8::1".parse().unwrap());
    s.upsert_verdict(&host).unwrap();
    assert_eq!(s.verdict(host.key).unwrap(), Some(host.clone()));
    assert_eq!(s.verdict(host.key.net()).unwrap(), None);
    let mut bad = verdict("2001:db8::1", R::ManualBan, None);
    bad.key.addr[8..].fill(0xff);
    assert!(matches!(s.upsert_verdict(&bad), Err(Error::InvalidCidr { .. })));
}

/// The lookup drop verdicts of a /64's addresses, for dropping the /64 as
/// a whole: live ones, not bans, not the /64's own, newest expiry first.
#[test]
fn address_drops_of_a_64() {
    let mut s = Store::open_in_memory().unwrap();
    let host = |ip: &str, reason, action, expires_at| VerdictRecord {
        key: SourceKey::host(ip.parse().unwrap()),
        action,
        reason,
        comment: None,
        created_at: 100,
        expires_at,
    };
    for v in [
        host("2001:db8:7:1::1", R::NoPtr, Action::Drop, Some(1000)),
        host("2001:db8:7:1::2", R::FcrdnsFail, Action::Drop, Some(3000)),
        host("2001:db8:7:1::3", R::Dynamic, Action::Drop, Some(150)),
        host("2001:db8:7:1::4", R::ManualBan, Action::Drop, None),
        host("2001:db8:7:2::5", R::NoPtr, Action::Drop, Some(2000)),
        verdict("2001:db8:7:1::9", R::NoPtr, Some(5000)),
    ] {
        s.upsert_verdict(&v).unwrap();
    }
    let net = SourceKey::from_ip("2001:db8:7:1::".parse().unwrap());
    let got: Vec<String> = s.address_drops(net, 200).unwrap().iter().map(|v| v.key.display()).collect();
    assert_eq!(got, ["2001:db8:7:1::2", "2001:db8:7:1::1"]);
}

/// Schema 2 -> 3: a lookup drop of a whole IPv6 /64 (what older agents
/// wrote for one address) is forgotten; bans, passes and IPv4 stay.
#[test]
fn migration_forgets_v6_lookup_drops_of_whole_64s() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gk.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE ranges (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, net TEXT NOT NULL, origin TEXT NOT NULL,
               source TEXT NOT NULL, comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER, action TEXT,
               UNIQUE (kind, net));
             CREATE TABLE verdicts (key TEXT PRIMARY KEY, action INTEGER NOT NULL, reason INTEGER NOT NULL,
               comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER);
             CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO verdicts VALUES ('2001:db8:1:2::/64', 1, 1, 'no-ptr', 1, 9999999999);
             INSERT INTO verdicts VALUES ('2001:db8:1:3::/64', 1, 0, 'ban', 1, NULL);
             INSERT INTO verdicts VALUES ('2001:db8:1:4::/64', 0, 5, 'ok', 1, 9999999999);
             INSERT INTO verdicts VALUES ('192.0.2.1', 1, 1, 'no-ptr', 1, 9999999999);
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let s = Store::open(&path).unwrap();
    let keys: Vec<String> = s.list_verdicts(None).unwrap().iter().map(|v| v.key.display()).collect();
    assert_eq!(keys, ["192.0.2.1", "2001:db8:1:3::/64", "2001:db8:1:4::/64"]);
}

/// Schema 3 -> 4: the ranges table is rebuilt with the explain pool action;
/// every range keeps its id and fields, and explain pools can be added.
#[test]
fn migration_3_to_4_keeps_ranges_and_takes_explain_pools() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gk.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE ranges (id INTEGER PRIMARY KEY,
               kind TEXT NOT NULL CHECK (kind IN ('deny', 'allow', 'pool', 'exempt', 'smarthost')),
               net TEXT NOT NULL, origin TEXT NOT NULL CHECK (origin IN ('manual', 'imported', 'learned')),
               source TEXT NOT NULL, comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER,
               action TEXT CHECK (action IN ('drop', 'reject')), UNIQUE (kind, net));
             CREATE INDEX ranges_by_source ON ranges (kind, source);
             CREATE INDEX ranges_by_expiry ON ranges (expires_at) WHERE expires_at IS NOT NULL;
             CREATE TABLE verdicts (key TEXT PRIMARY KEY, action INTEGER NOT NULL, reason INTEGER NOT NULL,
               comment TEXT, created_at INTEGER NOT NULL, expires_at INTEGER, net64 TEXT);
             CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO ranges VALUES (3, 'pool', '198.51.100.0/24', 'manual', 'cli', 'dsl', 5, 99, 'reject');
             INSERT INTO ranges VALUES (9, 'deny', '192.0.2.0/24', 'imported', 'drop.txt', NULL, 6, NULL, NULL);
             INSERT INTO verdicts VALUES ('192.0.2.1', 1, 1, 'no-ptr', 1, 9999999999, NULL);
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    let mut s = Store::open(&path).unwrap();
    let all = s.list_ranges(None).unwrap();
    let mut got: Vec<_> =
        all.iter().map(|r| (r.id, r.kind, r.net.to_string(), r.comment.clone(), r.action, r.expires_at)).collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        [
            (3, RangeKind::Pool, "198.51.100.0/24".into(), Some("dsl".into()), Some(PoolAction::Reject), Some(99)),
            (9, RangeKind::Deny, "192.0.2.0/24".into(), None, None, None),
        ]
    );
    assert_eq!(s.list_verdicts(None).unwrap().len(), 1);
    let mut pool = nr("203.0.113.0/24");
    pool.action = Some(PoolAction::Explain);
    let added = s.add_ranges(RangeKind::Pool, &[pool], false, false, 0).unwrap();
    assert_eq!(added[0].action, Some(PoolAction::Explain));
    let v: i64 = s.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    assert!(s.suspensions().unwrap().is_empty(), "3 -> 5 also made the mail tables");
}

#[test]
fn migration_4_to_5_adds_the_mail_tables_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gk.db");
    {
        let mut s = Store::open(&path).unwrap();
        s.add_ranges(RangeKind::Deny, &[nr("192.0.2.0/24")], false, false, 0).unwrap();
        s.conn
            .execute_batch(
                "DROP TABLE log_positions; DROP TABLE mail_state; DROP TABLE suspensions; DROP TABLE send_limits; DROP TABLE send_counts;
                 PRAGMA user_version = 4;",
            )
            .unwrap();
    }
    let mut s = Store::open(&path).unwrap();
    assert_eq!(s.list_ranges(None).unwrap().len(), 1);
    s.set_log_position("x", "{}", 1).unwrap();
    let v: i64 = s.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

#[test]
fn key_text_round_trips() {
    for ip in ["192.0.2.1", "0.0.0.0", "2001:db8:1:2::5", "::1"] {
        let k = SourceKey::from_ip(ip.parse().unwrap());
        assert_eq!(parse_key(&k.display()), Some(k));
    }
    assert_eq!(parse_key("2001:db8::1/64"), None);
    assert_eq!(parse_key("192.0.2.1/64"), None);
    assert_eq!(parse_key("garbage"), None);
}

#[test]
fn settings() {
    let mut s = Store::open_in_memory().unwrap();
    assert_eq!(s.setting("ports").unwrap(), None);
    s.set_setting("ports", "25").unwrap();
    s.set_setting("ports", "25,587").unwrap();
    assert_eq!(s.setting("ports").unwrap().as_deref(), Some("25,587"));
}

#[test]
fn reopen_persists_and_checks_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/sub/gatekeeper.db");
    {
        let mut s = Store::open(&path).unwrap();
        s.add_ranges(RangeKind::Deny, &[nr("192.0.2.0/24")], false, false, 5).unwrap();
        s.upsert_verdict(&verdict("198.51.100.1", R::Ok, None)).unwrap();
        s.set_setting("k", "v").unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let s = Store::open(&path).unwrap();
    assert_eq!(nets(&s, RangeKind::Deny), ["192.0.2.0/24"]);
    assert_eq!(s.list_verdicts(None).unwrap().len(), 1);
    assert_eq!(s.setting("k").unwrap().as_deref(), Some("v"));
    let wal: String = s.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
    assert_eq!(wal, "wal");
    s.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(s);
    assert!(matches!(Store::open(&path), Err(Error::StoreVersion { found: 99, .. })));
}

#[test]
fn corrupt_rows_are_errors_not_panics() {
    let s = Store::open_in_memory().unwrap();
    s.conn
        .execute("INSERT INTO ranges VALUES (0, 'deny', 'nonsense', 'manual', 'x', NULL, 0, NULL, NULL)", [])
        .unwrap();
    let err = s.list_ranges(None).unwrap_err().to_string();
    assert!(err.contains(":memory:") && err.contains("nonsense"), "{err}");
}

#[test]
fn bulk_add_110k() {
    let mut s = Store::open_in_memory().unwrap();
    s.add_ranges(RangeKind::Allow, &[nr("203.0.113.0/24"), nr("2001:db8:ffff::/48")], false, false, 0).unwrap();
    let batch: Vec<NewRange> = (0..110_000u32)
        .map(|i| {
            let n = if i % 10 == 0 {
                format!("2001:db8:{:x}::/48", i / 10)
            } else {
                format!("{}/{}", std::net::Ipv4Addr::from(0x0a00_0000 + (i << 4)), 28)
            };
            NewRange { origin: Origin::Imported, source: "drop".into(), ..nr(&n) }
        })
        .collect();
    let added = s.add_ranges(RangeKind::Deny, &batch, false, false, 0).unwrap();
    assert_eq!(added.len(), 110_000);
    assert_eq!(added.last().unwrap().id, 110_001);
    // Re-import is idempotent with skip_existing.
    assert!(s.add_ranges(RangeKind::Deny, &batch, false, true, 0).unwrap().is_empty());
    // An allow covering one of them is refused.
    assert!(matches!(s.add_ranges(RangeKind::Allow, &[nr("10.0.0.0/8")], false, false, 0), Err(Error::Overlap { .. })));
    assert_eq!(s.list_ranges(Some(RangeKind::Deny)).unwrap().len(), 110_000);
}

#[test]
fn database_files_are_private_and_commits_durable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatekeeper.db");
    // An existing world-readable database is narrowed too.
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut s = Store::open(&path).unwrap();
    s.set_setting("ports", "25").unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let sync = |s: &Store| -> i64 { s.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap() };
    assert_eq!(sync(&s), 2, "synchronous=FULL by default");
    s.begin(false).unwrap();
    assert_eq!(sync(&s), 1, "NORMAL for what the agent derives itself");
    s.rollback().unwrap();
    s.begin(true).unwrap();
    assert_eq!(sync(&s), 2, "FULL for an operator's change");
    s.commit().unwrap();
}

fn derived(i: u32, action: Action, expires_at: i64) -> VerdictRecord {
    VerdictRecord {
        key: SourceKey::from_ip(IpAddr::V4((0xc633_0000 + i).into())),
        action,
        reason: if action == Action::Pass { R::Ok } else { R::NoPtr },
        comment: None,
        created_at: 0,
        expires_at: Some(expires_at),
    }
}

#[test]
fn derived_verdicts_stay_at_the_bound_and_the_first_to_expire_goes() {
    let mut s = Store::open_in_memory().unwrap();
    // Bans (never counted, never removed) and pass verdicts (never removed).
    let mut ban = verdict("192.0.2.1", R::ManualBan, None);
    s.upsert_verdict(&ban).unwrap();
    ban.key = SourceKey::from_ip("192.0.2.2".parse().unwrap());
    ban.expires_at = Some(1);
    s.upsert_verdict(&ban).unwrap();
    let max = 100u64;
    for i in 0..10 {
        assert!(s.put_derived_verdict(&derived(i, Action::Pass, 10), max, 0).unwrap().written);
    }
    // A flood of drop verdicts, each expiring later than the one before,
    // far beyond the bound.
    let mut removed = 0;
    for i in 10..20_000u32 {
        let d = s.put_derived_verdict(&derived(i, Action::Drop, 1000 + i as i64), max, 0).unwrap();
        assert!(d.written);
        removed += d.removed.len();
        assert!(s.derived_count().unwrap() <= max);
    }
    assert_eq!(s.derived_count().unwrap(), max, "at the bound, and staying there");
    assert_eq!(removed, 20_000 - 10 - 90);
    let all = s.list_verdicts(None).unwrap();
    assert_eq!(all.len() as u64, max + 2, "both bans kept, even the one that expired");
    assert_eq!(all.iter().filter(|v| v.action == Action::Pass).count(), 10, "pass verdicts kept");
    // The drop verdicts that survive are the 90 expiring last.
    let mut drops: Vec<i64> = all.iter().filter(|v| v.reason == R::NoPtr).map(|v| v.expires_at.unwrap()).collect();
    drops.sort();
    assert_eq!(drops, (19_910..20_000).map(|i| 1000 + i).collect::<Vec<i64>>());
    // Updating a held key takes no room.
    let d = s.put_derived_verdict(&derived(19_999, Action::Drop, 5), max, 0).unwrap();
    assert_eq!((d.written, d.removed.len()), (true, 0));
    // Expired verdicts go before any live one; the count survives a
    // rollback (it is counted again).
    s.begin(false).unwrap();
    let d = s.put_derived_verdict(&derived(30_000, Action::Drop, 50_000), max, 25_000).unwrap();
    assert!(d.written);
    assert_eq!(d.removed.len() as u64, max, "every verdict expired by 25000 was purged, pass verdicts too");
    s.rollback().unwrap();
    assert_eq!(s.derived_count().unwrap(), max);
}

#[test]
fn derived_verdicts_never_push_out_pass_verdicts() {
    let mut s = Store::open_in_memory().unwrap();
    for i in 0..50 {
        s.put_derived_verdict(&derived(i, Action::Pass, 1000), 50, 0).unwrap();
    }
    let d = s.put_derived_verdict(&derived(99, Action::Drop, 10), 50, 0).unwrap();
    assert_eq!(d, Derived { written: false, removed: vec![] }, "no room: nothing written, nothing removed");
    let d = s.put_derived_verdict(&derived(98, Action::Pass, 10), 50, 0).unwrap();
    assert!(!d.written);
    assert_eq!(s.verdict_count().unwrap(), 50);
    // Trimming to a smaller bound (a lowered max_verdicts) keeps them too.
    s.put_derived_verdict(&derived(99, Action::Drop, 10), 51, 0).unwrap();
    assert_eq!(s.make_room(10, 0).unwrap().len(), 1);
    assert_eq!(s.derived_count().unwrap(), 50);
    assert!(s.put_derived_verdict(&verdict("192.0.2.9", R::ManualBan, None), 100, 0).is_err());
}
