//! `idemproxy keys`: the operators' command line over the admin API. A table for people,
//! `--json` for scripts, and exit codes scripts can branch on:
//! 0 done, 1 no such record, 2 bad request, 3 admin API unreachable or store unavailable,
//! 4 the record is not in a state that allows it, 5 refused (token) or anything else (an
//! export's output that cannot be written). `export.rs` is `keys export`.

mod export;

use crate::pb::idemproxy::v1 as pb;
use crate::pb::idemproxy::v1::admin_client::AdminClient;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tonic::transport::Channel;

/// `idemproxy keys` and its flags.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The sidecar's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:16091",
        env = "IDEMPROXY_ADMIN"
    )]
    admin: String,
    /// File holding the admin bearer token (or set IDEMPROXY_ADMIN_TOKEN).
    #[arg(long, global = true, env = "IDEMPROXY_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA bundle that an `https://` admin address's certificate must chain to.
    #[arg(long, global = true, env = "IDEMPROXY_ADMIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: KeysCommand,
}

/// Names one record: its key hash, or the call's method, caller and serial.
#[derive(Debug, Args)]
pub struct Which {
    /// The key hash (64 hex digits), as logs and `keys ls` show it.
    #[arg(long, conflicts_with_all = ["method", "caller", "serial"])]
    key_hash: Option<String>,
    /// The call's method, /package.Service/Method.
    #[arg(long, requires = "serial")]
    method: Option<String>,
    /// The call's caller [default: "-", the anonymous caller].
    #[arg(long)]
    caller: Option<String>,
    /// The call's serial (hashed by the sidecar; never stored).
    #[arg(long, requires = "method")]
    serial: Option<String>,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Show one record.
    Get(Which),
    /// List records, newest pages first in the store's order, with filters.
    Ls(ListArgs),
    /// Settle an IN_DOUBT record: forget it (a retry runs again) or record its outcome.
    Resolve(ResolveArgs),
    /// Delete one record (never a running one), or every expired record.
    Purge {
        #[command(flatten)]
        which: Which,
        /// Delete every expired record instead.
        #[arg(long)]
        all_expired: bool,
        /// Who does it (written to the sidecar's log).
        #[arg(long, default_value = "")]
        operator: String,
    },
    /// Counts per state and what the store holds.
    Stats,
    /// Every record, a line (JSON) or a row (CSV) each, for reconciliation: written a page at
    /// a time as the pages arrive; never a recorded response, only its status code.
    Export(export::ExportArgs),
}

/// `keys ls`: filters and paging.
#[derive(Debug, Args)]
struct ListArgs {
    /// IN_FLIGHT, COMPLETED or IN_DOUBT (either case).
    #[arg(long)]
    state: Option<String>,
    /// Only this method.
    #[arg(long)]
    method: Option<String>,
    /// Only this caller.
    #[arg(long)]
    caller: Option<String>,
    /// Only IN_DOUBT records waiting for this: `operator` (no probe will settle them: resolve
    /// them) or `probe`.
    #[arg(long)]
    waiting_for: Option<String>,
    /// Only records at least this old (e.g. 10m).
    #[arg(long)]
    older_than: Option<String>,
    /// Records per page (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Continue from a previous page.
    #[arg(long)]
    page_token: Option<String>,
}

/// `keys resolve`: which record, and how it is settled.
#[derive(Debug, Args)]
struct ResolveArgs {
    #[command(flatten)]
    which: Which,
    /// Forget the call: the next retry executes it.
    #[arg(long, conflicts_with = "complete")]
    forget: bool,
    /// Record this gRPC status (1-16) as the call's outcome, replayed to retries.
    #[arg(long)]
    complete: Option<u32>,
    /// The status message to record with --complete.
    #[arg(long, default_value = "")]
    message: String,
    /// Who decides (written to the sidecar's log).
    #[arg(long)]
    operator: String,
    /// Why (written to the sidecar's log).
    #[arg(long, default_value = "")]
    reason: String,
}

fn selector(which: Which) -> Result<pb::KeySelector, String> {
    use pb::key_selector::Key;
    let key = match which {
        Which {
            key_hash: Some(hash),
            ..
        } => Key::KeyHash(hash),
        Which {
            method: Some(method),
            serial: Some(serial),
            caller,
            ..
        } => Key::Call(pb::CallKey {
            method,
            caller: caller.unwrap_or_else(|| crate::key::ANONYMOUS_CALLER.to_owned()),
            serial,
        }),
        _ => return Err("name the record: --key-hash, or --method and --serial".into()),
    };
    Ok(pb::KeySelector { key: Some(key) })
}

fn exit_code(status: &tonic::Status) -> u8 {
    match status.code() {
        tonic::Code::NotFound => 1,
        tonic::Code::InvalidArgument => 2,
        tonic::Code::Unavailable => 3,
        tonic::Code::FailedPrecondition => 4,
        _ => 5,
    }
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn record_json(record: &pb::RecordView) -> serde_json::Value {
    serde_json::json!({
        "key_hash": record.key_hash,
        "state": record.state,
        "method": record.method,
        "caller": record.caller,
        "created_ms": record.created_ms,
        "completed_ms": record.completed_ms,
        "expires_ms": record.expires_ms,
        "lease_until_ms": record.lease_until_ms,
        "grpc_status": record.grpc_status,
        "response_bytes": record.response_bytes,
        "response_not_kept": record.response_not_kept,
        "fingerprint": record.fingerprint,
        "in_doubt_reason": record.in_doubt_reason,
        "trace_id": record.trace_id,
        "resolved_by": record.resolved_by,
        "probes": record.probes,
        "next_probe_ms": record.next_probe_ms,
        "waiting_for": record.waiting_for,
    })
}

fn record_text(record: &pb::RecordView, serial: Option<&str>) -> String {
    let status = record
        .grpc_status
        .map_or("-".to_owned(), |code| code.to_string());
    let mut lines = vec![
        format!("key hash     {}", record.key_hash),
        format!("state        {}", record.state),
        format!("method       {}", record.method),
        format!("caller       {}", record.caller),
    ];
    if let Some(serial) = serial {
        lines.push(format!("serial       {serial}"));
    }
    lines.extend([
        format!("created      {}", time(record.created_ms)),
        format!("completed    {}", time(record.completed_ms)),
        format!("expires      {}", time(record.expires_ms)),
        format!("lease until  {}", time(record.lease_until_ms)),
        format!("grpc-status  {status}"),
        format!(
            "response     {} bytes{}",
            record.response_bytes,
            if record.response_not_kept {
                " (not kept: too large)"
            } else {
                ""
            }
        ),
        format!("fingerprint  {}", record.fingerprint),
    ]);
    if !record.resolved_by.is_empty() {
        lines.push(format!(
            "resolved by  {} (the service's lookup)",
            record.resolved_by
        ));
    }
    if record.probes > 0 {
        lines.push(format!(
            "probes       {} sent, next not before {}",
            record.probes,
            time(record.next_probe_ms)
        ));
    }
    match record.waiting_for.as_str() {
        "operator" => lines.push(
            "waiting for  an operator (idemproxy keys resolve): no probe will settle it".into(),
        ),
        "probe" => lines.push("waiting for  a probe (the service's lookup)".into()),
        _ => {}
    }
    if !record.trace_id.is_empty() {
        lines.push(format!("trace        {}", record.trace_id));
    }
    if !record.in_doubt_reason.is_empty() {
        lines.push(format!("in doubt     {}", record.in_doubt_reason));
    }
    lines.join("\n")
}

async fn connect(args: &KeysArgs) -> Result<(AdminClient<Channel>, Option<String>), String> {
    let address = if args.admin.contains("://") {
        args.admin.clone()
    } else {
        format!("http://{}", args.admin)
    };
    let token = match &args.token_file {
        Some(path) => Some(
            crate::files::read_text(path, crate::files::SECRET_BYTES_MAX)
                .map_err(|error| format!("--token-file {}: {error}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("IDEMPROXY_ADMIN_TOKEN").ok(),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(address.clone())
        .map_err(|error| format!("--admin {address}: {error}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if address.starts_with("https://") {
        endpoint = endpoint
            .tls_config(verified_by(args.ca_file.as_deref())?)
            .map_err(|error| format!("--admin {address}: {error}"))?;
    } else if args.ca_file.is_some() {
        return Err(format!(
            "--ca-file is for an https:// admin address; --admin {address} is plaintext"
        ));
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("cannot reach the admin API at {address}: {error}"))?;
    Ok((AdminClient::new(channel), token))
}

/// The TLS of `keys`: the admin API's certificate must chain to the CA in `ca_file`.
fn verified_by(
    ca_file: Option<&std::path::Path>,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    let Some(path) = ca_file else {
        return Err(
            "an https:// admin address needs --ca-file: the CA its certificate chains to".into(),
        );
    };
    let pem = crate::files::read(path, crate::files::TEXT_BYTES_MAX)
        .map_err(|error| format!("--ca-file {}: {error}", path.display()))?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem)))
}

fn authorized<T>(message: T, token: &Option<String>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
    }
    request
}

/// Runs `idemproxy keys ...`, printing to stdout (errors to stderr).
pub async fn run(args: KeysArgs) -> ExitCode {
    let (mut client, token) = match connect(&args).await {
        Ok(connected) => connected,
        Err(error) => {
            eprintln!("idemproxy keys: {error}");
            return ExitCode::from(3);
        }
    };
    let json = args.json;
    let outcome = execute(&mut client, &token, args.command, json).await;
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("idemproxy keys: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Status(status)) => {
            eprintln!("idemproxy keys: {}: {}", status.code(), status.message());
            ExitCode::from(exit_code(&status))
        }
        // The reader went away (`| head`): it has what it wanted.
        Err(Failure::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(Failure::Output(error)) => {
            eprintln!("idemproxy keys: cannot write the output: {error}");
            ExitCode::from(5)
        }
    }
}

enum Failure {
    Usage(String),
    Status(tonic::Status),
    /// Standard output could not be written.
    Output(std::io::Error),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure::Status(status)
    }
}

async fn execute(
    client: &mut AdminClient<Channel>,
    token: &Option<String>,
    command: KeysCommand,
    json: bool,
) -> Result<Option<String>, Failure> {
    let one = |record: &pb::RecordView, serial: Option<&str>| {
        if json {
            record_json(record).to_string()
        } else {
            record_text(record, serial)
        }
    };
    let output = match command {
        KeysCommand::Get(which) => {
            let serial = which.serial.clone();
            let key = selector(which).map_err(Failure::Usage)?;
            let request = pb::GetRecordRequest { key: Some(key) };
            let record = client
                .get_record(authorized(request, token))
                .await?
                .into_inner();
            one(&record, serial.as_deref())
        }
        KeysCommand::Ls(args) => {
            let request = list_request(args)?;
            let page = client
                .list_records(authorized(request, token))
                .await?
                .into_inner();
            list_text(&page, json)
        }
        KeysCommand::Resolve(args) => {
            let request = resolve_request(args)?;
            let record = client
                .resolve_record(authorized(request, token))
                .await?
                .into_inner();
            one(&record, None)
        }
        KeysCommand::Purge {
            which,
            all_expired,
            operator,
        } => {
            use pb::purge_records_request::Target;
            let target = if all_expired {
                Target::AllExpired(true)
            } else {
                Target::Key(selector(which).map_err(Failure::Usage)?)
            };
            let request = pb::PurgeRecordsRequest {
                target: Some(target),
                operator,
            };
            let purged = client
                .purge_records(authorized(request, token))
                .await?
                .into_inner();
            if json {
                serde_json::json!({ "purged": purged.purged }).to_string()
            } else {
                format!("purged {} record(s)", purged.purged)
            }
        }
        KeysCommand::Stats => {
            let stats = client
                .get_stats(authorized(pb::GetStatsRequest {}, token))
                .await?
                .into_inner();
            stats_text(&stats, json)
        }
        // Written as it comes, page by page, never gathered into one output.
        KeysCommand::Export(args) => {
            export::run(client, token, args).await?;
            return Ok(None);
        }
    };
    Ok(Some(output))
}

/// The `ListRecords` request of `keys ls`.
fn list_request(args: ListArgs) -> Result<pb::ListRecordsRequest, Failure> {
    let ListArgs {
        state,
        method,
        caller,
        waiting_for,
        older_than,
        limit,
        page_token,
    } = args;
    let older_than_ms = match older_than {
        Some(text) => humantime::parse_duration(&text)
            .map_err(|error| Failure::Usage(format!("--older-than {text:?}: {error}")))?
            .as_millis() as u64,
        None => 0,
    };
    Ok(pb::ListRecordsRequest {
        // The API takes the states' names as written; people type them either way.
        state: state.unwrap_or_default().to_ascii_uppercase(),
        method: method.unwrap_or_default(),
        caller: caller.unwrap_or_default(),
        older_than_ms,
        page_size: limit,
        page_token: page_token.unwrap_or_default(),
        waiting_for: waiting_for.unwrap_or_default().to_ascii_lowercase(),
        // `keys export` asks for these.
        created_since_ms: 0,
        with_serial: false,
    })
}

/// The `ResolveRecord` request of `keys resolve`: forget, or complete with a status.
fn resolve_request(args: ResolveArgs) -> Result<pb::ResolveRecordRequest, Failure> {
    use pb::resolve_record_request::Resolution;
    let ResolveArgs {
        which,
        forget,
        complete,
        message,
        operator,
        reason,
    } = args;
    let resolution = match (forget, complete) {
        (true, None) => Resolution::Forget(pb::Forget {}),
        (false, Some(code)) => Resolution::Complete(pb::Complete {
            grpc_status: code,
            grpc_message: message,
        }),
        _ => return Err(Failure::Usage("choose --forget or --complete CODE".into())),
    };
    Ok(pb::ResolveRecordRequest {
        key: Some(selector(which).map_err(Failure::Usage)?),
        resolution: Some(resolution),
        operator,
        reason,
    })
}

/// `keys stats` as JSON or as lines.
fn stats_text(stats: &pb::Stats, json: bool) -> String {
    if json {
        return serde_json::json!({
            "backend": stats.backend,
            "records": stats.records,
            "in_flight": stats.in_flight,
            "completed": stats.completed,
            "in_doubt": stats.in_doubt,
            "store_bytes": stats.store_bytes,
            "oldest_created_ms": stats.oldest_created_ms,
        })
        .to_string();
    }
    format!(
        "backend      {}\nrecords      {}\nin flight    {}\ncompleted    {}\nin doubt     {}\nstore bytes  {}\noldest       {}",
        stats.backend,
        stats.records,
        stats.in_flight,
        stats.completed,
        stats.in_doubt,
        stats.store_bytes,
        time(stats.oldest_created_ms)
    )
}

fn list_text(page: &pb::ListRecordsResponse, json: bool) -> String {
    if json {
        let records: Vec<_> = page.records.iter().map(record_json).collect();
        return serde_json::json!({
            "records": records,
            "next_page_token": page.next_page_token,
        })
        .to_string();
    }
    let mut out = format!(
        "{:<16} {:<10} {:<40} {:<16} {:<6} {:<8} {}",
        "key hash", "state", "method", "caller", "status", "waits", "created"
    );
    for record in &page.records {
        let status = record
            .grpc_status
            .map_or("-".to_owned(), |code| code.to_string());
        out.push_str(&format!(
            "\n{:<16} {:<10} {:<40} {:<16} {:<6} {:<8} {}",
            &record.key_hash[..16.min(record.key_hash.len())],
            record.state,
            record.method,
            record.caller,
            status,
            if record.waiting_for.is_empty() {
                "-"
            } else {
                &record.waiting_for
            },
            time(record.created_ms)
        ));
    }
    if !page.next_page_token.is_empty() {
        out.push_str(&format!("\nmore: --page-token {}", page.next_page_token));
    }
    out
}
