//! Hot reload of the policy dir: file polling, SIGHUP, POST /admin/reload, refusal of broken
//! policies, and no failed requests while policies change.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Route `main` (model "m") to provider `name` at `mock`.
fn route_to(name: &str, mock: &MockProvider) -> String {
    let main = route_toml("main", "m").target(name, "x").with("attempt_timeout_ms = 10000\ndeadline_ms = 20000");
    format!("{}{main}", openai_provider(name, mock))
}

/// Same as a valid policy but the target names a provider that does not exist.
fn broken_policy(mock: &MockProvider) -> String {
    format!("{}{}", openai_provider("one", mock), route_toml("main", "m").target("opnai", "x"))
}

/// Mocks `one` and `two`, and a gateway whose policy routes `main` to `one`.
async fn serving_one() -> (MockProvider, MockProvider, PolicyDir, Gateway) {
    let one = MockProvider::start().await;
    let two = MockProvider::start().await;
    let dir = PolicyDir::with(&route_to("one", &one));
    let gw = Gateway::start(dir.path()).await;
    (one, two, dir, gw)
}

fn body() -> serde_json::Value {
    json!({"model": "m", "prompt": "reload me", "response_format": "b64_json"})
}

async fn provider_of(gw: &Gateway) -> String {
    let r = gw.generate(&body()).await;
    r.assert_status(200);
    r.header("x-acc-provider").unwrap_or_else(|| panic!("no x-acc-provider: {}", r.describe()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_policy_file_takes_effect_within_two_seconds() {
    let (one, two, dir, gw) = serving_one().await;
    assert_eq!(provider_of(&gw).await, "one");
    let v1 = live_version(&gw).await;
    let ok_before = gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await;

    dir.write("policy.toml", &route_to("two", &two));
    let t = Instant::now();
    let switched = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "two" }).await;
    assert!(switched, "traffic still goes to `one` {:?} after the policy file changed", t.elapsed());

    let hits_one = one.hits();
    for _ in 0..5 {
        assert_eq!(provider_of(&gw).await, "two");
    }
    assert_eq!(one.hits(), hits_one, "the old provider must get no new traffic");

    let ok_after = gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await;
    assert!(ok_after > ok_before, "acc_policy_reloads_total{{result=\"ok\"}} did not move");
    assert_ne!(live_version(&gw).await, v1, "acc_policy_info must show the new version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_is_refused_and_old_policy_keeps_serving() {
    let (one, two, dir, gw) = serving_one().await;
    assert_eq!(provider_of(&gw).await, "one");
    let v1 = live_version(&gw).await;
    let errors_before = gw.metric("acc_policy_reloads_total", &[("result", "error")]).await;

    dir.write("policy.toml", &broken_policy(&one));
    let refused = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_policy_reloads_total", &[("result", "error")]).await > errors_before
    })
    .await;
    assert!(refused, "acc_policy_reloads_total{{result=\"error\"}} did not increment after a broken edit");

    for _ in 0..5 {
        assert_eq!(provider_of(&gw).await, "one", "the last good policy must keep serving");
    }
    assert_eq!(live_version(&gw).await, v1, "the live version must not change on a refused reload");

    let r = gw.admin("GET", "/admin/policies").await;
    r.assert_status(200);
    assert!(
        r.text().contains(r#"unknown provider \"opnai\""#) || r.text().contains(r#"unknown provider "opnai""#),
        "GET /admin/policies must show the last reload error: {}",
        r.text()
    );

    // Fixing the file recovers.
    dir.write("policy.toml", &route_to("two", &two));
    let switched = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "two" }).await;
    assert!(switched, "a fixed policy was not picked up within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_needs_token_and_applies_at_once() {
    let (one, two, dir, gw) = serving_one().await;

    let r = send("POST", &gw.admin_url("/admin/reload"), &[], Vec::new()).await;
    r.assert_status(401);
    let r = send("POST", &gw.admin_url("/admin/reload"), &[("authorization", "Bearer wrong-token")], Vec::new()).await;
    r.assert_status(401);

    let r = gw.admin("POST", "/admin/reload").await;
    r.assert_status(200);
    assert_eq!(r.json()["result"], json!("ok"), "{}", r.describe());

    dir.write("policy.toml", &route_to("two", &two));
    let r = gw.admin("POST", "/admin/reload").await;
    r.assert_status(200);
    let v = r.json();
    assert_eq!(v["result"], json!("ok"), "{}", r.describe());
    let version = v["version"].as_str().unwrap_or_else(|| panic!("no version string: {v}")).to_string();
    assert_eq!(provider_of(&gw).await, "two", "POST /admin/reload must apply the new policy before answering");
    assert_eq!(live_version(&gw).await, version, "acc_policy_info must show the reloaded version");

    dir.write("policy.toml", &broken_policy(&one));
    let r = gw.admin("POST", "/admin/reload").await;
    let err = r.assert_error_shape(422);
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains(r#"unknown provider "opnai""#), "422 message must hold the validation error: {msg}");
    assert_eq!(provider_of(&gw).await, "two", "a refused reload keeps the live policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_does_not_kill() {
    let (_one, two, dir, mut gw) = serving_one().await;

    gw.sighup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.exited().is_none(), "SIGHUP killed the gateway; stderr:\n{}", gw.stderr());
    assert_eq!(provider_of(&gw).await, "one");

    dir.write("policy.toml", &route_to("two", &two));
    gw.sighup();
    let switched = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "two" }).await;
    assert!(switched, "policy not reloaded after SIGHUP");
    assert!(gw.exited().is_none(), "gateway died after SIGHUP; stderr:\n{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_during_reloads_all_succeed() {
    let one = MockProvider::start().await;
    let two = MockProvider::start().await;
    one.set_latency(Duration::from_millis(40));
    two.set_latency(Duration::from_millis(40));
    let dir = PolicyDir::with(&route_to("one", &one));
    let gw = Arc::new(Gateway::start(dir.path()).await);

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let gw = gw.clone();
        let stop = stop.clone();
        workers.spawn(async move {
            let mut done = 0usize;
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let body = serde_json::to_vec(
                    &json!({"model": "m", "prompt": format!("w{w}"), "response_format": "b64_json"}),
                )
                .unwrap();
                match try_send("POST", &gw.url("/v1/images/generations"), &[("content-type", "application/json")], body)
                    .await
                {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(r.describe()),
                    Err(e) => failures.push(e),
                }
                done += 1;
            }
            (done, failures)
        });
    }

    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (name, mock) = if i % 2 == 0 { ("two", &two) } else { ("one", &one) };
        dir.write("policy.toml", &route_to(name, mock));
        if i % 3 != 2 {
            // Most edits are forced through the admin endpoint, the rest left to the poller.
            gw.admin("POST", "/admin/reload").await.assert_status(200);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);

    let mut total = 0;
    let mut failures = Vec::new();
    while let Some(r) = workers.join_next().await {
        let (d, f) = r.unwrap();
        total += d;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed during reloads, e.g.:\n{}",
        failures.len(),
        failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(total >= 20, "only {total} requests ran");
    assert!(one.hits() > 0 && two.hits() > 0, "reloads did not move traffic: one={} two={}", one.hits(), two.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_finishes_on_a_provider_the_new_policy_removed() {
    let one = MockProvider::start().await;
    let two = MockProvider::start().await;
    one.set_latency(Duration::from_millis(1500));
    let dir = PolicyDir::with(&route_to("one", &one));
    let gw = Arc::new(Gateway::start(dir.path()).await);

    let g = gw.clone();
    let in_flight = tokio::spawn(async move { g.generate(&body()).await });
    assert!(
        eventually(Duration::from_secs(20), || async { one.hits() == 1 }).await,
        "the request never reached provider one"
    );
    // The new policy has no provider `one` at all.
    dir.write("policy.toml", &route_to("two", &two));
    gw.admin("POST", "/admin/reload").await.assert_status(200);

    let r = in_flight.await.unwrap();
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("one"), "{}", r.describe());
    assert_eq!(provider_of(&gw).await, "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_edit_is_picked_up() {
    // Editors and `echo >` rewrite the file in place rather than renaming a new one over it.
    let (_one, two, dir, gw) = serving_one().await;
    assert_eq!(provider_of(&gw).await, "one");
    std::fs::write(dir.path().join("policy.toml"), route_to("two", &two)).unwrap();
    let switched = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "two" }).await;
    assert!(switched, "an in-place edit was not picked up within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_removed_files_are_picked_up() {
    let one = MockProvider::start().await;
    let two = MockProvider::start().await;
    let dir = PolicyDir::new();
    dir.write("50-main.toml", &route_to("one", &one));
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(provider_of(&gw).await, "one");

    // A file sorting first adds a route for the same model: it wins.
    dir.write(
        "10-override.toml",
        &format!(
            "{}\n[[routes]]\nname = \"override\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"two\", model = \"x\" }}]\n",
            openai_provider("two", &two)
        ),
    );
    let switched = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "two" }).await;
    assert!(switched, "a new policy file was not picked up within 2 s");

    // Removing it goes back.
    dir.remove("10-override.toml");
    let back = eventually(Duration::from_secs(20), || async { provider_of(&gw).await == "one" }).await;
    assert!(back, "removing a policy file was not picked up within 2 s");

    // Files that do not end in .toml are not policy.
    std::fs::write(dir.path().join("notes.txt"), "this = = is not toml").unwrap();
    std::fs::write(dir.path().join("50-main.toml.bak"), "neither = = is this").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = gw.admin("GET", "/admin/policies").await;
    r.assert_status(200);
    assert_eq!(provider_of(&gw).await, "one");
    let errors = gw.metric("acc_policy_reloads_total", &[("result", "error")]).await;
    assert_eq!(errors, 0.0, "non-.toml files must be ignored, got reload errors: {}", r.text());
}

/// Every outcome of a route's requests exists at 0 from its first policy (a series born at 1
/// shows Prometheus no increase); a reload that removes a provider and its route drops their
/// live gauges (an open breaker's gauge used to stay at 2, its alert firing until a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_start_at_zero_and_a_removed_providers_gauges_go_with_it() {
    let (_one, two, dir, gw) = serving_one().await;
    let text = gw.metrics().await;
    for outcome in ["ok", "internal_error", "no_healthy_target", "upstream_error", "client_cancelled"] {
        let line = format!("acc_requests_total{{outcome=\"{outcome}\",route=\"main\"}} 0");
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }
    assert!(text.lines().any(|l| l == "acc_requests_total{outcome=\"internal_error\",route=\"none\"} 0"));
    assert!(text.contains("acc_breaker_state{provider=\"one\"}"), "{text}");
    assert!(text.contains("acc_target_samples{model=\"x\",provider=\"one\",route=\"main\"}"), "{text}");

    dir.write("policy.toml", &route_to("two", &two));
    let r = gw.admin("POST", "/admin/reload").await;
    assert_eq!(r.json()["result"], json!("ok"), "{}", r.describe());
    let text = gw.metrics().await;
    // Gauges go; counters and histograms stay (Prometheus reads their history).
    let gauges = [
        "acc_breaker_state",
        "acc_queue_depth",
        "acc_target_samples",
        "acc_target_demoted",
        "acc_target_error_ratio",
        "acc_target_latency_seconds",
    ];
    let stale: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("provider=\"one\"") && gauges.iter().any(|g| l.starts_with(&format!("{g}{{"))))
        .collect();
    assert!(stale.is_empty(), "a removed provider's gauges stay:\n{}", stale.join("\n"));
    assert!(text.contains("acc_breaker_state{provider=\"two\"}"), "{text}");
    assert!(text.contains("acc_target_samples{model=\"x\",provider=\"two\",route=\"main\"}"), "{text}");
}

/// A policy directory that disappears and comes back unchanged (a volume remounted, a deploy
/// that moves it away and back): the reload error it caused is cleared once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_comes_back_unchanged_clears_its_reload_error() {
    let (_one, _two, dir, gw) = serving_one().await;
    let path = dir.path().to_path_buf();
    let away = path.with_extension("away");
    let error = || async { gw.admin("GET", "/admin/policies").await.json()["last_reload_error"].clone() };
    std::fs::rename(&path, &away).unwrap();
    let failed = eventually(Duration::from_secs(20), || async { !error().await.is_null() }).await;
    std::fs::rename(&away, &path).unwrap();
    assert!(failed, "the missing directory was never reported");
    let cleared = eventually(Duration::from_secs(20), || async { error().await.is_null() }).await;
    assert!(cleared, "last_reload_error stays after the directory came back: {}", error().await);
    assert_eq!(provider_of(&gw).await, "one");
}

/// `[server]` connection settings are read when the listeners start: a reload that changes them
/// is applied (the rest of the policy) and says they wait for a restart, in the log and in
/// /admin/policies, instead of seeming to take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changing_startup_only_server_settings_says_so() {
    let (one, _two, dir, gw) = serving_one().await;
    dir.write("policy.toml", &format!("[server]\nidle_timeout_ms = 500\n\n{}", route_to("one", &one)));
    let r = gw.admin("POST", "/admin/reload").await;
    assert_eq!(r.json()["result"], json!("ok"), "{}", r.describe());
    let said = "idle_timeout_ms, max_connections and admin_max_connections differ";
    let policies = gw.admin("GET", "/admin/policies").await.text();
    assert!(policies.contains(said), "{policies}");
    assert!(gw.stderr().contains(said));
}

/// A file written in place in two steps (`cat > policy.toml`, `scp`, a slow pipe) whose first
/// part parses on its own: polling applies what two polls in a row read alike, so the half
/// file, which has only the first route, is never served (it answered the second route's
/// model 404 until the rest arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_caught_half_written_is_not_served() {
    use std::io::Write;
    let one = MockProvider::start().await;
    let two = MockProvider::start().await;
    let other = route_toml("other", "o").target("one", "x");
    let dir = PolicyDir::with(&format!("{}{other}", route_to("one", &one)));
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(provider_of(&gw).await, "one");
    let ok_before = gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await;
    let (first, rest) = (route_to("two", &two), format!("{}{other}", openai_provider("one", &one)));
    let path = dir.path().join("policy.toml");
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
    file.write_all(first.as_bytes()).unwrap();
    file.flush().unwrap();
    // Well within one poll: at most one poll reads the half file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    let other_model = json!({"model": "o", "prompt": "still here", "response_format": "b64_json"});
    let t = Instant::now();
    loop {
        let r = gw.generate(&other_model).await;
        assert_eq!(r.status, 200, "route `other` lost while the file was written: {}", r.describe());
        if provider_of(&gw).await == "two" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the finished file was never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok_after = gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await;
    assert_eq!(ok_after - ok_before, 1.0, "only the finished file is applied");
    gw.generate(&other_model).await.assert_status(200);
}
