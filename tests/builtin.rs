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
