//! The tap against the real kernel: a fresh network namespace per test (needs root;
//! skipped with a message otherwise), frames checked byte for byte through an
//! AF_PACKET socket on the tap.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use net::{Tap, TapError, VNET_HDR_LEN};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

/// A network namespace removed on drop (also when the test fails).
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            vireo_e2e::skip_or_fail_under_ci("needs root (network namespaces, /dev/net/tun)");
            return None;
        }
        let name = format!("vireo-nettest-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Some(Self(name))
    }

    /// Runs `f` on a thread that entered the namespace (fds it opens stay there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// An AF_PACKET socket bound to `ifname` that sees only our ethertype.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = ETHERTYPE.to_be() as i32;
    // SAFETY: plain socket(2); owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0, "if_nametoindex({ifname})");
    // SAFETY: a zeroed sockaddr_ll filled with family, protocol and index.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a valid sockaddr_ll and its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

fn frame(seed: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8).wrapping_mul(31);
    }
    f
}

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn frames_cross_the_tap_both_ways_with_vnet_headers() {
    let Some(ns) = NetNs::new("xfer") else { return };
    ns.run(|| {
        let tap = Tap::open("vtest0").expect("create tap");
        assert_eq!(tap.name(), "vtest0");
        let sock = packet_socket("vtest0");

        // Tap → host: header + frame, gathered from three pieces.
        let out = frame(7, 300);
        let hdr = [0u8; VNET_HDR_LEN];
        let n = tap
            .writev(&[
                IoSlice::new(&hdr),
                IoSlice::new(&out[..100]),
                IoSlice::new(&out[100..]),
            ])
            .expect("writev");
        assert_eq!(n, VNET_HDR_LEN + out.len());
        let mut got = vec![0u8; 2048];
        let len = until("frame on the packet socket", || {
            // SAFETY: recv into a buffer we own.
            let r = unsafe { libc::recv(sock.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
            (r > 0).then_some(r as usize)
        });
        assert_eq!(&got[..len], &out[..], "frame arrives byte-exact");

        // Host → tap: the frame shows up after a 12-byte header.
        let back = frame(9, 1000);
        // SAFETY: send from a buffer we own.
        let r = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
        assert_eq!(r as usize, back.len());
        let mut h = [0xffu8; VNET_HDR_LEN];
        let mut body = vec![0u8; 1600];
        let n = until("frame from the tap", || {
            let mut bufs = [IoSliceMut::new(&mut h), IoSliceMut::new(&mut body)];
            match tap.readv(&mut bufs) {
                Ok(n) if n > VNET_HDR_LEN && body[12..14] == ETHERTYPE.to_be_bytes() => Some(n),
                Ok(_) => None, // something else the stack sent
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("readv: {e}"),
            }
        });
        assert_eq!(n, VNET_HDR_LEN + back.len());
        assert_eq!(&body[..back.len()], &back[..]);
        assert_eq!(h[1], 0, "no GSO without offloads");

        // Nothing waiting: non-blocking.
        let mut b = [0u8; 64];
        loop {
            match tap.readv(&mut [IoSliceMut::new(&mut b)]) {
                Ok(_) => continue, // drain what the stack may still send
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
    });
}

#[test]
fn a_tap_in_use_is_refused_with_its_name() {
    let Some(ns) = NetNs::new("busy") else { return };
    ns.run(|| {
        // A single-queue tap takes one attachment: a second open must fail,
        // naming the tap and saying why.
        let first = Tap::open("vbusy0").expect("first open");
        let e = Tap::open("vbusy0").unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                TapError::Ioctl {
                    op: "TUNSETIFF",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("vbusy0") && msg.contains("in use"), "{msg}");
        drop(first);
        // Closed: it can be opened again (it is re-created: nothing kept it).
        Tap::open("vbusy0").expect("reopen after close");
    });
}
