//! How every dongbo connection to PostgreSQL is set up — the agent's query connection, its
//! replication connection and the hub's NDC connections — so they agree on what values look like.
//!
//! The text parsers ([`super::text`]) and the hub's `COPY` writer read and print temporal values as
//! ISO text in UTC, so every session runs with these settings; the replication walsender prints
//! its values with them too. TLS (`sslmode`, CA file) is to be added here, for all three at once.

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
        let t =
            Target { host: "h", port: 5433, user: "u", database: "d", password: Some("p"), application: "dongbo-hub" };
        let c = query_config(&t);
        assert_eq!(c.get_options(), Some(SESSION_OPTIONS));
        assert_eq!(c.get_application_name(), Some("dongbo-hub"));
        assert_eq!((c.get_ports(), c.get_user(), c.get_dbname()), (&[5433][..], Some("u"), Some("d")));
        assert_eq!(c.get_password(), Some(&b"p"[..]));
    }
}
