//! OpenAI's image streams (`stream: true`): the `text/event-stream` answer read into events
//! (WHATWG HTML, "Interpreting an event stream": `event:` and `data:` fields, a blank line ends
//! an event, `:` starts a comment), then into a [`Generation`] whose images are the completed
//! events' and whose [`Streamed`] keeps every event for the client.
//!
//! Event shapes (OpenAI Images API reference, "Image generation streaming events" and "Image
//! edit streaming events"): `image_generation.partial_image` / `image_edit.partial_image` with
//! `b64_json`, `partial_image_index`, `created_at`, `size`, `quality`, `background`,
//! `output_format`; `image_generation.completed` / `image_edit.completed` with the same fields
//! (no index) and `usage`; an `error` event carries `{"error": {...}}` as other answers do.

use bytes::Bytes;
use serde_json::Value;

use super::{skim, Generation, Image, ProviderError, Streamed};

/// One server-sent event: its `event:` name (when given) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

/// The events of a whole `text/event-stream` body, in order. Lines end with LF, CRLF or CR;
/// an event without data is not dispatched (as browsers do).
pub fn parse(body: &[u8]) -> Vec<Event> {
    let text = String::from_utf8_lossy(body);
    let mut events = Vec::new();
    let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalised.split('\n') {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(Event { event: name.take(), data: d });
            }
            name = None;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    if let Some(d) = data {
        events.push(Event { event: name, data: d });
    }
    events
}

/// What an upstream stream came to: the generation, or the `{"error": ...}` body of its error
/// event (for the adapter's error table).
#[derive(Debug)]
pub enum StreamAnswer {
    Done(Box<Generation>),
    Error(Bytes),
}

/// Reads an upstream image stream. Every `*.completed` event is one image; a stream that ends
/// without one (cut off, or only partials) is a bad response, so the next target is tried.
pub fn generation(body: &[u8]) -> Result<StreamAnswer, ProviderError> {
    let mut streamed = Streamed::default();
    let mut images = Vec::new();
    for (i, ev) in parse(body).into_iter().enumerate() {
        let value: Value = serde_json::from_str(&ev.data)
            .map_err(|e| ProviderError::BadResponse(format!("stream event {i} is not JSON: {e}")))?;
        let kind = value.get("type").and_then(Value::as_str).or(ev.event.as_deref()).unwrap_or_default().to_string();
        if kind == "error" || value.get("error").is_some_and(Value::is_object) {
            let error = value.get("error").cloned().unwrap_or(Value::Null);
            return Ok(StreamAnswer::Error(Bytes::from(serde_json::json!({ "error": error }).to_string())));
        }
        let b64 = || {
            let text = value.get("b64_json").and_then(Value::as_str).unwrap_or_default();
            skim::base64_value(skim::Raw::Plain(text.to_string()))
                .filter(|b| !b.is_empty())
                .ok_or_else(|| ProviderError::BadResponse(format!("stream event {i} ({kind}) has no valid b64_json")))
        };
        if kind.ends_with(".partial_image") {
            b64()?;
            streamed.partials.push(value);
        } else if kind.ends_with(".completed") {
            images.push(Image::Base64(b64()?));
            streamed.completed.push(value);
        }
        // Other events (none documented today) are not the client's concern.
    }
    let Some(last) = streamed.completed.last() else {
        return Err(ProviderError::BadResponse("the event stream ended without a completed event".into()));
    };
    let answer_fields = super::ANSWER_FIELDS
        .iter()
        .filter_map(|&k| {
            let v = last.get(k)?.clone();
            super::well_formed_answer_field(k, &v).then_some((k, v))
        })
        .collect();
    Ok(StreamAnswer::Done(Box::new(Generation {
        images,
        answer_fields,
        streamed: Some(streamed),
        ..Default::default()
    })))
}

/// Where a `stream: true` request's partial images go while its attempts still run, so the
/// client sees them as the provider sends them (issue: live partials on routes that do not
/// evaluate). Shared by the request's answer and its attempts; the first attempt to send a
/// partial image owns the stream until it ends without an image, so two attempts' partials
/// never interleave (a hedge's are dropped). Once an attempt completes, later partials are
/// dropped. Each partial is queued as one server-sent event, ready to write.
#[derive(Debug, Default)]
pub struct LiveTap {
    state: std::sync::Mutex<TapState>,
}

#[derive(Debug, Default)]
struct TapState {
    queue: std::collections::VecDeque<Bytes>,
    /// Events queued so far, taken or not.
    relayed: usize,
    /// The attempt whose partials are relayed.
    owner: Option<u64>,
    next_id: u64,
    /// An attempt completed: no more partials.
    done: bool,
    /// The request's trace id and route, for the live answer's headers.
    origin: Option<(String, String)>,
    waker: Option<std::task::Waker>,
}

impl TapState {
    /// Keeps `waker` to wake when an event is queued.
    fn park(&mut self, waker: &std::task::Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }
}

impl LiveTap {
    fn state(&self) -> std::sync::MutexGuard<'_, TapState> {
        // A panic while holding this lock leaves only a queue of events behind.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Names the request's trace id and the route it went to (sent as `x-acc-trace-id` and
    /// `x-acc-route` when the answer starts early).
    pub fn set_origin(&self, trace_id: &str, route: &str) {
        self.state().origin = Some((trace_id.to_string(), route.to_string()));
    }

    /// The trace id and route named by [`set_origin`](Self::set_origin).
    pub fn origin(&self) -> (Option<String>, Option<String>) {
        self.state().origin.clone().map_or((None, None), |(t, r)| (Some(t), Some(r)))
    }

    /// Whether any partial image was relayed (queued for the client) so far.
    pub fn started(&self) -> bool {
        self.state().relayed > 0
    }

    /// The next queued event, oldest first; when there is none, `waker` is woken once one is
    /// queued.
    pub fn pop(&self, waker: &std::task::Waker) -> Option<Bytes> {
        let mut s = self.state();
        let next = s.queue.pop_front();
        if next.is_none() {
            s.park(waker);
        }
        next
    }

    /// Whether an event is queued; when none is, `waker` is woken once one is.
    pub fn ready(&self, waker: &std::task::Waker) -> bool {
        let mut s = self.state();
        if s.queue.is_empty() {
            s.park(waker);
            return false;
        }
        true
    }

    /// A new attempt's relay, showing the provider's stream to this tap; at most `max` of its
    /// partial images are relayed (what the client asked for), later ones are dropped.
    pub fn relay(self: &std::sync::Arc<Self>, max: usize) -> PartialRelay {
        let id = {
            let mut s = self.state();
            s.next_id += 1;
            s.next_id
        };
        PartialRelay { tap: self.clone(), id, pending: Vec::new(), scanned: 0, wanted: false, max, pushed: 0 }
    }

    /// Queues a partial of attempt `id` when it owns the stream; false when dropped.
    fn push(&self, id: u64, event: Bytes) -> bool {
        let mut s = self.state();
        if s.done || *s.owner.get_or_insert(id) != id {
            return false;
        }
        s.queue.push_back(event);
        s.relayed += 1;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        true
    }

    fn end(&self, id: u64, completed: bool) {
        let mut s = self.state();
        s.done |= completed;
        if s.owner == Some(id) {
            s.owner = None;
        }
    }
}

/// One attempt's view of its provider's event stream ([`crate::upstream::BodyObserver`]):
/// every complete `*.partial_image` event with a valid `b64_json` goes to the [`LiveTap`] as it
/// arrives. Dropped when the attempt ends, which hands the stream to another attempt unless
/// this one completed.
#[derive(Debug)]
pub struct PartialRelay {
    tap: std::sync::Arc<LiveTap>,
    id: u64,
    /// Bytes of the event being received.
    pending: Vec<u8>,
    /// How far `pending` was searched for an event's end.
    scanned: usize,
    /// The answer is a successful event stream.
    wanted: bool,
    /// At most this many of this attempt's partial images go to the client: those it asked
    /// for ([`crate::request::GenerationRequest::partials_allowed`]). A fallback that takes
    /// the stream over starts its image afresh, with its own partials.
    max: usize,
    /// This attempt's partials queued so far.
    pushed: usize,
}

impl PartialRelay {
    /// Handles the complete events at the front of `pending`.
    fn dispatch(&mut self) {
        let mut start = 0;
        let mut i = self.scanned.saturating_sub(3);
        while i + 1 < self.pending.len() {
            // An event ends with a blank line: LF LF, CR CR, or CRLF CRLF.
            let end = match &self.pending[i..] {
                [b'\n', b'\n', ..] | [b'\r', b'\r', ..] => Some(i + 2),
                [b'\r', b'\n', b'\r', b'\n', ..] => Some(i + 4),
                _ => None,
            };
            match end {
                Some(end) => {
                    for ev in parse(&self.pending[start..end]) {
                        self.forward(&ev);
                    }
                    start = end;
                    i = end;
                }
                None => i += 1,
            }
        }
        self.pending.drain(..start);
        self.scanned = self.pending.len();
    }

    fn forward(&mut self, ev: &Event) {
        let Ok(value) = serde_json::from_str::<Value>(&ev.data) else { return };
        let kind = value.get("type").and_then(Value::as_str).or(ev.event.as_deref()).unwrap_or_default();
        if kind.ends_with(".completed") {
            self.tap.end(self.id, true);
        } else if kind.ends_with(".partial_image") {
            let text = value.get("b64_json").and_then(Value::as_str).unwrap_or_default();
            // Valid base64 of an image: a partial whose bytes are not a PNG, JPEG or WebP (HTML,
            // an error text) never reaches the client as an image, as a final image would not.
            let image = skim::base64_value(skim::Raw::Plain(text.to_string())).is_some_and(|b| {
                !b.is_empty() && b.base64_head().is_some_and(|(head, n)| super::sniff_image(&head[..n]).is_some())
            });
            if self.pushed < self.max && image {
                // The provider's own data text, as it sent it (one `data:` line per line).
                let mut event = format!("event: {kind}\n");
                for line in ev.data.split('\n') {
                    event.push_str("data: ");
                    event.push_str(line);
                    event.push('\n');
                }
                event.push('\n');
                if self.tap.push(self.id, Bytes::from(event)) {
                    self.pushed += 1;
                }
            }
        }
    }
}

impl crate::upstream::BodyObserver for PartialRelay {
    fn head(&mut self, status: http::StatusCode, headers: &http::HeaderMap) -> bool {
        let ct = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        self.wanted = status.is_success() && ct.trim_start().starts_with("text/event-stream");
        self.wanted
    }

    fn chunk(&mut self, data: &[u8]) {
        if self.wanted {
            self.pending.extend_from_slice(data);
            self.dispatch();
        }
    }
}

impl Drop for PartialRelay {
    fn drop(&mut self) {
        self.tap.end(self.id, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_as_the_sse_spec_says() {
        let body =
            b": keep-alive\r\nevent: a\r\ndata: {\"x\":1}\r\n\r\ndata:two\ndata: lines\n\nevent: lone\n\ndata: last";
        let events = parse(body);
        assert_eq!(
            events,
            vec![
                Event { event: Some("a".into()), data: "{\"x\":1}".into() },
                Event { event: None, data: "two\nlines".into() },
                Event { event: None, data: "last".into() },
            ]
        );
    }

    #[test]
    fn a_stream_becomes_its_completed_images_with_every_event_kept() {
        let body = "event: image_generation.partial_image\ndata: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"aGk=\",\"partial_image_index\":0}\n\n\
                    event: image_generation.completed\ndata: {\"type\":\"image_generation.completed\",\"b64_json\":\"aGVsbG8=\",\"size\":\"1024x1024\",\"usage\":{\"total_tokens\":3}}\n\n";
        let StreamAnswer::Done(g) = generation(body.as_bytes()).unwrap() else { panic!("not done") };
        assert!(matches!(&g.images[..], [Image::Base64(b)] if b.to_bytes()[..] == b"aGVsbG8="[..]));
        let s = g.streamed.unwrap();
        assert_eq!((s.partials.len(), s.completed.len()), (1, 1));
        assert_eq!(s.partials[0]["partial_image_index"], 0);
        let fields: Vec<&str> = g.answer_fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(fields, ["size", "usage"]);
    }

    #[test]
    fn cut_off_streams_and_error_events_are_told_apart() {
        let partial_only = "event: image_generation.partial_image\ndata: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"aGk=\",\"partial_image_index\":0}\n\n";
        let e = generation(partial_only.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "bad response: the event stream ended without a completed event");
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"code\":\"moderation_blocked\",\"message\":\"no\"}}\n\n";
        let StreamAnswer::Error(body) = generation(error.as_bytes()).unwrap() else { panic!("not an error") };
        assert_eq!(&body[..], br#"{"error":{"code":"moderation_blocked","message":"no"}}"#);
        let bad = "data: {\"type\":\"image_generation.completed\",\"b64_json\":\"!!\"}\n\n";
        assert_eq!(
            generation(bad.as_bytes()).unwrap_err().to_string(),
            "bad response: stream event 0 (image_generation.completed) has no valid b64_json"
        );
    }
    fn drain(tap: &LiveTap) -> Vec<String> {
        let waker = futures_util::task::noop_waker();
        std::iter::from_fn(|| tap.pop(&waker)).map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
    }

    #[test]
    fn partials_are_relayed_whatever_the_chunk_boundaries() {
        use crate::upstream::BodyObserver;
        let p0 = r#"{"type":"image_generation.partial_image","b64_json":"iVBORw0KGgo=","partial_image_index":0}"#;
        let p1 = r#"{"type":"image_generation.partial_image","b64_json":"/9j/4AAQSkZJRg==","partial_image_index":1}"#;
        let done = r#"{"type":"image_generation.completed","b64_json":"aGVsbG8="}"#;
        let late = r#"{"type":"image_generation.partial_image","b64_json":"iVBORw0KGgo=","partial_image_index":2}"#;
        for ending in ["\n", "\r\n", "\r"] {
            let body = format!(
                ": ping{e}event: image_generation.partial_image{e}data: {p0}{e}{e}data: {p1}{e}{e}data: {done}{e}{e}data: {late}{e}{e}",
                e = ending
            );
            let expected = vec![
                format!("event: image_generation.partial_image\ndata: {p0}\n\n"),
                format!("event: image_generation.partial_image\ndata: {p1}\n\n"),
            ];
            for split in [1, 2, 7, 64, body.len()] {
                let tap = std::sync::Arc::new(LiveTap::default());
                let mut relay = tap.relay(usize::MAX);
                let ok = http::HeaderMap::from_iter([(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
                )]);
                assert!(relay.head(http::StatusCode::OK, &ok));
                for piece in body.as_bytes().chunks(split) {
                    relay.chunk(piece);
                }
                // The partial after the completed event is not relayed.
                assert_eq!(drain(&tap), expected, "line ending {ending:?}, pieces of {split}");
                assert!(tap.started());
            }
        }
    }

    #[test]
    fn one_attempt_owns_the_live_stream_until_it_fails() {
        use crate::upstream::BodyObserver;
        let ok = http::HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        )]);
        let partial = |i: u32| {
            format!(
                "data: {{\"type\":\"image_edit.partial_image\",\"b64_json\":\"iVBORw0KGgo=\",\"partial_image_index\":{i}}}\n\n"
            )
        };
        let tap = std::sync::Arc::new(LiveTap::default());
        let (mut a, mut b) = (tap.relay(usize::MAX), tap.relay(usize::MAX));
        assert!(a.head(http::StatusCode::OK, &ok) && b.head(http::StatusCode::OK, &ok));
        a.chunk(partial(0).as_bytes());
        b.chunk(partial(7).as_bytes());
        assert_eq!(drain(&tap).len(), 1, "the hedge's partial is dropped");
        drop(a);
        b.chunk(partial(8).as_bytes());
        let after = drain(&tap);
        assert_eq!(after.len(), 1);
        assert!(after[0].contains("\"partial_image_index\":8"), "{after:?}");
        // An error answer, or one that is not an event stream, is not observed.
        let mut c = tap.relay(usize::MAX);
        assert!(!c.head(http::StatusCode::BAD_REQUEST, &ok));
        let json = http::HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )]);
        assert!(!c.head(http::StatusCode::OK, &json));
        // A partial without a valid image is not relayed.
        drop(b);
        let mut d = tap.relay(usize::MAX);
        assert!(d.head(http::StatusCode::OK, &ok));
        d.chunk(b"data: {\"type\":\"image_edit.partial_image\",\"b64_json\":\"!!\"}\n\n");
        assert!(drain(&tap).is_empty());
        // Nor one whose bytes are no image: "<html><body>" and "hi" as base64.
        d.chunk(b"data: {\"type\":\"image_edit.partial_image\",\"b64_json\":\"PGh0bWw+PGJvZHk+\"}\n\n");
        d.chunk(b"data: {\"type\":\"image_edit.partial_image\",\"b64_json\":\"aGk=\"}\n\n");
        assert!(drain(&tap).is_empty());
        // A WebP's first bytes are one.
        d.chunk(b"data: {\"type\":\"image_edit.partial_image\",\"b64_json\":\"UklGRiQAAABXRUJQ\"}\n\n");
        assert_eq!(drain(&tap).len(), 1);
    }
}
