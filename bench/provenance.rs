//! Signing cost per image (issue 15's goal: at most 5 ms CPU per 1.5 MB 1024x1024 PNG): XMP
//! added and a C2PA manifest made and embedded, ES256 on one thread, as the gateway's `sign`
//! phase does it. `cargo bench --bench provenance` (a generated 1024x1024 PNG of about 1.5 MB:
//! a gradient with noise, like the proxy benchmark's payload); `-- FILE...` signs those files
//! instead. Bounded: 100 runs per image after 3 warm-ups; CPU is the thread's own time, whose accounting moves in scheduler ticks, so its mean over the runs is the figure to read, not a single run. The chain is made fresh with rcgen.

use std::time::Instant;

use acc::provenance::{Credentials, Evaluation, Facts, Source};

#[allow(dead_code)]
mod certs {
    include!("../tests/common/certs.rs");
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat` (ns).
fn thread_cpu() -> std::time::Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    std::time::Duration::from_nanos(s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// A 1024x1024 RGB PNG of about 1.5 MB: a gradient plus 4 bits of noise per channel.
fn payload() -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(15);
    let img = image::RgbImage::from_fn(1024, 1024, |x, y| {
        let n = |rng: &mut fastrand::Rng| rng.u8(0..6);
        image::Rgb([(x / 4) as u8 ^ n(&mut rng), (y / 4) as u8 ^ n(&mut rng), ((x + y) / 8) as u8 ^ n(&mut rng)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let chain = certs::chain("bench");
    std::fs::write(dir.path().join("chain.pem"), &chain.chain_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &chain.key_pem).unwrap();
    let creds = Credentials::load(
        Source::File(dir.path().join("chain.pem").display().to_string()),
        Source::File(dir.path().join("key.pem").display().to_string()),
    )
    .unwrap();
    let facts = Facts {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        route: "bench".into(),
        provider: "primary".into(),
        provider_kind: "openai".into(),
        model: Some("gpt-image-1".into()),
        model_version: None,
        evaluations: vec![
            Evaluation { evaluator: "sanity".into(), verdict: "pass".into(), score: 1.0 },
            Evaluation { evaluator: "safety".into(), verdict: "pass".into(), score: 0.97 },
        ],
        prompt: None,
    };
    let files: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let images: Vec<(String, bytes::Bytes)> = if files.is_empty() {
        vec![("generated 1024x1024 PNG".into(), payload().into())]
    } else {
        files.iter().map(|f| (f.clone(), std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}")).into())).collect()
    };
    println!("| image | bytes | signed bytes | CPU ms mean | wall ms p50 | wall ms p95 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, bytes) in &images {
        for _ in 0..3 {
            std::hint::black_box(creds.sign(bytes, &facts, &[]).unwrap());
        }
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        let mut signed_len = 0;
        for _ in 0..100 {
            let (c, w) = (thread_cpu(), Instant::now());
            let s = creds.sign(bytes, &facts, &[]).unwrap();
            wall.push(w.elapsed().as_secs_f64() * 1e3);
            cpu.push((thread_cpu() - c).as_secs_f64() * 1e3);
            signed_len = s.bytes.len();
            std::hint::black_box(s);
        }
        let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
        wall.sort_by(f64::total_cmp);
        println!(
            "| {name} | {} | {signed_len} | {mean:.2} | {:.2} | {:.2} |",
            bytes.len(),
            wall[wall.len() / 2],
            wall[wall.len() * 95 / 100]
        );
    }
}
