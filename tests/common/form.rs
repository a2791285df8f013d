//! `multipart/form-data`: forms a test sends, and parsing what a mock received.

use bytes::Bytes;

use super::{send, Resp};

/// One part of a multipart form (sent by a test or parsed from what the mock received).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormPart {
    pub name: String,
    /// `Some` for file parts.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// A `multipart/form-data` body under construction, parts in order.
#[derive(Clone, Debug, Default)]
pub struct Form {
    pub parts: Vec<FormPart>,
    /// The boundary to start from (a fixed one when `None`), as each SDK draws its own.
    pub boundary: Option<String>,
}

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn text(mut self, name: &str, value: &str) -> Form {
        self.parts.push(FormPart {
            name: name.to_string(),
            filename: None,
            content_type: None,
            data: Bytes::copy_from_slice(value.as_bytes()),
        });
        self
    }

    pub fn file(mut self, name: &str, filename: &str, content_type: &str, data: impl Into<Bytes>) -> Form {
        self.parts.push(FormPart {
            name: name.to_string(),
            filename: Some(filename.to_string()),
            content_type: Some(content_type.to_string()),
            data: data.into(),
        });
        self
    }

    /// The same form under another boundary.
    pub fn with_boundary(mut self, boundary: &str) -> Form {
        self.boundary = Some(boundary.to_string());
        self
    }

    /// `(content-type header, body)`; the boundary never occurs in the parts.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let mut boundary = self.boundary.clone().unwrap_or_else(|| String::from("acc-test-boundary-7f3a9c"));
        while self.parts.iter().any(|p| contains(&p.data, boundary.as_bytes())) {
            boundary.push('x');
        }
        let mut body = Vec::with_capacity(self.parts.iter().map(|p| p.data.len() + 200).sum::<usize>() + 64);
        for p in &self.parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match &p.filename {
                Some(f) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{}\"; filename=\"{f}\"\r\n", p.name).as_bytes(),
                ),
                None => body
                    .extend_from_slice(format!("Content-Disposition: form-data; name=\"{}\"\r\n", p.name).as_bytes()),
            }
            if let Some(ct) = &p.content_type {
                body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(&p.data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// POST a multipart form (its content type first, then `headers`).
pub async fn post_form(url: &str, form: &Form, headers: &[(&str, &str)]) -> Resp {
    let (ct, body) = form.encode();
    let mut hs: Vec<(&str, &str)> = vec![("content-type", &ct)];
    hs.extend_from_slice(headers);
    send("POST", url, &hs, body).await
}

/// Parses a `multipart/form-data` body (with the `content-type` header it came with).
pub async fn parse_form(content_type: &str, body: Bytes) -> Result<Vec<FormPart>, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| format!("content-type {content_type:?}: {e}"))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = mp.next_field().await.map_err(|e| format!("malformed multipart: {e}"))? {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.to_string());
        let data = field.bytes().await.map_err(|e| format!("malformed multipart part {name}: {e}"))?;
        parts.push(FormPart { name, filename, content_type, data });
    }
    Ok(parts)
}

/// The text of the only part called `name` (`None` if absent; panics if repeated or a file).
pub fn form_text(parts: &[FormPart], name: &str) -> Option<String> {
    let found: Vec<&FormPart> = parts.iter().filter(|p| p.name == name).collect();
    assert!(found.len() <= 1, "form field {name} occurs {} times", found.len());
    found.first().map(|p| {
        assert!(p.filename.is_none(), "form field {name} is a file ({:?}), not text", p.filename);
        String::from_utf8(p.data.to_vec()).unwrap_or_else(|_| panic!("form field {name} is not UTF-8"))
    })
}
