//! `dongbo-agent check` tells provincial IT what is wrong, in plain words, and exits non-zero.

use std::process::Command;

use dongbo_tests::procs::binary;
use dongbo_tests::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_table_without_primary_key_a_missing_table_and_an_unreachable_hub() -> anyhow::Result<()> {
    let setup = "CREATE TABLE households (household_id uuid PRIMARY KEY, head text);
                 CREATE TABLE residence_log (citizen_id char(12), commune_code varchar(5));";
    let mut d =
        Deployment::new("check", setup, &["public.households", "public.residence_log", "public.nowhere"]).await?;
    let config = d.dir.join("agent.toml");
    std::fs::write(&config, d.agent_config())?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "check must fail:\n{text}");
    assert!(text.contains("ok       wal_level is logical"), "{text}");
    assert!(text.contains("ok       table public.households has a primary key"), "{text}");
    assert!(
        text.contains("PROBLEM  table public.residence_log: table public.residence_log has no primary key"),
        "{text}"
    );
    assert!(text.contains("PROBLEM  table public.nowhere: does not exist"), "{text}");
    assert!(text.contains(&format!("PROBLEM  hub http://127.0.0.1:{}", d.hub_port)), "{text}");

    // With the hub up and only keyed tables, every check passes.
    d.tables = vec!["public.households".into()];
    std::fs::write(&config, d.agent_config())?;
    d.start_hub().await?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
    assert!(
        text.contains(&format!("ok       replication connection to 127.0.0.1:{}/province accepted", d.pg.port)),
        "{text}"
    );
    assert!(!text.contains("WARNING"), "{text}");

    // With every slot but one taken, the agent's own fits but a later added table's would not.
    let admin = d.pg.connect("province").await?;
    admin
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('taken_' || g, 'pgoutput') FROM generate_series(1, \
             current_setting('max_replication_slots')::int - 1 - (SELECT count(*) FROM pg_replication_slots)::int) g",
        )
        .await?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a warning does not fail check:\n{text}");
    assert!(text.contains("WARNING  replication slots: none left beside this agent's"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_first_with_the_statement_and_role_when_run_could_not_create_the_publication() -> anyhow::Result<()>
{
    let mut d = Deployment::new("checkpub", "SELECT 1", &["public.registry"]).await?;
    // The table belongs to another role, as on a legacy server where the application owns it:
    // the agent's role may read it but not publish it.
    let owner = d.pg.connect("province").await?;
    owner
        .batch_execute(
            "CREATE ROLE app_owner; GRANT CREATE ON DATABASE province TO app_owner;
             CREATE TABLE registry (id int PRIMARY KEY, name text);
             ALTER TABLE registry OWNER TO app_owner; GRANT SELECT ON registry TO dongbo;
             INSERT INTO registry VALUES (1, 'Nguyễn Văn A')",
        )
        .await?;
    let config = d.dir.join("agent.toml");
    std::fs::write(&config, d.agent_config())?;
    d.start_hub().await?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "check passed although run cannot create the publication:\n{text}");
    let expected = "PROBLEM  publication dongbo: role dongbo may not create it, so run would fail; \
                    as app_owner (owner of public.registry) (or a superuser), run: \
                    CREATE PUBLICATION \"dongbo\" FOR TABLE \"public\".\"registry\"";
    assert!(text.contains(expected), "{text}");

    // run fails the same way, before taking anything.
    d.start_agent()?;
    let agent = d.agent.as_mut().expect("agent");
    let status = agent.wait_exit(std::time::Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "run did not stop:\n{}", agent.log_text());
    assert!(agent.log_text().contains("CREATE PUBLICATION \"dongbo\""), "{}", agent.log_text());

    // The owner runs the statement it names; check passes, and the table flows.
    owner
        .batch_execute(
            "SET ROLE app_owner; CREATE PUBLICATION \"dongbo\" FOR TABLE \"public\".\"registry\"; RESET ROLE",
        )
        .await?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok       publication dongbo covers every table"), "{text}");
    d.start_agent()?;
    assert_eq!(d.wait_same("registry", "id", std::time::Duration::from_secs(60)).await?, 1);
    Ok(())
}
