//! A hostile agent: speaks the `Ingest` contract directly with hand-made batches, as an attacker
//! holding one agent's token would, instead of going through `dongbo-agent`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dongbo_connectors::model::{ChangeBatch, ChangeEvent, Column, Operation, TableId, TableSchema, Value};
use dongbo_proto::v1::{agent_message, hub_message, ingest_client::IngestClient, AgentMessage, Hello, SpooledBatch};
use tokio::sync::mpsc;

/// A table schema from `(name, type)` pairs, keyed by its first column.
pub fn schema(schema: &str, table: &str, columns: &[(&str, &str)]) -> Arc<TableSchema> {
    let cols =
        columns.iter().map(|(n, t)| Column { name: n.to_string(), type_name: t.to_string(), type_oid: 25 }).collect();
    Arc::new(TableSchema::new(TableId::new(schema, table), cols, vec![0]))
}

/// An insert of `row` (text values) into `table` with `seq`.
pub fn insert(seq: u64, table: &Arc<TableSchema>, row: &[&str]) -> ChangeEvent {
    let after: Vec<Value> = row.iter().map(|v| Value::Text(v.to_string())).collect();
    let key = vec![after[0].clone()];
    ChangeEvent {
        commit_time_us: 1_790_000_000_000_000,
        txid: seq,
        ..ChangeEvent::for_test(seq, table, Operation::Insert, key, Some(after))
    }
}

/// The spooled-batch message of `changes`.
pub fn message(source_id: &str, changes: Vec<ChangeEvent>) -> AgentMessage {
    let (first_seq, last_seq) = (changes[0].seq, changes[changes.len() - 1].seq);
    let bytes = dongbo_connectors::wire::encode_batch(ChangeBatch { source_id: source_id.into(), changes });
    AgentMessage { kind: Some(agent_message::Kind::Batch(SpooledBatch { first_seq, last_seq, change_batch: bytes })) }
}

/// Opens an ingest stream as `source_id` with `token`, sends `batches` and waits until the hub
/// acknowledged `until_seq`; returns the last acknowledged seq.
pub async fn send(
    port: u16,
    token: &str,
    source_id: &str,
    batches: Vec<AgentMessage>,
    until_seq: u64,
) -> anyhow::Result<u64> {
    let mut client = IngestClient::connect(format!("http://127.0.0.1:{port}")).await.context("hub reachable")?;
    let (tx, rx) = mpsc::channel(16);
    let hello = Hello {
        source_id: source_id.into(),
        agent_version: "hostile".into(),
        protocol_version: dongbo_proto::PROTOCOL_VERSION,
    };
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let mut inbound = client.stream(request).await?.into_inner();
    for b in batches {
        tx.send(b).await?;
    }
    let mut durable = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while durable < until_seq {
        let m = tokio::time::timeout_at(deadline, inbound.message()).await.context("no ack within 60 s")??;
        match m.and_then(|m| m.kind) {
            Some(hub_message::Kind::Ack(a)) => durable = a.durable_seq,
            Some(hub_message::Kind::Welcome(_)) => {}
            None => bail!("the hub ended the stream at seq {durable}"),
        }
    }
    Ok(durable)
}
