//! What the client gets back: the OpenAI Images answer body in the format it asked for
//! ([`render`]), the OpenAI-shaped error when no attempt succeeded ([`failure`]), and the
//! `x-acc-*` header names and value helpers the pipeline writes on every answer.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::app::App;
use crate::body::{ChunkedBody, Rope};
use crate::error::ApiError;
use crate::policy::{Policy, UrlMode};
use crate::providers::{Generation, Image, ProviderError};
use crate::request::ResponseFormat;
use crate::routing::PlanOutcome;

/// `x-acc-trace-id`: the request's trace id (32 lowercase hex digits; a client may send its own).
pub const TRACE_ID: HeaderName = HeaderName::from_static("x-acc-trace-id");
/// The trace id again as `x-request-id`, the header the OpenAI SDKs expose as a response's
/// request id (`_request_id` in Python, `request_id` in Node), so what an application logs from
/// the SDK names the gateway's trace.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-acc-route`: the name of the route that served the request.
pub const ROUTE: HeaderName = HeaderName::from_static("x-acc-route");
/// `x-acc-provider`: the provider whose answer was returned.
pub const PROVIDER: HeaderName = HeaderName::from_static("x-acc-provider");
/// `x-acc-attempts`: every attempt as `provider:result`, in the order they ended.
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-acc-attempts");
/// `x-acc-decision`: `pass`, `flagged`, `blocked`, `review` (held for human review) or `error`.
pub const DECISION: HeaderName = HeaderName::from_static("x-acc-decision");
/// `x-acc-eval`: every verdict on the returned images, `name=verdict(score)` comma-separated.
pub const EVAL: HeaderName = HeaderName::from_static("x-acc-eval");
/// `x-acc-reasons`: why a flagged answer was flagged.
pub const REASONS: HeaderName = HeaderName::from_static("x-acc-reasons");
/// `x-acc-cost-usd`: what the request cost in USD at the providers' prices.
pub const COST: HeaderName = HeaderName::from_static("x-acc-cost-usd");
/// `x-acc-contract-checked`: `true` when the request's prompt contract was evaluated, `false`
/// when its route does not run the `adherence` evaluator (absent without a contract).
pub const CONTRACT_CHECKED: HeaderName = HeaderName::from_static("x-acc-contract-checked");

/// `x-acc-generation`: the settings the winning provider used (`seed=7; steps=30; ...`).
pub const GENERATION: HeaderName = HeaderName::from_static("x-acc-generation");
/// `x-acc-dropped-params`: request parameters the winning provider could not honour and that were not sent.
pub const DROPPED: HeaderName = HeaderName::from_static("x-acc-dropped-params");
/// `x-acc-canary`: `true` when the image returned is the route's canary's (drawn for the
/// canary and answered by it; a canary attempt that failed over to the plan does not set it).
pub const CANARY: HeaderName = HeaderName::from_static("x-acc-canary");

/// Free text as a header value: printable ASCII only, bounded.
pub fn header_text(s: &str) -> HeaderValue {
    if s.len() <= 1024 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        if let Ok(v) = HeaderValue::from_str(s) {
            return v;
        }
    }
    let clean: String = s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(1024).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("(unprintable)"))
}

/// `{"created": .., "data": [..]}` in the format the client asked for. Base64 the provider sent
/// is written out as the same `Bytes`; raw bytes are encoded once; URLs point at the gateway
/// unless the route hands provider URLs through.
pub fn render(
    app: &App,
    policy: &Policy,
    url_mode: UrlMode,
    format: ResponseFormat,
    generation: Generation,
    headers: &HeaderMap,
    sent: Option<&mut Vec<Sent>>,
) -> ChunkedBody {
    let mut sent = sent;
    let base = match format {
        // Checked before the request was served (`url_base`); were it missing, the URLs would
        // be paths on the gateway rather than point at a host the client did not name.
        ResponseFormat::Url => url_base(policy, headers).unwrap_or_default(),
        ResponseFormat::B64Json => String::new(),
    };
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out = ChunkedBody::default();
    out.push(format!("{{\"created\":{created},\"data\":["));
    let mut revised = generation.revised_prompts.into_iter();
    for (i, image) in generation.images.into_iter().enumerate() {
        if i > 0 {
            out.push(Bytes::from_static(b","));
        }
        // `revised_prompt` goes inside the image's object, before its closing brace.
        let extra = match revised.next().flatten() {
            Some(p) => format!(",\"revised_prompt\":{}}}", serde_json::Value::String(p)),
            None => "}".to_string(),
        };
        match format {
            ResponseFormat::B64Json => {
                out.push(Bytes::from_static(b"{\"b64_json\":\""));
                let b64 = match image {
                    Image::Base64(b) => b,
                    Image::Raw { bytes, .. } => Rope::from(base64_simd::STANDARD.encode_type::<Vec<u8>>(&bytes)),
                    Image::Url(_) => unreachable!("URL answers are refused when bytes are needed"),
                };
                if let Some(s) = sent.as_deref_mut() {
                    s.push(Sent { url: None, base64: Some(b64.clone()), bytes: None });
                }
                // The provider's own pieces, as they arrived.
                for piece in b64.pieces() {
                    out.push(piece.clone());
                }
                out.push(Bytes::from_static(b"\""));
                out.push(extra);
            }
            ResponseFormat::Url => {
                let (url, bytes) = match image {
                    Image::Url(u) if url_mode == UrlMode::Provider => (u, None),
                    Image::Url(_) => unreachable!("URL answers are refused when bytes are needed"),
                    Image::Base64(b) => {
                        // Validated when the answer was parsed.
                        let bytes = Bytes::from(b.decode_base64().unwrap_or_default());
                        (store(app, policy, bytes.clone(), &base), Some(bytes))
                    }
                    Image::Raw { bytes, .. } => (store(app, policy, bytes.clone(), &base), Some(bytes)),
                };
                if let Some(s) = sent.as_deref_mut() {
                    s.push(Sent { url: Some(url.clone()), base64: None, bytes });
                }
                out.push(format!("{{\"url\":{}{extra}", serde_json::Value::String(url)));
            }
        }
    }
    out.push(Bytes::from_static(b"]"));
    for (name, value) in &generation.answer_fields {
        out.push(format!(",\"{name}\":{value}"));
    }
    out.push(Bytes::from_static(b"}"));
    out
}

/// One image as it was sent, for the trace record: the URL served, and the image's bytes
/// (or their base64 text) when the gateway held them. `Bytes` clones share the answer's
/// buffers.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    pub url: Option<String>,
    pub base64: Option<Rope>,
    pub bytes: Option<Bytes>,
}

/// Keeps an image in the artifact store and returns its URL; with `[cluster]`, in Redis too,
/// so that every replica serves the URL, and the images this replica's store evicts leave
/// Redis with it (Redis then holds at most every replica's `artifact_store_mib` together).
fn store(app: &App, policy: &Policy, bytes: Bytes, base: &str) -> String {
    let kind = crate::providers::sniff_image(&bytes).unwrap_or(("application/octet-stream", "bin"));
    let (id, url, evicted) = app.artifacts.publish(bytes.clone(), kind, policy.server.url_ttl, base);
    if let Some(c) = app.limits.cluster() {
        c.share_artifact(&id, bytes, policy.server.url_ttl);
        c.forget_artifacts(evicted);
    }
    url
}

/// The scheme and authority gateway-served image URLs start with: `public_base_url` when the
/// policy sets one, else `http://` and the request's `Host`. Errors: 400 `missing_host` when
/// neither is there (an HTTP/1.0 client without `Host`), rather than a URL on a guessed host.
pub fn url_base(policy: &Policy, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(base) = &policy.server.public_base_url {
        return Ok(base.clone());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.parse::<http::uri::Authority>().is_ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "response_format",
                "missing_host",
                "image URLs are built from the request's Host header, which is missing or not a host: \
                 send Host, ask for response_format b64_json, or set server.public_base_url",
            )
        })?;
    Ok(format!("http://{host}"))
}

/// The client's error when no attempt succeeded: the upstream's own 4xx (in OpenAI's shape), or a 502/504
/// that lists each attempt's reason.
pub fn failure(policy: &Policy, outcome: &PlanOutcome) -> ApiError {
    // A hedge cancelled because another attempt ended the plan says nothing of why it failed:
    // the attempt that ended it does (a content filter's refusal stays a 400 when hedged).
    let decisive = outcome.attempts.iter().rev().find(|a| !matches!(a.result, Err(ProviderError::HedgeCancelled)));
    match decisive.and_then(|a| a.result.as_ref().err()) {
        Some(ProviderError::Rejected { status, body }) => {
            let mut e =
                ApiError::new(*status, "invalid_request_error", "upstream_rejected", "upstream rejected the request");
            e.raw_body = Some(body.clone());
            return e;
        }
        Some(ProviderError::ContentFiltered(reason)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "content_policy_violation",
                format!("the provider's content filter refused this request: {reason}"),
            )
        }
        Some(ProviderError::UnsupportedParams(reason)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "unsupported_parameter",
                reason.clone(),
            )
        }
        Some(ProviderError::Busy { timed_out }) => {
            let provider =
                decisive.map_or("", |a| policy.routes[a.step.route].targets[a.step.target].provider.as_str());
            let why = ProviderError::busy_reason(*timed_out);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "provider_busy",
                format!("provider \"{provider}\" is at its concurrency limit and {why}; retry shortly"),
            );
            e.retry_after = Some(1);
            return e;
        }
        Some(ProviderError::Blocked(reason)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "content_policy_violation",
                format!("the generated image was blocked by the gateway's policy: {reason}"),
            )
        }
        _ => {}
    }
    // No target of the plan does what the request asks (an edit on generate-only providers).
    if !outcome.attempts.is_empty()
        && outcome.attempts.iter().all(|a| matches!(a.result, Err(ProviderError::Unsupported(_))))
    {
        let why: Vec<String> =
            outcome.attempts.iter().filter_map(|a| a.result.as_ref().err().map(|e| e.to_string())).collect();
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unsupported_operation",
            format!("no target of this route can do it: {}", why.join("; ")),
        );
    }
    // Nothing was sent: every target is behind an open breaker or paused by its provider.
    let skipped: Vec<std::time::Duration> = outcome
        .attempts
        .iter()
        .filter_map(|a| match &a.result {
            Err(ProviderError::Skipped { retry_in, .. }) => Some(*retry_in),
            _ => None,
        })
        .collect();
    if !outcome.attempts.is_empty() && skipped.len() == outcome.attempts.len() {
        let wait = skipped.iter().min().copied().unwrap_or_default();
        let names: Vec<String> = outcome
            .attempts
            .iter()
            .map(|a| format!("{} ({})", policy.routes[a.step.route].targets[a.step.target].provider, a.label()))
            .collect();
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "no_healthy_target",
            format!(
                "no target can take this request now: {}; the first may be tried again in {} ms",
                names.join(", "),
                wait.as_millis()
            ),
        );
        e.retry_after = Some((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1));
        return e;
    }
    // The gateway could not hold any answer: its own load, not the providers'.
    let tried: Vec<&ProviderError> = outcome
        .attempts
        .iter()
        .filter_map(|a| a.result.as_ref().err())
        .filter(|e| !matches!(e, ProviderError::Skipped { .. } | ProviderError::HedgeCancelled))
        .collect();
    if !tried.is_empty() && tried.iter().all(|e| matches!(e, ProviderError::AnswerMemoryFull(_))) {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "gateway_overloaded",
            "the gateway is holding as many provider answers as its memory allows; retry shortly",
        );
        e.retry_after = Some(1);
        return e;
    }
    // Every provider answered, and every answer failed the route's evaluation: not an upstream
    // failure, but images that do not meet the policy (or the request's contract).
    if !outcome.deadline_exceeded
        && !tried.is_empty()
        && tried.iter().all(|e| matches!(e, ProviderError::EvalFailed(_)))
    {
        let why: Vec<String> = outcome
            .attempts
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match &a.result {
                Err(ProviderError::EvalFailed(reasons)) => Some(format!(
                    "attempt {} ({}): {reasons}",
                    i + 1,
                    policy.routes[a.step.route].targets[a.step.target].provider
                )),
                _ => None,
            })
            .collect();
        return ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "evaluation_failed",
            format!("every generated image failed the route's evaluation: {}", why.join("; ")),
        );
    }
    let reasons: Vec<String> = outcome
        .attempts
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let provider = &policy.routes[a.step.route].targets[a.step.target].provider;
            a.result
                .as_ref()
                .err()
                .map(|e| format!("attempt {} ({provider}, {}): {}", i + 1, a.label(), e.public_text()))
        })
        .collect();
    let timed_out = outcome.deadline_exceeded
        || decisive
            .is_some_and(|a| matches!(a.result, Err(ProviderError::Timeout | ProviderError::TimeoutAfterAnswer(_))));
    let mut message = format!("all {} attempts failed", outcome.attempts.len());
    if outcome.deadline_exceeded {
        message.push_str(" before the route's deadline ran out");
    }
    if !reasons.is_empty() {
        message.push_str(": ");
        message.push_str(&reasons.join("; "));
    }
    let mut e = if timed_out {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout", message)
    } else {
        ApiError::new(StatusCode::BAD_GATEWAY, "api_error", "upstream_error", message)
    };
    e.retry_after = retry_later(policy, outcome);
    e
}

/// When a client may retry a request every attempt of which failed: when some failure was
/// transient (a timeout, a refused or broken connection, a 429 or 5xx), after the longest
/// `Retry-After` a provider asked for, each cut to its provider's `max_pause_ms` (the longest
/// the gateway itself waits on one: a provider's 99999 s is not passed on), at least 1 s;
/// `None` when none was (account problems, bad answers): retrying soon would fail the same way,
/// so the answer says not to.
fn retry_later(policy: &Policy, outcome: &PlanOutcome) -> Option<u64> {
    let mut transient = outcome.deadline_exceeded;
    let mut wait = std::time::Duration::ZERO;
    for a in &outcome.attempts {
        match &a.result {
            Err(ProviderError::Status { retry_after, .. }) => {
                transient = true;
                let target = policy.routes.get(a.step.route).and_then(|r| r.targets.get(a.step.target));
                let cap = target
                    .and_then(|t| policy.providers.get(&t.provider))
                    .map_or(std::time::Duration::from_secs(300), |p| p.max_pause);
                wait = wait.max(retry_after.unwrap_or_default().min(cap));
            }
            Err(
                ProviderError::Timeout
                | ProviderError::TimeoutAfterAnswer(_)
                | ProviderError::Connect(_)
                | ProviderError::Transport(_)
                | ProviderError::AnswerMemoryFull(_)
                | ProviderError::QueueFull
                | ProviderError::QueueTimeout
                | ProviderError::Skipped { .. },
            ) => transient = true,
            _ => {}
        }
    }
    transient.then(|| (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
}

/// A dollar amount without float noise: at most 6 decimals, trailing zeros dropped.
pub fn format_usd(usd: f64) -> String {
    let s = format!("{usd:.6}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.').map_or_else(|| s.to_string(), |i| i.to_string())
}
