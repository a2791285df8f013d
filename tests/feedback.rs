//! Feedback and regenerations through the running binary: `POST /v1/feedback` stores a rating
//! with the trace's fields (exact values), replaces it on repeat, works while the trace's record
//! still waits in the writer's queue, refuses bad input naming the field, and never lets one
//! tenant see or rate another's trace; regenerations are linked explicitly (header, body) and
//! implicitly (near-identical prompt, same tenant, end user and route, inside the window), and
//! leave an implicit -1 on the trace they regenerate.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KEY_A: &str = "sk-feedback-acme-1";
const KEY_A2: &str = "sk-feedback-acme-2";
const KEY_B: &str = "sk-feedback-globex-1";

fn key_name(key: &str) -> String {
    sha256_hex(key)[..12].to_string()
}

fn policy(mock: &MockProvider, extra: &str) -> String {
    format!(
        "{}[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n\n[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n\n\
         [[keys]]\nsha256 = \"{}\"\ntenant = \"globex\"\n\n\
         [cohorts]\ncohorts = [\"beta\"]\ntemplates = [\"hero@3\"]\nasset_types = [\"banner\"]\n\n{}{}{}{}{}{extra}",
        openai_provider("p", mock),
        sha256_hex(KEY_A),
        sha256_hex(KEY_A2),
        sha256_hex(KEY_B),
        route_toml("main", "m").target_default("p"),
        route_toml("other", "o").target_default("p"),
        route_toml("short", "s").target_default("p").with("regeneration_window_secs = 1"),
        route_toml("off", "z").target_default("p").with("regeneration_window_secs = 0"),
        route_toml("hashed", "h").target_default("p").with("record_prompt = \"sha256\""),
    )
}

/// A generation on `model` with `prompt` for end user `user` (none: the key's name), with the
/// cohort headers and any `extra` headers; asserts 200 and returns the trace id.
async fn generate(
    gw: &Gateway,
    key: &str,
    model: &str,
    prompt: &str,
    user: Option<&str>,
    extra: &[(&str, &str)],
) -> String {
    let mut body = json!({"model": model, "prompt": prompt, "n": 2, "response_format": "b64_json"});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    generate_body(gw, key, &body, extra).await
}

async fn generate_body(gw: &Gateway, key: &str, body: &Value, extra: &[(&str, &str)]) -> String {
    let auth = bearer(key);
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("x-acc-cohort", "beta"),
        ("x-acc-prompt-template", "hero@3"),
        ("x-acc-asset-type", "banner"),
    ];
    headers.extend_from_slice(extra);
    let r = gw.generate_with(body, &headers).await;
    r.assert_status(200);
    r.header("x-acc-trace-id").expect("x-acc-trace-id")
}

/// `acc serve` on `policy`, once its trace store is open (the writer opens it in the background
/// after start-up; until then a rating is a 503).
async fn serve(policy: &str) -> (Gateway, PolicyDir) {
    let (gw, dir) = serve_policy(policy, &[]).await;
    wait_store(&gw).await;
    (gw, dir)
}

async fn wait_store(gw: &Gateway) {
    let ready = eventually(Duration::from_secs(10), || async {
        get(&gw.admin_url("/readyz"), &[]).await.json()["trace_store"]["state"] == "ready"
    })
    .await;
    assert!(ready, "the trace store never opened");
}

async fn rate(gw: &Gateway, key: &str, body: &Value) -> Resp {
    post_json(&gw.url("/v1/feedback"), body, &[("authorization", &bearer(key))]).await
}

/// The admin view of `trace_id` once its record is written (and, when `feedback` is given, once
/// it holds that many feedback entries).
async fn trace(gw: &Gateway, trace_id: &str, feedback: Option<usize>) -> Value {
    let mut last = None;
    for _ in 0..200 {
        let r = gw.admin("GET", &format!("/admin/traces/{trace_id}")).await;
        if r.status == 200 {
            let v = r.json();
            if feedback.is_none_or(|n| v["feedback"].as_array().map(Vec::len) == Some(n)) {
                return v;
            }
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no record of {trace_id} with {feedback:?} feedback entries: {}", last.unwrap().describe());
}

/// The entry as stored, without its time (asserted separately).
fn without_time(mut v: Value) -> Value {
    let t = v.as_object_mut().unwrap().remove("created_unix_nano").expect("created_unix_nano");
    assert!(t.as_u64().unwrap() > 1_700_000_000_000_000_000, "{t}");
    v
}

#[tokio::test]
async fn a_rating_is_stored_with_the_traces_fields_and_replaced_on_repeat() {
    let mock = MockProvider::start().await;
    // Records wait 3 s in the writer's queue: every rating below arrives before the record is
    // in the store, and is taken from the in-memory index of recent traces.
    let (gw, _dir) = serve(&policy(&mock, "[store]\nflush_interval_ms = 3000\n")).await;
    let id = generate(&gw, KEY_A, "m", "a red fox in the snow", Some("end-user-7"), &[]).await;
    gw.admin("GET", &format!("/admin/traces/{id}")).await.assert_error(404, "trace_not_found");

    let r = rate(
        &gw,
        KEY_A,
        &json!({"trace_id": id, "rating": "down", "image_index": 1, "comment": "too dark", "labels": ["dark", "off-brand"]}),
    )
    .await;
    r.assert_status(200);
    let key_a = key_name(KEY_A);
    let expected_first = json!({
        "object": "feedback", "trace_id": id, "image_index": 1, "end_user": key_a, "tenant": "acme",
        "route": "main", "cohort": "beta", "prompt_template": "hero@3", "asset_type": "banner",
        "provider": "p", "rating": -1.0, "rating_label": "down", "comment": "too dark",
        "labels": ["dark", "off-brand"], "source": "explicit",
    });
    assert_eq!(without_time(r.json()), expected_first);
    // Another end user's rating of the whole answer is an entry of its own...
    let r = rate(&gw, KEY_A, &json!({"trace_id": id, "rating": 0.5, "user": "end-user-7"})).await;
    r.assert_status(200);
    assert_eq!((r.json()["image_index"].as_i64(), r.json()["rating_label"].as_str()), (Some(-1), Some("up")));
    // ...and the same end user, image and trace again replaces the first (uppercase id too).
    let r = rate(&gw, KEY_A, &json!({"trace_id": id.to_uppercase(), "rating": "up", "image_index": 1})).await;
    r.assert_status(200);
    // An image the answer does not have.
    let e = rate(&gw, KEY_A, &json!({"trace_id": id, "rating": "up", "image_index": 2}))
        .await
        .assert_error(400, "invalid_value");
    assert_eq!(e["param"], "image_index");
    assert_eq!(e["message"], "image_index 2 is beyond the trace's 2 image(s)");

    let v = trace(&gw, &id, Some(2)).await;
    let feedback: Vec<Value> = v["feedback"].as_array().unwrap().iter().cloned().map(without_time).collect();
    let common = json!({
        "trace_id": id, "tenant": "acme", "route": "main", "cohort": "beta", "prompt_template": "hero@3",
        "asset_type": "banner", "provider": "p", "source": "explicit",
    });
    let with = |extra: Value| {
        let mut e = common.clone();
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        e
    };
    assert_eq!(
        feedback,
        vec![
            with(json!({"image_index": -1, "end_user": "end-user-7", "rating": 0.5, "comment": null, "labels": []})),
            with(json!({"image_index": 1, "end_user": key_a, "rating": 1.0, "comment": null, "labels": []})),
        ]
    );
    assert_eq!(v["regenerated_by"], json!([]));
    let m = gw.metrics().await;
    let labels = [("route", "main"), ("cohort", "beta"), ("template", "hero@3"), ("asset_type", "banner")];
    let count = |rating: &str| {
        let mut l = labels.to_vec();
        l.push(("rating", rating));
        metric_sum(&m, "acc_feedback_total", &l)
    };
    assert_eq!((count("up"), count("down"), count("neutral")), (2.0, 1.0, 0.0));

    // The same rating sent again is stored (a new comment) but counted once: one client
    // re-posting cannot move the thumbs rates. A changed rating is counted.
    for i in 0..5 {
        let again = json!({"trace_id": id, "rating": "up", "image_index": 1, "comment": format!("still good {i}")});
        rate(&gw, KEY_A, &again).await.assert_status(200);
    }
    let down = json!({"trace_id": id, "rating": "down", "image_index": 1});
    rate(&gw, KEY_A, &down).await.assert_status(200);
    let m = gw.metrics().await;
    let count = |rating: &str| {
        let mut l = labels.to_vec();
        l.push(("rating", rating));
        metric_sum(&m, "acc_feedback_total", &l)
    };
    assert_eq!((count("up"), count("down")), (2.0, 2.0));
}

#[tokio::test]
async fn tenants_cannot_see_or_rate_each_others_traces() {
    let mock = MockProvider::start().await;
    let (gw, dir) = serve(&policy(&mock, "")).await;
    let id = generate(&gw, KEY_A, "m", "a red fox in the snow", Some("u1"), &[]).await;
    // Another key of the same tenant may rate it.
    rate(&gw, KEY_A2, &json!({"trace_id": id, "rating": "up"})).await.assert_status(200);
    // The other tenant gets exactly what a trace that never existed gets.
    let theirs = rate(&gw, KEY_B, &json!({"trace_id": id, "rating": "down"})).await;
    let unknown = rate(&gw, KEY_B, &json!({"trace_id": "0123456789abcdef0123456789abcdef", "rating": "down"})).await;
    theirs.assert_error(404, "trace_not_found");
    assert_eq!((theirs.status, theirs.text()), (unknown.status, unknown.text()));
    // Also once the record is in the store (not just in memory).
    trace(&gw, &id, Some(1)).await;
    let stored = rate(&gw, KEY_B, &json!({"trace_id": id, "rating": "down"})).await;
    assert_eq!((stored.status, stored.text()), (unknown.status, unknown.text()));
    // Without a key: 401, as on the image endpoints.
    post_json(&gw.url("/v1/feedback"), &json!({"trace_id": id, "rating": "up"}), &[])
        .await
        .assert_error(401, "invalid_api_key");
    // Nor can the other tenant link a regeneration to it: the link is ignored, never an error.
    let b = generate(&gw, KEY_B, "m", "a red fox in the snow", Some("u1"), &[("x-acc-regenerate-of", &id)]).await;
    let rec = trace(&gw, &b, None).await;
    assert_eq!(rec.get("regeneration"), None, "{rec:#}");
    let v = trace(&gw, &id, Some(1)).await;
    assert_eq!(v["feedback"][0]["end_user"], key_name(KEY_A2));
    assert_eq!(v["regenerated_by"], json!([]));
    assert_eq!(gw.metric("acc_regenerations_total", &[]).await, 0.0);
    assert_eq!(gw.metric("acc_feedback_total", &[]).await, 1.0);
    // After a restart the trace is known from the store only: the same answers.
    drop(gw);
    let gw = Gateway::start(dir.path()).await;
    wait_store(&gw).await;
    let stored = rate(&gw, KEY_B, &json!({"trace_id": id, "rating": "down"})).await;
    assert_eq!((stored.status, stored.text()), (unknown.status, unknown.text()));
    let r = rate(&gw, KEY_A, &json!({"trace_id": id, "rating": "down", "image_index": 1, "user": "u1"})).await;
    r.assert_status(200);
    assert_eq!(
        without_time(r.json()),
        json!({
            "object": "feedback", "trace_id": id, "image_index": 1, "end_user": "u1", "tenant": "acme",
            "route": "main", "cohort": "beta", "prompt_template": "hero@3", "asset_type": "banner",
            "provider": "p", "rating": -1.0, "rating_label": "down", "comment": null, "labels": [],
            "source": "explicit",
        })
    );
    // Explicit links are checked against the store too: the other tenant's is ignored, the
    // same tenant's made.
    let theirs = generate(&gw, KEY_B, "m", "a lighthouse", Some("u9"), &[("x-acc-regenerate-of", &id)]).await;
    let ours = generate(&gw, KEY_A, "m", "a lighthouse", Some("u9"), &[("x-acc-regenerate-of", &id)]).await;
    assert_eq!(trace(&gw, &theirs, None).await.get("regeneration"), None);
    assert_eq!(trace(&gw, &ours, None).await["regeneration"], json!({"of": id, "how": "explicit", "similarity": 1.0}));
    let v = trace(&gw, &id, Some(3)).await;
    assert_eq!(v["regenerated_by"], json!([{"trace_id": ours, "how": "explicit", "end_user": "u9"}]));
}

/// A client may continue any W3C trace, another tenant's too (`traceparent` or
/// `x-acc-trace-id` with a known id): the trace stays its first tenant's. The other tenant can
/// neither replace the owner's rating nor lock the owner out, in memory or from the store.
#[tokio::test]
async fn another_tenant_reusing_a_trace_id_cannot_take_its_ratings_over() {
    let mock = MockProvider::start().await;
    let (gw, dir) = serve(&policy(&mock, "")).await;
    let id = generate(&gw, KEY_A, "m", "a red fox", Some("u7"), &[]).await;
    rate(&gw, KEY_A, &json!({"trace_id": id, "rating": "up", "user": "u7"})).await.assert_status(200);
    let parent = format!("00-{id}-00f067aa0ba902b7-01");
    let theirs = generate(&gw, KEY_B, "m", "a blue fox", Some("u7"), &[("traceparent", &parent)]).await;
    assert_eq!(theirs, id, "the gateway continues the client's trace");
    let check = |gw: Gateway, id: String| async move {
        let b =
            rate(&gw, KEY_B, &json!({"trace_id": id, "rating": "down", "user": "u7", "comment": "B was here"})).await;
        b.assert_error(404, "trace_not_found");
        let a = rate(&gw, KEY_A, &json!({"trace_id": id, "rating": "up", "user": "u7"})).await;
        a.assert_status(200);
        assert_eq!(a.json()["tenant"], "acme", "{}", a.describe());
        let v = trace(&gw, &id, Some(1)).await;
        let feedback = v["feedback"].as_array().cloned().unwrap_or_default();
        assert_eq!(feedback.len(), 1, "{v:#}");
        assert_eq!((feedback[0]["tenant"].as_str(), feedback[0]["comment"].as_str()), (Some("acme"), None), "{v:#}");
        gw
    };
    let gw = check(gw, id.clone()).await;
    // From the store alone, after a restart: the same.
    drop(gw);
    let gw = Gateway::start(dir.path()).await;
    wait_store(&gw).await;
    check(gw, id).await;
}

#[tokio::test]
async fn bad_feedback_gets_an_openai_error_naming_the_field() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve(&policy(&mock, "")).await;
    let id = generate(&gw, KEY_A, "m", "a red fox", None, &[]).await;
    let cases = [
        (json!({"rating": "up"}), "trace_id", "missing_required_parameter"),
        (json!({"trace_id": "xyz", "rating": "up"}), "trace_id", "invalid_value"),
        (json!({"trace_id": id}), "rating", "missing_required_parameter"),
        (json!({"trace_id": id, "rating": "meh"}), "rating", "invalid_value"),
        (json!({"trace_id": id, "rating": 1.5}), "rating", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "image_index": -1}), "image_index", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "comment": "x".repeat(2001)}), "comment", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "labels": vec!["l"; 17]}), "labels", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "labels": ["x".repeat(65)]}), "labels", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "user": 7}), "user", "invalid_type"),
        // NUL (PostgreSQL's text refuses it) and other control characters; line breaks are fine.
        (json!({"trace_id": id, "rating": "up", "comment": "too\u{0}dark"}), "comment", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "comment": "a\u{1b}[31m"}), "comment", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "labels": ["dark\u{0}"]}), "labels", "invalid_value"),
        (json!({"trace_id": id, "rating": "up", "stars": 5}), "body", "unknown_parameter"),
    ];
    for (body, param, code) in cases {
        let r = rate(&gw, KEY_A, &body).await;
        let e = r.assert_error(400, code);
        assert_eq!((e["param"].as_str(), e["type"].as_str()), (Some(param), Some("invalid_request_error")), "{body}");
    }
    let r = post_raw(&gw.url("/v1/feedback"), b"{not json".to_vec(), &[("authorization", &bearer(KEY_A))]).await;
    r.assert_error(400, "invalid_json");
    let r = get(&gw.url("/v1/feedback"), &[("authorization", &bearer(KEY_A))]).await;
    r.assert_error(405, "method_not_allowed");
    // A body over 64 KiB.
    let big = json!({"trace_id": id, "rating": "up", "comment": "x".repeat(70_000)});
    rate(&gw, KEY_A, &big).await.assert_error(413, "request_too_large");
    // The regeneration header is checked like any field.
    let auth = bearer(KEY_A);
    let r = gw
        .generate_with(
            &json!({"model": "m", "prompt": "p"}),
            &[("authorization", &auth), ("x-acc-regenerate-of", "nope")],
        )
        .await;
    assert_eq!(r.assert_error(400, "invalid_value")["param"], "x-acc-regenerate-of");
    let r = gw
        .generate_with(&json!({"model": "m", "prompt": "p", "acc": {"regenerate_of": 5}}), &[("authorization", &auth)])
        .await;
    assert_eq!(r.assert_error(400, "invalid_value")["param"], "acc.regenerate_of");
    assert_eq!(gw.metric("acc_feedback_total", &[]).await, 0.0);
}

#[tokio::test]
async fn a_store_that_is_down_answers_503_and_counts_it() {
    let mock = MockProvider::start().await;
    let store = format!("[store]\nurl = \"postgres://acc@127.0.0.1:{}/acc\"\n", closed_port());
    let (gw, _dir) = serve_policy(&policy(&mock, &store), &[]).await;
    let id = generate(&gw, KEY_A, "m", "a red fox", None, &[]).await;
    let r = rate(&gw, KEY_A, &json!({"trace_id": id, "rating": "up"})).await;
    r.assert_error(503, "store_unavailable");
    assert!(!r.text().contains("127.0.0.1"), "the store's address stays inside: {}", r.text());
    // An unknown trace cannot be told from the store's answer either: still 503, not 404.
    let r = rate(&gw, KEY_A, &json!({"trace_id": "0123456789abcdef0123456789abcdef", "rating": "up"})).await;
    r.assert_error(503, "store_unavailable");
    assert_eq!(
        gw.metric("acc_feedback_failed_total", &[("source", "explicit"), ("reason", "store_unavailable")]).await,
        2.0
    );
    assert_eq!(gw.metric("acc_feedback_total", &[]).await, 0.0);
}

#[tokio::test]
async fn explicit_regeneration_by_header_and_by_body_links_the_traces() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve(&policy(&mock, "")).await;
    let first = generate(&gw, KEY_A, "m", "a red fox in the snow", Some("u1"), &[]).await;
    // u1 said what they think before regenerating: that stays.
    rate(&gw, KEY_A, &json!({"trace_id": first, "rating": "up", "user": "u1"})).await.assert_status(200);
    let by_header = generate(
        &gw,
        KEY_A,
        "m",
        "a lighthouse at dawn",
        Some("u1"),
        &[("x-acc-regenerate-of", &first.to_uppercase())],
    )
    .await;
    let body = json!({
        "model": "m", "prompt": "something else entirely", "user": "u2",
        "acc": {"aspect": "1:1", "regenerate_of": first},
    });
    let by_body = generate_body(&gw, KEY_A, &body, &[]).await;

    let rec = trace(&gw, &by_header, None).await;
    assert_eq!(rec["regeneration"], json!({"of": first, "how": "explicit", "similarity": 1.0}));
    let rec = trace(&gw, &by_body, None).await;
    assert_eq!(rec["regeneration"], json!({"of": first, "how": "explicit", "similarity": 1.0}));
    assert_eq!(rec["contract"]["aspect"], "1:1", "the contract beside regenerate_of is kept");
    assert_eq!(rec["contract"].get("regenerate_of"), None);

    let v = trace(&gw, &first, Some(2)).await;
    assert_eq!(v.get("regeneration"), None, "the first is no regeneration");
    let feedback: Vec<Value> = v["feedback"].as_array().unwrap().iter().cloned().map(without_time).collect();
    let fields = json!({
        "trace_id": first, "image_index": -1, "tenant": "acme", "route": "main", "cohort": "beta",
        "prompt_template": "hero@3", "asset_type": "banner", "provider": "p",
    });
    let with = |extra: Value| {
        let mut e = fields.clone();
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        e
    };
    assert_eq!(
        feedback,
        vec![
            // u1's own rating stays, and carries the link of u1's regeneration.
            with(json!({
                "end_user": "u1", "rating": 1.0, "comment": null, "labels": [], "source": "explicit",
                "regenerated_by": by_header, "regeneration_how": "explicit",
            })),
            with(json!({
                "end_user": "u2", "rating": -1.0, "comment": null, "source": "regeneration",
                "labels": [format!("regenerated_by:{by_body}"), "how:explicit"],
                "regenerated_by": by_body, "regeneration_how": "explicit",
            })),
        ]
    );
    assert_eq!(
        v["regenerated_by"],
        json!([
            {"trace_id": by_header, "how": "explicit", "end_user": "u1"},
            {"trace_id": by_body, "how": "explicit", "end_user": "u2"},
        ])
    );
    // u2 now rates it (the rating replaces the implicit -1) and regenerates it once more: the
    // rating stays u2's and the link is the latest regeneration (a fresh-user trial found both
    // links gone).
    rate(&gw, KEY_A, &json!({"trace_id": first, "rating": "up", "user": "u2"})).await.assert_status(200);
    let again = generate(&gw, KEY_A, "m", "a third try", Some("u2"), &[("x-acc-regenerate-of", &first)]).await;
    let linked = eventually(Duration::from_secs(10), || async {
        let v = trace(&gw, &first, Some(2)).await;
        v["regenerated_by"][1]["trace_id"] == again.as_str()
    })
    .await;
    let v = trace(&gw, &first, Some(2)).await;
    assert!(linked, "{v:#}");
    assert_eq!(
        v["regenerated_by"],
        json!([
            {"trace_id": by_header, "how": "explicit", "end_user": "u1"},
            {"trace_id": again, "how": "explicit", "end_user": "u2"},
        ])
    );
    let u2 = &v["feedback"][1];
    assert_eq!((&u2["rating"], &u2["source"], &u2["labels"]), (&json!(1.0), &json!("explicit"), &json!([])), "{v:#}");
    assert_eq!(
        gw.metric("acc_regenerations_total", &[("route", "main"), ("cohort", "beta"), ("how", "explicit")]).await,
        3.0
    );
    assert_eq!(gw.metric("acc_regenerations_total", &[("how", "implicit")]).await, 0.0);
    // A link to a trace that does not exist is ignored.
    let stray = generate(
        &gw,
        KEY_A,
        "m",
        "a quiet harbour",
        Some("u3"),
        &[("x-acc-regenerate-of", "0123456789abcdef0123456789abcdef")],
    )
    .await;
    assert_eq!(trace(&gw, &stray, None).await.get("regeneration"), None);
}

#[tokio::test]
async fn implicit_regeneration_needs_the_same_tenant_user_route_and_a_near_identical_prompt() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve(&policy(&mock, "")).await;
    let p = "a red fox in the snow";
    let first = generate(&gw, KEY_A, "m", p, Some("u1"), &[]).await;
    let again = generate(&gw, KEY_A, "m", "A red fox in the snow, please!", Some("u1"), &[]).await;
    // None of these is a regeneration of anything.
    let others = [
        generate(&gw, KEY_B, "m", p, Some("u1"), &[]).await,
        generate(&gw, KEY_A, "m", p, Some("u2"), &[]).await,
        generate(&gw, KEY_A, "o", p, Some("u1"), &[]).await,
        generate(&gw, KEY_A, "m", "a blue car at night", Some("u1"), &[]).await,
        // The end user is the key's name when the body has no user: another key, another user.
        generate(&gw, KEY_A2, "m", p, None, &[]).await,
    ];
    let rec = trace(&gw, &again, None).await;
    assert_eq!(rec["regeneration"], json!({"of": first, "how": "implicit", "similarity": 6.0 / 7.0}));
    for id in &others {
        let rec = trace(&gw, id, None).await;
        assert_eq!(rec.get("regeneration"), None, "{rec:#}");
    }
    let v = trace(&gw, &first, Some(1)).await;
    let entry = without_time(v["feedback"][0].clone());
    assert_eq!(
        entry,
        json!({
            "trace_id": first, "image_index": -1, "end_user": "u1", "tenant": "acme", "route": "main",
            "cohort": "beta", "prompt_template": "hero@3", "asset_type": "banner", "provider": "p",
            "rating": -1.0, "comment": null, "labels": [format!("regenerated_by:{again}"), "how:implicit"],
            "source": "regeneration", "regenerated_by": again, "regeneration_how": "implicit",
        })
    );
    assert_eq!(v["regenerated_by"], json!([{"trace_id": again, "how": "implicit", "end_user": "u1"}]));
    assert_eq!(
        gw.metric("acc_regenerations_total", &[("route", "main"), ("cohort", "beta"), ("how", "implicit")]).await,
        1.0
    );
    assert_eq!(gw.metric("acc_regenerations_total", &[]).await, 1.0);
    // The implicit -1 is no thumbs-down: acc_feedback_total counts what users said.
    assert_eq!(gw.metric("acc_feedback_total", &[]).await, 0.0);

    // `acc traces` marks the regeneration in its table and prints the feedback with a record.
    let acc_traces = |args: &[&str]| {
        let out = acc_command()
            .args(["traces", "--admin", &gw.admin])
            .args(args)
            .env("ACC_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = acc_traces(&["--route", "main", "--tenant", "acme"]);
    let marked: Vec<&str> = table.lines().filter(|l| l.contains("regenerates")).collect();
    assert_eq!(marked.len(), 1, "{table}");
    assert!(
        marked[0].starts_with(&again) && marked[0].ends_with(&format!("regenerates {first} (implicit)")),
        "{table}"
    );
    let one: Value = serde_json::from_str(&acc_traces(&[&first])).unwrap();
    assert_eq!(one["feedback"], v["feedback"]);
    assert_eq!(one["regenerated_by"][0]["trace_id"], again.as_str());
}

/// Without keys and without `user` a request names no end user: two clients sending the same
/// prompt are not one person regenerating, so nothing is linked (an explicit link still is).
#[tokio::test]
async fn a_request_naming_no_end_user_is_never_an_implicit_regeneration() {
    let mock = MockProvider::start().await;
    let pol = format!("{}{}", openai_provider("p", &mock), route_toml("main", "m").target_default("p"));
    let (gw, _dir) = serve(&pol).await;
    let send = |user: Option<&str>, extra: Vec<(&'static str, String)>| {
        let mut body = json!({"model": "m", "prompt": "a cute cat", "response_format": "b64_json"});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        let gw = &gw;
        async move {
            let headers: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = gw.generate_with(&body, &headers).await;
            r.assert_status(200);
            r.header("x-acc-trace-id").expect("x-acc-trace-id")
        }
    };
    let first = send(None, vec![]).await;
    let second = send(None, vec![]).await;
    assert_eq!(trace(&gw, &second, None).await.get("regeneration"), None);
    assert_eq!(gw.metric("acc_regenerations_total", &[]).await, 0.0);
    // The same prompt from a named end user, twice: the second regenerates the first.
    let u1 = send(Some("u1"), vec![]).await;
    let u1_again = send(Some("u1"), vec![]).await;
    assert_eq!(
        trace(&gw, &u1_again, None).await["regeneration"],
        json!({"of": u1, "how": "implicit", "similarity": 1.0})
    );
    // An anonymous explicit link is still one, and its implicit -1 names the anonymous user.
    let linked = send(None, vec![("x-acc-regenerate-of", first.clone())]).await;
    assert_eq!(
        trace(&gw, &linked, None).await["regeneration"],
        json!({"of": first, "how": "explicit", "similarity": 1.0})
    );
    let v = trace(&gw, &first, Some(1)).await;
    assert_eq!(v["regenerated_by"], json!([{"trace_id": linked, "how": "explicit", "end_user": "anonymous"}]));
    assert_eq!(gw.metric("acc_regenerations_total", &[("how", "implicit")]).await, 1.0);
}

#[tokio::test]
async fn implicit_detection_respects_the_window_and_record_prompt() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve(&policy(&mock, "")).await;
    let p = "a red fox in the snow";
    // Route "short" has a 1 s window: the same prompt 1.5 s later is a new request.
    let early = generate(&gw, KEY_A, "s", p, Some("u1"), &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = generate(&gw, KEY_A, "s", p, Some("u1"), &[]).await;
    // Route "off" has a window of 0: no implicit detection at all.
    let off =
        [generate(&gw, KEY_A, "z", p, Some("u1"), &[]).await, generate(&gw, KEY_A, "z", p, Some("u1"), &[]).await];
    // Route "hashed" records prompts as SHA-256 only: just the same normalised prompt counts.
    let h1 = generate(&gw, KEY_A, "h", p, Some("u1"), &[]).await;
    let h2 = generate(&gw, KEY_A, "h", "a red fox in the snow please", Some("u1"), &[]).await;
    let h3 = generate(&gw, KEY_A, "h", "  A RED fox in the snow.", Some("u1"), &[]).await;
    for id in [&early, &late, &off[0], &off[1], &h1, &h2] {
        let rec = trace(&gw, id, None).await;
        assert_eq!(rec.get("regeneration"), None, "{rec:#}");
    }
    // h3 is h1's prompt once normalised.
    let rec = trace(&gw, &h3, None).await;
    assert_eq!(rec["regeneration"], json!({"of": h1, "how": "implicit", "similarity": 1.0}));
    assert_eq!(rec["prompt"], Value::Null, "the prompt is not recorded on this route");
    assert_eq!(gw.metric("acc_regenerations_total", &[]).await, 1.0);
}

/// An edit is compared with the end user's edits of the same images only: the same instruction
/// on every product photo is no regeneration; the same edit of the same photo again is.
#[tokio::test]
async fn the_same_edit_of_other_images_is_no_regeneration() {
    let mock = MockProvider::start().await;
    let (gw, _dir) = serve(&policy(&mock, "")).await;
    let auth = bearer(KEY_A);
    let edit = |photo: Vec<u8>| {
        let form = Form::new()
            .text("model", "m")
            .text("prompt", "remove the background")
            .text("user", "u1")
            .text("response_format", "b64_json")
            .file("image", "photo.png", "image/png", photo);
        let (gw, auth) = (&gw, auth.clone());
        async move {
            let r = gw.edit(&form, &[("authorization", auth.as_str())]).await;
            r.assert_status(200);
            r.header("x-acc-trace-id").unwrap()
        }
    };
    let first = edit(make_png(32, 32, [200, 10, 10])).await;
    let other = edit(make_png(32, 32, [10, 200, 10])).await;
    assert_eq!(trace(&gw, &other, None).await.get("regeneration"), None);
    let again = edit(make_png(32, 32, [200, 10, 10])).await;
    assert_eq!(
        trace(&gw, &again, None).await["regeneration"],
        json!({"of": first, "how": "implicit", "similarity": 1.0})
    );
}
