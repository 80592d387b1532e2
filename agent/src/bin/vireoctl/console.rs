//! `vireoctl vm console`: a VM's serial console on the terminal (raw mode, Ctrl-] to leave).

use super::*;

/// The terminal in raw mode while it lives (keys reach the guest unprocessed).
pub(crate) struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr fills the zeroed termios for fd 0; cfmakeraw and tcsetattr
        // only read and write that struct and the terminal's settings.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: puts back the settings tcgetattr returned for the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Ctrl-]: ends an interactive console (as in telnet and virsh).
pub(crate) const CONSOLE_ESCAPE: u8 = 0x1d;

/// Sends input to the guest's serial port; says so if it did not take all of it.
pub(crate) fn serial_send(ctx: &Ctx, name: &str, bytes: Vec<u8>) -> Result<(), CtlError> {
    let n = bytes.len();
    let v = ctx.json("POST", &format!("/api/v1/vms/{name}/serial"), Some(bytes))?;
    let sent = v.get("sent").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
    if sent < n {
        eprintln!(
            "vireoctl: the guest took {sent} of {n} bytes (it is not reading its serial port)"
        );
    }
    Ok(())
}

pub(crate) fn console(
    ctx: &Ctx,
    name: &str,
    lines: usize,
    follow: bool,
    send: Option<String>,
    input: bool,
) -> Result<(), CtlError> {
    use std::io::{IsTerminal, Read};
    let serial = format!("/api/v1/vms/{name}/serial");
    if let Some(text) = send {
        let mut b = text.into_bytes();
        b.push(b'\n');
        serial_send(ctx, name, b)?;
    }
    let r = ctx.call("GET", &format!("{serial}?lines={lines}"), None)?;
    let mut last: Vec<String> = String::from_utf8_lossy(&r.body)
        .lines()
        .map(str::to_string)
        .collect();
    // Keys come from a thread (a blocking read of stdin); None = the end.
    let keys = input.then(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        let chunk = &buf[..n];
                        if let Some(i) = chunk.iter().position(|&b| b == CONSOLE_ESCAPE) {
                            let _ = tx.send(Some(chunk[..i].to_vec()));
                            let _ = tx.send(None);
                            return;
                        }
                        if tx.send(Some(chunk.to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    });
    let raw = if input && std::io::stdin().is_terminal() {
        RawTerminal::enter()
    } else {
        None
    };
    let eol = if raw.is_some() { "\r\n" } else { "\n" };
    let mut out = std::io::stdout();
    for l in &last {
        let _ = write!(out, "{l}{eol}");
    }
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    if raw.is_some() {
        eprint!("[console of {name}: input goes to the guest; Ctrl-] ends]\r\n");
    }
    loop {
        if let Some(rx) = &keys {
            loop {
                match rx.try_recv() {
                    Ok(Some(b)) if !b.is_empty() => serial_send(ctx, name, b)?,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(if input { 50 } else { 200 }));
        let r = ctx.call("GET", &format!("{serial}?lines=1000"), None)?;
        let now: Vec<String> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(str::to_string)
            .collect();
        // Print what follows the last line we printed.
        let start = last
            .last()
            .and_then(|l| now.iter().rposition(|x| x == l))
            .map(|i| i + 1)
            .unwrap_or(0);
        for l in &now[start.min(now.len())..] {
            let _ = write!(out, "{l}{eol}");
        }
        let _ = out.flush();
        last = now;
    }
}
