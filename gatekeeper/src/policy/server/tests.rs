use std::os::unix::fs::MetadataExt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Rejects mallory, defers at DATA, else no opinion.
fn decider() -> Arc<dyn PolicyDecider> {
    Arc::new(|req: &PolicyRequest| {
        if req.sasl_username() == Some("mallory") {
            Reply::Reject("5.7.1 account suspended".into())
        } else if req.protocol_state() == Some("DATA") {
            Reply::DeferIfPermit(format!("sending limit reached ({} recipients)", req.recipient_count().unwrap_or(0)))
        } else {
            Reply::Dunno
        }
    })
}

struct Server {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    counters: Arc<PolicyCounters>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(max_conns: usize, idle_timeout: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatekeeper-policy");
    let listener = bind_socket(&path, None, 0o600).unwrap();
    let counters = Arc::new(PolicyCounters::default());
    let opts = ServeOptions { max_conns, idle_timeout, counters: counters.clone() };
    let task = tokio::spawn(serve_with(listener, decider(), opts));
    Server { _dir: dir, path, counters, task }
}

fn request(state: &str, user: &str) -> String {
    format!(
        "request=smtpd_access_policy\nprotocol_state={state}\nclient_address=192.0.2.66\nsender=a@example.test\n\
recipient=b@example.test\nrecipient_count=3\nsasl_username={user}\n\n"
    )
}

/// Reads one reply (up to and including its empty line).
async fn reply(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\n\n") {
        let n = s.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&out));
        out.push(byte[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Sends `input` and expects the connection closed without a byte back.
async fn closed_without_answer(path: &Path, input: &[u8]) {
    let mut s = UnixStream::connect(path).await.unwrap();
    // The server may close before reading everything: a write error is fine.
    let _ = s.write_all(input).await;
    // Half-close: a request cut short ends at the server as end of input.
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "answered {:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn several_requests_on_one_connection() {
    let srv = start(8, Duration::from_secs(60));
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    assert_eq!(reply(&mut s).await, "action=DUNNO\n\n");
    // Two requests in one write: answered in order.
    let two = format!("{}{}", request("DATA", "alice"), request("RCPT", "mallory"));
    s.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(reply(&mut s).await, "action=DEFER_IF_PERMIT 4.7.1 sending limit reached (3 recipients)\n\n");
    assert_eq!(reply(&mut s).await, "action=REJECT 5.7.1 account suspended\n\n");
    drop(s);
    let c = srv.counters.snapshot();
    assert_eq!((c.connections, c.requests, c.bad_requests), (1, 3, 0));
    assert_eq!((c.dunno, c.defer_if_permit, c.reject), (1, 1, 1));
}

#[tokio::test]
async fn bad_requests_close_without_an_answer() {
    let srv = start(8, Duration::from_secs(60));
    closed_without_answer(&srv.path, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    closed_without_answer(
        &srv.path,
        format!("request=smtpd_access_policy\nsender={}\n\n", "a".repeat(5000)).as_bytes(),
    )
    .await;
    closed_without_answer(&srv.path, b"protocol_state=RCPT\nclient_address=192.0.2.66\n\n").await;
    closed_without_answer(&srv.path, b"request=smtpd_access_policy\nclient_address=192.0.2.999\n\n").await;
    // A good request after a bad one on the same connection is never read.
    let mut bad_then_good = b"junk\n\n".to_vec();
    bad_then_good.extend_from_slice(request("RCPT", "alice").as_bytes());
    closed_without_answer(&srv.path, &bad_then_good).await;
    // The server goes on serving.
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    assert_eq!(reply(&mut s).await, "action=DUNNO\n\n");
    let c = srv.counters.snapshot();
    assert_eq!((c.bad_requests, c.requests), (5, 1));
}

#[tokio::test]
async fn a_client_closing_between_requests_is_not_an_error() {
    let srv = start(8, Duration::from_secs(60));
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    reply(&mut s).await;
    drop(s);
    // A half-sent request is a bad one.
    closed_without_answer(&srv.path, b"request=smtpd_access_policy\nsender=a").await;
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    reply(&mut s).await;
    assert_eq!(srv.counters.snapshot().bad_requests, 1);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let srv = start(1, Duration::from_secs(60));
    let mut first = UnixStream::connect(&srv.path).await.unwrap();
    first.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    reply(&mut first).await; // now it surely holds the only slot
    closed_without_answer(&srv.path, request("RCPT", "alice").as_bytes()).await;
    assert_eq!(srv.counters.snapshot().refused_connections, 1);
    // The first connection still works; once it is gone the slot is free.
    first.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    reply(&mut first).await;
    drop(first);
    let mut served = false;
    for _ in 0..500 {
        let mut s = UnixStream::connect(&srv.path).await.unwrap();
        s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        if s.read(&mut buf).await.unwrap_or(0) > 0 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the slot was never freed");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let srv = start(8, Duration::from_millis(50));
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(request("RCPT", "alice").as_bytes()).await.unwrap();
    reply(&mut s).await;
    // Then nothing: the server closes (read_to_end returns once it has).
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(srv.counters.snapshot().idle_closed, 1);
}

#[tokio::test]
async fn bind_socket_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sock");
    drop(bind_socket(&path, None, 0o600).unwrap());
    assert!(path.exists(), "the stale socket file stays behind");
    let me = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().unwrap();
    let l = bind_socket(&path, Some(&me.name), 0o660).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o660);
    assert_eq!(m.uid(), me.uid.as_raw());
    drop(l);

    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let err = bind_socket(&file, None, 0o600).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let err = bind_socket(&dir.path().join("s2"), Some("gk-no-such-user-17"), 0o600).unwrap_err().to_string();
    assert!(err.contains("no such user"), "{err}");
    assert!(!dir.path().join("s2").exists(), "nothing created for an unknown owner");

    let err = bind_socket(&dir.path().join("missing/dir/s"), None, 0o600).unwrap_err().to_string();
    assert!(err.contains("bind"), "{err}");
}

#[test]
fn running_out_of_descriptors_is_transient_a_broken_listener_is_not() {
    assert!(transient(&std::io::Error::from_raw_os_error(libc::EMFILE)));
    assert!(transient(&std::io::Error::from_raw_os_error(libc::ECONNABORTED)));
    assert!(!transient(&std::io::Error::from_raw_os_error(libc::EBADF)));
    assert!(!transient(&std::io::Error::from_raw_os_error(libc::EINVAL)));
}
