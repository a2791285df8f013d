//! Every input in the fuzz corpora (`tests/fuzz/corpus/TARGET/`: the seeds, and each input a
//! fuzzer found to crash, added there when fixed) replayed through the same parsers as the
//! fuzz targets (`tests/fuzz/fuzz_targets/`), in the normal test run: each must return, never
//! panic. `scripts/fuzz.sh` runs the fuzzers themselves.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} has no inputs", dir.display());
    out
}

#[test]
fn request_json() {
    for (_, data) in inputs("request_json") {
        let _ = acc::request::GenerationRequest::from_json(&data);
    }
}

#[tokio::test]
async fn request_multipart() {
    use acc::request::{GenerationRequest, Operation};
    for (_, data) in inputs("request_multipart") {
        let Some((&op, body)) = data.split_first() else { continue };
        let op = if op % 2 == 0 { Operation::Edit } else { Operation::Variation };
        let _ = GenerationRequest::from_multipart(op, bytes::Bytes::copy_from_slice(body), "BOUNDARY").await;
    }
}

#[test]
fn provider_answers() {
    for (_, data) in inputs("provider_answers") {
        if data.len() >= 2 {
            let status = u16::from_be_bytes([data[0], data[1]]) % 600;
            acc::providers::parse_untrusted(status, &bytes::Bytes::copy_from_slice(&data[2..]));
        }
    }
}

#[test]
fn contract() {
    for (_, data) in inputs("contract") {
        let _ = acc::request::contract::Contract::parse(&data);
    }
}

#[test]
fn policy() {
    for (path, data) in inputs("policy") {
        let Ok(text) = String::from_utf8(data) else { continue };
        let sources = acc::policy::Sources { files: vec![(path.display().to_string(), text)] };
        let _ = acc::policy::validate(&sources);
    }
}

#[tokio::test]
async fn fetch_url() {
    for (_, data) in inputs("fetch_url") {
        let Ok(text) = std::str::from_utf8(&data) else { continue };
        let (url, location) = text.split_once('\n').unwrap_or((text, "/"));
        if url.starts_with("data:") {
            let _ = acc::fetch::fetch(url, &Default::default()).await;
            continue;
        }
        let Ok(uri) = url.parse::<http::Uri>() else { continue };
        if let Some(ip) = uri.host().and_then(|h| h.trim_start_matches('[').trim_end_matches(']').parse().ok()) {
            let _ = acc::fetch::is_public(ip);
        }
        let _ = acc::fetch::join(&uri, location);
        let _ = acc::upstream::Endpoint::parse(url);
    }
}

#[test]
fn image_header() {
    for (_, data) in inputs("image_header") {
        let _ = acc::eval::header_size(&data);
        let _ = acc::providers::sniff_image(&data);
        let _ = acc::eval::decode(&data);
    }
}
