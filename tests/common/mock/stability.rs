//! Stability AI's v2beta Stable Image generate endpoints (`kind = "stability"`), checked the way
//! Stability documents them: POST /v2beta/stable-image/generate/{ultra|core|sd3}, a bearer key
//! (give the mock `.credential("authorization", ["Bearer ..."])`), `accept`, multipart fields
//! and their allowed values. Answers `{"image", "finish_reason", "seed"}` JSON, or the raw image
//! bytes with `finish-reason` and `seed` headers (`answer_bytes`), `{"id", "name", "errors"}`
//! error bodies, 403 content_moderation for "forbidden" prompts and CONTENT_FILTERED for
//! "blurred" ones.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

pub const RATIOS: [&str; 9] = ["16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"];
pub const PRESETS: [&str; 17] = [
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
pub const SD3_MODELS: [&str; 4] = ["sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"];
/// The mock's seed when the request names none (then one more per call).
pub const FIRST_RANDOM_SEED: u64 = 3_141_592;

/// The Stable Image API.
pub struct StableImage {
    /// Answer with the image bytes (what `accept: image/*` gets) instead of JSON.
    bytes: AtomicBool,
    next_seed: AtomicU64,
}

impl Default for StableImage {
    fn default() -> StableImage {
        StableImage { bytes: AtomicBool::new(false), next_seed: AtomicU64::new(FIRST_RANDOM_SEED) }
    }
}

impl StableImage {
    /// From now on answer with the image bytes and `finish-reason`/`seed` headers.
    pub fn answer_bytes(&self, bytes: bool) {
        self.bytes.store(bytes, Ordering::SeqCst);
    }
}

/// A Stability error answer.
pub fn stability_error(status: u16, name: &str, error: &str) -> Reply {
    Reply::json(status, &json!({"id": "4f1c0b1e9d2a4c7e8b3f5a6d7e8f9a0b", "name": name, "errors": [error]}))
}

#[async_trait::async_trait]
impl Shape for StableImage {
    fn route(&self, req: &Captured) -> Option<Endpoint> {
        match req.path.strip_prefix("/v2beta/stable-image/generate/").filter(|_| req.method == "POST")? {
            "ultra" => Some(Endpoint::generation("ultra")),
            "core" => Some(Endpoint::generation("core")),
            "sd3" => Some(Endpoint::generation("sd3")),
            _ => None,
        }
    }

    async fn generate(&self, call: Call<'_>) -> Reply {
        let accept = call.req.header("accept").unwrap_or_default();
        if accept != "application/json" && accept != "image/*" {
            return stability_error(400, "bad_request", "accept: must be application/json or image/*");
        }
        let Some(form) = call.req.try_form().await else {
            return stability_error(400, "bad_request", "body must be multipart/form-data");
        };
        let field =
            |name: &str| form.iter().find(|p| p.name == name).map(|p| String::from_utf8_lossy(&p.data).into_owned());
        let allowed: &[&str] = match call.req.endpoint {
            Some("sd3") => &[
                "prompt",
                "negative_prompt",
                "aspect_ratio",
                "seed",
                "output_format",
                "style_preset",
                "model",
                "mode",
                "cfg_scale",
            ],
            _ => &["prompt", "negative_prompt", "aspect_ratio", "seed", "output_format", "style_preset"],
        };
        if let Some(p) = form.iter().find(|p| !allowed.contains(&p.name.as_str())) {
            return stability_error(400, "bad_request", &format!("{}: unknown parameter", p.name));
        }
        let prompt = field("prompt").unwrap_or_default();
        if prompt.trim().is_empty() {
            return stability_error(400, "bad_request", "prompt: cannot be empty");
        }
        if let Some(r) = field("aspect_ratio").filter(|r| !RATIOS.contains(&r.as_str())) {
            return stability_error(400, "bad_request", &format!("aspect_ratio: {r} is not one of {RATIOS:?}"));
        }
        if let Some(s) = field("style_preset").filter(|s| !PRESETS.contains(&s.as_str())) {
            return stability_error(400, "bad_request", &format!("style_preset: {s} is not a preset"));
        }
        if let Some(m) = field("model").filter(|m| !SD3_MODELS.contains(&m.as_str())) {
            return stability_error(400, "bad_request", &format!("model: {m} is not an SD3 model"));
        }
        if field("output_format").is_some_and(|f| !["png", "jpeg", "webp"].contains(&f.as_str())) {
            return stability_error(400, "bad_request", "output_format: must be png, jpeg or webp");
        }
        // SD3 writes PNG or JPEG only.
        if call.req.endpoint == Some("sd3") && field("output_format").as_deref() == Some("webp") {
            return stability_error(400, "bad_request", "output_format: must be one of png, jpeg");
        }
        let seed = match field("seed") {
            None => self.next_seed.fetch_add(1, Ordering::SeqCst),
            Some(s) => match s.parse::<u64>() {
                Ok(v) if v <= 4_294_967_294 => v,
                _ => return stability_error(400, "bad_request", "seed: must be an integer from 0 to 4294967294"),
            },
        };
        // Prompts moderation refuses outright, and outputs it blurs and marks.
        if prompt.contains("forbidden") {
            return stability_error(
                403,
                "content_moderation",
                "Your request was flagged by the content moderation system and denied; you were not charged.",
            );
        }
        let finish = if prompt.contains("blurred") { "CONTENT_FILTERED" } else { "SUCCESS" };
        let image = call.images(1).swap_remove(0);
        if self.bytes.load(Ordering::SeqCst) {
            let format = field("output_format").unwrap_or_else(|| "png".into());
            return Reply::raw(200, &format!("image/{format}"), image)
                .header("finish-reason", finish)
                .header("seed", seed);
        }
        Reply::json(200, &json!({"image": b64_encode(&image), "finish_reason": finish, "seed": seed}))
    }

    fn error(&self, status: u16) -> Reply {
        stability_error(status, "mock_error", &format!("mock provider failure {status}"))
    }

    fn not_found(&self, req: &Captured) -> Reply {
        stability_error(404, "not_found", &format!("mock: no such endpoint {}", req.path))
    }

    fn unauthorized(&self) -> Reply {
        stability_error(401, "unauthorized", "missing or invalid API key")
    }
}
