//! Kafka pieces shared by the agent (its change topic) and the hub (subscription topics): topic
//! creation and producing in order.

pub mod security;

#[cfg(feature = "kafka")]
mod client;
#[cfg(feature = "kafka")]
pub use client::*;
