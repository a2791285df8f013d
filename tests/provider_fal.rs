//! `kind = "fal"` end to end: the running gateway against a mock of fal.ai's queue API (submit,
//! status, result, cancel, as its public docs describe them) that also hosts the result images.

mod common;

use std::time::Duration;

use common::mock::fal::{png_for, request_id, FalQueue, ANSWER_SEED};
use common::*;
use serde_json::{json, Value};

const KEY: &str = "fal-test-key-0c9d";
const KEY_VAR: &str = "FAL_TEST_KEY";
/// fal's queue with the test key.
async fn fal() -> Mock<FalQueue> {
    Mock::builder(FalQueue::default()).credential("authorization", [format!("Key {KEY}")]).start().await
}

struct Setup {
    mock: Mock<FalQueue>,
    gw: Gateway,
    _dir: PolicyDir,
}

/// Provider `fal` (fetching from 127.0.0.1 allowed unless `fetch` says otherwise), route "m"
/// (10 s per attempt) and route "t" (600 ms per attempt), both on fal-ai/flux/dev.
fn policy(mock: &Mock<FalQueue>, fetch: &str, extra: &str) -> String {
    format!(
        r#"[providers.fal]
kind = "fal"
base_url = "{}"
api_key_env = "{KEY_VAR}"
poll_interval_ms = 20
max_poll_interval_ms = 80
price = {{ per_gpu_second_usd = 0.01 }}
{fetch}

{}{}{extra}
"#,
        mock.base_url(),
        route_toml("main", "m")
            .target("fal", "fal-ai/flux/dev")
            .with("attempt_timeout_ms = 10000\ndeadline_ms = 20000"),
        route_toml("short", "t").target("fal", "fal-ai/flux/dev").with("attempt_timeout_ms = 600\ndeadline_ms = 600"),
    )
}

const ALLOW_LOCAL: &str = r#"fetch = { allow_hosts = ["127.0.0.1"] }"#;

async fn setup_with(fetch: &str, extra: &str) -> Setup {
    let mock = fal().await;
    let dir = PolicyDir::with(&policy(&mock, fetch, extra));
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, KEY)]).await;
    Setup { mock, gw, _dir: dir }
}

async fn setup() -> Setup {
    setup_with(ALLOW_LOCAL, "").await
}

fn req(format: &str) -> Value {
    json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": format})
}

fn assert_cancelled(mock: &Mock<FalQueue>, job: usize) {
    let id = request_id(job);
    let cancels = mock.cancels();
    let want = ("PUT".to_string(), format!("/fal-ai/flux/requests/{id}/cancel"), Some(format!("Key {KEY}")));
    assert!(cancels.contains(&want), "expected {want:?} among the cancels {cancels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_submitted_polled_through_its_states_and_its_images_fetched() {
    let s = setup().await;
    let body = json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 2, "size": "512x768",
        "seed": 7, "negative_prompt": "fog", "steps": 28, "guidance_scale": 3.5, "sampler": "Euler a",
        "response_format": "b64_json"});
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["fal:ok"], "{}", r.describe());

    // What was submitted, where, with which key.
    let submits = s.mock.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!((submits[0].method.as_str(), submits[0].path.as_str()), ("POST", "/fal-ai/flux/dev"));
    let ct = submits[0].headers.get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(ct, Some("application/json"));
    assert_eq!(
        s.mock.submitted_input(),
        json!({"prompt": "a lighthouse at dusk", "image_size": {"width": 512, "height": 768}, "num_images": 2,
            "seed": 7, "negative_prompt": "fog", "num_inference_steps": 28, "guidance_scale": 3.5,
            "enable_safety_checker": true}),
        "the sampler is not sent: fal has none"
    );
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("sampler"), "{}", r.describe());
    assert!(s.mock.rejected().is_empty(), "every call carries the key");

    // Queued -> in progress -> completed: one poll per state, then the result once.
    assert_eq!(s.mock.polls(), 3, "polled until COMPLETED");
    assert_eq!(s.mock.results(), 1);
    assert!(s.mock.cancels().is_empty(), "a finished job is not cancelled");

    // The images are the bytes at the URLs fal named, fetched by the gateway.
    assert_eq!(b64_images(&r), vec![png_for(0), png_for(1)]);
    assert_eq!(s.mock.files(), 2);

    // What was used is what fal reported: its seed, not the one asked for.
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.contains(&format!("seed={ANSWER_SEED}")), "x-acc-generation: {generation}");
    assert!(generation.contains("steps=28") && generation.contains("model=fal-ai/flux/dev"), "{generation}");
    // Priced by the inference time fal reported (1.5 s at 0.01 USD/s).
    let cost: f64 = r.header("x-acc-cost-usd").expect("x-acc-cost-usd").parse().unwrap();
    assert!((cost - 0.015).abs() < 1e-9, "{}", r.describe());
    assert!(!s.gw.stderr().contains(KEY), "the key must never be logged");
}

/// fal's image models make at most 4 images a job (`num_images` 1 to 4; the mock refuses more,
/// 422, as fal does): more run as several jobs at once, seeds one image apart, merged in order.
/// An audit found `n` up to 10 sent as it came, refused as the client's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_images_than_a_job_makes_run_as_several_jobs() {
    let s = setup().await;
    let mut body = req("b64_json");
    body["n"] = json!(6);
    body["seed"] = json!(100);
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 6, "{}", r.describe());
    let mut jobs: Vec<(u64, u64)> = s
        .mock
        .submits()
        .iter()
        .map(|c| {
            let v = c.json();
            (v["seed"].as_u64().unwrap(), v["num_images"].as_u64().unwrap())
        })
        .collect();
    jobs.sort();
    assert_eq!(jobs, vec![(100, 4), (104, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_url_is_served_by_the_gateway() {
    let s = setup().await;
    let r = s.gw.generate(&req("url")).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().expect("a url").to_string();
    assert!(url.starts_with(&s.gw.proxy), "{url} is not served by the gateway ({})", s.gw.proxy);
    assert!(!url.contains(&s.mock.addr.to_string()), "{url}");
    let image = get(&url, &[]).await;
    image.assert_status(200);
    assert_eq!(&image.body[..], &png_for(0)[..]);
    assert_eq!(s.mock.files(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_url_mode_provider_the_providers_url_is_handed_through_unfetched() {
    // No fetch allowance at all: handing through must not need one.
    let mock = fal().await;
    let text = policy(&mock, "", "").replace(
        "name = \"main\"\nmatch = { model = \"m\" }",
        "name = \"main\"\nmatch = { model = \"m\" }\nurl_mode = \"provider\"",
    );
    let dir = PolicyDir::with(&text);
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, KEY)]).await;
    let r = gw.generate(&req("url")).await;
    r.assert_status(200);
    assert_eq!(r.json()["data"][0]["url"], json!(mock.file_url("img-0.png")), "{}", r.describe());
    assert_eq!(mock.files(), 0, "nothing is fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_result_url_without_allowance_is_refused_and_the_next_target_answers() {
    let mock = fal().await;
    let backup = MockProvider::start().await;
    let extra = format!(
        "{}\n[[routes]]\nname = \"spare\"\nmatch = {{ model = \"spare-only\" }}\ntargets = [{{ provider = \"backup\" }}]\n",
        openai_provider_at("backup", &backup.base_url())
    );
    // Plain http allowed, so that the address is what refuses it.
    let text = policy(&mock, "fetch = { allow_http = true }", &extra)
        .replace("attempt_timeout_ms = 10000\n", "attempt_timeout_ms = 10000\nfallbacks = [\"spare\"]\n");
    let dir = PolicyDir::with(&text);
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, KEY)]).await;
    mock.image_urls(vec![format!("http://{}/files/img-0.png?X-Amz-Signature=topsecret", mock.addr)]);

    let r = gw.generate(&req("b64_json")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["fal:fetch_refused", "backup:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![backup.png().to_vec()]);
    assert_eq!(mock.files(), 0, "the loopback URL is never fetched");
    let refused = gw.metric("acc_fetch_refused_total", &[("provider", "fal"), ("reason", "private_address")]).await;
    assert_eq!(refused, 1.0);
    assert!(!gw.stderr().contains("topsecret"), "a signed URL's query is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_filtered_and_rejected_jobs() {
    let s = setup().await;
    // Every image flagged by fal's safety checker: a content-policy refusal, not retried.
    s.mock.result(
        200,
        json!({"images": [{"url": s.mock.file_url("img-0.png"), "width": 8, "height": 8, "content_type": "image/png"}],
            "seed": 1, "has_nsfw_concepts": [true], "timings": {"inference": 0.5}}),
    );
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_error(400, "content_policy_violation");
    assert_eq!(r.attempts(), vec!["fal:content_filtered"], "{}", r.describe());

    // A validation error, surfaced when the result is read: the client's fault, passed back.
    s.mock.result(
        422,
        json!({"detail": [{"loc": ["body", "num_images"], "msg": "ensure this value is less than or equal to 4",
            "type": "value_error.number.not_le"}]}),
    );
    let r = s.gw.generate(&req("b64_json")).await;
    let e = r.assert_error(422, "upstream_rejected");
    assert!(e["message"].as_str().unwrap().contains("num_images: ensure this value"), "{}", r.describe());

    // A job that completed with an error: the provider failed, a 502 listing the attempt.
    s.mock.normal_result();
    s.mock.statuses(vec![
        json!({"status": "IN_PROGRESS"}),
        json!({"status": "COMPLETED", "error": "Runner crashed", "error_type": "runner_disconnected"}),
    ]);
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["fal:status_5xx"], "{}", r.describe());
    assert!(s.mock.cancels().is_empty(), "a job that ended is not cancelled");

    // A rate-limited submission: retryable, and its Retry-After pauses the provider.
    s.mock.set_error(429, &json!({"detail": "Too many requests"}).to_string());
    s.mock.set_headers(vec![("retry-after".into(), "30".into())]);
    let r = s.gw.generate(&req("b64_json")).await;
    assert_eq!(r.attempts(), vec!["fal:status_429"], "{}", r.describe());
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "fal")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_provider_failure_that_names_no_key() {
    let mock = fal().await;
    let dir = PolicyDir::with(&policy(&mock, ALLOW_LOCAL, ""));
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, "not-the-key-77aa")]).await;
    let r = gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["fal:account_error"], "{}", r.describe());
    let sent: Vec<Option<String>> = mock.rejected().iter().map(|c| c.header("authorization")).collect();
    assert_eq!(sent, vec![Some("Key not-the-key-77aa".to_string())]);
    assert!(!r.text().contains("not-the-key-77aa") && !gw.stderr().contains("not-the-key-77aa"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_job() {
    let s = setup().await;
    s.mock.statuses(vec![json!({"status": "IN_QUEUE", "queue_position": 3}), json!({"status": "IN_PROGRESS"})]);
    let conn = raw_post(s.gw.proxy_addr, "/v1/images/generations", &req("b64_json"), &[]).await;
    settles("the job is submitted and polled", || s.mock.polls() >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.mock.cancels().is_empty(), "nothing is cancelled while the client waits");
    drop(conn);
    settles("the job is cancelled when the client leaves", || !s.mock.cancels().is_empty()).await;
    assert_cancelled(&s.mock, 1);
    let polls = s.mock.polls();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.mock.polls(), polls, "polling stops with the attempt");
    assert_eq!(s.mock.results(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_times_out_cancels_the_job() {
    let s = setup().await;
    s.mock.statuses(vec![json!({"status": "IN_QUEUE", "queue_position": 9})]);
    let r = s.gw.generate(&json!({"model": "t", "prompt": "p", "response_format": "b64_json"})).await;
    assert_eq!(r.attempts(), vec!["fal:timeout"], "{}", r.describe());
    assert!(r.status >= 500, "{}", r.describe());
    settles("the job is cancelled when its attempt times out", || s.mock.cancels().len() == 1).await;
    assert_cancelled(&s.mock, 1);
    assert!(s.mock.polls() > 1, "polled with backoff until the deadline");
}

/// What fal made and billed is charged, whether or not the client gets it: a helper found that
/// with `n` = 6 (two jobs) one failed job threw away the other's four finished images, and that
/// images fal's safety checker flagged were left out of the cost. Now the jobs that finished
/// are returned (the failure is the answer's partial error, as Stability's calls), and flagged
/// images are charged as discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_fal_made_are_returned_or_charged_when_a_job_fails_or_an_image_is_flagged() {
    let mock = fal().await;
    let text = policy(&mock, ALLOW_LOCAL, "").replace("per_gpu_second_usd = 0.01", "per_image_usd = 0.025");
    let dir = PolicyDir::with(&text);
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, KEY)]).await;

    // One of the two jobs is refused at submission (a 500): the other's images are served.
    mock.script(vec![Step::ok(), Step::reply(500, json!({"detail": "worker lost"}))]);
    let mut body = req("b64_json");
    body["n"] = json!(6);
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["fal:ok"], "{}", r.describe());
    let served = r.json()["data"].as_array().unwrap().len();
    assert!(served == 4 || served == 2, "the finished job's images: {}", r.describe());
    let cost: f64 = r.header("x-acc-cost-usd").expect("x-acc-cost-usd").parse().unwrap();
    assert!((cost - 0.025 * served as f64).abs() < 1e-9, "{cost} for {served} images");

    // Two images, one flagged: one served, both charged.
    mock.script(Vec::<Step>::new());
    mock.result(
        200,
        json!({"images": [
                {"url": mock.file_url("img-0.png"), "width": 8, "height": 8, "content_type": "image/png"},
                {"url": mock.file_url("img-1.png"), "width": 8, "height": 8, "content_type": "image/png"}],
            "seed": 5.0, "has_nsfw_concepts": [false, true], "timings": {"inference": 0.5}}),
    );
    let mut body = req("b64_json");
    body["n"] = json!(2);
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![png_for(0)], "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.05"), "{}", r.describe());
    // The seed fal reported as 5.0 is read as 5.
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.contains("seed=5"), "x-acc-generation: {generation}");
    let discarded =
        gw.metric("acc_cost_usd_total", &[("route", "main"), ("provider", "fal"), ("kind", "discarded")]).await;
    assert!((discarded - 0.025).abs() < 1e-9, "{discarded}");
}
