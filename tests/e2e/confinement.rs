//! Confinement of `vireo` seen from outside: a panicking thread ends the process (never
//! a dead vCPU in a VM that looks Running), and each thread's seccomp filter refuses
//! what its job does not need, killing the process with the system call named.
//!
//! The faults are injected through `vireo`'s `test-hooks` build (vmm/src/test_hooks.rs),
//! which this crate's dev-dependency turns on for test builds.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use vireo_e2e::Vireo;

const T: Duration = Duration::from_secs(30);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_panicking_vcpu_aborts_the_process_and_names_the_thread() {
    let mut vm = Vireo::guest("test=counter period_ms=20", &[]);
    vm.cmd.env("VIREO_TEST_PANIC_VCPU", "1");
    let (out, _) = vm.run(T);
    let err = stderr(&out);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{err}");
    assert!(
        err.contains("thread 'vireo-vcpu0' panicked at vmm/src/vcpu.rs:")
            && err.contains("test hook: VIREO_TEST_PANIC_VCPU"),
        "{err}"
    );
}

/// Runs the counter guest with `VIREO_TEST_SYSCALL=probe` and returns its output.
fn probe(probe: &str, args: &[&str]) -> std::process::Output {
    let mut vm = Vireo::guest("test=boot", args);
    vm.cmd.env("VIREO_TEST_SYSCALL", probe);
    vm.run(T).0
}

fn assert_killed_for(out: &std::process::Output, thread: &str, syscall: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(159), "{err}");
    assert!(
        err.contains(&format!(
            "seccomp: thread {thread} made the forbidden system call {syscall} ("
        )),
        "{err}"
    );
}

#[test]
fn the_vcpu_thread_cannot_open_files() {
    assert_killed_for(&probe("vcpu:openat", &[]), "vireo-vcpu0", "openat");
}

#[test]
fn the_vcpu_thread_cannot_start_processes() {
    assert_killed_for(&probe("vcpu:fork", &[]), "vireo-vcpu0", "clone");
}

#[test]
fn the_control_thread_cannot_exec() {
    assert_killed_for(&probe("control:execve", &[]), "vireo", "execve");
}

#[test]
fn the_control_thread_cannot_start_processes() {
    assert_killed_for(&probe("control:fork", &[]), "vireo", "clone");
}

#[test]
fn without_seccomp_the_probes_run() {
    // The same probe with filtering off proves the hook really makes the call.
    let out = probe("vcpu:openat", &["--seccomp", "false"]);
    let err = stderr(&out);
    assert!(
        err.contains("vireo: test hook: openat on the vcpu thread returned "),
        "{err}"
    );
}
