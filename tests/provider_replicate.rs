//! `kind = "replicate"` end to end: the running gateway against a mock of Replicate's
//! predictions API (create, get, cancel, as its public docs describe them) that also hosts the
//! output images.

mod common;

use std::time::Duration;

use common::mock::replicate::{png_for, prediction_id, Predictions, LOGGED_SEED, VERSION};
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "r8_test_token_51be";
const TOKEN_VAR: &str = "REPLICATE_TEST_TOKEN";
/// Replicate's predictions API with the test token.
async fn replicate() -> Mock<Predictions> {
    Mock::builder(Predictions::default()).credential("authorization", [format!("Bearer {TOKEN}")]).start().await
}

/// Provider `rep` (GPU-second priced), route "m" (10 s per attempt) and route "t" (600 ms).
fn policy(mock: &Mock<Predictions>, model: &str, fetch: &str) -> String {
    format!(
        r#"[providers.rep]
kind = "replicate"
base_url = "{}"
api_key_env = "{TOKEN_VAR}"
poll_interval_ms = 20
max_poll_interval_ms = 80
price = {{ per_gpu_second_usd = 0.0014 }}
{fetch}

{}{}"#,
        mock.base_url(),
        route_toml("main", "m").target("rep", model).with("attempt_timeout_ms = 10000\ndeadline_ms = 20000"),
        route_toml("short", "t").target("rep", model).with("attempt_timeout_ms = 600\ndeadline_ms = 600"),
    )
}

const ALLOW_LOCAL: &str = r#"fetch = { allow_hosts = ["127.0.0.1"] }"#;

struct Setup {
    mock: Mock<Predictions>,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup_with(model: &str, fetch: &str) -> Setup {
    let mock = replicate().await;
    let dir = PolicyDir::with(&policy(&mock, model, fetch));
    let gw = Gateway::start_with_env(dir.path(), &[(TOKEN_VAR, TOKEN)]).await;
    Setup { mock, gw, _dir: dir }
}

async fn setup() -> Setup {
    setup_with("acme/sdxl", ALLOW_LOCAL).await
}

fn req(format: &str) -> Value {
    json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": format})
}

fn assert_cancelled(mock: &Mock<Predictions>, n: usize) {
    let want =
        ("POST".to_string(), format!("/v1/predictions/{}/cancel", prediction_id(n)), Some(format!("Bearer {TOKEN}")));
    let cancels = mock.cancels();
    assert!(cancels.contains(&want), "expected {want:?} among the cancels {cancels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_is_created_polled_until_it_succeeds_and_priced_by_gpu_time() {
    let s = setup().await;
    let body = json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 2, "size": "1344x768",
        "seed": 5, "negative_prompt": "fog", "steps": 30, "guidance_scale": 7.5, "style": "vivid",
        "response_format": "url"});
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["rep:ok"], "{}", r.describe());

    let creates = s.mock.creates();
    assert_eq!(creates.len(), 1);
    assert_eq!((creates[0].method.as_str(), creates[0].path.as_str()), ("POST", "/v1/models/acme/sdxl/predictions"));
    assert_eq!(
        s.mock.created_body(),
        json!({"input": {"prompt": "a lighthouse at dusk", "num_outputs": 2, "width": 1344, "height": 768,
            "aspect_ratio": "16:9", "seed": 5, "negative_prompt": "fog", "num_inference_steps": 30, "guidance_scale": 7.5,
            "guidance": 7.5, "output_format": "png"}}),
        "an official model runs without a version; style is not sent"
    );
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("style"), "{}", r.describe());
    assert!(s.mock.rejected().is_empty(), "every call carries the token");

    // starting (the create answer) -> starting -> processing -> succeeded.
    assert_eq!(s.mock.polls(), 3, "polled until it succeeded");
    assert!(s.mock.cancels().is_empty());

    // Gateway-served URLs for the outputs it fetched.
    let data = r.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        let url = d["url"].as_str().unwrap();
        assert!(url.starts_with(&s.gw.proxy), "{url}");
        let image = get(url, &[]).await;
        image.assert_status(200);
        assert_eq!(&image.body[..], &png_for(i)[..], "image {i}");
    }
    assert_eq!(s.mock.files().len(), 2);

    // Settings as reported: the seed from the logs, the version that ran.
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.contains(&format!("seed={LOGGED_SEED}")), "x-acc-generation: {generation}");
    assert!(generation.contains(&format!("model=acme/sdxl:{VERSION}")), "x-acc-generation: {generation}");
    // predict_time 2.5 s at 0.0014 USD per GPU-second.
    let cost: f64 = r.header("x-acc-cost-usd").expect("x-acc-cost-usd").parse().unwrap();
    assert!((cost - 0.0035).abs() < 1e-9, "{}", r.describe());
    assert!(!s.gw.stderr().contains(TOKEN), "the token must never be logged");
}

/// Replicate's image models make at most 4 outputs a prediction (`num_outputs` "Max: 4"; the
/// mock refuses more, 422, as Replicate does): more run as several predictions at once, seeds
/// one image apart, merged in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_images_than_a_prediction_makes_run_as_several() {
    let s = setup().await;
    let body =
        json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 5, "seed": 9, "response_format": "b64_json"});
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 5, "{}", r.describe());
    let mut made: Vec<(u64, u64)> = s
        .mock
        .creates()
        .iter()
        .map(|c| {
            let input = &c.json()["input"];
            (input["seed"].as_u64().unwrap(), input["num_outputs"].as_u64().unwrap())
        })
        .collect();
    made.sort();
    assert_eq!(made, vec![(9, 4), (13, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_model_runs_through_the_predictions_endpoint() {
    let s = setup_with("acme/sdxl:39ed52f2a78e", ALLOW_LOCAL).await;
    s.mock.output(json!(format!("http://{}/files/single/out-3.png", s.mock.addr)));
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(200);
    let creates = s.mock.creates();
    assert_eq!(creates[0].path, "/v1/predictions");
    let sent = s.mock.created_body();
    assert_eq!(sent["version"], json!("39ed52f2a78e"), "{sent}");
    assert_eq!(sent["input"]["aspect_ratio"], json!("1:1"), "{sent}");
    assert_eq!((sent["input"]["width"].clone(), sent["input"]["num_outputs"].clone()), (json!(1024), json!(1)));
    // A single output URL (not a list) is one image, fetched by the gateway.
    assert_eq!(b64_images(&r), vec![png_for(3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_filtered_and_rejected_predictions() {
    let s = setup().await;
    // The model's safety checker: a content-policy refusal, not retried.
    s.mock.statuses(vec!["processing", "failed"]);
    s.mock.set_prediction_error("NSFW content detected. Try running it again, or try a different prompt.");
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_error(400, "content_policy_violation");
    assert_eq!(r.attempts(), vec!["rep:content_filtered"], "{}", r.describe());

    // Any other failure: the provider's, a 502 that lists the attempt.
    s.mock.set_prediction_error("CUDA error: out of memory");
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["rep:status_5xx"], "{}", r.describe());
    assert!(s.mock.cancels().is_empty(), "an ended prediction is not cancelled");

    // Invalid input: the client's fault, passed back with Replicate's own explanation.
    s.mock.set_error(
        422,
        &json!({"detail": "- input.num_outputs: Must be less than or equal to 4", "status": 422,
            "title": "Input validation failed", "invalid_fields": [{"type": "less_than_equal",
            "field": "input.num_outputs", "description": "Must be less than or equal to 4"}]})
        .to_string(),
    );
    let r = s.gw.generate(&req("b64_json")).await;
    let e = r.assert_error(422, "upstream_rejected");
    assert!(e["message"].as_str().unwrap().contains("Must be less than or equal to 4"), "{}", r.describe());

    // Throttled: retryable, and the Retry-After pauses the provider.
    s.mock.set_error(
        429,
        &json!({"title": "Request was throttled.", "detail": "Request was throttled. Expected available in 12 seconds.", "status": 429})
        .to_string(),
    );
    s.mock.set_headers(vec![("retry-after".into(), "12".into())]);
    let r = s.gw.generate(&req("b64_json")).await;
    assert_eq!(r.attempts(), vec!["rep:status_429"], "{}", r.describe());
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "rep")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_prediction() {
    let s = setup().await;
    s.mock.statuses(vec!["starting", "processing"]);
    let conn = raw_post(s.gw.proxy_addr, "/v1/images/generations", &req("b64_json"), &[]).await;
    settles("the prediction is created and polled", || s.mock.polls() >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.mock.cancels().is_empty(), "nothing is cancelled while the client waits");
    drop(conn);
    settles("the prediction is cancelled when the client leaves", || !s.mock.cancels().is_empty()).await;
    assert_cancelled(&s.mock, 1);
    let polls = s.mock.polls();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.mock.polls(), polls, "polling stops with the attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_times_out_cancels_the_prediction() {
    let s = setup().await;
    s.mock.statuses(vec!["starting"]);
    let r = s.gw.generate(&json!({"model": "t", "prompt": "p", "response_format": "b64_json"})).await;
    assert_eq!(r.attempts(), vec!["rep:timeout"], "{}", r.describe());
    assert!(r.status >= 500, "{}", r.describe());
    settles("the prediction is cancelled when its attempt times out", || s.mock.cancels().len() == 1).await;
    assert_cancelled(&s.mock, 1);
    assert!(s.mock.polls() > 1, "polled with backoff until the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_output_without_allowance_is_refused() {
    // Plain http allowed, loopback not: the address is what refuses it.
    let s = setup_with("acme/sdxl", "fetch = { allow_http = true }").await;
    s.mock.output(json!([format!("http://{}/files/p/out-0.png?X-Amz-Signature=topsecret", s.mock.addr)]));
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["rep:fetch_refused"], "{}", r.describe());
    assert!(s.mock.files().is_empty(), "never fetched");
    let refused = s.gw.metric("acc_fetch_refused_total", &[("provider", "rep"), ("reason", "private_address")]).await;
    assert_eq!(refused, 1.0);
    assert!(!r.text().contains("topsecret") && !s.gw.stderr().contains("topsecret"), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_loopback_is_refused_on_the_redirect() {
    // 127.0.0.1 is allowed by name; localhost, where it redirects, is not.
    let s = setup_with("acme/sdxl", r#"fetch = { allow_hosts = ["127.0.0.1"], allow_http = true }"#).await;
    s.mock.output(json!([format!("http://{}/files/redirect", s.mock.addr)]));
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["rep:fetch_refused"], "{}", r.describe());
    assert_eq!(s.mock.files(), vec!["/files/redirect".to_string()], "the redirect target is never fetched");
    let refused = s.gw.metric("acc_fetch_refused_total", &[("provider", "rep"), ("reason", "private_address")]).await;
    assert_eq!(refused, 1.0);
}
