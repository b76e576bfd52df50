//! How much binlog the server keeps for an agent, and for how long at least: the server purges
//! binlog files by age (`binlog_expire_logs_seconds`, or MariaDB's older `expire_logs_days`), not
//! by reader, so an agent whose spool is full or whose capture is stopped loses changes once the
//! file holding its position is purged.

use mysql_async::prelude::Queryable;

use super::config::MySqlConfig;
use super::position::BinlogFiles;
use crate::error::SourceError;
use crate::model::BinlogPos;
use crate::source::RetainedLog;

/// Seconds the server keeps a binlog file after its last write; 0 when it keeps them until purged
/// by hand.
pub async fn expire_seconds(conn: &mut mysql_async::Conn) -> Result<u64, mysql_async::Error> {
    let expire: Option<u64> = match conn.query_first::<u64, _>("SELECT @@binlog_expire_logs_seconds").await {
        Ok(v) => v,
        Err(_) => conn.query_first::<f64, _>("SELECT @@expire_logs_days").await?.map(|d| (d * 86_400.0) as u64),
    };
    Ok(expire.unwrap_or(0))
}

/// The binlog kept from `at` (where the agent's spool resumes) to the server's end, and how long
/// the file of `at` is kept at least: its last write is no older than `newest_commit_s` (the
/// newest change the agent read, Unix seconds), and the file being written is never purged.
pub async fn retained_log(
    config: &MySqlConfig,
    at: BinlogPos,
    newest_commit_s: Option<f64>,
    now_s: f64,
) -> Result<RetainedLog, SourceError> {
    let opts = config.opts().map_err(SourceError::Prerequisite)?;
    let mut conn = mysql_async::Conn::new(opts).await?;
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await?;
    let expire = expire_seconds(&mut conn).await?;
    let _ = conn.disconnect().await;
    let files: Vec<(String, u64)> =
        logs.iter().filter_map(|r| Some((r.get::<String, usize>(0)?, r.get::<u64, usize>(1)?))).collect();
    let Some((first, _)) = files.first() else {
        return Err(SourceError::Prerequisite("the server lists no binlogs".into()));
    };
    let names = BinlogFiles::from_file_name(first)?;
    let mut retained = 0u64;
    let mut last_file = at.file;
    for (name, size) in &files {
        let p = names.position(name, 0)?;
        last_file = last_file.max(p.file);
        if p.file > at.file {
            retained += size;
        } else if p.file == at.file {
            retained += size.saturating_sub(at.pos);
        }
    }
    Ok(RetainedLog {
        retained_bytes: retained,
        headroom_bytes: None,
        headroom_s: headroom(expire, at, last_file, newest_commit_s, now_s),
    })
}

/// See [`retained_log`]: `None` when binlogs are kept until purged by hand, or when nothing says
/// how old the file of `at` is.
fn headroom(expire: u64, at: BinlogPos, last_file: u32, newest_commit_s: Option<f64>, now_s: f64) -> Option<f64> {
    if expire == 0 {
        return None;
    }
    if at.file >= last_file {
        return Some(expire as f64);
    }
    newest_commit_s.map(|c| (expire as f64 - (now_s - c)).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_counts_down_once_the_position_is_left_behind() {
        let at = BinlogPos { file: 3, pos: 100 };
        assert_eq!(headroom(0, at, 5, Some(0.0), 1e6), None, "kept until purged by hand");
        assert_eq!(headroom(86_400, at, 3, None, 1e6), Some(86_400.0), "the file being written");
        assert_eq!(headroom(86_400, at, 5, Some(1e6 - 3600.0), 1e6), Some(82_800.0));
        assert_eq!(headroom(86_400, at, 5, Some(0.0), 1e6), Some(0.0));
        assert_eq!(headroom(86_400, at, 5, None, 1e6), None);
    }
}
