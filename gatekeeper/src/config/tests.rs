//! Unit tests.
use super::*;
use crate::domain::{Protocol, ReasonAction, Refusal, RejectMode};

fn parse(text: &str) -> Result<Config> {
    Config::parse(text, Path::new("/etc/gatekeeper.toml"))
}

fn message(text: &str) -> String {
    match parse(text) {
        Err(Error::Config { path, message }) => {
            assert_eq!(path, Path::new("/etc/gatekeeper.toml"));
            message
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn errors_inside_tables_name_the_table_and_key() {
    let e = Config::parse("ports = [25]\n[policy]\nno_ptr = 5\n", Path::new("g.toml")).unwrap_err().to_string();
    assert!(e.contains("g.toml") && e.contains("line 3") && e.contains("policy.no_ptr"), "{e}");
    let e = Config::parse("[dns]\ntimeout = \"soon\"\n", Path::new("g.toml")).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("dns.timeout"), "{e}");
    let e = Config::parse("dry_run = 3\n", Path::new("g.toml")).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("key `dry_run`"), "{e}");
}

#[test]
fn the_documented_example_config_parses() {
    let text = include_str!("../../../docs/gatekeeper.example.toml");
    let c = Config::parse(text, Path::new("docs/gatekeeper.example.toml")).unwrap();
    assert_eq!(c.ifaces(Role::Ingress), vec!["eth1".to_string()]);
    assert_eq!(c.ifaces(Role::Uplink), vec!["eth2".to_string()]);
    assert_eq!(c.egress, EgressConfig::default());
    assert_eq!(c.inbound, crate::config::InboundConfig::default());
    assert_eq!(c.policy, PolicyConfig::default());
    assert_eq!(c.limits, LimitsConfig::default());
    assert_eq!(c.reject, RejectSettings::default());
    assert!(c.dns.enabled);
}

#[test]
fn interface_roles_and_egress_limits() {
    let c = parse(
            "interfaces = [\"eth0\", { name = \"eth1\", role = \"uplink\" }, { name = \"eth0\", role = \"uplink\" }, { name = \"sub0\", role = \"subscriber\" }]\n[egress]\nports = [25, 2525]\n[[egress.limit]]\nname = \"all\"\nports = [25]\nrate = \"6/min\"\nburst = 3\n",
        )
        .unwrap();
    assert_eq!(c.ifaces(Role::Ingress), ["eth0"]);
    assert_eq!(c.ifaces(Role::Uplink), ["eth1", "eth0"]);
    assert_eq!(c.ifaces(Role::Subscriber), ["sub0"]);
    assert_eq!(c.egress.ports, [25, 2525]);
    assert_eq!(c.egress.limit.len(), 1);
    let lim = c.egress.limit[0].rate_limit();
    assert_eq!(lim.interval_ns, 10_000_000_000);
    assert_eq!(lim.burst_ns, 30_000_000_000);
    assert!(parse("[egress]\nlimit = []\nports = []\n").unwrap().egress.limit.is_empty());

    for (text, want) in [
            ("interfaces = [{ name = \"eth0\", role = \"router\" }]\n", "line 1"),
            ("interfaces = [\"eth0\", { name = \"eth0\", role = \"subscriber\" }]\n", "both ingress and subscriber"),
            ("interfaces = [{ name = \"eth0\", role = \"uplink\" }, { name = \"eth0\", role = \"uplink\" }]\n", "twice"),
            ("interfaces = [3]\n", "not integer"),
            ("[egress]\nports = [0]\n", "egress.ports"),
            ("[[egress.limit]]\nname = \"a\"\nports = [25]\nrate = \"fast\"\nburst = 1\n", "invalid rate"),
            ("[[egress.limit]]\nname = \"a\"\nports = [25]\nrate = \"0/min\"\nburst = 1\n", "invalid rate"),
            ("[[egress.limit]]\nname = \"a\"\nports = [25]\nrate = \"1/min\"\nburst = 0\n", "burst"),
            (
                "[[egress.limit]]\nname = \"a\"\nports = [25]\nrate = \"1/min\"\nburst = 1\n[[egress.limit]]\nname = \"b\"\nports = [25]\nrate = \"1/min\"\nburst = 1\n",
                "port 25 is in limit classes",
            ),
            ("[egress]\nport = [25]\n", "unknown field `port`"),
        ] {
            let m = message(text);
            assert!(m.contains(want), "{text:?}: {m}");
        }
    let mut c = Config::default();
    c.set_ifaces(Role::Ingress, &["eth0".into()]).unwrap();
    assert!(c.set_ifaces(Role::Subscriber, &["eth0".into()]).is_err());
}

#[test]
fn policy_sections_parse_and_are_checked() {
    let c = Config::parse(
        "[policy]\ngeneric = \"drop\"\nfirst_syn = \"hold\"\n[learning]\nenabled = false\n",
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.policy.generic, Action::Drop);
    assert_eq!(c.policy.first_syn, FirstSyn::Hold);
    assert_eq!(c.policy.dynamic, Action::Drop, "defaults stay");
    assert!(!c.learning.enabled);
    let e = Config::parse("[policy]\nttl_min = \"2d\"\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("policy.ttl_min") && e.contains("line 2") && e.contains("t.toml"), "{e}");
    let e = Config::parse("[policy]\nhold_time = \"60s\"\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("policy.hold_time") && e.contains("line 2"), "{e}");
    let e = Config::parse("[limits]\ndns_rate = 0\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("limits.dns_rate") && e.contains("line 2"), "{e}");
    let e = Config::parse("[policy]\ntempfail = \"drop\"\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("tempfail"), "{e}");
    let e = Config::parse("[policy]\ndynamic = \"reject\"\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.ports, None);
    assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
    assert_eq!(c.event_interval, Duration::from_secs(30));
    assert_eq!(c.max_verdicts, 262_144);
    assert_eq!(c.state_dir, Path::new("/var/lib/gatekeeper"));
    assert_eq!(c.socket, Path::new("/run/gatekeeper/gatekeeper.sock"));
    assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/gatekeeper"));
    assert_eq!(c.log_level, "info");
    assert!(!c.dry_run);
}

#[test]
fn full_file() {
    let c = parse(
        r#"
interfaces = ["eth0", "eth1"]
xdp_mode = "skb"
ports = [587, 25, 25]
dry_run = true
state_dir = "/srv/gk"
socket = "/run/gk.sock"
pin_dir = "/sys/fs/bpf/gk"
event_interval = "1m30s"
max_verdicts = 1024
max_range_nodes = 4096
log_level = "info,gatekeeper=debug"
"#,
    )
    .unwrap();
    assert_eq!(c.ifaces(Role::Ingress), ["eth0", "eth1"]);
    assert_eq!(c.xdp_mode, XdpModeSetting::Skb);
    assert_eq!(c.ports, Some(vec![25, 587]));
    assert!(c.dry_run);
    assert_eq!(c.state_dir, Path::new("/srv/gk"));
    assert_eq!(c.event_interval, Duration::from_secs(90));
    assert_eq!(c.max_verdicts, 1024);
    assert_eq!(c.max_range_nodes, 4096);
}

#[test]
fn unknown_key_names_line_column_and_key() {
    let m = message("dry_run = true\n\nportz = [25]\n");
    assert!(m.starts_with("line 3, column 1: unknown field `portz`, expected one of"), "{m}");
}

#[test]
fn bad_values_name_line_column_and_key() {
    let m = message("dry_run = true\nports = [25, 0]\n");
    assert!(m.starts_with("line 2, column 9: key `ports`: invalid ports: port 0"), "{m}");
    let m = message("ports = [25, 70000]\n");
    assert!(m.starts_with("line 1, column ") && m.contains("key `ports`") && m.contains("70000"), "{m}");
    let m = message("max_verdicts = 10\n");
    assert!(m.starts_with("line 1, column 16: key `max_verdicts`: max_verdicts 10 out of range"), "{m}");
    assert!(message("max_verdicts = 16777217").contains("out of range"));
    let m = message("max_range_nodes = 100\n");
    assert!(m.starts_with("line 1, column 19: key `max_range_nodes`: max_range_nodes 100 out of range"), "{m}");
    let m = message("\nevent_interval = \"0s\"\n");
    assert!(m.starts_with("line 2, column 18: key `event_interval`: invalid duration \"0s\""), "{m}");
    let m = message("xdp_mode = \"fast\"\n");
    assert!(m.contains("line 1") && m.contains("key `xdp_mode`") && m.contains("fast"), "{m}");
    assert!(message("state_dir = \"relative/dir\"").contains("must be absolute"));
    assert!(message("dry_run = \"yes\"").contains("key `dry_run`"));
    assert!(message("interfaces = [\"eth0\", \"eth0\"]").contains("listed twice"));
    assert!(message("interfaces = [\"a-very-long-interface-name\"]").contains("not a valid interface name"));
    assert!(message("log_level = \"verbose\"").contains("invalid log level"));
    assert!(message("ports = []").contains("no ports given"));
    let m = message("[policy]\nv6_prefix_drop_after = 1\n");
    assert!(
        m.contains("line 2") && m.contains("policy.v6_prefix_drop_after") && m.contains("0 (never) or at least 2"),
        "{m}"
    );
    assert_eq!(parse("[policy]\nv6_prefix_drop_after = 0\n").unwrap().policy.v6_prefix_drop_after, 0);
}

#[test]
fn syntax_errors_have_positions() {
    let m = message("dry_run = true\nports = [25,\n");
    assert!(m.starts_with("line 2") || m.starts_with("line 3"), "{m}");
    assert!(!m.contains('\n'), "{m}");
    let m = message("ports = 25\nports = 587\n");
    assert!(m.starts_with("line 2"), "{m}");
}

#[test]
fn load_missing_and_present() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatekeeper.toml");
    assert_eq!(Config::load(&path, false).unwrap(), Config::default());
    match Config::load(&path, true) {
        Err(Error::Config { path: p, message }) => {
            assert_eq!(p, path);
            assert!(message.contains("cannot read"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(&path, "ports = [25]\n").unwrap();
    assert_eq!(Config::load(&path, true).unwrap().ports, Some(vec![25]));
    std::fs::write(&path, "ports = [0]\n").unwrap();
    assert!(Config::load(&path, false).unwrap_err().to_string().contains("gatekeeper.toml"));
}

#[test]
fn ports() {
    assert_eq!(parse_ports("25,587").unwrap(), [25, 587]);
    assert_eq!(parse_ports(" 587 25, 465 25 ").unwrap(), [25, 465, 587]);
    for bad in ["", " , ", "0", "25,abc", "70000", "-1", "25;587"] {
        assert!(matches!(parse_ports(bad), Err(Error::InvalidPorts(_))), "{bad:?} accepted");
    }
    let many: Vec<u16> = (1..=65).collect();
    assert!(validate_ports(&many).unwrap_err().to_string().contains("at most 64"));
    let dup: Vec<u16> = (1..=64).chain(1..=64).collect();
    assert_eq!(validate_ports(&dup).unwrap().len(), 64);
}

#[test]
fn xdp_mode_strings() {
    for m in [XdpModeSetting::Auto, XdpModeSetting::Native, XdpModeSetting::Skb] {
        assert_eq!(m.to_string().parse::<XdpModeSetting>().unwrap(), m);
    }
    assert!("drv".parse::<XdpModeSetting>().unwrap_err().contains("expected auto, native or skb"));
}

#[test]
fn learner_bounds_are_checked_and_named() {
    let c = parse("[learning]\nmax_shapes = 16\nmax_prefixes = 1000\nmin_sources = 256\n").unwrap();
    assert_eq!((c.learning.max_shapes, c.learning.max_prefixes, c.learning.min_sources), (16, 1000, 256));
    assert_eq!(parse("").unwrap().learning.max_shapes, 4);
    let m = message("[learning]\nmax_shapes = 0\n");
    assert!(m.contains("line 2") && m.contains("key `learning.max_shapes`") && m.contains("out of range"), "{m}");
    assert!(message("[learning]\nmax_shapes = 100000\n").contains("learning.max_shapes"));
    let m = message("[learning]\nmax_prefixes = 0\n");
    assert!(m.contains("key `learning.max_prefixes`") && m.contains("at least 1"), "{m}");
    let m = message("[learning]\nmin_sources = 1000\n");
    assert!(m.contains("key `learning.min_sources`") && m.contains("out of range (2..=256)"), "{m}");
    assert!(message("[learning]\nmin_sources = 1\n").contains("learning.min_sources"));
}

#[test]
fn reject_defaults_answer_dns_outcomes_and_drop_the_rest() {
    let r = parse("").unwrap().reject;
    assert_eq!(r, RejectSettings::default());
    for refusal in Refusal::ALL {
        let want = match refusal {
            Refusal::NoPtr | Refusal::FcrdnsFail | Refusal::Dynamic | Refusal::Generic => ReasonAction::Reject,
            _ => ReasonAction::Drop,
        };
        assert_eq!(r.action(refusal), want, "{refusal}");
    }
    use gatekeeper_common::verdict_reason as vr;
    assert_eq!(r.action_bits(), 1 << vr::NO_PTR | 1 << vr::FCRDNS_FAIL | 1 << vr::DYNAMIC | 1 << vr::GENERIC);
    assert_eq!(r.ports(), [(25, Protocol::Smtp), (587, Protocol::Smtp), (110, Protocol::Pop3), (143, Protocol::Imap)]);
    assert_eq!((r.protocol_on(587), r.protocol_on(2525)), (Some(Protocol::Smtp), None));
    assert_eq!((r.mode, r.url.as_deref(), r.max_sessions), (RejectMode::Rcpt, None, 256));
    assert_eq!(r.per_source_rate.to_string(), "10/min");
    assert_eq!((r.idle_timeout.as_secs(), r.session_timeout.as_secs()), (30, 120));
    assert!(!r.hostname.is_empty() && r.hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
}

#[test]
fn reject_section_parses() {
    let r = parse(
        r#"
[reject]
mode = "banner"
url = "https://example.net/mail-policy"
hostname = "mx1.example.net"
smtp_ports = [25, 25]
pop3_ports = []
imap_ports = [143, 993]
max_sessions = 1
per_source_rate = "3/h"
idle_timeout = "10s"
session_timeout = "1m"

[reject.actions]
ban = "reject"
no_ptr = "drop"
learned-range = "reject"

[reject.templates]
generic = "{ip} is {reason}, named {ptr}; {{see}} {url}"
"#,
    )
    .unwrap()
    .reject;
    assert_eq!(
        (r.mode, r.url.as_deref(), r.hostname.as_str()),
        (RejectMode::Banner, Some("https://example.net/mail-policy"), "mx1.example.net")
    );
    assert_eq!(r.ports(), [(25, Protocol::Smtp), (143, Protocol::Imap), (993, Protocol::Imap)]);
    assert_eq!(
        (r.max_sessions, r.per_source_rate.to_string(), r.idle_timeout.as_secs(), r.session_timeout.as_secs()),
        (1, "3/h".into(), 10, 60)
    );
    assert_eq!(r.action(Refusal::ManualBan), ReasonAction::Reject, "`ban` names manual-ban");
    assert_eq!(r.action(Refusal::NoPtr), ReasonAction::Drop, "`no_ptr` as [policy] spells it");
    assert_eq!(r.action(Refusal::LearnedRange), ReasonAction::Reject);
    assert_eq!(r.action(Refusal::Dynamic), ReasonAction::Reject, "defaults stay");
    let t = r.template(Refusal::Generic);
    assert_eq!(
        t.parts(),
        [
            Part::Ip,
            Part::Text(" is ".into()),
            Part::Reason,
            Part::Text(", named ".into()),
            Part::Ptr,
            Part::Text("; {see} ".into()),
            Part::Url
        ]
    );
    assert_eq!(r.template(Refusal::NoPtr).as_str(), default_template(Refusal::NoPtr));
}

#[test]
fn reject_errors_name_line_and_key() {
    for (text, want) in [
        ("[reject]\nmode = \"greeting\"\n", "key `reject.mode`"),
        ("[reject]\nport = [25]\n", "unknown field `port`"),
        ("[reject]\nurl = \"https://x\\r\\nFOO\"\n", "key `reject.url`"),
        ("[reject]\nurl = \"\"\n", "key `reject.url`"),
        ("[reject]\nhostname = \"mx_1.example\"\n", "key `reject.hostname`"),
        ("[reject]\nsmtp_ports = [0]\n", "key `reject.smtp_ports`"),
        ("[reject]\nmax_sessions = 0\n", "key `reject.max_sessions`"),
        ("[reject]\nmax_sessions = 65537\n", "key `reject.max_sessions`"),
        ("[reject]\nper_source_rate = \"lots\"\n", "key `reject.per_source_rate`"),
        ("[reject]\nidle_timeout = \"301s\"\n", "key `reject.idle_timeout`"),
        ("[reject]\nsession_timeout = \"2h\"\n", "key `reject.session_timeout`"),
        ("[reject]\nidle_timeout = \"60s\"\nsession_timeout = \"30s\"\n", "key `reject.session_timeout`"),
        (
            "[reject]\nsmtp_ports = [25]\npop3_ports = [25]\n",
            "line 3, key `reject.pop3_ports`: port 25 is in smtp_ports too",
        ),
        ("[reject]\nsmtp_ports = [1, 2, 3, 4, 5, 6, 7]\npop3_ports = [8, 9]\n", "at most 8"),
        ("[reject.actions]\nno-ptr = \"pass\"\n", "key `reject.actions.no-ptr`"),
        ("[reject.actions]\nspam = \"drop\"\n", "line 2, column 1: unknown refusal `spam`"),
        (
            "[reject.actions]\nban = \"drop\"\nmanual-ban = \"reject\"\n",
            "line 3, column 1: `manual-ban` and `ban` are both manual-ban",
        ),
        (
            "[reject.templates]\ndynamic = \"{ip} {host}\"\n",
            "key `reject.templates.dynamic`: unknown placeholder `{host}`",
        ),
        ("[reject.templates]\ndynamic = \"{ip\"\n", "key `reject.templates.dynamic`: unclosed"),
        ("[reject.templates]\ndynamic = \"a } b\"\n", "key `reject.templates.dynamic`: a lone `}`"),
        ("[reject.templates]\ndynamic = \"a\\nb\"\n", "key `reject.templates.dynamic`"),
        ("[reject.templates]\ndynamic = \"caf\u{e9}\"\n", "printable ASCII"),
        ("[reject.templates]\ndynamic = \"  \"\n", "must not be empty"),
        ("[reject.templates]\ngeneric = \"see {url}\"\n", "key `reject.templates.generic`: the template uses {url}"),
    ] {
        let m = message(text);
        assert!(m.contains(want), "{text:?}: {m}");
        assert!(m.contains("line "), "{text:?}: {m}");
    }
}

#[test]
fn inbound_limits_default_replace_and_turn_off() {
    let d = parse("").unwrap().inbound;
    assert_eq!(d.ports(), [25, 110, 143, 465, 587, 993, 995]);
    let imap = d.limit.iter().find(|c| c.name == "imap").unwrap();
    assert_eq!((imap.ports.as_slice(), imap.rate.to_string().as_str(), imap.burst), (&[143, 993][..], "120/min", 60));
    let classes = d.classes();
    assert_eq!(classes.len(), 4);
    // smtp: 60/min burst 30 -> one token a second, 30 s ahead at most.
    assert_eq!(classes[0].1.interval_ns, 1_000_000_000);
    assert_eq!(classes[0].1.burst_ns, 30_000_000_000);

    let c = parse("[[inbound.limit]]\nname = \"imap\"\nports = [143]\nrate = \"10/min\"\nburst = 5\n").unwrap();
    assert_eq!(c.inbound.ports(), [143]);
    assert!(parse("[inbound]\nlimit = []\n").unwrap().inbound.limit.is_empty());

    for (text, want) in [
        (
            "[[inbound.limit]]\nname = \"a\"\nports = [143]\nrate = \"1/min\"\nburst = 1\n[[inbound.limit]]\nname = \"b\"\nports = [143]\nrate = \"1/min\"\nburst = 1\n",
            "port 143 is in limit classes",
        ),
        ("[[inbound.limit]]\nname = \"a\"\nports = [143]\nrate = \"fast\"\nburst = 1\n", "invalid rate"),
        ("[[inbound.limit]]\nname = \"a\"\nports = [0]\nrate = \"1/min\"\nburst = 1\n", "ports must be"),
        ("[[inbound.limit]]\nname = \"a\"\nports = [143]\nrate = \"1/min\"\nburst = 0\n", "burst"),
        ("[inbound]\nports = [143]\n", "unknown field `ports`"),
    ] {
        let m = message(text);
        // The message names the key (an unknown field is named by toml).
        let named = m.contains("key `inbound.limit") || want.starts_with("unknown field");
        assert!(m.contains(want) && named, "{text:?}: {m}");
    }
}

#[test]
fn ban_is_no_policy_action() {
    let m = message("[policy]\ngeneric = \"ban\"\n");
    assert!(m.contains("line 2") && m.contains("policy.generic") && m.contains("not a policy action"), "{m}");
    assert_eq!(parse("[policy]\ngeneric = \"drop\"\n").unwrap().policy.generic, Action::Drop);
}

#[test]
fn sshds_port_joins_the_limited_ports() {
    let text = "[[logs]]\nkind = \"sshd\"\nsource = \"journal\"\nport = 2222\n";
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    assert!(cfg.inbound.ports().contains(&2222), "{:?}", cfg.inbound.ports());
    assert_eq!(cfg.inbound.limit.last().unwrap().name, "ssh");
    let text = "[[logs]]\nkind = \"postfix\"\nsource = \"journal\"\nport = 25\n";
    let e = Config::parse(text, Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("`port` is for kind = \"sshd\""), "{e}");
    let text = "[abuse]\nauth_failure_weight = 0\n";
    let e = Config::parse(text, Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("auth_failure_weight") && e.contains("out of range"), "{e}");
    let text = "[smarthost]\nmessages = \"10/week\"\n";
    let e = Config::parse(text, Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("smarthost") && e.contains("10/week"), "{e}");
}

#[test]
fn mail_policy_and_abuse_settings_that_would_hurt_are_refused() {
    let e = Config::parse("[abuse]\nthreshold = 15\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("abuse.threshold") && e.contains("one failed login would ban"), "{e}");
    let e = Config::parse("[mail_policy]\nmode = \"0666\"\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("nothing for others"), "{e}");
    let e = Config::parse("[abuse]\nban = [\"0s\"]\n", Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("greater than zero"), "{e}");
    let cfg = Config::parse(
        "[mail_policy]\ncustomer_ranges = [\"198.51.100.0/24\"]\n[abuse]\nexempt = [\"192.0.2.5/32\"]\n",
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(cfg.mail_policy.customer_ranges.len(), 1);
    assert_eq!(cfg.abuse.exempt.len(), 1);
}
