//! The SMTP conversation of a refusal, without I/O: bytes in, replies out.
//!
//! Mode `rcpt` plays a server that takes the envelope and refuses every
//! recipient with `550 5.7.1` and the reason: every client records a
//! recipient's rejection in its bounce or log, while some skip a server
//! whose greeting is 5xx and try the next MX, losing the reason. Mode
//! `banner` refuses in the greeting (RFC 5321 §3.1) and then waits for
//! QUIT. The client is a refused source, possibly hostile: input is bytes
//! (never assumed UTF-8), every buffer is bounded, and a session that
//! errs or talks too much is closed.
use super::template::{reply_line, MAX_REPLY_LINE};
use super::Ended;
use crate::domain::RejectMode;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE: usize = 512;
/// Error replies after which the session is closed.
pub const MAX_ERRORS: u32 = 20;
/// Commands after which the session is closed.
pub const MAX_COMMANDS: u32 = 50;
/// Bytes a session may send in all.
pub const MAX_SESSION_BYTES: usize = 64 * 1024;

/// Where the envelope is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Greeted, waiting for EHLO/HELO.
    Greeted,
    /// Said hello; no transaction.
    Hello,
    /// MAIL FROM taken; recipients are refused.
    Mail,
}

/// One session's state.
#[derive(Debug)]
pub struct Smtp {
    mode: RejectMode,
    hostname: String,
    greeting: String,
    /// The line carrying the reason: the 550 reply, or the 554 greeting.
    reason: String,
    stage: Stage,
    /// The command line being read (at most `MAX_LINE - 1` bytes: its LF
    /// is not kept).
    line: Vec<u8>,
    /// Skipping the rest of a line that was too long.
    discarding: bool,
    bytes: usize,
    ended: Option<Ended>,
    pub commands: u32,
    pub errors: u32,
    pub rcpts_rejected: u32,
}

impl Smtp {
    /// A session refusing with reason `text`, greeting as `hostname`.
    pub fn new(mode: RejectMode, hostname: &str, text: &str) -> Smtp {
        let (greeting, reason) = match mode {
            RejectMode::Rcpt => (format!("220 {hostname} ESMTP"), reply_line("550 5.7.1", text)),
            RejectMode::Banner => {
                let banner = reply_line(&format!("554 5.7.1 {hostname}"), text);
                (banner.clone(), banner)
            }
        };
        Smtp {
            mode,
            hostname: hostname.to_string(),
            greeting,
            reason,
            stage: Stage::Greeted,
            line: Vec::with_capacity(MAX_LINE),
            discarding: false,
            bytes: 0,
            ended: None,
            commands: 0,
            errors: 0,
            rcpts_rejected: 0,
        }
    }

    /// The greeting line (without CRLF).
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The line that carries the reason (without CRLF).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// What to say when closing on a timeout (RFC 5321 §4.5.3.2).
    pub fn timeout_reply(&self) -> String {
        format!("421 4.4.2 {} timeout, closing", self.hostname)
    }

    /// Takes bytes from the client and appends the replies (CRLF-ended) to
    /// `out`, one per complete command, in order (pipelining). `Some` once
    /// the session is over: write `out`, then close.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<Ended> {
        for &b in input {
            if self.ended.is_some() {
                break;
            }
            self.bytes += 1;
            if self.bytes > MAX_SESSION_BYTES {
                self.close(out, Ended::Limit);
            } else if b == b'\n' {
                if !std::mem::take(&mut self.discarding) {
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.command(&line, out);
                    line.clear();
                    self.line = line;
                }
            } else if self.discarding {
                // The rest of a line that was too long.
            } else if self.line.len() >= MAX_LINE - 1 {
                self.line.clear();
                self.discarding = true;
                self.error(out, "500 5.5.2 line too long");
            } else {
                self.line.push(b);
            }
        }
        self.ended
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>) {
        self.commands += 1;
        if self.commands > MAX_COMMANDS {
            return self.close(out, Ended::Limit);
        }
        let line = line.trim_ascii();
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], line[i + 1..].trim_ascii()),
            None => (line, &[][..]),
        };
        let verb = verb.to_ascii_uppercase();
        if verb == b"QUIT" {
            reply(out, "221 2.0.0 Bye");
            self.ended = Some(Ended::Quit);
            return;
        }
        if self.mode == RejectMode::Banner {
            return self.error(out, "503 5.5.1 bad sequence of commands: no service here, only QUIT");
        }
        match (verb.as_slice(), self.stage) {
            (b"EHLO" | b"HELO", _) if arg.is_empty() => self.error(out, "501 5.5.4 a domain or address is needed"),
            (b"EHLO", _) => {
                self.stage = Stage::Hello;
                reply(out, &format!("250-{}\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES", self.hostname));
            }
            (b"HELO", _) => {
                self.stage = Stage::Hello;
                reply(out, &format!("250 {}", self.hostname));
            }
            (b"MAIL", Stage::Greeted) => self.error(out, "503 5.5.1 send EHLO or HELO first"),
            (b"MAIL", Stage::Mail) => self.error(out, "503 5.5.1 nested MAIL command"),
            (b"MAIL", _) if !starts_with_ignore_case(arg, b"FROM:") => {
                self.error(out, "501 5.5.4 syntax: MAIL FROM:<address>")
            }
            (b"MAIL", _) => {
                self.stage = Stage::Mail;
                reply(out, "250 2.1.0 Ok");
            }
            (b"RCPT", Stage::Greeted | Stage::Hello) => self.error(out, "503 5.5.1 need MAIL before RCPT"),
            (b"RCPT", _) if !starts_with_ignore_case(arg, b"TO:") => {
                self.error(out, "501 5.5.4 syntax: RCPT TO:<address>")
            }
            (b"RCPT", _) => {
                self.rcpts_rejected += 1;
                let reason = std::mem::take(&mut self.reason);
                reply(out, &reason);
                self.reason = reason;
            }
            (b"RSET", _) => {
                self.stage = self.stage.min_hello();
                reply(out, "250 2.0.0 Ok");
            }
            (b"NOOP", _) => reply(out, "250 2.0.0 Ok"),
            (b"DATA" | b"BDAT", _) => self.error(out, "503 5.5.1 no valid recipients"),
            _ => self.error(out, "503 5.5.1 command not accepted here"),
        }
    }

    /// An error reply; too many close the session.
    fn error(&mut self, out: &mut Vec<u8>, text: &str) {
        reply(out, text);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.close(out, Ended::Limit);
        }
    }

    fn close(&mut self, out: &mut Vec<u8>, ended: Ended) {
        reply(out, &format!("421 4.7.0 {} closing", self.hostname));
        self.ended = Some(ended);
    }
}

impl Stage {
    /// RSET ends a transaction but not the hello.
    fn min_hello(self) -> Stage {
        if self == Stage::Mail {
            Stage::Hello
        } else {
            self
        }
    }
}

fn reply(out: &mut Vec<u8>, line: &str) {
    debug_assert!(line.split("\r\n").all(|l| l.len() <= MAX_REPLY_LINE - 2));
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "no reverse DNS (PTR) for 198.51.100.7";

    fn session(mode: RejectMode) -> Smtp {
        Smtp::new(mode, "mx.example.net", TEXT)
    }

    /// Feeds `input` in one chunk; the replies as lines, and the end.
    fn talk(s: &mut Smtp, input: &[u8]) -> (Vec<String>, Option<Ended>) {
        let mut out = Vec::new();
        let end = s.feed(input, &mut out);
        let text = String::from_utf8(out).expect("replies are ASCII");
        assert!(text.is_empty() || text.ends_with("\r\n"));
        (text.split_terminator("\r\n").map(str::to_string).collect(), end)
    }

    fn codes(lines: &[String]) -> Vec<&str> {
        lines.iter().map(|l| &l[..l.len().min(9)]).collect()
    }

    #[test]
    fn a_whole_transaction_is_refused_at_rcpt() {
        let mut s = session(RejectMode::Rcpt);
        assert_eq!(s.greeting(), "220 mx.example.net ESMTP");
        let (r, end) = talk(&mut s, b"EHLO client.example\r\n");
        assert_eq!(r, ["250-mx.example.net", "250-PIPELINING", "250 ENHANCEDSTATUSCODES"]);
        assert_eq!(end, None);
        let (r, _) = talk(&mut s, b"MAIL FROM:<a@client.example> SIZE=100\r\n");
        assert_eq!(r, ["250 2.1.0 Ok"]);
        let (r, _) = talk(&mut s, b"RCPT TO:<b@example.net>\r\n");
        assert_eq!(r, [format!("550 5.7.1 {TEXT}")]);
        let (r, _) = talk(&mut s, b"rcpt to: <c@example.net>\r\nDATA\r\nRSET\r\nNOOP\r\n");
        assert_eq!(codes(&r), ["550 5.7.1", "503 5.5.1", "250 2.0.0", "250 2.0.0"]);
        let (r, end) = talk(&mut s, b"QUIT\r\n");
        assert_eq!((r, end), (vec!["221 2.0.0 Bye".to_string()], Some(Ended::Quit)));
        assert_eq!((s.commands, s.rcpts_rejected, s.errors), (8, 2, 1));
    }

    #[test]
    fn pipelined_commands_are_answered_in_order_with_bare_lf() {
        let mut s = session(RejectMode::Rcpt);
        let (r, end) =
            talk(&mut s, b"helo c\nmail from:<>\r\nRCPT TO:<x@y>\nRCPT TO:<z@y>\r\nBDAT 10 LAST\r\nquit\r\nNOOP\r\n");
        assert_eq!(codes(&r), ["250 mx.ex", "250 2.1.0", "550 5.7.1", "550 5.7.1", "503 5.5.1", "221 2.0.0"]);
        assert_eq!(end, Some(Ended::Quit), "nothing after QUIT is answered");
        assert_eq!(s.rcpts_rejected, 2);
    }

    #[test]
    fn commands_split_across_reads() {
        let mut s = session(RejectMode::Rcpt);
        assert_eq!(talk(&mut s, b"EH").0.len(), 0);
        assert_eq!(talk(&mut s, b"LO x\r").0.len(), 0);
        assert_eq!(talk(&mut s, b"\n").0.len(), 3);
    }

    #[test]
    fn out_of_sequence_and_unknown_commands() {
        let mut s = session(RejectMode::Rcpt);
        let (r, _) = talk(
            &mut s,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\nEHLO\r\nHELO x\r\nRCPT TO:<a@b>\r\nMAIL TO:<a@b>\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nRCPT <a@b>\r\nSTARTTLS\r\nAUTH PLAIN AAAA\r\nVRFY root\r\nXYZZY\r\n\r\nRSET\r\nRCPT TO:<a@b>\r\n",
        );
        assert_eq!(
            codes(&r),
            [
                "503 5.5.1",
                "503 5.5.1",
                "501 5.5.4",
                "250 mx.ex",
                "503 5.5.1",
                "501 5.5.4",
                "250 2.1.0",
                "503 5.5.1",
                "501 5.5.4",
                "503 5.5.1",
                "503 5.5.1",
                "503 5.5.1",
                "503 5.5.1",
                "503 5.5.1",
                "250 2.0.0",
                "503 5.5.1",
            ]
        );
        assert_eq!(s.rcpts_rejected, 0);
    }

    #[test]
    fn quit_ends_the_session_at_any_point() {
        for before in [&b""[..], b"EHLO x\r\n", b"EHLO x\r\nMAIL FROM:<>\r\n", b"garbage\r\n", b"\xff\xfe\r\n"] {
            for mode in [RejectMode::Rcpt, RejectMode::Banner] {
                let mut s = session(mode);
                let mut input = before.to_vec();
                input.extend_from_slice(b"QuIt\r\n");
                let (r, end) = talk(&mut s, &input);
                assert_eq!(r.last().unwrap(), "221 2.0.0 Bye");
                assert_eq!(end, Some(Ended::Quit));
                assert_eq!(talk(&mut s, b"NOOP\r\n").0.len(), 0, "closed stays closed");
            }
        }
    }

    #[test]
    fn banner_mode_refuses_in_the_greeting() {
        let mut s = session(RejectMode::Banner);
        assert_eq!(s.greeting(), format!("554 5.7.1 mx.example.net {TEXT}"));
        assert_eq!(s.reason(), s.greeting());
        let (r, end) = talk(&mut s, b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b>\r\n");
        assert_eq!(codes(&r), ["503 5.5.1"; 3]);
        assert_eq!((end, s.rcpts_rejected), (None, 0));
        assert_eq!(talk(&mut s, b"QUIT\r\n").1, Some(Ended::Quit));
    }

    #[test]
    fn long_lines_are_refused_and_skipped_without_buffering() {
        let mut s = session(RejectMode::Rcpt);
        let mut input = b"HELO ".to_vec();
        input.resize(5000, b'a');
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (r, _) = talk(&mut s, &input);
        assert_eq!(codes(&r), ["500 5.5.2", "250 2.0.0"], "one reply for the long line, then the next command");
        assert!(s.line.capacity() <= MAX_LINE);
        // The longest line that fits is taken.
        let mut input = b"HELO ".to_vec();
        input.resize(MAX_LINE - 1, b'b');
        input.push(b'\n');
        assert_eq!(codes(&talk(&mut s, &input).0), ["250 mx.ex"]);
    }

    #[test]
    fn junk_never_panics_and_errors_close_the_session() {
        let mut s = session(RejectMode::Rcpt);
        let junk: Vec<u8> = (0..=255u8).cycle().take(30_000).collect();
        let (r, end) = talk(&mut s, &junk);
        assert!(r.iter().all(|l| l.is_ascii()));
        assert_eq!(end, Some(Ended::Limit));
        assert_eq!(r.last().unwrap(), "421 4.7.0 mx.example.net closing");
        assert_eq!(s.errors, MAX_ERRORS);

        let mut s = session(RejectMode::Rcpt);
        let (r, end) = talk(&mut s, &b"NOOP\r\n".repeat(60));
        assert_eq!(r.len(), MAX_COMMANDS as usize + 1, "50 answers, then 421");
        assert_eq!((r.last().unwrap().as_str(), end), ("421 4.7.0 mx.example.net closing", Some(Ended::Limit)));
    }

    #[test]
    fn a_session_sends_a_bounded_number_of_bytes() {
        let mut s = session(RejectMode::Rcpt);
        let mut out = Vec::new();
        let mut end = None;
        // A line without end, fed in chunks: refused as too long once,
        // then skipped until the byte cap closes the session.
        for _ in 0..100 {
            end = s.feed(&[b'x'; 1000], &mut out);
            if end.is_some() {
                break;
            }
        }
        assert_eq!(end, Some(Ended::Limit));
        assert_eq!(String::from_utf8(out).unwrap(), "500 5.5.2 line too long\r\n421 4.7.0 mx.example.net closing\r\n");
        assert!(s.bytes <= MAX_SESSION_BYTES + 1);
    }
}
