//! A port on a host interface through a plain AF_PACKET socket (`SOCK_RAW`,
//! `ETH_P_ALL`, bound to the interface, promiscuous, non-blocking).
//!
//! The kernel takes an 802.1Q tag off every received frame before packet sockets see
//! it (into `PACKET_AUXDATA`); the port puts it back, so the switch sees the frame as
//! it was on the wire. Frames the switch itself sent are not read back
//! (`PACKET_IGNORE_OUTGOING`, and `PACKET_OUTGOING` is skipped where that is missing).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use switch::frame::{ETHERTYPE_VLAN, ETH_HLEN, VLAN_HLEN};

const ETH_P_ALL: u16 = 0x0003;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
/// Largest frame read: anything longer is truncated by the kernel and dropped here.
pub const RX_BUF: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum PortIoError {
    #[error("interface '{0}' does not exist")]
    NoInterface(String),
    #[error("interface '{iface}': {op}: {source}")]
    Sys {
        iface: String,
        op: &'static str,
        source: io::Error,
    },
}

pub struct PacketPort {
    fd: OwnedFd,
    iface: String,
}

/// What one read got.
pub enum Rx {
    Frame(usize),
    /// Longer than the buffer: dropped.
    Truncated,
    WouldBlock,
}

fn last(iface: &str, op: &'static str) -> PortIoError {
    PortIoError::Sys {
        iface: iface.to_string(),
        op,
        source: io::Error::last_os_error(),
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> bool {
    // SAFETY: `val` points to a live T and its size is passed with it.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        ) == 0
    }
}

impl PacketPort {
    pub fn open(iface: &str) -> Result<Self, PortIoError> {
        let cname =
            std::ffi::CString::new(iface).map_err(|_| PortIoError::NoInterface(iface.into()))?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(PortIoError::NoInterface(iface.to_string()));
        }
        // SAFETY: plain socket(2); the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if raw < 0 {
            return Err(last(iface, "socket(AF_PACKET) (needs CAP_NET_RAW)"));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        if !setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_AUXDATA, &on) {
            return Err(last(iface, "PACKET_AUXDATA"));
        }
        // Best effort: older kernels lack it, and recv skips PACKET_OUTGOING anyway.
        let _ = setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &on,
        );
        // SAFETY: zeroed sockaddr_ll, then filled.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: bind with a valid sockaddr_ll and its length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(last(iface, "bind"));
        }
        // SAFETY: zeroed packet_mreq, then filled.
        let mut mreq: libc::packet_mreq = unsafe { zeroed() };
        mreq.mr_ifindex = index as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        if !setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq,
        ) {
            return Err(last(iface, "PACKET_ADD_MEMBERSHIP promiscuous"));
        }
        Ok(Self {
            fd,
            iface: iface.to_string(),
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Reads one frame into `buf` (at least [`RX_BUF`] + 4 bytes), with its 802.1Q tag
    /// put back if the kernel had taken it off.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Rx> {
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len().saturating_sub(VLAN_HLEN),
            };
            // SAFETY: zeroed plain-data structs, filled below.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            let mut cbuf = [0u64; 16];
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { zeroed() };
            msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<[u64; 16]>();
            // SAFETY: every pointer in `msg` refers to a live local or to `buf`.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(Rx::WouldBlock),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            if n > iov.iov_len {
                return Ok(Rx::Truncated);
            }
            let tag = vlan_from_cmsgs(&msg);
            let Some((tpid, tci)) = tag else {
                return Ok(Rx::Frame(n));
            };
            if n < ETH_HLEN - 2 {
                return Ok(Rx::Frame(n));
            }
            // Put the tag back after the two addresses.
            buf.copy_within(ETH_HLEN - 2..n, ETH_HLEN - 2 + VLAN_HLEN);
            buf[ETH_HLEN - 2..ETH_HLEN].copy_from_slice(&tpid.to_be_bytes());
            buf[ETH_HLEN..ETH_HLEN + 2].copy_from_slice(&tci.to_be_bytes());
            return Ok(Rx::Frame(n + VLAN_HLEN));
        }
    }

    /// Sends one whole frame; false if the interface did not take it now.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: send from a buffer we own.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r == frame.len() as isize {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Queue full, interface down, no reader on a tap: the frame is lost, the port stays.
            Some(libc::EAGAIN | libc::ENOBUFS | libc::ENETDOWN | libc::ENXIO | libc::EIO) => {
                Ok(false)
            }
            _ if r >= 0 => Ok(false),
            _ => Err(e),
        }
    }
}

impl AsRawFd for PacketPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The (TPID, TCI) the kernel stripped, from `PACKET_AUXDATA`.
fn vlan_from_cmsgs(msg: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within
    // msg_controllen; the payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_PACKET
                && h.cmsg_type == libc::PACKET_AUXDATA
                && h.cmsg_len as usize
                    >= libc::CMSG_LEN(size_of::<libc::tpacket_auxdata>() as u32) as usize
            {
                let aux: libc::tpacket_auxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if aux.tp_status & TP_STATUS_VLAN_VALID != 0 {
                    let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                        aux.tp_vlan_tpid
                    } else {
                        ETHERTYPE_VLAN
                    };
                    return Some((tpid, aux.tp_vlan_tci));
                }
                return None;
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
        None
    }
}
