//! The OpenAI Images API (`kind = "openai"`): POST {base}/images/generations (JSON),
//! {base}/images/edits and {base}/images/variations (multipart; `n` read from the form), with
//! base `/v1`; answers `{"created", "data": [{"b64_json"}...]}` and OpenAI-shaped errors. The
//! fields OpenAI's own models (`dall-e-2`, `dall-e-3`, `gpt-image-*`) do not take are refused with
//! 400 `unknown_parameter` as OpenAI refuses them (any field goes for other model names: other
//! servers that speak the API). The
//! GPT image models' parameters are checked against the Images API reference's allowed values
//! (`background`, `output_format`, `output_compression` 0-100, `moderation`, `quality`,
//! `input_fidelity` on edits only, at most 16 `image[]` files and one `mask` on edits), and a
//! bad one is answered 400 naming it, as OpenAI does.
//! A request with `stream: true` (JSON, or `"true"` in a form) is answered as OpenAI streams
//! images: `text/event-stream`, `partial_images` partial events (`image_generation.partial_image`
//! or `image_edit.partial_image`, `partial_image_index` from 0), then one `*.completed` event per
//! image with `usage` (OpenAI Images API reference, "Image generation streaming events").

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::{b64_encode, make_png, png_dims};

/// `created_at` of every streamed event the mock sends (fixed, so tests can tell a relayed
/// event from one the gateway made).
pub const STREAM_CREATED_AT: u64 = 1_750_000_123;

/// The shade of the mock's partial image `index` (a flat grey, distinct per index and from the
/// final image).
pub fn partial_png(width: u32, height: u32, index: u32) -> Vec<u8> {
    let v = 40 + 50 * index as u8;
    make_png(width, height, [v, v, v])
}

/// The `usage` of a streamed answer with `partials` partial images (each partial costs 100
/// output tokens, as OpenAI prices them).
pub fn stream_usage(partials: u64) -> Value {
    let output = 272 + 100 * partials;
    json!({"input_tokens": 22, "input_tokens_details": {"image_tokens": 0, "text_tokens": 22},
           "output_tokens": output, "total_tokens": 22 + output})
}

/// The OpenAI Images API shape (no credential check unless the mock is given one).
pub struct OpenAiImages;

/// OpenAI's 400 for a parameter outside its allowed values.
fn invalid_value(param: &str, message: String) -> Reply {
    Reply::json(
        400,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}}),
    )
}

/// The first GPT image parameter of `fields` (as text) outside the documented values.
fn check_gpt_image(fields: &[(String, String)], edit: bool) -> Option<Reply> {
    let allowed: [(&str, &[&str]); 5] = [
        ("background", &["transparent", "opaque", "auto"]),
        ("output_format", &["png", "jpeg", "webp"]),
        ("moderation", &["low", "auto"]),
        ("quality", &["low", "medium", "high", "auto", "standard", "hd"]),
        ("input_fidelity", &["high", "low"]),
    ];
    for (k, v) in fields {
        if let Some((_, values)) = allowed.iter().find(|(name, _)| name == k) {
            if !values.contains(&v.as_str()) {
                return Some(invalid_value(k, format!("Invalid value: '{v}'. Supported values are: {values:?}.")));
            }
        }
        if k == "output_compression" && !v.parse::<u8>().is_ok_and(|c| c <= 100) {
            return Some(invalid_value(k, format!("output_compression must be between 0 and 100, got {v}")));
        }
        if k == "input_fidelity" && !edit {
            return Some(invalid_value(k, "Unknown parameter: 'input_fidelity'.".into()));
        }
    }
    None
}

/// OpenAI's 400 for a field the model does not take.
fn unknown_parameter(param: &str) -> Reply {
    Reply::json(
        400,
        &json!({"error": {"message": format!("Unknown parameter: '{param}'."), "type": "invalid_request_error",
            "param": param, "code": "unknown_parameter"}}),
    )
}

/// For OpenAI's own models (`dall-e-2`, `dall-e-3`, `gpt-image-*`), the first field the model
/// does not take on `endpoint`, as the Images API reference lists them (openai-python's
/// `image_generate_params`, `image_edit_params`, `image_create_variation_params`): OpenAI refuses
/// it with 400 `unknown_parameter` (`response_format` to a GPT image model, `seed` to any).
/// Other model names are other servers that speak the API: anything goes.
fn check_model_fields(fields: &serde_json::Map<String, Value>, endpoint: &str) -> Option<Reply> {
    let model = fields.get("model").and_then(Value::as_str).unwrap_or("dall-e-2");
    let gpt_image = model.starts_with("gpt-image");
    if !gpt_image && model != "dall-e-2" && model != "dall-e-3" {
        return None;
    }
    let mut allowed = vec!["model", "n", "size", "user"];
    if !gpt_image {
        allowed.push("response_format");
    }
    match endpoint {
        "generations" => {
            allowed.extend(["prompt", "quality"]);
            if model == "dall-e-3" {
                allowed.push("style");
            }
            if gpt_image {
                allowed.extend([
                    "background",
                    "moderation",
                    "output_compression",
                    "output_format",
                    "partial_images",
                    "stream",
                ]);
            }
        }
        "edits" => {
            allowed.extend(["prompt", "quality"]);
            if gpt_image {
                allowed.extend([
                    "background",
                    "input_fidelity",
                    "output_compression",
                    "output_format",
                    "partial_images",
                    "stream",
                ]);
            }
        }
        _ => {}
    }
    fields.keys().find(|k| !allowed.contains(&k.as_str())).map(|k| unknown_parameter(k))
}

/// An OpenAI error answer.
pub fn openai_error(status: u16, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"error": {
            "message": message,
            "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
            "param": null,
            "code": null,
        }}),
    )
}

#[async_trait::async_trait]
impl Shape for OpenAiImages {
    fn base_path(&self) -> &'static str {
        "/v1"
    }

    fn route(&self, req: &Captured) -> Option<Endpoint> {
        let op = req.path.strip_prefix("/v1/images/")?;
        match (req.method.as_str(), op) {
            ("POST", "generations") => Some(Endpoint::generation("generations")),
            ("POST", "edits") => Some(Endpoint::generation("edits")),
            ("POST", "variations") => Some(Endpoint::generation("variations")),
            _ => None,
        }
    }

    async fn generate(&self, call: Call<'_>) -> Reply {
        let form = call.req.try_form().await;
        // The request's fields as JSON values (a form's text fields as strings).
        let (fields, edit) = match &form {
            Some(form) => {
                let text_parts = form.iter().filter(|p| p.filename.is_none());
                let fields =
                    text_parts.map(|p| (p.name.clone(), Value::String(String::from_utf8_lossy(&p.data).into_owned())));
                (fields.collect::<serde_json::Map<_, _>>(), true)
            }
            None => (
                serde_json::from_slice::<Value>(&call.req.body)
                    .ok()
                    .and_then(|v| v.as_object().cloned())
                    .unwrap_or_default(),
                false,
            ),
        };
        let strings: Vec<(String, String)> =
            fields.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect();
        if let Some(bad) = check_model_fields(&fields, call.req.endpoint.unwrap_or("generations")) {
            return bad;
        }
        if let Some(bad) = check_gpt_image(&strings, call.req.endpoint == Some("edits")) {
            return bad;
        }
        if let Some(form) = &form {
            let images = form.iter().filter(|p| p.name == "image" || p.name == "image[]").count();
            if images > 16 {
                return invalid_value("image", format!("At most 16 images may be edited at once, got {images}."));
            }
            if form.iter().filter(|p| p.name == "mask").count() > 1 {
                return invalid_value("mask", "Only one mask may be given.".into());
            }
        }
        let number = |k: &str| match fields.get(k) {
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(v) => v.as_u64(),
            None => None,
        };
        let n = number("n").unwrap_or(1).clamp(1, 10);
        let streamed = matches!(fields.get("stream"), Some(Value::Bool(true)))
            || fields.get("stream").and_then(Value::as_str) == Some("true");
        if streamed {
            return stream_reply(&call, &fields, n, number("partial_images").unwrap_or(0).min(3), edit);
        }
        let data: Vec<Value> = call.images(n as usize).iter().map(|i| json!({"b64_json": b64_encode(i)})).collect();
        let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        Reply::json(200, &json!({"created": created, "data": data}))
    }

    fn error(&self, status: u16) -> Reply {
        openai_error(status, &format!("mock provider failure {status}"))
    }

    fn not_found(&self, _req: &Captured) -> Reply {
        openai_error(404, "mock: no such endpoint")
    }
}

/// A streamed answer: partials, then one completed event per image, as OpenAI writes them.
fn stream_reply(call: &Call<'_>, fields: &serde_json::Map<String, Value>, n: u64, partials: u64, edit: bool) -> Reply {
    let prefix = if edit { "image_edit" } else { "image_generation" };
    let text = |k: &str, default: &str| fields.get(k).and_then(Value::as_str).unwrap_or(default).to_string();
    let common = json!({
        "created_at": STREAM_CREATED_AT,
        "size": text("size", "1024x1024"),
        "quality": text("quality", "medium"),
        "background": text("background", "opaque"),
        "output_format": text("output_format", "png"),
    });
    let mut body = String::new();
    let mut event = |kind: String, mut v: Value, extra: Value| {
        v["type"] = kind.clone().into();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        body.push_str(&format!("event: {kind}\ndata: {v}\n\n"));
    };
    let images = call.images(n as usize);
    let (w, h) = png_dims(&images[0]);
    for i in 0..partials {
        let b64 = b64_encode(&partial_png(w, h, i as u32));
        event(format!("{prefix}.partial_image"), common.clone(), json!({"b64_json": b64, "partial_image_index": i}));
    }
    for image in &images {
        event(
            format!("{prefix}.completed"),
            common.clone(),
            json!({"b64_json": b64_encode(image), "usage": stream_usage(partials)}),
        );
    }
    Reply::raw(200, "text/event-stream; charset=utf-8", body)
}
