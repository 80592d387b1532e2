//! The activator thread (`vireo-activate`): device activation and reset, which a vCPU
//! triggers by writing a virtio status register, run here while that vCPU waits. They
//! start and stop device workers, create rate-limit timers and flush disks; with this
//! thread doing it, the vCPU filter allows none of that (crate::seccomp).
//!
//! Why not the control thread: the control loop waits for vCPUs (pause kicks a vCPU
//! until it parks), and a vCPU blocked on the control loop in the middle of an MMIO
//! exit could not park: a deadlock. The activator waits for nobody.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use vireo_util::sync;

use devices::threads::ActivationJob;

use crate::seccomp::{Filters, ThreadKind};

/// Starts the thread and makes it the devices' activation runner for this process.
pub fn start(filters: Filters) -> std::io::Result<()> {
    let (jobs, incoming) = channel::<ActivationJob>();
    std::thread::Builder::new()
        .name("vireo-activate".into())
        .spawn(move || {
            filters.apply_or_exit(ThreadKind::Activator);
            for job in incoming {
                job();
            }
        })?;
    let jobs: Mutex<Sender<ActivationJob>> = Mutex::new(jobs);
    devices::threads::set_activation_runner(Box::new(move |job| {
        sync::lock(&jobs).send(job).map_err(|e| e.0)
    }));
    Ok(())
}
