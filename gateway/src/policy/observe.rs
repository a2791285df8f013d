//! The sections that say what the gateway remembers and exports: `[store]` (trace records),
//! `[telemetry]` (OTLP export) and `[cohorts]` (the values metric labels accept), checked into
//! [`super::StoreSettings`], [`super::TelemetrySettings`] and [`super::Cohorts`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawCohorts, RawFile, RawStore, RawTelemetry};
use super::types::{Cohorts, OtlpProtocol, StoreSettings, TelemetrySettings};

/// `[store]`, `[telemetry]` and `[cohorts]` gathered across the files (each set by one file at
/// most).
pub(super) struct Observe {
    pub(super) store: StoreSettings,
    pub(super) telemetry: Option<TelemetrySettings>,
    pub(super) cohorts: Cohorts,
}

pub(super) fn sections(parsed: &[(&str, RawFile)], errors: &mut Vec<String>) -> Observe {
    let mut store: Option<(StoreSettings, &str)> = None;
    let mut telemetry: Option<(TelemetrySettings, &str)> = None;
    let mut cohorts: Option<(Cohorts, &str)> = None;
    for (file, raw) in parsed {
        if let Some(s) = &raw.store {
            match &store {
                Some((_, other)) => errors.push(format!("{file}: store: already set in {other}")),
                None => store = Some((validate_store(file, s, errors), file)),
            }
        }
        if let Some(t) = &raw.telemetry {
            match &telemetry {
                Some((_, other)) => errors.push(format!("{file}: telemetry: already set in {other}")),
                None => {
                    if let Some(t) = validate_telemetry(file, t, errors) {
                        telemetry = Some((t, file));
                    }
                }
            }
        }
        if let Some(c) = &raw.cohorts {
            match &cohorts {
                Some((_, other)) => errors.push(format!("{file}: cohorts: already set in {other}")),
                None => cohorts = Some((validate_cohorts(file, c, errors), file)),
            }
        }
    }
    if let (Some((_, tfile)), Some((s, _))) = (&telemetry, &store) {
        if !s.enabled {
            errors.push(format!(
                "{tfile}: telemetry: spans are made from trace records, and [store] enabled = false makes none; enable the store or remove [telemetry]"
            ));
        }
    }
    Observe {
        store: store.map(|s| s.0).unwrap_or_default(),
        telemetry: telemetry.map(|t| t.0),
        cohorts: cohorts.map(|c| c.0).unwrap_or_default(),
    }
}

fn validate_store(file: &str, s: &RawStore, errors: &mut Vec<String>) -> StoreSettings {
    let d = StoreSettings::default();
    let at = format!("{file}: store");
    if let Some(url) = &s.url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            errors.push(format!("{at}.url: must start with postgres:// or postgresql://"));
        }
        // A password belongs in an environment variable, never in a policy file: neither in
        // the user-info nor as a `password` (or `sslpassword`) query parameter.
        if let Some(rest) = url.split_once("://").map(|x| x.1) {
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            let in_userinfo = authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'));
            let in_query = rest.split_once('?').is_some_and(|(_, q)| {
                form_urlencoded::parse(q.as_bytes())
                    .any(|(k, _)| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword"))
            });
            if in_userinfo || in_query {
                errors.push(format!(
                    "{at}.url: must not contain a password; name an environment variable in store.password_env"
                ));
            }
        }
        if s.path.is_some() {
            errors.push(format!("{at}: set path (SQLite) or url (PostgreSQL), not both"));
        }
    }
    if s.password_env.as_deref() == Some("") {
        errors.push(format!("{at}.password_env: must name an environment variable"));
    }
    if s.password_env.is_some() && s.url.is_none() {
        errors.push(format!("{at}.password_env: only used with store.url (PostgreSQL)"));
    }
    if s.path.as_deref() == Some("") {
        errors.push(format!("{at}.path: must not be empty"));
    }
    let positive = |field: &str, v: Option<u64>, errors: &mut Vec<String>| {
        if v == Some(0) {
            errors.push(format!("{at}.{field}: must be greater than 0"));
        }
        v.filter(|&v| v > 0)
    };
    let retention_days = positive("retention_days", s.retention_days, errors);
    let max_rows = positive("max_rows", s.max_rows, errors);
    let queue = positive("queue_capacity", s.queue_capacity, errors);
    let batch = positive("batch_max", s.batch_max, errors);
    let flush = positive("flush_interval_ms", s.flush_interval_ms, errors);
    StoreSettings {
        enabled: s.enabled.unwrap_or(true),
        path: s.path.as_ref().map(PathBuf::from).unwrap_or(d.path),
        url: s.url.clone(),
        password_env: s.password_env.clone(),
        retention_days: retention_days.map(|d| d.min(u64::from(u32::MAX)) as u32).or(d.retention_days),
        max_rows: max_rows.or(d.max_rows),
        queue_capacity: queue.map_or(d.queue_capacity, |v| v.min(1 << 24) as usize),
        batch_max: batch.map_or(d.batch_max, |v| v.min(10_000) as usize),
        flush_interval: flush.map_or(d.flush_interval, Duration::from_millis),
        image_sha256: s.image_sha256.unwrap_or(d.image_sha256),
    }
}

fn validate_telemetry(file: &str, t: &RawTelemetry, errors: &mut Vec<String>) -> Option<TelemetrySettings> {
    let at = format!("{file}: telemetry");
    let endpoint = t.otlp_endpoint.as_ref()?;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        errors.push(format!("{at}.otlp_endpoint: must start with http:// or https://"));
    }
    let authority = endpoint.split_once("://").map_or("", |x| x.1).split(['/', '?']).next().unwrap_or("");
    if authority.contains('@') {
        errors.push(format!(
            "{at}.otlp_endpoint: must not contain credentials; send them as a header with telemetry.headers_env"
        ));
    }
    let protocol = match t.protocol.as_deref() {
        None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some("grpc") => OtlpProtocol::Grpc,
        Some(other) => {
            errors
                .push(format!("{at}.protocol: unknown protocol \"{other}\" (expected \"http/protobuf\" or \"grpc\")"));
            OtlpProtocol::HttpProtobuf
        }
    };
    if t.timeout_ms == Some(0) {
        errors.push(format!("{at}.timeout_ms: must be greater than 0"));
    }
    let mut headers = Vec::new();
    for (name, env) in &t.headers_env {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errors.push(format!("{at}.headers_env.{name}: not a valid header name"));
        }
        if env.is_empty() {
            errors.push(format!("{at}.headers_env.{name}: must name an environment variable"));
        }
        headers.push((name.clone(), env.clone()));
    }
    Some(TelemetrySettings {
        otlp_endpoint: endpoint.trim_end_matches('/').to_string(),
        protocol,
        timeout: Duration::from_millis(t.timeout_ms.filter(|&v| v > 0).unwrap_or(10_000)),
        headers_env: headers,
    })
}

fn validate_cohorts(file: &str, c: &RawCohorts, errors: &mut Vec<String>) -> Cohorts {
    let list = |field: &str, values: &[String], errors: &mut Vec<String>| -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        for (i, v) in values.iter().enumerate() {
            let ok = !v.is_empty()
                && v.len() <= 128
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@:/".contains(&b))
                && v != Cohorts::OTHER
                && v != Cohorts::NONE;
            if !ok {
                errors.push(format!(
                    "{file}: cohorts.{field}[{i}]: \"{v}\" must be 1 to 128 of A-Z a-z 0-9 - _ . @ : / (and not \"other\" or \"none\", the labels of values outside the lists and of absent ones)"
                ));
            }
            if !set.insert(v.clone()) {
                errors.push(format!("{file}: cohorts.{field}[{i}]: \"{v}\" is listed twice"));
            }
        }
        set
    };
    let templates = list("templates", &c.templates, errors);
    for (i, t) in c.templates.iter().enumerate() {
        let parts: Vec<&str> = t.split('@').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            errors.push(format!("{file}: cohorts.templates[{i}]: \"{t}\" must be name@version"));
        }
    }
    Cohorts {
        cohorts: list("cohorts", &c.cohorts, errors),
        templates,
        asset_types: list("asset_types", &c.asset_types, errors),
    }
}
