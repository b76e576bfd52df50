//! `dongbo-bench-fanout`: fan-out figures of the hub, measured on real processes.
//!
//! 1. latency: citizens move at a steady rate (every change raises `residence.changed`); three
//!    subscribers — two over gRPC, one over webhook — report source commit → receipt, p50 and p99.
//! 2. throughput: a backlog of N events waits in the log; one subscriber drains it alone, then ten
//!    drain it at once. The floor is the single subscriber's rate times ten (perfect scaling); every
//!    delivery is also written to the audit log first, so the audit chain is part of the figure.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-fanout [--rate R] [--seconds S] [--events N]`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use dongbo_subscribers::grpc::Subscription;
use dongbo_tests::citizens::{communes, insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{declarations, Receiver};
use dongbo_tests::{pg, Deployment};
use tokio_postgres::Client;

struct Args {
    rate: u64,
    seconds: u64,
    events: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { rate: 5_000, seconds: 20, events: 100_000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: u64 = it.next().context("flag without value")?.parse()?;
        match flag.as_str() {
            "--rate" => a.rate = value,
            "--seconds" => a.seconds = value,
            "--events" => a.events = value,
            other => bail!("unknown flag {other}; use --rate, --seconds, --events"),
        }
    }
    Ok(a)
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn micros(rfc3339: &str) -> Option<i64> {
    humantime::parse_rfc3339(rfc3339).ok()?.duration_since(UNIX_EPOCH).ok().map(|d| d.as_micros() as i64)
}

fn percentiles(mut v: Vec<i64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (at(0.5), at(0.99), at(1.0))
}

/// Moves `n` citizens at `rate` per second, 10 per transaction, each to another commune.
async fn moves(src: &Client, ids: &[String], n: u64, rate: u64, salt: u64) -> anyhow::Result<()> {
    let c = communes();
    let start = Instant::now();
    let mut done = 0u64;
    while done < n {
        let due = if rate == 0 { n } else { (start.elapsed().as_secs_f64() * rate as f64) as u64 };
        if done >= due.min(n) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let mut sql = String::from("BEGIN;");
        for k in 0..10.min(n - done) {
            let i = done + k;
            let id = &ids[(i as usize * 31) % ids.len()];
            let commune = &c[((i + salt) as usize * 7919) % c.len()];
            sql.push_str(&format!(
                "UPDATE citizens SET province_code = '{}', commune_code = '{}', address = 'Số {i}-{salt}' WHERE citizen_id = '{id}';",
                commune.province, commune.code
            ));
        }
        sql.push_str("COMMIT;");
        src.batch_execute(&sql).await?;
        done += 10.min(n - done);
    }
    Ok(())
}

fn grpc_sub(id: &str) -> String {
    format!(
        "\n[[subscriptions]]\nid = \"{id}\"\nsubscriber = \"bhxh\"\npurpose = \"social-insurance\"\nfollow = [\"residence.changed\"]\n\
         fields = [\"citizen_id\", \"current.commune_code\", \"effective_at\"]\ndelivery = {{ kind = \"grpc\" }}\n"
    )
}

/// Reads a subscription until `n` records arrived; returns (latencies in µs, time taken).
async fn drain(url: String, id: String, n: usize) -> anyhow::Result<(Vec<i64>, Duration)> {
    let start = Instant::now();
    let mut sub = Subscription::open(&url, dongbo_tests::fanout::BHXH_TOKEN, &id, None, 1024).await?;
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let Some(batch) = tokio::time::timeout(Duration::from_secs(60), sub.next()).await?? else {
            bail!("{id}: stream ended after {}", lat.len());
        };
        let now = now_us();
        for r in &batch {
            lat.push(now - r.body["effective_at"].as_str().and_then(micros).unwrap_or(now));
        }
        if let Some(last) = batch.last() {
            sub.ack(&last.resume_token).await?;
        }
    }
    Ok((lat, start.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    println!(
        "dongbo-bench-fanout: latency at {} moves/s for {} s; throughput over {} events",
        a.rate, a.seconds, a.events
    );
    let mut d = Deployment::new("bench-fanout", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let ids = insert_citizens(&src, &mut CitizenGen::new(5), 20_000).await?;
    let receiver = Receiver::default();
    let hook_url = receiver.start().await?;
    let mut toml = declarations(pg::free_port());
    // The health purpose gets effective_at here so the webhook receiver can time its records.
    toml = toml.replace(
        "\"residence.changed\" = [\"citizen_id\", \"current.commune_code\", \"current.address\", \"province_code\"]",
        "\"residence.changed\" = [\"citizen_id\", \"current.commune_code\", \"current.address\", \"province_code\", \"effective_at\"]",
    );
    for i in 0..2 {
        toml.push_str(&grpc_sub(&format!("live-{i}")));
    }
    toml.push_str(&format!(
        "\n[[subscriptions]]\nid = \"live-hook\"\nsubscriber = \"bhyt\"\npurpose = \"health-insurance\"\nfollow = [\"residence.changed\"]\n\
         fields = [\"citizen_id\", \"current.commune_code\", \"effective_at\"]\n\
         delivery = {{ kind = \"webhook\", url = \"{hook_url}\", secret = \"{}\" }}\n",
        dongbo_tests::fanout::WEBHOOK_SECRET
    ));
    toml.push_str(&grpc_sub("solo"));
    for i in 0..10 {
        toml.push_str(&grpc_sub(&format!("fan-{i}")));
    }
    d.fanout_toml = toml;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await?;
    let url = format!("http://127.0.0.1:{}", d.hub_port);

    // 1. Latency at a steady rate, three subscribers.
    let n = a.rate * a.seconds;
    let live: Vec<_> = (0..2).map(|i| tokio::spawn(drain(url.clone(), format!("live-{i}"), n as usize))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    moves(&src, &ids, n, a.rate, 1).await?;
    let mut results = Vec::new();
    for h in live {
        results.push(h.await??);
    }
    let hooks = receiver.wait_for(n as usize, Duration::from_secs(120)).await;
    println!("\n== residence.changed latency, source commit -> subscriber, at {} moves/s for {} s", a.rate, a.seconds);
    for (i, (lat, _)) in results.iter().enumerate() {
        let (p50, p99, max) = percentiles(lat.clone());
        println!(
            "  gRPC subscriber {i}: {} events, p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (target p99 < 250)",
            lat.len()
        );
    }
    match hooks {
        Ok(h) => {
            let arrivals = receiver.arrivals.lock().expect("lock").clone();
            let lat: Vec<i64> = h
                .iter()
                .zip(arrivals)
                .map(|(r, at)| at - r.body["effective_at"].as_str().and_then(micros).unwrap_or(at))
                .collect();
            let (p50, p99, max) = percentiles(lat);
            println!("  webhook subscriber:  {} events, p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (target p99 < 250)", h.len());
        }
        Err(e) => println!("  webhook subscriber: {e}"),
    }

    // 2. Throughput: a backlog, drained by one subscriber and then by ten at once.
    let url2 = url.clone();
    let ev = a.events;
    moves(&src, &ids, ev, 0, 2).await?;
    let total_events = n + ev;
    let (_, one) = drain(url2.clone(), "solo".into(), total_events as usize).await?;
    let start = Instant::now();
    let many: Vec<_> =
        (0..10).map(|i| tokio::spawn(drain(url2.clone(), format!("fan-{i}"), total_events as usize))).collect();
    let mut delivered = 0usize;
    for h in many {
        delivered += h.await??.0.len();
    }
    let ten = start.elapsed();
    let one_rate = total_events as f64 / one.as_secs_f64();
    let ten_rate = delivered as f64 / ten.as_secs_f64();
    println!("\n== fan-out throughput over a backlog of {total_events} events (audit entry per delivery)");
    println!("  one subscriber         {one_rate:>10.0} deliveries/s  ({:.2} s)", one.as_secs_f64());
    println!(
        "  ten at once            {ten_rate:>10.0} deliveries/s  ({:.2} s)   ratio {:.2} of 10 x one subscriber",
        ten.as_secs_f64(),
        ten_rate / (10.0 * one_rate)
    );
    let audit: i64 = d.ndc().await?.query_one("SELECT count(*) FROM dongbo.audit_log", &[]).await?.get(0);
    println!("  audit log entries      {audit:>10}");
    Ok(())
}
