//! POST /v1/images/edits and /v1/images/variations (multipart/form-data): forwarding to an
//! openai-kind provider with the client's files intact, fallback, the builtin renderer, bad
//! input, and body limits.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sha2::Digest as _;

/// Route `edit` (model "ed") -> provider `primary` (model "primary-edit-model"), falling back to
/// route `spare` -> provider `backup` (model "backup-edit-model").
fn openai_policy(primary_url: &str, backup_url: &str, server: &str) -> String {
    let timeouts = "attempt_timeout_ms = 30000\ndeadline_ms = 60000";
    format!(
        "{server}\n{}{}{}{}",
        openai_provider_at("primary", primary_url),
        openai_provider_at("backup", backup_url),
        route_toml("edit", "ed").target("primary", "primary-edit-model").fallback("spare").with(timeouts),
        route_toml("spare", "spare-only").target("backup", "backup-edit-model").with(timeouts),
    )
}

struct Setup {
    primary: MockProvider,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup_with(server: &str) -> Setup {
    let primary = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&openai_policy(&primary.base_url(), &backup.base_url(), server));
    let gw = Gateway::start(dir.path()).await;
    Setup { primary, backup, gw, _dir: dir }
}

async fn setup() -> Setup {
    setup_with("").await
}

/// A builtin-only policy: route `demo` (model "demo-edit") -> provider `demo`.
const BUILTIN_POLICY: &str = r#"
[providers.demo]
kind = "builtin"

[[routes]]
name = "demo"
match = { model = "demo-edit" }
targets = [{ provider = "demo", model = "demo" }]
"#;

fn photo() -> Vec<u8> {
    make_png(64, 48, [10, 120, 230])
}

fn mask() -> Vec<u8> {
    make_png(64, 48, [0, 0, 0])
}

/// Deterministic, incompressible-looking bytes behind a PNG signature.
fn big_blob(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&PNG_SIGNATURE);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// The only file part called `name`.
fn file_part<'a>(parts: &'a [FormPart], name: &str) -> &'a FormPart {
    let found: Vec<&FormPart> = parts.iter().filter(|p| p.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one part {name:?} expected in {:?}", names(parts));
    found[0]
}

fn names(parts: &[FormPart]) -> Vec<String> {
    parts.iter().map(|p| p.name.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// openai-kind provider
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_is_forwarded_as_multipart_with_the_same_files() {
    let s = setup().await;
    let form = Form::new()
        .text("model", "ed")
        .text("prompt", "add a red hat")
        .text("n", "2")
        .text("size", "512x512")
        .text("response_format", "b64_json")
        .text("user", "tester-1")
        .file("image", "photo.png", "image/png", photo())
        .file("mask", "the-mask.png", "image/png", mask());
    let r = s.gw.edit(&form, &[]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("edit"), "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("primary"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![s.primary.png().to_vec(); 2], "the client gets the provider's 2 images");
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0));

    let sent = s.primary.last_request().expect("primary got no request");
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/images/edits");
    let parts = sent.form().await;
    let image = file_part(&parts, "image");
    assert_eq!(image.data.as_ref(), photo().as_slice(), "image bytes changed on the way");
    assert_eq!(image.filename.as_deref(), Some("photo.png"));
    assert_eq!(image.content_type.as_deref(), Some("image/png"));
    let m = file_part(&parts, "mask");
    assert_eq!(m.data.as_ref(), mask().as_slice(), "mask bytes changed on the way");
    assert_eq!(m.filename.as_deref(), Some("the-mask.png"));
    assert_eq!(m.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        form_text(&parts, "model").as_deref(),
        Some("primary-edit-model"),
        "model must be the target's, not the alias"
    );
    assert_eq!(form_text(&parts, "response_format").as_deref(), Some("b64_json"));
    assert_eq!(form_text(&parts, "prompt").as_deref(), Some("add a red hat"));
    assert_eq!(form_text(&parts, "n").as_deref(), Some("2"));
    assert_eq!(form_text(&parts, "size").as_deref(), Some("512x512"));
    assert_eq!(form_text(&parts, "user").as_deref(), Some("tester-1"), "other fields pass through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_asking_for_urls_still_asks_the_provider_for_b64_json() {
    let s = setup().await;
    // No response_format: the client gets URLs (OpenAI's default), served by the gateway.
    let form =
        Form::new().text("model", "ed").text("prompt", "make it night").file("image", "day.png", "image/png", photo());
    let r = s.gw.edit(&form, &[]).await;
    r.assert_status(200);
    let parts = s.primary.last_request().expect("no request").form().await;
    assert_eq!(form_text(&parts, "response_format").as_deref(), Some("b64_json"), "fields: {:?}", names(&parts));
    assert_eq!(form_text(&parts, "model").as_deref(), Some("primary-edit-model"));
    let v = r.json();
    let url = v["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no data[0].url: {}", r.describe()));
    let path = url.find("/v1/images/artifacts/").map(|i| &url[i..]).unwrap_or_else(|| panic!("url {url:?}"));
    let img = get(&s.gw.url(path), &[]).await;
    img.assert_status(200);
    assert_eq!(img.body.as_ref(), s.primary.png(), "the artifact is the provider's image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_image_fields_are_all_forwarded_in_order() {
    let s = setup().await;
    let a = make_png(16, 16, [255, 0, 0]);
    let b = make_png(16, 16, [0, 255, 0]);
    let form = Form::new()
        .text("model", "ed")
        .text("prompt", "combine them")
        .text("response_format", "b64_json")
        .file("image[]", "a.png", "image/png", a.clone())
        .file("image[]", "b.png", "image/png", b.clone());
    let r = s.gw.edit(&form, &[]).await;
    assert_eq!(b64_images(&r).len(), 1);
    let parts = s.primary.last_request().expect("no request").form().await;
    let images: Vec<&FormPart> = parts.iter().filter(|p| p.name == "image[]").collect();
    assert_eq!(images.len(), 2, "both image[] files must go upstream: {:?}", names(&parts));
    assert_eq!(images[0].data.as_ref(), a.as_slice());
    assert_eq!(images[0].filename.as_deref(), Some("a.png"));
    assert_eq!(images[1].data.as_ref(), b.as_slice());
    assert_eq!(images[1].filename.as_deref(), Some("b.png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variation_is_forwarded_without_a_prompt() {
    let s = setup().await;
    let img = make_png(32, 32, [90, 30, 200]);
    let form = Form::new()
        .text("model", "ed")
        .text("n", "3")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .file("image", "seed-image.png", "image/png", img.clone());
    let r = s.gw.variation(&form, &[]).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![s.primary.png().to_vec(); 3]);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("primary"), "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0));

    let sent = s.primary.last_request().expect("no request");
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/images/variations");
    let parts = sent.form().await;
    let image = file_part(&parts, "image");
    assert_eq!(image.data.as_ref(), img.as_slice());
    assert_eq!(image.filename.as_deref(), Some("seed-image.png"));
    assert_eq!(image.content_type.as_deref(), Some("image/png"));
    assert_eq!(form_text(&parts, "model").as_deref(), Some("primary-edit-model"));
    assert_eq!(form_text(&parts, "response_format").as_deref(), Some("b64_json"));
    assert_eq!(form_text(&parts, "n").as_deref(), Some("3"));
    assert_eq!(form_text(&parts, "size").as_deref(), Some("256x256"));
    assert_eq!(form_text(&parts, "prompt"), None, "a variation sends no prompt: {:?}", names(&parts));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_edit_provider_falls_back_to_the_next() {
    let s = setup().await;
    s.primary.set_status(503);
    let form = Form::new()
        .text("model", "ed")
        .text("prompt", "add snow")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo())
        .file("mask", "mask.png", "image/png", mask());
    let before = s.gw.metrics().await;
    let r = s.gw.edit(&form, &[]).await;
    r.assert_status(200);
    assert_eq!(s.primary.hits(), 1, "primary must be tried exactly once");
    assert_eq!(s.backup.hits(), 1, "backup must be tried exactly once");
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()]);

    // The retry carries the same files, and the backup's own model.
    for (mock, model) in [(&s.primary, "primary-edit-model"), (&s.backup, "backup-edit-model")] {
        let sent = mock.last_request().expect("no request");
        assert_eq!(sent.path, "/v1/images/edits");
        let parts = sent.form().await;
        assert_eq!(file_part(&parts, "image").data.as_ref(), photo().as_slice());
        assert_eq!(file_part(&parts, "mask").data.as_ref(), mask().as_slice());
        assert_eq!(form_text(&parts, "model").as_deref(), Some(model));
        assert_eq!(form_text(&parts, "prompt").as_deref(), Some("add snow"));
    }
    let after = s.gw.metrics().await;
    let d = |name: &str, labels: &[(&str, &str)]| metric_sum(&after, name, labels) - metric_sum(&before, name, labels);
    assert_eq!(d("acc_fallbacks_total", &[]), 1.0, "acc_fallbacks_total must grow by 1:\n{after}");

    // Variations fall back the same way.
    let form = Form::new().text("model", "ed").text("response_format", "b64_json").file(
        "image",
        "photo.png",
        "image/png",
        photo(),
    );
    let r = s.gw.variation(&form, &[]).await;
    r.assert_status(200);
    assert_eq!((s.primary.hits(), s.backup.hits()), (2, 2));
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:ok"], "{}", r.describe());
    assert_eq!(s.backup.last_request().unwrap().path, "/v1/images/variations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_provider_4xx_is_returned_not_retried() {
    let s = setup().await;
    let body = r#"{"error":{"message":"mask and image differ in size","type":"invalid_request_error","param":"mask","code":"invalid_mask"}}"#;
    s.primary.set_error(400, body);
    let form = Form::new()
        .text("model", "ed")
        .text("prompt", "x")
        .file("image", "photo.png", "image/png", photo())
        .file("mask", "mask.png", "image/png", make_png(8, 8, [0, 0, 0]));
    let r = s.gw.edit(&form, &[]).await;
    let err = r.assert_error(400, "invalid_mask");
    assert_eq!(err["param"], json!("mask"), "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0), "a 4xx must not be retried");
}

// ---------------------------------------------------------------------------------------------
// builtin provider
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_edits_honour_size_and_depend_on_the_input_image() {
    let dir = PolicyDir::with(BUILTIN_POLICY);
    let gw = Gateway::start(dir.path()).await;
    let edit = |image: Vec<u8>, size: &str| {
        Form::new()
            .text("model", "demo-edit")
            .text("prompt", "a lighthouse")
            .text("size", size)
            .text("seed", "5")
            .text("response_format", "b64_json")
            .file("image", "in.png", "image/png", image)
    };
    let red = make_png(20, 20, [255, 0, 0]);
    let blue = make_png(20, 20, [0, 0, 255]);

    let r = gw.edit(&edit(red.clone(), "256x512"), &[]).await;
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("demo"), "{}", r.describe());
    let red_out = b64_one(&r);
    assert_eq!(png_dims(&red_out), (256, 512), "size must be honoured");
    for (size, dims) in [("512x256", (512, 256)), ("256x256", (256, 256))] {
        let r = gw.edit(&edit(red.clone(), size), &[]).await;
        assert_eq!(png_dims(&b64_one(&r)), dims, "size {size}");
    }

    let again = b64_one(&gw.edit(&edit(red.clone(), "256x512"), &[]).await);
    assert_eq!(again, red_out, "same image + prompt + seed + size must give the same PNG");
    let blue_out = b64_one(&gw.edit(&edit(blue.clone(), "256x512"), &[]).await);
    assert_eq!(png_dims(&blue_out), (256, 512));
    assert_ne!(blue_out, red_out, "a different input image must give a different output");

    // Variations: no prompt, size honoured, input-dependent.
    let variation = |image: Vec<u8>| {
        Form::new().text("model", "demo-edit").text("size", "256x384").text("response_format", "b64_json").file(
            "image",
            "in.png",
            "image/png",
            image,
        )
    };
    let v_red = b64_one(&gw.variation(&variation(red), &[]).await);
    let v_blue = b64_one(&gw.variation(&variation(blue), &[]).await);
    assert_eq!(png_dims(&v_red), (256, 384));
    assert_eq!(png_dims(&v_blue), (256, 384));
    assert_ne!(v_red, v_blue, "a different input image must give a different variation");
}

// ---------------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_multipart_requests_are_rejected_with_openai_errors() {
    let s = setup().await;
    for endpoint in ["/v1/images/edits", "/v1/images/variations"] {
        let url = s.gw.url(endpoint);

        // Not multipart at all.
        let r = post_json(&url, &json!({"model": "ed", "prompt": "x", "image": "aGVsbG8="}), &[]).await;
        r.assert_error(400, "invalid_content_type");
        let r = send("POST", &url, &[("content-type", "text/plain")], b"image=1".to_vec()).await;
        r.assert_error(400, "invalid_content_type");
        let r = send("POST", &url, &[], b"image=1".to_vec()).await;
        r.assert_error(400, "invalid_content_type");

        // Multipart without a boundary parameter.
        let r = send("POST", &url, &[("content-type", "multipart/form-data")], b"--x\r\n".to_vec()).await;
        assert_eq!(r.status, 400, "{endpoint}: multipart without boundary: {}", r.describe());

        // No image.
        let r = post_form(&url, &Form::new().text("model", "ed").text("prompt", "x"), &[]).await;
        let err = r.assert_error(400, "missing_required_parameter");
        assert_eq!(err["param"], json!("image"), "{endpoint}: {}", r.describe());
        // A mask is not an image.
        let form = Form::new().text("model", "ed").text("prompt", "x").file("mask", "m.png", "image/png", mask());
        let err = post_form(&url, &form, &[]).await.assert_error(400, "missing_required_parameter");
        assert_eq!(err["param"], json!("image"), "{endpoint}");

        // Malformed multipart.
        let r = send(
            "POST",
            &url,
            &[("content-type", "multipart/form-data; boundary=XyZ")],
            b"this is not a multipart body at all".to_vec(),
        )
        .await;
        r.assert_error(400, "invalid_multipart");
        // Truncated: the closing boundary never comes.
        let (ct, body) =
            Form::new().text("model", "ed").text("prompt", "x").file("image", "a.png", "image/png", photo()).encode();
        let cut = body[..body.len() / 2].to_vec();
        let r = send("POST", &url, &[("content-type", &ct)], cut).await;
        r.assert_error(400, "invalid_multipart");
    }

    // An edit needs a prompt; a variation does not.
    let form = Form::new().text("model", "ed").file("image", "a.png", "image/png", photo());
    let r = s.gw.edit(&form, &[]).await;
    let err = r.assert_error_shape(400);
    assert_eq!(err["param"], json!("prompt"), "{}", r.describe());
    assert_eq!(err["code"], json!("missing_required_parameter"), "{}", r.describe());

    // Field values are checked like JSON ones.
    let form = |k: &str, v: &str| {
        Form::new().text("model", "ed").text("prompt", "x").text(k, v).file("image", "a.png", "image/png", photo())
    };
    for (k, v) in [("n", "0"), ("n", "11"), ("size", "10x10")] {
        let r = s.gw.edit(&form(k, v), &[]).await;
        let err = r.assert_error(400, "invalid_value");
        assert_eq!(err["param"], json!(k), "{k}={v}: {}", r.describe());
    }

    assert_eq!((s.primary.hits(), s.backup.hits()), (0, 0), "no bad request may reach a provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_alias_on_edit_is_404() {
    let s = setup().await;
    let form =
        Form::new().text("model", "no-such-alias").text("prompt", "x").file("image", "a.png", "image/png", photo());
    s.gw.edit(&form, &[]).await.assert_error(404, "model_not_found");
    assert_eq!(s.primary.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// body limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_body_over_the_configured_limit_is_413_while_json_still_works() {
    let s = setup_with("[server]\nmax_multipart_body_bytes = 65536\n").await;
    let big = big_blob(200 * 1024);
    let form = Form::new().text("model", "ed").text("prompt", "x").file("image", "big.png", "image/png", big.clone());
    let r = s.gw.edit(&form, &[]).await;
    r.assert_error(413, "request_too_large");
    let form = Form::new().text("model", "ed").file("image", "big.png", "image/png", big);
    s.gw.variation(&form, &[]).await.assert_error(413, "request_too_large");
    assert_eq!(s.primary.hits(), 0, "an oversized body must not reach a provider");

    // A small edit under the limit is fine.
    let form = Form::new().text("model", "ed").text("prompt", "x").text("response_format", "b64_json").file(
        "image",
        "small.png",
        "image/png",
        photo(),
    );
    assert_eq!(b64_images(&s.gw.edit(&form, &[]).await).len(), 1);

    // The JSON limit is separate: a 100 KiB JSON generation (over the multipart limit) works.
    let r =
        s.gw.generate(&json!({
            "model": "ed",
            "prompt": "a JSON generation",
            "response_format": "b64_json",
            "note": "z".repeat(100 * 1024),
        }))
        .await;
    assert_eq!(b64_images(&r), vec![s.primary.png().to_vec()]);
    let last = s.primary.last_request().unwrap();
    assert_eq!(last.path, "/v1/images/generations");
    assert_eq!(s.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_image_reaches_the_provider_intact() {
    let s = setup().await;
    let big = big_blob(20 * 1024 * 1024);
    let want = sha256_bytes(&big);
    let form = Form::new().text("model", "ed").text("prompt", "upscale").text("response_format", "b64_json").file(
        "image",
        "huge.png",
        "image/png",
        big,
    );
    let r = tokio::time::timeout(Duration::from_secs(120), s.gw.edit(&form, &[]))
        .await
        .expect("a 20 MiB edit took over 120 s");
    assert_eq!(b64_images(&r), vec![s.primary.png().to_vec()], "{}", r.describe());
    assert_eq!(s.primary.hits(), 1);
    let parts = s.primary.last_request().unwrap().form().await;
    let image = file_part(&parts, "image");
    assert_eq!(image.data.len(), 20 * 1024 * 1024, "length of the image the provider received");
    assert_eq!(sha256_bytes(&image.data), want, "sha256 of the image the provider received");
    assert_eq!(image.filename.as_deref(), Some("huge.png"));
}

/// The SDKs draw a new multipart boundary for every send (their own retries included): the same
/// edit or variation under the same `Idempotency-Key` is the same request, replayed without a
/// second generation; another image under that key is a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_edit_or_variation_resent_under_another_boundary_is_replayed() {
    let s = setup().await;
    let edit = Form::new()
        .text("model", "ed")
        .text("prompt", "add a red hat")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo());
    let key = [("idempotency-key", "edit-1")];
    let first = s.gw.edit(&edit.clone().with_boundary("----sdk-boundary-1"), &key).await;
    first.assert_status(200);
    let again = s.gw.edit(&edit.clone().with_boundary("----sdk-boundary-2"), &key).await;
    again.assert_status(200);
    assert_eq!(again.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", again.describe());
    assert_eq!(again.header("x-acc-trace-id"), first.header("x-acc-trace-id"));
    assert_eq!(s.primary.hits(), 1, "a second generation for the same edit");
    // The same key with another image: another request.
    let other = Form::new()
        .text("model", "ed")
        .text("prompt", "add a red hat")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", make_png(64, 48, [200, 10, 10]))
        .with_boundary("----sdk-boundary-3");
    let r = s.gw.edit(&other, &key).await;
    r.assert_error(409, "idempotency_key_reused");
    assert_eq!(s.primary.hits(), 1);

    let variation = Form::new().text("model", "ed").text("response_format", "b64_json").file(
        "image",
        "photo.png",
        "image/png",
        photo(),
    );
    let key = [("idempotency-key", "variation-1")];
    s.gw.variation(&variation.clone().with_boundary("a"), &key).await.assert_status(200);
    let again = s.gw.variation(&variation.with_boundary("b"), &key).await;
    again.assert_status(200);
    assert_eq!(again.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", again.describe());
    assert_eq!(s.primary.hits(), 2);
}

/// A file parameter the gateway does not model (the Python SDK's `markup`, any other) goes to
/// an OpenAI-compatible provider as the file it came as; a text field named `image` or `mask`
/// is no file and is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_file_parts_are_forwarded_as_files_and_a_text_image_is_refused() {
    let s = setup().await;
    let binary = make_png(8, 8, [1, 2, 3]);
    let form = Form::new()
        .text("model", "ed")
        .text("prompt", "follow the markup")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo())
        .file("markup", "scribble.png", "image/png", binary.clone());
    let r = s.gw.edit(&form, &[]).await;
    r.assert_status(200);
    let parts = s.primary.last_request().unwrap().form().await;
    let markup = file_part(&parts, "markup");
    assert_eq!(markup.data.as_ref(), binary.as_slice());
    assert_eq!(markup.filename.as_deref(), Some("scribble.png"));
    assert_eq!(markup.content_type.as_deref(), Some("image/png"));
    assert_eq!(file_part(&parts, "image").data.as_ref(), photo().as_slice());

    for field in ["image", "mask"] {
        let mut form = Form::new().text("model", "ed").text("prompt", "p").text(field, "abc");
        if field == "mask" {
            form = form.file("image", "photo.png", "image/png", photo());
        }
        let form = form.file("dummy", "dummy.png", "image/png", photo());
        let r = s.gw.edit(&form, &[]).await;
        r.assert_error(400, "invalid_value");
        assert_eq!(r.json()["error"]["param"], field, "{}", r.describe());
    }
    assert_eq!(s.primary.hits(), 1);
}
