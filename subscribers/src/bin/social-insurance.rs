//! Example subscriber: the social insurance system (BHXH) following `residence.changed` over the
//! hub's gRPC stream. Prints each record, drops redeliveries by event id, and acknowledges after
//! handling, so a restart continues where it left off.

use std::collections::HashSet;

use clap::Parser;
use dongbo_subscribers::grpc::Subscription;

#[derive(Parser)]
#[command(about = "Social insurance: receives residence changes from the dongbo hub over gRPC")]
struct Args {
    /// The hub's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7443")]
    hub: String,
    /// This subscriber's token.
    #[arg(long, env = "DONGBO_SUBSCRIBER_TOKEN", hide_env_values = true)]
    token: String,
    /// The subscription to follow.
    #[arg(long, default_value = "bhxh-residence")]
    subscription: String,
    /// Exit after this many records (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    count: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sub = Subscription::open(&args.hub, &args.token, &args.subscription, None, 256).await?;
    eprintln!("social-insurance: following {} at {}", args.subscription, args.hub);
    let mut seen = HashSet::new();
    let mut handled = 0;
    while let Some(records) = sub.next().await? {
        for r in &records {
            if !seen.insert(r.event_id.clone()) {
                continue;
            }
            println!("[social-insurance] {} {}", r.name, r.body);
            handled += 1;
        }
        if let Some(last) = records.last() {
            sub.ack(&last.resume_token).await?;
        }
        if args.count > 0 && handled >= args.count {
            break;
        }
    }
    Ok(())
}
