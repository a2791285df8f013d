//! OCR reads rendered text in several fonts, sizes and colours with at least 95% character
//! accuracy (1 - total edit distance / total expected characters, over every image's lines
//! joined by spaces).
//!
//! The images and their expected strings (.cache/ocr-testimages/, with manifest.json) are made
//! by `scripts/ocr-testimages.sh` (DejaVu fonts from the matplotlib wheel, rendered with Pillow);
//! the models and ONNX Runtime by `scripts/setup-onnx.sh`. Nothing of it is committed. When they
//! are missing this test fails and says which script to run.

use std::path::PathBuf;
use std::time::Instant;

use acc::eval::ocr;

const MIN_ACCURACY: f64 = 0.95;
const SETUP_HINT: &str = "run scripts/setup-onnx.sh and scripts/ocr-testimages.sh first";

#[derive(serde::Deserialize)]
struct Manifest {
    images: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    file: String,
    lines: Vec<String>,
}

fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/ocr-testimages")
}

/// The rendered set's manifest.json in `dir`; panics with the set-up hint when it is missing.
fn manifest(dir: &std::path::Path) -> Manifest {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {} ({e}): {SETUP_HINT}", path.display()));
    serde_json::from_slice(&bytes).expect("manifest.json does not parse")
}

/// Reads every image of the rendered set with `det` and `rec` at `max_side`, checking that each
/// reading is near its expected text; returns (edits, expected characters).
fn read_set(det: &std::path::Path, rec: &std::path::Path, max_side: u32, label: &str) -> (usize, usize) {
    let dir = images_dir();
    let manifest = manifest(&dir);
    assert!(!manifest.images.is_empty(), "{} lists no images", dir.join("manifest.json").display());
    for m in [det, rec] {
        assert!(m.is_file(), "OCR model {} is missing: {SETUP_HINT}", m.display());
    }
    let (mut edits, mut chars) = (0usize, 0usize);
    let mut times = Vec::new();
    for case in &manifest.images {
        let path = dir.join(&case.file);
        let img = image::open(&path).unwrap_or_else(|e| panic!("cannot open {} ({e}): {SETUP_HINT}", path.display()));
        let img = img.into_rgb8();
        let start = Instant::now();
        let lines =
            ocr::read_text(det, rec, &img, max_side).unwrap_or_else(|e| panic!("{}: {e} ({SETUP_HINT})", case.file));
        let elapsed = start.elapsed();
        // The first image also pays for loading the models.
        times.push(elapsed.as_secs_f64());
        let expected = case.lines.join(" ");
        let got = lines.iter().map(|l| l.text.trim()).collect::<Vec<_>>().join(" ");
        let d = ocr::edit_distance(&expected, &got);
        edits += d;
        chars += expected.chars().count();
        println!(
            "{label} {:<32} {:>6.1} ms  edits {d:>2}  expected {expected:?}  got {got:?}  conf [{}]",
            case.file,
            elapsed.as_secs_f64() * 1e3,
            lines.iter().map(|l| format!("{:.2}", l.confidence)).collect::<Vec<_>>().join(", ")
        );
        assert!(
            ocr::fuzzy_contains(&got, &expected, 5),
            "{label} {}: read {got:?}, far from the expected {expected:?}",
            case.file
        );
    }
    let accuracy = 1.0 - edits as f64 / chars as f64;
    let warm = &times[1.min(times.len() - 1)..];
    let mean_ms = warm.iter().sum::<f64>() / warm.len() as f64 * 1e3;
    println!(
        "{label}: character accuracy {:.2}% ({edits} edits over {chars} characters, {} images); mean {mean_ms:.1} ms per image after the first (first {:.1} ms, with model loading)",
        accuracy * 100.0,
        manifest.images.len(),
        times[0] * 1e3
    );
    (edits, chars)
}

#[test]
fn ocr_reads_rendered_text() {
    let (det, rec) = ocr::default_models();
    let (edits, chars) = read_set(&det, &rec, ocr::DET_MAX_SIDE, "default");
    let accuracy = 1.0 - edits as f64 / chars as f64;
    assert!(
        accuracy >= MIN_ACCURACY,
        "character accuracy {:.2}% is below {:.0}%",
        accuracy * 100.0,
        MIN_ACCURACY * 100.0
    );
}

/// The gateway reads with the 8-bit copies `scripts/setup-onnx.sh` writes
/// (`scripts/ocr_quantize.py`), and they read the rendered set, whose fonts their calibration
/// never saw, as accurately as the float models: at most 0.5% fewer characters right, at the
/// default detector size and at PaddleOCR's 960.
#[test]
fn int8_models_read_as_accurately_as_the_float_ones() {
    let (det, rec) = ocr::default_models();
    assert_eq!(det.file_name().unwrap(), ocr::DET_INT8_FILE, "the 8-bit detector is missing: {SETUP_HINT}");
    assert_eq!(rec.file_name().unwrap(), ocr::REC_INT8_FILE, "the 8-bit recogniser is missing: {SETUP_HINT}");
    let (float_det, float_rec) = ocr::float_models();
    assert_eq!(float_det.file_name().unwrap(), ocr::DET_FUSED_FILE);
    for side in [ocr::DET_MAX_SIDE, 960] {
        let (int8_edits, chars) = read_set(&det, &rec, side, &format!("int8 at {side}"));
        let (float_edits, _) = read_set(&float_det, &float_rec, side, &format!("float at {side}"));
        let (int8, float) = (1.0 - int8_edits as f64 / chars as f64, 1.0 - float_edits as f64 / chars as f64);
        assert!(
            int8 >= float - 0.005,
            "at {side}: the 8-bit models read {:.2}% of characters right, the float ones {:.2}%",
            int8 * 100.0,
            float * 100.0
        );
    }
}

/// `scripts/setup-onnx.sh` writes fused copies of both OCR models (`scripts/ocr_fuse.py`), the
/// gateway reads with them at `ACC_OCR_PRECISION=float`, and they read every rendered image exactly as the models as shipped
/// do: the same lines and text, boxes within a few pixels, confidences within rounding.
#[test]
fn fused_models_read_like_the_shipped_ones() {
    let dir = images_dir();
    let manifest = manifest(&dir);
    let (det, rec) = ocr::float_models();
    let (shipped_det, shipped_rec) = ocr::shipped_models();
    assert_eq!(det.file_name().unwrap(), ocr::DET_FUSED_FILE, "the fused detector is missing: {SETUP_HINT}");
    assert_eq!(rec.file_name().unwrap(), ocr::REC_FUSED_FILE, "the fused recogniser is missing: {SETUP_HINT}");
    for (fused, shipped) in [(&det, &shipped_det), (&rec, &shipped_rec)] {
        assert_ne!(
            std::fs::read(fused).unwrap(),
            std::fs::read(shipped).unwrap(),
            "{} is a plain copy of {}",
            fused.display(),
            shipped.display()
        );
    }
    let mut lines_seen = 0;
    for case in &manifest.images {
        let path = dir.join(&case.file);
        let img = image::open(&path).unwrap_or_else(|e| panic!("cannot open {} ({e}): {SETUP_HINT}", path.display()));
        let img = img.into_rgb8();
        for side in [ocr::DET_MAX_SIDE, 960] {
            let got = ocr::read_text(&det, &rec, &img, side).unwrap();
            let want = ocr::read_text(&shipped_det, &shipped_rec, &img, side).unwrap();
            assert_eq!(got.len(), want.len(), "{} at {side}: {got:?} against {want:?}", case.file);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.text, w.text, "{} at {side}", case.file);
                // A map pixel on the threshold may fall the other way after rounding: a few pixels.
                let moved = g.bbox.iter().zip(&w.bbox).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    moved <= 4.0,
                    "{} at {side}: {:?} boxed at {:?} against {:?}",
                    case.file,
                    g.text,
                    g.bbox,
                    w.bbox
                );
                assert!(
                    (g.confidence - w.confidence).abs() < 1e-3,
                    "{} at {side}: {:?} read at {} against {}",
                    case.file,
                    g.text,
                    g.confidence,
                    w.confidence
                );
            }
            lines_seen += got.len();
        }
    }
    assert!(lines_seen >= manifest.images.len(), "only {lines_seen} lines read in {} images", manifest.images.len());
}
