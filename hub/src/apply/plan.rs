//! Turns an ordered run of changes into set-based work per table: one final operation per primary
//! key, which the applier executes as one DELETE and a few upserts per table.
//!
//! Per-key order is what the NDC must respect, and collapsing preserves it: the last operation on a
//! key wins; an update that changes the key deletes the old key and upserts the new one; a TRUNCATE
//! drops everything planned before it for the table. Distinct keys commute, so deletes and upserts of
//! one table can run as separate statements. A change of table shape seals the table's plan and opens
//! a new one, so rows of different widths never mix.
//!
//! A keyless table (no primary key, `REPLICA IDENTITY FULL` at the source) is a multiset: nothing
//! collapses, its changes stay a sequence in order, and an update or delete changes one row equal
//! to the change's whole old row.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use dongbo_connectors::model::{ChangeEvent, Operation, TableId, TableSchema, Value};

#[cfg(doc)]
use crate::dictionary::national::PER_STREAM;
use crate::dictionary::PerStream;

/// The final operation on one key.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOp<'a> {
    /// Insert or replace the row. Unchanged-TOAST columns keep the target's value: the value of this
    /// key's row, or with `toast_from`, of the row the key was changed from (Postgres does not resend
    /// a TOASTed value when an UPDATE changes the key but not that column).
    Upsert {
        /// The new row, borrowed from the change unless TOAST values were merged into it.
        row: Cow<'a, [Value]>,
        /// The key whose NDC row holds the unchanged TOAST values, when the key changed.
        toast_from: Option<&'a [Value]>,
    },
    /// Remove the row with this key.
    Delete(&'a [Value]),
}

/// One change of a keyless table, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum KeylessOp<'a> {
    /// Add this row (a duplicate stays a duplicate).
    Insert(&'a [Value]),
    /// Change one row equal to `before` into `after` (unchanged-TOAST columns keep their value).
    Update {
        /// The whole old row.
        before: &'a [Value],
        /// The new row.
        after: &'a [Value],
    },
    /// Remove one row equal to this one.
    Delete(&'a [Value]),
}

/// Planned work on one table, for one schema version.
#[derive(Debug)]
pub struct TablePlan<'a> {
    /// The table's shape for these rows.
    pub schema: Arc<TableSchema>,
    /// Empty the table before anything else.
    pub truncate: bool,
    /// Final operation per key (keyed by the key's text).
    pub ops: HashMap<String, RowOp<'a>>,
    /// A keyless table's changes, in order (`ops` stays empty).
    pub sequence: Vec<KeylessOp<'a>>,
    /// Every operation is a snapshot read: the rows are new to the target (a table's snapshot opens
    /// with a truncate and reads each key once), so they can be copied in without an upsert.
    pub snapshot_only: bool,
    /// While `snapshot_only`, the snapshot rows in order, not keyed (a snapshot reads each key once;
    /// keying 100 000 rows cost a tenth of the apply). Moved into `ops` when another operation comes.
    pub snapshot_rows: Vec<&'a [Value]>,
}

/// Planned work for a run of changes.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Table plans in the order they must run.
    pub tables: Vec<TablePlan<'a>>,
    open: HashMap<TableId, usize>,
    /// Per national table, the per-stream provenance its rows share, as the transforms of the
    /// changes declared it (`None`: not all alike).
    shared: HashMap<&'a TableId, Option<&'a [Value; 4]>>,
}

pub use dongbo_connectors::postgres::text::key_text;

impl<'a> Plan<'a> {
    /// Takes in what a transform declared its national rows share; declarations that differ
    /// for a table cancel out, so [`Self::shared`] only answers for what every batch agrees on.
    pub fn declare(&mut self, per_stream: &'a PerStream) {
        for (table, values) in &per_stream.0 {
            let values = values.as_ref();
            self.shared.entry(table).and_modify(|v| *v = v.filter(|v| Some(*v) == values)).or_insert(values);
        }
    }

    /// An empty plan with this one's declarations.
    pub fn anew(&self) -> Self {
        Self { shared: self.shared.clone(), ..Self::default() }
    }

    /// What every row of national `table` in the plan holds in the [`PER_STREAM`] columns, when
    /// every transform that wrote them declared the same.
    pub fn shared(&self, table: &TableId) -> Option<&'a [Value; 4]> {
        self.shared.get(table).copied().flatten()
    }

    /// Adds the next change, in seq order. Rows are borrowed from the change, not copied.
    pub fn add(&mut self, c: &'a ChangeEvent) {
        let idx = match self.open.get(&c.table.table) {
            Some(&i) if self.tables[i].schema.version == c.table.version => i,
            _ => {
                self.tables.push(TablePlan {
                    schema: c.table.clone(),
                    truncate: false,
                    ops: HashMap::new(),
                    sequence: Vec::new(),
                    snapshot_only: true,
                    snapshot_rows: Vec::new(),
                });
                self.open.insert(c.table.table.clone(), self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let plan = &mut self.tables[idx];
        let was_snapshot_only = plan.snapshot_only;
        plan.snapshot_only &= matches!(c.op, Operation::SnapshotRead | Operation::Truncate);
        if !plan.schema.is_keyless() {
            if plan.snapshot_only {
                match (c.op, c.after.as_deref()) {
                    (Operation::SnapshotRead, Some(after)) => plan.snapshot_rows.push(after),
                    (Operation::Truncate, _) => {
                        plan.truncate = true;
                        plan.snapshot_rows.clear();
                    }
                    _ => {}
                }
                return;
            }
            if was_snapshot_only {
                // Keyed from here on: the rows so far become upserts, in order.
                for row in std::mem::take(&mut plan.snapshot_rows) {
                    let key = key_text(&plan.schema.key_of(row));
                    plan.ops.insert(key, RowOp::Upsert { row: Cow::Borrowed(row), toast_from: None });
                }
            }
        }
        if plan.schema.is_keyless() {
            // The wire refuses a keyless update or delete without a whole before row.
            match (c.op, c.before.as_deref(), c.after.as_deref()) {
                (Operation::Truncate, _, _) => {
                    plan.truncate = true;
                    plan.sequence.clear();
                }
                (Operation::Insert | Operation::SnapshotRead, _, Some(after)) => {
                    plan.sequence.push(KeylessOp::Insert(after))
                }
                (Operation::Update, Some(before), Some(after)) => {
                    plan.sequence.push(KeylessOp::Update { before, after })
                }
                (Operation::Delete, Some(before), _) => plan.sequence.push(KeylessOp::Delete(before)),
                _ => {}
            }
            return;
        }
        match c.op {
            Operation::Truncate => {
                plan.truncate = true;
                plan.ops.clear();
            }
            Operation::Delete => {
                plan.ops.insert(key_text(&c.key), RowOp::Delete(&c.key));
            }
            Operation::Insert | Operation::Update | Operation::SnapshotRead => {
                let Some(after) = &c.after else { return };
                let new_key = plan.schema.key_of(after);
                let new_text = key_text(&new_key);
                let old_text = if c.op == Operation::Update { key_text(&c.key) } else { new_text.clone() };
                let mut row = Cow::Borrowed(after.as_slice());
                let mut toast_from = None;
                if row.iter().any(Value::is_unchanged_toast) {
                    // The unchanged values belong to the row as it was under its old key.
                    let previous = if old_text != new_text { plan.ops.get(&old_text) } else { plan.ops.get(&new_text) };
                    match previous {
                        Some(RowOp::Upsert { row: prev, toast_from: prev_from }) => {
                            let merged: Vec<Value> = row
                                .iter()
                                .zip(prev.iter())
                                .map(|(v, p)| if v.is_unchanged_toast() { p.clone() } else { v.clone() })
                                .collect();
                            row = Cow::Owned(merged);
                            // Values the plan does not have are in the NDC row under the key the
                            // previous write was staged from, or else under this change's old key.
                            toast_from = prev_from.or_else(|| (old_text != new_text).then_some(c.key.as_slice()));
                        }
                        _ => {
                            toast_from = (old_text != new_text).then_some(c.key.as_slice());
                        }
                    }
                    if !row.iter().any(Value::is_unchanged_toast) {
                        toast_from = None;
                    }
                }
                if c.op == Operation::Update && old_text != new_text {
                    plan.ops.insert(old_text, RowOp::Delete(&c.key));
                }
                plan.ops.insert(new_text, RowOp::Upsert { row, toast_from });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{Column, Lsn, Position};

    fn schema(cols: &[&str]) -> Arc<TableSchema> {
        Arc::new(TableSchema::new(
            TableId::new("public", "citizens"),
            cols.iter().map(|c| Column { name: c.to_string(), type_name: "text".into(), type_oid: 25 }).collect(),
            vec![0],
        ))
    }

    fn change(s: &Arc<TableSchema>, op: Operation, key: &str, after: Option<Vec<Value>>) -> ChangeEvent {
        ChangeEvent {
            seq: 1,
            table: s.clone(),
            op,
            key: vec![Value::Text(key.into())],
            before: None,
            after,
            position: Position::Postgres(Lsn(1)),
            commit_time_us: 0,
            txid: 1,
            txn_order: 0,
            txn_last: false,
        }
    }

    /// Changes outlive the plan that borrows them; in a test, simply for the whole run.
    fn leak(c: ChangeEvent) -> &'static ChangeEvent {
        Box::leak(Box::new(c))
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn last_operation_per_key_wins_and_key_changes_delete_the_old_key() {
        let s = schema(&["id", "addr"]);
        let mut p = Plan::default();
        p.add(leak(change(&s, Operation::Insert, "a", Some(vec![t("a"), t("x")]))));
        p.add(leak(change(&s, Operation::Update, "a", Some(vec![t("a"), t("y")]))));
        p.add(leak(change(&s, Operation::Update, "a", Some(vec![t("b"), t("y")]))));
        p.add(leak(change(&s, Operation::Insert, "c", Some(vec![t("c"), t("z")]))));
        p.add(leak(change(&s, Operation::Delete, "c", None)));
        assert_eq!(p.tables.len(), 1);
        let ops = &p.tables[0].ops;
        assert_eq!(ops[&key_text(&[t("a")])], RowOp::Delete(&[t("a")][..]));
        assert_eq!(
            ops[&key_text(&[t("b")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("b"), t("y")]), toast_from: None }
        );
        assert_eq!(ops[&key_text(&[t("c")])], RowOp::Delete(&[t("c")][..]));
    }

    #[test]
    fn unchanged_toast_takes_the_planned_value_and_truncate_clears() {
        let s = schema(&["id", "doc"]);
        let mut p = Plan::default();
        p.add(leak(change(&s, Operation::Insert, "a", Some(vec![t("a"), t("big")]))));
        p.add(leak(change(&s, Operation::Update, "a", Some(vec![t("a"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("a")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("a"), t("big")]), toast_from: None }
        );
        p.add(leak(change(&s, Operation::Update, "b", Some(vec![t("b"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("b")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("b"), Value::UnchangedToast]), toast_from: None }
        );
        p.add(leak(change(&s, Operation::Truncate, "", None)));
        p.add(leak(change(&s, Operation::SnapshotRead, "d", Some(vec![t("d"), t("v")]))));
        assert!(p.tables[0].truncate);
        assert_eq!(p.tables[0].ops.len(), 1);
        assert!(!p.tables[0].snapshot_only, "earlier updates make the plan mixed");
        let mut p = Plan::default();
        p.add(leak(change(&s, Operation::Truncate, "", None)));
        p.add(leak(change(&s, Operation::SnapshotRead, "d", Some(vec![t("d"), t("v")]))));
        assert!(p.tables[0].snapshot_only);
        assert_eq!(p.tables[0].snapshot_rows, vec![&[t("d"), t("v")][..]], "snapshot rows are kept in order, unkeyed");
        assert!(p.tables[0].ops.is_empty());
    }

    #[test]
    fn snapshot_rows_become_upserts_when_another_operation_follows() {
        let s = schema(&["id", "v"]);
        let mut p = Plan::default();
        p.add(leak(change(&s, Operation::SnapshotRead, "a", Some(vec![t("a"), t("1")]))));
        p.add(leak(change(&s, Operation::SnapshotRead, "b", Some(vec![t("b"), t("1")]))));
        p.add(leak(change(&s, Operation::Update, "a", Some(vec![t("a"), t("2")]))));
        let plan = &p.tables[0];
        assert!(!plan.snapshot_only && plan.snapshot_rows.is_empty());
        assert_eq!(
            plan.ops[&key_text(&[t("a")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("a"), t("2")]), toast_from: None }
        );
        assert_eq!(
            plan.ops[&key_text(&[t("b")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("b"), t("1")]), toast_from: None }
        );
    }

    #[test]
    fn a_key_change_keeps_unchanged_toast_from_the_old_row() {
        let s = schema(&["id", "doc"]);
        let mut p = Plan::default();
        // Re-keyed with no earlier state in the plan: the NDC's row under "a" holds the value.
        p.add(leak(change(&s, Operation::Update, "a", Some(vec![t("b"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("b")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("b"), Value::UnchangedToast]), toast_from: Some(&[t("a")][..]) }
        );
        // Re-keyed again: still the NDC's row under "a".
        p.add(leak(change(&s, Operation::Update, "b", Some(vec![t("c"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("c")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("c"), Value::UnchangedToast]), toast_from: Some(&[t("a")][..]) }
        );
        assert_eq!(p.tables[0].ops[&key_text(&[t("b")])], RowOp::Delete(&[t("b")][..]));
        // Updated in place (value unchanged), then re-keyed: the NDC row under the old key holds it.
        p.add(leak(change(&s, Operation::Update, "m", Some(vec![t("m"), Value::UnchangedToast]))));
        p.add(leak(change(&s, Operation::Update, "m", Some(vec![t("n"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("n")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("n"), Value::UnchangedToast]), toast_from: Some(&[t("m")][..]) }
        );
        // Re-keyed after a full write in the plan: the value comes from the plan.
        p.add(leak(change(&s, Operation::Insert, "x", Some(vec![t("x"), t("big")]))));
        p.add(leak(change(&s, Operation::Update, "x", Some(vec![t("y"), Value::UnchangedToast]))));
        assert_eq!(
            p.tables[0].ops[&key_text(&[t("y")])],
            RowOp::Upsert { row: Cow::Owned(vec![t("y"), t("big")]), toast_from: None }
        );
    }

    #[test]
    fn a_shape_change_opens_a_new_table_plan_in_order() {
        let v1 = schema(&["id"]);
        let v2 = schema(&["id", "extra"]);
        let mut p = Plan::default();
        p.add(leak(change(&v1, Operation::Insert, "a", Some(vec![t("a")]))));
        p.add(leak(change(&v2, Operation::Insert, "b", Some(vec![t("b"), t("e")]))));
        p.add(leak(change(&v1, Operation::Insert, "c", Some(vec![t("c")]))));
        assert_eq!(p.tables.len(), 3);
        assert_eq!(p.tables[1].schema.columns.len(), 2);
    }

    #[test]
    fn a_keyless_table_keeps_every_change_in_order_with_duplicates() {
        let s = Arc::new(TableSchema::new(
            TableId::new("public", "residence_log"),
            vec![
                Column { name: "citizen_id".into(), type_name: "text".into(), type_oid: 25 },
                Column { name: "commune".into(), type_name: "text".into(), type_oid: 25 },
            ],
            vec![],
        ));
        let row = |c: &str| vec![t("079000000001"), t(c)];
        let mut changes = vec![
            change(&s, Operation::Insert, "", Some(row("26734"))),
            change(&s, Operation::Insert, "", Some(row("26734"))),
            change(&s, Operation::Update, "", Some(row("00004"))),
            change(&s, Operation::Delete, "", None),
        ];
        for c in &mut changes {
            c.key = Vec::new();
        }
        changes[2].before = Some(row("26734"));
        changes[3].before = Some(row("26734"));
        let mut plan = Plan::default();
        for c in changes {
            plan.add(leak(c));
        }
        let seq = &plan.tables[0].sequence;
        assert!(plan.tables[0].ops.is_empty());
        assert_eq!(seq.len(), 4, "identical inserts stay two, nothing collapses");
        assert!(
            matches!(seq[2], KeylessOp::Update { before, after } if before[1] == t("26734") && after[1] == t("00004"))
        );
        assert!(matches!(seq[3], KeylessOp::Delete(before) if before[1] == t("26734")));
    }

    #[test]
    fn null_and_empty_keys_differ() {
        assert_ne!(key_text(&[Value::Null]), key_text(&[t("")]));
        assert_ne!(key_text(&[t("a"), t("b")]), key_text(&[t("ab"), t("")]));
    }

    #[test]
    fn only_what_every_batch_declares_alike_is_shared() {
        let citizens = TableId::new("national", "citizens");
        let values = |priority: i64| {
            [Value::Text("hcm".into()), Value::Text("79".into()), Value::Text("public.nk".into()), Value::Int(priority)]
        };
        let one = PerStream(vec![(citizens.clone(), Some(values(1)))]);
        let again = one.clone();
        let reloaded = PerStream(vec![(citizens.clone(), Some(values(2)))]);
        let mixed = PerStream(vec![(citizens.clone(), None)]);
        let mut plan = Plan::default();
        assert_eq!(plan.shared(&citizens), None, "nothing declared");
        plan.declare(&one);
        plan.declare(&again);
        assert_eq!(plan.shared(&citizens), Some(&values(1)));
        assert_eq!(plan.anew().shared(&citizens), Some(&values(1)), "a fresh plan keeps the declarations");
        assert_eq!(plan.shared(&TableId::new("national", "other")), None);
        // A reload between two batches of a run changed the rank: the rows differ.
        plan.declare(&reloaded);
        assert_eq!(plan.shared(&citizens), None);
        plan.declare(&one);
        assert_eq!(plan.shared(&citizens), None, "once different, never shared again");
        let mut plan = Plan::default();
        plan.declare(&mixed);
        plan.declare(&one);
        assert_eq!(plan.shared(&citizens), None);
    }
}
