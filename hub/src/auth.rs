//! Who is on the other end: one identity per connection or request, established once from its
//! credentials and passed down as a value, for the gRPC ingest, the `Subscribe` stream and the admin
//! API alike. Handlers ask the [`Identity`]; they do not parse headers.
//!
//! Credentials are a client certificate (mutual TLS on the gRPC listener), a bearer token
//! (`authorization: Bearer <token>`), or both, as `tls.mode` says:
//! - a certificate names its peer by a URI SAN `spiffe://<trust domain>/<agent|subscriber>/<id>`,
//!   and rustls has already checked it chains to `tls.client_ca_file` and is in its validity period;
//! - the hub stores only SHA-256 digests of tokens (`token_sha256`, or `token` in clear for demos,
//!   digested on load), and compares digests, so timing says nothing about a token;
//! - with `mtls+token` both must be present and name the same peer, so a stolen token alone or a
//!   stolen key alone is not enough.
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
    /// No client certificate, where one is required.
    #[error("no client certificate: this hub requires mutual TLS (set hub.cert_file and hub.key_file in the agent)")]
    NoCertificate,
    /// The certificate does not name a peer the hub knows.
    #[error("client certificate refused: {0}")]
    Certificate(String),
    /// Certificate and token name different peers.
    #[error("the client certificate names {cert} but the token names {token}")]
    Mismatch {
        /// Who the certificate names.
        cert: String,
        /// Who the token names.
        token: String,
    },
}

/// What a peer presented on one connection or request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// Its client certificate (DER), if the connection is TLS and it sent one.
    pub certificate: Option<&'a [u8]>,
    /// Its `authorization` header value.
    pub authorization: Option<&'a str>,
}

/// The peer a client certificate names, by its URI SAN `spiffe://<trust_domain>/<kind>/<id>`.
pub fn certificate_identity(der: &[u8], trust_domain: &str) -> Result<Identity, AuthError> {
    certificate_name(der, trust_domain, &HashMap::new())
}

/// A certificate subject as a set of attributes (`CN`, `O`, …, with their values), so that the
/// same subject matches whatever order or spacing it is written in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectKey(Vec<(String, String)>);

impl SubjectKey {
    /// Parses `C=VN, O=…, CN=…` (as `openssl x509 -noout -subject` prints it, with or without
    /// spaces around `=`). A value holding a comma cannot be written here.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().strip_prefix("subject=").unwrap_or(text.trim());
        let mut parts = Vec::new();
        for part in text.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?} is not ATTRIBUTE=value"))?;
            let (k, v) = (k.trim().to_ascii_uppercase(), v.trim().to_string());
            if k.is_empty() || v.is_empty() {
                return Err(format!("{part:?} is not ATTRIBUTE=value"));
            }
            parts.push((k, v));
        }
        parts.sort();
        Ok(Self(parts))
    }

    fn of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Self> {
        let mut parts = Vec::new();
        for attr in cert.subject().iter_attributes() {
            let oid = attr.attr_type().to_id_string();
            let name = match oid.as_str() {
                "2.5.4.3" => "CN",
                "2.5.4.6" => "C",
                "2.5.4.10" => "O",
                "2.5.4.11" => "OU",
                "2.5.4.7" => "L",
                "2.5.4.8" => "ST",
                "2.5.4.5" => "SERIALNUMBER",
                "2.5.4.12" => "TITLE",
                "1.2.840.113549.1.9.1" => "EMAILADDRESS",
                "0.9.2342.19200300.100.1.1" => "UID",
                other => other,
            };
            parts.push((name.to_string(), attr.as_str().ok()?.to_string()));
        }
        parts.sort();
        Some(Self(parts))
    }
}

/// The identity a certificate names: its `spiffe://<trust_domain>/<kind>/<id>` URI SAN, or, for a
/// certificate without any such SAN, the peer whose `certificate_subject` is its subject.
fn certificate_name(
    der: &[u8],
    trust_domain: &str,
    by_subject: &HashMap<SubjectKey, Identity>,
) -> Result<Identity, AuthError> {
    let bad = |why: String| AuthError::Certificate(why);
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    let prefix = format!("spiffe://{trust_domain}/");
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("its subject alternative names do not parse ({e})")))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let mut found = None;
    for name in sans {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(rest) = uri.strip_prefix(&prefix) {
                if found.is_some() {
                    return Err(bad("it names more than one peer".into()));
                }
                found = Some(rest.to_string());
            }
        }
    }
    let Some(rest) = found else {
        if let Some(id) = SubjectKey::of(&cert).and_then(|k| by_subject.get(&k).cloned()) {
            return Ok(id);
        }
        return Err(bad(format!(
            // Quoted and escaped: the subject is the peer's text, and it reaches logs and statuses.
            "it has no URI SAN {prefix}<agent|subscriber>/<id>, and no peer's certificate_subject is {:?}",
            cert.subject().to_string()
        )));
    };
    match rest.split_once('/') {
        Some(("agent", id)) if valid_id(id) => Ok(Identity::Agent(id.into())),
        Some(("subscriber", id)) if valid_id(id) => Ok(Identity::Subscriber(id.into())),
        Some(("operator", id)) if valid_id(id) => Ok(Identity::Operator { id: id.into(), role: Role::Read }),
        _ => Err(bad(format!("{prefix}{rest} is not {prefix}<agent|subscriber|operator>/<id>"))),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

/// Every credential the hub accepts.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_digest: HashMap<String, Identity>,
    /// Agents and subscribers the config lists: a certificate naming anyone else is refused.
    known: std::collections::HashSet<(bool, String)>,
    /// `None`: clear-text demo, tokens only.
    tls: Option<(crate::config::AuthMode, String)>,
    /// Operators by id, with their roles (for operators known by their certificate).
    operator_roles: HashMap<String, Role>,
    /// Peers known by their certificate's subject (`certificate_subject`).
    by_subject: HashMap<SubjectKey, Identity>,
}

impl Authenticator {
    /// The credentials of `config`: agents, subscribers and operators. Two peers sharing a token
    /// are refused by the config's validation, so each digest names one identity.
    pub fn new(config: &crate::config::HubConfig) -> Self {
        let mut by_digest = HashMap::new();
        let mut known = std::collections::HashSet::new();
        known.extend(config.agents.iter().map(|a| (true, a.id.clone())));
        known.extend(config.subscribers.iter().map(|s| (false, s.id.clone())));
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
        let tls = config.tls.as_ref().map(|t| (t.mode, t.trust_domain.clone()));
        let mut operator_roles = HashMap::new();
        if let Some(admin) = &config.admin {
            operator_roles.insert("admin".to_string(), Role::Admin);
            operator_roles.extend(admin.operators.iter().map(|o| (o.id.clone(), o.role)));
        }
        let mut by_subject = HashMap::new();
        let mut subject = |text: &Option<String>, id: Identity| {
            if let Some(k) = text.as_deref().and_then(|t| SubjectKey::parse(t).ok()) {
                by_subject.insert(k, id);
            }
        };
        for a in &config.agents {
            subject(&a.certificate_subject, Identity::Agent(a.id.clone()));
        }
        for s in &config.subscribers {
            subject(&s.certificate_subject, Identity::Subscriber(s.id.clone()));
        }
        if let Some(admin) = &config.admin {
            for o in &admin.operators {
                subject(&o.certificate_subject, Identity::Operator { id: o.id.clone(), role: Role::Read });
            }
        }
        Self { by_digest, known, tls, operator_roles, by_subject }
    }

    /// The identity an `authorization` header value proves.
    pub fn identify(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let token = bearer(header)?;
        self.by_digest.get(&digest(token)).cloned().ok_or(AuthError::Unknown)
    }

    /// The identity a gRPC peer's credentials prove, as `tls.mode` requires.
    pub fn establish(&self, c: Credentials<'_>) -> Result<Identity, AuthError> {
        use crate::config::AuthMode;
        let Some((mode, domain)) = &self.tls else { return self.identify(c.authorization) };
        let from_cert = || -> Result<Identity, AuthError> {
            let der = c.certificate.ok_or(AuthError::NoCertificate)?;
            let id = certificate_name(der, domain, &self.by_subject)?;
            let listed = match &id {
                Identity::Agent(a) => self.known.contains(&(true, a.clone())),
                Identity::Subscriber(s) => self.known.contains(&(false, s.clone())),
                Identity::Operator { .. } => true,
            };
            if !listed {
                return Err(AuthError::Certificate(format!("{} is not in this hub's configuration", id.describe())));
            }
            Ok(id)
        };
        match mode {
            AuthMode::Token => self.identify(c.authorization),
            AuthMode::Mtls => from_cert(),
            AuthMode::MtlsAndToken => {
                let cert = from_cert()?;
                let token = self.identify(c.authorization)?;
                if cert != token {
                    return Err(AuthError::Mismatch { cert: cert.describe(), token: token.describe() });
                }
                Ok(cert)
            }
        }
    }

    /// The agent a gRPC peer's credentials prove.
    pub fn agent(&self, c: Credentials<'_>) -> Result<String, AuthError> {
        match self.establish(c)? {
            Identity::Agent(id) => Ok(id),
            other => Err(AuthError::WrongKind(other.describe())),
        }
    }

    /// The subscriber a gRPC peer's credentials prove.
    pub fn subscriber(&self, c: Credentials<'_>) -> Result<String, AuthError> {
        match self.establish(c)? {
            Identity::Subscriber(id) => Ok(id),
            other => Err(AuthError::WrongKind(other.describe())),
        }
    }

    /// The operator an admin request's credentials prove, if its role reaches `needed`. Over HTTPS
    /// an operator may present a client certificate (`spiffe://…/operator/<id>`, its role from
    /// `admin.operators`), a token, or both, which must then name the same operator.
    pub fn operator(&self, c: Credentials<'_>, needed: Role) -> Result<(String, Role), AuthError> {
        let from_cert = match (c.certificate, &self.tls) {
            (Some(der), Some((_, domain))) => match certificate_name(der, domain, &self.by_subject)? {
                Identity::Operator { id, .. } => {
                    let role = self.operator_roles.get(&id).copied().ok_or_else(|| {
                        AuthError::Certificate(format!("operator {id} is not in this hub's configuration"))
                    })?;
                    Some(Identity::Operator { id, role })
                }
                other => return Err(AuthError::WrongKind(other.describe())),
            },
            _ => None,
        };
        let from_token = c.authorization.map(|h| self.identify(Some(h))).transpose()?;
        let identity = match (from_cert, from_token) {
            (Some(cert), Some(token)) if cert != token => {
                return Err(AuthError::Mismatch { cert: cert.describe(), token: token.describe() })
            }
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) => return Err(AuthError::Missing),
        };
        match identity {
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
insecure_plaintext_demo = true
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
        let t = |h: &'static str| Credentials { certificate: None, authorization: Some(h) };
        assert_eq!(auth.agent(t("Bearer a")).unwrap(), "hcm");
        assert_eq!(auth.subscriber(t("Bearer b")).unwrap(), "bhxh", "sha256(\"b\") from the config");
        assert_eq!(auth.operator(t("Bearer root"), Role::Admin).unwrap(), ("admin".into(), Role::Admin));
        assert_eq!(auth.operator(t("Bearer look"), Role::Read).unwrap(), ("dashboard".into(), Role::Read));
        assert!(matches!(auth.operator(t("Bearer look"), Role::Admin), Err(AuthError::WrongKind(_))));
        assert_eq!(auth.agent(t("Bearer b")), Err(AuthError::WrongKind("subscriber bhxh".into())));
        assert_eq!(auth.agent(t("Bearer nope")), Err(AuthError::Unknown));
        assert_eq!(auth.agent(t("Basic a")), Err(AuthError::Malformed));
        assert_eq!(auth.agent(t("Bearer ")), Err(AuthError::Malformed));
        assert_eq!(auth.agent(Credentials::default()), Err(AuthError::Missing));
        let shown = format!("{:?} {}", auth.agent(t("Bearer secret-x")), AuthError::Unknown);
        assert!(!shown.contains("secret-x"), "{shown}");
    }

    #[test]
    fn a_certificate_without_a_spiffe_name_is_known_by_its_configured_subject() {
        let text = r#"
listen = "127.0.0.1:1"
[tls]
cert_file = "h.pem"
key_file = "h.key"
client_ca_file = "ca.pem"
mode = "mtls"
[ndc]
host = "/tmp"
database = "d"
user = "u"
[[agents]]
id = "hcm-population"
certificate_subject = "C = VN, O = So TTTT TP.HCM, CN = hcm-population"
[[agents]]
id = "da-nang-health"
"#;
        let config: crate::config::HubConfig = toml::from_str(text).unwrap();
        let auth = Authenticator::new(&config);
        let cert = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.distinguished_name.push(rcgen::DnType::CountryName, "VN");
            p.distinguished_name.push(rcgen::DnType::OrganizationName, "So TTTT TP.HCM");
            p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
        };
        let der = cert("hcm-population");
        let c = Credentials { certificate: Some(&der), authorization: None };
        assert_eq!(auth.agent(c).unwrap(), "hcm-population", "attributes in another order and spacing");
        let other = cert("someone-else");
        let refused = auth.agent(Credentials { certificate: Some(&other), authorization: None }).unwrap_err();
        assert!(refused.to_string().contains("certificate_subject"), "{refused}");
        assert!(SubjectKey::parse("CN=a, no-equals").is_err());
    }
}
