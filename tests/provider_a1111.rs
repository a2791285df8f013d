//! The `a1111` adapter end to end, through the running binary, against a mock of the
//! AUTOMATIC1111 / Forge web UI API (`--api --api-auth`): `sdapi/v1/txt2img` and `img2img` with
//! their JSON payloads, base64 images and the `info` string that reports the seed, sampler,
//! steps, CFG scale and checkpoint used; FastAPI's 422 validation answers, the API's 500 body,
//! basic auth, and a 429 from a rate-limiting proxy in front of it.

mod common;

use common::mock::a1111::{WebUi, DRAWN_SEED};
use common::*;
use serde_json::{json, Value};

const AUTH_VAR: &str = "A1111_TEST_API_AUTH";
const AUTH: &str = "webui:s3cret-0b7d41";
const WRONG_AUTH_VAR: &str = "A1111_TEST_API_AUTH_WRONG";
const WRONG_AUTH: &str = "webui:not-the-password-5521";
const UNSET_VAR: &str = "A1111_TEST_API_AUTH_NEVER_SET";

// ---------------------------------------------------------------------------------------------
// Gateway set-up

struct Setup {
    webui: Mock<WebUi>,
    backup: MockProvider,
    gw: Gateway,
    _dir: PolicyDir,
}

fn a1111_provider(name: &str, base_url: &str, auth_var: &str, extra: &str) -> String {
    format!("[providers.{name}]\nkind = \"a1111\"\nbase_url = \"{base_url}\"\nauth_env = \"{auth_var}\"\n{extra}\n\n")
}

/// Route `alias` -> `provider` (with `model`, if any), falling back to route `spare` (the
/// openai-kind `backup`).
fn route(alias: &str, provider: &str, model: Option<&str>) -> String {
    let model = model.map(|m| format!(", model = \"{m}\"")).unwrap_or_default();
    format!(
        "[[routes]]\nname = \"{alias}\"\nmatch = {{ model = \"{alias}\" }}\n\
         targets = [{{ provider = \"{provider}\"{model} }}]\nfallbacks = [\"spare\"]\n\
         attempt_timeout_ms = 20000\ndeadline_ms = 40000\n\n"
    )
}

async fn setup() -> Setup {
    let webui = Mock::builder(WebUi::default())
        .png(make_png(4, 4, [220, 180, 40]))
        .credential("authorization", [format!("Basic {}", b64_encode(AUTH.as_bytes()))])
        .start()
        .await;
    let backup = MockProvider::start().await;
    let url = webui.base_url();
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let policy = [
        a1111_provider("sd", &url, AUTH_VAR, "price = { per_image_usd = 0.001, per_step_usd = 0.0001 }"),
        a1111_provider("sd_noauth", &url, UNSET_VAR, ""),
        a1111_provider("sd_wrongauth", &url, WRONG_AUTH_VAR, ""),
        a1111_provider("sd_noapi", &format!("{url}/webui"), AUTH_VAR, ""),
        a1111_provider("sd_dead", &dead, AUTH_VAR, ""),
        openai_provider("backup", &backup),
        route("dreamshaper", "sd", Some("dreamshaper_8")),
        route("sd", "sd", None),
        route("sd-noauth", "sd_noauth", None),
        route("sd-wrongauth", "sd_wrongauth", None),
        route("sd-noapi", "sd_noapi", None),
        route("sd-dead", "sd_dead", None),
        "[[routes]]\nname = \"spare\"\nmatch = { model = \"spare-only\" }\n\
         targets = [{ provider = \"backup\", model = \"backup-model\" }]\n"
            .to_string(),
    ]
    .concat();
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start_with_env(dir.path(), &[(AUTH_VAR, AUTH), (WRONG_AUTH_VAR, WRONG_AUTH)]).await;
    Setup { webui, backup, gw, _dir: dir }
}

fn gen(model: &str) -> Value {
    json!({"model": model, "prompt": "a koi pond at dawn, ukiyo-e", "response_format": "b64_json"})
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_gets_every_setting_and_info_reports_what_was_used() {
    let s = setup().await;
    let body = json!({"model": "dreamshaper", "prompt": "a koi pond at dawn, ukiyo-e", "negative_prompt": "blurry",
        "seed": 42, "steps": 28, "guidance_scale": 6.5, "sampler": "DPM++ 2M", "size": "768x512", "n": 2,
        "response_format": "b64_json"});
    let r = s.gw.generate(&body).await;
    assert_eq!(b64_images(&r), vec![s.webui.png().to_vec(), s.webui.png().to_vec()], "{}", r.describe());
    assert_eq!(r.attempts(), vec!["sd:ok"], "{}", r.describe());

    let call = s.webui.last();
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/sdapi/v1/txt2img"));
    assert_eq!(call.header("authorization"), Some(format!("Basic {}", b64_encode(AUTH.as_bytes()))));
    assert_eq!(
        call.json(),
        json!({"prompt": "a koi pond at dawn, ukiyo-e", "negative_prompt": "blurry", "seed": 42, "steps": 28,
            "cfg_scale": 6.5, "sampler_name": "DPM++ 2M", "width": 768, "height": 512, "batch_size": 2, "n_iter": 1,
            "override_settings": {"sd_model_checkpoint": "dreamshaper_8"}, "send_images": true, "save_images": false})
    );
    assert_eq!(
        r.header("x-acc-generation").as_deref(),
        Some("seed=42; steps=28; guidance=6.5; sampler=DPM++ 2M; model=dreamshaper_8 [879db523c3]"),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("x-acc-dropped-params"), None);
    // Two images at $0.001, plus 28 steps each at $0.0001.
    let cost: f64 = r.header("x-acc-cost-usd").unwrap_or_else(|| panic!("no cost: {}", r.describe())).parse().unwrap();
    assert!((cost - 0.0076).abs() < 1e-9, "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drawn_seed_and_the_web_uis_defaults_are_reported() {
    let s = setup().await;
    let mut body = gen("sd");
    body["quality"] = json!("hd");
    body["style"] = json!("vivid");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("quality, style"), "{}", r.describe());
    let sent = s.webui.last().json();
    assert_eq!(sent["seed"], json!(-1), "no seed asked for: a random one ({sent})");
    for absent in ["quality", "style", "steps", "cfg_scale", "sampler_name", "negative_prompt", "override_settings"] {
        assert!(sent.get(absent).is_none(), "{absent} must not be sent: {sent}");
    }
    assert_eq!(
        (sent["width"].clone(), sent["height"].clone(), sent["batch_size"].clone()),
        (json!(1024), json!(1024), json!(1))
    );
    assert_eq!(
        r.header("x-acc-generation").as_deref(),
        Some(
            format!("seed={DRAWN_SEED}; steps=20; guidance=7; sampler=Euler a; model=sd_xl_base_1.0 [31e35c80fc]")
                .as_str()
        ),
        "what the web UI used, from its info: {}",
        r.describe()
    );

    // Extensions append their own images after the batch: the client gets the batch.
    s.webui.shape().set_extra_images(1);
    let mut body = gen("sd");
    body["n"] = json!(2);
    let r = s.gw.generate(&body).await;
    assert_eq!(b64_images(&r).len(), 2, "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_and_b64_json_both_carry_the_web_uis_image() {
    let s = setup().await;
    let mut body = gen("sd");
    body["response_format"] = json!("url");
    let r = s.gw.generate(&body).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap_or_else(|| panic!("no url: {}", r.describe())).to_string();
    let img = get(&url, &[]).await;
    img.assert_status(200);
    assert_eq!(img.body.as_ref(), s.webui.png());
    assert_eq!(b64_images(&s.gw.generate(&gen("sd")).await), vec![s.webui.png().to_vec()]);
}

/// An RGBA PNG whose left half is transparent (OpenAI's mask: edit there).
fn rgba_mask(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        let data: Vec<u8> =
            (0..w * h).flat_map(|i| if i % w < w / 2 { [0, 0, 0, 0] } else { [0, 0, 0, 255] }).collect();
        wr.write_image_data(&data).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_variations_go_to_img2img_with_the_images_inline() {
    let s = setup().await;
    let photo = make_png(64, 48, [10, 120, 230]);
    let mask = rgba_mask(64, 48);
    let form = Form::new()
        .text("model", "dreamshaper")
        .text("prompt", "a red boat on the water")
        .text("negative_prompt", "text")
        .text("seed", "9")
        .text("size", "512x512")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo.clone())
        .file("mask", "mask.png", "image/png", mask.clone());
    let r = s.gw.edit(&form, &[]).await;
    assert_eq!(b64_images(&r), vec![s.webui.png().to_vec()], "{}", r.describe());
    let call = s.webui.last();
    assert_eq!(call.path, "/sdapi/v1/img2img");
    assert!(call.header("authorization").is_some());
    let sent = call.json();
    assert_eq!(sent["init_images"], json!([b64_encode(&photo)]), "the input image, base64");
    assert_eq!(sent["mask"], json!(b64_encode(&mask)));
    assert_eq!(sent["inpainting_mask_invert"], json!(1), "transparent = edit, as OpenAI masks mean it");
    assert_eq!(sent["denoising_strength"], json!(0.75));
    assert_eq!(sent["prompt"], json!("a red boat on the water"));
    assert_eq!(sent["negative_prompt"], json!("text"));
    assert_eq!(sent["seed"], json!(9));
    assert_eq!((sent["width"].clone(), sent["height"].clone()), (json!(512), json!(512)));
    assert_eq!(sent["override_settings"], json!({"sd_model_checkpoint": "dreamshaper_8"}));
    assert_eq!(
        r.header("x-acc-generation").as_deref().map(|g| g.starts_with("seed=9; ")),
        Some(true),
        "{}",
        r.describe()
    );

    // A variation: the image alone, gentler denoising, the input's own size when none is asked.
    let form = Form::new().text("model", "sd").text("response_format", "b64_json").file(
        "image",
        "photo.png",
        "image/png",
        photo.clone(),
    );
    let r = s.gw.variation(&form, &[]).await;
    assert_eq!(b64_images(&r), vec![s.webui.png().to_vec()], "{}", r.describe());
    let sent = s.webui.last().json();
    assert_eq!(s.webui.last().path, "/sdapi/v1/img2img");
    assert_eq!(sent["init_images"], json!([b64_encode(&photo)]));
    assert!(sent.get("mask").is_none() && sent.get("inpainting_mask_invert").is_none(), "{sent}");
    assert_eq!(sent["denoising_strength"], json!(0.6));
    assert_eq!((sent["width"].clone(), sent["height"].clone()), (json!(64), json!(48)));
    assert_eq!(sent["prompt"], json!(""));
}

/// A mask the gateway would have to convert (grey with alpha) is held to a size before it is
/// decoded: a small file that inflates to hundreds of megabytes is refused from its header, and
/// nothing is sent. The web UI's own numbers arrive as form text and go as numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mask_too_large_to_convert_is_refused_and_form_numbers_are_numbers() {
    let s = setup().await;
    let photo = make_png(64, 48, [10, 120, 230]);
    let mut huge = Vec::new();
    image::GrayAlphaImage::new(6000, 6000)
        .write_to(&mut std::io::Cursor::new(&mut huge), image::ImageFormat::Png)
        .unwrap();
    assert!(huge.len() < 1 << 20, "the file is small: {}", huge.len());
    let calls = s.webui.calls().len();
    let form = Form::new()
        .text("model", "dreamshaper")
        .text("prompt", "a red boat")
        .file("image", "photo.png", "image/png", photo.clone())
        .file("mask", "mask.png", "image/png", huge);
    let r = s.gw.edit(&form, &[]).await;
    let e = r.assert_error(400, "unsupported_parameter");
    assert!(e["message"].as_str().unwrap().contains("6000x6000"), "{e}");
    assert_eq!(s.webui.calls().len(), calls, "nothing was sent");

    let form = Form::new()
        .text("model", "dreamshaper")
        .text("prompt", "a red boat")
        .text("steps", "12")
        .text("guidance_scale", "6.5")
        .text("response_format", "b64_json")
        .file("image", "photo.png", "image/png", photo);
    s.gw.edit(&form, &[]).await.assert_status(200);
    let sent = s.webui.last().json();
    assert_eq!((sent["steps"].clone(), sent["cfg_scale"].clone()), (json!(12), json!(6.5)), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_uis_refusals_come_back_as_400() {
    let s = setup().await;
    // FastAPI's validation answer.
    s.webui.then(Step::reply(422, json!({"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"}]})));
    let r = s.gw.generate(&gen("sd")).await;
    let err = r.assert_error(400, "upstream_rejected");
    assert!(err["message"].as_str().unwrap().contains("body.steps: value is not a valid integer"), "{}", r.describe());
    // A sampler the web UI does not have.
    let mut body = gen("sd");
    body["sampler"] = json!("Heun++ 9000");
    let r = s.gw.generate(&body).await;
    let err = r.assert_error(400, "upstream_rejected");
    assert!(err["message"].as_str().unwrap().contains("Sampler not found"), "{}", r.describe());
    assert_eq!(s.webui.last().json()["sampler_name"], json!("Heun++ 9000"));
    assert_eq!(s.backup.hits(), 0, "the client's mistakes are not retried elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_rate_limits_and_dead_servers_fall_back() {
    let s = setup().await;
    // The API's answer to an exception (here the GPU ran out of memory).
    s.webui.then(Step::reply(
        500,
        json!({"error": "OutOfMemoryError", "detail": "", "body": "",
            "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}),
    ));
    let r = s.gw.generate(&gen("sd")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["sd:status_5xx", "backup:ok"], "{}", r.describe());

    // A rate-limiting proxy in front of the web UI.
    s.webui.then(Step::reply(429, json!({"detail": "Too Many Requests"})).header("retry-after", "30"));
    let r = s.gw.generate(&gen("sd")).await;
    assert_eq!(r.attempts(), vec!["sd:status_429", "backup:ok"], "{}", r.describe());
    let calls = s.webui.requests().len();
    let r = s.gw.generate(&gen("sd")).await;
    assert_eq!(r.attempts(), vec!["sd:paused", "backup:ok"], "{}", r.describe());
    assert_eq!(s.webui.requests().len(), calls, "a paused provider is not called");
    assert_eq!(s.gw.metric("acc_provider_paused_total", &[("provider", "sd")]).await, 1.0);

    // Nothing listening.
    let r = s.gw.generate(&gen("sd-dead")).await;
    assert_eq!(r.attempts(), vec!["sd_dead:connect_error", "backup:ok"], "{}", r.describe());
    // A web UI started without --api.
    let r = s.gw.generate(&gen("sd-noapi")).await;
    assert_eq!(r.attempts(), vec!["sd_noapi:account_error", "backup:ok"], "{}", r.describe());
    assert_eq!(s.webui.last().path, "/webui/sdapi/v1/txt2img");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_problems_are_clear_and_leak_nothing() {
    let s = setup().await;
    let r = s.gw.generate(&gen("sd-noauth")).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["sd_noauth:credential_missing", "backup:ok"], "{}", r.describe());
    assert!(s.webui.requests().is_empty(), "no credentials, no call");

    let r = s.gw.generate(&gen("sd-wrongauth")).await;
    assert_eq!(r.attempts(), vec!["sd_wrongauth:account_error", "backup:ok"], "{}", r.describe());
    let wrong = format!("Basic {}", b64_encode(WRONG_AUTH.as_bytes()));
    assert_eq!(s.webui.last().header("authorization"), Some(wrong));

    // When every target fails, the client hears why, and nothing of the credentials.
    s.backup.set_status(500);
    let r = s.gw.generate(&gen("sd-noauth")).await;
    let msg = r.assert_error(502, "upstream_error")["message"].as_str().unwrap().to_string();
    // The client hears that the gateway lacks a credential; which variable is the operator's
    // business, in the log.
    assert!(msg.contains("no usable credential for this provider"), "{msg}");
    assert!(!msg.contains(UNSET_VAR), "{msg}");
    let wrong = s.gw.generate(&gen("sd-wrongauth")).await;
    s.backup.set_status(200);
    s.gw.generate(&gen("sd")).await.assert_status(200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let logged = format!("environment variable {UNSET_VAR} is not set");
    settles("the log names the variable", || s.gw.stderr().contains(&logged)).await;
    let logs = s.gw.stderr();
    for secret in [AUTH, WRONG_AUTH, "s3cret-0b7d41", "not-the-password-5521"] {
        for resp in [&r, &wrong] {
            assert!(!resp.text().contains(secret), "credentials reached the client: {}", resp.describe());
        }
        assert!(!logs.contains(secret), "credentials reached the logs:\n{logs}");
    }
    for encoded in [b64_encode(AUTH.as_bytes()), b64_encode(WRONG_AUTH.as_bytes())] {
        assert!(!logs.contains(&encoded) && !wrong.text().contains(&encoded), "an encoded credential leaked");
    }
}
