//! Policy files: parsed as raw serde structs (unknown fields refused), then validated into the
//! runtime [`Policy`]. Validation is all or nothing and every error names the file and the path
//! inside it, e.g. `routes.toml: routes[1].targets[0].provider: unknown provider "opnai"`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Provider kinds the design names. Only some have an adapter in this build; the others are
/// refused with a clear message rather than accepted and silently ignored.
const KNOWN_KINDS: &[&str] =
    &["openai", "azure_openai", "vertex_imagen", "stability", "fal", "replicate", "a1111", "builtin"];
const IMPLEMENTED_KINDS: &[&str] =
    &["openai", "azure_openai", "vertex_imagen", "stability", "fal", "replicate", "a1111", "builtin"];

// ---------------------------------------------------------------------------------------------
// Raw shapes, as written by ops.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// Model alias used when a request names no model.
    default_model: Option<String>,
    server: Option<RawServer>,
    #[serde(default)]
    keys: Vec<RawKey>,
    /// Limits per tenant (the `tenant` of `[[keys]]`).
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    /// CLIP image and text encoders (ONNX) for prompt-image similarity in `adherence`.
    clip: Option<RawClip>,
    /// Custom ONNX image classifiers the `safety` evaluator can run (beside or instead of
    /// NudeNet), by name.
    #[serde(default)]
    classifiers: BTreeMap<String, RawClassifier>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// Largest JSON request body, bytes.
    max_json_body_bytes: Option<u64>,
    /// Largest multipart request body (edits, variations), bytes.
    max_multipart_body_bytes: Option<u64>,
    /// Lifetime of a gateway-served image URL, seconds.
    url_ttl_secs: Option<u64>,
    /// Base URL put in front of gateway-served image URLs (`https://images.example.com`); when
    /// absent, the request's Host header is used.
    public_base_url: Option<String>,
    /// Requests handled at once; more are shed with 503 rather than queued without bound.
    max_in_flight: Option<u64>,
    /// How long an `Idempotency-Key`'s answer is kept for replay, seconds (default one day).
    idempotency_ttl_secs: Option<u64>,
    /// Memory for kept answers, MiB (default 256); the oldest go first.
    idempotency_max_mib: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    /// Lowercase hex SHA-256 of the API key; the key itself never appears in policy files.
    sha256: String,
    tenant: String,
    #[serde(default)]
    tags: Vec<String>,
    /// Requests per minute this key may make.
    requests_per_minute: Option<u32>,
    /// Images per minute this key may ask for (`n` of each request).
    images_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    requests_per_minute: Option<u32>,
    images_per_minute: Option<u32>,
    /// Spend per UTC day, from the providers' prices; over it, requests get 429 until midnight.
    spend_usd_per_day: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    /// Failures in a row (connect errors, timeouts, 5xx, broken answers) that open it.
    consecutive_failures: Option<u32>,
    /// How long it stays open before letting probes through, ms.
    cooldown_ms: Option<u64>,
    /// Probes let through at once when half-open; as many successes close it.
    probes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    /// One price, or a table by size (`"1024x1024" = 0.04`) with an optional `default`.
    per_image_usd: Option<RawPerImage>,
    /// Per image by `quality` ("hd", "high", ...): a price or a table by size; beats per_image_usd.
    #[serde(default)]
    quality: BTreeMap<String, RawPerImage>,
    /// Per sampling step per image (self-hosted diffusion), added to the per-image price.
    per_step_usd: Option<f64>,
    /// Per GPU-second the provider reports (e.g. Replicate's predict_time), added too.
    per_gpu_second_usd: Option<f64>,
    /// Prices of one model (the target's model name), same fields; beat the provider's own.
    #[serde(default)]
    models: BTreeMap<String, RawModelPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelPrice {
    per_image_usd: Option<RawPerImage>,
    #[serde(default)]
    quality: BTreeMap<String, RawPerImage>,
    per_step_usd: Option<f64>,
    per_gpu_second_usd: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFetch {
    /// Fetch plain-http URLs too (default: https only).
    allow_http: Option<bool>,
    /// Fetch from private, loopback and link-local addresses too (default: refused).
    allow_private: Option<bool>,
    /// Hosts fetched whatever their scheme or address (exact names, e.g. "127.0.0.1", "cdn.internal").
    #[serde(default)]
    allow_hosts: Vec<String>,
    /// Largest image fetched, bytes (default 32 MiB).
    max_bytes: Option<u64>,
    /// Time for one fetch, redirects included, ms (default 30000).
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPerImage {
    Flat(f64),
    BySize(BTreeMap<String, f64>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHedge {
    /// Start the next target when the first has not answered after this long, ms.
    after_ms: Option<u64>,
    /// "p95": wait the first target's observed p95 instead (after_ms until it has enough samples).
    after: Option<String>,
    /// Lower bound of the p95-based delay, ms.
    min_after_ms: Option<u64>,
    /// Attempts in flight at once (default 2).
    max_parallel: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: String,
    /// Root of the provider's API, e.g. `https://api.openai.com/v1`.
    base_url: Option<String>,
    /// Environment variable that holds the provider's API key.
    api_key_env: Option<String>,
    /// Upper bound for one attempt on this provider, ms; the route's attempt timeout applies too.
    timeout_ms: Option<u64>,
    /// What to ask the upstream for: `b64_json` (default), `url`, or `omit` to send no
    /// `response_format` at all (models such as gpt-image-1 refuse the field).
    upstream_response_format: Option<String>,
    /// Attempts in flight at once on this provider; more wait in a bounded queue.
    max_concurrency: Option<u32>,
    /// Attempts that may wait for a slot (default: max_concurrency).
    max_queue: Option<u32>,
    /// Longest wait for a slot, ms (default: the attempt's timeout).
    queue_timeout_ms: Option<u64>,
    /// When the queue is full: "fallback" (try the next target; default) or "reject" (503).
    on_queue_full: Option<String>,
    breaker: Option<RawBreaker>,
    /// Cap on how long a 429's Retry-After pauses the provider, ms (default 300000).
    max_pause_ms: Option<u64>,
    price: Option<RawPrice>,
    /// azure_openai: the `api-version` query parameter.
    api_version: Option<String>,
    /// vertex_imagen: Google Cloud project and region.
    project: Option<String>,
    location: Option<String>,
    /// vertex_imagen: environment variable holding an OAuth2 access token...
    token_env: Option<String>,
    /// ... or a command printing one (e.g. ["gcloud", "auth", "print-access-token"]), cached.
    token_command: Option<Vec<String>>,
    /// a1111: environment variable holding "user:password" for the API's basic auth.
    auth_env: Option<String>,
    /// fal, replicate: first poll delay and the cap of its exponential backoff, ms.
    poll_interval_ms: Option<u64>,
    max_poll_interval_ms: Option<u64>,
    /// A request parameter this kind cannot honour: "drop" it and say so in x-acc-dropped-params
    /// (default), or "reject" the request with 400.
    unsupported_params: Option<String>,
    /// How image URLs this provider answers with are fetched (SSRF guard).
    fetch: Option<RawFetch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassifier {
    /// The ONNX file; a relative path is taken from the models directory (ACC_MODELS_DIR).
    model: String,
    /// Side of the square input, pixels.
    input_size: u32,
    /// Per-channel (R, G, B) mean and standard deviation, for pixels scaled to 0..1.
    #[serde(default = "zero3")]
    mean: [f32; 3],
    #[serde(default = "one3")]
    std: [f32; 3],
    /// "softmax" (default), "sigmoid" or "none" (the model outputs probabilities).
    activation: Option<String>,
    /// One label per model output, in order.
    labels: Vec<String>,
    /// The labels that count as unsafe.
    unsafe_labels: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClip {
    /// Vision encoder with projection (relative paths: the models directory).
    image_model: String,
    /// Text encoder with projection.
    text_model: String,
    /// Side of the square image input; default 224.
    input_size: Option<u32>,
}

fn zero3() -> [f32; 3] {
    [0.0; 3]
}
fn one3() -> [f32; 3] {
    [1.0; 3]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(rename = "match", default)]
    matcher: RawMatch,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    fallbacks: Vec<String>,
    attempt_timeout_ms: Option<u64>,
    deadline_ms: Option<u64>,
    url_mode: Option<String>,
    /// Evaluators every artifact of this route must pass, in order: "sanity" (more arrive
    /// with later builds: "safety", "text", "adherence").
    #[serde(default)]
    evaluators: Vec<String>,
    /// What a failed sanity check does: "fallback" (try the next target; default), "block"
    /// (400 content_policy_violation) or "flag" (return it, marked).
    on_sanity_fail: Option<String>,
    /// Time allowed for evaluating one attempt's artifacts (queue wait included), ms.
    eval_budget_ms: Option<u64>,
    /// When an evaluator errors or runs out of budget: "fail_closed" (treat as failed; default)
    /// or "fail_open" (treat as passed; the error is still reported and counted).
    on_eval_error: Option<String>,
    /// What unsafe content does: "fallback" (default), "block" or "flag".
    on_unsafe: Option<String>,
    /// Highest NudeNet score of an unsafe class that still passes, in [0, 1]; default 0.5.
    max_unsafe: Option<f32>,
    /// NudeNet classes that count as unsafe; default: the exposed genitalia, breasts, buttocks
    /// and anus classes.
    unsafe_classes: Option<Vec<String>>,
    /// What a failed prompt contract does: "fallback" (default), "block" or "flag".
    on_low_adherence: Option<String>,
    /// Lowest share of the contract's clauses that must hold, in [0, 1]; default 1 (all).
    min_adherence: Option<f32>,
    /// Text that every image of the route must show (read by OCR; case and small OCR errors
    /// tolerated).
    #[serde(default)]
    require_text: Vec<String>,
    /// Text no image of the route may show.
    #[serde(default)]
    forbid_text: Vec<String>,
    /// No text at all in the image.
    #[serde(default)]
    forbid_any_text: bool,
    /// What a failed text rule does: "fallback" (default), "block" or "flag".
    on_text_fail: Option<String>,
    /// Models `safety` runs: "nudenet" and/or names of `[classifiers.*]`; default ["nudenet"].
    safety_models: Option<Vec<String>>,
    /// Lowest CLIP prompt-image cosine similarity `adherence` accepts (needs `[clip]`).
    min_clip_similarity: Option<f32>,
    /// Rolling p99 latency of a target above this demotes it to the back of the plan, ms.
    latency_slo_ms: Option<u64>,
    /// Share of a target's recent attempts that errored or timed out above which it is demoted.
    max_error_ratio: Option<f64>,
    /// Share of a target's recent artifacts that failed evaluation above which it is demoted.
    max_eval_fail_ratio: Option<f64>,
    /// Attempts kept in each target's health window (default 100).
    health_window: Option<u32>,
    /// Age after which samples leave the window, seconds (default 300).
    health_window_secs: Option<u64>,
    /// Samples needed before a target is judged (default 20).
    health_min_samples: Option<u32>,
    /// Opt-in hedging: start the next target when the first is slow. May double the spend.
    hedge: Option<RawHedge>,
    /// Candidates that get a copy of a sample of this route's requests (never seen by clients).
    #[serde(default)]
    mirror: Vec<RawMirror>,
    /// A candidate that serves a share of the live traffic, rolled back automatically when worse.
    canary: Option<RawCanary>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    provider: String,
    model: Option<String>,
    /// Share of requests copied to the candidate, in [0, 1].
    sample: f64,
    /// Mirrored attempts in flight at once; more are skipped (default 4).
    max_in_flight: Option<u32>,
    /// Spend on this candidate per UTC day, at its provider's price; beyond it mirrors are skipped.
    spend_usd_per_day: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    provider: String,
    model: Option<String>,
    /// Share of live requests the candidate serves, in (0, 1].
    share: f64,
    /// Samples both sides need before the guard judges (default 50).
    min_samples: Option<u64>,
    /// Largest tolerated rise of the eval-fail rate over the primary's, absolute (default 0.05).
    max_eval_fail_increase: Option<f64>,
    /// Largest tolerated rise of the error rate over the primary's, absolute (default 0.05).
    max_error_increase: Option<f64>,
    /// Largest tolerated ratio of the candidate's p99 latency to the primary's (default 1.5).
    max_p99_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    model: Option<String>,
    cohort: Option<String>,
    #[serde(default)]
    key_tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    provider: String,
    /// The provider's model name; defaults to the alias the client asked for.
    model: Option<String>,
    /// Relative share of first attempts; default 1.
    weight: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Validated runtime types.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub max_json_body_bytes: usize,
    pub max_multipart_body_bytes: usize,
    pub url_ttl: Duration,
    pub public_base_url: Option<String>,
    pub max_in_flight: usize,
    pub idempotency_ttl: Duration,
    pub idempotency_max_bytes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_json_body_bytes: 8 * 1024 * 1024,
            max_multipart_body_bytes: 32 * 1024 * 1024,
            url_ttl: Duration::from_secs(3600),
            public_base_url: None,
            max_in_flight: 4096,
            idempotency_ttl: Duration::from_secs(86_400),
            idempotency_max_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub tenant: String,
    pub tags: Vec<String>,
    /// Short, non-secret name of the key for logs and limiter state: the digest's first 12 hex digits.
    pub id: String,
    pub requests_per_minute: Option<u32>,
    pub images_per_minute: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TenantLimits {
    pub requests_per_minute: Option<u32>,
    pub images_per_minute: Option<u32>,
    pub spend_usd_per_day: Option<f64>,
}

/// A price by size: one number (`default`) or a table with an optional default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SizePrice {
    pub by_size: BTreeMap<String, f64>,
    pub default: Option<f64>,
}

impl SizePrice {
    pub fn get(&self, size: &str) -> Option<f64> {
        self.by_size.get(size).copied().or(self.default)
    }
}

/// One price table: per image (by quality, then by size), per step, per GPU-second.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PriceTable {
    pub per_image: Option<SizePrice>,
    pub quality: BTreeMap<String, SizePrice>,
    pub per_step: Option<f64>,
    pub per_gpu_second: Option<f64>,
}

/// What a provider charges: its own table, and tables of given models that replace it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Price {
    pub base: PriceTable,
    pub models: BTreeMap<String, PriceTable>,
}

/// What was generated, as far as price goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Billable<'a> {
    pub model: &'a str,
    pub size: &'a str,
    pub quality: Option<&'a str>,
    pub images: u32,
    pub steps: Option<u32>,
    pub gpu_seconds: Option<f64>,
}

impl Price {
    /// USD for one image of `size` ("1024x1024"); `None` when the table has no price for it.
    pub fn per_image(&self, size: &str) -> Option<f64> {
        self.base.per_image.as_ref().and_then(|p| p.get(size))
    }

    /// USD for what was generated; `None` when nothing in the tables applies.
    pub fn cost(&self, b: &Billable<'_>) -> Option<f64> {
        let t = self.models.get(b.model).unwrap_or(&self.base);
        let images = f64::from(b.images);
        let per_image = b
            .quality
            .and_then(|q| t.quality.get(q))
            .and_then(|p| p.get(b.size))
            .or_else(|| t.per_image.as_ref().and_then(|p| p.get(b.size)));
        let parts = [
            per_image.map(|p| p * images),
            t.per_step.zip(b.steps).map(|(p, s)| p * f64::from(s) * images),
            t.per_gpu_second.zip(b.gpu_seconds).map(|(p, s)| p * s),
        ];
        parts.iter().flatten().copied().reduce(|a, b| a + b)
    }
}

/// A provider's concurrency limit and wait queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    pub max: u32,
    pub max_queue: u32,
    pub queue_timeout: Option<Duration>,
    /// A full queue ends the request (503) instead of moving on to the next target.
    pub reject_when_full: bool,
}

/// Hedging: a second attempt starts when the first is slow.
#[derive(Debug, Clone, PartialEq)]
pub struct Hedge {
    pub after: Duration,
    /// Use the first target's observed p95 (bounded below by `min_after`) once it has enough samples.
    pub after_p95: bool,
    pub min_after: Duration,
    pub max_parallel: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFormat {
    B64Json,
    Url,
    Omit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Builtin,
    OpenAi,
    AzureOpenAi,
    VertexImagen,
    Stability,
    Fal,
    Replicate,
    A1111,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Builtin => "builtin",
            ProviderKind::OpenAi => "openai",
            ProviderKind::AzureOpenAi => "azure_openai",
            ProviderKind::VertexImagen => "vertex_imagen",
            ProviderKind::Stability => "stability",
            ProviderKind::Fal => "fal",
            ProviderKind::Replicate => "replicate",
            ProviderKind::A1111 => "a1111",
        }
    }

    fn parse(s: &str) -> Option<ProviderKind> {
        Some(match s {
            "builtin" => ProviderKind::Builtin,
            "openai" => ProviderKind::OpenAi,
            "azure_openai" => ProviderKind::AzureOpenAi,
            "vertex_imagen" => ProviderKind::VertexImagen,
            "stability" => ProviderKind::Stability,
            "fal" => ProviderKind::Fal,
            "replicate" => ProviderKind::Replicate,
            "a1111" => ProviderKind::A1111,
            _ => return None,
        })
    }
}

/// How to reach and authenticate to a provider; each kind uses the fields it documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    /// Root of the provider's API, without a trailing slash.
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// openai / azure_openai: what to ask the upstream for.
    pub upstream_format: UpstreamFormat,
    pub api_version: Option<String>,
    pub project: Option<String>,
    pub location: Option<String>,
    pub token_env: Option<String>,
    pub token_command: Vec<String>,
    pub auth_env: Option<String>,
    /// Asynchronous kinds: first poll delay, and the cap of its doubling.
    pub poll_interval: Duration,
    pub max_poll_interval: Duration,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            base_url: String::new(),
            api_key_env: None,
            upstream_format: UpstreamFormat::B64Json,
            api_version: None,
            project: None,
            location: None,
            token_env: None,
            token_command: Vec::new(),
            auth_env: None,
            poll_interval: Duration::from_millis(500),
            max_poll_interval: Duration::from_secs(5),
        }
    }
}

/// Where a provider's image URLs may be fetched from (checked after DNS, on every redirect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPolicy {
    pub allow_http: bool,
    pub allow_private: bool,
    pub allow_hosts: Vec<String>,
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            allow_http: false,
            allow_private: false,
            allow_hosts: Vec::new(),
            max_bytes: 32 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What to do with a request parameter a provider kind cannot honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamAction {
    Drop,
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: ProviderKind,
    pub conn: Connection,
    pub fetch: FetchPolicy,
    pub unsupported: ParamAction,
    pub timeout: Option<Duration>,
    pub concurrency: Option<Concurrency>,
    pub breaker: crate::health::BreakerSettings,
    pub max_pause: Duration,
    pub price: Option<Price>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlMode {
    /// The gateway keeps the bytes and serves them itself for `url_ttl`.
    Gateway,
    /// A provider URL is handed to the client as is (bytes are still served by the gateway).
    Provider,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub provider: String,
    pub model: Option<String>,
    pub weight: u32,
    pub role: TargetRole,
}

/// Why a target is in its route: a configured target, or a mirror or canary candidate
/// (appended with weight 0, so plans only reach them on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRole {
    Serve,
    Mirror,
    Canary,
}

impl TargetRole {
    pub fn label(self) -> &'static str {
        match self {
            TargetRole::Serve => "serve",
            TargetRole::Mirror => "mirror",
            TargetRole::Canary => "canary",
        }
    }
}

/// A mirror candidate of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    /// Index of the candidate in the route's targets.
    pub target: usize,
    /// `provider/model`, or the provider alone when the alias is passed on.
    pub label: String,
    pub sample: f64,
    pub max_in_flight: usize,
    pub spend_usd_per_day: Option<f64>,
}

/// A canary candidate of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    pub target: usize,
    pub label: String,
    pub share: f64,
    pub guard: crate::compare::Guard,
    /// Changes whenever the canary's settings do: a rolled-back canary stays so until then.
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matcher {
    pub model: Option<String>,
    pub cohort: Option<String>,
    pub key_tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub targets: Vec<Target>,
    /// Indices into [`Policy::routes`], in the order they are tried.
    pub fallbacks: Vec<usize>,
    pub attempt_timeout: Duration,
    pub deadline: Duration,
    pub url_mode: UrlMode,
    pub eval: EvalPolicy,
    pub health: crate::health::HealthSettings,
    pub hedge: Option<Hedge>,
    pub mirrors: Vec<Mirror>,
    pub canary: Option<Canary>,
}

/// What a route does with an evaluator's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalAction {
    Fallback,
    Block,
    Flag,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalPolicy {
    /// Evaluator names, validated against what this build has.
    pub evaluators: Vec<String>,
    pub on_sanity_fail: EvalAction,
    pub on_unsafe: EvalAction,
    pub on_low_adherence: EvalAction,
    pub on_text_fail: EvalAction,
    pub budget: Duration,
    pub fail_open: bool,
    pub settings: crate::eval::Settings,
}

impl EvalPolicy {
    /// The action for a failure of `evaluator`.
    pub fn action(&self, evaluator: &str) -> EvalAction {
        match evaluator {
            "safety" => self.on_unsafe,
            "adherence" => self.on_low_adherence,
            "text" => self.on_text_fail,
            _ => self.on_sanity_fail,
        }
    }
}

/// Evaluators this build can run.
pub const AVAILABLE_EVALUATORS: &[&str] = &["sanity", "safety", "text", "adherence"];

/// A validated policy: everything the request path needs, with references resolved.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Short SHA-256 of the files' names and contents.
    pub version: String,
    pub files: Vec<String>,
    pub default_model: Option<String>,
    pub server: ServerSettings,
    /// Keyed by the SHA-256 digest of the API key.
    pub keys: HashMap<[u8; 32], ApiKey>,
    pub tenants: BTreeMap<String, TenantLimits>,
    pub providers: BTreeMap<String, ProviderSpec>,
    /// In match order: files sorted by name, routes in file order.
    pub routes: Vec<Route>,
    /// Every model alias a route matches on, for `/v1/models` and 404s.
    pub aliases: BTreeSet<String>,
    /// Things worth a log line that do not make the policy invalid (a missing key variable).
    pub warnings: Vec<String>,
}

/// The policy files of a directory (or one file), read but not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub files: Vec<(String, String)>,
}

impl Sources {
    /// Reads every `*.toml` directly in `path` (sorted by name), or `path` itself if it is a file.
    /// Paths are resolved on every call, so a Kubernetes ConfigMap's symlink swap is seen.
    pub fn read(path: &Path) -> Result<Sources, Vec<String>> {
        let meta = std::fs::metadata(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let mut paths: Vec<PathBuf> = if meta.is_file() {
            vec![path.to_path_buf()]
        } else {
            let rd = std::fs::read_dir(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
            let mut v = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|e| vec![format!("{}: {e}", path.display())])?;
                let p = entry.path();
                let is_toml = p.extension().is_some_and(|x| x == "toml");
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if is_toml && !hidden && p.is_file() {
                    v.push(p);
                }
            }
            v
        };
        paths.sort();
        if paths.is_empty() {
            return Err(vec![format!("{}: no *.toml policy files found", path.display())]);
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut errors = Vec::new();
        for p in paths {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match std::fs::read_to_string(&p) {
                Ok(text) => files.push((name, text)),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(Sources { files })
        } else {
            Err(errors)
        }
    }

    pub fn version(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in &self.files {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..6])
    }
}

/// Reads and validates a policy directory (or file).
pub fn load(path: &Path) -> Result<Policy, Vec<String>> {
    let sources = Sources::read(path)?;
    validate(&sources)
}

/// Parses and validates policy sources: every error found, or a policy.
pub fn validate(sources: &Sources) -> Result<Policy, Vec<String>> {
    let mut errors = Vec::new();
    let mut parsed: Vec<(&str, RawFile)> = Vec::new();
    for (name, text) in &sources.files {
        match toml::from_str::<RawFile>(text) {
            Ok(raw) => parsed.push((name, raw)),
            Err(e) => errors.push(format!("{name}: {}", toml_error(text, &e))),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut default_model: Option<(String, &str)> = None;
    let mut server: Option<(ServerSettings, &str)> = None;
    let mut keys = HashMap::new();
    let mut tenants = BTreeMap::new();
    let mut providers = BTreeMap::new();
    let mut provider_file: HashMap<String, &str> = HashMap::new();
    let mut warnings = Vec::new();

    for (file, raw) in &parsed {
        if let Some(m) = &raw.default_model {
            match &default_model {
                Some((_, other)) => errors.push(format!("{file}: default_model: already set in {other}")),
                None => default_model = Some((m.clone(), file)),
            }
        }
        if let Some(s) = &raw.server {
            match &server {
                Some((_, other)) => errors.push(format!("{file}: server: already set in {other}")),
                None => server = Some((validate_server(file, s, &mut errors), file)),
            }
        }
        for (i, k) in raw.keys.iter().enumerate() {
            let at = format!("{file}: keys[{i}]");
            let digest = match hex::decode(k.sha256.trim()) {
                Ok(d) if d.len() == 32 => {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(&d);
                    a
                }
                _ => {
                    errors.push(format!("{at}.sha256: expected 64 hex characters (the SHA-256 of the key)"));
                    continue;
                }
            };
            if k.tenant.trim().is_empty() {
                errors.push(format!("{at}.tenant: must not be empty"));
            }
            for (j, t) in k.tags.iter().enumerate() {
                check_name(&format!("{at}.tags[{j}]"), t, &mut errors);
            }
            for (field, v) in
                [("requests_per_minute", k.requests_per_minute), ("images_per_minute", k.images_per_minute)]
            {
                if v == Some(0) {
                    errors.push(format!("{at}.{field}: must be greater than 0 (leave it out for no limit)"));
                }
            }
            let key = ApiKey {
                tenant: k.tenant.clone(),
                tags: k.tags.clone(),
                id: hex::encode(&digest[..6]),
                requests_per_minute: k.requests_per_minute,
                images_per_minute: k.images_per_minute,
            };
            if keys.insert(digest, key).is_some() {
                errors.push(format!("{at}.sha256: duplicate key digest"));
            }
        }
        for (name, t) in &raw.tenants {
            let at = format!("{file}: tenants.{name}");
            if tenants.contains_key(name) {
                errors.push(format!("{at}: tenant \"{name}\" is already configured"));
                continue;
            }
            for (field, v) in
                [("requests_per_minute", t.requests_per_minute), ("images_per_minute", t.images_per_minute)]
            {
                if v == Some(0) {
                    errors.push(format!("{at}.{field}: must be greater than 0 (leave it out for no limit)"));
                }
            }
            if let Some(v) = t.spend_usd_per_day {
                if !(v.is_finite() && v >= 0.0) {
                    errors.push(format!("{at}.spend_usd_per_day: must be a number >= 0"));
                }
            }
            let limits = TenantLimits {
                requests_per_minute: t.requests_per_minute,
                images_per_minute: t.images_per_minute,
                spend_usd_per_day: t.spend_usd_per_day,
            };
            tenants.insert(name.clone(), limits);
        }
        for (name, p) in &raw.providers {
            let at = format!("{file}: providers.{name}");
            check_name(&at, name, &mut errors);
            if let Some(other) = provider_file.get(name.as_str()) {
                errors.push(format!("{at}: provider \"{name}\" is already defined in {other}"));
                continue;
            }
            provider_file.insert(name.clone(), file);
            if let Some(spec) = validate_provider(&at, name, p, &mut errors, &mut warnings) {
                providers.insert(name.clone(), spec);
            }
        }
    }

    for name in tenants.keys() {
        if !keys.values().any(|k: &ApiKey| &k.tenant == name) {
            warnings
                .push(format!("tenants.{name}: no [[keys]] entry has tenant \"{name}\"; its limits apply to no one"));
        }
    }

    let mut classifiers: BTreeMap<String, std::sync::Arc<crate::eval::classifier::ClassifierSpec>> = BTreeMap::new();
    for (file, raw) in &parsed {
        for (name, c) in &raw.classifiers {
            let at = format!("{file}: classifiers.{name}");
            check_name(&at, name, &mut errors);
            if name == "nudenet" || classifiers.contains_key(name) {
                errors.push(format!("{at}: the name \"{name}\" is taken"));
                continue;
            }
            if let Some(spec) = validate_classifier(&at, name, c, &mut errors, &mut warnings) {
                classifiers.insert(name.clone(), std::sync::Arc::new(spec));
            }
        }
    }

    let mut clip: Option<std::sync::Arc<crate::eval::clip::ClipConfig>> = None;
    for (file, raw) in &parsed {
        if let Some(c) = &raw.clip {
            if clip.is_some() {
                errors.push(format!("{file}: clip: already set in another file"));
                continue;
            }
            let resolve = |p: &str| {
                let p = std::path::PathBuf::from(p);
                if p.is_absolute() {
                    p
                } else {
                    crate::eval::onnx::models_dir().join(p)
                }
            };
            let mut cfg = crate::eval::clip::ClipConfig::new(resolve(&c.image_model), resolve(&c.text_model));
            if let Some(s) = c.input_size {
                if !(1..=4096).contains(&s) {
                    errors.push(format!("{file}: clip.input_size: must be between 1 and 4096"));
                }
                cfg.input_size = s;
            }
            for m in [&cfg.image_model, &cfg.text_model] {
                if !m.is_file() {
                    warnings.push(format!(
                        "{file}: clip: {} does not exist; CLIP clauses get an error verdict",
                        m.display()
                    ));
                }
            }
            clip = Some(std::sync::Arc::new(cfg));
        }
    }

    // Routes need every provider and route name, so they come second.
    let mut route_index: HashMap<&str, usize> = HashMap::new();
    let mut route_at: Vec<String> = Vec::new();
    for (file, raw) in &parsed {
        for (i, r) in raw.routes.iter().enumerate() {
            let at = format!("{file}: routes[{i}]");
            if route_index.contains_key(r.name.as_str()) {
                errors.push(format!("{at}.name: duplicate route name \"{}\"", r.name));
            } else {
                route_index.insert(&r.name, route_at.len());
            }
            route_at.push(at);
        }
    }
    let mut routes = Vec::new();
    let mut aliases = BTreeSet::new();
    let mut n = 0;
    for (file, raw) in &parsed {
        let _ = file;
        for r in &raw.routes {
            let at = &route_at[n];
            n += 1;
            check_name(&format!("{at}.name"), &r.name, &mut errors);
            if let Some(m) = &r.matcher.model {
                if m.is_empty() {
                    errors.push(format!("{at}.match.model: must not be empty"));
                }
                aliases.insert(m.clone());
            }
            for (j, t) in r.matcher.key_tags.iter().enumerate() {
                check_name(&format!("{at}.match.key_tags[{j}]"), t, &mut errors);
            }
            if r.targets.is_empty() {
                errors.push(format!("{at}.targets: a route needs at least one target"));
            }
            let mut targets = Vec::new();
            for (j, t) in r.targets.iter().enumerate() {
                if !providers.contains_key(&t.provider) && !provider_file.contains_key(&t.provider) {
                    errors.push(format!("{at}.targets[{j}].provider: unknown provider \"{}\"", t.provider));
                }
                if t.model.as_deref() == Some("") {
                    errors.push(format!("{at}.targets[{j}].model: must not be empty"));
                }
                targets.push(Target {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                    weight: t.weight.unwrap_or(1),
                    role: TargetRole::Serve,
                });
            }
            if !targets.is_empty() && targets.iter().all(|t| t.weight == 0) {
                errors.push(format!("{at}.targets: weights sum to zero"));
            }
            let mut fallbacks = Vec::new();
            for (j, f) in r.fallbacks.iter().enumerate() {
                match route_index.get(f.as_str()) {
                    None => errors.push(format!("{at}.fallbacks[{j}]: unknown route \"{f}\"")),
                    Some(_) if *f == r.name => {
                        errors.push(format!("{at}.fallbacks[{j}]: a route cannot fall back to itself"))
                    }
                    Some(idx) if fallbacks.contains(idx) => {
                        errors.push(format!("{at}.fallbacks[{j}]: route \"{f}\" is listed twice"))
                    }
                    Some(idx) => fallbacks.push(*idx),
                }
            }
            let attempt_timeout =
                positive_ms(&format!("{at}.attempt_timeout_ms"), r.attempt_timeout_ms, 60_000, &mut errors);
            let deadline = positive_ms(&format!("{at}.deadline_ms"), r.deadline_ms, 120_000, &mut errors);
            let url_mode = match r.url_mode.as_deref() {
                None | Some("gateway") => UrlMode::Gateway,
                Some("provider") => UrlMode::Provider,
                Some(other) => {
                    errors.push(format!(
                        "{at}.url_mode: unknown mode \"{other}\" (expected \"gateway\" or \"provider\")"
                    ));
                    UrlMode::Gateway
                }
            };
            let eval = validate_eval(at, r, &classifiers, clip.as_ref(), &mut errors);
            let health = validate_health(at, r, &mut errors);
            let hedge = r.hedge.as_ref().and_then(|h| validate_hedge(at, h, &mut errors));
            let known = |p: &str| providers.contains_key(p) || provider_file.contains_key(p);
            let (mirrors, canary) = validate_candidates(at, r, &mut targets, &known, &mut errors);
            routes.push(Route {
                name: r.name.clone(),
                matcher: Matcher {
                    model: r.matcher.model.clone(),
                    cohort: r.matcher.cohort.clone(),
                    key_tags: r.matcher.key_tags.clone(),
                },
                targets,
                fallbacks,
                attempt_timeout,
                deadline,
                url_mode,
                eval,
                health,
                hedge,
                mirrors,
                canary,
            });
        }
    }
    if routes.is_empty() && errors.is_empty() {
        errors.push(format!("{}: no routes defined", sources.files.first().map(|f| f.0.as_str()).unwrap_or("policy")));
    }
    if let Some((m, file)) = &default_model {
        if !aliases.contains(m) {
            errors.push(format!("{file}: default_model: \"{m}\" is not the match.model of any route"));
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        version: sources.version(),
        files: sources.files.iter().map(|f| f.0.clone()).collect(),
        default_model: default_model.map(|d| d.0),
        server: server.map(|s| s.0).unwrap_or_default(),
        keys,
        tenants,
        providers,
        routes,
        aliases,
        warnings,
    })
}

fn validate_server(file: &str, s: &RawServer, errors: &mut Vec<String>) -> ServerSettings {
    let d = ServerSettings::default();
    let bytes = |field: &str, v: Option<u64>, default: usize, errors: &mut Vec<String>| match v {
        None => default,
        Some(0) => {
            errors.push(format!("{file}: server.{field}: must be greater than 0"));
            default
        }
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
    };
    let public_base_url = s.public_base_url.as_ref().map(|u| u.trim_end_matches('/').to_string());
    if let Some(u) = &public_base_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            errors.push(format!("{file}: server.public_base_url: must start with http:// or https://"));
        }
    }
    ServerSettings {
        max_json_body_bytes: bytes("max_json_body_bytes", s.max_json_body_bytes, d.max_json_body_bytes, errors),
        max_multipart_body_bytes: bytes(
            "max_multipart_body_bytes",
            s.max_multipart_body_bytes,
            d.max_multipart_body_bytes,
            errors,
        ),
        url_ttl: Duration::from_secs(bytes("url_ttl_secs", s.url_ttl_secs, 3600, errors) as u64),
        public_base_url,
        max_in_flight: bytes("max_in_flight", s.max_in_flight, d.max_in_flight, errors),
        idempotency_ttl: Duration::from_secs(bytes(
            "idempotency_ttl_secs",
            s.idempotency_ttl_secs,
            d.idempotency_ttl.as_secs() as usize,
            errors,
        ) as u64),
        idempotency_max_bytes: bytes("idempotency_max_mib", s.idempotency_max_mib, 256, errors).saturating_mul(1 << 20),
    }
}

fn validate_provider(
    at: &str,
    name: &str,
    p: &RawProvider,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<ProviderSpec> {
    let before = errors.len();
    if !KNOWN_KINDS.contains(&p.kind.as_str()) {
        errors.push(format!("{at}.kind: unknown kind \"{}\" (expected one of {})", p.kind, KNOWN_KINDS.join(", ")));
        return None;
    }
    if !IMPLEMENTED_KINDS.contains(&p.kind.as_str()) {
        errors.push(format!(
            "{at}.kind: kind \"{}\" has no adapter in this build yet (available: {})",
            p.kind,
            IMPLEMENTED_KINDS.join(", ")
        ));
        return None;
    }
    let timeout = match p.timeout_ms {
        Some(0) => {
            errors.push(format!("{at}.timeout_ms: must be greater than 0"));
            None
        }
        t => t.map(Duration::from_millis),
    };
    let kind = ProviderKind::parse(&p.kind).unwrap_or(ProviderKind::Builtin);
    let conn = validate_connection(at, name, kind, p, errors, warnings);
    let fetch = p.fetch.as_ref().map_or_else(FetchPolicy::default, |f| {
        let d = FetchPolicy::default();
        if f.max_bytes == Some(0) {
            errors.push(format!("{at}.fetch.max_bytes: must be greater than 0"));
        }
        if f.timeout_ms == Some(0) {
            errors.push(format!("{at}.fetch.timeout_ms: must be greater than 0"));
        }
        FetchPolicy {
            allow_http: f.allow_http.unwrap_or(false),
            allow_private: f.allow_private.unwrap_or(false),
            allow_hosts: f.allow_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
            max_bytes: f.max_bytes.map_or(d.max_bytes, |b| usize::try_from(b).unwrap_or(usize::MAX)),
            timeout: f.timeout_ms.map_or(d.timeout, Duration::from_millis),
        }
    });
    let unsupported = match p.unsupported_params.as_deref() {
        None | Some("drop") => ParamAction::Drop,
        Some("reject") => ParamAction::Reject,
        Some(other) => {
            errors
                .push(format!("{at}.unsupported_params: unknown action \"{other}\" (expected \"drop\" or \"reject\")"));
            ParamAction::Drop
        }
    };
    let concurrency = match p.max_concurrency {
        None => {
            for (field, set) in [
                ("max_queue", p.max_queue.is_some()),
                ("queue_timeout_ms", p.queue_timeout_ms.is_some()),
                ("on_queue_full", p.on_queue_full.is_some()),
            ] {
                if set {
                    errors.push(format!("{at}.{field}: needs max_concurrency"));
                }
            }
            None
        }
        Some(0) => {
            errors.push(format!("{at}.max_concurrency: must be greater than 0 (leave it out for no limit)"));
            None
        }
        Some(max) => {
            let reject_when_full = match p.on_queue_full.as_deref() {
                None | Some("fallback") => false,
                Some("reject") => true,
                Some(other) => {
                    errors.push(format!(
                        "{at}.on_queue_full: unknown action \"{other}\" (expected \"fallback\" or \"reject\")"
                    ));
                    false
                }
            };
            let queue_timeout = match p.queue_timeout_ms {
                Some(0) => {
                    errors.push(format!("{at}.queue_timeout_ms: must be greater than 0"));
                    None
                }
                t => t.map(Duration::from_millis),
            };
            Some(Concurrency { max, max_queue: p.max_queue.unwrap_or(max), queue_timeout, reject_when_full })
        }
    };
    let mut breaker = crate::health::BreakerSettings::default();
    if let Some(b) = &p.breaker {
        if let Some(e) = b.enabled {
            breaker.enabled = e;
        }
        match b.consecutive_failures {
            Some(0) => errors.push(format!("{at}.breaker.consecutive_failures: must be greater than 0")),
            Some(n) => breaker.consecutive_failures = n,
            None => {}
        }
        match b.cooldown_ms {
            Some(0) => errors.push(format!("{at}.breaker.cooldown_ms: must be greater than 0")),
            Some(ms) => breaker.cooldown = Duration::from_millis(ms),
            None => {}
        }
        match b.probes {
            Some(0) => errors.push(format!("{at}.breaker.probes: must be greater than 0")),
            Some(n) => breaker.probes = n,
            None => {}
        }
    }
    let max_pause = Duration::from_millis(p.max_pause_ms.unwrap_or(300_000));
    let price = p.price.as_ref().map(|pr| {
        let base = price_table(
            &format!("{at}.price"),
            (pr.per_image_usd.as_ref(), &pr.quality, pr.per_step_usd, pr.per_gpu_second_usd),
            errors,
        );
        let models = pr
            .models
            .iter()
            .map(|(m, t)| {
                let at = format!("{at}.price.models.{m}");
                (
                    m.clone(),
                    price_table(
                        &at,
                        (t.per_image_usd.as_ref(), &t.quality, t.per_step_usd, t.per_gpu_second_usd),
                        errors,
                    ),
                )
            })
            .collect();
        Price { base, models }
    });
    (errors.len() == before).then(|| ProviderSpec {
        name: name.to_string(),
        kind,
        conn,
        fetch,
        unsupported,
        timeout,
        concurrency,
        breaker,
        max_pause,
        price,
    })
}

type RawTable<'a> = (Option<&'a RawPerImage>, &'a BTreeMap<String, RawPerImage>, Option<f64>, Option<f64>);

fn price_table(
    at: &str,
    (per_image, quality, per_step, per_gpu): RawTable<'_>,
    errors: &mut Vec<String>,
) -> PriceTable {
    let mut check = |field: &str, v: f64| {
        if !(v.is_finite() && v >= 0.0) {
            errors.push(format!("{at}.{field}: must be a number >= 0"));
        }
        v
    };
    let per_step = per_step.map(|v| check("per_step_usd", v));
    let per_gpu_second = per_gpu.map(|v| check("per_gpu_second_usd", v));
    let sized = |field: &str, raw: &RawPerImage, errors: &mut Vec<String>| {
        let mut out = SizePrice::default();
        let entries: Vec<(&str, f64)> = match raw {
            RawPerImage::Flat(v) => vec![("default", *v)],
            RawPerImage::BySize(t) => t.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        };
        for (size, v) in entries {
            let path = if matches!(raw, RawPerImage::Flat(_)) { field.to_string() } else { format!("{field}.{size}") };
            if !(v.is_finite() && v >= 0.0) {
                errors.push(format!("{at}.{path}: must be a number >= 0"));
            }
            if size == "default" {
                out.default = Some(v);
            } else if crate::request::parse_size(size).is_err() {
                errors.push(format!("{at}.{path}: not a size like \"1024x1024\" (or \"default\")"));
            } else {
                out.by_size.insert(size.to_string(), v);
            }
        }
        out
    };
    let per_image = per_image.map(|r| sized("per_image_usd", r, errors));
    let quality = quality.iter().map(|(q, r)| (q.clone(), sized(&format!("quality.{q}"), r, errors))).collect();
    PriceTable { per_image, quality, per_step, per_gpu_second }
}

/// The connection fields of a provider: required ones present, unused ones refused.
fn validate_connection(
    at: &str,
    name: &str,
    kind: ProviderKind,
    p: &RawProvider,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Connection {
    use ProviderKind as K;
    let mut c = Connection::default();
    let kind_name = kind.name();
    let used: &[&str] = match kind {
        K::Builtin => &[],
        K::OpenAi => &["base_url", "api_key_env", "upstream_response_format"],
        K::AzureOpenAi => &["base_url", "api_key_env", "upstream_response_format", "api_version"],
        K::VertexImagen => &["base_url", "project", "location", "token_env", "token_command"],
        K::Stability => &["base_url", "api_key_env"],
        K::Fal | K::Replicate => &["base_url", "api_key_env", "poll_interval_ms", "max_poll_interval_ms"],
        K::A1111 => &["base_url", "auth_env"],
    };
    let set = [
        ("base_url", p.base_url.is_some()),
        ("api_key_env", p.api_key_env.is_some()),
        ("upstream_response_format", p.upstream_response_format.is_some()),
        ("api_version", p.api_version.is_some()),
        ("project", p.project.is_some()),
        ("location", p.location.is_some()),
        ("token_env", p.token_env.is_some()),
        ("token_command", p.token_command.is_some()),
        ("auth_env", p.auth_env.is_some()),
        ("poll_interval_ms", p.poll_interval_ms.is_some()),
        ("max_poll_interval_ms", p.max_poll_interval_ms.is_some()),
    ];
    for (field, is_set) in set {
        if is_set && !used.contains(&field) {
            errors.push(format!("{at}.{field}: not used by kind \"{kind_name}\""));
        }
    }
    let default_base = match kind {
        K::Stability => Some("https://api.stability.ai".to_string()),
        K::Fal => Some("https://queue.fal.run".to_string()),
        K::Replicate => Some("https://api.replicate.com/v1".to_string()),
        K::VertexImagen => p.location.as_ref().map(|l| format!("https://{l}-aiplatform.googleapis.com/v1")),
        _ => None,
    };
    if kind != K::Builtin {
        c.base_url = match (&p.base_url, default_base) {
            (Some(u), _) => {
                let u = u.trim_end_matches('/').to_string();
                match u.parse::<http::Uri>() {
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
                    _ => errors.push(format!("{at}.base_url: \"{u}\" is not an http(s) URL")),
                }
                u
            }
            (None, Some(d)) => d,
            (None, None) if kind == K::VertexImagen => String::new(),
            (None, None) => {
                errors.push(format!("{at}.base_url: required for kind \"{kind_name}\""));
                String::new()
            }
        };
    }
    let env_var = |field: &str, var: &Option<String>, errors: &mut Vec<String>, warnings: &mut Vec<String>| {
        if let Some(var) = var {
            let valid = !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                errors.push(format!("{at}.{field}: \"{var}\" is not an environment variable name"));
            } else if std::env::var_os(var).is_none() {
                warnings.push(format!(
                    "{at}.{field}: environment variable {var} is not set; attempts on provider \"{name}\" will fail"
                ));
            }
        }
        var.clone()
    };
    c.api_key_env = env_var("api_key_env", &p.api_key_env, errors, warnings);
    c.token_env = env_var("token_env", &p.token_env, errors, warnings);
    c.auth_env = env_var("auth_env", &p.auth_env, errors, warnings);
    c.upstream_format = match p.upstream_response_format.as_deref() {
        None | Some("b64_json") => UpstreamFormat::B64Json,
        Some("url") => UpstreamFormat::Url,
        Some("omit") => UpstreamFormat::Omit,
        Some(other) => {
            errors.push(format!(
                "{at}.upstream_response_format: unknown value \"{other}\" (expected \"b64_json\", \"url\" or \"omit\")"
            ));
            UpstreamFormat::B64Json
        }
    };
    match kind {
        K::AzureOpenAi => c.api_version = Some(p.api_version.clone().unwrap_or_else(|| "2024-10-21".to_string())),
        K::VertexImagen => {
            for (field, v) in [("project", &p.project), ("location", &p.location)] {
                match v.as_deref() {
                    None | Some("") => errors.push(format!("{at}.{field}: required for kind \"vertex_imagen\"")),
                    Some(x) if !x.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                        errors.push(format!("{at}.{field}: \"{x}\" is not a valid {field} id"))
                    }
                    _ => {}
                }
            }
            c.project = p.project.clone();
            c.location = p.location.clone();
            c.token_command = p.token_command.clone().unwrap_or_default();
            if p.token_command.as_ref().is_some_and(|v| v.is_empty() || v[0].is_empty()) {
                errors.push(format!(
                    "{at}.token_command: needs a program, e.g. [\"gcloud\", \"auth\", \"print-access-token\"]"
                ));
            }
            if c.token_env.is_none() && c.token_command.is_empty() {
                errors.push(format!("{at}: kind \"vertex_imagen\" needs token_env or token_command"));
            }
        }
        K::Fal | K::Replicate => {
            let first = p.poll_interval_ms.unwrap_or(500);
            let max = p.max_poll_interval_ms.unwrap_or(5000);
            if first == 0 || max < first {
                errors.push(format!("{at}.poll_interval_ms: must be > 0 and at most max_poll_interval_ms"));
            }
            c.poll_interval = Duration::from_millis(first.max(1));
            c.max_poll_interval = Duration::from_millis(max.max(first.max(1)));
        }
        _ => {}
    }
    c
}

fn validate_health(at: &str, r: &RawRoute, errors: &mut Vec<String>) -> crate::health::HealthSettings {
    let mut h = crate::health::HealthSettings::default();
    if let Some(ms) = r.latency_slo_ms {
        if ms == 0 {
            errors.push(format!("{at}.latency_slo_ms: must be greater than 0"));
        }
        h.latency_slo = Some(Duration::from_millis(ms));
    }
    for (field, v, slot) in [
        ("max_error_ratio", r.max_error_ratio, &mut h.max_error_ratio),
        ("max_eval_fail_ratio", r.max_eval_fail_ratio, &mut h.max_eval_fail_ratio),
    ] {
        if let Some(v) = v {
            if !(0.0..=1.0).contains(&v) {
                errors.push(format!("{at}.{field}: must be between 0 and 1"));
            }
            *slot = Some(v);
        }
    }
    match r.health_window {
        Some(n) if !(1..=10_000).contains(&n) => {
            errors.push(format!("{at}.health_window: must be between 1 and 10000"))
        }
        Some(n) => h.window = n as usize,
        None => {}
    }
    match r.health_window_secs {
        Some(0) => errors.push(format!("{at}.health_window_secs: must be greater than 0")),
        Some(s) => h.window_age = Duration::from_secs(s),
        None => {}
    }
    match r.health_min_samples {
        Some(0) => errors.push(format!("{at}.health_min_samples: must be greater than 0")),
        Some(n) => h.min_samples = n as usize,
        None => {}
    }
    if h.min_samples > h.window {
        errors.push(format!(
            "{at}.health_min_samples: {} is more than health_window ({}): the target would never be judged",
            h.min_samples, h.window
        ));
    }
    h
}

/// Mirror and canary candidates, appended to the route's targets with weight 0.
fn validate_candidates(
    at: &str,
    r: &RawRoute,
    targets: &mut Vec<Target>,
    known: &dyn Fn(&str) -> bool,
    errors: &mut Vec<String>,
) -> (Vec<Mirror>, Option<Canary>) {
    let label = |p: &str, m: Option<&str>| m.map_or_else(|| p.to_string(), |m| format!("{p}/{m}"));
    let mut mirrors: Vec<Mirror> = Vec::new();
    for (i, m) in r.mirror.iter().enumerate() {
        let at = format!("{at}.mirror[{i}]");
        let before = errors.len();
        if !known(&m.provider) {
            errors.push(format!("{at}.provider: unknown provider \"{}\"", m.provider));
        }
        if m.model.as_deref() == Some("") {
            errors.push(format!("{at}.model: must not be empty"));
        }
        if !(0.0..=1.0).contains(&m.sample) {
            errors.push(format!("{at}.sample: must be between 0 and 1"));
        }
        if m.max_in_flight == Some(0) {
            errors.push(format!("{at}.max_in_flight: must be greater than 0"));
        }
        if m.spend_usd_per_day.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            errors.push(format!("{at}.spend_usd_per_day: must be a number >= 0"));
        }
        let name = label(&m.provider, m.model.as_deref());
        if mirrors.iter().any(|x| x.label == name) {
            errors.push(format!("{at}: candidate \"{name}\" is mirrored twice"));
        }
        if errors.len() > before {
            continue;
        }
        targets.push(Target {
            provider: m.provider.clone(),
            model: m.model.clone(),
            weight: 0,
            role: TargetRole::Mirror,
        });
        mirrors.push(Mirror {
            target: targets.len() - 1,
            label: name,
            sample: m.sample,
            max_in_flight: m.max_in_flight.unwrap_or(4) as usize,
            spend_usd_per_day: m.spend_usd_per_day,
        });
    }
    let canary = r.canary.as_ref().and_then(|c| {
        let at = format!("{at}.canary");
        let before = errors.len();
        if !known(&c.provider) {
            errors.push(format!("{at}.provider: unknown provider \"{}\"", c.provider));
        }
        if c.model.as_deref() == Some("") {
            errors.push(format!("{at}.model: must not be empty"));
        }
        if !(c.share > 0.0 && c.share <= 1.0) {
            errors.push(format!("{at}.share: must be greater than 0 and at most 1"));
        }
        if c.min_samples == Some(0) {
            errors.push(format!("{at}.min_samples: must be greater than 0"));
        }
        for (field, v) in
            [("max_eval_fail_increase", c.max_eval_fail_increase), ("max_error_increase", c.max_error_increase)]
        {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                errors.push(format!("{at}.{field}: must be between 0 and 1"));
            }
        }
        if c.max_p99_ratio.is_some_and(|v| !(v.is_finite() && v >= 1.0)) {
            errors.push(format!("{at}.max_p99_ratio: must be at least 1"));
        }
        if errors.len() > before {
            return None;
        }
        let guard = crate::compare::Guard {
            min_samples: c.min_samples.unwrap_or(50),
            max_eval_fail_increase: c.max_eval_fail_increase.unwrap_or(0.05),
            max_error_increase: c.max_error_increase.unwrap_or(0.05),
            max_p99_ratio: c.max_p99_ratio.unwrap_or(1.5),
            alpha: 0.05,
        };
        let name = label(&c.provider, c.model.as_deref());
        let fingerprint = format!("{name}|{}|{:?}", c.share, guard);
        targets.push(Target {
            provider: c.provider.clone(),
            model: c.model.clone(),
            weight: 0,
            role: TargetRole::Canary,
        });
        Some(Canary { target: targets.len() - 1, label: name, share: c.share, guard, fingerprint })
    });
    (mirrors, canary)
}

fn validate_hedge(at: &str, h: &RawHedge, errors: &mut Vec<String>) -> Option<Hedge> {
    let before = errors.len();
    let after_p95 = match h.after.as_deref() {
        None => false,
        Some("p95") => true,
        Some(other) => {
            errors.push(format!("{at}.hedge.after: unknown value \"{other}\" (expected \"p95\", or use after_ms)"));
            false
        }
    };
    let after = match h.after_ms {
        Some(0) => {
            errors.push(format!("{at}.hedge.after_ms: must be greater than 0"));
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms),
        None => {
            errors.push(format!(
                "{at}.hedge.after_ms: required (with after = \"p95\" it is used until the target has enough samples)"
            ));
            Duration::ZERO
        }
    };
    if h.min_after_ms.is_some() && !after_p95 {
        errors.push(format!("{at}.hedge.min_after_ms: only used with after = \"p95\""));
    }
    let max_parallel = match h.max_parallel {
        None => 2,
        Some(n) if (2..=8).contains(&n) => n as usize,
        Some(_) => {
            errors.push(format!("{at}.hedge.max_parallel: must be between 2 and 8"));
            2
        }
    };
    (errors.len() == before).then(|| Hedge {
        after,
        after_p95,
        min_after: Duration::from_millis(h.min_after_ms.unwrap_or(0)),
        max_parallel,
    })
}

fn validate_classifier(
    at: &str,
    name: &str,
    c: &RawClassifier,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<crate::eval::classifier::ClassifierSpec> {
    use crate::eval::classifier::{Activation, ClassifierSpec};
    let before = errors.len();
    let activation = match c.activation.as_deref() {
        None | Some("softmax") => Activation::Softmax,
        Some("sigmoid") => Activation::Sigmoid,
        Some("none") => Activation::None,
        Some(other) => {
            errors.push(format!("{at}.activation: unknown activation \"{other}\" (expected softmax, sigmoid or none)"));
            Activation::Softmax
        }
    };
    if !(1..=4096).contains(&c.input_size) {
        errors.push(format!("{at}.input_size: must be between 1 and 4096"));
    }
    if c.std.contains(&0.0) {
        errors.push(format!("{at}.std: must not contain 0"));
    }
    if c.labels.is_empty() {
        errors.push(format!("{at}.labels: a classifier needs at least one label"));
    }
    for (j, l) in c.unsafe_labels.iter().enumerate() {
        if !c.labels.contains(l) {
            errors.push(format!("{at}.unsafe_labels[{j}]: \"{l}\" is not one of labels"));
        }
    }
    let path = std::path::PathBuf::from(&c.model);
    let model = if path.is_absolute() { path } else { crate::eval::onnx::models_dir().join(path) };
    if !model.is_file() {
        warnings.push(format!(
            "{at}.model: {} does not exist; routes using \"{name}\" get an error verdict",
            model.display()
        ));
    }
    (errors.len() == before).then(|| ClassifierSpec {
        name: name.to_string(),
        model,
        input_size: c.input_size,
        mean: c.mean,
        std: c.std,
        activation,
        labels: c.labels.clone(),
        unsafe_labels: c.unsafe_labels.clone(),
    })
}

fn validate_eval(
    at: &str,
    r: &RawRoute,
    classifiers: &BTreeMap<String, std::sync::Arc<crate::eval::classifier::ClassifierSpec>>,
    clip: Option<&std::sync::Arc<crate::eval::clip::ClipConfig>>,
    errors: &mut Vec<String>,
) -> EvalPolicy {
    let mut evaluators: Vec<String> = Vec::new();
    for (j, e) in r.evaluators.iter().enumerate() {
        if evaluators.contains(e) {
            errors.push(format!("{at}.evaluators[{j}]: \"{e}\" is listed twice"));
        } else if !AVAILABLE_EVALUATORS.contains(&e.as_str()) {
            errors.push(format!(
                "{at}.evaluators[{j}]: unknown evaluator \"{e}\" (available: {})",
                AVAILABLE_EVALUATORS.join(", ")
            ));
        } else {
            evaluators.push(e.clone());
        }
    }
    let action = |field: &str, v: Option<&str>, errors: &mut Vec<String>| match v {
        None | Some("fallback") => EvalAction::Fallback,
        Some("block") => EvalAction::Block,
        Some("flag") => EvalAction::Flag,
        Some("review") => {
            errors.push(format!("{at}.{field}: \"review\" needs the review queue, which this build does not have yet"));
            EvalAction::Fallback
        }
        Some(other) => {
            errors.push(format!(
                "{at}.{field}: unknown action \"{other}\" (expected \"fallback\", \"block\" or \"flag\")"
            ));
            EvalAction::Fallback
        }
    };
    let on_sanity_fail = action("on_sanity_fail", r.on_sanity_fail.as_deref(), errors);
    let on_unsafe = action("on_unsafe", r.on_unsafe.as_deref(), errors);
    let on_low_adherence = action("on_low_adherence", r.on_low_adherence.as_deref(), errors);
    let on_text_fail = action("on_text_fail", r.on_text_fail.as_deref(), errors);
    let text = crate::eval::text::TextRules {
        require: r.require_text.clone(),
        forbid: r.forbid_text.clone(),
        forbid_any: r.forbid_any_text,
    };
    if !text.is_empty() && !r.evaluators.iter().any(|e| e == "text") {
        errors.push(format!("{at}: require_text, forbid_text and forbid_any_text need \"text\" in evaluators"));
    }
    let min_adherence = r.min_adherence.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&min_adherence) {
        errors.push(format!("{at}.min_adherence: {min_adherence} is outside [0, 1]"));
    }
    let max_unsafe = r.max_unsafe.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&max_unsafe) {
        errors.push(format!("{at}.max_unsafe: {max_unsafe} is outside [0, 1]"));
    }
    if let Some(classes) = &r.unsafe_classes {
        for (j, c) in classes.iter().enumerate() {
            if !crate::eval::nudenet::CLASSES.contains(&c.as_str()) {
                errors.push(format!("{at}.unsafe_classes[{j}]: unknown NudeNet class \"{c}\""));
            }
        }
    }
    let fail_open = match r.on_eval_error.as_deref() {
        None | Some("fail_closed") => false,
        Some("fail_open") => true,
        Some(other) => {
            errors.push(format!(
                "{at}.on_eval_error: unknown value \"{other}\" (expected \"fail_open\" or \"fail_closed\")"
            ));
            false
        }
    };
    let budget = positive_ms(&format!("{at}.eval_budget_ms"), r.eval_budget_ms, 5_000, errors);
    let safety_settings = r.on_unsafe.is_some() || r.max_unsafe.is_some() || r.unsafe_classes.is_some();
    if evaluators.is_empty()
        && (r.on_sanity_fail.is_some() || r.eval_budget_ms.is_some() || r.on_eval_error.is_some() || safety_settings)
    {
        errors.push(format!("{at}: evaluation settings given, but the route names no evaluators"));
    } else if safety_settings
        && !evaluators.iter().any(|e| e == "safety")
        && !r.evaluators.iter().any(|e| e == "safety")
    {
        errors.push(format!("{at}: on_unsafe, max_unsafe and unsafe_classes need \"safety\" in evaluators"));
    }
    let mut safety_models = Vec::new();
    for (j, m) in r.safety_models.clone().unwrap_or_else(|| vec!["nudenet".into()]).iter().enumerate() {
        match (m.as_str(), classifiers.get(m)) {
            ("nudenet", _) => safety_models.push(crate::eval::SafetyModel::NudeNet),
            (_, Some(spec)) => safety_models.push(crate::eval::SafetyModel::Classifier(spec.clone())),
            (_, None) => errors
                .push(format!("{at}.safety_models[{j}]: unknown model \"{m}\" (\"nudenet\" or a [classifiers.NAME])")),
        }
    }
    if r.safety_models.is_some() && !r.evaluators.iter().any(|e| e == "safety") {
        errors.push(format!("{at}.safety_models: needs \"safety\" in evaluators"));
    }
    let clip = match (r.min_clip_similarity, clip) {
        (None, _) => None,
        (Some(_), None) => {
            errors.push(format!("{at}.min_clip_similarity: needs a [clip] section with the encoder models"));
            None
        }
        (Some(min), Some(cfg)) => {
            if !(-1.0..=1.0).contains(&min) {
                errors.push(format!("{at}.min_clip_similarity: {min} is outside [-1, 1]"));
            }
            if !r.evaluators.iter().any(|e| e == "adherence") {
                errors.push(format!("{at}.min_clip_similarity: needs \"adherence\" in evaluators"));
            }
            Some((cfg.clone(), min))
        }
    };
    let settings = crate::eval::Settings {
        unsafe_classes: r.unsafe_classes.clone(),
        max_unsafe,
        min_adherence,
        text,
        safety_models,
        clip,
    };
    EvalPolicy { evaluators, on_sanity_fail, on_unsafe, on_low_adherence, on_text_fail, budget, fail_open, settings }
}

fn positive_ms(at: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>) -> Duration {
    match v {
        Some(0) => {
            errors.push(format!("{at}: must be greater than 0"));
            Duration::from_millis(default)
        }
        v => Duration::from_millis(v.unwrap_or(default)),
    }
}

/// Names end up as metric label values and in headers: keep them to a safe alphabet.
fn check_name(at: &str, name: &str, errors: &mut Vec<String>) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        errors.push(format!("{at}: \"{name}\" must be 1 to 64 characters of A-Z a-z 0-9 _ - ."));
    }
}

/// `line L, column C: message` for a TOML error, which is how ops find it in an editor.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)]) -> Result<Policy, Vec<String>> {
        validate(&Sources { files: files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect() })
    }

    const PROVIDERS: &str = r#"
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
[providers.demo]
kind = "builtin"
"#;

    #[test]
    fn unknown_provider_names_file_and_path() {
        let routes = r#"
[[routes]]
name = "a"
match = { model = "m1" }
targets = [{ provider = "demo" }]
[[routes]]
name = "b"
match = { model = "m2" }
targets = [{ provider = "opnai", model = "x" }]
"#;
        let errs = check(&[("providers.toml", PROVIDERS), ("routes.toml", routes)]).unwrap_err();
        assert_eq!(errs, vec![r#"routes.toml: routes[1].targets[0].provider: unknown provider "opnai""#]);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let routes = r#"
[[routes]]
name = "a"
targets = [{ provider = "demo", weight = 0 }]
fallbacks = ["a", "nope"]
attempt_timeout_ms = 0
url_mode = "cdn"
"#;
        let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "r.toml: routes[0].targets: weights sum to zero",
                "r.toml: routes[0].fallbacks[0]: a route cannot fall back to itself",
                r#"r.toml: routes[0].fallbacks[1]: unknown route "nope""#,
                "r.toml: routes[0].attempt_timeout_ms: must be greater than 0",
                r#"r.toml: routes[0].url_mode: unknown mode "cdn" (expected "gateway" or "provider")"#,
            ]
        );
    }

    #[test]
    fn unknown_fields_and_syntax_errors_give_line_and_column() {
        let errs = check(&[("a.toml", "[providers.x]\nkind = \"builtin\"\ncolour = 3\n")]).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("a.toml: line 3, column 1: unknown field `colour`"), "{}", errs[0]);
        let errs = check(&[("b.toml", "[[routes]\n")]).unwrap_err();
        assert!(errs[0].starts_with("b.toml: line 1, column"), "{}", errs[0]);
    }

    #[test]
    fn kinds_are_checked() {
        let errs =
            check(&[("p.toml", "[providers.s]\nkind = \"stabilty\"\n[providers.t]\nkind = \"fal\"\n")]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"p.toml: providers.s.kind: unknown kind "stabilty" (expected one of openai, azure_openai, vertex_imagen, stability, fal, replicate, a1111, builtin)"#,
            ]
        );
        // Each kind takes its own connection fields, and needs the ones it cannot do without.
        let p = r#"
[providers.v]
kind = "vertex_imagen"
location = "us-central1"
[providers.o]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_version = "2024-10-21"
[providers.a]
kind = "a1111"
[providers.r]
kind = "replicate"
poll_interval_ms = 900
max_poll_interval_ms = 100
"#;
        let errs = check(&[("p.toml", p)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"p.toml: providers.a.base_url: required for kind "a1111""#,
                r#"p.toml: providers.o.api_version: not used by kind "openai""#,
                "p.toml: providers.r.poll_interval_ms: must be > 0 and at most max_poll_interval_ms",
                r#"p.toml: providers.v.project: required for kind "vertex_imagen""#,
                r#"p.toml: providers.v: kind "vertex_imagen" needs token_env or token_command"#,
            ]
        );
        let ok = check(&[(
            "p.toml",
            "[providers.f]\nkind = \"fal\"\n[providers.z]\nkind = \"azure_openai\"\nbase_url = \"https://x.openai.azure.com\"\n[[routes]]\nname = \"r\"\ntargets = [{ provider = \"f\" }]\n",
        )])
        .unwrap();
        assert_eq!(ok.providers["f"].conn.base_url, "https://queue.fal.run");
        assert_eq!(ok.providers["z"].conn.api_version.as_deref(), Some("2024-10-21"));
        let errs = check(&[("p.toml", "[providers.o]\nkind = \"openai\"\nbase_url = \"ftp://x\"\n")]).unwrap_err();
        assert_eq!(errs, vec![r#"p.toml: providers.o.base_url: "ftp://x" is not an http(s) URL"#]);
    }

    #[test]
    fn resilience_settings_are_validated() {
        let p = r#"
[providers.o]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 0
breaker = { consecutive_failures = 0, cooldown_ms = 0 }
price = { per_image_usd = { "1024x1024" = -1.0, "huge" = 0.1 } }
[providers.q]
kind = "openai"
base_url = "http://x/v1"
max_queue = 3
[providers.r]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 2
on_queue_full = "drop"
[tenants.acme]
spend_usd_per_day = -5.0
[[routes]]
name = "a"
targets = [{ provider = "o" }]
max_error_ratio = 1.5
health_window = 10
health_min_samples = 11
hedge = { after = "p99", max_parallel = 1 }
"#;
        let errs = check(&[("p.toml", p)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "p.toml: tenants.acme.spend_usd_per_day: must be a number >= 0",
                "p.toml: providers.o.max_concurrency: must be greater than 0 (leave it out for no limit)",
                "p.toml: providers.o.breaker.consecutive_failures: must be greater than 0",
                "p.toml: providers.o.breaker.cooldown_ms: must be greater than 0",
                "p.toml: providers.o.price.per_image_usd.1024x1024: must be a number >= 0",
                r#"p.toml: providers.o.price.per_image_usd.huge: not a size like "1024x1024" (or "default")"#,
                "p.toml: providers.q.max_queue: needs max_concurrency",
                r#"p.toml: providers.r.on_queue_full: unknown action "drop" (expected "fallback" or "reject")"#,
                "p.toml: routes[0].max_error_ratio: must be between 0 and 1",
                "p.toml: routes[0].health_min_samples: 11 is more than health_window (10): the target would never be judged",
                r#"p.toml: routes[0].hedge.after: unknown value "p99" (expected "p95", or use after_ms)"#,
                r#"p.toml: routes[0].hedge.after_ms: required (with after = "p95" it is used until the target has enough samples)"#,
                "p.toml: routes[0].hedge.max_parallel: must be between 2 and 8",
            ]
        );
    }

    #[test]
    fn resilience_settings_have_defaults_and_are_read() {
        let p = r#"
[[keys]]
sha256 = "904fc520be4ca9db80d0ffcc6bf7e01b4148e33d45bb6b422ad2e607815fb508"
tenant = "acme"
images_per_minute = 10
[providers.o]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 4
price = { per_image_usd = { "1024x1024" = 0.04, default = 0.02 } }
[providers.d]
kind = "builtin"
breaker = { enabled = false }
[[routes]]
name = "a"
targets = [{ provider = "o" }, { provider = "d" }]
latency_slo_ms = 3000
hedge = { after_ms = 500 }
"#;
        let pol = check(&[("p.toml", p)]).unwrap();
        let o = &pol.providers["o"];
        assert_eq!(
            o.concurrency,
            Some(Concurrency { max: 4, max_queue: 4, queue_timeout: None, reject_when_full: false })
        );
        assert!(o.breaker.enabled && !pol.providers["d"].breaker.enabled);
        let price = o.price.as_ref().unwrap();
        assert_eq!((price.per_image("1024x1024"), price.per_image("512x512")), (Some(0.04), Some(0.02)));
        let r = &pol.routes[0];
        assert_eq!(r.health.latency_slo, Some(Duration::from_secs(3)));
        assert_eq!(r.health.min_samples, 20);
        let h = r.hedge.as_ref().unwrap();
        assert_eq!((h.after, h.after_p95, h.max_parallel), (Duration::from_millis(500), false, 2));
        let key = pol.keys.values().next().unwrap();
        assert_eq!((key.images_per_minute, key.requests_per_minute, key.id.len()), (Some(10), None, 12));
    }

    #[test]
    fn mirrors_and_canaries_are_validated_and_appended_as_weightless_targets() {
        let bad = r#"
[providers.a]
kind = "builtin"
[[routes]]
name = "r"
targets = [{ provider = "a" }]
mirror = [{ provider = "nope", sample = 1.5 }, { provider = "a", model = "x", sample = 0.1, max_in_flight = 0 },
          { provider = "a", sample = 0.1 }, { provider = "a", sample = 0.2 }]
canary = { provider = "a", share = 0.0, max_p99_ratio = 0.5 }
"#;
        let errs = check(&[("p.toml", bad)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"p.toml: routes[0].mirror[0].provider: unknown provider "nope""#,
                "p.toml: routes[0].mirror[0].sample: must be between 0 and 1",
                "p.toml: routes[0].mirror[1].max_in_flight: must be greater than 0",
                r#"p.toml: routes[0].mirror[3]: candidate "a" is mirrored twice"#,
                "p.toml: routes[0].canary.share: must be greater than 0 and at most 1",
                "p.toml: routes[0].canary.max_p99_ratio: must be at least 1",
            ]
        );
        let good = r#"
[providers.a]
kind = "builtin"
[providers.b]
kind = "builtin"
[[routes]]
name = "r"
match = { model = "m" }
targets = [{ provider = "a" }]
mirror = [{ provider = "b", model = "v2", sample = 0.25 }]
canary = { provider = "b", share = 0.1 }
"#;
        let p = check(&[("p.toml", good)]).unwrap();
        let r = &p.routes[0];
        let roles: Vec<_> = r.targets.iter().map(|t| (t.provider.as_str(), t.weight, t.role)).collect();
        assert_eq!(roles, [("a", 1, TargetRole::Serve), ("b", 0, TargetRole::Mirror), ("b", 0, TargetRole::Canary)]);
        assert_eq!((r.mirrors[0].label.as_str(), r.mirrors[0].target, r.mirrors[0].max_in_flight), ("b/v2", 1, 4));
        let c = r.canary.as_ref().unwrap();
        assert_eq!((c.target, c.guard.min_samples, c.guard.max_p99_ratio), (2, 50, 1.5));
        // Weightless candidates are never planned by weight.
        for i in 0..100 {
            let steps = crate::routing::plan(&p, 0, i as f64 / 100.0);
            assert_eq!(steps, [crate::routing::Step { route: 0, target: 0 }]);
        }
    }

    #[test]
    fn prices_by_model_size_quality_step_and_gpu_second() {
        let p = r#"
[providers.o]
kind = "openai"
base_url = "http://x/v1"
price = { per_image_usd = { "1024x1024" = 0.04, default = 0.05 }, quality = { hd = { "1024x1024" = 0.08 } }, models = { "sdxl" = { per_step_usd = 0.0001, per_gpu_second_usd = 0.002 } } }
[[routes]]
name = "r"
targets = [{ provider = "o" }]
"#;
        let pol = check(&[("p.toml", p)]).unwrap();
        let price = pol.providers["o"].price.as_ref().unwrap();
        let b = |model, size, quality, images, steps, gpu| Billable {
            model,
            size,
            quality,
            images,
            steps,
            gpu_seconds: gpu,
        };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
        assert!(close(price.cost(&b("dall-e-3", "1024x1024", None, 2, None, None)), 0.08));
        assert!(close(price.cost(&b("dall-e-3", "1024x1024", Some("hd"), 2, None, None)), 0.16));
        assert!(
            close(price.cost(&b("dall-e-3", "1792x1024", Some("hd"), 1, None, None)), 0.05),
            "no hd price for the size"
        );
        // A model's table replaces the provider's: 30 steps x 2 images x 0.0001 + 4 s x 0.002.
        assert!(close(price.cost(&b("sdxl", "1024x1024", None, 2, Some(30), Some(4.0))), 0.006 + 0.008));
        assert_eq!(price.cost(&b("sdxl", "1024x1024", None, 1, None, None)), None, "nothing applies");
        let errs = check(&[("p.toml", &p.replace("0.0001", "-1.0"))]).unwrap_err();
        assert_eq!(errs, vec!["p.toml: providers.o.price.models.sdxl.per_step_usd: must be a number >= 0"]);
    }

    #[test]
    fn duplicates_across_files_are_refused() {
        let a = "[providers.demo]\nkind = \"builtin\"\n[[routes]]\nname = \"r\"\ntargets = [{ provider = \"demo\" }]\n";
        let errs = check(&[("a.toml", a), ("b.toml", a)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"b.toml: providers.demo: provider "demo" is already defined in a.toml"#,
                r#"b.toml: routes[0].name: duplicate route name "r""#,
            ]
        );
    }

    #[test]
    fn keys_need_a_digest_and_default_model_an_alias() {
        let p = format!(
            "{PROVIDERS}default_model = \"nope\"\n[[keys]]\nsha256 = \"abc\"\ntenant = \"t\"\n[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"demo\" }}]\n"
        );
        // default_model after a table header belongs to that table: TOML rejects it as unknown.
        assert!(check(&[("p.toml", &p)]).is_err());
        let p = format!(
            "default_model = \"nope\"\n{PROVIDERS}[[keys]]\nsha256 = \"abc\"\ntenant = \"t\"\n[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"demo\" }}]\n"
        );
        let errs = check(&[("p.toml", &p)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "p.toml: keys[0].sha256: expected 64 hex characters (the SHA-256 of the key)",
                r#"p.toml: default_model: "nope" is not the match.model of any route"#,
            ]
        );
    }

    #[test]
    fn evaluator_settings_are_checked() {
        let routes = r#"
[[routes]]
name = "a"
targets = [{ provider = "demo" }]
evaluators = ["sanity", "clip", "vibes", "sanity"]
on_sanity_fail = "review"
on_eval_error = "maybe"
"#;
        let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"r.toml: routes[0].evaluators[1]: unknown evaluator "clip" (available: sanity, safety, text, adherence)"#,
                r#"r.toml: routes[0].evaluators[2]: unknown evaluator "vibes" (available: sanity, safety, text, adherence)"#,
                r#"r.toml: routes[0].evaluators[3]: "sanity" is listed twice"#,
                r#"r.toml: routes[0].on_sanity_fail: "review" needs the review queue, which this build does not have yet"#,
                r#"r.toml: routes[0].on_eval_error: unknown value "maybe" (expected "fail_open" or "fail_closed")"#,
            ]
        );
        let ok = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"sanity\"]\non_sanity_fail = \"block\"\neval_budget_ms = 250\n";
        let p = check(&[("p.toml", PROVIDERS), ("r.toml", ok)]).unwrap();
        assert_eq!(
            p.routes[0].eval,
            EvalPolicy {
                evaluators: vec!["sanity".into()],
                on_sanity_fail: EvalAction::Block,
                on_unsafe: EvalAction::Fallback,
                on_low_adherence: EvalAction::Fallback,
                on_text_fail: EvalAction::Fallback,
                budget: Duration::from_millis(250),
                fail_open: false,
                settings: crate::eval::Settings::default(),
            }
        );
        let bad = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"safety\"]\nmax_unsafe = 1.5\nunsafe_classes = [\"FACE_FEMALE\", \"NOSE\"]\non_unsafe = \"block\"\n";
        let errs = check(&[("p.toml", PROVIDERS), ("r.toml", bad)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "r.toml: routes[0].max_unsafe: 1.5 is outside [0, 1]",
                r#"r.toml: routes[0].unsafe_classes[1]: unknown NudeNet class "NOSE""#,
            ]
        );
    }

    #[test]
    fn custom_safety_classifiers_are_checked() {
        let text = r#"
[classifiers.nsfw]
model = "/models/nsfw.onnx"
input_size = 224
std = [0.2, 0.0, 0.2]
activation = "relu"
labels = ["neutral", "porn"]
unsafe_labels = ["porn", "gore"]

[classifiers.ok]
model = "/models/ok.onnx"
input_size = 16
labels = ["safe", "unsafe"]
unsafe_labels = ["unsafe"]

[[routes]]
name = "a"
targets = [{ provider = "demo" }]
evaluators = ["safety"]
safety_models = ["nudenet", "ok", "nope"]
"#;
        let errs = check(&[("p.toml", PROVIDERS), ("c.toml", text)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"c.toml: classifiers.nsfw.activation: unknown activation "relu" (expected softmax, sigmoid or none)"#,
                "c.toml: classifiers.nsfw.std: must not contain 0",
                r#"c.toml: classifiers.nsfw.unsafe_labels[1]: "gore" is not one of labels"#,
                r#"c.toml: routes[0].safety_models[2]: unknown model "nope" ("nudenet" or a [classifiers.NAME])"#,
            ]
        );
        let good = text
            .replace(", \"nope\"", "")
            .replace("[classifiers.nsfw]", "[classifiers.unused]")
            .replace("std = [0.2, 0.0, 0.2]\nactivation = \"relu\"\n", "")
            .replace(", \"gore\"", "");
        let p = check(&[("p.toml", PROVIDERS), ("c.toml", &good)]).unwrap();
        assert_eq!(p.routes[0].eval.settings.safety_models.len(), 2);
        assert!(p.warnings.iter().any(|w| w.contains("/models/ok.onnx does not exist")), "{:?}", p.warnings);
    }

    #[test]
    fn a_valid_policy_resolves_references() {
        let routes = r#"
default_model = "m"
[[routes]]
name = "main"
match = { model = "m", cohort = "c" }
targets = [{ provider = "openai", model = "gpt-image-1", weight = 3 }, { provider = "demo" }]
fallbacks = ["safe"]
[[routes]]
name = "safe"
targets = [{ provider = "demo" }]
"#;
        let p = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap();
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[0].fallbacks, vec![1]);
        assert_eq!(p.routes[0].targets[0].weight, 3);
        assert_eq!(p.routes[0].attempt_timeout, Duration::from_secs(60));
        assert_eq!(p.aliases.iter().collect::<Vec<_>>(), vec!["m"]);
        assert_eq!(p.server, ServerSettings::default());
        assert_eq!(p.version.len(), 12);
    }
}
