//! `kind = "vertex_imagen"` end to end: the real binary against a mock of Vertex AI's Imagen
//! `:predict` endpoint that checks what Google documents (path with project, location and model,
//! bearer token, `instances`/`parameters` fields, seed only without watermark, 1..=4 samples)
//! and answers the way Imagen does: base64 predictions, `raiFilteredReason` for filtered images,
//! Google error bodies, 429 RESOURCE_EXHAUSTED.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

const PROJECT: &str = "acc-test-project";
const LOCATION: &str = "us-central1";
const MODEL: &str = "imagen-3.0-generate-002";
const RATIOS: [&str; 5] = ["1:1", "3:4", "4:3", "9:16", "16:9"];
/// Every `parameters` field of the predict API the adapter could legitimately send.
const KNOWN_PARAMETERS: [&str; 13] = [
    "sampleCount",
    "aspectRatio",
    "negativePrompt",
    "seed",
    "addWatermark",
    "personGeneration",
    "includeRaiReason",
    "outputOptions",
    "safetySetting",
    "language",
    "enhancePrompt",
    "storageUri",
    "sampleImageSize",
];

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

struct VertexState {
    requests: Mutex<Vec<Captured>>,
    /// Answers for the next requests, in order, before any checking.
    script: Mutex<VecDeque<Reply>>,
    /// Access tokens the mock accepts.
    tokens: Mutex<Vec<String>>,
    png: Vec<u8>,
}

#[derive(Clone)]
struct VertexMock {
    state: Arc<VertexState>,
    addr: std::net::SocketAddr,
}

impl VertexMock {
    async fn start(tokens: &[&str]) -> VertexMock {
        let state = Arc::new(VertexState {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            tokens: Mutex::new(tokens.iter().map(|t| t.to_string()).collect()),
            png: make_png(8, 8, [30, 120, 220]),
        });
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        VertexMock { state, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn requests(&self) -> Vec<Captured> {
        self.state.requests.lock().unwrap().clone()
    }

    fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    fn last(&self) -> Captured {
        self.requests().pop().expect("the mock received no request")
    }

    fn script(&self, replies: Vec<Reply>) {
        *self.state.script.lock().unwrap() = replies.into();
    }

    fn set_tokens(&self, tokens: &[&str]) {
        *self.state.tokens.lock().unwrap() = tokens.iter().map(|t| t.to_string()).collect();
    }
}

fn body_json(c: &Captured) -> Value {
    serde_json::from_slice(&c.body)
        .unwrap_or_else(|e| panic!("non-JSON body ({e}): {}", String::from_utf8_lossy(&c.body)))
}

fn header(c: &Captured, name: &str) -> Option<String> {
    c.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// A Google API error body.
fn google_error(code: u16, status: &str, message: &str) -> Reply {
    Reply {
        status: code,
        headers: Vec::new(),
        body: json!({"error": {"code": code, "message": message, "status": status}}).to_string(),
    }
}

async fn handle(State(state): State<Arc<VertexState>>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let captured = Captured {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    state.requests.lock().unwrap().push(captured);
    let reply = state.script.lock().unwrap().pop_front().unwrap_or_else(|| predict(&state, &parts, &body));
    let mut b = Response::builder().status(reply.status).header("content-type", "application/json; charset=UTF-8");
    for (k, v) in reply.headers {
        b = b.header(k, v);
    }
    b.body(axum::body::Body::from(reply.body)).unwrap()
}

/// What Imagen answers to a request, after checking it the way the API does.
fn predict(state: &VertexState, parts: &http::request::Parts, body: &Bytes) -> Reply {
    let prefix = format!("/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/");
    let model = parts.uri.path().strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(":predict"));
    if parts.method != http::Method::POST || model != Some(MODEL) {
        return google_error(
            404,
            "NOT_FOUND",
            &format!("mock: no such endpoint {} {}", parts.method, parts.uri.path()),
        );
    }
    let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let authorised = state.tokens.lock().unwrap().iter().any(|t| auth == format!("Bearer {t}"));
    if !authorised {
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        );
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return google_error(400, "INVALID_ARGUMENT", &format!("Invalid JSON payload received. {e}")),
    };
    let Some(prompt) = v["instances"][0]["prompt"].as_str() else {
        return google_error(400, "INVALID_ARGUMENT", "instances[0].prompt is required");
    };
    let params = v["parameters"].as_object().cloned().unwrap_or_default();
    if let Some(unknown) = params.keys().find(|k| !KNOWN_PARAMETERS.contains(&k.as_str())) {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            &format!("Invalid JSON payload received. Unknown name \"{unknown}\""),
        );
    }
    let count = params.get("sampleCount").and_then(Value::as_u64).unwrap_or(4);
    if !(1..=4).contains(&count) {
        return google_error(400, "INVALID_ARGUMENT", "sampleCount must be between 1 and 4");
    }
    if let Some(r) = params.get("aspectRatio") {
        if !r.as_str().is_some_and(|r| RATIOS.contains(&r)) {
            return google_error(400, "INVALID_ARGUMENT", &format!("unsupported aspectRatio {r}"));
        }
    }
    if params.contains_key("seed") && params.get("addWatermark") != Some(&json!(false)) {
        return google_error(400, "INVALID_ARGUMENT", "seed is not supported when addWatermark is enabled");
    }
    // "forbidden" prompts get every image filtered; "partly" ones lose all but the first.
    let image = json!({"mimeType": "image/png", "bytesBase64Encoded": b64_encode(&state.png)});
    let filtered =
        json!({"raiFilteredReason": "mock: images removed for violating the usage guidelines (code 58061214)"});
    let predictions: Vec<Value> = (0..count)
        .map(|i| {
            if prompt.contains("forbidden") || (prompt.contains("partly") && i > 0) {
                filtered.clone()
            } else {
                image.clone()
            }
        })
        .collect();
    Reply { status: 200, headers: Vec::new(), body: json!({"predictions": predictions}).to_string() }
}

/// `vertex` (model alias "imagen") with the given token settings, falling back to `backup`.
fn policy(mock: &VertexMock, token: &str, backup: &MockProvider) -> String {
    format!(
        r#"[providers.vertex]
kind = "vertex_imagen"
base_url = "{}"
project = "{PROJECT}"
location = "{LOCATION}"
{token}
price = {{ per_image_usd = 0.04 }}
breaker = {{ enabled = false }}

{}
[[routes]]
name = "imagen"
match = {{ model = "imagen" }}
targets = [{{ provider = "vertex", model = "{MODEL}" }}]
fallbacks = ["spare"]
attempt_timeout_ms = 20000
deadline_ms = 40000

[[routes]]
name = "spare"
match = {{ model = "spare-only" }}
targets = [{{ provider = "backup", model = "backup-model" }}]
"#,
        mock.base_url(),
        openai_provider_at("backup", &backup.base_url()),
    )
}

fn parameters(c: &Captured) -> serde_json::Map<String, Value> {
    body_json(c)["parameters"].as_object().cloned().unwrap_or_else(|| panic!("no parameters: {}", body_json(c)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_request_and_answer_are_mapped_with_the_token_from_the_environment() {
    let mock = VertexMock::start(&["tok-env-1"]).await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&policy(&mock, "token_env = \"ACC_TEST_VERTEX_TOKEN\"", &backup));
    let gw = Gateway::start_with_env(dir.path(), &[("ACC_TEST_VERTEX_TOKEN", "tok-env-1")]).await;

    let r = gw
        .generate(&json!({
            "model": "imagen", "prompt": "a red fox in snow", "n": 2, "size": "1792x1024",
            "seed": 7, "negative_prompt": "blurry", "steps": 30, "sampler": "Euler a",
            "response_format": "b64_json",
        }))
        .await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![mock.state.png.clone(), mock.state.png.clone()], "{}", r.describe());
    assert_eq!(r.attempts(), vec!["vertex:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("steps, sampler"), "{}", r.describe());
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(generation.contains("seed=7"), "x-acc-generation: {generation}");
    assert!(generation.contains(&format!("model={MODEL}")), "x-acc-generation: {generation}");
    assert!(!generation.contains("steps") && !generation.contains("sampler"), "x-acc-generation: {generation}");
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.08"), "2 images at 0.04: {}", r.describe());

    let sent = mock.last();
    assert_eq!(sent.method, "POST");
    assert_eq!(
        sent.path,
        format!("/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{MODEL}:predict")
    );
    assert_eq!(header(&sent, "authorization").as_deref(), Some("Bearer tok-env-1"));
    assert!(header(&sent, "content-type").unwrap_or_default().starts_with("application/json"));
    let body = body_json(&sent);
    assert_eq!(body["instances"], json!([{"prompt": "a red fox in snow"}]), "{body}");
    let p = parameters(&sent);
    assert_eq!(p["sampleCount"], json!(2), "{body}");
    assert_eq!(p["aspectRatio"], json!("16:9"), "1792x1024 is nearest 16:9: {body}");
    assert_eq!(p["negativePrompt"], json!("blurry"), "{body}");
    assert_eq!(p["seed"], json!(7), "{body}");
    assert_eq!(p["addWatermark"], json!(false), "a seed needs the watermark off: {body}");
    assert_eq!(p["includeRaiReason"], json!(true), "{body}");
    let text = String::from_utf8_lossy(&sent.body);
    for dropped in ["steps", "sampler", "Euler"] {
        assert!(!text.contains(dropped), "{dropped} must not be sent: {text}");
    }

    // No seed: neither seed nor addWatermark goes out; a portrait size maps to 9:16.
    let r = gw
        .generate(
            &json!({"model": "imagen", "prompt": "a tall tower", "size": "1024x1792", "response_format": "b64_json"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(b64_images(&r).len(), 1);
    let p = parameters(&mock.last());
    assert_eq!(p["sampleCount"], json!(1));
    assert_eq!(p["aspectRatio"], json!("9:16"));
    assert!(!p.contains_key("seed") && !p.contains_key("addWatermark") && !p.contains_key("negativePrompt"), "{p:?}");
    assert!(r.header("x-acc-dropped-params").is_none(), "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", r.describe());

    // response_format=url: the gateway serves the provider's bytes.
    let r = gw.generate(&json!({"model": "imagen", "prompt": "a lighthouse", "response_format": "url"})).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    let image = get(&url, &[]).await;
    image.assert_status(200);
    assert_eq!(&image.body[..], &mock.state.png[..], "GET {url}");
    assert_eq!(parameters(&mock.last())["aspectRatio"], json!("1:1"));
    assert_eq!(backup.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_is_cached_and_run_again_once_on_401() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // Prints tok-1, tok-2, ... : one more line in `runs` per execution.
    let script = format!("echo run >> '{0}'; echo tok-$(wc -l < '{0}' | tr -d ' ')", runs.display());
    let mock = VertexMock::start(&["tok-1"]).await;
    let backup = MockProvider::start().await;
    let token = format!("token_command = [\"sh\", \"-c\", {}]", toml_string(&script));
    let dir = PolicyDir::with(&policy(&mock, &token, &backup));
    let gw = Gateway::start(dir.path()).await;
    let count_runs = || std::fs::read_to_string(&runs).map(|s| s.lines().count()).unwrap_or(0);
    let req = json!({"model": "imagen", "prompt": "a quiet harbour", "response_format": "b64_json"});

    for _ in 0..3 {
        let r = gw.generate(&req).await;
        r.assert_status(200);
        assert_eq!(header(&mock.last(), "authorization").as_deref(), Some("Bearer tok-1"));
    }
    assert_eq!(count_runs(), 1, "the token is cached between attempts");

    // The token is revoked: the API answers 401, the command runs again, the request is sent
    // once more with the new token, and the client never sees the 401.
    mock.set_tokens(&["tok-2"]);
    let before = mock.hits();
    let r = gw.generate(&req).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:ok"], "{}", r.describe());
    assert_eq!(count_runs(), 2, "one refresh after the 401");
    let sent: Vec<Option<String>> = mock.requests()[before..].iter().map(|c| header(c, "authorization")).collect();
    assert_eq!(sent, vec![Some("Bearer tok-1".to_string()), Some("Bearer tok-2".to_string())]);

    // A 401 for the fresh token too is not retried again: it is the provider's failure.
    mock.set_tokens(&["nobody"]);
    let before = mock.hits();
    let r = gw.generate(&req).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:status_4xx", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits() - before, 2, "one try with the cached token, one with a fresh one");
    assert_eq!(count_runs(), 3);
    assert!(!r.text().contains("tok-"), "no token in the answer: {}", r.text());
    assert!(!gw.stderr().contains("tok-3"), "no token in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_token_command_or_missing_variable_is_a_credential_error() {
    let mock = VertexMock::start(&["tok-1"]).await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&policy(
        &mock,
        r#"token_command = ["sh", "-c", "echo 'gcloud: not logged in' >&2; exit 3"]"#,
        &backup,
    ));
    let gw = Gateway::start(dir.path()).await;
    let r = gw.generate(&json!({"model": "imagen", "prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:credential_missing", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits(), 0, "nothing is sent without a token");
    drop(gw);

    let dir = PolicyDir::with(&policy(&mock, "token_env = \"ACC_TEST_VERTEX_UNSET\"", &backup));
    let gw = Gateway::start(dir.path()).await;
    let r = gw.generate(&json!({"model": "imagen", "prompt": "x", "response_format": "b64_json"})).await;
    assert_eq!(r.attempts(), vec!["vertex:credential_missing", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_errors_and_rate_limits() {
    let mock = VertexMock::start(&["tok-env-2"]).await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&policy(&mock, "token_env = \"ACC_TEST_VERTEX_TOKEN\"", &backup));
    let gw = Gateway::start_with_env(dir.path(), &[("ACC_TEST_VERTEX_TOKEN", "tok-env-2")]).await;
    let req =
        |prompt: &str, n: u32| json!({"model": "imagen", "prompt": prompt, "n": n, "response_format": "b64_json"});

    // Every image filtered: the client gets content_policy_violation with Imagen's reason, and
    // no other provider is asked.
    let r = gw.generate(&req("something forbidden", 2)).await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("58061214"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["vertex:content_filtered"], "{}", r.describe());

    // Some filtered: the rest come back.
    let r = gw.generate(&req("partly fine", 3)).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r).len(), 1, "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.04"), "only what was generated is billed");

    // n above Imagen's 4 per call is capped rather than refused.
    let r = gw.generate(&req("many", 6)).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r).len(), 4);
    assert_eq!(parameters(&mock.last())["sampleCount"], json!(4));

    // INVALID_ARGUMENT: the client's fault, passed back OpenAI-shaped, not retried.
    mock.script(vec![google_error(400, "INVALID_ARGUMENT", "The prompt is too long for this model.")]);
    let r = gw.generate(&req("a cat", 1)).await;
    let err = r.assert_error(400, "upstream_rejected");
    assert!(err["message"].as_str().unwrap().contains("The prompt is too long"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["vertex:status_4xx"], "{}", r.describe());

    // Refused prompts come as a 400 naming the Responsible AI practices: a content filter answer.
    mock.script(vec![google_error(
        400,
        "INVALID_ARGUMENT",
        "Image generation failed: the prompt contains sensitive words that violate Google's Responsible AI practices.",
    )]);
    let r = gw.generate(&req("a cat", 1)).await;
    r.assert_error(400, "content_policy_violation");

    // Credentials refused, or a server error: retryable, the fallback answers.
    for (reply, label) in [
        (google_error(403, "PERMISSION_DENIED", "Permission 'aiplatform.endpoints.predict' denied"), "status_4xx"),
        (google_error(500, "INTERNAL", "Internal error encountered."), "status_5xx"),
        (google_error(503, "UNAVAILABLE", "The service is currently unavailable."), "status_5xx"),
    ] {
        mock.script(vec![reply]);
        let r = gw.generate(&req("a cat", 1)).await;
        r.assert_status(200);
        assert_eq!(r.attempts(), vec![format!("vertex:{label}"), "backup:ok".to_string()], "{}", r.describe());
    }
    assert_eq!(backup.hits(), 3);

    // Quota exhausted with a Retry-After: the fallback answers, and Vertex is left alone while
    // it asked to be.
    let mut quota = google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model",
    );
    quota.headers.push(("retry-after", "30".to_string()));
    mock.script(vec![quota]);
    let r = gw.generate(&req("a cat", 1)).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:status_429", "backup:ok"], "{}", r.describe());
    let hits = mock.hits();
    let r = gw.generate(&req("a cat", 1)).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:paused", "backup:ok"], "the Retry-After was honoured: {}", r.describe());
    assert_eq!(mock.hits(), hits);
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
