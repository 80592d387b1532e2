//! Helpers of the fuzz targets: turning fuzz input into VHDX images that get
//! past the checksums (so the fuzzer reaches the BAT, metadata, parent
//! locator and log replay), and small readers of the input.

use std::sync::OnceLock;
use vhdx::{CreateOptions, DiskKind, Vhdx};

/// Reads the fuzz input front to back; past the end every read is zero.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// The images every VHDX input starts from: a dynamic disk and a
/// differencing child (which has a parent locator), made by the engine.
pub struct Bases {
    pub dynamic: Vec<u8>,
    pub child: Vec<u8>,
}

pub fn bases() -> &'static Bases {
    static B: OnceLock<Bases> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let parent = dir.path().join("parent.vhdx");
        let opts = CreateOptions {
            size: 8 << 20,
            block_size: Some(1 << 20),
            ..Default::default()
        };
        let v = Vhdx::create(&parent, &opts).expect("create base");
        v.write_at(&[0xa5; 4096], 1 << 20).expect("write base");
        v.close().expect("close base");
        let child = dir.path().join("child.vhdx");
        let c = Vhdx::create(
            &child,
            &CreateOptions {
                kind: DiskKind::Differencing {
                    parent: parent.clone(),
                },
                ..opts
            },
        )
        .expect("create child");
        c.write_at(&[0x5a; 512], 3 << 20).expect("write child");
        c.close().expect("close child");
        Bases {
            dynamic: std::fs::read(&parent).expect("read base"),
            child: std::fs::read(&child).expect("read child"),
        }
    })
}

const KIB: usize = 1024;
const HEADERS: [usize; 2] = [64 * KIB, 128 * KIB];
const REGION_TABLES: [usize; 2] = [192 * KIB, 256 * KIB];
const LOG_OFFSET: usize = 1 << 20;
const LOG_LEN: usize = 1 << 20;
/// The log GUID a fuzzed log is written under.
pub const LOG_GUID: [u8; 16] = *b"fuzz-log-guid-01";

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
/// CRC-32C with the checksum at byte 4 (headers, region tables, log entries).
fn fix_crc(b: &mut [u8]) {
    put32(b, 4, 0);
    let c = crc32c::crc32c(b);
    put32(b, 4, c);
}

/// (offset, length) of the region whose GUID starts with `first4` in region
/// table 1, if it is there and inside the file.
fn region(f: &[u8], first4: [u8; 4]) -> Option<(usize, usize)> {
    let rt = REGION_TABLES[0];
    let n = (le32(f, rt + 8) as usize).min(2047);
    (0..n).map(|i| rt + 16 + i * 32).find_map(|e| {
        (f[e..e + 4] == first4).then(|| (le64(f, e + 16) as usize, le32(f, e + 24) as usize))
    })
}

/// Builds an image from fuzz input:
///
/// - byte 0: bit 0 picks the base (dynamic or differencing child), bit 1
///   leaves checksums as the patches made them (else headers and region
///   tables get valid CRCs again), bit 2 means the rest is a whole image in
///   sparse form instead (see [`sparse_image`]);
/// - then records: `sel: u8`; a record with bit 7 of `sel` set writes a log
///   entry (valid CRC) built from the next bytes, else `sel % 8` picks a
///   structure (file identifier, headers, region tables, log, metadata
///   region, BAT), followed by `off: u16`, `len: u8` and `len` bytes
///   written at that offset inside it.
pub fn vhdx_image(data: &[u8]) -> Vec<u8> {
    let mut inp = Input(data);
    let flags = inp.u8();
    if flags & 4 != 0 {
        return sparse_image(inp);
    }
    let b = bases();
    let mut f = if flags & 1 == 0 {
        b.dynamic.clone()
    } else {
        b.child.clone()
    };
    let meta = region(&f, [0x06, 0xa2, 0x7c, 0x8b]).unwrap_or((2 << 20, 1 << 20));
    let bat = region(&f, [0x66, 0x77, 0xc2, 0x2d]).unwrap_or((3 << 20, 1 << 20));
    let mut log_head = 0usize;
    let mut seq = 1u64;
    let mut log_used = false;
    while !inp.is_empty() {
        let sel = inp.u8();
        if sel & 0x80 != 0 {
            if let Some(e) = log_entry(&mut inp, seq, log_head, f.len() as u64) {
                let at = LOG_OFFSET + log_head;
                if log_head + e.len() <= LOG_LEN {
                    f[at..at + e.len()].copy_from_slice(&e);
                    log_head += e.len();
                    seq += 1;
                    log_used = true;
                }
            }
            continue;
        }
        let base = match sel % 8 {
            0 => 0,
            1 => HEADERS[0],
            2 => HEADERS[1],
            3 => REGION_TABLES[0],
            4 => REGION_TABLES[1],
            5 => LOG_OFFSET,
            6 => meta.0,
            _ => bat.0,
        };
        let off = base.saturating_add(usize::from(inp.u16()));
        let len = usize::from(inp.u8());
        let bytes = inp.bytes(len);
        if let Some(dst) = f.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    if log_used {
        for h in HEADERS {
            f[h + 48..h + 64].copy_from_slice(&LOG_GUID);
        }
    }
    if flags & 2 == 0 {
        for h in HEADERS {
            fix_crc(&mut f[h..h + 4096]);
        }
        for r in REGION_TABLES {
            fix_crc(&mut f[r..r + 64 * KIB]);
        }
    }
    f
}

/// A whole image in the seeds' sparse form (bit 2 of byte 0 set): the file
/// size in MiB (`u8`, at most 64), then its non-zero 4 KiB pages as (page
/// index `u16`, 4096 bytes). `fuzz/seeds/make-seeds` turns images made by
/// qemu-img into this form.
fn sparse_image(mut inp: Input<'_>) -> Vec<u8> {
    let mib = usize::from(inp.u8()).clamp(1, 64);
    let mut f = vec![0u8; mib << 20];
    while !inp.is_empty() {
        let at = usize::from(inp.u16()) * 4096;
        let page = inp.bytes(4096);
        if let Some(dst) = f.get_mut(at..at + page.len()) {
            dst.copy_from_slice(page);
        }
    }
    f
}

/// A log entry (MS-VHDX 2.3.1) from fuzz input: up to 4 descriptors, data
/// or zero, at 4 KiB-aligned targets; tail at the first entry.
fn log_entry(inp: &mut Input<'_>, seq: u64, _head: usize, file_len: u64) -> Option<Vec<u8>> {
    let n = usize::from(inp.u8() % 5);
    let mut pages: Vec<(u64, [u8; 4096])> = Vec::new();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    for _ in 0..n {
        let kind = inp.u8();
        let target = u64::from(inp.u16()) * 4096;
        if kind & 1 == 0 {
            let mut page = [0u8; 4096];
            let fill = inp.u8();
            page.fill(fill);
            let at = usize::from(inp.u16()) % 4096;
            let n = usize::from(inp.u8());
            let patch = inp.bytes(n);
            let end = (at + patch.len()).min(4096);
            page[at..end].copy_from_slice(&patch[..end - at]);
            pages.push((target, page));
        } else {
            zeros.push((target, u64::from(inp.u16()) * 4096));
        }
    }
    let last = file_len + u64::from(inp.u16()) * 4096;
    let dc = pages.len() + zeros.len();
    let hs = (64 + 32 * dc).div_ceil(4096);
    let len = (hs + pages.len()) * 4096;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    put32(&mut b, 8, len as u32);
    put32(&mut b, 12, 0);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, dc as u32);
    b[32..48].copy_from_slice(&LOG_GUID);
    put64(&mut b, 48, file_len);
    put64(&mut b, 56, last);
    let mut d = 64;
    for (off, len) in &zeros {
        b[d..d + 4].copy_from_slice(b"zero");
        put64(&mut b, d + 8, *len);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
    }
    for (i, (off, data)) in pages.iter().enumerate() {
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
        let s = (hs + i) * 4096;
        b[s..s + 4].copy_from_slice(b"data");
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, seq as u32);
    }
    fix_crc(&mut b);
    Some(b)
}

/// Most an in-memory image may grow to during a fuzz run (replay extends
/// the file to the size the log claims).
pub const MAX_GROWTH: u64 = 16 << 20;
