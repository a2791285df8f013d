//! `[provenance]`: signing every returned image with a C2PA manifest (see
//! [`crate::provenance`]). The certificate chain and private key are read and checked here,
//! when the policy is validated, so `acc check`, start-up and every reload refuse credentials
//! that could not sign (the old policy stays in force on a reload).
//!
//! ```toml
//! [provenance]
//! cert_chain_file = "/etc/acc/c2pa/chain.pem"   # or cert_chain_env = "ACC_C2PA_CHAIN"
//! private_key_file = "/etc/acc/c2pa/key.pem"    # or private_key_env = "ACC_C2PA_KEY"
//! include_prompt = false
//! on_provenance_error = "fail_open"
//! ```

use std::sync::Arc;

use serde::Deserialize;

use super::raw::RawFile;
use crate::provenance::{Credentials, Source};

/// `[provenance]` as written (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvenance {
    /// Whether images are signed (default true when the section is present).
    pub(super) enabled: Option<bool>,
    /// PEM file of the certificate chain, signing certificate first (relative paths: from the
    /// gateway's working directory).
    pub(super) cert_chain_file: Option<String>,
    /// Environment variable holding the chain's PEM text instead.
    pub(super) cert_chain_env: Option<String>,
    /// PEM file of the signing certificate's private key (PKCS#8, unencrypted).
    pub(super) private_key_file: Option<String>,
    /// Environment variable holding the key's PEM text instead.
    pub(super) private_key_env: Option<String>,
    /// Put the prompt into the manifest, on routes whose `record_prompt` is `"full"` only
    /// (default false).
    pub(super) include_prompt: Option<bool>,
    /// `"fail_open"` (default: an image that cannot be signed goes out unsigned, counted) or
    /// `"fail_closed"` (the request fails with 500 `provenance_failed`).
    pub(super) on_provenance_error: Option<String>,
}

/// What a signing error at run time does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnProvenanceError {
    /// The image is returned unsigned; counted as `acc_provenance_total{result="unsigned"}`.
    #[default]
    FailOpen,
    /// The request fails (500, OpenAI error code `provenance_failed`); counted as
    /// `result="refused"`.
    FailClosed,
}

/// `[provenance]`, validated: credentials loaded and checked.
#[derive(Debug, Clone)]
pub struct ProvenanceSettings {
    /// The signing identity (its `Debug` shows where it came from, never the key).
    pub credentials: Arc<Credentials>,
    /// Whether the prompt may go into manifests (routes with `record_prompt = "full"` only).
    pub include_prompt: bool,
    pub on_error: OnProvenanceError,
}

/// `[provenance]` gathered across the files: `None` when absent or `enabled = false`.
pub(super) fn section(parsed: &[(&str, RawFile)], errors: &mut Vec<String>) -> Option<ProvenanceSettings> {
    let mut found: Option<(&str, &RawProvenance)> = None;
    for (file, raw) in parsed {
        let Some(p) = &raw.provenance else { continue };
        if let Some((other, _)) = found {
            errors.push(format!("{file}: provenance: already set in {other}"));
            continue;
        }
        found = Some((file, p));
    }
    let (file, p) = found?;
    let at = format!("{file}: provenance");
    let on_error = match p.on_provenance_error.as_deref() {
        None | Some("fail_open") => OnProvenanceError::FailOpen,
        Some("fail_closed") => OnProvenanceError::FailClosed,
        Some(other) => {
            errors.push(format!(
                "{at}.on_provenance_error: unknown value \"{other}\" (expected \"fail_open\" or \"fail_closed\")"
            ));
            OnProvenanceError::FailOpen
        }
    };
    let source =
        |file_field: &str, file: &Option<String>, env_field: &str, env: &Option<String>, errors: &mut Vec<String>| {
            match (file, env) {
                (Some(f), None) if !f.trim().is_empty() => Some(Source::File(f.clone())),
                (None, Some(v)) if !v.trim().is_empty() => Some(Source::Env(v.clone())),
                (Some(_), Some(_)) => {
                    errors.push(format!("{at}: set one of {file_field} and {env_field}, not both"));
                    None
                }
                _ => {
                    errors.push(format!("{at}: {file_field} or {env_field} is required"));
                    None
                }
            }
        };
    let cert = source("cert_chain_file", &p.cert_chain_file, "cert_chain_env", &p.cert_chain_env, errors);
    let key = source("private_key_file", &p.private_key_file, "private_key_env", &p.private_key_env, errors);
    if p.enabled == Some(false) {
        return None;
    }
    let credentials = match Credentials::load(cert?, key?) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            errors.push(format!("{at}: {e}"));
            return None;
        }
    };
    Some(ProvenanceSettings { credentials, include_prompt: p.include_prompt.unwrap_or(false), on_error })
}

#[cfg(test)]
mod tests {
    use super::super::{validate, Sources};
    use super::OnProvenanceError;

    /// A test chain, generated (nothing committed).
    #[allow(dead_code)]
    mod certs {
        include!("../../../tests/common/certs.rs");
    }

    const ROUTE: &str = "[providers.demo]\nkind = \"builtin\"\n[[routes]]\nname = \"a\"\nmatch = { model = \"m\" }\ntargets = [{ provider = \"demo\" }]\n";

    fn check(section: &str) -> Result<super::super::Policy, Vec<String>> {
        let files = vec![("a.toml".to_string(), ROUTE.to_string()), ("b.toml".to_string(), section.to_string())];
        validate(&Sources { files })
    }

    #[test]
    fn credentials_from_files_or_variables_and_the_error_policy() {
        let dir = tempfile::tempdir().unwrap();
        let c = certs::chain("policy");
        std::fs::write(dir.path().join("chain.pem"), &c.chain_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &c.key_pem).unwrap();
        let files = format!(
            "[provenance]\ncert_chain_file = \"{}\"\nprivate_key_file = \"{}\"\non_provenance_error = \"fail_closed\"\ninclude_prompt = true\n",
            dir.path().join("chain.pem").display(),
            dir.path().join("key.pem").display()
        );
        let p = check(&files).unwrap().provenance.expect("provenance configured");
        assert_eq!(p.on_error, OnProvenanceError::FailClosed);
        assert!(p.include_prompt);
        assert_eq!(p.credentials.algorithm(), "es256");
        // Debug never shows the key.
        assert!(!format!("{p:?}").contains("PRIVATE"));

        std::env::set_var("ACC_TEST_POLICY_C2PA_KEY", &c.key_pem);
        let env = format!(
            "[provenance]\ncert_chain_file = \"{}\"\nprivate_key_env = \"ACC_TEST_POLICY_C2PA_KEY\"\n",
            dir.path().join("chain.pem").display()
        );
        let p = check(&env).unwrap().provenance.unwrap();
        assert_eq!(p.on_error, OnProvenanceError::FailOpen);
        assert!(!p.include_prompt);
        let off = format!("{env}enabled = false\n");
        assert!(check(&off).unwrap().provenance.is_none());
    }

    #[test]
    fn misconfiguration_names_the_file_and_field() {
        let e = check("[provenance]\ncert_chain_file = \"c.pem\"\non_provenance_error = \"ignore\"\n").unwrap_err();
        assert_eq!(
            e,
            vec![
                "b.toml: provenance.on_provenance_error: unknown value \"ignore\" (expected \"fail_open\" or \"fail_closed\")",
                "b.toml: provenance: private_key_file or private_key_env is required",
            ]
        );
        let e =
            check("[provenance]\ncert_chain_file = \"c.pem\"\ncert_chain_env = \"X\"\nprivate_key_file = \"k.pem\"\n")
                .unwrap_err();
        assert_eq!(e, vec!["b.toml: provenance: set one of cert_chain_file and cert_chain_env, not both"]);
        let e = check(
            "[provenance]\ncert_chain_file = \"/nonexistent/c.pem\"\nprivate_key_file = \"/nonexistent/k.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("b.toml: provenance: cannot read file /nonexistent/c.pem"), "{e:?}");
    }
}
