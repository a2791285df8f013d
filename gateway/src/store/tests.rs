//! The store's tests. Every test that touches a database runs against SQLite in a temporary
//! directory and, when `ACC_TEST_POSTGRES_URL` is set (e.g. `postgres://acc@127.0.0.1:5432/acc`),
//! against PostgreSQL too, each test in a schema of its own (dropped at the end).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts};
use serde_json::json;
use sqlx::{Connection, Executor, Row};

use super::db::{mask_url, Backend, StoreConfig, TraceDb, MIGRATIONS};
use super::query::{Cursor, TraceFilter, DEFAULT_LIMIT};
use super::record::{AttemptRecord, EvaluationRecord, GenerationRecord, ImageRecord, TraceRecord};
use super::writer::{RecordHook, TraceWriter};

const T: u64 = 1_700_000_000_000_000_000;
const PG_ENV: &str = "ACC_TEST_POSTGRES_URL";

/// One backend a test runs against.
pub(super) struct TestStore {
    pub(super) name: &'static str,
    pub(super) cfg: StoreConfig,
    _dir: tempfile::TempDir,
    /// (admin URL, schema) to drop at the end.
    pg: Option<(String, String)>,
}

impl TestStore {
    pub(super) async fn cleanup(self) {
        if let Some((url, schema)) = self.pg {
            let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to drop the test schema");
            conn.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await.expect("drop schema");
        }
    }
}

fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig { path: dir.path().join("nested/dirs/acc.db"), ..fast_config() };
    TestStore { name: "sqlite", cfg, _dir: dir, pg: None }
}

fn fast_config() -> StoreConfig {
    StoreConfig {
        flush_interval: Duration::from_millis(20),
        retention_interval: Duration::from_millis(50),
        reopen_backoff: Duration::from_millis(50),
        ..StoreConfig::default()
    }
}

/// The test database's URL; with `ACC_REQUIRE_POSTGRES=1` (scripts/test.sh sets it) a missing
/// one fails the test instead of skipping its PostgreSQL half.
fn pg_url() -> Option<String> {
    let url = std::env::var(PG_ENV).ok().filter(|u| !u.is_empty());
    if url.is_none() && std::env::var("ACC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("{PG_ENV} is unset but ACC_REQUIRE_POSTGRES=1: scripts/test.sh starts the server");
    }
    url
}

/// A fresh schema in the test database, and a URL whose connections use it.
async fn pg_store(url: &str) -> TestStore {
    sqlx::any::install_default_drivers();
    let schema = format!("acc_test_{:016x}", fastrand::u64(..));
    let mut conn = sqlx::AnyConnection::connect(url).await.expect("connect to ACC_TEST_POSTGRES_URL");
    conn.execute(format!("CREATE SCHEMA {schema}").as_str()).await.expect("create schema");
    let sep = if url.contains('?') { '&' } else { '?' };
    let cfg = StoreConfig { url: Some(format!("{url}{sep}options[search_path]={schema}")), ..fast_config() };
    TestStore {
        name: "postgres",
        cfg,
        _dir: tempfile::tempdir().expect("tempdir"),
        pg: Some((url.to_string(), schema)),
    }
}

/// SQLite, plus PostgreSQL when the environment names one.
pub(super) async fn stores() -> Vec<TestStore> {
    let mut v = vec![sqlite_store()];
    match pg_url() {
        Some(url) => v.push(pg_store(&url).await),
        None => eprintln!("note: {PG_ENV} is unset: the PostgreSQL half of this test is skipped"),
    }
    v
}

fn id(n: u64) -> String {
    format!("{:032x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn rec(trace_id: &str, start: u64) -> TraceRecord {
    TraceRecord {
        trace_id: trace_id.to_string(),
        span_id: "00f067aa0ba902b7".into(),
        kind: "primary".into(),
        start_time_unix_nano: start,
        duration_ms: 12.5,
        operation: "generations".into(),
        record_prompt: "none".into(),
        parameters: json!({"n": 1}),
        decision: "pass".into(),
        outcome: "ok".into(),
        status: 200,
        ..TraceRecord::default()
    }
}

fn attempt(provider: &str, result: &str, evals: &[(&str, &str)]) -> AttemptRecord {
    AttemptRecord {
        span_id: "b7ad6b7169203331".into(),
        route: "r".into(),
        target: 0,
        provider: provider.into(),
        provider_kind: "openai".into(),
        model: "m".into(),
        result: result.into(),
        role: "primary".into(),
        evaluations: evals
            .iter()
            .map(|(e, v)| EvaluationRecord {
                image: 0,
                evaluator: e.to_string(),
                score: 0.5,
                verdict: v.to_string(),
                reason: String::new(),
            })
            .collect(),
        ..AttemptRecord::default()
    }
}

fn full_record() -> TraceRecord {
    TraceRecord {
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        span_id: "00f067aa0ba902b7".into(),
        parent_span_id: Some("b7ad6b7169203331".into()),
        parent_trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
        kind: "mirror".into(),
        start_time_unix_nano: 1_700_000_000_123_456_789,
        duration_ms: 1234.5,
        tenant: Some("acme".into()),
        key_name: Some("ci".into()),
        route: Some("posters".into()),
        operation: "edits".into(),
        cohort: Some("beta".into()),
        prompt_template: Some("poster@3".into()),
        asset_type: Some("banner".into()),
        end_user: Some("user-42".into()),
        record_prompt: "full".into(),
        prompt: Some("a red fox, \"quoted\" & ünïcode ✓\nline two".into()),
        negative_prompt: Some("blurry".into()),
        prompt_sha256: Some("ab".repeat(32)),
        negative_prompt_sha256: Some("cd".repeat(32)),
        parameters: json!({"model": "gpt-image-1", "n": 2, "size": "1024x1024", "seed": 7, "guidance_scale": 7.5}),
        contract: Some(json!({"text": ["SALE"], "forbid_text": false})),
        attempts: vec![
            AttemptRecord {
                span_id: "1111111111111111".into(),
                route: "posters".into(),
                target: 0,
                provider: "openai".into(),
                provider_kind: "openai".into(),
                model: "gpt-image-1".into(),
                model_version: None,
                start_offset_ms: 0.25,
                latency_ms: 300.0,
                queue_ms: 1.5,
                result: "timeout".into(),
                error: Some("timed out after 300 ms".into()),
                cost_usd: None,
                role: "primary".into(),
                endpoint_host: Some("api.example.com".into()),
                evaluations: vec![],
            },
            AttemptRecord {
                span_id: "2222222222222222".into(),
                route: "fallback".into(),
                target: 1,
                provider: "stability".into(),
                provider_kind: "stability".into(),
                model: "sd3".into(),
                model_version: Some("sd3-large-2024".into()),
                start_offset_ms: 301.0,
                latency_ms: 900.75,
                queue_ms: 0.0,
                result: "ok".into(),
                error: None,
                cost_usd: Some(0.065),
                role: "fallback".into(),
                endpoint_host: Some("api.example.com".into()),
                evaluations: vec![
                    EvaluationRecord {
                        image: 0,
                        evaluator: "safety".into(),
                        score: 0.25,
                        verdict: "fail".into(),
                        reason: "nudity 0.75".into(),
                    },
                    EvaluationRecord {
                        image: 1,
                        evaluator: "text".into(),
                        score: 1.0,
                        verdict: "pass".into(),
                        reason: String::new(),
                    },
                ],
            },
        ],
        generation: Some(GenerationRecord {
            seed: Some(u64::MAX),
            sampler: Some("euler".into()),
            steps: Some(30),
            guidance: Some(7.5),
            model_version: Some("sd3-large-2024".into()),
        }),
        decision: "flagged".into(),
        outcome: "ok".into(),
        status: 200,
        error_code: Some("content_flagged".into()),
        images: vec![
            ImageRecord {
                index: 0,
                sha256: Some("ef".repeat(32)),
                bytes: Some(123_456),
                url: Some("https://gw/a/0.png".into()),
                c2pa_manifest: Some("urn:c2pa:8f1c2d3e-0000-4000-8000-000000000000".into()),
            },
            ImageRecord { index: 1, sha256: None, bytes: None, url: None, c2pa_manifest: None },
        ],
        cost_usd: Some(0.065),
        canary: true,
        regeneration: Some(super::record::RegenerationLink {
            of: "0af7651916cd43dd8448eb211c80319c".into(),
            how: "implicit".into(),
            similarity: 0.875,
        }),
        pending_images: Vec::new(),
    }
}

fn counters() -> (IntCounterVec, IntCounter) {
    let dropped = IntCounterVec::new(Opts::new("acc_trace_dropped_total", "dropped"), &["reason"]).expect("counter");
    let written = IntCounter::new("acc_trace_written_total", "written").expect("counter");
    (dropped, written)
}

fn dropped(c: &IntCounterVec, reason: &str) -> u64 {
    c.with_label_values(&[reason]).get()
}

async fn ids(db: &TraceDb, query: &str) -> Vec<String> {
    let filter = TraceFilter::from_query(query).unwrap_or_else(|e| panic!("{query}: {e}"));
    db.list(&filter).await.expect("list").records.into_iter().map(|r| r.trace_id).collect()
}

/// Polls `f` every 20 ms for up to `secs`; false when it never held.
async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

// ---- the database ----

async fn check_roundtrip(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    let r = full_record();
    assert_eq!(db.insert_batch(std::slice::from_ref(&r)).await.expect("insert"), 1);
    assert_eq!(db.get(&r.trace_id).await.expect("get"), Some(r.clone()), "{}", s.name);
    assert_eq!(db.get("ffffffffffffffffffffffffffffffff").await.expect("get"), None);
    assert_eq!(db.count().await.expect("count"), 1);
    // The multi-valued columns come from the record's own accessors.
    assert_eq!(ids(&db, "provider=openai").await, vec![r.trace_id.clone()]);
    assert_eq!(ids(&db, "verdict=safety:fail").await, vec![r.trace_id.clone()]);
    assert_eq!(ids(&db, "verdict=text:pass").await, vec![r.trace_id.clone()]);
    db.close().await;
}

#[tokio::test]
async fn roundtrip_of_a_fully_populated_record() {
    for s in stores().await {
        check_roundtrip(&s).await;
        s.cleanup().await;
    }
}

async fn check_filters(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    let mut r1 = rec("r1", T + 1);
    r1.route = Some("a".into());
    r1.tenant = Some("t1".into());
    r1.cohort = Some("c1".into());
    r1.prompt_template = Some("poster@1".into());
    r1.asset_type = Some("icon".into());
    r1.attempts = vec![attempt("openai", "ok", &[("safety", "pass")])];
    let mut r2 = rec("r2", T + 2);
    r2.route = Some("ab".into());
    r2.tenant = Some("t2".into());
    r2.cohort = Some("c2".into());
    r2.prompt_template = Some("poster@2".into());
    r2.asset_type = Some("banner".into());
    r2.decision = "flagged".into();
    r2.attempts = vec![attempt("openai-2", "ok", &[("safety", "fail"), ("text", "pass")])];
    let mut r3 = rec("r3", T + 3);
    r3.route = Some("a".into());
    r3.tenant = Some("t1".into());
    r3.decision = "blocked".into();
    r3.attempts = vec![attempt("stability", "timeout", &[]), attempt("openai", "ok", &[("safety", "pass")])];
    // No attempt succeeded: its verdicts are every attempt's.
    let mut r4 = rec("r4", T + 4);
    r4.route = Some("b".into());
    r4.decision = "error".into();
    r4.attempts = vec![attempt("stability", "http_500", &[("safety", "fail")])];
    // A failed attempt's verdict does not count when another succeeded.
    let mut r5 = rec("r5", T + 5);
    r5.route = Some("a".into());
    r5.tenant = Some("t2".into());
    r5.attempts =
        vec![attempt("openai", "bad_image", &[("safety", "fail")]), attempt("stability", "ok", &[("safety", "pass")])];
    db.insert_batch(&[r3, r1, r5, r2, r4]).await.expect("insert");

    let cases: &[(&str, &[&str])] = &[
        ("", &["r5", "r4", "r3", "r2", "r1"]),
        ("route=a", &["r5", "r3", "r1"]),
        ("route=ab", &["r2"]),
        ("tenant=t1", &["r3", "r1"]),
        ("cohort=c1", &["r1"]),
        ("template=poster%401", &["r1"]),
        ("template=poster", &[]),
        ("asset_type=banner", &["r2"]),
        ("provider=openai", &["r5", "r3", "r1"]),
        ("provider=openai-2", &["r2"]),
        ("provider=open", &[]),
        ("provider=stability", &["r5", "r4", "r3"]),
        ("decision=flagged", &["r2"]),
        ("decision=pass", &["r5", "r1"]),
        ("verdict=safety:fail", &["r4", "r2"]),
        ("verdict=safety:pass", &["r5", "r3", "r1"]),
        ("verdict=text:pass", &["r2"]),
        ("verdict=safet:fail", &[]),
        ("verdict=safety:error", &[]),
        (&format!("since={}", T + 2), &["r5", "r4", "r3", "r2"]),
        (&format!("until={}", T + 3), &["r2", "r1"]),
        (&format!("since={}&until={}", T + 2, T + 4), &["r3", "r2"]),
        ("route=a&provider=stability", &["r5", "r3"]),
        ("route=a&tenant=t1&verdict=safety:pass&decision=blocked", &["r3"]),
        ("since=2023-11-14T22:13:20Z", &["r5", "r4", "r3", "r2", "r1"]),
        ("since=2023-11-14T22:13:21Z", &[]),
    ];
    for (query, expected) in cases {
        assert_eq!(
            ids(&db, query).await,
            expected.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "{}: {query}",
            s.name
        );
    }
    db.close().await;
}

#[tokio::test]
async fn each_filter_returns_exactly_its_records() {
    for s in stores().await {
        check_filters(&s).await;
        s.cleanup().await;
    }
}

async fn check_pagination(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    // 23 records, three to a start time, so pages break inside groups of equal times.
    let records: Vec<TraceRecord> = (0..23u64)
        .map(|i| {
            let mut r = rec(&id(i), T + i / 3);
            r.attempts = vec![attempt(if i % 2 == 0 { "even" } else { "odd" }, "ok", &[])];
            r
        })
        .collect();
    db.insert_batch(&records).await.expect("insert");
    let mut expected: Vec<(u64, String)> =
        records.iter().map(|r| (r.start_time_unix_nano, r.trace_id.clone())).collect();
    expected.sort_by(|a, b| b.cmp(a));

    for (query, keep) in
        [("limit=5", None), ("limit=4&provider=even", Some("even")), ("limit=23", None), ("limit=22", None)]
    {
        let want: Vec<String> = expected
            .iter()
            .filter(|(_, id)| {
                keep.is_none_or(|k| records.iter().any(|r| r.trace_id == *id && r.attempts[0].provider == k))
            })
            .map(|(_, id)| id.clone())
            .collect();
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let q = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.to_string(),
            };
            let page = db.list(&TraceFilter::from_query(&q).expect("filter")).await.expect("list");
            pages += 1;
            assert!(pages < 30, "pagination does not end");
            got.extend(page.records.iter().map(|r| r.trace_id.clone()));
            match page.next_cursor {
                Some(c) => {
                    assert!(!page.records.is_empty());
                    cursor = Some(c);
                }
                None => break,
            }
        }
        assert_eq!(got, want, "{}: {query}", s.name);
        let limit: usize = query
            .split('&')
            .next()
            .and_then(|l| l.strip_prefix("limit="))
            .and_then(|l| l.parse().ok())
            .unwrap_or(DEFAULT_LIMIT);
        assert_eq!(pages, want.len().div_ceil(limit).max(1), "{}: {query}: pages", s.name);
    }
    db.close().await;
}

#[tokio::test]
async fn pagination_visits_every_record_once() {
    for s in stores().await {
        check_pagination(&s).await;
        s.cleanup().await;
    }
}

async fn check_duplicates(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    let mut a = rec(&id(1), T);
    a.attempts = vec![attempt("first", "ok", &[])];
    let mut a2 = a.clone();
    a2.decision = "blocked".into();
    a2.attempts = vec![attempt("second", "ok", &[])];
    let b = rec(&id(2), T + 1);
    assert_eq!(db.insert_batch(&[a.clone(), b.clone(), a2.clone()]).await.expect("insert"), 2, "{}", s.name);
    let mut a3 = a.clone();
    a3.attempts = vec![attempt("third", "ok", &[])];
    let c = rec(&id(3), T + 2);
    assert_eq!(db.insert_batch(&[a3, c]).await.expect("insert again"), 1);
    assert_eq!(db.count().await.expect("count"), 3);
    // The first write wins, its tags included.
    assert_eq!(db.get(&a.trace_id).await.expect("get"), Some(a.clone()));
    assert_eq!(ids(&db, "provider=first").await, vec![a.trace_id.clone()]);
    assert!(ids(&db, "provider=second").await.is_empty());
    assert!(ids(&db, "provider=third").await.is_empty());
    assert_eq!(db.insert_batch(&[]).await.expect("empty batch"), 0);
    db.close().await;
}

#[tokio::test]
async fn a_duplicate_trace_id_is_ignored_not_failed() {
    for s in stores().await {
        check_duplicates(&s).await;
        s.cleanup().await;
    }
}

async fn check_large_batches(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    // 64 + 16 + 4 + 1 + 1 + 1 rows: every statement size a batch is cut into, with distinct
    // field values per row so a row bound to the wrong record would show.
    let first: Vec<TraceRecord> = (0..87u64)
        .map(|i| {
            let mut r = rec(&id(1000 + i), T + i);
            r.route = Some(format!("route-{i}"));
            r.attempts = vec![attempt(&format!("provider-{i}"), "ok", &[])];
            r
        })
        .collect();
    assert_eq!(db.insert_batch(&first).await.expect("insert"), 87, "{}", s.name);
    // Again with 40 of them (changed) among 50 new ones: only the new ones count.
    let mut again: Vec<TraceRecord> = first[20..60]
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.decision = "blocked".into();
            r
        })
        .collect();
    again.extend((0..50u64).map(|i| rec(&id(2000 + i), T + 100 + i)));
    assert_eq!(db.insert_batch(&again).await.expect("insert again"), 50, "{}", s.name);
    assert_eq!(db.count().await.expect("count"), 137, "{}", s.name);
    for r in first.iter().step_by(7).chain([&first[86]]) {
        assert_eq!(db.get(&r.trace_id).await.expect("get").as_ref(), Some(r), "{}", s.name);
    }
    assert_eq!(ids(&db, "provider=provider-85").await, vec![first[85].trace_id.clone()], "{}", s.name);
    db.close().await;
}

#[tokio::test]
async fn large_batches_insert_every_row_once() {
    for s in stores().await {
        check_large_batches(&s).await;
        s.cleanup().await;
    }
}

/// Tags stored, over every row (each `tag=value` between the commas of `tags`).
/// The writer's batches (SQLite: the file's own connection) and the pool's writes (here
/// retention, as reviews and explicit ratings also do) running at once: SQLite serialises them
/// (`busy_timeout`), and neither fails nor loses a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_the_pools_writes_at_once_neither_fail_nor_lose_rows() {
    for s in stores().await {
        let db = TraceDb::open(&s.cfg).await.expect("open");
        let batches = {
            let db = db.clone();
            tokio::spawn(async move {
                for b in 0..40u64 {
                    let batch: Vec<TraceRecord> = (0..50).map(|i| rec(&id(b * 50 + i), T + b * 50 + i)).collect();
                    assert_eq!(db.insert_batch(&batch).await.expect("batch"), 50);
                }
            })
        };
        let mut pruned = 0;
        for _ in 0..40 {
            // Everything older than T + 500 goes: the first ten batches, as they arrive.
            pruned += db.prune(T + 500 + 86_400 * 1_000_000_000, Some(1), None).await.expect("prune");
            tokio::task::yield_now().await;
        }
        batches.await.expect("the batches");
        pruned += db.prune(T + 500 + 86_400 * 1_000_000_000, Some(1), None).await.expect("prune");
        assert_eq!(pruned, 500, "{}", s.name);
        assert_eq!(db.count().await.expect("count"), 1500, "{}", s.name);
        db.close().await;
        s.cleanup().await;
    }
}

async fn tag_rows(db: &TraceDb) -> i64 {
    let rows = sqlx::query("SELECT tags FROM traces").fetch_all(db.pool()).await.expect("read tags");
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).expect("tags").split(',').filter(|t| !t.is_empty()).count() as i64)
        .sum()
}

async fn check_prune(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    const DAY: u64 = 86_400 * 1_000_000_000;
    let now = T + 30 * DAY;
    let with_tag = |n: u64, t: u64| {
        let mut r = rec(&id(n), t);
        r.attempts = vec![attempt("p", "ok", &[("safety", "pass")])];
        r
    };
    db.insert_batch(&[with_tag(1, now - 10 * DAY), with_tag(2, now - 3 * DAY), with_tag(3, now - DAY / 24)])
        .await
        .expect("insert");
    assert_eq!(tag_rows(&db).await, 6);
    assert_eq!(db.prune(now, None, None).await.expect("no rules"), 0);
    assert_eq!(db.prune(now, Some(7), None).await.expect("prune by age"), 1, "{}", s.name);
    assert_eq!(db.count().await.expect("count"), 2);
    assert_eq!(db.get(&id(1)).await.expect("get"), None);
    assert_eq!(tag_rows(&db).await, 4, "{}: the pruned record's tags go too", s.name);
    assert_eq!(db.prune(now, Some(7), None).await.expect("again"), 0);

    // By rows: ten more; the limit falls inside a group of three sharing a start time, where
    // the trace id decides.
    let more: Vec<TraceRecord> = (10..20u64)
        .map(|n| {
            let offset = match n {
                19 => 9,
                18 => 8,
                15..=17 => 7,
                _ => n - 10,
            };
            with_tag(n, now - 100 + offset)
        })
        .collect();
    db.insert_batch(&more).await.expect("insert more");
    assert_eq!(db.count().await.expect("count"), 12);
    let newest: Vec<String> = ids(&db, "limit=4").await;
    assert_eq!(db.prune(now, None, Some(4)).await.expect("prune by rows"), 8, "{}", s.name);
    assert_eq!(ids(&db, "").await, newest, "{}: the newest four stay", s.name);
    assert_eq!(tag_rows(&db).await, 8);
    assert_eq!(db.prune(now, None, Some(4)).await.expect("again"), 0);
    assert_eq!(db.prune(now, Some(1), Some(0)).await.expect("all"), 4);
    assert_eq!(db.count().await.expect("count"), 0);
    assert_eq!(tag_rows(&db).await, 0);
    db.close().await;
}

#[tokio::test]
async fn prune_by_age_and_by_rows() {
    for s in stores().await {
        check_prune(&s).await;
        s.cleanup().await;
    }
}

async fn check_reopen(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    db.insert_batch(&[full_record(), rec(&id(1), T)]).await.expect("insert");
    drop(db); // no close: as a process that stops
    let db = TraceDb::open(&s.cfg).await.expect("reopen (migrations again)");
    assert_eq!(db.count().await.expect("count"), 2, "{}", s.name);
    assert_eq!(db.get(&full_record().trace_id).await.expect("get"), Some(full_record()));
    if db.backend() == Backend::Sqlite {
        let row = sqlx::query("PRAGMA journal_mode").fetch_one(db.pool()).await.expect("pragma");
        assert_eq!(row.try_get::<String, _>(0).expect("mode"), "wal");
        let row = sqlx::query("PRAGMA synchronous").fetch_one(db.pool()).await.expect("pragma");
        assert_eq!(row.try_get::<i64, _>(0).expect("sync"), 1, "synchronous=NORMAL");
    }
    db.close().await;
}

#[tokio::test]
async fn records_survive_a_reopen() {
    for s in stores().await {
        check_reopen(&s).await;
        s.cleanup().await;
    }
}

#[test]
fn every_migration_file_is_embedded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/migrations");
    let mut files: Vec<(i64, String)> = std::fs::read_dir(&dir)
        .expect("gateway/migrations")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().to_string();
            let version = name.split('_').next().and_then(|v| v.parse().ok()).expect("NNNN_name.sql");
            (version, std::fs::read_to_string(&p).expect("read"))
        })
        .collect();
    files.sort();
    let embedded: Vec<(i64, String)> = MIGRATIONS.iter().map(|(v, _, sql)| (*v, sql.to_string())).collect();
    assert_eq!(files, embedded, "gateway/migrations and db::MIGRATIONS differ");
}

#[test]
fn urls_and_errors_never_show_the_password() {
    assert_eq!(mask_url("postgres://acc:s3cret@db:5432/acc"), "postgres://acc:***@db:5432/acc");
    assert_eq!(
        mask_url("postgres://acc@db/acc?sslmode=disable&password=s3cret"),
        "postgres://acc@db/acc?sslmode=disable&password=***"
    );
    assert_eq!(mask_url("postgres://db/acc"), "postgres://db/acc");
    assert_eq!(mask_url("postgres://a:p%40ss@db/acc"), "postgres://a:***@db/acc");
    let cfg = StoreConfig { url: Some("mysql://u:s3cret@h/db".into()), ..StoreConfig::default() };
    let e = cfg.check().expect_err("mysql");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert_eq!(cfg.target(), "mysql://u:***@h/db");
}

#[tokio::test]
async fn open_fails_clearly_on_an_unreachable_postgres() {
    let port = free_port();
    let cfg =
        StoreConfig { url: Some(format!("postgres://acc:s3cret@127.0.0.1:{port}/acc")), ..StoreConfig::default() };
    let started = Instant::now();
    let e = TraceDb::open(&cfg).await.expect_err("nothing listens");
    assert!(e.is_unavailable(), "{e}");
    assert_eq!(e.status(), 503);
    let text = e.to_string();
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("***") && text.contains(&port.to_string()), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3), "a refused connection fails at once");
}

#[tokio::test]
async fn open_fails_when_the_directory_cannot_be_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("blocker"), b"a file").expect("file");
    let cfg = StoreConfig { path: dir.path().join("blocker/sub/acc.db"), ..StoreConfig::default() };
    let e = TraceDb::open(&cfg).await.expect_err("parent is a file");
    assert!(e.is_unavailable(), "{e}");
}

// ---- queries ----

#[test]
fn query_strings_parse_and_bad_values_are_named() {
    let f = TraceFilter::from_query(
        "route=posters&tenant=acme&cohort=beta&template=poster%403&asset_type=banner&provider=openai\
         &decision=flagged&verdict=safety:fail&since=1700000000000000000&until=2024-01-01T01:00:00%2B01:00&limit=7",
    )
    .expect("parse");
    assert_eq!(f.route.as_deref(), Some("posters"));
    assert_eq!(f.tenant.as_deref(), Some("acme"));
    assert_eq!(f.cohort.as_deref(), Some("beta"));
    assert_eq!(f.template.as_deref(), Some("poster@3"));
    assert_eq!(f.asset_type.as_deref(), Some("banner"));
    assert_eq!(f.provider.as_deref(), Some("openai"));
    assert_eq!(f.decision.as_deref(), Some("flagged"));
    assert_eq!(f.verdict.as_deref(), Some("safety:fail"));
    assert_eq!(f.since, Some(1_700_000_000_000_000_000));
    assert_eq!(f.until, Some(1_704_067_200_000_000_000));
    assert_eq!(f.limit, 7);
    assert_eq!(f.cursor, None);
    assert_eq!(TraceFilter::from_query("").expect("empty"), TraceFilter::default());
    assert_eq!(TraceFilter::from_query("route=&tenant=").expect("empty values"), TraceFilter::default());
    assert_eq!(
        TraceFilter::from_query("since=2024-01-01T00:00:00.5Z").expect("fraction").since,
        Some(1_704_067_200_500_000_000)
    );
    // Past the store's range (signed 64-bit nanoseconds, until 2262): its end, so a far-future
    // `until` means no end.
    let end = i64::MAX as u64;
    assert_eq!(TraceFilter::from_query("until=9999-12-31T23:59:59Z").expect("far future").until, Some(end));
    assert_eq!(TraceFilter::from_query("until=99999999999999999999").expect("huge").until, Some(end));
    assert_eq!(
        TraceFilter::from_query("since=2024-01-01T00:00:00%2B00:00").expect("encoded +").since,
        Some(1_704_067_200_000_000_000)
    );
    // A bad value is quoted cut short, not echoed whole.
    let long = format!("cursor={}", "A".repeat(3000));
    let e = TraceFilter::from_query(&long).expect_err("long cursor");
    assert!(e.message.len() < 300, "{e}");
    assert_eq!(e.param, "cursor");
    // Seconds or milliseconds are not silently read as nanoseconds of 1970.
    let e = TraceFilter::from_query("since=1796607400").expect_err("seconds");
    assert!(e.message.contains("1796607400000000000"), "{e}");
    let e = TraceFilter::from_query("since=1796607400123").expect_err("milliseconds");
    assert!(e.message.contains("1796607400123000000"), "{e}");
    assert_eq!(TraceFilter::from_query("since=0").expect("the epoch").since, Some(0));
    let e = TraceFilter::from_query("until=2025-01-01T00:00:00+00:00").expect_err("unencoded +");
    assert!(e.message.contains("%2B"), "{e}");

    for (query, names) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("since=yesterday", "since"),
        ("until=2024-13-01T00:00:00Z", "until"),
        ("since=1969-12-31T23:59:59Z", "since"),
        ("until=2025-01-01T00:00:00+00:00", "until"),
        ("verdict=safety", "verdict"),
        ("verdict=sanity:maybe", "verdict"),
        ("verdict=a:b:fail", "verdict"),
        ("decision=maybe", "decision"),
        ("verdict=:fail", "verdict"),
        ("cursor=!!!", "cursor"),
        ("cursor=bm9jb2xvbg", "cursor"),
        ("colour=red", "colour"),
        ("route=a&route=b", "route"),
        ("since=1796607400", "since"),
        ("until=1796607400123", "until"),
        (&format!("since={}&until={}", T + 5, T + 5), "since"),
    ] {
        let e = TraceFilter::from_query(query).expect_err(query);
        assert!(e.message.contains(names), "{query}: {e}");
        let param = if names == "colour" { "query" } else { names };
        assert_eq!(e.param, param, "{query}: {e}");
    }
}

#[test]
fn cursors_round_trip_and_reject_garbage() {
    let c = Cursor { start_time_unix_nano: T + 7, trace_id: id(7), span_id: "00f067aa0ba902b7".into() };
    let s = c.encode();
    assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {s}");
    assert_eq!(Cursor::decode(&s), Ok(c.clone()));
    let f = TraceFilter::from_query(&format!("cursor={s}")).expect("cursor");
    assert_eq!(f.cursor, Some(c));
    for bad in ["", "====", "MTIz", "OjEyMw", "eDphYmM"] {
        assert!(Cursor::decode(bad).is_err(), "{bad:?}");
    }
}

// ---- the writer ----

fn spawn(cfg: StoreConfig) -> (TraceWriter, IntCounterVec, IntCounter) {
    let (d, w) = counters();
    (TraceWriter::spawn(cfg, d.clone(), w.clone(), None), d, w)
}

async fn check_writer_writes(s: &TestStore) {
    let (d, w) = counters();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook_seen = seen.clone();
    let hook: RecordHook = std::sync::Arc::new(move |_r: &TraceRecord| {
        hook_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let writer = TraceWriter::spawn(StoreConfig { batch_max: 7, ..s.cfg.clone() }, d.clone(), w.clone(), Some(hook));
    for i in 0..50 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(writer.flush().await, "{}", s.name);
    assert_eq!(w.get(), 50, "{}", s.name);
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 50);
    for reason in ["queue_full", "store_unavailable", "store_error", "closed"] {
        assert_eq!(dropped(&d, reason), 0, "{}: {reason}", s.name);
    }
    assert!(writer.is_available());
    let db = writer.db().expect("open");
    assert_eq!(db.count().await.expect("count"), 50);
    assert_eq!(writer.queued(), 0);
    assert!(writer.shutdown(Duration::from_secs(5)).await);
    writer.submit(rec(&id(99), T));
    assert_eq!(dropped(&d, "closed"), 1, "after shutdown");
    assert!(!writer.flush().await);
}

#[tokio::test]
async fn writer_batches_records_into_the_store_and_feeds_the_hook() {
    for s in stores().await {
        check_writer_writes(&s).await;
        s.cleanup().await;
    }
}

async fn check_queue_full(s: &TestStore) {
    let (writer, d, w) = spawn(StoreConfig { queue_capacity: 2, ..s.cfg.clone() });
    // On this single-threaded runtime the writer task cannot run before the test awaits, so the
    // queue holds two and the rest overflow.
    let started = Instant::now();
    for i in 0..10 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(started.elapsed() < Duration::from_millis(500), "submit never waits");
    assert_eq!(dropped(&d, "queue_full"), 8, "{}", s.name);
    assert!(writer.flush().await);
    assert_eq!(w.get(), 2, "{}", s.name);
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    for s in stores().await {
        check_queue_full(&s).await;
        s.cleanup().await;
    }
}

async fn check_store_error(s: &TestStore) {
    let (writer, d, w) = spawn(s.cfg.clone());
    writer.submit(rec(&id(1), T));
    assert!(writer.flush().await);
    assert_eq!(w.get(), 1);
    let db = writer.db().expect("open");
    db.pool().execute("DROP TABLE traces").await.expect("drop table");
    writer.submit(rec(&id(2), T));
    writer.submit(rec(&id(3), T));
    assert!(writer.flush().await);
    assert_eq!(dropped(&d, "store_error"), 2, "{}", s.name);
    assert_eq!(w.get(), 1);
    assert!(writer.is_available(), "a failed statement does not close the store");
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_failing_insert_counts_store_error() {
    for s in stores().await {
        check_store_error(&s).await;
        s.cleanup().await;
    }
}

async fn check_retention(s: &TestStore) {
    let (writer, _d, w) = spawn(StoreConfig { max_rows: Some(3), retention_days: Some(1), ..s.cfg.clone() });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
    // Two too old, eight recent: retention keeps the three newest.
    writer.submit(rec(&id(100), now - 3 * 86_400 * 1_000_000_000));
    writer.submit(rec(&id(101), now - 2 * 86_400 * 1_000_000_000));
    for i in 0..8 {
        writer.submit(rec(&id(i), now - 1_000_000_000 + i));
    }
    assert!(writer.flush().await);
    assert_eq!(w.get(), 10);
    let db = writer.db().expect("open");
    assert!(eventually(5, || async { db.count().await.unwrap_or(99) == 3 }).await, "{}: retention", s.name);
    assert_eq!(ids(&db, "").await, vec![id(7), id(6), id(5)]);
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn retention_runs_in_the_background() {
    for s in stores().await {
        check_retention(&s).await;
        s.cleanup().await;
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn an_unreachable_postgres_counts_store_unavailable_and_never_blocks() {
    let port = free_port();
    let cfg = StoreConfig { url: Some(format!("postgres://acc:pw@127.0.0.1:{port}/acc")), ..fast_config() };
    let (writer, d, w) = spawn(cfg);
    let started = Instant::now();
    for i in 0..100 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(started.elapsed() < Duration::from_millis(500), "submit never waits");
    assert!(writer.flush().await);
    assert_eq!(dropped(&d, "store_unavailable"), 100);
    assert_eq!(w.get(), 0);
    assert!(!writer.is_available());
    assert!(writer.db().is_none());
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn writing_resumes_when_the_sqlite_directory_becomes_writable() {
    // The store's parent is a regular file at first: the directory cannot be created, as on a
    // full or read-only disk. Then the file goes and the writer's next attempt opens the store.
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("data");
    std::fs::write(&blocker, b"not a directory").expect("file");
    let cfg = StoreConfig { path: blocker.join("acc.db"), ..fast_config() };
    let (writer, d, w) = spawn(cfg);
    for i in 0..3 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(writer.flush().await);
    assert_eq!(dropped(&d, "store_unavailable"), 3);
    std::fs::remove_file(&blocker).expect("remove");
    assert!(eventually(5, || async { writer.is_available() }).await, "the writer reopens the store");
    for i in 3..6 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(writer.flush().await);
    assert_eq!(w.get(), 3);
    assert_eq!(writer.db().expect("open").count().await.expect("count"), 3);
    writer.shutdown(Duration::from_secs(5)).await;
}

/// Forwards every connection on `listener` to `upstream`.
async fn forward(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn writing_resumes_when_postgres_comes_up() {
    let Some(url) = pg_url() else {
        eprintln!("note: {PG_ENV} is unset: skipped");
        return;
    };
    let s = pg_store(&url).await;
    // The writer is pointed at a port where nothing listens; later a forwarder to the real
    // server opens there.
    let real = s.cfg.url.clone().expect("url");
    let scheme_end = real.find("://").expect("scheme") + 3;
    let host_start = real[scheme_end..].find('@').map_or(scheme_end, |i| scheme_end + i + 1);
    let host_end = real[host_start..].find(['/', '?']).map_or(real.len(), |i| host_start + i);
    let upstream: SocketAddr =
        tokio::net::lookup_host(&real[host_start..host_end]).await.expect("resolve").next().expect("an address");
    let port = free_port();
    let cfg = StoreConfig {
        url: Some(format!("{}127.0.0.1:{port}{}", &real[..host_start], &real[host_end..])),
        ..s.cfg.clone()
    };
    let (writer, d, w) = spawn(cfg);
    for i in 0..3 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(writer.flush().await);
    assert_eq!(dropped(&d, "store_unavailable"), 3);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the reserved port");
    let fwd = tokio::spawn(forward(listener, upstream));
    assert!(eventually(10, || async { writer.is_available() }).await, "the writer reopens the store");
    for i in 3..6 {
        writer.submit(rec(&id(i), T + i));
    }
    assert!(writer.flush().await);
    assert_eq!(w.get(), 3);
    assert_eq!(writer.db().expect("open").count().await.expect("count"), 3);
    writer.shutdown(Duration::from_secs(5)).await;
    fwd.abort();
    s.cleanup().await;
}

// ---- kill -9 ----

const CRASH_ENV: &str = "ACC_TEST_CRASH_DB";

/// The child of `sqlite_survives_kill_9`: inserts batches into the file it is given until it is
/// killed. Does nothing when run on its own.
#[tokio::test]
#[ignore = "run by sqlite_survives_kill_9 in a child process"]
async fn crash_child() {
    let Ok(path) = std::env::var(CRASH_ENV) else { return };
    let db = TraceDb::open(&StoreConfig { path: path.into(), ..StoreConfig::default() }).await.expect("open");
    let mut n = 0u64;
    loop {
        let batch: Vec<TraceRecord> = (n..n + 50).map(|i| rec(&id(i), T + i)).collect();
        db.insert_batch(&batch).await.expect("insert");
        n += 50;
    }
}

#[tokio::test]
async fn sqlite_survives_kill_9_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("acc.db");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "store::tests::crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    // Watch through a read-only connection: opening the store here would race the child's
    // migrations.
    sqlx::any::install_default_drivers();
    let mut before = 0u64;
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if path.exists() {
            if let Ok(mut conn) = sqlx::AnyConnection::connect(&format!("sqlite:{}?mode=ro", path.display())).await {
                if let Ok(row) = sqlx::query("SELECT COUNT(*) FROM traces").fetch_one(&mut conn).await {
                    before = row.try_get::<i64, _>(0).unwrap_or(0) as u64;
                }
                let _ = conn.close().await;
                if before >= 2_000 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = StoreConfig { path: path.clone(), ..StoreConfig::default() };
    child.kill().expect("SIGKILL"); // mid-transaction, most likely
    child.wait().expect("reap");
    assert!(before >= 2_000, "the child wrote {before} records in time");

    let db = TraceDb::open(&cfg).await.expect("reopen after kill -9");
    let row = sqlx::query("PRAGMA integrity_check").fetch_one(db.pool()).await.expect("integrity_check");
    assert_eq!(row.try_get::<String, _>(0).expect("result"), "ok");
    let after = db.count().await.expect("count");
    assert!(after >= before && after % 50 == 0, "whole batches only: {before} then {after}");
    assert_eq!(db.get(&id(after - 1)).await.expect("get"), Some(rec(&id(after - 1), T + after - 1)));
    assert_eq!(db.insert_batch(&[rec(&id(1_000_000_000), T)]).await.expect("write again"), 1);
    db.close().await;
}

/// Sets `PRAGMA max_page_count` on every connection of the pool and on the writer's own (it is
/// per connection).
async fn set_max_pages(db: &TraceDb, pages: u64) {
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(db.pool().acquire().await.expect("acquire"));
    }
    for c in &mut conns {
        c.execute(format!("PRAGMA max_page_count = {pages}").as_str()).await.expect("pragma");
    }
    // And on the file's own write connection, which the writer's batches use.
    if let Some(local) = &db.local {
        local.with_connection(|c| c.pragma_update(None, "max_page_count", pages)).expect("pragma");
    }
}

#[tokio::test]
async fn a_full_disk_mid_run_counts_store_error_then_writing_resumes() {
    // SQLite's max_page_count caps the file at its current size: inserts then fail with
    // SQLITE_FULL ("database or disk is full"), as on a full disk.
    let s = sqlite_store();
    let (writer, d, w) = spawn(s.cfg.clone());
    let big = |n: u64| TraceRecord { prompt: Some("x".repeat(64 * 1024)), ..rec(&id(n), T + n) };
    writer.submit(big(0));
    assert!(writer.flush().await);
    assert_eq!(w.get(), 1);
    let db = writer.db().expect("open");
    set_max_pages(&db, 1).await;
    let e = db.insert_batch(&[big(99)]).await.expect_err("full");
    assert!(e.to_string().contains("full") && !e.is_unavailable(), "{e}");
    writer.submit(big(1));
    writer.submit(big(2));
    assert!(writer.flush().await);
    assert_eq!(dropped(&d, "store_error"), 2);
    assert!(writer.is_available());
    set_max_pages(&db, 1_073_741_823).await;
    writer.submit(big(3));
    assert!(writer.flush().await);
    assert_eq!(w.get(), 2);
    assert_eq!(ids(&db, "").await, vec![id(3), id(0)]);
    writer.shutdown(Duration::from_secs(5)).await;
}

mod feedback;
