//! Errors of sources, split by consequence: transient ones are retried with backoff by the agent's one
//! retry loop; definite ones stop capture and are reported, because retrying cannot fix them.

/// Why a source could not capture.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The network or the server went away; retrying later can succeed.
    #[error("connection to the source failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("source server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// A client-library error from the regular (non-replication) connection.
    #[error("source query failed: {}", crate::postgres::session::error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The server sent something this client does not understand.
    #[error("unexpected replication protocol data: {0}; this is a bug or an unsupported server version")]
    Protocol(String),
    /// The source is not set up as dongbo needs; the message says what to change.
    #[error("{0}")]
    Prerequisite(String),
    /// The TLS settings cannot be used or the server's certificate was refused.
    #[error("{0}")]
    Tls(String),
    /// A MySQL/MariaDB client error.
    #[error("MySQL/MariaDB source: {0}")]
    MySql(#[from] mysql_async::Error),
    /// The credentials were refused.
    #[error("authentication to the source failed: {0}; check user and password in the agent config")]
    Auth(String),
}

impl SourceError {
    /// Whether retrying later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io(_) => true,
            SourceError::Server { code, .. } => sqlstate_is_transient(code),
            SourceError::Query(e) => match e.code() {
                Some(code) => sqlstate_is_transient(code.code()),
                // No SQLSTATE: the connection broke or the socket failed.
                None => true,
            },
            SourceError::MySql(e) => mysql_is_transient(e),
            SourceError::Protocol(_) | SourceError::Prerequisite(_) | SourceError::Auth(_) | SourceError::Tls(_) => {
                false
            }
        }
    }
}

impl From<crate::postgres::session::ConnectError> for SourceError {
    fn from(e: crate::postgres::session::ConnectError) -> Self {
        match e {
            crate::postgres::session::ConnectError::Tls { .. } => SourceError::Tls(e.to_string()),
            crate::postgres::session::ConnectError::Postgres(e) => SourceError::Query(e),
        }
    }
}

/// MySQL errors of the moment: the link or server went away, or the server is busy; a refused
/// statement, purged binlog or denied access is definite.
fn mysql_is_transient(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(_) => true,
        mysql_async::Error::Driver(d) => {
            matches!(d, mysql_async::DriverError::ConnectionClosed | mysql_async::DriverError::PoolDisconnected)
        }
        // 1040 too many connections, 1053 shutdown, 1205 lock wait, 1213 deadlock, 1927 killed,
        // 2006/2013 gone away / lost.
        mysql_async::Error::Server(s) => matches!(s.code, 1040 | 1053 | 1205 | 1213 | 1927 | 2006 | 2013),
        _ => false,
    }
}

/// SQLSTATE classes that describe the moment, not the request: connection exceptions (08), transaction
/// rollbacks such as serialization failures (40), insufficient resources (53), lock or object in use
/// (55, e.g. a replication slot still active after a dropped link), operator intervention (57).
pub fn sqlstate_is_transient(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "55" | "57"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlstates_by_class() {
        assert!(sqlstate_is_transient("08006"));
        assert!(sqlstate_is_transient("55006"));
        assert!(!sqlstate_is_transient("42P01"));
        assert!(!sqlstate_is_transient("28P01"));
        let e = SourceError::Server { code: "57P01".into(), message: "terminating".into() };
        assert!(e.is_transient());
        assert!(!SourceError::Prerequisite("wal_level".into()).is_transient());
    }
}
