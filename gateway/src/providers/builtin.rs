//! The built-in demo provider (`kind = "builtin"`). It is NOT an image model: it renders a
//! deterministic picture (a gradient with a few discs and bars) from the prompt, seed and image
//! index, at the requested size, so the gateway works with no provider keys and tests have a
//! provider that is always there. Same prompt + seed + index + size → same PNG bytes.

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{AttemptRequest, Generation, Image, Provider, ProviderError};
use crate::request::Param;
use crate::request::Size;

pub struct Builtin;

#[async_trait]
impl Provider for Builtin {
    /// The demo renderer takes a seed; other diffusion settings mean nothing to it.
    fn supports(&self, param: Param) -> bool {
        param == Param::Seed
    }

    fn supports_op(&self, _op: crate::request::Operation) -> bool {
        true
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let req = attempt.req;
        // Edits and variations are rendered from the prompt plus a digest of the input image, so
        // a different input gives a different (still deterministic) picture.
        let mut prompt = req.prompt.clone();
        if let Some(image) = req.images.first() {
            prompt.push_str(&hex::encode(&Sha256::digest(&image.bytes)[..8]));
        }
        let (seed, size, n) = (req.seed.unwrap_or(0), req.size, req.n);
        // Rendering is CPU work: keep it off the async workers.
        let images = tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|i| render_png(&prompt, seed, i, size).map(|bytes| Image::Raw { bytes, mime: "image/png" }))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ProviderError::Other(format!("renderer task failed: {e}")))?
        .map_err(|e| ProviderError::Other(format!("PNG encoding failed: {e}")))?;
        Ok(Generation { images, ..Default::default() })
    }
}

/// Renders one deterministic PNG.
pub fn render_png(prompt: &str, seed: u64, index: u32, size: Size) -> Result<Bytes, png::EncodingError> {
    let mut h = Sha256::new();
    h.update(prompt.as_bytes());
    h.update(seed.to_le_bytes());
    h.update(index.to_le_bytes());
    let d = h.finalize();
    let (w, ht) = (size.width as usize, size.height as usize);
    let top = [d[0], d[1], d[2]];
    let bottom = [d[3], d[4], d[5]];
    // Three discs and two bars, placed and coloured by the digest.
    let discs: Vec<(f32, f32, f32, [u8; 3])> = (0..3)
        .map(|k| {
            let b = &d[6 + k * 6..12 + k * 6];
            let cx = b[0] as f32 / 255.0 * w as f32;
            let cy = b[1] as f32 / 255.0 * ht as f32;
            let r = (0.08 + b[2] as f32 / 255.0 * 0.2) * w.min(ht) as f32;
            (cx, cy, r * r, [b[3], b[4], b[5]])
        })
        .collect();
    let bars: Vec<(usize, usize, [u8; 3])> = (0..2)
        .map(|k| {
            let b = &d[24 + k * 4..28 + k * 4];
            let y0 = b[0] as usize * ht / 256;
            (y0, (y0 + ht / 16).min(ht), [b[1], b[2], b[3]])
        })
        .collect();

    // A black-and-white checker band along the top marks the picture as a demo render and
    // keeps it far from uniform whatever colours the digest picked.
    let band = (ht / 16).max(1);
    let mut pixels = vec![0u8; w * ht * 3];
    for (y, row) in pixels.chunks_exact_mut(w * 3).enumerate() {
        if y < band {
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                px.fill(if (x / band) % 2 == 0 { 0 } else { 255 });
            }
            continue;
        }
        let t = y as f32 / ht.max(1) as f32;
        let base = [0, 1, 2].map(|c| (top[c] as f32 * (1.0 - t) + bottom[c] as f32 * t) as u8);
        let bar = bars.iter().find(|(y0, y1, _)| (*y0..*y1).contains(&y)).map(|b| b.2);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let mut c = bar.unwrap_or(base);
            for (cx, cy, r2, col) in &discs {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                if dx * dx + dy * dy <= *r2 {
                    c = *col;
                }
            }
            px.copy_from_slice(&c);
        }
    }

    let mut out = Vec::with_capacity(w * ht / 4);
    {
        let mut enc = png::Encoder::new(&mut out, size.width, size.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let s = Size { width: 320, height: 256 };
        let a = render_png("a fox", 7, 0, s).unwrap();
        assert_eq!(a, render_png("a fox", 7, 0, s).unwrap());
        assert_ne!(a, render_png("a fox", 8, 0, s).unwrap());
        assert_ne!(a, render_png("a fox", 7, 1, s).unwrap());
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(a[16..20].try_into().unwrap()), 320);
        assert_eq!(u32::from_be_bytes(a[20..24].try_into().unwrap()), 256);
    }
}
