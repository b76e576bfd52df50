//! Target tables in the NDC: created from the source schema, widened when the source adds columns,
//! and the staging tables used to load them.
//!
//! # Naming
//! Each agent has its own NDC schema (`target_schema` in `hub.toml`, by default its id with `-` as
//! `_`). A source table `public.x` becomes `<agent schema>.x`; a table of any other source schema,
//! `s.x`, becomes `<agent schema>."s.x"`, so `a.x` and `b.x` of one agent never share an NDC table.
//! A `public` table whose own name holds a `.` is named `"public.<name>"` too. The rule is
//! one-to-one: a name without a `.` comes only from `public`, and a name with one splits at its
//! first `.` into the source schema and table, because a source schema whose name holds a `.` is
//! refused.
//!
//! Every name is quoted, and a name Postgres would truncate (over 63 bytes) or cannot hold (NUL) is
//! refused with a reason, so the changes of that table are quarantined instead.
//!
//! # Statements
//! The DDL is a list of single statements, each run on the extended protocol (which refuses more
//! than one statement), and column types come only from [`super::types`].

use dongbo_connectors::model::TableSchema;

use super::types::{column_type, ndc_ident, NdcType};
use crate::dictionary::national::PROVENANCE;
use crate::dictionary::ConflictRule;

/// A target table and the SQL to load it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`.
    pub qualified: String,
    /// `"schema"`.
    pub schema_sql: String,
    /// The NDC schema's name, unquoted.
    pub schema_name: String,
    /// The NDC table's name, unquoted, as `dongbo.source_columns` records it.
    pub table_name: String,
    /// Temp table for upserts.
    pub stage: String,
    /// Temp table for deleted keys.
    pub delete_stage: String,
    /// Quoted column names, in schema order.
    pub columns: Vec<String>,
    /// Quoted key column names.
    pub key_columns: Vec<String>,
    /// Column types in the NDC, in schema order.
    pub types: Vec<NdcType>,
    /// Indexes of the key columns.
    pub key_index: Vec<usize>,
    /// A national table, which several agents share: each one's truncate and deletes touch only
    /// its own rows (`source_agent`, bound as `$1`), and an upsert overwrites another agent's row
    /// only as the conflict rule allows.
    pub national: bool,
    /// A national table's commit-time column: loaded through the stage as microseconds (in
    /// [`COMMITTED_US`]) where the hub wrote the time, because parsing timestamp text was a third
    /// of the NDC's COPY of a national row.
    pub commit_micros: Option<usize>,
}

/// The stage column holding a national row's commit time as microseconds since the epoch; `NULL`
/// where the time came as text the hub did not write (that is then in the commit-time column).
pub const COMMITTED_US: &str = "\"dongbo_committed_us\"";

/// The `WHERE` of a national table's upsert under `rule`: when a row another agent holds may be
/// overwritten. Built from the closed rule, never from a peer's text.
fn conflict_guard(rule: ConflictRule) -> &'static str {
    match rule {
        ConflictRule::Priority => {
            "t.\"source_agent\" = EXCLUDED.\"source_agent\" OR EXCLUDED.\"source_priority\" > t.\"source_priority\""
        }
        ConflictRule::LatestCommit => {
            "t.\"source_agent\" = EXCLUDED.\"source_agent\" OR EXCLUDED.\"source_committed_at\" >= t.\"source_committed_at\""
        }
        ConflictRule::Quarantine => "t.\"source_agent\" = EXCLUDED.\"source_agent\"",
    }
}

/// The NDC table name of source table `schema.name` (see the module doc), or why there is none.
pub fn ndc_table_name(schema: &str, name: &str) -> Result<String, String> {
    if schema.contains('.') {
        return Err(format!("source schema {schema:?} contains a '.', which the NDC naming rule cannot keep apart"));
    }
    if schema == "public" && !name.contains('.') {
        Ok(name.to_string())
    } else {
        Ok(format!("{schema}.{name}"))
    }
}

impl Target {
    /// The target of `schema` inside NDC schema `ndc_schema`; `n` names its staging tables. `Err`
    /// says why the source table cannot have an NDC table.
    pub fn new(ndc_schema: &str, schema: &TableSchema, n: usize) -> Result<Self, String> {
        let table_name = ndc_table_name(&schema.table.schema, &schema.table.name)?;
        let schema_sql = ndc_ident(ndc_schema, "NDC schema")?;
        let qualified = format!("{schema_sql}.{}", ndc_ident(&table_name, "NDC table")?);
        let columns: Vec<String> =
            schema.columns.iter().map(|c| ndc_ident(&c.name, "column")).collect::<Result<_, _>>()?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = schema.columns.iter().find(|c| !seen.insert(c.name.as_str())) {
            return Err(format!("column {:?} appears twice in the schema of {}", dup.name, schema.table));
        }
        let mut keys = std::collections::HashSet::new();
        if schema.key_columns.iter().any(|&k| k >= columns.len() || !keys.insert(k)) {
            return Err(format!("the key of {} names a column twice or past its columns", schema.table));
        }
        Ok(Self {
            qualified,
            schema_sql,
            schema_name: ndc_schema.to_string(),
            table_name,
            stage: format!("dongbo_stage_{n}"),
            delete_stage: format!("dongbo_stage_del_{n}"),
            key_columns: schema.key_columns.iter().map(|&k| columns[k].clone()).collect(),
            types: schema.columns.iter().map(|c| column_type(c, schema.dialect)).collect(),
            key_index: schema.key_columns.clone(),
            columns,
            national: false,
            commit_micros: None,
        })
    }

    /// The target of a national table of the dictionary (`national.<name>`), shared by every agent
    /// mapped onto it.
    pub fn national(schema: &TableSchema, n: usize) -> Result<Self, String> {
        let mut t = Self::new("national", schema, n)?;
        t.table_name = schema.table.name.clone();
        t.qualified = format!("{}.{}", t.schema_sql, ndc_ident(&schema.table.name, "NDC table")?);
        t.national = true;
        t.commit_micros = schema.columns.iter().position(|c| c.name == PROVENANCE[4].0);
        Ok(t)
    }

    /// Statements creating (or widening) the target and (re)creating its staging tables, one
    /// statement each. Idempotent.
    pub fn ddl(&self) -> Vec<String> {
        let cols: Vec<String> = self.columns.iter().zip(&self.types).map(|(c, t)| format!("{c} {t}")).collect();
        // A keyless table is a multiset: no key to declare.
        let key = if self.key_columns.is_empty() {
            String::new()
        } else {
            format!(", PRIMARY KEY ({})", self.key_columns.join(", "))
        };
        let mut sql = vec![
            format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema_sql),
            format!("CREATE TABLE IF NOT EXISTS {} ({}{key})", self.qualified, cols.join(", ")),
        ];
        for col in &cols {
            sql.push(format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {col}", self.qualified));
        }
        sql.push(format!("DROP TABLE IF EXISTS pg_temp.{}", self.stage));
        sql.push(format!("DROP TABLE IF EXISTS pg_temp.{}", self.delete_stage));
        let micros =
            if self.commit_micros.is_some() { format!(", NULL::bigint AS {COMMITTED_US}") } else { String::new() };
        sql.push(format!(
            "CREATE TEMP TABLE {} ON COMMIT DELETE ROWS AS SELECT {}{micros} FROM {} WITH NO DATA",
            self.stage,
            self.columns.join(", "),
            self.qualified
        ));
        sql.push(format!(
            "CREATE TEMP TABLE {} ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA",
            self.delete_stage,
            self.key_columns.join(", "),
            self.qualified
        ));
        sql
    }

    /// `TRUNCATE` of the target; of a national table, a delete of the agent's rows (`$1`).
    pub fn truncate_sql(&self) -> String {
        if self.national {
            format!("DELETE FROM {} WHERE \"source_agent\" = $1", self.qualified)
        } else {
            format!("TRUNCATE {}", self.qualified)
        }
    }

    /// Upsert from the stage for the columns in `present` (indexes into `columns`); into a
    /// national table, guarded by `rule`, or unguarded where an operator decided (`None`). The
    /// columns in `bound` (a subset of `present`, never a key) are not in the stage: they take
    /// parameters `$1..` (as text), in `bound`'s order, the same value for every row.
    pub fn upsert_sql_under(&self, present: &[usize], bound: &[usize], rule: Option<ConflictRule>) -> String {
        // Aliased either way, so the guard and any caller name the row as `t`.
        let sql = self.upsert_sql_bound(present, bound, if self.national { " AS t" } else { "" });
        match rule {
            Some(rule) if self.national => format!("{sql} WHERE {}", conflict_guard(rule)),
            _ => sql,
        }
    }

    /// Upsert from the stage for the columns in `present` (indexes into `columns`).
    pub fn upsert_sql(&self, present: &[usize]) -> String {
        self.upsert_sql_bound(present, &[], "")
    }

    fn upsert_sql_bound(&self, present: &[usize], bound: &[usize], alias: &str) -> String {
        let cols: Vec<&str> = present.iter().map(|&i| self.columns[i].as_str()).collect();
        let values: Vec<String> = present
            .iter()
            .map(|&i| match bound.iter().position(|&b| b == i) {
                Some(n) => format!("${}::text::{}", n + 1, self.types[i]),
                // Exact: a bigint below 2^53 is a whole double, and interval times one are whole
                // microseconds.
                None if self.commit_micros == Some(i) => format!(
                    "COALESCE('epoch'::timestamptz + {COMMITTED_US} * interval '1 microsecond', {})",
                    self.columns[i]
                ),
                None => self.columns[i].clone(),
            })
            .collect();
        let updates: Vec<String> = cols
            .iter()
            .filter(|c| !self.key_columns.iter().any(|k| k == *c))
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let action =
            if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
        format!(
            "INSERT INTO {}{alias} ({}) SELECT {} FROM {} ON CONFLICT ({}) {action}",
            self.qualified,
            cols.join(", "),
            values.join(", "),
            self.stage,
            self.key_columns.join(", "),
        )
    }

    /// Upsert of one re-keyed row: columns in `present` from parameters `$1..` (as text), the others
    /// from the target's row under the old key, parameters after those. Runs before the old key is
    /// deleted. A LEFT JOIN keeps the row even if the old one is missing (its other columns then NULL).
    pub fn rekey_sql(&self, present: &[usize]) -> String {
        let mut n = 0;
        let values: Vec<String> = (0..self.columns.len())
            .map(|i| {
                if present.contains(&i) {
                    n += 1;
                    format!("${n}::text::{}", self.types[i])
                } else {
                    format!("old.{}", self.columns[i])
                }
            })
            .collect();
        let on: Vec<String> = self
            .key_index
            .iter()
            .map(|&k| {
                n += 1;
                format!("old.{} = ${n}::text::{}", self.columns[k], self.types[k])
            })
            .collect();
        let updates: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !self.key_columns.contains(c))
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let action =
            if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
        format!(
            "INSERT INTO {t} ({cols}) SELECT {values} FROM (SELECT 1) AS one LEFT JOIN {t} old ON {on} ON CONFLICT ({keys}) {action}",
            t = self.qualified,
            cols = self.columns.join(", "),
            values = values.join(", "),
            on = on.join(" AND "),
            keys = self.key_columns.join(", "),
        )
    }

    /// COPY into the stage for the columns in `present`; a national table's commit time is
    /// followed by [`COMMITTED_US`], one of the two `NULL` in each row (see `copy_rows`).
    pub fn copy_stage_sql(&self, present: &[usize]) -> String {
        let mut cols: Vec<&str> = Vec::with_capacity(present.len() + 1);
        for &i in present {
            cols.push(self.columns[i].as_str());
            if self.commit_micros == Some(i) {
                cols.push(COMMITTED_US);
            }
        }
        format!("COPY {} ({}) FROM STDIN", self.stage, cols.join(", "))
    }

    /// COPY of whole rows straight into the target (snapshot rows, new to the target).
    pub fn copy_target_sql(&self) -> String {
        format!("COPY {} ({}) FROM STDIN", self.qualified, self.columns.join(", "))
    }

    /// COPY of keys into the delete stage.
    pub fn copy_delete_sql(&self) -> String {
        format!("COPY {} ({}) FROM STDIN", self.delete_stage, self.key_columns.join(", "))
    }

    /// The row of a keyless table equal to a whole old row given as text parameters `$first..`, one
    /// per column: the first such row, locked. Values compare as the NDC prints them, which is how
    /// the source printed them (the same session settings), so every column type compares, `json`
    /// included, and NULL equals NULL.
    fn one_equal_row(&self, first: usize) -> String {
        let equal: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}::text IS NOT DISTINCT FROM ${}", first + i))
            .collect();
        format!("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1 FOR UPDATE)", self.qualified, equal.join(" AND "))
    }

    /// Delete one row of a keyless table equal to the old row in `$1..`.
    pub fn delete_one_sql(&self) -> String {
        format!("DELETE FROM {} WHERE {}", self.qualified, self.one_equal_row(1))
    }

    /// Update one row of a keyless table equal to the old row: the columns in `present` from `$1..`,
    /// then the old row's columns after those.
    pub fn update_one_sql(&self, present: &[usize]) -> String {
        let sets: Vec<String> = present
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("{} = ${}::text::{}", self.columns[i], n + 1, self.types[i]))
            .collect();
        format!("UPDATE {} SET {} WHERE {}", self.qualified, sets.join(", "), self.one_equal_row(present.len() + 1))
    }

    /// COPY of rows into the target, for the columns in `present`.
    pub fn copy_columns_sql(&self, present: &[usize]) -> String {
        let cols: Vec<&str> = present.iter().map(|&i| self.columns[i].as_str()).collect();
        format!("COPY {} ({}) FROM STDIN", self.qualified, cols.join(", "))
    }

    /// Delete the staged keys; from a national table, only the agent's (`$1`) rows.
    pub fn delete_sql(&self) -> String {
        let mut on: Vec<String> = self.key_columns.iter().map(|k| format!("t.{k} = d.{k}")).collect();
        if self.national {
            on.push("t.\"source_agent\" = $1".into());
        }
        format!("DELETE FROM {} t USING {} d WHERE {}", self.qualified, self.delete_stage, on.join(" AND "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{Column, TableId};

    fn col(n: &str, t: &str, o: u32) -> Column {
        Column { name: n.into(), type_name: t.into(), type_oid: o }
    }

    #[test]
    fn sql_quotes_names_and_updates_only_non_key_columns() {
        let s = TableSchema::new(
            TableId::new("public", "Công dân"),
            vec![col("id", "character(12)", 1042), col("gender", "gender_t", 16500), col("addr", "text", 25)],
            vec![0],
        );
        let t = Target::new("hcm_population", &s, 3).unwrap();
        assert_eq!(t.qualified, "\"hcm_population\".\"Công dân\"");
        let ddl = t.ddl();
        assert!(ddl[1].contains("\"gender\" text"), "user-defined types land as text: {ddl:?}");
        assert!(ddl.iter().all(|stmt| !stmt.contains(';')), "one statement each: {ddl:?}");
        assert_eq!(
            t.upsert_sql(&[0, 2]),
            "INSERT INTO \"hcm_population\".\"Công dân\" (\"id\", \"addr\") SELECT \"id\", \"addr\" FROM dongbo_stage_3 ON CONFLICT (\"id\") DO UPDATE SET \"addr\" = EXCLUDED.\"addr\""
        );
        assert!(t.upsert_sql(&[0]).ends_with("DO NOTHING"));
        assert!(t.delete_sql().contains("t.\"id\" = d.\"id\""));
        assert_eq!(
            t.rekey_sql(&[0, 1]),
            "INSERT INTO \"hcm_population\".\"Công dân\" (\"id\", \"gender\", \"addr\") SELECT $1::text::character(12), $2::text::text, old.\"addr\" \
             FROM (SELECT 1) AS one LEFT JOIN \"hcm_population\".\"Công dân\" old ON old.\"id\" = $3::text::character(12) \
             ON CONFLICT (\"id\") DO UPDATE SET \"gender\" = EXCLUDED.\"gender\", \"addr\" = EXCLUDED.\"addr\""
        );
    }

    #[test]
    fn a_national_table_is_shared_and_each_agent_touches_only_its_rows() {
        let citizens = &crate::dictionary::national::table("citizens").unwrap().schema;
        let t = Target::national(citizens, 0).unwrap();
        assert_eq!(t.qualified, "\"national\".\"citizens\"");
        assert_eq!(t.table_name, "citizens");
        assert_eq!(t.truncate_sql(), "DELETE FROM \"national\".\"citizens\" WHERE \"source_agent\" = $1");
        assert!(t.delete_sql().ends_with("AND t.\"source_agent\" = $1"), "{}", t.delete_sql());
        let all: Vec<usize> = (0..t.columns.len()).collect();
        let upsert = t.upsert_sql_under(&all, &[], Some(ConflictRule::Priority));
        assert!(upsert.starts_with("INSERT INTO \"national\".\"citizens\" AS t ("), "{upsert}");
        assert!(upsert.ends_with("OR EXCLUDED.\"source_priority\" > t.\"source_priority\""), "{upsert}");
        assert!(t
            .upsert_sql_under(&all, &[], Some(ConflictRule::Quarantine))
            .ends_with("WHERE t.\"source_agent\" = EXCLUDED.\"source_agent\""));
        // Columns one value fills come from parameters, in the order given, cast from text.
        let source_agent = t.columns.iter().position(|c| c == "\"source_agent\"").unwrap();
        let priority = t.columns.iter().position(|c| c == "\"source_priority\"").unwrap();
        let bound = t.upsert_sql_under(&all, &[priority, source_agent], Some(ConflictRule::Priority));
        assert!(bound.contains("$2::text::text, \"source_province\""), "{bound}");
        assert!(bound.contains("$1::text::integer FROM dongbo_stage_0 ON CONFLICT"), "{bound}");
        assert!(bound.contains("\"source_agent\" = EXCLUDED.\"source_agent\""), "still updated: {bound}");
        // The commit time is staged as microseconds beside its text column, either one set.
        let committed = t.commit_micros.expect("a national table has a commit time");
        assert_eq!(t.columns[committed], "\"source_committed_at\"");
        assert!(t.ddl().iter().any(|d| d.contains("NULL::bigint AS \"dongbo_committed_us\" FROM \"national\"")));
        assert!(t
            .copy_stage_sql(&all)
            .contains("\"source_committed_at\", \"dongbo_committed_us\", \"source_priority\""));
        assert!(upsert.contains(
            "COALESCE('epoch'::timestamptz + \"dongbo_committed_us\" * interval '1 microsecond', \"source_committed_at\")"
        ));
        // An operator's decision overwrites unguarded, the row still named `t`.
        let decided = t.upsert_sql_under(&all, &[], None);
        assert!(
            decided.starts_with("INSERT INTO \"national\".\"citizens\" AS t (") && !decided.contains("WHERE"),
            "{decided}"
        );
        // An agent's own table is neither scoped nor guarded.
        let own = Target::new(
            "hcm",
            &TableSchema::new(TableId::new("public", "x"), vec![col("id", "integer", 23)], vec![0]),
            0,
        )
        .unwrap();
        assert_eq!(own.upsert_sql_under(&[0], &[], Some(ConflictRule::Priority)), own.upsert_sql(&[0]));
        assert_eq!(own.truncate_sql(), "TRUNCATE \"hcm\".\"x\"");
        assert_eq!(own.commit_micros, None);
        assert_eq!(own.copy_stage_sql(&[0]), "COPY dongbo_stage_0 (\"id\") FROM STDIN");
    }

    #[test]
    fn source_schemas_stay_apart_in_ndc_names() {
        let t = |schema: &str, name: &str| {
            let s = TableSchema::new(TableId::new(schema, name), vec![col("id", "integer", 23)], vec![0]);
            Target::new("hcm", &s, 0).map(|t| t.qualified)
        };
        assert_eq!(t("public", "x").unwrap(), "\"hcm\".\"x\"");
        assert_eq!(t("a", "x").unwrap(), "\"hcm\".\"a.x\"");
        assert_eq!(t("b", "x").unwrap(), "\"hcm\".\"b.x\"");
        assert_eq!(t("public", "a.x").unwrap(), "\"hcm\".\"public.a.x\"", "not the same as a.x");
        assert!(t("a.b", "x").unwrap_err().contains("contains a '.'"));
        assert!(t("public", &"n".repeat(64)).unwrap_err().contains("truncate"));
    }

    #[test]
    fn hostile_schemas_are_refused_or_quoted() {
        let hostile = TableSchema::new(
            TableId::new("public", "x\"; DROP SCHEMA dongbo CASCADE; --"),
            vec![col("id", "integer); DELETE FROM dongbo.applied_position; --", 23), col("v\"", "text", 25)],
            vec![0],
        );
        let t = Target::new("hcm", &hostile, 0).unwrap();
        assert_eq!(t.types[0], NdcType::TEXT, "a type outside the grammar lands as text");
        assert_eq!(t.qualified, "\"hcm\".\"x\"\"; DROP SCHEMA dongbo CASCADE; --\"");
        assert_eq!(t.columns[1], "\"v\"\"\"");
        let dup =
            TableSchema::new(TableId::new("public", "d"), vec![col("a", "text", 25), col("a", "text", 25)], vec![0]);
        assert!(Target::new("hcm", &dup, 0).unwrap_err().contains("twice"));
    }
}
