//! Parsing provider answers that carry megabytes of base64 without walking the payload more
//! than needed.
//!
//! A 1024x1024 PNG is ~2 MB of base64 inside a JSON string. serde_json would check every byte
//! of it for escapes and UTF-8, then the gateway would check it again as base64. Instead,
//! strings are located with SIMD `memchr`; every long string is cut out of the document and
//! replaced by a short placeholder; serde_json parses the small remainder (so the structure is
//! still fully validated); and each payload is checked once, as base64. Valid standard base64
//! has no quote, backslash or control byte, so a string that passes that check needs no JSON
//! unescaping and is ASCII.
//!
//! Inside a long string the skim reads in blocks of up to [`BLOCK`] bytes that it checks as
//! base64 text: a block that passes holds no quote or backslash, so it is skipped whole, and the
//! string's end is looked for with `memchr` only in the block that does not pass (and in what
//! is too short for a block, which is then checked too). A string found in the base64 alphabet
//! up to its last four bytes is resolved as [`Raw::Base64`], whose check as base64 is then only
//! its length and last group: most bytes of an image are read once, not twice.

use crate::body::Rope;

/// Strings at least this long are cut out; shorter ones stay in the remainder as they are.
const LONG: usize = 256;
/// Past the first [`LONG`] bytes of a string, the skim reads blocks of at most this many bytes
/// checked as base64 text...
const BLOCK: usize = 64 * 1024;
/// ...where at least this many are left in the piece. Shorter strings and piece ends are read
/// with `memchr`, then checked: a failed block (the one holding the closing quote) costs a
/// third read of its bytes, too much for a small image.
const MIN_BLOCK: usize = 4 * 1024;
/// Placeholders are `"\u0000N"`: a NUL cannot appear unescaped in JSON, so only a placeholder
/// parses to a string that starts with one followed by our index.
const MARK: char = '\u{0}';

/// A JSON document with its long strings held aside as spans of the original body.
pub struct Skimmed {
    /// The document with every long string replaced by a placeholder.
    pub remainder: Vec<u8>,
    /// Byte ranges (inside the quotes) of the long strings, in order, and whether each is in
    /// the base64 alphabet (without padding) but for its last four bytes.
    spans: Vec<(usize, usize, bool)>,
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
    // The string's bytes from its start up to here are in the base64 alphabet, no padding.
    let mut alphabet = 0;
    // A backslash ended the previous piece: the escaped byte starts this one.
    let mut escaped = false;
    let mut base = 0; // offset of the current piece in the body
    for piece in body.pieces() {
        let p = &piece[..];
        let mut i = usize::from(escaped);
        escaped = false;
        while i < p.len() {
            let Some(start) = open else {
                match memchr::memchr(b'"', &p[i..]) {
                    None => break,
                    Some(off) => {
                        i += off + 1;
                        open = Some(base + i);
                        alphabet = base + i;
                    }
                }
                continue;
            };
            let at = base + i;
            let read = at - start;
            let contiguous = alphabet == at;
            // A long string read so far as base64: skip a block that checks as base64 text (it
            // holds no quote or backslash). Blocks are multiples of four bytes long, and one
            // ending in padding is not skipped (the padding must end the string).
            if contiguous && read >= LONG && p.len() - i >= MIN_BLOCK {
                let block = (p.len() - i).min(BLOCK) & !3;
                if base64_alphabet(&p[i..i + block]) {
                    i += block;
                    alphabet += block;
                    continue;
                }
            }
            // Look for the end of the string; in its first LONG bytes no further than those
            // when blocks could follow in this piece.
            let rest = p.len() - i;
            let window = if read < LONG && rest >= LONG + MIN_BLOCK { LONG - read } else { rest };
            match memchr::memchr2(b'"', b'\\', &p[i..i + window]) {
                None => {
                    if contiguous && base64_alphabet(&p[i..i + window]) {
                        alphabet += window;
                    }
                    i += window;
                }
                Some(k) if p[i + k] == b'"' => {
                    let end = at + k;
                    // The last four bytes are left to the check of the string's last group.
                    let body_part = k.saturating_sub(4);
                    if contiguous && base64_alphabet(&p[i..i + body_part]) {
                        alphabet += body_part;
                    }
                    if end - start >= LONG {
                        spans.push((start, end, alphabet + 4 >= end));
                    }
                    open = None;
                    i += k + 1;
                }
                Some(k) => {
                    // Skip the escaped byte, which may be the next piece's first. A string with
                    // an escape is not read as base64, even in its last group.
                    i += k + 2;
                    escaped = i > p.len();
                    alphabet = 0;
                }
            }
        }
        base += p.len();
    }
    if open.is_some() || escaped {
        return Err(TRUNCATED.into());
    }
    // The remainder: everything but the long strings, each replaced by its placeholder.
    let kept = body.len() - spans.iter().map(|(s, e, _)| e - s).sum::<usize>();
    let mut remainder = Vec::with_capacity(kept + 12 * spans.len());
    let mut copied = 0; // body[..copied] is accounted for in `remainder`
    for (n, &(start, end, _)) in spans.iter().enumerate() {
        extend(&mut remainder, body, copied..start - 1);
        remainder.extend_from_slice(b"\"\\u0000");
        remainder.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        remainder.push(b'"');
        copied = end + 1;
    }
    extend(&mut remainder, body, copied..body.len());
    Ok(Skimmed { remainder, spans, body: body.clone() })
}

/// Whether every byte of `text` is in the standard base64 alphabet (`A-Z a-z 0-9 + /`, no
/// padding): the multiple-of-four part checked as base64 text (padding may only end such a text,
/// so a last byte other than `=` means none), the rest byte by byte.
fn base64_alphabet(text: &[u8]) -> bool {
    let whole = text.len() & !3;
    (whole == 0 || (text[whole - 1] != b'=' && base64_simd::STANDARD.check(&text[..whole]).is_ok()))
        && text[whole..].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

/// Appends `body[range]` to `out`.
fn extend(out: &mut Vec<u8>, body: &Rope, range: std::ops::Range<usize>) {
    for piece in body.slice(range).pieces() {
        out.extend_from_slice(piece);
    }
}

impl Skimmed {
    /// How many long strings were cut out (placeholders `"\u0000N"`, N from 0).
    pub fn long_strings(&self) -> usize {
        self.spans.len()
    }

    /// The text of a string value taken from the remainder: for a placeholder, the long string's
    /// bytes as a slice of the body (still JSON-escaped, if it had escapes); otherwise the value.
    pub fn resolve(&self, value: &str) -> Raw {
        let index = value.strip_prefix(MARK).and_then(|n| n.parse::<usize>().ok());
        match index.and_then(|n| self.spans.get(n)) {
            Some(&(s, e, true)) => Raw::Base64(self.body.slice(s..e)),
            Some(&(s, e, false)) => Raw::Span(self.body.slice(s..e)),
            None => Raw::Plain(value.to_string()),
        }
    }

    /// A string value taken from the remainder as the provider sent it: a placeholder becomes
    /// the long string's text, JSON escapes undone. Every string an adapter keeps (a revised
    /// prompt, a reason, a passed-through field) goes through this or [`Self::restore`]; only
    /// image payloads are read as [`Raw`]. Errors: the long string is not valid JSON text
    /// (a bad escape, invalid UTF-8), which serde_json would have refused in place.
    pub fn text(&self, value: String) -> Result<String, String> {
        if !value.starts_with(MARK) {
            return Ok(value);
        }
        match self.resolve(&value) {
            Raw::Plain(_) => Ok(value),
            Raw::Span(span) | Raw::Base64(span) => serde_json::from_slice(&quoted(&span))
                .map_err(|e| format!("a string of {} bytes is not valid JSON text: {e}", span.len())),
        }
    }

    /// [`Self::text`] for every string value in `value`. Object keys stay as they are: a key of
    /// [`LONG`] bytes or more is a placeholder too, and no answer shape the adapters read has
    /// one.
    pub fn restore(&self, value: &mut serde_json::Value) -> Result<(), String> {
        use serde_json::Value;
        match value {
            Value::String(s) if s.starts_with(MARK) => {
                *s = self.text(std::mem::take(s))?;
                Ok(())
            }
            Value::Array(items) => items.iter_mut().try_for_each(|v| self.restore(v)),
            Value::Object(map) => map.values_mut().try_for_each(|v| self.restore(v)),
            _ => Ok(()),
        }
    }
}

pub enum Raw {
    /// Bytes of a long string, exactly as they appear between the quotes, as slices of the
    /// body's pieces.
    Span(Rope),
    /// A long string as [`Raw::Span`] whose bytes, but for its last four, the skim found all in
    /// the standard base64 alphabet (no padding, no escapes): it is valid base64 when its length
    /// is a multiple of four and its last group is valid.
    Base64(Rope),
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
        Raw::Span(span) | Raw::Base64(span) if span.len() <= max => serde_json::from_slice(&quoted(&span)).ok(),
        Raw::Span(_) | Raw::Base64(_) => None,
    }
}

/// An image URL from a string value: a remote one of at most `max` bytes, a `data:` URL
/// (RFC 2397; the scheme in any case) of any length, since it carries the image itself (the
/// answer's own size bound holds it). `None` when a remote URL is longer.
pub fn url_value(raw: Raw, max: usize) -> Option<String> {
    let data = match &raw {
        Raw::Plain(s) => s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")),
        Raw::Span(span) | Raw::Base64(span) => {
            span.len() >= 5 && span.slice(0..5).to_bytes().eq_ignore_ascii_case(b"data:")
        }
    };
    string_value(raw, if data { usize::MAX } else { max })
}

/// Validated standard base64 from a string value: the body's own pieces when they are plain
/// base64 (no copy), else the unescaped text (a provider that escapes `/` as `\/`).
pub fn base64_value(raw: Raw) -> Option<Rope> {
    let text = match raw {
        Raw::Base64(span) => {
            let last = span.len().checked_sub(4).map(|from| span.slice(from..span.len()).to_bytes());
            let valid = span.len() % 4 == 0 && last.is_some_and(|g| base64_simd::STANDARD.check(&g).is_ok());
            return valid.then_some(span);
        }
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
            // All in the base64 alphabet: read once, as base64.
            Raw::Base64(span) => {
                assert!(span == *a.as_bytes());
                // A slice of the same allocation: nothing was copied.
                let off = span.pieces()[0].as_ptr() as usize - body.as_ptr() as usize;
                assert_eq!(&body[off..off + 400], a.as_bytes());
            }
            _ => panic!("expected a base64 span"),
        }
        assert!(matches!(s.resolve(v["k"].as_str().unwrap()), Raw::Base64(_)));
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

    /// A long string is resolved as base64 read once only when that is what it is, and then
    /// judged exactly as a full check of it would be, wherever the answer was cut: padding,
    /// bytes outside the alphabet and escapes at the start, about the first LONG bytes, about a
    /// block's least size, in the middle and in the last group.
    #[test]
    fn strings_read_as_base64_are_judged_as_a_full_check_would() {
        let valid =
            |n: usize| base64_simd::STANDARD.encode_to_string((0..n).map(|i| (i * 37 % 251) as u8).collect::<Vec<_>>());
        let base = valid(7200); // 9600 bytes, no padding: blocks are read in a piece this long
        let len = base.len();
        let places = [
            0,
            1,
            100,
            255,
            256,
            257,
            LONG + MIN_BLOCK - 1,
            LONG + MIN_BLOCK,
            5001,
            len - 8,
            len - 5,
            len - 4,
            len - 3,
            len - 1,
        ];
        let mut texts: Vec<String> = vec![base.clone(), valid(7201), valid(7202), valid(192), valid(195), valid(3500)];
        for at in places {
            for bad in ["!", "=", "\\/", "\\\\"] {
                let mut t = base.clone();
                t.replace_range(at..at + 1, bad);
                texts.push(t);
            }
        }
        texts.push(format!("{}=", &base[..len - 1])); // padding with a length that is not a multiple of 4
        texts.push(format!("{base}A"));
        texts.push(format!("{}QQ==", &base[..len - 4])); // valid, padded
        texts.push(format!("{}QR==", &base[..len - 4])); // padding after non-zero bits
        texts.push(format!("{}Q===", &base[..len - 4]));
        for text in &texts {
            // What a full check of the string says (escapes undone first, as base64_value does).
            let want = base64_value(Raw::Span(rope(text.clone()))).map(|r| r.to_bytes());
            let body = format!(r#"{{"data":[{{"b64_json":"{text}"}}]}}"#);
            let whole = skim(&rope(body.clone())).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&whole.remainder).unwrap();
            let key = v["data"][0]["b64_json"].as_str().unwrap().to_string();
            // Read once as base64: no escape anywhere, and nothing outside the alphabet before
            // the last group (which the check of the last group judges).
            let plain = !text.contains('\\')
                && text[..text.len() - 4].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/');
            assert_eq!(matches!(whole.resolve(&key), Raw::Base64(_)), plain, "{:?}", &text[text.len() - 8..]);
            // Cuts near every place above (in the body: the string starts at byte 22), and
            // every 53rd byte; pairs on a coarser grid.
            let n = body.len();
            let mut single: Vec<usize> = places.iter().flat_map(|&p| (p + 22).saturating_sub(6)..p + 22 + 6).collect();
            single.extend((1..n).step_by(53));
            single.extend(n - 12..n);
            let mut cuts: Vec<Vec<usize>> = single.into_iter().filter(|&c| c > 0 && c < n).map(|c| vec![c]).collect();
            cuts.extend((1..n).step_by(601).flat_map(|i| (i + 1..n).step_by(577).map(move |j| vec![i, j])));
            for c in cuts {
                let s = skim(&pieces(body.as_bytes(), &c)).unwrap();
                assert_eq!(s.remainder, whole.remainder, "cut at {c:?}");
                let got = base64_value(s.resolve(&key)).map(|r| r.to_bytes());
                assert_eq!(got, want, "cut at {c:?}, text ending {:?}", &text[text.len() - 8..]);
            }
        }
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
