//! TLS pieces every link shares: the database clients' settings ([`DbTlsConfig`]), certificates as
//! operators see them (when a PEM certificate stops being valid, so that the agent's `check` and the
//! hub warn weeks before a link breaks), and noticing rotated files.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How much TLS a connection to a database server insists on (libpq's `sslmode`, without
/// `allow`/`prefer`, which fall back to clear text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Clear text.
    Disable,
    /// Encrypted; the certificate is checked only if `ca_file` is set.
    Require,
    /// Encrypted; the certificate must chain to `ca_file`.
    VerifyCa,
    /// Encrypted; the certificate must chain to `ca_file` and name the host.
    VerifyFull,
}

impl SslMode {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The `tls` table of a database connection's config (`[source.tls]` of a Postgres or MySQL source,
/// `[ndc.tls]`). Paths only, no secrets: it may be printed. The defaults and modes are documented
/// with the Postgres client ([`crate::postgres::tls`]); MySQL follows the same rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbTlsConfig {
    /// `disable`, `require`, `verify-ca` or `verify-full`; see the module docs for the default.
    #[serde(default)]
    pub mode: Option<SslMode>,
    /// PEM file of the CA certificate(s) the server's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that authenticate by certificate.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Whether `host` is a Unix socket directory or a loopback address: traffic that stays on the machine.
pub fn is_local(host: &str) -> bool {
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

impl DbTlsConfig {
    /// The mode in force for `host`: the configured one, or the default of the module docs.
    pub fn mode_for(&self, host: &str) -> SslMode {
        if host.starts_with('/') {
            return SslMode::Disable;
        }
        self.mode.unwrap_or(if is_local(host) { SslMode::Disable } else { SslMode::VerifyFull })
    }

    /// Every problem with these settings for `host`, without I/O; `section` names the table in
    /// messages (`source.tls`, `ndc.tls`).
    pub fn validate(&self, host: &str, section: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mode = self.mode_for(host);
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.ca_file.is_none() {
            let why = if self.mode.is_none() { " (the default for a host that is not on this machine)" } else { "" };
            problems.push(format!(
                "{section}.mode is {}{why} and needs {section}.ca_file, the CA that signed the server's certificate; \
                 set mode = \"require\" to encrypt without checking, or \"disable\" only where the link cannot be overheard",
                mode.as_str()
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(format!("set both {section}.cert_file and {section}.key_file, or neither"));
        }
        if host.starts_with('/') && self.mode.is_some_and(|m| m != SslMode::Disable) {
            problems.push(format!(
                "{section}.mode is {} but the host is a Unix socket, where Postgres never speaks TLS",
                self.mode.map_or("", SslMode::as_str)
            ));
        }
        problems
    }
}

/// Warn this many days before a certificate expires: time for provincial IT to get a new one.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What a certificate file says about its validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    /// The certificate's subject, for the message.
    pub subject: String,
    /// Its `notAfter`, RFC 2822 text.
    pub not_after: String,
    /// Whole days from now until `notAfter` (negative once expired).
    pub days_left: i64,
    /// `notAfter` in Unix seconds.
    pub not_after_s: i64,
}

/// The validity of the first certificate in the PEM file at `path`.
pub fn certificate_validity(path: &Path) -> Result<Validity, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes)
        .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))?;
    let cert = pem.parse_x509().map_err(|e| format!("{} is not an X.509 certificate: {e}", path.display()))?;
    let not_after = cert.validity().not_after;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Ok(Validity {
        subject: cert.subject().to_string(),
        not_after: not_after.to_rfc2822().unwrap_or_else(|_| not_after.timestamp().to_string()),
        days_left: (not_after.timestamp() - now).div_euclid(86_400),
        not_after_s: not_after.timestamp(),
    })
}

/// The modification time and length of some files, to notice that one was replaced (a rotated
/// certificate or key) without a file-system notification API.
#[derive(Debug, Clone)]
pub struct FileStamps {
    paths: Vec<std::path::PathBuf>,
    last: Vec<Option<(std::time::SystemTime, u64)>>,
}

impl FileStamps {
    /// Stamps `paths` as they are now.
    pub fn new(paths: Vec<std::path::PathBuf>) -> Self {
        let last = stamps(&paths);
        Self { paths, last }
    }

    /// Whether a file changed (or appeared, or went) since the last call; remembers the new state.
    pub fn changed(&mut self) -> bool {
        let now = stamps(&self.paths);
        let changed = now != self.last;
        self.last = now;
        changed
    }
}

fn stamps(paths: &[std::path::PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_noticed_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cert.pem");
        std::fs::write(&f, "one").unwrap();
        let mut s = FileStamps::new(vec![f.clone()]);
        assert!(!s.changed());
        std::fs::write(&f, "two, longer").unwrap();
        assert!(s.changed());
        assert!(!s.changed());
        std::fs::remove_file(&f).unwrap();
        assert!(s.changed());
    }
}

#[cfg(test)]
mod db_tls_tests {
    use super::*;

    #[test]
    fn the_default_is_verify_full_off_the_machine_and_clear_text_on_it() {
        let none = DbTlsConfig::default();
        assert_eq!(none.mode_for("10.1.2.3"), SslMode::VerifyFull);
        assert_eq!(none.mode_for("db.hcm.gov.vn"), SslMode::VerifyFull);
        for local in ["127.0.0.1", "::1", "localhost", "/var/run/postgresql"] {
            assert_eq!(none.mode_for(local), SslMode::Disable, "{local}");
        }
        let required = DbTlsConfig { mode: Some(SslMode::Require), ..Default::default() };
        assert_eq!(required.mode_for("127.0.0.1"), SslMode::Require);
        assert_eq!(required.mode_for("/tmp"), SslMode::Disable);
    }

    #[test]
    fn verifying_modes_without_a_ca_are_refused_with_what_to_set() {
        let p = DbTlsConfig::default().validate("10.1.2.3", "source.tls");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("source.tls.ca_file") && p[0].contains("verify-full"), "{p:?}");
        let ca = DbTlsConfig { mode: Some(SslMode::VerifyCa), ..Default::default() }.validate("127.0.0.1", "ndc.tls");
        assert!(ca[0].contains("ndc.tls.ca_file"), "{ca:?}");
        let half = DbTlsConfig { mode: Some(SslMode::Require), cert_file: Some("c.pem".into()), ..Default::default() };
        assert_eq!(half.validate("10.1.2.3", "ndc.tls").len(), 1);
        assert!(DbTlsConfig { mode: Some(SslMode::Require), ..Default::default() }.validate("/tmp", "x")[0]
            .contains("Unix socket"));
        assert!(DbTlsConfig::default().validate("127.0.0.1", "x").is_empty());
    }
}
