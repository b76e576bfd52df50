//! Real `dongbo-agent` and `dongbo-hub` processes, so a test can `kill -9` them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Path of a workspace binary in `target/<profile>/`: beside this executable (the benchmark) or one
/// level up (test executables live in `target/<profile>/deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no parent directory")?;
    for candidate in [Some(dir.join(name)), dir.parent().map(|p| p.join(name))].into_iter().flatten() {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!("{name} is not built next to {}: run `cargo build --bins` (or --release) first", dir.display())
}

/// Peak resident memory of a process in KiB (VmHWM), if it is running.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// A running dongbo process; killed with SIGKILL on drop.
pub struct DongboProcess {
    child: Option<Child>,
    /// Its combined log.
    pub log: PathBuf,
}

impl DongboProcess {
    /// Starts `binary args...`, logging to `log`.
    pub fn spawn(binary_name: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(binary_name, args, log, &[])
    }

    /// Starts `binary args...` with extra environment variables (a `DONGBO_FAULT`, say).
    pub fn spawn_with_env(binary_name: &str, args: &[&str], log: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_path(&binary(binary_name)?, args, log, env)
    }

    /// Starts the executable at `exe` with `args`, logging to `log`, with extra environment variables.
    pub fn spawn_path(exe: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let binary_name = exe.display();
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(exe)
            .args(args)
            .env("DONGBO_LOG", std::env::var("DONGBO_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {binary_name}"))?;
        Ok(Self { child: Some(child), log: log.to_path_buf() })
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit status, or `None` if it
    /// is still running (or was not started).
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        // /proc tells without reaping, so a shared reference is enough; a zombie has exited.
        self.child.as_ref().is_some_and(|c| {
            std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
                .unwrap_or(false)
        })
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; fails with the log's tail after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("no {needle:?} in the log within {timeout:?}:\n{}", crate::tail(&self.log_text(), 20));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for DongboProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// CPU seconds (user + system) a process has used, with those of its children it has reaped
/// (`cutime`/`cstime`) and of the children still running: a Postgres cluster's whole cost when
/// given its postmaster, a dongbo process's when given its pid.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    fn ticks(pid: u32, with_reaped: bool) -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
        // The command name may hold spaces: fields are counted after its closing parenthesis.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
        let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
        // After ")": state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
        let own = f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
        if with_reaped {
            own + f.get(13).unwrap_or(&0) + f.get(14).unwrap_or(&0)
        } else {
            own
        }
    }
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    let total = ticks(pid, true) + children.iter().map(|&c| ticks(c, true)).sum::<u64>();
    // USER_HZ is 100 on every Linux this runs on.
    total as f64 / 100.0
}
