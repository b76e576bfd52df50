//! `dongbo-hub serve`: accepts agents and applies their changes to the NDC.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    HashToken {
        /// The agent's token.
        token: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config } => {
            let filter = EnvFilter::try_from_env("DONGBO_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
            let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
            if std::env::var("DONGBO_LOG_FORMAT").is_ok_and(|f| f == "json") {
                builder.json().init();
            } else {
                builder.init();
            }
            let config = dongbo_hub::config::HubConfig::load(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            dongbo_hub::run(config, listener, shutdown_signal()).await.context("dongbo-hub stopped")?;
            Ok(())
        }
        Command::HashToken { token } => {
            use sha2::Digest;
            println!("{}", hex::encode(sha2::Sha256::digest(token.as_bytes())));
            Ok(())
        }
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
