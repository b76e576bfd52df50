//! How much WAL the server keeps for an agent's slot: a slot holds WAL from its `restart_lsn` until
//! the agent confirms it, without limit unless `max_slot_wal_keep_size` is set, past which the
//! server gives the slot up (`wal_status = 'lost'`) and the agent must take a new snapshot.

use tokio_postgres::Client;

use crate::error::SourceError;
use crate::source::RetainedLog;

/// The WAL kept for `slot`, `Ok(None)` when the slot does not exist (yet) or the server is a
/// standby (whose WAL position reads differently).
pub async fn retained_log(client: &Client, slot: &str) -> Result<Option<RetainedLog>, SourceError> {
    // `safe_wal_size` exists from Postgres 13; it is NULL without max_slot_wal_keep_size.
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, safe_wal_size::int8 \
             FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database() \
             AND NOT pg_is_in_recovery()",
            &[&slot],
        )
        .await;
    let row = match row {
        Ok(r) => r.map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1))),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database() \
                 AND NOT pg_is_in_recovery()",
                &[&slot],
            )
            .await?
            .map(|r| (r.get::<_, Option<i64>>(0), None)),
        Err(e) => return Err(e.into()),
    };
    Ok(row.map(|(retained, safe)| RetainedLog {
        retained_bytes: retained.unwrap_or(0).max(0) as u64,
        headroom_bytes: safe.map(|s| s.max(0) as u64),
        headroom_s: None,
    }))
}
