//! Online snapshots on MariaDB: a table of 200 000 rows added to `source.tables` of a running
//! agent (agent.toml edited, then SIGHUP) is snapshotted in chunks while the binlog keeps flowing and its source keeps writing (updates, inserts and
//! deletes across the whole key range); the agent is killed with `kill -9` mid-table and resumes
//! after its last spooled chunk instead of starting over. The NDC ends equal to the source row
//! for row, and the hub applied no more than one chunk twice.

use std::process::Command;
use std::time::{Duration, Instant};

use dongbo_tests::mariadb::MariaDb;
use dongbo_tests::Deployment;

const ROWS: u64 = 200_000;
const CHUNK: u64 = 5_000;

/// Runs `sql` (statements each followed by `SELECT ROW_COUNT()`) and sums the counts printed.
fn run_counted(socket: &std::path::Path, statements: &[String]) -> anyhow::Result<i64> {
    let sql: String = statements.iter().map(|s| format!("{s}; SELECT ROW_COUNT();")).collect();
    let out = Command::new("mariadb")
        .arg(format!("--socket={}", socket.display()))
        .args(["-u", "root", "--default-character-set=utf8mb4", "--batch", "--skip-column-names", "-e", &sql])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse::<i64>().ok()).sum())
}

async fn ndc_rows(d: &Deployment) -> i64 {
    let Ok(ndc) = d.ndc().await else { return 0 };
    let sql = format!("SELECT count(*) FROM {}.\"province.residents\"", d.ndc_schema());
    ndc.query_one(&sql, &[]).await.map(|r| r.get(0)).unwrap_or(0)
}

/// The NDC copy of `table` in the form `want` prints the source.
async fn ndc_text(d: &Deployment, table: &str) -> anyhow::Result<String> {
    let cols = if table == "people" { "''" } else { "commune, version" };
    let sql = format!("SELECT concat_ws('|', id, name, {cols}) FROM {}.\"province.{table}\"", d.ndc_schema());
    let rows = d.ndc().await?.query(&sql, &[]).await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n"))
}

fn sorted(text: String) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_agent_is_snapshotted_online_and_resumes_after_its_last_chunk() -> anyhow::Result<()>
{
    let mut d = Deployment::new("online", "SELECT 1", &["public.unused"]).await?;
    let db = MariaDb::start("online", &[]).await?;
    db.sql(
        "CREATE TABLE province.people (id int PRIMARY KEY, name varchar(100)) CHARACTER SET utf8mb4;
         INSERT INTO province.people SELECT seq, CONCAT('Người ', seq) FROM province.seq_1_to_100;",
    )?;
    d.start_hub().await?;
    let extra = format!("snapshot_chunk_rows = {CHUNK}");
    let debug = [("DONGBO_LOG", "info,dongbo_agent::capture=debug"), ("DONGBO_LOG_FORMAT", "json")];
    d.start_agent_from(&db.agent_config(&d, &["province.people"], &extra), &debug)?;
    d.wait_applied(1 + 100, Duration::from_secs(60)).await?;

    db.sql(&format!(
        "CREATE TABLE province.residents (id int PRIMARY KEY, name varchar(100), commune varchar(5), version int) CHARACTER SET utf8mb4;
         INSERT INTO province.residents SELECT seq, CONCAT('Cư dân ', seq), LPAD(seq % 10000, 5, '0'), 1 FROM province.seq_1_to_{ROWS};"
    ))?;
    let (_, before, _) = d.applied().await?;
    // The operator adds the table to agent.toml and sends SIGHUP: the running agent takes it.
    let config = db.agent_config(&d, &["province.people", "province.residents"], &extra);
    std::fs::write(d.dir.join("agent.toml"), &config)?;
    let pid = d.agent.as_ref().expect("agent").pid().expect("agent pid");
    anyhow::ensure!(Command::new("kill").args(["-HUP", &pid.to_string()]).status()?.success(), "kill -HUP");

    // The source keeps writing all over the key range while the table is read.
    let writer = {
        let socket = db.socket();
        std::thread::spawn(move || -> anyhow::Result<i64> {
            let mut changes = 0;
            for i in 0..60i64 {
                changes += run_counted(
                    &socket,
                    &[
                        format!("UPDATE province.residents SET version = version + 1, commune = '26734' WHERE id % 1000 = {i}"),
                        format!("INSERT INTO province.residents VALUES ({}, 'Mới', '00004', 1)", 300_000 + i),
                        format!("DELETE FROM province.residents WHERE id = {}", 1 + i * 3331),
                        format!("UPDATE province.people SET name = 'Đổi {i}' WHERE id = {}", 1 + i % 100),
                    ],
                )?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(changes)
        })
    };

    // kill -9 once the agent has spooled part of the table (its log says so chunk by chunk).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !d.agent.as_ref().expect("agent").log_text().contains("\"rows\":60000") {
        anyhow::ensure!(Instant::now() < deadline, "the online snapshot did not progress");
        d.ensure_alive()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.agent.as_mut().expect("agent").kill9();
    let killed_at = ndc_rows(&d).await;
    let log_before = d.agent.as_ref().expect("agent").log_text().len();
    d.start_agent_from(&config, &[])?;
    let made = writer.join().expect("writer")?;

    let want = |table: &str| {
        db.sql(&format!(
            "SELECT CONCAT_WS('|', id, name, {}) FROM province.{table}",
            if table == "people" { "''" } else { "commune, version" }
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (w1, g1) = (sorted(want("residents")?), sorted(ndc_text(&d, "residents").await.unwrap_or_default()));
        let (w2, g2) = (sorted(want("people")?), sorted(ndc_text(&d, "people").await.unwrap_or_default()));
        if w1 == g1 && w2 == g2 {
            assert_eq!(w1.len() as u64, ROWS + 60 - 60);
            break;
        }
        if Instant::now() > deadline {
            let first = w1.iter().zip(&g1).position(|(a, b)| a != b);
            anyhow::bail!(
                "NDC differs: residents {} vs {} rows (first difference {:?}), people equal {}\nagent log:\n{}",
                w1.len(),
                g1.len(),
                first.map(|i| (&w1[i], &g1[i])),
                w2 == g2,
                dongbo_tests::tail(&d.agent.as_ref().map(|a| a.log_text()).unwrap_or_default(), 20)
            );
        }
        d.ensure_alive()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = d.agent.as_ref().map(|a| a.log_text()).unwrap_or_default().split_off(log_before);
    assert!(log.contains("online snapshot resumed after the last spooled chunk"), "{log}");
    assert!(!log.contains("online snapshot started"), "the table was started over:\n{log}");
    // Starting over would apply the 60 000+ rows read before the kill again; resuming re-reads at
    // most the chunk in flight.
    let (_, after, quarantined) = d.applied().await?;
    let applied = after - before;
    let bound = 1 + ROWS as i64 + made + CHUNK as i64;
    assert!(applied <= bound, "applied {applied} changes for the added table and the writes, more than {bound}");
    assert!(applied >= ROWS as i64, "applied {applied}");
    assert_eq!(quarantined, 0);
    eprintln!("killed with {killed_at} rows in the NDC; applied {applied} (bound {bound})");
    Ok(())
}
