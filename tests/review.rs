//! Human review through the running binary. A mock provider answers a blank image, the route's
//! sanity check fails it, and `on_sanity_fail = "review"` withholds it: the client gets
//! `pending_review` at once, polls the outcome, and reviewers decide on the admin listener.
//! Held items and their images live in the trace store, so they survive a restart; the byte
//! budget's overflow applies the route's `review_overflow`; decisions reach a signed webhook.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

const KEY_A: &str = "sk-review-tenant-a";
const KEY_B: &str = "sk-review-tenant-b";

/// Keys of two tenants, cohort lists, and `routes` (TOML) over the provider `mock`.
fn policy(mock: &MockProvider, routes: &str, extra: &str) -> String {
    format!(
        "{}[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n\n[[keys]]\nsha256 = \"{}\"\ntenant = \"globex\"\n\n[cohorts]\ncohorts = [\"beta\"]\n\n{routes}\n{extra}",
        openai_provider_at("mock", &mock.base_url()),
        sha256_hex(KEY_A),
        sha256_hex(KEY_B),
    )
}

fn review_route(name: &str, model: &str, lines: &str) -> String {
    route_toml(name, model)
        .target_default("mock")
        .with(&format!("evaluators = [\"sanity\"]\non_sanity_fail = \"review\"\n{lines}"))
        .to_string()
}

async fn generate(gw: &Gateway, key: &str, model: &str, format: &str) -> Resp {
    let auth = bearer(key);
    gw.generate_with(
        &json!({"model": model, "prompt": "a lighthouse", "response_format": format, "user": "u-9"}),
        &[("authorization", &auth), ("x-acc-cohort", "beta"), ("x-acc-prompt-template", "hero@3")],
    )
    .await
}

async fn poll(gw: &Gateway, key: &str, id: &str) -> Resp {
    get(&gw.url(&format!("/v1/images/reviews/{id}")), &[("authorization", &bearer(key))]).await
}

async fn decide(gw: &Gateway, id: &str, verb: &str, body: &Value) -> Resp {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    post_json(&gw.admin_url(&format!("/admin/reviews/{id}/{verb}")), body, &[("authorization", &auth)]).await
}

/// Asserts the `pending_review` answer and returns the trace id.
fn assert_pending(r: &Resp) -> String {
    let err = r.assert_error(423, "pending_review");
    let id = r.header("x-acc-trace-id").expect("x-acc-trace-id");
    assert_eq!(id.len(), 32, "{}", r.describe());
    assert_eq!(err["type"], "invalid_request_error");
    assert_eq!(err["param"], Value::Null);
    assert!(err["message"].as_str().unwrap().contains(&id), "the trace id is in the message: {err}");
    assert_eq!(r.header("x-should-retry").as_deref(), Some("false"), "{}", r.describe());
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("review"), "{}", r.describe());
    id
}

#[tokio::test]
async fn a_held_image_is_pending_then_approved_byte_identical() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;

    let r = generate(&gw, KEY_A, "m", "b64_json").await;
    let id = assert_pending(&r);
    assert_eq!(r.header("x-acc-route").as_deref(), Some("main"));
    assert_eq!(mock.hits(), 1);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "held")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "main")]).await, 1.0);
    assert_eq!(gw.metric("acc_requests_total", &[("route", "main"), ("outcome", "pending_review")]).await, 1.0);

    // The owner's poll: still pending, same error, never retried.
    let p = poll(&gw, KEY_A, &id).await;
    assert_eq!(assert_pending(&p), id);

    // Another tenant cannot tell it from an id that does not exist.
    let theirs = poll(&gw, KEY_B, &id).await;
    let err = theirs.assert_error(404, "review_not_found");
    assert_eq!(err["message"], format!("no review with trace id {id}"));
    let unknown = "0123456789abcdef0123456789abcdef";
    let err = poll(&gw, KEY_B, unknown).await.assert_error(404, "review_not_found");
    assert_eq!(err["message"], format!("no review with trace id {unknown}"));
    poll(&gw, KEY_A, "not-a-trace-id").await.assert_error(400, "invalid_trace_id");
    // Hex in capitals names the same trace, as on /v1/feedback.
    poll(&gw, KEY_A, &id.to_ascii_uppercase()).await.assert_error(423, "pending_review");
    get(&gw.url(&format!("/v1/images/reviews/{id}")), &[]).await.assert_error(401, "invalid_api_key");

    // The reviewers' queue: the item, its cohort fields and why it is there.
    let list = gw.admin("GET", "/admin/reviews?state=pending&route=main").await;
    list.assert_status(200);
    let list = list.json();
    let items = list["data"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list:#}");
    let item = &items[0];
    assert_eq!(item["trace_id"], id);
    assert_eq!(item["route"], "main");
    assert_eq!(item["tenant"], "acme");
    assert_eq!(item["cohort"], "beta");
    assert_eq!(item["prompt_template"], "hero@3");
    assert_eq!(item["end_user"], "u-9");
    assert_eq!(item["state"], "pending");
    assert_eq!(item["image_count"], 1);
    assert!(item["age_seconds"].as_f64().unwrap() >= 0.0);
    let verdicts = item["verdicts"].as_array().unwrap();
    assert_eq!((verdicts[0]["image"].as_u64(), verdicts[0]["evaluator"].as_str()), (Some(0), Some("sanity")));
    assert_eq!(verdicts[0]["verdict"], "fail");
    let reasons = item["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].as_str().unwrap().starts_with("sanity: "), "{reasons:?}");
    let other_route = gw.admin("GET", "/admin/reviews?route=elsewhere").await.json();
    assert_eq!(other_route["data"], json!([]));
    let err = gw.admin("GET", "/admin/reviews?state=maybe").await.assert_error(400, "invalid_filter");
    assert_eq!(err["param"], "state");
    let err = gw.admin("GET", "/admin/reviews?limit=0").await.assert_error(400, "invalid_filter");
    assert_eq!(err["param"], "limit");
    let err = gw.admin("GET", "/admin/reviews?state=pending&state=approved").await.assert_error(400, "invalid_filter");
    assert_eq!(
        (err["param"].as_str(), err["message"].as_str()),
        (Some("state"), Some("query parameter \"state\" is given twice"))
    );
    // The trace list finds held requests by their decision.
    let listed = eventually(Duration::from_secs(10), || async {
        let v = gw.admin("GET", "/admin/traces?decision=review").await.json();
        v["data"].as_array().is_some_and(|d| d.len() == 1 && d[0]["trace_id"] == id.as_str())
    })
    .await;
    assert!(listed, "{:#}", gw.admin("GET", "/admin/traces?decision=review").await.json());

    // The held image, as the provider made it.
    let img = gw.admin("GET", &format!("/admin/reviews/{id}/images/0")).await;
    img.assert_status(200);
    assert_eq!(img.header("content-type").as_deref(), Some("image/png"));
    assert_eq!(&img.body[..], mock.png());
    gw.admin("GET", &format!("/admin/reviews/{id}/images/1")).await.assert_error(404, "review_image_not_found");

    // A decision needs a reviewer.
    decide(&gw, &id, "approve", &json!({"reason": "fine"})).await.assert_error(400, "invalid_reviewer");
    // NUL (PostgreSQL's text refuses it) and other control characters are refused, not stored.
    decide(&gw, &id, "approve", &json!({"reviewer": "r\u{0}x"})).await.assert_error(400, "invalid_reviewer");
    decide(&gw, &id, "approve", &json!({"reviewer": "ana", "reason": "ok\u{0}"}))
        .await
        .assert_error(400, "invalid_reason");
    decide(&gw, &id, "approve", &json!({"reviewer": "rita", "extra": 1})).await.assert_error(400, "invalid_json");
    let not_an_object = decide(&gw, &id, "approve", &json!([])).await;
    let err = not_an_object.assert_error(400, "invalid_json");
    assert!(!err["message"].as_str().unwrap().contains("DecisionBody"), "{err}");
    let ok = decide(&gw, &id, "approve", &json!({"reviewer": "rita", "reason": "on brand"})).await;
    ok.assert_status(200);
    assert_eq!((ok.json()["state"].as_str(), ok.json()["reviewer"].as_str()), (Some("approved"), Some("rita")));

    // Approved: the normal answer, b64_json byte-identical to what the provider returned.
    let done = poll(&gw, KEY_A, &id).await;
    done.assert_status(200);
    assert_eq!(done.header("x-acc-trace-id").as_deref(), Some(id.as_str()));
    let body = done.json();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["b64_json"].as_str().unwrap(), b64_encode(mock.png()));
    assert_eq!(mock.hits(), 1, "polling never generates again");

    // Deciding twice is a conflict, whatever the second decision.
    let again = decide(&gw, &id, "approve", &json!({"reviewer": "sam"})).await;
    assert_eq!(
        again.assert_error(409, "review_already_decided")["message"],
        format!("review {id} is already approved")
    );
    decide(&gw, &id, "reject", &json!({"reviewer": "sam"})).await.assert_error(409, "review_already_decided");
    decide(&gw, unknown, "reject", &json!({"reviewer": "sam"})).await.assert_error(404, "review_not_found");

    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "approved")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "main")]).await, 0.0);
    assert_eq!(gw.metric("acc_review_wait_seconds_count", &[("route", "main")]).await, 1.0);

    // The trace says review, and shows the decision next to the record.
    let rec = gw.trace_record(&id).await.json();
    assert_eq!(rec["decision"], "review");
    assert_eq!(rec["status"], 423);
    assert_eq!(rec["error_code"], "pending_review");
    assert_eq!(rec["review"]["state"], "approved");
    assert_eq!(rec["review"]["reviewer"], "rita");
    assert_eq!(rec["review"]["reason"], "on brand");
    let (held, decided) =
        (rec["review"]["held_unix_nano"].as_u64().unwrap(), rec["review"]["decided_unix_nano"].as_u64().unwrap());
    assert!(decided >= held, "{rec:#}");
    // The image the client got after approval can be rated like any other.
    let rating = post_json(
        &gw.url("/v1/feedback"),
        &json!({"trace_id": id, "rating": "up", "image_index": 0}),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    rating.assert_status(200);
    assert_eq!(rating.json()["image_index"], 0, "{}", rating.describe());
}

#[tokio::test]
async fn rejected_is_410_with_the_reason_and_url_answers_are_served_after_approval() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;
    let rejected = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    let approved = assert_pending(&generate(&gw, KEY_A, "m", "url").await);

    // Oldest first.
    let list = gw.admin("GET", "/admin/reviews").await.json();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|i| i["trace_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![rejected.as_str(), approved.as_str()]);
    let first_page = gw.admin("GET", "/admin/reviews?limit=1").await.json();
    assert_eq!(first_page["data"][0]["trace_id"], rejected);
    let after = first_page["next_after"].as_str().unwrap().to_string();
    let second_page = gw.admin("GET", &format!("/admin/reviews?limit=1&after={after}")).await.json();
    assert_eq!(second_page["data"][0]["trace_id"], approved);

    decide(&gw, &rejected, "reject", &json!({"reviewer": "sam", "reason": "logo is distorted"}))
        .await
        .assert_status(200);
    let r = poll(&gw, KEY_A, &rejected).await;
    let err = r.assert_error(410, "review_rejected");
    assert_eq!(err["message"], "a reviewer rejected the image: logo is distorted");
    // Rejected images are not kept.
    gw.admin("GET", &format!("/admin/reviews/{rejected}/images/0")).await.assert_error(404, "review_image_not_found");

    decide(&gw, &approved, "approve", &json!({"reviewer": "rita"})).await.assert_status(200);
    let r = poll(&gw, KEY_A, &approved).await;
    r.assert_status(200);
    let url = r.json()["data"][0]["url"].as_str().expect("a url answer").to_string();
    assert!(url.starts_with(&gw.proxy), "{url}");
    let img = get(&url, &[]).await;
    img.assert_status(200);
    assert_eq!(&img.body[..], mock.png());
    // Polling again while the URL is served answers the same URL: the image is not stored
    // again (each copy would push other answers' images out of the artifact store).
    for _ in 0..3 {
        let again = poll(&gw, KEY_A, &approved).await;
        assert_eq!(again.json()["data"][0]["url"].as_str(), Some(url.as_str()));
    }
    assert_eq!(gw.metric("acc_artifact_store_total", &[("event", "stored")]).await, 1.0);

    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "rejected")]).await, 1.0);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "approved")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "main")]).await, 0.0);
    let rejected_list = gw.admin("GET", "/admin/reviews?state=rejected").await.json();
    assert_eq!(rejected_list["data"][0]["reason"], "logo is distorted");
}

/// The approved answer is the answer the provider gave: its other fields (`usage`,
/// `output_format`) and each image's `revised_prompt` come back with the images.
#[tokio::test]
async fn an_approved_answer_keeps_the_providers_other_fields() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;
    let revised = format!("A lighthouse on a cliff at dusk, {}", "with gulls ".repeat(40));
    let usage = json!({"total_tokens": 4200, "input_tokens": 50, "output_tokens": 4150});
    let answer = json!({
        "created": 1,
        "data": [{"b64_json": b64_encode(mock.png()), "revised_prompt": revised}],
        "output_format": "png",
        "usage": usage,
    });
    mock.set_body(Some(&answer.to_string()));
    let id = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    decide(&gw, &id, "approve", &json!({"reviewer": "rita"})).await.assert_status(200);
    let r = poll(&gw, KEY_A, &id).await;
    r.assert_status(200);
    let got = r.json();
    assert_eq!(got["data"][0]["b64_json"].as_str(), Some(b64_encode(mock.png()).as_str()));
    assert_eq!(got["data"][0]["revised_prompt"].as_str(), Some(revised.as_str()));
    assert_eq!((&got["output_format"], &got["usage"]), (&json!("png"), &usage), "{got:#}");
}

#[tokio::test]
async fn an_item_nobody_decides_expires_and_is_counted() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", "review_ttl_secs = 1"), ""), &[]).await;
    let id = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    let expired = eventually(Duration::from_secs(15), || async { poll(&gw, KEY_A, &id).await.status == 410 }).await;
    assert!(expired, "the item did not expire");
    let err = poll(&gw, KEY_A, &id).await.assert_error(410, "review_expired");
    assert_eq!(
        err["message"],
        "the review expired before a decision: no reviewer decided within the route's review_ttl_secs"
    );
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "expired")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "main")]).await, 0.0);
    decide(&gw, &id, "approve", &json!({"reviewer": "late"})).await.assert_error(409, "review_already_decided");
}

/// A reviewer who decides after the item's time ran out, before the once-a-second sweep got
/// to it, is too late: the item expires then (409 to the reviewer, 410 to the client), and
/// the image is never served.
#[tokio::test]
async fn a_decision_after_the_review_time_is_too_late() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", "review_ttl_secs = 1"), ""), &[]).await;
    let id = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    let list = gw.admin("GET", "/admin/reviews?state=pending").await.json();
    assert_eq!(list["data"][0]["trace_id"], id);
    let expires = list["data"][0]["expires_unix_nano"].as_u64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    tokio::time::sleep(Duration::from_nanos(expires.saturating_sub(now)) + Duration::from_millis(5)).await;
    let late = decide(&gw, &id, "approve", &json!({"reviewer": "late"})).await;
    let err = late.assert_error(409, "review_already_decided");
    assert!(err["message"].as_str().unwrap().contains("expired"), "{err}");
    poll(&gw, KEY_A, &id).await.assert_error(410, "review_expired");
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "expired")]).await, 1.0);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "approved")]).await, 0.0);
}

#[tokio::test]
async fn pending_items_and_their_images_survive_a_restart() {
    let mock = MockProvider::start().await;
    let (gw, dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;
    let first = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    let second = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    drop(gw);

    let gw = Gateway::start(dir.path()).await;
    // The queue's depth is read back from the store once it opens.
    let depth_back = eventually(Duration::from_secs(10), || async {
        gw.metric("acc_review_queue_depth", &[("route", "main")]).await == 2.0
    })
    .await;
    assert!(depth_back, "queue depth after the restart: {}", gw.metrics().await);
    assert_eq!(assert_pending(&poll(&gw, KEY_A, &first).await), first);
    let img = gw.admin("GET", &format!("/admin/reviews/{second}/images/0")).await;
    img.assert_status(200);
    assert_eq!(&img.body[..], mock.png());
    decide(&gw, &first, "approve", &json!({"reviewer": "rita"})).await.assert_status(200);
    let done = poll(&gw, KEY_A, &first).await;
    done.assert_status(200);
    assert_eq!(done.json()["data"][0]["b64_json"].as_str().unwrap(), b64_encode(mock.png()));
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "main")]).await, 1.0);
    assert_eq!(mock.hits(), 2);
}

#[tokio::test]
async fn a_full_byte_budget_applies_review_overflow() {
    let mock = MockProvider::start().await;
    let good = MockProvider::start().await;
    good.answer_with(&noisy(64, 64, 3));
    let routes = format!(
        "{}{}{}{}",
        review_route("strict", "block", ""),
        review_route("lenient", "flag", "review_overflow = \"flag\""),
        review_route("spare", "fallback", "review_overflow = \"fallback\"")
            .replace("targets = [", "fallbacks = [\"good\"]\ntargets = ["),
        route_toml("good", "good").target_default("good"),
    );
    let body = format!("{}{}", routes, openai_provider_at("good", &good.base_url()));
    // 10 bytes: less than the mock's smallest image.
    let (gw, _dir) = serve_policy(&policy(&mock, &body, "[review]\nmax_bytes = 10\n"), &[]).await;

    let r = generate(&gw, KEY_A, "block", "b64_json").await;
    let err = r.assert_error(400, "content_policy_violation");
    assert!(err["message"].as_str().unwrap().contains("the review queue cannot take the image now"), "{err}");
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("blocked"));

    let r = generate(&gw, KEY_A, "flag", "b64_json").await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("flagged"));
    assert_eq!(b64_images(&r), vec![mock.png().to_vec()]);

    let r = generate(&gw, KEY_A, "fallback", "b64_json").await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("good"), "{}", r.describe());
    assert_eq!(b64_images(&r), vec![noisy(64, 64, 3)]);

    for route in ["strict", "lenient", "spare"] {
        assert_eq!(gw.metric("acc_reviews_total", &[("route", route), ("outcome", "overflow")]).await, 1.0, "{route}");
        assert_eq!(gw.metric("acc_reviews_total", &[("route", route), ("outcome", "held")]).await, 0.0, "{route}");
    }
    // Nothing was held (the store opens in the background at start-up: wait for it to answer).
    let open = eventually(Duration::from_secs(10), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "ready"
    })
    .await;
    assert!(open, "the store did not open");
    let all = gw.admin("GET", "/admin/reviews?state=all").await;
    assert_eq!(all.json()["data"], json!([]), "{}", all.describe());
}

/// What the test's webhook receiver got: (headers, body) per request.
type Received = Arc<Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>>;

/// A real HTTP server on a free loopback port that answers 500 to its first request and 204
/// afterwards, keeping every request.
async fn webhook_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let r = r.clone();
            async move {
                let mut got = r.lock().unwrap();
                got.push((headers, body));
                if got.len() == 1 {
                    http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), received)
}

#[tokio::test]
async fn decisions_reach_the_webhook_signed_and_retried_after_a_failure() {
    const SECRET: &str = "whsec-review-test-8d1f";
    let mock = MockProvider::start().await;
    let (url, received) = webhook_receiver().await;
    let route = review_route(
        "main",
        "m",
        &format!("review_webhook_url = \"{url}\"\nreview_webhook_secret_env = \"ACC_TEST_REVIEW_SECRET\""),
    );
    let (gw, _dir) = serve_policy(
        &policy(&mock, &route, "[review]\nwebhook_backoff_ms = 100\n"),
        &[("ACC_TEST_REVIEW_SECRET", SECRET)],
    )
    .await;
    let id = assert_pending(&generate(&gw, KEY_A, "m", "b64_json").await);
    decide(&gw, &id, "reject", &json!({"reviewer": "sam", "reason": "wrong colours"})).await.assert_status(200);

    let delivered = eventually(Duration::from_secs(15), || async { received.lock().unwrap().len() >= 2 }).await;
    assert!(delivered, "webhook deliveries: {}", received.lock().unwrap().len());
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one failure, then one delivery");
    for (headers, body) in &got {
        let ts = headers["x-acc-timestamp"].to_str().unwrap();
        let sig = headers["x-acc-signature"].to_str().unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        let hex_sig = sig.strip_prefix("sha256=").expect("sha256= prefix");
        mac.verify_slice(&hex::decode(hex_sig).unwrap()).expect("a valid HMAC-SHA256 signature");
        assert_eq!(headers["content-type"], "application/json");
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["trace_id"], id);
        assert_eq!(v["route"], "main");
        assert_eq!(v["outcome"], "rejected");
        assert_eq!(v["reviewer"], "sam");
        assert_eq!(v["reason"], "wrong colours");
        assert!(v["decided_at"].as_str().unwrap().ends_with('Z'), "{v}");
    }
    assert_eq!(got[0].1, got[1].1, "the retry sends the same body");

    let counted = eventually(Duration::from_secs(20), || async {
        gw.metric("acc_review_webhooks_total", &[("route", "main"), ("result", "delivered")]).await == 1.0
    })
    .await;
    assert!(counted, "{}", gw.metrics().await);
    assert_eq!(gw.metric("acc_review_webhooks_total", &[("route", "main"), ("result", "error")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_webhooks_total", &[("route", "main"), ("result", "failed")]).await, 0.0);
    assert!(!gw.stderr().contains(SECRET), "the secret never appears in the logs");
    assert!(!gw.metrics().await.contains(SECRET));
}

/// Runs tests/sdk/test_review_sdk.py with the venv's python (scripts/python-env.sh) and returns
/// its last stdout line.
async fn sdk(gw: &Gateway, args: &[&str]) -> String {
    let root = repo_root();
    let setup = std::process::Command::new("bash")
        .arg(root.join("scripts").join("python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(setup.status.success(), "scripts/python-env.sh failed: {}", String::from_utf8_lossy(&setup.stderr));
    let python = String::from_utf8_lossy(&setup.stdout).lines().last().expect("python path").trim().to_string();
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(root.join("tests").join("sdk").join("test_review_sdk.py"))
        .args(args)
        .env("ACC_BASE_URL", gw.url("/v1"))
        .env("ACC_API_KEY", KEY_A)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    for var in ["OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"] {
        cmd.env_remove(var);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run python")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "test_review_sdk.py {args:?} failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or_default().trim().to_string()
}

/// The README's Python snippet, with the official SDK: `pending_review` is raised, not retried
/// (the provider is called once although the client allows 3 retries), and the approved image
/// is collected by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_raises_pending_review_without_retrying_and_collects_the_image() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;
    let id = sdk(&gw, &["hold"]).await;
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(mock.hits(), 1, "the SDK did not retry");
    assert_eq!(gw.metric("acc_requests_total", &[("route", "main"), ("outcome", "pending_review")]).await, 1.0);
    decide(&gw, &id, "approve", &json!({"reviewer": "rita"})).await.assert_status(200);
    assert_eq!(sdk(&gw, &["collect", &id, &b64_encode(mock.png())]).await, "collected");
}

/// A hold whose write fails after the attempts (here: the client reused a trace id that is
/// already held) gets the route's overflow action too: `block` refuses, `flag` returns the image
/// flagged; the item already held is untouched.
#[tokio::test]
async fn a_hold_that_cannot_be_written_applies_review_overflow_after_the_attempts() {
    let mock = MockProvider::start().await;
    let routes = format!(
        "{}{}",
        review_route("strict", "block", ""),
        review_route("lenient", "flag", "review_overflow = \"flag\"")
    );
    let (gw, _dir) = serve_policy(&policy(&mock, &routes, ""), &[]).await;
    let id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let auth = bearer(KEY_A);
    let send = |model: &'static str| {
        let (gw, auth) = (&gw, auth.clone());
        async move {
            gw.generate_with(
                &json!({"model": model, "prompt": "a lighthouse", "response_format": "b64_json"}),
                &[("authorization", &auth), ("x-acc-trace-id", id)],
            )
            .await
        }
    };
    assert_eq!(assert_pending(&send("block").await), id);
    let again = send("block").await;
    let err = again.assert_error(400, "content_policy_violation");
    assert_eq!(
        err["message"], "the generated image needs human review and the review queue cannot take it: it is withheld",
        "nothing says another request carried this trace id"
    );
    let flagged = send("flag").await;
    flagged.assert_status(200);
    assert_eq!(flagged.header("x-acc-decision").as_deref(), Some("flagged"));
    assert_eq!(b64_images(&flagged), vec![mock.png().to_vec()]);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "strict"), ("outcome", "overflow")]).await, 1.0);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "lenient"), ("outcome", "overflow")]).await, 1.0);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "strict"), ("outcome", "held")]).await, 1.0);
    assert_eq!(gw.metric("acc_review_queue_depth", &[("route", "strict")]).await, 1.0);
    let item = &gw.admin("GET", "/admin/reviews").await.json()["data"][0];
    assert_eq!((item["trace_id"].as_str(), item["route"].as_str()), (Some(id), Some("strict")));
}

/// A retry with the same `Idempotency-Key` replays the held answer: same trace id to poll, no
/// second generation, no second item.
#[tokio::test]
async fn an_idempotent_retry_replays_pending_review() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve_policy(&policy(&mock, &review_route("main", "m", ""), ""), &[]).await;
    let auth = bearer(KEY_A);
    let body = json!({"model": "m", "prompt": "a lighthouse", "response_format": "b64_json"});
    let headers = [("authorization", auth.as_str()), ("idempotency-key", "order-77")];
    let first = assert_pending(&gw.generate_with(&body, &headers).await);
    let second = gw.generate_with(&body, &headers).await;
    assert_eq!(assert_pending(&second), first);
    assert_eq!(mock.hits(), 1);
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "main"), ("outcome", "held")]).await, 1.0);
}
