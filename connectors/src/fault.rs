//! Fault injection for the fault tests: `DONGBO_FAULT=<point>[,<point>…]` in a process's
//! environment makes it fail at the named points, so a test can put a crash exactly inside a window
//! that timing alone would hit only by luck. Unset in production, where every check is one cached
//! lookup that is false.

use std::sync::OnceLock;

/// The environment variable naming the armed fault points.
pub const FAULT_ENV: &str = "DONGBO_FAULT";

fn armed() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var(FAULT_ENV).map(|v| v.split(',').map(|p| p.trim().to_string()).collect()).unwrap_or_default()
    })
}

/// Whether fault point `point` is armed.
pub fn armed_at(point: &str) -> bool {
    armed().iter().any(|p| p == point)
}

/// Dies like `kill -9` at `point` if it is armed: no destructor runs, nothing is flushed.
pub fn crash_at(point: &str) {
    if armed_at(point) {
        eprintln!("fault injection: crashing at {point}");
        std::process::abort();
    }
}
