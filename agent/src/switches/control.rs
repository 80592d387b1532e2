//! vireod's side of a switch's control socket: one JSON request per connection, one
//! reply line (`{"ok":true,...}` or `{"ok":false,"error":"..."}`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a request may take (the switch answers between two frames).
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The switch answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The switch could not be reached or did not answer.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: unreadable reply {0:?}")]
    Reply(String),
}

pub fn port_add(spec: &str) -> String {
    serde_json::json!({ "op": "port-add", "spec": spec }).to_string()
}

pub fn port_remove(name: &str) -> String {
    serde_json::json!({ "op": "port-remove", "port": name }).to_string()
}

pub fn ports() -> String {
    serde_json::json!({ "op": "ports" }).to_string()
}

/// Sends `req` and reads the reply; Ok when the switch says `"ok":true`.
pub fn request(control: &Path, req: &str) -> Result<(), ControlError> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|_| ControlError::Reply(line.clone()))?;
    if v["ok"] == true {
        return Ok(());
    }
    Err(ControlError::Refused(
        v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| line.trim().to_string()),
    ))
}
