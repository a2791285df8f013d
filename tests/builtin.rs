//! The shipped default policy (policies/ of the repo) and its built-in demo provider.

mod common;

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

async fn default_gateway() -> Gateway {
    Gateway::start(&repo_root().join("policies")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_png_has_the_requested_size() {
    let gw = default_gateway().await;
    let r = gw.generate(&json!({"model": "acc-demo", "prompt": "a blue whale", "response_format": "b64_json"})).await;
    assert_eq!(png_dims(&b64_one(&r)), (1024, 1024), "default size is 1024x1024");
    let v = r.json();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let created = v["created"].as_i64().unwrap_or_else(|| panic!("no integer created: {v}"));
    assert!((created - now).abs() < 300, "created {created} is not now ({now})");
    assert_eq!(r.header("x-acc-route").as_deref(), Some("demo"), "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("demo"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["demo:ok"], "{}", r.describe());

    for (size, dims) in [("256x256", (256, 256)), ("1792x1024", (1792, 1024)), ("512x768", (512, 768))] {
        let r = gw
            .generate(
                &json!({"model": "acc-demo", "prompt": "a blue whale", "size": size, "response_format": "b64_json"}),
            )
            .await;
        assert_eq!(png_dims(&b64_one(&r)), dims, "size {size}");
    }
    // No model at all: default_model = "acc-demo".
    let r = gw.generate(&json!({"prompt": "a blue whale", "size": "256x256", "response_format": "b64_json"})).await;
    assert_eq!(png_dims(&b64_one(&r)), (256, 256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_images_are_distinct() {
    let gw = default_gateway().await;
    for seed in [None, Some(42)] {
        let mut body = json!({"model": "acc-demo", "prompt": "three cats", "n": 3, "size": "256x256", "response_format": "b64_json"});
        if let Some(s) = seed {
            body["seed"] = json!(s);
        }
        let r = gw.generate(&body).await;
        let imgs = b64_images(&r);
        assert_eq!(imgs.len(), 3, "{}", r.describe());
        for img in &imgs {
            assert_eq!(png_dims(img), (256, 256));
        }
        let distinct: HashSet<&Vec<u8>> = imgs.iter().collect();
        assert_eq!(distinct.len(), 3, "n=3 (seed {seed:?}) must give 3 different images");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_prompt_and_seed_give_identical_bytes() {
    let gw = default_gateway().await;
    let gen = |prompt: &str, seed: i64| json!({"model": "acc-demo", "prompt": prompt, "seed": seed, "size": "256x256", "response_format": "b64_json"});
    let a = b64_one(&gw.generate(&gen("a red fox", 7)).await);
    let b = b64_one(&gw.generate(&gen("a red fox", 7)).await);
    assert!(a == b, "same prompt + seed must give identical bytes");
    let c = b64_one(&gw.generate(&gen("a red fox", 8)).await);
    assert!(a != c, "a different seed must give a different image");
    let d = b64_one(&gw.generate(&gen("a grey fox", 7)).await);
    assert!(a != d, "a different prompt must give a different image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_response_serves_the_png() {
    let gw = default_gateway().await;
    let body =
        json!({"model": "acc-demo", "prompt": "a lantern", "seed": 3, "size": "256x256", "response_format": "url"});
    let r = gw.generate(&body).await;
    r.assert_status(200);
    let v = r.json();
    let url = v["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {v}")).to_string();
    assert!(v["data"][0].get("b64_json").is_none(), "url answers carry no b64_json: {v}");
    assert!(url.starts_with("http://"), "{url}");
    assert!(url.contains("/v1/images/artifacts/") && url.ends_with(".png"), "unexpected url shape {url}");

    let img = get(&url, &[]).await;
    img.assert_status(200);
    assert_eq!(img.header("content-type").as_deref(), Some("image/png"), "{}", img.describe());
    assert_eq!(png_dims(&img.body), (256, 256));

    // Deterministic: the same request as b64_json gives the very bytes the URL serves.
    let mut b = body.clone();
    b["response_format"] = json!("b64_json");
    let direct = b64_one(&gw.generate(&b).await);
    assert!(direct == img.body.to_vec(), "url and b64_json must carry the same image");

    // An id that was never issued.
    let base = &url[..url.rfind('/').unwrap()];
    let missing = get(&format!("{base}/0123456789abcdef0123456789abcdef.png"), &[]).await;
    assert_eq!(missing.status, 404, "{}", missing.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_defaults_to_url() {
    let gw = default_gateway().await;
    let r = gw.generate(&json!({"prompt": "a tram", "n": 2, "size": "256x256"})).await;
    r.assert_status(200);
    let v = r.json();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{v}");
    let mut bodies = Vec::new();
    for d in data {
        let url = d["url"].as_str().unwrap_or_else(|| panic!("default response_format must be url: {v}"));
        let img = get(url, &[]).await;
        img.assert_status(200);
        assert_eq!(png_dims(&img.body), (256, 256));
        bodies.push(img.body.to_vec());
    }
    assert!(bodies[0] != bodies[1], "two images, two different URLs' contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_acc_demo() {
    let gw = default_gateway().await;
    let r = get(&gw.url("/v1/models"), &[]).await;
    r.assert_status(200);
    let v = r.json();
    assert_eq!(v["object"], json!("list"), "{v}");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"acc-demo"), "acc-demo missing from {v}");
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], json!("model"), "{m}");
    }
}

/// `cache-control: private, max-age=N` of a gateway-served image.
fn max_age(r: &Resp) -> u64 {
    let cc = r.header("cache-control").unwrap_or_else(|| panic!("no cache-control: {}", r.describe()));
    let n = cc
        .strip_prefix("private, max-age=")
        .unwrap_or_else(|| panic!("cache-control {cc:?} is not private, max-age=N"));
    n.parse().unwrap_or_else(|e| panic!("max-age in {cc:?}: {e}"))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An image's caching headers match its URL's remaining lifetime (issue 14): `max-age` is the
/// whole seconds left of `url_ttl_secs` and `expires` the same instant; after the expiry, 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_caching_matches_the_urls_remaining_lifetime() {
    const TTL: f64 = 100.0;
    let dir = PolicyDir::with(
        "[server]\nurl_ttl_secs = 100\n\n[providers.demo]\nkind = \"builtin\"\n\n[[routes]]\nname = \"demo\"\nmatch = { model = \"acc-demo\" }\ntargets = [{ provider = \"demo\" }]\n",
    );
    let gw = Gateway::start(dir.path()).await;
    let body = json!({"model": "acc-demo", "prompt": "a lantern", "size": "256x256", "response_format": "url"});
    let asked = std::time::Instant::now();
    let r = gw.generate(&body).await;
    let answered = std::time::Instant::now();
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();

    let mut previous = u64::MAX;
    for pause in [0, 1100] {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        let (fetch_start, sys_start) = (std::time::Instant::now(), SystemTime::now());
        let img = get(&url, &[]).await;
        let (fetch_end, sys_end) = (std::time::Instant::now(), SystemTime::now());
        img.assert_status(200);
        let secs = max_age(&img);
        // The image was stored between `asked` and `answered`, served between the fetch's ends.
        let most = TTL - (fetch_start - answered).as_secs_f64();
        let least = TTL - (fetch_end - asked).as_secs_f64();
        assert!(secs as f64 <= most && secs as f64 > least - 1.0, "max-age {secs} outside ({least} - 1, {most}]");
        assert!(secs < previous, "max-age {secs} did not shrink from {previous} after {pause} ms");
        previous = secs;
        let expires = img.header("expires").unwrap_or_else(|| panic!("no expires: {}", img.describe()));
        let expires =
            unix_secs(httpdate::parse_http_date(&expires).unwrap_or_else(|e| panic!("expires {expires:?}: {e}")));
        assert!(
            (unix_secs(sys_start) + secs..=unix_secs(sys_end) + secs).contains(&expires),
            "expires {expires} is not now + max-age {secs} ({:?}..{:?})",
            sys_start,
            sys_end
        );
    }

    // A one-second URL: max-age 0 while it lives, then 404 as before.
    dir.write(
        "policy.toml",
        &std::fs::read_to_string(dir.path().join("policy.toml"))
            .unwrap()
            .replace("url_ttl_secs = 100", "url_ttl_secs = 1"),
    );
    gw.admin("POST", "/admin/reload").await.assert_status(200);
    let r = gw.generate(&body).await;
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    let img = get(&url, &[]).await;
    if img.status == 200 {
        assert_eq!(max_age(&img), 0, "{}", img.describe());
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    get(&url, &[]).await.assert_error(404, "artifact_not_found");
}
