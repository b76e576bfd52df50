//! Fan-out fixtures: hub.toml declarations for the citizens table (dictionary, `residence.changed`,
//! three purposes and their subscribers) and an in-process webhook receiver that records what it
//! gets and can be told to fail.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::http::StatusCode;
use dongbo_subscribers::Received;

/// The admin token of test hubs.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The webhook secret of test subscriptions.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";
/// Subscriber tokens: social insurance, health insurance, education.
pub const BHXH_TOKEN: &str = "bhxh-token";
/// Health insurance's token.
pub const BHYT_TOKEN: &str = "bhyt-token";
/// Education's token.
pub const MOET_TOKEN: &str = "moet-token";

/// Declarations shared by the fan-out scenarios: the admin API on `admin_port`, the dictionary,
/// the event rule, purposes and subscribers (subscriptions are added by each scenario).
pub fn declarations(admin_port: u16) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[[dictionary]]
table = "public.citizens"
citizen_id = "citizen_id"
fields = ["citizen_id", "full_name", "birth_date", "gender", "province_code", "commune_code", "address",
          "residence_kind", "income", "note"]

[[events]]
name = "residence.changed"
table = "public.citizens"
watch = ["commune_code", "address"]
carry = ["residence_kind", "province_code"]

[[purposes]]
id = "social-insurance"
description = "Social insurance contributions and benefits (Law on Social Insurance 41/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "previous.commune_code", "current.commune_code", "effective_at",
                       "province_code", "residence_kind"]

[[purposes]]
id = "health-insurance"
description = "Health insurance card registration place (Law on Health Insurance 51/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "current.commune_code", "current.address", "province_code"]

[[purposes]]
id = "education"
description = "School enrolment by residence (Law on Education 43/2019/QH14)"
[purposes.allows]
"residence.changed" = ["citizen_id", "current.commune_code", "province_code"]
"public.citizens" = ["citizen_id", "full_name", "birth_date", "commune_code", "province_code"]

[[subscribers]]
id = "bhxh"
token = "{BHXH_TOKEN}"

[[subscribers]]
id = "bhyt"
token = "{BHYT_TOKEN}"

[[subscribers]]
id = "moet"
token = "{MOET_TOKEN}"
"#
    )
}

/// A webhook subscription definition in TOML.
pub fn webhook_subscription(id: &str, url: &str, fields: &[&str], max_attempts: u32) -> String {
    let fields: Vec<String> = fields.iter().map(|f| format!("\"{f}\"")).collect();
    format!(
        r#"
[[subscriptions]]
id = "{id}"
subscriber = "bhyt"
purpose = "health-insurance"
follow = ["residence.changed"]
fields = [{}]
delivery = {{ kind = "webhook", url = "{url}", secret = "{WEBHOOK_SECRET}", max_attempts = {max_attempts}, initial_backoff_ms = 20, max_backoff_ms = 100 }}
"#,
        fields.join(", ")
    )
}

/// A gRPC subscription definition in TOML.
pub fn grpc_subscription(
    id: &str,
    subscriber: &str,
    purpose: &str,
    follow: &[&str],
    fields: &[&str],
    filter: Option<&str>,
) -> String {
    let list = |xs: &[&str]| xs.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ");
    let filter = filter.map(|f| format!("filter = \"{f}\"\n")).unwrap_or_default();
    format!(
        "\n[[subscriptions]]\nid = \"{id}\"\nsubscriber = \"{subscriber}\"\npurpose = \"{purpose}\"\nfollow = [{}]\nfields = [{}]\n{filter}delivery = {{ kind = \"grpc\" }}\n",
        list(follow),
        list(fields)
    )
}

/// The social-insurance subscriber's `bhxh-residence` subscription (gRPC, `residence.changed`)
/// receiving `fields`.
pub fn bhxh_residence(fields: &[&str]) -> String {
    grpc_subscription("bhxh-residence", "bhxh", "social-insurance", &["residence.changed"], fields, None)
}

/// An in-process webhook receiver.
#[derive(Clone, Default)]
pub struct Receiver {
    /// Records accepted, in arrival order.
    pub accepted: Arc<Mutex<Vec<Received>>>,
    /// Requests answered with 500 while `failing`.
    pub refused: Arc<AtomicUsize>,
    /// Answer 500 to everything.
    pub failing: Arc<AtomicBool>,
    /// When each accepted record arrived, microseconds since the epoch.
    pub arrivals: Arc<Mutex<Vec<i64>>>,
}

impl Receiver {
    /// Starts receiving on a free port; returns the URL to give the hub.
    pub async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/dongbo", listener.local_addr()?);
        let me = self.clone();
        tokio::spawn(dongbo_subscribers::webhook::serve(listener, WEBHOOK_SECRET.as_bytes().to_vec(), move |r| {
            let me = me.clone();
            async move {
                if me.failing.load(Ordering::SeqCst) {
                    me.refused.fetch_add(1, Ordering::SeqCst);
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
                me.arrivals.lock().expect("receiver lock").push(now as i64);
                me.accepted.lock().expect("receiver lock").push(r);
                StatusCode::OK
            }
        }));
        Ok(url)
    }

    /// Waits until at least `n` records were accepted; returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.accepted.lock().expect("receiver lock").clone();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("webhook receiver got {} of {n} records within {timeout:?}", got.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads from a gRPC subscription until `n` records arrived (acknowledging as it goes).
pub async fn collect(
    sub: &mut dongbo_subscribers::grpc::Subscription,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Received>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, sub.next()).await else {
            bail!("gRPC subscriber got {} of {n} records within {timeout:?}: {got:?}", got.len());
        };
        let Some(batch) = next? else { bail!("the hub ended the stream after {} records", got.len()) };
        if let Some(last) = batch.last() {
            sub.ack(&last.resume_token).await?;
        }
        got.extend(batch);
    }
    Ok(got)
}

/// Polls a subscription's dead letters until there are `n` (or `timeout` passes); returns them.
pub async fn wait_dead_letters(
    admin_port: u16,
    subscription: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = format!("/subscriptions/{subscription}/dead-letters");
    let deadline = Instant::now() + timeout;
    loop {
        let (_, l) = admin(admin_port, reqwest::Method::GET, &path, None).await?;
        let letters = l.as_array().cloned().unwrap_or_default();
        if letters.len() == n || Instant::now() > deadline {
            return Ok(letters);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Calls the hub's admin API; returns (status, JSON body).
pub async fn admin(
    port: u16,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let resp = loop {
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut req = reqwest::Client::new().request(method.clone(), url).bearer_auth(ADMIN_TOKEN);
        if let Some(b) = &body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) => break r,
            // A hub just started may not accept yet.
            Err(e) if e.is_connect() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("admin API {path}: {e:#}"),
        }
    };
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
}

/// A webhook receiver answering 500 (until its `failing` is cleared) and the admin port of a hub
/// serving one subscription to it.
pub struct FailingWebhook {
    /// The receiver.
    pub receiver: Receiver,
    /// The hub's admin API port.
    pub admin_port: u16,
}

/// Starts `d`'s hub, with the admin API and subscription `bhyt-residence` (two attempts per record)
/// to a failing receiver, and its agent; returns once the NDC holds the source's citizens.
pub async fn start_with_failing_webhook(d: &mut crate::Deployment) -> anyhow::Result<FailingWebhook> {
    let receiver = Receiver::default();
    receiver.failing.store(true, Ordering::SeqCst);
    let url = receiver.start().await?;
    let admin_port = crate::pg::free_port();
    d.fanout_toml =
        declarations(admin_port) + &webhook_subscription("bhyt-residence", &url, &["citizen_id", "current.address"], 2);
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    Ok(FailingWebhook { receiver, admin_port })
}

/// Runs `dongbo-hub quarantine ARGS` against the admin API on `admin_port`; its success and output.
pub fn quarantine_cli(admin_port: u16, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(crate::procs::binary("dongbo-hub")?)
        .args(["quarantine", "--admin", &format!("http://127.0.0.1:{admin_port}")])
        .args(args)
        .env("DONGBO_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}
