//! x86_64 specifics: vCPU register set-up, PVH boot information, ACPI tables.

pub mod acpi;
pub mod cpu;
pub mod cpu_state;
pub mod linux;
pub mod pvh;
