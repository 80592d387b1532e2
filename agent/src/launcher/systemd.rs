//! The systemd launcher (when systemd is PID 1): each VMM is an instance of the
//! template unit `vireo@NAME.service` (agent/systemd/vireo@.service, Type=notify).
//!
//! vireod writes `<run-dir>/vms/NAME.env` with `VIREO_ARGS=...` (the unit runs
//! `vireo $VIREO_ARGS`, so a boot and an incoming migration use the same unit), runs
//! `systemctl start vireo@NAME.service` (which returns once `vireo` sent READY=1, or
//! failed), reads the unit's MainPID and from then on watches and signals the process
//! through a pidfd like any other. When it ends, the exit status comes from the
//! unit's `ExecStopPost=`, which writes `$EXIT_CODE $EXIT_STATUS` to
//! `<run-dir>/vms/NAME.exit` before the unit goes inactive (systemd forgets an inactive
//! unit's ExecMain* properties as soon as it collects the unit, which for a clean exit
//! is at once), or else from ExecMainCode/ExecMainStatus while systemd still has them. CPU placement is systemd's: the units live in
//! `vireo.slice`, and once a VM runs vireod sets the unit's `CPUWeight=` to the VM's
//! relative weight (`systemctl set-property --runtime`).
//!
//! `systemctl` runs on tokio's blocking pool with std's `Command` (tokio's process
//! support would pull in its signal driver; see agent/README.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{watch, Exit, Handle, LaunchSpec, Watch};
use crate::AgentError;

#[derive(Clone, Debug)]
pub struct Systemd {
    systemctl: PathBuf,
}

/// How to ask systemd how a unit's main process ended.
#[derive(Clone, Debug)]
pub struct StatusQuery {
    systemctl: PathBuf,
    unit: String,
    /// Written by the unit's `ExecStopPost=` (see the module documentation).
    exit_file: PathBuf,
    /// A jailed VMM is the init of its own PID namespace (`pidns=new`): its status
    /// 128+N of a signal it caught reads as that signal.
    namespace_init: bool,
}

/// Where the unit of the VM with environment file `env_file` records how its main
/// process ended (`vireo@.service`'s `ExecStopPost=`).
pub fn exit_file(env_file: &Path) -> PathBuf {
    env_file.with_extension("exit")
}

/// Signal numbers of the names systemd puts in `$EXIT_STATUS` ("KILL", "ABRT", ...).
fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "SYS" => libc::SIGSYS,
        n => return n.parse().ok(),
    })
}

/// `$EXIT_CODE $EXIT_STATUS` as the unit's `ExecStopPost=` wrote them: "exited 0",
/// "killed KILL", "dumped ABRT". None for anything else (a partial write).
fn parse_exit_record(text: &str) -> Option<Exit> {
    let mut it = text.split_whitespace();
    let (code, status) = (it.next()?, it.next()?);
    match code {
        "exited" => Some(Exit {
            status: Some(status.parse().ok()?),
            signal: None,
        }),
        "killed" | "dumped" => Some(Exit {
            status: None,
            signal: Some(signal_number(status)?),
        }),
        _ => None,
    }
}

/// The unit of VM `name`.
pub fn unit_name(name: &str) -> String {
    format!("vireo@{name}.service")
}

/// Runs `systemctl ARGS`; its stdout, or what went wrong.
fn systemctl(bin: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(format!(
            "{} {} failed ({}){}",
            bin.display(),
            args.join(" "),
            out.status,
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `KEY=value` lines of `systemctl show`.
fn property<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::trim)
}

/// The environment file's one line. systemd splits `$VIREO_ARGS` on whitespace and
/// would interpret quotes and backslashes, so arguments with those are refused.
pub fn env_file_text(spec: &LaunchSpec) -> Result<String, String> {
    // systemd starts `vireo` itself: a jailed one makes its own PID namespace and
    // hands itself to systemd as the unit's main process (vmm/src/pidns.rs).
    let mut spec = spec.clone();
    if let Some(jail) = spec.jail.as_mut() {
        jail.new_pid_namespace = true;
    }
    let mut args = Vec::new();
    for a in spec.argv().map_err(|e| e.to_string())? {
        let a = a
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        if a.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '$'))
        {
            return Err(format!(
                "argument {a:?} cannot be passed through a systemd environment file"
            ));
        }
        args.push(a);
    }
    Ok(format!("VIREO_ARGS={}\n", args.join(" ")))
}

impl Systemd {
    pub fn new(systemctl: PathBuf) -> Self {
        Self { systemctl }
    }

    pub fn status_query(&self, spec: &LaunchSpec) -> StatusQuery {
        StatusQuery {
            systemctl: self.systemctl.clone(),
            unit: unit_name(&spec.name),
            exit_file: exit_file(&spec.env_file),
            namespace_init: spec.jail.is_some(),
        }
    }

    /// `systemctl start vireo@NAME.service`; returns once the unit is started (the
    /// VMM sent READY=1) with its main process watched.
    pub async fn spawn(&self, spec: &LaunchSpec) -> Result<(Handle, Watch), AgentError> {
        let unit = unit_name(&spec.name);
        let failed = |message: String| AgentError::Systemd {
            unit: unit.clone(),
            message,
        };
        let _ = std::fs::remove_file(&spec.socket); // Stale: the VM is not running.
        let _ = std::fs::remove_file(exit_file(&spec.env_file)); // A previous run's.
        let text = env_file_text(spec).map_err(failed)?;
        std::fs::write(&spec.env_file, text)
            .map_err(|e| AgentError::io("cannot write unit environment", &spec.env_file, e))?;
        let bin = self.systemctl.clone();
        let u = unit.clone();
        let pid = tokio::task::spawn_blocking(move || -> Result<i32, String> {
            systemctl(&bin, &["start", &u])?;
            let out = systemctl(&bin, &["show", "-p", "MainPID", &u])?;
            let pid = property(&out, "MainPID")
                .and_then(|p| p.parse::<i32>().ok())
                .unwrap_or(0);
            if pid <= 0 {
                return Err(format!("{u} has no main process after it started"));
            }
            Ok(pid)
        })
        .await
        .map_err(|e| failed(format!("systemctl task: {e}")))?
        .map_err(failed)?;
        debug!(unit = %unit, pid, "unit started");
        let (h, mut w) =
            watch(pid, None).map_err(|e| AgentError::io("cannot watch VMM process", &unit, e))?;
        w.unit = Some(self.status_query(spec));
        Ok((h, w))
    }

    /// The unit's CPU weight (1..=10000; systemd maps it to cpu.shares on cgroup v1).
    pub async fn set_weight(&self, name: &str, weight: u32) {
        let bin = self.systemctl.clone();
        let unit = unit_name(name);
        let r = tokio::task::spawn_blocking(move || {
            systemctl(
                &bin,
                &[
                    "set-property",
                    "--runtime",
                    &unit,
                    &format!("CPUWeight={weight}"),
                ],
            )
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(vm = name, error = %e, "cannot set the unit's CPU weight"),
            Err(e) => warn!(vm = name, error = %e, "cannot set the unit's CPU weight"),
        }
    }
}

impl StatusQuery {
    /// How process `pid`, the unit's main process, ended (blocking; systemd may take a
    /// moment to record it). Unknown if systemd cannot tell.
    pub fn exit_of(&self, pid: i32) -> Exit {
        let exit = self.unit_exit_of(pid);
        if self.namespace_init {
            exit.of_namespace_init()
        } else {
            exit
        }
    }

    fn unit_exit_of(&self, pid: i32) -> Exit {
        let deadline = Instant::now() + Duration::from_secs(2);
        // The unit's ExecStopPost= writes the record once the main process is gone;
        // until then systemd's own properties are only asked after a second (a unit
        // without the record), so that the record is never written after vireod
        // looked and left behind.
        let record_until = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(exit) = std::fs::read_to_string(&self.exit_file)
                .ok()
                .and_then(|t| parse_exit_record(&t))
            {
                let _ = std::fs::remove_file(&self.exit_file);
                return exit;
            }
            if Instant::now() < record_until {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let out = systemctl(
                &self.systemctl,
                &[
                    "show",
                    "-p",
                    "ExecMainPID",
                    "-p",
                    "ExecMainCode",
                    "-p",
                    "ExecMainStatus",
                    "-p",
                    "ExecMainExitTimestampMonotonic",
                    &self.unit,
                ],
            );
            if let Ok(out) = &out {
                let same =
                    property(out, "ExecMainPID").and_then(|p| p.parse::<i32>().ok()) == Some(pid);
                let exited = property(out, "ExecMainExitTimestampMonotonic")
                    .is_some_and(|t| !t.is_empty() && t != "0");
                let code = property(out, "ExecMainCode").and_then(|c| c.parse::<i32>().ok());
                let status = property(out, "ExecMainStatus").and_then(|c| c.parse::<i32>().ok());
                if same && exited {
                    // ExecMainCode is a CLD_* code: 1 exited, 2 killed, 3 dumped core.
                    return match code {
                        Some(1) => Exit {
                            status,
                            signal: None,
                        },
                        Some(2) | Some(3) => Exit {
                            status: None,
                            signal: status,
                        },
                        _ => Exit {
                            status: None,
                            signal: None,
                        },
                    };
                }
            }
            if Instant::now() > deadline {
                warn!(unit = %self.unit, pid, "systemd did not report how the VMM ended");
                return Exit {
                    status: None,
                    signal: None,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::VmmArgs;

    #[test]
    fn env_file_carries_the_arguments_and_refuses_what_systemd_would_split() {
        let mut spec = LaunchSpec {
            name: "web".into(),
            vireo_bin: "/usr/bin/vireo".into(),
            args: VmmArgs::Boot {
                config: "/run/vireo/vms/web.json".into(),
            },
            socket: "/run/vireo/vms/web.sock".into(),
            log: "/l".into(),
            pid_file: "/p".into(),
            env_file: "/e".into(),
            storage_roots: Vec::new(),
            block_devices: Vec::new(),
            socket_dirs: vec!["/run/vireo/vms".into()],
            memory: None,
            jail: None,
        };
        assert_eq!(
            env_file_text(&spec).unwrap(),
            "VIREO_ARGS=--config /run/vireo/vms/web.json --api-socket /run/vireo/vms/web.sock\n"
        );
        spec.socket = "/run/my vms/web.sock".into();
        assert!(env_file_text(&spec).unwrap_err().contains("my vms"));
    }

    #[test]
    fn exit_records_of_the_unit_become_exits() {
        let exited = |status| Exit {
            status: Some(status),
            signal: None,
        };
        let killed = |signal| Exit {
            status: None,
            signal: Some(signal),
        };
        assert_eq!(parse_exit_record("exited 0\n"), Some(exited(0)));
        assert_eq!(parse_exit_record("exited 3"), Some(exited(3)));
        assert_eq!(parse_exit_record("killed KILL\n"), Some(killed(9)));
        assert_eq!(parse_exit_record("dumped ABRT"), Some(killed(6)));
        assert_eq!(parse_exit_record("killed SIGTERM"), Some(killed(15)));
        assert_eq!(parse_exit_record("killed 31"), Some(killed(31)));
        assert_eq!(parse_exit_record("exited"), None, "partial write");
        assert_eq!(parse_exit_record(""), None);
        assert_eq!(parse_exit_record("killed NOPE"), None);
        assert_eq!(
            exit_file(Path::new("/run/vireo/vms/web.env")),
            Path::new("/run/vireo/vms/web.exit")
        );
    }

    #[test]
    fn show_output_is_parsed_by_key() {
        let t = "ExecMainPID=42\nExecMainCode=1\nExecMainStatus=0\n";
        assert_eq!(property(t, "ExecMainPID"), Some("42"));
        assert_eq!(property(t, "ExecMainCode"), Some("1"));
        assert_eq!(property(t, "MainPID"), None);
    }
}
