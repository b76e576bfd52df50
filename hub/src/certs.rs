//! Certificates for a demo, a test or a small deployment: `dongbo-hub certs` makes a CA and issues
//! hub, agent, subscriber and operator certificates with it (rcgen).
//!
//! A peer's certificate names it by a URI SAN `spiffe://<trust domain>/<kind>/<id>` (the X-Road
//! model: every member known centrally by its certificate), carries the client-auth usage, and is
//! valid for `days`. The hub's certificate carries its DNS names and IP addresses and the
//! server-auth usage. Private keys are written with mode 0600. In production the agent makes its key
//! and a CSR, and the NDC's CA signs it; this module is the small CA for everything else.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The hub's server certificate.
    Hub,
    /// An agent (`spiffe://…/agent/<id>`).
    Agent,
    /// A subscriber (`spiffe://…/subscriber/<id>`).
    Subscriber,
    /// An operator of the admin API (`spiffe://…/operator/<id>`).
    Operator,
    /// Another TLS server of the deployment (a source or NDC Postgres, a Kafka listener): its
    /// DNS names and addresses, like the hub's.
    Server,
    /// A client of such a server, named by its common name only (Postgres `cert` authentication
    /// maps the common name to the role).
    Client,
}

/// Making or reading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen refused the parameters or the CA files.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_path_buf(), source }
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(path))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    let mut f = options.open(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io(path))
}

/// Makes a CA in `dir` (`ca.pem`, `ca.key`) named `name`, valid for `days`.
pub fn make_ca(dir: &Path, name: &str, days: i64) -> Result<(), CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days, false);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.pem"), &cert.pem(), false)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)
}

fn validity(params: &mut CertificateParams, days: i64, expired: bool) {
    let now = time::OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
    } else {
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(days);
    }
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its kind.
    pub kind: Kind,
    /// The peer's id (for the hub: its common name).
    pub id: String,
    /// The trust domain of the URI SAN.
    pub trust_domain: String,
    /// DNS names and IP addresses (the hub's).
    pub hosts: Vec<String>,
    /// Validity from now.
    pub days: i64,
    /// Issue it already expired (to test that it is refused).
    pub expired: bool,
}

/// The CA in `ca_dir`, ready to sign.
fn load_ca(ca_dir: &Path) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).map_err(io(&ca_dir.join("ca.pem")))?;
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).map_err(io(&ca_dir.join("ca.key")))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    Ok((ca, ca_key))
}

/// What a certificate of `r` says: its name, usages, SANs and validity. The CA decides all of it,
/// whatever a CSR asked for.
fn params_for(r: &Request) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, r.id.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    validity(&mut params, r.days, r.expired);
    match r.kind {
        Kind::Hub | Kind::Server => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for h in &r.hosts {
                params.subject_alt_names.push(match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(h.as_str().try_into()?),
                });
            }
        }
        Kind::Client => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
        kind => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let path = match kind {
                Kind::Agent => "agent",
                Kind::Subscriber => "subscriber",
                _ => "operator",
            };
            let uri = format!("spiffe://{}/{path}/{}", r.trust_domain, r.id);
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into()?));
        }
    }
    Ok(params)
}

fn with_ext(out: &Path, ext: &str) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(ext);
    PathBuf::from(p)
}

/// Issues a certificate signed by the CA in `ca_dir`, with a key made here, written to `<out>.pem`
/// and `<out>.key`.
pub fn issue(ca_dir: &Path, out: &Path, r: &Request) -> Result<(), CertError> {
    let (ca, ca_key) = load_ca(ca_dir)?;
    let key = KeyPair::generate()?;
    let cert = params_for(r)?.signed_by(&key, &ca, &ca_key)?;
    write(&with_ext(out, ".pem"), &cert.pem(), false)?;
    write(&with_ext(out, ".key"), &key.serialize_pem(), true)
}

/// Signs the CSR at `csr` (PEM) with the CA in `ca_dir`, written to `<out>.pem`: the production
/// flow, where the private key never leaves the peer's machine. The CSR's signature must check
/// (the peer holds the key); its requested names and usages are ignored, the certificate says what
/// `r` says.
pub fn sign_csr(ca_dir: &Path, csr: &Path, out: &Path, r: &Request) -> Result<(), CertError> {
    let (ca, ca_key) = load_ca(ca_dir)?;
    let pem = std::fs::read_to_string(csr).map_err(io(csr))?;
    let mut request = rcgen::CertificateSigningRequestParams::from_pem(&pem)?;
    request.params = params_for(r)?;
    let cert = request.signed_by(&ca, &ca_key)?;
    write(&with_ext(out, ".pem"), &cert.pem(), false)
}

/// The SHA-256 fingerprint (hex) of the first certificate in the PEM file at `path`.
pub fn fingerprint(path: &Path) -> Result<String, CertError> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| CertError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    Ok(crate::server_tls::fingerprint_hex(&der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{certificate_identity, Identity};

    #[test]
    fn issued_certificates_name_their_peer() {
        let dir = std::env::temp_dir().join(format!("dongbo-certs-{}", rand::random::<u64>()));
        make_ca(&dir, "test CA", 30).unwrap();
        let r = |kind, id: &str| Request {
            kind,
            id: id.into(),
            trust_domain: "ndc.gov.vn".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            days: 30,
            expired: false,
        };
        issue(&dir, &dir.join("hcm"), &r(Kind::Agent, "hcm-population")).unwrap();
        issue(&dir, &dir.join("hub"), &r(Kind::Hub, "hub")).unwrap();
        let pem = std::fs::read(dir.join("hcm.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let der = pem.contents;
        assert_eq!(certificate_identity(&der, "ndc.gov.vn").unwrap(), Identity::Agent("hcm-population".into()));
        assert!(certificate_identity(&der, "other.example").is_err(), "another trust domain");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("hcm.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_csr_gets_the_identity_the_ca_decides_and_a_forged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("dongbo-csr-{}", rand::random::<u64>()));
        make_ca(&dir, "test CA", 30).unwrap();
        // The province asks for more than it should: another agent's name and server usage.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["ndc-hub.example.gov.vn".to_string()]).unwrap();
        asked.subject_alt_names.push(SanType::URI("spiffe://ndc.gov.vn/agent/da-nang-health".try_into().unwrap()));
        let csr = asked.serialize_request(&key).unwrap();
        std::fs::write(dir.join("hcm.csr"), csr.pem().unwrap()).unwrap();
        let r = Request {
            kind: Kind::Agent,
            id: "hcm-population".into(),
            trust_domain: "ndc.gov.vn".into(),
            hosts: Vec::new(),
            days: 30,
            expired: false,
        };
        sign_csr(&dir, &dir.join("hcm.csr"), &dir.join("hcm"), &r).unwrap();
        let pem = std::fs::read(dir.join("hcm.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        assert_eq!(
            certificate_identity(&pem.contents, "ndc.gov.vn").unwrap(),
            Identity::Agent("hcm-population".into())
        );
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.public_key().raw, key.public_key_der().as_slice(), "the CSR's key, not a new one");
        assert!(!dir.join("hcm.key").exists(), "the key never leaves the province");
        // A CSR whose signature does not match its key (altered in transit) is refused.
        let text = csr.pem().unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let body = lines.len() - 2; // the last line of base64, in the signature
        let flipped: String = lines[body]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 4 {
                    if c == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    c
                }
            })
            .collect();
        lines[body] = flipped;
        std::fs::write(dir.join("forged.csr"), lines.join("\n")).unwrap();
        assert!(sign_csr(&dir, &dir.join("forged.csr"), &dir.join("forged"), &r).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
