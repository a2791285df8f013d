//! `kind = "replicate"`: Replicate's predictions API. A prediction is created with POST
//! `{base_url}/models/{owner}/{name}/predictions` (model `owner/name`) or `{base_url}/predictions`
//! with `"version"` (model `owner/name:version`), bearer auth; it is polled with backoff until it
//! succeeds, fails or is canceled, and its output URLs are handed to the proxy, which fetches
//! them (SSRF-guarded) when it needs the bytes. A prediction left behind (client gone, deadline
//! passed, hedge lost) is cancelled with POST `.../predictions/{id}/cancel`.
//!
//! The image models' `output_format` (`png`, `jpg`, `webp`; png unless the client asks) and
//! `output_quality` (0-100, from `output_compression`) carry the GPT image parameters of the same
//! meaning; `background`, `moderation`, `input_fidelity` have no equivalent.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::errors::{rule, ErrorClass, Matcher, Rule, Statuses};
use super::jobs;
use super::{AttemptRequest, Generation, Image, Provider, ProviderError, Settings};
use crate::policy::Connection;
use crate::request::{OutputFormat, Param};

pub struct Replicate {
    /// `https://api.replicate.com/v1` unless the policy says otherwise.
    base_url: String,
    /// `scheme://authority` of `base_url`: the only origin the token is ever sent to.
    origin: Option<String>,
    /// `Ok(header)` when the token variable is set, `Err(var)` when the policy names one that is not.
    auth: Option<Result<HeaderValue, String>>,
    first_poll: Duration,
    max_poll: Duration,
}

impl Replicate {
    pub fn new(c: &Connection) -> Self {
        Replicate {
            base_url: c.base_url.clone(),
            origin: jobs::origin(&c.base_url),
            auth: super::key_header(c.api_key_env.as_deref(), "Bearer "),
            first_poll: c.poll_interval,
            max_poll: c.max_poll_interval,
        }
    }
}

#[derive(Serialize)]
struct Create<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    input: Input<'a>,
}

/// The model's input, as the common image models on Replicate name their fields (models ignore
/// the ones they do not have).
#[derive(Serialize)]
struct Input<'a> {
    prompt: &'a str,
    num_outputs: u32,
    width: u32,
    height: u32,
    /// For models that take a ratio instead of a size (the FLUX family).
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_ratio: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    negative_prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_inference_steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance_scale: Option<f64>,
    /// The same guidance under the FLUX family's name for it (black-forest-labs/flux-dev's
    /// `guidance`); each model reads the one it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance: Option<f64>,
    output_format: &'static str,
    /// JPEG and WebP quality, 0-100.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_quality: Option<u8>,
}

#[derive(Deserialize)]
struct Prediction {
    id: String,
    status: String,
    #[serde(default)]
    output: serde_json::Value,
    #[serde(default)]
    error: serde_json::Value,
    #[serde(default)]
    urls: Option<Urls>,
    #[serde(default)]
    metrics: Option<Metrics>,
    #[serde(default)]
    logs: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize, Default)]
struct Urls {
    #[serde(default)]
    get: Option<String>,
    #[serde(default)]
    cancel: Option<String>,
}

#[derive(Deserialize)]
struct Metrics {
    #[serde(default)]
    predict_time: Option<f64>,
}

/// What the policy's model name says to run.
#[derive(Debug, PartialEq)]
enum Model<'a> {
    /// `owner/name`: the model's current version.
    Official { owner: &'a str, name: &'a str },
    /// `owner/name:version`.
    Version { version: &'a str },
}

impl<'a> Model<'a> {
    fn parse(model: &'a str) -> Option<Model<'a>> {
        let (name, version) = match model.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (model, None),
        };
        let (owner, short) = name.split_once('/')?;
        let safe = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !(safe(owner) && safe(short)) {
            return None;
        }
        match version {
            None => Some(Model::Official { owner, name: short }),
            Some(v) if jobs::valid_id(v) => Some(Model::Version { version: v }),
            Some(_) => None,
        }
    }
}

#[async_trait]
impl Provider for Replicate {
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
                | Param::Moderation
                | Param::InputFidelity
        )
    }

    /// More than [`jobs::MAX_IMAGES_PER_JOB`] images run as several jobs at once
    /// ([`jobs::in_jobs`]).
    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        jobs::in_jobs(attempt, |n, seed| self.job(attempt, n, seed)).await
    }
}

impl Replicate {
    /// One job of `n` images with `seed`.
    async fn job(&self, attempt: &AttemptRequest<'_>, n: u32, seed: Option<u64>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(var)) => return Err(ProviderError::Credential(format!("environment variable {var} is not set"))),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let model = Model::parse(attempt.model).ok_or_else(|| {
            ProviderError::Other(format!(
                "{:?} is not a Replicate model (owner/name or owner/name:version)",
                jobs::clean(attempt.model)
            ))
        })?;
        let req = attempt.req;
        let (url, version) = match model {
            Model::Official { owner, name } => (format!("{}/models/{owner}/{name}/predictions", self.base_url), None),
            Model::Version { version, .. } => (format!("{}/predictions", self.base_url), Some(version)),
        };
        let create = Create {
            version,
            input: Input {
                prompt: &req.prompt,
                num_outputs: n,
                width: req.size.width,
                height: req.size.height,
                aspect_ratio: aspect_ratio(req.size.width, req.size.height),
                seed,
                negative_prompt: req.negative_prompt.as_deref().filter(|_| attempt.sends(Param::NegativePrompt)),
                num_inference_steps: req.steps.filter(|_| attempt.sends(Param::Steps)),
                guidance_scale: req.guidance_scale.filter(|_| attempt.sends(Param::Guidance)),
                guidance: req.guidance_scale.filter(|_| attempt.sends(Param::Guidance)),
                output_format: match req.output_format.filter(|_| attempt.sends(Param::OutputFormat)) {
                    None | Some(OutputFormat::Png) => "png",
                    Some(OutputFormat::Jpeg) => "jpg",
                    Some(OutputFormat::Webp) => "webp",
                },
                output_quality: req.output_compression.filter(|_| attempt.sends(Param::OutputCompression)),
            },
        };
        let json = serde_json::to_vec(&create).map_err(|e| ProviderError::Other(e.to_string()))?;

        // 1. Create the prediction.
        let answer = jobs::call(Method::POST, &url, auth, Some(json)).await?;
        if !answer.status.is_success() {
            return Err(error(answer.status, answer.retry_after, &answer.body.to_bytes()));
        }
        let mut prediction: Prediction = jobs::parse(&answer.body.to_bytes(), "prediction")?;
        let id = prediction.id.clone();
        if !jobs::valid_id(&id) {
            return Err(ProviderError::BadResponse("the prediction's id is not a plain id".into()));
        }
        let urls = prediction.urls.take().unwrap_or_default();
        let origin = self.origin.as_deref();
        let get_url = jobs::same_origin_or(urls.get, origin, || format!("{}/predictions/{id}", self.base_url));
        let cancel_url =
            jobs::same_origin_or(urls.cancel, origin, || format!("{}/predictions/{id}/cancel", self.base_url));
        let mut guard = jobs::CancelOnDrop::new("replicate", Method::POST, cancel_url, auth.cloned());

        // 2. Poll until it ends (it may have ended already).
        let mut backoff = jobs::Backoff::new(self.first_poll, self.max_poll);
        while matches!(prediction.status.as_str(), "starting" | "processing") {
            backoff.wait().await;
            let Some(answer) = backoff.poll(jobs::call(Method::GET, &get_url, auth, None)).await? else { continue };
            if !answer.status.is_success() {
                let e = error(answer.status, answer.retry_after, &answer.body.to_bytes());
                if backoff.tolerates(&e) {
                    continue;
                }
                return Err(e);
            }
            prediction = jobs::parse(&answer.body.to_bytes(), "prediction")?;
        }
        guard.disarm();
        finished(prediction, attempt.model)
    }
}

/// A prediction that has ended: its outputs, or why there are none.
fn finished(p: Prediction, model: &str) -> Result<Generation, ProviderError> {
    let error_text = match &p.error {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => jobs::clean(s),
        other => jobs::clean(&other.to_string()),
    };
    match p.status.as_str() {
        "succeeded" => {}
        "failed" if error_text.to_ascii_lowercase().contains("nsfw") => {
            return Err(ProviderError::ContentFiltered(error_text))
        }
        other => {
            return Err(ProviderError::Status {
                status: StatusCode::BAD_GATEWAY,
                message: format!("the prediction ended {}: {error_text}", jobs::clean(other)),
                retry_after: None,
            })
        }
    }
    let urls: Vec<&serde_json::Value> = match &p.output {
        serde_json::Value::Array(items) => items.iter().collect(),
        serde_json::Value::String(_) => vec![&p.output],
        _ => Vec::new(),
    };
    if urls.is_empty() {
        return Err(ProviderError::BadResponse("the prediction succeeded without output".into()));
    }
    let mut images = Vec::with_capacity(urls.len());
    for (i, u) in urls.into_iter().enumerate() {
        match u.as_str() {
            Some(u) if !u.is_empty() => images.push(Image::Url(u.to_string())),
            _ => return Err(ProviderError::BadResponse(format!("output[{i}] is not a URL"))),
        }
    }
    let name = p.model.as_deref().unwrap_or_else(|| model.split(':').next().unwrap_or(model));
    // Output files are named by format (`out-0.webp`): the response object's output_format.
    let answer_fields = super::output_format_field(images.iter().map(url_extension));
    Ok(Generation {
        images,
        answer_fields,
        settings: Settings {
            seed: p.logs.as_deref().and_then(seed_in_logs),
            model: p.version.as_deref().filter(|v| jobs::valid_id(v)).map(|v| format!("{name}:{v}")),
            ..Default::default()
        },
        gpu_seconds: p.metrics.and_then(|m| m.predict_time).filter(|s| s.is_finite() && *s >= 0.0),
        ..Default::default()
    })
}

/// The seed a model reports in its logs (`Using seed: 1234`, as most image models print it).
fn seed_in_logs(logs: &str) -> Option<u64> {
    let lower = logs.to_ascii_lowercase();
    lower.match_indices("seed").find_map(|(at, _)| {
        let rest = lower[at + 4..].trim_start_matches([' ', ':', '=']);
        let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())];
        digits.parse().ok()
    })
}

/// The aspect ratio to ask of models that take a ratio instead of a size: `width:height`'s,
/// or the nearest the FLUX family lists.
fn aspect_ratio(width: u32, height: u32) -> Option<&'static str> {
    const RATIOS: [(u32, u32, &str); 11] = [
        (1, 1, "1:1"),
        (16, 9, "16:9"),
        (9, 16, "9:16"),
        (4, 3, "4:3"),
        (3, 4, "3:4"),
        (3, 2, "3:2"),
        (2, 3, "2:3"),
        (5, 4, "5:4"),
        (4, 5, "4:5"),
        (21, 9, "21:9"),
        (9, 21, "9:21"),
    ];
    // The nearest of the ratios FLUX takes (black-forest-labs/flux-dev's `aspect_ratio` list): a
    // size it does not list exactly (1792x1024 is 7:4) is drawn at the closest shape, not at
    // the model's default 1:1.
    let pairs: Vec<(u32, u32)> = RATIOS.iter().map(|&(w, h, _)| (w, h)).collect();
    let nearest = super::vertex::nearest_ratio(width, height, &pairs);
    RATIOS.iter().find(|&&(w, h, _)| (w, h) == nearest).map(|r| r.2)
}

/// Replicate's error answers that the status alone does not decide (problem details' `title`,
/// the `detail` message). Source: replicate.com/docs/reference/http (errors are RFC 7807 problem
/// details; 401, 402, 404, 422, 429). A failed prediction whose error says NSFW is a content
/// filter answer (read from the prediction, not from here).
pub const ERRORS: &[Rule] = &[
    rule(Statuses::Any, Matcher::Code("Insufficient credit"), WIDE, "the account's credit is used up (402)"),
    rule(Statuses::Any, Matcher::Code("Billing required"), WIDE, "the account needs billing set up (402)"),
    rule(Statuses::Any, Matcher::Code("Invalid version or not permitted"), TARGET, "the target's model version does not exist or the account may not use it (a 422 that is not the request's fault)"),
    rule(Statuses::Range(400, 499), Matcher::Message("version does not exist"), TARGET, "the target's model version does not exist"),
    rule(Statuses::Range(400, 499), Matcher::Message("nsfw"), ErrorClass::Content, "the input was flagged as NSFW"),
];

const WIDE: ErrorClass = ErrorClass::Account { provider_wide: true };
const TARGET: ErrorClass = ErrorClass::Account { provider_wide: false };

/// The file extension of a URL image's path (`png` of `https://x/out-0.png?sig=1`).
fn url_extension(image: &Image) -> Option<&str> {
    match image {
        Image::Url(u) => u.split(['?', '#']).next().and_then(|path| path.rsplit_once('.')).map(|(_, ext)| ext),
        _ => None,
    }
}

/// Maps a non-2xx answer by [`ERRORS`]. Replicate's errors are problem details: `{"title", "detail",
/// "status"}`, with `invalid_fields` on a 422.
fn error(status: StatusCode, retry_after: Option<Duration>, body: &Bytes) -> ProviderError {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok();
    let text = |k: &str| v.as_ref().and_then(|v| v.get(k)).and_then(|d| d.as_str()).map(str::to_owned);
    let mut message = text("detail")
        .or_else(|| text("title"))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned());
    if let Some(fields) = v.as_ref().and_then(|v| v.get("invalid_fields")).and_then(|f| f.as_array()) {
        for f in fields.iter().take(5) {
            let field = f.get("field").and_then(|x| x.as_str()).unwrap_or_default();
            let what = f.get("description").and_then(|x| x.as_str()).unwrap_or_default();
            message.push_str(&format!("; {field}: {what}"));
        }
    }
    let title = text("title");
    jobs::classify(ERRORS, status, title.as_deref().as_slice(), retry_after, jobs::clean(&message))
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a prediction, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    if let Ok(p) = serde_json::from_slice::<Prediction>(body) {
        let _ = finished(p, "model");
    }
    let _ = error(status, None, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(json: serde_json::Value) -> Prediction {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn output_files_name_the_output_format() {
        let done = |output: serde_json::Value| {
            finished(prediction(serde_json::json!({"id": "p", "status": "succeeded", "output": output})), "a/b")
                .unwrap()
        };
        let g = done(serde_json::json!(["https://r.example/out-0.webp?sig=1", "https://r.example/out-1.webp"]));
        assert_eq!(g.answer_fields, vec![("output_format", serde_json::json!("webp"))]);
        let g = done(serde_json::json!("https://r.example/out-0.JPG"));
        assert_eq!(g.answer_fields, vec![("output_format", serde_json::json!("jpeg"))]);
        assert!(done(serde_json::json!(["https://r.example/a.png", "https://r.example/b.webp"]))
            .answer_fields
            .is_empty());
        assert!(done(serde_json::json!(["https://r.example/file"])).answer_fields.is_empty());
    }

    #[test]
    fn models_and_versions_are_parsed() {
        assert_eq!(
            Model::parse("black-forest-labs/flux-schnell"),
            Some(Model::Official { owner: "black-forest-labs", name: "flux-schnell" })
        );
        assert_eq!(Model::parse("stability-ai/sdxl:39ed52f2a78e"), Some(Model::Version { version: "39ed52f2a78e" }));
        for bad in ["sdxl", "a/b/c", "a/../b", "a/b:", "a/b:x/y", "/b"] {
            assert_eq!(Model::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ended_predictions_map_to_images_or_errors() {
        let g = finished(
            prediction(serde_json::json!({"id": "p1", "status": "succeeded", "output": ["https://x/0.png", "https://x/1.png"],
                "metrics": {"predict_time": 2.5}, "logs": "Using seed: 31337\nstep 1/4", "model": "acme/sdxl", "version": "abc"})),
            "acme/sdxl",
        )
        .unwrap();
        assert_eq!(g.images.len(), 2);
        assert_eq!(g.gpu_seconds, Some(2.5));
        assert_eq!(g.settings.seed, Some(31337));
        assert_eq!(g.settings.model.as_deref(), Some("acme/sdxl:abc"));
        let one = prediction(serde_json::json!({"id": "p", "status": "succeeded", "output": "https://x/0.png"}));
        assert!(matches!(&finished(one, "a/b").unwrap().images[..], [Image::Url(u)] if u == "https://x/0.png"));
        let nsfw = prediction(serde_json::json!({"id": "p", "status": "failed",
            "error": "NSFW content detected. Try running it again, or try a different prompt."}));
        assert_eq!(finished(nsfw, "a/b").unwrap_err().label(), "content_filtered");
        let failed = prediction(serde_json::json!({"id": "p", "status": "failed", "error": "CUDA out of memory"}));
        let e = finished(failed, "a/b").unwrap_err();
        assert!(e.retryable() && e.to_string().contains("CUDA out of memory"), "{e}");
        let canceled = prediction(serde_json::json!({"id": "p", "status": "canceled"}));
        assert_eq!(finished(canceled, "a/b").unwrap_err().label(), "status_5xx");
        let empty = prediction(serde_json::json!({"id": "p", "status": "succeeded", "output": null}));
        assert_eq!(finished(empty, "a/b").unwrap_err().label(), "bad_response");
    }

    #[test]
    fn seeds_ratios_and_errors() {
        assert_eq!(seed_in_logs("loading\nUsing seed: 42\n"), Some(42));
        assert_eq!(seed_in_logs("Random seed set to 7"), None);
        assert_eq!(seed_in_logs("seed=9"), Some(9));
        assert_eq!(aspect_ratio(1024, 1024), Some("1:1"));
        // Not a listed ratio: the nearest (7:4 is nearest 16:9).
        assert_eq!(aspect_ratio(1344, 768), Some("16:9"));
        assert_eq!(aspect_ratio(1792, 1024), Some("16:9"));
        assert_eq!(aspect_ratio(1024, 1792), Some("9:16"));
        assert_eq!(aspect_ratio(1536, 864), Some("16:9"));
        let body = Bytes::from_static(
            br#"{"detail":"- input.num_outputs: Must be less than or equal to 4","status":422,"title":"Input validation failed","invalid_fields":[{"type":"less_than_equal","field":"input.num_outputs","description":"Must be less than or equal to 4"}]}"#,
        );
        let e = error(StatusCode::UNPROCESSABLE_ENTITY, None, &body);
        assert!(matches!(e, ProviderError::Rejected { status, .. } if status == 422));
        let e = error(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(5)), &Bytes::new());
        assert!(matches!(e, ProviderError::Status { retry_after: Some(d), .. } if d == Duration::from_secs(5)));
    }

    /// Each documented error answer (problem details) gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                401,
                r#"{"title":"Unauthenticated","detail":"You did not pass an authentication token","status":401}"#,
                "account",
            ),
            (
                402,
                r#"{"title":"Billing required","detail":"You need to set up billing to run this model.","status":402}"#,
                "account",
            ),
            (
                402,
                r#"{"title":"Insufficient credit","detail":"You have insufficient credit to run this model.","status":402}"#,
                "account",
            ),
            (404, r#"{"detail":"Not found."}"#, "account (target)"),
            (
                422,
                r#"{"title":"Invalid version or not permitted","detail":"The specified version does not exist (or perhaps you don't have permission to use it?)","status":422}"#,
                "account (target)",
            ),
            (
                422,
                r#"{"title":"Input validation failed","detail":"- input.width: Must be less than or equal to 1440","status":422}"#,
                "client",
            ),
            (
                429,
                r#"{"detail":"Request was throttled. Your rate limit resets in ~5s.","status":429,"retry_after":5}"#,
                "transient",
            ),
            (500, r#"{"detail":"Internal server error"}"#, "transient"),
        ];
        for (status, body, want) in cases {
            let e = error(StatusCode::from_u16(*status).unwrap(), None, &Bytes::from_static(body.as_bytes()));
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
