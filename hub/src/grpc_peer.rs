//! The identity of a gRPC peer (agent on `Ingest`, subscriber on `Subscribe`): its client
//! certificate and `authorization` metadata handed to [`crate::auth`], and a refusal turned into the
//! `tonic::Status` the peer sees — here, at the gRPC edge, once for both services. A refusal is
//! logged with the peer's address and the reason, never the token.

use tonic::{Request, Status};
use tracing::warn;

use crate::auth::{AuthError, Authenticator, Credentials};

/// Which service is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `Ingest`.
    Agent,
    /// `Subscribe`.
    Subscriber,
}

/// The id of the agent or subscriber `request` comes from, or the status refusing it.
pub(crate) fn identify<T>(auth: &Authenticator, request: &Request<T>, kind: Kind) -> Result<String, Status> {
    let authorization = request.metadata().get("authorization").and_then(|h| h.to_str().ok());
    let certs = request.peer_certs();
    let certificate = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
    let credentials = Credentials { certificate, authorization };
    let result = match kind {
        Kind::Agent => auth.agent(credentials),
        Kind::Subscriber => auth.subscriber(credentials),
    };
    result.map_err(|e| {
        let who = if kind == Kind::Agent { "agent" } else { "subscriber" };
        let peer = request.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        warn!(%peer, reason = %e, "{who} credential refused");
        refusal(e, kind)
    })
}

fn refusal(e: AuthError, kind: Kind) -> Status {
    match (e, kind) {
        (e @ (AuthError::WrongKind(_) | AuthError::Mismatch { .. }), _) => Status::permission_denied(e.to_string()),
        (e @ (AuthError::NoCertificate | AuthError::Certificate(_)), _) => Status::unauthenticated(e.to_string()),
        (AuthError::Missing, Kind::Agent) => {
            Status::unauthenticated("no authorization metadata: set hub.token in the agent config")
        }
        (AuthError::Malformed, Kind::Agent) => Status::unauthenticated("authorization must be `Bearer <token>`"),
        (AuthError::Unknown, Kind::Agent) => Status::unauthenticated(
            "unknown agent token: check hub.token in the agent config and the hub's agents list",
        ),
        (AuthError::Unknown, Kind::Subscriber) => Status::unauthenticated("unknown subscriber token"),
        (_, Kind::Subscriber) => Status::unauthenticated("send `authorization: Bearer <subscriber token>`"),
    }
}
