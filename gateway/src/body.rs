//! Bodies made of `Bytes` chunks: a provider's answer is kept as the pieces it arrived in
//! ([`Rope`]), and an image payload inside it is written to the client as those same pieces
//! ([`ChunkedBody`]), never copied into one buffer on the way.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

#[derive(Debug, Default)]
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl ChunkedBody {
    pub fn push(&mut self, chunk: impl Into<Bytes>) {
        let chunk = chunk.into();
        if !chunk.is_empty() {
            self.remaining += chunk.len() as u64;
            self.chunks.push_back(chunk);
        }
    }
}

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.pop_front().map(|c| {
            this.remaining -= c.len() as u64;
            Ok(Frame::data(c))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Bytes held as the pieces they arrived in (an upstream answer's frames, or a slice of them),
/// so that a 2 MB image payload is not copied to be read or forwarded. Cloning shares the
/// pieces. No piece is empty.
#[derive(Clone, Debug, Default)]
pub struct Rope(Pieces);

#[derive(Clone, Debug)]
enum Pieces {
    One(Bytes),
    Many(Arc<[Bytes]>),
}

impl Default for Pieces {
    fn default() -> Self {
        Pieces::One(Bytes::new())
    }
}

impl From<Bytes> for Rope {
    fn from(b: Bytes) -> Self {
        Rope(Pieces::One(b))
    }
}

impl From<&Bytes> for Rope {
    fn from(b: &Bytes) -> Self {
        Rope(Pieces::One(b.clone()))
    }
}

impl From<&Rope> for Rope {
    fn from(r: &Rope) -> Self {
        r.clone()
    }
}

impl From<Vec<u8>> for Rope {
    fn from(v: Vec<u8>) -> Self {
        Rope(Pieces::One(Bytes::from(v)))
    }
}

impl From<Vec<Bytes>> for Rope {
    fn from(mut pieces: Vec<Bytes>) -> Self {
        pieces.retain(|p| !p.is_empty());
        match pieces.len() {
            0 => Rope::default(),
            1 => Rope(Pieces::One(pieces.pop().unwrap_or_default())),
            _ => Rope(Pieces::Many(pieces.into())),
        }
    }
}

impl Rope {
    /// A rope of one static piece.
    pub const fn from_static(b: &'static [u8]) -> Self {
        Rope(Pieces::One(Bytes::from_static(b)))
    }

    /// The pieces, in order (one empty piece for an empty rope).
    pub fn pieces(&self) -> &[Bytes] {
        match &self.0 {
            Pieces::One(b) => std::slice::from_ref(b),
            Pieces::Many(p) => p,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Pieces::One(b) => b.len(),
            Pieces::Many(p) => p.iter().map(Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer: the piece itself when there is one (no copy), else a copy of
    /// all of them.
    pub fn to_bytes(&self) -> Bytes {
        match &self.0 {
            Pieces::One(b) => b.clone(),
            Pieces::Many(p) => {
                let mut all = Vec::with_capacity(self.len());
                for piece in p.iter() {
                    all.extend_from_slice(piece);
                }
                Bytes::from(all)
            }
        }
    }

    /// The bytes in `range` (byte offsets, end exclusive), as slices of the same pieces.
    /// Panics when the range is out of bounds, like slicing `Bytes`.
    pub fn slice(&self, range: Range<usize>) -> Rope {
        if let Pieces::One(b) = &self.0 {
            return Rope(Pieces::One(b.slice(range)));
        }
        assert!(range.start <= range.end && range.end <= self.len(), "Rope::slice out of bounds");
        let mut out = Vec::new();
        let mut at = 0;
        for piece in self.pieces() {
            let (from, to) = (at, at + piece.len());
            at = to;
            if to <= range.start {
                continue;
            }
            if from >= range.end {
                break;
            }
            out.push(piece.slice(range.start.max(from) - from..range.end.min(to) - from));
        }
        Rope::from(out)
    }

    /// Whether the bytes are standard base64 with padding (RFC 4648 section 4), checked piece by
    /// piece: a group of four split between two pieces is put together on the side.
    pub fn is_base64(&self) -> bool {
        let b64 = base64_simd::STANDARD;
        if let [one] = self.pieces() {
            return !one.is_empty() && b64.check(one).is_ok();
        }
        self.base64_steps(|step, _| b64.check(step).is_ok())
    }

    /// The bytes the base64 text decodes to; `None` when it is not valid standard base64. One
    /// piece is decoded where it lies; several are decoded piece by piece into one buffer.
    pub fn decode_base64(&self) -> Option<Vec<u8>> {
        match &self.0 {
            Pieces::One(b) => base64_simd::STANDARD.decode_to_vec(b).ok(),
            Pieces::Many(_) => {
                let mut all = Vec::with_capacity(self.len() / 4 * 3);
                self.decode_base64_with(|part| all.extend_from_slice(part))?;
                Some(all)
            }
        }
    }

    /// The first 12 bytes the base64 text decodes to (fewer when it is shorter), without
    /// decoding the rest or allocating; `None` when those groups are not valid base64. For a
    /// look at an image's magic number.
    pub fn base64_head(&self) -> Option<([u8; 12], usize)> {
        use base64_simd::AsOut;
        let mut text = [0u8; 16];
        let mut len = 0;
        for piece in self.pieces() {
            let take = (text.len() - len).min(piece.len());
            text[len..len + take].copy_from_slice(&piece[..take]);
            len += take;
            if len == text.len() {
                break;
            }
        }
        let mut out = [0u8; 12];
        let n = base64_simd::STANDARD.decode(&text[..len / 4 * 4], out.as_mut_slice().as_out()).ok()?.len();
        Some((out, n))
    }

    /// Decodes the base64 text in order, handing `f` the decoded bytes [`DECODE_STEP`] of text
    /// at a time, so nothing the size of the image is allocated (a digest is computed as the
    /// image is decoded). Returns the decoded length, or `None` when the text is not valid
    /// standard base64 with padding (RFC 4648 section 4); `f` may then have seen a prefix.
    pub fn decode_base64_with(&self, mut f: impl FnMut(&[u8])) -> Option<usize> {
        use base64_simd::AsOut;
        // No larger than the text needs: a small image's digest does not zero a whole step.
        let mut out = vec![0u8; self.len().min(DECODE_STEP) / 4 * 3];
        let mut decoded = 0;
        let whole = self.base64_steps(|step, out_len| match base64_simd::STANDARD.decode(step, out.as_out()) {
            Ok(bytes) => {
                debug_assert!(bytes.len() <= out_len);
                f(bytes);
                decoded += bytes.len();
                true
            }
            Err(_) => false,
        });
        whole.then_some(decoded)
    }

    /// Walks the text as runs of whole base64 groups of at most [`DECODE_STEP`] bytes, in
    /// order (a group split between two pieces is put together on the side), calling `step`
    /// with each run and the most it decodes to; stops at the first `false`. Whether every
    /// step was accepted, the length is a non-zero multiple of four, and only the last run
    /// ends in padding (`=` is allowed only at the very end of the text).
    fn base64_steps(&self, mut step: impl FnMut(&[u8], usize) -> bool) -> bool {
        let total = self.len();
        if total == 0 || !total.is_multiple_of(4) {
            return false;
        }
        let mut done = 0;
        let mut run = |text: &[u8], done: &mut usize| {
            *done += text.len();
            (*done == total || text.last() != Some(&b'=')) && step(text, text.len() / 4 * 3)
        };
        let mut group = [0u8; 4];
        let mut held = 0; // bytes of a group split between two pieces, in `group`
        for piece in self.pieces() {
            let mut p = &piece[..];
            if held > 0 {
                let take = (4 - held).min(p.len());
                group[held..held + take].copy_from_slice(&p[..take]);
                held += take;
                p = &p[take..];
                if held < 4 {
                    continue;
                }
                if !run(&group, &mut done) {
                    return false;
                }
            }
            let (body, rest) = p.split_at(p.len() / 4 * 4);
            for text in body.chunks(DECODE_STEP) {
                if !run(text, &mut done) {
                    return false;
                }
            }
            group[..rest.len()].copy_from_slice(rest);
            held = rest.len();
        }
        held == 0
    }
}

/// Base64 text decoded per step by [`Rope::decode_base64_with`] (a multiple of 4): 48 KiB, so
/// the decoded 36 KiB stay in the CPU's cache for whatever reads them.
pub const DECODE_STEP: usize = 48 * 1024;

impl PartialEq<[u8]> for Rope {
    fn eq(&self, other: &[u8]) -> bool {
        if self.len() != other.len() {
            return false;
        }
        let mut at = 0;
        self.pieces().iter().all(|p| {
            let same = other[at..at + p.len()] == p[..];
            at += p.len();
            same
        })
    }
}

/// Equal when the bytes are, however they are cut.
impl PartialEq for Rope {
    fn eq(&self, other: &Rope) -> bool {
        self.len() == other.len() && *self == other.to_bytes()[..]
    }
}

impl Eq for Rope {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way to cut `text` into two and three pieces.
    fn cuts(text: &[u8]) -> Vec<Rope> {
        let b = Bytes::copy_from_slice(text);
        let mut out = vec![Rope::from(b.clone())];
        for i in 0..=text.len() {
            out.push(Rope::from(vec![b.slice(..i), b.slice(i..)]));
            for j in i..=text.len() {
                out.push(Rope::from(vec![b.slice(..i), b.slice(i..j), b.slice(j..)]));
            }
        }
        out
    }

    #[test]
    fn base64_is_judged_the_same_however_the_text_is_cut() {
        for (text, valid) in [
            (&b"aGVsbG8gd29ybGQ="[..], true),
            (b"aGVsbG8gd29ybGQh", true),
            (b"aGVsbG8gd29ybA==", true),
            (b"aGk=aGk=", false),        // padding before the end
            (b"aGVsbG8gd29ybGQ", false), // not a multiple of four
            (b"aGVsbG8g!29ybGQh", false),
            (b"aGVsbG8gd29y\\GQh", false),
            (b"", false),
        ] {
            for rope in cuts(text) {
                let pieces: Vec<usize> = rope.pieces().iter().map(Bytes::len).collect();
                assert_eq!(rope.is_base64(), valid, "{:?} cut as {pieces:?}", String::from_utf8_lossy(text));
                if valid {
                    assert_eq!(rope.decode_base64().unwrap(), base64_simd::STANDARD.decode_to_vec(text).unwrap());
                }
            }
        }
    }

    #[test]
    fn long_base64_decodes_in_steps_whatever_its_pieces() {
        // Three decode steps and a bit, cut at places that split groups and steps.
        let image: Vec<u8> = (0..120_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let text = Bytes::from(base64_simd::STANDARD.encode_type::<Vec<u8>>(&image));
        let n = text.len();
        for cuts in [vec![], vec![1], vec![DECODE_STEP - 1], vec![3, DECODE_STEP + 2, n - 1], vec![n / 2, n / 2 + 1]] {
            let mut at = 0;
            let mut pieces = Vec::new();
            for c in cuts.iter().copied().chain([n]) {
                pieces.push(text.slice(at..c));
                at = c;
            }
            let rope = Rope::from(pieces);
            let mut seen = Vec::new();
            assert_eq!(rope.decode_base64_with(|part| seen.extend_from_slice(part)), Some(image.len()), "{cuts:?}");
            assert!(seen == image, "{cuts:?}");
            assert!(rope.decode_base64().unwrap() == image, "{cuts:?}");
            assert!(rope.is_base64());
        }
        // Padding inside the text (two images' base64 run together) is refused, however cut.
        let joined = [&text[..], b"aGk=", &text[..]].concat();
        let b = Bytes::from(joined);
        for cut in [4, b.len() / 2, text.len() + 2] {
            let rope = Rope::from(vec![b.slice(..cut), b.slice(cut..)]);
            assert_eq!(rope.decode_base64_with(|_| {}), None, "cut at {cut}");
            assert!(!rope.is_base64(), "cut at {cut}");
        }
    }

    #[test]
    fn slices_cross_pieces_without_copying() {
        let b = Bytes::from_static(b"0123456789");
        let rope = Rope::from(vec![b.slice(..3), b.slice(3..7), b.slice(7..)]);
        assert_eq!(rope.len(), 10);
        for (from, to) in [(0, 10), (2, 8), (3, 7), (4, 5), (5, 5), (0, 3), (7, 10)] {
            let s = rope.slice(from..to);
            assert!(s == b[from..to], "{from}..{to}");
            assert!(s.pieces().iter().all(|p| !p.is_empty() || s.is_empty()));
        }
        // The middle slice is the middle piece itself (same memory).
        assert_eq!(rope.slice(3..7).pieces()[0].as_ptr(), b[3..].as_ptr());
        assert_eq!(&rope.to_bytes()[..], &b[..]);
        assert_eq!(Rope::from(vec![Bytes::new(), b.clone(), Bytes::new()]).pieces().len(), 1);
    }
}
