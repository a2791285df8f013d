//! Fault injection through the running binary: slow, failing, resetting, stalling and
//! rate-limiting providers; circuit breakers, pauses, health demotion, hedging, provider queues,
//! client rate limits, spend limits, idempotency keys, client cancellation and cost headers.
//! Each test checks what the client got, which mocks were hit how often (nothing is generated
//! twice), and what /metrics and /admin/routes say.
//!
//! Timings are kept small but never asserted tightly: the suite runs on busy 2-core machines.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Set-up

/// Extra TOML lines for the tables of the standard policy.
#[derive(Default, Clone, Copy)]
struct Extras<'a> {
    /// `[providers.primary]`
    primary: &'a str,
    /// `[providers.backup]`
    backup: &'a str,
    /// Route `main`.
    main: &'a str,
    /// Anything else: `[[keys]]`, `[tenants.*]`, `[server]`.
    top: &'a str,
}

/// Route `main` (model "m") -> provider `primary`, falling back to route `spare` (model
/// "spare-only") -> provider `backup`; route `solo` (model "solo") -> `primary` alone.
fn policy(primary: &MockProvider, backup: &MockProvider, x: Extras) -> String {
    format!(
        "{}\n\n{}{}{}{}{}",
        x.top,
        openai_provider_with("primary", primary, x.primary),
        openai_provider_with("backup", backup, x.backup),
        route_toml("main", "m").target("primary", "primary-model").fallback("spare").with(x.main),
        route_toml("solo", "solo").target("primary", "primary-model"),
        route_toml("spare", "spare-only").target("backup", "backup-model"),
    )
}

struct Setup {
    primary: MockProvider,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

async fn setup(x: Extras<'_>) -> Setup {
    let primary = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let dir = PolicyDir::with(&policy(&primary, &backup, x));
    let gw = Gateway::start(dir.path()).await;
    Setup { primary, backup, gw, _dir: dir }
}

fn req() -> Value {
    json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": "b64_json"})
}

fn solo() -> Value {
    json!({"model": "solo", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": "b64_json"})
}

/// `x-acc-attempts`, asserting the request was answered 200 by `provider`.
fn served_by(r: &Resp, provider: &str) -> Vec<String> {
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some(provider), "{}", r.describe());
    r.attempts()
}

/// GET /admin/routes as JSON.
async fn admin_routes(gw: &Gateway) -> Value {
    let r = gw.admin("GET", "/admin/routes").await;
    r.assert_status(200);
    r.json()
}

/// `routes[name].targets[provider].health` from /admin/routes.
async fn target_health(gw: &Gateway, route: &str, provider: &str) -> Value {
    let v = admin_routes(gw).await;
    let routes = v["routes"].as_array().unwrap_or_else(|| panic!("/admin/routes has no routes array: {v}"));
    let r = routes.iter().find(|r| r["name"] == json!(route)).unwrap_or_else(|| panic!("no route {route}: {v}"));
    let targets = r["targets"].as_array().unwrap_or_else(|| panic!("route {route} has no targets: {v}"));
    let t = targets
        .iter()
        .find(|t| t["provider"] == json!(provider))
        .unwrap_or_else(|| panic!("route {route} has no target {provider}: {v}"));
    t.get("health").cloned().unwrap_or_else(|| panic!("target {route}/{provider} has no health: {v}"))
}

/// `providers[name]` from /admin/routes.
async fn admin_provider(gw: &Gateway, name: &str) -> Value {
    let v = admin_routes(gw).await;
    let providers = v["providers"].as_array().unwrap_or_else(|| panic!("/admin/routes has no providers array: {v}"));
    providers.iter().find(|p| p["name"] == json!(name)).cloned().unwrap_or_else(|| panic!("no provider {name}: {v}"))
}

/// Waits (10 s at most) until metric `name{labels}` reads `want`; panics with the scrape if not.
async fn metric_becomes(gw: &Gateway, name: &str, labels: &[(&str, &str)], want: f64) {
    let ok = eventually(Duration::from_secs(10), || async { gw.metric(name, labels).await == want }).await;
    if !ok {
        let m = gw.metrics().await;
        panic!("{name}{labels:?} = {} (expected {want}):\n{m}", metric_sum(&m, name, labels));
    }
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

// ---------------------------------------------------------------------------------------------
// The mock itself

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_faults_behave_as_documented() {
    let m = MockProvider::start().await;
    let url = format!("{}/images/generations", m.base_url());
    let body = json!({"model": "x", "prompt": "p", "n": 2});
    let raw = serde_json::to_vec(&body).unwrap();
    let ct = [("content-type", "application/json")];

    // Reset: no status at all, the connection just closes.
    m.set_fault(Fault::Reset);
    let r = try_send("POST", &url, &ct, raw.clone()).await;
    assert!(r.is_err(), "Fault::Reset must close the connection without an answer, got {:?}", r.map(|r| r.describe()));
    assert_eq!((m.hits(), m.cancelled(), m.in_flight()), (1, 0, 0));

    // Stall: 200 and headers, then part of the body, and never the rest.
    m.set_fault(Fault::StallMidBody);
    let (status, _, mut incoming) = post_head(&url, &body).await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    let stalled = tokio::time::timeout(Duration::from_millis(400), async {
        while let Some(frame) = incoming.frame().await {
            if let Ok(d) = frame.expect("body frame").into_data() {
                got.extend_from_slice(&d);
            }
        }
    })
    .await;
    assert!(stalled.is_err(), "Fault::StallMidBody must never finish its body");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with(r#"{"created""#) && serde_json::from_slice::<Value>(&got).is_err(), "{text}");
    drop(incoming);
    m.set_fault(Fault::None);

    // Extra headers on every answer.
    m.set_status(429);
    m.set_headers(vec![("retry-after".into(), "2".into())]);
    let r = send("POST", &url, &ct, raw.clone()).await;
    assert_eq!((r.status, r.header("retry-after").as_deref()), (429, Some("2")), "{}", r.describe());
    m.set_headers(Vec::new());
    m.set_status(200);

    // A script, one step per hit, then back to the default.
    m.script(vec![
        Step::new().status(500),
        Step::new().fault(Fault::Reset),
        Step::new().body(r#"{"created": 1, "data": []}"#),
        Step::new().status(503).body("down"),
    ]);
    let r = send("POST", &url, &ct, raw.clone()).await;
    assert_eq!(r.status, 500, "{}", r.describe());
    assert!(try_send("POST", &url, &ct, raw.clone()).await.is_err(), "second step resets");
    let r = send("POST", &url, &ct, raw.clone()).await;
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"created": 1, "data": []}"#));
    let r = send("POST", &url, &ct, raw.clone()).await;
    assert_eq!((r.status, r.text().as_str()), (503, "down"));
    let r = send("POST", &url, &ct, raw.clone()).await;
    assert_eq!(b64_images(&r).len(), 2, "after the script, the default answer: {}", r.describe());
    let hits = m.hits();

    // A handler dropped while waiting out its latency is counted as cancelled.
    m.set_latency(Duration::from_secs(5));
    let conn = raw_post(m.addr, "/v1/images/generations", &body, &[]).await;
    settles("the mock must see the request in flight", || m.in_flight() == 1).await;
    drop(conn);
    settles("closing the connection must drop the mock's handler", || m.cancelled() == 1).await;
    assert_eq!((m.in_flight(), m.hits()), (0, hits + 1));

    // Concurrency seen by the mock.
    m.set_latency(Duration::from_millis(300));
    let (a, b, c) = tokio::join!(
        send("POST", &url, &ct, raw.clone()),
        send("POST", &url, &ct, raw.clone()),
        send("POST", &url, &ct, raw.clone())
    );
    for r in [a, b, c] {
        r.assert_status(200);
    }
    assert_eq!((m.max_in_flight(), m.in_flight(), m.cancelled()), (3, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// Timeouts and transport faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_primary_times_out_and_the_fallback_answers() {
    let s = setup(Extras { main: "attempt_timeout_ms = 300", ..Default::default() }).await;
    s.primary.set_latency(Duration::from_secs(5));
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:timeout", "backup:ok"]);
    assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    assert!(r.header("x-acc-cost-usd").is_none(), "no prices, no cost header: {}", r.describe());
    settles("the timed-out upstream request must be dropped (connection closed)", || s.primary.cancelled() == 1).await;
    assert_eq!(s.gw.metric("acc_attempts_total", &[("provider", "primary"), ("result", "timeout")]).await, 1.0);
    assert_eq!(s.gw.metric("acc_attempts_total", &[("provider", "backup"), ("result", "ok")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_is_a_transport_error_and_falls_back() {
    let s = setup(Extras::default()).await;
    s.primary.set_fault(Fault::Reset);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:transport_error", "backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1), "a request that reached the provider is not resent");
    assert_eq!(s.gw.metric("acc_attempts_total", &[("provider", "primary"), ("result", "transport_error")]).await, 1.0);

    // Alone on its route, the reset is an upstream error, not a status the provider gave.
    let r = s.gw.generate(&solo()).await;
    r.assert_error(502, "upstream_error");
    assert_eq!(r.attempts(), ["primary:transport_error"], "{}", r.describe());
    assert_eq!(s.primary.hits(), 2);
}

/// A 200 whose body stalls half-way: a timeout, and the backup serves. The provider had made the
/// image when it started answering, so the attempt is charged (as discarded); one that never
/// answered by the deadline is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_mid_body_times_out_and_falls_back() {
    let s = setup(Extras {
        main: "attempt_timeout_ms = 500",
        primary: "price = { per_image_usd = 0.04 }",
        ..Default::default()
    })
    .await;
    let discarded = [("route", "main"), ("provider", "primary"), ("kind", "discarded")];
    s.primary.set_fault(Fault::StallMidBody);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:timeout", "backup:ok"]);
    assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", r.describe());
    assert_eq!(s.gw.metric("acc_cost_usd_total", &discarded).await, 0.04);
    // A 200 cut off mid-body: a transport error, and charged likewise.
    s.primary.set_fault(Fault::CutMidBody);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:transport_error", "backup:ok"]);
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", r.describe());
    assert_eq!(s.gw.metric("acc_cost_usd_total", &discarded).await, 0.08);
    // Silent until the deadline (no answer begun): a timeout that costs nothing.
    s.primary.set_fault(Fault::None);
    s.primary.set_latency(Duration::from_secs(2));
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:timeout", "backup:ok"]);
    assert_eq!(r.header("x-acc-cost-usd"), None, "{}", r.describe());
    assert_eq!(s.gw.metric("acc_cost_usd_total", &discarded).await, 0.08);
    // Nor a connection cut before any answer.
    s.primary.set_latency(Duration::ZERO);
    s.primary.set_fault(Fault::Reset);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:transport_error", "backup:ok"]);
    assert_eq!(r.header("x-acc-cost-usd"), None, "{}", r.describe());
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let s = setup(Extras {
        primary: "breaker = { consecutive_failures = 3, cooldown_ms = 1500, probes = 1 }",
        ..Default::default()
    })
    .await;
    let gw = &s.gw;
    let state = [("provider", "primary")];
    let to = |t: &'static str| [("provider", "primary"), ("to", t)];
    assert_eq!(gw.metric("acc_breaker_state", &state).await, 0.0);

    s.primary.set_status(500);
    for i in 0..3 {
        let r = gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_5xx", "backup:ok"], "request {i}");
    }
    let opened = Instant::now();
    assert_eq!(s.primary.hits(), 3);
    metric_becomes(gw, "acc_breaker_state", &state, 2.0).await;
    assert_eq!(gw.metric("acc_breaker_transitions_total", &to("open")).await, 1.0);

    // Open: the primary is skipped without being called.
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:breaker_open", "backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 4), "an open breaker must not let requests through");
    assert_eq!(gw.metric("acc_attempts_total", &[("provider", "primary"), ("result", "breaker_open")]).await, 1.0);

    // Nothing else to try: 503 no_healthy_target, with the time left until the probe.
    let r = gw.generate(&solo()).await;
    r.assert_error(503, "no_healthy_target");
    let ra = r.retry_after_secs();
    assert!((1..=2).contains(&ra), "Retry-After {ra} must be the cooldown left (<= 1.5 s), rounded up");
    assert_eq!(s.primary.hits(), 3);

    // (checked at the end, so that a wrong field here does not hide the rest)
    let open_admin = admin_provider(gw, "primary").await;

    // After the cooldown, still failing: the probe goes through, fails, and re-opens it.
    sleep_until(opened + Duration::from_millis(1700)).await;
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:status_5xx", "backup:ok"], "the half-open probe");
    let reopened = Instant::now();
    assert_eq!(s.primary.hits(), 4);
    metric_becomes(gw, "acc_breaker_state", &state, 2.0).await;
    assert_eq!(gw.metric("acc_breaker_transitions_total", &to("half_open")).await, 1.0);
    assert_eq!(gw.metric("acc_breaker_transitions_total", &to("open")).await, 2.0);
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:breaker_open", "backup:ok"], "a failed probe re-opens it");
    assert_eq!(s.primary.hits(), 4);

    // Healthy again: after the cooldown a probe succeeds and closes it.
    s.primary.set_status(200);
    sleep_until(reopened + Duration::from_millis(1700)).await;
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "primary"), ["primary:ok"]);
    metric_becomes(gw, "acc_breaker_state", &state, 0.0).await;
    assert_eq!(gw.metric("acc_breaker_transitions_total", &to("half_open")).await, 2.0);
    assert_eq!(gw.metric("acc_breaker_transitions_total", &to("closed")).await, 1.0);
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "primary"), ["primary:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (6, 6));
    assert_eq!(admin_provider(gw, "primary").await["breaker"]["state"], json!("closed"));

    let p = open_admin;
    assert_eq!(p["breaker"]["state"], json!("open"), "{p}");
    let left = p["breaker"]["open_until_ms"].as_f64().unwrap_or_else(|| panic!("breaker.open_until_ms: {p}"));
    assert!(left > 0.0 && left <= 1500.0, "open_until_ms {left} must be within the cooldown: {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_counts_only_consecutive_provider_failures() {
    let s =
        setup(Extras { primary: "breaker = { consecutive_failures = 3, cooldown_ms = 60000 }", ..Default::default() })
            .await;
    // A success in between resets the count.
    s.primary.script(vec![
        Step::new().status(500),
        Step::new().status(500),
        Step::ok(),
        Step::new().status(502),
        Step::new().status(503),
    ]);
    for _ in 0..5 {
        s.gw.generate(&req()).await.assert_status(200);
    }
    // Client errors and 429s are not the provider failing.
    let rejected =
        json!({"error": {"message": "bad prompt", "type": "invalid_request_error", "param": "prompt", "code": null}});
    s.primary.set_error(400, &rejected.to_string());
    for _ in 0..3 {
        s.gw.generate(&req()).await.assert_status(400);
    }
    s.primary.set_status(429);
    for _ in 0..3 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"]);
    }
    s.primary.set_status(200);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "primary"), ["primary:ok"], "the breaker must still be closed");
    assert_eq!(s.primary.hits(), 12, "every request reached the primary");
    assert_eq!(s.gw.metric("acc_breaker_state", &[("provider", "primary")]).await, 0.0);
    assert_eq!(s.gw.metric("acc_breaker_transitions_total", &[("provider", "primary")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_breaker_never_opens() {
    let s = setup(Extras { primary: "breaker = { enabled = false }", ..Default::default() }).await;
    s.primary.set_status(500);
    for _ in 0..7 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_5xx", "backup:ok"]);
    }
    assert_eq!((s.primary.hits(), s.backup.hits()), (7, 7));
}

// ---------------------------------------------------------------------------------------------
// Provider 429 pauses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_with_retry_after_pauses_it() {
    let s = setup(Extras::default()).await;
    let gw = &s.gw;
    s.primary.set_status(429);
    s.primary.set_headers(vec![("retry-after".into(), "2".into())]);
    let r = gw.generate(&req()).await;
    let paused_at = Instant::now();
    assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"]);

    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:paused", "backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 2), "a paused provider must not be called");
    assert_eq!(gw.metric("acc_provider_paused_total", &[("provider", "primary")]).await, 1.0);

    let r = gw.generate(&solo()).await;
    r.assert_error(503, "no_healthy_target");
    let ra = r.retry_after_secs();
    assert!((1..=2).contains(&ra), "Retry-After {ra} must be the pause left (<= 2 s), rounded up");
    assert_eq!(s.primary.hits(), 1);
    let p = admin_provider(gw, "primary").await;
    let left = p["paused_for_ms"].as_f64().unwrap_or_else(|| panic!("paused_for_ms: {p}"));
    assert!(left > 0.0 && left <= 2000.0, "paused_for_ms {left}: {p}");

    // After the pause, the provider is called again.
    s.primary.set_status(200);
    s.primary.set_headers(Vec::new());
    sleep_until(paused_at + Duration::from_millis(2300)).await;
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "primary"), ["primary:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (2, 2));
    assert_eq!(admin_provider(gw, "primary").await["paused_for_ms"], json!(null));
}

/// Ops who know a provider is back (a fixed key, the end of an incident) lift its 429 pause and
/// close its breaker by hand, instead of waiting out a long `Retry-After` or cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reset_lifts_a_pause_and_closes_an_open_breaker() {
    let s = setup(Extras {
        primary: "breaker = { consecutive_failures = 2, cooldown_ms = 600000, probes = 1 }",
        ..Extras::default()
    })
    .await;
    let gw = &s.gw;
    // A long pause.
    s.primary.set_status(429);
    s.primary.set_headers(vec![("retry-after".into(), "600".into())]);
    assert_eq!(served_by(&gw.generate(&req()).await, "backup"), ["primary:status_429", "backup:ok"]);
    s.primary.set_status(200);
    s.primary.set_headers(Vec::new());
    assert_eq!(served_by(&gw.generate(&req()).await, "backup"), ["primary:paused", "backup:ok"]);

    // Only with the admin token, and only for a provider the policy has.
    let r = send("POST", &gw.admin_url("/admin/providers/primary/reset"), &[], Vec::new()).await;
    assert_eq!(r.status, 401, "{}", r.describe());
    gw.admin("POST", "/admin/providers/nope/reset").await.assert_error(404, "provider_not_found");
    // A name that is not UTF-8: refused in the OpenAI error shape (axum's own answer is text).
    let e = gw.admin("POST", "/admin/providers/%FF%FE/reset").await.assert_error(400, "invalid_request");
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    gw.admin("GET", "/admin/traces/%FF").await.assert_error(400, "invalid_request");
    let r = gw.admin("GET", "/admin/providers/primary/reset").await;
    assert_eq!(r.status, 405, "{}", r.describe());

    let r = gw.admin("POST", "/admin/providers/primary/reset").await;
    r.assert_status(200);
    let v = r.json();
    assert_eq!(v["provider"], "primary", "{v}");
    assert_eq!(v["breaker_was"], "closed", "{v}");
    assert_eq!(v["replicas"], "this", "{v}");
    let was = v["paused_for_ms_was"].as_u64().unwrap_or_else(|| panic!("{v}"));
    // Ten minutes asked, cut to the provider's max_pause_ms (300 s by default).
    assert!(was > 290_000 && was <= 300_000, "{v}");
    assert_eq!(admin_provider(gw, "primary").await["paused_for_ms"], json!(null));
    assert_eq!(served_by(&gw.generate(&req()).await, "primary"), ["primary:ok"]);

    // A breaker open for ten minutes: closed by hand, its failures forgotten.
    s.primary.set_status(500);
    for _ in 0..2 {
        assert_eq!(served_by(&gw.generate(&req()).await, "backup"), ["primary:status_5xx", "backup:ok"]);
    }
    assert_eq!(served_by(&gw.generate(&req()).await, "backup"), ["primary:breaker_open", "backup:ok"]);
    s.primary.set_status(200);
    let v = gw.admin("POST", "/admin/providers/primary/reset").await.json();
    assert_eq!(v["breaker_was"], "open", "{v}");
    assert_eq!(v["paused_for_ms_was"], json!(null), "{v}");
    let p = admin_provider(gw, "primary").await;
    assert_eq!(p["breaker"]["state"], "closed", "{p}");
    assert_eq!(p["breaker"]["consecutive_failures"], 0, "{p}");
    assert_eq!(p["breaker"]["last_transition_reason"], "reset by hand", "{p}");
    assert_eq!(gw.metric("acc_breaker_state", &[("provider", "primary")]).await, 0.0);
    let closed = [("provider", "primary"), ("to", "closed")];
    assert_eq!(gw.metric("acc_breaker_transitions_total", &closed).await, 1.0);
    assert_eq!(served_by(&gw.generate(&req()).await, "primary"), ["primary:ok"]);
    // One failure after the reset does not open it again: the count started over.
    s.primary.set_status(500);
    assert_eq!(served_by(&gw.generate(&req()).await, "backup"), ["primary:status_5xx", "backup:ok"]);
    assert_eq!(admin_provider(gw, "primary").await["breaker"]["state"], "closed");
}

/// Headers of a 429, the provider's settings, and when the pause is over (None: not within the test).
type PauseRow<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<Duration>);

/// An HTTP date (IMF-fixdate) for a UNIX time.
fn http_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][month as usize - 1];
    format!("{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} GMT", secs / 3600, secs / 60 % 60, secs % 60)
}

#[test]
fn http_date_is_imf_fixdate() {
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(1_709_210_096), "Thu, 29 Feb 2024 12:34:56 GMT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_header_form_pauses_and_max_pause_ms_caps_it() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let date = http_date(now + 30);
    // (headers of the 429, provider settings, the pause is over after this long)
    let rows: [PauseRow; 6] = [
        (&[("retry-after", "30")], "", None),
        (&[("retry-after", date.as_str())], "", None),
        (&[("retry-after-ms", "30000")], "", None),
        (&[("x-ratelimit-reset-requests", "6m0s")], "", None),
        (&[("x-ratelimit-reset-requests", "1s")], "", Some(Duration::from_millis(1400))),
        (&[("retry-after", "3600")], "max_pause_ms = 1000", Some(Duration::from_millis(1400))),
    ];
    for (headers, extra, over_after) in rows {
        let s = setup(Extras { primary: extra, ..Default::default() }).await;
        let row = format!("429 with {headers:?} ({extra:?})");
        s.primary.set_status(429);
        s.primary.set_headers(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let r = s.gw.generate(&req()).await;
        let t = Instant::now();
        assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"], "{row}");
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:paused", "backup:ok"], "{row}");
        assert_eq!(s.primary.hits(), 1, "{row}");
        if let Some(d) = over_after {
            sleep_until(t + d).await;
            let r = s.gw.generate(&req()).await;
            assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"], "{row}: the pause must be over");
            assert_eq!(s.primary.hits(), 2, "{row}");
        }
    }
}

/// Every attempt refused with a 429 asking for 99999 s: the client's Retry-After is the longest
/// a provider's pause lasts (`max_pause_ms`), not the provider's value passed on (a trial saw
/// 99999, about 28 hours, on the 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_retry_after_is_capped_at_the_providers_pause() {
    let s = setup(Extras { primary: "max_pause_ms = 2000", backup: "max_pause_ms = 7000", ..Default::default() }).await;
    for p in [&s.primary, &s.backup] {
        p.set_status(429);
        p.set_headers(vec![("retry-after".into(), "99999".into())]);
    }
    let r = s.gw.generate(&req()).await;
    assert!(r.status >= 500, "{}", r.describe());
    assert_eq!(r.header("retry-after").as_deref(), Some("7"), "the longer of the two caps: {}", r.describe());
}

/// `Retry-After` with more seconds than 64 bits hold is still a long wait (capped at the
/// provider's `max_pause_ms`), and a date already past asks for no pause at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_pauses_to_the_cap_and_a_past_date_not_at_all() {
    let s = setup(Extras { primary: "max_pause_ms = 60000", ..Default::default() }).await;
    s.primary.set_status(429);
    s.primary.set_headers(vec![("retry-after".into(), "Sat, 05 Nov 1994 08:49:37 GMT".into())]);
    for _ in 0..2 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"]);
    }
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "primary")]).await, 0.0);
    s.primary.set_headers(vec![("retry-after".into(), "99999999999999999999".into())]);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"]);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:paused", "backup:ok"]);
    assert_eq!(s.primary.hits(), 3);
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "primary")]).await, 1.0);
    let routes = s.gw.admin("GET", "/admin/routes").await.json().to_string();
    let paused: Vec<u64> = routes
        .split("\"paused_for_ms\":")
        .skip(1)
        .filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(paused.iter().any(|ms| (50_000..=60_000).contains(ms)), "paused_for_ms {paused:?}: {routes}");
}

/// A pause taken under a long `max_pause_ms` ends when a reloaded, shorter one says: ops
/// lowering the cap are not stuck with the provider paused for the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_shortens_max_pause_ms_shortens_a_running_pause() {
    let s = setup(Extras { primary: "max_pause_ms = 600000", ..Default::default() }).await;
    s.primary.set_status(429);
    s.primary.set_headers(vec![("retry-after".into(), "3600".into())]);
    s.gw.generate(&req()).await;
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:paused", "backup:ok"]);
    let shorter = policy(&s.primary, &s.backup, Extras { primary: "max_pause_ms = 300", ..Default::default() });
    s._dir.write("policy.toml", &shorter);
    s.gw.admin("POST", "/admin/reload").await.assert_status(200);
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:paused", "backup:ok"], "still paused, for at most 300 ms");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"], "the pause is over");
    assert_eq!(s.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_without_a_reset_header_does_not_pause() {
    let s = setup(Extras::default()).await;
    s.primary.set_status(429);
    for _ in 0..3 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_429", "backup:ok"]);
    }
    assert_eq!(s.primary.hits(), 3);
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "primary")]).await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Target health: demotion by evaluation failures, errors, latency

/// Asserts that `main`'s primary target is demoted, in the metric and in /admin/routes.
async fn assert_demoted(gw: &Gateway) -> Value {
    let labels = [("route", "main"), ("provider", "primary")];
    metric_becomes(gw, "acc_target_demoted", &labels, 1.0).await;
    let h = target_health(gw, "main", "primary").await;
    assert_eq!(h["demoted"], json!(true), "{h}");
    assert!(h["demoted_reason"].as_str().is_some_and(|s| !s.is_empty()), "a demotion gives its reason: {h}");
    assert!(h["samples"].as_f64().is_some_and(|n| n >= 3.0), "{h}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_evaluations_demote_the_target() {
    let s = setup(Extras {
        main: "evaluators = [\"sanity\"]\nmax_eval_fail_ratio = 0.5\nhealth_min_samples = 3",
        ..Default::default()
    })
    .await;
    let gw = &s.gw;
    let labels = [("route", "main"), ("provider", "primary")];
    s.primary.answer_with(&blank(256, 256));
    for i in 0..3 {
        let r = gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:eval_failed", "backup:ok"], "request {i}");
        assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()], "the failed image is never returned");
    }
    let h = assert_demoted(gw).await;
    assert_eq!(h["eval_fail_ratio"].as_f64(), Some(1.0), "{h}");
    assert_eq!(gw.metric("acc_target_eval_fail_ratio", &labels).await, 1.0);

    // Demoted: the healthy target goes first, so the failing one is not even called.
    let r = gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 4));

    // Still in the plan, last.
    s.backup.set_status(500);
    let r = gw.generate(&req()).await;
    r.assert_error(502, "upstream_error");
    assert_eq!(r.attempts(), ["backup:status_5xx", "primary:eval_failed"], "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (4, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_ratio_demotes_the_target() {
    let s = setup(Extras {
        primary: "breaker = { enabled = false }",
        main: "max_error_ratio = 0.5\nhealth_min_samples = 3",
        ..Default::default()
    })
    .await;
    s.primary.set_status(500);
    for _ in 0..3 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "backup"), ["primary:status_5xx", "backup:ok"]);
    }
    let h = assert_demoted(&s.gw).await;
    assert_eq!(h["error_ratio"].as_f64(), Some(1.0), "{h}");
    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_slo_demotes_a_slow_target() {
    let s = setup(Extras {
        main: "attempt_timeout_ms = 10000\nlatency_slo_ms = 100\nhealth_min_samples = 3",
        ..Default::default()
    })
    .await;
    s.primary.set_latency(Duration::from_millis(300));
    for _ in 0..3 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "primary"), ["primary:ok"], "slow but within the timeout");
    }
    let h = assert_demoted(&s.gw).await;
    assert!(h["p99_ms"].as_f64().is_some_and(|ms| ms >= 250.0), "{h}");
    let p99 = [("route", "main"), ("provider", "primary"), ("percentile", "p99")];
    let q = s.gw.metric("acc_target_latency_seconds", &p99).await;
    assert!(q >= 0.25, "acc_target_latency_seconds{{percentile=\"p99\"}} = {q}");

    let r = s.gw.generate(&req()).await;
    assert_eq!(served_by(&r, "backup"), ["backup:ok"], "the demoted slow target goes last");
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 1));
}

// ---------------------------------------------------------------------------------------------
// Hedging

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_races_the_next_target_and_cancels_the_loser() {
    let s = setup(Extras { main: "hedge = { after_ms = 100 }", ..Default::default() }).await;
    s.primary.set_latency(Duration::from_secs(3));
    let r = s.gw.generate(&req()).await;
    let mut attempts = served_by(&r, "backup");
    attempts.sort();
    assert_eq!(attempts, ["backup:ok", "primary:hedge_cancelled"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![s.backup.png().to_vec()]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    settles("the losing attempt's upstream request must be dropped", || s.primary.cancelled() == 1).await;
    let h = |result: &'static str| [("route", "main"), ("result", result)];
    assert_eq!(s.gw.metric("acc_hedges_total", &h("started")).await, 1.0);
    assert_eq!(s.gw.metric("acc_hedges_total", &h("won")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_that_loses_is_cancelled() {
    let s = setup(Extras { main: "hedge = { after_ms = 100 }", ..Default::default() }).await;
    s.primary.set_latency(Duration::from_millis(600));
    s.backup.set_latency(Duration::from_secs(5));
    let r = s.gw.generate(&req()).await;
    let mut attempts = served_by(&r, "primary");
    attempts.sort();
    assert_eq!(attempts, ["backup:hedge_cancelled", "primary:ok"], "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    settles("the hedge's upstream request must be dropped", || s.backup.cancelled() == 1).await;
    let h = |result: &'static str| [("route", "main"), ("result", result)];
    assert_eq!(s.gw.metric("acc_hedges_total", &h("started")).await, 1.0);
    assert_eq!(s.gw.metric("acc_hedges_total", &h("lost")).await, 1.0);
    assert_eq!(s.gw.metric("acc_hedges_total", &h("won")).await, 0.0);
}

/// A hedge whose answer is the client's fault or a content filter's refusal ends the request
/// as it would without hedging: the primary cancelled for it does not turn it into a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedges_refusal_is_answered_as_without_hedging() {
    let s = setup(Extras { main: "hedge = { after_ms = 100 }", ..Default::default() }).await;
    s.primary.set_latency(Duration::from_secs(3));
    let refusal = json!({"error": {"message": "Your request was rejected by the safety system.", "type": "invalid_request_error", "code": "content_policy_violation"}});
    s.backup.set_error(400, &refusal.to_string());
    let r = s.gw.generate(&req()).await;
    let mut attempts = r.attempts();
    attempts.sort();
    assert_eq!(attempts, ["backup:content_filtered", "primary:hedge_cancelled"], "{}", r.describe());
    r.assert_error(400, "content_policy_violation");
    let bad = json!({"error": {"message": "size is not supported", "type": "invalid_request_error", "param": "size", "code": "invalid_size"}});
    s.backup.set_error(400, &bad.to_string());
    let r = s.gw.generate(&req()).await;
    let e = r.assert_error(400, "invalid_size");
    assert_eq!(e["param"], "size", "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hedge_when_the_first_target_answers_in_time() {
    let s = setup(Extras { main: "hedge = { after_ms = 2000 }", ..Default::default() }).await;
    for _ in 0..3 {
        let r = s.gw.generate(&req()).await;
        assert_eq!(served_by(&r, "primary"), ["primary:ok"]);
    }
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 0));
    assert_eq!(s.gw.metric("acc_hedges_total", &[("route", "main"), ("result", "started")]).await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Provider concurrency and queues

/// Sends `first`, waits until the primary is busy with it, then sends `second`.
async fn overlapping(s: &Setup, first: &Value, second: &Value) -> (Resp, Resp) {
    let a = s.gw.generate(first);
    let b = async {
        settles("the first request must reach the primary", || s.primary.in_flight() == 1).await;
        s.gw.generate(second).await
    };
    tokio::join!(a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_falls_back() {
    let s = setup(Extras {
        primary: "max_concurrency = 1\nmax_queue = 0\non_queue_full = \"fallback\"",
        ..Default::default()
    })
    .await;
    s.primary.set_latency(Duration::from_millis(1000));
    let (r1, r2) = overlapping(&s, &req(), &req()).await;
    assert_eq!(served_by(&r1, "primary"), ["primary:ok"]);
    assert_eq!(served_by(&r2, "backup"), ["primary:queue_full", "backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits(), s.primary.max_in_flight()), (1, 1, 1));
    let full = [("provider", "primary"), ("reason", "full")];
    assert_eq!(s.gw.metric("acc_queue_rejected_total", &full).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_rejects_with_provider_busy() {
    let s = setup(Extras {
        primary: "max_concurrency = 1\nmax_queue = 0\non_queue_full = \"reject\"",
        ..Default::default()
    })
    .await;
    s.primary.set_latency(Duration::from_millis(1000));
    let (r1, r2) = overlapping(&s, &req(), &req()).await;
    assert_eq!(served_by(&r1, "primary"), ["primary:ok"]);
    r2.assert_error(503, "provider_busy");
    assert_eq!(r2.retry_after_secs(), 1, "{}", r2.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0), "reject ends the request: no fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_attempts_wait_for_a_slot() {
    let s = setup(Extras { primary: "max_concurrency = 1\nmax_queue = 5", ..Default::default() }).await;
    s.primary.set_latency(Duration::from_millis(800));
    let depth = [("provider", "primary")];
    let body = req();
    let first = s.gw.generate(&body);
    let rest = async {
        settles("the first request must reach the primary", || s.primary.in_flight() == 1).await;
        let queued = async {
            eventually(Duration::from_secs(20), || async { s.gw.metric("acc_queue_depth", &depth).await == 2.0 }).await
        };
        tokio::join!(s.gw.generate(&body), s.gw.generate(&body), queued)
    };
    let (r1, (r2, r3, saw_depth)) = tokio::join!(first, rest);
    for r in [&r1, &r2, &r3] {
        assert_eq!(served_by(r, "primary"), ["primary:ok"]);
    }
    assert_eq!((s.primary.hits(), s.backup.hits()), (3, 0));
    assert_eq!(s.primary.max_in_flight(), 1, "max_concurrency = 1 must hold upstream");
    assert!(saw_depth, "acc_queue_depth{{provider=\"primary\"}} never showed the 2 waiting attempts");
    assert!(s.gw.metric("acc_queue_seconds_count", &depth).await >= 2.0);
    assert_eq!(s.gw.metric("acc_queue_depth", &depth).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_timeout_falls_back() {
    let s =
        setup(Extras { primary: "max_concurrency = 1\nmax_queue = 5\nqueue_timeout_ms = 200", ..Default::default() })
            .await;
    s.primary.set_latency(Duration::from_millis(2000));
    let (r1, r2) = overlapping(&s, &req(), &req()).await;
    assert_eq!(served_by(&r1, "primary"), ["primary:ok"]);
    assert_eq!(served_by(&r2, "backup"), ["primary:queue_timeout", "backup:ok"]);
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 1));
    let timeout = [("provider", "primary"), ("reason", "timeout")];
    assert_eq!(s.gw.metric("acc_queue_rejected_total", &timeout).await, 1.0);
}

/// `on_queue_full = "reject"` refuses a wait past `queue_timeout_ms` as it refuses a full queue:
/// 503 `provider_busy`, no fallback (the timeout used to fall back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_timeout_under_reject_refuses_with_provider_busy() {
    let s = setup(Extras {
        primary: "max_concurrency = 1\nmax_queue = 5\nqueue_timeout_ms = 200\non_queue_full = \"reject\"",
        ..Default::default()
    })
    .await;
    s.primary.set_latency(Duration::from_millis(2000));
    let (r1, r2) = overlapping(&s, &req(), &req()).await;
    assert_eq!(served_by(&r1, "primary"), ["primary:ok"]);
    let e = r2.assert_error(503, "provider_busy");
    assert!(e["message"].as_str().unwrap().contains("queue timeout"), "{}", r2.describe());
    assert_eq!(r2.header("x-acc-attempts").as_deref(), Some("primary:queue_timeout"), "{}", r2.describe());
    assert_eq!(r2.retry_after_secs(), 1, "{}", r2.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0), "reject ends the request: no fallback");
    let timeout = [("provider", "primary"), ("reason", "timeout")];
    assert_eq!(s.gw.metric("acc_queue_rejected_total", &timeout).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Client rate limits and spend limits

const KEY_A: &str = "sk-acc-faults-a-1c9e";
const KEY_B: &str = "sk-acc-faults-b-77d0";
const KEY_G: &str = "sk-acc-faults-g-3b12";

/// KEY_A and KEY_B belong to tenant `acme` (KEY_A with `key_a_limits`), KEY_G to `globex`.
fn keys(key_a_limits: &str, tenants: &str) -> String {
    format!(
        r#"[[keys]]
sha256 = "{}"
tenant = "acme"
{key_a_limits}

[[keys]]
sha256 = "{}"
tenant = "acme"

[[keys]]
sha256 = "{}"
tenant = "globex"

{tenants}
"#,
        sha256_hex(KEY_A),
        sha256_hex(KEY_B),
        sha256_hex(KEY_G)
    )
}

async fn as_key(gw: &Gateway, key: &str, body: &Value) -> Resp {
    gw.generate_with(body, &[("authorization", &format!("Bearer {key}"))]).await
}

fn with_n(n: u64) -> Value {
    let mut b = req();
    b["n"] = json!(n);
    b
}

/// Asserts a 429 rate-limit answer and returns its Retry-After.
fn assert_limited(r: &Resp, kind: &str, code: &str) -> u64 {
    let err = r.assert_error(429, code);
    assert_eq!(err["type"], json!(kind), "{}", r.describe());
    let ra = r.retry_after_secs();
    assert!(ra >= 1, "Retry-After must be >= 1: {}", r.describe());
    ra
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_per_key() {
    let s = setup(Extras { top: &keys("requests_per_minute = 2", ""), ..Default::default() }).await;
    for _ in 0..2 {
        as_key(&s.gw, KEY_A, &req()).await.assert_status(200);
    }
    let r = as_key(&s.gw, KEY_A, &req()).await;
    let ra = assert_limited(&r, "requests", "rate_limit_exceeded");
    assert!(ra <= 60, "2 per minute: Retry-After {ra} must be within the minute");
    assert_eq!(s.primary.hits(), 2, "a limited request never reaches a provider");
    assert_eq!(s.gw.metric("acc_rate_limited_total", &[("tenant", "acme"), ("limit", "requests")]).await, 1.0);
    // Per key: the tenant's other key and other tenants are not limited.
    as_key(&s.gw, KEY_B, &req()).await.assert_status(200);
    as_key(&s.gw, KEY_G, &req()).await.assert_status(200);
    assert_eq!(s.primary.hits(), 4);
    assert_eq!(s.gw.metric("acc_rate_limited_total", &[]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_per_minute_per_key_counts_n() {
    let s = setup(Extras { top: &keys("images_per_minute = 3", ""), ..Default::default() }).await;
    let r = as_key(&s.gw, KEY_A, &with_n(2)).await;
    assert_eq!(b64_images(&r).len(), 2);
    let r = as_key(&s.gw, KEY_A, &with_n(2)).await;
    assert_limited(&r, "images", "rate_limit_exceeded");
    assert_eq!(s.primary.hits(), 1);
    assert_eq!(s.gw.metric("acc_rate_limited_total", &[("tenant", "acme"), ("limit", "images")]).await, 1.0);
    // The third image of the minute still fits.
    let r = as_key(&s.gw, KEY_A, &with_n(1)).await;
    assert_eq!(b64_images(&r).len(), 1);
    let r = as_key(&s.gw, KEY_G, &with_n(2)).await;
    assert_eq!(b64_images(&r).len(), 2);
    assert_eq!(s.primary.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_requests_per_minute_spans_its_keys() {
    let s = setup(Extras { top: &keys("", "[tenants.acme]\nrequests_per_minute = 3\n"), ..Default::default() }).await;
    for key in [KEY_A, KEY_B, KEY_A] {
        as_key(&s.gw, key, &req()).await.assert_status(200);
    }
    let r = as_key(&s.gw, KEY_B, &req()).await;
    assert_limited(&r, "requests", "rate_limit_exceeded");
    assert_eq!(s.gw.metric("acc_rate_limited_total", &[("tenant", "acme"), ("limit", "requests")]).await, 1.0);
    as_key(&s.gw, KEY_G, &req()).await.assert_status(200);
    assert_eq!(s.primary.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_spend_limit_per_utc_day() {
    let s = setup(Extras {
        top: &keys("", "[tenants.acme]\nspend_usd_per_day = 0.1\n"),
        primary: "price = { per_image_usd = 0.04 }",
        ..Default::default()
    })
    .await;
    // 0.04 and 0.08 are within 0.10 whether or not the limit counts the next request's cost.
    for _ in 0..2 {
        let r = as_key(&s.gw, KEY_A, &req()).await;
        r.assert_status(200);
        assert_eq!(r.header("x-acc-cost-usd").map(|c| c.parse::<f64>().unwrap()), Some(0.04), "{}", r.describe());
    }
    // The third would pass 0.10, the fourth starts above it: one of them is refused.
    let mut refused = None;
    for i in 2..4 {
        let r = as_key(&s.gw, KEY_B, &req()).await;
        if r.status == 429 {
            refused = Some((i, r));
            break;
        }
        r.assert_status(200);
    }
    let (i, r) = refused.unwrap_or_else(|| panic!("spend_usd_per_day = 0.1 at 0.04 an image: 4 requests passed"));
    let ra = assert_limited(&r, "insufficient_quota", "spend_limit_exceeded");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(
        ra.abs_diff(to_midnight) <= 5,
        "Retry-After {ra} must be the time to the next UTC midnight ({to_midnight})"
    );
    assert_eq!(s.primary.hits(), i, "the refused request reaches no provider");
    assert_eq!(s.gw.metric("acc_rate_limited_total", &[("tenant", "acme"), ("limit", "spend")]).await, 1.0);
    // Stays refused; other tenants are unaffected.
    assert_limited(&as_key(&s.gw, KEY_A, &req()).await, "insufficient_quota", "spend_limit_exceeded");
    as_key(&s.gw, KEY_G, &req()).await.assert_status(200);
    assert_eq!(s.primary.hits(), i + 1);
}

// ---------------------------------------------------------------------------------------------
// Idempotency-Key

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_is_replayed_not_regenerated() {
    let s = setup(Extras::default()).await;
    let key = [("idempotency-key", "order-4411")];
    let r1 = s.gw.generate_with(&req(), &key).await;
    r1.assert_status(200);
    assert_eq!(r1.header("x-acc-idempotent-replay"), None, "{}", r1.describe());
    let r2 = s.gw.generate_with(&req(), &key).await;
    r2.assert_status(200);
    assert_eq!(r2.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", r2.describe());
    assert_eq!(r2.body, r1.body, "the replay is the stored body, byte for byte");
    assert_eq!(r2.header("x-acc-provider"), r1.header("x-acc-provider"));
    assert_eq!(s.primary.hits() + s.backup.hits(), 1, "the provider is not called again");
    assert_eq!(s.gw.metric("acc_idempotency_total", &[("result", "new")]).await, 1.0);
    assert_eq!(s.gw.metric("acc_idempotency_total", &[("result", "replayed")]).await, 1.0);

    // Another key generates anew.
    let r3 = s.gw.generate_with(&req(), &[("idempotency-key", "order-4412")]).await;
    r3.assert_status(200);
    assert_eq!(r3.header("x-acc-idempotent-replay"), None);
    assert_eq!(s.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_idempotent_requests_generate_once() {
    let s = setup(Extras::default()).await;
    s.primary.set_latency(Duration::from_millis(800));
    let key = [("idempotency-key", "order-77")];
    let body = req();
    let (r1, r2) = tokio::join!(s.gw.generate_with(&body, &key), async {
        settles("the first request must reach the primary", || s.primary.in_flight() == 1).await;
        s.gw.generate_with(&body, &key).await
    });
    r1.assert_status(200);
    r2.assert_status(200);
    assert_eq!(r1.body, r2.body, "both get the one generation");
    assert_eq!(r2.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", r2.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0));
    assert_eq!(s.gw.metric("acc_idempotency_total", &[("result", "waited")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_body_is_409() {
    let s = setup(Extras::default()).await;
    let key = [("idempotency-key", "order-9")];
    s.gw.generate_with(&req(), &key).await.assert_status(200);
    let mut other = req();
    other["prompt"] = json!("a lighthouse at dawn");
    let r = s.gw.generate_with(&other, &key).await;
    let err = r.assert_error(409, "idempotency_key_reused");
    assert_eq!(err["type"], json!("invalid_request_error"), "{}", r.describe());
    // The official SDKs retry a 409 unless told not to: this one would fail the same way.
    assert_eq!(r.header("x-should-retry").as_deref(), Some("false"), "{}", r.describe());
    assert_eq!(r.header("retry-after"), None, "{}", r.describe());
    assert_eq!(s.primary.hits(), 1);
    assert_eq!(s.gw.metric("acc_idempotency_total", &[("result", "conflict")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_attempt_is_not_stored() {
    let s = setup(Extras::default()).await;
    let key = [("idempotency-key", "order-500")];
    s.primary.set_status(500);
    let r = s.gw.generate_with(&solo(), &key).await;
    r.assert_error(502, "upstream_error");
    s.primary.set_status(200);
    let r = s.gw.generate_with(&solo(), &key).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-idempotent-replay"), None, "{}", r.describe());
    assert_eq!(s.primary.hits(), 2, "the retry generates anew");
    // ...and that success is what is replayed from now on.
    let r2 = s.gw.generate_with(&solo(), &key).await;
    assert_eq!(r2.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", r2.describe());
    assert_eq!(r2.body, r.body);
    assert_eq!(s.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_idempotency_keys_are_400() {
    let s = setup(Extras::default()).await;
    let long = "k".repeat(256);
    for bad in ["", long.as_str()] {
        let r = s.gw.generate_with(&req(), &[("idempotency-key", bad)]).await;
        r.assert_error(400, "invalid_idempotency_key");
    }
    // Two keys: which one a retry matches would be a guess (it used to be the first, silently).
    let r = s.gw.generate_with(&req(), &[("idempotency-key", "a-1"), ("idempotency-key", "a-2")]).await;
    let e = r.assert_error(400, "invalid_idempotency_key");
    assert!(e["message"].as_str().unwrap().contains("one Idempotency-Key header"), "{e}");
    assert_eq!(s.primary.hits(), 0);
    let longest = "k".repeat(255);
    s.gw.generate_with(&req(), &[("idempotency-key", &longest)]).await.assert_status(200);
    assert_eq!(s.primary.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_scoped_per_tenant() {
    let s = setup(Extras { top: &keys("", ""), ..Default::default() }).await;
    let send = |key: &'static str| {
        let auth = format!("Bearer {key}");
        let gw = &s.gw;
        async move { gw.generate_with(&req(), &[("authorization", &auth), ("idempotency-key", "shared-1")]).await }
    };
    let a = send(KEY_A).await;
    a.assert_status(200);
    // Same tenant, other key: the same scope.
    let b = send(KEY_B).await;
    assert_eq!(b.header("x-acc-idempotent-replay").as_deref(), Some("true"), "{}", b.describe());
    // Another tenant: its own scope.
    let g = send(KEY_G).await;
    g.assert_status(200);
    assert_eq!(g.header("x-acc-idempotent-replay"), None, "{}", g.describe());
    assert_eq!(s.primary.hits(), 2);
}

// ---------------------------------------------------------------------------------------------
// Client cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_request() {
    let s = setup(Extras::default()).await;
    s.primary.set_latency(Duration::from_secs(3));
    let conn = raw_post(s.gw.proxy_addr, "/v1/images/generations", &req(), &[]).await;
    settles("the request must reach the primary", || s.primary.in_flight() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    settles("the gateway must drop the upstream request when its client leaves", || s.primary.cancelled() == 1).await;
    let cancelled = [("route", "main"), ("outcome", "client_cancelled")];
    metric_becomes(&s.gw, "acc_requests_total", &cancelled, 1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 0), "nothing is tried for a client that left");

    // The same through an HTTP client that gives up.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), s.gw.generate(&req())).await;
    assert!(gave_up.is_err(), "the primary takes 3 s");
    settles("the second upstream request must be dropped too", || s.primary.cancelled() == 2).await;
    metric_becomes(&s.gw, "acc_requests_total", &cancelled, 2.0).await;
    assert_eq!(s.backup.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// Cost

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_header_is_n_times_the_price() {
    let s = setup(Extras {
        primary: "price = { per_image_usd = 0.04 }",
        backup: "price = { per_image_usd = { \"1024x1024\" = 0.04, \"1792x1024\" = 0.08, default = 0.05 } }",
        ..Default::default()
    })
    .await;
    let cost = |r: &Resp| -> f64 {
        r.assert_status(200);
        let c = r.header("x-acc-cost-usd").unwrap_or_else(|| panic!("no x-acc-cost-usd: {}", r.describe()));
        assert!(c.chars().all(|ch| ch.is_ascii_digit() || ch == '.'), "not a plain decimal: {c:?}");
        c.parse().unwrap()
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let r = s.gw.generate(&with_n(2)).await;
    assert!(close(cost(&r), 0.08), "{}", r.describe());
    assert_eq!(b64_images(&r).len(), 2);

    let spare = |size: &str, n: u64| json!({"model": "spare-only", "prompt": "p", "n": n, "size": size, "response_format": "b64_json"});
    let r = s.gw.generate(&spare("1792x1024", 1)).await;
    assert!(close(cost(&r), 0.08), "{}", r.describe());
    let r = s.gw.generate(&spare("512x512", 3)).await;
    assert!(close(cost(&r), 0.15), "default price x 3: {}", r.describe());
    let r = s.gw.generate(&spare("1024x1024", 1)).await;
    assert!(close(cost(&r), 0.04), "{}", r.describe());
    assert_eq!((s.primary.hits(), s.backup.hits()), (1, 3));

    let m = s.gw.metrics().await;
    let returned = |route: &str, provider: &str| {
        metric_sum(&m, "acc_cost_usd_total", &[("route", route), ("provider", provider), ("kind", "returned")])
    };
    assert!(close(returned("main", "primary"), 0.08), "{m}");
    assert!(close(returned("spare", "backup"), 0.27), "{m}");
}
