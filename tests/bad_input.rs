//! Bad requests from clients and bad answers from providers: status, OpenAI error shape, and
//! the gateway keeps serving after each.

mod common;

use common::*;
use serde_json::{json, Value};

struct Setup {
    bad: MockProvider,
    good: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup() -> Setup {
    let bad = MockProvider::start().await;
    let good = MockProvider::start().await;
    let dir = PolicyDir::with(&format!(
        r#"default_model = "acc-demo"

[server]
max_json_body_bytes = 2048

[providers.demo]
kind = "builtin"

{}{}
[[routes]]
name = "demo"
match = {{ model = "acc-demo" }}
targets = [{{ provider = "demo", model = "acc-demo-v1" }}]

[[routes]]
name = "flaky"
match = {{ model = "flaky" }}
targets = [{{ provider = "bad", model = "x" }}]
fallbacks = ["good-route"]

[[routes]]
name = "lonely"
match = {{ model = "lonely" }}
targets = [{{ provider = "bad", model = "x" }}]

[[routes]]
name = "good-route"
match = {{ model = "good-only" }}
targets = [{{ provider = "good", model = "x" }}]
"#,
        openai_provider("bad", &bad),
        openai_provider("good", &good)
    ));
    let gw = Gateway::start(dir.path()).await;
    Setup { bad, good, gw, _dir: dir }
}

async fn still_serves(gw: &Gateway) {
    let r = gw.generate(&json!({"prompt": "still alive?", "size": "256x256", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(png_dims(&b64_images(&r)[0]), (256, 256));
}

/// A 4xx from the gateway itself: OpenAI shape, type invalid_request_error, given param/code.
fn assert_client_error(r: &Resp, status: u16, param: Option<&str>, code: &str) {
    let err = r.assert_error(status, code);
    assert_eq!(err["type"], json!("invalid_request_error"), "{}", r.describe());
    if let Some(p) = param {
        assert_eq!(err["param"], json!(p), "error.param: {}", r.describe());
    }
}

async fn post(gw: &Gateway, body: &Value) -> Resp {
    gw.generate(body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_invalid_json() {
    let s = setup().await;
    for raw in [&b"{\"prompt\": \"a cat\","[..], b"not json at all", b"{\"prompt\": \"a\" \"n\": 1}"] {
        let r = post_raw(&s.gw.url("/v1/images/generations"), raw.to_vec(), &[]).await;
        assert_client_error(&r, 400, None, "invalid_json");
        still_serves(&s.gw).await;
    }
    // A lone UTF-16 surrogate escape (as Python's json.dumps writes a str holding one): the
    // message says what is wrong, not only serde_json's "unexpected end of hex escape".
    for raw in [&br#"{"prompt": "\ud800 a cat"}"#[..], br#"{"prompt": "a cat", "user": "\udfff"}"#] {
        let r = post_raw(&s.gw.url("/v1/images/generations"), raw.to_vec(), &[]).await;
        let err = r.assert_error(400, "invalid_json");
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(msg.contains("half of a UTF-16 surrogate pair"), "{}", r.describe());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_400_naming_the_field() {
    let s = setup().await;
    let cases = [
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "a cat", "n": "two"}), "n"),
        (json!({"prompt": "a cat", "size": 1024}), "size"),
    ];
    for (body, param) in cases {
        let r = post(&s.gw, &body).await;
        assert_client_error(&r, 400, Some(param), "invalid_type");
        still_serves(&s.gw).await;
    }
    // A fractional n is refused too (as a bad type or a bad value, either way naming n).
    let r = post(&s.gw, &json!({"prompt": "a cat", "n": 1.5})).await;
    let err = r.assert_error_shape(400);
    assert_eq!(err["param"], json!("n"), "{}", r.describe());
    still_serves(&s.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_prompt_is_400() {
    let s = setup().await;
    let r = post(&s.gw, &json!({"n": 1, "size": "256x256"})).await;
    assert_client_error(&r, 400, Some("prompt"), "missing_required_parameter");
    still_serves(&s.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_out_of_range_is_400_and_bounds_work() {
    let s = setup().await;
    for n in [0, 11] {
        let r = post(&s.gw, &json!({"prompt": "a cat", "n": n})).await;
        assert_client_error(&r, 400, Some("n"), "invalid_value");
        still_serves(&s.gw).await;
    }
    let r = post(&s.gw, &json!({"prompt": "a cat", "n": 10, "size": "256x256", "response_format": "b64_json"})).await;
    assert_eq!(b64_images(&r).len(), 10, "n=10 is allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sizes_are_400() {
    let s = setup().await;
    for size in ["10x10", "banana", "255x256", "256x1793", "2048x2048", "1024x", "x1024", "1024*1024", ""] {
        let r = post(&s.gw, &json!({"prompt": "a cat", "size": size})).await;
        assert_client_error(&r, 400, Some("size"), "invalid_value");
        still_serves(&s.gw).await;
    }
    let r = post(&s.gw, &json!({"prompt": "a cat", "size": "auto", "response_format": "b64_json"})).await;
    assert_eq!(b64_images(&r).len(), 1, "size auto is allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let s = setup().await;
    // Under the 2048-byte limit: fine.
    let r = post(&s.gw, &json!({"prompt": "a".repeat(1500), "size": "256x256", "response_format": "b64_json"})).await;
    r.assert_status(200);
    // Over it.
    let r = post(&s.gw, &json!({"prompt": "a".repeat(5000), "size": "256x256"})).await;
    assert_client_error(&r, 413, None, "request_too_large");
    still_serves(&s.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404() {
    let s = setup().await;
    let r = post(&s.gw, &json!({"model": "dall-e-17", "prompt": "a cat"})).await;
    assert_client_error(&r, 404, None, "model_not_found");
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("dall-e-17"),
        "the message should name the unknown model: {}",
        r.describe()
    );
    still_serves(&s.gw).await;
}

/// A 200 from the provider whose body is useless must count as `bad_response`: next target,
/// or 502 when none is left.
async fn check_bad_upstream_body(upstream_body: &str) {
    let s = setup().await;
    s.bad.set_body(Some(upstream_body));

    let r = post(&s.gw, &json!({"model": "flaky", "prompt": "a cat", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["bad:bad_response", "good:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![s.good.png().to_vec()]);
    assert_eq!((s.bad.hits(), s.good.hits()), (1, 1));

    let r = post(&s.gw, &json!({"model": "lonely", "prompt": "a cat", "response_format": "b64_json"})).await;
    r.assert_error(502, "upstream_error");
    assert_eq!(r.attempts(), vec!["bad:bad_response"], "{}", r.describe());
    still_serves(&s.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_non_json_is_a_bad_response() {
    check_bad_upstream_body("<html><body>502 Bad Gateway (but with status 200)</body></html>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_truncated_base64_is_a_bad_response() {
    let full = b64_encode(&make_png(4, 4, [1, 2, 3]));
    assert_eq!(full.len() % 4, 0);
    // Length 1 mod 4 can never be valid base64, padded or not.
    let truncated = &full[..full.len() - 3];
    check_bad_upstream_body(&json!({"created": 1, "data": [{"b64_json": truncated}]}).to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_invalid_base64_is_a_bad_response() {
    check_bad_upstream_body(&json!({"created": 1, "data": [{"b64_json": "this is *not* base64!!"}]}).to_string()).await;
}
