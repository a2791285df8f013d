//! Policy files for the gateway under test: a temporary policy directory written atomically,
//! and TOML snippets for providers that point at mocks.

use std::path::Path;

use sha2::Digest as _;

use super::{Gateway, Mock, Shape};

/// A temporary policy directory.
pub struct PolicyDir {
    dir: tempfile::TempDir,
}

impl PolicyDir {
    pub fn new() -> PolicyDir {
        PolicyDir { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// A policy dir holding one file, `policy.toml`.
    pub fn with(content: &str) -> PolicyDir {
        let d = PolicyDir::new();
        d.write("policy.toml", content);
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` atomically (temp file without the .toml suffix, then rename), so that a
    /// polling gateway never sees half a file.
    pub fn write(&self, name: &str, content: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write policy tmp");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename policy file");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove policy file");
    }
}

/// TOML for an `openai`-kind provider pointing at a mock.
pub fn openai_provider<S: Shape>(name: &str, mock: &Mock<S>) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{}\"\n\n", mock.base_url())
}

/// TOML for an `openai`-kind provider pointing at a mock, with extra settings (TOML lines such
/// as `max_concurrency = 1`) in its table.
pub fn openai_provider_with<S: Shape>(name: &str, mock: &Mock<S>, extra: &str) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{}\"\n{}\n\n", mock.base_url(), extra.trim())
}

/// TOML for an `openai`-kind provider pointing at an arbitrary base URL.
pub fn openai_provider_at(name: &str, base_url: &str) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{base_url}\"\n\n")
}

/// A 127.0.0.1 port on which nothing listens (bound then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// A `[[routes]]` table under construction (`Display` writes it, with a blank line after).
#[derive(Clone, Debug)]
pub struct RouteToml {
    name: String,
    model: String,
    targets: Vec<String>,
    fallbacks: Vec<String>,
    extra: Vec<String>,
}

/// Route `name`, matching requests for `model`; add targets, fallbacks and settings.
pub fn route_toml(name: &str, model: &str) -> RouteToml {
    RouteToml {
        name: name.to_string(),
        model: model.to_string(),
        targets: Vec::new(),
        fallbacks: Vec::new(),
        extra: Vec::new(),
    }
}

impl RouteToml {
    /// One more target: `provider` asked for the upstream `model`.
    pub fn target(mut self, provider: &str, model: &str) -> RouteToml {
        self.targets.push(format!("{{ provider = \"{provider}\", model = \"{model}\" }}"));
        self
    }

    /// One more target: `provider` with its default model.
    pub fn target_default(mut self, provider: &str) -> RouteToml {
        self.targets.push(format!("{{ provider = \"{provider}\" }}"));
        self
    }

    /// One more fallback route.
    pub fn fallback(mut self, route: &str) -> RouteToml {
        self.fallbacks.push(format!("\"{route}\""));
        self
    }

    /// More TOML lines in the table (e.g. `attempt_timeout_ms = 300`; empty = none).
    pub fn with(mut self, lines: &str) -> RouteToml {
        if !lines.trim().is_empty() {
            self.extra.push(lines.trim().to_string());
        }
        self
    }
}

impl std::fmt::Display for RouteToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "[[routes]]\nname = \"{}\"\nmatch = {{ model = \"{}\" }}", self.name, self.model)?;
        writeln!(f, "targets = [{}]", self.targets.join(", "))?;
        if !self.fallbacks.is_empty() {
            writeln!(f, "fallbacks = [{}]", self.fallbacks.join(", "))?;
        }
        for e in &self.extra {
            writeln!(f, "{e}")?;
        }
        writeln!(f)
    }
}

/// `acc serve` on a policy directory holding `policy` as policy.toml, with `env` set.
pub async fn serve_policy(policy: &str, env: &[(&str, &str)]) -> (Gateway, PolicyDir) {
    let dir = PolicyDir::with(policy);
    let gw = Gateway::start_with_env(dir.path(), env).await;
    (gw, dir)
}
