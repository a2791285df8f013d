//! Trace records through the running binary: one record per routed request with every field
//! the issue lists (values asserted), kept across a restart, read back by filters and pages,
//! prompts kept only as `record_prompt` says, and losses counted when the store is down.
//! The same record test runs against a real PostgreSQL in `tests/traces_postgres.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const KEY: &str = "sk-trace-test-key-1";

fn policy(first: &MockProvider, second: &MockProvider, extra: &str) -> String {
    // Images the sanity evaluator passes (a mock's default is a blank 4x4 PNG).
    first.answer_with(&noisy(256, 256, 1));
    second.answer_with(&noisy(256, 256, 2));
    format!(
        "{}{}[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n\n[cohorts]\ncohorts = [\"beta\"]\ntemplates = [\"hero@3\"]\nasset_types = [\"banner\"]\n\n{}{}{extra}",
        openai_provider_at("first", &first.base_url()),
        openai_provider_at("second", &second.base_url()),
        sha256_hex(KEY),
        route_toml("main", "m").target_default("first").fallback("spare").with("evaluators = [\"sanity\"]"),
        route_toml("spare", "spare").target_default("second").with("evaluators = [\"sanity\"]"),
    )
}

fn headers(auth: &str) -> Vec<(&str, &str)> {
    vec![
        ("authorization", auth),
        ("x-acc-cohort", "beta"),
        ("x-acc-prompt-template", "hero@3"),
        ("x-acc-asset-type", "banner"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ]
}

fn body() -> Value {
    json!({
        "model": "m", "prompt": "a red fox in the snow", "negative_prompt": "blurry",
        "n": 1, "size": "256x256", "seed": 42, "user": "end-user-7",
        "response_format": "b64_json", "acc": {"aspect": "1:1"},
    })
}

/// Waits for the record of `trace_id` to be readable (the writer batches every 200 ms).
pub async fn record(gw: &Gateway, trace_id: &str) -> Value {
    let mut last = None;
    for _ in 0..100 {
        let r = gw.admin("GET", &format!("/admin/traces/{trace_id}")).await;
        if r.status == 200 {
            return r.json();
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no record for {trace_id}: {}", last.unwrap().describe());
}

/// The record of a request with a fallback, every field asserted.
pub async fn check_full_record(gw: &Gateway, first: &MockProvider, second: &MockProvider) {
    first.set_status(500);
    let auth = bearer(KEY);
    let r = gw.generate_with(&body(), &headers(&auth)).await;
    r.assert_status(200);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(r.header("x-acc-trace-id").as_deref(), Some(trace_id), "the client's traceparent is continued");
    // Providers get a traceparent naming the same trace, one span per attempt.
    let tp_first = first.last_header("traceparent").expect("traceparent sent to the first provider");
    let tp_second = second.last_header("traceparent").expect("traceparent sent to the second provider");
    assert!(tp_first.starts_with(&format!("00-{trace_id}-")) && tp_first.ends_with("-01"), "{tp_first}");
    assert_ne!(tp_first, tp_second, "each attempt has its own span");

    let rec = record(gw, trace_id).await;
    let image = &b64_images(&r)[0];
    assert_eq!(rec["trace_id"], trace_id);
    assert_eq!(rec["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(rec["kind"], "primary");
    assert_eq!(rec["tenant"], "acme");
    assert_eq!(rec["key_name"], &sha256_hex(KEY)[..12]);
    assert!(!rec.to_string().contains(KEY), "the key itself is never recorded");
    assert_eq!(rec["route"], "main");
    assert_eq!(rec["operation"], "generations");
    assert_eq!(rec["cohort"], "beta");
    assert_eq!(rec["prompt_template"], "hero@3");
    assert_eq!(rec["asset_type"], "banner");
    assert_eq!(rec["end_user"], "end-user-7");
    assert_eq!(rec["record_prompt"], "full");
    assert_eq!(rec["prompt"], "a red fox in the snow");
    assert_eq!(rec["negative_prompt"], "blurry");
    assert_eq!(rec["prompt_sha256"], sha256_hex("a red fox in the snow"));
    assert_eq!(rec["negative_prompt_sha256"], sha256_hex("blurry"));
    assert_eq!(
        rec["parameters"],
        json!({"model": "m", "n": 1, "size": "256x256", "seed": 42, "response_format": "b64_json"})
    );
    assert_eq!(rec["contract"]["aspect"], "1:1");
    assert_eq!(rec["decision"], "pass");
    assert_eq!(rec["outcome"], "ok");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["error_code"], Value::Null);
    assert!(rec["duration_ms"].as_f64().unwrap() > 0.0);
    let start = rec["start_time_unix_nano"].as_u64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(start < now && now - start < 60_000_000_000, "start {start}, now {now}");

    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec:#}");
    let (a, b) = (&attempts[0], &attempts[1]);
    assert_eq!(
        (a["route"].as_str(), a["provider"].as_str(), a["provider_kind"].as_str()),
        (Some("main"), Some("first"), Some("openai"))
    );
    assert_eq!(a["result"], "status_5xx", "{a:#}");
    assert_eq!(a["role"], "primary");
    assert!(a["error"].as_str().unwrap().contains("500"), "{a:#}");
    assert_eq!(a["evaluations"], json!([]));
    assert_eq!(tp_first, format!("00-{trace_id}-{}-01", a["span_id"].as_str().unwrap()));
    assert_eq!((b["route"].as_str(), b["provider"].as_str()), (Some("spare"), Some("second")));
    assert_eq!(b["result"], "ok");
    assert_eq!(b["role"], "fallback");
    assert_eq!(tp_second, format!("00-{trace_id}-{}-01", b["span_id"].as_str().unwrap()));
    assert!(b["start_offset_ms"].as_f64().unwrap() >= a["start_offset_ms"].as_f64().unwrap());
    assert!(b["latency_ms"].as_f64().unwrap() > 0.0 && b["queue_ms"].as_f64().unwrap() >= 0.0);
    let evals = b["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), 1);
    assert_eq!(
        (evals[0]["image"].as_u64(), evals[0]["evaluator"].as_str(), evals[0]["verdict"].as_str()),
        (Some(0), Some("sanity"), Some("pass"))
    );
    assert_eq!(evals[0]["score"], 1.0);
    assert_eq!(rec["generation"]["seed"], 42);
    let images = rec["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["sha256"], hex::encode(sha2::Sha256::digest(image)));
    assert_eq!(images[0]["bytes"], image.len());
}

#[tokio::test]
async fn a_record_holds_everything_about_its_request_and_survives_a_restart() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    check_full_record(&gw, &first, &second).await;
    let before = record(&gw, "4bf92f3577b34da6a3ce929d0e0e4736").await;
    assert_eq!(gw.metric("acc_trace_written_total", &[]).await, 1.0);
    assert_eq!(
        gw.metric(
            "acc_cohort_requests_total",
            &[("cohort", "beta"), ("template", "hero@3"), ("asset_type", "banner"), ("outcome", "ok")]
        )
        .await,
        1.0
    );
    assert_eq!(gw.metric("acc_cohort_fallbacks_total", &[("cohort", "beta")]).await, 1.0);
    assert_eq!(
        gw.metric("acc_cohort_eval_total", &[("cohort", "beta"), ("evaluator", "sanity"), ("verdict", "pass")]).await,
        1.0
    );
    let ready = get(&gw.admin_url("/readyz"), &[]).await.json();
    assert_eq!(ready["trace_store"]["state"], "ready", "{ready}");
    drop(gw);
    // The same directory (and so the same data/acc.db) after a restart.
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(record(&gw, "4bf92f3577b34da6a3ce929d0e0e4736").await, before);
    // Values outside the [cohorts] lists are recorded as sent, labelled "other".
    let auth = bearer(KEY);
    let r = gw
        .generate_with(&json!({"model": "m", "prompt": "p"}), &[("authorization", &auth), ("x-acc-cohort", "gamma")])
        .await;
    r.assert_status(200);
    let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
    assert_eq!(rec["cohort"], "gamma");
    assert_eq!(gw.metric("acc_cohort_requests_total", &[("cohort", "other"), ("template", "none")]).await, 1.0);
    // Values beyond ASCII (UTF-8 in the header, as curl and most clients send it) too: kept,
    // not dropped as if absent.
    let fields = [("x-acc-cohort", "bêta-ünï-😀"), ("x-acc-prompt-template", "héro@3"), ("x-acc-asset-type", "横幅")];
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend(fields);
    let r = gw.generate_with(&json!({"model": "m", "prompt": "p"}), &headers).await;
    r.assert_status(200);
    let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
    assert_eq!(
        (&rec["cohort"], &rec["prompt_template"], &rec["asset_type"]),
        (&json!("bêta-ünï-😀"), &json!("héro@3"), &json!("横幅"))
    );
    let others = [("cohort", "other"), ("template", "other"), ("asset_type", "other")];
    assert_eq!(gw.metric("acc_cohort_requests_total", &others).await, 1.0);
}

#[tokio::test]
async fn filters_and_pages_return_exactly_the_matching_records() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, _dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    let auth = bearer(KEY);
    let mut by_cohort: std::collections::HashMap<&str, Vec<String>> = Default::default();
    let mut fallbacks = Vec::new();
    let mut all_ids: Vec<String> = Vec::new();
    for i in 0..12 {
        let cohort = if i % 3 == 0 { "beta" } else { "alpha" };
        // Every fourth request fails over to the second provider.
        first.set_status(if i % 4 == 0 { 500 } else { 200 });
        let unix_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let before = unix_ms();
        let r = gw
            .generate_with(
                &json!({"model": "m", "prompt": format!("p{i}")}),
                &[("authorization", &auth), ("x-acc-cohort", cohort)],
            )
            .await;
        r.assert_status(200);
        let id = r.header("x-acc-trace-id").unwrap();
        // A made trace id starts with the request's time (Unix ms, 12 hex digits): ids sort
        // by time, so the store's primary-key index grows at its end.
        let made = u64::from_str_radix(&id[..12], 16).unwrap();
        assert!((before..=unix_ms()).contains(&made), "{id}: {made} not in {before}..");
        assert!(all_ids.last().is_none_or(|prev: &String| prev[..12] <= id[..12]), "{id} after {all_ids:?}");
        all_ids.push(id.clone());
        by_cohort.entry(cohort).or_default().push(id.clone());
        if i % 4 == 0 {
            fallbacks.push(id);
        }
    }
    let mut all: Vec<String> = by_cohort.values().flatten().cloned().collect();
    let _ = record(&gw, by_cohort["alpha"].last().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ids = |v: &Value| -> Vec<String> {
        v["data"].as_array().unwrap().iter().map(|r| r["trace_id"].as_str().unwrap().to_string()).collect()
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // By cohort, by provider (any attempt), by tenant, by route of the record.
    let beta = gw.admin("GET", "/admin/traces?cohort=beta").await.json();
    assert_eq!(sorted(ids(&beta)), sorted(by_cohort["beta"].clone()));
    let second_used = gw.admin("GET", "/admin/traces?provider=second").await.json();
    assert_eq!(sorted(ids(&second_used)), sorted(fallbacks.clone()));
    let acme = gw.admin("GET", "/admin/traces?tenant=acme&limit=500").await.json();
    assert_eq!(sorted(ids(&acme)), sorted(all.clone()));
    assert_eq!(ids(&gw.admin("GET", "/admin/traces?tenant=nobody").await.json()), Vec::<String>::new());
    assert_eq!(ids(&gw.admin("GET", "/admin/traces?decision=blocked").await.json()), Vec::<String>::new());
    let passed = gw.admin("GET", "/admin/traces?verdict=sanity:pass&limit=500").await.json();
    assert_eq!(sorted(ids(&passed)), sorted(all.clone()));
    // Pages of 5, newest first: every record exactly once.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let q = if cursor.is_empty() {
            "/admin/traces?limit=5".to_string()
        } else {
            format!("/admin/traces?limit=5&cursor={cursor}")
        };
        let page = gw.admin("GET", &q).await.json();
        paged.extend(ids(&page));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let starts: Vec<u64> = {
        let all_page = gw.admin("GET", "/admin/traces?limit=500").await.json();
        all_page["data"].as_array().unwrap().iter().map(|r| r["start_time_unix_nano"].as_u64().unwrap()).collect()
    };
    assert!(starts.windows(2).all(|w| w[0] >= w[1]), "newest first: {starts:?}");
    assert_eq!(sorted(paged.clone()), sorted(std::mem::take(&mut all)));
    // Bad filters are 400s in the OpenAI error shape.
    // Bad filters are 400s in the OpenAI error shape, naming the parameter.
    for (query, param) in [
        ("cursor=!!", "cursor"),
        ("limit=0", "limit"),
        ("colour=red", "query"),
        ("decision=Pass", "decision"),
        ("verdict=sanity:maybe", "verdict"),
    ] {
        let e = gw.admin("GET", &format!("/admin/traces?{query}")).await.assert_error(400, "invalid_filter");
        assert_eq!(e["param"], param, "{query}: {e}");
    }
    gw.admin("GET", "/admin/traces/not-a-trace").await.assert_error(400, "invalid_trace_id");
    gw.admin("GET", "/admin/traces/00000000000000000000000000000001").await.assert_error(404, "trace_not_found");
    // One trace: its id in either case; span_id checked; nothing else taken.
    let one = &paged[0];
    let upper = gw.admin("GET", &format!("/admin/traces/{}", one.to_uppercase())).await;
    upper.assert_status(200);
    assert_eq!(upper.json()["trace_id"], one.as_str());
    let e = gw.admin("GET", &format!("/admin/traces/{one}?span_id=nothex")).await.assert_error(400, "invalid_span_id");
    assert_eq!(e["param"], "span_id");
    let e = gw.admin("GET", &format!("/admin/traces/{one}?spanid=1")).await.assert_error(400, "invalid_filter");
    assert_eq!(e["param"], "query");
    // The admin token is needed.
    let r = get(&gw.admin_url("/admin/traces"), &[]).await;
    r.assert_status(401);
    // `acc traces` prints the same.
    let out = acc_command()
        .args(["traces", "--admin", &gw.admin, "--cohort", "beta", "--json"])
        .env("ACC_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sorted(ids(&printed)), sorted(by_cohort["beta"].clone()));
    let table = acc_command()
        .args(["traces", "--admin", &gw.admin, "--provider", "second"])
        .env("ACC_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for id in &fallbacks {
        assert!(table.contains(id.as_str()), "{table}");
    }
    assert_eq!(table.lines().count(), fallbacks.len() + 1, "{table}");
    let one = acc_command()
        .args(["traces", "--admin", &gw.admin, &fallbacks[0]])
        .env("ACC_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let one: Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(one["trace_id"], fallbacks[0].as_str());
    let denied = acc_command().args(["traces", "--admin", &gw.admin]).output().unwrap();
    assert!(!denied.status.success());
}

/// `record_prompt = "sha256"` and `"none"`: the prompt is nowhere: not in the record, not in the
/// store's file, not in the logs (at debug level), not in the metrics.
#[tokio::test]
async fn record_prompt_sha256_and_none_never_write_the_prompt() {
    for how in ["sha256", "none"] {
        let (first, second) = (MockProvider::start().await, MockProvider::start().await);
        let policy = format!(
            "{}{}",
            openai_provider_at("first", &first.base_url()),
            route_toml("main", "m").target_default("first").with(&format!("record_prompt = \"{how}\"")),
        );
        let _ = second;
        first.answer_with(&noisy(64, 64, 3));
        let (gw, dir) = serve_policy(&policy, &[("ACC_LOG", "debug")]).await;
        let secret = format!("zebra-on-unicycle-{how}-7f3a");
        let r = gw.generate(&json!({"model": "m", "prompt": secret, "negative_prompt": format!("{secret}-neg")})).await;
        r.assert_status(200);
        let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
        assert_eq!(rec["record_prompt"], how);
        assert_eq!(rec["prompt"], Value::Null);
        assert_eq!(rec["negative_prompt"], Value::Null);
        let digest = if how == "sha256" { json!(sha256_hex(&secret)) } else { Value::Null };
        assert_eq!(rec["prompt_sha256"], digest);
        assert!(!rec.to_string().contains(&secret));
        // A provider that quotes the prompt in its errors (a content filter's refusal, a 5xx,
        // an account error): its words reach the client, not the record or the logs.
        let quoted = format!("Prompt: {secret}");
        for (status, code) in [(400, "content_policy_violation"), (503, "server_error"), (403, "")] {
            first.set_error(
                status,
                &json!({"error": {"message": quoted, "type": "invalid_request_error", "param": null, "code": code}})
                    .to_string(),
            );
            let r = gw.generate(&json!({"model": "m", "prompt": secret})).await;
            assert!(r.status >= 400, "{}", r.describe());
            let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
            let error = rec["attempts"][0]["error"].as_str().unwrap_or_default().to_string();
            assert!(error.contains("the provider's message is withheld"), "{status}: {rec}");
            assert!(!rec.to_string().contains(&secret), "{status}: {rec}");
        }
        let metrics = gw.metrics().await;
        assert!(!metrics.contains(&secret));
        let logs = gw.stderr();
        assert!(logs.contains("attempt failed"), "{logs}");
        assert!(logs.contains("request done"), "debug logs are on: {logs}");
        assert!(!logs.contains(&secret), "{logs}");
        drop(gw);
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
            files.push(entry.unwrap().path());
        }
        assert!(!files.is_empty());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{} holds the prompt", f.display());
        }
    }
}

/// The store unreachable: requests are served as before, every lost record counted, reads
/// answer 503, readiness says so.
#[tokio::test]
async fn a_store_that_is_down_never_fails_a_request_and_losses_are_counted() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let store = format!("\n[store]\nurl = \"postgres://acc@127.0.0.1:{}/acc\"\nqueue_capacity = 4\n", closed_port());
    let (gw, _dir) = serve_policy(&policy(&first, &second, &store), &[]).await;
    let auth = bearer(KEY);
    let n = 20;
    for i in 0..n {
        let r = gw.generate_with(&json!({"model": "m", "prompt": format!("p{i}")}), &[("authorization", &auth)]).await;
        r.assert_status(200);
    }
    let counted = eventually(Duration::from_secs(20), || async {
        let dropped = gw.metric("acc_trace_dropped_total", &[]).await;
        let written = gw.metric("acc_trace_written_total", &[]).await;
        dropped + written == n as f64
    })
    .await;
    let m = gw.metrics().await;
    assert!(
        counted,
        "records + dropped != requests:\n{}",
        m.lines().filter(|l| l.starts_with("acc_trace")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(gw.metric("acc_trace_written_total", &[]).await, 0.0);
    assert!(gw.metric("acc_trace_dropped_total", &[("reason", "store_unavailable")]).await >= 1.0);
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    ready.assert_status(200);
    assert_eq!(ready.json()["trace_store"]["state"], "unavailable");
    gw.admin("GET", "/admin/traces").await.assert_error(503, "store_unavailable");
    assert!(gw.stderr().contains("trace records dropped"), "losses are logged");
}

/// The PostgreSQL store, for real (scripts/test.sh starts a server and sets
/// `ACC_TEST_POSTGRES_URL`): the same record, every field, in a database of its own that the
/// gateway migrates on start-up; kept across a restart; filters work there too.
#[tokio::test]
async fn postgres_store_keeps_the_same_records() {
    use sqlx::Connection;
    let Some(url) = std::env::var("ACC_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty()) else {
        assert!(std::env::var("ACC_REQUIRE_POSTGRES").as_deref() != Ok("1"), "ACC_TEST_POSTGRES_URL is unset");
        eprintln!("note: ACC_TEST_POSTGRES_URL is unset: skipped (scripts/test.sh sets it)");
        return;
    };
    let db = format!("acc_e2e_{:016x}", fastrand::u64(..));
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect to ACC_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut admin).await.expect("create database");
    let db_url = format!("{}/{db}", url.rsplit_once('/').unwrap().0);
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, dir) = serve_policy(&policy(&first, &second, &format!("\n[store]\nurl = \"{db_url}\"\n")), &[]).await;
    check_full_record(&gw, &first, &second).await;
    assert!(!dir.path().join("data").exists(), "no SQLite file when PostgreSQL is configured");
    let before = record(&gw, "4bf92f3577b34da6a3ce929d0e0e4736").await;
    drop(gw);
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(record(&gw, "4bf92f3577b34da6a3ce929d0e0e4736").await, before);
    let second_used = gw.admin("GET", "/admin/traces?provider=second&cohort=beta").await.json();
    assert_eq!(second_used["data"].as_array().unwrap().len(), 1);
    assert_eq!(gw.admin("GET", "/admin/traces?provider=first&decision=error").await.json()["data"], json!([]));
    drop(gw);
    let _ = sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)")).execute(&mut admin).await;
}

/// A burst with the store stuck (a PostgreSQL address that accepts connections and never
/// answers): requests are answered at once, the queue fills, and every record is either
/// written or counted as dropped.
#[tokio::test]
async fn a_burst_that_fills_the_queue_is_counted_not_waited_for() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let store = format!("\n[store]\nurl = \"postgres://acc@127.0.0.1:{port}/acc\"\nqueue_capacity = 3\n");
    let (gw, _dir) = serve_policy(&policy(&first, &second, &store), &[]).await;
    let auth = bearer(KEY);
    let n = 40;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, auth) = (gw.url("/v1/images/generations"), auth.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({"model": "m", "prompt": format!("p{i}")})).unwrap();
            send("POST", &url, &[("authorization", &auth), ("content-type", "application/json")], body).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "requests waited for the store: {:?}", started.elapsed());
    assert!(gw.metric("acc_trace_dropped_total", &[("reason", "queue_full")]).await >= (n - 3 - 1) as f64 - 5.0);
    let counted = eventually(Duration::from_secs(30), || async {
        gw.metric("acc_trace_dropped_total", &[]).await + gw.metric("acc_trace_written_total", &[]).await == n as f64
    })
    .await;
    assert!(
        counted,
        "{}",
        gw.metrics().await.lines().filter(|l| l.starts_with("acc_trace")).collect::<Vec<_>>().join("\n")
    );
}

/// `kill -9` while requests are being recorded, then a restart on the same file: the store
/// opens, what was committed reads back, and new records are written.
#[tokio::test]
async fn kill_9_under_load_then_restart_opens_the_same_file() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, dir) =
        serve_policy(&policy(&first, &second, "\n[store]\nflush_interval_ms = 5\nbatch_max = 8\n"), &[]).await;
    let auth = bearer(KEY);
    let url = gw.url("/v1/images/generations");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (url, auth) = (url.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..1000 {
                let body = serde_json::to_vec(&json!({"model": "m", "prompt": format!("w{w} p{i}")})).unwrap();
                if try_send("POST", &url, &[("authorization", &auth), ("content-type", "application/json")], body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    // Let records flow, then kill the gateway mid-write.
    // (Generous: a loaded machine runs the eight senders and this poll on one test thread.)
    let flowing =
        eventually(Duration::from_secs(60), || async { gw.metric("acc_trace_written_total", &[]).await >= 100.0 })
            .await;
    assert!(
        flowing,
        "{}",
        gw.metrics().await.lines().filter(|l| l.starts_with("acc_trace")).collect::<Vec<_>>().join("\n")
    );
    drop(gw); // SIGKILL
    for t in tasks {
        let _ = t.await;
    }
    let gw = Gateway::start(dir.path()).await;
    let opened = eventually(Duration::from_secs(30), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "ready"
    })
    .await;
    assert!(opened, "the store did not open after the restart: {}", gw.stderr());
    let page = gw.admin("GET", "/admin/traces?limit=500").await;
    page.assert_status(200);
    let before = page.json()["data"].as_array().unwrap().len();
    assert!(before >= 100, "{before} records after the restart");
    let r = gw.generate_with(&json!({"model": "m", "prompt": "after"}), &[("authorization", &auth)]).await;
    r.assert_status(200);
    let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
    assert_eq!(rec["prompt"], "after");
}

/// PostgreSQL stopped mid-run, then started again: requests are served throughout, the records
/// of the outage are counted as dropped, and writing resumes on its own once the server is back.
#[tokio::test]
async fn a_store_that_goes_down_mid_run_loses_only_the_outage_and_resumes() {
    if std::env::var("ACC_REQUIRE_POSTGRES").as_deref() != Ok("1") && std::env::var("ACC_TEST_POSTGRES_URL").is_err() {
        eprintln!("note: no PostgreSQL in this environment (scripts/test.sh provides one): skipped");
        return;
    }
    let script = repo_root().join("scripts/postgres.sh");
    let pg = tempfile::tempdir().unwrap();
    let start = |port: Option<&str>| {
        let mut cmd = std::process::Command::new(&script);
        cmd.arg("start").arg(pg.path());
        if let Some(p) = port {
            cmd.env("ACC_PG_PORT", p);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "postgres.sh start: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let stop = || {
        let out = std::process::Command::new(&script).arg("stop").arg(pg.path()).output().unwrap();
        assert!(out.status.success(), "postgres.sh stop: {}", String::from_utf8_lossy(&out.stderr));
    };
    let url = start(None);
    let port = url.rsplit_once(':').unwrap().1.split('/').next().unwrap().to_string();
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let store = format!("\n[store]\nurl = \"{url}\"\nflush_interval_ms = 20\n");
    let (gw, _dir) = serve_policy(&policy(&first, &second, &store), &[]).await;
    let auth = bearer(KEY);
    let send_n = |n: usize, tag: &'static str| {
        let gw = &gw;
        let auth = auth.clone();
        async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let r = gw
                    .generate_with(&json!({"model": "m", "prompt": format!("{tag} {i}")}), &[("authorization", &auth)])
                    .await;
                r.assert_status(200);
                ids.push(r.header("x-acc-trace-id").unwrap());
            }
            ids
        }
    };
    let before = send_n(5, "before").await;
    let _ = record(&gw, before.last().unwrap()).await;
    stop();
    // Idle, the writer checks the store every 10 s: readiness learns of the outage without a
    // request having to fail first.
    let noticed = eventually(Duration::from_secs(40), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "unavailable"
    })
    .await;
    assert!(noticed, "readiness still says the store is ready: {}", gw.stderr());
    gw.admin("GET", "/admin/traces").await.assert_error(503, "store_unavailable");
    let during = send_n(5, "during").await;
    let lost = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_trace_dropped_total", &[]).await >= during.len() as f64
    })
    .await;
    assert!(
        lost,
        "{}",
        gw.metrics().await.lines().filter(|l| l.starts_with("acc_trace")).collect::<Vec<_>>().join("\n")
    );
    // The same server comes back on the same port; the writer reconnects on its own.
    let again = start(Some(&port));
    assert_eq!(again, url);
    // Records made while the store was still known to be down are dropped too; once the
    // writer has reopened it (readiness says so), every record is written again.
    let reopened = eventually(Duration::from_secs(60), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "ready"
    })
    .await;
    assert!(reopened, "the writer did not reopen the store: {}", gw.stderr());
    let after = send_n(5, "after").await;
    for id in &after {
        let _ = record(&gw, id).await;
    }
    for id in &before {
        assert_eq!(gw.admin("GET", &format!("/admin/traces/{id}")).await.status, 200);
    }
    let n = (before.len() + during.len() + after.len()) as f64;
    let counted = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_trace_dropped_total", &[]).await + gw.metric("acc_trace_written_total", &[]).await >= n
    })
    .await;
    assert!(counted);
    stop();
}

/// A client that continues one W3C trace over several requests (an SDK retrying, several image
/// calls in one user action) sends the same trace id each time: each request keeps its own
/// record, the trace lists them, and the filters find each.
#[tokio::test]
async fn requests_that_share_a_client_trace_keep_a_record_each() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, _dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    let auth = bearer(KEY);
    let trace_id = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let tp1 = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let r1 = gw
        .generate_with(&json!({"model": "m", "prompt": "one"}), &[("authorization", &auth), ("traceparent", &tp1)])
        .await;
    r1.assert_status(200);
    first.set_status(500);
    second.set_status(500);
    let tp2 = format!("00-{trace_id}-1111111111111111-01");
    let r2 = gw
        .generate_with(&json!({"model": "m", "prompt": "two"}), &[("authorization", &auth), ("traceparent", &tp2)])
        .await;
    r2.assert_status(502);
    assert_eq!(r2.header("x-acc-trace-id").as_deref(), Some(trace_id));
    let mut newest = Value::Null;
    for _ in 0..100 {
        newest = gw.admin("GET", &format!("/admin/traces/{trace_id}")).await.json();
        if newest["records_in_trace"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(newest["records_in_trace"], 2, "{newest:#}");
    assert_eq!(newest["prompt"], "two");
    assert_eq!(newest["status"], 502);
    let spans: Vec<String> =
        newest["span_ids"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let oldest = gw.admin("GET", &format!("/admin/traces/{trace_id}?span_id={}", spans[0])).await.json();
    assert_eq!((oldest["prompt"].as_str(), oldest["parent_span_id"].as_str()), (Some("one"), Some("00f067aa0ba902b7")));
    gw.admin("GET", &format!("/admin/traces/{trace_id}?span_id=0000000000000001"))
        .await
        .assert_error(404, "trace_not_found");
    let failed = gw.admin("GET", "/admin/traces?provider=second&decision=error").await.json();
    let ids: Vec<&str> = failed["data"].as_array().unwrap().iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["two"]);
    assert_eq!(gw.metric("acc_trace_written_total", &[]).await, 2.0);
}

/// `[store]` and `[telemetry]` are read at start-up: a reload that changes them is served (the
/// rest of the policy applies) and says, in its warnings, that they wait for a restart.
#[tokio::test]
async fn a_reload_that_changes_the_store_says_it_waits_for_a_restart() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    let before = live_version(&gw).await;
    dir.write(
        "store.toml",
        "[store]\nretention_days = 3\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:9\"\n[cluster]\nredis_url = \"redis://127.0.0.1:9\"\n",
    );
    let reloaded = eventually(Duration::from_secs(20), || async { live_version(&gw).await != before }).await;
    assert!(reloaded, "{}", gw.stderr());
    let p = gw.admin("GET", "/admin/policies").await.json();
    let warnings = p["warnings"].to_string();
    for section in ["[store] differs", "[telemetry] differs", "[cluster] differs"] {
        assert!(warnings.contains(section), "{section}: {p:#}");
    }
    assert!(gw.stderr().contains("takes effect at the next restart"));
}

/// A client that goes away while its request is at the provider: the request is cancelled, and
/// its record is still written (`client_cancelled`, 499), so routed requests = records +
/// counted losses. The attempts are in it: one that ended with its result, the one the client
/// left running as `client_cancelled`.
#[tokio::test]
async fn a_cancelled_request_still_leaves_its_record() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, _dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    first.set_status(503);
    second.set_latency(Duration::from_secs(5));
    let trace_id = "cccccccccccccccccccccccccccccccc";
    let tp = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let auth = bearer(KEY);
    let body = serde_json::to_vec(&json!({"model": "m", "prompt": "never mind"})).unwrap();
    let url = gw.url("/v1/images/generations");
    let headers =
        [("authorization", auth.as_str()), ("content-type", "application/json"), ("traceparent", tp.as_str())];
    let call = send("POST", &url, &headers, body);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), call).await.is_err(),
        "the request should still be running"
    );
    let rec = record(&gw, trace_id).await;
    assert_eq!((rec["status"].as_u64(), rec["outcome"].as_str()), (Some(499), Some("client_cancelled")));
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["prompt"], "never mind");
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec:#}");
    assert_eq!((attempts[0]["provider"].as_str(), attempts[0]["result"].as_str()), (Some("first"), Some("status_5xx")));
    assert_eq!(attempts[0]["role"], "primary");
    assert_eq!(
        (attempts[1]["provider"].as_str(), attempts[1]["result"].as_str(), attempts[1]["role"].as_str()),
        (Some("second"), Some("client_cancelled"), Some("fallback"))
    );
    let ran = attempts[1]["latency_ms"].as_f64().unwrap();
    assert!((300.0..5000.0).contains(&ran), "the second attempt ran until the client left: {ran} ms");
    assert!(attempts[1]["model"].as_str().is_some_and(|m| !m.is_empty()), "{rec:#}");
    assert_eq!(gw.metric("acc_requests_total", &[("outcome", "client_cancelled")]).await, 1.0);
    assert_eq!(gw.metric("acc_trace_written_total", &[]).await, 1.0);
}

/// An upstream's own 4xx goes to the client as it came; the record's `error_code` is the code
/// that answer carries (a fresh-user trial found `upstream_rejected` there instead), and
/// `upstream_rejected` only when the answer has none.
#[tokio::test]
async fn a_passed_through_upstream_error_is_recorded_with_the_code_sent() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, _dir) = serve_policy(&policy(&first, &second, ""), &[]).await;
    let auth = bearer(KEY);
    let cases = [
        (
            json!({"error": {"message": "Invalid size: 7x7", "type": "invalid_request_error", "param": "size", "code": "invalid_value"}})
                .to_string(),
            "invalid_value",
        ),
        ("not json at all".to_string(), "upstream_rejected"),
    ];
    for (body, code) in cases {
        first.set_error(400, &body);
        let r = gw.generate_with(&json!({"model": "m", "prompt": "p"}), &[("authorization", &auth)]).await;
        assert_eq!(r.status, 400, "{}", r.describe());
        if code != "upstream_rejected" {
            assert_eq!(r.json()["error"]["code"], code, "{}", r.describe());
        }
        let rec = record(&gw, &r.header("x-acc-trace-id").unwrap()).await;
        assert_eq!(
            (&rec["status"], &rec["error_code"], &rec["outcome"]),
            (&json!(400), &json!(code), &json!("upstream_rejected"))
        );
        assert_eq!(second.hits(), 0, "a 400 is not retried elsewhere");
    }
}
