//! Logs: a tracing subscriber writing text or JSON lines to stderr, with the OpenTelemetry
//! layer beside it when traces are exported. Inside an exported span, JSON lines carry
//! `trace_id` and `span_id`, so a log search can jump to the trace.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::trace::Tracer;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets};

const DEFAULT_FILTER: &str = "info,aws_config=warn,aws_smithy_runtime=warn,sqlx=warn";

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global subscriber. RUST_LOG filters the logs only: the spans exported are
/// the worker's own (`sqs_worker` at info), whatever the log level, so quieting the logs
/// does not empty the traces.
pub(super) fn install(format: LogFormat, tracer: Option<Tracer>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target("sqs_worker", Level::INFO))
    });
    let registry = tracing_subscriber::registry().with(spans);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // A subscriber may already be installed (tests, embedding): keep it.
    let _ = match format {
        LogFormat::Text => registry.with(logs.with_filter(filter)).try_init(),
        LogFormat::Json => registry
            .with(
                logs.fmt_fields(JsonFields::new())
                    .event_format(WithTraceIds(
                        tracing_subscriber::fmt::format().json().flatten_event(true),
                    ))
                    .with_filter(filter),
            )
            .try_init(),
    };
}

/// The JSON event format with the exported span's `trace_id` and `span_id` in front.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace_id, span_id)) = trace_ids(ctx, event) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The JSON format writes one object (its timestamp first) and a newline.
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// The trace and span ids of the span an event is in, when that span is exported.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    if !crate::spans::enabled() {
        return None;
    }
    let span = match event.parent() {
        Some(id) => ctx.span(id),
        None => ctx.lookup_current(),
    }?;
    let context = tracing::dispatcher::get_default(|dispatch| {
        tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
    })?;
    let otel_span = context.span();
    let ids = otel_span.span_context();
    ids.is_valid()
        .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
}
