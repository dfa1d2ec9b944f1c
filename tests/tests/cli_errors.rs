//! Bad input to the CLI (root): every case exits non-zero, says on stderr
//! what is wrong, and changes nothing (`range list`, `allow list`,
//! `ports list` and `ban list` are the same before and after). Also the list
//! formats `range import` reads (plain, Spamhaus DROP, `range export`'s own
//! output) and config-file errors of `gatekeeper run`.
//!
//! Each test runs its own agent in its own namespace (on one end of a veth
//! pair inside it), with its own pin dir, socket and state dir.

use std::path::Path;

use gatekeeper_tests::agentlab::{run_args, Instance};
use gatekeeper_tests::netlab::{self, CmdOutput, Netns, PinDirGuard};
use serde_json::Value;

const IF_AGENT: &str = "gkv0";
const IF_SPARE: &str = "gkv1";

/// One namespace with an agent on `gkv0`, and what it last saw of the
/// agent's state.
struct Gk {
    gk: Instance,
    /// The state as last read, until the next successful change (`range
    /// list` costs the agent ~0.5 s of CPU: it reads every range-hit slot).
    known: std::cell::RefCell<Option<State>>,
}

/// What the CLI can see of the agent's state.
#[derive(Debug, PartialEq)]
struct State {
    ranges: Value,
    allows: Value,
    ports: Value,
    bans: Value,
    pools: Value,
    smarthosts: Value,
    exempt: Value,
}

impl Gk {
    fn new() -> Self {
        Gk::with_config("")
    }

    /// An agent whose config adds `extra` (top-level keys) to the defaults.
    fn with_config(extra: &str) -> Self {
        netlab::require_root();
        let ns = Netns::new("clierr").unwrap();
        ns.ip(&["link", "add", IF_AGENT, "type", "veth", "peer", "name", IF_SPARE]).unwrap();
        ns.link_up(IF_AGENT).unwrap();
        ns.link_up(IF_SPARE).unwrap();
        // No reverse-DNS lookups.
        let mut gk = Instance::new(ns, Some(IF_AGENT), "gk-cli-errors-", &format!("{extra}[dns]\nenabled = false\n"));
        gk.start(&[]);
        Self { gk, known: Default::default() }
    }

    /// A path in the test's temporary directory, as a string.
    fn path(&self, name: &str) -> String {
        self.gk.path(name)
    }

    /// The agent's namespace.
    fn ns(&self) -> &Netns {
        &self.gk.ns
    }

    /// `gatekeeper ARGS` in the agent's namespace.
    fn exec(&self, args: &[String]) -> CmdOutput {
        self.gk.exec(args)
    }

    /// Writes `text` to a file of that name in the temporary directory.
    fn file(&self, name: &str, text: &str) -> String {
        std::fs::write(self.gk.dir().join(name), text).unwrap();
        self.path(name)
    }

    /// A command that changes the state: expects success.
    fn ok(&self, args: &[&str]) -> CmdOutput {
        self.known.take();
        self.gk.ok_output(args)
    }

    /// A read-only command's JSON output.
    fn json(&self, args: &[&str]) -> Value {
        self.gk.json(args)
    }

    fn read_state(&self) -> State {
        State {
            ranges: self.json(&["range", "list", "--json"]),
            allows: self.json(&["allow", "list", "--json"]),
            ports: self.json(&["ports", "list", "--json"]),
            bans: self.json(&["ban", "list", "--json"]),
            pools: self.json(&["pool", "list", "--json"]),
            smarthosts: self.json(&["smarthost", "list", "--json"]),
            exempt: self.json(&["exempt", "list", "--json"]),
        }
    }

    /// The state: as last read if nothing was changed since, else read now.
    fn state(&self) -> State {
        match self.known.take() {
            Some(s) => s,
            None => self.read_state(),
        }
    }

    /// Runs a command that must fail: non-zero exit, every `needle` on
    /// stderr, no panic, and the state exactly as before.
    fn refused(&self, args: &[&str], needles: &[&str]) -> CmdOutput {
        let before = self.state();
        let out = self.gk.cli(args);
        assert!(!out.success(), "expected failure: {out}");
        assert!(matches!(out.code(), Some(c) if c != 0), "{out}");
        for n in needles {
            assert!(out.stderr.contains(n), "stderr does not mention {n:?}: {out}");
        }
        assert!(!out.stderr.contains("panicked"), "{out}");
        let after = self.read_state();
        assert_eq!(before, after, "state changed by a failed command: {out}");
        self.known.replace(Some(after));
        out
    }

    fn nets(&self, kind: &str) -> Vec<String> {
        self.gk.nets(kind)
    }

    /// (net, comment) of every deny range, sorted.
    fn nets_and_comments(&self) -> Vec<(String, Option<String>)> {
        let mut v: Vec<(String, Option<String>)> = self
            .json(&["range", "list", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["net"].as_str().unwrap().to_owned(), r["comment"].as_str().map(str::to_owned)))
            .collect();
        v.sort();
        v
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

// ====================================================================== tests

#[test]
fn malformed_cidrs() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "198.51.100.0/25", "--comment", "keep"]);
    gk.ok(&["allow", "add", "203.0.113.0/28"]);

    gk.refused(&["range", "add", "300.1.2.3/24"], &["300.1.2.3", "not an IPv4 or IPv6 address"]);
    gk.refused(&["range", "add", "192.0.2.1/24"], &["192.0.2.1/24", "host bits", "192.0.2.0/24"]);
    gk.refused(&["range", "add", "2001:db8::/129"], &["2001:db8::/129", "/128"]);
    gk.refused(&["range", "add", "abc"], &["\"abc\""]);
    gk.refused(&["range", "add", "192.0.2.0/"], &["192.0.2.0/", "not a number"]);
    gk.refused(&["range", "add", "::ffff:192.0.2.1"], &["IPv4-mapped", "192.0.2.1/32"]);
    // A bad one among good ones: nothing is added.
    gk.refused(&["range", "add", "192.0.2.0/24", "300.1.2.3/24", "2001:db8:9::/48"], &["300.1.2.3"]);
    gk.refused(&["allow", "add", "2001:db8::1/32"], &["host bits", "2001:db8::/32"]);
    gk.refused(&["range", "del", "192.0.2.1/24"], &["192.0.2.0/24"]);
    gk.refused(&["allow", "del", "abc"], &["abc"]);
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/25"]));
}

#[test]
fn duplicate_ranges() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "198.51.100.0/25", "--comment", "first"]);
    gk.ok(&["allow", "add", "2001:db8:7::/48"]);
    let out =
        gk.refused(&["range", "add", "198.51.100.0/25", "--comment", "second"], &["198.51.100.0/25", "already exists"]);
    assert!(out.stderr.contains("first"), "the error should say which entry is there: {out}");
    // In a batch: the new one before the duplicate is not added either.
    gk.refused(&["range", "add", "198.51.100.128/25", "198.51.100.0/25"], &["198.51.100.0/25", "already exists"]);
    gk.refused(&["range", "add", "192.0.2.0/24", "192.0.2.0/24"], &["192.0.2.0/24", "twice"]);
    gk.refused(&["allow", "add", "2001:db8:7::/48"], &["2001:db8:7::/48", "already exists"]);
    // The same net as a deny and as an allow is an overlap, not a duplicate.
    gk.refused(&["range", "add", "2001:db8:7::/48"], &["overlaps"]);
    let ranges = gk.json(&["range", "list", "--json"]);
    assert_eq!(ranges.as_array().unwrap().len(), 1, "{ranges:#}");
    assert_eq!(ranges[0]["comment"], "first");
}

#[test]
fn allow_deny_overlap_needs_force() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "198.51.100.0/24", "2001:db8:2::/64"]);
    gk.ok(&["allow", "add", "203.0.113.0/28"]);
    // A new allow inside a deny range.
    gk.refused(&["allow", "add", "198.51.100.7"], &["198.51.100.7/32", "overlaps", "198.51.100.0/24", "--force"]);
    gk.refused(&["allow", "add", "2001:db8:2::20/124"], &["overlaps", "2001:db8:2::/64", "--force"]);
    // A new allow covering a deny range.
    gk.refused(&["allow", "add", "198.51.100.0/24"], &["overlaps", "--force"]);
    // A new deny covering an allow range, and one inside it.
    gk.refused(&["range", "add", "203.0.113.0/24"], &["203.0.113.0/24", "overlaps", "203.0.113.0/28", "--force"]);
    gk.refused(&["range", "add", "203.0.113.5"], &["203.0.113.5/32", "overlaps", "203.0.113.0/28", "--force"]);
    // Nor through an import.
    let f = gk.file("overlap.txt", "192.0.2.0/24\n203.0.113.0/25\n");
    gk.refused(&["range", "import", &f], &["overlaps", "203.0.113.0/28"]);
    // With --force both directions are accepted.
    gk.ok(&["allow", "add", "198.51.100.7", "--force"]);
    gk.ok(&["range", "add", "203.0.113.0/24", "--force"]);
    assert_eq!(gk.nets("allow"), strs(&["198.51.100.7/32", "203.0.113.0/28"]));
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/24", "2001:db8:2::/64", "203.0.113.0/24"]));
}

#[test]
fn import_with_a_bad_line_imports_nothing_unless_skip_bad() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "203.0.113.128/25", "--comment", "manual"]);
    let f = gk
        .file("list.txt", "# my list\n198.51.100.0/25\n\n192.0.2.1/24 # typo\n203.0.113.0/25 ; ok\n2001:db8:2::/64\n");
    let out =
        gk.refused(&["range", "import", &f], &["list.txt", "line 4", "host bits", "192.0.2.0/24", "nothing imported"]);
    assert!(!out.stderr.contains("line 2:"), "good lines reported as bad: {out}");
    // A list with nothing but a bad line.
    let bad = gk.file("bad.txt", "not-a-net\n");
    gk.refused(&["range", "import", &bad], &["line 1", "not-a-net"]);
    // A file that is not there.
    let missing = gk.path("no-such-list.txt");
    gk.refused(&["range", "import", &missing], &["no-such-list.txt"]);

    let out = gk.ok(&["range", "import", &f, "--skip-bad"]);
    assert!(out.stderr.contains("warning"), "{out}");
    assert!(out.stderr.contains("line 4") && out.stderr.contains("192.0.2.1/24"), "{out}");
    assert!(out.stdout.contains("3 new") && out.stdout.contains("1 bad line"), "{out}");
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/25", "203.0.113.0/25", "203.0.113.128/25", "2001:db8:2::/64"]));
    let rows = gk.json(&["range", "list", "--json"]);
    let row = rows.as_array().unwrap().iter().find(|r| r["net"] == "203.0.113.0/25").unwrap();
    assert_eq!(row["origin"], "imported", "{rows:#}");
    assert_eq!(row["comment"], "ok", "{rows:#}");
}

/// A list that needs more trie nodes than the range table has is refused
/// whole: the database, the datapath's entries and its node use stay as
/// they were, and the table keeps working.
#[test]
fn range_table_full_refuses_the_whole_import() {
    let gk = Gk::with_config("max_range_nodes = 1024\n");
    gk.ok(&["range", "add", "198.51.100.0/24"]);
    let nodes = || gk.json(&["status", "--json"])["datapath"]["range_nodes"]["ingress"].clone();
    let before = nodes();
    assert_eq!(before["capacity"], 1024, "{before}");
    // 256 /64s in distinct /40s of 2001:db8::/32 need 3 nodes each: more
    // than the 1024 - 512 roots.
    let list: String = (0..256).map(|i| format!("2001:db8:{i:02x}00::/64\n")).collect();
    let f = gk.file("big.txt", &list);
    gk.refused(&["range", "import", &f], &["range table (trie nodes) is full", "1024"]);
    assert_eq!(nodes(), before, "node use after the refused import");
    // Smaller changes still work.
    gk.ok(&["range", "add", "2001:db8:ff00::/64"]);
    assert_eq!(nodes()["used"].as_u64(), before["used"].as_u64().map(|u| u + 6), "a /64 in a new /40: 6 nodes");
}

#[test]
fn spamhaus_drop_import_reimport_replace_and_export() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "192.0.2.0/24", "--comment", "snowshoe; wave #2"]);
    let drop_v1 = "; Spamhaus DROP List 2025/01/01 - (c) 2025 The Spamhaus Project SLU\n\
                   ; https://www.spamhaus.org/drop/drop.txt\n\
                   ; Last-Modified: Wed, 01 Jan 2025 00:00:00 GMT\n\
                   ; Expires: Wed, 01 Jan 2025 01:00:00 GMT\n\
                   198.51.100.0/24 ; SBL100001\n\
                   203.0.113.0/25 ; SBL100002\n\
                   2001:db8:2::/48 ; SBL100003\n";
    let f = gk.file("drop.txt", drop_v1);
    let out = gk.ok(&["range", "import", &f]);
    assert!(out.stdout.contains("3 new"), "{out}");
    let want_v1 = vec![
        ("192.0.2.0/24".to_string(), Some("snowshoe; wave #2".to_string())),
        ("198.51.100.0/24".to_string(), Some("SBL100001".to_string())),
        ("2001:db8:2::/48".to_string(), Some("SBL100003".to_string())),
        ("203.0.113.0/25".to_string(), Some("SBL100002".to_string())),
    ];
    assert_eq!(gk.nets_and_comments(), want_v1);
    let rows = gk.json(&["range", "list", "--json", "--origin", "imported"]);
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows:#}");
    assert!(rows.as_array().unwrap().iter().all(|r| r["source"] == "import:drop.txt"), "{rows:#}");

    // Re-importing the same file changes nothing.
    let before = gk.state();
    let out = gk.ok(&["range", "import", &f]);
    assert!(out.stdout.contains("0 new") && out.stdout.contains("3 already present"), "{out}");
    assert_eq!(gk.state(), before);

    // --replace drops what the list no longer has (only its own entries).
    let f = gk.file("drop.txt", &drop_v1.replace("203.0.113.0/25 ; SBL100002\n", ""));
    let out = gk.ok(&["range", "import", &f, "--replace"]);
    assert!(out.stdout.contains("0 new") && out.stdout.contains("1 removed"), "{out}");
    assert_eq!(gk.nets("range"), strs(&["192.0.2.0/24", "198.51.100.0/24", "2001:db8:2::/48"]));

    // A list that came down empty (a failed download) must not wipe it.
    let before = gk.state();
    let empty = gk.file("drop.txt", "; Spamhaus DROP List, nothing below\n");
    gk.refused(&["range", "import", &empty, "--replace"], &["no entries", "--allow-empty", "nothing was changed"]);
    assert_eq!(gk.state(), before);

    // `range export` reads back: idempotent on the same agent, and restores
    // the same nets and comments after everything was removed.
    let exported = gk.ok(&["range", "export"]).stdout;
    let e = gk.file("export.txt", &exported);
    let want = gk.nets_and_comments();
    let out = gk.ok(&["range", "import", &e]);
    assert!(out.stdout.contains("0 new"), "{out}\nexported:\n{exported}");
    let mut del = vec!["range", "del"];
    let nets = gk.nets("range");
    del.extend(nets.iter().map(String::as_str));
    gk.ok(&del);
    assert!(gk.nets("range").is_empty());
    let out = gk.ok(&["range", "import", &e]);
    assert!(out.stdout.contains("3 new"), "{out}\nexported:\n{exported}");
    assert_eq!(gk.nets_and_comments(), want, "exported:\n{exported}");
}

#[test]
fn config_errors_name_file_line_and_key() {
    let gk = Gk::new();
    let pins = PinDirGuard::new().unwrap();
    let cases = [
        ("unknown.toml", "dry_run = false\nportz = [25]\n", &["line 2", "portz"][..]),
        ("type.toml", "# gatekeeper\n\ndry_run = \"yes\"\n", &["line 3", "dry_run"][..]),
        ("port.toml", "ports = [25, 70000]\n", &["line 1", "ports", "70000"][..]),
        ("port0.toml", "interfaces = [\"gkv1\"]\nports = [0]\n", &["line 2", "ports", "port 0"][..]),
        ("mode.toml", "xdp_mode = \"fast\"\n", &["line 1", "xdp_mode", "fast"][..]),
        // Inside a `[table]` the key itself is named (not just the table).
        ("t-unknown.toml", "[dns]\nenabeld = true\n", &["line 2", "enabeld"][..]),
        ("t-type.toml", "[policy]\nno_ptr = 5\n", &["line 2", "no_ptr"][..]),
        ("t-variant.toml", "[policy]\nno_ptr = \"maybe\"\n", &["line 2", "no_ptr", "maybe"][..]),
        ("t-duration.toml", "[dns]\ntimeout = \"500ms\"\n", &["line 2", "timeout", "500ms"][..]),
        ("t-range.toml", "dry_run = true\n[policy]\nhold_time = \"60s\"\n", &["line 3", "hold_time"][..]),
    ];
    for (name, text, needles) in cases {
        let cfg = gk.file(name, text);
        let state_dir = gk.path(&format!("state-{name}"));
        let sock = gk.path(&format!("{name}.sock"));
        let before = gk.state();
        let args =
            run_args(Path::new(&sock), pins.path(), Path::new(&cfg), Path::new(&state_dir), &["--iface", IF_SPARE]);
        let out = gk.exec(&args);
        assert!(!out.success(), "{name}: {out}");
        assert!(out.stderr.contains(&cfg), "{name}: error does not name the file: {out}");
        for n in needles {
            assert!(out.stderr.contains(n), "{name}: stderr does not mention {n:?}: {out}");
        }
        let pinned: Vec<_> = std::fs::read_dir(pins.path()).unwrap().flatten().map(|e| e.path()).collect();
        assert!(pinned.is_empty(), "{name}: pinned despite the config error: {pinned:?}");
        assert_eq!(gk.ns().xdp_prog_id(IF_SPARE).unwrap(), None, "{name}: XDP attached despite the config error");
        assert!(!Path::new(&sock).exists(), "{name}: socket created");
        assert!(!Path::new(&state_dir).exists(), "{name}: state dir created");
        assert_eq!(gk.state(), before, "{name}: the running agent's state changed");
    }
    // The running agent's interface is untouched by all that.
    assert!(gk.ns().xdp_prog_id(IF_AGENT).unwrap().is_some());
}

#[test]
fn bad_ports() {
    let gk = Gk::new();
    gk.ok(&["ports", "set", "25", "587"]);
    assert_eq!(gk.json(&["ports", "list", "--json"])["ports"], serde_json::json!([25, 587]));
    gk.refused(&["ports", "set", "0"], &["port 0"]);
    gk.refused(&["ports", "set", "25", "0"], &["port 0"]);
    gk.refused(&["ports", "set", "70000"], &["70000"]);
    gk.refused(&["ports", "set", "25,abc"], &["abc"]);
    gk.refused(&["ports", "set", "-1"], &[]);
    let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
    let mut args = vec!["ports", "set"];
    args.extend(many.iter().map(String::as_str));
    gk.refused(&args, &["65 ports", "at most 64"]);
    let joined = many.join(",");
    gk.refused(&["ports", "set", &joined], &["at most 64"]);
    assert_eq!(gk.json(&["ports", "list", "--json"])["ports"], serde_json::json!([25, 587]));
    // 64 is fine.
    let ok: Vec<String> = (1..=64).map(|p| p.to_string()).collect();
    gk.ok(&["ports", "set", &ok.join(",")]);
}

#[test]
fn ban_add_not_an_ip() {
    let gk = Gk::new();
    gk.ok(&["ban", "add", "203.0.113.7"]);
    let out = gk.refused(&["ban", "add", "not-an-ip"], &["not-an-ip", "invalid value"]);
    assert_eq!(out.code(), Some(2), "clap usage errors exit 2: {out}");
    let out = gk.refused(&["ban", "add", "203.0.113.8", "203.0.113.0/24"], &["203.0.113.0/24"]);
    assert_eq!(out.code(), Some(2), "{out}");
    // ::/64 can hold no verdict: refused before anything is written.
    gk.refused(&["ban", "add", "203.0.113.8", "::1"], &["cannot ban ::1", "::/64"]);
    gk.refused(&["ban", "del", "203.0.113.9"], &["203.0.113.9", "not found"]);
    // The first of two is not lifted when the second is not banned.
    gk.refused(&["ban", "del", "203.0.113.7", "203.0.113.9"], &["not found"]);
    let bans = gk.json(&["ban", "list", "--json"]);
    assert_eq!(bans.as_array().unwrap().len(), 1, "{bans:#}");
    assert_eq!(bans[0]["key"], "203.0.113.7");
}

#[test]
fn range_del_of_a_missing_range() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "198.51.100.0/24", "2001:db8:2::/64"]);
    gk.ok(&["allow", "add", "203.0.113.0/28"]);
    gk.refused(&["range", "del", "192.0.2.0/24"], &["192.0.2.0/24", "not found"]);
    // The first of two must still be there when the second is missing.
    gk.refused(&["range", "del", "198.51.100.0/24", "192.0.2.0/24"], &["192.0.2.0/24", "not found"]);
    gk.refused(&["range", "del", "2001:db8:2::/64", "2001:db8:3::/64"], &["2001:db8:3::/64", "not found"]);
    // A net that exists with the other kind is not found either.
    gk.refused(&["range", "del", "203.0.113.0/28"], &["203.0.113.0/28", "not found"]);
    gk.refused(&["allow", "del", "198.51.100.0/24"], &["198.51.100.0/24", "not found"]);
    // A range that contains or is contained by one is not that one.
    gk.refused(&["range", "del", "198.51.100.0/25"], &["not found"]);
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/24", "2001:db8:2::/64"]));
    assert_eq!(gk.nets("allow"), strs(&["203.0.113.0/28"]));
}

#[test]
fn bad_expire() {
    let gk = Gk::new();
    gk.ok(&["range", "add", "198.51.100.0/24", "--expire", "1h"]);
    let f = gk.file("list.txt", "192.0.2.0/24\n");
    for (dur, needle) in [("0s", "greater than zero"), ("soon", "soon"), ("5", "unit"), ("-5m", "negative")] {
        for args in [
            vec!["range", "add", "203.0.113.0/24", "--expire", dur],
            vec!["allow", "add", "203.0.113.0/24", "--expire", dur],
            vec!["ban", "add", "203.0.113.7", "--expire", dur],
            vec!["range", "import", &f, "--expire", dur],
        ] {
            // `--expire=-5m`: a value starting with '-' must be attached.
            let args: Vec<String> = if dur.starts_with('-') {
                let mut a: Vec<String> = args[..args.len() - 2].iter().map(|s| s.to_string()).collect();
                a.push(format!("--expire={dur}"));
                a
            } else {
                args.iter().map(|s| s.to_string()).collect()
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = gk.refused(&args, &["invalid duration", needle]);
            assert!(out.stderr.contains("--expire"), "{out}");
        }
    }
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/24"]));
}

#[test]
fn egress_entries_bad_input() {
    let gk = Gk::new();
    gk.ok(&["pool", "add", "198.51.100.0/24", "--action", "reject", "--comment", "dsl"]);
    gk.ok(&["pool", "add", "2001:db8:100::/40"]);
    gk.ok(&["smarthost", "add", "192.0.2.25"]);
    // An exempt host inside a pool is what exempt entries are for.
    gk.ok(&["exempt", "add", "198.51.100.77"]);
    let pools = gk.json(&["pool", "list", "--json"]);
    let actions: Vec<(&str, &str)> =
        pools.as_array().unwrap().iter().map(|r| (r["net"].as_str().unwrap(), r["action"].as_str().unwrap())).collect();
    assert_eq!(actions, [("198.51.100.0/24", "reject"), ("2001:db8:100::/40", "drop")]);
    assert_eq!(gk.nets("smarthost"), strs(&["192.0.2.25/32"]));
    assert_eq!(gk.nets("exempt"), strs(&["198.51.100.77/32"]));

    gk.refused(&["pool", "add", "198.51.100.0/33"], &["198.51.100.0/33"]);
    gk.refused(&["pool", "add", "203.0.113.0/24", "--action", "maybe"], &["maybe", "drop, reject or explain"]);
    gk.refused(&["pool", "add", "198.51.100.0/24"], &["pool 198.51.100.0/24 already exists"]);
    gk.refused(&["pool", "add", "203.0.113.0/24", "198.51.100.0/24"], &["already exists"]);
    gk.refused(&["pool", "del", "203.0.113.0/24"], &["pool 203.0.113.0/24 not found"]);
    gk.refused(&["smarthost", "add", "mail.example.net"], &["mail.example.net"]);
    gk.refused(&["smarthost", "del", "192.0.2.26"], &["smarthost range 192.0.2.26/32 not found"]);
    gk.refused(&["exempt", "del", "198.51.100.78"], &["exempt range 198.51.100.78/32 not found"]);
    // A pool is not a deny range, and the other way round.
    gk.refused(&["range", "del", "198.51.100.0/24"], &["not found"]);
    gk.ok(&["range", "add", "198.51.100.0/24"]);
    gk.refused(&["pool", "del", "198.51.100.0/25"], &["not found"]);
    gk.ok(&["pool", "del", "198.51.100.0/24"]);
    assert_eq!(gk.nets("pool"), strs(&["2001:db8:100::/40"]));
    assert_eq!(gk.nets("range"), strs(&["198.51.100.0/24"]));
}

#[test]
fn egress_roles_refused_before_anything_changes() {
    let gk = Gk::new();
    let before = gk.state();
    for (extra, needles) in [
        (vec!["--uplink", "nosuchif0"], vec!["nosuchif0", "not found", "nothing was changed"]),
        (vec!["--subscriber-iface", "nosuchif1"], vec!["nosuchif1", "not found"]),
        (vec!["--iface", IF_SPARE, "--subscriber-iface", IF_SPARE], vec!["cannot be both"]),
        (vec!["--uplink", IF_SPARE, "--tc-mode", "fast"], vec!["fast", "tcx or clsact"]),
    ] {
        let pins = PinDirGuard::new().unwrap();
        let (sock, state_dir) = (gk.path("other.sock"), gk.path("other-state"));
        let args = run_args(Path::new(&sock), pins.path(), &gk.gk.config_path(), Path::new(&state_dir), &extra);
        let out = gk.exec(&args);
        assert!(!out.success(), "{extra:?} should be refused: {out}");
        for n in &needles {
            assert!(out.stderr.contains(n), "{extra:?}: stderr does not mention {n:?}: {out}");
        }
        assert!(!pins.path().join("links").exists(), "{extra:?} attached something: {out}");
        assert!(!std::path::Path::new(&gk.path("other.sock")).exists(), "{extra:?} bound a socket");
    }
    assert_eq!(gk.read_state(), before, "the running agent was disturbed");
}
