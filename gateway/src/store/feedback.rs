//! The `feedback` table (migration `0003_feedback.sql`): ratings tied to a trace, one per
//! (trace, image, end user), written by `POST /v1/feedback` and by regeneration detection,
//! read by `GET /admin/traces/{trace_id}` and the release gate (`acc gate --store`).

use serde::{Deserialize, Serialize};
use sqlx::{Any, Row};

use sqlx::any::AnyArguments;

use super::db::{nanos_i64, values_list, Backend, StoreError, TraceDb, INSERT_GROUPS};

/// `source` of an entry the app sent (`POST /v1/feedback`).
pub const EXPLICIT: &str = "explicit";
/// `source` of the implicit -1 a regeneration leaves on the trace it regenerated.
pub const REGENERATION: &str = "regeneration";

/// One rating of one trace (or one of its images) by one end user: a row of `feedback`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackEntry {
    /// The rated trace (32 lowercase hex digits).
    pub trace_id: String,
    /// The rated image's index in the answer; -1 rates the whole answer.
    pub image_index: i64,
    /// Who rated: the OpenAI `user` the app sent, else the client key's name.
    pub end_user: String,
    /// The trace's tenant (its client key's), copied from the record.
    pub tenant: Option<String>,
    /// The trace's route.
    pub route: Option<String>,
    /// The trace's `x-acc-cohort`, `x-acc-prompt-template` and `x-acc-asset-type` as sent.
    pub cohort: Option<String>,
    pub prompt_template: Option<String>,
    pub asset_type: Option<String>,
    /// The provider whose answer was returned (none when every attempt failed).
    pub provider: Option<String>,
    /// In [-1, 1]: `"up"` is 1, `"down"` -1.
    pub rating: f64,
    /// Free text from the app (explicit entries only).
    pub comment: Option<String>,
    /// Short tags from the app; for a regeneration entry `regenerated_by:<trace id>` and
    /// `how:<explicit|implicit>`.
    pub labels: Vec<String>,
    /// [`EXPLICIT`] or [`REGENERATION`].
    pub source: String,
    /// When it was written (last replaced), Unix nanoseconds.
    pub created_unix_nano: u64,
    /// The latest request of this end user that regenerated the trace (its trace id), and how
    /// it was detected (`explicit` or `implicit`); absent when none did. Kept when an explicit
    /// rating replaces a regeneration's implicit -1, and updated by later regenerations even
    /// where the user's own rating stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regenerated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regeneration_how: Option<String>,
}

impl FeedbackEntry {
    /// `up` (rating > 0), `down` (< 0) or `neutral` (0): the `rating` label of
    /// `acc_feedback_total`.
    pub fn rating_label(&self) -> &'static str {
        rating_label(self.rating)
    }
}

/// `up` for a rating above 0, `down` below 0, `neutral` for 0.
pub fn rating_label(rating: f64) -> &'static str {
    if rating > 0.0 {
        "up"
    } else if rating < 0.0 {
        "down"
    } else {
        "neutral"
    }
}

/// How many columns [`COLUMNS`] names.
const COLUMN_COUNT: usize = 16;
const COLUMNS: &str = "trace_id, image_index, end_user, tenant, route, cohort, prompt_template, asset_type, \
                       provider, rating, comment, labels, source, created_unix_nano, regenerated_by, regeneration_how";

impl TraceDb {
    /// Writes `entry`, replacing the entry of the same (trace, image, end user) if there is
    /// one, except that a [`REGENERATION`] entry never replaces an [`EXPLICIT`] one (what the
    /// user said outranks what the gateway inferred): it only updates that row's
    /// `regenerated_by` and `regeneration_how`, which an explicit entry in turn keeps. Returns
    /// whether the row was written or updated.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn upsert_feedback(&self, entry: &FeedbackEntry) -> Result<bool, StoreError> {
        let done = upsert(entry, self.backend()).execute(&self.pool).await.map_err(self.fail("feedback"))?;
        Ok(done.rows_affected() > 0)
    }

    /// The rating and source stored for (`trace_id`, `image_index`, `end_user`), if any.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn stored_rating(
        &self,
        trace_id: &str,
        image_index: i64,
        end_user: &str,
    ) -> Result<Option<(f64, String)>, StoreError> {
        let fail = self.fail("feedback rating");
        let row = sqlx::query::<Any>(
            "SELECT rating, source FROM feedback WHERE trace_id = $1 AND image_index = $2 AND end_user = $3",
        )
        .bind(trace_id.to_string())
        .bind(image_index)
        .bind(end_user.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(&fail)?;
        row.map(|r| Ok((r.try_get::<f64, _>(0).map_err(&fail)?, r.try_get::<String, _>(1).map_err(&fail)?))).transpose()
    }

    /// [`upsert_feedback`](Self::upsert_feedback) of each entry in order, all in one
    /// transaction: every entry is written, or none. With SQLite they go through the file's
    /// own write connection (`LocalWriter`, on the caller's thread), with PostgreSQL many to a
    /// statement. Of entries with the same (trace, image, end user) the last is written, as if
    /// each had replaced the one before. Returns how many rows were written. Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn upsert_feedback_batch(&self, entries: &[FeedbackEntry]) -> Result<u64, StoreError> {
        // One statement may not update a row twice (PostgreSQL refuses it): keep the last.
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        let mut last: Vec<&FeedbackEntry> = entries
            .iter()
            .rev()
            .filter(|e| seen.insert((e.trace_id.as_str(), e.image_index, e.end_user.as_str())))
            .collect();
        last.reverse();
        if let Some(local) = &self.local {
            return local
                .transaction(|tx| {
                    let mut written = 0;
                    // Each kind's statement taken from the cache once per batch, not once per row.
                    let (mut explicit, mut implicit) = (None, None);
                    for e in &last {
                        let regeneration = e.source == REGENERATION;
                        let slot = if regeneration { &mut implicit } else { &mut explicit };
                        let stmt = match slot {
                            Some(stmt) => stmt,
                            None => slot.insert(tx.prepare_cached(upsert_sql(Backend::Sqlite, 1, regeneration))?),
                        };
                        let labels = serde_json::to_string(&e.labels).unwrap_or_else(|_| "[]".into());
                        written += stmt.execute(rusqlite::params![
                            e.trace_id,
                            e.image_index,
                            e.end_user,
                            e.tenant,
                            e.route,
                            e.cohort,
                            e.prompt_template,
                            e.asset_type,
                            e.provider,
                            e.rating,
                            e.comment,
                            labels,
                            e.source,
                            nanos_i64(e.created_unix_nano),
                            e.regenerated_by,
                            e.regeneration_how,
                        ])? as u64;
                    }
                    Ok(written)
                })
                .map_err(|e| self.fail_local("feedback", e));
        }
        let fail = self.fail("feedback");
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        let mut written = 0;
        for implicit in [false, true] {
            let kind: Vec<&FeedbackEntry> =
                last.iter().copied().filter(|e| (e.source == REGENERATION) == implicit).collect();
            let mut rest = &kind[..];
            while !rest.is_empty() {
                let rows = INSERT_GROUPS.iter().copied().find(|&g| g <= rest.len()).unwrap_or(1);
                let (group, tail) = rest.split_at(rows);
                rest = tail;
                let query = group
                    .iter()
                    .fold(sqlx::query::<Any>(upsert_sql(self.backend(), rows, implicit)), |q, e| bind(q, e));
                written += query.execute(&mut *tx).await.map_err(&fail)?.rows_affected();
            }
        }
        tx.commit().await.map_err(&fail)?;
        Ok(written)
    }

    /// Every feedback entry of `trace_id`, by image index then end user (at most 1000).
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn feedback_of(&self, trace_id: &str) -> Result<Vec<FeedbackEntry>, StoreError> {
        let rows = sqlx::query::<Any>(&format!(
            "SELECT {COLUMNS} FROM feedback WHERE trace_id = $1 ORDER BY image_index, end_user LIMIT 1000"
        ))
        .bind(trace_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(self.fail("feedback"))?;
        let fail = self.fail("feedback");
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let labels: Option<String> = row.try_get(11).map_err(&fail)?;
            let created: i64 = row.try_get(13).map_err(&fail)?;
            out.push(FeedbackEntry {
                trace_id: row.try_get(0).map_err(&fail)?,
                image_index: row.try_get(1).map_err(&fail)?,
                end_user: row.try_get(2).map_err(&fail)?,
                tenant: row.try_get(3).map_err(&fail)?,
                route: row.try_get(4).map_err(&fail)?,
                cohort: row.try_get(5).map_err(&fail)?,
                prompt_template: row.try_get(6).map_err(&fail)?,
                asset_type: row.try_get(7).map_err(&fail)?,
                provider: row.try_get(8).map_err(&fail)?,
                rating: row.try_get(9).map_err(&fail)?,
                comment: row.try_get(10).map_err(&fail)?,
                labels: labels.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default(),
                source: row.try_get(12).map_err(&fail)?,
                created_unix_nano: created.max(0) as u64,
                regenerated_by: row.try_get(14).map_err(&fail)?,
                regeneration_how: row.try_get(15).map_err(&fail)?,
            });
        }
        Ok(out)
    }
}

/// The upsert of one entry (see [`TraceDb::upsert_feedback`]).
fn upsert(entry: &FeedbackEntry, backend: Backend) -> sqlx::query::Query<'static, Any, AnyArguments<'static>> {
    bind(sqlx::query::<Any>(upsert_sql(backend, 1, entry.source == REGENERATION)), entry)
}

/// The upsert of `rows` entries (one of [`INSERT_GROUPS`]), all regenerations (`implicit`:
/// they never replace an explicit entry) or none; built once per engine, size and kind, so each
/// connection prepares it once.
fn upsert_sql(backend: Backend, rows: usize, implicit: bool) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        let mut all = Vec::new();
        for engine in [Backend::Sqlite, Backend::Postgres] {
            for implicit in [false, true] {
                for &n in &INSERT_GROUPS {
                    // An explicit entry replaces the rating and keeps the regeneration link; a
                    // regeneration replaces the rating only where a regeneration wrote it, and
                    // always updates the link.
                    let rated = [
                        "tenant",
                        "route",
                        "cohort",
                        "prompt_template",
                        "asset_type",
                        "provider",
                        "rating",
                        "comment",
                        "labels",
                        "source",
                        "created_unix_nano",
                    ];
                    let set: Vec<String> = if implicit {
                        rated
                            .iter()
                            .map(|c| {
                                format!(
                                    "{c} = CASE WHEN feedback.source = 'regeneration' THEN excluded.{c} ELSE feedback.{c} END"
                                )
                            })
                            .chain(["regenerated_by", "regeneration_how"].iter().map(|c| format!("{c} = excluded.{c}")))
                            .collect()
                    } else {
                        rated.iter().map(|c| format!("{c} = excluded.{c}")).collect()
                    };
                    all.push(format!(
                        "INSERT INTO feedback ({COLUMNS}) VALUES {} \
                         ON CONFLICT (trace_id, image_index, end_user) DO UPDATE SET {}",
                        values_list(engine, n, COLUMN_COUNT),
                        set.join(", ")
                    ));
                }
            }
        }
        all
    });
    let size = INSERT_GROUPS.iter().position(|&g| g == rows).expect("rows is one of INSERT_GROUPS");
    let engine = usize::from(backend == Backend::Postgres);
    &all[(engine * 2 + usize::from(implicit)) * INSERT_GROUPS.len() + size]
}

/// Binds `entry`'s columns, in [`COLUMNS`] order, after those already bound.
fn bind<'q>(
    query: sqlx::query::Query<'q, Any, AnyArguments<'q>>,
    entry: &FeedbackEntry,
) -> sqlx::query::Query<'q, Any, AnyArguments<'q>> {
    let labels = serde_json::to_string(&entry.labels).unwrap_or_else(|_| "[]".into());
    query
        .bind(entry.trace_id.clone())
        .bind(entry.image_index)
        .bind(entry.end_user.clone())
        .bind(entry.tenant.clone())
        .bind(entry.route.clone())
        .bind(entry.cohort.clone())
        .bind(entry.prompt_template.clone())
        .bind(entry.asset_type.clone())
        .bind(entry.provider.clone())
        .bind(entry.rating)
        .bind(entry.comment.clone())
        .bind(labels)
        .bind(entry.source.clone())
        .bind(nanos_i64(entry.created_unix_nano))
        .bind(entry.regenerated_by.clone())
        .bind(entry.regeneration_how.clone())
}
