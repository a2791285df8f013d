//! A finished [`TraceRecord`] as OpenTelemetry spans.
//!
//! The spans are built after the fact as `SpanData`, the SDK's export form, straight from the
//! record: its ids, its times, its attempts. Going through the SDK's `Tracer` instead would need
//! an id generator fed the record's ids and explicit start and end times for every span, only to
//! produce the same `SpanData` through a span processor; here each field is visibly the record's.
//!
//! - One SERVER span per record: `trace_id`, `span_id`; parent = the client's `traceparent` span
//!   (`parent_span_id`, remote) for a primary; from `start_time_unix_nano` for `duration_ms`.
//! - One CLIENT span per attempt, child of the server span: the attempt's `span_id` (the one its
//!   provider got in `traceparent`), from `start_offset_ms` after arrival for `latency_ms`; each
//!   evaluator verdict is a `gen_ai.evaluation.result` event on it, at the attempt's end.
//! - A mirror copy (`kind = "mirror"`) is a trace of its own whose server span has no parent and
//!   links to the primary's trace (`parent_trace_id`; the linked span is the record's
//!   `parent_span_id`, the primary's server span, when the record names it).
//!
//! Both kinds of span carry the request (`gen_ai.request.*`, `gen_ai.image.*`); a server
//! span's `gen_ai.request.model` is the model the client named, a client span's the model its
//! attempt asked of the provider (also `acc.attempt.model`), as the conventions define it for
//! the call each span describes. The prompt appears once per trace, on the server span, and only when
//! the store kept it in full (`record.prompt` is `Some` only under `record_prompt = "full"`); the
//! OpenAI `user` field stays in the store.
//!
//! Failures: a client span whose attempt did not succeed has status Error and `error.type` = its
//! result label. The server span follows the HTTP server conventions: `error.type` (the OpenAI
//! error code, else the outcome) from status 400, status Error from 500 only, since a 4xx is the
//! gateway doing its job (a blocked image, a spent budget) rather than failing.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use serde_json::Value as Json;

use super::attributes::*;
use crate::store::record::{AttemptRecord, TraceRecord};

/// Why a record produced no spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Invalid {
    /// `trace_id` is not 32 hex digits (or is all zeros).
    TraceId,
    /// `span_id` is not 16 hex digits (or is all zeros).
    SpanId,
}

/// The record's spans: its server span first, then one client span per attempt. An attempt
/// whose span id does not parse is left out (its siblings are still exported).
pub(super) fn record_spans(r: &TraceRecord, scope: &InstrumentationScope) -> Result<Vec<SpanData>, Invalid> {
    let trace_id = parse_trace_id(&r.trace_id).ok_or(Invalid::TraceId)?;
    let span_id = parse_span_id(&r.span_id).ok_or(Invalid::SpanId)?;
    let mirror = r.kind == "mirror";
    let start = unix_nanos(r.start_time_unix_nano);
    let parent = if mirror { None } else { r.parent_span_id.as_deref().and_then(parse_span_id) };

    let mut links = Vec::new();
    if let Some(primary) = r.parent_trace_id.as_deref().and_then(parse_trace_id) {
        let linked = r.parent_span_id.as_deref().and_then(parse_span_id).unwrap_or(SpanId::INVALID);
        let cx = SpanContext::new(primary, linked, TraceFlags::SAMPLED, true, TraceState::NONE);
        links.push(Link::new(cx, vec![KeyValue::new(ACC_LINK_KIND, "primary")], 0));
    }

    let request = RequestParams::of(&r.parameters);
    let mut spans = Vec::with_capacity(1 + r.attempts.len());
    spans.push(SpanData {
        span_context: context(trace_id, span_id),
        parent_span_id: parent.unwrap_or(SpanId::INVALID),
        parent_span_is_remote: parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(format!("POST /v1/images/{}", r.operation)),
        start_time: start,
        end_time: start + millis(r.duration_ms),
        attributes: server_attributes(r, &request),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: span_links(links),
        status: if r.status >= 500 { Status::error(error_type(r)) } else { Status::Unset },
        instrumentation_scope: scope.clone(),
    });
    for a in &r.attempts {
        let Some(id) = parse_span_id(&a.span_id) else { continue };
        let a_start = start + millis(a.start_offset_ms);
        let a_end = a_start + millis(a.latency_ms);
        let events = a
            .evaluations
            .iter()
            .map(|e| {
                let attributes = vec![
                    KeyValue::new(GEN_AI_EVALUATION_NAME, e.evaluator.clone()),
                    KeyValue::new(GEN_AI_EVALUATION_SCORE_VALUE, f64::from(e.score)),
                    KeyValue::new(GEN_AI_EVALUATION_SCORE_LABEL, e.verdict.clone()),
                    KeyValue::new(GEN_AI_EVALUATION_EXPLANATION, e.reason.clone()),
                    KeyValue::new(ACC_IMAGE_INDEX, e.image as i64),
                ];
                Event::new(GEN_AI_EVALUATION_RESULT, a_end, attributes, 0)
            })
            .collect();
        let ok = a.result == "ok";
        spans.push(SpanData {
            span_context: context(trace_id, id),
            parent_span_id: span_id,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Owned(format!(
                "{OPERATION_GENERATE_CONTENT} {}",
                Some(a.model.as_str()).filter(|m| !m.is_empty()).or(request.model.as_deref()).unwrap_or_default()
            )),
            start_time: a_start,
            end_time: a_end,
            attributes: client_attributes(a, &request),
            dropped_attributes_count: 0,
            events: span_events(events),
            links: SpanLinks::default(),
            status: if ok { Status::Unset } else { Status::error(a.error.clone().unwrap_or_else(|| a.result.clone())) },
            instrumentation_scope: scope.clone(),
        });
    }
    Ok(spans)
}

// Both are `#[non_exhaustive]` with public fields.
fn span_links(links: Vec<Link>) -> SpanLinks {
    let mut out = SpanLinks::default();
    out.links = links;
    out
}

fn span_events(events: Vec<Event>) -> SpanEvents {
    let mut out = SpanEvents::default();
    out.events = events;
    out
}

/// `gen_ai.provider.name` for a provider kind: the conventions' well-known value where one
/// exists, the kind itself otherwise (`stability`, `fal`, `replicate`, `a1111`, `builtin`).
pub fn provider_name(kind: &str) -> &str {
    match kind {
        "openai" => "openai",
        "azure" | "azure_openai" => "azure.ai.openai",
        "vertex" | "vertex_imagen" | "vertex_ai" => "gcp.vertex_ai",
        "gemini" => "gcp.gemini",
        "bedrock" | "aws_bedrock" => "aws.bedrock",
        other => other,
    }
}

/// The request's parameters the spans carry, read once per record.
struct RequestParams {
    model: Option<String>,
    n: Option<i64>,
    seed: Option<i64>,
    /// `gen_ai.image.*` except the prompt.
    image: Vec<KeyValue>,
}

impl RequestParams {
    fn of(p: &Json) -> RequestParams {
        let model = p.get("model").and_then(json_string);
        let n = p.get("n").and_then(json_i64);
        let seed = p.get("seed").and_then(json_i64);
        let mut image = Vec::new();
        for (field, key) in [
            ("size", GEN_AI_IMAGE_SIZE),
            ("quality", GEN_AI_IMAGE_QUALITY),
            ("style", GEN_AI_IMAGE_STYLE),
            ("background", GEN_AI_IMAGE_BACKGROUND),
            ("output_format", GEN_AI_IMAGE_OUTPUT_FORMAT),
            ("moderation", GEN_AI_IMAGE_MODERATION),
            ("input_fidelity", GEN_AI_IMAGE_INPUT_FIDELITY),
        ] {
            if let Some(v) = p.get(field).and_then(json_string) {
                image.push(KeyValue::new(key, v));
            }
        }
        for (field, key) in
            [("output_compression", GEN_AI_IMAGE_OUTPUT_COMPRESSION), ("partial_images", GEN_AI_IMAGE_PARTIAL_IMAGES)]
        {
            if let Some(v) = p.get(field).and_then(json_i64) {
                image.push(KeyValue::new(key, v));
            }
        }
        if let Some(v) = p.get("stream").and_then(Json::as_bool) {
            image.push(KeyValue::new(GEN_AI_IMAGE_STREAM, v));
        }
        if let Some(v) = p.get("steps").and_then(json_i64) {
            image.push(KeyValue::new(GEN_AI_IMAGE_STEPS, v));
        }
        if let Some(v) = p.get("guidance_scale").and_then(json_f64) {
            image.push(KeyValue::new(GEN_AI_IMAGE_GUIDANCE_SCALE, v));
        }
        if let Some(v) = seed {
            image.push(KeyValue::new(GEN_AI_IMAGE_SEED, v));
        }
        if let Some(v) = n {
            image.push(KeyValue::new(GEN_AI_IMAGE_COUNT, v));
        }
        RequestParams { model, n, seed, image }
    }

    /// The attributes both kinds of span carry; `asked` is the model a client span's attempt
    /// asked of its provider (its `gen_ai.request.model`; the server span's is the client's).
    fn common(&self, out: &mut Vec<KeyValue>, asked: Option<&str>) {
        out.push(KeyValue::new(GEN_AI_OPERATION_NAME, OPERATION_GENERATE_CONTENT));
        out.push(KeyValue::new(GEN_AI_OUTPUT_TYPE, OUTPUT_TYPE_IMAGE));
        if let Some(m) = asked.filter(|m| !m.is_empty()).or(self.model.as_deref()) {
            out.push(KeyValue::new(GEN_AI_REQUEST_MODEL, m.to_string()));
        }
        if let Some(n) = self.n {
            out.push(KeyValue::new(GEN_AI_REQUEST_CHOICE_COUNT, n));
        }
        if let Some(seed) = self.seed {
            out.push(KeyValue::new(GEN_AI_REQUEST_SEED, seed));
        }
        out.extend(self.image.iter().cloned());
    }
}

fn server_attributes(r: &TraceRecord, request: &RequestParams) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(40);
    request.common(&mut out, None);
    if let Some(p) = &r.prompt {
        out.push(KeyValue::new(GEN_AI_IMAGE_PROMPT, p.clone()));
    }
    if let Some(p) = &r.negative_prompt {
        out.push(KeyValue::new(GEN_AI_IMAGE_NEGATIVE_PROMPT, p.clone()));
    }
    out.push(KeyValue::new(HTTP_REQUEST_METHOD, "POST"));
    out.push(KeyValue::new(HTTP_ROUTE, format!("/v1/images/{}", r.operation)));
    out.push(KeyValue::new(HTTP_RESPONSE_STATUS_CODE, i64::from(r.status)));
    if r.status >= 400 {
        out.push(KeyValue::new(ERROR_TYPE, error_type(r)));
    }
    out.push(KeyValue::new(ACC_KIND, r.kind.clone()));
    out.push(KeyValue::new(ACC_OPERATION, r.operation.clone()));
    let optional = [
        (ACC_ROUTE, &r.route),
        (ACC_TENANT, &r.tenant),
        (ACC_KEY_NAME, &r.key_name),
        (ACC_COHORT, &r.cohort),
        (ACC_PROMPT_TEMPLATE, &r.prompt_template),
        (ACC_ASSET_TYPE, &r.asset_type),
        (ACC_PROMPT_SHA256, &r.prompt_sha256),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            out.push(KeyValue::new(key, v.clone()));
        }
    }
    out.push(KeyValue::new(ACC_RECORD_PROMPT, r.record_prompt.clone()));
    out.push(KeyValue::new(ACC_DECISION, r.decision.clone()));
    out.push(KeyValue::new(ACC_OUTCOME, r.outcome.clone()));
    out.push(KeyValue::new(ACC_CANARY, r.canary));
    out.push(KeyValue::new(ACC_IMAGE_COUNT, r.images.len() as i64));
    if let Some(c) = r.cost_usd {
        out.push(KeyValue::new(ACC_COST_USD, c));
    }
    if let Some(g) = &r.generation {
        if let Some(v) = g.seed.and_then(|s| i64::try_from(s).ok()) {
            out.push(KeyValue::new(ACC_GENERATION_SEED, v));
        }
        if let Some(v) = &g.sampler {
            out.push(KeyValue::new(ACC_GENERATION_SAMPLER, v.clone()));
        }
        if let Some(v) = g.steps {
            out.push(KeyValue::new(ACC_GENERATION_STEPS, i64::from(v)));
        }
        if let Some(v) = g.guidance {
            out.push(KeyValue::new(ACC_GENERATION_GUIDANCE, v));
        }
        if let Some(v) = &g.model_version {
            out.push(KeyValue::new(ACC_GENERATION_MODEL_VERSION, v.clone()));
        }
    }
    out
}

fn client_attributes(a: &AttemptRecord, request: &RequestParams) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(30);
    request.common(&mut out, Some(&a.model));
    out.push(KeyValue::new(GEN_AI_PROVIDER_NAME, provider_name(&a.provider_kind).to_string()));
    let ok = a.result == "ok";
    // Only an attempt that answered has a model that generated the response.
    if ok {
        let model = a.model_version.as_deref().unwrap_or(&a.model);
        out.push(KeyValue::new(GEN_AI_RESPONSE_MODEL, model.to_string()));
    } else {
        out.push(KeyValue::new(ERROR_TYPE, a.result.clone()));
    }
    if let Some(host) = &a.endpoint_host {
        out.push(KeyValue::new(SERVER_ADDRESS, host.clone()));
    }
    out.push(KeyValue::new(ACC_ATTEMPT_ROLE, a.role.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_RESULT, a.result.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_PROVIDER, a.provider.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_PROVIDER_KIND, a.provider_kind.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_MODEL, a.model.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_ROUTE, a.route.clone()));
    out.push(KeyValue::new(ACC_ATTEMPT_TARGET, a.target as i64));
    out.push(KeyValue::new(ACC_ATTEMPT_QUEUE_MS, a.queue_ms));
    if let Some(c) = a.cost_usd {
        out.push(KeyValue::new(ACC_COST_USD, c));
    }
    out
}

/// The server span's `error.type`: the OpenAI error code sent, else the outcome.
fn error_type(r: &TraceRecord) -> String {
    r.error_code.clone().unwrap_or_else(|| r.outcome.clone())
}

fn context(trace_id: TraceId, span_id: SpanId) -> SpanContext {
    SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::NONE)
}

/// Exactly 32 hex digits, not all zeros.
fn parse_trace_id(hex: &str) -> Option<TraceId> {
    (hex.len() == 32).then(|| TraceId::from_hex(hex).ok()).flatten().filter(|t| *t != TraceId::INVALID)
}

/// Exactly 16 hex digits, not all zeros.
fn parse_span_id(hex: &str) -> Option<SpanId> {
    (hex.len() == 16).then(|| SpanId::from_hex(hex).ok()).flatten().filter(|s| *s != SpanId::INVALID)
}

fn unix_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// A record's milliseconds as a duration (negative or not finite: zero).
fn millis(ms: f64) -> Duration {
    if ms.is_finite() && ms > 0.0 {
        Duration::from_nanos((ms * 1e6).round() as u64)
    } else {
        Duration::ZERO
    }
}

fn json_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An integer parameter, sent as a number or a string of digits; one beyond `i64` (OTLP's
/// integer) is left out rather than wrapped.
fn json_i64(v: &Json) -> Option<i64> {
    match v {
        Json::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
        }
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn json_f64(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f: &f64| f.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Value;

    #[test]
    fn ids_and_times_are_read_strictly() {
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_some());
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e473").is_none());
        assert!(parse_trace_id(&"0".repeat(32)).is_none());
        assert!(parse_span_id("00f067aa0ba902b7").is_some());
        assert!(parse_span_id("f067aa0ba902b7").is_none());
        assert_eq!(millis(1.5), Duration::from_micros(1500));
        assert_eq!(millis(-3.0), Duration::ZERO);
        assert_eq!(millis(f64::NAN), Duration::ZERO);
    }

    #[test]
    fn provider_kinds_map_to_well_known_names() {
        assert_eq!(provider_name("openai"), "openai");
        assert_eq!(provider_name("azure_openai"), "azure.ai.openai");
        assert_eq!(provider_name("vertex_imagen"), "gcp.vertex_ai");
        assert_eq!(provider_name("stability"), "stability");
    }

    #[test]
    fn parameters_are_typed() {
        let p = RequestParams::of(&serde_json::json!({
            "model": "gpt-image-1", "n": 2, "seed": "42", "steps": 30.0, "guidance_scale": 7,
            "size": "1024x1024", "quality": null, "style": {"x": 1}
        }));
        assert_eq!(p.model.as_deref(), Some("gpt-image-1"));
        assert_eq!((p.n, p.seed), (Some(2), Some(42)));
        let get = |k: &str| p.image.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.clone());
        assert_eq!(get(GEN_AI_IMAGE_STEPS), Some(Value::I64(30)));
        assert_eq!(get(GEN_AI_IMAGE_GUIDANCE_SCALE), Some(Value::F64(7.0)));
        assert_eq!(get(GEN_AI_IMAGE_SIZE), Some(Value::from("1024x1024")));
        assert_eq!(get(GEN_AI_IMAGE_QUALITY), None);
        assert_eq!(get(GEN_AI_IMAGE_STYLE), None);
        assert_eq!(get(GEN_AI_IMAGE_COUNT), Some(Value::I64(2)));
        let gpt = RequestParams::of(&serde_json::json!({
            "background": "transparent", "output_format": "webp", "output_compression": 80,
            "moderation": "low", "input_fidelity": "high", "stream": true, "partial_images": 2
        }));
        let get = |k: &str| gpt.image.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.clone());
        assert_eq!(get(GEN_AI_IMAGE_BACKGROUND), Some(Value::from("transparent")));
        assert_eq!(get(GEN_AI_IMAGE_OUTPUT_FORMAT), Some(Value::from("webp")));
        assert_eq!(get(GEN_AI_IMAGE_OUTPUT_COMPRESSION), Some(Value::I64(80)));
        assert_eq!(get(GEN_AI_IMAGE_MODERATION), Some(Value::from("low")));
        assert_eq!(get(GEN_AI_IMAGE_INPUT_FIDELITY), Some(Value::from("high")));
        assert_eq!(get(GEN_AI_IMAGE_STREAM), Some(Value::Bool(true)));
        assert_eq!(get(GEN_AI_IMAGE_PARTIAL_IMAGES), Some(Value::I64(2)));
    }
}
