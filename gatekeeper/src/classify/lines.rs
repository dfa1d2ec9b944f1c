//! The `classify` command's line I/O: `IP HOSTNAME` lines in, one
//! classification per line out (text or JSON), bad lines reported and
//! counted.
#[allow(unused_imports)]
use super::*;

#[derive(Serialize)]
pub(super) struct OutputLine<'a> {
    ip: IpAddr,
    hostname: &'a str,
    class: Class,
    reasons: &'a [Reason],
}

/// Reads `IP HOSTNAME` lines from `input` and writes one line per name to
/// `out`: `IP HOSTNAME CLASS reason,reason` (`-` when there are no reasons),
/// or with `json` one object per line: `{"ip":..,"hostname":..,"class":..,
/// "reasons":[..]}`. Blank lines and lines starting with `#` are skipped; a
/// trailing `# comment` after the hostname is allowed.
///
/// Bad lines (an address that does not parse, a missing or malformed
/// hostname, extra fields, invalid UTF-8) are **reported on stderr as they
/// come** (`input line N: ...`) and skipped; the other lines are still
/// classified, and at the end the call returns [`Error::ClassifyInput`]
/// (count and first bad line) so the command exits non-zero. Output is
/// flushed before returning. Errors writing `out` stop at once.
pub fn classify_lines(classifier: &Classifier, input: impl BufRead, out: impl Write, json: bool) -> Result<()> {
    classify_lines_with(classifier, input, out, std::io::stderr().lock(), json)
}

/// [`classify_lines`] with bad-line reports going to `diag` instead of stderr.
pub fn classify_lines_with(
    classifier: &Classifier,
    mut input: impl BufRead,
    mut out: impl Write,
    mut diag: impl Write,
    json: bool,
) -> Result<()> {
    let mut raw = Vec::new();
    let mut reasons = Vec::new();
    let mut text = String::new();
    let mut line_no = 0usize;
    let mut bad = 0usize;
    let mut first_bad = 0usize;
    let write_err = |e: std::io::Error| Error::io("writing classifications", e);
    loop {
        raw.clear();
        let n = input.read_until(b'\n', &mut raw).map_err(|e| Error::io("reading input", e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        match parse_input_line(&raw) {
            Ok(None) => {}
            Ok(Some((ip, host))) => {
                let class = classifier.classify_into(ip, host, &mut reasons);
                if json {
                    let line = OutputLine { ip, hostname: host, class, reasons: &reasons };
                    serde_json::to_writer(&mut out, &line).map_err(|e| write_err(e.into()))?;
                    out.write_all(b"\n").map_err(write_err)?;
                } else {
                    text.clear();
                    for (i, r) in reasons.iter().enumerate() {
                        if i > 0 {
                            text.push(',');
                        }
                        use std::fmt::Write as _;
                        let _ = write!(text, "{r}");
                    }
                    if text.is_empty() {
                        text.push('-');
                    }
                    writeln!(out, "{ip} {host} {class} {text}").map_err(write_err)?;
                }
            }
            Err(message) => {
                bad += 1;
                if first_bad == 0 {
                    first_bad = line_no;
                }
                // Diagnostics are best effort: a closed stderr must not stop the run.
                let _ = writeln!(diag, "input line {line_no}: {message}");
            }
        }
    }
    out.flush().map_err(write_err)?;
    if bad > 0 {
        return Err(Error::ClassifyInput { bad, first_line: first_bad });
    }
    Ok(())
}

/// `Ok(None)` for a blank or comment line.
pub(super) fn parse_input_line(raw: &[u8]) -> std::result::Result<Option<(IpAddr, &str)>, String> {
    let line = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_whitespace();
    let ip_s = fields.next().unwrap_or("");
    let ip: IpAddr = ip_s.parse().map_err(|_| format!("{ip_s:?} is not an IPv4 or IPv6 address"))?;
    let host = fields.next().ok_or_else(|| format!("hostname missing after {ip_s} (expected `IP HOSTNAME`)"))?;
    if host.starts_with('#') {
        return Err(format!("hostname missing after {ip_s} (expected `IP HOSTNAME`)"));
    }
    if let Some(extra) = fields.next() {
        if !extra.starts_with('#') {
            return Err(format!("unexpected field {extra:?} after the hostname (expected `IP HOSTNAME`)"));
        }
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty()
        || name.len() > 253
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        || name.split('.').any(|l| l.is_empty() || l.len() > 63)
    {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok(Some((ip, host)))
}
