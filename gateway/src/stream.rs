//! The answer to a `stream: true` request: server-sent events in OpenAI's shapes
//! (`text/event-stream`, each event an `event:` line naming its type and a `data:` line holding
//! its JSON, then a blank line).
//!
//! - Partial images relayed live ([`LiveBody`]): on a route that does not evaluate, the
//!   streaming attempt's `*.partial_image` events go out as they arrive (through the request's
//!   [`LiveTap`]), before the outcome is known; the outcome follows as the completed events, or
//!   as one `error` event when the request fails after the stream began.
//! - The winner streamed (OpenAI kind): its events are relayed as it sent them, in order:
//!   `image_generation.partial_image` (or `image_edit.partial_image`) events unless the route
//!   evaluates or they already went out live, then one `*.completed` event per image.
//! - The winner answered plainly (another kind, or a fallback): one `*.completed` event per
//!   image, built from the answer: `b64_json`, `created_at` (now), `size`, `quality`,
//!   `background`, `output_format` (the provider's, else what was asked, else what the image
//!   is), and `usage` when the provider reported it.
//!
//! Failures before anything was sent are not events: the request's error answer (status, OpenAI
//! error body, headers) goes out as for any other request.

use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::answer::Sent;
use crate::body::ChunkedBody;
use crate::providers::events::LiveTap;
use crate::providers::{Generation, Image};
use crate::request::{GenerationRequest, Operation};

/// The answer's media type.
pub const CONTENT_TYPE: &str = "text/event-stream";

/// The events' type prefix for an operation: `image_generation` or `image_edit`.
pub fn event_prefix(op: Operation) -> &'static str {
    match op {
        Operation::Generate => "image_generation",
        Operation::Edit | Operation::Variation => "image_edit",
    }
}

/// The event stream for `generation`: the upstream's partial events only when
/// `relay_partials` (the route does not evaluate), then the completed events. `sent` gets the
/// images as they went out, for the trace record.
pub fn render(
    req: &GenerationRequest,
    generation: Generation,
    relay_partials: bool,
    sent: Option<&mut Vec<Sent>>,
) -> ChunkedBody {
    let mut out = ChunkedBody::default();
    let images: Vec<Bytes> = generation.images.into_iter().filter_map(base64_of).collect();
    if let Some(s) = sent {
        s.extend(images.iter().map(|b| Sent { url: None, base64: Some(b.into()), bytes: None }));
    }
    if let Some(streamed) = generation.streamed {
        if relay_partials {
            for p in &streamed.partials {
                event(&mut out, p);
            }
        }
        for c in &streamed.completed {
            event(&mut out, c);
        }
        return out;
    }
    let created_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let given: Map<String, Value> = generation.answer_fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    for b64 in images {
        let bytes = base64_simd::STANDARD.decode_to_vec(&b64).unwrap_or_default();
        let mut ev = Map::new();
        ev.insert("type".into(), format!("{}.completed", event_prefix(req.op)).into());
        ev.insert("b64_json".into(), String::from_utf8_lossy(&b64).into_owned().into());
        ev.insert("created_at".into(), created_at.into());
        let size = dimensions(&bytes).unwrap_or_else(|| req.size_text());
        let quality = req.quality.clone().unwrap_or_else(|| "auto".into());
        let background = req.raw.get("background").and_then(Value::as_str).unwrap_or("auto").to_string();
        let format = match crate::providers::sniff_image(&bytes) {
            Some((_, "jpg")) => "jpeg",
            Some((_, ext)) => ext,
            None => "png",
        };
        for (k, fallback) in
            [("size", size), ("quality", quality), ("background", background), ("output_format", format.into())]
        {
            ev.insert(k.into(), given.get(k).cloned().unwrap_or_else(|| fallback.into()));
        }
        if let Some(u) = given.get("usage") {
            ev.insert("usage".into(), u.clone());
        }
        event(&mut out, &Value::Object(ev));
    }
    out
}

/// One event as OpenAI writes it: `event: TYPE`, `data: JSON`, blank line.
fn event(out: &mut ChunkedBody, value: &Value) {
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("message");
    // Serialising a JSON value to a string cannot fail.
    let data = serde_json::to_string(value).unwrap_or_default();
    out.push(format!("event: {kind}\ndata: {data}\n\n"));
}

/// An image's base64 text. Images given as URLs were fetched before this (a stream needs the
/// bytes), so a URL here is left out rather than sent as something it is not.
fn base64_of(image: Image) -> Option<Bytes> {
    match image {
        Image::Base64(b) => Some(b.to_bytes()),
        Image::Raw { bytes, .. } => Some(Bytes::from(base64_simd::STANDARD.encode_type::<Vec<u8>>(&bytes))),
        Image::Url(_) => {
            tracing::error!("a streamed answer holds an unfetched image URL; left out");
            None
        }
    }
}

/// `WIDTHxHEIGHT` read from the image's header.
fn dimensions(bytes: &[u8]) -> Option<String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?;
    let (w, h) = reader.into_dimensions().ok()?;
    Some(format!("{w}x{h}"))
}

/// The request's work: it resolves to the answer the request would have had without the
/// live start.
pub type Work = std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<axum::body::Body>> + Send>>;

/// The body of a stream answered before its attempts ended: partial images as the owning
/// attempt receives them ([`LiveTap`]), while `work` goes on; then the work's own answer, as
/// its completed events when it succeeded, or as one `error` event (`{"type": "error",
/// "error": {...}}`, the body of the error answer the request would otherwise have had; the
/// OpenAI SDKs raise it as an API error) when it failed after the stream began. Dropping the
/// body (the client went away) drops the work, which cancels the attempts.
pub struct LiveBody {
    tap: std::sync::Arc<LiveTap>,
    work: Option<Work>,
    outcome: Option<Outcome>,
}

enum Outcome {
    /// The successful answer's events, relayed as they are.
    Events(axum::body::Body),
    /// The failed answer's body, read whole to become one event.
    Error(axum::body::Body, Vec<u8>),
}

impl LiveBody {
    /// The live answer's body: `tap`'s partials, then `work`'s outcome.
    pub fn new(tap: std::sync::Arc<LiveTap>, work: Work) -> LiveBody {
        LiveBody { tap, work: Some(work), outcome: None }
    }
}

impl http_body::Body for LiveBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            // Partials first: those queued before the work ended go out before its outcome.
            if let Some(event) = this.tap.pop(cx.waker()) {
                return Poll::Ready(Some(Ok(http_body::Frame::data(event))));
            }
            if let Some(work) = this.work.as_mut() {
                match work.as_mut().poll(cx) {
                    Poll::Ready(answer) => {
                        this.work = None;
                        let (parts, body) = answer.into_parts();
                        this.outcome = Some(if parts.status.is_success() {
                            Outcome::Events(body)
                        } else {
                            Outcome::Error(body, Vec::new())
                        });
                    }
                    Poll::Pending if this.tap.ready(cx.waker()) => {}
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            return match this.outcome.as_mut() {
                None => Poll::Ready(None),
                Some(Outcome::Events(body)) => std::pin::Pin::new(body).poll_frame(cx),
                Some(Outcome::Error(body, text)) => match std::pin::Pin::new(body).poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            text.extend_from_slice(d);
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => {
                        let event = error_event(text);
                        this.outcome = None;
                        Poll::Ready(Some(Ok(http_body::Frame::data(event))))
                    }
                },
            };
        }
    }
}

/// The `error` event for an error answer's body (`{"error": {...}}`, the gateway's OpenAI
/// error shape); a body that is not one becomes a generic `api_error`.
fn error_event(body: &[u8]) -> Bytes {
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|mut v| v.get_mut("error").map(Value::take))
        .filter(Value::is_object)
        .unwrap_or_else(|| {
            serde_json::json!({"message": "the request failed after the stream began", "type": "api_error", "param": null, "code": null})
        });
    let data = serde_json::json!({"type": "error", "error": error});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Streamed;
    use serde_json::json;

    fn req(body: Value) -> GenerationRequest {
        GenerationRequest::from_json(body.to_string().as_bytes()).unwrap()
    }

    fn text(body: ChunkedBody) -> String {
        use futures_util::FutureExt;
        use http_body_util::BodyExt;
        // A ChunkedBody is ready at once.
        let bytes = body.collect().now_or_never().unwrap().unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn a_streamed_winner_is_relayed_and_partials_only_when_asked() {
        let partial = json!({"type": "image_generation.partial_image", "b64_json": "aGk=", "partial_image_index": 0});
        let done = json!({"type": "image_generation.completed", "b64_json": "aGVsbG8=", "created_at": 7});
        let g = Generation {
            images: vec![Image::Base64(Bytes::from_static(b"aGVsbG8=").into())],
            streamed: Some(Streamed { partials: vec![partial.clone()], completed: vec![done.clone()] }),
            ..Default::default()
        };
        let r = req(json!({"prompt": "x", "stream": true, "partial_images": 1}));
        let both = text(render(&r, g.clone(), true, None));
        assert_eq!(
            both,
            format!("event: image_generation.partial_image\ndata: {partial}\n\nevent: image_generation.completed\ndata: {done}\n\n")
        );
        let mut sent = Vec::new();
        let final_only = text(render(&r, g, false, Some(&mut sent)));
        assert_eq!(final_only, format!("event: image_generation.completed\ndata: {done}\n\n"));
        assert_eq!(sent[0].base64.as_ref().map(|b| b.to_bytes()), Some(Bytes::from_static(b"aGVsbG8=")));
    }

    #[test]
    fn a_plain_answer_becomes_one_completed_event_per_image() {
        let mut png = Vec::new();
        image::RgbImage::new(3, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let g = Generation {
            images: vec![Image::Raw { bytes: Bytes::from(png.clone()), mime: "image/png" }],
            answer_fields: vec![("quality", json!("high"))],
            ..Default::default()
        };
        let r = req(json!({"prompt": "x", "stream": true, "background": "opaque"}));
        let out = text(render(&r, g, true, None));
        let data = out.strip_prefix("event: image_generation.completed\ndata: ").unwrap().strip_suffix("\n\n").unwrap();
        let v: Value = serde_json::from_str(data).unwrap();
        let b64 = base64_simd::STANDARD.encode_to_string(&png);
        assert_eq!(v["b64_json"], b64.as_str());
        assert_eq!((v["size"].as_str(), v["quality"].as_str()), (Some("3x2"), Some("high")));
        assert_eq!((v["background"].as_str(), v["output_format"].as_str()), (Some("opaque"), Some("png")));
        assert!(v["created_at"].as_u64().unwrap() > 1_700_000_000);
        assert!(v.get("usage").is_none());
    }
}
