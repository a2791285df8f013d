//! The OpenAI Images API (`kind = "openai"`): POST {base}/images/generations (JSON),
//! {base}/images/edits and {base}/images/variations (multipart; `n` read from the form), with
//! base `/v1`; answers `{"created", "data": [{"b64_json"}...]}` and OpenAI-shaped errors.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

/// The OpenAI Images API shape (no credential check unless the mock is given one).
pub struct OpenAiImages;

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
        let n = match call.req.try_form().await {
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
