//! `dongbo-hub serve`: accepts agents and applies their changes to the NDC.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dongbo-hub", version, about = "Applies agents' change streams to the NDC Postgres exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve agents until stopped (SIGINT/SIGTERM).
    Serve {
        /// Path to hub.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the SHA-256 of a token, for `token_sha256` in hub.toml.
    /// Reads the token from standard input (its first line), so that it never appears in a process
    /// list or a shell history: `dongbo-hub hash-token < token-file`.
    HashToken,
    /// Manage subscriptions of a running hub (admin API).
    Subscriptions {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: SubscriptionAction,
    },
    /// The fleet: every configured agent, its province, link, silence, spool, changes applied,
    /// lag and last error (admin API).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// JSON instead of a table (stable field names, for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List or replay a webhook subscription's dead letters (admin API).
    DeadLetters {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Quarantined changes: list, show, replay once fixed, drop with a reason (admin API).
    Quarantine {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Check the audit log or answer a citizen's access question, straight from the NDC.
    Audit {
        /// Path to hub.toml (for the NDC connection and purpose descriptions).
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Make a CA and certificates for a demo, a test or a small deployment (mutual TLS).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Sign a peer's CSR with the CA in CA_DIR: OUT.pem. The key stays with the peer; the
    /// certificate names it as --kind/--id say, whatever the CSR asked for.
    Sign {
        /// The PEM certificate signing request.
        #[arg(long)]
        csr: PathBuf,
        #[command(flatten)]
        cert: CertArgs,
    },
    /// Print the SHA-256 fingerprint of the (first) certificate in a PEM file, as `tls.revoked_file`
    /// lists revoked ones.
    Fingerprint {
        /// The PEM certificate.
        file: PathBuf,
    },
    /// Make a CA: `ca.pem` and `ca.key` (mode 0600) in DIR.
    Ca {
        /// Where to write the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Its name.
        #[arg(long, default_value = "dongbo demo CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate signed by the CA in CA_DIR: OUT.pem and OUT.key (mode 0600).
    Issue {
        #[command(flatten)]
        cert: CertArgs,
        /// Issue it already expired (for testing that it is refused).
        #[arg(long)]
        expired: bool,
    },
}

/// What a certificate made by `certs issue` or `certs sign` says, and where it goes.
#[derive(clap::Args)]
struct CertArgs {
    /// The CA's directory (from `certs ca`).
    #[arg(long)]
    ca_dir: PathBuf,
    /// What it is for.
    #[arg(long, value_enum)]
    kind: dongbo_hub::certs::Kind,
    /// The peer's id (`source_id` of an agent, id of a subscriber or operator; a server's name; a
    /// Postgres client's role).
    #[arg(long)]
    id: String,
    /// Path prefix of the files to write.
    #[arg(long)]
    out: PathBuf,
    /// The trust domain of the `spiffe://` name (the hub's `tls.trust_domain`).
    #[arg(long, default_value = "ndc.gov.vn")]
    trust_domain: String,
    /// For the hub or another server: its DNS names and IP addresses.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: i64,
}

impl CertArgs {
    fn request(self, expired: bool) -> (PathBuf, PathBuf, dongbo_hub::certs::Request) {
        let r = dongbo_hub::certs::Request {
            kind: self.kind,
            id: self.id,
            trust_domain: self.trust_domain,
            hosts: self.hosts,
            days: self.days,
            expired,
        };
        (self.ca_dir, self.out, r)
    }
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The hub's admin API.
    #[arg(long, default_value = "http://127.0.0.1:7444", env = "DONGBO_ADMIN_URL")]
    admin: String,
    /// File holding the operator's token (first line). Without it the token comes from the
    /// environment variable DONGBO_ADMIN_TOKEN; never from the command line, which every user of
    /// the machine can read.
    #[arg(long, env = "DONGBO_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA of the hub's certificate, for an `https://` admin API.
    #[arg(long, env = "DONGBO_ADMIN_CA_FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SubscriptionAction {
    /// List subscriptions with their positions.
    List,
    /// Add a subscription from a TOML or JSON file holding one definition.
    Add {
        /// The definition file.
        file: PathBuf,
    },
    /// Remove a subscription added at run time.
    Remove {
        /// Subscription id.
        id: String,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List the dead letters of a subscription.
    List {
        /// Subscription id.
        subscription: String,
    },
    /// Deliver them again, in order.
    Replay {
        /// Subscription id.
        subscription: String,
    },
}

/// Which quarantined changes a command is about.
#[derive(clap::Args)]
struct QuarantineFilterArgs {
    /// The agent that sent them.
    #[arg(long)]
    agent: Option<String>,
    /// The source table, `schema.table`.
    #[arg(long)]
    table: Option<String>,
    /// The rule they broke (`date.format`, `commune.ambiguous`, `held`, …).
    #[arg(long)]
    rule: Option<String>,
    /// Words their reason contains.
    #[arg(long)]
    reason: Option<String>,
    /// Only these seqs of the agent (repeat the flag).
    #[arg(long = "seq")]
    seqs: Vec<u64>,
}

impl QuarantineFilterArgs {
    fn filter(self, resolved: bool, all: bool) -> dongbo_hub::quarantine::Filter {
        dongbo_hub::quarantine::Filter {
            agent: self.agent,
            table: self.table,
            rule: self.rule,
            reason: self.reason,
            seqs: self.seqs,
            resolved,
            all,
        }
    }
}

#[derive(Subcommand)]
enum QuarantineAction {
    /// List quarantined changes, oldest first per agent.
    List {
        #[command(flatten)]
        filter: QuarantineFilterArgs,
        /// Resolved (replayed or dropped) ones too.
        #[arg(long)]
        resolved: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one, with the change as the agent sent it.
    Show {
        /// The agent.
        agent: String,
        /// Its seq.
        seq: u64,
    },
    /// Replay those selected, in seq order, through the dictionary in use now (after the data or
    /// the rule was fixed): exactly once; the refused stay with their new reason.
    Replay {
        #[command(flatten)]
        filter: QuarantineFilterArgs,
        /// Every unresolved one.
        #[arg(long)]
        all: bool,
    },
    /// Drop those selected: never applied, resolved with your reason.
    Drop {
        #[command(flatten)]
        filter: QuarantineFilterArgs,
        /// Every unresolved one.
        #[arg(long)]
        all: bool,
        /// Why, recorded with each entry.
        #[arg(long, required = true)]
        why: String,
    },
    /// List Kafka messages that were not change batches (they cannot be replayed).
    Messages {
        /// The partition's stream, `<topic>/<partition>`.
        #[arg(long)]
        stream: Option<String>,
        /// Dropped ones too.
        #[arg(long)]
        resolved: bool,
    },
    /// Drop quarantined Kafka messages, resolved with your reason.
    DropMessages {
        /// The partition's stream, `<topic>/<partition>`.
        #[arg(long)]
        stream: Option<String>,
        /// Only these offsets of the stream (repeat the flag).
        #[arg(long = "offset")]
        offsets: Vec<i64>,
        /// Every unresolved one.
        #[arg(long)]
        all: bool,
        /// Why, recorded with each message.
        #[arg(long, required = true)]
        why: String,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Walk the hash chain and report the first broken link.
    Verify,
    /// Which systems received this citizen's data, when, and for what purpose.
    Citizen {
        /// The 12-digit citizen id.
        citizen_id: String,
    },
}

/// After SIGTERM the hub waits this long for its streams to end, then exits: inside systemd's
/// default stop timeout and the 10 s an operator expects.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

/// The operator's token from `--token-file` or DONGBO_ADMIN_TOKEN.
fn admin_token(admin: &AdminArgs) -> anyhow::Result<String> {
    match &admin.token_file {
        Some(f) => {
            dongbo_connectors::config_file::read_secret(f).with_context(|| format!("cannot read {}", f.display()))
        }
        None => std::env::var("DONGBO_ADMIN_TOKEN")
            .context("no operator token: pass --token-file or set DONGBO_ADMIN_TOKEN"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config } => {
            dongbo_connectors::logging::init();
            let config = dongbo_hub::config::HubConfig::load(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let (asked, mut stopping) = tokio::sync::watch::channel(false);
            let signal = async move {
                shutdown_signal().await;
                let _ = asked.send(true);
            };
            let deadline = async move {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(STOP_GRACE).await;
            };
            tokio::select! {
                r = dongbo_hub::run(config, listener, signal) => r.context("dongbo-hub stopped")?,
                () = deadline => {
                    // Nothing is lost: an NDC transaction cut off here is rolled back, and what was
                    // not acknowledged is sent again by the agents.
                    tracing::warn!(grace_s = STOP_GRACE.as_secs(), "streams did not all end in time after the stop signal; exiting anyway");
                }
            }
            Ok(())
        }
        Command::Certs { action } => {
            match action {
                CertsAction::Sign { csr, cert } => {
                    let (ca_dir, out, r) = cert.request(false);
                    dongbo_hub::certs::sign_csr(&ca_dir, &csr, &out, &r)?;
                    println!("certificate written to {}.pem", out.display());
                }
                CertsAction::Fingerprint { file } => println!("{}", dongbo_hub::certs::fingerprint(&file)?),
                CertsAction::Ca { dir, name, days } => {
                    dongbo_hub::certs::make_ca(&dir, &name, days)?;
                    println!("CA written to {}/ca.pem (key {}/ca.key)", dir.display(), dir.display());
                }
                CertsAction::Issue { cert, expired } => {
                    let (ca_dir, out, r) = cert.request(expired);
                    dongbo_hub::certs::issue(&ca_dir, &out, &r)?;
                    println!("certificate written to {0}.pem (key {0}.key)", out.display());
                }
            }
            Ok(())
        }
        Command::HashToken => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("cannot read the token from standard input")?;
            let token = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!token.is_empty(), "no token on standard input: dongbo-hub hash-token < token-file");
            println!("{}", dongbo_hub::auth::digest(token));
            Ok(())
        }
        Command::Subscriptions { admin, action } => {
            let (method, path, body) = match action {
                SubscriptionAction::List => (reqwest::Method::GET, "/subscriptions".to_string(), None),
                SubscriptionAction::Add { file } => {
                    let text =
                        std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
                    let def: dongbo_hub::fanout::subscription::SubscriptionDef =
                        if file.extension().is_some_and(|e| e == "toml") {
                            toml::from_str(&text)
                                .with_context(|| format!("{} is not a subscription", file.display()))?
                        } else {
                            serde_json::from_str(&text)
                                .with_context(|| format!("{} is not a subscription", file.display()))?
                        };
                    (reqwest::Method::POST, "/subscriptions".to_string(), Some(serde_json::to_vec(&def)?))
                }
                SubscriptionAction::Remove { id } => (reqwest::Method::DELETE, format!("/subscriptions/{id}"), None),
            };
            admin_call(&admin, method, &path, body).await
        }
        Command::Status { admin, json } => {
            let text = admin_request(&admin, reqwest::Method::GET, "/fleet", None).await?;
            if json {
                println!("{}", pretty_json(&text));
            } else {
                let fleet: Vec<dongbo_hub::fleet::FleetEntry> =
                    serde_json::from_str(&text).context("the hub's /fleet answer does not read")?;
                print!("{}", dongbo_hub::fleet::render(&fleet));
            }
            Ok(())
        }
        Command::DeadLetters { admin, action } => {
            let (method, path) = match action {
                DeadLetterAction::List { subscription } => {
                    (reqwest::Method::GET, format!("/subscriptions/{subscription}/dead-letters"))
                }
                DeadLetterAction::Replay { subscription } => {
                    (reqwest::Method::POST, format!("/subscriptions/{subscription}/dead-letters/replay"))
                }
            };
            admin_call(&admin, method, &path, None).await
        }
        Command::Quarantine { admin, action } => quarantine_command(&admin, action).await,
        Command::Audit { config, action } => {
            let config = dongbo_hub::config::HubConfig::load(&config)?;
            let mut client = dongbo_hub::apply::connect(&config.ndc).await.context("cannot reach the NDC")?;
            let checkpoints = match dongbo_hub::audit::Anchor::open(&config)? {
                Some(anchor) => anchor.checkpoints()?,
                None => Vec::new(),
            };
            match action {
                AuditAction::Verify => {
                    let v = dongbo_hub::audit::verify(&mut client, &checkpoints).await?;
                    match v.first_broken {
                        None => {
                            println!(
                                "audit log intact: {} entries, every link holds; {} signed checkpoints hold, anchored up to entry {}",
                                v.entries, v.checkpoints, v.anchored_upto
                            );
                            if v.checkpoints == 0 {
                                println!("warning: no signed checkpoint yet, so a consistent rewrite by an NDC administrator would not be detected");
                            }
                            Ok(())
                        }
                        Some((id, why)) => {
                            println!("audit log BROKEN at entry {id}: {why} ({} entries before it hold)", v.entries);
                            std::process::exit(2);
                        }
                    }
                }
                AuditAction::Citizen { citizen_id } => {
                    let (v, rows) =
                        dongbo_hub::audit::citizen_deliveries(&mut client, &citizen_id, &checkpoints).await?;
                    if let Some((id, why)) = &v.first_broken {
                        println!(
                            "warning: the audit log is broken at entry {id} ({why}); only the {} entries before it are reported",
                            v.entries
                        );
                    }
                    if rows.is_empty() {
                        println!("no system has received data of citizen {citizen_id}");
                    }
                    for r in rows {
                        let purpose = config
                            .purposes
                            .iter()
                            .find(|p| p.id == r.entry.purpose)
                            .map_or(String::new(), |p| format!(" ({})", p.description));
                        println!(
                            "{}  {} via {} ({}), purpose {}{}: {} [{}]",
                            dongbo_hub::fanout::record::rfc3339_micros(r.at_us),
                            r.entry.subscriber,
                            r.entry.channel,
                            r.entry.subscription,
                            r.entry.purpose,
                            purpose,
                            r.entry.event_id,
                            r.entry.fields.join(", ")
                        );
                    }
                    Ok(())
                }
            }
        }
    }
}

/// `dongbo-hub quarantine …`.
async fn quarantine_command(admin: &AdminArgs, action: QuarantineAction) -> anyhow::Result<()> {
    use dongbo_hub::quarantine::Entry;
    match action {
        QuarantineAction::List { filter, resolved, json } => {
            let f = filter.filter(resolved, false);
            let query = serde_urlencoded::to_string(QueryFilter::from(&f))?;
            if !f.seqs.is_empty() {
                anyhow::bail!("list takes no --seq: `quarantine show AGENT SEQ` shows one");
            }
            let text = admin_request(admin, reqwest::Method::GET, &format!("/quarantine?{query}"), None).await?;
            if json {
                println!("{}", pretty_json(&text));
                return Ok(());
            }
            let entries: Vec<Entry> =
                serde_json::from_str(&text).context("the hub's answer is not a list of entries")?;
            println!(
                "{:<20} {:>8} {:<24} {:<11} {:<20} {:<10} REASON",
                "AGENT", "SEQ", "TABLE", "OPERATION", "RULE", "STATE"
            );
            for e in &entries {
                let state = e.resolution.as_deref().unwrap_or("waiting");
                println!(
                    "{:<20} {:>8} {:<24} {:<11} {:<20} {:<10} {}",
                    e.agent, e.seq, e.table, e.operation, e.rule, state, e.reason
                );
            }
            println!("{} entr{}", entries.len(), if entries.len() == 1 { "y" } else { "ies" });
            Ok(())
        }
        QuarantineAction::Show { agent, seq } => {
            admin_call(admin, reqwest::Method::GET, &format!("/quarantine/{agent}/{seq}"), None).await
        }
        QuarantineAction::Replay { filter, all } => {
            let body = serde_json::to_vec(&filter.filter(false, all))?;
            let text = admin_request(admin, reqwest::Method::POST, "/quarantine/replay", Some(body)).await?;
            let report: serde_json::Value = serde_json::from_str(&text).context("the hub's answer is not JSON")?;
            let done = report["entries"].as_array().context("the hub's answer lists no entries")?;
            for d in done {
                let detail = match d["outcome"].as_str() {
                    Some("refused") => {
                        format!("{}: {}", d["rule"].as_str().unwrap_or(""), d["reason"].as_str().unwrap_or(""))
                    }
                    Some("waits") => format!("behind seq {}", d["behind"]),
                    _ => d["replay_id"].as_i64().map(|r| format!("replay {r}")).unwrap_or_default(),
                };
                println!(
                    "{:<20} {:>8} {:<12} {detail}",
                    d["agent"].as_str().unwrap_or(""),
                    d["seq"],
                    d["outcome"].as_str().unwrap_or("")
                );
            }
            let applied = done.iter().filter(|d| d["outcome"] == "applied" || d["outcome"] == "superseded").count();
            println!("{applied} of {} replayed", done.len());
            if report["more"].as_bool().unwrap_or(false) {
                println!("more entries match than one call takes: run the same replay again");
            }
            Ok(())
        }
        QuarantineAction::Drop { filter, all, why } => {
            let body = serde_json::to_vec(&serde_json::json!({ "filter": filter.filter(false, all), "reason": why }))?;
            let text = admin_request(admin, reqwest::Method::POST, "/quarantine/drop", Some(body)).await?;
            let dropped: Vec<Entry> =
                serde_json::from_str(&text).context("the hub's answer is not a list of entries")?;
            for e in &dropped {
                println!("dropped {} seq {} ({})", e.agent, e.seq, e.rule);
            }
            println!("{} dropped", dropped.len());
            Ok(())
        }
        QuarantineAction::Messages { stream, resolved } => {
            let mut pairs = vec![("resolved", resolved.to_string())];
            pairs.extend(stream.map(|s| ("stream", s)));
            let path = format!("/quarantine/messages?{}", serde_urlencoded::to_string(&pairs)?);
            let text = admin_request(admin, reqwest::Method::GET, &path, None).await?;
            let messages: Vec<dongbo_hub::quarantine::Message> =
                serde_json::from_str(&text).context("the hub's answer is not a list of messages")?;
            println!("{:<40} {:>10} {:>8} {:<10} REASON", "STREAM", "OFFSET", "BYTES", "STATE");
            for m in &messages {
                let state = if m.resolved_at.is_some() { "dropped" } else { "waiting" };
                let bytes = m.payload_bytes.map_or("-".to_string(), |b| b.to_string());
                println!("{:<40} {:>10} {bytes:>8} {state:<10} {}", m.stream, m.offset, m.reason);
            }
            println!("{} message{}", messages.len(), if messages.len() == 1 { "" } else { "s" });
            Ok(())
        }
        QuarantineAction::DropMessages { stream, offsets, all, why } => {
            let filter = dongbo_hub::quarantine::MessageFilter { stream, offsets, resolved: false, all };
            let body = serde_json::to_vec(&serde_json::json!({ "filter": filter, "reason": why }))?;
            let text = admin_request(admin, reqwest::Method::POST, "/quarantine/messages/drop", Some(body)).await?;
            let dropped: Vec<dongbo_hub::quarantine::Message> =
                serde_json::from_str(&text).context("the hub's answer is not a list of messages")?;
            for m in &dropped {
                println!("dropped {} offset {}", m.stream, m.offset);
            }
            println!("{} dropped", dropped.len());
            Ok(())
        }
    }
}

/// A listing filter as query parameters (no seqs: a query string has no lists).
#[derive(serde::Serialize)]
struct QueryFilter<'f> {
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'f str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<&'f str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'f str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'f str>,
    resolved: bool,
}

impl<'f> From<&'f dongbo_hub::quarantine::Filter> for QueryFilter<'f> {
    fn from(f: &'f dongbo_hub::quarantine::Filter) -> Self {
        Self {
            agent: f.agent.as_deref(),
            table: f.table.as_deref(),
            rule: f.rule.as_deref(),
            reason: f.reason.as_deref(),
            resolved: f.resolved,
        }
    }
}

/// Calls the admin API and prints its JSON answer; fails with the hub's problems listed.
async fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<()> {
    println!("{}", pretty_json(&admin_request(admin, method, path, body).await?));
    Ok(())
}

/// `text` indented if it is JSON.
fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_string())
}

/// Calls the admin API; its answer's body, or an error with the hub's problems listed.
async fn admin_request(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let url = format!("{}{path}", admin.admin.trim_end_matches('/'));
    let mut client = reqwest::Client::builder();
    if let Some(ca) = &admin.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let mut req = client.build()?.request(method, &url).bearer_auth(admin_token(admin)?);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.with_context(|| format!("cannot reach the admin API at {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(text)
    } else {
        anyhow::bail!("the hub answered {status}:\n{}", pretty_json(&text))
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}
