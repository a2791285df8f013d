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
        match &self.forbid_text {
            None | Some(serde_json::Value::Bool(_)) => {}
            Some(serde_json::Value::Array(a)) if a.iter().all(|v| v.is_string()) => {}
            Some(_) => {
                return Err("invalid prompt contract: forbid_text must be true/false or a list of strings".into())
            }
        }
        Ok(())
    }
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
