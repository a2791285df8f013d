//! `kind = "stability"` end to end: the real binary against a mock of Stability AI's v2beta
//! Stable Image generate endpoints that checks what Stability documents (endpoint per model,
//! bearer key, `accept`, multipart fields and their allowed values) and answers the way the API
//! does: `{"image","finish_reason","seed"}` JSON, or raw image bytes with `finish-reason` and
//! `seed` headers, `{"id","name","errors"}` error bodies, 403 content_moderation, 429.

mod common;

use common::mock::stability::{stability_error, StableImage, FIRST_RANDOM_SEED};
use common::*;
use serde_json::json;

const KEY: &str = "sk-stability-test-91";

/// `stability` for the aliases "core", "ultra" and "large", falling back to `backup`.
fn policy(mock: &Mock<StableImage>, backup: &MockProvider) -> String {
    let route = |name: &str, model: &str| {
        route_toml(name, name)
            .target("stability", model)
            .fallback("spare")
            .with("attempt_timeout_ms = 20000\ndeadline_ms = 40000")
    };
    format!(
        r#"[providers.stability]
kind = "stability"
base_url = "{}"
api_key_env = "ACC_TEST_STABILITY_KEY"
price = {{ per_image_usd = 0.03, models = {{ "ultra" = {{ per_image_usd = 0.08 }} }} }}
breaker = {{ enabled = false }}

{}{}{}{}{}"#,
        mock.base_url(),
        openai_provider_at("backup", &backup.base_url()),
        route("core", "core"),
        route("ultra", "ultra"),
        route("large", "sd3.5-large"),
        route_toml("spare", "spare-only").target("backup", "backup-model"),
    )
}

struct Setup {
    mock: Mock<StableImage>,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup() -> Setup {
    let mock = Mock::builder(StableImage::default())
        .png(make_png(6, 6, [250, 180, 20]))
        .credential("authorization", [format!("Bearer {KEY}")])
        .start()
        .await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&policy(&mock, &backup));
    let gw = Gateway::start_with_env(dir.path(), &[("ACC_TEST_STABILITY_KEY", KEY)]).await;
    Setup { mock, backup, gw, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_images_are_n_multipart_calls_with_the_mapped_fields() {
    let s = setup().await;
    let r =
        s.gw.generate(&json!({
            "model": "core", "prompt": "a koi pond at dawn", "n": 2, "size": "1024x1792",
            "seed": 100, "negative_prompt": "text, watermark", "style": "natural",
            "steps": 40, "sampler": "DPM++ 2M", "response_format": "b64_json",
        }))
        .await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![s.mock.png(), s.mock.png()], "{}", r.describe());
    assert_eq!(r.attempts(), vec!["stability:ok"], "{}", r.describe());
    assert_eq!(s.mock.hits(), 2, "one call per image");
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("steps, sampler"), "{}", r.describe());
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.starts_with("seed=100;"), "x-acc-generation: {generation}");
    assert!(generation.contains("model=core"), "x-acc-generation: {generation}");
    assert!(!generation.contains("steps") && !generation.contains("sampler"), "x-acc-generation: {generation}");
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.06"), "2 images at 0.03: {}", r.describe());

    let mut seeds = Vec::new();
    for c in s.mock.requests() {
        assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", "/v2beta/stable-image/generate/core"));
        assert_eq!(c.header("authorization"), Some(format!("Bearer {KEY}")));
        assert_eq!(c.header("accept").as_deref(), Some("application/json"));
        let form = c.form().await;
        assert_eq!(form_text(&form, "prompt").as_deref(), Some("a koi pond at dawn"));
        assert_eq!(form_text(&form, "negative_prompt").as_deref(), Some("text, watermark"));
        assert_eq!(form_text(&form, "aspect_ratio").as_deref(), Some("9:16"), "1024x1792 is nearest 9:16");
        assert_eq!(form_text(&form, "output_format").as_deref(), Some("png"));
        assert_eq!(form_text(&form, "style_preset").as_deref(), Some("photographic"), "natural maps to photographic");
        assert_eq!(form_text(&form, "model"), None, "core takes no model field");
        for dropped in ["steps", "sampler", "n", "size", "response_format"] {
            assert_eq!(form_text(&form, dropped), None, "{dropped} must not be sent");
        }
        seeds.push(form_text(&form, "seed").unwrap());
    }
    seeds.sort();
    assert_eq!(seeds, vec!["100", "101"], "image i gets seed + i, so the two images differ");

    // No seed asked: the seed the provider reports is the one in x-acc-generation.
    let r = s.gw.generate(&json!({"model": "core", "prompt": "a koi pond", "response_format": "b64_json"})).await;
    r.assert_status(200);
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.starts_with(&format!("seed={FIRST_RANDOM_SEED};")), "x-acc-generation: {generation}");
    let form = s.mock.last().form().await;
    assert_eq!(form_text(&form, "seed"), None);
    assert_eq!(form_text(&form, "aspect_ratio").as_deref(), Some("1:1"));
    assert_eq!(form_text(&form, "negative_prompt"), None);
    assert_eq!(form_text(&form, "style_preset"), None);
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.03"));

    // response_format=url: the gateway serves the provider's bytes.
    let r = s.gw.generate(&json!({"model": "core", "prompt": "a koi", "n": 2, "response_format": "url"})).await;
    r.assert_status(200);
    let data = r.json()["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(data.len(), 2, "{}", r.describe());
    for item in data {
        let url = item["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
        let image = get(&url, &[]).await;
        image.assert_status(200);
        assert_eq!(image.body.to_vec(), s.mock.png(), "GET {url}");
    }
    assert_eq!(s.backup.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_picks_the_endpoint_and_byte_answers_are_taken() {
    let s = setup().await;
    let r = s
        .gw
        .generate(&json!({"model": "ultra", "prompt": "a glacier", "size": "1792x1024", "style": "pixel_art", "response_format": "b64_json"}))
        .await;
    r.assert_status(200);
    let c = s.mock.last();
    assert_eq!(c.path, "/v2beta/stable-image/generate/ultra");
    let form = c.form().await;
    assert_eq!(form_text(&form, "model"), None);
    assert_eq!(form_text(&form, "aspect_ratio").as_deref(), Some("16:9"));
    assert_eq!(form_text(&form, "style_preset").as_deref(), Some("pixel-art"));
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.08"), "the model's own price: {}", r.describe());

    let r = s
        .gw
        .generate(&json!({"model": "large", "prompt": "a glacier", "size": "1024x1536", "seed": 5, "response_format": "b64_json"}))
        .await;
    r.assert_status(200);
    let c = s.mock.last();
    assert_eq!(c.path, "/v2beta/stable-image/generate/sd3");
    let form = c.form().await;
    assert_eq!(form_text(&form, "model").as_deref(), Some("sd3.5-large"));
    assert_eq!(form_text(&form, "aspect_ratio").as_deref(), Some("2:3"));
    assert_eq!(form_text(&form, "seed").as_deref(), Some("5"));
    assert!(r.header("x-acc-generation").unwrap_or_default().contains("model=sd3.5-large"), "{}", r.describe());

    // A style that is no preset is not sent (Stability would refuse it).
    let r =
        s.gw.generate(&json!({"model": "core", "prompt": "x", "style": "watercolour", "response_format": "b64_json"}))
            .await;
    r.assert_status(200);
    assert_eq!(form_text(&s.mock.last().form().await, "style_preset"), None);

    // The provider answers with the image bytes themselves.
    s.mock.shape().answer_bytes(true);
    for format in ["b64_json", "url"] {
        let r =
            s.gw.generate(&json!({"model": "core", "prompt": "a glacier", "n": 2, "response_format": format})).await;
        r.assert_status(200);
        let images = match format {
            "b64_json" => b64_images(&r),
            _ => {
                let mut out = Vec::new();
                for item in r.json()["data"].as_array().unwrap() {
                    out.push(get(item["url"].as_str().unwrap(), &[]).await.body.to_vec());
                }
                out
            }
        };
        assert_eq!(images, vec![s.mock.png(), s.mock.png()], "{format}: {}", r.describe());
    }
    assert_eq!(s.backup.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_errors_and_rate_limits() {
    let s = setup().await;
    let req = |prompt: &str, n: u32| json!({"model": "core", "prompt": prompt, "n": n, "response_format": "b64_json"});

    // 403 content_moderation: content_policy_violation, no other provider asked.
    let r = s.gw.generate(&req("something forbidden", 1)).await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("flagged"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["stability:content_filtered"], "{}", r.describe());

    // finish_reason CONTENT_FILTERED on a 200: the same.
    let r = s.gw.generate(&req("something blurred", 2)).await;
    r.assert_error(400, "content_policy_violation");
    assert_eq!(r.attempts(), vec!["stability:content_filtered"], "{}", r.describe());

    // One of two calls filtered: the other image comes back, and only it is billed.
    s.mock.script(vec![Step::reply(
        200,
        json!({"image": b64_encode(s.mock.png()), "finish_reason": "CONTENT_FILTERED", "seed": 9}),
    )]);
    let r = s.gw.generate(&req("a meadow", 2)).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r).len(), 1, "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.03"), "{}", r.describe());

    // 400 bad_request: the client's fault, OpenAI-shaped with Stability's own words, not retried.
    s.mock.script(vec![stability_error(400, "bad_request", "prompt: must be at most 10000 characters")]);
    let r = s.gw.generate(&req("a meadow", 1)).await;
    let err = r.assert_error(400, "upstream_rejected");
    assert!(err["message"].as_str().unwrap().contains("at most 10000 characters"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["stability:status_4xx"], "{}", r.describe());

    // A refused key or a server error: retryable, the fallback answers; the key never shows.
    for (reply, label) in [
        (stability_error(401, "unauthorized", &format!("invalid key {KEY}")), "account_error"),
        (stability_error(500, "internal_error", "An unexpected server error occurred."), "status_5xx"),
    ] {
        s.mock.script(vec![reply]);
        let r = s.gw.generate(&req("a meadow", 1)).await;
        r.assert_status(200);
        assert_eq!(r.attempts(), vec![format!("stability:{label}"), "backup:ok".to_string()], "{}", r.describe());
        assert!(!r.text().contains(KEY) && !r.describe().contains(KEY), "{}", r.describe());
    }
    assert!(!s.gw.stderr().contains(KEY), "the key is never logged");
    assert_eq!(s.backup.hits(), 2);

    // 429 with Retry-After: the fallback answers, then Stability is left alone as it asked.
    let limited =
        stability_error(429, "rate_limit_exceeded", "You have exceeded the rate limit of 150 requests per 10 seconds.")
            .header("retry-after", "60");
    s.mock.script(vec![limited]);
    let r = s.gw.generate(&req("a meadow", 1)).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["stability:status_429", "backup:ok"], "{}", r.describe());
    let hits = s.mock.hits();
    let r = s.gw.generate(&req("a meadow", 1)).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["stability:paused", "backup:ok"], "{}", r.describe());
    assert_eq!(s.mock.hits(), hits);
}

/// Stability makes one call per image. When some of a request's calls fail and others make
/// images: a 429's `Retry-After` still pauses Stability for every later request, though the
/// attempt itself answered; without an evaluator the images made are returned (and only they
/// are billed); with `sanity` the short answer fails it, falls back, and the reason names the
/// failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_fail_among_an_answers_calls_pause_and_are_named() {
    let mock = Mock::builder(StableImage::default())
        .png(noisy(32, 32, 7))
        .credential("authorization", [format!("Bearer {KEY}")])
        .start()
        .await;
    let backup = MockProvider::start().await;
    backup.answer_with(&noisy(32, 32, 9));
    let policy = format!(
        r#"[providers.stability]
kind = "stability"
base_url = "{}"
api_key_env = "ACC_TEST_STABILITY_KEY"
price = {{ per_image_usd = 0.03 }}
breaker = {{ enabled = false }}

{}{}{}{}"#,
        mock.base_url(),
        openai_provider_at("backup", &backup.base_url()),
        route_toml("plain", "plain").target("stability", "core").fallback("spare"),
        route_toml("checked", "checked")
            .target("stability", "core")
            .fallback("spare")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"fallback\""),
        route_toml("spare", "spare-only").target("backup", "backup-model"),
    );
    let (gw, _dir) = serve_policy(&policy, &[("ACC_TEST_STABILITY_KEY", KEY)]).await;
    let req = |model: &str| json!({"model": model, "prompt": "a meadow", "n": 2, "response_format": "b64_json"});

    // One of two calls a 500, with sanity: the short answer fails and the fallback answers.
    mock.script(vec![stability_error(500, "internal_error", "An unexpected server error occurred.")]);
    let r = gw.generate(&req("checked")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["stability:eval_failed", "backup:ok"], "{}", r.describe());
    let trace = gw.trace_record(&r.header("x-acc-trace-id").unwrap()).await.text();
    assert!(
        trace.contains(
            "asked for 2 images, the provider returned 1 (1 of its calls failed, the first: upstream answered 500"
        ),
        "{trace}"
    );

    // One of two calls a 429 asking for 60 s, without an evaluator: the other image is returned
    // and billed alone, and Stability is paused for the next request, which the fallback serves.
    let limited =
        stability_error(429, "rate_limit_exceeded", "You have exceeded the rate limit.").header("retry-after", "60");
    mock.script(vec![limited]);
    let r = gw.generate(&req("plain")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["stability:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r).len(), 1, "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.03"), "{}", r.describe());
    // The trace keeps why an image is missing, on the attempt that answered.
    let trace = gw.trace_record(&r.header("x-acc-trace-id").unwrap()).await.json();
    let attempt = &trace["attempts"][0];
    assert_eq!(attempt["result"], "ok", "{trace}");
    let error = attempt["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("1 of the answer's calls failed, the first: ") && error.contains("429"), "{trace}");
    let hits = mock.hits();
    let r = gw.generate(&req("plain")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["stability:paused", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits(), hits, "paused: Stability is not called");
}
