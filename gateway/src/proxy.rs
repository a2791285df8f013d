//! The request pipeline for image generations, read top to bottom: authenticate, read and parse
//! the body, pick a route, walk the attempt plan, shape the answer, record what happened.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};

use crate::body::ChunkedBody;
use crate::error::ApiError;
use crate::policy::{ApiKey, Policy, UrlMode};
use crate::providers::{AttemptRequest, Generation, Image, ProviderError};
use crate::reload::Snapshot;
use crate::request::{GenerationRequest, Operation, ResponseFormat};
use crate::routing::{self, PlanOutcome, RouteQuery, Step};
use crate::server::App;

pub const TRACE_ID: HeaderName = HeaderName::from_static("x-acc-trace-id");
pub const ROUTE: HeaderName = HeaderName::from_static("x-acc-route");
pub const PROVIDER: HeaderName = HeaderName::from_static("x-acc-provider");
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-acc-attempts");
pub const DECISION: HeaderName = HeaderName::from_static("x-acc-decision");
pub const EVAL: HeaderName = HeaderName::from_static("x-acc-eval");
pub const REASONS: HeaderName = HeaderName::from_static("x-acc-reasons");
pub const COHORT: &str = "x-acc-cohort";
pub const CONTRACT: &str = "x-acc-contract";

/// Free text as a header value: printable ASCII only, bounded.
fn header_text(s: &str) -> HeaderValue {
    let clean: String = s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(1024).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("(unprintable)"))
}

/// Evaluates one attempt's artifacts on the evaluation pool under the route's budget and
/// applies the route's actions: `Ok` to return them (possibly flagged), `EvalFailed` to try
/// the next target, `Blocked` to refuse the request.
async fn evaluate_attempt(
    app: &App,
    generation: &mut Generation,
    cfg: &crate::policy::EvalPolicy,
    req: &GenerationRequest,
    (route, provider): (&str, &str),
) -> Result<(), ProviderError> {
    let expected_size = req.size_given.then_some(req.size);
    let n = req.n;
    use crate::eval::{Outcome, Verdict};
    use crate::policy::EvalAction;
    let evaluators: Vec<_> = cfg.evaluators.iter().filter_map(|e| app.evaluators.get(e.as_str()).cloned()).collect();
    let images = generation.images.clone();
    let settings = cfg.settings.clone();
    let contract = req.contract.clone();
    let prompt = req.prompt.clone();
    let job = app.eval_pool.run(move || {
        images
            .iter()
            .map(|image| {
                let bytes = match image {
                    Image::Base64(b64) => Bytes::from(base64_simd::STANDARD.decode_to_vec(b64).unwrap_or_default()),
                    Image::Raw { bytes, .. } => bytes.clone(),
                    Image::Url(_) => Bytes::new(),
                };
                crate::eval::evaluate(&bytes, expected_size, &settings, contract.as_deref(), &prompt, &evaluators)
            })
            .collect::<Vec<_>>()
    });
    let mut verdicts: Vec<Verdict> = match tokio::time::timeout(cfg.budget, job).await {
        Ok(Some((waited, reports))) => {
            app.metrics.eval_queue.observe(waited);
            for r in &reports {
                for (v, secs) in r.verdicts.iter().zip(&r.durations) {
                    app.metrics.eval_duration.with_label_values(&[v.evaluator]).observe(*secs);
                }
            }
            reports.into_iter().flat_map(|r| r.verdicts).collect()
        }
        outcome => {
            let why = match outcome {
                Err(_) => format!("evaluation did not finish within its budget of {} ms", cfg.budget.as_millis()),
                _ => "the evaluation pool is not running".to_string(),
            };
            cfg.evaluators
                .iter()
                .filter_map(|e| app.evaluators.get(e.as_str()))
                .map(|e| Verdict { evaluator: e.name(), score: 0.0, verdict: Outcome::Error, reason: why.clone() })
                .collect()
        }
    };
    if cfg.evaluators.iter().any(|e| e == "sanity") && (generation.images.len() as u32) < n {
        verdicts.push(Verdict {
            evaluator: "sanity",
            score: 0.0,
            verdict: Outcome::Fail,
            reason: format!("the request asked for {n} images, the provider returned {}", generation.images.len()),
        });
    }
    let mut failures = Vec::new();
    // The strictest action among the failed evaluators' actions applies.
    let mut action: Option<EvalAction> = None;
    for v in &verdicts {
        app.metrics.eval_total.with_label_values(&[v.evaluator, route, provider, v.verdict.label()]).inc();
        if v.verdict != Outcome::Error {
            app.metrics.eval_score.with_label_values(&[v.evaluator, provider]).observe(v.score as f64);
        }
        let failed = v.verdict == Outcome::Fail || (v.verdict == Outcome::Error && !cfg.fail_open);
        if failed {
            failures.push(format!("{}: {}", v.evaluator, v.reason));
            let a = cfg.action(v.evaluator);
            action = Some(match (action, a) {
                (Some(EvalAction::Block), _) | (_, EvalAction::Block) => EvalAction::Block,
                (Some(EvalAction::Fallback), _) | (_, EvalAction::Fallback) => EvalAction::Fallback,
                _ => EvalAction::Flag,
            });
        }
    }
    generation.verdicts = verdicts;
    if failures.is_empty() {
        return Ok(());
    }
    let reasons = failures.join("; ");
    match action.unwrap_or(EvalAction::Fallback) {
        EvalAction::Fallback => Err(ProviderError::EvalFailed(reasons)),
        EvalAction::Block => Err(ProviderError::Blocked(reasons)),
        EvalAction::Flag => {
            generation.flags = failures;
            Ok(())
        }
    }
}

/// What the pipeline learns about one request as it goes; turned into headers and metrics at
/// the end whatever the outcome.
struct RequestCtx {
    trace_id: String,
    started: Instant,
    /// Index of the matched route in the snapshot's policy.
    route: Option<usize>,
    /// The target whose answer is returned.
    provider: Option<Step>,
    attempts: Vec<(Step, &'static str)>,
    /// `x-acc-eval`: the returned artifacts' verdicts.
    eval_summary: Option<String>,
    /// Failed checks whose action is "flag": the answer is returned marked with them.
    flags: Vec<String>,
}

/// The proxy listener's routes. The proxy serves a handful of fixed paths, so a plain match
/// does it; a router framework cost measurable CPU per request on the proxy benchmark.
pub async fn dispatch<B>(app: Arc<App>, req: Request<B>) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const IMAGES: &str = "/v1/images/";
    const ARTIFACTS: &str = "/v1/images/artifacts/";
    let op = match req.uri().path().strip_prefix(IMAGES) {
        Some("generations") => Some(Operation::Generate),
        Some("edits") => Some(Operation::Edit),
        Some("variations") => Some(Operation::Variation),
        _ => None,
    };
    match (req.method(), op) {
        (&Method::POST, Some(op)) => return images(app, req, op).await,
        (_, Some(_)) => return method_not_allowed("POST"),
        _ => {}
    }
    let path = req.uri().path();
    if path == "/v1/models" {
        return match *req.method() {
            Method::GET => models(&app, req.headers()),
            _ => method_not_allowed("GET"),
        };
    }
    if let Some(file) = path.strip_prefix(ARTIFACTS) {
        return match *req.method() {
            Method::GET | Method::HEAD => artifact(&app, file),
            _ => method_not_allowed("GET"),
        };
    }
    not_found()
}

fn method_not_allowed(allowed: &'static str) -> Response {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("this path takes {allowed}"),
    )
    .into_response();
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}

async fn images<B>(app: Arc<App>, req: Request<B>, op: Operation) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let snapshot = app.policy.snapshot();
    let limit = snapshot.policy.server.max_in_flight;
    let Some(_in_flight) = app.admit(limit) else {
        app.metrics.requests.with_label_values(&["none", "overloaded"]).inc();
        return ApiError::overloaded(format!("the gateway is at its limit of {limit} requests in flight"))
            .into_response();
    };
    let mut ctx = RequestCtx {
        // Trace ids must be unique, not secret: a thread-local PRNG (seeded from the OS) avoids
        // a getrandom syscall per request.
        trace_id: format!("{:032x}", fastrand::u128(..)),
        started: Instant::now(),
        route: None,
        provider: None,
        attempts: Vec::new(),
        eval_summary: None,
        flags: Vec::new(),
    };
    let result = generate(&app, &snapshot, &mut ctx, &headers, body, op).await;
    finish(&app, &snapshot, ctx, result)
}

async fn generate<B>(
    app: &App,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
    body: B,
    op: Operation,
) -> Result<ChunkedBody, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let policy = &snap.policy;
    // 1. Who is asking.
    let key = authenticate(policy, headers)?;
    // 2. What they ask for.
    let req = match op {
        Operation::Generate => {
            let body = read_body(headers, body, policy.server.max_json_body_bytes).await?;
            GenerationRequest::from_json(&body)?
        }
        Operation::Edit | Operation::Variation => {
            let boundary = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|ct| multer::parse_boundary(ct).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "body",
                        "invalid_content_type",
                        format!("/v1/images/{} takes a multipart/form-data body", op.path()),
                    )
                })?;
            let body = read_body(headers, body, policy.server.max_multipart_body_bytes).await?;
            GenerationRequest::from_multipart(op, body, &boundary).await?
        }
    };
    let mut req = req;
    if let Some(h) = headers.get(CONTRACT) {
        let c = crate::eval::adherence::Contract::parse(h.as_bytes())
            .map_err(|e| ApiError::invalid("x-acc-contract", "invalid_contract", e))?;
        req.contract = Some(Arc::new(c));
    }
    // 3. Where it goes.
    let cohort = headers.get(COHORT).and_then(|v| v.to_str().ok());
    let key_tags: &[String] = key.map_or(&[], |k| &k.tags);
    let query = RouteQuery { model: req.model.as_deref(), cohort, key_tags };
    let (route_idx, route) = routing::select_route(policy, &query)?;
    ctx.route = Some(route_idx);
    let alias = req.model.as_deref().or(policy.default_model.as_deref()).unwrap_or_default();
    let steps = routing::plan(policy, route_idx, fastrand::f64());
    // The client's bytes are needed whenever the gateway itself must answer with them.
    let needs_bytes = req.response_format == ResponseFormat::B64Json || route.url_mode == UrlMode::Gateway;

    // 4. Attempts, in plan order, under per-attempt timeouts and the route's deadline.
    let deadline = tokio::time::Instant::now() + route.deadline;
    let timeout_of = |s: Step| {
        let r = &policy.routes[s.route];
        let provider_timeout = policy.providers.get(&r.targets[s.target].provider).and_then(|p| p.timeout);
        provider_timeout.map_or(r.attempt_timeout, |t| t.min(r.attempt_timeout))
    };
    let req = &req;
    let outcome = routing::run_plan(&steps, deadline, timeout_of, |s| {
        let step_route = &policy.routes[s.route];
        let target = &step_route.targets[s.target];
        let provider = snap.target_providers[s.route][s.target].clone();
        let model = target.model.as_deref().unwrap_or(alias);
        let route_name = route.name.as_str();
        async move {
            let mut generation = provider.generate(&AttemptRequest { req, model }).await?;
            if needs_bytes && generation.images.iter().any(|i| matches!(i, Image::Url(_))) {
                return Err(ProviderError::BadResponse(
                    "the provider answered with a URL, which this build does not fetch; set upstream_response_format = \"b64_json\" or url_mode = \"provider\"".into(),
                ));
            }
            if !step_route.eval.evaluators.is_empty() {
                let labels = (route_name, target.provider.as_str());
                evaluate_attempt(app, &mut generation, &step_route.eval, req, labels)
                    .await?;
            }
            Ok(generation)
        }
    })
    .await;
    record_attempts(app, snap, route_idx, &outcome, ctx);

    // 5. The answer.
    let Some((step, mut generation)) = outcome.success else {
        return Err(failure(policy, &outcome));
    };
    let winner = &policy.routes[step.route];
    ctx.provider = Some(step);
    if !generation.verdicts.is_empty() {
        ctx.eval_summary = Some(crate::eval::summary(&generation.verdicts));
    }
    ctx.flags = std::mem::take(&mut generation.flags);
    Ok(render(app, policy, winner.url_mode, req.response_format, generation, headers))
}

/// Client keys are checked by their SHA-256 digest. With no keys configured the gateway serves
/// anyone, which start-up only allows on a loopback listener.
fn authenticate<'p>(policy: &'p Policy, headers: &HeaderMap) -> Result<Option<&'p ApiKey>, ApiError> {
    if policy.keys.is_empty() {
        return Ok(None);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        })?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    policy.keys.get(&digest).map(Some).ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
}

/// Reads a request body up to `limit` bytes; larger ones are refused with 413 before or while
/// they arrive, never buffered whole.
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::invalid("body", "invalid_body", format!("could not read the request body: {e}"))),
    }
}

fn record_attempts(app: &App, snap: &Snapshot, route_idx: usize, outcome: &PlanOutcome, ctx: &mut RequestCtx) {
    let policy = &snap.policy;
    let route = &policy.routes[route_idx].name;
    let m = &app.metrics;
    let mut prev: Option<(&str, &'static str)> = None;
    for a in &outcome.attempts {
        let target = &policy.routes[a.step.route].targets[a.step.target];
        let label = a.label();
        let (attempt_ok, latency) = &snap.hot[a.step.route].targets[a.step.target];
        if label == "ok" && a.step.route == route_idx {
            attempt_ok.inc();
        } else {
            m.attempts.with_label_values(&[route.as_str(), &target.provider, label]).inc();
        }
        latency.observe(a.elapsed.as_secs_f64());
        if let Some((from, reason)) = prev {
            m.fallbacks.with_label_values(&[route.as_str(), from, &target.provider, reason]).inc();
        }
        if let Err(e) = &a.result {
            tracing::info!(trace_id = %ctx.trace_id, route = %route, provider = %target.provider, result = label, "attempt failed: {e}");
        }
        prev = Some((&target.provider, label));
        ctx.attempts.push((a.step, label));
    }
}

/// The client's error when no attempt succeeded: the upstream's own 4xx as is, or a 502/504
/// that lists each attempt's reason.
fn failure(policy: &Policy, outcome: &PlanOutcome) -> ApiError {
    match outcome.attempts.last().and_then(|a| a.result.as_ref().err()) {
        Some(ProviderError::Rejected { status, body }) => {
            let mut e =
                ApiError::new(*status, "invalid_request_error", "upstream_rejected", "upstream rejected the request");
            e.raw_body = Some(body.clone());
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
    let reasons: Vec<String> = outcome
        .attempts
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let provider = &policy.routes[a.step.route].targets[a.step.target].provider;
            a.result.as_ref().err().map(|e| format!("attempt {} ({provider}, {}): {e}", i + 1, a.label()))
        })
        .collect();
    let timed_out = outcome.deadline_exceeded
        || outcome.attempts.last().is_some_and(|a| matches!(a.result, Err(ProviderError::Timeout)));
    let mut message = format!("all {} attempts failed", outcome.attempts.len());
    if outcome.deadline_exceeded {
        message.push_str(" before the route's deadline ran out");
    }
    if !reasons.is_empty() {
        message.push_str(": ");
        message.push_str(&reasons.join("; "));
    }
    if timed_out {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout", message)
    } else {
        ApiError::new(StatusCode::BAD_GATEWAY, "api_error", "upstream_error", message)
    }
}

/// `{"created": .., "data": [..]}` in the format the client asked for. Base64 the provider sent
/// is written out as the same `Bytes`; raw bytes are encoded once; URLs point at the gateway
/// unless the route hands provider URLs through.
fn render(
    app: &App,
    policy: &Policy,
    url_mode: UrlMode,
    format: ResponseFormat,
    generation: Generation,
    headers: &HeaderMap,
) -> ChunkedBody {
    let base = match format {
        ResponseFormat::Url => public_base(policy, headers),
        ResponseFormat::B64Json => String::new(),
    };
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out = ChunkedBody::default();
    out.push(format!("{{\"created\":{created},\"data\":["));
    for (i, image) in generation.images.into_iter().enumerate() {
        if i > 0 {
            out.push(Bytes::from_static(b","));
        }
        match format {
            ResponseFormat::B64Json => {
                out.push(Bytes::from_static(b"{\"b64_json\":\""));
                out.push(match image {
                    Image::Base64(b) => b,
                    Image::Raw { bytes, .. } => Bytes::from(base64_simd::STANDARD.encode_type::<Vec<u8>>(&bytes)),
                    Image::Url(_) => unreachable!("URL answers are refused when bytes are needed"),
                });
                out.push(Bytes::from_static(b"\"}"));
            }
            ResponseFormat::Url => {
                let url = match image {
                    Image::Url(u) if url_mode == UrlMode::Provider => u,
                    Image::Url(_) => unreachable!("URL answers are refused when bytes are needed"),
                    Image::Base64(b) => {
                        // Validated when the answer was parsed.
                        let bytes = Bytes::from(base64_simd::STANDARD.decode_to_vec(&b).unwrap_or_default());
                        store(app, policy, bytes, &base)
                    }
                    Image::Raw { bytes, .. } => store(app, policy, bytes, &base),
                };
                out.push(format!("{{\"url\":{}}}", serde_json::Value::String(url)));
            }
        }
    }
    out.push(Bytes::from_static(b"]}"));
    out
}

fn store(app: &App, policy: &Policy, bytes: Bytes, base: &str) -> String {
    let (mime, ext) = sniff(&bytes);
    let id = app.artifacts.put(bytes, mime, policy.server.url_ttl);
    format!("{base}/v1/images/artifacts/{id}.{ext}")
}

fn sniff(b: &[u8]) -> (&'static str, &'static str) {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        ("image/png", "png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        ("image/jpeg", "jpg")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        ("image/webp", "webp")
    } else {
        ("application/octet-stream", "bin")
    }
}

fn public_base(policy: &Policy, headers: &HeaderMap) -> String {
    if let Some(base) = &policy.server.public_base_url {
        return base.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        .unwrap_or("127.0.0.1:8080");
    format!("http://{host}")
}

fn finish(app: &App, snap: &Snapshot, ctx: RequestCtx, result: Result<ChunkedBody, ApiError>) -> Response {
    let route = ctx.route.map_or("none", |i| snap.policy.routes[i].name.as_str());
    let (mut resp, outcome) = match result {
        Ok(body) => {
            let mut r = Response::new(Body::new(body));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let decision = if ctx.flags.is_empty() { "pass" } else { "flagged" };
            r.headers_mut().insert(DECISION, HeaderValue::from_static(decision));
            (r, "ok")
        }
        Err(e) => {
            let outcome = match (e.code, e.status.as_u16()) {
                (Some("invalid_api_key"), _) => "unauthorized",
                (Some("upstream_rejected"), _) => "upstream_rejected",
                (Some("upstream_timeout"), _) => "upstream_timeout",
                (Some("upstream_error"), _) => "upstream_error",
                (Some("content_policy_violation"), _) => "blocked",
                (_, 500..) => "internal_error",
                _ => "client_error",
            };
            let decision = if outcome == "blocked" { "blocked" } else { "error" };
            let mut r = e.into_response();
            r.headers_mut().insert(DECISION, HeaderValue::from_static(decision));
            (r, outcome)
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ctx.trace_id) {
        h.insert(TRACE_ID, v);
    }
    if let Some(v) = ctx.route.and_then(|_| HeaderValue::from_str(route).ok()) {
        h.insert(ROUTE, v);
    }
    if let Some(v) = ctx.eval_summary.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
        h.insert(EVAL, v);
    }
    if !ctx.flags.is_empty() {
        h.insert(REASONS, header_text(&ctx.flags.join("; ")));
    }
    let provider_of = |s: Step| snap.policy.routes[s.route].targets[s.target].provider.as_str();
    if let Some(v) = ctx.provider.and_then(|s| HeaderValue::from_str(provider_of(s)).ok()) {
        h.insert(PROVIDER, v);
    }
    if !ctx.attempts.is_empty() {
        let mut list = String::with_capacity(32 * ctx.attempts.len());
        for (i, (s, r)) in ctx.attempts.iter().enumerate() {
            if i > 0 {
                list.push_str(", ");
            }
            list.push_str(provider_of(*s));
            list.push(':');
            list.push_str(r);
        }
        if let Ok(v) = HeaderValue::from_str(&list) {
            h.insert(ATTEMPTS, v);
        }
    }
    let elapsed = ctx.started.elapsed().as_secs_f64();
    match ctx.route.map(|i| &snap.hot[i]) {
        Some(hot) if outcome == "ok" => {
            hot.requests_ok.inc();
            hot.duration.observe(elapsed);
        }
        Some(hot) => {
            app.metrics.requests.with_label_values(&[route, outcome]).inc();
            hot.duration.observe(elapsed);
        }
        None => {
            app.metrics.requests.with_label_values(&[route, outcome]).inc();
            app.metrics.request_duration.with_label_values(&[route]).observe(elapsed);
        }
    }
    tracing::debug!(trace_id = %ctx.trace_id, route, outcome, elapsed_ms = ctx.started.elapsed().as_millis() as u64, "request done");
    resp
}

/// `GET /v1/models`: the aliases the policies expose.
fn models(app: &App, headers: &HeaderMap) -> Response {
    let snap = app.policy.snapshot();
    if let Err(e) = authenticate(&snap.policy, headers) {
        return e.into_response();
    }
    let data: Vec<_> = snap
        .policy
        .aliases
        .iter()
        .map(|a| serde_json::json!({"id": a, "object": "model", "created": 0, "owned_by": "acc"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/images/artifacts/{id}.{ext}`: an image the gateway keeps for `url` answers.
fn artifact(app: &App, file: &str) -> Response {
    let id = file.split('.').next().unwrap_or_default();
    match app.artifacts.get(id) {
        Some((bytes, mime)) => {
            let mut r = Response::new(Body::from(bytes));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
            r
        }
        None => ApiError::not_found("artifact_not_found", "no such image, or its URL has expired").into_response(),
    }
}

/// Fallback for unknown proxy paths, in the OpenAI error shape.
fn not_found() -> Response {
    ApiError::not_found("unknown_url", "unknown path; this gateway serves /v1/images/generations, /v1/images/edits, /v1/images/variations and /v1/models")
        .into_response()
}
