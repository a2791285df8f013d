//! The `acc` binary as a child process: `acc serve` on port 0 with its listening line parsed,
//! its logs collected, signals, admin calls and start-up refusals; plus polling helpers.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{get, metric_samples, metric_sum, post_form, post_json, send, Form, Resp};

/// Bearer token every test gateway requires on /admin/*.
pub const ADMIN_TOKEN: &str = "test-admin-token-5f2c";

/// How long a gateway may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
    // The default trace store (`data/acc.db`) is relative to the working directory: each
    // gateway keeps its own, beside its policy files, never in the repository.
    if policy_dir.is_absolute() && policy_dir.is_dir() {
        cmd.current_dir(policy_dir);
    }
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

    /// The trace record of `trace_id` as `GET /admin/traces/{id}` answers it, once the batching
    /// writer has written it (polled every 50 ms for up to 10 s; panics after).
    pub async fn trace_record(&self, trace_id: &str) -> Resp {
        for _ in 0..200 {
            let r = self.admin("GET", &format!("/admin/traces/{trace_id}")).await;
            if r.status == 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no trace record for {trace_id}");
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

/// The version label of the acc_policy_info series whose value is 1 (exactly one must be).
pub async fn live_version(gw: &Gateway) -> String {
    let text = gw.metrics().await;
    let live: Vec<String> = metric_samples(&text, "acc_policy_info")
        .into_iter()
        .filter(|(_, v)| *v == 1.0)
        .map(|(l, _)| l.get("version").cloned().unwrap_or_default())
        .collect();
    assert_eq!(live.len(), 1, "exactly one live acc_policy_info series expected:\n{text}");
    live[0].clone()
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

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

/// Waits (30 s at most: a loaded machine is slow, and a test that passes waits no longer) until `f`
/// holds; panics with `what` if not.
pub async fn settles(what: &str, f: impl Fn() -> bool) {
    assert!(eventually(Duration::from_secs(30), || async { f() }).await, "{what}");
}
