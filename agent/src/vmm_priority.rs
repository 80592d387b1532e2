//! A clustered VM's VMM answers its write-lease renewals at a real-time priority.
//!
//! The renewal chain is etcd, vireod's lease thread (`SCHED_RR` 10), then the VMM's
//! API thread, which takes `vm.lease` itself (`vmm/src/lease_slot.rs`). On a host whose
//! CPUs the guests saturate (every vCPU thread runnable), a normal-priority API thread
//! waited over 1.5 s for a CPU — every thread of the VMM runnable, none running — and
//! the VM fenced itself while its host held the cluster lease (seen on this 2-core
//! machine as a drained VM arrived beside two busy ones). vireod raises that one
//! thread from outside: the jailed VMM has no privilege to, and its vCPU and device
//! threads stay normal, so a guest cannot take the CPU from the host by it. The API
//! thread reads short requests from vireod's private socket only and answers in
//! microseconds; the kernel's real-time throttling bounds it regardless.

use std::io;

/// The VMM API thread's `SCHED_RR` priority: below etcd's (5 in the tests, as a host
/// would run it) and vireod's lease thread (10), whose renewals it serves.
pub const API_THREAD_RR_PRIORITY: i32 = 3;

/// The name `vireo` gives its API thread (`api::server`).
const API_THREAD: &str = "vireo-api";

/// Raises the API thread of the VMM `pid` to [`API_THREAD_RR_PRIORITY`]. `Ok(false)`:
/// it has no API thread yet (starting).
pub fn raise_api_thread(pid: i32) -> io::Result<bool> {
    let Some(tid) = api_thread(pid)? else {
        return Ok(false);
    };
    let param = libc::sched_param {
        sched_priority: API_THREAD_RR_PRIORITY,
    };
    // SAFETY: sched_setscheduler on a thread id with a valid param we own; it only
    // changes that thread's scheduling.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_RR, &param) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The id of the VMM `pid`'s API thread, if it has one yet.
pub fn api_thread(pid: i32) -> io::Result<Option<i32>> {
    thread_named(pid, API_THREAD)
}

/// The id of `pid`'s thread called `name`, if it has one.
fn thread_named(pid: i32, name: &str) -> io::Result<Option<i32>> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // The thread ended meanwhile.
        };
        if comm.trim_end() == name {
            return Ok(task.file_name().to_str().and_then(|t| t.parse().ok()));
        }
    }
    Ok(None)
}

/// The scheduling policy and priority of thread `tid`.
pub fn policy_of(tid: i32) -> io::Result<(i32, i32)> {
    // SAFETY: sched_getscheduler only reads the thread's policy.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getparam writes one sched_param we own.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((policy, param.sched_priority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn only_the_thread_named_vireo_api_is_raised() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let api = std::thread::Builder::new()
            .name(API_THREAD.into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let pid = std::process::id() as i32;
        assert_eq!(thread_named(pid, API_THREAD).unwrap(), Some(tid));
        if is_root() {
            assert!(raise_api_thread(pid).unwrap());
            assert_eq!(
                policy_of(tid).unwrap(),
                (libc::SCHED_RR, API_THREAD_RR_PRIORITY)
            );
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            assert_eq!(policy_of(me).unwrap().0, libc::SCHED_OTHER);
        }
        stop_tx.send(()).unwrap();
        api.join().unwrap();
    }

    #[test]
    fn a_process_without_an_api_thread_is_left_alone() {
        let pid = std::process::id() as i32;
        assert!(!raise_api_thread(pid).unwrap());
    }
}
