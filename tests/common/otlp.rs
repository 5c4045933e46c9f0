//! An OTLP trace receiver for the tracing tests, over HTTP (`POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest`) or gRPC (the `TraceService`), decoded with
//! `opentelemetry-proto`; every span kept, in a flat form the tests can search. With `SQS_WORKER_TRACE_DUMP=<dir>` set, each test's spans
//! are also written there as JSON (`scripts/trace-picture` draws README's picture from them).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use serde::Serialize;

/// One exported span, ids as lowercase hex.
#[derive(Debug, Clone, Serialize)]
pub struct CollectedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    /// Linked spans: (trace id, span id).
    pub links: Vec<(String, String)>,
    /// The resource's `service.name`.
    pub service: String,
}

impl CollectedSpan {
    /// An attribute as text (strings unquoted), if the span has it.
    pub fn attr(&self, name: &str) -> Option<String> {
        self.attributes.get(name).map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }
}

#[derive(Clone, Default)]
struct Collected {
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    requests: Arc<AtomicUsize>,
}

/// A receiver on a free local port; stops when dropped.
pub struct OtlpReceiver {
    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` should say: `http://127.0.0.1:<port>`.
    pub endpoint: String,
    collected: Collected,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collected = Collected::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(collected.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            endpoint,
            collected,
            task,
        }
    }

    /// The same over gRPC (what `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` speaks).
    pub async fn start_grpc() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collected = Collected::default();
        let service = TraceServiceServer::new(Grpc(collected.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Self {
            endpoint,
            collected,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.collected.spans.lock().unwrap().clone()
    }

    /// How many export requests arrived.
    pub fn requests(&self) -> usize {
        self.collected.requests.load(Ordering::Relaxed)
    }

    /// The spans of `trace_id`, once `ready` says they are all there; panics after `within`.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        within: Duration,
        ready: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans: Vec<CollectedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if ready(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the spans of trace {trace_id} did not all arrive within {within:?}: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The spans called `name`, once there is one; panics after `within`.
    pub async fn wait_for_spans_named(&self, name: &str, within: Duration) -> Vec<CollectedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans: Vec<CollectedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.name == name)
                .collect();
            if !spans.is_empty() {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} span within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Write `spans` to `$SQS_WORKER_TRACE_DUMP/<name>.json`, when that is set.
    pub fn dump(name: &str, spans: &[CollectedSpan]) {
        if let Ok(dir) = std::env::var("SQS_WORKER_TRACE_DUMP") {
            let path = std::path::Path::new(&dir).join(format!("{name}.json"));
            std::fs::write(&path, serde_json::to_string_pretty(spans).unwrap()).unwrap();
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(collected): State<Collected>, body: Bytes) -> (StatusCode, Vec<u8>) {
    collected.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    collected.keep(request);
    // An empty ExportTraceServiceResponse: everything accepted.
    (StatusCode::OK, Vec::new())
}

struct Grpc(Collected);

#[async_trait::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.keep(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collected {
    fn keep(&self, request: ExportTraceServiceRequest) {
        let mut spans = Vec::new();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref().map(json))
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    let status = span.status.unwrap_or_default();
                    spans.push(CollectedSpan {
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                        attributes: span
                            .attributes
                            .into_iter()
                            .filter_map(|kv| Some((kv.key, json(kv.value?.value.as_ref()?))))
                            .collect(),
                        status_code: status.code,
                        status_message: status.message,
                        links: span
                            .links
                            .into_iter()
                            .map(|l| (hex::encode(l.trace_id), hex::encode(l.span_id)))
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(spans);
    }
}

fn json(value: &Value) -> serde_json::Value {
    match value {
        Value::StringValue(s) => s.clone().into(),
        Value::BoolValue(b) => (*b).into(),
        Value::IntValue(i) => (*i).into(),
        Value::DoubleValue(d) => (*d).into(),
        other => format!("{other:?}").into(),
    }
}
