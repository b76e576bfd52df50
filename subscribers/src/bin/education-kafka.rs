//! Example subscriber: the education system reading `residence.changed` from its Kafka topic.
//! Prints each record with its key (the citizen id); drops repeats by `event_id`, since delivery is
//! at least once.

use std::collections::HashSet;

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

#[derive(Parser)]
#[command(about = "Education: reads residence changes from the subscription's Kafka topic")]
struct Args {
    /// Kafka bootstrap brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The subscription's topic (its `delivery.topic` in hub.toml).
    #[arg(long, default_value = "dongbo.sub.moet-enrolment")]
    topic: String,
    /// This reader's consumer group.
    #[arg(long, default_value = "moet-enrolment")]
    group: String,
    /// Exit after this many records (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// The brokers' CA (PEM): talk TLS to them (`SSL`, or `SASL_SSL` with a SASL user).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// SASL user (SCRAM-SHA-512); its password comes from --sasl-password-file or
    /// DONGBO_KAFKA_PASSWORD.
    #[arg(long)]
    sasl_username: Option<String>,
    /// File holding the SASL password (first line).
    #[arg(long)]
    sasl_password_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers).set("group.id", &args.group).set("auto.offset.reset", "earliest");
    if let Some(ca) = &args.ca_file {
        config.set("ssl.ca.location", ca.to_string_lossy()).set("security.protocol", "SSL");
    }
    if let Some(user) = &args.sasl_username {
        let password = dongbo_subscribers::secret(args.sasl_password_file.as_deref(), "DONGBO_KAFKA_PASSWORD")?;
        let protocol = if args.ca_file.is_some() { "SASL_SSL" } else { "SASL_PLAINTEXT" };
        config
            .set("security.protocol", protocol)
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password);
    }
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[&args.topic])?;
    eprintln!("education-kafka: reading {} from {}", args.topic, args.brokers);
    // Recent event ids only: a repeat follows its original closely (a page produced again).
    let mut seen = HashSet::new();
    let mut printed = 0;
    loop {
        let m = consumer.recv().await?;
        let body: serde_json::Value = match serde_json::from_slice(m.payload().unwrap_or_default()) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("education-kafka: offset {} is not JSON ({e}); skipped", m.offset());
                continue;
            }
        };
        let event_id = body["event_id"].as_str().unwrap_or_default().to_string();
        if seen.len() > 100_000 {
            seen.clear();
        }
        if !seen.insert(event_id) {
            continue;
        }
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        println!("[education] citizen {key}: {body}");
        printed += 1;
        if args.count > 0 && printed >= args.count {
            return Ok(());
        }
    }
}
