//! The hub's config file (`hub.toml`).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::fanout::subscription::{Catalog, DictionaryTable, EventRule, Purpose, Subscriber, SubscriptionDef};

/// Everything the hub needs, read from one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// gRPC listen address for agents, e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// The NDC Postgres database.
    pub ndc: NdcConfig,
    /// Agents allowed to connect.
    #[serde(default)]
    pub agents: Vec<AgentAcl>,
    /// Apply tuning.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// The fan-out log.
    #[serde(default)]
    pub fanout: FanoutConfig,
    /// The admin API (subscriptions, dead letters, audit) for operators and the CLI.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Tables of the national data dictionary subscribers may follow.
    #[serde(default)]
    pub dictionary: Vec<DictionaryTable>,
    /// Source tables mapped onto the national tables, with the remap and conflict rules.
    #[serde(default)]
    pub national: crate::dictionary::NationalConfig,
    /// The file this was read from, read again when the hub reloads its dictionary (SIGHUP).
    #[serde(skip)]
    pub loaded_from: Option<std::path::PathBuf>,
    /// Domain event rules.
    #[serde(default)]
    pub events: Vec<EventRule>,
    /// Legal purposes and the fields each allows.
    #[serde(default)]
    pub purposes: Vec<Purpose>,
    /// Downstream systems allowed to subscribe.
    #[serde(default)]
    pub subscribers: Vec<Subscriber>,
    /// Subscriptions declared here (more can be added at run time).
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionDef>,
    /// Consume agents' Kafka topics as a member of a consumer group (beside the gRPC ingest).
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// Anchoring the audit chain outside the NDC.
    #[serde(default)]
    pub audit: AuditConfig,
    /// What a peer can make the hub spend.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// TLS on the gRPC listener, with client certificates (mutual TLS).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve gRPC in clear text with bearer tokens only: for a demo or a test on one machine,
    /// never in production. Without `[tls]` the hub refuses to start unless this is true.
    #[serde(default)]
    pub insecure_plaintext_demo: bool,
}

/// How peers prove who they are on the gRPC listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// A client certificate signed by `client_ca_file`; its URI SAN names the peer.
    Mtls,
    /// A bearer token only (the channel is still TLS).
    Token,
    /// Both, and they must name the same peer.
    #[serde(rename = "mtls+token")]
    MtlsAndToken,
}

/// TLS on the hub's gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The hub's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The hub's private key (PEM).
    pub key_file: PathBuf,
    /// The CA(s) that sign agents' and subscribers' certificates (PEM).
    pub client_ca_file: PathBuf,
    /// Certificates name peers by a URI SAN `spiffe://<trust_domain>/<agent|subscriber>/<id>`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// What a peer must present.
    #[serde(default = "default_auth_mode")]
    pub mode: AuthMode,
    /// Revoked client certificates: one SHA-256 fingerprint per line (`dongbo-hub certs
    /// fingerprint` prints one). Reloaded with the other files on SIGHUP or when it changes.
    #[serde(default)]
    pub revoked_file: Option<PathBuf>,
}

fn default_trust_domain() -> String {
    "ndc.gov.vn".into()
}
fn default_auth_mode() -> AuthMode {
    AuthMode::MtlsAndToken
}

/// Every resource a peer (agent, subscriber, operator or a stranger) can make the hub spend, bounded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest gRPC message, decompressed. Agents split their batches to fit (their
    /// `hub.max_message_bytes` must not exceed it); a single change larger than this cannot be sent.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most changes in one batch an agent may send.
    #[serde(default = "default_max_changes_per_batch")]
    pub max_changes_per_batch: usize,
    /// Encoded batches one stream may hold in the hub between decoding and the NDC commit.
    #[serde(default = "default_stream_buffer_bytes")]
    pub stream_buffer_bytes: usize,
    /// NDC connections the hub's appliers (agent streams, Kafka partitions) hold at most together.
    #[serde(default = "default_max_ndc_connections")]
    pub max_ndc_connections: usize,
    /// Open connections on each listener (gRPC, admin) at most; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A new connection must send its first bytes this soon (slow or silent peers are dropped).
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing for this long is closed; the hub pings live HTTP/2 peers
    /// every third of it, so only dead or silent ones reach it.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How long a new stream of an agent waits for its older stream to end before giving up.
    #[serde(default = "default_replace_wait_ms")]
    pub replace_wait_ms: u64,
}

/// 64 MiB holds a batch of thousands of wide rows or one large TOASTed value, and keeps what a
/// peer can make tonic reserve per stream well below the hub's memory.
fn default_max_message_bytes() -> usize {
    64 << 20
}
/// Five times the agent's default batch (20 000 changes).
fn default_max_changes_per_batch() -> usize {
    100_000
}
/// Two full messages in flight between the reader and the NDC transaction keep the NDC busy.
fn default_stream_buffer_bytes() -> usize {
    128 << 20
}
/// Postgres defaults to 100 connections; leave room for operators and other clients.
fn default_max_ndc_connections() -> usize {
    64
}
/// Far below the units' `LimitNOFILE` (65 536), far above one hub's agents and subscribers.
fn default_max_connections() -> usize {
    4096
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_replace_wait_ms() -> u64 {
    10_000
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
            max_changes_per_batch: default_max_changes_per_batch(),
            stream_buffer_bytes: default_stream_buffer_bytes(),
            max_ndc_connections: default_max_ndc_connections(),
            max_connections: default_max_connections(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            replace_wait_ms: default_replace_wait_ms(),
        }
    }
}

/// Signed checkpoints of the audit chain, kept outside the NDC (see `audit::checkpoint`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the append-only checkpoint file; default `<fanout.data_dir>/audit-checkpoints`.
    /// Put it where the NDC's administrators cannot write.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// The Ed25519 secret key (64 hex digits), created with mode 0600 if missing; default
    /// `<fanout.data_dir>/audit-signing.key`. Never store it in the NDC.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// Seconds between checkpoints: entries newer than the last one are not yet anchored.
    #[serde(default)]
    pub checkpoint_interval_s: Option<u64>,
    /// Also POST each checkpoint (JSON) to this URL, run by another party (redirects not followed).
    #[serde(default)]
    pub witness_url: Option<String>,
    /// Seconds between full checks of the chain against the signed checkpoints (its result is
    /// `dongbo_audit_chain_broken`); the first runs at start. 0 turns them off.
    #[serde(default)]
    pub verify_interval_s: Option<u64>,
}

/// A minute of deliveries at most is unanchored, and a checkpoint a minute is ~200 bytes.
const DEFAULT_CHECKPOINT_INTERVAL_S: u64 = 60;
/// A full check walks the whole chain (about a second per million entries): hourly keeps an edit
/// of an old entry from going unnoticed for long.
const DEFAULT_VERIFY_INTERVAL_S: u64 = 3600;

impl HubConfig {
    /// The audit checkpoint directory.
    pub fn audit_checkpoint_dir(&self) -> PathBuf {
        self.audit.checkpoint_dir.clone().unwrap_or_else(|| self.fanout.data_dir.join("audit-checkpoints"))
    }

    /// The audit signing key file.
    pub fn audit_signing_key_file(&self) -> PathBuf {
        self.audit.signing_key_file.clone().unwrap_or_else(|| self.fanout.data_dir.join("audit-signing.key"))
    }

    /// Time between audit checkpoints.
    pub fn audit_checkpoint_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.audit.checkpoint_interval_s.unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_S))
    }

    /// Time between full checks of the audit chain; `None` when turned off.
    pub fn audit_verify_interval(&self) -> Option<std::time::Duration> {
        match self.audit.verify_interval_s.unwrap_or(DEFAULT_VERIFY_INTERVAL_S) {
            0 => None,
            s => Some(std::time::Duration::from_secs(s)),
        }
    }
}

/// The hub as a Kafka consumer: every hub of one NDC uses the same `group_id`, and the group shares
/// the partitions of the agents' topics.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The consumer group of this NDC's hubs.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// An agent's topic is this prefix and its id (the agents' default).
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Further librdkafka properties (tuning such as `socket.keepalive.enable`), passed as they are;
    /// security settings come from `tls` and `sasl`.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// `[kafka.tls]`: TLS to the brokers (required unless `insecure_plaintext_demo`).
    #[serde(default)]
    pub tls: Option<dongbo_connectors::kafka::security::KafkaTls>,
    /// `[kafka.sasl]`: SASL credentials (SCRAM-SHA-256/512, or PLAIN over TLS).
    #[serde(default)]
    pub sasl: Option<dongbo_connectors::kafka::security::KafkaSasl>,
    /// Talk to the brokers in clear text: a demo on one machine or one private network only.
    #[serde(default)]
    pub insecure_plaintext_demo: bool,
}

fn default_group_id() -> String {
    "dongbo-hub".into()
}
fn default_topic_prefix() -> String {
    "dongbo.cdc.".into()
}

impl fmt::Debug for KafkaConfig {
    // Hand-written so SASL passwords and key material never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<&str> = self.properties.keys().map(String::as_str).collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("properties", &props)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl.as_ref().map(|s| (&s.mechanism, &s.username)))
            .finish()
    }
}

impl KafkaConfig {
    /// The security settings of this section.
    pub fn security(&self) -> dongbo_connectors::kafka::security::KafkaSecurity<'_> {
        dongbo_connectors::kafka::security::KafkaSecurity {
            tls: self.tls.as_ref(),
            sasl: self.sasl.as_ref(),
            insecure_plaintext_demo: self.insecure_plaintext_demo,
            properties: &self.properties,
        }
    }

    /// The topic agent `id` produces to.
    pub fn topic_of(&self, id: &str) -> String {
        format!("{}{id}", self.topic_prefix)
    }
}

/// Where and how long the hub keeps its fan-out log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutConfig {
    /// Directory of the hub's sled database (log, cursors, dead letters).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Records older than this are dropped once every subscription has acknowledged them.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/dongbo-hub")
}

fn default_retention_hours() -> u64 {
    7 * 24
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self { data_dir: default_data_dir(), retention_hours: default_retention_hours() }
    }
}

/// The admin HTTP API.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address, e.g. `127.0.0.1:7444`.
    pub listen: String,
    /// SHA-256 (hex) of the operators' bearer token (role `admin`).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// The token in clear, for demos only.
    #[serde(default)]
    pub token: Option<String>,
    /// Further operators, each with its own token and role (`read` or `admin`).
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.operators.iter().map(|o| o.id.as_str()).collect();
        f.debug_struct("AdminConfig").field("listen", &self.listen).field("operators", &ids).finish_non_exhaustive()
    }
}

/// One operator of the admin API.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Who, as the logs name them.
    pub id: String,
    /// SHA-256 (hex) of its bearer token.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// The token in clear, for demos only.
    #[serde(default)]
    pub token: Option<String>,
    /// `read` (status, lists, audit queries) or `admin` (also subscriptions and replays).
    pub role: crate::auth::Role,
    /// For a certificate without a `spiffe://` URI SAN (one from a national PKI, say): its subject
    /// as `openssl x509 -noout -subject` prints it, e.g. `C=VN, O=Sở TT&TT TP.HCM, CN=hcm-population`.
    /// Attributes match in any order.
    #[serde(default)]
    pub certificate_subject: Option<String>,
}

/// Connection to the NDC Postgres.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NdcConfig {
    /// Host, or Unix socket directory.
    pub host: String,
    /// Port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database.
    pub database: String,
    /// Role; needs CREATE on the database (it creates one schema per agent).
    pub user: String,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to the NDC (`[ndc.tls]`): `mode` (`disable`, `require`, `verify-ca`, `verify-full`;
    /// `verify-full` by default unless the NDC is on this machine), `ca_file`, `cert_file`, `key_file`.
    #[serde(default)]
    pub tls: dongbo_connectors::tls::DbTlsConfig,
}

fn default_port() -> u16 {
    5432
}

impl fmt::Debug for NdcConfig {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NdcConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl NdcConfig {
    /// The password from `password` or `password_file`.
    pub fn resolve_password(&self) -> std::io::Result<Option<String>> {
        dongbo_connectors::config_file::resolve_secret(self.password.as_deref(), self.password_file.as_deref())
    }

    /// Where and as whom the hub connects, with `password`.
    pub fn target<'a>(&'a self, password: Option<&'a str>) -> dongbo_connectors::postgres::session::Target<'a> {
        dongbo_connectors::postgres::session::Target {
            host: &self.host,
            port: self.port,
            user: &self.user,
            database: &self.database,
            password,
            application: "dongbo-hub",
            tls: &self.tls,
        }
    }
}

/// One agent's identity and rights.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAcl {
    /// The agent's `source_id`.
    pub id: String,
    /// SHA-256 (hex) of the agent's bearer token; the token itself is not stored at the hub.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// The token in clear, for demos only.
    #[serde(default)]
    pub token: Option<String>,
    /// NDC schema for this agent's tables; defaults to the id with `-` as `_`.
    #[serde(default)]
    pub target_schema: Option<String>,
    /// Source tables (`schema.table`) this agent may send; empty allows all. Others are quarantined.
    #[serde(default)]
    pub tables: Vec<String>,
    /// The province this agent serves (2-digit code), shown to operators.
    #[serde(default)]
    pub province: Option<String>,
    /// For a certificate without a `spiffe://` URI SAN (one from a national PKI, say): its subject
    /// as `openssl x509 -noout -subject` prints it, e.g. `C=VN, O=Sở TT&TT TP.HCM, CN=hcm-population`.
    /// Attributes match in any order.
    #[serde(default)]
    pub certificate_subject: Option<String>,
}

impl fmt::Debug for AgentAcl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentAcl")
            .field("id", &self.id)
            .field("target_schema", &self.target_schema)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

impl AgentAcl {
    /// The NDC schema for this agent.
    pub fn schema(&self) -> String {
        self.target_schema.clone().unwrap_or_else(|| self.id.replace('-', "_"))
    }

    /// Whether the agent may send `table` (`schema.table`).
    pub fn allows(&self, table: &str) -> bool {
        self.tables.is_empty() || self.tables.iter().any(|t| t == table || format!("public.{t}") == table)
    }
}

/// Apply tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// One NDC transaction applies up to this many changes, gathered from consecutive batches.
    #[serde(default = "default_txn_changes")]
    pub max_changes_per_txn: usize,
}

/// Large enough that per-transaction costs vanish, small enough to keep memory in tens of MiB.
fn default_txn_changes() -> usize {
    20_000
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self { max_changes_per_txn: default_txn_changes() }
    }
}

pub use dongbo_connectors::config_file::ConfigError;
use dongbo_connectors::config_file::Validate;

impl HubConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let mut config: Self = dongbo_connectors::config_file::load(path)?;
        config.loaded_from = Some(path.to_path_buf());
        Ok(config)
    }
}

impl HubConfig {
    /// Every pair of peers (agents, subscribers, operators) that share a token, and every
    /// `token_sha256` that is not one: a token must identify exactly one peer.
    fn shared_tokens(&self) -> Vec<String> {
        use crate::auth::secret_digest;
        let mut p = Vec::new();
        let mut all: Vec<(String, Option<&str>, Option<&str>)> = Vec::new();
        for a in &self.agents {
            all.push((format!("agent {}", a.id), a.token_sha256.as_deref(), a.token.as_deref()));
        }
        for s in &self.subscribers {
            all.push((format!("subscriber {}", s.id), s.token_sha256.as_deref(), s.token.as_deref()));
        }
        if let Some(admin) = &self.admin {
            all.push(("the admin token".into(), admin.token_sha256.as_deref(), admin.token.as_deref()));
            for o in &admin.operators {
                all.push((format!("operator {}", o.id), o.token_sha256.as_deref(), o.token.as_deref()));
            }
        }
        let mut subjects: Vec<(String, Option<&str>)> = Vec::new();
        subjects.extend(self.agents.iter().map(|a| (format!("agent {}", a.id), a.certificate_subject.as_deref())));
        subjects.extend(
            self.subscribers.iter().map(|s| (format!("subscriber {}", s.id), s.certificate_subject.as_deref())),
        );
        if let Some(admin) = &self.admin {
            subjects.extend(
                admin.operators.iter().map(|o| (format!("operator {}", o.id), o.certificate_subject.as_deref())),
            );
        }
        let mut holders = std::collections::HashMap::new();
        for (who, subject) in &subjects {
            let Some(subject) = subject else { continue };
            match crate::auth::SubjectKey::parse(subject) {
                Err(e) => p.push(format!("{who}: certificate_subject {subject:?}: {e}")),
                Ok(key) => {
                    if let Some(other) = holders.insert(key, who) {
                        p.push(format!("{other} and {who} have the same certificate_subject: each peer needs its own"));
                    }
                }
            }
        }
        let mut owners: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for (who, sha, clear) in &all {
            if sha.is_some_and(|h| h.len() != 64 || hex::decode(h).is_err()) {
                p.push(format!("{who}: token_sha256 must be 64 hex digits"));
            }
            if let Some(d) = secret_digest(*sha, *clear) {
                if let Some(other) = owners.insert(d, who) {
                    p.push(format!("{other} and {who} share a token: each peer needs its own"));
                }
            }
        }
        p
    }
}

impl Validate for HubConfig {
    /// Every problem at once, without I/O.
    fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("listen {:?} is not host:port", self.listen));
        }
        let mut seen = std::collections::HashSet::new();
        let mut schemas = std::collections::HashMap::new();
        p.extend(self.shared_tokens());
        p.extend(self.ndc.tls.validate(&self.ndc.host, "ndc.tls"));
        if let Some(k) = &self.kafka {
            p.extend(k.security().validate());
        }
        for a in &self.agents {
            if !seen.insert(&a.id) {
                p.push(format!("agent {} is listed twice", a.id));
            }
            // Over Kafka, the broker's own authorisation decides who may write an agent's topic.
            if a.token.is_none() && a.token_sha256.is_none() && self.kafka.is_none() {
                p.push(format!("agent {} has neither token_sha256 nor token", a.id));
            }
            let schema = a.schema();
            if !schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                || schema.is_empty()
                || schema.len() > crate::apply::types::MAX_IDENT_BYTES
                || ["dongbo", "public", "information_schema", "national"].contains(&schema.as_str())
                || schema.starts_with("pg_")
            {
                p.push(format!(
                    "agent {}: target schema {schema:?} must be up to 63 lowercase letters, digits and _, \
                     and not dongbo, public, national, information_schema or pg_*",
                    a.id
                ));
            }
            if let Some(other) = schemas.insert(schema.clone(), &a.id) {
                p.push(format!("agents {other} and {} share the NDC schema {schema}: each agent needs its own", a.id));
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_message_bytes", l.max_message_bytes),
            ("max_changes_per_batch", l.max_changes_per_batch),
            ("stream_buffer_bytes", l.stream_buffer_bytes),
            ("max_ndc_connections", l.max_ndc_connections),
            ("max_connections", l.max_connections),
        ] {
            if v == 0 {
                p.push(format!("limits.{name} must be at least 1"));
            }
        }
        if l.max_message_bytes > u32::MAX as usize {
            p.push("limits.max_message_bytes must fit gRPC's 4-byte length (under 4 GiB)".into());
        }
        if l.stream_buffer_bytes < l.max_message_bytes {
            p.push("limits.stream_buffer_bytes must hold at least one message (limits.max_message_bytes)".into());
        }
        if l.handshake_timeout_ms == 0 || l.idle_timeout_ms < 3_000 {
            p.push("limits.handshake_timeout_ms must be positive and limits.idle_timeout_ms at least 3000".into());
        }
        match (&self.tls, self.insecure_plaintext_demo) {
            (None, false) => p.push(
                "no [tls]: the hub would serve citizens' data and tokens in clear text; configure [tls] \
                 (cert_file, key_file, client_ca_file), or set insecure_plaintext_demo = true for a demo on one machine"
                    .into(),
            ),
            (Some(_), true) => p.push("insecure_plaintext_demo = true contradicts [tls]: remove one".into()),
            (Some(t), false) => {
                if t.trust_domain.is_empty() || t.trust_domain.contains('/') {
                    p.push(format!("tls.trust_domain {:?} must be a domain name", t.trust_domain));
                }
            }
            (None, true) => {}
        }
        if self.audit.checkpoint_interval_s == Some(0) {
            p.push("audit.checkpoint_interval_s must be at least 1".into());
        }
        if self.apply.max_changes_per_txn == 0 {
            p.push("apply.max_changes_per_txn must be at least 1".into());
        }
        if let Some(admin) = &self.admin {
            if admin.listen.parse::<std::net::SocketAddr>().is_err() {
                p.push(format!("admin.listen {:?} is not host:port", admin.listen));
            }
            if admin.token.is_none() && admin.token_sha256.is_none() && admin.operators.is_empty() {
                p.push("admin needs token_sha256 (or token) or operators so that only operators use it".into());
            }
            for o in &admin.operators {
                // Without a token an operator can only be known by its client certificate.
                if o.token.is_none() && o.token_sha256.is_none() && self.tls.is_none() {
                    p.push(format!(
                        "operator {} has neither token_sha256 nor token (nor [tls] for a certificate)",
                        o.id
                    ));
                }
            }
        }
        for m in &self.national.mappings {
            if !self.agents.iter().any(|a| a.id == m.agent) {
                p.push(format!(
                    "national.mappings: {} names agent {}, which is not among [[agents]]",
                    m.source_table, m.agent
                ));
            }
        }
        // The remap file is read when the hub starts; without one, the whole dictionary checks here.
        if self.national.remap_file.is_none() {
            p.extend(crate::dictionary::Dictionary::load(&self.national).err());
        } else {
            let compiled =
                self.national.mappings.iter().map(|m| crate::dictionary::mapping::Mapping::compile(m.clone()));
            p.extend(compiled.filter_map(Result::err));
        }
        let (catalog, problems) = Catalog::new(&self.dictionary, &self.events, &self.purposes, &self.subscribers);
        p.extend(problems);
        let mut ids = std::collections::HashSet::new();
        for s in &self.subscriptions {
            if !ids.insert(&s.id) {
                p.push(format!("subscription {} is declared twice", s.id));
            }
            p.extend(catalog.check(s));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c: HubConfig = toml::from_str(include_str!("../../deploy/examples/hub.toml")).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
        let auth = crate::auth::Authenticator::new(&c);
        let agent = crate::auth::Identity::Agent(c.agents[0].id.clone());
        assert_eq!(auth.identify(Some("Bearer test")).unwrap(), agent, "the example hash is sha256(\"test\")");
        assert!(auth.identify(Some("Bearer tset")).is_err());
        assert_eq!(
            auth.agent(crate::auth::Credentials { certificate: None, authorization: Some("Bearer test") }),
            Err(crate::auth::AuthError::NoCertificate),
            "the example requires mutual TLS as well as the token"
        );
        assert!(c.agents[0].allows("public.citizens") && !c.agents[0].allows("public.secrets"));
    }

    #[test]
    fn the_compose_hub_config_is_valid_and_consumes_the_agents_topics() {
        let c: HubConfig = toml::from_str(include_str!("../../deploy/compose/hub.toml")).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
        let k = c.kafka.as_ref().expect("[kafka]");
        assert_eq!(k.topic_of(&c.agents[0].id), "dongbo.cdc.hcm-population");
        assert_eq!(k.group_id, "dongbo-hub");
    }

    #[test]
    fn problems_are_listed_together_and_secrets_stay_out_of_debug() {
        let text = r#"
listen = "nowhere"
[ndc]
host = "h"
database = "ndc"
user = "u"
password = "hunter2"
[[agents]]
id = "a"
[[agents]]
id = "a"
token = "t0ps3cret"
target_schema = "dongbo"
[[agents]]
id = "b"
token = "t0ps3cret"
"#;
        let c: HubConfig = toml::from_str(text).unwrap();
        let problems = c.validate();
        assert_eq!(problems.len(), 7, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("clear text")), "no [tls] and no demo flag: {problems:?}");
        assert!(problems.iter().any(|p| p.contains("ndc.tls.ca_file")), "a remote NDC without a CA: {problems:?}");
        assert!(problems.iter().any(|p| p.contains("share a token")), "{problems:?}");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("t0ps3cret"), "{dbg}");
    }
}
