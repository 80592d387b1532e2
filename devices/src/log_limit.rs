//! Rate-limited logging for lines a guest can trigger at will.
//!
//! A guest that submits malformed requests in a loop must not be able to fill the host
//! disk through the VMM log. Every guest-triggered warning goes through
//! [`guest_warn!`](crate::guest_warn): each call site may log [`LINES_PER_WINDOW`] lines
//! per [`WINDOW`]; the last admitted line says that the site goes quiet, and the first
//! line of a later window says how many were suppressed meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What a call site does with one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `suppressed` lines of this site were dropped since its last logged line.
    Log { suppressed: u64 },
    /// Log it, and say that this site is quiet for the rest of the window.
    Last { suppressed: u64 },
    /// Drop it (counted).
    Suppress,
}

/// The state of one call site (a `static` made by the macro).
pub struct LogLimit {
    /// Start of the current window, in milliseconds since [`base`].
    window_start_ms: AtomicU64,
    /// Lines admitted in the current window.
    admitted: AtomicU64,
    /// Lines dropped since the last admitted one.
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl LogLimit {
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Decides for a line logged now.
    pub fn admit(&self) -> Admit {
        let now = u64::try_from(base().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.admit_at(now)
    }

    /// Decides for a line logged at `now_ms` (milliseconds on a monotonic clock).
    pub fn admit_at(&self, now_ms: u64) -> Admit {
        let window_ms = WINDOW.as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= window_ms
            && self
                .window_start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.admitted.store(0, Ordering::Relaxed);
        }
        let n = self.admitted.fetch_add(1, Ordering::Relaxed);
        if n >= LINES_PER_WINDOW {
            // Saturate: a dropped line must not make the counter wrap to "admitted".
            self.admitted.store(LINES_PER_WINDOW, Ordering::Relaxed);
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return Admit::Suppress;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if n + 1 == LINES_PER_WINDOW {
            Admit::Last { suppressed }
        } else {
            Admit::Log { suppressed }
        }
    }
}

/// `tracing::warn!` for lines a guest can trigger: at most
/// [`LINES_PER_WINDOW`](crate::log_limit::LINES_PER_WINDOW) per call site per
/// [`WINDOW`](crate::log_limit::WINDOW), then one "suppressed" note.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        match LIMIT.admit() {
            $crate::log_limit::Admit::Suppress => {}
            $crate::log_limit::Admit::Log { suppressed } => {
                if suppressed > 0 {
                    ::tracing::warn!(suppressed, "guest-triggered warnings suppressed before this one");
                }
                ::tracing::warn!($($arg)+);
            }
            $crate::log_limit::Admit::Last { suppressed } => {
                if suppressed > 0 {
                    ::tracing::warn!(suppressed, "guest-triggered warnings suppressed before this one");
                }
                ::tracing::warn!($($arg)+);
                ::tracing::warn!(
                    window_s = $crate::log_limit::WINDOW.as_secs(),
                    "this guest-triggered warning repeats too often: further ones are suppressed for the rest of the window"
                );
            }
        }
    }};
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects formatted log lines of the current thread.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Runs `f` with a subscriber that writes into this buffer; returns the lines.
        pub(crate) fn run(f: impl FnOnce()) -> Vec<String> {
            let buf = Captured::default();
            let writer = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, f);
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    #[test]
    fn a_site_logs_its_quota_per_window_then_reports_what_it_dropped() {
        let l = LogLimit::new();
        let t0 = 50_000;
        for i in 0..LINES_PER_WINDOW - 1 {
            assert_eq!(l.admit_at(t0 + i), Admit::Log { suppressed: 0 });
        }
        assert_eq!(l.admit_at(t0 + 20), Admit::Last { suppressed: 0 });
        for i in 0..10_000 {
            assert_eq!(l.admit_at(t0 + 30 + i % 1000), Admit::Suppress);
        }
        let later = t0 + WINDOW.as_millis() as u64;
        assert_eq!(l.admit_at(later), Admit::Log { suppressed: 10_000 });
        assert_eq!(l.admit_at(later + 1), Admit::Log { suppressed: 0 });
    }

    #[test]
    fn ten_thousand_guest_warnings_make_a_bounded_number_of_log_lines() {
        let lines = Captured::run(|| {
            for i in 0..10_000 {
                crate::guest_warn!(request = i, "malformed request from the guest");
            }
        });
        let warnings = lines
            .iter()
            .filter(|l| l.contains("malformed request from the guest"))
            .count();
        assert!(
            (1..=LINES_PER_WINDOW as usize).contains(&warnings),
            "{warnings} lines logged"
        );
        assert!(lines.len() <= LINES_PER_WINDOW as usize + 2, "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l.contains("further ones are suppressed")));
    }
}
