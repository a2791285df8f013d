//! `text`: reads the text inside the image (PP-OCR detection + recognition, in-process) and
//! checks it against the route's rules: strings that must appear, strings that must not, or no
//! text at all. Matching ignores case and spaces and tolerates small OCR errors.

use super::{ocr, Decoded, Evaluator, Outcome, Subject, Verdict};

/// Allowed OCR edits per 10 characters of a required or forbidden string.
pub const EDITS_PER_10: usize = 1;

/// What an image's text must satisfy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextRules {
    pub require: Vec<String>,
    pub forbid: Vec<String>,
    pub forbid_any: bool,
}

impl TextRules {
    pub fn is_empty(&self) -> bool {
        self.require.is_empty() && self.forbid.is_empty() && !self.forbid_any
    }

    pub fn clauses(&self) -> usize {
        self.require.len() + self.forbid.len() + usize::from(self.forbid_any)
    }

    /// The failed clauses given the text read from the image.
    pub fn failures(&self, read: &str) -> Vec<String> {
        // OCR's lines are read in their plain form; the rules are put in it (a full-width `５０％`
        // is `50%`).
        let compact = crate::request::contract::rule_text;
        let hay: String = read.chars().filter(|c| !c.is_whitespace()).collect();
        let mut failed = Vec::new();
        for r in &self.require {
            if !ocr::fuzzy_contains(&hay, &compact(r), EDITS_PER_10) {
                failed.push(format!("required text \"{r}\" not found"));
            }
        }
        for f in &self.forbid {
            if ocr::fuzzy_contains(&hay, &compact(f), EDITS_PER_10) {
                failed.push(format!("forbidden text \"{f}\" found"));
            }
        }
        if self.forbid_any && !hay.is_empty() {
            failed.push("the image contains text, and none is allowed".to_string());
        }
        failed
    }
}

/// The OCR'd text of an image, one string (lines joined by spaces), shared by evaluators.
pub fn read(image: &Decoded, max_side: u32) -> Result<String, String> {
    let (det, rec) = ocr::models_for(max_side);
    image.text(&det, &rec, max_side).clone()
}

/// `Ok` when the runtime and both OCR models are there and `ACC_OCR_PRECISION` is valid.
pub fn ready() -> Result<(), String> {
    ocr::precision()?;
    super::onnx::runtime()?;
    let (det, rec) = ocr::default_models();
    for m in [&det, &rec] {
        if !m.is_file() {
            return Err(format!("OCR model not found at {} (run scripts/setup-onnx.sh)", m.display()));
        }
    }
    Ok(())
}

pub struct Text;

impl Evaluator for Text {
    fn name(&self) -> &'static str {
        "text"
    }

    fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        let rules = &s.settings.text;
        if rules.is_empty() && !s.settings.report_text {
            // Nothing to check: OCR is not run (it costs tens of ms per image).
            return Verdict { evaluator: "text", score: 1.0, verdict: Outcome::Pass, reason: "no text rules".into() };
        }
        let read = match ready().and_then(|()| read(s.image, s.settings.ocr_max_side)) {
            Ok(t) => t,
            Err(e) => return Verdict { evaluator: "text", score: 0.0, verdict: Outcome::Error, reason: e },
        };
        let shown: String = read.chars().take(120).collect();
        if rules.is_empty() {
            let reason = if read.is_empty() { "no text".to_string() } else { format!("read \"{shown}\"") };
            return Verdict { evaluator: "text", score: 1.0, verdict: Outcome::Pass, reason };
        }
        let failed = rules.failures(&read);
        let score = (rules.clauses() - failed.len()) as f32 / rules.clauses() as f32;
        if failed.is_empty() {
            Verdict { evaluator: "text", score, verdict: Outcome::Pass, reason: format!("read \"{shown}\"") }
        } else {
            Verdict {
                evaluator: "text",
                score,
                verdict: Outcome::Fail,
                reason: format!("{}; read \"{shown}\"", failed.join("; ")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_tolerate_case_spaces_and_small_ocr_errors() {
        let rules =
            TextRules { require: vec!["Open Bakery 24/7".into()], forbid: vec!["SALE".into()], forbid_any: false };
        assert!(rules.failures("OPENBAKERY24/7").is_empty());
        assert!(rules.failures("0PEN BAKERY 24/7").is_empty());
        assert_eq!(rules.failures("CLOSED"), vec!["required text \"Open Bakery 24/7\" not found"]);
        assert_eq!(rules.failures("OPEN BAKERY 24/7 SALE").len(), 1);
        let none = TextRules { forbid_any: true, ..Default::default() };
        assert!(none.failures("").is_empty());
        assert_eq!(none.failures("x").len(), 1);
        // A rule written in full-width forms matches what OCR reads (NFKC on both sides).
        let wide = TextRules { require: vec!["５０％ ＯＦＦ".into()], ..Default::default() };
        assert!(wide.failures("SALE 50% OFF").is_empty());
    }
}
