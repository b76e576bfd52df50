//! 100 000 changes of every kind arrive in the NDC exactly once, row for row.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::workload::{big_insert_txn, mixed_small_txns};
use dongbo_tests::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_mixed_changes_arrive_exactly_once() -> anyhow::Result<()> {
    let mut d = Deployment::new("mixed", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(2);
    let mut ids = insert_citizens(&src, &mut gen, 5_000).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let mut changes: u64 = 1 + 5_000; // the snapshot's opening truncate and its rows

    // One transaction of 50 000 rows.
    changes += big_insert_txn(&src, 700_000_000_000, 50_000).await?;
    // TOASTed text over 8 kB that does not compress away, then updates that leave it untouched (the
    // source sends "unchanged TOAST" for it and the NDC must keep the value).
    changes += src
        .execute(
            "UPDATE citizens SET note = (SELECT string_agg(md5(random()::text || g), 'ư') FROM generate_series(1, 400) g)
             WHERE citizen_id IN (SELECT citizen_id FROM citizens ORDER BY citizen_id LIMIT 200)",
            &[],
        )
        .await?;
    changes += src
        .execute("UPDATE citizens SET version = version + 1 WHERE citizen_id IN (SELECT citizen_id FROM citizens ORDER BY citizen_id LIMIT 300)", &[])
        .await?;
    // A key change on rows whose TOASTed note it does not touch: the note is not resent.
    changes += src
        .execute("UPDATE citizens SET citizen_id = '3' || substr(citizen_id, 2) WHERE citizen_id IN (SELECT citizen_id FROM citizens WHERE length(note) > 8192 ORDER BY citizen_id LIMIT 10)", &[])
        .await?;
    // In one transaction (so in one apply plan): an in-place update, then a key change, both leaving
    // the TOASTed note untouched.
    let toasted = src
        .query("SELECT citizen_id FROM citizens WHERE length(note) > 8192 AND citizen_id NOT LIKE '3%' ORDER BY citizen_id LIMIT 5", &[])
        .await?;
    for row in toasted {
        let id: String = row.get(0);
        src.batch_execute(&format!(
            "BEGIN; UPDATE citizens SET version = version + 1 WHERE citizen_id = '{id}';
             UPDATE citizens SET citizen_id = '4' || substr(citizen_id, 2) WHERE citizen_id = '{id}'; COMMIT"
        ))
        .await?;
        changes += 2;
    }
    // Set-based updates, a key change on many rows, deletes, NULLs.
    changes +=
        src.execute("UPDATE citizens SET income = income * 1.1, active = NOT active WHERE gender = 0", &[]).await?;
    changes += src
        .execute("UPDATE citizens SET citizen_id = '9' || substr(citizen_id, 2) WHERE citizen_id LIKE '7000000%' AND right(citizen_id, 1) = '3'", &[])
        .await?;
    changes += src
        .execute(
            "UPDATE citizens SET address = NULL, profile = NULL, tags = '{}' WHERE right(citizen_id, 1) = '5'",
            &[],
        )
        .await?;
    changes += src.execute("DELETE FROM citizens WHERE right(citizen_id, 2) = '17'", &[]).await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 150).await?;
    assert!(changes >= 100_000, "the workload made {changes} changes");

    let rows = d.wait_same("citizens", "citizen_id", Duration::from_secs(240)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    let big = |t: String| format!("SELECT count(*) FROM {t} WHERE length(note) > 8192");
    let at_source: i64 = src.query_one(&big("citizens".into()), &[]).await?.get(0);
    let in_ndc: i64 = d.ndc().await?.query_one(&big(format!("{}.citizens", d.ndc_schema())), &[]).await?.get(0);
    assert!(at_source > 150, "most of the 200 TOASTed notes survive the workload's deletes ({at_source})");
    assert_eq!(in_ndc, at_source, "TOASTed values survive updates that do not touch them");
    assert!(rows > 50_000);
    Ok(())
}
