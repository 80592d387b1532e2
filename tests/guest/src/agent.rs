//! A guest agent on the console's port `org.qemu.guest_agent.0`: the virtio-console
//! multiport driver (virtio 1.2, 5.3.6.2) on virtio-drivers' transport and virtqueue
//! API (virtio-drivers' own console driver is single-port), and the few
//! qemu-guest-agent commands the tests use: `guest-sync`, `guest-sync-delimited`,
//! `guest-ping`, `guest-fsfreeze-freeze`, `guest-fsfreeze-thaw`,
//! `guest-fsfreeze-status`. Commands are JSON lines; the parsing is by key search,
//! enough for what a VMM sends.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::pci::{self, GuestHal};
use crate::{fail, println};

const F_VERSION_1: u64 = 1 << 32;
const F_MULTIPORT: u64 = 1 << 1;
const QSIZE: usize = 8;
const CTRL_RX: u16 = 2;
const CTRL_TX: u16 = 3;
const PORT_RX: u16 = 4;
const PORT_TX: u16 = 5;
const AGENT_PORT: u32 = 1;
const NAME: &[u8] = b"org.qemu.guest_agent.0";
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
/// Longest command line kept; a longer one is dropped whole.
const MAX_LINE: usize = 4096;

type Queue = VirtQueue<GuestHal, QSIZE>;

/// Receive buffers kept on one queue (leaked: they live as long as the guest).
struct RxBufs {
    q: Queue,
    /// Leaked buffers, only touched by the device between `add` and `pop_used`.
    bufs: Vec<*mut [u8]>,
    tokens: Vec<u16>,
}

impl RxBufs {
    fn new(q: Queue, n: usize, len: usize, t: &mut PciTransport, idx: u16) -> Self {
        let mut r = Self {
            q,
            bufs: Vec::new(),
            tokens: Vec::new(),
        };
        for _ in 0..n {
            r.bufs
                .push(Box::into_raw(alloc::vec![0u8; len].into_boxed_slice()));
            r.tokens.push(0);
        }
        for i in 0..n {
            r.post(i);
        }
        t.notify(idx);
        r
    }

    fn post(&mut self, i: usize) {
        // SAFETY: the buffer is leaked and touched again only after pop_used.
        let buf: &mut [u8] = unsafe { &mut *self.bufs[i] };
        match unsafe { self.q.add(&[], &mut [buf]) } {
            Ok(t) => self.tokens[i] = t,
            Err(e) => fail!("agent: cannot post a receive buffer: {:?}", e),
        }
    }

    /// The next filled buffer's bytes, re-posted after `f` has read them.
    fn pop<R>(&mut self, t: &mut PciTransport, idx: u16, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let token = self.q.peek_used()?;
        let i = self.tokens.iter().position(|&k| k == token)?;
        // SAFETY: the same buffer as posted with this token.
        let buf: &mut [u8] = unsafe { &mut *self.bufs[i] };
        let len = match unsafe { self.q.pop_used(token, &[], &mut [&mut *buf]) } {
            Ok(n) => (n as usize).min(buf.len()),
            Err(e) => fail!("agent: receive queue: {:?}", e),
        };
        let r = f(&buf[..len]);
        self.post(i);
        t.notify(idx);
        Some(r)
    }
}

/// What a freeze or thaw does to the workload (the tests' block writer).
pub trait Freezable {
    /// Flushes and stops writing; how many "filesystems" (disks) were frozen.
    fn freeze(&mut self) -> usize;
    /// Writes again; how many were thawed.
    fn thaw(&mut self) -> usize;
}

pub struct Agent {
    t: PciTransport,
    ctrl_rx: RxBufs,
    ctrl_tx: Queue,
    port_rx: RxBufs,
    port_tx: Queue,
    _port0: (Queue, Queue),
    line: Vec<u8>,
    dropping: bool,
    pub frozen: bool,
    host_open: bool,
    named: bool,
}

impl Agent {
    /// Finds the multiport console, runs the handshake until the agent port is named
    /// and open (the host answers at once), and opens it from the guest side.
    pub fn open() -> Self {
        let mut root = pci::root();
        pci::assign_bars(&mut root, false);
        let found = pci::functions(&root)
            .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Console));
        let Some((df, _)) = found else {
            fail!("agent: no virtio-console device on bus 0");
        };
        let mut t = match PciTransport::new::<GuestHal, _>(&mut root, df) {
            Ok(t) => t,
            Err(e) => fail!("agent: transport: {:?}", e),
        };
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & F_MULTIPORT == 0 {
            fail!("agent: the console is not multiport (no guest agent channel)");
        }
        t.write_driver_features(offered & (F_VERSION_1 | F_MULTIPORT));
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        let queue = |t: &mut PciTransport, i: u16| -> Queue {
            Queue::new(t, i, false, false).unwrap_or_else(|e| fail!("agent: queue {}: {:?}", i, e))
        };
        let port0 = (queue(&mut t, 0), queue(&mut t, 1));
        let ctrl_rx = queue(&mut t, CTRL_RX);
        let ctrl_tx = queue(&mut t, CTRL_TX);
        let port_rx = queue(&mut t, PORT_RX);
        let port_tx = queue(&mut t, PORT_TX);
        t.finish_init();
        let ctrl_rx = RxBufs::new(ctrl_rx, 4, 64, &mut t, CTRL_RX);
        let port_rx = RxBufs::new(port_rx, 4, 512, &mut t, PORT_RX);
        let mut a = Agent {
            t,
            ctrl_rx,
            ctrl_tx,
            port_rx,
            port_tx,
            _port0: port0,
            line: Vec::new(),
            dropping: false,
            frozen: false,
            host_open: false,
            named: false,
        };
        a.control(u32::MAX, DEVICE_READY, 1);
        while !(a.named && a.host_open) {
            a.poll_control();
            core::hint::spin_loop();
        }
        a.control(AGENT_PORT, PORT_OPEN, 1);
        println!("agent ready port=org.qemu.guest_agent.0");
        a
    }

    fn control(&mut self, id: u32, event: u16, value: u16) {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        if let Err(e) = self
            .ctrl_tx
            .add_notify_wait_pop(&[&m], &mut [], &mut self.t)
        {
            fail!("agent: control send: {:?}", e);
        }
    }

    fn poll_control(&mut self) {
        while let Some(m) = self.ctrl_rx.pop(&mut self.t, CTRL_RX, |b| b.to_vec()) {
            if m.len() < 8 {
                fail!("agent: control message of {} bytes", m.len());
            }
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            match event {
                DEVICE_ADD => self.control(id, PORT_READY, 1),
                CONSOLE_PORT => self.control(id, PORT_OPEN, 1),
                PORT_NAME if id == AGENT_PORT => {
                    if &m[8..] != NAME {
                        fail!("agent: port 1 is named {:?}", core::str::from_utf8(&m[8..]));
                    }
                    self.named = true;
                }
                PORT_OPEN if id == AGENT_PORT => self.host_open = value != 0,
                _ => {}
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(1024) {
            if let Err(e) = self
                .port_tx
                .add_notify_wait_pop(&[chunk], &mut [], &mut self.t)
            {
                fail!("agent: port send: {:?}", e);
            }
        }
    }

    /// Serves whatever arrived: control messages, then each complete command line.
    pub fn poll(&mut self, work: &mut dyn Freezable) {
        self.poll_control();
        let mut lines = Vec::new();
        while let Some(bytes) = self.port_rx.pop(&mut self.t, PORT_RX, |b| b.to_vec()) {
            for &c in &bytes {
                if c == b'\n' {
                    if !self.dropping {
                        lines.push(core::mem::take(&mut self.line));
                    }
                    self.line.clear();
                    self.dropping = false;
                } else if self.line.len() < MAX_LINE {
                    self.line.push(c);
                } else {
                    self.dropping = true;
                }
            }
        }
        for l in lines {
            self.command(&l, work);
        }
    }

    fn command(&mut self, line: &[u8], work: &mut dyn Freezable) {
        let line = String::from_utf8_lossy(line);
        let Some(cmd) = string_after(&line, "\"execute\"") else {
            return self
                .send(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no execute\"}}\n");
        };
        println!("agent cmd={}", cmd);
        let reply = match cmd {
            "guest-sync-delimited" | "guest-sync" => {
                let id = number_after(&line, "\"id\"").unwrap_or(0);
                if cmd == "guest-sync-delimited" {
                    self.send(&[0xFF]);
                }
                format!("{{\"return\": {}}}", id)
            }
            "guest-ping" => String::from("{\"return\": {}}"),
            "guest-fsfreeze-freeze" if self.frozen => String::from(
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"the filesystems are already frozen\"}}",
            ),
            "guest-fsfreeze-freeze" => {
                let n = work.freeze();
                self.frozen = true;
                println!("agent frozen filesystems={}", n);
                format!("{{\"return\": {}}}", n)
            }
            "guest-fsfreeze-thaw" => {
                let n = if self.frozen { work.thaw() } else { 0 };
                self.frozen = false;
                println!("agent thawed filesystems={}", n);
                format!("{{\"return\": {}}}", n)
            }
            "guest-fsfreeze-status" => format!(
                "{{\"return\": \"{}\"}}",
                if self.frozen { "frozen" } else { "thawed" }
            ),
            other => format!(
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {} has not been found\"}}}}",
                other
            ),
        };
        self.send(reply.as_bytes());
        self.send(b"\n");
    }
}

/// The string value after `key` (`"key": "value"`).
fn string_after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let rest = &s[s.find(key)? + key.len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// The unsigned number after `key` (`"key": 123`).
fn number_after(s: &str, key: &str) -> Option<u64> {
    let rest = &s[s.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
