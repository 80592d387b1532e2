//! The worker threads of one activated device: they share a stop eventfd, are stopped
//! and joined together, and each hands back what it served (its queues), so that a
//! paused device can be activated again where it stopped.

use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::ActivateError;

pub(crate) struct Workers<T> {
    device: &'static str,
    stop: EventFd,
    threads: Vec<JoinHandle<T>>,
}

impl<T: Send + 'static> Workers<T> {
    /// No thread yet; `device` names the device in errors and logs.
    pub fn new(device: &'static str) -> Result<Self, ActivateError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| ActivateError::Setup { device, source })?;
        Ok(Self {
            device,
            stop,
            threads: Vec::new(),
        })
    }

    /// The stop eventfd, for a worker to wait on (readable once [`Self::stop`] runs).
    /// No worker reads it: it is written once and must stay readable until every
    /// worker has seen it (a worker that read it reset it, and another one, busy at
    /// that moment, then never stopped: `stop` hung joining it). Each activation has
    /// its own.
    pub fn stop_fd(&self) -> Result<EventFd, ActivateError> {
        self.stop
            .try_clone()
            .map_err(|source| ActivateError::Setup {
                device: self.device,
                source,
            })
    }

    /// Starts a named worker thread.
    pub fn spawn(
        &mut self,
        name: String,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<(), ActivateError> {
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(work)
            .map_err(|source| ActivateError::SpawnWorker {
                device: self.device,
                source,
            })?;
        self.threads.push(t);
        Ok(())
    }

    /// Tells every worker to stop and waits for them; what each handed back, in the
    /// order they were started (a worker that panicked hands back nothing).
    pub fn stop(mut self) -> Vec<T> {
        self.stop_and_join()
    }
}

impl<T> Workers<T> {
    fn stop_and_join(&mut self) -> Vec<T> {
        if self.threads.is_empty() {
            return Vec::new();
        }
        let _ = self.stop.write(1);
        let mut out = Vec::with_capacity(self.threads.len());
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(v) => out.push(v),
                Err(_) => tracing::error!(device = self.device, "a device worker panicked"),
            }
        }
        out
    }
}

impl<T> Drop for Workers<T> {
    /// Dropped without [`Workers::stop`] (an activation that failed half-way): the
    /// threads already started are stopped too, not left running.
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that waits for its stop eventfd and returns `v`.
    fn waiter(w: &Workers<u32>, v: u32) -> impl FnOnce() -> u32 + Send + 'static {
        let stop = w.stop_fd().unwrap();
        move || {
            let mut fds = [libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&stop),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll on one valid pollfd for as long as it takes.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
            v
        }
    }

    #[test]
    fn stop_wakes_every_worker_and_returns_what_they_hand_back_in_order() {
        let mut w = Workers::new("test").unwrap();
        for v in [7, 8, 9] {
            let f = waiter(&w, v);
            w.spawn(format!("t{v}"), f).unwrap();
        }
        assert_eq!(w.stop(), vec![7, 8, 9]);
    }

    #[test]
    fn a_panicked_worker_hands_back_nothing_and_the_others_still_do() {
        let mut w = Workers::new("test").unwrap();
        let f = waiter(&w, 1);
        w.spawn("ok".into(), f).unwrap();
        w.spawn("boom".into(), || panic!("worker failed")).unwrap();
        assert_eq!(w.stop(), vec![1]);
    }

    #[test]
    fn dropping_unstopped_workers_stops_them() {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut w = Workers::new("test").unwrap();
            let f = waiter(&w, 5);
            w.spawn("t".into(), move || {
                let v = f();
                tx.send(v).unwrap();
                v
            })
            .unwrap();
        }
        assert_eq!(
            rx.try_recv(),
            Ok(5),
            "the worker ran to its end before drop returned"
        );
    }
}
