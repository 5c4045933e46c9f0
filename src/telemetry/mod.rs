//! Telemetry: logs (a tracing subscriber writing text or JSON lines to stderr), metrics
//! (Prometheus), the operations endpoints of a long-running worker (`/healthz`, `/readyz`,
//! `/metrics`), and the export of traces (OTLP, when the standard environment asks for it).
//!
//! Logs go to stderr, so stdout stays clean for command output (JSON listings, the demo's
//! summary, Lambda's batch response). Message bodies are never logged at info level; the AWS
//! SDK and sqlx are quiet unless RUST_LOG asks for them.
//!
//! Readiness is "SQS and the database answered recently": the worker marks each outcome of
//! its own calls (receives, claims), and a probe pings the database every few seconds so an
//! idle worker still notices an outage.

mod export;
mod health;
mod logs;
mod metrics;

pub use crate::worker::{Readiness, ReadinessReport, names};
pub use export::TraceExport;
pub use health::serve;
pub use logs::LogFormat;
pub use metrics::install_recorder;

/// Install the global subscriber: logs as `format` (RUST_LOG overrides the default level)
/// and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
/// the export of the worker's spans. Call inside a Tokio runtime (the gRPC exporter needs
/// one) and keep the returned value: [`TraceExport::shutdown`] sends what is left.
pub fn init(format: LogFormat) -> TraceExport {
    let export = export::from_env();
    let tracer = export.tracer();
    logs::install(format, tracer);
    export.announce();
    export
}
