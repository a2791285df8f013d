//! Inline evaluation of generated images: every artifact is decoded once, on the evaluation
//! pool (never on the async workers), and checked by the evaluators the route names. Each
//! evaluator gives a score in [0, 1], a verdict and a reason a person can read.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{ImageFormat, RgbImage};

use crate::request::{OutputFormat, Size};

pub mod adherence;
pub mod classifier;
pub mod clip;
pub mod nudenet;
pub mod ocr;
pub mod onnx;
pub mod pool;
pub mod safety;
pub mod sanity;
pub mod text;

/// The evaluators this build can run, by the name policies use.
pub fn available() -> std::collections::HashMap<&'static str, Arc<dyn Evaluator>> {
    let mut m: std::collections::HashMap<&'static str, Arc<dyn Evaluator>> = std::collections::HashMap::new();
    m.insert("sanity", Arc::new(sanity::Sanity));
    m.insert("safety", Arc::new(safety::Safety::new()));
    m.insert("adherence", Arc::new(adherence::Adherence::new()));
    m.insert("text", Arc::new(text::Text));
    m
}

/// Whether each evaluator can run here, with the reason when it cannot (a missing runtime
/// library or model file, and where it was looked for).
pub fn readiness() -> Vec<(&'static str, Result<(), String>)> {
    let safety = safety::Safety::new().ready();
    let text = text::ready();
    let adherence = match (&safety, &text) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), _) => Err(format!("face clauses: {e}")),
        (_, Err(e)) => Err(format!("text clauses: {e}")),
    };
    vec![("sanity", Ok(())), ("safety", safety), ("text", text), ("adherence", adherence)]
}

/// Per-route settings evaluators read.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// NudeNet classes that count as unsafe; `None` = `safety::DEFAULT_UNSAFE`.
    pub unsafe_classes: Option<Vec<String>>,
    /// Highest score of an unsafe class that still passes.
    pub max_unsafe: f32,
    /// What an unsafe-class NudeNet detection needs to count (evidence of a body); `None`:
    /// every detection counts.
    pub corroboration: Option<safety::Corroboration>,
    /// Lowest share of contract clauses that must hold.
    pub min_adherence: f32,
    /// The route's rules for text inside the image.
    pub text: text::TextRules,
    /// Models the `safety` evaluator runs, in order.
    pub safety_models: Vec<SafetyModel>,
    /// CLIP encoders and the lowest prompt-image similarity `adherence` accepts, when the
    /// policy configures `[clip]` and the route sets `min_clip_similarity`.
    pub clip: Option<(Arc<clip::ClipConfig>, f32)>,
    /// `text` reads and reports the image's text even without rules (`acc eval IMAGE` without
    /// a policy, to show what OCR sees). Off for routes: without a text rule OCR never runs.
    pub report_text: bool,
    /// Longest side, in pixels, of the image as OCR's text detector sees it (a route's
    /// `ocr_max_side`; default [`ocr::DET_MAX_SIDE`]). Larger finds smaller print and costs
    /// more CPU, about quadratically.
    pub ocr_max_side: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SafetyModel {
    NudeNet,
    Classifier(Arc<classifier::ClassifierSpec>),
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            unsafe_classes: None,
            max_unsafe: 0.5,
            corroboration: Some(safety::Corroboration::default()),
            min_adherence: 1.0,
            text: text::TextRules::default(),
            safety_models: vec![SafetyModel::NudeNet],
            clip: None,
            report_text: false,
            ocr_max_side: ocr::DET_MAX_SIDE,
        }
    }
}

/// Largest side and pixel count an artifact may decode to: a decompression bomb (a small PNG
/// that inflates to gigabytes) is refused before its pixels are allocated.
pub const MAX_SIDE: u32 = 8192;
pub const MAX_DECODED_BYTES: u64 = 256 * 1024 * 1024;

/// An artifact decoded once and shared by every evaluator.
pub struct Decoded {
    pub format: ImageFormat,
    pub rgb: RgbImage,
    /// NudeNet's detections, computed once for every evaluator that needs them (safety,
    /// adherence's face clauses).
    detections: std::sync::OnceLock<Result<Vec<nudenet::Detection>, String>>,
    /// The OCR'd text, computed once for every evaluator that needs it.
    text: std::sync::OnceLock<Result<String, String>>,
}

impl Decoded {
    pub fn new(format: ImageFormat, rgb: RgbImage) -> Decoded {
        Decoded { format, rgb, detections: std::sync::OnceLock::new(), text: std::sync::OnceLock::new() }
    }

    /// The text read from this image, lines joined by spaces (OCR runs on first use).
    /// `max_side` is the detector's input bound ([`ocr::DET_MAX_SIDE`] by default); the first
    /// call's value holds for the image.
    pub fn text(&self, det: &std::path::Path, rec: &std::path::Path, max_side: u32) -> &Result<String, String> {
        self.text.get_or_init(|| {
            ocr::read_text(det, rec, &self.rgb, max_side)
                .map(|lines| lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join(" "))
        })
    }

    /// NudeNet's detections on this image (run on first use, then shared).
    pub fn detections(&self, model: &std::path::Path) -> &Result<Vec<nudenet::Detection>, String> {
        self.detections.get_or_init(|| nudenet::detect(model, &self.rgb))
    }

    pub fn size(&self) -> Size {
        Size { width: self.rgb.width(), height: self.rgb.height() }
    }
}

/// An image's size from its header alone (nothing decoded); `None` when the header does not
/// say (not an image, or a format the decoder does not know).
pub fn header_size(bytes: &[u8]) -> Option<Size> {
    let reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?;
    let (width, height) = reader.into_dimensions().ok()?;
    Some(Size { width, height })
}

/// Decodes PNG, JPEG or WebP within the limits above. CPU-bound: call it on the pool.
pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let format = image::guess_format(bytes).map_err(|_| "not an image (unknown format)".to_string())?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) {
        return Err(format!("unsupported image format {format:?} (expected PNG, JPEG or WebP)"));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("does not decode as {format:?}: {e}"))?;
    Ok(Decoded::new(format, img.into_rgb8()))
}

/// What an evaluator concluded about one artifact.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    #[serde(rename = "name")]
    pub evaluator: &'static str,
    /// 1.0 is best.
    pub score: f32,
    pub verdict: Outcome,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// The evaluator could not run (missing model, error, out of budget).
    Error,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Error => "error",
        }
    }
}

/// What an evaluator may look at.
pub struct Subject<'a> {
    pub image: &'a Decoded,
    /// The exact size the client asked for, if it asked for one.
    pub expected_size: Option<Size>,
    /// The `output_format` the provider was asked for, if the client asked for one and it was
    /// sent (not dropped).
    pub expected_format: Option<OutputFormat>,
    pub settings: &'a Settings,
    /// The request's prompt contract, if it has one.
    pub contract: Option<&'a crate::request::contract::Contract>,
    /// The request's prompt (for CLIP similarity).
    pub prompt: &'a str,
}

/// One kind of check. Implementations are CPU-bound and run on the evaluation pool.
pub trait Evaluator: Send + Sync {
    fn name(&self) -> &'static str;
    fn evaluate(&self, subject: &Subject<'_>) -> Verdict;
}

/// The evaluation of one artifact: every evaluator's verdict, and how long it took.
#[derive(Debug, Clone)]
pub struct Report {
    pub verdicts: Vec<Verdict>,
    pub elapsed: Duration,
    /// Per evaluator, seconds spent (same order as `verdicts`).
    pub durations: Vec<f64>,
}

/// Decodes an artifact and runs `evaluators` on it. A decode failure fails every evaluator
/// that needs pixels with the decode error as the reason (sanity reports it as its own).
pub fn evaluate(
    bytes: &Bytes,
    expected_size: Option<Size>,
    settings: &Settings,
    contract: Option<&crate::request::contract::Contract>,
    prompt: &str,
    evaluators: &[Arc<dyn Evaluator>],
) -> Report {
    evaluate_as(bytes, expected_size, None, settings, contract, prompt, evaluators)
}

/// [`evaluate`], with the `output_format` the artifact must be in (sanity checks it).
pub fn evaluate_as(
    bytes: &Bytes,
    expected_size: Option<Size>,
    expected_format: Option<OutputFormat>,
    settings: &Settings,
    contract: Option<&crate::request::contract::Contract>,
    prompt: &str,
    evaluators: &[Arc<dyn Evaluator>],
) -> Report {
    let start = Instant::now();
    // The header first: where the route runs `sanity`, an image of another size than the one
    // asked for fails it and is not decoded (a small PNG can hold 8000x8000 pixels: hundreds of
    // MiB and seconds to decode). A route without `sanity` did not ask for the size to be
    // checked: its image is decoded within the decoder's limits and examined.
    let checks_size = evaluators.iter().any(|e| e.name() == "sanity");
    let mismatch = expected_size.filter(|_| checks_size).and_then(|want| {
        header_size(bytes).filter(|got| *got != want).map(|got| format!("image is {got}, the request asked for {want}"))
    });
    let decoded = if mismatch.is_none() { Some(decode(bytes)) } else { None };
    let mut verdicts = Vec::with_capacity(evaluators.len());
    let mut durations = Vec::with_capacity(evaluators.len());
    for e in evaluators {
        let t = Instant::now();
        let failed = |reason: String| Verdict { evaluator: e.name(), score: 0.0, verdict: Outcome::Fail, reason };
        let v = match (&mismatch, &decoded) {
            (Some(why), _) if e.name() == "sanity" => failed(why.clone()),
            (Some(why), _) => failed(format!("not examined: {why}")),
            (None, Some(Ok(image))) => {
                e.evaluate(&Subject { image, expected_size, expected_format, settings, contract, prompt })
            }
            (None, Some(Err(why))) => failed(format!("artifact {why}")),
            (None, None) => failed("artifact not decoded".into()),
        };
        durations.push(t.elapsed().as_secs_f64());
        verdicts.push(v);
    }
    Report { verdicts, elapsed: start.elapsed(), durations }
}

/// The `x-acc-eval` header for an answer of `images` images, `images_of[i]` being the index
/// of the image `verdicts[i]` is about: with one image `name=verdict(score)` per verdict, as
/// [`summary`]; with several, each prefixed with its image's index,
/// `0:sanity=pass(1.00), 1:sanity=fail(0.00)`.
pub fn summary_per_image(verdicts: &[Verdict], images_of: &[usize], images: usize) -> String {
    if images <= 1 {
        return summary(verdicts);
    }
    let mut s = String::new();
    for (i, v) in verdicts.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let image = images_of.get(i).copied().unwrap_or(images - 1);
        s.push_str(&format!("{image}:{}={}({:.2})", v.evaluator, v.verdict.label(), v.score));
    }
    s
}

/// `name=verdict(score)` for each verdict, for the `x-acc-eval` header.
pub fn summary(verdicts: &[Verdict]) -> String {
    let mut s = String::new();
    for (i, v) in verdicts.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&format!("{}={}({:.2})", v.evaluator, v.verdict.label(), v.score));
    }
    s
}
