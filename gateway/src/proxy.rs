//! The proxy listener's endpoints: `POST /v1/images/{generations,edits,variations}`,
//! `GET /v1/models`, `POST /v1/feedback` and the gateway-served image URLs.
//!
//! An image request's pipeline reads top to bottom in `generate`, each phase a call into a
//! module below that does not call back:
//! 1. who is asking (client key, by SHA-256 digest);
//! 2. what they ask for (`request`: JSON or multipart, the prompt contract);
//! 3. where it goes (`routing` picks the route and plan, `live` puts demoted targets last,
//!    `migration` draws the canary);
//! 4. within its limits (`limits`: rate per key and tenant, and the first attempt's cost held
//!    on the tenant's daily spend; with `[cluster]` one Redis round trip for all of them);
//! 5. whether it regenerates an earlier request (`feedback`);
//! 6. mirrors started (`migration`);
//! 7. attempts in plan order (`routing::run_plan` over `attempt`), then the primary's outcome
//!    handed to mirrors and the canary guard;
//! 8. what it cost (`cost`);
//! 9. the answer (`answer`).
//!
//! `finish` then writes the `x-acc-*` headers and the request metrics whatever the outcome.
//! A request with an `Idempotency-Key` goes through `idempotent` first.

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use crate::answer::{
    self, header_text, ATTEMPTS, CANARY, CONTRACT_CHECKED, COST, DECISION, DROPPED, EVAL, GENERATION, PROVIDER,
    REASONS, REQUEST_ID, ROUTE, TRACE_ID,
};
use crate::app::App;
use crate::attempt::{attempt, attempt_timeout, AttemptEnv, MadeSink, NoteSink, VerdictSink};
use crate::body::ChunkedBody;
use crate::cost;
use crate::error::ApiError;
use crate::idempotency;
use crate::migration::Migration;
use crate::policy::{AnswerFormat, ApiKey, Policy, ReviewOverflow, UrlMode};
use crate::providers::events::LiveTap;
use crate::providers::ProviderError;
use crate::reload::Snapshot;
use crate::request::{GenerationRequest, Operation, ResponseFormat};
use crate::review_api;
use crate::routing::{self, PlanOutcome, RouteQuery, Step};
use crate::store::record::TraceRecord;
use crate::store::TraceWriter;
use crate::trace;

pub const COHORT: &str = "x-acc-cohort";
pub const CONTRACT: &str = "x-acc-contract";
/// `x-acc-regenerate-of`: the trace id of the request this one regenerates.
pub const REGENERATE_OF: &str = "x-acc-regenerate-of";
/// Where apps send ratings of traces.
pub const FEEDBACK_PATH: &str = "/v1/feedback";

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
    /// `x-acc-contract-checked`: whether the request's contract is evaluated (`None`: no
    /// contract).
    contract_checked: Option<bool>,
    /// `x-acc-dropped-params`: parameters the winning provider could not honour.
    dropped: Vec<&'static str>,
    /// When the request arrived, wall clock (for the trace record).
    wall_start: SystemTime,
    /// The span id of the client's `traceparent`, when it sent one.
    parent_span_id: Option<String>,
    /// The client's W3C `tracestate`, kept when its `traceparent` was valid (passed on to
    /// providers with each attempt's `traceparent`).
    tracestate: Option<HeaderValue>,
    /// The trace record, from the moment the request reaches routing (when records are kept).
    record: Option<Box<TraceRecord>>,
    /// Once routed: the `x-acc-cohort`, `x-acc-prompt-template` and `x-acc-asset-type` values
    /// sent (labelled in `finish`, bounded by the policy's `[cohorts]`).
    cohort_fields: Option<[Option<String>; 3]>,
    /// Where the record goes, once there is one (also when the request is dropped unfinished).
    writer: Option<TraceWriter>,
    /// The answer is an event stream (`stream: true`), not JSON.
    event_stream: bool,
    /// Where a stream's partial images go while attempts run (requests without an
    /// `Idempotency-Key`; see [`crate::stream::LiveBody`]).
    live: Option<Arc<LiveTap>>,
    /// The attempts' notes while they run, for the record of a request dropped unfinished.
    notes: Option<Arc<NoteSink>>,
}

impl Drop for RequestCtx {
    /// A request dropped before `finish` (the client went away): its record, when it has one,
    /// is still written, as `client_cancelled` (status 499, nginx's code for it), so every
    /// routed request is recorded or counted as dropped.
    fn drop(&mut self) {
        if let (Some(mut rec), Some(writer)) = (self.record.take(), self.writer.take()) {
            // The attempts' futures are dropped before the request's context (they live in the
            // pipeline's future, which this outlives): their notes are all in.
            if let (Some(notes), Some(watch)) = (self.notes.take(), &self.watch) {
                let notes = std::mem::take(&mut *crate::lock(&notes));
                trace::unfinished_attempts(&mut rec, &watch.snap.policy, notes, self.started, self.canary);
            }
            let elapsed = trace::ms(self.started.elapsed());
            trace::finish(&mut rec, 499, "error", "client_cancelled", Some("client_cancelled"), elapsed, self.cost);
            writer.submit(*rec);
        }
    }
}

/// Holds a request's spend reservation while its plan runs. Dropped with the request's future
/// when the client goes away mid-plan, it charges the images the attempts' providers had made
/// by then ([`MadeSink`]: answered, and being fetched or evaluated), as discarded, to
/// `acc_cost_usd_total` and the tenant's spend: the providers bill them whether or not the
/// client waits. An attempt still waiting for its answer is not charged (unknown). Disarmed
/// once the plan's outcome is charged as usual.
struct ChargeOnCancel<'a> {
    app: &'a App,
    policy: &'a crate::policy::Policy,
    route: &'a str,
    req: &'a GenerationRequest,
    made: MadeSink,
    reservation: Option<crate::limits::Reservation>,
}

impl ChargeOnCancel<'_> {
    /// The plan ended: what each attempt's provider made, and the reservation to settle.
    fn disarm(mut self) -> (Vec<(Step, u32)>, Option<crate::limits::Reservation>) {
        (std::mem::take(&mut *crate::lock(&self.made)), self.reservation.take())
    }
}

impl Drop for ChargeOnCancel<'_> {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else { return };
        let mut total = 0.0;
        for (step, n) in std::mem::take(&mut *crate::lock(&self.made)) {
            if let Some(usd) = cost::cost_of(self.policy, step, self.req, n, None) {
                let provider = &self.policy.routes[step.route].targets[step.target].provider;
                self.app.metrics.cost.with_label_values(&[self.route, provider, "discarded"]).inc_by(usd);
                total += usd;
            }
        }
        reservation.settle(total);
    }
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
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const IMAGES: &str = "/v1/images/";
    if let Some(refused) = host_refusal(req.version(), req.headers()) {
        return refused;
    }
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
    // Paths other than the image operations are boxed: an `async fn`'s future is as large as
    // its largest branch, and every move of it is a memcpy of that size (callgrind: 8k
    // instructions per image request before these and `idempotent` were boxed).
    if path == FEEDBACK_PATH {
        return match *req.method() {
            Method::POST => Box::pin(feedback(app, req)).await,
            _ => method_not_allowed("POST"),
        };
    }
    if let Some(id) = path.strip_prefix(review_api::POLL_PATH) {
        return match *req.method() {
            Method::GET => Box::pin(poll_review(&app, id, req.headers())).await,
            _ => method_not_allowed("GET"),
        };
    }
    if let Some(file) = path.strip_prefix(crate::artifacts::PATH) {
        return match *req.method() {
            Method::GET | Method::HEAD => Box::pin(serve_artifact(&app, file)).await,
            _ => method_not_allowed("GET"),
        };
    }
    not_found()
}

/// The `response_format` of a request that sent none: the route's `default_response_format`,
/// else OpenAI's own default for the model the client names: the GPT image models
/// (`gpt-image-1`, `gpt-image-1-mini`, ...) always answer `b64_json` and take no
/// `response_format`; DALL·E and everything else default to `url` (OpenAI Images API
/// reference, `response_format`).
fn default_format(route: Option<AnswerFormat>, model: Option<&str>) -> ResponseFormat {
    match route {
        Some(AnswerFormat::B64Json) => ResponseFormat::B64Json,
        Some(AnswerFormat::Url) => ResponseFormat::Url,
        None if model.and_then(|m| m.get(..9)).is_some_and(|p| p.eq_ignore_ascii_case("gpt-image")) => {
            ResponseFormat::B64Json
        }
        None => ResponseFormat::Url,
    }
}

/// RFC 9112 section 3.2: a 400 for an HTTP/1.1 request without a Host header, and for any
/// HTTP/1.x request with more than one or with one that is not `host[:port]` (RFC 9110 section
/// 7.2; no user info, a port of at most 65535); `None` for a request that passes, and for
/// HTTP/2, which names the host in `:authority`. Codes `missing_host`, `invalid_host`; the
/// answer closes the connection. Used by both listeners.
pub fn host_refusal(version: http::Version, headers: &HeaderMap) -> Option<Response> {
    if version > http::Version::HTTP_11 {
        return None;
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let (code, message) = match (hosts.next(), hosts.next()) {
        (Some(h), None) if valid_host(h.as_bytes()) => return None,
        (None, _) if version < http::Version::HTTP_11 => return None,
        (Some(_), None) => {
            ("invalid_host", "the Host header is not a host with an optional port (RFC 9110, section 7.2)")
        }
        (None, _) => {
            ("missing_host", "an HTTP/1.1 request must name its host in one Host header (RFC 9112, section 3.2)")
        }
        (Some(_), Some(_)) => ("invalid_host", "the request has more than one Host header (RFC 9112, section 3.2)"),
    };
    let mut r = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message).into_response();
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(r)
}

/// `uri-host [ ":" port ]` (RFC 9110 section 7.2): what `http`'s authority parser takes, less
/// user info, with a port (when one is written) of at most 65535.
fn valid_host(v: &[u8]) -> bool {
    let Ok(a) = http::uri::Authority::try_from(v) else { return false };
    let port = &a.as_str()[a.host().len()..];
    !a.as_str().contains('@')
        && (port.is_empty()
            || port == ":"
            || (port.len() <= 6 && port[1..].bytes().all(|b| b.is_ascii_digit()) && port[1..].parse::<u16>().is_ok()))
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

/// An image request. A stream's partial images may start the answer before the attempts end
/// ([`live_answer`]): the request's work then goes on inside the answer's body.
async fn images<B>(app: Arc<App>, req: Request<B>, op: Operation) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tap = Arc::new(LiveTap::default());
    let mut work = Box::pin(answer_images(app, req, op, tap.clone()));
    let early = std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
        std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        std::task::Poll::Pending if tap.ready(cx.waker()) => std::task::Poll::Ready(None),
        std::task::Poll::Pending => std::task::Poll::Pending,
    })
    .await;
    match early {
        // Partials relayed during the poll that finished the work: they go out before the
        // answer's own events, under its headers (a failed answer goes out alone).
        Some(r) if r.status().is_success() && tap.started() => {
            let (parts, body) = r.into_parts();
            let rest: crate::stream::Work = Box::pin(std::future::ready(Response::new(body)));
            Response::from_parts(parts, Body::new(crate::stream::LiveBody::new(tap, rest)))
        }
        Some(r) => r,
        None => live_answer(tap, work),
    }
}

/// The answer to an image request, complete; `tap` gets a stream's partial images meanwhile.
async fn answer_images<B>(app: Arc<App>, req: Request<B>, op: Operation, tap: Arc<LiveTap>) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let snapshot = app.policy.snapshot();
    // A client's W3C traceparent is continued: its trace id is the request's.
    let (traceparent_id, parent_span_id) = match crate::telemetry::parse_traceparent(&headers) {
        Some((t, s)) => (Some(t), Some(s)),
        None => (None, None),
    };
    // Without a valid traceparent the tracestate is ignored (W3C Trace Context, 3.3).
    let tracestate = traceparent_id.as_ref().and_then(|_| crate::telemetry::tracestate(&headers));
    let wall_start = SystemTime::now();
    let mut ctx = RequestCtx {
        // Trace ids must be unique, not secret: a thread-local PRNG (seeded from the OS) avoids
        // a getrandom syscall per request; made ones are time-ordered (`trace::new_trace_id`).
        trace_id: traceparent_id
            .or_else(|| client_trace_id(&headers))
            .unwrap_or_else(|| crate::trace::new_trace_id(wall_start)),
        wall_start,
        parent_span_id,
        tracestate,
        record: None,
        cohort_fields: None,
        writer: None,
        started: Instant::now(),
        route: None,
        provider: None,
        attempts: Vec::new(),
        eval_summary: None,
        flags: Vec::new(),
        cost: None,
        contract_checked: None,
        canary: false,
        generation: None,
        dropped: Vec::new(),
        event_stream: false,
        live: None,
        notes: None,
        watch: Some(CancelWatch { snap: snapshot.clone(), metrics: app.metrics.clone(), route: None, armed: true }),
    };
    // The body first, within its time and the memory all bodies share: a slow sender holds no
    // in-flight slot while it sends.
    let server = &snapshot.policy.server;
    let limit = match op {
        Operation::Generate => server.max_json_body_bytes,
        Operation::Edit | Operation::Variation => server.max_multipart_body_bytes,
    };
    let (body, _hold) = match receive_body(&app, server, &headers, body, limit).await {
        Ok(received) => received,
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => return shed(&app, ctx, e),
        Err(e) => return closing(finish(&app, &snapshot, ctx, Err(e))),
    };
    let max = server.max_in_flight;
    let Some(_in_flight) = app.admit(max) else {
        return shed(
            &app,
            ctx,
            ApiError::overloaded(format!("the gateway is at its limit of {max} requests in flight")),
        );
    };
    match idempotency_key(&headers) {
        Ok(None) => {
            ctx.live = Some(tap);
            let result = generate(&app, &snapshot, &mut ctx, &headers, body, op).await;
            finish(&app, &snapshot, ctx, result)
        }
        // Boxed: its future is larger than the plain path's, which would otherwise carry its size.
        Ok(Some(key)) => Box::pin(idempotent(&app, &snapshot, ctx, &headers, body, op, key)).await,
        Err(e) => finish(&app, &snapshot, ctx, Err(e)),
    }
}

/// A request shed before it was handled (503, `Retry-After`): counted as `overloaded`.
fn shed(app: &App, mut ctx: RequestCtx, e: ApiError) -> Response {
    ctx.disarm();
    app.metrics.requests.with_label_values(&["none", "overloaded"]).inc();
    let mut r = e.into_response();
    if let Ok(v) = HeaderValue::from_str(&ctx.trace_id) {
        r.headers_mut().insert(REQUEST_ID, v.clone());
        r.headers_mut().insert(TRACE_ID, v);
    }
    r
}

/// An answer after which the connection is closed (the rest of the body was not read).
fn closing(mut r: Response) -> Response {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Reads a request body within `server.body_timeout_ms` (408 `request_timeout` beyond): at
/// most `limit` bytes (413 beyond, told at once by a larger `content-length`), each chunk taken
/// from the memory all bodies share (`max_body_buffer_mib`; 503 beyond). The body comes with
/// its share of that memory, given back when the hold is dropped.
///
/// A body refused before its end is read on and discarded for a while ([`linger`]), so that a
/// client still sending it reads the error instead of a connection reset.
async fn receive_body<'a, B>(
    app: &'a App,
    server: &crate::policy::ServerSettings,
    headers: &HeaderMap,
    mut body: B,
    limit: usize,
) -> Result<(Bytes, crate::intake::BodyHold<'a>), ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut hold = app.bodies.hold();
    let read = read_chunks(headers, &mut body, limit, &mut hold, server.max_body_buffer_bytes);
    let refused = match tokio::time::timeout(server.body_timeout, read).await {
        Ok(Ok(bytes)) => return Ok((bytes, hold)),
        Ok(Err(e)) => e,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms of its headers (server.body_timeout_ms)",
                server.body_timeout.as_millis()
            ),
        ),
    };
    drop(hold);
    if refused.code != Some("invalid_body") && !body.is_end_stream() {
        linger(body);
    }
    Err(refused)
}

/// How long a refused body is read on and discarded after the answer ([`linger`]).
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(3);

/// The most bytes of a refused body read and discarded after the answer ([`linger`]).
pub const LINGER_MAX_BYTES: usize = 64 << 20;

/// Reads the rest of a refused body and drops it, for at most [`LINGER`] and
/// [`LINGER_MAX_BYTES`], then lets the connection close. A server that closes a connection with
/// unread bytes in its receive buffer makes the kernel send a reset, and a client still writing
/// its body (every SDK writes the whole body before reading) then sees the reset, not the 408,
/// 413 or 503 it was sent; nginx's `lingering_close` does the same for the same reason. Nothing
/// is kept: each chunk is dropped as it comes, and the connection holds no in-flight slot.
fn linger<B>(body: B)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let mut body = body;
        let drain = async {
            let mut read = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > LINGER_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    });
}

/// [`receive_body`]'s reading, without its deadline.
async fn read_chunks<B>(
    headers: &HeaderMap,
    body: &mut B,
    limit: usize,
    hold: &mut crate::intake::BodyHold<'_>,
    shared_max: usize,
) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
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
    let busy = || {
        ApiError::overloaded(format!(
            "the gateway is receiving as many request bodies as its memory for them allows ({shared_max} bytes)"
        ))
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            ApiError::invalid("body", "invalid_body", format!("could not read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else { continue };
        len += data.len();
        if len > limit {
            return Err(too_large());
        }
        if !hold.grow(data.len(), shared_max) {
            return Err(busy());
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(len);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    })
}

/// The answer to a stream whose first partial image arrived before its attempts ended: `200`,
/// `text/event-stream`, the trace id and route, then the partials as they come and the
/// request's own outcome as events ([`crate::stream::LiveBody`]). Headers that describe the
/// outcome (`x-acc-decision`, `x-acc-eval`, `x-acc-generation`, cost) cannot be sent this early.
fn live_answer(tap: Arc<LiveTap>, work: crate::stream::Work) -> Response {
    let (trace_id, route) = tap.origin();
    let mut r = Response::new(Body::new(crate::stream::LiveBody::new(tap, work)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::stream::CONTENT_TYPE));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(v) = trace_id.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(REQUEST_ID, v.clone());
        h.insert(TRACE_ID, v);
    }
    if let Some(v) = route.and_then(|r| HeaderValue::from_str(&r).ok()) {
        h.insert(ROUTE, v);
    }
    r
}

/// A trace id the client chose (`x-acc-trace-id`, 32 lowercase hex digits), so reruns of a request
/// keep it (and its mirror and canary sampling); anything else is ignored.
fn client_trace_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(TRACE_ID)?.to_str().ok()?;
    (v.len() == 32 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then(|| v.to_string())
}

/// A hash of an edit's or variation's input files (images, mask, in order; 0 for a
/// generation), so implicit regeneration detection compares only requests made from the same
/// images: "remove the background" sent for every product photo is no regeneration.
///
/// Hashing megabytes of input takes milliseconds: more than [`INLINE_DIGEST_BYTES`] is hashed
/// on a blocking thread, not on the request's worker.
async fn input_digest(req: &GenerationRequest) -> u64 {
    if req.images.is_empty() {
        return 0;
    }
    let parts: Vec<(String, Bytes)> =
        req.images.iter().chain(req.mask.iter()).map(|p| (p.field.clone(), p.bytes.clone())).collect();
    let digest = move || {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (field, bytes) in &parts {
            field.hash(&mut h);
            bytes.hash(&mut h);
        }
        h.finish() | 1
    };
    if req.images.iter().chain(req.mask.iter()).map(|p| p.bytes.len()).sum::<usize>() <= INLINE_DIGEST_BYTES {
        return digest();
    }
    // A failed task (it cannot panic) would only make this edit comparable with none.
    tokio::task::spawn_blocking(digest).await.unwrap_or(1)
}

/// The most input bytes [`input_digest`] hashes on the request's own worker (about 50 µs).
const INLINE_DIGEST_BYTES: usize = 64 << 10;

/// The `Idempotency-Key` header, checked.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut all = headers.get_all(idempotency::HEADER).iter();
    let Some(v) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        // Which one a retry would be matched by is anyone's guess: refused, as two
        // `Authorization` headers are.
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "invalid_idempotency_key",
            "send one Idempotency-Key header, not several",
        ));
    }
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
/// another body is a 409. Only answers that cost a generation are kept (success, blocked,
/// held for review).
async fn idempotent(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
    mut ctx: RequestCtx,
    headers: &HeaderMap,
    bytes: Bytes,
    op: Operation,
    key: String,
) -> Response {
    let policy = &snap.policy;
    let scope = match authenticate(policy, headers) {
        Ok(k) => k.map_or("anonymous", |k| k.tenant.as_str()),
        Err(e) => return finish(app, snap, ctx, Err(e)),
    };
    let fingerprint = match headers.get(header::CONTENT_TYPE).filter(|_| op != Operation::Generate) {
        Some(ct) => idempotency::fingerprint_multipart(op.path(), ct.as_bytes(), &bytes).await,
        None => idempotency::fingerprint(op.path(), None, &bytes),
    };
    let m = &app.metrics.idempotency;
    // Shared by every replica when `[cluster]` is set; this replica's store otherwise, or while
    // Redis cannot answer (under on_cluster_error = "local").
    let shared = match app.limits.cluster() {
        Some(c) => match c.idem_begin(scope, &key, fingerprint).await {
            Ok(b) => Some(b),
            Err(u) => match c.fallback(u) {
                Ok(()) => None,
                Err(e) => return finish(app, snap, ctx, Err(e)),
            },
        },
        None => None,
    };
    let begin = match shared {
        Some(crate::cluster::IdemBegin::Leader(lease)) => Begun::Leader(Lead::Shared(lease)),
        Some(crate::cluster::IdemBegin::Replay { stored, waited }) => Begun::Replay { stored, waited },
        Some(crate::cluster::IdemBegin::Conflict) => Begun::Conflict,
        None => match app.idempotency.begin(scope, &key, fingerprint).await {
            idempotency::Begin::Leader(lease) => Begun::Leader(Lead::Local(lease)),
            idempotency::Begin::Replay { stored, waited } => Begun::Replay { stored, waited },
            idempotency::Begin::Conflict => Begun::Conflict,
        },
    };
    match begin {
        Begun::Conflict => {
            m.with_label_values(&["conflict"]).inc();
            let e = ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            );
            finish(app, snap, ctx, Err(e))
        }
        Begun::Replay { stored, waited } => {
            m.with_label_values(&[if waited { "waited" } else { "replayed" }]).inc();
            ctx.disarm();
            stored.replay()
        }
        Begun::Leader(lease) => {
            m.with_label_values(&["new"]).inc();
            let result = generate(app, snap, &mut ctx, headers, bytes, op).await;
            let resp = finish(app, snap, ctx, result);
            let (parts, body) = resp.into_parts();
            // The body is already in memory (JSON framing around the images' bytes).
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            // A held answer cost a generation too: a retry gets the same pending_review (and
            // trace id to poll) rather than a second generation.
            let blocked = parts.headers.get(DECISION).is_some_and(|d| d == "blocked" || d == "review");
            let keep = parts.status.is_success() || blocked;
            let stored = idempotency::Stored {
                status: parts.status,
                headers: parts.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                body: body.clone(),
            };
            match lease {
                Lead::Local(lease) => lease.complete(keep.then_some(stored)),
                Lead::Shared(lease) => {
                    let s = &policy.server;
                    lease.complete(keep.then_some(&stored), s.idempotency_ttl, s.idempotency_max_bytes).await;
                }
            }
            Response::from_parts(parts, Body::from(body))
        }
    }
}

/// An `Idempotency-Key` decision, from the shared store or this replica's.
enum Begun {
    Leader(Lead),
    Replay { stored: Arc<idempotency::Stored>, waited: bool },
    Conflict,
}

/// The leader's lease, on the store that gave it.
enum Lead {
    Local(idempotency::Lease),
    Shared(crate::cluster::SharedLease),
}

async fn generate(
    app: &Arc<App>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
    body: Bytes,
    op: Operation,
) -> Result<ChunkedBody, ApiError> {
    let policy = &snap.policy;
    // 1. Who is asking.
    let key = authenticate(policy, headers)?;
    // 2. What they ask for.
    let req = match op {
        Operation::Generate => GenerationRequest::from_json(&body)?,
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
            GenerationRequest::from_multipart(op, body, &boundary).await?
        }
    };
    let mut req = req;
    if let Some(h) = headers.get(CONTRACT) {
        let c = crate::request::contract::Contract::parse(h.as_bytes())
            .map_err(|e| ApiError::invalid("x-acc-contract", "invalid_contract", e))?;
        req.contract = Some(Arc::new(c));
    }
    if let Some(h) = headers.get(REGENERATE_OF) {
        let id = h.to_str().ok().map(str::trim).filter(|v| crate::request::is_trace_id(v)).ok_or_else(|| {
            ApiError::invalid(
                "x-acc-regenerate-of",
                "invalid_value",
                "x-acc-regenerate-of must be a trace id: 32 hex digits (the x-acc-trace-id of the request regenerated)",
            )
        })?;
        req.regenerate_of = Some(id.to_ascii_lowercase());
    }
    // 3. Where it goes: the route, its plan with demoted targets last, the canary's share.
    let cohort_fields = trace::cohort_fields(headers);
    let cohort = cohort_fields[0].as_deref();
    let key_tags: &[String] = key.map_or(&[], |k| &k.tags);
    let query = RouteQuery { model: req.model.as_deref(), cohort, key_tags };
    let (route_idx, route) = routing::select_route(policy, &query)?;
    ctx.route = Some(route_idx);
    // A client that leaves from here on (while its limits are checked, say) is counted under
    // its route.
    if let Some(w) = &mut ctx.watch {
        w.route = Some(route_idx);
    }
    let alias = req.model.as_deref().or(policy.default_model.as_deref()).unwrap_or_default();
    let mut steps = routing::plan(policy, route_idx, fastrand::f64());
    let now = tokio::time::Instant::now();
    crate::live::healthy_first(policy, &snap.live, &mut steps, now, &app.metrics);
    let mut migration = Migration::canary(snap, route_idx, &ctx.trace_id, &mut steps);
    ctx.canary = migration.served_by_canary();
    // 4. Within its limits: the key's and tenant's rate limits, and the first attempt's cost
    // held on the tenant's daily spend (with `[cluster]`, one round trip to Redis for all).
    // A refused request leaves no trace record.
    let tenant_limits = key.and_then(|k| policy.tenants.get(&k.tenant));
    let estimate = steps.first().and_then(|&s| cost::cost_of(policy, s, &req, req.n, None)).unwrap_or(0.0);
    let reservation = match key {
        Some(k) => app.limits.admit(&app.metrics, k, tenant_limits, req.n, estimate).await?,
        None => crate::limits::Reservation::none(),
    };
    // The tenant's share of requests in flight, held until the request is answered.
    let _tenant_slot = match (key, tenant_limits.and_then(|t| t.max_in_flight)) {
        (Some(k), Some(max)) => Some(app.tenant_slots.enter(&k.tenant, max).ok_or_else(|| {
            app.metrics.rate_limited.with_label_values(&[k.tenant.as_str(), "in_flight"]).inc();
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                format!("tenant \"{}\" has {max} requests in flight, its max_in_flight; retry when one ends", k.tenant),
            );
            e.retry_after = Some(1);
            e
        })?),
        _ => None,
    };
    if !req.response_format_given && req.stream.is_some() {
        // Stream events carry base64 only.
        req.response_format = ResponseFormat::B64Json;
    } else if !req.response_format_given {
        req.response_format = default_format(route.default_response_format, req.model.as_deref());
    }
    if req.response_format == ResponseFormat::Url && req.stream.is_none() {
        answer::url_base(policy, headers)?;
    }
    if req.contract.is_some() {
        // Only the adherence evaluator reads a contract: on a route without it, the contract
        // is not checked, and the answer says so.
        let checked = route.eval.evaluators.iter().any(|e| e == "adherence");
        if !checked {
            app.metrics.contract_unchecked.with_label_values(&[route.name.as_str()]).inc();
        }
        ctx.contract_checked = Some(checked);
    }
    if app.traces.is_some() {
        let caller = trace::Caller { tenant: key.map(|k| k.tenant.as_str()), key_name: key.map(|k| k.id.as_str()) };
        let parent = ctx.parent_span_id.take();
        let rec = trace::draft(
            &ctx.trace_id,
            parent,
            ctx.wall_start,
            caller,
            &route.name,
            route.record_prompt,
            &req,
            &cohort_fields,
        );
        ctx.record = Some(Box::new(rec));
        ctx.writer = app.traces.clone();
    }
    ctx.cohort_fields = Some(cohort_fields);
    if req.stream.is_some_and(|p| p > 0) && (!route.eval.evaluators.is_empty() || policy.provenance.is_some()) {
        // A judged stream's partial images are never sent to the client (see `stream`), so the
        // providers are not asked for them: OpenAI bills each one as output tokens.
        req.raw.insert("partial_images".into(), 0.into());
    }
    // 5. Whether it regenerates an earlier request (recorded with the trace).
    if let Some(rec) = ctx.record.as_deref_mut() {
        let asked = crate::feedback::Asked {
            prompt: &req.prompt,
            inputs: input_digest(&req).await,
            explicit: req.regenerate_of.as_deref(),
        };
        app.feedback.detect(policy, &app.metrics.feedback, route, asked, rec).await;
    }
    // 6. Mirrors: sampled copies to candidates, started now and never awaited here.
    let primary_span = ctx.record.as_ref().map(|r| r.span_id.as_str());
    migration.start_mirrors(app, snap, &ctx.trace_id, primary_span, &req, alias);

    // 7. Attempts, in plan order, under per-attempt timeouts and the route's deadline.
    let deadline = tokio::time::Instant::now() + route.deadline;
    let hedging = route.hedge.as_ref().map(|h| {
        let observed = match (h.after_p95, steps.first()) {
            (true, Some(s)) => {
                let health = &policy.routes[s.route].health;
                snap.live[s.route][s.target].health.window(health).p95(now, health).map(|p| p.max(h.min_after))
            }
            _ => None,
        };
        routing::Hedging { after: observed.unwrap_or(h.after), max_parallel: h.max_parallel }
    });
    let verdicts = migration.compares().then(|| VerdictSink::new(Vec::new()));
    let notes = Arc::new(NoteSink::default());
    if ctx.record.is_some() {
        ctx.notes = Some(notes.clone());
    }
    // Partial images asked for go to the client as they arrive (see `images`), unless every
    // image must carry provenance: a partial image is never signed, so none is sent.
    let live = ctx.live.clone().filter(|_| req.stream.is_some_and(|p| p > 0) && policy.provenance.is_none());
    if let Some(t) = &live {
        t.set_origin(&ctx.trace_id, &route.name);
    }
    let trace_id = ctx.record.is_some().then(|| ctx.trace_id.clone());
    let billing = ChargeOnCancel {
        app,
        policy,
        route: &route.name,
        req: &req,
        made: MadeSink::default(),
        reservation: Some(reservation),
    };
    let env = AttemptEnv {
        notes: trace_id.as_deref().map(|t| (&*notes, t)),
        app,
        snap,
        req: &req,
        alias,
        route_name: &route.name,
        // The gateway holds the images' bytes whenever it must answer with them itself.
        // A stream's events carry base64 only.
        needs_bytes: req.response_format == ResponseFormat::B64Json
            || route.url_mode == UrlMode::Gateway
            || req.stream.is_some()
            || policy.provenance.is_some(),
        mirror: false,
        verdicts: verdicts.as_ref(),
        made: Some(&billing.made),
        tracestate: ctx.tracestate.as_ref(),
        partials: live.as_ref(),
    };
    let env = &env;
    let timeout_of = |s: Step| attempt_timeout(policy, s);
    let outcome = routing::run_plan(&steps, deadline, timeout_of, hedging, |s, until| attempt(env, s, until)).await;
    record_attempts(app, snap, route_idx, &outcome, ctx);
    if let (Some(first), Some(verdicts)) = (steps.first(), verdicts) {
        let verdicts = verdicts.into_inner().unwrap_or_default();
        migration.finish(app, policy, &req, &outcome, *first, &verdicts);
    }

    // 8. What it cost.
    let (made, reservation) = billing.disarm();
    let (total, each) = cost::charge_attempts(app, policy, &route.name, &req, &outcome, &made);
    if let Some(r) = reservation {
        r.settle(total.unwrap_or(0.0));
    }
    ctx.cost = total;
    ctx.notes = None;
    if let Some(rec) = ctx.record.as_deref_mut() {
        let notes = std::mem::take(&mut *crate::lock(&notes));
        trace::attempts(rec, policy, &outcome, notes, ctx.started, ctx.canary, &each);
    }

    // 9. The answer. `x-acc-canary` says the canary's image is the one returned: a canary
    // attempt that failed and fell back to the plan is only in `x-acc-attempts`.
    ctx.canary = ctx.canary && outcome.success.as_ref().is_some_and(|(s, _)| Some(s) == steps.first());
    let Some((step, mut generation)) = outcome.success else {
        return Err(answer::failure(policy, &outcome));
    };
    let winner = &policy.routes[step.route];
    ctx.provider = Some(step);
    if !generation.verdicts.is_empty() {
        let images = generation.images.len().max(req.n as usize);
        ctx.eval_summary =
            Some(crate::eval::summary_per_image(&generation.verdicts, &generation.verdict_images, images));
    }
    ctx.flags = std::mem::take(&mut generation.flags);
    ctx.generation = Some(generation.settings.header()).filter(|h| !h.is_empty());
    ctx.dropped = std::mem::take(&mut generation.dropped);
    // 9a. Provenance: the images signed now that they are judged and before anything keeps them.
    let mut manifests = Vec::new();
    if let Some(p) = &policy.provenance {
        let origin = crate::sign::Origin { trace_id: &ctx.trace_id, route: route_idx, winner: step, alias };
        manifests = crate::sign::sign(app, policy, p, origin, &req, &mut generation).await?;
        // The provider's own stream events carry its unsigned bytes: the completed events
        // are built from the signed images instead.
        generation.streamed = None;
    }
    // A failed check whose action is "review": the answer is withheld, held in the store
    // until a reviewer decides, and the client told so at once.
    if !generation.review.is_empty() {
        let fields = ctx.cohort_fields.as_ref();
        let field = |i: usize| fields.and_then(|f| f[i].as_deref());
        let origin = review_api::Origin {
            trace_id: &ctx.trace_id,
            tenant: key.map(|k| k.tenant.as_str()),
            cohort_fields: [field(0), field(1), field(2)],
        };
        match review_api::hold(app, winner, origin, &req, &generation).await {
            Ok(()) => return Err(review_api::pending_error(&ctx.trace_id)),
            Err(_) if winner.review.overflow == ReviewOverflow::Flag => {
                ctx.flags = std::mem::take(&mut generation.review);
            }
            // "block", and "fallback" once the attempts are over: nothing unreviewed goes out.
            Err(e) => {
                tracing::warn!(trace_id = %ctx.trace_id, route = %winner.name, error = %e, "an answer needing review could not be held; withheld");
                return Err(review_api::withheld_error(&e));
            }
        }
    }
    if req.stream.is_some() {
        // Partial images are withheld where the final image is judged before it goes out, and
        // not sent twice where they went out live.
        let relay_partials = winner.eval.evaluators.is_empty() && !live.as_ref().is_some_and(|t| t.started());
        ctx.event_stream = true;
        let settings = generation.settings.clone();
        let mut sent = Vec::with_capacity(generation.images.len());
        let body = crate::stream::render(&req, generation, relay_partials, Some(&mut sent));
        if let Some(rec) = ctx.record.as_deref_mut() {
            trace::images(rec, &settings, sent, policy.store.image_sha256);
            trace::manifests(rec, manifests);
        }
        return Ok(body);
    }
    let Some(rec) = ctx.record.as_deref_mut() else {
        return Ok(answer::render(app, policy, winner.url_mode, req.response_format, generation, headers, None));
    };
    let settings = generation.settings.clone();
    let mut sent = Vec::with_capacity(generation.images.len());
    let body = answer::render(app, policy, winner.url_mode, req.response_format, generation, headers, Some(&mut sent));
    trace::images(rec, &settings, sent, policy.store.image_sha256);
    trace::manifests(rec, manifests);
    Ok(body)
}

/// Client keys are checked by their SHA-256 digest. With no keys configured the gateway serves
/// anyone, which start-up only allows on a loopback listener.
fn authenticate<'p>(policy: &'p Policy, headers: &HeaderMap) -> Result<Option<&'p ApiKey>, ApiError> {
    if policy.keys.is_empty() {
        return Ok(None);
    }
    let token = match crate::secrets::credentials(headers) {
        crate::secrets::Credentials::Bearer(token) => token,
        crate::secrets::Credentials::Several => {
            return Err(ApiError::unauthorized("Send one Authorization header, not several."));
        }
        _ => {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            ))
        }
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    policy.keys.get(&digest).map(Some).ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
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
                | ProviderError::AnswerMemoryFull(_)
                | ProviderError::QueueFull
                | ProviderError::QueueTimeout
                | ProviderError::Busy { .. }
                | ProviderError::HedgeCancelled)
        );
        if reached {
            latency.observe(a.elapsed.as_secs_f64());
        }
        if let Some((from, reason)) = prev {
            m.fallbacks.with_label_values(&[route.as_str(), from, &target.provider, reason]).inc();
        }
        if let Err(e) = &a.result {
            tracing::info!(trace_id = %ctx.trace_id, route = %route, provider = %target.provider, result = label, "attempt failed: {}", crate::log_safe(&e.text_without_provider_message()));
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

fn finish(app: &App, snap: &Snapshot, mut ctx: RequestCtx, result: Result<ChunkedBody, ApiError>) -> Response {
    ctx.disarm();
    let route = ctx.route.map_or("none", |i| snap.policy.routes[i].name.as_str());
    let mut error_code: Option<std::borrow::Cow<'static, str>> = None;
    let (mut resp, outcome) = match result {
        Ok(body) => {
            let mut r = Response::new(Body::new(body));
            if ctx.event_stream {
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::stream::CONTENT_TYPE));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            } else {
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            let decision = if ctx.flags.is_empty() { "pass" } else { "flagged" };
            r.headers_mut().insert(DECISION, HeaderValue::from_static(decision));
            (r, "ok")
        }
        Err(e) => {
            // An upstream's own 4xx goes to the client as it came: the record keeps the code
            // that answer carries (OpenAI's error shape), not the gateway's name for the case.
            error_code = e
                .raw_body
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v["error"]["code"].as_str().map(|c| crate::cut(c, 128)))
                .map(std::borrow::Cow::Owned)
                .or(e.code.map(std::borrow::Cow::Borrowed));
            let outcome = match (e.code, e.status.as_u16()) {
                (Some("invalid_api_key"), _) => "unauthorized",
                (Some("upstream_rejected"), _) => "upstream_rejected",
                (Some("upstream_timeout"), _) => "upstream_timeout",
                (Some("upstream_error"), _) => "upstream_error",
                (Some("evaluation_failed"), _) => "eval_failed",
                (Some("content_policy_violation"), _) => "blocked",
                (Some("pending_review"), _) => "pending_review",
                (Some("rate_limit_exceeded" | "spend_limit_exceeded"), _) => "rate_limited",
                (Some("no_healthy_target"), _) => "no_healthy_target",
                // Shared state unreachable under fail_closed: Redis's outage, not the gateway's bug.
                (Some("cluster_unavailable"), _) => "cluster_unavailable",
                (Some("provider_busy"), _) => "provider_busy",
                (Some("idempotency_key_reused"), _) => "idempotency_conflict",
                (Some("unsupported_parameter" | "unsupported_operation"), _) => "client_error",
                (_, 500..) => "internal_error",
                _ => "client_error",
            };
            let decision = match outcome {
                "blocked" => "blocked",
                "pending_review" => "review",
                _ => "error",
            };
            let mut r = e.into_response();
            if outcome == "pending_review" {
                review_api::mark_pending(&mut r);
            }
            r.headers_mut().insert(DECISION, HeaderValue::from_static(decision));
            (r, outcome)
        }
    };
    let h = resp.headers_mut();
    // Room for every x-acc-* header at once: growing the map on each insert cost more than the
    // inserts themselves (bench/callgrind.sh).
    h.reserve(16);
    if let Ok(v) = HeaderValue::from_str(&ctx.trace_id) {
        h.insert(REQUEST_ID, v.clone());
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
    if let Some(checked) = ctx.contract_checked {
        h.insert(CONTRACT_CHECKED, HeaderValue::from_static(if checked { "true" } else { "false" }));
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
        if let Ok(v) = HeaderValue::from_str(&answer::format_usd(usd)) {
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
    let took = ctx.started.elapsed();
    let elapsed = took.as_secs_f64();
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
    if let Some([cohort, template, asset]) = &ctx.cohort_fields {
        let m = &app.metrics;
        let [cohort, template, asset] =
            snap.policy.cohorts.labels(cohort.as_deref(), template.as_deref(), asset.as_deref());
        let c = [route, cohort, template, asset];
        m.cohort_requests.with_label_values(&[c[0], c[1], c[2], c[3], outcome]).inc();
        let after_first = ctx.attempts.len().saturating_sub(1);
        if after_first > 0 {
            m.cohort_fallbacks.with_label_values(&c).inc_by(after_first as u64);
        }
        if let Some(rec) = &ctx.record {
            for e in rec.attempts.iter().flat_map(|a| &a.evaluations) {
                m.cohort_eval.with_label_values(&[c[0], c[1], c[2], c[3], &e.evaluator, &e.verdict]).inc();
            }
        }
    }
    if let (Some(mut rec), Some(writer)) = (ctx.record.take(), app.traces.as_ref()) {
        let decision = resp.headers().get(DECISION).and_then(|v| v.to_str().ok()).unwrap_or("error");
        let status = resp.status().as_u16();
        trace::finish(&mut rec, status, decision, outcome, error_code.as_deref(), trace::ms(took), ctx.cost);
        app.feedback.remember(&rec);
        writer.submit(*rec);
    }
    resp
}

/// `POST /v1/feedback`: a rating of a trace of the key's tenant (see `feedback::Feedback::rate`),
/// answered 200 with the entry as stored (`object: "feedback"`).
async fn feedback<B>(app: Arc<App>, req: Request<B>) -> Response
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let snap = app.policy.snapshot();
    let (parts, body) = req.into_parts();
    let key = match authenticate(&snap.policy, &parts.headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let server = &snap.policy.server;
    let (body, _hold) = match receive_body(&app, server, &parts.headers, body, crate::feedback::MAX_BODY_BYTES).await {
        Ok(received) => received,
        Err(e) => return closing(e.into_response()),
    };
    let caller =
        crate::feedback::Caller { tenant: key.map(|k| k.tenant.as_str()), key_name: key.map(|k| k.id.as_str()) };
    match app.feedback.rate(&snap.policy, &app.metrics.feedback, caller, &body).await {
        Ok(entry) => {
            let mut v = serde_json::to_value(&entry).unwrap_or_default();
            v["object"] = "feedback".into();
            v["rating_label"] = entry.rating_label().into();
            axum::Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/images/reviews/{trace_id}`: the outcome of an answer held for review, for the
/// tenant of the key that asked (see `review_api::poll`).
async fn poll_review(app: &App, id: &str, headers: &HeaderMap) -> Response {
    let snap = app.policy.snapshot();
    let tenant = match authenticate(&snap.policy, headers) {
        Ok(k) => k.map(|k| k.tenant.clone()),
        Err(e) => return e.into_response(),
    };
    review_api::poll(app, id, tenant.as_deref(), headers).await
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

/// Fallback for unknown proxy paths, in the OpenAI error shape.
fn not_found() -> Response {
    ApiError::not_found("unknown_url", "unknown path; this gateway serves /v1/images/generations, /v1/images/edits, /v1/images/variations, /v1/models and /v1/feedback")
        .into_response()
}

/// `GET /v1/images/artifacts/{id}.{ext}`: from this replica's store; with `[cluster]`, an
/// image another replica made is read from Redis (and once more 100 ms later when it is not
/// there yet: its replica writes it as the answer leaves). 404 `artifact_not_found` when no
/// replica has it; 503 `cluster_unavailable` when Redis cannot say.
async fn serve_artifact(app: &App, file: &str) -> Response {
    if let Some(r) = app.artifacts.try_serve(file) {
        return r;
    }
    let id = crate::artifacts::id_of(file);
    // Only an id of the ids' shape (32 hex digits, as trace ids) is looked up in Redis.
    let Some(cluster) = app.limits.cluster().filter(|_| crate::request::is_trace_id(id)) else {
        return crate::artifacts::not_found();
    };
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        match cluster.artifact(id).await {
            Ok(Some((bytes, left))) => {
                let mime = crate::providers::sniff_image(&bytes).map_or("application/octet-stream", |(m, _)| m);
                return crate::artifacts::respond(bytes, mime, left);
            }
            Ok(None) => {}
            Err(e) => return cluster.fallback(e).err().map_or_else(crate::artifacts::not_found, |e| e.into_response()),
        }
    }
    crate::artifacts::not_found()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_a_host_with_an_optional_port() {
        for ok in ["a", "img.example.com", "a:80", "a:", "[::1]:8080", "127.0.0.1:65535", "xn--bcher-kva.example"] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in
            ["", "u@a", "a:99999", "a:65536", "a:8x", "a:+80", "a b", "a, b", "evil.example/x?", "a\"b", "\u{ff}"]
        {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
        let h = |hosts: &[&str]| {
            let mut m = HeaderMap::new();
            for v in hosts {
                m.append(header::HOST, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        let code = |v: http::Version, m: &HeaderMap| host_refusal(v, m).map(|r| r.status());
        use http::Version;
        assert_eq!(code(Version::HTTP_11, &h(&["a"])), None);
        assert_eq!(code(Version::HTTP_11, &h(&[])), Some(StatusCode::BAD_REQUEST));
        assert_eq!(code(Version::HTTP_10, &h(&[])), None, "HTTP/1.0 need not name its host");
        assert_eq!(code(Version::HTTP_10, &h(&["a", "b"])), Some(StatusCode::BAD_REQUEST));
        assert_eq!(code(Version::HTTP_10, &h(&["u@a"])), Some(StatusCode::BAD_REQUEST));
        assert_eq!(code(Version::HTTP_2, &h(&[])), None, "HTTP/2 names it in :authority");
    }

    #[test]
    fn a_request_without_response_format_gets_the_route_or_model_default() {
        let b64 = ResponseFormat::B64Json;
        let url = ResponseFormat::Url;
        // OpenAI's own defaults by model family.
        assert_eq!(default_format(None, Some("gpt-image-1")), b64);
        assert_eq!(default_format(None, Some("GPT-Image-1-mini")), b64);
        assert_eq!(default_format(None, Some("dall-e-3")), url);
        assert_eq!(default_format(None, Some("brand-image")), url);
        assert_eq!(default_format(None, None), url);
        // Not a char boundary at 9 bytes: no panic, no match.
        assert_eq!(default_format(None, Some("gpt-imagé")), url);
        // A route's statement wins.
        assert_eq!(default_format(Some(AnswerFormat::Url), Some("gpt-image-1")), url);
        assert_eq!(default_format(Some(AnswerFormat::B64Json), Some("brand-image")), b64);
    }
}
