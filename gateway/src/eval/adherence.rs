//! `adherence`: checks an artifact against the request's prompt contract, a small JSON object
//! that states what the image must satisfy, e.g.
//! `{"background": "white", "max_faces": 0, "aspect": "1:1"}`. The score is the share of
//! clauses that hold; each failed clause is named in the reason.

use super::{safety::Safety, Evaluator, Outcome, Subject, Verdict};
use crate::request::contract::Contract;
use crate::request::contract::{parse_colour, parse_wxh};
use crate::request::Size;

/// The contract's clauses as this evaluator counts and checks them.
pub trait ContractClauses {
    /// The contract's text clauses as rules for the text evaluator's matcher.
    fn text_rules(&self) -> super::text::TextRules;
    /// How many clauses the contract states (the score's denominator, without CLIP).
    fn clauses(&self) -> usize;
}

impl ContractClauses for Contract {
    fn text_rules(&self) -> super::text::TextRules {
        let (forbid, forbid_any) = match &self.forbid_text {
            Some(serde_json::Value::Bool(b)) => (Vec::new(), *b),
            Some(serde_json::Value::Array(a)) => {
                (a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(), false)
            }
            _ => (Vec::new(), false),
        };
        super::text::TextRules { require: self.require_text.clone(), forbid, forbid_any }
    }

    fn clauses(&self) -> usize {
        [
            self.background.is_some(),
            self.max_faces.is_some(),
            self.faces.is_some(),
            self.size.is_some(),
            self.aspect.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
            + self.text_rules().clauses()
    }
}

/// Share of the border (outer 5% on each side) within `tolerance` of `colour`.
pub fn border_match(img: &image::RgbImage, colour: [u8; 3], tolerance: f32) -> f32 {
    let (w, h) = img.dimensions();
    let m = (w.min(h) / 20).max(1);
    let step = ((w.max(h) / 256).max(1)) as usize;
    let (mut total, mut hits) = (0u32, 0u32);
    for y in (0..h).step_by(step) {
        for x in (0..w).step_by(step) {
            if x >= m && x < w - m && y >= m && y < h - m {
                continue;
            }
            let p = img.get_pixel(x, y).0;
            let d: f32 = (0..3).map(|c| (p[c] as f32 - colour[c] as f32).powi(2)).sum::<f32>().sqrt();
            total += 1;
            hits += u32::from(d <= tolerance);
        }
    }
    if total == 0 {
        0.0
    } else {
        hits as f32 / total as f32
    }
}

pub struct Adherence {
    faces: Safety,
}

impl Adherence {
    pub fn new() -> Adherence {
        Adherence { faces: Safety::new() }
    }
}

impl Default for Adherence {
    fn default() -> Self {
        Self::new()
    }
}

impl Evaluator for Adherence {
    fn name(&self) -> &'static str {
        "adherence"
    }

    fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        let empty = Contract::default();
        let c = s.contract.unwrap_or(&empty);
        // CLIP similarity, where configured, is one more clause.
        let total = c.clauses() + usize::from(s.settings.clip.is_some());
        if total == 0 {
            return Verdict {
                evaluator: "adherence",
                score: 1.0,
                verdict: Outcome::Pass,
                reason: "no prompt contract".into(),
            };
        }
        let img = &s.image.rgb;
        let size = Size { width: img.width(), height: img.height() };
        let mut failed: Vec<String> = Vec::new();
        if let Some(b) = &c.background {
            let colour = parse_colour(b).unwrap_or([255, 255, 255]);
            let share = border_match(img, colour, 48.0);
            if share < 0.8 {
                failed.push(format!("background: {:.0}% of the border is {b} (need 80%)", share * 100.0));
            }
        }
        if let Some(want) = &c.size {
            if parse_wxh(want, 'x') != Some((size.width, size.height)) {
                failed.push(format!("size: image is {size}, contract says {want}"));
            }
        }
        if let Some(a) = &c.aspect {
            if let Some((aw, ah)) = parse_wxh(a, ':') {
                let (want, got) = (aw as f64 / ah as f64, size.width as f64 / size.height as f64);
                if (got / want - 1.0).abs() > 0.01 {
                    failed.push(format!("aspect: image is {:.3}, contract says {a}", got));
                }
            }
        }
        if c.max_faces.is_some() || c.faces.is_some() {
            let faces = self.faces.ready().and_then(|()| s.image.detections(&self.faces.model).clone()).map(|d| {
                d.iter().filter(|d| matches!(d.class, "FACE_FEMALE" | "FACE_MALE") && d.score >= 0.4).count() as u32
            });
            match faces {
                Err(e) => {
                    return Verdict {
                        evaluator: "adherence",
                        score: 0.0,
                        verdict: Outcome::Error,
                        reason: format!("faces: {e}"),
                    }
                }
                Ok(n) => {
                    if let Some(max) = c.max_faces {
                        if n > max {
                            failed.push(format!("max_faces: {n} faces, contract allows {max}"));
                        }
                    }
                    if let Some(exact) = c.faces {
                        if n != exact {
                            failed.push(format!("faces: {n} faces, contract says {exact}"));
                        }
                    }
                }
            }
        }
        let mut notes = Vec::new();
        if let Some((cfg, min)) = &s.settings.clip {
            match super::clip::similarity(cfg, img, s.prompt) {
                Err(e) => {
                    return Verdict {
                        evaluator: "adherence",
                        score: 0.0,
                        verdict: Outcome::Error,
                        reason: format!("clip: {e}"),
                    }
                }
                Ok(sim) if sim < *min => failed.push(format!("clip: prompt-image similarity {sim:.3} < {min:.3}")),
                Ok(sim) => notes.push(format!("clip similarity {sim:.3}")),
            }
        }
        let rules = c.text_rules();
        if !rules.is_empty() {
            match super::text::ready().and_then(|()| super::text::read(s.image, s.settings.ocr_max_side)) {
                Err(e) => {
                    return Verdict {
                        evaluator: "adherence",
                        score: 0.0,
                        verdict: Outcome::Error,
                        reason: format!("text: {e}"),
                    }
                }
                Ok(read) => failed.extend(rules.failures(&read)),
            }
        }
        let score = (total - failed.len()) as f32 / total as f32;
        if score < s.settings.min_adherence {
            Verdict { evaluator: "adherence", score, verdict: Outcome::Fail, reason: failed.join("; ") }
        } else {
            let reason = if failed.is_empty() {
                let mut r = format!("all {total} clauses hold");
                for n in &notes {
                    r.push_str("; ");
                    r.push_str(n);
                }
                r
            } else {
                format!("{} of {total} clauses hold; {}", total - failed.len(), failed.join("; "))
            };
            Verdict { evaluator: "adherence", score, verdict: Outcome::Pass, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{Decoded, Settings};

    fn subject_eval(img: image::RgbImage, contract: &Contract) -> Verdict {
        let decoded = Decoded::new(image::ImageFormat::Png, img);
        let settings = Settings::default();
        Adherence::new().evaluate(&Subject {
            expected_format: None,
            image: &decoded,
            expected_size: None,
            settings: &settings,
            contract: Some(contract),
            prompt: "a product shot",
        })
    }

    fn product_shot(bg: [u8; 3]) -> image::RgbImage {
        image::RgbImage::from_fn(200, 100, |x, y| {
            if (60..140).contains(&x) && (20..80).contains(&y) {
                image::Rgb([200, 30, 30])
            } else {
                image::Rgb(bg)
            }
        })
    }

    #[test]
    fn clauses_are_scored_and_named() {
        let c = Contract::parse(br#"{"background": "white", "aspect": "2:1", "size": "200x100"}"#).unwrap();
        let v = subject_eval(product_shot([250, 250, 250]), &c);
        assert_eq!((v.verdict, v.score), (Outcome::Pass, 1.0), "{}", v.reason);
        let v = subject_eval(product_shot([20, 20, 20]), &c);
        assert_eq!(v.verdict, Outcome::Fail);
        assert!((v.score - 2.0 / 3.0).abs() < 1e-6);
        assert!(v.reason.starts_with("background: 0% of the border is white"), "{}", v.reason);
    }

    #[test]
    fn contracts_are_validated() {
        assert!(Contract::parse(br#"{"background": "mauve"}"#).unwrap_err().contains("background"));
        assert!(Contract::parse(br#"{"colour": "white"}"#).unwrap_err().contains("unknown field"));
        assert!(Contract::parse(br#"{"aspect": "wide"}"#).is_err());
        assert!(Contract::parse(br#"{"forbid_text": 3}"#).is_err());
        assert_eq!(parse_colour("#FF8000"), Some([255, 128, 0]));
    }

    #[test]
    fn text_clauses_count_like_the_others() {
        let c =
            Contract::parse(br#"{"require_text": ["ACME", "SALE"], "forbid_text": ["FREE"], "background": "white"}"#)
                .unwrap();
        assert_eq!(c.clauses(), 4);
        assert_eq!(c.text_rules().require, vec!["ACME", "SALE"]);
        let c = Contract::parse(br#"{"forbid_text": true}"#).unwrap();
        assert!(c.text_rules().forbid_any);
    }
}
