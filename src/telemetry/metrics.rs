//! Metrics: counters and the handler-duration histogram go through the `metrics` facade (a
//! no-op until a recorder is installed, so library users who never ask for metrics pay
//! nothing); the CLI installs the Prometheus recorder and serves its text on
//! `--metrics-addr`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::worker::names;

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
