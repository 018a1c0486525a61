//! `idemproxy keys export`: every record the store holds, for reconciliation against the
//! service's own books. It asks `ListRecords` for one page after another and writes each page
//! to standard output as it arrives, so neither the sidecar (which reads its store a page at
//! a time with `Store::scan`) nor this command holds more than one page, however many records
//! there are.
//!
//! One JSON object a line, or one CSV row (after a header row, quoted as RFC 4180 says, lines
//! ending in LF): key hash, method, caller, state, status code, created, completed, expires;
//! times in RFC 3339 UTC to the millisecond (the precision records keep), empty when unset.
//! The serial only with `--with-serial`, and only where the record keeps one (a method with
//! an in-doubt probe). Never a response's bytes: the admin API gives none, only the status
//! code, so a sealed record's plaintext is never printed, with or without the key.

use super::{authorized, Failure};
use crate::pb::idemproxy::v1 as pb;
use crate::pb::idemproxy::v1::admin_client::AdminClient;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

/// How the records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object a line.
    Jsonl,
    /// Comma-separated values, with a header row.
    Csv,
}

/// `keys export`: filters, format, and whether serials are shown.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only records created at or after this: an RFC 3339 time in UTC
    /// (2026-11-23T03:00:00Z) or a duration ago by this machine's clock (e.g. 2h).
    #[arg(long)]
    since: Option<String>,
    /// IN_FLIGHT, COMPLETED or IN_DOUBT (either case).
    #[arg(long)]
    state: Option<String>,
    /// jsonl or csv.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Add each record's serial, where it keeps one (a method with an in-doubt probe); the
    /// sidecar logs that serials were read.
    #[arg(long)]
    with_serial: bool,
    /// Records asked for in one request (1-1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
}

/// The columns, in order (`serial` last, with `--with-serial`).
const COLUMNS: [&str; 8] = [
    "key_hash",
    "method",
    "caller",
    "state",
    "status",
    "created",
    "completed",
    "expires",
];

/// Writes every matching record to standard output, a page at a time.
pub async fn run(
    client: &mut AdminClient<Channel>,
    token: &Option<String>,
    args: ExportArgs,
) -> Result<(), Failure> {
    let created_since_ms = match &args.since {
        Some(text) => since_ms(text, SystemTime::now()).map_err(Failure::Usage)?,
        None => 0,
    };
    let mut request = pb::ListRecordsRequest {
        state: args.state.unwrap_or_default().to_ascii_uppercase(),
        created_since_ms,
        with_serial: args.with_serial,
        page_size: args.page_size,
        ..pb::ListRecordsRequest::default()
    };
    let mut text = String::new();
    if args.format == Format::Csv {
        let mut header = COLUMNS.to_vec();
        if args.with_serial {
            header.push("serial");
        }
        text = header.join(",") + "\n";
    }
    loop {
        let page = client
            .list_records(authorized(request.clone(), token))
            .await?
            .into_inner();
        for record in &page.records {
            match args.format {
                Format::Jsonl => json_line(&mut text, record, args.with_serial),
                Format::Csv => csv_row(&mut text, record, args.with_serial),
            }
        }
        // Out before the next page is asked for: the export never holds more than one.
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(Failure::Output)?;
        text.clear();
        // A filtered page may be short, or empty, and still not be the last.
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        request.page_token = page.next_page_token;
    }
}

/// `--since`: a duration ago (from `now`), or an RFC 3339 time in UTC; in ms since the epoch.
fn since_ms(text: &str, now: SystemTime) -> Result<u64, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.checked_sub(ago).map_or(0, epoch_ms));
    }
    humantime::parse_rfc3339(text).map(epoch_ms).map_err(|error| {
        format!(
            "--since {text:?}: write a duration ago (2h) or an RFC 3339 time in UTC (2026-11-23T03:00:00Z): {error}"
        )
    })
}

fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `ms` since the epoch in RFC 3339 UTC to the millisecond; `None` for 0 (not set).
fn time(ms: u64) -> Option<String> {
    (ms != 0).then(|| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

/// The serial of a listing that asked for it; `None` where the record keeps none.
fn serial(record: &pb::RecordView) -> Option<&str> {
    (!record.serial.is_empty()).then_some(record.serial.as_str())
}

fn json_line(out: &mut String, record: &pb::RecordView, with_serial: bool) {
    let mut line = serde_json::json!({
        "key_hash": record.key_hash,
        "method": record.method,
        "caller": record.caller,
        "state": record.state,
        "status": record.grpc_status,
        "created": time(record.created_ms),
        "completed": time(record.completed_ms),
        "expires": time(record.expires_ms),
    });
    if with_serial {
        line["serial"] = serial(record).into();
    }
    out.push_str(&line.to_string());
    out.push('\n');
}

fn csv_row(out: &mut String, record: &pb::RecordView, with_serial: bool) {
    let status = record.grpc_status.map(|code| code.to_string());
    let mut fields = vec![
        Some(record.key_hash.as_str()),
        Some(record.method.as_str()),
        Some(record.caller.as_str()),
        Some(record.state.as_str()),
        status.as_deref(),
    ];
    let times = [record.created_ms, record.completed_ms, record.expires_ms].map(time);
    fields.extend(times.iter().map(Option::as_deref));
    if with_serial {
        fields.push(serial(record));
    }
    for (at, field) in fields.into_iter().enumerate() {
        if at > 0 {
            out.push(',');
        }
        csv_field(out, field.unwrap_or(""));
    }
    out.push('\n');
}

/// One CSV field: quoted, its quotes doubled, when it holds a comma, a quote or a line break
/// (a caller is any visible ASCII, spaces and commas included).
fn csv_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> pb::RecordView {
        pb::RecordView {
            key_hash: "ab".repeat(32),
            state: "COMPLETED".into(),
            method: "/p.S/M".into(),
            caller: "billing, \"eu\"".into(),
            created_ms: 1_700_000_000_123,
            completed_ms: 1_700_000_000_456,
            expires_ms: 1_700_086_400_123,
            grpc_status: Some(0),
            serial: "order-1".into(),
            ..pb::RecordView::default()
        }
    }

    #[test]
    fn a_row_quotes_what_would_split_it_and_shows_no_serial_unless_asked() {
        let mut row = String::new();
        csv_row(&mut row, &view(), false);
        assert_eq!(
            row,
            format!(
                "{},/p.S/M,\"billing, \"\"eu\"\"\",COMPLETED,0,2023-11-14T22:13:20.123Z,2023-11-14T22:13:20.456Z,2023-11-15T22:13:20.123Z\n",
                "ab".repeat(32)
            )
        );
        let mut with = String::new();
        csv_row(&mut with, &view(), true);
        assert!(with.ends_with(",order-1\n"), "{with}");
    }

    #[test]
    fn a_line_has_null_for_what_is_unset() {
        let mut record = view();
        record.grpc_status = None;
        record.completed_ms = 0;
        record.serial.clear();
        let mut line = String::new();
        json_line(&mut line, &record, true);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["status"], serde_json::Value::Null);
        assert_eq!(parsed["completed"], serde_json::Value::Null);
        assert_eq!(parsed["serial"], serde_json::Value::Null);
        assert_eq!(parsed["created"], "2023-11-14T22:13:20.123Z");
        let mut without = String::new();
        json_line(&mut without, &view(), false);
        assert!(!without.contains("serial"), "{without}");
    }

    #[test]
    fn since_takes_a_time_in_utc_or_a_duration_ago() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        assert_eq!(since_ms("2h", now), Ok(1_700_000_000_000 - 7_200_000));
        assert_eq!(
            since_ms("2023-11-14T22:13:20.5Z", now),
            Ok(1_700_000_000_500)
        );
        assert!(since_ms("2023-11-14T22:13:20+02:00", now).is_err());
        assert!(since_ms("yesterday", now).unwrap_err().contains("RFC 3339"));
    }
}
