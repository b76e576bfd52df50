//! A webhook receiver: checks `X-Dongbo-Signature` (HMAC-SHA256 of the body with the shared
//! secret) and hands each record to a handler, answering with the handler's status code.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::Received;

/// Whether `signature` (`sha256=<hex>`) signs `body` with `secret`.
pub fn signature_valid(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(sig) = hex::decode(hex_sig) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).is_ok()
}

/// Serves POSTs on `listener` at any path until the process ends; `handle` decides the answer
/// (2xx accepts the record). Requests with a bad signature get 401 and never reach `handle`.
pub async fn serve<F, Fut>(listener: TcpListener, secret: Vec<u8>, handle: F) -> std::io::Result<()>
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StatusCode> + Send,
{
    let secret = Arc::new(secret);
    let handle = Arc::new(handle);
    let endpoint = move |headers: HeaderMap, body: Bytes| {
        let (secret, handle) = (secret.clone(), handle.clone());
        async move {
            let sig = headers.get("x-dongbo-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if !signature_valid(&secret, &body, sig) {
                return StatusCode::UNAUTHORIZED;
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
