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
    // The agent may send citizens only: anything else it sends is quarantined, an entry the
    // quarantine calls below can aim at.
    d.start_hub_with(&format!("{}tables = [\"public.citizens\"]\n", d.default_agents_toml())).await?;
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

    quarantine_calls_hold_roles_and_limits(&d, admin_port).await?;

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

/// The quarantine's admin calls, spoken directly as a hostile or mistaken client would: roles hold,
/// malformed or oversized filters are refused with a reason, filter text never acts as SQL or as a
/// pattern, and none of it resolves the entry.
async fn quarantine_calls_hold_roles_and_limits(d: &Deployment, admin_port: u16) -> anyhow::Result<()> {
    let secrets = dongbo_tests::hostile::schema("public", "secrets", &[("id", "int4"), ("v", "text")]);
    let batch =
        dongbo_tests::hostile::message(&d.source_id, vec![dongbo_tests::hostile::insert(1, &secrets, &["1", "x"])]);
    send(d.hub_port, TOKEN, &d.source_id, vec![batch], 1).await?;
    let admin = dongbo_tests::fanout::ADMIN_TOKEN;
    let call = |method: reqwest::Method, path: &str, token: Option<&str>, body: String| {
        let mut req = reqwest::Client::new()
            .request(method, format!("http://127.0.0.1:{admin_port}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move {
            let resp = req.send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.text().await?))
        }
    };
    let get = |path: &str, token: Option<&str>| call(reqwest::Method::GET, path, token, String::new());
    let post = |path: &str, token: Option<&str>, body: &str| call(reqwest::Method::POST, path, token, body.to_string());
    let unresolved = || async {
        let (status, body) = get("/quarantine", Some(admin)).await?;
        anyhow::ensure!(status == 200, "{status} {body}");
        let entries: Vec<serde_json::Value> = serde_json::from_str(&body)?;
        anyhow::Ok(entries.iter().filter(|e| e["resolved_at"].is_null()).count())
    };
    assert_eq!(unresolved().await?, 1, "the refused insert is quarantined");

    let (status, body) = get("/quarantine", Some(VIEWER_TOKEN)).await?;
    assert_eq!(status, 200, "a reader lists: {body}");
    assert!(body.contains("public.secrets"), "{body}");
    assert_eq!(get(&format!("/quarantine/{}/1", d.source_id), Some(VIEWER_TOKEN)).await?.0, 200);
    assert_eq!(get("/quarantine", None).await?.0, 401);
    assert_eq!(get("/quarantine", Some(BHXH_TOKEN)).await?.0, 403, "a subscriber is no operator");
    let all = r#"{"all": true}"#;
    let drop_all = r#"{"filter": {"all": true}, "reason": "hostile"}"#;
    for token in [None, Some("nobody"), Some(BHXH_TOKEN), Some(TOKEN), Some(VIEWER_TOKEN)] {
        // Known peers of the wrong kind or role are forbidden; unknown ones unauthenticated.
        let expected = if token.is_some_and(|t| t != "nobody") { 403 } else { 401 };
        assert_eq!(post("/quarantine/replay", token, all).await?.0, expected, "replay with {token:?}");
        assert_eq!(post("/quarantine/drop", token, drop_all).await?.0, expected, "drop with {token:?}");
    }

    // The admin role gets past authorisation to the request's own problems, each named.
    let too_many = serde_json::json!({ "agent": d.source_id, "seqs": (1..=10_001).collect::<Vec<u64>>() }).to_string();
    let long_reason = serde_json::json!({ "reason": "x".repeat(5000) }).to_string();
    for (path, body, says) in [
        ("/quarantine/replay", "{not json", "not valid JSON"),
        ("/quarantine/replay", r#"{"agent": "hcm-population", "where": "1=1"}"#, "unknown field"),
        ("/quarantine/replay", r#"{"seqs": [1]}"#, "name the agent"),
        ("/quarantine/replay", "{}", "say which entries"),
        ("/quarantine/replay", r#"{"all": true, "resolved": true}"#, "resolved entry"),
        ("/quarantine/replay", r#"{"agent": "hcm-population", "seqs": [-1]}"#, "not valid JSON"),
        ("/quarantine/replay", too_many.as_str(), "at most 10000"),
        ("/quarantine/replay", long_reason.as_str(), "over 1024 bytes"),
        ("/quarantine/drop", r#"{"filter": {"all": true}, "reason": "  "}"#, "needs a reason"),
        ("/quarantine/drop", r#"{"filter": {"all": true}}"#, "missing field"),
    ] {
        let (status, text) = post(path, Some(admin), body).await?;
        assert_eq!(status, 400, "{path} {body:.80}: {text}");
        assert!(text.contains(says), "{path} {body:.80}: {text}");
    }
    // Filter text is a parameter matched as plain text: not SQL, not a LIKE pattern.
    for words in ["'; DROP TABLE dongbo.quarantine; --", "%", "_"] {
        let (status, text) = get(&format!("/quarantine?reason={}", urlencode(words)), Some(admin)).await?;
        assert_eq!((status, text.as_str()), (200, "[]"), "reason words {words:?}");
    }
    let (status, text) = post("/quarantine/drop", Some(admin), r#"{"filter": {"reason": "%"}, "reason": "r"}"#).await?;
    assert_eq!((status, text.as_str()), (200, "[]"), "a `%` drops nothing");
    assert_eq!(unresolved().await?, 1, "none of the refused calls resolved the entry");
    Ok(())
}

/// `s` as a query-string value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
