//! Logs. `RUST_LOG` filters them (default `info`); they go to standard error. Nothing logged
//! here or anywhere may carry a raw serial, caller secret or message body: keys appear as
//! their short hash.

/// Installs the log subscriber once; later calls do nothing.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
