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

/// The answer to a changing form an operator may not send: one without role admin, or one from
/// another site's page; `None` when it may go ahead.
fn refuse_change(op: &UiOperator, headers: &HeaderMap, what: &str) -> Option<Response> {
    let problem = if op.role < Role::Admin {
        format!("{what} needs role admin.")
    } else if !same_origin(headers) {
        tracing::warn!(operator = %op.id, action = what, "dashboard form refused: it came from another site");
        "This form did not come from the dashboard.".to_string()
    } else {
        return None;
    };
    let body = format!("<p class=\"err\">{}</p>", dashboard::esc(&problem));
    Some(html(StatusCode::FORBIDDEN, dashboard::page("Not allowed", Some(&op.id), &body)))
}

pub(super) async fn replay(
    State(s): State<AppState>,
    op: UiOperator,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refused) = refuse_change(&op, &headers, "Replaying dead letters") {
        return refused;
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
    quarantine_page(&s, &op, None).await
}

/// The quarantine page, with `note` (what a form just did) above it.
async fn quarantine_page(s: &AppState, op: &UiOperator, note: Option<&str>) -> Response {
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
                "SELECT stream, reason, count(*) FROM dongbo.stream_quarantine WHERE resolved_at IS NULL \
                 GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 200",
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
            let page = dashboard::QuarantinePage {
                can_change: op.role >= Role::Admin,
                counts: &counts,
                entries: &entries,
                messages: &messages,
                note,
            };
            html(StatusCode::OK, dashboard::quarantine(&op.id, &page))
        }
        Err(e) => failed(e),
    }
}

/// What a quarantine form on the dashboard sends: a group (agent, table, rule) or one entry (agent,
/// seq), and for a drop, why.
#[derive(Deserialize)]
pub(super) struct QuarantineForm {
    agent: String,
    table: Option<String>,
    rule: Option<String>,
    seq: Option<u64>,
    why: Option<String>,
}

impl QuarantineForm {
    fn filter(&self) -> crate::quarantine::Filter {
        crate::quarantine::Filter {
            agent: Some(self.agent.clone()),
            table: self.table.clone().filter(|t| !t.is_empty()),
            rule: self.rule.clone().filter(|r| !r.is_empty()),
            seqs: self.seq.into_iter().collect(),
            ..Default::default()
        }
    }
}

pub(super) async fn quarantine_replay(
    State(s): State<AppState>,
    op: UiOperator,
    headers: HeaderMap,
    axum::Form(form): axum::Form<QuarantineForm>,
) -> Response {
    if let Some(refused) = refuse_change(&op, &headers, "Replaying quarantined changes") {
        return refused;
    }
    let note = match crate::quarantine::replay(&s.fanout, &s.config, &form.filter(), &op.id).await {
        Ok(report) => {
            tracing::info!(operator = %op.id, agent = %form.agent, entries = report.entries.len(), "quarantine replayed from the dashboard");
            format!("{}: {}", form.agent, report.summary())
        }
        Err(e) => format!("{}: replay failed: {e}", form.agent),
    };
    quarantine_page(&s, &op, Some(&note)).await
}

pub(super) async fn quarantine_drop(
    State(s): State<AppState>,
    op: UiOperator,
    headers: HeaderMap,
    axum::Form(form): axum::Form<QuarantineForm>,
) -> Response {
    if let Some(refused) = refuse_change(&op, &headers, "Dropping quarantined changes") {
        return refused;
    }
    let why = form.why.as_deref().unwrap_or_default();
    let dropped = async {
        let client = s.audit_session().await?;
        crate::quarantine::drop_entries(&client, &form.filter(), &op.id, why).await.map_err(|e| e.to_string())
    };
    let note = match dropped.await {
        Ok(dropped) => {
            tracing::info!(operator = %op.id, agent = %form.agent, entries = dropped.len(), "quarantine entries dropped from the dashboard");
            format!("{}: {} dropped", form.agent, dropped.len())
        }
        Err(e) => format!("{}: drop refused: {e}", form.agent),
    };
    quarantine_page(&s, &op, Some(&note)).await
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
