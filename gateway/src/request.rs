//! The normalised image request: parsed once from the client's JSON, checked field by field so
//! every mistake gets an error that names the field.

use serde_json::{Map, Value};

use crate::error::ApiError;

pub const MAX_N: u64 = 10;
pub const MIN_SIDE: u32 = 256;
pub const MAX_SIDE: u32 = 1792;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// One generation request, as the gateway understands it whatever the provider.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: String,
    /// The alias the client asked for (or the policy's default).
    pub model: Option<String>,
    pub n: u32,
    pub size: Size,
    /// Whether the client sent `size` at all (an upstream then gets it as sent).
    pub size_given: bool,
    pub response_format: ResponseFormat,
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    /// The client's body, kept so fields the gateway does not model pass through to
    /// OpenAI-compatible upstreams unchanged.
    pub raw: Map<String, Value>,
}

impl GenerationRequest {
    /// Parses a JSON body.
    pub fn from_json(body: &[u8]) -> Result<GenerationRequest, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!("request body is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(raw) = value else {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                "request body must be a JSON object",
            ));
        };
        Self::from_map(raw)
    }

    pub fn from_map(raw: Map<String, Value>) -> Result<GenerationRequest, ApiError> {
        let prompt = match raw.get("prompt") {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid("prompt", "missing_required_parameter", "prompt is required"))
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(ApiError::invalid("prompt", "invalid_value", "prompt must not be empty"))
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type("prompt", "a string", other)),
        };
        let model = opt_string(&raw, "model")?;
        let n = match raw.get("n") {
            None | Some(Value::Null) => 1,
            Some(Value::Number(num)) => match num.as_u64() {
                Some(v) if (1..=MAX_N).contains(&v) => v as u32,
                _ => {
                    return Err(ApiError::invalid(
                        "n",
                        "invalid_value",
                        format!("n must be an integer between 1 and {MAX_N}, got {num}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("n", "an integer", other)),
        };
        let (size, size_given) = match opt_string(&raw, "size")? {
            None => (Size { width: 1024, height: 1024 }, false),
            Some(s) => (parse_size(&s)?, true),
        };
        let response_format = match opt_string(&raw, "response_format")?.as_deref() {
            None | Some("url") => ResponseFormat::Url,
            Some("b64_json") => ResponseFormat::B64Json,
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format",
                    "invalid_value",
                    format!("response_format must be \"url\" or \"b64_json\", got \"{other}\""),
                ))
            }
        };
        let seed = match raw.get("seed") {
            None | Some(Value::Null) => None,
            Some(Value::Number(num)) => match num.as_u64() {
                Some(v) => Some(v),
                None => {
                    return Err(ApiError::invalid("seed", "invalid_value", "seed must be a non-negative integer"))
                }
            },
            Some(other) => return Err(wrong_type("seed", "an integer", other)),
        };
        let negative_prompt = opt_string(&raw, "negative_prompt")?;
        for field in ["quality", "style", "user", "background", "output_format", "moderation"] {
            opt_string(&raw, field)?;
        }
        Ok(GenerationRequest {
            prompt,
            model,
            n,
            size,
            size_given,
            response_format,
            seed,
            negative_prompt,
            raw,
        })
    }
}

/// `WxH` with both sides in `[MIN_SIDE, MAX_SIDE]`, or `auto` (1024x1024).
pub fn parse_size(s: &str) -> Result<Size, ApiError> {
    if s == "auto" {
        return Ok(Size { width: 1024, height: 1024 });
    }
    let bad = || {
        ApiError::invalid(
            "size",
            "invalid_value",
            format!("size must be \"WIDTHxHEIGHT\" with each side between {MIN_SIDE} and {MAX_SIDE} (e.g. \"1024x1024\"), or \"auto\"; got \"{s}\""),
        )
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let width: u32 = w.parse().map_err(|_| bad())?;
    let height: u32 = h.parse().map_err(|_| bad())?;
    if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
        return Err(bad());
    }
    Ok(Size { width, height })
}

fn opt_string(raw: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ApiError> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(field, "invalid_type", format!("{field} must be {expected}, got {got}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        GenerationRequest::from_json(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn defaults_follow_openai() {
        let r = GenerationRequest::from_json(br#"{"prompt":"a fox"}"#).unwrap();
        assert_eq!((r.n, r.size, r.response_format), (1, Size { width: 1024, height: 1024 }, ResponseFormat::Url));
    }

    #[test]
    fn each_mistake_names_its_field() {
        let cases = [
            ("{", None, "invalid_json"),
            ("[1]", None, "invalid_json"),
            (r#"{"n":1}"#, Some("prompt"), "missing_required_parameter"),
            (r#"{"prompt":5}"#, Some("prompt"), "invalid_type"),
            (r#"{"prompt":"x","n":"two"}"#, Some("n"), "invalid_type"),
            (r#"{"prompt":"x","n":0}"#, Some("n"), "invalid_value"),
            (r#"{"prompt":"x","n":11}"#, Some("n"), "invalid_value"),
            (r#"{"prompt":"x","n":1.5}"#, Some("n"), "invalid_value"),
            (r#"{"prompt":"x","size":"10x10"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"banana"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"2048x1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":1024}"#, Some("size"), "invalid_type"),
            (r#"{"prompt":"x","response_format":"gif"}"#, Some("response_format"), "invalid_value"),
            (r#"{"prompt":"x","seed":-1}"#, Some("seed"), "invalid_value"),
            (r#"{"prompt":"x","model":["a"]}"#, Some("model"), "invalid_type"),
        ];
        for (body, param, code) in cases {
            let e = err(body);
            assert_eq!((e.param, e.code), (param, Some(code)), "{body}: {}", e.message);
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn sizes_in_range_parse() {
        assert_eq!(parse_size("1792x1024").unwrap(), Size { width: 1792, height: 1024 });
        assert_eq!(parse_size("256x256").unwrap(), Size { width: 256, height: 256 });
        assert_eq!(parse_size("auto").unwrap(), Size { width: 1024, height: 1024 });
        assert!(parse_size("255x256").is_err());
    }
}
