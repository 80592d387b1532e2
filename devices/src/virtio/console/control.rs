//! The multiport control protocol (virtio 1.2, section 5.3.6.2), without queues: what
//! the device answers to each message the driver sends on the control transmit queue.
//!
//! The device has two ports: port 0 is the console, port 1 is the guest agent's port,
//! named [`AGENT_PORT_NAME`] so a Linux guest's udev rule links it as
//! `/dev/virtio-ports/org.qemu.guest_agent.0` (where a stock `qemu-ga` looks). The
//! exchange is QEMU's: the driver says DEVICE_READY, the device adds each port
//! (DEVICE_ADD); the driver says PORT_READY for each; the device answers CONSOLE_PORT
//! for port 0, PORT_NAME for port 1, and PORT_OPEN for both (the host ends are always
//! there); the driver says PORT_OPEN when a guest program opens or closes a port.

use serde::{Deserialize, Serialize};

/// The name of the guest agent's port (QEMU's and libvirt's convention).
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Ports of a multiport console: the console and the guest agent's.
pub const NR_PORTS: u32 = 2;
/// The console port.
pub const CONSOLE_PORT: u32 = 0;
/// The guest agent's port.
pub const AGENT_PORT: u32 = 1;
/// Size of `struct virtio_console_control` (id: le32, event: le16, value: le16).
pub const HEADER_LEN: usize = 8;

/// Control events (virtio 1.2, 5.3.6.2).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const DEVICE_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// One control message; `name` is the payload of PORT_NAME (empty for the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMsg {
    pub id: u32,
    pub event: u16,
    pub value: u16,
    pub name: Vec<u8>,
}

impl ControlMsg {
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        Self {
            id,
            event,
            value,
            name: Vec::new(),
        }
    }

    /// The wire form: the header, then the name (PORT_NAME only).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.name.len());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.event.to_le_bytes());
        b.extend_from_slice(&self.value.to_le_bytes());
        b.extend_from_slice(&self.name);
        b
    }

    /// Reads the header of a message the driver sent (bytes past it are ignored: the
    /// driver sends no payload).
    pub fn parse(bytes: &[u8]) -> Result<Self, ControlError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(ControlError::Short { len: bytes.len() });
        };
        Ok(Self::new(
            u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            u16::from_le_bytes([h[4], h[5]]),
            u16::from_le_bytes([h[6], h[7]]),
        ))
    }
}

/// A control message the device refuses (it is dropped; the device goes on).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control message of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("control message {event} names port {id}, which does not exist (ports 0..{NR_PORTS})")]
    UnknownPort { id: u32, event: u16 },
    #[error("control event {event} is not one a driver sends")]
    UnexpectedEvent { event: u16 },
}

/// What the driver has told the device so far (kept across pause and snapshot, cleared
/// by a reset).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// DEVICE_READY(1) seen: the ports were added.
    pub device_ready: bool,
    /// PORT_READY(1) seen, per port.
    pub port_ready: [bool; NR_PORTS as usize],
    /// Whether a guest program has the port open (PORT_OPEN from the driver), per port.
    pub guest_open: [bool; NR_PORTS as usize],
}

/// What one driver message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// Messages for the driver, in order.
    pub replies: Vec<ControlMsg>,
    /// A note for the log when the message was well-formed but not acted on (a repeat,
    /// a driver's failure report).
    pub ignored: Option<&'static str>,
}

impl Control {
    /// Applies one driver message. A repeated DEVICE_READY or PORT_READY gets no new
    /// replies, so a driver flooding the control queue makes the device send at most
    /// six messages between resets.
    pub fn handle(&mut self, msg: &ControlMsg) -> Result<Handled, ControlError> {
        let mut out = Handled::default();
        match msg.event {
            event::DEVICE_READY => {
                if msg.value == 0 {
                    out.ignored = Some("the driver failed to set up the device");
                } else if self.device_ready {
                    out.ignored = Some("DEVICE_READY repeated");
                } else {
                    self.device_ready = true;
                    out.replies = (0..NR_PORTS)
                        .map(|id| ControlMsg::new(id, event::DEVICE_ADD, 1))
                        .collect();
                }
            }
            event::PORT_READY => {
                let i = port_index(msg)?;
                if msg.value == 0 {
                    out.ignored = Some("the driver failed to add the port");
                } else if self.port_ready[i] {
                    out.ignored = Some("PORT_READY repeated");
                } else {
                    self.port_ready[i] = true;
                    if msg.id == CONSOLE_PORT {
                        out.replies
                            .push(ControlMsg::new(msg.id, event::CONSOLE_PORT, 1));
                    } else {
                        let mut name = ControlMsg::new(msg.id, event::PORT_NAME, 1);
                        name.name = AGENT_PORT_NAME.as_bytes().to_vec();
                        out.replies.push(name);
                    }
                    out.replies
                        .push(ControlMsg::new(msg.id, event::PORT_OPEN, 1));
                }
            }
            event::PORT_OPEN => {
                let i = port_index(msg)?;
                self.guest_open[i] = msg.value != 0;
            }
            event => return Err(ControlError::UnexpectedEvent { event }),
        }
        Ok(out)
    }
}

fn port_index(msg: &ControlMsg) -> Result<usize, ControlError> {
    if msg.id < NR_PORTS {
        Ok(msg.id as usize)
    } else {
        Err(ControlError::UnknownPort {
            id: msg.id,
            event: msg.event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u32, event: u16, value: u16) -> ControlMsg {
        ControlMsg::new(id, event, value)
    }

    #[test]
    fn the_linux_handshake_adds_both_ports_names_the_agent_port_and_opens_them() {
        let mut c = Control::default();
        let added = c.handle(&msg(u32::MAX, event::DEVICE_READY, 1)).unwrap();
        assert_eq!(
            added.replies,
            vec![msg(0, event::DEVICE_ADD, 1), msg(1, event::DEVICE_ADD, 1)]
        );
        let console = c.handle(&msg(0, event::PORT_READY, 1)).unwrap();
        assert_eq!(
            console.replies,
            vec![msg(0, event::CONSOLE_PORT, 1), msg(0, event::PORT_OPEN, 1)]
        );
        let agent = c.handle(&msg(1, event::PORT_READY, 1)).unwrap();
        assert_eq!(agent.replies.len(), 2);
        assert_eq!(agent.replies[0].event, event::PORT_NAME);
        assert_eq!(agent.replies[0].name, b"org.qemu.guest_agent.0");
        assert_eq!(agent.replies[1], msg(1, event::PORT_OPEN, 1));
        // The wire form of PORT_NAME: header then the name, no terminator.
        let wire = agent.replies[0].to_bytes();
        assert_eq!(&wire[..8], &[1, 0, 0, 0, 7, 0, 1, 0]);
        assert_eq!(&wire[8..], b"org.qemu.guest_agent.0");

        assert!(!c.guest_open[1]);
        c.handle(&msg(1, event::PORT_OPEN, 1)).unwrap();
        assert!(c.guest_open[1] && !c.guest_open[0]);
        c.handle(&msg(1, event::PORT_OPEN, 0)).unwrap();
        assert!(!c.guest_open[1]);
    }

    #[test]
    fn hostile_messages_are_refused_by_name_and_change_nothing() {
        let mut c = Control::default();
        assert_eq!(
            c.handle(&msg(2, event::PORT_READY, 1)),
            Err(ControlError::UnknownPort {
                id: 2,
                event: event::PORT_READY
            })
        );
        assert_eq!(
            c.handle(&msg(u32::MAX, event::PORT_OPEN, 1)),
            Err(ControlError::UnknownPort {
                id: u32::MAX,
                event: event::PORT_OPEN
            })
        );
        for e in [
            event::DEVICE_ADD,
            event::DEVICE_REMOVE,
            event::CONSOLE_PORT,
            event::RESIZE,
            event::PORT_NAME,
            99,
        ] {
            assert_eq!(
                c.handle(&msg(0, e, 1)),
                Err(ControlError::UnexpectedEvent { event: e })
            );
        }
        assert_eq!(c, Control::default());
        assert_eq!(
            ControlMsg::parse(&[1, 2, 3]),
            Err(ControlError::Short { len: 3 })
        );
        let long = [msg(1, event::PORT_OPEN, 1).to_bytes(), vec![0xAA; 100]].concat();
        assert_eq!(ControlMsg::parse(&long), Ok(msg(1, event::PORT_OPEN, 1)));
    }

    #[test]
    fn a_flood_of_ready_messages_gets_six_replies_in_all() {
        let mut c = Control::default();
        let mut replies = 0;
        for i in 0..10_000u32 {
            for m in [
                msg(0, event::DEVICE_READY, 1),
                msg(i % 2, event::PORT_READY, 1),
            ] {
                let h = c.handle(&m).unwrap();
                replies += h.replies.len();
            }
        }
        assert_eq!(replies, 6);
    }

    #[test]
    fn a_driver_failure_report_adds_nothing() {
        let mut c = Control::default();
        let h = c.handle(&msg(0, event::DEVICE_READY, 0)).unwrap();
        assert!(h.replies.is_empty() && h.ignored.is_some());
        assert!(!c.device_ready);
        let h = c.handle(&msg(1, event::PORT_READY, 0)).unwrap();
        assert!(h.replies.is_empty() && h.ignored.is_some());
        assert!(!c.port_ready[1]);
    }
}
