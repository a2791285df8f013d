//! Policy files for the gateway under test: a temporary policy directory written atomically,
//! and TOML snippets for providers that point at mocks.

use std::path::Path;

use sha2::Digest as _;

use super::{Mock, Shape};

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
