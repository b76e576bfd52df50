//! A column added at the source while changes stream: the NDC table is widened and the new values
//! arrive, with nothing lost on either side of the change of shape.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, move_citizen, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_at_the_source_appears_in_the_ndc_with_its_values() -> anyhow::Result<()> {
    let mut d = Deployment::new("drift", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(6);
    let ids = insert_citizens(&src, &mut gen, 500).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let mut changes = 1 + 500;
    for id in ids.iter().take(50) {
        changes += move_citizen(&src, &mut gen, id).await? as i64;
    }
    src.batch_execute("ALTER TABLE citizens ADD COLUMN ethnic_group text").await?;
    changes += src
        .execute("UPDATE citizens SET ethnic_group = 'Tày' WHERE citizen_id = ANY($1)", &[&&ids[..20]])
        .await? as i64;
    changes += insert_citizens(&src, &mut gen, 100).await?.len() as i64;
    for id in ids.iter().skip(100).take(50) {
        changes += move_citizen(&src, &mut gen, id).await? as i64;
    }
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    let ndc = d.ndc().await?;
    let tay: i64 = ndc
        .query_one(&format!("SELECT count(*) FROM {}.citizens WHERE ethnic_group = 'Tày'", d.ndc_schema()), &[])
        .await?
        .get(0);
    assert_eq!(tay, 20);
    Ok(())
}
