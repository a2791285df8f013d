//! `kind = "openai"`: OpenAI's Images API and every server that speaks it.
//! POST `{base_url}/images/generations` with the client's JSON (model rewritten), bearer auth
//! from the environment variable the policy names.

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use serde::Deserialize;

use super::errors::{self, rule, ErrorClass, Matcher, Rule, Statuses};
use super::{skim, AttemptRequest, Generation, Image, Provider, ProviderError};
use crate::body::{ChunkedBody, Rope};
use crate::policy::UpstreamFormat;
use crate::request::{GenerationRequest, Operation, Param};
use crate::upstream;

/// Ten 4096x4096 PNGs in base64 stay below this; anything larger is not an image answer.
pub(crate) const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;

/// OpenAI's own image models, whose parameters the Images API reference fixes (OpenAI answers
/// any other field with 400 `unknown_parameter`). A model of another name is served by another
/// server that speaks the API, and gets the client's fields as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `dall-e-2`.
    DallE2,
    /// `dall-e-3`.
    DallE3,
    /// `gpt-image-1`, `gpt-image-1-mini`, `gpt-image-1.5`, ... (always answers base64; takes no
    /// `response_format` and no `style`).
    GptImage,
}

impl Family {
    /// The family of the upstream model name `model`, when it is one of OpenAI's.
    pub fn of(model: &str) -> Option<Family> {
        match model {
            "dall-e-2" => Some(Family::DallE2),
            "dall-e-3" => Some(Family::DallE3),
            m if m.starts_with("gpt-image") => Some(Family::GptImage),
            _ => None,
        }
    }

    /// Whether the family takes `param` on `op` (Images API reference: `style` is dall-e-3's,
    /// `background`, `output_format`, `output_compression` the GPT image models', `moderation`
    /// theirs on generations and `input_fidelity` on edits; the gateway's extensions, such as
    /// `seed` and `negative_prompt`, are none of theirs).
    pub fn takes(self, param: Param, op: Operation) -> bool {
        match param {
            Param::NegativePrompt | Param::Seed | Param::Steps | Param::Guidance | Param::Sampler => false,
            Param::Quality => op != Operation::Variation,
            Param::Style => self == Family::DallE3 && op == Operation::Generate,
            Param::Background | Param::OutputFormat | Param::OutputCompression => {
                self == Family::GptImage && op != Operation::Variation
            }
            Param::Moderation => self == Family::GptImage && op == Operation::Generate,
            Param::InputFidelity => self == Family::GptImage && op == Operation::Edit,
        }
    }
}

pub struct OpenAi {
    /// `{base_url}/images/{generations,edits,variations}`, resolved once.
    endpoints: Result<[upstream::Endpoint; 3], String>,
    /// `Ok(header)` when the key variable is set, `Err(var)` when the policy names one that is not.
    auth: Option<Result<HeaderValue, String>>,
    upstream_format: UpstreamFormat,
}

impl OpenAi {
    pub fn new(base_url: &str, api_key_env: Option<&str>, upstream_format: UpstreamFormat) -> Self {
        let auth = super::key_header(api_key_env, "Bearer ");
        let endpoint = |op: Operation| upstream::Endpoint::parse(&format!("{base_url}/images/{}", op.path()));
        let endpoints =
            (|| Ok([endpoint(Operation::Generate)?, endpoint(Operation::Edit)?, endpoint(Operation::Variation)?]))();
        OpenAi { endpoints, auth, upstream_format }
    }
}

#[async_trait]
impl Provider for OpenAi {
    /// Servers that speak the OpenAI API get the client's own fields as they are.
    fn supports_op(&self, _op: Operation) -> bool {
        true
    }

    /// `stream` and `partial_images` pass through; the answer is OpenAI's event stream.
    fn streams(&self) -> bool {
        true
    }

    /// Every parameter for a server that speaks the API; for OpenAI's own models
    /// ([`Family`]) only those the model takes on the operation: the others are dropped (and
    /// named in `x-acc-dropped-params`) or refused, as the provider's `unsupported_params` says,
    /// instead of OpenAI refusing the whole request.
    fn supports_value(&self, param: Param, model: &str, req: &GenerationRequest) -> bool {
        Family::of(model).is_none_or(|f| f.takes(param, req.op))
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(var)) => return Err(ProviderError::Credential(format!("environment variable {var} is not set"))),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let req = attempt.req;
        let fields = UpstreamFields {
            raw: &req.raw,
            model: attempt.model,
            response_format: match self.upstream_format {
                // The GPT image models always answer base64 and refuse the field.
                _ if Family::of(attempt.model) == Some(Family::GptImage) => None,
                UpstreamFormat::B64Json => Some("b64_json"),
                UpstreamFormat::Url => Some("url"),
                UpstreamFormat::Omit => None,
            },
            dropped: attempt.dropped,
        };
        let (content_type, body) = match req.op {
            Operation::Generate => {
                let json = serde_json::to_vec(&fields).map_err(|e| ProviderError::Other(e.to_string()))?;
                let mut body = ChunkedBody::default();
                body.push(json);
                ("application/json".to_string(), body)
            }
            Operation::Edit | Operation::Variation => multipart(&fields, req),
        };
        let endpoints = self.endpoints.as_ref().map_err(|e| ProviderError::Other(e.clone()))?;
        let endpoint = &endpoints[req.op as usize];
        let content_type = HeaderValue::try_from(content_type).map_err(|e| ProviderError::Other(e.to_string()))?;
        // Headers inserted into a map sized for them (the request builder re-checked and grew it
        // per header).
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        let h = req.headers_mut();
        h.reserve(4);
        h.insert(header::CONTENT_TYPE, content_type);
        let accept = if attempt.req.stream.is_some() { "text/event-stream" } else { "application/json" };
        h.insert(header::ACCEPT, HeaderValue::from_static(accept));
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.clone());
        }

        // Partial images relayed as they arrive, when the request streams them live.
        let mut relay = attempt
            .partials
            .filter(|_| attempt.req.stream.is_some_and(|p| p > 0))
            .map(|t| t.relay(attempt.req.partials_allowed()));
        let observer = relay.as_mut().map(|r| r as &mut dyn upstream::BodyObserver);
        let answer =
            upstream::send_observed(endpoint, req, MAX_ANSWER_BYTES, observer).await.map_err(ProviderError::from)?;
        let status = answer.status;
        let event_stream = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        if status.is_success() && event_stream {
            match super::events::generation(&answer.body.to_bytes())? {
                super::events::StreamAnswer::Done(g) => Ok(*g),
                // An error event after the 200: classified as OpenAI's 500 with that error body
                // would be (content filter codes decide by code, whatever the status).
                super::events::StreamAnswer::Error(body) => {
                    Err(classify_error(StatusCode::INTERNAL_SERVER_ERROR, body, None))
                }
            }
        } else if status.is_success() {
            parse_answer(&answer.body)
        } else {
            Err(classify_error(status, answer.body.to_bytes(), answer.retry_after))
        }
    }
}

/// The client's fields as the upstream gets them: `model` rewritten, `response_format` as the
/// provider is configured (never to a GPT image model), the gateway's own `acc` field and the
/// parameters the attempt drops left out. Serialised straight from the client's map, without
/// copying it.
struct UpstreamFields<'a> {
    raw: &'a serde_json::Map<String, serde_json::Value>,
    model: &'a str,
    response_format: Option<&'static str>,
    dropped: &'a [Param],
}

impl UpstreamFields<'_> {
    /// The client's own fields that pass through unchanged.
    fn passthrough(&self) -> impl Iterator<Item = (&String, &serde_json::Value)> {
        self.raw.iter().filter(|(k, _)| {
            !matches!(k.as_str(), "model" | "response_format" | "acc") && !self.dropped.iter().any(|p| p.name() == *k)
        })
    }

    fn iter(&self) -> impl Iterator<Item = (&str, serde_json::Value)> + '_ {
        let passthrough = self.passthrough().map(|(k, v)| (k.as_str(), v.clone()));
        let ours = [("model", Some(self.model)), ("response_format", self.response_format)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, serde_json::Value::from(v))));
        passthrough.chain(ours)
    }
}

impl serde::Serialize for UpstreamFields<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.passthrough() {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry("model", self.model)?;
        if let Some(f) = self.response_format {
            map.serialize_entry("response_format", f)?;
        }
        map.end()
    }
}

/// A `multipart/form-data` body: text fields, then the files as the same `Bytes` the client
/// sent (not copied).
fn multipart(fields: &UpstreamFields<'_>, req: &GenerationRequest) -> (String, ChunkedBody) {
    let boundary = format!("acc-{}", uuid::Uuid::new_v4().simple());
    let mut body = ChunkedBody::default();
    for (name, value) in fields.iter() {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        body.push(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{text}\r\n",
            quote(name)
        ));
    }
    for part in req.images.iter().chain(req.mask.iter()).chain(req.files.iter()) {
        body.push(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
            quote(&part.field),
            quote(&part.filename),
            part.content_type.replace(['\r', '\n'], "")
        ));
        body.push(part.bytes.clone());
        body.push(Bytes::from_static(b"\r\n"));
    }
    body.push(format!("--{boundary}--\r\n"));
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub(crate) fn quote(s: &str) -> String {
    s.replace(['"', '\r', '\n'], "_")
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    data: Option<Vec<Item>>,
    /// The response object's other documented fields (`usage`, `background`, ...): kept in
    /// the order of [`super::ANSWER_FIELDS`] when well-formed.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    b64_json: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    revised_prompt: Option<String>,
}

/// Parses a 2xx answer. Base64 payloads stay slices of `body`'s pieces (no copy) and each is
/// walked only by `memchr` and one base64 check (see `skim`).
pub fn parse_answer(body: impl Into<Rope>) -> Result<Generation, ProviderError> {
    let body = body.into();
    let skimmed = skim::skim(&body).map_err(ProviderError::BadResponse)?;
    let answer: Answer = serde_json::from_slice(&skimmed.remainder)
        .map_err(|e| ProviderError::BadResponse(format!("answer is not the expected JSON: {e}")))?;
    let mut items = answer.data.unwrap_or_default();
    if items.is_empty() {
        // An OpenAI-shaped error in a 2xx (some compatible servers answer errors so): read as
        // the 500 it stands for, so its code and message are kept (content filter codes decide
        // by code, whatever the status).
        if answer.rest.get("error").is_some_and(serde_json::Value::is_object) {
            return Err(classify_error(StatusCode::INTERNAL_SERVER_ERROR, body.to_bytes(), None));
        }
        return Err(ProviderError::BadResponse("answer holds no images".into()));
    }
    let mut images = Vec::with_capacity(items.len());
    let mut revised_prompts = Vec::new();
    if items.iter().any(|i| i.revised_prompt.is_some()) {
        // DALL·E 3's revised prompts are often longer than the skim's cut (a long string).
        for (i, item) in items.iter_mut().enumerate() {
            let text = item.revised_prompt.take().map(|p| skimmed.text(p)).transpose();
            revised_prompts
                .push(text.map_err(|e| ProviderError::BadResponse(format!("data[{i}].revised_prompt: {e}")))?);
        }
    }
    for (i, item) in items.into_iter().enumerate() {
        let image = match (item.b64_json, item.url) {
            (Some(b64), _) => match skim::base64_value(skimmed.resolve(&b64)) {
                Some(bytes) => Image::Base64(bytes),
                None => {
                    return Err(ProviderError::BadResponse(format!(
                        "data[{i}].b64_json is not valid base64 (truncated or corrupt)"
                    )))
                }
            },
            (None, Some(url)) => match skim::url_value(skimmed.resolve(&url), super::MAX_IMAGE_URL_BYTES) {
                Some(u) => Image::Url(u),
                None => {
                    return Err(ProviderError::BadResponse(format!(
                        "data[{i}].url is longer than {} bytes",
                        super::MAX_IMAGE_URL_BYTES
                    )))
                }
            },
            (None, None) => return Err(ProviderError::BadResponse(format!("data[{i}] has neither b64_json nor url"))),
        };
        images.push(image);
    }
    let mut rest = answer.rest;
    let mut answer_fields = Vec::new();
    for &k in super::ANSWER_FIELDS.iter() {
        let Some(mut v) = rest.remove(k) else { continue };
        if super::well_formed_answer_field(k, &v) {
            skimmed.restore(&mut v).map_err(|e| ProviderError::BadResponse(format!("{k}: {e}")))?;
            answer_fields.push((k, v));
        }
    }
    Ok(Generation { images, answer_fields, revised_prompts, ..Default::default() })
}

/// OpenAI's documented error codes (`error.code`, else `error.type`) that the status alone
/// does not decide. Sources: platform.openai.com/docs/guides/error-codes and the Images API
/// reference; `moderation_blocked` and the "safety system" message are gpt-image-1's and
/// DALL·E's refusals.
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::Any,
        Matcher::Code("content_policy_violation"),
        ErrorClass::Content,
        "the prompt or image was refused by OpenAI's content filter",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("moderation_blocked"),
        ErrorClass::Content,
        "gpt-image's moderation refused the request",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("safety system"),
        ErrorClass::Content,
        "\"rejected as a result of our safety system\"",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("blocked by our content filters"),
        ErrorClass::Content,
        "\"This request has been blocked by our content filters\"",
    ),
    rule(Statuses::Any, Matcher::Code("billing_hard_limit_reached"), WIDE, "the account's billing limit is reached"),
    rule(
        Statuses::Any,
        Matcher::Code("insufficient_quota"),
        WIDE,
        "the account's quota or credit is used up (a 429 that waiting does not fix)",
    ),
    rule(Statuses::Any, Matcher::Code("billing_not_active"), WIDE, "the account has no active billing"),
    rule(
        Statuses::Any,
        Matcher::Code("credit_balance_exhausted"),
        WIDE,
        "prepaid credit is used up (429, type insufficient_quota)",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("organization_spend_limit_exceeded"),
        WIDE,
        "the organization's spend limit is reached",
    ),
    rule(Statuses::Any, Matcher::Code("project_spend_limit_exceeded"), WIDE, "the project's spend limit is reached"),
    rule(
        Statuses::Any,
        Matcher::Code("organization_usage_limit_exceeded"),
        WIDE,
        "the organization's usage limit is reached",
    ),
    rule(
        Statuses::One(429),
        Matcher::Message("Limit: 0/1min"),
        WIDE,
        "the account's tier has no image access (a rate limit of zero)",
    ),
    rule(Statuses::Any, Matcher::Code("invalid_api_key"), WIDE, "the key is wrong or revoked"),
    rule(Statuses::Any, Matcher::Code("account_deactivated"), WIDE, "the account is deactivated"),
    rule(
        Statuses::Any,
        Matcher::Code("unsupported_country_region_territory"),
        WIDE,
        "the account's region is not served",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("model_not_found"),
        TARGET,
        "the target's model does not exist or the account has no access",
    ),
    rule(
        Statuses::One(403),
        Matcher::Message("must be verified"),
        TARGET,
        "the organization must be verified to use this model",
    ),
    rule(
        Statuses::One(403),
        Matcher::Message("not allowed to sample from this model"),
        TARGET,
        "the account has no access to this model",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("rate_limit_exceeded"),
        ErrorClass::Transient,
        "requests or images per minute exceeded",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("image_generation_user_error"),
        ErrorClass::Client,
        "the request cannot be drawn as asked",
    ),
];

const WIDE: ErrorClass = ErrorClass::Account { provider_wide: true };
const TARGET: ErrorClass = ErrorClass::Account { provider_wide: false };

/// Maps a non-2xx answer by [`ERRORS`]: the client's own mistakes are passed back as the
/// provider sent them (when OpenAI-shaped), the account's and transient ones may be tried
/// elsewhere. Messages keep only the upstream's error text, never its headers or our key.
fn classify_error(status: StatusCode, body: Bytes, retry_after: Option<std::time::Duration>) -> ProviderError {
    let message = upstream_message(&body);
    let v = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let error = v.as_ref().and_then(|v| v.get("error")).filter(|e| e.is_object());
    let text = |k: &str| error.and_then(|e| e.get(k)).and_then(|c| c.as_str()).filter(|c| !c.is_empty());
    let codes: Vec<&str> = [text("code"), text("type")].into_iter().flatten().collect();
    let class = errors::classify(ERRORS, status.as_u16(), &codes, &message);
    match class {
        // OpenAI-shaped already: the client gets the provider's fields, as OpenAI's shape.
        ErrorClass::Client if error.is_some() => errors::passed_on(status, error.unwrap_or(&serde_json::Value::Null)),
        _ => errors::to_error(class, status, text("code"), text("param"), &message, retry_after),
    }
}

pub(crate) fn upstream_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned));
    super::error_text(from_json, body)
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a 2xx answer, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    let _ = parse_answer(body);
    let _ = super::events::generation(body);
    let _ = classify_error(status, body.clone(), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_stays_a_slice_of_the_body() {
        let big = "QUJD".repeat(1000);
        let text = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{big}"}},{{"url":"https://x/y.png"}},{{"b64_json":"aGVs\/bG8"}},{{"b64_json":"aGk="}}]}}"#
        );
        let body = Bytes::from(text);
        let g = parse_answer(&body).unwrap();
        match &g.images[0] {
            Image::Base64(b) => {
                assert_eq!(&b.to_bytes()[..], big.as_bytes());
                let start = b.pieces()[0].as_ptr() as usize - body.as_ptr() as usize;
                assert!(start < body.len(), "payload is a slice of the upstream body");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&g.images[1], Image::Url(u) if u == "https://x/y.png"));
        // An escaped slash is unescaped; short payloads are plain values.
        assert!(matches!(&g.images[2], Image::Base64(b) if b.to_bytes()[..] == b"aGVs/bG8"[..]));
        assert!(matches!(&g.images[3], Image::Base64(b) if b.to_bytes()[..] == b"aGk="[..]));
    }

    /// An error object in a 2xx answer keeps the provider's words and code: a content filter's
    /// code is a content filter refusal, any other error a 500 with its message.
    #[test]
    fn an_error_in_a_success_answer_is_read_as_the_error() {
        let e = parse_answer(Bytes::from_static(br#"{"error":{"message":"the GPU fell over","type":"server_error"}}"#))
            .unwrap_err();
        assert_eq!(e.label(), "status_5xx");
        assert!(e.to_string().contains("the GPU fell over"), "{e}");
        let filtered = br#"{"error":{"message":"refused","code":"content_policy_violation"}}"#;
        assert_eq!(parse_answer(Bytes::from_static(filtered)).unwrap_err().label(), "content_filtered");
        let e = parse_answer(Bytes::from_static(br#"{"created":1,"data":[]}"#)).unwrap_err();
        assert_eq!(e.to_string(), "bad response: answer holds no images");
    }

    /// Every string kept from an answer is the provider's text, however long: the skim cuts
    /// strings of 256 bytes or more out of the document, and a kept one came back as its
    /// placeholder (`"\u00001"`), DALL·E 3's revised prompts included.
    #[test]
    fn long_strings_outside_the_payloads_are_kept_whole() {
        let prompt = format!("A lighthouse at dusk, \\\"Keep off\\\" \\u00e9 {}", "and gulls ".repeat(40));
        let want = format!("A lighthouse at dusk, \"Keep off\" é {}", "and gulls ".repeat(40));
        let detail = "x".repeat(300);
        let big = "QUJD".repeat(100);
        let text = format!(
            r#"{{"data":[{{"b64_json":"{big}","revised_prompt":"{prompt}"}},{{"b64_json":"aGk=","revised_prompt":"short"}}],
               "usage":{{"total_tokens":5,"input_tokens_details":{{"note":"{detail}"}}}},"quality":"{detail}"}}"#
        );
        let g = parse_answer(Bytes::from(text)).unwrap();
        assert_eq!(g.revised_prompts, vec![Some(want), Some("short".to_string())]);
        let fields: std::collections::HashMap<_, _> = g.answer_fields.into_iter().collect();
        assert_eq!(fields["usage"]["input_tokens_details"]["note"], serde_json::json!(detail));
        assert_eq!(fields["quality"], serde_json::json!(detail));
        // A long revised prompt that is not valid JSON text fails as a short one would.
        let bad = format!(r#"{{"data":[{{"b64_json":"aGk=","revised_prompt":"{}\q"}}]}}"#, "y".repeat(300));
        assert_eq!(parse_answer(Bytes::from(bad)).unwrap_err().label(), "bad_response");
    }

    /// A helper's finding: `usage` was passed on whatever it held; the SDKs typed `1e308`, `-1`
    /// or `"lots"` as token counts. Out of shape, it is left out; the images still go.
    #[test]
    fn usage_out_of_shape_is_left_out() {
        let usage = |u: &str| {
            let text = format!(r#"{{"data":[{{"b64_json":"aGk="}}],"usage":{u},"size":"1024x1024"}}"#);
            let g = parse_answer(Bytes::from(text)).unwrap();
            let fields: std::collections::HashMap<_, _> = g.answer_fields.into_iter().collect();
            assert_eq!(fields["size"], serde_json::json!("1024x1024"));
            fields.get("usage").cloned()
        };
        let good = r#"{"total_tokens":100,"input_tokens":50,"output_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40}}"#;
        assert_eq!(usage(good), Some(serde_json::from_str(good).unwrap()));
        for bad in [
            r#"{"total_tokens":1e308}"#,
            r#"{"total_tokens":-1}"#,
            r#"{"total_tokens":"lots"}"#,
            r#"{"output_tokens":18446744073709551616}"#,
            r#"{"input_tokens_details":{"image_tokens":2.5}}"#,
            r#"{"input_tokens_details":7}"#,
            r#"[1,2]"#,
        ] {
            assert_eq!(usage(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_answers_are_bad_responses() {
        for body in [
            &b"<html>oops</html>"[..],
            br#"{"data":[]}"#,
            br#"{"data":[{"b64_json":"aGVsbG8"}]}"#,
            br#"{"data":[{"b64_json":"!!!!"}]}"#,
            br#"{"data":[{"b64_json":"aGVs"#,
            br#"{"data":[{"b64_json":5}]}"#,
            br#"{"data":[{}]}"#,
        ] {
            let e = parse_answer(Bytes::copy_from_slice(body)).unwrap_err();
            assert_eq!(e.label(), "bad_response", "{}", String::from_utf8_lossy(body));
        }
    }

    /// A client error is passed on in OpenAI's shape whatever the provider put in it: strings
    /// or null in the four fields, bounded, without control or bidi characters.
    #[test]
    fn client_errors_are_passed_on_in_openai_shape() {
        let body = |v: serde_json::Value| Bytes::from(v.to_string());
        let json = |e: ProviderError| match e {
            ProviderError::Rejected { status, body } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                serde_json::from_slice::<serde_json::Value>(&body).unwrap()
            }
            other => panic!("{other:?}"),
        };
        // As OpenAI sends it: unchanged.
        let plain = serde_json::json!({"error": {"message": "Invalid size '5x5'.", "type": "invalid_request_error",
            "param": "size", "code": "invalid_value"}});
        assert_eq!(json(classify_error(StatusCode::BAD_REQUEST, body(plain.clone()), None)), plain);
        // Huge fields, control characters and an ANSI escape: cut and cleaned.
        let huge = serde_json::json!({"error": {"message": format!("bad\u{1b}[31m\u{0}{}", "m".repeat(10_000)),
            "type": "invalid_request_error", "param": "p".repeat(500), "code": "c".repeat(500), "extra": "x"}});
        let e = json(classify_error(StatusCode::BAD_REQUEST, body(huge), None));
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("bad[31mmmm") && message.chars().count() == 300, "{message}");
        assert_eq!(e["error"]["param"].as_str().unwrap().len(), errors::MAX_FIELD_CHARS);
        assert_eq!(e["error"]["code"].as_str().unwrap().len(), errors::MAX_FIELD_CHARS);
        assert_eq!(e["error"].as_object().unwrap().len(), 4, "{e}");
        // Fields of the wrong types: OpenAI's shape anyway.
        let odd = serde_json::json!({"error": {"message": null, "type": 5, "code": ["x"], "param": {"a": 1}}});
        assert_eq!(
            json(classify_error(StatusCode::BAD_REQUEST, body(odd), None)),
            serde_json::json!({"error": {"message": "upstream rejected the request (its error named no message)",
                "type": "invalid_request_error", "param": null, "code": null}})
        );
    }

    #[test]
    fn errors_are_classified() {
        let e =
            classify_error(StatusCode::BAD_REQUEST, Bytes::from_static(br#"{"error":{"message":"bad prompt"}}"#), None);
        assert!(!e.retryable());
        assert!(matches!(e, ProviderError::Rejected { ref body, .. } if body.starts_with(b"{\"error\"")));
        let e = classify_error(StatusCode::TOO_MANY_REQUESTS, Bytes::from_static(b"slow down"), None);
        assert!(e.retryable());
        assert_eq!(e.label(), "status_429");
        assert_eq!(e.to_string(), "upstream answered 429 Too Many Requests: slow down");
        let e = classify_error(
            StatusCode::UNAUTHORIZED,
            Bytes::from_static(br#"{"error":{"message":"Incorrect API key sk-123"}}"#),
            None,
        );
        assert!(e.retryable());
        assert!(!e.to_string().contains("sk-123"));
    }

    /// Each documented error answer (bodies as OpenAI sends them) gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                400,
                r#"{"error":{"code":"billing_hard_limit_reached","type":"invalid_request_error","message":"Billing hard limit has been reached","param":null}}"#,
                "account",
            ),
            (
                429,
                r#"{"error":{"code":"insufficient_quota","type":"insufficient_quota","message":"You exceeded your current quota, please check your plan and billing details."}}"#,
                "account",
            ),
            (
                429,
                r#"{"error":{"code":"credit_balance_exhausted","type":"insufficient_quota","message":"Your credit balance is exhausted."}}"#,
                "account",
            ),
            (
                429,
                r#"{"error":{"code":"rate_limit_exceeded","type":"requests","message":"Rate limit exceeded for images per minute in organization org-x. Limit: 0/1min. Current: 1/1min."}}"#,
                "account",
            ),
            (
                429,
                r#"{"error":{"code":"rate_limit_exceeded","type":"requests","message":"Rate limit exceeded for images per minute in organization org-x. Limit: 5/1min. Current: 6/1min."}}"#,
                "transient",
            ),
            (
                401,
                r#"{"error":{"code":"invalid_api_key","type":"invalid_request_error","message":"Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys."}}"#,
                "account",
            ),
            (
                403,
                r#"{"error":{"code":"unsupported_country_region_territory","type":"request_forbidden","message":"Country, region, or territory not supported"}}"#,
                "account",
            ),
            (
                403,
                r#"{"error":{"code":null,"type":"invalid_request_error","message":"Your organization must be verified to use the model `gpt-image-1`."}}"#,
                "account (target)",
            ),
            (
                404,
                r#"{"error":{"code":"model_not_found","type":"invalid_request_error","message":"The model `gpt-image-9` does not exist or you do not have access to it."}}"#,
                "account (target)",
            ),
            (
                400,
                r#"{"error":{"code":"content_policy_violation","type":"invalid_request_error","message":"Your request was rejected as a result of our safety system."}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":"moderation_blocked","type":"image_generation_user_error","message":"Your request was rejected by the safety system. safety_violations=[violence]."}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":"invalid_size","type":"invalid_request_error","param":"size","message":"The size is not supported by this model."}}"#,
                "client",
            ),
            (400, r#"{"error":{"code":null,"type":"image_generation_user_error","message":null}}"#, "client"),
            (
                500,
                r#"{"error":{"code":null,"type":"server_error","message":"The server had an error while processing your request."}}"#,
                "transient",
            ),
            (503, "The engine is currently overloaded. Please try again later.", "transient"),
        ];
        for (status, body, want) in cases {
            let e = classify_error(StatusCode::from_u16(*status).unwrap(), Bytes::from_static(body.as_bytes()), None);
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
            assert!(!e.to_string().contains("sk-abc"), "{e}");
        }
    }
}
