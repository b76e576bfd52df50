//! How a dongbo Kafka client (the agent's producer, the hub's consumer and subscription producers)
//! protects its link and proves who it is: `[kafka.tls]` and `[kafka.sasl]`, turned into librdkafka
//! settings in one place.
//!
//! Contract:
//! - TLS is required: without `[kafka.tls]` the config is refused unless `insecure_plaintext_demo`
//!   is set (a demo on one machine or one private network), as for the hub's gRPC listener.
//! - The broker's certificate must chain to `tls.ca_file` and name the broker's host
//!   (`ssl.endpoint.identification.algorithm = https`); a client certificate is presented when
//!   `tls.cert_file`/`key_file` are set (mutual TLS).
//! - SASL is SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN; PLAIN only over TLS. The password is read from
//!   `password_file` when the client is made, never written in the config.
//! - The settings these tables own cannot be set through `properties` too, so there is one way to
//!   configure security and no way to turn verification off behind it.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[cfg(feature = "kafka")]
use rdkafka::config::ClientConfig;
use serde::Deserialize;

/// `[kafka.tls]`: TLS to the brokers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// PEM file of the CA certificate(s) the brokers' certificates must chain to.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[kafka.sasl]`: the client's SASL credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// `SCRAM-SHA-256`, `SCRAM-SHA-512` or `PLAIN`.
    pub mechanism: String,
    /// The SASL user name.
    pub username: String,
    /// File holding the password (first line), read when the client is made.
    pub password_file: PathBuf,
}

/// Settings `[kafka.tls]` and `[kafka.sasl]` own; `properties` may not set them.
const OWNED: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "enable.ssl.certificate.verification",
    "ssl.endpoint.identification.algorithm",
];

/// A Kafka client's security settings, as read from its `[kafka]` section.
#[derive(Debug, Clone, Copy)]
pub struct KafkaSecurity<'a> {
    /// `[kafka.tls]`.
    pub tls: Option<&'a KafkaTls>,
    /// `[kafka.sasl]`.
    pub sasl: Option<&'a KafkaSasl>,
    /// `kafka.insecure_plaintext_demo`.
    pub insecure_plaintext_demo: bool,
    /// `kafka.properties`.
    pub properties: &'a BTreeMap<String, String>,
}

impl KafkaSecurity<'_> {
    /// Every problem, without I/O.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        match (self.tls, self.insecure_plaintext_demo) {
            (None, false) => p.push(
                "kafka: the link would carry citizens' data in clear text; set [kafka.tls] ca_file (with \
                 [kafka.sasl] or a client certificate), or kafka.insecure_plaintext_demo = true for a demo \
                 on one machine"
                    .into(),
            ),
            (Some(_), true) => {
                p.push("kafka.insecure_plaintext_demo = true contradicts [kafka.tls]: remove one".into())
            }
            _ => {}
        }
        if let Some(t) = self.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                p.push("set both kafka.tls.cert_file and kafka.tls.key_file, or neither".into());
            }
        }
        if let Some(s) = self.sasl {
            if !["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"].contains(&s.mechanism.as_str()) {
                p.push(format!("kafka.sasl.mechanism {:?} is not SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN", s.mechanism));
            }
            if s.mechanism == "PLAIN" && self.tls.is_none() {
                p.push("kafka.sasl.mechanism PLAIN sends the password as it is: it needs [kafka.tls]".into());
            }
            if s.username.is_empty() {
                p.push("kafka.sasl.username is empty".into());
            }
        }
        for key in self.properties.keys() {
            if OWNED.contains(&key.as_str()) {
                p.push(format!("kafka.properties may not set {key:?}: [kafka.tls] and [kafka.sasl] set it"));
            }
        }
        p
    }

    /// Adds the librdkafka settings to `c`, reading the SASL password file now. Call after
    /// `validate`.
    #[cfg(feature = "kafka")]
    pub fn apply(&self, c: &mut ClientConfig) -> Result<(), String> {
        let protocol = match (self.tls.is_some(), self.sasl.is_some()) {
            (true, true) => "SASL_SSL",
            (true, false) => "SSL",
            (false, true) => "SASL_PLAINTEXT",
            (false, false) => "PLAINTEXT",
        };
        c.set("security.protocol", protocol);
        if let Some(t) = self.tls {
            c.set("ssl.ca.location", t.ca_file.to_string_lossy());
            c.set("enable.ssl.certificate.verification", "true");
            c.set("ssl.endpoint.identification.algorithm", "https");
            if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
                c.set("ssl.certificate.location", cert.to_string_lossy());
                c.set("ssl.key.location", key.to_string_lossy());
            }
        }
        if let Some(s) = self.sasl {
            let password = crate::config_file::read_secret(&s.password_file)
                .map_err(|e| format!("cannot read kafka.sasl.password_file {}: {e}", s.password_file.display()))?;
            c.set("sasl.mechanism", &s.mechanism);
            c.set("sasl.username", &s.username);
            c.set("sasl.password", password);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security<'a>(
        tls: Option<&'a KafkaTls>,
        sasl: Option<&'a KafkaSasl>,
        demo: bool,
        properties: &'a BTreeMap<String, String>,
    ) -> KafkaSecurity<'a> {
        KafkaSecurity { tls, sasl, insecure_plaintext_demo: demo, properties }
    }

    #[test]
    fn clear_text_needs_the_demo_flag_and_owned_settings_cannot_come_through_properties() {
        let none = BTreeMap::new();
        let p = security(None, None, false, &none).validate();
        assert!(p.len() == 1 && p[0].contains("clear text"), "{p:?}");
        assert!(security(None, None, true, &none).validate().is_empty());
        let tls = KafkaTls { ca_file: "ca.pem".into(), cert_file: None, key_file: None };
        assert!(security(Some(&tls), None, false, &none).validate().is_empty());
        let sneaky = BTreeMap::from([("enable.ssl.certificate.verification".to_string(), "false".to_string())]);
        let p = security(Some(&tls), None, false, &sneaky).validate();
        assert!(p.len() == 1 && p[0].contains("enable.ssl.certificate.verification"), "{p:?}");
        let plain = KafkaSasl { mechanism: "PLAIN".into(), username: "u".into(), password_file: "pw".into() };
        assert_eq!(security(None, Some(&plain), true, &none).validate().len(), 1, "PLAIN without TLS");
        let gssapi = KafkaSasl { mechanism: "GSSAPI".into(), ..plain.clone() };
        assert_eq!(security(Some(&tls), Some(&gssapi), false, &none).validate().len(), 1);
    }

    #[test]
    #[cfg(feature = "kafka")]
    fn sasl_over_tls_becomes_sasl_ssl_with_the_password_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let tls = KafkaTls { ca_file: "/ca.pem".into(), cert_file: None, key_file: None };
        let sasl = KafkaSasl { mechanism: "SCRAM-SHA-512".into(), username: "hcm".into(), password_file: pw };
        let none = BTreeMap::new();
        let mut c = ClientConfig::new();
        security(Some(&tls), Some(&sasl), false, &none).apply(&mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("ssl.endpoint.identification.algorithm"), Some("https"));
        let missing = KafkaSasl { password_file: dir.path().join("nope"), ..sasl };
        let e = security(Some(&tls), Some(&missing), false, &none).apply(&mut ClientConfig::new()).unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }
}
