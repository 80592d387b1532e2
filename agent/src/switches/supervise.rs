//! Runs one switch: `vireo-switch run` as vireod's child (it ends with vireod:
//! `PR_SET_PDEATHSIG`, tied to this thread, which lives as long as vireod), waits until
//! its control socket answers, adds every registered port, and when it ends starts it
//! again (after 100 ms, doubling up to 10 s while it keeps dying young).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::control;
use super::Host;
use vireo_util::sync::lock;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A switch that ran this long was no crash loop: the next restart is quick again.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// How long a started switch may take to answer its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The supervising loop of `host` (never returns).
pub(super) fn run(host: &Host, bin: &Path, log: &Path) {
    let name = &host.spec.name;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        match spawn(host, bin, log) {
            Ok(mut child) => {
                {
                    let mut st = lock(&host.state);
                    st.pid = Some(child.id());
                    st.starts += 1;
                }
                if wait_ready(host, &mut child) {
                    add_ports(host);
                    info!(switch = %name, pid = child.id(), "switch running");
                }
                let status = child.wait();
                {
                    let mut st = lock(&host.state);
                    st.up = false;
                    st.pid = None;
                }
                warn!(switch = %name, status = ?status, log = %log.display(), "switch ended; starting it again");
            }
            Err(e) => {
                warn!(switch = %name, bin = %bin.display(), error = %e, "cannot start the switch")
            }
        }
        if started.elapsed() > STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(host: &Host, bin: &Path, log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--control")
        .arg(&host.control)
        .arg("--socket-dir")
        .arg(&host.dir);
    if let Some(p) = host.spec.uplink_port() {
        cmd.arg("--port").arg(p);
    }
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: between fork and exec only async-signal-safe calls: umask and prctl.
    unsafe {
        cmd.pre_exec(|| {
            // Its vhost-user sockets: readable and writable by the VM directory's
            // group (the jail's), nobody else.
            libc::umask(0o007);
            // It ends with vireod (the thread that forked it lives as long).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Waits until the switch answers `ports` (true), or ends or takes too long (false;
/// a switch that takes too long is killed, and started again).
fn wait_ready(host: &Host, child: &mut Child) -> bool {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if control::request(&host.control, &control::ports()).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            warn!(switch = %host.spec.name, "switch does not answer its control socket: killed");
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds every registered port (the running VMs'), then marks the switch up; a port
/// the new switch refuses is logged and left out (its VM runs on without it).
fn add_ports(host: &Host) {
    let mut st = lock(&host.state);
    for (port, (vm, spec)) in &st.ports {
        match host.add_port(port, spec) {
            Ok(()) => info!(switch = %host.spec.name, %port, %vm, "port added again"),
            Err(e) => {
                warn!(switch = %host.spec.name, %port, %vm, error = %e, "cannot add the port again")
            }
        }
    }
    st.up = true;
}
