//! One identity per connection, of one kind: an agent's token cannot subscribe, a subscriber's
//! cannot ingest or open another subscriber's subscription, a read-only operator can look but not
//! change; each refusal says why and is logged with the peer's address, never with the token.

use std::time::Duration;

use dongbo_tests::citizens::CITIZENS_DDL;
use dongbo_tests::fanout::{bhxh_residence, declarations, BHXH_TOKEN, MOET_TOKEN};
use dongbo_tests::hostile::send;
use dongbo_tests::{pg, Deployment, TOKEN};

const VIEWER_TOKEN: &str = "viewer-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_identify_one_peer_of_one_kind_and_operator_roles_hold() -> anyhow::Result<()> {
    let mut d = Deployment::new("identities", CITIZENS_DDL, &["public.citizens"]).await?;
    let admin_port = pg::free_port();
    d.fanout_toml = declarations(admin_port)
        + &bhxh_residence(&["citizen_id"])
        + &format!("\n[[admin.operators]]\nid = \"dashboard\"\ntoken = \"{VIEWER_TOKEN}\"\nrole = \"read\"\n");
    d.hub_env = vec![("DONGBO_LOG_FORMAT".into(), "json".into())];
    d.start_hub().await?;
    let url = format!("http://127.0.0.1:{}", d.hub_port);

    // An agent's token on the Subscribe stream, a subscriber's on Ingest.
    let err = dongbo_subscribers::grpc::Subscription::open(&url, TOKEN, "bhxh-residence", None, 8).await.err();
    let err = format!("{err:#?}");
    assert!(err.contains("PermissionDenied") && err.contains("agent hcm-population"), "{err}");
    let err = send(d.hub_port, BHXH_TOKEN, &d.source_id, vec![], 1).await.unwrap_err();
    assert!(format!("{err:#}").contains("identifies subscriber bhxh"), "{err:#}");
    // Subscriber moet opening bhxh's subscription.
    let err = dongbo_subscribers::grpc::Subscription::open(&url, MOET_TOKEN, "bhxh-residence", None, 8).await.err();
    assert!(format!("{err:#?}").contains("belongs to another subscriber"), "{err:#?}");

    // A read-only operator reads, and is refused every change.
    let call = |method: reqwest::Method, path: &str, token: &str| {
        let req =
            reqwest::Client::new().request(method, format!("http://127.0.0.1:{admin_port}{path}")).bearer_auth(token);
        async move { anyhow::Ok(req.json(&serde_json::json!({})).send().await?.status().as_u16()) }
    };
    assert_eq!(call(reqwest::Method::GET, "/subscriptions", VIEWER_TOKEN).await?, 200);
    assert_eq!(call(reqwest::Method::GET, "/audit/verify", VIEWER_TOKEN).await?, 200);
    assert_eq!(call(reqwest::Method::POST, "/subscriptions", VIEWER_TOKEN).await?, 403);
    assert_eq!(call(reqwest::Method::DELETE, "/subscriptions/bhxh-residence", VIEWER_TOKEN).await?, 403);
    assert_eq!(
        call(reqwest::Method::POST, "/subscriptions/bhxh-residence/dead-letters/replay", VIEWER_TOKEN).await?,
        403
    );
    assert_eq!(call(reqwest::Method::GET, "/subscriptions", BHXH_TOKEN).await?, 403, "a subscriber is no operator");
    assert_eq!(call(reqwest::Method::GET, "/subscriptions", "nobody").await?, 401);
    assert_eq!(
        call(reqwest::Method::POST, "/subscriptions", dongbo_tests::fanout::ADMIN_TOKEN).await?,
        400,
        "the admin role gets past authorisation to the definition's own problems"
    );

    // Refusals are logged with the peer, never with the token.
    let hub = d.hub.as_ref().expect("hub running");
    hub.wait_for_log("subscriber credential refused", Duration::from_secs(5)).await?;
    let log = hub.log_text();
    // JSON lines with the stable top-level fields: what a log shipper keys on.
    let refusal: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "agent credential refused")
        .unwrap_or_else(|| panic!("no JSON line for the agent's refusal:\n{log}"));
    assert_eq!(refusal["level"], "WARN", "{refusal}");
    assert!(refusal["timestamp"].is_string() && refusal["target"].is_string(), "{refusal}");
    assert!(refusal["peer"].as_str().is_some_and(|p| p.contains("127.0.0.1:")), "{refusal}");
    assert!(refusal["reason"].as_str().is_some_and(|r| !r.is_empty()), "{refusal}");
    for secret in [TOKEN, BHXH_TOKEN, MOET_TOKEN, VIEWER_TOKEN, "nobody"] {
        assert!(!log.contains(secret), "the hub log holds a token");
    }

    // hash-token reads the token from standard input, not from the command line.
    let mut child = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"test\n")?;
    let out = child.wait_with_output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    Ok(())
}
