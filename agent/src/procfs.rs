//! What the agent reads from /proc: is a process alive and which program it runs, its
//! CPU time and resident memory.

use std::path::PathBuf;

/// The fields of /proc/PID/stat the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// R, S, D, Z, T, ...
    pub state: char,
    /// User + system CPU time of all threads, in nanoseconds.
    pub cpu_ns: u64,
    /// Start time after boot, in clock ticks (identifies a process across pid reuse).
    pub start_ticks: u64,
}

pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Parses the text of /proc/PID/stat (the command name may contain spaces and
/// parentheses, so fields are counted from the last ')').
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14, stime 15, starttime 22.
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start_ticks: u64 = f.get(19)?.parse().ok()?;
    let tick_ns = 1_000_000_000 / clock_ticks();
    Some(Stat {
        state,
        cpu_ns: (utime + stime) * tick_ns,
        start_ticks,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Alive and not a zombie (a dead child whose parent has not reaped it yet).
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Resident memory in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kb_field(&text, "VmRSS:").map(|kb| kb * 1024)
}

fn parse_kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The process's command line, split at NULs.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The executable (may end in " (deleted)" after an upgrade replaced it).
pub fn exe(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Total memory of the host.
pub fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_kb_field(&t, "MemTotal:"))
        .unwrap_or(0)
        * 1024
}

/// Memory the host can give without swapping (MemAvailable); None if unreadable.
pub fn mem_available_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_kb_field(&t, "MemAvailable:"))
        .map(|kb| kb * 1024)
}

/// Milliseconds since boot (/proc/uptime).
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// How long a process that started at `start_ticks` after boot has run.
pub fn age_ms(start_ticks: u64) -> u64 {
    uptime_ms().saturating_sub(start_ticks * 1000 / clock_ticks())
}

/// The CPU's feature flags as the kernel reports them (`flags` of /proc/cpuinfo's
/// first processor: what CPUID says, less what the kernel disabled), sorted.
pub fn cpu_flags() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut flags: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    flags.sort();
    flags
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let line = "1234 (vi reo) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 4242 1000 50 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.cpu_ns, 10 * (1_000_000_000 / clock_ticks()));
        assert_eq!(s.start_ticks, 4242);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(!cmdline(me).unwrap().is_empty());
        assert!(exe(me).is_some());
        assert!(mem_total_bytes() > 0);
        assert!(!alive(i32::MAX));
    }
}
