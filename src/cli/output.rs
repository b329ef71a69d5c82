//! Printing results: compact JSON lines for scripts, aligned tables for people.

use std::io::Write;

use super::Fatal;

/// Prints one value as one line of JSON.
pub(super) fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<(), Fatal> {
    let text = serde_json::to_string(value).map_err(|e| Fatal(format!("encoding JSON: {e}")))?;
    line(&text)
}

/// Prints a line; a closed stdout (`| head`) ends the command quietly.
pub(super) fn line(text: &str) -> Result<(), Fatal> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Fatal(format!("writing to stdout: {e}"))),
    }
}

/// A table with a header row; columns padded to their widest cell.
pub(super) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(super) fn print(&self) -> Result<(), Fatal> {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut text = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            line(text.trim_end())?;
        }
        Ok(())
    }
}

/// `key: value` lines with the keys aligned.
pub(super) fn fields(rows: &[(&str, String)]) -> Result<(), Fatal> {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        line(&format!("{k:<w$}  {v}"))?;
    }
    Ok(())
}

/// RFC 3339 for people and scripts alike.
pub(super) fn time(t: &time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub(super) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a base64 argument, naming it on error.
pub(super) fn unb64(what: &str, text: &str) -> Result<Vec<u8>, Fatal> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| {
            Fatal(format!(
                "{what} is not valid base64 (standard alphabet, with padding)"
            ))
        })
}
