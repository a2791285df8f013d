//! Models that policies configure: a custom safety classifier and CLIP encoders for adherence,
//! through the running binary. Uses the tiny ONNX models scripts/tiny-models.sh generates
//! (no CLIP weights ship in any package registry, so real ones are the user's to provide).

mod common;

use common::*;
use serde_json::json;

fn tiny(file: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny-models").join(file);
    assert!(p.is_file(), "{} is missing: run scripts/tiny-models.sh (scripts/test.sh does)", p.display());
    p
}

async fn gateway(extra_top: &str, route: &str) -> (MockProvider, Gateway, PolicyDir) {
    let mock = MockProvider::start().await;
    let policy = format!(
        "{extra_top}\n{}[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"up\" }}]\neval_budget_ms = 60000\n{route}\n",
        openai_provider_at("up", &mock.base_url())
    );
    let dir = PolicyDir::with(&policy);
    let gw = Gateway::start(dir.path()).await;
    (mock, gw, dir)
}

fn req() -> serde_json::Value {
    json!({"model": "m", "prompt": "a red square", "response_format": "b64_json"})
}

#[tokio::test]
async fn a_custom_classifier_blocks_what_its_unsafe_labels_score_high() {
    let classifier = format!(
        "[classifiers.redness]\nmodel = \"{}\"\ninput_size = 16\nlabels = [\"blue\", \"green\", \"red\"]\nunsafe_labels = [\"red\"]\n",
        tiny("classifier.onnx").display()
    );
    let (mock, gw, _d) =
        gateway(&classifier, "evaluators = [\"safety\"]\nsafety_models = [\"redness\"]\non_unsafe = \"block\"").await;
    mock.answer_with(&std::fs::read(tiny("red.png")).unwrap());
    let r = gw.generate(&req()).await;
    let e = r.assert_error(400, "content_policy_violation");
    assert!(e["message"].as_str().unwrap().contains("redness:red 1.00"), "{}", r.describe());
    mock.answer_with(&std::fs::read(tiny("blue.png")).unwrap());
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert!(r.header("x-acc-eval").unwrap_or_default().starts_with("safety=pass("), "{}", r.describe());
}

#[tokio::test]
async fn clip_similarity_is_a_clause_of_adherence() {
    let clip = format!(
        "[clip]\nimage_model = \"{}\"\ntext_model = \"{}\"\ninput_size = 32\n",
        tiny("clip_image.onnx").display(),
        tiny("clip_text.onnx").display()
    );
    let (mock, gw, _d) =
        gateway(&clip, "evaluators = [\"adherence\"]\nmin_clip_similarity = -1.0\non_low_adherence = \"flag\"").await;
    mock.answer_with(&std::fs::read(tiny("red.png")).unwrap());
    let r = gw.generate(&req()).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{}", r.describe());
    let (mock, gw, _d) =
        gateway(&clip, "evaluators = [\"adherence\"]\nmin_clip_similarity = 1.0\non_low_adherence = \"flag\"").await;
    mock.answer_with(&std::fs::read(tiny("red.png")).unwrap());
    let r = gw.generate(&req()).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"), "{}", r.describe());
    let reasons = r.header("x-acc-reasons").unwrap_or_default();
    assert!(reasons.contains("clip: prompt-image similarity"), "{reasons}");
}
