//! Client API keys (stored as sha256 digests), key-tag routing, and the admin token.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

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
async fn two_authorization_headers_are_refused_whatever_their_order() {
    let s = setup().await;
    let (good, bad) = (bearer(PLAIN_KEY), bearer("sk-acc-not-a-key"));
    let payload = serde_json::to_vec(&body()).unwrap();
    for pair in [[&good, &bad], [&bad, &good], [&good, &good]] {
        let headers = [("content-type", "application/json"), ("authorization", pair[0]), ("authorization", pair[1])];
        let r = send("POST", &s.gw.url("/v1/images/generations"), &headers, payload.clone()).await;
        assert_invalid_api_key(&r);
        assert!(
            r.json()["error"]["message"].as_str().unwrap().contains("one Authorization header"),
            "{}",
            r.describe()
        );
    }
    assert_eq!(s.beta.hits() + s.stable.hits(), 0, "refused requests must never reach a provider");
    let admin = bearer(ADMIN_TOKEN);
    let r = send(
        "GET",
        &s.gw.admin_url("/admin/routes"),
        &[("authorization", &admin), ("authorization", &admin)],
        Vec::new(),
    )
    .await;
    r.assert_error(401, "missing_admin_token");
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

/// The admin 401 says whose token is missing (issue 14): the server's (ACC_ADMIN_TOKEN not set,
/// and how to set it) or the client's (no bearer, another scheme, a wrong token), and never
/// echoes a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_401_says_whether_the_server_or_the_client_lacks_the_token() {
    let dir = PolicyDir::with("[providers.demo]\nkind = \"builtin\"\n\n[[routes]]\nname = \"demo\"\nmatch = { model = \"acc-demo\" }\ntargets = [{ provider = \"demo\" }]\n");
    let gw = Gateway::start(dir.path()).await;
    let url = gw.admin_url("/admin/policies");
    let cases = [
        (None, "missing_admin_token", "no admin token in the request: send the server's ACC_ADMIN_TOKEN as `Authorization: Bearer <token>`"),
        (
            Some("Basic dGVzdDp0ZXN0"),
            "missing_admin_token",
            "the Authorization header is not a bearer token: send `Authorization: Bearer <token>` with the server's ACC_ADMIN_TOKEN",
        ),
        (
            Some("Bearer sk-not-the-admin-token-9f"),
            "invalid_admin_token",
            "wrong admin token: the bearer token sent is not the server's ACC_ADMIN_TOKEN",
        ),
    ];
    for (auth, code, message) in cases {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = get(&url, &headers).await;
        let err = r.assert_error(401, code);
        assert_eq!(err["message"], json!(message), "{auth:?}: {}", r.describe());
        assert_eq!(err["type"], json!("invalid_request_error"), "{}", r.describe());
        assert!(!r.text().contains("sk-not-the-admin-token-9f") && !r.text().contains(ADMIN_TOKEN), "{}", r.describe());
    }

    // `acc traces` without the variable says the token is missing on this side.
    let admin = gw.admin.clone();
    let out = tokio::task::spawn_blocking(move || acc_command().args(["traces", "--admin", &admin]).output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        stderr.trim_end().rsplit_once(": no admin token").map(|(_, rest)| rest),
        Some(
            " in the request: send the server's ACC_ADMIN_TOKEN as `Authorization: Bearer <token>` \
             (ACC_ADMIN_TOKEN is not set here: export it with the gateway's admin token)"
        ),
        "{stderr}"
    );

    // A gateway started without ACC_ADMIN_TOKEN: the server lacks it, whatever the client sends.
    let gw = Gateway::start_with_env(dir.path(), &[("ACC_ADMIN_TOKEN", "")]).await;
    for auth in [None, Some(bearer(ADMIN_TOKEN))] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = get(&gw.admin_url("/admin/policies"), &headers).await;
        let err = r.assert_error(401, "admin_token_not_configured");
        assert_eq!(
            err["message"],
            json!(
                "the server has no admin token: ACC_ADMIN_TOKEN was not set when this gateway started, so /admin/* is \
                 disabled; restart `acc serve` with ACC_ADMIN_TOKEN set to a secret and send it as \
                 `Authorization: Bearer <token>`"
            ),
            "{}",
            r.describe()
        );
        assert!(!r.text().contains(ADMIN_TOKEN), "{}", r.describe());
    }
    // Probes stay open.
    get(&gw.admin_url("/healthz"), &[]).await.assert_status(200);
}

/// A known admin path asked with another method answers 405 in the OpenAI error shape with the
/// methods it takes in `Allow`, like the proxy listener (not an empty body).
/// Wrong admin tokens are answered one at a time after a pause, and a burst beyond the line is
/// refused at once with 429, so the token cannot be guessed at line rate; the right token is
/// never delayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_admin_tokens_are_paced() {
    let s = setup().await;
    let url = s.gw.admin_url("/admin/policies");
    let t0 = std::time::Instant::now();
    get(&url, &[("authorization", "Bearer not-it")]).await.assert_error(401, "invalid_admin_token");
    assert!(t0.elapsed() >= Duration::from_millis(900), "a wrong token waits: {:?}", t0.elapsed());
    let guesses: Vec<_> = (0..12)
        .map(|i| {
            let (url, auth) = (url.clone(), format!("Bearer guess-{i}"));
            tokio::spawn(async move { get(&url, &[("authorization", auth.as_str())]).await })
        })
        .collect();
    let mut codes = Vec::new();
    for g in guesses {
        let r = g.await.unwrap();
        codes.push(r.status);
        if r.status == 429 {
            r.assert_error(429, "too_many_wrong_admin_tokens");
            assert_eq!(r.header("retry-after").as_deref(), Some("5"));
        }
    }
    assert!(codes.iter().filter(|&&c| c == 429).count() >= 4, "a burst of 12 beyond a line of 8: {codes:?}");
    assert!(codes.iter().all(|&c| c == 401 || c == 429), "{codes:?}");
    let t0 = std::time::Instant::now();
    get(&url, &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))]).await.assert_status(200);
    assert!(t0.elapsed() < Duration::from_millis(900), "the right token is not paced: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_path_with_another_method_is_an_openai_shaped_405() {
    let dir = PolicyDir::with("[providers.demo]\nkind = \"builtin\"\n\n[[routes]]\nname = \"demo\"\nmatch = { model = \"acc-demo\" }\ntargets = [{ provider = \"demo\" }]\n");
    let gw = Gateway::start(dir.path()).await;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    for (method, path, allow) in [
        ("GET", "/admin/reload", "POST"),
        ("DELETE", "/metrics", "GET,HEAD"),
        ("GET", "/admin/reviews/0123456789abcdef0123456789abcdef/approve", "POST"),
    ] {
        let r = send(method, &gw.admin_url(path), &[("authorization", &auth)], Vec::new()).await;
        r.assert_error(405, "method_not_allowed");
        assert_eq!(r.header("allow").as_deref(), Some(allow), "{method} {path}: {}", r.describe());
    }
}
