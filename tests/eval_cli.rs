//! `acc eval IMAGE`: every evaluator's score, verdict and reason for one artifact, as a table or
//! as JSON, optionally with a route's settings from a policy directory.

mod common;

use std::process::Command;

use common::*;

fn write_png(dir: &std::path::Path, name: &str, img: &image::RgbImage) -> std::path::PathBuf {
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

fn acc_eval(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(acc_bin()).arg("eval").args(args).output().expect("run acc eval");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn json_lists_every_evaluator_with_score_verdict_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let blank = write_png(dir.path(), "blank.png", &image::RgbImage::from_pixel(128, 128, image::Rgb([250, 250, 250])));
    let (code, out, err) = acc_eval(&[blank.to_str().unwrap(), "--json", "--contract", r#"{"background": "white"}"#]);
    assert_eq!(code, 2, "a failing artifact exits 2: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let evs = v["evaluators"].as_array().unwrap();
    let names: Vec<&str> = evs.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["adherence", "safety", "sanity", "text"]);
    for e in evs {
        assert!(e["score"].is_number() && e["reason"].is_string(), "{e}");
        assert!(["pass", "fail", "error"].contains(&e["verdict"].as_str().unwrap()), "{e}");
    }
    let sanity = evs.iter().find(|e| e["name"] == "sanity").unwrap();
    assert_eq!(sanity["verdict"], "fail");
    assert!(sanity["reason"].as_str().unwrap().contains("near-uniform"));
    let adherence = evs.iter().find(|e| e["name"] == "adherence").unwrap();
    assert_eq!(adherence["verdict"], "pass", "a white image has a white background: {adherence}");
}

#[test]
fn a_route_of_a_policy_sets_the_evaluators_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = write_png(
        dir.path(),
        "noisy.png",
        &image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 9 % 256) as u8, (y * 5 % 256) as u8, 77])),
    );
    let pol = PolicyDir::with(
        "[providers.demo]\nkind = \"builtin\"\n[[routes]]\nname = \"shots\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"sanity\"]\n",
    );
    let policy = pol.path().to_str().unwrap();
    let (code, out, err) =
        acc_eval(&[noisy.to_str().unwrap(), "--size", "96x64", "--policy", policy, "--route", "shots"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sanity") && out.contains("pass") && !out.contains("safety"), "{out}");
    let (code, out, _) =
        acc_eval(&[noisy.to_str().unwrap(), "--size", "64x64", "--policy", policy, "--route", "shots"]);
    assert_eq!(code, 2);
    assert!(out.contains("image is 96x64, the request asked for 64x64"), "{out}");
    let (code, _, err) = acc_eval(&[noisy.to_str().unwrap(), "--policy", policy, "--route", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no route \"nope\"") && err.contains("shots"), "{err}");
}

/// Without the fused OCR copies (a models directory that holds only the models as shipped), the
/// text evaluator reads with the shipped models: the same text is found.
#[test]
fn text_reads_with_the_shipped_models_when_no_fused_copy_is_there() {
    use acc::eval::{ocr, onnx};
    let scene = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/ocr-testimages/28-scene-1024x1024.png");
    assert!(scene.is_file(), "{} is missing: run scripts/ocr-testimages.sh", scene.display());
    let (det, rec) = ocr::shipped_models();
    let models = tempfile::tempdir().unwrap();
    for from in [det, rec, onnx::ort_dylib_path()] {
        assert!(from.is_file(), "{} is missing: run scripts/setup-onnx.sh", from.display());
        std::os::unix::fs::symlink(&from, models.path().join(from.file_name().unwrap())).unwrap();
    }
    let contract = r#"{"require_text": ["ACME", "Hello World"], "forbid_text": ["SALE"]}"#;
    for (dir, what) in [(None, "default models directory"), (Some(models.path()), "shipped models only")] {
        let mut cmd = Command::new(acc_bin());
        cmd.args(["eval", scene.to_str().unwrap(), "--json", "--contract", contract]);
        if let Some(dir) = dir {
            cmd.env("ACC_MODELS_DIR", dir).env_remove("ACC_ORT_DYLIB");
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"));
        let text = v["evaluators"].as_array().unwrap().iter().find(|e| e["name"] == "text").unwrap().clone();
        let adherence = v["evaluators"].as_array().unwrap().iter().find(|e| e["name"] == "adherence").unwrap().clone();
        assert_eq!(text["verdict"], "pass", "{what}: {text}");
        assert!(text["reason"].as_str().unwrap().contains("ACME"), "{what}: {text}");
        assert_eq!(adherence["verdict"], "pass", "{what}: {adherence}");
        assert_eq!(adherence["score"], 1.0, "{what}: {adherence}");
    }
}
