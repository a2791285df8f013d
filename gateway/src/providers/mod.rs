//! Provider adapters: one trait, one implementation per API family. An adapter maps the
//! normalised [`GenerationRequest`] to its provider's API and the answer back to [`Generation`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;

use crate::body::Rope;
use crate::policy::{ProviderKind, ProviderSpec};
use crate::request::{GenerationRequest, Operation, Param};

pub mod a1111;
pub mod azure;
pub mod builtin;
pub mod errors;
pub mod events;
pub mod fal;
pub mod jobs;
pub mod openai;
pub mod replicate;
pub mod skim;
pub mod stability;
pub mod vertex;

/// One image as the provider gave it. Payloads stay `Bytes` slices of what was received.
#[derive(Debug, Clone)]
pub enum Image {
    /// Validated standard base64 text of the image, usually slices of the upstream body's
    /// pieces (a 2 MB payload spans many; it is forwarded as they are).
    Base64(Rope),
    /// Raw image bytes with their media type.
    Raw { bytes: Bytes, mime: &'static str },
    /// A URL at the provider.
    Url(String),
}

/// The generation settings a provider actually used, as far as it reports them (filled from the
/// request where it does not), for traces and `x-acc-generation`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub sampler: Option<String>,
    /// The model (and version) that generated, when the provider names it.
    pub model: Option<String>,
}

impl Settings {
    /// `seed=7; steps=30; guidance=7.5; sampler=Euler a; model=sdxl` (the caller makes it a
    /// header value).
    pub fn header(&self) -> String {
        use std::fmt::{Display, Write};
        let mut s = String::new();
        let mut put = |k: &str, v: Option<&dyn Display>| {
            if let Some(v) = v {
                let sep = if s.is_empty() { "" } else { "; " };
                let _ = write!(s, "{sep}{k}={v}");
            }
        };
        put("seed", self.seed.as_ref().map(|v| v as &dyn Display));
        put("steps", self.steps.as_ref().map(|v| v as &dyn Display));
        put("guidance", self.guidance.as_ref().map(|v| v as &dyn Display));
        put("sampler", self.sampler.as_ref().map(|v| v as &dyn Display));
        put("model", self.model.as_ref().map(|v| v as &dyn Display));
        s
    }
}

#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub images: Vec<Image>,
    /// What the provider says it used (seed, steps, ...).
    pub settings: Settings,
    /// GPU time the provider reports for the job (priced per GPU-second for some providers).
    pub gpu_seconds: Option<f64>,
    /// Request parameters that were not sent because the provider cannot honour them.
    pub dropped: Vec<&'static str>,
    /// Every evaluator's verdict on every image, when the route evaluates.
    pub verdicts: Vec<crate::eval::Verdict>,
    /// The index of the image each verdict is about, parallel to `verdicts` (a verdict about
    /// the answer as a whole, such as too few images, names the last image).
    pub verdict_images: Vec<usize>,
    /// Why the answer is returned flagged (a failed check whose action is "flag").
    pub flags: Vec<String>,
    /// Fields of the OpenAI Images response object besides `created` and `data`, as the
    /// provider gave them or as its adapter maps its own: `usage` (an object: `input_tokens`,
    /// `output_tokens`, `total_tokens`, `input_tokens_details`), `background`, `output_format`,
    /// `quality`, `size` (strings). Sent to the client as they are (OpenAI Images API
    /// reference, "The image generation response").
    pub answer_fields: Vec<(&'static str, serde_json::Value)>,
    /// Per image, parallel to `images` (shorter when none): the `revised_prompt` the provider
    /// drew from (DALL·E 3's rewrite, Imagen's enhanced prompt).
    pub revised_prompts: Vec<Option<String>>,
    /// Why the answer is withheld for human review (a failed check whose action is "review");
    /// empty when it is not.
    pub review: Vec<String>,
    /// The upstream's server-sent events, when it answered a `stream: true` request with them
    /// (OpenAI kind): relayed to a streaming client as they were sent.
    pub streamed: Option<Streamed>,
    /// Images the provider returned beyond the request's `n`, left out of the answer (OpenAI's
    /// `n` is the number of images returned) but billed by the provider: charged as discarded.
    pub surplus: u32,
    /// Errors of the provider's calls that made no image, for an adapter that makes one call per
    /// image (Stability) when other calls did: the attempt returns the images it got, a 429's
    /// `Retry-After` still pauses the provider, and the `sanity` evaluator's "fewer images than
    /// asked" reason names the first of these. Secrets are already taken out
    /// ([`ProviderError::redacted`]).
    pub partial_errors: Vec<std::sync::Arc<ProviderError>>,
}

/// The events of an upstream image stream, each the JSON object of one `data:` line, in the
/// order they came: `image_generation.partial_image` / `image_edit.partial_image` events, then
/// one `*.completed` event per image (OpenAI Images API reference, "Image generation
/// streaming events").
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub partials: Vec<serde_json::Value>,
    pub completed: Vec<serde_json::Value>,
}

/// The OpenAI response object's `output_format` field for a provider that names each image's
/// format another way (a MIME type, a file extension): `png`, `jpeg` or `webp` when every image
/// has the same one, else no field (`image/jpg` and `.jpg` count as jpeg).
pub fn output_format_field<'a>(
    formats: impl IntoIterator<Item = Option<&'a str>>,
) -> Vec<(&'static str, serde_json::Value)> {
    let name = |f: &str| -> Option<&'static str> {
        match f.trim().trim_start_matches("image/").to_ascii_lowercase().as_str() {
            "png" => Some("png"),
            "jpeg" | "jpg" => Some("jpeg"),
            "webp" => Some("webp"),
            _ => None,
        }
    };
    let mut seen: Option<&'static str> = None;
    for f in formats {
        match (f.and_then(name), seen) {
            (None, _) => return Vec::new(),
            (Some(n), Some(s)) if n != s => return Vec::new(),
            (Some(n), _) => seen = Some(n),
        }
    }
    seen.map(|n| vec![("output_format", serde_json::Value::String(n.into()))]).unwrap_or_default()
}

/// The response object's top-level fields besides `created` and `data`, in OpenAI's order.
pub const ANSWER_FIELDS: [&str; 5] = ["background", "output_format", "quality", "size", "usage"];

/// Whether a provider's answer field `k` (one of [`ANSWER_FIELDS`]) has the shape OpenAI's
/// Images API gives it, to be passed on: a string, or for `usage` an object whose token
/// counts (`input_tokens`, `output_tokens`, `total_tokens`, and `image_tokens`/`text_tokens`
/// in `input_tokens_details` and `output_tokens_details`) are non-negative integers where
/// present. A field out of shape is left out of the client's answer (an SDK would read
/// `1e308` or `"lots"` as a token count), not an error: the images are good.
pub fn well_formed_answer_field(k: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value;
    if k != "usage" {
        return v.is_string();
    }
    let counts =
        |o: &serde_json::Map<String, Value>, names: &[&str]| names.iter().all(|n| o.get(*n).is_none_or(|x| x.is_u64()));
    let Some(usage) = v.as_object() else { return false };
    counts(usage, &["input_tokens", "output_tokens", "total_tokens"])
        && ["input_tokens_details", "output_tokens_details"].iter().all(|d| match usage.get(*d) {
            None | Some(Value::Null) => true,
            Some(Value::Object(o)) => counts(o, &["image_tokens", "text_tokens"]),
            Some(_) => false,
        })
}

/// Runs every adapter's answer parsers (success and error, each documented shape) on an
/// untrusted `body` with `status`, dropping the results: the entry point of the fuzz targets
/// (`tests/fuzz`). Whatever the bytes, it returns; a panic is a bug.
pub fn parse_untrusted(status: u16, body: &Bytes) {
    let status = StatusCode::from_u16(status.clamp(100, 999)).unwrap_or(StatusCode::BAD_GATEWAY);
    openai::untrusted(status, body);
    azure::untrusted(status, body);
    vertex::untrusted(status, body);
    stability::untrusted(status, body);
    fal::untrusted(status, body);
    replicate::untrusted(status, body);
    a1111::untrusted(status, body);
    // The skim reads an answer in the pieces it arrived in: the same bytes cut in three must
    // read the same as whole.
    // Each long string is judged as base64 the same either way, and as a full check judges it.
    let (a, b) = (body.len() / 3, body.len() * 2 / 3);
    let cut = Rope::from(vec![body.slice(..a), body.slice(a..b), body.slice(b..)]);
    match (skim::skim(&Rope::from(body.clone())), skim::skim(&cut)) {
        (Ok(whole), Ok(cut)) => {
            assert_eq!(whole.remainder, cut.remainder, "an answer cut in pieces reads differently");
            for n in 0..whole.long_strings() {
                let key = format!("\u{0}{n}");
                let judged = |raw| skim::base64_value(raw).map(|r: Rope| r.to_bytes());
                let full = match whole.resolve(&key) {
                    skim::Raw::Base64(span) => skim::Raw::Span(span),
                    other => other,
                };
                let (w, c) = (judged(whole.resolve(&key)), judged(cut.resolve(&key)));
                assert_eq!(w, c, "long string {n} judged differently when cut");
                assert_eq!(w, judged(full), "long string {n} judged differently from a full check");
            }
        }
        (Err(_), Err(_)) => {}
        (w, c) => panic!("an answer cut in pieces reads differently: {:?} / {:?}", w.is_ok(), c.is_ok()),
    }
    let _ = sniff_image(body);
}

/// The longest image URL a provider may answer with, in bytes: signed cloud storage URLs
/// (S3 presigned with a session token, GCS V4, Azure SAS) run to a few kilobytes; browsers and
/// CDNs commonly cap URLs at 8 KiB.
pub const MAX_IMAGE_URL_BYTES: usize = 8192;

/// What one attempt asks of a provider.
pub struct AttemptRequest<'a> {
    pub req: &'a GenerationRequest,
    /// The provider's model name for this target: the target's `model`, or the client's alias.
    pub model: &'a str,
    /// The target's own `model`, when the policy names one (no alias fallback).
    pub target_model: Option<&'a str>,
    /// Parameters of the request this provider cannot honour, dropped by policy: the adapter
    /// must not send them.
    pub dropped: &'a [Param],
    /// Where the provider's image URLs may be fetched from.
    pub fetch: &'a crate::policy::FetchPolicy,
    /// Where a streaming attempt's partial images go as they arrive (`stream: true` with
    /// `partial_images` on a target whose route does not evaluate); `None` keeps them in the
    /// answer's [`Streamed`] only.
    pub partials: Option<&'a std::sync::Arc<events::LiveTap>>,
}

impl AttemptRequest<'_> {
    /// Whether `p` is to be sent (present in the request and not dropped).
    pub fn sends(&self, p: Param) -> bool {
        !self.dropped.contains(&p) && self.req.has(p)
    }
}

/// Stands in for what a provider wrote in [`ProviderError::text_without_provider_message`].
pub const PROVIDER_TEXT_WITHHELD: &str = "the provider's message is withheld: it may quote the prompt";

/// [`ProviderError::TimeoutAfterAnswer`]: the provider's 2xx answer was still arriving.
pub const ANSWER_STILL_ARRIVING: &str =
    "the provider was still sending its answer (its images were made) at the attempt's deadline";
/// [`ProviderError::TimeoutAfterAnswer`]: the images were still being evaluated.
pub const EVALUATION_UNFINISHED: &str =
    "the provider answered, but evaluation of its images did not finish before the attempt's deadline";

/// Why an attempt failed. Each variant says whether trying another target makes sense.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("connect error: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    /// The attempt's deadline (`attempt_timeout_ms`) ran out after the provider had made the
    /// images: its 2xx answer was still arriving ([`ANSWER_STILL_ARRIVING`], a provider that
    /// answers a generation in one call), or the route's evaluators had not judged them yet
    /// ([`EVALUATION_UNFINISHED`]). Answered as a timeout (504 when it decides), but unlike
    /// [`ProviderError::Timeout`] the provider billed the images: charged as discarded.
    #[error("timed out: {0}")]
    TimeoutAfterAnswer(&'static str),
    #[error("upstream answered {status}: {message}")]
    Status { status: StatusCode, message: String, retry_after: Option<std::time::Duration> },
    /// The upstream refused the request itself (a 4xx that is the client's fault). Returned to
    /// the client as is and never retried: another provider would refuse it too, and it costs.
    #[error("upstream rejected the request with {status}")]
    Rejected { status: StatusCode, body: Bytes },
    #[error("bad response: {0}")]
    BadResponse(String),
    /// An artifact failed an evaluator whose action is "fallback": try the next target.
    #[error("evaluation failed: {0}")]
    EvalFailed(String),
    /// An artifact failed an evaluator whose action is "block": the request ends here.
    #[error("blocked by policy: {0}")]
    Blocked(String),
    #[error("missing credential: {0}")]
    Credential(String),
    /// The connection broke after it was made (reset, closed mid-answer).
    #[error("transport error: {0}")]
    Transport(String),
    #[error("{0}")]
    Other(String),
    /// Not sent: the provider's breaker is open (`breaker_open`) or it asked to be left alone
    /// after a 429 (`paused`); it may be tried again after `retry_in`.
    #[error("not tried: {label}, for another {} ms", retry_in.as_millis())]
    Skipped { label: &'static str, retry_in: std::time::Duration },
    /// Every concurrency slot of the provider is taken and its wait queue is full.
    #[error("the provider's concurrency limit and wait queue are full")]
    QueueFull,
    #[error("waited too long for a free slot on the provider")]
    QueueTimeout,
    /// The queue is full, or the wait for a slot ran past `queue_timeout_ms` (`timed_out`), and
    /// the provider's policy says to refuse rather than fall back (`on_queue_full = "reject"`).
    #[error("the provider is at its concurrency limit and {}", ProviderError::busy_reason(*timed_out))]
    Busy { timed_out: bool },
    /// A hedged attempt that lost the race and was cancelled.
    #[error("cancelled: another attempt answered first")]
    HedgeCancelled,
    /// This provider kind cannot do what the request asks (an edit on a generate-only API):
    /// the next target may.
    #[error("not supported by this provider: {0}")]
    Unsupported(String),
    /// The request has parameters this provider cannot honour and its policy says to refuse.
    #[error("unsupported parameters: {0}")]
    UnsupportedParams(String),
    /// The provider's own content filter refused the prompt or the image. Answered like
    /// OpenAI's 400 content_policy_violation and not retried.
    #[error("the provider's content filter refused it: {0}")]
    ContentFiltered(String),
    /// A URL the provider answered with was not fetched (SSRF guard, size, time).
    #[error("image URL refused: {0}")]
    FetchRefused(String),
    /// The answer was not read whole: the answers being read, all attempts together, would
    /// have passed the gateway's memory for them (`[server] max_answer_buffer_mib`, bytes
    /// here). The gateway's own load, not the provider's fault: the breaker is not told.
    #[error("the gateway's memory for provider answers ({} MiB) is full", .0 >> 20)]
    AnswerMemoryFull(usize),
    /// The provider account or deployment cannot serve: quota, billing, credits, a revoked key
    /// (`provider_wide`), or a model, deployment or region the target names (not provider-wide).
    /// The next target is tried; provider-wide ones count against the breaker. See
    /// [`errors`] for the tables that decide it.
    #[error("the provider account cannot serve ({status}): {message}")]
    Account { status: StatusCode, provider_wide: bool, message: String },
}

impl ProviderError {
    /// The same error with every secret the gateway holds removed from its text and body
    /// ([`crate::secrets::redact`]): applied to every adapter's error before anything reads it,
    /// since a provider may echo the key it was sent.
    pub fn redacted(self) -> ProviderError {
        use crate::secrets::{redact_bytes, redact_string};
        let clean = |mut s: String| {
            redact_string(&mut s);
            s
        };
        match self {
            ProviderError::Connect(m) => ProviderError::Connect(clean(m)),
            ProviderError::Status { status, message, retry_after } => {
                ProviderError::Status { status, message: clean(message), retry_after }
            }
            ProviderError::Rejected { status, body } => {
                let body = match redact_bytes(&body) {
                    std::borrow::Cow::Owned(b) => Bytes::from(b),
                    std::borrow::Cow::Borrowed(_) => body,
                };
                ProviderError::Rejected { status, body }
            }
            ProviderError::BadResponse(m) => ProviderError::BadResponse(clean(m)),
            ProviderError::EvalFailed(m) => ProviderError::EvalFailed(clean(m)),
            ProviderError::Blocked(m) => ProviderError::Blocked(clean(m)),
            ProviderError::Credential(m) => ProviderError::Credential(clean(m)),
            ProviderError::Transport(m) => ProviderError::Transport(clean(m)),
            ProviderError::Other(m) => ProviderError::Other(clean(m)),
            ProviderError::Unsupported(m) => ProviderError::Unsupported(clean(m)),
            ProviderError::UnsupportedParams(m) => ProviderError::UnsupportedParams(clean(m)),
            ProviderError::ContentFiltered(m) => ProviderError::ContentFiltered(clean(m)),
            ProviderError::FetchRefused(m) => ProviderError::FetchRefused(clean(m)),
            ProviderError::Account { status, provider_wide, message } => {
                ProviderError::Account { status, provider_wide, message: clean(message) }
            }
            e @ (ProviderError::Timeout
            | ProviderError::TimeoutAfterAnswer(_)
            | ProviderError::AnswerMemoryFull(_)
            | ProviderError::Skipped { .. }
            | ProviderError::QueueFull
            | ProviderError::QueueTimeout
            | ProviderError::Busy { .. }
            | ProviderError::HedgeCancelled) => e,
        }
    }

    /// Why a [`ProviderError::Busy`] refused: its queue was full, or the wait for a slot ran
    /// past `queue_timeout_ms` (`timed_out`).
    pub fn busy_reason(timed_out: bool) -> &'static str {
        if timed_out {
            "no slot came free within its queue timeout"
        } else {
            "its wait queue is full"
        }
    }

    /// The error's text without anything the provider wrote: a status's message, a content
    /// filter's reason, an account error's message become [`PROVIDER_TEXT_WITHHELD`] (a
    /// provider may quote the prompt, or the word of it that it refused). The status and the
    /// gateway's own words stay. What logs carry, and what trace records and spans keep under
    /// `record_prompt = "sha256"` or `"none"`.
    pub fn text_without_provider_message(&self) -> String {
        match self {
            ProviderError::Status { status, .. } => format!("upstream answered {status} ({PROVIDER_TEXT_WITHHELD})"),
            ProviderError::Rejected { status, .. } => format!("upstream rejected the request with {status}"),
            ProviderError::ContentFiltered(_) => {
                format!("the provider's content filter refused it ({PROVIDER_TEXT_WITHHELD})")
            }
            ProviderError::Account { status, .. } => {
                format!("the provider account cannot serve ({status}) ({PROVIDER_TEXT_WITHHELD})")
            }
            other => other.to_string(),
        }
    }

    /// The error as an API client may read it: what the provider said, but none of the
    /// gateway's internals (the provider's host and port in a connection error, a token
    /// command's output, the gateway's own failures), which only the logs and admin views
    /// carry in full.
    pub fn public_text(&self) -> String {
        match self {
            ProviderError::Connect(_) => "could not connect to the provider".into(),
            ProviderError::Transport(_) => "the connection to the provider failed mid-answer".into(),
            ProviderError::Credential(_) => "the gateway has no usable credential for this provider".into(),
            ProviderError::Other(_) => "the gateway could not make this attempt".into(),
            ProviderError::FetchRefused(_) => "the provider's image URL could not be fetched".into(),
            e => e.to_string(),
        }
    }

    /// Whether the next target should be tried.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            ProviderError::Rejected { .. }
                | ProviderError::Blocked(_)
                | ProviderError::Busy { .. }
                | ProviderError::UnsupportedParams(_)
                | ProviderError::ContentFiltered(_)
        )
    }

    /// A short, bounded label for metrics and the `x-acc-attempts` header.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Connect(_) => "connect_error",
            ProviderError::Timeout | ProviderError::TimeoutAfterAnswer(_) => "timeout",
            ProviderError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => "status_429",
            ProviderError::Status { status, .. } if status.is_server_error() => "status_5xx",
            ProviderError::Status { status, .. } if status.is_client_error() => "status_4xx",
            // A redirect or an informational status is no answer an API client can use: the
            // gateway follows no redirect from a provider's API.
            ProviderError::Status { .. } => "bad_response",
            ProviderError::Rejected { .. } => "status_4xx",
            ProviderError::BadResponse(_) => "bad_response",
            ProviderError::EvalFailed(_) => "eval_failed",
            ProviderError::Blocked(_) => "blocked",
            ProviderError::Credential(_) => "credential_missing",
            ProviderError::Transport(_) => "transport_error",
            ProviderError::Other(_) => "error",
            ProviderError::Skipped { label, .. } => label,
            ProviderError::QueueFull | ProviderError::Busy { timed_out: false } => "queue_full",
            ProviderError::QueueTimeout | ProviderError::Busy { timed_out: true } => "queue_timeout",
            ProviderError::HedgeCancelled => "hedge_cancelled",
            ProviderError::Unsupported(_) => "unsupported",
            ProviderError::UnsupportedParams(_) => "unsupported_params",
            ProviderError::ContentFiltered(_) => "content_filtered",
            ProviderError::FetchRefused(_) => "fetch_refused",
            ProviderError::AnswerMemoryFull(_) => "answer_memory_full",
            ProviderError::Account { .. } => "account_error",
        }
    }
}

impl From<crate::upstream::UpstreamError> for ProviderError {
    fn from(e: crate::upstream::UpstreamError) -> Self {
        use crate::upstream::UpstreamError;
        match e {
            UpstreamError::Connect(m) => ProviderError::Connect(m),
            UpstreamError::Transport(m) => ProviderError::Transport(m),
            UpstreamError::AnswerMemoryFull(max) => ProviderError::AnswerMemoryFull(max),
            e @ UpstreamError::Encoded(_) => ProviderError::BadResponse(e.to_string()),
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError>;

    /// Whether this kind can honour `param` (default: every parameter).
    fn supports(&self, _param: Param) -> bool {
        true
    }

    /// Whether this kind can honour `param` with the value `req` gives it on `model` (default:
    /// [`supports`](Self::supports)); for values only some of a kind's models take, such as
    /// WebP output, which Stability's SD3 endpoint does not offer.
    fn supports_value(&self, param: Param, _model: &str, _req: &GenerationRequest) -> bool {
        self.supports(param)
    }

    /// Whether this kind answers `stream: true` with server-sent events of its own (default:
    /// no; the gateway then builds one completed event from the plain answer, or refuses, as the
    /// provider's `unsupported_stream` says).
    fn streams(&self) -> bool {
        false
    }

    /// Whether a 2xx answer's head means the provider has made (and bills) the images: an
    /// attempt whose deadline passes while such an answer is still arriving is then charged
    /// ([`ProviderError::TimeoutAfterAnswer`]). True (the default) for the kinds that answer a
    /// generation in one call; false for the queue-based ones (fal, Replicate), whose 2xx
    /// answers are submissions and polls.
    fn bills_on_answer(&self) -> bool {
        true
    }

    /// Whether this kind can do `op` (default: generations only).
    fn supports_op(&self, op: Operation) -> bool {
        op == Operation::Generate
    }
}

/// Builds the adapter for a provider of the policy.
pub fn build(spec: &ProviderSpec) -> Arc<dyn Provider> {
    let c = &spec.conn;
    match spec.kind {
        ProviderKind::Builtin => Arc::new(builtin::Builtin),
        ProviderKind::OpenAi => Arc::new(openai::OpenAi::new(&c.base_url, c.api_key_env.as_deref(), c.upstream_format)),
        ProviderKind::AzureOpenAi => Arc::new(azure::Azure::new(c)),
        ProviderKind::VertexImagen => Arc::new(vertex::Vertex::new(c)),
        ProviderKind::Stability => Arc::new(stability::Stability::new(c)),
        ProviderKind::Fal => Arc::new(fal::Fal::new(c)),
        ProviderKind::Replicate => Arc::new(replicate::Replicate::new(c)),
        ProviderKind::A1111 => Arc::new(a1111::A1111::new(c)),
    }
}

/// A provider's error text for messages: `found` (the text its error body carries) or the
/// body's start, without control characters, at most 300 characters, never empty.
pub(crate) fn error_text(found: Option<String>, body: &[u8]) -> String {
    let text = found.unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text
    }
}

/// The media type and file extension of PNG, JPEG or WebP bytes, by their magic numbers.
pub fn sniff_image(b: &[u8]) -> Option<(&'static str, &'static str)> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(("image/png", "png"))
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(("image/jpeg", "jpg"))
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some(("image/webp", "webp"))
    } else {
        None
    }
}

/// The seed a provider reports it drew with, read leniently: an integer, an integral float
/// (`5.0`) or a string of digits within `u64`; anything else (negative, fractional, too large,
/// another type) is no seed. The seed is for the trace and `x-acc-generation`: a strange one
/// must not fail an image the provider made and billed.
pub fn reported_seed(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        }),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Refuses an answer whose images are not images: each base64 or raw image must start with
/// the magic number of a PNG, JPEG or WebP file (the formats every supported provider answers
/// in). An HTML login page at the provider's URL, an error text in `b64_json` or a gzip body
/// the gateway did not ask for would otherwise reach the client as a `200` on a route that
/// runs no evaluator. URLs not fetched are not looked at. Only the first 12 bytes are decoded,
/// into a buffer on the stack.
///
/// Returns the images' format as the OpenAI `output_format` names it (`png`, `jpeg`, `webp`)
/// when every image was looked at and all have the same one, so the answer can say what the
/// bytes are rather than what the provider labelled them.
pub fn check_images_are_images(images: &[Image]) -> Result<Option<&'static str>, ProviderError> {
    let mut common: Option<Option<&'static str>> = None;
    for (i, image) in images.iter().enumerate() {
        let buf: [u8; 12];
        let head: &[u8] = match image {
            Image::Base64(rope) => match rope.base64_head() {
                Some((b, n)) => {
                    buf = b;
                    &buf[..n]
                }
                // Not base64 at its start: the payload check already refused such an answer.
                None => &[],
            },
            Image::Raw { bytes, .. } => &bytes[..bytes.len().min(12)],
            Image::Url(_) => {
                common = Some(None);
                continue;
            }
        };
        let Some((_, ext)) = sniff_image(head) else {
            let shown: String = head.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
            return Err(ProviderError::BadResponse(format!(
                "image {i} is not a PNG, JPEG or WebP image (its first bytes read \"{shown}\")"
            )));
        };
        let name = if ext == "jpg" { "jpeg" } else { ext };
        common = match common {
            None => Some(Some(name)),
            Some(Some(seen)) if seen == name => Some(Some(name)),
            _ => Some(None),
        };
    }
    Ok(common.flatten())
}

/// The API key in the environment variable `var`, as a header value (marked sensitive).
/// `Err` names the variable when it is not set.
pub fn key_header(var: Option<&str>, prefix: &str) -> Option<Result<http::HeaderValue, String>> {
    var.map(|var| {
        std::env::var(var)
            .ok()
            .inspect(|key| crate::secrets::register(key))
            .and_then(|key| http::HeaderValue::from_str(&format!("{prefix}{key}")).ok())
            .map(|mut h| {
                h.set_sensitive(true);
                h
            })
            .ok_or_else(|| var.to_string())
    })
}
