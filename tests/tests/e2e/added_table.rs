//! A table added to `source.tables` of an agent that has been streaming: its rows written before
//! are snapshotted online, in chunks, when the agent restarts, while the stream flows and the
//! source keeps writing to it and to the other table, with no gap and no overlap; a `kill -9` in
//! the middle of that snapshot resumes after its last spooled chunk on the next start. The NDC
//! ends equal to the source, row for row, in both tables.

use std::time::{Duration, Instant};

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

const HOUSEHOLDS: &str =
    "CREATE TABLE households (household_id bigint PRIMARY KEY, head text NOT NULL, members int NOT NULL);";

async fn wait_agent_log(d: &Deployment, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !d.agent.as_ref().expect("agent").log_text().contains(what) {
        anyhow::ensure!(Instant::now() < deadline, "no {what:?} in the agent log within {timeout:?}");
        d.ensure_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_streaming_agent_is_snapshotted_with_no_gap_even_after_a_kill_mid_snapshot(
) -> anyhow::Result<()> {
    let mut d = Deployment::new("addedtable", &format!("{CITIZENS_DDL}\n{HOUSEHOLDS}"), &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(91);
    insert_citizens(&src, &mut gen, 300).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    // Rows of a table the agent does not capture yet.
    src.batch_execute("INSERT INTO households SELECT g, 'Chủ hộ ' || g, 1 + g % 6 FROM generate_series(1, 200000) g")
        .await?;

    // The operator adds the table and restarts the agent, while both tables keep changing.
    d.agent.as_mut().expect("agent").stop();
    d.tables.push("public.households".into());
    let writer = d.source().await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut gen = CitizenGen::new(92);
        let mut n: i64 = 200_000;
        while !*stop_rx.borrow_and_update() {
            n += 1;
            writer
                .batch_execute(&format!(
                    "INSERT INTO households VALUES ({n}, 'Chủ hộ mới {n}', 2);
                     UPDATE households SET members = members + 1 WHERE household_id = {};
                     DELETE FROM households WHERE household_id = {};",
                    n % 200_000 + 1,
                    (n * 7) % 200_000 + 1
                ))
                .await?;
            insert_citizens(&writer, &mut gen, 2).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(())
    });
    let debug = [("DONGBO_LOG", "info,dongbo_agent::capture=debug"), ("DONGBO_LOG_FORMAT", "json")];
    d.start_agent_with_env(&debug)?;
    wait_agent_log(&d, "online snapshot started", Duration::from_secs(30)).await?;
    // kill -9 once part of the table is spooled (the log says so chunk by chunk).
    wait_agent_log(&d, "\"rows\":40000", Duration::from_secs(60)).await?;
    d.agent.as_mut().expect("agent").kill9();
    let log_before = d.agent.as_ref().expect("agent").log_text().len();

    d.start_agent()?;
    wait_agent_log(&d, "online snapshot complete", Duration::from_secs(120)).await?;
    let log = d.agent.as_ref().expect("agent").log_text().split_off(log_before);
    assert!(log.contains("online snapshot resumed after the last spooled chunk"), "{log}");
    assert!(!log.contains("online snapshot started"), "the table was started over:\n{log}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    load.await??;
    let households = d.wait_same("households", "household_id", Duration::from_secs(120)).await?;
    assert!(households > 190_000, "{households} households");
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let (_, _, quarantined) = d.applied().await?;
    assert_eq!(quarantined, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_repairs_a_drifted_ndc_table_while_the_stream_goes_on() -> anyhow::Result<()> {
    use std::process::Command;
    let mut d = Deployment::new("resnapshot", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(93);
    insert_citizens(&src, &mut gen, 300).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    // Someone edits the NDC copy by hand.
    let ndc = d.ndc().await?;
    let schema = d.ndc_schema();
    ndc.batch_execute(&format!(
        "DELETE FROM {schema}.citizens WHERE citizen_id IN (SELECT citizen_id FROM {schema}.citizens ORDER BY citizen_id LIMIT 40);
         UPDATE {schema}.citizens SET full_name = 'sửa tay' WHERE citizen_id IN (SELECT citizen_id FROM {schema}.citizens ORDER BY citizen_id DESC LIMIT 10);"
    ))
    .await?;
    let config = d.dir.join("agent.toml");
    let resnapshot = |tables: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(dongbo_tests::procs::binary("dongbo-agent")?)
            .args(["resnapshot", "--config"])
            .arg(&config)
            .args(tables)
            .output()?;
        Ok((
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ))
    };
    let (ok, text) = resnapshot(&["public.citizens"])?;
    assert!(!ok && text.contains("stop the agent first"), "while the agent runs: {text}");
    d.agent.as_mut().expect("agent").stop();
    let (ok, text) = resnapshot(&["public.nowhere"])?;
    assert!(!ok && text.contains("is not in source.tables"), "{text}");
    let (ok, text) = resnapshot(&["public.citizens"])?;
    assert!(ok && text.contains("public.citizens will be snapshotted again"), "{text}");
    insert_citizens(&src, &mut gen, 50).await?;
    d.start_agent()?;
    wait_agent_log(&d, "online snapshot complete", Duration::from_secs(60)).await?;
    insert_citizens(&src, &mut gen, 50).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 400);
    Ok(())
}
