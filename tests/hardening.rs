//! Hardening against hostile or careless peers, end to end through the binary: no secret the
//! gateway holds reaches a client, a log line, a metric, an admin view or a trace record,
//! whatever a provider or a helper command prints; internal details (a token command's
//! output, internal hosts and ports) stay in the logs.

mod common;

use common::*;
use serde_json::json;

/// The upstream key the gateway sends: a provider that echoes it must not leak it.
const KEY: &str = "sk-proj-LEAKME-7f3a9c0e12b44d8a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_echoes_the_key_leaks_it_nowhere() {
    let up = MockProvider::start().await;
    let policy = format!(
        "{}{}",
        openai_provider_with("up", &up, "api_key_env = \"ACC_TEST_ECHO_KEY\"\nbreaker = { enabled = false }"),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[("ACC_TEST_ECHO_KEY", KEY)]).await;
    let echo = format!("Invalid header Authorization: Bearer {KEY} (key {KEY})");
    let answers: Vec<(u16, String, &str)> = vec![
        (500, json!({"error": {"message": echo, "type": "server_error"}}).to_string(), "application/json"),
        (502, format!("<html><body><h1>502 Bad Gateway</h1><pre>{echo}</pre></body></html>"), "text/html"),
        (
            429,
            json!({"error": {"message": echo, "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
            "application/json",
        ),
        (
            422,
            json!({"error": {"message": echo, "type": "invalid_request_error", "param": "prompt"}}).to_string(),
            "application/json",
        ),
        (503, echo.clone(), "text/plain"),
    ];
    let mut trace_ids = Vec::new();
    for (status, body, content_type) in &answers {
        up.then(Step::reply(*status, body).header("content-type", content_type));
        let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse"})).await;
        assert!(r.status >= 400, "{}", r.describe());
        let text = r.text();
        assert!(!text.contains(KEY), "the {status} answer leaked the key to the client: {text}");
        for (name, value) in r.headers.iter() {
            assert!(!value.to_str().unwrap_or_default().contains(KEY), "header {name} leaked the key");
        }
        trace_ids.push(r.header("x-acc-trace-id").unwrap());
        if *status == 422 {
            // The client's own fault: the provider's answer is returned, with the key taken out.
            assert_eq!(r.status, 422, "{}", r.describe());
            assert!(text.contains("Bearer [REDACTED] (key [REDACTED])"), "{text}");
        }
    }
    // The upstream did get the key: the test exercises a real echo.
    assert_eq!(up.last_header("authorization").as_deref(), Some(format!("Bearer {KEY}").as_str()));
    for id in &trace_ids {
        let rec = gw.trace_record(id).await.text();
        assert!(!rec.contains(KEY), "the trace record leaked the key: {rec}");
    }
    let routes = gw.admin("GET", "/admin/routes").await.text();
    assert!(!routes.contains(KEY), "/admin/routes leaked the key: {routes}");
    let metrics = gw.metrics().await;
    assert!(!metrics.contains(KEY), "the metrics leaked the key");
    // The log is read as the gateway writes it: wait for the last failure's line. Logs carry
    // no provider message at all (it may quote the prompt): the status and the gateway's words.
    let logged = || gw.stderr().matches("attempt failed").count() >= answers.len();
    settles("every failed attempt is logged", logged).await;
    assert!(gw.stderr().contains("the provider's message is withheld"), "{}", gw.stderr());
    let log = gw.stderr();
    assert!(!log.contains(KEY), "the log leaked the key: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_details_reach_the_logs_but_not_the_client() {
    // A token command that fails, saying where it looked; a provider nobody listens on.
    let port = closed_port();
    let policy = format!(
        r#"[providers.vertex]
kind = "vertex_imagen"
base_url = "http://127.0.0.1:{port}"
project = "p"
location = "us-central1"
token_command = ["sh", "-c", "echo 'metadata.internal.example:8443 refused; token cache /var/run/secret' >&2; exit 3"]
breaker = {{ enabled = false }}

{}{}"#,
        openai_provider_at("down", &format!("http://127.0.0.1:{port}")),
        route_toml("main", "m").target("vertex", "imagen-3.0-generate-002").target("down", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse"})).await;
    let e = r.assert_error(502, "upstream_error");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("no usable credential"), "{message}");
    assert!(message.contains("could not connect to the provider"), "{message}");
    for internal in ["metadata.internal", "/var/run/secret", &format!("127.0.0.1:{port}"), &port.to_string()] {
        assert!(!message.contains(internal), "the client learnt {internal:?}: {message}");
    }
    settles("the operator sees the command's stderr in the log", || {
        gw.stderr().contains("metadata.internal.example:8443")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_signed_image_url_is_fetched() {
    // A file host that records what it was asked for (a signed cloud storage URL's shape).
    let png = noisy(64, 64, 7);
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap();
    let (served, seen) = (png.clone(), asked.clone());
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let (served, seen) = (served.clone(), seen.clone());
        async move {
            seen.lock().unwrap().push(uri.to_string());
            ([("content-type", "image/png")], served)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let signature = "0123456789abcdef".repeat(160);
    let path_and_query = format!(
        "/bucket/images/9f1c.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature={signature}"
    );
    // JSON writers often escape slashes: `\/`.
    let url = format!("http://{host}{path_and_query}");
    let escaped = url.replace('/', "\\/");
    let up = MockProvider::start().await;
    up.set_body(Some(&format!("{{\"created\": 1, \"data\": [{{\"url\": \"{escaped}\"}}]}}")));
    let policy = format!(
        "{}{}",
        openai_provider_with("up", &up, "fetch = { allow_hosts = [\"127.0.0.1\"] }"),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert!(url.len() > 2500, "the URL is long: {}", url.len());
    assert_eq!(b64_images(&r), vec![png]);
    assert_eq!(*asked.lock().unwrap(), vec![path_and_query]);

    // Past the documented bound (8 KiB) the answer is refused as malformed, and says why.
    let too_long = format!("http://{host}/x.png?sig={}", "a".repeat(8200)).replace('/', "\\/");
    up.set_body(Some(&format!("{{\"created\": 1, \"data\": [{{\"url\": \"{too_long}\"}}]}}")));
    let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
    let e = r.assert_error(502, "upstream_error");
    assert!(e["message"].as_str().unwrap().contains("longer than 8192 bytes"), "{e}");

    // A `data:` URL carries the image itself (fal's and some self-hosted servers' answers):
    // no length bound but the answer's, the scheme in any case, the image decoded from it.
    let big = noisy(96, 96, 3);
    for scheme in ["data", "DATA"] {
        let data_url = format!("{scheme}:image/png;base64,{}", b64_encode(&big));
        assert!(data_url.len() > 8192, "{}", data_url.len());
        up.set_body(Some(&format!("{{\"created\": 1, \"data\": [{{\"url\": \"{data_url}\"}}]}}")));
        let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
        r.assert_status(200);
        assert_eq!(b64_images(&r), vec![big.clone()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_non_global_address_form_is_refused_before_connecting() {
    // Something listening on loopback that must never be reached.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = reached.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let hosts = [
        "[::127.0.0.1]".to_string(),      // IPv4-compatible
        "[::ffff:127.0.0.1]".to_string(), // IPv4-mapped
        "[::ffff:7f00:1]".to_string(),    // IPv4-mapped, hex
        "[64:ff9b::7f00:1]".to_string(),  // NAT64
        "[2002:7f00:1::1]".to_string(),   // 6to4
        "[::1]".to_string(),              // loopback
        "[fe80::1]".to_string(),          // link-local
        "127.1".to_string(),              // short IPv4, as resolvers read it
        "2130706433".to_string(),         // 127.0.0.1 as one number
        "0x7f000001".to_string(),         // ... in hex
        "localhost".to_string(),
        "169.254.169.254".to_string(), // cloud metadata
        "[::ffff:169.254.169.254]".to_string(),
    ];
    let up = MockProvider::start().await;
    let policy = format!(
        "{}{}",
        openai_provider_with("up", &up, "breaker = { enabled = false }"),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    for host in &hosts {
        let url = format!("https://{host}:{port}/image.png");
        up.set_body(Some(&json!({"created": 1, "data": [{"url": url}]}).to_string()));
        let r = gw.generate(&json!({"model": "m", "prompt": "x", "response_format": "b64_json"})).await;
        assert!(r.status >= 500, "{url} was fetched: {}", r.describe());
        assert_eq!(r.attempts(), vec!["up:fetch_refused"], "{url}: {}", r.describe());
    }
    let refused = gw.metric("acc_fetch_refused_total", &[("provider", "up"), ("reason", "private_address")]).await;
    assert_eq!(refused, hosts.len() as f64, "every form refused as a private address");
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing connected to the loopback listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_are_parsed_strictly_and_forwarded_as_sent() {
    let up = MockProvider::start().await;
    let policy = format!("{}{}", openai_provider("up", &up), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    for size in
        ["+1024x+1024", "01024x1024", "1024x01024", " 1024x1024", "1024X1024", "1e3x1024", "-1024x1024", "1024x"]
    {
        let r = gw.generate(&json!({"model": "m", "prompt": "x", "size": size})).await;
        let e = r.assert_error(400, "invalid_value");
        assert_eq!(e["param"], "size", "{size:?}: {e}");
        let form = Form::new().text("model", "m").text("prompt", "x").text("size", size).file(
            "image",
            "in.png",
            "image/png",
            noisy(64, 64, 1),
        );
        gw.edit(&form, &[]).await.assert_error(400, "invalid_value");
    }
    assert_eq!(up.hits(), 0, "nothing malformed went upstream");
    gw.generate(&json!({"model": "m", "prompt": "x", "size": "1024x1536"})).await.assert_status(200);
    assert_eq!(up.last_body_json()["size"], "1024x1536");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_numbers_the_gateway_cannot_use_are_refused_by_check_and_reload() {
    let up = MockProvider::start().await;
    let good = format!("{}{}", openai_provider("up", &up), route_toml("main", "m").target("up", "gpt-image-1"));
    let dir = PolicyDir::with(&format!("[server]\nurl_ttl_secs = 9223372036854775807\n\n{good}"));
    let out = acc_check(dir.path());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("server.url_ttl_secs: 9223372036854775807 is more than a year (31536000 s)"), "{text}");
    for (bad, path) in [
        ("[server]\nmax_json_body_bytes = 4000000000000\n\n", "server.max_json_body_bytes"),
        ("[server]\nidempotency_ttl_secs = 100000000000\n\n", "server.idempotency_ttl_secs"),
        ("[tenants.t]\nspend_usd_per_day = nan\n\n", "tenants.t.spend_usd_per_day"),
    ] {
        let dir = PolicyDir::with(&format!("{bad}{good}"));
        let out = acc_check(dir.path());
        let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success() && text.contains(path), "{bad}: {text}");
    }

    // At run time, the same edit is refused at reload and the old policy keeps serving URLs.
    let (gw, dir) = serve_policy(&good, &[]).await;
    let before = live_version(&gw).await;
    dir.write("policy.toml", &format!("[server]\nurl_ttl_secs = 9223372036854775807\n\n{good}"));
    let r = gw.admin("POST", "/admin/reload").await;
    assert!(r.status >= 400, "{}", r.describe());
    assert!(r.text().contains("url_ttl_secs"), "{}", r.describe());
    assert_eq!(live_version(&gw).await, before);
    let r = gw.generate(&json!({"model": "m", "prompt": "x", "response_format": "url"})).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    get(&url, &[]).await.assert_status(200);
}

/// A policy of `server` settings (TOML lines, may be empty), provider `up` (the mock, with
/// `provider` settings) and route `main` (model "m") to it.
fn main_route(server: &str, up: &MockProvider, provider: &str) -> String {
    let server = if server.is_empty() { String::new() } else { format!("[server]\n{server}\n\n") };
    format!(
        "{server}{}{}",
        openai_provider_with("up", up, provider),
        route_toml("main", "m").target("up", "gpt-image-1")
    )
}

/// Opens a chunked upload to `path` that sends `prefix` of a JSON body, then one more byte every
/// `every` (never finishing); returns the connection (reading it gives the gateway's answer).
async fn slow_upload(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
    prefix: &[u8],
    every: std::time::Duration,
) -> tokio::task::JoinHandle<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if !prefix.is_empty() {
        s.write_all(format!("{:x}\r\n", prefix.len()).as_bytes()).await.unwrap();
        s.write_all(prefix).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    tokio::spawn(async move {
        let (mut r, mut w) = s.into_split();
        let drip = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if w.write_all(b"1\r\n \r\n").await.is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(20), r.read_to_end(&mut answer)).await;
        drip.abort();
        String::from_utf8_lossy(&answer).into_owned()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_off_and_hold_no_slot_meanwhile() {
    let up = MockProvider::start().await;
    let policy = main_route("max_in_flight = 8\nbody_timeout_ms = 1500\nmax_body_buffer_mib = 1", &up, "");
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let every = std::time::Duration::from_millis(200);
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(slow_upload(gw.proxy_addr, &[], br#"{"model": "m", "prompt": "#, every).await);
    }
    // Eight uploads are dripping: everybody else is still served.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..3 {
        gw.generate(&json!({"model": "m", "prompt": "a lighthouse"})).await.assert_status(200);
    }
    // The slow ones get 408 in the OpenAI error shape, and their connections are closed.
    for s in slow {
        let answer = s.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    // Memory for bodies is bounded in total: one upload holding 700 KB leaves no room for
    // another 700 KB, which is shed with 503 (and the first still times out).
    let big = format!("{{\"model\": \"m\", \"prompt\": \"{}", "x".repeat(700 << 10));
    let first = slow_upload(gw.proxy_addr, &[], big.as_bytes(), every).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = slow_upload(gw.proxy_addr, &[], big.as_bytes(), every).await;
    let answer = second.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{:.300}", answer);
    assert!(answer.contains("memory for them"), "{:.300}", answer);
    assert!(first.await.unwrap().starts_with("HTTP/1.1 408"));
    assert_eq!(gw.metric("acc_requests_total", &[("route", "none"), ("outcome", "overloaded")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_of_megabytes_reaches_the_client_bounded() {
    let up = MockProvider::start().await;
    let policy = main_route("", &up, "breaker = { enabled = false }");
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let req = json!({"model": "m", "prompt": "a lighthouse"});
    // An OpenAI-shaped 400 whose message is 20 MiB: read no further than its start, and the
    // client gets a bounded error of the client's kind, not the 20 MiB.
    let huge = json!({"error": {"message": "m".repeat(20 << 20), "type": "invalid_request_error", "param": "prompt", "code": "bad"}});
    up.set_error(400, &huge.to_string());
    let r = gw.generate(&req).await;
    let e = r.assert_error(400, "upstream_rejected");
    assert!(r.text().len() < 2048, "{} bytes", r.text().len());
    assert!(e["message"].as_str().unwrap().starts_with("upstream rejected the request: {\"error\""), "{e}");
    // A small answer with a megabyte-long code or param: each is cut to 100 characters.
    let long = json!({"error": {"message": "no", "type": "invalid_request_error", "param": "p".repeat(30_000), "code": "c".repeat(30_000)}});
    up.set_status(500);
    up.set_error(401, &long.to_string());
    let r = gw.generate(&req).await;
    assert_eq!(r.status, 502, "{}", r.describe());
    assert!(r.text().len() < 2048, "{} bytes", r.text().len());
    // The gateway keeps serving, on a fresh connection to the provider.
    up.set_status(200);
    gw.generate(&req).await.assert_status(200);
}

/// Sends `head` and all of `body` as a client SDK does (the whole body, then the answer) and
/// returns what came back; a reset while writing or reading is an `Err`.
async fn send_whole(addr: std::net::SocketAddr, head: String, body: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_a_refused_body_reads_the_error_not_a_reset() {
    let up = MockProvider::start().await;
    let policy = main_route("max_json_body_bytes = 1000000", &up, "");
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let big = format!("{{\"model\": \"m\", \"prompt\": \"{}\"}}", "x".repeat(16 << 20));
    let addr = gw.proxy_addr;
    // Declared too large: refused at once, before a byte of the body is read.
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let answer = send_whole(addr, head, big.as_bytes()).await.expect("the 413 is read, not a reset");
    assert!(answer.starts_with("HTTP/1.1 413"), "{:.300}", answer);
    assert!(answer.contains("\"code\":\"request_too_large\""), "{:.300}", answer);
    // Streamed without a length: refused once the limit is passed, mid-body.
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let mut chunked = Vec::new();
    for part in big.as_bytes().chunks(64 << 10) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = send_whole(addr, head, &chunked).await.expect("the 413 is read, not a reset");
    assert!(answer.starts_with("HTTP/1.1 413"), "{:.300}", answer);
    assert!(answer.contains("\"code\":\"request_too_large\""), "{:.300}", answer);
    // The gateway still serves.
    gw.generate(&json!({"model": "m", "prompt": "a lighthouse"})).await.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_can_be_held_to_its_share_of_requests_in_flight() {
    let up = MockProvider::start().await;
    up.set_latency(std::time::Duration::from_millis(800));
    let (busy, other) = ("sk-busy-tenant-key-1", "sk-other-tenant-key-2");
    let policy = format!(
        r#"[[keys]]
sha256 = "{}"
tenant = "busy"

[[keys]]
sha256 = "{}"
tenant = "other"

[tenants.busy]
max_in_flight = 2

{}{}"#,
        sha256_hex(busy),
        sha256_hex(other),
        openai_provider("up", &up),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let (busy_auth, other_auth) = (bearer(busy), bearer(other));
    let body = json!({"model": "m", "prompt": "a lighthouse"});
    let h = [("authorization", busy_auth.as_str())];
    let (a, b, c, d) = tokio::join!(
        gw.generate_with(&body, &h),
        gw.generate_with(&body, &h),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            gw.generate_with(&body, &h).await
        },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            gw.generate_with(&body, &[("authorization", other_auth.as_str())]).await
        },
    );
    a.assert_status(200);
    b.assert_status(200);
    let e = c.assert_error(429, "rate_limit_exceeded");
    assert!(e["message"].as_str().unwrap().contains("max_in_flight"), "{e}");
    assert_eq!(c.header("retry-after").as_deref(), Some("1"));
    d.assert_status(200);
    assert_eq!(gw.metric("acc_rate_limited_total", &[("tenant", "busy"), ("limit", "in_flight")]).await, 1.0);
    // Once they are answered, the tenant is served again.
    gw.generate_with(&body, &h).await.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_on_both_listeners_and_neither_starves_the_other() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockProvider::start().await;
    let policy = format!(
        "[server]\nidle_timeout_ms = 700\nadmin_max_connections = 4\n\n{}{}",
        openai_provider("up", &up),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    // Idle connections on both listeners: the admin listener's bound is taken.
    let mut idle = Vec::new();
    for addr in [gw.admin_addr; 4].into_iter().chain([gw.proxy_addr; 4]) {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The proxy serves all the same.
    gw.generate(&json!({"model": "m", "prompt": "a lighthouse"})).await.assert_status(200);
    // A fifth admin client waits for room, which the idle timeout makes.
    let started = std::time::Instant::now();
    let health = gw.admin("GET", "/healthz").await;
    health.assert_status(200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300), "served only once an idle one was closed");
    // Every idle connection was closed by the gateway (read gives end of stream).
    for mut s in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the gateway closes idle connections")
            .unwrap_or(0);
        assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    }
    // A kept-alive connection that goes quiet after a request is closed too.
    let mut s = tokio::net::TcpStream::connect(gw.admin_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(n.is_ok(), "the idle keep-alive connection was closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_nosniff_and_both_listeners_read_bearer_in_any_case() {
    let up = MockProvider::start().await;
    let key = "sk-case-test-key-0001";
    let policy = format!(
        "[[keys]]\nsha256 = \"{}\"\ntenant = \"t\"\n\n{}{}",
        sha256_hex(key),
        openai_provider("up", &up),
        route_toml("main", "m").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let body = json!({"model": "m", "prompt": "x", "response_format": "url"});
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme}  {key}");
        let r = gw.generate_with(&body, &[("authorization", auth.as_str())]).await;
        r.assert_status(200);
        assert_eq!(r.header("x-content-type-options").as_deref(), Some("nosniff"));
        let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
        let img = get(&url, &[]).await;
        assert_eq!(img.header("content-type").as_deref(), Some("image/png"));
        assert_eq!(img.header("x-content-type-options").as_deref(), Some("nosniff"));
        let admin_auth = format!("{scheme} {ADMIN_TOKEN}");
        let a = get(&gw.admin_url("/admin/routes"), &[("authorization", admin_auth.as_str())]).await;
        a.assert_status(200);
        assert_eq!(a.header("x-content-type-options").as_deref(), Some("nosniff"));
    }
    let e = gw.generate_with(&body, &[("authorization", &format!("Basic {key}"))]).await;
    e.assert_error(401, "invalid_api_key");
    assert_eq!(e.header("x-content-type-options").as_deref(), Some("nosniff"));
    let a = get(&gw.admin_url("/admin/routes"), &[("authorization", "Basic abc")]).await;
    a.assert_error(401, "missing_admin_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_never_come_from_a_missing_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockProvider::start().await;
    let route = route_toml("main", "m").target("up", "gpt-image-1");
    let (gw, _dir) = serve_policy(&format!("{}{route}", openai_provider("up", &up)), &[]).await;
    // HTTP/1.0 without Host, asking for a URL.
    let raw = |addr: std::net::SocketAddr| async move {
        let body = json!({"model": "m", "prompt": "x", "response_format": "url"}).to_string();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/images/generations HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = raw(gw.proxy_addr).await;
    assert!(answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"missing_host\""), "{answer}");
    assert_eq!(up.hits(), 0, "refused before anything was generated");
    drop(gw);
    // With a configured base, the URL is built from it.
    let policy =
        format!("[server]\npublic_base_url = \"https://img.example.com/\"\n\n{}{route}", openai_provider("up", &up));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let answer = raw(gw.proxy_addr).await;
    assert!(answer.contains("\"url\":\"https://img.example.com/v1/images/artifacts/"), "{answer}");
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without a Host header, or with two, is answered
/// 400 in the OpenAI error shape and nothing is generated (one with two Host headers used to be
/// served, which a front proxy may have routed by the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_needs_exactly_one_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockProvider::start().await;
    let route = route_toml("main", "m").target("up", "gpt-image-1");
    let (gw, _dir) = serve_policy(&format!("{}{route}", openai_provider("up", &up)), &[]).await;
    let body = json!({"model": "m", "prompt": "x"}).to_string();
    let admin: std::net::SocketAddr = gw.admin.trim_start_matches("http://").parse().unwrap();
    let raw_at = |addr: std::net::SocketAddr, line: &'static str, hosts: &'static str| {
        let body = body.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head =
                format!("{line}\r\n{hosts}content-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(body.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            // The connection is closed after the refusal.
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let raw = |hosts: &'static str| raw_at(gw.proxy_addr, "POST /v1/images/generations HTTP/1.1", hosts);
    let answer = raw("").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("\"code\":\"missing_host\"") && answer.contains("\"type\":\"invalid_request_error\""),
        "{answer}"
    );
    let answer = raw("host: a.example\r\nhost: b.example\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"invalid_host\""), "{answer}");
    assert_eq!(up.hits(), 0, "refused before anything was generated");
    // Not a host[:port], in any HTTP/1 version; two in HTTP/1.0 too.
    for bad in ["host: u@a.example\r\n", "host: a.example:99999\r\n"] {
        let answer = raw(bad).await;
        assert!(answer.contains("\"code\":\"invalid_host\""), "{bad}: {answer}");
    }
    let answer = raw_at(gw.proxy_addr, "POST /v1/images/generations HTTP/1.0", "host: a\r\nhost: b\r\n").await;
    assert!(answer.contains("\"code\":\"invalid_host\""), "{answer}");
    assert_eq!(up.hits(), 0, "refused before anything was generated");
    // The admin listener holds to the same rule.
    let answer = raw_at(admin, "GET /healthz HTTP/1.1", "").await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("\"code\":\"missing_host\""), "{answer}");
    let answer = raw_at(admin, "GET /healthz HTTP/1.1", "host: x\r\nconnection: close\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // One Host: served.
    let answer = raw("host: a.example\r\nconnection: close\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.300}");
    assert_eq!(up.hits(), 1);
}

/// A PNG whose header says `side`x`side` and whose pixel data would not decode: only a check of
/// the header can judge it (a real one of that size costs hundreds of MiB to decode).
fn header_only_png(side: u32) -> Vec<u8> {
    let mut b = noisy(4, 4, 1);
    b[16..20].copy_from_slice(&side.to_be_bytes());
    b[20..24].copy_from_slice(&side.to_be_bytes());
    // The IHDR chunk's CRC-32 (ISO 3309, as PNG specifies) over its type and data.
    let crc = b[12..29].iter().fold(!0u32, |mut c, &byte| {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
        c
    });
    b[29..33].copy_from_slice(&(!crc).to_be_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_image_is_judged_on_its_header_and_never_decoded() {
    let (first, second) = (MockProvider::start().await, MockProvider::start().await);
    first.answer_with(&header_only_png(8000));
    let ok = noisy(256, 256, 3);
    second.answer_with(&ok);
    let policy = format!(
        "{}{}{}{}",
        openai_provider("first", &first),
        openai_provider("second", &second),
        route_toml("main", "m").target("first", "x").fallback("spare").with("evaluators = [\"sanity\", \"safety\"]"),
        route_toml("spare", "spare").target("second", "y").with("evaluators = [\"sanity\"]"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let r = gw.generate(&json!({"model": "m", "prompt": "x", "size": "256x256", "response_format": "b64_json"})).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["first:eval_failed", "second:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![ok]);
    let trace_id = r.header("x-acc-trace-id").unwrap();
    let rec = gw.trace_record(&trace_id).await.text();
    assert!(rec.contains("image is 8000x8000, the request asked for 256x256"), "{rec}");
    assert!(rec.contains("not examined: image is 8000x8000"), "the safety model never saw it: {rec}");
}

/// Text from a provider reaches log lines by many paths (a refused image URL is logged with the
/// URL): whatever the path, a CR or LF in it never starts a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_text_never_forges_a_log_line() {
    let up = MockProvider::start().await;
    let policy =
        format!("{}{}", openai_provider_at("up", &up.base_url()), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let answer =
        json!({"created": 1, "data": [{"url": "http://img.example/a.png\r\nX-Injected: 1 forged\n\u{202e}x"}]});
    up.set_body(Some(&answer.to_string()));
    let r = gw.generate(&json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
    assert!(r.status >= 500, "{}", r.describe());
    settles("the refused URL is logged", || gw.stderr().contains("image URL refused")).await;
    let log = gw.stderr();
    assert!(log.contains("X-Injected: 1 forged"), "the URL is in the log: {log}");
    for line in log.lines() {
        assert!(!line.starts_with("X-Injected"), "a forged line: {line:?}\n{log}");
        assert!(!line.contains('\u{202e}') && !line.contains('\r'), "an unescaped control: {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_beyond_the_gateways_memory_for_them_are_refused_not_held() {
    // 1 MiB for provider answers being read, all attempts together; the provider answers one
    // image of 1.5 MiB (2 MiB of base64): the gateway reads no further, the client is told to
    // come back (503 and Retry-After, the gateway's load, not the provider's fault), and the
    // memory is given back: a small answer goes through right after.
    let up = MockProvider::start().await;
    let policy = main_route("max_answer_buffer_mib = 1", &up, "breaker = { consecutive_failures = 2 }");
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let req = json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"});
    let noise: Vec<u8> = (0..3u32 << 19).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    up.answer_with(&noise);
    for _ in 0..3 {
        let r = gw.generate(&req).await;
        let e = r.assert_error(503, "gateway_overloaded");
        assert!(e["message"].as_str().unwrap().contains("retry shortly"), "{e}");
        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{}", r.describe());
    }
    let metrics = gw.metrics().await;
    assert_eq!(metric_sum(&metrics, "acc_attempts_total", &[("result", "answer_memory_full")]), 3.0);
    // Not the provider's fault: its breaker stays closed.
    assert_eq!(metric_sum(&metrics, "acc_breaker_transitions_total", &[("provider", "up")]), 0.0);
    up.set_images(None);
    let r = gw.generate(&req).await;
    r.assert_status(200);
    assert!(r.json()["data"][0]["b64_json"].as_str().is_some_and(|s| !s.is_empty()), "{}", r.describe());
}

/// What a provider made is charged even when the client never gets it, and what is not an image
/// is never served as one. A provider's URL that 404s, or points at an HTML login page, or a
/// `b64_json` holding HTML: a helper found the first served no cost (the provider billed it,
/// the tenant's spend limit never saw it, and the fallback's image was paid too), and the other
/// two answered 200 with the HTML as the "image" on a route without evaluators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfetched_image_is_charged_and_what_is_not_an_image_is_never_served() {
    let png = noisy(32, 32, 5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap();
    let served = png.clone();
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let served = served.clone();
        async move {
            match uri.path() {
                "/ok.png" => (http::StatusCode::OK, [("content-type", "image/png")], served),
                "/login" => (
                    http::StatusCode::OK,
                    [("content-type", "image/png")],
                    b"<html><body>sign in</body></html>".to_vec(),
                ),
                _ => (http::StatusCode::NOT_FOUND, [("content-type", "text/plain")], b"gone".to_vec()),
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let up = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let policy = format!(
        "{}{}{}{}{}",
        openai_provider_with("up", &up, "price = { per_image_usd = 0.04 }\nfetch = { allow_hosts = [\"127.0.0.1\"] }"),
        openai_provider_with("backup", &backup, "price = { per_image_usd = 0.01 }"),
        route_toml("main", "m").target("up", "gpt-image-1").fallback("spare"),
        route_toml("spare", "spare-only").target("backup", "gpt-image-1"),
        route_toml("solo", "s").target("up", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let url_answer = |path: &str| format!("{{\"created\": 1, \"data\": [{{\"url\": \"http://{host}{path}\"}}]}}");
    let body = json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"});

    // The URL works: served, charged once.
    up.set_body(Some(&url_answer("/ok.png")));
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(b64_images(&r), vec![png.clone()]);
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", r.describe());

    // A 404 at the provider's URL: the fallback serves, and the request cost both images.
    up.set_body(Some(&url_answer("/gone.png")));
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["up:fetch_refused", "backup:ok"], "{}", r.describe());
    assert_eq!(r.header("x-acc-cost-usd").as_deref(), Some("0.05"), "{}", r.describe());
    let discarded =
        gw.metric("acc_cost_usd_total", &[("route", "main"), ("provider", "up"), ("kind", "discarded")]).await;
    assert!((discarded - 0.04).abs() < 1e-9, "{discarded}");

    // An HTML page at the URL, and HTML as b64_json: the provider's broken answer, not an image.
    up.set_body(Some(&url_answer("/login")));
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["up:bad_response", "backup:ok"], "{}", r.describe());
    assert_eq!(b64_images(&r), vec![backup.png().to_vec()]);
    let html = b64_encode(b"<!DOCTYPE html><html><body>Access denied</body></html>");
    up.set_body(Some(&format!("{{\"created\": 1, \"data\": [{{\"b64_json\": \"{html}\"}}]}}")));
    let r = gw.generate(&body).await;
    assert_eq!(r.attempts(), vec!["up:bad_response", "backup:ok"], "{}", r.describe());
    // A JPEG the provider labelled "png": served, and the answer says what it is.
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    up.set_body(Some(&format!(
        "{{\"created\": 1, \"output_format\": \"png\", \"data\": [{{\"b64_json\": \"{}\"}}]}}",
        b64_encode(&jpeg)
    )));
    let r = gw.generate(&body).await;
    r.assert_status(200);
    assert_eq!(r.attempts(), vec!["up:ok"], "{}", r.describe());
    assert_eq!(r.json()["output_format"], json!("jpeg"), "{}", r.describe());
    assert_eq!(b64_images(&r), vec![jpeg]);
    // A gzip body the gateway did not ask for (it asks for identity): a bad response that
    // says so, not "truncated JSON".
    assert_eq!(up.last_header("accept-encoding").as_deref(), Some("identity"));
    up.set_headers(vec![("content-encoding".into(), "gzip".into())]);
    let r = gw.generate(&json!({"model": "s", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
    let e = r.assert_error(502, "upstream_error");
    assert!(e["message"].as_str().unwrap().contains("gzip-encoded"), "{e}");
    assert_eq!(r.attempts(), vec!["up:bad_response"], "{}", r.describe());
    up.set_headers(vec![]);
    up.set_body(Some(&format!("{{\"created\": 1, \"data\": [{{\"b64_json\": \"{html}\"}}]}}")));
    // With nowhere to fall back: a 502 that says what was wrong, and no HTML for an image.
    let r = gw.generate(&json!({"model": "s", "prompt": "a lighthouse", "response_format": "b64_json"})).await;
    let e = r.assert_error(502, "upstream_error");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("is not a PNG, JPEG or WebP image") && msg.contains("<!DOCTYPE"), "{msg}");
    assert!(!String::from_utf8_lossy(&r.body).contains(&html), "the HTML is not in the answer");
}
