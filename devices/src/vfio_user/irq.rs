//! The vfio-user server raises MSI-X vectors by writing the eventfds the VMM gave it
//! (DEVICE_SET_IRQS). One thread per device (`vireo-vfu-irq`) waits on them and
//! delivers each vector through the device's MSI-X table, which the VMM emulates (so
//! masking, the function mask and the PBA behave as on any other function).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vireo_util::sync::lock;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::MsiSink;
use crate::pci::MsixTable;

/// The epoll token of the stop eventfd (vectors use their number).
const STOP: u64 = u64::MAX;

/// A running forwarder; dropping it stops and joins the thread.
pub struct IrqForwarder {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The eventfds of a device's vectors, made before the server is told of them.
pub struct VectorFds(pub Vec<EventFd>);

impl VectorFds {
    pub fn new(vectors: u16) -> std::io::Result<Self> {
        (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl IrqForwarder {
    pub fn start(
        id: &str,
        fds: VectorFds,
        table: Arc<Mutex<MsixTable>>,
        sink: Arc<dyn MsiSink>,
        delivered: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        for (v, fd) in fds.0.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, v as u64),
            )?;
        }
        let id = id.to_string();
        let thread = std::thread::Builder::new()
            .name("vireo-vfu-irq".into())
            .spawn(move || {
                crate::threads::started(crate::threads::WorkerKind::UserDeviceIrq);
                forward(&id, &epoll, &fds, &table, sink.as_ref(), &delivered)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn forward(
    id: &str,
    epoll: &Epoll,
    fds: &VectorFds,
    table: &Mutex<MsixTable>,
    sink: &dyn MsiSink,
    delivered: &AtomicU64,
) {
    let mut events = vec![EpollEvent::default(); fds.0.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(device = id, error = %e, "vfio-user interrupt wait failed");
                return;
            }
        };
        for ev in events.iter().take(n) {
            let token = ev.data();
            if token == STOP {
                return;
            }
            let Some(fd) = fds.0.get(token as usize) else {
                continue;
            };
            if fd.read().is_err() {
                continue;
            }
            let vector = token as u16;
            if let Err(e) = lock(table).signal(vector, sink) {
                crate::guest_warn!(device = id, vector, error = %e, "MSI-X delivery failed");
            }
            delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for IrqForwarder {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the vfio-user interrupt forwarder panicked");
            }
        }
    }
}
