//! A Linux TAP interface with virtio-net headers, non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// Interface names are at most 15 bytes (IFNAMSIZ including the NUL).
pub const IFNAMSIZ: usize = 16;
/// Bytes of virtio-net header before every frame (`struct virtio_net_hdr_mrg_rxbuf`).
pub const VNET_HDR_LEN: usize = 12;

const TUNTAP: u32 = 0x54; // 'T'
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` with the flags member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = Self {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// Why a tap could not be opened; every variant names the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{name}': {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("tap {name}: cannot open /dev/net/tun: {source}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: {op} failed{hint}: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel will (`dev_valid_name`).
pub fn validate_tap_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= IFNAMSIZ {
        return bad("longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return bad("not a valid interface name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', whitespace or NUL");
    }
    Ok(())
}

/// An open TAP interface: frames in and out, each after a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_result(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens the tap `name`, creating it if it does not exist (which needs
    /// CAP_NET_ADMIN; attaching to a persistent tap owned by the caller does not), with
    /// virtio-net headers, no offloads, non-blocking, and brings its link up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        Self::attach(name, Self::open_tun(name)?)
    }

    /// Opens `/dev/net/tun` for the tap `name` (non-blocking, close-on-exec): the
    /// file half of [`Tap::open`], for a program whose opening thread is not the one
    /// that configures the tap.
    pub fn open_tun(name: &str) -> Result<File, TapError> {
        validate_tap_name(name)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })
    }

    /// Attaches `file` (a `/dev/net/tun` from [`Tap::open_tun`]) to the tap `name`,
    /// creating it if it does not exist, and configures it as [`Tap::open`] does.
    pub fn attach(name: &str, file: File) -> Result<Self, TapError> {
        validate_tap_name(name)?;
        let ioctl_err = |op, source: io::Error| {
            let hint = match source.raw_os_error() {
                Some(libc::EBUSY) => " (the tap is in use by another process)",
                Some(libc::EPERM) => {
                    " (creating a tap needs CAP_NET_ADMIN; a persistent tap must belong to this user)"
                }
                Some(libc::EINVAL) if op == "TUNSETIFF" => {
                    " (an interface of that name exists and is not a single-queue tap)"
                }
                _ => "",
            };
            TapError::Ioctl {
                name: name.to_string(),
                op,
                hint,
                source,
            }
        };
        let mut req = IfReq::new(name);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout
        // and lives across the call.
        ioctl_result(unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) })
            .map_err(|e| ioctl_err("TUNSETIFF", e))?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        ioctl_result(unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) })
            .map_err(|e| ioctl_err("TUNSETVNETHDRSZ", e))?;
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.set_offload(0)
            .map_err(|e| ioctl_err("TUNSETOFFLOAD", e))?;
        if let Err(e) = tap.set_link_up() {
            // A tap the caller owns but may not configure: someone else brings it up.
            tracing::warn!(tap = %name, error = %e, "cannot bring the tap's link up");
        }
        tracing::info!(tap = %name, "tap opened");
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the guest side accepts (TUN_F_* bits; 0 = none: the host
    /// stack checksums and segments every frame before it reaches us).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        ioctl_result(unsafe {
            ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags))
        })
    }

    /// SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP on a socket of the current network
    /// namespace (the tap's: it was created here). A unix socket: the kernel hands
    /// interface ioctls of any family to the device layer, and a VMM in a vireo@ unit
    /// may not open IP sockets (RestrictAddressFamilies=AF_UNIX AF_NETLINK).
    fn set_link_up(&self) -> io::Result<()> {
        // SAFETY: a plain socket(2) call; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS fills `ifr_flags` of a `struct ifreq` we own.
        ioctl_result(unsafe {
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq)
        })?;
        if req.flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the same `struct ifreq`.
        ioctl_result(unsafe {
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req as *const IfReq)
        })
    }

    /// Reads one frame (header first) into `bufs`; `WouldBlock` when none is waiting.
    /// A frame longer than `bufs` is cut short (the rest is lost).
    pub fn readv(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are valid for
        // writes of their lengths for the duration of the call.
        let r = unsafe { libc::readv(self.file.as_raw_fd(), bufs.as_ptr().cast(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one frame (header first) gathered from `bufs`; `WouldBlock` when the
    /// tap's queue is full.
    pub fn writev(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.len() > libc::UIO_MAXIOV as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame in more than UIO_MAXIOV pieces",
            ));
        }
        // SAFETY: IoSlice is ABI-compatible with iovec; the buffers are valid for
        // reads of their lengths for the duration of the call.
        let r = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                bufs.as_ptr().cast(),
                bufs.len() as libc::c_int,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_if_tun_h() {
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        validate_tap_name("vtap0").unwrap();
        validate_tap_name("a23456789012345").unwrap();
        for (bad, why) in [
            ("", "empty"),
            ("a234567890123456", "IFNAMSIZ"),
            ("a/b", "'/'"),
            ("a b", "whitespace"),
            ("..", "valid"),
        ] {
            let e = validate_tap_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = Tap::open("much-too-long-name").unwrap_err().to_string();
        assert!(e.contains("much-too-long-name"), "{e}");
    }
}
