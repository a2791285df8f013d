//! The `text` evaluator (PP-OCR in-process) through the running binary: required, forbidden
//! and "no text" rules from the route, and text clauses of the prompt contract. Images are
//! rendered by scripts/ocr-testimages.sh (scripts/test.sh runs it).

mod common;

use common::*;
use serde_json::json;

fn rendered(file: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/ocr-testimages").join(file);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("{}: {e}; run scripts/setup-onnx.sh and scripts/ocr-testimages.sh (scripts/test.sh does)", p.display())
    })
}

async fn gateway(route_extra: &str) -> (MockProvider, MockProvider, Gateway, PolicyDir) {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    // debug builds under parallel tests: room for OCR
    let signs = route_toml("signs", "m").target_default("first").fallback("spare").with("eval_budget_ms = 60000");
    let policy = format!(
        "{}{}{}{}",
        openai_provider_at("first", &first.base_url()),
        openai_provider_at("second", &second.base_url()),
        signs.with(route_extra),
        route_toml("spare", "spare").target_default("second"),
    );
    let (gw, dir) = serve_policy(&policy, &[]).await;
    (first, second, gw, dir)
}

fn req() -> serde_json::Value {
    json!({"model": "m", "prompt": "a shop sign", "response_format": "b64_json"})
}

#[tokio::test]
async fn required_text_missing_falls_back_to_an_image_that_has_it() {
    let (first, second, gw, _d) = gateway("evaluators = [\"text\"]\nrequire_text = [\"acme\"]").await;
    first.answer_with(&rendered("27-scene-1024x1024.png")); // OPEN BAKERY 24/7, SALE 50% OFF
    let acme = rendered("28-scene-1024x1024.png"); // ACME, Hello World, 0123456789
    second.answer_with(&acme);
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![acme]);
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.json()["evaluators"]["text"], "ready", "{}", ready.describe());
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:eval_failed, second:ok"), "{}", r.describe());
}

#[tokio::test]
async fn forbidden_text_blocks_and_no_text_rule_flags() {
    let (first, second, gw, _d) =
        gateway("evaluators = [\"text\"]\nforbid_text = [\"SALE 50% OFF\"]\non_text_fail = \"block\"").await;
    first.answer_with(&rendered("27-scene-1024x1024.png"));
    let r = gw.generate(&req()).await;
    let e = r.assert_error(400, "content_policy_violation");
    assert!(e["message"].as_str().unwrap().contains("forbidden text \"SALE 50% OFF\" found"), "{}", r.describe());
    assert_eq!(second.hits(), 0);

    let (first, _second, gw, _d) =
        gateway("evaluators = [\"text\"]\nforbid_any_text = true\non_text_fail = \"flag\"").await;
    first.answer_with(&rendered("01-DejaVuSans-28.png"));
    let r = gw.generate(&req()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"));
    assert!(r.header("x-acc-reasons").unwrap_or_default().contains("none is allowed"));
}

#[tokio::test]
async fn contract_text_clauses_use_ocr() {
    let (first, _second, gw, _d) = gateway("evaluators = [\"adherence\"]\non_low_adherence = \"flag\"").await;
    first.answer_with(&rendered("28-scene-1024x1024.png"));
    let mut body = req();
    body["acc"] = json!({"require_text": ["Hello World"], "forbid_text": ["OPEN BAKERY"]});
    let r = gw.generate(&body).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{}", r.describe());
    body["acc"] = json!({"require_text": ["OPEN BAKERY 24/7"]});
    let r = gw.generate(&body).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"), "{}", r.describe());
    assert!(r.header("x-acc-reasons").unwrap_or_default().contains("required text \"OPEN BAKERY 24/7\" not found"));
}

/// Text-free photographs from the scikit-image wheel (`scripts/fetch-testimages.sh`): OCR reads
/// no text in any of them, so a rule that forbids all text passes them. `coffee.png` used to read
/// a single "O" off the cup's rim.
#[tokio::test]
async fn text_free_photos_pass_a_no_text_rule() {
    let (first, _second, gw, _d) =
        gateway("evaluators = [\"text\", \"adherence\"]\nforbid_any_text = true\non_text_fail = \"block\"\non_low_adherence = \"block\"").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/testimages");
    for photo in ["coffee.png", "astronaut.png", "camera.png", "chelsea.png", "color.png"] {
        let bytes = std::fs::read(dir.join(photo))
            .unwrap_or_else(|e| panic!("{photo}: {e}; run scripts/fetch-testimages.sh (scripts/test.sh does)"));
        first.answer_with(&bytes);
        let r = gw.generate(&req()).await;
        assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{photo}: {}", r.describe());
        let mut body = req();
        body["acc"] = json!({"forbid_text": true});
        let r = gw.generate(&body).await;
        assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{photo} with a contract: {}", r.describe());
    }
}

/// OCR runs only when something asks a question about text: a prompt contract without a text
/// clause, or a route whose text rules are empty, leaves the OCR models unloaded on the
/// evaluating thread; a text clause loads and runs them.
#[test]
fn ocr_runs_only_for_text_clauses() {
    use acc::eval::{self, ocr, onnx};
    use acc::request::contract::Contract;
    let photo = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/testimages/chelsea.png"))
        .expect("run scripts/fetch-testimages.sh (scripts/test.sh does)");
    let bytes = bytes::Bytes::from(photo);
    let (det, _rec) = ocr::default_models();
    let available = eval::available();
    let evaluators: Vec<_> = ["adherence", "text"].iter().map(|n| available[n].clone()).collect();
    let run = move |contract: &'static str| {
        let (bytes, evaluators, det) = (bytes.clone(), evaluators.clone(), det.clone());
        // A fresh thread has no ONNX sessions yet: a session afterwards means OCR ran.
        std::thread::spawn(move || {
            let contract = Contract::parse(contract.as_bytes()).unwrap();
            let report = eval::evaluate(&bytes, None, &eval::Settings::default(), Some(&contract), "", &evaluators);
            (report.verdicts, onnx::has_session(&det))
        })
        .join()
        .unwrap()
    };
    let (verdicts, ocr_ran) = run(r#"{"aspect": "3:2"}"#);
    assert!(!ocr_ran, "no text clause, yet OCR ran: {verdicts:?}");
    let (verdicts, ocr_ran) = run(r#"{"forbid_text": true}"#);
    assert!(ocr_ran, "a text clause, yet OCR did not run: {verdicts:?}");
}

/// Print 12 px high on a 1024x1024 image is below what the detector reads whole at its default
/// size (a rule requiring it fails: the float models find none of it, the 8-bit ones a part);
/// a route with `ocr_max_side = 1024` reads it and the rule holds.
#[tokio::test]
async fn fine_print_needs_a_larger_ocr_max_side() {
    let fine = rendered("fineprint-1024x1024.png"); // FRESH COFFEE, Open 7 days at 12 px
    let rule = "evaluators = [\"text\"]\nrequire_text = [\"FRESH COFFEE\"]\non_text_fail = \"flag\"";
    let (first, _second, gw, _d) = gateway(rule).await;
    first.answer_with(&fine);
    let r = gw.generate(&req()).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"), "{}", r.describe());
    let reasons = r.header("x-acc-reasons").unwrap_or_default();
    assert!(reasons.contains("FRESH COFFEE"), "{}", r.describe());

    let (first, _second, gw, _d) = gateway(&format!("{rule}\nocr_max_side = 1024")).await;
    first.answer_with(&fine);
    let r = gw.generate(&req()).await;
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{}", r.describe());
}

/// At a small `ocr_max_side` text is a few pixels high in what the detector sees; the 8-bit
/// detector lost whole lines there that the float one reads (every scene of the rendered set
/// read nothing at 128), so below `ocr::INT8_DET_MIN_SIDE` the float detector runs, and a
/// required line in each scene is still found at 128.
#[tokio::test]
async fn a_small_ocr_max_side_still_finds_the_scenes_lines() {
    use acc::eval::ocr;
    const { assert!(ocr::INT8_DET_MIN_SIDE > 128) };
    for (file, line) in [
        ("28-scene-1024x1024.png", "0123456789"),
        ("29-scene-768x768.png", "Route 66 Diner"),
        ("30-scene-1536x1024.png", "Grand Opening Today"),
    ] {
        let rule = format!(
            "evaluators = [\"text\"]\nrequire_text = [\"{line}\"]\non_text_fail = \"flag\"\nocr_max_side = 128"
        );
        let (first, _second, gw, _d) = gateway(&rule).await;
        first.answer_with(&rendered(file));
        let r = gw.generate(&req()).await;
        assert_eq!(r.header("x-acc-decision").as_deref(), Some("pass"), "{file}: {}", r.describe());
    }
}

/// A contract's text clauses come from the client and are quoted in the reasons of a failed
/// check: a clause with CR LF (it could forge a log line) is refused as the client's mistake,
/// and a contract of thousands of clauses makes neither a megabyte error message nor a
/// megabyte log line.
#[tokio::test]
async fn contract_text_in_reasons_is_refused_or_bounded() {
    let (first, _second, gw, _d) = gateway("evaluators = [\"adherence\"]\non_low_adherence = \"block\"").await;
    first.answer_with(&rendered("28-scene-1024x1024.png"));
    let mut body = req();
    body["acc"] = json!({ "require_text": ["ACME\r\nforged: log line"] });
    let err = gw.generate(&body).await.assert_error(400, "invalid_contract");
    assert!(
        err["message"].as_str().unwrap().contains(r#""ACME\r\nforged: log line" holds the character U+000D"#),
        "{err}"
    );

    let long = "Z".repeat(190);
    body["acc"] = json!({ "require_text": (0..3000).map(|i| format!("{long}{i}")).collect::<Vec<_>>() });
    let r = gw.generate(&body).await;
    let err = r.assert_error(400, "content_policy_violation");
    let message = err["message"].as_str().unwrap();
    assert!(message.len() < 20_000, "a {} byte message", message.len());
    assert!(message.contains("more characters)"), "{message}");
    let stderr = gw.stderr();
    assert!(!stderr.lines().any(|l| l.starts_with("forged: log line")), "a forged log line:\n{stderr}");
    assert!(
        stderr.lines().all(|l| l.len() < 20_000),
        "a log line of {} bytes",
        stderr.lines().map(str::len).max().unwrap()
    );
}
