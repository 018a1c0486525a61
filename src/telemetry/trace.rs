//! Spans for calls, W3C trace context in and out, and log lines that carry their trace.
//!
//! Spans exist only while traces are exported (`enable`): with none configured, a call
//! builds no span at all, so it pays nothing for tracing. Only spans of `SPAN_TARGET` are
//! exported. The incoming `traceparent`/`tracestate` make the SERVER span's parent, and the
//! CLIENT span's context replaces them on the way to the service, so the service's own spans
//! join the same trace.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The target of every exported span.
pub const SPAN_TARGET: &str = "idemproxy::rpc";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span creation on (done once, when the span exporter is installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether calls get spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A gRPC path's span name, `rpc.service` and `rpc.method`:
/// `/pkg.Svc/M` → (`pkg.Svc/M`, `pkg.Svc`, `M`).
fn rpc_names(path: &str) -> (&str, &str, &str) {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    (name, service, method)
}

/// The SERVER span of one call: named `package.Service/Method` with the RPC semantic
/// conventions' attributes, its parent the caller's `traceparent`. `Span::none()` when
/// traces are off.
pub fn server_span(
    path: &str,
    authority: Option<&http::uri::Authority>,
    headers: &HeaderMap,
    peer: Option<std::net::SocketAddr>,
    backend: &'static str,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let (name, service, method) = rpc_names(path);
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "rpc.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        client.address = peer.map(|p| p.ip().to_string()),
        client.port = peer.map(|p| p.port()),
        server.address = Empty,
        server.port = Empty,
        idemproxy.decision = Empty,
        idemproxy.key.hash = Empty,
        idemproxy.store.backend = backend,
    );
    if let Some(authority) = authority {
        span.record("server.address", authority.host());
        if let Some(port) = authority.port_u16() {
            span.record("server.port", port);
        }
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
    remember_ids(&span);
    span
}

/// The CLIENT span of the call to the service, a child of the current span; its context
/// replaces the request's `traceparent`/`tracestate`. Without traces, the headers pass as
/// they came.
pub fn client_span(path: &str, authority: &str, headers: &mut HeaderMap) -> Span {
    if !enabled() {
        return Span::none();
    }
    let (name, service, method) = rpc_names(path);
    let (address, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "rpc.client",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        server.address = address,
        server.port = port.parse::<u16>().ok(),
    );
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
    // New with every call: kept out of the connection's HPACK table, as the key is
    // (`proxy::never_indexed`).
    if let Some(traceparent) = headers.get_mut("traceparent") {
        traceparent.set_sensitive(true);
    }
    remember_ids(&span);
    span
}

/// Names the key of the current call on its span (the key's hash, never the serial).
pub fn record_key(key: &crate::key::Key) {
    if enabled() {
        Span::current().record("idemproxy.key.hash", key.hex());
    }
}

/// The current span to carry into a spawned task, or `Span::none()` without a lookup when
/// traces are off.
pub fn current() -> Span {
    if enabled() {
        Span::current()
    } else {
        Span::none()
    }
}

/// An INTERNAL span for one store operation (`claim`, `complete`, ...).
pub fn store_span(operation: &'static str, backend: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: SPAN_TARGET,
        "store",
        otel.name = format!("idemproxy.store.{operation}"),
        otel.kind = "internal",
        otel.status_code = Empty,
        idemproxy.store.backend = backend,
        idemproxy.store.operation = operation,
    )
}

/// The INTERNAL span of one in-doubt probe (issue 34) of a call of `method`, linked to that
/// call's span (`origin`, as its record keeps it). A duplicate's probe is a child of the
/// duplicate's span; the walk's starts a trace of its own. The probe's CLIENT span to the
/// service is its child.
pub fn probe_span(method: &str, probe: &str, origin: &[u8]) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "probe",
        otel.name = "idemproxy.probe",
        otel.kind = "internal",
        otel.status_code = Empty,
        idemproxy.probe.of = method,
        idemproxy.probe.method = probe,
        idemproxy.probe.answer = Empty,
    );
    link_to_origin(&span, origin);
    span
}

/// The trace id and span id of `span`, as a record keeps them (24 bytes), when it is a
/// sampled, exported span.
pub fn origin_of(span: &Span) -> Option<[u8; 24]> {
    if span.is_none() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    let mut origin = [0u8; 24];
    origin[..16].copy_from_slice(&span_context.trace_id().to_bytes());
    origin[16..].copy_from_slice(&span_context.span_id().to_bytes());
    Some(origin)
}

/// Links `span` to the execution whose record answered it (`origin`, from `origin_of`).
pub fn link_to_origin(span: &Span, origin: &[u8]) {
    if span.is_none() || origin.len() != 24 {
        return;
    }
    let trace_id: [u8; 16] = origin[..16].try_into().expect("16 bytes");
    let span_id: [u8; 8] = origin[16..].try_into().expect("8 bytes");
    let linked = SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    span.add_link(linked);
}

/// Marks the span's outcome: the gRPC status, and span status error for server-fault codes
/// only (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), as the
/// RPC semantic conventions say for SERVER spans.
pub fn record_status(span: &Span, grpc_status: Option<u32>) {
    if span.is_none() {
        return;
    }
    if let Some(code) = grpc_status {
        span.record("rpc.grpc.status_code", code);
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            span.record("otel.status_code", "error");
        }
    }
}

/// The OpenTelemetry ids of a span, kept in its registry entry for the log lines written in
/// it (a formatter cannot ask the OpenTelemetry layer: it runs inside a subscriber call).
#[derive(Clone, Copy)]
struct TraceIds(TraceId, SpanId);

/// Keeps `span`'s ids where `JsonWithTraceIds` finds them.
fn remember_ids(span: &Span) {
    use tracing_subscriber::registry::LookupSpan as _;
    let context = span.context();
    let ids = context.span().span_context().clone();
    if !ids.is_valid() {
        return;
    }
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>();
        if let Some(data) = registry.and_then(|registry| registry.span(id)) {
            data.extensions_mut()
                .insert(TraceIds(ids.trace_id(), ids.span_id()));
        }
    });
}

/// Formats no fields: for the JSON log layer, whose event formatter writes an event's fields
/// itself and whose lines name their span by its trace ids, not by its fields.
pub struct NoSpanFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: tracing_subscriber::fmt::format::Writer<'writer>,
        _fields: R,
    ) -> std::fmt::Result {
        Ok(())
    }
}

/// JSON log lines with the trace and span id of the span they were written in.
pub struct JsonWithTraceIds;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonWithTraceIds
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        let mut line = serde_json::Map::new();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        line.insert("fields".into(), fields.0.into());
        if let Some(current) = ctx.lookup_current() {
            line.insert("span".into(), current.name().into());
            // The innermost span of the scope that knows its ids (a call's, or a store's).
            let ids = current
                .scope()
                .find_map(|span| span.extensions().get::<TraceIds>().copied());
            if let Some(TraceIds(trace_id, span_id)) = ids {
                line.insert("trace_id".into(), trace_id.to_string().into());
                line.insert("span_id".into(), span_id.to_string().into());
            }
        }
        let text = serde_json::Value::Object(line).to_string();
        writeln!(writer, "{text}")
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), text.into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_inside_a_span_carry_its_trace_and_span_id() {
        enable();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonWithTraceIds)
                    .with_writer(move || writer.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let expected = tracing::subscriber::with_default(subscriber, || {
            tracing::info!(outside = true, "before any span");
            let span = server_span("/p.S/M", None, &HeaderMap::new(), None, "memory");
            let _entered = span.enter();
            tracing::warn!(key = "0123456789abcdef", "inside the call");
            let context = span.context();
            let ids = context.span().span_context().clone();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });
        let text =
            String::from_utf8(buffer.0.lock().expect("not poisoned").clone()).expect("UTF-8 logs");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "before any span");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["fields"]["key"], "0123456789abcdef");
        assert_eq!(lines[1]["trace_id"], expected.0.as_str());
        assert_eq!(lines[1]["span_id"], expected.1.as_str());
        assert_eq!(expected.0.len(), 32);
    }
}
