//! Replicate's predictions API (`kind = "replicate"`), as its public docs describe it: create
//! (POST {base}/models/{owner}/{name}/predictions or {base}/predictions with a version), get
//! (GET {base}/predictions/{id}, polled through a list of states) and cancel (POST
//! {base}/predictions/{id}/cancel), with base `/v1` and a bearer token (give the mock
//! `.credential("authorization", ["Bearer ..."])`). The mock also hosts the output images (GET
//! /files/{id}/out-{i}.png, no token; /files/redirect sends to localhost). The create is the
//! generation call: the mock's status, script and faults apply to it.

use std::sync::Mutex;

use serde_json::{json, Value};

use super::{hosted_file, Call, Captured, Endpoint, Jobs, Mock, Reply, Shape};
use crate::common::make_png;

/// The seed the model "reports" in its logs, unlike any the tests ask for.
pub const LOGGED_SEED: u64 = 31337;
/// The version the mock says it ran.
pub const VERSION: &str = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";

/// The image at /files/*/out-{i}.png.
pub fn png_for(i: usize) -> Vec<u8> {
    make_png(8, 8, [30, 40 * i as u8 + 10, 220])
}

/// The id of the `n`th accepted prediction (from 1).
pub fn prediction_id(n: usize) -> String {
    format!("gm3qorzdhgbfurvjtvhg6dckhu{n:02}")
}

/// The predictions.
pub struct Predictions {
    /// Prediction statuses the polls see, in order, per prediction; the last one repeats.
    statuses: Jobs<&'static str>,
    /// The `error` of a failed prediction.
    error: Mutex<Option<String>>,
    /// The `output` of a succeeded prediction instead of the mock's own image URLs.
    output: Mutex<Option<Value>>,
}

impl Default for Predictions {
    /// Starting, processing, then succeeded.
    fn default() -> Predictions {
        Predictions {
            statuses: Jobs::new(vec!["starting", "processing", "succeeded"]),
            error: Mutex::new(None),
            output: Mutex::new(None),
        }
    }
}

impl Predictions {
    /// A prediction object as Replicate's API shows it.
    fn prediction(&self, addr: std::net::SocketAddr, id: &str, status: &str, input: &Value) -> Value {
        let base = format!("http://{addr}/v1");
        let n = input["num_outputs"].as_u64().unwrap_or(1) as usize;
        let (output, error, logs, metrics) = match status {
            "succeeded" => (
                self.output.lock().unwrap().clone().unwrap_or_else(|| {
                    json!((0..n).map(|i| format!("http://{addr}/files/{id}/out-{i}.png")).collect::<Vec<_>>())
                }),
                Value::Null,
                format!("Using seed: {LOGGED_SEED}\n  0%|          | 0/4\n100%|##########| 4/4\n"),
                json!({"predict_time": 2.5}),
            ),
            "failed" => (Value::Null, json!(self.error.lock().unwrap().clone()), String::new(), json!({})),
            "processing" => (Value::Null, Value::Null, format!("Using seed: {LOGGED_SEED}\n"), json!({})),
            _ => (Value::Null, Value::Null, String::new(), json!({})),
        };
        json!({"id": id, "model": "acme/sdxl", "version": VERSION, "input": input, "logs": logs,
            "output": output, "error": error, "status": status, "created_at": "2025-01-01T00:00:00.000Z",
            "data_removed": false, "metrics": metrics,
            "urls": {"get": format!("{base}/predictions/{id}"), "cancel": format!("{base}/predictions/{id}/cancel"),
                "stream": "https://stream.replicate.com/v1/files/x"}})
    }
}

/// The `input` of the last accepted create.
fn last_input(call: &Call<'_>) -> Value {
    call.accepted_calls_to("create").pop().map(|c| c.json()["input"].clone()).unwrap_or_default()
}

/// The input of prediction `id` (the `n`th create's), or the last one's for an id the mock did
/// not make.
fn input_of(call: &Call<'_>, id: &str) -> Value {
    let creates = call.accepted_calls_to("create");
    (1..=creates.len())
        .find(|&n| prediction_id(n) == id)
        .map(|n| creates[n - 1].json()["input"].clone())
        .unwrap_or_else(|| last_input(call))
}

/// Replicate's 422 for an input outside the model's schema: the image models take at most 4
/// outputs (flux-dev, sdxl: `num_outputs` "Max: 4").
fn too_many_outputs(input: &Value) -> Option<Reply> {
    (input["num_outputs"].as_u64().unwrap_or(1) > 4).then(|| {
        Reply::json(
            422,
            &json!({"detail": "- input.num_outputs: Must be less than or equal to 4", "status": 422,
                "title": "Input validation failed", "invalid_fields": [{"type": "less_than_equal",
                "field": "input.num_outputs", "description": "Must be less than or equal to 4"}]}),
        )
    })
}

#[async_trait::async_trait]
impl Shape for Predictions {
    fn base_path(&self) -> &'static str {
        "/v1"
    }

    fn route(&self, req: &Captured) -> Option<Endpoint> {
        if req.path.starts_with("/files/") {
            return Some(Endpoint::other("file").open());
        }
        let segments: Vec<&str> = req.path.trim_start_matches("/v1/").split('/').collect();
        match (req.method.as_str(), segments.as_slice()) {
            ("POST", ["predictions"]) | ("POST", ["models", _, _, "predictions"]) => {
                Some(Endpoint::generation("create"))
            }
            ("GET", ["predictions", _]) => Some(Endpoint::other("get")),
            ("POST", ["predictions", _, "cancel"]) => Some(Endpoint::other("cancel")),
            _ => None,
        }
    }

    /// A new prediction, starting.
    async fn generate(&self, call: Call<'_>) -> Reply {
        if let Some(refused) = too_many_outputs(&call.req.json()["input"]) {
            return refused;
        }
        let id = prediction_id(call.ordinal("create"));
        Reply::json(201, &self.prediction(call.addr, &id, "starting", &input_of(&call, &id)))
    }

    async fn serve(&self, endpoint: &'static str, call: Call<'_>) -> Reply {
        let addr = call.addr;
        let path = call.req.path.as_str();
        let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        match endpoint {
            "file" => hosted_file(&call, "/files/x/out-0.png", |name| {
                png_for(name.rsplit("out-").next().unwrap_or("0").trim_end_matches(".png").parse().unwrap_or(0))
            }),
            "get" => {
                let id = segments[1];
                let status = self.statuses.poll(id);
                Reply::json(200, &self.prediction(addr, id, status, &input_of(&call, id)))
            }
            "cancel" => {
                Reply::json(200, &self.prediction(addr, segments[1], "canceled", &input_of(&call, segments[1])))
            }
            _ => self.not_found(call.req),
        }
    }

    fn error(&self, status: u16) -> Reply {
        Reply::json(status, &json!({"title": "Mock failure", "detail": "mock provider failure", "status": status}))
    }

    fn not_found(&self, _req: &Captured) -> Reply {
        Reply::json(404, &json!({"title": "Not found", "detail": "Not found", "status": 404}))
    }

    fn unauthorized(&self) -> Reply {
        Reply::json(
            401,
            &json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}),
        )
    }
}

/// The predictions' settings and what the mock saw.
impl Mock<Predictions> {
    /// The statuses every prediction goes through from now on; the last one repeats.
    pub fn statuses(&self, s: Vec<&'static str>) {
        self.shape().statuses.set_states(s);
    }

    /// The `error` of failed predictions from now on.
    pub fn set_prediction_error(&self, error: &str) {
        *self.shape().error.lock().unwrap() = Some(error.to_string());
    }

    /// The `output` of succeeded predictions from now on.
    pub fn output(&self, v: Value) {
        *self.shape().output.lock().unwrap() = Some(v);
    }

    /// The accepted creates.
    pub fn creates(&self) -> Vec<Captured> {
        self.calls().into_iter().filter(|c| !c.rejected).collect()
    }

    /// The body of the last accepted create.
    pub fn created_body(&self) -> Value {
        let c = self.creates();
        serde_json::from_slice(&c.last().expect("nothing was created").body).expect("the create body is JSON")
    }

    /// Prediction polls, all predictions together.
    pub fn polls(&self) -> usize {
        self.count("get")
    }

    /// (method, path, authorization) of each cancel.
    pub fn cancels(&self) -> Vec<(String, String, Option<String>)> {
        self.calls_to("cancel")
            .into_iter()
            .map(|c| (c.method.clone(), c.path.clone(), c.header("authorization")))
            .collect()
    }

    /// The paths of the file downloads.
    pub fn files(&self) -> Vec<String> {
        self.calls_to("file").into_iter().map(|c| c.path).collect()
    }
}
