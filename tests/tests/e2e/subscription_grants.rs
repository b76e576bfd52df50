//! Subscriptions hold to their grant: on every delivery path a record carries only the fields its
//! purpose allows for *that* followed item, and source columns named like the envelope neither
//! overwrite it nor leak; a resume token cannot reach before the subscription's start; webhook
//! secrets never leave the hub; redirects are not followed; the example subscriber survives a hub
//! restart.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use dongbo_subscribers::grpc::Subscription;
use dongbo_tests::citizens::{insert_citizens, move_citizen, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{
    admin, bhxh_residence, collect, declarations, grpc_subscription, wait_dead_letters, Receiver, BHXH_TOKEN,
    MOET_TOKEN, WEBHOOK_SECRET,
};
use dongbo_tests::{pg, Deployment};
use serde_json::Value;

/// A purpose granting `province_code` for the event but not the table, `commune_code` the other way.
const STATISTICS: &str = r#"
[[purposes]]
id = "statistics"
description = "Population statistics (Law on Statistics 89/2015/QH13)"
[purposes.allows]
"residence.changed" = ["citizen_id", "province_code", "current.commune_code"]
"public.citizens" = ["citizen_id", "commune_code"]
"#;

fn mixed(id: &str, delivery: &str) -> String {
    format!(
        "\n[[subscriptions]]\nid = \"{id}\"\nsubscriber = \"moet\"\npurpose = \"statistics\"\n\
         follow = [\"public.citizens\", \"residence.changed\"]\n\
         fields = [\"citizen_id\", \"province_code\", \"commune_code\", \"current.commune_code\", \"event\", \"op\"]\n\
         delivery = {delivery}\n"
    )
}

fn top_keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Each record holds exactly its item's grant plus the hub's envelope, whatever the row says.
fn assert_per_item(body: &Value) {
    let keys = top_keys(body);
    let set = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    if body.get("table").is_some() {
        assert_eq!(body["table"], "public.citizens", "{body}");
        if body["op"] == "truncate" {
            assert_eq!(keys, set(&["event_id", "table", "op"]), "{body}");
        } else {
            assert!(["snapshot", "insert", "update"].contains(&body["op"].as_str().unwrap_or_default()), "{body}");
            assert_eq!(keys, set(&["event_id", "table", "op", "citizen_id", "commune_code"]), "{body}");
        }
    } else {
        assert_eq!(body["event"], "residence.changed", "{body}");
        assert_eq!(keys, set(&["event_id", "event", "citizen_id", "province_code", "current"]), "{body}");
    }
    assert!(!body.to_string().contains("forged"), "a source column reached the record: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_table_and_event_subscriptions_get_per_item_fields_on_grpc_and_webhook() -> anyhow::Result<()> {
    // Source columns named like the envelope, holding values that must never be delivered.
    let ddl = format!(
        "{CITIZENS_DDL}\nALTER TABLE citizens ADD COLUMN event text DEFAULT 'forged.event', \
         ADD COLUMN op text DEFAULT 'forged-op', ADD COLUMN event_id text DEFAULT 'forged-id';"
    );
    let mut d = Deployment::new("grants", &ddl, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(31);
    let ids = insert_citizens(&src, &mut gen, 5).await?;
    let receiver = Receiver::default();
    let url = receiver.start().await?;
    let webhook = format!(
        "{{ kind = \"webhook\", url = \"{url}\", secret = \"{WEBHOOK_SECRET}\", initial_backoff_ms = 20, max_backoff_ms = 100 }}"
    );
    d.fanout_toml = declarations(pg::free_port())
        + STATISTICS
        + &mixed("stats-grpc", "{ kind = \"grpc\" }")
        + &mixed("stats-webhook", &webhook);
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let mut sub =
        Subscription::open(&format!("http://127.0.0.1:{}", d.hub_port), MOET_TOKEN, "stats-grpc", None, 64).await?;
    move_citizen(&src, &mut gen, &ids[0]).await?;
    // The snapshot's truncate and 5 rows, then the move: its row change and its event.
    let grpc = collect(&mut sub, 8, Duration::from_secs(30)).await?;
    let hooks = receiver.wait_for(8, Duration::from_secs(30)).await?;
    for r in grpc.iter().chain(&hooks) {
        assert_per_item(&r.body);
    }
    assert_eq!(grpc.iter().filter(|r| r.body.get("event").is_some()).count(), 1);
    assert_eq!(hooks.iter().filter(|r| r.body.get("event").is_some()).count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_hold_to_their_start_secret_and_host_and_the_example_survives_a_hub_restart() -> anyhow::Result<()>
{
    let mut d = Deployment::new("grantstart", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(32);
    let ids = insert_citizens(&src, &mut gen, 5).await?;
    // A receiver that redirects every delivery to another host, which must never see one.
    let thief = Receiver::default();
    let thief_url = thief.start().await?;
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let redirect_url = format!("http://{}/hook", redirector.local_addr()?);
    let app = axum::Router::new().fallback(move || {
        let to = thief_url.clone();
        async move { (StatusCode::TEMPORARY_REDIRECT, [("location", to)]) }
    });
    tokio::spawn(async move { axum::serve(redirector, app).await });
    let admin_port = pg::free_port();
    d.fanout_toml = declarations(admin_port)
        + &bhxh_residence(&["citizen_id", "current.commune_code"])
        + &grpc_subscription("bhxh-example", "bhxh", "social-insurance", &["residence.changed"], &["citizen_id", "current.commune_code"], None)
        + &format!(
            "\n[[subscriptions]]\nid = \"bhyt-redirected\"\nsubscriber = \"bhyt\"\npurpose = \"health-insurance\"\n\
             follow = [\"residence.changed\"]\nfields = [\"citizen_id\"]\n\
             delivery = {{ kind = \"webhook\", url = \"{redirect_url}\", secret = \"{WEBHOOK_SECRET}\", max_attempts = 2, initial_backoff_ms = 20, max_backoff_ms = 50 }}\n"
        );
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let url = format!("http://127.0.0.1:{}", d.hub_port);

    // The example subscriber follows; two moves reach it.
    let example_log = d.dir.join("social-insurance.log");
    let token_file = d.dir.join("bhxh.token");
    std::fs::write(&token_file, format!("{BHXH_TOKEN}\n"))?;
    let mut example = dongbo_tests::procs::DongboProcess::spawn(
        "social-insurance",
        &[
            "--hub",
            &url,
            "--token-file",
            &token_file.to_string_lossy(),
            "--subscription",
            "bhxh-example",
            "--count",
            "3",
        ],
        &example_log,
    )?;
    let mut first = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 64).await?;
    move_citizen(&src, &mut gen, &ids[0]).await?;
    move_citizen(&src, &mut gen, &ids[1]).await?;
    let early = collect(&mut first, 2, Duration::from_secs(30)).await?;
    drop(first);

    // A subscription added later starts at the end of the log: an earlier token is refused.
    let late = serde_json::json!({
        "id": "bhxh-late", "subscriber": "bhxh", "purpose": "social-insurance",
        "follow": ["residence.changed"], "fields": ["citizen_id"], "delivery": {"kind": "grpc"}, "start": "now"
    });
    let (status, body) = admin(admin_port, reqwest::Method::POST, "/subscriptions", Some(late)).await?;
    assert_eq!(status, 201, "{body}");
    let refused = match Subscription::open(&url, BHXH_TOKEN, "bhxh-late", Some(&early[0].resume_token), 64).await {
        Ok(mut s) => s.next().await.err().map(|e| format!("{e:#}")).unwrap_or_default(),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("before subscription bhxh-late's start"), "{refused}");
    // The early subscription may still resume from its own records.
    let mut again = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", Some(&early[0].resume_token), 64).await?;
    assert_eq!(collect(&mut again, 1, Duration::from_secs(10)).await?[0].event_id, early[1].event_id);
    drop(again);

    // The secret never leaves the hub: not in the admin API, not in its log.
    let (_, listed) = admin(admin_port, reqwest::Method::GET, "/subscriptions", None).await?;
    assert!(listed.to_string().contains("bhyt-redirected"), "{listed}");
    assert!(!listed.to_string().contains(WEBHOOK_SECRET), "the admin API returned the webhook secret: {listed}");

    // Redirects are not followed: the deliveries are dead-lettered and the other host saw none.
    let letters = wait_dead_letters(admin_port, "bhyt-redirected", 2, Duration::from_secs(30)).await?;
    assert!(
        letters.len() == 2 && letters.iter().all(|l| l.to_string().contains("does not follow redirects")),
        "{letters:?}"
    );
    assert_eq!(thief.accepted.lock().map(|a| a.len()).unwrap_or(1), 0, "a redirect was followed");

    // The hub restarts; the example reconnects by itself and gets the next move.
    if let Some(h) = d.hub.as_mut() {
        h.kill9();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.start_hub().await?;
    move_citizen(&src, &mut gen, &ids[2]).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while example.is_running() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the example did not get 3 records:\n{}",
            example.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let printed = example.log_text();
    assert_eq!(printed.matches("[social-insurance] residence.changed").count(), 3, "{printed}");
    assert!(printed.contains("reconnecting"), "{printed}");
    for log in [d.dir.join("hub.log"), example_log] {
        assert!(!std::fs::read_to_string(log)?.contains(WEBHOOK_SECRET), "a log holds the webhook secret");
    }
    example.kill9();
    Ok(())
}
