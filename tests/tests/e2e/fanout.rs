//! Fan-out: `residence.changed` from a provincial source to subscribers over gRPC and webhook, each
//! with only its purpose's fields; resume after disconnects and a hub `kill -9`; webhook retries,
//! dead letters and replay; the audit log's citizen query and tamper detection; refused
//! subscriptions.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

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
    assert_eq!(hooks[0].body["citizen_id"], json!(a));
    assert_eq!(hooks[0].body["current"]["address"], "12 Lê Lợi, phường Sài Gòn");

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
    let mut seen: Vec<(String, String, String)> = report
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
    let line = &report[0];
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
