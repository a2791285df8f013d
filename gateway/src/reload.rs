//! The live policy: prepare a new snapshot completely (read, validate, build adapters), then
//! swap it in atomically. In-flight requests keep the snapshot they started with; a bad edit
//! keeps the last good policy, is logged with its file and path, and is counted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::live::{Live, TargetLive};
use crate::metrics::{Metrics, RouteMetrics};
use crate::mirror::{self, RouteCandidates};
use crate::policy::{self, Policy, Sources};
use crate::providers::{self, Provider};

/// The policy text compiled into the binary, used when no policy directory exists.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../policies/default.toml");

/// Everything a request needs from the policy, fixed for the request's lifetime.
pub struct Snapshot {
    pub policy: Policy,
    /// The adapter of each route's each target, indexed like `policy.routes[r].targets[t]`.
    pub target_providers: Vec<Vec<Arc<dyn Provider>>>,
    /// Metric handles of the success path, resolved once per policy instead of per request.
    pub hot: Vec<RouteMetrics>,
    /// Health window and provider state of each route target, indexed like `target_providers`.
    pub live: Vec<Vec<TargetLive>>,
    /// Mirror and canary state of each route.
    pub candidates: Vec<RouteCandidates>,
    pub loaded_at: SystemTime,
}

/// Where policies come from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    Dir(PathBuf),
    Embedded,
}

impl PolicySource {
    fn read(&self) -> Result<Sources, Vec<String>> {
        match self {
            PolicySource::Dir(p) => Sources::read(p),
            PolicySource::Embedded => {
                Ok(Sources { files: vec![("default.toml (embedded)".into(), EMBEDDED_DEFAULT.into())] })
            }
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub last_error: Option<Vec<String>>,
    pub last_error_at_unix: Option<u64>,
}

pub struct PolicyStore {
    current: ArcSwap<Snapshot>,
    source: PolicySource,
    metrics: Arc<Metrics>,
    /// Provider and target state learnt while running; outlives snapshots.
    pub live: Arc<Live>,
    /// Mirror and canary state; outlives snapshots.
    migrations: mirror::Registry,
    /// The proxy listens beyond loopback: a policy must then configure API keys.
    public_listener: bool,
    /// Sources of the last reload attempt, so polling retries nothing that has not changed.
    last_seen: Mutex<Option<Sources>>,
    /// What the last poll read when it differed from `last_seen` (`None` inside: the directory
    /// could not be read): a poll applies a change only once it reads the same again, so a
    /// file caught while being written (`scp`, `cat >`, a slow pipe) is not served as it was
    /// half way, even when that half parses (issue: a valid prefix dropped every later route).
    settling: Mutex<Option<Option<Sources>>>,
    status: Mutex<ReloadStatus>,
    /// One reload at a time (poll, SIGHUP and the admin endpoint can coincide).
    reloading: tokio::sync::Mutex<()>,
    /// `[store]`, `[telemetry]` and `[cluster]` as the gateway started with them: they take
    /// effect at start-up only, and a reload that changes them says so.
    started_with: (
        crate::policy::StoreSettings,
        Option<crate::policy::TelemetrySettings>,
        Option<crate::policy::ClusterSettings>,
        ConnSettings,
        Option<crate::policy::TlsFiles>,
    ),
}

/// `[server]`'s connection settings, read when the listeners start: `idle_timeout_ms`,
/// `max_connections`, `admin_max_connections`.
type ConnSettings = (Duration, Option<usize>, usize);

fn conn_settings(s: &crate::policy::ServerSettings) -> ConnSettings {
    (s.idle_timeout, s.max_connections, s.admin_max_connections)
}

impl PolicyStore {
    /// Loads the initial policy; errors mean the gateway must not start.
    pub fn open(
        source: PolicySource,
        metrics: Arc<Metrics>,
        public_listener: bool,
    ) -> Result<PolicyStore, Vec<String>> {
        let sources = source.read()?;
        let live = Arc::new(Live::default());
        let migrations = mirror::Registry::default();
        let snapshot = prepare(&sources, public_listener, &metrics, &live, &migrations)?;
        metrics.set_policy_version(None, &snapshot.policy.version);
        let started_with = (
            snapshot.policy.store.clone(),
            snapshot.policy.telemetry.clone(),
            snapshot.policy.cluster.clone(),
            conn_settings(&snapshot.policy.server),
            snapshot.policy.server.tls.clone(),
        );
        Ok(PolicyStore {
            started_with,
            current: ArcSwap::from_pointee(snapshot),
            source,
            metrics,
            live,
            migrations,
            public_listener,
            last_seen: Mutex::new(Some(sources)),
            settling: Mutex::new(None),
            status: Mutex::new(ReloadStatus::default()),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the policy. With `force` false (polling) nothing happens unless the files changed
    /// since the last attempt. Returns the version now served, or the validation errors.
    pub async fn reload(&self, force: bool, trigger: &str) -> Result<String, Vec<String>> {
        let _guard = self.reloading.lock().await;
        let source = self.source.clone();
        let sources = tokio::task::spawn_blocking(move || source.read())
            .await
            .unwrap_or_else(|e| Err(vec![format!("reading policies failed: {e}")]));
        let changed = {
            let mut last = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            let same = matches!((&*last, &sources), (Some(a), Ok(b)) if a == b);
            // Polling: a change is applied when two polls in a row read it alike.
            let mut settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
            let read = sources.as_ref().ok().cloned();
            if !force && !same && settling.as_ref() != Some(&read) {
                *settling = Some(read);
                return Ok(self.current.load().policy.version.clone());
            }
            *settling = None;
            // A directory that cannot be read was seen as nothing: when it comes back, even as it
            // was, it is read as a change, so the error it caused is cleared by a reload.
            *last = sources.as_ref().ok().cloned();
            !same
        };
        if !force && !changed {
            return Ok(self.current.load().policy.version.clone());
        }
        let result =
            sources.and_then(|s| prepare(&s, self.public_listener, &self.metrics, &self.live, &self.migrations));
        match result {
            Ok(mut snapshot) => {
                // Settings read once at start-up: the running ones stay until a restart.
                if snapshot.policy.store != self.started_with.0 {
                    snapshot.policy.warnings.push(
                        "[store] differs from the one the gateway started with; it takes effect at the next restart"
                            .into(),
                    );
                }
                if snapshot.policy.telemetry != self.started_with.1 {
                    snapshot.policy.warnings.push(
                        "[telemetry] differs from the one the gateway started with; it takes effect at the next restart".into(),
                    );
                }
                if conn_settings(&snapshot.policy.server) != self.started_with.3 {
                    snapshot.policy.warnings.push(
                        "[server] idle_timeout_ms, max_connections and admin_max_connections differ from the ones the listeners started with; they take effect at the next restart".into(),
                    );
                }
                if snapshot.policy.server.tls != self.started_with.4 {
                    let how = match (&self.started_with.4, &snapshot.policy.server.tls) {
                        (None, Some(_)) => "the listeners started without TLS and serve plain HTTP until a restart",
                        (Some(_), None) => "the listeners started with TLS and keep it until a restart",
                        _ => "the listeners keep serving the certificate in the files they started with (reloaded when those files change) until a restart",
                    };
                    snapshot
                        .policy
                        .warnings
                        .push(format!("[server.tls] differs from the one the gateway started with: {how}"));
                }
                if snapshot.policy.cluster != self.started_with.2 {
                    snapshot.policy.warnings.push(
                        "[cluster] differs from the one the gateway started with; it takes effect at the next restart (the running replica keeps its Redis, its on_cluster_error and its deadlines)".into(),
                    );
                }
                let version = snapshot.policy.version.clone();
                let old = self.current.load().policy.version.clone();
                for w in &snapshot.policy.warnings {
                    tracing::warn!(trigger, "policy warning: {w}");
                }
                self.current.store(Arc::new(snapshot));
                self.metrics.set_policy_version(Some(&old), &version);
                self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                st.last_error = None;
                st.last_error_at_unix = None;
                tracing::info!(trigger, version = %version, previous = %old, "policy reloaded");
                Ok(version)
            }
            Err(errors) => {
                self.metrics.policy_reloads.with_label_values(&["error"]).inc();
                for e in &errors {
                    tracing::error!(trigger, "policy reload refused, keeping the last good policy: {e}");
                }
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                st.last_error = Some(errors.clone());
                st.last_error_at_unix =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs());
                Err(errors)
            }
        }
    }

    /// Polls for edits every `every` until `cancel` fires.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: tokio_util::sync::CancellationToken) {
        if matches!(self.source, PolicySource::Embedded) {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { let _ = self.reload(false, "poll").await; }
            }
        }
    }
}

/// All fallible work of a reload: validate, check listener constraints, build adapters.
fn prepare(
    sources: &Sources,
    public_listener: bool,
    metrics: &Metrics,
    live: &Live,
    migrations: &mirror::Registry,
) -> Result<Snapshot, Vec<String>> {
    let policy = policy::validate(sources)?;
    if public_listener && policy.keys.is_empty() {
        return Err(vec![
            "keys: no API keys are configured, and the proxy listens beyond loopback; add [[keys]] or listen on 127.0.0.1".into(),
        ]);
    }
    let providers: HashMap<String, Arc<dyn Provider>> =
        policy.providers.iter().map(|(name, spec)| (name.clone(), providers::build(spec))).collect();
    // Validation guarantees every target names a defined provider.
    let target_providers =
        policy.routes.iter().map(|r| r.targets.iter().map(|t| providers[&t.provider].clone()).collect()).collect();
    let hot = policy.routes.iter().map(|r| metrics.route_metrics(r)).collect();
    let candidates = migrations.candidates(&policy);
    let live = live.resolve(&policy);
    Ok(Snapshot { policy, target_providers, hot, live, candidates, loaded_at: SystemTime::now() })
}
