//! PCI from a hostile guest: configuration-space reads and writes (BARs,
//! command, capabilities, the MSI-X capability) and BAR MMIO (virtio common
//! configuration, notifications, ISR, device configuration, the MSI-X table
//! and PBA) on a virtio-pci device, in any order and width; and the MSI-X
//! table on its own (entries, masks, signals).
#![no_main]

use devices::interrupt::{MsiMessage, MsiSink};
use devices::pci::{MsixTable, PciDevice};
use devices::virtio::rng::Rng;
use devices::virtio::{GuestMemoryMmap, VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vireo_fuzz::Input;
use vm_memory::GuestAddress;

struct Sink;
impl MsiSink for Sink {
    fn deliver(&self, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

fn width(inp: &mut Input<'_>) -> usize {
    [1, 2, 4, 8][usize::from(inp.u8() % 4)]
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    if inp.u8() & 1 == 0 {
        let mut t = MsixTable::new(u16::from(inp.u8() % 9) + 1);
        for _ in 0..256 {
            if inp.is_empty() {
                break;
            }
            let off = u64::from(inp.u16());
            match inp.u8() % 5 {
                0 => {
                    let n = width(&mut inp);
                    let d = inp.bytes(n).to_vec();
                    t.write_table(off, &d, &Sink);
                }
                1 => {
                    let mut b = vec![0u8; width(&mut inp)];
                    t.read_table(off, &mut b);
                }
                2 => {
                    let mut b = vec![0u8; width(&mut inp)];
                    t.read_pba(off, &mut b);
                }
                3 => {
                    let v = inp.u8();
                    t.set_control(v & 1 == 1, v & 2 == 2, &Sink);
                }
                _ => {
                    let _ = t.signal(inp.u16(), &Sink);
                }
            }
        }
        let s = t.state();
        let mut back = MsixTable::new(1);
        let _ = back.restore(&s);
        return;
    }
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory"),
    );
    let Ok(mut dev) = VirtioPciDevice::new(Box::new(Rng::new()), mem, Arc::new(Sink)) else {
        return;
    };
    for _ in 0..256 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 4 {
            0 => {
                let reg = usize::from(inp.u8());
                let off = u64::from(inp.u8() % 4);
                let n = width(&mut inp).min(4);
                let d = inp.bytes(n).to_vec();
                dev.write_config_register(reg, off, &d);
            }
            1 => {
                let _ = dev.read_config_register(usize::from(inp.u8()));
            }
            2 => {
                let off = u64::from(inp.u16()) % VIRTIO_PCI_BAR_SIZE;
                let n = width(&mut inp);
                let d = inp.bytes(n).to_vec();
                dev.write_bar(0, off, &d);
            }
            _ => {
                let off = u64::from(inp.u16()) % VIRTIO_PCI_BAR_SIZE;
                let mut b = vec![0u8; width(&mut inp)];
                dev.read_bar(0, off, &mut b);
            }
        }
    }
    let _ = dev.state();
    dev.pause();
});
