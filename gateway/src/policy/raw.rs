//! The raw shapes of policy files, as ops write them: serde structs that refuse unknown fields,
//! so a misspelt setting is an error rather than silently ignored. Nothing here is checked yet;
//! [`super::validate()`] turns these into the runtime types.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One policy file as written. Every section is optional: a policy may be split over several
/// files, and the sections are gathered across them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    /// Model alias used when a request names no model.
    pub(super) default_model: Option<String>,
    pub(super) server: Option<RawServer>,
    #[serde(default)]
    pub(super) keys: Vec<RawKey>,
    /// Limits per tenant (the `tenant` of `[[keys]]`).
    #[serde(default)]
    pub(super) tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    pub(super) providers: BTreeMap<String, RawProvider>,
    /// CLIP image and text encoders (ONNX) for prompt-image similarity in `adherence`.
    pub(super) clip: Option<RawClip>,
    /// Custom ONNX image classifiers the `safety` evaluator can run (beside or instead of
    /// NudeNet), by name.
    #[serde(default)]
    pub(super) classifiers: BTreeMap<String, RawClassifier>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    /// Where trace records are kept.
    pub(super) store: Option<RawStore>,
    /// OTLP export of request spans.
    pub(super) telemetry: Option<RawTelemetry>,
    /// The cohort, prompt template and asset type values metric labels accept.
    pub(super) cohorts: Option<RawCohorts>,
    /// The review queue's byte budget and webhook delivery settings.
    pub(super) review: Option<super::review::RawReview>,
    /// Signing returned images with a C2PA manifest.
    pub(super) provenance: Option<super::provenance::RawProvenance>,
    /// State shared across replicas through Redis.
    pub(super) cluster: Option<super::cluster::RawCluster>,
}

/// `[store]`: the trace store (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    /// Whether requests are recorded at all (default true).
    pub(super) enabled: Option<bool>,
    /// The SQLite file (default `data/acc.db`, relative to the working directory).
    pub(super) path: Option<String>,
    /// `postgres://user@host:port/db`: PostgreSQL instead of SQLite. No password here.
    pub(super) url: Option<String>,
    /// Environment variable holding the PostgreSQL password.
    pub(super) password_env: Option<String>,
    /// Records older than this many days are deleted (default 30).
    pub(super) retention_days: Option<u64>,
    /// At most this many records are kept, the oldest deleted first (default 1,000,000).
    pub(super) max_rows: Option<u64>,
    /// Records waiting for the writer; beyond it they are dropped and counted (default 10,000).
    pub(super) queue_capacity: Option<u64>,
    /// Records per insert transaction, at most (default 256).
    pub(super) batch_max: Option<u64>,
    /// How long the writer waits to fill a batch, ms (default 200).
    pub(super) flush_interval_ms: Option<u64>,
    /// Whether records carry each returned image's SHA-256 and size (default true; hashing a
    /// 1.5 MB image costs about 0.7 ms of CPU).
    pub(super) image_sha256: Option<bool>,
}

/// `[telemetry]`: OTLP export (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    /// `http://collector:4318` (OTLP/HTTP; `/v1/traces` is appended unless given) or the gRPC
    /// endpoint with `protocol = "grpc"`.
    pub(super) otlp_endpoint: Option<String>,
    /// `"http/protobuf"` (default) or `"grpc"`.
    pub(super) protocol: Option<String>,
    /// Per export request, ms (default 10,000).
    pub(super) timeout_ms: Option<u64>,
    /// Headers sent with each export, each value read from the named environment variable.
    #[serde(default)]
    pub(super) headers_env: BTreeMap<String, String>,
}

/// `[cohorts]`: accepted label values; anything else is counted as `other`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCohorts {
    #[serde(default)]
    pub(super) cohorts: Vec<String>,
    /// `name@version`.
    #[serde(default)]
    pub(super) templates: Vec<String>,
    #[serde(default)]
    pub(super) asset_types: Vec<String>,
}

/// `[server]`: listener limits and URL settings (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    /// Largest JSON request body, bytes.
    pub(super) max_json_body_bytes: Option<u64>,
    /// Largest multipart request body (edits, variations), bytes.
    pub(super) max_multipart_body_bytes: Option<u64>,
    /// Lifetime of a gateway-served image URL, seconds.
    pub(super) url_ttl_secs: Option<u64>,
    /// Base URL put in front of gateway-served image URLs (`https://images.example.com`); when
    /// absent, the request's Host header is used.
    pub(super) public_base_url: Option<String>,
    /// Requests handled at once; more are shed with 503 rather than queued without bound.
    pub(super) max_in_flight: Option<u64>,
    /// How long an `Idempotency-Key`'s answer is kept for replay, seconds (default one day).
    pub(super) idempotency_ttl_secs: Option<u64>,
    /// Memory for kept answers, MiB (default 256); the oldest go first.
    pub(super) idempotency_max_mib: Option<u64>,
    /// Time to receive a whole request body once its headers are in, ms (default 30000).
    pub(super) body_timeout_ms: Option<u64>,
    /// Memory for request bodies being received, all requests together, MiB (default 512).
    pub(super) max_body_buffer_mib: Option<u64>,
    /// Memory for provider answers being read, all attempts together, MiB (default 1024).
    pub(super) max_answer_buffer_mib: Option<u64>,
    /// Time a connection may take to send a request's headers, and may sit idle between
    /// requests, ms (default 30000; read at start-up).
    pub(super) idle_timeout_ms: Option<u64>,
    /// Connections open at once on the proxy listener (default: what the open-file limit
    /// allows after the admin listener's share and upstream connections; read at start-up).
    pub(super) max_connections: Option<u64>,
    /// Connections open at once on the admin listener (default 256; read at start-up).
    pub(super) admin_max_connections: Option<u64>,
    /// TLS on both listeners.
    pub(super) tls: Option<RawTls>,
}

/// `[server.tls]`: the listeners' certificate chain and private key, PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: String,
    pub(super) key_file: String,
}

/// `[[keys]]`: one API key, by digest, with its tenant, tags and limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    /// Lowercase hex SHA-256 of the API key; the key itself never appears in policy files.
    pub(super) sha256: String,
    pub(super) tenant: String,
    #[serde(default)]
    pub(super) tags: Vec<String>,
    /// Requests per minute this key may make.
    pub(super) requests_per_minute: Option<u32>,
    /// Images per minute this key may ask for (`n` of each request).
    pub(super) images_per_minute: Option<u32>,
}

/// `[tenants.NAME]`: limits shared by every key of the tenant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) requests_per_minute: Option<u32>,
    pub(super) images_per_minute: Option<u32>,
    /// Spend per UTC day, from the providers' prices; over it, requests get 429 until midnight.
    pub(super) spend_usd_per_day: Option<f64>,
    /// Requests of the tenant's keys being handled at once; more get 429.
    pub(super) max_in_flight: Option<u32>,
}

/// `breaker` of a provider: the circuit breaker's settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) enabled: Option<bool>,
    /// Failures in a row (connect errors, timeouts, 5xx, broken answers) that open it.
    pub(super) consecutive_failures: Option<u32>,
    /// How long it stays open before letting probes through, ms.
    pub(super) cooldown_ms: Option<u64>,
    /// Probes let through at once when half-open; as many successes close it.
    pub(super) probes: Option<u32>,
}

/// `price` of a provider: what it charges, in USD.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    /// One price, or a table by size (`"1024x1024" = 0.04`) with an optional `default`.
    pub(super) per_image_usd: Option<RawPerImage>,
    /// Per image by `quality` ("hd", "high", ...): a price or a table by size; beats per_image_usd.
    #[serde(default)]
    pub(super) quality: BTreeMap<String, RawPerImage>,
    /// Per sampling step per image (self-hosted diffusion), added to the per-image price.
    pub(super) per_step_usd: Option<f64>,
    /// Per GPU-second the provider reports (e.g. Replicate's predict_time), added too.
    pub(super) per_gpu_second_usd: Option<f64>,
    /// Prices of one model (the target's model name), same fields; beat the provider's own.
    #[serde(default)]
    pub(super) models: BTreeMap<String, RawModelPrice>,
}

/// `price.models.NAME`: the price fields of one model, replacing the provider's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelPrice {
    pub(super) per_image_usd: Option<RawPerImage>,
    #[serde(default)]
    pub(super) quality: BTreeMap<String, RawPerImage>,
    pub(super) per_step_usd: Option<f64>,
    pub(super) per_gpu_second_usd: Option<f64>,
}

/// `fetch` of a provider: where its image URLs may be fetched from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFetch {
    /// Fetch plain-http URLs too (default: https only).
    pub(super) allow_http: Option<bool>,
    /// Fetch from private, loopback and link-local addresses too (default: refused).
    pub(super) allow_private: Option<bool>,
    /// Hosts fetched whatever their scheme or address (exact names, e.g. "127.0.0.1", "cdn.internal").
    #[serde(default)]
    pub(super) allow_hosts: Vec<String>,
    /// Largest image fetched, bytes (default 32 MiB).
    pub(super) max_bytes: Option<u64>,
    /// Time for one fetch, redirects included, ms (default 30000).
    pub(super) timeout_ms: Option<u64>,
}

/// A per-image price: one number, or a table by size (`"1024x1024" = 0.04`, `default = 0.02`).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a price in USD (a number), or a table of prices by size (\"1024x1024\" = 0.04, default = 0.02)"
)]
pub(super) enum RawPerImage {
    Flat(f64),
    BySize(BTreeMap<String, f64>),
}

/// `hedge` of a route: when to start a second attempt beside a slow first one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHedge {
    /// Start the next target when the first has not answered after this long, ms.
    pub(super) after_ms: Option<u64>,
    /// "p95": wait the first target's observed p95 instead (after_ms until it has enough samples).
    pub(super) after: Option<String>,
    /// Lower bound of the p95-based delay, ms.
    pub(super) min_after_ms: Option<u64>,
    /// Attempts in flight at once (default 2).
    pub(super) max_parallel: Option<u32>,
}

/// `[providers.NAME]`: one upstream, its kind, connection, limits and price.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) kind: String,
    /// Root of the provider's API, e.g. `https://api.openai.com/v1`.
    pub(super) base_url: Option<String>,
    /// Environment variable that holds the provider's API key.
    pub(super) api_key_env: Option<String>,
    /// Upper bound for one attempt on this provider, ms; the route's attempt timeout applies too.
    pub(super) timeout_ms: Option<u64>,
    /// What to ask the upstream for: `b64_json` (default), `url`, or `omit` to send no
    /// `response_format` at all (models such as gpt-image-1 refuse the field).
    pub(super) upstream_response_format: Option<String>,
    /// Attempts in flight at once on this provider; more wait in a bounded queue.
    pub(super) max_concurrency: Option<u32>,
    /// Attempts that may wait for a slot (default: max_concurrency).
    pub(super) max_queue: Option<u32>,
    /// Longest wait for a slot, ms (default: the attempt's timeout).
    pub(super) queue_timeout_ms: Option<u64>,
    /// When the queue is full: "fallback" (try the next target; default) or "reject" (503).
    pub(super) on_queue_full: Option<String>,
    pub(super) breaker: Option<RawBreaker>,
    /// Cap on how long a 429's Retry-After pauses the provider, ms (default 300000).
    pub(super) max_pause_ms: Option<u64>,
    pub(super) price: Option<RawPrice>,
    /// azure_openai: the `api-version` query parameter.
    pub(super) api_version: Option<String>,
    /// vertex_imagen: Google Cloud project and region.
    pub(super) project: Option<String>,
    pub(super) location: Option<String>,
    /// vertex_imagen: environment variable holding an OAuth2 access token...
    pub(super) token_env: Option<String>,
    /// ... or a command printing one (e.g. ["gcloud", "auth", "print-access-token"]), cached.
    pub(super) token_command: Option<Vec<String>>,
    /// a1111: environment variable holding "user:password" for the API's basic auth.
    pub(super) auth_env: Option<String>,
    /// fal, replicate: first poll delay and the cap of its exponential backoff, ms.
    pub(super) poll_interval_ms: Option<u64>,
    pub(super) max_poll_interval_ms: Option<u64>,
    /// A request parameter this kind cannot honour: "drop" it and say so in x-acc-dropped-params
    /// (default), or "reject" the request with 400.
    pub(super) unsupported_params: Option<String>,
    /// A `stream: true` request to a kind that has no image stream of its own (every kind but
    /// openai): answer it with one "completed_event" built from the plain answer (default), or
    /// "reject" it with 400 unsupported_parameter.
    pub(super) unsupported_stream: Option<String>,
    /// How image URLs this provider answers with are fetched (SSRF guard).
    pub(super) fetch: Option<RawFetch>,
}

/// `[classifiers.NAME]`: a custom ONNX image classifier for the `safety` evaluator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClassifier {
    /// The ONNX file; a relative path is taken from the models directory (ACC_MODELS_DIR).
    pub(super) model: String,
    /// Side of the square input, pixels.
    pub(super) input_size: u32,
    /// Per-channel (R, G, B) mean and standard deviation, for pixels scaled to 0..1.
    #[serde(default = "zero3")]
    pub(super) mean: [f32; 3],
    #[serde(default = "one3")]
    pub(super) std: [f32; 3],
    /// "softmax" (default), "sigmoid" or "none" (the model outputs probabilities).
    pub(super) activation: Option<String>,
    /// One label per model output, in order.
    pub(super) labels: Vec<String>,
    /// The labels that count as unsafe.
    pub(super) unsafe_labels: Vec<String>,
}

/// `[clip]`: the CLIP encoders of the `adherence` evaluator (at most one file sets it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClip {
    /// Vision encoder with projection (relative paths: the models directory).
    pub(super) image_model: String,
    /// Text encoder with projection.
    pub(super) text_model: String,
    /// Side of the square image input; default 224.
    pub(super) input_size: Option<u32>,
}

fn zero3() -> [f32; 3] {
    [0.0; 3]
}
fn one3() -> [f32; 3] {
    [1.0; 3]
}

/// `[[routes]]`: which requests it takes, where they go, and how the artifacts are judged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    #[serde(rename = "match", default)]
    pub(super) matcher: RawMatch,
    #[serde(default)]
    pub(super) targets: Vec<RawTarget>,
    #[serde(default)]
    pub(super) fallbacks: Vec<String>,
    pub(super) attempt_timeout_ms: Option<u64>,
    pub(super) deadline_ms: Option<u64>,
    pub(super) url_mode: Option<String>,
    /// The `response_format` of a request that sends none: "url" or "b64_json". Default: by
    /// the model the client names (OpenAI's own: `gpt-image-*` answer b64_json, others url).
    pub(super) default_response_format: Option<String>,
    /// What of the prompt is recorded anywhere (trace store, logs, spans, provenance):
    /// "full" (default), "sha256" (its digest only) or "none".
    pub(super) record_prompt: Option<String>,
    /// How long after a request the same end user's same or nearly the same prompt on this
    /// route counts as an implicit regeneration of it, s (default 600; 0 turns implicit
    /// detection off; at most 86400).
    pub(super) regeneration_window_secs: Option<u64>,
    /// Least Jaccard similarity of the two prompts' normalised word sets that counts as
    /// "nearly the same", in (0, 1] (default 0.8; 1 takes only the same words).
    pub(super) regeneration_similarity: Option<f64>,
    /// Evaluators every artifact of this route must pass, in order: "sanity" (more arrive
    /// with later builds: "safety", "text", "adherence").
    #[serde(default)]
    pub(super) evaluators: Vec<String>,
    /// What a failed sanity check does: "fallback" (try the next target; default), "block"
    /// (400 content_policy_violation), "flag" (return it, marked) or "review" (withhold it
    /// until a person approves it).
    pub(super) on_sanity_fail: Option<String>,
    /// Time allowed for evaluating one attempt's artifacts (queue wait included), ms.
    pub(super) eval_budget_ms: Option<u64>,
    /// When an evaluator errors or runs out of budget: "fail_closed" (treat as failed; default)
    /// or "fail_open" (treat as passed; the error is still reported and counted).
    pub(super) on_eval_error: Option<String>,
    /// What unsafe content does: "fallback" (default), "block" or "flag".
    pub(super) on_unsafe: Option<String>,
    /// Highest NudeNet score of an unsafe class that still passes, in [0, 1]; default 0.5.
    pub(super) max_unsafe: Option<f32>,
    /// NudeNet classes that count as unsafe; default: the exposed genitalia, breasts, buttocks
    /// and anus classes.
    pub(super) unsafe_classes: Option<Vec<String>>,
    /// Whether an unsafe-class NudeNet detection needs evidence of a body to count (enough
    /// skin-toned pixels in its box, another detected body part, or a box without colour);
    /// one without is discounted and the verdict's reason says why. Default true: NudeNet
    /// reports exposed parts on colour wheels and other abstract images.
    pub(super) corroborate_unsafe: Option<bool>,
    /// Share of skin-toned pixels (Chai and Ngan's YCbCr skin map, plus warm pixels of low
    /// chroma) inside an unsafe detection's box that corroborates it, a fraction in [0, 1];
    /// default 0.15. Needs corroborate_unsafe (on by default).
    pub(super) min_skin_in_box: Option<f32>,
    /// What a failed prompt contract does: "fallback" (default), "block" or "flag".
    pub(super) on_low_adherence: Option<String>,
    /// Lowest share of the contract's clauses that must hold, in [0, 1]; default 1 (all).
    pub(super) min_adherence: Option<f32>,
    /// Text that every image of the route must show (read by OCR; case and small OCR errors
    /// tolerated).
    #[serde(default)]
    pub(super) require_text: Vec<String>,
    /// Text no image of the route may show.
    #[serde(default)]
    pub(super) forbid_text: Vec<String>,
    /// No text at all in the image.
    #[serde(default)]
    pub(super) forbid_any_text: bool,
    /// Longest side in pixels of the image as OCR's text detector sees it, 128 to 4096; default
    /// 416 (text down to about 20 px high on a 1024 px image). Larger reads smaller print at
    /// about quadratic CPU cost (960 costs ~5x the default).
    pub(super) ocr_max_side: Option<u32>,
    /// What a failed text rule does: "fallback" (default), "block" or "flag".
    pub(super) on_text_fail: Option<String>,
    /// Models `safety` runs: "nudenet" and/or names of `[classifiers.*]`; default ["nudenet"].
    pub(super) safety_models: Option<Vec<String>>,
    /// Lowest CLIP prompt-image cosine similarity `adherence` accepts (needs `[clip]`).
    pub(super) min_clip_similarity: Option<f32>,
    /// Rolling p99 latency of a target above this demotes it to the back of the plan, ms.
    pub(super) latency_slo_ms: Option<u64>,
    /// Share of a target's recent attempts that errored or timed out above which it is demoted.
    pub(super) max_error_ratio: Option<f64>,
    /// Share of a target's recent artifacts that failed evaluation above which it is demoted.
    pub(super) max_eval_fail_ratio: Option<f64>,
    /// Attempts kept in each target's health window (default 100).
    pub(super) health_window: Option<u32>,
    /// Age after which samples leave the window, seconds (default 300).
    pub(super) health_window_secs: Option<u64>,
    /// Samples needed before a target is judged (default 20).
    pub(super) health_min_samples: Option<u32>,
    /// Opt-in hedging: start the next target when the first is slow. May double the spend.
    pub(super) hedge: Option<RawHedge>,
    /// Candidates that get a copy of a sample of this route's requests (never seen by clients).
    #[serde(default)]
    pub(super) mirror: Vec<RawMirror>,
    /// A candidate that serves a share of the live traffic, rolled back automatically when worse.
    pub(super) canary: Option<RawCanary>,
    /// What applies when an image sent to review cannot be held (byte budget full, store
    /// unavailable): "block" (default), "fallback" or "flag".
    pub(super) review_overflow: Option<String>,
    /// How long a held image waits for a reviewer before it expires, seconds (default 86400).
    pub(super) review_ttl_secs: Option<u64>,
    /// Where review decisions are POSTed, signed with HMAC-SHA256 (`http://` or `https://`).
    pub(super) review_webhook_url: Option<String>,
    /// The environment variable holding the webhook's HMAC secret (required with the URL).
    pub(super) review_webhook_secret_env: Option<String>,
}

/// `mirror` of a route: a candidate that gets a copy of a sample of the requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMirror {
    pub(super) provider: String,
    pub(super) model: Option<String>,
    /// Share of requests copied to the candidate, in [0, 1].
    pub(super) sample: f64,
    /// Mirrored attempts in flight at once; more are skipped (default 4).
    pub(super) max_in_flight: Option<u32>,
    /// Spend on this candidate per UTC day, at its provider's price; beyond it mirrors are skipped.
    pub(super) spend_usd_per_day: Option<f64>,
}

/// `canary` of a route: a candidate that serves a share of the live requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCanary {
    pub(super) provider: String,
    pub(super) model: Option<String>,
    /// Share of live requests the candidate serves, in (0, 1].
    pub(super) share: f64,
    /// Samples both sides need before the guard judges (default 50).
    pub(super) min_samples: Option<u64>,
    /// Largest tolerated rise of the eval-fail rate over the primary's, absolute (default 0.05).
    pub(super) max_eval_fail_increase: Option<f64>,
    /// Largest tolerated rise of the error rate over the primary's, absolute (default 0.05).
    pub(super) max_error_increase: Option<f64>,
    /// Largest tolerated ratio of the candidate's p99 latency to the primary's (default 1.5).
    pub(super) max_p99_ratio: Option<f64>,
}

/// `match` of a route: all the given conditions must hold (none given: every request).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub(super) model: Option<String>,
    pub(super) cohort: Option<String>,
    #[serde(default)]
    pub(super) key_tags: Vec<String>,
}

/// `targets` of a route: a provider (and model) the route's requests may go to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) provider: String,
    /// The provider's model name; defaults to the alias the client asked for.
    pub(super) model: Option<String>,
    /// Relative share of first attempts; default 1.
    pub(super) weight: Option<u32>,
}
