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
        let bad = || format!("cursor {s:?} is malformed (pass a next_cursor as given)");
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

impl TraceFilter {
    /// Parses a URL query string (without the `?`): `route`, `tenant`, `cohort`, `template`,
    /// `asset_type`, `provider`, `decision`, `verdict` (`evaluator:verdict`), `since` and `until`
    /// (Unix nanoseconds or RFC 3339, e.g. `2025-01-31T12:00:00Z`), `limit` (1..=500, default 50)
    /// and `cursor`. Values are percent-decoded; an empty value leaves its filter unset.
    ///
    /// Errors: a message naming the parameter, for an unknown or repeated parameter, a bad time,
    /// limit, verdict or cursor, or `since` not before `until`.
    pub fn from_query(query: &str) -> Result<TraceFilter, String> {
        let mut f = TraceFilter::default();
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if seen.iter().any(|k| *k == key) {
                return Err(format!("query parameter {key:?} is given twice"));
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
                    "" | "pass" | "flagged" | "blocked" | "error" => f.decision = text,
                    _ => return Err(format!("decision {value:?}: expected pass, flagged, blocked or error")),
                },
                "verdict" => match value.split_once(':') {
                    Some((e, v)) if !e.is_empty() && !v.is_empty() && !v.contains(':') => f.verdict = text,
                    _ => return Err(format!("verdict {value:?}: expected evaluator:verdict, e.g. safety:fail")),
                },
                "since" => f.since = Some(parse_time("since", value)?),
                "until" => f.until = Some(parse_time("until", value)?),
                "limit" => {
                    f.limit = match value.parse::<usize>() {
                        Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                        _ => return Err(format!("limit {value:?}: expected a number from 1 to {MAX_LIMIT}")),
                    }
                }
                "cursor" => f.cursor = Some(Cursor::decode(value)?),
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?} (expected route, tenant, cohort, template, \
                         asset_type, provider, decision, verdict, since, until, limit, cursor)"
                    ))
                }
            }
        }
        if let (Some(since), Some(until)) = (f.since, f.until) {
            if since >= until {
                return Err(format!("since ({since}) must be before until ({until})"));
            }
        }
        Ok(f)
    }
}

/// Unix nanoseconds, or an RFC 3339 time converted to them.
fn parse_time(name: &str, value: &str) -> Result<u64, String> {
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().map_err(|_| format!("{name} {value:?}: too large for Unix nanoseconds"));
    }
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(|e| {
        format!("{name} {value:?}: expected Unix nanoseconds or an RFC 3339 time like 2025-01-31T12:00:00Z ({e})")
    })?;
    u64::try_from(t.unix_timestamp_nanos()).map_err(|_| format!("{name} {value:?}: before 1970"))
}
