//! The request's trace record ([`TraceRecord`]), built as the pipeline goes: drafted once the
//! route is known ([`draft`]), its attempts added after the plan ran ([`attempts`]), the
//! answer's images ([`images`]), then finished with the status sent ([`finish`]) and handed to
//! the store's writer. Nothing here does I/O: digests of the images are computed by the
//! writer, off the request path.
//!
//! A route's `record_prompt` decides what of the prompt goes into the record: `"full"`, only
//! its SHA-256 (`"sha256"`), or nothing (`"none"`).

use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::answer::Sent;
use crate::attempt::AttemptNote;
use crate::policy::{Policy, RecordPrompt};
use crate::providers::{ProviderError, Settings};
use crate::request::{GenerationRequest, Operation, ResponseFormat};
use crate::routing::PlanOutcome;
use crate::store::record::{AttemptRecord, EvaluationRecord, GenerationRecord, ImageRecord, PendingImage, TraceRecord};
use crate::{cut, hex_lower};

/// `x-acc-prompt-template`: the prompt template the client used, `name@version`.
pub const PROMPT_TEMPLATE: &str = "x-acc-prompt-template";
/// `x-acc-asset-type`: what the image is for (`banner`, `avatar`, ...).
pub const ASSET_TYPE: &str = "x-acc-asset-type";
/// `x-acc-cohort`: the client's cohort (also matched by routes).
pub const COHORT: &str = "x-acc-cohort";
/// Longest cohort field value kept; longer ones are cut (at a character boundary).
pub const MAX_FIELD_CHARS: usize = 256;

/// A cohort header's value as text: UTF-8, as clients send it (bytes that are not UTF-8 become
/// U+FFFD, so the value is still recorded and counted as `other`), without surrounding
/// whitespace; `None` when absent or empty. HTTP field values are octets (RFC 9110, 5.5); a
/// value that is not visible ASCII is kept, not dropped.
fn header_text<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    let text = match String::from_utf8_lossy(headers.get(name)?.as_bytes()) {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
    };
    (!text.is_empty()).then_some(text)
}

/// The request's end user: its OpenAI `user` field as [`crate::request::end_user`] keeps it
/// (`POST /v1/feedback` reads its `user` the same way). An empty `user` is no end user: the
/// key's name stands in where one is needed.
pub fn end_user(req: &GenerationRequest) -> Option<String> {
    req.raw.get("user").and_then(|u| u.as_str()).and_then(crate::request::end_user)
}

/// A request's cohort fields as recorded, counted and matched by routes: `[x-acc-cohort,
/// x-acc-prompt-template, x-acc-asset-type]`, each [`header_text`] cut to [`MAX_FIELD_CHARS`]
/// characters. The names are parsed once, not per request.
pub fn cohort_fields(headers: &HeaderMap) -> [Option<String>; 3] {
    const NAMES: [HeaderName; 3] = [
        HeaderName::from_static(COHORT),
        HeaderName::from_static(PROMPT_TEMPLATE),
        HeaderName::from_static(ASSET_TYPE),
    ];
    NAMES.map(|name| header_text(headers, &name).map(|v| cut(&v, MAX_FIELD_CHARS)))
}

fn sha256_hex(s: &str) -> String {
    hex_lower(&Sha256::digest(s.as_bytes()))
}

/// A new span id: 16 lowercase hex digits of a random non-zero u64 (W3C Trace Context's
/// `parent-id`; all zeroes is invalid).
pub fn new_span_id() -> String {
    hex_lower(&fastrand::u64(1..).to_be_bytes())
}

/// Nanoseconds since the Unix epoch of `t`.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A new trace id for a request that did not bring one: 32 lowercase hex digits, the first 12
/// the Unix time of `now` in milliseconds (48 bits), the other 20 random (80 bits), so ids made
/// later sort later. Time-ordered ids (the layout of UUIDv7, RFC 9562 section 5.7; AWS X-Ray
/// puts seconds in front the same way) land at the end of the trace store's primary-key index
/// instead of at a random leaf, which would cost a page write per record. W3C Trace Context
/// level 2 asks only that the right-most 7 bytes be random for its `random` flag; samplers
/// that read the low 8 bytes (OpenTelemetry's ratio sampler) see random bits. Never all
/// zeroes (the invalid trace id).
pub fn new_trace_id(now: SystemTime) -> String {
    let ms = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64) & 0xffff_ffff_ffff;
    hex_lower(&((u128::from(ms) << 80) | fastrand::u128(1..1 << 80)).to_be_bytes())
}

/// Who asked, for the record: the key's tenant and name.
pub struct Caller<'a> {
    pub tenant: Option<&'a str>,
    pub key_name: Option<&'a str>,
}

/// The record as far as the request itself says: everything but attempts and outcome.
#[allow(clippy::too_many_arguments)]
pub fn draft(
    trace_id: &str,
    parent_span_id: Option<String>,
    started: SystemTime,
    caller: Caller<'_>,
    route: &str,
    record_prompt: RecordPrompt,
    req: &GenerationRequest,
    cohort_fields: &[Option<String>; 3],
) -> TraceRecord {
    let (prompt, prompt_sha256) = recorded(record_prompt, Some(&req.prompt).filter(|p| !p.is_empty()));
    let (negative_prompt, negative_prompt_sha256) = recorded(record_prompt, req.negative_prompt.as_ref());
    TraceRecord {
        trace_id: trace_id.to_string(),
        span_id: new_span_id(),
        parent_span_id,
        parent_trace_id: None,
        kind: "primary".to_string(),
        start_time_unix_nano: unix_nanos(started),
        tenant: caller.tenant.map(str::to_string),
        key_name: caller.key_name.map(str::to_string),
        route: Some(route.to_string()),
        operation: operation_name(req.op).to_string(),
        cohort: cohort_fields[0].clone(),
        prompt_template: cohort_fields[1].clone(),
        asset_type: cohort_fields[2].clone(),
        end_user: end_user(req),
        record_prompt: record_prompt.name().to_string(),
        prompt,
        negative_prompt,
        prompt_sha256,
        negative_prompt_sha256,
        parameters: parameters(req),
        contract: req.contract.as_ref().and_then(|c| serde_json::to_value(c.as_ref()).ok()),
        ..TraceRecord::default()
    }
}

/// `d` in milliseconds, as the record keeps durations: whole nanoseconds divided once, so a
/// record reads `0.000621`, not the `0.0006209999999999999` of seconds times 1000.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// `(text, sha256)` of a prompt under `record_prompt`.
fn recorded(how: RecordPrompt, prompt: Option<&String>) -> (Option<String>, Option<String>) {
    match (how, prompt) {
        (_, None) | (RecordPrompt::None, _) => (None, None),
        (RecordPrompt::Sha256, Some(p)) => (None, Some(sha256_hex(p))),
        (RecordPrompt::Full, Some(p)) => (Some(p.clone()), Some(sha256_hex(p))),
    }
}

/// `generations`, `edits` or `variations` (the endpoint's last path segment).
pub fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Generate => "generations",
        Operation::Edit => "edits",
        Operation::Variation => "variations",
    }
}

/// The requested parameters other than prompts and files, as a JSON object.
fn parameters(req: &GenerationRequest) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        if !v.is_null() {
            m.insert(k.to_string(), v);
        }
    };
    put("model", req.model.clone().into());
    put("n", req.n.into());
    put("size", req.size_given.then(|| format!("{}x{}", req.size.width, req.size.height)).into());
    put(
        "response_format",
        match req.response_format {
            ResponseFormat::Url => "url",
            ResponseFormat::B64Json => "b64_json",
        }
        .into(),
    );
    put("quality", req.quality.clone().into());
    put("style", req.style.clone().into());
    put("seed", req.seed.into());
    put("steps", req.steps.into());
    put("guidance_scale", req.guidance_scale.into());
    put("sampler", req.sampler.clone().into());
    put("background", req.background.into());
    put("output_format", req.output_format.map(|f| f.name()).into());
    put("output_compression", req.output_compression.into());
    put("moderation", req.moderation.into());
    put("input_fidelity", req.input_fidelity.into());
    if !req.images.is_empty() {
        put("input_images", req.images.len().into());
    }
    if req.mask.is_some() {
        put("mask", true.into());
    }
    if let Some(partials) = req.stream {
        put("stream", true.into());
        put("partial_images", partials.into());
    }
    serde_json::Value::Object(m)
}

/// Adds every attempt of `outcome` with its note (queue time, model, verdicts, span id),
/// the generation settings of the winner, and what the attempts cost.
pub fn attempts(
    rec: &mut TraceRecord,
    policy: &Policy,
    outcome: &PlanOutcome,
    notes: Vec<AttemptNote>,
    request_start: Instant,
    canary: bool,
    costs: &[Option<f64>],
) {
    let mut notes: Vec<Option<AttemptNote>> = notes.into_iter().map(Some).collect();
    let full = rec.record_prompt == RecordPrompt::Full.name();
    for (i, a) in outcome.attempts.iter().enumerate() {
        let note = notes.iter_mut().find(|n| n.as_ref().is_some_and(|n| n.step == a.step)).and_then(Option::take);
        let role = if a.hedge {
            "hedge"
        } else if i == 0 && canary {
            "canary"
        } else if i == 0 {
            "primary"
        } else {
            "fallback"
        };
        let error = match (&a.result, note.as_ref().and_then(|n| n.partial_errors.first().map(|e| (e, n)))) {
            (Err(e), _) => Some(error_text(e, full)),
            // It answered, with fewer images than it was asked for: why is kept too.
            (Ok(()), Some((first, n))) => Some(format!(
                "{} of the answer's calls failed, the first: {}",
                n.partial_errors.len(),
                error_text(first, full)
            )),
            (Ok(()), None) => None,
        };
        let ended = Ended { elapsed: a.elapsed, result: a.label(), error, cost_usd: costs.get(i).copied().flatten() };
        rec.attempts.push(attempt_record(policy, a.step, note, ended, role, request_start));
    }
    rec.canary = canary;
}

/// The attempts of a request the client left before it was answered (`client_cancelled`),
/// from their notes: one that had ended keeps its result; one still running when the client
/// left (its provider call dropped) is `client_cancelled`, its latency up to now. What they
/// cost is not known (a provider may still bill a generation it was running).
pub fn unfinished_attempts(
    rec: &mut TraceRecord,
    policy: &Policy,
    mut notes: Vec<AttemptNote>,
    request_start: Instant,
    canary: bool,
) {
    notes.sort_by_key(|n| n.started);
    for (i, mut note) in notes.into_iter().enumerate() {
        let ended = match note.ended.take() {
            Some(e) => Ended { elapsed: e.elapsed, result: e.result, error: e.error, cost_usd: None },
            None => Ended {
                elapsed: note.started.elapsed(),
                result: "client_cancelled",
                error: Some("the client went away while the attempt ran".into()),
                cost_usd: None,
            },
        };
        let role = match i {
            0 if canary => "canary",
            0 => "primary",
            _ => "fallback",
        };
        rec.attempts.push(attempt_record(policy, note.step, Some(note), ended, role, request_start));
    }
    rec.canary = canary;
}

/// How an attempt ended, as its record says it.
struct Ended {
    elapsed: std::time::Duration,
    result: &'static str,
    error: Option<String>,
    cost_usd: Option<f64>,
}

/// One attempt's record: the target's provider, kind and host, and what its note says
/// (span id, model, queue time, verdicts).
fn attempt_record(
    policy: &Policy,
    step: crate::routing::Step,
    note: Option<AttemptNote>,
    ended: Ended,
    role: &str,
    request_start: Instant,
) -> AttemptRecord {
    let route = &policy.routes[step.route];
    let target = &route.targets[step.target];
    let spec = policy.providers.get(&target.provider);
    let kind = spec.map_or("?", |p| p.kind.name());
    // The host of the provider's base URL (OpenTelemetry's `server.address`).
    let endpoint_host = spec
        .and_then(|p| p.conn.base_url.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string()));
    let started = note.as_ref().map_or(Instant::now() - ended.elapsed, |n| n.started.into_std());
    let mut r = AttemptRecord {
        span_id: note.as_ref().map_or_else(new_span_id, |n| hex_lower(&n.span_id.to_be_bytes())),
        route: route.name.clone(),
        target: step.target,
        provider: target.provider.clone(),
        provider_kind: kind.to_string(),
        model: note
            .as_ref()
            .map(|n| n.model.clone())
            .filter(|m| !m.is_empty())
            .or_else(|| target.model.clone())
            .unwrap_or_default(),
        model_version: note.as_ref().and_then(|n| n.model_version.clone()),
        start_offset_ms: ms(started.saturating_duration_since(request_start)),
        latency_ms: ms(ended.elapsed),
        queue_ms: note.as_ref().map_or(0.0, |n| ms(n.queue)),
        result: ended.result.to_string(),
        error: ended.error,
        cost_usd: ended.cost_usd,
        role: role.to_string(),
        evaluations: Vec::new(),
        endpoint_host,
    };
    if let Some(n) = note {
        r.evaluations = n
            .verdicts
            .iter()
            .zip(n.verdict_images.iter().chain(std::iter::repeat(&0)))
            .map(|(v, &image)| EvaluationRecord {
                image,
                evaluator: v.evaluator.to_string(),
                score: v.score,
                verdict: v.verdict.label().to_string(),
                reason: v.reason.clone(),
            })
            .collect();
    }
    r
}

/// A mirror's record: its one attempt (role `mirror`), with the candidate's verdicts; the
/// decision says how the candidate did (`pass`, or `error` for a failed or rejected attempt),
/// nothing was sent to a client (status 0).
pub fn mirror_attempt(
    rec: &mut TraceRecord,
    policy: &Policy,
    step: crate::routing::Step,
    latency: std::time::Duration,
    result: &Result<crate::providers::Generation, ProviderError>,
    notes: Vec<AttemptNote>,
    cost: Option<f64>,
) {
    let attempt = crate::routing::AttemptRecord {
        step,
        hedge: false,
        elapsed: latency,
        result: match result {
            Ok(_) => Ok(()),
            Err(e) => Err(ProviderError::Other(error_text(e, rec.record_prompt == RecordPrompt::Full.name()))),
        },
    };
    let label = match result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    let start = notes.first().map_or_else(Instant::now, |n| n.started.into_std());
    let outcome = PlanOutcome {
        attempts: vec![attempt],
        success: None,
        deadline_exceeded: false,
        hedges_started: 0,
        won_by_hedge: false,
    };
    attempts(rec, policy, &outcome, notes, start, false, &[cost]);
    if let Some(a) = rec.attempts.first_mut() {
        a.role = "mirror".to_string();
        a.result = label.to_string();
    }
    rec.decision = if result.is_ok() { "pass" } else { "error" }.to_string();
    rec.outcome = label.to_string();
    rec.duration_ms = ms(latency);
    rec.cost_usd = cost;
}

/// An attempt's failure as recorded (at most 1000 characters): never a rejected request's
/// body (which may echo what it was sent), and what the provider wrote only when the route
/// keeps the prompt (`full`): a provider's message may quote it.
fn error_text(e: &ProviderError, full: bool) -> String {
    match e {
        ProviderError::Rejected { status, .. } => format!("upstream rejected the request with {status}"),
        other if full => other.to_string().chars().take(1000).collect(),
        other => other.text_without_provider_message().chars().take(1000).collect(),
    }
}

/// The winner's generation settings, and the images as sent (digests computed later by the
/// writer, when `digests`).
pub fn images(rec: &mut TraceRecord, st: &Settings, sent: Vec<Sent>, digests: bool) {
    rec.generation = Some(GenerationRecord {
        seed: st.seed,
        sampler: st.sampler.clone(),
        steps: st.steps,
        guidance: st.guidance,
        model_version: st.model.clone(),
    });
    for (index, s) in sent.into_iter().enumerate() {
        if !digests {
            // Without digests the size is still known: the bytes', or the base64 text's.
            let size = s.bytes.as_ref().map(|b| b.len() as u64).or_else(|| {
                s.base64.as_ref().map(|b| {
                    let tail = b.slice(b.len().saturating_sub(2)..b.len()).to_bytes();
                    let pad = tail.iter().filter(|&&c| c == b'=').count();
                    (b.len() / 4 * 3).saturating_sub(pad) as u64
                })
            });
            rec.images.push(ImageRecord { index, sha256: None, bytes: size, url: s.url, c2pa_manifest: None });
            continue;
        }
        rec.images.push(ImageRecord { index, sha256: None, bytes: None, url: s.url, c2pa_manifest: None });
        if let Some(b) = s.bytes {
            rec.pending_images.push((index, PendingImage::Raw(b)));
        } else if let Some(b) = s.base64 {
            rec.pending_images.push((index, PendingImage::Base64(b)));
        }
    }
}

/// Each returned image's C2PA manifest label, parallel to the images (`None`: unsigned).
pub fn manifests(rec: &mut TraceRecord, labels: Vec<Option<String>>) {
    for (image, label) in rec.images.iter_mut().zip(labels) {
        image.c2pa_manifest = label;
    }
}

/// Closes the record: the status, decision and outcome sent, the error code, the time taken
/// and the total cost.
pub fn finish(
    rec: &mut TraceRecord,
    status: u16,
    decision: &str,
    outcome: &str,
    error_code: Option<&str>,
    elapsed_ms: f64,
    cost: Option<f64>,
) {
    rec.status = status;
    rec.decision = decision.to_string();
    rec.outcome = outcome.to_string();
    rec.error_code = error_code.map(str::to_string);
    rec.duration_ms = elapsed_ms;
    rec.cost_usd = cost;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_prompt_decides_what_is_kept() {
        let p = "a red fox".to_string();
        let digest = "5d5ab3d1aa5d1a4ac3c6d1b2f4fe39fd9d0d9d86a2b1d32a1fdcbc8e4b2e0b0c".len();
        let (text, sha) = recorded(RecordPrompt::Full, Some(&p));
        assert_eq!(text.as_deref(), Some("a red fox"));
        assert_eq!(sha.as_ref().map(String::len), Some(digest));
        let (text, sha2) = recorded(RecordPrompt::Sha256, Some(&p));
        assert_eq!((text, sha2), (None, sha));
        assert_eq!(recorded(RecordPrompt::None, Some(&p)), (None, None));
    }

    #[test]
    fn durations_are_milliseconds_without_float_noise() {
        use std::time::Duration;
        assert_eq!(ms(Duration::from_nanos(621)).to_string(), "0.000621");
        assert_eq!(ms(Duration::from_nanos(7_432_262)).to_string(), "7.432262");
        assert_eq!(ms(Duration::from_secs(2)), 2000.0);
    }

    /// Cohort headers are read as UTF-8; bytes that are not UTF-8 are kept as U+FFFD.
    #[test]
    fn cohort_headers_beyond_ascii_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(COHORT, http::HeaderValue::from_bytes(" bêta ".as_bytes()).unwrap());
        h.insert(ASSET_TYPE, http::HeaderValue::from_bytes(b"x\xffy").unwrap());
        h.insert(PROMPT_TEMPLATE, http::HeaderValue::from_static("  "));
        assert_eq!(cohort_fields(&h), [Some("bêta".to_string()), None, Some("x\u{fffd}y".to_string())]);
        h.insert(COHORT, http::HeaderValue::from_bytes("é".repeat(300).as_bytes()).unwrap());
        assert_eq!(cohort_fields(&h)[0].as_ref().map(|v| v.chars().count()), Some(MAX_FIELD_CHARS));
    }

    /// What a provider wrote is recorded only where the prompt is: it may quote it.
    #[test]
    fn provider_text_is_recorded_only_when_the_prompt_is() {
        use http::StatusCode;
        let quoting = [
            ProviderError::ContentFiltered("Prompt: my secret words".into()),
            ProviderError::Status {
                status: StatusCode::BAD_GATEWAY,
                message: "my secret words".into(),
                retry_after: None,
            },
            ProviderError::Account {
                status: StatusCode::FORBIDDEN,
                provider_wide: true,
                message: "no access for my secret words".into(),
            },
        ];
        for e in &quoting {
            assert!(error_text(e, true).contains("my secret words"), "{e}");
            let kept = error_text(e, false);
            assert!(!kept.contains("secret"), "{kept}");
            assert!(kept.contains(crate::providers::PROVIDER_TEXT_WITHHELD), "{kept}");
        }
        let status = error_text(&quoting[1], false);
        assert!(status.starts_with("upstream answered 502 Bad Gateway"), "{status}");
        // The gateway's own words stay, and a rejected request's body is never kept.
        let timeout = ProviderError::Timeout;
        assert_eq!(error_text(&timeout, false), "timed out");
        let rejected = ProviderError::Rejected { status: StatusCode::BAD_REQUEST, body: "my secret words".into() };
        assert_eq!(error_text(&rejected, true), "upstream rejected the request with 400 Bad Request");
    }

    #[test]
    fn made_trace_ids_are_time_ordered_with_random_low_bits() {
        use std::time::Duration;
        // 2026-12-06T00:00:00.123Z = 1_796_515_200_123 ms = 0x01a2_48a6_7c7b.
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_515_200_123);
        let id = new_trace_id(t);
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        assert_eq!(&id[..12], format!("{:012x}", 1_796_515_200_123u64));
        // One millisecond later sorts after, whatever the random part.
        let later = t + Duration::from_millis(1);
        for _ in 0..1000 {
            assert!(new_trace_id(later) > new_trace_id(t));
        }
        // The low 80 bits are random: ids of one millisecond differ, and their right-most 7
        // bytes (W3C level 2's random part) are not all the same.
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_trace_id(t)).collect();
        assert_eq!(ids.len(), 1000);
        let tails: std::collections::HashSet<&str> = ids.iter().map(|i| &i[18..]).collect();
        assert_eq!(tails.len(), 1000);
        // Before the epoch (a clock gone wrong): still a valid, non-zero id.
        let early = new_trace_id(SystemTime::UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(&early[..12], "000000000000");
        assert_ne!(early, "0".repeat(32));
    }

    #[test]
    fn ids_and_digests_are_lowercase_zero_padded_hex() {
        assert_eq!(hex_lower(&[]), "");
        assert_eq!(hex_lower(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex_lower(&0x00f0_67aa_0ba9_02b7u64.to_be_bytes()), "00f067aa0ba902b7");
        // The digest of the prompt, as `sha256sum` prints it.
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        for _ in 0..100 {
            let span = new_span_id();
            assert_eq!(span.len(), 16);
            assert_ne!(span, "0".repeat(16));
            assert!(span.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{span}");
        }
    }

    #[test]
    fn fields_are_cut_at_a_character_boundary() {
        assert_eq!(cut("banner", 256), "banner");
        assert_eq!(cut("banner", 3), "ban");
        assert_eq!(cut("", 3), "");
        // Three characters of two bytes each: 6 bytes, over a limit of 4 characters in bytes
        // but not in characters.
        assert_eq!(cut("ééé", 4), "ééé");
        assert_eq!(cut("ééé", 2), "éé");
        assert_eq!(cut(&"ü".repeat(300), MAX_FIELD_CHARS).chars().count(), MAX_FIELD_CHARS);
        // Text from requests in log lines: no line breaks, NULs or bidi controls left.
        assert!(matches!(crate::log_safe("plain ü text"), std::borrow::Cow::Borrowed("plain ü text")));
        assert_eq!(
            crate::log_safe("ACME\r\nforged\0 \u{202e}evil\u{2028}"),
            "ACME\\u{d}\\u{a}forged\\u{0} \\u{202e}evil\\u{2028}"
        );
    }

    #[test]
    fn log_lines_keep_only_the_formatters_colours() {
        assert_eq!(crate::log_line_safe("url: x\r\nX-Injected: 1", false), "url: x\\u{d}\\u{a}X-Injected: 1");
        assert_eq!(
            crate::log_line_safe(
                "\u{1b}[2m2026\u{1b}[0m \u{1b}[32mINFO\u{1b}[0m x\u{1b}]0;title\u{7}\u{1b}[1;31m\u{202e}",
                true
            ),
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32mINFO\u{1b}[0m x\\u{1b}]0;title\\u{7}\u{1b}[1;31m\\u{202e}"
        );
        assert_eq!(crate::log_line_safe("\u{1b}[32mINFO", false), "\\u{1b}[32mINFO");
        assert_eq!(crate::log_line_safe("cut \u{1b}[12", true), "cut \\u{1b}[12");
    }
}
