//! The AUTOMATIC1111 / Forge web UI API (`kind = "a1111"`, started with `--api --api-auth`):
//! POST /sdapi/v1/txt2img and /sdapi/v1/img2img with their JSON payloads, FastAPI's validation
//! (422 `{"detail": [{"loc", "msg", "type"}]}`), samplers and checkpoints the web UI has, and
//! answers `{"images", "parameters", "info"}` whose `info` string reports the seed, sampler,
//! steps, CFG scale and checkpoint used. Basic auth: give the mock
//! `.credential("authorization", ["Basic ..."])`.

use std::sync::Mutex;

use serde_json::{json, Value};

use super::{Call, Captured, Endpoint, Reply, Shape};
use crate::common::b64_encode;

/// What the mock draws for `seed: -1`.
pub const DRAWN_SEED: u64 = 3_141_592_653;
/// The checkpoints the mock web UI has: (title as the API lists it, model name, hash).
pub const CHECKPOINTS: [(&str, &str, &str); 2] = [
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", "sd_xl_base_1.0", "31e35c80fc"),
    ("dreamshaper_8.safetensors [879db523c3]", "dreamshaper_8", "879db523c3"),
];
pub const SAMPLERS: [&str; 4] = ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras"];

/// A web UI with the first checkpoint loaded.
#[derive(Default)]
pub struct WebUi {
    /// The checkpoint loaded now (index into CHECKPOINTS); `override_settings` switches it.
    loaded: Mutex<usize>,
    /// Images appended after the batch, as extensions such as ControlNet do.
    extra_images: Mutex<usize>,
}

impl WebUi {
    /// From now on, append `n` images after each batch (as extensions such as ControlNet do).
    pub fn set_extra_images(&self, n: usize) {
        *self.extra_images.lock().unwrap() = n;
    }
}

/// A FastAPI `{"detail": ...}` answer.
pub fn detail(status: u16, detail: Value) -> Reply {
    Reply::json(status, &json!({ "detail": detail }))
}

/// FastAPI's answer to a body that does not fit the request model.
fn unprocessable(field: &str, msg: &str, kind: &str) -> Reply {
    detail(422, json!([{"loc": ["body", field], "msg": msg, "type": kind}]))
}

#[async_trait::async_trait]
impl Shape for WebUi {
    fn route(&self, req: &Captured) -> Option<Endpoint> {
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/sdapi/v1/txt2img") => Some(Endpoint::generation("txt2img")),
            ("POST", "/sdapi/v1/img2img") => Some(Endpoint::generation("img2img")),
            _ => None,
        }
    }

    /// FastAPI validation, then a batch.
    async fn generate(&self, call: Call<'_>) -> Reply {
        let img2img = call.req.endpoint == Some("img2img");
        let Ok(Value::Object(p)) = serde_json::from_slice::<Value>(&call.req.body) else {
            return detail(422, json!([{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]));
        };
        let mut ints = Vec::new();
        for (k, default) in
            [("seed", -1), ("steps", 20), ("width", 512), ("height", 512), ("batch_size", 1), ("n_iter", 1)]
        {
            match p.get(k).map_or(Some(default), Value::as_i64) {
                Some(v) => ints.push(v),
                None => return unprocessable(k, "value is not a valid integer", "type_error.integer"),
            }
        }
        let [seed, steps, width, height, batch_size, n_iter] = ints[..] else { unreachable!() };
        let cfg = match p.get("cfg_scale") {
            None => 7.0,
            Some(v) => match v.as_f64() {
                Some(f) => f,
                None => return unprocessable("cfg_scale", "value is not a valid float", "type_error.float"),
            },
        };
        for k in ["prompt", "negative_prompt", "sampler_name"] {
            if p.get(k).is_some_and(|v| !v.is_string()) {
                return unprocessable(k, "str type expected", "type_error.str");
            }
        }
        let sampler = p.get("sampler_name").and_then(Value::as_str).unwrap_or("Euler a").to_string();
        if !SAMPLERS.contains(&sampler.as_str()) {
            return detail(404, json!("Sampler not found"));
        }
        if img2img {
            let inits = p.get("init_images").and_then(Value::as_array);
            if inits.is_none_or(|a| a.is_empty() || a.iter().any(|i| !i.is_string())) {
                return unprocessable("init_images", "field required", "value_error.missing");
            }
        }
        let checkpoint = p.get("override_settings").and_then(|o| o.get("sd_model_checkpoint")).and_then(Value::as_str);
        if let Some(name) = checkpoint {
            if let Some(i) = CHECKPOINTS.iter().position(|(title, n, _)| *title == name || *n == name) {
                *self.loaded.lock().unwrap() = i;
            }
        }
        let (_, model_name, model_hash) = CHECKPOINTS[*self.loaded.lock().unwrap()];
        let seed = if seed < 0 { DRAWN_SEED } else { seed as u64 };
        let count = (batch_size * n_iter) as usize;
        let seeds: Vec<u64> = (0..count as u64).map(|i| seed + i).collect();
        let prompt = p.get("prompt").and_then(Value::as_str).unwrap_or("");
        let infotext = format!(
            "{prompt}\nSteps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, \
             Model hash: {model_hash}, Model: {model_name}, Version: v1.10.1"
        );
        let info = json!({
            "prompt": prompt, "all_prompts": vec![prompt; count],
            "negative_prompt": p.get("negative_prompt").and_then(Value::as_str).unwrap_or(""),
            "seed": seed, "all_seeds": seeds, "subseed": 1_304_004_720u64, "all_subseeds": vec![1_304_004_720u64; count],
            "subseed_strength": 0, "width": width, "height": height, "sampler_name": sampler, "cfg_scale": cfg,
            "steps": steps, "batch_size": batch_size, "restore_faces": false, "face_restoration_model": null,
            "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": null, "sd_vae_hash": null,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": p.get("denoising_strength").cloned().unwrap_or(json!(0)),
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": vec![infotext; count],
            "styles": [], "job_timestamp": "20250101120000", "clip_skip": 1, "is_using_inpainting_conditioning": false,
            "version": "v1.10.1",
        });
        let extra = *self.extra_images.lock().unwrap();
        let images: Vec<String> = call.images(count + extra).iter().map(|i| b64_encode(i)).collect();
        // The request echoed back with the web UI's defaults filled in (init_images included).
        let mut parameters = p.clone();
        parameters.entry("steps").or_insert(json!(steps));
        parameters.entry("cfg_scale").or_insert(json!(cfg));
        Reply::json(200, &json!({"images": images, "parameters": parameters, "info": info.to_string()}))
    }

    fn error(&self, status: u16) -> Reply {
        detail(status, json!(format!("mock provider failure {status}")))
    }

    fn not_found(&self, _req: &Captured) -> Reply {
        detail(404, json!("Not Found"))
    }

    fn unauthorized(&self) -> Reply {
        detail(401, json!("Incorrect username or password")).header("www-authenticate", "Basic")
    }
}
