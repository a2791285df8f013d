//! `kind = "azure_openai"`: image models deployed on Azure OpenAI.
//!
//! POST `{base_url}/openai/deployments/{deployment}/images/{generations,edits}?api-version=V`,
//! where the deployment is the target's model name, with the key in an `api-key` header. The
//! bodies and answers are the OpenAI Images API's (JSON for generations, multipart for edits);
//! Azure adds its content filter, whose refusals come back as `ContentFiltered`. Azure offers
//! no variations, and no seed, steps, guidance, sampler, negative prompt or `moderation`; the
//! GPT image models' `background`, `output_format`, `output_compression` and (edits)
//! `input_fidelity` pass as the client sent them.

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use serde_json::{Map, Value};

use super::errors::{self, rule, ErrorClass, Matcher, Rule, Statuses};
use super::{key_header, openai, AttemptRequest, Generation, Provider, ProviderError};
use crate::body::ChunkedBody;
use crate::policy::{Connection, UpstreamFormat};
use crate::request::Operation;
use crate::request::Param;
use crate::upstream;

/// The version the policy defaults to as well; used only if a `Connection` comes without one.
const DEFAULT_API_VERSION: &str = "2025-04-01-preview";
/// The first `api-version` with `images/edits` and the GPT image models' fields (the GA
/// 2024-10-21 has generations with dall-e-3's fields only). Versions are dates, so they compare
/// as text.
const GPT_IMAGE_FROM: &str = "2025-04-01-preview";

/// OpenAI fields Azure's image models take that the gateway does not model itself: passed on
/// when the client set them.
const PASSTHROUGH: [&str; 1] = ["user"];
/// The GPT image models' parameters Azure takes, passed as the client sent them unless dropped.
const GPT_IMAGE: [Param; 4] = [Param::Background, Param::OutputFormat, Param::OutputCompression, Param::InputFidelity];

pub struct Azure {
    base_url: String,
    api_version: String,
    /// `Ok(header)` when the key variable is set, `Err(var)` when the policy names one that is not.
    auth: Option<Result<HeaderValue, String>>,
    upstream_format: UpstreamFormat,
}

impl Azure {
    pub fn new(c: &Connection) -> Self {
        Azure {
            base_url: c.base_url.clone(),
            api_version: c.api_version.clone().unwrap_or_else(|| DEFAULT_API_VERSION.to_string()),
            auth: key_header(c.api_key_env.as_deref(), ""),
            upstream_format: c.upstream_format,
        }
    }

    /// Whether the configured `api_version` has `images/edits` and the GPT image fields.
    fn has_gpt_image(&self) -> bool {
        self.api_version.as_str() >= GPT_IMAGE_FROM
    }

    /// The deployment is in the path, so the endpoint is resolved per request.
    fn endpoint(&self, deployment: &str, op: Operation) -> Result<upstream::Endpoint, ProviderError> {
        if deployment.is_empty() {
            return Err(ProviderError::Other("azure_openai needs a deployment name as the target's model".into()));
        }
        let url = format!(
            "{}/openai/deployments/{}/images/{}?api-version={}",
            self.base_url,
            percent_encode(deployment),
            op.path(),
            percent_encode(&self.api_version)
        );
        upstream::Endpoint::parse(&url).map_err(ProviderError::Other)
    }

    /// The request's fields as Azure takes them. Only what the client set is sent, so the
    /// deployment's own defaults apply otherwise; dropped parameters are never sent.
    fn fields(&self, attempt: &AttemptRequest<'_>) -> Map<String, Value> {
        let req = attempt.req;
        let mut m = Map::new();
        m.insert("prompt".into(), req.prompt.clone().into());
        m.insert("n".into(), req.n.into());
        if let Some(size) = req.raw.get("size").filter(|v| v.is_string()) {
            m.insert("size".into(), size.clone());
        }
        if attempt.sends(Param::Quality) {
            m.insert("quality".into(), req.quality.clone().into());
        }
        if attempt.sends(Param::Style) {
            m.insert("style".into(), req.style.clone().into());
        }
        let format = match self.upstream_format {
            UpstreamFormat::B64Json => Some("b64_json"),
            UpstreamFormat::Url => Some("url"),
            UpstreamFormat::Omit => None,
        };
        if let Some(f) = format {
            m.insert("response_format".into(), f.into());
        }
        for key in PASSTHROUGH {
            if let Some(v) = req.raw.get(key).filter(|v| !v.is_null()) {
                m.insert(key.into(), v.clone());
            }
        }
        for p in GPT_IMAGE.into_iter().filter(|p| attempt.sends(*p)) {
            if let Some(v) = req.raw.get(p.name()) {
                m.insert(p.name().into(), v.clone());
            }
        }
        m
    }
}

#[async_trait]
impl Provider for Azure {
    fn supports(&self, param: Param) -> bool {
        matches!(param, Param::Quality | Param::Style) || (GPT_IMAGE.contains(&param) && self.has_gpt_image())
    }

    /// Edits only where the configured `api_version` has them: an older one would answer 404,
    /// so the next target is tried instead.
    fn supports_op(&self, op: Operation) -> bool {
        op == Operation::Generate || (op == Operation::Edit && self.has_gpt_image())
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(var)) => return Err(ProviderError::Credential(format!("environment variable {var} is not set"))),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let req = attempt.req;
        if !self.supports_op(req.op) {
            return Err(ProviderError::Unsupported(format!(
                "azure_openai has no /images/{} at api-version {} (edits from {GPT_IMAGE_FROM})",
                req.op.path(),
                self.api_version
            )));
        }
        let endpoint = self.endpoint(attempt.model, req.op)?;
        let fields = self.fields(attempt);
        let (content_type, body) = match req.op {
            Operation::Generate => {
                let mut body = ChunkedBody::default();
                body.push(serde_json::to_vec(&fields).map_err(|e| ProviderError::Other(e.to_string()))?);
                ("application/json".to_string(), body)
            }
            _ => multipart(&fields, req),
        };
        let mut http_req =
            Request::post("/").header(header::CONTENT_TYPE, content_type).header(header::ACCEPT, "application/json");
        if let Some(h) = auth {
            http_req = http_req.header("api-key", h.clone());
        }
        let http_req = http_req.body(body).map_err(|e| ProviderError::Other(e.to_string()))?;
        let answer =
            upstream::send(&endpoint, http_req, openai::MAX_ANSWER_BYTES).await.map_err(ProviderError::from)?;
        if answer.status.is_success() {
            openai::parse_answer(&answer.body)
        } else {
            Err(classify_error(answer.status, &answer.body.to_bytes(), answer.retry_after))
        }
    }
}

/// A `multipart/form-data` edit: the text fields, then the client's files as the very `Bytes`
/// it sent (not copied), under the field names it used (`image`, `image[]`, `mask`).
fn multipart(fields: &Map<String, Value>, req: &crate::request::GenerationRequest) -> (String, ChunkedBody) {
    let boundary = format!("acc-{}", uuid::Uuid::new_v4().simple());
    let mut body = ChunkedBody::default();
    for (name, value) in fields {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        body.push(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{text}\r\n",
            openai::quote(name)
        ));
    }
    for part in req.images.iter().chain(req.mask.iter()).chain(req.files.iter()) {
        body.push(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
            openai::quote(&part.field),
            openai::quote(&part.filename),
            part.content_type.replace(['\r', '\n'], "")
        ));
        body.push(part.bytes.clone());
        body.push(Bytes::from_static(b"\r\n"));
    }
    body.push(format!("--{boundary}--\r\n"));
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Azure OpenAI's documented error codes (`error.code`, and `inner_error.code` /
/// `innererror.code`) that the status alone does not decide. Sources: learn.microsoft.com's
/// Azure OpenAI REST reference, content filtering and quota pages.
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::One(403),
        Matcher::Message("temporarily blocked"),
        WIDE,
        "the resource is blocked for suspected content-policy abuse (not this request's content)",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("moderation_blocked"),
        ErrorClass::Content,
        "gpt-image's moderation refused the request",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("content_policy_violation"),
        ErrorClass::Content,
        "the content filter refused the prompt or image",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("contentFilter"),
        ErrorClass::Content,
        "the content filter refused the prompt or image",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("content_filter"),
        ErrorClass::Content,
        "the content filter refused the prompt or image",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("ResponsibleAIPolicyViolation"),
        ErrorClass::Content,
        "inner code of a content filter refusal",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("DeploymentNotFound"),
        TARGET,
        "the target's deployment does not exist in this resource",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("OperationNotSupported"),
        TARGET,
        "the deployment's model cannot generate images",
    ),
    rule(Statuses::Any, Matcher::Code("insufficient_quota"), WIDE, "the resource's quota is used up"),
    rule(Statuses::Any, Matcher::Code("QuotaExceeded"), WIDE, "the subscription's quota is used up"),
];

const WIDE: ErrorClass = ErrorClass::Account { provider_wide: true };
const TARGET: ErrorClass = ErrorClass::Account { provider_wide: false };

/// Maps a non-2xx answer by [`ERRORS`]. A content-filter refusal ends the request (another
/// provider would be asked to draw the same thing) with the categories it flagged; a missing
/// deployment, a bad key, 429 and 5xx may be tried elsewhere; any other 4xx is the client's and
/// goes back to it OpenAI-shaped.
fn classify_error(status: StatusCode, body: &Bytes, retry_after: Option<std::time::Duration>) -> ProviderError {
    let json = serde_json::from_slice::<Value>(body).ok();
    let error = json.as_ref().and_then(|v| v.get("error")).filter(|e| e.is_object());
    let message = openai::upstream_message(body);
    let inner = error.and_then(|e| e.get("inner_error").or_else(|| e.get("innererror")));
    let codes: Vec<&str> = [code_of(error), code_of(inner)].into_iter().flatten().collect();
    let param = error.and_then(|e| e.get("param")).and_then(Value::as_str).filter(|s| !s.is_empty());
    match errors::classify(ERRORS, status.as_u16(), &codes, &message) {
        ErrorClass::Content => {
            ProviderError::ContentFiltered(error.and_then(|e| content_filter_reason(e, &message)).unwrap_or(message))
        }
        class => errors::to_error(class, status, code_of(error), param, &message, retry_after),
    }
}

/// The non-empty `code` of an error object.
fn code_of(v: Option<&Value>) -> Option<&str> {
    v.and_then(|c| c.get("code")).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Why Azure's content filter refused, when `error` is such a refusal: its message and the
/// categories it flagged (`sexual`, `violence`, ...).
fn content_filter_reason(error: &Value, message: &str) -> Option<String> {
    let code = |v: Option<&Value>| v.and_then(|c| c.get("code")).and_then(Value::as_str).unwrap_or("").to_string();
    let inner = error.get("inner_error").or_else(|| error.get("innererror"));
    let filtered =
        matches!(code(Some(error)).as_str(), "content_policy_violation" | "contentFilter" | "content_filter")
            || code(inner) == "ResponsibleAIPolicyViolation";
    if !filtered {
        return None;
    }
    let categories: Vec<String> = inner
        .and_then(|i| i.get("content_filter_results"))
        .and_then(Value::as_object)
        .map(|results| {
            results
                .iter()
                .filter(|(_, r)| r.get("filtered").and_then(Value::as_bool) == Some(true))
                .map(|(k, _)| k.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(40).collect())
                .take(10)
                .collect()
        })
        .unwrap_or_default();
    Some(if categories.is_empty() {
        message.to_string()
    } else {
        format!("{message} (filtered: {})", categories.join(", "))
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a 2xx answer, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    let _ = classify_error(status, body, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> ProviderError {
        classify_error(StatusCode::from_u16(status).unwrap(), &Bytes::from(body.to_string()), None)
    }

    #[test]
    fn content_filter_refusals_are_recognised() {
        let dalle = r#"{"error":{"code":"contentFilter","message":"Your task failed as a result of our safety system.",
            "inner_error":{"code":"ResponsibleAIPolicyViolation","content_filter_results":{
            "sexual":{"filtered":true,"severity":"high"},"violence":{"filtered":false,"severity":"safe"}}}}}"#;
        match classify(400, dalle) {
            ProviderError::ContentFiltered(r) => {
                assert!(r.contains("safety system") && r.contains("(filtered: sexual)"), "{r}")
            }
            other => panic!("{other:?}"),
        }
        let newer =
            r#"{"error":{"code":"content_policy_violation","message":"rejected","type":"invalid_request_error"}}"#;
        assert_eq!(classify(400, newer).label(), "content_filtered");
        let inner_only =
            r#"{"error":{"code":"BadRequest","message":"x","innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#;
        assert_eq!(classify(400, inner_only).label(), "content_filtered");
    }

    #[test]
    fn other_errors_are_classified() {
        let e = classify(400, r#"{"error":{"code":"InvalidPayload","message":"size is bad","param":"size"}}"#);
        let ProviderError::Rejected { body, .. } = &e else { panic!("{e:?}") };
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["code"], "InvalidPayload");
        assert_eq!(v["error"]["param"], "size");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("size is bad"));
        assert_eq!(classify(400, "not json").label(), "status_4xx");
        assert!(!classify(400, "not json").retryable());
        let e = classify(401, r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key"}}"#);
        assert!(e.retryable() && !e.to_string().contains("subscription key"), "{e}");
        assert!(classify(404, r#"{"error":{"code":"DeploymentNotFound","message":"no"}}"#).retryable());
        assert_eq!(classify(429, r#"{"error":{"code":"429","message":"slow"}}"#).label(), "status_429");
        assert_eq!(classify(503, "").label(), "status_5xx");
        // A redirect is no answer: labelled a bad response, not the client's 4xx.
        let redirect = classify(302, "");
        assert!(redirect.retryable());
        assert_eq!(redirect.label(), "bad_response");
    }

    #[test]
    fn deployment_and_version_are_encoded() {
        assert_eq!(percent_encode("dall-e-3_v1.2"), "dall-e-3_v1.2");
        assert_eq!(percent_encode("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    /// Each documented error answer (bodies as Azure OpenAI sends them) gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                400,
                r#"{"error":{"code":"content_policy_violation","message":"Your request was rejected as a result of our safety system.","inner_error":{"code":"ResponsibleAIPolicyViolation","content_filter_results":{"sexual":{"filtered":true,"severity":"high"}}},"type":"invalid_request_error"}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":"contentFilter","message":"Your task failed as a result of our safety system."}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":"moderation_blocked","type":"image_generation_user_error","message":"Your request was rejected by the safety system."}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":"OperationNotSupported","message":"The images_generations operation does not work with the specified model, gpt-4o. Please choose different model and try again."}}"#,
                "account (target)",
            ),
            (
                404,
                r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
                "account (target)",
            ),
            (404, r#"{"error":{"code":"404","message":"Resource not found"}}"#, "account (target)"),
            (
                401,
                r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint."}}"#,
                "account",
            ),
            (
                403,
                r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected behavior that may violate our content policy."}}"#,
                "account",
            ),
            (
                429,
                r#"{"error":{"code":"429","message":"Requests to the Images_Generations Operation have exceeded call rate limit. Please retry after 6 seconds."}}"#,
                "transient",
            ),
            (
                400,
                r#"{"error":{"code":"invalid_request_error","param":"size","message":"size must be one of 1024x1024"}}"#,
                "client",
            ),
            (503, "The server is currently overloaded. Please try again later.", "transient"),
        ];
        for (status, body, want) in cases {
            let e = classify_error(StatusCode::from_u16(*status).unwrap(), &Bytes::from_static(body.as_bytes()), None);
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
