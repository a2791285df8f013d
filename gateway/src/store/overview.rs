//! The console's overview figures: aggregates over a recent time window of the `traces`,
//! `feedback` and `reviews` tables, each query bounded by the time index (or a `LIMIT`), so
//! the page costs the same with 100 or 100,000 records kept.
//!
//! Counts (requests, decisions, evaluator failures by cohort, per-bucket series) come from
//! the table's columns in one `GROUP BY` over a time range (the console caches settled hours);
//! figures only the record's JSON holds (latency,
//! fallbacks, cost) come from the newest [`SAMPLE`] primary records of the window.

use sqlx::{Any, Row};

use super::db::{nanos_i64, StoreError, TraceDb};

/// How many of the window's newest primary records are decoded for latency, fallback and cost.
pub const SAMPLE: usize = 2000;

/// One group of primary records: a time bucket, a cohort and a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct CountRow {
    /// Buckets from the query's origin: 0 is `[origin, origin + bucket)`, 1 the next, ...
    pub bucket: u32,
    /// `x-acc-cohort` as sent (`None`: none sent).
    pub cohort: Option<String>,
    /// `pass`, `flagged`, `blocked`, `review` or `error`.
    pub decision: String,
    /// Records in the group.
    pub requests: u64,
    /// Records with at least one `evaluator:fail` verdict on their winning images.
    pub eval_failed: u64,
}

/// What the newest records of a window hold beyond the columns.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    /// Unix nanoseconds.
    pub start_time_unix_nano: u64,
    /// From arrival to the answer's headers, ms.
    pub duration_ms: f64,
    /// Whether any attempt ran as a fallback.
    pub fallback: bool,
    /// USD charged, when priced.
    pub cost_usd: Option<f64>,
}

/// One group of the `feedback` table: a source, a cohort, in the first bucket or not.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRow {
    /// `explicit` (POST /v1/feedback) or `regeneration`.
    pub source: String,
    /// The rated trace's `x-acc-cohort`, as recorded.
    pub cohort: Option<String>,
    /// Whether created in `[now - bucket, now)`.
    pub recent: bool,
    /// Rows, and those with a rating below 0 (thumbs-down).
    pub ratings: u64,
    pub negative: u64,
}

#[derive(serde::Deserialize)]
struct Essentials {
    start_time_unix_nano: u64,
    duration_ms: f64,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    attempts: Vec<AttemptRole>,
}

#[derive(serde::Deserialize)]
struct AttemptRole {
    #[serde(default)]
    role: String,
}

fn count(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

impl TraceDb {
    /// Primary records that started in `[from, to)`, grouped by bucket (`(start - origin) /
    /// bucket_nanos`, so buckets are aligned on `origin`), cohort and decision: at most
    /// buckets × cohorts × decisions rows. The time index bounds the rows read to the range.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn overview_counts(
        &self,
        origin_unix_nano: u64,
        bucket_nanos: u64,
        from_unix_nano: u64,
        to_unix_nano: u64,
    ) -> Result<Vec<CountRow>, StoreError> {
        let fail = self.fail("overview");
        let sql = "SELECT (start_time_unix_nano - $1) / $2 AS bucket, cohort, decision, COUNT(*), \
                   CAST(SUM(CASE WHEN tags LIKE '%,verdict=%:fail,%' THEN 1 ELSE 0 END) AS BIGINT) \
                   FROM traces WHERE start_time_unix_nano >= $3 AND start_time_unix_nano < $4 AND kind = 'primary' \
                   GROUP BY bucket, cohort, decision";
        let rows = sqlx::query::<Any>(sql)
            .bind(nanos_i64(origin_unix_nano))
            .bind(nanos_i64(bucket_nanos.max(1)))
            .bind(nanos_i64(from_unix_nano.max(origin_unix_nano)))
            .bind(nanos_i64(to_unix_nano))
            .fetch_all(&self.pool)
            .await
            .map_err(&fail)?;
        rows.iter()
            .map(|r| {
                Ok(CountRow {
                    bucket: r.try_get::<i64, _>(0).map_err(&fail)?.clamp(0, i64::from(u32::MAX)) as u32,
                    cohort: r.try_get(1).map_err(&fail)?,
                    decision: r.try_get(2).map_err(&fail)?,
                    requests: count(r.try_get(3).map_err(&fail)?),
                    eval_failed: count(r.try_get(4).map_err(&fail)?),
                })
            })
            .collect()
    }

    /// The newest `limit` primary records (at most [`SAMPLE`]) that started at or after
    /// `since_unix_nano`, newest first, reduced to latency, fallback and cost. A record that
    /// does not decode is skipped. Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn overview_sample(&self, since_unix_nano: u64, limit: usize) -> Result<Vec<SampleRow>, StoreError> {
        let fail = self.fail("overview");
        let sql = "SELECT record FROM traces WHERE start_time_unix_nano >= $1 AND kind = 'primary' \
                   ORDER BY start_time_unix_nano DESC LIMIT $2";
        let rows = sqlx::query::<Any>(sql)
            .bind(nanos_i64(since_unix_nano))
            .bind(limit.min(SAMPLE) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(&fail)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let json: String = r.try_get(0).map_err(&fail)?;
            if let Ok(e) = serde_json::from_str::<Essentials>(&json) {
                out.push(SampleRow {
                    start_time_unix_nano: e.start_time_unix_nano,
                    duration_ms: e.duration_ms,
                    fallback: e.attempts.iter().any(|a| a.role == "fallback"),
                    cost_usd: e.cost_usd,
                });
            }
        }
        Ok(out)
    }

    /// The `feedback` rows created at or after `since_unix_nano`, grouped by source, cohort and
    /// whether they are newer than `recent_unix_nano`. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`].
    pub async fn overview_feedback(
        &self,
        since_unix_nano: u64,
        recent_unix_nano: u64,
    ) -> Result<Vec<FeedbackRow>, StoreError> {
        let fail = self.fail("overview");
        let sql =
            "SELECT source, cohort, CAST(CASE WHEN created_unix_nano >= $2 THEN 1 ELSE 0 END AS BIGINT) AS recent, \
                   COUNT(*), CAST(SUM(CASE WHEN rating < 0 THEN 1 ELSE 0 END) AS BIGINT) \
                   FROM feedback WHERE created_unix_nano >= $1 GROUP BY source, cohort, recent";
        let rows = sqlx::query::<Any>(sql)
            .bind(nanos_i64(since_unix_nano))
            .bind(nanos_i64(recent_unix_nano))
            .fetch_all(&self.pool)
            .await
            .map_err(&fail)?;
        rows.iter()
            .map(|r| {
                Ok(FeedbackRow {
                    source: r.try_get(0).map_err(&fail)?,
                    cohort: r.try_get(1).map_err(&fail)?,
                    recent: r.try_get::<i64, _>(2).map_err(&fail)? == 1,
                    ratings: count(r.try_get(3).map_err(&fail)?),
                    negative: count(r.try_get(4).map_err(&fail)?),
                })
            })
            .collect()
    }

    /// Review items waiting for a decision (the `reviews_state` index). Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn pending_reviews(&self) -> Result<u64, StoreError> {
        let fail = self.fail("overview");
        let row = sqlx::query::<Any>("SELECT COUNT(*) FROM reviews WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await
            .map_err(&fail)?;
        Ok(count(row.try_get(0).map_err(&fail)?))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::record::{AttemptRecord, EvaluationRecord};
    use crate::store::{FeedbackEntry, TraceRecord};

    const HOUR: u64 = 3_600_000_000_000;
    const NOW: u64 = 1_700_000_000_000_000_000;

    fn rec(n: u64, start: u64, cohort: Option<&str>, decision: &str, fail: bool, fallback: bool) -> TraceRecord {
        let attempt = |role: &str, result: &str| AttemptRecord {
            provider: "p".into(),
            result: result.into(),
            role: role.into(),
            evaluations: vec![EvaluationRecord {
                evaluator: "sanity".into(),
                verdict: if fail { "fail" } else { "pass" }.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut attempts = vec![attempt("primary", "ok")];
        if fallback {
            attempts = vec![attempt("primary", "status_5xx"), attempt("fallback", "ok")];
        }
        TraceRecord {
            trace_id: format!("{n:032x}"),
            span_id: "00f067aa0ba902b7".into(),
            kind: "primary".into(),
            start_time_unix_nano: start,
            duration_ms: n as f64,
            cohort: cohort.map(str::to_string),
            operation: "generations".into(),
            record_prompt: "none".into(),
            parameters: json!({}),
            attempts,
            decision: decision.into(),
            outcome: "ok".into(),
            status: 200,
            cost_usd: Some(0.5),
            ..TraceRecord::default()
        }
    }

    #[tokio::test]
    async fn counts_samples_and_feedback_over_the_window() {
        for store in crate::store::tests::stores().await {
            let db = TraceDb::open(&store.cfg).await.unwrap();
            let mut mirror = rec(9, NOW - HOUR / 2, Some("beta"), "pass", false, false);
            mirror.kind = "mirror".into();
            let records = vec![
                rec(1, NOW - HOUR / 2, Some("beta"), "pass", false, false),
                rec(2, NOW - HOUR / 3, Some("beta"), "blocked", true, true),
                rec(3, NOW - 3 * HOUR, None, "error", false, false),
                // Outside the day, and a mirror copy: neither is counted.
                rec(4, NOW - 25 * HOUR, Some("beta"), "pass", false, false),
                mirror,
            ];
            db.insert_batch(&records).await.unwrap();
            let origin = NOW - 24 * HOUR;
            let mut counts = db.overview_counts(origin, HOUR, origin, NOW).await.unwrap();
            counts.sort_by(|a, b| (a.bucket, &a.decision).cmp(&(b.bucket, &b.decision)));
            let got: Vec<_> = counts
                .iter()
                .map(|r| (r.bucket, r.cohort.as_deref(), r.decision.as_str(), r.requests, r.eval_failed))
                .collect();
            assert_eq!(
                got,
                [(21, None, "error", 1, 0), (23, Some("beta"), "blocked", 1, 1), (23, Some("beta"), "pass", 1, 0)],
                "{}",
                store.name
            );
            let sample = db.overview_sample(NOW - 24 * HOUR, 10).await.unwrap();
            let got: Vec<_> = sample.iter().map(|r| (r.duration_ms, r.fallback, r.cost_usd)).collect();
            assert_eq!(
                got,
                [(2.0, true, Some(0.5)), (1.0, false, Some(0.5)), (3.0, false, Some(0.5))],
                "{}",
                store.name
            );
            for (i, (source, rating, age)) in
                [("explicit", -1.0, HOUR / 2), ("explicit", 1.0, 5 * HOUR), ("regeneration", -1.0, HOUR / 4)]
                    .into_iter()
                    .enumerate()
            {
                let entry = FeedbackEntry {
                    trace_id: format!("{i:032x}"),
                    image_index: -1,
                    end_user: "u".into(),
                    tenant: None,
                    route: None,
                    cohort: Some("beta".into()),
                    prompt_template: None,
                    asset_type: None,
                    provider: None,
                    rating,
                    comment: None,
                    labels: Vec::new(),
                    source: source.into(),
                    created_unix_nano: NOW - age,
                    ..FeedbackEntry::default()
                };
                db.upsert_feedback(&entry).await.unwrap();
            }
            let mut fb = db.overview_feedback(NOW - 24 * HOUR, NOW - HOUR).await.unwrap();
            fb.sort_by(|a, b| (&a.source, a.recent).cmp(&(&b.source, b.recent)));
            let got: Vec<_> = fb.iter().map(|f| (f.source.as_str(), f.recent, f.ratings, f.negative)).collect();
            assert_eq!(
                got,
                [("explicit", false, 1, 0), ("explicit", true, 1, 1), ("regeneration", true, 1, 1)],
                "{}",
                store.name
            );
            assert_eq!(db.pending_reviews().await.unwrap(), 0, "{}", store.name);
            db.close().await;
            store.cleanup().await;
        }
    }
}
