//! Human review over HTTP: the request's hold phase (called by `proxy` when the winning
//! attempt's images must be reviewed), the client's poll `GET /v1/images/reviews/{trace_id}`
//! (proxy listener, client key), and the reviewers' endpoints on the admin listener
//! (`/admin/reviews...`, admin token).
//!
//! Statuses a client sees:
//! - `423 pending_review` (with `x-should-retry: false`): held, not decided yet. 423 is outside
//!   what the official OpenAI SDKs retry (408, 409, 429, 5xx), and they also obey
//!   `x-should-retry: false`; they raise it as `APIStatusError` with `code == "pending_review"`.
//! - `200` with the image answer once approved, in the `response_format` first asked
//!   (`b64_json` byte-identical to the provider's, or a gateway-served URL).
//! - `410 review_rejected` / `review_expired` (with the reason), `410 review_images_deleted`
//!   once an approved answer's images were kept their time.
//! - `404 review_not_found` for an unknown id and for another tenant's (no existence leak).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::answer::{self, DECISION, ROUTE, TRACE_ID};
use crate::app::App;
use crate::error::ApiError;
use crate::policy::{Route, UrlMode};
use crate::providers::{Generation, Image};
use crate::request::is_trace_id;
use crate::request::{GenerationRequest, ResponseFormat};
use crate::review::{now_unix_nano, DecideError, HoldError};
use crate::store::{HeldImage, ReviewFilter, ReviewItem, ReviewState, StoreError, TraceDb};

/// `x-should-retry`: `false` on `pending_review`, so SDKs never retry it (a retry would
/// generate and pay again).
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// The proxy path prefix of the client's poll.
pub const POLL_PATH: &str = "/v1/images/reviews/";

/// The status of `pending_review`: 423 Locked (see the module's notes).
pub const PENDING_STATUS: StatusCode = StatusCode::LOCKED;

/// The client's error when an answer needing review could not be held and the route's
/// `review_overflow` withholds it: 400 `content_policy_violation`. The reason is named only
/// when it is the byte budget; "already held" would tell the client that another request
/// (perhaps another tenant's) carried the same trace id, so it goes to the log only.
pub fn withheld_error(e: &HoldError) -> ApiError {
    let why = match e {
        HoldError::Full { .. } => " (its byte budget is full)",
        _ => "",
    };
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "content_policy_violation",
        format!("the generated image needs human review and the review queue cannot take it{why}: it is withheld"),
    )
}

/// The client's error while its answer waits for a reviewer.
pub fn pending_error(trace_id: &str) -> ApiError {
    ApiError::new(
        PENDING_STATUS,
        "invalid_request_error",
        "pending_review",
        format!(
            "the generated image is held for human review; poll GET {POLL_PATH}{trace_id} with the same key for the outcome (trace id {trace_id})"
        ),
    )
}

/// Who asked and what, for the review item.
pub struct Origin<'a> {
    /// The request's trace id (the review's key).
    pub trace_id: &'a str,
    /// The client key's tenant (`None`: a gateway without keys).
    pub tenant: Option<&'a str>,
    /// `x-acc-cohort`, `x-acc-prompt-template`, `x-acc-asset-type` as sent.
    pub cohort_fields: [Option<&'a str>; 3],
}

/// Holds the winning attempt's answer for review, with the route's settings. Errors: the
/// queue could not take it (the caller applies `review_overflow`; counted here as overflow).
pub async fn hold(
    app: &App,
    route: &Route,
    origin: Origin<'_>,
    req: &GenerationRequest,
    generation: &Generation,
) -> Result<(), HoldError> {
    let result = hold_inner(app, route, origin, req, generation).await;
    if let Err(e) = &result {
        app.reviews.count_overflow(&route.name);
        tracing::warn!(route = %route.name, "answer not held for review: {e}");
    }
    result
}

async fn hold_inner(
    app: &App,
    route: &Route,
    origin: Origin<'_>,
    req: &GenerationRequest,
    generation: &Generation,
) -> Result<(), HoldError> {
    let mut images = Vec::with_capacity(generation.images.len());
    let mut bytes = 0u64;
    for image in &generation.images {
        let (b64, decoded) = match image {
            Image::Base64(b) => {
                let decoded = b.decode_base64().unwrap_or_default();
                (String::from_utf8_lossy(&b.to_bytes()).into_owned(), decoded)
            }
            Image::Raw { bytes, .. } => (base64_simd::STANDARD.encode_to_string(bytes), bytes.to_vec()),
            // Evaluated images are always fetched first: nothing to hold.
            Image::Url(_) => return Err(HoldError::Unavailable),
        };
        bytes += decoded.len() as u64;
        let content_type = crate::providers::sniff_image(&decoded).map_or("application/octet-stream", |k| k.0);
        images.push(HeldImage { content_type: content_type.to_string(), b64 });
    }
    let verdicts: Vec<Value> = generation
        .verdicts
        .iter()
        .zip(&generation.verdict_images)
        .map(|(v, i)| {
            json!({"image": i, "evaluator": v.evaluator, "verdict": v.verdict.label(), "score": v.score, "reason": v.reason})
        })
        .collect();
    let now = now_unix_nano();
    let [cohort, template, asset] = origin.cohort_fields;
    let item = ReviewItem {
        trace_id: origin.trace_id.to_string(),
        route: route.name.clone(),
        tenant: origin.tenant.map(str::to_string),
        cohort: cohort.map(str::to_string),
        prompt_template: template.map(str::to_string),
        asset_type: asset.map(str::to_string),
        end_user: crate::trace::end_user(req),
        response_format: match req.response_format {
            ResponseFormat::B64Json => "b64_json",
            ResponseFormat::Url => "url",
        }
        .to_string(),
        state: ReviewState::Pending,
        held_unix_nano: now,
        expires_unix_nano: now.saturating_add(route.review.ttl.as_nanos() as u64),
        decided_unix_nano: None,
        reviewer: None,
        reason: None,
        image_count: images.len() as u32,
        bytes,
        bytes_held: bytes,
        verdicts: serde_json::Value::Array(verdicts),
        reasons: generation.review.clone(),
        answer: held_answer(generation),
    };
    let budget = app.policy.snapshot().policy.review.clone();
    app.reviews.hold(&item, &images, &budget).await
}

/// What `generation`'s answer says beside its images (see [`ReviewItem::answer`]).
fn held_answer(generation: &Generation) -> Option<Value> {
    if generation.answer_fields.is_empty() && generation.revised_prompts.iter().all(Option::is_none) {
        return None;
    }
    let fields: serde_json::Map<String, Value> =
        generation.answer_fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    Some(json!({"fields": fields, "revised_prompts": generation.revised_prompts}))
}

/// The answer fields and revised prompts [`held_answer`] kept, back into a generation: only the
/// documented answer fields ([`crate::providers::ANSWER_FIELDS`]), whatever the store holds.
fn restore_answer(generation: &mut Generation, answer: Option<&Value>) {
    let Some(answer) = answer else { return };
    if let Some(fields) = answer["fields"].as_object() {
        for k in crate::providers::ANSWER_FIELDS {
            if let Some(v) = fields.get(k) {
                generation.answer_fields.push((k, v.clone()));
            }
        }
    }
    if let Some(prompts) = answer["revised_prompts"].as_array() {
        generation.revised_prompts = prompts.iter().map(|p| p.as_str().map(str::to_string)).collect();
        generation.revised_prompts.truncate(generation.images.len());
    }
}

fn unavailable() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        "store_unavailable",
        "the review store is unavailable now; try again shortly",
    );
    e.retry_after = Some(1);
    e
}

fn store_failed(e: StoreError) -> ApiError {
    tracing::warn!("review store: {e}");
    if e.is_unavailable() {
        unavailable()
    } else {
        ApiError::internal("reading the review store failed")
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("review_not_found", format!("no review with trace id {id}"))
}

fn with_headers(mut r: Response, id: &str, route: &str, decision: &'static str) -> Response {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(TRACE_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(route) {
        h.insert(ROUTE, v);
    }
    h.insert(DECISION, HeaderValue::from_static(decision));
    r
}

/// Adds `x-should-retry: false` to a `pending_review` answer.
pub fn mark_pending(r: &mut Response) {
    r.headers_mut().insert(SHOULD_RETRY, HeaderValue::from_static("false"));
}

/// `GET /v1/images/reviews/{trace_id}` for a caller of `tenant` (`None`: a gateway without
/// keys): the held answer's outcome.
pub async fn poll(app: &App, id: &str, tenant: Option<&str>, headers: &HeaderMap) -> Response {
    // Hex is hex: an id in capitals is the same trace (as on /v1/feedback).
    let id = &id.to_ascii_lowercase();
    if !is_trace_id(id) {
        return ApiError::invalid("trace_id", "invalid_trace_id", "a trace id is 32 hex digits").into_response();
    }
    let Some(db) = app.reviews.db() else { return unavailable().into_response() };
    let item = match db.review(id).await {
        Ok(Some(item)) if item.tenant.as_deref() == tenant => item,
        Ok(_) => return not_found(id).into_response(),
        Err(e) => return store_failed(e).into_response(),
    };
    let gone = |code: &'static str, what: String| {
        let r = ApiError::new(StatusCode::GONE, "invalid_request_error", code, what).into_response();
        with_headers(r, id, &item.route, item.state.name())
    };
    let reason = item.reason.as_deref().unwrap_or("no reason given");
    match item.state {
        ReviewState::Pending => {
            let mut r = with_headers(pending_error(id).into_response(), id, &item.route, "review");
            mark_pending(&mut r);
            r
        }
        ReviewState::Rejected => gone("review_rejected", format!("a reviewer rejected the image: {reason}")),
        ReviewState::Expired => gone("review_expired", format!("the review expired before a decision: {reason}")),
        ReviewState::Approved => {
            let images = match db.review_images(id).await {
                Ok(images) => images,
                Err(e) => return store_failed(e).into_response(),
            };
            if images.is_empty() {
                return gone(
                    "review_images_deleted",
                    "the image was approved, and its copy kept for the route's review_ttl_secs after the decision is deleted".into(),
                );
            }
            let format = if item.response_format == "url" { ResponseFormat::Url } else { ResponseFormat::B64Json };
            let mut generation = Generation {
                images: images.into_iter().map(|i| Image::Base64(Bytes::from(i.b64).into())).collect(),
                ..Generation::default()
            };
            restore_answer(&mut generation, item.answer.as_ref());
            let snap = app.policy.snapshot();
            let body = if format == ResponseFormat::Url {
                let base = match answer::url_base(&snap.policy, headers) {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                // The URLs of an earlier poll while they are served: storing the images again
                // on every poll would push other answers' images out of the artifact store.
                let earlier = app.reviews.served_files(id).filter(|files| {
                    files.len() == generation.images.len()
                        && files.iter().all(|f| app.artifacts.alive(crate::artifacts::id_of(f)))
                });
                match earlier {
                    Some(files) => {
                        generation.images =
                            files.iter().map(|f| Image::Url(format!("{base}{}{f}", crate::artifacts::PATH))).collect();
                        answer::render(app, &snap.policy, UrlMode::Provider, format, generation, headers, None)
                    }
                    None => {
                        let mut sent = Vec::new();
                        let body = answer::render(
                            app,
                            &snap.policy,
                            UrlMode::Gateway,
                            format,
                            generation,
                            headers,
                            Some(&mut sent),
                        );
                        let files = sent
                            .iter()
                            .filter_map(|s| s.url.as_deref()?.rsplit('/').next().map(str::to_string))
                            .collect();
                        app.reviews.remember_served(id, files);
                        body
                    }
                }
            } else {
                answer::render(app, &snap.policy, UrlMode::Gateway, format, generation, headers, None)
            };
            let mut r = Response::new(axum::body::Body::new(body));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            with_headers(r, id, &item.route, "approved")
        }
    }
}

/// The reviewers' endpoints, for the admin listener's token-protected router.
pub fn admin_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/admin/reviews", get(list))
        .route("/admin/reviews/{id}/images/{index}", get(image))
        .route("/admin/reviews/{id}/approve", post(approve))
        .route("/admin/reviews/{id}/reject", post(reject))
}

fn admin_db(app: &App) -> Result<TraceDb, Response> {
    if !app.reviews.enabled() {
        return Err(ApiError::not_found(
            "reviews_disabled",
            "reviews are kept in the trace store: [store] enabled = false",
        )
        .into_response());
    }
    app.reviews.db().ok_or_else(|| unavailable().into_response())
}

/// An item as reviewers see it: the stored fields plus its age in seconds.
pub fn item_json(item: &ReviewItem, now_unix_nano: u64) -> serde_json::Value {
    let mut v = serde_json::to_value(item).unwrap_or_default();
    v["age_seconds"] = json!(now_unix_nano.saturating_sub(item.held_unix_nano) as f64 / 1e9);
    v
}

/// `GET /admin/reviews?state=pending|approved|rejected|expired&route=&limit=&after=`: oldest
/// first, `{"object": "list", "data": [item...], "next_after": string|null}`; pass
/// `next_after` back as `after` for the next page. `state` defaults to pending; `limit` to 50
/// (at most 500).
async fn list(State(app): State<Arc<App>>, uri: http::Uri) -> Response {
    let mut filter = ReviewFilter { state: Some(ReviewState::Pending), limit: 50, ..ReviewFilter::default() };
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        // `param` names the query parameter at fault, as on /admin/traces.
        let param = match k.as_ref() {
            "state" => "state",
            "route" => "route",
            "limit" => "limit",
            "after" => "after",
            _ => "query",
        };
        let bad = |what: String| ApiError::invalid(param, "invalid_filter", what).into_response();
        if seen.iter().any(|s| *s == k) {
            return bad(format!("query parameter \"{k}\" is given twice"));
        }
        seen.push(k.to_string());
        match k.as_ref() {
            "state" if v == "all" => filter.state = None,
            "state" => match ReviewState::parse(&v) {
                Some(s) => filter.state = Some(s),
                None => return bad(format!("state: \"{v}\" is not pending, approved, rejected, expired or all")),
            },
            "route" => filter.route = Some(v.into_owned()),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=500).contains(&n) => filter.limit = n,
                _ => return bad(format!("limit: \"{v}\" is not a number from 1 to 500")),
            },
            "after" => {
                let parsed =
                    v.split_once(':').and_then(|(t, id)| Some((t.parse::<u64>().ok()?, id.to_ascii_lowercase())));
                match parsed {
                    Some(p) if is_trace_id(&p.1) => filter.after = Some(p),
                    _ => return bad("after: pass back the next_after of the previous page".into()),
                }
            }
            other => return bad(format!("unknown parameter \"{other}\" (state, route, limit, after)")),
        }
    }
    let db = match admin_db(&app) {
        Ok(db) => db,
        Err(r) => return r,
    };
    let items = match db.list_reviews(&filter).await {
        Ok(items) => items,
        Err(e) => return store_failed(e).into_response(),
    };
    let now = now_unix_nano();
    let next = (items.len() == filter.limit)
        .then(|| items.last().map(|i| format!("{}:{}", i.held_unix_nano, i.trace_id)))
        .flatten();
    let data: Vec<_> = items.iter().map(|i| item_json(i, now)).collect();
    Json(json!({"object": "list", "data": data, "next_after": next})).into_response()
}

/// `GET /admin/reviews/{id}/images/{index}`: the held image's bytes with its content type.
async fn image(State(app): State<Arc<App>>, Path((id, index)): Path<(String, String)>) -> Response {
    let Ok(index) = index.parse::<u32>() else {
        return ApiError::invalid("index", "invalid_index", "the image index is a number from 0").into_response();
    };
    let id = id.to_ascii_lowercase();
    if !is_trace_id(&id) {
        return ApiError::invalid("trace_id", "invalid_trace_id", "a trace id is 32 hex digits").into_response();
    }
    let db = match admin_db(&app) {
        Ok(db) => db,
        Err(r) => return r,
    };
    match db.review_image(&id, index).await {
        Ok(Some(img)) => {
            let bytes = base64_simd::STANDARD.decode_to_vec(img.b64.as_bytes()).unwrap_or_default();
            let ct = HeaderValue::from_str(&img.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            ([(header::CONTENT_TYPE, ct)], bytes).into_response()
        }
        Ok(None) => ApiError::not_found(
            "review_image_not_found",
            format!("no held image {index} of review {id} (unknown, or deleted after the decision)"),
        )
        .into_response(),
        Err(e) => store_failed(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    reviewer: Option<String>,
    reason: Option<String>,
}

async fn approve(State(app): State<Arc<App>>, Path(id): Path<String>, body: Bytes) -> Response {
    decide(&app, &id, ReviewState::Approved, &body).await
}

async fn reject(State(app): State<Arc<App>>, Path(id): Path<String>, body: Bytes) -> Response {
    decide(&app, &id, ReviewState::Rejected, &body).await
}

/// `POST /admin/reviews/{id}/approve|reject` with `{"reviewer": "...", "reason": "..."}`
/// (`reviewer` required, 1 to 200 characters; `reason` up to 2000): the decided item; 409
/// `review_already_decided` when it is not pending any more.
async fn decide(app: &App, id: &str, state: ReviewState, body: &[u8]) -> Response {
    let id = &id.to_ascii_lowercase();
    if !is_trace_id(id) {
        return ApiError::invalid("trace_id", "invalid_trace_id", "a trace id is 32 hex digits").into_response();
    }
    // A JSON object first: serde's own error for `[]` names the Rust type it wanted.
    let parsed = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => serde_json::from_value::<DecisionBody>(v).map_err(|e| e.to_string()),
        Ok(_) => Err("the body is not a JSON object".to_string()),
        Err(e) => Err(crate::error::json_error_text(&e)),
    };
    let parsed = match parsed {
        Ok(b) => b,
        Err(why) => {
            return ApiError::invalid("body", "invalid_json", format!("expected {{\"reviewer\", \"reason\"}}: {why}"))
                .into_response()
        }
    };
    let reviewer = parsed.reviewer.as_deref().map(str::trim).unwrap_or("");
    if reviewer.is_empty() || reviewer.chars().count() > 200 || reviewer.chars().any(char::is_control) {
        return ApiError::invalid(
            "reviewer",
            "invalid_reviewer",
            "reviewer is required: who decides (1 to 200 characters, no control characters)",
        )
        .into_response();
    }
    let reason = parsed.reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
    if reason.is_some_and(|r| r.chars().count() > 2000) {
        return ApiError::invalid("reason", "invalid_reason", "reason is at most 2000 characters").into_response();
    }
    if reason.is_some_and(|r| r.chars().any(crate::is_stray_control)) {
        return ApiError::invalid(
            "reason",
            "invalid_reason",
            "reason holds a control character (line breaks and tabs are fine)",
        )
        .into_response();
    }
    if let Err(r) = admin_db(app) {
        return r;
    }
    let snap = app.policy.snapshot();
    match app.reviews.decide(&snap.policy, id, state, reviewer, reason).await {
        Ok(item) => Json(item_json(&item, now_unix_nano())).into_response(),
        Err(DecideError::NotFound) => not_found(id).into_response(),
        Err(DecideError::Decided(s)) => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "review_already_decided",
            format!("review {id} is already {}", s.name()),
        )
        .into_response(),
        Err(DecideError::Unavailable) => unavailable().into_response(),
        Err(DecideError::Store(e)) => store_failed(e).into_response(),
    }
}

/// The review of `trace_id` for `GET /admin/traces/{id}`: `{"state", "held_at_unix_nano",
/// "decided_at_unix_nano", "reviewer", "reason", "route", "reasons"}`, or `None` when it was
/// never held (or the store cannot say).
pub async fn trace_review(app: &App, trace_id: &str) -> Option<serde_json::Value> {
    let item = app.reviews.db()?.review(trace_id).await.ok()??;
    Some(json!({
        "state": item.state,
        "route": item.route,
        "held_unix_nano": item.held_unix_nano,
        "decided_unix_nano": item.decided_unix_nano,
        "reviewer": item.reviewer,
        "reason": item.reason,
        "reasons": item.reasons,
        "image_count": item.image_count,
    }))
}
