//! POP3 and IMAP: a refusal is the greeting, then the connection closes.
//! The clients are mail readers, which show a greeting's text to the user.
use super::template::reply_line;
use crate::domain::Protocol;

/// POP3: `-ERR` in the greeting refuses the session; `SYS/PERM` (RFC 3206,
/// a response code of RFC 2449 §8) says retrying will not help.
pub fn pop3_refusal(text: &str) -> String {
    reply_line("-ERR [SYS/PERM]", text)
}

/// IMAP: an untagged `BYE` greeting refuses the connection (RFC 3501
/// §7.1.5), with the `UNAVAILABLE` response code of RFC 5530.
pub fn imap_refusal(text: &str) -> String {
    reply_line("* BYE [UNAVAILABLE]", text)
}

/// The reply to a connection from a source that is not refused (it
/// should never have been steered here): a temporary failure, so the
/// client retries and then reaches the real server.
pub fn misrouted(protocol: Protocol, hostname: &str) -> String {
    match protocol {
        Protocol::Smtp => reply_line("421 4.3.2", &format!("{hostname} try again later")),
        Protocol::Pop3 => reply_line("-ERR [SYS/TEMP]", "try again later"),
        Protocol::Imap => reply_line("* BYE [UNAVAILABLE]", "try again later"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_that_refuse() {
        assert_eq!(pop3_refusal("no PTR"), "-ERR [SYS/PERM] no PTR");
        assert_eq!(imap_refusal("no PTR"), "* BYE [UNAVAILABLE] no PTR");
        assert_eq!(misrouted(Protocol::Smtp, "mx.example.net"), "421 4.3.2 mx.example.net try again later");
        assert!(misrouted(Protocol::Pop3, "h").starts_with("-ERR [SYS/TEMP]"));
        assert!(misrouted(Protocol::Imap, "h").starts_with("* BYE"));
    }
}
