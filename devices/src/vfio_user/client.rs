//! The VMM's side of a vfio-user connection: one request at a time, each reply
//! checked (type, id, command, size bounds, error flag) before it is used. The server
//! is another process and may be hostile or dead: nothing it sends can make this
//! code allocate without bound, index out of range or panic; a broken connection is
//! an error the device turns into "failed", never a crash.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::wire::{self, Fields, Header, HEADER_SIZE};

/// The largest reply read (the biggest the client asks for is a region read of at
/// most [`MAX_ACCESS`] bytes, or a version reply's capabilities).
const MAX_REPLY_PAYLOAD: u32 = 64 * 1024;
/// The largest single region access the client sends.
pub const MAX_ACCESS: usize = 4096;
/// How long a reply may take before the server is taken for hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The client's capabilities in the version message (JSON, NUL-terminated).
const CAPABILITIES: &str = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096}}"#;

/// Why a request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: the connection failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: the server closed the connection")]
    Closed { what: &'static str },
    #[error("{what}: the server answered with an error (errno {errno})")]
    Server { what: &'static str, errno: u32 },
    #[error("{what}: malformed reply: {reason}")]
    Protocol { what: &'static str, reason: String },
}

/// A region as the server describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
}

/// What `DEVICE_GET_INFO` says.
#[derive(Clone, Copy, Debug)]
pub struct DeviceInfo {
    pub regions: u32,
    pub irqs: u32,
}

/// One connection to a vfio-user server.
pub struct Client {
    stream: UnixStream,
    next_id: u16,
}

fn protocol(what: &'static str, reason: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        what,
        reason: reason.into(),
    }
}

fn io(what: &'static str, e: std::io::Error) -> ClientError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ClientError::Closed { what },
        _ => ClientError::Io { what, source: e },
    }
}

impl Client {
    /// Connects to `path` and negotiates the protocol version.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::over(stream)
    }

    /// Negotiates over a connected stream.
    pub(crate) fn over(stream: UnixStream) -> Result<Self, ClientError> {
        for t in [
            UnixStream::set_read_timeout as fn(&UnixStream, _) -> _,
            UnixStream::set_write_timeout,
        ] {
            t(&stream, Some(REPLY_TIMEOUT)).map_err(|e| io("set socket timeouts", e))?;
        }
        let mut c = Self { stream, next_id: 0 };
        c.negotiate()?;
        Ok(c)
    }

    fn negotiate(&mut self) -> Result<(), ClientError> {
        const WHAT: &str = "version negotiation";
        let payload = Fields::default()
            .u16(0)
            .u16(1)
            .bytes(CAPABILITIES.as_bytes())
            .bytes(&[0]);
        let reply = self.request(WHAT, wire::VERSION, &payload.0, &[])?;
        if reply.len() < 4 {
            return Err(protocol(WHAT, format!("{} bytes", reply.len())));
        }
        let major = u16::from_le_bytes([reply[0], reply[1]]);
        if major != 0 {
            return Err(protocol(WHAT, format!("major version {major}, expected 0")));
        }
        Ok(())
    }

    /// Sends one command (with `fds` as SCM_RIGHTS) and returns the reply's payload.
    fn request(
        &mut self,
        what: &'static str,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Vec<u8>, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(id, command, payload.len()).encode();
        if fds.is_empty() {
            let mut msg = Vec::with_capacity(HEADER_SIZE + payload.len());
            msg.extend_from_slice(&header);
            msg.extend_from_slice(payload);
            self.stream.write_all(&msg).map_err(|e| io(what, e))?;
        } else {
            let sent = self
                .stream
                .send_with_fds(&[&header[..], payload], fds)
                .map_err(|e| io(what, std::io::Error::from_raw_os_error(e.errno())))?;
            let all = [&header[..], payload].concat();
            if let Some(rest) = all.get(sent..) {
                self.stream.write_all(rest).map_err(|e| io(what, e))?;
            }
        }
        self.reply(what, id, command)
    }

    fn reply(&mut self, what: &'static str, id: u16, command: u16) -> Result<Vec<u8>, ClientError> {
        let mut hb = [0u8; HEADER_SIZE];
        self.stream.read_exact(&mut hb).map_err(|e| io(what, e))?;
        let h = Header::decode(&hb);
        if !h.is_reply() || h.id != id || h.command != command {
            return Err(protocol(
                what,
                format!(
                    "expected the reply to message {id} (command {command}), got id {} command {} flags {:#x}",
                    h.id, h.command, h.flags
                ),
            ));
        }
        let len = (h.size as usize)
            .checked_sub(HEADER_SIZE)
            .ok_or_else(|| protocol(what, format!("message size {} < header", h.size)))?;
        if len > MAX_REPLY_PAYLOAD as usize {
            return Err(protocol(
                what,
                format!("{len} bytes of payload (too large)"),
            ));
        }
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| io(what, e))?;
        if h.is_error() {
            return Err(ClientError::Server {
                what,
                errno: h.error,
            });
        }
        Ok(payload)
    }

    pub fn device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        const WHAT: &str = "DEVICE_GET_INFO";
        let p = Fields::default().u32(16).u32(0).u32(0).u32(0);
        let r = self.request(WHAT, wire::DEVICE_GET_INFO, &p.0, &[])?;
        if r.len() < 16 {
            return Err(protocol(WHAT, format!("{} bytes", r.len())));
        }
        if wire::u32_at(&r, 4) & wire::DEVICE_FLAGS_PCI == 0 {
            return Err(protocol(WHAT, "not a PCI device"));
        }
        Ok(DeviceInfo {
            regions: wire::u32_at(&r, 8),
            irqs: wire::u32_at(&r, 12),
        })
    }

    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, ClientError> {
        const WHAT: &str = "DEVICE_GET_REGION_INFO";
        let p = Fields::default()
            .u32(32)
            .u32(0)
            .u32(index)
            .u32(0)
            .u64(0)
            .u64(0);
        let r = self.request(WHAT, wire::DEVICE_GET_REGION_INFO, &p.0, &[])?;
        if r.len() < 32 {
            return Err(protocol(WHAT, format!("{} bytes", r.len())));
        }
        if wire::u32_at(&r, 8) != index {
            return Err(protocol(WHAT, format!("asked region {index}, got another")));
        }
        Ok(RegionInfo {
            flags: wire::u32_at(&r, 4),
            size: wire::u64_at(&r, 16),
        })
    }

    /// The number of vectors of interrupt `index` and its flags.
    pub fn irq_info(&mut self, index: u32) -> Result<(u32, u32), ClientError> {
        const WHAT: &str = "DEVICE_GET_IRQ_INFO";
        let p = Fields::default().u32(16).u32(0).u32(index).u32(0);
        let r = self.request(WHAT, wire::DEVICE_GET_IRQ_INFO, &p.0, &[])?;
        if r.len() < 16 || wire::u32_at(&r, 8) != index {
            return Err(protocol(
                WHAT,
                format!("{} bytes or another index", r.len()),
            ));
        }
        Ok((wire::u32_at(&r, 12), wire::u32_at(&r, 4)))
    }

    /// Gives the server one eventfd per vector of interrupt `index`, from `start`.
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        const WHAT: &str = "DEVICE_SET_IRQS";
        let p = Fields::default()
            .u32(20)
            .u32(wire::IRQ_SET_EVENTFD_TRIGGER)
            .u32(index)
            .u32(start)
            .u32(fds.len() as u32);
        self.request(WHAT, wire::DEVICE_SET_IRQS, &p.0, fds)?;
        Ok(())
    }

    /// Lets the server map `size` bytes of `fd` from `offset` as DMA addresses
    /// `address..address + size` (guest-physical).
    pub fn dma_map(
        &mut self,
        fd: &impl AsRawFd,
        offset: u64,
        address: u64,
        size: u64,
    ) -> Result<(), ClientError> {
        const WHAT: &str = "DMA_MAP";
        let p = Fields::default()
            .u32(32)
            .u32(wire::DMA_READ_WRITE)
            .u64(offset)
            .u64(address)
            .u64(size);
        self.request(WHAT, wire::DMA_MAP, &p.0, &[fd.as_raw_fd()])?;
        Ok(())
    }

    /// Reads `data.len()` (at most [`MAX_ACCESS`]) bytes of region `region`.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ClientError> {
        const WHAT: &str = "REGION_READ";
        if data.len() > MAX_ACCESS {
            return Err(protocol(WHAT, format!("{} bytes asked", data.len())));
        }
        let p = Fields::default()
            .u64(offset)
            .u32(region)
            .u32(data.len() as u32);
        let r = self.request(WHAT, wire::REGION_READ, &p.0, &[])?;
        let (head, bytes) = r
            .split_at_checked(16)
            .ok_or_else(|| protocol(WHAT, format!("{} bytes", r.len())))?;
        let count = wire::u32_at(head, 12) as usize;
        if count != data.len() || bytes.len() != data.len() {
            return Err(protocol(
                WHAT,
                format!(
                    "asked {} bytes, the reply says {count} and carries {}",
                    data.len(),
                    bytes.len()
                ),
            ));
        }
        data.copy_from_slice(bytes);
        Ok(())
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        const WHAT: &str = "REGION_WRITE";
        if data.len() > MAX_ACCESS {
            return Err(protocol(WHAT, format!("{} bytes asked", data.len())));
        }
        let p = Fields::default()
            .u64(offset)
            .u32(region)
            .u32(data.len() as u32)
            .bytes(data);
        self.request(WHAT, wire::REGION_WRITE, &p.0, &[])?;
        Ok(())
    }
}
