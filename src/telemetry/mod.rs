//! Telemetry: logs, traces and metrics (design §7, issue "OpenTelemetry").
//!
//! Configured by the standard `OTEL_*` variables and nothing else: an OTLP exporter (gRPC, or
//! HTTP with protobuf bodies when `OTEL_EXPORTER_OTLP_PROTOCOL` says `http/protobuf`) starts
//! for traces or metrics only when an endpoint is configured for it, and an exporter
//! that fails never fails or slows a call (spans and metrics are queued, bounded, and sent
//! from their own thread). Metrics are always kept for the ops listener's `/metrics`.
//! Nothing recorded here may carry a raw serial, caller secret or message body: keys appear
//! as their hash.

pub mod metrics;
pub mod timed;
pub mod trace;

use metrics::Metrics;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The environment, read through a function so tests can pass a map.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// A telemetry setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A protocol this build does not export.
    #[error("{variable}={value}: idemproxy exports OTLP as grpc (the collector's port 4317) or http/protobuf (port 4318); http/json is not supported")]
    Protocol {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
    },
    /// The exporter could not be built (a malformed endpoint or header).
    #[error("the OTLP {signal} exporter cannot be built from the OTEL_* settings: {reason}")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// What the SDK said.
        reason: String,
    },
    /// The Prometheus registry refused the exporter.
    #[error("the /metrics exporter cannot start: {0}")]
    Prometheus(String),
    /// A log format this build does not write.
    #[error(
        "{LOG_FORMAT_VARIABLE}={0}: write json or text (unset: json unless stderr is a terminal)"
    )]
    LogFormat(String),
}

/// The variable that chooses how logs are written.
pub const LOG_FORMAT_VARIABLE: &str = "IDEMPROXY_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line, with the trace ids (for collectors).
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The format `IDEMPROXY_LOG_FORMAT` in `env` chooses; unset: JSON unless stderr is a
    /// terminal.
    pub fn from_env(env: Env<'_>) -> Result<LogFormat, TelemetryError> {
        match env(LOG_FORMAT_VARIABLE).as_deref() {
            Some("json") => Ok(LogFormat::Json),
            Some("text") => Ok(LogFormat::Text),
            Some(other) => Err(TelemetryError::LogFormat(other.to_owned())),
            None if std::io::IsTerminal::is_terminal(&std::io::stderr()) => Ok(LogFormat::Text),
            None => Ok(LogFormat::Json),
        }
    }
}

/// One process's telemetry: the instruments, what `/metrics` reads, and the providers to
/// flush at exit.
pub struct Telemetry {
    /// The instruments the engine, proxy and sweeper record into.
    pub metrics: Metrics,
    registry: prometheus::Registry,
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    log_format: LogFormat,
}

impl Telemetry {
    /// Metrics for `/metrics` only: no exporter, no traces (tests, the demo).
    pub fn local(backend: &'static str) -> Result<Telemetry, TelemetryError> {
        Telemetry::from_env(&|_| None, backend)
    }

    /// From the `OTEL_*` settings in `env`. Must run inside the tokio runtime (the gRPC
    /// exporters' channels live on it).
    pub fn from_env(env: Env<'_>, backend: &'static str) -> Result<Telemetry, TelemetryError> {
        let log_format = LogFormat::from_env(env)?;
        let resource = resource(env);
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus);
        if let Some(protocol) = METRICS.exported(env)? {
            let exporter =
                otlp_exporter!(opentelemetry_otlp::MetricExporter::builder(), protocol, env)
                    .map_err(|e| METRICS.build_error(e))?;
            meters = meters
                .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
        }
        let meter_provider = meters.build();
        let tracer_provider = if let Some(protocol) = TRACES.exported(env)? {
            let exporter =
                otlp_exporter!(opentelemetry_otlp::SpanExporter::builder(), protocol, env)
                    .map_err(|e| TRACES.build_error(e))?;
            // The sampler comes from OTEL_TRACES_SAMPLER(_ARG), read by the SDK.
            Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter)
                    .build(),
            )
        } else {
            None
        };
        let metrics = Metrics::new(&meter_provider.meter("idemproxy"), backend);
        Ok(Telemetry {
            metrics,
            registry,
            meter_provider,
            tracer_provider,
            log_format,
        })
    }

    /// Reports the store's size and group commit, read at each collection.
    pub fn observe_store(&self, store: Arc<crate::store::AnyStore>) {
        Metrics::observe_store(&self.meter_provider.meter("idemproxy"), store);
    }

    /// Reports the census's counts of records by state, read at each collection.
    pub fn observe_census(&self, census: Arc<crate::store::census::Census>) {
        Metrics::observe_census(&self.meter_provider.meter("idemproxy"), census);
    }

    /// Reports readiness and a store failed for good (`health` answers both).
    pub fn observe_health(&self, health: impl Fn() -> (bool, bool) + Send + Sync + 'static) {
        Metrics::observe_health(&self.meter_provider.meter("idemproxy"), health);
    }

    /// Whether spans are exported.
    pub fn traces_enabled(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Every metric in the Prometheus text format, for `GET /metrics`.
    pub fn render_prometheus(&self) -> String {
        use prometheus::Encoder as _;
        let mut text = Vec::new();
        let families = self.registry.gather();
        if let Err(error) = prometheus::TextEncoder::new().encode(&families, &mut text) {
            tracing::warn!(%error, "cannot encode the metrics");
        }
        String::from_utf8(text).unwrap_or_default()
    }

    /// Installs the log subscriber, with the span exporter's layer when traces are exported.
    /// Later calls in the same process do nothing.
    pub fn init_logs(&self) {
        init_subscriber(self.tracer_provider.as_ref(), "info", self.log_format);
    }

    /// `init_logs`, showing only `default_filter` (say `warn`) unless `RUST_LOG` says more:
    /// for the demo, whose output is its table.
    pub fn init_logs_at(&self, default_filter: &str) {
        init_subscriber(
            self.tracer_provider.as_ref(),
            default_filter,
            self.log_format,
        );
    }

    /// Sends what is queued (spans, a last metrics export), bounded by the exporters' own
    /// timeouts. Called once at exit.
    pub fn shutdown(&self) {
        if let Some(tracer_provider) = &self.tracer_provider {
            if let Err(error) = tracer_provider.shutdown() {
                tracing::warn!(%error, "spans not all exported at exit");
            }
        }
        if let Err(error) = self.meter_provider.shutdown() {
            tracing::debug!(%error, "metrics not all exported at exit");
        }
    }
}

/// The resource: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` as the SDK reads them,
/// with `service.name` = `idemproxy` when neither names it.
fn resource(env: Env<'_>) -> Resource {
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name("idemproxy").build()
    }
}

/// The variables that configure one signal's exporter.
struct Signal {
    /// `traces` or `metrics`, for messages.
    name: &'static str,
    exporter: &'static str,
    endpoint: &'static str,
    protocol: &'static str,
}

const TRACES: Signal = Signal {
    name: "traces",
    exporter: "OTEL_TRACES_EXPORTER",
    endpoint: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
};

const METRICS: Signal = Signal {
    name: "metrics",
    exporter: "OTEL_METRICS_EXPORTER",
    endpoint: "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
};

/// An OTLP exporter from `builder` (the metric or span exporter's: two types with the same
/// methods) over `protocol`: gRPC, or HTTP with protobuf bodies through `OnRuntime`.
macro_rules! otlp_exporter {
    ($builder:expr, $protocol:expr, $env:expr) => {
        match $protocol {
            Protocol::Grpc => $builder.with_tonic().build(),
            Protocol::HttpProtobuf => $builder
                .with_http()
                .with_http_client(OnRuntime::new($env))
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build(),
        }
    };
}
use otlp_exporter;

/// The OTLP/HTTP exporters' client: opentelemetry-http's hyper client, driven on the
/// sidecar's runtime. The SDK exports from threads of its own, where hyper (which needs
/// tokio) cannot run, so each request is handed to the runtime and awaited from there.
#[derive(Debug, Clone)]
struct OnRuntime {
    runtime: tokio::runtime::Handle,
    client: opentelemetry_http::hyper::HyperClient,
}

impl OnRuntime {
    /// On the current runtime, with the request deadline of `OTEL_EXPORTER_OTLP_TIMEOUT`
    /// (milliseconds, 10 s by default, as the SDK reads it).
    fn new(env: Env<'_>) -> OnRuntime {
        let timeout = env("OTEL_EXPORTER_OTLP_TIMEOUT")
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(10), Duration::from_millis);
        OnRuntime {
            runtime: tokio::runtime::Handle::current(),
            client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        sent.await?
    }
}

/// How a signal is exported.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// OTLP/gRPC, the default (the collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318), POSTed to `/v1/traces` and `/v1/metrics`
    /// under `OTEL_EXPORTER_OTLP_ENDPOINT`, or to the per-signal endpoint as it is.
    HttpProtobuf,
}

impl Signal {
    /// How this signal is exported, if it is: an endpoint is set for it and its exporter is
    /// not `none`. The protocol is gRPC unless the signal's or the general protocol variable
    /// says `http/protobuf`.
    fn exported(&self, env: Env<'_>) -> Result<Option<Protocol>, TelemetryError> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env(self.exporter).is_some_and(|v| v == "none")
            || (env(self.endpoint).is_none() && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none())
        {
            return Ok(None);
        }
        let protocol = [self.protocol, "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|variable| env(variable).map(|value| (variable, value)));
        match protocol {
            None => Ok(Some(Protocol::Grpc)),
            Some((_, value)) if value == "grpc" => Ok(Some(Protocol::Grpc)),
            Some((_, value)) if value == "http/protobuf" => Ok(Some(Protocol::HttpProtobuf)),
            Some((variable, value)) => Err(TelemetryError::Protocol { variable, value }),
        }
    }

    fn build_error(&self, error: impl std::fmt::Display) -> TelemetryError {
        TelemetryError::Exporter {
            signal: self.name,
            reason: error.to_string(),
        }
    }
}

/// Logs without exporters: the subscriber for tools (`inject`, `injector`, `keys`), in the
/// format `env` chooses.
pub fn init_logs(env: Env<'_>) -> Result<(), TelemetryError> {
    init_subscriber(None, "info", LogFormat::from_env(env)?);
    Ok(())
}

fn init_subscriber(
    tracer_provider: Option<&SdkTracerProvider>,
    default_filter: &str,
    format: LogFormat,
) {
    use opentelemetry::trace::TracerProvider as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = if format == LogFormat::Json {
        // Span fields are never formatted (JSON lines carry the trace ids instead): formatting
        // every call span's fields was the largest cost of tracing in the profile.
        tracing_subscriber::fmt::layer()
            .event_format(trace::JsonWithTraceIds)
            .fmt_fields(trace::NoSpanFields)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    };
    // Only idemproxy's own spans are exported, whatever RUST_LOG says: never the HTTP/2 and
    // gRPC libraries' (the exporter's own calls among them).
    let spans = tracer_provider.map(|provider| {
        // What a call's span needs and no more: no source location, thread or idle-time
        // attributes, and no OTel context switched in at each poll (we propagate explicitly).
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("idemproxy"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(trace::SPAN_TARGET, tracing::Level::INFO),
            )
    });
    if spans.is_some() {
        trace::enable();
    }
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init();
}
