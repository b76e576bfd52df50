//! End-to-end and fault scenarios against real Postgres clusters and real dongbo processes.

mod added_table;
mod agent_check;
mod agent_faults;
mod audit_tamper;
mod bad_input;
mod cert_rotation;
mod crash_recovery;
mod fanout;
mod hostile_agent;
mod hub_limits;
mod identities;
mod kafka;
mod keyless;
mod legacy_build;
mod mariadb_capture;
mod metrics;
mod mixed_workload;
mod mutual_tls;
mod mysql_check;
mod online_snapshot;
mod polling;
mod postgres_tls;
mod schema_drift;
mod snapshot_and_stream;
mod spool_limits;
mod subscription_grants;
