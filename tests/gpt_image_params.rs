//! The GPT image models' request parameters (`background`, `output_format`,
//! `output_compression`, `moderation`, `quality`, `input_fidelity`, several input images and a
//! mask on edits) end to end: checked with an error naming the parameter, passed unchanged to an
//! OpenAI-kind provider, mapped to Stability's and Imagen's own fields, dropped or refused on a
//! kind without them; JPEG and WebP answers evaluated, and held to the `output_format` asked.

mod common;

use common::mock::stability::StableImage;
use common::mock::vertex::VertexImagen;
use common::*;
use serde_json::{json, Value};

/// `img` encoded in `format`.
fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A busy 320x256 picture (passes sanity in any format).
fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(320, 256, |x, y| {
        image::Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) % 256) as u8])
    })
}

const TIMEOUTS: &str = "attempt_timeout_ms = 20000\ndeadline_ms = 40000";

/// The form's text part `name`.
fn text(parts: &[FormPart], name: &str) -> Option<String> {
    parts.iter().find(|p| p.name == name && p.filename.is_none()).map(|p| String::from_utf8_lossy(&p.data).into_owned())
}

// ---------------------------------------------------------------------------------------------
// OpenAI kind: unchanged, and every bad value refused before any provider is called
// ---------------------------------------------------------------------------------------------

/// Route "gi" -> `openai` (model gpt-image-1), priced by quality (and, for medium, size) the
/// way OpenAI prices gpt-image-1.
async fn openai_setup() -> (MockProvider, Gateway, PolicyDir) {
    let mock = MockProvider::start().await;
    let price = r#"price = { per_image_usd = 0.04, quality = { low = 0.011, medium = { "1024x1024" = 0.042, "1536x1024" = 0.063 }, high = 0.167 } }"#;
    let policy = format!(
        "{}{}",
        openai_provider_with("openai", &mock, price),
        route_toml("gi", "gi").target("openai", "gpt-image-1").with(TIMEOUTS),
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    (mock, gw, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt_image_parameters_reach_openai_unchanged() {
    let (mock, gw, _dir) = openai_setup().await;
    let r = gw
        .generate(&json!({
            "model": "gi", "prompt": "a glass of water on a table", "background": "transparent",
            "output_format": "webp", "output_compression": 60, "moderation": "low", "quality": "high",
            "response_format": "b64_json",
        }))
        .await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params"), None, "{}", r.describe());
    // As the client sent them, the model rewritten; no response_format: OpenAI refuses it on
    // GPT image models ("Unknown parameter: 'response_format'"), which always answer base64.
    assert_eq!(
        mock.last_call().json(),
        json!({"prompt": "a glass of water on a table", "background": "transparent", "output_format": "webp",
            "output_compression": 60, "moderation": "low", "quality": "high", "model": "gpt-image-1"}),
    );
    // Priced at the quality asked: one high image.
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.167"), "{}", r.describe());
    // The trace record names them among the requested parameters.
    let id = r.header("x-acc-trace-id").expect("trace id");
    let mut rec = serde_json::Value::Null;
    for _ in 0..200 {
        let a = gw.admin("GET", &format!("/admin/traces/{id}")).await;
        if a.status == 200 {
            rec = a.json();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        rec["parameters"],
        json!({"model": "gi", "n": 1, "response_format": "b64_json", "quality": "high", "background": "transparent",
            "output_format": "webp", "output_compression": 60, "moderation": "low"}),
        "{rec:#}"
    );

    // quality and size "auto": priced at the quality and size gpt-image-1 says it drew at.
    let answer = json!({"created": 1, "data": [{"b64_json": b64_encode(mock.png())}], "quality": "medium",
        "output_format": "png", "size": "1536x1024", "background": "opaque"});
    mock.set_body(Some(&answer.to_string()));
    let auto =
        json!({"model": "gi", "prompt": "a fox", "quality": "auto", "size": "auto", "response_format": "b64_json"});
    let r = gw.generate(&auto).await;
    r.assert_status(200);
    assert_eq!(mock.last_call().json()["quality"], json!("auto"));
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.063"), "{}", r.describe());
    assert_eq!(r.json()["quality"], json!("medium"), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_gpt_image_parameter_is_refused_naming_it() {
    let (mock, gw, _dir) = openai_setup().await;
    let cases = [
        (json!({"background": "clear"}), "background", "invalid_value"),
        (json!({"background": "transparent", "output_format": "jpeg"}), "background", "invalid_value"),
        (json!({"output_format": "gif"}), "output_format", "invalid_value"),
        (json!({"output_format": 5}), "output_format", "invalid_type"),
        (json!({"output_format": "jpeg", "output_compression": 101}), "output_compression", "invalid_value"),
        (json!({"output_compression": 50}), "output_compression", "invalid_value"),
        (json!({"output_format": "png", "output_compression": 50}), "output_compression", "invalid_value"),
        (json!({"moderation": "none"}), "moderation", "invalid_value"),
        (json!({"quality": "ultra"}), "quality", "invalid_value"),
        (json!({"input_fidelity": "high"}), "input_fidelity", "unknown_parameter"),
    ];
    for (extra, param, code) in cases {
        let mut body = json!({"model": "gi", "prompt": "a fox"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = gw.generate(&body).await;
        let err = r.assert_error(400, code);
        assert_eq!(err["param"], json!(param), "{body}: {}", r.describe());
        assert_eq!(err["type"], json!("invalid_request_error"), "{body}");
        assert_eq!(r.header("x-should-retry").as_deref(), Some("false"), "{}", r.describe());
    }
    let r = gw.generate(&json!({"model": "gi", "prompt": "a fox", "moderation": "high"})).await;
    assert_eq!(
        r.assert_error(400, "invalid_value")["message"],
        json!(r#"moderation must be one of "low", "auto"; got "high""#)
    );
    assert_eq!(mock.hits(), 0, "nothing bad reaches the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_with_two_images_and_a_mask_reaches_openai_as_one_form() {
    let (mock, gw, _dir) = openai_setup().await;
    let first = make_png(64, 48, [10, 120, 230]);
    let second = encoded(&picture(), image::ImageFormat::Jpeg);
    let mask = make_png(64, 48, [0, 0, 0]);
    let form = Form::new()
        .text("model", "gi")
        .text("prompt", "put the cup from the second photo on the table")
        .file("image[]", "table.png", "image/png", first.clone())
        .file("image[]", "cup.jpg", "image/jpeg", second.clone())
        .file("mask", "mask.png", "image/png", mask.clone())
        .text("input_fidelity", "high")
        .text("output_format", "jpeg")
        .text("output_compression", "50")
        .text("background", "opaque")
        .text("quality", "low")
        .text("response_format", "b64_json");
    let r = gw.edit(&form, &[]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params"), None, "{}", r.describe());
    let call = mock.last_call();
    assert_eq!(call.path, "/v1/images/edits");
    let parts = call.form().await;
    let files: Vec<(&str, Option<&str>, &[u8])> = parts
        .iter()
        .filter(|p| p.filename.is_some())
        .map(|p| (p.name.as_str(), p.filename.as_deref(), p.data.as_ref()))
        .collect();
    assert_eq!(
        files,
        vec![
            ("image[]", Some("table.png"), first.as_slice()),
            ("image[]", Some("cup.jpg"), second.as_slice()),
            ("mask", Some("mask.png"), mask.as_slice()),
        ],
        "both images in order, then the mask, byte for byte"
    );
    let mut fields: Vec<(String, String)> = parts
        .iter()
        .filter(|p| p.filename.is_none())
        .map(|p| (p.name.clone(), String::from_utf8_lossy(&p.data).into_owned()))
        .collect();
    fields.sort();
    let want = [
        ("prompt", "put the cup from the second photo on the table"),
        ("input_fidelity", "high"),
        ("output_format", "jpeg"),
        ("output_compression", "50"),
        ("background", "opaque"),
        ("quality", "low"),
        ("model", "gpt-image-1"),
    ];
    let mut want = want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec();
    want.sort();
    assert_eq!(
        fields, want,
        "every text field as the client sent it, the model rewritten, no response_format (GPT image models refuse it)"
    );

    // Seventeen images, a JPEG mask, or input_fidelity out of range: refused, nothing sent.
    let hits = mock.hits();
    let mut many = Form::new().text("model", "gi").text("prompt", "merge");
    for i in 0..17 {
        many = many.file("image[]", &format!("{i}.png"), "image/png", first.clone());
    }
    let bad = [
        (many, "image", "invalid_value"),
        (
            Form::new()
                .text("model", "gi")
                .text("prompt", "x")
                .file("image", "a.png", "image/png", first.clone())
                .file("mask", "m.jpg", "image/jpeg", second.clone()),
            "mask",
            "invalid_image_format",
        ),
        (
            Form::new()
                .text("model", "gi")
                .text("prompt", "x")
                .file("image", "a.png", "image/png", first.clone())
                .text("input_fidelity", "medium"),
            "input_fidelity",
            "invalid_value",
        ),
    ];
    for (form, param, code) in bad {
        let r = gw.edit(&form, &[]).await;
        assert_eq!(r.assert_error(400, code)["param"], json!(param), "{}", r.describe());
    }
    assert_eq!(mock.hits(), hits);
}

// ---------------------------------------------------------------------------------------------
// JPEG and WebP answers are evaluated; the format asked for is checked
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_and_webp_answers_are_evaluated_and_held_to_output_format() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    let policy = format!(
        "{}{}{}{}",
        openai_provider("first", &first),
        openai_provider("second", &second),
        route_toml("main", "m").target("first", "gpt-image-1").fallback("spare").with("evaluators = [\"sanity\"]"),
        route_toml("spare", "spare").target("second", "gpt-image-1").with("evaluators = [\"sanity\"]"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let body = |format: &str| json!({"model": "m", "prompt": "a fox", "size": "320x256", "output_format": format, "response_format": "b64_json"});
    for (format, image_format) in [("jpeg", image::ImageFormat::Jpeg), ("webp", image::ImageFormat::WebP)] {
        let bytes = encoded(&picture(), image_format);
        first.answer_with(&bytes);
        let r = gw.generate(&body(format)).await;
        assert_eq!(b64_one(&r), bytes, "{format}: {}", r.describe());
        assert_eq!(r.attempts(), vec!["first:ok"], "{format}: {}", r.describe());
        assert_eq!(r.header("x-acc-eval").as_deref(), Some("sanity=pass(1.00)"), "{format}: {}", r.describe());
    }
    // A PNG where JPEG was asked fails sanity on the first target; the spare's JPEG passes.
    first.answer_with(&png(&picture()));
    let jpeg = encoded(&picture(), image::ImageFormat::Jpeg);
    second.answer_with(&jpeg);
    let r = gw.generate(&body("jpeg")).await;
    assert_eq!(b64_one(&r), jpeg, "{}", r.describe());
    assert_eq!(r.attempts(), vec!["first:eval_failed", "second:ok"], "{}", r.describe());
    // Without output_format, a PNG passes.
    let r =
        gw.generate(&json!({"model": "m", "prompt": "a fox", "size": "320x256", "response_format": "b64_json"})).await;
    assert_eq!(r.attempts(), vec!["first:ok"], "{}", r.describe());
}

// ---------------------------------------------------------------------------------------------
// Kinds with equivalents: Stability and Imagen
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stability_gets_output_format_and_sd3_has_no_webp() {
    let key = "sk-stability-params";
    let mock = Mock::builder(StableImage::default())
        .png(encoded(&picture(), image::ImageFormat::Jpeg))
        .credential("authorization", [format!("Bearer {key}")])
        .start()
        .await;
    let policy = format!(
        r#"[providers.stability]
kind = "stability"
base_url = "{}"
api_key_env = "ACC_TEST_STABILITY_KEY"

[providers.stability_strict]
kind = "stability"
base_url = "{}"
api_key_env = "ACC_TEST_STABILITY_KEY"
unsupported_params = "reject"

{}{}{}"#,
        mock.base_url(),
        mock.base_url(),
        route_toml("core", "core").target("stability", "core").with(TIMEOUTS),
        route_toml("large", "large").target("stability", "sd3.5-large").with(TIMEOUTS),
        route_toml("large-strict", "large-strict").target("stability_strict", "sd3.5-large").with(TIMEOUTS),
    );
    let (gw, _dir) = serve_policy(&policy, &[("ACC_TEST_STABILITY_KEY", key)]).await;

    let r = gw
        .generate(&json!({"model": "core", "prompt": "a koi pond", "output_format": "jpeg", "moderation": "low",
            "background": "opaque", "response_format": "b64_json"}))
        .await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("background, moderation"), "{}", r.describe());
    assert_eq!(r.json()["output_format"], json!("jpeg"), "{}", r.describe());
    let form = mock.last().form().await;
    assert_eq!(text(&form, "output_format").as_deref(), Some("jpeg"));
    for absent in ["background", "moderation"] {
        assert_eq!(text(&form, absent), None, "{absent} is not a Stability field");
    }
    // webp on the core endpoint passes as it is.
    let r = gw.generate(&json!({"model": "core", "prompt": "a koi pond", "output_format": "webp"})).await;
    r.assert_status(200);
    assert_eq!(text(&mock.last().form().await, "output_format").as_deref(), Some("webp"));

    // SD3 writes png or jpeg: webp is dropped (png asked instead), or refused by a strict provider.
    let r = gw.generate(&json!({"model": "large", "prompt": "a koi pond", "output_format": "webp"})).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("output_format"), "{}", r.describe());
    let form = mock.last().form().await;
    assert_eq!(
        (text(&form, "output_format").as_deref(), text(&form, "model").as_deref()),
        (Some("png"), Some("sd3.5-large"))
    );
    let r = gw.generate(&json!({"model": "large", "prompt": "a koi pond", "output_format": "jpeg"})).await;
    r.assert_status(200);
    assert_eq!(text(&mock.last().form().await, "output_format").as_deref(), Some("jpeg"));
    let calls = mock.hits();
    let r = gw.generate(&json!({"model": "large-strict", "prompt": "a koi pond", "output_format": "webp"})).await;
    let err = r.assert_error(400, "unsupported_parameter");
    assert!(err["message"].as_str().unwrap().contains("cannot honour output_format"), "{}", r.describe());
    assert_eq!(mock.hits(), calls, "a refused request is not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imagen_gets_output_options_and_safety_setting() {
    const MODEL: &str = "imagen-3.0-generate-002";
    let mock = Mock::builder(VertexImagen::new("p1", "us-central1", MODEL))
        .png(encoded(&picture(), image::ImageFormat::Jpeg))
        .credential("authorization", ["Bearer tok-params"])
        .start()
        .await;
    let policy = format!(
        r#"[providers.vertex]
kind = "vertex_imagen"
base_url = "{}"
project = "p1"
location = "us-central1"
token_env = "ACC_TEST_VERTEX_TOKEN"

{}"#,
        mock.base_url(),
        route_toml("imagen", "imagen").target("vertex", MODEL).with(TIMEOUTS),
    );
    let (gw, _dir) = serve_policy(&policy, &[("ACC_TEST_VERTEX_TOKEN", "tok-params")]).await;
    let r = gw
        .generate(&json!({"model": "imagen", "prompt": "a red fox in snow", "output_format": "jpeg",
            "output_compression": 70, "moderation": "low", "background": "opaque", "response_format": "b64_json"}))
        .await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("background"), "{}", r.describe());
    assert_eq!(r.json()["output_format"], json!("jpeg"), "{}", r.describe());
    let params = mock.last().json()["parameters"].clone();
    assert_eq!(params["outputOptions"], json!({"mimeType": "image/jpeg", "compressionQuality": 70}), "{params}");
    assert_eq!(params["safetySetting"], json!("block_only_high"), "{params}");

    // Imagen has no WebP: dropped with its compression, PNG asked; moderation auto keeps the default.
    let r = gw
        .generate(&json!({"model": "imagen", "prompt": "a red fox", "output_format": "webp", "output_compression": 20,
            "moderation": "auto"}))
        .await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("output_format, output_compression"),
        "{}",
        r.describe()
    );
    let params: Value = mock.last().json()["parameters"].clone();
    assert_eq!(params["outputOptions"], json!({"mimeType": "image/png"}), "{params}");
    assert_eq!(params.get("safetySetting"), None, "{params}");
}

// ---------------------------------------------------------------------------------------------
// A kind without the parameters: dropped and said so, or refused
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_without_them_drops_or_refuses_them() {
    let policy = r#"
[providers.demo]
kind = "builtin"

[providers.strict]
kind = "builtin"
unsupported_params = "reject"

[[routes]]
name = "demo"
match = { model = "demo" }
targets = [{ provider = "demo", model = "demo" }]
evaluators = ["sanity"]

[[routes]]
name = "strict"
match = { model = "strict" }
targets = [{ provider = "strict", model = "demo" }]
"#;
    let (gw, _dir) = serve_policy(policy, &[]).await;
    let body = |model: &str| {
        json!({"model": model, "prompt": "a fox", "size": "256x256", "background": "opaque", "output_format": "jpeg",
            "output_compression": 80, "moderation": "low", "quality": "high", "response_format": "b64_json"})
    };
    let r = gw.generate(&body("demo")).await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("quality, background, output_format, output_compression, moderation"),
        "{}",
        r.describe()
    );
    // The format was not asked of the provider, so its PNG is not held to it.
    assert_eq!(png_dims(&b64_one(&r)), (256, 256));
    assert_eq!(r.header("x-acc-eval").as_deref(), Some("sanity=pass(1.00)"), "{}", r.describe());

    let r = gw.generate(&body("strict")).await;
    let err = r.assert_error(400, "unsupported_parameter");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("quality, background, output_format, output_compression, moderation") && msg.contains("builtin"),
        "{msg}"
    );
}

/// OpenAI's own models take only the fields the Images API reference gives them, and answer any
/// other with 400 `unknown_parameter` (the mock does too): the gateway's extensions (`seed`,
/// `negative_prompt`, ...), `style` on a GPT image model, the GPT image fields on dall-e-3,
/// `response_format` on a GPT image model. Those are dropped and named (or refused under
/// `unsupported_params = "reject"`); another server that speaks the API (any other model name)
/// still gets every field. An audit against the docs found them all sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_models_get_only_their_own_parameters() {
    let mock = MockProvider::start().await;
    let policy = format!(
        "{}{}{}{}{}{}",
        openai_provider_with("openai", &mock, ""),
        openai_provider_with("strict", &mock, "unsupported_params = \"reject\""),
        route_toml("gi", "gi").target("openai", "gpt-image-1").with(TIMEOUTS),
        route_toml("d3", "d3").target("openai", "dall-e-3").with(TIMEOUTS),
        route_toml("local", "local").target("openai", "flux-schnell").with(TIMEOUTS),
        route_toml("strict", "strict").target("strict", "gpt-image-1").with(TIMEOUTS),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let body = |model: &str| {
        json!({"model": model, "prompt": "a fox", "seed": 7, "negative_prompt": "blur", "steps": 20,
            "style": "vivid", "background": "opaque", "moderation": "low", "quality": "high", "user": "u1"})
    };
    let sent = |r: &Resp| {
        r.assert_status(200);
        let mut keys: Vec<String> = mock.last_call().json().as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let r = gw.generate(&body("gi")).await;
    assert_eq!(
        sent(&r),
        ["background", "model", "moderation", "prompt", "quality", "user"],
        "gpt-image-1: its own fields only, no response_format"
    );
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("negative_prompt, seed, steps, style"));
    let r = gw.generate(&body("d3")).await;
    assert_eq!(
        sent(&r),
        ["model", "prompt", "quality", "response_format", "style", "user"],
        "dall-e-3: style and response_format, none of the GPT image fields"
    );
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("negative_prompt, seed, steps, background, moderation")
    );
    let r = gw.generate(&body("local")).await;
    assert_eq!(
        sent(&r),
        [
            "background",
            "model",
            "moderation",
            "negative_prompt",
            "prompt",
            "quality",
            "response_format",
            "seed",
            "steps",
            "style",
            "user"
        ],
        "another server that speaks the API gets every field"
    );
    assert_eq!(r.header("x-acc-dropped-params"), None);
    let hits = mock.hits();
    let err = gw.generate(&body("strict")).await.assert_error(400, "unsupported_parameter");
    assert!(err["message"].as_str().unwrap().contains("negative_prompt, seed, steps, style"), "{err}");
    assert_eq!(mock.hits(), hits, "refused before any call");
}

// ---------------------------------------------------------------------------------------------
// Azure (the GPT image fields but moderation), fal and Replicate (their own output fields)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_fal_and_replicate_carry_what_they_have() {
    use common::mock::azure::AzureOpenAi;
    use common::mock::fal::FalQueue;
    use common::mock::replicate::Predictions;
    let az = Mock::builder(AzureOpenAi::new(&["gpt-image-prod"])).credential("api-key", ["az-key-1"]).start().await;
    let fal = Mock::builder(FalQueue::default()).credential("authorization", ["Key fal-key-1"]).start().await;
    let rep = Mock::builder(Predictions::default()).credential("authorization", ["Bearer r8-key-1"]).start().await;
    let jobs = "poll_interval_ms = 20\nmax_poll_interval_ms = 80\nfetch = { allow_hosts = [\"127.0.0.1\"] }";
    let policy = format!(
        r#"[providers.az]
kind = "azure_openai"
base_url = "{}"
api_key_env = "ACC_TEST_AZ_KEY"

[providers.fal]
kind = "fal"
base_url = "{}"
api_key_env = "ACC_TEST_FAL_KEY"
{jobs}

[providers.rep]
kind = "replicate"
base_url = "{}"
api_key_env = "ACC_TEST_REP_KEY"
{jobs}

{}{}{}"#,
        az.base_url(),
        fal.base_url(),
        rep.base_url(),
        route_toml("az", "az").target("az", "gpt-image-prod").with(TIMEOUTS),
        route_toml("fal", "fal").target("fal", "fal-ai/flux/dev").with(TIMEOUTS),
        route_toml("rep", "rep").target("rep", "black-forest-labs/flux-dev").with(TIMEOUTS),
    );
    let env = [("ACC_TEST_AZ_KEY", "az-key-1"), ("ACC_TEST_FAL_KEY", "fal-key-1"), ("ACC_TEST_REP_KEY", "r8-key-1")];
    let (gw, _dir) = serve_policy(&policy, &env).await;
    let body = |model: &str, format: &str| {
        json!({"model": model, "prompt": "a fox", "output_format": format, "output_compression": 35,
            "background": "opaque", "moderation": "low", "response_format": "b64_json"})
    };

    let r = gw.generate(&body("az", "webp")).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("moderation"), "{}", r.describe());
    assert_eq!(
        az.last_call().json(),
        json!({"prompt": "a fox", "n": 1, "response_format": "b64_json", "background": "opaque",
            "output_format": "webp", "output_compression": 35}),
    );

    let r = gw.generate(&body("fal", "jpeg")).await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("background, output_compression, moderation"),
        "{}",
        r.describe()
    );
    assert_eq!(fal.submitted_input()["output_format"], json!("jpeg"));
    let r = gw.generate(&body("fal", "webp")).await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-acc-dropped-params").as_deref(),
        Some("background, output_format, output_compression, moderation"),
        "fal's FLUX models have no webp: {}",
        r.describe()
    );
    assert_eq!(fal.submitted_input().get("output_format"), None);

    let r = gw.generate(&body("rep", "jpeg")).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-dropped-params").as_deref(), Some("background, moderation"), "{}", r.describe());
    let input = rep.created_body()["input"].clone();
    assert_eq!((&input["output_format"], &input["output_quality"]), (&json!("jpg"), &json!(35)), "{input}");
}
