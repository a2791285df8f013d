//! Provenance on returned images: a C2PA manifest signed with the gateway's key and the IPTC
//! digital source type in the image's XMP, both saying the image was made by a trained
//! algorithmic model, and naming the trace that made it. Reading them back (`acc provenance`).
//!
//! What a signed image carries (C2PA Technical Specification 2.x, "Actions", "Ingredient";
//! IPTC NewsCodes, Digital Source Type):
//! - `c2pa.actions`: `c2pa.created` with `digitalSourceType` = [`TRAINED_ALGORITHMIC_MEDIA`]
//!   and the generator (the model as routed, with the version the provider reported) as
//!   `softwareAgent`. A provider image that already carries a C2PA manifest becomes the
//!   `parentOf` ingredient instead (its own manifest kept inside it); the spec forbids
//!   `c2pa.created` beside a parent, so the actions are then `c2pa.opened` (the parent) and
//!   `c2pa.edited.metadata` (the XMP added) with the same digital source type.
//! - An edit's or variation's input images as `inputTo` ingredients, referenced by a
//!   `c2pa.edited` action ([`Input`]).
//! - [`TRACE_ASSERTION`] (`com.acc.trace`), the gateway's own assertion: the trace id, route,
//!   provider (policy name and kind), model, the model version reported, each evaluator's
//!   verdict, and the prompt only where the policy allows it (see [`Facts`]).
//! - The claim generator: `acc` with the gateway's version.
//! - XMP with `Iptc4xmpExt:DigitalSourceType` (see [`xmp`]), inside the hashed content.
//!
//! The pixels are never decoded or re-encoded: only metadata chunks are added. Signing uses
//! the `c2pa` crate with its pure-Rust crypto (`rust_native_crypto`), no network.
//! This module uses nothing else of the crate, so `policy` can check credentials with it.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use c2pa::{Builder, BuilderIntent, Context, DigitalSourceType, Reader, SigningAlg, ValidationState};
use serde::Serialize;

pub mod read;
pub mod xmp;

/// IPTC digital source type of images made by a generative model
/// (<http://cv.iptc.org/newscodes/digitalsourcetype/>).
pub const TRAINED_ALGORITHMIC_MEDIA: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// Label of the gateway's own assertion in the manifest: a JSON object
/// `{"trace_id", "route", "provider", "provider_kind", "model"?, "model_version"?,
/// "evaluations": [{"evaluator", "verdict", "score"}], "prompt"?}`.
pub const TRACE_ASSERTION: &str = "com.acc.trace";

/// Where a credential (certificate chain or private key, PEM) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file path (relative paths: from the gateway's working directory).
    File(String),
    /// The name of an environment variable holding the PEM text.
    Env(String),
}

impl fmt::Display for Source {
    /// The path or the variable's name; never the value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "file {p}"),
            Source::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

impl Source {
    fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            Source::File(p) => {
                crate::read_pem_file(std::path::Path::new(p)).map_err(|e| format!("cannot read {self}: {e}"))
            }
            Source::Env(v) => match std::env::var(v) {
                Ok(s) if !s.trim().is_empty() => Ok(s.into_bytes()),
                Ok(_) => Err(format!("{self} is empty")),
                Err(_) => Err(format!("{self} is not set")),
            },
        }
    }
}

/// A signing identity, checked: the certificate chain (PEM, signing certificate first), the
/// private key (PKCS#8 PEM) and the algorithm the key implies. Its `Debug` shows no key
/// material.
pub struct Credentials {
    signer: c2pa::BoxedSigner,
    alg: SigningAlg,
    context: Arc<Context>,
    /// Where the chain and key came from, for messages.
    pub cert_source: Source,
    pub key_source: Source,
    /// Bytes signing added to the self-test's tiny image (the manifest with its certificate
    /// chain and signature, the XMP): what each signed image grows by, about.
    manifest_bytes: u64,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("alg", &self.alg.to_string())
            .field("cert", &self.cert_source.to_string())
            .field("key", &self.key_source.to_string())
            .finish_non_exhaustive()
    }
}

/// What the manifest says about the request that made an image.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub trace_id: String,
    /// Route name of the policy.
    pub route: String,
    /// Provider name of the policy.
    pub provider: String,
    /// Provider kind (API family): `openai`, `stability`, ...
    pub provider_kind: String,
    /// The model as routed (the target's model, else the alias asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The model (and version) the provider reported having used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Every evaluator's verdict on this image.
    pub evaluations: Vec<Evaluation>,
    /// The prompt, only when the route records it in full and `[provenance] include_prompt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// One evaluator's verdict on the image.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Evaluation {
    pub evaluator: String,
    /// `pass`, `fail` or `error`.
    pub verdict: String,
    /// 0 to 1, 1 best.
    pub score: f32,
}

/// A signed image.
#[derive(Debug)]
pub struct Signed {
    /// The image with its manifest and XMP.
    pub bytes: Vec<u8>,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub mime: &'static str,
    /// The manifest's label (`urn:c2pa:...`), for the trace record.
    pub manifest: String,
    /// The provider's image had a manifest, kept as the parent ingredient.
    pub parent: bool,
}

/// An input image of an edit or variation (the form's `image`, `image[]` or `mask` file), named
/// in the signed image's manifest as an `inputTo` ingredient (C2PA 2.x, "Ingredient": an asset
/// used as input to the computational process that made this one) referenced by a
/// `c2pa.edited` action.
#[derive(Debug, Clone)]
pub struct Input {
    /// The ingredient's title: the form field and the file's name, e.g. `image: photo.png`.
    pub title: String,
    pub bytes: Bytes,
    /// What [`input_ingredient`] found, kept for the request's other output images: reading
    /// an input's manifest (and validating it) is done once, not once per image signed.
    checked: std::sync::OnceLock<Option<(&'static str, bool)>>,
}

impl Input {
    pub fn new(title: String, bytes: Bytes) -> Input {
        Input { title, bytes, checked: std::sync::OnceLock::new() }
    }
}

/// What becomes of an input image in the manifest: with its own manifest kept (it had one that
/// is not invalid: the edit's provenance chains to it), as a plain ingredient (no manifest, or
/// one that reads as invalid and would make the gateway's manifest invalid too), or left out
/// (not PNG, JPEG or WebP: C2PA cannot hash it here).
fn input_ingredient(context: &Arc<Context>, input: &Input) -> Option<(&'static str, bool)> {
    *input.checked.get_or_init(|| check_input(context, &input.bytes))
}

/// [`input_ingredient`]'s reading of one input, done once per input.
fn check_input(context: &Arc<Context>, bytes: &[u8]) -> Option<(&'static str, bool)> {
    let mime = format_of(bytes)?;
    Some((mime, embedded_manifest(context, mime, bytes) != Some(false)))
}

/// Whether `image` carries a C2PA manifest (`None`: it has none) and, if so, whether it reads
/// and is not invalid (`Some(true)`): only such a manifest is kept as a parent or an input's
/// ingredient; a broken one would make the gateway's own manifest read as invalid too.
fn embedded_manifest(context: &Arc<Context>, mime: &str, image: &[u8]) -> Option<bool> {
    if !c2pa::jumbf_io::load_jumbf_from_memory(mime, image).is_ok_and(|j| !j.is_empty()) {
        return None;
    }
    Some(
        Reader::from_shared_context(context)
            .with_stream(mime, Cursor::new(image))
            .is_ok_and(|r| r.validation_state() != ValidationState::Invalid),
    )
}

/// Why an image could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Not PNG, JPEG or WebP.
    #[error("image format not supported for signing (PNG, JPEG and WebP are)")]
    Format,
    /// The container could not be parsed to add XMP.
    #[error("image could not be parsed: {0}")]
    Parse(String),
    /// The c2pa crate refused or failed.
    #[error("C2PA signing failed: {0}")]
    C2pa(#[from] c2pa::Error),
}

/// The media type of PNG, JPEG and WebP bytes, by their signature.
pub fn format_of(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// The `c2pa` settings the gateway reads and signs with: nothing fetched over the network,
/// no verification pass after signing (the start-up self-test covers the credentials).
/// Whether `pem` reads as C2PA trust anchors (PEM certificates). Errors: what c2pa found
/// wrong, said of the anchors.
pub fn check_trust_anchors(pem: &str) -> Result<(), String> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    context(Some(pem)).map(|_| ()).map_err(|e| format!("not usable as trust anchors: {e}"))
}

fn context(trust_anchors: Option<&str>) -> Result<Context, c2pa::Error> {
    let mut settings = c2pa::Settings::new()
        .with_value("verify.verify_after_sign", false)?
        .with_value("verify.remote_manifest_fetch", false)?
        .with_value("verify.ocsp_fetch", false)?;
    if let Some(pem) = trust_anchors {
        settings = settings.with_value("trust.trust_anchors", pem.to_string())?;
    }
    Context::new().with_settings(settings)
}

/// The C2PA signing algorithm a PKCS#8 private key implies: EC P-256, P-384, P-521 give
/// ES256, ES384, ES512; Ed25519 gives Ed25519; RSA (and RSASSA-PSS) keys give PS256 (C2PA
/// allows RSA only with PSS). Anything else is refused with what it is.
pub fn algorithm_of(key_pem: &str) -> Result<SigningAlg, String> {
    use pkcs8::der::Decode;
    let (label, doc) = pkcs8::SecretDocument::from_pem(key_pem).map_err(|e| {
        if key_pem.contains("BEGIN EC PRIVATE KEY") || key_pem.contains("BEGIN RSA PRIVATE KEY") {
            "the private key is not PKCS#8 (convert it: openssl pkcs8 -topk8 -nocrypt -in KEY)".to_string()
        } else {
            format!("the private key is not a PEM PKCS#8 key: {e}")
        }
    })?;
    if label != "PRIVATE KEY" {
        return Err(format!("the private key is a PEM \"{label}\", expected an unencrypted \"PRIVATE KEY\" (PKCS#8)"));
    }
    let info = pkcs8::PrivateKeyInfo::from_der(doc.as_bytes())
        .map_err(|e| format!("the private key is not a PKCS#8 key: {e}"))?;
    let alg = info.algorithm.oid.to_string();
    let curve = info.algorithm.parameters_oid().ok().map(|o| o.to_string());
    match (alg.as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => Ok(SigningAlg::Es256),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => Ok(SigningAlg::Es384),
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => Ok(SigningAlg::Es512),
        ("1.2.840.10045.2.1", c) => Err(format!(
            "unsupported algorithm: EC key on curve {} (C2PA signs with P-256, P-384 or P-521)",
            c.unwrap_or("(none)")
        )),
        ("1.3.101.112", _) => Ok(SigningAlg::Ed25519),
        ("1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10", _) => Ok(SigningAlg::Ps256),
        ("1.3.101.113", _) => {
            Err("unsupported algorithm: Ed448 (C2PA signs with ES256/384/512, PS256 or Ed25519)".into())
        }
        (other, _) => {
            Err(format!("unsupported algorithm: key type {other} (C2PA signs with ES256/384/512, PS256 or Ed25519)"))
        }
    }
}

impl Credentials {
    /// Reads the chain and key, finds the algorithm, and signs and verifies a tiny image with
    /// them, so a key that does not match the certificate, or a certificate C2PA readers
    /// refuse (no allowed extended key usage, self-signed, expired), is found now rather than
    /// on the first request. Errors name the file or variable, never what it holds.
    pub fn load(cert_source: Source, key_source: Source) -> Result<Credentials, String> {
        let cert = cert_source.read()?;
        let key = key_source.read()?;
        if !String::from_utf8_lossy(&cert).contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("{cert_source}: no PEM certificate found"));
        }
        let key_text = std::str::from_utf8(&key).map_err(|_| format!("{key_source}: not PEM text"))?;
        let alg = algorithm_of(key_text).map_err(|e| format!("{key_source}: {e}"))?;
        let signer = c2pa::create_signer::from_keys(&cert, &key, alg, None)
            .map_err(|e| format!("{key_source} with {cert_source}: cannot make a {alg} signer: {e}"))?;
        let context = context(None).map_err(|e| format!("c2pa settings: {e}"))?;
        let mut creds =
            Credentials { signer, alg, context: Arc::new(context), cert_source, key_source, manifest_bytes: 0 };
        creds.manifest_bytes = creds.self_test()?;
        Ok(creds)
    }

    /// The algorithm the key signs with (`ES256`, `PS256`, `Ed25519`, ...).
    pub fn algorithm(&self) -> String {
        self.alg.to_string()
    }

    /// How many bytes signing adds to an image, at most: the self-test's growth, plus room for
    /// a longer trace assertion (evaluations, a prompt of `prompt_bytes`) and, where the
    /// provider's image carries a manifest, a copy of it kept as the parent ingredient
    /// (`existing_manifest`). Used to check the review budget before the image is signed.
    pub fn growth_estimate(&self, prompt_bytes: usize, existing_manifest: usize) -> u64 {
        self.manifest_bytes + 8 * 1024 + 2 * prompt_bytes as u64 + 2 * existing_manifest as u64
    }

    /// Signs and reads back a tiny image; returns how many bytes signing added to it.
    fn self_test(&self) -> Result<u64, String> {
        let probe = Bytes::from(tiny_png());
        let facts = Facts {
            trace_id: "0".repeat(32),
            route: "self-test".into(),
            provider: "self-test".into(),
            provider_kind: "self-test".into(),
            model: None,
            model_version: None,
            evaluations: Vec::new(),
            prompt: None,
        };
        const PROFILE: &str = " (C2PA needs an end-entity certificate, not self-signed, with digitalSignature key usage, an allowed extended key usage such as emailProtection or c2pa-kp-claimSigning, and an authority key identifier)";
        let signed = self.sign(&probe, &facts, &[]).map_err(|e| {
            let hint = if e.to_string().contains("certificate") { PROFILE } else { "" };
            format!("{} with {}: signing a test image failed: {e}{hint}", self.key_source, self.cert_source)
        })?;
        let reader = Reader::from_shared_context(&self.context)
            .with_stream("image/png", Cursor::new(&signed.bytes))
            .map_err(|e| format!("{}: the test image's manifest does not read back: {e}", self.cert_source))?;
        if reader.validation_state() == ValidationState::Invalid {
            let codes: Vec<String> = reader
                .validation_results()
                .and_then(|r| r.active_manifest())
                .map(|m| m.failure().iter().map(|s| s.code().to_string()).collect())
                .unwrap_or_default();
            let hint = if codes.iter().any(|c| c.starts_with("claimSignature")) {
                " (does the private key belong to the first certificate of the chain?)"
            } else if codes.iter().any(|c| c.starts_with("signingCredential")) {
                PROFILE
            } else {
                ""
            };
            return Err(format!(
                "{} with {}: a test image signed with them does not verify: {}{hint}",
                self.key_source,
                self.cert_source,
                codes.join(", ")
            ));
        }
        Ok(signed.bytes.len().saturating_sub(probe.len()) as u64)
    }

    /// Signs one image: XMP with the digital source type added, then a C2PA manifest with
    /// `facts` embedded. CPU-bound (about a hash of the image plus one signature): call it
    /// off the async workers. The image is copied twice: once with the XMP chunk inserted,
    /// once into the signed output (`Bytes` clones share the buffer).
    ///
    /// `inputs` (an edit's or variation's input images, empty for a generation) become
    /// `inputTo` ingredients referenced by a `c2pa.edited` action ([`Input`]).
    pub fn sign(&self, image: &Bytes, facts: &Facts, inputs: &[Input]) -> Result<Signed, SignError> {
        let mime = format_of(image).ok_or(SignError::Format)?;
        // The provider's own manifest is kept as the parent only when it reads and is not
        // invalid: a broken one (bad CBOR, a missing assertion, a hash that no longer matches)
        // proves nothing, and as an ingredient it would make the gateway's manifest read as
        // invalid too. It is then replaced, as an image without one would be signed.
        let parent = embedded_manifest(&self.context, mime, image) == Some(true);
        let with_xmp = xmp::embed(image.clone(), mime)?;
        let agent = {
            let mut a = serde_json::json!({ "name": facts.model.as_deref().unwrap_or(&facts.provider_kind) });
            if let Some(v) = &facts.model_version {
                a["version"] = v.clone().into();
            }
            a
        };
        let manifest = format!("urn:c2pa:{}", uuid::Uuid::new_v4());
        let definition = serde_json::json!({
            "claim_generator_info": [{ "name": "acc", "version": env!("CARGO_PKG_VERSION") }],
            "title": "generated image",
            "format": mime,
            "label": manifest,
        });
        let mut builder = Builder::from_shared_context(&self.context).with_definition(definition)?;
        if parent {
            builder.set_intent(BuilderIntent::Edit);
            let ingredient = serde_json::json!({ "title": "provider image", "relationship": "parentOf" });
            builder.add_ingredient_from_stream(ingredient.to_string(), mime, &mut Cursor::new(&image[..]))?;
            builder.add_action(serde_json::json!({
                "action": "c2pa.edited.metadata",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent,
                "description": "IPTC digital source type added by the acc gateway",
            }))?;
        } else {
            builder.set_intent(BuilderIntent::Create(DigitalSourceType::TrainedAlgorithmicMedia));
            builder.add_action(serde_json::json!({
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent,
            }))?;
        }
        let mut input_ids = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let Some((mime, with_manifest)) = input_ingredient(&self.context, input) else { continue };
            let label = format!("input_{i}");
            let ingredient = serde_json::json!({ "title": input.title, "relationship": "inputTo", "label": label });
            if with_manifest {
                builder.add_ingredient_from_stream(ingredient.to_string(), mime, &mut Cursor::new(&input.bytes[..]))?;
            } else {
                // Its manifest reads as invalid (the image was changed after it was signed):
                // named by its SHA-256 alone, as an ingredient carrying that manifest would
                // make the gateway's own manifest read as invalid.
                use sha2::Digest;
                let mut plain = ingredient;
                plain["format"] = mime.into();
                plain["instance_id"] = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&input.bytes))).into();
                let plain: c2pa::Ingredient = serde_json::from_value(plain).map_err(c2pa::Error::JsonError)?;
                builder.add_ingredient(plain);
            }
            input_ids.push(label);
        }
        if !input_ids.is_empty() {
            builder.add_action(serde_json::json!({
                "action": "c2pa.edited",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent,
                "description": "made by the model from the input images of an edit or variation request",
                "parameters": { "ingredientIds": input_ids },
            }))?;
        }
        builder.add_assertion_json(TRACE_ASSERTION, facts)?;
        let mut out = Cursor::new(Vec::with_capacity(with_xmp.len() + 64 * 1024));
        builder.sign(&*self.signer, mime, &mut Cursor::new(&with_xmp[..]), &mut out)?;
        Ok(Signed { bytes: out.into_inner(), mime, manifest, parent })
    }
}

/// The size of the C2PA manifest store an image already carries (a provider's own), bytes; 0
/// when it has none or is no format C2PA reads here.
pub fn embedded_manifest_len(image: &[u8]) -> usize {
    format_of(image).and_then(|mime| c2pa::jumbf_io::load_jumbf_from_memory(mime, image).ok()).map_or(0, |j| j.len())
}

/// A 1x1 PNG for the credentials' self-test.
fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        if let Ok(mut w) = enc.write_header() {
            let _ = w.write_image_data(&[0x80, 0x80, 0x80]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
