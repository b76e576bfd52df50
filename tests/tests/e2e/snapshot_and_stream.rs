//! The initial snapshot and the stream meet with no gap and no overlap, even with writes running
//! while the snapshot is taken, and with several tables read at once in the one exported snapshot.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, move_citizen, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_then_stream_matches_source() -> anyhow::Result<()> {
    let setup = format!(
        "{CITIZENS_DDL}
         CREATE TABLE households (household_id bigint PRIMARY KEY, head text NOT NULL, members int NOT NULL);
         CREATE TABLE residence_log (citizen_id char(12), commune_code varchar(5));
         ALTER TABLE residence_log REPLICA IDENTITY FULL;"
    );
    let mut d =
        Deployment::new("snapshot", &setup, &["public.citizens", "public.households", "public.residence_log"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(1);
    let mut ids = insert_citizens(&src, &mut gen, 20_000).await?;
    src.batch_execute(
        "INSERT INTO households SELECT g, 'Chủ hộ ' || g, 1 + g % 6 FROM generate_series(1, 30000) g;
         INSERT INTO residence_log SELECT lpad((g % 500)::text, 12, '0'), '26734' FROM generate_series(1, 3000) g;",
    )
    .await?;
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
        src.batch_execute(&format!(
            "UPDATE households SET members = members + 1 WHERE household_id % 20 = {round};
             INSERT INTO residence_log VALUES ('{:012}', '00004'), ('{:012}', '00004');",
            round % 500,
            round % 500
        ))
        .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.wait_same("households", "household_id", Duration::from_secs(120)).await?, 30_000);
    assert_eq!(d.wait_same("residence_log", "citizen_id, commune_code", Duration::from_secs(120)).await?, 3_000 + 40);
    let log = strip_ansi(&d.agent.as_ref().expect("agent").log_text());
    assert!(log.contains("readers=2"), "the snapshot read two tables at once:\n{log}");
    let rows = d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await?;
    assert_eq!(rows, 20_000 + 2_000 - 20);
    let (_, applied, quarantined) = d.applied().await?;
    assert_eq!(quarantined, 0);
    assert!(applied >= rows as i64, "every row arrived through an applied change");
    Ok(())
}

/// The log without its colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
