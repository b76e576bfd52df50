//! The national data dictionary and the pipeline's transform stage.
//!
//! What a national field may hold, the code lists it is checked against ([`admin_units`], the
//! project's own data, compiled in, so a check never depends on a file an administrator may edit),
//! and how each source table maps onto a national table ([`mapping`], declared in `hub.toml` under
//! `[national]`).
//!
//! # Contract
//! [`Dictionary::transform`] takes a decoded batch and gives, change for change and seq for seq,
//! what the hub applies and logs: a change of a mapped table becomes a change of its national
//! table; a change of an unmapped table passes as it is (it lands in the agent's own schema, as
//! before the dictionary); a change that breaks a rule is taken out with the rule and the reason,
//! for the applier to quarantine (never applied, never dropped). Nothing here reads the NDC: the
//! per-key head of line (a later change of a quarantined key waits behind it) and the conflict
//! between two sources of one citizen are decided in the NDC transaction, see [`crate::apply`].

pub mod admin_units;
pub mod citizen_id;
pub mod mapping;
pub mod national;
pub mod normalise;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;

use dongbo_connectors::model::{ChangeBatch, ChangeEvent, TableId, TableSchema, Value};
use serde::{Deserialize, Serialize};

use self::admin_units::{Remap, SplitRule};
use self::mapping::{Bound, Broken, Mapping, MappingConfig, Moves, Stamps};
use std::rc::Rc;

/// What decides when two sources hold the same row of a national table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictRule {
    /// The source with the higher `priority` keeps the row; a lower one's changes to it are skipped.
    Priority,
    /// The change committed last at its source wins.
    LatestCommit,
    /// Neither: the later change is quarantined with both versions for an operator to decide.
    #[default]
    Quarantine,
}

/// The `[national]` section of `hub.toml`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NationalConfig {
    /// Source tables mapped onto national tables.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    /// When two sources hold the same citizen.
    #[serde(default)]
    pub conflict: ConflictRule,
    /// Declared decisions for communes split in 2025, by village.
    #[serde(default)]
    pub splits: Vec<SplitRule>,
    /// A split commune no rule decides goes to the remap table's default target instead of the
    /// quarantine.
    #[serde(default)]
    pub split_default: bool,
    /// A remap table to use instead of the one shipped (same columns), read again on reload.
    #[serde(default)]
    pub remap_file: Option<PathBuf>,
}

/// A change taken out of a batch because it broke a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Its seq.
    pub seq: u64,
    /// The rule it broke.
    pub rule: &'static str,
    /// Why.
    pub reason: String,
}

/// What the transform made of one batch.
#[derive(Debug)]
pub struct Transformed<'a> {
    /// As decoded: what a quarantined change is kept as, so a replay maps it again.
    pub original: &'a ChangeBatch,
    /// What to apply and log, in seq order: mapped and unmapped changes, not the refused.
    pub changes: Cow<'a, ChangeBatch>,
    /// The refused, in seq order.
    pub refused: Vec<Refusal>,
    /// Set when [`Dictionary::transform_moving`] moved text out of `original`'s mapped changes:
    /// the bytes they are decoded from again as the agent sent them (only to quarantine one).
    pub sent: Option<&'a [u8]>,
    /// The national tables `changes` write and what their rows share.
    pub per_stream: Cow<'a, PerStream>,
}

/// The national tables a batch's mapped changes write, each with what every one of its rows holds
/// in the [`national::PER_STREAM`] columns, or `None` where more than one mapping wrote it. Only
/// the transform makes one, from the values it writes, so the applier can send them once rather
/// than once a row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerStream(pub Vec<(TableId, Option<[Value; 4]>)>);

impl PerStream {
    /// Records that `mapping`, bound as `bound`, wrote rows for a stream serving `province`.
    fn wrote(&mut self, mapping: &Mapping, bound: &Bound, province: Option<&str>) {
        let table = &mapping.table.schema.table;
        let values = mapping.per_stream(bound, province);
        match self.0.iter_mut().find(|(t, _)| t == table) {
            None => self.0.push((table.clone(), Some(values))),
            Some((_, shared)) if shared.as_ref() != Some(&values) => *shared = None,
            Some(_) => {}
        }
    }
}

impl<'a> Transformed<'a> {
    /// A batch the dictionary has nothing to do with.
    pub fn unchanged(batch: &'a ChangeBatch) -> Self {
        Self {
            original: batch,
            changes: Cow::Borrowed(batch),
            refused: Vec::new(),
            sent: None,
            per_stream: Cow::Owned(PerStream::default()),
        }
    }

    /// Whether the changes are the original's, as decoded.
    pub fn is_unchanged(&self) -> bool {
        std::ptr::eq(self.changes.as_ref(), self.original)
    }
}

/// The dictionary in use: mappings, the remap table and the conflict rule.
#[derive(Debug, Clone)]
pub struct Dictionary {
    mappings: HashMap<(String, String), Mapping>,
    /// The old → new commune table.
    pub remap: Remap,
    /// When two sources hold the same row.
    pub conflict: ConflictRule,
}

impl Dictionary {
    /// Checks and compiles `config` (reading `remap_file`, if set).
    pub fn load(config: &NationalConfig) -> Result<Self, String> {
        let remap = match &config.remap_file {
            None => Remap::shipped(&config.splits, config.split_default)?,
            Some(path) => {
                let csv = std::fs::read_to_string(path)
                    .map_err(|e| format!("national.remap_file {}: {e}", path.display()))?;
                Remap::parse(&csv, &config.splits, config.split_default)
                    .map_err(|e| format!("national.remap_file {}: {e}", path.display()))?
            }
        };
        let mut mappings = HashMap::new();
        let mut fed: HashMap<(String, &str), &str> = HashMap::new();
        for m in &config.mappings {
            let compiled = Mapping::compile(m.clone())?;
            if let Some(other) = fed.insert((m.agent.clone(), compiled.table.name), &m.source_table) {
                return Err(format!(
                    "national.mappings: agent {} maps both {other} and {} onto national.{}; one source table per agent and national table",
                    m.agent, m.source_table, compiled.table.name
                ));
            }
            if mappings.insert((m.agent.clone(), m.source_table.clone()), compiled).is_some() {
                return Err(format!("national.mappings: {} of agent {} is mapped twice", m.source_table, m.agent));
            }
        }
        if config.conflict == ConflictRule::Priority {
            let mut ranks: HashMap<(&str, i32), &str> = HashMap::new();
            for m in &config.mappings {
                if let Some(other) = ranks.insert((m.table.as_str(), m.priority), &m.agent) {
                    if other != m.agent {
                        return Err(format!(
                            "national.conflict = \"priority\" but agents {other} and {} both have priority {} for national.{}",
                            m.agent, m.priority, m.table
                        ));
                    }
                }
            }
        }
        Ok(Self { mappings, remap, conflict: config.conflict })
    }

    /// Whether any source table is mapped.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The transform stage: `batch` of an agent serving `province`, mapped (see the module doc).
    pub fn transform<'a>(&self, batch: &'a ChangeBatch, province: Option<&str>) -> Transformed<'a> {
        match self.map_batch(batch, province, None) {
            None => Transformed::unchanged(batch),
            Some((changes, refused, per_stream)) => Transformed {
                original: batch,
                changes: Cow::Owned(changes),
                refused,
                sent: None,
                per_stream: Cow::Owned(per_stream),
            },
        }
    }

    /// [`Self::transform`] for a batch the caller owns: text already national is moved out of
    /// `batch` into the national rows, not copied (most of a row, most of the transform's
    /// allocations). `batch`'s mapped changes then lack those values; the caller keeps the bytes
    /// it decoded them from and passes them as [`Transformed::sent`]. `None` when the dictionary
    /// has nothing to do with the batch (`batch` is untouched).
    pub fn transform_moving(&self, batch: &mut ChangeBatch, province: Option<&str>) -> Option<Mapped> {
        let mut moved = Vec::new();
        let (mut changes, refused, per_stream) = self.map_batch(batch, province, Some(&mut moved))?;
        for m in &moved {
            let (Some(from), Some(to)) =
                (batch.changes[m.change].after.as_mut(), changes.changes[m.mapped].after.as_mut())
            else {
                continue;
            };
            to[m.national] = std::mem::replace(&mut from[m.source], Value::Null);
        }
        Some(Mapped { changes, refused, moved: !moved.is_empty(), per_stream })
    }

    /// The mapped changes and refusals of `batch`, or `None` when no mapping concerns it. With
    /// `moved`, text values to move are left as `Null` in the mapped rows and listed there.
    fn map_batch<'b>(
        &self,
        batch: &'b ChangeBatch,
        province: Option<&str>,
        mut moved: Option<&mut Vec<Moved>>,
    ) -> Option<(ChangeBatch, Vec<Refusal>, PerStream)> {
        let agent = batch.source_id.as_str();
        if !self.mappings.keys().any(|(a, _)| a == agent) {
            return None;
        }
        // Changes of one table share their schema: one lookup and one binding per run, not per
        // change.
        type Found<'m> = Option<(&'m Mapping, Rc<Result<Bound, Broken>>)>;
        let mut last: Option<(&std::sync::Arc<TableSchema>, Found)> = None;
        let mut lookup = |c: &'b ChangeEvent| -> Found {
            match &last {
                Some((schema, found)) if std::sync::Arc::ptr_eq(schema, &c.table) => found.clone(),
                _ => {
                    let found = self
                        .mappings
                        .get(&(agent.to_string(), c.table.table.to_string()))
                        .map(|m| (m, Rc::new(m.bind(&c.table))));
                    last = Some((&c.table, found.clone()));
                    found
                }
            }
        };
        let found: Vec<Found> = batch.changes.iter().map(&mut lookup).collect();
        if found.iter().all(Option::is_none) {
            return None;
        }
        let mut stamps = Stamps::new();
        let mut changes = Vec::with_capacity(batch.changes.len());
        let mut refused = Vec::new();
        let mut moves = moved.is_some().then(Moves::default);
        let mut per_stream = PerStream::default();
        let mut last_writer: Option<*const Mapping> = None;
        for (i, (c, m)) in batch.changes.iter().zip(found).enumerate() {
            let Some((m, bound)) = m else {
                changes.push(c.clone());
                continue;
            };
            let mapped = match &*bound {
                Ok(bound) => {
                    // One mapping writes the same per-stream values on each row: checked once a run.
                    if last_writer != Some(m as *const Mapping) {
                        last_writer = Some(m);
                        per_stream.wrote(m, bound, province);
                    }
                    m.map_bound(c, bound, province, &self.remap, &mut stamps, moves.as_mut())
                }
                Err(broken) => Err(broken.clone()),
            };
            match mapped {
                Ok(mapped) => {
                    if let (Some(moved), Some(moves)) = (moved.as_deref_mut(), moves.as_ref()) {
                        let at = changes.len();
                        moved.extend(moves.iter().map(|(national, source)| Moved {
                            change: i,
                            mapped: at,
                            national,
                            source,
                        }));
                    }
                    changes.push(mapped);
                }
                Err(broken) => refused.push(Refusal { seq: c.seq, rule: broken.rule, reason: broken.reason }),
            }
        }
        Some((ChangeBatch { source_id: batch.source_id.clone(), changes }, refused, per_stream))
    }
}

/// What [`Dictionary::transform_moving`] made of a batch.
#[derive(Debug)]
pub struct Mapped {
    /// What to apply and log, as [`Transformed::changes`].
    pub changes: ChangeBatch,
    /// The refused, in seq order.
    pub refused: Vec<Refusal>,
    /// Whether values were moved out of the source batch.
    pub moved: bool,
    /// What the national rows share, as [`Transformed::per_stream`].
    pub per_stream: PerStream,
}

/// One value to move from a source change into its national change.
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// Index of the source change in its batch.
    change: usize,
    /// Index of the national change among the mapped.
    mapped: usize,
    /// Column of the national row.
    national: usize,
    /// Column of the source row.
    source: usize,
}

/// The dictionary every stream maps with: installed when the hub starts, replaced whole by a
/// reload, so a batch is always mapped by one dictionary from start to end.
static CURRENT: std::sync::RwLock<Option<std::sync::Arc<Dictionary>>> = std::sync::RwLock::new(None);

/// Puts `dictionary` in force for every batch transformed from now on.
pub fn install(dictionary: Dictionary) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(dictionary));
}

/// The dictionary in force (an empty one, mapping nothing, before [`install`]).
pub fn current() -> std::sync::Arc<Dictionary> {
    if let Some(d) = CURRENT.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return d.clone();
    }
    static EMPTY: std::sync::OnceLock<std::sync::Arc<Dictionary>> = std::sync::OnceLock::new();
    EMPTY
        .get_or_init(|| {
            std::sync::Arc::new(Dictionary::load(&NationalConfig::default()).expect("the shipped remap table loads"))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use admin_units::CodeList;
    use dongbo_connectors::model::{Column, Operation, TableId};
    use std::sync::Arc;

    fn schema(table: &str) -> Arc<TableSchema> {
        let col = |n: &str| Column { name: n.into(), type_name: "text".into(), type_oid: 25 };
        let cols = ["so_cccd", "ho_ten", "ngay_sinh", "gioi_tinh", "ma_xa", "ghi_chu"];
        Arc::new(TableSchema::new(TableId::new("public", table), cols.iter().map(|c| col(c)).collect(), vec![0]))
    }

    fn dictionary() -> Dictionary {
        let columns = [
            ("so_cccd", "citizen_id"),
            ("ho_ten", "full_name"),
            ("ngay_sinh", "birth_date"),
            ("gioi_tinh", "gender"),
            ("ma_xa", "commune_code"),
        ];
        let mapping = mapping::nhan_khau_config(&columns, CodeList::Legacy);
        Dictionary::load(&NationalConfig { mappings: vec![mapping], ..Default::default() }).unwrap()
    }

    fn change(seq: u64, table: &Arc<TableSchema>, id: &str, name: &str) -> ChangeEvent {
        let row: Vec<Value> =
            [id, name, "17/05/1990", "Nam", "00001", "ghi chú"].iter().map(|v| Value::Text(v.to_string())).collect();
        ChangeEvent::for_test(seq, table, Operation::Insert, vec![row[0].clone()], Some(row))
    }

    #[test]
    fn moving_the_clean_text_gives_what_copying_it_gives() {
        let (mapped, unmapped) = (schema("nhan_khau"), schema("ho_khau"));
        let sent = ChangeBatch {
            source_id: "hcm".into(),
            changes: vec![
                change(1, &mapped, "079090000123", "Nguyễn Văn A"),
                change(2, &mapped, "079090000124", " Nguye\u{0302}\u{0303}n  Văn B"),
                change(3, &mapped, "003090000125", "Trần Văn C"),
                change(4, &unmapped, "079090000126", "Lê Văn D"),
                change(5, &mapped, "079090000127", "Phạm Văn E"),
            ],
        };
        let d = dictionary();
        let copied = d.transform(&sent, Some("79"));
        let mut batch = sent.clone();
        let moved = d.transform_moving(&mut batch, Some("79")).expect("the batch is mapped");
        assert_eq!(moved.changes, *copied.changes);
        assert_eq!(moved.refused, copied.refused);
        assert_eq!(moved.refused.iter().map(|r| (r.seq, r.rule)).collect::<Vec<_>>(), [(3, "citizen_id.province")]);
        assert!(moved.moved);
        // The clean names went; the one normalised was copied; the refused and the unmapped
        // changes, and every other column, are as sent.
        let name = |b: &ChangeBatch, i: usize| b.changes[i].after.as_ref().unwrap()[1].clone();
        assert_eq!((name(&batch, 0), name(&batch, 4)), (Value::Null, Value::Null));
        assert_eq!(name(&moved.changes, 0), Value::Text("Nguyễn Văn A".into()));
        for i in [1, 2, 3] {
            assert_eq!(batch.changes[i], sent.changes[i], "change {i}");
        }
        for i in [0, 4] {
            let (now, then) = (batch.changes[i].after.as_ref().unwrap(), sent.changes[i].after.as_ref().unwrap());
            assert_eq!(now[0], then[0], "the citizen id is copied, not moved");
            assert_eq!(now[2..], then[2..]);
        }
        // Nothing to do with a batch no mapping concerns: it is left alone.
        let mut other =
            ChangeBatch { source_id: "hanoi".into(), changes: vec![change(1, &mapped, "079090000123", "A")] };
        assert!(d.transform_moving(&mut other, None).is_none());
        assert_eq!(other.changes[0], change(1, &mapped, "079090000123", "A"));
    }

    #[test]
    fn a_batch_declares_what_its_national_rows_share() {
        let (nhan_khau, ho_khau) = (schema("nhan_khau"), schema("ho_khau"));
        let sent = ChangeBatch {
            source_id: "hcm".into(),
            changes: vec![
                change(1, &nhan_khau, "079090000123", "Nguyễn Văn A"),
                change(2, &nhan_khau, "079090000124", "Trần Văn B"),
                change(3, &ho_khau, "079090000125", "Lê Văn C"),
            ],
        };
        let d = dictionary();
        let t = d.transform(&sent, Some("79"));
        assert!(!t.changes.changes[2].table.national, "an unmapped table passes as it is, declaring nothing");
        let [(table, Some(shared))] = &t.per_stream.0[..] else { panic!("one table, shared: {:?}", t.per_stream) };
        assert_eq!(*table, TableId::new("national", "citizens"));
        let columns = &national::table("citizens").unwrap().schema.columns;
        for c in t.changes.changes.iter().filter(|c| c.table.national) {
            let row = c.after.as_ref().unwrap();
            for (name, v) in national::PER_STREAM.iter().zip(shared) {
                assert_eq!(&row[columns.iter().position(|c| c.name == *name).unwrap()], v, "{name}");
            }
        }
        assert_eq!(shared[0], Value::Text("hcm".into()));
        assert_eq!(shared[2], Value::Text("public.nhan_khau".into()));
        assert_eq!(Transformed::unchanged(&sent).per_stream.0, [], "nothing declared of a batch as it came");
        let mut batch = sent.clone();
        assert_eq!(d.transform_moving(&mut batch, Some("79")).unwrap().per_stream, *t.per_stream);
    }
}
