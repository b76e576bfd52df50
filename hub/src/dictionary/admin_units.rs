//! The administrative-unit code lists and the 2025 remap (MISSION F8).
//!
//! A commune code means nothing without its code-list version: 2 136 five-digit codes exist in both
//! the legacy list (before 1 July 2025: 63 provinces, 10 040 communes) and the 2025 list (34
//! provinces, 3 321 communes) with different meanings. So a code is only ever read together with
//! the list its mapping declares ([`CodeList`]), and a legacy code becomes a 2025 one only through
//! the remap table ([`Remap::resolve`]): a whole old commune has one new one; an old commune split
//! among several is decided by a declared finer key (its village), else by the table's default
//! target where the configuration allows it, else it is ambiguous and the change is quarantined.
//!
//! The lists are the project's own data (`data/admin-units/`), compiled in. The remap table can be
//! replaced by a file (`national.remap_file`), read again on reload; a table that does not parse is
//! refused whole and the one in use stays.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The communes before 1 July 2025, as CSV with a header row.
pub const COMMUNES_LEGACY_CSV: &str = include_str!("../../../data/admin-units/communes_legacy.csv");
/// The communes since 1 July 2025, as CSV with a header row.
pub const COMMUNES_2025_CSV: &str = include_str!("../../../data/admin-units/communes_2025.csv");
/// The old → new commune table shipped with the project.
pub const REMAP_2025_CSV: &str = include_str!("../../../data/admin-units/commune_remap_2025.csv");

/// Which code list a source's commune codes are from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
pub enum CodeList {
    /// Before 1 July 2025 (63 provinces, with districts).
    #[serde(rename = "legacy")]
    Legacy,
    /// Decision 19/2025/QĐ-TTg, in force 1 July 2025.
    #[serde(rename = "2025")]
    V2025,
}

impl CodeList {
    /// The version label stored beside every code.
    pub fn label(self) -> &'static str {
        match self {
            CodeList::Legacy => "legacy",
            CodeList::V2025 => "2025",
        }
    }
}

/// A commune of one list: its code and its province's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commune {
    /// Five digits.
    pub code: String,
    /// Two digits, in the same list's province codes.
    pub province: String,
}

struct Lists {
    legacy: HashMap<String, String>,
    current: HashMap<String, String>,
}

fn lists() -> &'static Lists {
    static LISTS: OnceLock<Lists> = OnceLock::new();
    LISTS.get_or_init(|| {
        // province_code,province_name,district_code,district_name,commune_code,…
        let legacy = COMMUNES_LEGACY_CSV
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(4).filter(|c| !c.is_empty())?.to_string(), f.first()?.to_string()))
            })
            .collect();
        // province_code,province_name,commune_code,…
        let current = COMMUNES_2025_CSV
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(2)?.to_string(), f.first()?.to_string()))
            })
            .collect();
        Lists { legacy, current }
    })
}

/// The commune `code` names in `list`, if it names one.
pub fn commune(list: CodeList, code: &str) -> Option<Commune> {
    province_of(list, code).map(|p| Commune { code: code.to_string(), province: p.to_string() })
}

/// The province of commune `code` in `list`, if `code` names a commune there.
pub fn province_of(list: CodeList, code: &str) -> Option<&'static str> {
    let l = lists();
    let provinces = match list {
        CodeList::Legacy => &l.legacy,
        CodeList::V2025 => &l.current,
    };
    provinces.get(code).map(String::as_str)
}

/// The 2-digit codes of the 63 provinces before 1 July 2025.
pub fn legacy_provinces() -> &'static HashSet<String> {
    static CODES: OnceLock<HashSet<String>> = OnceLock::new();
    CODES.get_or_init(|| lists().legacy.values().cloned().collect())
}

/// One row of the remap table: where (part of) an old commune went.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Destination {
    commune: Commune,
    /// The target when nothing finer decides.
    default: bool,
}

/// A declared decision for part of a split commune: rows whose village is `village` go to
/// `new_commune`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// The old (legacy) commune code.
    pub old_commune: String,
    /// The village (thôn, tổ dân phố, street) as the source writes it; compared trimmed, NFC and
    /// case-folded.
    pub village: String,
    /// The 2025 commune that part went to; must be one of the old commune's destinations.
    pub new_commune: String,
}

/// How a legacy commune code became a 2025 one, or why it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The 2025 commune.
    To(Commune),
    /// The old code has no row in the remap table (island districts, a few renamed units).
    Unmapped,
    /// The old commune was split and nothing decided which part this row is in.
    Ambiguous {
        /// The 2025 communes it was split among.
        among: Vec<String>,
    },
}

/// The old → new commune table in use, with the declared split rules.
#[derive(Debug, Clone)]
pub struct Remap {
    version: String,
    rows: HashMap<String, Vec<Destination>>,
    splits: HashMap<(String, String), Commune>,
    split_default: bool,
}

/// Village text as split rules compare it.
pub fn village_key(v: &str) -> String {
    super::normalise::text(v).to_lowercase()
}

impl Remap {
    /// Parses a remap table (the columns of `commune_remap_2025.csv`) and checks `splits` against
    /// it; `split_default` lets a split commune's default target decide when no rule does.
    pub fn parse(csv: &str, splits: &[SplitRule], split_default: bool) -> Result<Self, String> {
        let mut lines = csv.lines();
        let header = lines.next().ok_or("the remap table is empty")?;
        let names: Vec<&str> = header.trim_start_matches('\u{feff}').split(',').map(str::trim).collect();
        let col =
            |name: &str| names.iter().position(|n| *n == name).ok_or(format!("the remap table has no column {name:?}"));
        let (old, new, new_province, default) =
            (col("old_commune_code")?, col("new_commune_code")?, col("new_province_code")?, col("default_target")?);
        let mut rows: HashMap<String, Vec<Destination>> = HashMap::new();
        for (n, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |i: usize| f.get(i).copied().ok_or(format!("remap table line {}: too few fields", n + 2));
            let (o, c, p) = (field(old)?, field(new)?, field(new_province)?);
            if o.is_empty() {
                // An island district without communes went whole into a special zone: there is no
                // old commune code to remap.
                continue;
            }
            if commune(CodeList::V2025, c).is_none() {
                return Err(format!("remap table line {}: {c} is not a commune of the 2025 list", n + 2));
            }
            if commune(CodeList::Legacy, o).is_none() {
                return Err(format!("remap table line {}: {o} is not a commune of the legacy list", n + 2));
            }
            let d = Destination {
                commune: Commune { code: c.to_string(), province: p.to_string() },
                default: field(default)? == "1",
            };
            rows.entry(o.to_string()).or_default().push(d);
        }
        for (o, ds) in &rows {
            if ds.len() > 1 && ds.iter().filter(|d| d.default).count() > 1 {
                return Err(format!("remap table: old commune {o} has more than one default target"));
            }
        }
        let mut rules = HashMap::new();
        for s in splits {
            let target = rows
                .get(&s.old_commune)
                .and_then(|ds| ds.iter().find(|d| d.commune.code == s.new_commune))
                .ok_or(format!(
                    "national.splits: commune {} of the 2025 list is not where old commune {} went",
                    s.new_commune, s.old_commune
                ))?;
            rules.insert((s.old_commune.clone(), village_key(&s.village)), target.commune.clone());
        }
        let digest = Sha256::digest(csv.as_bytes());
        let version = format!("remap-{}", hex::encode(&digest[..6]));
        Ok(Self { version, rows, splits: rules, split_default })
    }

    /// The table shipped with the project.
    pub fn shipped(splits: &[SplitRule], split_default: bool) -> Result<Self, String> {
        Self::parse(REMAP_2025_CSV, splits, split_default)
    }

    /// Names this table's content (a digest), recorded with what it decided.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where legacy commune `old` went, for a row whose village is `village`.
    pub fn resolve(&self, old: &str, village: Option<&str>) -> Resolved {
        let Some(ds) = self.rows.get(old) else { return Resolved::Unmapped };
        if let [only] = ds.as_slice() {
            return Resolved::To(only.commune.clone());
        }
        if let Some(c) = village.and_then(|v| self.splits.get(&(old.to_string(), village_key(v)))) {
            return Resolved::To(c.clone());
        }
        if self.split_default {
            if let Some(d) = ds.iter().find(|d| d.default) {
                return Resolved::To(d.commune.clone());
            }
        }
        Resolved::Ambiguous { among: ds.iter().map(|d| d.commune.code.clone()).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_hold_the_official_counts_and_keep_the_two_meanings_of_a_code_apart() {
        // 10 040 rows, 5 of them island districts without communes.
        assert_eq!(lists().legacy.len(), 10_035);
        assert_eq!(lists().current.len(), 3_321);
        assert_eq!(legacy_provinces().len(), 63);
        let names = |csv: &str, code: usize, name: usize| -> HashMap<String, String> {
            csv.lines()
                .skip(1)
                .map(|l| l.split(',').collect::<Vec<_>>())
                .map(|f| (f[code].to_string(), f[name].to_string()))
                .collect()
        };
        let (old, new) = (names(COMMUNES_LEGACY_CSV, 4, 5), names(COMMUNES_2025_CSV, 2, 3));
        let both: Vec<&String> = old.keys().filter(|c| !c.is_empty() && new.contains_key(*c)).collect();
        assert_eq!(both.len(), 3_316);
        // By name, 2 145 of them are another commune now (the data README counts 2 136 by its own rule).
        assert_eq!(both.iter().filter(|c| old[**c] != new[**c]).count(), 2_145, "the same code, another commune");
        // 00004: Phường Trúc Bạch before, Phường Ba Đình after; both in Hà Nội (01).
        assert_eq!(commune(CodeList::Legacy, "00004").unwrap().province, "01");
        assert_eq!(commune(CodeList::V2025, "00004").unwrap().province, "01");
        assert!(commune(CodeList::V2025, "00001").is_none(), "Phúc Xá is not a 2025 code");
    }

    #[test]
    fn a_legacy_code_resolves_whole_by_village_by_default_or_not_at_all() {
        let remap = Remap::shipped(&[], false).unwrap();
        // Phúc Xá went whole into Hồng Hà; Trúc Bạch (old 00004) into Ba Đình (new 00004).
        assert_eq!(remap.resolve("00001", None), Resolved::To(Commune { code: "00097".into(), province: "01".into() }));
        assert_eq!(remap.resolve("00004", None), Resolved::To(Commune { code: "00004".into(), province: "01".into() }));
        // Đại Mỗ (00634) was split five ways.
        let Resolved::Ambiguous { among } = remap.resolve("00634", Some("Tổ dân phố 5")) else { panic!() };
        assert_eq!(among, ["00622", "00634", "00637", "09556", "09886"]);
        assert_eq!(remap.resolve("99999", None), Resolved::Unmapped);
        let splits =
            [SplitRule {
                old_commune: "00634".into(), village: "Tổ dân phố 5".into(), new_commune: "09886".into()
            }];
        let remap = Remap::shipped(&splits, true).unwrap();
        assert_eq!(remap.resolve("00634", Some("  tổ dân phố 5 ")).unwrap_code(), "09886");
        assert_eq!(remap.resolve("00634", Some("Tổ dân phố 6")).unwrap_code(), "00637", "the default target");
        assert_eq!(remap.resolve("00634", None).unwrap_code(), "00637");
        let bad = [SplitRule { new_commune: "00097".into(), ..splits[0].clone() }];
        assert!(Remap::shipped(&bad, true).unwrap_err().contains("is not where old commune 00634 went"));
        assert!(Remap::parse("a,b\n1,2\n", &[], true).unwrap_err().contains("no column"));
        assert_ne!(Remap::shipped(&[], true).unwrap().version(), "");
    }

    impl Resolved {
        fn unwrap_code(self) -> String {
            match self {
                Resolved::To(c) => c.code,
                other => panic!("{other:?}"),
            }
        }
    }
}
