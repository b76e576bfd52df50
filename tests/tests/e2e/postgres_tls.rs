//! TLS to PostgreSQL on every dongbo connection: source and NDC on a cluster with `ssl = on` that
//! refuses clear text over TCP and asks the NDC's clients for a certificate. With `verify-full` the
//! whole path works and every dongbo session (query, walsender, NDC) is encrypted; a wrong CA, a
//! clear-text client and an NDC client without its certificate are each refused with the reason.

use std::process::Command;
use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::pg::{PgCluster, ROLE};
use dongbo_tests::procs::binary;
use dongbo_tests::tls::TestPki;
use dongbo_tests::Deployment;

/// Runs `dongbo-agent check` on the deployment's current agent config; (passed, stdout and stderr).
fn check(d: &Deployment) -> anyhow::Result<(bool, String)> {
    let config = d.dir.join("agent-check.toml");
    std::fs::write(&config, d.agent_config())?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&config).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_ndc_over_verify_full_tls_and_wrong_settings_are_refused_with_the_reason() -> anyhow::Result<()> {
    let pki_dir =
        std::env::temp_dir().join(format!("dongbo-pgtls-pki-{}-{}", std::process::id(), rand::random::<u32>()));
    let pki = TestPki::new(&pki_dir)?;
    let mut d = Deployment::on(PgCluster::start_tls("pgtls", &pki)?, CITIZENS_DDL, &["public.citizens"]).await?;
    d.tls = Some(pki.clone());
    let ca = pki.dir.join("ca/ca.pem").display().to_string();
    let verify_full = format!("mode = \"verify-full\"\nca_file = \"{ca}\"");
    let client = pki.pg_client("ndc-client", ROLE)?;
    let ndc_client_cert = format!("cert_file = \"{client}.pem\"\nkey_file = \"{client}.key\"");
    let src = d.source().await?;
    let mut gen = CitizenGen::new(71);
    insert_citizens(&src, &mut gen, 200).await?;

    // The NDC asks for a client certificate: without one the hub does not start, and says why.
    d.ndc_tls_toml = verify_full.clone();
    let refused = d.start_hub().await.expect_err("the NDC wants a client certificate");
    assert!(refused.to_string().contains("certificate"), "{refused:#}");
    // A CA that did not sign the NDC's certificate: the hub names the CA file as the suspect.
    pki.other_ca("rogue-ca")?;
    let rogue_ca = pki.dir.join("rogue-ca/ca.pem").display().to_string();
    d.ndc_tls_toml = format!("mode = \"verify-full\"\nca_file = \"{rogue_ca}\"\n{ndc_client_cert}");
    let refused = d.start_hub().await.expect_err("wrong CA for the NDC");
    assert!(refused.to_string().contains("is not signed by the CA in ca_file"), "{refused:#}");
    d.ndc_tls_toml = format!("{verify_full}\n{ndc_client_cert}");
    d.start_hub().await?;

    // The agent's check names a wrong CA, and a clear-text attempt is refused by the server.
    d.source_tls_toml = format!("mode = \"verify-full\"\nca_file = \"{rogue_ca}\"");
    let (passed, text) = check(&d)?;
    assert!(!passed, "{text}");
    assert!(text.contains("is not signed by the CA in ca_file"), "{text}");
    assert!(!text.contains("check host, port, user, password"), "a TLS refusal is not a password problem:\n{text}");
    d.source_tls_toml = "mode = \"disable\"".into();
    let (passed, text) = check(&d)?;
    assert!(!passed, "{text}");
    assert!(text.contains("no encryption"), "the server's pg_hba refusal reaches the operator:\n{text}");
    // A mode that needs a CA without one is a config error before any connection.
    d.source_tls_toml = "mode = \"verify-ca\"".into();
    let (passed, text) = check(&d)?;
    assert!(!passed && text.contains("source.tls.ca_file"), "{text}");
    d.source_tls_toml = verify_full.clone();
    let (passed, text) = check(&d)?;
    assert!(passed, "{text}");

    d.start_agent()?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 200);
    insert_citizens(&src, &mut gen, 100).await?;
    src.batch_execute("UPDATE citizens SET full_name = full_name || ' (tls)' WHERE citizen_id IN (SELECT citizen_id FROM citizens ORDER BY citizen_id LIMIT 20)").await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 300);

    // Every dongbo session on the server is encrypted: the agent's query connection and walsender,
    // and the hub's NDC connections.
    let admin = d.pg.connect("postgres").await?;
    let sessions = admin
        .query(
            "SELECT a.application_name, a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'dongbo-%' ORDER BY 1, 2",
            &[],
        )
        .await?;
    let seen: Vec<(String, String, bool)> = sessions.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    eprintln!("sessions: {seen:?}");
    for (app, kind) in [("dongbo-agent", "walsender"), ("dongbo-hub", "client backend")] {
        assert!(seen.iter().any(|(a, k, _)| a == app && k == kind), "no {app} {kind} session: {seen:?}");
    }
    assert!(seen.iter().all(|(_, _, ssl)| *ssl), "a dongbo session in clear text: {seen:?}");
    d.ensure_alive()?;
    let _ = std::fs::remove_dir_all(&pki_dir);
    Ok(())
}
