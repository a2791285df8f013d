//! Reading text inside images (OCR) with PaddleOCR's PP-OCRv4 models as the PyPI package
//! `rapidocr-onnxruntime` 1.4.4 ships them (Apache-2.0; `scripts/setup-onnx.sh` puts
//! `ch_PP-OCRv4_det_infer.onnx` and `ch_PP-OCRv4_rec_infer.onnx` in the models directory, and
//! beside them fused copies that compute the same with about a fifth less CPU and 8-bit copies
//! of those with about a third less again, which [`default_models`] prefers: see
//! [`DET_FUSED_FILE`], [`DET_INT8_FILE`]).
//!
//! The pipeline, reimplemented after the package's pre- and post-processing:
//! 1. **Detection** (DB, differentiable binarization): the image is resized (bilinear) so that
//!    its longer side is at most `max_side` ([`DET_MAX_SIDE`] by default; a route's `ocr_max_side`), each side rounded to a multiple of 32, fed as
//!    float32 NCHW in B, G, R order normalised as `(v / 255 - 0.5) / 0.5`; the output
//!    `[1, 1, H, W]` text probability map is binarized at [`DET_THRESH`] and dilated with a 2x2
//!    kernel.
//! 2. **Boxes**: this first version takes **axis-aligned** boxes: the bounding box of each
//!    8-connected component of the binary map, kept when its shorter side is at least 3 map
//!    pixels and its mean probability is at least [`DET_BOX_THRESH`], then grown on every side
//!    by `area * UNCLIP_RATIO / perimeter` (what the package's polygon offset does to a
//!    rectangle, without the rounded corners) and mapped back to the image's pixels. The
//!    package fits rotated rectangles instead; generated images almost always have horizontal
//!    text, and rotated or curved text is read worse here.
//! 3. **Recognition** (CRNN/SVTR with CTC): each box is cropped and resized (bilinear) to
//!    height 48 keeping its aspect ratio (no padding: the package pads to 320, which changed no
//!    character of the rendered set and cost a third of recognition time), and fed
//!    as `x` `[1, 3, 48, W]`; the output `[1, T, 6625]` is decoded greedily (argmax per step,
//!    repeats merged, blank index 0). The character list is the model's metadata `character`
//!    (one per line) with the blank before it and a space after it. A crop at least 1.5 times
//!    taller than wide is turned a quarter turn counter-clockwise first, like the package.
//!    Lines whose confidence (the mean probability of the kept steps) is below
//!    [`TEXT_SCORE`] are dropped, and so are single glyphs below [`SINGLE_GLYPH_SCORE`] (what
//!    counts as text: shapes in photos are read as one letter now and then, never as words).
//!
//! Not done (the package does them): the angle classifier (upside-down text), the letterbox
//! padding of very flat images, the batching of lines (each line is run alone here).
//!
//! CPU-bound: call it from the evaluation pool, never from an async worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::RgbImage;

use super::onnx;

/// File names of the models in the models directory.
pub const DET_MODEL_FILE: &str = "ch_PP-OCRv4_det_infer.onnx";
pub const REC_MODEL_FILE: &str = "ch_PP-OCRv4_rec_infer.onnx";
/// File names of the fused copies `scripts/setup-onnx.sh` writes beside them
/// (`scripts/ocr_fuse.py`: hard-swish as one operator, PP-LCNetV3's scalar affine blocks folded
/// into the convolutions; the same outputs up to float rounding, about a fifth less CPU).
pub const DET_FUSED_FILE: &str = "ch_PP-OCRv4_det_infer.fused.onnx";
pub const REC_FUSED_FILE: &str = "ch_PP-OCRv4_rec_infer.fused.onnx";
/// File names of the 8-bit copies `scripts/setup-onnx.sh` writes from the fused ones
/// (`scripts/ocr_quantize.py`: ONNX Runtime's static quantization, 7-bit weights per channel and
/// uint8 activations calibrated on drawn text, the same results on CPUs with and without VNNI;
/// about a third less CPU than the fused copies, and not exact: the rendered set reads as
/// accurately, see README "Evaluation cost").
pub const DET_INT8_FILE: &str = "ch_PP-OCRv4_det_infer.int8.onnx";
pub const REC_INT8_FILE: &str = "ch_PP-OCRv4_rec_infer.int8.onnx";
/// Environment variable choosing the OCR models' arithmetic: `int8` (the default: the 8-bit
/// copies when present) or `float` (the fused copies or the models as shipped, never the 8-bit
/// ones). Any other value makes the text evaluator not ready (`text::ready` says why).
pub const PRECISION_ENV: &str = "ACC_OCR_PRECISION";

/// Which copies of the OCR models [`models_in`] may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 8-bit copies first, then fused, then as shipped.
    Int8,
    /// Fused copies, then as shipped.
    Float,
}

/// The precision [`PRECISION_ENV`] asks for (unset or empty: `int8`). `Err` names the variable and
/// its value when it is set to something other than `int8` or `float`.
pub fn precision() -> Result<Precision, String> {
    parse_precision(std::env::var_os(PRECISION_ENV).as_deref())
}

/// [`precision`] of a value of [`PRECISION_ENV`] (`None`: unset). Case is ignored; a value that
/// is not UTF-8 is refused like any other unknown one.
fn parse_precision(value: Option<&std::ffi::OsStr>) -> Result<Precision, String> {
    let Some(value) = value else { return Ok(Precision::Int8) };
    match value.to_str() {
        Some(v) if v.is_empty() || v.eq_ignore_ascii_case("int8") => Ok(Precision::Int8),
        Some(v) if v.eq_ignore_ascii_case("float") => Ok(Precision::Float),
        _ => Err(format!("{PRECISION_ENV}={value:?}: expected \"int8\" or \"float\"")),
    }
}

/// Default longest side of the detector's input (images larger than this are shrunk; smaller
/// ones are not enlarged). The package uses 960; at 416 detection costs a fifth as much on a
/// 1024x1024 image and the rendered set reads as well (99.4% of characters against 99.0%):
/// lines down to about 20 px high on a 1024 px image are found, smaller print may be missed
/// (`bench/eval.rs`, README "Evaluation cost"). A route's `ocr_max_side` raises it.
pub const DET_MAX_SIDE: u32 = 416;
/// Bounds of a route's `ocr_max_side`.
pub const DET_MAX_SIDE_RANGE: std::ops::RangeInclusive<u32> = 128..=4096;
/// Probability above which a map pixel is text.
pub const DET_THRESH: f32 = 0.3;
/// Mean probability a box needs to be kept.
pub const DET_BOX_THRESH: f32 = 0.5;
/// How far boxes are grown: `area * UNCLIP_RATIO / perimeter` on every side.
pub const UNCLIP_RATIO: f32 = 1.6;
/// Height of the recogniser's input.
pub const REC_HEIGHT: u32 = 48;
/// Lines read with a lower confidence are dropped.
pub const TEXT_SCORE: f32 = 0.5;
/// A line of a single glyph counts as text only with at least this confidence. Shapes in
/// photographs (a cup's rim, a wheel) are read as one letter now and then: scikit-image's
/// `coffee.png`, a cup with no text, reads "O" at 0.61, while every line of the rendered-text set
/// (`scripts/ocr-testimages.sh`, 4 to 17 characters) reads at 0.94 or more.
pub const SINGLE_GLYPH_SCORE: f32 = 0.9;

/// One line of text read from an image.
#[derive(Debug, Clone, PartialEq)]
pub struct TextLine {
    pub text: String,
    /// Mean probability of the recognised characters, 0..1.
    pub confidence: f32,
    /// x, y, width, height in the original image's pixels.
    pub bbox: [f32; 4],
}

/// The detector and recogniser the text evaluator uses: [`models_in`] the models directory, at
/// the [`precision`] the environment asks for.
pub fn default_models() -> (PathBuf, PathBuf) {
    models_in(&onnx::models_dir(), precision().unwrap_or(Precision::Int8))
}

/// The detector and recogniser in `dir`: for each model, the first of its copies that exists and
/// was written after the model (with [`Precision::Int8`] the 8-bit copy, [`DET_INT8_FILE`], then
/// the fused one, [`DET_FUSED_FILE`]; with [`Precision::Float`] the fused one only), else the
/// model as shipped ([`DET_MODEL_FILE`], [`REC_MODEL_FILE`]). A model replaced after its copies
/// were made (by hand, not by `scripts/setup-onnx.sh`, which rewrites them) is read as it is.
pub fn models_in(dir: &Path, precision: Precision) -> (PathBuf, PathBuf) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let pick = |copies: &[&str], shipped: &str| {
        let s = dir.join(shipped);
        let model = modified(&s);
        for copy in copies {
            let f = dir.join(copy);
            match (modified(&f), model) {
                (Some(at), Some(model)) if at >= model => return f,
                (Some(_), None) => return f,
                _ => {}
            }
        }
        s
    };
    match precision {
        Precision::Int8 => (
            pick(&[DET_INT8_FILE, DET_FUSED_FILE], DET_MODEL_FILE),
            pick(&[REC_INT8_FILE, REC_FUSED_FILE], REC_MODEL_FILE),
        ),
        Precision::Float => (pick(&[DET_FUSED_FILE], DET_MODEL_FILE), pick(&[REC_FUSED_FILE], REC_MODEL_FILE)),
    }
}

/// Smallest `ocr_max_side` at which the detector runs in 8 bits. Below it text is a few pixels
/// high in what the detector sees, and the 8-bit detector loses lines the float one finds (at
/// 128 the rendered set's scenes read nothing, the float detector reads most of them), while the
/// float detector costs little there (a sixteenth of 416's work at 104 px). From 192 up both read
/// the rendered set alike; 256 leaves a margin.
pub const INT8_DET_MIN_SIDE: u32 = 256;

/// The models the text evaluator reads with when its detector sees at most `max_side` pixels:
/// [`default_models`], with the float detector ([`Precision::Float`]) below
/// [`INT8_DET_MIN_SIDE`].
pub fn models_for(max_side: u32) -> (PathBuf, PathBuf) {
    let dir = onnx::models_dir();
    let precision = precision().unwrap_or(Precision::Int8);
    let (det, rec) = models_in(&dir, precision);
    if precision == Precision::Int8 && max_side < INT8_DET_MIN_SIDE {
        return (models_in(&dir, Precision::Float).0, rec);
    }
    (det, rec)
}

/// `(<models dir>/ch_PP-OCRv4_det_infer.onnx, <models dir>/ch_PP-OCRv4_rec_infer.onnx)`: the
/// models as the package ships them, whether or not fused copies exist.
pub fn shipped_models() -> (PathBuf, PathBuf) {
    let dir = onnx::models_dir();
    (dir.join(DET_MODEL_FILE), dir.join(REC_MODEL_FILE))
}

/// The models [`models_in`] the models directory chooses at [`Precision::Float`]: the fused
/// copies where they are current, else the models as shipped.
pub fn float_models() -> (PathBuf, PathBuf) {
    models_in(&onnx::models_dir(), Precision::Float)
}

/// Reads the text in `img`: lines in reading order (top to bottom, then left to right within
/// a row). Detection sees the image shrunk to at most `max_side` pixels on its longer side
/// (see [`DET_MAX_SIDE`]). One session per model per calling thread. A missing library or
/// model is an `Err` naming it.
pub fn read_text(det_model: &Path, rec_model: &Path, img: &RgbImage, max_side: u32) -> Result<Vec<TextLine>, String> {
    if img.width() == 0 || img.height() == 0 {
        return Err("empty image (0 pixels)".to_string());
    }
    let boxes = detect(det_model, img, max_side)?;
    let boxes = reading_order(boxes);
    let charset = charset(rec_model)?;
    let mut lines = Vec::with_capacity(boxes.len());
    for b in boxes {
        let (input, width) = rec_input(img, &b);
        let (text, confidence) = onnx::with_session(rec_model, |session| {
            let tensor = ort::value::TensorRef::from_array_view(([1usize, 3, REC_HEIGHT as usize, width], &input[..]))
                .map_err(|e| format!("ocr: cannot build the recogniser input: {e}"))?;
            let outputs = session
                .run(ort::inputs![tensor])
                .map_err(|e| format!("ocr: recognition failed ({}): {e}", rec_model.display()))?;
            if outputs.len() == 0 {
                return Err(format!("ocr: model {} has no output", rec_model.display()));
            }
            let (shape, data) = outputs[0]
                .try_extract_tensor::<f32>()
                .map_err(|e| format!("ocr: unexpected output type from {}: {e}", rec_model.display()))?;
            if shape.len() != 3 || shape[0] != 1 || shape[2] != charset.len() as i64 {
                return Err(format!(
                    "ocr: model {} gives output shape {:?}, expected [1, T, {}] (is it PP-OCR's rec model?)",
                    rec_model.display(),
                    &shape[..],
                    charset.len()
                ));
            }
            Ok(ctc_decode(data, shape[1] as usize, &charset))
        })?;
        let glyphs = text.chars().filter(|c| !c.is_whitespace()).count();
        if glyphs == 0 || confidence < TEXT_SCORE || (glyphs == 1 && confidence < SINGLE_GLYPH_SCORE) {
            continue;
        }
        lines.push(TextLine {
            text: crate::request::contract::plain_text(&text),
            confidence,
            bbox: [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0],
        });
    }
    Ok(lines)
}

/// A box in the original image's pixels (x0 <= x1, y0 <= y1).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Box {
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
}

/// The recogniser's character list: blank, the model's `character` metadata lines, space.
/// Read once per model path per process.
fn charset(rec_model: &Path) -> Result<Arc<Vec<String>>, String> {
    static CACHE: Mutex<Option<HashMap<PathBuf, Arc<Vec<String>>>>> = Mutex::new(None);
    if let Some(c) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).get(rec_model) {
        return Ok(c.clone());
    }
    let list = onnx::with_session(rec_model, |session| {
        let meta =
            session.metadata().map_err(|e| format!("ocr: cannot read the metadata of {}: {e}", rec_model.display()))?;
        let chars = meta.custom("character").ok_or_else(|| {
            format!("ocr: model {} has no `character` metadata (is it PP-OCR's rec model?)", rec_model.display())
        })?;
        let mut list = vec![String::new()];
        list.extend(chars.lines().map(str::to_string));
        list.push(" ".to_string());
        Ok(list)
    })?;
    let list = Arc::new(list);
    CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(rec_model.to_path_buf(), list.clone());
    Ok(list)
}

/// Greedy CTC decoding of `[T, C]` probabilities: text and mean probability of kept steps.
fn ctc_decode(probs: &[f32], steps: usize, charset: &[String]) -> (String, f32) {
    let c = charset.len();
    let mut text = String::new();
    let (mut sum, mut n) = (0f32, 0usize);
    let mut prev = usize::MAX;
    for t in 0..steps {
        let row = &probs[t * c..(t + 1) * c];
        let (best, p) = row.iter().enumerate().fold((0, f32::MIN), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
        if best != 0 && best != prev {
            text.push_str(&charset[best]);
            sum += p;
            n += 1;
        }
        prev = best;
    }
    (text, if n == 0 { 0.0 } else { sum / n as f32 })
}

/// Bilinear sample (half-pixel centres, edges replicated) of the R, G, B channels at (`x`, `y`).
fn sample(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = (img.width(), img.height());
    let (tx, ty) = (Tap::at(x, w), Tap::at(y, h));
    let stride = w as usize * 3;
    let raw = img.as_raw();
    tx.blend(&raw[ty.i0 * stride..][..stride], &raw[ty.i1 * stride..][..stride], ty.f)
}

/// Where a bilinear sample along one axis reads: the two neighbouring source indices and the
/// weight of the second (coordinates clamped to the edges).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    f: f32,
}

impl Tap {
    /// The tap at source coordinate `v` on an axis of `len` pixels.
    fn at(v: f32, len: u32) -> Tap {
        let v = v.clamp(0.0, (len - 1) as f32);
        let i0 = v.floor() as usize;
        Tap { i0, i1: (i0 + 1).min(len as usize - 1), f: v - i0 as f32 }
    }

    /// The taps of `out` output pixels, half-pixel centres, `scale` source pixels per output pixel.
    fn row(out: usize, len: u32, scale: f32) -> Vec<Tap> {
        (0..out).map(|o| Tap::at((o as f32 + 0.5) * scale - 0.5, len)).collect()
    }

    /// R, G, B at this (horizontal) tap between two source rows of packed RGB, `fy` of the way
    /// from `top` to `bottom`.
    fn blend(&self, top: &[u8], bottom: &[u8], fy: f32) -> [f32; 3] {
        let px = |row: &[u8], i: usize| [row[i * 3] as f32, row[i * 3 + 1] as f32, row[i * 3 + 2] as f32];
        let (a, b, c, d) = (px(top, self.i0), px(top, self.i1), px(bottom, self.i0), px(bottom, self.i1));
        std::array::from_fn(|k| {
            let upper = a[k] + (b[k] - a[k]) * self.f;
            let lower = c[k] + (d[k] - c[k]) * self.f;
            upper + (lower - upper) * fy
        })
    }
}

/// `(v / 255 - 0.5) / 0.5`.
fn norm(v: f32) -> f32 {
    v * (2.0 / 255.0) - 1.0
}

/// The detector's input size for a `w` x `h` image.
fn det_size(w: u32, h: u32, max_side: u32) -> (usize, usize) {
    let max_side = max_side.max(32);
    let ratio = if w.max(h) > max_side { max_side as f32 / w.max(h) as f32 } else { 1.0 };
    let round32 = |v: u32| ((((v as f32 * ratio) as u32) as f32 / 32.0).round() as usize * 32).max(32);
    (round32(w), round32(h))
}

/// The detector's input: `img` resized (bilinear, as [`sample`]) to `dw` x `dh`, as B, G, R
/// planes normalised by [`norm`]. The taps of each column and row are worked out once.
fn det_input(img: &RgbImage, dw: usize, dh: usize) -> Vec<f32> {
    let (w, h) = (img.width(), img.height());
    let columns = Tap::row(dw, w, w as f32 / dw as f32);
    let rows = Tap::row(dh, h, h as f32 / dh as f32);
    let stride = w as usize * 3;
    let raw = img.as_raw();
    let mut input = vec![0f32; 3 * dw * dh];
    let (blue, rest) = input.split_at_mut(dw * dh);
    let (green, red) = rest.split_at_mut(dw * dh);
    for (y, ty) in rows.iter().enumerate() {
        let (top, bottom) = (&raw[ty.i0 * stride..][..stride], &raw[ty.i1 * stride..][..stride]);
        let at = y * dw;
        for (x, tx) in columns.iter().enumerate() {
            let [r, g, b] = tx.blend(top, bottom, ty.f);
            blue[at + x] = norm(b);
            green[at + x] = norm(g);
            red[at + x] = norm(r);
        }
    }
    input
}

fn detect(det_model: &Path, img: &RgbImage, max_side: u32) -> Result<Vec<Box>, String> {
    let (w, h) = (img.width(), img.height());
    let (dw, dh) = det_size(w, h, max_side);
    let input = det_input(img, dw, dh);
    onnx::with_session(det_model, |session| {
        let tensor = ort::value::TensorRef::from_array_view(([1usize, 3, dh, dw], &input[..]))
            .map_err(|e| format!("ocr: cannot build the detector input: {e}"))?;
        let outputs = session
            .run(ort::inputs![tensor])
            .map_err(|e| format!("ocr: detection failed ({}): {e}", det_model.display()))?;
        if outputs.len() == 0 {
            return Err(format!("ocr: model {} has no output", det_model.display()));
        }
        let (shape, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("ocr: unexpected output type from {}: {e}", det_model.display()))?;
        if shape.len() != 4 || shape[0] != 1 || shape[1] != 1 || shape[2] != dh as i64 || shape[3] != dw as i64 {
            return Err(format!(
                "ocr: model {} gives output shape {:?}, expected [1, 1, {dh}, {dw}] (is it PP-OCR's det model?)",
                det_model.display(),
                &shape[..]
            ));
        }
        Ok(boxes_from_map(data, dw, dh, w, h))
    })
}

/// Axis-aligned text boxes from the DB probability map `prob` (`mw` x `mh`), in the pixels of
/// a `w` x `h` image.
fn boxes_from_map(prob: &[f32], mw: usize, mh: usize, w: u32, h: u32) -> Vec<Box> {
    // Binarize, then dilate with a 2x2 kernel (anchor at its centre: a pixel is set when it or
    // its left, upper or upper-left neighbour is above the threshold).
    let bin: Vec<bool> = prob.iter().map(|&p| p > DET_THRESH).collect();
    let mut mask = vec![false; mw * mh];
    for y in 0..mh {
        for x in 0..mw {
            let at = |xx: usize, yy: usize| bin[yy * mw + xx];
            mask[y * mw + x] =
                at(x, y) || (x > 0 && at(x - 1, y)) || (y > 0 && at(x, y - 1)) || (x > 0 && y > 0 && at(x - 1, y - 1));
        }
    }
    // 8-connected components, by flood fill.
    let mut seen = vec![false; mw * mh];
    let mut stack = Vec::new();
    let mut boxes = Vec::new();
    for start in 0..mw * mh {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % mw, i / mw);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            for ny in y.saturating_sub(1)..=(y + 1).min(mh - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(mw - 1) {
                    let j = ny * mw + nx;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        // The box through the outermost pixel centres, as a contour's rectangle would be.
        let (bw, bh) = ((x1 - x0) as f32, (y1 - y0) as f32);
        if bw.min(bh) < 3.0 {
            continue;
        }
        let mut sum = 0f32;
        for y in y0..=y1 {
            sum += prob[y * mw + x0..=y * mw + x1].iter().sum::<f32>();
        }
        let score = sum / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
        if score < DET_BOX_THRESH {
            continue;
        }
        let d = bw * bh * UNCLIP_RATIO / (2.0 * (bw + bh));
        let (ex0, ey0, ex1, ey1) = (x0 as f32 - d, y0 as f32 - d, x1 as f32 + d, y1 as f32 + d);
        if (ex1 - ex0).min(ey1 - ey0) < 5.0 {
            continue;
        }
        let (fx, fy) = (w as f32 / mw as f32, h as f32 / mh as f32);
        let cx = |v: f32| (v * fx).round().clamp(0.0, (w - 1) as f32);
        let cy = |v: f32| (v * fy).round().clamp(0.0, (h - 1) as f32);
        let b = Box { x0: cx(ex0), y0: cy(ey0), x1: cx(ex1), y1: cy(ey1) };
        if b.x1 - b.x0 <= 3.0 || b.y1 - b.y0 <= 3.0 {
            continue;
        }
        boxes.push(b);
    }
    boxes
}

/// Top to bottom, then left to right among boxes whose tops are within 10 pixels (the
/// package's ordering).
fn reading_order(mut boxes: Vec<Box>) -> Vec<Box> {
    boxes.sort_by(|a, b| a.y0.total_cmp(&b.y0).then(a.x0.total_cmp(&b.x0)));
    for i in 0..boxes.len().saturating_sub(1) {
        let mut j = i;
        while (boxes[j + 1].y0 - boxes[j].y0).abs() < 10.0 && boxes[j + 1].x0 < boxes[j].x0 {
            boxes.swap(j, j + 1);
            if j == 0 {
                break;
            }
            j -= 1;
        }
    }
    boxes
}

/// The recogniser's input for the crop `b` of `img`: `[3, 48, W]` (B, G, R planes) and W.
fn rec_input(img: &RgbImage, b: &Box) -> (Vec<f32>, usize) {
    let (cw, ch) = ((b.x1 - b.x0).max(1.0).floor(), (b.y1 - b.y0).max(1.0).floor());
    // A tall crop is read turned a quarter turn counter-clockwise: its width becomes the height.
    let rotate = ch / cw >= 1.5;
    let (tw, th) = if rotate { (ch, cw) } else { (cw, ch) };
    let hh = REC_HEIGHT as usize;
    let resized_w = ((hh as f32 * tw / th).ceil() as usize).clamp(1, 4096);
    let width = resized_w;
    let mut input = vec![0f32; 3 * hh * width];
    let (sx, sy) = (tw / resized_w as f32, th / hh as f32);
    for y in 0..hh {
        // Coordinates in the (possibly turned) crop, then in the image.
        let v = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, th - 1.0);
        for x in 0..resized_w {
            let u = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, tw - 1.0);
            let (ix, iy) = if rotate { (b.x0 + (cw - 1.0 - v), b.y0 + u) } else { (b.x0 + u, b.y0 + v) };
            let [r, g, bl] = sample(img, ix, iy);
            let i = y * width + x;
            input[i] = norm(bl);
            input[hh * width + i] = norm(g);
            input[2 * hh * width + i] = norm(r);
        }
    }
    (input, width)
}

/// Levenshtein distance between `a` and `b`, in characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Lower-cased, with runs of whitespace made one space and the ends trimmed.
fn normalise(s: &str) -> Vec<char> {
    let lower = s.to_lowercase();
    let mut out = Vec::with_capacity(lower.len());
    for word in lower.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars());
    }
    out
}

/// Whether `needle` occurs in `haystack` with at most `max_edits_per_10_chars` edits
/// (insertions, deletions, substitutions) per 10 characters of the needle (rounded down, so
/// a needle shorter than 10 characters with 1 per 10 must match exactly), ignoring case and
/// differences in whitespace. Approximate substring matching: the needle may match any part
/// of the haystack. An empty needle is always contained.
pub fn fuzzy_contains(haystack: &str, needle: &str, max_edits_per_10_chars: usize) -> bool {
    let h = normalise(haystack);
    let n = normalise(needle);
    if n.is_empty() {
        return true;
    }
    let allowed = n.len() * max_edits_per_10_chars / 10;
    // col[i] = fewest edits turning needle[..i] into some substring of the haystack ending here.
    let mut col: Vec<usize> = (0..=n.len()).collect();
    if col[n.len()] <= allowed {
        return true;
    }
    for &hc in &h {
        let mut diag = col[0];
        col[0] = 0;
        for i in 1..=n.len() {
            let next = (diag + usize::from(n[i - 1] != hc)).min(col[i] + 1).min(col[i - 1] + 1);
            diag = col[i];
            col[i] = next;
        }
        if col[n.len()] <= allowed {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ACME", "ACME"), 0);
        assert_eq!(edit_distance("ACME", "AC ME"), 1);
        assert_eq!(edit_distance("é", "e"), 1);
    }

    #[test]
    fn fuzzy_contains_exact_and_case() {
        assert!(fuzzy_contains("Welcome to the OPEN BAKERY 24/7 downtown", "open bakery 24/7", 0));
        assert!(fuzzy_contains("acme", "ACME", 0));
        assert!(fuzzy_contains("anything", "", 0));
        assert!(!fuzzy_contains("", "x", 5));
        assert!(!fuzzy_contains("ACNE corp", "ACME", 0));
    }

    #[test]
    fn fuzzy_contains_tolerates_ocr_errors() {
        // One substitution in 16 characters: allowed at 1 per 10.
        assert!(fuzzy_contains("OPEN BAKERY 2417", "OPEN BAKERY 24/7", 1));
        // A dropped space and a substitution: 2 edits, allowed at 2 per 10 (3 for 16 chars).
        assert!(fuzzy_contains("xx OPENBAKERY 2417 yy", "OPEN BAKERY 24/7", 2));
        assert!(!fuzzy_contains("xx OPENBAKERY 2417 yy", "OPEN BAKERY 24/7", 1));
        // Whitespace runs and line breaks count as one space.
        assert!(fuzzy_contains("SALE\n  50%   OFF", "sale 50% off", 0));
        // A short needle gets no edits at 2 per 10 (4 * 2 / 10 = 0).
        assert!(!fuzzy_contains("ACNE", "ACME", 2));
        assert!(fuzzy_contains("ACNE", "ACME", 3));
        // Unrelated text is not contained.
        assert!(!fuzzy_contains("Hello World", "OPEN BAKERY 24/7", 2));
    }

    #[test]
    fn ctc_decode_merges_repeats_and_drops_blanks() {
        let charset: Vec<String> = ["", "a", "b", " "].iter().map(|s| s.to_string()).collect();
        // Steps: a a blank a b space b
        let steps = [1, 1, 0, 1, 2, 3, 2];
        let mut probs = vec![0.0f32; steps.len() * 4];
        for (t, &k) in steps.iter().enumerate() {
            probs[t * 4 + k] = 0.9;
        }
        let (text, conf) = ctc_decode(&probs, steps.len(), &charset);
        assert_eq!(text, "aab b");
        assert!((conf - 0.9).abs() < 1e-6);
        assert_eq!(ctc_decode(&[1.0, 0.0, 0.0, 0.0], 1, &charset), (String::new(), 0.0));
    }

    #[test]
    fn precision_values() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(parse_precision(None), Ok(Precision::Int8));
        for v in ["", "int8", "INT8"] {
            assert_eq!(parse_precision(Some(OsStr::new(v))), Ok(Precision::Int8), "{v:?}");
        }
        assert_eq!(parse_precision(Some(OsStr::new("Float"))), Ok(Precision::Float));
        for v in [&b"INT4"[..], b" float", b"int8 ", b"fp32", b"\xff"] {
            let e = parse_precision(Some(OsStr::from_bytes(v))).unwrap_err();
            assert!(e.starts_with("ACC_OCR_PRECISION=") && e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn copies_are_used_only_when_newer_than_their_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let both = |precision| models_in(dir.path(), precision);
        // Nothing there: the shipped names (errors then name them).
        assert_eq!(both(Precision::Int8), (p(DET_MODEL_FILE), p(REC_MODEL_FILE)));
        let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let write = |name: &str, at: std::time::SystemTime| {
            let f = std::fs::File::create(p(name)).unwrap();
            f.set_modified(at).unwrap();
        };
        write(DET_MODEL_FILE, t0);
        write(REC_MODEL_FILE, t0);
        assert_eq!(both(Precision::Int8), (p(DET_MODEL_FILE), p(REC_MODEL_FILE)), "no copies yet");
        write(DET_FUSED_FILE, at(5));
        write(REC_FUSED_FILE, t0);
        assert_eq!(both(Precision::Int8), (p(DET_FUSED_FILE), p(REC_FUSED_FILE)), "copies as new or newer");
        // 8-bit copies come first, unless float is asked for.
        write(DET_INT8_FILE, at(6));
        write(REC_INT8_FILE, at(6));
        assert_eq!(both(Precision::Int8), (p(DET_INT8_FILE), p(REC_INT8_FILE)));
        assert_eq!(both(Precision::Float), (p(DET_FUSED_FILE), p(REC_FUSED_FILE)));
        // The recogniser replaced by hand after its copies were made: read as it is now.
        write(REC_MODEL_FILE, at(60));
        assert_eq!(both(Precision::Int8), (p(DET_INT8_FILE), p(REC_MODEL_FILE)));
        assert_eq!(both(Precision::Float), (p(DET_FUSED_FILE), p(REC_MODEL_FILE)));
        // An 8-bit copy older than its model is skipped for a fused one that is newer.
        write(DET_MODEL_FILE, at(7));
        write(DET_FUSED_FILE, at(8));
        assert_eq!(both(Precision::Int8).0, p(DET_FUSED_FILE));
    }

    #[test]
    fn det_input_is_the_bilinear_sample_of_every_pixel() {
        // Sizes that shrink, enlarge and keep each axis; odd ones, and a single row.
        for (w, h, dw, dh) in [(101u32, 67u32, 64usize, 32usize), (20, 30, 32, 64), (64, 1, 64, 32), (33, 33, 33, 33)] {
            let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y) as u8, (y * 13) as u8, (x ^ y) as u8]));
            let got = det_input(&img, dw, dh);
            let (sx, sy) = (w as f32 / dw as f32, h as f32 / dh as f32);
            for y in 0..dh {
                for x in 0..dw {
                    let [r, g, b] = sample(&img, (x as f32 + 0.5) * sx - 0.5, (y as f32 + 0.5) * sy - 0.5);
                    let i = y * dw + x;
                    assert_eq!(
                        [got[i], got[dw * dh + i], got[2 * dw * dh + i]],
                        [norm(b), norm(g), norm(r)],
                        "{w}x{h} -> {dw}x{dh} at {x},{y}"
                    );
                }
            }
        }
        // A corner pixel of a 2x2 image enlarged 4x: a quarter of the way between neighbours.
        let img = RgbImage::from_fn(2, 2, |x, _| image::Rgb([if x == 0 { 0 } else { 255 }, 0, 0]));
        assert_eq!(sample(&img, 0.25, 0.0), [63.75, 0.0, 0.0]);
        assert_eq!(sample(&img, -3.0, 9.0), [0.0, 0.0, 0.0]);
    }

    #[test]
    fn det_size_is_a_multiple_of_32_within_the_limit() {
        assert_eq!(det_size(512, 512, 960), (512, 512));
        assert_eq!(det_size(1024, 1024, 960), (960, 960));
        assert_eq!(det_size(1920, 1080, 960), (960, 544));
        assert_eq!(det_size(10, 10, 960), (32, 32));
        assert_eq!(det_size(1024, 1024, DET_MAX_SIDE), (416, 416));
        assert_eq!(det_size(1536, 1024, DET_MAX_SIDE), (416, 288));
    }

    #[test]
    fn boxes_come_from_components_and_are_grown() {
        // A 40 x 10 map with one 20 x 4 text blob.
        let (mw, mh) = (40, 10);
        let mut prob = vec![0f32; mw * mh];
        for y in 3..7 {
            for x in 10..30 {
                prob[y * mw + x] = 0.9;
            }
        }
        let boxes = boxes_from_map(&prob, mw, mh, 80, 20);
        assert_eq!(boxes.len(), 1);
        let b = boxes[0];
        // Blob (after dilation) spans x 10..=30, y 3..=7, grown by d = 20*4*1.6/48 = 2.67.
        assert!(b.x0 < 20.0 && b.x1 > 60.0 && b.y0 < 6.0 && b.y1 > 14.0, "{b:?}");
        // A faint blob is dropped.
        let faint: Vec<f32> = prob.iter().map(|p| p * 0.4).collect();
        assert!(boxes_from_map(&faint, mw, mh, 80, 20).is_empty());
    }

    #[test]
    fn reading_order_is_rows_then_columns() {
        let b = |x0: f32, y0: f32| Box { x0, y0, x1: x0 + 10.0, y1: y0 + 10.0 };
        let got = reading_order(vec![b(50.0, 100.0), b(60.0, 12.0), b(0.0, 15.0), b(0.0, 100.0)]);
        assert_eq!(got, vec![b(0.0, 15.0), b(60.0, 12.0), b(0.0, 100.0), b(50.0, 100.0)]);
    }
}
