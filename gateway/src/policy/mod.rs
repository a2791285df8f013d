//! Policy files: what the gateway serves, where requests go, and how answers are judged.
//!
//! A policy is one or more TOML files of a directory, read in order of their names; a section
//! may be in any of them (providers in one file, routes in another), but each thing is defined
//! once. It is read in four steps, one file of this folder each:
//! - `raw.rs`: each file parsed into serde structs that refuse unknown fields; a syntax error or
//!   a misspelt field stops here, with its line and column.
//! - `validate.rs`: each part checked on its own and converted into the runtime types.
//! - `types.rs`: those runtime types, what the request path reads from a [`Policy`] snapshot.
//! - `xref.rs`: the checks that relate one part to another (a target's provider, a fallback
//!   route, the default model's route), run where each reference is read.
//!
//! Validation is all or nothing and every error names the file and the path inside it, e.g.
//! `routes.toml: routes[1].targets[0].provider: unknown provider "opnai"`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

mod cluster;
mod numbers;
mod observe;
mod provenance;
mod raw;
mod review;
#[cfg(test)]
mod tests;
mod types;
mod validate;
mod xref;

pub use cluster::{ClusterSettings, OnClusterError};
pub use provenance::{OnProvenanceError, ProvenanceSettings};
pub use review::{ReviewBudget, ReviewOverflow, ReviewSettings, MAX_REVIEW_TTL_SECS};
pub use types::{
    AnswerFormat, ApiKey, Billable, Canary, Cohorts, Concurrency, Connection, EvalAction, EvalPolicy, FetchPolicy,
    Hedge, Matcher, Mirror, OtlpProtocol, ParamAction, Policy, Price, PriceTable, ProviderKind, ProviderSpec,
    RecordPrompt, Regeneration, Route, ServerSettings, SizePrice, StoreSettings, StreamAction, Target, TargetRole,
    TelemetrySettings, TenantLimits, TlsFiles, UpstreamFormat, UrlMode, AVAILABLE_EVALUATORS,
};

use raw::RawFile;

/// The most one policy file may hold: a policy of thousands of routes is a few megabytes.
pub const MAX_POLICY_FILE_BYTES: u64 = 16 << 20;

/// The policy files of a directory (or one file), read but not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// (file name, contents), sorted by name: the order sections and routes are read in.
    pub files: Vec<(String, String)>,
}

impl Sources {
    /// Reads every `*.toml` directly in `path` (sorted by name), or `path` itself if it is a file.
    /// Paths are resolved on every call, so a Kubernetes ConfigMap's symlink swap is seen.
    pub fn read(path: &Path) -> Result<Sources, Vec<String>> {
        let meta = std::fs::metadata(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let mut paths: Vec<PathBuf> = if meta.is_file() {
            vec![path.to_path_buf()]
        } else {
            let rd = std::fs::read_dir(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
            let mut v = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|e| vec![format!("{}: {e}", path.display())])?;
                let p = entry.path();
                let is_toml = p.extension().is_some_and(|x| x == "toml");
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if !is_toml || hidden {
                    continue;
                }
                if p.is_file() {
                    v.push(p);
                } else if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    // A policy file whose link leads nowhere is a file the operator meant to
                    // load: skipping it would drop its routes and keys without a word.
                    let name = entry.file_name().to_string_lossy().into_owned();
                    return Err(vec![format!("{name}: a symbolic link to a file that does not exist")]);
                }
            }
            v
        };
        paths.sort();
        if paths.is_empty() {
            return Err(vec![format!("{}: no *.toml policy files found", path.display())]);
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut errors = Vec::new();
        for p in paths {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match crate::read_bounded(&p, MAX_POLICY_FILE_BYTES).and_then(|b| {
                String::from_utf8(b).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8")
                })
            }) {
                Ok(text) => files.push((name, text)),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(Sources { files })
        } else {
            Err(errors)
        }
    }

    /// Short SHA-256 (12 hex digits) of the files' names and contents: the policy's version.
    pub fn version(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in &self.files {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..6])
    }
}

/// Reads and validates a policy directory (or file).
pub fn load(path: &Path) -> Result<Policy, Vec<String>> {
    let sources = Sources::read(path)?;
    validate(&sources)
}

/// Parses and validates policy sources: every error found, or a policy.
pub fn validate(sources: &Sources) -> Result<Policy, Vec<String>> {
    // Raw: every file parsed, or every syntax error and unknown field of them all.
    let mut errors = Vec::new();
    // Numbers out of the range the gateway can use, reported with the other errors.
    let mut out_of_range = Vec::new();
    let mut parsed: Vec<(&str, RawFile)> = Vec::new();
    for (name, text) in &sources.files {
        match validate::parse_file(text) {
            Ok(raw) => {
                numbers::check(name, text, &mut out_of_range);
                parsed.push((name, raw))
            }
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // The parts that stand alone, then the routes, which refer to them and to one another.
    let mut warnings = Vec::new();
    let sections = validate::sections(&parsed, &mut errors, &mut warnings);
    xref::tenants_without_keys(&sections.tenants, &sections.keys, &mut warnings);
    xref::keys_of_unknown_tenants(&sections.tenants, &sections.keys, &mut warnings);
    let classifiers = validate::classifiers(&parsed, &mut errors, &mut warnings);
    let clip = validate::clip(&parsed, &mut errors, &mut warnings);
    let observe = observe::sections(&parsed, &mut errors);
    let review = review::section(&parsed, &mut errors);
    let provenance = provenance::section(&parsed, &mut errors);
    let cluster = cluster::section(&parsed, &mut errors);
    let names = xref::Names::gather(&parsed, &mut errors);
    let mut routes = Vec::new();
    for (r, at) in parsed.iter().flat_map(|(_, raw)| &raw.routes).zip(&names.route_at) {
        let route = validate::route(at, r, &names, &classifiers, clip.as_ref(), &mut errors);
        review::needs_store(at, &route.eval, &observe.store, &mut errors);
        routes.push(route);
    }
    let aliases = xref::aliases(&routes);
    xref::unpriced_spend(&sections.tenants, &sections.providers, &routes, &mut warnings);
    xref::shadowed_routes(&routes, &mut warnings);
    if routes.is_empty() && errors.is_empty() {
        errors.push(format!("{}: no routes defined", sources.files.first().map(|f| f.0.as_str()).unwrap_or("policy")));
    }
    xref::default_model(sections.default_model.as_ref(), &aliases, &mut errors);
    // A value the number check refuses (NaN, infinity, beyond its bound) is reported once, by
    // it: a section's own range check of the same field ("NaN is outside [0, 1]") is dropped.
    let refused: Vec<&str> = out_of_range
        .iter()
        .filter_map(|n| {
            // "file: path: message": the prefix up to the second ": ", both separators kept.
            let file = n.find(": ")?;
            let path = n[file + 2..].find(": ")?;
            Some(&n[..file + 2 + path + 2])
        })
        .collect();
    errors.retain(|e| !refused.iter().any(|p| e.starts_with(p)));
    errors.extend(out_of_range);

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        version: sources.version(),
        files: sources.files.iter().map(|f| f.0.clone()).collect(),
        default_model: sections.default_model.map(|d| d.0),
        server: sections.server.unwrap_or_default(),
        keys: sections.keys,
        tenants: sections.tenants,
        providers: sections.providers,
        routes,
        aliases,
        warnings,
        store: observe.store,
        telemetry: observe.telemetry,
        cohorts: observe.cohorts,
        review,
        provenance,
        cluster,
    })
}
