//! `safety`: NudeNet's detector (ONNX, in-process) scores exposed body parts; the route says
//! which classes are unsafe and above what score. Score 1 means nothing unsafe was found.

use std::path::PathBuf;

use super::{classifier, nudenet};
use super::{Evaluator, Outcome, SafetyModel, Subject, Verdict};

/// Classes unsafe by default: the explicit ones. Faces, covered parts, feet, belly and
/// armpits are not.
pub const DEFAULT_UNSAFE: &[&str] = &[
    "FEMALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
];

pub struct Safety {
    pub model: PathBuf,
}

impl Safety {
    pub fn new() -> Safety {
        Safety { model: nudenet::default_model_path() }
    }

    /// `Ok` when the runtime loads and the model file is there; else what is missing, where.
    pub fn ready(&self) -> Result<(), String> {
        super::onnx::runtime()?;
        if !self.model.is_file() {
            return Err(format!("NudeNet model not found at {} (run scripts/setup-onnx.sh)", self.model.display()));
        }
        Ok(())
    }
}

impl Default for Safety {
    fn default() -> Self {
        Self::new()
    }
}

impl Evaluator for Safety {
    fn name(&self) -> &'static str {
        "safety"
    }

    fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        // Every configured model scores the image; the worst unsafe score decides.
        let mut worst = 0.0f32;
        let mut unsafe_found: Vec<String> = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for model in &s.settings.safety_models {
            let scored: Result<Vec<(String, f32, bool)>, String> = match model {
                SafetyModel::NudeNet => {
                    let unsafe_classes: Vec<&str> = match &s.settings.unsafe_classes {
                        Some(list) => list.iter().map(String::as_str).collect(),
                        None => DEFAULT_UNSAFE.to_vec(),
                    };
                    self.ready().and_then(|()| s.image.detections(&self.model).clone()).map(|d| {
                        d.iter().map(|d| (d.class.to_string(), d.score, unsafe_classes.contains(&d.class))).collect()
                    })
                }
                SafetyModel::Classifier(spec) => classifier::classify(spec, &s.image.rgb).map(|scores| {
                    scores
                        .into_iter()
                        .map(|(label, p)| {
                            let bad = spec.unsafe_labels.contains(&label);
                            (format!("{}:{label}", spec.name), p, bad)
                        })
                        .collect()
                }),
            };
            let scored = match scored {
                Ok(v) => v,
                Err(e) => return Verdict { evaluator: "safety", score: 0.0, verdict: Outcome::Error, reason: e },
            };
            for (label, p, bad) in scored {
                if bad {
                    worst = worst.max(p);
                    if p > s.settings.max_unsafe {
                        unsafe_found.push(format!("{label} {p:.2}"));
                    }
                } else if p >= 0.25 {
                    seen.push(format!("{label} {p:.2}"));
                }
            }
        }
        let score = 1.0 - worst;
        if !unsafe_found.is_empty() {
            return Verdict {
                evaluator: "safety",
                score,
                verdict: Outcome::Fail,
                reason: format!("unsafe content: {} (limit {:.2})", unsafe_found.join(", "), s.settings.max_unsafe),
            };
        }
        let reason = if seen.is_empty() && worst == 0.0 {
            "no detections".to_string()
        } else {
            seen.truncate(3);
            format!("nothing unsafe above {:.2} (worst {worst:.2}); seen: {}", s.settings.max_unsafe, seen.join(", "))
        };
        Verdict { evaluator: "safety", score, verdict: Outcome::Pass, reason }
    }
}
