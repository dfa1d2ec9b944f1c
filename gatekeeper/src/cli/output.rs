//! Plain-text rendering helpers shared by the commands: aligned tables,
//! expiry times, optional values.
use std::{fmt::Display, time::Duration};

use gatekeeper::{lists::format_duration_short, time::unix_now};

/// Prints rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = width[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `25,587`.
pub fn join<T: Display>(v: &[T]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

/// "never", "expired" or "in 5m".
pub fn expires(at: Option<i64>) -> String {
    match at {
        None => "never".into(),
        Some(t) => {
            let left = t - unix_now();
            if left <= 0 {
                "expired".into()
            } else {
                format!("in {}", format_duration_short(Duration::from_secs(left as u64)))
            }
        }
    }
}

/// The value, or `-`.
pub fn opt<T: Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |v| v.to_string())
}

/// Prints `v` as pretty JSON.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A listing: JSON with `json`, else `empty` when there is nothing, else a
/// table of `cells` under `header`.
pub fn print_list<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    empty: &str,
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("{empty}");
        return Ok(());
    }
    table(header, &rows.iter().map(cells).collect::<Vec<_>>());
    Ok(())
}
