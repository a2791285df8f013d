//! `[cluster]`: state shared by every replica through Redis (rate limits, daily spend, mirror
//! caps, `Idempotency-Key` leases and answers, 429 pauses), checked into [`ClusterSettings`].
//! Without the section everything stays in memory per replica. Read at start-up: a reload that
//! changes it applies on the next restart.

use std::time::Duration;

use serde::Deserialize;

use super::raw::RawFile;

/// `[cluster]` as written (at most one file sets it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS). A user name may be in it; a
    /// password may not (use `password_env`).
    pub(super) redis_url: Option<String>,
    /// Environment variable holding the Redis password (read at start-up, never logged).
    pub(super) password_env: Option<String>,
    /// What a request meets when Redis fails or is slow: "local" (default: per-replica state,
    /// counted and logged) or "fail_closed" (a 503).
    pub(super) on_cluster_error: Option<String>,
    /// Deadline of one Redis call, ms (default 50; 1 to 5000).
    pub(super) timeout_ms: Option<u64>,
    /// After a failed call, how long the replica stays on local state before trying Redis
    /// again, ms (default 1000; 10 to 60000).
    pub(super) recheck_ms: Option<u64>,
    /// Whether a breaker that opens on one replica holds the provider off on all (default
    /// false: breakers are per replica).
    pub(super) share_breakers: Option<bool>,
    /// Prefix of every key the gateway writes (default "acc:"), so several gateways can share
    /// one Redis.
    pub(super) key_prefix: Option<String>,
    /// How often each replica publishes its new 429 pauses (and opened breakers) and reads the
    /// others', ms (default 200; 20 to 10000).
    pub(super) sync_ms: Option<u64>,
    /// How long an in-flight `Idempotency-Key` lease lives without its leader finishing (a
    /// replica that died), seconds (default 300; 1 to 3600).
    pub(super) lease_secs: Option<u64>,
}

/// What requests meet when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnClusterError {
    /// Per-replica state in memory, as without `[cluster]` (counted, logged, said in `/readyz`).
    #[default]
    Local,
    /// Refuse with an OpenAI-shaped 503 (`cluster_unavailable`).
    FailClosed,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The Redis URL, without a password.
    pub redis_url: String,
    /// The environment variable holding the password, if any.
    pub password_env: Option<String>,
    /// What applies when Redis fails.
    pub on_error: OnClusterError,
    /// Deadline of one Redis call.
    pub timeout: Duration,
    /// How long local state is used after a failure before Redis is tried again.
    pub recheck: Duration,
    /// Whether opened breakers are shared.
    pub share_breakers: bool,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Period of the pause (and breaker) exchange.
    pub sync: Duration,
    /// Lifetime of an in-flight idempotency lease.
    pub lease: Duration,
}

/// `[cluster]` gathered across the files; `None` when no file sets it.
pub(super) fn section(parsed: &[(&str, RawFile)], errors: &mut Vec<String>) -> Option<ClusterSettings> {
    let mut found: Option<(ClusterSettings, &str)> = None;
    for (file, raw) in parsed {
        let Some(c) = &raw.cluster else { continue };
        if let Some((_, other)) = &found {
            errors.push(format!("{file}: cluster: already set in {other}"));
            continue;
        }
        let at = format!("{file}: cluster");
        let url = c.redis_url.clone().unwrap_or_default();
        check_url(&at, &url, errors);
        if let Some(env) = &c.password_env {
            if env.is_empty() || !env.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                errors.push(format!("{at}.password_env: \"{env}\" is not an environment variable name"));
            }
        }
        let on_error = match c.on_cluster_error.as_deref() {
            None | Some("local") => OnClusterError::Local,
            Some("fail_closed") => OnClusterError::FailClosed,
            Some(other) => {
                errors.push(format!(
                    "{at}.on_cluster_error: unknown value \"{other}\" (expected \"local\" or \"fail_closed\")"
                ));
                OnClusterError::Local
            }
        };
        let mut ranged = |field: &str, v: Option<u64>, default: u64, min: u64, max: u64| {
            let v = v.unwrap_or(default);
            if !(min..=max).contains(&v) {
                errors.push(format!("{at}.{field}: {v} is outside [{min}, {max}]"));
            }
            v
        };
        let timeout = Duration::from_millis(ranged("timeout_ms", c.timeout_ms, 50, 1, 5000));
        let recheck = Duration::from_millis(ranged("recheck_ms", c.recheck_ms, 1000, 10, 60_000));
        let sync = Duration::from_millis(ranged("sync_ms", c.sync_ms, 200, 20, 10_000));
        let lease = Duration::from_secs(ranged("lease_secs", c.lease_secs, 300, 1, 3600));
        let key_prefix = c.key_prefix.clone().unwrap_or_else(|| "acc:".into());
        if key_prefix.len() > 64 || key_prefix.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            errors.push(format!("{at}.key_prefix: at most 64 characters, no spaces"));
        }
        let settings = ClusterSettings {
            redis_url: url,
            password_env: c.password_env.clone(),
            on_error,
            timeout,
            recheck,
            share_breakers: c.share_breakers.unwrap_or(false),
            key_prefix,
            sync,
            lease,
        };
        found = Some((settings, file));
    }
    found.map(|f| f.0)
}

/// `redis://` or `rediss://`, with a host, and no password in it.
fn check_url(at: &str, url: &str, errors: &mut Vec<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        errors.push(format!("{at}.redis_url: required, as redis://host:port or rediss://host:port"));
        return;
    };
    if scheme != "redis" && scheme != "rediss" {
        errors.push(format!("{at}.redis_url: scheme \"{scheme}\" is not redis:// or rediss://"));
        return;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if userinfo.is_some_and(|u| u.contains(':')) {
        // The value is not repeated: it holds a secret.
        errors.push(format!("{at}.redis_url: has a password in it; put it in the variable named by password_env"));
    }
    if host.is_empty() || host.starts_with(':') {
        errors.push(format!("{at}.redis_url: no host"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<ClusterSettings>, Vec<String>> {
        let raw: RawFile = toml::from_str(text).unwrap();
        let mut errors = Vec::new();
        let s = section(&[("p.toml", raw)], &mut errors);
        if errors.is_empty() {
            Ok(s)
        } else {
            Err(errors)
        }
    }

    #[test]
    fn defaults_and_absent() {
        assert_eq!(parse("").unwrap(), None);
        let s = parse("[cluster]\nredis_url = \"redis://redis:6379/0\"").unwrap().unwrap();
        assert_eq!(s.on_error, OnClusterError::Local);
        assert_eq!(s.timeout, Duration::from_millis(50));
        assert!(!s.share_breakers);
        assert_eq!(s.key_prefix, "acc:");
        let s = parse("[cluster]\nredis_url = \"rediss://acc@redis:6380\"\non_cluster_error = \"fail_closed\"\npassword_env = \"REDIS_PW\"")
            .unwrap()
            .unwrap();
        assert_eq!((s.on_error, s.password_env.as_deref()), (OnClusterError::FailClosed, Some("REDIS_PW")));
    }

    #[test]
    fn refusals_name_the_field_and_never_the_password() {
        let e = parse("[cluster]\nredis_url = \"redis://:hunter2@redis:6379\"").unwrap_err();
        assert!(e[0].contains("p.toml: cluster.redis_url: has a password"), "{e:?}");
        assert!(!e[0].contains("hunter2"));
        let e = parse("[cluster]\nredis_url = \"http://redis:6379\"").unwrap_err();
        assert!(e[0].contains("scheme \"http\""), "{e:?}");
        let e = parse("[cluster]\nredis_url = \"redis://r\"\non_cluster_error = \"open\"\ntimeout_ms = 0").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(parse("[cluster]\npassword_env = \"X\"").is_err(), "redis_url is required");
    }
}
