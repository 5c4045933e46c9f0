//! Telemetry: logs (a tracing subscriber writing text or JSON lines to stderr) and the
//! operations endpoints of a long-running worker (`/healthz`, `/readyz`, `/metrics`).
//!
//! Logs go to stderr, so stdout stays clean for command output (JSON listings, the demo's
//! summary, Lambda's batch response). Message bodies are never logged at info level; the AWS
//! SDK and sqlx are quiet unless RUST_LOG asks for them.
//!
//! Counters and the handler-duration histogram go through the `metrics` facade (a no-op until
//! a recorder is installed, so library users who never ask for metrics pay nothing); the CLI
//! installs the Prometheus recorder and serves its text on `--metrics-addr`.
//!
//! Readiness is "SQS and the database answered recently": the worker marks each outcome of
//! its own calls (receives, claims), and a probe pings the database every few seconds so an
//! idle worker still notices an outage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,aws_config=warn,aws_smithy_runtime=warn,sqlx=warn";

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global subscriber. RUST_LOG overrides the default level.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber may already be installed (tests, embedding): keep it.
    let _ = result;
}

pub use crate::worker::{Readiness, ReadinessReport, names};

/// Install the Prometheus recorder for this process. Call once, before the worker starts
/// (counters created before it stay no-ops).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::HANDLER_DURATION.to_owned()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0,
            ],
        )?
        .install_recorder()?;
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    readiness: Arc<Readiness>,
}

/// Serve `/healthz`, `/readyz` and `/metrics` on `addr` until `shutdown` is cancelled.
/// Returns once bound (the server runs in a task), so a taken port fails the start.
pub async fn serve(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let upkeep = prometheus.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            prometheus,
            readiness,
        });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        // Histograms and summaries need periodic upkeep when nothing scrapes for a while.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
    Ok(bound)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&report).unwrap_or_default() + "\n";
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_both_answered_and_not_stopping() {
        let readiness = Readiness::new();
        assert!(!readiness.report().ready, "nothing reached yet");
        readiness.sqs(true);
        assert!(!readiness.report().ready, "database not reached yet");
        readiness.database(true);
        assert!(readiness.report().ready);
        readiness.database(false);
        let report = readiness.report();
        assert!(!report.ready && report.sqs && !report.database);
        readiness.database(true);
        readiness.stopping();
        let report = readiness.report();
        assert!(!report.ready && report.sqs && report.database && report.stopping);
    }
}
