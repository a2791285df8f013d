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
            let well_formed = if k == "usage" { v.is_object() } else { v.is_string() };
            well_formed.then_some((k, v))
        })
        .collect();
    Ok(StreamAnswer::Done(Box::new(Generation {
        images,
        answer_fields,
        streamed: Some(streamed),
        ..Default::default()
    })))
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
        assert!(matches!(&g.images[..], [Image::Base64(b)] if &b[..] == b"aGVsbG8="));
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
}
