//! Which error answers of a provider are the request's fault and which are the provider
//! account's: one table per adapter, built from each provider's documented error codes, and
//! the one function that applies a table. The README's "Provider errors" table is printed from
//! these tables (`acc errors`) and a test checks the two agree.
//!
//! The four classes:
//! - [`ErrorClass::Client`]: the request itself is wrong (a bad parameter, a prompt too long).
//!   Another provider would refuse it too, and every try costs: returned to the client in the
//!   OpenAI error shape, never retried.
//! - [`ErrorClass::Account`]: the provider account or deployment cannot serve (quota, billing,
//!   credits, a revoked key, a model or deployment that does not exist there, a region): the
//!   route's next target is tried. Provider-wide ones (billing, key) count against the
//!   provider's breaker; a missing model or deployment does not, since other models of the
//!   same provider still work.
//! - [`ErrorClass::Content`]: the provider's content filter refused the prompt or the image:
//!   answered like OpenAI's 400 `content_policy_violation` with the provider's reason kept.
//! - [`ErrorClass::Transient`]: rate limits, overload, server errors, timeouts: the next target
//!   is tried, and a `Retry-After` is honoured.

use bytes::Bytes;
use http::StatusCode;

use super::ProviderError;

/// How an error answer is treated; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Client,
    /// `provider_wide`: billing, credits, a revoked key (the breaker counts it); false for a
    /// model, deployment or region the target names.
    Account {
        provider_wide: bool,
    },
    Content,
    Transient,
}

impl ErrorClass {
    /// The class's name in the README table: `client`, `account`, `account (target)`,
    /// `content`, `transient`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Client => "client",
            ErrorClass::Account { provider_wide: true } => "account",
            ErrorClass::Account { provider_wide: false } => "account (target)",
            ErrorClass::Content => "content",
            ErrorClass::Transient => "transient",
        }
    }
}

/// Which HTTP statuses a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statuses {
    Any,
    One(u16),
    /// Inclusive range.
    Range(u16, u16),
}

impl Statuses {
    fn contains(self, s: u16) -> bool {
        match self {
            Statuses::Any => true,
            Statuses::One(v) => v == s,
            Statuses::Range(a, b) => (a..=b).contains(&s),
        }
    }

    fn text(self) -> String {
        match self {
            Statuses::Any => "any".into(),
            Statuses::One(v) => v.to_string(),
            Statuses::Range(400, 499) => "4xx".into(),
            Statuses::Range(500, 599) => "5xx".into(),
            Statuses::Range(a, b) => format!("{a}–{b}"),
        }
    }
}

/// What of the answer a rule matches, besides the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matcher {
    /// Every answer with the status.
    Status,
    /// One of the codes the adapter reads from the body (an error `code`, `type`, `status`,
    /// a `reason`, a `name`: each adapter says which), compared without regard to case.
    Code(&'static str),
    /// The error message contains this text (without regard to case): for providers whose
    /// documented refusals carry no code.
    Message(&'static str),
    /// The whole error message is this text (without regard to case).
    MessageIs(&'static str),
}

/// One row of a table: the first row that matches an answer decides its class.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub statuses: Statuses,
    pub matcher: Matcher,
    pub class: ErrorClass,
    /// What the answer means, for the README.
    pub meaning: &'static str,
}

/// Shorthand for table rows.
pub const fn rule(statuses: Statuses, matcher: Matcher, class: ErrorClass, meaning: &'static str) -> Rule {
    Rule { statuses, matcher, class, meaning }
}

/// The classes of the statuses no row names, the same for every provider: 401, 402 and 403 are
/// the account's; 404 is the target's model or deployment; 408, 409, 425, 429 and 5xx are
/// transient; any other 4xx is the client's; anything else (a 3xx, a 1xx) is transient.
pub fn by_status(status: u16) -> ErrorClass {
    match status {
        401..=403 => ErrorClass::Account { provider_wide: true },
        404 => ErrorClass::Account { provider_wide: false },
        408 | 409 | 425 | 429 => ErrorClass::Transient,
        400..=499 => ErrorClass::Client,
        _ => ErrorClass::Transient,
    }
}

/// The class of an answer with `status`, the `codes` the adapter read from its body and its
/// `message`: the first matching row of `table`, else [`by_status`].
pub fn classify(table: &[Rule], status: u16, codes: &[&str], message: &str) -> ErrorClass {
    let lower = message.to_ascii_lowercase();
    table
        .iter()
        .find(|r| {
            r.statuses.contains(status)
                && match r.matcher {
                    Matcher::Status => true,
                    Matcher::Code(c) => codes.iter().any(|k| k.eq_ignore_ascii_case(c)),
                    Matcher::Message(m) => lower.contains(&m.to_ascii_lowercase()),
                    Matcher::MessageIs(m) => message.trim().eq_ignore_ascii_case(m),
                }
        })
        .map_or_else(|| by_status(status), |r| r.class)
}

/// The [`ProviderError`] for an answer of class `class`. `code` is the provider's own code
/// (kept in the client's error for [`ErrorClass::Client`] and in messages), `message` its error
/// text (already cleaned: no control characters, bounded), `param` the parameter it names.
pub fn to_error(
    class: ErrorClass,
    status: StatusCode,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
    retry_after: Option<std::time::Duration>,
) -> ProviderError {
    let (code, param) = (code.map(field), param.map(field));
    let (code, param) = (code.as_deref(), param.as_deref());
    let coded = |m: &str| match code {
        Some(c) if !c.is_empty() => format!("{c}: {m}"),
        _ => m.to_string(),
    };
    match class {
        ErrorClass::Client => {
            let v = serde_json::json!({"error": {
                "message": format!("upstream rejected the request: {message}"),
                "type": "invalid_request_error",
                "param": param,
                "code": code.filter(|c| !c.is_empty()).unwrap_or("upstream_rejected"),
            }});
            ProviderError::Rejected { status, body: Bytes::from(v.to_string()) }
        }
        ErrorClass::Account { provider_wide } => {
            // A refused key's message may quote the key: never pass it on.
            let text = if matches!(status.as_u16(), 401 | 403) && provider_wide {
                coded("the provider refused the gateway's credentials")
            } else {
                coded(message)
            };
            ProviderError::Account { status, provider_wide, message: text }
        }
        ErrorClass::Content => ProviderError::ContentFiltered(coded(message)),
        ErrorClass::Transient => ProviderError::Status { status, message: coded(message), retry_after },
    }
}

/// The most characters of a provider's `code` or `param` kept ([`to_error`]).
pub const MAX_FIELD_CHARS: usize = 100;

/// A client error from an OpenAI-shaped provider (`{"error": {...}}`), rebuilt as OpenAI's error
/// object: `message` the provider's own text (control and bidi characters left out, at most
/// 300 characters; a generic one when it sent none), `type` its string or
/// `invalid_request_error`, `code` and `param` its strings or null, cut to
/// [`MAX_FIELD_CHARS`]. Whatever else the object held, and fields of other types (a number
/// for `type`, an object for `param`), never reach the client: its SDK reads exactly these four.
pub fn passed_on(status: StatusCode, error: &serde_json::Value) -> ProviderError {
    let text = |k: &str| error.get(k).and_then(serde_json::Value::as_str).map(field).filter(|t| !t.is_empty());
    let message = error
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map(|m| clean(m, 300))
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| "upstream rejected the request (its error named no message)".to_string());
    let v = serde_json::json!({"error": {
        "message": message,
        "type": text("type").unwrap_or_else(|| "invalid_request_error".to_string()),
        "param": text("param"),
        "code": text("code"),
    }});
    ProviderError::Rejected { status, body: Bytes::from(v.to_string()) }
}

/// A provider's `code` or `param` as passed on: without control or bidi characters, at most
/// [`MAX_FIELD_CHARS`] characters (a hostile answer's megabyte code is not forwarded).
fn field(v: &str) -> String {
    clean(v, MAX_FIELD_CHARS)
}

/// `v` without control or bidi characters, cut to `max` characters.
fn clean(v: &str, max: usize) -> String {
    v.chars().filter(|c| !c.is_control() && !crate::is_bidi_control(*c)).take(max).collect()
}

/// One adapter's table with its name, for the README.
pub struct Table {
    pub provider_kind: &'static str,
    /// Where the codes are read from, e.g. "`error.code`, `error.type`".
    pub codes_from: &'static str,
    pub rules: &'static [Rule],
}

/// The README's table, in Markdown: every adapter's rows, then the shared status defaults.
pub fn markdown(tables: &[Table]) -> String {
    let mut out =
        String::from("| provider kind | status | code or message | class | meaning |\n|---|---|---|---|---|\n");
    for t in tables {
        for r in t.rules {
            let what = match r.matcher {
                Matcher::Status => "(any)".to_string(),
                Matcher::Code(c) => format!("`{c}`"),
                Matcher::Message(m) => format!("message contains “{m}”"),
                Matcher::MessageIs(m) => format!("message is “{m}”"),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                t.provider_kind,
                r.statuses.text(),
                what,
                r.class.name(),
                r.meaning
            ));
        }
    }
    for (status, meaning) in [
        (401, "credentials refused"),
        (402, "payment required"),
        (403, "forbidden"),
        (404, "model or deployment not found"),
        (408, "request timeout"),
        (409, "conflict"),
        (429, "rate limited"),
        (400, "any other 4xx"),
        (500, "5xx"),
    ] {
        let label = match status {
            400 => "4xx".to_string(),
            500 => "5xx".to_string(),
            s => s.to_string(),
        };
        out.push_str(&format!(
            "| (every kind, no row above) | {label} | (any) | {} | {meaning} |\n",
            by_status(status).name()
        ));
    }
    out
}

/// Every adapter's table, in the README's order.
pub fn all_tables() -> Vec<Table> {
    vec![
        Table { provider_kind: "openai", codes_from: "`error.code`, `error.type`", rules: super::openai::ERRORS },
        Table {
            provider_kind: "azure_openai",
            codes_from: "`error.code`, `error.inner_error.code`",
            rules: super::azure::ERRORS,
        },
        Table {
            provider_kind: "vertex_imagen",
            codes_from: "`error.status`, `error.details[].reason`",
            rules: super::vertex::ERRORS,
        },
        Table { provider_kind: "stability", codes_from: "`name`", rules: super::stability::ERRORS },
        Table { provider_kind: "fal", codes_from: "`error_type`", rules: super::fal::ERRORS },
        Table { provider_kind: "replicate", codes_from: "`title`", rules: super::replicate::ERRORS },
        Table { provider_kind: "a1111", codes_from: "(none: messages)", rules: super::a1111::ERRORS },
    ]
}

/// The class an adapter gave an error answer, for the adapters' table tests.
#[cfg(test)]
pub(crate) fn class_of(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Rejected { .. } => "client",
        ProviderError::Account { provider_wide: true, .. } => "account",
        ProviderError::Account { provider_wide: false, .. } => "account (target)",
        ProviderError::ContentFiltered(_) => "content",
        ProviderError::Status { .. } => "transient",
        other => panic!("not an answer class: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[Rule] = &[
        rule(
            Statuses::One(400),
            Matcher::Code("billing_hard_limit_reached"),
            ErrorClass::Account { provider_wide: true },
            "billing",
        ),
        rule(Statuses::Range(400, 499), Matcher::Message("safety system"), ErrorClass::Content, "moderation"),
    ];

    #[test]
    fn first_matching_row_wins_then_status_defaults() {
        assert_eq!(classify(T, 400, &["BILLING_HARD_LIMIT_REACHED"], "x"), ErrorClass::Account { provider_wide: true });
        assert_eq!(classify(T, 400, &["other"], "Rejected by our Safety System."), ErrorClass::Content);
        assert_eq!(classify(T, 400, &[], "bad size"), ErrorClass::Client);
        assert_eq!(classify(T, 404, &[], ""), ErrorClass::Account { provider_wide: false });
        assert_eq!(classify(T, 402, &[], ""), ErrorClass::Account { provider_wide: true });
        assert_eq!(classify(T, 429, &[], ""), ErrorClass::Transient);
        assert_eq!(classify(T, 503, &[], ""), ErrorClass::Transient);
        assert_eq!(classify(T, 302, &[], ""), ErrorClass::Transient);
    }

    #[test]
    fn client_errors_keep_the_provider_code_and_param() {
        let e =
            to_error(ErrorClass::Client, StatusCode::BAD_REQUEST, Some("invalid_size"), Some("size"), "bad size", None);
        let ProviderError::Rejected { status, body } = e else { panic!("{e:?}") };
        assert_eq!(status, 400);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_size");
        assert_eq!(v["error"]["param"], "size");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "upstream rejected the request: bad size");
    }

    #[test]
    fn the_readme_has_the_current_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
        // The table sits inside a list item: compare without the indentation.
        let readme: String = readme.lines().map(|l| format!("{}\n", l.trim_start())).collect();
        let table = markdown(&all_tables());
        assert!(readme.contains(&table), "README.md lacks the current provider error table; put this in it:\n{table}");
    }

    #[test]
    fn a_refused_key_message_is_never_passed_on() {
        let e = to_error(
            ErrorClass::Account { provider_wide: true },
            StatusCode::UNAUTHORIZED,
            Some("invalid_api_key"),
            None,
            "Incorrect API key provided: sk-abc123",
            None,
        );
        assert!(!e.to_string().contains("sk-abc123"), "{e}");
        assert!(e.retryable());
    }
}
