//! vCPU threads: run KVM_RUN, dispatch port I/O and MMIO exits to the buses, and obey
//! pause/resume/stop requests from the control loop (delivered by a kick signal).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vireo_util::sync;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use devices::Bus;

use crate::arch::cpu_state::VcpuState;

/// The signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) kick handler once per process; KVM_RUN returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What the control loop wants a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Stop,
}

/// What a vCPU thread reports to the control loop.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Triple fault or KVM shutdown: the guest reset itself.
    Shutdown(u8),
    /// The vCPU cannot continue (emulation failure, entry failure, ioctl error).
    Failed(u8, String),
}

struct Shared {
    wanted: Wanted,
    parked: bool,
    exited: bool,
    /// The control loop asks a parked vCPU for its state (it alone owns the fd).
    save_requested: bool,
    saved: Option<Result<VcpuState, String>>,
}

/// Control block shared by the control loop and one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    exits: Arc<AtomicU64>,
}

/// Everything a vCPU needs to run.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub ioapic: Arc<devices::legacy::Ioapic>,
    pub seccomp: crate::seccomp::Filters,
    pub events: std::sync::mpsc::Sender<crate::control::ControlEvent>,
    /// MSRs a state save reads (KVM's index list) and whether KVM has XCRs.
    pub msr_indices: Arc<Vec<u32>>,
    pub has_xcrs: bool,
    /// Share of time each vCPU sleeps (auto-converge of a live migration).
    pub throttle: Arc<Throttle>,
    /// The VM's coalesced MMIO ring, drained after every KVM_RUN (crate::coalesced).
    pub coalesced: Option<Arc<crate::coalesced::CoalescedRing>>,
}

/// Slows vCPUs down so a migration's copy can outrun the guest's dirtying (QEMU calls
/// it auto-converge): a ticker kicks every vCPU out of KVM_RUN each [`THROTTLE_PERIOD`],
/// and a kicked vCPU sleeps `percent` of the period before it runs again.
#[derive(Default)]
pub struct Throttle {
    percent: AtomicU64,
}

pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

impl Throttle {
    pub fn set(&self, percent: u64) {
        self.percent.store(percent.min(99), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u64 {
        self.percent.load(Ordering::Relaxed)
    }

    /// What a kicked vCPU owes.
    fn pause(&self) {
        let p = self.percent();
        if p > 0 {
            std::thread::sleep(THROTTLE_PERIOD * p as u32 / 100);
        }
    }
}

/// Kicks the vCPU threads every period while a throttle is set (stopped on drop).
pub struct ThrottleTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ThrottleTicker {
    pub fn start(threads: Vec<libc::pthread_t>, throttle: Arc<Throttle>) -> std::io::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vireo-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(THROTTLE_PERIOD);
                    if throttle.percent() == 0 {
                        continue;
                    }
                    for &t in &threads {
                        // SAFETY: the threads are the VM's vCPU threads, which outlive
                        // the ticker (the migration that owns it ends before the VM).
                        unsafe { libc::pthread_kill(t, kick_signal()) };
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ThrottleTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the vCPU throttle ticker panicked");
            }
        }
    }
}

impl VcpuHandle {
    /// Starts the vCPU's thread: running, or parked until [`Self::resume`] (restore).
    pub fn spawn(id: u8, mut fd: VcpuFd, ctx: VcpuContext, paused: bool) -> std::io::Result<Self> {
        let shared = Arc::new((
            Mutex::new(Shared {
                wanted: if paused { Wanted::Pause } else { Wanted::Run },
                parked: false,
                exited: false,
                save_requested: false,
                saved: None,
            }),
            Condvar::new(),
        ));
        let exits = Arc::new(AtomicU64::new(0));
        let (s, e) = (shared.clone(), exits.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vireo-vcpu{id}"))
            .spawn(move || {
                ctx.seccomp.apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
                #[cfg(feature = "test-hooks")]
                if id == 0 {
                    crate::test_hooks::probe_syscall("vcpu");
                }
                run_loop(id, &mut fd, &ctx, &s, &e);
                let (m, cv) = &*s;
                sync::lock(m).exited = true;
                cv.notify_all();
            })?;
        Ok(Self {
            id,
            shared,
            thread: Some(thread),
            exits,
        })
    }

    /// The thread, for signals (None once it has been joined).
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// What the watchdog checks: exits so far, and whether the vCPU should be in the
    /// guest (wanted running, not parked, not ended).
    pub fn liveness(&self) -> crate::watchdog::VcpuLiveness {
        let (m, _) = &*self.shared;
        let s = sync::lock(m);
        crate::watchdog::VcpuLiveness {
            exits: self.exits(),
            running: s.wanted == Wanted::Run && !s.parked && !s.exited,
        }
    }

    /// One kick out of KVM_RUN (the vCPU goes on running).
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    fn set_wanted(&self, w: Wanted) {
        let (m, cv) = &*self.shared;
        sync::lock(m).wanted = w;
        cv.notify_all();
    }

    /// Kicks the thread until it has parked (paused) or exited.
    fn kick_until(&self, done: impl Fn(&Shared) -> bool) {
        let (m, cv) = &*self.shared;
        loop {
            let Some(t) = &self.thread else {
                return; // Already joined.
            };
            if t.is_finished() {
                return;
            }
            let _ = t.kill(kick_signal());
            let g = sync::lock(m);
            let (g, _) = cv
                .wait_timeout_while(g, Duration::from_millis(2), |s| !done(s))
                .unwrap_or_else(|e| e.into_inner());
            if done(&g) {
                return;
            }
        }
    }

    pub fn pause(&self) {
        self.set_wanted(Wanted::Pause);
        self.kick_until(|s| s.parked);
        tracing::debug!(vcpu = self.id, "paused");
    }

    pub fn resume(&self) {
        self.set_wanted(Wanted::Run);
    }

    /// The vCPU's architectural state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, String> {
        let (m, cv) = &*self.shared;
        let mut s = sync::lock(m);
        if !s.parked || s.wanted != Wanted::Pause {
            return Err(format!("vCPU {} is not paused", self.id));
        }
        s.saved = None;
        s.save_requested = true;
        cv.notify_all();
        loop {
            if let Some(r) = s.saved.take() {
                return r;
            }
            if s.exited {
                return Err(format!("vCPU {} exited", self.id));
            }
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn stop(&mut self) {
        self.set_wanted(Wanted::Stop);
        self.kick_until(|s| s.exited);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(feature = "test-hooks")]
thread_local! {
    /// This vCPU has been resumed from a pause (crate::test_hooks).
    static RESUMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Blocks while paused (saving state when asked); returns false when the thread must
/// exit.
fn obey(id: u8, fd: &VcpuFd, ctx: &VcpuContext, shared: &(Mutex<Shared>, Condvar)) -> bool {
    let (m, cv) = shared;
    let mut s = sync::lock(m);
    loop {
        if s.save_requested && s.parked {
            s.save_requested = false;
            s.saved = Some(
                VcpuState::save(id, fd, &ctx.msr_indices, ctx.has_xcrs).map_err(|e| e.to_string()),
            );
            cv.notify_all();
            continue;
        }
        match s.wanted {
            Wanted::Run => {
                if s.parked {
                    #[cfg(feature = "test-hooks")]
                    RESUMED.with(|r| r.set(true));
                    s.parked = false;
                    cv.notify_all();
                }
                return true;
            }
            Wanted::Stop => return false,
            Wanted::Pause => {
                if !s.parked {
                    s.parked = true;
                    cv.notify_all();
                }
                s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

fn run_loop(
    id: u8,
    fd: &mut VcpuFd,
    ctx: &VcpuContext,
    shared: &(Mutex<Shared>, Condvar),
    exits: &AtomicU64,
) {
    use crate::control::ControlEvent;
    let report = |e: VcpuEvent| {
        let _ = ctx.events.send(ControlEvent::Vcpu(e));
    };
    loop {
        if !obey(id, fd, ctx, shared) {
            return;
        }
        let exit = fd.run();
        exits.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "test-hooks")]
        if crate::test_hooks::vcpu_should_panic(id, RESUMED.with(|r| r.get())) {
            panic!("test hook: VIREO_TEST_PANIC_VCPU");
        }
        // Queued writes come first: they happened before whatever made this exit.
        if let Some(ring) = &ctx.coalesced {
            ring.drain(|addr, data| {
                ctx.mmio.write(addr, data);
            });
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::IoapicEoi(vector)) => {
                ctx.ioapic.end_of_interrupt(vector);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT is handled by KVM; an exit here means
                // interrupts are off for good: the guest has stopped.
                report(VcpuEvent::Failed(
                    id,
                    "halted with interrupts disabled".into(),
                ));
                park_forever(shared);
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                report(VcpuEvent::Shutdown(id));
                park_forever(shared);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::info!(vcpu = id, kind, "system event");
                report(VcpuEvent::Shutdown(id));
                park_forever(shared);
                return;
            }
            Ok(VcpuExit::InternalError) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                report(VcpuEvent::Failed(
                    id,
                    format!("KVM internal error (emulation failure) at rip {rip:#x}"),
                ));
                park_forever(shared);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                report(VcpuEvent::Failed(
                    id,
                    format!("KVM entry failed: reason {reason:#x} on host cpu {cpu}"),
                ));
                park_forever(shared);
                return;
            }
            Ok(other) => {
                tracing::debug!(vcpu = id, exit = ?other, "unhandled vCPU exit");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: pay any throttle, then loop around to obey the control loop.
                ctx.throttle.pause();
            }
            Err(e) => {
                report(VcpuEvent::Failed(id, format!("KVM_RUN failed: {e}")));
                park_forever(shared);
                return;
            }
        }
    }
}

/// After a fatal exit the thread waits until asked to stop.
fn park_forever(shared: &(Mutex<Shared>, Condvar)) {
    let (m, cv) = shared;
    let mut s = sync::lock(m);
    s.parked = true;
    cv.notify_all();
    while s.wanted != Wanted::Stop {
        s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
    }
}
