//! The review queue's tables (`gateway/migrations/0002_reviews.sql`): held answers and their
//! images, written on the request path (reviews are rare and must not be lost, so they never go
//! through the batching writer) and read by the review endpoints. Same SQL on SQLite and
//! PostgreSQL, numbered placeholders.

use serde::Serialize;
use sqlx::{Any, Row};

use super::db::{nanos_i64, StoreError, TraceDb};

/// Where a review stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewState {
    /// Held, waiting for a reviewer.
    Pending,
    /// A reviewer let it out: the client's poll answers the images.
    Approved,
    /// A reviewer refused it: the images are deleted.
    Rejected,
    /// Nobody decided within the route's `review_ttl_secs`: the images are deleted.
    Expired,
}

impl ReviewState {
    /// `pending`, `approved`, `rejected` or `expired` (the `state` column and the API's value).
    pub fn name(self) -> &'static str {
        match self {
            ReviewState::Pending => "pending",
            ReviewState::Approved => "approved",
            ReviewState::Rejected => "rejected",
            ReviewState::Expired => "expired",
        }
    }

    /// The state named `s`, if it is one.
    pub fn parse(s: &str) -> Option<ReviewState> {
        Some(match s {
            "pending" => ReviewState::Pending,
            "approved" => ReviewState::Approved,
            "rejected" => ReviewState::Rejected,
            "expired" => ReviewState::Expired,
            _ => return None,
        })
    }
}

/// One held answer, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewItem {
    /// The request's trace id (32 lowercase hex digits).
    pub trace_id: String,
    /// The route whose policy sent it to review.
    pub route: String,
    /// The client key's tenant (`None`: a gateway without keys).
    pub tenant: Option<String>,
    /// Cohort fields as the client sent them: `x-acc-cohort`, `x-acc-prompt-template`,
    /// `x-acc-asset-type`, and the OpenAI `user` field.
    pub cohort: Option<String>,
    pub prompt_template: Option<String>,
    pub asset_type: Option<String>,
    pub end_user: Option<String>,
    /// The client's `response_format`: `b64_json` or `url`.
    pub response_format: String,
    /// Where it stands.
    pub state: ReviewState,
    /// When it was held, Unix nanoseconds.
    pub held_unix_nano: u64,
    /// When a pending item expires; once approved, when its images are deleted. Unix ns.
    pub expires_unix_nano: u64,
    /// When it was decided (approved, rejected or expired), Unix nanoseconds.
    pub decided_unix_nano: Option<u64>,
    /// Who decided (`"acc"` for an expiry).
    pub reviewer: Option<String>,
    /// The reviewer's reason (or why it expired).
    pub reason: Option<String>,
    /// How many images the answer has.
    pub image_count: u32,
    /// Decoded bytes of the images when held.
    pub bytes: u64,
    /// Decoded bytes still stored (0 once the images are deleted).
    pub bytes_held: u64,
    /// Every evaluator verdict of the held attempt: `[{"image", "evaluator", "verdict", "score",
    /// "reason"}]`.
    pub verdicts: serde_json::Value,
    /// The failures that sent it to review, e.g. `["sanity: the image is blank"]`.
    pub reasons: Vec<String>,
    /// What the held answer says beside its images, returned with them once approved:
    /// `{"fields": {"usage": ..., "output_format": ...}, "revised_prompts": [string|null]}`;
    /// `None` when it said nothing else.
    pub answer: Option<serde_json::Value>,
}

/// One held image: its content type and its base64 text, exactly as it would have been
/// answered in `b64_json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldImage {
    /// `image/png`, `image/jpeg`, `image/webp` (sniffed), or `application/octet-stream`.
    pub content_type: String,
    /// Standard base64 with padding, as the provider sent it (or as the gateway encoded raw
    /// bytes for `b64_json`).
    pub b64: String,
}

/// Which items [`TraceDb::list_reviews`] answers, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ReviewFilter {
    /// Only items in this state (`None`: every state).
    pub state: Option<ReviewState>,
    /// Only items held by this route.
    pub route: Option<String>,
    /// Items held after this `(held_unix_nano, trace_id)` (the last item of the previous page).
    pub after: Option<(u64, String)>,
    /// At most this many (clamped to 1..=500).
    pub limit: usize,
}

const COLUMNS: &str = "trace_id, route, tenant, cohort, prompt_template, asset_type, end_user, response_format, \
     state, held_unix_nano, expires_unix_nano, decided_unix_nano, reviewer, reason, image_count, bytes, bytes_held, \
     verdicts, reasons, answer";

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

impl TraceDb {
    /// Holds `item` (state pending) with its `images` in one transaction. Returns false, writing
    /// nothing, when the store already has a review for this trace id. Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`] (nothing written).
    pub async fn insert_review(&self, item: &ReviewItem, images: &[HeldImage]) -> Result<bool, StoreError> {
        let fail = self.fail("insert review");
        let mut tx = self.any_pool().begin().await.map_err(&fail)?;
        let done = sqlx::query::<Any>(&format!(
            "INSERT INTO reviews ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
             $15, $16, $17, $18, $19, $20) ON CONFLICT (trace_id) DO NOTHING"
        ))
        .bind(item.trace_id.clone())
        .bind(item.route.clone())
        .bind(item.tenant.clone())
        .bind(item.cohort.clone())
        .bind(item.prompt_template.clone())
        .bind(item.asset_type.clone())
        .bind(item.end_user.clone())
        .bind(item.response_format.clone())
        .bind(item.state.name())
        .bind(nanos_i64(item.held_unix_nano))
        .bind(nanos_i64(item.expires_unix_nano))
        .bind(item.decided_unix_nano.map(nanos_i64))
        .bind(item.reviewer.clone())
        .bind(item.reason.clone())
        .bind(i64::from(item.image_count))
        .bind(nanos_i64(item.bytes))
        .bind(nanos_i64(item.bytes_held))
        .bind(item.verdicts.to_string())
        .bind(serde_json::to_string(&item.reasons).unwrap_or_else(|_| "[]".into()))
        .bind(item.answer.as_ref().map(|a| a.to_string()))
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(&fail)?;
            return Ok(false);
        }
        for (i, image) in images.iter().enumerate() {
            sqlx::query::<Any>(
                "INSERT INTO review_images (trace_id, image_index, content_type, b64) VALUES ($1, $2, $3, $4)",
            )
            .bind(item.trace_id.clone())
            .bind(i as i64)
            .bind(image.content_type.clone())
            .bind(image.b64.clone())
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)?;
        Ok(true)
    }

    /// The review of `trace_id`, if the store has one. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`], [`StoreError::Corrupt`].
    pub async fn review(&self, trace_id: &str) -> Result<Option<ReviewItem>, StoreError> {
        let row = sqlx::query::<Any>(&format!("SELECT {COLUMNS} FROM reviews WHERE trace_id = $1"))
            .bind(trace_id.to_string())
            .fetch_optional(self.any_pool())
            .await
            .map_err(self.fail("get review"))?;
        row.map(|r| self.review_row(&r)).transpose()
    }

    fn review_row(&self, r: &sqlx::any::AnyRow) -> Result<ReviewItem, StoreError> {
        let fail = self.fail("read review");
        let trace_id: String = r.try_get(0).map_err(&fail)?;
        let corrupt = |message: String| StoreError::Corrupt {
            target: self.target().to_string(),
            trace_id: trace_id.clone(),
            message,
        };
        let state: String = r.try_get(8).map_err(&fail)?;
        let state = ReviewState::parse(&state).ok_or_else(|| corrupt(format!("unknown review state {state:?}")))?;
        let verdicts: String = r.try_get(17).map_err(&fail)?;
        let reasons: String = r.try_get(18).map_err(&fail)?;
        let answer: Option<String> = r.try_get(19).map_err(&fail)?;
        Ok(ReviewItem {
            route: r.try_get(1).map_err(&fail)?,
            tenant: r.try_get(2).map_err(&fail)?,
            cohort: r.try_get(3).map_err(&fail)?,
            prompt_template: r.try_get(4).map_err(&fail)?,
            asset_type: r.try_get(5).map_err(&fail)?,
            end_user: r.try_get(6).map_err(&fail)?,
            response_format: r.try_get(7).map_err(&fail)?,
            state,
            held_unix_nano: u(r.try_get(9).map_err(&fail)?),
            expires_unix_nano: u(r.try_get(10).map_err(&fail)?),
            decided_unix_nano: r.try_get::<Option<i64>, _>(11).map_err(&fail)?.map(u),
            reviewer: r.try_get(12).map_err(&fail)?,
            reason: r.try_get(13).map_err(&fail)?,
            image_count: u(r.try_get(14).map_err(&fail)?).min(u64::from(u32::MAX)) as u32,
            bytes: u(r.try_get(15).map_err(&fail)?),
            bytes_held: u(r.try_get(16).map_err(&fail)?),
            verdicts: serde_json::from_str(&verdicts).map_err(|e| corrupt(format!("verdicts: {e}")))?,
            reasons: serde_json::from_str(&reasons).map_err(|e| corrupt(format!("reasons: {e}")))?,
            answer: answer
                .map(|a| serde_json::from_str(&a).map_err(|e| corrupt(format!("answer: {e}"))))
                .transpose()?,
            trace_id: trace_id.clone(),
        })
    }

    /// The held images of `trace_id`, by index (empty once deleted). Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn review_images(&self, trace_id: &str) -> Result<Vec<HeldImage>, StoreError> {
        let fail = self.fail("get review images");
        let rows =
            sqlx::query::<Any>("SELECT content_type, b64 FROM review_images WHERE trace_id = $1 ORDER BY image_index")
                .bind(trace_id.to_string())
                .fetch_all(self.any_pool())
                .await
                .map_err(&fail)?;
        rows.iter()
            .map(|r| Ok(HeldImage { content_type: r.try_get(0).map_err(&fail)?, b64: r.try_get(1).map_err(&fail)? }))
            .collect()
    }

    /// One held image of `trace_id`, if stored. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`].
    pub async fn review_image(&self, trace_id: &str, index: u32) -> Result<Option<HeldImage>, StoreError> {
        let fail = self.fail("get review image");
        let row =
            sqlx::query::<Any>("SELECT content_type, b64 FROM review_images WHERE trace_id = $1 AND image_index = $2")
                .bind(trace_id.to_string())
                .bind(i64::from(index))
                .fetch_optional(self.any_pool())
                .await
                .map_err(&fail)?;
        row.map(|r| Ok(HeldImage { content_type: r.try_get(0).map_err(&fail)?, b64: r.try_get(1).map_err(&fail)? }))
            .transpose()
    }

    /// The items `filter` selects, oldest first (`held_unix_nano`, then `trace_id`). Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`], [`StoreError::Corrupt`].
    pub async fn list_reviews(&self, filter: &ReviewFilter) -> Result<Vec<ReviewItem>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM reviews WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if filter.state.is_some() {
            sql.push_str(&format!(" AND state = ${}", next()));
        }
        if filter.route.is_some() {
            sql.push_str(&format!(" AND route = ${}", next()));
        }
        if filter.after.is_some() {
            let (t, id) = (next(), next());
            sql.push_str(&format!(" AND (held_unix_nano > ${t} OR (held_unix_nano = ${t} AND trace_id > ${id}))"));
        }
        sql.push_str(&format!(" ORDER BY held_unix_nano, trace_id LIMIT ${}", next()));
        let mut q = sqlx::query::<Any>(&sql);
        if let Some(s) = filter.state {
            q = q.bind(s.name());
        }
        if let Some(r) = &filter.route {
            q = q.bind(r.clone());
        }
        if let Some((t, id)) = &filter.after {
            q = q.bind(nanos_i64(*t)).bind(id.clone());
        }
        q = q.bind(filter.limit.clamp(1, 500) as i64);
        let rows = q.fetch_all(self.any_pool()).await.map_err(self.fail("list reviews"))?;
        rows.iter().map(|r| self.review_row(r)).collect()
    }

    /// Moves the pending review of `trace_id` to `state` (approved, rejected or expired) at
    /// `now_unix_nano`, by `reviewer` for `reason`. Rejected and expired items lose their
    /// images at once; approved ones keep them until `keep_until_unix_nano`. Returns the item
    /// as decided, or `None` when there is no pending review of that id (unknown, or already
    /// decided: read it with [`TraceDb::review`] to tell). Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`], [`StoreError::Corrupt`].
    pub async fn decide_review(
        &self,
        trace_id: &str,
        state: ReviewState,
        reviewer: &str,
        reason: Option<&str>,
        now_unix_nano: u64,
        keep_until_unix_nano: u64,
    ) -> Result<Option<ReviewItem>, StoreError> {
        let fail = self.fail("decide review");
        let approved = state == ReviewState::Approved;
        let mut tx = self.any_pool().begin().await.map_err(&fail)?;
        let done = sqlx::query::<Any>(
            "UPDATE reviews SET state = $1, decided_unix_nano = $2, reviewer = $3, reason = $4, \
             expires_unix_nano = $5, bytes_held = CASE WHEN $6 = 1 THEN bytes_held ELSE 0 END \
             WHERE trace_id = $7 AND state = 'pending'",
        )
        .bind(state.name())
        .bind(nanos_i64(now_unix_nano))
        .bind(reviewer.to_string())
        .bind(reason.map(str::to_string))
        .bind(nanos_i64(if approved { keep_until_unix_nano } else { now_unix_nano }))
        .bind(i64::from(approved))
        .bind(trace_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(&fail)?;
            return Ok(None);
        }
        if !approved {
            sqlx::query::<Any>("DELETE FROM review_images WHERE trace_id = $1")
                .bind(trace_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)?;
        self.review(trace_id).await
    }

    /// Pending items whose `expires_unix_nano` is at or before `now_unix_nano`, oldest first,
    /// at most `limit`. Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn due_reviews(&self, now_unix_nano: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        let fail = self.fail("due reviews");
        let rows = sqlx::query::<Any>(
            "SELECT trace_id FROM reviews WHERE state = 'pending' AND expires_unix_nano <= $1 \
             ORDER BY held_unix_nano, trace_id LIMIT $2",
        )
        .bind(nanos_i64(now_unix_nano))
        .bind(limit as i64)
        .fetch_all(self.any_pool())
        .await
        .map_err(&fail)?;
        rows.iter().map(|r| r.try_get(0).map_err(&fail)).collect()
    }

    /// Deletes the images of approved items kept past their `expires_unix_nano`; returns the
    /// bytes freed. Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn drop_collected_reviews(&self, now_unix_nano: u64) -> Result<u64, StoreError> {
        let fail = self.fail("clean reviews");
        let mut tx = self.any_pool().begin().await.map_err(&fail)?;
        let due = "state = 'approved' AND bytes_held > 0 AND expires_unix_nano <= $1";
        let row = sqlx::query::<Any>(&format!(
            "SELECT CAST(COALESCE(SUM(bytes_held), 0) AS BIGINT) FROM reviews WHERE {due}"
        ))
        .bind(nanos_i64(now_unix_nano))
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        let freed: i64 = row.try_get(0).map_err(&fail)?;
        if freed > 0 {
            sqlx::query::<Any>(&format!(
                "DELETE FROM review_images WHERE trace_id IN (SELECT trace_id FROM reviews WHERE {due})"
            ))
            .bind(nanos_i64(now_unix_nano))
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
            sqlx::query::<Any>(&format!("UPDATE reviews SET bytes_held = 0 WHERE {due}"))
                .bind(nanos_i64(now_unix_nano))
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)?;
        Ok(u(freed))
    }

    /// The queue's totals: pending items per route (sorted by route) and the image bytes stored.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn review_totals(&self) -> Result<(Vec<(String, u64)>, u64), StoreError> {
        let fail = self.fail("review totals");
        let rows = sqlx::query::<Any>(
            "SELECT route, COUNT(*) FROM reviews WHERE state = 'pending' GROUP BY route ORDER BY route",
        )
        .fetch_all(self.any_pool())
        .await
        .map_err(&fail)?;
        let mut pending = Vec::with_capacity(rows.len());
        for r in &rows {
            pending.push((r.try_get::<String, _>(0).map_err(&fail)?, u(r.try_get(1).map_err(&fail)?)));
        }
        let row = sqlx::query::<Any>("SELECT CAST(COALESCE(SUM(bytes_held), 0) AS BIGINT) FROM reviews")
            .fetch_one(self.any_pool())
            .await
            .map_err(&fail)?;
        Ok((pending, u(row.try_get(0).map_err(&fail)?)))
    }
}
