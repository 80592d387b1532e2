//! `--jail cgroup=NAME` on a cgroup v2 host (the unified hierarchy at /sys/fs/cgroup):
//! the VMM moves itself into `NAME` below its current cgroup, then enables the
//! controllers its limits need in the current cgroup's `cgroup.subtree_control` and
//! writes `memory.max` / `pids.max` in `NAME`.
//!
//! Moving first respects cgroup v2's "no internal processes" rule: once the VMM has
//! left, its former cgroup holds no process (vireod's `vms/NAME` or a systemd unit's
//! cgroup), so controllers can be enabled for its children. Where another process
//! remains there, or the parent does not offer a controller (not delegated, or bound
//! to a cgroup v1 hierarchy), the jail fails with an error that says so: a limit the
//! user asked for is never silently dropped.

use std::path::{Path, PathBuf};

/// Where the hierarchy is mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum Cgroup2Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 entry (0::PATH) in /proc/self/cgroup")]
    NotListed,
    #[error(
        "{limit} needs the {controller} controller, which {parent} does not offer (cgroup.controllers: {offered:?}; not delegated, or bound to a cgroup v1 hierarchy)"
    )]
    Unavailable {
        limit: &'static str,
        controller: &'static str,
        parent: PathBuf,
        offered: String,
    },
    #[error(
        "cannot enable {controller} in {parent}/cgroup.subtree_control: {source} (other processes still in {parent}? cgroup v2 allows controllers only above leaves)"
    )]
    Enable {
        controller: &'static str,
        parent: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Cgroup2Error + '_ {
    move |source| Cgroup2Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// True when /sys/fs/cgroup is a cgroup2 file system.
pub fn mounted() -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    // SAFETY: statfs writes into the zeroed struct we own; the path is a C literal.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c"/sys/fs/cgroup".as_ptr(), &mut st) == 0
            && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Moves this process into `NAME` below its cgroup and applies the limits.
pub fn enter(
    name: &str,
    memory_max: Option<u64>,
    pids_max: Option<u64>,
) -> Result<PathBuf, Cgroup2Error> {
    let own =
        std::fs::read_to_string("/proc/self/cgroup").map_err(io(Path::new("/proc/self/cgroup")))?;
    let current = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(Cgroup2Error::NotListed)?;
    let parent = Path::new(MOUNT).join(current.trim_start_matches('/'));
    let dir = parent.join(name);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(&dir)(e)),
        _ => {}
    }
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(io(&procs))?;
    let offered_file = parent.join("cgroup.controllers");
    let offered = std::fs::read_to_string(&offered_file).map_err(io(&offered_file))?;
    for (limit, controller, file, value) in [
        ("memory_max", "memory", "memory.max", memory_max),
        ("pids_max", "pids", "pids.max", pids_max),
    ] {
        let Some(value) = value else { continue };
        if !offered.split_whitespace().any(|c| c == controller) {
            return Err(Cgroup2Error::Unavailable {
                limit,
                controller,
                parent,
                offered: offered.trim().to_string(),
            });
        }
        std::fs::write(
            parent.join("cgroup.subtree_control"),
            format!("+{controller}"),
        )
        .map_err(|source| Cgroup2Error::Enable {
            controller,
            parent: parent.clone(),
            source,
        })?;
        let path = dir.join(file);
        std::fs::write(&path, value.to_string()).map_err(io(&path))?;
    }
    Ok(dir)
}
