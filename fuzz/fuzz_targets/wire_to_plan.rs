//! A batch as a hostile agent could send it: counted on the wire, decoded and validated, then
//! planned for the NDC, and each change's target table and SQL built. Nothing may panic.
#![no_main]

use dongbo_connectors::wire;
use dongbo_hub::apply::plan::Plan;
use dongbo_hub::apply::target::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::count_changes(data);
    let Ok(batch) = wire::decode_batch(data) else { return };
    let mut plan = Plan::default();
    for c in &batch.changes {
        plan.add(c);
        if let Ok(t) = Target::new("fuzz", &c.table, 0) {
            let all: Vec<usize> = (0..t.columns.len()).collect();
            let _ = (t.ddl(), t.upsert_sql(&all), t.rekey_sql(&all), t.delete_sql());
        }
    }
});
