//! Compatibility with the official `openai` SDKs: runs tests/sdk/test_openai_sdk.py (in the
//! venv made by scripts/python-env.sh) and tests/sdk/test_openai_sdk.cjs (with the npm package
//! installed by scripts/node-env.sh) against a running gateway.
//! Without python3, or without Node.js where the script cannot install it, these tests FAIL:
//! SDK compatibility is part of what the suite proves.

mod common;

use std::process::Command;

use common::*;

const CLIENT_KEY: &str = "sk-acc-sdk-test-4e9d";
/// A key allowed one request per minute: the SDK must raise its RateLimitError on the second.
const LIMITED_KEY: &str = "sk-acc-sdk-limited-77aa";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_sdk_works() {
    let python_ok = Command::new("python3").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        python_ok,
        "python3 is not installed: the OpenAI SDK compatibility test (tests/sdk.rs) needs python3 with the \
         venv module (e.g. apt-get install python3 python3-venv)"
    );

    let root = repo_root();
    let setup = tokio::task::spawn_blocking({
        let script = root.join("scripts").join("python-env.sh");
        move || Command::new("bash").arg(script).output().expect("run scripts/python-env.sh")
    })
    .await
    .unwrap();
    assert!(
        setup.status.success(),
        "scripts/python-env.sh failed ({:?}):\n{}",
        setup.status.code(),
        String::from_utf8_lossy(&setup.stderr)
    );
    let python = String::from_utf8_lossy(&setup.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/python-env.sh printed no python path"))
        .trim()
        .to_string();

    let dir = PolicyDir::new();
    dir.write(
        "default.toml",
        &std::fs::read_to_string(root.join("policies").join("default.toml")).expect("read default policy"),
    );
    dir.write(
        "keys.toml",
        &format!(
            "[[keys]]\nsha256 = \"{}\"\ntenant = \"sdk\"\ntags = []\n\n[[keys]]\nsha256 = \"{}\"\ntenant = \"limited\"\nrequests_per_minute = 1\n",
            sha256_hex(CLIENT_KEY),
            sha256_hex(LIMITED_KEY)
        ),
    );
    // An OpenAI-compatible upstream answering as gpt-image-1 does: b64_json only, with usage
    // and the other top-level fields of the response object (issue 14's failing inputs 1, 2).
    let upstream = MockProvider::start().await;
    let answer = serde_json::json!({
        "created": 1_750_000_000u64,
        "data": [{"b64_json": b64_encode(upstream.png())}],
        "background": "opaque", "output_format": "png", "quality": "medium", "size": "1024x1024",
        "usage": {"input_tokens": 22, "output_tokens": 272, "total_tokens": 294,
                  "input_tokens_details": {"text_tokens": 22, "image_tokens": 0}}
    });
    upstream.set_body(Some(&answer.to_string()));
    dir.write(
        "gpt.toml",
        &format!(
            "{}\nupstream_response_format = \"omit\"\n\n[[routes]]\nname = \"gpt\"\nmatch = {{ model = \"gpt-image-1\" }}\ntargets = [{{ provider = \"gptimage\", model = \"gpt-image-1\" }}]\n",
            openai_provider_at("gptimage", &upstream.base_url()).trim_end()
        ),
    );
    let gw = Gateway::start(dir.path()).await;

    let script = root.join("tests").join("sdk").join("test_openai_sdk.py");
    let base_url = gw.url("/v1");
    let upstream_png = b64_encode(upstream.png());
    let env = [
        ("ACC_BASE_URL", base_url),
        ("ACC_API_KEY", CLIENT_KEY.into()),
        ("ACC_LIMITED_KEY", LIMITED_KEY.into()),
        ("ACC_GPT_IMAGE_B64", upstream_png),
    ];
    run_sdk_script(&gw, python, script, &env, &[]).await;
}

/// Runs `program script` (an SDK test) against the gateway with `env`, without the SDKs' own
/// `OPENAI_*` variables (nor `remove`) and bypassing proxies for loopback; prints its stdout and
/// fails the test with its output and the gateway's stderr when it fails.
async fn run_sdk_script(
    gw: &Gateway,
    program: String,
    script: std::path::PathBuf,
    env: &[(&'static str, String)],
    remove: &'static [&'static str],
) {
    let env = env.to_vec();
    let shown = script.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(&program);
        cmd.arg(&script).envs(env).env("NO_PROXY", "127.0.0.1,localhost").env("no_proxy", "127.0.0.1,localhost");
        for var in ["OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"].iter().chain(remove) {
            cmd.env_remove(var);
        }
        cmd.output().unwrap_or_else(|e| panic!("run {program}: {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{shown} failed ({:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- gateway stderr ---\n{}",
        out.status.code(),
        gw.stderr()
    );
}

/// Runs a set-up script that prints a path on its last stdout line; fails the test with its
/// stderr when it fails.
async fn setup_script(name: &str) -> String {
    let script = repo_root().join("scripts").join(name);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg(&script).output().unwrap_or_else(|e| panic!("run {}: {e}", script.display()))
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "scripts/{name} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{name} printed no path"))
        .trim()
        .to_string()
}

/// The official `openai` Node SDK (npm): generate, edit with a file, a refused request (the
/// SDK's error class with OpenAI's code) and an idempotent replay (issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_node_sdk_works() {
    let node_modules = setup_script("node-env.sh").await;
    let root = repo_root();
    let dir = PolicyDir::new();
    dir.write(
        "default.toml",
        &std::fs::read_to_string(root.join("policies").join("default.toml")).expect("read default policy"),
    );
    dir.write("keys.toml", &format!("[[keys]]\nsha256 = \"{}\"\ntenant = \"sdk\"\n", sha256_hex(CLIENT_KEY)));
    // Edits go to an OpenAI-compatible upstream; another one refuses every prompt as OpenAI's
    // content filter does.
    let editor = MockProvider::start().await;
    let filter = MockProvider::start().await;
    filter.set_error(
        400,
        &serde_json::json!({"error": {"code": "content_policy_violation", "type": "invalid_request_error", "param": null,
            "message": "Your request was rejected as a result of our safety system."}})
        .to_string(),
    );
    dir.write(
        "upstreams.toml",
        &format!(
            "{}{}{}{}",
            openai_provider_at("editor", &editor.base_url()),
            openai_provider_at("filter", &filter.base_url()),
            route_toml("edit", "ed").target("editor", "gpt-image-1"),
            route_toml("refused", "refused").target("filter", "gpt-image-1"),
        ),
    );
    let gw = Gateway::start(dir.path()).await;
    let photo = make_png(64, 48, [10, 120, 230]);
    let photo_file = dir.path().join("photo.png");
    std::fs::write(&photo_file, &photo).unwrap();

    let script = root.join("tests").join("sdk").join("test_openai_sdk.cjs");
    let base_url = gw.url("/v1");
    let upstream_png = b64_encode(editor.png());
    let env = [
        ("NODE_PATH", node_modules),
        ("ACC_BASE_URL", base_url),
        ("ACC_API_KEY", CLIENT_KEY.into()),
        ("ACC_EDIT_IMAGE", photo_file.to_string_lossy().into_owned()),
        ("ACC_UPSTREAM_B64", upstream_png),
    ];
    run_sdk_script(&gw, "node".into(), script, &env, &["NODE_OPTIONS"]).await;

    // The upstream got the SDK's file byte for byte; the refusal was asked once, not retried.
    let edits: Vec<_> = editor.requests().into_iter().filter(|c| c.generation).collect();
    assert_eq!(edits.len(), 1, "edit calls upstream: {edits:?}");
    let form = edits[0].form().await;
    let image = form.iter().find(|p| p.name == "image").unwrap_or_else(|| panic!("no image part upstream"));
    assert_eq!(image.data.to_vec(), photo, "the file reached the upstream intact");
    assert_eq!(form_text(&form, "prompt").as_deref(), Some("make the sky orange"));
    assert_eq!(filter.hits(), 1, "the refused prompt reached the provider once");
}
