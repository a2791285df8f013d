//! The OpenAI Images API (`kind = "openai"`): POST {base}/images/generations (JSON),
//! {base}/images/edits and {base}/images/variations (multipart; `n` read from the form), with
//! base `/v1`; answers `{"created", "data": [{"b64_json"}...]}` and OpenAI-shaped errors. The
//! GPT image models' parameters are checked against the Images API reference's allowed values
//! (`background`, `output_format`, `output_compression` 0-100, `moderation`, `quality`,
//! `input_fidelity` on edits only, at most 16 `image[]` files and one `mask` on edits), and a
//! bad one is answered 400 naming it, as OpenAI does.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

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
        let fields: Vec<(String, String)> = match &form {
            Some(form) => form
                .iter()
                .filter(|p| p.filename.is_none())
                .map(|p| (p.name.clone(), String::from_utf8_lossy(&p.data).into_owned()))
                .collect(),
            None => serde_json::from_slice::<Value>(&call.req.body)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect(),
        };
        if let Some(bad) = check_gpt_image(&fields, call.req.endpoint == Some("edits")) {
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
        let n = match form {
            Some(form) => {
                form.iter().find(|p| p.name == "n").and_then(|p| std::str::from_utf8(&p.data).ok()?.trim().parse().ok())
            }
            None => serde_json::from_slice::<Value>(&call.req.body).ok().and_then(|v| v.get("n")?.as_u64()),
        }
        .unwrap_or(1)
        .clamp(1, 10);
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
