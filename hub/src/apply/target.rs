//! Target tables in the NDC: created from the source schema (one NDC schema per agent, tables keep
//! their names), widened when the source adds columns, and the staging tables used to load them.

use dongbo_connectors::model::{Column, TableSchema};
use dongbo_connectors::postgres::snapshot::quote_ident;

/// Oids from here up are user-defined types (enums, domains, composites) that need not exist in the
/// NDC; their values travel as text and land in text columns.
const FIRST_USER_OID: u32 = 16384;

/// A target table and the SQL to load it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`.
    pub qualified: String,
    /// Temp table for upserts.
    pub stage: String,
    /// Temp table for deleted keys.
    pub delete_stage: String,
    /// Quoted column names, in schema order.
    pub columns: Vec<String>,
    /// Quoted key column names.
    pub key_columns: Vec<String>,
    /// Column types in the NDC, in schema order.
    pub types: Vec<String>,
    /// Indexes of the key columns.
    pub key_index: Vec<usize>,
}

fn column_type(c: &Column) -> &str {
    if c.type_oid >= FIRST_USER_OID {
        "text"
    } else {
        &c.type_name
    }
}

impl Target {
    /// The target of `schema` inside NDC schema `ndc_schema`; `n` names its staging tables.
    pub fn new(ndc_schema: &str, schema: &TableSchema, n: usize) -> Self {
        let columns: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        Self {
            qualified: format!("{}.{}", quote_ident(ndc_schema), quote_ident(&schema.table.name)),
            stage: format!("dongbo_stage_{n}"),
            delete_stage: format!("dongbo_stage_del_{n}"),
            key_columns: schema.key_columns.iter().map(|&k| columns[k].clone()).collect(),
            types: schema.columns.iter().map(|c| column_type(c).to_string()).collect(),
            key_index: schema.key_columns.clone(),
            columns,
        }
    }

    /// DDL creating (or widening) the target and (re)creating its staging tables. Idempotent.
    pub fn ddl(&self, ndc_schema: &str, schema: &TableSchema) -> String {
        let cols: Vec<String> =
            schema.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), column_type(c))).collect();
        let mut sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {};\nCREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}));\n",
            quote_ident(ndc_schema),
            self.qualified,
            cols.join(", "),
            self.key_columns.join(", ")
        );
        for c in &schema.columns {
            sql.push_str(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {};\n",
                self.qualified,
                quote_ident(&c.name),
                column_type(c)
            ));
        }
        sql.push_str(&format!(
            "DROP TABLE IF EXISTS pg_temp.{s}; DROP TABLE IF EXISTS pg_temp.{d};\n\
             CREATE TEMP TABLE {s} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {t} WITH NO DATA;\n\
             CREATE TEMP TABLE {d} ON COMMIT DELETE ROWS AS SELECT {keys} FROM {t} WITH NO DATA;\n",
            s = self.stage,
            d = self.delete_stage,
            cols = self.columns.join(", "),
            keys = self.key_columns.join(", "),
            t = self.qualified,
        ));
        sql
    }

    /// Upsert from the stage for the columns in `present` (indexes into `columns`).
    pub fn upsert_sql(&self, present: &[usize]) -> String {
        let cols: Vec<&str> = present.iter().map(|&i| self.columns[i].as_str()).collect();
        let updates: Vec<String> = cols
            .iter()
            .filter(|c| !self.key_columns.iter().any(|k| k == *c))
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let action =
            if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
        format!(
            "INSERT INTO {} ({c}) SELECT {c} FROM {} ON CONFLICT ({}) {action}",
            self.qualified,
            self.stage,
            self.key_columns.join(", "),
            c = cols.join(", ")
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

    /// COPY into the stage for the columns in `present`.
    pub fn copy_stage_sql(&self, present: &[usize]) -> String {
        let cols: Vec<&str> = present.iter().map(|&i| self.columns[i].as_str()).collect();
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

    /// Delete the staged keys.
    pub fn delete_sql(&self) -> String {
        let on: Vec<String> = self.key_columns.iter().map(|k| format!("t.{k} = d.{k}")).collect();
        format!("DELETE FROM {} t USING {} d WHERE {}", self.qualified, self.delete_stage, on.join(" AND "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::TableId;

    #[test]
    fn sql_quotes_names_and_updates_only_non_key_columns() {
        let col = |n: &str, t: &str, o| Column { name: n.into(), type_name: t.into(), type_oid: o };
        let s = TableSchema::new(
            TableId::new("public", "Công dân"),
            vec![col("id", "character(12)", 1042), col("gender", "gender_t", 16500), col("addr", "text", 25)],
            vec![0],
        );
        let t = Target::new("hcm_population", &s, 3);
        assert_eq!(t.qualified, "\"hcm_population\".\"Công dân\"");
        assert!(t.ddl("hcm_population", &s).contains("\"gender\" text"), "user-defined types land as text");
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
}
