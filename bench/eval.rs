//! Evaluation cost per artifact, one thread: decode + sanity, NudeNet (safety), and the
//! adherence contract, on the test photos. `cargo bench --bench eval` (needs
//! scripts/setup-onnx.sh and scripts/fetch-testimages.sh). Bounded: a fixed number of runs.

use std::sync::Arc;
use std::time::Instant;

use acc::eval::{self, Evaluator};
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
            let settings = eval::Settings::default();
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
}
