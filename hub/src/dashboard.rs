//! The operators' dashboard: server-rendered HTML pages on the admin listener (`/ui/…`), no
//! script and nothing fetched from elsewhere, so it works on a network with no way out.
//!
//! # Contract
//! - A browser cannot send a bearer token, so `/ui/login` takes the operator token once (or the
//!   client certificate alone, when the admin listener has mutual TLS) and sets a session cookie:
//!   random, `HttpOnly`, `SameSite=Strict` (`Secure` over HTTPS), valid [`SESSION_TTL`], kept in
//!   memory only (a hub restart logs everyone out). The session carries the operator's role.
//! - Changing actions (replaying dead letters; replaying or dropping quarantined changes, a drop
//!   with its reason) are `POST` forms, shown to role `admin` only, need role `admin`, and are refused
//!   unless the request's `Origin`, when the browser sends one, is the dashboard's own host.
//! - Every value shown is HTML-escaped here, including what agents report of themselves (host
//!   names, errors) and what the NDC holds (quarantine reasons): nothing a peer sends is markup.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::Role;
use crate::fleet::FleetEntry;

/// How long a dashboard session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "dongbo_session";
/// Sessions at most; the oldest is dropped past it (a login flood cannot grow memory).
const MAX_SESSIONS: usize = 1024;

/// Logged-in dashboard sessions.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, (String, Role, Instant)>>,
}

impl Sessions {
    /// Opens a session for operator `id` with `role`; returns its cookie value.
    pub fn open(&self, id: &str, role: Role) -> String {
        let token: [u8; 32] = rand::random();
        let key = hex::encode(token);
        let mut by_id = self.by_id.lock().expect("sessions lock");
        by_id.retain(|_, (_, _, at)| at.elapsed() < SESSION_TTL);
        if by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = by_id.iter().min_by_key(|(_, (_, _, at))| *at).map(|(k, _)| k.clone()) {
                by_id.remove(&oldest);
            }
        }
        by_id.insert(key.clone(), (id.to_string(), role, Instant::now()));
        key
    }

    /// The operator and role of a live session.
    pub fn get(&self, key: &str) -> Option<(String, Role)> {
        let by_id = self.by_id.lock().expect("sessions lock");
        by_id.get(key).filter(|(_, _, at)| at.elapsed() < SESSION_TTL).map(|(id, role, _)| (id.clone(), *role))
    }

    /// Ends a session.
    pub fn close(&self, key: &str) {
        self.by_id.lock().expect("sessions lock").remove(key);
    }
}

/// The session key in a `Cookie` header, if any.
pub fn session_cookie(header: Option<&str>) -> Option<&str> {
    header?.split(';').map(str::trim).find_map(|c| c.strip_prefix(COOKIE)?.strip_prefix('='))
}

/// `s` safe inside HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a URL path segment.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d2733;background:#f4f6f8}\
header{background:#123a5e;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}\
header a{color:#fff;text-decoration:none}header b{margin-right:20px}main{padding:20px}\
table{border-collapse:collapse;background:#fff;margin-bottom:20px}th,td{padding:6px 10px;border-bottom:1px solid #dde3e8;text-align:left}\
th{background:#e8edf2}.health{font-weight:bold;padding:2px 8px;border-radius:4px;color:#fff}\
.green{background:#2e8540}.amber{background:#d98c00}.red{background:#c62828}\
.province{margin:10px 0 4px}.note{background:#fff8d6;padding:8px 12px;border:1px solid #e6d98c}\
.err{color:#c62828}form.inline{display:inline}svg{background:#fff;border:1px solid #dde3e8}";

/// A whole page with the navigation; `body` is already HTML.
pub fn page(title: &str, operator: Option<&str>, body: &str) -> String {
    let nav = match operator {
        Some(who) => format!(
            "<a href=\"/ui\">Fleet</a><a href=\"/ui/subscriptions\">Subscriptions</a>\
             <a href=\"/ui/quarantine\">Quarantine</a><a href=\"/ui/audit\">Audit</a>\
             <span style=\"margin-left:auto\">{}</span><form class=\"inline\" method=\"post\" action=\"/ui/logout\">\
             <button>Log out</button></form>",
            esc(who)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"vi\"><head><meta charset=\"utf-8\"><title>{t} · dongbo</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <style>{STYLE}</style></head><body><header><b>dongbo · NDC</b>{nav}</header><main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title),
        // The login page must not reload under the operator's typing.
        refresh = if operator.is_some() { 15 } else { 86400 },
    )
}

/// The login form, with `problem` if the last attempt failed.
pub fn login(problem: Option<&str>) -> String {
    let problem = problem.map(|p| format!("<p class=\"err\" id=\"problem\">{}</p>", esc(p))).unwrap_or_default();
    page(
        "Log in",
        None,
        &format!(
            "{problem}<form method=\"post\" action=\"/ui/login\"><label>Operator token \
             <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\"></label> \
             <button id=\"login\">Log in</button></form>\
             <p>With a client certificate on the admin listener, leave the token empty.</p>"
        ),
    )
}

fn health(e: &FleetEntry) -> String {
    format!("<span class=\"health {h}\" data-health=\"{h}\">{h}</span>", h = esc(&e.health))
}

fn seconds(s: Option<f64>) -> String {
    match s {
        None => "never".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn bytes(b: Option<i64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        Some(b) if b < 1 << 30 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        Some(b) => format!("{:.1} GiB", b as f64 / (1 << 30) as f64),
    }
}

/// The fleet by province, each agent green, amber or red.
pub fn fleet(operator: &str, entries: &[FleetEntry]) -> String {
    let mut by_province: std::collections::BTreeMap<String, Vec<&FleetEntry>> = Default::default();
    for e in entries {
        by_province.entry(e.province.clone().unwrap_or_else(|| "no province".into())).or_default().push(e);
    }
    let count = |h: &str| entries.iter().filter(|e| e.health == h).count();
    let mut body = format!(
        "<p id=\"summary\">{} agents: <span class=\"health green\">{} green</span> \
         <span class=\"health amber\">{} amber</span> <span class=\"health red\">{} red</span></p>",
        entries.len(),
        count("green"),
        count("amber"),
        count("red")
    );
    for (province, agents) in by_province {
        let _ = write!(
            body,
            "<h2 class=\"province\">Province {}</h2><table><tr><th>Agent</th><th>Health</th><th>Link</th>\
             <th>Transport</th><th>Silent</th><th>Lag</th><th>Applied</th><th>Spool</th><th>Last error</th></tr>",
            esc(&province)
        );
        for e in agents {
            let _ = write!(
                body,
                "<tr id=\"agent-{id}\"><td><a href=\"/ui/agents/{link}\">{id}</a></td><td>{health}</td><td>{link_state}</td>\
                 <td>{transport}</td><td>{silence}</td><td>{lag}</td><td>{applied}</td><td>{spool}</td><td>{error}</td></tr>",
                id = esc(&e.source_id),
                link = path_segment(&e.source_id),
                health = health(e),
                link_state = if e.connected { "up" } else { "down" },
                transport = esc(e.transport.as_deref().unwrap_or("-")),
                silence = seconds(e.silence_s),
                lag = e.lag_s.map_or("-".into(), |l| format!("{l:.1} s")),
                applied = e.changes_applied,
                spool = bytes(e.spool_bytes),
                error = esc(e.last_error.as_deref().unwrap_or("")),
            );
        }
        body.push_str("</table>");
    }
    page("Fleet", Some(operator), &body)
}

/// A sparkline of `values` (oldest first), `w`×`h` pixels.
fn sparkline(values: &[f64], w: f64, h: f64) -> String {
    if values.len() < 2 {
        return format!("<svg width=\"{w}\" height=\"{h}\"></svg>");
    }
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
    let step = w / (values.len() - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, h - 2.0 - (v / max) * (h - 4.0)))
        .collect();
    format!(
        "<svg width=\"{w}\" height=\"{h}\"><polyline fill=\"none\" stroke=\"#123a5e\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// One agent: everything the registry holds, and its recent throughput and lag.
pub fn agent(operator: &str, e: &FleetEntry, samples: &[crate::fleet::Sample]) -> String {
    let mut body = String::from("<table>");
    let mut row = |k: &str, v: String| {
        let _ = write!(body, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    };
    row("health", health(e));
    row("province", esc(e.province.as_deref().unwrap_or("-")));
    row("link", (if e.connected { "up" } else { "down" }).into());
    row("transport", esc(e.transport.as_deref().unwrap_or("-")));
    row("version", esc(e.agent_version.as_deref().unwrap_or("-")));
    row("host", esc(e.host.as_deref().unwrap_or("-")));
    row("address", esc(e.peer.as_deref().unwrap_or("-")));
    row("last contact", esc(e.last_contact.as_deref().unwrap_or("never")));
    row("silent for", seconds(e.silence_s));
    row("changes applied", e.changes_applied.to_string());
    row("changes quarantined", e.changes_quarantined.to_string());
    row("last applied", esc(e.last_applied.as_deref().unwrap_or("-")));
    row("lag, commit → NDC", e.lag_s.map_or("-".into(), |l| format!("{l:.2} s")));
    row(
        "spool",
        format!(
            "{} of {} ({} batches)",
            bytes(e.spool_bytes),
            bytes(e.spool_limit_bytes),
            e.spool_batches.unwrap_or(0)
        ),
    );
    row("capture running", e.capture_running.map_or("-".into(), |c| if c { "yes" } else { "no" }.into()));
    row(
        "snapshot",
        match (e.snapshot_rows, e.snapshot_estimated_rows) {
            (None, _) => "none running".into(),
            (Some(rows), Some(total)) if total > 0 => {
                format!("{rows} of about {total} rows ({:.0} %)", (rows as f64 * 100.0 / total as f64).min(99.0))
            }
            (Some(rows), _) => format!("{rows} rows read"),
        },
    );
    row(
        "source log kept",
        match (e.source_log.as_deref(), e.source_log_retained_bytes) {
            (Some(log), Some(kept)) => {
                let mut text = format!("{} {}", esc(log), bytes(Some(kept)));
                if let Some(h) = e.source_log_headroom_bytes {
                    text.push_str(&format!(", {} more before the slot is dropped", bytes(Some(h))));
                }
                if let Some(h) = e.source_log_headroom_s {
                    text.push_str(&format!(", kept {} more at least", seconds(Some(h))));
                }
                text
            }
            _ => "-".into(),
        },
    );
    row("certificate expires", esc(e.certificate_expiry.as_deref().unwrap_or("-")));
    row("last error", esc(e.last_error.as_deref().unwrap_or("")));
    body.push_str("</table>");
    let rates: Vec<f64> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].at_s - w[0].at_s).max(1e-3);
            (w[1].applied.saturating_sub(w[0].applied)) as f64 / dt
        })
        .collect();
    let lags: Vec<f64> = samples.iter().map(|s| s.lag_s.unwrap_or(0.0)).collect();
    let _ = write!(
        body,
        "<h2>Recent throughput (changes/s, last {} s; now {:.1})</h2>{}<h2>Recent lag (s; now {})</h2>{}",
        samples.last().zip(samples.first()).map_or(0.0, |(l, f)| l.at_s - f.at_s).round(),
        rates.last().copied().unwrap_or(0.0),
        sparkline(&rates, 600.0, 80.0),
        e.lag_s.map_or("-".into(), |l| format!("{l:.1}")),
        sparkline(&lags, 600.0, 80.0),
    );
    page(&format!("Agent {}", e.source_id), Some(operator), &body)
}

/// A subscription as the page lists it.
pub struct SubscriptionRow {
    /// Its id.
    pub id: String,
    /// The subscriber.
    pub subscriber: String,
    /// Its purpose.
    pub purpose: String,
    /// `grpc`, `webhook` or `kafka`.
    pub channel: String,
    /// Records in its dead-letter queue.
    pub dead_letters: usize,
    /// Delivery lag in seconds, if it delivered since the hub started.
    pub lag_s: Option<f64>,
}

/// Subscriptions with their lag and dead letters, a replay button where there are any.
pub fn subscriptions(operator: &str, can_replay: bool, rows: &[SubscriptionRow], note: Option<&str>) -> String {
    let mut body = note.map(|n| format!("<p class=\"note\" id=\"note\">{}</p>", esc(n))).unwrap_or_default();
    body.push_str(
        "<table><tr><th>Subscription</th><th>Subscriber</th><th>Purpose</th><th>Channel</th><th>Lag</th>\
         <th>Dead letters</th><th></th></tr>",
    );
    for r in rows {
        let replay = if r.dead_letters > 0 && can_replay && r.channel == "webhook" {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/ui/subscriptions/{}/replay\">\
                 <button id=\"replay-{}\">Replay</button></form>",
                path_segment(&r.id),
                esc(&r.id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            body,
            "<tr id=\"sub-{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"dead-letters\">{}</td><td>{replay}</td></tr>",
            esc(&r.subscriber),
            esc(&r.purpose),
            esc(&r.channel),
            r.lag_s.map_or("-".into(), |l| format!("{l:.1} s")),
            r.dead_letters,
            id = esc(&r.id),
        );
    }
    body.push_str("</table>");
    page("Subscriptions", Some(operator), &body)
}

/// What the quarantine page shows.
pub struct QuarantinePage<'a> {
    /// Whether the operator may replay and drop (role admin): the forms are shown.
    pub can_change: bool,
    /// Unresolved entries counted by agent, table and rule.
    pub counts: &'a [(String, String, String, i64)],
    /// Entries, resolved or not.
    pub entries: &'a [crate::quarantine::Entry],
    /// Refused Kafka messages counted by stream and reason.
    pub messages: &'a [(String, String, i64)],
    /// What the last form did.
    pub note: Option<&'a str>,
}

/// A form posting `fields` (hidden) to `/ui/quarantine/{action}`, with a reason box for a drop.
fn quarantine_form(action: &str, id: &str, fields: &[(&str, &str)]) -> String {
    let mut form = format!("<form class=\"inline\" method=\"post\" action=\"/ui/quarantine/{action}\">");
    for (name, value) in fields {
        let _ = write!(form, "<input type=\"hidden\" name=\"{name}\" value=\"{}\">", esc(value));
    }
    if action == "drop" {
        let _ = write!(form, "<input name=\"why\" id=\"why-{id}\" placeholder=\"why\" required>");
    }
    let label = if action == "drop" { "Drop" } else { "Replay" };
    let _ = write!(form, "<button id=\"{action}-{id}\">{label}</button></form>");
    form
}

/// Quarantined changes waiting, counted by agent, table and rule (with replay and drop forms for
/// an admin); the entries themselves with what became of them; and refused Kafka messages.
pub fn quarantine(operator: &str, p: &QuarantinePage<'_>) -> String {
    let mut body = p.note.map(|n| format!("<p class=\"note\" id=\"note\">{}</p>", esc(n))).unwrap_or_default();
    body.push_str(
        "<h2>Waiting</h2><table id=\"quarantine\"><tr><th>Agent</th><th>Table</th><th>Rule</th><th>Count</th>\
         <th></th></tr>",
    );
    for (i, (agent, table, rule, n)) in p.counts.iter().enumerate() {
        let actions = if p.can_change {
            let fields = [("agent", agent.as_str()), ("table", table.as_str()), ("rule", rule.as_str())];
            let id = format!("group-{i}");
            quarantine_form("replay", &id, &fields) + &quarantine_form("drop", &id, &fields)
        } else {
            String::new()
        };
        let _ = write!(
            body,
            "<tr id=\"group-{i}\"><td>{}</td><td>{}</td><td>{}</td><td>{n}</td><td>{actions}</td></tr>",
            esc(agent),
            esc(table),
            esc(rule)
        );
    }
    body.push_str(
        "</table><p>Replay once the data or the rule is fixed (entries go through the dictionary in use \
         now, in order), or drop with a reason. The CLI does the same: \
         <code>dongbo-hub quarantine replay --agent …</code>, <code>dongbo-hub quarantine drop … --why …</code>.</p>\
         <h2>Entries</h2><table id=\"quarantine-entries\"><tr><th>Agent</th><th>Seq</th><th>Table</th><th>Rule</th>\
         <th>Reason</th><th>State</th><th>By</th><th></th></tr>",
    );
    for e in p.entries {
        let state = match (&e.resolution, &e.resolution_note) {
            (Some(r), Some(n)) => format!("{r}: {n}"),
            (Some(r), None) => r.clone(),
            (None, _) => "waiting".into(),
        };
        let actions = if p.can_change && e.resolution.is_none() {
            let seq = e.seq.to_string();
            let fields = [("agent", e.agent.as_str()), ("seq", seq.as_str())];
            let id = format!("{}-{}", path_segment(&e.agent), e.seq);
            quarantine_form("replay", &id, &fields) + &quarantine_form("drop", &id, &fields)
        } else {
            String::new()
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{actions}</td></tr>",
            esc(&e.agent),
            e.seq,
            esc(&e.table),
            esc(&e.rule),
            esc(&e.reason),
            esc(&state),
            esc(e.resolved_by.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table><h2>Kafka messages</h2><table><tr><th>Stream</th><th>Reason</th><th>Count</th></tr>");
    for (stream, reason, n) in p.messages {
        let _ = write!(body, "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>", esc(stream), esc(reason));
    }
    body.push_str("</table>");
    page("Quarantine", Some(operator), &body)
}

/// The audit chain's verification and the citizen lookup ("who received my data").
pub fn audit(operator: &str, verification: &serde_json::Value, citizen: Option<(&str, &serde_json::Value)>) -> String {
    let intact = verification["intact"].as_bool().unwrap_or(false);
    let mut body = format!(
        "<p id=\"verify\"><span class=\"health {}\">{}</span> {} entries checked, anchored up to {}</p>",
        if intact { "green" } else { "red" },
        if intact { "chain intact" } else { "CHAIN BROKEN" },
        verification["entries_checked"],
        esc(&verification["anchored_upto"].to_string()),
    );
    if let Some(broken) = verification["first_broken"].as_object() {
        let _ = write!(
            body,
            "<p class=\"err\">first broken entry: {}</p>",
            esc(&serde_json::Value::Object(broken.clone()).to_string())
        );
    }
    body.push_str(
        "<form method=\"get\" action=\"/ui/audit\"><label>Citizen id <input name=\"citizen\" id=\"citizen\"></label> \
         <button id=\"lookup\">Who received this citizen's data</button></form>",
    );
    if let Some((id, deliveries)) = citizen {
        let _ = write!(body, "<h2>Deliveries of citizen {}</h2><table><tr><th>When</th><th>Subscriber</th><th>Purpose</th><th>Fields</th></tr>", esc(id));
        for d in deliveries.as_array().map(Vec::as_slice).unwrap_or_default() {
            let text = |k: &str| esc(&d[k].as_str().map(str::to_string).unwrap_or_else(|| d[k].to_string()));
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text("at"),
                text("subscriber"),
                text("purpose"),
                text("fields")
            );
        }
        body.push_str("</table>");
    }
    page("Audit", Some(operator), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_peers_send_is_never_markup() {
        let e = FleetEntry {
            source_id: "hcm".into(),
            province: Some("79".into()),
            transport: Some("grpc".into()),
            agent_version: None,
            host: Some("<script>alert(1)</script>".into()),
            peer: None,
            connected: false,
            last_contact: None,
            silence_s: None,
            last_error: Some("\"><img src=x onerror=alert(1)>".into()),
            spool_bytes: None,
            spool_limit_bytes: None,
            spool_batches: None,
            capture_running: None,
            snapshot_rows: Some(50),
            snapshot_estimated_rows: Some(200),
            source_log: Some("<b>wal</b>".into()),
            source_log_retained_bytes: Some(10 << 30),
            source_log_headroom_bytes: None,
            source_log_headroom_s: None,
            certificate_expiry: Some("<i>2031</i>".into()),
            changes_applied: 0,
            changes_quarantined: 0,
            last_applied: None,
            lag_s: None,
            health: "red".into(),
        };
        for html in [fleet("op", std::slice::from_ref(&e)), agent("op", &e, &[])] {
            assert!(!html.contains("<script>alert") && !html.contains("<img"), "{html}");
            assert!(!html.contains("<b>wal") && !html.contains("<i>2031"), "{html}");
        }
        let detail = agent("op", &e, &[]);
        assert!(detail.contains("50 of about 200 rows (25 %)") && detail.contains("10.0 GiB"), "{detail}");
        assert!(agent("op", &e, &[]).contains("&lt;script&gt;"));
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn sessions_expire_are_bounded_and_come_from_the_cookie() {
        let s = Sessions::default();
        let key = s.open("ops", Role::Admin);
        assert_eq!(s.get(&key), Some(("ops".into(), Role::Admin)));
        assert_eq!(session_cookie(Some(&format!("theme=dark; {COOKIE}={key}"))), Some(key.as_str()));
        s.close(&key);
        assert_eq!(s.get(&key), None);
        for _ in 0..MAX_SESSIONS + 10 {
            s.open("flood", Role::Read);
        }
        assert!(s.by_id.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
