//! What wakes the control loop (`vmm.rs`): the events vCPU threads, devices, the API
//! thread and migration threads send it, and why the VMM stops.

use api::ApiRequest;
use devices::legacy::PowerEvent;

use crate::live::MigrationEvent;
use crate::vcpu::VcpuEvent;

/// Everything that wakes the control loop.
pub enum ControlEvent {
    Vcpu(VcpuEvent),
    Power(PowerEvent),
    Api(ApiRequest),
    Migration(MigrationEvent),
}

/// Why the VMM stopped; decides the process exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// Clean power-off (ACPI S5, debug-exit 0, `vm.shutdown`, `vmm.shutdown`): status 0.
    PowerOff,
    /// The guest reported failure through the debug-exit port: status 2.
    GuestFailure(u32),
    /// The VM could not continue: status 1.
    Crashed(String),
    /// The VM now runs at a migration destination: status 0.
    Migrated,
}

impl VmmExit {
    pub fn status(&self) -> i32 {
        match self {
            VmmExit::PowerOff | VmmExit::Migrated => 0,
            VmmExit::GuestFailure(_) => 2,
            VmmExit::Crashed(_) => 1,
        }
    }
}
