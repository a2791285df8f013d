//! The ops console at `/console/` on the admin listener: overview, routes, migrations, the
//! review queue and traces, as server-rendered HTML pages (minijinja templates and assets
//! under `gateway/console/`, compiled into the binary), a little script for keyboard review.
//!
//! - Sign-in with the admin token makes a server-side session ([`session`]); every page
//!   needs one, and every POST form carries the session's CSRF token (403 without it).
//! - The data comes from the same handlers as the `/admin` JSON API, called in process
//!   (`api`, the admin API's router without its bearer-token layer), so the console shows
//!   exactly what the API answers; the overview's aggregates come from the trace store's
//!   bounded queries (`store::overview`).
//! - Every page answers a `Server-Timing: app;dur=<ms>` header (server time).
//! - Nothing is fetched from elsewhere: `Content-Security-Policy` allows this origin only.

pub mod charts;
pub mod session;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, StatusCode};
use minijinja::Environment;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::app::App;
use session::{Session, Sessions};

/// Page sizes of the review queue and the trace list.
const REVIEW_PAGE: usize = 20;
const TRACE_PAGE: usize = 50;

/// The console's state, shared by its handlers.
pub struct Console {
    app: Arc<App>,
    /// The admin API's handlers without the bearer-token layer (never served as such).
    api: Router,
    env: Environment<'static>,
    sessions: Sessions,
    hours: HourCache,
}

/// The console's routes, for the admin listener's router only. `api` is the admin API's
/// router (state applied, no token layer): the console's pages read and decide through it.
pub fn router(app: Arc<App>, api: Router) -> Router<Arc<App>> {
    let console =
        Arc::new(Console { app, api, env: templates(), sessions: Sessions::default(), hours: HourCache::default() });
    // Settled hours are counted once, in the background, so the first overview is fast too.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(warm_hours(console.clone()));
    }
    Router::new()
        .route("/console", get(|| async { see_other("/console/") }))
        .route("/console/", get(overview))
        .route("/console/signin", get(signin_page).post(signin))
        .route("/console/signout", post(signout))
        .route("/console/routes", get(routes))
        .route("/console/providers/{name}/reset", post(reset_provider))
        .route("/console/migrations", get(migrations))
        .route("/console/reviews", get(reviews))
        .route("/console/reviews/{id}/images/{index}", get(review_image))
        .route("/console/reviews/{id}/{verb}", post(decide))
        .route("/console/traces", get(traces))
        .route("/console/traces/{id}", get(trace))
        .route("/console/assets/{name}", get(asset))
        .route("/console/{*rest}", get(unknown_page))
        // Another method on a console page (a typed or bookmarked /console/signout): a
        // console page with the console's headers, not the admin API's JSON.
        .method_not_allowed_fallback(|Extension(console): Extension<Arc<Console>>| async move {
            console.message(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "This console address does not take this method: open the console's pages from its navigation.",
                None,
            )
        })
        .layer(middleware::from_fn(page_headers))
        .layer(Extension(console))
}

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, src) in [
        ("base.html", include_str!("../../console/templates/base.html")),
        ("signin.html", include_str!("../../console/templates/signin.html")),
        ("message.html", include_str!("../../console/templates/message.html")),
        ("overview.html", include_str!("../../console/templates/overview.html")),
        ("routes.html", include_str!("../../console/templates/routes.html")),
        ("migrations.html", include_str!("../../console/templates/migrations.html")),
        ("reviews.html", include_str!("../../console/templates/reviews.html")),
        ("traces.html", include_str!("../../console/templates/traces.html")),
        ("trace.html", include_str!("../../console/templates/trace.html")),
    ] {
        env.add_template(name, src).expect("console templates are checked by the console tests");
    }
    env.add_filter("time_ns", |v: minijinja::Value| fmt_time_ns(v.as_i64().unwrap_or(0).max(0) as u64));
    env.add_filter("time_s", |v: minijinja::Value| {
        fmt_time_ns((v.as_i64().unwrap_or(0).max(0) as u64) * 1_000_000_000)
    });
    env.add_filter("num", |v: minijinja::Value, digits: Option<usize>| fmt_num(&v, digits.unwrap_or(1)));
    env.add_filter("pct", |v: minijinja::Value| match f64::try_from(v) {
        Ok(x) => format!("{:.1}%", x * 100.0),
        Err(_) => "–".to_string(),
    });
    env.add_filter("age", |v: minijinja::Value| fmt_age(f64::try_from(v).unwrap_or(0.0)));
    env.add_filter("tojson_pretty", |v: minijinja::Value| serde_json::to_string_pretty(&v).unwrap_or_default());
    // Every value a page shows passes here: text from clients (prompts, cohorts, user ids,
    // reasons) has its bidirectional controls shown, not obeyed.
    env.set_formatter(|out, state, value| {
        match value.as_str().filter(|s| !value.is_safe() && s.chars().any(crate::is_bidi_control)) {
            Some(text) => minijinja::escape_formatter(out, state, &minijinja::Value::from(show_bidi_controls(text))),
            None => minijinja::escape_formatter(out, state, value),
        }
    });
    env
}

/// `text` with each bidirectional control replaced by its code point in brackets, `[U+202E]`.
fn show_bidi_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if crate::is_bidi_control(c) {
            out.push_str(&format!("[U+{:04X}]", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn fmt_num(v: &minijinja::Value, digits: usize) -> String {
    match f64::try_from(v.clone()) {
        Ok(x) if !v.is_none() && !v.is_undefined() => format!("{x:.digits$}"),
        _ => "–".to_string(),
    }
}

/// `2026-01-31 12:00:00 UTC` for Unix nanoseconds.
fn fmt_time_ns(n: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(n))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .and_then(|s| s.get(..19).map(|s| format!("{} UTC", s.replace('T', " "))))
        .unwrap_or_else(|| "–".to_string())
}

fn fmt_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn now_unix_nano() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Security and timing headers on every console answer: only this origin's assets, no
/// framing, no caching of pages (held images included), and the server time taken.
async fn page_headers(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let asset = req.uri().path().starts_with("/console/assets/");
    let mut r = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={ms:.1}")) {
        h.insert("server-timing", v);
    }
    r
}

/// A signed-in request: its session. Pages without one are sent to sign in (303); nothing
/// of the page (or a held image) is answered.
pub struct Signed {
    console: Arc<Console>,
    id: String,
    session: Session,
}

impl<S: Send + Sync> FromRequestParts<S> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(console) = parts.extensions.get::<Arc<Console>>().cloned() else {
            return Err(StatusCode::INTERNAL_SERVER_ERROR.into_response());
        };
        let found = session::cookie_value(&parts.headers).and_then(|id| console.sessions.get(&id).map(|s| (id, s)));
        match found {
            Some((id, session)) => Ok(Signed { console, id, session }),
            None if parts.method == Method::GET => {
                let next = parts.uri.path_and_query().map_or("/console/", |p| p.as_str());
                let to = format!(
                    "/console/signin?next={}",
                    form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                );
                Err(see_other(&to))
            }
            None => Err(console.message(
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "This action needs a signed-in console session. Sign in again and retry.",
                None,
            )),
        }
    }
}

/// An answer of the in-process admin API.
struct ApiAnswer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl ApiAnswer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The OpenAI-shaped error's message, for an error page.
    fn error_message(&self) -> String {
        let v = self.json();
        v["error"]["message"].as_str().map_or_else(|| format!("the admin API answered {}", self.status), str::to_string)
    }
}

impl Console {
    async fn api(&self, method: Method, uri: &str, body: Option<Value>) -> ApiAnswer {
        let mut req = http::Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let Ok(req) = req.body(body) else {
            return ApiAnswer { status: StatusCode::BAD_REQUEST, content_type: None, body: Bytes::new() };
        };
        let Ok(r) = self.api.clone().oneshot(req).await;
        let status = r.status();
        let content_type = r.headers().get(header::CONTENT_TYPE).cloned();
        let body = match http_body_util::BodyExt::collect(r.into_body()).await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        ApiAnswer { status, content_type, body }
    }

    fn render(&self, name: &str, status: StatusCode, ctx: Value) -> Response {
        let html =
            self.env.get_template(name).and_then(|t| t.render(minijinja::Value::from_serialize(&ctx))).unwrap_or_else(
                |e| {
                    tracing::error!("console template {name}: {e:#}");
                    format!("<!doctype html><title>Console error</title><p>The page {name} could not be drawn.</p>")
                },
            );
        let mut r = (status, html).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        r
    }

    /// A page of `name` for a signed-in session (navigation, CSRF token, reviewer added).
    fn page(&self, s: &Signed, name: &str, active: &str, mut ctx: Value) -> Response {
        ctx["csrf"] = json!(s.session.csrf);
        ctx["reviewer"] = json!(s.session.reviewer);
        ctx["active"] = json!(active);
        ctx["signed_in"] = json!(true);
        self.render(name, StatusCode::OK, ctx)
    }

    fn message(&self, status: StatusCode, title: &str, text: &str, signed: Option<&Signed>) -> Response {
        let mut ctx = json!({"title": title, "text": text, "status": status.as_u16()});
        if let Some(s) = signed {
            ctx["csrf"] = json!(s.session.csrf);
            ctx["signed_in"] = json!(true);
        }
        self.render("message.html", status, ctx)
    }

    /// An error page for an admin API answer that is not a success.
    fn api_error(&self, a: &ApiAnswer, s: &Signed) -> Response {
        self.message(a.status, a.status.canonical_reason().unwrap_or("Error"), &a.error_message(), Some(s))
    }

    /// The error page of a list page (review queue, traces): a 404 of a list endpoint means the
    /// store is off, which the page's title says (not a "Not Found", as if the link were broken).
    fn list_error(&self, a: &ApiAnswer, s: &Signed, what: &str) -> Response {
        if a.status == StatusCode::NOT_FOUND {
            return self.message(a.status, &format!("{what} not kept"), &a.error_message(), Some(s));
        }
        self.api_error(a, s)
    }

    fn secure(&self) -> bool {
        self.app.policy.snapshot().policy.server.tls.is_some()
    }
}

/// A form body's fields.
fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The CSRF check of every POST: the form's `csrf` must be the session's token.
fn csrf_refusal(s: &Signed, f: &[(String, String)]) -> Option<Response> {
    match field(f, "csrf") {
        Some(t) if session::same_secret(t, &s.session.csrf) => None,
        Some(_) => Some(s.console.message(
            StatusCode::FORBIDDEN,
            "Forbidden: wrong CSRF token",
            "The form's CSRF token is not this session's. Reload the page and try again.",
            Some(s),
        )),
        None => Some(s.console.message(
            StatusCode::FORBIDDEN,
            "Forbidden: missing CSRF token",
            "This form carries no CSRF token, so it did not come from a console page. Reload the page and try again.",
            Some(s),
        )),
    }
}

/// Where to go after sign-in: a console path only (never another origin), in visible ASCII
/// (a control character would leave the redirect without its `Location`) and without `.`
/// or `..` segments (which would lead out of the console).
fn safe_next(next: Option<&str>) -> String {
    let in_console = |n: &str| {
        n.starts_with("/console/")
            && !n.contains('\\')
            && n.bytes().all(|b| b.is_ascii_graphic())
            && !n.split(['?', '#']).next().unwrap_or("").split('/').any(|seg| {
                let seg = seg.to_ascii_lowercase().replace("%2e", ".");
                seg == "." || seg == ".."
            })
    };
    match next {
        Some(n) if in_console(n) => n.to_string(),
        _ => "/console/".to_string(),
    }
}

async fn signin_page(Extension(console): Extension<Arc<Console>>, uri: http::Uri) -> Response {
    let next = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "next")
        .map(|(_, v)| v.into_owned());
    let disabled = console.app.admin_token_digest.is_none();
    console.render(
        "signin.html",
        if disabled { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK },
        json!({"next": safe_next(next.as_deref()), "disabled": disabled}),
    )
}

async fn signin(Extension(console): Extension<Arc<Console>>, headers: http::HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    let next = safe_next(field(&f, "next"));
    let Some(expected) = console.app.admin_token_digest else {
        return console.render("signin.html", StatusCode::UNAUTHORIZED, json!({"next": next, "disabled": true}));
    };
    // One attempt at a time; a wrong token holds the line a while (no fast guessing). The
    // line is short: beyond it an attempt is refused at once rather than held (a flood of
    // guesses must not pile up the admin listener's connections).
    let Some(_place) = console.sessions.join_sign_in_line() else {
        let mut r = console.render(
            "signin.html",
            StatusCode::TOO_MANY_REQUESTS,
            json!({"next": next, "error": "Too many sign-in attempts at once: wait a few seconds and sign in again."}),
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    };
    let _turn = console.sessions.sign_in.lock().await;
    let token = field(&f, "token").unwrap_or("").trim();
    use sha2::Digest;
    if token.is_empty() || sha2::Sha256::digest(token.as_bytes()).as_slice() != expected.as_slice() {
        tokio::time::sleep(session::FAILED_SIGN_IN_DELAY).await;
        return console.render(
            "signin.html",
            StatusCode::UNAUTHORIZED,
            json!({"next": next, "error": "Wrong admin token: it is not this gateway's ACC_ADMIN_TOKEN."}),
        );
    }
    let reviewer = field(&f, "reviewer").map(str::trim).filter(|r| !r.is_empty()).unwrap_or("console");
    let reviewer: String = reviewer.chars().take(200).collect();
    // A browser that signs in again leaves its previous session ended, not orphaned.
    if let Some(old) = session::cookie_value(&headers) {
        console.sessions.remove(&old);
    }
    let (id, _) = console.sessions.create(&reviewer);
    let mut r = see_other(&next);
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(&id), console.secure())) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn signout(s: Signed, body: Bytes) -> Response {
    let f = form(&body);
    if let Some(refused) = csrf_refusal(&s, &f) {
        return refused;
    }
    s.console.sessions.remove(&s.id);
    let mut r = see_other("/console/signin");
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(None, s.console.secure())) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn unknown_page(s: Signed) -> Response {
    s.console.message(StatusCode::NOT_FOUND, "Not found", "There is no console page at this address.", Some(&s))
}

async fn asset(Path(name): Path<String>) -> Response {
    let (ct, body) = match name.as_str() {
        "console.css" => ("text/css; charset=utf-8", include_str!("../../console/assets/console.css")),
        "console.js" => ("text/javascript; charset=utf-8", include_str!("../../console/assets/console.js")),
        "favicon.svg" => ("image/svg+xml", include_str!("../../console/assets/favicon.svg")),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, ct), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

// ------------------------------------------------------------------------------------------
// Overview

const HOUR_NS: u64 = 3_600_000_000_000;

/// An hour is settled, and its counts cached, this long after it ends: records are written
/// when their request ends (its deadline) plus the writer's batching.
const SETTLE_NS: u64 = 10 * 60 * 1_000_000_000;

/// The overview's counts of settled hours (they no longer change), by the hour's start (Unix
/// nanoseconds), so a page reads at most the last ~2 hours' rows and the day's oldest partial
/// hour, whatever the store holds.
#[derive(Default)]
struct HourCache {
    hours: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<CountRow>>>,
    /// One filler at a time.
    fill: tokio::sync::Mutex<()>,
}

use crate::store::overview::CountRow;
use crate::store::{StoreError, TraceDb};

fn floor_hour(t: u64) -> u64 {
    t - t % HOUR_NS
}

impl HourCache {
    /// The counts of the settled hours starting in `[from, to)` (hour-aligned), each with
    /// `bucket` 0; counted now where not cached yet.
    async fn settled(&self, db: &TraceDb, from: u64, to: u64) -> Result<Vec<(u64, Vec<CountRow>)>, StoreError> {
        let missing = |hours: &std::collections::BTreeMap<u64, Vec<CountRow>>| {
            (from..to).step_by(HOUR_NS as usize).filter(|h| !hours.contains_key(h)).collect::<Vec<u64>>()
        };
        if !missing(&crate::lock(&self.hours)).is_empty() {
            let _turn = self.fill.lock().await;
            let todo = missing(&crate::lock(&self.hours));
            // Concurrently: the store's pool bounds how many run at once.
            let counted = futures_util::future::join_all(
                todo.iter().map(|&h| async move { (h, db.overview_counts(h, HOUR_NS, h, h + HOUR_NS).await) }),
            )
            .await;
            for (h, rows) in counted {
                crate::lock(&self.hours).insert(h, rows?);
            }
        }
        let mut hours = crate::lock(&self.hours);
        // Hours older than any window are dropped.
        hours.retain(|h, _| *h + 26 * HOUR_NS >= to);
        Ok(hours.range(from..to).map(|(h, rows)| (*h, rows.clone())).collect())
    }
}

/// Fills the hour cache once the trace store is open (it opens in the background).
async fn warm_hours(console: Arc<Console>) {
    let Some(writer) = console.app.traces.as_ref() else { return };
    for _ in 0..300 {
        if let Some(db) = writer.db() {
            let now = now_unix_nano();
            let from = floor_hour(now.saturating_sub(24 * HOUR_NS)) + HOUR_NS;
            let to = floor_hour(now.saturating_sub(SETTLE_NS));
            if let Err(e) = console.hours.settled(&db, from, to).await {
                tracing::debug!("console: counting settled hours failed: {e}");
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The last day's counts in hour buckets aligned on `origin` (the hour the day's window starts
/// in: bucket 0 is partial, bucket 24 is the current hour), and the last hour's, all in bucket 0.
async fn day_and_hour(
    console: &Console,
    db: &TraceDb,
    now: u64,
) -> Result<(u64, Vec<CountRow>, Vec<CountRow>), StoreError> {
    let day_start = now.saturating_sub(24 * HOUR_NS);
    let origin = floor_hour(day_start);
    let first_full = origin + HOUR_NS;
    let settled_end = floor_hour(now.saturating_sub(SETTLE_NS)).max(first_full);
    let (edge, recent, hour, settled) = tokio::join!(
        db.overview_counts(origin, HOUR_NS, day_start, first_full),
        db.overview_counts(origin, HOUR_NS, settled_end, now),
        db.overview_counts(now.saturating_sub(HOUR_NS), HOUR_NS, now.saturating_sub(HOUR_NS), now),
        console.hours.settled(db, first_full, settled_end),
    );
    let mut day = edge?;
    day.extend(recent?);
    for (h, rows) in settled? {
        let bucket = ((h - origin) / HOUR_NS) as u32;
        day.extend(rows.into_iter().map(|r| CountRow { bucket, ..r }));
    }
    Ok((origin, day, hour?))
}

async fn overview(s: Signed) -> Response {
    let console = &s.console;
    let Some(db) = console.app.traces.as_ref().and_then(|w| w.db()) else {
        let why = if console.app.traces.is_none() {
            "Trace records are not kept ([store] enabled = false): the overview is computed from them."
        } else {
            "The trace store is unavailable now (or still opening); requests are still served."
        };
        return console.page(&s, "overview.html", "overview", json!({"store_missing": why}));
    };
    let now = now_unix_nano();
    let day_ago = now.saturating_sub(24 * HOUR_NS);
    let hour_ago = now.saturating_sub(HOUR_NS);
    let (counts, sample, feedback, pending) = tokio::join!(
        day_and_hour(console, &db, now),
        db.overview_sample(day_ago, crate::store::overview::SAMPLE),
        db.overview_feedback(day_ago, hour_ago),
        db.pending_reviews(),
    );
    let ((origin, day, hour), sample) = match (counts, sample) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            return console.message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Trace store unavailable",
                &format!("Reading the trace store failed: {e}"),
                Some(&s),
            )
        }
    };
    let feedback = feedback.unwrap_or_default();
    let (mut day, mut hour) = (day, hour);
    bound_cohorts(&mut day, &mut hour, &console.app.policy.snapshot().policy.cohorts.cohorts);
    let ctx = overview_figures(now, origin, &day, &hour, &sample, &feedback, pending.ok());
    console.page(&s, "overview.html", "overview", ctx)
}

/// Most cohorts the overview shows one by one when the policy lists none.
const MAX_OVERVIEW_COHORTS: usize = 20;

/// Cohorts as the overview groups them: `x-acc-cohort` is whatever a client sends, so one key
/// could make the page as long as it likes. With `[cohorts] cohorts` listed, a value outside
/// the list is `other` (as in the metrics); without a list, the [`MAX_OVERVIEW_COHORTS`]
/// cohorts with the most requests over the day are shown and the rest are `other`.
fn bound_cohorts(day: &mut [CountRow], hour: &mut [CountRow], listed: &std::collections::BTreeSet<String>) {
    let other = || Some(crate::policy::Cohorts::OTHER.to_string());
    if !listed.is_empty() {
        for r in day.iter_mut().chain(hour.iter_mut()) {
            if r.cohort.as_ref().is_some_and(|c| !listed.contains(c)) {
                r.cohort = other();
            }
        }
        return;
    }
    let mut totals: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for r in day.iter() {
        if let Some(c) = r.cohort.as_deref() {
            *totals.entry(c).or_default() += r.requests;
        }
    }
    if totals.len() <= MAX_OVERVIEW_COHORTS {
        return;
    }
    let mut ranked: Vec<(&str, u64)> = totals.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let kept: std::collections::HashSet<String> =
        ranked.iter().take(MAX_OVERVIEW_COHORTS).map(|(c, _)| c.to_string()).collect();
    for r in day.iter_mut().chain(hour.iter_mut()) {
        if r.cohort.as_ref().is_some_and(|c| !kept.contains(c)) {
            r.cohort = other();
        }
    }
}

/// The overview's figures for the last hour and day, and its charts. `day` is in hour buckets
/// from `origin`; `hour` is the last hour's counts.
fn overview_figures(
    now: u64,
    origin: u64,
    day: &[CountRow],
    hour: &[CountRow],
    sample: &[crate::store::overview::SampleRow],
    feedback: &[crate::store::overview::FeedbackRow],
    pending: Option<u64>,
) -> Value {
    let decisions = ["pass", "flagged", "blocked", "review", "error"];
    let mut windows = Vec::new();
    for (name, hours, counts) in [("Last hour", 1u32, hour), ("Last day", 24u32, day)] {
        let rows: Vec<&CountRow> = counts.iter().collect();
        let requests: u64 = rows.iter().map(|r| r.requests).sum();
        let by = |d: &str| rows.iter().filter(|r| r.decision == d).map(|r| r.requests).sum::<u64>();
        let rate = |n: u64| if requests == 0 { None } else { Some(n as f64 / requests as f64) };
        let since = now.saturating_sub(u64::from(hours) * HOUR_NS);
        let in_window: Vec<_> = sample.iter().filter(|r| r.start_time_unix_nano >= since).collect();
        // The sample holds the window's newest records: all of them when it is not full.
        let complete = in_window.len() as u64 >= requests;
        let mut lat: Vec<f64> = in_window.iter().map(|r| r.duration_ms).collect();
        lat.sort_by(f64::total_cmp);
        let p99 = (!lat.is_empty()).then(|| lat[((lat.len() as f64 * 0.99).ceil() as usize).clamp(1, lat.len()) - 1]);
        let fallbacks = in_window.iter().filter(|r| r.fallback).count();
        let fallback_rate = (!in_window.is_empty()).then(|| fallbacks as f64 / in_window.len() as f64);
        let priced: Vec<f64> = in_window.iter().filter_map(|r| r.cost_usd).collect();
        let cost_sampled = priced.iter().fold(0.0, |a, b| a + b);
        let cost = match (priced.is_empty(), complete) {
            (true, _) => None,
            (false, true) => Some(cost_sampled),
            (false, false) => Some(cost_sampled / in_window.len() as f64 * requests as f64),
        };
        let mut cohorts: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for r in &rows {
            let e = cohorts.entry(r.cohort.clone().unwrap_or_else(|| "(none)".into())).or_default();
            e.0 += r.requests;
            e.1 += r.eval_failed;
        }
        let cohorts: Vec<Value> = cohorts
            .into_iter()
            .map(
                |(c, (n, f))| json!({"cohort": c, "requests": n, "eval_failed": f, "rate": f as f64 / n.max(1) as f64}),
            )
            .collect();
        let fb: Vec<_> = feedback.iter().filter(|f| hours == 24 || f.recent).collect();
        let explicit: u64 = fb.iter().filter(|f| f.source == "explicit").map(|f| f.ratings).sum();
        let down: u64 = fb.iter().filter(|f| f.source == "explicit").map(|f| f.negative).sum();
        let regenerations: u64 = fb.iter().filter(|f| f.source == "regeneration").map(|f| f.ratings).sum();
        windows.push(json!({
            "name": name,
            "requests": requests,
            "errors": by("error"),
            "blocked": by("blocked"),
            "review": by("review"),
            "error_rate": rate(by("error")),
            "blocked_rate": rate(by("blocked")),
            "fallback_rate": fallback_rate,
            "p99_ms": p99,
            "cost_usd": cost,
            "estimated": !complete,
            "sampled": in_window.len(),
            "cohorts": cohorts,
            "ratings": explicit,
            "thumbs_down_rate": (explicit > 0).then(|| down as f64 / explicit as f64),
            "regenerations": regenerations,
            "regeneration_rate": rate(regenerations),
        }));
    }
    // Requests per hour over the day, by decision, oldest on the left (hours in UTC).
    let labels: Vec<String> = (0..25u64)
        .map(|b| {
            let t = fmt_time_ns(origin + b * HOUR_NS);
            t.get(11..16).map_or_else(String::new, str::to_string)
        })
        .collect();
    let values: Vec<Vec<f64>> = (0..25u32)
        .map(|b| {
            decisions
                .iter()
                .map(|d| day.iter().filter(|r| r.bucket == b && r.decision == *d).map(|r| r.requests as f64).sum())
                .collect()
        })
        .collect();
    let requests_chart = charts::stacked_columns("Requests per hour (UTC) by decision", &labels, &decisions, &values);
    let day = &windows[1];
    let cohort_rows: Vec<(String, Vec<Option<f64>>)> = day["cohorts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let hour = windows[0]["cohorts"]
                .as_array()
                .and_then(|h| h.iter().find(|x| x["cohort"] == c["cohort"]))
                .and_then(|x| x["rate"].as_f64());
            (
                c["cohort"].as_str().unwrap_or("").to_string(),
                vec![hour.map(|r| r * 100.0), c["rate"].as_f64().map(|r| r * 100.0)],
            )
        })
        .collect();
    let cohort_chart = (!cohort_rows.is_empty())
        .then(|| charts::grouped_bars("Eval-fail rate by cohort", &["last hour", "last day"], &cohort_rows, "%"));
    json!({
        "windows": windows,
        "pending_reviews": pending,
        "requests_chart": requests_chart,
        "cohort_chart": cohort_chart,
        "sample_size": crate::store::overview::SAMPLE,
        "generated_at": now,
    })
}

// ------------------------------------------------------------------------------------------
// Routes and migrations

async fn routes(s: Signed, uri: http::Uri) -> Response {
    let c = &s.console;
    let q = form(uri.query().unwrap_or("").as_bytes());
    let (routes, policies) =
        tokio::join!(c.api(Method::GET, "/admin/routes", None), c.api(Method::GET, "/admin/policies", None));
    for a in [&routes, &policies] {
        if !a.status.is_success() {
            return c.api_error(a, &s);
        }
    }
    let data = routes.json();
    // Only a provider of the policy is named (the query is anyone's link).
    let known = |p: &&str| data["providers"].as_array().is_some_and(|ps| ps.iter().any(|x| x["name"] == *p));
    let done =
        field(&q, "reset").filter(known).map(|p| format!("Provider {p} reset: any 429 pause lifted, breaker closed."));
    c.page(&s, "routes.html", "routes", json!({"data": data, "policy": policies.json(), "done": done}))
}

/// The Reset button of a provider on the routes page: `POST /admin/providers/{name}/reset`,
/// then back to the page, which says what was done.
async fn reset_provider(s: Signed, Path(name): Path<String>, body: Bytes) -> Response {
    let f = form(&body);
    if let Some(refused) = csrf_refusal(&s, &f) {
        return refused;
    }
    let c = &s.console;
    let a = c.api(Method::POST, &format!("/admin/providers/{}/reset", enc(&name)), None).await;
    if !a.status.is_success() {
        return c.api_error(&a, &s);
    }
    tracing::info!(provider = %name, reviewer = %s.session.reviewer, "provider reset from the console");
    see_other(&format!("/console/routes?reset={}", enc(&name)))
}

async fn migrations(s: Signed) -> Response {
    let c = &s.console;
    let a = c.api(Method::GET, "/admin/mirror/report", None).await;
    if !a.status.is_success() {
        return c.api_error(&a, &s);
    }
    let mut report = a.json();
    for r in report["routes"].as_array_mut().into_iter().flatten() {
        let route = r["route"].as_str().unwrap_or("").to_string();
        let mut blocks: Vec<Value> = r["candidates"].as_array().cloned().unwrap_or_default();
        if !r["canary"].is_null() {
            let mut canary = r["canary"].clone();
            canary["is_canary"] = json!(true);
            blocks.push(canary);
        }
        for c in blocks.iter_mut() {
            let name = c["name"].as_str().unwrap_or("?").to_string();
            let (p, k) = (&c["primary"], &c["candidate"]);
            let lat: Vec<(String, Vec<Option<f64>>)> = ["p50_ms", "p95_ms", "p99_ms"]
                .iter()
                .map(|q| (q.trim_end_matches("_ms").to_string(), vec![p[*q].as_f64(), k[*q].as_f64()]))
                .collect();
            let mut rates = vec![(
                "errors".to_string(),
                vec![p["error_rate"].as_f64().map(|x| x * 100.0), k["error_rate"].as_f64().map(|x| x * 100.0)],
            )];
            let mut evaluators: Vec<String> =
                p["eval_fail_rate"].as_object().into_iter().flatten().map(|(e, _)| e.clone()).collect();
            for e in k["eval_fail_rate"].as_object().into_iter().flatten().map(|(e, _)| e) {
                if !evaluators.contains(e) {
                    evaluators.push(e.clone());
                }
            }
            for e in &evaluators {
                rates.push((
                    format!("{e} fail"),
                    vec![
                        p["eval_fail_rate"][e].as_f64().map(|x| x * 100.0),
                        k["eval_fail_rate"][e].as_f64().map(|x| x * 100.0),
                    ],
                ));
            }
            let series = ["primary", name.as_str()];
            c["latency_chart"] =
                json!(charts::grouped_bars(&format!("{route} / {name}: latency"), &series, &lat, " ms"));
            c["rate_chart"] =
                json!(charts::grouped_bars(&format!("{route} / {name}: fail rates"), &series, &rates, "%"));
            c["evaluators"] = json!(evaluators);
        }
        r["blocks"] = json!(blocks);
    }
    c.page(&s, "migrations.html", "migrations", json!({"report": report}))
}

// ------------------------------------------------------------------------------------------
// Review queue

async fn reviews(s: Signed, uri: http::Uri) -> Response {
    let c = &s.console;
    let q: Vec<(String, String)> = form(uri.query().unwrap_or("").as_bytes());
    let mut api = format!("/admin/reviews?state=pending&limit={REVIEW_PAGE}");
    if let Some(after) = field(&q, "after").filter(|a| !a.is_empty()) {
        api.push_str("&after=");
        api.extend(form_urlencoded::byte_serialize(after.as_bytes()));
    }
    let a = c.api(Method::GET, &api, None).await;
    if !a.status.is_success() {
        return c.list_error(&a, &s, "Reviews");
    }
    let list = a.json();
    let done = field(&q, "done").map(str::to_string);
    c.page(&s, "reviews.html", "reviews", json!({"list": list, "done": done, "after": field(&q, "after")}))
}

async fn review_image(s: Signed, Path((id, index)): Path<(String, String)>) -> Response {
    let c = &s.console;
    let a = c.api(Method::GET, &format!("/admin/reviews/{}/images/{}", enc(&id), enc(&index)), None).await;
    if !a.status.is_success() {
        return c.api_error(&a, &s);
    }
    let mut r = (StatusCode::OK, a.body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, a.content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")));
    r
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn decide(s: Signed, Path((id, verb)): Path<(String, String)>, body: Bytes) -> Response {
    let f = form(&body);
    if let Some(refused) = csrf_refusal(&s, &f) {
        return refused;
    }
    let c = &s.console;
    if verb != "approve" && verb != "reject" {
        return c.message(StatusCode::NOT_FOUND, "Not found", "A review is approved or rejected.", Some(&s));
    }
    let reason = field(&f, "reason").map(str::trim).filter(|r| !r.is_empty());
    let a = c
        .api(
            Method::POST,
            &format!("/admin/reviews/{}/{verb}", enc(&id)),
            Some(json!({"reviewer": s.session.reviewer, "reason": reason})),
        )
        .await;
    if !a.status.is_success() {
        return c.api_error(&a, &s);
    }
    let done = format!("{}:{}", if verb == "approve" { "approved" } else { "rejected" }, id);
    see_other(&format!("/console/reviews?done={}", enc(&done)))
}

// ------------------------------------------------------------------------------------------
// Traces

/// The trace list's filters, as the store takes them.
const TRACE_FILTERS: [&str; 10] =
    ["route", "tenant", "cohort", "template", "asset_type", "provider", "decision", "verdict", "since", "until"];

async fn traces(s: Signed, uri: http::Uri) -> Response {
    let c = &s.console;
    let q = form(uri.query().unwrap_or("").as_bytes());
    let mut filters = serde_json::Map::new();
    let mut api = String::new();
    for name in TRACE_FILTERS {
        if let Some(v) = field(&q, name).map(str::trim).filter(|v| !v.is_empty()) {
            filters.insert(name.into(), json!(v));
            api.push_str(&format!("&{name}={}", enc(v)));
        }
    }
    // Passed on as written: the API checks it, and the page shows its error (an out-of-range
    // limit silently replaced would list another page than the one asked for).
    if let Some(limit) = field(&q, "limit").map(str::trim).filter(|l| !l.is_empty()) {
        api.push_str(&format!("&limit={}", enc(limit)));
    }
    let filter_query = api.clone();
    if let Some(cursor) = field(&q, "cursor").filter(|v| !v.is_empty()) {
        api.push_str(&format!("&cursor={}", enc(cursor)));
    }
    let limit = if api.contains("&limit=") { String::new() } else { format!("&limit={TRACE_PAGE}") };
    let a = c.api(Method::GET, &format!("/admin/traces?{}{api}", limit.trim_start_matches('&')), None).await;
    if a.status == StatusCode::BAD_REQUEST {
        return c.page(
            &s,
            "traces.html",
            "traces",
            json!({"filters": filters, "error": a.error_message(), "list": {"data": []}}),
        );
    }
    if !a.status.is_success() {
        return c.list_error(&a, &s, "Traces");
    }
    let mut list = a.json();
    for r in list["data"].as_array_mut().into_iter().flatten() {
        let attempts: Vec<String> = r["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{}:{}", a["provider"].as_str().unwrap_or("?"), a["result"].as_str().unwrap_or("?")))
            .collect();
        r["attempts_summary"] = json!(attempts.join(", "));
    }
    let next = list["next_cursor"]
        .as_str()
        .map(|cur| format!("/console/traces?{}&cursor={}", filter_query.trim_start_matches('&'), enc(cur)));
    c.page(
        &s,
        "traces.html",
        "traces",
        json!({"filters": filters, "list": list, "next": next, "first": filter_query.trim_start_matches('&')}),
    )
}

async fn trace(s: Signed, Path(id): Path<String>, uri: http::Uri) -> Response {
    let c = &s.console;
    let span = form(uri.query().unwrap_or("").as_bytes()).into_iter().find(|(k, _)| k == "span_id").map(|(_, v)| v);
    let mut path = format!("/admin/traces/{}", enc(&id));
    if let Some(span) = &span {
        path.push_str(&format!("?span_id={}", enc(span)));
    }
    let a = c.api(Method::GET, &path, None).await;
    if !a.status.is_success() {
        return c.api_error(&a, &s);
    }
    let rec = a.json();
    let spans: Vec<charts::Span> = rec["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let result = a["result"].as_str().unwrap_or("?");
            charts::Span {
                label: format!(
                    "{} {} {}",
                    a["role"].as_str().unwrap_or("?"),
                    a["provider"].as_str().unwrap_or("?"),
                    a["model"].as_str().unwrap_or("")
                ),
                start_ms: a["start_offset_ms"].as_f64().unwrap_or(0.0),
                duration_ms: a["latency_ms"].as_f64().unwrap_or(0.0),
                class: usize::from(result != "ok"),
                note: format!("{result} {:.0} ms", a["latency_ms"].as_f64().unwrap_or(0.0)),
            }
        })
        .collect();
    let timeline = charts::timeline("Attempts", &spans, rec["duration_ms"].as_f64().unwrap_or(0.0));
    let mut evaluations = Vec::new();
    for (n, a) in rec["attempts"].as_array().into_iter().flatten().enumerate() {
        for e in a["evaluations"].as_array().into_iter().flatten() {
            let mut e = e.clone();
            e["attempt"] = json!(n + 1);
            e["provider"] = a["provider"].clone();
            evaluations.push(e);
        }
    }
    // Held images are kept in the review queue while pending, and after approval for the
    // route's review time.
    let held = rec["review"]["image_count"].as_u64().unwrap_or(0);
    let kept = matches!(rec["review"]["state"].as_str(), Some("pending" | "approved"));
    let held_images: Vec<u64> = if kept { (0..held).collect() } else { Vec::new() };
    c.page(
        &s,
        "trace.html",
        "traces",
        json!({"rec": rec, "timeline": timeline, "evaluations": evaluations, "held_images": held_images, "raw": serde_json::to_string_pretty(&rec).unwrap_or_default()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let env = templates();
        for t in [
            "signin.html",
            "message.html",
            "overview.html",
            "routes.html",
            "migrations.html",
            "reviews.html",
            "traces.html",
            "trace.html",
        ] {
            env.get_template(t).unwrap();
        }
    }

    /// A client sending a new `x-acc-cohort` on every request cannot grow the overview: past 20
    /// cohorts (no list in the policy) the rest are `other`; with a list, unlisted ones are.
    #[test]
    fn the_overview_shows_a_bounded_number_of_cohorts() {
        let row = |c: Option<&str>, n: u64| CountRow {
            bucket: 0,
            cohort: c.map(str::to_string),
            decision: "pass".into(),
            requests: n,
            eval_failed: 0,
        };
        let names: Vec<String> = (0..2000).map(|i| format!("spam-{i}")).collect();
        let mut day: Vec<CountRow> = names.iter().map(|c| row(Some(c), 1)).collect();
        day.push(row(Some("beta"), 50));
        day.push(row(None, 7));
        let mut hour = vec![row(Some("beta"), 5), row(Some("spam-7"), 1)];
        bound_cohorts(&mut day, &mut hour, &Default::default());
        let shown: std::collections::BTreeSet<Option<&str>> = day.iter().map(|r| r.cohort.as_deref()).collect();
        // beta (most requests), 19 of the one-request cohorts, other, and none.
        assert_eq!(shown.len(), MAX_OVERVIEW_COHORTS + 2, "{shown:?}");
        assert!(shown.contains(&Some("beta")) && shown.contains(&Some("other")) && shown.contains(&None));
        assert_eq!(day.iter().filter(|r| r.cohort.as_deref() == Some("other")).map(|r| r.requests).sum::<u64>(), 1981);
        assert_eq!(hour[0].cohort.as_deref(), Some("beta"));

        let listed: std::collections::BTreeSet<String> = ["beta".to_string()].into();
        let mut day = vec![row(Some("beta"), 3), row(Some("spam-1"), 1), row(None, 1)];
        bound_cohorts(&mut day, &mut [], &listed);
        let got: Vec<Option<&str>> = day.iter().map(|r| r.cohort.as_deref()).collect();
        assert_eq!(got, [Some("beta"), Some("other"), None]);
    }

    #[test]
    fn next_stays_in_the_console() {
        assert_eq!(safe_next(Some("/console/traces?x=1")), "/console/traces?x=1");
        assert_eq!(safe_next(Some("https://evil.example/")), "/console/");
        assert_eq!(safe_next(Some("//evil.example/console/")), "/console/");
        assert_eq!(safe_next(None), "/console/");
        // A control character would drop the Location header; dot segments leave the console.
        assert_eq!(safe_next(Some("/console/\r\nSet-Cookie: x=1")), "/console/");
        assert_eq!(safe_next(Some("/console/a b")), "/console/");
        assert_eq!(safe_next(Some("/console/\u{2028}")), "/console/");
        assert_eq!(safe_next(Some("/console/../admin/routes")), "/console/");
        assert_eq!(safe_next(Some("/console/%2E%2e/admin")), "/console/");
        assert_eq!(safe_next(Some("/console/traces?route=a..b")), "/console/traces?route=a..b");
    }

    /// Text from clients is shown with its bidirectional controls visible: a prompt with U+202E
    /// cannot read reversed to a reviewer. Markup the console makes itself is left alone.
    #[test]
    fn bidirectional_controls_are_shown_not_obeyed() {
        let mut env = templates();
        env.add_template("t.html", "<td>{{ prompt }}</td><td>{{ chart }}</td>").unwrap();
        let ctx = minijinja::context! {
            prompt => "a cat \u{202E}gnp.exe\u{202C} <b>",
            chart => minijinja::Value::from_safe_string("<svg>\u{200F}</svg>".into()),
        };
        let html = env.get_template("t.html").unwrap().render(ctx).unwrap();
        assert_eq!(html, "<td>a cat [U+202E]gnp.exe[U+202C] &lt;b&gt;</td><td><svg>\u{200F}</svg></td>");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(fmt_age(5.0), "5s");
        assert_eq!(fmt_age(125.0), "2m 5s");
        assert_eq!(fmt_age(7300.0), "2h 1m");
    }
}
