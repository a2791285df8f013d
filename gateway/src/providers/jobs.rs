//! What the two job-queue kinds (fal, replicate) share: one JSON exchange, polling with backoff,
//! error classification, and a best-effort cancel of a job left behind.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use serde::de::DeserializeOwned;

use crate::body::ChunkedBody;
use crate::providers::ProviderError;
use crate::upstream;

/// Largest answer read from a job API (a result lists URLs, not image bytes).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Poll answers that fail in a row (connection trouble, 5xx, 429) before the attempt gives up.
const MAX_POLL_FAILURES: u32 = 3;
/// Time a cancel request may take, after the attempt it belongs to has ended.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// The most images one fal or Replicate job makes: their image models take `num_images` /
/// `num_outputs` from 1 to 4 (fal's model arguments, Replicate's model schemas) and refuse more
/// with a 422 that would read as the client's fault. A request for more runs as several jobs.
pub const MAX_IMAGES_PER_JOB: u32 = 4;

/// `n` images as jobs of at most [`MAX_IMAGES_PER_JOB`]: each job's image count, in order.
pub fn batches(n: u32) -> Vec<u32> {
    let mut left = n.max(1);
    let mut out = Vec::new();
    while left > 0 {
        let k = left.min(MAX_IMAGES_PER_JOB);
        out.push(k);
        left -= k;
    }
    out
}

/// The seed of job `i` of a request with `seed`: the request's for the first, then one more per
/// image before it, so that no two jobs draw the same images.
pub fn job_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(u64::from(MAX_IMAGES_PER_JOB) * i as u64))
}

/// Runs `attempt` as jobs of at most [`MAX_IMAGES_PER_JOB`] images ([`batches`]), all at once,
/// `job(n, seed)` making each (seeds one image apart: [`job_seed`]), and merges them in order
/// ([`merge`]). When some jobs fail, the images the others made (and the provider billed) are
/// returned, with the failures as the generation's `partial_errors` (as Stability's calls:
/// `sanity` fails the short answer, naming the first); only when every job fails does the
/// attempt fail, with the first job's error.
pub async fn in_jobs<F, Fut>(attempt: &super::AttemptRequest<'_>, job: F) -> Result<super::Generation, ProviderError>
where
    F: Fn(u32, Option<u64>) -> Fut,
    Fut: Future<Output = Result<super::Generation, ProviderError>>,
{
    let seed = attempt.req.seed.filter(|_| attempt.sends(crate::request::Param::Seed));
    let batches = batches(attempt.req.n);
    if let [n] = batches[..] {
        return job(n, seed).await;
    }
    let runs = batches.iter().enumerate().map(|(i, &n)| job(n, job_seed(seed, i)));
    let mut made = Vec::with_capacity(batches.len());
    let mut failed = Vec::new();
    for r in futures_util::future::join_all(runs).await {
        match r {
            Ok(g) => made.push(g),
            Err(e) => failed.push(e),
        }
    }
    if made.is_empty() {
        return Err(failed.swap_remove(0));
    }
    if !failed.is_empty() {
        tracing::info!("{} of {} jobs failed; the images of the others are returned", failed.len(), batches.len());
    }
    let mut all = merge(made);
    all.partial_errors.extend(failed.into_iter().map(|e| std::sync::Arc::new(e.redacted())));
    Ok(all)
}

/// One request's answer from its jobs' ([`batches`]): the images in order, the first job's
/// settings and answer fields, GPU seconds summed.
pub fn merge(parts: Vec<super::Generation>) -> super::Generation {
    let mut parts = parts.into_iter();
    let mut all = parts.next().unwrap_or_default();
    for g in parts {
        all.images.extend(g.images);
        all.surplus += g.surplus;
        all.partial_errors.extend(g.partial_errors);
        all.revised_prompts.extend(g.revised_prompts);
        all.gpu_seconds = match (all.gpu_seconds, g.gpu_seconds) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
    all
}

/// One exchange with the provider's API: JSON in and out, the key in `Authorization`.
pub async fn call(
    method: Method,
    url: &str,
    auth: Option<&HeaderValue>,
    json: Option<Vec<u8>>,
) -> Result<upstream::Answer, ProviderError> {
    // Never the URL itself in the message: job URLs may be signed.
    let endpoint = upstream::Endpoint::parse(url)
        .map_err(|_| ProviderError::Other(format!("not a usable URL: {}", clean(without_query(url)))))?;
    let method_has_body = method != Method::GET;
    let mut req = Request::builder().method(method).uri("/").header(header::ACCEPT, "application/json");
    if let Some(h) = auth {
        req = req.header(header::AUTHORIZATION, h.clone());
    }
    let mut body = ChunkedBody::default();
    match json {
        Some(json) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            body.push(json);
        }
        None if method_has_body => req = req.header(header::CONTENT_LENGTH, "0"),
        None => {}
    }
    let req = req.body(body).map_err(|e| ProviderError::Other(e.to_string()))?;
    upstream::send(&endpoint, req, MAX_ANSWER_BYTES).await.map_err(ProviderError::from)
}

/// A 2xx answer's JSON.
pub fn parse<T: DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ProviderError> {
    serde_json::from_slice(body)
        .map_err(|e| ProviderError::BadResponse(format!("the {what} answer is not the expected JSON: {e}")))
}

/// Maps a non-2xx answer whose error text is `message` and whose codes (read by the adapter)
/// are `codes`, by the adapter's `table` (see [`super::errors`]): the client's own mistakes are
/// passed back (never retried), the account's and transient ones may be tried elsewhere.
pub fn classify(
    table: &[super::errors::Rule],
    status: StatusCode,
    codes: &[&str],
    retry_after: Option<Duration>,
    message: String,
) -> ProviderError {
    let message = if message.is_empty() { "(empty body)".to_string() } else { message };
    let class = super::errors::classify(table, status.as_u16(), codes, &message);
    super::errors::to_error(class, status, None, None, &message, retry_after)
}

/// Provider text made safe for messages: no control characters, bounded.
pub fn clean(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// `scheme://authority` of a URL, lowercased.
pub fn origin(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?).to_ascii_lowercase())
}

/// The URL the provider named for a job, when it is on the provider's own origin (the key
/// goes with every call and must never reach another host); else the documented one.
pub fn same_origin_or(given: Option<String>, base: Option<&str>, documented: impl FnOnce() -> String) -> String {
    match (given, base) {
        (Some(u), Some(b)) if origin(&u).as_deref() == Some(b) => u,
        _ => documented(),
    }
}

/// Whether a job id from an answer can go into a URL path as it is.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Poll delays, doubling from the first up to the cap, and the count of failed polls.
pub struct Backoff {
    next: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max: max.max(first), failures: 0 }
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// One poll: `Ok(None)` when it failed in a way the next poll may not (a lost poll
    /// does not hurt the job), the error once that happened too often in a row.
    pub async fn poll(
        &mut self,
        call: impl Future<Output = Result<upstream::Answer, ProviderError>>,
    ) -> Result<Option<upstream::Answer>, ProviderError> {
        match call.await {
            Ok(a) => {
                if a.status.is_success() {
                    self.failures = 0;
                }
                Ok(Some(a))
            }
            Err(e) if self.tolerates(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a failed poll is passed over (and counts it).
    pub fn tolerates(&mut self, e: &ProviderError) -> bool {
        let transient = match e {
            ProviderError::Connect(_) | ProviderError::Transport(_) => true,
            ProviderError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        };
        self.failures += 1;
        transient && self.failures < MAX_POLL_FAILURES
    }
}

/// Cancels the provider's job when dropped while armed: the attempt was abandoned (client
/// gone, deadline, hedge lost) or failed before the job finished, which would otherwise run
/// on, and be billed, for nobody.
pub struct CancelOnDrop {
    provider: &'static str,
    cancel: Option<(Method, String, Option<HeaderValue>)>,
}

impl CancelOnDrop {
    pub fn new(provider: &'static str, method: Method, url: String, auth: Option<HeaderValue>) -> CancelOnDrop {
        CancelOnDrop { provider, cancel: Some((method, url, auth)) }
    }

    /// The job reached an end of its own: nothing to cancel.
    pub fn disarm(&mut self) {
        self.cancel = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some((method, url, auth)) = self.cancel.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let provider = self.provider;
        runtime.spawn(async move {
            match tokio::time::timeout(CANCEL_TIMEOUT, call(method, &url, auth.as_ref(), None)).await {
                Ok(Ok(a)) if a.status.is_success() => tracing::debug!(provider, "abandoned job cancelled"),
                Ok(Ok(a)) => tracing::info!(provider, status = a.status.as_u16(), "job cancel refused"),
                Ok(Err(e)) => tracing::info!(provider, "job cancel failed: {}", e.text_without_provider_message()),
                Err(_) => tracing::info!(provider, "job cancel timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_images_than_a_job_makes_run_as_several_jobs() {
        assert_eq!(batches(1), vec![1]);
        assert_eq!(batches(4), vec![4]);
        assert_eq!(batches(5), vec![4, 1]);
        assert_eq!(batches(10), vec![4, 4, 2]);
        assert_eq!((0..3).map(|i| job_seed(Some(7), i)).collect::<Vec<_>>(), vec![Some(7), Some(11), Some(15)]);
        assert_eq!(job_seed(None, 2), None);
    }
}
