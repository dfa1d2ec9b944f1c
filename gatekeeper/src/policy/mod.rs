//! The Postfix policy service (pure parts and the listener): the
//! delegation protocol, the connection loop, and smarthost transmission
//! limits. The agent wires a [`server::PolicyDecider`] to its state.
pub mod limits;
pub mod protocol;
pub mod server;

pub use limits::{subject_of, Decision, Limits, SendLimits, SendLimitsConfig, Subject};
pub use protocol::{format_reply, read_request, PolicyRequest, ProtocolError, Reply};
pub use server::{bind_socket, serve, serve_with, PolicyCounters, PolicyDecider, ServeOptions};
