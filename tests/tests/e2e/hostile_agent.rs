//! A hostile agent holding one valid token, speaking the `Ingest` contract directly: type, table
//! and column names made to break out of SQL change nothing outside its own NDC schema, names the
//! NDC cannot keep apart are quarantined with the reason, and `a.x` and `b.x` land in two tables.

use dongbo_tests::citizens::CITIZENS_DDL;
use dongbo_tests::hostile::{insert, message, schema, send};
use dongbo_tests::{Deployment, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_type_table_and_column_names_never_become_sql() -> anyhow::Result<()> {
    let mut d = Deployment::new("hostile", CITIZENS_DDL, &["public.citizens"]).await?;
    d.start_hub().await?;
    let ndc = d.ndc().await?;
    // What the attack aims at: another agent's position, the audit head, the NDC's schemas.
    ndc.batch_execute("INSERT INTO dongbo.applied_position (source_id, applied_seq) VALUES ('da-nang-health', 777)")
        .await?;
    let schemas = "SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace WHERE nspname NOT LIKE 'pg_%'";
    let schemas_before: String = ndc.query_one(schemas, &[]).await?.get(0);

    let evil_types = schema(
        "public",
        "evil",
        &[
            ("id", "text"),
            ("n", "integer); CREATE TABLE public.pwned (x int); --"),
            ("t", "text DEFAULT (pg_sleep(10))"),
            ("d", "$$; DELETE FROM dongbo.applied_position; $$"),
            ("c", "int4 /* */; UPDATE dongbo.applied_position SET applied_seq = 0"),
        ],
    );
    let evil_names = schema(
        "public",
        "x\"; DROP SCHEMA dongbo CASCADE; --",
        &[("id", "text"), ("v\"; UPDATE dongbo.applied_position SET applied_seq = 0; --", "text")],
    );
    let ax = schema("a", "x", &[("id", "text"), ("v", "text")]);
    let bx = schema("b", "x", &[("id", "text"), ("v", "text")]);
    let long = schema("public", &"t".repeat(64), &[("id", "text")]);
    let nul = schema("public", "nul", &[("id", "text"), ("a\0b", "text")]);
    let dotted = schema("s.t", "x", &[("id", "text")]);
    // The national table's name: a peer names source tables only; what is national is the hub's
    // configuration's to say, never the wire's.
    let national = schema("national", "citizens", &[("citizen_id", "text"), ("full_name", "text")]);
    let id = d.source_id.clone();
    let batches = vec![
        message(&id, vec![insert(1, &evil_types, &["1", "5", "x", "y", "7"])]),
        message(&id, vec![insert(2, &evil_names, &["1", "v"])]),
        message(&id, vec![insert(3, &ax, &["k", "from a"]), insert(4, &bx, &["k", "from b"])]),
        message(&id, vec![insert(5, &long, &["1"]), insert(6, &nul, &["1", "2"]), insert(7, &dotted, &["1"])]),
        message(&id, vec![insert(8, &national, &["079090000001", "Kẻ Mạo Danh"])]),
    ];
    assert_eq!(send(d.hub_port, TOKEN, &id, batches, 8).await?, 8);

    // Nothing outside the agent's own schema moved.
    let other: i64 = ndc
        .query_one("SELECT applied_seq FROM dongbo.applied_position WHERE source_id = 'da-nang-health'", &[])
        .await?
        .get(0);
    assert_eq!(other, 777, "another agent's position is untouched");
    let pwned: bool = ndc.query_one("SELECT to_regclass('public.pwned') IS NULL", &[]).await?.get(0);
    assert!(pwned, "no statement smuggled in a type name ran");
    let schemas_after: String = ndc.query_one(schemas, &[]).await?.get(0);
    let mut want: std::collections::BTreeSet<&str> = schemas_before.split(',').collect();
    want.insert("hcm_population");
    assert_eq!(
        schemas_after.split(',').collect::<std::collections::BTreeSet<_>>(),
        want,
        "only the agent's schema is new"
    );

    // Hostile types landed as text, their source names kept as data.
    let types: Vec<(String, String)> = ndc
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'hcm_population' AND table_name = 'evil' ORDER BY ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(types.iter().all(|(_, t)| t == "text"), "{types:?}");
    assert_eq!(types.len(), 5);
    let kept: String = ndc
        .query_one(
            "SELECT source_type FROM dongbo.source_columns WHERE ndc_schema = 'hcm_population' AND ndc_table = 'evil' AND column_name = 'n'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(kept, "integer); CREATE TABLE public.pwned (x int); --");
    let row: String = ndc.query_one("SELECT n || '|' || c FROM hcm_population.evil", &[]).await?.get(0);
    assert_eq!(row, "5|7");
    // Hostile identifiers are names, quoted, not code.
    let v: String = ndc
        .query_one(
            "SELECT \"v\"\"; UPDATE dongbo.applied_position SET applied_seq = 0; --\" FROM hcm_population.\"x\"\"; DROP SCHEMA dongbo CASCADE; --\"",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(v, "v");

    // a.x and b.x of one agent are two NDC tables.
    let a: String = ndc.query_one("SELECT v FROM hcm_population.\"a.x\" WHERE id = 'k'", &[]).await?.get(0);
    let b: String = ndc.query_one("SELECT v FROM hcm_population.\"b.x\" WHERE id = 'k'", &[]).await?.get(0);
    assert_eq!((a.as_str(), b.as_str()), ("from a", "from b"));

    // Names the NDC cannot keep apart are quarantined with the reason, not dropped.
    let q: Vec<(i64, String)> = ndc
        .query("SELECT seq, reason FROM dongbo.quarantine ORDER BY seq", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(q.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5, 6, 7], "{q:?}");
    assert!(q[0].1.contains("would truncate"), "{q:?}");
    assert!(q[1].1.contains("NUL"), "{q:?}");
    assert!(q[2].1.contains("contains a '.'"), "{q:?}");
    // "national.citizens" from the wire is one more table of the agent's own schema.
    let name: String = ndc
        .query_one("SELECT full_name FROM hcm_population.\"national.citizens\" WHERE citizen_id = '079090000001'", &[])
        .await?
        .get(0);
    assert_eq!(name, "Kẻ Mạo Danh");
    let national_exists: bool = ndc.query_one("SELECT to_regclass('national.citizens') IS NOT NULL", &[]).await?.get(0);
    assert!(!national_exists, "the wire cannot create or write a national table");
    assert_eq!(d.applied().await?, (8, 5, 3), "5 applied, 3 quarantined, each once");
    Ok(())
}
