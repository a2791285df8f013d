//! The Rust NudeNet path agrees with the real Python package (`nudenet` 3.4.2) on the same images:
//! same classes, scores within 0.05, boxes within 4 px or 2% of the image's longer side.
//!
//! The reference outputs are tests/fixtures/nudenet/*.json, written by
//! `python3 scripts/nudenet-reference.py`. The images (scripts/fetch-testimages.sh) and the model
//! and ONNX Runtime (scripts/setup-onnx.sh) live in .cache/ and are not committed.

use std::path::{Path, PathBuf};

use acc::eval::nudenet::{self, Detection};
use acc::eval::onnx;
use sha2::{Digest, Sha256};

const SCORE_TOLERANCE: f32 = 0.05;
const BOX_TOLERANCE_PX: f32 = 4.0;
const BOX_TOLERANCE_FRACTION: f32 = 0.02;

const SETUP_HINT: &str = "run scripts/setup-onnx.sh and scripts/fetch-testimages.sh first";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(serde::Deserialize)]
struct Fixture {
    image: String,
    image_sha256: String,
    width: u32,
    height: u32,
    detections: Vec<Expected>,
}

#[derive(serde::Deserialize)]
struct Expected {
    class: String,
    score: f32,
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

fn fixtures() -> Vec<Fixture> {
    let dir = root().join("tests/fixtures/nudenet");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {} (python3 scripts/nudenet-reference.py writes them)", dir.display());
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad fixture {}: {e}", p.display()))
        })
        .collect()
}

fn load_image(f: &Fixture) -> image::RgbImage {
    let path = root().join(".cache/testimages").join(&f.image);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("test image {} is missing ({e}): {SETUP_HINT}", path.display()));
    let digest = hex::encode(Sha256::digest(&bytes));
    assert_eq!(
        digest,
        f.image_sha256,
        "{} is not the image the fixture was made from: rerun scripts/fetch-testimages.sh",
        path.display()
    );
    let img = image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_rgb8();
    assert_eq!((img.width(), img.height()), (f.width, f.height), "{}", f.image);
    img
}

fn model() -> PathBuf {
    if let Err(e) = onnx::runtime() {
        panic!("{e}\n{SETUP_HINT}");
    }
    let model = nudenet::default_model_path();
    assert!(model.is_file(), "NudeNet model not found at {}: {SETUP_HINT}", model.display());
    model
}

/// IoU of two x, y, width, height boxes.
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0]);
    let ih = (a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1]);
    let inter = iw.max(0.0) * ih.max(0.0);
    inter / (a[2] * a[3] + b[2] * b[3] - inter).max(f32::MIN_POSITIVE)
}

#[derive(Default, Debug)]
struct Worst {
    score: f32,
    box_px: f32,
    matched: usize,
}

/// Greedy matching by class, then best IoU; returns the problems found.
fn compare(f: &Fixture, got: &[Detection], worst: &mut Worst) -> Vec<String> {
    let mut problems = Vec::new();
    let tolerance = BOX_TOLERANCE_PX.max(BOX_TOLERANCE_FRACTION * f.width.max(f.height) as f32);
    let mut used = vec![false; got.len()];
    for want in &f.detections {
        let best = got
            .iter()
            .enumerate()
            .filter(|(i, d)| !used[*i] && d.class == want.class)
            .map(|(i, d)| (i, iou(&d.bbox, &want.bbox)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((i, overlap)) = best.filter(|(_, overlap)| *overlap > 0.0) else {
            problems
                .push(format!("expected {} {:.3} {:?}: not detected (got {got:?})", want.class, want.score, want.bbox));
            continue;
        };
        used[i] = true;
        let d = &got[i];
        let score_diff = (d.score - want.score).abs();
        // The package truncates box values to integers; compare against ours truncated too.
        let box_diff = d.bbox.iter().zip(&want.bbox).map(|(g, w)| (g.trunc() - w).abs()).fold(0.0, f32::max);
        worst.score = worst.score.max(score_diff);
        worst.box_px = worst.box_px.max(box_diff);
        worst.matched += 1;
        if score_diff > SCORE_TOLERANCE {
            problems.push(format!("{}: score {:.4} vs python {:.4}", want.class, d.score, want.score));
        }
        if box_diff > tolerance {
            problems.push(format!(
                "{}: box {:?} vs python {:?} (IoU {overlap:.3}, tolerance {tolerance} px)",
                want.class, d.bbox, want.bbox
            ));
        }
    }
    for (d, _) in got.iter().zip(&used).filter(|(_, u)| !**u) {
        problems.push(format!("unexpected {} {:.3} {:?}", d.class, d.score, d.bbox));
    }
    problems
}

#[test]
fn rust_nudenet_matches_the_python_package() {
    let model = model();
    let mut worst = Worst::default();
    let mut failures = Vec::new();
    let fixtures = fixtures();
    for f in &fixtures {
        let img = load_image(f);
        let got = nudenet::detect(&model, &img).unwrap_or_else(|e| panic!("{}: {e}", f.image));
        let problems = compare(f, &got, &mut worst);
        println!(
            "{}: {} (python: {})",
            f.image,
            if got.is_empty() { "none".to_string() } else { format!("{got:?}") },
            f.detections.len()
        );
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", f.image, problems.join("\n  ")));
        }
    }
    println!(
        "{} images, {} detections matched; max score diff {:.4}, max box diff {} px",
        fixtures.len(),
        worst.matched,
        worst.score,
        worst.box_px
    );
    assert!(failures.is_empty(), "NudeNet parity failures:\n{}", failures.join("\n"));
    // The fixtures must exercise both outcomes.
    assert!(fixtures.iter().any(|f| f.detections.is_empty()));
    assert!(fixtures.iter().any(|f| f.detections.iter().any(|d| d.class == "FACE_FEMALE")));
}

#[test]
fn a_missing_model_is_an_error_not_a_panic() {
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb([200, 10, 10]));
    let missing = Path::new("/nonexistent/acc-test/nudenet-320n.onnx");
    let err = nudenet::detect(missing, &img).expect_err("a missing model must be an error");
    // Either the model or (when set-up has not run) ONNX Runtime itself is named as missing.
    assert!(err.contains("not found"), "{err}");
    if onnx::runtime().is_ok() {
        assert!(err.contains("/nonexistent/acc-test/nudenet-320n.onnx"), "{err}");
    }
    // Asking again gives the same answer (no poisoned state).
    assert_eq!(nudenet::detect(missing, &img).unwrap_err(), err);
}

#[test]
fn an_empty_image_is_an_error() {
    let img = image::RgbImage::new(0, 0);
    assert!(nudenet::detect(&nudenet::default_model_path(), &img).is_err());
}
