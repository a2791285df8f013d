//! `kind = "vertex_imagen"` end to end: the real binary against a mock of Vertex AI's Imagen
//! `:predict` endpoint that checks what Google documents (path with project, location and model,
//! bearer token, `instances`/`parameters` fields, seed only without watermark, 1..=4 samples)
//! and answers the way Imagen does: base64 predictions, `raiFilteredReason` for filtered images,
//! Google error bodies, 429 RESOURCE_EXHAUSTED.

mod common;

use common::mock::vertex::{google_error, VertexImagen};
use common::*;
use serde_json::{json, Value};

const PROJECT: &str = "acc-test-project";
const LOCATION: &str = "us-central1";
const MODEL: &str = "imagen-3.0-generate-002";
/// Imagen with these access tokens accepted.
async fn vertex(tokens: &[&str]) -> Mock<VertexImagen> {
    Mock::builder(VertexImagen::new(PROJECT, LOCATION, MODEL))
        .png(make_png(8, 8, [30, 120, 220]))
        .credential("authorization", tokens.iter().map(|t| format!("Bearer {t}")))
        .start()
        .await
}

/// `vertex` (model alias "imagen") with the given token settings, falling back to `backup`.
fn policy(mock: &Mock<VertexImagen>, token: &str, backup: &MockProvider) -> String {
    format!(
        r#"[providers.vertex]
kind = "vertex_imagen"
base_url = "{}"
project = "{PROJECT}"
location = "{LOCATION}"
{token}
price = {{ per_image_usd = 0.04 }}
breaker = {{ enabled = false }}

{}{}{}"#,
        mock.base_url(),
        openai_provider_at("backup", &backup.base_url()),
        route_toml("imagen", "imagen").target("vertex", MODEL).fallback("spare").with(TIMEOUTS),
        route_toml("spare", "spare-only").target("backup", "backup-model"),
    )
}

/// Per attempt and per request.
const TIMEOUTS: &str = "attempt_timeout_ms = 20000\ndeadline_ms = 40000";

fn parameters(c: &Captured) -> serde_json::Map<String, Value> {
    c.json()["parameters"].as_object().cloned().unwrap_or_else(|| panic!("no parameters: {}", c.json()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_request_and_answer_are_mapped_with_the_token_from_the_environment() {
    let mock = vertex(&["tok-env-1"]).await;
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
    assert_eq!(b64_images(&r), vec![mock.png().to_vec(), mock.png().to_vec()], "{}", r.describe());
    assert_eq!(r.attempts(), vec!["vertex:ok"], "{}", r.describe());
    // imagen-3.0-generate-002 takes no negative prompt (Google removed it before Imagen 3's GA;
    // the mock answers 400 as Vertex does): dropped and named, like steps and sampler.
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("negative_prompt, steps, sampler"),
        "{}",
        r.describe()
    );
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
    assert_eq!(sent.header("authorization").as_deref(), Some("Bearer tok-env-1"));
    assert!(sent.header("content-type").unwrap_or_default().starts_with("application/json"));
    let body = sent.json();
    assert_eq!(body["instances"], json!([{"prompt": "a red fox in snow"}]), "{body}");
    let p = parameters(&sent);
    assert_eq!(p["sampleCount"], json!(2), "{body}");
    assert_eq!(p["aspectRatio"], json!("16:9"), "1792x1024 is nearest 16:9: {body}");
    assert_eq!(p.get("negativePrompt"), None, "{body}");
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
    assert_eq!(&image.body[..], mock.png(), "GET {url}");
    assert_eq!(parameters(&mock.last())["aspectRatio"], json!("1:1"));
    assert_eq!(backup.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_is_cached_and_run_again_once_on_401() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // Prints tok-1, tok-2, ... : one more line in `runs` per execution.
    let script = format!("echo run >> '{0}'; echo tok-$(wc -l < '{0}' | tr -d ' ')", runs.display());
    let mock = vertex(&["tok-1"]).await;
    let backup = MockProvider::start().await;
    let token = format!("token_command = [\"sh\", \"-c\", {}]", toml_string(&script));
    let dir = PolicyDir::with(&policy(&mock, &token, &backup));
    let gw = Gateway::start(dir.path()).await;
    let count_runs = || std::fs::read_to_string(&runs).map(|s| s.lines().count()).unwrap_or(0);
    let req = json!({"model": "imagen", "prompt": "a quiet harbour", "response_format": "b64_json"});

    for _ in 0..3 {
        let r = gw.generate(&req).await;
        r.assert_status(200);
        assert_eq!(mock.last().header("authorization").as_deref(), Some("Bearer tok-1"));
    }
    assert_eq!(count_runs(), 1, "the token is cached between attempts");

    // The token is revoked: the API answers 401, the command runs again, the request is sent
    // once more with the new token, and the client never sees the 401.
    mock.set_credentials(["Bearer tok-2"]);
    let before = mock.hits();
    let r = gw.generate(&req).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:ok"], "{}", r.describe());
    assert_eq!(count_runs(), 2, "one refresh after the 401");
    let sent: Vec<Option<String>> = mock.requests()[before..].iter().map(|c| c.header("authorization")).collect();
    assert_eq!(sent, vec![Some("Bearer tok-1".to_string()), Some("Bearer tok-2".to_string())]);

    // A 401 for the fresh token too is not retried again: it is the provider's failure.
    mock.set_credentials(["Bearer nobody"]);
    let before = mock.hits();
    let r = gw.generate(&req).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:account_error", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits() - before, 2, "one try with the cached token, one with a fresh one");
    assert_eq!(count_runs(), 3);
    assert!(!r.text().contains("tok-"), "no token in the answer: {}", r.text());
    assert!(!gw.stderr().contains("tok-3"), "no token in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_token_command_or_missing_variable_is_a_credential_error() {
    let mock = vertex(&["tok-1"]).await;
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

    // A command that prints without end (a helper crashed the gateway with `yes`: its output
    // was read whole): stopped after 64 KiB, a credential error, and the gateway lives on.
    let dir = PolicyDir::with(&policy(&mock, r#"token_command = ["yes", "tok"]"#, &backup));
    let gw = Gateway::start(dir.path()).await;
    let r = gw.generate(&json!({"model": "imagen", "prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["vertex:credential_missing", "backup:ok"], "{}", r.describe());
    let trace_id = r.header("x-acc-trace-id").unwrap();
    let record = eventually(std::time::Duration::from_secs(10), || async {
        gw.admin("GET", &format!("/admin/traces/{trace_id}")).await.status == 200
    })
    .await;
    assert!(record, "the trace is written");
    let t = gw.admin("GET", &format!("/admin/traces/{trace_id}")).await.json();
    let error = t["attempts"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("printed more than 64 KiB"), "{t}");
    gw.admin("GET", "/healthz").await.assert_status(200);
    drop(gw);

    let dir = PolicyDir::with(&policy(&mock, "token_env = \"ACC_TEST_VERTEX_UNSET\"", &backup));
    let gw = Gateway::start(dir.path()).await;
    let r = gw.generate(&json!({"model": "imagen", "prompt": "x", "response_format": "b64_json"})).await;
    assert_eq!(r.attempts(), vec!["vertex:credential_missing", "backup:ok"], "{}", r.describe());
    assert_eq!(mock.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_errors_and_rate_limits() {
    let mock = vertex(&["tok-env-2"]).await;
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

    // Issue 14's failing input: an output refusal that names no Responsible AI practice, only
    // the policies and a numeric support code. Not retried elsewhere; the reason is kept.
    mock.script(vec![google_error(
        400,
        "INVALID_ARGUMENT",
        "Image generation failed with the following error: The response is blocked, as it may violate our policies. If you believe this is an error, please send feedback to your account team. Error Code: 63429089",
    )]);
    let hits = mock.hits();
    let r = gw.generate(&req("a cat", 1)).await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("Error Code: 63429089"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["vertex:content_filtered"], "{}", r.describe());
    assert_eq!(mock.hits() - hits, 1, "a content refusal is not retried");

    // Credentials refused, or a server error: retryable, the fallback answers.
    for (reply, label) in [
        (google_error(403, "PERMISSION_DENIED", "Permission 'aiplatform.endpoints.predict' denied"), "account_error"),
        (google_error(500, "INTERNAL", "Internal error encountered."), "status_5xx"),
        (google_error(503, "UNAVAILABLE", "The service is currently unavailable."), "status_5xx"),
    ] {
        mock.script(vec![reply]);
        let r = gw.generate(&req("a cat", 1)).await;
        r.assert_status(200);
        assert_eq!(r.attempts(), vec![format!("vertex:{label}"), "backup:ok".to_string()], "{}", r.describe());
    }
    assert_eq!(backup.hits(), 3);

    // A 200 with neither images nor filter reasons (every request asks for the reasons) is a
    // broken answer, not a verdict on the prompt: the fallback answers.
    for broken in
        [json!({}), json!({"predictions": []}), json!({"error": {"code": 500, "message": "x", "status": "INTERNAL"}})]
    {
        mock.script(vec![Reply::json(200, &broken)]);
        let r = gw.generate(&req("a cat", 1)).await;
        r.assert_status(200);
        assert_eq!(r.attempts(), vec!["vertex:bad_response", "backup:ok"], "{broken}: {}", r.describe());
    }
    assert_eq!(backup.hits(), 6);

    // Quota exhausted with a Retry-After: the fallback answers, and Vertex is left alone while
    // it asked to be.
    let quota = google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model",
    )
    .header("retry-after", "30");
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
