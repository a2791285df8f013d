//! OTLP export through the running binary, against the real receiver
//! (`scripts/otlp-receiver.sh`: opentelemetry-proto decoding the protobuf): a request with a
//! fallback and an evaluation exports a server span continuing the client's `traceparent`, one
//! client span per attempt in the OpenTelemetry GenAI conventions, and each verdict as a
//! `gen_ai.evaluation.result` event; a route with `record_prompt = "none"` exports no prompt.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Receiver {
    dir: tempfile::TempDir,
    url: String,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let script = repo_root().join("scripts/otlp-receiver.sh");
        let out = Command::new(&script).arg("start").arg(dir.path()).output().expect("run scripts/otlp-receiver.sh");
        assert!(out.status.success(), "otlp-receiver.sh start: {}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string();
        Receiver { dir, url }
    }

    async fn spans(&self, trace_id: &str, at_least: usize) -> Vec<Value> {
        for _ in 0..200 {
            let all = get(&format!("{}/spans", self.url), &[]).await.json();
            let spans: Vec<Value> =
                all.as_array().unwrap().iter().filter(|s| s["trace_id"] == trace_id).cloned().collect();
            if spans.len() >= at_least {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {at_least} spans of {trace_id} reached the receiver");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/otlp-receiver.sh")).arg("stop").arg(self.dir.path()).output();
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

#[tokio::test]
async fn a_request_exports_its_span_tree_in_the_genai_conventions() {
    let receiver = Receiver::start();
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    first.set_status(500);
    second.answer_with(&noisy(256, 256, 5));
    let policy = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n\n{}{}{}{}",
        receiver.url,
        openai_provider_at("first", &first.base_url()),
        openai_provider_at("second", &second.base_url()),
        route_toml("main", "m").target("first", "gpt-image-1").fallback("spare").with("evaluators = [\"sanity\"]"),
        route_toml("spare", "spare").target("second", "dall-e-3").with("evaluators = [\"sanity\"]"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let r = gw
        .generate_with(
            &json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "256x256", "seed": 9, "quality": "high"}),
            &[
                ("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01")),
                ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
                ("x-acc-cohort", "beta"),
            ],
        )
        .await;
    r.assert_status(200);
    let spans = receiver.spans(trace_id, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "SPAN_KIND_SERVER").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "SPAN_KIND_CLIENT").collect();
    assert_eq!((server.len(), clients.len()), (1, 2), "{spans:#?}");
    let server = server[0];
    assert_eq!(server["parent_span_id"], "b7ad6b7169203331", "the client's traceparent is continued");
    assert_eq!(server["name"], "POST /v1/images/generations");
    assert_eq!(attr(server, "gen_ai.operation.name"), "generate_content");
    assert_eq!(attr(server, "gen_ai.output.type"), "image");
    assert_eq!(attr(server, "gen_ai.request.model"), "m");
    assert_eq!(attr(server, "gen_ai.request.seed"), 9);
    assert_eq!(attr(server, "gen_ai.request.choice.count"), 1);
    assert_eq!(attr(server, "gen_ai.image.prompt"), "a lighthouse at dusk");
    assert_eq!(attr(server, "gen_ai.image.size"), "256x256");
    assert_eq!(attr(server, "gen_ai.image.quality"), "high");
    assert_eq!(attr(server, "acc.route"), "main");
    assert_eq!(attr(server, "acc.cohort"), "beta");
    assert_eq!(attr(server, "acc.decision"), "pass");
    let (failed, ok) = if attr(clients[0], "gen_ai.provider.name") == "openai"
        && clients[0]["status"]["code"] == "STATUS_CODE_ERROR"
    {
        (clients[0], clients[1])
    } else {
        (clients[1], clients[0])
    };
    for c in [failed, ok] {
        assert_eq!(c["parent_span_id"], server["span_id"]);
        assert_eq!(attr(c, "gen_ai.operation.name"), "generate_content");
        assert_eq!(attr(c, "gen_ai.provider.name"), "openai");
        assert_eq!(attr(c, "server.address"), "127.0.0.1");
        assert_eq!(attr(c, "gen_ai.output.type"), "image");
    }
    assert_eq!(failed["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(attr(failed, "error.type"), "status_5xx");
    assert_eq!(attr(failed, "acc.attempt.model"), "gpt-image-1");
    assert_eq!(attr(failed, "gen_ai.request.model"), "gpt-image-1");
    assert_eq!(failed["name"], "generate_content gpt-image-1");
    assert_eq!(failed["events"], json!([]));
    assert_eq!(attr(ok, "acc.attempt.model"), "dall-e-3");
    assert_eq!(attr(ok, "gen_ai.response.model"), "dall-e-3");
    // The providers saw the attempts' own span ids in their traceparent.
    assert_eq!(
        first.last_header("traceparent"),
        Some(format!("00-{trace_id}-{}-01", failed["span_id"].as_str().unwrap()))
    );
    assert_eq!(
        second.last_header("traceparent"),
        Some(format!("00-{trace_id}-{}-01", ok["span_id"].as_str().unwrap()))
    );
    // ...and the client's tracestate, unchanged (W3C Trace Context: a participant passes it on).
    for p in [&first, &second] {
        assert_eq!(p.last_header("tracestate").as_deref(), Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
    }
    let events = ok["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{ok:#}");
    assert_eq!(events[0]["name"], "gen_ai.evaluation.result");
    assert_eq!(events[0]["attributes"]["gen_ai.evaluation.name"], "sanity");
    assert_eq!(events[0]["attributes"]["gen_ai.evaluation.score.label"], "pass");
    assert_eq!(events[0]["attributes"]["gen_ai.evaluation.score.value"], 1.0);
    assert!(events[0]["attributes"]["gen_ai.evaluation.explanation"].as_str().unwrap().contains("256x256"));
    // Times: attempts inside the request, in order.
    let t = |s: &Value, k: &str| s[k].as_u64().unwrap();
    assert!(t(server, "start_time_unix_nano") <= t(failed, "start_time_unix_nano"));
    assert!(t(failed, "end_time_unix_nano") <= t(ok, "start_time_unix_nano") + 1_000_000);
    assert!(t(ok, "end_time_unix_nano") <= t(server, "end_time_unix_nano") + 1_000_000);
    // The counter moves when the exporter has the receiver's answer, a moment after the
    // receiver holds the spans.
    let exported = || async { gw.metric("acc_otlp_spans_exported_total", &[]).await >= 3.0 };
    assert!(eventually(std::time::Duration::from_secs(10), exported).await);
}

#[tokio::test]
async fn record_prompt_none_exports_no_prompt() {
    let receiver = Receiver::start();
    let first = MockProvider::start().await;
    let policy = format!(
        "[telemetry]\notlp_endpoint = \"{}/v1/traces\"\n\n{}{}",
        receiver.url,
        openai_provider_at("first", &first.base_url()),
        route_toml("main", "m").target_default("first").with("record_prompt = \"none\""),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let r = gw.generate(&json!({"model": "m", "prompt": "quokka-secret-91", "negative_prompt": "quokka-neg-91"})).await;
    r.assert_status(200);
    let spans = receiver.spans(&r.header("x-acc-trace-id").unwrap(), 2).await;
    let text = serde_json::to_string(&spans).unwrap();
    assert!(!text.contains("quokka"), "{text}");
    assert_eq!(
        attr(&spans[0], "acc.record_prompt").as_str().or(attr(&spans[1], "acc.record_prompt").as_str()),
        Some("none")
    );
    // A traceparent that is not valid (version 00 with a fifth field) starts a trace of the
    // gateway's own, and the tracestate beside it is not passed on.
    let given = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = gw
        .generate_with(
            &json!({"model": "m", "prompt": "p"}),
            &[("traceparent", &format!("00-{given}-00f067aa0ba902b7-01-x")), ("tracestate", "rojo=1")],
        )
        .await;
    r.assert_status(200);
    assert_ne!(r.header("x-acc-trace-id").as_deref(), Some(given));
    assert!(first.last_header("traceparent").is_some_and(|t| !t.contains(given)));
    assert_eq!(first.last_header("tracestate"), None);
}
