//! `kind = "vertex_imagen"`: Imagen on Google Cloud Vertex AI.
//!
//! POST `{base_url}/projects/{project}/locations/{location}/publishers/google/models/{model}:predict`
//! with `{"instances":[{"prompt"}],"parameters":{..}}` and an OAuth2 bearer token, taken from the
//! environment variable `token_env` or printed by `token_command` (cached for 50 minutes, and
//! fetched again once when the API answers 401).
//!
//! What Imagen cannot do:
//! - Sizes: it draws one of five aspect ratios (1:1, 3:4, 4:3, 9:16, 16:9) at its own fixed
//!   resolution (1024x1024, 896x1280, 1280x896, 768x1408, 1408x768 on Imagen 3). The nearest
//!   ratio to the requested size is asked for; any other size comes back at that resolution, and
//!   the sanity evaluator flags the difference when the client asked for an exact size.
//! - More than 4 images per call: `sampleCount` is capped at 4 and fewer images come back.
//! - Steps, guidance, sampler, quality and style are not parameters of `:predict` (dropped),
//!   nor are `background` and `input_fidelity`.
//!   `negativePrompt` is only honoured by older models; newer ones ignore it.
//! - `output_format` becomes `outputOptions.mimeType` (`image/png` or `image/jpeg`: Imagen has
//!   no WebP, so webp is dropped or refused by the policy) and `output_compression` on JPEG
//!   becomes `outputOptions.compressionQuality`. `moderation: "low"` (less restrictive)
//!   becomes `safetySetting: "block_only_high"`; `auto` keeps Imagen's default.
//! - A seed only applies without the invisible watermark, so `addWatermark: false` goes with it.
//!   Imagen does not report the seed it used.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::errors::{self, rule, ErrorClass, Matcher, Rule, Statuses};
use super::{skim, AttemptRequest, Generation, Image, Provider, ProviderError};
use crate::body::{ChunkedBody, Rope};
use crate::policy::Connection;
use crate::request::{GenerationRequest, OutputFormat, Param};
use crate::upstream;

/// Four 2048x2048 PNGs in base64 stay well below this.
const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;
/// The most images one `:predict` call returns.
const MAX_SAMPLES: u32 = 4;
/// Access tokens printed by `gcloud auth print-access-token` live an hour; refreshing after
/// 50 minutes keeps a request from going out with one about to expire.
const TOKEN_TTL: Duration = Duration::from_secs(50 * 60);
/// A token command that hangs must not hold attempts forever.
const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The aspect ratios Imagen draws.
const RATIOS: [(u32, u32); 5] = [(1, 1), (3, 4), (4, 3), (9, 16), (16, 9)];

pub struct Vertex {
    /// `{base_url}/projects/{project}/locations/{location}/publishers/google/models/`; the model
    /// and `:predict` follow per request.
    models_url: String,
    token: TokenSource,
}

impl Vertex {
    pub fn new(c: &Connection) -> Self {
        let project = c.project.as_deref().unwrap_or_default();
        let location = c.location.as_deref().unwrap_or_default();
        Vertex {
            models_url: format!(
                "{}/projects/{project}/locations/{location}/publishers/google/models/",
                c.base_url.trim_end_matches('/')
            ),
            token: TokenSource {
                env: c.token_env.clone(),
                command: c.token_command.clone(),
                cached: std::sync::Mutex::new(None),
                refresh: tokio::sync::Mutex::new(()),
            },
        }
    }
}

#[async_trait]
impl Provider for Vertex {
    fn supports(&self, param: Param) -> bool {
        matches!(
            param,
            Param::NegativePrompt | Param::Seed | Param::OutputFormat | Param::OutputCompression | Param::Moderation
        )
    }

    /// Imagen writes PNG or JPEG, and compresses JPEG only; a negative prompt only the models
    /// before Imagen 3's GA take ([`takes_negative_prompt`]).
    fn supports_value(&self, param: Param, model: &str, req: &GenerationRequest) -> bool {
        match param {
            Param::OutputFormat | Param::OutputCompression => req.output_format != Some(OutputFormat::Webp),
            Param::NegativePrompt => takes_negative_prompt(model),
            p => self.supports(p),
        }
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let model = attempt.model;
        if model.is_empty() || !model.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')) {
            return Err(ProviderError::Other(format!("\"{model}\" is not a Vertex AI model id")));
        }
        let endpoint =
            upstream::Endpoint::parse(&format!("{}{model}:predict", self.models_url)).map_err(ProviderError::Other)?;
        let body = Bytes::from(predict_body(attempt).to_string());

        let (token, refreshable) = self.token.get(None).await?;
        let mut answer = predict(&endpoint, body.clone(), token.clone()).await?;
        if answer.status == StatusCode::UNAUTHORIZED && refreshable {
            // The cached token was revoked or expired early: one fresh token, one more try.
            let (fresh, _) = self.token.get(Some(&token)).await?;
            answer = predict(&endpoint, body, fresh).await?;
        }
        if answer.status.is_success() {
            parse_answer(&answer.body)
        } else {
            Err(classify_error(answer.status, &answer.body.to_bytes(), answer.retry_after))
        }
    }
}

async fn predict(
    endpoint: &upstream::Endpoint,
    body: Bytes,
    token: HeaderValue,
) -> Result<upstream::Answer, ProviderError> {
    let mut chunked = ChunkedBody::default();
    chunked.push(body);
    let req = Request::post("/")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .header(header::AUTHORIZATION, token)
        .body(chunked)
        .map_err(|e| ProviderError::Other(e.to_string()))?;
    upstream::send(endpoint, req, MAX_ANSWER_BYTES).await.map_err(ProviderError::from)
}

/// The `:predict` request: only what the request sets and this attempt may send.
fn predict_body(attempt: &AttemptRequest<'_>) -> serde_json::Value {
    let req = attempt.req;
    let (w, h) = nearest_ratio(req.size.width, req.size.height, &RATIOS);
    let mut parameters = json!({
        "sampleCount": req.n.clamp(1, MAX_SAMPLES),
        "aspectRatio": format!("{w}:{h}"),
        "includeRaiReason": true,
        "outputOptions": {"mimeType": "image/png"},
    });
    if attempt.sends(Param::OutputFormat) {
        if let Some(f) = req.output_format {
            parameters["outputOptions"]["mimeType"] = json!(f.mime());
        }
    }
    // Only reaches here with jpeg: the request refuses compression for png, and webp is dropped.
    if attempt.sends(Param::OutputCompression) && parameters["outputOptions"]["mimeType"] == "image/jpeg" {
        parameters["outputOptions"]["compressionQuality"] = json!(req.output_compression);
    }
    if attempt.sends(Param::Moderation) && req.moderation == Some("low") {
        parameters["safetySetting"] = json!("block_only_high");
    }
    if attempt.sends(Param::NegativePrompt) {
        parameters["negativePrompt"] = json!(req.negative_prompt);
    }
    if attempt.sends(Param::Seed) {
        parameters["seed"] = json!(req.seed);
        parameters["addWatermark"] = json!(false);
    }
    json!({"instances": [{"prompt": req.prompt}], "parameters": parameters})
}

/// Whether the Imagen `model` takes `negativePrompt`: Imagen 1 and 2 (`imagegeneration@...`) and
/// the Imagen 3 models before its GA (`imagen-3.0-generate-001`, `imagen-3.0-fast-generate-001`,
/// `imagen-3.0-capability-001`). Later ones (`imagen-3.0-generate-002`, Imagen 4) answer 400
/// INVALID_ARGUMENT "Setting negativePrompt is no longer supported" (Vertex AI, "Omit content
/// using a negative prompt"), so for them the parameter is dropped or refused as the provider's
/// `unsupported_params` says.
pub fn takes_negative_prompt(model: &str) -> bool {
    model.starts_with("imagegeneration@")
        || matches!(model, "imagen-3.0-generate-001" | "imagen-3.0-fast-generate-001" | "imagen-3.0-capability-001")
}

/// The ratio of `ratios` nearest to `width:height` (compared in log space, so 2:1 and 1:2 are
/// equally far from 1:1).
pub(crate) fn nearest_ratio(width: u32, height: u32, ratios: &[(u32, u32)]) -> (u32, u32) {
    let want = (f64::from(width.max(1)) / f64::from(height.max(1))).ln();
    let distance = |&(a, b): &(u32, u32)| (want - (f64::from(a) / f64::from(b)).ln()).abs();
    ratios.iter().copied().min_by(|x, y| distance(x).total_cmp(&distance(y))).unwrap_or((1, 1))
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    predictions: Vec<Prediction>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Prediction {
    #[serde(default)]
    bytes_base64_encoded: Option<String>,
    #[serde(default)]
    rai_filtered_reason: Option<String>,
    /// `image/png` or `image/jpeg`.
    #[serde(default)]
    mime_type: Option<String>,
    /// The enhanced prompt Imagen drew from (when prompt enhancement is on).
    #[serde(default)]
    prompt: Option<String>,
}

/// Parses a 2xx answer; image payloads stay slices of `body` (see `skim`). A filtered image is
/// a prediction with only a reason; when every image was filtered the attempt is refused with
/// the reasons, and fewer images than asked are returned as they are.
fn parse_answer(body: impl Into<Rope>) -> Result<Generation, ProviderError> {
    let skimmed = skim::skim(&body.into()).map_err(ProviderError::BadResponse)?;
    let answer: Answer = serde_json::from_slice(&skimmed.remainder)
        .map_err(|e| ProviderError::BadResponse(format!("answer is not the expected JSON: {e}")))?;
    let mut images = Vec::with_capacity(answer.predictions.len());
    let mut reasons: Vec<String> = Vec::new();
    let mut revised_prompts = Vec::new();
    let mut formats = Vec::new();
    for (i, mut p) in answer.predictions.into_iter().enumerate() {
        // Enhanced prompts and reasons may be longer than the skim's cut.
        let text = |field: &str, v: Option<String>| {
            v.map(|v| skimmed.text(v))
                .transpose()
                .map_err(|e| ProviderError::BadResponse(format!("predictions[{i}].{field}: {e}")))
        };
        p.prompt = text("prompt", p.prompt)?;
        p.rai_filtered_reason = text("raiFilteredReason", p.rai_filtered_reason)?;
        p.mime_type = text("mimeType", p.mime_type)?;
        match (p.bytes_base64_encoded, p.rai_filtered_reason) {
            (Some(b64), _) => match skim::base64_value(skimmed.resolve(&b64)) {
                Some(bytes) => {
                    images.push(Image::Base64(bytes));
                    revised_prompts.push(p.prompt.filter(|s| !s.is_empty()));
                    formats.push(p.mime_type.as_deref().and_then(|m| m.strip_prefix("image/")).map(str::to_owned));
                }
                None => {
                    return Err(ProviderError::BadResponse(format!(
                        "predictions[{i}].bytesBase64Encoded is not valid base64 (truncated or corrupt)"
                    )))
                }
            },
            (None, Some(reason)) => reasons.push(reason.chars().filter(|c| !c.is_control()).take(300).collect()),
            (None, None) => {
                return Err(ProviderError::BadResponse(format!(
                    "predictions[{i}] has neither bytesBase64Encoded nor raiFilteredReason"
                )))
            }
        }
    }
    if images.is_empty() {
        if reasons.is_empty() {
            // Imagen leaves filtered images out silently only when no reason was asked for, and
            // every request asks (`includeRaiReason`): an answer with neither images nor reasons
            // (`{}`, an empty list, an error object with a 200) is broken, not a verdict on the
            // prompt, so the next target is tried and the client is not told its prompt was
            // refused.
            return Err(ProviderError::BadResponse(
                "the answer has no predictions (no image and no raiFilteredReason)".to_string(),
            ));
        }
        return Err(ProviderError::ContentFiltered(reasons.join("; ")));
    }
    // The OpenAI response object's equivalents: `output_format` when every image has the same
    // one, the enhanced prompts as `revised_prompt`.
    let mut answer_fields = Vec::new();
    if let Some(Some(f)) = formats.first() {
        if formats.iter().all(|g| g.as_deref() == Some(f.as_str())) && matches!(f.as_str(), "png" | "jpeg" | "webp") {
            answer_fields.push(("output_format", serde_json::Value::String(f.clone())));
        }
    }
    if revised_prompts.iter().all(Option::is_none) {
        revised_prompts.clear();
    }
    Ok(Generation { images, answer_fields, revised_prompts, ..Default::default() })
}

/// Google's documented error statuses and `ErrorInfo` reasons (`error.status`,
/// `error.details[].reason`) and Imagen's refusal messages that the HTTP status alone does not
/// decide. Sources: cloud.google.com/apis/design/errors, the Vertex AI Imagen "Responsible AI"
/// page (blocked prompts answer 400 with a support code), cloud.google.com/vertex-ai/docs/quotas.
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("sensitive words"),
        ErrorClass::Content,
        "Imagen refused the prompt (\"sensitive words ... Responsible AI practices\", with support codes)",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("responsible ai"),
        ErrorClass::Content,
        "Imagen's Responsible AI filter refused the prompt or the image",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("usage guidelines"),
        ErrorClass::Content,
        "the prompt violates the usage guidelines",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("response is blocked"),
        ErrorClass::Content,
        "\"The response is blocked, as it may violate our policies\" (an output filter, with an error code)",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("safety filter threshold"),
        ErrorClass::Content,
        "the route's safety filter threshold prohibited words of the prompt",
    ),
    rule(
        Statuses::Range(400, 499),
        Matcher::Message("support codes"),
        ErrorClass::Content,
        "an Imagen refusal with support codes",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("PUBLIC_ERROR_UNSAFE_GENERATION"),
        ErrorClass::Content,
        "an unsafe generation, by ErrorInfo reason",
    ),
    rule(Statuses::Any, Matcher::Code("BILLING_DISABLED"), WIDE, "the project's billing is disabled"),
    rule(Statuses::Any, Matcher::Code("SERVICE_DISABLED"), WIDE, "the Vertex AI API is not enabled in the project"),
    rule(
        Statuses::Any,
        Matcher::Code("ACCESS_TOKEN_SCOPE_INSUFFICIENT"),
        WIDE,
        "the token lacks the cloud-platform scope",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("IAM_PERMISSION_DENIED"),
        WIDE,
        "the service account lacks aiplatform permissions",
    ),
    rule(Statuses::Any, Matcher::Code("CONSUMER_INVALID"), WIDE, "the project is wrong or unknown"),
    rule(Statuses::Any, Matcher::Code("CONSUMER_SUSPENDED"), WIDE, "the project is suspended"),
    rule(Statuses::Any, Matcher::Code("USER_PROJECT_DENIED"), WIDE, "the caller may not use the project"),
    rule(Statuses::Range(400, 499), Matcher::Message("requires billing"), WIDE, "the project has no billing account"),
    rule(
        Statuses::Any,
        Matcher::Code("FAILED_PRECONDITION"),
        WIDE,
        "the project is not set up for the call (billing, terms)",
    ),
    rule(Statuses::Any, Matcher::Code("NOT_FOUND"), TARGET, "the model does not exist in this region or project"),
    rule(Statuses::Any, Matcher::Code("RESOURCE_EXHAUSTED"), ErrorClass::Transient, "the per-minute quota is used up"),
    rule(Statuses::Any, Matcher::Code("UNAVAILABLE"), ErrorClass::Transient, "the service is overloaded or down"),
];

const WIDE: ErrorClass = ErrorClass::Account { provider_wide: true };
const TARGET: ErrorClass = ErrorClass::Account { provider_wide: false };

/// Maps a Google API error `{"error":{"code","message","status","details"}}` by [`ERRORS`]:
/// the client's own mistakes are passed back (OpenAI-shaped, code `upstream_rejected`), a
/// prompt Google's Responsible AI filter refused is a content filter answer, the account's and
/// transient ones may be tried elsewhere.
fn classify_error(status: StatusCode, body: &[u8], retry_after: Option<std::time::Duration>) -> ProviderError {
    let (message, codes) = google_error(body);
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    let class = errors::classify(ERRORS, status.as_u16(), &codes, &message);
    // The Google status (then the reason) names the failure in messages; a client error keeps
    // OpenAI's `upstream_rejected` code, since Google's statuses are not OpenAI codes.
    let code = if class == ErrorClass::Client { None } else { codes.first().copied() };
    errors::to_error(class, status, code, None, &message, retry_after)
}

/// The error's message (control characters removed, at most 300 characters), then its status
/// name (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ...) and the `ErrorInfo` reasons of its
/// details (`BILLING_DISABLED`, ...), each only when made of capitals and underscores.
fn google_error(body: &[u8]) -> (String, Vec<String>) {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok();
    let error = v.as_ref().map(|v| &v["error"]);
    let field = |name: &str| error.and_then(|e| e[name].as_str()).map(str::to_owned);
    let is_name = |s: &String| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    let mut codes: Vec<String> = field("status").into_iter().collect();
    if let Some(details) = error.and_then(|e| e["details"].as_array()) {
        codes.extend(details.iter().take(8).filter_map(|d| d["reason"].as_str()).map(str::to_owned));
    }
    codes.retain(is_name);
    (super::error_text(field("message"), body), codes)
}

/// Where the bearer token comes from.
struct TokenSource {
    /// Environment variable holding a token, read on every attempt.
    env: Option<String>,
    /// A command printing a token, used when `env` is not set.
    command: Vec<String>,
    /// The command's last token and when it was fetched.
    cached: std::sync::Mutex<Option<(HeaderValue, Instant)>>,
    /// One command run at a time: concurrent attempts wait for it rather than run their own.
    refresh: tokio::sync::Mutex<()>,
}

impl TokenSource {
    /// The `Authorization` header and whether a fresh one can be had on a 401. `stale`: the
    /// header the API just refused, not to be handed out again.
    async fn get(&self, stale: Option<&HeaderValue>) -> Result<(HeaderValue, bool), ProviderError> {
        if let Some(var) = &self.env {
            match std::env::var(var).ok().filter(|t| !t.trim().is_empty()) {
                Some(token) => return bearer(token.trim()).map(|h| (h, false)),
                None if self.command.is_empty() => {
                    return Err(ProviderError::Credential(format!("environment variable {var} is not set")))
                }
                None => {}
            }
        }
        if self.command.is_empty() {
            return Err(ProviderError::Credential("no token_env or token_command".into()));
        }
        let usable = |c: &Option<(HeaderValue, Instant)>| {
            c.as_ref().filter(|(h, at)| at.elapsed() < TOKEN_TTL && Some(h) != stale).map(|(h, _)| h.clone())
        };
        if let Some(h) = usable(&self.cached.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok((h, true));
        }
        let _one_at_a_time = self.refresh.lock().await;
        // Someone else may have refreshed it while this attempt waited.
        if let Some(h) = usable(&self.cached.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok((h, true));
        }
        let h = run_token_command(&self.command).await?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((h.clone(), Instant::now()));
        Ok((h, true))
    }
}

fn bearer(token: &str) -> Result<HeaderValue, ProviderError> {
    crate::secrets::register(token);
    let mut h = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ProviderError::Credential("the access token is not a valid header value".into()))?;
    h.set_sensitive(true);
    Ok(h)
}

/// The most a token command may print: an OAuth access token is a few kilobytes at most. A
/// command that prints more (`yes`, `cat /dev/zero`) is stopped, not read into memory.
const MAX_TOKEN_OUTPUT: u64 = 64 * 1024;

/// Runs the token command (killed if the attempt is dropped, it takes too long, or it prints
/// more than [`MAX_TOKEN_OUTPUT`]). Its output is the token, so only its exit status and stderr
/// ever reach a message.
async fn run_token_command(argv: &[String]) -> Result<HeaderValue, ProviderError> {
    use tokio::io::AsyncReadExt;
    let program = &argv[0];
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child =
        cmd.spawn().map_err(|e| ProviderError::Credential(format!("cannot run token_command {program}: {e}")))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ProviderError::Credential(format!("cannot read the output of token_command {program}")));
    };
    let run = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut stdout, mut stderr) = (stdout.take(MAX_TOKEN_OUTPUT + 1), stderr.take(MAX_TOKEN_OUTPUT));
        {
            // stderr is read alongside (a full pipe would stall the command), but a command
            // that prints too much is stopped without waiting for it to end either.
            let read_out = stdout.read_to_end(&mut out);
            let read_err = stderr.read_to_end(&mut err);
            tokio::pin!(read_out, read_err);
            let mut err_done = false;
            let printed = loop {
                tokio::select! {
                    r = &mut read_out => break r?,
                    _ = &mut read_err, if !err_done => err_done = true,
                }
            };
            if printed as u64 > MAX_TOKEN_OUTPUT {
                return Ok(None);
            }
            if !err_done {
                let _ = read_err.await;
            }
        }
        child.wait().await.map(|status| Some((status, out, err)))
    };
    let (status, out, err) = tokio::time::timeout(TOKEN_COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| {
            ProviderError::Credential(format!(
                "token_command {program} did not finish within {} s",
                TOKEN_COMMAND_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| ProviderError::Credential(format!("cannot run token_command {program}: {e}")))?
        .ok_or_else(|| {
            ProviderError::Credential(format!(
                "token_command {program} printed more than {} KiB, which is no token; it was stopped",
                MAX_TOKEN_OUTPUT / 1024
            ))
        })?;
    if !status.success() {
        let stderr: String = String::from_utf8_lossy(&err).chars().filter(|c| !c.is_control()).take(200).collect();
        return Err(ProviderError::Credential(format!("token_command {program} failed ({status}): {stderr}")));
    }
    let token = std::str::from_utf8(&out).map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(ProviderError::Credential(format!("token_command {program} printed no token")));
    }
    bearer(token)
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a 2xx answer, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    let _ = parse_answer(body);
    let _ = classify_error(status, body, None);
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_models_before_imagen_3_ga_take_a_negative_prompt() {
        for m in [
            "imagegeneration@006",
            "imagen-3.0-generate-001",
            "imagen-3.0-fast-generate-001",
            "imagen-3.0-capability-001",
        ] {
            assert!(super::takes_negative_prompt(m), "{m}");
        }
        for m in ["imagen-3.0-generate-002", "imagen-4.0-generate-001", "imagen-4.0-ultra-generate-001", ""] {
            assert!(!super::takes_negative_prompt(m), "{m}");
        }
    }

    use super::*;

    #[test]
    fn sizes_map_to_the_nearest_ratio() {
        for (w, h, want) in [
            (1024, 1024, (1, 1)),
            (1792, 1024, (16, 9)),
            (1024, 1792, (9, 16)),
            (1280, 896, (4, 3)),
            (768, 1024, (3, 4)),
            (1536, 1024, (4, 3)), // 3:2 is nearer 4:3 than 16:9
            (1100, 1000, (1, 1)),
        ] {
            assert_eq!(nearest_ratio(w, h, &RATIOS), want, "{w}x{h}");
        }
    }

    /// An enhanced prompt or a filter reason longer than the skim's cut is kept whole.
    #[test]
    fn long_prompts_and_reasons_are_kept_whole() {
        let prompt = "a lighthouse at dusk, ".repeat(20);
        let reason = "filtered because ".repeat(20);
        let text = format!(
            r#"{{"predictions":[{{"bytesBase64Encoded":"aGk=","mimeType":"image/png","prompt":"{prompt}"}},{{"raiFilteredReason":"{reason}"}}]}}"#
        );
        let g = parse_answer(Bytes::from(text)).unwrap();
        assert_eq!(g.revised_prompts, vec![Some(prompt.clone())]);
        let text = format!(r#"{{"predictions":[{{"raiFilteredReason":"{reason}"}}]}}"#);
        let e = parse_answer(Bytes::from(text)).unwrap_err();
        assert!(matches!(&e, ProviderError::ContentFiltered(m) if m.starts_with("filtered because filtered")), "{e}");
    }

    #[test]
    fn filtered_and_partial_answers() {
        let g = parse_answer(Bytes::from_static(
            br#"{"predictions":[{"bytesBase64Encoded":"aGk=","mimeType":"image/png"},{"raiFilteredReason":"x"}]}"#,
        ))
        .unwrap();
        assert_eq!(g.images.len(), 1);
        let e = parse_answer(Bytes::from_static(br#"{"predictions":[{"raiFilteredReason":"Bad prompt 58061214"}]}"#))
            .unwrap_err();
        assert!(matches!(&e, ProviderError::ContentFiltered(m) if m.contains("58061214")), "{e}");
        for bad in [
            &b"<html>"[..],
            br#"{"predictions":[{}]}"#,
            br#"{"predictions":[{"bytesBase64Encoded":"!!"}]}"#,
            b"{}",
            br#"{"predictions":[]}"#,
            br#"{"error":{"code":500,"message":"internal","status":"INTERNAL"}}"#,
        ] {
            assert_eq!(parse_answer(Bytes::copy_from_slice(bad)).unwrap_err().label(), "bad_response");
        }
    }

    #[test]
    fn google_errors_are_classified() {
        let body = br#"{"error":{"code":400,"message":"sampleCount must be <= 4","status":"INVALID_ARGUMENT"}}"#;
        match classify_error(StatusCode::BAD_REQUEST, body, None) {
            ProviderError::Rejected { body, .. } => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "upstream_rejected");
                assert!(v["error"]["message"].as_str().unwrap().contains("sampleCount must be <= 4"));
            }
            other => panic!("{other:?}"),
        }
        let e = classify_error(
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#,
            None,
        );
        assert_eq!((e.label(), e.retryable()), ("status_429", true));
        let e = classify_error(StatusCode::FORBIDDEN, br#"{"error":{"message":"token ya29.secret denied"}}"#, None);
        assert!(!e.to_string().contains("ya29"), "{e}");
        let e = classify_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"message":"The prompt could not be submitted. It contains sensitive words that violate Google's Responsible AI practices."}}"#,
            None,
        );
        assert_eq!(e.label(), "content_filtered");
        assert_eq!(classify_error(StatusCode::SERVICE_UNAVAILABLE, b"", None).label(), "status_5xx");
    }

    /// Each documented error answer (Google's error model, Imagen's refusals) gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                400,
                r#"{"error":{"code":400,"message":"Image generation failed with the following error: The prompt could not be submitted. This prompt contains sensitive words that violate Google's Responsible AI practices. Try rephrasing the prompt. Support codes: 42876398","status":"INVALID_ARGUMENT"}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"Image generation failed with the following error: The response is blocked, as it may violate our policies. Error Code: 58061214","status":"INVALID_ARGUMENT"}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"The prompt could not be submitted. Your current safety filter threshold prohibited one or more words in this prompt. Support codes: 61493863","status":"INVALID_ARGUMENT"}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"PUBLIC_ERROR_UNSAFE_GENERATION"}]}}"#,
                "content",
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"sampleCount must be <= 4","status":"INVALID_ARGUMENT"}}"#,
                "client",
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"Vertex AI API has not been used in project 1 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED"}]}}"#,
                "account",
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"This API method requires billing to be enabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"BILLING_DISABLED"}]}}"#,
                "account",
            ),
            (
                404,
                r#"{"error":{"code":404,"message":"Publisher Model `projects/p/locations/l/publishers/google/models/imagen-9` was not found or your project does not have access to it.","status":"NOT_FOUND"}}"#,
                "account (target)",
            ),
            (
                429,
                r#"{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model.","status":"RESOURCE_EXHAUSTED"}}"#,
                "transient",
            ),
            (
                503,
                r#"{"error":{"code":503,"message":"The service is currently unavailable.","status":"UNAVAILABLE"}}"#,
                "transient",
            ),
        ];
        for (status, body, want) in cases {
            let e = classify_error(StatusCode::from_u16(*status).unwrap(), body.as_bytes(), None);
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
