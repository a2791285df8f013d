//! `kind = "a1111"`: a self-hosted AUTOMATIC1111 / Forge web UI started with `--api`.
//!
//! Generations POST `{base_url}/sdapi/v1/txt2img`; edits and variations POST
//! `{base_url}/sdapi/v1/img2img` with the input images (and the mask) inline as base64. The
//! answer carries base64 PNGs and, in `info` (a JSON document inside a string), the seed,
//! sampler, steps, CFG scale and checkpoint actually used. Optional basic auth (`--api-auth`)
//! from the environment variable `auth_env` names, holding `user:password`.

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::{self, rule, ErrorClass, Matcher, Rule, Statuses};
use super::{openai, skim, AttemptRequest, Generation, Image, Provider, ProviderError, Settings};
use crate::body::{ChunkedBody, Rope};
use crate::policy::Connection;
use crate::request::Param;
use crate::request::{FilePart, Operation};
use crate::upstream;

/// How far img2img may move away from the input: an edit repaints freely inside its mask, a
/// variation keeps the input's composition.
const EDIT_DENOISING: f64 = 0.75;
const VARIATION_DENOISING: f64 = 0.6;

pub struct A1111 {
    /// `[txt2img, img2img]`, resolved once.
    endpoints: Result<[upstream::Endpoint; 2], String>,
    /// `Ok(header)` when `auth_env` holds `user:password`, `Err(why)` when it does not.
    auth: Option<Result<HeaderValue, String>>,
}

impl A1111 {
    pub fn new(c: &Connection) -> Self {
        let endpoint = |path: &str| upstream::Endpoint::parse(&format!("{}/sdapi/v1/{path}", c.base_url));
        let endpoints = (|| Ok([endpoint("txt2img")?, endpoint("img2img")?]))();
        let auth = c.auth_env.as_deref().map(|var| match std::env::var(var) {
            Ok(cred) if cred.contains(':') => {
                crate::secrets::register(&cred);
                crate::secrets::register(cred.split_once(':').map_or("", |(_, password)| password));
                crate::secrets::register(&base64_simd::STANDARD.encode_to_string(&cred));
                let mut h = HeaderValue::from_str(&format!("Basic {}", base64_simd::STANDARD.encode_to_string(&cred)))
                    .map_err(|_| format!("environment variable {var} does not hold user:password"))?;
                h.set_sensitive(true);
                Ok(h)
            }
            Ok(_) => Err(format!("environment variable {var} does not hold user:password")),
            Err(_) => Err(format!("environment variable {var} is not set")),
        });
        A1111 { endpoints, auth }
    }
}

/// The fields of `txt2img` and `img2img` the gateway sets; anything else keeps the web UI's
/// defaults. Unset options are left out rather than sent as null.
#[derive(Serialize)]
struct Payload<'a> {
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    negative_prompt: Option<&'a str>,
    /// `-1` asks for a random seed; `info` then says which one was drawn.
    seed: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cfg_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sampler_name: Option<&'a str>,
    width: u32,
    height: u32,
    batch_size: u32,
    n_iter: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    override_settings: Option<Checkpoint<'a>>,
    send_images: bool,
    save_images: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    denoising_strength: Option<f64>,
    /// 1 when the mask marks the area to repaint by transparency (OpenAI's convention) rather
    /// than by white pixels (the web UI's).
    #[serde(skip_serializing_if = "Option::is_none")]
    inpainting_mask_invert: Option<u8>,
}

#[derive(Serialize)]
struct Checkpoint<'a> {
    sd_model_checkpoint: &'a str,
}

#[async_trait]
impl Provider for A1111 {
    fn supports(&self, param: Param) -> bool {
        !matches!(
            param,
            Param::Quality
                | Param::Style
                | Param::Background
                | Param::OutputFormat
                | Param::OutputCompression
                | Param::Moderation
                | Param::InputFidelity
        )
    }

    fn supports_op(&self, _op: Operation) -> bool {
        true
    }

    async fn generate(&self, attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        let auth = match &self.auth {
            Some(Err(why)) => return Err(ProviderError::Credential(why.clone())),
            Some(Ok(h)) => Some(h),
            None => None,
        };
        let endpoints = self.endpoints.as_ref().map_err(|e| ProviderError::Other(e.clone()))?;
        let req = attempt.req;
        let (endpoint, body) = match req.op {
            Operation::Generate => (&endpoints[0], payload_body(&payload(attempt), &[], None)?),
            Operation::Edit | Operation::Variation => {
                let mut p = payload(attempt);
                p.denoising_strength =
                    Some(if req.op == Operation::Edit { EDIT_DENOISING } else { VARIATION_DENOISING });
                // A mask with transparency in another form (grey with alpha, a palette with
                // transparent entries) goes as RGBA: the web UI reads alpha only from RGBA, and
                // luminance otherwise, which would repaint the wrong region.
                // Decoded off the async workers, and only a mask whose header says it may need it.
                let mask = req.mask.as_ref().filter(|_| req.op == Operation::Edit);
                let rgba = match mask.filter(|m| png_other_alpha(&m.bytes)) {
                    Some(m) => {
                        let m = m.clone();
                        tokio::task::spawn_blocking(move || mask_as_rgba(&m))
                            .await
                            .unwrap_or(Ok(None))
                            .map_err(ProviderError::UnsupportedParams)?
                    }
                    None => None,
                };
                let mask = rgba.as_ref().or(mask);
                if mask.is_some_and(|m| png_has_alpha(&m.bytes)) {
                    p.inpainting_mask_invert = Some(1);
                }
                if !req.size_given {
                    // Without a size asked for, the result keeps the input's.
                    if let Some((w, h)) = req.images.first().and_then(|i| dimensions(&i.bytes)) {
                        (p.width, p.height) = (w, h);
                    }
                }
                (&endpoints[1], payload_body(&p, &req.images, mask)?)
            }
        };
        let mut http_req = Request::post("/")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(h) = auth {
            http_req = http_req.header(header::AUTHORIZATION, h.clone());
        }
        let http_req = http_req.body(body).map_err(|e| ProviderError::Other(e.to_string()))?;
        let answer = upstream::send(endpoint, http_req, openai::MAX_ANSWER_BYTES).await.map_err(ProviderError::from)?;
        if answer.status.is_success() {
            parse_answer(&answer.body, req.n as usize)
        } else {
            Err(classify_error(answer.status, &answer.body.to_bytes(), answer.retry_after))
        }
    }
}

/// The payload of one attempt; parameters the policy dropped are never sent.
fn payload<'a>(attempt: &'a AttemptRequest<'a>) -> Payload<'a> {
    let req = attempt.req;
    Payload {
        prompt: &req.prompt,
        negative_prompt: req.negative_prompt.as_deref().filter(|_| attempt.sends(Param::NegativePrompt)),
        seed: req.seed.filter(|_| attempt.sends(Param::Seed)).map_or(Value::from(-1), Value::from),
        steps: req.steps.filter(|_| attempt.sends(Param::Steps)),
        cfg_scale: req.guidance_scale.filter(|_| attempt.sends(Param::Guidance)),
        sampler_name: req.sampler.as_deref().filter(|_| attempt.sends(Param::Sampler)),
        width: req.size.width,
        height: req.size.height,
        batch_size: req.n,
        n_iter: 1,
        override_settings: checkpoint(attempt).map(|sd_model_checkpoint| Checkpoint { sd_model_checkpoint }),
        send_images: true,
        save_images: false,
        denoising_strength: None,
        inpainting_mask_invert: None,
    }
}

/// The checkpoint to switch to. The adapter only sees the target's model name, which is the
/// client's alias when the target names none; the alias is not a checkpoint, so the web UI keeps
/// the checkpoint it has loaded then (it would otherwise load some fallback, silently).
fn checkpoint<'a>(attempt: &'a AttemptRequest<'a>) -> Option<&'a str> {
    attempt.target_model.filter(|m| !m.is_empty())
}

/// The JSON body. Input images are base64-encoded straight into their own chunks after the
/// small fields, so each is encoded once and never copied through a JSON serializer (base64
/// needs no escaping).
fn payload_body(p: &Payload<'_>, images: &[FilePart], mask: Option<&FilePart>) -> Result<ChunkedBody, ProviderError> {
    let mut head = serde_json::to_vec(p).map_err(|e| ProviderError::Other(e.to_string()))?;
    let mut body = ChunkedBody::default();
    if images.is_empty() {
        body.push(head);
        return Ok(body);
    }
    head.pop(); // the closing brace
    head.extend_from_slice(b",\"init_images\":[");
    body.push(head);
    for (i, image) in images.iter().enumerate() {
        body.push(if i == 0 { &b"\""[..] } else { &b",\""[..] });
        body.push(base64_simd::STANDARD.encode_type::<Vec<u8>>(&image.bytes));
        body.push(&b"\""[..]);
    }
    body.push(&b"]"[..]);
    if let Some(mask) = mask {
        body.push(&b",\"mask\":\""[..]);
        body.push(base64_simd::STANDARD.encode_type::<Vec<u8>>(&mask.bytes));
        body.push(&b"\""[..]);
    }
    body.push(&b"}"[..]);
    Ok(body)
}

/// Whether `bytes` is a PNG with an RGBA colour type: the web UI then reads the mask from its
/// alpha channel (opaque = repaint), the opposite of OpenAI's (transparent = edit).
fn png_has_alpha(bytes: &[u8]) -> bool {
    png_colour_type(bytes) == Some(6)
}

/// The colour type in a PNG's header; `None` when `bytes` is not a PNG.
fn png_colour_type(bytes: &[u8]) -> Option<u8> {
    (bytes.len() > 25 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR").then(|| bytes[25])
}

/// Whether `bytes` is a PNG that may hold transparency other than RGBA's: grey with alpha
/// (colour type 4), or a `tRNS` chunk (a palette's or a single colour's transparent entry;
/// chunks of that kind come before the image data).
fn png_other_alpha(bytes: &[u8]) -> bool {
    let Some(colour_type) = png_colour_type(bytes) else { return false };
    let head = &bytes[..memchr::memmem::find(bytes, b"IDAT").unwrap_or(bytes.len())];
    colour_type == 4 || memchr::memmem::find(head, b"tRNS").is_some()
}

/// The largest side of a mask the gateway converts to RGBA ([`mask_as_rgba`]), pixels: past
/// the largest output of the models served this way, and small enough that the decoded mask
/// and its RGBA copy stay within 100 MiB. A mask needing conversion beyond it is refused.
const MASK_MAX_SIDE: u32 = 4096;

/// `mask` re-encoded as an RGBA PNG when it has transparency but is not RGBA already (grey
/// with alpha, a palette or a colour type with a transparent entry: [`png_other_alpha`]);
/// `Ok(None)` when it is RGBA, or has no transparency, or does not decode. Errors: a mask over
/// [`MASK_MAX_SIDE`] a side (its header says so; nothing is decoded), which sent as it is
/// would repaint the wrong region. Decodes: call it off the async workers.
fn mask_as_rgba(mask: &FilePart) -> Result<Option<FilePart>, String> {
    if !png_other_alpha(&mask.bytes) {
        return Ok(None);
    }
    if let Some((w, h)) = dimensions(&mask.bytes).filter(|&(w, h)| w.max(h) > MASK_MAX_SIDE) {
        return Err(format!(
            "mask: a {w}x{h} mask with grey-alpha or palette transparency is larger than the {MASK_MAX_SIDE} pixels a \
             side the gateway converts for this provider; send it as an RGBA PNG"
        ));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(&mask.bytes[..]), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MASK_MAX_SIDE);
    limits.max_image_height = Some(MASK_MAX_SIDE);
    limits.max_alloc = Some(u64::from(MASK_MAX_SIDE) * u64::from(MASK_MAX_SIDE) * 4);
    reader.limits(limits);
    let Ok(decoded) = reader.decode() else { return Ok(None) };
    if !decoded.color().has_alpha() {
        return Ok(None);
    }
    let mut png = Vec::new();
    if decoded.to_rgba8().write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).is_err() {
        return Ok(None);
    }
    Ok(Some(FilePart { bytes: bytes::Bytes::from(png), content_type: "image/png".into(), ..mask.clone() }))
}

/// Width and height from the image's header (no decoding).
fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    info: Option<String>,
}

/// Parses a 2xx answer: the first `n` images (extensions such as ControlNet append their own
/// maps after the batch) as slices of `body`, and the settings `info` reports.
fn parse_answer(body: impl Into<Rope>, n: usize) -> Result<Generation, ProviderError> {
    let skimmed = skim::skim(&body.into()).map_err(ProviderError::BadResponse)?;
    let answer: Answer = serde_json::from_slice(&skimmed.remainder)
        .map_err(|e| ProviderError::BadResponse(format!("answer is not the expected JSON: {e}")))?;
    if answer.images.is_empty() {
        return Err(ProviderError::BadResponse("answer holds no images".into()));
    }
    let mut images = Vec::with_capacity(n.min(answer.images.len()));
    for (i, text) in answer.images.iter().take(n.max(1)).enumerate() {
        let raw = match skimmed.resolve(text) {
            skim::Raw::Span(s) => skim::Raw::Span(strip_data_url(s)),
            plain => plain,
        };
        match skim::base64_value(raw) {
            Some(b64) => images.push(Image::Base64(b64)),
            None => return Err(ProviderError::BadResponse(format!("images[{i}] is not valid base64"))),
        }
    }
    // `info` is best effort: a web UI whose `info` cannot be read still produced the images.
    let settings = answer.info.and_then(|info| skimmed.text(info).ok()).map(|t| info_settings(&t)).unwrap_or_default();
    Ok(Generation { images, settings, ..Default::default() })
}

/// Some forks answer `data:image/png;base64,...` rather than bare base64.
fn strip_data_url(span: Rope) -> Rope {
    // The media type is in the first 64 bytes, which a piece boundary may split.
    let head = span.slice(0..span.len().min(64)).to_bytes();
    if head.starts_with(b"data:") {
        if let Some(comma) = memchr::memchr(b',', &head) {
            return span.slice(comma + 1..span.len());
        }
    }
    span
}

/// The settings `info` reports (its text, a JSON document in a string). It is best effort: the
/// proxy fills what is missing from the request.
fn info_settings(text: &str) -> Settings {
    let Ok(v) = serde_json::from_str::<Value>(text) else { return Settings::default() };
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let model = match (text("sd_model_name"), text("sd_model_hash")) {
        (Some(name), Some(hash)) => Some(format!("{name} [{hash}]")),
        (Some(name), None) => Some(name.to_string()),
        (None, Some(hash)) => Some(format!("[{hash}]")),
        (None, None) => None,
    };
    Settings {
        seed: v.get("seed").and_then(super::reported_seed),
        steps: v.get("steps").and_then(Value::as_u64).and_then(|s| u32::try_from(s).ok()),
        guidance: v.get("cfg_scale").and_then(Value::as_f64),
        sampler: text("sampler_name").map(str::to_owned),
        model,
    }
}

/// The web UI's answers that the status alone does not decide. Source: the AUTOMATIC1111
/// stable-diffusion-webui API (FastAPI: 422 validation errors with `detail`, 404 `{"detail":
/// "Not Found"}` for a route that does not exist, i.e. a web UI started without `--api`).
pub const ERRORS: &[Rule] = &[
    rule(
        Statuses::One(404),
        Matcher::MessageIs("Not Found"),
        ErrorClass::Account { provider_wide: true },
        "no /sdapi/v1 here: the web UI was started without --api",
    ),
    rule(
        Statuses::One(404),
        Matcher::Status,
        ErrorClass::Client,
        "a sampler, checkpoint or script the request names does not exist",
    ),
    rule(
        Statuses::One(500),
        Matcher::Message("invalid encoded image"),
        ErrorClass::Client,
        "the input image or mask is not valid base64 (a 500 that is the request's fault)",
    ),
    rule(
        Statuses::One(500),
        Matcher::Message("invalid image"),
        ErrorClass::Client,
        "the input image is not a valid image (\"Invalid image url\", \"Invalid image format\")",
    ),
];

/// Maps a non-2xx answer by [`ERRORS`]. The web UI's own refusals of a request (422
/// validation, an unknown sampler) go back to the client as 400; a web UI started without
/// `--api`, refused credentials (`auth_env`), overload and its 500s (out of memory, a failed
/// script) may be tried elsewhere.
fn classify_error(status: StatusCode, body: &[u8], retry_after: Option<std::time::Duration>) -> ProviderError {
    let message = error_message(body);
    match errors::classify(ERRORS, status.as_u16(), &[], &message) {
        // The web UI answers some of the request's own mistakes 404 or 500: the client gets 400.
        ErrorClass::Client => errors::to_error(ErrorClass::Client, StatusCode::BAD_REQUEST, None, None, &message, None),
        ErrorClass::Account { provider_wide: true } if status == StatusCode::NOT_FOUND => ProviderError::Account {
            status,
            provider_wide: true,
            message: "no /sdapi/v1 here: is the web UI started with --api?".into(),
        },
        class => errors::to_error(class, status, None, None, &message, retry_after),
    }
}

/// The web UI's error text: FastAPI's `detail` (a string, or a list of validation errors with
/// `loc` and `msg`), or the API's 500 body (`error` names the exception, `errors` says what).
fn error_message(body: &[u8]) -> String {
    let v = serde_json::from_slice::<Value>(body).ok();
    let from_json = v.as_ref().and_then(|v| match v.get("detail") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Array(items)) if !items.is_empty() => Some(
            items
                .iter()
                .take(5)
                .map(|item| {
                    let loc: Vec<String> = item
                        .get("loc")
                        .and_then(Value::as_array)
                        .map(|l| l.iter().map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned)).collect())
                        .unwrap_or_default();
                    let msg = item.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                    if loc.is_empty() {
                        msg.to_string()
                    } else {
                        format!("{}: {msg}", loc.join("."))
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => {
            let kind = v.get("error").and_then(Value::as_str).filter(|s| !s.is_empty());
            let what = v.get("errors").and_then(Value::as_str).filter(|s| !s.is_empty());
            match (kind, what) {
                (Some(k), Some(w)) => Some(format!("{k}: {w}")),
                (k, w) => k.or(w).map(str::to_owned),
            }
        }
    });
    super::error_text(from_json, body)
}

/// The adapter's parsers on an untrusted answer (fuzzing): as a 2xx answer, and as an error.
pub(super) fn untrusted(status: StatusCode, body: &Bytes) {
    let _ = parse_answer(body, 2);
    let _ = classify_error(status, body, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_settings_come_from_the_answer() {
        let png = "iVBORw0KGgo".to_string() + &"A".repeat(400) + "=";
        let info = serde_json::json!({"seed": 1234, "all_seeds": [1234, 1235], "steps": 25, "cfg_scale": 6.5,
            "sampler_name": "DPM++ 2M", "sd_model_name": "sd_xl_base_1.0", "sd_model_hash": "31e35c80fc",
            "infotexts": ["x".repeat(400)]})
        .to_string();
        let body = serde_json::json!({"images": [png, png, "aGk="], "parameters": {}, "info": info}).to_string();
        let body = Bytes::from(body);
        let g = parse_answer(&body, 2).unwrap();
        assert_eq!(g.images.len(), 2, "only the batch, not what extensions append");
        assert!(matches!(&g.images[0], Image::Base64(b) if b.len() == png.len()));
        assert_eq!(
            g.settings,
            Settings {
                seed: Some(1234),
                steps: Some(25),
                guidance: Some(6.5),
                sampler: Some("DPM++ 2M".into()),
                model: Some("sd_xl_base_1.0 [31e35c80fc]".into()),
            }
        );
        // A short info and a data URL image.
        let body = Bytes::from(format!(r#"{{"images":["data:image/png;base64,{png}"],"info":"{{\"seed\":7}}"}}"#));
        let g = parse_answer(&body, 1).unwrap();
        assert_eq!(g.settings.seed, Some(7));
        assert!(matches!(&g.images[0], Image::Base64(b) if b.len() == png.len()));
    }

    #[test]
    fn bad_answers_are_bad_responses() {
        for body in [r#"{"images":[]}"#, r#"{"images":["!!!!"]}"#, "<html>", r#"{"images":"x"}"#] {
            let e = parse_answer(Bytes::from(body), 1).unwrap_err();
            assert_eq!(e.label(), "bad_response", "{body}");
        }
        // An unreadable info costs the settings, not the images.
        let g = parse_answer(Bytes::from(r#"{"images":["aGk="],"info":"not json"}"#), 1).unwrap();
        assert_eq!(g.settings, Settings::default());
    }

    #[test]
    fn errors_are_classified() {
        let e = classify_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"detail":[{"loc":["body","steps"],"msg":"value is not a valid integer","type":"type_error.integer"}]}"#,
            None,
        );
        let ProviderError::Rejected { status, body } = &e else { panic!("{e:?}") };
        assert_eq!(*status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("body.steps: value is not a valid integer"), "{v}");
        let e = classify_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory."}"#,
            None,
        );
        assert_eq!(e.to_string(), "upstream answered 500 Internal Server Error: OutOfMemoryError: CUDA out of memory.");
        assert!(classify_error(StatusCode::NOT_FOUND, br#"{"detail":"Not Found"}"#, None).retryable());
        assert!(!classify_error(StatusCode::NOT_FOUND, br#"{"detail":"Sampler not found"}"#, None).retryable());
        assert!(classify_error(StatusCode::UNAUTHORIZED, br#"{"detail":"Incorrect username or password"}"#, None)
            .retryable());
    }

    #[test]
    fn mask_alpha_is_read_from_the_png_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x04\0\0\0\x04\x08\x06".to_vec();
        assert!(png_has_alpha(&png), "colour type 6: RGBA");
        // Grey with alpha: sent as RGBA with the same transparency.
        let la = image::GrayAlphaImage::from_fn(4, 4, |x, _| image::LumaA([0, if x < 2 { 0 } else { 255 }]));
        let mut la_png = Vec::new();
        la.write_to(&mut std::io::Cursor::new(&mut la_png), image::ImageFormat::Png).unwrap();
        assert!(!png_has_alpha(&la_png) && png_other_alpha(&la_png));
        let part = FilePart {
            field: "mask".into(),
            filename: "m.png".into(),
            content_type: "image/png".into(),
            bytes: la_png.into(),
        };
        let rgba = mask_as_rgba(&part).unwrap().expect("converted");
        assert!(png_has_alpha(&rgba.bytes));
        let back = image::load_from_memory(&rgba.bytes).unwrap().to_rgba8();
        assert_eq!((back.get_pixel(0, 0)[3], back.get_pixel(3, 0)[3]), (0, 255));
        // No transparency: left as it is.
        let mut rgb_png = Vec::new();
        image::RgbImage::new(4, 4).write_to(&mut std::io::Cursor::new(&mut rgb_png), image::ImageFormat::Png).unwrap();
        let rgb = FilePart { bytes: rgb_png.into(), ..part.clone() };
        assert!(!png_other_alpha(&rgb.bytes) && mask_as_rgba(&rgb).unwrap().is_none());
        // Too large to convert: refused from its header, before anything is decoded.
        let mut big = Vec::new();
        image::GrayAlphaImage::new(8000, 8000)
            .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
            .unwrap();
        let big = FilePart { bytes: big.into(), ..part.clone() };
        let e = mask_as_rgba(&big).unwrap_err();
        assert!(e.contains("8000x8000") && e.contains("RGBA"), "{e}");
        png[25] = 2;
        assert!(!png_has_alpha(&png), "colour type 2: RGB");
        assert!(!png_has_alpha(b"GIF89a"));
    }

    /// Each documented error answer gets its class.
    #[test]
    fn documented_errors_get_their_class() {
        let cases: &[(u16, &str, &str)] = &[
            (
                422,
                r#"{"detail":[{"loc":["body","steps"],"msg":"value is not a valid integer","type":"type_error.integer"}]}"#,
                "client",
            ),
            (422, r#"{"error":"HTTPException","detail":"Script 'x' not found","body":"","errors":""}"#, "client"),
            (404, r#"{"error":"HTTPException","detail":"Sampler not found","body":"","errors":""}"#, "client"),
            (404, r#"{"detail":"Not Found"}"#, "account"),
            (
                401,
                r#"{"error":"HTTPException","detail":"Incorrect username or password","body":"","errors":""}"#,
                "account",
            ),
            (500, r#"{"error":"HTTPException","detail":"Invalid encoded image","body":"","errors":""}"#, "client"),
            (
                500,
                r#"{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory. Tried to allocate 2.00 GiB"}"#,
                "transient",
            ),
        ];
        for (status, body, want) in cases {
            let e = classify_error(StatusCode::from_u16(*status).unwrap(), body.as_bytes(), None);
            assert_eq!(super::super::errors::class_of(&e), *want, "{status} {body}");
        }
    }
}
