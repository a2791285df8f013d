//! CLIP prompt-image similarity on tiny stand-in models (no CLIP weights ship in any package
//! registry): `scripts/tiny-models.sh` writes .cache/tiny-models/ with the two encoders, test
//! PNGs and reference.json, whose expected embeddings numpy computed from the same weights and
//! the same preprocessing. ONNX Runtime comes from scripts/setup-onnx.sh.
//!
//! Checked: (i) image embeddings equal numpy's within 1e-4; (ii) text embeddings for fixed
//! token-id lists equal numpy's, and the cosine too; (iii) end to end through the tokenizer,
//! the similarity of a prompt is in [-1, 1], deterministic, and equals the one from the ids
//! the tokenizer's documentation gives; a missing model is an `Err`.

use std::path::PathBuf;

use acc::eval::clip::{self, ClipConfig};

const TOLERANCE: f32 = 1e-4;
const SETUP_HINT: &str = "run scripts/tiny-models.sh (and scripts/setup-onnx.sh for ONNX Runtime) first";

#[derive(serde::Deserialize)]
struct Reference {
    input_size: u32,
    images: Vec<ImageRef>,
    texts: Vec<TextRef>,
    similarities: Vec<SimilarityRef>,
}

#[derive(serde::Deserialize)]
struct ImageRef {
    file: String,
    image_embeds: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct TextRef {
    text: String,
    input_ids: Vec<i64>,
    text_embeds: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct SimilarityRef {
    image: String,
    text: String,
    cosine: f32,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny-models")
}

fn reference() -> Reference {
    let path = dir().join("reference.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}; {SETUP_HINT}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad {}: {e}; rerun scripts/tiny-models.sh", path.display()))
}

fn config(r: &Reference) -> ClipConfig {
    let cfg = ClipConfig {
        image_model: dir().join("clip_image.onnx"),
        text_model: dir().join("clip_text.onnx"),
        input_size: r.input_size,
    };
    if let Err(e) = cfg.ready() {
        panic!("CLIP test models not ready: {e}; {SETUP_HINT}");
    }
    cfg
}

fn load(file: &str) -> image::RgbImage {
    let path = dir().join(file);
    image::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}; {SETUP_HINT}", path.display())).into_rgb8()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOLERANCE, "{what}[{i}]: got {g}, numpy {w}\n got {got:?}\nwant {want:?}");
    }
}

#[test]
fn image_embeddings_match_numpy() {
    let r = reference();
    let cfg = config(&r);
    assert!(!r.images.is_empty());
    for img in &r.images {
        let got = clip::image_embedding(&cfg, &load(&img.file)).unwrap();
        assert_close(&img.file, &got, &img.image_embeds);
    }
}

#[test]
fn text_embeddings_for_ids_match_numpy() {
    let r = reference();
    let cfg = config(&r);
    assert!(!r.texts.is_empty());
    for t in &r.texts {
        assert_eq!(t.input_ids.len(), clip::CONTEXT_LENGTH);
        let got = clip::text_embedding_ids(&cfg, &t.input_ids).unwrap();
        assert_close(&t.text, &got, &t.text_embeds);
        // Unpadded ids are padded with zeros: same embedding.
        let used = t.input_ids.iter().rposition(|&v| v != 0).unwrap() + 1;
        let short = clip::text_embedding_ids(&cfg, &t.input_ids[..used]).unwrap();
        assert_close(&format!("{} (unpadded)", t.text), &short, &t.text_embeds);
    }
}

#[test]
fn similarities_match_numpy() {
    let r = reference();
    let cfg = config(&r);
    assert!(!r.similarities.is_empty());
    for s in &r.similarities {
        let t = r.texts.iter().find(|t| t.text == s.text).unwrap();
        let i = clip::image_embedding(&cfg, &load(&s.image)).unwrap();
        let e = clip::text_embedding_ids(&cfg, &t.input_ids).unwrap();
        let got = clip::cosine(&i, &e);
        assert!((got - s.cosine).abs() <= TOLERANCE, "{} vs {:?}: got {got}, numpy {}", s.image, s.text, s.cosine);
    }
}

#[test]
fn prompt_similarity_is_bounded_and_deterministic() {
    let r = reference();
    let cfg = config(&r);
    for img in &r.images {
        let image = load(&img.file);
        for prompt in ["Hi there", "a red square", "", "a photo of a cat on a sofa, studio lighting"] {
            let a = clip::similarity(&cfg, &image, prompt).unwrap();
            let b = clip::similarity(&cfg, &image, prompt).unwrap();
            assert!((-1.0..=1.0).contains(&a), "{} / {prompt:?}: {a}", img.file);
            assert_eq!(a.to_bits(), b.to_bits(), "{} / {prompt:?}: {a} then {b}", img.file);
        }
    }
    // The tokenizer gives the ids its documentation states for "Hi there", so the prompt's
    // similarity is numpy's for those ids.
    let s = r.similarities.iter().find(|s| s.text == "hi there" && s.image == "blue.png").unwrap();
    let got = clip::similarity(&cfg, &load("blue.png"), "Hi there").unwrap();
    assert!((got - s.cosine).abs() <= TOLERANCE, "got {got}, numpy {}", s.cosine);
}

#[test]
fn images_of_other_sizes_are_resized() {
    let r = reference();
    let cfg = config(&r);
    // A solid colour stays that colour through resize and crop: same embedding as the 32x32 one.
    let red = r.images.iter().find(|i| i.file == "red.png").unwrap();
    let big = image::RgbImage::from_pixel(100, 60, image::Rgb([255, 0, 0]));
    let got = clip::image_embedding(&cfg, &big).unwrap();
    assert_close("red 100x60", &got, &red.image_embeds);
}

#[test]
fn missing_model_is_an_error_not_a_panic() {
    let r = reference();
    let good = config(&r);
    let img = load("red.png");
    let no_image = ClipConfig { image_model: dir().join("no-such-image.onnx"), ..good.clone() };
    let e = clip::similarity(&no_image, &img, "a cat").unwrap_err();
    assert!(e.contains("no-such-image.onnx"), "{e}");
    assert!(no_image.ready().is_err());
    let no_text = ClipConfig { text_model: dir().join("no-such-text.onnx"), ..good.clone() };
    let e = clip::similarity(&no_text, &img, "a cat").unwrap_err();
    assert!(e.contains("no-such-text.onnx"), "{e}");
    // A model of the wrong kind (the image encoder given as the text one) is an error too.
    let swapped = ClipConfig { text_model: good.image_model.clone(), ..good };
    assert!(clip::text_embedding(&swapped, "a cat").is_err());
}

/// The tiny classifier.onnx (for the custom safety classifier's tests) keeps its documented
/// contract: input `input` [1,3,16,16], output `logits` [1,3], labels blue/green/red, and with
/// mean 0 / std 1 a red image gives [-4, -4, 4] and a blue one [4, -4, -4].
#[test]
fn tiny_classifier_keeps_its_contract() {
    use acc::eval::classifier::{self, Activation, ClassifierSpec};
    #[derive(serde::Deserialize)]
    struct Classifier {
        input_size: u32,
        labels: Vec<String>,
        images: Vec<Logits>,
    }
    #[derive(serde::Deserialize)]
    struct Logits {
        file: String,
        logits: Vec<f32>,
    }
    let path = dir().join("reference.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}; {SETUP_HINT}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c: Classifier = serde_json::from_value(v["classifier"].clone()).unwrap();
    assert_eq!(c.labels, ["blue", "green", "red"]);
    let spec = ClassifierSpec {
        name: "tiny".to_string(),
        model: dir().join("classifier.onnx"),
        input_size: c.input_size,
        mean: [0.0; 3],
        std: [1.0; 3],
        activation: Activation::None,
        labels: c.labels.clone(),
        unsafe_labels: vec!["red".to_string()],
    };
    for img in &c.images {
        let got: Vec<f32> =
            classifier::classify(&spec, &load(&img.file)).unwrap().into_iter().map(|(_, s)| s).collect();
        assert_close(&format!("classifier {}", img.file), &got, &img.logits);
    }
    let red = c.images.iter().find(|i| i.file == "red.png").unwrap();
    assert_close("red logits", &red.logits, &[-4.0, -4.0, 4.0]);
    let blue = c.images.iter().find(|i| i.file == "blue.png").unwrap();
    assert_close("blue logits", &blue.logits, &[4.0, -4.0, -4.0]);
}
