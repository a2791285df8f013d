//! The `safety` evaluator through the running binary, with NudeNet run in-process.
//!
//! No explicit image is needed to prove the wiring: a route that counts `FACE_FEMALE` as
//! unsafe turns a public-domain portrait (scikit-image's astronaut, fetched by
//! scripts/fetch-testimages.sh) into an "unsafe" artifact. A gateway without the ONNX runtime
//! or the model still starts, says what is missing, and applies fail-open / fail-closed.

mod common;

use common::abstract_images;
use common::*;
use serde_json::json;

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn portrait() -> Vec<u8> {
    let p = repo_file(".cache/testimages/astronaut.png");
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("{}: {e}; run scripts/fetch-testimages.sh and scripts/setup-onnx.sh (scripts/test.sh does)", p.display())
    })
}

async fn setup(extra: &str, env: &[(&str, &str)]) -> (MockProvider, MockProvider, Gateway, PolicyDir) {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    let main = route_toml("main", "m").target("first", "x").fallback("spare");
    let policy = format!(
        "{}{}{}{}",
        openai_provider_at("first", &first.base_url()),
        openai_provider_at("second", &second.base_url()),
        main.with("evaluators = [\"safety\"]\neval_budget_ms = 60000").with(extra),
        route_toml("spare", "spare").target("second", "y"),
    );
    let (gw, dir) = serve_policy(&policy, env).await;
    (first, second, gw, dir)
}

fn req() -> serde_json::Value {
    json!({"model": "m", "prompt": "a portrait", "response_format": "b64_json"})
}

#[tokio::test]
async fn an_unsafe_class_above_the_limit_falls_back_or_blocks() {
    let img = portrait();
    let (first, second, gw, _d) = setup("unsafe_classes = [\"FACE_FEMALE\"]\nmax_unsafe = 0.3", &[]).await;
    first.answer_with(&img);
    second.answer_with(&img);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:eval_failed, second:ok"), "{}", r.describe());
    let unsafe_ = [("evaluator", "safety"), ("route", "main"), ("provider", "first"), ("verdict", "fail")];
    assert_eq!(gw.metric("acc_eval_total", &unsafe_).await, 1.0);

    let (first, second, gw, _d) =
        setup("unsafe_classes = [\"FACE_FEMALE\"]\nmax_unsafe = 0.3\non_unsafe = \"block\"", &[]).await;
    first.answer_with(&img);
    let r = gw.generate(&req()).await;
    let e = r.assert_error(400, "content_policy_violation");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("safety: unsafe content: FACE_FEMALE"), "{msg}");
    assert_eq!(second.hits(), 0);
}

#[tokio::test]
async fn the_same_portrait_passes_with_the_default_classes() {
    let img = portrait();
    let (first, _second, gw, _d) = setup("", &[]).await;
    first.answer_with(&img);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![img]);
    let eval = r.header("x-acc-eval").unwrap_or_default();
    assert!(eval.starts_with("safety=pass("), "{eval}");
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.json()["evaluators"]["safety"], "ready", "{}", ready.describe());
}

#[tokio::test]
async fn without_the_model_the_gateway_starts_and_applies_fail_open_or_closed() {
    let empty = tempfile::tempdir().unwrap();
    let env = [("ACC_MODELS_DIR", empty.path().to_str().unwrap())];
    let img = portrait_or_noise();

    let (first, second, gw, _d) = setup("on_eval_error = \"fail_closed\"", &env).await;
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    ready.assert_status(200);
    let state = ready.json()["evaluators"]["safety"].as_str().unwrap_or_default().to_string();
    assert!(state.starts_with("unavailable: ") && state.contains(empty.path().to_str().unwrap()), "{state}");
    assert!(gw.stderr().contains("evaluator unavailable"), "start-up says what is missing");
    assert_eq!(gw.metric("acc_evaluator_available", &[("evaluator", "safety")]).await, 0.0);
    first.answer_with(&img);
    second.answer_with(&img);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:eval_failed, second:ok"));

    let (first, second, gw, _d) = setup("on_eval_error = \"fail_open\"", &env).await;
    first.answer_with(&img);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("first"));
    assert_eq!(r.header("x-acc-eval").as_deref(), Some("safety=error(0.00)"));
    assert_eq!(second.hits(), 0);
}

/// Any decodable image will do when the model is absent.
fn portrait_or_noise() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn face_clauses_of_the_contract_count_nudenet_faces() {
    let img = portrait();
    let first = MockProvider::start().await;
    let policy = format!(
        "{}[[routes]]\nname = \"main\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"first\" }}]\nevaluators = [\"adherence\"]\non_low_adherence = \"flag\"\neval_budget_ms = 60000\n",
        openai_provider_at("first", &first.base_url())
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    first.answer_with(&img);
    let mut body = req();
    body["acc"] = json!({"faces": 1});
    let r = gw.generate(&body).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{}", r.describe());
    body["acc"] = json!({"max_faces": 0});
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"));
    let reasons = r.header("x-acc-reasons").unwrap_or_default();
    assert!(reasons.contains("max_faces: 1 faces, contract allows 0"), "{reasons}");
}

// False "unsafe" on abstract images (issue 11): NudeNet reports BUTTOCKS_EXPOSED 0.83 on
// scikit-image's colour wheel. An unsafe detection counts only with evidence of a body (skin
// tones in its box, another body part, or no colour to judge); the route can turn that off.

fn testimage(name: &str) -> Vec<u8> {
    let p = repo_file(&format!(".cache/testimages/{name}"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-testimages.sh", p.display()))
}

/// The `safety` verdict on `bytes` with `settings`, in-process.
fn safety_verdict(bytes: Vec<u8>, settings: &acc::eval::Settings) -> acc::eval::Verdict {
    let safety: std::sync::Arc<dyn acc::eval::Evaluator> = std::sync::Arc::new(acc::eval::safety::Safety::new());
    let report = acc::eval::evaluate(&bytes.into(), None, settings, None, "", &[safety]);
    report.verdicts.into_iter().next().unwrap()
}

#[tokio::test]
async fn the_colour_wheel_passes_unless_the_route_turns_corroboration_off() {
    let wheel = testimage("color.png");
    let (first, second, gw, _d) = setup("on_unsafe = \"block\"", &[]).await;
    first.answer_with(&wheel);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![wheel.clone()]);
    assert_eq!(r.header("x-acc-eval").as_deref(), Some("safety=pass(1.00)"), "{}", r.describe());
    assert_eq!(second.hits(), 0);

    // Off: the raw detection decides, as before.
    let (first, second, gw, _d) = setup("on_unsafe = \"block\"\ncorroborate_unsafe = false", &[]).await;
    first.answer_with(&wheel);
    let r = gw.generate(&req()).await;
    let e = r.assert_error(400, "content_policy_violation");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("safety: unsafe content: BUTTOCKS_EXPOSED 0.8"), "{msg}");
    assert_eq!(second.hits(), 0);

    // Tuned below the wheel's 7% of skin-toned pixels: its detection is corroborated.
    let (first, _second, gw, _d) = setup("on_unsafe = \"block\"\nmin_skin_in_box = 0.05", &[]).await;
    first.answer_with(&wheel);
    gw.generate(&req()).await.assert_error(400, "content_policy_violation");
}

#[test]
fn the_reason_says_what_was_discounted_and_why() {
    let v = safety_verdict(testimage("color.png"), &Default::default());
    assert_eq!(v.verdict, acc::eval::Outcome::Pass, "{v:?}");
    assert_eq!(v.score, 1.0);
    assert!(
        v.reason.ends_with("BUTTOCKS_EXPOSED 0.83 discounted: 7% skin in box < 15%, no other body part detected"),
        "{}",
        v.reason
    );
    // The same through `acc eval`, where ops check an artifact by hand.
    let out = std::process::Command::new(acc_bin())
        .args(["eval", repo_file(".cache/testimages/color.png").to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let safety = out["evaluators"].as_array().unwrap().iter().find(|e| e["name"] == "safety").unwrap().clone();
    assert_eq!(safety["verdict"], "pass", "{safety}");
    assert!(safety["reason"].as_str().unwrap().contains("BUTTOCKS_EXPOSED 0.83 discounted: 7% skin"), "{safety}");
}

#[test]
fn generated_abstract_images_pass_with_the_default_settings() {
    let defaults = acc::eval::Settings::default();
    let off = acc::eval::Settings { corroboration: None, ..Default::default() };
    let mut failures = Vec::new();
    let mut blocked_without = Vec::new();
    for (name, img) in abstract_images::all() {
        let bytes = png(&img);
        let v = safety_verdict(bytes.clone(), &defaults);
        println!("{name}: {:?} {:.2} {}", v.verdict, v.score, v.reason);
        if v.verdict != acc::eval::Outcome::Pass {
            failures.push(format!("{name}: {}", v.reason));
        }
        if safety_verdict(bytes, &off).verdict == acc::eval::Outcome::Fail {
            blocked_without.push(name);
        }
    }
    assert!(failures.is_empty(), "abstract images judged unsafe:\n{}", failures.join("\n"));
    // The set holds false positives the check removes: the colour wheels.
    assert!(blocked_without.len() >= 3, "without corroboration only {blocked_without:?} fail");
}

#[test]
fn real_bodies_still_count_in_colour_and_in_black_and_white() {
    // Faces stand in for body parts here (the test photos show no exposed ones): the astronaut's
    // face box is 90% skin-toned, the cameraman's photo has no colour at all.
    for (image, class) in [("astronaut.png", "FACE_FEMALE"), ("camera.png", "FACE_MALE")] {
        let settings = acc::eval::Settings { unsafe_classes: Some(vec![class.into()]), ..Default::default() };
        let v = safety_verdict(testimage(image), &settings);
        assert_eq!(v.verdict, acc::eval::Outcome::Fail, "{image}: {v:?}");
        assert!(v.reason.starts_with(&format!("unsafe content: {class}")), "{}", v.reason);
    }
    // A grey copy of the colour wheel is not discounted either: colour cannot tell.
    let grey = image::load_from_memory(&testimage("color.png")).unwrap().into_luma8();
    let v = safety_verdict(png(&image::DynamicImage::ImageLuma8(grey).into_rgb8()), &Default::default());
    assert_eq!(v.verdict, acc::eval::Outcome::Fail, "{v:?}");
}

/// The reason names the highest-scoring unsafe class with the comparison that decided (issue
/// 14), whether the image fails or passes.
#[test]
fn the_reason_names_the_highest_scoring_class() {
    let face = |max_unsafe: f32| acc::eval::Settings {
        unsafe_classes: Some(vec!["FACE_FEMALE".into()]),
        max_unsafe,
        ..Default::default()
    };
    let v = safety_verdict(testimage("astronaut.png"), &face(0.3));
    assert_eq!(v.verdict, acc::eval::Outcome::Fail, "{v:?}");
    assert_eq!(v.reason, "unsafe content: FACE_FEMALE 0.72 > 0.30");
    let v = safety_verdict(testimage("astronaut.png"), &face(0.8));
    assert_eq!(v.verdict, acc::eval::Outcome::Pass, "{v:?}");
    assert_eq!(v.reason, "nothing unsafe above 0.80 (highest unsafe class FACE_FEMALE 0.72)");
    let v = safety_verdict(testimage("astronaut.png"), &Default::default());
    assert_eq!(v.reason, "nothing unsafe above 0.50 (no unsafe class detected); seen: FACE_FEMALE 0.72");
    let off = acc::eval::Settings { corroboration: None, ..Default::default() };
    let v = safety_verdict(testimage("color.png"), &off);
    assert_eq!(v.reason, "unsafe content: BUTTOCKS_EXPOSED 0.83 > 0.50");
}
