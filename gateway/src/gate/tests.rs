//! The gate's pure parts (arguments, window, verdict, PromQL text) and its store reader against
//! a real SQLite file.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Executor;

use super::*;
use crate::store::record::{AttemptRecord, EvaluationRecord};
use crate::store::TraceRecord;

fn raw() -> RawArgs {
    RawArgs {
        prometheus: Some("http://127.0.0.1:9090".into()),
        max_eval_fail_rate: Some(0.1),
        min_samples: 10,
        since: "5m".into(),
        ..RawArgs::default()
    }
}

fn err(r: RawArgs) -> String {
    r.validate().expect_err("should be refused").to_string()
}

#[test]
fn arguments_are_validated_with_messages_naming_the_flag() {
    let g = raw().validate().unwrap();
    assert_eq!(g.source, Source::Prometheus("http://127.0.0.1:9090".into()));
    assert_eq!(g.thresholds, BTreeMap::from([(Signal::EvalFailRate, 0.1)]));
    assert_eq!(g.window, Duration::from_secs(300));
    assert_eq!(g.min_samples, 10);

    let e = err(RawArgs { max_eval_fail_rate: None, ..raw() });
    assert!(e.starts_with("give at least one threshold"), "{e}");
    for bad in [1.5, -0.1, f64::NAN] {
        assert_eq!(
            err(RawArgs { max_thumbs_down_rate: Some(bad), ..raw() }),
            format!("--max-thumbs-down-rate {bad}: must be a fraction from 0 to 1")
        );
    }
    assert_eq!(err(RawArgs { min_samples: 0, ..raw() }), "--min-samples must be at least 1");
    assert_eq!(err(RawArgs { prometheus: None, ..raw() }), "give a source: --prometheus URL or --store PATH|URL");
    assert_eq!(err(RawArgs { store: Some("x.db".into()), ..raw() }), "give --prometheus or --store, not both");
    assert_eq!(
        err(RawArgs { prometheus: Some("localhost:9090".into()), ..raw() }),
        "--prometheus \"localhost:9090\": expected an http:// or https:// URL"
    );
    let provider = Filters { provider: Some("openai".into()), ..Filters::default() };
    assert!(err(RawArgs { filters: provider.clone(), ..raw() }).starts_with("--provider works only with --store"));
    // With the store, a provider filter is fine.
    let g = RawArgs { prometheus: None, store: Some("acc.db".into()), filters: provider, ..raw() }.validate().unwrap();
    assert_eq!(g.source, Source::Store("acc.db".into()));
    let template = Filters { template: Some("hero@3".into()), ..Filters::default() };
    let e = err(RawArgs { max_regeneration_rate: Some(0.2), filters: template.clone(), ..raw() });
    assert!(e.starts_with("--template and --asset-type cannot filter --max-regeneration-rate"), "{e}");
    assert!(RawArgs { filters: template, ..raw() }.validate().is_ok());
}

#[test]
fn windows_parse_from_one_minute_to_ninety_days() {
    for (s, secs, promql) in [
        ("5m", 300, "5m"),
        ("30m", 1800, "30m"),
        ("6h", 21_600, "6h"),
        ("1d", 86_400, "1d"),
        ("90s", 90, "90s"),
        ("1h 30m", 5400, "90m"),
    ] {
        let d = parse_window(s).unwrap();
        assert_eq!(d, Duration::from_secs(secs), "{s}");
        assert_eq!(promql_duration(d), promql, "{s}");
    }
    assert_eq!(parse_window("30s").unwrap_err().to_string(), "--since \"30s\": the window must be from 1m to 90d");
    assert_eq!(parse_window("91d").unwrap_err().to_string(), "--since \"91d\": the window must be from 1m to 90d");
    assert_eq!(parse_window("5m 500ms").unwrap_err().to_string(), "--since \"5m 500ms\": use whole seconds");
    assert!(parse_window("yesterday").unwrap_err().to_string().contains("not a duration"));
    assert!(parse_window("").is_err());
}

#[test]
fn promql_is_the_ratio_of_rates_with_a_zero_for_cohorts_without_failures() {
    assert_eq!(
        Signal::EvalFailRate.ratio_promql("5m"),
        "(\n  sum by (route, cohort, template, asset_type) (rate(acc_cohort_eval_total{verdict=\"fail\"}[5m]))\n    or\n  \
         0 * sum by (route, cohort, template, asset_type) (rate(acc_cohort_eval_total[5m]))\n)\n  /\n\
         sum by (route, cohort, template, asset_type) (rate(acc_cohort_eval_total[5m]))"
    );
    assert_eq!(
        Signal::RegenerationRate.samples_promql("1d"),
        "sum by (route, cohort) (increase(acc_cohort_requests_total[1d]))"
    );
    assert_eq!(
        Signal::ThumbsDownRate.samples_promql("6h"),
        "sum by (route, cohort, template, asset_type) (increase(acc_feedback_total[6h]))"
    );
}

fn labels(route: &str, cohort: &str) -> BTreeMap<String, String> {
    [("route", route), ("cohort", cohort), ("template", "none"), ("asset_type", "none")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn row(signal: Signal, cohort: &str, value: Option<f64>, samples: f64) -> Row {
    Row { signal, labels: labels("images", cohort), value, samples }
}

fn gate(thresholds: &[(Signal, f64)], min_samples: u64, filters: Filters) -> Gate {
    Gate {
        source: Source::Prometheus("http://p".into()),
        thresholds: thresholds.iter().copied().collect(),
        min_samples,
        window: Duration::from_secs(300),
        filters,
    }
}

/// Prometheus answering `"NaN"` or `"+Inf"` as a cohort's ratio (or no ratio at all) for a
/// cohort with samples is a broken source: the row is `invalid_value` and the gate exits 2,
/// where it used to read as no figure and pass.
#[test]
fn a_prometheus_ratio_that_is_no_fraction_is_invalid_not_a_pass() {
    let eval = Signal::EvalFailRate;
    let g = gate(&[(eval, 0.5)], 10, Filters::default());
    for answered in [Some(f64::NAN), Some(f64::INFINITY), Some(f64::NEG_INFINITY), None] {
        let r = decide(&g, vec![row(eval, "beta", figure(answered, 100.0), 100.0)], &[]);
        assert_eq!((r.verdict, r.exit_code, r.rows[0].verdict), ("undecided", 2, "invalid_value"), "{answered:?}");
    }
    // No samples: nothing to divide by (Prometheus's 0/0 is NaN), so no figure and too few samples.
    assert_eq!(figure(Some(f64::NAN), 0.0), None);
    let r = decide(&g, vec![row(eval, "beta", figure(Some(f64::NAN), 0.0), 0.0)], &[]);
    assert_eq!((r.exit_code, r.rows[0].verdict), (2, "too_few_samples"));
    assert_eq!(figure(Some(0.25), 12.0), Some(0.25));
}

#[test]
fn verdicts_fail_on_a_decided_cohort_above_its_threshold_and_otherwise_need_every_signal_decided() {
    let eval = Signal::EvalFailRate;
    let g = gate(&[(eval, 0.1)], 20, Filters::default());
    // beta crosses with enough samples: fail, named.
    let r = decide(&g, vec![row(eval, "beta", Some(1.0), 24.0), row(eval, "alpha", Some(0.0), 24.0)], &[]);
    assert_eq!((r.verdict, r.exit_code), ("fail", 1));
    assert_eq!(
        r.reasons,
        ["eval_fail_rate 1.0000 > 0.1 for route=images cohort=beta template=none asset_type=none (24 verdicts)"]
    );
    assert_eq!(r.rows.iter().map(|j| j.verdict).collect::<Vec<_>>(), ["pass", "fail"]);
    // Exactly at the threshold passes.
    let r = decide(&g, vec![row(eval, "alpha", Some(0.1), 20.0)], &[]);
    assert_eq!((r.verdict, r.exit_code), ("pass", 0));
    // Crossing with too few samples is not decided; with no decided row the gate cannot decide.
    let r = decide(&g, vec![row(eval, "beta", Some(1.0), 19.0)], &[]);
    assert_eq!((r.verdict, r.exit_code), ("undecided", 2));
    assert_eq!(r.rows[0].verdict, "too_few_samples");
    assert_eq!(r.reasons, ["eval_fail_rate: no cohort has 20 verdicts or more in the window"]);
    // No data at all: undecided.
    assert_eq!(decide(&g, vec![], &[]).exit_code, 2);
    // A source answering NaN, an infinity or a rate outside [0, 1] decides nothing (a pass on
    // such a row would let a broken source wave a release through).
    for bad in [f64::NAN, f64::INFINITY, -5.0, 1.5] {
        let r = decide(&g, vec![row(eval, "beta", Some(bad), 100.0)], &[]);
        assert_eq!((r.verdict, r.exit_code, r.rows[0].verdict), ("undecided", 2, "invalid_value"), "{bad}");
    }
    let r = decide(&g, vec![row(eval, "beta", Some(0.0), f64::NAN)], &[]);
    assert_eq!((r.exit_code, r.rows[0].verdict), (2, "invalid_value"));
    // A filter that leaves out the failing cohort passes on the other.
    let only_alpha = gate(&[(eval, 0.1)], 20, Filters { cohort: Some("alpha".into()), ..Filters::default() });
    let r = decide(&only_alpha, vec![row(eval, "beta", Some(1.0), 24.0), row(eval, "alpha", Some(0.0), 24.0)], &[]);
    assert_eq!((r.verdict, r.rows.len()), ("pass", 1));
    // Two signals: one decided and passing, the other without samples: undecided...
    let both = gate(&[(eval, 0.1), (Signal::ThumbsDownRate, 0.2)], 20, Filters::default());
    let r = decide(
        &both,
        vec![row(eval, "alpha", Some(0.0), 30.0), row(Signal::ThumbsDownRate, "alpha", Some(0.5), 3.0)],
        &[],
    );
    assert_eq!((r.verdict, r.exit_code), ("undecided", 2));
    // ...but a failure elsewhere still fails: a definite failure outranks an undecided signal.
    let r = decide(&both, vec![row(eval, "alpha", Some(0.5), 30.0)], &[]);
    assert_eq!(r.exit_code, 1);
    // A signal whose source is missing is undecided with the reason given.
    let r = decide(&both, vec![row(eval, "alpha", Some(0.0), 30.0)], &[(Signal::ThumbsDownRate, "no table".into())]);
    assert_eq!(r.reasons, ["thumbs_down_rate: no table"]);
    // Rows of signals not asked for are ignored.
    let r = decide(&g, vec![row(eval, "a", Some(0.0), 30.0), row(Signal::RegenerationRate, "a", Some(0.9), 99.0)], &[]);
    assert_eq!((r.exit_code, r.rows.len()), (0, 1));
}

fn record(trace_id: &str, start: u64, cohort: Option<&str>, verdicts: &[&str], provider: &str) -> TraceRecord {
    TraceRecord {
        trace_id: trace_id.into(),
        span_id: "00f067aa0ba902b7".into(),
        kind: "primary".into(),
        start_time_unix_nano: start,
        route: Some("images".into()),
        cohort: cohort.map(str::to_string),
        operation: "generations".into(),
        record_prompt: "none".into(),
        decision: "pass".into(),
        outcome: "ok".into(),
        status: 200,
        parameters: serde_json::json!({}),
        attempts: vec![AttemptRecord {
            provider: provider.into(),
            route: "images".into(),
            result: "ok".into(),
            role: "primary".into(),
            evaluations: verdicts
                .iter()
                .map(|v| EvaluationRecord { evaluator: "sanity".into(), verdict: v.to_string(), ..Default::default() })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

const NOW: u64 = 1_800_000_000_000_000_000;
const MIN: u64 = 60_000_000_000;

/// The test database of `ACC_TEST_POSTGRES_URL`, if set; with `ACC_REQUIRE_POSTGRES=1`
/// (scripts/test.sh) a missing one fails the test instead of skipping its PostgreSQL half.
fn pg_url() -> Option<String> {
    let url = std::env::var("ACC_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() && std::env::var("ACC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("ACC_TEST_POSTGRES_URL is unset but ACC_REQUIRE_POSTGRES=1");
    }
    url
}

#[tokio::test]
async fn the_store_gives_each_cohorts_rates_over_the_window_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acc.db");
    // Open (and so create) the file first: the gate refuses a path that does not exist.
    TraceDb::open(&StoreConfig { path: path.clone(), ..StoreConfig::default() }).await.unwrap().close().await;
    store_rates_over_the_window(path.to_str().unwrap()).await;

    // A path that does not exist is refused, not created.
    let missing_path = dir.path().join("nope.db").to_str().unwrap().to_string();
    let g = Gate {
        source: Source::Store(missing_path.clone()),
        ..gate(&[(Signal::EvalFailRate, 0.1)], 2, Filters::default())
    };
    let e = store_rows(&g, &missing_path, NOW).await.unwrap_err().to_string();
    assert_eq!(e, format!("--store {missing_path}: no such file"));
    assert!(!dir.path().join("nope.db").exists());
}

#[tokio::test]
async fn the_store_gives_each_cohorts_rates_over_the_window_postgres() {
    let Some(url) = pg_url() else {
        eprintln!("note: ACC_TEST_POSTGRES_URL is unset: the PostgreSQL half of the gate's store test is skipped");
        return;
    };
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let schema = format!("acc_gate_{:016x}", fastrand::u64(..));
    let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to ACC_TEST_POSTGRES_URL");
    conn.execute(format!("CREATE SCHEMA {schema}").as_str()).await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    store_rates_over_the_window(&format!("{url}{sep}options[search_path]={schema}")).await;
    conn.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await.unwrap();
}

/// Records and ratings written to the store `target`, read back by the gate.
async fn store_rates_over_the_window(target: &str) {
    let db = TraceDb::open(&store_config(target).unwrap()).await.unwrap();
    // A store written by a gateway from before feedback (schema 0001 and 0002 only): the
    // migrations made the table, so it goes.
    db.pool().execute("DROP TABLE feedback").await.unwrap();
    let mut records = vec![
        // beta: 3 of 4 verdicts fail (one request with two images).
        record(&format!("{:032x}", 1), NOW - MIN, Some("beta"), &["fail", "fail"], "first"),
        record(&format!("{:032x}", 2), NOW - 2 * MIN, Some("beta"), &["fail", "pass"], "first"),
        // No cohort sent: "none"; one error verdict is not a failure.
        record(&format!("{:032x}", 3), NOW - MIN, None, &["pass", "error"], "second"),
        // Outside the 5-minute window.
        record(&format!("{:032x}", 4), NOW - 6 * MIN, Some("alpha"), &["fail"], "first"),
    ];
    let mut mirror = record(&format!("{:032x}", 5), NOW - MIN, Some("beta"), &["pass", "pass", "pass"], "first");
    mirror.kind = "mirror".into();
    records.push(mirror);
    db.insert_batch(&records).await.unwrap();
    // Record 2 is a regeneration (the field the feedback work adds to the record).
    let id2 = format!("{:032x}", 2);
    let mut v: serde_json::Value = serde_json::to_value(&records[1]).unwrap();
    v["regeneration"] = serde_json::json!({"of": format!("{:032x}", 1), "how": "implicit", "similarity": 0.95});
    sqlx::query::<sqlx::Any>("UPDATE traces SET record = $1 WHERE trace_id = $2")
        .bind(v.to_string())
        .bind(id2)
        .execute(db.pool())
        .await
        .unwrap();

    let target = target.to_string();
    let all = [(Signal::EvalFailRate, 0.5), (Signal::RegenerationRate, 0.4), (Signal::ThumbsDownRate, 0.5)];
    let g = Gate { source: Source::Store(target.clone()), ..gate(&all, 2, Filters::default()) };
    let (rows, missing) = store_rows(&g, &target, NOW).await.unwrap();
    let find = |s: Signal, cohort: &str| {
        rows.iter().find(|r| r.signal == s && r.labels["cohort"] == cohort).map(|r| (r.value, r.samples))
    };
    assert_eq!(find(Signal::EvalFailRate, "beta"), Some((Some(0.75), 4.0)));
    assert_eq!(find(Signal::EvalFailRate, "none"), Some((Some(0.0), 2.0)));
    assert_eq!(find(Signal::EvalFailRate, "alpha"), None, "outside the window");
    assert_eq!(find(Signal::RegenerationRate, "beta"), Some((Some(0.5), 2.0)));
    assert_eq!(rows.len(), 4, "{rows:#?}");
    // No feedback table yet: thumbs-down cannot be decided, and says why.
    assert_eq!(
        missing,
        [(Signal::ThumbsDownRate, "the store has no feedback table (a gateway without feedback)".into())]
    );
    let report = decide(&g, rows, &missing);
    // beta's eval-fail rate 0.75 > 0.5 and regeneration 0.5 > 0.4: fail outranks undecided.
    assert_eq!(report.exit_code, 1, "{report:#?}");
    assert_eq!(report.reasons.len(), 2);

    // The feedback table, as the feedback work creates it.
    db.pool()
        .execute(
            "CREATE TABLE feedback (trace_id TEXT NOT NULL, image_index BIGINT NOT NULL, end_user TEXT NOT NULL, \
             tenant TEXT, route TEXT, cohort TEXT, prompt_template TEXT, asset_type TEXT, provider TEXT, \
             rating DOUBLE PRECISION NOT NULL, comment TEXT, labels TEXT, source TEXT NOT NULL, \
             created_unix_nano BIGINT NOT NULL, PRIMARY KEY (trace_id, image_index, end_user))",
        )
        .await
        .unwrap();
    for (i, (user, rating, provider, at)) in [
        ("u1", -1.0, "first", NOW - MIN),
        ("u2", 1.0, "first", NOW - MIN),
        ("u3", -0.5, "second", NOW - MIN),
        ("u4", -1.0, "first", NOW - 10 * MIN),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query::<sqlx::Any>(
            "INSERT INTO feedback (trace_id, image_index, end_user, route, cohort, provider, rating, source, created_unix_nano) \
             VALUES ($1, 0, $2, 'images', 'beta', $3, $4, 'explicit', $5)",
        )
        .bind(format!("{i:032x}"))
        .bind(user)
        .bind(provider)
        .bind(rating)
        .bind(at as i64)
        .execute(db.pool())
        .await
        .unwrap();
    }
    // A regeneration's implicit -1 is not a user's rating: not counted.
    sqlx::query::<sqlx::Any>(
        "INSERT INTO feedback (trace_id, image_index, end_user, route, cohort, provider, rating, source, created_unix_nano) \
         VALUES ($1, -1, 'u9', 'images', 'beta', 'first', -1.0, 'regeneration', $2)",
    )
    .bind(format!("{:032x}", 99))
    .bind((NOW - MIN) as i64)
    .execute(db.pool())
    .await
    .unwrap();
    let only_down =
        Gate { source: Source::Store(target.clone()), ..gate(&[(Signal::ThumbsDownRate, 0.5)], 2, Filters::default()) };
    let (rows, missing) = store_rows(&only_down, &target, NOW).await.unwrap();
    assert!(missing.is_empty());
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].value, rows[0].samples), (Some(2.0 / 3.0), 3.0));
    assert_eq!(decide(&only_down, rows, &missing).exit_code, 1);
    // The provider filter: records with an attempt on it, ratings of its images.
    let first = Filters { provider: Some("first".into()), ..Filters::default() };
    let g = Gate {
        source: Source::Store(target.clone()),
        ..gate(&[(Signal::ThumbsDownRate, 0.5), (Signal::EvalFailRate, 0.9)], 2, first)
    };
    let (rows, _) = store_rows(&g, &target, NOW).await.unwrap();
    let got: Vec<_> = rows.iter().map(|r| (r.signal, r.labels["cohort"].as_str(), r.value, r.samples)).collect();
    assert_eq!(
        got,
        [(Signal::EvalFailRate, "beta", Some(0.75), 4.0), (Signal::ThumbsDownRate, "beta", Some(0.5), 2.0)]
    );
    db.close().await;
}

#[test]
fn prometheus_user_info_becomes_basic_auth_and_is_never_shown() {
    let t = PromTarget::new("https://gate:s3cret@prom.example:9090/prometheus");
    assert_eq!(t.url, "https://prom.example:9090/prometheus");
    assert_eq!(t.shown, "https://gate:***@prom.example:9090/prometheus");
    // base64("gate:s3cret")
    assert_eq!(t.authorization.as_deref(), Some("Basic Z2F0ZTpzM2NyZXQ="));
    let t = PromTarget::new("http://127.0.0.1:9090");
    assert_eq!(
        (t.url.as_str(), t.shown.as_str(), t.authorization),
        ("http://127.0.0.1:9090", "http://127.0.0.1:9090", None)
    );
}
