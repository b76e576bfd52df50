//! Who is on the other end: one identity per connection or request, established once from its
//! credentials and passed down as a value, for the gRPC ingest, the `Subscribe` stream and the admin
//! API alike. Handlers ask the [`Identity`]; they do not parse headers.
//!
//! Today the credential is a bearer token (`authorization: Bearer <token>`); the hub stores only
//! SHA-256 digests of tokens (`token_sha256`, or `token` in clear for demos, digested on load), and
//! compares digests, so timing says nothing about a token. Certificates (mutual TLS) come next and
//! will yield the same [`Identity`].
//!
//! A refused credential is reported with the reason and never with the secret.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// A peer the hub knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent, by its `source_id`.
    Agent(String),
    /// A downstream subscriber, by its id.
    Subscriber(String),
    /// An operator of the admin API.
    Operator {
        /// Its id (`admin` for the `[admin]` token).
        id: String,
        /// What it may do.
        role: Role,
    },
}

/// What an operator may do through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: status, subscriptions, dead letters, the audit log's verification and citizen query.
    Read,
    /// Also change: add and remove subscriptions, replay dead letters.
    Admin,
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential at all.
    #[error("no credential: send `authorization: Bearer <token>`")]
    Missing,
    /// The header is not a bearer token.
    #[error("the authorization header must be `Bearer <token>`")]
    Malformed,
    /// The token is no known peer's.
    #[error("unknown token")]
    Unknown,
    /// A known peer, but not of the kind this endpoint serves.
    #[error("this token identifies {0}, which may not use this endpoint")]
    WrongKind(String),
}

/// The SHA-256 (hex) of a secret as the config gives it: its digest, or the secret in clear.
pub fn secret_digest(sha256: Option<&str>, clear: Option<&str>) -> Option<String> {
    match (sha256, clear) {
        (Some(h), _) => Some(h.to_ascii_lowercase()),
        (None, Some(t)) => Some(digest(t)),
        (None, None) => None,
    }
}

/// The SHA-256 (hex) of a token.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    value.strip_prefix("Bearer ").filter(|t| !t.is_empty()).ok_or(AuthError::Malformed)
}

/// Every credential the hub accepts, by digest.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_digest: HashMap<String, Identity>,
}

impl Authenticator {
    /// The credentials of `config`: agents, subscribers and operators. Two peers sharing a token
    /// are refused by the config's validation, so each digest names one identity.
    pub fn new(config: &crate::config::HubConfig) -> Self {
        let mut by_digest = HashMap::new();
        for a in &config.agents {
            if let Some(d) = secret_digest(a.token_sha256.as_deref(), a.token.as_deref()) {
                by_digest.insert(d, Identity::Agent(a.id.clone()));
            }
        }
        for s in &config.subscribers {
            if let Some(d) = secret_digest(s.token_sha256.as_deref(), s.token.as_deref()) {
                by_digest.insert(d, Identity::Subscriber(s.id.clone()));
            }
        }
        if let Some(admin) = &config.admin {
            if let Some(d) = secret_digest(admin.token_sha256.as_deref(), admin.token.as_deref()) {
                by_digest.insert(d, Identity::Operator { id: "admin".into(), role: Role::Admin });
            }
            for o in &admin.operators {
                if let Some(d) = secret_digest(o.token_sha256.as_deref(), o.token.as_deref()) {
                    by_digest.insert(d, Identity::Operator { id: o.id.clone(), role: o.role });
                }
            }
        }
        Self { by_digest }
    }

    /// The identity an `authorization` header value proves.
    pub fn identify(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let token = bearer(header)?;
        self.by_digest.get(&digest(token)).cloned().ok_or(AuthError::Unknown)
    }

    /// The agent an `authorization` header value proves.
    pub fn agent(&self, header: Option<&str>) -> Result<String, AuthError> {
        match self.identify(header)? {
            Identity::Agent(id) => Ok(id),
            other => Err(AuthError::WrongKind(other.describe())),
        }
    }

    /// The subscriber an `authorization` header value proves.
    pub fn subscriber(&self, header: Option<&str>) -> Result<String, AuthError> {
        match self.identify(header)? {
            Identity::Subscriber(id) => Ok(id),
            other => Err(AuthError::WrongKind(other.describe())),
        }
    }

    /// The operator an `authorization` header value proves, if its role reaches `needed`.
    pub fn operator(&self, header: Option<&str>, needed: Role) -> Result<(String, Role), AuthError> {
        match self.identify(header)? {
            Identity::Operator { id, role } if role >= needed => Ok((id, role)),
            Identity::Operator { id, role } => {
                Err(AuthError::WrongKind(format!("operator {id} with role {role:?}, which may only read")))
            }
            other => Err(AuthError::WrongKind(other.describe())),
        }
    }
}

impl Identity {
    /// Who this is, in words for an error message.
    pub fn describe(&self) -> String {
        match self {
            Identity::Agent(id) => format!("agent {id}"),
            Identity::Subscriber(id) => format!("subscriber {id}"),
            Identity::Operator { id, .. } => format!("operator {id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> crate::config::HubConfig {
        toml::from_str(
            r#"
listen = "127.0.0.1:1"
[ndc]
host = "h"
database = "d"
user = "u"
[admin]
listen = "127.0.0.1:2"
token = "root"
[[admin.operators]]
id = "dashboard"
token = "look"
role = "read"
[[agents]]
id = "hcm"
token = "a"
[[subscribers]]
id = "bhxh"
token_sha256 = "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
"#,
        )
        .unwrap()
    }

    #[test]
    fn one_token_one_identity_of_one_kind() {
        let auth = Authenticator::new(&config());
        assert_eq!(auth.agent(Some("Bearer a")).unwrap(), "hcm");
        assert_eq!(auth.subscriber(Some("Bearer b")).unwrap(), "bhxh", "sha256(\"b\") from the config");
        assert_eq!(auth.operator(Some("Bearer root"), Role::Admin).unwrap(), ("admin".into(), Role::Admin));
        assert_eq!(auth.operator(Some("Bearer look"), Role::Read).unwrap(), ("dashboard".into(), Role::Read));
        assert!(matches!(auth.operator(Some("Bearer look"), Role::Admin), Err(AuthError::WrongKind(_))));
        assert_eq!(auth.agent(Some("Bearer b")), Err(AuthError::WrongKind("subscriber bhxh".into())));
        assert_eq!(auth.agent(Some("Bearer nope")), Err(AuthError::Unknown));
        assert_eq!(auth.agent(Some("Basic a")), Err(AuthError::Malformed));
        assert_eq!(auth.agent(Some("Bearer ")), Err(AuthError::Malformed));
        assert_eq!(auth.agent(None), Err(AuthError::Missing));
        let shown = format!("{:?} {}", auth.agent(Some("Bearer secret-x")), AuthError::Unknown);
        assert!(!shown.contains("secret-x"), "{shown}");
    }
}
