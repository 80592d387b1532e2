//! x86_64 specifics: vCPU register set-up, PVH boot information, ACPI tables, NUMA.

pub mod acpi;
pub mod cpu;
pub mod cpu_state;
pub mod linux;
pub mod numa;
pub mod pvh;
