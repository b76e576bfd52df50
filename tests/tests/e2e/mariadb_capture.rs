//! MariaDB end to end, against a real throw-away server in the Vietnamese time zone (+07:00): the
//! agent snapshots while writes run, then follows the binlog. Every type the agent knows, with
//! Vietnamese text in utf8mb4 and utf8mb3, properly encoded latin1 and latin1 double-encoded by an
//! old client (delivered as the server returns it to a utf8mb4 client); a zero date is quarantined
//! with the reason; updates and a delete logged with `binlog_row_image = MINIMAL`; a keyless table
//! keeps its duplicates; a 50 000-row transaction; a column added mid-stream; and a `kill -9` of
//! the agent inside a large transaction. Each time the NDC equals the source row for row and the
//! hub applied exactly as many changes as the source made. Then a table added to `source.tables`
//! is snapshotted at the next start while writes to it run.

use std::time::{Duration, Instant};

use dongbo_tests::mariadb::MariaDb;
use dongbo_tests::scrape::wait_agent;
use dongbo_tests::Deployment;

const SETUP: &str = "CREATE TABLE province.citizens (
       id int unsigned PRIMARY KEY, big bigint unsigned, small tinyint, flag tinyint(1),
       amount decimal(12,2), ratio float, score double,
       name varchar(100) CHARACTER SET utf8mb4, name3 varchar(100) CHARACTER SET utf8mb3,
       legacy varchar(100) CHARACTER SET latin1, code char(12) CHARACTER SET latin1, note text,
       born date, seen datetime(6), stamped timestamp(3) NULL DEFAULT NULL, dur time, yr year,
       status enum('thường trú','tạm trú'), tags set('a','b','c'), bits bit(8), doc json, photo blob
     ) CHARACTER SET utf8mb4;
     CREATE TABLE province.residence_log (citizen_id char(12), commune_code varchar(5)) CHARACTER SET latin1;";

/// Each column as the two sides print it alike: (MariaDB expression, NDC expression).
const COLUMNS: &[(&str, &str)] = &[
    ("id", "id"),
    ("big", "big"),
    ("small", "small"),
    ("flag", "flag"),
    ("amount", "amount"),
    ("ratio", "ratio"),
    ("score", "score"),
    ("name", "name"),
    ("name3", "name3"),
    ("CONVERT(legacy USING utf8mb4)", "legacy"),
    ("code", "code"),
    ("note", "note"),
    ("born", "born"),
    ("DATE_FORMAT(seen, '%Y-%m-%d %H:%i:%s.%f')", "to_char(seen, 'YYYY-MM-DD HH24:MI:SS.US')"),
    ("DATE_FORMAT(stamped, '%Y-%m-%d %H:%i:%s.%f')", "to_char(stamped AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"),
    ("dur", "dur"),
    ("yr", "yr"),
    ("status", "status"),
    ("tags", "tags"),
    ("LPAD(HEX(bits), 2, '0')", "upper(encode(bits, 'hex'))"),
    ("doc", "doc"),
    ("HEX(photo)", "upper(encode(photo, 'hex'))"),
];

/// The keyless table's columns, as both sides print them.
const LOG_COLUMNS: &[(&str, &str)] = &[("citizen_id", "citizen_id"), ("commune_code", "commune_code")];

/// The zero-date row: quarantined, so left out of the comparison.
const ZERO_DATE_ID: u32 = 999_999;

fn mysql_select(columns: &[(&str, &str)], table: &str, filter: &str) -> String {
    let cols: Vec<String> = columns.iter().map(|(m, _)| format!("COALESCE({m}, '~')")).collect();
    format!("SET time_zone = '+00:00'; SELECT CONCAT_WS('|', {}) FROM province.{table} {filter}", cols.join(", "))
}

fn pg_select(columns: &[(&str, &str)], schema: &str, table: &str) -> String {
    let cols: Vec<String> = columns.iter().map(|(_, p)| format!("coalesce(({p})::text, '~')")).collect();
    // A table of a source schema other than `public` keeps its schema in its NDC name.
    format!("SELECT concat_ws('|', {}) FROM {schema}.\"province.{table}\"", cols.join(", "))
}

/// Waits until the NDC copy of `table` equals the source (sorted, row by row); returns the rows.
async fn wait_same(
    d: &Deployment,
    db: &MariaDb,
    table: &str,
    columns: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<usize> {
    let filter = if table == "citizens" { format!("WHERE id <> {ZERO_DATE_ID}") } else { String::new() };
    let ndc = d.ndc().await?;
    let deadline = Instant::now() + timeout;
    loop {
        let want = db.sorted_lines(&mysql_select(columns, table, &filter))?;
        let mut got: Vec<String> = match ndc.query(&pg_select(columns, &d.ndc_schema(), table), &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(_) => Vec::new(),
        };
        got.sort();
        if want == got {
            return Ok(want.len());
        }
        if Instant::now() > deadline {
            let first = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
            anyhow::bail!(
                "NDC {table} differs from MariaDB: source {} rows, NDC {}; first difference at {first}:\n  source: {:?}\n  ndc:    {:?}\nagent log:\n{}\nhub log:\n{}",
                want.len(),
                got.len(),
                want.get(first),
                got.get(first),
                dongbo_tests::tail(&d.agent.as_ref().map(|a| a.log_text()).unwrap_or_default(), 20),
                dongbo_tests::tail(&d.hub.as_ref().map(|a| a.log_text()).unwrap_or_default(), 20),
            );
        }
        d.ensure_alive()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The hub's applied count once it has not moved for a second.
async fn settled_count(d: &Deployment) -> anyhow::Result<i64> {
    let mut last = -1;
    loop {
        let (_, applied, quarantined) = d.applied().await?;
        if applied + quarantined == last {
            return Ok(last);
        }
        last = applied + quarantined;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn insert_citizens(from: u32, to: u32) -> String {
    format!(
        "INSERT INTO province.citizens (id, big, small, flag, amount, ratio, score, name, name3, legacy, code, note, born, seen, stamped, dur, yr, status, tags, bits, doc, photo)
         SELECT seq, 18446744073709551615 - seq, CAST(seq % 256 AS SIGNED) - 128, seq % 2, seq * 1.25, 0.5 + seq % 8, seq / 8, CONCAT('Nguyễn Thị Ánh ', seq),
                CONCAT('Trần Văn Đức ', seq), CONCAT('caf', CHAR(233), ' ', seq), LPAD(seq, 12, '0'), IF(seq % 5 = 0, NULL, REPEAT('ghi chú ', seq % 4)),
                DATE_ADD('1950-01-01', INTERVAL seq DAY), TIMESTAMP('2024-02-29 23:59:59.123456') + INTERVAL seq SECOND,
                TIMESTAMP('2025-07-01 07:30:00.250') + INTERVAL seq MINUTE, SEC_TO_TIME(CAST(seq % 6000 AS SIGNED) * 500 - 1500000), 1901 + seq % 255,
                1 + seq % 2, seq % 8, seq % 256, CONCAT('{{\"hộ\": ', seq, '}}'), UNHEX(LPAD(HEX(seq), 8, '0'))
         FROM province.seq_{from}_to_{to}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_snapshot_then_binlog_delivers_every_type_and_change_exactly_once() -> anyhow::Result<()> {
    let mut d = Deployment::new("mariadb", "SELECT 1", &["public.unused"]).await?;
    let db = MariaDb::start("capture", &["--default-time-zone=+07:00", "--binlog-expire-logs-seconds=172800"]).await?;
    db.sql(SETUP)?;
    db.sql(&insert_citizens(1, 2000))?;
    // An old latin1 client stored UTF-8 bytes of Vietnamese in a latin1 column; the zero date.
    db.sql(&format!(
        "SET NAMES latin1; INSERT INTO province.citizens (id, legacy, name) VALUES (5000, 'Bà Rịa–Vũng Tàu', 'double-encoded');
         SET NAMES utf8mb4; INSERT INTO province.citizens (id, born) VALUES ({ZERO_DATE_ID}, '0000-00-00');
         INSERT INTO province.residence_log VALUES ('079000000001', '26734'), ('079000000001', '26734'), ('079000000001', '26734'), ('079000000002', '00004');"
    ))?;
    d.start_hub().await?;
    let config = db.agent_config(&d, &["province.citizens", "province.residence_log"], "");
    d.start_agent_from(&config, &[])?;

    // Writes while the snapshot runs. Each insert arrives once, as a snapshot row or as an insert;
    // each 200-row update either committed before the snapshot's read view (its rows arrive as
    // they are then) or is streamed (200 changes): the count is one of those, never more.
    for i in 0..10u32 {
        db.sql(&insert_citizens(2001 + i * 100, 2100 + i * 100))?;
        db.sql(&format!("UPDATE province.citizens SET note = 'đã sửa {i}', amount = amount + 0.01 WHERE id % 10 = {i} AND id <= 2000"))?;
    }
    assert_eq!(wait_same(&d, &db, "citizens", COLUMNS, Duration::from_secs(120)).await?, 3001);
    assert_eq!(wait_same(&d, &db, "residence_log", LOG_COLUMNS, Duration::from_secs(30)).await?, 4);
    let rows: i64 = 2 + 2000 + 2 + 4 + 1000; // the two truncates, the rows and the inserts
    let mut changes = settled_count(&d).await?;
    assert!(
        (rows..=rows + 2000).contains(&changes) && (changes - rows) % 200 == 0,
        "applied {changes}: not the {rows} rows plus whole streamed updates"
    );
    let ndc = d.ndc().await?;
    let legacy: String = ndc
        .query_one(&format!("SELECT legacy FROM {}.\"province.citizens\" WHERE id = 5000", d.ndc_schema()), &[])
        .await?
        .get(0);
    assert_eq!(
        legacy,
        dongbo_connectors::mysql::value::latin1_to_string("Bà Rịa–Vũng Tàu".as_bytes()),
        "double-encoded text as the server returns it"
    );
    let reason: String =
        ndc.query_one("SELECT reason FROM dongbo.quarantine WHERE source_id = $1", &[&d.source_id]).await?.get(0);
    assert!(reason.contains("0000-00-00"), "{reason}");
    // The agent's metrics: the snapshot read whole against the server's estimate, and the binlog
    // the server keeps at its position (the file being written: the whole two days).
    let port = d.status_port;
    wait_agent(port, "dongbo_agent_snapshot_progress_ratio", |v| v == 1.0).await?;
    wait_agent(port, "dongbo_agent_snapshot_rows_total", |v| v >= 2006.0).await?;
    wait_agent(port, "dongbo_agent_snapshot_estimated_rows", |v| v > 0.0).await?;
    wait_agent(port, "dongbo_agent_source_log_headroom_seconds{log=\"binlog\"}", |v| v == 172_800.0).await?;
    wait_agent(port, "dongbo_agent_source_log_retained_bytes{log=\"binlog\"}", |v| v >= 0.0).await?;

    // Streaming: updates of every kind, deletes, keyless duplicates, a 50 000-row transaction.
    db.sql(
        "UPDATE province.citizens SET status = 'tạm trú', tags = 'a,b,c', dur = '-838:59:59', stamped = '2000-02-29 06:59:59.999', legacy = 'Cà Mau' WHERE id BETWEEN 10 AND 19;
         DELETE FROM province.citizens WHERE id BETWEEN 20 AND 29;
         UPDATE province.citizens SET id = id + 100000 WHERE id BETWEEN 30 AND 34;
         INSERT INTO province.residence_log VALUES ('079000000001', '26734');
         UPDATE province.residence_log SET commune_code = '00004' WHERE citizen_id = '079000000001' LIMIT 1;
         DELETE FROM province.residence_log WHERE citizen_id = '079000000001' AND commune_code = '26734' LIMIT 1;",
    )?;
    changes += 10 + 10 + 5 + 3;
    // binlog_row_image = MINIMAL: the before image holds the key, the after image only what
    // changed; the columns left out keep their NDC values.
    db.sql(
        "SET SESSION binlog_row_image = 'MINIMAL';
         UPDATE province.citizens SET note = 'tối thiểu', amount = 7.77 WHERE id BETWEEN 40 AND 49;
         DELETE FROM province.citizens WHERE id = 50;",
    )?;
    changes += 10 + 1;
    db.sql(&format!("BEGIN; {}; COMMIT;", insert_citizens(200_001, 250_000)))?;
    changes += 50_000;
    assert_eq!(wait_same(&d, &db, "citizens", COLUMNS, Duration::from_secs(180)).await?, 3001 - 10 - 1 + 50_000);
    assert_eq!(wait_same(&d, &db, "residence_log", LOG_COLUMNS, Duration::from_secs(30)).await?, 4);
    d.wait_applied(changes, Duration::from_secs(60)).await?;

    // A column added mid-stream is followed.
    db.sql(
        "ALTER TABLE province.citizens ADD COLUMN ward varchar(10) CHARACTER SET utf8mb4;
         UPDATE province.citizens SET ward = 'Phường 7' WHERE id <= 100;",
    )?;
    changes += 100 - 10 - 5 - 1; // ids 20..29 and 50 deleted, 30..34 moved
    let mut with_ward = COLUMNS.to_vec();
    with_ward.push(("ward", "ward"));
    wait_same(&d, &db, "citizens", &with_ward, Duration::from_secs(60)).await?;
    d.wait_applied(changes, Duration::from_secs(60)).await?;

    // kill -9 of the agent inside a large transaction: resumed from the spool, nothing twice.
    db.sql(&format!("BEGIN; {}; COMMIT;", insert_citizens(300_001, 340_000)))?;
    changes += 40_000;
    // Killed as soon as part of it is through (or after a moment): the agent is then between
    // reading and spooling it.
    let before = d.applied().await?.1;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while d.applied().await?.1 == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.agent.as_mut().expect("agent").kill9();
    db.sql("UPDATE province.citizens SET ward = 'Xã 1' WHERE id BETWEEN 300001 AND 300010")?;
    changes += 10;
    d.start_agent_from(&config, &[])?;
    wait_same(&d, &db, "citizens", &with_ward, Duration::from_secs(180)).await?;
    d.wait_applied(changes, Duration::from_secs(60)).await?;
    let (_, _, quarantined) = d.applied().await?;
    assert_eq!(quarantined, 1, "only the zero date is in quarantine");

    // A table added to source.tables is snapshotted at the next start; its changes that the
    // binlog holds from before that snapshot (all of them here: made while the agent was down) are
    // in the snapshot and are not applied again, so the count stays exact.
    d.agent.as_mut().expect("agent").kill9();
    db.sql(
        "CREATE TABLE province.households (household_id bigint PRIMARY KEY, head varchar(200), members int) CHARACTER SET utf8mb4;
         INSERT INTO province.households SELECT seq, CONCAT('Chủ hộ ', seq), seq % 7 FROM province.seq_1_to_20000;
         UPDATE province.households SET members = members + 1 WHERE household_id <= 500;
         INSERT INTO province.households SELECT 100000 + seq, CONCAT('Hộ mới ', seq), 1 FROM province.seq_1_to_40;
         UPDATE province.citizens SET ward = 'Xã 2' WHERE id BETWEEN 1 AND 5;",
    )?;
    changes += 1 + 20_040 + 5;
    let tables = ["province.citizens", "province.residence_log", "province.households"];
    d.start_agent_from(&db.agent_config(&d, &tables, ""), &[])?;
    let households = [("household_id", "household_id"), ("head", "head"), ("members", "members")];
    assert_eq!(wait_same(&d, &db, "households", &households, Duration::from_secs(120)).await?, 20_040);
    wait_same(&d, &db, "citizens", &with_ward, Duration::from_secs(30)).await?;
    d.wait_applied(changes, Duration::from_secs(60)).await?;
    // And then it streams.
    db.sql("UPDATE province.households SET members = 0 WHERE household_id BETWEEN 1 AND 10")?;
    changes += 10;
    wait_same(&d, &db, "households", &households, Duration::from_secs(30)).await?;
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binlog_purged_while_the_agent_was_down_fails_check_and_stops_run_with_what_to_do() -> anyhow::Result<()> {
    let mut d = Deployment::new("mariadbpurged", "SELECT 1", &["public.unused"]).await?;
    let db = MariaDb::start("purged", &[]).await?;
    db.sql("CREATE TABLE province.people (id int PRIMARY KEY, name varchar(50)); INSERT INTO province.people VALUES (1, 'An');")?;
    d.start_hub().await?;
    let config = db.agent_config(&d, &["province.people"], "");
    d.start_agent_from(&config, &[])?;
    d.wait_applied(2, Duration::from_secs(60)).await?;
    d.agent.as_mut().expect("agent").stop();
    // While it is down the server moves to a new binlog and purges the one the agent was reading.
    // (The server keeps a binlog its dump threads still read: wait until the agent's is gone.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")?.trim() != "0"
    {
        anyhow::ensure!(Instant::now() < deadline, "the agent's binlog dump thread stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let check = || -> anyhow::Result<(bool, String)> {
        let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-agent")?)
            .args(["check", "--config"])
            .arg(d.dir.join("agent.toml"))
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (ok, text) = check()?;
    assert!(ok && text.contains("the binlog the spool resumes from (binlog.000001) is still on the server"), "{text}");
    db.sql("INSERT INTO province.people VALUES (2, 'Bình'); FLUSH BINARY LOGS;")?;
    // (Nor one InnoDB still needs for recovery until its binlog checkpoint: try until it goes.)
    loop {
        db.sql("PURGE BINARY LOGS TO 'binlog.000002'")?;
        if !db.sql("SHOW BINARY LOGS")?.contains("binlog.000001") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "binlog.000001 was not purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // check says so before run does.
    let (ok, text) = check()?;
    assert!(!ok && text.contains("the spool resumes from binlog.000001, which the server no longer has"), "{text}");
    d.start_agent_from(&config, &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.agent.as_mut().expect("agent").is_running() {
        anyhow::ensure!(Instant::now() < deadline, "the agent kept running on a purged binlog");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = d.agent.as_ref().expect("agent").log_text();
    assert!(log.contains("cannot send its binlog from binlog.000001"), "{log}");
    assert!(log.contains("move its spool directory aside"), "{log}");
    let (_, applied, _) = d.applied().await?;
    assert_eq!(applied, 2, "nothing was applied from a binlog with a hole in it");
    Ok(())
}

/// A parallel initial snapshot reads each table in a read view of its own: the later view's table
/// must not take again, from the binlog, the transactions committed between the two views (they
/// are in its rows), and the earlier view's table must take them. Both hold across a `kill -9`
/// just after the snapshot is spooled, when the stream restarts at the earlier view's position
/// and meets those transactions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_snapshot_takes_each_change_once_across_read_views_and_a_crash() -> anyhow::Result<()> {
    let mut d = Deployment::new("mariadb-views", "SELECT 1", &["public.unused"]).await?;
    let db = MariaDb::start("views", &[]).await?;
    db.sql(SETUP)?;
    db.sql(&insert_citizens(1, 1000))?;
    db.sql("INSERT INTO province.residence_log VALUES ('079000000001', '26734'), ('079000000001', '26734')")?;
    d.start_hub().await?;
    let tables = ["province.citizens", "province.residence_log"];
    let config = db.agent_config(&d, &tables, "snapshot_parallel_tables = 2");
    d.start_agent_from(&config, &[("DONGBO_FAULT", "mysql-pause-between-read-views,snapshot-spooled")])?;
    d.agent.as_ref().expect("agent").wait_for_log("pausing 3 s between read views", Duration::from_secs(30)).await?;
    // Between the views: one table is in the first (these changes come from the binlog), the other
    // in the second (they are in its rows). A keyless table taken twice would hold duplicates.
    db.sql(&format!(
        "{}; INSERT INTO province.residence_log VALUES ('079000000001', '26734'), ('079000000003', '00004');
         BEGIN; UPDATE province.citizens SET note = 'giữa hai lần đọc' WHERE id <= 100;
         INSERT INTO province.residence_log VALUES ('079000000004', '26734'); COMMIT;",
        insert_citizens(1001, 1100)
    ))?;
    let crashed = d.agent.as_mut().expect("agent").wait_exit(Duration::from_secs(60));
    assert!(crashed.is_some_and(|s| !s.success()), "the agent did not stop at snapshot-spooled");
    let log = d.agent.as_ref().expect("agent").log_text();
    // Views open in order: the first line is the first view's.
    let first_view = log.lines().find(|l| l.contains("read view opened")).unwrap_or_default();
    let first_view = first_view.to_string();
    // After the crash, more changes to both; then the agent restarts at the first view's position.
    db.sql(
        "DELETE FROM province.residence_log WHERE citizen_id = '079000000003';
         UPDATE province.citizens SET amount = 1.5 WHERE id BETWEEN 1001 AND 1010;",
    )?;
    d.start_agent_from(&config, &[])?;
    assert_eq!(wait_same(&d, &db, "citizens", COLUMNS, Duration::from_secs(60)).await?, 1100);
    assert_eq!(wait_same(&d, &db, "residence_log", LOG_COLUMNS, Duration::from_secs(30)).await?, 4);
    // Exactly: two truncates; the first view's table takes its rows then the window's changes from
    // the binlog; the second view's table takes its rows, window included, and none of the
    // window's changes again; then the delete and the 10 updates.
    let expected = if first_view.contains("province.citizens") {
        2 + (1000 + 100 + 100) + 5 + 1 + 10
    } else {
        assert!(first_view.contains("province.residence_log"), "no first read view in the log:\n{log}");
        2 + 1100 + 5 + 1 + 10
    };
    d.wait_applied(expected, Duration::from_secs(30)).await?;
    Ok(())
}
