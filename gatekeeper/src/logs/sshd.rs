//! OpenSSH (auth.c): `Failed <method> for [invalid user ]<user> from <ip>
//! port <n> ssh2` and `Invalid user <user> from <ip> port <n>`.
//!
//! The username is client text and may itself read `x from 203.0.113.9 port
//! 1 ssh2`, so the address and port are read from the *end* of the line.
use std::net::IpAddr;

use super::{digits_u32, ip, Count, Event, Parsed, Service};

pub(super) fn parse(ident: Option<&str>, msg: &str) -> Parsed {
    match ident {
        None => {}
        Some(id) if id == "sshd" || id.starts_with("sshd-") => {}
        Some(_) => return Parsed::Ignored,
    }
    if let Some(r) = msg.strip_prefix("Failed ") {
        return failed(r);
    }
    if let Some(r) = msg.strip_prefix("Invalid user ") {
        let Some((client, port, user)) = from_end(r) else { return Parsed::Unparsed("sshd invalid user: address") };
        return auth_fail(client, port, user, Count::AtLeast(1));
    }
    if let Some(r) = msg.strip_prefix("Connection closed by ").or_else(|| msg.strip_prefix("Connection reset by ")) {
        if let Some(r) = r.strip_suffix(" [preauth]") {
            // `… <ip> port <n> [preauth]`: the address is the last word before `port`.
            let Some((head, port)) = r.rsplit_once(" port ") else { return Parsed::Ignored };
            if digits_u32(port).is_none() {
                return Parsed::Ignored;
            }
            let a = head.rsplit(' ').next().unwrap_or(head);
            return match ip(a) {
                Some(client) => Parsed::Event(Event::Connect { client, service: Service::Ssh }),
                None => Parsed::Unparsed("sshd closed: address"),
            };
        }
    }
    Parsed::Ignored
}

/// `<method> for [invalid user ]<user> from <ip> port <n> ssh2[: <key info>]`.
fn failed(r: &str) -> Parsed {
    let Some((method, rest)) = r.split_once(" for ") else { return Parsed::Ignored };
    if method != "password" && method != "keyboard-interactive/pam" {
        return Parsed::Ignored; // publickey (clients try several keys), none, hostbased, …
    }
    let Some(rest) = rest.strip_suffix(" ssh2") else { return Parsed::Unparsed("sshd failed: suffix") };
    let Some((client, port, user)) = from_end(rest) else { return Parsed::Unparsed("sshd failed: address") };
    let user = user.strip_prefix("invalid user ").unwrap_or(user);
    auth_fail(client, port, user, Count::Add(1))
}

/// `<user> from <ip> port <n>` read from the end: (ip, port, user).
fn from_end(s: &str) -> Option<(IpAddr, &str, &str)> {
    let (head, port) = s.rsplit_once(" port ")?;
    digits_u32(port).filter(|p| *p <= 65_535)?;
    let (user, a) = head.rsplit_once(" from ")?;
    Some((ip(a)?, port, user))
}

fn auth_fail(client: IpAddr, port: &str, user: &str, count: Count) -> Parsed {
    Parsed::Event(Event::AuthFail {
        client,
        service: Service::Ssh,
        session: Some(port.to_owned()),
        count,
        user: (!user.is_empty()).then(|| user.to_owned()),
    })
}
