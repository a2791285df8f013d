//! Agent Command Center (ACC): a gateway in front of image-generation providers.
//!
//! # Layout
//! Every module, from the highest layer to the lowest. A module may import (`use crate::...`)
//! only modules listed below it, never one above it or itself through another: imports run
//! downward and there are no cycles. Each line says what the module owns, then, after "Uses",
//! exactly which modules it imports. `tests/layers.rs` reads every `crate::` and `super::` path
//! in `gateway/src` and fails on an arrow that points up and on a "Uses" list that differs from
//! the code; a new module goes into this list at its layer.
//!
//! ## Commands (run by `main.rs`, beside the gateway)
//! - [`gate`]: `acc gate`, the release gate: eval-fail, thumbs-down and regeneration rates by
//!   cohort over a window, from Prometheus (the same PromQL as the recording rules) or from
//!   the trace store, against thresholds; pass, fail or cannot decide. Uses `body`, `store`,
//!   `upstream`.
//!
//! ## Listeners and endpoints
//! - [`server`]: start-up, the two listeners, proxy workers, edge layers (panic catcher, load
//!   shedding), signals and the drain on shutdown, the trace writer's start and flush. Uses
//!   `admin`, `app`, `cluster`, `error`, `eval`, `metrics`, `policy`, `proxy`, `reload`, `sched`,
//!   `secrets`, `store`, `telemetry`, `tls`.
//! - [`admin`]: the admin listener's endpoints (metrics, probes, reload, policy, route and mirror
//!   views, trace queries with their feedback; the review endpoints through `review_api`; the
//!   console's routes merged in; provider resets). Uses `app`, `cluster`, `console`, `error`,
//!   `feedback`, `health`, `metrics`, `mirror`, `policy`, `proxy`, `request`, `review_api`,
//!   `secrets`, `store`.
//! - [`console`]: the ops console at `/console/` on the admin listener: sign-in sessions with
//!   CSRF tokens, server-rendered pages (templates and assets under `gateway/console/`, in the
//!   binary) over the admin API's own handlers, called in process, and the store's overview
//!   aggregates; charts as inline SVG. Uses `app`, `policy`, `store`.
//! - [`proxy`]: the OpenAI Images endpoints; one request's pipeline read top to bottom in numbered
//!   phases (authenticate, parse, limits, route, plan, mirrors, attempts, cost, answer, record),
//!   plus `Idempotency-Key` handling. Uses `answer`, `app`, `artifacts`, `attempt`, `body`,
//!   `cluster`, `cost`, `error`, `eval`, `feedback`, `idempotency`, `intake`, `limits`, `live`,
//!   `metrics`, `migration`, `policy`, `providers`, `reload`, `request`, `review_api`, `routing`,
//!   `secrets`, `sign`, `store`, `stream`, `telemetry`, `trace`. Also `POST /v1/feedback`
//!   (authenticated like the image endpoints).
//!
//! ## One request's phases (called by `proxy`, never calling back)
//! - [`review_api`]: human review over HTTP: the hold phase (a winning answer whose checks say
//!   "review" is stored and answered `pending_review`), the client's poll
//!   `GET /v1/images/reviews/{id}`, and the reviewers' `/admin/reviews` endpoints. Uses
//!   `answer`, `app`, `artifacts`, `error`, `policy`, `providers`, `request`, `review`, `store`,
//!   `trace`.
//! - [`sign`]: the provenance phase: the winning answer's images signed (C2PA manifest and
//!   IPTC XMP through `provenance`) after the decision, before they are answered, held or kept
//!   for replay; `fail_open`/`fail_closed` and `acc_provenance_total`. Uses `app`, `error`,
//!   `policy`, `provenance`, `providers`, `request`, `routing`.
//! - [`migration`]: the request's part in a migration: canary draw, mirror copies started on
//!   the mirrors' runtime, the primary's outcome handed to them. Uses `app`, `attempt`,
//!   `compare`, `cost`, `eval`, `evaluation`, `mirror`, `policy`, `providers`, `reload`,
//!   `request`, `routing`, `trace`.
//! - [`trace`]: the request's trace record, drafted once routed (a mirror's too), completed with its attempts,
//!   images and outcome, handed to the store's writer; the client's `traceparent`. Uses
//!   `answer`, `attempt`, `policy`, `providers`, `request`, `routing`, `store`.
//! - [`attempt`]: one attempt on one target: capabilities, admission (pause, breaker, through
//!   the snapshot's `live` state), slot, adapter call, breaker and health feedback, URL fetch,
//!   evaluation, the attempt's note for the trace and its `traceparent`. Uses `app`, `eval`,
//!   `evaluation`, `fetch`, `health`, `policy`, `providers`, `reload`, `request`, `routing`,
//!   `telemetry`, `upstream`.
//! - [`evaluation`]: a route's `[eval]` policy applied to one attempt's images: evaluators on
//!   the pool under the budget, then pass, flag, fall back or block. Uses `app`, `eval`,
//!   `policy`, `provenance`, `providers`, `request`.
//! - [`cost`]: what attempts cost at the providers' prices (estimate and charges). Uses `app`,
//!   `policy`, `providers`, `request`, `routing`.
//! - [`stream`]: the answer to a `stream: true` request as server-sent events in OpenAI's
//!   shapes: partial images relayed live while attempts run (routes that do not evaluate),
//!   the winner's own events relayed, or one completed event per image built from a plain
//!   answer; an `error` event when a live stream fails. Uses `answer`,
//!   `body`, `providers`, `request`.
//! - [`answer`]: the answer body in the client's `response_format`, the OpenAI-shaped error
//!   when every attempt failed, and the names of the `x-acc-*` response headers. Uses `app`,
//!   `body`, `error`, `policy`, `providers`, `request`, `routing`.
//!
//! ## The running gateway's state (request-independent, shared by both listeners)
//! - [`app`]: `App`, the state every endpoint takes as `Arc<App>`, and its in-flight guard. Uses
//!   `artifacts`, `cluster`, `eval`, `feedback`, `idempotency`, `intake`, `limits`, `metrics`,
//!   `reload`, `review`, `store`.
//! - [`feedback`]: ratings of traces (`POST /v1/feedback`, checked and stored, tenant by
//!   tenant), regenerations (explicit links and implicit detection over a bounded memory of
//!   recent prompts), the newest traces' essentials in memory. Uses `error`, `metrics`,
//!   `policy`, `request`, `store`.
//! - [`review`]: the review queue: held answers in the store within a byte budget, decisions
//!   (once), expiry, the signed webhook, the review metrics. Uses `policy`, `reload`, `secrets`,
//!   `store`, `upstream`.
//! - [`reload`]: the live policy snapshot (policy, adapters, metric handles, target state),
//!   prepared completely, then swapped atomically on poll, SIGHUP or admin reload. Uses `live`,
//!   `metrics`, `mirror`, `policy`, `providers`.
//! - [`live`]: provider and target state learnt while running, kept across reloads: breakers,
//!   429 pauses, concurrency slots, health windows; admission and feedback of attempts; the
//!   exchange of pauses (and opened breakers) with other replicas. Uses `cluster`, `health`,
//!   `metrics`, `policy`, `providers`, `routing`.
//! - [`routing`]: route selection, the weighted attempt plan (`Step`), the fallback loop with
//!   hedging (pure over the policy, generic over the attempt). Uses `error`, `policy`,
//!   `providers`.
//! - [`fetch`]: SSRF-guarded fetching of provider image URLs. Uses `policy`, `providers`,
//!   `upstream`.
//! - [`mirror`]: mirror and canary state (sampling, caps, guards, the report). Uses `cluster`,
//!   `compare`, `limits`, `policy`.
//! - [`limits`]: rate limits per key and tenant, spend per tenant per day (`DailyBudget`), in
//!   memory or shared through `cluster`. Uses `cluster`, `error`, `metrics`, `policy`.
//! - [`cluster`]: state shared by every replica through Redis (`[cluster]`): rate limits (one
//!   GCRA script), daily spend holds, `Idempotency-Key` leases and answers, 429 pauses and
//!   opened breakers; every call under a deadline, with the local fallback's bookkeeping
//!   (`acc_cluster_errors_total`, the mode `/readyz` shows). Uses `error`, `idempotency`
//!   (`Stored`), `policy`, `secrets`.
//! - [`artifacts`]: images the gateway serves itself for `response_format = "url"`. Uses
//!   `error`, `metrics`.
//! - [`metrics`]: the Prometheus registry and per-route metric handles. Uses `policy`.
//! - [`telemetry`]: OTLP export of finished trace records as spans in the OpenTelemetry GenAI
//!   conventions (bounded queue, one batching task, losses counted), W3C `traceparent` read from
//!   clients and written for providers, the attribute names. Uses `store`, `upstream` (its TLS
//!   streams).
//! - [`store`]: the trace record, its database (SQLite or PostgreSQL), the batching writer
//!   and the trace queries. Uses `body` (a pending image's base64, as the answer's pieces),
//!   `sched` (the writer's CPU priority).
//!
//! ## Adapters
//! - [`providers`]: the adapter trait, `Generation`/`Image`/`ProviderError`, and one adapter per
//!   API family. Uses `body`, `eval`, `policy`, `request`, `secrets`, `upstream`.
//!
//! ## Policy
//! - [`policy`]: policy files read raw, validated into runtime types, cross-checked. Uses the
//!   plain data types it configures: `compare`, `eval`, `health`, `request`; `provenance` to
//!   load and check the signing credentials of `[provenance]`, and `tls` the listeners'
//!   certificates.
//!
//! ## Evaluators and the request model
//! - [`eval`]: the evaluators (sanity, safety, text, adherence) and their thread pool;
//!   `Verdict` and evaluator settings. Uses `request`.
//! - [`request`]: the client's request parsed and checked into `GenerationRequest`, with its
//!   plain data types (`Size`, `Operation`, `Param`) and the prompt contract. Uses `error`.
//!
//! ## Foundations (plain data and I/O helpers)
//! - [`provenance`]: C2PA manifests (the `c2pa` crate) and IPTC XMP: signing credentials
//!   loaded and self-tested, one image signed with the trace's facts, an image's provenance
//!   read back and checked (`acc provenance`). Uses nothing.
//! - [`upstream`]: per-thread HTTP/1.1 connections to providers, driven by the request. Uses
//!   `body`, `health` (`Retry-After`).
//! - [`idempotency`]: `Idempotency-Key` leases and answers kept for replay. Uses nothing.
//! - [`intake`]: memory for request bodies being received (all requests together) and each
//!   tenant's requests in flight. Uses nothing.
//! - [`health`]: health windows with hysteresis, the breaker state machine, `Retry-After`. Uses
//!   nothing.
//! - [`compare`]: the statistics of mirror and canary comparisons. Uses nothing.
//! - [`body`]: response bodies made of `Bytes` chunks (payloads are not copied). Uses nothing.
//! - [`error`]: `ApiError`, the OpenAI-shaped error every failure becomes. Uses nothing.
//! - [`tls`]: the listeners' TLS (rustls): the certificate and key checked, served, and
//!   reloaded when their files change. Uses nothing.
//! - [`sched`]: the CPU priority of background threads (`SCHED_IDLE`, nice ~10). Uses
//!   nothing.
//! - [`secrets`]: every secret the gateway holds, registered where it is read, and the
//!   redaction of text that may echo one. Uses nothing.
//!
//! # Where the next parts go
//! Each is a new module at the layer named, so an issue adds files, not tangles:
//! - trace records and their store (SQLite, PostgreSQL): `trace` (the record a request builds,
//!   a phase module beside `answer`) over `store` (the writer task and both backends, a state
//!   module below `app`, with migrations in `gateway/migrations/`).
//! - telemetry export (OTLP spans in the GenAI conventions): `telemetry`, a state module below
//!   `app`, fed by `trace`; attribute names as constants there.
//! - review queue: `review` (withheld images, decisions, expiry; state, below `app`), polled by
//!   a `proxy` endpoint and decided through `admin`; feedback and regenerations in `feedback`.
//! - provenance (C2PA manifests, IPTC metadata): done as `provenance` (a foundation, so that
//!   `policy` can check credentials) and the phase `sign`, called by `proxy` before `answer`.
//! - shared state across replicas (Redis): `cluster` (done), a state module above `metrics`
//!   with a local fallback, used by `limits`, `mirror`, `live`, `proxy` (idempotency) and
//!   `admin`; `idempotency` stays the in-memory store it falls back to.
//! - the ops console: done as `console`, an endpoint module below `admin` (whose router merges
//!   it), with its templates and assets under `gateway/console/`.
#![forbid(unsafe_code)]
// ApiError is returned on the cold path only (a request that is refused); boxing it would cost
// an allocation on every error for no gain on the hot path.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod answer;
pub mod app;
pub mod artifacts;
pub mod attempt;
pub mod body;
pub mod cluster;
pub mod compare;
pub mod console;
pub mod cost;
pub mod error;
pub mod eval;
pub mod evaluation;
pub mod feedback;
pub mod fetch;
pub mod gate;
pub mod health;
pub mod idempotency;
pub mod intake;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod migration;
pub mod mirror;
pub mod policy;
pub mod provenance;
pub mod providers;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod review;
pub mod review_api;
pub mod routing;
pub mod sched;
pub mod secrets;
pub mod server;
pub mod sign;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod upstream;

/// Locks a mutex, taking over one a panicking thread poisoned: the state guarded with it
/// (counters, windows, caches) stays usable after a panic elsewhere.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most a PEM file a policy or a command line names may hold (certificate chains, keys,
/// trust anchors: a whole public root-store bundle is a few hundred kilobytes).
const MAX_PEM_BYTES: u64 = 4 << 20;

/// A PEM file a policy or a command line names (TLS and signing certificates and keys, trust
/// anchors): [`read_bounded`] at [`MAX_PEM_BYTES`], with its errors.
pub fn read_pem_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    read_bounded(path, MAX_PEM_BYTES)
}

/// Reads a file a policy or a command line names (a certificate, a key, a policy file), at
/// most `max` bytes. Errors (as `io::Error`, its message for the user): the file is missing
/// or unreadable, is not a regular file (a device such as `/dev/zero`, a FIFO, a directory:
/// reading one would never end, or block), or holds more than `max` bytes. Symbolic links are
/// followed (Kubernetes mounts ConfigMaps and Secrets through them).
pub fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a device or a pipe)" };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    }
    let too_large = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes or more, over the {max} bytes such a file may have"),
        )
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(path)?, max + 1), &mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

/// `s` cut to its first `chars` characters, at a character boundary (a text of at most that
/// many bytes is copied as it is, without walking its characters): header and field values
/// kept in records and feedback.
pub(crate) fn cut(s: &str, chars: usize) -> String {
    if s.len() <= chars {
        return s.to_string();
    }
    match s.char_indices().nth(chars) {
        Some((end, _)) => s[..end].to_string(),
        None => s.to_string(),
    }
}

/// A control character free text (a comment, a review's reason) may not hold: any but line
/// feed, carriage return and tab. NUL above all: PostgreSQL's text refuses it, so the row would
/// fail to store.
pub(crate) fn is_stray_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\n' | '\r' | '\t')
}

/// The Unicode bidirectional formatting characters (UAX #9, "Explicit Directional Embeddings,
/// Overrides and Isolates", and the implicit marks): text holding U+202E RIGHT-TO-LEFT OVERRIDE
/// shows reversed wherever it is displayed (the console, a terminal reading the logs).
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// `s` as a log line may carry it: control characters (CR, LF, NUL, ESC, ...), Unicode's
/// bidirectional controls ([`is_bidi_control`]) and its line and
/// paragraph separators written as `\u{...}` escapes, so that text from a request (a contract's
/// clause, what OCR read) can neither start a forged log line nor reorder one on a terminal.
/// Borrowed when nothing needs escaping.
pub fn log_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}');
    if !s.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if escaped(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A formatted log line as [`log_safe`] writes text, for the whole line at once: every log
/// line passes through this before it is written, so text from outside (a provider's URL or
/// message, a client's field) that reaches a log line by any path can neither forge a line nor
/// reorder one. With `keep_sgr` (colours on a terminal) the colour sequences the formatter
/// writes (`ESC [ digits/semicolons m`, ECMA-48 SGR) pass; every other ESC is escaped.
pub fn log_line_safe(line: &str, keep_sgr: bool) -> std::borrow::Cow<'_, str> {
    if !keep_sgr || !line.contains('\u{1b}') {
        return log_safe(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    let mut rest = line;
    while let Some(at) = rest.find('\u{1b}') {
        out.push_str(&log_safe(&rest[..at]));
        let after = &rest[at + 1..];
        let params =
            after.strip_prefix('[').map(|p| p.bytes().take_while(|b| b.is_ascii_digit() || *b == b';').count());
        match params {
            Some(n) if after.as_bytes().get(1 + n) == Some(&b'm') => {
                out.push('\u{1b}');
                out.push_str(&after[..n + 2]);
                rest = &after[n + 2..];
            }
            _ => {
                out.extend('\u{1b}'.escape_unicode());
                rest = after;
            }
        }
    }
    out.push_str(&log_safe(rest));
    std::borrow::Cow::Owned(out)
}

/// `bytes` as lowercase hex, two digits a byte: ids and digests in trace records, span ids,
/// `traceparent`. `hex::encode` builds its `String` one `char` at a time and `format!("{:x}")`
/// goes through the formatting machinery; each costs a request several times as much.
pub fn hex_lower(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut out).expect("the output is twice the input");
    String::from_utf8(out).expect("hex digits are ASCII")
}
