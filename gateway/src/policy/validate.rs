//! Validation of each part of a policy on its own: every field is checked and converted into the
//! runtime types of [`super::types`], and every problem is pushed onto `errors` as
//! `file: path.to.field: what is wrong`, so one run reports them all. Checks that relate one part
//! to another (a target naming a provider, a fallback naming a route) are in [`super::xref`],
//! called from here at the point the reference is read, so errors keep the order of the files.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::eval::classifier::ClassifierSpec;
use crate::eval::clip::ClipConfig;

use super::raw::{RawClassifier, RawFile, RawHedge, RawKey, RawPerImage, RawProvider, RawRoute, RawServer, RawTenant};
use super::types::{
    AnswerFormat, ApiKey, Canary, Concurrency, Connection, EvalAction, EvalPolicy, FetchPolicy, Hedge, Matcher, Mirror,
    ParamAction, Price, PriceTable, ProviderKind, ProviderSpec, RecordPrompt, Regeneration, Route, ServerSettings,
    SizePrice, StreamAction, Target, TargetRole, TenantLimits, TlsFiles, UpstreamFormat, UrlMode, AVAILABLE_EVALUATORS,
};
use super::xref::Names;

/// Provider kinds the design names. Only some have an adapter in this build; the others are
/// refused with a clear message rather than accepted and silently ignored.
const KNOWN_KINDS: &[&str] =
    &["openai", "azure_openai", "vertex_imagen", "stability", "fal", "replicate", "a1111", "builtin"];
const IMPLEMENTED_KINDS: &[&str] =
    &["openai", "azure_openai", "vertex_imagen", "stability", "fal", "replicate", "a1111", "builtin"];

/// Custom safety classifiers by name, shared with the evaluators that run them.
pub(super) type Classifiers = BTreeMap<String, Arc<ClassifierSpec>>;

/// The sections of a policy that stand alone, gathered across its files (each defined once).
pub(super) struct Sections<'a> {
    /// The model alias used when a request names none, and the file that set it.
    pub(super) default_model: Option<(String, &'a str)>,
    /// `[server]`, if a file set it.
    pub(super) server: Option<ServerSettings>,
    /// API keys by the SHA-256 digest of the key.
    pub(super) keys: HashMap<[u8; 32], ApiKey>,
    /// Limits by tenant name.
    pub(super) tenants: BTreeMap<String, TenantLimits>,
    /// The providers whose definitions are valid, by name.
    pub(super) providers: BTreeMap<String, ProviderSpec>,
}

/// `default_model`, `[server]`, `[[keys]]`, `[tenants.*]` and `[providers.*]`, file by file.
pub(super) fn sections<'a>(
    parsed: &'a [(&'a str, RawFile)],
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Sections<'a> {
    let mut default_model: Option<(String, &str)> = None;
    let mut server: Option<(ServerSettings, &str)> = None;
    let mut keys = HashMap::new();
    let mut tenants = BTreeMap::new();
    let mut providers = BTreeMap::new();
    let mut provider_file: HashMap<&str, &str> = HashMap::new();

    for (file, raw) in parsed {
        if let Some(m) = &raw.default_model {
            match &default_model {
                Some((_, other)) => errors.push(format!("{file}: default_model: already set in {other}")),
                None => default_model = Some((m.clone(), file)),
            }
        }
        if let Some(s) = &raw.server {
            match &server {
                Some((_, other)) => errors.push(format!("{file}: server: already set in {other}")),
                None => server = Some((validate_server(file, s, errors), file)),
            }
        }
        for (i, k) in raw.keys.iter().enumerate() {
            let at = format!("{file}: keys[{i}]");
            let Some((digest, key)) = validate_key(&at, k, errors) else { continue };
            if keys.insert(digest, key).is_some() {
                errors.push(format!("{at}.sha256: duplicate key digest"));
            }
        }
        for (name, t) in &raw.tenants {
            let at = format!("{file}: tenants.{name}");
            if tenants.contains_key(name) {
                errors.push(format!("{at}: tenant \"{name}\" is already configured"));
                continue;
            }
            tenants.insert(name.clone(), validate_tenant(&at, t, errors));
        }
        for (name, p) in &raw.providers {
            let at = format!("{file}: providers.{name}");
            check_name(&at, name, errors);
            if let Some(other) = provider_file.get(name.as_str()) {
                errors.push(format!("{at}: provider \"{name}\" is already defined in {other}"));
                continue;
            }
            provider_file.insert(name, file);
            if let Some(spec) = validate_provider(&at, name, p, errors, warnings) {
                providers.insert(name.clone(), spec);
            }
        }
    }
    Sections { default_model, server: server.map(|s| s.0), keys, tenants, providers }
}

/// One `[[keys]]` entry and its digest; `None` when the digest is unreadable.
fn validate_key(at: &str, k: &RawKey, errors: &mut Vec<String>) -> Option<([u8; 32], ApiKey)> {
    let digest = match hex::decode(k.sha256.trim()) {
        Ok(d) if d.len() == 32 => {
            let mut a = [0u8; 32];
            a.copy_from_slice(&d);
            a
        }
        _ => {
            errors.push(format!("{at}.sha256: expected 64 hex characters (the SHA-256 of the key)"));
            return None;
        }
    };
    if k.tenant.trim().is_empty() {
        errors.push(format!("{at}.tenant: must not be empty"));
    }
    for (j, t) in k.tags.iter().enumerate() {
        check_name(&format!("{at}.tags[{j}]"), t, errors);
    }
    for (field, v) in [("requests_per_minute", k.requests_per_minute), ("images_per_minute", k.images_per_minute)] {
        if v == Some(0) {
            errors.push(format!("{at}.{field}: must be greater than 0 (leave it out for no limit)"));
        }
    }
    let key = ApiKey {
        tenant: k.tenant.clone(),
        tags: k.tags.clone(),
        id: hex::encode(&digest[..6]),
        requests_per_minute: k.requests_per_minute,
        images_per_minute: k.images_per_minute,
    };
    Some((digest, key))
}

fn validate_tenant(at: &str, t: &RawTenant, errors: &mut Vec<String>) -> TenantLimits {
    for (field, v) in [
        ("requests_per_minute", t.requests_per_minute),
        ("images_per_minute", t.images_per_minute),
        ("max_in_flight", t.max_in_flight),
    ] {
        if v == Some(0) {
            errors.push(format!("{at}.{field}: must be greater than 0 (leave it out for no limit)"));
        }
    }
    if let Some(v) = t.spend_usd_per_day {
        if !(v.is_finite() && v >= 0.0) {
            errors.push(format!("{at}.spend_usd_per_day: must be a number >= 0"));
        }
    }
    TenantLimits {
        requests_per_minute: t.requests_per_minute,
        images_per_minute: t.images_per_minute,
        spend_usd_per_day: t.spend_usd_per_day,
        max_in_flight: t.max_in_flight,
    }
}

/// `[classifiers.*]` of every file; "nudenet" and names used twice are refused.
pub(super) fn classifiers(
    parsed: &[(&str, RawFile)],
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Classifiers {
    let mut classifiers = Classifiers::new();
    for (file, raw) in parsed {
        for (name, c) in &raw.classifiers {
            let at = format!("{file}: classifiers.{name}");
            check_name(&at, name, errors);
            if name == "nudenet" || classifiers.contains_key(name) {
                errors.push(format!("{at}: the name \"{name}\" is taken"));
                continue;
            }
            if let Some(spec) = validate_classifier(&at, name, c, errors, warnings) {
                classifiers.insert(name.clone(), Arc::new(spec));
            }
        }
    }
    classifiers
}

/// `[clip]`, set in one file at most; relative model paths are taken from the models directory.
pub(super) fn clip(
    parsed: &[(&str, RawFile)],
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<Arc<ClipConfig>> {
    let mut clip: Option<Arc<ClipConfig>> = None;
    for (file, raw) in parsed {
        if let Some(c) = &raw.clip {
            if clip.is_some() {
                errors.push(format!("{file}: clip: already set in another file"));
                continue;
            }
            let resolve = |p: &str| {
                let p = std::path::PathBuf::from(p);
                if p.is_absolute() {
                    p
                } else {
                    crate::eval::onnx::models_dir().join(p)
                }
            };
            let mut cfg = ClipConfig::new(resolve(&c.image_model), resolve(&c.text_model));
            if let Some(s) = c.input_size {
                if !(1..=4096).contains(&s) {
                    errors.push(format!("{file}: clip.input_size: must be between 1 and 4096"));
                }
                cfg.input_size = s;
            }
            for m in [&cfg.image_model, &cfg.text_model] {
                if !m.is_file() {
                    warnings.push(format!(
                        "{file}: clip: {} does not exist; CLIP clauses get an error verdict",
                        m.display()
                    ));
                }
            }
            clip = Some(Arc::new(cfg));
        }
    }
    clip
}

/// One `[[routes]]` entry at `at` (`file: routes[i]`); the names it refers to are looked up in
/// `names`, the classifiers and CLIP encoders it uses in `classifiers` and `clip`.
pub(super) fn route(
    at: &str,
    r: &RawRoute,
    names: &Names<'_>,
    classifiers: &Classifiers,
    clip: Option<&Arc<ClipConfig>>,
    errors: &mut Vec<String>,
) -> Route {
    check_name(&format!("{at}.name"), &r.name, errors);
    if r.matcher.model.as_deref() == Some("") {
        errors.push(format!("{at}.match.model: must not be empty"));
    }
    for (j, t) in r.matcher.key_tags.iter().enumerate() {
        check_name(&format!("{at}.match.key_tags[{j}]"), t, errors);
    }
    if r.targets.is_empty() {
        errors.push(format!("{at}.targets: a route needs at least one target"));
    }
    let mut targets = Vec::new();
    for (j, t) in r.targets.iter().enumerate() {
        names.provider(&format!("{at}.targets[{j}]"), &t.provider, errors);
        if t.model.as_deref() == Some("") {
            errors.push(format!("{at}.targets[{j}].model: must not be empty"));
        }
        targets.push(Target {
            provider: t.provider.clone(),
            model: t.model.clone(),
            weight: t.weight.unwrap_or(1),
            role: TargetRole::Serve,
        });
    }
    if !targets.is_empty() && targets.iter().all(|t| t.weight == 0) {
        errors.push(format!("{at}.targets: weights sum to zero"));
    }
    let fallbacks = names.fallbacks(at, r, errors);
    let attempt_timeout = positive_ms(&format!("{at}.attempt_timeout_ms"), r.attempt_timeout_ms, 60_000, errors);
    let deadline = positive_ms(&format!("{at}.deadline_ms"), r.deadline_ms, 120_000, errors);
    if r.attempt_timeout_ms.is_some_and(|a| a > 0) && r.deadline_ms != Some(0) && deadline < attempt_timeout {
        errors.push(format!(
            "{at}.deadline_ms: {} ms is below attempt_timeout_ms ({} ms): the request would end before its first attempt may",
            deadline.as_millis(),
            attempt_timeout.as_millis()
        ));
    }
    let url_mode = match r.url_mode.as_deref() {
        None | Some("gateway") => UrlMode::Gateway,
        Some("provider") => UrlMode::Provider,
        Some(other) => {
            errors.push(format!("{at}.url_mode: unknown mode \"{other}\" (expected \"gateway\" or \"provider\")"));
            UrlMode::Gateway
        }
    };
    let default_response_format = match r.default_response_format.as_deref() {
        None => None,
        Some("url") => Some(AnswerFormat::Url),
        Some("b64_json") => Some(AnswerFormat::B64Json),
        Some(other) => {
            errors.push(format!(
                "{at}.default_response_format: unknown format \"{other}\" (expected \"url\" or \"b64_json\")"
            ));
            None
        }
    };
    let eval = validate_eval(at, r, classifiers, clip, errors);
    let review = super::review::route(at, r, &eval, errors);
    let record_prompt = match r.record_prompt.as_deref() {
        None | Some("full") => RecordPrompt::Full,
        Some("sha256") => RecordPrompt::Sha256,
        Some("none") => RecordPrompt::None,
        Some(other) => {
            errors.push(format!(
                "{at}.record_prompt: unknown value \"{other}\" (expected \"full\", \"sha256\" or \"none\")"
            ));
            RecordPrompt::None
        }
    };
    let regeneration = validate_regeneration(at, r, errors);
    let health = validate_health(at, r, errors);
    let hedge = r.hedge.as_ref().and_then(|h| validate_hedge(at, h, errors));
    let (mirrors, canary) = validate_candidates(at, r, &mut targets, names, errors);
    Route {
        name: r.name.clone(),
        matcher: Matcher {
            model: r.matcher.model.clone(),
            cohort: r.matcher.cohort.clone(),
            key_tags: r.matcher.key_tags.clone(),
        },
        targets,
        fallbacks,
        attempt_timeout,
        deadline,
        url_mode,
        default_response_format,
        eval,
        health,
        hedge,
        mirrors,
        canary,
        record_prompt,
        regeneration,
        review,
    }
}

/// A route's `regeneration_window_secs` (0..=86400) and `regeneration_similarity` ((0, 1]).
fn validate_regeneration(at: &str, r: &RawRoute, errors: &mut Vec<String>) -> Regeneration {
    let d = Regeneration::default();
    let window = match r.regeneration_window_secs {
        None => d.window,
        Some(s) if s <= 86_400 => Duration::from_secs(s),
        Some(s) => {
            errors.push(format!(
                "{at}.regeneration_window_secs: {s} is more than a day (86400); 0 turns implicit detection off"
            ));
            d.window
        }
    };
    let similarity = match r.regeneration_similarity {
        None => d.similarity,
        Some(v) if v > 0.0 && v <= 1.0 => v,
        Some(v) => {
            errors.push(format!("{at}.regeneration_similarity: {v} is not in (0, 1]"));
            d.similarity
        }
    };
    Regeneration { window, similarity }
}

/// `[server]`, with the defaults of [`ServerSettings`] for what is left out.
fn validate_server(file: &str, s: &RawServer, errors: &mut Vec<String>) -> ServerSettings {
    let d = ServerSettings::default();
    let bytes = |field: &str, v: Option<u64>, default: usize, errors: &mut Vec<String>| match v {
        None => default,
        Some(0) => {
            errors.push(format!("{file}: server.{field}: must be greater than 0"));
            default
        }
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
    };
    let public_base_url = s.public_base_url.as_ref().map(|u| u.trim_end_matches('/').to_string());
    if let Some(u) = &public_base_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            errors.push(format!("{file}: server.public_base_url: must start with http:// or https://"));
        }
    }
    ServerSettings {
        max_json_body_bytes: bytes("max_json_body_bytes", s.max_json_body_bytes, d.max_json_body_bytes, errors),
        max_multipart_body_bytes: bytes(
            "max_multipart_body_bytes",
            s.max_multipart_body_bytes,
            d.max_multipart_body_bytes,
            errors,
        ),
        url_ttl: Duration::from_secs(bytes("url_ttl_secs", s.url_ttl_secs, 3600, errors) as u64),
        public_base_url,
        max_in_flight: bytes("max_in_flight", s.max_in_flight, d.max_in_flight, errors),
        idempotency_ttl: Duration::from_secs(bytes(
            "idempotency_ttl_secs",
            s.idempotency_ttl_secs,
            d.idempotency_ttl.as_secs() as usize,
            errors,
        ) as u64),
        idempotency_max_bytes: bytes("idempotency_max_mib", s.idempotency_max_mib, 256, errors).saturating_mul(1 << 20),
        body_timeout: Duration::from_millis(bytes("body_timeout_ms", s.body_timeout_ms, 30_000, errors) as u64),
        max_body_buffer_bytes: bytes("max_body_buffer_mib", s.max_body_buffer_mib, 512, errors).saturating_mul(1 << 20),
        max_answer_buffer_bytes: bytes("max_answer_buffer_mib", s.max_answer_buffer_mib, 1024, errors)
            .saturating_mul(1 << 20),
        idle_timeout: Duration::from_millis(bytes("idle_timeout_ms", s.idle_timeout_ms, 30_000, errors) as u64),
        max_connections: s.max_connections.map(|_| bytes("max_connections", s.max_connections, 1, errors)),
        admin_max_connections: bytes("admin_max_connections", s.admin_max_connections, 256, errors),
        tls: s.tls.as_ref().and_then(|t| {
            let files = TlsFiles { cert_file: t.cert_file.clone().into(), key_file: t.key_file.clone().into() };
            match crate::tls::load(&files.cert_file, &files.key_file) {
                Ok(_) => Some(files),
                Err(e) => {
                    errors.push(format!("{file}: server.tls: {e}"));
                    None
                }
            }
        }),
    }
}

/// One `[providers.NAME]` at `at`; `None` when it has errors (they are in `errors`).
fn validate_provider(
    at: &str,
    name: &str,
    p: &RawProvider,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<ProviderSpec> {
    let before = errors.len();
    if !KNOWN_KINDS.contains(&p.kind.as_str()) {
        errors.push(format!("{at}.kind: unknown kind \"{}\" (expected one of {})", p.kind, KNOWN_KINDS.join(", ")));
        return None;
    }
    if !IMPLEMENTED_KINDS.contains(&p.kind.as_str()) {
        errors.push(format!(
            "{at}.kind: kind \"{}\" has no adapter in this build yet (available: {})",
            p.kind,
            IMPLEMENTED_KINDS.join(", ")
        ));
        return None;
    }
    let timeout = match p.timeout_ms {
        Some(0) => {
            errors.push(format!("{at}.timeout_ms: must be greater than 0"));
            None
        }
        t => t.map(Duration::from_millis),
    };
    let kind = ProviderKind::parse(&p.kind).unwrap_or(ProviderKind::Builtin);
    let conn = validate_connection(at, name, kind, p, errors, warnings);
    let fetch = p.fetch.as_ref().map_or_else(FetchPolicy::default, |f| {
        let d = FetchPolicy::default();
        if f.max_bytes == Some(0) {
            errors.push(format!("{at}.fetch.max_bytes: must be greater than 0"));
        }
        if f.timeout_ms == Some(0) {
            errors.push(format!("{at}.fetch.timeout_ms: must be greater than 0"));
        }
        FetchPolicy {
            allow_http: f.allow_http.unwrap_or(false),
            allow_private: f.allow_private.unwrap_or(false),
            allow_hosts: f.allow_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
            max_bytes: f.max_bytes.map_or(d.max_bytes, |b| usize::try_from(b).unwrap_or(usize::MAX)),
            timeout: f.timeout_ms.map_or(d.timeout, Duration::from_millis),
        }
    });
    let unsupported = match p.unsupported_params.as_deref() {
        None | Some("drop") => ParamAction::Drop,
        Some("reject") => ParamAction::Reject,
        Some(other) => {
            errors
                .push(format!("{at}.unsupported_params: unknown action \"{other}\" (expected \"drop\" or \"reject\")"));
            ParamAction::Drop
        }
    };
    let unsupported_stream = match p.unsupported_stream.as_deref() {
        Some(_) if kind == ProviderKind::OpenAi => {
            errors.push(format!(
                "{at}.unsupported_stream: kind \"openai\" streams itself; the field is for kinds without an image stream"
            ));
            StreamAction::CompletedEvent
        }
        None | Some("completed_event") => StreamAction::CompletedEvent,
        Some("reject") => StreamAction::Reject,
        Some(other) => {
            errors.push(format!(
                "{at}.unsupported_stream: unknown action \"{other}\" (expected \"completed_event\" or \"reject\")"
            ));
            StreamAction::CompletedEvent
        }
    };
    let concurrency = match p.max_concurrency {
        None => {
            for (field, set) in [
                ("max_queue", p.max_queue.is_some()),
                ("queue_timeout_ms", p.queue_timeout_ms.is_some()),
                ("on_queue_full", p.on_queue_full.is_some()),
            ] {
                if set {
                    errors.push(format!("{at}.{field}: needs max_concurrency"));
                }
            }
            None
        }
        Some(0) => {
            errors.push(format!("{at}.max_concurrency: must be greater than 0 (leave it out for no limit)"));
            None
        }
        Some(max) => {
            let reject_when_full = match p.on_queue_full.as_deref() {
                None | Some("fallback") => false,
                Some("reject") => true,
                Some(other) => {
                    errors.push(format!(
                        "{at}.on_queue_full: unknown action \"{other}\" (expected \"fallback\" or \"reject\")"
                    ));
                    false
                }
            };
            let queue_timeout = match p.queue_timeout_ms {
                Some(0) => {
                    errors.push(format!("{at}.queue_timeout_ms: must be greater than 0"));
                    None
                }
                t => t.map(Duration::from_millis),
            };
            Some(Concurrency { max, max_queue: p.max_queue.unwrap_or(max), queue_timeout, reject_when_full })
        }
    };
    let mut breaker = crate::health::BreakerSettings::default();
    if let Some(b) = &p.breaker {
        if let Some(e) = b.enabled {
            breaker.enabled = e;
        }
        match b.consecutive_failures {
            Some(0) => errors.push(format!("{at}.breaker.consecutive_failures: must be greater than 0")),
            Some(n) => breaker.consecutive_failures = n,
            None => {}
        }
        match b.cooldown_ms {
            Some(0) => errors.push(format!("{at}.breaker.cooldown_ms: must be greater than 0")),
            Some(ms) => breaker.cooldown = Duration::from_millis(ms),
            None => {}
        }
        match b.probes {
            Some(0) => errors.push(format!("{at}.breaker.probes: must be greater than 0")),
            Some(n) => breaker.probes = n,
            None => {}
        }
    }
    let max_pause = Duration::from_millis(p.max_pause_ms.unwrap_or(300_000));
    let price = p.price.as_ref().map(|pr| {
        let base = price_table(
            &format!("{at}.price"),
            (pr.per_image_usd.as_ref(), &pr.quality, pr.per_step_usd, pr.per_gpu_second_usd),
            errors,
        );
        let models = pr
            .models
            .iter()
            .map(|(m, t)| {
                let at = format!("{at}.price.models.{m}");
                (
                    m.clone(),
                    price_table(
                        &at,
                        (t.per_image_usd.as_ref(), &t.quality, t.per_step_usd, t.per_gpu_second_usd),
                        errors,
                    ),
                )
            })
            .collect();
        Price { base, models }
    });
    (errors.len() == before).then(|| ProviderSpec {
        name: name.to_string(),
        kind,
        conn,
        fetch,
        unsupported,
        unsupported_stream,
        timeout,
        concurrency,
        breaker,
        max_pause,
        price,
    })
}

/// The price fields shared by a provider's price and a model's: per image, by quality, per
/// step, per GPU-second.
type RawTable<'a> = (Option<&'a RawPerImage>, &'a BTreeMap<String, RawPerImage>, Option<f64>, Option<f64>);

/// One price table at `at`; every price must be a number >= 0 and every size like "1024x1024".
fn price_table(
    at: &str,
    (per_image, quality, per_step, per_gpu): RawTable<'_>,
    errors: &mut Vec<String>,
) -> PriceTable {
    let mut check = |field: &str, v: f64| {
        if !(v.is_finite() && v >= 0.0) {
            errors.push(format!("{at}.{field}: must be a number >= 0"));
        }
        v
    };
    let per_step = per_step.map(|v| check("per_step_usd", v));
    let per_gpu_second = per_gpu.map(|v| check("per_gpu_second_usd", v));
    let sized = |field: &str, raw: &RawPerImage, errors: &mut Vec<String>| {
        let mut out = SizePrice::default();
        let entries: Vec<(&str, f64)> = match raw {
            RawPerImage::Flat(v) => vec![("default", *v)],
            RawPerImage::BySize(t) => t.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        };
        for (size, v) in entries {
            let path = if matches!(raw, RawPerImage::Flat(_)) { field.to_string() } else { format!("{field}.{size}") };
            if !(v.is_finite() && v >= 0.0) {
                errors.push(format!("{at}.{path}: must be a number >= 0"));
            }
            if size == "default" {
                out.default = Some(v);
            } else if crate::request::parse_size(size).is_err() {
                errors.push(format!("{at}.{path}: not a size like \"1024x1024\" (or \"default\")"));
            } else {
                out.by_size.insert(size.to_string(), v);
            }
        }
        out
    };
    let per_image = per_image.map(|r| sized("per_image_usd", r, errors));
    let quality = quality.iter().map(|(q, r)| (q.clone(), sized(&format!("quality.{q}"), r, errors))).collect();
    PriceTable { per_image, quality, per_step, per_gpu_second }
}

/// The connection fields of a provider: required ones present, unused ones refused.
fn validate_connection(
    at: &str,
    name: &str,
    kind: ProviderKind,
    p: &RawProvider,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Connection {
    use ProviderKind as K;
    let mut c = Connection::default();
    let kind_name = kind.name();
    let used: &[&str] = match kind {
        K::Builtin => &[],
        K::OpenAi => &["base_url", "api_key_env", "upstream_response_format"],
        K::AzureOpenAi => &["base_url", "api_key_env", "upstream_response_format", "api_version"],
        K::VertexImagen => &["base_url", "project", "location", "token_env", "token_command"],
        K::Stability => &["base_url", "api_key_env"],
        K::Fal | K::Replicate => &["base_url", "api_key_env", "poll_interval_ms", "max_poll_interval_ms"],
        K::A1111 => &["base_url", "auth_env"],
    };
    let set = [
        ("base_url", p.base_url.is_some()),
        ("api_key_env", p.api_key_env.is_some()),
        ("upstream_response_format", p.upstream_response_format.is_some()),
        ("api_version", p.api_version.is_some()),
        ("project", p.project.is_some()),
        ("location", p.location.is_some()),
        ("token_env", p.token_env.is_some()),
        ("token_command", p.token_command.is_some()),
        ("auth_env", p.auth_env.is_some()),
        ("poll_interval_ms", p.poll_interval_ms.is_some()),
        ("max_poll_interval_ms", p.max_poll_interval_ms.is_some()),
    ];
    for (field, is_set) in set {
        if is_set && !used.contains(&field) {
            errors.push(format!("{at}.{field}: not used by kind \"{kind_name}\""));
        }
    }
    let default_base = match kind {
        K::Stability => Some("https://api.stability.ai".to_string()),
        K::Fal => Some("https://queue.fal.run".to_string()),
        K::Replicate => Some("https://api.replicate.com/v1".to_string()),
        K::VertexImagen => p.location.as_ref().map(|l| format!("https://{l}-aiplatform.googleapis.com/v1")),
        _ => None,
    };
    if kind != K::Builtin {
        c.base_url = match (&p.base_url, default_base) {
            (Some(u), _) => {
                let u = u.trim_end_matches('/').to_string();
                match u.parse::<http::Uri>() {
                    Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => errors.push(format!(
                        "{at}.base_url: must not hold credentials (user:password@): the URL is logged and shown \
                         by the admin API; give the key by environment variable ({})",
                        if kind == K::A1111 { "auth_env" } else { "api_key_env" }
                    )),
                    Ok(uri) if uri.query().is_some() || u.contains('#') => errors.push(format!(
                        "{at}.base_url: \"{}\" must not have a query or fragment (paths are appended to it)",
                        u.split(['?', '#']).next().unwrap_or_default()
                    )),
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
                    _ => errors.push(format!("{at}.base_url: \"{u}\" is not an http(s) URL")),
                }
                u
            }
            (None, Some(d)) => d,
            (None, None) if kind == K::VertexImagen => String::new(),
            (None, None) => {
                errors.push(format!("{at}.base_url: required for kind \"{kind_name}\""));
                String::new()
            }
        };
    }
    let env_var = |field: &str, var: &Option<String>, errors: &mut Vec<String>, warnings: &mut Vec<String>| {
        if let Some(var) = var {
            let valid = !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                errors.push(format!("{at}.{field}: \"{var}\" is not an environment variable name"));
            } else if std::env::var_os(var).is_none() {
                warnings.push(format!(
                    "{at}.{field}: environment variable {var} is not set; attempts on provider \"{name}\" will fail"
                ));
            }
        }
        var.clone()
    };
    c.api_key_env = env_var("api_key_env", &p.api_key_env, errors, warnings);
    c.token_env = env_var("token_env", &p.token_env, errors, warnings);
    c.auth_env = env_var("auth_env", &p.auth_env, errors, warnings);
    c.upstream_format = match p.upstream_response_format.as_deref() {
        None | Some("b64_json") => UpstreamFormat::B64Json,
        Some("url") => UpstreamFormat::Url,
        Some("omit") => UpstreamFormat::Omit,
        Some(other) => {
            errors.push(format!(
                "{at}.upstream_response_format: unknown value \"{other}\" (expected \"b64_json\", \"url\" or \"omit\")"
            ));
            UpstreamFormat::B64Json
        }
    };
    match kind {
        K::AzureOpenAi => {
            let v = p.api_version.clone().unwrap_or_else(|| "2025-04-01-preview".to_string());
            // Azure's versions read `YYYY-MM-DD` or `YYYY-MM-DD-preview`; the value goes into
            // every request's query string.
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                errors.push(format!(
                    "{at}.api_version: \"{v}\" is not an Azure OpenAI API version (such as \"2025-04-01-preview\")"
                ));
            }
            c.api_version = Some(v)
        }
        K::VertexImagen => {
            for (field, v) in [("project", &p.project), ("location", &p.location)] {
                match v.as_deref() {
                    None | Some("") => errors.push(format!("{at}.{field}: required for kind \"vertex_imagen\"")),
                    Some(x) if !x.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                        errors.push(format!("{at}.{field}: \"{x}\" is not a valid {field} id"))
                    }
                    _ => {}
                }
            }
            c.project = p.project.clone();
            c.location = p.location.clone();
            c.token_command = p.token_command.clone().unwrap_or_default();
            if p.token_command.as_ref().is_some_and(|v| v.is_empty() || v[0].is_empty()) {
                errors.push(format!(
                    "{at}.token_command: needs a program, e.g. [\"gcloud\", \"auth\", \"print-access-token\"]"
                ));
            }
            if c.token_env.is_none() && c.token_command.is_empty() {
                errors.push(format!("{at}: kind \"vertex_imagen\" needs token_env or token_command"));
            }
        }
        K::Fal | K::Replicate => {
            let first = p.poll_interval_ms.unwrap_or(500);
            let max = p.max_poll_interval_ms.unwrap_or(5000);
            if first == 0 || max < first {
                errors.push(format!("{at}.poll_interval_ms: must be > 0 and at most max_poll_interval_ms"));
            }
            c.poll_interval = Duration::from_millis(first.max(1));
            c.max_poll_interval = Duration::from_millis(max.max(first.max(1)));
        }
        _ => {}
    }
    c
}

/// The health settings of a route: when a target is demoted, and over which window.
fn validate_health(at: &str, r: &RawRoute, errors: &mut Vec<String>) -> crate::health::HealthSettings {
    let mut h = crate::health::HealthSettings::default();
    if let Some(ms) = r.latency_slo_ms {
        if ms == 0 {
            errors.push(format!("{at}.latency_slo_ms: must be greater than 0"));
        }
        h.latency_slo = Some(Duration::from_millis(ms));
    }
    for (field, v, slot) in [
        ("max_error_ratio", r.max_error_ratio, &mut h.max_error_ratio),
        ("max_eval_fail_ratio", r.max_eval_fail_ratio, &mut h.max_eval_fail_ratio),
    ] {
        if let Some(v) = v {
            if !(0.0..=1.0).contains(&v) {
                errors.push(format!("{at}.{field}: must be between 0 and 1"));
            }
            *slot = Some(v);
        }
    }
    match r.health_window {
        Some(n) if !(1..=10_000).contains(&n) => {
            errors.push(format!("{at}.health_window: must be between 1 and 10000"))
        }
        Some(n) => h.window = n as usize,
        None => {}
    }
    match r.health_window_secs {
        Some(0) => errors.push(format!("{at}.health_window_secs: must be greater than 0")),
        Some(s) => h.window_age = Duration::from_secs(s),
        None => {}
    }
    match r.health_min_samples {
        Some(0) => errors.push(format!("{at}.health_min_samples: must be greater than 0")),
        Some(n) => h.min_samples = n as usize,
        None => {}
    }
    if h.min_samples > h.window {
        errors.push(format!(
            "{at}.health_min_samples: {} is more than health_window ({}): the target would never be judged",
            h.min_samples, h.window
        ));
    }
    h
}

/// Mirror and canary candidates, appended to the route's targets with weight 0.
fn validate_candidates(
    at: &str,
    r: &RawRoute,
    targets: &mut Vec<Target>,
    names: &Names<'_>,
    errors: &mut Vec<String>,
) -> (Vec<Mirror>, Option<Canary>) {
    let label = |p: &str, m: Option<&str>| m.map_or_else(|| p.to_string(), |m| format!("{p}/{m}"));
    let mut mirrors: Vec<Mirror> = Vec::new();
    for (i, m) in r.mirror.iter().enumerate() {
        let at = format!("{at}.mirror[{i}]");
        let before = errors.len();
        names.provider(&at, &m.provider, errors);
        if m.model.as_deref() == Some("") {
            errors.push(format!("{at}.model: must not be empty"));
        }
        if !(0.0..=1.0).contains(&m.sample) {
            errors.push(format!("{at}.sample: must be between 0 and 1"));
        }
        if m.max_in_flight == Some(0) {
            errors.push(format!("{at}.max_in_flight: must be greater than 0"));
        }
        if m.spend_usd_per_day.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            errors.push(format!("{at}.spend_usd_per_day: must be a number >= 0"));
        }
        let name = label(&m.provider, m.model.as_deref());
        if mirrors.iter().any(|x| x.label == name) {
            errors.push(format!("{at}: candidate \"{name}\" is mirrored twice"));
        }
        if errors.len() > before {
            continue;
        }
        targets.push(Target {
            provider: m.provider.clone(),
            model: m.model.clone(),
            weight: 0,
            role: TargetRole::Mirror,
        });
        mirrors.push(Mirror {
            target: targets.len() - 1,
            label: name,
            sample: m.sample,
            max_in_flight: m.max_in_flight.unwrap_or(4) as usize,
            spend_usd_per_day: m.spend_usd_per_day,
        });
    }
    let canary = r.canary.as_ref().and_then(|c| {
        let at = format!("{at}.canary");
        let before = errors.len();
        names.provider(&at, &c.provider, errors);
        if c.model.as_deref() == Some("") {
            errors.push(format!("{at}.model: must not be empty"));
        }
        // The guard compares the canary's requests with the rest: at 1 there is no rest, so a
        // failing canary could never be rolled back.
        if !(c.share > 0.0 && c.share < 1.0) {
            errors.push(format!(
                "{at}.share: must be greater than 0 and less than 1 (the guard compares the canary's requests with the rest; to send every request to {}, make it the route's target)",
                c.provider
            ));
        }
        if c.min_samples == Some(0) {
            errors.push(format!("{at}.min_samples: must be greater than 0"));
        }
        for (field, v) in
            [("max_eval_fail_increase", c.max_eval_fail_increase), ("max_error_increase", c.max_error_increase)]
        {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                errors.push(format!("{at}.{field}: must be between 0 and 1"));
            }
        }
        if c.max_p99_ratio.is_some_and(|v| !(v.is_finite() && v >= 1.0)) {
            errors.push(format!("{at}.max_p99_ratio: must be at least 1"));
        }
        if errors.len() > before {
            return None;
        }
        let guard = crate::compare::Guard {
            min_samples: c.min_samples.unwrap_or(50),
            max_eval_fail_increase: c.max_eval_fail_increase.unwrap_or(0.05),
            max_error_increase: c.max_error_increase.unwrap_or(0.05),
            max_p99_ratio: c.max_p99_ratio.unwrap_or(1.5),
            alpha: 0.05,
        };
        let name = label(&c.provider, c.model.as_deref());
        let fingerprint = format!("{name}|{}|{:?}", c.share, guard);
        targets.push(Target {
            provider: c.provider.clone(),
            model: c.model.clone(),
            weight: 0,
            role: TargetRole::Canary,
        });
        Some(Canary { target: targets.len() - 1, label: name, share: c.share, guard, fingerprint })
    });
    (mirrors, canary)
}

/// The `hedge` of a route; `None` when it has errors.
fn validate_hedge(at: &str, h: &RawHedge, errors: &mut Vec<String>) -> Option<Hedge> {
    let before = errors.len();
    let after_p95 = match h.after.as_deref() {
        None => false,
        Some("p95") => true,
        Some(other) => {
            errors.push(format!("{at}.hedge.after: unknown value \"{other}\" (expected \"p95\", or use after_ms)"));
            false
        }
    };
    let after = match h.after_ms {
        Some(0) => {
            errors.push(format!("{at}.hedge.after_ms: must be greater than 0"));
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms),
        None => {
            errors.push(format!(
                "{at}.hedge.after_ms: required (with after = \"p95\" it is used until the target has enough samples)"
            ));
            Duration::ZERO
        }
    };
    if h.min_after_ms.is_some() && !after_p95 {
        errors.push(format!("{at}.hedge.min_after_ms: only used with after = \"p95\""));
    }
    let max_parallel = match h.max_parallel {
        None => 2,
        Some(n) if (2..=8).contains(&n) => n as usize,
        Some(_) => {
            errors.push(format!("{at}.hedge.max_parallel: must be between 2 and 8"));
            2
        }
    };
    (errors.len() == before).then(|| Hedge {
        after,
        after_p95,
        min_after: Duration::from_millis(h.min_after_ms.unwrap_or(0)),
        max_parallel,
    })
}

/// One `[classifiers.NAME]`; a missing model file is a warning (its verdicts are errors).
fn validate_classifier(
    at: &str,
    name: &str,
    c: &RawClassifier,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<ClassifierSpec> {
    use crate::eval::classifier::Activation;
    let before = errors.len();
    let activation = match c.activation.as_deref() {
        None | Some("softmax") => Activation::Softmax,
        Some("sigmoid") => Activation::Sigmoid,
        Some("none") => Activation::None,
        Some(other) => {
            errors.push(format!("{at}.activation: unknown activation \"{other}\" (expected softmax, sigmoid or none)"));
            Activation::Softmax
        }
    };
    if !(1..=4096).contains(&c.input_size) {
        errors.push(format!("{at}.input_size: must be between 1 and 4096"));
    }
    if c.std.contains(&0.0) {
        errors.push(format!("{at}.std: must not contain 0"));
    }
    if c.labels.is_empty() {
        errors.push(format!("{at}.labels: a classifier needs at least one label"));
    }
    for (j, l) in c.unsafe_labels.iter().enumerate() {
        if !c.labels.contains(l) {
            errors.push(format!("{at}.unsafe_labels[{j}]: \"{l}\" is not one of labels"));
        }
    }
    let path = std::path::PathBuf::from(&c.model);
    let model = if path.is_absolute() { path } else { crate::eval::onnx::models_dir().join(path) };
    if !model.is_file() {
        warnings.push(format!(
            "{at}.model: {} does not exist; routes using \"{name}\" get an error verdict",
            model.display()
        ));
    }
    (errors.len() == before).then(|| ClassifierSpec {
        name: name.to_string(),
        model,
        input_size: c.input_size,
        mean: c.mean,
        std: c.std,
        activation,
        labels: c.labels.clone(),
        unsafe_labels: c.unsafe_labels.clone(),
    })
}

/// The evaluators of a route and their settings; the safety models it names must be "nudenet"
/// or classifiers of the policy, and CLIP similarity needs `[clip]`.
fn validate_eval(
    at: &str,
    r: &RawRoute,
    classifiers: &Classifiers,
    clip: Option<&Arc<ClipConfig>>,
    errors: &mut Vec<String>,
) -> EvalPolicy {
    let mut evaluators: Vec<String> = Vec::new();
    for (j, e) in r.evaluators.iter().enumerate() {
        if evaluators.contains(e) {
            errors.push(format!("{at}.evaluators[{j}]: \"{e}\" is listed twice"));
        } else if !AVAILABLE_EVALUATORS.contains(&e.as_str()) {
            errors.push(format!(
                "{at}.evaluators[{j}]: unknown evaluator \"{e}\" (available: {})",
                AVAILABLE_EVALUATORS.join(", ")
            ));
        } else {
            evaluators.push(e.clone());
        }
    }
    let action = |field: &str, v: Option<&str>, errors: &mut Vec<String>| match v {
        None | Some("fallback") => EvalAction::Fallback,
        Some("block") => EvalAction::Block,
        Some("flag") => EvalAction::Flag,
        Some("review") => EvalAction::Review,
        Some(other) => {
            errors.push(format!(
                "{at}.{field}: unknown action \"{other}\" (expected \"fallback\", \"block\", \"flag\" or \"review\")"
            ));
            EvalAction::Fallback
        }
    };
    let on_sanity_fail = action("on_sanity_fail", r.on_sanity_fail.as_deref(), errors);
    let on_unsafe = action("on_unsafe", r.on_unsafe.as_deref(), errors);
    let on_low_adherence = action("on_low_adherence", r.on_low_adherence.as_deref(), errors);
    let on_text_fail = action("on_text_fail", r.on_text_fail.as_deref(), errors);
    let text = crate::eval::text::TextRules {
        require: r.require_text.clone(),
        forbid: r.forbid_text.clone(),
        forbid_any: r.forbid_any_text,
    };
    if !text.is_empty() && !r.evaluators.iter().any(|e| e == "text") {
        errors.push(format!("{at}: require_text, forbid_text and forbid_any_text need \"text\" in evaluators"));
    }
    for p in crate::request::contract::text_rule_problems(
        &text.require,
        &text.forbid,
        text.forbid_any,
        ("require_text", "forbid_text"),
    ) {
        errors.push(format!("{at}.{p}"));
    }
    // OCR runs for `text` rules and for contracts' text clauses (`adherence`): elsewhere the
    // setting would do nothing.
    if r.ocr_max_side.is_some() && !r.evaluators.iter().any(|e| e == "text" || e == "adherence") {
        errors.push(format!(
            "{at}.ocr_max_side: OCR never runs on this route (neither \"text\" nor \"adherence\" is in evaluators)"
        ));
    }
    let ocr_max_side = r.ocr_max_side.unwrap_or(crate::eval::ocr::DET_MAX_SIDE);
    if !crate::eval::ocr::DET_MAX_SIDE_RANGE.contains(&ocr_max_side) {
        errors.push(format!(
            "{at}.ocr_max_side: {ocr_max_side} is outside [{}, {}]",
            crate::eval::ocr::DET_MAX_SIDE_RANGE.start(),
            crate::eval::ocr::DET_MAX_SIDE_RANGE.end()
        ));
    }
    let min_adherence = r.min_adherence.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&min_adherence) {
        errors.push(format!("{at}.min_adherence: {min_adherence} is outside [0, 1]"));
    }
    let max_unsafe = r.max_unsafe.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&max_unsafe) {
        errors.push(format!("{at}.max_unsafe: {max_unsafe} is outside [0, 1]"));
    }
    if let Some(classes) = &r.unsafe_classes {
        for (j, c) in classes.iter().enumerate() {
            if !crate::eval::nudenet::CLASSES.contains(&c.as_str()) {
                errors.push(format!("{at}.unsafe_classes[{j}]: unknown NudeNet class \"{c}\""));
            }
        }
    }
    let min_skin = r.min_skin_in_box.unwrap_or(crate::eval::safety::DEFAULT_MIN_SKIN);
    if !(0.0..=1.0).contains(&min_skin) {
        errors.push(format!("{at}.min_skin_in_box: {min_skin} is outside [0, 1]"));
    }
    if r.corroborate_unsafe == Some(false) && r.min_skin_in_box.is_some() {
        errors.push(format!("{at}.min_skin_in_box: needs corroborate_unsafe = true"));
    }
    let corroboration = match r.corroborate_unsafe {
        Some(false) => None,
        _ => Some(crate::eval::safety::Corroboration { min_skin }),
    };
    let fail_open = match r.on_eval_error.as_deref() {
        None | Some("fail_closed") => false,
        Some("fail_open") => true,
        Some(other) => {
            errors.push(format!(
                "{at}.on_eval_error: unknown value \"{other}\" (expected \"fail_open\" or \"fail_closed\")"
            ));
            false
        }
    };
    let budget = positive_ms(&format!("{at}.eval_budget_ms"), r.eval_budget_ms, 5_000, errors);
    let safety_settings = r.on_unsafe.is_some() || r.max_unsafe.is_some() || r.unsafe_classes.is_some();
    if evaluators.is_empty()
        && (r.on_sanity_fail.is_some() || r.eval_budget_ms.is_some() || r.on_eval_error.is_some() || safety_settings)
    {
        errors.push(format!("{at}: evaluation settings given, but the route names no evaluators"));
    } else if safety_settings
        && !evaluators.iter().any(|e| e == "safety")
        && !r.evaluators.iter().any(|e| e == "safety")
    {
        errors.push(format!("{at}: on_unsafe, max_unsafe and unsafe_classes need \"safety\" in evaluators"));
    }
    let mut safety_models = Vec::new();
    for (j, m) in r.safety_models.clone().unwrap_or_else(|| vec!["nudenet".into()]).iter().enumerate() {
        match (m.as_str(), classifiers.get(m)) {
            ("nudenet", _) => safety_models.push(crate::eval::SafetyModel::NudeNet),
            (_, Some(spec)) => safety_models.push(crate::eval::SafetyModel::Classifier(spec.clone())),
            (_, None) => errors
                .push(format!("{at}.safety_models[{j}]: unknown model \"{m}\" (\"nudenet\" or a [classifiers.NAME])")),
        }
    }
    if r.safety_models.is_some() && !r.evaluators.iter().any(|e| e == "safety") {
        errors.push(format!("{at}.safety_models: needs \"safety\" in evaluators"));
    }
    for (field, given) in
        [("corroborate_unsafe", r.corroborate_unsafe.is_some()), ("min_skin_in_box", r.min_skin_in_box.is_some())]
    {
        if !given {
            continue;
        }
        if !r.evaluators.iter().any(|e| e == "safety") {
            errors.push(format!("{at}.{field}: needs \"safety\" in evaluators"));
        } else if !safety_models.contains(&crate::eval::SafetyModel::NudeNet) {
            errors.push(format!("{at}.{field}: needs \"nudenet\" in safety_models"));
        }
    }
    let clip = match (r.min_clip_similarity, clip) {
        (None, _) => None,
        (Some(_), None) => {
            errors.push(format!("{at}.min_clip_similarity: needs a [clip] section with the encoder models"));
            None
        }
        (Some(min), Some(cfg)) => {
            if !(-1.0..=1.0).contains(&min) {
                errors.push(format!("{at}.min_clip_similarity: {min} is outside [-1, 1]"));
            }
            if !r.evaluators.iter().any(|e| e == "adherence") {
                errors.push(format!("{at}.min_clip_similarity: needs \"adherence\" in evaluators"));
            }
            Some((cfg.clone(), min))
        }
    };
    let settings = crate::eval::Settings {
        unsafe_classes: r.unsafe_classes.clone(),
        max_unsafe,
        corroboration,
        min_adherence,
        text,
        safety_models,
        clip,
        report_text: false,
        ocr_max_side,
    };
    EvalPolicy { evaluators, on_sanity_fail, on_unsafe, on_low_adherence, on_text_fail, budget, fail_open, settings }
}

/// A duration in ms that must be greater than 0 when given (`default` ms when not).
fn positive_ms(at: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>) -> Duration {
    match v {
        Some(0) => {
            errors.push(format!("{at}: must be greater than 0"));
            Duration::from_millis(default)
        }
        v => Duration::from_millis(v.unwrap_or(default)),
    }
}

/// Names end up as metric label values and in headers: keep them to a safe alphabet.
fn check_name(at: &str, name: &str, errors: &mut Vec<String>) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        errors.push(format!("{at}: \"{name}\" must be 1 to 64 characters of A-Z a-z 0-9 _ - ."));
    }
}

/// One policy file's TOML as its raw sections. Errors: `line L, column C: PATH: message`, the
/// path naming the field in the file's own terms (`routes[0].targets[1].model`,
/// `server.url_ttl_secs`) where the error is about a value (a wrong type, a number out of its
/// type's range), so a message like "expected u64" says whose.
pub(super) fn parse_file(text: &str) -> Result<RawFile, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, &e, ""))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // The top level prints as "."; an unknown field's message names the field itself.
        let path = if path == "." || e.inner().message().starts_with("unknown field") { String::new() } else { path };
        toml_error(text, e.inner(), &path)
    })
}

/// `line L, column C: [PATH: ]message` for a TOML error, which is how ops find it in an editor.
pub(super) fn toml_error(text: &str, e: &toml::de::Error, path: &str) -> String {
    let msg = e.message().trim();
    let msg = if path.is_empty() { msg.to_string() } else { format!("{path}: {msg}") };
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}
