//! fal.ai's queue API (`kind = "fal"`), as its public docs describe it: submit (POST
//! /{model_id}), status (GET /{owner}/{app}/requests/{id}/status, polled through a list of
//! states), result (GET /{owner}/{app}/requests/{id}) and cancel (PUT .../cancel), with the key
//! in `authorization: Key ...` (give the mock `.credential("authorization", ["Key ..."])`). The
//! mock also hosts the result images (GET /files/img-{i}.png, no key; /files/redirect sends to
//! localhost). The submit is the generation call: the mock's status, script and faults apply to
//! it.

use std::sync::Mutex;

use serde_json::{json, Value};

use super::{hosted_file, Call, Captured, Endpoint, Jobs, Mock, Reply, Shape};
use crate::common::make_png;

/// The seed the mock reports, unlike any the tests ask for.
pub const ANSWER_SEED: u64 = 4242;

/// The image at /files/img-{i}.png.
pub fn png_for(i: usize) -> Vec<u8> {
    make_png(8, 8, [40 * i as u8 + 10, 200, 30])
}

/// The request id of the `n`th accepted submission (from 1).
pub fn request_id(n: usize) -> String {
    format!("764cabcf-b745-4b3e-ae38-{n:012}")
}

/// The queue and its jobs.
pub struct FalQueue {
    /// Status answers in order, per job; the last one repeats.
    statuses: Jobs<Value>,
    /// The result answer (status, body) instead of a normal one.
    result: Mutex<Option<(u16, Value)>>,
    /// Image URLs the result names instead of the mock's own.
    image_urls: Mutex<Option<Vec<String>>>,
}

impl Default for FalQueue {
    /// Queued, in progress, then completed.
    fn default() -> FalQueue {
        FalQueue {
            statuses: Jobs::new(vec![
                json!({"status": "IN_QUEUE", "queue_position": 1}),
                json!({"status": "IN_PROGRESS", "logs": []}),
                json!({"status": "COMPLETED", "logs": [], "metrics": {"inference_time": 9.0}}),
            ]),
            result: Mutex::new(None),
            image_urls: Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Shape for FalQueue {
    fn route(&self, req: &Captured) -> Option<Endpoint> {
        if req.path.starts_with("/files/") {
            return Some(Endpoint::other("file").open());
        }
        let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        match (req.method.as_str(), segments.get(2).copied(), segments.len()) {
            ("POST", _, _) => Some(Endpoint::generation("submit")),
            ("GET", Some("requests"), 5) if segments[4] == "status" => Some(Endpoint::other("status")),
            ("GET", Some("requests"), 4) => Some(Endpoint::other("result")),
            ("PUT", Some("requests"), 5) if segments[4] == "cancel" => Some(Endpoint::other("cancel")),
            _ => None,
        }
    }

    /// Queues a job: its request id and URLs. More than 4 images is refused as fal's image
    /// models refuse it (422, `num_images` at most 4).
    async fn generate(&self, call: Call<'_>) -> Reply {
        if call.req.json()["num_images"].as_u64().unwrap_or(1) > 4 {
            return Reply::json(
                422,
                &json!({"detail": [{"loc": ["body", "num_images"], "msg": "ensure this value is less than or equal to 4",
                    "type": "value_error.number.not_le"}]}),
            );
        }
        let segments: Vec<&str> = call.req.path.trim_start_matches('/').split('/').collect();
        let app = segments.iter().take(2).copied().collect::<Vec<_>>().join("/");
        let id = request_id(call.ordinal("submit"));
        let at = format!("http://{}/{app}/requests/{id}", call.addr);
        Reply::json(
            200,
            &json!({"request_id": id, "response_url": at, "status_url": format!("{at}/status"),
                "cancel_url": format!("{at}/cancel"), "queue_position": 0}),
        )
    }

    async fn serve(&self, endpoint: &'static str, call: Call<'_>) -> Reply {
        let addr = call.addr;
        let path = call.req.path.as_str();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match endpoint {
            "file" => hosted_file(&call, "/files/img-0.png", |name| {
                png_for(name.trim_start_matches("img-").trim_end_matches(".png").parse().unwrap_or(0))
            }),
            "status" => {
                let answer = self.statuses.poll(segments[3]);
                let code = if answer["status"] == "COMPLETED" { 200 } else { 202 };
                Reply::json(code, &answer)
            }
            "result" => {
                if let Some((status, body)) = self.result.lock().unwrap().clone() {
                    return Reply::json(status, &body);
                }
                // The submission this request id names (the nth), for jobs that run at once.
                let submits = call.accepted_calls_to("submit");
                let nth = (1..=submits.len()).find(|&n| request_id(n) == segments[3]).unwrap_or(submits.len());
                let submitted = submits.get(nth.wrapping_sub(1)).map(|c| c.json()).unwrap_or_default();
                let n = submitted["num_images"].as_u64().unwrap_or(1) as usize;
                let urls = self
                    .image_urls
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| (0..n).map(|i| format!("http://{addr}/files/img-{i}.png")).collect());
                let images: Vec<Value> = urls
                    .iter()
                    .map(|u| json!({"url": u, "width": 8, "height": 8, "content_type": "image/png"}))
                    .collect();
                let flags: Vec<bool> = urls.iter().map(|_| false).collect();
                Reply::json(
                    200,
                    &json!({"images": images, "seed": ANSWER_SEED, "has_nsfw_concepts": flags,
                        "timings": {"inference": 1.5}, "prompt": submitted["prompt"]}),
                )
            }
            "cancel" => Reply::json(202, &json!({"status": "CANCELLATION_REQUESTED"})),
            _ => self.not_found(call.req),
        }
    }

    fn error(&self, status: u16) -> Reply {
        Reply::json(status, &json!({ "detail": format!("mock provider failure {status}") }))
    }

    fn not_found(&self, _req: &Captured) -> Reply {
        Reply::json(404, &json!({"detail": "Not Found"}))
    }

    fn unauthorized(&self) -> Reply {
        Reply::json(401, &json!({"detail": "Invalid or missing credentials"}))
    }
}

/// The queue's settings and what it saw.
impl Mock<FalQueue> {
    /// `http://127.0.0.1:PORT/files/{name}`.
    pub fn file_url(&self, name: &str) -> String {
        self.url(&format!("/files/{name}"))
    }

    /// The status answers every job goes through from now on; the last one repeats.
    pub fn statuses(&self, s: Vec<Value>) {
        self.shape().statuses.set_states(s);
    }

    /// Answer result requests with this (status, body) from now on.
    pub fn result(&self, status: u16, body: Value) {
        *self.shape().result.lock().unwrap() = Some((status, body));
    }

    /// Back to the normal result answer.
    pub fn normal_result(&self) {
        *self.shape().result.lock().unwrap() = None;
    }

    /// Name these image URLs in results from now on.
    pub fn image_urls(&self, urls: Vec<String>) {
        *self.shape().image_urls.lock().unwrap() = Some(urls);
    }

    /// The accepted submissions.
    pub fn submits(&self) -> Vec<Captured> {
        self.calls().into_iter().filter(|c| !c.rejected).collect()
    }

    /// The input of the last accepted submission.
    pub fn submitted_input(&self) -> Value {
        let s = self.submits();
        let last = s.last().expect("nothing was submitted");
        serde_json::from_slice(&last.body).expect("the submission is JSON")
    }

    /// Status polls, all jobs together.
    pub fn polls(&self) -> usize {
        self.count("status")
    }

    /// (method, path, authorization) of each cancel.
    pub fn cancels(&self) -> Vec<(String, String, Option<String>)> {
        self.calls_to("cancel")
            .into_iter()
            .map(|c| (c.method.clone(), c.path.clone(), c.header("authorization")))
            .collect()
    }

    /// Result requests.
    pub fn results(&self) -> usize {
        self.count("result")
    }

    /// File downloads.
    pub fn files(&self) -> usize {
        self.count("file")
    }
}
