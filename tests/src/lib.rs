//! The dongbo test harness: real Postgres clusters made with `initdb`, real `dongbo-hub` and
//! `dongbo-agent` processes, and row-by-row comparison of source and NDC.

pub mod backlog;
pub mod browser;
pub mod citizens;
pub mod fanout;
pub mod hostile;
pub mod kafka;
pub mod mariadb;
pub mod pg;
pub mod procs;
pub mod scrape;
pub mod tls;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::pg::PgCluster;
use crate::procs::DongboProcess;

/// A source database, an NDC database, a hub and an agent, as in production but on one machine.
pub struct Deployment {
    /// The cluster holding both databases (`province` and `ndc`).
    pub pg: PgCluster,
    /// Configs, spool and logs.
    pub dir: PathBuf,
    /// The hub's gRPC port.
    pub hub_port: u16,
    /// The agent's metrics and health port (`[status]`).
    pub status_port: u16,
    /// The agent's identity.
    pub source_id: String,
    /// Tables the agent captures.
    pub tables: Vec<String>,
    /// The hub process, when running.
    pub hub: Option<DongboProcess>,
    /// The agent process, when running.
    pub agent: Option<DongboProcess>,
    /// The agent executable to start instead of the workspace's (the legacy build, say).
    pub agent_binary: Option<PathBuf>,
    /// Extra lines for the agent's `[spool]` section.
    pub spool_extra: String,
    /// Fan-out declarations appended to hub.toml (dictionary, events, purposes, subscribers,
    /// subscriptions, admin).
    pub fanout_toml: String,
    /// Environment of the hubs it starts (`DONGBO_LOG_FORMAT=json`, say).
    pub hub_env: Vec<(String, String)>,
    /// Kafka brokers: when set, the agent produces to Kafka and the hubs consume it.
    pub kafka: Option<String>,
    /// The end of the agent's and the hubs' `[kafka]` sections: the security settings
    /// (`insecure_plaintext_demo = true` unless a test sets `[kafka.tls]` / `[kafka.sasl]`).
    pub kafka_security: String,
    /// Mutual TLS between agent and hub, with certificates the harness made; `None` is clear text.
    pub tls: Option<tls::TestPki>,
    /// Lines of the agent's `[source.tls]` table (empty: the default for 127.0.0.1, clear text).
    pub source_tls_toml: String,
    /// Lines of the hub's `[ndc.tls]` table.
    pub ndc_tls_toml: String,
}

/// A TOML table `[name]` holding `lines`, or nothing when there are none.
fn table(name: &str, lines: &str) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n[{name}]\n{lines}\n")
    }
}

/// The agent's token in test deployments.
pub const TOKEN: &str = "test-agent-token";

impl Deployment {
    /// A new cluster with empty `province` and `ndc` databases; `setup_sql` runs in `province`.
    pub async fn new(name: &str, setup_sql: &str, tables: &[&str]) -> anyhow::Result<Self> {
        Self::on(PgCluster::start(name)?, setup_sql, tables).await
    }

    /// The same on a cluster the caller started (a TLS one, say).
    pub async fn on(pg: PgCluster, setup_sql: &str, tables: &[&str]) -> anyhow::Result<Self> {
        pg.create_database("province").await?;
        pg.create_database("ndc").await?;
        let src = pg.connect_as_role("province").await?;
        src.batch_execute(setup_sql).await.context("setup sql")?;
        let dir = pg.dir.join("work");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            pg,
            dir,
            hub_port: pg::free_port(),
            status_port: pg::free_port(),
            source_id: "hcm-population".into(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            hub: None,
            agent: None,
            agent_binary: None,
            spool_extra: String::new(),
            fanout_toml: String::new(),
            hub_env: Vec::new(),
            kafka: None,
            kafka_security: "insecure_plaintext_demo = true\n".into(),
            tls: None,
            source_tls_toml: String::new(),
            ndc_tls_toml: String::new(),
        })
    }

    /// The source database, as the table owner.
    pub async fn source(&self) -> anyhow::Result<Client> {
        self.pg.connect_as_role("province").await
    }

    /// The NDC database.
    pub async fn ndc(&self) -> anyhow::Result<Client> {
        self.pg.connect("ndc").await
    }

    /// The NDC schema of this deployment's agent.
    pub fn ndc_schema(&self) -> String {
        self.source_id.replace('-', "_")
    }

    /// Writes hub.toml with `agents_toml` (or the default agent entry) and starts the hub.
    pub async fn start_hub_with(&mut self, agents_toml: &str) -> anyhow::Result<()> {
        let hub = self.spawn_hub("hub", self.hub_port, agents_toml).await?;
        self.hub = Some(hub);
        Ok(())
    }

    /// Starts one more hub of the same NDC, named `name` (its config, log and fan-out data apart),
    /// with the default agent entry: with Kafka, it joins the same consumer group.
    pub async fn start_another_hub(&self, name: &str) -> anyhow::Result<DongboProcess> {
        self.spawn_hub(name, pg::free_port(), &self.default_agents_toml()).await
    }

    async fn spawn_hub(&self, name: &str, port: u16, agents_toml: &str) -> anyhow::Result<DongboProcess> {
        let kafka = match &self.kafka {
            Some(brokers) => format!("\n[kafka]\nbrokers = \"{brokers}\"\n{}", self.kafka_security),
            None => String::new(),
        };
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n{tls}\n[ndc]\nhost = \"127.0.0.1\"\nport = {pg}\ndatabase = \"ndc\"\nuser = \"{role}\"\npassword = \"{pw}\"\n{ndc_tls}\n[fanout]\ndata_dir = \"{data}\"\n\n{agents_toml}\n{fanout}{kafka}",
            pg = self.pg.port,
            role = pg::ROLE,
            pw = pg::PASSWORD,
            data = self.dir.join(format!("{name}-data")).display(),
            fanout = self.fanout_toml,
            ndc_tls = table("ndc.tls", &self.ndc_tls_toml),
            tls = match &self.tls {
                Some(t) => t.hub_toml(),
                None => "insecure_plaintext_demo = true\n".into(),
            },
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let env: Vec<(&str, &str)> = self.hub_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let log = self.dir.join(format!("{name}.log"));
        // A hub started again appends to the same log: its own line is the one after the others.
        let served_before = std::fs::read_to_string(&log).unwrap_or_default().matches("hub serving").count();
        let mut p =
            DongboProcess::spawn_with_env("dongbo-hub", &["serve", "--config", &path.to_string_lossy()], &log, &env)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The log line, not just the port: a free port picked earlier may since serve something else.
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
            || p.log_text().matches("hub serving").count() <= served_before
        {
            if Instant::now() > deadline || !p.is_running() {
                let log = p.log_text();
                p.kill9();
                bail!("hub {name} did not start:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(p)
    }

    /// The default hub agents section: this deployment's agent, all tables allowed.
    pub fn default_agents_toml(&self) -> String {
        format!("[[agents]]\nid = \"{}\"\ntoken = \"{TOKEN}\"\nprovince = \"79\"\n", self.source_id)
    }

    /// Starts the hub with the default agent entry.
    pub async fn start_hub(&mut self) -> anyhow::Result<()> {
        let agents = self.default_agents_toml();
        self.start_hub_with(&agents).await
    }

    /// The agent's config text.
    pub fn agent_config(&self) -> String {
        let tables: Vec<String> = self.tables.iter().map(|t| format!("\"{t}\"")).collect();
        format!(
            "source_id = \"{id}\"\n\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {pg}\ndatabase = \"province\"\nuser = \"{role}\"\npassword = \"{pw}\"\ntables = [{tables}]\nfeedback_interval_ms = 1000\n{source_tls}\n[spool]\npath = \"{spool}\"\n{extra}\n[status]\nlisten = \"127.0.0.1:{status}\"\nreport_interval_s = 1\n\n{link}",
            id = self.source_id,
            pg = self.pg.port,
            role = pg::ROLE,
            pw = pg::PASSWORD,
            tables = tables.join(", "),
            spool = self.dir.join("spool").display(),
            extra = self.spool_extra,
            status = self.status_port,
            source_tls = table("source.tls", &self.source_tls_toml),
            link = match &self.kafka {
                Some(brokers) => {
                    format!("[kafka]\nbrokers = \"{brokers}\"\nmax_backoff_ms = 1000\n{}", self.kafka_security)
                }
                None => match &self.tls {
                    None => format!(
                        "[hub]\nurl = \"http://127.0.0.1:{}\"\ntoken = \"{TOKEN}\"\nmax_backoff_ms = 1000\n",
                        self.hub_port
                    ),
                    Some(t) => format!(
                        "[hub]\nurl = \"https://localhost:{}\"\ntoken = \"{TOKEN}\"\nmax_backoff_ms = 1000\n{}",
                        self.hub_port,
                        t.agent_toml(&self.source_id)
                    ),
                },
            },
        )
    }

    /// Writes agent.toml and starts the agent.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with_env(&[])
    }

    /// Writes agent.toml and starts the agent with extra environment variables.
    pub fn start_agent_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.start_agent_from(&self.agent_config(), env)
    }

    /// Writes `config` as agent.toml and starts the agent with extra environment variables.
    pub fn start_agent_from(&mut self, config: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, config)?;
        let args = ["run", "--config", &path.to_string_lossy()];
        let log = self.dir.join("agent.log");
        self.agent = Some(match &self.agent_binary {
            Some(exe) => DongboProcess::spawn_path(exe, &args, &log, env)?,
            None => DongboProcess::spawn_with_env("dongbo-agent", &args, &log, env)?,
        });
        Ok(())
    }

    /// Rows of a table as text, in key order.
    pub async fn rows(client: &Client, table: &str, key: &str) -> anyhow::Result<Vec<String>> {
        let rows = client.query(&format!("SELECT t::text FROM {table} t ORDER BY {key}"), &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Waits until the NDC copy of `table` equals the source, then compares row by row; returns the
    /// row count.
    pub async fn wait_same(&self, table: &str, key: &str, timeout: Duration) -> anyhow::Result<usize> {
        let src = self.source().await?;
        let ndc = self.ndc().await?;
        let ndc_table = format!("{}.{table}", self.ndc_schema());
        let digest = |t: &str| {
            format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY {key})), '') FROM {t} x")
        };
        let deadline = Instant::now() + timeout;
        loop {
            let a: String = src.query_one(&digest(table), &[]).await?.get(0);
            let b: Option<String> = match ndc.query_one(&digest(&ndc_table), &[]).await {
                Ok(r) => Some(r.get(0)),
                Err(_) => None, // the target table may not exist yet
            };
            if b.as_deref() == Some(a.as_str()) {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            self.ensure_alive()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let want = Self::rows(&src, table, key).await?;
        let got = Self::rows(&ndc, &ndc_table, key).await.unwrap_or_default();
        if want != got {
            let first_diff = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
            bail!(
                "NDC {ndc_table} differs from source after {timeout:?}: source {} rows, NDC {} rows; first difference at row {first_diff}:\n  source: {:?}\n  ndc:    {:?}\nhub log tail:\n{}\nagent log tail:\n{}",
                want.len(),
                got.len(),
                want.get(first_diff),
                got.get(first_diff),
                self.hub.as_ref().map(|h| tail(&h.log_text(), 15)).unwrap_or_default(),
                self.agent.as_ref().map(|a| tail(&a.log_text(), 15)).unwrap_or_default(),
            );
        }
        Ok(want.len())
    }

    /// Fails with the process's log if the hub or agent we started has died.
    pub fn ensure_alive(&self) -> anyhow::Result<()> {
        for (name, p) in [("hub", &self.hub), ("agent", &self.agent)] {
            if let Some(p) = p {
                if !p.is_running() {
                    bail!("the {name} exited unexpectedly; its log:\n{}", tail(&p.log_text(), 30));
                }
            }
        }
        Ok(())
    }

    /// The hub's bookkeeping for this source, over its gRPC stream and its Kafka partitions:
    /// (highest applied seq, changes applied, changes quarantined).
    pub async fn applied(&self) -> anyhow::Result<(i64, i64, i64)> {
        let ndc = self.ndc().await?;
        let partitions = format!("dongbo.cdc.{}/%", self.source_id);
        let r = ndc
            .query_one(
                "SELECT coalesce(max(applied_seq), 0)::int8, coalesce(sum(changes_applied), 0)::int8, \
                 coalesce(sum(changes_quarantined), 0)::int8 FROM dongbo.applied_position \
                 WHERE source_id = $1 OR source_id LIKE $2",
                &[&self.source_id, &partitions],
            )
            .await?;
        Ok((r.get(0), r.get(1), r.get(2)))
    }

    /// Waits until the hub has applied (or quarantined) exactly `expected` changes, failing if it
    /// applies more.
    pub async fn wait_applied(&self, expected: i64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, applied, quarantined) = self.applied().await.unwrap_or((0, 0, 0));
            let n = applied + quarantined;
            if n == expected {
                return Ok(());
            }
            if n > expected {
                bail!("hub applied {n} changes, more than the {expected} the source made: something was applied twice");
            }
            if Instant::now() > deadline {
                bail!("hub applied {n} of {expected} changes within {timeout:?}");
            }
            self.ensure_alive()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The last `n` lines of a log.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
