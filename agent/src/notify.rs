//! systemd's readiness protocol (sd_notify): one datagram to `$NOTIFY_SOCKET`.
//! Without that variable (not started by systemd with Type=notify) it does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1", "STOPPING=1", "WATCHDOG=1"); true if it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        // Nothing else in this test process reads NOTIFY_SOCKET (nextest runs each test
        // in its own process).
        std::env::set_var("NOTIFY_SOCKET", &p);
        assert!(super::notify("READY=1"));
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!super::notify("READY=1"));
    }
}
