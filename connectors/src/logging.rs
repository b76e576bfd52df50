//! How every dongbo binary logs: to stderr, filtered by `DONGBO_LOG` (an `EnvFilter`, default
//! `info`), as text or, with `DONGBO_LOG_FORMAT=json`, one JSON object per line.
//!
//! JSON field names are stable, for log shippers: `timestamp` (RFC 3339, UTC), `level`,
//! `target` (the module), `message`, then the event's own fields at the top level under the names
//! the code gives them (`source_id`, `peer`, `reason`, `error`, `table`, `rows`, …). A refused
//! connection or request always carries `peer` and `reason`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The variable that turns JSON logs on.
pub const FORMAT_VAR: &str = "DONGBO_LOG_FORMAT";

/// Whether logs are written as JSON lines.
pub fn is_json() -> bool {
    std::env::var(FORMAT_VAR).is_ok_and(|f| f == "json")
}

/// Installs the process's log subscriber; call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_env("DONGBO_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if is_json() {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
    } else {
        builder.init();
    }
}
