//! Attempt order, fallbacks, failure classification, routing and weights, proven with mock
//! provider hit counts and the gateway's x-acc-* headers and metrics.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// `main` (model "m") -> provider `primary`, falling back to route `spare` -> provider `backup`.
fn primary_backup_policy(primary_url: &str, backup_url: &str, attempt_timeout_ms: u64, deadline_ms: u64) -> String {
    let timeouts = format!("attempt_timeout_ms = {attempt_timeout_ms}\ndeadline_ms = {deadline_ms}");
    format!(
        "{}{}{}{}",
        openai_provider_at("primary", primary_url),
        openai_provider_at("backup", backup_url),
        route_toml("main", "m").target("primary", "primary-model").fallback("spare").with(&timeouts),
        route_toml("spare", "spare-only").target("backup", "backup-model").with(&timeouts),
    )
}

struct Setup {
    primary: MockProvider,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup(attempt_timeout_ms: u64, deadline_ms: u64) -> Setup {
    let primary = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&primary_backup_policy(
        &primary.base_url(),
        &backup.base_url(),
        attempt_timeout_ms,
        deadline_ms,
    ));
    let gw = Gateway::start(dir.path()).await;
    Setup { primary, backup, gw, _dir: dir }
}

fn req() -> serde_json::Value {
    json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": "b64_json"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_carries_trace_route_provider_attempts_headers() {
    let s = setup(10_000, 30_000).await;
    let before = s.gw.metrics().await;
    let r = s.gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("main"), "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("primary"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{}", r.describe());
    let trace = r.header("x-acc-trace-id").unwrap_or_else(|| panic!("no trace id: {}", r.describe()));
    assert_eq!(trace.len(), 32, "trace id {trace:?} is not 32 hex digits");
    assert!(trace.chars().all(|c| c.is_ascii_hexdigit()), "trace id {trace:?} is not hex");

    let r2 = s.gw.generate(&req()).await;
    r2.assert_status(200);
    assert_ne!(r2.header("x-acc-trace-id"), Some(trace), "two requests got the same trace id");

    // The image is the provider's, the model was rewritten for the provider.
    assert_eq!(b64_images(&r), vec![s.primary.png().to_vec()]);
    assert_eq!(s.primary.hits(), 2);
    assert_eq!(s.backup.hits(), 0);
    let sent = s.primary.last_body_json();
    assert_eq!(sent["model"], json!("primary-model"), "forwarded body: {sent}");
    assert_eq!(sent["prompt"], json!("a lighthouse at dusk"), "forwarded body: {sent}");

    let after = s.gw.metrics().await;
    let d = |name: &str, labels: &[(&str, &str)]| metric_sum(&after, name, labels) - metric_sum(&before, name, labels);
    assert_eq!(d("acc_requests_total", &[("route", "main")]), 2.0, "acc_requests_total{{route=\"main\"}}:\n{after}");
    assert_eq!(
        d("acc_request_duration_seconds_count", &[("route", "main")]),
        2.0,
        "acc_request_duration_seconds{{route=\"main\"}} count:\n{after}"
    );
    assert_eq!(
        d("acc_attempts_total", &[("route", "main"), ("provider", "primary"), ("result", "ok")]),
        2.0,
        "acc_attempts_total{{route=\"main\",provider=\"primary\",result=\"ok\"}}:\n{after}"
    );
    assert_eq!(
        d("acc_provider_latency_seconds_count", &[("provider", "primary"), ("model", "primary-model")]),
        2.0,
        "acc_provider_latency_seconds{{provider=\"primary\",model=\"primary-model\"}} count:\n{after}"
    );
    assert_eq!(d("acc_fallbacks_total", &[]), 0.0, "no fallback happened:\n{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_500_falls_back_to_backup_once() {
    let s = setup(10_000, 30_000).await;
    s.primary.set_status(500);
    let before = s.gw.metrics().await;
    let r = s.gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(s.primary.hits(), 1, "primary must be tried exactly once");
    assert_eq!(s.backup.hits(), 1, "backup must be tried exactly once");
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()]);
    assert_eq!(s.backup.last_body_json()["model"], json!("backup-model"));
    // The settings header describes the attempt whose image was returned, not the first one.
    assert_eq!(r.header("x-acc-generation").as_deref(), Some("model=backup-model"), "{}", r.describe());

    let after = s.gw.metrics().await;
    let d = |name: &str, labels: &[(&str, &str)]| metric_sum(&after, name, labels) - metric_sum(&before, name, labels);
    assert_eq!(
        d("acc_attempts_total", &[("provider", "primary"), ("result", "status_5xx")]),
        1.0,
        "acc_attempts_total for primary/status_5xx must grow by 1:\n{after}"
    );
    assert_eq!(
        d("acc_attempts_total", &[("provider", "backup"), ("result", "ok")]),
        1.0,
        "acc_attempts_total for backup/ok must grow by 1:\n{after}"
    );
    assert_eq!(d("acc_fallbacks_total", &[]), 1.0, "acc_fallbacks_total must grow by 1:\n{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_falls_back() {
    let s = setup(10_000, 30_000).await;
    s.primary.set_status(429);
    let r = s.gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:status_429", "backup:ok"], "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_error_falls_back() {
    let backup = MockProvider::start().await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port());
    let dir = PolicyDir::with(&primary_backup_policy(&dead, &backup.base_url(), 10_000, 30_000));
    let gw = Gateway::start(dir.path()).await;
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(backup.hits(), 1);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:connect_error", "backup:ok"], "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_primary_beyond_attempt_timeout_falls_back() {
    let s = setup(500, 30_000).await;
    s.primary.set_latency(Duration::from_secs(6));
    let t = Instant::now();
    let r = s.gw.generate(&req()).await;
    let took = t.elapsed();
    r.assert_status(200);
    assert!(took < Duration::from_secs(4), "attempt_timeout_ms=500 not enforced: took {took:?}");
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
    assert_eq!(r.attempts(), vec!["primary:timeout", "backup:ok"], "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_routes_are_followed_in_listed_order() {
    let a = MockProvider::start().await;
    let b = MockProvider::start().await;
    let c = MockProvider::start().await;
    let policy = format!(
        r#"{}{}{}
[[routes]]
name = "forward"
match = {{ model = "fwd" }}
targets = [{{ provider = "a", model = "a-model" }}]
fallbacks = ["second", "third"]

[[routes]]
name = "backward"
match = {{ model = "bwd" }}
targets = [{{ provider = "a", model = "a-model" }}]
fallbacks = ["third", "second"]

[[routes]]
name = "second"
match = {{ model = "second-only" }}
targets = [{{ provider = "b", model = "b-model" }}]

[[routes]]
name = "third"
match = {{ model = "third-only" }}
targets = [{{ provider = "c", model = "c-model" }}]
"#,
        openai_provider("a", &a),
        openai_provider("b", &b),
        openai_provider("c", &c)
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;

    a.set_status(500);
    b.set_status(503);
    let r = gw.generate(&json!({"model": "fwd", "prompt": "p", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["a:status_5xx", "b:status_5xx", "c:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("c"), "{}", r.describe());
    assert_eq!((a.hits(), b.hits(), c.hits()), (1, 1, 1));

    // Same failures, the other order of fallbacks: c is tried before b.
    b.set_status(200);
    c.set_status(502);
    let r = gw.generate(&json!({"model": "bwd", "prompt": "p", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["a:status_5xx", "c:status_5xx", "b:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("b"), "{}", r.describe());
    assert_eq!((a.hits(), b.hits(), c.hits()), (2, 2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_targets_after_the_weighted_pick_go_by_weight_highest_first() {
    let a = MockProvider::start().await;
    let b = MockProvider::start().await;
    let c = MockProvider::start().await;
    for m in [&a, &b, &c] {
        m.set_status(500);
    }
    let policy = format!(
        r#"{}{}{}
[[routes]]
name = "main"
match = {{ model = "m" }}
targets = [{{ provider = "a", model = "x", weight = 1 }}, {{ provider = "b", model = "x", weight = 5 }}, {{ provider = "c", model = "x", weight = 2 }}]
"#,
        // The breakers would open after five failures in a row; this test is about the order.
        openai_provider_with("a", &a, "breaker = { enabled = false }"),
        openai_provider_with("b", &b, "breaker = { enabled = false }"),
        openai_provider_with("c", &c, "breaker = { enabled = false }")
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    for i in 0..24 {
        let r = gw.generate(&json!({"model": "m", "prompt": format!("p{i}")})).await;
        r.assert_error(502, "upstream_error");
        let attempts = r.attempts();
        let expected: Vec<String> = match attempts.first().map(|s| s.as_str()) {
            Some("a:status_5xx") => vec!["a", "b", "c"],
            Some("b:status_5xx") => vec!["b", "c", "a"],
            Some("c:status_5xx") => vec!["c", "b", "a"],
            _ => panic!("unexpected attempts {attempts:?}"),
        }
        .into_iter()
        .map(|p| format!("{p}:status_5xx"))
        .collect();
        assert_eq!(attempts, expected, "remaining targets must be tried by weight, highest first");
    }
    assert_eq!(a.hits() + b.hits() + c.hits(), 72, "each target exactly once per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_400_is_returned_as_is_and_not_retried() {
    let s = setup(10_000, 30_000).await;
    let upstream_error = json!({"error": {
        "message": "The size is not supported by this model.",
        "type": "invalid_request_error",
        "param": "size",
        "code": "invalid_size"
    }});
    s.primary.set_error(400, &upstream_error.to_string());
    let r = s.gw.generate(&req()).await;
    let err = r.assert_error(400, "invalid_size");
    assert_eq!(err, upstream_error["error"], "the upstream error must reach the client unchanged");
    assert_eq!(s.primary.hits(), 1, "a 400 must not be retried");
    assert_eq!(s.backup.hits(), 0, "a 400 is the client's fault: the backup must not be hit");
    assert_eq!(r.attempts(), vec!["primary:status_4xx"], "{}", r.describe());
    assert_eq!(r.header("x-should-retry").as_deref(), Some("false"), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_filter_refusal_is_content_policy_violation_and_not_retried() {
    let s = setup(10_000, 30_000).await;
    s.primary.set_error(
        400,
        &json!({"error": {
            "message": "Your request was rejected by the safety system. safety_violations=[violence].",
            "type": "image_generation_user_error", "param": null, "code": "moderation_blocked"
        }})
        .to_string(),
    );
    let r = s.gw.generate(&req()).await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("safety_violations=[violence]"), "{err}");
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0), "another provider must not be asked to draw it");
    assert_eq!(r.attempts(), vec!["primary:content_filtered"], "{}", r.describe());
}

/// Issue 14's failing input: a provider account problem answered as a 400 (or a 429 that
/// waiting does not fix, or a model the account cannot use) is not the client's fault: the
/// route's fallback is tried, and the client gets the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_account_problems_fall_back() {
    let cases = [
        (
            400,
            json!({"error": {"code": "billing_hard_limit_reached", "type": "invalid_request_error", "message": "Billing hard limit has been reached", "param": null}}),
        ),
        (
            429,
            json!({"error": {"code": "insufficient_quota", "type": "insufficient_quota", "message": "You exceeded your current quota, please check your plan and billing details."}}),
        ),
        (
            403,
            json!({"error": {"code": null, "type": "invalid_request_error", "message": "Your organization must be verified to use the model `gpt-image-1`."}}),
        ),
        (
            404,
            json!({"error": {"code": "model_not_found", "type": "invalid_request_error", "message": "The model `primary-model` does not exist or you do not have access to it."}}),
        ),
    ];
    for (status, body) in cases {
        let s = setup(10_000, 30_000).await;
        s.primary.set_error(status, &body.to_string());
        let r = s.gw.generate(&req()).await;
        r.assert_status(200);
        assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1), "{status} {body}");
        assert_eq!(r.header("x-acc-provider").as_deref(), Some("backup"), "{}", r.describe());
        assert_eq!(r.attempts(), vec!["primary:account_error", "backup:ok"], "{status}: {}", r.describe());
        let m = s.gw.metrics().await;
        assert_eq!(
            metric_sum(&m, "acc_attempts_total", &[("provider", "primary"), ("result", "account_error")]),
            1.0,
            "{status}:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_attempts_failing_gives_502_listing_each_attempt() {
    let s = setup(10_000, 30_000).await;
    s.primary.set_status(500);
    s.backup.set_status(503);
    let r = s.gw.generate(&req()).await;
    let err = r.assert_error(502, "upstream_error");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("500") && msg.contains("503"), "message must give each attempt's reason: {msg}");
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:status_5xx"], "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1), "each target is tried once");
    assert!(r.header("x-acc-trace-id").is_some(), "error answers carry a trace id too");
    // Server errors may pass: the client may retry, and is told when.
    assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{}", r.describe());
    assert_eq!(r.header("x-should-retry"), None, "{}", r.describe());
}

/// A provider down for maintenance says when to come back (`Retry-After` on a 503): the
/// client is told the same, not to retry every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_retry_after_is_passed_on_to_the_client() {
    let s = setup(10_000, 30_000).await;
    s.primary.set_status(503);
    s.primary.set_headers(vec![("retry-after".into(), "120".into())]);
    s.backup.set_status(500);
    let r = s.gw.generate(&req()).await;
    r.assert_error(502, "upstream_error");
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:status_5xx"], "{}", r.describe());
    assert_eq!(r.header("retry-after").as_deref(), Some("120"), "{}", r.describe());
}

/// When every target failed on its account (billing, key), retrying soon fails the same way:
/// the answer tells the SDKs not to retry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_failing_on_their_accounts_is_not_retried_by_sdks() {
    let s = setup(10_000, 30_000).await;
    let billing = json!({"error": {"code": "billing_hard_limit_reached", "type": "invalid_request_error", "message": "Billing hard limit has been reached"}});
    s.primary.set_error(400, &billing.to_string());
    s.backup.set_error(
        401,
        &json!({"error": {"code": "invalid_api_key", "message": "Incorrect API key provided: sk-zzz"}}).to_string(),
    );
    let r = s.gw.generate(&req()).await;
    let err = r.assert_error(502, "upstream_error");
    assert!(!err["message"].as_str().unwrap().contains("sk-zzz"), "{err}");
    assert_eq!(r.attempts(), vec!["primary:account_error", "backup:account_error"], "{}", r.describe());
    assert_eq!(r.header("x-should-retry").as_deref(), Some("false"), "{}", r.describe());
    assert_eq!(r.header("retry-after"), None, "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_attempts_timing_out_gives_504() {
    let s = setup(400, 30_000).await;
    s.primary.set_latency(Duration::from_secs(6));
    s.backup.set_latency(Duration::from_secs(6));
    let t = Instant::now();
    let r = s.gw.generate(&req()).await;
    let took = t.elapsed();
    let err = r.assert_error(504, "upstream_timeout");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let msg = err["message"].as_str().unwrap().to_lowercase();
    assert!(msg.matches("time").count() >= 2, "message must give each attempt's reason (two timeouts): {msg}");
    assert_eq!(r.attempts(), vec!["primary:timeout", "backup:timeout"], "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_total_failure_follows_the_last_attempt() {
    // 500 then timeout -> 504
    let s = setup(400, 30_000).await;
    s.primary.set_status(500);
    s.backup.set_latency(Duration::from_secs(6));
    let r = s.gw.generate(&req()).await;
    r.assert_error(504, "upstream_timeout");
    assert_eq!(r.attempts(), vec!["primary:status_5xx", "backup:timeout"], "{}", r.describe());

    // timeout then 500 -> 502
    s.primary.set_status(200);
    s.primary.set_latency(Duration::from_secs(6));
    s.backup.set_latency(Duration::ZERO);
    s.backup.set_status(500);
    let r = s.gw.generate(&req()).await;
    r.assert_error(502, "upstream_error");
    assert_eq!(r.attempts(), vec!["primary:timeout", "backup:status_5xx"], "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_deadline_stops_all_attempts_with_504() {
    // The attempt may run as long as the request (a deadline below the attempt timeout is
    // refused by validation): when it ends, the deadline has passed and no fallback starts.
    let s = setup(700, 700).await;
    s.primary.set_latency(Duration::from_secs(6));
    let t = Instant::now();
    let r = s.gw.generate(&req()).await;
    let took = t.elapsed();
    r.assert_error(504, "upstream_timeout");
    assert!(took < Duration::from_secs(4), "deadline_ms=700 not enforced: took {took:?}");
    assert_eq!(s.backup.hits(), 0, "no attempt may start after the request deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_model_alias_and_default_model() {
    let a = MockProvider::start().await;
    let b = MockProvider::start().await;
    let policy = format!(
        r#"default_model = "beta"
{}{}
[[routes]]
name = "route-a"
match = {{ model = "alpha" }}
targets = [{{ provider = "pa", model = "upstream-alpha" }}]

[[routes]]
name = "route-b"
match = {{ model = "beta" }}
targets = [{{ provider = "pb", model = "upstream-beta" }}]
"#,
        openai_provider("pa", &a),
        openai_provider("pb", &b)
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;

    let r = gw.generate(&json!({"model": "alpha", "prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("route-a"), "{}", r.describe());
    assert_eq!((a.hits(), b.hits()), (1, 0));
    assert_eq!(a.last_body_json()["model"], json!("upstream-alpha"));

    let r = gw.generate(&json!({"model": "beta", "prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("route-b"), "{}", r.describe());
    assert_eq!((a.hits(), b.hits()), (1, 1));
    assert_eq!(b.last_body_json()["model"], json!("upstream-beta"));

    // No model in the request: default_model.
    let r = gw.generate(&json!({"prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("route-b"), "{}", r.describe());
    assert_eq!((a.hits(), b.hits()), (1, 2));

    let r = gw.generate(&json!({"model": "gamma", "prompt": "x"})).await;
    r.assert_error(404, "model_not_found");
    assert_eq!((a.hits(), b.hits()), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_cohort_header() {
    let mkt = MockProvider::start().await;
    let dflt = MockProvider::start().await;
    let policy = format!(
        r#"{}{}
[[routes]]
name = "marketing"
match = {{ model = "m", cohort = "marketing" }}
targets = [{{ provider = "mkt", model = "x" }}]

[[routes]]
name = "everyone"
match = {{ model = "m" }}
targets = [{{ provider = "dflt", model = "x" }}]
"#,
        openai_provider("mkt", &mkt),
        openai_provider("dflt", &dflt)
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    let body = json!({"model": "m", "prompt": "x", "response_format": "b64_json"});

    let r = gw.generate_with(&body, &[("x-acc-cohort", "marketing")]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("marketing"), "{}", r.describe());
    assert_eq!((mkt.hits(), dflt.hits()), (1, 0));

    let r = gw.generate_with(&body, &[("x-acc-cohort", "sales")]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("everyone"), "{}", r.describe());
    assert_eq!((mkt.hits(), dflt.hits()), (1, 1));

    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("everyone"), "{}", r.describe());
    assert_eq!((mkt.hits(), dflt.hits()), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic() {
    let heavy = MockProvider::start().await;
    let light = MockProvider::start().await;
    let policy = format!(
        r#"{}{}
[[routes]]
name = "split"
match = {{ model = "m" }}
targets = [{{ provider = "heavy", model = "x", weight = 3 }}, {{ provider = "light", model = "x", weight = 1 }}]
"#,
        openai_provider("heavy", &heavy),
        openai_provider("light", &light)
    );
    let dir = PolicyDir::with(&policy);
    let gw = std::sync::Arc::new(Gateway::start(dir.path()).await);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..4 {
        let gw = gw.clone();
        set.spawn(async move {
            let mut by_header = (0usize, 0usize);
            for i in 0..50 {
                let r = gw
                    .generate(&json!({"model": "m", "prompt": format!("w{w} r{i}"), "response_format": "b64_json"}))
                    .await;
                r.assert_status(200);
                match r.header("x-acc-provider").as_deref() {
                    Some("heavy") => by_header.0 += 1,
                    Some("light") => by_header.1 += 1,
                    other => panic!("unexpected provider {other:?}"),
                }
            }
            by_header
        });
    }
    let mut by_header = (0, 0);
    while let Some(r) = set.join_next().await {
        let (h, l) = r.unwrap();
        by_header.0 += h;
        by_header.1 += l;
    }
    assert_eq!(heavy.hits() + light.hits(), 200, "every request hits exactly one target");
    assert_eq!(by_header, (heavy.hits(), light.hits()), "x-acc-provider agrees with the mocks");
    assert!(
        (120..=180).contains(&heavy.hits()),
        "weights 3:1 over 200 requests: heavy got {} (expected 150±30), light {}",
        heavy.hits(),
        light.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_key_comes_from_api_key_env_not_from_the_client() {
    let up = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let policy = format!(
        r#"[providers.up]
kind = "openai"
base_url = "{}"
api_key_env = "MOCK_UPSTREAM_KEY"

[providers.nokey]
kind = "openai"
base_url = "{}"
api_key_env = "MOCK_KEY_THAT_IS_NOT_SET_9F1"

{}
[[routes]]
name = "keyed"
match = {{ model = "keyed" }}
targets = [{{ provider = "up", model = "x" }}]

[[routes]]
name = "unkeyed"
match = {{ model = "unkeyed" }}
targets = [{{ provider = "nokey", model = "x" }}]
fallbacks = ["spare"]

[[routes]]
name = "spare"
match = {{ model = "spare-only" }}
targets = [{{ provider = "backup", model = "x" }}]
"#,
        up.base_url(),
        up.base_url(),
        openai_provider("backup", &backup)
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start_with_env(dir.path(), &[("MOCK_UPSTREAM_KEY", "sk-upstream-123")]).await;

    let r = gw
        .generate_with(
            &json!({"model": "keyed", "prompt": "x", "response_format": "b64_json"}),
            &[("authorization", "Bearer sk-client-secret")],
        )
        .await;
    r.assert_status(200);
    assert_eq!(up.last_header("authorization").as_deref(), Some("Bearer sk-upstream-123"));

    // Missing credential: the provider is skipped (never called) and the fallback answers.
    let hits = up.hits();
    let r = gw.generate(&json!({"model": "unkeyed", "prompt": "x", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["nokey:credential_missing", "backup:ok"], "{}", r.describe());
    assert_eq!(up.hits(), hits, "a provider without its credential must not be called");
    assert_eq!(backup.hits(), 1);
}

#[test]
fn metric_parser_reads_labels_and_values() {
    let text = "# HELP x y\n# TYPE acc_attempts_total counter\n\
        acc_attempts_total{provider=\"a\",result=\"ok\",route=\"main\"} 3\n\
        acc_attempts_total{provider=\"b\",result=\"status_5xx\",route=\"main\"} 2\n\
        acc_policy_info{version=\"v\\\"1\"} 1\n\
        acc_x 7\n";
    assert_eq!(metric_sum(text, "acc_attempts_total", &[]), 5.0);
    assert_eq!(metric_sum(text, "acc_attempts_total", &[("provider", "b")]), 2.0);
    assert_eq!(metric_sum(text, "acc_attempts_total", &[("provider", "c")]), 0.0);
    assert_eq!(metric_sum(text, "acc_policy_info", &[("version", "v\"1")]), 1.0);
    assert_eq!(metric_sum(text, "acc_x", &[]), 7.0);
}
