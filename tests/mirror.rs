//! Shadow traffic and canaries through the running binary: mirror sampling (rate, determinism
//! per trace id), isolation of the client from slow or failing candidates, the in-flight and
//! spend caps, the side-by-side report (admin endpoint, metrics and `acc report`), the canary's
//! guard (roll back, stay rolled back, reset on a policy edit, leave a healthy canary alone) and
//! shutdown with mirrors in flight.
//!
//! Mirrors finish after the client's answer, so everything they do is awaited with `eventually`.
//! Timings are never asserted tightly: the suite runs on busy 2-core machines.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Set-up

fn req(model: &str) -> Value {
    json!({"model": model, "prompt": "a lighthouse at dusk", "n": 1, "size": "256x256", "response_format": "b64_json"})
}

/// A route `name` (model `name`) served by provider `primary` (model "p-model"), with extra
/// TOML lines (mirror, canary, evaluators...).
fn route(name: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmatch = {{ model = \"{name}\" }}\n\
         targets = [{{ provider = \"primary\", model = \"p-model\" }}]\n{extra}\n\n"
    )
}

/// Asserts the client got the primary's answer, untouched by any mirror.
fn assert_primary(r: &Resp, primary_png: &[u8]) {
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("primary"), "{}", r.describe());
    assert_eq!(r.attempts(), ["primary:ok"], "mirrors never show in the client's attempts: {}", r.describe());
    assert_eq!(b64_images(r), vec![primary_png.to_vec()], "the client gets the primary's image: {}", r.describe());
    assert!(r.header("x-acc-canary").is_none_or(|v| v != "true"), "not a canary request: {}", r.describe());
}

/// `acc_mirror_requests_total{route,candidate}` (all results).
async fn mirrored(gw: &Gateway, route: &str, cand: &str) -> f64 {
    gw.metric("acc_mirror_requests_total", &[("route", route), ("candidate", cand)]).await
}

/// `acc_mirror_dropped_total{route,candidate}` (all reasons).
async fn dropped(gw: &Gateway, route: &str, cand: &str) -> f64 {
    gw.metric("acc_mirror_dropped_total", &[("route", route), ("candidate", cand)]).await
}

/// Waits until every mirror started so far has finished: nothing in flight at the mock, and
/// the gateway has counted every request the mock received. A short pause first lets mirrors
/// that were spawned but have not reached the mock yet arrive.
async fn mirrors_settle(gw: &Gateway, route: &str, cand: &str, mock: &MockProvider) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ok = eventually(Duration::from_secs(30), || async {
        mock.in_flight() == 0 && mirrored(gw, route, cand).await == mock.hits() as f64
    })
    .await;
    assert!(
        ok,
        "mirrors of {route} -> {cand} did not settle: mock hits {} in flight {}, acc_mirror_requests_total {}\n{}",
        mock.hits(),
        mock.in_flight(),
        mirrored(gw, route, cand).await,
        gw.metrics().await
    );
}

/// Sends `n` copies of `body`, `parallel` at a time; answers in completion order.
async fn burst(gw: &Gateway, body: &Value, headers: &[(&str, &str)], n: usize, parallel: usize) -> Vec<Resp> {
    futures_util::stream::iter(0..n).map(|_| gw.generate_with(body, headers)).buffer_unordered(parallel).collect().await
}

/// GET /admin/mirror/report as JSON.
async fn report(gw: &Gateway) -> Value {
    let r = gw.admin("GET", "/admin/mirror/report").await;
    r.assert_status(200);
    r.json()
}

/// The report entry for `route` / `cand` in a report (`{"routes":[...]}`) or a single route
/// object, if present.
fn report_entry(v: &Value, route: &str, cand: &str) -> Option<Value> {
    let routes: Vec<&Value> = match v.get("routes").and_then(|r| r.as_array()) {
        Some(rs) => rs.iter().collect(),
        None => vec![v],
    };
    let r = routes.into_iter().find(|r| r["route"] == json!(route))?;
    // The contract's example names the candidate with a "candidate" key that it also uses for
    // the candidate's numbers; the label may therefore be under "name".
    r["candidates"].as_array()?.iter().find(|c| c["candidate"] == json!(cand) || c["name"] == json!(cand)).cloned()
}

/// Waits until the report's `route` / `cand` entry has `pairs >= n`; returns it.
async fn report_with_pairs(gw: &Gateway, route: &str, cand: &str, n: u64) -> Value {
    let ok = eventually(Duration::from_secs(15), || async {
        report_entry(&report(gw).await, route, cand).is_some_and(|e| e["pairs"].as_u64().is_some_and(|p| p >= n))
    })
    .await;
    let v = report(gw).await;
    assert!(ok, "report for {route} / {cand} never reached {n} pairs: {v:#}");
    report_entry(&v, route, cand).unwrap()
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// `acc report ARGS...` with the admin token (or without it) in the environment.
async fn acc_report(args: Vec<String>, token: Option<&str>) -> std::process::Output {
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = acc_command();
        cmd.arg("report").args(&args);
        if let Some(t) = token {
            cmd.env("ACC_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap_or_else(|e| panic!("cannot run acc report: {e}"))
    })
    .await
    .unwrap()
}

/// `routes[name].canary` from /admin/routes.
async fn canary(gw: &Gateway, name: &str) -> Value {
    let r = gw.admin("GET", "/admin/routes").await;
    r.assert_status(200);
    let v = r.json();
    let routes = v["routes"].as_array().unwrap_or_else(|| panic!("/admin/routes has no routes array: {v}"));
    let r = routes.iter().find(|r| r["name"] == json!(name)).unwrap_or_else(|| panic!("no route {name}: {v}"));
    r.get("canary").cloned().unwrap_or_else(|| panic!("route {name} has no canary: {r}"))
}

// ---------------------------------------------------------------------------------------------
// Sampling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_samples_the_configured_share_deterministically_and_never_touches_the_answer() {
    let primary = MockProvider::start().await;
    let cand = MockProvider::start().await;
    let never = MockProvider::start().await;
    let always = MockProvider::start().await;
    let primary_png = make_png(8, 8, [10, 200, 30]);
    primary.answer_with(&primary_png);
    for m in [&cand, &never, &always] {
        m.answer_with(&make_png(8, 8, [250, 0, 0]));
    }
    let policy = [
        openai_provider("primary", &primary),
        openai_provider("cand", &cand),
        openai_provider("never", &never),
        openai_provider("always", &always),
        route("m", r#"mirror = [{ provider = "cand", model = "cand-model", sample = 0.3, max_in_flight = 100 }]"#),
        route("zero", r#"mirror = [{ provider = "never", model = "n-model", sample = 0.0 }]"#),
        route("one", r#"mirror = [{ provider = "always", model = "a-model", sample = 1.0, max_in_flight = 100 }]"#),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    let c = "cand/cand-model";

    // 300 requests, each with a trace id of the gateway's making.
    const N: usize = 300;
    let mut drawn = 0usize;
    for r in burst(&gw, &req("m"), &[], N, 4).await {
        assert_primary(&r, &primary_png);
        // The draw is the gateway's own function of the trace id: which requests are mirrored
        // is known exactly.
        drawn += usize::from(acc::mirror::draw(&r.header("x-acc-trace-id").unwrap(), c) < 0.3);
    }
    // Wait for exactly those (a check that nothing is in flight could pass before a starved
    // mirror runtime started any).
    let all = eventually(Duration::from_secs(30), || async {
        cand.hits() == drawn && mirrored(&gw, "m", c).await == drawn as f64
    })
    .await;
    assert!(all, "{drawn} requests drew a mirror; the candidate got {}", cand.hits());
    mirrors_settle(&gw, "m", c, &cand).await;
    // Binomial(300, 0.3): mean 90, sigma ~7.9; allow 4.5 sigma.
    let hits = cand.hits() as f64;
    let (mean, sigma) = (N as f64 * 0.3, (N as f64 * 0.3 * 0.7).sqrt());
    assert!(
        (hits - mean).abs() <= 4.5 * sigma,
        "sample 0.3 of {N} mirrored {hits} (expected {mean} +- {})",
        4.5 * sigma
    );
    assert_eq!(dropped(&gw, "m", c).await, 0.0, "max_in_flight 100 with an instant candidate drops nothing");
    assert_eq!(
        gw.metric("acc_mirror_requests_total", &[("route", "m"), ("candidate", c), ("result", "ok")]).await,
        hits
    );
    // The mirror goes through the adapter with the candidate's model and the client's prompt.
    let sent = cand.last_body_json();
    assert_eq!(sent["model"], json!("cand-model"), "{sent}");
    assert_eq!(sent["prompt"], json!("a lighthouse at dusk"), "{sent}");
    assert_eq!(primary.hits(), N, "the primary is called once per request");

    // Deterministic per trace id: the same id is always mirrored or never. Try ids until both
    // kinds have been seen (0.7^20: practically never all alike).
    let (mut yes, mut no) = (0, 0);
    for i in 0..20u128 {
        let id = format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835).wrapping_add(i + 1));
        let before = cand.hits();
        for r in burst(&gw, &req("m"), &[("x-acc-trace-id", &id)], 10, 2).await {
            assert_primary(&r, &primary_png);
        }
        // Wait for this id's mirrors to have started and ended, so that none of them is counted
        // with the next id's (a loaded machine starts them late).
        let expected = if acc::mirror::draw(&id, c) < 0.3 { 10 } else { 0 };
        let landed = eventually(Duration::from_secs(30), || async {
            cand.hits() >= before + expected && mirrored(&gw, "m", c).await >= (before + expected) as f64
        })
        .await;
        assert!(landed, "trace id {id}: {expected} mirrors expected, the candidate got {}", cand.hits() - before);
        mirrors_settle(&gw, "m", c, &cand).await;
        match cand.hits() - before {
            0 => no += 1,
            10 => yes += 1,
            d => panic!("trace id {id} sent 10 times was mirrored {d} times: all or none expected"),
        }
        if yes > 0 && no > 0 && i >= 3 {
            break;
        }
    }
    assert!(yes > 0 && no > 0, "with sample 0.3, some trace ids must be mirrored and some not ({yes} / {no})");

    // sample = 0: never; sample = 1: every request.
    for r in burst(&gw, &req("zero"), &[], 20, 4).await {
        assert_primary(&r, &primary_png);
    }
    for r in burst(&gw, &req("one"), &[], 20, 4).await {
        assert_primary(&r, &primary_png);
    }
    settles("sample 1.0 mirrors every request", || always.hits() == 20).await;
    mirrors_settle(&gw, "one", "always/a-model", &always).await;
    assert_eq!(mirrored(&gw, "one", "always/a-model").await, 20.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(never.hits(), 0, "sample 0 must never mirror");
    assert_eq!(mirrored(&gw, "zero", "never/n-model").await + dropped(&gw, "zero", "never/n-model").await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Isolation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_failing_candidates_never_change_or_slow_the_primary_answer() {
    let primary = MockProvider::start().await;
    let slow = MockProvider::start().await;
    let failing = MockProvider::start().await;
    let primary_png = noisy(16, 16, 1);
    primary.answer_with(&primary_png);
    slow.answer_with(&noisy(16, 16, 2));
    slow.set_latency(Duration::from_secs(2));
    failing.set_status(500);
    let policy = [
        openai_provider("primary", &primary),
        openai_provider("slow", &slow),
        openai_provider("failing", &failing),
        route("s", r#"mirror = [{ provider = "slow", model = "s-model", sample = 1.0 }]"#),
        route("f", r#"mirror = [{ provider = "failing", model = "f-model", sample = 1.0 }]"#),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;

    for (model, mock) in [("s", &slow), ("f", &failing)] {
        for i in 0..20 {
            let t0 = Instant::now();
            let r = gw.generate(&req(model)).await;
            let took = t0.elapsed();
            assert_primary(&r, &primary_png);
            assert!(took < Duration::from_secs(1), "route {model} request {i} took {took:?}: a mirror held it up");
        }
        settles(&format!("the {model} candidate was never called"), || mock.hits() >= 1).await;
    }

    // Every mirror is accounted for: run (with its result) or dropped.
    let (s, f) = ("slow/s-model", "failing/f-model");
    let ok = eventually(Duration::from_secs(15), || async {
        slow.in_flight() == 0
            && mirrored(&gw, "s", s).await == slow.hits() as f64
            && mirrored(&gw, "s", s).await + dropped(&gw, "s", s).await == 20.0
            && gw
                .metric("acc_mirror_requests_total", &[("route", "f"), ("candidate", f), ("result", "status_5xx")])
                .await
                == failing.hits() as f64
            && mirrored(&gw, "f", f).await + dropped(&gw, "f", f).await == 20.0
    })
    .await;
    let m = gw.metrics().await;
    assert!(ok, "mirrors not accounted for (slow hits {}, failing hits {}):\n{m}", slow.hits(), failing.hits());
    let count = |route, cand, result| {
        metric_sum(&m, "acc_mirror_requests_total", &[("route", route), ("candidate", cand), ("result", result)])
    };
    assert_eq!(count("s", s, "ok"), slow.hits() as f64, "a slow candidate that answers is ok:\n{m}");
    assert_eq!(count("f", f, "status_5xx"), failing.hits() as f64, "a 500 is counted as status_5xx:\n{m}");
    // The candidate's own breaker may open on its failures; the skipped mirrors say so.
    assert_eq!(
        count("f", f, "status_5xx") + count("f", f, "breaker_open"),
        mirrored(&gw, "f", f).await,
        "a failing candidate's mirrors end status_5xx (or breaker_open once its breaker opens):\n{m}"
    );
    assert_eq!(
        metric_sum(&m, "acc_mirror_latency_seconds_count", &[("route", "s"), ("candidate", s)]),
        slow.hits() as f64,
        "{m}"
    );
    assert!(
        metric_sum(&m, "acc_mirror_latency_seconds_sum", &[("route", "s"), ("candidate", s)])
            >= 2.0 * slow.hits() as f64,
        "the slow candidate's latency is recorded:\n{m}"
    );
    assert_eq!((primary.hits(), primary.cancelled()), (40, 0));

    // The report names the candidates the way the metrics do.
    let v = report(&gw).await;
    assert!(report_entry(&v, "s", s).is_some() && report_entry(&v, "f", f).is_some(), "{v:#}");
}

// ---------------------------------------------------------------------------------------------
// Caps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_and_daily_spend_cap_the_mirrors() {
    let primary = MockProvider::start().await;
    let busy = MockProvider::start().await;
    let priced = MockProvider::start().await;
    let primary_png = noisy(16, 16, 1);
    primary.answer_with(&primary_png);
    busy.set_latency(Duration::from_secs(1));
    let policy = [
        openai_provider("primary", &primary),
        openai_provider("busy", &busy),
        openai_provider_with("priced", &priced, "price = { per_image_usd = 0.01 }"),
        route("burst", r#"mirror = [{ provider = "busy", model = "b-model", sample = 1.0, max_in_flight = 2 }]"#),
        route(
            "spend",
            r#"mirror = [{ provider = "priced", model = "c-model", sample = 1.0, max_in_flight = 4, spend_usd_per_day = 0.05 }]"#,
        ),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;

    // 20 at once against a 1 s candidate allowed 2 mirrors in flight.
    let b = "busy/b-model";
    for r in burst(&gw, &req("burst"), &[], 20, 20).await {
        assert_primary(&r, &primary_png);
    }
    let ok = eventually(Duration::from_secs(15), || async {
        busy.in_flight() == 0
            && mirrored(&gw, "burst", b).await == busy.hits() as f64
            && busy.hits() as f64 + dropped(&gw, "burst", b).await == 20.0
    })
    .await;
    let m = gw.metrics().await;
    assert!(ok, "burst: hits {} + dropped must be 20:\n{m}", busy.hits());
    assert!(busy.max_in_flight() <= 2, "max_in_flight 2, the candidate saw {} at once", busy.max_in_flight());
    assert!(busy.hits() >= 1, "at least one mirror runs");
    let in_flight = [("route", "burst"), ("candidate", b), ("reason", "in_flight")];
    assert!(metric_sum(&m, "acc_mirror_dropped_total", &in_flight) >= 1.0, "{m}");
    assert_eq!(metric_sum(&m, "acc_mirror_dropped_total", &in_flight), dropped(&gw, "burst", b).await);

    // 12 requests one by one (each mirror finished before the next) at $0.01 against $0.05/day.
    let c = "priced/c-model";
    for i in 0..12 {
        assert_primary(&gw.generate(&req("spend")).await, &primary_png);
        let ok = eventually(Duration::from_secs(10), || async {
            priced.in_flight() == 0
                && mirrored(&gw, "spend", c).await + dropped(&gw, "spend", c).await == i as f64 + 1.0
        })
        .await;
        assert!(ok, "spend: mirror {i} neither ran nor was dropped:\n{}", gw.metrics().await);
    }
    let m = gw.metrics().await;
    let spend = [("route", "spend"), ("candidate", c), ("reason", "spend")];
    assert!((4..=5).contains(&priced.hits()), "$0.05/day at $0.01 each allows 5 mirrors, not {}", priced.hits());
    assert!(metric_sum(&m, "acc_mirror_dropped_total", &spend) >= 7.0, "{m}");
    assert_eq!(priced.hits() as f64 + metric_sum(&m, "acc_mirror_dropped_total", &spend), 12.0, "{m}");
    let cost = metric_sum(&m, "acc_mirror_cost_usd_total", &[("route", "spend"), ("candidate", c)]);
    assert!((cost - 0.01 * priced.hits() as f64).abs() < 1e-9, "mirror cost {cost} for {} images:\n{m}", priced.hits());
}

// ---------------------------------------------------------------------------------------------
// Report

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_matches_what_the_mocks_did_in_the_endpoint_the_metrics_and_acc_report() {
    let primary = MockProvider::start().await;
    let flaky = MockProvider::start().await;
    let blanks = MockProvider::start().await;
    let primary_png = noisy(256, 256, 1);
    primary.answer_with(&primary_png);
    // 150 ms, every other answer a 500 (the steps keep the latency).
    flaky.set_latency(Duration::from_millis(150));
    flaky.script((0..60).map(|i| if i % 2 == 0 { Step::new().status(500) } else { Step::new().status(200) }).collect());
    blanks.answer_with(&blank(256, 256));
    let policy = [
        openai_provider("primary", &primary),
        openai_provider("flaky", &flaky),
        openai_provider("blanks", &blanks),
        route("main", r#"mirror = [{ provider = "flaky", model = "f-model", sample = 1.0, max_in_flight = 100 }]"#),
        route(
            "evald",
            "evaluators = [\"sanity\"]\n\
             mirror = [{ provider = \"blanks\", model = \"b-model\", sample = 1.0, max_in_flight = 100 }]",
        ),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    let (f, b) = ("flaky/f-model", "blanks/b-model");

    for r in burst(&gw, &req("main"), &[], 60, 2).await {
        assert_primary(&r, &primary_png);
    }
    for r in burst(&gw, &req("evald"), &[], 20, 2).await {
        assert_primary(&r, &primary_png);
    }
    let e = report_with_pairs(&gw, "main", f, 60).await;
    let (p, c) = (&e["primary"], &e["candidate"]);
    assert_eq!(e["pairs"], json!(60), "{e:#}");
    assert_eq!((p["samples"].as_u64(), c["samples"].as_u64()), (Some(60), Some(60)), "{e:#}");
    let c_err = num(&c["error_rate"], "candidate.error_rate");
    assert!((c_err - 0.5).abs() <= 0.15, "candidate error_rate {c_err}, the mock failed half: {e:#}");
    assert_eq!(num(&p["error_rate"], "primary.error_rate"), 0.0, "{e:#}");
    assert_eq!(num(&p["errors"], "primary.errors"), 0.0, "{e:#}");
    let c_p50 = num(&c["p50_ms"], "candidate.p50_ms");
    assert!(c_p50 >= 150.0, "candidate p50 {c_p50} ms, the mock waits 150 ms: {e:#}");
    for side in [p, c] {
        let (p50, p95, p99) =
            (num(&side["p50_ms"], "p50_ms"), num(&side["p95_ms"], "p95_ms"), num(&side["p99_ms"], "p99_ms"));
        assert!(p50 <= p95 && p95 <= p99, "percentiles out of order: {e:#}");
        for k in ["eval_fail_rate", "mean_adherence", "cost_per_image_usd"] {
            assert!(side.get(k).is_some(), "{k} missing: {e:#}");
        }
    }
    assert!(num(&p["p50_ms"], "primary.p50_ms") < c_p50, "{e:#}");
    let sig = &e["significance"];
    assert_eq!(sig["error_rate"]["significant"], json!(true), "0/60 vs 30/60 errors: {e:#}");
    assert!(num(&sig["error_rate"]["p_value"], "error_rate.p_value") < 0.05, "{e:#}");
    assert_eq!(sig["error_rate"]["test"], json!("two-proportion z-test (two-sided)"), "{e:#}");
    assert_eq!(sig["latency"]["test"], json!("Mann-Whitney U (two-sided, normal approximation)"), "{e:#}");
    assert_eq!(sig["latency"]["significant"], json!(true), "~0 ms vs 150 ms: {e:#}");
    assert_eq!(e["alpha"], json!(0.05), "{e:#}");

    // A candidate whose every image fails sanity.
    let ev = report_with_pairs(&gw, "evald", b, 20).await;
    let c_fail = num(&ev["candidate"]["eval_fail_rate"]["sanity"], "candidate.eval_fail_rate.sanity");
    let p_fail = num(&ev["primary"]["eval_fail_rate"]["sanity"], "primary.eval_fail_rate.sanity");
    assert!(c_fail >= 0.95, "every candidate image was blank: eval_fail_rate.sanity {c_fail}: {ev:#}");
    assert_eq!(p_fail, 0.0, "{ev:#}");
    assert_eq!(ev["significance"]["eval_fail_rate"]["sanity"]["significant"], json!(true), "{ev:#}");
    // Exported gauges may be refreshed a little after the report.
    let fresh = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_mirror_samples", &[("route", "main"), ("candidate", f), ("side", "candidate")]).await == 60.0
    })
    .await;
    let m = gw.metrics().await;
    assert!(fresh, "acc_mirror_samples for main / {f} candidate never reached 60:\n{m}");
    let failed = [("route", "evald"), ("candidate", b), ("result", "eval_failed")];
    assert_eq!(metric_sum(&m, "acc_mirror_requests_total", &failed), blanks.hits() as f64, "{m}");

    // The same numbers as metrics.
    let side = |s| [("route", "main"), ("candidate", f), ("side", s)];
    assert_eq!(metric_sum(&m, "acc_mirror_samples", &side("candidate")), 60.0, "{m}");
    assert_eq!(metric_sum(&m, "acc_mirror_samples", &side("primary")), 60.0, "{m}");
    let g_err = metric_sum(&m, "acc_mirror_error_rate", &side("candidate"));
    assert!((g_err - c_err).abs() < 1e-6, "acc_mirror_error_rate {g_err} vs report {c_err}:\n{m}");
    assert_eq!(metric_sum(&m, "acc_mirror_error_rate", &side("primary")), 0.0, "{m}");
    let p50 = [("route", "main"), ("candidate", f), ("side", "candidate"), ("percentile", "p50")];
    let p50_s = metric_sum(&m, "acc_mirror_latency_p_seconds", &p50);
    assert!(
        (p50_s * 1000.0 - c_p50).abs() < 1.0,
        "acc_mirror_latency_p_seconds p50 {p50_s} s vs report {c_p50} ms:\n{m}"
    );
    let ef = |s| [("route", "evald"), ("candidate", b), ("side", s), ("evaluator", "sanity")];
    let g_fail = metric_sum(&m, "acc_mirror_eval_fail_rate", &ef("candidate"));
    assert!((g_fail - c_fail).abs() < 1e-6, "acc_mirror_eval_fail_rate {g_fail} vs report {c_fail}:\n{m}");
    assert_eq!(metric_sum(&m, "acc_mirror_eval_fail_rate", &ef("primary")), 0.0, "{m}");

    // The admin endpoint needs the token; so does `acc report`.
    let r = get(&gw.admin_url("/admin/mirror/report"), &[]).await;
    r.assert_status(401);
    let args = |extra: &[&str]| {
        let mut a = vec!["--admin".to_string(), gw.admin.clone(), "--route".to_string(), "main".to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = acc_report(args(&["--json"]), None).await;
    assert!(!out.status.success(), "acc report without ACC_ADMIN_TOKEN must fail");

    // `acc report --json`: the same numbers, only the asked route.
    let out = acc_report(args(&["--json"]), Some(ADMIN_TOKEN)).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "acc report --json failed ({}): {stdout}\n{stderr}", out.status);
    let v: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("acc report --json printed no JSON ({e}): {stdout}"));
    let je = report_entry(&v, "main", f).unwrap_or_else(|| panic!("acc report --json has no main / {f}: {v:#}"));
    assert_eq!(je["pairs"], e["pairs"], "{je:#}");
    assert_eq!(je["candidate"]["error_rate"], e["candidate"]["error_rate"], "{je:#}");
    assert_eq!(je["candidate"]["p50_ms"], e["candidate"]["p50_ms"], "{je:#}");
    assert_eq!(je["primary"]["error_rate"], e["primary"]["error_rate"], "{je:#}");
    assert_eq!(je["significance"]["error_rate"]["significant"], json!(true), "{je:#}");
    assert!(!stdout.contains("evald"), "--route main must leave other routes out: {stdout}");

    // Without --json: a table for people.
    let out = acc_report(args(&[]), Some(ADMIN_TOKEN)).await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "acc report failed ({}): {table}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(serde_json::from_str::<Value>(&table).is_err(), "without --json the output is a table, not JSON: {table}");
    let lower = table.to_lowercase();
    for want in ["main", f, "primary", "candidate"] {
        assert!(lower.contains(want), "the table must mention {want:?}:\n{table}");
    }
}

// ---------------------------------------------------------------------------------------------
// Canary

fn canary_policy(primary: &MockProvider, cand: &MockProvider, share: f64, extra: &str) -> String {
    [
        openai_provider("primary", primary),
        openai_provider("cand", cand),
        route(
            "main",
            &format!(
                "evaluators = [\"sanity\"]\non_sanity_fail = \"fallback\"\n\
                 canary = {{ provider = \"cand\", model = \"c-model\", share = {share}, min_samples = 20, \
                 max_eval_fail_increase = 0.1{extra} }}"
            ),
        ),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_is_rolled_back_after_min_samples_and_reset_by_a_policy_edit() {
    let primary = MockProvider::start().await;
    let cand = MockProvider::start().await;
    let primary_png = noisy(256, 256, 1);
    primary.answer_with(&primary_png);
    cand.answer_with(&blank(256, 256));
    // The latency rule is kept out of the way: this canary must fail on its images.
    let dir = PolicyDir::with(&canary_policy(&primary, &cand, 0.5, ", max_p99_ratio = 1000.0"));
    let gw = Gateway::start(dir.path()).await;
    let route = [("route", "main")];
    assert_eq!(gw.metric("acc_canary_state", &route).await, 1.0);

    // One by one: active until both sides have 20 samples, then rolled back.
    let mut sent = 0;
    let mut rolled = None;
    while sent < 150 {
        let r = gw.generate(&req("main")).await;
        sent += 1;
        // A blank canary image fails sanity and falls back: the client still gets the primary's.
        r.assert_status(200);
        assert_eq!(r.header("x-acc-provider").as_deref(), Some("primary"), "{}", r.describe());
        assert_eq!(b64_images(&r), vec![primary_png.clone()], "a failed canary image is never returned");
        assert_ne!(r.header("x-acc-canary").as_deref(), Some("true"), "the primary's image: {}", r.describe());
        let c = canary(&gw, "main").await;
        let (canaries, others) = (cand.hits(), sent - cand.hits());
        match c["state"].as_str() {
            Some("active") => {}
            Some("rolled_back") => {
                assert!(
                    canaries >= 20 && others >= 20,
                    "rolled back with {canaries} canary / {others} other samples (min_samples 20): {c}"
                );
                rolled = Some(c);
                break;
            }
            _ => panic!("canary state must be active or rolled_back: {c}"),
        }
    }
    if rolled.is_none() {
        // The verdict may land just after the answer.
        let ok =
            eventually(Duration::from_secs(20), || async { canary(&gw, "main").await["state"] == "rolled_back" }).await;
        assert!(
            ok,
            "after {sent} requests ({} canaries) the failing canary is still {}",
            cand.hits(),
            canary(&gw, "main").await
        );
        rolled = Some(canary(&gw, "main").await);
    }
    let c = rolled.unwrap();
    let reason = c["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "a rollback says why: {c}");
    assert_eq!(gw.metric("acc_canary_rollbacks_total", &route).await, 1.0);
    assert_eq!(gw.metric("acc_canary_state", &route).await, 0.0);

    // Rolled back: nothing reaches the candidate any more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hits = cand.hits();
    for _ in 0..20 {
        let r = gw.generate(&req("main")).await;
        assert_primary(&r, &primary_png);
    }
    assert_eq!(cand.hits(), hits, "a rolled-back canary must get no traffic");
    assert_eq!(canary(&gw, "main").await["state"], json!("rolled_back"), "it stays rolled back");
    assert_eq!(gw.metric("acc_canary_rollbacks_total", &route).await, 1.0, "rolled back once");

    // Editing the canary settings starts it afresh.
    dir.write("policy.toml", &canary_policy(&primary, &cand, 0.4, ", max_p99_ratio = 1000.0"));
    let r = gw.admin("POST", "/admin/reload").await;
    r.assert_status(200);
    assert_eq!(r.json()["result"], json!("ok"), "{}", r.describe());
    let ok = eventually(Duration::from_secs(20), || async { canary(&gw, "main").await["state"] == "active" }).await;
    assert!(ok, "an edited canary must be active again: {}", canary(&gw, "main").await);
    assert_eq!(gw.metric("acc_canary_state", &route).await, 1.0);
    for _ in 0..30 {
        gw.generate(&req("main")).await.assert_status(200);
        if cand.hits() > hits {
            break;
        }
    }
    assert!(cand.hits() > hits, "the reset canary (share 0.4) got none of 30 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_serves_its_share_and_is_kept() {
    let primary = MockProvider::start().await;
    let cand = MockProvider::start().await;
    let (primary_png, cand_png) = (noisy(256, 256, 1), noisy(256, 256, 2));
    primary.answer_with(&primary_png);
    cand.answer_with(&cand_png);
    // Equal latencies; a generous p99 ratio so that scheduling noise on a busy machine cannot
    // pass for a slow candidate.
    for m in [&primary, &cand] {
        m.set_latency(Duration::from_millis(20));
    }
    let dir = PolicyDir::with(&canary_policy(&primary, &cand, 0.5, ", max_p99_ratio = 10.0"));
    let gw = Gateway::start(dir.path()).await;

    const N: usize = 80;
    let mut served = 0;
    for r in burst(&gw, &req("main"), &[], N, 2).await {
        r.assert_status(200);
        let by = r.header("x-acc-provider").unwrap_or_else(|| panic!("no x-acc-provider: {}", r.describe()));
        let is_canary = r.header("x-acc-canary").as_deref() == Some("true");
        match by.as_str() {
            "cand" => {
                assert!(is_canary, "served by the canary without x-acc-canary: true: {}", r.describe());
                assert_eq!(b64_images(&r), vec![cand_png.clone()]);
                served += 1;
            }
            "primary" => {
                assert!(!is_canary, "x-acc-canary on a primary answer: {}", r.describe());
                assert_eq!(b64_images(&r), vec![primary_png.clone()]);
            }
            other => panic!("served by {other}: {}", r.describe()),
        }
    }
    // Binomial(80, 0.5): 40 +- 4.5 sigma (~20).
    assert!((20..=60).contains(&served), "share 0.5 of {N}: the canary served {served}");
    assert_eq!(cand.hits(), served, "every canary request the candidate answered was returned");
    assert_eq!(primary.hits(), N - served);
    let c = canary(&gw, "main").await;
    assert_eq!(c["state"], json!("active"), "a healthy canary is kept: {c}");
    assert_eq!(gw.metric("acc_canary_rollbacks_total", &[("route", "main")]).await, 0.0);
    assert_eq!(gw.metric("acc_canary_state", &[("route", "main")]).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Policy validation and shutdown

#[test]
fn bad_mirror_and_canary_settings_are_refused_with_file_and_path() {
    let m = "[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
             [providers.c]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\n";
    let base = "[[routes]]\nname = \"main\"\nmatch = { model = \"m\" }\ntargets = [{ provider = \"p\" }]\n";
    for (extra, what) in [
        (r#"mirror = [{ provider = "c", sample = 1.5 }]"#, "sample above 1"),
        (r#"mirror = [{ provider = "c", sample = 0.1 }, { provider = "c", sample = 0.2 }]"#, "a candidate twice"),
        (r#"mirror = [{ provider = "nope", sample = 0.1 }]"#, "an unknown provider"),
        (r#"mirror = [{ provider = "c", sample = 0.1, max_in_flight = 0 }]"#, "max_in_flight 0"),
        (r#"canary = { provider = "c", share = 0.0 }"#, "canary share 0"),
    ] {
        let dir = PolicyDir::with(&format!("{m}{base}{extra}\n"));
        let out = acc_check(dir.path());
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "acc check accepted {what}: {text}");
        assert!(text.contains("policy.toml"), "the error for {what} names the file: {text}");
        let field = if extra.starts_with("canary") { "canary" } else { "mirror" };
        assert!(text.contains(field), "the error for {what} names the path ({field}): {text}");
    }
    let dir = PolicyDir::with(&format!(
        "{m}{base}mirror = [{{ provider = \"c\", model = \"x\", sample = 0.05, max_in_flight = 4, spend_usd_per_day = 20.0 }}]\n\
         canary = {{ provider = \"c\", model = \"y\", share = 0.1, min_samples = 50, max_eval_fail_increase = 0.05, \
         max_error_increase = 0.05, max_p99_ratio = 1.5 }}\n"
    ));
    let out = acc_check(dir.path());
    assert!(out.status.success(), "the contract's example must be valid: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_awaits_mirrors_up_to_the_drain_deadline_then_exits_zero() {
    let primary = MockProvider::start().await;
    let quick = MockProvider::start().await;
    let stuck = MockProvider::start().await;
    let primary_png = noisy(16, 16, 1);
    primary.answer_with(&primary_png);
    quick.set_latency(Duration::from_millis(1000));
    stuck.set_latency(Duration::from_secs(60));
    let policy = [
        openai_provider("primary", &primary),
        openai_provider("quick", &quick),
        openai_provider("stuck", &stuck),
        route(
            "main",
            r#"mirror = [{ provider = "quick", model = "q", sample = 1.0 }, { provider = "stuck", model = "s", sample = 1.0 }]"#,
        ),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let mut gw = Gateway::start_on(dir.path(), "127.0.0.1:0", &["--drain-secs", "2"], &[]).await;

    assert_primary(&gw.generate(&req("main")).await, &primary_png);
    settles("both mirrors must reach their candidates", || quick.in_flight() == 1 && stuck.in_flight() == 1).await;
    let t0 = Instant::now();
    gw.sigterm();
    let Some(status) = gw.wait_exit(Duration::from_secs(10)).await else {
        panic!(
            "with --drain-secs 2 and a mirror stuck, still running {:?} after SIGTERM\n{}",
            t0.elapsed(),
            gw.stderr()
        )
    };
    let took = t0.elapsed();
    assert!(status.success(), "exit status with a mirror in flight: {status}\n{}", gw.stderr());
    assert!(
        took >= Duration::from_millis(1500),
        "mirrors in flight are awaited up to the drain deadline: exited after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "the stuck mirror held the shutdown for {took:?}");
    assert_eq!((quick.hits(), quick.cancelled()), (1, 0), "the mirror that finishes within the deadline is awaited");
    settles("the stuck mirror is cancelled", || stuck.cancelled() == 1).await;
}
