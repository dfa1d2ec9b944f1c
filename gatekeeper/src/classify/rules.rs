//! Operator rules: `class regex` lines or a Postfix pcre table, compiled
//! into one regex set; the first match wins.
#[allow(unused_imports)]
use super::*;

/// Compiled operator rules. First match wins.
#[derive(Clone, Debug)]
pub struct Rules {
    /// File name shown in `rule:<file>:<line>` reasons.
    pub(super) file: Arc<str>,
    pub(super) set: RegexSet,
    pub(super) rules: Vec<Rule>,
    /// `if` conditions.
    pub(super) conds: RegexSet,
}

#[derive(Clone, Debug)]
pub(super) struct Rule {
    class: Class,
    line: usize,
    negate: bool,
    /// Enclosing `if` blocks: (index into `conds`, negated).
    conds: Vec<(usize, bool)>,
}

impl Rules {
    /// Number of rules (not counting `if` lines).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching `name` (lowercase, no trailing dot): its class
    /// and line.
    pub fn first_match(&self, name: &str) -> Option<(Class, usize)> {
        if self.rules.is_empty() {
            return None;
        }
        let hits = self.set.matches(name);
        let mut cond_hits = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if hits.matched(i) == rule.negate {
                continue;
            }
            let conds_ok = rule.conds.iter().all(|&(c, negate)| {
                let ch = cond_hits.get_or_insert_with(|| self.conds.matches(name));
                ch.matched(c) != negate
            });
            if conds_ok {
                return Some((rule.class, rule.line));
            }
        }
        None
    }

    /// Parses rules text; `source` names it in errors (a path) and its last
    /// path component names it in reasons. See [`load_rules`].
    pub fn parse(source: &str, text: &str) -> Result<Rules> {
        let file = Path::new(source)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| source.to_string());
        let file: String = file.chars().map(|c| if c.is_whitespace() || c == ',' { '_' } else { c }).collect();

        let mut errors = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        let mut cond_patterns: Vec<String> = Vec::new();
        // Open `if` blocks: (cond index, negated, line).
        let mut stack: Vec<(usize, bool, usize)> = Vec::new();

        for (line_no, logical) in logical_lines(text) {
            let mut err = |message: String| errors.push(LineError { line: line_no, message });
            let line = logical.trim();
            if line == "endif" {
                if stack.pop().is_none() {
                    err("endif without if".into());
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("if").filter(|r| r.starts_with(char::is_whitespace)) {
                match parse_pcre(rest.trim_start()) {
                    Ok((negate, pattern, tail)) => {
                        if !tail.trim().is_empty() {
                            err(format!("unexpected text after the if pattern: {:?}", tail.trim()));
                        } else if let Err(e) = check_regex(&pattern) {
                            err(e);
                        } else {
                            cond_patterns.push(pattern);
                            stack.push((cond_patterns.len() - 1, negate, line_no));
                        }
                    }
                    Err(e) => err(e),
                }
                continue;
            }
            let first = line.chars().next().unwrap_or(' ');
            let parsed = if first == '!' || !first.is_alphanumeric() {
                parse_pcre(line).and_then(|(negate, pattern, tail)| {
                    let class = pcre_action(tail.trim())?;
                    Ok((negate, pattern, class))
                })
            } else {
                let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
                match word.parse::<Class>() {
                    Ok(class) if !rest.trim().is_empty() => Ok((false, format!("(?i){}", rest.trim()), class)),
                    Ok(_) => Err(format!("{word}: the regular expression is missing")),
                    Err(_) => Err(format!(
                        "expected `dynamic|generic|named REGEX` or a Postfix pcre line `/REGEX/flags ACTION`, found {word:?}"
                    )),
                }
            };
            match parsed.and_then(|(negate, pattern, class)| check_regex(&pattern).map(|_| (negate, pattern, class))) {
                Ok((negate, pattern, class)) => {
                    patterns.push(pattern);
                    let conds = stack.iter().map(|&(c, n, _)| (c, n)).collect();
                    rules.push(Rule { class, line: line_no, negate, conds });
                }
                Err(e) => err(e),
            }
        }
        for &(_, _, line) in &stack {
            errors.push(LineError { line, message: "if without endif".into() });
        }
        errors.sort_by_key(|e| e.line);
        if !errors.is_empty() {
            return Err(Error::BadRules { path: source.to_string(), errors });
        }
        let build = |p: &[String]| {
            RegexSetBuilder::new(p).size_limit(512 << 20).dfa_size_limit(64 << 20).build().map_err(|e| {
                Error::BadRules {
                    path: source.to_string(),
                    errors: vec![LineError { line: 0, message: format!("the rules together are too large: {e}") }],
                }
            })
        };
        Ok(Rules { file: file.into(), set: build(&patterns)?, rules, conds: build(&cond_patterns)? })
    }
}

/// Loads operator rules from `path`. One rule a line, first match wins,
/// operator rules beat the heuristics; blank lines and lines whose first
/// non-blank character is `#` are ignored; a line starting with whitespace
/// continues the previous line (as in Postfix tables).
///
/// Native lines: `dynamic REGEX`, `generic REGEX` or `named REGEX` — the
/// rest of the line is the regular expression (Rust `regex` syntax,
/// case-insensitive, unanchored: write `^...$` to anchor).
///
/// Postfix pcre_table(5) lines, so existing generic-rDNS lists load as they
/// are:
/// - `/REGEX/flags ACTION [text]` and `!/REGEX/flags ACTION` (match when the
///   pattern does not match); any non-alphanumeric, non-space delimiter;
///   flags `i` (toggles case-insensitivity, on by default as in Postfix),
///   `m`, `s`, `x`, `U`, `A` (anchored), `E` and `X` (no effect);
/// - `if /REGEX/flags` / `if !/REGEX/flags` ... `endif` blocks, nested;
/// - ACTION `REJECT`, `DEFER`, `DEFER_IF_PERMIT`, `DISCARD`, `4NN`/`5NN`
///   codes → `dynamic`; `OK`, `DUNNO`, `PERMIT` → `named`; the class words
///   `dynamic`, `generic`, `named` are accepted too. Any other action
///   (`WARN`, `PREPEND`, `HOLD`, `FILTER`, ...) is an error.
///
/// Regular expressions are PCRE-like but compiled with Rust's `regex`:
/// look-around and back-references are errors. Names are lowercased before
/// matching and have no trailing dot.
///
/// Every bad line is reported (file and line number) and then nothing is
/// loaded: [`Error::BadRules`].
pub fn load_rules(path: impl AsRef<Path>) -> Result<Rules> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading rules {}", path.display()), e))?;
    Rules::parse(&path.display().to_string(), &text)
}

/// Logical lines with the number of their first physical line; comments and
/// blank lines dropped, continuation lines joined.
pub(super) fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut continuable = false;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if raw.starts_with(char::is_whitespace) && continuable {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(trimmed);
            }
            continue;
        }
        out.push((i + 1, trimmed.to_string()));
        continuable = true;
    }
    out
}

/// `[!]/pattern/flags rest` → (negated, regex with inline flags, rest).
pub(super) fn parse_pcre(s: &str) -> std::result::Result<(bool, String, &str), String> {
    let (negate, s) = match s.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let mut chars = s.char_indices();
    let delim = match chars.next() {
        Some((_, c)) if !c.is_alphanumeric() && !c.is_whitespace() && c != '\\' => c,
        _ => return Err(format!("expected a pattern like /REGEX/, found {s:?}")),
    };
    let mut end = None;
    let mut escaped = false;
    for (i, c) in chars.by_ref() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            end = Some(i);
            break;
        }
    }
    let Some(end) = end else {
        return Err(format!("no closing {delim} after the pattern"));
    };
    let body = &s[delim.len_utf8()..end];
    let after = &s[end + delim.len_utf8()..];
    let flags_len = after.find(char::is_whitespace).unwrap_or(after.len());
    let (flags, rest) = after.split_at(flags_len);
    let (mut icase, mut multi, mut dotall, mut ext, mut ungreedy, mut anchored) =
        (true, false, false, false, false, false);
    for f in flags.chars() {
        match f {
            'i' => icase = !icase,
            'm' => multi = true,
            's' => dotall = true,
            'x' => ext = true,
            'U' => ungreedy = true,
            'A' => anchored = true,
            'E' | 'X' => {}
            other => return Err(format!("unknown pattern flag {other:?} (Postfix pcre flags: i m s x A E U X)")),
        }
    }
    let mut inline = String::new();
    for (on, c) in [(icase, 'i'), (multi, 'm'), (dotall, 's'), (ext, 'x'), (ungreedy, 'U')] {
        if on {
            inline.push(c);
        }
    }
    let mut pattern = if inline.is_empty() { String::new() } else { format!("(?{inline})") };
    if anchored {
        pattern.push_str(&format!("^(?:{body})"));
    } else {
        pattern.push_str(body);
    }
    Ok((negate, pattern, rest))
}

pub(super) fn pcre_action(action: &str) -> std::result::Result<Class, String> {
    let word = action.split_whitespace().next().unwrap_or("");
    if word.is_empty() {
        return Err("the action is missing (e.g. REJECT or OK)".into());
    }
    let upper = word.to_ascii_uppercase();
    let code = word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit());
    match upper.as_str() {
        "REJECT" | "DEFER" | "DEFER_IF_PERMIT" | "DISCARD" => Ok(Class::Dynamic),
        _ if code && (word.starts_with('4') || word.starts_with('5')) => Ok(Class::Dynamic),
        "OK" | "DUNNO" | "PERMIT" => Ok(Class::Named),
        "DYNAMIC" => Ok(Class::Dynamic),
        "GENERIC" => Ok(Class::Generic),
        "NAMED" => Ok(Class::Named),
        _ => Err(format!(
            "action {word:?} has no meaning for gatekeeper (REJECT, DEFER, DISCARD, 4NN, 5NN → dynamic; OK, DUNNO → named; or dynamic/generic/named)"
        )),
    }
}

pub(super) fn check_regex(pattern: &str) -> std::result::Result<(), String> {
    RegexBuilder::new(pattern)
        .size_limit(16 << 20)
        .build()
        .map(|_: Regex| ())
        .map_err(|e| format!("bad regular expression: {}", e.to_string().lines().last().unwrap_or("").trim()))
}
