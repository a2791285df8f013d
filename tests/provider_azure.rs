//! The `azure_openai` adapter end to end, through the running binary, against a mock of Azure
//! OpenAI's image REST API: deployment-scoped paths with `api-version`, the `api-key` header,
//! OpenAI-shaped JSON and multipart bodies and answers, and Azure's own error answers (its
//! content filter, 429 with `retry-after`/`retry-after-ms`, 401, unknown deployments).

mod common;

use std::time::Duration;

use common::mock::azure::{AzureOpenAi, REVISED_PROMPT};
use common::*;
use serde_json::{json, Value};

const KEY_VAR: &str = "AZURE_TEST_IMAGES_KEY";
const KEY: &str = "az-secret-3f9a61c0d2b84e7f";
const WRONG_KEY_VAR: &str = "AZURE_TEST_IMAGES_WRONG_KEY";
const WRONG_KEY: &str = "az-wrong-77c1e0a9b5";
const UNSET_VAR: &str = "AZURE_TEST_IMAGES_KEY_NEVER_SET";
const API_VERSION: &str = "2025-04-01-preview";
/// The deployments the mock resource has.
const DEPLOYMENTS: [&str; 2] = ["dalle3-prod", "gpt-image-eu"];

// ---------------------------------------------------------------------------------------------
// Gateway set-up

struct Setup {
    az: Mock<AzureOpenAi>,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

fn azure_provider(name: &str, base_url: &str, key_var: &str, extra: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"azure_openai\"\nbase_url = \"{base_url}\"\napi_key_env = \"{key_var}\"\n\
         api_version = \"{API_VERSION}\"\n{extra}\n\n"
    )
}

/// Route `alias` -> `provider`/`model`, falling back to route `spare` (the openai-kind `backup`)
/// when `fallback`.
fn route(alias: &str, provider: &str, model: &str, fallback: bool) -> String {
    let fallbacks = if fallback { "fallbacks = [\"spare\"]\n" } else { "" };
    format!(
        "[[routes]]\nname = \"{alias}\"\nmatch = {{ model = \"{alias}\" }}\n\
         targets = [{{ provider = \"{provider}\", model = \"{model}\" }}]\n{fallbacks}\
         attempt_timeout_ms = 20000\ndeadline_ms = 40000\n\n"
    )
}

async fn setup() -> Setup {
    let az = Mock::builder(AzureOpenAi::new(&DEPLOYMENTS))
        .png(make_png(4, 4, [30, 160, 90]))
        .credential("api-key", [KEY])
        .start()
        .await;
    let backup = MockProvider::start().await;
    let url = az.base_url();
    let price = "price = { per_image_usd = 0.04, quality = { hd = 0.08 } }";
    let policy = [
        azure_provider("az", &url, KEY_VAR, price),
        azure_provider(
            "az_url",
            &url,
            KEY_VAR,
            "upstream_response_format = \"url\"\nfetch = { allow_hosts = [\"127.0.0.1\"] }",
        ),
        azure_provider("az_strict", &url, KEY_VAR, "unsupported_params = \"reject\""),
        azure_provider("az_nokey", &url, UNSET_VAR, ""),
        azure_provider("az_wrongkey", &url, WRONG_KEY_VAR, ""),
        // Pinned to the GA version: generations with dall-e-3's fields only, no edits.
        format!(
            "[providers.az_ga]\nkind = \"azure_openai\"\nbase_url = \"{url}\"\napi_key_env = \"{KEY_VAR}\"\n\
             api_version = \"2024-10-21\"\n\n"
        ),
        openai_provider("backup", &backup),
        route("dalle", "az", "dalle3-prod", true),
        route("dalle-url", "az_url", "dalle3-prod", false),
        route("dalle-strict", "az_strict", "dalle3-prod", false),
        route("dalle-nokey", "az_nokey", "dalle3-prod", false),
        route("dalle-wrongkey", "az_wrongkey", "dalle3-prod", true),
        route("dalle-missing", "az", "no-such-deployment", true),
        route("dalle-ga", "az_ga", "dalle3-prod", true),
        route("spare", "backup", "backup-model", false),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start_with_env(dir.path(), &[(KEY_VAR, KEY), (WRONG_KEY_VAR, WRONG_KEY)]).await;
    Setup { az, backup, gw, _dir: dir }
}

fn gen(model: &str) -> Value {
    json!({"model": model, "prompt": "a lighthouse in a storm, oil painting", "response_format": "b64_json"})
}

fn cost(r: &Resp) -> f64 {
    let c = r.header("x-acc-cost-usd").unwrap_or_else(|| panic!("no x-acc-cost-usd: {}", r.describe()));
    c.parse().unwrap_or_else(|_| panic!("x-acc-cost-usd {c:?} is not a number"))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_goes_to_the_deployment_with_api_key_and_version() {
    let s = setup().await;
    let mut body = gen("dalle");
    body["n"] = json!(2);
    body["size"] = json!("1792x1024");
    body["quality"] = json!("hd");
    body["style"] = json!("natural");
    body["user"] = json!("user-17");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![s.az.png().to_vec(), s.az.png().to_vec()]);
    assert_eq!(r.attempts(), vec!["az:ok"], "{}", r.describe());
    // DALL·E 3's revised prompts are hundreds of characters: each comes back whole, unescaped.
    for i in 0..2 {
        assert_eq!(r.json()["data"][i]["revised_prompt"], json!(REVISED_PROMPT), "{}", r.describe());
    }

    let call = s.az.last_call();
    assert_eq!(call.path, "/openai/deployments/dalle3-prod/images/generations");
    assert_eq!(call.query.as_deref(), Some("api-version=2025-04-01-preview"));
    assert_eq!(call.header("api-key").as_deref(), Some(KEY));
    assert_eq!(call.header("authorization"), None, "Azure keys go in api-key, not a bearer token");
    assert!(call.header("content-type").unwrap().starts_with("application/json"));
    let sent = call.json();
    assert_eq!(
        sent,
        json!({"prompt": "a lighthouse in a storm, oil painting", "n": 2, "size": "1792x1024", "quality": "hd",
            "style": "natural", "response_format": "b64_json", "user": "user-17"}),
        "the deployment names the model: no model field, nothing else"
    );
    // Priced by quality: two hd images.
    assert!((cost(&r) - 0.16).abs() < 1e-9, "{}", r.describe());
    assert_eq!(r.header("x-acc-dropped-params"), None, "{}", r.describe());
    assert_eq!(r.header("x-acc-generation").as_deref(), Some("model=dalle3-prod"), "{}", r.describe());

    // Standard quality is priced per image.
    let r = s.gw.generate(&gen("dalle")).await;
    r.assert_status(200);
    assert!((cost(&r) - 0.04).abs() < 1e-9, "{}", r.describe());
    let sent = s.az.last_call().json();
    assert_eq!(sent, json!({"prompt": "a lighthouse in a storm, oil painting", "n": 1, "response_format": "b64_json"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_parameters_are_dropped_and_said_so_or_rejected() {
    let s = setup().await;
    let mut body = gen("dalle");
    body["seed"] = json!(7);
    body["steps"] = json!(30);
    body["quality"] = json!("standard");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("seed, steps"), "{}", r.describe());
    let generation = r.header("x-acc-generation").unwrap_or_default();
    assert!(!generation.contains("seed") && !generation.contains("steps"), "dropped, so not used: {generation}");
    let sent = s.az.last_call().json();
    assert!(sent.get("seed").is_none() && sent.get("steps").is_none(), "dropped parameters were sent: {sent}");
    assert_eq!(sent["quality"], json!("standard"), "{sent}");

    // unsupported_params = "reject": a clear 400, and nothing is sent.
    let calls = s.az.calls().len();
    body["model"] = json!("dalle-strict");
    let r = s.gw.generate(&body).await;
    let err = r.assert_error(400, "unsupported_parameter");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("seed") && msg.contains("steps") && msg.contains("azure_openai"), "{msg}");
    assert_eq!(s.az.calls().len(), calls, "a rejected request must not reach Azure");
    // Without them, the strict provider is fine.
    let r = s.gw.generate(&gen("dalle-strict")).await;
    r.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_answers_are_fetched_for_b64_json_and_served_for_url() {
    let s = setup().await;
    // Azure answers with URLs; the client wants base64: the gateway fetches them.
    let r = s.gw.generate(&gen("dalle-url")).await;
    assert_eq!(b64_images(&r), vec![s.az.png().to_vec()], "{}", r.describe());
    assert_eq!(s.az.last_call().json()["response_format"], json!("url"));
    assert_eq!(s.az.count("blob"), 1);

    // The client wants a URL: it points at the gateway, which serves the fetched image.
    let mut body = gen("dalle-url");
    body["response_format"] = json!("url");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    assert!(url.starts_with(&s.gw.proxy), "the provider's signed URL must not reach the client: {url}");
    let img = get(&url, &[]).await;
    img.assert_status(200);
    assert_eq!(img.body.as_ref(), s.az.png());

    // Base64 from Azure, a URL for the client.
    let mut body = gen("dalle");
    body["response_format"] = json!("url");
    let r = s.gw.generate(&body).await;
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    assert_eq!(get(&url, &[]).await.body.as_ref(), s.az.png());
    assert_eq!(s.az.last_call().json()["response_format"], json!("b64_json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_filter_is_a_content_policy_violation_and_not_retried() {
    let s = setup().await;
    // DALL-E 3's answer when the prompt or the image trips the filter.
    s.az.then(Step::reply(
        400,
        json!({"error": {"code": "contentFilter", "message": "Your task failed as a result of our safety system.",
            "param": "prompt", "type": null, "inner_error": {"code": "ResponsibleAIPolicyViolation",
            "content_filter_results": {"sexual": {"filtered": true, "severity": "high"},
                "violence": {"filtered": false, "severity": "safe"}}}}}),
    ));
    let r = s.gw.generate(&gen("dalle")).await;
    let err = r.assert_error(400, "content_policy_violation");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("safety system") && msg.contains("sexual"), "{msg}");
    assert!(!msg.contains("violence"), "only the categories that were filtered: {msg}");
    assert_eq!(r.attempts(), vec!["az:content_filtered"], "{}", r.describe());
    assert_eq!(s.backup.hits(), 0, "another provider must not be asked to draw what the filter refused");

    // The newer shape of the same refusal.
    s.az.then(Step::reply(
        400,
        json!({"error": {"code": "content_policy_violation", "type": "invalid_request_error", "param": null,
            "message": "Your request was rejected as a result of our safety system.",
            "inner_error": {"code": "ResponsibleAIPolicyViolation", "revised_prompt": "x",
                "content_filter_results": {"violence": {"filtered": true, "severity": "medium"}}}}}),
    ));
    let r = s.gw.generate(&gen("dalle")).await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("violence"), "{}", r.describe());
    assert_eq!(s.backup.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_provider_for_its_retry_after() {
    let s = setup().await;
    s.az.then(Step::reply(429, json!({"error": {"code": "429", "message": "Requests to the ImageGenerations_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 30 seconds."}})).header("retry-after", "30").header("retry-after-ms", "30000"));
    let r = s.gw.generate(&gen("dalle")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az:status_429", "backup:ok"], "{}", r.describe());
    let calls = s.az.calls().len();
    let r = s.gw.generate(&gen("dalle")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az:paused", "backup:ok"], "{}", r.describe());
    assert_eq!(s.az.calls().len(), calls, "a paused provider is not called");
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "az")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_come_back_and_server_errors_fall_back() {
    let s = setup().await;
    s.az.then(Step::reply(
        400,
        json!({"error": {"code": "invalid_size", "param": "size", "type": "invalid_request_error",
            "message": "The size is not supported by this model."}}),
    ));
    let r = s.gw.generate(&gen("dalle")).await;
    let err = r.assert_error(400, "invalid_size");
    assert!(err["message"].as_str().unwrap().contains("not supported by this model"), "{}", r.describe());
    assert_eq!(err["param"], json!("size"));
    assert_eq!(s.backup.hits(), 0, "the client's mistake is not retried elsewhere");

    s.az.then(Step::reply(
        500,
        json!({"error": {"code": "InternalServerError", "message": "Backend returned unexpected response."}}),
    ));
    let r = s.gw.generate(&gen("dalle")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az:status_5xx", "backup:ok"], "{}", r.describe());

    // A deployment the resource does not have is the policy's mistake: try elsewhere.
    let r = s.gw.generate(&gen("dalle-missing")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az:account_error", "backup:ok"], "{}", r.describe());
    assert_eq!(s.az.last_call().path, "/openai/deployments/no-such-deployment/images/generations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_are_multipart_and_variations_are_not_offered() {
    let s = setup().await;
    let photo = make_png(64, 48, [10, 120, 230]);
    let mask = make_png(64, 48, [0, 0, 0]);
    let form = Form::new()
        .text("model", "dalle")
        .text("prompt", "add a red boat")
        .text("n", "1")
        .text("size", "1024x1024")
        .text("quality", "high")
        .text("seed", "5")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo.clone())
        .file("mask", "mask.png", "image/png", mask.clone());
    let r = s.gw.edit(&form, &[]).await;
    assert_eq!(b64_images(&r), vec![s.az.png().to_vec()], "{}", r.describe());
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("seed"), "{}", r.describe());
    let call = s.az.last_call();
    assert_eq!(call.path, "/openai/deployments/dalle3-prod/images/edits");
    assert_eq!(call.query.as_deref(), Some("api-version=2025-04-01-preview"));
    assert_eq!(call.header("api-key").as_deref(), Some(KEY));
    let parts = call.form().await;
    assert_eq!(form_text(&parts, "prompt").as_deref(), Some("add a red boat"));
    assert_eq!(form_text(&parts, "n").as_deref(), Some("1"));
    assert_eq!(form_text(&parts, "size").as_deref(), Some("1024x1024"));
    assert_eq!(form_text(&parts, "quality").as_deref(), Some("high"));
    assert_eq!(form_text(&parts, "response_format").as_deref(), Some("b64_json"));
    assert_eq!(form_text(&parts, "model"), None);
    assert_eq!(form_text(&parts, "seed"), None);
    let file = |name: &str| parts.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no {name} part"));
    assert_eq!(file("image").data.as_ref(), &photo[..]);
    assert_eq!(file("image").filename.as_deref(), Some("photo.png"));
    assert_eq!(file("mask").data.as_ref(), &mask[..]);

    let calls = s.az.calls().len();
    let form = Form::new().text("model", "dalle-strict").file("image", "photo.png", "image/png", photo);
    let r = s.gw.variation(&form, &[]).await;
    r.assert_error(400, "unsupported_operation");
    assert_eq!(s.az.calls().len(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_problems_are_clear_and_leak_nothing() {
    let s = setup().await;
    // A key variable that is not set: nothing is sent; the client hears the gateway lacks a
    // credential, the log names the variable.
    let r = s.gw.generate(&gen("dalle-nokey")).await;
    let err = r.assert_error(502, "upstream_error");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("no usable credential for this provider") && !msg.contains(UNSET_VAR), "{msg}");
    let logged = format!("environment variable {UNSET_VAR} is not set");
    settles("the log names the variable", || s.gw.stderr().contains(&logged)).await;
    assert_eq!(r.attempts(), vec!["az_nokey:credential_missing"], "{}", r.describe());
    assert!(s.az.calls().is_empty(), "no key, no call");

    // A key Azure refuses: tried elsewhere; the key is never echoed.
    let r = s.gw.generate(&gen("dalle-wrongkey")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az_wrongkey:account_error", "backup:ok"], "{}", r.describe());
    assert_eq!(s.az.last_call().header("api-key").as_deref(), Some(WRONG_KEY));

    // A working key is used too, then nothing the client or the logs see holds either key.
    s.gw.generate(&gen("dalle")).await.assert_status(200);
    s.az.then(Step::reply(500, json!({"error": {"code": "InternalServerError", "message": "boom"}})));
    let failed = s.gw.generate(&gen("dalle")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = s.gw.stderr();
    for secret in [KEY, WRONG_KEY] {
        for resp in [&r, &failed] {
            assert!(!resp.text().contains(secret), "a key reached the client: {}", resp.describe());
            assert!(resp.headers.values().all(|v| !v.to_str().unwrap_or("").contains(secret)));
        }
        assert!(!logs.contains(secret), "a key reached the logs:\n{logs}");
    }
}

/// The GA api-version (2024-10-21) has no `images/edits` and none of the GPT image fields
/// (Azure's spec for it; an audit found edits and those fields sent to it): on a provider pinned
/// to it, an edit goes to the next target and the fields are dropped and named. The default
/// version (2025-04-01-preview) has both (the other tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ga_api_version_gets_no_edits_and_no_gpt_image_fields() {
    let s = setup().await;
    let mut body = gen("dalle-ga");
    body["background"] = json!("opaque");
    body["output_format"] = json!("jpeg");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az_ga:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("background, output_format"), "{}", r.describe());
    let call = s.az.last_call();
    assert_eq!(call.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(call.json().get("background"), None);
    let calls = s.az.hits();
    let form = Form::new()
        .text("model", "dalle-ga")
        .text("prompt", "add a red boat")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", make_png(64, 48, [10, 120, 230]));
    let r = s.gw.edit(&form, &[]).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["az_ga:unsupported", "backup:ok"], "{}", r.describe());
    assert_eq!(s.az.hits(), calls, "nothing sent to a version without edits");
}
