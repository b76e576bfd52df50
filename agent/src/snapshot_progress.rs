//! Progress of a snapshot being read into the spool: rows against the source's estimate
//! ([`Captured::SnapshotPlanned`](dongbo_connectors::source::Captured)), the rate and the time
//! left. Logged every [`LOG_EVERY`] as `snapshot progress` (fields `rows`, `estimated_rows`,
//! `percent`, `rows_per_s`, `eta_s`), drawn as a bar when stderr is a terminal, and exported as
//! `dongbo_agent_snapshot_*`.
//!
//! The estimate is the server's statistics (a count only for a table it has none for), so the
//! percentage is held at 99 until the snapshot says it is done, and the estimate is raised to what
//! was read when a table holds more than it said. An online snapshot of added tables has no
//! estimate: it shows rows and rate only.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;
use tracing::info;

/// How often progress is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Where a snapshot is, at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Rows read so far.
    pub rows: u64,
    /// The rows expected in all, when estimated.
    pub estimated_rows: Option<u64>,
    /// Percent done (0–99 while running), when estimated.
    pub percent: Option<f64>,
    /// Rows per second since the start.
    pub rows_per_s: f64,
    /// Seconds left at that rate, when estimated and moving.
    pub eta_s: Option<f64>,
}

/// One snapshot's progress.
pub struct SnapshotProgress {
    started: Instant,
    rows: u64,
    estimated: Option<u64>,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl SnapshotProgress {
    /// A snapshot starts, expecting `estimated_rows` (if known).
    pub fn start(estimated_rows: Option<u64>) -> Self {
        let now = Instant::now();
        let bar = (std::io::stderr().is_terminal() && !dongbo_connectors::logging::is_json()).then(|| {
            let bar = ProgressBar::with_draw_target(estimated_rows, ProgressDrawTarget::stderr_with_hz(2));
            let template = if estimated_rows.is_some() {
                "snapshot {bar:40} {percent:>3}% {human_pos}/{human_len} rows, {per_sec}, {eta} left"
            } else {
                "snapshot {spinner} {human_pos} rows, {per_sec}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar
        });
        crate::metrics::agent().snapshot_started(estimated_rows);
        Self { started: now, rows: 0, estimated: estimated_rows, last_log: now, bar }
    }

    /// A snapshot row was read.
    pub fn row(&mut self) {
        self.rows += 1;
        if let Some(e) = self.estimated.as_mut() {
            if self.rows > *e {
                *e = self.rows;
                if let Some(bar) = &self.bar {
                    bar.set_length(*e);
                }
            }
        }
        // The clock is read once per 1024 rows: this runs for every row of a 100 M-row table.
        if self.rows.is_multiple_of(1024) {
            if let Some(bar) = &self.bar {
                bar.set_position(self.rows);
            }
            let now = Instant::now();
            if now.duration_since(self.last_log) >= LOG_EVERY {
                self.last_log = now;
                self.report(now);
            }
        }
    }

    /// The figures at `now`.
    pub fn figures(&self, now: Instant) -> Figures {
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let rows_per_s = if elapsed > 0.0 { self.rows as f64 / elapsed } else { 0.0 };
        let estimated_rows = self.estimated.filter(|e| *e > 0);
        let percent = estimated_rows.map(|e| (self.rows as f64 * 100.0 / e as f64).min(99.0));
        let eta_s =
            estimated_rows.filter(|_| rows_per_s > 0.0).map(|e| e.saturating_sub(self.rows) as f64 / rows_per_s);
        Figures { rows: self.rows, estimated_rows, percent, rows_per_s, eta_s }
    }

    fn report(&self, now: Instant) {
        let f = self.figures(now);
        crate::metrics::agent().snapshot_progress(&f);
        let round = |v: f64| (v * 10.0).round() / 10.0;
        info!(
            rows = f.rows,
            estimated_rows = f.estimated_rows,
            percent = f.percent.map(round),
            rows_per_s = f.rows_per_s.round() as u64,
            eta_s = f.eta_s.map(|s| s.round() as u64),
            "snapshot progress"
        );
    }

    /// The snapshot is spooled whole.
    pub fn finish(self) {
        let f = self.figures(Instant::now());
        crate::metrics::agent().snapshot_finished(&f);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        info!(
            rows = f.rows,
            rows_per_s = f.rows_per_s.round() as u64,
            seconds = self.started.elapsed().as_secs(),
            "snapshot read whole"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_eta_follow_the_rate_and_stay_under_100_until_done() {
        let mut p = SnapshotProgress::start(Some(1000));
        for _ in 0..250 {
            p.row();
        }
        let later = p.started + Duration::from_secs(10);
        let f = p.figures(later);
        assert_eq!(f.rows, 250);
        assert_eq!(f.percent, Some(25.0));
        assert!((f.rows_per_s - 25.0).abs() < 1e-9, "{f:?}");
        assert!((f.eta_s.expect("an eta") - 30.0).abs() < 1e-9, "{f:?}");
        // The table held more than its statistics said.
        for _ in 0..1000 {
            p.row();
        }
        let f = p.figures(later);
        assert_eq!((f.estimated_rows, f.percent, f.eta_s), (Some(1250), Some(99.0), Some(0.0)));
        p.finish();
    }

    #[test]
    fn without_an_estimate_only_rows_and_rate_are_known() {
        let mut p = SnapshotProgress::start(None);
        p.row();
        let f = p.figures(p.started + Duration::from_secs(2));
        assert_eq!((f.rows, f.percent, f.eta_s), (1, None, None));
        assert!((f.rows_per_s - 0.5).abs() < 1e-9);
    }
}
