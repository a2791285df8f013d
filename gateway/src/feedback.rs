//! Feedback tied to traces, and regenerations.
//!
//! - `POST /v1/feedback` ([`Feedback::rate`], called by the proxy after it authenticated the
//!   key): a rating of a trace of the key's own tenant, stored in the `feedback` table, one per
//!   (trace, image, end user), a repeat replacing it. A trace of another tenant and an unknown
//!   trace get the same 404.
//! - Regenerations ([`Feedback::detect`], called by the proxy once a request is routed): an
//!   explicit link (`x-acc-regenerate-of` or body `acc.regenerate_of`) to a trace of the same
//!   tenant, else implicit detection in [`prompts`]. The new record gets
//!   `regeneration: {of, how, similarity}` and the earlier trace an implicit -1 (source
//!   `regeneration`), written by a background task through a bounded queue.
//! - [`recent`]: the newest traces' essentials in memory, filled as records are handed to the
//!   writer, so a trace can be rated (or linked) while its record still waits in the writer's
//!   queue; older ones are read from the store.

pub mod prompts;
pub mod recent;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use prometheus::IntCounterVec;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cut;
use crate::error::ApiError;
use crate::metrics::FeedbackMetrics;
use crate::policy::{Policy, RecordPrompt, Route};
use crate::store::feedback::{EXPLICIT, REGENERATION};
use crate::store::record::RegenerationLink;
use crate::store::{FeedbackEntry, StoreError, TraceRecord, TraceWriter};

use prompts::{PromptMemory, Seen};
use recent::{RecentTrace, RecentTraces};

/// Longest `comment`, characters.
pub const MAX_COMMENT_CHARS: usize = 2000;
/// Most `labels`.
pub const MAX_LABELS: usize = 16;
/// Longest label, characters.
pub const MAX_LABEL_CHARS: usize = 64;
/// Longest `user`, characters (as the trace record keeps it).
pub const MAX_USER_CHARS: usize = crate::request::MAX_USER_CHARS;
/// Largest `POST /v1/feedback` body, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Regenerations waiting for their implicit feedback to be written; beyond it they are counted
/// in `acc_feedback_failed_total{source="regeneration",reason="queue_full"}`.
pub const QUEUE_CAPACITY: usize = 1024;
/// How long an explicit link to a trace no longer in memory waits for the store to say whose
/// it is; past it the link is ignored.
pub const LINK_LOOKUP_TIMEOUT: Duration = Duration::from_millis(250);
/// The end user of a request or rating with neither a `user` field nor a client key.
pub const ANONYMOUS: &str = "anonymous";

/// A `POST /v1/feedback` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    /// Lowercase, 32 hex digits.
    pub trace_id: String,
    /// In [-1, 1]: `"up"` is 1, `"down"` -1.
    pub rating: f64,
    /// `None`: the whole answer.
    pub image_index: Option<u64>,
    pub comment: Option<String>,
    pub labels: Vec<String>,
    /// The rater (OpenAI's `user`); `None`: the key's name.
    pub user: Option<String>,
}

impl Rating {
    /// Parses and checks a body `{trace_id, rating, image_index?, comment?, labels?, user?}`;
    /// every mistake is a 400 naming its field (`param`).
    pub fn parse(body: &[u8]) -> Result<Rating, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(
                "body",
                "invalid_json",
                format!("request body is not valid JSON: {}", crate::error::json_error_text(&e)),
            )
        })?;
        let Value::Object(map) = value else {
            return Err(ApiError::invalid("body", "invalid_json", "request body must be a JSON object"));
        };
        if let Some(k) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "trace_id" | "rating" | "image_index" | "comment" | "labels" | "user"))
        {
            return Err(ApiError::invalid(
                "body",
                "unknown_parameter",
                format!(
                    "unknown field \"{}\": feedback takes trace_id, rating, image_index, comment, labels and user",
                    cut(k, 64)
                ),
            ));
        }
        let trace_id = match map.get("trace_id") {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid("trace_id", "missing_required_parameter", "trace_id is required"))
            }
            Some(Value::String(s)) if crate::request::is_trace_id(s) => s.to_ascii_lowercase(),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "trace_id",
                    "invalid_value",
                    "trace_id must be 32 hex digits (the x-acc-trace-id of the answer rated)",
                ))
            }
            Some(_) => return Err(ApiError::invalid("trace_id", "invalid_type", "trace_id must be a string")),
        };
        let rating = match map.get("rating") {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid("rating", "missing_required_parameter", "rating is required"))
            }
            Some(Value::String(s)) if s == "up" => 1.0,
            Some(Value::String(s)) if s == "down" => -1.0,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() && (-1.0..=1.0).contains(&v) => v,
                _ => {
                    return Err(ApiError::invalid(
                        "rating",
                        "invalid_value",
                        format!("rating must be \"up\", \"down\" or a number from -1 to 1, got {n}"),
                    ))
                }
            },
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "rating",
                    "invalid_value",
                    "rating must be \"up\", \"down\" or a number from -1 to 1",
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "rating",
                    "invalid_type",
                    "rating must be a string (\"up\", \"down\") or a number from -1 to 1",
                ))
            }
        };
        let image_index = match map.get("image_index") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            // A whole number written as a float (`0.0`, as Python's json writes a float index).
            Some(Value::Number(n))
                if n.as_f64().is_some_and(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f)) =>
            {
                n.as_f64().map(|f| f as u64)
            }
            Some(Value::Number(_)) => {
                return Err(ApiError::invalid(
                    "image_index",
                    "invalid_value",
                    "image_index must be a non-negative integer (leave it out to rate the whole answer)",
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "image_index",
                    "invalid_type",
                    "image_index must be an integer (leave it out to rate the whole answer)",
                ))
            }
        };
        let comment = match map.get("comment") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().any(crate::is_stray_control) => {
                return Err(ApiError::invalid(
                    "comment",
                    "invalid_value",
                    "comment holds a control character (line breaks and tabs are fine)",
                ))
            }
            Some(Value::String(s)) if s.chars().count() <= MAX_COMMENT_CHARS => Some(s.clone()),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "comment",
                    "invalid_value",
                    format!("comment is longer than {MAX_COMMENT_CHARS} characters"),
                ))
            }
            Some(_) => return Err(ApiError::invalid("comment", "invalid_type", "comment must be a string")),
        };
        let labels = match map.get("labels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if a.len() <= MAX_LABELS => {
                let mut labels = Vec::with_capacity(a.len());
                for v in a {
                    match v {
                        Value::String(s)
                            if !s.trim().is_empty()
                                && s.chars().count() <= MAX_LABEL_CHARS
                                && !s.chars().any(char::is_control) =>
                        {
                            labels.push(s.clone())
                        }
                        _ => {
                            return Err(ApiError::invalid(
                                "labels",
                                "invalid_value",
                                format!(
                                    "each label must be a non-empty string of at most {MAX_LABEL_CHARS} characters, without control characters"
                                ),
                            ))
                        }
                    }
                }
                labels
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid("labels", "invalid_value", format!("at most {MAX_LABELS} labels")))
            }
            Some(_) => return Err(ApiError::invalid("labels", "invalid_type", "labels must be an array of strings")),
        };
        // Read as a generation's `user` is (`request::end_user`), so a rating names the same end
        // user as the request did.
        let user = match map.get("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => crate::request::end_user(s),
            Some(_) => return Err(ApiError::invalid("user", "invalid_type", "user must be a string")),
        };
        Ok(Rating { trace_id, rating, image_index, comment, labels, user })
    }
}

/// Who sent a rating or a request: the client key's tenant and name (`None` without keys).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The key's tenant: only its traces may be rated.
    pub tenant: Option<&'a str>,
    /// The key's name (first 12 hex digits of its SHA-256): the end user when the body names
    /// none.
    pub key_name: Option<&'a str>,
}

/// A regeneration whose implicit feedback is still to be written.
struct Regenerated {
    /// The earlier trace, and the one that regenerated it.
    of: String,
    by: String,
    how: &'static str,
    end_user: String,
    /// The new request's fields: used for the entry when the earlier trace is neither in
    /// memory nor in the store yet (still in flight).
    fallback: RecentTrace,
}

/// Feedback and regeneration state, shared by the proxy's requests (one per process).
pub struct Feedback {
    /// The newest traces' essentials.
    pub recent: Arc<RecentTraces>,
    /// Recent prompts per tenant and end user, for implicit detection.
    pub prompts: PromptMemory,
    traces: Option<TraceWriter>,
    regenerations: Option<mpsc::Sender<Regenerated>>,
    failed: IntCounterVec,
}

impl Feedback {
    /// The state, and (when records are kept, `traces` set) the task that writes the implicit
    /// feedback of regenerations, started on the current tokio runtime.
    pub fn new(traces: Option<TraceWriter>, metrics: &FeedbackMetrics) -> Feedback {
        let recent = Arc::new(RecentTraces::default());
        let failed = metrics.failed.clone();
        let regenerations = traces.clone().map(|writer| {
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            writer.runtime().clone().spawn(write_regenerations(rx, writer, recent.clone(), failed.clone()));
            tx
        });
        Feedback { recent, prompts: PromptMemory::default(), traces, regenerations, failed }
    }

    /// Keeps a finished request's essentials, for feedback that arrives before its record is
    /// written. Called with every record handed to the writer.
    pub fn remember(&self, rec: &TraceRecord) {
        self.recent.insert(&rec.trace_id, RecentTrace::of(rec));
    }

    /// The essentials of a client's trace: from memory, else the store (its newest record).
    async fn find(&self, writer: &TraceWriter, trace_id: &str) -> Result<Option<Arc<RecentTrace>>, StoreError> {
        if let Some(t) = self.recent.get(trace_id) {
            return Ok(Some(t));
        }
        let db = writer.db().ok_or_else(|| StoreError::Unavailable {
            target: "(not open)".into(),
            message: "the writer has not opened it yet, or lost it".into(),
        })?;
        Ok(owned(db.get_all(trace_id).await?))
    }

    /// `POST /v1/feedback`: stores `body`'s rating of a trace of `caller`'s tenant and returns
    /// the entry as stored.
    ///
    /// Errors: 400 for a body that does not check ([`Rating::parse`]) and an `image_index`
    /// beyond the trace's images; 404 `trace_not_found` for an unknown trace and for a trace of
    /// another tenant alike; 404 `feedback_disabled` when records are not kept; 503
    /// `store_unavailable` when the store cannot be reached, 500 `store_error` when the write
    /// fails (both counted in `acc_feedback_failed_total`).
    pub async fn rate(
        &self,
        policy: &Policy,
        metrics: &FeedbackMetrics,
        caller: Caller<'_>,
        body: &[u8],
    ) -> Result<FeedbackEntry, ApiError> {
        let r = Rating::parse(body)?;
        let Some(writer) = &self.traces else {
            self.failed.with_label_values(&[EXPLICIT, "store_disabled"]).inc();
            return Err(ApiError::not_found(
                "feedback_disabled",
                "feedback is not kept by this gateway: its trace store is disabled ([store] enabled = false)",
            ));
        };
        let trace = self.find(writer, &r.trace_id).await.map_err(|e| self.store_failure(e))?;
        let Some(trace) = trace.filter(|t| t.tenant.as_deref() == caller.tenant) else {
            return Err(ApiError::not_found(
                "trace_not_found",
                "no such trace for this API key's tenant (never made, made with another tenant's key, or pruned)",
            ));
        };
        if let Some(i) = r.image_index {
            if i >= trace.images as u64 {
                return Err(ApiError::invalid(
                    "image_index",
                    "invalid_value",
                    format!("image_index {i} is beyond the trace's {} image(s)", trace.images),
                ));
            }
        }
        let entry = FeedbackEntry {
            trace_id: r.trace_id,
            image_index: r.image_index.map_or(-1, |i| i as i64),
            end_user: r.user.or_else(|| caller.key_name.map(str::to_string)).unwrap_or_else(|| ANONYMOUS.to_string()),
            tenant: trace.tenant.clone(),
            route: trace.route.clone(),
            cohort: trace.cohort.clone(),
            prompt_template: trace.prompt_template.clone(),
            asset_type: trace.asset_type.clone(),
            provider: trace.provider.clone(),
            rating: r.rating,
            comment: r.comment,
            labels: r.labels,
            source: EXPLICIT.to_string(),
            created_unix_nano: unix_nanos(),
            regenerated_by: None,
            regeneration_how: None,
        };
        let db = writer.db().ok_or_else(|| {
            self.store_failure(StoreError::Unavailable {
                target: "(not open)".into(),
                message: "the writer has not opened it yet, or lost it".into(),
            })
        })?;
        // The metric counts what the user says, once: a first rating, a changed one, or one that
        // replaces what a regeneration implied; the same rating sent again is stored (its
        // comment and labels may change) but not counted again.
        let before = db
            .stored_rating(&entry.trace_id, entry.image_index, &entry.end_user)
            .await
            .map_err(|e| self.store_failure(e))?;
        db.upsert_feedback(&entry).await.map_err(|e| self.store_failure(e))?;
        let repeated = before.is_some_and(|(rating, source)| {
            source == EXPLICIT && crate::store::feedback::rating_label(rating) == entry.rating_label()
        });
        if repeated {
            return Ok(entry);
        }
        let [cohort, template, asset] = policy.cohorts.labels(
            entry.cohort.as_deref(),
            entry.prompt_template.as_deref(),
            entry.asset_type.as_deref(),
        );
        let route = entry.route.as_deref().unwrap_or("none");
        metrics.feedback.with_label_values(&[route, entry.rating_label(), cohort, template, asset]).inc();
        Ok(entry)
    }

    /// Counts a store failure of an explicit rating and turns it into the client's error
    /// (without the store's own message, which names hosts).
    fn store_failure(&self, e: StoreError) -> ApiError {
        tracing::warn!(error = %e, "feedback not stored");
        if e.is_unavailable() {
            self.failed.with_label_values(&[EXPLICIT, "store_unavailable"]).inc();
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "store_unavailable",
                "feedback cannot be stored now: the trace store is unavailable; retry later",
            )
        } else {
            self.failed.with_label_values(&[EXPLICIT, "store_error"]).inc();
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "store_error",
                "feedback could not be stored: the trace store failed",
            )
        }
    }

    /// Whether `trace_id` is a client's trace of `tenant`: from memory, else one read of the
    /// store bounded by [`LINK_LOOKUP_TIMEOUT`] (false when it cannot say).
    async fn of_tenant(&self, trace_id: &str, tenant: Option<&str>) -> bool {
        if let Some(t) = self.recent.get(trace_id) {
            return t.tenant.as_deref() == tenant;
        }
        let Some(db) = self.traces.as_ref().and_then(TraceWriter::db) else { return false };
        match tokio::time::timeout(LINK_LOOKUP_TIMEOUT, db.get_all(trace_id)).await {
            Ok(Ok(records)) => owned(records).is_some_and(|t| t.tenant.as_deref() == tenant),
            _ => false,
        }
    }

    /// Decides whether the routed request `rec` ([`Asked`]) regenerates an earlier one and records it:
    /// an explicit link (`explicit`, the header or `acc.regenerate_of`) when that trace is of
    /// the same tenant (otherwise ignored: nothing tells the client whether it exists), else
    /// implicit detection over the route's recent prompts of the same tenant and end user (the
    /// prompt is remembered either way; a request naming no end user, neither `user` nor a
    /// key, is neither compared nor remembered). A regeneration sets `rec.regeneration`, counts in
    /// `acc_regenerations_total` and queues the earlier trace's implicit -1.
    ///
    /// Only an explicit link to a trace no longer in memory reads the store (one read by key,
    /// at most [`LINK_LOOKUP_TIMEOUT`]); implicit detection never does.
    pub async fn detect(
        &self,
        policy: &Policy,
        metrics: &FeedbackMetrics,
        route: &Route,
        asked: Asked<'_>,
        rec: &mut TraceRecord,
    ) {
        let Asked { prompt, inputs, explicit } = asked;
        // Implicit detection compares an end user's own prompts: a request with neither a `user`
        // nor a key names nobody, and two such requests need not come from one person (every
        // client of a keyless gateway would be one "anonymous" user whose repeated prompts, a
        // popular one sent by many people, would count as regenerations).
        let who = rec.end_user.as_deref().or(rec.key_name.as_deref());
        let end_user = who.unwrap_or(ANONYMOUS);
        let implicit = who.and_then(|end_user| {
            self.prompts.observe(&Seen {
                tenant: rec.tenant.as_deref().unwrap_or(""),
                end_user,
                route: &route.name,
                inputs,
                prompt,
                exact_only: route.record_prompt != RecordPrompt::Full,
                window: route.regeneration.window,
                threshold: route.regeneration.similarity,
                trace_id: &rec.trace_id,
                now: Instant::now(),
            })
        });
        let explicit = match explicit.filter(|of| *of != rec.trace_id) {
            Some(of) if self.of_tenant(of, rec.tenant.as_deref()).await => Some(of.to_string()),
            _ => None,
        };
        let link = match (explicit, implicit) {
            (Some(of), _) => RegenerationLink { of, how: "explicit".into(), similarity: 1.0 },
            (None, Some((of, similarity))) => RegenerationLink { of, how: "implicit".into(), similarity },
            (None, None) => return,
        };
        let how = if link.how == "explicit" { "explicit" } else { "implicit" };
        let [cohort, _, _] = policy.cohorts.labels(rec.cohort.as_deref(), None, None);
        metrics.regenerations.with_label_values(&[&route.name, cohort, how]).inc();
        let r = Regenerated {
            of: link.of.clone(),
            by: rec.trace_id.clone(),
            how,
            end_user: end_user.to_string(),
            fallback: RecentTrace { provider: None, images: 0, ..RecentTrace::of(rec) },
        };
        match &self.regenerations {
            None => self.failed.with_label_values(&[REGENERATION, "store_disabled"]).inc(),
            Some(tx) => {
                if tx.try_send(r).is_err() {
                    self.failed.with_label_values(&[REGENERATION, "queue_full"]).inc();
                }
            }
        }
        rec.regeneration = Some(link);
    }
}

/// What a request asked that [`Feedback::detect`] compares with earlier requests.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// The prompt as sent.
    pub prompt: &'a str,
    /// A digest of an edit's or variation's input images (0 for a generation): edits are
    /// compared only with edits of the same images.
    pub inputs: u64,
    /// The trace the client says this request regenerates (`x-acc-regenerate-of` or
    /// `acc.regenerate_of`), if any.
    pub explicit: Option<&'a str>,
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// How long the implicit-feedback writer lets regenerations gather after the first of a batch:
/// a receiver that waits on the queue is woken by every message (a futex wake on the request's
/// thread and one of the writer, per regeneration), and each batch is one transaction.
const BATCH_PAUSE: Duration = Duration::from_millis(50);

/// Writes each regeneration's implicit -1 on the earlier trace (image -1, the regenerating end
/// user), with the earlier trace's fields from memory or the store; an explicit rating by the
/// same end user is left as it is. Regenerations are written in batches, one transaction each
/// (what arrives within [`BATCH_PAUSE`] of the first, at most [`QUEUE_CAPACITY`]): a commit per
/// entry cost a WAL write of three pages and two round trips to the store's thread each. Losses
/// are counted, never retried.
async fn write_regenerations(
    mut rx: mpsc::Receiver<Regenerated>,
    writer: TraceWriter,
    recent: Arc<RecentTraces>,
    failed: IntCounterVec,
) {
    /// Moves what `rx` holds now into `batch`, up to [`QUEUE_CAPACITY`] entries.
    fn take(rx: &mut mpsc::Receiver<Regenerated>, batch: &mut Vec<Regenerated>) {
        while batch.len() < QUEUE_CAPACITY {
            let Ok(r) = rx.try_recv() else { break };
            batch.push(r);
        }
    }
    let mut batch: Vec<Regenerated> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take(&mut rx, &mut batch);
        if batch.len() < QUEUE_CAPACITY {
            tokio::time::sleep(BATCH_PAUSE).await;
            take(&mut rx, &mut batch);
        }
        let Some(db) = writer.db() else {
            failed.with_label_values(&[REGENERATION, "store_unavailable"]).inc_by(batch.len() as u64);
            batch.clear();
            continue;
        };
        let mut entries = Vec::with_capacity(batch.len());
        for r in batch.drain(..) {
            let earlier = match recent.get(&r.of) {
                Some(t) => Some((*t).clone()),
                None => db.get(&r.of).await.ok().flatten().map(|rec| RecentTrace::of(&rec)),
            };
            let t = earlier.unwrap_or(r.fallback);
            entries.push(FeedbackEntry {
                trace_id: r.of,
                image_index: -1,
                end_user: r.end_user,
                tenant: t.tenant,
                route: t.route,
                cohort: t.cohort,
                prompt_template: t.prompt_template,
                asset_type: t.asset_type,
                provider: t.provider,
                rating: -1.0,
                comment: None,
                labels: vec![format!("regenerated_by:{}", r.by), format!("how:{}", r.how)],
                source: REGENERATION.to_string(),
                created_unix_nano: unix_nanos(),
                regeneration_how: Some(r.how.to_string()),
                regenerated_by: Some(r.by),
            });
        }
        if let Err(e) = db.upsert_feedback_batch(&entries).await {
            let reason = if e.is_unavailable() { "store_unavailable" } else { "store_error" };
            failed.with_label_values(&[REGENERATION, reason]).inc_by(entries.len() as u64);
            tracing::warn!(error = %e, entries = entries.len(), "implicit feedback of regenerations not stored");
        }
    }
}

/// `regenerated_by` of `GET /admin/traces/{id}`: the regenerations recorded in a trace's
/// feedback (one per end user, the latest), as `{trace_id, how, end_user}`, whether the entry
/// holds the regeneration's implicit -1 or the user's own rating. Entries written before
/// migration 0004 carry the link in their labels only.
pub fn regenerated_by(entries: &[FeedbackEntry]) -> Vec<Value> {
    entries
        .iter()
        .filter_map(|e| {
            let (by, how) = match (&e.regenerated_by, &e.regeneration_how) {
                (Some(by), how) => (by.as_str(), how.as_deref().unwrap_or("implicit")),
                (None, _) if e.source == REGENERATION => (
                    e.labels.iter().find_map(|l| l.strip_prefix("regenerated_by:"))?,
                    e.labels.iter().find_map(|l| l.strip_prefix("how:")).unwrap_or("implicit"),
                ),
                (None, _) => return None,
            };
            Some(serde_json::json!({"trace_id": by, "how": how, "end_user": e.end_user}))
        })
        .collect()
}

/// The essentials of a trace from its stored records (oldest first; a client's requests, not
/// mirrors): the trace is its first request's tenant's, and described by that tenant's newest
/// request. A client may continue any W3C trace, another tenant's too: the later requests of
/// another tenant carrying the id are ignored, so no rating or link crosses tenants.
fn owned(records: Vec<TraceRecord>) -> Option<Arc<RecentTrace>> {
    let mut primary = records.iter().filter(|r| r.kind == "primary");
    let owner = primary.next()?.tenant.clone();
    let newest = records.iter().rev().find(|r| r.kind == "primary" && r.tenant == owner)?;
    Some(Arc::new(RecentTrace::of(newest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::feedback::rating_label;

    fn parse(v: Value) -> Result<Rating, ApiError> {
        Rating::parse(v.to_string().as_bytes())
    }

    const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_rating_parses_with_every_field() {
        let r = parse(serde_json::json!({
            "trace_id": ID.to_uppercase(), "rating": "down", "image_index": 1,
            "comment": "too dark", "labels": ["dark", "off-brand"], "user": "u-7",
        }))
        .unwrap();
        assert_eq!(
            r,
            Rating {
                trace_id: ID.into(),
                rating: -1.0,
                image_index: Some(1),
                comment: Some("too dark".into()),
                labels: vec!["dark".into(), "off-brand".into()],
                user: Some("u-7".into()),
            }
        );
        assert_eq!(parse(serde_json::json!({"trace_id": ID, "rating": "up"})).unwrap().rating, 1.0);
        assert_eq!(parse(serde_json::json!({"trace_id": ID, "rating": -0.5})).unwrap().rating, -0.5);
        assert_eq!(parse(serde_json::json!({"trace_id": ID, "rating": 0})).unwrap().rating, 0.0);
        assert_eq!([rating_label(0.25), rating_label(-0.25), rating_label(0.0)], ["up", "down", "neutral"]);
        // `user` as a generation's is read: empty is none, a long one cut to the same length.
        assert_eq!(parse(serde_json::json!({"trace_id": ID, "rating": "up", "user": ""})).unwrap().user, None);
        // A whole index written as a float is that index.
        assert_eq!(
            parse(serde_json::json!({"trace_id": ID, "rating": "up", "image_index": 1.0})).unwrap().image_index,
            Some(1)
        );
        let long = "ü".repeat(MAX_USER_CHARS + 44);
        let cut = parse(serde_json::json!({"trace_id": ID, "rating": "up", "user": long})).unwrap().user.unwrap();
        assert_eq!(cut, "ü".repeat(MAX_USER_CHARS));
    }

    #[test]
    fn each_mistake_names_its_field() {
        let long = "x".repeat(MAX_COMMENT_CHARS + 1);
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}")).collect();
        let cases = [
            (serde_json::json!({"rating": "up"}), "trace_id", "missing_required_parameter"),
            (serde_json::json!({"trace_id": "abc", "rating": "up"}), "trace_id", "invalid_value"),
            (serde_json::json!({"trace_id": ID}), "rating", "missing_required_parameter"),
            (serde_json::json!({"trace_id": ID, "rating": "meh"}), "rating", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": 1.5}), "rating", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": -1.01}), "rating", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": true}), "rating", "invalid_type"),
            (serde_json::json!({"trace_id": 123, "rating": "up"}), "trace_id", "invalid_type"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "image_index": "0"}), "image_index", "invalid_type"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "image_index": -1}), "image_index", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "image_index": 0.5}), "image_index", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "comment": long}), "comment", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "comment": 5}), "comment", "invalid_type"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "labels": many}), "labels", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "labels": [""]}), "labels", "invalid_value"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "labels": "x"}), "labels", "invalid_type"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "user": 7}), "user", "invalid_type"),
            (serde_json::json!({"trace_id": ID, "rating": "up", "stars": 5}), "body", "unknown_parameter"),
            (serde_json::json!([1]), "body", "invalid_json"),
        ];
        for (body, param, code) in cases {
            let e = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!((e.status.as_u16(), e.param, e.code), (400, Some(param), Some(code)), "{body}");
        }
        // Not finite: JSON has no NaN, and a number too large to be an f64 is refused.
        let e = Rating::parse(format!(r#"{{"trace_id":"{ID}","rating":1e999}}"#).as_bytes()).unwrap_err();
        assert_eq!(e.param, Some("body"), "serde refuses it as JSON: {}", e.message);
    }
}
