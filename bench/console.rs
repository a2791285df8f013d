//! Console pages' server time with 100,000 traces in the store (issue 18's goal: every page
//! within 200 ms). `cargo bench --bench console` fills a SQLite store with 100,000 trace
//! records through the store's own `insert_batch` (spread over the last 23 hours, so the
//! overview's day window holds them all; 10% mirror copies, 2,000 feedback rows), starts the
//! real `acc` binary on it, signs in, and reads each page's `Server-Timing: app;dur=` header
//! over 20 runs after 3 warm-ups. `-- N` stores N records instead. Run by `cargo test
//! --all-targets` (without `--bench`), it stores 2,000 as a quick check that every page answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use acc::store::record::{AttemptRecord, EvaluationRecord, ImageRecord};
use acc::store::{FeedbackEntry, StoreConfig, TraceDb, TraceRecord};

const TOKEN: &str = "bench-console-token";
const COHORTS: [&str; 5] = ["beta", "ga", "internal", "marketing", "self-serve"];

fn hex(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n).map(|_| char::from_digit(rng.u32(0..16), 16).unwrap()).collect()
}

fn record(rng: &mut fastrand::Rng, start: u64) -> TraceRecord {
    let mirror = rng.u8(0..10) == 0;
    let roll = rng.u8(0..100);
    let (decision, outcome, status) = match roll {
        0..=2 => ("error", "provider_error", 502),
        3..=5 => ("blocked", "blocked", 400),
        6..=8 => ("flagged", "ok", 200),
        9 => ("review", "pending_review", 423),
        _ => ("pass", "ok", 200),
    };
    let fallback = rng.u8(0..20) == 0;
    let eval = |verdict: &str| {
        vec![
            EvaluationRecord {
                image: 0,
                evaluator: "sanity".into(),
                score: 1.0,
                verdict: "pass".into(),
                reason: String::new(),
            },
            EvaluationRecord {
                image: 0,
                evaluator: "safety".into(),
                score: 0.93,
                verdict: verdict.into(),
                reason: if verdict == "fail" { "FACE_FEMALE 0.71 above 0.3".into() } else { String::new() },
            },
        ]
    };
    let mut attempt = |role: &str, provider: &str, result: &str, offset: f64, verdict: &str| AttemptRecord {
        span_id: String::new(),
        route: "marketing".into(),
        target: 0,
        provider: provider.into(),
        provider_kind: "openai".into(),
        endpoint_host: Some("api.example.com".into()),
        model: "gpt-image-1".into(),
        model_version: None,
        start_offset_ms: offset,
        latency_ms: 800.0 + f64::from(rng.u32(0..4000)),
        queue_ms: 0.0,
        result: result.into(),
        error: None,
        cost_usd: Some(0.04),
        role: role.into(),
        evaluations: if result == "ok" { eval(verdict) } else { Vec::new() },
    };
    let verdict = if decision == "blocked" || decision == "review" { "fail" } else { "pass" };
    let mut attempts = Vec::new();
    if fallback {
        attempts.push(attempt("primary", "openai", "status_5xx", 0.5, verdict));
        attempts.push(attempt("fallback", "stability", "ok", 900.0, verdict));
    } else {
        attempts.push(attempt(if mirror { "mirror" } else { "primary" }, "openai", "ok", 0.5, verdict));
    }
    let duration = attempts.iter().map(|a| a.start_offset_ms + a.latency_ms).fold(0.0, f64::max) + 20.0;
    let mut r = TraceRecord {
        trace_id: hex(rng, 32),
        span_id: hex(rng, 16),
        kind: if mirror { "mirror" } else { "primary" }.into(),
        start_time_unix_nano: start,
        duration_ms: duration,
        tenant: Some("acme".into()),
        key_name: Some("web".into()),
        route: Some("marketing".into()),
        operation: "generations".into(),
        cohort: Some(COHORTS[rng.usize(0..COHORTS.len())].into()),
        prompt_template: Some("hero@3".into()),
        asset_type: Some("banner".into()),
        end_user: Some(format!("user-{}", rng.u32(0..5000))),
        record_prompt: "full".into(),
        prompt: Some("a lighthouse on a cliff at dusk, volumetric light, long exposure, wide angle, 35mm".into()),
        parameters: serde_json::json!({"model": "brand-image", "n": 1, "size": "1024x1024", "quality": "high"}),
        attempts,
        decision: decision.into(),
        outcome: outcome.into(),
        status,
        images: vec![ImageRecord {
            index: 0,
            sha256: Some(hex(rng, 64)),
            bytes: Some(1_500_000),
            ..Default::default()
        }],
        cost_usd: Some(if fallback { 0.08 } else { 0.04 }),
        ..Default::default()
    };
    if mirror {
        r.parent_trace_id = Some(hex(rng, 32));
    }
    r
}

/// One HTTP/1.1 request over a fresh connection: (status, headers, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the admin listener");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this too, as a quick smoke
    // run on a small store.
    let benching = std::env::args().any(|a| a == "--bench");
    let n: usize =
        std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(if benching { 100_000 } else { 2_000 });
    let dir = tempfile::tempdir().unwrap();
    // CONSOLE_BENCH_DB=FILE keeps the filled store there (for a look with sqlite3).
    let db_path = std::env::var("CONSOLE_BENCH_DB").map_or_else(|_| dir.path().join("acc.db"), Into::into);
    let _ = std::fs::remove_file(&db_path);
    let db = TraceDb::open(&StoreConfig { path: db_path.clone(), ..StoreConfig::default() }).await.unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let span = 23 * 3_600_000_000_000u64;
    let mut rng = fastrand::Rng::with_seed(18);
    let started = Instant::now();
    let mut some_id = String::new();
    let mut batch = Vec::with_capacity(256);
    for i in 0..n {
        let start = now - span + span / n as u64 * i as u64;
        let r = record(&mut rng, start);
        if r.kind == "primary" {
            some_id = r.trace_id.clone();
        }
        batch.push(r);
        if batch.len() == 256 {
            db.insert_batch(&batch).await.unwrap();
            batch.clear();
        }
    }
    db.insert_batch(&batch).await.unwrap();
    for i in 0..2000u64 {
        let explicit = i % 4 != 0;
        let entry = FeedbackEntry {
            trace_id: hex(&mut rng, 32),
            image_index: -1,
            end_user: format!("user-{i}"),
            tenant: Some("acme".into()),
            route: Some("marketing".into()),
            cohort: Some(COHORTS[(i % 5) as usize].into()),
            prompt_template: Some("hero@3".into()),
            asset_type: Some("banner".into()),
            provider: Some("openai".into()),
            rating: if i % 3 == 0 { -1.0 } else { 1.0 },
            comment: None,
            labels: Vec::new(),
            source: if explicit { "explicit" } else { "regeneration" }.into(),
            created_unix_nano: now - span + span / 2000 * i,
            ..FeedbackEntry::default()
        };
        db.upsert_feedback(&entry).await.unwrap();
    }
    let count = db.count().await.unwrap();
    db.close().await;
    println!("stored {count} trace records in {:.1} s ({})", started.elapsed().as_secs_f64(), db_path.display());

    let policy = format!(
        "default_model = \"acc-demo\"\n[providers.demo]\nkind = \"builtin\"\n\n[[routes]]\nname = \"marketing\"\n\
         match = {{ model = \"acc-demo\" }}\ntargets = [{{ provider = \"demo\" }}]\n\n[store]\npath = \"{}\"\n",
        db_path.display()
    );
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_acc"))
        .args(["serve", "--policies"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("ACC_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start acc");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let admin = loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            panic!("acc exited before listening");
        }
        if let Some(a) = line.split_whitespace().find_map(|w| w.strip_prefix("admin=")) {
            break a.to_string();
        }
    };
    // The writer opens the store in the background: wait until /readyz says it is ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready: serde_json::Value =
            serde_json::from_str(&http(&admin, "GET", "/readyz", None, "").2).unwrap_or_default();
        if ready["trace_store"]["state"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "the trace store never became ready: {ready}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, headers, _) = http(&admin, "POST", "/console/signin", None, &format!("token={TOKEN}&reviewer=bench"));
    assert_eq!(status, 303, "sign-in");
    let cookie = header(&headers, "set-cookie").and_then(|c| c.split(';').next()).unwrap().to_string();

    let pages = [
        "/console/".to_string(),
        "/console/routes".into(),
        "/console/migrations".into(),
        "/console/reviews".into(),
        "/console/traces".into(),
        "/console/traces?cohort=internal".into(),
        "/console/traces?decision=error".into(),
        "/console/traces?verdict=safety:fail".into(),
        format!("/console/traces/{some_id}"),
    ];
    println!(
        "\n{:<48} {:>8} {:>8} {:>8} {:>8}   (server time, ms: the first request, then 20 runs)",
        "page", "first", "median", "p95", "max"
    );
    for page in &pages {
        let mut times = Vec::new();
        let mut first = 0.0;
        for run in 0..23 {
            let (status, headers, body) = http(&admin, "GET", page, Some(&cookie), "");
            assert_eq!(status, 200, "{page}");
            if run == 0 && page == "/console/" {
                // The figures are there: the day's requests, not the store-missing note.
                let day = body.split("Last day").nth(1).unwrap_or("");
                let requests = day.split("class=\"requests\">").nth(1).and_then(|s| s.split('<').next()).unwrap_or("?");
                println!("overview: {requests} primary requests in the last day");
                if requests == "?" {
                    println!("{}", &body[..body.len().min(3000)]);
                }
            }
            let ms: f64 = header(&headers, "server-timing")
                .and_then(|t| t.strip_prefix("app;dur="))
                .and_then(|v| v.parse().ok())
                .expect("Server-Timing");
            if run == 0 {
                first = ms;
            }
            if run >= 3 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let p = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
        println!("{page:<48} {first:>8.1} {:>8.1} {:>8.1} {:>8.1}", p(0.5), p(0.95), times[times.len() - 1]);
    }
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(10));
}
