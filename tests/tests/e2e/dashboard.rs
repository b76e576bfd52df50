//! The dashboard in a real headless Chromium (WebDriver): login, the fleet with its agent green,
//! the agent red once stopped, a dead letter replayed from the page, the audit page, quarantined
//! changes replayed and dropped from the page; screenshots
//! are saved in `target/screenshots/`.

use std::time::{Duration, Instant};

use dongbo_tests::browser::Browser;
use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{start_with_failing_webhook, wait_dead_letters, ADMIN_TOKEN};
use dongbo_tests::hostile::{insert, message, schema, send};
use dongbo_tests::Deployment;

/// Where the screenshots go, kept after the test for a person to look at.
fn screenshots() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Reloads `url` until the attribute `name` of `css` is `want`.
async fn wait_attribute(b: &Browser, url: &str, css: &str, name: &str, want: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        b.goto(url).await?;
        let got = b.attribute(css, name).await.ok().flatten();
        if got.as_deref() == Some(want) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{css} {name} is {got:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_shows_the_fleet_a_stopped_agent_red_and_replays_a_dead_letter() -> anyhow::Result<()>
{
    let mut d = Deployment::new("dashboard", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let ids = insert_citizens(&src, &mut CitizenGen::new(31), 50).await?;
    let hook = start_with_failing_webhook(&mut d).await?;
    let (receiver, admin_port) = (hook.receiver, hook.admin_port);
    src.execute(
        "UPDATE citizens SET commune_code = '26734', address = 'Số 9 đường Lê Lợi' WHERE citizen_id = $1",
        &[&ids[0]],
    )
    .await?;
    let letters = wait_dead_letters(admin_port, "bhyt-residence", 1, Duration::from_secs(30)).await?;
    anyhow::ensure!(letters.len() == 1, "{letters:?}");

    let ui = format!("http://127.0.0.1:{admin_port}/ui");
    let b = Browser::start().await?;
    // Without a session the dashboard sends the browser to its login page; a wrong token is refused.
    b.goto(&ui).await?;
    b.wait_url("/ui/login").await?;
    b.type_into("#token", "not-a-token").await?;
    b.click("#login").await?;
    b.wait_text("#problem", |p| !p.is_empty()).await?;
    b.type_into("#token", ADMIN_TOKEN).await?;
    b.click("#login").await?;
    b.wait_url("/ui").await?;

    // The running agent, green, under its province.
    let row = format!("#agent-{}", d.source_id);
    wait_attribute(&b, &ui, &format!("{row} .health"), "data-health", "green").await?;
    let text = b.text(&row).await?;
    anyhow::ensure!(text.contains("up") && text.contains("grpc"), "{text}");
    anyhow::ensure!(b.text("h2.province").await?.contains("79"), "the province heading");
    let shots = screenshots()?;
    b.screenshot(&shots.join("dashboard-fleet-green.png")).await?;
    b.goto(&format!("{ui}/agents/{}", d.source_id)).await?;
    let detail = b.text("main").await?;
    anyhow::ensure!(detail.contains("changes applied") && detail.contains("Recent throughput"), "{detail}");

    // Stopped, the agent turns red.
    d.agent.as_mut().expect("agent").stop();
    wait_attribute(&b, &ui, &format!("{row} .health"), "data-health", "red").await?;
    anyhow::ensure!(b.text(&row).await?.contains("down"));
    b.screenshot(&shots.join("dashboard-fleet-red.png")).await?;

    // The dead letter, replayed from the page once the receiver is back.
    b.goto(&format!("{ui}/subscriptions")).await?;
    anyhow::ensure!(b.text("#sub-bhyt-residence .dead-letters").await? == "1");
    receiver.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    b.click("#replay-bhyt-residence").await?;
    b.wait_text("#note", |n| n.contains("1 delivered, 0 still queued")).await?;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await?;
    anyhow::ensure!(got[0].body["current"]["address"] == "Số 9 đường Lê Lợi", "{:?}", got[0].body);
    anyhow::ensure!(b.text("#sub-bhyt-residence .dead-letters").await? == "0");
    b.screenshot(&shots.join("dashboard-replayed.png")).await?;

    // The audit page: the chain verifies, and the citizen's deliveries are listed.
    b.goto(&format!("{ui}/audit")).await?;
    anyhow::ensure!(b.text("#verify").await?.contains("chain intact"));
    b.type_into("#citizen", &ids[0]).await?;
    b.click("#lookup").await?;
    b.wait_text("main", |a| {
        a.contains("Deliveries of citizen") && a.contains("bhyt") && a.contains("health-insurance")
    })
    .await?;

    // Two changes the NDC cannot hold (a column name with NUL, a table name over 63 bytes), sent
    // as the stopped agent: one replayed from the page (refused again, it still breaks its rule),
    // the other dropped with a reason.
    let (seq, _, quarantined) = d.applied().await?;
    let (first, second) = (seq as u64 + 1, seq as u64 + 2);
    let nul = schema("public", "nul", &[("id", "text"), ("a\0b", "text")]);
    let long = schema("public", &"t".repeat(64), &[("id", "text")]);
    let batch = message(&d.source_id, vec![insert(first, &nul, &["1", "2"]), insert(second, &long, &["1"])]);
    send(d.hub_port, dongbo_tests::TOKEN, &d.source_id, vec![batch], second).await?;
    anyhow::ensure!(d.applied().await?.2 == quarantined + 2, "both quarantined");
    b.goto(&format!("{ui}/quarantine")).await?;
    let waiting = b.text("#quarantine").await?;
    anyhow::ensure!(waiting.contains("public.nul") && waiting.contains("table.unusable"), "{waiting}");
    let (replay_one, drop_two) = (format!("#replay-{}-{first}", d.source_id), format!("{}-{second}", d.source_id));
    b.click(&replay_one).await?;
    b.wait_text("#note", |n| n.contains("0 of 1 replayed, 1 refused again")).await?;
    b.type_into(&format!("#why-{drop_two}"), "a test table, never national data").await?;
    b.click(&format!("#drop-{drop_two}")).await?;
    b.wait_text("#note", |n| n.contains("1 dropped")).await?;
    let entries = b.text("#quarantine-entries").await?;
    anyhow::ensure!(entries.contains("dropped: a test table, never national data"), "{entries}");
    anyhow::ensure!(b.find(&format!("#drop-{drop_two}")).await.is_err(), "a resolved entry has no buttons");
    b.find(&replay_one).await?;
    b.screenshot(&shots.join("dashboard-quarantine.png")).await?;
    let ndc = d.ndc().await?;
    let fates: Vec<(i64, Option<String>)> = ndc
        .query("SELECT seq, resolution FROM dongbo.quarantine WHERE seq >= $1 ORDER BY seq", &[&(first as i64)])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    anyhow::ensure!(fates == vec![(first as i64, None), (second as i64, Some("dropped".into()))], "{fates:?}");
    b.close().await;
    Ok(())
}
