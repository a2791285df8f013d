//! The normalised image request: parsed once from the client's JSON, checked field by field so
//! every mistake gets an error that names the field.

use serde_json::{Map, Value};

use crate::error::ApiError;

pub mod contract;

pub const MAX_N: u64 = 10;
pub const MIN_SIDE: u32 = 256;
pub const MAX_SIDE: u32 = 1792;
/// Most input images one edit takes: OpenAI's GPT image models accept up to 16 (`image[]`).
pub const MAX_EDIT_IMAGES: usize = 16;
/// `quality` values: the GPT image models' (`low`, `medium`, `high`, `auto`) and DALL·E's
/// (`standard`, `hd`).
pub const QUALITIES: [&str; 6] = ["low", "medium", "high", "auto", "standard", "hd"];
/// `background` values (GPT image models).
pub const BACKGROUNDS: [&str; 3] = ["transparent", "opaque", "auto"];
/// `moderation` values (GPT image models).
pub const MODERATIONS: [&str; 2] = ["low", "auto"];
/// `input_fidelity` values (edits on GPT image models).
pub const INPUT_FIDELITIES: [&str; 2] = ["high", "low"];

/// The image format a client asks the provider for (`output_format`; OpenAI's default is PNG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    /// The value of `output_format`: `png`, `jpeg` or `webp`.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The media type: `image/png`, `image/jpeg` or `image/webp`.
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "png" => Some(OutputFormat::Png),
            "jpeg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }
}

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

/// Which Images API operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Generate = 0,
    Edit = 1,
    Variation = 2,
}

impl Operation {
    /// The path segment under `/v1/images/`.
    pub fn path(self) -> &'static str {
        match self {
            Operation::Generate => "generations",
            Operation::Edit => "edits",
            Operation::Variation => "variations",
        }
    }
}

/// An uploaded file of an edit or variation request; the bytes are a slice of the body.
#[derive(Debug, Clone)]
pub struct FilePart {
    /// The form field it came in (`image`, `image[]`, `mask`, or another file parameter).
    pub field: String,
    pub filename: String,
    pub content_type: String,
    pub bytes: bytes::Bytes,
}

/// One image request, as the gateway understands it whatever the provider.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub op: Operation,
    /// Empty for variations, which take no prompt.
    pub prompt: String,
    /// The alias the client asked for (or the policy's default).
    pub model: Option<String>,
    pub n: u32,
    pub size: Size,
    /// Whether the client asked for this exact size (not "auto", not left to the default): the
    /// sanity evaluator then checks the artifact's dimensions against it.
    pub size_given: bool,
    /// Whether the client sent `response_format` (else the route's or the model's default
    /// applies once routed).
    pub response_format_given: bool,
    pub response_format: ResponseFormat,
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    /// `quality` as OpenAI defines it, one of [`QUALITIES`] (passed on where the provider has
    /// it), and `style`.
    pub quality: Option<String>,
    pub style: Option<String>,
    /// Diffusion settings (extensions): sampling steps, guidance (CFG) scale, sampler name.
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub sampler: Option<String>,
    /// The GPT image models' parameters, checked against OpenAI's allowed values: `background`
    /// (one of [`BACKGROUNDS`]), `output_format`, `output_compression` (0-100, JPEG and WebP
    /// only), `moderation` (one of [`MODERATIONS`]) and, on edits, `input_fidelity` (one of
    /// [`INPUT_FIDELITIES`]). Passed as they are to OpenAI-compatible targets, mapped or dropped
    /// elsewhere (see [`Param`]).
    pub background: Option<&'static str>,
    /// The image format asked for (OpenAI draws PNG without it).
    pub output_format: Option<OutputFormat>,
    /// JPEG or WebP compression, 0-100 (only with one of those formats).
    pub output_compression: Option<u8>,
    /// How strict the provider's moderation is: `low` or `auto`.
    pub moderation: Option<&'static str>,
    /// How closely an edit keeps its input images' features: `high` or `low` (edits only).
    pub input_fidelity: Option<&'static str>,
    /// The client's body (JSON, or the text fields of a form), kept so fields the gateway does
    /// not model pass through to OpenAI-compatible upstreams unchanged.
    pub raw: Map<String, Value>,
    /// Input images of an edit or variation.
    pub images: Vec<FilePart>,
    pub mask: Option<FilePart>,
    /// Other file parts of the form (parts with a filename in fields the gateway does not
    /// model), forwarded as files to OpenAI-compatible upstreams like the other fields in `raw`.
    pub files: Vec<FilePart>,
    /// The prompt contract (header `x-acc-contract` or body field `acc`).
    pub contract: Option<std::sync::Arc<contract::Contract>>,
    /// The trace this request regenerates, as the body said (`acc.regenerate_of`: 32 hex
    /// digits, lowercased here); the header `x-acc-regenerate-of` is read by the proxy.
    pub regenerate_of: Option<String>,
    /// `stream: true`: the answer goes out as server-sent events in OpenAI's shapes, with this
    /// many partial images asked for (`partial_images`, 0 to 3; 0 when not sent). `None`: a
    /// plain JSON answer.
    pub stream: Option<u32>,
}

impl GenerationRequest {
    /// How many partial images a stream may send the client: `partial_images` for each of the
    /// `n` images (0 when the request does not stream or asks for none).
    pub fn partials_allowed(&self) -> usize {
        self.stream.unwrap_or(0) as usize * self.n as usize
    }

    /// Parses a JSON body.
    pub fn from_json(body: &[u8]) -> Result<GenerationRequest, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!("request body is not valid JSON: {}", crate::error::json_error_text(&e)),
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
        Self::from_map(Operation::Generate, raw)
    }

    /// Parses a `multipart/form-data` body of an edit or variation. File payloads stay slices
    /// of `body`.
    pub async fn from_multipart(
        op: Operation,
        body: bytes::Bytes,
        boundary: &str,
    ) -> Result<GenerationRequest, ApiError> {
        let bad =
            |e: multer::Error| ApiError::invalid("body", "invalid_multipart", format!("malformed multipart body: {e}"));
        let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
        let mut form = multer::Multipart::new(stream, boundary);
        let mut raw = Map::new();
        let mut images = Vec::new();
        let mut mask = None;
        let mut files = Vec::new();
        let mut parts = 0usize;
        while let Some(field) = form.next_field().await.map_err(bad)? {
            check_part(field.headers(), field.name())?;
            parts += 1;
            if parts > MAX_FORM_PARTS {
                return Err(ApiError::invalid(
                    "body",
                    "invalid_multipart",
                    format!("a form has at most {MAX_FORM_PARTS} parts"),
                ));
            }
            let name = field.name().unwrap_or_default().to_string();
            let filename = field.file_name().map(str::to_owned);
            let content_type = field.content_type().map(|m| m.to_string());
            let data = field.bytes().await.map_err(bad)?;
            match name.as_str() {
                "image" | "image[]" | "mask" if filename.is_none() => {
                    // A file part names its file (RFC 7578 section 4.2; every SDK and curl's
                    // `-F name=@file` send one); a text field is no image, whatever it holds.
                    return Err(ApiError::invalid(
                        if name == "mask" { "mask" } else { "image" },
                        "invalid_value",
                        format!("{name} must be a file (a form part with a filename), not a text field"),
                    ));
                }
                "image" | "image[]" | "mask" => {
                    if data.is_empty() {
                        return Err(ApiError::invalid(
                            if name == "mask" { "mask" } else { "image" },
                            "invalid_value",
                            format!("{name} is an empty file"),
                        ));
                    }
                    let part = FilePart {
                        field: name.clone(),
                        filename: filename.unwrap_or_else(|| format!("{}.png", name.trim_end_matches("[]"))),
                        content_type: content_type.unwrap_or_else(|| "application/octet-stream".into()),
                        bytes: data,
                    };
                    if name == "mask" {
                        if mask.is_some() {
                            return Err(ApiError::invalid("mask", "invalid_value", "an edit takes one mask"));
                        }
                        if !part.bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                            return Err(ApiError::invalid(
                                "mask",
                                "invalid_image_format",
                                "mask must be a PNG file (its fully transparent areas mark where to edit)",
                            ));
                        }
                        mask = Some(part);
                    } else {
                        images.push(part);
                    }
                }
                n if filename.is_some() && TEXT_FIELDS.contains(&n) => {
                    // A parameter sent as a file would reach no check of the gateway's, and go
                    // upstream beside (or instead of) the value the gateway read.
                    let known = TEXT_FIELDS.iter().find(|&&k| k == n).copied().unwrap_or("body");
                    return Err(ApiError::invalid(
                        known,
                        "invalid_value",
                        format!("{known} must be a text field, not a file (a form part with a filename)"),
                    ));
                }
                _ if filename.is_some() => {
                    // Another file parameter (e.g. the SDK's `markup`): kept as a file, for the
                    // adapters that speak OpenAI's form to forward as it came.
                    files.push(FilePart {
                        field: name,
                        filename: filename.unwrap_or_default(),
                        content_type: content_type.unwrap_or_else(|| "application/octet-stream".into()),
                        bytes: data,
                    });
                }
                _ => {
                    let text = String::from_utf8(data.to_vec()).map_err(|_| {
                        ApiError::invalid("body", "invalid_multipart", format!("form field {name} is not UTF-8 text"))
                    })?;
                    // Form fields are text; numbers are numbers when they parse as such.
                    let value = match name.as_str() {
                        "n" | "seed" | "output_compression" | "partial_images" | "steps" | "guidance_scale" => {
                            text.trim().parse::<serde_json::Number>().map(Value::Number).unwrap_or(Value::String(text))
                        }
                        // Booleans are `true` / `false`, as the SDKs write them into a form.
                        "stream" => match text.trim() {
                            "true" => Value::Bool(true),
                            "false" => Value::Bool(false),
                            _ => Value::String(text),
                        },
                        _ => Value::String(text),
                    };
                    raw.insert(name, value);
                }
            }
        }
        if images.is_empty() {
            return Err(ApiError::invalid(
                "image",
                "missing_required_parameter",
                "image is required (a file in the form field \"image\")",
            ));
        }
        if op == Operation::Variation && images.len() > 1 {
            return Err(ApiError::invalid("image", "invalid_value", "a variation takes exactly one image"));
        }
        if op == Operation::Variation && mask.is_some() {
            return Err(ApiError::invalid("mask", "invalid_value", "a variation takes no mask"));
        }
        if images.len() > MAX_EDIT_IMAGES {
            return Err(ApiError::invalid(
                "image",
                "invalid_value",
                format!("an edit takes at most {MAX_EDIT_IMAGES} images, got {}", images.len()),
            ));
        }
        let mut req = Self::from_map(op, raw)?;
        req.images = images;
        req.mask = mask;
        req.files = files;
        Ok(req)
    }

    pub fn from_map(op: Operation, raw: Map<String, Value>) -> Result<GenerationRequest, ApiError> {
        let f = Fields::of(&raw);
        let prompt = match f.prompt {
            None | Some(Value::Null) if op == Operation::Variation => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid("prompt", "missing_required_parameter", "prompt is required"))
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(ApiError::invalid("prompt", "invalid_value", "prompt must not be empty"))
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type("prompt", "a string", other)),
        };
        let model = opt_string(f.model, "model")?;
        let n = match f.n {
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
        let (size, size_given) = match opt_string(f.size, "size")? {
            None => (Size { width: 1024, height: 1024 }, false),
            Some(s) => (parse_size(&s)?, s != "auto"),
        };
        let response_format_given = f.response_format.is_some_and(|v| !v.is_null());
        let response_format = match opt_string(f.response_format, "response_format")?.as_deref() {
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
        let seed = match f.seed {
            None | Some(Value::Null) => None,
            Some(Value::Number(num)) => match num.as_u64() {
                Some(v) => Some(v),
                None => return Err(ApiError::invalid("seed", "invalid_value", "seed must be a non-negative integer")),
            },
            Some(other) => return Err(wrong_type("seed", "an integer", other)),
        };
        let negative_prompt = opt_string(f.negative_prompt, "negative_prompt")?;
        let quality = one_of(f.quality, "quality", &QUALITIES)?.map(str::to_owned);
        let style = opt_string(f.style, "style")?;
        let sampler = opt_string(f.sampler, "sampler")?;
        let steps = match f.steps {
            None | Some(Value::Null) => None,
            Some(Value::Number(num)) => match num.as_u64() {
                Some(v) if (1..=500).contains(&v) => Some(v as u32),
                _ => {
                    return Err(ApiError::invalid(
                        "steps",
                        "invalid_value",
                        format!("steps must be an integer between 1 and 500, got {num}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("steps", "an integer", other)),
        };
        let guidance_scale = match f.guidance_scale {
            None | Some(Value::Null) => None,
            Some(Value::Number(num)) => match num.as_f64() {
                Some(v) if (0.0..=50.0).contains(&v) => Some(v),
                _ => {
                    return Err(ApiError::invalid(
                        "guidance_scale",
                        "invalid_value",
                        format!("guidance_scale must be a number between 0 and 50, got {num}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("guidance_scale", "a number", other)),
        };
        let (contract, regenerate_of) = acc_field(f.acc)?;
        let stream = stream_field(&raw)?;
        if stream.is_some() && op == Operation::Variation {
            return Err(ApiError::invalid(
                "stream",
                "unsupported_parameter",
                "stream is available for /v1/images/generations and /v1/images/edits, not variations",
            ));
        }
        opt_string(f.user, "user")?;
        let gpt_image = GptImage::of(op, &f)?;
        Ok(GenerationRequest {
            op,
            prompt,
            model,
            n,
            size,
            size_given,
            response_format_given,
            response_format,
            seed,
            negative_prompt,
            quality,
            style,
            steps,
            guidance_scale,
            sampler,
            background: gpt_image.background,
            output_format: gpt_image.output_format,
            output_compression: gpt_image.output_compression,
            moderation: gpt_image.moderation,
            input_fidelity: gpt_image.input_fidelity,
            raw,
            images: Vec::new(),
            mask: None,
            files: Vec::new(),
            contract,
            regenerate_of,
            stream,
        })
    }
}

/// Request parameters that not every provider kind can honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    NegativePrompt,
    Seed,
    Steps,
    Guidance,
    Sampler,
    Quality,
    Style,
    /// `background` (transparent, opaque, auto).
    Background,
    /// `output_format` (png, jpeg, webp).
    OutputFormat,
    /// `output_compression` (0-100, with jpeg or webp).
    OutputCompression,
    /// `moderation` (low, auto).
    Moderation,
    /// `input_fidelity` (high, low; edits).
    InputFidelity,
}

impl Param {
    /// Every parameter, in the order `x-acc-dropped-params` lists them.
    pub const ALL: [Param; 12] = [
        Param::NegativePrompt,
        Param::Seed,
        Param::Steps,
        Param::Guidance,
        Param::Sampler,
        Param::Quality,
        Param::Style,
        Param::Background,
        Param::OutputFormat,
        Param::OutputCompression,
        Param::Moderation,
        Param::InputFidelity,
    ];

    /// The request field's name.
    pub fn name(self) -> &'static str {
        match self {
            Param::NegativePrompt => "negative_prompt",
            Param::Seed => "seed",
            Param::Steps => "steps",
            Param::Guidance => "guidance_scale",
            Param::Sampler => "sampler",
            Param::Quality => "quality",
            Param::Style => "style",
            Param::Background => "background",
            Param::OutputFormat => "output_format",
            Param::OutputCompression => "output_compression",
            Param::Moderation => "moderation",
            Param::InputFidelity => "input_fidelity",
        }
    }
}

impl GenerationRequest {
    /// Whether the request sets `p`.
    pub fn has(&self, p: Param) -> bool {
        match p {
            Param::NegativePrompt => self.negative_prompt.is_some(),
            Param::Seed => self.seed.is_some(),
            Param::Steps => self.steps.is_some(),
            Param::Guidance => self.guidance_scale.is_some(),
            Param::Sampler => self.sampler.is_some(),
            Param::Quality => self.quality.is_some(),
            Param::Style => self.style.is_some(),
            Param::Background => self.background.is_some(),
            Param::OutputFormat => self.output_format.is_some(),
            Param::OutputCompression => self.output_compression.is_some(),
            Param::Moderation => self.moderation.is_some(),
            Param::InputFidelity => self.input_fidelity.is_some(),
        }
    }

    /// `WxH`.
    pub fn size_text(&self) -> String {
        format!("{}x{}", self.size.width, self.size.height)
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
    // Plain decimal sides only (no sign, leading zero, space or exponent), so that the text
    // forwarded upstream is the one canonical spelling of the size.
    let side = |t: &str| {
        let plain = (1..=4).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()) && !t.starts_with('0');
        plain.then(|| t.parse::<u32>().ok()).flatten().ok_or_else(bad)
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (width, height) = (side(w)?, side(h)?);
    if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
        return Err(bad());
    }
    Ok(Size { width, height })
}

/// The fields `from_map` reads, found in one pass over the body's keys (a lookup per field in the
/// map cost more than the rest of the parsing, bench/callgrind.sh).
#[derive(Default)]
struct Fields<'a> {
    prompt: Option<&'a Value>,
    model: Option<&'a Value>,
    n: Option<&'a Value>,
    size: Option<&'a Value>,
    response_format: Option<&'a Value>,
    seed: Option<&'a Value>,
    negative_prompt: Option<&'a Value>,
    quality: Option<&'a Value>,
    style: Option<&'a Value>,
    sampler: Option<&'a Value>,
    steps: Option<&'a Value>,
    guidance_scale: Option<&'a Value>,
    acc: Option<&'a Value>,
    user: Option<&'a Value>,
    background: Option<&'a Value>,
    output_format: Option<&'a Value>,
    moderation: Option<&'a Value>,
    output_compression: Option<&'a Value>,
    input_fidelity: Option<&'a Value>,
}

/// The most parts a form may have: 16 images, a mask and every parameter leave room to spare.
const MAX_FORM_PARTS: usize = 100;
/// The longest name a form part may have, bytes.
const MAX_FIELD_NAME: usize = 128;

/// The parameters the gateway reads as text: a form part of one of these names must not be a
/// file.
const TEXT_FIELDS: [&str; 21] = [
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "seed",
    "negative_prompt",
    "quality",
    "style",
    "sampler",
    "steps",
    "guidance_scale",
    "acc",
    "user",
    "background",
    "output_format",
    "moderation",
    "output_compression",
    "input_fidelity",
    "stream",
    "partial_images",
];

/// A form part as RFC 7578 section 4.2 has it: a `Content-Disposition` of type `form-data`
/// with a name (of at most [`MAX_FIELD_NAME`] bytes), and no `Content-Transfer-Encoding` that
/// would change its bytes (section 4.7: senders must not use one). Errors: 400
/// `invalid_multipart` naming what is wrong; a part is never forwarded under a name it did not
/// have.
fn check_part(headers: &http::HeaderMap, name: Option<&str>) -> Result<(), ApiError> {
    let refuse = |why: String| ApiError::invalid("body", "invalid_multipart", why);
    let disposition = headers.get(http::header::CONTENT_DISPOSITION).map(|v| v.as_bytes());
    let kind = disposition.map(|d| d.split(|&b| b == b';').next().unwrap_or_default().trim_ascii());
    if !kind.is_some_and(|k| k.eq_ignore_ascii_case(b"form-data")) {
        return Err(refuse("every form part needs a Content-Disposition of type form-data (RFC 7578)".into()));
    }
    match name {
        None | Some("") => return Err(refuse("every form part needs a name (RFC 7578)".into())),
        Some(n) if n.len() > MAX_FIELD_NAME => {
            return Err(refuse(format!("a form part's name is longer than {MAX_FIELD_NAME} bytes")))
        }
        Some(_) => {}
    }
    if let Some(cte) = headers.get("content-transfer-encoding") {
        let identity = ["binary", "8bit", "7bit"];
        if !identity.iter().any(|i| cte.as_bytes().trim_ascii().eq_ignore_ascii_case(i.as_bytes())) {
            return Err(refuse(
                "a form part's Content-Transfer-Encoding is not supported: send its bytes as they are (RFC 7578 section 4.7)"
                    .into(),
            ));
        }
    }
    Ok(())
}

impl<'a> Fields<'a> {
    fn of(raw: &'a Map<String, Value>) -> Fields<'a> {
        let mut f = Fields::default();
        for (k, v) in raw {
            let slot = match k.as_str() {
                "prompt" => &mut f.prompt,
                "model" => &mut f.model,
                "n" => &mut f.n,
                "size" => &mut f.size,
                "response_format" => &mut f.response_format,
                "seed" => &mut f.seed,
                "negative_prompt" => &mut f.negative_prompt,
                "quality" => &mut f.quality,
                "style" => &mut f.style,
                "sampler" => &mut f.sampler,
                "steps" => &mut f.steps,
                "guidance_scale" => &mut f.guidance_scale,
                "acc" => &mut f.acc,
                "user" => &mut f.user,
                "background" => &mut f.background,
                "output_format" => &mut f.output_format,
                "moderation" => &mut f.moderation,
                "output_compression" => &mut f.output_compression,
                "input_fidelity" => &mut f.input_fidelity,
                _ => continue,
            };
            *slot = Some(v);
        }
        f
    }
}

/// The GPT image models' parameters of a request, each checked against OpenAI's documented
/// values and the combinations it refuses (Images API reference: `output_compression` only
/// for JPEG and WebP, a transparent `background` only in PNG or WebP, `input_fidelity` only
/// on edits).
struct GptImage {
    background: Option<&'static str>,
    output_format: Option<OutputFormat>,
    output_compression: Option<u8>,
    moderation: Option<&'static str>,
    input_fidelity: Option<&'static str>,
}

impl GptImage {
    fn of(op: Operation, f: &Fields<'_>) -> Result<GptImage, ApiError> {
        let background = one_of(f.background, "background", &BACKGROUNDS)?;
        let output_format = match opt_string(f.output_format, "output_format")? {
            None => None,
            Some(s) => Some(OutputFormat::parse(&s).ok_or_else(|| {
                ApiError::invalid(
                    "output_format",
                    "invalid_value",
                    format!("output_format must be one of \"png\", \"jpeg\", \"webp\"; got \"{s}\""),
                )
            })?),
        };
        let output_compression = match f.output_compression {
            None | Some(Value::Null) => None,
            Some(Value::Number(num)) => match num.as_u64() {
                Some(v) if v <= 100 => Some(v as u8),
                _ => {
                    return Err(ApiError::invalid(
                        "output_compression",
                        "invalid_value",
                        format!("output_compression must be an integer between 0 and 100, got {num}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("output_compression", "an integer", other)),
        };
        if output_compression.is_some() && !matches!(output_format, Some(OutputFormat::Jpeg | OutputFormat::Webp)) {
            return Err(ApiError::invalid(
                "output_compression",
                "invalid_value",
                "output_compression applies only to output_format \"jpeg\" or \"webp\"",
            ));
        }
        if background == Some("transparent") && output_format == Some(OutputFormat::Jpeg) {
            return Err(ApiError::invalid(
                "background",
                "invalid_value",
                "a transparent background needs output_format \"png\" or \"webp\" (JPEG has no transparency)",
            ));
        }
        let moderation = one_of(f.moderation, "moderation", &MODERATIONS)?;
        let input_fidelity = one_of(f.input_fidelity, "input_fidelity", &INPUT_FIDELITIES)?;
        if input_fidelity.is_some() && op != Operation::Edit {
            return Err(ApiError::invalid(
                "input_fidelity",
                "unknown_parameter",
                format!("input_fidelity applies to /v1/images/edits only, not /v1/images/{}", op.path()),
            ));
        }
        Ok(GptImage { background, output_format, output_compression, moderation, input_fidelity })
    }
}

/// A string field that must be one of `allowed`: the allowed value itself (static).
fn one_of(
    value: Option<&Value>,
    field: &'static str,
    allowed: &[&'static str],
) -> Result<Option<&'static str>, ApiError> {
    let Some(s) = opt_string(value, field)? else { return Ok(None) };
    match allowed.iter().find(|a| **a == s) {
        Some(a) => Ok(Some(a)),
        None => {
            let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
            Err(ApiError::invalid(
                field,
                "invalid_value",
                format!("{field} must be one of {}; got \"{s}\"", list.join(", ")),
            ))
        }
    }
}

/// The body field `acc`: the prompt contract (an object, or its JSON text) and the key
/// `regenerate_of` taken out of it before the contract is checked. An `acc` holding nothing but
/// `regenerate_of` is no contract.
type AccField = (Option<std::sync::Arc<contract::Contract>>, Option<String>);

fn acc_field(acc: Option<&Value>) -> Result<AccField, ApiError> {
    let invalid = |e: String| ApiError::invalid("acc", "invalid_contract", e);
    let mut value = match acc {
        None | Some(Value::Null) => return Ok((None, None)),
        Some(Value::String(text)) => {
            serde_json::from_str::<Value>(text).map_err(|e| invalid(format!("invalid prompt contract: {e}")))?
        }
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => return Err(wrong_type("acc", "an object (the prompt contract)", other)),
    };
    let given = value.as_object_mut().and_then(|m| m.remove("regenerate_of"));
    let had_link = given.is_some();
    let regenerate_of =
        match given {
            // null, as for the API's other fields, is the same as leaving it out.
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if is_trace_id(&id) => Some(id.to_ascii_lowercase()),
            Some(_) => return Err(ApiError::invalid(
                "acc.regenerate_of",
                "invalid_value",
                "acc.regenerate_of must be a trace id: 32 hex digits (the x-acc-trace-id of the request regenerated)",
            )),
        };
    if had_link && value.as_object().is_some_and(|m| m.is_empty()) {
        return Ok((None, regenerate_of));
    }
    let contract = contract::Contract::from_value(value).map_err(invalid)?;
    Ok((Some(std::sync::Arc::new(contract)), regenerate_of))
}

/// Longest OpenAI `user` (the end user's id) the gateway keeps, characters.
pub const MAX_USER_CHARS: usize = 256;

/// An OpenAI `user` value as the gateway keeps it, in a generation's record and a rating alike
/// (so the two name the same end user): control characters left out (PostgreSQL's text
/// refuses NUL, and a stored row must not fail on it), none when nothing but spaces is left,
/// else cut to [`MAX_USER_CHARS`] characters.
pub fn end_user(user: &str) -> Option<String> {
    let kept: std::borrow::Cow<'_, str> = if user.chars().any(char::is_control) {
        user.chars().filter(|c| !c.is_control()).collect::<String>().into()
    } else {
        user.into()
    };
    (!kept.trim().is_empty()).then(|| crate::cut(&kept, MAX_USER_CHARS))
}

/// Whether `s` is a trace id: 32 hex digits (either case).
pub fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Most partial images OpenAI streams before the final one (Images API reference,
/// `partial_images`: "Value must be between 0 and 3").
pub const MAX_PARTIAL_IMAGES: u64 = 3;

/// `stream` (a boolean) and `partial_images` (an integer, 0 to 3): `Some(partials)` when the
/// client asks for a stream. A form's text fields were made a boolean and a number when they
/// read as one ([`GenerationRequest::from_multipart`]); in JSON the types are OpenAI's, and a
/// string is refused (it would otherwise be forwarded as a string, which OpenAI refuses).
fn stream_field(raw: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    let stream = match raw.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v @ Value::String(s)) if matches!(s.trim(), "true" | "false") => {
            return Err(wrong_type("stream", "a boolean", v))
        }
        Some(Value::String(s)) => {
            return Err(ApiError::invalid(
                "stream",
                "invalid_value",
                format!("stream must be true or false, got \"{}\"", s.chars().take(40).collect::<String>()),
            ))
        }
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    };
    let partials = match raw.get("partial_images") {
        None | Some(Value::Null) => 0,
        Some(v @ Value::String(s)) if s.trim().parse::<u64>().is_ok() => {
            return Err(wrong_type("partial_images", "an integer", v))
        }
        Some(v @ (Value::Number(_) | Value::String(_))) => match v.as_u64() {
            Some(p) if p <= MAX_PARTIAL_IMAGES => p as u32,
            _ => {
                return Err(ApiError::invalid(
                    "partial_images",
                    "invalid_value",
                    format!("partial_images must be an integer between 0 and {MAX_PARTIAL_IMAGES}, got {v}"),
                ))
            }
        },
        Some(other) => return Err(wrong_type("partial_images", "an integer", other)),
    };
    Ok(stream.then_some(partials))
}

fn opt_string(value: Option<&Value>, field: &'static str) -> Result<Option<String>, ApiError> {
    match value {
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

    #[tokio::test]
    async fn multipart_stream_fields_are_a_boolean_and_a_number() {
        let png = b"PNGDATA";
        let body = form(&[
            ("image", Some("a.png"), png),
            ("prompt", None, b"x"),
            ("stream", None, b"true"),
            ("partial_images", None, b" 2"),
        ]);
        let r = GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap();
        assert_eq!(r.stream, Some(2));
        assert_eq!(
            (r.raw["stream"].clone(), r.raw["partial_images"].clone()),
            (serde_json::json!(true), serde_json::json!(2))
        );
        let body = form(&[("image", Some("a.png"), png), ("prompt", None, b"x"), ("stream", None, b"false")]);
        assert_eq!(GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap().stream, None);
        let body = form(&[("image", Some("a.png"), png), ("prompt", None, b"x"), ("stream", None, b"yes")]);
        let e = GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap_err();
        assert_eq!((e.param, e.code), (Some("stream"), Some("invalid_value")));
    }

    /// Parameters sent as files, parts without a form-data disposition or name, encoded parts
    /// and forms past their bounds are refused with a 400 that says which; numeric fields sent
    /// as text (every form field is) are numbers.
    #[tokio::test]
    async fn form_parts_are_what_rfc_7578_says_and_parameters_are_text() {
        let png: &[u8] = b"PNGDATA";
        let parse = |body: bytes::Bytes| GenerationRequest::from_multipart(Operation::Edit, body, "XyZ");
        for known in ["model", "n", "seed", "quality", "moderation", "response_format", "acc", "stream"] {
            let body = form(&[("image", Some("a.png"), png), ("prompt", None, b"x"), (known, Some("v.txt"), b"2")]);
            let e = parse(body).await.unwrap_err();
            assert_eq!((e.param, e.code), (Some(known), Some("invalid_value")), "{known}");
            assert!(e.message.contains("must be a text field, not a file"), "{}", e.message);
        }
        // Another file parameter (the SDK's `markup`) is still kept as a file.
        let body = form(&[("image", Some("a.png"), png), ("prompt", None, b"x"), ("markup", Some("m.png"), png)]);
        assert_eq!(parse(body).await.unwrap().files.len(), 1);

        let r = parse(form(&[
            ("image", Some("a.png"), png),
            ("prompt", None, b"x"),
            ("steps", None, b"20"),
            ("guidance_scale", None, b" 7.5"),
        ]))
        .await
        .unwrap();
        assert_eq!((r.steps, r.guidance_scale), (Some(20), Some(7.5)));

        let raw_part = |head: &str| {
            let mut b =
                b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nI\r\n".to_vec();
            b.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n");
            b.extend_from_slice(format!("--XyZ\r\n{head}\r\n\r\nvalue\r\n--XyZ--\r\n").as_bytes());
            bytes::Bytes::from(b)
        };
        for (head, why) in [
            ("Content-Type: text/plain", "Content-Disposition of type form-data"),
            ("Content-Disposition: attachment; name=\"style\"", "Content-Disposition of type form-data"),
            ("Content-Disposition: form-data", "needs a name"),
            ("Content-Disposition: form-data; name=\"\"", "needs a name"),
            (
                "Content-Disposition: form-data; name=\"style\"\r\nContent-Transfer-Encoding: base64",
                "Content-Transfer-Encoding",
            ),
        ] {
            let e = parse(raw_part(head)).await.unwrap_err();
            assert_eq!((e.param, e.code), (Some("body"), Some("invalid_multipart")), "{head}");
            assert!(e.message.contains(why), "{head}: {}", e.message);
        }
        let r =
            parse(raw_part("Content-Disposition: form-data; name=\"style\"\r\nContent-Transfer-Encoding: 8bit")).await;
        assert_eq!(r.unwrap().raw["style"], "value");
        let long = "f".repeat(MAX_FIELD_NAME + 1);
        let e = parse(form(&[("image", Some("a.png"), png), ("prompt", None, b"x"), (long.as_str(), None, b"1")]))
            .await
            .unwrap_err();
        assert!(e.message.contains("longer than 128 bytes"), "{}", e.message);
        let names: Vec<String> = (0..MAX_FORM_PARTS).map(|i| format!("extra_{i}")).collect();
        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![("image", Some("a.png"), png), ("prompt", None, b"x")];
        parts.extend(names.iter().map(|n| (n.as_str(), None, &b"1"[..])));
        let e = parse(form(&parts)).await.unwrap_err();
        assert!(e.message.contains("at most 100 parts"), "{}", e.message);
    }

    #[test]
    fn end_users_keep_no_control_characters_and_spaces_alone_are_none() {
        assert_eq!(end_user("user-7"), Some("user-7".to_string()));
        assert_eq!(end_user("u\u{0}7\n"), Some("u7".to_string()));
        assert_eq!(end_user("  "), None);
        assert_eq!(end_user("\u{0}"), None);
        assert_eq!(end_user(""), None);
        assert_eq!(end_user(&"é".repeat(300)).map(|u| u.chars().count()), Some(MAX_USER_CHARS));
    }

    #[test]
    fn stream_and_partial_images_are_checked() {
        let parse = |body: &str| GenerationRequest::from_json(body.as_bytes()).map(|r| r.stream);
        assert_eq!(parse(r#"{"prompt":"x"}"#).unwrap(), None);
        assert_eq!(parse(r#"{"prompt":"x","stream":false,"partial_images":2}"#).unwrap(), None);
        assert_eq!(parse(r#"{"prompt":"x","stream":true}"#).unwrap(), Some(0));
        assert_eq!(parse(r#"{"prompt":"x","stream":true,"partial_images":3}"#).unwrap(), Some(3));
        // In JSON the types are OpenAI's: strings are refused, not forwarded as strings (forms,
        // whose fields are text, are read in `multipart_stream_fields_are_a_boolean_and_a_number`).
        for (body, param) in [
            (r#"{"prompt":"x","stream":"true"}"#, "stream"),
            (r#"{"prompt":"x","stream":"false"}"#, "stream"),
            (r#"{"prompt":"x","stream":true,"partial_images":"1"}"#, "partial_images"),
        ] {
            let e = err(body);
            assert_eq!((e.param, e.code), (Some(param), Some("invalid_type")), "{body}");
        }
        let e = err(r#"{"prompt":"x","stream":true,"partial_images":4}"#);
        assert_eq!((e.param, e.code), (Some("partial_images"), Some("invalid_value")));
        assert_eq!(e.message, "partial_images must be an integer between 0 and 3, got 4");
        for bad in ["-1", "1.5", r#""two""#] {
            let e = err(&format!(r#"{{"prompt":"x","stream":true,"partial_images":{bad}}}"#));
            assert_eq!((e.param, e.code), (Some("partial_images"), Some("invalid_value")), "{bad}");
        }
        let e = err(r#"{"prompt":"x","stream":"yes"}"#);
        assert_eq!((e.param, e.code), (Some("stream"), Some("invalid_value")));
        let e = err(r#"{"prompt":"x","stream":1}"#);
        assert_eq!((e.param, e.code), (Some("stream"), Some("invalid_type")));
    }

    #[test]
    fn acc_takes_regenerate_of_beside_the_contract() {
        let id = "4BF92F3577B34DA6A3CE929D0E0E4736";
        let r =
            GenerationRequest::from_json(format!(r#"{{"prompt":"x","acc":{{"regenerate_of":"{id}"}}}}"#).as_bytes())
                .unwrap();
        assert_eq!((r.regenerate_of.as_deref(), r.contract.is_none()), (Some(id.to_ascii_lowercase().as_str()), true));
        let body = format!(r#"{{"prompt":"x","acc":{{"aspect":"1:1","regenerate_of":"{id}"}}}}"#);
        let r = GenerationRequest::from_json(body.as_bytes()).unwrap();
        assert_eq!(r.contract.as_ref().and_then(|c| c.aspect.as_deref()), Some("1:1"));
        assert_eq!(r.regenerate_of.as_deref(), Some(id.to_ascii_lowercase().as_str()));
        // As JSON text, too.
        let text = serde_json::json!({"prompt": "x", "acc": format!(r#"{{"max_faces":0,"regenerate_of":"{id}"}}"#)});
        let r = GenerationRequest::from_json(text.to_string().as_bytes()).unwrap();
        assert_eq!((r.contract.as_ref().and_then(|c| c.max_faces), r.regenerate_of.is_some()), (Some(0), true));
        // A contract alone is unchanged; an empty one is still a contract.
        let r = GenerationRequest::from_json(br#"{"prompt":"x","acc":{}}"#).unwrap();
        assert_eq!((r.contract.is_some(), r.regenerate_of), (true, None));
        // null is no link (as for the API's other fields), and alone no contract either.
        let r = GenerationRequest::from_json(br#"{"prompt":"x","acc":{"regenerate_of":null}}"#).unwrap();
        assert_eq!((r.contract.is_some(), r.regenerate_of), (false, None));
        let r = GenerationRequest::from_json(br#"{"prompt":"x","acc":{"aspect":"1:1","regenerate_of":null}}"#).unwrap();
        assert_eq!((r.contract.is_some(), r.regenerate_of), (true, None));
        for bad in [r#""abc""#, "5", r#""4bf92f3577b34da6a3ce929d0e0e473g""#] {
            let e = err(&format!(r#"{{"prompt":"x","acc":{{"regenerate_of":{bad}}}}}"#));
            assert_eq!((e.param, e.code), (Some("acc.regenerate_of"), Some("invalid_value")), "{bad}");
        }
        let e = err(r#"{"prompt":"x","acc":{"regenerate":"x"}}"#);
        assert_eq!((e.param, e.code), (Some("acc"), Some("invalid_contract")));
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
            (r#"{"prompt":"x","size":"+1024x+1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"01024x1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"1024x1024 "}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":" 1024x1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"1024X1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"1024x1024x1"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"AUTO"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":"１０２４x1024"}"#, Some("size"), "invalid_value"),
            (r#"{"prompt":"x","size":1024}"#, Some("size"), "invalid_type"),
            (r#"{"prompt":"x","response_format":"gif"}"#, Some("response_format"), "invalid_value"),
            (r#"{"prompt":"x","seed":-1}"#, Some("seed"), "invalid_value"),
            (r#"{"prompt":"x","model":["a"]}"#, Some("model"), "invalid_type"),
            (r#"{"prompt":"x","quality":"ultra"}"#, Some("quality"), "invalid_value"),
            (r#"{"prompt":"x","background":"clear"}"#, Some("background"), "invalid_value"),
            (r#"{"prompt":"x","background":true}"#, Some("background"), "invalid_type"),
            (r#"{"prompt":"x","output_format":"gif"}"#, Some("output_format"), "invalid_value"),
            (
                r#"{"prompt":"x","output_format":"jpeg","output_compression":101}"#,
                Some("output_compression"),
                "invalid_value",
            ),
            (
                r#"{"prompt":"x","output_format":"jpeg","output_compression":-1}"#,
                Some("output_compression"),
                "invalid_value",
            ),
            (
                r#"{"prompt":"x","output_format":"jpeg","output_compression":"50"}"#,
                Some("output_compression"),
                "invalid_type",
            ),
            (r#"{"prompt":"x","output_compression":50}"#, Some("output_compression"), "invalid_value"),
            (
                r#"{"prompt":"x","output_format":"png","output_compression":50}"#,
                Some("output_compression"),
                "invalid_value",
            ),
            (
                r#"{"prompt":"x","output_format":"jpeg","background":"transparent"}"#,
                Some("background"),
                "invalid_value",
            ),
            (r#"{"prompt":"x","moderation":"high"}"#, Some("moderation"), "invalid_value"),
            (r#"{"prompt":"x","input_fidelity":"high"}"#, Some("input_fidelity"), "unknown_parameter"),
        ];
        for (body, param, code) in cases {
            let e = err(body);
            assert_eq!((e.param, e.code), (param, Some(code)), "{body}: {}", e.message);
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn gpt_image_parameters_parse_to_their_values() {
        let r = GenerationRequest::from_json(
            br#"{"prompt":"x","quality":"medium","background":"transparent","output_format":"webp","output_compression":0,"moderation":"low"}"#,
        )
        .unwrap();
        assert_eq!(r.quality.as_deref(), Some("medium"));
        assert_eq!(
            (r.background, r.output_format, r.output_compression, r.moderation, r.input_fidelity),
            (Some("transparent"), Some(OutputFormat::Webp), Some(0), Some("low"), None)
        );
        let set: Vec<&str> = Param::ALL.into_iter().filter(|p| r.has(*p)).map(Param::name).collect();
        assert_eq!(set, ["quality", "background", "output_format", "output_compression", "moderation"]);
        for q in QUALITIES {
            let r = GenerationRequest::from_json(format!(r#"{{"prompt":"x","quality":"{q}"}}"#).as_bytes()).unwrap();
            assert_eq!(r.quality.as_deref(), Some(q));
        }
        let r =
            GenerationRequest::from_json(br#"{"prompt":"x","output_format":"jpeg","output_compression":100}"#).unwrap();
        assert_eq!((r.output_format.map(OutputFormat::mime), r.output_compression), (Some("image/jpeg"), Some(100)));
        let e = err(r#"{"prompt":"x","background":"clear"}"#);
        assert_eq!(e.message, r#"background must be one of "transparent", "opaque", "auto"; got "clear""#);
    }

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> bytes::Bytes {
        let mut b = Vec::new();
        for (name, filename, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            match filename {
                Some(f) => b.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes()),
                None => b.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        bytes::Bytes::from(b)
    }

    #[tokio::test]
    async fn multipart_forms_parse_into_the_same_request() {
        let body = form(&[
            ("image", Some("a.png"), b"PNGDATA"),
            ("prompt", None, b"add a hat"),
            ("n", None, b"2"),
            ("model", None, b"m"),
        ]);
        let r = GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap();
        assert_eq!((r.prompt.as_str(), r.n, r.model.as_deref()), ("add a hat", 2, Some("m")));
        assert_eq!(&r.images[0].bytes[..], b"PNGDATA");
        assert_eq!(r.images[0].filename, "a.png");

        let body = form(&[("image", Some("a.png"), b"PNGDATA")]);
        let r = GenerationRequest::from_multipart(Operation::Variation, body.clone(), "XyZ").await.unwrap();
        assert_eq!(r.prompt, "");
        let e = GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap_err();
        assert_eq!(e.param, Some("prompt"));

        let e = GenerationRequest::from_multipart(Operation::Edit, form(&[("prompt", None, b"x")]), "XyZ")
            .await
            .unwrap_err();
        assert_eq!((e.param, e.code), (Some("image"), Some("missing_required_parameter")));
        let e = GenerationRequest::from_multipart(
            Operation::Edit,
            form(&[("image", Some("a"), b"x"), ("prompt", None, b"x"), ("n", None, b"two")]),
            "XyZ",
        )
        .await
        .unwrap_err();
        assert_eq!((e.param, e.code), (Some("n"), Some("invalid_type")));
        let png: &[u8] = b"\x89PNG\r\n\x1a\nMASK";
        let body = form(&[
            ("image[]", Some("a.png"), b"ONE"),
            ("image[]", Some("b.webp"), b"TWO"),
            ("mask", Some("m.png"), png),
            ("prompt", None, b"merge them"),
            ("output_format", None, b"jpeg"),
            ("output_compression", None, b"40"),
            ("input_fidelity", None, b"high"),
        ]);
        let r = GenerationRequest::from_multipart(Operation::Edit, body, "XyZ").await.unwrap();
        let files: Vec<(&str, &[u8])> = r.images.iter().map(|p| (p.field.as_str(), &p.bytes[..])).collect();
        assert_eq!(files, [("image[]", &b"ONE"[..]), ("image[]", &b"TWO"[..])]);
        assert_eq!(r.mask.as_ref().map(|m| &m.bytes[..]), Some(png));
        assert_eq!((r.output_compression, r.input_fidelity), (Some(40), Some("high")));
        assert_eq!(r.raw["output_compression"], serde_json::json!(40));

        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![("prompt", None, b"x")];
        parts.extend(std::iter::repeat_n(("image[]", Some("a.png"), &b"I"[..]), MAX_EDIT_IMAGES + 1));
        let e = GenerationRequest::from_multipart(Operation::Edit, form(&parts), "XyZ").await.unwrap_err();
        assert_eq!((e.param, e.code), (Some("image"), Some("invalid_value")));
        assert_eq!(e.message, "an edit takes at most 16 images, got 17");
        type Parts<'a> = &'a [(&'a str, Option<&'a str>, &'a [u8])];
        let cases: [(Parts, &str, &str); 3] = [
            (
                &[("image", Some("a"), b"I"), ("prompt", None, b"x"), ("mask", Some("m.jpg"), b"\xFF\xD8\xFFJ")],
                "mask",
                "invalid_image_format",
            ),
            (
                &[
                    ("image", Some("a"), b"I"),
                    ("prompt", None, b"x"),
                    ("mask", Some("m"), png),
                    ("mask", Some("n"), png),
                ],
                "mask",
                "invalid_value",
            ),
            (
                &[
                    ("image", Some("a"), b"I"),
                    ("prompt", None, b"x"),
                    ("output_format", None, b"png"),
                    ("output_compression", None, b"9"),
                ],
                "output_compression",
                "invalid_value",
            ),
        ];
        for (parts, param, code) in cases {
            let e = GenerationRequest::from_multipart(Operation::Edit, form(parts), "XyZ").await.unwrap_err();
            assert_eq!((e.param, e.code), (Some(param), Some(code)), "{}", e.message);
        }
        let e = GenerationRequest::from_multipart(
            Operation::Variation,
            form(&[("image", Some("a"), b"I"), ("mask", Some("m"), png)]),
            "XyZ",
        )
        .await
        .unwrap_err();
        assert_eq!((e.param, e.code), (Some("mask"), Some("invalid_value")));

        let e = GenerationRequest::from_multipart(Operation::Edit, bytes::Bytes::from_static(b"garbage"), "XyZ")
            .await
            .unwrap_err();
        assert_eq!(e.code, Some("invalid_multipart"));
    }

    #[test]
    fn sizes_in_range_parse() {
        assert_eq!(parse_size("1792x1024").unwrap(), Size { width: 1792, height: 1024 });
        assert_eq!(parse_size("256x256").unwrap(), Size { width: 256, height: 256 });
        assert_eq!(parse_size("auto").unwrap(), Size { width: 1024, height: 1024 });
        assert!(parse_size("255x256").is_err());
    }
}
