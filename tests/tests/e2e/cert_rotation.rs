//! Rotation and revocation without a restart: an agent whose certificate is revoked while it is
//! connected is cut off at the reload (SIGHUP) and refused after; lifting the revocation (the file
//! changes, no signal) lets it back with nothing lost; a broken certificate file is refused and the
//! one in force stays; a rotated hub certificate is served to new connections at once, and an agent
//! reconnecting over it loses nothing and applies nothing twice; an agent whose certificate is
//! rotated in place reconnects with it by itself, so revoking the old one does not stop it.

use std::time::{Duration, Instant};

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::tls::TestPki;
use dongbo_tests::Deployment;

async fn wait_log(d: &Deployment, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !d.hub.as_ref().expect("hub").log_text().contains(what) {
        anyhow::ensure!(Instant::now() < deadline, "no {what:?} in the hub log within {timeout:?}");
        d.ensure_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_without_a_restart_and_a_rotated_hub_certificate_loses_nothing() -> anyhow::Result<()>
{
    let mut d = Deployment::new("rotation", CITIZENS_DDL, &["public.citizens"]).await?;
    let pki = TestPki::new(&d.dir.join("pki"))?;
    d.tls = Some(pki.clone());
    let src = d.source().await?;
    let mut gen = CitizenGen::new(81);
    insert_citizens(&src, &mut gen, 200).await?;
    let mut changes = 1 + 200; // the snapshot's truncate and rows
    d.start_hub().await?;
    d.start_agent()?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 200);
    d.wait_applied(changes, Duration::from_secs(30)).await?;

    // The agent exports when its client certificate expires.
    let agent_cert = pki.dir.join(format!("agent-{}", d.source_id)).display().to_string();
    let not_after = dongbo_connectors::tls::certificate_validity(std::path::Path::new(&format!("{agent_cert}.pem")))
        .map_err(anyhow::Error::msg)?
        .not_after_s;
    let series = "dongbo_tls_certificate_expiry_timestamp_seconds{certificate=\"agent\"}";
    dongbo_tests::scrape::wait_agent(d.status_port, series, |v| v == not_after as f64).await?;

    // Revoke the connected agent's certificate and send SIGHUP: its connection is cut.
    let fingerprint = pki.fingerprint(&agent_cert)?;
    std::fs::write(pki.revoked_file(), format!("# lost laptop\n{fingerprint}\n"))?;
    let hub_pid = d.hub.as_ref().and_then(|h| h.pid()).expect("hub pid");
    std::process::Command::new("kill").args(["-HUP", &hub_pid.to_string()]).status()?;
    wait_log(&d, "connection cut: its client certificate is revoked", Duration::from_secs(10)).await?;
    insert_citizens(&src, &mut gen, 100).await?;
    changes += 100;
    // Its reconnections are refused at the handshake, and nothing more is applied.
    wait_log(&d, "Revoked", Duration::from_secs(15)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ndc = d.ndc().await?;
    let schema = d.ndc_schema();
    let count: i64 = ndc.query_one(&format!("SELECT count(*) FROM {schema}.citizens"), &[]).await?.get(0);
    assert_eq!(count, 200, "a revoked agent's changes were applied");

    // Lift the revocation by editing the file only: the hub notices, the agent gets back in and
    // delivers what it spooled meanwhile.
    std::fs::write(pki.revoked_file(), "# nothing revoked\n")?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 300);
    d.wait_applied(changes, Duration::from_secs(30)).await?;

    // Rotate the hub's certificate: new connections get the new one without a restart.
    let before = pki.served_fingerprint(d.hub_port).await?;
    // A broken certificate file (a copy gone wrong) is refused and the one in force stays.
    let good_pem = std::fs::read(pki.dir.join("hub.pem"))?;
    std::fs::write(pki.dir.join("hub.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    wait_log(&d, "TLS reload failed", Duration::from_secs(10)).await?;
    assert_eq!(pki.served_fingerprint(d.hub_port).await?, before);
    std::fs::write(pki.dir.join("hub.pem"), good_pem)?;
    let rotated = pki.rotate_hub()?;
    assert_ne!(before, rotated);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pki.served_fingerprint(d.hub_port).await? != rotated {
        anyhow::ensure!(Instant::now() < deadline, "the hub still serves its old certificate after 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An agent killed mid-stream reconnects over the new certificate: nothing lost, nothing twice.
    let writer = d.source().await?;
    let mut writer_gen = CitizenGen::new(82);
    let load = tokio::spawn(async move { insert_citizens(&writer, &mut writer_gen, 300).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.agent.as_mut().expect("agent").kill9();
    load.await??;
    changes += 300;
    d.start_agent()?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 600);
    d.wait_applied(changes, Duration::from_secs(30)).await?;

    // The agent's own certificate rotated in place: it reconnects with the new one by itself, so
    // revoking the old one then does not stop it.
    let old = pki.fingerprint(&agent_cert)?;
    let next = pki.agent("agent-next", &d.source_id, None, false)?;
    std::fs::rename(format!("{next}.key"), format!("{agent_cert}.key"))?;
    std::fs::rename(format!("{next}.pem"), format!("{agent_cert}.pem"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !d.agent.as_ref().expect("agent").log_text().contains("reconnecting with the TLS files") {
        anyhow::ensure!(Instant::now() < deadline, "the agent did not notice its rotated certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(pki.revoked_file(), format!("{old}\n"))?;
    std::process::Command::new("kill").args(["-HUP", &hub_pid.to_string()]).status()?;
    insert_citizens(&src, &mut gen, 100).await?;
    changes += 100;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 700);
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    d.ensure_alive()?;
    Ok(())
}
