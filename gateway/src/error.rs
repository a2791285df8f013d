//! Errors that reach a client, always in the OpenAI error shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};

/// An error answered to the client. Every failure on the proxy path ends up as one of these, so
/// the outermost service never fails and clients always get a body their SDK can parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `api_error`, ...
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// A body to send verbatim instead of one built from the fields above: an upstream's own
    /// 4xx error, already rebuilt in OpenAI's shape (`providers::errors::passed_on`, `to_error`).
    pub raw_body: Option<Bytes>,
    /// Seconds for a `Retry-After` header, where the client may retry after waiting; `None`
    /// sends `x-should-retry: false` instead, so that the official SDKs do not retry an answer
    /// that would fail the same way.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            raw_body: None,
            retry_after: None,
        }
    }

    /// A 400 about one request field.
    pub fn invalid(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "internal_error", message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", "overloaded", message);
        e.retry_after = Some(1);
        e
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Bytes {
        if let Some(raw) = &self.raw_body {
            return raw.clone();
        }
        let v = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self.retry_after {
            Some(secs) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            // The official OpenAI SDKs retry 408, 409, 429 and 5xx answers unless told not to
            // (openai-python `_should_retry`, openai-node `shouldRetry`: the `x-should-retry`
            // header decides first). An error without a Retry-After would fail the same way
            // again: an Idempotency-Key conflict (409), a bad request, a failure no provider
            // can fix soon.
            None => {
                h.insert(HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"));
            }
        }
        resp
    }
}

/// serde_json's message for a body that is not JSON, with the one cryptic case explained: a
/// `\uD800`-`\uDFFF` escape is half of a UTF-16 surrogate pair (RFC 8259 section 7), and serde_json
/// reports a lone one as "unexpected end of hex escape" or "lone leading surrogate in hex
/// escape". Python's `json.dumps` writes such escapes for a `str` holding a lone surrogate.
pub fn json_error_text(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("unexpected end of hex escape") || msg.starts_with("lone leading surrogate") {
        format!(
            "{msg}: a \\u escape from \\uD800 to \\uDFFF is half of a UTF-16 surrogate pair and must be \
             followed by its other half (\\uD83D\\uDE00 is one character); a lone half is not a character"
        )
    } else {
        msg
    }
}

#[cfg(test)]
mod json_tests {
    use super::json_error_text;

    #[test]
    fn a_lone_surrogate_escape_is_explained() {
        for body in [r#"{"prompt": "\ud800 a cat"}"#, r#"{"prompt": "\udfff"}"#, r#"{"prompt": "\ud800\u0041"}"#] {
            let e = serde_json::from_str::<serde_json::Value>(body).unwrap_err();
            let text = json_error_text(&e);
            assert!(text.contains("half of a UTF-16 surrogate pair"), "{body}: {text}");
            assert!(text.contains("at line 1 column"), "{body}: {text}");
        }
        let e = serde_json::from_str::<serde_json::Value>(r#"{"prompt": "a cat""#).unwrap_err();
        assert_eq!(json_error_text(&e), "EOF while parsing an object at line 1 column 18");
        assert!(serde_json::from_str::<serde_json::Value>(r#"{"prompt": "\ud83d\ude00"}"#).is_ok());
    }
}
