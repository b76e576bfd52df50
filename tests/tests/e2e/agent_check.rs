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
    Ok(())
}
