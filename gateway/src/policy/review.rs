//! Human review in policies: a route's `review_*` fields (what happens when the queue is full,
//! how long an item waits, where decisions are POSTed) and the global `[review]` section (the
//! byte budget of held images, the webhook's delivery settings), checked into
//! [`ReviewSettings`] and [`ReviewBudget`].

use std::time::Duration;

use serde::Deserialize;

use super::raw::{RawFile, RawRoute};
use super::types::{EvalAction, EvalPolicy, StoreSettings};

/// `[review]`: the review queue's global settings (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReview {
    /// Bytes of held images the store may keep at once (pending items and approved ones not yet
    /// cleaned up); default 268,435,456 (256 MiB).
    pub(super) max_bytes: Option<u64>,
    /// Deliveries of one decision to a route's webhook, the first included (1 to 20; default 5).
    pub(super) webhook_max_attempts: Option<u32>,
    /// Wait before the second delivery, ms, doubled before each next one (default 1000).
    pub(super) webhook_backoff_ms: Option<u64>,
    /// Upper bound of one delivery (connect, send, answer), ms (default 5000).
    pub(super) webhook_timeout_ms: Option<u64>,
}

/// What a route does when an image its policy sends to review cannot be held: the byte budget
/// is full, or the store is unavailable or refused the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReviewOverflow {
    /// Refuse the request: 400 `content_policy_violation` (default: nothing a person must see
    /// is published unseen).
    #[default]
    Block,
    /// Try the route's next target (decided while the attempt is evaluated; a write that fails
    /// after the attempts ended blocks instead).
    Fallback,
    /// Return the image, marked as failed (`x-acc-decision: flagged`).
    Flag,
}

impl ReviewOverflow {
    /// The equivalent evaluator action.
    pub fn action(self) -> EvalAction {
        match self {
            ReviewOverflow::Block => EvalAction::Block,
            ReviewOverflow::Fallback => EvalAction::Fallback,
            ReviewOverflow::Flag => EvalAction::Flag,
        }
    }
}

/// A route's review settings (`review_overflow`, `review_ttl_secs`, `review_webhook_url`,
/// `review_webhook_secret_env`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewSettings {
    /// When the image cannot be held (default block).
    pub overflow: ReviewOverflow,
    /// How long an item waits for a reviewer before it expires (default 86,400 s; 1 s to 30
    /// days).
    pub ttl: Duration,
    /// Where decisions are POSTed (`http://` or `https://`), when set.
    pub webhook_url: Option<String>,
    /// The environment variable holding the webhook's HMAC-SHA256 secret (required with the
    /// URL). Its value is read when a decision is sent, never logged.
    pub webhook_secret_env: Option<String>,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        ReviewSettings {
            overflow: ReviewOverflow::Block,
            ttl: Duration::from_secs(86_400),
            webhook_url: None,
            webhook_secret_env: None,
        }
    }
}

/// `[review]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewBudget {
    /// Bytes of held images kept at once (default 256 MiB).
    pub max_bytes: u64,
    /// Deliveries of one decision, the first included (default 5).
    pub webhook_max_attempts: u32,
    /// Wait before the second delivery, doubled each time (default 1 s).
    pub webhook_backoff: Duration,
    /// Upper bound of one delivery (default 5 s).
    pub webhook_timeout: Duration,
}

impl Default for ReviewBudget {
    fn default() -> Self {
        ReviewBudget {
            max_bytes: 256 << 20,
            webhook_max_attempts: 5,
            webhook_backoff: Duration::from_secs(1),
            webhook_timeout: Duration::from_secs(5),
        }
    }
}

/// Longest `review_ttl_secs`: 30 days.
pub const MAX_REVIEW_TTL_SECS: u64 = 30 * 86_400;

impl EvalPolicy {
    /// Whether any failure of this route goes to human review.
    pub fn reviews(&self) -> bool {
        [self.on_sanity_fail, self.on_unsafe, self.on_low_adherence, self.on_text_fail].contains(&EvalAction::Review)
    }
}

/// `[review]` gathered across the files.
pub(super) fn section(parsed: &[(&str, RawFile)], errors: &mut Vec<String>) -> ReviewBudget {
    let mut found: Option<(ReviewBudget, &str)> = None;
    for (file, raw) in parsed {
        let Some(r) = &raw.review else { continue };
        if let Some((_, other)) = &found {
            errors.push(format!("{file}: review: already set in {other}"));
            continue;
        }
        let at = format!("{file}: review");
        let d = ReviewBudget::default();
        if r.max_bytes == Some(0) {
            errors.push(format!("{at}.max_bytes: must be greater than 0"));
        }
        let attempts = r.webhook_max_attempts.unwrap_or(d.webhook_max_attempts);
        if !(1..=20).contains(&attempts) {
            errors.push(format!("{at}.webhook_max_attempts: {attempts} is outside [1, 20]"));
        }
        let ms = |field: &str, v: Option<u64>, default: Duration, errors: &mut Vec<String>| match v {
            Some(0) => {
                errors.push(format!("{at}.{field}: must be greater than 0"));
                default
            }
            Some(v) if v > 3_600_000 => {
                errors.push(format!("{at}.{field}: {v} is more than an hour (3600000 ms)"));
                default
            }
            Some(v) => Duration::from_millis(v),
            None => default,
        };
        let budget = ReviewBudget {
            max_bytes: r.max_bytes.filter(|&b| b > 0).unwrap_or(d.max_bytes),
            webhook_max_attempts: attempts.clamp(1, 20),
            webhook_backoff: ms("webhook_backoff_ms", r.webhook_backoff_ms, d.webhook_backoff, errors),
            webhook_timeout: ms("webhook_timeout_ms", r.webhook_timeout_ms, d.webhook_timeout, errors),
        };
        found = Some((budget, file));
    }
    found.map(|f| f.0).unwrap_or_default()
}

/// A route's `review_*` fields. `eval` is the route's validated evaluation policy: the fields
/// are refused on a route none of whose actions is "review".
pub(super) fn route(at: &str, r: &RawRoute, eval: &EvalPolicy, errors: &mut Vec<String>) -> ReviewSettings {
    let d = ReviewSettings::default();
    let overflow = match r.review_overflow.as_deref() {
        None | Some("block") => ReviewOverflow::Block,
        Some("fallback") => ReviewOverflow::Fallback,
        Some("flag") => ReviewOverflow::Flag,
        Some(other) => {
            errors.push(format!(
                "{at}.review_overflow: unknown action \"{other}\" (expected \"block\", \"fallback\" or \"flag\")"
            ));
            ReviewOverflow::Block
        }
    };
    let ttl = match r.review_ttl_secs {
        None => d.ttl,
        Some(s) if (1..=MAX_REVIEW_TTL_SECS).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            errors.push(format!("{at}.review_ttl_secs: {s} is outside [1, {MAX_REVIEW_TTL_SECS}] (30 days)"));
            d.ttl
        }
    };
    if let Some(url) = &r.review_webhook_url {
        if let Err(why) = check_webhook_url(url) {
            errors.push(format!("{at}.review_webhook_url: {why}"));
        }
    }
    match (&r.review_webhook_url, &r.review_webhook_secret_env) {
        (Some(_), None) => errors.push(format!(
            "{at}.review_webhook_secret_env: required with review_webhook_url (the environment variable holding the HMAC secret)"
        )),
        (None, Some(_)) => errors.push(format!("{at}.review_webhook_secret_env: only used with review_webhook_url")),
        (_, Some(env)) if !valid_env_name(env) => errors.push(format!(
            "{at}.review_webhook_secret_env: \"{env}\" is not an environment variable name (A-Z, a-z, 0-9, _; not starting with a digit)"
        )),
        _ => {}
    }
    let given = r.review_overflow.is_some()
        || r.review_ttl_secs.is_some()
        || r.review_webhook_url.is_some()
        || r.review_webhook_secret_env.is_some();
    if given && !eval.reviews() {
        errors.push(format!("{at}: review_* settings given, but no on_* action of the route is \"review\""));
    }
    ReviewSettings {
        overflow,
        ttl,
        webhook_url: r.review_webhook_url.clone(),
        webhook_secret_env: r.review_webhook_secret_env.clone(),
    }
}

/// A route that reviews needs the store its queue lives in.
pub(super) fn needs_store(at: &str, eval: &EvalPolicy, store: &StoreSettings, errors: &mut Vec<String>) {
    if eval.reviews() && !store.enabled {
        errors.push(format!(
            "{at}: \"review\" keeps held images in the trace store, and [store] enabled = false turns it off"
        ));
    }
}

/// An absolute `http` or `https` URL with a host and no credentials.
fn check_webhook_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must start with http:// or https://".into());
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if authority.contains('@') {
        return Err("must not contain credentials (the HMAC signature authenticates the gateway)".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && !s.as_bytes()[0].is_ascii_digit() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
