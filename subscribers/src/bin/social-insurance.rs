//! Example subscriber: the social insurance system (BHXH) following `residence.changed` over the
//! hub's gRPC stream. Prints each record, drops redeliveries by event id, and acknowledges after
//! handling, so a restart continues where it left off. When the hub goes away (a restart, a dropped
//! link) it reconnects with exponential backoff and resumes after the last record it handled.

use std::collections::HashSet;

use std::time::Duration;

use backoff::backoff::Backoff;
use clap::Parser;
use dongbo_subscribers::grpc::{Subscription, TlsFiles};

#[derive(Parser)]
#[command(about = "Social insurance: receives residence changes from the dongbo hub over gRPC")]
struct Args {
    /// The hub's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7443")]
    hub: String,
    /// File holding this subscriber's token (first line). Without it the token comes from the
    /// environment variable DONGBO_SUBSCRIBER_TOKEN; never from the command line, which every
    /// user of the machine can read.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// The subscription to follow.
    #[arg(long, default_value = "bhxh-residence")]
    subscription: String,
    /// Exit after this many records (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// The CA of the hub's certificate (with an `https://` hub).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// This subscriber's certificate, for mutual TLS.
    #[arg(long)]
    cert_file: Option<std::path::PathBuf>,
    /// Its private key.
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = dongbo_subscribers::secret(args.token_file.as_deref(), "DONGBO_SUBSCRIBER_TOKEN")?;
    let mut seen = HashSet::new();
    let mut handled = 0;
    let mut resume: Option<String> = None;
    let mut retry = backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(200),
        max_interval: Duration::from_secs(30),
        max_elapsed_time: None,
        ..Default::default()
    };
    loop {
        let ended = follow(&args, &token, &mut seen, &mut handled, &mut resume, &mut retry).await;
        if args.count > 0 && handled >= args.count {
            return Ok(());
        }
        let wait = retry.next_backoff().unwrap_or(Duration::from_secs(30));
        match ended {
            Ok(()) => eprintln!("social-insurance: the hub ended the stream; reconnecting in {wait:?}"),
            Err(e) => eprintln!("social-insurance: {e:#}; reconnecting in {wait:?}"),
        }
        tokio::time::sleep(wait).await;
    }
}

/// One connection, resuming after `resume`: handles records until the stream ends or `count` is
/// reached.
async fn follow(
    args: &Args,
    token: &str,
    seen: &mut HashSet<String>,
    handled: &mut usize,
    resume: &mut Option<String>,
    retry: &mut backoff::ExponentialBackoff,
) -> anyhow::Result<()> {
    let tls =
        TlsFiles { ca_file: args.ca_file.clone(), cert_file: args.cert_file.clone(), key_file: args.key_file.clone() };
    let mut sub = Subscription::open_with(&args.hub, token, &tls, &args.subscription, resume.as_deref(), 256).await?;
    eprintln!("social-insurance: following {} at {}", args.subscription, args.hub);
    while let Some(records) = sub.next().await? {
        retry.reset();
        for r in &records {
            if !seen.insert(r.event_id.clone()) {
                continue;
            }
            println!("[social-insurance] {} {}", r.name, r.body);
            *handled += 1;
        }
        if let Some(last) = records.last() {
            sub.ack(&last.resume_token).await?;
            *resume = Some(last.resume_token.clone());
        }
        if args.count > 0 && *handled >= args.count {
            return Ok(());
        }
    }
    Ok(())
}
