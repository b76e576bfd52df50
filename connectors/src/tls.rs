//! Certificates as operators see them: when a PEM certificate file stops being valid, so that the
//! agent's `check` and the hub can warn weeks before a link breaks.

use std::path::Path;

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
