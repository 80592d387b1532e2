//! One QMP session (QEMU's JSON control protocol): how the benches drive QEMU's
//! migrations and mirrors.

use std::path::Path;
use std::time::{Duration, Instant};

/// One QMP session (QEMU's JSON control protocol) on a unix socket.
pub(crate) struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            reader: std::io::BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        };
        q.line(); // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    pub(crate) fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or(serde_json::Value::Null)
    }

    /// Sends a command; returns its "return" (events in between are skipped).
    pub(crate) fn cmd(&mut self, c: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.writer, "{c}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}
