//! A hostile vfio-user server: the real client (`devices::vfio_user::UserPciDevice`,
//! version negotiation, DEVICE_GET_INFO, region and IRQ info, the configuration
//! space read, the MSI-X capability walk and layout checks, DMA_MAP, SET_IRQS, then
//! BAR accesses) over a socketpair whose other end answers each request with the
//! next reply the input scripts: well-formed headers with arbitrary payloads, error
//! replies, arbitrary headers (id, command, size, flags) or a closed connection.
//!
//! Besides "no panic, no hang": the server side checks every REGION_READ/WRITE the
//! client sends against the region sizes it announced in replies the client
//! accepted (so nothing outside a validated size reaches the server), and every
//! SET_IRQS against the vectors it announced.
//!
//! Input: u16 n, then n bytes of BAR/configuration accesses the guest makes once the
//! device is up, then the reply script (one entry per request, in order; the end of
//! the input closes the connection).
#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use devices::interrupt::{MsiMessage, MsiSink};
use devices::pci::PciDevice;
use devices::vfio_user::UserPciDevice;
use libfuzzer_sys::fuzz_target;
use vireo_fuzz::Input;

const HEADER: usize = 16;
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_ACCESS: u64 = 4096;
const DEVICE_GET_REGION_INFO: u16 = 5;
const DEVICE_GET_IRQ_INFO: u16 = 7;
const DEVICE_SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
/// What the client maps for DMA (one range of this file).
const DMA: (u64, u64, u64) = (0, 0x1000_0000, 0x10_0000);

struct Sink;
impl MsiSink for Sink {
    fn deliver(&self, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// The server: answers requests from `script` and returns what the client did wrong.
fn serve(mut s: UnixStream, mut script: Input<'_>) -> Vec<String> {
    let mut bad = Vec::new();
    // The largest size each region / vector count each IRQ index was given in a
    // reply the client accepted.
    let mut regions = [None::<u64>; 16];
    let mut irqs = [0u32; 16];
    loop {
        let mut hb = [0u8; HEADER];
        if s.read_exact(&mut hb).is_err() {
            return bad;
        }
        let id = u16::from_le_bytes([hb[0], hb[1]]);
        let command = u16::from_le_bytes([hb[2], hb[3]]);
        let size = u32_at(&hb, 4) as usize;
        let Some(len) = size.checked_sub(HEADER).filter(|&l| l <= MAX_PAYLOAD + 64) else {
            bad.push(format!("request of {size} bytes"));
            return bad;
        };
        let mut req = vec![0u8; len];
        if s.read_exact(&mut req).is_err() {
            return bad;
        }
        match command {
            REGION_READ | REGION_WRITE => {
                let (offset, region, count) = (
                    u64_at(&req, 0),
                    u32_at(&req, 8),
                    u64::from(u32_at(&req, 12)),
                );
                let limit = regions.get(region as usize).copied().flatten();
                let inside = offset
                    .checked_add(count)
                    .zip(limit)
                    .is_some_and(|(end, l)| end <= l);
                if count > MAX_ACCESS || !inside {
                    bad.push(format!(
                        "access of {count} bytes at {offset:#x} of region {region}, announced {limit:?}"
                    ));
                }
                if command == REGION_WRITE && req.len() as u64 != 16 + count {
                    bad.push(format!(
                        "write of {count} bytes carrying {}",
                        req.len() - 16
                    ));
                }
            }
            DEVICE_SET_IRQS => {
                let (index, start, count) = (u32_at(&req, 8), u32_at(&req, 12), u32_at(&req, 16));
                let have = irqs.get(index as usize).copied().unwrap_or(0);
                if start.checked_add(count).is_none_or(|end| end > have) {
                    bad.push(format!(
                        "SET_IRQS {start}+{count} of index {index}, announced {have}"
                    ));
                }
            }
            _ => {}
        }
        let mode = script.u8() % 8;
        let (header, payload) = match mode {
            0 => return bad,
            1 => {
                // Any header; a payload of the size it names (when the client would
                // read that much), so the stream stays in step.
                let h = script.bytes(HEADER);
                let mut h = h.to_vec();
                h.resize(HEADER, 0);
                let n = (u32_at(&h, 4) as usize)
                    .checked_sub(HEADER)
                    .filter(|&n| n <= MAX_PAYLOAD)
                    .unwrap_or(0);
                let mut p = script.bytes(n).to_vec();
                p.resize(n, 0);
                (h, p)
            }
            _ => {
                // A reply to this request: mode 2 with the error flag.
                let n = usize::from(script.u16()).min(MAX_PAYLOAD);
                let mut p = script.bytes(n).to_vec();
                p.resize(n, 0);
                let mut h = Vec::with_capacity(HEADER);
                h.extend_from_slice(&id.to_le_bytes());
                h.extend_from_slice(&command.to_le_bytes());
                h.extend_from_slice(&((HEADER + n) as u32).to_le_bytes());
                let (flags, errno) = if mode == 2 {
                    (1u32 | (1 << 5), script.u32())
                } else {
                    (1u32, 0)
                };
                h.extend_from_slice(&flags.to_le_bytes());
                h.extend_from_slice(&errno.to_le_bytes());
                (h, p)
            }
        };
        // What the client accepts as this request's reply (as it checks).
        let rflags = u32_at(&header, 8);
        let accepted = rflags & 0xf == 1
            && rflags & (1 << 5) == 0
            && header[0..2] == hb[0..2]
            && header[2..4] == hb[2..4]
            && u32_at(&header, 4) as usize == HEADER + payload.len();
        if accepted {
            let index = u32_at(&req, 8);
            match command {
                DEVICE_GET_REGION_INFO if payload.len() >= 32 && u32_at(&payload, 8) == index => {
                    if let Some(r) = regions.get_mut(index as usize) {
                        *r = Some(r.unwrap_or(0).max(u64_at(&payload, 16)));
                    }
                }
                DEVICE_GET_IRQ_INFO if payload.len() >= 16 && u32_at(&payload, 8) == index => {
                    if let Some(c) = irqs.get_mut(index as usize) {
                        *c = (*c).max(u32_at(&payload, 12));
                    }
                }
                _ => {}
            }
        }
        if s.write_all(&[&header[..], &payload[..]].concat()).is_err() {
            return bad;
        }
    }
}

fn dma_file() -> &'static File {
    static F: OnceLock<File> = OnceLock::new();
    F.get_or_init(|| File::open("/dev/zero").expect("/dev/zero"))
}

/// The VMM's side: set-up over `client`, then the guest's accesses from `acc`; the
/// device (and the client's end of the socket) is dropped on return.
fn drive(client: UnixStream, mut acc: Input<'_>) {
    let file = dma_file();
    let dev = UserPciDevice::over_stream(
        "fuzz",
        Path::new("<fuzz>"),
        client,
        &[(file, DMA.0, DMA.1, DMA.2)],
        Arc::new(Sink),
    );
    let Ok(mut dev) = dev else {
        return;
    };
    for _ in 0..64 {
        if acc.is_empty() {
            break;
        }
        let kind = acc.u8();
        let bar = usize::from(acc.u8() % 7);
        let offset = u64::from(acc.u32());
        let len = [1, 2, 4, 8, 4096, 4097][usize::from(acc.u8() % 6)];
        match kind % 4 {
            0 => {
                let mut d = vec![0u8; len];
                dev.read_bar(bar, offset, &mut d);
            }
            1 => {
                let d = acc.bytes(len).to_vec();
                dev.write_bar(bar, offset, &d);
            }
            2 => {
                // Configuration space (the MSI-X enable bit among it).
                let reg = (offset % 64) as usize;
                let d = acc.bytes(4).to_vec();
                dev.write_config_register(reg, 0, &d);
            }
            _ => {
                let _ = dev.status().failure();
            }
        }
    }
}

fuzz_target!(
    init: {
        // libFuzzer's main is not Rust's: SIGPIPE is not ignored, and a write to a
        // server that closed its end must be an error (as in the VMM), not a kill.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    },
    |data: &[u8]| {
    let mut inp = Input(data);
    let n = usize::from(inp.u16());
    let acc = Input(inp.bytes(n));
    let script = Input(inp.0);
    let (client, server) = UnixStream::pair().expect("socketpair");
    let bad = std::thread::scope(|sc| {
        let srv = sc.spawn(move || serve(server, script));
        drive(client, acc);
        // The client's end is closed by now: the server has returned.
        srv.join().expect("server thread")
    });
    assert!(bad.is_empty(), "the client sent: {bad:?}");
});
