//! A webhook receiver: checks `X-Dongbo-Signature` as [`dongbo_proto::webhook`] defines it (HMAC
//! over time, event id and body, with the shared secret), refuses stale requests and replays of a
//! signature it has already accepted, and hands each record to a handler, answering with the
//! handler's status code.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use dongbo_proto::webhook::{self, DEFAULT_TOLERANCE_S};
use tokio::net::TcpListener;

use crate::Received;

/// Signatures accepted within the tolerance window, to refuse a captured request sent again.
///
/// Bounded by time (entries older than the tolerance are dropped: the time check refuses those
/// anyway) and by count, so a flood of valid requests cannot grow it without end.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashSet<String>,
    order: VecDeque<(i64, String)>,
}

/// Accepted signatures remembered at most; past this the oldest are forgotten first.
const MAX_REMEMBERED: usize = 1_000_000;

impl ReplayGuard {
    /// Records `signature` signed at `t`; `false` if it was already seen (a replay).
    pub fn first_time(&mut self, signature: &str, t: i64, now: i64) -> bool {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| *at < now - DEFAULT_TOLERANCE_S || self.order.len() >= MAX_REMEMBERED)
        {
            if let Some((_, s)) = self.order.pop_front() {
                self.seen.remove(&s);
            }
        }
        if !self.seen.insert(signature.to_string()) {
            return false;
        }
        self.order.push_back((t, signature.to_string()));
        true
    }
}

/// Checks one request: the status to answer when it must be refused.
pub fn check(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    guard: &Mutex<ReplayGuard>,
    now: i64,
) -> Result<(), (StatusCode, String)> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let sig = header(webhook::SIGNATURE_HEADER);
    let event_id = header(webhook::EVENT_ID_HEADER);
    let t = webhook::verify(secret, sig, event_id, body, now, DEFAULT_TOLERANCE_S)
        .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()))?;
    if !guard.lock().expect("replay guard").first_time(sig, t, now) {
        return Err((StatusCode::UNAUTHORIZED, "this signed request was already received: a replay".into()));
    }
    Ok(())
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Serves POSTs on `listener` at any path until the process ends; `handle` decides the answer
/// (2xx accepts the record). Requests with a bad, stale or replayed signature get 401 and never
/// reach `handle`.
pub async fn serve<F, Fut>(listener: TcpListener, secret: Vec<u8>, handle: F) -> std::io::Result<()>
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StatusCode> + Send,
{
    let secret = Arc::new(secret);
    let handle = Arc::new(handle);
    let guard = Arc::new(Mutex::new(ReplayGuard::default()));
    let endpoint = move |headers: HeaderMap, body: Bytes| {
        let (secret, handle, guard) = (secret.clone(), handle.clone(), guard.clone());
        async move {
            if let Err((status, why)) = check(&secret, &headers, &body, &guard, now_s()) {
                eprintln!("webhook: refused a request: {why}");
                return status;
            }
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return StatusCode::BAD_REQUEST;
            };
            let event_id = body.get("event_id").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let name = body
                .get("event")
                .or_else(|| body.get("table"))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            handle(Received { event_id, name, body, resume_token: String::new() }).await
        }
    };
    let app = Router::new().route("/", post(endpoint.clone())).route("/{*path}", post(endpoint));
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(sig: &str, event_id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(webhook::SIGNATURE_HEADER, sig.parse().unwrap());
        h.insert(webhook::EVENT_ID_HEADER, event_id.parse().unwrap());
        h
    }

    #[test]
    fn stale_replayed_and_relabelled_requests_are_refused() {
        let guard = Mutex::new(ReplayGuard::default());
        let sig = webhook::sign(b"s", 10_000, "01", "hcm:1", b"{}");
        assert_eq!(check(b"s", &headers(&sig, "hcm:1"), b"{}", &guard, 10_001), Ok(()));
        let replay = check(b"s", &headers(&sig, "hcm:1"), b"{}", &guard, 10_002).unwrap_err();
        assert!(replay.1.contains("replay"), "{replay:?}");
        let stale = check(b"s", &headers(&sig, "hcm:1"), b"{}", &Mutex::default(), 10_000 + 301).unwrap_err();
        assert!(stale.1.contains("tolerance"), "{stale:?}");
        let relabelled = check(b"s", &headers(&sig, "hcm:2"), b"{}", &Mutex::default(), 10_001).unwrap_err();
        assert_eq!(relabelled.0, StatusCode::UNAUTHORIZED);
        // The hub's retry of the same record, even within the same second, is signed anew and accepted.
        let retry = webhook::sign(b"s", 10_000, "02", "hcm:1", b"{}");
        assert_eq!(check(b"s", &headers(&retry, "hcm:1"), b"{}", &guard, 10_006), Ok(()));
    }
}
