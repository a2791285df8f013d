//! TLS on both listeners (`[server.tls]`), through the binary, with certificates the test
//! generates: HTTP/1.1 on both, HTTP/2 by ALPN on the proxy, no plain HTTP, a renewed
//! certificate served without a restart, and a key that does not match refused by `acc check`.

mod common;

use std::sync::Arc;

use common::*;
use http_body_util::BodyExt;
use serde_json::json;

/// A self-signed certificate for localhost and its key, as PEM.
fn certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// A TLS client trusting `cert_pem`, offering `alpn`.
fn connector(cert_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn handshake(addr: std::net::SocketAddr, cert_pem: &str, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector(cert_pem, alpn).connect(name, tcp).await
}

/// Sends one request on a TLS connection (HTTP/2 when ALPN chose it); returns status and body.
async fn send(tls: Tls, req: http::Request<String>) -> (u16, String) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    let resp = if h2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn generation(h2: bool) -> http::Request<String> {
    let mut b =
        http::Request::post("https://localhost/v1/images/generations").header("content-type", "application/json");
    if !h2 {
        b = b.header("host", "localhost");
    }
    b.body(json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"}).to_string()).unwrap()
}

fn tls_policy(dir: &PolicyDir, up: &MockProvider) -> String {
    format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n{}{}",
        dir.path().join("tls/cert.pem").display(),
        dir.path().join("tls/key.pem").display(),
        openai_provider("up", up),
        route_toml("main", "m").target("up", "gpt-image-1"),
    )
}

fn write_pair(dir: &PolicyDir, (cert, key): &(String, String)) {
    std::fs::create_dir_all(dir.path().join("tls")).unwrap();
    std::fs::write(dir.path().join("tls/key.pem"), key).unwrap();
    std::fs::write(dir.path().join("tls/cert.pem"), cert).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_speak_tls_and_the_proxy_http2_by_alpn() {
    let up = MockProvider::start().await;
    let dir = PolicyDir::new();
    let pair = certificate();
    write_pair(&dir, &pair);
    dir.write("policy.toml", &tls_policy(&dir, &up));
    let gw = Gateway::start(dir.path()).await;

    // HTTP/1.1 over TLS on the proxy.
    let tls = handshake(gw.proxy_addr, &pair.0, &[b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = send(tls, generation(false)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("b64_json"), "{body:.200}");
    // HTTP/2 when the client offers it.
    let tls = handshake(gw.proxy_addr, &pair.0, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert!(matches!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3)));
    let (status, body) = send(tls, generation(true)).await;
    assert_eq!(status, 200, "{body}");
    // The admin listener: TLS, HTTP/1.1 only.
    let tls = handshake(gw.admin_addr, &pair.0, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = http::Request::get("/healthz").header("host", "localhost").body(String::new()).unwrap();
    assert_eq!(send(tls, req).await.0, 200);
    // Plain HTTP gets no answer.
    let plain = try_send("GET", &gw.url("/v1/models"), &[], Vec::new()).await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 200), "plain HTTP was served");
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let up = MockProvider::start().await;
    let dir = PolicyDir::new();
    let first = certificate();
    write_pair(&dir, &first);
    dir.write("policy.toml", &tls_policy(&dir, &up));
    let gw = Gateway::start(dir.path()).await;
    handshake(gw.proxy_addr, &first.0, &[]).await.unwrap();

    // A broken renewal (a key that is not the certificate's) is not taken: the first stays.
    let second = certificate();
    write_pair(&dir, &(second.0.clone(), first.1.clone()));
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    handshake(gw.proxy_addr, &first.0, &[]).await.expect("the previous certificate is still served");
    let logged = eventually(std::time::Duration::from_secs(10), || async {
        gw.stderr().contains("does not match the certificate")
    })
    .await;
    assert!(logged, "the failed reload is logged: {}", gw.stderr());
    // The complete renewal is.
    write_pair(&dir, &second);
    let renewed = eventually(std::time::Duration::from_secs(15), || async {
        handshake(gw.proxy_addr, &second.0, &[]).await.is_ok()
    })
    .await;
    assert!(renewed, "the renewed certificate was never served");
    assert!(handshake(gw.proxy_addr, &first.0, &[]).await.is_err(), "the old certificate is no longer served");
}

#[test]
fn check_refuses_a_key_that_does_not_match_and_missing_files() {
    let up_url = "http://127.0.0.1:9";
    let route = route_toml("main", "m").target("up", "gpt-image-1");
    let dir = PolicyDir::new();
    let (cert, _) = certificate();
    let (_, other_key) = certificate();
    write_pair(&dir, &(cert, other_key));
    let policy = |cert: &str| {
        format!(
            "[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{}\"\n\n{}{route}",
            dir.path().join("tls/key.pem").display(),
            openai_provider_at("up", up_url)
        )
    };
    dir.write("policy.toml", &policy(&dir.path().join("tls/cert.pem").display().to_string()));
    let out = acc_check(dir.path());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("server.tls:") && text.contains("does not match the certificate"), "{text}");
    dir.write("policy.toml", &policy("/nonexistent/cert.pem"));
    let out = acc_check(dir.path());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/nonexistent/cert.pem: cannot read the certificate chain"), "{text}");
    // A device that never ends (a helper's `/dev/zero` took `acc check` to 23 GB and the OOM
    // killer): refused at once, naming what it is.
    dir.write("policy.toml", &policy("/dev/zero"));
    let out = acc_check(dir.path());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("/dev/zero: cannot read the certificate chain: not a regular file"), "{text}");
}

/// A reload that points `[server.tls]` at a device is refused as a whole (the gateway lives on,
/// with its policy), and one that points it at other files, or turns TLS off, is taken with a
/// warning: the listeners keep what they started with until a restart (it was silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_tls_is_refused_or_warned_about() {
    let up = MockProvider::start().await;
    let dir = PolicyDir::new();
    let pair = certificate();
    write_pair(&dir, &pair);
    let policy = tls_policy(&dir, &up);
    dir.write("policy.toml", &policy);
    let gw = Gateway::start(dir.path()).await;
    let admin = |method: &'static str, path: &'static str| {
        let tls = handshake(gw.admin_addr, &pair.0, &[b"http/1.1"]);
        async move {
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(String::new())
                .unwrap();
            send(tls.await.unwrap(), req).await
        }
    };
    let key = dir.path().join("tls/key.pem").display().to_string();
    dir.write("policy.toml", &policy.replace(&dir.path().join("tls/cert.pem").display().to_string(), "/dev/zero"));
    let (status, body) = admin("POST", "/admin/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not a regular file"), "{body}");
    // Other files holding a good pair: taken, with a warning that it waits for a restart.
    let other = dir.path().join("tls2");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("cert.pem"), &pair.0).unwrap();
    std::fs::write(other.join("key.pem"), &pair.1).unwrap();
    let repointed = policy
        .replace(&dir.path().join("tls/cert.pem").display().to_string(), &other.join("cert.pem").display().to_string())
        .replace(&key, &other.join("key.pem").display().to_string());
    dir.write("policy.toml", &repointed);
    let (status, body) = admin("POST", "/admin/reload").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = admin("GET", "/admin/policies").await;
    assert!(body.contains("[server.tls] differs from the one the gateway started with"), "{body}");
    // Still served over TLS.
    let tls = handshake(gw.proxy_addr, &pair.0, &[b"http/1.1"]).await.unwrap();
    assert_eq!(send(tls, generation(false)).await.0, 200);
}
