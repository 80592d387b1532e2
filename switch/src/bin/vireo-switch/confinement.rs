//! How `vireo-switch run` confines itself, in order (docs/switch.md, "Confinement"):
//! the configuration's sockets are opened (as started), privileges are dropped while
//! the process is single-threaded ([`crate::privileges`]), the Landlock domain entered
//! ([`crate::domain`]), the first threads started, each under its seccomp filter
//! ([`crate::seccomp`]), and last the switch thread's own filter installed.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::daemon::Daemon;
use crate::{domain, privileges, seccomp};

/// How `run` confines itself.
#[derive(Debug, clap::Args)]
pub struct Confinement {
    /// Per-thread seccomp filters: true, false (off, for debugging) or log (allow
    /// everything, log violations to the audit log).
    #[arg(long, default_value = "true", value_parser = parse_seccomp)]
    pub seccomp: seccomp::SeccompMode,
    /// Drop every capability but CAP_NET_RAW, set no_new_privs and the rlimits
    /// (false: keep everything).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub confine: bool,
    /// Run as this uid and gid (numeric) once the configured sockets are open.
    #[arg(long, value_name = "UID:GID", value_parser = privileges::parse_user)]
    pub user: Option<(u32, u32)>,
    /// RLIMIT_NOFILE once confined (at most: a lower hard limit stays).
    #[arg(long, default_value_t = 4096)]
    pub nofile: u64,
    /// RLIMIT_NPROC once confined (at most; threads count; not enforced for uid 0).
    #[arg(long, default_value_t = 4096)]
    pub nproc: u64,
    /// Where vhost-user sockets may be made (repeatable): with any, the kernel
    /// (Landlock) lets the switch make and remove sockets only beneath these and the
    /// control socket's directory.
    #[arg(long = "socket-dir", value_name = "DIR")]
    pub socket_dirs: Vec<PathBuf>,
}

fn parse_seccomp(s: &str) -> Result<seccomp::SeccompMode, String> {
    s.parse()
}

impl Confinement {
    /// Opens `cfg`'s sockets, confines the process and this thread, and returns the
    /// switch ready to run.
    pub fn start(self, cfg: Config) -> Result<Daemon, String> {
        if self.user.is_some() && !self.confine {
            return Err("--user needs --confine true".into());
        }
        let sockets: Vec<&Path> = cfg
            .ports
            .iter()
            .filter_map(|p| p.vhost_user.as_deref())
            .collect();
        domain::check(&self.socket_dirs, &sockets).map_err(|e| e.to_string())?;
        let control = cfg.control.clone();
        sandbox::keep_malloc_off_the_filesystem();
        let filters = seccomp::Filters::new(self.seccomp).map_err(|e| e.to_string())?;
        match self.seccomp {
            seccomp::SeccompMode::Off => {
                tracing::warn!("--seccomp false: the switch's threads run without seccomp filters")
            }
            seccomp::SeccompMode::Log => {
                tracing::warn!("--seccomp log: violations are logged to the audit log, not refused")
            }
            seccomp::SeccompMode::Enforce => sandbox::install_violation_handler("vireo-switch"),
        }
        let mut daemon = Daemon::new(cfg, filters.clone()).map_err(|e| e.to_string())?;
        // Still single-threaded: the uid and capability sets change for the whole process.
        privileges::drop_privileges(&privileges::PrivilegeOptions {
            confine: self.confine,
            user: self.user,
            nofile: self.nofile,
            nproc: self.nproc,
        })
        .map_err(|e| format!("dropping privileges: {e}"))?;
        domain::enter(&self.socket_dirs, &control).map_err(|e| e.to_string())?;
        daemon.start_threads().map_err(|e| e.to_string())?;
        filters
            .apply(seccomp::Role::Switch)
            .map_err(|e| e.to_string())?;
        Ok(daemon)
    }
}
