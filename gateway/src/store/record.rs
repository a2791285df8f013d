//! The trace record: one per request that reaches routing (and one per mirror copy, linked to
//! its primary by `parent_trace_id`). Serialized as JSON for `GET /admin/traces/{trace_id}`,
//! `acc traces --json` and the store's `record` column; the store also keeps the fields the
//! trace queries filter on in columns of their own ([`TraceRecord::providers`],
//! [`TraceRecord::verdicts`]).
//!
//! Times are Unix nanoseconds (as in OTLP's `start_time_unix_nano`); durations and offsets are
//! milliseconds as `f64`; money is USD.

use serde::{Deserialize, Serialize};

/// One request's durable record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// 32 lowercase hex digits (W3C trace id), as sent in `x-acc-trace-id`.
    pub trace_id: String,
    /// The server span's id (16 lowercase hex digits), exported over OTLP.
    pub span_id: String,
    /// The span id of the client's `traceparent`, when the request continued one; for a
    /// mirror, the primary request's server span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// For a mirror copy: the primary request's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_trace_id: Option<String>,
    /// `"primary"` for a client's request, `"mirror"` for a mirror copy.
    pub kind: String,
    /// When the request arrived, Unix nanoseconds.
    pub start_time_unix_nano: u64,
    /// From arrival to the answer's headers, ms.
    pub duration_ms: f64,
    /// The client key's tenant and name (never the key itself).
    pub tenant: Option<String>,
    pub key_name: Option<String>,
    /// The matched route.
    pub route: Option<String>,
    /// `"generations"`, `"edits"` or `"variations"`.
    pub operation: String,
    /// Cohort fields as sent: `x-acc-cohort`, `x-acc-prompt-template` (`name@version`),
    /// `x-acc-asset-type`, and the OpenAI `user` field.
    pub cohort: Option<String>,
    pub prompt_template: Option<String>,
    pub asset_type: Option<String>,
    pub end_user: Option<String>,
    /// The route's `record_prompt`: `"full"`, `"sha256"` or `"none"`.
    pub record_prompt: String,
    /// The prompt, only when `record_prompt = "full"`.
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// Hex SHA-256 of the prompt's UTF-8 bytes when `record_prompt` is `"full"` or `"sha256"`.
    pub prompt_sha256: Option<String>,
    pub negative_prompt_sha256: Option<String>,
    /// The requested parameters other than the prompt (`model`, `n`, `size`, `quality`, `style`,
    /// `response_format`, `seed`, `steps`, `guidance_scale`, ...), as a JSON object.
    pub parameters: serde_json::Value,
    /// The prompt contract, when one was given.
    pub contract: Option<serde_json::Value>,
    /// Every attempt, in the order they ended.
    pub attempts: Vec<AttemptRecord>,
    /// The settings the winning provider actually used.
    pub generation: Option<GenerationRecord>,
    /// `"pass"`, `"flagged"`, `"blocked"`, `"review"` (held for human review) or `"error"` (as
    /// `x-acc-decision`).
    pub decision: String,
    /// The request's outcome as counted in `acc_requests_total{outcome}`.
    pub outcome: String,
    /// The HTTP status sent to the client.
    pub status: u16,
    /// The OpenAI error code sent, when the answer is an error.
    pub error_code: Option<String>,
    /// The returned images.
    pub images: Vec<ImageRecord>,
    /// Total USD charged at the providers' prices, when known.
    pub cost_usd: Option<f64>,
    /// Served by the route's canary.
    pub canary: bool,
    /// Set when this request regenerates an earlier one of the same tenant: which, how it
    /// was detected and how similar the prompts were. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regeneration: Option<RegenerationLink>,
    /// The returned images' bytes (or base64 text), by image index, whose SHA-256 and size
    /// [`TraceRecord::settle_images`] fills in off the request path. Never serialized.
    #[serde(skip)]
    pub pending_images: Vec<(usize, PendingImage)>,
}

/// The link from a regeneration to the trace it regenerates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegenerationLink {
    /// The regenerated (earlier) trace's id.
    pub of: String,
    /// `"explicit"` (`x-acc-regenerate-of` or body `acc.regenerate_of`) or `"implicit"` (the
    /// same end user sent the same or nearly the same prompt on the same route in the window).
    pub how: String,
    /// Similarity of the two normalised prompts in [0, 1] (1 for an explicit link and for an
    /// exact match).
    pub similarity: f64,
}

/// An image whose digest is still to be computed (shares the answer's buffers).
#[derive(Debug, Clone, PartialEq)]
pub enum PendingImage {
    /// Standard base64 text of the image (the answer's pieces).
    Base64(crate::body::Rope),
    /// The image's bytes.
    Raw(bytes::Bytes),
}

impl PendingImage {
    /// Bytes held (for the writer's memory budget).
    pub fn len(&self) -> usize {
        match self {
            PendingImage::Base64(b) => b.len(),
            PendingImage::Raw(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One attempt on one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt's client span id (16 lowercase hex digits), sent to the provider in
    /// `traceparent` and exported over OTLP.
    pub span_id: String,
    /// The route that owns the target (a fallback route's name when the plan crossed into it)
    /// and the target's index in it.
    pub route: String,
    pub target: usize,
    /// The provider's name in the policy, and its kind (`openai`, `azure`, `stability`, ...).
    pub provider: String,
    pub provider_kind: String,
    /// The host of the provider endpoint called (exported as `server.address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_host: Option<String>,
    /// The model asked of the provider.
    pub model: String,
    /// The model (version) the provider says generated, where it reports one.
    pub model_version: Option<String>,
    /// When it started, ms after the request arrived.
    pub start_offset_ms: f64,
    /// From start to its end, ms (queue time included).
    pub latency_ms: f64,
    /// Time waiting for the provider's concurrency slot, ms.
    pub queue_ms: f64,
    /// `"ok"` or the failure label (as `acc_attempts_total{result}`).
    pub result: String,
    /// The failure, as logged (secrets masked).
    pub error: Option<String>,
    /// USD charged for this attempt, when priced.
    pub cost_usd: Option<f64>,
    /// `"primary"`, `"fallback"`, `"hedge"`, `"canary"` or `"mirror"`.
    pub role: String,
    /// Every evaluator's verdict on every image of this attempt.
    pub evaluations: Vec<EvaluationRecord>,
}

/// One evaluator's verdict on one image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRecord {
    /// The image's index in the attempt's answer.
    pub image: usize,
    /// `sanity`, `safety`, `text` or `adherence`.
    pub evaluator: String,
    /// 0..1, 1 is best.
    pub score: f32,
    /// `"pass"`, `"fail"` or `"error"`.
    pub verdict: String,
    pub reason: String,
}

/// The generation settings the provider reported using.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub seed: Option<u64>,
    pub sampler: Option<String>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub model_version: Option<String>,
}

/// One returned image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub index: usize,
    /// Hex SHA-256 of the image bytes, when the gateway held them.
    pub sha256: Option<String>,
    /// Size of the image bytes, when the gateway held them.
    pub bytes: Option<u64>,
    /// The URL served to the client (gateway artifact URL or the provider's), when
    /// `response_format = "url"`.
    pub url: Option<String>,
    /// The label (`urn:c2pa:...`) of the C2PA manifest the image was signed with, when
    /// `[provenance]` signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c2pa_manifest: Option<String>,
}

impl TraceRecord {
    /// Computes each pending image's SHA-256 (hex) and size into [`TraceRecord::images`] and
    /// drops the bytes. Base64 that does not decode leaves the digest empty.
    pub fn settle_images(&mut self) {
        use sha2::Digest;
        for (index, image) in std::mem::take(&mut self.pending_images) {
            // Base64 is decoded a step at a time into the digest: no copy of the image is made.
            let mut sha = sha2::Sha256::new();
            let len = match &image {
                PendingImage::Raw(b) => {
                    sha.update(b);
                    b.len()
                }
                PendingImage::Base64(b) => match b.decode_base64_with(|part| sha.update(part)) {
                    Some(n) => n,
                    None => continue,
                },
            };
            if let Some(rec) = self.images.iter_mut().find(|i| i.index == index) {
                rec.sha256 = Some(crate::hex_lower(&sha.finalize()));
                rec.bytes = Some(len as u64);
            }
        }
    }

    /// Bytes of image data still held for digests.
    pub fn pending_bytes(&self) -> usize {
        self.pending_images.iter().map(|(_, p)| p.len()).sum()
    }

    /// The distinct provider names of all attempts (the store's `provider` filter).
    pub fn providers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.attempts.iter().map(|a| a.provider.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// `evaluator:verdict` pairs over the winning images' evaluations (the store's `verdict`
    /// filter, e.g. `safety:fail`), distinct; when no attempt succeeded, over every attempt's.
    pub fn verdicts(&self) -> Vec<String> {
        let ok: Vec<&AttemptRecord> = self.attempts.iter().filter(|a| a.result == "ok").collect();
        let set: Vec<&AttemptRecord> = if ok.is_empty() { self.attempts.iter().collect() } else { ok };
        let mut v: Vec<String> =
            set.iter().flat_map(|a| a.evaluations.iter()).map(|e| format!("{}:{}", e.evaluator, e.verdict)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
