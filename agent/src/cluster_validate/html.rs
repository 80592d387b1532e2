//! The report as an HTML page for people.

use super::{Report, Status};

/// The report as a page a person reads: every value escaped.
pub fn html(r: &Report) -> String {
    fn esc(s: &str) -> String {
        s.chars()
            .map(|c| match c {
                '&' => "&amp;".into(),
                '<' => "&lt;".into(),
                '>' => "&gt;".into(),
                '"' => "&quot;".into(),
                '\'' => "&#39;".into(),
                c => c.to_string(),
            })
            .collect()
    }
    let word = |s: Status| match s {
        Status::Pass => "pass",
        Status::Warn => "warn",
        Status::Fail => "fail",
    };
    let mut h = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Vireo cluster validation</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}.pass{background:#dfd}.warn{background:#ffd}.fail{background:#fdd}</style></head><body>\n",
    );
    h += &format!(
        "<h1>Vireo cluster validation: <span class=\"{0}\">{0}</span></h1>\n<p>Coordinator {1}, generated at {2} ms since the epoch.</p>\n",
        word(r.status),
        esc(&r.coordinator),
        r.generated_ms
    );
    h += "<table><tr><th>Check</th><th>Node</th><th>Result</th><th>Detail</th></tr>\n";
    for c in &r.checks {
        h += &format!(
            "<tr class=\"{0}\"><td>{1}</td><td>{2}</td><td>{0}</td><td>{3}</td></tr>\n",
            word(c.status),
            esc(&c.check),
            esc(c.node.as_deref().unwrap_or("cluster")),
            esc(&c.detail)
        );
    }
    h += "</table>\n</body></html>\n";
    h
}
