//! The agent's config file (`agent.toml`).

use std::fmt;
use std::path::PathBuf;

use dongbo_connectors::postgres::PostgresConfig;
use serde::Deserialize;

/// Everything the agent needs, read from one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's identity at the hub, e.g. `hcm-population`. Lowercase letters, digits, `-`, `_`.
    pub source_id: String,
    /// The local database to capture.
    pub source: SourceConfig,
    /// The durable local spool.
    pub spool: SpoolConfig,
    /// Ship changes to the hub over gRPC ...
    #[serde(default)]
    pub hub: Option<HubLinkConfig>,
    /// ... or to a Kafka topic the hubs consume (exactly one of the two).
    #[serde(default)]
    pub kafka: Option<KafkaLinkConfig>,
    /// The metrics and health listener.
    #[serde(default)]
    pub status: StatusConfig,
}

/// The agent's HTTP listener for `/metrics`, `/healthz` and `/readyz` ([`crate::metrics`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Address to listen on; `127.0.0.1:9187` by default (this host only), `off` for none.
    #[serde(default = "default_status_listen")]
    pub listen: String,
    /// How often the agent reports its status to the hub's fleet registry, in seconds.
    #[serde(default = "default_report_interval_s")]
    pub report_interval_s: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self { listen: default_status_listen(), report_interval_s: default_report_interval_s() }
    }
}

impl StatusConfig {
    /// The report interval (at least a second).
    pub fn report_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.report_interval_s.max(1))
    }
}

fn default_report_interval_s() -> u64 {
    30
}

fn default_status_listen() -> String {
    "127.0.0.1:9187".into()
}

/// The source database, one variant per connector kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// PostgreSQL logical replication.
    Postgres(PostgresConfig),
    /// MySQL/MariaDB binlog.
    #[serde(rename = "mysql")]
    MySql(dongbo_connectors::mysql::MySqlConfig),
    /// Query polling, where no change log can be read (boxed: it holds a server's settings).
    Poll(Box<dongbo_connectors::poll::PollConfig>),
}

impl SourceConfig {
    /// The tables captured.
    pub fn table_ids(&self) -> Vec<dongbo_connectors::model::TableId> {
        match self {
            SourceConfig::Postgres(pg) => pg.table_ids(),
            SourceConfig::MySql(my) => my.table_ids(),
            SourceConfig::Poll(poll) => poll.table_ids(),
        }
    }
}

/// The spool on local disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// When the spool holds this many bytes, capture pauses (the source then holds its WAL).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// A spooled batch holds at most this many changes.
    #[serde(default = "default_batch_changes")]
    pub batch_max_changes: usize,
    /// A change waits at most this long in memory before it is spooled, in milliseconds.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Spool batches compressed (zstd): about a third of the bytes on disk and on the wire, so
    /// `max_bytes` lasts three times as long through an outage; shipped as they are.
    #[serde(default = "default_true")]
    pub compress: bool,
}

/// 8 GiB holds days of a provincial database's changes while the link is down.
fn default_max_bytes() -> u64 {
    8 << 30
}
/// Large enough to amortise an fsync, small enough to keep a gRPC message a few MiB.
fn default_batch_changes() -> usize {
    4096
}
/// Keeps spooling latency far below the 250 ms end-to-end target.
fn default_batch_wait_ms() -> u64 {
    20
}

/// The link to the hub.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubLinkConfig {
    /// gRPC endpoint, e.g. `http://ndc-hub.example:7443`.
    pub url: String,
    /// Bearer token identifying this agent.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the token (first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Batches sent but not yet acknowledged, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_batches: usize,
    /// Compress on the wire (zstd) the batches the spool holds uncompressed (`spool.compress =
    /// false`, or spooled by an older agent); compressed ones go as they are.
    #[serde(default = "default_true")]
    pub compress: bool,
    /// Longest wait between reconnection attempts, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Largest message the hub accepts (its `limits.max_message_bytes`): larger spooled batches
    /// are split to fit; a single change larger than this cannot be shipped.
    #[serde(default = "default_hub_message_bytes")]
    pub max_message_bytes: usize,
    /// The CA that signed the hub's certificate (PEM); required with an `https://` url.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This agent's certificate (PEM), for mutual TLS: it names the agent
    /// (`spiffe://<trust domain>/agent/<source_id>`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The hub's default `limits.max_message_bytes`.
fn default_hub_message_bytes() -> usize {
    64 << 20
}

fn default_in_flight() -> usize {
    16
}
fn default_true() -> bool {
    true
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

impl fmt::Debug for HubLinkConfig {
    // Hand-written so the token never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubLinkConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("max_in_flight_batches", &self.max_in_flight_batches)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

impl HubLinkConfig {
    /// The token from `token` or `token_file`.
    pub fn resolve_token(&self) -> std::io::Result<String> {
        let token = dongbo_connectors::config_file::resolve_secret(self.token.as_deref(), self.token_file.as_deref())?;
        Ok(token.unwrap_or_default())
    }
}

/// Why a `[kafka]` section is refused by an agent built without the Kafka transport.
pub const NO_KAFKA: &str = "this agent is built without the Kafka transport (the legacy build for old servers): \
     ship over gRPC with a [hub] section, or install the standard build";

/// The link to a Kafka cluster.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaLinkConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topic; by default `dongbo.cdc.<source_id>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Partitions when the agent creates the topic (an existing topic is left as it is). One, for
    /// now: a truncate (which also opens an initial snapshot) and a key change must stay ordered
    /// against every row of the table, which separate partitions do not give without a barrier.
    /// Hubs scale out across the agents' topics.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replicas when the agent creates the topic.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// `lz4` (default), `zstd`, `gzip`, `snappy` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Spooled batches produced but not yet acknowledged by the broker, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_batches: usize,
    /// Longest wait between reconnection attempts, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Largest encoded change sent as one message; keep it at or below the topic's `max.message.bytes`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
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

fn default_partitions() -> i32 {
    1
}
fn default_replication() -> i32 {
    1
}
fn default_max_message_bytes() -> usize {
    1_000_000
}
fn default_compression() -> String {
    "lz4".into()
}

impl fmt::Debug for KafkaLinkConfig {
    // Hand-written so SASL passwords and key material never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<&str> = self.properties.keys().map(String::as_str).collect();
        f.debug_struct("KafkaLinkConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("compression", &self.compression)
            .field("properties", &props)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl.as_ref().map(|s| (&s.mechanism, &s.username)))
            .finish_non_exhaustive()
    }
}

impl KafkaLinkConfig {
    /// The security settings of this section.
    pub fn security(&self) -> dongbo_connectors::kafka::security::KafkaSecurity<'_> {
        dongbo_connectors::kafka::security::KafkaSecurity {
            tls: self.tls.as_ref(),
            sasl: self.sasl.as_ref(),
            insecure_plaintext_demo: self.insecure_plaintext_demo,
            properties: &self.properties,
        }
    }

    /// The topic this agent's changes go to.
    pub fn topic_for(&self, source_id: &str) -> String {
        self.topic.clone().unwrap_or_else(|| format!("{}{source_id}", TOPIC_PREFIX))
    }
}

/// Default topic name prefix: `dongbo.cdc.<source_id>`; hubs subscribe to `^dongbo\.cdc\..*`.
pub const TOPIC_PREFIX: &str = "dongbo.cdc.";

pub use dongbo_connectors::config_file::ConfigError;
use dongbo_connectors::config_file::Validate;

impl AgentConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        dongbo_connectors::config_file::load(path)
    }
}

impl Validate for AgentConfig {
    /// Every problem at once, without I/O.
    fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let id_ok = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        };
        if !id_ok(&self.source_id) {
            p.push(format!("source_id {:?} must be lowercase letters, digits, - and _", self.source_id));
        }
        match &self.source {
            SourceConfig::Postgres(pg) => p.extend(pg.validate()),
            SourceConfig::MySql(my) => p.extend(my.validate()),
            SourceConfig::Poll(poll) => p.extend(poll.validate()),
        }
        if self.spool.batch_max_changes == 0 {
            p.push("spool.batch_max_changes must be at least 1".into());
        }
        if self.spool.max_bytes < 1 << 20 {
            p.push("spool.max_bytes must be at least 1 MiB".into());
        }
        match (&self.hub, &self.kafka) {
            (Some(_), Some(_)) => p.push("set [hub] (gRPC) or [kafka], not both".into()),
            (None, None) => p.push("say where to ship changes: a [hub] section (gRPC) or a [kafka] section".into()),
            _ => {}
        }
        if let Some(hub) = &self.hub {
            if !(hub.url.starts_with("http://") || hub.url.starts_with("https://")) {
                p.push(format!("hub.url {:?} must start with http:// or https://", hub.url));
            }
            if hub.token.is_some() && hub.token_file.is_some() {
                p.push("set hub.token or hub.token_file, not both".into());
            }
            if hub.max_in_flight_batches == 0 {
                p.push("hub.max_in_flight_batches must be at least 1".into());
            }
            if hub.max_message_bytes < 1024 {
                p.push("hub.max_message_bytes must be at least 1024".into());
            }
            let tls = hub.url.starts_with("https://");
            if tls && hub.ca_file.is_none() {
                p.push("hub.url is https:// but hub.ca_file (the CA of the hub's certificate) is not set".into());
            }
            if !tls && (hub.ca_file.is_some() || hub.cert_file.is_some()) {
                p.push("hub.ca_file / cert_file are set but hub.url is not https://".into());
            }
            if hub.cert_file.is_some() != hub.key_file.is_some() {
                p.push("hub.cert_file and hub.key_file go together".into());
            }
        }
        if cfg!(not(feature = "kafka")) && self.kafka.is_some() {
            p.push(NO_KAFKA.into());
        }
        if let Some(k) = &self.kafka {
            if k.brokers.trim().is_empty() {
                p.push("kafka.brokers is empty".into());
            }
            p.extend(k.security().validate());
            if !["lz4", "zstd", "gzip", "snappy", "none"].contains(&k.compression.as_str()) {
                p.push(format!("kafka.compression {:?} must be lz4, zstd, gzip, snappy or none", k.compression));
            }
            if k.partitions != 1 {
                p.push(
                    "kafka.partitions must be 1 for now: truncates and key changes need every row of a table \
                     in one partition; hubs scale out across agents' topics"
                        .into(),
                );
            }
            if k.replication_factor < 1 {
                p.push("kafka.replication_factor must be at least 1".into());
            }
            if k.max_in_flight_batches == 0 {
                p.push("kafka.max_in_flight_batches must be at least 1".into());
            }
            let topic = k.topic_for(&self.source_id);
            if topic.is_empty()
                || topic.len() > 249
                || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                p.push(format!("kafka topic {topic:?} must be 1-249 of a-z, A-Z, 0-9, '.', '_', '-'"));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
source_id = "hcm-population"
[source]
kind = "postgres"
host = "127.0.0.1"
database = "population"
user = "dongbo"
password = "s3cret"
tables = ["public.citizens"]
[spool]
path = "/var/lib/dongbo/spool"
[hub]
url = "http://127.0.0.1:7443"
token = "tok"
"#;

    #[test]
    fn parses_a_good_config_and_redacts_secrets() {
        let c: AgentConfig = toml::from_str(GOOD).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("\"tok\""), "{dbg}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_all_reported() {
        let bad = GOOD.replace("tables = [\"public.citizens\"]", "tables = []\nwal = 1");
        assert!(toml::from_str::<AgentConfig>(&bad).unwrap_err().to_string().contains("unknown field"));
        let bad = GOOD
            .replace("tables = [\"public.citizens\"]", "tables = []")
            .replace("hcm-population", "HCM")
            .replace("http://", "tcp://");
        let c: AgentConfig = toml::from_str(&bad).unwrap();
        let problems = c.validate();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    #[cfg(feature = "kafka")]
    fn kafka_instead_of_the_hub_and_never_both() {
        let kafka = "[kafka]\nbrokers = \"127.0.0.1:9092\"\ninsecure_plaintext_demo = true\n";
        let only_kafka = GOOD.replace("[hub]\nurl = \"http://127.0.0.1:7443\"\ntoken = \"tok\"\n", kafka);
        let c: AgentConfig = toml::from_str(&only_kafka).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.kafka.as_ref().unwrap().topic_for(&c.source_id), "dongbo.cdc.hcm-population");
        let both: AgentConfig = toml::from_str(&format!("{GOOD}{kafka}")).unwrap();
        assert_eq!(both.validate(), vec!["set [hub] (gRPC) or [kafka], not both".to_string()]);
        let bad = only_kafka.replace("brokers = ", "compression = \"brotli\"\ntopic = \"bad topic\"\nbrokers = ");
        let c: AgentConfig = toml::from_str(&bad).unwrap();
        assert_eq!(c.validate().len(), 2, "{:?}", c.validate());
        let clear = only_kafka.replace("insecure_plaintext_demo = true\n", "");
        let c: AgentConfig = toml::from_str(&clear).unwrap();
        assert!(c.validate().iter().any(|p| p.contains("clear text")), "{:?}", c.validate());
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c: AgentConfig = toml::from_str(include_str!("../../deploy/examples/agent.toml")).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
    }

    #[test]
    fn the_shipped_mysql_example_config_is_valid() {
        let c: AgentConfig = toml::from_str(include_str!("../../deploy/examples/agent-mysql.toml")).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
        assert!(matches!(c.source, SourceConfig::MySql(_)));
    }

    #[test]
    fn the_shipped_polling_example_config_is_valid_and_a_table_without_a_cursor_is_refused() {
        let text = include_str!("../../deploy/examples/agent-poll.toml");
        let c: AgentConfig = toml::from_str(text).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
        let SourceConfig::Poll(poll) = &c.source else { panic!("not a polled source") };
        assert_eq!(poll.tables().unwrap()[1].1, "changed_at");

        let no_cursor: AgentConfig = toml::from_str(&text.replace(", \"public.visits\" = \"changed_at\"", "")).unwrap();
        let problems = no_cursor.validate();
        assert!(problems.iter().any(|p| p.contains("polled table public.visits has no cursor")), "{problems:?}");
        let two_servers =
            text.replace("[spool]", "[source.mysql]\nhost = \"h\"\nuser = \"u\"\ntables = [\"a.b\"]\n\n[spool]");
        let c: AgentConfig = toml::from_str(&two_servers).unwrap();
        assert!(c.validate().iter().any(|p| p.contains("exactly one of")), "{:?}", c.validate());

        // ODBC: a password in the connection string is refused, and so is [source.odbc] in an
        // agent built without the feature.
        let start = text.find("[source.postgres]").unwrap();
        let end = text.find("[spool]").unwrap();
        let odbc = format!(
            "{}[source.odbc]\nconnection_string = \"Driver={{X}};UID=u;PWD=secret\"\ntables = [\"public.patients\", \"public.visits\"]\n\n{}",
            &text[..start],
            &text[end..]
        );
        let c: AgentConfig = toml::from_str(&odbc).unwrap();
        let problems = c.validate();
        assert!(problems.iter().any(|p| p.contains("holds a password")), "{problems:?}");
        assert_eq!(
            problems.iter().any(|p| p.contains("built without ODBC")),
            !dongbo_connectors::poll::ODBC_BUILT,
            "{problems:?}"
        );
    }

    #[test]
    fn the_compose_agent_config_is_valid_and_ships_to_kafka() {
        let c: AgentConfig = toml::from_str(include_str!("../../deploy/compose/agent.toml")).unwrap();
        assert_eq!(c.validate(), Vec::<String>::new());
        assert_eq!(c.kafka.as_ref().map(|k| k.topic_for(&c.source_id)).as_deref(), Some("dongbo.cdc.hcm-population"));
    }
}
