//! The admin HTTP API for operators and `dongbo-hub` CLI commands: subscriptions at run time, dead
//! letters, and the audit log's verification and citizen query. Every call but `/healthz` needs an
//! operator's bearer token ([`crate::auth`]): role `read` for the GETs (Prometheus sends it as
//! `authorization: Bearer`), role `admin` to add or remove
//! a subscription and to replay dead letters. A refused call answers 401 (no or unknown token) or
//! 403 (a token of the wrong kind or role) and is logged without the token.
//!
//! | method | path | does |
//! | --- | --- | --- |
//! | GET | `/healthz` | liveness (no token) |
//! | GET | `/readyz` | readiness: the NDC answers (no token); 503 with the reason otherwise |
//! | GET | `/metrics` | Prometheus metrics ([`crate::metrics`]) |
//! | GET | `/fleet` | every configured agent and what the registry holds of it ([`crate::fleet`]) |
//! | GET | `/ui`, `/ui/…` | the dashboard ([`ui`]; a session cookie from `/ui/login`, not a bearer token) |
//! | GET | `/subscriptions` | list with positions and dead-letter counts |
//! | POST | `/subscriptions` | add (JSON definition); 400 lists every problem |
//! | DELETE | `/subscriptions/{id}` | remove one added at run time |
//! | GET | `/subscriptions/{id}/dead-letters` | list a webhook's dead letters |
//! | POST | `/subscriptions/{id}/dead-letters/replay` | re-deliver them |
//! | GET | `/audit/citizens/{citizen_id}` | who received this citizen's data, when, for what |
//! | GET | `/audit/verify` | check the hash chain |
//! | GET | `/quarantine?agent=&table=&rule=&reason=&resolved=` | quarantined changes ([`crate::quarantine`]) |
//! | GET | `/quarantine/{agent}/{seq}` | one, with its change |
//! | POST | `/quarantine/replay` | replay those a JSON filter selects: `{"entries": […], "more": …}` (role `admin`) |
//! | POST | `/quarantine/drop` | drop them, `{"filter": …, "reason": …}` (role `admin`) |
//! | GET | `/quarantine/messages?stream=&resolved=` | Kafka messages that were not change batches |
//! | POST | `/quarantine/messages/drop` | drop them, `{"filter": …, "reason": …}` (role `admin`) |
//!
//! The audit calls share one NDC connection, one call at a time: however many operators (or one
//! operator's script) ask at once, the API holds one NDC session beside the hub's appliers.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

mod ui;

use crate::admin_listener::{AdminListener, Peer};
use crate::audit;
use crate::auth::{AuthError, Authenticator, Credentials, Role};
use crate::config::{HubConfig, NdcConfig};
use crate::fanout::record::rfc3339_micros;
use crate::fanout::subscription::SubscriptionDef;
use crate::fanout::{Fanout, FanoutError};
use crate::quarantine::{self, QuarantineError};

#[derive(Clone)]
struct AppState {
    fanout: Arc<Fanout>,
    auth: Arc<Authenticator>,
    ndc: NdcConfig,
    config: Arc<HubConfig>,
    anchor: audit::Anchor,
    /// The dashboard's logged-in sessions.
    sessions: Arc<crate::dashboard::Sessions>,
    /// The audit calls' NDC connection, made on first use and again after it breaks.
    audit_ndc: Arc<tokio::sync::Mutex<Option<tokio_postgres::Client>>>,
}

impl AppState {
    /// The fleet as the registry holds it, on the audit connection.
    async fn fleet(&self) -> Result<Vec<crate::fleet::FleetEntry>, String> {
        let config = self.config.clone();
        self.with_audit_ndc(|client| {
            Box::pin(async move { crate::fleet::list(client, &config).await.map_err(|e| e.to_string()) })
        })
        .await
    }

    /// Runs `query` on the audit connection, waiting for the call before it to finish.
    async fn with_audit_ndc<T, F>(&self, query: F) -> Result<T, String>
    where
        F: for<'c> FnOnce(&'c mut tokio_postgres::Client) -> futures::future::BoxFuture<'c, Result<T, String>>,
    {
        query(&mut *self.audit_session().await?).await
    }

    /// The audit connection, once the call before has finished with it.
    async fn audit_session(&self) -> Result<tokio::sync::MappedMutexGuard<'_, tokio_postgres::Client>, String> {
        let mut slot = self.audit_ndc.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(crate::apply::connect(&self.ndc).await.map_err(|e| e.to_string())?);
        }
        Ok(tokio::sync::MutexGuard::map(slot, |s| s.as_mut().expect("connected above")))
    }
}

/// A JSON error answer.
fn error(status: StatusCode, problems: Vec<String>) -> Response {
    (status, Json(json!({ "problems": problems }))).into_response()
}

fn fanout_error(e: FanoutError) -> Response {
    match e {
        FanoutError::Refused(p) => error(StatusCode::BAD_REQUEST, p),
        FanoutError::Unknown(id) => error(StatusCode::NOT_FOUND, vec![format!("no subscription {id}")]),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, vec![other.to_string()]),
    }
}

/// An operator whose role reaches `Admin` (`ADMIN = true`) or `Read`, established from the request's
/// client certificate and token before the handler runs; a refusal answers 401 or 403 with the
/// reason and is logged with the peer's address, never with the token.
struct Operator<const ADMIN: bool>(String);

/// Any operator (role `read` or `admin`).
type Reader = Operator<false>;
/// An operator with role `admin`.
type Changer = Operator<true>;

impl<const ADMIN: bool> axum::extract::FromRequestParts<AppState> for Operator<ADMIN> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Response> {
        let needed = if ADMIN { Role::Admin } else { Role::Read };
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
        let header = parts.headers.get("authorization").and_then(|h| h.to_str().ok());
        let credentials =
            Credentials { certificate: peer.as_ref().and_then(|p| p.certificate.as_deref()), authorization: header };
        let addr = peer.as_ref().map(|p| p.addr.to_string()).unwrap_or_default();
        match state.auth.operator(credentials, needed) {
            Ok((id, _)) => Ok(Operator(id)),
            Err(e @ AuthError::WrongKind(_)) => {
                tracing::warn!(peer = %addr, reason = %e, "admin API request refused");
                Err(error(StatusCode::FORBIDDEN, vec![e.to_string()]))
            }
            Err(e) => {
                tracing::warn!(peer = %addr, reason = %e, "admin API request refused");
                Err(error(
                    StatusCode::UNAUTHORIZED,
                    vec![format!("{e}: send `authorization: Bearer <operator token>`")],
                ))
            }
        }
    }
}

async fn metrics(_: Reader) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::hub().encode(),
    )
        .into_response()
}

/// Ready when the NDC answers a query on the audit connection within 5 s.
async fn ready(State(s): State<AppState>) -> Response {
    let probe = s.with_audit_ndc(|client| {
        Box::pin(async move { client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| e.to_string()) })
    });
    match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, vec![format!("the NDC does not answer: {e}")]),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, vec!["the NDC did not answer within 5 s".into()]),
    }
}

async fn fleet(State(s): State<AppState>, _: Reader) -> Response {
    match s.fleet().await {
        Ok(l) => Json(l).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, vec![e]),
    }
}

async fn list(State(s): State<AppState>, _: Reader) -> Response {
    match s.fanout.list().await {
        Ok(l) => Json(l).into_response(),
        Err(e) => fanout_error(e),
    }
}

async fn add(State(s): State<AppState>, _: Changer, body: axum::body::Bytes) -> Response {
    let def: SubscriptionDef = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, vec![format!("the definition is not valid JSON: {e}")]),
    };
    let id = def.id.clone();
    match s.fanout.add(def).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "id": id }))).into_response(),
        Err(e) => fanout_error(e),
    }
}

async fn remove(State(s): State<AppState>, _: Changer, Path(id): Path<String>) -> Response {
    match s.fanout.remove(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => fanout_error(e),
    }
}

async fn dead_letters(State(s): State<AppState>, _: Reader, Path(id): Path<String>) -> Response {
    if s.fanout.get(&id).await.is_none() {
        return error(StatusCode::NOT_FOUND, vec![format!("no subscription {id}")]);
    }
    match s.fanout.state.dead_letters(&id) {
        Ok(l) => Json(l).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, vec![e.to_string()]),
    }
}

async fn replay(State(s): State<AppState>, _: Changer, Path(id): Path<String>) -> Response {
    match s.fanout.replay(&id).await {
        Ok((delivered, kept)) => Json(json!({ "delivered": delivered, "still_queued": kept })).into_response(),
        Err(e) => fanout_error(e),
    }
}

async fn citizen(State(s): State<AppState>, _: Reader, Path(citizen_id): Path<String>) -> Response {
    let result = async {
        let checkpoints = s.anchor.checkpoints().map_err(|e| e.to_string())?;
        s.with_audit_ndc(|client| {
            Box::pin(async move {
                audit::citizen_deliveries(client, &citizen_id, &checkpoints).await.map_err(|e| e.to_string())
            })
        })
        .await
    }
    .await;
    match result {
        Ok((v, rows)) => Json(json!({
            "deliveries": citizen_report(&s.fanout, &rows),
            "verification": verification_json(&v),
        }))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, vec![e]),
    }
}

/// The citizen's access report: one line per delivery, with the purpose's description.
pub fn citizen_report(fanout: &Fanout, rows: &[audit::Stored]) -> serde_json::Value {
    let lines: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "at": rfc3339_micros(r.at_us),
                "subscriber": r.entry.subscriber,
                "subscription": r.entry.subscription,
                "purpose": r.entry.purpose,
                "purpose_description": fanout.catalog.purposes.get(&r.entry.purpose).map(|p| p.description.clone()),
                "channel": r.entry.channel,
                "event_id": r.entry.event_id,
                "fields": r.entry.fields,
            })
        })
        .collect();
    json!(lines)
}

async fn verify(State(s): State<AppState>, _: Reader) -> Response {
    let result = async {
        let checkpoints = s.anchor.checkpoints().map_err(|e| e.to_string())?;
        s.with_audit_ndc(|client| {
            Box::pin(async move { audit::verify(client, &checkpoints).await.map_err(|e| e.to_string()) })
        })
        .await
    }
    .await;
    match result {
        Ok(v) => Json(verification_json(&v)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, vec![e]),
    }
}

fn quarantine_error(e: QuarantineError) -> Response {
    match e {
        QuarantineError::Refused(p) => error(StatusCode::BAD_REQUEST, vec![p]),
        QuarantineError::NotFound(p) => error(StatusCode::NOT_FOUND, vec![p]),
        QuarantineError::Apply(e) if e.is_transient() => error(StatusCode::SERVICE_UNAVAILABLE, vec![e.to_string()]),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, vec![other.to_string()]),
    }
}

/// A JSON body, or what is wrong with it.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what} is not valid JSON of its shape: {e}"))
}

async fn quarantine_list(
    State(s): State<AppState>,
    _: Reader,
    axum::extract::Query(filter): axum::extract::Query<quarantine::Filter>,
) -> Response {
    let client = match s.audit_session().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, vec![e]),
    };
    match quarantine::list(&client, &filter, quarantine::MAX_ENTRIES).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => quarantine_error(e),
    }
}

async fn quarantine_show(State(s): State<AppState>, _: Reader, Path((agent, seq)): Path<(String, u64)>) -> Response {
    let client = match s.audit_session().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, vec![e]),
    };
    match quarantine::show(&client, &agent, seq).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => quarantine_error(e),
    }
}

async fn quarantine_replay(State(s): State<AppState>, op: Changer, body: axum::body::Bytes) -> Response {
    let filter: quarantine::Filter = match json_body(&body, "the filter") {
        Ok(f) => f,
        Err(p) => return error(StatusCode::BAD_REQUEST, vec![p]),
    };
    match quarantine::replay(&s.fanout, &s.config, &filter, &op.0).await {
        Ok(done) => Json(done).into_response(),
        Err(e) => quarantine_error(e),
    }
}

/// What `/quarantine/drop` takes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DropRequest {
    filter: quarantine::Filter,
    reason: String,
}

async fn quarantine_drop(State(s): State<AppState>, op: Changer, body: axum::body::Bytes) -> Response {
    let req: DropRequest = match json_body(&body, "the drop request") {
        Ok(r) => r,
        Err(p) => return error(StatusCode::BAD_REQUEST, vec![p]),
    };
    let client = match s.audit_session().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, vec![e]),
    };
    match quarantine::drop_entries(&client, &req.filter, &op.0, &req.reason).await {
        Ok(dropped) => Json(dropped).into_response(),
        Err(e) => quarantine_error(e),
    }
}

async fn messages_list(
    State(s): State<AppState>,
    _: Reader,
    axum::extract::Query(filter): axum::extract::Query<quarantine::MessageFilter>,
) -> Response {
    let client = match s.audit_session().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, vec![e]),
    };
    match quarantine::list_messages(&client, &filter).await {
        Ok(messages) => Json(messages).into_response(),
        Err(e) => quarantine_error(e),
    }
}

/// What `/quarantine/messages/drop` takes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageDropRequest {
    filter: quarantine::MessageFilter,
    reason: String,
}

async fn messages_drop(State(s): State<AppState>, op: Changer, body: axum::body::Bytes) -> Response {
    let req: MessageDropRequest = match json_body(&body, "the drop request") {
        Ok(r) => r,
        Err(p) => return error(StatusCode::BAD_REQUEST, vec![p]),
    };
    let client = match s.audit_session().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, vec![e]),
    };
    match quarantine::drop_messages(&client, &req.filter, &op.0, &req.reason).await {
        Ok(dropped) => Json(dropped).into_response(),
        Err(e) => quarantine_error(e),
    }
}

fn verification_json(v: &audit::Verification) -> serde_json::Value {
    json!({
        "entries_checked": v.entries,
        "intact": v.first_broken.is_none(),
        "first_broken": v.first_broken.as_ref().map(|(id, why)| json!({ "entry": id, "problem": why })),
        "checkpoints": v.checkpoints,
        "anchored_upto": v.anchored_upto,
    })
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    fanout: Arc<Fanout>,
    auth: Arc<Authenticator>,
    config: Arc<HubConfig>,
    anchor: audit::Anchor,
    listener: AdminListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/fleet", get(fleet))
        .route("/ui", get(ui::fleet))
        .route("/ui/login", get(ui::login_page).post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/ui/agents/{id}", get(ui::agent))
        .route("/ui/subscriptions", get(ui::subscriptions))
        .route("/ui/subscriptions/{id}/replay", post(ui::replay))
        .route("/ui/quarantine", get(ui::quarantine))
        .route("/ui/quarantine/replay", post(ui::quarantine_replay))
        .route("/ui/quarantine/drop", post(ui::quarantine_drop))
        .route("/ui/audit", get(ui::audit))
        .route("/subscriptions", get(list).post(add))
        .route("/subscriptions/{id}", axum::routing::delete(remove))
        .route("/subscriptions/{id}/dead-letters", get(dead_letters))
        .route("/subscriptions/{id}/dead-letters/replay", post(replay))
        .route("/audit/citizens/{citizen_id}", get(citizen))
        .route("/audit/verify", get(verify))
        .route("/quarantine", get(quarantine_list))
        .route("/quarantine/{agent}/{seq}", get(quarantine_show))
        .route("/quarantine/replay", post(quarantine_replay))
        .route("/quarantine/drop", post(quarantine_drop))
        .route("/quarantine/messages", get(messages_list))
        .route("/quarantine/messages/drop", post(messages_drop))
        .with_state(AppState {
            fanout,
            auth,
            ndc: config.ndc.clone(),
            config,
            anchor,
            sessions: Default::default(),
            audit_ndc: Default::default(),
        });
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).with_graceful_shutdown(shutdown).await
}
