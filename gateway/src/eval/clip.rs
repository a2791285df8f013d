//! CLIP prompt-image similarity: the cosine between a CLIP image embedding and a CLIP text
//! embedding, for the `adherence` evaluator where a CLIP model is configured.
//!
//! No CLIP weights ship in any package registry, so the model files come from configuration
//! (users download an ONNX export); the tokenizer is the OpenAI CLIP BPE vocabulary bundled
//! with the `instant-clip-tokenizer` crate. The tests run on tiny stand-in models with the same
//! contract, written by `scripts/tiny-models.sh`.
//!
//! # Expected model layout
//!
//! Two ONNX files, a vision encoder and a text encoder, each giving the *projected* embedding
//! (the vector the two encoders share), as in the separate-encoder exports of e.g.
//! `openai/clip-vit-base-patch32` (`CLIPVisionModelWithProjection` /
//! `CLIPTextModelWithProjection`, as written by Optimum or transformers.js, often named
//! `vision_model.onnx` and `text_model.onnx`):
//!
//! - image model: first input float32 `[1, 3, S, S]` (`pixel_values`), RGB scaled to 0..1 then
//!   normalised with CLIP's mean and std ([`MEAN`], [`STD`]); `S` is [`ClipConfig::input_size`]
//!   (224 for ViT-B/32). The image is resized (bicubic) so its shorter side is `S`, then
//!   centre-cropped to `S x S`, as CLIP's own preprocessing does; an image already `S x S` is
//!   used as is.
//! - text model: first input int64 (or int32) `[1, 77]` (`input_ids`): start token 49406, the
//!   BPE tokens (truncated to fit), end token 49407, then zero padding. If the model also has an
//!   input named `attention_mask`, it gets 1 up to and including the end token, then 0.
//! - output: the one named `image_embeds` / `text_embeds` when there is one (exports with
//!   projection also output `last_hidden_state`), else the first output; it must be `[1, D]` or
//!   `[D]`, with the same `D` for both models. A model that only outputs hidden states (no
//!   projection) is refused with an error saying so.
//!
//! Input and output names are read from the session, so other names work as long as the
//! order above holds. Sessions are per thread ([`onnx::with_session`]); everything here is
//! CPU-bound and belongs on the evaluation pool. Nothing panics on a missing or wrong model:
//! the error names the file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::imageops::FilterType;
use image::RgbImage;
use instant_clip_tokenizer::{Token, Tokenizer};
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef};

use super::onnx;

/// CLIP's per-channel normalisation (RGB, after scaling to 0..1).
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Token sequence length of CLIP's text encoder.
pub const CONTEXT_LENGTH: usize = 77;
/// Input side of ViT-B/32 and ViT-B/16.
pub const DEFAULT_INPUT_SIZE: u32 = 224;

/// Where the two encoders are and the image side the vision encoder takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipConfig {
    pub image_model: PathBuf,
    pub text_model: PathBuf,
    pub input_size: u32,
}

impl ClipConfig {
    /// A configuration with [`DEFAULT_INPUT_SIZE`].
    pub fn new(image_model: impl Into<PathBuf>, text_model: impl Into<PathBuf>) -> ClipConfig {
        ClipConfig { image_model: image_model.into(), text_model: text_model.into(), input_size: DEFAULT_INPUT_SIZE }
    }

    /// `Ok` when ONNX Runtime loads and both model files exist (it does not run them).
    pub fn ready(&self) -> Result<(), String> {
        onnx::runtime()?;
        for (what, p) in [("image", &self.image_model), ("text", &self.text_model)] {
            if !p.is_file() {
                return Err(format!("clip: {what} model not found: {} does not exist", p.display()));
            }
        }
        Ok(())
    }
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::new)
}

/// The prompt as CLIP's text encoder takes it: [`CONTEXT_LENGTH`] ids, start token, BPE tokens
/// (lowercased; truncated so the end token fits), end token, zero padding.
pub fn tokenize(prompt: &str) -> Vec<i64> {
    let t = tokenizer();
    let mut tokens: Vec<Token> = vec![t.start_of_text()];
    t.encode(prompt, &mut tokens);
    tokens.truncate(CONTEXT_LENGTH - 1);
    tokens.push(t.end_of_text());
    let mut ids: Vec<i64> = tokens.into_iter().map(|tok| i64::from(tok.to_u16())).collect();
    ids.resize(CONTEXT_LENGTH, 0);
    ids
}

/// The vision encoder's input for `img`: NCHW float32 `[1, 3, side, side]`, flattened.
pub fn preprocess(img: &RgbImage, side: u32) -> Result<Vec<f32>, String> {
    if img.width() == 0 || img.height() == 0 {
        return Err("clip: empty image (0 pixels)".to_string());
    }
    if side == 0 {
        return Err("clip: input_size is 0".to_string());
    }
    let owned;
    let square: &RgbImage = if img.width() == side && img.height() == side {
        img
    } else {
        // Shorter side to `side`, then the centre square.
        let (w, h) = (img.width() as u64, img.height() as u64);
        let s = side as u64;
        let (nw, nh) = if w <= h { (s, (h * s).div_ceil(w).max(s)) } else { ((w * s).div_ceil(h).max(s), s) };
        let resized = image::imageops::resize(img, nw as u32, nh as u32, FilterType::CatmullRom);
        let x = ((nw - s) / 2) as u32;
        let y = ((nh - s) / 2) as u32;
        owned = image::imageops::crop_imm(&resized, x, y, side, side).to_image();
        &owned
    };
    let plane = (side as usize) * (side as usize);
    let mut input = vec![0f32; 3 * plane];
    for (i, p) in square.pixels().enumerate() {
        for c in 0..3 {
            input[c * plane + i] = (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Ok(input)
}

/// The index of the output named `preferred`, else 0.
fn output_index(session: &Session, preferred: &str) -> usize {
    session.outputs().iter().position(|o| o.name() == preferred).unwrap_or(0)
}

/// Runs `session` on `inputs` and returns output `index` as a flat embedding, checking it is
/// `[1, D]` or `[D]`.
fn embedding(
    session: &mut Session,
    inputs: Vec<(String, SessionInputValue<'_>)>,
    index: usize,
    what: &str,
    model: &Path,
) -> Result<Vec<f32>, String> {
    let outputs =
        session.run(inputs).map_err(|e| format!("clip: {what} inference failed ({}): {e}", model.display()))?;
    if outputs.len() <= index {
        return Err(format!("clip: {what} model {} has no output", model.display()));
    }
    let (shape, data) = outputs[index]
        .try_extract_tensor::<f32>()
        .map_err(|e| format!("clip: unexpected {what} output type from {} (expected float32): {e}", model.display()))?;
    let ok = match &shape[..] {
        [d] => *d > 0,
        [1, d] => *d > 0,
        _ => false,
    };
    if !ok {
        return Err(format!(
            "clip: {what} model {} gives output shape {:?}, expected the projected embedding [1, D] (is it an export with projection, e.g. CLIP{}ModelWithProjection?)",
            model.display(),
            &shape[..],
            if what == "image" { "Vision" } else { "Text" }
        ));
    }
    Ok(data.to_vec())
}

/// The CLIP image embedding of `img` (not normalised).
pub fn image_embedding(cfg: &ClipConfig, img: &RgbImage) -> Result<Vec<f32>, String> {
    let input = preprocess(img, cfg.input_size)?;
    let model = &cfg.image_model;
    onnx::with_session(model, |session| {
        let name = match session.inputs().first() {
            Some(i) => i.name().to_string(),
            None => return Err(format!("clip: image model {} has no input", model.display())),
        };
        let index = output_index(session, "image_embeds");
        let side = cfg.input_size as usize;
        let tensor = TensorRef::from_array_view(([1usize, 3, side, side], &input[..]))
            .map_err(|e| format!("clip: cannot build the image tensor: {e}"))?;
        embedding(session, vec![(name, tensor.into())], index, "image", model)
    })
}

/// The CLIP text embedding of `prompt` (tokenised with [`tokenize`]; not normalised).
pub fn text_embedding(cfg: &ClipConfig, prompt: &str) -> Result<Vec<f32>, String> {
    text_embedding_ids(cfg, &tokenize(prompt))
}

/// The CLIP text embedding of token ids: at most [`CONTEXT_LENGTH`] of them, zero padded to
/// that length here (so `[49406, ..., 49407]` alone is fine).
pub fn text_embedding_ids(cfg: &ClipConfig, ids: &[i64]) -> Result<Vec<f32>, String> {
    if ids.len() > CONTEXT_LENGTH {
        return Err(format!("clip: {} token ids, at most {CONTEXT_LENGTH} fit", ids.len()));
    }
    let mut padded = ids.to_vec();
    padded.resize(CONTEXT_LENGTH, 0);
    // Attention covers everything up to the last non-zero id (the end token).
    let used = padded.iter().rposition(|&id| id != 0).map_or(0, |p| p + 1);
    let mask: Vec<i64> = (0..CONTEXT_LENGTH).map(|i| i64::from(i < used)).collect();
    let model = &cfg.text_model;
    onnx::with_session(model, |session| {
        let (name, ty) = match session.inputs().first() {
            Some(i) => (i.name().to_string(), i.dtype().tensor_type()),
            None => return Err(format!("clip: text model {} has no input", model.display())),
        };
        let mask_input =
            session.inputs().iter().skip(1).find(|i| i.name() == "attention_mask").map(|i| i.name().to_string());
        let index = output_index(session, "text_embeds");
        let shape = [1usize, CONTEXT_LENGTH];
        let err = |e: ort::Error| format!("clip: cannot build the text tensor: {e}");
        let ids32: Vec<i32>;
        let mask32: Vec<i32>;
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(2);
        match ty {
            Some(TensorElementType::Int64) => {
                inputs.push((name, TensorRef::from_array_view((shape, &padded[..])).map_err(err)?.into()));
                if let Some(m) = mask_input {
                    inputs.push((m, TensorRef::from_array_view((shape, &mask[..])).map_err(err)?.into()));
                }
            }
            Some(TensorElementType::Int32) => {
                ids32 = padded.iter().map(|&v| v as i32).collect();
                mask32 = mask.iter().map(|&v| v as i32).collect();
                inputs.push((name, TensorRef::from_array_view((shape, &ids32[..])).map_err(err)?.into()));
                if let Some(m) = mask_input {
                    inputs.push((m, TensorRef::from_array_view((shape, &mask32[..])).map_err(err)?.into()));
                }
            }
            other => {
                return Err(format!(
                    "clip: text model {} takes {other:?} as its first input, expected int64 or int32 token ids",
                    model.display()
                ))
            }
        }
        embedding(session, inputs, index, "text", model)
    })
}

/// Cosine similarity in [-1, 1]; 0 when either vector is all zeros or their lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0) as f32
}

/// The cosine similarity between `img` and `prompt` under the configured CLIP model.
pub fn similarity(cfg: &ClipConfig, img: &RgbImage, prompt: &str) -> Result<f32, String> {
    let i = image_embedding(cfg, img)?;
    let t = text_embedding(cfg, prompt)?;
    if i.len() != t.len() {
        return Err(format!(
            "clip: the image model gives {}-dimensional embeddings, the text model {} (are they from the same CLIP?)",
            i.len(),
            t.len()
        ));
    }
    Ok(cosine(&i, &t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_tokenize_pads_and_marks() {
        let ids = tokenize("Hi there");
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!(&ids[..4], &[49406, 1883, 997, 49407]);
        assert!(ids[4..].iter().all(|&v| v == 0));
    }

    #[test]
    fn clip_tokenize_truncates_long_prompts() {
        let ids = tokenize(&"cat ".repeat(200));
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!(ids[0], 49406);
        assert_eq!(ids[CONTEXT_LENGTH - 1], 49407);
    }

    #[test]
    fn clip_cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!((cosine(&[1.0, 0.0], &[-3.0, 0.0]) + 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 5.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn clip_preprocess_normalises_and_crops() {
        let red = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 0]));
        let x = preprocess(&red, 2).unwrap();
        assert_eq!(x.len(), 12);
        assert!((x[0] - (1.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
        assert!((x[4] + MEAN[1] / STD[1]).abs() < 1e-6);
        let wide = RgbImage::from_pixel(64, 32, image::Rgb([0, 0, 255]));
        let y = preprocess(&wide, 16).unwrap();
        assert_eq!(y.len(), 3 * 16 * 16);
        assert!((y[2 * 256] - (1.0 - MEAN[2]) / STD[2]).abs() < 1e-3);
        assert!(preprocess(&RgbImage::new(0, 0), 16).is_err());
    }

    #[test]
    fn clip_missing_models_are_errors() {
        let cfg = ClipConfig::new("/nonexistent/clip_image.onnx", "/nonexistent/clip_text.onnx");
        let img = RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        assert!(image_embedding(&cfg, &img).is_err());
        assert!(text_embedding(&cfg, "a cat").is_err());
        assert!(similarity(&cfg, &img, "a cat").is_err());
        assert!(cfg.ready().is_err());
        assert!(text_embedding_ids(&cfg, &[1; CONTEXT_LENGTH + 1]).unwrap_err().contains("at most"));
    }
}
