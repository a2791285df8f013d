//! Telemetry export: finished trace records as OTLP spans in the OpenTelemetry GenAI semantic
//! conventions, and W3C trace context in and out.
//!
//! - [`Exporter`]: takes finished [`TraceRecord`]s ([`Exporter::export`] only enqueues), turns
//!   each into a server span and a client span per attempt (`spans` says how), and sends them
//!   in batches from one background task with `opentelemetry-otlp`'s `SpanExporter`, over
//!   OTLP/HTTP (protobuf) or OTLP/gRPC. The queue is bounded; what does not fit, or fails to
//!   send, is counted ([`Exporter::stats`], and the `acc_otlp_*` metrics once
//!   [`Exporter::register_metrics`] is called), never waited for.
//! - [`parse_traceparent`] and [`traceparent`]: the client's trace context read, the one for
//!   providers written.
//! - [`attributes`]: every attribute name the spans use.
//!
//! Fed by the request's trace record once it is complete, so spans carry what the request
//! really did (every attempt, every verdict), at the price of arriving after the request ends.
//!
//! The transport is `opentelemetry-otlp`'s: its retries (with backoff, within the timeout), and
//! the standard `OTEL_EXPORTER_OTLP_*HEADERS` variables, which add to the configured headers.
//! OTLP/HTTP goes through `opentelemetry-http`'s hyper client on a connector of ours
//! (`connect`: plain or rustls with ring, as the rest of the gateway); OTLP/gRPC through tonic
//! (rustls with ring and webpki roots for `https`). The resource is `service.name = "acc"` and
//! `service.version`, plus whatever `OTEL_RESOURCE_ATTRIBUTES` adds.

pub mod attributes;
mod connect;
mod context;
mod spans;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use context::{parse_traceparent, traceparent, tracestate};
pub use spans::provider_name;

use crate::store::record::TraceRecord;

/// Spans sent in one export request at most (the SDK batch processor's default).
const MAX_BATCH_SPANS: usize = 512;

/// How the spans travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`), usually port 4318.
    #[default]
    Http,
    /// OTLP/gRPC (`TraceService/Export`), usually port 4317.
    Grpc,
}

/// Where and how to export (`[telemetry]` in the policy).
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The collector: `http(s)://host:port` (for HTTP, `/v1/traces` is appended unless the URL
    /// already ends with it).
    pub otlp_endpoint: String,
    pub protocol: Protocol,
    /// One export request's deadline, retries included (the exporter retries 429, 502, 503,
    /// 504 and connection failures with backoff within it).
    pub timeout: Duration,
    /// Sent with every export request (an API key for a hosted backend, a tenant header).
    pub headers: Vec<(String, String)>,
    /// Records waiting to be exported, at most; more are dropped and counted.
    pub queue_records: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: "http://127.0.0.1:4318".to_string(),
            protocol: Protocol::Http,
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            queue_records: 4096,
        }
    }
}

/// Counts since the exporter started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans the collector accepted.
    pub spans_exported: u64,
    /// Export requests that failed (after the exporter's own retries).
    pub export_errors: u64,
    /// Spans lost in those failed requests.
    pub spans_failed: u64,
    /// Records refused by [`Exporter::export`] because the queue was full.
    pub records_dropped_queue_full: u64,
    /// Records refused because the exporter was shut down.
    pub records_dropped_shutdown: u64,
    /// Records (or attempts) with ids that are not W3C ids, never exported.
    pub records_invalid: u64,
}

/// Sends finished trace records as OTLP spans; see the module documentation.
pub struct Exporter {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    scope: InstrumentationScope,
    timeout: Duration,
}

enum Msg {
    /// One record's spans.
    Spans(Vec<SpanData>),
    /// Export everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
    /// Export what is queued, stop taking more, close the exporter, then answer.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Default)]
struct Shared {
    spans_exported: AtomicU64,
    export_errors: AtomicU64,
    spans_failed: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_shutdown: AtomicU64,
    invalid: AtomicU64,
    metrics: OnceLock<Metrics>,
}

/// The `acc_otlp_*` Prometheus counters.
struct Metrics {
    spans_exported: IntCounter,
    export_errors: IntCounter,
    /// `reason`: `export_failed` (spans), `queue_full`, `shutdown`, `invalid` (records).
    dropped: IntCounterVec,
}

impl Shared {
    fn add(&self, counter: &AtomicU64, n: u64, metric: impl Fn(&Metrics, u64)) {
        counter.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            metric(m, n);
        }
    }

    fn exported(&self, spans: u64) {
        self.add(&self.spans_exported, spans, |m, n| m.spans_exported.inc_by(n));
    }

    fn failed(&self, spans: u64) {
        self.add(&self.export_errors, 1, |m, n| m.export_errors.inc_by(n));
        self.add(&self.spans_failed, spans, |m, n| m.dropped.with_label_values(&["export_failed"]).inc_by(n));
    }

    fn dropped(&self, reason: &'static str, records: u64) {
        let counter = match reason {
            "queue_full" => &self.dropped_queue_full,
            "shutdown" => &self.dropped_shutdown,
            _ => &self.invalid,
        };
        self.add(counter, records, |m, n| m.dropped.with_label_values(&[reason]).inc_by(n));
    }

    fn stats(&self) -> ExportStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStats {
            spans_exported: get(&self.spans_exported),
            export_errors: get(&self.export_errors),
            spans_failed: get(&self.spans_failed),
            records_dropped_queue_full: get(&self.dropped_queue_full),
            records_dropped_shutdown: get(&self.dropped_shutdown),
            records_invalid: get(&self.invalid),
        }
    }
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl Exporter {
    /// Builds the OTLP exporter and starts its task on the current Tokio runtime (it must be
    /// called inside one). Fails on an endpoint or header that cannot be used; connecting is
    /// left to the first export, so an unreachable collector is not an error here.
    pub fn new(config: &TelemetryConfig) -> Result<Exporter, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the OTLP exporter must be started inside a Tokio runtime".to_string())?;
        // tonic sets its channel up on the runtime.
        let _entered = runtime.enter();
        let headers = header_map(&config.headers)?;
        let mut otlp = match config.protocol {
            Protocol::Http => {
                let endpoint = http_endpoint(&config.otlp_endpoint)?;
                let client = HyperClient::new(connect::Connector { timeout: config.timeout }, config.timeout, None);
                let headers: HashMap<String, String> = headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                    .collect();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .with_timeout(config.timeout)
                    .with_http_client(client)
                    .with_headers(headers)
                    .build()
            }
            Protocol::Grpc => {
                let endpoint = grpc_endpoint(&config.otlp_endpoint)?;
                let tls = endpoint.starts_with("https://");
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .with_endpoint(endpoint)
                    .with_timeout(config.timeout)
                    .with_metadata(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers));
                if tls {
                    builder = builder.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_webpki_roots(),
                    );
                }
                builder.build()
            }
        }
        .map_err(|e| format!("OTLP exporter: {e}"))?;
        let version = env!("CARGO_PKG_VERSION");
        otlp.set_resource(
            &Resource::builder()
                .with_service_name("acc")
                .with_attribute(KeyValue::new(attributes::SERVICE_VERSION, version))
                .build(),
        );

        let (tx, rx) = mpsc::channel(config.queue_records.max(1));
        let shared = Arc::new(Shared::default());
        let worker = runtime.spawn(run(otlp, rx, shared.clone(), config.timeout));
        Ok(Exporter {
            tx,
            shared,
            worker: Mutex::new(Some(worker)),
            scope: InstrumentationScope::builder("acc").with_version(version).build(),
            timeout: config.timeout,
        })
    }

    /// Queues the records' spans for export and returns at once (no network I/O, no waiting):
    /// a record that does not fit in the queue, or comes after [`shutdown`](Self::shutdown), is
    /// dropped and counted.
    pub fn export(&self, records: &[TraceRecord]) {
        for r in records {
            let spans = match spans::record_spans(r, &self.scope) {
                Ok(spans) => spans,
                Err(why) => {
                    tracing::debug!(trace_id = %r.trace_id, ?why, "trace record not exported: invalid ids");
                    self.shared.dropped("invalid", 1);
                    continue;
                }
            };
            if spans.len() < 1 + r.attempts.len() {
                // Attempts with unusable span ids were left out.
                self.shared.dropped("invalid", 1);
            }
            match self.tx.try_send(Msg::Spans(spans)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => self.shared.dropped("queue_full", 1),
                Err(mpsc::error::TrySendError::Closed(_)) => self.shared.dropped("shutdown", 1),
            }
        }
    }

    /// Waits until everything queued before the call has been sent (or has failed).
    pub async fn force_flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Sends what is queued, then stops: later [`export`](Self::export)s are dropped and counted.
    /// Bounded: once an export has failed (the last one before stopping, or one while stopping)
    /// what is still queued is dropped and counted rather than tried, and the task is abandoned
    /// if it has not finished within a few export deadlines.
    pub async fn shutdown(&self) {
        let Some(worker) = crate::lock(&self.worker).take() else { return };
        // At most 5 s: a collector that hangs must not hold the gateway's exit (and its ports).
        let deadline = (self.timeout * 3 + Duration::from_secs(1)).min(Duration::from_secs(5));
        let (done, wait) = oneshot::channel();
        let stopped = tokio::time::timeout(deadline, async {
            if self.tx.send(Msg::Shutdown(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("OTLP exporter did not stop within {deadline:?}; abandoning what it still held");
            worker.abort();
        }
        let _ = worker.await;
    }

    /// Counts since the start.
    pub fn stats(&self) -> ExportStats {
        self.shared.stats()
    }

    /// Registers `acc_otlp_spans_exported_total`, `acc_otlp_export_errors_total` and
    /// `acc_otlp_dropped_total{reason}` (`export_failed`: spans; `queue_full`, `shutdown`,
    /// `invalid`: records) on `registry`, starting from the counts so far. Once per exporter.
    pub fn register_metrics(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        let spans_exported =
            IntCounter::with_opts(Opts::new("acc_otlp_spans_exported_total", "Spans accepted by the OTLP collector."))?;
        let export_errors = IntCounter::with_opts(Opts::new(
            "acc_otlp_export_errors_total",
            "OTLP export requests that failed after retries.",
        ))?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "acc_otlp_dropped_total",
                "Telemetry not exported: spans of failed requests (export_failed), records refused (queue_full, shutdown, invalid).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(spans_exported.clone()))?;
        registry.register(Box::new(export_errors.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        let s = self.stats();
        spans_exported.inc_by(s.spans_exported);
        export_errors.inc_by(s.export_errors);
        for (reason, n) in [
            ("export_failed", s.spans_failed),
            ("queue_full", s.records_dropped_queue_full),
            ("shutdown", s.records_dropped_shutdown),
            ("invalid", s.records_invalid),
        ] {
            dropped.with_label_values(&[reason]).inc_by(n);
        }
        self.shared
            .metrics
            .set(Metrics { spans_exported, export_errors, dropped })
            .map_err(|_| prometheus::Error::Msg("OTLP metrics registered twice".to_string()))
    }
}

/// The export task: takes whatever is queued (up to a batch), sends it, repeats; so a busy
/// gateway sends full batches and a quiet one sends each record as it comes.
async fn run(
    otlp: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    timeout: Duration,
) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut flushed = Vec::new();
        let mut stop = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Spans(spans) => batch.extend(spans),
                Msg::Flush(done) => flushed.push(done),
                Msg::Shutdown(done) => stop = Some(done),
            }
            if batch.len() < MAX_BATCH_SPANS && flushed.is_empty() && stop.is_none() {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            failing = !send(&otlp, batch, &shared, timeout, failing).await;
        }
        for done in flushed {
            let _ = done.send(());
        }
        if let Some(done) = stop {
            // No more sends are accepted; what is already queued still goes (until a failure).
            rx.close();
            let mut batch = Vec::new();
            while let Some(msg) = rx.recv().await {
                match msg {
                    Msg::Spans(_) if failing => shared.dropped("shutdown", 1),
                    Msg::Spans(spans) => {
                        batch.extend(spans);
                        if batch.len() >= MAX_BATCH_SPANS {
                            failing = !send(&otlp, std::mem::take(&mut batch), &shared, timeout, failing).await;
                        }
                    }
                    Msg::Flush(d) | Msg::Shutdown(d) => {
                        let _ = d.send(());
                    }
                }
            }
            if !batch.is_empty() && !failing {
                send(&otlp, batch, &shared, timeout, failing).await;
            }
            let _ = otlp.shutdown();
            let _ = done.send(());
            return;
        }
    }
}

/// One export request; whether it succeeded. Logs the change from working to failing and back,
/// not every failure.
async fn send(
    otlp: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    shared: &Shared,
    timeout: Duration,
    was_failing: bool,
) -> bool {
    let n = batch.len() as u64;
    // The exporter bounds itself by `timeout`; this guards against it not doing so.
    let result = match tokio::time::timeout(timeout + Duration::from_secs(1), otlp.export(batch)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    match result {
        Ok(()) => {
            shared.exported(n);
            if was_failing {
                tracing::info!("OTLP export works again");
            }
            true
        }
        Err(e) => {
            shared.failed(n);
            if was_failing {
                tracing::debug!(spans = n, error = %e, "OTLP export failed");
            } else {
                tracing::warn!(spans = n, error = %e, "OTLP export failed; spans dropped (acc_otlp_dropped_total)");
            }
            false
        }
    }
}

/// The OTLP/HTTP traces URL for an endpoint given with or without `/v1/traces`.
fn http_endpoint(endpoint: &str) -> Result<String, String> {
    let base = check_url(endpoint)?;
    if base.ends_with("/v1/traces") {
        Ok(base.to_string())
    } else {
        Ok(format!("{}/v1/traces", base.trim_end_matches('/')))
    }
}

/// The OTLP/gRPC endpoint (no path: the service's method is the path).
fn grpc_endpoint(endpoint: &str) -> Result<String, String> {
    let base = check_url(endpoint)?;
    Ok(base.trim_end_matches('/').trim_end_matches("/v1/traces").trim_end_matches('/').to_string())
}

fn check_url(endpoint: &str) -> Result<&str, String> {
    let endpoint = endpoint.trim();
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!("OTLP endpoint {endpoint:?}: want http://host:port or https://host:port"));
    }
    Ok(endpoint)
}

fn header_map(headers: &[(String, String)]) -> Result<http::HeaderMap, String> {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("OTLP header name {k:?} is not valid"))?;
        let value =
            http::HeaderValue::from_str(v.trim()).map_err(|_| format!("OTLP header {k:?}: the value is not valid"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests;
