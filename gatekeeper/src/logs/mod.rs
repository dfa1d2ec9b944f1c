//! Log-line vocabulary shared by the parsers and the scorers.
//!
//! Placeholder holding only the event types of the plan (no parsing) so the
//! scorers compile; the parsers' module replaces this file.
use std::net::IpAddr;

/// What the line says the client talked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Smtp,
    Imap,
    Pop3,
    Ssh,
    Other,
}

/// How a failure line counts towards its session (see the dedup rule in
/// `pipeline::abuse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// This many further attempts.
    Add(u32),
    /// The session has seen at least this many attempts in all.
    AtLeast(u32),
}

/// What a delivery attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    Sent,
    Deferred,
    Bounced,
    Other,
}

/// One parsed log event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client connected.
    Connect { client: IpAddr, service: Service },
    /// Failed authentication. `session`: a key unique to one connection,
    /// None for lines that are one attempt each. `user`: display text only.
    AuthFail { client: IpAddr, service: Service, session: Option<String>, count: Count, user: Option<String> },
    /// An RCPT refused by the MTA.
    RcptReject {
        qid: Option<String>,
        client: IpAddr,
        account: Option<String>,
        sender: String,
        rcpt: String,
        code: u16,
        dsn: Option<String>,
    },
    /// A message accepted from a client.
    Submitted { qid: String, client: IpAddr, account: Option<String> },
    /// A delivery attempt result.
    Delivery { qid: String, rcpt: String, dsn: Option<String>, status: DeliveryStatus },
    /// The queue entry is gone.
    Removed { qid: String },
}
