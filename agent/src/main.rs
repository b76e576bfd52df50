//! `dongbo-agent`: `run` captures and ships; `check` says what is wrong in plain words; `status`
//! shows the spool, the position and the link.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "dongbo-agent",
    version,
    about = "Captures changes beside a local database and ships them to the dongbo hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture, spool and ship until stopped (SIGINT/SIGTERM).
    Run {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Snapshot TABLE again at the next start, the stream going on meanwhile (the agent must be
    /// stopped): for a table whose NDC copy drifted.
    Resnapshot {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Tables, as in source.tables.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Show the spool, the source position, the last acknowledgement and the link.
    Status {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// JSON instead of a table (stable field names, for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Check the source database, spool and hub link, and say what is wrong.
    Check {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_logs();
            let path = config;
            let config = dongbo_agent::config::AgentConfig::load(&path)?;
            let (tx, rx) = watch::channel(false);
            let (source_tx, source_rx) = watch::channel(config.source.clone());
            // SIGHUP reloads: the hub link reconnects with its TLS files, and capture restarts
            // with agent.toml's [source] as it now reads (a table added to source.tables is then
            // snapshotted online). It must never kill the agent, as its default action would.
            if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        match dongbo_agent::config::AgentConfig::load(&path) {
                            Ok(new) => {
                                tracing::info!(
                                    "SIGHUP: reloading; capture restarts with [source] as agent.toml now reads"
                                );
                                let _ = source_tx.send(new.source);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "SIGHUP: agent.toml does not load; keeping the running configuration")
                            }
                        }
                    }
                });
            }
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutdown requested");
                let _ = tx.send(true);
            });
            dongbo_agent::run(config, rx, source_rx).await.context("dongbo-agent stopped")?;
            Ok(())
        }
        Command::Resnapshot { config, tables } => {
            let config = dongbo_agent::config::AgentConfig::load(&config)?;
            let marked = dongbo_agent::resnapshot(&config, &tables).await?;
            println!("{} will be snapshotted again when the agent starts", marked.join(", "));
            Ok(())
        }
        Command::Status { config, json } => {
            let config = dongbo_agent::config::AgentConfig::load(&config)?;
            let status = dongbo_agent::status::read(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Check { config } => {
            let config = dongbo_agent::config::AgentConfig::load(&config)?;
            let report = dongbo_agent::check::run(&config).await;
            print!("{report}");
            if report.first_problem().is_some() {
                println!("\nsome checks failed: fix the PROBLEM lines above, then run check again");
                std::process::exit(1);
            }
            println!("\nall checks passed");
            Ok(())
        }
    }
}

fn init_logs() {
    dongbo_connectors::logging::init();
    dongbo_connectors::allocator::warn_if_untuned();
}

async fn wait_for_signal() {
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
}
