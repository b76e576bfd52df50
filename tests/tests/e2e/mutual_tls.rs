//! Mutual TLS between agent and hub, with certificates made by `dongbo-hub certs`: the whole path
//! works over it; an agent without a certificate, with one from another CA, with an expired one, or
//! with agent A's certificate claiming to be B is refused with the reason and applies nothing; a
//! clear-text client against the TLS listener gets nowhere.

use std::time::Duration;

use dongbo_proto::v1::ingest_client::IngestClient;
use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::tls::TestPki;
use dongbo_tests::{Deployment, TOKEN};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Opens an ingest stream over TLS with `identity` (or none) and says Hello as `source_id`;
/// returns the status the hub answers with.
async fn try_agent(d: &Deployment, pki: &TestPki, identity: Option<&str>, source_id: &str) -> String {
    let ca = std::fs::read(pki.dir.join("ca/ca.pem")).expect("CA");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(prefix) = identity {
        let cert = std::fs::read(format!("{prefix}.pem")).expect("cert");
        let key = std::fs::read(format!("{prefix}.key")).expect("key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint =
        Endpoint::from_shared(format!("https://localhost:{}", d.hub_port)).expect("url").tls_config(tls).expect("tls");
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return format!("connect: {e:?}"),
    };
    let mut client = IngestClient::new(channel);
    let hello = dongbo_proto::v1::AgentMessage {
        kind: Some(dongbo_proto::v1::agent_message::Kind::Hello(dongbo_proto::v1::Hello {
            source_id: source_id.into(),
            agent_version: "test".into(),
            protocol_version: dongbo_proto::PROTOCOL_VERSION,
        })),
    };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![hello]));
    request.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().expect("ascii"));
    match client.stream(request).await {
        Ok(mut s) => match s.get_mut().message().await {
            Ok(Some(m)) => format!("accepted: {m:?}"),
            Ok(None) => "ended".into(),
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        },
        Err(e) => format!("{:?}: {} {:?}", e.code(), e.message(), std::error::Error::source(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_the_path_works_and_wrong_certificates_are_refused() -> anyhow::Result<()> {
    let mut d = Deployment::new("mtls", CITIZENS_DDL, &["public.citizens"]).await?;
    let pki = TestPki::new(&d.dir.join("pki"))?;
    d.tls = Some(pki.clone());
    let src = d.source().await?;
    let mut gen = CitizenGen::new(61);
    insert_citizens(&src, &mut gen, 200).await?;
    let admin_port = dongbo_tests::pg::free_port();
    d.fanout_toml = dongbo_tests::fanout::declarations(admin_port)
        + &dongbo_tests::fanout::bhxh_residence(&["citizen_id"])
        + "\n[[admin.operators]]\nid = \"dashboard\"\nrole = \"read\"\n";
    // The agent may also come with a certificate from another PKI, known by its subject.
    let agents = format!(
        "{}certificate_subject = \"C = VN, O = So TTTT TP.HCM, CN = {}\"\n\n[[agents]]\nid = \"da-nang-health\"\ntoken = \"other-token\"\n",
        d.default_agents_toml(),
        d.source_id
    );
    d.start_hub_with(&agents).await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    insert_citizens(&src, &mut gen, 100).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 300);

    // No certificate.
    let none = try_agent(&d, &pki, None, &d.source_id).await;
    eprintln!("no certificate: {none}");
    assert!(!none.starts_with("accepted"), "{none}");
    // A certificate from a CA the hub does not trust.
    pki.other_ca("rogue-ca")?;
    let rogue = pki.agent("rogue", &d.source_id, Some("rogue-ca"), false)?;
    let refused = try_agent(&d, &pki, Some(&rogue), &d.source_id).await;
    assert!(!refused.starts_with("accepted"), "{refused}");
    // An expired one.
    let expired = pki.agent("expired", &d.source_id, None, true)?;
    let refused = try_agent(&d, &pki, Some(&expired), &d.source_id).await;
    assert!(!refused.starts_with("accepted"), "{refused}");
    // Agent A's certificate (with A's token) claiming to be agent B.
    let a = pki.agent("a", "da-nang-health", None, false)?;
    let claim = try_agent(&d, &pki, Some(&a), &d.source_id).await;
    eprintln!("claim: {claim}");
    assert!(claim.contains("PermissionDenied") && claim.contains("names agent da-nang-health"), "{claim}");
    // The agent's own certificate with its own token is accepted.
    let own =
        try_agent(&d, &pki, Some(&pki.dir.join(format!("agent-{}", d.source_id)).to_string_lossy()), &d.source_id)
            .await;
    assert!(own.starts_with("accepted"), "the agent's own certificate and token: {own}");
    // The production flow, as the README gives it: the province makes its key and CSR with
    // openssl, the NDC signs the CSR; the certificate names the agent the NDC chose.
    let province_dir = d.dir.join("province-tls");
    std::fs::create_dir_all(&province_dir)?;
    let (key, csr) = (province_dir.join("agent.key"), province_dir.join("agent.csr"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj"])
        .arg(format!("/CN={}", d.source_id))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()?;
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    let signed = province_dir.join("agent");
    let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .args(["certs", "sign", "--kind", "agent", "--id", &d.source_id])
        .arg("--ca-dir")
        .arg(pki.dir.join("ca"))
        .arg("--csr")
        .arg(&csr)
        .arg("--out")
        .arg(&signed)
        .output()?;
    assert!(out.status.success(), "certs sign: {}", String::from_utf8_lossy(&out.stderr));
    let from_csr = try_agent(&d, &pki, Some(&signed.to_string_lossy()), &d.source_id).await;
    assert!(from_csr.starts_with("accepted"), "a certificate signed from the province's CSR: {from_csr}");
    // A certificate made by plain openssl with a subject and no spiffe:// name (as a national PKI
    // issues them): known by the agent's certificate_subject.
    let ext = province_dir.join("client.ext");
    std::fs::write(&ext, "extendedKeyUsage = clientAuth\nkeyUsage = digitalSignature\n")?;
    let by_subject = province_dir.join("by-subject");
    for args in [
        vec![
            "req".to_string(),
            "-new".into(),
            "-newkey".into(),
            "ec".into(),
            "-pkeyopt".into(),
            "ec_paramgen_curve:P-256".into(),
            "-nodes".into(),
            "-subj".into(),
            format!("/C=VN/O=So TTTT TP.HCM/CN={}", d.source_id),
            "-keyout".into(),
            format!("{}.key", by_subject.display()),
            "-out".into(),
            format!("{}.csr", by_subject.display()),
        ],
        vec![
            "x509".to_string(),
            "-req".into(),
            "-in".into(),
            format!("{}.csr", by_subject.display()),
            "-CA".into(),
            pki.dir.join("ca/ca.pem").display().to_string(),
            "-CAkey".into(),
            pki.dir.join("ca/ca.key").display().to_string(),
            "-set_serial".into(),
            "4242".into(),
            "-days".into(),
            "30".into(),
            "-extfile".into(),
            ext.display().to_string(),
            "-out".into(),
            format!("{}.pem", by_subject.display()),
        ],
    ] {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let known = try_agent(&d, &pki, Some(&by_subject.to_string_lossy()), &d.source_id).await;
    assert!(known.starts_with("accepted"), "a certificate known by its subject: {known}");

    // Clear text against the TLS listener gets nowhere.
    let refused = match IngestClient::connect(format!("http://127.0.0.1:{}", d.hub_port)).await {
        Err(e) => format!("connect: {e}"),
        Ok(mut c) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            drop(tx);
            match c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                Ok(_) => "accepted".to_string(),
                Err(e) => format!("{:?}", e.code()),
            }
        }
    };
    assert!(refused != "accepted", "{refused}");

    // Subscribers: bhxh's own certificate and token open its subscription; moet's certificate
    // cannot open bhxh's subscription, nor pass with bhxh's token.
    use dongbo_subscribers::grpc::Subscription;
    use dongbo_tests::fanout::{BHXH_TOKEN, MOET_TOKEN};
    let url = format!("https://localhost:{}", d.hub_port);
    let bhxh = pki.subscriber_files(&pki.subscriber("bhxh", "bhxh")?);
    let moet = pki.subscriber_files(&pki.subscriber("moet", "moet")?);
    let mut ok = Subscription::open_with(&url, BHXH_TOKEN, &bhxh, "bhxh-residence", None, 8).await?;
    let first = tokio::time::timeout(Duration::from_millis(500), ok.next()).await;
    assert!(!matches!(first, Ok(Err(_))), "bhxh's own subscription: {first:?}");
    let other = Subscription::open_with(&url, MOET_TOKEN, &moet, "bhxh-residence", None, 8).await.err();
    assert!(format!("{other:#?}").contains("belongs to another subscriber"), "{other:#?}");
    let mixed = Subscription::open_with(&url, BHXH_TOKEN, &moet, "bhxh-residence", None, 8).await.err();
    assert!(format!("{mixed:#?}").contains("names subscriber moet but the token names subscriber bhxh"), "{mixed:#?}");

    // The admin API is HTTPS: clear text gets nowhere; the admin token works; the read-only
    // operator known by its certificate alone reads but cannot change.
    let admin = format!("https://localhost:{admin_port}");
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{admin_port}/subscriptions")).send().await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|r| !r.status().is_success()), "{plain:?}");
    let with_token = pki
        .https_client(None)?
        .get(format!("{admin}/subscriptions"))
        .bearer_auth(dongbo_tests::fanout::ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(with_token.status(), 200);
    let dashboard = pki.https_client(Some(&pki.operator("dashboard", "dashboard")?))?;
    assert_eq!(dashboard.get(format!("{admin}/audit/verify")).send().await?.status(), 200);
    assert_eq!(
        dashboard.post(format!("{admin}/subscriptions")).json(&serde_json::json!({})).send().await?.status(),
        403
    );
    let nobody = pki.https_client(None)?.get(format!("{admin}/subscriptions")).send().await?;
    assert_eq!(nobody.status(), 401);

    // `check` warns weeks before the agent's certificate expires, and fails once it has.
    let check = |cert: &str| -> anyhow::Result<(Option<i32>, String)> {
        let own = format!("agent-{}", d.source_id);
        let path = d.dir.join(format!("check-{cert}.toml"));
        std::fs::write(&path, d.agent_config().replace(&own, cert))?;
        let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-agent")?)
            .args(["check", "--config", &path.to_string_lossy()])
            .output()?;
        Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    pki.agent_for_days("soon", &d.source_id, 10)?;
    let (code, out) = check("soon")?;
    assert_eq!(code, Some(0), "a certificate that still works passes: {out}");
    assert!(
        out.contains("WARNING") && (out.contains("expires in 9 days") || out.contains("expires in 10 days")),
        "{out}"
    );
    let (code, out) = check("expired")?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM") && out.contains("expired on"), "{out}");

    // Nothing the refused peers did was applied; the agent's changes were, each once.
    d.wait_applied(301, Duration::from_secs(30)).await?;
    let log = d.hub.as_ref().expect("hub").log_text();
    assert!(log.contains("agent credential refused"), "{log}");
    Ok(())
}
