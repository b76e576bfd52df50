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
/// change's position may be a poll cycle (`SourcePosition.poll_cycle`). Version 4: agents report
/// their status (`AgentMessage.status`) to hubs whose `Welcome.protocol_version` is 4 or more.
pub const PROTOCOL_VERSION: u32 = 4;

/// The first protocol version whose hubs take `AgentMessage.status`.
pub const STATUS_PROTOCOL_VERSION: u32 = 4;

/// The Kafka message key of an agent's status record (an encoded `AgentStatusReport`) on its
/// topic; a change's key starts with its table's name, which never holds a NUL.
pub const KAFKA_STATUS_KEY: &[u8] = b"\0status";

/// The longest host name an agent reports, and the longest last error.
pub const STATUS_HOST_MAX: usize = 255;
/// See [`STATUS_HOST_MAX`].
pub const STATUS_ERROR_MAX: usize = 1000;
/// The largest encoded `AgentStatusReport` a hub takes: what an agent of this build sends stays
/// under 1.5 KiB (its strings cut to the bounds above); a larger one is refused whole.
pub const STATUS_REPORT_MAX: usize = 4096;

/// The oldest protocol version a hub of this build still accepts: version 1 agents send plain
/// batches and version 2 agents no poll positions, which version 3 reads as they are.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
