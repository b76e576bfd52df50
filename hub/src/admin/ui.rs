//! The dashboard's HTTP side ([`crate::dashboard`] renders): login with an operator token into a
//! session cookie, then the fleet, an agent, subscriptions (with dead-letter replay), the
//! quarantine and the audit pages. A request without a live session is sent to the login page.

use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{citizen_report, verification_json, AppState};
use crate::admin_listener::Peer;
use crate::auth::{Credentials, Role};
use crate::dashboard::{self, SubscriptionRow};

/// The operator of a dashboard request: from its session cookie, or its client certificate.
pub(super) struct UiOperator {
    id: String,
    role: Role,
}

impl axum::extract::FromRequestParts<AppState> for UiOperator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Response> {
        let cookie = parts.headers.get(header::COOKIE).and_then(|h| h.to_str().ok());
        if let Some((id, role)) = dashboard::session_cookie(cookie).and_then(|k| state.sessions.get(k)) {
            return Ok(UiOperator { id, role });
        }
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
        let certificate = peer.as_ref().and_then(|p| p.certificate.as_deref());
        if certificate.is_some() {
            if let Ok((id, role)) = state.auth.operator(Credentials { certificate, authorization: None }, Role::Read) {
                return Ok(UiOperator { id, role });
            }
        }
        Err(Redirect::to("/ui/login").into_response())
    }
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        dashboard::page("Error", None, &format!("<p class=\"err\">{}</p>", dashboard::esc(&e.to_string()))),
    )
}

pub(super) async fn login_page() -> Response {
    html(StatusCode::OK, dashboard::login(None))
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    token: String,
}

pub(super) async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Form(form): Form<LoginForm>,
) -> Response {
    let bearer = format!("Bearer {}", form.token.trim());
    let credentials = Credentials {
        certificate: peer.certificate.as_deref(),
        authorization: (!form.token.trim().is_empty()).then_some(bearer.as_str()),
    };
    match s.auth.operator(credentials, Role::Read) {
        Ok((id, role)) => {
            let key = s.sessions.open(&id, role);
            tracing::info!(operator = %id, peer = %peer.addr, "dashboard login");
            let secure = if s.config.tls.is_some() { "; Secure" } else { "" };
            let cookie = format!(
                "{}={key}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                dashboard::COOKIE,
                dashboard::SESSION_TTL.as_secs()
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/ui")).into_response()
        }
        Err(e) => {
            tracing::warn!(peer = %peer.addr, reason = %e, "dashboard login refused");
            html(StatusCode::UNAUTHORIZED, dashboard::login(Some(&e.to_string())))
        }
    }
}

pub(super) async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(k) = dashboard::session_cookie(headers.get(header::COOKIE).and_then(|h| h.to_str().ok())) {
        s.sessions.close(k);
    }
    let cookie = format!("{}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0", dashboard::COOKIE);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response()
}

pub(super) async fn fleet(State(s): State<AppState>, op: UiOperator) -> Response {
    match s.fleet().await {
        Ok(entries) => html(StatusCode::OK, dashboard::fleet(&op.id, &entries)),
        Err(e) => failed(e),
    }
}

pub(super) async fn agent(State(s): State<AppState>, op: UiOperator, Path(id): Path<String>) -> Response {
    match s.fleet().await {
        Ok(entries) => match entries.iter().find(|e| e.source_id == id) {
            Some(e) => html(StatusCode::OK, dashboard::agent(&op.id, e, &crate::fleet::samples(&id))),
            None => html(StatusCode::NOT_FOUND, dashboard::page("No such agent", Some(&op.id), "")),
        },
        Err(e) => failed(e),
    }
}

async fn subscription_rows(s: &AppState) -> Result<Vec<SubscriptionRow>, String> {
    let listed = s.fanout.list().await.map_err(|e| e.to_string())?;
    Ok(listed
        .into_iter()
        .map(|l| SubscriptionRow {
            lag_s: crate::metrics::hub().delivery_lag(&l.def.id),
            id: l.def.id.clone(),
            subscriber: l.def.subscriber.clone(),
            purpose: l.def.purpose.clone(),
            channel: l.def.delivery.channel().to_string(),
            dead_letters: l.dead_letters,
        })
        .collect())
}

pub(super) async fn subscriptions(State(s): State<AppState>, op: UiOperator) -> Response {
    match subscription_rows(&s).await {
        Ok(rows) => html(StatusCode::OK, dashboard::subscriptions(&op.id, op.role >= Role::Admin, &rows, None)),
        Err(e) => failed(e),
    }
}

/// Whether a changing request came from the dashboard's own pages (the `Origin` a browser sends
/// with a form, when it sends one, names the host the page came from).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    origin.split_once("://").is_some_and(|(_, rest)| rest == host)
}

pub(super) async fn replay(
    State(s): State<AppState>,
    op: UiOperator,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if op.role < Role::Admin {
        return html(
            StatusCode::FORBIDDEN,
            dashboard::page(
                "Not allowed",
                Some(&op.id),
                "<p class=\"err\">Replaying dead letters needs role admin.</p>",
            ),
        );
    }
    if !same_origin(&headers) {
        tracing::warn!(operator = %op.id, "dashboard replay refused: the form came from another site");
        return html(
            StatusCode::FORBIDDEN,
            dashboard::page(
                "Not allowed",
                Some(&op.id),
                "<p class=\"err\">This form did not come from the dashboard.</p>",
            ),
        );
    }
    let note = match s.fanout.replay(&id).await {
        Ok((delivered, kept)) => {
            tracing::info!(operator = %op.id, subscription = %id, delivered, kept, "dead letters replayed from the dashboard");
            format!("{id}: {delivered} delivered, {kept} still queued")
        }
        Err(e) => format!("{id}: replay failed: {e}"),
    };
    match subscription_rows(&s).await {
        Ok(rows) => html(StatusCode::OK, dashboard::subscriptions(&op.id, true, &rows, Some(&note))),
        Err(e) => failed(e),
    }
}

/// Entries the quarantine page lists at most.
const PAGE_ENTRIES: usize = 200;

pub(super) async fn quarantine(State(s): State<AppState>, op: UiOperator) -> Response {
    let read = async {
        let client = s.audit_session().await?;
        let counts = client
            .query(
                "SELECT source_id, source_table, coalesce(rule, 'ndc.refused'), count(*) FROM dongbo.quarantine \
                 WHERE resolved_at IS NULL GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 200",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let messages = client
            .query(
                "SELECT stream, reason, count(*) FROM dongbo.stream_quarantine GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 200",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let all = crate::quarantine::Filter { resolved: true, ..Default::default() };
        let entries = crate::quarantine::list(&client, &all, PAGE_ENTRIES).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            counts.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect::<Vec<_>>(),
            messages.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect::<Vec<_>>(),
            entries,
        ))
    };
    match read.await {
        Ok((counts, messages, entries)) => {
            html(StatusCode::OK, dashboard::quarantine(&op.id, &counts, &entries, &messages))
        }
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    citizen: Option<String>,
}

pub(super) async fn audit(State(s): State<AppState>, op: UiOperator, Query(q): Query<AuditQuery>) -> Response {
    let checkpoints = match s.anchor.checkpoints() {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    let citizen = q.citizen.map(|c| c.trim().to_string()).filter(|c| !c.is_empty());
    let asked = citizen.clone();
    let result = s
        .with_audit_ndc(|client| {
            Box::pin(async move {
                match &asked {
                    Some(c) => {
                        let (v, rows) = crate::audit::citizen_deliveries(client, c, &checkpoints)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok((v, Some(rows)))
                    }
                    None => Ok((crate::audit::verify(client, &checkpoints).await.map_err(|e| e.to_string())?, None)),
                }
            })
        })
        .await;
    match result {
        Ok((v, rows)) => {
            let report = rows.map(|r| citizen_report(&s.fanout, &r));
            let citizen = citizen.as_deref().zip(report.as_ref());
            html(StatusCode::OK, dashboard::audit(&op.id, &verification_json(&v), citizen))
        }
        Err(e) => failed(e),
    }
}
