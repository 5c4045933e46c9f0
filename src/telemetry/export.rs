//! Trace export over OTLP, configured by the standard environment only:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on;
//! `OTEL_EXPORTER_OTLP_PROTOCOL` picks `http/protobuf` (the default) or `grpc`;
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` describe the process (service name
//! `sqs-worker` unless they say otherwise); `OTEL_TRACES_SAMPLER` (`_ARG`) samples, read by
//! the SDK. Without an endpoint nothing is built: no exporter, no OpenTelemetry layer, and
//! [`crate::spans`] stays off.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

const ENDPOINTS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The trace exporter of this process, or none.
pub struct TraceExport {
    provider: Option<SdkTracerProvider>,
    /// Where spans go, for the start-up line; or why they go nowhere.
    summary: String,
}

impl TraceExport {
    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }

    pub(super) fn tracer(&self) -> Option<Tracer> {
        let provider = self.provider.as_ref()?;
        // The Lambda invocation span is made through the global provider (src/spans.rs).
        opentelemetry::global::set_tracer_provider(provider.clone());
        let flushing = provider.clone();
        crate::spans::enable(Box::new(move || {
            if let Err(error) = flushing.force_flush() {
                tracing::warn!(%error, "could not export the invocation's spans");
            }
        }));
        Some(provider.tracer("sqs-worker"))
    }

    pub(super) fn announce(&self) {
        if self.is_on() {
            tracing::info!(export = %self.summary, "tracing on: exporting spans over OTLP");
        } else {
            tracing::debug!(reason = %self.summary, "tracing off");
        }
    }

    /// Send the spans still buffered and stop the exporter (at the end of `run`: after the
    /// SIGTERM drain or `--exit-when-idle`; at the end of any command).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: could not export the last spans: {error}");
        }
    }
}

/// The exporter the environment asks for.
pub(super) fn from_env() -> TraceExport {
    let endpoint = ENDPOINTS
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    let Some(endpoint) = endpoint else {
        return off("OTEL_EXPORTER_OTLP_ENDPOINT is not set");
    };
    if std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none") {
        return off("OTEL_TRACES_EXPORTER is none");
    }
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default();
    let grpc = protocol.trim() == "grpc";
    let exporter = if grpc {
        SpanExporter::builder().with_tonic().build()
    } else {
        // http/json is not built in: protobuf over HTTP goes to the same endpoints.
        SpanExporter::builder().with_http().build()
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            // A bad endpoint must not stop the worker: it runs, untraced, and says why.
            eprintln!("warning: tracing off: cannot build the OTLP exporter: {error}");
            return off("the OTLP exporter could not be built");
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    TraceExport {
        provider: Some(provider),
        summary: format!(
            "{endpoint} ({})",
            if grpc { "grpc" } else { "http/protobuf" }
        ),
    }
}

fn off(reason: &str) -> TraceExport {
    TraceExport {
        provider: None,
        summary: reason.to_owned(),
    }
}

/// The SDK's resource (it reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`), named
/// `sqs-worker` when neither names the service.
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name("sqs-worker").build()
    }
}
