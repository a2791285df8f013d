//! `safety`: NudeNet's detector (ONNX, in-process) scores exposed body parts; the route says
//! which classes are unsafe and above what score. Score 1 means nothing unsafe was found.

use std::path::PathBuf;

use super::nudenet;
use super::{Evaluator, Outcome, Subject, Verdict};

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
        let detections = match self.ready().and_then(|()| s.image.detections(&self.model).clone()) {
            Ok(d) => d,
            Err(e) => return Verdict { evaluator: "safety", score: 0.0, verdict: Outcome::Error, reason: e },
        };
        let unsafe_classes: Vec<&str> = match &s.settings.unsafe_classes {
            Some(list) => list.iter().map(String::as_str).collect(),
            None => DEFAULT_UNSAFE.to_vec(),
        };
        let found: Vec<&nudenet::Detection> = detections.iter().filter(|d| unsafe_classes.contains(&d.class)).collect();
        let worst = found.iter().map(|d| d.score).fold(0.0f32, f32::max);
        let listed: Vec<String> = found.iter().map(|d| format!("{} {:.2}", d.class, d.score)).collect();
        let score = 1.0 - worst;
        if worst > s.settings.max_unsafe {
            Verdict {
                evaluator: "safety",
                score,
                verdict: Outcome::Fail,
                reason: format!("unsafe content: {} (limit {:.2})", listed.join(", "), s.settings.max_unsafe),
            }
        } else {
            let others: Vec<String> =
                detections.iter().take(3).map(|d| format!("{} {:.2}", d.class, d.score)).collect();
            let reason = if others.is_empty() {
                "no detections".to_string()
            } else {
                format!("nothing unsafe above {:.2}; seen: {}", s.settings.max_unsafe, others.join(", "))
            };
            Verdict { evaluator: "safety", score, verdict: Outcome::Pass, reason }
        }
    }
}
