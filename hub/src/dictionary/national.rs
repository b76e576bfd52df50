//! The national tables: their fields, what each may hold, and the NDC shape they are stored in.
//!
//! A national table lives in the NDC schema `national`, is keyed by its first field and holds, after
//! the dictionary's fields, where each row came from (`source_agent`, `source_province`,
//! `source_table`, `source_seq`, `source_committed_at`, `source_priority`). Its shape is defined
//! here, not by any source, so every province's rows share one table; the hub creates it.

use std::sync::{Arc, OnceLock};

use dongbo_connectors::model::{Column, TableId, TableSchema};

/// What a national field holds, which decides how a source value is normalised and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The 12-digit citizen id.
    CitizenId,
    /// Free text, trimmed and NFC.
    Text,
    /// A date of birth: a real day, from 1900 to today.
    BirthDate,
    /// The national gender code.
    Gender,
    /// A commune code, stored in the 2025 list with its version, its province and the legacy code
    /// it came from.
    Commune,
}

/// A field a source column may be mapped to.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its name in configuration and in the NDC.
    pub name: &'static str,
    /// What it holds.
    pub kind: Kind,
    /// A row without it is refused.
    pub required: bool,
}

/// A national table of the dictionary.
#[derive(Debug)]
pub struct NationalTable {
    /// Its name in configuration and in the NDC (`national.<name>`).
    pub name: &'static str,
    /// The fields a mapping may fill; the first is the key.
    pub fields: &'static [Field],
    /// Where the finer key of a split commune is read from.
    pub village_field: Option<&'static str>,
    /// The NDC shape: the stored columns, in order (see [`NationalTable::columns`]).
    pub schema: Arc<TableSchema>,
}

/// Stored columns besides the fields: the commune's version, province and legacy code.
pub const COMMUNE_VERSION: &str = "commune_code_version";
/// The 2025 province of the stored commune.
pub const PROVINCE: &str = "province_code";
/// The legacy code the stored commune was remapped from, if any.
pub const LEGACY_COMMUNE: &str = "legacy_commune_code";
/// Provenance columns, on every row, in this order after the fields.
pub const PROVENANCE: [(&str, &str, u32); 6] = [
    ("source_agent", "text", 25),
    ("source_province", "text", 25),
    ("source_table", "text", 25),
    ("source_seq", "bigint", 20),
    ("source_committed_at", "timestamp with time zone", 1184),
    ("source_priority", "integer", 23),
];

/// The provenance columns one mapping fills alike on every row of a stream (who sent it, from
/// which table, at what rank), unlike the seq and commit time of each change.
pub const PER_STREAM: [&str; 4] = ["source_agent", "source_province", "source_table", "source_priority"];

const CITIZEN_FIELDS: &[Field] = &[
    Field { name: "citizen_id", kind: Kind::CitizenId, required: true },
    Field { name: "full_name", kind: Kind::Text, required: true },
    Field { name: "birth_date", kind: Kind::BirthDate, required: true },
    Field { name: "gender", kind: Kind::Gender, required: true },
    Field { name: "commune_code", kind: Kind::Commune, required: false },
    Field { name: "village", kind: Kind::Text, required: false },
    Field { name: "address", kind: Kind::Text, required: false },
];

fn ndc_type(kind: Kind) -> (&'static str, u32) {
    match kind {
        Kind::BirthDate => ("date", 1082),
        Kind::CitizenId | Kind::Text | Kind::Gender | Kind::Commune => ("text", 25),
    }
}

impl NationalTable {
    fn build(name: &'static str, fields: &'static [Field], village_field: Option<&'static str>) -> Self {
        let col = |name: &str, t: &str, oid: u32| Column { name: name.into(), type_name: t.into(), type_oid: oid };
        let mut columns: Vec<Column> = Vec::new();
        for f in fields {
            let (t, oid) = ndc_type(f.kind);
            columns.push(col(f.name, t, oid));
            if f.kind == Kind::Commune {
                for extra in [COMMUNE_VERSION, PROVINCE, LEGACY_COMMUNE] {
                    columns.push(col(extra, "text", 25));
                }
            }
        }
        columns.extend(PROVENANCE.iter().map(|(n, t, o)| col(n, t, *o)));
        let mut schema = TableSchema::new(TableId::new("national", name), columns, vec![0]);
        schema.national = true;
        Self { name, fields, village_field, schema: Arc::new(schema) }
    }

    /// Index of stored column `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.schema.columns.iter().position(|c| c.name == name)
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// `national.<name>`, as event rules and subscriptions name it.
    pub fn qualified(&self) -> String {
        self.schema.table.to_string()
    }
}

/// Every national table, by name.
pub fn tables() -> &'static [NationalTable] {
    static TABLES: OnceLock<Vec<NationalTable>> = OnceLock::new();
    TABLES.get_or_init(|| vec![NationalTable::build("citizens", CITIZEN_FIELDS, Some("village"))])
}

/// The national table called `name`.
pub fn table(name: &str) -> Option<&'static NationalTable> {
    tables().iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citizens_are_keyed_by_the_citizen_id_and_carry_their_provenance() {
        let t = table("citizens").unwrap();
        assert_eq!(t.qualified(), "national.citizens");
        assert_eq!(t.schema.key_columns, [0]);
        assert_eq!(t.schema.columns[0].name, "citizen_id");
        assert!(t.schema.national);
        let names: Vec<&str> = t.schema.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            &names[4..8],
            ["commune_code", "commune_code_version", "province_code", "legacy_commune_code"],
            "a commune code never stands without its version"
        );
        assert_eq!(names.last(), Some(&"source_priority"));
        assert!(table("citizen").is_none());
    }
}
