//! The shadow: what the NDC holds of a polled table, as far as the agent knows, by key. The spool
//! keeps it (under its own key prefix, written in the same atomic write as each batch); the
//! polling source reads it through [`Shadow`].
//!
//! A shadow key is `p:`, the table's schema and name (each a u16 length and UTF-8), then the row
//! key as [`crate::wire::encode_row`] writes it; its value is the row's [`RowHash`].

use sha2::{Digest, Sha256};

use crate::error::SourceError;
use crate::model::{ChangeEvent, Operation, TableId, Value};
use crate::wire;

/// The first 128 bits of the SHA-256 of a row's encoding: stable across agent versions and
/// restarts (a random-keyed hash would ship every row again after a restart).
pub type RowHash = [u8; 16];

/// Read access to the spool's shadow.
pub trait Shadow: Send + Sync {
    /// The hash stored under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<RowHash>, SourceError>;
    /// The hashes stored under `keys`, in their order: one read for a page of rows.
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<RowHash>>, SourceError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Up to `limit` keys starting with `prefix`, in byte order, after `after` if given.
    fn keys_after(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>, SourceError>;
}

/// The prefix of every shadow key of `table`.
pub fn shadow_prefix(table: &TableId) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + table.schema.len() + table.name.len());
    k.extend_from_slice(b"p:");
    for part in [&table.schema, &table.name] {
        k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k
}

/// The shadow key of the row of `table` with key `key`.
pub fn shadow_key(table: &TableId, key: &[Value]) -> Vec<u8> {
    let mut k = shadow_prefix(table);
    k.extend_from_slice(&wire::encode_values(key));
    k
}

/// The hash of a row as read from the source.
pub fn row_hash(row: &[Value]) -> RowHash {
    let digest = Sha256::digest(wire::encode_values(row));
    let mut h = [0u8; 16];
    h.copy_from_slice(&digest[..16]);
    h
}

/// What the spool writes into the shadow for a polled change: its key and the new row's hash, or
/// `None` to remove it (a delete). A truncate opens a table's first read, when its shadow is empty:
/// nothing to write.
pub fn shadow_entry(c: &ChangeEvent) -> Option<(Vec<u8>, Option<RowHash>)> {
    match c.op {
        Operation::Insert | Operation::Update | Operation::SnapshotRead => {
            let after = c.after.as_ref()?;
            Some((shadow_key(&c.table.table, &c.key), Some(row_hash(after))))
        }
        Operation::Delete => Some((shadow_key(&c.table.table, &c.key), None)),
        Operation::Truncate => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_within_their_table_and_hashes_are_stable() {
        let t = TableId::new("public", "citizens");
        let other = TableId::new("public", "citizens_log");
        let k = shadow_key(&t, &[Value::Text("079123456789".into())]);
        assert!(k.starts_with(&shadow_prefix(&t)));
        assert!(!k.starts_with(&shadow_prefix(&other)), "a table's prefix is not another's");
        // Fixed forever: a change here would ship every polled row again after an upgrade.
        let h = row_hash(&[Value::Int(1), Value::Text("Nguyễn".into()), Value::Null]);
        assert_eq!(h, row_hash(&[Value::Int(1), Value::Text("Nguyễn".into()), Value::Null]));
        assert_ne!(h, row_hash(&[Value::Int(1), Value::Text("Nguyen".into()), Value::Null]));
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0420a77b2099e7260f19f584acba8bdb");
    }
}
