//! The ops console in a real browser: the running binary behind mock providers does a fallback,
//! blocks an image, mirrors to a candidate and holds an image for review; then headless
//! Chromium (Debian's `chromium`, driven by `playwright-core` from npm; both installed by
//! `scripts/chromium.sh`) signs in, visits every page and checks what it shows against what
//! happened, rejects one held image by keyboard (`j`, `r`) and approves the other by click, and
//! is refused with a wrong token or without a CSRF token. The clients' polls then answer the
//! approved image and the rejection with its reason.
//!
//! Screenshots of every page go to `target/console-screenshots/` (printed at the end).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A prompt and a cohort that would run script if the console did not escape them.
const XSS_PROMPT: &str = "<script>window.__xss=1</script> a fox <img src=x onerror=window.__xss=2>";
const XSS_COHORT: &str = "<b>beta</b>";

/// Runs `scripts/chromium.sh` (installs Chromium and playwright-core when missing): the
/// chromium executable and the node_modules directory.
async fn browser() -> (String, String) {
    let script = repo_root().join("scripts/chromium.sh");
    let out = tokio::task::spawn_blocking(move || Command::new("bash").arg(&script).output())
        .await
        .unwrap()
        .expect("run scripts/chromium.sh");
    assert!(
        out.status.success(),
        "scripts/chromium.sh failed (the console test needs Chromium and playwright-core):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "scripts/chromium.sh printed {stdout:?}");
    (lines[lines.len() - 2].to_string(), lines[lines.len() - 1].to_string())
}

fn policy(
    good: &MockProvider,
    down: &MockProvider,
    blank: &MockProvider,
    held: &MockProvider,
    cand: &MockProvider,
) -> String {
    let mut p = String::new();
    for (name, m) in [("good", good), ("blank", blank), ("held", held), ("cand", cand)] {
        p.push_str(&openai_provider(name, m));
    }
    // One failure opens its breaker (for ten minutes): the routes page offers to reset it.
    p.push_str(&openai_provider_with(
        "down",
        down,
        "breaker = { consecutive_failures = 1, cooldown_ms = 600000, probes = 1 }",
    ));
    // No [cohorts] list: the overview shows the busiest cohorts by name, the markup one among
    // them (with a list, a value outside it, as this one must be, shows as `other`).
    p.push_str(&route_toml("main", "main").target("down", "d-model").fallback("backup").to_string());
    p.push_str(&route_toml("backup", "backup-only").target("good", "g-model").to_string());
    p.push_str(
        &route_toml("mirrored", "mirrored")
            .target("good", "g-model")
            .with(r#"mirror = [{ provider = "cand", model = "cand-model", sample = 1.0, max_in_flight = 100 }]"#)
            .to_string(),
    );
    p.push_str(
        &route_toml("guarded", "guarded")
            .target("blank", "b-model")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"block\"")
            .to_string(),
    );
    p.push_str(
        &route_toml("held", "held")
            .target("held", "h-model")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"review\"")
            .to_string(),
    );
    p
}

fn req(model: &str, prompt: &str) -> Value {
    json!({"model": model, "prompt": prompt, "n": 1, "size": "256x256", "response_format": "b64_json"})
}

fn trace_id(r: &Resp) -> String {
    r.header("x-acc-trace-id").unwrap_or_else(|| panic!("no x-acc-trace-id: {}", r.describe()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_what_the_gateway_did_and_approves_in_the_browser() {
    let (chromium, node_modules) = browser().await;
    let good = MockProvider::builder(OpenAiImages).png(noisy(256, 256, 1)).start().await;
    let down = MockProvider::builder(OpenAiImages).status(500).start().await;
    let blank_mock = MockProvider::builder(OpenAiImages).png(blank(256, 256)).start().await;
    // A uniform colour fails the sanity check too, and shows as a visible thumbnail.
    let held_png = make_png(256, 256, [222, 120, 60]);
    let held_mock = MockProvider::builder(OpenAiImages).png(held_png.clone()).start().await;
    let cand = MockProvider::builder(OpenAiImages).png(noisy(256, 256, 2)).start().await;
    let (gw, _dir) = serve_policy(&policy(&good, &down, &blank_mock, &held_mock, &cand), &[]).await;

    // A fallback: the main route's provider fails, its fallback route answers. The prompt and
    // cohort carry markup the console must show as text.
    let r = gw.generate_with(&req("main", XSS_PROMPT), &[("x-acc-cohort", XSS_COHORT)]).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("good"), "{}", r.describe());
    let fallback_id = trace_id(&r);
    // Mirrored traffic, for the migration report.
    for i in 0..6 {
        gw.generate_with(&req("mirrored", &format!("a lighthouse {i}")), &[("x-acc-cohort", "beta")])
            .await
            .assert_status(200);
    }
    // A blocked image: the sanity check fails the blank image and the route blocks it.
    let r = gw.generate_with(&req("guarded", "a blank wall"), &[("x-acc-cohort", "beta")]).await;
    r.assert_error(400, "content_policy_violation");
    let blocked_id = trace_id(&r);
    // An image held for review.
    let r = gw.generate_with(&req("held", "a quiet harbour"), &[("x-acc-cohort", "beta")]).await;
    r.assert_error(423, "pending_review");
    let held_id = trace_id(&r);
    // A second one, which the reviewer rejects.
    let r = gw.generate_with(&req("held", "a second harbour"), &[("x-acc-cohort", XSS_COHORT)]).await;
    r.assert_error(423, "pending_review");
    let reject_id = trace_id(&r);
    for id in [&fallback_id, &blocked_id, &held_id, &reject_id] {
        gw.trace_record(id).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            let rep = gw.admin("GET", "/admin/mirror/report").await.json();
            rep["routes"][0]["candidates"][0]["candidate"]["samples"].as_u64().unwrap_or(0) >= 6
        })
        .await,
        "the mirror report never counted the candidate's samples"
    );

    // Admin only: nothing of the console on the proxy listener.
    for path in ["/console/", "/console/signin", &format!("/console/reviews/{held_id}/images/0")] {
        let r = get(&gw.url(path), &[]).await;
        assert_eq!(r.status, 404, "proxy listener {path}: {}", r.describe());
    }
    // A held image is never served without a session: sign in first.
    let r = get(&gw.admin_url(&format!("/console/reviews/{held_id}/images/0")), &[]).await;
    assert_eq!(r.status, 303, "{}", r.describe());
    assert!(r.header("location").unwrap_or_default().starts_with("/console/signin"), "{}", r.describe());
    assert!(!r.body.starts_with(b"\x89PNG"), "no image without a session");
    let r = get(&gw.admin_url("/console/signin"), &[]).await;
    r.assert_status(200);
    assert!(r.header("server-timing").is_some_and(|t| t.starts_with("app;dur=")), "{}", r.describe());
    assert!(r.header("content-security-policy").is_some_and(|c| c.contains("default-src 'none'")));
    // A wrong token is refused, and never echoed.
    let r = post_raw(
        &gw.admin_url("/console/signin"),
        b"token=not-the-token-XYZ&reviewer=x".to_vec(),
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert!(r.header("set-cookie").is_none());
    assert!(!r.text().contains("not-the-token-XYZ"), "the token is never echoed");

    // The browser part.
    let shots = repo_root().join("target/console-screenshots");
    // This run's screenshots only.
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let script = repo_root().join("tests/console/console.cjs");
    let env: Vec<(&str, String)> = vec![
        ("NODE_PATH", node_modules),
        ("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1".into()),
        ("ACC_CHROMIUM", chromium),
        ("ACC_ADMIN", gw.admin.clone()),
        ("ACC_TOKEN", ADMIN_TOKEN.into()),
        ("ACC_FALLBACK_TRACE", fallback_id.clone()),
        ("ACC_BLOCKED_TRACE", blocked_id.clone()),
        ("ACC_HELD_TRACE", held_id.clone()),
        ("ACC_REJECT_TRACE", reject_id.clone()),
        ("ACC_XSS_PROMPT", XSS_PROMPT.into()),
        ("ACC_XSS_COHORT", XSS_COHORT.into()),
        ("ACC_SHOTS", shots.display().to_string()),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("node");
        cmd.arg(&script);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.output()
    })
    .await
    .unwrap()
    .expect("run node tests/console/console.cjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- gateway ---\n{}",
        gw.stderr()
    );

    // Approved in the browser: the client's poll now answers the image, as the provider made it.
    let p = get(&gw.url(&format!("/v1/images/reviews/{held_id}")), &[]).await;
    p.assert_status(200);
    assert_eq!(p.header("x-acc-decision").as_deref(), Some("approved"), "{}", p.describe());
    assert_eq!(b64_one(&p), held_png, "the approved image is the held one");
    let rec = gw.trace_record(&held_id).await.json();
    assert_eq!(rec["review"]["state"], "approved");
    assert_eq!(rec["review"]["reviewer"], "e2e-reviewer");
    assert_eq!(rec["review"]["reason"], "looks fine");

    // Rejected in the browser, with its reason.
    let p = get(&gw.url(&format!("/v1/images/reviews/{reject_id}")), &[]).await;
    let err = p.assert_error(410, "review_rejected");
    assert!(err["message"].as_str().unwrap().contains("not on brand"), "{err}");

    let mut pngs: Vec<PathBuf> = std::fs::read_dir(&shots).unwrap().map(|e| e.unwrap().path()).collect();
    pngs.sort();
    assert!(pngs.len() >= 8, "a screenshot per page: {pngs:?}");
    println!("console screenshots: {}", shots.display());
}

#[tokio::test]
async fn without_an_admin_token_the_console_is_disabled() {
    let mock = MockProvider::start().await;
    let policy = format!("{}{}", openai_provider("p", &mock), route_toml("r", "m").target_default("p"));
    let (gw, _dir) = serve_policy(&policy, &[("ACC_ADMIN_TOKEN", "")]).await;
    let page = get(&gw.admin_url("/console/signin"), &[]).await;
    assert_eq!(page.status, 503, "{}", page.describe());
    assert!(page.text().contains("The console is disabled"), "{}", page.text());
    let r = post_raw(
        &gw.admin_url("/console/signin"),
        b"token=anything".to_vec(),
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert!(r.header("set-cookie").is_none());
    // Every page still asks to sign in; nothing is served.
    let r = get(&gw.admin_url("/console/traces"), &[]).await;
    assert_eq!(r.status, 303, "{}", r.describe());
}

/// The session cookie is `Secure` when the admin listener serves TLS (`[server.tls]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_session_cookie_is_secure() {
    use http_body_util::BodyExt;
    use rustls::pki_types::pem::PemObject;

    let up = MockProvider::start().await;
    let dir = PolicyDir::new();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (c.cert.pem(), c.signing_key.serialize_pem());
    std::fs::create_dir_all(dir.path().join("tls")).unwrap();
    std::fs::write(dir.path().join("tls/key.pem"), key).unwrap();
    std::fs::write(dir.path().join("tls/cert.pem"), &cert).unwrap();
    dir.write(
        "policy.toml",
        &format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n{}{}",
            dir.path().join("tls/cert.pem").display(),
            dir.path().join("tls/key.pem").display(),
            openai_provider("up", &up),
            route_toml("main", "m").target("up", "gpt-image-1"),
        ),
    );
    let gw = Gateway::start(dir.path()).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gw.admin_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/console/signin")
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}&reviewer=tls"))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    let _ = resp.into_body().collect().await;
    for attr in ["acc_console=", "HttpOnly", "SameSite=Strict", "Secure", "Path=/console", "Max-Age=28800"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
}

/// A session's cookie (`name=value`) from a sign-in answer.
fn session_cookie(r: &Resp) -> String {
    let c = r.header("set-cookie").unwrap_or_else(|| panic!("no session cookie: {}", r.describe()));
    c.split(';').next().unwrap().to_string()
}

async fn sign_in(gw: &Gateway, body: &str, cookie: Option<&str>) -> Resp {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(c) = cookie {
        h.push(("cookie", c));
    }
    post_raw(&gw.admin_url("/console/signin"), body.as_bytes().to_vec(), &h).await
}

/// A page's CSRF token (the sign-out form carries it on every signed-in page).
async fn csrf_of(gw: &Gateway, cookie: &str) -> String {
    let page = get(&gw.admin_url("/console/routes"), &[("cookie", cookie)]).await;
    page.assert_status(200);
    let text = page.text();
    let at = text.find(r#"name="csrf" value=""#).unwrap_or_else(|| panic!("no CSRF token: {text}")) + 19;
    text[at..at + 64].to_string()
}

async fn post_form_as(gw: &Gateway, path: &str, cookie: &str, body: &str) -> Resp {
    post_raw(
        &gw.admin_url(path),
        body.as_bytes().to_vec(),
        &[("content-type", "application/x-www-form-urlencoded"), ("cookie", cookie)],
    )
    .await
}

/// What an operator (or an attacker on the admin network) does with plain HTTP: sessions,
/// CSRF, the redirect after sign-in, the sign-in line, headers, other methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_csrf_and_redirects_hold_against_misuse() {
    let mock = MockProvider::start().await;
    let policy = format!("{}{}", openai_provider("p", &mock), route_toml("r", "m").target_default("p"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let token = format!("token={ADMIN_TOKEN}");
    let review = "/console/reviews/0123456789abcdef0123456789abcdef/approve";

    // The redirect after sign-in stays in the console, and is never dropped: a control
    // character or a dot segment in `next` leads to the overview.
    for (next, to) in [
        ("%2Fconsole%2Ftraces%3Froute%3Dr", "/console/traces?route=r"),
        ("%2Fconsole%2F%0D%0ASet-Cookie%3A%20x%3D1", "/console/"),
        ("%2Fconsole%2F..%2F..%2Fadmin%2Froutes", "/console/"),
        ("https%3A%2F%2Fevil.example%2Fconsole%2F", "/console/"),
    ] {
        let r = sign_in(&gw, &format!("{token}&next={next}"), None).await;
        assert_eq!(r.status, 303, "next={next}: {}", r.describe());
        assert_eq!(r.header("location").as_deref(), Some(to), "next={next}: {}", r.describe());
    }

    let a = session_cookie(&sign_in(&gw, &format!("{token}&reviewer=ana"), None).await);
    let b = session_cookie(&sign_in(&gw, &format!("{token}&reviewer=bo"), None).await);
    assert_ne!(a, b, "each sign-in makes its own session");
    let (csrf_a, csrf_b) = (csrf_of(&gw, &a).await, csrf_of(&gw, &b).await);
    assert_ne!(csrf_a, csrf_b);

    // Security headers on pages: no framing (the approve buttons), no sniffing, no caching.
    // (The review queue answers 503 while the trace store still opens after start-up.)
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&gw.admin_url("/console/reviews"), &[("cookie", &a)]).await.status == 200
        })
        .await,
        "the review queue never opened"
    );
    let page = get(&gw.admin_url("/console/reviews"), &[("cookie", &a)]).await;
    page.assert_status(200);
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("frame-ancestors 'none'")));
    assert_eq!(page.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(page.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(page.header("referrer-policy").as_deref(), Some("no-referrer"));

    // CSRF: without a token, with the other session's, or in the query string: 403, and the
    // decision is never made (with the right token the admin API answers: no such review).
    let r = post_form_as(&gw, review, &a, "reason=x").await;
    assert_eq!(r.status, 403, "{}", r.describe());
    let r = post_form_as(&gw, review, &a, &format!("csrf={csrf_b}&reason=x")).await;
    assert_eq!(r.status, 403, "another session's token: {}", r.describe());
    let r = post_form_as(&gw, &format!("{review}?csrf={csrf_a}"), &a, "reason=x").await;
    assert_eq!(r.status, 403, "a token in the query string: {}", r.describe());
    let r = post_form_as(&gw, review, &a, &format!("csrf={csrf_a}&reason=x")).await;
    assert_eq!(r.status, 404, "the right token reaches the admin API: {}", r.describe());
    // A provider's reset likewise: refused without the token; with it, done (or 404 for a
    // provider the policy does not have), back to the routes page.
    let r = post_form_as(&gw, "/console/providers/p/reset", &a, "").await;
    assert_eq!(r.status, 403, "{}", r.describe());
    let r = post_form_as(&gw, "/console/providers/p/reset", &a, &format!("csrf={csrf_a}")).await;
    assert_eq!(r.status, 303, "{}", r.describe());
    assert_eq!(r.header("location").as_deref(), Some("/console/routes?reset=p"), "{}", r.describe());
    let r = post_form_as(&gw, "/console/providers/nope/reset", &a, &format!("csrf={csrf_a}")).await;
    assert_eq!(r.status, 404, "{}", r.describe());
    // Nothing changes state on GET: another method answers a console page, with its headers.
    let r = get(&gw.admin_url("/console/signout"), &[("cookie", &a)]).await;
    assert_eq!(r.status, 405, "{}", r.describe());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{}", r.describe());
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"), "{}", r.describe());
    assert!(r.text().contains("Method not allowed"), "{}", r.text());
    get(&gw.admin_url("/console/routes"), &[("cookie", &a)]).await.assert_status(200);

    // The session cookie never stands in for the admin API's bearer token.
    let r = get(&gw.admin_url("/admin/routes"), &[("cookie", &a)]).await;
    assert_eq!(r.status, 401, "{}", r.describe());

    // Forged, garbage and very long cookies are sent to sign in, nothing more.
    let long = format!("acc_console={}", "a".repeat(8000));
    for c in ["acc_console=garbage", "acc_console=", "acc_console=\"x\"", long.as_str()] {
        let r = get(&gw.admin_url("/console/routes"), &[("cookie", c)]).await;
        assert_eq!(r.status, 303, "{c:.40}: {}", r.describe());
    }

    // Signing in again from a browser ends the session its cookie named.
    let a2 = session_cookie(&sign_in(&gw, &format!("{token}&reviewer=ana"), Some(&a)).await);
    assert_ne!(a, a2, "sign-in issues a fresh id");
    let r = get(&gw.admin_url("/console/routes"), &[("cookie", &a)]).await;
    assert_eq!(r.status, 303, "the replaced session is over: {}", r.describe());
    get(&gw.admin_url("/console/routes"), &[("cookie", &a2)]).await.assert_status(200);

    // Sign-out ends the session on the server: its cookie, replayed, is refused.
    let r = post_form_as(&gw, "/console/signout", &b, &format!("csrf={csrf_b}")).await;
    assert_eq!(r.status, 303, "{}", r.describe());
    assert!(r.header("set-cookie").is_some_and(|c| c.contains("Max-Age=0")), "{}", r.describe());
    let r = get(&gw.admin_url("/console/routes"), &[("cookie", &b)]).await;
    assert_eq!(r.status, 303, "{}", r.describe());
    let r = post_form_as(&gw, review, &b, &format!("csrf={csrf_b}")).await;
    assert_eq!(r.status, 401, "{}", r.describe());

    // The sign-in line is short: a burst of guesses beyond it is refused at once (429 with
    // Retry-After), not held on the admin listener; the rest wait their turn (401).
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let url = gw.admin_url("/console/signin");
            tokio::spawn(async move {
                post_raw(&url, b"token=wrong-guess".to_vec(), &[("content-type", "application/x-www-form-urlencoded")])
                    .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in burst {
        let r = t.await.unwrap();
        if r.status == 429 {
            assert_eq!(r.header("retry-after").as_deref(), Some("5"), "{}", r.describe());
            assert!(r.text().contains("Too many sign-in attempts"), "{}", r.text());
        }
        statuses.push(r.status);
    }
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(statuses.contains(&429), "a burst beyond the line is refused: {statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 401).count() <= 8, "{statuses:?}");
    // Once the line is clear, the operator signs in.
    let r = sign_in(&gw, &token, None).await;
    assert_eq!(r.status, 303, "{}", r.describe());
}

/// With `[store] enabled = false` every page still answers a console page that says why
/// (the overview a note, the review queue and traces "not kept"), never a 500 or a bare 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trace_store_the_pages_say_why() {
    let mock = MockProvider::start().await;
    let policy = format!(
        "[store]\nenabled = false\n\n{}{}",
        openai_provider("p", &mock),
        route_toml("r", "m").target_default("p")
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let c = session_cookie(&sign_in(&gw, &format!("token={ADMIN_TOKEN}"), None).await);
    let overview = get(&gw.admin_url("/console/"), &[("cookie", &c)]).await;
    overview.assert_status(200);
    assert!(overview.text().contains("[store] enabled = false"), "{}", overview.text());
    for (path, title) in [
        ("/console/reviews", "Reviews not kept"),
        ("/console/traces", "Traces not kept"),
        ("/console/traces?route=r&limit=-1&unknown=1", "Traces not kept"),
    ] {
        let r = get(&gw.admin_url(path), &[("cookie", &c)]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.describe());
        assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/html")), "{path}");
        let text = r.text();
        assert!(text.contains(title) && text.contains("[store] enabled = false"), "{path}: {text}");
    }
    for path in ["/console/routes", "/console/migrations"] {
        get(&gw.admin_url(path), &[("cookie", &c)]).await.assert_status(200);
    }
    // A decision cannot be taken either, and says why.
    let csrf = csrf_of(&gw, &c).await;
    let r = post_form_as(&gw, "/console/reviews/0123456789abcdef0123456789abcdef/approve", &c, &format!("csrf={csrf}"))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    assert!(r.text().contains("[store] enabled = false"), "{}", r.text());
}
