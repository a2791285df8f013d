//! The prompt contract: a small JSON object a client sends with its request (the
//! `x-acc-contract` header or the body field `acc`) that states what the image must satisfy, e.g.
//! `{"background": "white", "max_faces": 0, "aspect": "1:1"}`. Parsed and checked here, with the
//! request; the `adherence` evaluator checks images against it.

use serde::Deserialize;

/// The prompt contract, from the `x-acc-contract` header or the body field `acc`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Colour of the image's border region: a name (white, black, grey, red, green, blue,
    /// yellow) or `#rrggbb`.
    #[serde(default)]
    pub background: Option<String>,
    /// At most this many faces (NudeNet's FACE_FEMALE / FACE_MALE).
    #[serde(default)]
    pub max_faces: Option<u32>,
    /// Exactly this many faces.
    #[serde(default)]
    pub faces: Option<u32>,
    /// Exact pixel size, `WxH`.
    #[serde(default)]
    pub size: Option<String>,
    /// Aspect ratio `W:H`, within 1%.
    #[serde(default)]
    pub aspect: Option<String>,
    /// Strings that must appear in the image (read by OCR).
    #[serde(default)]
    pub require_text: Vec<String>,
    /// `true`: no text at all; a list: none of these strings (read by OCR).
    #[serde(default)]
    pub forbid_text: Option<serde_json::Value>,
}

impl Contract {
    /// Parses and checks a contract; the error says which clause is wrong.
    pub fn parse(json: &[u8]) -> Result<Contract, String> {
        let c: Contract = serde_json::from_slice(json).map_err(|e| format!("invalid prompt contract: {e}"))?;
        c.check()?;
        Ok(c)
    }

    /// A contract given as a JSON value (the body field `acc`); the error says which clause is
    /// wrong.
    pub fn from_value(v: serde_json::Value) -> Result<Contract, String> {
        let c: Contract = serde_json::from_value(v).map_err(|e| format!("invalid prompt contract: {e}"))?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(b) = &self.background {
            parse_colour(b).ok_or_else(|| {
                format!("invalid prompt contract: background \"{b}\" is not a known colour or #rrggbb")
            })?;
        }
        if let Some(s) = &self.size {
            parse_wxh(s, 'x').ok_or_else(|| format!("invalid prompt contract: size \"{s}\" is not WxH"))?;
        }
        if let Some(a) = &self.aspect {
            parse_wxh(a, ':').ok_or_else(|| format!("invalid prompt contract: aspect \"{a}\" is not W:H"))?;
        }
        let (forbid, forbid_any): (Vec<String>, bool) = match &self.forbid_text {
            None => (Vec::new(), false),
            Some(serde_json::Value::Bool(b)) => (Vec::new(), *b),
            Some(serde_json::Value::Array(a)) if a.iter().all(|v| v.is_string()) => {
                (a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(), false)
            }
            Some(_) => {
                return Err("invalid prompt contract: forbid_text must be true/false or a list of strings".into())
            }
        };
        let problems = text_rule_problems(&self.require_text, &forbid, forbid_any, ("require_text", "forbid_text"));
        match problems.into_iter().next() {
            Some(p) => Err(format!("invalid prompt contract: {p}")),
            None => Ok(()),
        }
    }
}

/// Most characters of one required or forbidden text (a contract's or a route's). OCR reads a
/// picture's text, not pages of it.
pub const MAX_TEXT_RULE_CHARS: usize = 200;

/// What makes text rules unmeetable or meaningless, one message per problem, each naming the
/// field (`names`: the required and forbidden lists' field names) and, for a string, its index:
/// a string with nothing to look for once spaces are left out (a forbidden one would match every
/// image, a required one none fail), a control or bidirectional formatting character (OCR never
/// reads one), one longer than [`MAX_TEXT_RULE_CHARS`], a string both required and forbidden
/// (matching ignores case and spaces and compares [`plain_text`] forms), and required text where
/// no text at all is allowed.
pub fn text_rule_problems(require: &[String], forbid: &[String], forbid_any: bool, names: (&str, &str)) -> Vec<String> {
    let compact = |s: &str| rule_text(s).to_lowercase();
    let mut problems = Vec::new();
    for (list, name) in [(require, names.0), (forbid, names.1)] {
        for (i, s) in list.iter().enumerate() {
            if compact(s).is_empty() {
                problems.push(format!("{name}[{i}]: {s:?} has nothing to look for (empty or only spaces)"));
            } else if let Some(c) = s.chars().find(|c| c.is_control() || is_format_char(*c)) {
                problems
                    .push(format!("{name}[{i}]: {s:?} holds the character U+{:04X}, which OCR never reads", c as u32));
            } else if s.chars().count() > MAX_TEXT_RULE_CHARS {
                problems.push(format!(
                    "{name}[{i}]: {} characters, more than the {MAX_TEXT_RULE_CHARS} allowed",
                    s.chars().count()
                ));
            }
        }
    }
    for (i, r) in require.iter().enumerate() {
        let c = compact(r);
        if !c.is_empty() {
            if let Some(j) = forbid.iter().position(|f| compact(f) == c) {
                problems.push(format!(
                    "{}[{i}] and {}[{j}]: {r:?} is both required and forbidden (case and spaces are ignored)",
                    names.0, names.1
                ));
            }
        }
    }
    if forbid_any && !require.is_empty() {
        problems.push(format!("{}: text is required where no text at all is allowed", names.0));
    }
    problems
}

/// Unicode's invisible formatting characters that OCR cannot read: bidirectional controls,
/// zero-width characters and the byte order mark.
fn is_format_char(c: char) -> bool {
    crate::is_bidi_control(c) || matches!(c, '\u{200b}'..='\u{200d}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

/// Text in the one form OCR's lines are read in and text rules are compared in: Unicode's NFKC
/// (the recogniser's charset is Chinese and English, and it reads some ASCII in its full-width
/// form: `５０％`, `＃`, `：` are `50%`, `#`, `:`), whitespace runs as one space, none at the ends.
pub fn plain_text(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let mut out = String::with_capacity(text.len());
    for word in text.nfkc().collect::<String>().split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// A text rule as it is looked for: [`plain_text`] without spaces.
pub fn rule_text(rule: &str) -> String {
    plain_text(rule).chars().filter(|c| !c.is_whitespace()).collect()
}

/// `W<sep>H` with both sides positive, e.g. `1024x768` or `16:9`.
pub fn parse_wxh(s: &str, sep: char) -> Option<(u32, u32)> {
    let (w, h) = s.split_once(sep)?;
    let (w, h) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// A colour name (white, black, grey/gray, red, green, blue, yellow) or `#rrggbb`, as RGB.
pub fn parse_colour(s: &str) -> Option<[u8; 3]> {
    let named = match s.to_ascii_lowercase().as_str() {
        "white" => Some([255, 255, 255]),
        "black" => Some([0, 0, 0]),
        "grey" | "gray" => Some([128, 128, 128]),
        "red" => Some([220, 30, 30]),
        "green" => Some([30, 160, 60]),
        "blue" => Some([30, 60, 200]),
        "yellow" => Some([240, 220, 40]),
        _ => None,
    };
    named.or_else(|| {
        let h = s.strip_prefix('#')?;
        if h.len() != 6 {
            return None;
        }
        let v = u32::from_str_radix(h, 16).ok()?;
        Some([(v >> 16) as u8, (v >> 8) as u8, v as u8])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_compared_in_its_plain_form() {
        assert_eq!(plain_text(" OPEN BAKERY  24/7 "), "OPEN BAKERY 24/7");
        assert_eq!(plain_text("SALE ５０％ ＯＦＦ：＃１"), "SALE 50% OFF:#1");
        assert_eq!(plain_text("\u{3000}營業中\t"), "營業中");
        assert_eq!(rule_text("５０％ ＯＦＦ"), "50%OFF");
        // Full-width and plain forms of one string are the same rule.
        let p = text_rule_problems(&["５０％".into()], &["50 %".into()], false, ("require_text", "forbid_text"));
        assert_eq!(p.len(), 1, "{p:?}");
    }
}
