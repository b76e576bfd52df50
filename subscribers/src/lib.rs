//! Client pieces for systems subscribing to the dongbo hub: a gRPC `Subscribe` client that resumes
//! where it acknowledged, and a webhook receiver that checks the hub's HMAC signature. The example
//! subscribers in `src/bin` are built from them, and so are the end-to-end tests.

pub mod grpc;
pub mod webhook;

/// A subscriber's secret (token, webhook key): the first line of `file`, or else the environment
/// variable `env`; never a command-line argument, which every user of the machine can read.
pub fn secret(file: Option<&std::path::Path>, env: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    match file {
        Some(f) => Ok(std::fs::read_to_string(f)
            .with_context(|| format!("cannot read {}", f.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
        None => std::env::var(env).with_context(|| format!("no secret: pass its file or set {env}")),
    }
}

/// One record as a subscriber receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Stable id: drop a record whose id was already handled.
    pub event_id: String,
    /// Event name or table.
    pub name: String,
    /// The record.
    pub body: serde_json::Value,
    /// Resume token (gRPC only).
    pub resume_token: String,
}
