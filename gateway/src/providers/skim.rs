//! Parsing provider answers that carry megabytes of base64 without walking the payload more
//! than needed.
//!
//! A 1024x1024 PNG is ~2 MB of base64 inside a JSON string. serde_json would check every byte
//! of it for escapes and UTF-8, then the gateway would check it again as base64. Instead,
//! strings are located with SIMD `memchr`; every long string is cut out of the document and
//! replaced by a short placeholder; serde_json parses the small remainder (so the structure is
//! still fully validated); and each payload is then checked once, as base64. Valid standard
//! base64 has no quote, backslash or control byte, so a string that passes that check needs no
//! JSON unescaping and is ASCII.

use bytes::Bytes;

/// Strings at least this long are cut out; shorter ones stay in the remainder as they are.
const LONG: usize = 256;
/// Placeholders are `"\u0000N"`: a NUL cannot appear unescaped in JSON, so only a placeholder
/// parses to a string that starts with one followed by our index.
const MARK: char = '\u{0}';

/// A JSON document with its long strings held aside as spans of the original body.
pub struct Skimmed {
    /// The document with every long string replaced by a placeholder.
    pub remainder: Vec<u8>,
    /// Byte ranges (inside the quotes) of the long strings, in order.
    spans: Vec<(usize, usize)>,
    body: Bytes,
}

/// Locates every string of `body` and cuts out the long ones. Fails on an unterminated string.
pub fn skim(body: &Bytes) -> Result<Skimmed, String> {
    let b = &body[..];
    let mut remainder = Vec::with_capacity(4096.min(b.len()));
    let mut spans = Vec::new();
    let mut copied = 0; // b[..copied] is accounted for in `remainder`
    let mut i = 0;
    while let Some(off) = memchr::memchr(b'"', &b[i..]) {
        let start = i + off + 1; // first byte inside the string
        let mut j = start;
        let end = loop {
            match memchr::memchr2(b'"', b'\\', &b[j..]) {
                None => return Err("answer ends inside a string (truncated)".into()),
                Some(k) if b[j + k] == b'"' => break j + k,
                Some(k) => j += k + 2, // skip the escaped character
            }
            if j > b.len() {
                return Err("answer ends inside a string (truncated)".into());
            }
        };
        if end - start >= LONG {
            remainder.extend_from_slice(&b[copied..start - 1]);
            remainder.extend_from_slice(format!("\"\\u0000{}\"", spans.len()).as_bytes());
            spans.push((start, end));
            copied = end + 1;
        }
        i = end + 1;
    }
    remainder.extend_from_slice(&b[copied..]);
    Ok(Skimmed { remainder, spans, body: body.clone() })
}

impl Skimmed {
    /// The text of a string value taken from the remainder: for a placeholder, the long string's
    /// bytes as a slice of the body (still JSON-escaped, if it had escapes); otherwise the value.
    pub fn resolve(&self, value: &str) -> Raw {
        let index = value.strip_prefix(MARK).and_then(|n| n.parse::<usize>().ok());
        match index.and_then(|n| self.spans.get(n)) {
            Some(&(s, e)) => Raw::Span(self.body.slice(s..e)),
            None => Raw::Plain(value.to_string()),
        }
    }
}

pub enum Raw {
    /// Bytes of a long string, exactly as they appear between the quotes.
    Span(Bytes),
    /// A short string, already unescaped by serde_json.
    Plain(String),
}

/// A string value as text, JSON escapes undone (a long one is cut out of the body still
/// escaped, e.g. a URL's `\/`); `None` when it is longer than `max` bytes as sent, or not a
/// valid JSON string.
pub fn string_value(raw: Raw, max: usize) -> Option<String> {
    match raw {
        Raw::Plain(s) => (s.len() <= max).then_some(s),
        Raw::Span(span) if span.len() <= max => {
            let mut quoted = Vec::with_capacity(span.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&span);
            quoted.push(b'"');
            serde_json::from_slice(&quoted).ok()
        }
        Raw::Span(_) => None,
    }
}

/// Validated standard base64 from a string value: the body's own bytes when they are plain
/// base64 (no copy), else the unescaped text (a provider that escapes `/` as `\/`).
pub fn base64_value(raw: Raw) -> Option<Bytes> {
    let bytes = match raw {
        Raw::Span(span) if base64_simd::STANDARD.check(&span).is_ok() => return Some(span),
        Raw::Span(span) => {
            if !span.contains(&b'\\') {
                return None;
            }
            let mut quoted = Vec::with_capacity(span.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&span);
            quoted.push(b'"');
            Bytes::from(serde_json::from_slice::<String>(&quoted).ok()?.into_bytes())
        }
        Raw::Plain(s) => Bytes::from(s.into_bytes()),
    };
    (!bytes.is_empty() && base64_simd::STANDARD.check(&bytes).is_ok()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(c: u8) -> String {
        String::from_utf8(vec![c; 400]).unwrap()
    }

    #[test]
    fn long_strings_become_placeholders_and_resolve_to_body_slices() {
        let a = long(b'A');
        let text = format!(r#"{{"created": 1, "note": "x\"y", "data": [{{"b64_json": "{a}"}}], "k": "{a}"}}"#);
        let body = Bytes::from(text);
        let s = skim(&body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.remainder).unwrap();
        assert_eq!(v["note"], "x\"y");
        assert_eq!(v["created"], 1);
        let b64 = v["data"][0]["b64_json"].as_str().unwrap();
        match s.resolve(b64) {
            Raw::Span(span) => {
                assert_eq!(&span[..], a.as_bytes());
                // A slice of the same allocation: nothing was copied.
                let off = span.as_ptr() as usize - body.as_ptr() as usize;
                assert_eq!(&body[off..off + 400], a.as_bytes());
            }
            Raw::Plain(_) => panic!("expected a span"),
        }
        assert!(matches!(s.resolve("short"), Raw::Plain(p) if p == "short"));
    }

    #[test]
    fn escapes_inside_long_strings_are_skipped_correctly() {
        let tricky = format!("{}\\\\\\\"{}", long(b'a'), long(b'b')); // ...a\\\"b...
        let body = Bytes::from(format!(r#"{{"a": "{tricky}", "b": 2}}"#));
        let s = skim(&body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.remainder).unwrap();
        assert_eq!(v["b"], 2);
    }

    #[test]
    fn long_strings_read_as_text_with_their_escapes_undone() {
        let url = format!("https:\\/\\/bucket.example\\/img.png?X-Amz-Signature={}", "a".repeat(900));
        let body = Bytes::from(format!("{{\"url\":\"{url}\"}}"));
        let s = skim(&body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.remainder).unwrap();
        let text = string_value(s.resolve(v["url"].as_str().unwrap()), 8192).unwrap();
        assert!(text.starts_with("https://bucket.example/img.png?X-Amz-Signature=aaa"), "{text:.60}");
        assert_eq!(text.len(), "https://bucket.example/img.png?X-Amz-Signature=".len() + 900);
        assert_eq!(string_value(s.resolve(v["url"].as_str().unwrap()), 100), None);
        assert_eq!(string_value(Raw::Plain("short".into()), 100).as_deref(), Some("short"));
    }

    #[test]
    fn truncated_answers_fail() {
        let body = Bytes::from(format!(r#"{{"data": [{{"b64_json": "{}"#, long(b'A')));
        assert!(skim(&body).is_err());
        assert!(skim(&Bytes::from_static(br#"{"a": "\"#)).is_err());
    }

    #[test]
    fn base64_values_are_checked_once_and_unescaped_only_when_needed() {
        assert!(base64_value(Raw::Span(Bytes::from(long(b'A')))).is_some());
        let escaped = format!("{}\\/A==", "A".repeat(400));
        let out = base64_value(Raw::Span(Bytes::from(escaped))).unwrap();
        assert!(out.ends_with(b"/A=="));
        assert!(base64_value(Raw::Span(Bytes::from(format!("{}!", long(b'A'))))).is_none());
        assert!(base64_value(Raw::Plain(String::new())).is_none());
        assert!(base64_value(Raw::Plain("aGk=".into())).is_some());
    }
}
