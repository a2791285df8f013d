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
use crate::providers::{AttemptRequest, Generation, Image, Param, ProviderError};
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
pub const COST: HeaderName = HeaderName::from_static("x-acc-cost-usd");
pub const GENERATION: HeaderName = HeaderName::from_static("x-acc-generation");
pub const DROPPED: HeaderName = HeaderName::from_static("x-acc-dropped-params");
pub const CANARY: HeaderName = HeaderName::from_static("x-acc-canary");
pub const REPLAY: HeaderName = HeaderName::from_static("x-acc-idempotent-replay");
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
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
    mirror: bool,
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
    // Set when this future is dropped (client gone, hedge lost, timeout): the job stops before
    // its next image.
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel = CancelOnDrop(cancelled.clone());
    // Mirrors use at most half the evaluation threads, so they cannot starve live requests.
    let _mirror_permit = if mirror { app.mirror_eval.acquire().await.ok() } else { None };
    let job = app.eval_pool.run(move || {
        images
            .iter()
            .take_while(|_| !cancelled.load(std::sync::atomic::Ordering::Relaxed))
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
        // A mirror's verdicts go to its comparison, not to the route's evaluation metrics.
        if !mirror {
            app.metrics.eval_total.with_label_values(&[v.evaluator, route, provider, v.verdict.label()]).inc();
            if v.verdict != Outcome::Error {
                app.metrics.eval_score.with_label_values(&[v.evaluator, provider]).observe(v.score as f64);
            }
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

struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
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
    /// USD spent on this request at the providers' prices, when they have prices.
    cost: Option<f64>,
    /// Counts the request as `client_cancelled` if it is dropped before it finishes.
    watch: Option<CancelWatch>,
    /// Served by the route's canary first.
    canary: bool,
    /// `x-acc-generation`: the settings the winning provider used.
    generation: Option<String>,
    /// `x-acc-dropped-params`: parameters the winning provider could not honour.
    dropped: Vec<&'static str>,
}

/// Lives as long as a request is being answered: dropped with the request's future when the
/// client goes away (which also drops the provider call and the evaluation in flight), it counts
/// the request as `client_cancelled`. `finish` disarms it.
struct CancelWatch {
    snap: Arc<Snapshot>,
    metrics: Arc<crate::metrics::Metrics>,
    route: Option<usize>,
    armed: bool,
}

impl RequestCtx {
    /// The request is answered (or about to be): it was not cancelled.
    fn disarm(&mut self) {
        if let Some(w) = &mut self.watch {
            w.armed = false;
        }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let route = self.route.map_or("none", |i| self.snap.policy.routes[i].name.as_str());
        self.metrics.requests.with_label_values(&[route, "client_cancelled"]).inc();
        tracing::info!(route, "client went away; request cancelled");
    }
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
        trace_id: client_trace_id(&headers).unwrap_or_else(|| format!("{:032x}", fastrand::u128(..))),
        started: Instant::now(),
        route: None,
        provider: None,
        attempts: Vec::new(),
        eval_summary: None,
        flags: Vec::new(),
        cost: None,
        canary: false,
        generation: None,
        dropped: Vec::new(),
        watch: Some(CancelWatch { snap: snapshot.clone(), metrics: app.metrics.clone(), route: None, armed: true }),
    };
    match idempotency_key(&headers) {
        Ok(None) => {
            let result = generate(&app, &snapshot, &mut ctx, &headers, body, op).await;
            finish(&app, &snapshot, ctx, result)
        }
        Ok(Some(key)) => idempotent(&app, &snapshot, ctx, &headers, body, op, key).await,
        Err(e) => finish(&app, &snapshot, ctx, Err(e)),
    }
}

/// A trace id the client chose (`x-acc-trace-id`, 32 lowercase hex digits), so reruns of a request
/// keep it (and its mirror and canary sampling); anything else is ignored.
fn client_trace_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(TRACE_ID)?.to_str().ok()?;
    (v.len() == 32 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then(|| v.to_string())
}

/// The `Idempotency-Key` header, checked.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    match v.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => {
            Ok(Some(k.to_string()))
        }
        _ => Err(ApiError::invalid(
            "Idempotency-Key",
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters",
        )),
    }
}

/// A request with an `Idempotency-Key`: the first with a given key and body generates; a retry
/// while it runs waits for it, a retry after it gets the same answer, replayed; the same key with
/// another body is a 409. Only answers that cost a generation are kept (success, blocked).
async fn idempotent<B>(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
    mut ctx: RequestCtx,
    headers: &HeaderMap,
    body: B,
    op: Operation,
    key: String,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use crate::idempotency::{Begin, Stored};
    let policy = &snap.policy;
    let scope = match authenticate(policy, headers) {
        Ok(k) => k.map_or("anonymous", |k| k.tenant.as_str()),
        Err(e) => return finish(app, snap, ctx, Err(e)),
    };
    let limit = match op {
        Operation::Generate => policy.server.max_json_body_bytes,
        _ => policy.server.max_multipart_body_bytes,
    };
    let bytes = match read_body(headers, body, limit).await {
        Ok(b) => b,
        Err(e) => return finish(app, snap, ctx, Err(e)),
    };
    let mut h = Sha256::new();
    h.update(op.path().as_bytes());
    h.update([0]);
    if op != Operation::Generate {
        h.update(headers.get(header::CONTENT_TYPE).map_or(&b""[..], |v| v.as_bytes()));
    }
    h.update([0]);
    h.update(&bytes);
    let fingerprint: [u8; 32] = h.finalize().into();
    let m = &app.metrics.idempotency;
    match app.idempotency.begin(scope, &key, fingerprint).await {
        Begin::Conflict => {
            m.with_label_values(&["conflict"]).inc();
            let e = ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            );
            finish(app, snap, ctx, Err(e))
        }
        Begin::Replay { stored, waited } => {
            m.with_label_values(&[if waited { "waited" } else { "replayed" }]).inc();
            ctx.disarm();
            replay(&stored)
        }
        Begin::Leader(lease) => {
            m.with_label_values(&["new"]).inc();
            let result = generate(app, snap, &mut ctx, headers, http_body_util::Full::new(bytes), op).await;
            let resp = finish(app, snap, ctx, result);
            let (parts, body) = resp.into_parts();
            // The body is already in memory (JSON framing around the images' bytes).
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let blocked = parts.headers.get(DECISION).is_some_and(|d| d == "blocked");
            let keep = parts.status.is_success() || blocked;
            let stored = Stored {
                status: parts.status,
                headers: parts.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                body: body.clone(),
            };
            lease.complete(keep.then_some(stored));
            Response::from_parts(parts, Body::from(body))
        }
    }
}

fn replay(stored: &crate::idempotency::Stored) -> Response {
    let mut r = Response::new(Body::from(stored.body.clone()));
    *r.status_mut() = stored.status;
    let h = r.headers_mut();
    for (k, v) in &stored.headers {
        h.append(k.clone(), v.clone());
    }
    h.insert(REPLAY, HeaderValue::from_static("true"));
    r
}

/// Each evaluated attempt's step and verdicts, in the order they were evaluated.
type VerdictSink = std::sync::Mutex<Vec<(Step, Vec<crate::eval::Verdict>)>>;

/// Everything one attempt needs besides its step.
struct AttemptEnv<'a> {
    app: &'a App,
    snap: &'a Snapshot,
    req: &'a GenerationRequest,
    alias: &'a str,
    /// The matched route's name, for metric labels.
    route_name: &'a str,
    needs_bytes: bool,
    /// A mirror's attempt: its verdicts stay out of the route's evaluation metrics.
    mirror: bool,
    /// Where attempts leave their verdicts (pass or fail), when mirrors or a canary compare them.
    verdicts: Option<&'a VerdictSink>,
}

/// One attempt on one target: skipped when the provider is paused or its breaker is open,
/// queued for a concurrency slot, sent, then evaluated; its result feeds the provider's breaker
/// and the target's health window.
async fn attempt_step(env: &AttemptEnv<'_>, s: Step, until: tokio::time::Instant) -> Result<Generation, ProviderError> {
    use crate::health::Sample;
    let (app, policy) = (env.app, &env.snap.policy);
    let step_route = &policy.routes[s.route];
    let target = &step_route.targets[s.target];
    let live = &env.snap.live[s.route][s.target];
    let ps = &live.provider;
    let spec = policy.providers.get(&target.provider);
    let now = tokio::time::Instant::now();
    let provider = &env.snap.target_providers[s.route][s.target];
    let kind = spec.map_or("?", |p| p.kind.name());
    if !provider.supports_op(env.req.op) {
        return Err(ProviderError::Unsupported(format!(
            "provider \"{}\" (kind {kind}) does not do /v1/images/{}",
            target.provider,
            env.req.op.path()
        )));
    }
    // Parameters the provider cannot honour: dropped (and said so), or the request is refused.
    let dropped: Vec<Param> = Param::ALL.into_iter().filter(|p| env.req.has(*p) && !provider.supports(*p)).collect();
    if !dropped.is_empty() && spec.is_some_and(|p| p.unsupported == crate::policy::ParamAction::Reject) {
        let names: Vec<&str> = dropped.iter().map(|p| p.name()).collect();
        return Err(ProviderError::UnsupportedParams(format!(
            "provider \"{}\" (kind {kind}) cannot honour {}",
            target.provider,
            names.join(", ")
        )));
    }
    if let Some(left) = ps.paused_for(now) {
        return Err(ProviderError::Skipped { label: "paused", retry_in: left });
    }
    let breaker_cfg = spec.map(|p| p.breaker.clone()).unwrap_or_default();
    let probe = if ps.breaker_quiet() {
        false
    } else {
        let mut b = ps.breaker();
        let (admit, moved) = b.admit(now, &breaker_cfg);
        ps.breaker_settled(&b);
        if let Some(t) = moved {
            crate::live::breaker_moved(&app.metrics, &target.provider, &t, b.gauge());
        }
        match admit {
            crate::health::Admit::No { retry_in } => {
                return Err(ProviderError::Skipped { label: "breaker_open", retry_in })
            }
            crate::health::Admit::Probe => true,
            crate::health::Admit::Yes => false,
        }
    };
    let mut probe_guard = ProbeGuard { provider: ps, armed: probe };
    let slot =
        ps.acquire(spec.and_then(|p| p.concurrency.as_ref()), until.saturating_duration_since(now), &app.metrics);
    let slot = slot.await?;
    let model = target.model.as_deref().unwrap_or(env.alias);
    let sent = tokio::time::Instant::now();
    let default_fetch = crate::policy::FetchPolicy::default();
    let fetch = spec.map_or(&default_fetch, |p| &p.fetch);
    let attempt =
        AttemptRequest { req: env.req, model, target_model: target.model.as_deref(), dropped: &dropped, fetch };
    let result = match tokio::time::timeout_at(until, provider.generate(&attempt)).await {
        Ok(r) => r,
        Err(_) => Err(ProviderError::Timeout),
    };
    drop(slot);
    let latency = sent.elapsed();
    let evidence = crate::live::breaker_evidence(&result.as_ref().map(|_| ()));
    match evidence {
        // The common case: a closed breaker with nothing counted stays so, without its lock.
        Some(true) if !probe && ps.breaker_quiet() => {}
        Some(ok) => {
            probe_guard.armed = false;
            let why = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            let mut b = ps.breaker();
            if let Some(t) = b.on_result(tokio::time::Instant::now(), ok, probe, &why, &breaker_cfg) {
                crate::live::breaker_moved(&app.metrics, &target.provider, &t, b.gauge());
            }
            ps.breaker_settled(&b);
        }
        None => {}
    }
    let record = |sample: Sample, latency: std::time::Duration| {
        for t in live.health.record(tokio::time::Instant::now(), latency, sample, &step_route.health) {
            health_moved(app, &step_route.name, target, &t);
        }
    };
    let mut generation = match result {
        Ok(g) => g,
        Err(e) => {
            if let ProviderError::Status { status, retry_after: Some(d), .. } = &e {
                if *status == StatusCode::TOO_MANY_REQUESTS {
                    let d = (*d).min(spec.map_or(std::time::Duration::from_secs(300), |p| p.max_pause));
                    ps.pause(tokio::time::Instant::now(), d);
                    app.metrics.provider_paused.with_label_values(&[&target.provider]).inc();
                    tracing::warn!(provider = %target.provider, pause_ms = d.as_millis() as u64, "provider answered 429; paused");
                }
            }
            match evidence {
                Some(false) if matches!(e, ProviderError::Timeout) => record(Sample::Timeout, latency),
                Some(false) => record(Sample::Error, latency),
                _ => {}
            }
            return Err(e);
        }
    };
    // What was used, as the provider reports it, completed from what was sent.
    let st = &mut generation.settings;
    let sent_if = |p: Param| !dropped.contains(&p);
    st.seed = st.seed.or(env.req.seed.filter(|_| sent_if(Param::Seed)));
    st.steps = st.steps.or(env.req.steps.filter(|_| sent_if(Param::Steps)));
    st.guidance = st.guidance.or(env.req.guidance_scale.filter(|_| sent_if(Param::Guidance)));
    if st.sampler.is_none() && sent_if(Param::Sampler) {
        st.sampler = env.req.sampler.clone();
    }
    if st.model.is_none() {
        st.model = Some(model.to_string());
    }
    generation.dropped = dropped.iter().map(|p| p.name()).collect();
    // A provider URL is fetched (SSRF-guarded) when the gateway needs the bytes: to evaluate
    // them, or to answer b64_json or gateway-served URLs.
    let evaluates = !step_route.eval.evaluators.is_empty();
    if (env.needs_bytes || evaluates) && generation.images.iter().any(|i| matches!(i, Image::Url(_))) {
        let fetched = tokio::time::timeout_at(until, crate::fetch::fetch_images(&mut generation.images, fetch)).await;
        match fetched {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                app.metrics.fetch_refused.with_label_values(&[&target.provider, e.reason()]).inc();
                tracing::warn!(provider = %target.provider, "image URL refused: {e}");
                record(Sample::Error, latency);
                return Err(ProviderError::FetchRefused(e.to_string()));
            }
            Err(_) => return Err(ProviderError::Timeout),
        }
    }
    if !step_route.eval.evaluators.is_empty() {
        let labels = (env.route_name, target.provider.as_str());
        let evaluated = tokio::time::timeout_at(
            until,
            evaluate_attempt(app, &mut generation, &step_route.eval, env.req, labels, env.mirror),
        )
        .await;
        if let Some(sink) = env.verdicts {
            if let Ok(mut v) = sink.lock() {
                v.push((s, generation.verdicts.clone()));
            }
        }
        match evaluated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                record(Sample::EvalFailed, latency);
                return Err(e);
            }
            Err(_) => return Err(ProviderError::Timeout),
        }
    }
    record(Sample::Ok, latency);
    Ok(generation)
}

/// Frees a half-open breaker's probe slot when the attempt ends without saying anything about
/// the provider (cancelled, queued out).
struct ProbeGuard<'a> {
    provider: &'a crate::live::ProviderState,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.provider.breaker().probe_abandoned();
        }
    }
}

fn health_moved(app: &App, route: &str, target: &crate::policy::Target, t: &crate::health::Transition) {
    let model = crate::metrics::model_label(target.model.as_deref());
    let to = if t.demoted { "demoted" } else { "restored" };
    app.metrics.target_demotions.with_label_values(&[route, &target.provider, model, to]).inc();
    app.metrics.target_demoted.with_label_values(&[route, &target.provider, model]).set(i64::from(t.demoted));
    tracing::warn!(route, provider = %target.provider, model, to, reason = %t.reason, "route target health changed");
}

/// An attempt's time limit: the route's, or the provider's when shorter.
fn attempt_timeout(policy: &Policy, s: Step) -> std::time::Duration {
    let r = &policy.routes[s.route];
    let provider_timeout = policy.providers.get(&r.targets[s.target].provider).and_then(|p| p.timeout);
    provider_timeout.map_or(r.attempt_timeout, |t| t.min(r.attempt_timeout))
}

/// Per evaluator, whether any image failed it and the lowest score, from one attempt's verdicts.
fn eval_summary(policy: &Policy, step: Step, verdicts: &[crate::eval::Verdict]) -> Vec<(String, bool, f32)> {
    use crate::eval::Outcome;
    let fail_open = policy.routes[step.route].eval.fail_open;
    let mut out: Vec<(String, bool, f32)> = Vec::new();
    for v in verdicts {
        let failed = v.verdict == Outcome::Fail || (v.verdict == Outcome::Error && !fail_open);
        match out.iter_mut().find(|(name, ..)| name == v.evaluator) {
            Some(e) => {
                e.1 |= failed;
                e.2 = e.2.min(v.score);
            }
            None => out.push((v.evaluator.to_string(), failed, v.score)),
        }
    }
    out
}

/// What the first target of a plan did with a request, for mirror and canary comparisons.
fn first_observation(
    policy: &Policy,
    req: &GenerationRequest,
    outcome: &PlanOutcome,
    first: Step,
    verdicts: &[(Step, Vec<crate::eval::Verdict>)],
) -> crate::compare::Observation {
    use crate::compare::Observation;
    let Some(rec) = outcome.attempts.iter().find(|a| a.step == first) else {
        return Observation { error: true, ..Default::default() };
    };
    let (error, images) = match (&rec.result, &outcome.success) {
        (Ok(()), Some((_, g))) => (false, g.images.len() as u32),
        (Ok(()), None) => (false, req.n),
        (Err(ProviderError::EvalFailed(_) | ProviderError::Blocked(_)), _) => (false, req.n),
        (Err(_), _) => (true, 0),
    };
    let evals = verdicts.iter().rev().find(|(s, _)| *s == first).map(|(_, v)| eval_summary(policy, first, v));
    Observation {
        error,
        latency_ms: rec.elapsed.as_secs_f64() * 1000.0,
        evals: evals.unwrap_or_default(),
        cost_usd: cost_of(
            policy,
            first,
            req,
            images,
            outcome.success.as_ref().filter(|(s, _)| *s == first).map(|(_, g)| g),
        ),
        images,
    }
}

/// A mirror: the candidate's attempt on a copy of the request, scored like the primary's, then
/// paired with the primary's outcome for the report. The client never waits for it.
#[allow(clippy::too_many_arguments)]
async fn mirror_attempt(
    app: Arc<App>,
    snap: Arc<Snapshot>,
    req: Arc<GenerationRequest>,
    step: Step,
    alias: String,
    index: usize,
    mut ticket: crate::mirror::Ticket,
    primary: tokio::sync::oneshot::Receiver<crate::compare::Observation>,
) {
    use crate::compare::Observation;
    let policy = &snap.policy;
    let route = &policy.routes[step.route];
    let m = &route.mirrors[index];
    let labels = [route.name.as_str(), m.label.as_str()];
    let sink = std::sync::Mutex::new(Vec::new());
    let env = AttemptEnv {
        app: &app,
        snap: &snap,
        req: &req,
        alias: &alias,
        route_name: &route.name,
        needs_bytes: true,
        mirror: true,
        verdicts: Some(&sink),
    };
    let started = Instant::now();
    let until = tokio::time::Instant::now() + attempt_timeout(policy, step);
    let result = tokio::select! {
        r = tokio::time::timeout_at(until, attempt_step(&env, step, until)) => r.unwrap_or(Err(ProviderError::Timeout)),
        _ = app.mirror_stop.cancelled() => {
            app.metrics.mirror_dropped.with_label_values(&[labels[0], labels[1], crate::mirror::Skip::Shutdown.label()]).inc();
            return;
        }
    };
    let latency = started.elapsed();
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    let m_ = &app.metrics;
    m_.mirror_requests.with_label_values(&[labels[0], labels[1], label]).inc();
    m_.mirror_latency.with_label_values(&labels).observe(latency.as_secs_f64());
    let (error, images) = match &result {
        Ok(g) => (false, g.images.len() as u32),
        Err(ProviderError::EvalFailed(_) | ProviderError::Blocked(_)) => (false, req.n),
        Err(_) => (true, 0),
    };
    let cost = cost_of(policy, step, &req, images, result.as_ref().ok());
    if let Some(usd) = cost {
        ticket.charge(usd);
        m_.mirror_cost.with_label_values(&labels).inc_by(usd);
        m_.cost.with_label_values(&[labels[0], &route.targets[step.target].provider, "mirror"]).inc_by(usd);
    }
    // The slot is free once the candidate answered; pairing is bookkeeping.
    drop(ticket);
    let verdicts = sink.into_inner().unwrap_or_default();
    let evals = verdicts.iter().rev().find(|(s, _)| *s == step).map(|(_, v)| eval_summary(policy, step, v));
    let candidate = Observation {
        error,
        latency_ms: latency.as_secs_f64() * 1000.0,
        evals: evals.unwrap_or_default(),
        cost_usd: cost,
        images,
    };
    tracing::debug!(route = %route.name, candidate = %m.label, result = label, latency_ms = candidate.latency_ms, "mirror done");
    let wait = crate::mirror::pair_wait(route.deadline);
    let primary = tokio::select! {
        p = tokio::time::timeout(wait, primary) => p,
        _ = app.mirror_stop.cancelled() => return,
    };
    match primary {
        Ok(Ok(p)) => {
            let state = &snap.candidates[step.route].mirrors[index];
            state.comparison.lock().unwrap_or_else(|e| e.into_inner()).record(Some(&p), Some(&candidate));
        }
        // The client went away before its primary attempt ended: no pair to compare.
        _ => tracing::debug!(route = %route.name, candidate = %m.label, "mirror unpaired: the primary did not finish"),
    }
}

/// USD per image of a target for a request's size, when its provider has a price.
/// What `images` images of a request cost on a target, at its provider's price (by model, size
/// and quality, plus steps and GPU time when the generation reports them); `None` when unpriced.
fn cost_of(
    policy: &Policy,
    step: Step,
    req: &GenerationRequest,
    images: u32,
    used: Option<&Generation>,
) -> Option<f64> {
    let target = &policy.routes[step.route].targets[step.target];
    let price = policy.providers.get(&target.provider)?.price.as_ref()?;
    let model = target.model.as_deref().or(req.model.as_deref()).unwrap_or_default();
    let size = req.size_text();
    price.cost(&crate::policy::Billable {
        model,
        size: &size,
        quality: req.quality.as_deref(),
        images,
        steps: used.and_then(|g| g.settings.steps).or(req.steps),
        gpu_seconds: used.and_then(|g| g.gpu_seconds),
    })
}

async fn generate<B>(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
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
    // 3. Within its limits.
    let tenant_limits = key.and_then(|k| policy.tenants.get(&k.tenant));
    if let Some(k) = key {
        app.limits.admit(&app.metrics, k, tenant_limits, req.n)?;
    }
    // 4. Where it goes.
    let cohort = headers.get(COHORT).and_then(|v| v.to_str().ok());
    let key_tags: &[String] = key.map_or(&[], |k| &k.tags);
    let query = RouteQuery { model: req.model.as_deref(), cohort, key_tags };
    let (route_idx, route) = routing::select_route(policy, &query)?;
    ctx.route = Some(route_idx);
    if let Some(w) = &mut ctx.watch {
        w.route = Some(route_idx);
    }
    let alias = req.model.as_deref().or(policy.default_model.as_deref()).unwrap_or_default();
    let mut steps = routing::plan(policy, route_idx, fastrand::f64());
    // Targets demoted by their health window go to the back, in plan order.
    let now = tokio::time::Instant::now();
    let mut demoted = Vec::new();
    steps.retain(|s| {
        let live = &snap.live[s.route][s.target];
        let r = &policy.routes[s.route];
        let (is_demoted, moved) = live.health.demoted(now, &r.health);
        for t in moved {
            health_moved(app, &r.name, &r.targets[s.target], &t);
        }
        let keep = !is_demoted;
        if !keep {
            demoted.push(*s);
        }
        keep
    });
    steps.extend(demoted);
    // A canary serves its share of the route's requests first; the plan stays as fallback.
    let candidates = &snap.candidates[route_idx];
    let canary = match (&route.canary, &candidates.canary) {
        (Some(c), Some(state)) if state.active() => {
            let on = crate::mirror::draw(&ctx.trace_id, "canary") < c.share;
            if on {
                steps.insert(0, Step { route: route_idx, target: c.target });
            }
            Some((c, state, on))
        }
        _ => None,
    };
    ctx.canary = canary.as_ref().is_some_and(|c| c.2);
    let estimate = steps.first().and_then(|&s| cost_of(policy, s, &req, req.n, None)).unwrap_or(0.0);
    let reservation = match key {
        Some(k) => app.limits.reserve(&app.metrics, &k.tenant, tenant_limits, estimate)?,
        None => crate::limits::Reservation::none(),
    };
    // The client's bytes are needed whenever the gateway itself must answer with them.
    let needs_bytes = req.response_format == ResponseFormat::B64Json || route.url_mode == UrlMode::Gateway;

    // 5. Mirrors: sampled copies to candidates, started now and never awaited here.
    let mut primary_side = Vec::new();
    let mut shared_req: Option<Arc<GenerationRequest>> = None;
    // A canary-served request is not mirrored: its first attempt is not the primary's.
    let mirrors = if ctx.canary { &[][..] } else { &route.mirrors[..] };
    for (i, m) in mirrors.iter().enumerate() {
        if crate::mirror::draw(&ctx.trace_id, &m.label) >= m.sample {
            continue;
        }
        let step = Step { route: route_idx, target: m.target };
        let dropped = |why: crate::mirror::Skip| {
            app.metrics.mirror_dropped.with_label_values(&[&route.name, &m.label, why.label()]).inc();
        };
        if app.draining.load(std::sync::atomic::Ordering::Relaxed) {
            dropped(crate::mirror::Skip::Shutdown);
            continue;
        }
        let estimate = cost_of(policy, step, &req, req.n, None).unwrap_or(0.0);
        let ticket = match candidates.mirrors[i].admit(m.max_in_flight, m.spend_usd_per_day, estimate) {
            Ok(t) => t,
            Err(why) => {
                dropped(why);
                continue;
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        primary_side.push(tx);
        let shared = shared_req.get_or_insert_with(|| Arc::new(req.clone())).clone();
        let task = mirror_attempt(app.clone(), snap.clone(), shared, step, alias.to_string(), i, ticket, rx);
        app.mirror_rt.spawn(app.mirror_tasks.track_future(task));
    }

    // 6. Attempts, in plan order, under per-attempt timeouts and the route's deadline.
    let deadline = tokio::time::Instant::now() + route.deadline;
    let timeout_of = |s: Step| attempt_timeout(policy, s);
    let hedging = route.hedge.as_ref().map(|h| {
        let observed = match (h.after_p95, steps.first()) {
            (true, Some(s)) => snap.live[s.route][s.target]
                .health
                .window(&policy.routes[s.route].health)
                .p95(now, &policy.routes[s.route].health)
                .map(|p| p.max(h.min_after)),
            _ => None,
        };
        routing::Hedging { after: observed.unwrap_or(h.after), max_parallel: h.max_parallel }
    });
    let compared = !primary_side.is_empty() || canary.is_some();
    let verdicts = compared.then(|| std::sync::Mutex::new(Vec::new()));
    let env = AttemptEnv {
        app,
        snap,
        req: &req,
        alias,
        route_name: &route.name,
        needs_bytes,
        mirror: false,
        verdicts: verdicts.as_ref(),
    };
    let env = &env;
    let outcome =
        routing::run_plan(&steps, deadline, timeout_of, hedging, |s, until| attempt_step(env, s, until)).await;
    record_attempts(app, snap, route_idx, &outcome, ctx);
    if let (Some(first), Some(verdicts)) = (steps.first(), &verdicts) {
        let verdicts = verdicts.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let o = first_observation(policy, &req, &outcome, *first, &verdicts);
        for tx in primary_side {
            let _ = tx.send(o.clone());
        }
        if let Some((c, state, on)) = &canary {
            if let Some(reason) = state.record(*on, &o, &c.guard) {
                app.metrics.canary_rollbacks.with_label_values(&[&route.name]).inc();
                app.metrics.canary_state.with_label_values(&[&route.name]).set(0);
                tracing::warn!(route = %route.name, candidate = %c.label, %reason, "canary rolled back: all traffic to the primary until the canary settings are edited");
            }
        }
    }

    // 7. What it cost: the images returned, those discarded after evaluation, and hedges
    // cancelled (the provider most likely bills them).
    let mut total = None;
    for a in &outcome.attempts {
        let kind = match &a.result {
            Ok(()) => "returned",
            Err(ProviderError::EvalFailed(_) | ProviderError::Blocked(_)) => "discarded",
            Err(ProviderError::HedgeCancelled) => "hedge",
            Err(_) => continue,
        };
        let winner = match (&a.result, &outcome.success) {
            (Ok(()), Some((_, g))) => Some(g),
            _ => None,
        };
        let images = winner.map_or(req.n, |g| g.images.len() as u32);
        let Some(usd) = cost_of(policy, a.step, &req, images, winner) else { continue };
        let provider = &policy.routes[a.step.route].targets[a.step.target].provider;
        app.metrics.cost.with_label_values(&[&route.name, provider, kind]).inc_by(usd);
        *total.get_or_insert(0.0) += usd;
    }
    reservation.settle(total.unwrap_or(0.0));
    ctx.cost = total;

    // 8. The answer.
    let Some((step, mut generation)) = outcome.success else {
        return Err(failure(policy, &outcome));
    };
    let winner = &policy.routes[step.route];
    ctx.provider = Some(step);
    if !generation.verdicts.is_empty() {
        ctx.eval_summary = Some(crate::eval::summary(&generation.verdicts));
    }
    ctx.flags = std::mem::take(&mut generation.flags);
    ctx.generation = Some(generation.settings.header()).filter(|h| !h.is_empty());
    ctx.dropped = std::mem::take(&mut generation.dropped);
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
        // Only attempts that reached the provider and ended say anything about its latency.
        let reached = !matches!(
            a.result,
            Err(ProviderError::Skipped { .. }
                | ProviderError::QueueFull
                | ProviderError::QueueTimeout
                | ProviderError::Busy
                | ProviderError::HedgeCancelled)
        );
        if reached {
            latency.observe(a.elapsed.as_secs_f64());
        }
        if let Some((from, reason)) = prev {
            m.fallbacks.with_label_values(&[route.as_str(), from, &target.provider, reason]).inc();
        }
        if let Err(e) = &a.result {
            tracing::info!(trace_id = %ctx.trace_id, route = %route, provider = %target.provider, result = label, "attempt failed: {e}");
        }
        prev = Some((&target.provider, label));
        ctx.attempts.push((a.step, label));
    }
    if outcome.hedges_started > 0 {
        let h = &m.hedges;
        h.with_label_values(&[route.as_str(), "started"]).inc_by(u64::from(outcome.hedges_started));
        // Hedges cancelled because another attempt answered first.
        let lost = outcome
            .attempts
            .iter()
            .filter(|a| a.hedge && matches!(a.result, Err(ProviderError::HedgeCancelled)))
            .count();
        h.with_label_values(&[route.as_str(), "lost"]).inc_by(lost as u64);
        if outcome.won_by_hedge {
            h.with_label_values(&[route.as_str(), "won"]).inc();
        }
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
        Some(ProviderError::Busy) => {
            let provider = outcome
                .attempts
                .last()
                .map_or("", |a| policy.routes[a.step.route].targets[a.step.target].provider.as_str());
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "provider_busy",
                format!(
                    "provider \"{provider}\" is at its concurrency limit and its wait queue is full; retry shortly"
                ),
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
    let (mime, ext) = crate::providers::sniff_image(&bytes).unwrap_or(("application/octet-stream", "bin"));
    let id = app.artifacts.put(bytes, mime, policy.server.url_ttl);
    format!("{base}/v1/images/artifacts/{id}.{ext}")
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

fn finish(app: &App, snap: &Snapshot, mut ctx: RequestCtx, result: Result<ChunkedBody, ApiError>) -> Response {
    ctx.disarm();
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
                (Some("rate_limit_exceeded" | "spend_limit_exceeded"), _) => "rate_limited",
                (Some("no_healthy_target"), _) => "no_healthy_target",
                (Some("provider_busy"), _) => "provider_busy",
                (Some("idempotency_key_reused"), _) => "idempotency_conflict",
                (Some("unsupported_parameter" | "unsupported_operation"), _) => "client_error",
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
    if ctx.canary {
        h.insert(CANARY, HeaderValue::from_static("true"));
    }
    if let Some(g) = ctx.generation.as_deref() {
        h.insert(GENERATION, header_text(g));
    }
    if !ctx.dropped.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&ctx.dropped.join(", ")) {
            h.insert(DROPPED, v);
        }
    }
    if let Some(usd) = ctx.cost {
        if let Ok(v) = HeaderValue::from_str(&format_usd(usd)) {
            h.insert(COST, v);
        }
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

/// A dollar amount without float noise: at most 6 decimals, trailing zeros dropped.
fn format_usd(usd: f64) -> String {
    let s = format!("{usd:.6}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.').map_or_else(|| s.to_string(), |i| i.to_string())
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
