//! The dongbo wire contract: protobuf messages and the gRPC `Ingest` service, package `dongbo.v1`.
//!
//! Besides generated code, [`webhook`] holds the webhook channel's signature scheme, which hub and
//! receivers must agree on as they agree on the protobuf messages. Otherwise only generated code
//! lives here. Conversion to the domain model (`dongbo_connectors::model`) is done
//! with `TryFrom` at the edges, because every proto field is optional on the wire.

pub mod webhook;

/// Version 1 of the contract.
pub mod v1 {
    tonic::include_proto!("dongbo.v1");
}

/// The protocol version this build speaks; sent in `Hello`. Version 2: a batch's bytes may be a
/// zstd frame of the encoded `ChangeBatch` (see `SpooledBatch.change_batch`). Version 3: a
/// change's position may be a poll cycle (`SourcePosition.poll_cycle`).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest protocol version a hub of this build still accepts: version 1 agents send plain
/// batches and version 2 agents no poll positions, which version 3 reads as they are.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
