//! The MySQL/MariaDB source. So far: its configuration and `check` (the server's binlog settings,
//! the role's rights proved by opening a binlog stream, the tables, and how long the server keeps
//! its binlogs). Capture (a consistent snapshot without a global read lock, then the row-based
//! binlog) is the next step of issue 12; until then `run` refuses a MySQL source with that reason.
//!
//! The client is `mysql_async` with `mysql_common`'s binlog events: maintained, tokio-native,
//! rustls, and the binlog reader ReadySet and Materialize run in production; writing our own
//! binlog parser would buy nothing.

pub mod check;
pub mod config;

pub use self::config::MySqlConfig;
