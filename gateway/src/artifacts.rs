//! Images the gateway serves itself for `response_format = "url"`: kept in memory for the
//! policy's `url_ttl_secs` under a total byte budget. The URL's id is 122 random bits, so
//! holding the URL is what grants access (like a signed URL), and it expires.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Where gateway-served images live on the proxy listener: `{PATH}{id}.{ext}`.
pub const PATH: &str = "/v1/images/artifacts/";

/// The id of `{id}.{ext}` (32 hex digits when this gateway made it).
pub fn id_of(file: &str) -> &str {
    file.split('.').next().unwrap_or_default()
}

/// The answer for an image with `left` before its URL expires.
pub fn respond(bytes: Bytes, mime: &'static str, left: Duration) -> axum::response::Response {
    use http::{header, HeaderValue};
    let mut r = axum::response::Response::new(axum::body::Body::from(bytes));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    for (name, value) in freshness(left, std::time::SystemTime::now()) {
        h.insert(name, value);
    }
    r
}

/// 404 `artifact_not_found` in the OpenAI error shape.
pub fn not_found() -> axum::response::Response {
    use axum::response::IntoResponse;
    ApiError::not_found("artifact_not_found", "no such image, or its URL has expired").into_response()
}

struct Entry {
    bytes: Bytes,
    mime: &'static str,
    expires: Instant,
}

pub struct ArtifactStore {
    map: DashMap<String, Entry>,
    /// Ids in insertion order, for expiry sweeps and eviction of the oldest.
    order: Mutex<VecDeque<String>>,
    bytes: AtomicUsize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl ArtifactStore {
    pub fn new(max_bytes: usize, metrics: Arc<Metrics>) -> ArtifactStore {
        ArtifactStore {
            map: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            max_bytes,
            metrics,
        }
    }

    /// Stores an image and returns its id. When the byte budget is exceeded the oldest images
    /// are evicted (counted), so memory stays bounded whatever the traffic.
    pub fn put(&self, bytes: Bytes, mime: &'static str, ttl: Duration) -> String {
        self.put_evicting(bytes, mime, ttl).0
    }

    /// [`Self::put`], also returning the ids of the images it evicted to stay within the
    /// budget (so that their copies elsewhere can go too).
    pub fn put_evicting(&self, bytes: Bytes, mime: &'static str, ttl: Duration) -> (String, Vec<String>) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut evicted = Vec::new();
        self.bytes.fetch_add(bytes.len(), Ordering::Relaxed);
        self.map.insert(id.clone(), Entry { bytes, mime, expires: Instant::now() + ttl });
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back(id.clone());
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes && order.len() > 1 {
            let Some(old) = order.pop_front() else { break };
            if self.remove(&old) {
                self.metrics.artifacts.with_label_values(&["evicted"]).inc();
                evicted.push(old);
            }
        }
        self.metrics.artifacts.with_label_values(&["stored"]).inc();
        (id, evicted)
    }

    /// Stores an image (`mime` and file extension `ext` as sniffed from its bytes) and returns
    /// its id, its URL under `base` (scheme and authority, no trailing slash) and the ids
    /// evicted to make room.
    pub fn publish(
        &self,
        bytes: Bytes,
        (mime, ext): (&'static str, &str),
        ttl: Duration,
        base: &str,
    ) -> (String, String, Vec<String>) {
        let (id, evicted) = self.put_evicting(bytes, mime, ttl);
        let url = format!("{base}{PATH}{id}.{ext}");
        (id, url, evicted)
    }

    /// `GET {PATH}{id}.{ext}`: the image with its media type, or 404 `artifact_not_found` in the
    /// OpenAI error shape when unknown or expired.
    pub fn serve(&self, file: &str) -> axum::response::Response {
        self.try_serve(file).unwrap_or_else(not_found)
    }

    /// [`Self::serve`] when this replica holds the image; `None` otherwise (another replica
    /// may: see `proxy`'s artifact route with `[cluster]`).
    pub fn try_serve(&self, file: &str) -> Option<axum::response::Response> {
        let (bytes, mime, left) = self.lookup(id_of(file))?;
        Some(respond(bytes, mime, left))
    }

    /// Whether the image `id` is held and its URL alive (not counted as served).
    pub fn alive(&self, id: &str) -> bool {
        self.map.get(id).is_some_and(|e| e.expires > Instant::now())
    }

    /// The image and its media type while its URL is alive.
    pub fn get(&self, id: &str) -> Option<(Bytes, &'static str)> {
        self.lookup(id).map(|(bytes, mime, _)| (bytes, mime))
    }

    /// The image, its media type and how long its URL has left.
    fn lookup(&self, id: &str) -> Option<(Bytes, &'static str, Duration)> {
        let found = self.map.get(id).map(|e| (e.bytes.clone(), e.mime, e.expires));
        let now = Instant::now();
        match found {
            Some((bytes, mime, expires)) if expires > now => {
                self.metrics.artifacts.with_label_values(&["served"]).inc();
                Some((bytes, mime, expires - now))
            }
            Some(_) => {
                if self.remove(id) {
                    self.metrics.artifacts.with_label_values(&["expired"]).inc();
                }
                None
            }
            None => None,
        }
    }

    /// Drops expired images; run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.retain(|id| {
            let expired = self.map.get(id).is_none_or(|e| e.expires <= now);
            if expired && self.remove(id) {
                self.metrics.artifacts.with_label_values(&["expired"]).inc();
            }
            !expired
        });
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn remove(&self, id: &str) -> bool {
        match self.map.remove(id) {
            Some((_, e)) => {
                self.bytes.fetch_sub(e.bytes.len(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// The caching headers of an image whose URL has `left` to live, answered at `now`: a browser
/// or a client cache may keep it exactly as long as the URL works, and no shared cache may
/// keep it at all (holding the URL is what grants access). `max-age` is the whole seconds left
/// (rounded down, never past the expiry), `Expires` the same instant as a date.
pub fn freshness(left: Duration, now: std::time::SystemTime) -> [(http::HeaderName, http::HeaderValue); 2] {
    use http::{header, HeaderValue};
    let secs = left.as_secs();
    let cache_control = HeaderValue::from_str(&format!("private, max-age={secs}"))
        .unwrap_or(HeaderValue::from_static("private, no-store"));
    let expires = HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(secs)))
        .unwrap_or(HeaderValue::from_static("0"));
    [(header::CACHE_CONTROL, cache_control), (header::EXPIRES, expires)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_stays_within_budget() {
        let store = ArtifactStore::new(10, Arc::new(Metrics::new()));
        let a = store.put(Bytes::from_static(b"123456"), "image/png", Duration::from_secs(60));
        assert_eq!(store.get(&a).unwrap().0, Bytes::from_static(b"123456"));
        let b = store.put(Bytes::from_static(b"abcdef"), "image/png", Duration::from_secs(60));
        assert!(store.get(&a).is_none(), "oldest evicted over budget");
        assert!(store.get(&b).is_some());
        assert_eq!(store.bytes(), 6);
        let c = store.put(Bytes::from_static(b"x"), "image/png", Duration::ZERO);
        assert!(store.get(&c).is_none());
        store.sweep();
        assert_eq!(store.bytes(), 6);
    }

    #[test]
    fn freshness_is_the_time_the_url_has_left() {
        // 1 000 000 000 s after the epoch is Sun, 09 Sep 2001 01:46:40 GMT.
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let cases = [
            (Duration::from_millis(3_599_900), "private, max-age=3599", "Sun, 09 Sep 2001 02:46:39 GMT"),
            (Duration::from_secs(60), "private, max-age=60", "Sun, 09 Sep 2001 01:47:40 GMT"),
            (Duration::from_millis(400), "private, max-age=0", "Sun, 09 Sep 2001 01:46:40 GMT"),
        ];
        for (left, cache_control, expires) in cases {
            let [(cc_name, cc), (ex_name, ex)] = freshness(left, now);
            assert_eq!((cc_name.as_str(), cc.to_str().unwrap()), ("cache-control", cache_control), "{left:?}");
            assert_eq!((ex_name.as_str(), ex.to_str().unwrap()), ("expires", expires), "{left:?}");
        }
    }
}
