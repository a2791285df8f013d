//! Client API keys (stored as sha256 digests), key-tag routing, and the admin token.

mod common;

use common::*;
use serde_json::json;

const BETA_KEY: &str = "sk-acc-beta-7d41c0";
const PLAIN_KEY: &str = "sk-acc-plain-93ab2e";

struct Setup {
    beta: MockProvider,
    stable: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup() -> Setup {
    let beta = MockProvider::start().await;
    let stable = MockProvider::start().await;
    let dir = PolicyDir::new();
    dir.write(
        "keys.toml",
        &format!(
            r#"[[keys]]
sha256 = "{}"
tenant = "acme"
tags = ["beta"]

[[keys]]
sha256 = "{}"
tenant = "globex"
tags = []
"#,
            sha256_hex(BETA_KEY),
            sha256_hex(PLAIN_KEY)
        ),
    );
    dir.write(
        "routes.toml",
        &format!(
            r#"{}{}
[providers.demo]
kind = "builtin"

[[routes]]
name = "beta-route"
match = {{ model = "m", key_tags = ["beta"] }}
targets = [{{ provider = "beta", model = "x" }}]

[[routes]]
name = "stable-route"
match = {{ model = "m" }}
targets = [{{ provider = "stable", model = "x" }}]

[[routes]]
name = "demo"
match = {{ model = "acc-demo" }}
targets = [{{ provider = "demo", model = "acc-demo-v1" }}]
"#,
            openai_provider("beta", &beta),
            openai_provider("stable", &stable)
        ),
    );
    let gw = Gateway::start(dir.path()).await;
    Setup { beta, stable, gw, _dir: dir }
}

fn body() -> serde_json::Value {
    json!({"model": "m", "prompt": "a red bicycle", "response_format": "b64_json"})
}

fn assert_invalid_api_key(r: &Resp) {
    let err = r.assert_error(401, "invalid_api_key");
    assert_eq!(err["type"], json!("invalid_request_error"), "{}", r.describe());
    assert_eq!(err["param"], json!(null), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_key_passes_wrong_or_missing_key_is_401() {
    let s = setup().await;
    let r = s.gw.generate_with(&body(), &[("authorization", &bearer(PLAIN_KEY))]).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r).len(), 1);

    let r = s.gw.generate_with(&body(), &[("authorization", &bearer("sk-acc-not-a-key"))]).await;
    assert_invalid_api_key(&r);

    let r = s.gw.generate(&body()).await;
    assert_invalid_api_key(&r);

    // The digest itself is not a key.
    let r = s.gw.generate_with(&body(), &[("authorization", &bearer(&sha256_hex(PLAIN_KEY)))]).await;
    assert_invalid_api_key(&r);

    // Not a bearer credential.
    let r =
        s.gw.generate_with(&body(), &[("authorization", &format!("Basic {}", b64_encode(PLAIN_KEY.as_bytes())))]).await;
    assert_invalid_api_key(&r);

    assert_eq!(s.beta.hits() + s.stable.hits(), 1, "rejected requests must never reach a provider");

    // /v1/models is behind the same keys.
    let r = get(&s.gw.url("/v1/models"), &[]).await;
    assert_invalid_api_key(&r);
    let r = get(&s.gw.url("/v1/models"), &[("authorization", &bearer(BETA_KEY))]).await;
    r.assert_status(200);
    assert_eq!(r.json()["object"], json!("list"), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_tags_select_the_route() {
    let s = setup().await;
    let r = s.gw.generate_with(&body(), &[("authorization", &bearer(BETA_KEY))]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("beta-route"), "{}", r.describe());
    assert_eq!((s.beta.hits(), s.stable.hits()), (1, 0));

    let r = s.gw.generate_with(&body(), &[("authorization", &bearer(PLAIN_KEY))]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("stable-route"), "{}", r.describe());
    assert_eq!((s.beta.hits(), s.stable.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_image_urls_need_no_key() {
    let s = setup().await;
    let r =
        s.gw.generate_with(
            &json!({"model": "acc-demo", "prompt": "a kite", "response_format": "url", "size": "256x256"}),
            &[("authorization", &bearer(PLAIN_KEY))],
        )
        .await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    let img = get(&url, &[]).await;
    img.assert_status(200);
    assert_eq!(png_dims(&img.body), (256, 256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_admin_token() {
    let s = setup().await;
    let admin_auth = bearer(ADMIN_TOKEN);
    for (method, path) in [("GET", "/admin/policies"), ("GET", "/admin/routes"), ("POST", "/admin/reload")] {
        let url = s.gw.admin_url(path);
        let r = send(method, &url, &[], Vec::new()).await;
        assert_eq!(r.status, 401, "{method} {path} without token: {}", r.describe());
        let r = send(method, &url, &[("authorization", "Bearer not-the-token")], Vec::new()).await;
        assert_eq!(r.status, 401, "{method} {path} with a wrong token: {}", r.describe());
        let r = send(method, &url, &[("authorization", &bearer(BETA_KEY))], Vec::new()).await;
        assert_eq!(r.status, 401, "{method} {path} with a client API key: {}", r.describe());
        let r = send(method, &url, &[("authorization", &admin_auth)], Vec::new()).await;
        assert_eq!(r.status, 200, "{method} {path} with the admin token: {}", r.describe());
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = get(&s.gw.admin_url(path), &[]).await;
        assert_eq!(r.status, 200, "GET {path} must be open: {}", r.describe());
    }
    let m = s.gw.metrics().await;
    assert!(m.contains("acc_policy_info"), "metrics lack acc_policy_info:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_no_auth_is_needed() {
    let mock = MockProvider::start().await;
    let dir = PolicyDir::with(&format!(
        r#"{}
[[routes]]
name = "main"
match = {{ model = "m" }}
targets = [{{ provider = "up", model = "x" }}]
"#,
        openai_provider("up", &mock)
    ));
    let gw = Gateway::start(dir.path()).await;
    gw.generate(&body()).await.assert_status(200);
    gw.generate_with(&body(), &[("authorization", "Bearer anything")]).await.assert_status(200);
    assert_eq!(mock.hits(), 2);
}
