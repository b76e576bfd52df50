//! Bad input gets a clear error and loses nothing: unauthenticated and mis-identified agents, a
//! malformed batch, and changes for a table the agent may not send (quarantined with the reason).

use std::time::Duration;

use dongbo_proto::v1::{agent_message, ingest_client::IngestClient, AgentMessage, Hello, SpooledBatch};
use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::{Deployment, TOKEN};
use tonic::Code;

async fn open(
    port: u16,
    token: &str,
    hello_id: &str,
    then: Vec<AgentMessage>,
) -> Result<Vec<dongbo_proto::v1::HubMessage>, tonic::Status> {
    let mut client = IngestClient::connect(format!("http://127.0.0.1:{port}")).await.expect("hub reachable");
    let mut msgs = vec![AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            source_id: hello_id.into(),
            agent_version: "test".into(),
            protocol_version: dongbo_proto::PROTOCOL_VERSION,
        })),
    }];
    msgs.extend(then);
    let mut request = tonic::Request::new(tokio_stream::iter(msgs));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    let mut inbound = client.stream(request).await?.into_inner();
    let mut got = Vec::new();
    while let Some(m) = inbound.message().await? {
        got.push(m);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_malformed_streams_are_refused_and_apply_nothing() -> anyhow::Result<()> {
    let mut d = Deployment::new("badgrpc", CITIZENS_DDL, &["public.citizens"]).await?;
    d.start_hub().await?;

    let err = open(d.hub_port, "wrong-token", &d.source_id, vec![]).await.expect_err("a wrong token is refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("unknown agent token"), "{}", err.message());

    let err = open(d.hub_port, TOKEN, "da-nang-health", vec![]).await.expect_err("another agent's id is refused");
    assert_eq!(err.code(), Code::PermissionDenied);

    let garbage = AgentMessage {
        kind: Some(agent_message::Kind::Batch(SpooledBatch {
            first_seq: 1,
            last_seq: 1,
            change_batch: vec![0xff, 0x01, 0x02],
        })),
    };
    let err = open(d.hub_port, TOKEN, &d.source_id, vec![garbage]).await.expect_err("garbage is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("not a valid protobuf ChangeBatch"), "{}", err.message());

    // A well-formed protobuf that breaks the contract: a change pointing at a schema it lacks.
    let bad = dongbo_proto::v1::ChangeBatch {
        source_id: d.source_id.clone(),
        first_seq: 5,
        last_seq: 5,
        schemas: vec![],
        changes: vec![dongbo_proto::v1::ChangeEvent { seq: 5, schema_index: 0, op: 1, ..Default::default() }],
    };
    let msg = AgentMessage {
        kind: Some(agent_message::Kind::Batch(SpooledBatch {
            first_seq: 5,
            last_seq: 5,
            change_batch: prost::Message::encode_to_vec(&bad),
        })),
    };
    let err = open(d.hub_port, TOKEN, &d.source_id, vec![msg]).await.expect_err("a broken batch is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("references schema 0"), "{}", err.message());

    assert_eq!(d.applied().await?, (0, 0, 0), "nothing was applied or recorded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_a_table_the_agent_may_not_send_are_quarantined_not_applied() -> anyhow::Result<()> {
    let setup = format!("{CITIZENS_DDL}\nCREATE TABLE secrets (id int PRIMARY KEY, v text);");
    let mut d = Deployment::new("acl", &setup, &["public.citizens", "public.secrets"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(4);
    insert_citizens(&src, &mut gen, 100).await?;
    src.batch_execute("INSERT INTO secrets SELECT g, 'bí mật ' || g FROM generate_series(1, 5) g").await?;
    let agents = format!("{}tables = [\"public.citizens\"]\n", d.default_agents_toml());
    d.start_hub_with(&agents).await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    insert_citizens(&src, &mut gen, 50).await?;
    src.batch_execute("UPDATE secrets SET v = 'đã đổi' WHERE id = 1").await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    // 1 truncate + 5 rows from the snapshot, 1 update from the stream.
    let ndc = d.ndc().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, q) = d.applied().await?;
        if q == 7 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "expected 7 quarantined changes, have {q}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = ndc.query("SELECT source_table, operation, reason FROM dongbo.quarantine ORDER BY seq", &[]).await?;
    assert_eq!(rows.len(), 7);
    let reason: String = rows[0].get(2);
    assert!(reason.contains("public.secrets is not among the tables agent hcm-population may send"), "{reason}");
    let ops: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(ops.iter().filter(|o| *o == "snapshotread").count(), 5);
    assert_eq!(ops.last().map(String::as_str), Some("update"));
    let exists: bool = ndc.query_one("SELECT to_regclass('hcm_population.secrets') IS NOT NULL", &[]).await?.get(0);
    assert!(!exists, "no NDC table was made for the refused table");
    let (_, applied, _) = d.applied().await?;
    assert_eq!(applied, 1 + 100 + 50, "citizens flowed on beside the quarantine");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_that_does_not_decode_is_reported_not_silently_dropped() -> anyhow::Result<()> {
    let mut d = Deployment::new("badoutbox", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(5);
    insert_citizens(&src, &mut gen, 20).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    if let Some(h) = d.hub.as_mut() {
        h.kill9();
    }
    // Someone edits the hub's bookkeeping; a hub with a fresh fan-out log must read the outbox.
    let ndc = d.ndc().await?;
    ndc.execute(
        "INSERT INTO dongbo.event_outbox (source_id, seq, event_id, body, stream) VALUES ($1, 1, 'x', '{\"x\": 1}', $1)",
        &[&d.source_id],
    )
    .await?;
    std::fs::remove_dir_all(d.dir.join("hub-data"))?;
    d.start_hub().await?;
    let wanted = "dongbo.event_outbox row of stream hcm-population seq 1 does not decode";
    d.hub.as_ref().expect("hub running").wait_for_log(wanted, Duration::from_secs(30)).await?;
    // Once the row is dealt with, the agent's next reconnection flows on, nothing lost.
    ndc.execute("DELETE FROM dongbo.event_outbox WHERE event_id = 'x'", &[]).await?;
    insert_citizens(&src, &mut gen, 10).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 30);
    Ok(())
}
