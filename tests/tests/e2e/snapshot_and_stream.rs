//! The initial snapshot and the stream meet with no gap and no overlap, even with writes running
//! while the snapshot is taken.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, move_citizen, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_then_stream_matches_source() -> anyhow::Result<()> {
    let mut d = Deployment::new("snapshot", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(1);
    let mut ids = insert_citizens(&src, &mut gen, 20_000).await?;
    d.start_hub().await?;
    d.start_agent()?;
    // Writes while the snapshot runs: some land before the slot's snapshot, some after.
    for round in 0..20 {
        ids.extend(insert_citizens(&src, &mut gen, 100).await?);
        for k in 0..50 {
            let id = ids[(round * 97 + k * 31) % ids.len()].clone();
            move_citizen(&src, &mut gen, &id).await?;
        }
        src.execute("DELETE FROM citizens WHERE citizen_id = $1", &[&ids[round * 13]]).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await?;
    assert_eq!(rows, 20_000 + 2_000 - 20);
    let (_, applied, quarantined) = d.applied().await?;
    assert_eq!(quarantined, 0);
    assert!(applied >= rows as i64, "every row arrived through an applied change");
    Ok(())
}
