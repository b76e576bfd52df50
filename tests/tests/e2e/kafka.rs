//! Kafka transport on a real broker (`tansu`): the agent produces to its topic, hubs consume it as a
//! consumer group and keep the consumed offset in the NDC, in the same transaction as the rows. The
//! scenarios run over SASL_SSL (SCRAM-SHA-512), as production does.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{admin, quarantine_cli, ADMIN_TOKEN};
use dongbo_tests::kafka::Broker;
use dongbo_tests::workload::mixed_small_txns;
use dongbo_tests::Deployment;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::Method;
use serde_json::json;

/// A deployment whose agent produces to `broker` and whose hub consumes it, with the librdkafka
/// settings of a test client of that broker. `secure`: the broker takes only SASL/SCRAM over TLS,
/// and agent and hub use `[kafka.tls]` / `[kafka.sasl]`.
async fn kafka_deployment(name: &str, secure: bool) -> anyhow::Result<(Deployment, Broker, ClientConfig)> {
    let mut d = Deployment::new(name, CITIZENS_DDL, &["public.citizens"]).await?;
    let (broker, client) = if secure {
        let pki = dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?;
        let broker = Broker::start_secure(&d.dir, &pki).await?;
        d.kafka_security = broker.client_security_toml(&pki, &d.dir)?;
        let client = secure_client(&broker, &pki);
        (broker, client)
    } else {
        let broker = Broker::start(&d.dir).await?;
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", broker.brokers());
        (broker, client)
    };
    d.kafka = Some(broker.brokers());
    Ok((d, broker, client))
}

fn topic(d: &Deployment) -> String {
    format!("dongbo.cdc.{}", d.source_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_kafka_the_ndc_equals_the_source_and_bad_messages_are_quarantined() -> anyhow::Result<()> {
    let (mut d, _broker, client) = kafka_deployment("kafkae2e", true).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(41);
    let mut ids = insert_citizens(&src, &mut gen, 1_000).await?;
    let mut changes = 1 + ids.len() as u64; // the snapshot's opening truncate and its rows
    let admin_port = dongbo_tests::pg::free_port();
    let admin_toml = format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    d.start_hub_with(&(d.default_agents_toml() + &admin_toml)).await?;
    d.start_agent()?;
    // Counting changes below needs the snapshot done first: rows it reads are not streamed.
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;

    // Messages on the agent's topic that are not change events: quarantined, the partition flows on.
    let producer: FutureProducer = client.create()?;
    let t = topic(&d);
    producer
        .send(FutureRecord::to(&t).key("junk").payload(&b"\x00\x01 not a change batch"[..]), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    producer
        .send(FutureRecord::<str, [u8]>::to(&t).key("tombstone"), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 10).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;

    let ndc = d.ndc().await?;
    let rows = ndc
        .query("SELECT stream, reason, message_key FROM dongbo.stream_quarantine ORDER BY kafka_offset", &[])
        .await?;
    let got: Vec<(String, String, Option<Vec<u8>>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, format!("{t}/0"));
    assert!(got[0].1.starts_with("not a dongbo change batch"), "{}", got[0].1);
    assert_eq!(got[0].2.as_deref(), Some(&b"junk"[..]));
    assert_eq!(got[1].1, "the message has no value");
    // The NDC's offset is past every message of the partition.
    let next: i64 = ndc
        .query_one("SELECT kafka_next_offset FROM dongbo.applied_position WHERE source_id = $1", &[&format!("{t}/0")])
        .await?
        .get(0);
    assert!(next as u64 >= changes + 2, "next offset {next} for {changes} changes and 2 bad messages");

    // An operator lists them and drops one with a reason; they cannot be replayed.
    let stream = format!("{t}/0");
    let (status, listed) = admin(admin_port, Method::GET, "/quarantine/messages", None).await?;
    assert_eq!(status, 200, "{listed}");
    let listed = listed.as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["stream"], stream.as_str());
    assert_eq!(listed[0]["key"], "6a756e6b", "the key, hex: junk");
    assert_eq!(listed[0]["payload_bytes"], 21);
    assert!(listed[1]["payload_bytes"].is_null(), "a tombstone has no value");
    let junk = listed[0]["offset"].clone();
    let drop = |filter: serde_json::Value, reason: &str| {
        admin(admin_port, Method::POST, "/quarantine/messages/drop", Some(json!({"filter": filter, "reason": reason})))
    };
    for (filter, reason, why) in [
        (json!({}), "load tool junk", "say which"),
        (json!({"offsets": [junk]}), "load tool junk", "offsets are a stream's"),
        (json!({"stream": stream, "offsets": [junk]}), "  ", "needs a reason"),
        (json!({"stream": stream, "resolved": true}), "load tool junk", "resolved"),
    ] {
        let (status, body) = drop(filter, reason).await?;
        assert_eq!(status, 400, "{why}: {body}");
        assert!(body.to_string().contains(why), "{why}: {body}");
    }
    let (status, dropped) = drop(json!({"stream": stream, "offsets": [junk]}), "load tool junk").await?;
    assert_eq!(status, 200, "{dropped}");
    assert_eq!(dropped.as_array().map(Vec::len), Some(1), "{dropped}");
    assert_eq!(dropped[0]["resolution_note"], "load tool junk");
    assert!(dropped[0]["resolved_by"].as_str().is_some_and(|o| !o.is_empty()), "{dropped}");
    let (_, again) = drop(json!({"stream": stream, "offsets": [junk]}), "load tool junk").await?;
    assert_eq!(again, json!([]), "a dropped message is not dropped twice");
    let (_, waiting) = admin(admin_port, Method::GET, "/quarantine/messages", None).await?;
    assert_eq!(waiting.as_array().map(Vec::len), Some(1), "the tombstone still waits: {waiting}");
    let (_, all) = admin(admin_port, Method::GET, "/quarantine/messages?resolved=true", None).await?;
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let (ok, text) = quarantine_cli(admin_port, &["messages", "--resolved", "--stream", &stream])?;
    assert!(
        ok && text.contains("dropped") && text.contains("the message has no value") && text.contains("2 messages"),
        "{text}"
    );
    let (ok, text) = quarantine_cli(admin_port, &["drop-messages", "--stream", &stream, "--why", "empty record"])?;
    assert!(ok && text.contains("1 dropped"), "{text}");
    let anonymous = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin_port}/quarantine/messages/drop"))
        .json(&json!({"filter": {"all": true}, "reason": "x"}))
        .send()
        .await?;
    assert_eq!(anonymous.status().as_u16(), 401);

    // The agent reaches the hubs only through Kafka, yet the fleet registry shows it: its status
    // records on the topic (every second here) are kept, not applied.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = ndc
            .query_opt(
                "SELECT transport, host, spool_limit_bytes, capture_running, last_contact > now() - interval '30 s'                  FROM dongbo.fleet WHERE source_id = $1 AND reported_at IS NOT NULL",
                &[&d.source_id],
            )
            .await?;
        if let Some(r) = row {
            assert_eq!(r.get::<_, String>(0), "kafka");
            assert!(r.get::<_, Option<String>>(1).is_some_and(|h| !h.is_empty()), "the agent's host");
            assert!(r.get::<_, Option<i64>>(2).is_some_and(|b| b > 0), "the agent's spool limit");
            assert_eq!(r.get::<_, Option<bool>>(3), Some(true), "capture running");
            assert!(r.get::<_, bool>(4), "heard from lately");
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the Kafka agent never appeared in dongbo.fleet");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Whether a hub's log says it holds a partition now: its last membership line is an assignment
/// of at least one partition.
fn holds_a_partition(log: &str) -> bool {
    log.lines()
        .rev()
        .find(|l| l.contains("Kafka partitions assigned") || l.contains("Kafka partitions revoked"))
        .is_some_and(|l| l.contains("Kafka partitions assigned") && l.contains("[("))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_one_killed_mid_stream_the_other_takes_over_with_nothing_lost_or_applied_twice() -> anyhow::Result<()>
{
    let (mut d, _broker, _) = kafka_deployment("kafkatwohubs", true).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(42);
    let mut ids = insert_citizens(&src, &mut gen, 500).await?;
    let mut changes = 1 + ids.len() as u64;
    d.start_hub().await?;
    let mut second = d.start_another_hub("hub2").await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 10).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;

    // Kill the hub that holds the partition while changes keep coming.
    let writer = d.source().await?;
    let mut writer_gen = CitizenGen::new(43);
    let mut writer_ids = ids.clone();
    let load = tokio::spawn(async move { mixed_small_txns(&writer, &mut writer_gen, &mut writer_ids, 60).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first_owns = loop {
        let (first, other) = (d.hub.as_ref().expect("hub").log_text(), second.log_text());
        match (holds_a_partition(&first), holds_a_partition(&other)) {
            (true, false) => break true,
            (false, true) => break false,
            _ if std::time::Instant::now() > deadline => {
                let membership =
                    |log: &str| log.lines().filter(|l| l.contains("Kafka partitions")).collect::<Vec<_>>().join("\n");
                anyhow::bail!("no single hub holds the partition:\n{}\n--\n{}", membership(&first), membership(&other))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    if first_owns {
        d.hub.as_mut().expect("hub").kill9();
        d.hub = None;
    } else {
        second.kill9();
    }
    changes += load.await??;
    let survivor_log = d.dir.join(if first_owns { "hub2.log" } else { "hub.log" });
    d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await.map_err(|e| {
        let log = std::fs::read_to_string(&survivor_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("NOTICE")).collect();
        anyhow::anyhow!("{e}\nsurvivor log:\n{}", dongbo_tests::tail(&lines.join("\n"), 30))
    })?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_stream_keeps_every_one_of_20_000_changes() -> anyhow::Result<()> {
    let (mut d, mut broker, _) = kafka_deployment("kafkabroker", true).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(44);
    let mut ids = insert_citizens(&src, &mut gen, 2_000).await?;
    let mut changes = 1 + ids.len() as u64;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;
    // ~18 500 more changes; the broker dies (kill -9) in the middle and comes back on the same file.
    let writer = d.source().await?;
    let mut writer_gen = CitizenGen::new(45);
    let mut writer_ids = ids.clone();
    let load = tokio::spawn(async move { mixed_small_txns(&writer, &mut writer_gen, &mut writer_ids, 440).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await?;
    changes += load.await??;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 5).await?;
    assert!(changes >= 20_000, "only {changes} changes");
    d.wait_same("citizens", "citizen_id", Duration::from_secs(240)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_subscription_gets_residence_changes_keyed_by_citizen_with_only_its_fields_and_audited(
) -> anyhow::Result<()> {
    use dongbo_tests::fanout::{admin, declarations};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let (mut d, broker, client) = kafka_deployment("kafkasub", true).await?;
    let admin_port = dongbo_tests::pg::free_port();
    let sub_topic = "dongbo.sub.moet-enrolment";
    let mixed_topic = "dongbo.sub.moet-mixed";
    d.fanout_toml = format!(
        "{}\n[[subscriptions]]\nid = \"moet-enrolment\"\nsubscriber = \"moet\"\npurpose = \"education\"\n\
         follow = [\"residence.changed\"]\nfields = [\"citizen_id\", \"current.commune_code\"]\n\
         delivery = {{ kind = \"kafka\", topic = \"{sub_topic}\" }}\n\
         \n[[subscriptions]]\nid = \"moet-mixed\"\nsubscriber = \"moet\"\npurpose = \"education\"\n\
         follow = [\"public.citizens\", \"residence.changed\"]\n\
         fields = [\"citizen_id\", \"commune_code\", \"current.commune_code\", \"op\", \"event\"]\n\
         delivery = {{ kind = \"kafka\", topic = \"{mixed_topic}\" }}\n",
        declarations(admin_port)
    );
    let src = d.source().await?;
    // Source columns named like the envelope: their values must never reach a record.
    src.batch_execute(
        "ALTER TABLE citizens ADD COLUMN op text DEFAULT 'forged-op', ADD COLUMN event text DEFAULT 'forged.event'",
    )
    .await?;
    let mut gen = CitizenGen::new(46);
    let ids = insert_citizens(&src, &mut gen, 50).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;
    let (moved, renamed) = (ids[3].clone(), ids[4].clone());
    src.execute("UPDATE citizens SET full_name = 'Lê Văn Tên Mới' WHERE citizen_id = $1", &[&renamed]).await?;
    src.execute(
        "UPDATE citizens SET commune_code = '26734', address = '12 Lê Lợi, phường Sài Gòn' WHERE citizen_id = $1",
        &[&moved],
    )
    .await?;

    let consumer: StreamConsumer = client
        .clone()
        .set("group.id", "test-moet")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()?;
    consumer.subscribe(&[sub_topic])?;
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let m = consumer.recv().await?;
            let key = m.key().map(|k| String::from_utf8_lossy(k).to_string());
            let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if key.as_deref() == Some(moved.as_str()) {
                return anyhow::Ok((key, body));
            }
            anyhow::ensure!(key.as_deref() != Some(renamed.as_str()), "a change of unwatched columns raised an event");
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no record for the moved citizen on {sub_topic} within 60 s"))??;
    let (_, body) = got;
    let mut keys: Vec<String> = Vec::new();
    for (k, v) in body.as_object().expect("records are objects") {
        match v.as_object() {
            Some(inner) => keys.extend(inner.keys().map(|i| format!("{k}.{i}"))),
            None => keys.push(k.clone()),
        }
    }
    keys.sort();
    assert_eq!(keys, vec!["citizen_id", "current.commune_code", "event", "event_id"], "{body}");
    assert_eq!(body["current"]["commune_code"], "26734");

    // The mixed subscription: per record, only what the purpose grants for its item.
    let mixed: StreamConsumer = client
        .clone()
        .set("group.id", "test-moet-mixed")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()?;
    mixed.subscribe(&[mixed_topic])?;
    let (event, row) = tokio::time::timeout(Duration::from_secs(60), async {
        let (mut event, mut row) = (None, None);
        while event.is_none() || row.is_none() {
            let m = mixed.recv().await?;
            let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            anyhow::ensure!(!body.to_string().contains("forged"), "a source column reached a record: {body}");
            if body["citizen_id"] != serde_json::json!(moved) {
                continue;
            }
            if body.get("event").is_some() {
                event = Some(body);
            } else if body["op"] == "update" {
                row = Some(body);
            }
        }
        anyhow::Ok((event.unwrap_or_default(), row.unwrap_or_default()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no event and row change of the moved citizen on {mixed_topic} within 60 s"))??;
    let top = |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let (mut ek, mut rk) = (top(&event), top(&row));
    ek.sort();
    rk.sort();
    assert_eq!(ek, vec!["citizen_id", "current", "event", "event_id"], "{event}");
    assert_eq!(rk, vec!["citizen_id", "commune_code", "event_id", "op", "table"], "{row}");
    assert_eq!(row["table"], "public.citizens");

    // The example subscriber a newcomer runs prints the same record.
    let example = tokio::process::Command::new(dongbo_tests::procs::binary("education-kafka")?)
        .args(["--brokers", &broker.brokers(), "--topic", sub_topic, "--group", "example", "--count", "1"])
        .arg("--ca-file")
        .arg(d.dir.join("pki/ca/ca.pem"))
        .args(["--sasl-username", dongbo_tests::kafka::SASL_USER.0])
        .env("DONGBO_KAFKA_PASSWORD", dongbo_tests::kafka::SASL_USER.1)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), example).await??;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains(&format!("[education] citizen {moved}")) && printed.contains("26734"), "{printed}");

    let (status, report) = admin(admin_port, reqwest::Method::GET, &format!("/audit/citizens/{moved}"), None).await?;
    assert_eq!(status, 200, "{report}");
    let lines = report["deliveries"].as_array().expect("a list");
    assert!(
        lines.iter().any(|l| l["subscriber"] == "moet" && l["purpose"] == "education" && l["channel"] == "kafka"),
        "{report}"
    );
    Ok(())
}

/// librdkafka settings of a test client of the secure broker, as the agent and hub set them.
fn secure_client(broker: &Broker, pki: &dongbo_tests::tls::TestPki) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", broker.brokers())
        .set("security.protocol", "SASL_SSL")
        .set("ssl.ca.location", pki.dir.join("ca/ca.pem").to_string_lossy())
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", dongbo_tests::kafka::SASL_USER.0)
        .set("sasl.password", dongbo_tests::kafka::SASL_USER.1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sasl_ssl_the_whole_kafka_path_works_and_wrong_credentials_or_clear_text_get_nowhere() -> anyhow::Result<()>
{
    use dongbo_tests::fanout::declarations;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let mut d = Deployment::new("kafkatls", CITIZENS_DDL, &["public.citizens"]).await?;
    let pki = dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?;
    let broker = Broker::start_secure(&d.dir, &pki).await?;
    d.kafka = Some(broker.brokers());
    d.kafka_security = broker.client_security_toml(&pki, &d.dir)?;
    let sub_topic = "dongbo.sub.moet-tls";
    d.fanout_toml = format!(
        "{}\n[[subscriptions]]\nid = \"moet-tls\"\nsubscriber = \"moet\"\npurpose = \"education\"\n\
         follow = [\"residence.changed\"]\nfields = [\"citizen_id\", \"current.commune_code\"]\n\
         delivery = {{ kind = \"kafka\", topic = \"{sub_topic}\" }}\n",
        declarations(dongbo_tests::pg::free_port())
    );
    let src = d.source().await?;
    let mut gen = CitizenGen::new(47);
    let ids = insert_citizens(&src, &mut gen, 300).await?;

    // The agent's check: a wrong SASL password and a clear-text attempt are refused.
    let check = |d: &Deployment| -> anyhow::Result<(bool, String)> {
        let config = d.dir.join("agent-check.toml");
        std::fs::write(&config, d.agent_config())?;
        let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-agent")?)
            .args(["check", "--config"])
            .arg(&config)
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let good = d.kafka_security.clone();
    std::fs::write(d.dir.join("wrong.password"), "not-the-password")?;
    d.kafka_security = good.replace("kafka.password", "wrong.password");
    let (passed, text) = check(&d)?;
    assert!(!passed, "a wrong SASL password passed check:\n{text}");
    assert!(text.contains("SASL authentication error"), "the broker's refusal reaches the operator:\n{text}");
    d.kafka_security = "insecure_plaintext_demo = true\n".into();
    let (passed, text) = check(&d)?;
    assert!(!passed, "clear text against the TLS listener passed check:\n{text}");
    d.kafka_security = good;
    let (passed, text) = check(&d)?;
    assert!(passed, "{text}");

    d.start_hub().await?;
    d.start_agent()?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?, 300);
    let moved = ids[7].clone();
    src.execute("UPDATE citizens SET commune_code = '26734' WHERE citizen_id = $1", &[&moved]).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;

    // The hub's subscription producer works over SASL_SSL too.
    let consumer: StreamConsumer = secure_client(&broker, &pki)
        .set("group.id", "test-moet-tls")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()?;
    consumer.subscribe(&[sub_topic])?;
    let body = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let m = consumer.recv().await?;
            if m.key() == Some(moved.as_bytes()) {
                return anyhow::Ok(serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())?);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no record for the moved citizen on {sub_topic} within 60 s"))??;
    assert_eq!(body["current"]["commune_code"], "26734", "{body}");

    // A client without SASL, straight to the broker behind the TLS terminator: refused.
    use rdkafka::producer::Producer;
    let bare: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{}", broker.port))
        .set("socket.timeout.ms", "3000")
        .create()?;
    let metadata =
        tokio::task::spawn_blocking(move || bare.client().fetch_metadata(None, Duration::from_secs(5))).await?;
    assert!(metadata.is_err(), "the broker served metadata without SASL");
    d.ensure_alive()?;
    Ok(())
}

/// The hub killed between an NDC commit and its fan-out log append, on a Kafka stream: after the
/// restart a table follower still gets every row change of that window, and the NDC applied each
/// change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_between_the_ndc_commit_and_its_log_append_still_logs_that_windows_rows() -> anyhow::Result<()> {
    use dongbo_tests::fanout::declarations;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let (mut d, _broker, client) = kafka_deployment("kafkawindow", false).await?;
    let rows_topic = "dongbo.sub.moet-rows";
    d.fanout_toml = format!(
        "{}\n[[subscriptions]]\nid = \"moet-rows\"\nsubscriber = \"moet\"\npurpose = \"education\"\n\
         follow = [\"public.citizens\"]\nfields = [\"citizen_id\", \"commune_code\", \"op\"]\n\
         delivery = {{ kind = \"kafka\", topic = \"{rows_topic}\" }}\n",
        declarations(dongbo_tests::pg::free_port())
    );
    let src = d.source().await?;
    let mut gen = CitizenGen::new(47);
    let ids = insert_citizens(&src, &mut gen, 40).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(90)).await?;
    d.wait_applied(41, Duration::from_secs(30)).await?;

    // The next apply commits in the NDC, then the hub dies before its log append.
    d.hub.as_mut().expect("hub").stop();
    d.hub_env = vec![("DONGBO_FAULT".into(), "hub-applied-not-logged".into())];
    d.start_hub().await?;
    let moved = &ids[..10];
    for id in moved {
        src.execute("UPDATE citizens SET commune_code = '26734' WHERE citizen_id = $1", &[id]).await?;
    }
    let exited = d.hub.as_mut().expect("hub").wait_exit(Duration::from_secs(60));
    anyhow::ensure!(exited.is_some(), "the hub did not reach the fault point");
    let (applied, _, _) = d.applied().await?;
    anyhow::ensure!(
        applied > 41,
        "the crash came before the NDC commit ({applied} applied): not the window under test"
    );
    d.hub_env.clear();
    d.start_hub().await?;
    // The partition comes back once the broker gives up on the killed hub's session.
    let hub = d.hub.as_ref().expect("hub");
    hub.wait_for_log("partition reads again what the NDC applied", Duration::from_secs(90)).await?;

    // Every row change of the window reached the table follower.
    let consumer: StreamConsumer = client
        .clone()
        .set("group.id", "test-moet-rows")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()?;
    consumer.subscribe(&[rows_topic])?;
    let mut seen = std::collections::BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < moved.len() {
            let m = consumer.recv().await?;
            let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if body["op"] == "update" && body["commune_code"] == "26734" {
                seen.insert(body["citizen_id"].as_str().unwrap_or_default().to_string());
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!("only {} of the window's {} row changes reached the follower", seen.len(), moved.len())
    })??;
    assert_eq!(seen, moved.iter().cloned().collect());
    // Applied once each: 1 truncate, 40 rows, 10 updates.
    assert_eq!(d.applied().await?.1, 51);
    Ok(())
}
