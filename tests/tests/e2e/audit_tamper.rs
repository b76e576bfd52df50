//! Auditing the auditor: someone holding the hub's own NDC role tampers with the audit log. A stray
//! entry outside 1…head is reported, and a consistent rewrite (a citizen's entries deleted and the
//! rest renumbered and re-chained, head included) is caught by the signed checkpoints kept outside
//! the NDC, of which a witness run by another party holds identical copies; the citizen query then
//! answers only from the verified part of the chain.

use std::time::{Duration, Instant};

use anyhow::Context;
use dongbo_hub::audit::{chain_hash, Entry};
use dongbo_tests::citizens::{insert_citizens, move_citizen, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{admin, declarations, webhook_subscription, Receiver};
use dongbo_tests::{pg, Deployment};

fn verify_cli(d: &Deployment) -> anyhow::Result<(Option<i32>, String)> {
    let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .args(["audit", "--config", &d.dir.join("hub.toml").to_string_lossy(), "verify"])
        .output()?;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_audit_rewrite_with_the_hubs_ndc_role_is_detected() -> anyhow::Result<()> {
    let mut d = Deployment::new("audittamper", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(21);
    let ids = insert_citizens(&src, &mut gen, 20).await?;
    let receiver = Receiver::default();
    let url = receiver.start().await?;
    let admin_port = pg::free_port();
    // A witness run by another party keeps a copy of every checkpoint.
    let witnessed: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let witness = {
        let kept = witnessed.clone();
        let app = axum::Router::new().route(
            "/checkpoints",
            axum::routing::post(move |axum::Json(cp): axum::Json<serde_json::Value>| {
                let kept = kept.clone();
                async move {
                    kept.lock().expect("witness lock").push(cp);
                    "kept"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://127.0.0.1:{port}/checkpoints")
    };
    d.fanout_toml = declarations(admin_port)
        + &webhook_subscription("bhyt-residence", &url, &["citizen_id", "current.address"], 5)
        + &format!("\n[audit]\ncheckpoint_interval_s = 1\nwitness_url = \"{witness}\"\n");
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    // The first checkpoint anchors the empty chain; the next ones must build on it.
    let checkpoints = d.dir.join("hub-data/audit-checkpoints/checkpoints.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&checkpoints).unwrap_or_default().contains("\"last_id\":0") {
        anyhow::ensure!(Instant::now() < deadline, "no checkpoint of the empty chain within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (a, b) = (&ids[0], &ids[1]);
    for id in [a, b, a, b, a] {
        move_citizen(&src, &mut gen, id).await?;
    }
    receiver.wait_for(5, Duration::from_secs(30)).await?;

    // The hub's own role, as a DBA with its credentials would use it.
    let ndc = d.pg.connect_as_role("ndc").await?;
    let head: i64 = ndc.query_one("SELECT last_id FROM dongbo.audit_head", &[]).await?.get(0);
    assert_eq!(head, 5);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&checkpoints).unwrap_or_default().contains("\"last_id\":5") {
        anyhow::ensure!(Instant::now() < deadline, "no signed checkpoint of entry 5 within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out) = verify_cli(&d)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: 5 entries") && out.contains("anchored up to entry 5"), "{out}");
    // Many audit calls at once through the admin API share one NDC session.
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dongbo-hub'";
    let admin_ndc = d.ndc().await?;
    let before: i64 = admin_ndc.query_one(sessions, &[]).await?.get(0);
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let path = if i % 2 == 0 { "/audit/verify".to_string() } else { format!("/audit/citizens/{a}") };
            tokio::spawn(async move { admin(admin_port, reqwest::Method::GET, &path, None).await })
        })
        .collect();
    let mut most = before;
    while calls.iter().any(|c| !c.is_finished()) {
        most = most.max(admin_ndc.query_one(sessions, &[]).await?.get(0));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for c in calls {
        let (status, body) = c.await??;
        assert_eq!(status, 200, "{body}");
    }
    assert!(most <= before + 1, "40 audit calls held {} NDC sessions beside the hub's {before}", most - before);
    // The witness holds the same signed checkpoint of entry 5 as the hub's own store.
    let local: serde_json::Value = std::fs::read_to_string(&checkpoints)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|cp| cp["last_id"] == 5)
        .context("no local checkpoint of entry 5")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !witnessed.lock().expect("witness lock").contains(&local) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the witness never got the checkpoint of entry 5: {:?}",
            witnessed.lock()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A stray entry outside 1..=head (id −7) was invisible to the walk; now it is named.
    ndc.execute(
        "INSERT INTO dongbo.audit_log SELECT -7, at_us, at, subscription, subscriber, purpose, channel, citizen_id, \
         event_id, fields, prev_hash, hash FROM dongbo.audit_log WHERE id = 1",
        &[],
    )
    .await?;
    let (code, out) = verify_cli(&d)?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("entry -7 lies outside the chain"), "{out}");
    ndc.execute("DELETE FROM dongbo.audit_log WHERE id = -7", &[]).await?;

    // The consistent rewrite: a's deliveries erased, the rest renumbered and re-chained.
    let rows = ndc
        .query(
            "SELECT at_us, subscription, subscriber, purpose, channel, citizen_id, event_id, fields \
             FROM dongbo.audit_log WHERE citizen_id <> $1 ORDER BY id",
            &[a],
        )
        .await?;
    assert_eq!(rows.len(), 2, "b's two deliveries stay");
    ndc.execute("DELETE FROM dongbo.audit_log", &[]).await?;
    let mut prev: Vec<u8> = Vec::new();
    for (n, r) in rows.iter().enumerate() {
        let id = n as i64 + 1;
        let at_us: i64 = r.get(0);
        let e = Entry {
            subscription: r.get(1),
            subscriber: r.get(2),
            purpose: r.get(3),
            channel: r.get(4),
            citizen_id: r.get(5),
            event_id: r.get(6),
            fields: r.get(7),
        };
        let hash = chain_hash(&prev, id, at_us, &e);
        ndc.execute(
            "INSERT INTO dongbo.audit_log VALUES ($1, $2::int8, to_timestamp($2::int8 / 1e6), $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[&id, &at_us, &e.subscription, &e.subscriber, &e.purpose, &e.channel, &e.citizen_id, &e.event_id, &e.fields, &prev, &hash],
        )
        .await?;
        prev = hash;
    }
    ndc.execute("UPDATE dongbo.audit_head SET last_id = 2, hash = $1", &[&prev]).await?;

    // Every link in the NDC holds, yet verify names the rewrite.
    let (code, out) = verify_cli(&d)?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("signed checkpoint"), "{out}");
    let (status, report) = admin(admin_port, reqwest::Method::GET, &format!("/audit/citizens/{b}"), None).await?;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["verification"]["intact"], false, "{report}");
    let reported = report["deliveries"].as_array().context("a list")?.len();
    assert_eq!(reported, 0, "entries no intact checkpoint anchors are not reported as facts: {report}");
    // The hub refuses to sign the rewritten chain.
    d.hub.as_ref().context("hub")?.wait_for_log("no longer holds the checkpoint", Duration::from_secs(20)).await?;
    let last_line = std::fs::read_to_string(&checkpoints)?.lines().last().unwrap_or_default().to_string();
    assert!(last_line.contains("\"last_id\":5"), "no checkpoint signed over the rewrite: {last_line}");
    Ok(())
}
