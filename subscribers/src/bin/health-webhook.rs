//! Example subscriber: the health insurance system receiving `residence.changed` as signed webhooks.
//! Prints each record whose signature checks out and answers 200.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Health insurance: receives residence changes from the dongbo hub as webhooks")]
struct Args {
    /// Where to listen for the hub's POSTs.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: String,
    /// File holding the subscription's shared HMAC secret (first line); without it, the
    /// environment variable DONGBO_WEBHOOK_SECRET.
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Exit after this many records (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    count: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = dongbo_subscribers::secret(args.secret_file.as_deref(), "DONGBO_WEBHOOK_SECRET")?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("health-webhook: listening on http://{}", args.listen);
    let handled = Arc::new(AtomicUsize::new(0));
    let count = args.count;
    dongbo_subscribers::webhook::serve(listener, secret.into_bytes(), move |r| {
        let handled = handled.clone();
        async move {
            println!("[health] {} {}", r.name, r.body);
            if count > 0 && handled.fetch_add(1, Ordering::SeqCst) + 1 >= count {
                // Answer first, then leave.
                tokio::spawn(async {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    std::process::exit(0);
                });
            }
            axum::http::StatusCode::OK
        }
    })
    .await?;
    Ok(())
}
