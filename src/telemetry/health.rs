//! The operations endpoints of a long-running worker: `/healthz`, `/readyz` (what the
//! worker reports: SQS and the database answered recently, not stopping) and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::worker::Readiness;

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
