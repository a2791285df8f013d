//! `kind = "stability"`: Stability AI's Stable Image generate endpoints (v2beta).
//!
//! POST `{base_url}/v2beta/stable-image/generate/{ultra|core|sd3}` as `multipart/form-data`
//! (prompt, negative_prompt, aspect_ratio, seed, style_preset, output_format=png; for sd3 also
//! `model`), with `authorization: Bearer <key>` and `accept: application/json`. The answer is
//! `{"image": base64, "finish_reason": "SUCCESS" | "CONTENT_FILTERED", "seed": N}`; an answer of
//! raw image bytes (what `accept: image/*` gets) is taken too.
//!
//! The target's model picks the endpoint: `ultra` / `stable-image-ultra`, `core` /
//! `stable-image-core`, or an SD3 model (`sd3.5-large`, `sd3.5-medium`, ...) sent as `model` to
//! `sd3`. Each call draws one image, so `n` images are `n` concurrent calls; with a seed, image
//! `i` gets seed + i (the same seed would draw the same image `n` times).
//!
//! Sizes become the nearest of Stability's aspect ratios; the output resolution is the model's
//! own (about one megapixel). OpenAI's `style` values map to presets (`natural` ->
//! `photographic`, `vivid` -> `cinematic`), and a preset name passes as it is; any other style
//! is not sent. `output_format` passes as it is (png, jpeg, webp; the SD3 endpoint has no webp,
//! so webp there is dropped or refused by the policy) and is png otherwise. Steps, guidance,
//! sampler, quality, `background`, `output_compression`, `moderation` and `input_fidelity` are
//! not parameters of these endpoints.

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use serde::Deserialize;

use super::errors::{self, rule, ErrorClass, Matcher, Rule, Statuses};
use super::vertex::nearest_ratio;
use super::{key_header, skim, AttemptRequest, Generation, Image, Provider, ProviderError};
use crate::body::{ChunkedBody, Rope};
use crate::policy::Connection;
use crate::request::{GenerationRequest, OutputFormat, Param};
use crate::upstream;

/// One image, as PNG bytes or their base64, stays below this.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Stability's seeds are 0..=4294967294.
const SEED_MODULUS: u64 = 4_294_967_295;

/// The seed of image `i` of a request with `seed` (one call per image): the request's (taken
/// modulo Stability's range) for the first, then one more per image, wrapping past 0, which
/// Stability reads as "a random seed" (its request schema). A request's own seed 0 is sent as
/// 0: Stability then draws one, and reports it.
fn image_seed(seed: u64, i: u64) -> u64 {
    let first = seed % SEED_MODULUS;
    if i == 0 {
        first
    } else {
        (first + i - 1) % (SEED_MODULUS - 1) + 1
    }
}
const RATIOS: [(u32, u32); 9] = [(16, 9), (1, 1), (21, 9), (2, 3), (3, 2), (4, 5), (5, 4), (9, 16), (9, 21)];
const PRESETS: [&str; 17] = [
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "modeling-compound",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
];

/// The three generate endpoints, in the order of `Api`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Ultra = 0,
    Core = 1,
    Sd3 = 2,
}

pub struct Stability {
    /// `{base_url}/v2beta/stable-image/generate/{ultra,core,sd3}`, resolved once.
    endpoints: Result<[upstream::Endpoint; 3], String>,
    /// `Ok(header)` when the key variable is set, `Err(var)` when the policy names one that is not.
    auth: Option<Result<HeaderValue, String>>,
}

impl Stability {
    pub fn new(c: &Connection) -> Self {
        let base = c.base_url.trim_end_matches('/');
        let endpoint = |name: &str| upstream::Endpoint::parse(&format!("{base}/v2beta/stable-image/generate/{name}"));
        let endpoints = (|| Ok([endpoint("ultra")?, endpoint("core")?, endpoint("sd3")?]))();
        Stability { endpoints, auth: key_header(c.api_key_env.as_deref(), "Bearer ") }
    }
}

#[async_trait]
impl Provider for Stability {
    fn supports(&self, param: Param) -> bool {
        matches!(param, Param::NegativePrompt | Param::Seed | Param::Style | Param::OutputFormat)
    }

    /// SD3 draws PNG or JPEG only.
    fn supports_value(&self, param: Param, model: &str, req: &GenerationRequest) -> bool {
        match param {
            Param::OutputFormat => {
                !(req.output_format == Some(OutputFormat::Webp) && api_for(model).is_some_and(|(a, _)| a == Api::Sd3))
            }
            p => self.supports(p),
        }
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(var)) => return Err(ProviderError::Credential(format!("environment variable {var} is not set"))),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let (api, model_field) = api_for(attempt.model).ok_or_else(|| {
            ProviderError::Other(format!(
                "\"{}\" is not a Stability model (ultra, core, or an sd3 model such as sd3.5-large)",
                attempt.model
            ))
        })?;
        let endpoints = self.endpoints.as_ref().map_err(|e| ProviderError::Other(e.clone()))?;
        let endpoint = &endpoints[api as usize];
        let boundary = format!("acc-{}", uuid::Uuid::new_v4().simple());
        let common = Bytes::from(common_fields(attempt, model_field, &boundary));
        let req = attempt.req;
        let seeds: Vec<Option<u64>> = (0..u64::from(req.n))
            .map(|i| req.seed.filter(|_| attempt.sends(Param::Seed)).map(|s| image_seed(s, i)))
            .collect();
        let calls = seeds.iter().map(|seed| one_image(endpoint, auth, &boundary, common.clone(), *seed));
        let results = futures_util::future::join_all(calls).await;

        let mut generation = Generation::default();
        generation.answer_fields.push(("output_format", output_format(attempt).name().into()));
        let mut failed = Vec::new();
        for r in results {
            match r {
                Ok((image, seed)) => {
                    generation.images.push(image);
                    generation.settings.seed = generation.settings.seed.or(seed);
                }
                Err(e) => {
                    tracing::info!("stability: one of {} calls failed: {}", req.n, e.text_without_provider_message());
                    failed.push(e);
                }
            }
        }
        if generation.images.is_empty() && !failed.is_empty() {
            // No image at all: the attempt failed, with the first call's error.
            return Err(failed.swap_remove(0));
        }
        // Fewer images than asked: they are returned; the sanity evaluation fails the answer
        // (naming the first error) where the route runs it.
        generation.partial_errors = failed.into_iter().map(|e| std::sync::Arc::new(e.redacted())).collect();
        Ok(generation)
    }
}

/// The endpoint for a target model, and the `model` form field it needs.
fn api_for(model: &str) -> Option<(Api, Option<&str>)> {
    match model {
        "ultra" | "stable-image-ultra" => Some((Api::Ultra, None)),
        "core" | "stable-image-core" => Some((Api::Core, None)),
        "sd3" => Some((Api::Sd3, None)),
        m if m.starts_with("sd3") && m.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) => {
            Some((Api::Sd3, Some(m)))
        }
        _ => None,
    }
}

/// The preset for a request's `style`.
fn style_preset(style: &str) -> Option<&'static str> {
    let s = style.trim().to_ascii_lowercase().replace(['_', ' '], "-");
    match s.as_str() {
        "natural" => Some("photographic"),
        "vivid" => Some("cinematic"),
        _ => PRESETS.iter().copied().find(|p| *p == s),
    }
}

/// Every form field but the seed (which differs per call), as one chunk.
fn common_fields(attempt: &AttemptRequest<'_>, model: Option<&str>, boundary: &str) -> String {
    let req = attempt.req;
    let (w, h) = nearest_ratio(req.size.width, req.size.height, &RATIOS);
    let mut out = String::with_capacity(req.prompt.len() + 512);
    let mut field = |name: &str, value: &str| {
        out.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"));
    };
    field("prompt", &req.prompt);
    if let Some(m) = model {
        field("model", m);
    }
    field("aspect_ratio", &format!("{w}:{h}"));
    field("output_format", output_format(attempt).name());
    if let Some(neg) = req.negative_prompt.as_deref().filter(|_| attempt.sends(Param::NegativePrompt)) {
        field("negative_prompt", neg);
    }
    if let Some(preset) = req.style.as_deref().filter(|_| attempt.sends(Param::Style)).and_then(style_preset) {
        field("style_preset", preset);
    }
    out
}

/// The format asked of Stability: the client's `output_format` when sent, else PNG.
fn output_format(attempt: &AttemptRequest<'_>) -> OutputFormat {
    attempt.req.output_format.filter(|_| attempt.sends(Param::OutputFormat)).unwrap_or(OutputFormat::Png)
}

/// One call: one image and the seed Stability reports for it.
async fn one_image(
    endpoint: &upstream::Endpoint,
    auth: Option<&HeaderValue>,
    boundary: &str,
    common: Bytes,
    seed: Option<u64>,
) -> Result<(Image, Option<u64>), ProviderError> {
    let mut body = ChunkedBody::default();
    body.push(common);
    let mut tail = String::with_capacity(128);
    if let Some(s) = seed {
        tail.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n{s}\r\n"));
    }
    tail.push_str(&format!("--{boundary}--\r\n"));
    body.push(tail);
    let mut req = Request::post("/")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .header(header::ACCEPT, "application/json");
    if let Some(h) = auth {
        req = req.header(header::AUTHORIZATION, h.clone());
    }
    let req = req.body(body).map_err(|e| ProviderError::Other(e.to_string()))?;
    let answer = upstream::send(endpoint, req, MAX_ANSWER_BYTES).await.map_err(ProviderError::from)?;
    if answer.status.is_success() {
        parse_answer(&answer.body, &answer.headers)
    } else {
        Err(classify_error(answer.status, &answer.body.to_bytes(), answer.retry_after))
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
    /// Read with [`super::reported_seed`]: a seed out of shape is no seed, not a broken answer.
    #[serde(default)]
    seed: Option<serde_json::Value>,
}

/// Parses a 2xx answer: JSON with the base64 image (kept a slice of `body`), or the image bytes
/// themselves.
fn parse_answer(body: impl Into<Rope>, headers: &http::HeaderMap) -> Result<(Image, Option<u64>), ProviderError> {
    let body: Rope = body.into();
    // The magic numbers are in the first bytes, which a piece boundary may split.
    if let Some((mime, _)) = super::sniff_image(&body.slice(0..body.len().min(64)).to_bytes()) {
        // Image bytes carry the finish reason and the seed in headers.
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
        if header("finish-reason") == Some("CONTENT_FILTERED") {
            return Err(ProviderError::ContentFiltered(
                "Stability's content moderation filtered the image (finish-reason CONTENT_FILTERED)".into(),
            ));
        }
        let seed = header("seed").and_then(|s| s.parse().ok());
        return Ok((Image::Raw { bytes: body.to_bytes(), mime }, seed));
    }
    let skimmed = skim::skim(&body).map_err(ProviderError::BadResponse)?;
    let answer: Answer = serde_json::from_slice(&skimmed.remainder)
        .map_err(|e| ProviderError::BadResponse(format!("answer is neither an image nor the expected JSON: {e}")))?;
    let finish_reason =
        answer.finish_reason.map(|r| skimmed.text(r)).transpose().map_err(ProviderError::BadResponse)?;
    match finish_reason.as_deref() {
        None | Some("SUCCESS") => {}
        Some("CONTENT_FILTERED") => {
            return Err(ProviderError::ContentFiltered(
                "Stability's content moderation filtered the image (finish_reason CONTENT_FILTERED)".into(),
            ))
        }
        Some(other) => {
            let other: String = other.chars().filter(|c| c.is_ascii_graphic()).take(40).collect();
            return Err(ProviderError::BadResponse(format!("unexpected finish_reason {other}")));
        }
    }
    let b64 = answer.image.ok_or_else(|| ProviderError::BadResponse("answer holds no image".into()))?;
    let bytes = skim::base64_value(skimmed.resolve(&b64))
        .ok_or_else(|| ProviderError::BadResponse("image is not valid base64 (truncated or corrupt)".into()))?;
    Ok((Image::Base64(bytes), answer.seed.as_ref().and_then(super::reported_seed)))
}

/// Stability's documented error names (`name` of `{"id","name","errors":[..]}`) that the
/// status alone does not decide. Source: platform.stability.ai/docs/api-reference (each
/// endpoint's 400, 402, 403, 413, 422, 429 and 500 answers).
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::Any,
        Matcher::Code("content_moderation"),
        ErrorClass::Content,
        "the prompt or input image was flagged by content moderation (403)",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("payment_required"),
        ErrorClass::Account { provider_wide: true },
        "the account has too few credits (402)",
    ),
    rule(
        Statuses::Any,
        Matcher::Code("insufficient_balance"),
        ErrorClass::Account { provider_wide: true },
        "the account has too few credits",
    ),
    rule(Statuses::One(413), Matcher::Status, ErrorClass::Client, "the request (an input image) is too large"),
];

/// Maps Stability's `{"id","name","errors":[..]}` answers by [`ERRORS`]: the client's own
/// mistakes are passed back (OpenAI-shaped), its content moderation is a content filter answer,
/// the account's and transient ones may be retried elsewhere.
fn classify_error(status: StatusCode, body: &[u8], retry_after: Option<std::time::Duration>) -> ProviderError {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok();
    let name = v.as_ref().and_then(|v| v["name"].as_str()).unwrap_or_default();
    let errors: Vec<&str> = v
        .as_ref()
        .and_then(|v| v["errors"].as_array())
        .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
        .unwrap_or_default();
    let found = if errors.is_empty() {
        v.as_ref().and_then(|v| v["message"].as_str().map(str::to_owned))
    } else {
        Some(errors.join("; "))
    };
    let message = super::error_text(found, body);
    let name = (!name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name);
    let class = errors::classify(ERRORS, status.as_u16(), name.as_slice(), &message);
    let code = if class == ErrorClass::Client || class == ErrorClass::Content { None } else { name };
    errors::to_error(class, status, code, None, &message, retry_after)
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a 2xx answer (JSON and image
/// bodies), and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    for ct in ["application/json", "image/png"] {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
        let _ = parse_answer(body, &h);
    }
    let _ = classify_error(status, body, None);
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_seed_out_of_shape_is_no_seed_not_a_broken_answer() {
        // A helper's finding: `"seed": 5.0` or a seed past u64 failed the image (502), which
        // Stability had made and billed.
        let png = base64_simd::STANDARD.encode_to_string(b"\x89PNG\r\n\x1a\n0000000000000000");
        let seed = |v: &str| {
            let body = format!(r#"{{"image": "{png}", "finish_reason": "SUCCESS", "seed": {v}}}"#);
            parse_answer(bytes::Bytes::from(body), &http::HeaderMap::new()).map(|(_, seed)| seed)
        };
        assert_eq!(seed("5").unwrap(), Some(5));
        assert_eq!(seed("5.0").unwrap(), Some(5));
        assert_eq!(seed("\"17\"").unwrap(), Some(17));
        for odd in ["1e30", "-3", "2.5", "null", "[1]", "184467440737095516160"] {
            assert_eq!(seed(odd).unwrap(), None, "{odd}");
        }
    }

    #[test]
    fn image_seeds_step_by_one_and_never_land_on_zero() {
        assert_eq!((0..3).map(|i| super::image_seed(7, i)).collect::<Vec<_>>(), vec![7, 8, 9]);
        let last = super::SEED_MODULUS - 1;
        assert_eq!((0..3).map(|i| super::image_seed(last, i)).collect::<Vec<_>>(), vec![last, 1, 2]);
        assert_eq!(super::image_seed(super::SEED_MODULUS + 3, 0), 3);
        assert_eq!((0..2).map(|i| super::image_seed(0, i)).collect::<Vec<_>>(), vec![0, 1]);
    }

    use super::*;

    #[test]
    fn models_pick_endpoints() {
        assert_eq!(api_for("ultra"), Some((Api::Ultra, None)));
        assert_eq!(api_for("stable-image-core"), Some((Api::Core, None)));
        assert_eq!(api_for("sd3.5-large"), Some((Api::Sd3, Some("sd3.5-large"))));
        assert_eq!(api_for("sd3"), Some((Api::Sd3, None)));
        assert_eq!(api_for("dall-e-3"), None);
        assert_eq!(api_for("sd3\"x"), None);
    }

    #[test]
    fn styles_and_sizes_map() {
        assert_eq!(style_preset("natural"), Some("photographic"));
        assert_eq!(style_preset("Pixel_Art"), Some("pixel-art"));
        assert_eq!(style_preset("watercolour"), None);
        assert_eq!(nearest_ratio(1792, 1024, &RATIOS), (16, 9));
        assert_eq!(nearest_ratio(1024, 1536, &RATIOS), (2, 3));
        assert_eq!(nearest_ratio(512, 512, &RATIOS), (1, 1));
    }

    #[test]
    fn answers_and_errors() {
        let (image, seed) = parse_answer(
            Bytes::from_static(br#"{"image":"aGk=","finish_reason":"SUCCESS","seed":42}"#),
            &http::HeaderMap::new(),
        )
        .unwrap();
        assert!(matches!(image, Image::Base64(b) if b.to_bytes()[..] == b"aGk="[..]));
        assert_eq!(seed, Some(42));
        let e = parse_answer(
            Bytes::from_static(br#"{"image":"aGk=","finish_reason":"CONTENT_FILTERED","seed":1}"#),
            &http::HeaderMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.label(), "content_filtered");
        let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nrest");
        assert!(matches!(parse_answer(&png, &http::HeaderMap::new()).unwrap().0, Image::Raw { mime: "image/png", .. }));
        // Byte answers carry the seed and the finish reason in headers.
        let mut h = http::HeaderMap::new();
        h.insert("seed", http::HeaderValue::from_static("77"));
        h.insert("finish-reason", http::HeaderValue::from_static("SUCCESS"));
        assert_eq!(parse_answer(&png, &h).unwrap().1, Some(77));
        h.insert("finish-reason", http::HeaderValue::from_static("CONTENT_FILTERED"));
        assert_eq!(parse_answer(&png, &h).unwrap_err().label(), "content_filtered");

        let e = classify_error(
            StatusCode::BAD_REQUEST,
            br#"{"id":"a1","name":"bad_request","errors":["aspect_ratio: must be one of ..."]}"#,
            None,
        );
        assert!(matches!(&e, ProviderError::Rejected { body, .. } if body.windows(12).any(|w| w == b"aspect_ratio")));
        let e = classify_error(
            StatusCode::FORBIDDEN,
            br#"{"id":"a2","name":"content_moderation","errors":["Your request was flagged"]}"#,
            None,
        );
        assert_eq!(e.label(), "content_filtered");
        let e = classify_error(StatusCode::UNAUTHORIZED, br#"{"name":"unauthorized","errors":["bad key sk-1"]}"#, None);
        assert!(e.retryable() && !e.to_string().contains("sk-1"));
        assert_eq!(classify_error(StatusCode::TOO_MANY_REQUESTS, b"{}", None).label(), "status_429");
        assert_eq!(classify_error(StatusCode::BAD_GATEWAY, b"", None).label(), "status_5xx");
    }

    /// Each documented error answer (`{"id","name","errors"}`) gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (400, r#"{"id":"a","name":"bad_request","errors":["prompt: cannot be empty"]}"#, "client"),
            (
                402,
                r#"{"id":"a","name":"payment_required","errors":["You lack sufficient credits to make this request."]}"#,
                "account",
            ),
            (
                403,
                r#"{"id":"a","name":"content_moderation","errors":["Your request was flagged by our content moderation system."]}"#,
                "content",
            ),
            (413, r#"{"id":"a","name":"payload_too_large","errors":["Request Too Large"]}"#, "client"),
            (
                422,
                r#"{"id":"a","name":"invalid_language","errors":["English is the only supported language"]}"#,
                "client",
            ),
            (401, r#"{"id":"a","name":"unauthorized","errors":["authorization missing"]}"#, "account"),
            (404, r#"{"id":"a","name":"not_found","errors":["Not Found"]}"#, "account (target)"),
            (429, r#"{"id":"a","name":"rate_limit_exceeded","errors":["Rate Limit Exceeded"]}"#, "transient"),
            (500, r#"{"id":"a","name":"internal_error","errors":["Internal Error"]}"#, "transient"),
        ];
        for (status, body, want) in cases {
            let e = classify_error(StatusCode::from_u16(*status).unwrap(), body.as_bytes(), None);
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
