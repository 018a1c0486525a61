//! The PostgreSQL store's settings, checked (issue 32 item 1): the URL as libpq writes it
//! (a URL or `key=value` words, several hosts, `target_session_attrs`), `sslmode` up to
//! `verify-full`, the password from elsewhere than the URL. Nothing here connects.

use super::{tls, POLL_INTERVAL};
use std::time::Duration;

/// How to reach PostgreSQL, checked.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The connection settings (hosts, database, user, password, `sslmode`).
    pub config: tokio_postgres::Config,
    /// How the server's certificate is checked.
    pub verify: tls::Verify,
    /// PEM roots for `verify-ca`/`verify-full` instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// The records table, `table` or `schema.table`.
    pub table: String,
    /// Longest wait for one statement, connecting included; past it the call fails closed.
    pub command_timeout: Duration,
    /// Not ready while the primary has no synchronous standby.
    pub require_sync_replica: bool,
    /// How often a waiting duplicate reads its record again when no notification came
    /// (`POLL_INTERVAL`; tests make it long to see the notifications alone).
    pub poll_interval: Duration,
}

impl PostgresOptions {
    /// Checked options from the settings; the error says what is wrong with the URL.
    pub fn new(
        url: &str,
        password: Option<String>,
        ca_pem: Option<Vec<u8>>,
        table: &str,
        command_timeout: Duration,
        require_sync_replica: bool,
    ) -> Result<PostgresOptions, String> {
        let (url, verify) = tls::split_sslmode(url, ca_pem.is_some());
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|error: tokio_postgres::Error| {
                format!("{error}: write a postgres:// URL or libpq's key=value form")
            })?;
        if config.get_hosts().is_empty() {
            return Err("it names no host".into());
        }
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(command_timeout);
        }
        config.application_name("idemproxy");
        Ok(PostgresOptions {
            config,
            verify,
            ca_pem,
            table: table.to_owned(),
            command_timeout,
            require_sync_replica,
            poll_interval: POLL_INTERVAL,
        })
    }
}
