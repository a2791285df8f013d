//! The validated runtime types: what the request path reads from a policy snapshot. Every value
//! here passed validation, and names that refer elsewhere (fallback routes, mirror targets) are
//! resolved to indices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// `[server]`: limits of the listener and how gateway-served image URLs look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Largest JSON request body, bytes (default 8 MiB).
    pub max_json_body_bytes: usize,
    /// Largest multipart request body (edits, variations), bytes (default 32 MiB).
    pub max_multipart_body_bytes: usize,
    /// Lifetime of a gateway-served image URL (default one hour).
    pub url_ttl: Duration,
    /// Base of gateway-served image URLs, without a trailing slash; `None`: the request's Host.
    pub public_base_url: Option<String>,
    /// Requests handled at once; more are shed with 503 (default 4096).
    pub max_in_flight: usize,
    /// How long an `Idempotency-Key`'s answer is kept for replay (default one day).
    pub idempotency_ttl: Duration,
    /// Memory for kept answers, bytes (default 256 MiB).
    pub idempotency_max_bytes: usize,
    /// Time to receive a whole request body once its headers are in (default 30 s); a slower
    /// sender gets 408 and its connection is closed.
    pub body_timeout: Duration,
    /// Memory for request bodies being received, all requests together, bytes (default 512
    /// MiB); a request that would go over it gets 503.
    pub max_body_buffer_bytes: usize,
    /// Memory for provider answers being read, all attempts together, bytes (default 1 GiB);
    /// an attempt whose answer would go over it fails (`answer_memory_full`) and the next
    /// target is tried.
    pub max_answer_buffer_bytes: usize,
    /// Time for a request's headers, and idle time between requests on a connection, on both
    /// listeners (default 30 s; read at start-up).
    pub idle_timeout: Duration,
    /// Connections open at once on the proxy listener; `None`: derived from the open-file
    /// limit at start-up.
    pub max_connections: Option<usize>,
    /// Connections open at once on the admin listener (default 256).
    pub admin_max_connections: usize,
    /// TLS on both listeners: the certificate chain and private key files (PEM), checked when
    /// the policy is validated; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// `[server.tls]`: where the listeners' certificate chain and key are (paths as written,
/// relative to the working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
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
            body_timeout: Duration::from_secs(30),
            max_body_buffer_bytes: 512 << 20,
            max_answer_buffer_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(30),
            max_connections: None,
            admin_max_connections: 256,
            tls: None,
        }
    }
}

/// One API key the gateway accepts (`[[keys]]`), found by the SHA-256 of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The tenant the key's requests, limits and spend count against.
    pub tenant: String,
    /// Tags routes can match on (`match.key_tags`).
    pub tags: Vec<String>,
    /// Short, non-secret name of the key for logs and limiter state: the digest's first 12 hex digits.
    pub id: String,
    /// Requests per minute this key may make; `None`: no limit.
    pub requests_per_minute: Option<u32>,
    /// Images per minute (the `n` of each request) this key may ask for; `None`: no limit.
    pub images_per_minute: Option<u32>,
}

/// Limits shared by every key of one tenant (`[tenants.NAME]`); `None`: no limit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TenantLimits {
    /// Requests per minute, all the tenant's keys together.
    pub requests_per_minute: Option<u32>,
    /// Images per minute, all the tenant's keys together.
    pub images_per_minute: Option<u32>,
    /// Spend per UTC day, USD, from the providers' prices.
    pub spend_usd_per_day: Option<f64>,
    /// Requests of the tenant's keys handled at once; more get 429 `rate_limit_exceeded`.
    pub max_in_flight: Option<u32>,
}

/// A price by size: one number (`default`) or a table with an optional default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SizePrice {
    /// USD by size (`"1024x1024"`).
    pub by_size: BTreeMap<String, f64>,
    /// USD for a size the table does not name.
    pub default: Option<f64>,
}

impl SizePrice {
    /// USD for `size` (`"1024x1024"`): its own entry, else the default; `None` without either.
    pub fn get(&self, size: &str) -> Option<f64> {
        self.by_size.get(size).copied().or(self.default)
    }
}

/// One price table: per image (by quality, then by size), per step, per GPU-second.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PriceTable {
    /// USD per image, by size.
    pub per_image: Option<SizePrice>,
    /// USD per image by `quality` ("hd", "high", ...), by size; beats `per_image`.
    pub quality: BTreeMap<String, SizePrice>,
    /// USD per sampling step per image, added to the per-image price.
    pub per_step: Option<f64>,
    /// USD per GPU-second the provider reports, added too.
    pub per_gpu_second: Option<f64>,
}

/// What a provider charges: its own table, and tables of given models that replace it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Price {
    /// The provider's own table.
    pub base: PriceTable,
    /// Tables by model name (the target's model); one found replaces `base` entirely.
    pub models: BTreeMap<String, PriceTable>,
}

/// What was generated, as far as price goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Billable<'a> {
    /// The model name sent to the provider.
    pub model: &'a str,
    /// The size generated, `"1024x1024"`.
    pub size: &'a str,
    /// The `quality` asked for, if any.
    pub quality: Option<&'a str>,
    /// Images generated.
    pub images: u32,
    /// Sampling steps per image, where the provider takes them.
    pub steps: Option<u32>,
    /// GPU time the provider reported, seconds.
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
    /// Attempts in flight at once on the provider.
    pub max: u32,
    /// Attempts that may wait for a slot (default: `max`).
    pub max_queue: u32,
    /// Longest wait for a slot; `None`: the attempt's timeout.
    pub queue_timeout: Option<Duration>,
    /// A full queue ends the request (503) instead of moving on to the next target.
    pub reject_when_full: bool,
}

/// Hedging: a second attempt starts when the first is slow.
#[derive(Debug, Clone, PartialEq)]
pub struct Hedge {
    /// Delay before the next target starts (also the p95 mode's delay until it has samples).
    pub after: Duration,
    /// Use the first target's observed p95 (bounded below by `min_after`) once it has enough samples.
    pub after_p95: bool,
    /// Lower bound of the p95-based delay (zero when not given).
    pub min_after: Duration,
    /// Attempts in flight at once, 2 to 8 (default 2).
    pub max_parallel: usize,
}

/// What an OpenAI-shaped provider is asked for (`upstream_response_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFormat {
    /// `response_format = "b64_json"`: the image bytes inline (default).
    B64Json,
    /// `response_format = "url"`: a URL the gateway fetches.
    Url,
    /// No `response_format` sent at all (models such as gpt-image-1 refuse the field).
    Omit,
}

/// The API family of a provider (`kind`), which picks its adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `builtin`: the demo provider inside the gateway.
    Builtin,
    /// `openai`: the OpenAI Images API.
    OpenAi,
    /// `azure_openai`: OpenAI image models on Azure.
    AzureOpenAi,
    /// `vertex_imagen`: Imagen on Google Cloud Vertex AI.
    VertexImagen,
    /// `stability`: the Stability AI API.
    Stability,
    /// `fal`: fal.ai's queue API (asynchronous, polled).
    Fal,
    /// `replicate`: Replicate predictions (asynchronous, polled).
    Replicate,
    /// `a1111`: a self-hosted AUTOMATIC1111 Stable Diffusion web UI.
    A1111,
}

impl ProviderKind {
    /// The kind as policy files spell it (`"azure_openai"`).
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

    /// The kind spelt `s` in a policy file; `None` for an unknown one.
    pub(super) fn parse(s: &str) -> Option<ProviderKind> {
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
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// openai / azure_openai: what to ask the upstream for.
    pub upstream_format: UpstreamFormat,
    /// azure_openai: the `api-version` query parameter (default "2025-04-01-preview": the first with
    /// `images/edits` and the GPT image models; the GA 2024-10-21 has generations with dall-e-3 only).
    pub api_version: Option<String>,
    /// vertex_imagen: Google Cloud project id.
    pub project: Option<String>,
    /// vertex_imagen: Google Cloud region (`us-central1`).
    pub location: Option<String>,
    /// vertex_imagen: environment variable holding an OAuth2 access token.
    pub token_env: Option<String>,
    /// vertex_imagen: program and arguments printing an access token; empty when not used.
    pub token_command: Vec<String>,
    /// a1111: environment variable holding `user:password` for basic auth.
    pub auth_env: Option<String>,
    /// Asynchronous kinds: first poll delay, and the cap of its doubling.
    pub poll_interval: Duration,
    /// Asynchronous kinds: the longest delay between polls.
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
    /// Plain-http URLs are fetched too (default: https only).
    pub allow_http: bool,
    /// Private, loopback and link-local addresses are fetched too (default: refused).
    pub allow_private: bool,
    /// Hosts fetched whatever their scheme or address: exact names, trimmed and lowercased.
    pub allow_hosts: Vec<String>,
    /// Largest image fetched, bytes (default 32 MiB).
    pub max_bytes: usize,
    /// Time for one fetch, redirects included (default 30 s).
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
    /// Leave it out and say so in `x-acc-dropped-params` (default).
    Drop,
    /// Refuse the request with 400.
    Reject,
}

/// What a `stream: true` request does on a provider kind without an image stream of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamAction {
    /// The plain answer is sent as one `*.completed` event per image (default).
    #[default]
    CompletedEvent,
    /// Refused with 400 `unsupported_parameter` (the next target is not tried).
    Reject,
}

/// One provider (`[providers.NAME]`), validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    /// The name routes use for it (a metric label value).
    pub name: String,
    /// Its API family.
    pub kind: ProviderKind,
    /// How to reach and authenticate to it.
    pub conn: Connection,
    /// Where its image URLs may be fetched from.
    pub fetch: FetchPolicy,
    /// What a request parameter its kind cannot honour does.
    pub unsupported: ParamAction,
    /// What a `stream: true` request does when its kind cannot stream (`unsupported_stream`).
    pub unsupported_stream: StreamAction,
    /// Upper bound for one attempt on it; the route's attempt timeout applies too.
    pub timeout: Option<Duration>,
    /// Its concurrency limit and wait queue; `None`: no limit.
    pub concurrency: Option<Concurrency>,
    /// Its circuit breaker.
    pub breaker: crate::health::BreakerSettings,
    /// Cap on how long a 429's Retry-After pauses it (default 5 minutes).
    pub max_pause: Duration,
    /// What it charges; `None`: its spend is not counted.
    pub price: Option<Price>,
}

/// A `response_format` a route states as the default (`default_response_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFormat {
    Url,
    B64Json,
}

/// What a route answers `response_format = "url"` with (`url_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlMode {
    /// The gateway keeps the bytes and serves them itself for `url_ttl`.
    Gateway,
    /// A provider URL is handed to the client as is (bytes are still served by the gateway).
    Provider,
}

/// A place a route's requests may go: a provider and the model asked of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name of a provider of [`Policy::providers`].
    pub provider: String,
    /// The provider's model name; `None`: the alias the client asked for is passed on.
    pub model: Option<String>,
    /// Relative share of first attempts (default 1; 0 for mirror and canary candidates).
    pub weight: u32,
    /// Why it is in the route.
    pub role: TargetRole,
}

/// Why a target is in its route: a configured target, or a mirror or canary candidate
/// (appended with weight 0, so plans only reach them on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRole {
    /// One of the route's `targets`.
    Serve,
    /// A `mirror` candidate.
    Mirror,
    /// The `canary` candidate.
    Canary,
}

impl TargetRole {
    /// The role as a metric label value (`"serve"`, `"mirror"`, `"canary"`).
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
    /// Share of the route's requests copied to it, in [0, 1].
    pub sample: f64,
    /// Mirrored attempts in flight at once; more are skipped (default 4).
    pub max_in_flight: usize,
    /// Spend on it per UTC day, USD; beyond it mirrors are skipped.
    pub spend_usd_per_day: Option<f64>,
}

/// A canary candidate of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// Index of the candidate in the route's targets.
    pub target: usize,
    /// `provider/model`, or the provider alone when the alias is passed on.
    pub label: String,
    /// Share of the route's live requests it serves, in (0, 1].
    pub share: f64,
    /// When it is rolled back: how much worse than the primary it may be.
    pub guard: crate::compare::Guard,
    /// Changes whenever the canary's settings do: a rolled-back canary stays so until then.
    pub fingerprint: String,
}

/// Which requests a route takes: every condition given must hold (none given: every request).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matcher {
    /// The model alias the request names (or the default model).
    pub model: Option<String>,
    /// The request's cohort (the `x-acc-cohort` header).
    pub cohort: Option<String>,
    /// Tags the request's API key must all have.
    pub key_tags: Vec<String>,
}

/// One route (`[[routes]]`), validated, with its fallbacks resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique across the policy (a metric label value).
    pub name: String,
    /// Which requests it takes.
    pub matcher: Matcher,
    /// Its configured targets, then its mirror and canary candidates (weight 0).
    pub targets: Vec<Target>,
    /// Indices into [`Policy::routes`], in the order they are tried.
    pub fallbacks: Vec<usize>,
    /// Upper bound for one attempt (default 60 s).
    pub attempt_timeout: Duration,
    /// Upper bound for the whole request, fallbacks included (default 120 s).
    pub deadline: Duration,
    /// What `response_format = "url"` is answered with.
    pub url_mode: UrlMode,
    /// The `response_format` of requests that send none; `None`: by the model the client
    /// names, as OpenAI does (`gpt-image-*`: b64_json; others: url).
    pub default_response_format: Option<AnswerFormat>,
    /// How its artifacts are evaluated.
    pub eval: EvalPolicy,
    /// When a target's recent health demotes it to the back of the plan.
    pub health: crate::health::HealthSettings,
    /// Opt-in hedging; `None`: attempts run one after another.
    pub hedge: Option<Hedge>,
    /// Its mirror candidates.
    pub mirrors: Vec<Mirror>,
    /// Its canary candidate.
    pub canary: Option<Canary>,
    /// What of the prompt may be written anywhere.
    pub record_prompt: RecordPrompt,
    /// Human review: overflow action, time to live, webhook.
    pub review: super::review::ReviewSettings,
    /// Implicit regeneration detection on this route.
    pub regeneration: Regeneration,
}

/// A route's implicit regeneration detection: the same tenant and end user sending the same or
/// nearly the same prompt on the route within `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regeneration {
    /// `regeneration_window_secs` (default 600 s); zero turns implicit detection off.
    pub window: Duration,
    /// `regeneration_similarity`: least Jaccard similarity of the normalised word sets, in
    /// (0, 1] (default 0.8).
    pub similarity: f64,
}

impl Default for Regeneration {
    fn default() -> Self {
        Regeneration { window: Duration::from_secs(600), similarity: 0.8 }
    }
}

/// A route's `record_prompt`: what of a prompt (and negative prompt) the gateway writes to the
/// trace store, logs, spans and provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordPrompt {
    /// The prompt as sent (default).
    #[default]
    Full,
    /// Only the lowercase hex SHA-256 of its UTF-8 bytes.
    Sha256,
    /// Nothing.
    None,
}

impl RecordPrompt {
    /// `"full"`, `"sha256"` or `"none"`.
    pub fn name(self) -> &'static str {
        match self {
            RecordPrompt::Full => "full",
            RecordPrompt::Sha256 => "sha256",
            RecordPrompt::None => "none",
        }
    }
}

/// `[store]`: where trace records go. Read at start-up; a reload that changes it is logged
/// and takes effect on the next restart.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    /// `enabled = false` records nothing (default true).
    pub enabled: bool,
    /// The SQLite file (default `data/acc.db`, relative to the working directory).
    pub path: std::path::PathBuf,
    /// PostgreSQL instead of SQLite (`postgres://user@host:port/db`, no password).
    pub url: Option<String>,
    /// Environment variable with the PostgreSQL password.
    pub password_env: Option<String>,
    /// Records older than this are deleted (default 30 days).
    pub retention_days: Option<u32>,
    /// At most this many records are kept (default 1,000,000).
    pub max_rows: Option<u64>,
    /// Records waiting for the writer before new ones are dropped (default 10,000).
    pub queue_capacity: usize,
    /// Records per insert transaction (default 256).
    pub batch_max: usize,
    /// Longest wait to fill a batch (default 200 ms).
    pub flush_interval: Duration,
    /// Records carry each returned image's SHA-256 and size (default true).
    pub image_sha256: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            enabled: true,
            path: std::path::PathBuf::from("data/acc.db"),
            url: None,
            password_env: None,
            retention_days: Some(30),
            max_rows: Some(1_000_000),
            queue_capacity: 10_000,
            batch_max: 256,
            flush_interval: Duration::from_millis(200),
            image_sha256: true,
        }
    }
}

/// `[telemetry]`: OTLP export of each request's spans.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// Base URL of the OTLP receiver (no trailing slash).
    pub otlp_endpoint: String,
    pub protocol: OtlpProtocol,
    /// Per export request.
    pub timeout: Duration,
    /// (header name, environment variable with its value).
    pub headers_env: Vec<(String, String)>,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`POST {endpoint}/v1/traces`).
    HttpProtobuf,
    /// OTLP/gRPC.
    Grpc,
}

/// `[cohorts]`: the values of `x-acc-cohort`, `x-acc-prompt-template` and `x-acc-asset-type`
/// that metric labels carry; any other value is labelled [`Cohorts::OTHER`] (and kept as sent
/// in the trace record), an absent one `none`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cohorts {
    pub cohorts: BTreeSet<String>,
    pub templates: BTreeSet<String>,
    pub asset_types: BTreeSet<String>,
}

impl Cohorts {
    /// The label of a value not in the lists.
    pub const OTHER: &'static str = "other";
    /// The label of an absent value.
    pub const NONE: &'static str = "none";

    fn label<'a>(set: &'a BTreeSet<String>, v: Option<&str>) -> &'a str {
        match v {
            None => Cohorts::NONE,
            Some(v) => set.get(v).map_or(Cohorts::OTHER, String::as_str),
        }
    }

    /// `(cohort, template, asset_type)` metric labels for the values a request sent.
    pub fn labels<'a>(
        &'a self,
        cohort: Option<&str>,
        template: Option<&str>,
        asset_type: Option<&str>,
    ) -> [&'a str; 3] {
        [
            Self::label(&self.cohorts, cohort),
            Self::label(&self.templates, template),
            Self::label(&self.asset_types, asset_type),
        ]
    }
}

/// What a route does with an evaluator's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalAction {
    /// Try the next target (default).
    Fallback,
    /// Refuse the request with 400 `content_policy_violation`.
    Block,
    /// Return the artifact, marked as failed.
    Flag,
    /// Withhold the artifact until a person approves it (the client gets `pending_review`).
    Review,
}

/// How a route evaluates its artifacts, and what a failure does.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPolicy {
    /// Evaluator names, validated against what this build has.
    pub evaluators: Vec<String>,
    /// What a failed `sanity` check does.
    pub on_sanity_fail: EvalAction,
    /// What unsafe content (`safety`) does.
    pub on_unsafe: EvalAction,
    /// What a failed prompt contract (`adherence`) does.
    pub on_low_adherence: EvalAction,
    /// What a failed text rule (`text`) does.
    pub on_text_fail: EvalAction,
    /// Time allowed for evaluating one attempt's artifacts, queue wait included (default 5 s).
    pub budget: Duration,
    /// An evaluator's error or timeout counts as a pass (still reported); default: as a failure.
    pub fail_open: bool,
    /// The evaluators' own settings (thresholds, classes, models, text rules).
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
    /// The files' names, sorted.
    pub files: Vec<String>,
    /// Model alias used when a request names no model.
    pub default_model: Option<String>,
    /// Listener limits and URL settings.
    pub server: ServerSettings,
    /// Keyed by the SHA-256 digest of the API key.
    pub keys: HashMap<[u8; 32], ApiKey>,
    /// Limits by tenant name.
    pub tenants: BTreeMap<String, TenantLimits>,
    /// Providers by name.
    pub providers: BTreeMap<String, ProviderSpec>,
    /// In match order: files sorted by name, routes in file order.
    pub routes: Vec<Route>,
    /// Every model alias a route matches on, for `/v1/models` and 404s.
    pub aliases: BTreeSet<String>,
    /// Things worth a log line that do not make the policy invalid (a missing key variable).
    pub warnings: Vec<String>,
    /// Where trace records go.
    pub store: StoreSettings,
    /// OTLP export, when configured.
    pub telemetry: Option<TelemetrySettings>,
    /// Accepted cohort label values.
    pub cohorts: Cohorts,
    /// The review queue's byte budget and webhook delivery settings (`[review]`).
    pub review: super::review::ReviewBudget,
    /// Signing of returned images (`[provenance]`), when configured.
    pub provenance: Option<super::provenance::ProvenanceSettings>,
    /// State shared across replicas through Redis (`[cluster]`); `None`: all in memory.
    pub cluster: Option<super::cluster::ClusterSettings>,
}
