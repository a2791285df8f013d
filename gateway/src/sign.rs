//! The provenance phase: the winning answer's images signed with the policy's `[provenance]`
//! credentials (see [`crate::provenance`]), after the attempts, their evaluation and the
//! decision, and before the answer is rendered, held for review, or kept for an idempotent
//! replay. Evaluators saw the provider's bytes; the client, the artifact store, the review
//! queue and replays get the signed ones. Mirror copies never come here.

use bytes::Bytes;
use http::StatusCode;

use crate::app::App;
use crate::error::ApiError;
use crate::policy::{OnProvenanceError, Policy, ProvenanceSettings, RecordPrompt};
use crate::provenance::{Evaluation, Facts, Input};
use crate::providers::{Generation, Image};
use crate::request::GenerationRequest;
use crate::routing::Step;

/// What the request path knows about the answer being signed.
pub struct Origin<'a> {
    pub trace_id: &'a str,
    /// Index of the route that matched the request.
    pub route: usize,
    /// The target whose answer is returned.
    pub winner: Step,
    /// The model alias the request asked for (or the default model).
    pub alias: &'a str,
}

/// Signs every image of `generation` in place (each becomes `Image::Raw` with its media type),
/// on the blocking pool. Returns each image's manifest label (`None`: sent unsigned under
/// `fail_open`), or the error answer under `fail_closed`. Counts
/// `acc_provenance_total{route,result}` per image.
pub async fn sign(
    app: &App,
    policy: &Policy,
    settings: &ProvenanceSettings,
    origin: Origin<'_>,
    req: &GenerationRequest,
    generation: &mut Generation,
) -> Result<Vec<Option<String>>, ApiError> {
    let route = &policy.routes[origin.route];
    let target = &policy.routes[origin.winner.route].targets[origin.winner.target];
    let kind = policy.providers.get(&target.provider).map_or("unknown", |p| p.kind.name());
    let prompt = (settings.include_prompt && route.record_prompt == RecordPrompt::Full).then(|| req.prompt.clone());
    let base = Facts {
        trace_id: origin.trace_id.to_string(),
        route: route.name.clone(),
        provider: target.provider.clone(),
        provider_kind: kind.to_string(),
        model: Some(target.model.clone().unwrap_or_else(|| origin.alias.to_string())).filter(|m| !m.is_empty()),
        model_version: generation.settings.model.clone(),
        evaluations: Vec::new(),
        prompt,
    };
    let mut jobs = Vec::with_capacity(generation.images.len());
    for (i, image) in generation.images.iter().enumerate() {
        // `Bytes` clones: the payloads are decoded, when base64, on the blocking thread below.
        let image = image.clone();
        let mut facts = base.clone();
        facts.evaluations = generation
            .verdicts
            .iter()
            .zip(&generation.verdict_images)
            .filter(|(_, &at)| at == i)
            .map(|(v, _)| Evaluation {
                evaluator: v.evaluator.to_string(),
                verdict: v.verdict.label().into(),
                score: v.score,
            })
            .collect();
        jobs.push((image, facts));
    }
    let inputs = inputs_of(req);
    let creds = settings.credentials.clone();
    let results = tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .map(|(image, facts)| {
                let bytes = match image {
                    // Validated when the provider's answer was parsed.
                    Image::Base64(b) => Bytes::from(b.decode_base64().unwrap_or_default()),
                    Image::Raw { bytes, .. } => bytes,
                    // The pipeline asks for bytes whenever provenance is on; nothing to sign otherwise.
                    Image::Url(_) => Bytes::new(),
                };
                creds.sign(&bytes, &facts, &inputs).map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_else(|e| vec![Err(format!("signing task failed: {e}"))]);
    let counter = |result: &str| app.metrics.provenance.with_label_values(&[route.name.as_str(), result]);
    let mut labels = Vec::with_capacity(results.len());
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(signed) => {
                counter("signed").inc();
                if let Some(slot) = generation.images.get_mut(i) {
                    *slot = Image::Raw { bytes: Bytes::from(signed.bytes), mime: signed.mime };
                }
                labels.push(Some(signed.manifest));
            }
            Err(e) if settings.on_error == OnProvenanceError::FailOpen => {
                counter("unsigned").inc();
                tracing::warn!(trace_id = origin.trace_id, route = %route.name, image = i, "image sent unsigned (on_provenance_error = fail_open): {e}");
                labels.push(None);
            }
            Err(e) => {
                counter("refused").inc();
                tracing::error!(trace_id = origin.trace_id, route = %route.name, image = i, "answer refused (on_provenance_error = fail_closed): {e}");
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    "provenance_failed",
                    "the generated image could not be signed with its provenance manifest, and this gateway does not return unsigned images",
                ));
            }
        }
    }
    Ok(labels)
}

/// The most characters of an input's file name kept in its ingredient's title.
const MAX_TITLE_CHARS: usize = 200;

/// An edit's or variation's input images (images, then the mask) as [`Input`]s: each titled
/// with its form field and file name (control characters dropped, cut to
/// [`MAX_TITLE_CHARS`]). Empty for a generation.
pub fn inputs_of(req: &GenerationRequest) -> Vec<Input> {
    req.images
        .iter()
        .chain(req.mask.iter())
        .map(|p| {
            let name: String = p.filename.chars().filter(|c| !c.is_control()).take(MAX_TITLE_CHARS).collect();
            let title = if name.is_empty() { p.field.clone() } else { format!("{}: {name}", p.field) };
            Input::new(title, p.bytes.clone())
        })
        .collect()
}
