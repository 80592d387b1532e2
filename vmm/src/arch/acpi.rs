//! ACPI tables (hardware-reduced): RSDP → XSDT → FADT (→ DSDT), MADT, MCFG (and with
//! virtual NUMA the SRAT and SLIT), so the guest finds its CPUs, the PCIe ECAM, its nodes
//! and how to power off.

use acpi_tables::fadt::FADTBuilder;
use acpi_tables::madt::{IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use devices::legacy::{
    ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_SLP_TYP_S5, GED_IRQ, GED_POWER_BUTTON, GED_SIZE, GED_START,
};
use devices::virtio::GuestMemoryMmap;

use crate::layout;

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({size} bytes) do not fit below 1 MiB")]
    TooBig { size: u64 },
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// \_SB_.GED_ (the Generic Event Device: its register, its interrupt and the `_EVT`
/// method that turns the power-button flag into a notification) and \_SB_.PWRB.
fn ged_and_power_button() -> Vec<u8> {
    // Consumer, edge-triggered, active high, exclusive: the IOAPIC pin we raise.
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&irq]);
    let (ged_start, ged_size) = (GED_START as usize, GED_SIZE as usize);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &ged_start,
        &ged_size,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let power_button = GED_POWER_BUTTON as usize;
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let masked = aml::And::new(&aml::Local(1), &aml::Local(0), &power_button);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80usize);
    let pressed = aml::Equal::new(&aml::Local(1), &power_button);
    let if_pressed = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &masked, &if_pressed]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &ged_crs);
    let ged = aml::Device::new(
        "_SB_.GED_".into(),
        vec![&ged_hid, &uid, &crs, &region, &field, &evt],
    );
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_dev = aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &uid]);
    let mut body = Vec::new();
    ged.to_aml_bytes(&mut body);
    pwrb_dev.to_aml_bytes(&mut body);
    body
}

fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5_: the sleep type the guest writes to power off.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&ACPI_SLP_TYP_S5]));
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.append_slice(&ged_and_power_button());
    to_bytes(&dsdt)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).dsdt_64(dsdt_addr);
    // Hardware reduced (bit 20), reset register supported (bit 10), power button as
    // a control method (bit 4).
    f.flags = ((1u32 << 20) | (1 << 10) | (1 << 4)).into();
    let port = |off: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT + off,
        )
    };
    f.sleep_control_reg = port(0);
    f.sleep_status_reg = port(1);
    f.reset_reg = port(0);
    f.reset_value = ACPI_RESET_VALUE;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIREOKVM").into();
    to_bytes(&f.finalize())
}

/// The MADT: one enabled Local APIC per vCPU (processor UID = vCPU index, APIC ID from
/// the topology), and the IOAPIC.
fn madt(apic_ids: &[u8]) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for (uid, &apic) in apic_ids.iter().enumerate() {
        m.add_structure(ProcessorLocalApic::new(
            uid as u8,
            apic,
            acpi_tables::madt::EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    to_bytes(&m)
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(layout::ECAM_START, 0, 0, 0);
    to_bytes(&m)
}

/// What the tables describe beyond the fixed platform.
pub struct Machine<'a> {
    /// APIC IDs of the vCPUs, in vCPU order.
    pub apic_ids: &'a [u8],
    /// Virtual NUMA nodes (none: no SRAT/SLIT).
    pub numa: &'a [api::numa::NumaNode],
    /// Each node's guest-physical ranges (node, base, length).
    pub numa_ranges: &'a [(u32, u64, u64)],
}

/// Writes every table into the ACPI area; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, machine: &Machine<'_>) -> Result<u64, AcpiError> {
    let apic_ids = machine.apic_ids;
    let rsdp_addr = layout::ACPI_START;
    let mut cursor = rsdp_addr + 0x40;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = cursor;
        cursor = (cursor + bytes.len() as u64 + 7) & !7;
        if cursor > layout::ACPI_END {
            return Err(AcpiError::TooBig {
                size: cursor - layout::ACPI_START,
            });
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(AcpiError::Write)?;
        Ok(at)
    };
    let dsdt_addr = place(&dsdt())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(apic_ids))?;
    let mcfg_addr = place(&mcfg())?;
    let mut tables = vec![fadt_addr, madt_addr, mcfg_addr];
    if !machine.numa.is_empty() {
        let srat = super::numa::srat(machine.numa, apic_ids, machine.numa_ranges);
        tables.push(place(&srat)?);
        tables.push(place(&super::numa::slit(machine.numa))?);
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for t in tables {
        xsdt.add_entry(t);
    }
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&to_bytes(&rsdp), GuestAddress(rsdp_addr))
        .map_err(AcpiError::Write)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [dsdt(), fadt(0x1000), madt(&[0, 1, 2, 3]), mcfg()] {
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len(), "{}", String::from_utf8_lossy(&t[..4]));
            assert!(checksum_ok(&t), "{}", String::from_utf8_lossy(&t[..4]));
        }
        let d = dsdt();
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        // The GED (its HID, register and _EVT method) and the power button device.
        assert!(has(b"ACPI0013") && has(b"GDAT") && has(b"_EVT") && has(b"PWRB"));
        assert!(
            has(&(GED_START as u32).to_le_bytes()),
            "GED register address"
        );
        // 4 local APICs of 8 bytes + one IOAPIC of 12 after the 44-byte header.
        assert_eq!(madt(&[0, 1, 2, 3]).len(), 44 + 4 * 8 + 12);
    }
}
