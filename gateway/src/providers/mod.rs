//! Provider adapters: one trait, one implementation per API family. An adapter maps the
//! normalised [`GenerationRequest`] to its provider's API and the answer back to [`Generation`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;

use crate::policy::{ProviderKind, ProviderSpec};
use crate::request::GenerationRequest;

pub mod builtin;
pub mod openai;
pub mod skim;

/// One image as the provider gave it. Payloads stay `Bytes` slices of what was received.
#[derive(Debug, Clone)]
pub enum Image {
    /// Validated standard base64 text of the image, usually a slice of the upstream body.
    Base64(Bytes),
    /// Raw image bytes with their media type.
    Raw { bytes: Bytes, mime: &'static str },
    /// A URL at the provider.
    Url(String),
}

#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub images: Vec<Image>,
    /// Every evaluator's verdict on every image, when the route evaluates.
    pub verdicts: Vec<crate::eval::Verdict>,
    /// Why the answer is returned flagged (a failed check whose action is "flag").
    pub flags: Vec<String>,
}

/// What one attempt asks of a provider.
pub struct AttemptRequest<'a> {
    pub req: &'a GenerationRequest,
    /// The provider's model name for this target.
    pub model: &'a str,
}

/// Why an attempt failed. Each variant says whether trying another target makes sense.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("connect error: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
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
    /// The queue is full and the provider's policy says to refuse rather than fall back.
    #[error("the provider is at its concurrency limit and its queue is full")]
    Busy,
    /// A hedged attempt that lost the race and was cancelled.
    #[error("cancelled: another attempt answered first")]
    HedgeCancelled,
}

impl ProviderError {
    /// Whether the next target should be tried.
    pub fn retryable(&self) -> bool {
        !matches!(self, ProviderError::Rejected { .. } | ProviderError::Blocked(_) | ProviderError::Busy)
    }

    /// A short, bounded label for metrics and the `x-acc-attempts` header.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Connect(_) => "connect_error",
            ProviderError::Timeout => "timeout",
            ProviderError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => "status_429",
            ProviderError::Status { status, .. } if status.is_server_error() => "status_5xx",
            ProviderError::Status { .. } | ProviderError::Rejected { .. } => "status_4xx",
            ProviderError::BadResponse(_) => "bad_response",
            ProviderError::EvalFailed(_) => "eval_failed",
            ProviderError::Blocked(_) => "blocked",
            ProviderError::Credential(_) => "credential_missing",
            ProviderError::Transport(_) => "transport_error",
            ProviderError::Other(_) => "error",
            ProviderError::Skipped { label, .. } => label,
            ProviderError::QueueFull | ProviderError::Busy => "queue_full",
            ProviderError::QueueTimeout => "queue_timeout",
            ProviderError::HedgeCancelled => "hedge_cancelled",
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError>;
}

/// Builds the adapter for a provider of the policy.
pub fn build(spec: &ProviderSpec) -> Arc<dyn Provider> {
    match &spec.kind {
        ProviderKind::Builtin => Arc::new(builtin::Builtin),
        ProviderKind::OpenAi { base_url, api_key_env, upstream_format } => {
            Arc::new(openai::OpenAi::new(base_url, api_key_env.as_deref(), *upstream_format))
        }
    }
}
