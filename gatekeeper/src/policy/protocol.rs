//! The Postfix policy delegation protocol (SMTPD_POLICY_README): a request
//! is `name=value` lines ended by an empty line; the reply is
//! `action=...` and an empty line. Reading is bounded: a request over
//! [`MAX_REQUEST_BYTES`], [`MAX_ATTRIBUTES`] or a line over [`MAX_LINE`] is
//! an error, and the server closes the connection without answering
//! (Postfix then applies its `default_action`).
use std::{collections::BTreeMap, net::IpAddr};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Largest request, in bytes (all lines and newlines).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most attributes in one request (Postfix 3.7 sends about 40).
pub const MAX_ATTRIBUTES: usize = 128;
/// Longest line, without its newline.
pub const MAX_LINE: usize = 4096;
/// Longest reply text (after the action word).
pub const MAX_REPLY_TEXT: usize = 512;

/// A request that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("policy request: read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("policy request line {line}: longer than {max} bytes")]
    LineTooLong { line: usize, max: usize },
    #[error("policy request: more than {max} bytes")]
    TooLarge { max: usize },
    #[error("policy request: more than {max} attributes")]
    TooManyAttributes { max: usize },
    #[error("policy request line {line}: not valid UTF-8")]
    NotUtf8 { line: usize },
    #[error("policy request line {line}: expected name=value, got {excerpt:?}")]
    NoEquals { line: usize, excerpt: String },
    #[error("policy request line {line}: empty attribute name")]
    EmptyName { line: usize },
    #[error("policy request line {line}: attribute {name:?} given twice")]
    Duplicate { line: usize, name: String },
    #[error("policy request: connection closed after {lines} line(s), before the empty line ending the request")]
    Truncated { lines: usize },
    #[error("policy request: request={found:?}, expected smtpd_access_policy")]
    WrongRequest { found: Option<String> },
    #[error("policy request: attribute {name}={value:?}: {reason}")]
    BadValue { name: &'static str, value: String, reason: &'static str },
}

/// One policy request. The attributes used here are parsed when read;
/// every attribute is kept (bounded by [`MAX_ATTRIBUTES`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRequest {
    attrs: BTreeMap<String, String>,
    client_address: Option<IpAddr>,
    recipient_count: Option<u32>,
}

impl PolicyRequest {
    /// A request from attributes (validated as [`read_request`] does).
    pub fn from_attrs<'a>(attrs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ProtocolError> {
        let mut map = BTreeMap::new();
        for (i, (name, value)) in attrs.into_iter().enumerate() {
            if map.len() >= MAX_ATTRIBUTES {
                return Err(ProtocolError::TooManyAttributes { max: MAX_ATTRIBUTES });
            }
            if name.is_empty() {
                return Err(ProtocolError::EmptyName { line: i + 1 });
            }
            if map.insert(name.to_string(), value.to_string()).is_some() {
                return Err(ProtocolError::Duplicate { line: i + 1, name: excerpt(name) });
            }
        }
        Self::validate(map)
    }

    fn validate(attrs: BTreeMap<String, String>) -> Result<Self, ProtocolError> {
        match attrs.get("request").map(String::as_str) {
            Some("smtpd_access_policy") => {}
            other => return Err(ProtocolError::WrongRequest { found: other.map(excerpt) }),
        }
        let client_address =
            match attrs.get("client_address").map(String::as_str) {
                None | Some("") => None,
                Some(v) => Some(v.parse::<IpAddr>().map(|ip| ip.to_canonical()).map_err(|_| {
                    ProtocolError::BadValue { name: "client_address", value: excerpt(v), reason: "not an IP address" }
                })?),
            };
        let recipient_count = match attrs.get("recipient_count").map(String::as_str) {
            None | Some("") => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| ProtocolError::BadValue {
                name: "recipient_count",
                value: excerpt(v),
                reason: "not a count",
            })?),
        };
        Ok(PolicyRequest { attrs, client_address, recipient_count })
    }

    /// An attribute; None when absent or empty (Postfix sends unknown
    /// values as empty).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// Every attribute as sent.
    pub fn attrs(&self) -> &BTreeMap<String, String> {
        &self.attrs
    }

    /// Always `smtpd_access_policy`.
    pub fn request(&self) -> &str {
        self.get("request").unwrap_or_default()
    }

    /// `RCPT`, `DATA`, `END-OF-MESSAGE`, ...
    pub fn protocol_state(&self) -> Option<&str> {
        self.get("protocol_state")
    }

    /// The SMTP client (`::ffff:a.b.c.d` as IPv4).
    pub fn client_address(&self) -> Option<IpAddr> {
        self.client_address
    }

    /// The envelope sender (empty for the null sender: None).
    pub fn sender(&self) -> Option<&str> {
        self.get("sender")
    }

    pub fn recipient(&self) -> Option<&str> {
        self.get("recipient")
    }

    /// Accepted recipients (non-zero at DATA and END-OF-MESSAGE).
    pub fn recipient_count(&self) -> Option<u32> {
        self.recipient_count
    }

    /// The authenticated account.
    pub fn sasl_username(&self) -> Option<&str> {
        self.get("sasl_username")
    }

    pub fn queue_id(&self) -> Option<&str> {
        self.get("queue_id")
    }

    /// The same for every request of one message.
    pub fn instance(&self) -> Option<&str> {
        self.get("instance")
    }
}

/// Cut, printable form of client text for error messages.
fn excerpt(s: &str) -> String {
    sanitize(s, 64)
}

/// Reads one line (without its newline) into `buf`, at most [`MAX_LINE`]
/// bytes and `budget` bytes in all. Ok(false) at end of input before any
/// byte of the line.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    line: usize,
    budget: &mut usize,
) -> Result<bool, ProtocolError> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return if buf.is_empty() { Ok(false) } else { Err(ProtocolError::Truncated { lines: line - 1 }) };
        }
        let (take, done) = match memchr_nl(chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if take > *budget {
            return Err(ProtocolError::TooLarge { max: MAX_REQUEST_BYTES });
        }
        *budget -= take;
        let content = if done { &chunk[..take - 1] } else { chunk };
        if buf.len() + content.len() > MAX_LINE {
            return Err(ProtocolError::LineTooLong { line, max: MAX_LINE });
        }
        buf.extend_from_slice(content);
        r.consume(take);
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(true);
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Reads the next request. `Ok(None)`: the client closed the connection
/// between requests. Any error leaves the stream at an unknown position:
/// close it.
pub async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<PolicyRequest>, ProtocolError> {
    let mut attrs = BTreeMap::new();
    let mut buf = Vec::with_capacity(256);
    let mut budget = MAX_REQUEST_BYTES;
    let mut line = 0usize;
    loop {
        line += 1;
        if !read_line(r, &mut buf, line, &mut budget).await? {
            if line == 1 {
                return Ok(None);
            }
            return Err(ProtocolError::Truncated { lines: line - 1 });
        }
        if buf.is_empty() {
            if attrs.is_empty() {
                // A stray empty line: Postfix never sends one.
                return Err(ProtocolError::NoEquals { line, excerpt: String::new() });
            }
            return PolicyRequest::validate(attrs).map(Some);
        }
        let text = std::str::from_utf8(&buf).map_err(|_| ProtocolError::NotUtf8 { line })?;
        let (name, value) =
            text.split_once('=').ok_or_else(|| ProtocolError::NoEquals { line, excerpt: excerpt(text) })?;
        if name.is_empty() {
            return Err(ProtocolError::EmptyName { line });
        }
        if attrs.len() >= MAX_ATTRIBUTES {
            return Err(ProtocolError::TooManyAttributes { max: MAX_ATTRIBUTES });
        }
        if attrs.insert(name.to_string(), value.to_string()).is_some() {
            return Err(ProtocolError::Duplicate { line, name: excerpt(name) });
        }
    }
}

/// What the policy service answers. Never OK or PERMIT: the service sits
/// first in `smtpd_recipient_restrictions` and must open no relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// No opinion: the next restriction decides.
    Dunno,
    /// Permanent refusal; the text should start with an enhanced status code
    /// (`5.7.1 account suspended: ...`), else `5.7.1` is put in front.
    Reject(String),
    /// Temporary refusal if the rest would permit; text as for `Reject`,
    /// default code `4.7.1`.
    DeferIfPermit(String),
}

impl Reply {
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Dunno => "DUNNO",
            Reply::Reject(_) => "REJECT",
            Reply::DeferIfPermit(_) => "DEFER_IF_PERMIT",
        }
    }
}

/// `s` on one line: control characters as spaces, runs of space folded,
/// trimmed, cut to `max` bytes.
fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out.truncate(out.trim_end().len());
    out
}

/// Whether `s` starts with an enhanced status code of class `class`
/// (`5.7.1 `, `4.2.0 `).
fn has_status(s: &str, class: char) -> bool {
    let Some((code, _)) = s.split_once(' ') else { return false };
    let mut parts = code.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
    };
    parts.next() == Some(class.encode_utf8(&mut [0; 4]))
        && ok(parts.next(), 3)
        && ok(parts.next(), 3)
        && parts.next().is_none()
}

/// The reply as sent: `action=...\n\n`. Texts are single-line, without
/// control characters, at most [`MAX_REPLY_TEXT`] bytes.
pub fn format_reply(reply: &Reply) -> String {
    let text = |t: &str, class: char, default: &str| {
        let t = sanitize(t, MAX_REPLY_TEXT);
        let t = if has_status(&t, class) { t } else { sanitize(&format!("{default} {t}"), MAX_REPLY_TEXT) };
        t
    };
    match reply {
        Reply::Dunno => "action=DUNNO\n\n".to_string(),
        Reply::Reject(t) => format!("action=REJECT {}\n\n", text(t, '5', "5.7.1")),
        Reply::DeferIfPermit(t) => format!("action=DEFER_IF_PERMIT {}\n\n", text(t, '4', "4.7.1")),
    }
}

#[cfg(test)]
mod tests;
