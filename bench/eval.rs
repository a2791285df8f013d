//! Evaluation cost per artifact, one thread: decode + sanity, NudeNet (safety), and the
//! adherence contract, on the test photos. `cargo bench --bench eval` (needs
//! scripts/setup-onnx.sh and scripts/fetch-testimages.sh). Bounded: a fixed number of runs.

use std::sync::Arc;
use std::time::Instant;

use acc::eval::{self, ocr, Evaluator};
use acc::request::contract::Contract;

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/testimages");
    // Extra images (e.g. bench/.work/payloads/large.png, the proxy benchmark's 1.5 MB PNG) as
    // arguments: `cargo bench --bench eval -- FILE...`.
    let mut images: Vec<std::path::PathBuf> =
        ["astronaut.png", "coffee.png", "chelsea.png"].iter().map(|n| dir.join(n)).collect();
    images.extend(std::env::args().skip(1).filter(|a| !a.starts_with('-')).map(std::path::PathBuf::from));
    let all = eval::available();
    let pick = |names: &[&str]| -> Vec<Arc<dyn Evaluator>> { names.iter().map(|n| all[n].clone()).collect() };
    let contract = Contract::parse(br#"{"background": "white", "max_faces": 1, "aspect": "1:1"}"#).unwrap();
    if let Err(e) = eval::safety::Safety::new().ready() {
        eprintln!("eval bench: {e}");
        std::process::exit(1);
    }
    println!("| image | size | decode+sanity ms | + safety ms | + adherence ms | sanity + text (OCR) ms |");
    println!("|---|---|---:|---:|---:|---:|");
    for path in &images {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = match std::fs::read(path) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                eprintln!("eval bench: {}: {e} (run scripts/fetch-testimages.sh)", path.display());
                std::process::exit(1);
            }
        };
        let mut row = Vec::new();
        for set in [&["sanity"][..], &["sanity", "safety"], &["sanity", "safety", "adherence"], &["sanity", "text"]] {
            let evs = pick(set);
            // Without a text rule OCR never runs; the text column reads (and reports) anyway.
            let settings = eval::Settings { report_text: set.contains(&"text"), ..Default::default() };
            eval::evaluate(&bytes, None, &settings, Some(&contract), "a photo", &evs); // warm-up (sessions)
            let n = if bytes.len() > 1_000_000 || set.contains(&"text") { 5 } else { 30 };
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(eval::evaluate(&bytes, None, &settings, Some(&contract), "a photo", &evs));
            }
            row.push(t.elapsed().as_secs_f64() * 1000.0 / n as f64);
        }
        let d = eval::decode(&bytes).unwrap();
        println!("| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |", d.size(), row[0], row[1], row[2], row[3]);
    }
    ocr_cpu();
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat` (ns). ONNX Runtime runs
/// inference on the calling thread (one intra-op thread), so this is the evaluation's CPU.
fn thread_cpu() -> std::time::Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    std::time::Duration::from_nanos(s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The issue-11 goal: OCR (text evaluator with a rule, so it reads) on every 1024x1024 image of
/// the rendered-text set (`scripts/ocr-testimages.sh`: up to three lines), 10 runs each after a
/// warm-up; p50 and p95 of CPU ms per image on this thread.
fn ocr_cpu() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/ocr-testimages");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    // The rendered set's scenes (numbered); not the fine print below the default detector size.
    files.retain(|p| p.to_string_lossy().ends_with("-1024x1024.png") && !p.to_string_lossy().contains("fineprint"));
    files.sort();
    if files.is_empty() {
        eprintln!("eval bench: no 1024x1024 images in {} (run scripts/ocr-testimages.sh)", dir.display());
        return;
    }
    let text = eval::available()["text"].clone();
    let mut settings = eval::Settings { report_text: true, ..Default::default() };
    // `OCR_MAX_SIDE=960 cargo bench --bench eval`: the detector at another size (PaddleOCR's
    // default is 960), for a same-session comparison.
    if let Some(side) = std::env::var("OCR_MAX_SIDE").ok().and_then(|v| v.parse().ok()) {
        settings.ocr_max_side = side;
    }
    let images: Vec<bytes::Bytes> = files.iter().map(|f| bytes::Bytes::from(std::fs::read(f).unwrap())).collect();
    // The goal's measure: the text evaluator as the gateway runs it (default models: the 8-bit
    // copies when scripts/setup-onnx.sh made them).
    let evaluated = cpu_samples(&images, |bytes| {
        std::hint::black_box(eval::evaluate(bytes, None, &settings, None, "", std::slice::from_ref(&text)));
    });
    // OCR alone (the image decoded beforehand) with each pair of models, same session.
    let decoded: Vec<image::RgbImage> =
        images.iter().map(|b| image::load_from_memory(b).unwrap().into_rgb8()).collect();
    let ocr_alone = |(det, rec): (std::path::PathBuf, std::path::PathBuf)| {
        cpu_samples(&decoded, |img| {
            std::hint::black_box(ocr::read_text(&det, &rec, img, settings.ocr_max_side).unwrap());
        })
    };
    let int8 = ocr_alone(ocr::default_models());
    let fused = ocr_alone(ocr::float_models());
    let shipped = ocr_alone(ocr::shipped_models());
    println!();
    println!(
        "OCR on 1024x1024 images with up to three lines ({} images x 10 runs, one thread, ocr_max_side {}):",
        files.len(),
        settings.ocr_max_side
    );
    println!("| measure | CPU ms p50 | CPU ms p95 | goal |");
    println!("|---|---:|---:|---|");
    let row =
        |name: &str, s: &[f64], goal: &str| println!("| {name} | {:.1} | {:.1} | {goal} |", pct(s, 0.5), pct(s, 0.95));
    row("decode + sanity + text (the gateway's models)", &evaluated, "p50 <= 60, p95 <= 120");
    row("OCR alone, the gateway's models (8-bit: scripts/ocr_quantize.py)", &int8, "");
    row("OCR alone, fused float models (scripts/ocr_fuse.py)", &fused, "");
    row("OCR alone, models as shipped", &shipped, "");
}

/// CPU ms of `run` on this thread for each image: one warm-up, then 10 measured runs each.
fn cpu_samples<T>(images: &[T], mut run: impl FnMut(&T)) -> Vec<f64> {
    let mut samples = Vec::new();
    for image in images {
        run(image); // warm-up (sessions)
        for _ in 0..10 {
            let c = thread_cpu();
            run(image);
            samples.push((thread_cpu() - c).as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    samples
}

/// The `p` quantile (0..1) of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
