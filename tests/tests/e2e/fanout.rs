//! Fan-out: `residence.changed` from a provincial source to subscribers over gRPC and webhook, each
//! with only its purpose's fields; resume after disconnects and a hub `kill -9`; webhook retries,
//! dead letters and replay; the audit log's citizen query and tamper detection; refused
//! subscriptions.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use dongbo_subscribers::grpc::Subscription;
use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{
    admin, collect, declarations, grpc_subscription, webhook_subscription, Receiver, BHXH_TOKEN, MOET_TOKEN,
};
use dongbo_tests::{pg, Deployment};
use serde_json::{json, Value};
use tokio_postgres::Client;

async fn relocate(src: &Client, id: &str, province: &str, commune: &str, address: &str) -> anyhow::Result<()> {
    let n = src
        .execute(
            "UPDATE citizens SET province_code = $2, commune_code = $3, address = $4 WHERE citizen_id = $1",
            &[&id, &province, &commune, &address],
        )
        .await?;
    anyhow::ensure!(n == 1, "citizen {id} not found");
    Ok(())
}

fn keys(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (k, inner) in v.as_object().expect("records are objects") {
        match inner.as_object() {
            Some(m) => out.extend(m.keys().map(|i| format!("{k}.{i}"))),
            None => {
                out.insert(k.clone());
            }
        }
    }
    out
}

fn set(xs: &[&str]) -> BTreeSet<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

async fn hub_url(d: &Deployment) -> String {
    format!("http://127.0.0.1:{}", d.hub_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residence_change_reaches_each_subscriber_with_only_its_fields_and_is_audited() -> anyhow::Result<()> {
    let mut d = Deployment::new("fanout", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let ids = insert_citizens(&src, &mut CitizenGen::new(7), 300).await?;
    let receiver = Receiver::default();
    let url = receiver.start().await?;
    let admin_port = pg::free_port();
    d.fanout_toml = declarations(admin_port)
        + &grpc_subscription(
            "bhxh-residence",
            "bhxh",
            "social-insurance",
            &["residence.changed"],
            &["citizen_id", "previous.commune_code", "current.commune_code", "effective_at"],
            None,
        )
        + &webhook_subscription("bhyt-residence", &url, &["citizen_id", "current.commune_code", "current.address"], 5)
        + &grpc_subscription(
            "moet-hcm",
            "moet",
            "education",
            &["residence.changed", "public.citizens"],
            &["citizen_id", "current.commune_code", "full_name", "commune_code"],
            Some("province_code = '79'"),
        );
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let url = hub_url(&d).await;
    let mut bhxh = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 64).await?;
    let mut moet = Subscription::open(&url, MOET_TOKEN, "moet-hcm", None, 64).await?;

    // The initial load reaches table followers too: every row of province 79, as op "snapshot".
    let in_79: i64 = src.query_one("SELECT count(*) FROM citizens WHERE province_code = '79'", &[]).await?.get(0);
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let before_a: String = src.query_one("SELECT commune_code FROM citizens WHERE citizen_id = $1", &[a]).await?.get(0);
    // b changes only columns no rule watches (into province 79, so education sees the row): no
    // event. c moves out of province 79.
    src.execute(
        "UPDATE citizens SET income = income + 1, note = 'x', province_code = '79' WHERE citizen_id = $1",
        &[b],
    )
    .await?;
    relocate(&src, a, "79", "26734", "12 Lê Lợi, phường Sài Gòn").await?;
    relocate(&src, c, "01", "00004", "5 Hàng Bài, phường Hoàn Kiếm").await?;

    let got = collect(&mut bhxh, 2, Duration::from_secs(30)).await?;
    let by_citizen: HashMap<&str, &Value> =
        got.iter().map(|r| (r.body["citizen_id"].as_str().unwrap_or_default(), &r.body)).collect();
    assert!(!by_citizen.contains_key(b.as_str()), "a change of unwatched columns raised an event: {got:?}");
    let ev = by_citizen[a.as_str()];
    assert_eq!(
        keys(ev),
        set(&["event_id", "event", "citizen_id", "previous.commune_code", "current.commune_code", "effective_at"])
    );
    assert_eq!(ev["event"], "residence.changed");
    assert_eq!(ev["previous"]["commune_code"], json!(before_a));
    assert_eq!(ev["current"]["commune_code"], "26734");
    assert_eq!(by_citizen[c.as_str()]["current"]["commune_code"], "00004");

    let hooks = receiver.wait_for(2, Duration::from_secs(30)).await?;
    for h in &hooks {
        assert_eq!(keys(&h.body), set(&["event_id", "event", "citizen_id", "current.commune_code", "current.address"]));
    }
    // Webhooks keep order per citizen, not across citizens (several POSTs are in flight).
    let hook_a =
        hooks.iter().find(|h| h.body["citizen_id"] == json!(a)).context("no webhook for the citizen who moved")?;
    assert_eq!(hook_a.body["current"]["address"], "12 Lê Lợi, phường Sài Gòn");

    // Education follows the table and the event, filtered to province 79: b's row change and a's
    // row change and event; c (now in 01) not at all. Its table records carry no income or note.
    let all = collect(&mut moet, in_79 as usize + 3, Duration::from_secs(30)).await?;
    let (snapshot, edu): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| r.body["op"] == "snapshot");
    assert_eq!(snapshot.len() as i64, in_79);
    assert!(snapshot
        .iter()
        .all(|r| keys(&r.body) == set(&["event_id", "table", "op", "citizen_id", "full_name", "commune_code"])));
    let summary: Vec<(String, String)> =
        edu.iter().map(|r| (r.name.clone(), r.body["citizen_id"].as_str().unwrap_or_default().to_string())).collect();
    assert_eq!(
        summary,
        vec![
            ("public.citizens".into(), b.clone()),
            ("public.citizens".into(), a.clone()),
            ("residence.changed".into(), a.clone())
        ]
    );
    assert_eq!(keys(&edu[0].body), set(&["event_id", "table", "op", "citizen_id", "full_name", "commune_code"]));
    assert_eq!(keys(&edu[2].body), set(&["event_id", "event", "citizen_id", "current.commune_code"]));
    assert!(edu.iter().all(|r| r.body["citizen_id"] != json!(c)));

    // The audit log answers "who received my data": a's data went to all three, for their purposes.
    let (status, report) = admin(admin_port, reqwest::Method::GET, &format!("/audit/citizens/{a}"), None).await?;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["verification"]["intact"], true, "{report}");
    let mut seen: Vec<(String, String, String)> = report["deliveries"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|l| (l["subscriber"].to_string(), l["purpose"].to_string(), l["channel"].to_string()))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        vec![
            ("\"bhxh\"".into(), "\"social-insurance\"".into(), "\"grpc\"".into()),
            ("\"bhyt\"".into(), "\"health-insurance\"".into(), "\"webhook\"".into()),
            ("\"moet\"".into(), "\"education\"".into(), "\"grpc\"".into()),
        ]
    );
    let line = &report["deliveries"][0];
    assert!(line["purpose_description"].as_str().is_some_and(|s| !s.is_empty()));

    // Editing one entry in storage is detected, and the first broken link is named.
    let (_, ok) = admin(admin_port, reqwest::Method::GET, "/audit/verify", None).await?;
    assert_eq!(ok["intact"], true, "{ok}");
    let n = ok["entries_checked"].as_i64().unwrap_or(0);
    assert!(n >= 6, "{ok}");
    let ndc = d.ndc().await?;
    ndc.execute("UPDATE dongbo.audit_log SET purpose = 'marketing' WHERE id = 3", &[]).await?;
    let (_, broken) = admin(admin_port, reqwest::Method::GET, "/audit/verify", None).await?;
    assert_eq!(broken["intact"], false, "{broken}");
    assert_eq!(broken["first_broken"]["entry"], 3, "{broken}");
    assert!(broken["first_broken"]["problem"].as_str().unwrap_or_default().contains("edited"), "{broken}");
    // Deleting one is detected too (after undoing the edit by restoring the original text).
    ndc.execute("UPDATE dongbo.audit_log SET purpose = (SELECT purpose FROM dongbo.audit_log WHERE id = 4) WHERE id = 3 AND subscription = (SELECT subscription FROM dongbo.audit_log WHERE id = 4)", &[]).await?;
    ndc.execute("DELETE FROM dongbo.audit_log WHERE id = 2", &[]).await?;
    let cli = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .args(["audit", "--config", &d.dir.join("hub.toml").to_string_lossy(), "verify"])
        .output()?;
    let out = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(cli.status.code(), Some(2), "{out}");
    assert!(out.contains("BROKEN at entry 2") && out.contains("missing (deleted)"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_away_during_10_000_changes_and_hub_killed_resumes_with_none_lost_in_citizen_order(
) -> anyhow::Result<()> {
    let mut d = Deployment::new("fanoutresume", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let ids = insert_citizens(&src, &mut CitizenGen::new(11), 500).await?;
    let fields = ["citizen_id", "previous.commune_code", "current.commune_code"];
    d.fanout_toml = declarations(pg::free_port())
        + &grpc_subscription("bhxh-residence", "bhxh", "social-insurance", &["residence.changed"], &fields, None);
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;

    let mut start: HashMap<String, String> = HashMap::new();
    for r in src.query("SELECT citizen_id, commune_code FROM citizens", &[]).await? {
        start.insert(r.get(0), r.get(1));
    }
    // 10 000 moves, 10 per transaction, each to a commune other than the citizen's current one.
    let communes = dongbo_tests::citizens::communes();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut plan = Vec::new();
    let mut current = start.clone();
    for n in 0..10_000usize {
        let id = ids[(n * 37) % ids.len()].clone();
        let mut k = (n * 7919) % communes.len();
        while communes[k].code == current[&id] {
            k = (k + 1) % communes.len();
        }
        let c = &communes[k];
        current.insert(id.clone(), c.code.clone());
        expected.entry(id.clone()).or_default().push(c.code.clone());
        plan.push((id, c.province.clone(), c.code.clone(), format!("{n} đường Số {n}")));
    }
    let writer = d.source().await?;
    let writes = tokio::spawn(async move {
        for chunk in plan.chunks(10) {
            writer.batch_execute("BEGIN").await?;
            for (id, p, c, a) in chunk {
                relocate(&writer, id, p, c, a).await?;
            }
            writer.batch_execute("COMMIT").await?;
        }
        anyhow::Ok(())
    });

    let url = hub_url(&d).await;
    let mut got = Vec::new();
    let mut sub = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 128).await?;
    got.extend(collect(&mut sub, 1_000, Duration::from_secs(60)).await?);
    // Away without acknowledging what is in flight, while the writes go on; the hub dies meanwhile.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.hub.as_mut().expect("hub").kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.start_hub().await?;
    writes.await??;
    let mut sub = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 128).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut unique = BTreeSet::new();
    got.retain(|r| unique.insert(r.event_id.clone()));
    while unique.len() < 10_000 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "only {} of 10 000 events arrived", unique.len());
        let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await? else {
            anyhow::bail!("the stream stalled after {} events", unique.len());
        };
        if let Some(last) = batch.last() {
            sub.ack(&last.resume_token).await?;
        }
        for r in batch {
            if unique.insert(r.event_id.clone()) {
                got.push(r);
            }
        }
    }
    // Per citizen, exactly the moves made, in the order made, each linking to the one before.
    let mut seen: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for r in &got {
        let id = r.body["citizen_id"].as_str().unwrap_or_default().to_string();
        let prev = r.body["previous"]["commune_code"].as_str().unwrap_or_default().to_string();
        let cur = r.body["current"]["commune_code"].as_str().unwrap_or_default().to_string();
        seen.entry(id).or_default().push((prev, cur));
    }
    assert_eq!(seen.len(), expected.len());
    for (id, moves) in &expected {
        let events = &seen[id];
        let currents: Vec<&String> = events.iter().map(|(_, c)| c).collect();
        assert_eq!(currents, moves.iter().collect::<Vec<_>>(), "citizen {id}: events out of order or missing");
        let mut before = &start[id];
        for (prev, cur) in events {
            assert_eq!(prev, before, "citizen {id}: previous residence does not link");
            before = cur;
        }
    }
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_webhook_retries_then_dead_letters_then_replay_delivers_in_citizen_order() -> anyhow::Result<()> {
    let mut d = Deployment::new("fanoutdlq", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let ids = insert_citizens(&src, &mut CitizenGen::new(13), 50).await?;
    let receiver = Receiver::default();
    receiver.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let url = receiver.start().await?;
    let admin_port = pg::free_port();
    d.fanout_toml =
        declarations(admin_port) + &webhook_subscription("bhyt-residence", &url, &["citizen_id", "current.address"], 3);
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;

    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    relocate(&src, a, "79", "26734", "1 first move of a").await?;
    relocate(&src, b, "79", "26737", "1 only move of b").await?;
    relocate(&src, a, "79", "26740", "2 second move of a").await?;
    // a's first and b's move fail 3 times each and are dead-lettered; a's second waits behind a's first.
    let path = "/subscriptions/bhyt-residence/dead-letters";
    let letters =
        dongbo_tests::fanout::wait_dead_letters(admin_port, "bhyt-residence", 3, Duration::from_secs(30)).await?;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0]["body"]["citizen_id"], json!(a));
    assert_eq!(letters[0]["attempts"], 3);
    assert!(letters[0]["reason"].as_str().unwrap_or_default().contains("500"), "{letters:?}");
    assert_eq!(letters[2]["body"]["current"]["address"], "2 second move of a");
    assert!(letters[2]["reason"].as_str().unwrap_or_default().contains("held behind"), "{letters:?}");
    assert!(receiver.refused.load(std::sync::atomic::Ordering::SeqCst) >= 6);

    // The receiver recovers: new records flow at once; the dead letters wait for the operator.
    receiver.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    relocate(&src, c, "79", "26743", "1 only move of c").await?;
    let first = receiver.wait_for(1, Duration::from_secs(30)).await?;
    assert_eq!(first[0].body["citizen_id"], json!(c));

    // Replay through the CLI, as an operator would.
    let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .args(["dead-letters", "--admin", &format!("http://127.0.0.1:{admin_port}"), "replay", "bhyt-residence"])
        .env("DONGBO_ADMIN_TOKEN", dongbo_tests::fanout::ADMIN_TOKEN)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("\"delivered\": 3"), "{text}");
    let all = receiver.wait_for(4, Duration::from_secs(10)).await?;
    let order: Vec<String> =
        all[1..].iter().map(|r| r.body["current"]["address"].as_str().unwrap_or_default().into()).collect();
    assert_eq!(order, vec!["1 first move of a", "1 only move of b", "2 second move of a"]);
    let (_, left) = admin(admin_port, reqwest::Method::GET, path, None).await?;
    assert_eq!(left, json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_outside_their_purpose_are_refused_at_run_time_and_in_the_config() -> anyhow::Result<()> {
    let mut d = Deployment::new("fanoutrefuse", CITIZENS_DDL, &["public.citizens"]).await?;
    let admin_port = pg::free_port();
    d.fanout_toml = declarations(admin_port);
    d.start_hub().await?;
    let mut def = json!({
        "id": "moet-residence", "subscriber": "moet", "purpose": "education",
        "follow": ["residence.changed"], "fields": ["citizen_id", "current.address"],
        "delivery": {"kind": "grpc"}
    });
    let (status, body) = admin(admin_port, reqwest::Method::POST, "/subscriptions", Some(def.clone())).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("field current.address is outside purpose education"), "{body}");
    def["fields"] = json!(["citizen_id", "current.commune_code"]);
    def["filter"] = json!("province_code = ");
    let (status, body) = admin(admin_port, reqwest::Method::POST, "/subscriptions", Some(def.clone())).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("filter does not parse"), "{body}");
    def["filter"] = json!("province_code = '79'");
    let (status, body) = admin(admin_port, reqwest::Method::POST, "/subscriptions", Some(def.clone())).await?;
    assert_eq!(status, 201, "{body}");
    let (_, list) = admin(admin_port, reqwest::Method::GET, "/subscriptions", None).await?;
    assert_eq!(list[0]["id"], "moet-residence", "{list}");
    assert_eq!(list[0]["origin"], "api", "{list}");
    // It survives a restart of the hub.
    d.hub.as_mut().expect("hub").stop();
    d.start_hub().await?;
    let (_, list) = admin(admin_port, reqwest::Method::GET, "/subscriptions", None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // In hub.toml, the hub refuses to start and says why.
    d.hub.as_mut().expect("hub").stop();
    d.fanout_toml = declarations(admin_port)
        + &grpc_subscription("bad", "moet", "education", &["residence.changed"], &["income"], None);
    let err = d.start_hub().await.expect_err("a hub with a subscription outside its purpose must not start");
    assert!(err.to_string().contains("unknown field income in residence.changed"), "{err}");
    Ok(())
}
