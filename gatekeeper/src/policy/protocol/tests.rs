use std::net::IpAddr;

use tokio::io::BufReader;

use super::*;

/// A DATA request as Postfix 3.7 sends it (attribute set from a live
/// request; values ours).
const DATA: &str = "request=smtpd_access_policy\nprotocol_state=DATA\nprotocol_name=ESMTP\nclient_address=192.0.2.66\n\
client_name=unknown\nreverse_client_name=unknown\nclient_port=40112\nhelo_name=vm\nsender=alice@example.test\n\
recipient=\nrecipient_count=2\nqueue_id=8CC3F99808D\ninstance=3a1b.6573a2f0.8d1e3.0\nsize=0\netrn_domain=\nstress=\n\
sasl_method=PLAIN\nsasl_username=alice\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n\
encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\npolicy_context=\nserver_address=192.0.2.25\n\
server_port=587\n\n";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
}

fn read_all(input: &[u8]) -> Vec<Result<Option<PolicyRequest>, String>> {
    block_on(async {
        let mut r = BufReader::with_capacity(7, input); // small buffer: lines span fills
        let mut out = Vec::new();
        loop {
            match read_request(&mut r).await {
                Ok(None) => {
                    out.push(Ok(None));
                    return out;
                }
                Ok(Some(req)) => out.push(Ok(Some(req))),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    })
}

fn one(input: &[u8]) -> Result<PolicyRequest, String> {
    read_all(input).remove(0).map(|r| r.expect("a request"))
}

#[test]
fn reads_a_postfix_request() {
    let req = one(DATA.as_bytes()).unwrap();
    assert_eq!(req.request(), "smtpd_access_policy");
    assert_eq!(req.protocol_state(), Some("DATA"));
    assert_eq!(req.client_address(), Some("192.0.2.66".parse::<IpAddr>().unwrap()));
    assert_eq!(req.sender(), Some("alice@example.test"));
    assert_eq!(req.recipient(), None, "empty is absent");
    assert_eq!(req.recipient_count(), Some(2));
    assert_eq!(req.sasl_username(), Some("alice"));
    assert_eq!(req.queue_id(), Some("8CC3F99808D"));
    assert_eq!(req.instance(), Some("3a1b.6573a2f0.8d1e3.0"));
    assert_eq!(req.get("server_port"), Some("587"));
    assert_eq!(req.attrs().len(), 28);
}

#[test]
fn several_requests_then_a_clean_end() {
    let input = format!("{DATA}{}", DATA.replace("protocol_state=DATA", "protocol_state=RCPT"));
    let all = read_all(input.as_bytes());
    assert_eq!(all.len(), 3);
    assert_eq!(all[1].as_ref().unwrap().as_ref().unwrap().protocol_state(), Some("RCPT"));
    assert_eq!(all[2], Ok(None));
    assert_eq!(read_all(b""), vec![Ok(None)]);
}

#[test]
fn values_keep_equals_signs_and_mapped_addresses_are_ipv4() {
    let req = one(b"request=smtpd_access_policy\nclient_address=::ffff:192.0.2.7\nsender=a=b@x.test\nrecipient=<>\n\n")
        .unwrap();
    assert_eq!(req.client_address(), Some("192.0.2.7".parse::<IpAddr>().unwrap()));
    assert_eq!(req.sender(), Some("a=b@x.test"));
    let v6 = one(b"request=smtpd_access_policy\nclient_address=2001:db8::25\n\n").unwrap();
    assert_eq!(v6.client_address(), Some("2001:db8::25".parse::<IpAddr>().unwrap()));
    // CRLF is tolerated.
    let crlf = one(b"request=smtpd_access_policy\r\nsasl_username=bob\r\n\r\n").unwrap();
    assert_eq!(crlf.sasl_username(), Some("bob"));
}

#[test]
fn bad_requests_are_typed_errors() {
    let long = format!("request=smtpd_access_policy\nsender={}\n\n", "a".repeat(MAX_LINE));
    let many: String = (0..=MAX_ATTRIBUTES).map(|i| format!("x{i}=1\n")).collect();
    let many = format!("request=smtpd_access_policy\n{many}\n");
    // 20 lines of ~3.9 KiB each: every line fits, the request does not.
    let big: String = (0..20).map(|i| format!("y{i}={}\n", "b".repeat(MAX_LINE - 10))).collect();
    let big = format!("request=smtpd_access_policy\n{big}\n");
    for (input, expect) in [
        (b"request=smtpd_access_policy\nclient_address=192.0.2.66\n".to_vec(), "connection closed after 2 line(s)"),
        (b"request=smtpd_access_policy\nclient_addr".to_vec(), "connection closed after 1 line(s)"),
        (b"client_address=192.0.2.66\n\n".to_vec(), "request=None, expected smtpd_access_policy"),
        (b"request=junk\n\n".to_vec(), "request=Some(\"junk\")"),
        (b"GET / HTTP/1.0\n\n".to_vec(), "line 1: expected name=value, got \"GET / HTTP/1.0\""),
        (b"\n".to_vec(), "line 1: expected name=value"),
        (b"=x\n\n".to_vec(), "line 1: empty attribute name"),
        (b"request=smtpd_access_policy\nsender=a\nsender=b\n\n".to_vec(), "line 3: attribute \"sender\" given twice"),
        (b"request=smtpd_access_policy\nsender=\xff\xfe\n\n".to_vec(), "line 2: not valid UTF-8"),
        (
            b"request=smtpd_access_policy\nclient_address=not-an-ip\n\n".to_vec(),
            "client_address=\"not-an-ip\": not an IP",
        ),
        (b"request=smtpd_access_policy\nrecipient_count=-1\n\n".to_vec(), "recipient_count=\"-1\": not a count"),
        (long.into_bytes(), "line 2: longer than 4096 bytes"),
        (many.into_bytes(), "more than 128 attributes"),
        (big.into_bytes(), "more than 65536 bytes"),
    ] {
        let got = one(&input).expect_err(&String::from_utf8_lossy(&input[..input.len().min(60)]));
        assert!(got.contains(expect), "{got:?} does not contain {expect:?}");
    }
}

#[test]
fn an_endless_line_is_refused_without_buffering_it() {
    // A reader that never ends: the cap must stop it.
    struct Endless;
    impl tokio::io::AsyncRead for Endless {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            buf.put_slice(&vec![b'a'; buf.remaining()]);
            std::task::Poll::Ready(Ok(()))
        }
    }
    let err = block_on(read_request(&mut BufReader::new(Endless))).unwrap_err();
    assert!(matches!(err, ProtocolError::LineTooLong { line: 1, max: MAX_LINE }), "{err}");
}

#[test]
fn from_attrs_validates_like_the_reader() {
    let ok = PolicyRequest::from_attrs([("request", "smtpd_access_policy"), ("client_address", "192.0.2.1")]).unwrap();
    assert_eq!(ok.client_address(), Some("192.0.2.1".parse::<IpAddr>().unwrap()));
    assert!(PolicyRequest::from_attrs([("client_address", "192.0.2.1")]).is_err());
    assert!(PolicyRequest::from_attrs([("request", "smtpd_access_policy"), ("", "x")]).is_err());
}

#[test]
fn replies() {
    assert_eq!(format_reply(&Reply::Dunno), "action=DUNNO\n\n");
    assert_eq!(
        format_reply(&Reply::Reject(
            "5.7.1 account suspended: sent to 11 undeliverable recipients within an hour; contact abuse@isp.example".into()
        )),
        "action=REJECT 5.7.1 account suspended: sent to 11 undeliverable recipients within an hour; contact abuse@isp.example\n\n"
    );
    // A missing or wrong-class status code gets the default one.
    assert_eq!(format_reply(&Reply::Reject("go away".into())), "action=REJECT 5.7.1 go away\n\n");
    assert_eq!(format_reply(&Reply::Reject("4.7.1 wrong class".into())), "action=REJECT 5.7.1 4.7.1 wrong class\n\n");
    assert_eq!(format_reply(&Reply::DeferIfPermit("later".into())), "action=DEFER_IF_PERMIT 4.7.1 later\n\n");
    assert_eq!(format_reply(&Reply::DeferIfPermit("4.7.0 later".into())), "action=DEFER_IF_PERMIT 4.7.0 later\n\n");
}

#[test]
fn reply_texts_are_one_bounded_line() {
    let hostile = format!("5.7.1 a\nb\r\n\naction=OK\u{0}{}", "é".repeat(2000));
    let out = format_reply(&Reply::Reject(hostile));
    assert!(out.ends_with("\n\n"));
    let body = &out[..out.len() - 2];
    assert!(!body.contains('\n') && !body.contains('\r') && !body.contains('\0'), "{body:?}");
    assert!(body.starts_with("action=REJECT 5.7.1 a b action=OK"), "{body:?}");
    assert!(body.len() <= "action=REJECT ".len() + MAX_REPLY_TEXT, "{}", body.len());
    // Cut at a character boundary (the String would not exist otherwise),
    // and an empty text still carries its code.
    assert_eq!(format_reply(&Reply::DeferIfPermit("\n\n".into())), "action=DEFER_IF_PERMIT 4.7.1\n\n");
    assert_eq!(Reply::DeferIfPermit(String::new()).kind(), "DEFER_IF_PERMIT");
}
