//! How every dongbo connection to PostgreSQL is set up — the agent's query connection, its
//! replication connection and the hub's NDC connections — so they agree on what values look like.
//!
//! The text parsers ([`super::text`]) and the hub's `COPY` writer read and print temporal values as
//! ISO text in UTC, so every session runs with these settings; the replication walsender prints
//! its values with them too. TLS is set the same way for all three ([`super::tls`]).

use tokio_postgres::config::SslMode;

use super::tls::HandshakeError;
use crate::tls::DbTlsConfig;

/// Session settings of every connection: ISO dates, UTC, ISO 8601 intervals.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c intervalstyle=iso_8601";

/// Where and as whom to connect.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host name, address or Unix socket directory.
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// Role.
    pub user: &'a str,
    /// Database.
    pub database: &'a str,
    /// Password, if the server asks for one.
    pub password: Option<&'a str>,
    /// `application_name`, as `pg_stat_activity` shows it.
    pub application: &'a str,
    /// TLS to the server.
    pub tls: &'a DbTlsConfig,
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS settings cannot be used, or the server's certificate was refused: retrying will not
    /// help until the config or the certificate changes.
    #[error("TLS to {host}:{port}: {reason}")]
    Tls {
        /// The server.
        host: String,
        /// Its port.
        port: u16,
        /// What is wrong and what to change.
        reason: String,
    },
    /// The server or the link refused.
    #[error("{}", error_text(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// The whole of a client-library error, for messages: tokio-postgres prints a server error as just
/// "db error", so the server's SQLSTATE, message, detail and hint are added here.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return match std::error::Error::source(e) {
            Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
            _ => e.to_string(),
        };
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        text.push_str(&format!(" ({detail})"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// Opens a regular (query) connection to `t`, over TLS as `t.tls` asks, its driver task spawned on
/// the runtime (it logs, under `application`, when the connection ends).
pub async fn connect(t: &Target<'_>) -> Result<tokio_postgres::Client, ConnectError> {
    let tls_error = |reason: String| ConnectError::Tls { host: t.host.into(), port: t.port, reason };
    let mut config = query_config(t);
    let application = t.application.to_string();
    let ended = move |e: tokio_postgres::Error| tracing::warn!(error = %e, application, "Postgres connection ended");
    match t.tls.connector(t.host).map_err(|e| tls_error(e.0))? {
        None => {
            let (client, connection) = config.ssl_mode(SslMode::Disable).connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move { connection.await.map_err(ended) });
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = config.ssl_mode(SslMode::Require).connect(tls).await.map_err(|e| {
                match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<HandshakeError>()) {
                    Some(HandshakeError::Certificate(reason)) => tls_error(reason.clone()),
                    _ if e.to_string().contains("server does not support TLS") => tls_error(format!(
                        "the server does not accept TLS (ssl = off in postgresql.conf?) and tls.mode is {}; \
                         turn ssl on at the server, or set mode = \"disable\" only where the link cannot be overheard",
                        t.tls.mode_for(t.host).as_str()
                    )),
                    _ => ConnectError::Postgres(e),
                }
            })?;
            tokio::spawn(async move { connection.await.map_err(ended) });
            Ok(client)
        }
    }
}

/// A tokio-postgres config for a regular (query) connection to `t`.
pub fn query_config(t: &Target<'_>) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(t.host).port(t.port).user(t.user).dbname(t.database).application_name(t.application);
    c.options(SESSION_OPTIONS);
    if let Some(p) = t.password {
        c.password(p);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_connection_gets_the_session_settings_the_parsers_expect() {
        let tls = DbTlsConfig::default();
        let t = Target {
            host: "h",
            port: 5433,
            user: "u",
            database: "d",
            password: Some("p"),
            application: "dongbo-hub",
            tls: &tls,
        };
        let c = query_config(&t);
        assert_eq!(c.get_options(), Some(SESSION_OPTIONS));
        assert_eq!(c.get_application_name(), Some("dongbo-hub"));
        assert_eq!((c.get_ports(), c.get_user(), c.get_dbname()), (&[5433][..], Some("u"), Some("d")));
        assert_eq!(c.get_password(), Some(&b"p"[..]));
    }
}
