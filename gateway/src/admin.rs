//! The admin listener: metrics and probes open, everything else behind `ACC_ADMIN_TOKEN` (the
//! `/admin` API as a bearer token, the console at `/console/` through a signed-in session).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::error::ApiError;
use crate::metrics::model_label;
use crate::store::{StoreError, TraceDb, TraceFilter};

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/admin/policies", get(policies))
        .route("/admin/reload", post(reload))
        .route("/admin/routes", get(routes))
        .route("/admin/providers/{name}/reset", post(reset_provider))
        .route("/admin/mirror/report", get(mirror_report))
        .route("/admin/traces", get(traces))
        .route("/admin/traces/{trace_id}", get(trace))
        .merge(crate::review_api::admin_routes());
    // The console reads and decides through these same handlers, in process, behind its own
    // session check instead of the bearer token.
    let console = crate::console::router(app.clone(), api.clone().with_state(app.clone()));
    let protected = api.route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .merge(console)
        .fallback(|| async { ApiError::not_found("unknown_url", "unknown admin path").into_response() })
        // A known path with another method: the OpenAI error shape, as on the proxy listener
        // (axum's own 405 has an empty body).
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "this admin path does not take this method (see the Allow header)",
            )
            .into_response()
        })
        .layer(tower::ServiceBuilder::new().layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error").into_response()
        })))
        // RFC 9112 section 3.2, as on the proxy listener.
        .layer(middleware::from_fn(|req: Request, next: Next| async move {
            match crate::proxy::host_refusal(req.version(), req.headers()) {
                Some(refused) => refused,
                None => next.run(req).await,
            }
        }))
        .layer(middleware::map_response(|r: Response| async move {
            let mut r = openai_shaped_rejection(r).await;
            // Every answer's content type is the one its bytes are: browsers must not guess.
            r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            r
        }))
        .with_state(app)
}

/// axum answers a request its extractors refuse (a path segment that is not UTF-8, such as
/// `/admin/providers/%FF/reset`) with a plain-text 4xx: rewritten in the OpenAI error shape,
/// code `invalid_request`, its text as the message. Other answers pass unchanged.
async fn openai_shaped_rejection(r: Response) -> Response {
    let plain = r.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(plain && r.status().is_client_error()) {
        return r;
    }
    let status = r.status();
    let text = axum::body::to_bytes(r.into_body(), 64 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    ApiError::new(status, "invalid_request_error", "invalid_request", crate::cut(text.trim(), 500)).into_response()
}

/// The protected admin endpoints' gate. Its 401 says whose token is missing: the server's (no
/// `ACC_ADMIN_TOKEN` at start-up) or the client's (no bearer, another scheme, a wrong token);
/// neither the expected nor the given token is ever echoed.
async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(expected) = &app.admin_token_digest else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "admin_token_not_configured",
            "the server has no admin token: ACC_ADMIN_TOKEN was not set when this gateway started, so /admin/* \
             is disabled; restart `acc serve` with ACC_ADMIN_TOKEN set to a secret and send it as \
             `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    let token =
        match crate::secrets::credentials(req.headers()) {
            crate::secrets::Credentials::Bearer(token) => token,
            crate::secrets::Credentials::Missing => return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing_admin_token",
                "no admin token in the request: send the server's ACC_ADMIN_TOKEN as `Authorization: Bearer <token>`",
            )
            .into_response(),
            crate::secrets::Credentials::Several => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing_admin_token",
                    "several Authorization headers: send one, `Authorization: Bearer <token>`",
                )
                .into_response()
            }
            crate::secrets::Credentials::NotBearer => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing_admin_token",
                    "the Authorization header is not a bearer token: send `Authorization: Bearer <token>` with the \
             server's ACC_ADMIN_TOKEN",
                )
                .into_response()
            }
        };
    // Comparing digests keeps the comparison's timing independent of the token's bytes.
    if Sha256::digest(token.trim().as_bytes()).as_slice() == expected.as_slice() {
        return next.run(req).await;
    }
    // A wrong token is answered after a pause, one at a time: guesses at the token go at most
    // about one per WRONG_TOKEN_DELAY, and a burst beyond WRONG_TOKEN_LINE is refused at once.
    let Some(_place) = WrongTokens::join() else {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request_error",
            "too_many_wrong_admin_tokens",
            "too many requests with a wrong admin token are waiting; retry later with the server's ACC_ADMIN_TOKEN",
        );
        e.retry_after = Some(5);
        return e.into_response();
    };
    let _turn = WRONG_TOKENS.turn.lock().await;
    tokio::time::sleep(WRONG_TOKEN_DELAY).await;
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_admin_token",
        "wrong admin token: the bearer token sent is not the server's ACC_ADMIN_TOKEN",
    )
    .into_response()
}

/// The pause before a wrong admin token's 401 (requests with wrong tokens wait behind it, one
/// at a time), so the token cannot be guessed at line rate.
pub const WRONG_TOKEN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Requests with a wrong admin token that may wait at once; more get 429
/// `too_many_wrong_admin_tokens` (`Retry-After: 5`) at once, so a flood holds few connections.
pub const WRONG_TOKEN_LINE: usize = 8;

/// Requests with a wrong admin token, in line (one admin listener per process).
struct WrongTokens {
    turn: tokio::sync::Mutex<()>,
    waiting: std::sync::atomic::AtomicUsize,
}

static WRONG_TOKENS: WrongTokens =
    WrongTokens { turn: tokio::sync::Mutex::const_new(()), waiting: std::sync::atomic::AtomicUsize::new(0) };

/// A place in the wrong-token line, given back when dropped.
struct LinePlace;

impl WrongTokens {
    fn join() -> Option<LinePlace> {
        let before = WRONG_TOKENS.waiting.fetch_add(1, Ordering::SeqCst);
        let place = LinePlace;
        (before < WRONG_TOKEN_LINE).then_some(place)
    }
}

impl Drop for LinePlace {
    fn drop(&mut self) {
        WRONG_TOKENS.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    export_live(&app);
    let mut r = Response::new(axum::body::Body::from(app.metrics.render()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let draining = app.draining.load(Ordering::Relaxed);
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    // Which evaluators can run, and why not: a missing model is a degraded gateway, not a
    // dead one (routes apply their fail-open/fail-closed rule), so readiness stays 200.
    let evaluators: serde_json::Map<String, serde_json::Value> = app
        .evaluator_status
        .iter()
        .map(|(name, state)| {
            let v = match state {
                Ok(()) => json!("ready"),
                Err(why) => json!(format!("unavailable: {why}")),
            };
            (name.to_string(), v)
        })
        .collect();
    // A trace store that is down does not make the gateway unready: requests are served and
    // the lost records counted.
    let trace_store = match &app.traces {
        None => json!({"state": "disabled"}),
        Some(w) => json!({
            "state": if w.is_available() { "ready" } else { "unavailable" },
            "queued": w.queued(),
        }),
    };
    // Redis down does not make the gateway unready either: on_cluster_error says what
    // requests meet meanwhile (this replica's own state, or a 503).
    let cluster = match app.limits.cluster() {
        None => json!({"state": "disabled", "detail": "limits, spend, idempotency and pauses are kept per replica"}),
        Some(c) => {
            let st = c.status();
            let detail = match (st.mode, st.on_cluster_error) {
                ("shared", _) => "shared through Redis".to_string(),
                (_, "fail_closed") => {
                    "Redis unreachable: requests that need shared state are refused (503) until it answers".to_string()
                }
                _ => "Redis unreachable: limits, spend, idempotency and pauses are per replica until it answers"
                    .to_string(),
            };
            json!({"state": st.mode, "on_cluster_error": st.on_cluster_error, "detail": detail, "last_error": st.last_error})
        }
    };
    let body = json!({
        "status": if draining { "draining" } else { "ready" },
        "policy_version": snap.policy.version,
        "evaluators": evaluators,
        "trace_store": trace_store,
        "cluster": cluster,
    });
    (status, Json(body)).into_response()
}

/// The open trace store, or the error a client gets when there is none.
fn trace_db(app: &App) -> Result<TraceDb, Response> {
    let Some(w) = &app.traces else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "traces_disabled",
            "trace records are not kept: [store] enabled = false",
        )
        .into_response());
    };
    w.db().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "store_unavailable",
            "the trace store is unavailable now; requests are still served and the lost records counted in acc_trace_dropped_total",
        )
        .into_response()
    })
}

fn store_error(e: StoreError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    tracing::warn!("trace store read failed: {e}");
    let code = if e.is_unavailable() { "store_unavailable" } else { "store_error" };
    ApiError::new(status, "api_error", code, format!("reading the trace store failed: {e}")).into_response()
}

/// `GET /admin/traces/{trace_id}[?span_id=...]`: the whole record as JSON (see
/// `store::record`). A trace a client continued over several requests holds one record per
/// request: without `span_id` the newest is answered, with `records_in_trace` and `span_ids`
/// (oldest first) added; `span_id` (the record's `span_id`) picks one. Every answer adds the
/// trace's `feedback` entries (the `feedback` table's rows) and `regenerated_by` (the requests
/// that regenerated it, `{trace_id, how, end_user}`, the latest per end user); the record's own
/// `regeneration` says what it regenerated.
async fn trace(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    uri: http::Uri,
) -> Response {
    let mut span = None;
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*key {
            "span_id" if span.is_none() => span = Some(value.trim().to_ascii_lowercase()),
            "span_id" => {
                return ApiError::invalid("span_id", "invalid_filter", "query parameter \"span_id\" is given twice")
                    .into_response()
            }
            other => {
                let other = crate::cut(other, 64);
                return ApiError::invalid(
                    "query",
                    "invalid_filter",
                    format!("unknown query parameter {other:?} (expected span_id)"),
                )
                .into_response();
            }
        }
    }
    if span.as_deref().is_some_and(|s| s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit())) {
        return ApiError::invalid("span_id", "invalid_span_id", "a span id is 16 hex digits").into_response();
    }
    // Hex in either case, as the other endpoints that take a trace id accept it.
    if !crate::request::is_trace_id(&id) {
        return ApiError::invalid("trace_id", "invalid_trace_id", "a trace id is 32 hex digits").into_response();
    }
    let id = id.to_ascii_lowercase();
    let db = match trace_db(&app) {
        Ok(db) => db,
        Err(r) => return r,
    };
    let missing = || {
        ApiError::not_found(
            "trace_not_found",
            format!("no trace record {id} (never made, pruned, or lost: see acc_trace_dropped_total)"),
        )
        .into_response()
    };
    let mut records = match db.get_all(&id).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    // The trace's ratings, and the requests that regenerated it (from their implicit ratings).
    let feedback = match db.feedback_of(&id).await {
        Ok(f) => f,
        Err(e) => return store_error(e),
    };
    let with_feedback = |rec: crate::store::TraceRecord| {
        let mut v = serde_json::to_value(rec).unwrap_or_default();
        v["regenerated_by"] = json!(crate::feedback::regenerated_by(&feedback));
        v["feedback"] = json!(feedback);
        v
    };
    if let Some(span) = span {
        return match records.into_iter().find(|r| r.span_id == span) {
            Some(rec) => Json(with_feedback(rec)).into_response(),
            None => missing(),
        };
    }
    let n = records.len();
    let span_ids: Vec<String> = records.iter().map(|r| r.span_id.clone()).collect();
    let Some(newest) = records.pop() else { return missing() };
    let mut v = with_feedback(newest);
    // A held answer's review state (held, decided, reviewer, reason) next to the record.
    if let Some(review) = crate::review_api::trace_review(&app, &id).await {
        v["review"] = review;
    }
    if n > 1 {
        v["records_in_trace"] = json!(n);
        v["span_ids"] = json!(span_ids);
    }
    Json(v).into_response()
}

/// `GET /admin/traces?route=&tenant=&cohort=&template=&asset_type=&provider=&decision=&verdict=&since=&until=&limit=&cursor=`:
/// newest first, `{"object": "list", "data": [record...], "next_cursor": string|null}`; pass
/// `next_cursor` back as `cursor` for the next page. A bad filter is a 400 `invalid_filter`.
async fn traces(State(app): State<Arc<App>>, uri: http::Uri) -> Response {
    // Without a store there is nothing a filter could select: say so first.
    if app.traces.is_none() {
        return trace_db(&app).err().unwrap_or_else(|| StatusCode::NOT_FOUND.into_response());
    }
    let filter = match TraceFilter::from_query(uri.query().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return ApiError::invalid(e.param, "invalid_filter", e.message).into_response(),
    };
    let db = match trace_db(&app) {
        Ok(db) => db,
        Err(r) => return r,
    };
    match db.list(&filter).await {
        Ok(page) => Json(json!({
            "object": "list",
            "data": page.records,
            "has_more": page.next_cursor.is_some(),
            "next_cursor": page.next_cursor,
        }))
        .into_response(),
        Err(e) => store_error(e),
    }
}

async fn policies(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let loaded = snap.loaded_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let status = app.policy.status();
    Json(json!({
        "version": snap.policy.version,
        "files": snap.policy.files,
        "loaded_at_unix": loaded,
        "last_reload_error": status.last_error,
        "last_reload_error_at_unix": status.last_error_at_unix,
        "warnings": snap.policy.warnings,
    }))
    .into_response()
}

async fn reload(State(app): State<Arc<App>>) -> Response {
    match app.policy.reload(true, "admin").await {
        Ok(version) => Json(json!({"result": "ok", "version": version})).into_response(),
        Err(errors) => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_policy",
                format!("policy refused, the last good policy keeps serving: {}", errors.join("; ")),
            );
            e.param = None;
            e.into_response()
        }
    }
}

/// `POST /admin/providers/{name}/reset`: lifts the provider's hold-offs by hand, on this
/// replica and, with `[cluster]`, on every replica within `sync_ms` (see
/// [`crate::live::Live::reset`]): its 429 pause, and its circuit breaker closed with the
/// failures counted forgotten (`acc_breaker_transitions_total{to="closed"}` when it was open).
/// For when ops know the provider is back (a fixed key, the end of an incident) before a long
/// `Retry-After` or cooldown runs out. No body. Answers `{"provider", "breaker_was",
/// "paused_for_ms_was", "shared_open_for_ms_was", "replicas": "this" | "all"}`. Errors: 404
/// `provider_not_found` when the policy has no such provider; 503 `cluster_unavailable` with
/// `Retry-After: 1` when Redis did not answer in time (this replica was reset, the others may
/// not be: retrying is safe).
async fn reset_provider(
    State(app): State<Arc<App>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let snapshot = app.policy.snapshot();
    if !snapshot.policy.providers.contains_key(&name) {
        return ApiError::not_found(
            "provider_not_found",
            format!("the policy has no provider {:?}", crate::cut(&name, 64)),
        )
        .into_response();
    }
    drop(snapshot);
    let cluster = app.limits.cluster().map(|c| &**c);
    let (lifted, shared) = app.policy.live.reset(&name, cluster, &app.metrics).await;
    tracing::warn!(
        provider = %name,
        breaker_was = lifted.breaker,
        paused_for_ms_was = lifted.paused_for.map(|d| d.as_millis() as u64),
        shared = shared.is_ok() && cluster.is_some(),
        "provider hold-offs reset by hand"
    );
    if shared.is_err() {
        // The call may still have run after its deadline (Redis stalled, not down): a retry
        // is safe either way.
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "cluster_unavailable",
            format!(
                "provider {name} was reset on this replica; Redis did not answer in time, so the other replicas may keep its pause and breaker until they end: retry (a reset is safe to repeat)"
            ),
        );
        e.retry_after = Some(1);
        return e.into_response();
    }
    Json(json!({
        "provider": name,
        "breaker_was": lifted.breaker,
        "paused_for_ms_was": lifted.paused_for.map(|d| d.as_millis() as u64),
        "shared_open_for_ms_was": lifted.shared_open_for.map(|d| d.as_millis() as u64),
        "replicas": if cluster.is_some() { "all" } else { "this" },
    }))
    .into_response()
}

/// Removes the series of `vec` whose labels `keep` refuses: gauges of routes, targets,
/// providers and candidates a reload removed would otherwise stay at their last value (an open
/// breaker of a provider no longer in the policy firing its alert until a restart).
fn drop_stale<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    keep: impl Fn(&HashMap<&str, &str>) -> bool,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric.get_label().iter().map(|l| (l.name(), l.value())).collect();
            if !keep(&labels) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// Drops the live gauges' series that the policy `snap` serves no longer (see [`drop_stale`]).
fn drop_removed(m: &crate::metrics::Metrics, policy: &crate::policy::Policy) {
    fn label<'a>(l: &HashMap<&str, &'a str>, k: &str) -> &'a str {
        l.get(k).copied().unwrap_or("")
    }
    let target = |l: &HashMap<&str, &str>| {
        policy.routes.iter().any(|r| {
            r.name == label(l, "route")
                && r.targets
                    .iter()
                    .any(|t| t.provider == label(l, "provider") && model_label(t.model.as_deref()) == label(l, "model"))
        })
    };
    drop_stale(&m.target_latency, target);
    drop_stale(&m.target_error_ratio, target);
    drop_stale(&m.target_timeout_ratio, target);
    drop_stale(&m.target_eval_fail_ratio, target);
    drop_stale(&m.target_samples, target);
    drop_stale(&m.target_demoted, target);
    let provider = |l: &HashMap<&str, &str>| policy.providers.contains_key(label(l, "provider"));
    drop_stale(&m.breaker_state, provider);
    drop_stale(&m.queue_depth, provider);
    let route = |l: &HashMap<&str, &str>| policy.routes.iter().any(|r| r.name == label(l, "route"));
    drop_stale(&m.canary_state, |l| policy.routes.iter().any(|r| r.name == label(l, "route") && r.canary.is_some()));
    drop_stale(&m.mirror_samples, route);
    drop_stale(&m.mirror_error_rate, route);
    drop_stale(&m.mirror_latency_p, route);
    drop_stale(&m.mirror_eval_fail_rate, route);
    drop_stale(&m.mirror_cost_per_image, route);
}

/// Health windows, breakers and queues are read when scraped, not on every request.
fn export_live(app: &App) {
    let snap = app.policy.snapshot();
    let m = &app.metrics;
    drop_removed(m, &snap.policy);
    let now = tokio::time::Instant::now();
    for (r, route) in snap.policy.routes.iter().enumerate() {
        for (t, target) in route.targets.iter().enumerate() {
            let (stats, demoted) = {
                let h = snap.live[r][t].health.window(&route.health);
                (h.stats(now, &route.health), h.demoted().is_some())
            };
            let labels = [route.name.as_str(), target.provider.as_str(), model_label(target.model.as_deref())];
            for (q, v) in [("p50", stats.p50_ms), ("p95", stats.p95_ms), ("p99", stats.p99_ms)] {
                let g = m.target_latency.with_label_values(&[labels[0], labels[1], labels[2], q]);
                g.set(v.unwrap_or(0.0) / 1000.0);
            }
            m.target_error_ratio.with_label_values(&labels).set(stats.error_ratio);
            m.target_timeout_ratio.with_label_values(&labels).set(stats.timeout_ratio);
            m.target_eval_fail_ratio.with_label_values(&labels).set(stats.eval_fail_ratio);
            m.target_samples.with_label_values(&labels).set(stats.samples as i64);
            m.target_demoted.with_label_values(&labels).set(i64::from(demoted));
        }
    }
    for p in app.policy.live.providers() {
        if !snap.policy.providers.contains_key(&p.name) {
            continue;
        }
        let gauge = {
            let b = p.breaker();
            // An open breaker past its cooldown reads as half-open only once a request asks.
            b.gauge()
        };
        m.breaker_state.with_label_values(&[&p.name]).set(gauge);
        m.queue_depth.with_label_values(&[&p.name]).set(p.queued.load(Ordering::Relaxed) as i64);
    }
    m.tasks_alive.set(app.tasks_alive() as i64);
    for (r, route) in snap.policy.routes.iter().enumerate() {
        let cands = &snap.candidates[r];
        let compared = route
            .mirrors
            .iter()
            .zip(&cands.mirrors)
            .map(|(mi, st)| (mi.label.as_str(), st.comparison.lock().map(|c| c.clone()).unwrap_or_default()))
            .chain(route.canary.as_ref().zip(cands.canary.as_ref()).map(|(_, st)| {
                m.canary_state.with_label_values(&[&route.name]).set(i64::from(st.active()));
                ("canary", st.comparison.lock().map(|c| c.clone()).unwrap_or_default())
            }));
        for (candidate, cmp) in compared {
            for (side, s) in [("primary", cmp.primary.summary()), ("candidate", cmp.candidate.summary())] {
                let l = [route.name.as_str(), candidate, side];
                m.mirror_samples.with_label_values(&l).set(s.samples as i64);
                m.mirror_error_rate.with_label_values(&l).set(s.error_rate);
                for (p, v) in [("p50", s.p50_ms), ("p95", s.p95_ms), ("p99", s.p99_ms)] {
                    m.mirror_latency_p.with_label_values(&[l[0], l[1], l[2], p]).set(v.unwrap_or(0.0) / 1000.0);
                }
                for (evaluator, rate) in &s.eval_fail_rate {
                    m.mirror_eval_fail_rate.with_label_values(&[l[0], l[1], l[2], evaluator]).set(*rate);
                }
                if let Some(c) = s.cost_per_image_usd {
                    m.mirror_cost_per_image.with_label_values(&l).set(c);
                }
            }
        }
    }
}

async fn mirror_report(State(app): State<Arc<App>>, uri: http::Uri) -> Response {
    let snap = app.policy.snapshot();
    // `?route=NAME`: route names are plain words, so no percent-decoding is needed.
    let route = uri.query().into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("route="));
    if let Some(r) = route {
        if !snap.policy.routes.iter().any(|x| x.name == r) {
            return ApiError::not_found("route_not_found", format!("no route named \"{r}\"")).into_response();
        }
    }
    Json(crate::mirror::report(&snap.policy, &snap.candidates, route)).into_response()
}

fn price_json(p: &crate::policy::Price) -> serde_json::Value {
    let table = |t: &crate::policy::PriceTable| {
        let sized = |s: &crate::policy::SizePrice| json!({"by_size": s.by_size, "default": s.default});
        json!({
            "per_image_usd": t.per_image.as_ref().map(sized),
            "quality": t.quality.iter().map(|(q, s)| (q.clone(), sized(s))).collect::<serde_json::Map<_, _>>(),
            "per_step_usd": t.per_step,
            "per_gpu_second_usd": t.per_gpu_second,
        })
    };
    json!({"base": table(&p.base), "models": p.models.iter().map(|(m, t)| (m.clone(), table(t))).collect::<serde_json::Map<_, _>>()})
}

async fn routes(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let p = &snap.policy;
    let now = tokio::time::Instant::now();
    let routes: Vec<_> = p
        .routes
        .iter()
        .enumerate()
        .map(|(ri, r)| {
            let targets: Vec<_> = r
                .targets
                .iter()
                .enumerate()
                .map(|(ti, t)| {
                    let h = snap.live[ri][ti].health.window(&r.health);
                    let stats = h.stats(now, &r.health);
                    json!({
                        "provider": t.provider, "model": t.model, "weight": t.weight, "role": t.role.label(),
                        "health": {
                            "samples": stats.samples, "p50_ms": stats.p50_ms, "p95_ms": stats.p95_ms,
                            "p99_ms": stats.p99_ms, "error_ratio": stats.error_ratio,
                            "timeout_ratio": stats.timeout_ratio, "eval_fail_ratio": stats.eval_fail_ratio,
                            "demoted": h.demoted().is_some(), "demoted_reason": h.demoted(),
                        },
                    })
                })
                .collect();
            json!({
                "name": r.name,
                "match": {"model": r.matcher.model, "cohort": r.matcher.cohort, "key_tags": r.matcher.key_tags},
                "targets": targets,
                "fallbacks": r.fallbacks.iter().map(|&i| p.routes[i].name.clone()).collect::<Vec<_>>(),
                "attempt_timeout_ms": r.attempt_timeout.as_millis() as u64,
                "deadline_ms": r.deadline.as_millis() as u64,
                "thresholds": {
                    "latency_slo_ms": r.health.latency_slo.map(|d| d.as_millis() as u64),
                    "max_error_ratio": r.health.max_error_ratio,
                    "max_eval_fail_ratio": r.health.max_eval_fail_ratio,
                    "window": r.health.window,
                    "window_secs": r.health.window_age.as_secs(),
                    "min_samples": r.health.min_samples,
                    "recover_below": crate::health::RECOVER,
                },
                "mirrors": r.mirrors.iter().zip(&snap.candidates[ri].mirrors).map(|(m, st)| json!({
                    "candidate": m.label, "sample": m.sample, "max_in_flight": m.max_in_flight,
                    "spend_usd_per_day": m.spend_usd_per_day, "in_flight": st.in_flight(),
                    "spent_today_usd": st.spent_today(),
                })).collect::<Vec<_>>(),
                "canary": r.canary.as_ref().zip(snap.candidates[ri].canary.as_ref()).map(|(c, st)| {
                    let cmp = st.comparison.lock().map(|c| c.clone()).unwrap_or_default();
                    json!({
                        "candidate": c.label, "share": c.share,
                        "state": if st.active() { "active" } else { "rolled_back" },
                        "reason": st.rolled_back(),
                        "samples": {"primary": cmp.primary.samples(), "canary": cmp.candidate.samples()},
                        "guard": {
                            "min_samples": c.guard.min_samples,
                            "max_eval_fail_increase": c.guard.max_eval_fail_increase,
                            "max_error_increase": c.guard.max_error_increase,
                            "max_p99_ratio": c.guard.max_p99_ratio,
                            "alpha": c.guard.alpha,
                        },
                    })
                }),
                "hedge": r.hedge.as_ref().map(|h| json!({
                    "after_ms": h.after.as_millis() as u64, "after_p95": h.after_p95,
                    "min_after_ms": h.min_after.as_millis() as u64, "max_parallel": h.max_parallel,
                })),
            })
        })
        .collect();
    let providers: Vec<_> = p
        .providers
        .values()
        .map(|s| {
            let kind = s.kind.name();
            let live = app.policy.live.provider(&s.name);
            let breaker = {
                let b = live.breaker();
                json!({
                    "enabled": s.breaker.enabled,
                    "state": b.state_label(),
                    "consecutive_failures": b.consecutive_failures(),
                    "open_until_ms": b.open_for(now).map(|d| d.as_millis() as u64),
                    // Opened on another replica and shared (`share_breakers`): this replica's
                    // own breaker may be closed while it still holds the provider off.
                    "shared_open_for_ms": live.shared_open_for().map(|d| d.as_millis() as u64),
                    "last_transition_reason": b.last_reason(),
                    "settings": {
                        "consecutive_failures": s.breaker.consecutive_failures,
                        "cooldown_ms": s.breaker.cooldown.as_millis() as u64,
                        "probes": s.breaker.probes,
                    },
                })
            };
            json!({
                "name": s.name, "kind": kind,
                "breaker": breaker,
                "paused_for_ms": live.paused_for(now).map(|d| d.as_millis() as u64),
                "in_flight": live.in_flight.load(Ordering::Relaxed),
                "queued": live.queued.load(Ordering::Relaxed),
                "max_concurrency": s.concurrency.as_ref().map(|c| c.max),
                "max_queue": s.concurrency.as_ref().map(|c| c.max_queue),
                "price": s.price.as_ref().map(price_json),
            })
        })
        .collect();
    let cluster = cluster_view(&app, p).await;
    Json(json!({"version": p.version, "routes": routes, "providers": providers, "cluster": cluster})).into_response()
}

/// Which state is shared and where, and how far each tenant's limits are used: cluster-wide
/// from Redis when `[cluster]` is set (`null` where Redis did not answer), else this replica's.
async fn cluster_view(app: &App, p: &crate::policy::Policy) -> serde_json::Value {
    let cluster = app.limits.cluster();
    let share_breakers = cluster.is_some_and(|c| c.settings().share_breakers);
    let mut shared: Vec<&str> = Vec::new();
    let mut per_replica =
        vec!["health_windows", "concurrency_slots", "mirror_and_canary_comparisons", "gateway_served_images"];
    if cluster.is_some() {
        shared.extend([
            "rate_limits",
            "tenant_daily_spend",
            "mirror_daily_spend",
            "idempotency_keys",
            "provider_429_pauses",
        ]);
    } else {
        per_replica.extend([
            "rate_limits",
            "tenant_daily_spend",
            "mirror_daily_spend",
            "idempotency_keys",
            "provider_429_pauses",
        ]);
    }
    if share_breakers {
        shared.push("breakers_opened");
    } else {
        per_replica.push("breakers");
    }
    let mut tenants = serde_json::Map::new();
    for (name, t) in &p.tenants {
        let mut cells = Vec::new();
        for (limit, per_minute) in [("requests", t.requests_per_minute), ("images", t.images_per_minute)] {
            if let Some(per_minute) = per_minute {
                cells.push(crate::cluster::RateCell { scope: "tenant", name, limit, per_minute, cost: 0 });
            }
        }
        let used = match cluster {
            Some(c) if !cells.is_empty() => c.rate_usage(&cells).await.ok(),
            _ => None,
        };
        let mut v = serde_json::Map::new();
        for (i, cell) in cells.iter().enumerate() {
            v.insert(
                format!("{}_per_minute", cell.limit),
                json!({"limit": cell.per_minute, "used_ratio": used.as_ref().and_then(|u| u.get(i))}),
            );
        }
        if let Some(limit) = t.spend_usd_per_day {
            let spent = match cluster {
                Some(c) => c.spent_today(&format!("tenant:{name}")).await.ok(),
                None => Some(app.limits.spent_today(name)),
            };
            // In nano-USD steps, as Redis keeps it: no float noise (15.38999999999978).
            let spent = spent.map(|s| (s * 1e9).round() / 1e9);
            v.insert(
                "spend_usd_per_day".into(),
                json!({"limit": limit, "spent_today_usd": spent, "used_ratio": spent.map(|s| (s / limit).min(1.0))}),
            );
        }
        tenants.insert(name.clone(), serde_json::Value::Object(v));
    }
    json!({
        "mode": cluster.map_or("off", |c| c.status().mode),
        "store": cluster.map(|c| if c.settings().redis_url.starts_with("rediss://") { "redis (TLS)" } else { "redis" }),
        "on_cluster_error": cluster.map(|c| c.status().on_cluster_error),
        "shared": shared,
        "per_replica": per_replica,
        "usage_scope": if cluster.is_some() { "cluster" } else { "replica" },
        "tenants": tenants,
    })
}
