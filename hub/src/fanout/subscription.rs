//! What subscribers may follow and receive: the data dictionary, event rules, purposes, subscribers
//! and subscriptions, as `hub.toml` declares them, and the checks a subscription must pass.
//!
//! "Purpose-bound data groups per subscriber, granted by an authorisation, not by code": a purpose
//! lists, per followed table or event, the fields it may receive; a subscription names its purpose
//! and asks for a subset. Anything else is refused when the subscription is defined, and the
//! projection at delivery ([`super::projection`]) enforces the same set on every path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::filter::Filter;

/// Fields every delivered record carries whatever the subscription asks for: they identify the
/// record, not a citizen.
pub const ENVELOPE_FIELDS: &[&str] = &["event_id", "event", "table", "op"];

/// A table of the national data dictionary that subscribers may follow.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DictionaryTable {
    /// Source table name, `schema.table`, as agents send it.
    pub table: String,
    /// The column holding the 12-digit citizen id, recorded in the audit log of every delivery.
    pub citizen_id: String,
    /// Columns subscribers may be granted.
    pub fields: Vec<String>,
}

/// A declarative rule deriving a domain event from row changes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventRule {
    /// Event name, e.g. `residence.changed`.
    pub name: String,
    /// The dictionary table whose updates raise it.
    pub table: String,
    /// An update that changes any of these columns raises the event; the payload carries their
    /// previous and current values as `previous.<column>` and `current.<column>`.
    pub watch: Vec<String>,
    /// Columns of the new row copied into the payload as they are (e.g. the residence kind).
    #[serde(default)]
    pub carry: Vec<String>,
}

impl EventRule {
    /// The payload fields this rule's events carry, besides the envelope.
    pub fn payload_fields(&self) -> Vec<String> {
        let mut f = vec!["citizen_id".to_string(), "source_id".into(), "effective_at".into()];
        f.extend(self.watch.iter().map(|w| format!("previous.{w}")));
        f.extend(self.watch.iter().map(|w| format!("current.{w}")));
        f.extend(self.carry.iter().cloned());
        f
    }
}

/// A legal purpose and the fields it allows, per followed table or event.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// Short id, e.g. `social-insurance`.
    pub id: String,
    /// What the purpose is and its legal basis, shown in the citizen's access report.
    pub description: String,
    /// Followed name (table or event) → the fields this purpose may receive of it.
    pub allows: BTreeMap<String, Vec<String>>,
}

/// A downstream system allowed to subscribe.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriber {
    /// Short id, e.g. `bhxh` (social insurance).
    pub id: String,
    /// SHA-256 (hex) of its bearer token for the gRPC stream.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// The token in clear, for demos only.
    #[serde(default)]
    pub token: Option<String>,
    /// For a certificate without a `spiffe://` URI SAN (one from a national PKI, say): its subject
    /// as `openssl x509 -noout -subject` prints it, e.g. `C=VN, O=Sở TT&TT TP.HCM, CN=hcm-population`.
    /// Attributes match in any order.
    #[serde(default)]
    pub certificate_subject: Option<String>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber").field("id", &self.id).finish_non_exhaustive()
    }
}

/// How a subscription's records leave the hub.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Delivery {
    /// The subscriber connects to the hub's `Subscribe` gRPC stream and acknowledges.
    Grpc,
    /// The hub POSTs each record as JSON, signed with HMAC-SHA256.
    Webhook {
        /// Where to POST.
        url: String,
        /// HMAC key, in clear (demos) ...
        #[serde(default)]
        secret: Option<String>,
        /// ... or in a file (first line).
        #[serde(default)]
        secret_file: Option<PathBuf>,
        /// Attempts before a record goes to the dead-letter queue.
        #[serde(default = "default_attempts")]
        max_attempts: u32,
        /// First retry delay; doubles up to `max_backoff_ms`.
        #[serde(default = "default_backoff_ms")]
        initial_backoff_ms: u64,
        /// Longest retry delay.
        #[serde(default = "default_max_backoff_ms")]
        max_backoff_ms: u64,
        /// POSTs in flight at once, each for a different citizen (one citizen's records go one
        /// after another, in order).
        #[serde(default = "default_concurrency")]
        concurrency: usize,
    },
    /// Records go as JSON to a Kafka topic (on the hub's `[kafka]` brokers) keyed by citizen id.
    Kafka {
        /// Topic name.
        topic: String,
    },
}

fn default_concurrency() -> usize {
    16
}
fn default_attempts() -> u32 {
    8
}
fn default_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_ms() -> u64 {
    60_000
}

impl fmt::Debug for Delivery {
    // Hand-written so a webhook secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Grpc => f.write_str("Grpc"),
            Delivery::Webhook { url, max_attempts, .. } => {
                f.debug_struct("Webhook").field("url", url).field("max_attempts", max_attempts).finish_non_exhaustive()
            }
            Delivery::Kafka { topic } => f.debug_struct("Kafka").field("topic", topic).finish(),
        }
    }
}

impl Delivery {
    /// The channel name recorded in the audit log.
    pub fn channel(&self) -> &'static str {
        match self {
            Delivery::Grpc => "grpc",
            Delivery::Webhook { .. } => "webhook",
            Delivery::Kafka { .. } => "kafka",
        }
    }

    /// A webhook's HMAC key.
    pub fn webhook_secret(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Delivery::Webhook { secret: Some(s), .. } => Ok(s.as_bytes().to_vec()),
            Delivery::Webhook { secret_file: Some(f), .. } => {
                Ok(dongbo_connectors::config_file::read_secret(f)?.into_bytes())
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// Where a new subscription starts reading the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only records logged from now on.
    Now,
    /// The oldest record still retained.
    Beginning,
    /// The first record logged at or after this time (microseconds since the epoch).
    At(i64),
}

impl Start {
    /// Parses `now`, `beginning` or an RFC 3339 time.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "now" => Ok(Start::Now),
            "beginning" => Ok(Start::Beginning),
            t => humantime::parse_rfc3339_weak(t)
                .or_else(|_| humantime::parse_rfc3339(t))
                .map(|st| Start::At(st.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)))
                .map_err(|_| format!("start {t:?} is not now, beginning or a time like 2026-11-01T00:00:00Z")),
        }
    }
}

/// A subscription, as declared in `hub.toml` or through the admin API.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionDef {
    /// Unique id, e.g. `bhxh-residence`.
    pub id: String,
    /// The subscriber receiving it.
    pub subscriber: String,
    /// The declared purpose; bounds `fields`.
    pub purpose: String,
    /// Dictionary tables and/or event names it follows.
    pub follow: Vec<String>,
    /// Only records passing this filter are delivered, e.g. `province_code = '79'`.
    #[serde(default)]
    pub filter: Option<String>,
    /// Fields delivered (dotted paths for event payloads); must be allowed by the purpose.
    pub fields: Vec<String>,
    /// How records are delivered.
    pub delivery: Delivery,
    /// `now`, `beginning` or an RFC 3339 time; used when the subscription is first created.
    #[serde(default = "default_start")]
    pub start: String,
}

fn default_start() -> String {
    "now".into()
}

/// What the admin API shows instead of a webhook secret.
pub const REDACTED: &str = "<redacted>";

impl SubscriptionDef {
    /// The definition as operators may see it: a webhook secret given in clear is replaced by
    /// [`REDACTED`] (a `secret_file` path stays: it names the file, not the key).
    pub fn redacted(&self) -> Self {
        let mut d = self.clone();
        if let Delivery::Webhook { secret: Some(s), .. } = &mut d.delivery {
            *s = REDACTED.into();
        }
        d
    }
}

/// What can be followed: dictionary tables and event rules, with their fields.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Followed name → fields it has (besides the envelope).
    pub items: BTreeMap<String, BTreeSet<String>>,
    /// Dictionary tables by name.
    pub tables: HashMap<String, DictionaryTable>,
    /// Event rules.
    pub rules: Vec<EventRule>,
    /// Purposes by id.
    pub purposes: HashMap<String, Purpose>,
    /// Subscriber ids.
    pub subscribers: BTreeSet<String>,
}

impl Catalog {
    /// Builds the catalog, listing every inconsistency of the declarations.
    pub fn new(
        dictionary: &[DictionaryTable],
        rules: &[EventRule],
        purposes: &[Purpose],
        subscribers: &[Subscriber],
    ) -> (Self, Vec<String>) {
        let mut p = Vec::new();
        let mut c = Catalog::default();
        for t in dictionary {
            if dongbo_connectors::model::TableId::parse(&t.table).is_none() {
                p.push(format!("dictionary table {:?} is not schema.table", t.table));
            }
            if !t.fields.contains(&t.citizen_id) {
                p.push(format!(
                    "dictionary table {}: citizen_id column {} is not among its fields",
                    t.table, t.citizen_id
                ));
            }
            for f in t.fields.iter().filter(|f| ENVELOPE_FIELDS.contains(&f.as_str())) {
                p.push(format!(
                    "dictionary table {}: field {f} has the name of an envelope field ({}); expose the column \
                     under another name (a view) or leave it out",
                    t.table,
                    ENVELOPE_FIELDS.join(", ")
                ));
            }
            if c.items.insert(t.table.clone(), t.fields.iter().cloned().collect()).is_some() {
                p.push(format!("dictionary table {} is declared twice", t.table));
            }
            c.tables.insert(t.table.clone(), t.clone());
        }
        for r in rules {
            match c.tables.get(&r.table) {
                None => p.push(format!("event {}: table {} is not in the dictionary", r.name, r.table)),
                Some(t) => {
                    for col in r.watch.iter().chain(&r.carry) {
                        if !t.fields.contains(col) {
                            p.push(format!("event {}: column {col} is not a field of {}", r.name, r.table));
                        }
                    }
                }
            }
            let reserved = ["citizen_id", "source_id", "effective_at", "previous", "current"];
            for col in
                r.carry.iter().filter(|c| reserved.contains(&c.as_str()) || ENVELOPE_FIELDS.contains(&c.as_str()))
            {
                p.push(format!("event {}: carried column {col} would overwrite a field the hub writes", r.name));
            }
            if r.watch.is_empty() {
                p.push(format!("event {}: watch lists no column", r.name));
            }
            if c.items.insert(r.name.clone(), r.payload_fields().into_iter().collect()).is_some() {
                p.push(format!("event name {} is used twice (or is also a table)", r.name));
            }
            c.rules.push(r.clone());
        }
        for purpose in purposes {
            for (name, fields) in &purpose.allows {
                match c.items.get(name) {
                    None => {
                        p.push(format!("purpose {}: {name} is neither a dictionary table nor an event", purpose.id))
                    }
                    Some(known) => {
                        for f in fields.iter().filter(|f| !known.contains(*f)) {
                            p.push(format!("purpose {}: {name} has no field {f}", purpose.id));
                        }
                    }
                }
            }
            if c.purposes.insert(purpose.id.clone(), purpose.clone()).is_some() {
                p.push(format!("purpose {} is declared twice", purpose.id));
            }
        }
        for s in subscribers {
            if !c.subscribers.insert(s.id.clone()) {
                p.push(format!("subscriber {} is declared twice", s.id));
            }
            if s.token.is_none() && s.token_sha256.is_none() {
                p.push(format!("subscriber {} has neither token_sha256 nor token", s.id));
            }
        }
        (c, p)
    }

    /// The rule raising `event`, if any.
    pub fn rule(&self, event: &str) -> Option<&EventRule> {
        self.rules.iter().find(|r| r.name == event)
    }

    /// Every reason `def` cannot be accepted; empty when it can.
    pub fn check(&self, def: &SubscriptionDef) -> Vec<String> {
        let mut p = Vec::new();
        let id = &def.id;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            p.push(format!("subscription id {id:?} must be letters, digits, - and _"));
        }
        if !self.subscribers.contains(&def.subscriber) {
            p.push(format!("subscription {id}: subscriber {} is not declared", def.subscriber));
        }
        let Some(purpose) = self.purposes.get(&def.purpose) else {
            p.push(format!("subscription {id}: purpose {} is not declared", def.purpose));
            return p;
        };
        if def.follow.is_empty() {
            p.push(format!("subscription {id}: follow lists nothing"));
        }
        for name in &def.follow {
            if !self.items.contains_key(name) {
                let known: Vec<&str> = self.items.keys().map(String::as_str).collect();
                p.push(format!("subscription {id}: unknown table or event {name} (known: {})", known.join(", ")));
            } else if !purpose.allows.contains_key(name) {
                p.push(format!("subscription {id}: purpose {} does not cover {name}", purpose.id));
            }
        }
        let allowed = |field: &str| {
            def.follow.iter().any(|n| purpose.allows.get(n).is_some_and(|fs| fs.iter().any(|f| f == field)))
        };
        let exists = |field: &str| def.follow.iter().any(|n| self.items.get(n).is_some_and(|fs| fs.contains(field)));
        for field in def.fields.iter().filter(|f| !ENVELOPE_FIELDS.contains(&f.as_str())) {
            if !exists(field) {
                p.push(format!("subscription {id}: unknown field {field} in {}", def.follow.join(", ")));
            } else if !allowed(field) {
                p.push(format!(
                    "subscription {id}: field {field} is outside purpose {} ({}): refused",
                    purpose.id, purpose.description
                ));
            }
        }
        if let Some(text) = &def.filter {
            match Filter::parse(text) {
                Err(e) => p.push(format!("subscription {id}: {e}")),
                Ok(f) => {
                    for field in f.fields() {
                        if !exists(field) {
                            p.push(format!("subscription {id}: the filter reads unknown field {field}"));
                        } else if !allowed(field) {
                            p.push(format!(
                                "subscription {id}: the filter reads {field}, which purpose {} does not allow",
                                purpose.id
                            ));
                        }
                    }
                }
            }
        }
        if let Err(e) = Start::parse(&def.start) {
            p.push(format!("subscription {id}: {e}"));
        }
        match &def.delivery {
            Delivery::Grpc => {}
            Delivery::Webhook { url, secret, secret_file, max_attempts, concurrency, .. } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    p.push(format!("subscription {id}: webhook url {url:?} must start with http:// or https://"));
                }
                if secret.is_none() && secret_file.is_none() {
                    p.push(format!("subscription {id}: a webhook needs secret or secret_file to sign its requests"));
                }
                if *max_attempts == 0 {
                    p.push(format!("subscription {id}: max_attempts must be at least 1"));
                }
                if !(1..=256).contains(concurrency) {
                    p.push(format!("subscription {id}: concurrency must be between 1 and 256"));
                }
            }
            Delivery::Kafka { topic } => {
                if topic.is_empty()
                    || topic.len() > 249
                    || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    p.push(format!(
                        "subscription {id}: kafka topic {topic:?} must be 1-249 of a-z, A-Z, 0-9, '.', '_', '-'"
                    ));
                }
            }
        }
        p
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn catalog() -> Catalog {
        let text = r#"
[[dictionary]]
table = "public.citizens"
citizen_id = "citizen_id"
fields = ["citizen_id", "full_name", "province_code", "commune_code", "address", "residence_kind", "income"]
[[events]]
name = "residence.changed"
table = "public.citizens"
watch = ["commune_code", "address"]
carry = ["residence_kind", "province_code"]
[[purposes]]
id = "social-insurance"
description = "social insurance records (Law 41/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "current.commune_code", "effective_at", "province_code"]
[[purposes]]
id = "registry"
description = "mixed: table and event"
[purposes.allows]
"public.citizens" = ["citizen_id", "commune_code"]
"residence.changed" = ["citizen_id", "current.commune_code", "province_code"]
[[subscribers]]
id = "bhxh"
token = "t"
"#;
        #[derive(Deserialize)]
        struct Decl {
            dictionary: Vec<DictionaryTable>,
            events: Vec<EventRule>,
            purposes: Vec<Purpose>,
            subscribers: Vec<Subscriber>,
        }
        let d: Decl = toml::from_str(text).unwrap();
        let (c, problems) = Catalog::new(&d.dictionary, &d.events, &d.purposes, &d.subscribers);
        assert_eq!(problems, Vec::<String>::new());
        c
    }

    fn def(fields: &[&str], filter: Option<&str>) -> SubscriptionDef {
        SubscriptionDef {
            id: "s".into(),
            subscriber: "bhxh".into(),
            purpose: "social-insurance".into(),
            follow: vec!["residence.changed".into()],
            filter: filter.map(str::to_string),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            delivery: Delivery::Grpc,
            start: "now".into(),
        }
    }

    #[test]
    fn a_subscription_within_its_purpose_is_accepted() {
        let c = catalog();
        assert_eq!(
            c.check(&def(&["citizen_id", "current.commune_code"], Some("province_code = '79'"))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn fields_outside_the_purpose_unknown_names_and_bad_filters_are_refused() {
        let c = catalog();
        let p = c.check(&def(&["citizen_id", "current.address"], None));
        assert!(p.len() == 1 && p[0].contains("field current.address is outside purpose social-insurance"), "{p:?}");
        let p = c.check(&def(&["citizen_id", "shoe_size"], None));
        assert!(p.len() == 1 && p[0].contains("unknown field shoe_size"), "{p:?}");
        let p = c.check(&def(&["citizen_id"], Some("province_code = ")));
        assert!(p.len() == 1 && p[0].contains("filter does not parse at character 16"), "{p:?}");
        let p = c.check(&def(&["citizen_id"], Some("residence_kind = 'permanent'")));
        assert!(p.len() == 1 && p[0].contains("which purpose social-insurance does not allow"), "{p:?}");
        let mut d = def(&["citizen_id"], None);
        d.follow = vec!["public.taxes".into()];
        let p = c.check(&d);
        assert!(p[0].contains("unknown table or event public.taxes"), "{p:?}");
        d.follow = vec!["public.citizens".into()];
        let p = c.check(&d);
        assert!(p[0].contains("does not cover public.citizens"), "{p:?}");
        let mut d = def(&["citizen_id"], None);
        d.start = "yesterday".into();
        d.purpose = "marketing".into();
        let p = c.check(&d);
        assert!(p.len() == 1 && p[0].contains("purpose marketing is not declared"), "{p:?}");
    }
}
