//! Host tool: verifies that a raw disk image holds the guest's pattern.
//! Build: rustc --edition 2021 -O tests/guest/pattern-check.rs -o pattern-check
//! Usage: pattern-check RAW_IMAGE SEED SECTORS [OFFSET]
//! Prints `host mismatches=<k> crc32=<hex of the image range> expected_crc32=<hex>`;
//! exits 0 iff no sector mismatches.

#[path = "pattern.rs"]
mod pattern;

use std::io::{Read, Seek, SeekFrom};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: pattern-check RAW_IMAGE SEED SECTORS [OFFSET]");
        std::process::exit(2);
    }
    let num = |s: &str| -> u64 {
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).expect("number"),
            None => s.parse().expect("number"),
        }
    };
    let (seed, sectors) = (num(&a[2]), num(&a[3]));
    let offset = a.get(4).map_or(0, |s| num(s));
    let mut f = std::fs::File::open(&a[1]).expect("open image");
    f.seek(SeekFrom::Start(offset * pattern::SECTOR_SIZE as u64))
        .expect("seek");
    let mut crc = pattern::Crc32::new();
    let mut bad = 0u64;
    let mut s = [0u8; pattern::SECTOR_SIZE];
    for i in 0..sectors {
        f.read_exact(&mut s).expect("read (image too short?)");
        crc.update(&s);
        if !pattern::check_sector(seed, offset + i, &s) {
            bad += 1;
        }
    }
    println!(
        "host mismatches={} crc32={:08x} expected_crc32={:08x}",
        bad,
        crc.finish(),
        pattern::expected_crc32(seed, offset, sectors)
    );
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
