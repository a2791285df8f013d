//! Review decisions POSTed to a route's `review_webhook_url`, signed with HMAC-SHA256.
//!
//! The body is JSON: `{"trace_id", "route", "outcome", "reviewer", "reason", "decided_at",
//! "decided_unix_nano"}` (`outcome`: approved, rejected or expired; `decided_at` RFC 3339 UTC).
//! Headers: `x-acc-timestamp: <Unix seconds>` and `x-acc-signature: sha256=<hex>`, the
//! lowercase hex HMAC-SHA256, keyed with the secret, of the timestamp, a `.`, and the exact body
//! bytes (`{timestamp}.{body}`): a receiver recomputes it over the raw body, compares in
//! constant time, and refuses timestamps too far from its clock (replays).
//!
//! A delivery succeeds on any 2xx answer; otherwise (connection error, timeout, other status)
//! it is tried again after `[review] webhook_backoff_ms`, doubled each time, up to
//! `webhook_max_attempts` in all. The URL comes from the policy (ops), not from clients, so it
//! may name an internal host: no SSRF guard applies. The secret is read from its environment
//! variable at delivery time and never logged.

use std::time::Duration;

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use tokio::net::TcpStream;

use crate::policy::ReviewBudget;
use crate::store::ReviewItem;
use crate::upstream::{tls_config, Stream};

/// `x-acc-signature`: `sha256=` and the hex HMAC-SHA256 of `{timestamp}.{body}`.
pub const SIGNATURE: &str = "x-acc-signature";
/// `x-acc-timestamp`: when the delivery was signed, Unix seconds.
pub const TIMESTAMP: &str = "x-acc-timestamp";

/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The JSON body announcing `item`'s decision.
pub fn body(item: &ReviewItem) -> Vec<u8> {
    let decided = item.decided_unix_nano.unwrap_or_default();
    let decided_at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(decided))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    serde_json::to_vec(&serde_json::json!({
        "trace_id": item.trace_id,
        "route": item.route,
        "outcome": item.state.name(),
        "reviewer": item.reviewer,
        "reason": item.reason,
        "decided_at": decided_at,
        "decided_unix_nano": decided,
    }))
    .unwrap_or_default()
}

/// One decision to deliver.
pub struct Delivery {
    url: String,
    secret_env: String,
    body: Bytes,
    attempts: u32,
    backoff: Duration,
    timeout: Duration,
}

impl Delivery {
    /// The delivery of `item`'s decision to `url`, signed with the secret in `secret_env`.
    pub fn new(url: String, secret_env: &str, budget: &ReviewBudget, item: &ReviewItem) -> Delivery {
        Delivery {
            url,
            secret_env: secret_env.to_string(),
            body: Bytes::from(body(item)),
            attempts: budget.webhook_max_attempts.max(1),
            backoff: budget.webhook_backoff,
            timeout: budget.webhook_timeout,
        }
    }

    /// Delivers, retrying with exponential backoff; counts each outcome in `counter`
    /// (`acc_review_webhooks_total{route,result}`).
    pub async fn send(self, route: &str, counter: &IntCounterVec) {
        let Some(secret) = std::env::var_os(&self.secret_env).filter(|s| !s.is_empty()) else {
            tracing::error!(route, variable = %self.secret_env, "review webhook not sent: its secret's environment variable is not set");
            counter.with_label_values(&[route, "no_secret"]).inc();
            return;
        };
        crate::secrets::register(&secret.to_string_lossy());
        let secret = secret.as_encoded_bytes().to_vec();
        let mut wait = self.backoff;
        for attempt in 1..=self.attempts {
            let timestamp = super::now_unix_nano() / 1_000_000_000;
            let signature = sign(&secret, timestamp, &self.body);
            let result = tokio::time::timeout(self.timeout, post(&self.url, timestamp, &signature, self.body.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} ms", self.timeout.as_millis())));
            match result {
                Ok(()) => {
                    counter.with_label_values(&[route, "delivered"]).inc();
                    return;
                }
                Err(why) => {
                    counter.with_label_values(&[route, "error"]).inc();
                    tracing::warn!(route, attempt, of = self.attempts, "review webhook delivery failed: {why}");
                }
            }
            if attempt < self.attempts {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
        }
        counter.with_label_values(&[route, "failed"]).inc();
    }
}

/// One POST; `Ok` on a 2xx answer.
async fn post(url: &str, timestamp: u64, signature: &str, body: Bytes) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("the URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let s =
            tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        Stream::Tls(Box::new(s))
    } else {
        Stream::Plain(tcp)
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "acc-review-webhook")
        .header(TIMESTAMP, timestamp.to_string())
        .header(SIGNATURE, signature)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected value is Python's `hmac.new(b"key", b'1700000000.{"a":1}', hashlib.sha256)`.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        assert_eq!(
            sign(b"key", 1_700_000_000, b"{\"a\":1}"),
            "sha256=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03"
        );
    }
}
