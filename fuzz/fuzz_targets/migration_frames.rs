//! Migration protocol frames from a hostile peer: every frame the receiver
//! reads, page-run payloads (plain and zstd), and a frame that parsed must
//! survive a send/recv round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::protocol::{self, Message};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    for _ in 0..64 {
        let Ok(m) = protocol::recv(&mut r) else {
            break;
        };
        if let Message::Pages(p) = &m {
            if let Ok(runs) = protocol::runs(p) {
                for run in runs {
                    if let Some(d) = run.data {
                        assert_eq!(d.len() as u64, u64::from(run.pages) * 4096);
                    }
                }
            }
        }
        let mut out = Vec::new();
        if protocol::send(&mut out, &m).is_ok() {
            let back = protocol::recv(&mut out.as_slice()).expect("a sent frame parses");
            assert_eq!(format!("{back:?}"), format!("{m:?}"), "round trip");
        }
    }
});
