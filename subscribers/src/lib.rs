//! Client pieces for systems subscribing to the dongbo hub: a gRPC `Subscribe` client that resumes
//! where it acknowledged, and a webhook receiver that checks the hub's HMAC signature. The example
//! subscribers in `src/bin` are built from them, and so are the end-to-end tests.

pub mod grpc;
pub mod webhook;

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
