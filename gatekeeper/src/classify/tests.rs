//! The classifier's unit tests.
use super::*;

fn c(ip: &str, name: &str) -> Classification {
    classify(ip.parse().unwrap(), name)
}

fn class(ip: &str, name: &str) -> Class {
    c(ip, name).class
}

fn reasons(ip: &str, name: &str) -> Vec<String> {
    c(ip, name).reasons.iter().map(|r| r.to_string()).collect()
}

#[test]
fn vocab_is_packed_without_collisions() {
    let total: usize = VOCAB.iter().map(|(_, w)| w.len()).sum();
    assert_eq!(vocab().table.len(), total, "a word appears twice in VOCAB");
    for (_, words) in VOCAB {
        for w in *words {
            assert!(w.len() >= 2 && w.len() <= 16 && w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
            assert!(vocab().lookup(w.as_bytes()).is_some());
        }
    }
}

#[test]
fn embedded_forms_v4() {
    let ip = "73.47.72.35";
    assert_eq!(reasons(ip, "c-73-47-72-35.hsd1.nh.comcast.net"), ["ip-embedded:dashed", "token:hsd"]);
    assert_eq!(reasons(ip, "73.47.72.35.example.net")[0], "ip-embedded:dotted");
    assert_eq!(reasons(ip, "35.72.47.73.rev.example.net")[0], "ip-embedded:dotted-reversed");
    assert_eq!(reasons(ip, "35-72-47-73.example.net")[0], "ip-embedded:dashed-reversed");
    assert_eq!(reasons(ip, "ip_73_47_72_35.example.net")[0], "ip-embedded:underscored");
    assert_eq!(reasons(ip, "073-047-072-035.example.net")[0], "ip-embedded:dashed-padded");
    assert_eq!(reasons(ip, "x073047072035.example.net")[0], "ip-embedded:concat-padded");
    assert_eq!(reasons(ip, "h73477235.example.net")[0], "ip-embedded:concat");
    assert_eq!(reasons(ip, "p492f4823.dip0.t-ipconnect.de")[0], "ip-embedded:hex");
    assert_eq!(reasons(ip, "n1227835427.example.net")[0], "ip-embedded:decimal");
    assert_eq!(reasons(ip, "35.red-73-47-72.dynamicip.rima-tde.net")[0], "ip-embedded:split");
    assert_eq!(reasons(ip, "host35-72-dynamic.47-73-r.retail.example.it")[0], "ip-embedded:split");
    assert_eq!(reasons(ip, "72-35.pool.example.net")[0], "ip-embedded:partial");
    assert_eq!(reasons("192.0.2.7", "c0000207.example.net")[0], "ip-embedded:hex");
    // host1234 is not an address, nor are unrelated numbers.
    assert_eq!(class("10.20.12.34", "host1234.example.net"), Class::Named);
    assert_eq!(class(ip, "www2.example.com"), Class::Named);
}

#[test]
fn embedded_forms_v6() {
    let ip = "2003:cb:c709:6200:16ba:af70:999d:6a1a";
    assert_eq!(
        reasons(ip, "p200300cbc709620016baaf70999d6a1a.dip0.t-ipconnect.de"),
        ["ip-embedded:v6-hex", "token:dip"]
    );
    let ip2 = "2a01:c23:b916:4400:b786:57bd:b8fa:4b8b";
    assert_eq!(
        c(ip2, "dynamic-2a01-0c23-b916-4400-b786-57bd-b8fa-4b8b.c23.pool.telefonica.de"),
        Classification {
            class: Class::Dynamic,
            reasons: vec![Reason::IpEmbedded("v6-groups"), Reason::Token("dynamic"), Reason::Token("pool")]
        }
    );
    assert_eq!(reasons(ip2, "2a01-c23-b916-4400-b786-57bd-b8fa-4b8b.rev.example.net")[0], "ip-embedded:v6-groups");
    let arpa = "a.1.a.6.d.9.9.9.0.7.f.a.a.b.6.1.customer.example.net";
    assert_eq!(reasons(ip, arpa)[0], "ip-embedded:v6-nibbles");
    assert_eq!(class(ip, arpa), Class::Dynamic);
    assert_eq!(reasons("2001:db8:1:2::1", "2001-db8-1.cust.example.net")[0], "ip-embedded:v6-prefix");
    assert_eq!(class("2001:db8::25", "mx.example.net"), Class::Named);
    // IPv4-mapped sources are IPv4.
    assert_eq!(reasons("::ffff:73.47.72.35", "c-73-47-72-35.hsd1.nh.comcast.net")[0], "ip-embedded:dashed");
}

#[test]
fn tokens_need_word_boundaries() {
    assert_eq!(class("81.2.3.4", "mudslide.example.com"), Class::Named);
    assert_eq!(class("81.2.3.4", "mail.liverpool.ac.uk"), Class::Named);
    assert_eq!(class("81.2.3.4", "www.liverpoolfc.com"), Class::Named);
    assert_eq!(reasons("141.146.126.1", "userp2040.oracle.com"), Vec::<String>::new());
    assert_eq!(class("81.2.3.4", "smtp.pppl.gov"), Class::Named);
    // Tokens inside the registrable domain do not count.
    assert_eq!(class("81.2.3.4", "www.umts-forum.org"), Class::Named);
    assert_eq!(class("81.2.3.4", "mx1.dyn.com"), Class::Named);
    // Split on digits: dsl2, ppp91.
    assert_eq!(class("91.78.12.34", "ppp91-78-12-34.pppoe.mtu-net.ru"), Class::Dynamic);
    // Compounds of two known words.
    assert_eq!(
        reasons("77.1.2.3", "dyndsl-077-001-002-003.example.ru"),
        ["ip-embedded:dashed-padded", "token:dyn", "token:dsl"]
    );
    assert_eq!(reasons("77.1.2.3", "adslpool-77-1-2-3.example.ru")[1..], ["token:adsl", "token:pool"]);
}

#[test]
fn mail_servers_are_named() {
    for (ip, name) in [
        ("54.240.9.92", "a9-92.smtp-out.amazonses.com"),
        ("69.72.43.7", "m43-7.mailgun.net"),
        ("198.2.187.32", "mail187-32.suw11.mandrillapp.com"),
        ("209.85.219.171", "mail-yw1-f171.google.com"),
        ("40.107.244.71", "mail-mw2nam12on2071.outbound.protection.outlook.com"),
        ("66.220.144.178", "66-220-144-178.mail-mail.facebook.com"),
        ("168.245.5.182", "o1682455182.outbound-mail.sendgrid.net"),
        ("98.137.69.146", "sonic310-20.consmr.mail.gq1.yahoo.com"),
        ("17.58.6.43", "pv50p00im-hyfv10011601.me.com"),
    ] {
        assert_eq!(class(ip, name), Class::Named, "{name}");
    }
}

#[test]
fn decision_table() {
    assert_eq!(class("88.198.12.34", "static.88-198-12-34.clients.your-server.de"), Class::Generic);
    assert_eq!(class("3.12.34.56", "ec2-3-12-34-56.us-east-2.compute.amazonaws.com"), Class::Generic);
    assert_eq!(class("86.162.184.27", "host86-162-184-27.range86-162.btcentralplus.com"), Class::Generic);
    assert_eq!(class("82.4.196.95", "cpc149474-cmbg20-2-0-cust94.5-4.cable.virginm.net"), Class::Dynamic);
    assert_eq!(
        reasons("82.4.196.95", "cpc149474-cmbg20-2-0-cust94.5-4.cable.virginm.net"),
        ["numbered-host", "token:cust", "token:cable"]
    );
    assert_eq!(class("1.2.3.4", "dynamic.example.net"), Class::Dynamic);
    assert_eq!(class("1.2.3.4", "home.example.org"), Class::Named);
    assert_eq!(class("1.2.3.4", "unknown.example.net"), Class::Generic);
    // Mail token + end-user token + address: generic, never dynamic.
    assert_eq!(class("1.2.3.4", "mail-1-2-3-4.dsl.example.net"), Class::Generic);
    // Weak mail token loses to end-user tokens.
    assert_eq!(class("1.2.3.4", "out-ab-3-4.wireless.example.com"), Class::Dynamic);
    assert_eq!(class("51.12.34.5", "ns3012345.ip-51-12-34.eu"), Class::Generic);
    assert_eq!(class("1.2.3.4", "ip-3-4.example.net"), Class::Generic);
    assert_eq!(class("1.2.3.4", "1.2.3.4"), Class::Generic);
    assert_eq!(reasons("1.2.3.4", "localhost"), ["single-label"]);
    assert_eq!(reasons("1.2.3.4", "box.localdomain"), ["bogus-tld"]);
    assert_eq!(reasons("1.2.3.4", ""), ["empty-name"]);
    assert_eq!(class("1.2.3.4", "MAIL.Example.COM."), Class::Named);
    assert_eq!(class("1.2.3.4", "mail.example.com"), Class::Named);
}

#[test]
fn trusted_suffixes_on_label_boundaries() {
    let cl = Classifier::new(None, vec!["Google.com.".into(), ".example.net".into(), "".into()]);
    let ip: IpAddr = "1.2.3.4".parse().unwrap();
    assert_eq!(cl.classify(ip, "dsl-1-2-3-4.google.com").reasons, [Reason::TrustedSuffix]);
    assert_eq!(cl.classify(ip, "google.com").class, Class::Named);
    assert_eq!(cl.classify(ip, "dsl-1-2-3-4.notgoogle.com").class, Class::Dynamic);
    assert_eq!(cl.classify(ip, "pool-1-2-3-4.EXAMPLE.net.").class, Class::Named);
}

const SAMPLE: &str = "\
# comment
dynamic  ^[a-z]+-\\d+-\\d+\\.isp\\.example$
named    \\.partner\\.example$
/^static-[0-9-]+\\.biz\\.example$/   OK
!/\\./   REJECT no dots
if /\\.cable\\.example$/
/^cm-/   554 5.7.1 cable modem
/^cx-/   reject
endif
/\\.gen\\.example$/ generic
";

#[test]
fn rules_native_and_pcre() {
    let rules = Rules::parse("/etc/gatekeeper/my rules.txt", SAMPLE).unwrap();
    assert_eq!(rules.len(), 7);
    let cl = Classifier::new(Some(rules), vec![]);
    let ip: IpAddr = "1.2.3.4".parse().unwrap();
    let check = |name: &str| {
        let c = cl.classify(ip, name);
        (c.class, c.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","))
    };
    assert_eq!(check("abc-1-2.ISP.example"), (Class::Dynamic, "rule:my_rules.txt:2".into()));
    assert_eq!(check("dsl-1-2-3-4.partner.example"), (Class::Named, "rule:my_rules.txt:3".into()));
    assert_eq!(check("static-1-2-3-4.biz.example"), (Class::Named, "rule:my_rules.txt:4".into()));
    assert_eq!(check("nodots"), (Class::Dynamic, "rule:my_rules.txt:5".into()));
    assert_eq!(check("cm-1.cable.example"), (Class::Dynamic, "rule:my_rules.txt:7".into()));
    assert_eq!(check("cx-1.cable.example"), (Class::Dynamic, "rule:my_rules.txt:8".into()));
    // Outside the if block the cm- rule does not apply: heuristics decide.
    assert_eq!(check("cm-9.other.example.org"), (Class::Named, "token:cm".into()));
    assert_eq!(check("x.gen.example"), (Class::Generic, "rule:my_rules.txt:10".into()));
}

#[test]
fn pcre_flags_and_delimiters() {
    let r = Rules::parse("t", "/^ABC/i OK\n#x\n|a/b| REJECT\n/^q/A DUNNO\n").unwrap();
    // `i` makes the pattern case-sensitive: names are lowercased, so ABC never matches.
    assert_eq!(r.first_match("abc.example"), None);
    assert_eq!(r.first_match("xa/b"), Some((Class::Dynamic, 3)));
    assert_eq!(r.first_match("qq"), Some((Class::Named, 4)));
    let r = Rules::parse("t", "/a\\/b/ REJECT\n/multi/\n  OK\n").unwrap();
    assert_eq!(r.first_match("xa/b"), Some((Class::Dynamic, 1)));
    assert_eq!(r.first_match("multi"), Some((Class::Named, 2)));
}

#[test]
fn bad_rules_name_every_line_and_load_nothing() {
    let text =
        "dynamic\n/ok/ OK\n/(?<=x)y/ REJECT\n/z/ WARN hmm\nbogus foo\n/unclosed REJECT\n/a/q OK\nendif\nif /x/\n";
    let Err(Error::BadRules { path, errors }) = Rules::parse("r.pcre", text) else { panic!("expected BadRules") };
    assert_eq!(path, "r.pcre");
    let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 3, 4, 5, 6, 7, 8, 9], "{errors:?}");
    assert!(errors[2].message.contains("WARN"), "{errors:?}");
    let msg = Error::BadRules { path, errors }.to_string();
    assert!(msg.starts_with("r.pcre: 8 bad line(s), no rules loaded"), "{msg}");
}

#[test]
fn sample_pcre_file_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/rdns/sample-generic.pcre");
    let rules = load_rules(path).unwrap();
    assert!(rules.len() >= 10);
    let cl = Classifier::new(Some(rules), vec![]);
    let c = cl.classify("77.1.2.3".parse().unwrap(), "dynamic-077-001-002-003.77.1.pool.telefonica.de");
    assert_eq!(c.class, Class::Dynamic);
    assert!(c.reasons[0].to_string().starts_with("rule:sample-generic.pcre:"), "{c:?}");
    assert!(matches!(load_rules("/nonexistent/rules"), Err(Error::Io { .. })));
}

#[test]
fn classify_lines_text_json_and_bad_lines() {
    let input = "# header\n\n192.0.2.7 c-192-0-2-7.hsd1.ca.example.net.\nbogus name.example\n2001:db8::25 mx.example.org # ok\n192.0.2.8\n192.0.2.9 a b\n";
    let mut out = Vec::new();
    let mut diag = Vec::new();
    let r = classify_lines_with(&Classifier::default(), input.as_bytes(), &mut out, &mut diag, false);
    assert!(matches!(r, Err(Error::ClassifyInput { bad: 3, first_line: 4 })), "{r:?}");
    assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 c-192-0-2-7.hsd1.ca.example.net. dynamic ip-embedded:dashed,token:hsd\n2001:db8::25 mx.example.org named mail-token:mx\n"
        );
    let diag = String::from_utf8(diag).unwrap();
    assert!(
        diag.starts_with("input line 4: \"bogus\" is not an IPv4 or IPv6 address\ninput line 6: hostname missing"),
        "{diag}"
    );
    assert!(diag.contains("input line 7: unexpected field \"b\""), "{diag}");

    let mut out = Vec::new();
    classify_lines_with(
        &Classifier::default(),
        "192.0.2.1 www.example.com\n".as_bytes(),
        &mut out,
        std::io::sink(),
        true,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"ip": "192.0.2.1", "hostname": "www.example.com", "class": "named", "reasons": []})
    );
    let mut out = Vec::new();
    classify_lines_with(
        &Classifier::default(),
        "192.0.2.1 dsl-192-0-2-1.example.com\n".as_bytes(),
        &mut out,
        std::io::sink(),
        true,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["class"], "dynamic");
    assert_eq!(v["reasons"], serde_json::json!(["ip-embedded:dashed", "token:dsl"]));
}

#[test]
fn class_round_trips() {
    for c in Class::ALL {
        assert_eq!(c.to_string().parse::<Class>().unwrap(), c);
        assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
    }
    assert!("Dynamic".parse::<Class>().is_ok());
    assert!("bad".parse::<Class>().is_err());
}
