//! The national dictionary end to end: two provinces whose legacy systems know the citizen by other
//! column names, date formats, gender spellings and pre-2025 commune codes feed one
//! `national.citizens`; rows that break a rule are quarantined with it and hold back the later
//! changes of their source row; the same citizen from both provinces is decided by priority; and
//! subscribers see national fields and 2025 codes only.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_subscribers::grpc::Subscription;
use dongbo_tests::fanout::{collect, grpc_subscription, quarantine_cli, ADMIN_TOKEN, BHXH_TOKEN, MOET_TOKEN};
use dongbo_tests::procs::DongboProcess;
use dongbo_tests::{pg, Deployment, TOKEN};
use tokio_postgres::Client;

/// Hồ Chí Minh City's system: keyed by the citizen id, dates as `dd/mm/yyyy` text, `Nam`/`Nữ`,
/// legacy commune codes as text, the neighbourhood (khu phố) as the finer key of a split commune.
const HCM_DDL: &str = "CREATE TABLE nhan_khau (
    so_dinh_danh varchar(12) PRIMARY KEY,
    ho_ten text NOT NULL,
    ngay_sinh varchar(10),
    gioi_tinh varchar(5),
    ma_xa varchar(5),
    khu_pho text,
    ghi_chu text);";

/// Hà Nội's system: native dates, `M`/`F`, legacy commune codes in an integer column (leading
/// zeros lost).
const HN_DDL: &str = "CREATE TABLE cong_dan (
    cccd text PRIMARY KEY,
    hoten text,
    ngaysinh date,
    gioitinh char(1),
    maxa integer);";

const HN_TOKEN: &str = "hn-agent-token";

fn hub_toml(admin_port: u16) -> String {
    format!(
        r#"
[[agents]]
id = "hcm-population"
token = "{TOKEN}"
province = "79"
tables = ["public.nhan_khau"]

[[agents]]
id = "hanoi-population"
token = "{HN_TOKEN}"
province = "01"
tables = ["public.cong_dan"]

[national]
conflict = "priority"
split_default = false

[[national.splits]]
old_commune = "27016"
village = "Khu phố 3"
new_commune = "27019"

[[national.mappings]]
agent = "hcm-population"
source_table = "public.nhan_khau"
table = "citizens"
columns = {{ so_dinh_danh = "citizen_id", ho_ten = "full_name", ngay_sinh = "birth_date", gioi_tinh = "gender", ma_xa = "commune_code", khu_pho = "village" }}
date_format = "dd/mm/yyyy"
commune_codes = "legacy"
priority = 1

[[national.mappings]]
agent = "hanoi-population"
source_table = "public.cong_dan"
table = "citizens"
columns = {{ cccd = "citizen_id", hoten = "full_name", ngaysinh = "birth_date", gioitinh = "gender", maxa = "commune_code" }}
commune_codes = "legacy"
priority = 2

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[[dictionary]]
table = "national.citizens"
citizen_id = "citizen_id"
fields = ["citizen_id", "full_name", "birth_date", "gender", "commune_code", "commune_code_version",
          "province_code", "legacy_commune_code"]

[[events]]
name = "residence.changed"
table = "national.citizens"
watch = ["commune_code"]
carry = ["province_code", "legacy_commune_code"]

[[purposes]]
id = "social-insurance"
description = "Social insurance contributions and benefits (Law on Social Insurance 41/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "previous.commune_code", "current.commune_code", "province_code"]

[[purposes]]
id = "education"
description = "School enrolment by residence (Law on Education 43/2019/QH14)"
[purposes.allows]
"national.citizens" = ["citizen_id", "full_name", "commune_code", "province_code"]

[[subscribers]]
id = "bhxh"
token = "{BHXH_TOKEN}"

[[subscribers]]
id = "moet"
token = "{MOET_TOKEN}"
"#
    ) + &grpc_subscription(
        "bhxh-residence",
        "bhxh",
        "social-insurance",
        &["residence.changed"],
        &["citizen_id", "previous.commune_code", "current.commune_code", "province_code"],
        None,
    ) + &grpc_subscription(
        "moet-citizens",
        "moet",
        "education",
        &["national.citizens"],
        &["citizen_id", "full_name", "commune_code", "province_code"],
        None,
    )
}

/// Starts Hà Nội's agent on database `province_hn` of the same cluster.
fn start_hanoi_agent(d: &Deployment) -> anyhow::Result<DongboProcess> {
    let config = d
        .agent_config()
        .replace("source_id = \"hcm-population\"", "source_id = \"hanoi-population\"")
        .replace("database = \"province\"", "database = \"province_hn\"\nslot = \"dongbo_hn\"")
        .replace("\"public.nhan_khau\"", "\"public.cong_dan\"")
        .replace(&format!("{}", d.dir.join("spool").display()), &format!("{}", d.dir.join("spool-hn").display()))
        .replace(&format!("127.0.0.1:{}", d.status_port), &format!("127.0.0.1:{}", pg::free_port()))
        .replace(&format!("token = \"{TOKEN}\""), &format!("token = \"{HN_TOKEN}\""));
    let path = d.dir.join("agent-hn.toml");
    std::fs::write(&path, config)?;
    DongboProcess::spawn("dongbo-agent", &["run", "--config", &path.to_string_lossy()], &d.dir.join("agent-hn.log"))
}

/// national.citizens as `citizen_id → [fields…]`, text, `-` for NULL.
async fn national(ndc: &Client) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let rows = ndc
        .query(
            "SELECT citizen_id, full_name, birth_date::text, gender, commune_code, commune_code_version, province_code,
                    coalesce(legacy_commune_code, '-'), coalesce(village, '-'), source_agent, coalesce(source_province, '-')
             FROM national.citizens ORDER BY citizen_id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get::<_, String>(0), (1..11).map(|i| r.get::<_, String>(i)).collect())).collect())
}

/// Unresolved quarantine entries as `(source_id, rule, citizen)`, in seq order per source.
async fn quarantined(ndc: &Client) -> anyhow::Result<Vec<(String, String, String)>> {
    let rows = ndc
        .query(
            "SELECT source_id, rule, source_hold, reason FROM dongbo.quarantine WHERE resolved_at IS NULL ORDER BY source_id, seq",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let hold: serde_json::Value = serde_json::from_str(r.get::<_, Option<&str>>(2).unwrap_or("null"))?;
            // The hold is [table, key text]; the key text ends with its separator.
            let key = hold[1].as_str().unwrap_or_default().trim_end_matches('\u{1}').to_string();
            Ok((r.get(0), r.get(1), key))
        })
        .collect()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_provinces_feed_national_citizens_with_rules_remap_priority_and_head_of_line() -> anyhow::Result<()> {
    let mut d = Deployment::new("national", HCM_DDL, &["public.nhan_khau"]).await?;
    d.pg.create_database("province_hn").await?;
    let hn = d.pg.connect_as_role("province_hn").await?;
    hn.batch_execute(HN_DDL).await?;
    let hcm = d.source().await?;
    // "Nguyễn" decomposed, as some legacy input methods stored it.
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES
           ('079090000001', ' Nguye\u{0302}\u{0303}n Văn  An ', '17/05/1990', 'Nam', '26734', NULL, 'ghi chú nội bộ'),
           ('079195000002', 'Trần Thị Bình', '3/2/1995', 'Nữ', '27016', 'Khu phố 3', NULL),
           ('079088000003', 'Lê Văn Cường', '01/01/1988', 'Nam', '27016', 'Khu phố 9', NULL),
           ('003090000004', 'Đỗ Văn Dũng', '04/04/1990', 'Nam', '26740', NULL, NULL),
           ('079085000005', 'Vũ Văn Em', '31/02/1985', 'Nam', '26740', NULL, NULL),
           ('001080000009', 'Phạm Văn Xuân (HCM)', '09/09/1980', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    hn.batch_execute(
        "INSERT INTO cong_dan VALUES
           ('001080000009', 'Phạm Văn Xuân', '1980-09-09', 'M', 6),
           ('001302000006', 'Hoàng Thị Phương', '2002-06-01', 'F', 8);",
    )
    .await?;
    let admin_port = pg::free_port();
    d.start_hub_with(&hub_toml(admin_port)).await?;
    d.start_agent()?;
    let _hanoi = start_hanoi_agent(&d)?;
    let ndc = d.ndc().await?;
    let snapshots = wait_until("both snapshots in national.citizens", Duration::from_secs(90), || async {
        let n = national(&ndc).await.unwrap_or_default();
        let x = n.get("001080000009").map(|r| r[8].as_str() == "hanoi-population").unwrap_or(false);
        Ok(n.len() == 4 && x && quarantined(&ndc).await.map(|q| q.len() == 3).unwrap_or(false))
    })
    .await;
    if let Err(e) = snapshots {
        bail!("{e}: national.citizens {:?}, quarantine {:?}", national(&ndc).await?, quarantined(&ndc).await?);
    }

    // Streamed changes: A moves (Tân Định → Bến Nghé, both legacy codes); D, quarantined, is edited
    // (its change must wait); Hồ Chí Minh City renames X, whom Hà Nội (priority 2) holds; a column
    // outside the dictionary changes.
    let url = format!("http://127.0.0.1:{}", d.hub_port);
    let mut bhxh = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 64).await?;
    let mut moet = Subscription::open(&url, MOET_TOKEN, "moet-citizens", None, 64).await?;
    hcm.batch_execute(
        "UPDATE nhan_khau SET ma_xa = '26740' WHERE so_dinh_danh = '079090000001';
         UPDATE nhan_khau SET ho_ten = 'Đỗ Văn Dũng (sửa)' WHERE so_dinh_danh = '003090000004';
         UPDATE nhan_khau SET ho_ten = 'Phạm Văn Xuân (sửa ở HCM)' WHERE so_dinh_danh = '001080000009';
         UPDATE nhan_khau SET ghi_chu = 'khác' WHERE so_dinh_danh = '079195000002';
         INSERT INTO nhan_khau VALUES ('079199000010', 'Mai Thị Cuối', '10/10/1999', 'F', '26743', NULL, NULL);",
    )
    .await?;
    // The last change applied: everything before it of this source is applied or quarantined.
    wait_until("the streamed changes", Duration::from_secs(60), || async {
        Ok(national(&ndc).await?.contains_key("079199000010"))
    })
    .await?;

    let n = national(&ndc).await?;
    let row = |id: &str| n.get(id).cloned().with_context(|| format!("{id} not in national.citizens: {n:?}"));
    let expect = |fields: &[&str]| fields.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        row("079090000001")?,
        expect(&["Nguyễn Văn An", "1990-05-17", "1", "26740", "2025", "79", "26740", "-", "hcm-population", "79"]),
        "trimmed, NFC, dd/mm/yyyy, Nam → 1, and the move remapped (Bến Nghé 26740 → Sài Gòn 26740)"
    );
    assert_eq!(
        row("079195000002")?,
        expect(&[
            "Trần Thị Bình",
            "1995-02-03",
            "2",
            "27019",
            "2025",
            "79",
            "27016",
            "Khu phố 3",
            "hcm-population",
            "79"
        ]),
        "Sơn Kỳ (27016) was split three ways: its khu phố decides"
    );
    assert_eq!(
        row("001302000006")?,
        expect(&["Hoàng Thị Phương", "2002-06-01", "2", "00008", "2025", "01", "00008", "-", "hanoi-population", "01"]),
        "an integer code lost its zeros (8 → 00008, Liễu Giai → Ngọc Hà)"
    );
    assert_eq!(
        row("001080000009")?,
        expect(&["Phạm Văn Xuân", "1980-09-09", "1", "00008", "2025", "01", "00006", "-", "hanoi-population", "01"]),
        "Hà Nội has the higher priority: Hồ Chí Minh City's version and later edit do not replace it"
    );
    assert_eq!(n.len(), 5, "only valid rows are national: {n:?}");
    // The provenance reads back as written: commit times of this test's minutes (not off by the
    // epoch's 30 years), seqs and priorities as configured, and the three applied changes of the
    // one streamed transaction share its commit time to the microsecond.
    let odd: i64 = ndc
        .query_one(
            "SELECT count(*) FROM national.citizens WHERE source_committed_at NOT BETWEEN now() - interval '15 minutes' AND now()              OR source_seq < 1 OR source_priority NOT IN (1, 2)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(odd, 0, "national rows with a commit time, seq or priority not as their source wrote it");
    let commits: Vec<String> = ndc
        .query(
            "SELECT DISTINCT to_char(source_committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
             FROM national.citizens WHERE citizen_id IN ('079090000001', '079195000002', '079199000010')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(commits.len(), 1, "one source transaction, one commit time: {commits:?}");

    // Every remapped pair is a row of the shipped remap table.
    let remap: HashSet<(String, String)> = include_str!("../../../data/admin-units/commune_remap_2025.csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .map(|f| (f[2].to_string(), f[5].to_string()))
        .collect();
    for (id, r) in &n {
        assert!(remap.contains(&(r[6].clone(), r[3].clone())), "{id}: {} → {} is not in the remap table", r[6], r[3]);
    }

    let q = quarantined(&ndc).await?;
    assert!(q.iter().all(|(source, ..)| source == "hcm-population"), "{q:?}");
    let mut by_rule: Vec<(&str, &str)> = q.iter().map(|(_, rule, key)| (rule.as_str(), key.as_str())).collect();
    by_rule.sort();
    assert_eq!(
        by_rule,
        [
            ("citizen_id.province", "003090000004"),
            ("commune.ambiguous", "079088000003"),
            ("date.format", "079085000005"),
            ("held", "003090000004"),
        ],
        "each refusal names its rule, and D's later edit waits behind it: {q:?}"
    );
    let reason: String =
        ndc.query_one("SELECT reason FROM dongbo.quarantine WHERE rule = 'commune.ambiguous'", &[]).await?.get(0);
    assert!(reason.contains("27013, 27019, 27439") && reason.contains("Khu phố 9"), "{reason}");

    // residence.changed carries 2025 codes: Tân Định (26734 → 26737) to Bến Nghé (26740 → 26740).
    let got = collect(&mut bhxh, 1, Duration::from_secs(30)).await?;
    let ev = &got[0].body;
    assert_eq!(ev["citizen_id"], "079090000001");
    assert_eq!(ev["previous"]["commune_code"], "26737");
    assert_eq!(ev["current"]["commune_code"], "26740");
    assert_eq!(ev["province_code"], "79");

    // Table followers get national rows with national fields, never a source column, and never
    // the edit the conflict rule set aside; the marker comes last.
    let mut rows = Vec::new();
    while !rows.iter().any(|r: &dongbo_subscribers::Received| r.body["citizen_id"] == "079199000010") {
        rows.extend(collect(&mut moet, 1, Duration::from_secs(30)).await?);
    }
    let allowed = ["event_id", "table", "op", "citizen_id", "full_name", "commune_code", "province_code"];
    for r in &rows {
        let keys: Vec<&String> = r.body.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert!(keys.iter().all(|k| allowed.contains(&k.as_str())), "{keys:?}");
        assert_eq!(r.body["table"], "national.citizens", "{:?}", r.body);
        assert_ne!(r.body["full_name"], "Phạm Văn Xuân (sửa ở HCM)", "a superseded change was published");
        assert_ne!(r.body["op"], "truncate", "one agent's truncate is not the national table's");
    }
    let a = rows.iter().rev().find(|r| r.body["citizen_id"] == "079090000001").context("no row of A")?;
    assert_eq!((a.body["commune_code"].as_str(), a.body["province_code"].as_str()), (Some("26740"), Some("79")));
    Ok(())
}

/// The HCM agent's unresolved quarantine seqs of `citizen`, in order.
async fn waiting_seqs(ndc: &Client, citizen: &str) -> anyhow::Result<Vec<i64>> {
    let rows = ndc
        .query(
            "SELECT seq FROM dongbo.quarantine WHERE resolved_at IS NULL AND source_id = 'hcm-population' \
             AND source_hold::jsonb->>1 LIKE $1 || '%' ORDER BY seq",
            &[&citizen],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Like [`quarantine_cli`], failing unless the command succeeded.
fn quarantine_ok(admin_port: u16, args: &[&str]) -> anyhow::Result<String> {
    let (ok, text) = quarantine_cli(admin_port, args)?;
    if !ok {
        bail!("dongbo-hub quarantine {args:?} failed:\n{text}");
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_replay_after_a_fix_applies_in_order_once_even_when_the_hub_is_killed() -> anyhow::Result<()> {
    let mut d = Deployment::new("national-replay", HCM_DDL, &["public.nhan_khau"]).await?;
    let hcm = d.source().await?;
    // G and J live in Sơn Kỳ (27016, split three ways) in a khu phố no rule names yet; H's birth
    // date does not exist.
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES
           ('079090000021', 'Ngô Văn Khoa', '12/12/1990', 'Nam', '26734', NULL, NULL),
           ('079088000022', 'Lê Văn Giàu', '01/01/1988', 'Nam', '27016', 'Khu phố 9', NULL),
           ('079087000023', 'Đinh Văn Giang', '02/02/1987', 'Nam', '27016', 'Khu phố 9', NULL),
           ('079085000024', 'Vũ Văn Hải', '31/02/1985', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    let admin_port = pg::free_port();
    let config = hub_toml(admin_port);
    d.start_hub_with(&config).await?;
    d.start_agent()?;
    let ndc = d.ndc().await?;
    wait_until("the snapshot", Duration::from_secs(90), || async {
        // Before its first row the national table does not exist.
        let n = national(&ndc).await.unwrap_or_default();
        Ok(n.contains_key("079090000021") && quarantined(&ndc).await.unwrap_or_default().len() == 3)
    })
    .await?;
    // Later changes of G, J and H wait behind their first; H is corrected at the source.
    hcm.batch_execute(
        "UPDATE nhan_khau SET ho_ten = 'Lê Văn Giàu (sửa)' WHERE so_dinh_danh = '079088000022';
         UPDATE nhan_khau SET ma_xa = '26734', khu_pho = NULL WHERE so_dinh_danh = '079088000022';
         UPDATE nhan_khau SET ma_xa = '26734', khu_pho = NULL WHERE so_dinh_danh = '079087000023';
         UPDATE nhan_khau SET ngay_sinh = '28/02/1985' WHERE so_dinh_danh = '079085000024';
         INSERT INTO nhan_khau VALUES ('079099000025', 'Mai Văn Mốc', '05/05/1999', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    wait_until("the streamed changes", Duration::from_secs(60), || async {
        Ok(national(&ndc).await?.contains_key("079099000025"))
    })
    .await?;
    let (g, j, h) = (
        waiting_seqs(&ndc, "079088000022").await?,
        waiting_seqs(&ndc, "079087000023").await?,
        waiting_seqs(&ndc, "079085000024").await?,
    );
    assert_eq!((g.len(), j.len(), h.len()), (3, 2, 2), "{:?}", quarantined(&ndc).await?);

    // An operator lists and reads them.
    let listed = quarantine_ok(admin_port, &["list", "--agent", "hcm-population"])?;
    assert!(listed.contains("7 entries"), "{listed}");
    assert!(quarantine_ok(admin_port, &["list", "--rule", "held"])?.contains("4 entries"));
    let shown = quarantine_ok(admin_port, &["show", "hcm-population", &h[0].to_string()])?;
    assert!(shown.contains("\"ngay_sinh\": \"31/02/1985\"") && shown.contains("date.format"), "{shown}");

    // H's correction cannot pass its quarantined insert; dropped with a reason, the correction
    // replays. G's and J's changes still wait behind theirs, and G's first is refused again.
    let out = quarantine_ok(admin_port, &["replay", "--agent", "hcm-population", "--seq", &h[1].to_string()])?;
    assert!(out.contains(&format!("behind seq {}", h[0])) && out.contains("0 of 1 replayed"), "{out}");
    let (ok, out) = quarantine_cli(admin_port, &["replay"])?;
    assert!(!ok && out.contains("or `all`"), "a replay needs a filter: {out}");
    let why = "impossible date; corrected at the source";
    let out =
        quarantine_ok(admin_port, &["drop", "--agent", "hcm-population", "--seq", &h[0].to_string(), "--why", why])?;
    assert!(out.contains("1 dropped"), "{out}");
    let out = quarantine_ok(admin_port, &["replay", "--agent", "hcm-population", "--rule", "held"])?;
    assert!(out.contains("1 of 4 replayed"), "{out}");
    let g_args: Vec<String> = g.iter().flat_map(|s| ["--seq".to_string(), s.to_string()]).collect();
    let mut args = vec!["replay", "--agent", "hcm-population"];
    args.extend(g_args.iter().map(String::as_str));
    let out = quarantine_ok(admin_port, &args)?;
    assert!(out.contains("commune.ambiguous") && out.contains("0 of 3 replayed"), "{out}");
    let n = national(&ndc).await?;
    assert_eq!(n["079085000024"][1], "1985-02-28", "H as corrected: {n:?}");
    assert!(!n.contains_key("079088000022"));

    // The rule is fixed in hub.toml and reloaded without a restart: a split commune no rule decides
    // goes to the remap table's default target (Sơn Kỳ → Tây Thạnh, 27013).
    let fix = |toml: &str| toml.replacen("split_default = false", "split_default = true", 1);
    let hub_toml_path = d.dir.join("hub.toml");
    std::fs::write(&hub_toml_path, fix(&std::fs::read_to_string(&hub_toml_path)?))?;
    let fixed_config = fix(&config);
    let hub = d.hub.as_mut().context("hub")?;
    std::process::Command::new("kill").args(["-HUP", &hub.pid().context("hub pid")?.to_string()]).status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub.log_text().contains("national dictionary reloaded") {
        if Instant::now() > deadline {
            bail!("the hub did not reload its dictionary:\n{}", hub.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = quarantine_ok(admin_port, &args)?;
    assert!(out.contains("3 of 3 replayed"), "{out}");
    let n = national(&ndc).await?;
    assert_eq!(
        (n["079088000022"][0].as_str(), n["079088000022"][3].as_str(), n["079088000022"][6].as_str()),
        ("Lê Văn Giàu (sửa)", "26737", "26734"),
        "G's three changes applied in order: {n:?}"
    );

    // J's replay: the hub dies after the NDC commit, before its fan-out log holds it.
    d.hub.as_mut().context("hub")?.kill9();
    d.hub_env = vec![("DONGBO_FAULT".into(), "hub-replay-applied-not-logged".into())];
    d.start_hub_with(&fixed_config).await?;
    let (ok, out) = quarantine_cli(admin_port, &["replay", "--agent", "hcm-population"])?;
    assert!(!ok, "the hub was to die inside the replay: {out}");
    let status = d.hub.as_mut().context("hub")?.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "the fault point did not fire: {out}");
    let resolved: i64 = ndc
        .query_one("SELECT count(DISTINCT replay_id) FROM dongbo.quarantine WHERE seq = ANY($1)", &[&j])
        .await?
        .get(0);
    assert_eq!(resolved, 1, "J's replay committed in one transaction");
    let logged = |d: &Deployment| d.hub.as_ref().map_or(0, |h| h.log_text().matches("replayed changes logged").count());
    let logged_before = logged(&d);
    d.hub_env.clear();
    d.start_hub_with(&fixed_config).await?;
    assert_eq!(logged(&d), logged_before + 1, "the restarted hub logs the replay the killed one committed");
    let out = quarantine_ok(admin_port, &["replay", "--agent", "hcm-population"])?;
    assert!(out.contains("0 of 0 replayed"), "nothing is left to replay, so nothing twice: {out}");
    assert!(quarantine_ok(admin_port, &["list"])?.contains("0 entries"));
    let unlogged: i64 =
        ndc.query_one("SELECT count(*) FROM dongbo.quarantine_replay WHERE NOT logged", &[]).await?.get(0);
    assert_eq!(unlogged, 0);
    let n = national(&ndc).await?;
    assert_eq!(n["079087000023"][3], "26737", "J moved: {n:?}");

    // Subscribers see each replayed change once, in order, before what came after.
    hcm.batch_execute("UPDATE nhan_khau SET ma_xa = '26740' WHERE so_dinh_danh = '079090000021'").await?;
    let url = format!("http://127.0.0.1:{}", d.hub_port);
    let mut bhxh = Subscription::open(&url, BHXH_TOKEN, "bhxh-residence", None, 64).await?;
    let events = collect(&mut bhxh, 3, Duration::from_secs(30)).await?;
    let moves: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (s(&e.body["citizen_id"]), s(&e.body["previous"]["commune_code"]), s(&e.body["current"]["commune_code"]))
        })
        .collect();
    let mv = |c: &str, a: &str, b: &str| (c.to_string(), a.to_string(), b.to_string());
    assert_eq!(
        moves,
        [
            mv("079088000022", "27013", "26737"),
            mv("079087000023", "27013", "26737"),
            mv("079090000021", "26737", "26740")
        ]
    );
    let mut moet = Subscription::open(&url, MOET_TOKEN, "moet-citizens", None, 64).await?;
    let mut rows = Vec::new();
    while !rows.iter().any(|r: &dongbo_subscribers::Received| {
        r.body["citizen_id"] == "079090000021" && r.body["commune_code"] == "26740"
    }) {
        rows.extend(collect(&mut moet, 1, Duration::from_secs(30)).await?);
    }
    let of = |c: &str| {
        rows.iter().filter(|r| r.body["citizen_id"] == c).map(|r| r.body["full_name"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(of("079087000023").len(), 2, "J's insert and move, once each: {rows:?}");
    assert_eq!(of("079088000022"), ["Lê Văn Giàu", "Lê Văn Giàu (sửa)", "Lê Văn Giàu (sửa)"], "{rows:?}");
    assert_eq!(of("079085000024").len(), 1, "H's correction only: its insert was dropped");
    let dropped: (String, String, String) = {
        let r = ndc
            .query_one(
                "SELECT resolution, resolved_by, resolution_note FROM dongbo.quarantine WHERE seq = $1 AND source_id = 'hcm-population'",
                &[&h[0]],
            )
            .await?;
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(dropped, ("dropped".to_string(), "admin".to_string(), why.to_string()));
    Ok(())
}

/// A deployment `name` whose Hà Nội database (`province_hn`) holds citizen X, with clients of
/// both provinces' databases (Hà Nội's, Hồ Chí Minh City's).
async fn hanoi_holds_x(name: &str) -> anyhow::Result<(Deployment, Client, Client)> {
    let d = Deployment::new(name, HCM_DDL, &["public.nhan_khau"]).await?;
    d.pg.create_database("province_hn").await?;
    let hn = d.pg.connect_as_role("province_hn").await?;
    hn.batch_execute(HN_DDL).await?;
    hn.batch_execute("INSERT INTO cong_dan VALUES ('001080000009', 'Phạm Văn Xuân', '1980-09-09', 'M', 6)").await?;
    let hcm = d.source().await?;
    Ok((d, hn, hcm))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_citizen_from_two_provinces_is_quarantined_with_both_versions_and_a_replay_lets_it_win(
) -> anyhow::Result<()> {
    let (mut d, hn, hcm) = hanoi_holds_x("national-conflict").await?;
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES ('001080000009', 'Phạm Văn Xuân (HCM)', '09/09/1980', 'Nam', '26740', NULL, NULL),
                                      ('079090000031', 'Trịnh Văn Yên', '01/03/1990', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    let admin_port = pg::free_port();
    d.start_hub_with(&hub_toml(admin_port).replacen("conflict = \"priority\"", "conflict = \"quarantine\"", 1)).await?;
    let ndc = d.ndc().await?;
    let _hanoi = start_hanoi_agent(&d)?;
    wait_until("Hà Nội's citizen", Duration::from_secs(60), || async {
        Ok(national(&ndc).await.unwrap_or_default().contains_key("001080000009"))
    })
    .await?;
    d.start_agent()?;
    wait_until("Hồ Chí Minh City's snapshot", Duration::from_secs(60), || async {
        Ok(national(&ndc).await?.contains_key("079090000031"))
    })
    .await?;
    hcm.batch_execute(
        "UPDATE nhan_khau SET ho_ten = 'Phạm Văn Xuân (sửa ở HCM)' WHERE so_dinh_danh = '001080000009';
         INSERT INTO nhan_khau VALUES ('079090000032', 'Trịnh Văn Zung', '01/04/1990', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    wait_until("Hồ Chí Minh City's rows", Duration::from_secs(60), || async {
        Ok(national(&ndc).await.unwrap_or_default().contains_key("079090000032"))
    })
    .await?;
    let q = quarantined(&ndc).await?;
    let hcm_population = "hcm-population".to_string();
    assert_eq!(
        q,
        [
            (hcm_population.clone(), "conflict".to_string(), "001080000009".to_string()),
            (hcm_population.clone(), "held".to_string(), "001080000009".to_string())
        ]
    );
    assert_eq!(national(&ndc).await?["001080000009"][8], "hanoi-population", "the holder keeps its row meanwhile");

    // Both versions are there for the operator: the change as sent, the NDC's row in detail.
    let seq: i64 = ndc.query_one("SELECT min(seq) FROM dongbo.quarantine WHERE rule = 'conflict'", &[]).await?.get(0);
    let shown: serde_json::Value =
        serde_json::from_str(&quarantine_ok(admin_port, &["show", "hcm-population", &seq.to_string()])?)?;
    assert_eq!(shown["change"]["after"]["ho_ten"], "Phạm Văn Xuân (HCM)", "{shown}");
    assert_eq!(shown["detail"]["source_agent"], "hanoi-population", "{shown}");
    assert_eq!(shown["detail"]["full_name"], "Phạm Văn Xuân", "{shown}");

    // The operator lets Hồ Chí Minh City's version win: both its changes apply, in order.
    let out = quarantine_ok(admin_port, &["replay", "--agent", "hcm-population"])?;
    assert!(out.contains("2 of 2 replayed"), "{out}");
    let x = national(&ndc).await?["001080000009"].clone();
    assert_eq!((x[0].as_str(), x[8].as_str()), ("Phạm Văn Xuân (sửa ở HCM)", "hcm-population"));
    // Now Hà Nội's edit meets a row Hồ Chí Minh City holds.
    hn.batch_execute("UPDATE cong_dan SET hoten = 'Phạm Văn Xuân (sửa ở HN)' WHERE cccd = '001080000009'").await?;
    wait_until("Hà Nội's edit quarantined", Duration::from_secs(60), || async {
        Ok(quarantined(&ndc).await?.iter().any(|(s, rule, _)| s == "hanoi-population" && rule == "conflict"))
    })
    .await?;
    assert_eq!(national(&ndc).await?["001080000009"][0], "Phạm Văn Xuân (sửa ở HCM)");
    Ok(())
}

/// Starts the hub with `config` and Hà Nội's agent, waits for Hà Nội's citizen, then starts Hồ Chí
/// Minh City's agent; the NDC's connection and Hà Nội's agent.
async fn start_hanoi_then_hcm(d: &mut Deployment, config: &str) -> anyhow::Result<(Client, DongboProcess)> {
    d.start_hub_with(config).await?;
    let ndc = d.ndc().await?;
    let hanoi = start_hanoi_agent(d)?;
    wait_until("Hà Nội's citizen", Duration::from_secs(60), || async {
        Ok(national(&ndc).await.unwrap_or_default().contains_key("001080000009"))
    })
    .await?;
    d.start_agent()?;
    Ok((ndc, hanoi))
}

/// Kills the hub, starts it again to die (fault point) right after the NDC commit of the next run,
/// which `sql` at Hồ Chí Minh City's source makes, and before its fan-out log append; the hub is
/// left down, without the fault.
async fn die_after_applying(d: &mut Deployment, config: &str, hcm: &Client, sql: &str) -> anyhow::Result<()> {
    d.hub.as_mut().context("hub")?.kill9();
    d.hub_env = vec![("DONGBO_FAULT".into(), "hub-applied-not-logged".into())];
    d.start_hub_with(config).await?;
    hcm.batch_execute(sql).await?;
    let status = d.hub.as_mut().context("hub")?.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "the fault point did not fire");
    d.hub_env.clear();
    Ok(())
}

/// What education's table follower receives from the start until a row of `citizen` arrives.
async fn followed_until(d: &Deployment, citizen: &str) -> anyhow::Result<Vec<dongbo_subscribers::Received>> {
    let url = format!("http://127.0.0.1:{}", d.hub_port);
    let mut moet = Subscription::open(&url, MOET_TOKEN, "moet-citizens", None, 64).await?;
    let mut rows = Vec::new();
    while !rows.iter().any(|r: &dongbo_subscribers::Received| r.body["citizen_id"] == citizen) {
        rows.extend(collect(&mut moet, 1, Duration::from_secs(30)).await?);
    }
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_conflict_rule_kept_out_stays_unpublished_when_the_hub_dies_before_logging_it(
) -> anyhow::Result<()> {
    let (mut d, _hn, hcm) = hanoi_holds_x("national-unpublished").await?;
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES ('001080000009', 'Phạm Văn Xuân (HCM)', '09/09/1980', 'Nam', '26740', NULL, NULL)",
    )
    .await?;
    let config = hub_toml(pg::free_port());
    let (ndc, _hanoi) = start_hanoi_then_hcm(&mut d, &config).await?;
    let hcm_applied = || async {
        let r = ndc
            .query_opt("SELECT changes_applied FROM dongbo.applied_position WHERE source_id = 'hcm-population'", &[])
            .await?;
        Ok::<i64, anyhow::Error>(r.map_or(0, |r| r.get(0)))
    };
    wait_until("Hồ Chí Minh City's snapshot", Duration::from_secs(60), || async { Ok(hcm_applied().await? >= 2) })
        .await?;

    // The hub dies after the NDC applied Hồ Chí Minh City's edit (which Hà Nội's priority keeps
    // out) and before its fan-out log holds it; the agent sends it again to the next hub.
    let before = hcm_applied().await?;
    let edit = "UPDATE nhan_khau SET ho_ten = 'Phạm Văn Xuân (sửa ở HCM)' WHERE so_dinh_danh = '001080000009'";
    die_after_applying(&mut d, &config, &hcm, edit).await?;
    assert_eq!(hcm_applied().await?, before + 1, "the edit was applied (in effect) before the hub died");
    d.start_hub_with(&config).await?;
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES ('079090000041', 'Lý Văn Cuối', '01/05/1990', 'Nam', '26740', NULL, NULL)",
    )
    .await?;
    let rows = followed_until(&d, "079090000041").await?;
    let names: Vec<&str> = rows
        .iter()
        .filter(|r| r.body["citizen_id"] == "001080000009")
        .filter_map(|r| r.body["full_name"].as_str())
        .collect();
    assert_eq!(names, ["Phạm Văn Xuân"], "only the version the NDC holds is published: {rows:?}");
    assert_eq!(national(&ndc).await?["001080000009"][0], "Phạm Văn Xuân");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_national_truncate_reaches_followers_as_a_delete_of_each_row_it_removed_even_when_the_hub_dies_before_logging_it(
) -> anyhow::Result<()> {
    let (mut d, _hn, hcm) = hanoi_holds_x("national-truncate").await?;
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES ('079090000051', 'Hồ Văn Một', '01/03/1990', 'Nam', '26740', NULL, NULL),
                                      ('079090000052', 'Hồ Văn Hai', '01/04/1990', 'Nam', '26740', NULL, NULL);",
    )
    .await?;
    let config = hub_toml(pg::free_port());
    let (ndc, _hanoi) = start_hanoi_then_hcm(&mut d, &config).await?;
    wait_until("Hồ Chí Minh City's snapshot", Duration::from_secs(60), || async {
        Ok(national(&ndc).await?.contains_key("079090000052"))
    })
    .await?;

    // The province empties its table; the hub dies after the NDC removed that province's rows and
    // before its fan-out log holds the truncate, so the next hub logs it from what the NDC kept.
    die_after_applying(&mut d, &config, &hcm, "TRUNCATE nhan_khau").await?;
    let left: Vec<String> = national(&ndc).await?.into_keys().collect();
    assert_eq!(left, ["001080000009"], "only Hồ Chí Minh City's rows went, before the hub died");
    d.start_hub_with(&config).await?;
    hcm.batch_execute(
        "INSERT INTO nhan_khau VALUES ('079090000053', 'Hồ Văn Ba', '01/05/1990', 'Nam', '26740', NULL, NULL)",
    )
    .await?;

    let rows = followed_until(&d, "079090000053").await?;
    let deletes: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.body["op"] == "delete")
        .map(|r| (r.body["citizen_id"].as_str().unwrap_or("?"), r.event_id.as_str()))
        .collect();
    assert_eq!(
        deletes.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ["079090000051", "079090000052"],
        "one delete per row the truncate removed, once, and none of Hà Nội's: {rows:?}"
    );
    let ids: HashSet<&str> = deletes.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 2, "each delete has its own event id: {deletes:?}");
    assert!(deletes.iter().all(|(_, id)| id.starts_with("hcm-population:")), "{deletes:?}");
    assert!(!rows.iter().any(|r| r.body["op"] == "truncate"), "no bare truncate of the whole table: {rows:?}");
    let held: Vec<String> = national(&ndc).await?.into_keys().collect();
    assert_eq!(held, ["001080000009", "079090000053"]);
    Ok(())
}
