//! Vertex AI Imagen's `:predict` endpoint (`kind = "vertex_imagen"`), checked the way Google
//! documents it: POST {base}/projects/{project}/locations/{location}/publishers/google/models/
//! {model}:predict with base `/v1`, a bearer token (give the mock
//! `.credential("authorization", ["Bearer ..."])`), `instances`/`parameters` fields, seed only
//! without watermark, 1..=4 samples, `negativePrompt` only on the models before Imagen 3's GA. Answers base64 predictions, `raiFilteredReason` for
//! filtered images ("forbidden" prompts lose every image, "partly" ones all but the first) and
//! Google error bodies.

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

pub const RATIOS: [&str; 5] = ["1:1", "3:4", "4:3", "9:16", "16:9"];
/// Every `parameters` field of the predict API the adapter could legitimately send.
pub const KNOWN_PARAMETERS: [&str; 13] = [
    "sampleCount",
    "aspectRatio",
    "negativePrompt",
    "seed",
    "addWatermark",
    "personGeneration",
    "includeRaiReason",
    "outputOptions",
    "safetySetting",
    "language",
    "enhancePrompt",
    "storageUri",
    "sampleImageSize",
];

/// Imagen on one project, location and model.
pub struct VertexImagen {
    prefix: String,
    model: String,
}

impl VertexImagen {
    pub fn new(project: &str, location: &str, model: &str) -> VertexImagen {
        VertexImagen {
            prefix: format!("/v1/projects/{project}/locations/{location}/publishers/google/models/"),
            model: model.to_string(),
        }
    }
}

/// A Google API error answer.
pub fn google_error(code: u16, status: &str, message: &str) -> Reply {
    Reply::json(code, &json!({"error": {"code": code, "message": message, "status": status}}))
        .with_type("application/json; charset=UTF-8")
}

#[async_trait::async_trait]
impl Shape for VertexImagen {
    fn base_path(&self) -> &'static str {
        "/v1"
    }

    fn route(&self, req: &Captured) -> Option<Endpoint> {
        let model = req.path.strip_prefix(&self.prefix).and_then(|rest| rest.strip_suffix(":predict"));
        (req.method == "POST" && model == Some(self.model.as_str())).then(|| Endpoint::generation("predict"))
    }

    async fn generate(&self, call: Call<'_>) -> Reply {
        let v: Value = match serde_json::from_slice(&call.req.body) {
            Ok(v) => v,
            Err(e) => return google_error(400, "INVALID_ARGUMENT", &format!("Invalid JSON payload received. {e}")),
        };
        let Some(prompt) = v["instances"][0]["prompt"].as_str() else {
            return google_error(400, "INVALID_ARGUMENT", "instances[0].prompt is required");
        };
        let params = v["parameters"].as_object().cloned().unwrap_or_default();
        if let Some(unknown) = params.keys().find(|k| !KNOWN_PARAMETERS.contains(&k.as_str())) {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!("Invalid JSON payload received. Unknown name \"{unknown}\""),
            );
        }
        // Only the models before Imagen 3's GA take a negative prompt.
        let old_model = self.model.starts_with("imagegeneration@")
            || ["imagen-3.0-generate-001", "imagen-3.0-fast-generate-001", "imagen-3.0-capability-001"]
                .contains(&self.model.as_str());
        if params.contains_key("negativePrompt") && !old_model {
            return google_error(400, "INVALID_ARGUMENT", "Setting negativePrompt is no longer supported.");
        }
        let count = params.get("sampleCount").and_then(Value::as_u64).unwrap_or(4);
        if !(1..=4).contains(&count) {
            return google_error(400, "INVALID_ARGUMENT", "sampleCount must be between 1 and 4");
        }
        if let Some(r) = params.get("aspectRatio") {
            if !r.as_str().is_some_and(|r| RATIOS.contains(&r)) {
                return google_error(400, "INVALID_ARGUMENT", &format!("unsupported aspectRatio {r}"));
            }
        }
        // outputOptions: mimeType image/png or image/jpeg, compressionQuality 0-100 (JPEG only).
        let mime = params.get("outputOptions").and_then(|o| o.get("mimeType")).and_then(Value::as_str);
        let mime = mime.unwrap_or("image/png").to_string();
        if !["image/png", "image/jpeg"].contains(&mime.as_str()) {
            return google_error(400, "INVALID_ARGUMENT", &format!("unsupported outputOptions.mimeType {mime}"));
        }
        if let Some(q) = params.get("outputOptions").and_then(|o| o.get("compressionQuality")) {
            if mime != "image/jpeg" || q.as_u64().is_none_or(|q| q > 100) {
                return google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "outputOptions.compressionQuality must be 0-100, with mimeType image/jpeg",
                );
            }
        }
        if let Some(s) = params.get("safetySetting") {
            let known = ["block_low_and_above", "block_medium_and_above", "block_only_high", "block_none"];
            if !s.as_str().is_some_and(|s| known.contains(&s)) {
                return google_error(400, "INVALID_ARGUMENT", &format!("unsupported safetySetting {s}"));
            }
        }
        if params.contains_key("seed") && params.get("addWatermark") != Some(&json!(false)) {
            return google_error(400, "INVALID_ARGUMENT", "seed is not supported when addWatermark is enabled");
        }
        let filtered =
            json!({"raiFilteredReason": "mock: images removed for violating the usage guidelines (code 58061214)"});
        let predictions: Vec<Value> = call
            .images(count as usize)
            .iter()
            .enumerate()
            .map(|(i, image)| {
                if prompt.contains("forbidden") || (prompt.contains("partly") && i > 0) {
                    filtered.clone()
                } else {
                    json!({"mimeType": mime, "bytesBase64Encoded": b64_encode(image)})
                }
            })
            .collect();
        Reply::json(200, &json!({ "predictions": predictions })).with_type("application/json; charset=UTF-8")
    }

    fn error(&self, status: u16) -> Reply {
        let name = match status {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        google_error(status, name, &format!("mock provider failure {status}"))
    }

    fn not_found(&self, req: &Captured) -> Reply {
        google_error(404, "NOT_FOUND", &format!("mock: no such endpoint {} {}", req.method, req.path))
    }

    fn unauthorized(&self) -> Reply {
        google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        )
    }

    fn content_type(&self) -> &'static str {
        "application/json; charset=UTF-8"
    }
}
