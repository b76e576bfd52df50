//! Source column types → NDC column types, through a closed grammar.
//!
//! A column's type name arrives on the wire from an agent, so it is data, never SQL. It becomes an
//! NDC type only by parsing into [`NdcType`], whose SQL text this module writes itself: the
//! built-in scalar types with their modifiers (`int2/4/8`, `float4/8`, `numeric(p,s)`, `text`,
//! `varchar(n)`, `char(n)`, `bool`, `date`, `time[tz]`, `timestamp[tz]`, `interval`, `bytea`,
//! `json`, `jsonb`, `uuid`) and arrays of them. Anything else — a user-defined type, an engine's own
//! type, or a hostile string — lands as `text`; the source type name is kept as data in
//! `dongbo.source_columns`, never spliced into a statement.
//!
//! Identifiers are checked here too ([`ndc_ident`]): Postgres truncates names past 63 bytes (two
//! long source names could then meet in one NDC table) and cannot carry a NUL, so such names are
//! refused with a reason instead of reaching the NDC.
//!
//! This is the one place where sources' types meet the NDC: the MySQL and polling sources map their
//! type names through [`parse`] too.

use std::fmt;

use dongbo_connectors::model::{Column, Dialect};
use dongbo_connectors::postgres::snapshot::quote_ident;

/// Oids from here up are user-defined types (enums, domains, composites) that need not exist in the
/// NDC; their values travel as text and land in text columns whatever their name says.
const FIRST_USER_OID: u32 = 16384;

/// Postgres keeps identifiers up to NAMEDATALEN − 1 bytes and silently truncates longer ones.
pub const MAX_IDENT_BYTES: usize = 63;

/// A type name longer than this cannot be one of the grammar's (the longest is ~40 bytes).
const MAX_TYPE_NAME_BYTES: usize = 64;

/// `numeric` allows up to 1000 digits of precision and a scale in −1000..=1000 (Postgres 15).
const MAX_NUMERIC_PRECISION: i64 = 1000;
/// `varchar(n)` / `char(n)` allow n up to 10 485 760.
const MAX_CHAR_LENGTH: i64 = 10_485_760;
/// Fractional-second precision of time, timestamp and interval is 0..=6.
const MAX_TIME_PRECISION: i64 = 6;
/// Postgres arrays have at most 6 dimensions.
const MAX_ARRAY_DIMS: usize = 6;

/// A scalar NDC type the grammar knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    /// `smallint`.
    Int2,
    /// `integer`.
    Int4,
    /// `bigint`.
    Int8,
    /// `real`.
    Float4,
    /// `double precision`.
    Float8,
    /// `numeric`, with precision and scale when given.
    Numeric(Option<(u16, i16)>),
    /// `text`.
    Text,
    /// `character varying(n)`.
    Varchar(Option<u32>),
    /// `character(n)`.
    Char(Option<u32>),
    /// `boolean`.
    Bool,
    /// `date`.
    Date,
    /// `time(p) [with|without] time zone`.
    Time {
        /// Fractional digits, when given.
        precision: Option<u8>,
        /// With time zone.
        tz: bool,
    },
    /// `timestamp(p) [with|without] time zone`.
    Timestamp {
        /// Fractional digits, when given.
        precision: Option<u8>,
        /// With time zone.
        tz: bool,
    },
    /// `interval(p)`; field restrictions (`year to month`) widen to a plain interval.
    Interval(Option<u8>),
    /// `bytea`.
    Bytea,
    /// `json`.
    Json,
    /// `jsonb`.
    Jsonb,
    /// `uuid`.
    Uuid,
}

/// An NDC column type: a scalar, or an array of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdcType {
    /// The element type.
    pub scalar: Scalar,
    /// Array dimensions (0 for a scalar).
    pub dims: u8,
}

impl NdcType {
    /// Plain `text`, where every unknown type lands.
    pub const TEXT: NdcType = NdcType { scalar: Scalar::Text, dims: 0 };
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let zone = |tz: bool| if tz { "with time zone" } else { "without time zone" };
        match *self {
            Scalar::Int2 => f.write_str("smallint"),
            Scalar::Int4 => f.write_str("integer"),
            Scalar::Int8 => f.write_str("bigint"),
            Scalar::Float4 => f.write_str("real"),
            Scalar::Float8 => f.write_str("double precision"),
            Scalar::Numeric(None) => f.write_str("numeric"),
            Scalar::Numeric(Some((p, s))) => write!(f, "numeric({p},{s})"),
            Scalar::Text => f.write_str("text"),
            Scalar::Varchar(None) => f.write_str("character varying"),
            Scalar::Varchar(Some(n)) => write!(f, "character varying({n})"),
            Scalar::Char(None) => f.write_str("character"),
            Scalar::Char(Some(n)) => write!(f, "character({n})"),
            Scalar::Bool => f.write_str("boolean"),
            Scalar::Date => f.write_str("date"),
            Scalar::Time { precision: None, tz } => write!(f, "time {}", zone(tz)),
            Scalar::Time { precision: Some(p), tz } => write!(f, "time({p}) {}", zone(tz)),
            Scalar::Timestamp { precision: None, tz } => write!(f, "timestamp {}", zone(tz)),
            Scalar::Timestamp { precision: Some(p), tz } => write!(f, "timestamp({p}) {}", zone(tz)),
            Scalar::Interval(None) => f.write_str("interval"),
            Scalar::Interval(Some(p)) => write!(f, "interval({p})"),
            Scalar::Bytea => f.write_str("bytea"),
            Scalar::Json => f.write_str("json"),
            Scalar::Jsonb => f.write_str("jsonb"),
            Scalar::Uuid => f.write_str("uuid"),
        }
    }
}

/// The SQL text of the type, written by this module from the parsed value only.
impl fmt::Display for NdcType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.scalar)?;
        for _ in 0..self.dims {
            f.write_str("[]")?;
        }
        Ok(())
    }
}

/// The NDC type of a source column: its parsed type name, or `text` for a user-defined type
/// (by oid) or a name outside the grammar.
pub fn column_type(c: &Column, dialect: Dialect) -> NdcType {
    match dialect {
        Dialect::Postgres if c.type_oid >= FIRST_USER_OID => Some(NdcType::TEXT),
        Dialect::Postgres => parse(&c.type_name),
        Dialect::MySql => parse_mysql(&c.type_name),
    }
    .unwrap_or(NdcType::TEXT)
}

/// Parses a MySQL/MariaDB `COLUMN_TYPE` (`int(10) unsigned`, `decimal(12,2)`, `tinyint(1)`,
/// `datetime(6)`, `enum`) into the NDC type that holds every value of it: unsigned types widen
/// (`int unsigned` → `bigint`, `bigint unsigned` → `numeric(20,0)`), `tinyint(1)` stays a number
/// (its width is display only; 2 is a legal value), `time` becomes `interval` (MySQL's runs past
/// 24 hours and below zero), `timestamp` is stored in UTC with its zone, `char(n)` becomes
/// `varchar(n)` (MySQL strips the padding), enums and sets are text. `None` outside the grammar.
pub fn parse_mysql(name: &str) -> Option<NdcType> {
    let toks = tokens(name)?;
    let mut p = Parser { toks: &toks, at: 0 };
    let first = p.next_word()?;
    let args = p.modifiers(2).ok()?;
    let mut unsigned = false;
    loop {
        if p.word("unsigned") {
            unsigned = true;
        } else if !(p.word("signed") || p.word("zerofill")) {
            break;
        }
    }
    if p.at != toks.len() {
        return None;
    }
    let one = |max: i64| match args.as_slice() {
        [] => Some(None),
        [n] if (0..=max).contains(n) => Some(Some(*n)),
        _ => None,
    };
    let precision = || one(MAX_TIME_PRECISION).map(|p| p.map(|p| p as u8));
    let scalar = match (first.as_str(), unsigned) {
        ("tinyint" | "bool" | "boolean", _) | ("smallint", false) | ("year", _) => Scalar::Int2,
        ("smallint", true) | ("mediumint", _) | ("int" | "integer", false) => Scalar::Int4,
        ("int" | "integer", true) | ("bigint", false) => Scalar::Int8,
        ("bigint", true) => Scalar::Numeric(Some((20, 0))),
        ("decimal" | "numeric" | "dec" | "fixed", _) => match args.as_slice() {
            [] => Scalar::Numeric(Some((10, 0))),
            [p] if (1..=65).contains(p) => Scalar::Numeric(Some((*p as u16, 0))),
            [p, s] if (1..=65).contains(p) && (0..=30).contains(s) && s <= p => {
                Scalar::Numeric(Some((*p as u16, *s as i16)))
            }
            _ => return None,
        },
        ("float", _) if args.is_empty() => Scalar::Float4,
        ("float", _) => match args.as_slice() {
            [p] if *p <= 24 => Scalar::Float4,
            _ => Scalar::Float8,
        },
        ("double" | "real", _) => Scalar::Float8,
        ("char" | "varchar", _) => match one(MAX_CHAR_LENGTH)? {
            Some(n) if n > 0 => Scalar::Varchar(Some(n as u32)),
            _ => Scalar::Text,
        },
        ("tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set", _) => Scalar::Text,
        ("binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "bit", _) => Scalar::Bytea,
        ("date", _) => Scalar::Date,
        ("datetime", _) => Scalar::Timestamp { precision: precision()?, tz: false },
        ("timestamp", _) => Scalar::Timestamp { precision: precision()?, tz: true },
        ("time", _) => Scalar::Interval(precision()?),
        ("json", _) => Scalar::Jsonb,
        _ => return None,
    };
    Some(NdcType { scalar, dims: 0 })
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Number(i64),
    Open,
    Close,
    Comma,
    Brackets,
}

/// Splits a type name into words, numbers and punctuation; `None` at any other character, so
/// quotes, semicolons, dollar signs and comment markers never get past this point.
fn tokens(name: &str) -> Option<Vec<Token>> {
    if name.len() > MAX_TYPE_NAME_BYTES {
        return None;
    }
    let b = name.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' => i += 1,
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b')' => {
                out.push(Token::Close);
                i += 1;
            }
            b',' => {
                out.push(Token::Comma);
                i += 1;
            }
            b'[' => {
                // `[]` or `[n]` (a declared bound Postgres ignores).
                let end = b[i..].iter().position(|&x| x == b']')? + i;
                if !b[i + 1..end].iter().all(u8::is_ascii_digit) {
                    return None;
                }
                out.push(Token::Brackets);
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(Token::Number(name[start..i].parse().ok()?));
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Token::Word(name[start..i].to_ascii_lowercase()));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Parses a type name as Postgres's `format_type` prints it (`character varying(20)`,
/// `timestamp(3) with time zone`, `numeric(12,2)[]`) or by its short alias (`varchar(20)`,
/// `timestamptz`, `int8`). `None` when the name is outside the grammar.
pub fn parse(name: &str) -> Option<NdcType> {
    let toks = tokens(name)?;
    let mut p = Parser { toks: &toks, at: 0 };
    let scalar = p.scalar()?;
    let mut dims = 0usize;
    while p.eat(&Token::Brackets) {
        dims += 1;
    }
    if p.at != toks.len() || dims > MAX_ARRAY_DIMS {
        return None;
    }
    Some(NdcType { scalar, dims: dims as u8 })
}

struct Parser<'a> {
    toks: &'a [Token],
    at: usize,
}

impl Parser<'_> {
    fn eat(&mut self, t: &Token) -> bool {
        if self.toks.get(self.at) == Some(t) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn word(&mut self, w: &str) -> bool {
        matches!(self.toks.get(self.at), Some(Token::Word(x)) if x == w) && {
            self.at += 1;
            true
        }
    }

    fn next_word(&mut self) -> Option<String> {
        match self.toks.get(self.at) {
            Some(Token::Word(w)) => {
                self.at += 1;
                Some(w.clone())
            }
            _ => None,
        }
    }

    /// `(n)` or `(n,m)` if present, each number within `range`; `Err` when malformed.
    fn modifiers(&mut self, max_args: usize) -> Result<Vec<i64>, ()> {
        if !self.eat(&Token::Open) {
            return Ok(Vec::new());
        }
        let mut args = Vec::new();
        loop {
            match self.toks.get(self.at) {
                Some(Token::Number(n)) => {
                    args.push(*n);
                    self.at += 1;
                }
                _ => return Err(()),
            }
            if self.eat(&Token::Close) {
                break;
            }
            if !self.eat(&Token::Comma) || args.len() >= max_args {
                return Err(());
            }
        }
        Ok(args)
    }

    fn precision(&mut self, max: i64) -> Option<Option<u8>> {
        match self.modifiers(1).ok()?.as_slice() {
            [] => Some(None),
            [p] if (0..=max).contains(p) => Some(Some(*p as u8)),
            _ => None,
        }
    }

    fn length(&mut self) -> Option<Option<u32>> {
        match self.modifiers(1).ok()?.as_slice() {
            [] => Some(None),
            [n] if (1..=MAX_CHAR_LENGTH).contains(n) => Some(Some(*n as u32)),
            _ => None,
        }
    }

    /// `with time zone` / `without time zone`, if present.
    fn zone(&mut self) -> Option<Option<bool>> {
        let tz = if self.word("with") {
            true
        } else if self.word("without") {
            false
        } else {
            return Some(None);
        };
        (self.word("time") && self.word("zone")).then_some(Some(tz))
    }

    /// Interval field restrictions (`year`, `day to second`, …), skipped: a plain interval holds them.
    fn interval_fields(&mut self) -> bool {
        const FIELDS: [&str; 6] = ["year", "month", "day", "hour", "minute", "second"];
        let field = |p: &mut Self| p.next_word().filter(|w| FIELDS.contains(&w.as_str())).is_some();
        let start = self.at;
        if !matches!(self.toks.get(self.at), Some(Token::Word(w)) if FIELDS.contains(&w.as_str())) {
            return true;
        }
        if !field(self) {
            self.at = start;
            return false;
        }
        if self.word("to") && !field(self) {
            return false;
        }
        true
    }

    fn scalar(&mut self) -> Option<Scalar> {
        let first = self.next_word()?;
        Some(match first.as_str() {
            "smallint" | "int2" => Scalar::Int2,
            "integer" | "int" | "int4" => Scalar::Int4,
            "bigint" | "int8" => Scalar::Int8,
            "real" | "float4" => Scalar::Float4,
            "float8" => Scalar::Float8,
            "double" => {
                if !self.word("precision") {
                    return None;
                }
                Scalar::Float8
            }
            "numeric" | "decimal" => match self.modifiers(2).ok()?.as_slice() {
                [] => Scalar::Numeric(None),
                [p] if (1..=MAX_NUMERIC_PRECISION).contains(p) => Scalar::Numeric(Some((*p as u16, 0))),
                [p, s]
                    if (1..=MAX_NUMERIC_PRECISION).contains(p)
                        && (-MAX_NUMERIC_PRECISION..=MAX_NUMERIC_PRECISION).contains(s) =>
                {
                    Scalar::Numeric(Some((*p as u16, *s as i16)))
                }
                _ => return None,
            },
            "text" => Scalar::Text,
            "varchar" => Scalar::Varchar(self.length()?),
            "character" | "char" | "bpchar" => {
                if self.word("varying") {
                    Scalar::Varchar(self.length()?)
                } else {
                    Scalar::Char(self.length()?)
                }
            }
            "boolean" | "bool" => Scalar::Bool,
            "date" => Scalar::Date,
            "time" | "timestamp" => {
                let precision = self.precision(MAX_TIME_PRECISION)?;
                let tz = self.zone()?.unwrap_or(false);
                if first == "time" {
                    Scalar::Time { precision, tz }
                } else {
                    Scalar::Timestamp { precision, tz }
                }
            }
            "timetz" => Scalar::Time { precision: self.precision(MAX_TIME_PRECISION)?, tz: true },
            "timestamptz" => Scalar::Timestamp { precision: self.precision(MAX_TIME_PRECISION)?, tz: true },
            "interval" => {
                if !self.interval_fields() {
                    return None;
                }
                Scalar::Interval(self.precision(MAX_TIME_PRECISION)?)
            }
            "bytea" => Scalar::Bytea,
            "json" => Scalar::Json,
            "jsonb" => Scalar::Jsonb,
            "uuid" => Scalar::Uuid,
            _ => return None,
        })
    }
}

/// A source name checked for use as an NDC identifier, quoted; the reason when it cannot be one.
pub fn ndc_ident(name: &str, what: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err(format!("the {what} name is empty"));
    }
    if name.contains('\0') {
        return Err(format!("the {what} name {:?} contains a NUL byte, which Postgres cannot store", name));
    }
    if name.len() > MAX_IDENT_BYTES {
        return Err(format!(
            "the {what} name {:?} is {} bytes long; Postgres keeps {MAX_IDENT_BYTES} and would truncate it",
            name.chars().take(40).collect::<String>(),
            name.len()
        ));
    }
    Ok(quote_ident(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(name: &str) -> Option<String> {
        parse(name).map(|t| t.to_string())
    }

    #[test]
    fn format_type_output_round_trips() {
        for name in [
            "smallint",
            "integer",
            "bigint",
            "real",
            "double precision",
            "numeric",
            "numeric(12,2)",
            "numeric(5,-2)",
            "text",
            "character varying",
            "character varying(20)",
            "character(12)",
            "boolean",
            "date",
            "time without time zone",
            "time(3) with time zone",
            "timestamp without time zone",
            "timestamp(6) with time zone",
            "interval",
            "interval(3)",
            "bytea",
            "json",
            "jsonb",
            "uuid",
            "integer[]",
            "character varying(5)[]",
            "timestamp with time zone[][]",
        ] {
            assert_eq!(sql(name).as_deref(), Some(name), "{name}");
        }
    }

    #[test]
    fn aliases_map_to_canonical_names() {
        assert_eq!(sql("int8").as_deref(), Some("bigint"));
        assert_eq!(sql("INT4").as_deref(), Some("integer"));
        assert_eq!(sql("varchar(9)").as_deref(), Some("character varying(9)"));
        assert_eq!(sql("timestamptz(3)").as_deref(), Some("timestamp(3) with time zone"));
        assert_eq!(sql("timetz").as_deref(), Some("time with time zone"));
        assert_eq!(sql("bpchar").as_deref(), Some("character"));
        assert_eq!(sql("decimal(10)").as_deref(), Some("numeric(10,0)"));
        assert_eq!(sql("interval day to second(2)").as_deref(), Some("interval(2)"));
        assert_eq!(sql("interval year to month").as_deref(), Some("interval"));
        assert_eq!(sql("int4[3]").as_deref(), Some("integer[]"));
    }

    #[test]
    fn hostile_and_unknown_names_are_outside_the_grammar() {
        for name in [
            "integer); DROP TABLE dongbo.applied_position; --",
            "text, evil text",
            "text DEFAULT (pg_sleep(10))",
            "text COLLATE \"C\"",
            "integer CHECK (false)",
            "$$; DELETE FROM dongbo.audit_log; $$",
            "text /* */",
            "text -- comment",
            "\"text\"",
            "public.text",
            "int4; SELECT 1",
            "numeric(1001,0)",
            "numeric(10,2,3)",
            "numeric(",
            "varchar(0)",
            "varchar(99999999999)",
            "time(7)",
            "character varying varying",
            "timestamp with zone",
            "integer[][][][][][][]",
            "int4[1;2]",
            "geometry",
            "citext",
            "point",
            "",
        ] {
            assert_eq!(parse(name), None, "{name:?}");
        }
        let col = |name: &str, oid| Column { name: "c".into(), type_name: name.into(), type_oid: oid };
        let pg = Dialect::Postgres;
        assert_eq!(column_type(&col("integer); DROP SCHEMA dongbo CASCADE; --", 23), pg), NdcType::TEXT);
        assert_eq!(column_type(&col("integer", 16400), pg), NdcType::TEXT, "user-defined oids land as text");
        assert_eq!(column_type(&col("numeric(12,2)", 1700), pg).to_string(), "numeric(12,2)");
    }

    #[test]
    fn identifiers_are_quoted_and_bounded() {
        assert_eq!(ndc_ident("a\"; DROP", "column").unwrap(), "\"a\"\"; DROP\"");
        assert!(ndc_ident("", "column").is_err());
        assert!(ndc_ident("a\0b", "column").unwrap_err().contains("NUL"));
        assert!(ndc_ident(&"x".repeat(64), "table").unwrap_err().contains("truncate"));
        assert!(ndc_ident(&format!("{}a", "ư".repeat(31)), "table").is_ok(), "63 bytes fit");
        assert!(ndc_ident(&"ư".repeat(32), "table").is_err(), "64 bytes do not");
    }

    #[test]
    fn mysql_names_map_to_types_that_hold_every_value() {
        let t = |n: &str| parse_mysql(n).map(|t| t.to_string());
        for (name, ndc) in [
            ("tinyint(1)", "smallint"),
            ("tinyint(3) unsigned", "smallint"),
            ("smallint(5) unsigned", "integer"),
            ("int(11)", "integer"),
            ("int(10) unsigned", "bigint"),
            ("bigint(20) unsigned zerofill", "numeric(20,0)"),
            ("decimal(12,2)", "numeric(12,2)"),
            ("decimal", "numeric(10,0)"),
            ("float", "real"),
            ("double", "double precision"),
            ("char(12)", "character varying(12)"),
            ("varchar(100)", "character varying(100)"),
            ("longtext", "text"),
            ("enum", "text"),
            ("varbinary(16)", "bytea"),
            ("bit(8)", "bytea"),
            ("date", "date"),
            ("datetime(6)", "timestamp(6) without time zone"),
            ("timestamp", "timestamp with time zone"),
            ("time(3)", "interval(3)"),
            ("year(4)", "smallint"),
            ("json", "jsonb"),
        ] {
            assert_eq!(t(name).as_deref(), Some(ndc), "{name}");
        }
        for hostile in
            ["int); DROP TABLE x; --", "enum('a','b')", "decimal(99,2)", "int unsigned unsigned x", "geometry"]
        {
            assert_eq!(t(hostile), None, "{hostile}");
        }
        let c = Column { name: "x".into(), type_name: "int(10) unsigned".into(), type_oid: 0 };
        assert_eq!(column_type(&c, Dialect::MySql).to_string(), "bigint");
        assert_eq!(column_type(&c, Dialect::Postgres), NdcType::TEXT, "a MySQL name is not a Postgres one");
    }
}
