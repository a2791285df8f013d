//! A tiny HTTP/1.1 client for talking to the gateway (and to mocks): whole answers as [`Resp`]
//! with assertion helpers, answers whose body is left unread, and raw connections that a test
//! can drop to play a client that leaves.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Upper bound for any single HTTP exchange made by a test.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response (status {}) is not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().expect("ascii header").to_string())
    }

    /// A compact description for assertion messages.
    pub fn describe(&self) -> String {
        let hs: Vec<String> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-acc") || *k == "content-type")
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        let mut body = self.text();
        if body.len() > 600 {
            body.truncate(600);
            body.push_str("...");
        }
        format!("status {} [{}] body {}", self.status, hs.join("; "), body)
    }

    /// The `x-acc-attempts` header split into `provider:result` items.
    pub fn attempts(&self) -> Vec<String> {
        let h =
            self.header("x-acc-attempts").unwrap_or_else(|| panic!("no x-acc-attempts header: {}", self.describe()));
        h.split(", ").map(|s| s.to_string()).collect()
    }

    /// `Retry-After` as whole seconds (panics when absent or not an integer).
    pub fn retry_after_secs(&self) -> u64 {
        let v = self.header("retry-after").unwrap_or_else(|| panic!("no retry-after header: {}", self.describe()));
        v.trim().parse().unwrap_or_else(|_| panic!("retry-after {v:?} is not integer seconds: {}", self.describe()))
    }

    pub fn assert_status(&self, status: u16) {
        assert_eq!(self.status, status, "unexpected status: {}", self.describe());
    }

    /// Asserts an OpenAI-shaped error with this code and returns its `error` object.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        let err = self.assert_error_shape(status);
        assert_eq!(err["code"], json!(code), "error.code: {}", self.describe());
        err
    }

    /// Asserts status and an OpenAI-shaped error body `{"error":{message,type,param,code}}`.
    pub fn assert_error_shape(&self, status: u16) -> Value {
        self.assert_status(status);
        let v = self.json();
        let err = v.get("error").unwrap_or_else(|| panic!("no error object: {}", self.describe()));
        for field in ["message", "type", "param", "code"] {
            assert!(err.get(field).is_some(), "error.{field} missing: {}", self.describe());
        }
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error.message must be a non-empty string: {}",
            self.describe()
        );
        assert!(err["type"].is_string(), "error.type must be a string: {}", self.describe());
        err.clone()
    }
}

pub async fn try_send(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<Resp, String> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("reading body: {e:?}"))?.to_bytes();
        Ok::<_, String>(Resp { status: parts.status.as_u16(), headers: parts.headers, body })
    };
    match tokio::time::timeout(HTTP_TIMEOUT, exchange).await {
        Ok(r) => r.map_err(|e| format!("{method} {url}: {e}")),
        Err(_) => Err(format!("{method} {url}: no answer within {HTTP_TIMEOUT:?}")),
    }
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Resp {
    try_send(method, url, headers, body).await.unwrap_or_else(|e| panic!("{e}"))
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    send("GET", url, headers, Vec::new()).await
}

pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    post_raw(url, serde_json::to_vec(body).unwrap(), headers).await
}

/// POST raw bytes as `application/json` (for malformed bodies).
pub async fn post_raw(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
    let mut hs: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    hs.extend_from_slice(headers);
    send("POST", url, &hs, body).await
}

/// POST JSON to `url` and return the status, the headers and the unread body (10 s at most for
/// the headers).
pub async fn post_head(url: &str, body: &Value) -> (u16, http::HeaderMap, hyper::body::Incoming) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("no answer headers within 10 s")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    (parts.status.as_u16(), parts.headers, body)
}

/// Sends a JSON POST to `path` on a raw connection to `addr` and leaves the connection open,
/// unread; dropping the returned stream closes it (a client that leaves).
pub async fn raw_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> tokio::net::TcpStream {
    let body = serde_json::to_vec(body).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(&body).await.expect("write body");
    s
}

/// An `Authorization` header value for a client key.
pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}
