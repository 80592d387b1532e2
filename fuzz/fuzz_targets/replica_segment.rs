//! A Vireo Replica segment from a hostile peer: the reader must refuse or accept
//! without panicking or allocating beyond its bound, and an accepted segment's
//! records must add up to what its trailer claims and lie inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica::{RecordKind, SegmentReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = SegmentReader::new(data) else {
        return;
    };
    let size = r.disk_size();
    let (mut records, mut data_bytes) = (0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        match r.next_record(&mut buf) {
            Ok(Some(rec)) => {
                assert!(rec.offset + rec.len <= size, "a record beyond the disk");
                if rec.kind == RecordKind::Data {
                    assert_eq!(buf.len() as u64, rec.len);
                    data_bytes += rec.len;
                }
                records += 1;
            }
            Ok(None) => {
                let t = r.trailer().expect("a verified segment has a trailer");
                assert_eq!((t.records, t.data_bytes), (records, data_bytes));
                return;
            }
            Err(_) => return,
        }
    }
});
