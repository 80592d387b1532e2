//! vireo's side of systemd (the watchdog protocol, tested with a real datagram socket
//! as NOTIFY_SOCKET) and vireod's systemd launcher.
//!
//! The launcher test here uses a stand-in `systemctl` (a shell script the test writes)
//! that does what systemd does for `vireo@.service` — reads the unit's environment
//! file, runs `vireo $VIREO_ARGS` with NOTIFY_SOCKET, returns from `start` once READY=1
//! arrived, answers `show` with MainPID/ExecMain*, records `set-property` — so that the
//! launcher's protocol is checked call by call. systemd_pid1.rs runs the same launcher
//! against a real systemd as PID 1 of its own namespaces.

use crate::common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{alive, Daemon, T};

/// Datagrams received within `window`, with their arrival times.
fn collect(server: &UnixDatagram, window: Duration) -> Vec<(Instant, String)> {
    let mut out = Vec::new();
    let end = Instant::now() + window;
    let mut buf = [0u8; 256];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        server.set_read_timeout(Some(left)).unwrap();
        match server.recv(&mut buf) {
            Ok(n) => out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            )),
            Err(_) => return out,
        }
    }
}

fn pings(msgs: &[(Instant, String)]) -> Vec<Instant> {
    msgs.iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn vireo_pings_the_watchdog_at_half_the_interval_while_healthy_and_not_when_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let server = UnixDatagram::bind(&notify).unwrap();
    let sock = dir.path().join("vm.sock");
    let cfg = dir.path().join("vm.json");
    let mut c = common::counter_config();
    c["serial"] = serde_json::json!({"mode": "file", "file": dir.path().join("serial.log")});
    std::fs::write(&cfg, c.to_string()).unwrap();
    // WatchdogSec=400ms: a ping every 200 ms.
    let mut child = std::process::Command::new(common::bin("vireo"))
        .arg("--config")
        .arg(&cfg)
        .arg("--api-socket")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let kill = |sig| {
        // SAFETY: kill with our own child's pid and a signal.
        unsafe { libc::kill(pid, sig) }
    };
    let result = std::panic::catch_unwind(|| {
        // READY=1 first, then pings at half the interval. Counted by their spacing,
        // not in a fixed window: a loaded machine may start the VMM late, and a
        // count in the first 3 s after spawning then says nothing about the VMM.
        let mut first = collect(&server, Duration::from_secs(3));
        let mut waited = 3;
        while pings(&first).len() < 12 && waited < 30 {
            first.extend(collect(&server, Duration::from_secs(1)));
            waited += 1;
        }
        assert!(
            first.iter().any(|(_, m)| m == "READY=1"),
            "no READY=1: {first:?}"
        );
        let p = pings(&first);
        assert!(p.len() >= 12, "{} pings in {waited} s", p.len());
        let mut gaps: Vec<Duration> = p.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort();
        // Half of 400 ms, as systemd asks (sd_watchdog_enabled(3)); the median, so a
        // gap stretched by a busy machine does not decide.
        let median = gaps[gaps.len() / 2];
        assert!(
            median >= Duration::from_millis(100) && median <= Duration::from_millis(300),
            "median gap {median:?}: {gaps:?}"
        );

        // A paused VM is healthy: the pings go on.
        let (s, b) = common::http(&sock, "PUT", "/api/v1/vm.pause", None);
        assert_eq!(s, 204, "{b}");
        let paused = pings(&collect(&server, Duration::from_millis(1000)));
        assert!(paused.len() >= 3, "{} pings while paused", paused.len());
        let (s, b) = common::http(&sock, "PUT", "/api/v1/vm.resume", None);
        assert_eq!(s, 204, "{b}");

        // A frozen VMM (SIGSTOP: nothing of it runs) sends nothing; thawed, it pings
        // again at once.
        kill(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(50));
        let _ = collect(&server, Duration::from_millis(1)); // Drain what was in flight.
        let frozen = pings(&collect(&server, Duration::from_millis(1000)));
        kill(libc::SIGCONT);
        assert!(frozen.is_empty(), "{} pings while frozen", frozen.len());
        // Two pings after the thaw show the loop runs again; 2 s leaves room for a
        // machine busy with other tests (one ping per 200 ms when it is not).
        let thawed = pings(&collect(&server, Duration::from_millis(2000)));
        assert!(
            thawed.len() >= 2,
            "{} pings in 2 s after SIGCONT",
            thawed.len()
        );
    });
    kill(libc::SIGCONT);
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }

    // WATCHDOG_PID names another process: no pings (sd_watchdog_enabled), READY only.
    let mut child = std::process::Command::new(common::bin("vireo"))
        .arg("--config")
        .arg(&cfg)
        .arg("--api-socket")
        .arg(dir.path().join("vm2.sock"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // READY=1 once the VMM runs (late on a loaded machine: waited for up to 30 s),
    // then 800 ms, four ping intervals, in which a ping would have come.
    let mut msgs: Vec<(Instant, String)> = Vec::new();
    let mut waited = 0;
    while !msgs.iter().any(|(_, m)| m == "READY=1") && waited < 30 {
        msgs.extend(collect(&server, Duration::from_secs(1)));
        waited += 1;
    }
    msgs.extend(collect(&server, Duration::from_millis(800)));
    let _ = child.kill();
    let _ = child.wait();
    assert!(msgs.iter().any(|(_, m)| m == "READY=1"), "{msgs:?}");
    assert!(pings(&msgs).is_empty(), "{msgs:?}");
}

/// A stand-in for systemctl that runs `vireo@NAME.service` like systemd would (see
/// the module comment). It keeps its state in `state`.
fn fake_systemctl(dir: &std::path::Path, run_dir: &std::path::Path) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let state = dir.join("systemd");
    std::fs::create_dir_all(&state).unwrap();
    let script = format!(
        r#"#!/bin/sh
# Stand-in for systemctl: checks the launcher call by call (systemd_pid1.rs runs a real systemd as PID 1 of its own namespaces).
state={state}
vireo={vireo}
echo "$*" >> "$state/calls"
unit=""
for a in "$@"; do case "$a" in vireo@*.service) unit="$a";; esac; done
name=${{unit#vireo@}}; name=${{name%.service}}
case "$1" in
start)
    env_file={run}/vms/$name.env
    [ -f "$env_file" ] || {{ echo "Condition failed: $env_file" >&2; exit 1; }}
    # EnvironmentFile= semantics: the rest of the line is the value.
    VIREO_ARGS=$(sed -n 's/^VIREO_ARGS=//p' "$env_file")
    rm -f "$state/$name.status" "$state/$name.ready" "$state/$name.mainpid"
    notify="$state/$name.notify"
    rm -f "$notify" "$notify.bound"
    # The unit's READY=1 and MAINPID=: a datagram socket read by a helper (which drops
    # a BARRIER=1's descriptor as it reads the message, releasing the sender).
    python3 -c '
import os,socket,sys
s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM); s.bind(sys.argv[1])
open(sys.argv[2],"w").close()
while True:
    m=s.recv(256)
    if m==b"READY=1": open(sys.argv[3],"w").write("1")
    if m.startswith(b"MAINPID="):
        open(sys.argv[4]+".tmp","w").write(m[8:].decode()); os.rename(sys.argv[4]+".tmp",sys.argv[4])
'  "$notify" "$notify.bound" "$state/$name.ready" "$state/$name.mainpid" </dev/null >/dev/null 2>&1 &
    echo $! > "$state/$name.helper.$$"
    while [ ! -f "$notify.bound" ]; do sleep 0.01; done
    # Runs vireo as systemd does: a subreaper (systemd is PID 1), so that a main process
    # handed over with MAINPID= is reaped here too; records the main process's end
    # (128+N: killed by signal N).
    NOTIFY_SOCKET="$notify" python3 -c '
import ctypes,os,sys
ctypes.CDLL(None).prctl(36,1,0,0,0)
state,name=sys.argv[1],sys.argv[2]
def put(f,v):
    open(f+".tmp","w").write(v); os.rename(f+".tmp",f)
pid=os.fork()
if pid==0:
    os.setsid(); os.execv(sys.argv[3],sys.argv[3:])
put(state+"/"+name+".pid",str(pid))
while True:
    p,st=os.wait()
    try: main=int(open(state+"/"+name+".mainpid").read())
    except OSError: main=pid
    if p==main:
        code=os.waitstatus_to_exitcode(st)
        put(state+"/"+name+".status",str(code if code>=0 else 128-code))
        break
' "$state" "$name" "$vireo" $VIREO_ARGS >>"$state/$name.log" 2>&1 </dev/null &
    i=0
    while [ ! -f "$state/$name.ready" ]; do
        if [ -f "$state/$name.status" ]; then echo "vireo exited" >&2; exit 1; fi
        i=$((i+1)); [ $i -gt 3000 ] && {{ echo "timeout" >&2; exit 1; }}
        sleep 0.01
    done
    ;;
show)
    pid=$(cat "$state/$name.mainpid" 2>/dev/null || cat "$state/$name.pid" 2>/dev/null || echo 0)
    echo "MainPID=$pid"
    echo "ExecMainPID=$pid"
    if [ -f "$state/$name.status" ]; then
        st=$(cat "$state/$name.status")
        if [ "$st" -gt 128 ]; then echo "ExecMainCode=2"; echo "ExecMainStatus=$((st-128))";
        else echo "ExecMainCode=1"; echo "ExecMainStatus=$st"; fi
        echo "ExecMainExitTimestampMonotonic=1"
    else
        echo "ExecMainCode=0"; echo "ExecMainStatus=0"; echo "ExecMainExitTimestampMonotonic=0"
    fi
    ;;
set-property) ;;
*) echo "fake systemctl: $1 not supported" >&2; exit 1 ;;
esac
"#,
        state = state.display(),
        vireo = common::bin("vireo").display(),
        run = run_dir.display(),
    );
    let p = bin.join("systemctl");
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn systemd_launcher_starts_units_watches_them_and_gets_their_exit_status() {
    let python = std::process::Command::new("sh")
        .args(["-c", "command -v python3"])
        .output();
    if !python.map(|o| o.status.success()).unwrap_or(false) {
        vireo_e2e::skip_or_fail_under_ci(
            "the stand-in systemctl needs python3 (for the READY=1 socket)",
        );
        return;
    }
    // The daemon's directories are known only once it is made: make it, stop it,
    // write the stand-in for its run directory, start it again with the launcher.
    let mut d = Daemon::start(&["--no-autostart"]);
    d.terminate(T);
    let tools = tempfile::tempdir().unwrap();
    let systemctl = fake_systemctl(tools.path(), &d.run_dir);
    d.args.extend([
        "--launcher".to_string(),
        "systemd".to_string(),
        "--systemctl".to_string(),
        systemctl.display().to_string(),
    ]);
    d.spawn();
    let state = tools.path().join("systemd");
    let calls = || std::fs::read_to_string(state.join("calls")).unwrap_or_default();
    let helpers = || -> Vec<i32> {
        std::fs::read_dir(&state)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains(".helper."))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| t.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let result = std::panic::catch_unwind(|| {
        let host = d.ok("GET", "/api/v1/host.info", None);
        assert_eq!(host["launcher"], "systemd", "{host}");
        let def = serde_json::json!({"config": common::counter_config(), "cpu_weight": 250});
        d.ok("PUT", "/api/v1/vms/web", Some(&def.to_string()));
        let st = d.ok("PUT", "/api/v1/vms/web/start", None);
        assert_eq!(st["state"], "Running", "{st}");
        let pid = st["pid"].as_i64().unwrap() as i32;
        // The unit's main process is the VMM, started from the environment file: it
        // cloned itself into its own PID namespace and handed the child over with
        // MAINPID= (the process systemd started is gone).
        let started: i32 = std::fs::read_to_string(state.join("web.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!alive(started), "the process the unit started stayed");
        let unit_pid: i32 = std::fs::read_to_string(state.join("web.mainpid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, unit_pid);
        let env = std::fs::read_to_string(d.run_dir.join("vms/web.env")).unwrap();
        // Jailed as under the direct launcher (the unit grants the jail's set-up
        // capabilities): its own uid, root and run directory.
        assert!(
            env.starts_with("VIREO_ARGS=--jail uid=98")
                && env.contains(" --config ")
                && env.contains("/vms/web/api.sock"),
            "{env}"
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid_line.contains("\t98"), "{status}");
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        let c = calls();
        assert!(c.contains("start vireo@web.service"), "{c}");
        assert!(
            c.contains("set-property --runtime vireo@web.service CPUWeight=250"),
            "{c}"
        );
        d.wait_serial("web", "tick 3 ", T);
        // Shared path above the launcher: a kill is seen (through the pidfd) and its
        // cause comes from the unit (ExecMainCode=killed, signal 9); the policy
        // restarts it as a new unit start.
        // SAFETY: kill with a pid from vireod's API and a signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let start = Instant::now();
        let v = loop {
            let v = d.vm("web");
            if v["state"] == "Running" && v["pid"] != pid {
                break v;
            }
            assert!(start.elapsed() < T, "not restarted: {v}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        let exits = d.ok("GET", "/api/v1/vms/web/exits", None);
        assert_eq!(exits[0]["signal"], 9, "{exits}");
        assert_eq!(exits[0]["reason"], "crashed", "{exits}");
        assert_eq!(calls().matches("start vireo@web.service").count(), 2);
        // A clean stop: status 0 from the unit.
        let st = d.ok("PUT", "/api/v1/vms/web/stop", None);
        assert_eq!(st["state"], "Stopped", "{st}");
        assert_eq!(st["last_exit"]["status"], 0, "{st}");
        assert!(!alive(v["pid"].as_i64().unwrap() as i32));
        assert!(!d.run_dir.join("vms/web.env").exists());
    });
    for h in helpers() {
        // SAFETY: kill with a pid the stand-in recorded and a signal.
        unsafe { libc::kill(h, libc::SIGKILL) };
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
