//! Trace queries: the filters of `GET /admin/traces` and `acc traces`, parsed from a URL query
//! string, and keyset pagination over (`start_time_unix_nano` DESC, `trace_id` DESC) with an
//! opaque cursor.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::record::TraceRecord;

/// Records per page when the query gives no `limit`.
pub const DEFAULT_LIMIT: usize = 50;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 500;

/// Which records to list. Every filter set must match (AND); an unset one matches all.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceFilter {
    /// The matched route's name (`TraceRecord::route`).
    pub route: Option<String>,
    /// The client key's tenant.
    pub tenant: Option<String>,
    /// `x-acc-cohort`.
    pub cohort: Option<String>,
    /// `x-acc-prompt-template` (`name@version`), `TraceRecord::prompt_template`.
    pub template: Option<String>,
    /// `x-acc-asset-type`.
    pub asset_type: Option<String>,
    /// A provider name that any attempt used ([`TraceRecord::providers`]).
    pub provider: Option<String>,
    /// `pass`, `flagged`, `blocked` or `error` (`TraceRecord::decision`).
    pub decision: Option<String>,
    /// `evaluator:verdict`, e.g. `safety:fail` ([`TraceRecord::verdicts`]).
    pub verdict: Option<String>,
    /// Only records that started at or after this time, Unix nanoseconds (inclusive).
    pub since: Option<u64>,
    /// Only records that started before this time, Unix nanoseconds (exclusive).
    pub until: Option<u64>,
    /// Records per page, 1..=[`MAX_LIMIT`]; default [`DEFAULT_LIMIT`].
    pub limit: usize,
    /// Continue after this position (from [`TracePage::next_cursor`]).
    pub cursor: Option<Cursor>,
}

impl Default for TraceFilter {
    fn default() -> Self {
        TraceFilter {
            route: None,
            tenant: None,
            cohort: None,
            template: None,
            asset_type: None,
            provider: None,
            decision: None,
            verdict: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// One page of records, newest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TracePage {
    /// At most the filter's `limit` records, newest first.
    pub records: Vec<TraceRecord>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A position in the listing order: the last record of a page. Its string form is opaque to
/// clients (URL-safe base64 without padding of `"{start_time_unix_nano}:{trace_id}"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub(crate) start_time_unix_nano: u64,
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
}

impl Cursor {
    /// The cursor's opaque string form.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}:{}:{}", self.start_time_unix_nano, self.trace_id, self.span_id))
    }

    /// Reads a cursor from [`Cursor::encode`]'s form. Errors: a message saying the cursor is
    /// malformed (not one this store issued).
    pub fn decode(s: &str) -> Result<Cursor, String> {
        let bad = || format!("cursor {} is malformed (pass a next_cursor as given)", quoted(s));
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (nanos, rest) = text.split_once(':').ok_or_else(bad)?;
        let (trace_id, span_id) = rest.rsplit_once(':').ok_or_else(bad)?;
        let start_time_unix_nano = nanos.parse::<u64>().map_err(|_| bad())?;
        let ok = |v: &str| !v.is_empty() && !v.chars().any(char::is_control);
        if !ok(trace_id) || !ok(span_id) {
            return Err(bad());
        }
        Ok(Cursor { start_time_unix_nano, trace_id: trace_id.to_string(), span_id: span_id.to_string() })
    }
}

/// Why a query string is not a [`TraceFilter`]: the parameter at fault (its name as sent) and
/// a message saying what was expected. Shown as an OpenAI-shaped 400 `invalid_filter` whose
/// `param` is [`FilterError::param`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// One of [`PARAMETERS`]; `query` for a parameter that is none of them.
    pub param: &'static str,
    pub message: String,
}

/// The query parameters a filter reads.
pub const PARAMETERS: [&str; 12] = [
    "route",
    "tenant",
    "cohort",
    "template",
    "asset_type",
    "provider",
    "decision",
    "verdict",
    "since",
    "until",
    "limit",
    "cursor",
];

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A value as quoted in an error message: at most 64 characters of it.
fn quoted(value: &str) -> String {
    let mut q = format!("{:?}", crate::cut(value, 64));
    if value.chars().count() > 64 {
        q.push_str(" (cut)");
    }
    q
}

impl TraceFilter {
    /// Parses a URL query string (without the `?`): `route`, `tenant`, `cohort`, `template`,
    /// `asset_type`, `provider`, `decision`, `verdict` (`evaluator:verdict`), `since` and `until`
    /// (Unix nanoseconds or RFC 3339, e.g. `2025-01-31T12:00:00Z`), `limit` (1..=500, default 50)
    /// and `cursor`. Values are percent-decoded; an empty value leaves its filter unset.
    ///
    /// Errors: the parameter and a message naming it, for an unknown or repeated parameter, a
    /// bad time, limit, decision, verdict or cursor, or `since` not before `until`.
    pub fn from_query(query: &str) -> Result<TraceFilter, FilterError> {
        Self::parse(query).map_err(|(param, message)| FilterError { param, message })
    }

    fn parse(query: &str) -> Result<TraceFilter, (&'static str, String)> {
        let mut f = TraceFilter::default();
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let at = |message: String| (PARAMETERS.iter().find(|p| **p == key).copied().unwrap_or("query"), message);
            if seen.iter().any(|k| *k == key) {
                return Err(at(format!("query parameter {} is given twice", quoted(&key))));
            }
            seen.push(key.to_string());
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            let text = Some(value.to_string());
            match &*key {
                "route" => f.route = text,
                "tenant" => f.tenant = text,
                "cohort" => f.cohort = text,
                "template" => f.template = text,
                "asset_type" => f.asset_type = text,
                "provider" => f.provider = text,
                "decision" => match value {
                    "" | "pass" | "flagged" | "blocked" | "review" | "error" => f.decision = text,
                    _ => {
                        return Err(at(format!(
                            "decision {}: expected pass, flagged, blocked, review or error",
                            quoted(value)
                        )))
                    }
                },
                // An evaluator's name and one of the verdicts a record holds.
                "verdict" => match value.split_once(':') {
                    Some((e, "pass" | "fail" | "error")) if !e.is_empty() && !e.contains(':') => f.verdict = text,
                    _ => {
                        return Err(at(format!(
                            "verdict {}: expected evaluator:verdict with a verdict of pass, fail or error, e.g. safety:fail",
                            quoted(value)
                        )))
                    }
                },
                "since" => f.since = Some(parse_time("since", value).map_err(at)?),
                "until" => f.until = Some(parse_time("until", value).map_err(at)?),
                "limit" => {
                    f.limit = match value.parse::<usize>() {
                        Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                        _ => {
                            return Err(at(format!("limit {}: expected a number from 1 to {MAX_LIMIT}", quoted(value))))
                        }
                    }
                }
                "cursor" => f.cursor = Some(Cursor::decode(value).map_err(at)?),
                other => {
                    return Err(at(format!(
                        "unknown query parameter {} (expected {})",
                        quoted(other),
                        PARAMETERS.join(", ")
                    )))
                }
            }
        }
        if let (Some(since), Some(until)) = (f.since, f.until) {
            if since >= until {
                return Err(("since", format!("since ({since}) must be before until ({until})")));
            }
        }
        Ok(f)
    }
}

/// Unix nanoseconds, or an RFC 3339 time converted to them. A time after the store's range
/// (it keeps signed 64-bit nanoseconds: until 2262-04-11) is the range's end, so a far-future
/// `until` means "no end"; a time before 1970 is an error. An RFC 3339 offset sent unencoded
/// (`+00:00` in a URL reads as a space) is named in the error.
fn parse_time(name: &str, value: &str) -> Result<u64, String> {
    const END: u64 = i64::MAX as u64;
    if value.bytes().all(|b| b.is_ascii_digit()) {
        let n = value.parse::<u64>().unwrap_or(END).min(END);
        // Unix seconds, milliseconds or microseconds of any time since 2001 are below 10^17,
        // which as nanoseconds is March 1973, before any record: read as nanoseconds they would
        // silently mean 1970. Refused with what to send instead (0 stays: the epoch).
        if n != 0 && n < 100_000_000_000_000_000 {
            return Err(format!(
                "{name} {}: looks like Unix seconds, milliseconds or microseconds; give Unix nanoseconds \
                 (19 digits, e.g. {}) or an RFC 3339 time like 2025-01-31T12:00:00Z",
                quoted(value),
                // The same instant in nanoseconds, from whichever unit it looks like.
                if n < 10_000_000_000 {
                    n.saturating_mul(1_000_000_000)
                } else if n < 10_000_000_000_000 {
                    n.saturating_mul(1_000_000)
                } else {
                    n.saturating_mul(1_000)
                }
                .min(END)
            ));
        }
        return Ok(n);
    }
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(|e| {
        let hint = if value.contains(' ') { "; a + in a URL must be sent as %2B" } else { "" };
        format!(
            "{name} {}: expected Unix nanoseconds or an RFC 3339 time like 2025-01-31T12:00:00Z ({e}){hint}",
            quoted(value)
        )
    })?;
    match u64::try_from(t.unix_timestamp_nanos()) {
        Ok(n) => Ok(n.min(END)),
        Err(_) if t.unix_timestamp_nanos() > 0 => Ok(END),
        Err(_) => Err(format!("{name} {}: before 1970", quoted(value))),
    }
}
