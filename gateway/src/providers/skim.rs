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

use crate::body::Rope;

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
    body: Rope,
}

/// Locates every string of `body` and cuts out the long ones. The body is read in the pieces
/// it arrived in: a string, an escape or a placeholder's surroundings may straddle two of them.
/// Fails on an unterminated string.
pub fn skim(body: &Rope) -> Result<Skimmed, String> {
    const TRUNCATED: &str = "answer ends inside a string (truncated)";
    let mut spans = Vec::new();
    // Where the string being read opened (the byte after its quote), if one is open.
    let mut open: Option<usize> = None;
    // A backslash ended the previous piece: the escaped byte starts this one.
    let mut escaped = false;
    let mut base = 0; // offset of the current piece in the body
    for piece in body.pieces() {
        let p = &piece[..];
        let mut i = usize::from(escaped);
        escaped = false;
        while i < p.len() {
            match open {
                None => match memchr::memchr(b'"', &p[i..]) {
                    None => break,
                    Some(off) => {
                        i += off + 1;
                        open = Some(base + i);
                    }
                },
                Some(start) => match memchr::memchr2(b'"', b'\\', &p[i..]) {
                    None => break,
                    Some(k) if p[i + k] == b'"' => {
                        let end = base + i + k;
                        if end - start >= LONG {
                            spans.push((start, end));
                        }
                        open = None;
                        i += k + 1;
                    }
                    Some(k) => {
                        // Skip the escaped byte, which may be the next piece's first.
                        i += k + 2;
                        escaped = i > p.len();
                    }
                },
            }
        }
        base += p.len();
    }
    if open.is_some() || escaped {
        return Err(TRUNCATED.into());
    }
    // The remainder: everything but the long strings, each replaced by its placeholder.
    let kept = body.len() - spans.iter().map(|(s, e)| e - s).sum::<usize>();
    let mut remainder = Vec::with_capacity(kept + 12 * spans.len());
    let mut copied = 0; // body[..copied] is accounted for in `remainder`
    for (n, &(start, end)) in spans.iter().enumerate() {
        extend(&mut remainder, body, copied..start - 1);
        remainder.extend_from_slice(b"\"\\u0000");
        remainder.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        remainder.push(b'"');
        copied = end + 1;
    }
    extend(&mut remainder, body, copied..body.len());
    Ok(Skimmed { remainder, spans, body: body.clone() })
}

/// Appends `body[range]` to `out`.
fn extend(out: &mut Vec<u8>, body: &Rope, range: std::ops::Range<usize>) {
    for piece in body.slice(range).pieces() {
        out.extend_from_slice(piece);
    }
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
    /// Bytes of a long string, exactly as they appear between the quotes, as slices of the
    /// body's pieces.
    Span(Rope),
    /// A short string, already unescaped by serde_json.
    Plain(String),
}

/// A long string's bytes as JSON text (quoted), for serde_json to undo its escapes.
fn quoted(span: &Rope) -> Vec<u8> {
    let mut quoted = Vec::with_capacity(span.len() + 2);
    quoted.push(b'"');
    for piece in span.pieces() {
        quoted.extend_from_slice(piece);
    }
    quoted.push(b'"');
    quoted
}

/// A string value as text, JSON escapes undone (a long one is cut out of the body still
/// escaped, e.g. a URL's `\/`); `None` when it is longer than `max` bytes as sent, or not a
/// valid JSON string.
pub fn string_value(raw: Raw, max: usize) -> Option<String> {
    match raw {
        Raw::Plain(s) => (s.len() <= max).then_some(s),
        Raw::Span(span) if span.len() <= max => serde_json::from_slice(&quoted(&span)).ok(),
        Raw::Span(_) => None,
    }
}

/// Validated standard base64 from a string value: the body's own pieces when they are plain
/// base64 (no copy), else the unescaped text (a provider that escapes `/` as `\/`).
pub fn base64_value(raw: Raw) -> Option<Rope> {
    let text = match raw {
        Raw::Span(span) if span.is_base64() => return Some(span),
        Raw::Span(span) => {
            if !span.pieces().iter().any(|p| memchr::memchr(b'\\', p).is_some()) {
                return None;
            }
            Rope::from(serde_json::from_slice::<String>(&quoted(&span)).ok()?.into_bytes())
        }
        Raw::Plain(s) => Rope::from(s.into_bytes()),
    };
    text.is_base64().then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rope(text: impl Into<Vec<u8>>) -> Rope {
        Rope::from(text.into())
    }

    fn long(c: u8) -> String {
        String::from_utf8(vec![c; 400]).unwrap()
    }

    #[test]
    fn long_strings_become_placeholders_and_resolve_to_body_slices() {
        let a = long(b'A');
        let text = format!(r#"{{"created": 1, "note": "x\"y", "data": [{{"b64_json": "{a}"}}], "k": "{a}"}}"#);
        let body = Bytes::from(text);
        let s = skim(&Rope::from(body.clone())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.remainder).unwrap();
        assert_eq!(v["note"], "x\"y");
        assert_eq!(v["created"], 1);
        let b64 = v["data"][0]["b64_json"].as_str().unwrap();
        match s.resolve(b64) {
            Raw::Span(span) => {
                assert!(span == *a.as_bytes());
                // A slice of the same allocation: nothing was copied.
                let off = span.pieces()[0].as_ptr() as usize - body.as_ptr() as usize;
                assert_eq!(&body[off..off + 400], a.as_bytes());
            }
            Raw::Plain(_) => panic!("expected a span"),
        }
        assert!(matches!(s.resolve("short"), Raw::Plain(p) if p == "short"));
    }

    #[test]
    fn escapes_inside_long_strings_are_skipped_correctly() {
        let tricky = format!("{}\\\\\\\"{}", long(b'a'), long(b'b')); // ...a\\\"b...
        let body = rope(format!(r#"{{"a": "{tricky}", "b": 2}}"#));
        let s = skim(&body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.remainder).unwrap();
        assert_eq!(v["b"], 2);
    }

    #[test]
    fn long_strings_read_as_text_with_their_escapes_undone() {
        let url = format!("https:\\/\\/bucket.example\\/img.png?X-Amz-Signature={}", "a".repeat(900));
        let body = rope(format!("{{\"url\":\"{url}\"}}"));
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
        let body = rope(format!(r#"{{"data": [{{"b64_json": "{}"#, long(b'A')));
        assert!(skim(&body).is_err());
        assert!(skim(&Rope::from_static(br#"{"a": "\"#)).is_err());
    }

    #[test]
    fn base64_values_are_checked_once_and_unescaped_only_when_needed() {
        assert!(base64_value(Raw::Span(rope(long(b'A')))).is_some());
        let escaped = format!("{}\\/A==", "A".repeat(400));
        let out = base64_value(Raw::Span(rope(escaped))).unwrap();
        assert!(out.to_bytes().ends_with(b"/A=="));
        assert!(base64_value(Raw::Span(rope(format!("{}!", long(b'A'))))).is_none());
        assert!(base64_value(Raw::Plain(String::new())).is_none());
        assert!(base64_value(Raw::Plain("aGk=".into())).is_some());
    }

    /// The body cut at `cuts` (byte offsets, increasing).
    fn pieces(text: &[u8], cuts: &[usize]) -> Rope {
        let b = Bytes::copy_from_slice(text);
        let mut at = 0;
        let mut out = Vec::new();
        for &c in cuts.iter().chain([text.len()].iter()) {
            out.push(b.slice(at..c));
            at = c;
        }
        Rope::from(out)
    }

    #[test]
    fn an_answer_reads_the_same_whatever_pieces_it_arrived_in() {
        // Escapes, quotes and long strings at every place a cut can fall: a backslash ending
        // a piece, a quote starting one, a long string spread over three.
        let b64 = format!("{}QQ==", "QUJD".repeat(100));
        let url = format!("https:\\/\\/x.example\\/{}.png", "a".repeat(300));
        let text = format!(
            r#"{{"created":1,"note":"x\"y\\","data":[{{"b64_json":"{b64}","revised_prompt":"a \"fox\""}},{{"url":"{url}"}}],"k":"{}"}}"#,
            "z".repeat(260)
        );
        let whole = skim(&rope(text.clone())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&whole.remainder).unwrap();
        let (b, u) = (v["data"][0]["b64_json"].as_str().unwrap(), v["data"][1]["url"].as_str().unwrap());
        let image = base64_value(whole.resolve(b)).unwrap();
        assert!(image == *b64.as_bytes());
        let link = string_value(whole.resolve(u), 4096).unwrap();
        assert_eq!(link, format!("https://x.example/{}.png", "a".repeat(300)));
        assert_eq!(v["note"], "x\"y\\");
        let n = text.len();
        let mut cuts: Vec<Vec<usize>> = (1..n).map(|i| vec![i]).collect();
        for i in (1..n).step_by(7) {
            for j in (i + 1..n).step_by(11) {
                cuts.push(vec![i, j]);
            }
        }
        for c in cuts {
            let s = skim(&pieces(text.as_bytes(), &c)).unwrap();
            assert_eq!(s.remainder, whole.remainder, "cut at {c:?}");
            let got = base64_value(s.resolve(b)).unwrap();
            assert!(got == *b64.as_bytes(), "cut at {c:?}");
            assert_eq!(string_value(s.resolve(u), 4096).as_deref(), Some(link.as_str()), "cut at {c:?}");
        }
        // Truncated anywhere inside a string, or right after a backslash: an error, however cut.
        let cut_short = &text.as_bytes()[..text.find("QQ==").unwrap()];
        for i in 1..cut_short.len() {
            assert!(skim(&pieces(cut_short, &[i])).is_err(), "cut at {i}");
        }
        let dangling = br#"{"a": "xy\"#;
        for i in 1..dangling.len() {
            assert!(skim(&pieces(dangling, &[i])).is_err(), "cut at {i}");
        }
    }
}
