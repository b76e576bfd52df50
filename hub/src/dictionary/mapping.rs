//! A source table's mapping onto a national table, declared in `hub.toml`, and what it makes of one
//! change: the national row (fields renamed, values normalised and checked, legacy commune codes
//! remapped, provenance recorded, every other column dropped), or the rule the change breaks.
//!
//! A mapping is checked whole when the configuration loads ([`Mapping::compile`]); a change is
//! mapped by [`Mapping::map`], which is pure: the same change, mapping and remap table always give
//! the same row or the same refusal, which is what makes a replay after a fix predictable.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use dongbo_connectors::model::{ChangeEvent, Operation, Row, TableSchema, Value};
use serde::{Deserialize, Serialize};

use super::admin_units::{self, CodeList, Commune, Remap, Resolved};
use super::citizen_id::{self, CitizenIdError, Gender};
use super::national::{self, Kind, NationalTable};
use super::normalise::{self, Date, DateFormat};
use crate::fanout::record::rfc3339_micros;

/// One `[[national.mappings]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// The agent whose table this is.
    pub agent: String,
    /// The source table, `schema.table`, as the agent sends it.
    pub source_table: String,
    /// The national table it feeds (`citizens`).
    pub table: String,
    /// Source column → national field. Columns not named here are dropped.
    pub columns: BTreeMap<String, String>,
    /// How the source writes dates held as text (a native date column needs nothing).
    #[serde(default = "iso")]
    pub date_format: DateFormat,
    /// Which list the source's commune codes are from; required when a commune is mapped.
    #[serde(default)]
    pub commune_codes: Option<CodeList>,
    /// This source's rank when `national.conflict = "priority"`: the higher wins.
    #[serde(default)]
    pub priority: i32,
}

fn iso() -> DateFormat {
    DateFormat::Iso
}

/// A rule a change broke, and why, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The rule's stable name (`citizen_id.province`, `date.range`, `commune.ambiguous`, …), by
    /// which operators filter the quarantine.
    pub rule: &'static str,
    /// Why.
    pub reason: String,
}

impl Broken {
    fn new(rule: &'static str, reason: impl Into<String>) -> Self {
        Self { rule, reason: reason.into() }
    }
}

/// A mapping checked against the dictionary.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// As configured.
    pub config: MappingConfig,
    /// The national table.
    pub table: &'static NationalTable,
    /// For each field of the table, the source column feeding it.
    sources: Vec<Option<String>>,
}

/// A mapping bound to one source schema version: the source column index of each field, and
/// what every row of that version records the same way.
pub struct Bound {
    index: Vec<Option<usize>>,
    /// The source key is exactly the citizen-id column, so a delete's key names the citizen.
    key_is_id: bool,
    /// The field the village (finer key of a split commune) is in.
    village: Option<usize>,
    /// `schema.table` of the source, recorded on each row.
    source_table: String,
}

impl Mapping {
    /// Checks `config`: a known national table, known fields each fed once, every required field
    /// fed, a code list where a commune is.
    pub fn compile(config: MappingConfig) -> Result<Self, String> {
        let what = format!("national.mappings for {} of agent {}", config.source_table, config.agent);
        let table = national::table(&config.table).ok_or(format!(
            "{what}: there is no national table {:?} (known: {})",
            config.table,
            national::tables().iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ))?;
        let mut sources: Vec<Option<String>> = vec![None; table.fields.len()];
        for (column, field) in &config.columns {
            let i = table.fields.iter().position(|f| f.name == field).ok_or(format!(
                "{what}: national.{} has no field {field:?} (fields: {})",
                table.name,
                table.fields.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
            ))?;
            if let Some(other) = &sources[i] {
                return Err(format!("{what}: columns {other:?} and {column:?} both feed {field}"));
            }
            sources[i] = Some(column.clone());
        }
        for (f, s) in table.fields.iter().zip(&sources) {
            if f.required && s.is_none() {
                return Err(format!("{what}: no column feeds {}, which national.{} requires", f.name, table.name));
            }
            if f.kind == Kind::Commune && s.is_some() && config.commune_codes.is_none() {
                return Err(format!(
                    "{what}: say which list {} is from: commune_codes = \"legacy\" (before 1 July 2025) or \"2025\"",
                    f.name
                ));
            }
        }
        Ok(Self { config, table, sources })
    }

    /// This mapping bound to source schema version `schema`, or the rule that version breaks (a
    /// column the mapping reads is gone).
    pub fn bind(&self, schema: &TableSchema) -> Result<Bound, Broken> {
        let mut index = Vec::with_capacity(self.sources.len());
        for (f, s) in self.table.fields.iter().zip(&self.sources) {
            index.push(match s {
                None => None,
                Some(name) => Some(schema.columns.iter().position(|c| &c.name == name).ok_or_else(|| {
                    Broken::new(
                        "mapping.column",
                        format!(
                            "{} has no column {name:?}, which the mapping reads for {} (the source schema drifted: fix national.mappings)",
                            schema.table, f.name
                        ),
                    )
                })?),
            });
        }
        let key_is_id = schema.key_columns.len() == 1 && Some(schema.key_columns[0]) == index[0];
        let village = self.table.village_field.and_then(|v| self.table.fields.iter().position(|f| f.name == v));
        Ok(Bound { index, key_is_id, village, source_table: schema.table.to_string() })
    }

    /// The national change `c` becomes, or the rule it breaks. `agent_province` is recorded on the
    /// row; `remap` turns legacy commune codes into 2025 ones.
    pub fn map(&self, c: &ChangeEvent, agent_province: Option<&str>, remap: &Remap) -> Result<ChangeEvent, Broken> {
        self.map_bound(c, &self.bind(&c.table)?, agent_province, remap, &mut Stamps::new(), None)
    }

    /// [`Self::map`] with the mapping already bound to `c`'s schema and the batch's [`Stamps`].
    ///
    /// With `moves`, a text value that is national already is not copied: the national row holds
    /// `Null` in its place, and `moves` says (national column, source column) for the caller to
    /// move it from `c` once the change passed every rule.
    pub fn map_bound(
        &self,
        c: &ChangeEvent,
        bound: &Bound,
        agent_province: Option<&str>,
        remap: &Remap,
        stamps: &mut Stamps,
        mut moves: Option<&mut Moves>,
    ) -> Result<ChangeEvent, Broken> {
        if let Some(m) = moves.as_deref_mut() {
            m.0.clear();
        }
        // Field by field: cloning the change would copy its rows only to drop them.
        let mut out = ChangeEvent {
            seq: c.seq,
            table: Arc::clone(&self.table.schema),
            op: c.op,
            key: Vec::new(),
            before: None,
            after: None,
            position: c.position,
            commit_time_us: c.commit_time_us,
            txid: c.txid,
            txn_order: c.txn_order,
            txn_last: c.txn_last,
        };
        match c.op {
            Operation::Truncate => {
                out.key = Vec::new();
            }
            Operation::Delete => {
                let id = self.old_id(c, bound)?.ok_or_else(|| {
                    Broken::new(
                        "key.unknown",
                        format!(
                            "this delete of {} does not say which citizen: key the source table by the citizen id or set REPLICA IDENTITY FULL",
                            c.table.table
                        ),
                    )
                })?;
                out.key = vec![Value::Text(id)];
            }
            Operation::Insert | Operation::SnapshotRead | Operation::Update => {
                let after = c.after.as_ref().ok_or_else(|| Broken::new("change.shape", "the change has no new row"))?;
                let row = self.row(c, after, bound, agent_province, remap, stamps, moves)?;
                let new_id = row[0].clone();
                let old_id = if c.op == Operation::Update { self.old_id(c, bound)? } else { None };
                out.key = vec![old_id.map_or(new_id, Value::Text)];
                out.after = Some(row);
            }
        }
        Ok(out)
    }

    /// The citizen id a change's old row had, when the change says it.
    fn old_id(&self, c: &ChangeEvent, bound: &Bound) -> Result<Option<String>, Broken> {
        let from = if bound.key_is_id {
            c.key.first()
        } else {
            c.before.as_ref().zip(bound.index[0]).and_then(|(b, i)| b.get(i))
        };
        match from {
            None | Some(Value::Null) | Some(Value::UnchangedToast) => Ok(None),
            Some(v) => source_text(v).map(|s| Some(normalise::text(&s).into_owned())).ok_or_else(|| {
                Broken::new("citizen_id.shape", format!("the old row's citizen id {v:?} is not text or a number"))
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        c: &ChangeEvent,
        after: &Row,
        bound: &Bound,
        agent_province: Option<&str>,
        remap: &Remap,
        stamps: &mut Stamps,
        mut moves: Option<&mut Moves>,
    ) -> Result<Row, Broken> {
        let mut row: Row = Vec::with_capacity(self.table.schema.columns.len());
        let value = |i: usize| bound.index[i].and_then(|s| after.get(s)).unwrap_or(&Value::Null);
        let village = bound.village.and_then(|i| source_text(value(i)));
        let mut birth: Option<Date> = None;
        let mut gender: Option<Gender> = None;
        for (i, f) in self.table.fields.iter().enumerate() {
            let v = value(i);
            if matches!(v, Value::UnchangedToast) {
                // Postgres did not resend an unchanged out-of-line value: the NDC keeps its own.
                row.push(Value::UnchangedToast);
                if f.kind == Kind::Commune {
                    row.extend([Value::UnchangedToast, Value::UnchangedToast, Value::UnchangedToast]);
                }
                continue;
            }
            let text = match source_text(v) {
                Some(Cow::Borrowed(s)) => Some(normalise::text(s)),
                Some(Cow::Owned(s)) => Some(Cow::Owned(normalise::text(&s).into_owned())),
                None => None,
            }
            .filter(|s| !s.is_empty());
            let Some(text) = text else {
                if f.required {
                    return Err(Broken::new(
                        "required",
                        format!(
                            "{} is required but the source's {} is empty",
                            f.name,
                            self.sources[i].as_deref().unwrap_or("-")
                        ),
                    ));
                }
                row.push(Value::Null);
                if f.kind == Kind::Commune {
                    row.extend([Value::Null, Value::Null, Value::Null]);
                }
                continue;
            };
            match f.kind {
                // Moved only when the text is the source's whole value, unchanged (not a number's
                // digits, not a timestamp's date), from a column no other field moved already.
                // The citizen id is copied: the rules below read it.
                Kind::Text
                    if matches!((&text, v), (Cow::Borrowed(_), Value::Text(_)))
                        && moves.as_deref().is_some_and(|m| m.0.iter().all(|&(_, s)| Some(s) != bound.index[i])) =>
                {
                    if let (Some(m), Some(source)) = (moves.as_deref_mut(), bound.index[i]) {
                        m.0.push((row.len(), source));
                    }
                    row.push(Value::Null);
                }
                Kind::CitizenId | Kind::Text => row.push(Value::Text(text.into_owned())),
                Kind::Gender => {
                    let code = normalise::gender(&text).map_err(|r| Broken::new("gender.code", r))?;
                    gender = Some(if code == "1" { Gender::Male } else { Gender::Female });
                    row.push(Value::Text(code.to_string()));
                }
                Kind::BirthDate => {
                    // A native date arrives as yyyy-mm-dd whatever the mapping says text looks like.
                    let format = if matches!(v, Value::Date(_)) { DateFormat::Iso } else { self.config.date_format };
                    let d = Date::parse(&text, format)
                        .map_err(|r| Broken::new("date.format", format!("{}: {r}", f.name)))?;
                    let (low, high) = (Date { year: 1900, month: 1, day: 1 }, stamps.today);
                    if d < low || d > high {
                        return Err(Broken::new(
                            "date.range",
                            format!("{} {d} is outside {low} to {high} (today)", f.name),
                        ));
                    }
                    birth = Some(d);
                    row.push(Value::Date(d.iso()));
                }
                Kind::Commune => {
                    let list = self.config.commune_codes.unwrap_or(CodeList::V2025);
                    let code = commune_code(&text);
                    let Some(province) = admin_units::province_of(list, &code) else {
                        return Err(Broken::new(
                            "commune.code",
                            format!("{} {text:?} is not a commune of the {} list", f.name, list.label()),
                        ));
                    };
                    let (current, legacy) = match list {
                        CodeList::V2025 => (Commune { code: code.into_owned(), province: province.to_string() }, None),
                        CodeList::Legacy => match remap.resolve(&code, village.as_deref()) {
                            Resolved::To(c) => (c, Some(code.into_owned())),
                            Resolved::Unmapped => {
                                return Err(Broken::new(
                                    "commune.unmapped",
                                    format!("legacy commune {code} has no row in the remap table ({})", remap.version()),
                                ))
                            }
                            Resolved::Ambiguous { among } => {
                                return Err(Broken::new(
                                    "commune.ambiguous",
                                    format!(
                                        "legacy commune {code} was split among {} and nothing decides which part this row is in \
                                         (village {:?}): declare a national.splits rule, or allow national.split_default",
                                        among.join(", "),
                                        village.as_deref().unwrap_or("")
                                    ),
                                ))
                            }
                        },
                    };
                    row.push(Value::Text(current.code));
                    row.push(Value::Text(CodeList::V2025.label().to_string()));
                    row.push(Value::Text(current.province));
                    row.push(legacy.map_or(Value::Null, Value::Text));
                }
            }
        }
        if let Value::Text(id) = &row[0] {
            citizen_id::check(id, birth.zip(gender).map(|(d, g)| (d.year, g))).map_err(|e| {
                let rule = match e {
                    CitizenIdError::Shape(_) => "citizen_id.shape",
                    CitizenIdError::Province { .. } => "citizen_id.province",
                    CitizenIdError::Birth { .. } => "citizen_id.birth",
                };
                Broken::new(rule, e.to_string())
            })?;
        }
        let [agent, province, source_table, priority] = self.per_stream(bound, agent_province);
        row.extend([agent, province, source_table]);
        row.push(Value::Int(c.seq as i64));
        row.push(Value::TimestampTz(stamps.committed(c.commit_time_us)));
        row.push(priority);
        Ok(row)
    }

    /// What every row this mapping writes for a stream serving `agent_province` holds in the
    /// columns [`super::national::PER_STREAM`] names, in that order.
    pub fn per_stream(&self, bound: &Bound, agent_province: Option<&str>) -> [Value; 4] {
        [
            Value::Text(self.config.agent.clone()),
            agent_province.map_or(Value::Null, |p| Value::Text(p.to_string())),
            Value::Text(bound.source_table.clone()),
            Value::Int(i64::from(self.config.priority)),
        ]
    }
}

/// The clean text values a [`Mapping::map_bound`] left in the source row for its caller to move
/// into the national row: (national column, source column).
#[derive(Debug, Default)]
pub struct Moves(Vec<(usize, usize)>);

impl Moves {
    /// (national column, source column) of each value to move.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.0.iter().copied()
    }
}

/// What the rows of one batch share, worked out once: the day dates may not pass, and the last
/// commit time as text (a transaction's changes share it).
#[derive(Debug)]
pub struct Stamps {
    today: Date,
    committed: Option<(i64, String)>,
}

impl Stamps {
    /// Stamps for mapping changes now.
    pub fn new() -> Self {
        Self { today: Date::today(), committed: None }
    }

    fn committed(&mut self, us: i64) -> String {
        match &self.committed {
            Some((at, text)) if *at == us => text.clone(),
            _ => self.committed.insert((us, rfc3339_micros(us))).1.clone(),
        }
    }
}

impl Default for Stamps {
    fn default() -> Self {
        Self::new()
    }
}

/// A legacy system's commune code as the lists write it: digits, zero-padded to five (a numeric
/// column drops the leading zeros).
fn commune_code(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.is_empty() && text.len() < 5 && text.bytes().all(|b| b.is_ascii_digit()) {
        std::borrow::Cow::Owned(format!("{text:0>5}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The text of a source value a field can read: text, numbers (legacy systems keep ids and codes
/// in integer columns) and dates; `None` for NULL and for what no field reads.
fn source_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    match v {
        Value::Text(s) | Value::Numeric(s) | Value::Date(s) => Some(Cow::Borrowed(s)),
        Value::Int(i) => Some(Cow::Owned(i.to_string())),
        Value::Timestamp(s) | Value::TimestampTz(s) => Some(Cow::Borrowed(s.get(..10).unwrap_or(s))),
        _ => None,
    }
}

/// Agent `hcm`'s legacy `public.nhan_khau` onto `national.citizens` (`dd/mm/yyyy` dates, rank 1),
/// `columns` as (source column, national field): the tests' mapping.
#[cfg(test)]
pub(crate) fn nhan_khau_config(columns: &[(&str, &str)], codes: CodeList) -> MappingConfig {
    MappingConfig {
        agent: "hcm".into(),
        source_table: "public.nhan_khau".into(),
        table: "citizens".into(),
        columns: columns.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        date_format: DateFormat::DayMonthYearSlash,
        commune_codes: Some(codes),
        priority: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{Column, TableId};

    fn source() -> Arc<TableSchema> {
        let col = |n: &str, t: &str| Column { name: n.into(), type_name: t.into(), type_oid: 25 };
        Arc::new(TableSchema::new(
            TableId::new("public", "nhan_khau"),
            vec![
                col("id", "integer"),
                col("so_cccd", "text"),
                col("ho_ten", "text"),
                col("ngay_sinh", "text"),
                col("gioi_tinh", "text"),
                col("ma_xa", "text"),
                col("thon", "text"),
                col("ghi_chu", "text"),
            ],
            vec![0],
        ))
    }

    fn mapping(codes: CodeList) -> Mapping {
        let columns = [
            ("so_cccd", "citizen_id"),
            ("ho_ten", "full_name"),
            ("ngay_sinh", "birth_date"),
            ("gioi_tinh", "gender"),
            ("ma_xa", "commune_code"),
            ("thon", "village"),
        ];
        Mapping::compile(nhan_khau_config(&columns, codes)).unwrap()
    }

    fn change(op: Operation, values: [&str; 7]) -> ChangeEvent {
        let mut row = vec![Value::Int(1)];
        row.extend(values.iter().map(|v| if v.is_empty() { Value::Null } else { Value::Text(v.to_string()) }));
        ChangeEvent::for_test(7, &source(), op, vec![Value::Int(1)], Some(row))
    }

    const GOOD: [&str; 7] = ["079090000123", " Nguye\u{0302}\u{0303}n Văn  A", "17/05/1990", "Nam", "00001", "", "x"];

    #[test]
    fn a_legacy_row_becomes_a_national_one_with_its_provenance() {
        let remap = Remap::shipped(&[], false).unwrap();
        let out = mapping(CodeList::Legacy).map(&change(Operation::Insert, GOOD), Some("79"), &remap).unwrap();
        let row = out.after.unwrap();
        let text = |i: usize| match &row[i] {
            Value::Text(s) | Value::Date(s) | Value::TimestampTz(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            v => format!("{v:?}"),
        };
        assert!(out.table.national);
        assert_eq!(out.key, vec![Value::Text("079090000123".into())]);
        assert_eq!(
            (0..row.len()).map(text).collect::<Vec<_>>()[..11],
            ["079090000123", "Nguyễn Văn A", "1990-05-17", "1", "00097", "2025", "01", "00001", "Null", "Null", "hcm"]
        );
        assert_eq!(text(11), "79");
        assert_eq!(text(12), "public.nhan_khau");
        assert_eq!(text(13), "7");
        assert_eq!(text(15), "1");
        assert_eq!(row.len(), out.table.columns.len());
    }

    #[test]
    fn each_broken_rule_is_named() {
        let remap = Remap::shipped(&[], false).unwrap();
        let m = mapping(CodeList::Legacy);
        let broken = |i: usize, v: &str| {
            let mut values = GOOD;
            values[i] = v;
            m.map(&change(Operation::Insert, values), None, &remap).unwrap_err().rule
        };
        assert_eq!(broken(0, "79090000123"), "citizen_id.shape");
        assert_eq!(broken(0, "003090000123"), "citizen_id.province");
        assert_eq!(broken(0, "079190000123"), "citizen_id.birth", "a woman's digit for a man");
        assert_eq!(broken(1, "  "), "required");
        assert_eq!(broken(2, "31/02/1990"), "date.format");
        assert_eq!(broken(2, "17/05/1890"), "date.range");
        assert_eq!(broken(2, "17/05/2990"), "date.range");
        assert_eq!(broken(3, "X"), "gender.code");
        assert_eq!(broken(4, "99999"), "commune.code");
        assert_eq!(broken(4, "00634"), "commune.ambiguous", "Đại Mỗ was split five ways");
        // 00001 is not a 2025 code at all; 00004 is, but means Ba Đình, not Trúc Bạch.
        let m2025 = mapping(CodeList::V2025);
        let mut values = GOOD;
        values[4] = "00001";
        assert_eq!(m2025.map(&change(Operation::Insert, values), None, &remap).unwrap_err().rule, "commune.code");
        values[4] = "4";
        let row = m2025.map(&change(Operation::Insert, values), None, &remap).unwrap().after.unwrap();
        assert_eq!((row[4].clone(), row[7].clone()), (Value::Text("00004".into()), Value::Null));
        let mut delete = change(Operation::Delete, GOOD);
        delete.after = None;
        assert_eq!(m.map(&delete, None, &remap).unwrap_err().rule, "key.unknown");
        delete.before = change(Operation::Insert, GOOD).after;
        assert_eq!(m.map(&delete, None, &remap).unwrap().key, vec![Value::Text("079090000123".into())]);
    }

    #[test]
    fn a_mapping_that_cannot_work_is_refused_when_the_configuration_loads() {
        let base = mapping(CodeList::Legacy).config;
        let with = |f: &dyn Fn(&mut MappingConfig)| {
            let mut c = base.clone();
            f(&mut c);
            Mapping::compile(c).unwrap_err()
        };
        assert!(with(&|c| c.table = "people".into()).contains("no national table"));
        assert!(with(&|c| {
            c.columns.insert("x".into(), "shoe_size".into());
        })
        .contains("no field \"shoe_size\""));
        assert!(with(&|c| {
            c.columns.remove("ho_ten");
        })
        .contains("no column feeds full_name"));
        assert!(with(&|c| {
            c.columns.insert("ghi_chu".into(), "full_name".into());
        })
        .contains("both feed full_name"));
        assert!(with(&|c| c.commune_codes = None).contains("commune_codes"));
        let drifted = Arc::new(TableSchema::new(
            TableId::new("public", "nhan_khau"),
            vec![Column { name: "id".into(), type_name: "integer".into(), type_oid: 23 }],
            vec![0],
        ));
        let c = ChangeEvent::for_test(1, &drifted, Operation::Insert, vec![Value::Int(1)], Some(vec![Value::Int(1)]));
        let remap = Remap::shipped(&[], false).unwrap();
        assert_eq!(mapping(CodeList::Legacy).map(&c, None, &remap).unwrap_err().rule, "mapping.column");
    }
}
