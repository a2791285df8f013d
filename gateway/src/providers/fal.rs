//! `kind = "fal"`: fal.ai's queue API. The job is submitted with POST `{base_url}/{model_id}`
//! (`Authorization: Key ...`), its status polled with backoff until `COMPLETED`, and its result
//! read from the response URL: image URLs at fal's CDN, which the proxy fetches (SSRF-guarded)
//! when it needs the bytes. A job left behind (client gone, deadline passed, hedge lost) is
//! cancelled with PUT `.../requests/{id}/cancel`.
//!
//! `output_format` png or jpeg passes as the FLUX models' `output_format` (which has no webp:
//! webp is dropped or refused by the policy); `background`, `output_compression`, `moderation`
//! and `input_fidelity` have no equivalent.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::errors::{rule, ErrorClass, Matcher, Rule, Statuses};
use super::{jobs, AttemptRequest, Generation, Image, Provider, ProviderError, Settings};
use crate::policy::Connection;
use crate::request::{GenerationRequest, OutputFormat, Param};

pub struct Fal {
    /// `https://queue.fal.run` unless the policy says otherwise.
    base_url: String,
    /// `scheme://authority` of `base_url`: the only origin the key is ever sent to.
    origin: Option<String>,
    /// `Ok(header)` when the key variable is set, `Err(var)` when the policy names one that is not.
    auth: Option<Result<HeaderValue, String>>,
    first_poll: Duration,
    max_poll: Duration,
}

impl Fal {
    pub fn new(c: &Connection) -> Self {
        Fal {
            base_url: c.base_url.clone(),
            origin: jobs::origin(&c.base_url),
            auth: super::key_header(c.api_key_env.as_deref(), "Key "),
            first_poll: c.poll_interval,
            max_poll: c.max_poll_interval,
        }
    }
}

/// The model's input, as fal's image models name their fields.
#[derive(Serialize)]
struct Input<'a> {
    prompt: &'a str,
    image_size: ImageSize,
    num_images: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    negative_prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_inference_steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance_scale: Option<f64>,
    enable_safety_checker: bool,
    /// `png` or `jpeg` (fal's FLUX models default to jpeg).
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'static str>,
}

#[derive(Serialize)]
struct ImageSize {
    width: u32,
    height: u32,
}

/// The answer to a submission.
#[derive(Deserialize)]
struct Queued {
    request_id: String,
    #[serde(default)]
    status_url: Option<String>,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    cancel_url: Option<String>,
}

#[derive(Deserialize)]
struct QueueStatus {
    status: String,
    /// Set when the request failed (with `COMPLETED`): a text, sometimes an object.
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    metrics: Option<StatusMetrics>,
}

#[derive(Deserialize)]
struct StatusMetrics {
    #[serde(default)]
    inference_time: Option<f64>,
}

#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    images: Vec<OutputImage>,
    #[serde(default)]
    seed: Option<serde_json::Value>,
    #[serde(default)]
    has_nsfw_concepts: Vec<bool>,
    #[serde(default)]
    timings: Option<Timings>,
}

#[derive(Deserialize)]
struct OutputImage {
    url: String,
    /// `image/png` or `image/jpeg` (fal's File objects carry it).
    #[serde(default)]
    content_type: Option<String>,
}

#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    inference: Option<f64>,
}

#[async_trait]
impl Provider for Fal {
    /// Its 2xx answers are a job's submission and polls, not the images.
    fn bills_on_answer(&self) -> bool {
        false
    }

    fn supports(&self, param: Param) -> bool {
        !matches!(
            param,
            Param::Quality
                | Param::Style
                | Param::Sampler
                | Param::Background
                | Param::OutputCompression
                | Param::Moderation
                | Param::InputFidelity
        )
    }

    /// fal's FLUX models write PNG or JPEG.
    fn supports_value(&self, param: Param, _model: &str, req: &GenerationRequest) -> bool {
        match param {
            Param::OutputFormat => req.output_format != Some(OutputFormat::Webp),
            p => self.supports(p),
        }
    }

    /// More than [`jobs::MAX_IMAGES_PER_JOB`] images run as several jobs at once
    /// ([`jobs::in_jobs`]).
    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        jobs::in_jobs(attempt, |n, seed| self.job(attempt, n, seed)).await
    }
}

impl Fal {
    /// One job of `n` images with `seed`.
    async fn job(&self, attempt: &AttemptRequest<'_>, n: u32, seed: Option<u64>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(var)) => return Err(ProviderError::Credential(format!("environment variable {var} is not set"))),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let model = attempt.model;
        let app = app_id(model).ok_or_else(|| {
            ProviderError::Other(format!("{:?} is not a fal model id (owner/app[/path])", jobs::clean(model)))
        })?;
        let req = attempt.req;
        let input = Input {
            prompt: &req.prompt,
            image_size: ImageSize { width: req.size.width, height: req.size.height },
            num_images: n,
            seed,
            negative_prompt: req.negative_prompt.as_deref().filter(|_| attempt.sends(Param::NegativePrompt)),
            num_inference_steps: req.steps.filter(|_| attempt.sends(Param::Steps)),
            guidance_scale: req.guidance_scale.filter(|_| attempt.sends(Param::Guidance)),
            enable_safety_checker: true,
            output_format: req.output_format.filter(|_| attempt.sends(Param::OutputFormat)).map(OutputFormat::name),
        };
        let json = serde_json::to_vec(&input).map_err(|e| ProviderError::Other(e.to_string()))?;

        // 1. Submit.
        let answer = jobs::call(Method::POST, &format!("{}/{model}", self.base_url), auth, Some(json)).await?;
        if !answer.status.is_success() {
            return Err(error(answer.status, answer.retry_after, &answer.body.to_bytes()));
        }
        let queued: Queued = jobs::parse(&answer.body.to_bytes(), "submission")?;
        let id = queued.request_id;
        if !jobs::valid_id(&id) {
            return Err(ProviderError::BadResponse("the submission's request_id is not a plain id".into()));
        }
        // fal keeps a request under its app (owner/alias), whatever path the model has.
        let at = |tail: &str| format!("{}/{app}/requests/{id}{tail}", self.base_url);
        let origin = self.origin.as_deref();
        let status_url = jobs::same_origin_or(queued.status_url, origin, || at("/status"));
        let response_url = jobs::same_origin_or(queued.response_url, origin, || at(""));
        let cancel_url = jobs::same_origin_or(queued.cancel_url, origin, || at("/cancel"));
        let mut guard = jobs::CancelOnDrop::new("fal", Method::PUT, cancel_url, auth.cloned());

        // 2. Poll until the queue says it is done.
        let mut backoff = jobs::Backoff::new(self.first_poll, self.max_poll);
        let status = loop {
            backoff.wait().await;
            let answer = backoff.poll(jobs::call(Method::GET, &status_url, auth, None)).await?;
            let Some(answer) = answer else { continue };
            if !answer.status.is_success() {
                let e = error(answer.status, answer.retry_after, &answer.body.to_bytes());
                if backoff.tolerates(&e) {
                    continue;
                }
                return Err(e);
            }
            let s: QueueStatus = jobs::parse(&answer.body.to_bytes(), "status")?;
            match s.status.as_str() {
                "IN_QUEUE" | "IN_PROGRESS" => continue,
                _ => break s,
            }
        };
        guard.disarm();
        let failed = status.error.as_ref().map(error_text);
        let fail = |why: Option<String>| {
            let why = why.unwrap_or_default();
            let kind = status.error_type.as_deref().unwrap_or_default();
            if is_content_policy(&why) || is_content_policy(kind) {
                return ProviderError::ContentFiltered(jobs::clean(&why));
            }
            ProviderError::Status {
                status: StatusCode::BAD_GATEWAY,
                message: format!("the fal job ended with {}: {}", jobs::clean(&status.status), jobs::clean(&why)),
                retry_after: None,
            }
        };
        if status.status != "COMPLETED" {
            return Err(fail(failed));
        }

        // 3. The result (for a failed job, its error answer says best whose fault it was).
        let answer = jobs::call(Method::GET, &response_url, auth, None).await?;
        if !answer.status.is_success() {
            return Err(error(answer.status, answer.retry_after, &answer.body.to_bytes()));
        }
        if failed.is_some() {
            return Err(fail(failed));
        }
        let output: Output = jobs::parse(&answer.body.to_bytes(), "result")?;
        let mut generation = generation(output)?;
        if generation.gpu_seconds.is_none() {
            generation.gpu_seconds = status.metrics.and_then(|m| m.inference_time).filter(|s| s.is_finite());
        }
        Ok(generation)
    }
}

/// The images of a completed job. Images fal's safety checker flagged are blacked out by it:
/// they are left out (fal bills them: they are charged as discarded, `surplus`), and a job
/// whose every image was flagged is a content-filter refusal.
fn generation(output: Output) -> Result<Generation, ProviderError> {
    if output.images.is_empty() {
        return Err(ProviderError::BadResponse("the fal result holds no images".into()));
    }
    let flagged = |i: usize| output.has_nsfw_concepts.get(i).copied().unwrap_or(false);
    let total = output.images.len();
    let answer_fields = super::output_format_field(output.images.iter().map(|i| i.content_type.as_deref()));
    let mut images = Vec::with_capacity(total);
    for (i, image) in output.images.into_iter().enumerate() {
        if image.url.is_empty() {
            return Err(ProviderError::BadResponse(format!("images[{i}].url is empty")));
        }
        if !flagged(i) {
            images.push(Image::Url(image.url));
        }
    }
    if images.is_empty() {
        return Err(ProviderError::ContentFiltered("fal's safety checker flagged every image".into()));
    }
    if images.len() < total {
        tracing::info!(flagged = total - images.len(), "fal's safety checker flagged images; they are left out");
    }
    let surplus = (total - images.len()) as u32;
    Ok(Generation {
        images,
        surplus,
        settings: Settings { seed: output.seed.as_ref().and_then(super::reported_seed), ..Default::default() },
        gpu_seconds: output.timings.and_then(|t| t.inference).filter(|s| s.is_finite() && *s >= 0.0),
        answer_fields,
        ..Default::default()
    })
}

/// `owner/alias` of a model id `owner/alias[/path...]`, or `None` when it is not a safe path.
fn app_id(model: &str) -> Option<&str> {
    let segments: Vec<&str> = model.split('/').collect();
    let safe = |s: &&str| {
        !s.is_empty() && *s != "." && *s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if segments.len() < 2 || !segments.iter().all(safe) {
        return None;
    }
    Some(&model[..segments[0].len() + 1 + segments[1].len()])
}

/// fal's error answers that the status alone does not decide (`error_type`, the message).
/// Sources: docs.fal.ai (queue API errors, the model APIs' 422 validation shape); a content
/// policy refusal is a `detail[].type` of `content_policy_violation` (matched before this table).
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("exhausted balance"),
        WIDE,
        "the account's balance is used up (\"User is locked. Reason: Exhausted balance\")",
    ),
    rule(Statuses::Range(400, 499), Matcher::Message("user is locked"), WIDE, "the account is locked"),
    rule(
        Statuses::Any,
        Matcher::Code("content_policy_violation"),
        ErrorClass::Content,
        "the prompt or image was refused by fal's content policy",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("downstream_service_error"),
        ErrorClass::Transient,
        "a partner API behind the model failed",
    ),
];

const WIDE: ErrorClass = ErrorClass::Account { provider_wide: true };

/// Maps a non-2xx answer. fal's validation errors (422) carry `{"detail": [{"loc", "msg",
/// "type"}]}`; its request errors `{"detail": "...", "error_type": "..."}`.
fn error(status: StatusCode, retry_after: Option<Duration>, body: &Bytes) -> ProviderError {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok();
    let detail = v.as_ref().and_then(|v| v.get("detail"));
    let mut filtered = false;
    let message = match detail {
        Some(serde_json::Value::Array(items)) => {
            let parts: Vec<String> = items
                .iter()
                .take(5)
                .map(|item| {
                    let kind = item.get("type").and_then(|t| t.as_str()).unwrap_or_default();
                    filtered |= is_content_policy(kind);
                    let field = item
                        .get("loc")
                        .and_then(|l| l.as_array())
                        .and_then(|l| l.last())
                        .and_then(|f| f.as_str())
                        .map(|f| format!("{f}: "))
                        .unwrap_or_default();
                    format!("{field}{}", item.get("msg").map(error_text).unwrap_or_default())
                })
                .collect();
            parts.join("; ")
        }
        Some(d) => error_text(d),
        None => match v.as_ref().and_then(|v| v.get("error")) {
            Some(e) => error_text(e),
            None => String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned(),
        },
    };
    let message = jobs::clean(&message);
    if filtered && status.is_client_error() {
        return ProviderError::ContentFiltered(message);
    }
    let error_type = v.as_ref().and_then(|v| v.get("error_type")).and_then(|t| t.as_str());
    jobs::classify(ERRORS, status, error_type.as_slice(), retry_after, message)
}

/// An error value as text: a string as is, an object's `message`/`msg`/`detail`, else its JSON.
fn error_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("message")
            .or_else(|| o.get("msg"))
            .or_else(|| o.get("detail"))
            .and_then(|m| m.as_str())
            .map_or_else(|| v.to_string(), str::to_owned),
        other => other.to_string(),
    }
}

fn is_content_policy(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("content_policy") || t.contains("content policy") || t.contains("nsfw")
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a finished job, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    if let Ok(output) = serde_json::from_slice::<Output>(body) {
        let _ = generation(output);
    }
    let _ = error(status, None, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_are_the_first_two_segments_of_safe_model_ids() {
        assert_eq!(app_id("fal-ai/flux/dev"), Some("fal-ai/flux"));
        assert_eq!(app_id("fal-ai/fast-sdxl"), Some("fal-ai/fast-sdxl"));
        for bad in ["flux", "fal-ai//dev", "fal-ai/../x", "fal-ai/flux?x=1", "/fal-ai/flux", "fal ai/flux"] {
            assert_eq!(app_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_are_classified() {
        let body = Bytes::from_static(
            br#"{"detail":[{"loc":["body","num_images"],"msg":"must be at most 4","type":"value_error"}]}"#,
        );
        match error(StatusCode::UNPROCESSABLE_ENTITY, None, &body) {
            ProviderError::Rejected { status, body } => {
                assert_eq!(status, 422);
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "upstream_rejected");
                assert!(v["error"]["message"].as_str().unwrap().contains("num_images: must be at most 4"), "{v}");
            }
            other => panic!("{other:?}"),
        }
        let body = Bytes::from_static(br#"{"detail":[{"msg":"flagged","type":"content_policy_violation"}]}"#);
        assert_eq!(error(StatusCode::UNPROCESSABLE_ENTITY, None, &body).label(), "content_filtered");
        let e = error(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(3)), &Bytes::from_static(b"slow"));
        assert!(matches!(e, ProviderError::Status { retry_after: Some(d), .. } if d == Duration::from_secs(3)));
        let e = error(StatusCode::UNAUTHORIZED, None, &Bytes::from_static(br#"{"detail":"bad key abc-123"}"#));
        assert!(e.retryable() && !e.to_string().contains("abc-123"), "{e}");
        let e = error(StatusCode::SERVICE_UNAVAILABLE, None, &Bytes::from_static(br#"{"detail":"no runner"}"#));
        assert_eq!((e.label(), e.retryable()), ("status_5xx", true));
    }

    #[test]
    fn flagged_images_are_left_out_and_all_flagged_is_filtered() {
        let out = |flags: Vec<bool>| Output {
            images: vec![
                OutputImage { url: "https://x/a.png".into(), content_type: Some("image/png".into()) },
                OutputImage { url: "https://x/b.png".into(), content_type: Some("image/png".into()) },
            ],
            seed: Some(serde_json::json!(42)),
            has_nsfw_concepts: flags,
            timings: Some(Timings { inference: Some(1.25) }),
        };
        let g = generation(out(vec![false, true])).unwrap();
        assert!(matches!(&g.images[..], [Image::Url(u)] if u == "https://x/a.png"));
        assert_eq!((g.settings.seed, g.gpu_seconds), (Some(42), Some(1.25)));
        assert_eq!(generation(out(vec![])).unwrap().images.len(), 2);
        assert_eq!(generation(out(vec![true, true])).unwrap_err().label(), "content_filtered");
        // The images' content type is the response object's output_format when they agree.
        assert_eq!(g.answer_fields, vec![("output_format", serde_json::json!("png"))]);
        let mixed = Output {
            images: vec![
                OutputImage { url: "https://x/a.png".into(), content_type: Some("image/png".into()) },
                OutputImage { url: "https://x/b.jpg".into(), content_type: Some("image/jpeg".into()) },
            ],
            seed: None,
            has_nsfw_concepts: vec![],
            timings: None,
        };
        assert!(generation(mixed).unwrap().answer_fields.is_empty());
    }

    #[test]
    fn job_urls_stay_on_the_providers_origin() {
        let base = jobs::origin("https://queue.fal.run");
        let doc = || "https://queue.fal.run/a/b/requests/1/status".to_string();
        let own = "https://queue.fal.run/a/b/requests/1/status?x=1".to_string();
        assert_eq!(jobs::same_origin_or(Some(own.clone()), base.as_deref(), doc), own);
        let elsewhere = Some("https://evil.example/steal".to_string());
        assert_eq!(jobs::same_origin_or(elsewhere, base.as_deref(), doc), doc());
        assert!(jobs::valid_id("764cabcf-b745-4b3e-ae38-1200304cf45b"));
        assert!(!jobs::valid_id("../x") && !jobs::valid_id(""));
    }

    /// Each documented error answer gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                422,
                r#"{"detail":[{"loc":["body","prompt"],"msg":"The content could not be processed because it contained material flagged by a content checker.","type":"content_policy_violation"}]}"#,
                "content",
            ),
            (
                422,
                r#"{"detail":[{"loc":["body","image_size"],"msg":"Input should be greater than 0","type":"greater_than"}]}"#,
                "client",
            ),
            (
                403,
                r#"{"detail":"User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."}"#,
                "account",
            ),
            (403, r#"{"detail":"User is locked. Reason: Admin lock. Please contact support@fal.ai"}"#, "account"),
            (401, r#"{"detail":"Unauthorized"}"#, "account"),
            (404, r#"{"detail":"Application 'x' not found"}"#, "account (target)"),
            (400, r#"{"detail":"Partner API failed","error_type":"downstream_service_error"}"#, "transient"),
            (504, r#"{"detail":"Request timed out","error_type":"request_timeout"}"#, "transient"),
            (429, r#"{"detail":"Too many concurrent requests"}"#, "transient"),
        ];
        for (status, body, want) in cases {
            let e = error(StatusCode::from_u16(*status).unwrap(), None, &Bytes::from_static(body.as_bytes()));
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
