//! The webhook channel's contract: how the hub signs a delivery and how a receiver checks it.
//!
//! Every POST carries `X-Dongbo-Signature: t=<unix seconds>,n=<nonce>,v1=<hex>` where `<hex>` is
//! HMAC-SHA256, keyed with the subscription's shared secret, over `<t>.<nonce>.<event id>.<body>`,
//! and the event id in `X-Dongbo-Event-Id`. Covering the time and the id as well as the body means
//! a captured request cannot be replayed later (the receiver refuses a `t` outside its tolerance)
//! nor re-labelled as another event; within the tolerance a receiver refuses a signature it has
//! already seen. Each attempt is signed anew with a fresh random nonce, so a retry within the same
//! second is a new, valid request whose event id lets the receiver drop the duplicate.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-dongbo-signature";
/// The event id header.
pub const EVENT_ID_HEADER: &str = "x-dongbo-event-id";
/// A receiver accepts a signature this many seconds old (or early, for clock skew) at most.
pub const DEFAULT_TOLERANCE_S: i64 = 300;

fn mac(secret: &[u8], t: i64, nonce: &str, event_id: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(nonce.as_bytes());
    mac.update(b".");
    mac.update(event_id.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature header value for a delivery signed at unix time `t` with `nonce` (hex digits,
/// fresh for every attempt).
pub fn sign(secret: &[u8], t: i64, nonce: &str, event_id: &str, body: &[u8]) -> String {
    format!("t={t},n={nonce},v1={}", hex_encode(&mac(secret, t, nonce, event_id, body).finalize().into_bytes()))
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// The header is not `t=…,v1=…`.
    Malformed,
    /// The MAC does not match: wrong secret, or the body, id or time was changed.
    Mismatch,
    /// `t` is further than the tolerance from now: a stale (or replayed) request.
    Stale {
        /// Seconds between `t` and now.
        age_s: i64,
    },
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureError::Malformed => f.write_str("signature header is not t=<unix seconds>,n=<hex>,v1=<hex>"),
            SignatureError::Mismatch => f.write_str("signature does not match the body, event id and time"),
            SignatureError::Stale { age_s } => write!(f, "signature is {age_s} s from now, outside the tolerance"),
        }
    }
}

impl std::error::Error for SignatureError {}

/// Checks `header` for a delivery of `event_id` with `body` at unix time `now`; returns its `t`.
pub fn verify(
    secret: &[u8],
    header: &str,
    event_id: &str,
    body: &[u8],
    now: i64,
    tolerance_s: i64,
) -> Result<i64, SignatureError> {
    let (mut t, mut nonce, mut v1) = (None, None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("n", v)) if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                nonce = Some(v)
            }
            Some(("v1", v)) => v1 = hex_decode(v),
            _ => {}
        }
    }
    let (Some(t), Some(nonce), Some(v1)) = (t, nonce, v1) else { return Err(SignatureError::Malformed) };
    // verify_slice compares in constant time.
    mac(secret, t, nonce, event_id, body).verify_slice(&v1).map_err(|_| SignatureError::Mismatch)?;
    let age_s = now.saturating_sub(t);
    if age_s.abs() > tolerance_s {
        return Err(SignatureError::Stale { age_s });
    }
    Ok(t)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_time_event_and_body() {
        let h = sign(b"k", 1_000, "ab12", "hcm:7", b"{}");
        assert!(h.starts_with("t=1000,n=ab12,v1="), "{h}");
        assert_ne!(h, sign(b"k", 1_000, "ab13", "hcm:7", b"{}"), "each attempt's nonce makes its own signature");
        let other_nonce = h.replace("n=ab12", "n=ab13");
        assert_eq!(verify(b"k", &other_nonce, "hcm:7", b"{}", 1_010, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"k", &h, "hcm:7", b"{}", 1_010, 300), Ok(1_000));
        assert_eq!(verify(b"k", &h, "hcm:8", b"{}", 1_010, 300), Err(SignatureError::Mismatch), "other event");
        assert_eq!(verify(b"k", &h, "hcm:7", b"{ }", 1_010, 300), Err(SignatureError::Mismatch), "other body");
        assert_eq!(verify(b"x", &h, "hcm:7", b"{}", 1_010, 300), Err(SignatureError::Mismatch), "other key");
        let moved = h.replace("t=1000", "t=2000");
        assert_eq!(verify(b"k", &moved, "hcm:7", b"{}", 2_000, 300), Err(SignatureError::Mismatch), "time moved");
        assert_eq!(verify(b"k", &h, "hcm:7", b"{}", 1_400, 300), Err(SignatureError::Stale { age_s: 400 }));
        assert_eq!(verify(b"k", "sha256=00", "hcm:7", b"{}", 1_000, 300), Err(SignatureError::Malformed));
    }
}
