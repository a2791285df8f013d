//! Provenance end to end (issue 15): the real gateway signs what it returns, and an
//! independent reader, the official `c2pa-python` package (scripts/c2pa-reader.sh), checks it
//! against the test's own certificate chain (generated here with rcgen). `acc provenance` on
//! signed, unsigned, tampered and foreign images; `acc check` and reload refusing bad
//! credentials; `fail_open` and `fail_closed`. Only the image provider is a mock.

mod common;

#[path = "common/certs.rs"]
mod certs;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const AI: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// A chain's PEM files in `dir`: chain.pem, key.pem, root.pem.
fn write_chain(dir: &Path, c: &certs::TestChain) {
    std::fs::write(dir.join("chain.pem"), &c.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &c.key_pem).unwrap();
    std::fs::write(dir.join("root.pem"), &c.root_pem).unwrap();
}

/// Route `main` (model "m") to the mock, with `[provenance]` signing from `keys`.
/// Signs `image` with a chain of its own named `name` (not the gateway's), as a trace `trace`
/// of route `route` from provider `provider` would be.
fn sign_elsewhere(name: &str, image: Vec<u8>, trace: &str, route: &str, provider: &str) -> acc::provenance::Signed {
    let chain = certs::chain(name);
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), &chain);
    let creds = acc::provenance::Credentials::load(
        acc::provenance::Source::File(dir.path().join("chain.pem").display().to_string()),
        acc::provenance::Source::File(dir.path().join("key.pem").display().to_string()),
    )
    .unwrap();
    let facts = acc::provenance::Facts {
        trace_id: trace.repeat(32),
        route: route.into(),
        provider: provider.into(),
        provider_kind: provider.into(),
        model: None,
        model_version: None,
        evaluations: Vec::new(),
        prompt: None,
    };
    creds.sign(&bytes::Bytes::from(image), &facts, &[]).unwrap()
}

fn policy(mock: &MockProvider, keys: &Path, extra: &str) -> String {
    format!(
        "{}{}[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\n{extra}\n",
        openai_provider("primary", mock),
        route_toml("main", "m")
            .target("primary", "gpt-image-1")
            .with("attempt_timeout_ms = 20000\ndeadline_ms = 30000"),
        keys.join("chain.pem").display(),
        keys.join("key.pem").display(),
    )
}

/// The provider's image in `format`: varied pixels, so a changed byte changes a pixel.
fn provider_image(format: image::ImageFormat) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 251) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// The independent reader's JSON for `file`, with `anchors` as its trust list.
fn reader(file: &Path, anchors: Option<&Path>) -> Value {
    let mut cmd = std::process::Command::new(repo_root().join("scripts/c2pa-reader.sh"));
    cmd.arg("read").arg(file);
    if let Some(a) = anchors {
        cmd.arg(a);
    }
    let out = cmd.output().expect("scripts/c2pa-reader.sh runs");
    assert!(out.status.success(), "c2pa reader failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reader output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `acc provenance ARGS...`.
fn acc_provenance(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = acc_command();
    cmd.arg("provenance").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("acc provenance runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn generate(gw: &Gateway, format: &str) -> Resp {
    gw.generate(&json!({"model": "m", "prompt": "a red kite over hills", "response_format": format})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_returned_image_is_signed_and_an_independent_reader_verifies_it() {
    let keys = tempfile::tempdir().unwrap();
    let chain = certs::chain("gateway");
    write_chain(keys.path(), &chain);
    let root = keys.path().join("root.pem");
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, keys.path(), ""), &[]).await;
    let out = tempfile::tempdir().unwrap();

    for (format, ext) in
        [(image::ImageFormat::Png, "png"), (image::ImageFormat::Jpeg, "jpg"), (image::ImageFormat::WebP, "webp")]
    {
        let original = provider_image(format);
        mock.answer_with(&original);
        let r = generate(&gw, "b64_json").await;
        r.assert_status(200);
        let trace_id = r.header("x-acc-trace-id").unwrap();
        let signed = b64_images(&r).remove(0);
        assert!(signed != original, "{ext}: the image came back unsigned");
        // Pixels untouched.
        let before = image::load_from_memory(&original).unwrap().to_rgb8();
        let after = image::load_from_memory(&signed).unwrap().to_rgb8();
        assert!(before == after, "{ext}: signing changed the pixels");
        let file = out.path().join(format!("signed.{ext}"));
        std::fs::write(&file, &signed).unwrap();

        let v = reader(&file, Some(&root));
        assert_eq!(v["validation_state"], "Trusted", "{ext}: {v}");
        assert_eq!(v["digital_source_type"], AI, "{ext}: {v}");
        assert_eq!(v["actions"][0], "c2pa.created", "{ext}: {v}");
        assert_eq!(v["trace"]["trace_id"], trace_id.as_str(), "{ext}: {v}");
        assert_eq!(v["trace"]["route"], "main");
        assert_eq!(v["trace"]["provider"], "primary");
        assert_eq!(v["trace"]["provider_kind"], "openai");
        assert_eq!(v["trace"]["model"], "gpt-image-1");
        assert!(v["trace"].get("prompt").is_none(), "no include_prompt: no prompt: {v}");
        assert_eq!(v["claim_generator"][0]["name"], "acc");
        assert!(v["signer"]["common_name"].as_str().unwrap_or("").contains("gateway test signer"), "{v}");
        let xmp = String::from_utf8_lossy(&signed).contains(&format!("Iptc4xmpExt:DigitalSourceType=\"{AI}\""));
        assert!(xmp, "{ext}: no IPTC digital source type in the XMP");

        // acc provenance agrees, and prints what the manifest says.
        let o = acc_provenance(&[file.to_str().unwrap(), "--trust-anchors", root.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains(&trace_id) && t.contains("route:        main") && t.contains("gpt-image-1"), "{t}");
    }

    // response_format = url: the artifact the gateway serves is the signed image.
    mock.answer_with(&provider_image(image::ImageFormat::Png));
    let r = generate(&gw, "url").await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let served = get(&url, &[]).await;
    served.assert_status(200);
    let file = out.path().join("served.png");
    std::fs::write(&file, &served.body).unwrap();
    let v = reader(&file, Some(&root));
    assert_eq!(v["validation_state"], "Trusted", "{v}");
    assert_eq!(v["trace"]["trace_id"], r.header("x-acc-trace-id").unwrap().as_str());

    // An idempotent replay gives the same signed bytes, not a second signature.
    let body = json!({"model": "m", "prompt": "replayed", "response_format": "b64_json"});
    let first = gw.generate_with(&body, &[("idempotency-key", "prov-1")]).await;
    let again = gw.generate_with(&body, &[("idempotency-key", "prov-1")]).await;
    assert_eq!(b64_images(&first), b64_images(&again));
    let hits = mock.hits();
    assert_eq!(gw.metric("acc_provenance_total", &[("route", "main"), ("result", "signed")]).await, 5.0);
    assert_eq!(mock.hits(), hits);

    // The trace record names the manifest; acc provenance --admin fetches it.
    let trace_id = first.header("x-acc-trace-id").unwrap();
    let file = out.path().join("replayed.png");
    std::fs::write(&file, &b64_images(&first)[0]).unwrap();
    let label = reader(&file, None)["label"].as_str().unwrap().to_string();
    let recorded = eventually(Duration::from_secs(20), || async {
        let r = gw.admin("GET", &format!("/admin/traces/{trace_id}")).await;
        r.status == 200 && r.json()["images"][0]["c2pa_manifest"] == label.as_str()
    })
    .await;
    assert!(recorded, "the trace record does not name manifest {label}");
    let admin = gw.admin_url("");
    let o = acc_provenance(
        &[file.to_str().unwrap(), "--json", "--admin", admin.trim_end_matches('/')],
        &[("ACC_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "valid");
    assert_eq!(v["trace_record"]["trace_id"], trace_id.as_str(), "{v}");
    // Signing six images logged nothing of the c2pa crate's progress at the default level.
    let log = gw.stderr();
    assert!(!log.contains("progress: phase"), "{}", &log[log.find("progress: phase").unwrap()..][..200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_unsigned_and_foreign_images_are_told_apart() {
    let keys = tempfile::tempdir().unwrap();
    let chain = certs::chain("gateway");
    write_chain(keys.path(), &chain);
    let root = keys.path().join("root.pem");
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, keys.path(), ""), &[]).await;
    let out = tempfile::tempdir().unwrap();
    let original = provider_image(image::ImageFormat::Png);
    mock.answer_with(&original);
    let r = generate(&gw, "b64_json").await;
    r.assert_status(200);
    let signed = b64_images(&r).remove(0);

    // One pixel byte changed: the last byte of image data before IDAT's CRC and IEND.
    let mut tampered = signed.clone();
    let at = tampered.len() - 12 - 4 - 1;
    tampered[at] ^= 0x01;
    let file = out.path().join("tampered.png");
    std::fs::write(&file, &tampered).unwrap();
    let v = reader(&file, Some(&root));
    assert_eq!(v["validation_state"], "Invalid", "{v}");
    assert!(v["failures"].as_array().unwrap().iter().any(|c| c == "assertion.dataHash.mismatch"), "{v}");
    let o = acc_provenance(&[file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("assertion.dataHash.mismatch"), "{}", text(&o));

    // The provider's image as it came: no manifest.
    let file = out.path().join("unsigned.png");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(reader(&file, None)["manifest"], false);
    let o = acc_provenance(&[file.to_str().unwrap(), "--json"], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).unwrap()["verdict"], "no_manifest");

    // An image cut short, and a file that is not there: nothing to judge (exit 2), and --json
    // still prints an object saying why.
    let file = out.path().join("cut.png");
    std::fs::write(&file, &original[..original.len() / 2]).unwrap();
    let missing = out.path().join("missing.png");
    for f in [&file, &missing] {
        let o = acc_provenance(&[f.to_str().unwrap(), "--json"], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        assert_eq!(v["file"], f.to_str().unwrap(), "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }

    // Signed by someone else's key: valid, but not under the gateway's root.
    let foreign = sign_elsewhere("other", original.clone(), "1", "elsewhere", "x");
    let file = out.path().join("foreign.png");
    std::fs::write(&file, &foreign.bytes).unwrap();
    let o = acc_provenance(&[file.to_str().unwrap(), "--trust-anchors", root.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_ne!(reader(&file, Some(&root))["validation_state"], "Trusted");
    // Without anchors, the same image is merely valid.
    assert_eq!(acc_provenance(&[file.to_str().unwrap()], &[]).status.code(), Some(0));
    // Anchors that hold no certificate are named as the fault, not the image.
    let not_anchors = out.path().join("notacert.pem");
    std::fs::write(&not_anchors, "hello\n").unwrap();
    let o = acc_provenance(&[file.to_str().unwrap(), "--trust-anchors", not_anchors.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.starts_with(&format!("acc provenance: {}: ", not_anchors.display())), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_signed_image_comes_back_with_its_manifest_as_parent() {
    let keys = tempfile::tempdir().unwrap();
    let chain = certs::chain("gateway");
    write_chain(keys.path(), &chain);
    let root = keys.path().join("root.pem");
    // The provider signs its outputs with its own chain.
    let from_provider = sign_elsewhere("provider", provider_image(image::ImageFormat::Jpeg), "2", "provider-side", "p");
    let mock = MockProvider::start().await;
    mock.answer_with(&from_provider.bytes);
    let (gw, _dir) = serve_policy(&policy(&mock, keys.path(), ""), &[]).await;
    let r = generate(&gw, "b64_json").await;
    r.assert_status(200);
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("resigned.jpg");
    std::fs::write(&file, &b64_images(&r)[0]).unwrap();
    let v = reader(&file, Some(&root));
    assert_eq!(v["parent"]["active_manifest"], from_provider.manifest.as_str(), "{v}");
    assert_eq!(v["parent"]["in_store"], true, "the provider's manifest is not kept: {v}");
    assert_eq!(v["trace"]["trace_id"], r.header("x-acc-trace-id").unwrap().as_str());
    assert_eq!(v["digital_source_type"], AI, "{v}");
    assert_ne!(v["validation_state"], "Invalid", "{v}");
    let o = acc_provenance(&[file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&from_provider.manifest), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_names_its_input_images_and_their_provenance_goes_on() {
    let keys = tempfile::tempdir().unwrap();
    let chain = certs::chain("gateway");
    write_chain(keys.path(), &chain);
    let root = keys.path().join("root.pem");
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, keys.path(), ""), &[]).await;
    // The image being edited was made (and signed) by this gateway earlier; the mask is plain.
    let first = generate(&gw, "b64_json").await;
    first.assert_status(200);
    let earlier = b64_images(&first).remove(0);
    let earlier_label = acc::provenance::read::inspect(&earlier, None).unwrap().manifest.unwrap();
    let mask = provider_image(image::ImageFormat::Png);
    let form = Form::new()
        .text("model", "m")
        .text("prompt", "make the kite blue")
        .text("response_format", "b64_json")
        .file("image", "kite.png", "image/png", earlier.clone())
        .file("mask", "mask.png", "image/png", mask);
    let r = gw.edit(&form, &[]).await;
    r.assert_status(200);
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("edited.png");
    std::fs::write(&file, &b64_images(&r)[0]).unwrap();
    let v = reader(&file, Some(&root));
    assert_eq!(v["validation_state"], "Trusted", "{v}");
    assert_eq!(v["actions"][0], "c2pa.created", "{v}");
    assert!(v["actions"].as_array().unwrap().iter().any(|a| a == "c2pa.edited"), "{v}");
    assert_eq!(v["inputs"][0]["title"], "image: kite.png", "{v}");
    assert_eq!(v["inputs"][0]["active_manifest"], earlier_label.as_str(), "{v}");
    assert_eq!(v["inputs"][0]["in_store"], true, "{v}");
    assert_eq!(v["inputs"][1]["title"], "mask: mask.png", "{v}");
    assert!(v["inputs"][1]["active_manifest"].is_null(), "{v}");
    assert_eq!(v["inputs"].as_array().unwrap().len(), 2, "{v}");
    let o = acc_provenance(&[file.to_str().unwrap()], &[]);
    assert!(
        text(&o).contains(&format!("input:        image: kite.png (its manifest {earlier_label})")),
        "{}",
        text(&o)
    );
    // A generation names no inputs.
    let plain = out.path().join("generated.png");
    std::fs::write(&plain, &earlier).unwrap();
    assert_eq!(reader(&plain, Some(&root))["inputs"], json!([]));
}

/// An X25519 PKCS#8 key: a key type C2PA cannot sign with.
const X25519_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_by_check_and_by_reload_with_the_path() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    let mock = MockProvider::start().await;
    let good = policy(&mock, keys.path(), "");

    // acc check: a missing key file, a key of another certificate, an unsupported algorithm.
    let bad = tempfile::tempdir().unwrap();
    let missing = good.replace(&keys.path().join("key.pem").display().to_string(), "/nonexistent/acc/key.pem");
    let other = certs::chain("other");
    std::fs::write(bad.path().join("other-key.pem"), &other.key_pem).unwrap();
    let mismatched = good.replace(
        &keys.path().join("key.pem").display().to_string(),
        &bad.path().join("other-key.pem").display().to_string(),
    );
    std::fs::write(bad.path().join("x25519.pem"), X25519_KEY).unwrap();
    let unsupported = good.replace(
        &keys.path().join("key.pem").display().to_string(),
        &bad.path().join("x25519.pem").display().to_string(),
    );
    for (policy_text, expect) in [
        (&missing, vec!["/nonexistent/acc/key.pem", "cannot read"]),
        (&mismatched, vec!["other-key.pem", "does not verify"]),
        (&unsupported, vec!["x25519.pem", "unsupported algorithm"]),
    ] {
        let dir = PolicyDir::with(policy_text);
        let o = acc_check(dir.path());
        assert!(!o.status.success(), "acc check accepted: {policy_text}");
        let t = text(&o);
        for e in expect {
            assert!(t.contains(e), "acc check output lacks {e:?}: {t}");
        }
        assert!(!t.contains("BEGIN"), "key material printed: {t}");
    }
    let dir = PolicyDir::with(&good);
    assert!(acc_check(dir.path()).status.success());

    // Reload: the bad edit is refused, and the old policy keeps signing.
    let gw = Gateway::start(dir.path()).await;
    mock.answer_with(&provider_image(image::ImageFormat::Png));
    generate(&gw, "b64_json").await.assert_status(200);
    dir.write("policy.toml", &missing);
    let r = gw.admin("POST", "/admin/reload").await;
    assert!(r.status >= 400, "a reload with a missing key was accepted: {}", r.describe());
    assert!(r.text().contains("/nonexistent/acc/key.pem"), "{}", r.describe());
    let after = generate(&gw, "b64_json").await;
    after.assert_status(200);
    let file = keys.path().join("after.png");
    std::fs::write(&file, &b64_images(&after)[0]).unwrap();
    assert_eq!(acc_provenance(&[file.to_str().unwrap()], &[]).status.code(), Some(0), "old policy stopped signing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_error_follows_on_provenance_error() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    let mock = MockProvider::start().await;
    // A PNG signature followed by no valid chunk: the provider sent something the signer
    // cannot parse (the route runs no evaluator to catch it first).
    let broken: Vec<u8> = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDRtruncated".to_vec();
    mock.answer_with(&broken);

    let (gw, dir) = serve_policy(&policy(&mock, keys.path(), "on_provenance_error = \"fail_open\""), &[]).await;
    let r = generate(&gw, "b64_json").await;
    r.assert_status(200);
    assert_eq!(b64_images(&r)[0], broken, "fail_open sends the provider's bytes as they were");
    assert_eq!(gw.metric("acc_provenance_total", &[("route", "main"), ("result", "unsigned")]).await, 1.0);

    dir.write("policy.toml", &policy(&mock, keys.path(), "on_provenance_error = \"fail_closed\""));
    gw.admin("POST", "/admin/reload").await.assert_status(200);
    let r = generate(&gw, "b64_json").await;
    r.assert_error(500, "provenance_failed");
    assert_eq!(gw.metric("acc_provenance_total", &[("route", "main"), ("result", "refused")]).await, 1.0);
    assert!(!r.text().contains("BEGIN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_are_never_signed() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    let primary = MockProvider::start().await;
    let cand = MockProvider::start().await;
    primary.answer_with(&provider_image(image::ImageFormat::Png));
    cand.answer_with(&provider_image(image::ImageFormat::Png));
    let text = format!(
        "{}{}{}[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\n",
        openai_provider("primary", &primary),
        openai_provider("cand", &cand),
        route_toml("main", "m")
            .target("primary", "gpt-image-1")
            .with(r#"mirror = [{ provider = "cand", model = "c", sample = 1.0, max_in_flight = 10 }]"#),
        keys.path().join("chain.pem").display(),
        keys.path().join("key.pem").display(),
    );
    let (gw, _dir) = serve_policy(&text, &[]).await;
    for _ in 0..2 {
        generate(&gw, "b64_json").await.assert_status(200);
    }
    let mirrored = eventually(Duration::from_secs(20), || async {
        cand.hits() == 2 && gw.metric("acc_mirror_requests_total", &[("route", "main")]).await == 2.0
    })
    .await;
    assert!(mirrored, "the mirror did not get both requests (hits {})", cand.hits());
    // Two answers signed; the two mirror copies were not.
    assert_eq!(gw.metric("acc_provenance_total", &[("route", "main")]).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_carries_the_signed_image() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, keys.path(), ""), &[]).await;
    let body = json!({"model": "m", "prompt": "a lighthouse", "size": "256x256", "stream": true, "partial_images": 1});
    let r = gw.generate(&body).await;
    r.assert_status(200);
    let sse = r.text();
    // The provider's events (with its unsigned bytes) are not relayed: one completed event.
    let completed: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|block| block.split_once("\ndata: ").map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()))
        .collect();
    assert_eq!(completed.len(), 1, "{sse:.300}");
    assert_eq!(completed[0]["type"], "image_generation.completed");
    // Partial images cannot be signed, so none is sent, and none is asked for (they are billed).
    assert_eq!(mock.last_body_json()["partial_images"], 0);
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("streamed.png");
    std::fs::write(&file, b64_decode(completed[0]["b64_json"].as_str().unwrap())).unwrap();
    let o = acc_provenance(&[file.to_str().unwrap(), "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trace"]["trace_id"], r.header("x-acc-trace-id").unwrap().as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_goes_in_only_where_the_route_records_it_in_full() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    let mock = MockProvider::start().await;
    mock.answer_with(&provider_image(image::ImageFormat::Png));
    let text = format!(
        "{}{}{}[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\ninclude_prompt = true\n",
        openai_provider("primary", &mock),
        route_toml("full", "f").target("primary", "gpt-image-1"),
        route_toml("hashed", "h").target("primary", "gpt-image-1").with("record_prompt = \"sha256\""),
        keys.path().join("chain.pem").display(),
        keys.path().join("key.pem").display(),
    );
    let (gw, _dir) = serve_policy(&text, &[]).await;
    let out = tempfile::tempdir().unwrap();
    for (model, expected) in [("f", Some("a secret brief")), ("h", None)] {
        let r = gw.generate(&json!({"model": model, "prompt": "a secret brief", "response_format": "b64_json"})).await;
        r.assert_status(200);
        let file = out.path().join(format!("{model}.png"));
        std::fs::write(&file, &b64_images(&r)[0]).unwrap();
        let v = reader(&file, None);
        assert_eq!(v["trace"]["prompt"].as_str(), expected, "route {model}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_held_for_review_comes_back_signed_once_approved() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    // The mock's default answer is a blank 4x4 PNG: sanity fails it, and the route holds it.
    let mock = MockProvider::start().await;
    let policy = format!(
        "{}{}[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\n",
        openai_provider("primary", &mock),
        route_toml("main", "m")
            .target("primary", "gpt-image-1")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"review\""),
        keys.path().join("chain.pem").display(),
        keys.path().join("key.pem").display(),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let r = generate(&gw, "b64_json").await;
    r.assert_error(423, "pending_review");
    let id = r.header("x-acc-trace-id").unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let approve = post_json(
        &gw.admin_url(&format!("/admin/reviews/{id}/approve")),
        &json!({"reviewer": "rita", "reason": "on brand"}),
        &[("authorization", &auth)],
    )
    .await;
    approve.assert_status(200);
    let polled = get(&gw.url(&format!("/v1/images/reviews/{id}")), &[]).await;
    polled.assert_status(200);
    let image = b64_decode(polled.json()["data"][0]["b64_json"].as_str().unwrap());
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("approved.png");
    std::fs::write(&file, &image).unwrap();
    let root = keys.path().join("root.pem");
    let o = acc_provenance(&[file.to_str().unwrap(), "--json", "--trust-anchors", root.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trace"]["trace_id"], id.as_str(), "{v:#}");
    assert_eq!(v["trace"]["route"], "main", "{v:#}");
    // The manifest records the automated verdict the image was held on.
    assert!(v.to_string().contains("sanity"), "{v:#}");
}

/// The review budget is checked with what signing adds to each image: the images held are the
/// signed ones, so an image that fits unsigned but not signed takes `review_overflow =
/// "fallback"` to the next target instead of being found too big after the attempts are over
/// (and blocked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_budget_that_fits_the_unsigned_image_only_falls_back() {
    let keys = tempfile::tempdir().unwrap();
    write_chain(keys.path(), &certs::chain("gateway"));
    // The mock's default answer is a blank 4x4 PNG: sanity fails it.
    let mock = MockProvider::start().await;
    let good = MockProvider::start().await;
    good.answer_with(&provider_image(image::ImageFormat::Png));
    let budget = mock.png().len() + 2000;
    let policy = format!(
        "{}{}{}{}[review]\nmax_bytes = {budget}\n\n[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\n",
        openai_provider("primary", &mock),
        openai_provider("backup", &good),
        route_toml("main", "m")
            .target("primary", "gpt-image-1")
            .fallback("spare")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"review\"\nreview_overflow = \"fallback\""),
        route_toml("spare", "spare").target("backup", "gpt-image-1"),
        keys.path().join("chain.pem").display(),
        keys.path().join("key.pem").display(),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let ready = eventually(Duration::from_secs(10), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "ready"
    })
    .await;
    assert!(ready, "the store did not open");
    let r = generate(&gw, "b64_json").await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["primary:eval_failed", "backup:ok"], "{}", r.describe());
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "overflow")]).await, 1.0);
}
