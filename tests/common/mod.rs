//! Shared helpers for the end-to-end tests: a running `acc` binary, an in-process mock
//! OpenAI-compatible image provider, a tiny HTTP client, policy files and Prometheus parsing.
//!
//! Every test binds port 0 everywhere, so tests can run in parallel.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sha2::Digest as _;

/// Bearer token every test gateway requires on /admin/*.
pub const ADMIN_TOKEN: &str = "test-admin-token-5f2c";

/// How long a gateway may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for any single HTTP exchange made by a test.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn acc_bin() -> &'static str {
    env!("CARGO_BIN_EXE_acc")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `Command` for the acc binary with no ACC_* variables inherited from the caller.
pub fn acc_command() -> Command {
    let mut cmd = Command::new(acc_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ACC_") {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn spawn_serve(policy_dir: &Path, env: &[(&str, &str)]) -> Child {
    spawn_serve_on(policy_dir, "127.0.0.1:0", &[], env)
}

/// `acc serve --policies DIR --listen LISTEN --admin-listen 127.0.0.1:0 EXTRA_ARGS...`
fn spawn_serve_on(policy_dir: &Path, listen: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = acc_command();
    cmd.arg("serve")
        .arg("--policies")
        .arg(policy_dir)
        .arg("--listen")
        .arg(listen)
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .args(extra_args)
        .env("ACC_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", acc_bin()))
}

/// Collects a child's stderr in the background (so the pipe never fills up).
fn collect_stderr(child: &mut Child) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("stderr piped");
    let b = buf.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    });
    (buf, handle)
}

/// Forwards a child's stdout lines to a channel (and keeps draining it afterwards).
fn collect_stdout(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    let _ = tx.send(l);
                }
                Err(_) => break,
            }
        }
    });
    rx
}

/// A running `acc serve`, killed when dropped.
pub struct Gateway {
    child: Child,
    /// e.g. `http://127.0.0.1:41234`
    pub proxy: String,
    /// e.g. `http://127.0.0.1:41235`
    pub admin: String,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub policy_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    pub async fn start(policy_dir: &Path) -> Gateway {
        Self::start_with_env(policy_dir, &[]).await
    }

    /// Starts `acc serve` on port 0 for both listeners and waits (30 s at most) for the
    /// `listening proxy=... admin=...` line on stdout.
    pub async fn start_with_env(policy_dir: &Path, env: &[(&str, &str)]) -> Gateway {
        Self::start_on(policy_dir, "127.0.0.1:0", &[], env).await
    }

    /// Like `start_with_env`, but the proxy listens on `listen` (e.g. `0.0.0.0:0`) and
    /// `extra_args` (e.g. `--drain-secs 1`) follow on the command line. An unspecified listen
    /// address (0.0.0.0 / ::) is reached through loopback: `proxy`/`proxy_addr` say 127.0.0.1.
    pub async fn start_on(policy_dir: &Path, listen: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut child = spawn_serve_on(policy_dir, listen, extra_args, env);
        let (stderr, stderr_thread) = collect_stderr(&mut child);
        let lines = collect_stdout(&mut child);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut other_stdout = Vec::new();
        loop {
            match lines.try_recv() {
                Ok(line) => {
                    if line.starts_with("listening ") {
                        let (mut proxy_addr, mut admin_addr) = parse_listening_line(&line);
                        for a in [&mut proxy_addr, &mut admin_addr] {
                            if a.ip().is_unspecified() {
                                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                            }
                        }
                        return Gateway {
                            child,
                            proxy: format!("http://{proxy_addr}"),
                            admin: format!("http://{admin_addr}"),
                            proxy_addr,
                            admin_addr,
                            policy_dir: policy_dir.to_path_buf(),
                            stderr,
                        };
                    }
                    other_stdout.push(line);
                    continue;
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = stderr_thread.join();
                panic!(
                    "acc serve exited ({status}) before printing its listening line\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    other_stdout.join("\n"),
                    stderr.lock().unwrap()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = stderr_thread.join();
                panic!(
                    "acc serve printed no `listening proxy=... admin=...` line within {START_TIMEOUT:?}\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    other_stdout.join("\n"),
                    stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the gateway wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `None` while running, the exit status once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{}", self.admin, path)
    }

    /// POST /v1/images/generations with a JSON body and extra headers.
    pub async fn generate_with(&self, body: &Value, headers: &[(&str, &str)]) -> Resp {
        post_json(&self.url("/v1/images/generations"), body, headers).await
    }

    pub async fn generate(&self, body: &Value) -> Resp {
        self.generate_with(body, &[]).await
    }

    /// GET /metrics on the admin listener (asserts 200).
    pub async fn metrics(&self) -> String {
        let r = get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    /// Admin call with the right token.
    pub async fn admin(&self, method: &str, path: &str) -> Resp {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        send(method, &self.admin_url(path), &[("authorization", &auth)], Vec::new()).await
    }

    /// SIGTERM to the gateway process (graceful shutdown).
    pub fn sigterm(&self) {
        let st = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {} failed: {st}", self.pid());
    }

    /// Waits (polling, without blocking the runtime) up to `within` for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POST /v1/images/edits with a multipart form.
    pub async fn edit(&self, form: &Form, headers: &[(&str, &str)]) -> Resp {
        post_form(&self.url("/v1/images/edits"), form, headers).await
    }

    /// POST /v1/images/variations with a multipart form.
    pub async fn variation(&self, form: &Form, headers: &[(&str, &str)]) -> Resp {
        post_form(&self.url("/v1/images/variations"), form, headers).await
    }

    /// SIGHUP to the gateway process.
    pub fn sighup(&self) {
        let st = Command::new("kill").arg("-HUP").arg(self.pid().to_string()).status().expect("run kill -HUP");
        assert!(st.success(), "kill -HUP {} failed: {st}", self.pid());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_listening_line(line: &str) -> (SocketAddr, SocketAddr) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert!(parts.len() == 3 && parts[0] == "listening", "unexpected listening line: {line:?}");
    let proxy = parts[1].strip_prefix("proxy=").unwrap_or_else(|| panic!("no proxy= in {line:?}"));
    let admin = parts[2].strip_prefix("admin=").unwrap_or_else(|| panic!("no admin= in {line:?}"));
    let proxy: SocketAddr = proxy.parse().unwrap_or_else(|e| panic!("bad proxy addr in {line:?}: {e}"));
    let admin: SocketAddr = admin.parse().unwrap_or_else(|e| panic!("bad admin addr in {line:?}: {e}"));
    assert_ne!(proxy.port(), 0, "proxy port 0 in {line:?}");
    assert_ne!(admin.port(), 0, "admin port 0 in {line:?}");
    (proxy, admin)
}

/// What a process that must refuse to start did.
pub struct Refusal {
    pub code: Option<i32>,
    pub stderr: String,
    pub stdout: String,
}

/// Runs `acc serve` on `policy_dir` and expects it to exit on its own within 30 s without ever
/// printing its listening line.
pub fn serve_expect_failure(policy_dir: &Path) -> Refusal {
    serve_expect_failure_on(policy_dir, "127.0.0.1:0", &[])
}

/// `serve_expect_failure` with the proxy listening on `listen` and extra arguments.
pub fn serve_expect_failure_on(policy_dir: &Path, listen: &str, extra_args: &[&str]) -> Refusal {
    let mut child = spawn_serve_on(policy_dir, listen, extra_args, &[]);
    let (stderr, stderr_thread) = collect_stderr(&mut child);
    let lines = collect_stdout(&mut child);
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = stderr_thread.join();
            let out: Vec<String> = lines.try_iter().collect();
            panic!(
                "acc serve on an invalid policy dir was still running after {START_TIMEOUT:?}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                out.join("\n"),
                stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = stderr_thread.join();
    // Give the stdout thread a moment to forward what it read.
    std::thread::sleep(Duration::from_millis(50));
    let out: Vec<String> = lines.try_iter().collect();
    let stderr = stderr.lock().unwrap().clone();
    Refusal { code: status.code(), stderr, stdout: out.join("\n") }
}

/// `acc check PATH`.
pub fn acc_check(path: &Path) -> std::process::Output {
    acc_command().arg("check").arg(path).output().unwrap_or_else(|e| panic!("cannot run acc check: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Policy files
// ---------------------------------------------------------------------------------------------

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
pub fn openai_provider(name: &str, mock: &MockProvider) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{}\"\n\n", mock.base_url())
}

/// TOML for an `openai`-kind provider pointing at a mock, with extra settings (TOML lines such
/// as `max_concurrency = 1`) in its table.
pub fn openai_provider_with(name: &str, mock: &MockProvider, extra: &str) -> String {
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

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response (status {}) is not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().expect("ascii header").to_string())
    }

    /// A compact description for assertion messages.
    pub fn describe(&self) -> String {
        let hs: Vec<String> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-acc") || *k == "content-type")
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        let mut body = self.text();
        if body.len() > 600 {
            body.truncate(600);
            body.push_str("...");
        }
        format!("status {} [{}] body {}", self.status, hs.join("; "), body)
    }

    /// The `x-acc-attempts` header split into `provider:result` items.
    pub fn attempts(&self) -> Vec<String> {
        let h =
            self.header("x-acc-attempts").unwrap_or_else(|| panic!("no x-acc-attempts header: {}", self.describe()));
        h.split(", ").map(|s| s.to_string()).collect()
    }

    /// `Retry-After` as whole seconds (panics when absent or not an integer).
    pub fn retry_after_secs(&self) -> u64 {
        let v = self.header("retry-after").unwrap_or_else(|| panic!("no retry-after header: {}", self.describe()));
        v.trim().parse().unwrap_or_else(|_| panic!("retry-after {v:?} is not integer seconds: {}", self.describe()))
    }

    pub fn assert_status(&self, status: u16) {
        assert_eq!(self.status, status, "unexpected status: {}", self.describe());
    }

    /// Asserts an OpenAI-shaped error with this code and returns its `error` object.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        let err = self.assert_error_shape(status);
        assert_eq!(err["code"], json!(code), "error.code: {}", self.describe());
        err
    }

    /// Asserts status and an OpenAI-shaped error body `{"error":{message,type,param,code}}`.
    pub fn assert_error_shape(&self, status: u16) -> Value {
        self.assert_status(status);
        let v = self.json();
        let err = v.get("error").unwrap_or_else(|| panic!("no error object: {}", self.describe()));
        for field in ["message", "type", "param", "code"] {
            assert!(err.get(field).is_some(), "error.{field} missing: {}", self.describe());
        }
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error.message must be a non-empty string: {}",
            self.describe()
        );
        assert!(err["type"].is_string(), "error.type must be a string: {}", self.describe());
        err.clone()
    }
}

pub async fn try_send(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<Resp, String> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("reading body: {e:?}"))?.to_bytes();
        Ok::<_, String>(Resp { status: parts.status.as_u16(), headers: parts.headers, body })
    };
    match tokio::time::timeout(HTTP_TIMEOUT, exchange).await {
        Ok(r) => r.map_err(|e| format!("{method} {url}: {e}")),
        Err(_) => Err(format!("{method} {url}: no answer within {HTTP_TIMEOUT:?}")),
    }
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Resp {
    try_send(method, url, headers, body).await.unwrap_or_else(|e| panic!("{e}"))
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    send("GET", url, headers, Vec::new()).await
}

pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    post_raw(url, serde_json::to_vec(body).unwrap(), headers).await
}

/// POST raw bytes as `application/json` (for malformed bodies).
pub async fn post_raw(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
    let mut hs: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    hs.extend_from_slice(headers);
    send("POST", url, &hs, body).await
}

// ---------------------------------------------------------------------------------------------
// multipart/form-data
// ---------------------------------------------------------------------------------------------

/// One part of a multipart form (sent by a test or parsed from what the mock received).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormPart {
    pub name: String,
    /// `Some` for file parts.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// A `multipart/form-data` body under construction, parts in order.
#[derive(Clone, Debug, Default)]
pub struct Form {
    pub parts: Vec<FormPart>,
}

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn text(mut self, name: &str, value: &str) -> Form {
        self.parts.push(FormPart {
            name: name.to_string(),
            filename: None,
            content_type: None,
            data: Bytes::copy_from_slice(value.as_bytes()),
        });
        self
    }

    pub fn file(mut self, name: &str, filename: &str, content_type: &str, data: impl Into<Bytes>) -> Form {
        self.parts.push(FormPart {
            name: name.to_string(),
            filename: Some(filename.to_string()),
            content_type: Some(content_type.to_string()),
            data: data.into(),
        });
        self
    }

    /// `(content-type header, body)`; the boundary never occurs in the parts.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let mut boundary = String::from("acc-test-boundary-7f3a9c");
        while self.parts.iter().any(|p| contains(&p.data, boundary.as_bytes())) {
            boundary.push('x');
        }
        let mut body = Vec::with_capacity(self.parts.iter().map(|p| p.data.len() + 200).sum::<usize>() + 64);
        for p in &self.parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match &p.filename {
                Some(f) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{}\"; filename=\"{f}\"\r\n", p.name).as_bytes(),
                ),
                None => body
                    .extend_from_slice(format!("Content-Disposition: form-data; name=\"{}\"\r\n", p.name).as_bytes()),
            }
            if let Some(ct) = &p.content_type {
                body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(&p.data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// POST a multipart form (its content type first, then `headers`).
pub async fn post_form(url: &str, form: &Form, headers: &[(&str, &str)]) -> Resp {
    let (ct, body) = form.encode();
    let mut hs: Vec<(&str, &str)> = vec![("content-type", &ct)];
    hs.extend_from_slice(headers);
    send("POST", url, &hs, body).await
}

/// Parses a `multipart/form-data` body (with the `content-type` header it came with).
pub async fn parse_form(content_type: &str, body: Bytes) -> Result<Vec<FormPart>, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| format!("content-type {content_type:?}: {e}"))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = mp.next_field().await.map_err(|e| format!("malformed multipart: {e}"))? {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.to_string());
        let data = field.bytes().await.map_err(|e| format!("malformed multipart part {name}: {e}"))?;
        parts.push(FormPart { name, filename, content_type, data });
    }
    Ok(parts)
}

impl Captured {
    /// The multipart form of this request (panics if it is not one).
    pub async fn form(&self) -> Vec<FormPart> {
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{} {}: no content-type", self.method, self.path))
            .to_string();
        assert!(
            ct.starts_with("multipart/form-data"),
            "{} {}: content-type {ct:?} is not multipart/form-data",
            self.method,
            self.path
        );
        parse_form(&ct, self.body.clone()).await.unwrap_or_else(|e| panic!("{} {}: {e}", self.method, self.path))
    }
}

/// The text of the only part called `name` (`None` if absent; panics if repeated or a file).
pub fn form_text(parts: &[FormPart], name: &str) -> Option<String> {
    let found: Vec<&FormPart> = parts.iter().filter(|p| p.name == name).collect();
    assert!(found.len() <= 1, "form field {name} occurs {} times", found.len());
    found.first().map(|p| {
        assert!(p.filename.is_none(), "form field {name} is a file ({:?}), not text", p.filename);
        String::from_utf8(p.data.to_vec()).unwrap_or_else(|_| panic!("form field {name} is not UTF-8"))
    })
}

/// Polls `f` every 50 ms until it returns true or `within` passes; returns whether it did.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Width and height from the IHDR chunk (bytes 16..24); panics if not a PNG.
pub fn png_dims(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() >= 24, "image too short for a PNG: {} bytes", bytes.len());
    assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG signature: {:02x?}", &bytes[..8]);
    assert_eq!(&bytes[12..16], b"IHDR", "first PNG chunk is not IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

pub fn b64_decode(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_else(|e| panic!("b64_json is not valid base64: {e}"))
}

pub fn b64_encode(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Decodes every `data[].b64_json` of a 200 answer.
pub fn b64_images(resp: &Resp) -> Vec<Vec<u8>> {
    resp.assert_status(200);
    let v = resp.json();
    let data = v["data"].as_array().unwrap_or_else(|| panic!("no data array: {}", resp.describe()));
    data.iter()
        .map(|d| {
            let s = d["b64_json"].as_str().unwrap_or_else(|| panic!("data item without b64_json: {}", resp.describe()));
            b64_decode(s)
        })
        .collect()
}

/// A small valid RGB PNG of the given size and colour.
pub fn make_png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("png header");
        let data: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
        w.write_image_data(&data).expect("png data");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Mock OpenAI-compatible provider
// ---------------------------------------------------------------------------------------------

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Captured {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A transport-level misbehaviour of the mock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Read the request (after the configured latency), then close the connection without
    /// answering anything.
    Reset,
    /// Send 200, the headers and the first part of the JSON body, then never finish it (the
    /// connection stays open until the other side gives up).
    StallMidBody,
}

/// How the mock answers one generation request; `None` fields keep the configured default.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub status: Option<u16>,
    pub latency: Option<Duration>,
    pub fault: Option<Fault>,
    /// The exact body (for a 200 or an error status alike).
    pub body: Option<String>,
}

impl Step {
    pub fn new() -> Step {
        Step::default()
    }

    /// A plain success, whatever the configured default is.
    pub fn ok() -> Step {
        Step::new().status(200).fault(Fault::None).latency(Duration::ZERO)
    }

    pub fn status(mut self, status: u16) -> Step {
        self.status = Some(status);
        self
    }

    pub fn latency(mut self, latency: Duration) -> Step {
        self.latency = Some(latency);
        self
    }

    pub fn fault(mut self, fault: Fault) -> Step {
        self.fault = Some(fault);
        self
    }

    pub fn body(mut self, body: &str) -> Step {
        self.body = Some(body.to_string());
        self
    }
}

#[derive(Clone, Debug)]
struct MockConfig {
    status: u16,
    error_body: Option<String>,
    latency: Duration,
    body_override: Option<String>,
    fault: Fault,
    headers: Vec<(String, String)>,
}

impl MockConfig {
    fn apply(&mut self, step: Step) {
        if let Some(s) = step.status {
            self.status = s;
            self.error_body = None;
            self.body_override = None;
        }
        if let Some(l) = step.latency {
            self.latency = l;
        }
        if let Some(f) = step.fault {
            self.fault = f;
        }
        if let Some(b) = step.body {
            self.error_body = Some(b.clone());
            self.body_override = Some(b);
        }
    }
}

struct MockInner {
    config: Mutex<MockConfig>,
    script: Mutex<std::collections::VecDeque<Step>>,
    hits: AtomicUsize,
    cancelled: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: Mutex<Vec<Captured>>,
    png: Vec<u8>,
}

/// An in-process OpenAI Images API on 127.0.0.1:0 (HTTP/1.1). Answers POST
/// {base}/images/generations, {base}/images/edits and {base}/images/variations (multipart; `n`
/// read from the form); its behaviour (status, latency, body, headers, transport faults, a
/// script for the next hits) can be changed while it runs.
#[derive(Clone)]
pub struct MockProvider {
    inner: Arc<MockInner>,
    pub addr: SocketAddr,
}

/// Returned by the mock's service to make hyper drop the connection without an answer.
#[derive(Debug)]
struct MockReset;

impl std::fmt::Display for MockReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock: connection reset on purpose")
    }
}

impl std::error::Error for MockReset {}

impl MockProvider {
    pub async fn start() -> MockProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(MockInner {
            config: Mutex::new(MockConfig {
                status: 200,
                error_body: None,
                latency: Duration::ZERO,
                body_override: None,
                fault: Fault::None,
                headers: Vec::new(),
            }),
            script: Mutex::new(std::collections::VecDeque::new()),
            hits: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            png: make_png(4, 4, [200, 40, 90]),
        });
        let state = inner.clone();
        // Our own accept loop (rather than axum::serve) so that a handler can make the
        // connection close without an answer (Fault::Reset): hyper drops the connection when the
        // service fails.
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of file descriptors or similar: retry rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move { handle_mock(state, req.map(axum::body::Body::new)).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockProvider { inner, addr }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The PNG the mock returns for every image when it succeeds.
    pub fn png(&self) -> &[u8] {
        &self.inner.png
    }

    /// Number of POST .../images/{generations,edits,variations} received (counted on arrival).
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// Generation requests whose handler was dropped before it answered: the other side closed
    /// the connection while the mock was still waiting out its latency.
    pub fn cancelled(&self) -> usize {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Generation requests being handled right now (waiting out their latency).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The highest `in_flight` seen so far.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// Answer every request with `status` and an OpenAI-shaped error body (200 = succeed).
    pub fn set_status(&self, status: u16) {
        let mut c = self.inner.config.lock().unwrap();
        c.status = status;
        c.error_body = None;
    }

    /// Answer with `status` and exactly this body.
    pub fn set_error(&self, status: u16, body: &str) {
        let mut c = self.inner.config.lock().unwrap();
        c.status = status;
        c.error_body = Some(body.to_string());
    }

    /// Wait this long before answering.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.config.lock().unwrap().latency = latency;
    }

    /// Misbehave at the transport level on every generation request (`Fault::None` = stop).
    pub fn set_fault(&self, fault: Fault) {
        self.inner.config.lock().unwrap().fault = fault;
    }

    /// Extra headers on every answer, e.g. `("retry-after", "2")` with `set_status(429)`
    /// (an empty list = none).
    pub fn set_headers(&self, headers: Vec<(String, String)>) {
        self.inner.config.lock().unwrap().headers = headers;
    }

    /// Behaviours for the next generation requests, one consumed per hit, in order; after the
    /// last one the configured default applies again. Replaces any script not yet consumed.
    pub fn script(&self, steps: Vec<Step>) {
        *self.inner.script.lock().unwrap() = steps.into();
    }

    /// Answer every request with this one image (base64), whatever `n` was asked.
    pub fn answer_with(&self, image: &[u8]) {
        let body = json!({"created": 1, "data": [{"b64_json": b64_encode(image)}]}).to_string();
        self.set_body(Some(&body));
    }

    /// Answer 200 with exactly this body instead of the normal JSON (None = back to normal).
    pub fn set_body(&self, body: Option<&str>) {
        self.inner.config.lock().unwrap().body_override = body.map(|s| s.to_string());
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<Captured> {
        self.inner.requests.lock().unwrap().last().cloned()
    }

    pub fn last_body_json(&self) -> Value {
        let r = self.last_request().expect("mock received no request");
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("gateway sent a non-JSON body ({e}): {}", String::from_utf8_lossy(&r.body)))
    }

    pub fn last_header(&self, name: &str) -> Option<String> {
        self.last_request().and_then(|r| r.headers.get(name).map(|v| v.to_str().unwrap_or("").to_string()))
    }
}

/// Counts a generation request in flight; one dropped before `finish` was cancelled.
struct InFlightGuard {
    state: Arc<MockInner>,
    finished: bool,
}

impl InFlightGuard {
    fn new(state: Arc<MockInner>) -> InFlightGuard {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlightGuard { state, finished: false }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn handle_mock(
    state: Arc<MockInner>,
    req: axum::extract::Request,
) -> Result<axum::response::Response, MockReset> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let is_generation = parts.method == http::Method::POST
        && matches!(path.as_str(), "/v1/images/generations" | "/v1/images/edits" | "/v1/images/variations");
    state.requests.lock().unwrap().push(Captured {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let mut cfg = state.config.lock().unwrap().clone();
    if !is_generation {
        return Ok(mock_reply(
            404,
            r#"{"error":{"message":"mock: no such endpoint","type":"invalid_request_error","param":null,"code":null}}"#
                .to_string(),
            &cfg.headers,
        ));
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(step) = state.script.lock().unwrap().pop_front() {
        cfg.apply(step);
    }
    let guard = InFlightGuard::new(state.clone());
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    guard.finish();
    match cfg.fault {
        Fault::None => {}
        Fault::Reset => return Err(MockReset),
        Fault::StallMidBody => {
            let first = Bytes::from(format!(r#"{{"created": 1, "data": [{{"b64_json": "{}"#, b64_encode(&state.png)));
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
                futures_util::stream::pending(),
            );
            let mut b = axum::response::Response::builder().status(200).header("content-type", "application/json");
            for (k, v) in &cfg.headers {
                b = b.header(k.as_str(), v.as_str());
            }
            return Ok(b.body(axum::body::Body::from_stream(stream)).unwrap());
        }
    }
    if cfg.status != 200 {
        let body = cfg.error_body.unwrap_or_else(|| {
            json!({"error": {
                "message": format!("mock provider failure {}", cfg.status),
                "type": if cfg.status >= 500 { "server_error" } else { "invalid_request_error" },
                "param": null,
                "code": null,
            }})
            .to_string()
        });
        return Ok(mock_reply(cfg.status, body, &cfg.headers));
    }
    if let Some(b) = cfg.body_override {
        return Ok(mock_reply(200, b, &cfg.headers));
    }
    let ct = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let n = if ct.starts_with("multipart/form-data") {
        parse_form(&ct, body.clone())
            .await
            .ok()
            .and_then(|f| f.into_iter().find(|p| p.name == "n"))
            .and_then(|p| std::str::from_utf8(&p.data).ok().and_then(|t| t.trim().parse::<u64>().ok()))
    } else {
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("n").and_then(|n| n.as_u64()))
    }
    .unwrap_or(1)
    .clamp(1, 10);
    let b64 = b64_encode(&state.png);
    let data: Vec<Value> = (0..n).map(|_| json!({"b64_json": b64})).collect();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    Ok(mock_reply(200, json!({"created": created, "data": data}).to_string(), &cfg.headers))
}

fn mock_reply(status: u16, body: String, headers: &[(String, String)]) -> axum::response::Response {
    let mut b = axum::response::Response::builder().status(status).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(axum::body::Body::from(body)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

/// All samples of metric `name` (exact name, e.g. `acc_request_duration_seconds_count`).
pub fn metric_samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if &line[..name_end] != name {
            continue;
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let (parsed, after) = parse_labels(&rest[1..]);
            labels = parsed;
            rest = after;
        }
        let value = rest.split_whitespace().next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad sample value in {line:?}")),
        };
        out.push((labels, value));
    }
    out
}

fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices().peekable();
    loop {
        // skip separators
        while let Some(&(_, c)) = chars.peek() {
            if c == ',' || c == ' ' {
                chars.next();
            } else {
                break;
            }
        }
        let Some(&(i, c)) = chars.peek() else { return (labels, "") };
        if c == '}' {
            return (labels, &s[i + 1..]);
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        chars.next(); // '='
        chars.next(); // '"'
        let mut value = String::new();
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// Sum of the samples of `name` whose labels include all of `labels` (0 if none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_samples(text, name)
        .into_iter()
        .filter(|(ls, _)| labels.iter().all(|(k, v)| ls.get(*k).map(|x| x.as_str()) == Some(*v)))
        .map(|(_, v)| v)
        .sum()
}
