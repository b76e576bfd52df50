//! Prerequisites of the Postgres source, checked in plain words for `dongbo-agent check` and at start.

use tokio_postgres::Client;

pub use crate::check::{CheckItem, CheckReport};
use crate::error::SourceError;
use crate::postgres::catalog;
use crate::postgres::config::PostgresConfig;
use crate::postgres::snapshot::quote_ident;

/// Checks wal_level, the role's rights, the tables and the publication. Touches nothing.
pub async fn run(client: &Client, config: &PostgresConfig) -> Result<CheckReport, SourceError> {
    let mut r = CheckReport::default();
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level == "logical" {
        r.ok("wal_level is logical");
    } else {
        r.problem(
            "wal_level",
            format!("is {wal_level}; set wal_level = logical in postgresql.conf and restart the server"),
        );
    }
    let row =
        client.query_one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await?;
    if row.get::<_, bool>(0) {
        r.ok(format!("role {} may replicate", config.user));
    } else {
        r.problem(
            format!("role {}", config.user),
            format!("lacks the REPLICATION attribute; run ALTER ROLE {} WITH REPLICATION", quote_ident(&config.user)),
        );
    }
    let slots = client
        .query_one(
            "SELECT (current_setting('max_replication_slots')::int - count(*) FILTER (WHERE slot_name <> $1))::int4, \
             coalesce(bool_or(slot_name = $1), false) FROM pg_replication_slots",
            &[&config.slot],
        )
        .await?;
    let free: i32 = slots.try_get(0)?;
    let exists: bool = slots.try_get(1)?;
    if exists || free > 0 {
        r.ok(format!("replication slot {} exists or can be created", config.slot));
    } else {
        r.problem("replication slots", "none free; raise max_replication_slots or drop an unused slot");
    }
    // Snapshotting a table added later (or marked by resnapshot) takes a temporary slot for a moment.
    let spare = if exists { free } else { free - 1 };
    if (exists || free > 0) && spare < 1 {
        r.warn(
            "replication slots",
            "none left beside this agent's: a table added to source.tables later needs one more for a moment \
             (the agent retries until there is); raise max_replication_slots by one",
        );
    }
    // An online snapshot also opens a second replication connection, beside the stream's.
    let senders = client
        .query_one(
            "SELECT current_setting('max_wal_senders')::int4 - (SELECT count(*)::int4 FROM pg_stat_replication)",
            &[],
        )
        .await?;
    let free_senders: i32 = senders.try_get(0)?;
    if free_senders < 2 {
        r.warn(
            "max_wal_senders",
            format!(
                "{free_senders} free: the agent streams over one replication connection and snapshots a table added \
                 later over a second; raise max_wal_senders (restart) so both fit"
            ),
        );
    }
    for table in config.table_ids() {
        match catalog::find_table(client, &table).await {
            Ok(None) => r.problem(format!("table {table}"), "does not exist; fix source.tables or create it"),
            Err(SourceError::Prerequisite(p)) => r.problem(format!("table {table}"), p),
            Err(e) => return Err(e),
            Ok(Some(found)) => {
                let can_read: bool =
                    client.query_one("SELECT has_table_privilege($1::oid, 'SELECT')", &[&found.oid]).await?.get(0);
                if !can_read {
                    r.problem(
                        format!("table {table}"),
                        format!("role {} cannot SELECT from it; GRANT SELECT ON {table} TO it", config.user),
                    );
                } else if found.replica_identity == 'n' {
                    r.problem(
                        format!("table {table}"),
                        format!("has REPLICA IDENTITY NOTHING; run ALTER TABLE {table} REPLICA IDENTITY DEFAULT"),
                    );
                } else if found.schema.is_keyless() {
                    r.ok(format!(
                        "table {table} has no primary key: kept as a multiset (REPLICA IDENTITY FULL), an update \
                         or delete changes one of the rows equal to its old row; it is readable"
                    ));
                } else {
                    r.ok(format!("table {table} has a primary key and is readable"));
                }
            }
        }
    }
    publication(client, config, &mut r).await?;
    Ok(r)
}

/// The publication as `run` will need it: present with every table, or creatable by this role
/// (CREATE on the database and ownership of each table; to add tables, ownership of the
/// publication too). Otherwise the statement to run, and who may run it.
async fn publication(client: &Client, config: &PostgresConfig, r: &mut CheckReport) -> Result<(), SourceError> {
    let name = &config.publication;
    let what = format!("publication {name}");
    let qualified = |t: &str| {
        crate::model::TableId::parse(t)
            .map_or_else(|| t.to_string(), |t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
    };
    let missing = missing_from_publication(client, config).await?;
    let statement = match &missing {
        Some(m) if m.is_empty() => {
            r.ok(format!("publication {name} covers every table"));
            return Ok(());
        }
        None => {
            let tables: Vec<String> = config.tables.iter().map(|t| qualified(t)).collect();
            format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), tables.join(", "))
        }
        Some(m) => {
            let tables: Vec<String> = m.iter().map(|t| qualified(t)).collect();
            format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), tables.join(", "))
        }
    };
    if !config.create_publication {
        let state = if missing.is_none() { "does not exist" } else { "lacks tables" };
        r.problem(what, format!("{state} and create_publication is false; run: {statement}"));
        return Ok(());
    }
    // Who must act: the owners of the tables to add (and of the publication, to alter it), and
    // CREATE on the database to create it. A superuser may do everything.
    let tables: Vec<&str> = match &missing {
        Some(m) => m.iter().map(String::as_str).collect(),
        None => config.tables.iter().map(String::as_str).collect(),
    };
    let superuser: bool =
        client.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await?.get(0);
    let mut owners = std::collections::BTreeSet::new();
    for t in &tables {
        let Some(id) = crate::model::TableId::parse(t) else { continue };
        let row = client
            .query_opt(
                "SELECT pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE') FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&id.schema, &id.name],
            )
            .await?;
        if let Some(row) = row {
            if !superuser && !row.get::<_, bool>(1) {
                owners.insert(format!("{} (owner of {t})", row.get::<_, String>(0)));
            }
        }
    }
    if missing.is_none() {
        let can_create: bool =
            client.query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[]).await?.get(0);
        if !can_create && !superuser {
            owners.insert("a role with CREATE on this database".into());
        }
    } else {
        let row = client
            .query_one(
                "SELECT pg_get_userbyid(pubowner), pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = $1",
                &[name],
            )
            .await?;
        if !superuser && !row.get::<_, bool>(1) {
            owners.insert(format!("{} (owner of publication {name})", row.get::<_, String>(0)));
        }
    }
    if owners.is_empty() {
        let verb = if missing.is_none() { "will be created" } else { "will get the tables it lacks" };
        r.ok(format!("publication {name} {verb} (role {} may)", config.user));
    } else {
        let who: Vec<String> = owners.into_iter().collect();
        r.problem(
            what,
            format!(
                "role {} may not {} it, so run would fail; as {} (or a superuser), run: {statement}",
                config.user,
                if missing.is_none() { "create" } else { "add these tables to" },
                who.join(" and ")
            ),
        );
    }
    Ok(())
}

/// `None` if the publication does not exist, else the configured tables it lacks.
async fn missing_from_publication(
    client: &Client,
    config: &PostgresConfig,
) -> Result<Option<Vec<String>>, SourceError> {
    let Some(row) =
        client.query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&config.publication]).await?
    else {
        return Ok(None);
    };
    if row.get::<_, bool>(0) {
        return Ok(Some(Vec::new()));
    }
    let mut missing = Vec::new();
    for t in config.table_ids() {
        let present = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&config.publication, &t.schema, &t.name],
            )
            .await?
            .is_some();
        if !present {
            missing.push(t.to_string());
        }
    }
    Ok(Some(missing))
}

/// Creates the publication, or adds the configured tables it lacks, when the config allows it.
pub async fn ensure_publication(client: &Client, config: &PostgresConfig) -> Result<(), SourceError> {
    let qualified = |t: &crate::model::TableId| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    match missing_from_publication(client, config).await? {
        Some(m) if m.is_empty() => Ok(()),
        _ if !config.create_publication => Err(SourceError::Prerequisite(format!(
            "publication {} is missing or lacks tables, and create_publication is false",
            config.publication
        ))),
        None => {
            let tables: Vec<String> = config.table_ids().iter().map(qualified).collect();
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(&config.publication),
                    tables.join(", ")
                ))
                .await?;
            Ok(())
        }
        Some(missing) => {
            for t in missing.iter().filter_map(|m| crate::model::TableId::parse(m)) {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {} ADD TABLE {}",
                        quote_ident(&config.publication),
                        qualified(&t)
                    ))
                    .await?;
            }
            Ok(())
        }
    }
}
