//! The hub bounded under hostile or broken peers, and stopped cleanly: a second agent's token (the
//! attacker's) sends a 10 M-change batch, floods declared lengths, opens 100 streams, and 2 000
//! silent connections arrive; the hub stays up, its memory stays bounded, it holds one NDC connection
//! for the attacker, and the real agent keeps flowing. A zstd bomb (1 GiB of zeros in a few KB) is
//! cut at the message limit while decompressing, the hub's peak memory barely moving. SIGTERM with an agent and a subscriber
//! connected ends the hub within 10 s, and the restart loses and repeats nothing. A flood of status
//! reports with hostile strings is kept bounded and plain; an oversized one ends its stream.

use std::time::{Duration, Instant};

use dongbo_proto::v1 as pb;
use dongbo_proto::v1::{agent_message, ingest_client::IngestClient, AgentMessage, Hello, SpooledBatch};
use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

const ATTACKER_TOKEN: &str = "attacker-token";

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kb / 1024
}

fn hello() -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            source_id: "attacker".into(),
            agent_version: "hostile".into(),
            protocol_version: dongbo_proto::PROTOCOL_VERSION,
        })),
    }
}

/// Ten million tiny deletes, encoded straight to protobuf bytes (268 MB).
fn ten_million_deletes() -> Vec<u8> {
    let schema = pb::TableSchema {
        table: Some(pb::TableId { schema: "public".into(), name: "t".into() }),
        columns: vec![pb::Column { name: "id".into(), type_name: "int8".into(), type_oid: 20 }],
        key_columns: vec![0],
        version: 0,
        dialect: 0,
    };
    let mut head = pb::ChangeBatch {
        source_id: "attacker".into(),
        first_seq: 1,
        last_seq: 10_000_000,
        schemas: vec![schema],
        changes: vec![],
    }
    .encode_to_vec();
    head.reserve(10_000_000 * 27);
    for seq in 1..=10_000_000u64 {
        let ev = pb::ChangeEvent {
            seq,
            op: pb::Operation::Delete as i32,
            key: Some(pb::Row { values: vec![pb::Value { kind: Some(pb::value::Kind::Int(seq as i64)) }] }),
            commit_time_us: 1_790_000_000_000_000 + seq as i64,
            txid: 1,
            ..Default::default()
        };
        head.push(0x2a); // field 5 (changes), length-delimited
        ev.encode_length_delimited(&mut head).expect("a Vec grows");
    }
    head
}

/// Opens an attacker stream and returns its status once the hub ends it (or `None` if still open
/// after `wait`).
async fn attacker_stream(port: u16, then: Vec<AgentMessage>, wait: Duration) -> Option<tonic::Status> {
    let mut client =
        IngestClient::connect(format!("http://127.0.0.1:{port}")).await.ok()?.max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello()).await.ok()?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {ATTACKER_TOKEN}").parse().ok()?);
    let sender = tokio::spawn(async move {
        for m in then {
            if tx.send(m).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tx);
    });
    let result = tokio::time::timeout(wait, async {
        let mut inbound = client.stream(request).await?.into_inner();
        loop {
            if inbound.message().await?.is_none() {
                return Ok::<_, tonic::Status>(());
            }
        }
    })
    .await;
    sender.abort();
    match result {
        Ok(Err(status)) => Some(status),
        Ok(Ok(())) => Some(tonic::Status::ok("ended")),
        Err(_) => None,
    }
}

/// The attacker's host, last error and version in `dongbo.fleet`, once a report was written.
async fn wait_fleet_host(d: &Deployment, id: &str) -> anyhow::Result<(String, String, String)> {
    let ndc = d.ndc().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = ndc
            .query_opt(
                "SELECT host, last_error, agent_version FROM dongbo.fleet WHERE source_id = $1 AND host IS NOT NULL",
                &[&id],
            )
            .await?;
        if let Some(r) = row {
            return Ok((r.get(0), r.get(1), r.get(2)));
        }
        anyhow::ensure!(Instant::now() < deadline, "no status of {id} reached dongbo.fleet");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn ndc_connections(d: &Deployment) -> anyhow::Result<i64> {
    let ndc = d.ndc().await?;
    Ok(ndc.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dongbo-hub'", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_bomb_is_cut_at_the_message_limit_and_the_hub_stays_small() -> anyhow::Result<()> {
    let mut d = Deployment::new("zstdbomb", CITIZENS_DDL, &["public.citizens"]).await?;
    d.fanout_toml = "\n[limits]\nmax_message_bytes = 8388608\nstream_buffer_bytes = 16777216\n".into();
    let agents = format!("{}\n[[agents]]\nid = \"attacker\"\ntoken = \"{ATTACKER_TOKEN}\"\n", d.default_agents_toml());
    d.start_hub_with(&agents).await?;
    let pid = d.hub.as_ref().and_then(|h| h.pid()).expect("hub running");
    let baseline = dongbo_tests::procs::peak_rss_kib(pid).unwrap_or(0) / 1024;
    // 1 GiB of zeros in a few kilobytes: the declared (compressed) length passes every size check.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut encoder, &zeros)?;
    }
    let bomb = encoder.finish()?;
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", d.hub_port)).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/dongbo.v1.Ingest/Stream", d.hub_port))
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "zstd")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {ATTACKER_TOKEN}"))
        .body(())?;
    let (response, mut body) = client.send_request(request, false)?;
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bomb);
    body.send_data(bytes::Bytes::from(frame), true)?;
    let response = tokio::time::timeout(Duration::from_secs(30), response).await??;
    // A refusal before any message comes as a trailers-only response: grpc-status in the headers.
    let in_headers = response.headers().get("grpc-status").map(|v| v.to_str().unwrap_or("?").to_string());
    let message = response.headers().get("grpc-message").map(|v| v.to_str().unwrap_or("?").to_string());
    let mut stream = response.into_body();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = stream.data().await {
            chunk?;
        }
        anyhow::Ok(stream.trailers().await?)
    })
    .await??;
    let grpc_status = in_headers
        .or_else(|| status.as_ref().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap_or("?").to_string()));
    assert!(grpc_status.as_deref().is_some_and(|s| s != "0"), "the bomb was not refused: {status:?} {message:?}");
    assert!(message.as_deref().is_some_and(|m| m.contains("exceeded")), "{message:?}");
    let peak = dongbo_tests::procs::peak_rss_kib(pid).unwrap_or(0) / 1024;
    eprintln!("hub peak RSS {baseline} -> {peak} MiB; grpc-status {grpc_status:?} {message:?} {status:?}");
    assert!(peak < baseline + 64, "decompressing the bomb took the hub from {baseline} to {peak} MiB");
    d.ensure_alive()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_batch_is_held_to_the_message_limit_before_it_is_opened() -> anyhow::Result<()> {
    let mut d = Deployment::new("batchbomb", CITIZENS_DDL, &["public.citizens"]).await?;
    d.fanout_toml = "\n[limits]\nmax_message_bytes = 8388608\nstream_buffer_bytes = 16777216\n".into();
    let agents = format!("{}\n[[agents]]\nid = \"attacker\"\ntoken = \"{ATTACKER_TOKEN}\"\n", d.default_agents_toml());
    d.start_hub_with(&agents).await?;
    let pid = d.hub.as_ref().and_then(|h| h.pid()).expect("hub running");
    let baseline = dongbo_tests::procs::peak_rss_kib(pid).unwrap_or(0) / 1024;
    let batch = |bytes: Vec<u8>| AgentMessage {
        kind: Some(agent_message::Kind::Batch(pb::SpooledBatch { first_seq: 1, last_seq: 1, change_batch: bytes })),
    };
    // 256 MiB of zeros in a frame that says so (the agent's own format): refused unopened.
    let stated = zstd::bulk::compress(&vec![0u8; 256 << 20], 1)?;
    assert!(stated.len() < 1 << 20);
    let status = attacker_stream(d.hub_port, vec![batch(stated)], Duration::from_secs(30)).await;
    let status = status.expect("the hub ends the stream");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("over the limit of 8388608"), "{status:?}");
    // The same zeros in a frame that does not say how much it holds: refused, not opened to see.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        std::io::Write::write_all(&mut encoder, &zeros)?;
    }
    let unstated = encoder.finish()?;
    let status = attacker_stream(d.hub_port, vec![batch(unstated)], Duration::from_secs(30)).await;
    let status = status.expect("the hub ends the stream");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("does not state its size"), "{status:?}");
    let peak = dongbo_tests::procs::peak_rss_kib(pid).unwrap_or(0) / 1024;
    assert!(peak < baseline + 64, "the compressed batches took the hub from {baseline} to {peak} MiB");
    // Nothing of either was applied, and a real agent's compressed batches still flow.
    let ndc = d.ndc().await?;
    let attacker: i64 = ndc
        .query_one(
            "SELECT coalesce(sum(changes_applied + changes_quarantined), 0)::int8 FROM dongbo.applied_position \
             WHERE source_id = 'attacker'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(attacker, 0);
    d.start_agent()?;
    let src = d.source().await?;
    src.batch_execute(
        "INSERT INTO citizens (citizen_id, full_name, birth_date, province_code, commune_code, address)
         VALUES ('079123456789', 'Trần Thị B', '1990-01-01', '79', '26734', 'Số 1')",
    )
    .await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    d.ensure_alive()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_floods_leave_the_hub_up_bounded_and_the_other_agent_flowing() -> anyhow::Result<()> {
    let mut d = Deployment::new("limits", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(51);
    insert_citizens(&src, &mut gen, 100).await?;
    d.fanout_toml = "\n[limits]\nhandshake_timeout_ms = 2000\n".into();
    let agents = format!("{}\n[[agents]]\nid = \"attacker\"\ntoken = \"{ATTACKER_TOKEN}\"\n", d.default_agents_toml());
    d.start_hub_with(&agents).await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let pid = d.hub.as_ref().and_then(|h| h.pid()).expect("hub running");
    let baseline = rss_mib(pid);

    // 1. Ten million deletes in one batch: refused by its size before the hub reserves or decodes it.
    let batch = ten_million_deletes();
    assert!(batch.len() > 250_000_000, "{}", batch.len());
    let huge = AgentMessage {
        kind: Some(agent_message::Kind::Batch(SpooledBatch {
            first_seq: 1,
            last_seq: 10_000_000,
            change_batch: batch,
        })),
    };
    let status =
        attacker_stream(d.hub_port, vec![huge], Duration::from_secs(60)).await.expect("the hub ends the stream");
    assert!(
        status.code() == tonic::Code::OutOfRange || status.message().contains("too large"),
        "{:?}: {}",
        status.code(),
        status.message()
    );
    d.ensure_alive()?;

    // 2. 100 streams declaring 500 MiB messages and sending nothing more, over raw HTTP/2.
    let mut floods = Vec::new();
    for _ in 0..100 {
        let port = d.hub_port;
        floods.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let (client, connection) = h2::client::handshake(tcp).await?;
            tokio::spawn(connection);
            let mut client = client.ready().await?;
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://127.0.0.1:{port}/dongbo.v1.Ingest/Stream"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", format!("Bearer {ATTACKER_TOKEN}"))
                .body(())?;
            let (response, mut body) = client.send_request(request, false)?;
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&(500u32 << 20).to_be_bytes());
            body.send_data(bytes::Bytes::from(prefix), false)?;
            let answer = tokio::time::timeout(Duration::from_secs(20), response).await;
            anyhow::Ok(format!("{answer:?}"))
        }));
    }
    for f in floods {
        let answer = f.await??;
        assert!(answer.contains("grpc-status") || answer.contains("Ok(Ok(Response"), "{answer}");
    }
    d.ensure_alive()?;

    // 3. 100 streams of the attacker's agent at once: one live stream, one NDC connection.
    let before = ndc_connections(&d).await?;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let port = d.hub_port;
        streams.push(tokio::spawn(async move { attacker_stream(port, vec![], Duration::from_secs(8)).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = ndc_connections(&d).await?;
    assert!(during <= before + 1, "the attacker holds {} NDC connections", during - before);
    let mut replaced = 0;
    let mut live = 0;
    for s in streams {
        match s.await? {
            None => live += 1,
            Some(status) if status.message().contains("replaced this one") => replaced += 1,
            Some(status) => assert!(status.code() == tonic::Code::Unavailable, "{status:?}"),
        }
    }
    assert!(live <= 1, "{live} streams of one agent stayed live");
    assert!(replaced >= 90, "only {replaced} streams were told plainly they were replaced");

    // 4. 2 000 connections that never say anything: closed after the handshake timeout.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", d.hub_port)).await?);
    }
    // Meanwhile the real agent keeps flowing.
    insert_citizens(&src, &mut gen, 100).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in &mut idle {
        let mut buf = [0u8; 64];
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
        // The hub may first write its HTTP/2 settings; then it must close.
        loop {
            match tokio::time::timeout(left, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => anyhow::bail!("a silent connection stayed open past the handshake timeout"),
            }
        }
    }
    d.ensure_alive()?;

    // 5. Status reports: 5 000 at once with hostile strings are kept bounded and plain; one over
    //    the report limit ends the stream with a reason.
    let evil = pb::AgentStatusReport {
        host: format!("<script>x</script>\u{1b}[2J{}", "h".repeat(600)),
        last_error: "e\r\n".repeat(300),
        agent_version: "v".repeat(200),
        ..Default::default()
    };
    let flood: Vec<AgentMessage> =
        (0..5000).map(|_| AgentMessage { kind: Some(agent_message::Kind::Status(evil.clone())) }).collect();
    assert!(attacker_stream(d.hub_port, flood, Duration::from_secs(5)).await.is_none(), "the flood's stream was ended");
    let row = wait_fleet_host(&d, "attacker").await?;
    let (host, error, version): (String, String, String) = row;
    assert!(host.len() <= dongbo_proto::STATUS_HOST_MAX && host.starts_with("<script>x</script>[2Jh"), "{host:?}");
    assert!(error.len() <= dongbo_proto::STATUS_ERROR_MAX && !error.contains('\r'), "{error:?}");
    assert!(version.len() <= 64, "{version:?}");
    let huge = pb::AgentStatusReport { host: "h".repeat(100_000), ..Default::default() };
    let status = attacker_stream(
        d.hub_port,
        vec![AgentMessage { kind: Some(agent_message::Kind::Status(huge)) }],
        Duration::from_secs(10),
    )
    .await
    .expect("the hub ends the stream of an oversized status report");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("status report of"), "{}", status.message());
    d.ensure_alive()?;
    let peak = rss_mib(pid);
    assert!(peak < baseline + 300, "hub RSS grew from {baseline} MiB to {peak} MiB");
    insert_citizens(&src, &mut gen, 10).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 210);
    // 1 truncate + 210 inserts, each once; the attacker applied nothing.
    d.wait_applied(211, Duration::from_secs(30)).await?;
    let attacker: i64 = d
        .ndc()
        .await?
        .query_one(
            "SELECT coalesce(sum(changes_applied), 0)::int8 FROM dongbo.applied_position WHERE source_id = 'attacker'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(attacker, 0);
    eprintln!("hub RSS: {baseline} MiB before the floods, {peak} MiB after");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_agent_and_a_subscriber_connected_stops_within_10_s_and_loses_nothing() -> anyhow::Result<()> {
    let mut d = Deployment::new("sigterm", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(52);
    insert_citizens(&src, &mut gen, 100).await?;
    d.fanout_toml = dongbo_tests::fanout::declarations(dongbo_tests::pg::free_port())
        + &dongbo_tests::fanout::bhxh_residence(&["citizen_id"]);
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let url = format!("http://127.0.0.1:{}", d.hub_port);
    let _subscriber = dongbo_subscribers::grpc::Subscription::open(
        &url,
        dongbo_tests::fanout::BHXH_TOKEN,
        "bhxh-residence",
        None,
        64,
    )
    .await?;

    // Changes keep coming while the hub is told to stop.
    let writer = {
        let src = d.source().await?;
        tokio::spawn(async move {
            let mut gen = CitizenGen::new(53);
            for _ in 0..40 {
                insert_citizens(&src, &mut gen, 25).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hub = d.hub.as_mut().expect("hub running");
    let started = Instant::now();
    hub.stop();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "the hub took {took:?} to stop");
    assert!(hub.log_text().contains("hub stopped") || hub.log_text().contains("exiting anyway"), "{}", hub.log_text());
    writer.await??;
    d.start_hub().await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 1100);
    // 1 truncate + 1 100 inserts, each applied exactly once across the stop.
    d.wait_applied(1101, Duration::from_secs(30)).await?;
    eprintln!("hub stopped in {took:?}");
    Ok(())
}
