//! `kind = "replicate"` end to end: the running gateway against a mock of Replicate's
//! predictions API (create, get, cancel, as its public docs describe them) that also hosts the
//! output images.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "r8_test_token_51be";
const TOKEN_VAR: &str = "REPLICATE_TEST_TOKEN";
/// The seed the model "reports" in its logs, unlike any the tests ask for.
const LOGGED_SEED: u64 = 31337;
/// The version the mock says it ran.
const VERSION: &str = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";

/// An answer to give as it is: status, JSON body, headers.
type Canned = (u16, Value, Vec<(String, String)>);

#[derive(Default)]
struct ReplicateState {
    addr: Mutex<Option<SocketAddr>>,
    /// Prediction statuses the polls see, in order, per prediction; the last one repeats.
    statuses: Mutex<Vec<&'static str>>,
    /// The `error` of a failed prediction.
    error: Mutex<Option<String>>,
    /// The `output` of a succeeded prediction instead of the mock's own image URLs.
    output: Mutex<Option<Value>>,
    /// The create answer (status, body, headers) instead of a normal one.
    create_answer: Mutex<Option<Canned>>,
    creates: Mutex<Vec<Captured>>,
    polls: Mutex<HashMap<String, usize>>,
    /// (method, path, authorization) of each cancel.
    cancels: Mutex<Vec<(String, String, Option<String>)>>,
    files: Mutex<Vec<String>>,
    unauthorized: Mutex<Vec<Option<String>>>,
}

#[derive(Clone)]
struct ReplicateMock {
    state: Arc<ReplicateState>,
    addr: SocketAddr,
}

fn png_for(i: usize) -> Vec<u8> {
    make_png(8, 8, [30, 40 * i as u8 + 10, 220])
}

impl ReplicateMock {
    async fn start() -> ReplicateMock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReplicateState::default());
        *state.addr.lock().unwrap() = Some(addr);
        *state.statuses.lock().unwrap() = vec!["starting", "processing", "succeeded"];
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ReplicateMock { state, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn statuses(&self, s: Vec<&'static str>) {
        *self.state.statuses.lock().unwrap() = s;
    }

    fn output(&self, v: Value) {
        *self.state.output.lock().unwrap() = Some(v);
    }

    fn creates(&self) -> Vec<Captured> {
        self.state.creates.lock().unwrap().clone()
    }

    fn created_body(&self) -> Value {
        let c = self.creates();
        serde_json::from_slice(&c.last().expect("nothing was created").body).expect("the create body is JSON")
    }

    fn polls(&self) -> usize {
        self.state.polls.lock().unwrap().values().sum()
    }

    fn cancels(&self) -> Vec<(String, String, Option<String>)> {
        self.state.cancels.lock().unwrap().clone()
    }

    fn files(&self) -> Vec<String> {
        self.state.files.lock().unwrap().clone()
    }
}

fn reply(status: u16, body: &Value, headers: &[(String, String)]) -> Response {
    let mut b = Response::builder().status(status).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(axum::body::Body::from(body.to_string())).unwrap()
}

fn prediction_id(n: usize) -> String {
    format!("gm3qorzdhgbfurvjtvhg6dckhu{n:02}")
}

/// A prediction object as Replicate's API shows it.
fn prediction(s: &ReplicateState, id: &str, status: &str, input: &Value) -> Value {
    let addr = s.addr.lock().unwrap().unwrap();
    let base = format!("http://{addr}/v1");
    let n = input["num_outputs"].as_u64().unwrap_or(1) as usize;
    let (output, error, logs, metrics) = match status {
        "succeeded" => (
            s.output.lock().unwrap().clone().unwrap_or_else(|| {
                json!((0..n).map(|i| format!("http://{addr}/files/{id}/out-{i}.png")).collect::<Vec<_>>())
            }),
            Value::Null,
            format!("Using seed: {LOGGED_SEED}\n  0%|          | 0/4\n100%|##########| 4/4\n"),
            json!({"predict_time": 2.5}),
        ),
        "failed" => (Value::Null, json!(s.error.lock().unwrap().clone()), String::new(), json!({})),
        "processing" => (Value::Null, Value::Null, format!("Using seed: {LOGGED_SEED}\n"), json!({})),
        _ => (Value::Null, Value::Null, String::new(), json!({})),
    };
    json!({"id": id, "model": "acme/sdxl", "version": VERSION, "input": input, "logs": logs,
        "output": output, "error": error, "status": status, "created_at": "2025-01-01T00:00:00.000Z",
        "data_removed": false, "metrics": metrics,
        "urls": {"get": format!("{base}/predictions/{id}"), "cancel": format!("{base}/predictions/{id}/cancel"),
            "stream": "https://stream.replicate.com/v1/files/x"}})
}

/// POST /v1/models/{owner}/{name}/predictions and /v1/predictions; GET /v1/predictions/{id};
/// POST /v1/predictions/{id}/cancel. Plus /files/*.
async fn handle(
    State(s): State<Arc<ReplicateState>>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let addr = s.addr.lock().unwrap().unwrap();
    if let Some(name) = path.strip_prefix("/files/") {
        s.files.lock().unwrap().push(path.clone());
        if name == "redirect" {
            let to = format!("http://localhost:{}/files/x/out-0.png", addr.port());
            return Response::builder().status(302).header("location", to).body(axum::body::Body::empty()).unwrap();
        }
        let i: usize = name.rsplit("out-").next().unwrap_or("0").trim_end_matches(".png").parse().unwrap_or(0);
        return Response::builder()
            .status(200)
            .header("content-type", "image/png")
            .body(axum::body::Body::from(png_for(i)))
            .unwrap();
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        s.unauthorized.lock().unwrap().push(auth);
        return reply(
            401,
            &json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}),
            &[],
        );
    }
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let is_create = method == http::Method::POST
        && (segments == ["predictions"]
            || (segments.len() == 4 && segments[0] == "models" && segments[3] == "predictions"));
    if is_create {
        s.creates.lock().unwrap().push(Captured {
            method: method.to_string(),
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        if let Some((status, body, hs)) = s.create_answer.lock().unwrap().clone() {
            return reply(status, &body, &hs);
        }
        let input = serde_json::from_slice::<Value>(&body).unwrap_or_default()["input"].clone();
        let id = prediction_id(s.creates.lock().unwrap().len());
        return reply(201, &prediction(&s, &id, "starting", &input), &[]);
    }
    let input_of = |s: &ReplicateState| {
        let creates = s.creates.lock().unwrap();
        serde_json::from_slice::<Value>(&creates.last().unwrap().body).unwrap_or_default()["input"].clone()
    };
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["predictions", id]) => {
            let n = {
                let mut polls = s.polls.lock().unwrap();
                let n = polls.entry(id.to_string()).or_insert(0);
                *n += 1;
                *n
            };
            let statuses = s.statuses.lock().unwrap().clone();
            let status = statuses[(n - 1).min(statuses.len() - 1)];
            reply(200, &prediction(&s, id, status, &input_of(&s)), &[])
        }
        ("POST", ["predictions", id, "cancel"]) => {
            s.cancels.lock().unwrap().push((method.to_string(), path.clone(), auth));
            reply(200, &prediction(&s, id, "canceled", &input_of(&s)), &[])
        }
        _ => reply(404, &json!({"title": "Not found", "detail": "Not found", "status": 404}), &[]),
    }
}

/// Provider `rep` (GPU-second priced), route "m" (10 s per attempt) and route "t" (600 ms).
fn policy(mock: &ReplicateMock, model: &str, fetch: &str) -> String {
    format!(
        r#"[providers.rep]
kind = "replicate"
base_url = "{}"
api_key_env = "{TOKEN_VAR}"
poll_interval_ms = 20
max_poll_interval_ms = 80
price = {{ per_gpu_second_usd = 0.0014 }}
{fetch}

[[routes]]
name = "main"
match = {{ model = "m" }}
targets = [{{ provider = "rep", model = "{model}" }}]
attempt_timeout_ms = 10000
deadline_ms = 20000

[[routes]]
name = "short"
match = {{ model = "t" }}
targets = [{{ provider = "rep", model = "{model}" }}]
attempt_timeout_ms = 600
deadline_ms = 600
"#,
        mock.base_url()
    )
}

const ALLOW_LOCAL: &str = r#"fetch = { allow_hosts = ["127.0.0.1"] }"#;

struct Setup {
    mock: ReplicateMock,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup_with(model: &str, fetch: &str) -> Setup {
    let mock = ReplicateMock::start().await;
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

async fn settles(what: &str, f: impl Fn() -> bool) {
    assert!(eventually(Duration::from_secs(10), || async { f() }).await, "{what}");
}

async fn raw_post(addr: SocketAddr, body: &Value) -> tokio::net::TcpStream {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    s
}

fn assert_cancelled(mock: &ReplicateMock, n: usize) {
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
            "seed": 5, "negative_prompt": "fog", "num_inference_steps": 30, "guidance_scale": 7.5,
            "output_format": "png"}}),
        "an official model runs without a version; style is not sent"
    );
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("style"), "{}", r.describe());
    assert!(s.mock.state.unauthorized.lock().unwrap().is_empty(), "every call carries the token");

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
    *s.mock.state.error.lock().unwrap() =
        Some("NSFW content detected. Try running it again, or try a different prompt.".into());
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_error(400, "content_policy_violation");
    assert_eq!(r.attempts(), vec!["rep:content_filtered"], "{}", r.describe());

    // Any other failure: the provider's, a 502 that lists the attempt.
    *s.mock.state.error.lock().unwrap() = Some("CUDA error: out of memory".into());
    let r = s.gw.generate(&req("b64_json")).await;
    r.assert_status(502);
    assert_eq!(r.attempts(), vec!["rep:status_5xx"], "{}", r.describe());
    assert!(s.mock.cancels().is_empty(), "an ended prediction is not cancelled");

    // Invalid input: the client's fault, passed back with Replicate's own explanation.
    *s.mock.state.create_answer.lock().unwrap() = Some((
        422,
        json!({"detail": "- input.num_outputs: Must be less than or equal to 4", "status": 422,
            "title": "Input validation failed", "invalid_fields": [{"type": "less_than_equal",
            "field": "input.num_outputs", "description": "Must be less than or equal to 4"}]}),
        vec![],
    ));
    let r = s.gw.generate(&req("b64_json")).await;
    let e = r.assert_error(422, "upstream_rejected");
    assert!(e["message"].as_str().unwrap().contains("Must be less than or equal to 4"), "{}", r.describe());

    // Throttled: retryable, and the Retry-After pauses the provider.
    *s.mock.state.create_answer.lock().unwrap() = Some((
        429,
        json!({"title": "Request was throttled.", "detail": "Request was throttled. Expected available in 12 seconds.", "status": 429}),
        vec![("retry-after".into(), "12".into())],
    ));
    let r = s.gw.generate(&req("b64_json")).await;
    assert_eq!(r.attempts(), vec!["rep:status_429"], "{}", r.describe());
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "rep")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_prediction() {
    let s = setup().await;
    s.mock.statuses(vec!["starting", "processing"]);
    let conn = raw_post(s.gw.proxy_addr, &req("b64_json")).await;
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
