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

/// The HTTP client every adapter shares (one connection pool per process).
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    crate::body::ChunkedBody,
>;

thread_local! {
    /// One client (connection pool) per thread: each proxy worker thread runs its own runtime,
    /// so its upstream connections, and the tasks that drive them, never cross threads.
    static CLIENT: HttpClient = new_http_client();
}

/// Runs `f` with the calling thread's HTTP client (the request future it returns owns what it
/// needs, so the client itself is not cloned per request).
pub fn with_http_client<R>(f: impl FnOnce(&HttpClient) -> R) -> R {
    CLIENT.with(f)
}

fn new_http_client() -> HttpClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

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
    Status { status: StatusCode, message: String },
    /// The upstream refused the request itself (a 4xx that is the client's fault). Returned to
    /// the client as is and never retried: another provider would refuse it too, and it costs.
    #[error("upstream rejected the request with {status}")]
    Rejected { status: StatusCode, body: Bytes },
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("missing credential: {0}")]
    Credential(String),
    /// The connection broke after it was made (reset, closed mid-answer).
    #[error("transport error: {0}")]
    Transport(String),
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    /// Whether the next target should be tried.
    pub fn retryable(&self) -> bool {
        !matches!(self, ProviderError::Rejected { .. })
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
            ProviderError::Credential(_) => "credential_missing",
            ProviderError::Transport(_) => "transport_error",
            ProviderError::Other(_) => "error",
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
        ProviderKind::OpenAi { base_url, api_key_env, upstream_format } => Arc::new(openai::OpenAi::new(
            base_url,
            api_key_env.as_deref(),
            *upstream_format,
        )),
    }
}
