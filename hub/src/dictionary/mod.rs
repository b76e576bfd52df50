//! The national data dictionary: what a national field may hold and the code lists it is checked
//! against. The code lists are the project's own data (`data/admin-units/`, from the official
//! lists; see its README), compiled into the hub so a check never depends on a file an
//! administrator may edit.
//!
//! Built so far: the citizen id ([`citizen_id`]). The transform stage of the hub's pipeline
//! ([`crate::pipeline`]) will apply these rules to every mapped row.

pub mod citizen_id;

/// The communes before 1 July 2025 (63 provinces, 10 040 communes), as CSV with a header row:
/// `province_code,province_name,district_code,district_name,commune_code,commune_name,commune_type`.
pub const COMMUNES_LEGACY_CSV: &str = include_str!("../../../data/admin-units/communes_legacy.csv");
