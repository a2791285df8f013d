//! Azure OpenAI's image REST API (`kind = "azure_openai"`): POST
//! /openai/deployments/{deployment}/images/{generations|edits}?api-version=... with the key in
//! `api-key` (give the mock `.credential("api-key", [KEY])`; edits only from api-version
//! 2025-04-01-preview, as Azure serves them), OpenAI-shaped JSON and multipart
//! bodies, answers with `revised_prompt` and content-filter results, `b64_json` or a `url` into
//! the mock's own blob store (GET /blobs/*), and Azure's error bodies
//! (`{"error": {"code", "message"}}`).

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

/// The first `api-version` with `images/edits` (and the GPT image models' fields).
const EDITS_FROM: &str = "2025-04-01-preview";

/// The `revised_prompt` of every image: as long as DALL·E 3's usually are (several hundred
/// characters), with a quote, an escaped slash's character and non-ASCII text.
pub const REVISED_PROMPT: &str = "A serene lighthouse stands on a rocky outcrop at dusk, its beam sweeping across a \
    calm, slate-blue sea. The sky fades from apricot near the horizon to deep indigo overhead, with the first \
    stars appearing. Gulls circle the lantern room; a weathered sign reads \"Keep off / Défense d'entrer\". \
    Soft reflections ripple on the wet rocks, and a narrow path of worn stone steps leads up to a red door.";

/// An Azure OpenAI resource with these deployments.
pub struct AzureOpenAi {
    deployments: Vec<String>,
}

impl AzureOpenAi {
    pub fn new(deployments: &[&str]) -> AzureOpenAi {
        AzureOpenAi { deployments: deployments.iter().map(|d| d.to_string()).collect() }
    }
}

/// An Azure error answer.
pub fn azure_error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, &json!({"error": {"code": code, "message": message}}))
}

/// `(deployment, operation)` of an image API path.
fn deployment_of(path: &str) -> Option<(&str, &str)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["openai", "deployments", d, "images", op @ ("generations" | "edits")] => Some((d, op)),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Shape for AzureOpenAi {
    fn route(&self, req: &Captured) -> Option<Endpoint> {
        // Where the answers with `url` point (a stand-in for Azure's blob storage).
        if req.method == "GET" && req.path.starts_with("/blobs/") {
            return Some(Endpoint::other("blob").open());
        }
        let (_, op) = deployment_of(&req.path).filter(|_| req.method == "POST")?;
        let version = req.query.as_deref().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("api-version="));
        let version = version.filter(|v| !v.is_empty())?;
        // `images/edits` exists from 2025-04-01-preview on (the GA 2024-10-21 spec has
        // generations only): before it, Azure answers 404 "Resource not found".
        if op != "generations" && version < EDITS_FROM {
            return None;
        }
        Some(Endpoint::generation(if op == "generations" { "generations" } else { "edits" }))
    }

    async fn serve(&self, _endpoint: &'static str, call: Call<'_>) -> Reply {
        Reply::raw(200, "image/png", call.png().to_vec())
    }

    /// Unknown deployments are refused; otherwise `n` images in the asked `response_format`.
    async fn generate(&self, call: Call<'_>) -> Reply {
        let (deployment, op) = deployment_of(&call.req.path).expect("routed");
        if !self.deployments.iter().any(|d| d == deployment) {
            return azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
            );
        }
        let (n, format) = if op == "generations" {
            let v: Value = match serde_json::from_slice(&call.req.body) {
                Ok(v) => v,
                Err(_) => return azure_error(400, "BadRequest", "The request body is not valid JSON."),
            };
            (v["n"].as_u64().unwrap_or(1), v["response_format"].as_str().unwrap_or("b64_json").to_string())
        } else {
            let Some(form) = call.req.try_form().await else {
                return azure_error(400, "BadRequest", "the body is not a multipart form");
            };
            if !form.iter().any(|p| p.name.starts_with("image") && p.filename.is_some()) {
                return azure_error(400, "invalid_request_error", "image is required");
            }
            let text = |name: &str| {
                form.iter().find(|p| p.name == name).map(|p| String::from_utf8_lossy(&p.data).into_owned())
            };
            (text("n").and_then(|n| n.parse().ok()).unwrap_or(1), text("response_format").unwrap_or("b64_json".into()))
        };
        let filter = json!({"hate": {"filtered": false, "severity": "safe"}, "sexual": {"filtered": false, "severity": "safe"},
            "violence": {"filtered": false, "severity": "safe"}, "self_harm": {"filtered": false, "severity": "safe"}});
        let data: Vec<Value> = call
            .images(n as usize)
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let mut item = json!({"revised_prompt": REVISED_PROMPT, "content_filter_results": filter,
                    "prompt_filter_results": filter});
                if format == "url" {
                    item["url"] = json!(format!("http://{}/blobs/{deployment}-{i}.png?sig=abc", call.addr));
                } else {
                    item["b64_json"] = json!(b64_encode(image));
                }
                item
            })
            .collect();
        Reply::json(200, &json!({"created": 1_700_000_000u64, "data": data}))
    }

    fn error(&self, status: u16) -> Reply {
        azure_error(status, &status.to_string(), &format!("mock provider failure {status}"))
    }

    fn not_found(&self, _req: &Captured) -> Reply {
        azure_error(404, "404", "Resource not found")
    }

    fn unauthorized(&self) -> Reply {
        azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        )
    }
}
