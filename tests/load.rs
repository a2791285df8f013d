//! One bounded loopback load test: 1,000 concurrent generations through the running binary to a
//! mock that takes 300 ms. Every request must be answered, the gateway's memory must stay
//! within a stated bound, and its tasks must drain back to the idle count afterwards.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const CONCURRENT: usize = 1_000;
/// How much the gateway's resident memory may grow over its idle value under the load.
const RSS_GROWTH_LIMIT_KIB: u64 = 200 * 1024;
/// Tasks the gateway may still hold a while after the load, over its idle count.
const TASK_MARGIN: f64 = 5.0;

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad line {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_are_all_answered_within_bounds() {
    // This process holds both ends' sockets (client and mock provider): about 2,000 descriptors.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let mock = MockProvider::start().await;
    mock.set_latency(Duration::from_millis(300));
    let dir = PolicyDir::with(&format!(
        r#"[server]
max_in_flight = 4096

{}
[[routes]]
name = "main"
match = {{ model = "m" }}
targets = [{{ provider = "up", model = "x" }}]
attempt_timeout_ms = 30000
deadline_ms = 60000
"#,
        openai_provider("up", &mock)
    ));
    let mut gw = Gateway::start(dir.path()).await;
    let body = json!({"model": "m", "prompt": "a lighthouse at dusk", "response_format": "b64_json"});
    let url = gw.url("/v1/images/generations");

    // Warm up (connections, allocator, lazy statics), then take the idle values.
    for _ in 0..20 {
        b64_images(&post_json(&url, &body, &[]).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gw.pid();
    let idle_rss = proc_status_kib(pid, "VmRSS");
    let idle_hwm = proc_status_kib(pid, "VmHWM");
    let m = gw.metrics().await;
    assert!(!metric_samples(&m, "acc_tasks_alive").is_empty(), "no acc_tasks_alive gauge in /metrics:\n{m}");
    let idle_tasks = metric_sum(&m, "acc_tasks_alive", &[]);
    let hits_before = mock.hits();

    // Sample the resident size while the load runs.
    let peak_rss = Arc::new(AtomicU64::new(idle_rss));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak_rss.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = text
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..CONCURRENT {
        let (url, mut body) = (url.clone(), body.clone());
        body["prompt"] = json!(format!("a lighthouse at dusk #{i}"));
        set.spawn(async move {
            let body = serde_json::to_vec(&body).unwrap();
            try_send("POST", &url, &[("content-type", "application/json")], body).await
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined.expect("request task panicked") {
            Ok(r) if r.status == 200 => {
                let images = b64_images(&r);
                assert_eq!(images.len(), 1, "one image per answer: {}", r.describe());
                assert_eq!(images[0], mock.png(), "the provider's image");
            }
            Ok(r) => failures.push(r.describe()),
            Err(e) => failures.push(e),
        }
    }
    let took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {CONCURRENT} requests not answered 200 (in {took:?}); first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(mock.hits() - hits_before, CONCURRENT, "each request generated exactly once");
    eprintln!("{CONCURRENT} concurrent requests through the gateway in {took:?}");

    // Memory: the highest resident size seen under the load (or the new high-water mark).
    let hwm = proc_status_kib(pid, "VmHWM");
    let mut peak = peak_rss.load(Ordering::SeqCst).max(proc_status_kib(pid, "VmRSS"));
    if hwm > idle_hwm {
        peak = peak.max(hwm);
    }
    let growth = peak.saturating_sub(idle_rss);
    eprintln!("gateway RSS idle {idle_rss} KiB, peak under load {peak} KiB (+{growth} KiB)");
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "gateway RSS grew by {growth} KiB under {CONCURRENT} concurrent requests (limit {RSS_GROWTH_LIMIT_KIB} KiB)"
    );

    // Tasks: back to (about) the idle count once the load is over.
    let load_over = Instant::now();
    let drained = eventually(Duration::from_secs(10), || async {
        gw.metric("acc_tasks_alive", &[]).await <= idle_tasks + TASK_MARGIN
    })
    .await;
    let now = gw.metric("acc_tasks_alive", &[]).await;
    eprintln!("acc_tasks_alive idle {idle_tasks}, {now} after {:?} past the load", load_over.elapsed());
    assert!(drained, "acc_tasks_alive stays at {now} after the load (idle: {idle_tasks}, margin {TASK_MARGIN})");
    assert_eq!(gw.exited(), None, "the gateway must survive the load");
}
