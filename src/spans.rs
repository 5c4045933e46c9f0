//! The spans of a delivery's processing, named and attributed after OpenTelemetry's
//! messaging semantic conventions, and the trace context that goes out with an event (to the
//! HTTP and exec handlers, `send`).
//!
//! Spans are `tracing` spans; `telemetry` exports them (through tracing-opentelemetry) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and only then calls [`enable`]. Until then every
//! constructor here returns [`Span::none`] after one relaxed atomic load: with tracing off the
//! hot path creates no span beyond the log span it always had.
//!
//! Parents: a `process` span continues the producer's context (`traceparent`/`tracestate`,
//! else X-Ray's `AWSTraceHeader`); inside a Lambda `invocation` span it is that span's child
//! and links to the producer instead, and the invocation links to every producer of its batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Instrument;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use aws_sdk_sqs::types::MessageAttributeValue;

use crate::message::trace::{self, AWS_TRACE_HEADER, TRACEPARENT, TRACESTATE, TraceContext};
use crate::sqs::ReceivedMessage;

static ENABLED: AtomicBool = AtomicBool::new(false);
type Flush = Box<dyn Fn() + Send + Sync>;
static FLUSH: OnceLock<Flush> = OnceLock::new();

/// Whether spans are exported (telemetry installed an exporter).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turn span creation on, with the exporter's flush (called at the end of each Lambda
/// invocation). Called once, by `telemetry`, after installing the exporter.
pub fn enable(flush: Flush) {
    let _ = FLUSH.set(flush);
    ENABLED.store(true, Ordering::Relaxed);
}

/// Send the spans ended so far. Lambda freezes the process between invocations, so spans
/// still in the exporter's buffer would wait for the next invocation, or be lost.
pub async fn flush() {
    if let (true, Some(flush)) = (enabled(), FLUSH.get()) {
        // The exporter blocks until its thread has sent the batch.
        let _ = tokio::task::spawn_blocking(flush).await;
    }
}

/// The producer's trace context of a message: its `traceparent` (and `tracestate`) message
/// attributes, else its `AWSTraceHeader` system attribute.
pub fn producer_context(message: &ReceivedMessage) -> Option<TraceContext> {
    let attribute = |name: &str| {
        message
            .message_attributes
            .get(name)
            .and_then(|value| value.string_value())
    };
    TraceContext::of_message(
        attribute(TRACEPARENT),
        attribute(TRACESTATE),
        message
            .system_attributes
            .get(AWS_TRACE_HEADER)
            .map(String::as_str),
    )
}

/// A message's attributes for a message made from it (a DLQ copy, a redriven message): its
/// own, plus a `traceparent` converted from its `AWSTraceHeader` when it has none. That
/// system attribute does not travel with a message sent again, the message attribute does.
pub fn attributes_with_trace(
    message: &ReceivedMessage,
) -> Cow<'_, HashMap<String, MessageAttributeValue>> {
    let attributes = &message.message_attributes;
    if attributes.contains_key(TRACEPARENT) {
        return Cow::Borrowed(attributes);
    }
    let converted = message
        .system_attributes
        .get(AWS_TRACE_HEADER)
        .and_then(|header| trace::parse_xray(header))
        .and_then(|context| context.traceparent());
    match converted {
        Some(traceparent) => {
            let mut attributes = attributes.clone();
            attributes.insert(
                TRACEPARENT.to_owned(),
                crate::sqs::string_attribute(traceparent),
            );
            Cow::Owned(attributes)
        }
        None => Cow::Borrowed(attributes),
    }
}

/// The OpenTelemetry form of a remote context; `None` without a parent span (an X-Ray
/// header may name only the trace, and a span context needs both).
fn remote(context: &TraceContext) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(&context.trace_id).ok()?;
    let span_id = SpanId::from_hex(context.parent_id.as_deref()?).ok()?;
    let flags = if context.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = context
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// Continue `producer` in `span`: as its parent when `span` has no local parent, else as a
/// link (the local parent is a Lambda invocation).
fn continue_producer(span: &Span, producer: Option<&TraceContext>, has_local_parent: bool) {
    let Some(remote) = producer.and_then(remote) else {
        return;
    };
    if has_local_parent {
        span.add_link(remote);
    } else {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// What a `process` span says about its delivery.
pub struct Delivery<'a> {
    /// The delivery.
    pub message: &'a ReceivedMessage,
    /// The queue's name (`messaging.destination.name`).
    pub queue: &'a str,
    /// The event's idempotency key, when it has one.
    pub key: Option<&'a str>,
    /// Its redrive count and whether this is its final pass.
    pub redrive_count: u32,
    /// Whether a failure ends the event in `dead_letters`.
    pub final_pass: bool,
}

/// The `process` span of one delivery (kind consumer), a child of `parent` when there is
/// one (a Lambda invocation), else of the producer's context. `sqs_worker.attempt` and
/// `sqs_worker.outcome` are filled in later ([`record_attempt`], [`record_outcome`]).
pub fn process(delivery: &Delivery<'_>, parent: Option<&opentelemetry::Context>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let message = delivery.message;
    let receive_count = message
        .system_attributes
        .get("ApproximateReceiveCount")
        .and_then(|count| count.parse::<u64>().ok());
    let span = tracing::info_span!(
        parent: None,
        "process",
        otel.kind = "consumer",
        messaging.system = "aws_sqs",
        messaging.operation.name = "process",
        messaging.operation.type = "process",
        messaging.destination.name = delivery.queue,
        messaging.message.id = %message.message_id,
        sqs_worker.key = delivery.key,
        sqs_worker.receive_count = receive_count,
        sqs_worker.redrive_count = delivery.redrive_count,
        sqs_worker.final_pass = delivery.final_pass,
        sqs_worker.attempt = Empty,
        sqs_worker.outcome = Empty,
    );
    if let Some(invocation) = parent {
        let _ = span.set_parent(invocation.clone());
    }
    continue_producer(&span, producer_context(message).as_ref(), parent.is_some());
    span
}

/// The checkpoint's attempt count, known once the claim answered.
pub fn record_attempt(span: &Span, attempt: u32) {
    span.record("sqs_worker.attempt", attempt);
}

/// How a delivery ended (`complete`, `retry`, `dlq`, `dead_letter`, `duplicate`, `busy`, …),
/// on its `process` span.
pub fn record_outcome(span: &Span, outcome: &'static str) {
    span.record("sqs_worker.outcome", outcome);
}

/// The `claim` span of a delivery: the batch's claim statement, as each of its deliveries
/// waited for it. None when `parent` is none (tracing off).
pub fn claim(parent: &Span) -> Span {
    if !enabled() || parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(parent: parent, "claim")
}

/// The `handle` span: the handler's run, its steps inside.
pub fn handle(parent: &Span) -> Span {
    if !enabled() || parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(parent: parent, "handle")
}

/// The `settle` span of a delivery: its outcome and what goes with it (a retry's delay,
/// a DLQ's or dead letter's reason) are filled in by the settlement ([`note_settled`]).
pub fn settle(parent: &Span) -> Span {
    if !enabled() || parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        parent: parent,
        "settle",
        sqs_worker.outcome = Empty,
        sqs_worker.retry_delay_ms = Empty,
        sqs_worker.reason = Empty,
    )
}

/// The settlement of the current `settle` span: its outcome, with the retry delay or the
/// reason when there is one; a DLQ or dead letter is an error.
pub fn note_settled(outcome: &'static str, retry_delay_ms: Option<u64>, reason: Option<&str>) {
    if !enabled() {
        return;
    }
    let span = Span::current();
    span.record("sqs_worker.outcome", outcome);
    if let Some(delay) = retry_delay_ms {
        span.record("sqs_worker.retry_delay_ms", delay);
    }
    if let Some(reason) = reason {
        span.record("sqs_worker.reason", reason);
    }
    if matches!(outcome, "dlq" | "dead_letter") {
        span.set_status(Status::error(reason.unwrap_or(outcome).to_owned()));
    }
}

/// Mark `span` failed with `error` (OpenTelemetry status Error and its description).
pub fn record_error(span: &Span, error: &dyn Display) {
    if enabled() && !span.is_none() {
        span.set_status(Status::error(error.to_string()));
    }
}

/// Run one step of a handler in its `step` span (a child of the current span): `replayed`
/// says whether its output came from the checkpoint. An error marks the span failed.
pub async fn in_step<T, E: Display>(
    name: &str,
    index: usize,
    run: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    if !enabled() {
        return run.await;
    }
    let span = step(name, index, false);
    let result = run.instrument(span.clone()).await;
    if let Err(error) = &result {
        record_error(&span, error);
    }
    result
}

/// The span of a step: `step {name}`, with its index and whether it was replayed.
pub fn step(name: &str, index: usize, replayed: bool) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "step",
        otel.name = format!("step {name}"),
        sqs_worker.step.name = name,
        sqs_worker.step.index = index as u64,
        sqs_worker.step.replayed = replayed,
    )
}

/// The `invocation` span of a Lambda invocation (kind consumer): a child of the
/// invocation's X-Ray trace header (`_X_AMZN_TRACE_ID`), linked to every producer context its
/// records carry; the batch's `process` spans are its children. Made with the OpenTelemetry
/// API, not as a `tracing` span: as the first span of a process behind the per-layer filter
/// it came out unseen by the OpenTelemetry layer (and its children lost their parent).
/// It ends when dropped.
pub struct InvocationSpan(Option<opentelemetry::Context>);

impl InvocationSpan {
    /// The context its `process` spans are children of.
    pub fn context(&self) -> Option<&opentelemetry::Context> {
        self.0.as_ref()
    }
}

impl Drop for InvocationSpan {
    fn drop(&mut self) {
        if let Some(context) = &self.0 {
            context.span().end();
        }
    }
}

/// Start the `invocation` span of a batch of `records` (none while tracing is off).
pub fn invocation(
    trace_header: Option<&str>,
    request_id: &str,
    records: &[ReceivedMessage],
) -> InvocationSpan {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Link, SpanKind, Tracer, TracerProvider};
    if !enabled() {
        return InvocationSpan(None);
    }
    let parent = trace_header
        .and_then(trace::parse_xray)
        .as_ref()
        .and_then(remote)
        .map(|remote| opentelemetry::Context::new().with_remote_span_context(remote))
        .unwrap_or_default();
    let links = records
        .iter()
        .filter_map(|record| remote(&producer_context(record)?))
        .map(Link::with_context)
        .collect();
    let tracer = opentelemetry::global::tracer_provider().tracer("sqs-worker");
    let span = tracer
        .span_builder("invocation")
        .with_kind(SpanKind::Consumer)
        .with_links(links)
        .with_attributes([
            KeyValue::new("faas.trigger", "pubsub"),
            KeyValue::new("faas.invocation_id", request_id.to_owned()),
            KeyValue::new("messaging.system", "aws_sqs"),
            KeyValue::new("messaging.batch.message_count", records.len() as i64),
        ])
        .start_with_context(&tracer, &parent);
    InvocationSpan(Some(parent.with_span(span)))
}

/// W3C trace context headers for what an event causes downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    /// The `traceparent` header.
    pub traceparent: String,
    /// The `tracestate` header, when there is one.
    pub tracestate: Option<String>,
}

/// The context to pass on from here: the current span's when spans are exported, else
/// `fallback` unchanged (the producer's), so the trace still connects downstream.
pub fn outgoing(fallback: Option<&TraceContext>) -> Option<TraceHeaders> {
    if enabled() {
        let context = Span::current().context();
        let span = context.span();
        let current = span.span_context();
        if current.is_valid() {
            let state = current.trace_state().header();
            return Some(TraceHeaders {
                traceparent: format!(
                    "00-{}-{}-{:02x}",
                    current.trace_id(),
                    current.span_id(),
                    current.trace_flags().to_u8()
                ),
                tracestate: (!state.is_empty()).then_some(state),
            });
        }
    }
    let fallback = fallback?;
    Some(TraceHeaders {
        traceparent: fallback.traceparent()?,
        tracestate: fallback.tracestate.clone(),
    })
}

/// The `send` span of a message sent by `sqs-worker send` (kind producer).
pub fn send(queue: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "send",
        otel.kind = "producer",
        messaging.system = "aws_sqs",
        messaging.operation.name = "send",
        messaging.operation.type = "send",
        messaging.destination.name = queue,
    )
}

/// A new trace's root context (random ids, sampled), for a message sent with no trace
/// around it: the worker's spans then join one trace per message.
pub fn new_trace() -> TraceHeaders {
    let trace_id = loop {
        let id = fastrand::u128(..);
        if id != 0 {
            break id;
        }
    };
    let span_id = fastrand::u64(1..);
    TraceHeaders {
        traceparent: format!("00-{trace_id:032x}-{span_id:016x}-01"),
        tracestate: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_trace_is_a_valid_traceparent() {
        let headers = new_trace();
        let parsed = trace::parse_traceparent(&headers.traceparent).unwrap();
        assert!(parsed.sampled);
        assert_ne!(new_trace(), headers);
    }

    #[test]
    fn without_spans_the_producer_context_goes_on_unchanged() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut producer = trace::parse_traceparent(header).unwrap();
        producer.tracestate = Some("congo=t61rcWkgMzE".into());
        let out = outgoing(Some(&producer)).unwrap();
        assert_eq!(out.traceparent, header);
        assert_eq!(out.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(outgoing(None), None);
    }

    #[test]
    fn a_remote_context_needs_a_parent_span() {
        let xray = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let context = remote(&trace::parse_xray(xray).unwrap()).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "5759e988bd862e3fe1be46a994272793"
        );
        assert!(context.is_sampled() && context.is_remote());
        let rootless = trace::parse_xray("Root=1-5759e988-bd862e3fe1be46a994272793").unwrap();
        assert!(remote(&rootless).is_none());
    }
}
