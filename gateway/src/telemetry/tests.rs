//! The exporter against the real OTLP receiver (`scripts/otlp-receiver.sh`, opentelemetry-proto
//! decoding in Python), plus its failure paths.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::attributes::*;
use super::*;
use crate::store::record::{AttemptRecord, EvaluationRecord, GenerationRecord, ImageRecord};

const START: u64 = 1_765_000_000_123_456_789;
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

/// A receiver on a free port for one test, stopped on drop.
struct Receiver {
    dir: tempfile::TempDir,
    url: String,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script()).arg("start").arg(dir.path()).output().expect("run scripts/otlp-receiver.sh");
        assert!(out.status.success(), "otlp-receiver.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        Receiver { dir, url }
    }

    fn grpc_url(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("grpc_url")).ok().map(|s| s.trim().to_string())
    }

    /// `GET /spans?trace_id=...`.
    fn spans(&self, trace_id: &str) -> Vec<Value> {
        let body = http_get(&self.url, &format!("/spans?trace_id={trace_id}"));
        serde_json::from_str::<Vec<Value>>(&body).unwrap()
    }

    fn all_spans(&self) -> Vec<Value> {
        serde_json::from_str::<Vec<Value>>(&http_get(&self.url, "/spans")).unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(self.dir.path()).output();
    }
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/otlp-receiver.sh")
}

/// A plain HTTP/1.1 GET (the test needs no client of its own).
fn http_get(base: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_string()
}

fn config(endpoint: &str) -> TelemetryConfig {
    TelemetryConfig {
        otlp_endpoint: endpoint.to_string(),
        timeout: Duration::from_secs(5),
        ..TelemetryConfig::default()
    }
}

/// A generation whose first attempt (OpenAI) returned an image the safety evaluator failed, so
/// the plan fell back to Azure, which answered with two images that passed.
fn fallback_record(trace_id: &str) -> TraceRecord {
    TraceRecord {
        trace_id: trace_id.to_string(),
        span_id: "a1a1a1a1a1a1a1a1".to_string(),
        parent_span_id: Some(CLIENT_PARENT.to_string()),
        parent_trace_id: None,
        kind: "primary".to_string(),
        start_time_unix_nano: START,
        duration_ms: 1234.5,
        tenant: Some("acme".to_string()),
        key_name: Some("web".to_string()),
        route: Some("marketing".to_string()),
        operation: "generations".to_string(),
        cohort: Some("beta".to_string()),
        prompt_template: Some("hero@3".to_string()),
        asset_type: Some("banner".to_string()),
        end_user: Some("user-7".to_string()),
        record_prompt: "full".to_string(),
        prompt: Some("a red fox in fresh snow".to_string()),
        negative_prompt: None,
        prompt_sha256: Some("ab".repeat(32)),
        negative_prompt_sha256: None,
        parameters: json!({
            "model": "gpt-image-1", "n": 2, "size": "1024x1024", "quality": "high", "style": "vivid",
            "seed": 42, "steps": 30, "guidance_scale": 7.5, "response_format": "b64_json"
        }),
        contract: None,
        attempts: vec![
            AttemptRecord {
                span_id: "b1b1b1b1b1b1b1b1".to_string(),
                route: "marketing".to_string(),
                target: 0,
                provider: "oai".to_string(),
                provider_kind: "openai".to_string(),
                endpoint_host: Some("api.openai.com".to_string()),
                model: "gpt-image-1".to_string(),
                model_version: None,
                start_offset_ms: 2.0,
                latency_ms: 500.25,
                queue_ms: 1.5,
                result: "eval_failed".to_string(),
                error: Some("safety: image 0 failed".to_string()),
                cost_usd: Some(0.04),
                role: "primary".to_string(),
                evaluations: vec![EvaluationRecord {
                    image: 0,
                    evaluator: "safety".to_string(),
                    score: 0.125,
                    verdict: "fail".to_string(),
                    reason: "nudity score 0.875 over 0.5".to_string(),
                }],
            },
            AttemptRecord {
                span_id: "c1c1c1c1c1c1c1c1".to_string(),
                route: "marketing".to_string(),
                target: 1,
                provider: "az-east".to_string(),
                provider_kind: "azure_openai".to_string(),
                endpoint_host: Some("acme-east.openai.azure.com".to_string()),
                model: "gpt-image-1".to_string(),
                model_version: Some("gpt-image-1-2025-04-15".to_string()),
                start_offset_ms: 510.0,
                latency_ms: 700.5,
                queue_ms: 0.0,
                result: "ok".to_string(),
                error: None,
                cost_usd: Some(0.08),
                role: "fallback".to_string(),
                evaluations: vec![
                    EvaluationRecord {
                        image: 0,
                        evaluator: "safety".to_string(),
                        score: 0.75,
                        verdict: "pass".to_string(),
                        reason: "nothing unsafe".to_string(),
                    },
                    EvaluationRecord {
                        image: 1,
                        evaluator: "sanity".to_string(),
                        score: 1.0,
                        verdict: "pass".to_string(),
                        reason: "ok".to_string(),
                    },
                ],
            },
        ],
        generation: Some(GenerationRecord {
            seed: Some(42),
            sampler: None,
            steps: Some(30),
            guidance: None,
            model_version: Some("gpt-image-1-2025-04-15".to_string()),
        }),
        decision: "pass".to_string(),
        outcome: "ok".to_string(),
        status: 200,
        error_code: None,
        images: vec![ImageRecord { index: 0, ..Default::default() }, ImageRecord { index: 1, ..Default::default() }],
        cost_usd: Some(0.12),
        canary: false,
        regeneration: None,
        pending_images: Vec::new(),
    }
}

/// Every attempt failed; the route records prompts as hashes only.
fn failed_record(trace_id: &str) -> TraceRecord {
    TraceRecord {
        trace_id: trace_id.to_string(),
        span_id: "d1d1d1d1d1d1d1d1".to_string(),
        kind: "primary".to_string(),
        start_time_unix_nano: START + 5_000_000_000,
        duration_ms: 80.0,
        route: Some("marketing".to_string()),
        operation: "edits".to_string(),
        record_prompt: "sha256".to_string(),
        prompt: None,
        prompt_sha256: Some("cd".repeat(32)),
        parameters: json!({"model": "sd3", "size": "512x512"}),
        attempts: vec![AttemptRecord {
            span_id: "e1e1e1e1e1e1e1e1".to_string(),
            route: "marketing".to_string(),
            provider: "stab".to_string(),
            provider_kind: "stability".to_string(),
            model: "sd3-large".to_string(),
            start_offset_ms: 1.0,
            latency_ms: 75.0,
            result: "status_5xx".to_string(),
            error: Some("HTTP 503".to_string()),
            role: "primary".to_string(),
            ..Default::default()
        }],
        decision: "error".to_string(),
        outcome: "provider_error".to_string(),
        status: 502,
        error_code: Some("upstream_error".to_string()),
        ..Default::default()
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn by_span_id<'a>(spans: &'a [Value], id: &str) -> &'a Value {
    spans.iter().find(|s| s["span_id"] == id).unwrap_or_else(|| panic!("no span {id} in {spans:#?}"))
}

async fn flush(exporter: &Exporter) {
    tokio::time::timeout(Duration::from_secs(30), exporter.force_flush()).await.expect("flush finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn spans_reach_a_real_receiver_over_http() {
    let rx = Receiver::start();
    // The base URL; `/v1/traces` is added.
    let cfg = TelemetryConfig { headers: vec![("x-tenant-key".into(), "k-123".into())], ..config(&rx.url) };
    let exporter = Exporter::new(&cfg).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    exporter.export(&[fallback_record(trace)]);
    flush(&exporter).await;
    assert_eq!(exporter.stats(), ExportStats { spans_exported: 3, ..Default::default() });

    // One request, protobuf, to /v1/traces, with the configured header.
    let requests: Vec<Value> = serde_json::from_str(&http_get(&rx.url, "/requests")).unwrap();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0]["path"], "/v1/traces");
    assert_eq!(requests[0]["spans"], 3);
    assert_eq!(requests[0]["headers"]["content-type"], "application/x-protobuf");
    assert_eq!(requests[0]["headers"]["x-tenant-key"], "k-123");

    let spans = rx.spans(trace);
    assert_eq!(spans.len(), 3, "{spans:#?}");

    // The tree: the server span continues the client's trace; both attempts are its children.
    let server = by_span_id(&spans, "a1a1a1a1a1a1a1a1");
    let first = by_span_id(&spans, "b1b1b1b1b1b1b1b1");
    let second = by_span_id(&spans, "c1c1c1c1c1c1c1c1");
    assert_eq!(server["parent_span_id"], CLIENT_PARENT);
    assert_eq!(first["parent_span_id"], "a1a1a1a1a1a1a1a1");
    assert_eq!(second["parent_span_id"], "a1a1a1a1a1a1a1a1");
    for s in &spans {
        assert_eq!(s["trace_id"], trace);
        assert_eq!(s["resource"]["service.name"], "acc");
        assert_eq!(s["resource"]["service.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(s["scope"], "acc");
        assert_eq!(attr(s, GEN_AI_OPERATION_NAME), "generate_content");
        assert_eq!(attr(s, GEN_AI_OUTPUT_TYPE), "image");
        assert_eq!(attr(s, GEN_AI_REQUEST_MODEL), "gpt-image-1");
        assert_eq!(attr(s, GEN_AI_REQUEST_CHOICE_COUNT), 2);
        assert_eq!(attr(s, GEN_AI_REQUEST_SEED), 42);
        assert_eq!(attr(s, GEN_AI_IMAGE_SIZE), "1024x1024");
        assert_eq!(attr(s, GEN_AI_IMAGE_QUALITY), "high");
        assert_eq!(attr(s, GEN_AI_IMAGE_STYLE), "vivid");
        assert_eq!(attr(s, GEN_AI_IMAGE_STEPS), 30);
        assert_eq!(attr(s, GEN_AI_IMAGE_GUIDANCE_SCALE), 7.5);
        assert_eq!(attr(s, GEN_AI_IMAGE_SEED), 42);
        assert_eq!(attr(s, GEN_AI_IMAGE_COUNT), 2);
    }

    // Names, kinds, times (nanoseconds from the record's start and milliseconds).
    assert_eq!(server["name"], "POST /v1/images/generations");
    assert_eq!(server["kind"], "SPAN_KIND_SERVER");
    assert_eq!(server["start_time_unix_nano"], START);
    assert_eq!(server["end_time_unix_nano"], START + 1_234_500_000);
    assert_eq!(first["name"], "generate_content gpt-image-1");
    assert_eq!(first["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(first["start_time_unix_nano"], START + 2_000_000);
    assert_eq!(first["end_time_unix_nano"], START + 2_000_000 + 500_250_000);
    assert_eq!(second["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(second["start_time_unix_nano"], START + 510_000_000);
    assert_eq!(second["end_time_unix_nano"], START + 510_000_000 + 700_500_000);

    // The server span: the request, ACC's fields, the prompt (recorded in full here).
    assert_eq!(attr(server, GEN_AI_IMAGE_PROMPT), "a red fox in fresh snow");
    assert_eq!(attr(server, HTTP_RESPONSE_STATUS_CODE), 200);
    assert_eq!(attr(server, HTTP_ROUTE), "/v1/images/generations");
    assert_eq!(attr(server, ACC_ROUTE), "marketing");
    assert_eq!(attr(server, ACC_TENANT), "acme");
    assert_eq!(attr(server, ACC_COHORT), "beta");
    assert_eq!(attr(server, ACC_PROMPT_TEMPLATE), "hero@3");
    assert_eq!(attr(server, ACC_ASSET_TYPE), "banner");
    assert_eq!(attr(server, ACC_DECISION), "pass");
    assert_eq!(attr(server, ACC_OUTCOME), "ok");
    assert_eq!(attr(server, ACC_COST_USD), 0.12);
    assert_eq!(attr(server, ACC_IMAGE_COUNT), 2);
    assert_eq!(attr(server, ACC_GENERATION_SEED), 42);
    assert_eq!(attr(server, ACC_GENERATION_MODEL_VERSION), "gpt-image-1-2025-04-15");
    assert!(attr(server, ERROR_TYPE).is_null());
    assert!(attr(server, GEN_AI_PROVIDER_NAME).is_null());
    assert!(attr(server, "acc.end_user").is_null(), "the end user stays in the store");
    assert_eq!(server["status"]["code"], "STATUS_CODE_UNSET");
    assert_eq!(server["events"], json!([]));
    assert_eq!(server["links"], json!([]));

    // The failed first attempt: error status and type, its evaluation as an event at its end.
    assert_eq!(attr(first, GEN_AI_PROVIDER_NAME), "openai");
    assert_eq!(attr(first, SERVER_ADDRESS), "api.openai.com");
    assert_eq!(attr(first, ERROR_TYPE), "eval_failed");
    assert!(attr(first, GEN_AI_RESPONSE_MODEL).is_null(), "a failed attempt has no response model");
    assert_eq!(attr(first, ACC_ATTEMPT_ROLE), "primary");
    assert_eq!(attr(first, ACC_ATTEMPT_RESULT), "eval_failed");
    assert_eq!(attr(first, ACC_ATTEMPT_PROVIDER), "oai");
    assert_eq!(attr(first, ACC_ATTEMPT_TARGET), 0);
    assert_eq!(attr(first, ACC_ATTEMPT_QUEUE_MS), 1.5);
    assert_eq!(attr(first, ACC_COST_USD), 0.04);
    assert_eq!(first["status"], json!({"code": "STATUS_CODE_ERROR", "message": "safety: image 0 failed"}));
    assert_eq!(
        first["events"],
        json!([{
            "name": "gen_ai.evaluation.result",
            "time_unix_nano": START + 2_000_000 + 500_250_000,
            "attributes": {
                "gen_ai.evaluation.name": "safety",
                "gen_ai.evaluation.score.value": 0.125,
                "gen_ai.evaluation.score.label": "fail",
                "gen_ai.evaluation.explanation": "nudity score 0.875 over 0.5",
                "acc.image.index": 0
            }
        }])
    );

    // The successful fallback: well-known provider name, the model that answered, two events.
    assert_eq!(attr(second, GEN_AI_PROVIDER_NAME), "azure.ai.openai");
    assert_eq!(attr(second, GEN_AI_RESPONSE_MODEL), "gpt-image-1-2025-04-15");
    assert_eq!(attr(second, SERVER_ADDRESS), "acme-east.openai.azure.com");
    assert_eq!(attr(second, ACC_ATTEMPT_ROLE), "fallback");
    assert_eq!(attr(second, ACC_ATTEMPT_PROVIDER_KIND), "azure_openai");
    assert!(attr(second, ERROR_TYPE).is_null());
    assert_eq!(second["status"]["code"], "STATUS_CODE_UNSET");
    let events = second["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["name"], "gen_ai.evaluation.result");
    assert_eq!(events[0]["attributes"][GEN_AI_EVALUATION_NAME], "safety");
    assert_eq!(events[0]["attributes"][GEN_AI_EVALUATION_SCORE_VALUE], 0.75);
    assert_eq!(events[0]["attributes"][GEN_AI_EVALUATION_SCORE_LABEL], "pass");
    assert_eq!(events[0]["attributes"][GEN_AI_EVALUATION_EXPLANATION], "nothing unsafe");
    assert_eq!(events[0]["attributes"][ACC_IMAGE_INDEX], 0);
    assert_eq!(events[1]["attributes"][GEN_AI_EVALUATION_NAME], "sanity");
    assert_eq!(events[1]["attributes"][GEN_AI_EVALUATION_SCORE_VALUE], 1.0);
    assert_eq!(events[1]["attributes"][ACC_IMAGE_INDEX], 1);
    // The prompt is on the server span only.
    assert!(attr(first, GEN_AI_IMAGE_PROMPT).is_null() && attr(second, GEN_AI_IMAGE_PROMPT).is_null());

    exporter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn failures_mirrors_and_unrecorded_prompts() {
    let rx = Receiver::start();
    let exporter = Exporter::new(&config(&format!("{}/v1/traces", rx.url))).unwrap();
    let primary = "11111111111111111111111111111111";
    let failed = "22222222222222222222222222222222";
    let mirror_trace = "33333333333333333333333333333333";
    let mut mirror = fallback_record(mirror_trace);
    mirror.kind = "mirror".to_string();
    mirror.parent_trace_id = Some(primary.to_string());
    // For a mirror copy the parent span is the primary's server span, in the primary's trace.
    mirror.parent_span_id = Some("a1a1a1a1a1a1a1a1".to_string());
    mirror.span_id = "f1f1f1f1f1f1f1f1".to_string();
    mirror.record_prompt = "none".to_string();
    mirror.prompt = None;
    mirror.prompt_sha256 = None;
    exporter.export(&[failed_record(failed), mirror]);
    flush(&exporter).await;
    assert_eq!(exporter.stats().spans_exported, 5);

    // Every attempt failed: 502 with the error code as error.type, the server span in error.
    let spans = rx.spans(failed);
    assert_eq!(spans.len(), 2);
    let server = by_span_id(&spans, "d1d1d1d1d1d1d1d1");
    assert_eq!(server["name"], "POST /v1/images/edits");
    assert_eq!(server["parent_span_id"], "", "no traceparent: a root span");
    assert_eq!(attr(server, ERROR_TYPE), "upstream_error");
    assert_eq!(attr(server, HTTP_RESPONSE_STATUS_CODE), 502);
    assert_eq!(server["status"], json!({"code": "STATUS_CODE_ERROR", "message": "upstream_error"}));
    assert!(attr(server, GEN_AI_REQUEST_SEED).is_null());
    assert!(attr(server, GEN_AI_REQUEST_CHOICE_COUNT).is_null());
    let attempt = by_span_id(&spans, "e1e1e1e1e1e1e1e1");
    assert_eq!(attempt["name"], "generate_content sd3-large", "the model the attempt asked of its provider");
    assert_eq!(attr(attempt, GEN_AI_REQUEST_MODEL), "sd3-large");
    assert_eq!(attr(server, GEN_AI_REQUEST_MODEL), "sd3");
    assert_eq!(attr(attempt, GEN_AI_PROVIDER_NAME), "stability");
    assert_eq!(attr(attempt, ERROR_TYPE), "status_5xx");
    assert!(attr(attempt, SERVER_ADDRESS).is_null());
    assert_eq!(attempt["status"]["code"], "STATUS_CODE_ERROR");

    // The mirror: a trace of its own, its server span a root linked to the primary's.
    let spans = rx.spans(mirror_trace);
    assert_eq!(spans.len(), 3);
    let server = by_span_id(&spans, "f1f1f1f1f1f1f1f1");
    assert_eq!(server["parent_span_id"], "");
    assert_eq!(attr(server, ACC_KIND), "mirror");
    assert_eq!(
        server["links"],
        json!([{"trace_id": primary, "span_id": "a1a1a1a1a1a1a1a1", "attributes": {"acc.link.kind": "primary"}}])
    );
    assert_eq!(by_span_id(&spans, "b1b1b1b1b1b1b1b1")["parent_span_id"], "f1f1f1f1f1f1f1f1");

    // Neither record kept its prompt, so no span or event carries one.
    let everything = rx.all_spans();
    assert_eq!(everything.len(), 5);
    for s in &everything {
        let text = s.to_string();
        assert!(!text.contains(GEN_AI_IMAGE_PROMPT), "{text}");
        assert!(!text.contains("a red fox"), "{text}");
    }
    exporter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn spans_reach_a_real_receiver_over_grpc() {
    let rx = Receiver::start();
    let Some(url) = rx.grpc_url() else {
        eprintln!("the receiver runs without gRPC (grpcio not installed); skipping");
        return;
    };
    let cfg = TelemetryConfig {
        protocol: Protocol::Grpc,
        headers: vec![("x-tenant-key".into(), "k-123".into())],
        ..config(&url)
    };
    let exporter = Exporter::new(&cfg).unwrap();
    let trace = "44444444444444444444444444444444";
    exporter.export(&[fallback_record(trace)]);
    flush(&exporter).await;
    assert_eq!(exporter.stats().spans_exported, 3, "{:?}", exporter.stats());
    let spans = rx.spans(trace);
    assert_eq!(spans.len(), 3);
    assert_eq!(by_span_id(&spans, "c1c1c1c1c1c1c1c1")["parent_span_id"], "a1a1a1a1a1a1a1a1");
    let requests: Vec<Value> = serde_json::from_str(&http_get(&rx.url, "/requests")).unwrap();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0]["headers"]["x-tenant-key"], "k-123", "{requests:#?}");
    exporter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unreachable_collector_never_blocks_export_and_is_counted() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = TelemetryConfig { timeout: Duration::from_millis(800), ..config(&format!("http://127.0.0.1:{port}")) };
    let exporter = Exporter::new(&cfg).unwrap();
    let registry = Registry::new();
    exporter.register_metrics(&registry).unwrap();

    let records: Vec<TraceRecord> = (0..50).map(|i| fallback_record(&format!("{:032x}", 0xabc000 + i))).collect();
    let t = Instant::now();
    exporter.export(&records);
    assert!(t.elapsed() < Duration::from_millis(200), "export() took {:?}", t.elapsed());
    flush(&exporter).await;
    let stats = exporter.stats();
    assert_eq!(stats.spans_exported, 0);
    assert!(stats.export_errors >= 1, "{stats:?}");
    assert_eq!(stats.spans_failed, 150, "{stats:?}");

    let metrics = metric_values(&registry);
    assert_eq!(metrics["acc_otlp_export_errors_total"], stats.export_errors as f64);
    assert_eq!(metrics["acc_otlp_dropped_total{reason=export_failed}"], 150.0);
    assert_eq!(metrics["acc_otlp_spans_exported_total"], 0.0);

    // Stopping does not hang on the dead collector either, and later records are counted.
    let t = Instant::now();
    exporter.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
    exporter.export(&records[..2]);
    assert_eq!(exporter.stats().records_dropped_shutdown, 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_and_counts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = TelemetryConfig {
        queue_records: 2,
        timeout: Duration::from_millis(300),
        ..config(&format!("http://127.0.0.1:{port}"))
    };
    let exporter = Exporter::new(&cfg).unwrap();
    // On this one thread the export task cannot run until the test awaits.
    let records: Vec<TraceRecord> = (0..5).map(|i| fallback_record(&format!("{:032x}", 0xdef000 + i))).collect();
    exporter.export(&records);
    assert_eq!(exporter.stats().records_dropped_queue_full, 3);
    // Ids that are not W3C ids are refused, not sent.
    let mut bad = fallback_record("not-a-trace-id");
    exporter.export(std::slice::from_ref(&bad));
    bad.trace_id = "55555555555555555555555555555555".to_string();
    bad.attempts[0].span_id = "short".to_string();
    flush(&exporter).await;
    exporter.export(&[bad]);
    flush(&exporter).await;
    assert_eq!(exporter.stats().records_invalid, 2);
    exporter.shutdown().await;
}

#[test]
fn endpoints_and_headers_are_checked() {
    assert_eq!(http_endpoint("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(http_endpoint("http://127.0.0.1:4318/").unwrap(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(http_endpoint("https://otlp.example.com/v1/traces").unwrap(), "https://otlp.example.com/v1/traces");
    assert_eq!(http_endpoint("https://example.com/otlp").unwrap(), "https://example.com/otlp/v1/traces");
    assert_eq!(grpc_endpoint("http://127.0.0.1:4317/").unwrap(), "http://127.0.0.1:4317");
    assert_eq!(grpc_endpoint("http://127.0.0.1:4317/v1/traces").unwrap(), "http://127.0.0.1:4317");
    assert!(http_endpoint("127.0.0.1:4318").is_err());
    assert!(http_endpoint("ftp://x/").is_err());
    assert!(header_map(&[("x-api-key".into(), "k".into())]).is_ok());
    assert!(header_map(&[("bad header".into(), "k".into())]).is_err());
    assert!(header_map(&[("x".into(), "a\nb".into())]).is_err());
    // Outside a runtime there is nothing to run the export task on.
    assert!(Exporter::new(&TelemetryConfig::default()).is_err());
}

#[tokio::test]
async fn https_collectors_are_accepted() {
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let cfg = TelemetryConfig {
            protocol,
            headers: vec![("x-api-key".into(), "secret".into())],
            ..config("https://otlp.example.com:4318")
        };
        let exporter = Exporter::new(&cfg).unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        exporter.shutdown().await;
    }
}

#[tokio::test]
async fn metrics_are_registered_once() {
    let exporter = Exporter::new(&TelemetryConfig::default()).unwrap();
    let registry = Registry::new();
    exporter.register_metrics(&registry).unwrap();
    assert!(exporter.register_metrics(&Registry::new()).is_err());
    let metrics = metric_values(&registry);
    assert_eq!(metrics["acc_otlp_spans_exported_total"], 0.0);
    assert_eq!(metrics["acc_otlp_export_errors_total"], 0.0);
    assert_eq!(metrics["acc_otlp_dropped_total{reason=queue_full}"], 0.0);
    exporter.shutdown().await;
}

/// `name` or `name{label=value}` to the counter's value, from the text exposition.
fn metric_values(registry: &Registry) -> std::collections::HashMap<String, f64> {
    let mut text = String::new();
    prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.replace('"', ""), v.parse().unwrap()))
        .collect()
}
