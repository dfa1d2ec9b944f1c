//! The rejector: answers a refused source's connection with the reason,
//! so the sending MTA records it (a bounce or log line) and its admin can
//! fix, say, a missing PTR, instead of retrying into a silent drop for
//! days.
//!
//! The protocol engines (`smtp`, `mail`) and the reason texts
//! (`template`) are pure; [`serve_session`] drives one connection with its
//! timeouts; [`Rejector`] accepts connections, bounded by a session cap
//! and a per-source rate. How connections get here (the XDP gate's action
//! bits, the sk_lookup program, the lease) is the datapath's part: see
//! `gatekeeper_common::reject`.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::RejectSettings;
pub use crate::domain::Protocol;
use crate::domain::Refusal;

pub mod mail;
mod server;
pub mod smtp;
pub mod template;

pub use server::{OnQuiet, Rejector, RejectorHandle, RejectorStats, Resolve, MAX_TRACKED_SOURCES};

/// How long a last word (a timeout's 421, the shutdown) may take.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Who is answered, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub peer: IpAddr,
    /// The accepted socket's local address: the destination the source
    /// dialled (sk_lookup keeps it), whose port picks the protocol.
    pub local: SocketAddr,
    pub protocol: Protocol,
    pub refusal: Refusal,
    /// The source's reverse DNS name, if it has one (unsanitized).
    pub ptr: Option<String>,
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ended {
    /// The client said QUIT.
    Quit,
    /// The client sent nothing for `idle_timeout`.
    Idle,
    /// The session reached `session_timeout`.
    Timeout,
    /// Too many errors, commands or bytes.
    Limit,
    /// Closed without QUIT: the client hung up, or a greeting-only
    /// protocol (POP3, IMAP) said its line.
    Closed,
    /// A read or write failed.
    Error,
}

/// What happened in a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionReport {
    pub commands: u32,
    pub rcpts_rejected: u32,
    /// The line carrying the reason (the SMTP 550 reply or 554 greeting,
    /// the POP3/IMAP greeting), as sent or as it would have been.
    pub reply: String,
    pub ended: Ended,
}

/// Serves one refused connection: greets, answers until QUIT, a limit or a
/// timeout (`idle_timeout` per read, `session_timeout` for everything,
/// writes included: a client that stops reading cannot hold a session),
/// then closes.
pub async fn serve_session<S>(mut stream: S, info: &SessionInfo, settings: &RejectSettings) -> SessionReport
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let text = template::render(&settings.template(info.refusal), info, settings.url.as_deref());
    let deadline = Instant::now() + settings.session_timeout;
    let (report, ended) = match info.protocol {
        Protocol::Pop3 | Protocol::Imap => {
            let line =
                if info.protocol == Protocol::Pop3 { mail::pop3_refusal(&text) } else { mail::imap_refusal(&text) };
            let ended = say(&mut stream, &line, deadline).await.err().unwrap_or(Ended::Closed);
            (SessionReport { commands: 0, rcpts_rejected: 0, reply: line, ended }, ended)
        }
        Protocol::Smtp => {
            let mut smtp = smtp::Smtp::new(settings.mode, &settings.hostname, &text);
            let ended = converse(&mut stream, &mut smtp, settings.idle_timeout, deadline).await;
            let report = SessionReport {
                commands: smtp.commands,
                rcpts_rejected: smtp.rcpts_rejected,
                reply: smtp.reason().to_string(),
                ended,
            };
            (report, ended)
        }
    };
    if ended != Ended::Error {
        let _ = timeout(LAST_WORD, stream.shutdown()).await;
    }
    report
}

async fn converse<S>(stream: &mut S, smtp: &mut smtp::Smtp, idle: Duration, deadline: Instant) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(ended) = say(stream, smtp.greeting(), deadline).await {
        return ended;
    }
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    loop {
        let n = match timeout_at((Instant::now() + idle).min(deadline), stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Ended::Closed,
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Ended::Error,
            Err(_) => {
                let ended = if Instant::now() >= deadline { Ended::Timeout } else { Ended::Idle };
                let _ = say(stream, &smtp.timeout_reply(), Instant::now() + LAST_WORD).await;
                return ended;
            }
        };
        out.clear();
        let end = smtp.feed(&buf[..n], &mut out);
        match timeout_at(deadline, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ended::Error,
            Err(_) => return Ended::Timeout,
        }
        if let Some(ended) = end {
            return ended;
        }
    }
}

/// Writes one line and its CRLF by `deadline`.
async fn say<S: AsyncWrite + Unpin>(stream: &mut S, line: &str, deadline: Instant) -> Result<(), Ended> {
    let bytes = [line.as_bytes(), b"\r\n"].concat();
    match timeout_at(deadline, stream.write_all(&bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::Error),
        Err(_) => Err(Ended::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;
    use crate::domain::RejectMode;

    fn info(protocol: Protocol) -> SessionInfo {
        SessionInfo {
            peer: "2001:db8::7".parse().unwrap(),
            local: "[2001:db8::1]:25".parse().unwrap(),
            protocol,
            refusal: Refusal::Dynamic,
            ptr: Some("host-7.dyn.example.net".into()),
        }
    }

    fn settings() -> RejectSettings {
        RejectSettings { hostname: "mx.example.net".into(), ..RejectSettings::default() }
    }

    /// Runs a session whose client sends `input`, then reads until the
    /// server closes; the report and the lines the client read.
    async fn exchange(protocol: Protocol, settings: &RejectSettings, input: &[u8]) -> (SessionReport, Vec<String>) {
        let (ours, mut theirs) = duplex(64 * 1024);
        let info = info(protocol);
        let client = async move {
            let _ = theirs.write_all(input).await; // a greeting-only server may be gone
            let mut got = String::new();
            theirs.read_to_string(&mut got).await.unwrap();
            got
        };
        let (report, got) = tokio::join!(serve_session(ours, &info, settings), client);
        (report, got.split_terminator("\r\n").map(str::to_string).collect())
    }

    const DYNAMIC: &str = "2001:db8::7 (host-7.dyn.example.net) looks like a dynamic/end-user address; send through your provider's mail relay";

    #[tokio::test]
    async fn smtp_refuses_at_rcpt_with_the_reason() {
        let input = b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n";
        let (report, lines) = exchange(Protocol::Smtp, &settings(), input).await;
        assert_eq!(lines[0], "220 mx.example.net ESMTP");
        assert_eq!(lines[5], format!("550 5.7.1 {DYNAMIC}"));
        assert_eq!(lines.last().unwrap(), "221 2.0.0 Bye");
        let want = SessionReport { commands: 4, rcpts_rejected: 1, reply: lines[5].clone(), ended: Ended::Quit };
        assert_eq!(report, want);
    }

    #[tokio::test]
    async fn banner_mode_and_url_footer() {
        let s =
            RejectSettings { mode: RejectMode::Banner, url: Some("https://example.net/policy".into()), ..settings() };
        let (report, lines) = exchange(Protocol::Smtp, &s, b"EHLO x\r\nQUIT\r\n").await;
        let greeting = format!("554 5.7.1 mx.example.net {DYNAMIC} - see https://example.net/policy");
        assert_eq!(
            lines,
            [greeting.as_str(), "503 5.5.1 bad sequence of commands: no service here, only QUIT", "221 2.0.0 Bye"]
        );
        assert_eq!((report.reply, report.ended), (greeting, Ended::Quit));
    }

    #[tokio::test]
    async fn pop3_and_imap_refuse_in_the_greeting_and_close() {
        let (report, lines) = exchange(Protocol::Pop3, &settings(), b"USER x\r\n").await;
        assert_eq!(lines, [format!("-ERR [SYS/PERM] {DYNAMIC}")]);
        assert_eq!(report.ended, Ended::Closed);
        let (report, lines) = exchange(Protocol::Imap, &settings(), b"").await;
        assert_eq!(lines, [format!("* BYE [UNAVAILABLE] {DYNAMIC}")]);
        assert_eq!((report.commands, report.ended), (0, Ended::Closed));
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_ends_the_session() {
        let (ours, theirs) = duplex(4096);
        drop(theirs);
        let report = serve_session(ours, &info(Protocol::Smtp), &settings()).await;
        assert_eq!(report.ended, Ended::Error, "the greeting cannot be written");
        let (ours, mut theirs) = duplex(4096);
        let client = async move {
            theirs.write_all(b"EHLO x\r\n").await.unwrap();
            theirs.shutdown().await.unwrap();
            let mut got = String::new();
            theirs.read_to_string(&mut got).await.unwrap();
            got
        };
        let (info, s) = (info(Protocol::Smtp), settings());
        let (report, got) = tokio::join!(serve_session(ours, &info, &s), client);
        assert_eq!((report.commands, report.ended), (1, Ended::Closed));
        assert!(got.ends_with("250 ENHANCEDSTATUSCODES\r\n"), "{got}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_told_and_closed() {
        let start = Instant::now();
        let (report, lines) = exchange(Protocol::Smtp, &settings(), b"HELO x\r\n").await;
        assert_eq!(
            lines,
            ["220 mx.example.net ESMTP", "250 mx.example.net", "421 4.4.2 mx.example.net timeout, closing"]
        );
        assert_eq!(report.ended, Ended::Idle);
        assert_eq!(start.elapsed().as_secs(), 30, "idle_timeout, on tokio's paused clock");
    }

    #[tokio::test(start_paused = true)]
    async fn no_session_outlasts_session_timeout() {
        // A client that keeps talking, just within the idle timeout.
        let (ours, theirs) = duplex(4096);
        let (mut rx, mut tx) = tokio::io::split(theirs);
        let talker = async move {
            while tx.write_all(b"NOOP\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        };
        let reader = async move {
            let mut got = String::new();
            let _ = rx.read_to_string(&mut got).await;
            got
        };
        let start = Instant::now();
        let info = info(Protocol::Smtp);
        let s = settings();
        let report = async { (serve_session(ours, &info, &s).await, start.elapsed()) };
        let ((report, took), got, ()) = tokio::join!(report, reader, talker);
        assert_eq!(report.ended, Ended::Timeout);
        assert_eq!(took.as_secs(), 120, "session_timeout, on tokio's paused clock");
        assert!(got.ends_with("421 4.4.2 mx.example.net timeout, closing\r\n"), "{got}");

        // A client that stops reading cannot hold a session either.
        let (ours, mut theirs) = duplex(64);
        let writer = async move {
            let _ = theirs.write_all(&b"NOOP\r\n".repeat(40)).await;
            std::future::pending::<()>().await
        };
        let report = tokio::select! {
            r = serve_session(ours, &info, &s) => r,
            () = writer => unreachable!(),
        };
        assert_eq!(report.ended, Ended::Timeout);
    }
}
