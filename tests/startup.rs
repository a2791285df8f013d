//! Start-up and shutdown: the loopback rule (no API keys = loopback only, also across reloads)
//! and graceful SIGTERM (drain in-flight requests, readyz 503, exit 0, no new connections).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const KEY: &str = "sk-acc-startup-test-3b1e";

fn keys_toml() -> String {
    format!("[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n\n", sha256_hex(KEY))
}

/// Builtin provider behind route `demo` (model "acc-demo"), with or without the test key.
fn builtin_policy(with_key: bool) -> String {
    format!(
        r#"{}
[providers.demo]
kind = "builtin"

[[routes]]
name = "demo"
match = {{ model = "acc-demo" }}
targets = [{{ provider = "demo", model = "demo" }}]
"#,
        if with_key { keys_toml() } else { String::new() }
    )
}

fn demo_req() -> serde_json::Value {
    json!({"model": "acc-demo", "prompt": "a quiet harbour", "size": "256x256", "response_format": "b64_json"})
}

async fn connect_refused(addr: std::net::SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await, Ok(Err(_)))
}

// ---------------------------------------------------------------------------------------------
// Loopback rule
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keys_on_a_public_listener_refuses_to_start() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let refusal = serve_expect_failure_on(dir.path(), "0.0.0.0:0", &[]);
    assert!(
        refusal.code.is_some_and(|c| c != 0),
        "acc serve --listen 0.0.0.0:0 without keys must exit non-zero, got {:?}\n--- stderr ---\n{}",
        refusal.code,
        refusal.stderr
    );
    let err = refusal.stderr.to_lowercase();
    assert!(
        err.contains("key") || err.contains("loopback"),
        "stderr must say why (keys / loopback):\n{}",
        refusal.stderr
    );
    assert!(!refusal.stdout.contains("listening"), "it printed a listening line: {}", refusal.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_on_a_public_listener_start_and_are_enforced() {
    let dir = PolicyDir::with(&builtin_policy(true));
    let gw = Gateway::start_on(dir.path(), "0.0.0.0:0", &[], &[]).await;

    let r = gw.generate(&demo_req()).await;
    let err = r.assert_error(401, "invalid_api_key");
    assert_eq!(err["type"], json!("invalid_request_error"), "{}", r.describe());
    let r = gw.generate_with(&demo_req(), &[("authorization", &bearer("sk-wrong"))]).await;
    r.assert_error(401, "invalid_api_key");

    let r = gw.generate_with(&demo_req(), &[("authorization", &bearer(KEY))]).await;
    assert_eq!(png_dims(&b64_images(&r)[0]), (256, 256));
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("demo"), "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_removing_all_keys_on_a_public_listener_is_refused() {
    let dir = PolicyDir::with(&builtin_policy(true));
    let gw = Gateway::start_on(dir.path(), "0.0.0.0:0", &[], &[]).await;
    let auth = bearer(KEY);
    gw.generate_with(&demo_req(), &[("authorization", &auth)]).await.assert_status(200);
    let version = live_version(&gw).await;
    let errors_before = gw.metric("acc_policy_reloads_total", &[("result", "error")]).await;

    dir.write("policy.toml", &builtin_policy(false));
    let refused = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_policy_reloads_total", &[("result", "error")]).await >= errors_before + 1.0
    })
    .await;
    assert!(
        refused,
        "acc_policy_reloads_total{{result=\"error\"}} did not grow within 5 s after the keys were removed:\n{}",
        gw.metrics().await
    );

    // The old keys are still enforced, the old policy is still live.
    gw.generate(&demo_req()).await.assert_error(401, "invalid_api_key");
    gw.generate_with(&demo_req(), &[("authorization", &auth)]).await.assert_status(200);
    assert_eq!(live_version(&gw).await, version, "the live policy version changed");

    // A forced reload says why.
    let r = gw.admin("POST", "/admin/reload").await;
    let err = r.assert_error_shape(422);
    let msg = err["message"].as_str().unwrap_or_default().to_lowercase();
    assert!(msg.contains("key"), "the reload error must mention keys: {}", r.describe());
    gw.generate(&demo_req()).await.assert_error(401, "invalid_api_key");

    // Putting keys back is accepted again.
    let ok_before = gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await;
    dir.write("policy.toml", &format!("{}\n# edited\n", builtin_policy(true)));
    let r = gw.admin("POST", "/admin/reload").await;
    r.assert_status(200);
    assert!(gw.metric("acc_policy_reloads_total", &[("result", "ok")]).await >= ok_before + 1.0);
    gw.generate_with(&demo_req(), &[("authorization", &auth)]).await.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_removing_all_keys_on_loopback_is_allowed() {
    let dir = PolicyDir::with(&builtin_policy(true));
    let gw = Gateway::start(dir.path()).await;
    gw.generate(&demo_req()).await.assert_error(401, "invalid_api_key");
    dir.write("policy.toml", &builtin_policy(false));
    let open = eventually(Duration::from_secs(20), || async { gw.generate(&demo_req()).await.status == 200 }).await;
    assert!(open, "on 127.0.0.1 a policy without keys must load (requests still 401 after 5 s)");
}

// ---------------------------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------------------------

fn slow_policy(mock: &MockProvider) -> String {
    let main =
        route_toml("main", "m").target("slow", "slow-model").with("attempt_timeout_ms = 60000\ndeadline_ms = 60000");
    format!("{}{main}", openai_provider("slow", mock))
}

fn slow_req() -> serde_json::Value {
    json!({"model": "m", "prompt": "take your time", "response_format": "b64_json"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_request_then_exits_zero() {
    let mock = MockProvider::start().await;
    mock.set_latency(Duration::from_millis(1500));
    let dir = PolicyDir::with(&slow_policy(&mock));
    let mut gw = Gateway::start(dir.path()).await;
    let r = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(r.status, 200, "readyz before shutdown: {}", r.describe());

    let url = gw.url("/v1/images/generations");
    let slow = tokio::spawn(async move { try_send_json(&url, &slow_req()).await });
    assert!(
        eventually(Duration::from_secs(20), || async { mock.hits() == 1 }).await,
        "the slow request never reached the provider"
    );

    let t0 = Instant::now();
    gw.sigterm();

    // readyz answers 503 while draining (the admin listener outlives the proxy's drain), so a
    // load balancer takes the replica out while its last requests finish.
    let mut readyz = None;
    while t0.elapsed() < Duration::from_secs(1) {
        match try_send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await {
            Ok(r) if r.status == 200 => tokio::time::sleep(Duration::from_millis(5)).await,
            Ok(r) => {
                assert_eq!(r.status, 503, "readyz while draining: {}", r.describe());
                assert_eq!(r.json()["status"], "draining", "readyz body: {}", r.describe());
                readyz = Some(format!("status {}", r.status));
                break;
            }
            Err(e) => panic!("readyz unreachable while a request is still draining: {e}"),
        }
    }
    let readyz = readyz.unwrap_or_else(|| panic!("readyz still answered 200 one second after SIGTERM"));
    eprintln!("readyz after SIGTERM: {readyz}");

    // No new connections while the old request is still in flight.
    let proxy_addr = gw.proxy_addr;
    assert!(
        eventually(Duration::from_millis(500), || connect_refused(proxy_addr)).await,
        "the proxy still accepts new connections {:?} after SIGTERM",
        t0.elapsed()
    );
    assert!(
        !slow.is_finished(),
        "the slow request finished ({:?} after SIGTERM) before new connections were refused",
        t0.elapsed()
    );
    assert!(gw.exited().is_none(), "the gateway exited with a request in flight");

    let r = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the in-flight request did not finish within 10 s of SIGTERM")
        .expect("task panicked")
        .unwrap_or_else(|e| panic!("the in-flight request failed during the drain: {e}\n{}", gw.stderr()));
    assert_eq!(b64_images(&r), vec![mock.png().to_vec()], "{}", r.describe());
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("slow"), "{}", r.describe());

    let status = gw
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the gateway was still running {:?} after SIGTERM\n{}", t0.elapsed(), gw.stderr()));
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", gw.stderr());
    assert!(t0.elapsed() < Duration::from_secs(6), "exit took {:?}", t0.elapsed());
    assert!(t0.elapsed() >= Duration::from_millis(1200), "exited before the request could finish: {:?}", t0.elapsed());

    // After shutdown both listeners are gone.
    assert!(connect_refused(gw.proxy_addr).await, "proxy port still accepts connections after exit");
    assert!(connect_refused(gw.admin_addr).await, "admin port still accepts connections after exit");
    assert!(try_send_json(&gw.url("/v1/images/generations"), &slow_req()).await.is_err());
    assert_eq!(mock.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gateway_exits_zero_promptly_on_sigterm() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let mut gw = Gateway::start(dir.path()).await;
    gw.generate(&demo_req()).await.assert_status(200);
    let t0 = Instant::now();
    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("an idle gateway was still running 3 s after SIGTERM\n{}", gw.stderr()));
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", gw.stderr());
    eprintln!("idle shutdown took {:?}", t0.elapsed());
    assert!(connect_refused(gw.proxy_addr).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_bounds_the_shutdown() {
    let mock = MockProvider::start().await;
    mock.set_latency(Duration::from_secs(30));
    let dir = PolicyDir::with(&slow_policy(&mock));
    let mut gw = Gateway::start_on(dir.path(), "127.0.0.1:0", &["--drain-secs", "1"], &[]).await;
    let url = gw.url("/v1/images/generations");
    let stuck = tokio::spawn(async move { try_send_json(&url, &slow_req()).await });
    assert!(
        eventually(Duration::from_secs(20), || async { mock.hits() == 1 }).await,
        "the slow request never reached the provider"
    );
    let t0 = Instant::now();
    gw.sigterm();
    let status = gw.wait_exit(Duration::from_secs(6)).await.unwrap_or_else(|| {
        panic!("with --drain-secs 1 the gateway was still running {:?} after SIGTERM\n{}", t0.elapsed(), gw.stderr())
    });
    assert!(t0.elapsed() >= Duration::from_millis(900), "exited before the drain deadline: {:?}", t0.elapsed());
    assert!(status.success(), "exit status after the drain deadline: {status}\n{}", gw.stderr());
    // The abandoned client is not left hanging.
    let r = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the abandoned request still hangs 5 s after the gateway exited")
        .expect("task panicked");
    assert!(r.is_err(), "the 30 s request cannot have succeeded: {:?}", r.map(|r| r.describe()));
}

async fn try_send_json(url: &str, body: &serde_json::Value) -> Result<Resp, String> {
    try_send("POST", url, &[("content-type", "application/json")], serde_json::to_vec(body).unwrap()).await
}

// ---------------------------------------------------------------------------------------------
// Start-up errors name what failed (issue 14)
// ---------------------------------------------------------------------------------------------

/// Runs `acc serve ARGS` (no ACC_* variables inherited) that must refuse to start: its exit code
/// and stderr. Killed, and the test failed, if it is still running after 30 s.
fn serve_refusal(args: &[&str]) -> (Option<i32>, String) {
    let mut child = acc_command()
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn acc serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("acc serve {args:?} was still running after 30 s:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_proxy_address_in_use_is_named_with_its_flag() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = serve_refusal(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--listen",
        &addr,
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!("acc: {addr} (--listen) is already in use: stop what listens there or choose another address"),
        "{stderr}"
    );
}

/// A second `acc serve` on the port of a running one is refused, not let into its
/// SO_REUSEPORT group (where it would silently take half the connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_proxy_port_is_refused() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let gw = Gateway::start(dir.path()).await;
    let addr = gw.proxy_addr.to_string();
    let args: Vec<String> =
        ["--policies", dir.path().to_str().unwrap(), "--listen", &addr, "--admin-listen", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serve_refusal(&args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!("acc: {addr} (--listen) is already in use: stop what listens there or choose another address"),
        "{stderr}"
    );
    gw.generate(&demo_req()).await.assert_status(200);
}

#[test]
fn an_admin_address_in_use_is_named_with_its_flag() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = serve_refusal(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        &addr,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!("acc: {addr} (--admin-listen) is already in use: stop what listens there or choose another address"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_policy_directory_is_named_with_its_flag() {
    let missing = tempfile::tempdir().unwrap().path().join("no-such-dir");
    let missing = missing.to_str().unwrap();
    let listen = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let (code, stderr) = serve_refusal(&[&["--policies", missing][..], &listen].concat());
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!(
            "acc: cannot read the policy directory {missing} (--policies / ACC_POLICIES): No such file or directory (os error 2)"
        ),
        "{stderr}"
    );

    // A policy file that is not text: the file and what is wrong with it.
    let dir = PolicyDir::new();
    std::fs::write(dir.path().join("broken.toml"), [0xff, 0xfe, 0x00, 0x81]).unwrap();
    let path = dir.path().to_str().unwrap();
    let (code, stderr) = serve_refusal(&[&["--policies", path][..], &listen].concat());
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!(
            "acc: cannot read the policy directory {path} (--policies / ACC_POLICIES): broken.toml: stream did not contain valid UTF-8"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("invalid policy"), "an unreadable file is not an invalid policy: {stderr}");
}

#[test]
fn a_bad_listen_value_is_named_with_its_flag_and_an_example() {
    let dir = PolicyDir::with(&builtin_policy(false));
    let policies = dir.path().to_str().unwrap();
    for (flag, value, hint) in [
        (
            "--listen",
            "localhost:8080",
            "give an IP address, not a host name, with a port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        ),
        ("--listen", "8080", "give an address with the port, e.g. 127.0.0.1:8080"),
        ("--admin-listen", "127.0.0.1", "expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"),
    ] {
        let (code, stderr) = serve_refusal(&["--policies", policies, flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            format!(
                "error: invalid value '{value}' for '{flag} <{}>': not an IP address and port: {hint}",
                flag.trim_start_matches("--").replace('-', "_").to_uppercase()
            ),
            "{stderr}"
        );
    }
}
