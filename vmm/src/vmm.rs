//! The control loop: the only place that changes the VM. vCPU threads, devices and the
//! API thread send it events; it applies lifecycle transitions and answers.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use api::{ApiError, ApiRequest, ApiResponse, VmAction, VmConfig};
use devices::legacy::PowerEvent;

use crate::vcpu::VcpuEvent;
use crate::vm::{Vm, VmError};

/// Everything that wakes the control loop.
pub enum ControlEvent {
    Vcpu(VcpuEvent),
    Power(PowerEvent),
    Api(ApiRequest),
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
}

impl VmmExit {
    pub fn status(&self) -> i32 {
        match self {
            VmmExit::PowerOff => 0,
            VmmExit::GuestFailure(_) => 2,
            VmmExit::Crashed(_) => 1,
        }
    }
}

pub struct Vmm {
    vm: Option<Vm>,
    seccomp: crate::seccomp::Filters,
    events_tx: Sender<ControlEvent>,
    events_rx: Receiver<ControlEvent>,
}

impl Vmm {
    pub fn new(seccomp: crate::seccomp::Filters) -> Self {
        let (events_tx, events_rx) = channel();
        Self {
            vm: None,
            seccomp,
            events_tx,
            events_rx,
        }
    }

    /// How the API server reaches this loop.
    pub fn api_dispatch(&self) -> api::Dispatch {
        let tx = Mutex::new(self.events_tx.clone());
        Arc::new(move |req| {
            tx.lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(ControlEvent::Api(req))
                .is_ok()
        })
    }

    pub fn create(&mut self, config: VmConfig) -> Result<(), VmError> {
        self.vm = Some(Vm::new(
            config,
            self.events_tx.clone(),
            self.seccomp.clone(),
        )?);
        Ok(())
    }

    /// Builds the VM from a snapshot directory (its serial output redirected if asked);
    /// it stays paused until `vm.resume`.
    pub fn restore(
        &mut self,
        dir: &std::path::Path,
        serial: Option<api::config::OutputConfig>,
    ) -> Result<(), VmError> {
        let mut snapshot: migration::Snapshot<VmConfig, crate::vm::SavedVm> =
            migration::Snapshot::open(dir)?;
        if let Some(s) = serial {
            snapshot.config.serial = s;
        }
        self.vm = Some(Vm::restore(
            &snapshot,
            self.events_tx.clone(),
            self.seccomp.clone(),
        )?);
        Ok(())
    }

    /// Resumes a restored (paused) VM.
    pub fn resume(&mut self) -> Result<(), VmError> {
        match &mut self.vm {
            Some(vm) => vm.resume(),
            None => Ok(()),
        }
    }

    pub fn boot(&mut self) -> Result<(), VmError> {
        match &mut self.vm {
            Some(vm) => vm.boot(),
            None => Ok(()),
        }
    }

    /// Replaces the VM with a fresh one from the same configuration and boots it.
    fn reboot(&mut self) -> Result<(), VmError> {
        let Some(mut old) = self.vm.take() else {
            return Ok(());
        };
        let config = old.config().clone();
        let _ = old.shutdown();
        drop(old); // Releases disk locks before the new VM takes them.
        let mut vm = Vm::new(config, self.events_tx.clone(), self.seccomp.clone())?;
        vm.boot()?;
        self.vm = Some(vm);
        tracing::info!("VM rebooted");
        Ok(())
    }

    /// Runs until the VM stops (or `vmm.shutdown`); returns why.
    pub fn run(&mut self) -> VmmExit {
        loop {
            let Ok(event) = self.events_rx.recv() else {
                return VmmExit::Crashed("control channel closed".into());
            };
            let exit = match event {
                ControlEvent::Power(PowerEvent::PowerOff) => Some(VmmExit::PowerOff),
                ControlEvent::Power(PowerEvent::GuestFailure(code)) => {
                    tracing::warn!(code, "guest reported failure");
                    Some(VmmExit::GuestFailure(code))
                }
                ControlEvent::Power(PowerEvent::Reset)
                | ControlEvent::Vcpu(VcpuEvent::Shutdown(_)) => {
                    tracing::info!("guest reset the machine");
                    self.reboot()
                        .err()
                        .map(|e| VmmExit::Crashed(format!("reboot failed: {e}")))
                }
                ControlEvent::Vcpu(VcpuEvent::Failed(id, why)) => {
                    Some(VmmExit::Crashed(format!("vCPU {id}: {why}")))
                }
                ControlEvent::Api(req) => self.handle_api(req),
            };
            if let Some(exit) = exit {
                if let Some(vm) = &mut self.vm {
                    let _ = vm.shutdown();
                }
                tracing::debug!("vCPUs stopped");
                // Dropping the VM stops device workers and flushes disks.
                self.vm = None;
                tracing::debug!("VM torn down");
                return exit;
            }
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm
            .as_mut()
            .ok_or_else(|| ApiError::not_found("no VM has been created (PUT vm.create first)"))
    }

    fn handle_api(&mut self, req: ApiRequest) -> Option<VmmExit> {
        let mut exit = None;
        let result: ApiResponse = match &req.action {
            VmAction::Ping => Ok(Some(
                serde_json::json!({"version": env!("CARGO_PKG_VERSION")}),
            )),
            VmAction::Create(cfg) => {
                if self.vm.is_some() {
                    Err(ApiError::conflict("a VM already exists in this VMM"))
                } else {
                    self.create((**cfg).clone())
                        .map(|_| None)
                        .map_err(|e| ApiError::bad_request(error_chain(&e)))
                }
            }
            VmAction::Boot => self
                .vm_mut()
                .and_then(|vm| vm.boot().map(|_| None).map_err(api_error)),
            VmAction::Pause => self
                .vm_mut()
                .and_then(|vm| vm.pause().map(|_| None).map_err(api_error)),
            VmAction::Resume => self
                .vm_mut()
                .and_then(|vm| vm.resume().map(|_| None).map_err(api_error)),
            VmAction::Shutdown => self.vm_mut().and_then(|vm| {
                vm.shutdown().map_err(api_error)?;
                exit = Some(VmmExit::PowerOff);
                Ok(None)
            }),
            VmAction::Reboot => match self.vm_mut() {
                Err(e) => Err(e),
                Ok(vm) => match vm.state().next(api::Action::Reboot) {
                    Err(e) => Err(ApiError::conflict(e.to_string())),
                    Ok(_) => self.reboot().map(|_| None).map_err(|e| {
                        exit = Some(VmmExit::Crashed(format!("reboot failed: {e}")));
                        ApiError::internal(error_chain(&e))
                    }),
                },
            },
            VmAction::PowerButton => self
                .vm_mut()
                .and_then(|vm| vm.power_button().map(|_| None).map_err(api_error)),
            VmAction::Snapshot(dir) => self
                .vm_mut()
                .and_then(|vm| vm.snapshot(dir).map(|_| None).map_err(api_error)),
            VmAction::Restore(dir) => {
                if self.vm.is_some() {
                    Err(ApiError::conflict("a VM already exists in this VMM"))
                } else {
                    self.restore(dir, None)
                        .map(|_| None)
                        .map_err(|e| ApiError::bad_request(error_chain(&e)))
                }
            }
            VmAction::Info => self.vm_mut().and_then(|vm| {
                serde_json::to_value(vm.info())
                    .map(Some)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            VmAction::Counters => self.vm_mut().and_then(|vm| {
                serde_json::to_value(vm.counters())
                    .map(Some)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            VmAction::VmmShutdown => {
                exit = Some(VmmExit::PowerOff);
                Ok(None)
            }
        };
        req.respond(result);
        exit
    }
}

fn api_error(e: VmError) -> ApiError {
    match e {
        VmError::Transition(t) => ApiError::conflict(t.to_string()),
        VmError::Snapshot(s) => ApiError::bad_request(error_chain(&s)),
        other => ApiError::internal(error_chain(&other)),
    }
}

/// "outer: inner: innermost" on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}
