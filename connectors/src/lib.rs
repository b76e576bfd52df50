//! Sources of row changes and the change model they share.
//!
//! A source captures committed row changes from one upstream database, in commit order, as
//! [`model::ChangeEvent`]s. It never decides when a change is safe to forget: the agent tells it, through
//! [`source::Source::release`], once the change is durable in the agent's spool. Delivery is
//! therefore at-least-once from the source; the agent removes the replayed prefix after a restart using
//! the [`source::ResumePoint`] it stored atomically with the spooled changes, which makes the spool
//! exactly-once.
//!
//! - [`model`] — the domain types (`Value`, `Row`, `TableSchema`, `ChangeEvent`, `Lsn`).
//! - [`poll`] — the polling source, for servers whose change log cannot be read.
//! - [`wire`] — conversion between the domain types and the `dongbo.v1` protobuf contract.
//! - [`postgres`] — the Postgres source (pgoutput logical replication and a consistent snapshot).
//! - [`kafka`] — Kafka helpers shared by the agent and the hub.
//! - [`fault`] — fault injection points for the fault tests (`DONGBO_FAULT`).
//! - [`tls`] — certificate validity, for expiry warnings.
//! - `allocator` (feature `allocator`) — the binaries' allocator, tuned for a small footprint.
//! - [`segments`] — append-only payload files, the durable storage under the agent's spool and the
//!   hub's fan-out log.

#[cfg(feature = "allocator")]
pub mod allocator;
pub mod check;
pub mod config_file;
pub mod error;
pub mod fault;
pub mod kafka;
pub mod logging;
pub mod model;
pub mod mysql;
pub mod poll;
pub mod postgres;
pub mod segments;
pub mod source;
pub mod tls;
pub mod wire;
