//! Reading an image's provenance back (`acc provenance`): its C2PA manifest checked (hashes,
//! signature, certificate profile, and the chain against trust anchors when given), and what
//! the gateway wrote into it.

use std::io::Cursor;

use c2pa::{Reader, ValidationState};
use serde::Serialize;

use super::{format_of, xmp, TRACE_ASSERTION};

/// How an image's provenance checks out, from worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No C2PA manifest in the image.
    NoManifest,
    /// A manifest that does not verify: the image was changed after signing (hash mismatch),
    /// the signature or the certificate is bad, or the manifest cannot be parsed.
    Invalid,
    /// A valid signature, by a certificate that does not chain to the trust anchors given.
    Untrusted,
    /// A valid signature; no trust anchors were given to check the signer against.
    Valid,
    /// A valid signature by a certificate chaining to the trust anchors given.
    Trusted,
}

/// What `acc provenance` prints: the verdict, why, and the manifest's statements.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// Validation failure codes (C2PA spec, "Validation": `assertion.dataHash.mismatch`,
    /// `claimSignature.mismatch`, `signingCredential.untrusted`, ...).
    pub failures: Vec<String>,
    /// The active manifest's label.
    pub manifest: Option<String>,
    /// The claim generator (`acc 0.1.0`).
    pub claim_generator: Option<String>,
    /// The first action (`c2pa.created`, or `c2pa.opened` over a provider's manifest).
    pub action: Option<String>,
    /// The IPTC digital source type stated by the manifest's actions.
    pub digital_source_type: Option<String>,
    /// The generator (software agent) of the actions: the model, with its version.
    pub generator: Option<serde_json::Value>,
    /// The gateway's `com.acc.trace` assertion, as written.
    pub trace: Option<serde_json::Value>,
    /// Signer: certificate issuer and common name, algorithm, signing time.
    pub signature: Option<serde_json::Value>,
    /// The parent ingredient's title and its own manifest's label, when the image had one.
    pub parent: Option<serde_json::Value>,
    /// An edit's or variation's input images (`inputTo` ingredients), in order: each one's
    /// `title` and, when it carried a manifest that was kept, that manifest's label
    /// (`active_manifest`, else null).
    pub inputs: Vec<serde_json::Value>,
    /// The image's XMP states trainedAlgorithmicMedia.
    pub xmp_ai_generated: bool,
}

/// Why an image could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not a PNG, JPEG or WebP image")]
    Format,
    /// The file starts like an image but cannot be read as one (cut short, broken chunks), and
    /// no manifest could be found in it.
    #[error("the image cannot be read: {0}")]
    Unreadable(String),
    #[error("c2pa settings: {0}")]
    Settings(String),
}

/// Reads and checks `image`'s provenance; `trust_anchors` (PEM certificates) makes a valid
/// signature by anyone else [`Verdict::Untrusted`].
pub fn inspect(image: &[u8], trust_anchors: Option<&str>) -> Result<Report, ReadError> {
    let mime = format_of(image).ok_or(ReadError::Format)?;
    let context = super::context(trust_anchors).map_err(|e| ReadError::Settings(e.to_string()))?;
    let xmp_ai_generated = xmp::states_ai_generated(image);
    let mut report = Report {
        verdict: Verdict::NoManifest,
        failures: Vec::new(),
        manifest: None,
        claim_generator: None,
        action: None,
        digital_source_type: None,
        generator: None,
        trace: None,
        signature: None,
        parent: None,
        inputs: Vec::new(),
        xmp_ai_generated,
    };
    let reader = match Reader::from_context(context).with_stream(mime, Cursor::new(image)) {
        Ok(r) => r,
        Err(c2pa::Error::JumbfNotFound) => return Ok(report),
        // Not a manifest that fails to verify but a file that is no readable image (a PNG cut
        // short): there is nothing to judge.
        Err(e) if !c2pa::jumbf_io::load_jumbf_from_memory(mime, image).is_ok_and(|j| !j.is_empty()) => {
            return Err(ReadError::Unreadable(e.to_string()));
        }
        Err(e) => {
            report.verdict = Verdict::Invalid;
            report.failures.push(e.to_string());
            return Ok(report);
        }
    };
    let codes: Vec<String> = match reader.validation_results().and_then(|r| r.active_manifest()) {
        Some(m) => m.failure().iter().map(|s| s.code().to_string()).collect(),
        None => reader.validation_status().unwrap_or_default().iter().map(|s| s.code().to_string()).collect(),
    };
    report.verdict = match reader.validation_state() {
        ValidationState::Invalid => Verdict::Invalid,
        ValidationState::Trusted => Verdict::Trusted,
        ValidationState::Valid if trust_anchors.is_some() => Verdict::Untrusted,
        ValidationState::Valid if codes.iter().all(|c| c == "signingCredential.untrusted") => Verdict::Valid,
        ValidationState::Valid => Verdict::Invalid,
    };
    if trust_anchors.is_none() {
        // Without anchors every signer is "untrusted": not a failure worth printing.
        report.failures = codes.into_iter().filter(|c| c != "signingCredential.untrusted").collect();
    } else {
        report.failures = codes;
    }
    let json: serde_json::Value = serde_json::from_str(&reader.json()).unwrap_or_default();
    let Some(label) = json["active_manifest"].as_str() else { return Ok(report) };
    let m = &json["manifests"][label];
    report.manifest = Some(label.to_string());
    report.claim_generator = m["claim_generator_info"][0]["name"]
        .as_str()
        .map(|n| format!("{n} {}", m["claim_generator_info"][0]["version"].as_str().unwrap_or("")).trim().to_string());
    for a in m["assertions"].as_array().into_iter().flatten() {
        let l = a["label"].as_str().unwrap_or_default();
        if l == TRACE_ASSERTION {
            report.trace = Some(a["data"].clone());
        } else if l.starts_with("c2pa.actions") {
            let actions = a["data"]["actions"].as_array().cloned().unwrap_or_default();
            report.action = actions.first().and_then(|x| x["action"].as_str()).map(str::to_string);
            let with_dst = actions.iter().find(|x| x["digitalSourceType"].is_string());
            report.digital_source_type = with_dst.and_then(|x| x["digitalSourceType"].as_str()).map(str::to_string);
            report.generator = with_dst.map(|x| x["softwareAgent"].clone()).filter(|v| !v.is_null());
        }
    }
    let sig = &m["signature_info"];
    if sig.is_object() {
        report.signature = Some(serde_json::json!({
            "issuer": sig["issuer"], "common_name": sig["common_name"], "alg": sig["alg"], "time": sig["time"],
        }));
    }
    report.parent = m["ingredients"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["relationship"] == "parentOf")
        .map(|i| serde_json::json!({ "title": i["title"], "active_manifest": i["active_manifest"] }));
    report.inputs = m["ingredients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["relationship"] == "inputTo")
        .map(|i| serde_json::json!({ "title": i["title"], "active_manifest": i["active_manifest"] }))
        .collect();
    Ok(report)
}

impl Verdict {
    /// `acc provenance`'s exit code for this verdict (README, "Provenance"): 0 valid or
    /// trusted, 3 no manifest, 4 invalid, 5 signed by a certificate outside the trust anchors.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Valid | Verdict::Trusted => 0,
            Verdict::NoManifest => 3,
            Verdict::Invalid => 4,
            Verdict::Untrusted => 5,
        }
    }

    /// One line saying what the verdict means.
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::NoManifest => "no C2PA manifest",
            Verdict::Invalid => "INVALID: the manifest does not verify (changed after signing, or a bad signature)",
            Verdict::Untrusted => "signed, but not by a certificate under the trust anchors given",
            Verdict::Valid => "signed, signature valid (no trust anchors given to check the signer against)",
            Verdict::Trusted => "signed, signature valid, signer under the trust anchors given",
        }
    }
}

/// The report as `acc provenance` prints it without `--json`: one `name: value` line each.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "provenance:   {}", r.verdict.describe());
    for f in &r.failures {
        let _ = writeln!(out, "failure:      {f}");
    }
    if let Some(m) = &r.manifest {
        let _ = writeln!(out, "manifest:     {m}");
    }
    if let Some(sig) = &r.signature {
        let _ = writeln!(
            out,
            "signed by:    {} (issuer {}), {}, at {}",
            s(&sig["common_name"]),
            s(&sig["issuer"]),
            s(&sig["alg"]),
            s(&sig["time"])
        );
    }
    if let Some(g) = &r.claim_generator {
        let _ = writeln!(out, "claim by:     {g}");
    }
    if let Some(a) = &r.action {
        let _ = writeln!(out, "action:       {a}");
    }
    if let Some(d) = &r.digital_source_type {
        let _ = writeln!(out, "source type:  {d}");
    }
    if let Some(g) = &r.generator {
        let version = g["version"].as_str().map(|v| format!(" ({v})")).unwrap_or_default();
        let _ = writeln!(out, "generator:    {}{version}", s(&g["name"]));
    }
    if let Some(t) = &r.trace {
        let _ = writeln!(out, "trace id:     {}", s(&t["trace_id"]));
        let _ = writeln!(out, "route:        {}", s(&t["route"]));
        let _ = writeln!(out, "provider:     {} ({})", s(&t["provider"]), s(&t["provider_kind"]));
        let verdicts: Vec<String> = t["evaluations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{}={}({:.2})", s(&e["evaluator"]), s(&e["verdict"]), e["score"].as_f64().unwrap_or(0.0)))
            .collect();
        let _ =
            writeln!(out, "verdicts:     {}", if verdicts.is_empty() { "-".to_string() } else { verdicts.join(", ") });
        if let Some(p) = t["prompt"].as_str() {
            let _ = writeln!(out, "prompt:       {p}");
        }
    }
    if let Some(p) = &r.parent {
        let _ = writeln!(out, "parent:       {} (its manifest {})", s(&p["title"]), s(&p["active_manifest"]));
    }
    for i in &r.inputs {
        let manifest = i["active_manifest"].as_str().map(|m| format!(" (its manifest {m})")).unwrap_or_default();
        let _ = writeln!(out, "input:        {}{manifest}", s(&i["title"]));
    }
    let _ = writeln!(
        out,
        "xmp:          {}",
        if r.xmp_ai_generated {
            "Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia"
        } else {
            "no IPTC digital source type"
        }
    );
    out
}
