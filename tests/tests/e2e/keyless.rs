//! Keyless tables (no primary key, `REPLICA IDENTITY FULL`): replicated as multisets. Duplicate
//! rows stay duplicates through the snapshot and the stream; an update or delete of one of several
//! identical rows changes exactly one in the NDC; a large out-of-line value survives an update of
//! another column; a `kill -9` of the agent mid-stream loses nothing and applies nothing twice.
//! Without `REPLICA IDENTITY FULL`, `check` names the statement that makes the table replicable.

use std::process::Command;
use std::time::Duration;

use dongbo_tests::procs::binary;
use dongbo_tests::Deployment;

const SETUP: &str = "CREATE TABLE residence_log (citizen_id char(12), commune_code varchar(5), note text, big text);
     ALTER TABLE residence_log REPLICA IDENTITY FULL;
     CREATE TABLE visits (citizen_id char(12), place text);";

/// Every column, so duplicates sort next to each other and the order is total.
const ALL: &str = "citizen_id, commune_code, note, big";

/// One of the rows equal to (`id`, `commune`, `note`): the statement changes exactly one.
fn one(id: &str, commune: &str, note: &str) -> String {
    format!(
        "ctid = (SELECT ctid FROM residence_log WHERE citizen_id = '{id}' AND commune_code = '{commune}' AND note = '{note}' LIMIT 1)"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_tables_keep_duplicates_and_change_one_of_identical_rows_exactly_once() -> anyhow::Result<()> {
    let mut d = Deployment::new("keyless", SETUP, &["public.residence_log"]).await?;
    let src = d.source().await?;
    // Before the agent: three identical rows, two identical others, and a row with a large value
    // stored out of line (random text does not compress).
    src.batch_execute(
        "INSERT INTO residence_log (citizen_id, commune_code, note) VALUES
           ('079000000001', '26734', 'thường trú'), ('079000000001', '26734', 'thường trú'),
           ('079000000001', '26734', 'thường trú'), ('079000000002', '00004', 'tạm trú'),
           ('079000000002', '00004', 'tạm trú');
         INSERT INTO residence_log SELECT '079000000003', '25750', 'hồ sơ', string_agg(md5(g::text), '') FROM generate_series(1, 400) g;",
    )
    .await?;
    let mut changes: i64 = 1 + 6; // the snapshot's truncate and rows

    // The table without REPLICA IDENTITY FULL is refused by check, with the statement to run.
    d.tables = vec!["public.residence_log".into(), "public.visits".into()];
    let config = d.dir.join("agent-check.toml");
    std::fs::write(&config, d.agent_config())?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("ALTER TABLE public.visits REPLICA IDENTITY FULL"), "{text}");
    assert!(text.contains("ok       table public.residence_log has no primary key: kept as a multiset"), "{text}");
    d.tables = vec!["public.residence_log".into()];

    d.start_hub().await?;
    d.start_agent()?;
    assert_eq!(d.wait_same("residence_log", ALL, Duration::from_secs(60)).await?, 6);

    // Streaming: another duplicate, an update of one of three identical rows, a delete of one of
    // two, and an update of the row with the out-of-line value that leaves that value alone.
    src.batch_execute(&format!(
        "INSERT INTO residence_log (citizen_id, commune_code, note) VALUES ('079000000001', '26734', 'thường trú');
         UPDATE residence_log SET commune_code = '00004' WHERE {};
         DELETE FROM residence_log WHERE {};
         UPDATE residence_log SET note = 'hồ sơ mới' WHERE citizen_id = '079000000003';",
        one("079000000001", "26734", "thường trú"),
        one("079000000002", "00004", "tạm trú")
    ))
    .await?;
    changes += 4;
    assert_eq!(d.wait_same("residence_log", ALL, Duration::from_secs(60)).await?, 6);
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    let ndc = d.ndc().await?;
    let counts: Vec<(String, String, i64)> = ndc
        .query(
            &format!(
                "SELECT citizen_id::text, commune_code::text, count(*) FROM {}.residence_log GROUP BY 1, 2 ORDER BY 1, 2",
                d.ndc_schema()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let keys: i64 = ndc
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = '{}.residence_log'::regclass AND contype = 'p'",
                d.ndc_schema()
            ),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(keys, 0, "the NDC table of a keyless source table has no key either");
    assert_eq!(
        counts,
        vec![
            ("079000000001".into(), "00004".into(), 1),
            ("079000000001".into(), "26734".into(), 3),
            ("079000000002".into(), "00004".into(), 1),
            ("079000000003".into(), "25750".into(), 1),
        ]
    );

    // kill -9 of the agent while identical rows are inserted, updated and deleted.
    let writer = d.source().await?;
    let load = tokio::spawn(async move {
        let mut made = 0i64;
        for i in 0..150 {
            let note = format!("lượt {}", i % 7);
            writer
                .batch_execute(&format!(
                    "INSERT INTO residence_log (citizen_id, commune_code, note) VALUES ('079000000009', '26734', '{note}'), ('079000000009', '26734', '{note}');
                     UPDATE residence_log SET commune_code = '00004' WHERE {};
                     DELETE FROM residence_log WHERE {};",
                    one("079000000009", "26734", &note),
                    one("079000000009", "00004", &note)
                ))
                .await?;
            made += 4;
        }
        anyhow::Ok(made)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.agent.as_mut().expect("agent").kill9();
    changes += load.await??;
    d.start_agent()?;
    d.wait_same("residence_log", ALL, Duration::from_secs(90)).await?;
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    let (_, _, quarantined) = d.applied().await?;
    assert_eq!(quarantined, 0, "a keyless change found no row to change");
    Ok(())
}
