//! No thread dies silently: a panic anywhere is logged with the thread's name, the
//! message and the source location, and then the whole process aborts. A VM whose
//! vCPU is gone must never look Running, nor a switch whose port worker is gone look
//! alive: the supervisor (vireod, systemd) sees the process killed by SIGABRT.
//!
//! The hook is installed by the binaries only: library tests keep unwinding.

use std::panic::PanicHookInfo;

/// The one line logged for a panic: `thread 'NAME' panicked at FILE:LINE:COL: MESSAGE`.
pub fn describe(thread: Option<&str>, info: &PanicHookInfo<'_>) -> String {
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string());
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_else(|| "an unknown location".to_string());
    format!(
        "thread '{}' panicked at {location}: {message}",
        thread.unwrap_or("<unnamed>")
    )
}

/// Makes every panic end the process (after logging it), whatever thread it is on.
///
/// Only system calls every seccomp filter allows are made here (write, the signal
/// mask, tgkill), so the abort itself cannot trip a filter.
pub fn install_abort_hook(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let line = describe(std::thread::current().name(), info);
        tracing::error!("{line}");
        eprintln!("{program}: error: {line}; aborting the process");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_description_names_thread_location_and_message() {
        let seen = Arc::new(Mutex::new(String::new()));
        let s = seen.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            *s.lock().unwrap() = describe(std::thread::current().name(), info);
        }));
        let r = std::thread::Builder::new()
            .name("vireo-vcpu7".into())
            .spawn(|| panic!("boom {}", 42))
            .unwrap()
            .join();
        std::panic::set_hook(previous);
        assert!(r.is_err());
        let line = seen.lock().unwrap().clone();
        assert!(
            line.starts_with("thread 'vireo-vcpu7' panicked at sandbox/src/panic.rs:"),
            "{line}"
        );
        assert!(line.ends_with(": boom 42"), "{line}");
    }
}
