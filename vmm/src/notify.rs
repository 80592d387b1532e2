//! systemd's notification protocol (sd_notify): `READY=1` to `$NOTIFY_SOCKET` once the
//! VM runs, so that `vireo@NAME.service` (Type=notify) is "started" exactly when the
//! guest is; `WATCHDOG=1` from the control loop while the VM is healthy (see
//! [`crate::watchdog`]). Without `NOTIFY_SOCKET` (not started by systemd) nothing is
//! sent.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// An open way to `$NOTIFY_SOCKET`: the socket is made and connected once (before the
/// thread's seccomp filter, which allows sending but is best not asked to create
/// sockets, and before a jail hides the socket's path).
pub struct Notifier {
    sock: UnixDatagram,
}

fn address(path: &OsString) -> std::io::Result<SocketAddr> {
    match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(path),
    }
}

/// The connection [`connect_early`] made, shared by every later notifier.
static EARLY: OnceLock<Option<Notifier>> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` now: a jailed VMM (`--jail`) no longer sees its path
/// once confined, and a connected socket keeps reaching it.
pub fn connect_early() {
    EARLY.get_or_init(Notifier::connect);
}

impl Notifier {
    fn connect() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let made = address(&path).and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.connect_addr(&addr)?;
            Ok(sock)
        });
        match made {
            Ok(sock) => Some(Self { sock }),
            Err(e) => {
                tracing::warn!(error = %e, socket = ?path, "unusable NOTIFY_SOCKET");
                None
            }
        }
    }

    /// From `$NOTIFY_SOCKET` (the connection of [`connect_early`] if it was made);
    /// None without it (or if it is unusable: logged).
    pub fn from_env() -> Option<Self> {
        match EARLY.get() {
            Some(early) => early
                .as_ref()
                .and_then(|n| n.sock.try_clone().ok())
                .map(|sock| Self { sock }),
            None => Self::connect(),
        }
    }

    /// Sends `state` (e.g. "READY=1"); false if it failed (logged).
    pub fn send(&self, state: &str) -> bool {
        match self.sock.send(state.as_bytes()) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, state, "cannot notify systemd");
                false
            }
        }
    }
}

/// Sends `state` once (e.g. "READY=1"); false if there is no notify socket or it
/// failed.
pub fn notify(state: &str) -> bool {
    Notifier::from_env().is_some_and(|n| n.send(state))
}

/// Tells systemd that `pid` is the unit's main process (`MAINPID=`) and waits until
/// systemd has read it (`BARRIER=1`): the process that sent it may exit then without
/// the unit seeing its main process end. Ok(false) without `$NOTIFY_SOCKET`.
pub fn hand_over_main_pid(pid: i32) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&address(&path)?)?;
    sock.send(format!("MAINPID={pid}").as_bytes())?;
    barrier(&sock, std::time::Duration::from_secs(10))?;
    Ok(true)
}

/// systemd's notification barrier (what `sd_notify_barrier` does): sends `BARRIER=1`
/// with the write end of a pipe and waits until systemd closes it, which it does once
/// it has processed every message sent before.
fn barrier(sock: &UnixDatagram, timeout: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors, owned from here on.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let msg = b"BARRIER=1";
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives sendmsg.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg of CMSG_SPACE(int) bytes, so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for one descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, write.as_raw_fd());
    }
    // SAFETY: sendmsg on our connected socket with the header built above.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(write);
    let mut pfd = libc::pollfd {
        fd: read.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 && pfd.revents & libc::POLLHUP != 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "systemd did not answer the notification barrier",
            ));
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A stand-in for systemd's side of the barrier: the message arrives with a
    /// descriptor, and closing that descriptor is what releases the sender.
    #[test]
    fn the_barrier_waits_until_the_receiver_closes_the_pipe_it_got() {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            let mut control = [0u8; 64];
            // SAFETY: a zeroed msghdr pointing at buffers that outlive recvmsg.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = &mut iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            hdr.msg_controllen = control.len() as _;
            // SAFETY: recvmsg into the header above.
            let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut hdr, 0) };
            assert!(n > 0);
            // SAFETY: the kernel filled one SCM_RIGHTS cmsg with one descriptor.
            let fd = unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                assert!(!cmsg.is_null());
                assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int)
            };
            std::thread::sleep(std::time::Duration::from_millis(200));
            let at = std::time::Instant::now();
            // SAFETY: the descriptor arrived with the message and is ours to close.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            (String::from_utf8_lossy(&buf[..n as usize]).into_owned(), at)
        });
        barrier(&tx, std::time::Duration::from_secs(10)).unwrap();
        let released = std::time::Instant::now();
        let (text, closed_at) = receiver.join().unwrap();
        assert_eq!(text, "BARRIER=1");
        assert!(
            released >= closed_at,
            "released before the receiver closed the pipe"
        );
    }
}
