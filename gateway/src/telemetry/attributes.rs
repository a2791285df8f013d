//! Every attribute, event and value name the exported spans use, in one place.
//!
//! `gen_ai.*` names follow the OpenTelemetry GenAI semantic conventions (development status,
//! `semantic-conventions-genai` registry); `gen_ai.image.*` extends them for image parameters,
//! which the conventions do not define yet (they reserve `gen_ai.output.{type}.*` for later);
//! `acc.*` are the gateway's own.

// ---- GenAI conventions ----

/// Required on every GenAI span.
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
/// The conventions define no image-generation operation (their list: `chat`, `generate_content`,
/// `text_completion`, `embeddings`, `retrieval`, `create_agent`, `invoke_agent`, `execute_tool`,
/// `invoke_workflow`, `plan`) and say an instrumentation SHOULD use an applicable predefined
/// value; `generate_content` ("multimodal content generation") is the one that applies to
/// generations, edits and variations alike. The OpenAI operation itself is in [`ACC_OPERATION`].
pub const OPERATION_GENERATE_CONTENT: &str = "generate_content";
/// Requested output modality.
pub const GEN_AI_OUTPUT_TYPE: &str = "gen_ai.output.type";
pub const OUTPUT_TYPE_IMAGE: &str = "image";
/// The model the client asked for (the request's `model`).
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
/// The request's `n`.
pub const GEN_AI_REQUEST_CHOICE_COUNT: &str = "gen_ai.request.choice.count";
/// The request's `seed`, when it sent one.
pub const GEN_AI_REQUEST_SEED: &str = "gen_ai.request.seed";
/// The provider, as the conventions' well-known value where one exists (see
/// [`provider_name`](super::spans::provider_name)).
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
/// The model (version) that generated the images.
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";

/// Event on an attempt's client span, one per evaluator verdict on one image.
pub const GEN_AI_EVALUATION_RESULT: &str = "gen_ai.evaluation.result";
/// The evaluator (`sanity`, `safety`, `text`, `adherence`).
pub const GEN_AI_EVALUATION_NAME: &str = "gen_ai.evaluation.name";
/// 0..1, 1 is best.
pub const GEN_AI_EVALUATION_SCORE_VALUE: &str = "gen_ai.evaluation.score.value";
/// The verdict: `pass`, `fail` or `error`.
pub const GEN_AI_EVALUATION_SCORE_LABEL: &str = "gen_ai.evaluation.score.label";
/// The evaluator's reason.
pub const GEN_AI_EVALUATION_EXPLANATION: &str = "gen_ai.evaluation.explanation";

// ---- Image parameters (the request's, as the client sent them) ----

/// The prompt; only when the route records it in full (`record_prompt = "full"`).
pub const GEN_AI_IMAGE_PROMPT: &str = "gen_ai.image.prompt";
/// The negative prompt; under the same rule as the prompt.
pub const GEN_AI_IMAGE_NEGATIVE_PROMPT: &str = "gen_ai.image.negative_prompt";
pub const GEN_AI_IMAGE_SIZE: &str = "gen_ai.image.size";
pub const GEN_AI_IMAGE_QUALITY: &str = "gen_ai.image.quality";
pub const GEN_AI_IMAGE_STYLE: &str = "gen_ai.image.style";
pub const GEN_AI_IMAGE_STEPS: &str = "gen_ai.image.steps";
pub const GEN_AI_IMAGE_GUIDANCE_SCALE: &str = "gen_ai.image.guidance_scale";
pub const GEN_AI_IMAGE_SEED: &str = "gen_ai.image.seed";
/// The request's `n`.
pub const GEN_AI_IMAGE_COUNT: &str = "gen_ai.image.count";
/// The GPT image models' parameters (OpenAI Images API reference), as the client sent them:
/// `background` (`transparent`, `opaque`, `auto`).
pub const GEN_AI_IMAGE_BACKGROUND: &str = "gen_ai.image.background";
/// `output_format` (`png`, `jpeg`, `webp`).
pub const GEN_AI_IMAGE_OUTPUT_FORMAT: &str = "gen_ai.image.output_format";
/// `output_compression`, 0–100 (%).
pub const GEN_AI_IMAGE_OUTPUT_COMPRESSION: &str = "gen_ai.image.output_compression";
/// `moderation` (`low`, `auto`).
pub const GEN_AI_IMAGE_MODERATION: &str = "gen_ai.image.moderation";
/// `input_fidelity` on edits (`high`, `low`).
pub const GEN_AI_IMAGE_INPUT_FIDELITY: &str = "gen_ai.image.input_fidelity";
/// `stream` (boolean), when the client sent it.
pub const GEN_AI_IMAGE_STREAM: &str = "gen_ai.image.stream";
/// `partial_images`, 0–3.
pub const GEN_AI_IMAGE_PARTIAL_IMAGES: &str = "gen_ai.image.partial_images";

// ---- General conventions ----

/// The failure: an attempt's result label, or the answer's error code (outcome when none).
pub const ERROR_TYPE: &str = "error.type";
/// The provider endpoint's host.
pub const SERVER_ADDRESS: &str = "server.address";
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_ROUTE: &str = "http.route";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_VERSION: &str = "service.version";

// ---- ACC's own ----

/// `"primary"` or `"mirror"`.
pub const ACC_KIND: &str = "acc.kind";
/// `"generations"`, `"edits"` or `"variations"`.
pub const ACC_OPERATION: &str = "acc.operation";
/// The matched route.
pub const ACC_ROUTE: &str = "acc.route";
pub const ACC_TENANT: &str = "acc.tenant";
/// The client key's name (never the key).
pub const ACC_KEY_NAME: &str = "acc.key_name";
/// `x-acc-cohort`, as sent.
pub const ACC_COHORT: &str = "acc.cohort";
/// `x-acc-prompt-template` (`name@version`), as sent.
pub const ACC_PROMPT_TEMPLATE: &str = "acc.prompt_template";
/// `x-acc-asset-type`, as sent.
pub const ACC_ASSET_TYPE: &str = "acc.asset_type";
/// `pass`, `flagged`, `blocked` or `error` (as `x-acc-decision`).
pub const ACC_DECISION: &str = "acc.decision";
/// The outcome as counted in `acc_requests_total{outcome}`.
pub const ACC_OUTCOME: &str = "acc.outcome";
/// Served by the route's canary.
pub const ACC_CANARY: &str = "acc.canary";
/// The route's `record_prompt` (`full`, `sha256`, `none`).
pub const ACC_RECORD_PROMPT: &str = "acc.record_prompt";
/// Hex SHA-256 of the prompt (when `record_prompt` is `full` or `sha256`).
pub const ACC_PROMPT_SHA256: &str = "acc.prompt_sha256";
/// USD at the providers' prices: the request's total on the server span, the attempt's on a
/// client span.
pub const ACC_COST_USD: &str = "acc.cost_usd";
/// How many images were returned.
pub const ACC_IMAGE_COUNT: &str = "acc.image.count";
/// The image an evaluation event is about (index in the attempt's answer).
pub const ACC_IMAGE_INDEX: &str = "acc.image.index";
/// What the winning provider says it used.
pub const ACC_GENERATION_SEED: &str = "acc.generation.seed";
pub const ACC_GENERATION_SAMPLER: &str = "acc.generation.sampler";
pub const ACC_GENERATION_STEPS: &str = "acc.generation.steps";
pub const ACC_GENERATION_GUIDANCE: &str = "acc.generation.guidance";
pub const ACC_GENERATION_MODEL_VERSION: &str = "acc.generation.model_version";
/// `primary`, `fallback`, `hedge`, `canary` or `mirror`.
pub const ACC_ATTEMPT_ROLE: &str = "acc.attempt.role";
/// `ok` or the failure label (as `acc_attempts_total{result}`).
pub const ACC_ATTEMPT_RESULT: &str = "acc.attempt.result";
/// The provider's name in the policy.
pub const ACC_ATTEMPT_PROVIDER: &str = "acc.attempt.provider";
/// The provider kind as the policy spells it (`azure_openai`, ...).
pub const ACC_ATTEMPT_PROVIDER_KIND: &str = "acc.attempt.provider_kind";
/// The model asked of the provider (the target's model).
pub const ACC_ATTEMPT_MODEL: &str = "acc.attempt.model";
/// The route owning the target, and the target's index in it.
pub const ACC_ATTEMPT_ROUTE: &str = "acc.attempt.route";
pub const ACC_ATTEMPT_TARGET: &str = "acc.attempt.target";
/// Time waiting for the provider's concurrency slot, ms.
pub const ACC_ATTEMPT_QUEUE_MS: &str = "acc.attempt.queue_ms";
/// On a mirror's span link: what the linked trace is (`"primary"`).
pub const ACC_LINK_KIND: &str = "acc.link.kind";
