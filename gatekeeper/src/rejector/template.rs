//! Reason texts: a template rendered with hostile input made harmless, and
//! reply lines cut to what one line may hold.
use super::SessionInfo;
use crate::config::{Part, Template};

/// Longest `{ptr}`: a DNS name's own limit; anything longer is junk.
pub const MAX_PTR_LEN: usize = 253;
/// Longest reply line including its CRLF (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;
/// What `{ptr}` says when reverse DNS gave no name.
pub const NO_NAME: &str = "no name";

/// A reverse DNS name as a reply may carry it. The name comes from
/// whoever runs the source's reverse zone, so it can hold anything: CR/LF
/// (a forged second reply line), `<`/`>` (which mail software reads as an
/// address), control and 8-bit bytes. Each such character becomes `?`
/// (so the reader sees that something was there), and the name is cut at
/// [`MAX_PTR_LEN`].
pub fn sanitize_ptr(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    let clean: String = name
        .chars()
        .take(MAX_PTR_LEN)
        .map(|c| if c.is_ascii_graphic() && c != '<' && c != '>' { c } else { '?' })
        .collect();
    if clean.is_empty() {
        NO_NAME.into()
    } else {
        clean
    }
}

/// The reason text of a session: the template with its placeholders
/// filled, then " - see <url>" when a url is set and the template does not
/// place it itself.
pub fn render(template: &Template, info: &SessionInfo, url: Option<&str>) -> String {
    let mut out = String::new();
    for part in template.parts() {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Ip => out.push_str(&info.peer.to_string()),
            Part::Reason => out.push_str(info.refusal.as_str()),
            Part::Ptr => out.push_str(&info.ptr.as_deref().map_or_else(|| NO_NAME.into(), sanitize_ptr)),
            Part::Url => out.push_str(url.unwrap_or_default()),
        }
    }
    if let Some(url) = url.filter(|_| !template.uses_url()) {
        out.push_str(" - see ");
        out.push_str(url);
    }
    out
}

/// `prefix text` as one reply line (without its CRLF): anything but
/// printable ASCII becomes `?` (the last guard against a forged line,
/// whatever the inputs), and a line too long for
/// [`MAX_REPLY_LINE`] is cut and ends in "...".
pub fn reply_line(prefix: &str, text: &str) -> String {
    let max = MAX_REPLY_LINE - 2;
    let mut line: String = prefix
        .chars()
        .chain(std::iter::once(' '))
        .chain(text.chars())
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let line_len = line.len();
    if line_len > max {
        // Every character is ASCII now, so any byte index is a boundary.
        line.truncate(max - 3);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_template, RejectSettings};
    use crate::domain::{Protocol, Refusal};

    fn info(refusal: Refusal, ptr: Option<&str>) -> SessionInfo {
        SessionInfo {
            peer: "198.51.100.7".parse().unwrap(),
            local: "192.0.2.1:25".parse().unwrap(),
            protocol: Protocol::Smtp,
            refusal,
            ptr: ptr.map(str::to_string),
        }
    }

    fn tpl(s: &str) -> Template {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_read_well() {
        let s = RejectSettings::default();
        let t = |r, ptr| render(&s.template(r), &info(r, ptr), None);
        assert_eq!(
            t(Refusal::NoPtr, None),
            "no reverse DNS (PTR) for 198.51.100.7; give the sending host a PTR record that resolves back to it"
        );
        assert_eq!(
            t(Refusal::FcrdnsFail, Some("mail.example.net.")),
            "reverse DNS of 198.51.100.7 (mail.example.net) does not resolve back to 198.51.100.7"
        );
        assert_eq!(
            t(Refusal::Dynamic, Some("dsl-7.pool.example.net")),
            "198.51.100.7 (dsl-7.pool.example.net) looks like a dynamic/end-user address; send through your provider's mail relay"
        );
        assert!(t(Refusal::Generic, None).contains("(no name)"));
        assert_eq!(t(Refusal::DenyRange, None), "mail from 198.51.100.7 is refused by local policy");
        for r in Refusal::ALL {
            assert_eq!(s.template(r).as_str(), default_template(r));
        }
    }

    #[test]
    fn placeholders_and_url_footer() {
        let i = info(Refusal::Generic, Some("host"));
        let t = tpl("{reason}: {ip} {ptr} {{literal}}");
        assert_eq!(render(&t, &i, None), "generic: 198.51.100.7 host {literal}");
        assert_eq!(
            render(&t, &i, Some("https://x.example/p")),
            "generic: 198.51.100.7 host {literal} - see https://x.example/p"
        );
        let t = tpl("refused, details at {url}");
        assert_eq!(
            render(&t, &i, Some("https://x.example/p")),
            "refused, details at https://x.example/p",
            "no second url"
        );
    }

    #[test]
    fn hostile_ptr_is_defused() {
        let i = info(Refusal::Dynamic, Some("evil\r\n250 ok <root@x>\0\u{e9}. tab\t"));
        let text = render(&tpl("[{ptr}]"), &i, None);
        assert_eq!(text, "[evil??250?ok??root@x???.?tab?]");
        let long = "a".repeat(1000);
        assert_eq!(sanitize_ptr(&long).len(), MAX_PTR_LEN);
        assert_eq!(sanitize_ptr("."), NO_NAME);
        assert_eq!(sanitize_ptr(""), NO_NAME);
    }

    #[test]
    fn reply_lines_fit_and_stay_one_line() {
        let line = reply_line("550 5.7.1", &"x".repeat(2000));
        assert_eq!(line.len(), MAX_REPLY_LINE - 2);
        assert!(line.starts_with("550 5.7.1 xxx") && line.ends_with("..."));
        assert_eq!(reply_line("550 5.7.1", "a\r\nb\u{fc}"), "550 5.7.1 a??b?");
        let exact = "y".repeat(MAX_REPLY_LINE - 2 - 10);
        assert_eq!(reply_line("550 5.7.1", &exact), format!("550 5.7.1 {exact}"), "a line that fits is kept whole");
        // The longest inputs still fit: a 253-character name twice, a 200-character url.
        let i = info(Refusal::FcrdnsFail, Some(&"n".repeat(300)));
        let t = tpl("{ptr} {ptr} {ip} {reason}");
        assert!(reply_line("550 5.7.1", &render(&t, &i, Some(&"u".repeat(200)))).len() <= MAX_REPLY_LINE - 2);
    }
}
