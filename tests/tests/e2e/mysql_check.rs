//! `dongbo-agent check` for a MariaDB source, against real throw-away servers: a well set-up one
//! passes (binlog on and row-based, the role reads the binlog, a keyless table is kept as a
//! multiset); one with `binlog_format = MIXED`, short binlog retention, a role without
//! REPLICATION SLAVE, a column in a character set capture cannot decode, a MyISAM table, a keyless
//! table under `binlog_row_image = MINIMAL` and compressed binlog events fails with the statements
//! that fix each, as `run` would; a TLS-only server passes over
//! `verify-full` and refuses another CA and clear text.

use std::process::Command;

use dongbo_tests::mariadb::{MariaDb, PASSWORD, ROLE};
use dongbo_tests::procs::binary;
use dongbo_tests::{Deployment, TOKEN};

const TABLES: &str =
    "CREATE TABLE province.households (household_id bigint PRIMARY KEY, head varchar(200)) CHARACTER SET utf8mb4;
     CREATE TABLE province.residence_log (citizen_id char(12), commune_code varchar(5)) CHARACTER SET latin1;";

fn agent_toml(d: &Deployment, db: &MariaDb, tls: &str) -> String {
    format!(
        "source_id = \"{id}\"\n\n[source]\nkind = \"mysql\"\nhost = \"{host}\"\nport = {port}\nuser = \"{ROLE}\"\n\
         password = \"{PASSWORD}\"\ntables = [\"province.households\", \"province.residence_log\"]\n{tls}\n\
         [spool]\npath = \"{spool}\"\n\n[hub]\nurl = \"http://127.0.0.1:{hub}\"\ntoken = \"{TOKEN}\"\n",
        id = d.source_id,
        host = if tls.is_empty() { "127.0.0.1" } else { "localhost" },
        tls = if tls.is_empty() { String::new() } else { format!("\n[source.tls]\n{tls}\n") },
        port = db.port,
        spool = d.dir.join("mysql-spool").display(),
        hub = d.hub_port,
    )
}

fn check(d: &Deployment, db: &MariaDb, name: &str, tls: &str) -> anyhow::Result<(bool, String)> {
    let config = d.dir.join(format!("{name}.toml"));
    std::fs::write(&config, agent_toml(d, db, tls))?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_mariadb_source_passes_when_set_up_and_names_each_fix_when_not() -> anyhow::Result<()> {
    let mut d = Deployment::new("mysqlcheck", "SELECT 1", &["public.unused"]).await?;
    d.start_hub().await?;

    let good = MariaDb::start("good", &[]).await?;
    good.sql(TABLES)?;
    let (passed, text) = check(&d, &good, "good", "")?;
    assert!(passed, "{text}");
    for line in [
        "ok       log_bin is on",
        "ok       binlog_format is ROW",
        "ok       binlog_row_image is FULL",
        &format!("ok       role {ROLE} may read the binlog"),
        "ok       table province.households has a primary key and is readable",
        "ok       table province.residence_log has no primary key: kept as a multiset",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }

    let bad = MariaDb::start("bad", &["--binlog-format=MIXED", "--binlog-expire-logs-seconds=3600"]).await?;
    bad.sql(&format!(
        "{TABLES} REVOKE REPLICATION SLAVE ON *.* FROM '{ROLE}'@'%';
         ALTER TABLE province.households ADD COLUMN ghi_chu varchar(20) CHARACTER SET cp1250;
         ALTER TABLE province.residence_log ENGINE = MyISAM;
         SET GLOBAL binlog_row_image = 'MINIMAL'; SET GLOBAL log_bin_compress = ON;"
    ))?;
    let (passed, text) = check(&d, &bad, "bad", "")?;
    assert!(!passed, "{text}");
    for line in [
        "PROBLEM  binlog_format: is MIXED; run SET GLOBAL binlog_format = 'ROW'",
        &format!("PROBLEM  role {ROLE}: cannot read the binlog"),
        &format!("GRANT REPLICATION SLAVE ON *.* TO '{ROLE}'"),
        "WARNING  binlog retention: the server keeps binlogs 1 hours",
        "PROBLEM  table province.households: column ghi_chu of province.households is in character set cp1250",
        "WARNING  table province.residence_log: uses the MyISAM engine",
        "PROBLEM  table province.residence_log: has no primary key, so its updates and deletes name their row",
        "PROBLEM  log_bin_compress: is ON",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }

    // A server that takes TLS only: verify-full against its CA passes, another CA is refused.
    let pki = dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?;
    let cert = pki.server("mariadb")?;
    let ca = pki.dir.join("ca/ca.pem").display().to_string();
    let tls_only = MariaDb::start(
        "tls",
        &[
            &format!("--ssl-cert={cert}.pem"),
            &format!("--ssl-key={cert}.key"),
            &format!("--ssl-ca={ca}"),
            "--require-secure-transport=ON",
        ],
    )
    .await?;
    tls_only.sql(TABLES)?;
    let (passed, text) = check(&d, &tls_only, "tls", &format!("mode = \"verify-full\"\nca_file = \"{ca}\""))?;
    assert!(passed, "{text}");
    pki.other_ca("rogue-ca")?;
    let rogue = pki.dir.join("rogue-ca/ca.pem").display().to_string();
    let (passed, text) = check(&d, &tls_only, "tls-rogue", &format!("mode = \"verify-full\"\nca_file = \"{rogue}\""))?;
    assert!(!passed && text.contains("cannot connect"), "{text}");
    let (passed, text) = check(&d, &tls_only, "tls-clear", "mode = \"disable\"")?;
    assert!(!passed, "clear text reached a TLS-only server:\n{text}");

    Ok(())
}
