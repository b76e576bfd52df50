//! Binlog file names ↔ [`BinlogPos`]: a server names its binlogs `<base>.<digits>`; positions keep
//! only the number, the base is asked of the server (`log_bin_basename`) when the source starts.

use crate::error::SourceError;
use crate::model::BinlogPos;

/// The server's binlog base name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogFiles {
    base: String,
}

impl BinlogFiles {
    /// From one of the server's binlog file names (`binlog.000003`).
    pub fn from_file_name(name: &str) -> Result<Self, SourceError> {
        let (base, digits) = split(name)?;
        let _ = digits;
        Ok(Self { base: base.to_string() })
    }

    /// The position `pos` in file `name`, which must be one of this server's binlogs.
    pub fn position(&self, name: &str, pos: u64) -> Result<BinlogPos, SourceError> {
        let (base, file) = split(name)?;
        if base != self.base {
            return Err(SourceError::Protocol(format!(
                "binlog file {name:?} does not belong to this server's binlog {:?}",
                self.base
            )));
        }
        Ok(BinlogPos { file, pos })
    }

    /// The file name of a position.
    pub fn file_name(&self, p: BinlogPos) -> String {
        format!("{}.{:06}", self.base, p.file)
    }
}

fn split(name: &str) -> Result<(&str, u32), SourceError> {
    let name = name.rsplit('/').next().unwrap_or(name);
    name.rsplit_once('.')
        .and_then(|(base, digits)| Some((base, digits.parse().ok()?)))
        .filter(|(base, _)| !base.is_empty())
        .ok_or_else(|| SourceError::Protocol(format!("binlog file name {name:?} is not <base>.<number>")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_positions() {
        let f = BinlogFiles::from_file_name("mysql-bin.000042").unwrap();
        let p = f.position("mysql-bin.000042", 1234).unwrap();
        assert_eq!(p, BinlogPos { file: 42, pos: 1234 });
        assert_eq!(f.file_name(p), "mysql-bin.000042");
        assert_eq!(f.file_name(BinlogPos { file: 1_234_567, pos: 4 }), "mysql-bin.1234567");
        assert!(f.position("other.000001", 4).is_err());
        assert!(BinlogFiles::from_file_name("nodots").is_err());
    }
}
