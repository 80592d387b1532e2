//! Requests as another local user: a forked child takes the user's groups, gid and
//! uid (the test runs as root), connects to a unix socket and sends one request; the
//! answer comes back through a pipe. The child makes system calls only (no allocation
//! after fork: the test process has threads).

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// A local user: uid, primary gid and supplementary groups.
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What came of a request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// The pid of the process that sent it.
    pub pid: i32,
}

/// Ids no account on this machine uses, different for each test process.
pub fn unused_ids() -> u32 {
    3_000_000 + (std::process::id() % 100_000) * 16
}

/// A child that sends `request` to `socket` as `who`; the pipe carries first a 4-byte
/// status (0: connected, else the errno of connect, or 100000 + the errno of a failed
/// setgroups/setgid/setuid), then everything the server answers.
fn spawn(who: &Caller, socket: &Path, request: &[u8]) -> (i32, File) {
    let path = CString::new(socket.as_os_str().as_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes_with_nul();
    assert!(bytes.len() <= addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut fds = [0; 2];
    // SAFETY: fds is a two-element array pipe2 fills.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only makes system calls on memory prepared before the fork
    // (addr, request, buf, the group list) and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above; every pointer is to memory of this (copied) address space.
        unsafe {
            libc::close(fds[0]);
            let w = fds[1];
            let report = |code: i32| {
                libc::write(w, (&code as *const i32).cast(), 4);
            };
            let errno = || *libc::__errno_location();
            if libc::setgroups(who.groups.len(), who.groups.as_ptr()) != 0
                || libc::setgid(who.gid) != 0
                || libc::setuid(who.uid) != 0
            {
                report(100_000 + errno());
                libc::_exit(1);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if libc::connect(
                s,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
            {
                report(errno());
                libc::_exit(0);
            }
            report(0);
            let mut off = 0;
            while off < request.len() {
                let n = libc::write(s, request[off..].as_ptr().cast(), request.len() - off);
                if n <= 0 {
                    libc::_exit(2);
                }
                off += n as usize;
            }
            loop {
                let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 || libc::write(w, buf.as_ptr().cast(), n as usize) != n {
                    libc::_exit(0);
                }
            }
        }
    }
    // SAFETY: closing our copy of the write end; fds[0] becomes the File's.
    unsafe { libc::close(fds[1]) };
    // SAFETY: fds[0] is an open pipe end nobody else owns.
    (pid, unsafe { File::from_raw_fd(fds[0]) })
}

fn first_status(r: &mut impl Read) -> i32 {
    let mut code = [0u8; 4];
    r.read_exact(&mut code).expect("child's status");
    let code = i32::from_ne_bytes(code);
    assert!(
        code < 100_000,
        "cannot take the test user's ids: errno {}",
        code - 100_000
    );
    code
}

fn reap(pid: i32) {
    let mut st = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
}

fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Caller {
    /// Sends one request; `Err(errno)` if this user cannot connect to `socket`.
    pub fn try_request(
        &self,
        socket: &Path,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, i32> {
        let (pid, mut pipe) = spawn(self, socket, &request_bytes(method, path, body));
        let code = first_status(&mut pipe);
        let mut resp = Vec::new();
        pipe.read_to_end(&mut resp).expect("read the answer");
        reap(pid);
        if code != 0 {
            return Err(code);
        }
        let (status, body) = super::parse_response(&String::from_utf8_lossy(&resp));
        Ok(Reply { status, body, pid })
    }

    /// Sends one request that must reach the server.
    pub fn request(&self, socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.try_request(socket, method, path, body)
            .unwrap_or_else(|e| {
                panic!(
                    "uid {} cannot connect to {}: errno {e}",
                    self.uid,
                    socket.display()
                )
            })
    }

    /// Subscribes to vireod's events as this user.
    pub fn events(&self, socket: &Path, query: &str) -> EventStream {
        let req = format!("GET /api/v1/events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (pid, mut pipe) = spawn(self, socket, req.as_bytes());
        assert_eq!(first_status(&mut pipe), 0, "cannot connect");
        let mut reader = BufReader::new(pipe);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        EventStream {
            pid,
            status: status
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            reader,
        }
    }

    /// A command run as this user (the ids are taken just before exec).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        let who = self.clone();
        // SAFETY: the closure makes system calls only.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(who.groups.len(), who.groups.as_ptr()) != 0
                    || libc::setgid(who.gid) != 0
                    || libc::setuid(who.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// A server-sent events stream read by a child running as another user.
pub struct EventStream {
    pid: i32,
    pub status: u16,
    reader: BufReader<File>,
}

impl EventStream {
    /// The next event's JSON.
    pub fn next(&mut self) -> serde_json::Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).expect("read event");
            assert!(n > 0, "event stream closed");
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                return serde_json::from_str(data.trim()).expect("event JSON");
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // SAFETY: killing and reaping our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid);
    }
}
