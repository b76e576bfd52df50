//! End-to-end and fault scenarios against real Postgres clusters and real dongbo processes.

mod snapshot_and_stream;
