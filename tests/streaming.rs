//! `stream: true` end to end through the binary: an OpenAI-kind upstream's server-sent events
//! relayed in order with their fields (generations and edits); partial images withheld and the
//! final image evaluated when the route evaluates (fallback to the next target, streamed or not);
//! other kinds answering with one completed event or a 400, as `unsupported_stream` says;
//! `partial_images` checked; the official `openai` Python SDK iterating the stream.

mod common;

use std::process::Command;

use common::mock::openai::{partial_png, STREAM_CREATED_AT};
use common::*;
use serde_json::{json, Value};

/// The events of a `text/event-stream` body: `(event name, data as JSON)`, in order.
fn events(r: &Resp) -> Vec<(String, Value)> {
    let text = r.text();
    assert!(text.ends_with("\n\n"), "an event stream ends with a blank line: {text:.200}");
    text.trim_end_matches('\n')
        .split("\n\n")
        .map(|block| {
            let (name, data) = block.split_once('\n').unwrap_or_else(|| panic!("event without data: {block:.200}"));
            let name = name.strip_prefix("event: ").unwrap_or_else(|| panic!("no event line: {block:.200}"));
            let data = data.strip_prefix("data: ").unwrap_or_else(|| panic!("no data line: {block:.200}"));
            (
                name.to_string(),
                serde_json::from_str(data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {data:.200}")),
            )
        })
        .collect()
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

/// The usage the mock reports with two partial images.
fn usage_two_partials() -> Value {
    json!({"input_tokens": 22, "input_tokens_details": {"image_tokens": 0, "text_tokens": 22},
           "output_tokens": 472, "total_tokens": 494})
}

/// The events in `text` so far (complete ones only), as [`events`] reads them.
fn events_in(text: &str) -> Vec<(String, Value)> {
    let complete = &text[..text.rfind("\n\n").map_or(0, |i| i + 2)];
    if complete.is_empty() {
        return Vec::new();
    }
    events(&Resp { status: 200, headers: http::HeaderMap::new(), body: complete.to_string().into() })
}

/// Reads `body` until `n` complete events have arrived (10 s at most); returns all text read.
async fn read_events(body: &mut hyper::body::Incoming, text: &mut String, n: usize) -> Vec<(String, Value)> {
    use http_body_util::BodyExt;
    loop {
        let ev = events_in(text);
        if ev.len() >= n {
            return ev;
        }
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("no event {} within 10 s; so far: {text:.300}", ev.len() + 1))
            .unwrap_or_else(|| panic!("the stream ended after {} events: {text:.300}", ev.len()))
            .expect("reading the stream");
        if let Some(d) = frame.data_ref() {
            text.push_str(std::str::from_utf8(d).unwrap());
        }
    }
}

#[tokio::test]
async fn openai_events_are_relayed_in_order_with_their_fields() {
    let up = MockProvider::start().await;
    let final_png = noisy(256, 256, 3);
    up.answer_with(&final_png);
    // The provider sends its partial images, then holds the final image until released.
    up.set_fault(Fault::GatedStream);
    let policy =
        format!("{}{}", openai_provider_at("up", &up.base_url()), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;

    let body = json!({"model": "m", "prompt": "a lighthouse", "size": "256x256", "quality": "high",
                      "stream": true, "partial_images": 2});
    let (status, headers, mut stream) = post_head(&gw.url("/v1/images/generations"), &body).await;
    // The partial images reach the client while the provider is still generating.
    let mut text = String::new();
    let ev = read_events(&mut stream, &mut text, 2).await;
    assert_eq!(status, 200);
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-acc-route").as_deref(), Some("main"));
    let trace_id = header("x-acc-trace-id").expect("a live stream names its trace");
    // What the outcome decides is not known when the stream starts.
    assert_eq!((header("x-acc-decision"), header("x-acc-provider")), (None, None));
    assert_eq!(names(&ev), ["image_generation.partial_image", "image_generation.partial_image"]);
    for (i, (name, data)) in ev.iter().enumerate() {
        assert_eq!(
            data,
            &json!({"type": name, "b64_json": b64_encode(&partial_png(256, 256, i as u32)), "partial_image_index": i,
                    "created_at": STREAM_CREATED_AT, "size": "256x256", "quality": "high",
                    "background": "opaque", "output_format": "png"})
        );
    }
    up.release_stream();
    let ev = read_events(&mut stream, &mut text, 3).await;
    assert_eq!(names(&ev[2..]), ["image_generation.completed"]);
    assert_eq!(
        ev[2].1,
        json!({"type": "image_generation.completed", "b64_json": b64_encode(&final_png),
               "created_at": STREAM_CREATED_AT, "size": "256x256", "quality": "high",
               "background": "opaque", "output_format": "png", "usage": usage_two_partials()})
    );
    use http_body_util::BodyExt;
    assert!(stream.frame().await.is_none(), "nothing after the completed event: {text:.300}");
    // The upstream was asked for the stream.
    let sent = up.last_body_json();
    assert_eq!((sent["stream"].clone(), sent["partial_images"].clone()), (json!(true), json!(2)));
    assert_eq!(up.last_header("accept").as_deref(), Some("text/event-stream"));
    // Counted and recorded like any request: the trace holds the final image.
    assert_eq!(gw.metric("acc_requests_total", &[("route", "main"), ("outcome", "ok")]).await, 1.0);
    let rec = gw.trace_record(&trace_id).await.json();
    assert_eq!(rec["outcome"], "ok");
    assert_eq!(
        rec["parameters"],
        json!({"model": "m", "n": 1, "size": "256x256", "quality": "high", "response_format": "b64_json",
               "stream": true, "partial_images": 2})
    );
    let images = rec["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{rec:#}");
    assert_eq!(images[0]["sha256"], sha256_bytes(&final_png));
    // With an Idempotency-Key the answer is kept whole (to be replayed), so it goes out at the
    // end, with every header; a retry replays the same events without a second generation.
    up.set_fault(Fault::None);
    let key = [("idempotency-key", "stream-1")];
    let first = gw.generate_with(&body, &key).await;
    assert_eq!(first.header("x-acc-provider").as_deref(), Some("up"));
    assert_eq!(first.header("x-acc-attempts").as_deref(), Some("up:ok"));
    assert_eq!(first.header("x-acc-decision").as_deref(), Some("pass"));
    assert_eq!(
        names(&events(&first)),
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    let again = gw.generate_with(&body, &key).await;
    assert_eq!(again.header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!((first.text(), up.hits()), (again.text(), 2));
}

#[tokio::test]
async fn a_stream_cut_after_live_partials_falls_back_or_ends_with_an_error_event() {
    let second = MockProvider::start().await;
    let final_png = noisy(256, 256, 5);
    second.answer_with(&final_png);
    let first = MockProvider::start().await;
    first.set_fault(Fault::GatedStreamCut);
    let policy = format!(
        "{}{}{}{}{}",
        openai_provider_at("first", &first.base_url()),
        openai_provider_at("second", &second.base_url()),
        route_toml("main", "m").target("first", "gpt-image-1").fallback("spare"),
        route_toml("spare", "spare").target("second", "gpt-image-1"),
        route_toml("alone", "solo").target("first", "gpt-image-1"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let body = json!({"model": "m", "prompt": "a lighthouse", "size": "256x256", "stream": true, "partial_images": 1});
    let (status, headers, mut stream) = post_head(&gw.url("/v1/images/generations"), &body).await;
    assert_eq!(status, 200);
    let mut text = String::new();
    assert_eq!(names(&read_events(&mut stream, &mut text, 1).await), ["image_generation.partial_image"]);
    // The first provider's connection is cut: the fallback's partial and final image follow.
    first.release_stream();
    let ev = read_events(&mut stream, &mut text, 3).await;
    assert_eq!(
        names(&ev),
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    assert_eq!(ev[2].1["b64_json"], b64_encode(&final_png));
    let trace_id = headers["x-acc-trace-id"].to_str().unwrap().to_string();
    let rec = gw.trace_record(&trace_id).await.json();
    let results: Vec<&str> =
        rec["attempts"].as_array().unwrap().iter().map(|a| a["result"].as_str().unwrap()).collect();
    assert_eq!(results.len(), 2, "{rec:#}");
    assert_eq!(results[1], "ok", "{rec:#}");

    // With nothing to fall back on, the stream that began ends with an OpenAI error event
    // (the error answer the request would otherwise have had).
    let body =
        json!({"model": "solo", "prompt": "a lighthouse", "size": "256x256", "stream": true, "partial_images": 1});
    let (_, _, mut stream) = post_head(&gw.url("/v1/images/generations"), &body).await;
    let mut text = String::new();
    read_events(&mut stream, &mut text, 1).await;
    first.release_stream();
    let ev = read_events(&mut stream, &mut text, 2).await;
    assert_eq!(names(&ev), ["image_generation.partial_image", "error"]);
    assert_eq!(ev[1].1["type"], "error");
    assert_eq!(ev[1].1["error"]["code"], "upstream_error", "{}", ev[1].1);
    assert_eq!(ev[1].1["error"]["type"], "api_error", "{}", ev[1].1);
    assert_eq!(gw.metric("acc_requests_total", &[("route", "alone"), ("outcome", "upstream_error")]).await, 1.0);
}

#[tokio::test]
async fn edit_streams_use_the_edit_event_names() {
    let up = MockProvider::start().await;
    let policy =
        format!("{}{}", openai_provider_at("up", &up.base_url()), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let form = Form::new()
        .text("model", "m")
        .text("prompt", "add a hat")
        .text("size", "256x256")
        .text("stream", "true")
        .text("partial_images", "1")
        .file("image", "in.png", "image/png", noisy(256, 256, 1));
    let r = gw.edit(&form, &[]).await;
    r.assert_status(200);
    let ev = events(&r);
    assert_eq!(names(&ev), ["image_edit.partial_image", "image_edit.completed"], "{}", r.describe());
    assert_eq!(ev[0].1["type"], "image_edit.partial_image");
    assert_eq!(ev[1].1["type"], "image_edit.completed");
    assert_eq!(ev[1].1["b64_json"], b64_encode(up.png()));
    let fields = up.last().form().await;
    let field = |n: &str| fields.iter().find(|p| p.name == n).map(|p| String::from_utf8_lossy(&p.data).into_owned());
    assert_eq!((field("stream").as_deref(), field("partial_images").as_deref()), (Some("true"), Some("1")));
}

/// Route `main` -> `first` (evaluated by sanity), falling back to route `spare` -> `second`.
async fn evaluating(second_provider: &str) -> (MockProvider, Gateway, PolicyDir) {
    let first = MockProvider::start().await;
    let policy = format!(
        "{}{}{}{}",
        openai_provider_at("first", &first.base_url()),
        second_provider,
        route_toml("main", "m").target("first", "gpt-image-1").fallback("spare").with("evaluators = [\"sanity\"]"),
        route_toml("spare", "spare").target_default("second").with("evaluators = [\"sanity\"]"),
    );
    let (gw, dir) = serve_policy(&policy, &[]).await;
    (first, gw, dir)
}

fn streamed_request() -> Value {
    json!({"model": "m", "prompt": "a product shot", "size": "256x256", "stream": true, "partial_images": 2})
}

#[tokio::test]
async fn an_evaluating_route_withholds_partials_and_sends_a_passing_final_image() {
    let second = MockProvider::start().await;
    let (first, gw, _d) = evaluating(&openai_provider_at("second", &second.base_url())).await;
    let good = noisy(256, 256, 5);
    first.answer_with(&good);
    let r = gw.generate(&streamed_request()).await;
    r.assert_status(200);
    let ev = events(&r);
    assert_eq!(names(&ev), ["image_generation.completed"], "partials are withheld: {}", r.describe());
    assert_eq!(ev[0].1["b64_json"], b64_encode(&good));
    assert_eq!(ev[0].1["created_at"], STREAM_CREATED_AT);
    // Partials the client will not get are not asked for (nor paid for).
    assert_eq!(first.last_body_json()["partial_images"], 0);
    assert_eq!(
        ev[0].1["usage"],
        json!({"input_tokens": 22, "input_tokens_details": {"image_tokens": 0, "text_tokens": 22},
               "output_tokens": 272, "total_tokens": 294})
    );
    assert_eq!(r.header("x-acc-eval").as_deref(), Some("sanity=pass(1.00)"));
    assert_eq!((first.hits(), second.hits()), (1, 0));
}

#[tokio::test]
async fn a_blank_final_image_falls_back_to_the_next_streamed_target() {
    let second = MockProvider::start().await;
    let (first, gw, _d) = evaluating(&openai_provider_at("second", &second.base_url())).await;
    first.answer_with(&blank(256, 256));
    let good = noisy(256, 256, 6);
    second.answer_with(&good);
    let r = gw.generate(&streamed_request()).await;
    r.assert_status(200);
    let ev = events(&r);
    assert_eq!(names(&ev), ["image_generation.completed"], "{}", r.describe());
    assert_eq!(ev[0].1["b64_json"], b64_encode(&good), "the blank image never goes out");
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:eval_failed, second:ok"));
    assert_eq!(r.header("x-acc-provider").as_deref(), Some("second"));
    assert_eq!((first.hits(), second.hits()), (1, 1));
    assert_eq!(second.last_body_json()["stream"], true);
}

#[tokio::test]
async fn a_broken_stream_falls_back_and_an_error_event_is_classified() {
    let second = MockProvider::start().await;
    second.answer_with(&noisy(256, 256, 2));
    let (first, gw, _d) = evaluating(&openai_provider_at("second", &second.base_url())).await;
    // Partials, then the connection's end without a completed event.
    let partial = json!({"type": "image_generation.partial_image", "b64_json": b64_encode(&noisy(256, 256, 1)),
                         "partial_image_index": 0, "created_at": 1, "size": "256x256", "quality": "low",
                         "background": "opaque", "output_format": "png"});
    first.set_body(Some(&format!("event: image_generation.partial_image\ndata: {partial}\n\n")));
    let r = gw.generate(&streamed_request()).await;
    r.assert_status(200);
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:bad_response, second:ok"), "{}", r.describe());
    assert_eq!(names(&events(&r)), ["image_generation.completed"]);

    // OpenAI's moderation refusing mid-stream: the client's content_policy_violation, no fallback.
    let refusal = json!({"type": "error", "error": {"type": "image_generation_user_error", "code": "moderation_blocked",
                         "message": "Your request was rejected by the safety system.", "param": null}});
    first.set_body(Some(&format!("event: error\ndata: {refusal}\n\n")));
    let r = gw.generate(&streamed_request()).await;
    let e = r.assert_error(400, "content_policy_violation");
    assert!(e["message"].as_str().unwrap().contains("safety system"), "{e}");
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:content_filtered"));
    assert_eq!((first.hits(), second.hits()), (2, 1));
}

/// A provider that streams more than it was asked for (completed events beyond `n`, partial
/// images beyond `partial_images`) is held to the request, as a plain answer with too many
/// images is: the client gets `n` completed events and at most the partials it asked for,
/// evaluators judge `n` images, and the trace records `n`.
#[tokio::test]
async fn a_stream_with_more_images_than_asked_is_cut_to_the_request() {
    let up = MockProvider::start().await;
    let policy = format!(
        "{}{}{}",
        openai_provider_at("up", &up.base_url()),
        route_toml("raw", "raw").target("up", "gpt-image-1"),
        route_toml("checked", "checked").target("up", "gpt-image-1").with("evaluators = [\"sanity\"]"),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let event = |kind: &str, seed: u32, index: Option<usize>| {
        let mut data = json!({"type": kind, "b64_json": b64_encode(&noisy(256, 256, seed)), "created_at": 1,
                              "size": "256x256", "quality": "low", "background": "opaque", "output_format": "png"});
        if let Some(i) = index {
            data["partial_image_index"] = json!(i);
        }
        format!("event: {kind}\ndata: {data}\n\n")
    };
    let mut flood = String::new();
    for i in 0..5 {
        flood.push_str(&event("image_generation.partial_image", 10 + i as u32, Some(i)));
    }
    for i in 0..3 {
        flood.push_str(&event("image_generation.completed", 20 + i, None));
    }
    up.set_body(Some(&flood));
    let first_completed = b64_encode(&noisy(256, 256, 20));
    for (model, partials) in [("raw", 1), ("checked", 0)] {
        let body = json!({"model": model, "prompt": "a lighthouse", "size": "256x256", "stream": true,
                          "partial_images": 1});
        let r = gw.generate(&body).await;
        r.assert_status(200);
        let ev = events(&r);
        let mut want = vec!["image_generation.partial_image"; partials];
        want.push("image_generation.completed");
        assert_eq!(names(&ev), want, "{model}: {}", r.describe());
        assert_eq!(ev.last().unwrap().1["b64_json"], json!(first_completed), "{model}");
        let trace_id = r.header("x-acc-trace-id").expect("trace id");
        let rec = gw.trace_record(&trace_id).await.json();
        assert_eq!(rec["images"].as_array().map(Vec::len), Some(1), "{model}: {rec:#}");
        if model == "checked" {
            assert_eq!(r.header("x-acc-eval").as_deref(), Some("sanity=pass(1.00)"), "{}", r.describe());
        }
    }
}

#[tokio::test]
async fn a_blank_final_image_falls_back_to_a_plain_target_as_one_completed_event() {
    let (first, gw, _d) = evaluating("[providers.second]\nkind = \"builtin\"\n\n").await;
    first.answer_with(&blank(256, 256));
    let r = gw.generate(&streamed_request()).await;
    r.assert_status(200);
    let ev = events(&r);
    assert_eq!(names(&ev), ["image_generation.completed"], "{}", r.describe());
    let e = &ev[0].1;
    let image = b64_decode(e["b64_json"].as_str().unwrap());
    assert_eq!(png_dims(&image), (256, 256));
    assert_ne!(image, blank(256, 256));
    assert_eq!(r.header("x-acc-attempts").as_deref(), Some("first:eval_failed, second:ok"));
    // Made by the gateway from the plain answer: now, the image's own size and format, what was
    // asked (or "auto"), no usage (the builtin kind reports none).
    let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["b64_json", "background", "created_at", "output_format", "quality", "size", "type"]);
    assert_ne!(e["created_at"], STREAM_CREATED_AT);
    assert_eq!(
        (e["size"].as_str(), e["quality"].as_str(), e["background"].as_str(), e["output_format"].as_str()),
        (Some("256x256"), Some("auto"), Some("auto"), Some("png"))
    );
}

#[tokio::test]
async fn a_blocked_or_held_final_image_is_an_error_answer_and_no_event() {
    let up = MockProvider::start().await;
    up.answer_with(&blank(256, 256));
    let policy = format!(
        "{}{}{}",
        openai_provider_at("up", &up.base_url()),
        route_toml("blocky", "blocky")
            .target("up", "gpt-image-1")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"block\""),
        route_toml("held", "held")
            .target("up", "gpt-image-1")
            .with("evaluators = [\"sanity\"]\non_sanity_fail = \"review\""),
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let ask =
        |model: &str| json!({"model": model, "prompt": "x", "size": "256x256", "stream": true, "partial_images": 2});

    let r = gw.generate(&ask("blocky")).await;
    r.assert_error(400, "content_policy_violation");
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("blocked"));
    assert!(!r.text().contains("partial_image"), "no event of the blocked image goes out: {}", r.describe());

    let r = gw.generate(&ask("held")).await;
    let e = r.assert_error(423, "pending_review");
    let id = r.header("x-acc-trace-id").unwrap();
    assert!(e["message"].as_str().unwrap().contains(&id), "{e}");
    assert_eq!(r.header("x-acc-decision").as_deref(), Some("review"));
    assert_eq!(r.header("x-should-retry").as_deref(), Some("false"));
    assert_eq!(gw.metric("acc_reviews_total", &[("route", "held"), ("outcome", "held")]).await, 1.0);
    // The outcome is polled as for any held answer.
    let p = get(&gw.url(&format!("/v1/images/reviews/{id}")), &[]).await;
    p.assert_error(423, "pending_review");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream() {
    let up = MockProvider::start().await;
    up.set_latency(std::time::Duration::from_secs(30));
    let policy =
        format!("{}{}", openai_provider_at("up", &up.base_url()), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let body = json!({"model": "m", "prompt": "x", "stream": true, "partial_images": 2});
    let conn = raw_post(gw.proxy_addr, "/v1/images/generations", &body, &[]).await;
    settles("the upstream must see the stream request", || up.in_flight() == 1).await;
    drop(conn);
    settles("the client leaving must drop the upstream call", || up.cancelled() == 1).await;
    assert_eq!(up.in_flight(), 0);
    let cancelled = [("route", "main"), ("outcome", "client_cancelled")];
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            gw.metric("acc_requests_total", &cancelled).await == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn other_kinds_answer_with_one_completed_event_or_a_400_as_their_policy_says() {
    let policy = "[providers.plain]\nkind = \"builtin\"\n\n[providers.strict]\nkind = \"builtin\"\nunsupported_stream = \"reject\"\n\n"
        .to_string()
        + &route_toml("plain", "plain").target_default("plain").to_string()
        + &route_toml("strict", "strict").target_default("strict").to_string();
    let (gw, _d) = serve_policy(&policy, &[]).await;
    let r = gw
        .generate(&json!({"model": "plain", "prompt": "a fox", "size": "256x256", "stream": true, "partial_images": 3}))
        .await;
    r.assert_status(200);
    assert_eq!(r.header("content-type").as_deref(), Some("text/event-stream"));
    let ev = events(&r);
    assert_eq!(names(&ev), ["image_generation.completed"]);
    assert_eq!(png_dims(&b64_decode(ev[0].1["b64_json"].as_str().unwrap())), (256, 256));

    let r = gw.generate(&json!({"model": "strict", "prompt": "a fox", "stream": true})).await;
    let e = r.assert_error(400, "unsupported_parameter");
    assert_eq!(
        e["message"],
        "provider \"strict\" (kind builtin) cannot stream images (stream: true) and its policy says unsupported_stream = \"reject\""
    );
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    // Without stream the same route answers as always.
    gw.generate(&json!({"model": "strict", "prompt": "a fox"})).await.assert_status(200);
}

#[tokio::test]
async fn stream_parameters_out_of_range_are_a_400() {
    let up = MockProvider::start().await;
    let policy =
        format!("{}{}", openai_provider_at("up", &up.base_url()), route_toml("main", "m").target("up", "gpt-image-1"));
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    for (partials, shown) in [(json!(4), "4"), (json!(-1), "-1"), (json!("2x"), "\"2x\"")] {
        let r = gw.generate(&json!({"model": "m", "prompt": "x", "stream": true, "partial_images": partials})).await;
        let e = r.assert_error(400, "invalid_value");
        assert_eq!(e["param"], "partial_images");
        assert_eq!(e["message"], format!("partial_images must be an integer between 0 and 3, got {shown}"));
    }
    let r = gw.generate(&json!({"model": "m", "prompt": "x", "stream": "yes"})).await;
    assert_eq!(r.assert_error(400, "invalid_value")["param"], "stream");
    let form =
        Form::new().text("model", "m").text("stream", "true").file("image", "in.png", "image/png", noisy(64, 64, 1));
    let r = gw.variation(&form, &[]).await;
    assert_eq!(r.assert_error(400, "unsupported_parameter")["param"], "stream");
    assert_eq!(up.hits(), 0, "nothing bad reaches the provider");
}

#[test]
fn unsupported_stream_is_validated() {
    let dir = PolicyDir::with(
        "[providers.a]\nkind = \"builtin\"\nunsupported_stream = \"maybe\"\n\n[providers.b]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nunsupported_stream = \"reject\"\n\n[[routes]]\nname = \"r\"\ntargets = [{ provider = \"a\" }, { provider = \"b\" }]\n",
    );
    let out = acc_check(dir.path());
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "providers.a.unsupported_stream: unknown action \"maybe\" (expected \"completed_event\" or \"reject\")"
        ),
        "{text}"
    );
    assert!(text.contains("providers.b.unsupported_stream: kind \"openai\" streams itself"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_iterates_the_stream() {
    let root = repo_root();
    let setup = tokio::task::spawn_blocking({
        let script = root.join("scripts").join("python-env.sh");
        move || Command::new("bash").arg(script).output().expect("run scripts/python-env.sh")
    })
    .await
    .unwrap();
    assert!(setup.status.success(), "scripts/python-env.sh failed:\n{}", String::from_utf8_lossy(&setup.stderr));
    let python = String::from_utf8_lossy(&setup.stdout).lines().last().expect("python path").trim().to_string();

    let up = MockProvider::start().await;
    let final_png = noisy(256, 256, 9);
    up.answer_with(&final_png);
    let policy = format!(
        "{}{}",
        openai_provider_at("up", &up.base_url()),
        route_toml("gpt", "gpt-image-1").target("up", "gpt-image-1")
    );
    let (gw, _dir) = serve_policy(&policy, &[]).await;
    let script = root.join("tests").join("sdk").join("test_stream_sdk.py");
    let base_url = gw.url("/v1");
    let expected =
        [b64_encode(&partial_png(256, 256, 0)), b64_encode(&partial_png(256, 256, 1)), b64_encode(&final_png)];
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .env("ACC_BASE_URL", &base_url)
            .env("ACC_PARTIAL_0", &expected[0])
            .env("ACC_PARTIAL_1", &expected[1])
            .env("ACC_FINAL", &expected[2])
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        for var in ["OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"] {
            cmd.env_remove(var);
        }
        cmd.output().unwrap_or_else(|e| panic!("run {python}: {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tests/sdk/test_stream_sdk.py failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- gateway ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
    assert!(stdout.contains("ok: stream of 3 events"), "{stdout}");
}

fn sha256_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
