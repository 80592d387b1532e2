//! Network namespaces and raw Ethernet sockets for the networking tests (root only).
//!
//! A [`NetNs`] is removed when dropped, also when the test panics, so a failed run
//! leaves no namespace (and no tap) behind.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// True when the tests may create namespaces and taps.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
    file: File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A namespace named after `tag` and this process, with IPv6 off (so the kernel
    /// sends no router solicitations or MLD reports onto our taps).
    pub fn new(tag: &str) -> Self {
        let name = format!("vireo-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let file = File::open(format!("/run/netns/{name}")).expect("open the namespace");
        let ns = Self { name, file };
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside (`ip netns exec`), which must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A persistent tap inside, link up (as an administrator would prepare one).
    pub fn add_tap(&self, name: &str) {
        self.exec(&[
            "ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr",
        ]);
        self.exec(&["ip", "link", "set", name, "up"]);
    }

    /// Makes `cmd` start inside the namespace (as `ip netns exec` does).
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open (self outlives the
        // spawn, and the fd is inherited across fork).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `f` on a thread inside the namespace; sockets it opens stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace fd we hold; affects this thread only.
                let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Hosts on one machine: a namespace each, joined by veth pairs to a bridge in a
/// namespace of its own ("the switch"). Host `i` is `addresses[i]/24` on its `eth0`;
/// its switch port is `p{i}`.
pub struct BridgedHosts {
    pub switch: NetNs,
    pub hosts: Vec<std::sync::Arc<NetNs>>,
}

impl BridgedHosts {
    /// Namespaces named after `tag` (the switch `{tag}sw`, host `i` `{tag}{i}`).
    pub fn new(tag: &str, addresses: &[String]) -> Self {
        let switch = NetNs::new(&format!("{tag}sw"));
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        switch.exec(&["ip", "link", "set", "br0", "up"]);
        let hosts = addresses
            .iter()
            .enumerate()
            .map(|(i, address)| {
                let ns = std::sync::Arc::new(NetNs::new(&format!("{tag}{i}")));
                let port = format!("p{i}");
                ns.exec(&["ip", "link", "set", "lo", "up"]);
                ns.exec(&[
                    "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                ]);
                ns.exec(&["ip", "link", "set", &port, "netns", switch.name()]);
                ns.exec(&["ip", "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
                ns.exec(&["ip", "link", "set", "eth0", "up"]);
                switch.exec(&["ip", "link", "set", &port, "master", "br0"]);
                switch.exec(&["ip", "link", "set", &port, "up"]);
                ns
            })
            .collect();
        Self { switch, hosts }
    }

    /// Takes host `i`'s link down (a partition) or up again.
    pub fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        self.switch
            .exec(&["ip", "link", "set", &format!("p{i}"), state]);
    }
}

/// An AF_PACKET socket on one interface that sees only one ethertype.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens it inside `ns` (the interface must exist there).
    pub fn open(ns: &NetNs, ifname: &str, ethertype: u16) -> Self {
        let ifname = ifname.to_string();
        ns.run(move || {
            // SAFETY: plain socket(2); owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(ethertype.to_be()),
                )
            };
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let cname = std::ffi::CString::new(ifname.clone()).expect("name");
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(index > 0, "no interface {ifname}");
            // SAFETY: zeroed sockaddr_ll, then filled.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = index as i32;
            // SAFETY: bind with a valid sockaddr_ll and its length.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            Self { fd }
        })
    }

    /// Sends one whole frame.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: send from a buffer we own.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            r,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends one frame if the socket takes it now (false: its buffer is full).
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: send from a buffer we own.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        r == frame.len() as isize
    }

    /// The next frame, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: recv into a buffer we own.
            let r =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r >= 0 {
                buf.truncate(r as usize);
                return Some(buf);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
