//! Fail-closed paths an operator can hit without an attacker, closed (root):
//! a database that holds more than the tables fit must not stop the agent
//! from starting, nor leave a deny range enforcing over an allow range that
//! did not fit; a command naming one range twice is one change; the pin dir
//! and the state database are private.
//!
//! Each test runs its own agent in its own namespace, with its own pin dir,
//! socket and state dir.
use std::os::unix::fs::PermissionsExt;

use gatekeeper_tests::agentlab::Instance;
use gatekeeper_tests::netlab::{self, Netns};
use gatekeeper_tests::rng::Rng;

const IF_AGENT: &str = "gkh0";
const IF_SPARE: &str = "gkh1";

/// An agent guarding `gkh0` in a fresh namespace, without DNS lookups.
fn instance(name: &str, extra_config: &str) -> Instance {
    netlab::require_root();
    let ns = Netns::new(name).unwrap();
    ns.ip(&["link", "add", IF_AGENT, "type", "veth", "peer", "name", IF_SPARE]).unwrap();
    ns.link_up(IF_AGENT).unwrap();
    ns.link_up(IF_SPARE).unwrap();
    Instance::new(ns, Some(IF_AGENT), "gk-hardening-", &format!("{extra_config}[dns]\nenabled = false\n"))
}

/// `range del X X` used to commit the first delete, fail on the second and
/// skip the map sync, so the deleted range kept enforcing. Now the command
/// is one change: X is gone from the database and from the datapath.
#[test]
fn deleting_a_range_named_twice_removes_it_everywhere() {
    let mut gk = instance("hdel", "");
    gk.start(&[]);
    gk.ok(&["range", "add", "198.51.100.0/24", "203.0.113.0/24"]);
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["deny_v4"], 2, "{st:#}");

    gk.ok(&["range", "del", "198.51.100.0/24", "198.51.100.0/24"]);
    assert_eq!(gk.nets("range"), ["203.0.113.0/24"]);
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["deny_v4"], 1, "the deleted range left the datapath too: {st:#}");

    // A missing net among several still changes nothing.
    let out = gk.fails(&["range", "del", "203.0.113.0/24", "192.0.2.0/24"]);
    assert!(out.stderr.contains("192.0.2.0/24") && out.stderr.contains("not found"), "{out}");
    assert_eq!(gk.nets("range"), ["203.0.113.0/24"]);
    assert_eq!(gk.status()["datapath"]["entries"]["deny_v4"], 1);
}

/// A database holding more ranges than the range table fits (the operator
/// lowered `max_range_nodes`, or imports grew) used to make every start fail
/// in reconcile: a crash loop, with the datapath left as it was. Now the
/// agent starts with what fits, says what it left out, and never leaves a
/// deny range enforcing over an allow range that did not fit (that would
/// block the very sources the allow range lets through).
#[test]
fn a_full_range_table_at_start_runs_with_what_fits_and_fails_open() {
    let mut gk = instance("hfull", "");
    gk.start(&[]);
    // 600 allow /64s spread over 2001:db8::/32 need far more trie nodes
    // than the smallest table has; the v4 entries need three.
    let mut rng = Rng(0x6a7e);
    let mut allows: Vec<String> = Vec::new();
    while allows.len() < 600 {
        let (a, b) = (rng.next() as u16, rng.next() as u16);
        let net = format!("2001:db8:{a:x}:{b:x}::/64");
        if !allows.contains(&net) {
            allows.push(net);
        }
    }
    let mut args = vec!["allow", "add"];
    args.extend(allows.iter().map(String::as_str));
    args.push("192.0.2.10");
    gk.ok(&args);
    gk.ok(&["range", "add", "2001:db8::/32", "192.0.2.0/24", "--force"]);
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["allow_v6"], 600, "{st:#}");
    assert_eq!(st["datapath"]["entries"]["deny_v6"], 1, "{st:#}");

    // Restart on the smallest range table.
    gk.kill_agent();
    gk.ok(&["unload"]);
    gk.write_config("max_range_nodes = 1024\n[dns]\nenabled = false\n");
    gk.start(&[]);

    let st = gk.status();
    let detail = &st["detail"];
    let unapplied: Vec<&str> = detail["unapplied"]
        .as_array()
        .unwrap_or_else(|| panic!("no unapplied list: {st:#}"))
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(!unapplied.is_empty(), "{st:#}");
    assert!(
        unapplied.iter().any(|u| u.contains("2001:db8::/32") && u.contains("did not fit")),
        "the deny /32 is named as left out: {unapplied:#?}"
    );
    let e = &st["datapath"]["entries"];
    assert_eq!(e["deny_v6"], 0, "no deny may cover an allow range the table could not hold: {st:#}");
    let held = e["allow_v6"].as_u64().unwrap();
    assert!(held > 0 && held < 600, "some allow /64s fit, not all: {st:#}");
    assert_eq!(e["allow_v4"], 1, "{st:#}");
    assert_eq!(e["deny_v4"], 1, "what fits is enforced: {st:#}");
    // The database still holds everything, and the agent takes changes.
    assert_eq!(gk.nets("allow").len(), 601);
    gk.ok(&["ban", "add", "203.0.113.7"]);
    let text = gk.ok(&["status"]);
    assert!(text.contains("NOT APPLIED"), "{text}");
    assert!(gk.log().contains("not in the datapath"), "{}", gk.log());
}

/// A pin dir that others may write to is refused before anything is
/// loaded: whoever can write there could swap in maps of their own.
#[test]
fn a_pin_dir_others_can_write_is_refused() {
    let gk = instance("hpins", "");
    std::fs::set_permissions(gk.pin_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = gk.exec(&gk.run_args(&[]));
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("not private") && out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!(std::fs::read_dir(gk.pin_dir()).unwrap().count(), 0, "nothing was pinned");
}

/// The state database names sources and their hostnames: root only.
#[test]
fn the_state_database_is_private() {
    let mut gk = instance("hdb", "");
    gk.start(&[]);
    gk.ok(&["ban", "add", "203.0.113.7"]);
    let db = gk.state_dir().join("gatekeeper.db");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", db.display());
    let dir_mode = std::fs::metadata(gk.state_dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
}

/// A ban is never evicted from the verdict table, whatever fills the
/// source's buckets, and a ban the table cannot hold is refused at
/// `ban add` (it used to replace the ban expiring first, silently).
#[test]
fn a_ban_the_verdict_table_cannot_hold_is_refused_not_lost() {
    // 1024 verdicts: 512 buckets of 4 slots. Sources whose two buckets are
    // the same two fill them: the test reads the agent's hash secret (an
    // attacker cannot, see `xdp_decisions`).
    let mut gk = instance("hbans", "max_verdicts = 1024\n");
    gk.start(&[]);
    let of = gk.verdict_pair();
    let pair = |ip: std::net::Ipv6Addr| of(ip.into());
    let target = pair("2001:db8::1".parse().unwrap());
    let same: Vec<String> = (1u128..1 << 24)
        .map(|i| std::net::Ipv6Addr::from(0x2001_0db8_0000_0000_0000_0000_0000_0001u128 | (i << 64)))
        .filter(|ip| pair(*ip) == target)
        .take(8)
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(same.len(), 8, "enough sources sharing one bucket pair");

    let mut args = vec!["ban", "add", "2001:db8::1"];
    args.extend(same[..7].iter().map(String::as_str));
    gk.ok(&args);
    let bans = gk.json(&["ban", "list", "--json"]);
    assert_eq!(bans.as_array().unwrap().len(), 8, "{bans:#}");
    assert_eq!(gk.status()["datapath"]["entries"]["verdicts"], 8);

    // Both buckets hold bans: the ninth is refused, and nothing changes.
    let out = gk.fails(&["ban", "add", &same[7]]);
    assert!(out.stderr.contains("no room") && out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!(gk.json(&["ban", "list", "--json"]), bans, "no ban lost, none added");
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["verdicts"], 8, "{st:#}");
    // Every ban is still in the datapath.
    let c = gk.json(&["check", "2001:db8::1", "--json"]);
    assert_eq!(c["datapath"]["verdict"]["reason"], "manual-ban", "{c:#}");
}

/// An upgrade from a gatekeeper whose pinned config had the layout before
/// the hash secret (32 bytes): the agent used to refuse to start ("run
/// `gatekeeper unload` first"), so a package upgrade left it down. Now it
/// makes the config, the verdict table and the reported-sources cache anew
/// and writes the database's verdicts back.
#[test]
fn an_older_config_layout_is_made_anew_not_refused() {
    let mut gk = instance("hupg", "");
    gk.start(&[]);
    gk.ok(&["ban", "add", "203.0.113.9"]);
    gk.kill_agent();
    // What an older gatekeeper left: a 32-byte config value.
    let cfg = gk.pin_dir().join("maps").join(gatekeeper_common::maps::CONFIG);
    std::fs::remove_file(&cfg).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&cfg)
        .args(["type", "array", "key", "4", "value", "32", "entries", "1", "name", "GK_CONFIG"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));

    gk.start(&[]);
    assert!(gk.log().contains("made anew"), "{}", gk.log());
    let info = aya::maps::MapInfo::from_pin(&cfg).unwrap();
    assert_eq!(info.value_size() as usize, std::mem::size_of::<gatekeeper_common::Config>());
    let st = gk.status();
    assert_eq!(st["datapath"]["entries"]["verdicts"], 1, "the ban is written back: {st:#}");
    let bans = gk.json(&["ban", "list", "--json"]);
    assert_eq!(bans[0]["key"], "203.0.113.9", "{bans:#}");
}
