//! A user-supplied ONNX image classifier for the `safety` evaluator, beside or instead of
//! NudeNet: policies give its input size, normalisation, output activation, labels and which
//! labels are unsafe. Input: float32 NCHW `[1, 3, size, size]`, RGB scaled to 0..1 then
//! `(x - mean) / std`; output: one row of per-label values (`[1, labels]`).

use std::path::PathBuf;

use image::imageops::FilterType;

use super::onnx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Softmax,
    Sigmoid,
    /// The model already outputs probabilities.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierSpec {
    pub name: String,
    pub model: PathBuf,
    pub input_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub activation: Activation,
    pub labels: Vec<String>,
    pub unsafe_labels: Vec<String>,
}

/// Per-label scores in [0, 1], in label order.
pub fn classify(spec: &ClassifierSpec, img: &image::RgbImage) -> Result<Vec<(String, f32)>, String> {
    if !spec.model.is_file() {
        return Err(format!("classifier \"{}\": model not found at {}", spec.name, spec.model.display()));
    }
    let s = spec.input_size;
    let resized = image::imageops::resize(img, s, s, FilterType::Triangle);
    let plane = (s * s) as usize;
    let mut input = vec![0f32; 3 * plane];
    for (i, p) in resized.pixels().enumerate() {
        for c in 0..3 {
            input[c * plane + i] = (p.0[c] as f32 / 255.0 - spec.mean[c]) / spec.std[c];
        }
    }
    let raw: Vec<f32> = onnx::with_session(&spec.model, |session| {
        let side = s as usize;
        let tensor = ort::value::TensorRef::from_array_view(([1usize, 3, side, side], &input[..]))
            .map_err(|e| format!("classifier \"{}\": input tensor: {e}", spec.name))?;
        let outputs = session
            .run(ort::inputs![tensor])
            .map_err(|e| format!("classifier \"{}\": inference failed: {e}", spec.name))?;
        let (_, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("classifier \"{}\": unexpected output: {e}", spec.name))?;
        Ok(data.to_vec())
    })?;
    if raw.len() != spec.labels.len() {
        return Err(format!(
            "classifier \"{}\": the model gives {} values, the policy names {} labels",
            spec.name,
            raw.len(),
            spec.labels.len()
        ));
    }
    let scores = activate(spec.activation, &raw);
    Ok(spec.labels.iter().cloned().zip(scores).collect())
}

pub fn activate(a: Activation, raw: &[f32]) -> Vec<f32> {
    match a {
        Activation::None => raw.to_vec(),
        Activation::Sigmoid => raw.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
        Activation::Softmax => {
            let max = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = raw.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|e| e / sum).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations() {
        let p = activate(Activation::Softmax, &[0.0, 0.0, 2f32.ln()]);
        assert!((p[2] - 0.5).abs() < 1e-6 && (p[0] - 0.25).abs() < 1e-6);
        assert!((activate(Activation::Sigmoid, &[0.0])[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn a_missing_model_is_an_error() {
        let spec = ClassifierSpec {
            name: "x".into(),
            model: "/nonexistent/model.onnx".into(),
            input_size: 8,
            mean: [0.0; 3],
            std: [1.0; 3],
            activation: Activation::Softmax,
            labels: vec!["a".into()],
            unsafe_labels: vec![],
        };
        let e = classify(&spec, &image::RgbImage::new(4, 4)).unwrap_err();
        assert!(e.contains("/nonexistent/model.onnx"), "{e}");
    }
}
