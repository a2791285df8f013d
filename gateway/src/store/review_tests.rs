//! The review tables on SQLite and, when `ACC_TEST_POSTGRES_URL` is set, PostgreSQL: hold,
//! read back, list oldest first with keyset pages, decide once, expire, clean up, totals.

use serde_json::json;

use super::db::TraceDb;
use super::review::{HeldImage, ReviewFilter, ReviewItem, ReviewState};
use super::tests::stores;

const T: u64 = 1_700_000_000_000_000_000;
const S: u64 = 1_000_000_000;

fn item(trace_id: &str, route: &str, held: u64, bytes: u64) -> ReviewItem {
    ReviewItem {
        trace_id: trace_id.into(),
        route: route.into(),
        tenant: Some("acme".into()),
        cohort: Some("beta".into()),
        prompt_template: Some("hero@3".into()),
        asset_type: None,
        end_user: Some("u-7".into()),
        response_format: "b64_json".into(),
        state: ReviewState::Pending,
        held_unix_nano: held,
        expires_unix_nano: held + 60 * S,
        decided_unix_nano: None,
        reviewer: None,
        reason: None,
        image_count: 2,
        bytes,
        bytes_held: bytes,
        verdicts: json!([{"image": 0, "evaluator": "sanity", "verdict": "fail", "score": 0.0, "reason": "blank"}]),
        reasons: vec!["sanity: blank".into()],
        answer: Some(serde_json::json!({"fields": {"output_format": "png"}, "revised_prompts": ["a cat"]})),
    }
}

fn images() -> Vec<HeldImage> {
    vec![
        HeldImage { content_type: "image/png".into(), b64: "iVBORw0KGgo=".into() },
        HeldImage { content_type: "image/jpeg".into(), b64: "/9j/4AAQ".into() },
    ]
}

#[tokio::test]
async fn reviews_are_held_decided_once_and_survive_reopening() {
    for store in stores().await {
        let name = store.name;
        let db = TraceDb::open(&store.cfg).await.expect("open");
        let a = item(&"a".repeat(32), "main", T, 100);
        assert!(db.insert_review(&a, &images()).await.unwrap(), "{name}");
        assert!(!db.insert_review(&a, &images()).await.unwrap(), "{name}: a second hold of one trace id is refused");
        let b = item(&"b".repeat(32), "other", T + S, 40);
        assert!(db.insert_review(&b, &images()[..1]).await.unwrap(), "{name}");
        db.close().await;

        // A new pool on the same store: everything is still there.
        let db = TraceDb::open(&store.cfg).await.expect("reopen");
        assert_eq!(db.review(&a.trace_id).await.unwrap(), Some(a.clone()), "{name}");
        assert_eq!(db.review(&"c".repeat(32)).await.unwrap(), None, "{name}");
        assert_eq!(db.review_images(&a.trace_id).await.unwrap(), images(), "{name}");
        assert_eq!(db.review_image(&a.trace_id, 1).await.unwrap(), Some(images()[1].clone()), "{name}");
        assert_eq!(db.review_image(&a.trace_id, 2).await.unwrap(), None, "{name}");
        assert_eq!(
            db.review_totals().await.unwrap(),
            (vec![("main".to_string(), 1), ("other".to_string(), 1)], 140),
            "{name}"
        );

        // Oldest first, filtered, paged by (held, trace id).
        let page = |state, route: Option<&str>, after, limit| ReviewFilter {
            state,
            route: route.map(str::to_string),
            after,
            limit,
        };
        let ids = |v: Vec<ReviewItem>| v.into_iter().map(|i| i.trace_id).collect::<Vec<_>>();
        let all = db.list_reviews(&page(Some(ReviewState::Pending), None, None, 10)).await.unwrap();
        assert_eq!(ids(all), vec![a.trace_id.clone(), b.trace_id.clone()], "{name}");
        let first = db.list_reviews(&page(None, None, None, 1)).await.unwrap();
        assert_eq!(ids(first), vec![a.trace_id.clone()], "{name}");
        let second = db.list_reviews(&page(None, None, Some((T, a.trace_id.clone())), 1)).await.unwrap();
        assert_eq!(ids(second), vec![b.trace_id.clone()], "{name}");
        let other = db.list_reviews(&page(None, Some("other"), None, 10)).await.unwrap();
        assert_eq!(ids(other), vec![b.trace_id.clone()], "{name}");

        // Approved once; the second decision finds nothing pending.
        let keep = T + 100 * S;
        let approved =
            db.decide_review(&a.trace_id, ReviewState::Approved, "rita", Some("fine"), T + 5 * S, keep).await.unwrap();
        let approved = approved.expect("decided");
        assert_eq!(approved.state, ReviewState::Approved, "{name}");
        assert_eq!(
            (approved.decided_unix_nano, approved.reviewer.as_deref(), approved.reason.as_deref()),
            (Some(T + 5 * S), Some("rita"), Some("fine")),
            "{name}"
        );
        assert_eq!((approved.expires_unix_nano, approved.bytes_held), (keep, 100), "{name}");
        let again = db.decide_review(&a.trace_id, ReviewState::Rejected, "sam", None, T + 6 * S, 0).await.unwrap();
        assert_eq!(again, None, "{name}");
        assert_eq!(db.review(&a.trace_id).await.unwrap().unwrap().reviewer.as_deref(), Some("rita"), "{name}");
        assert_eq!(db.review_images(&a.trace_id).await.unwrap(), images(), "{name}: approved images are kept");

        // Rejected: images deleted, bytes freed.
        let rejected =
            db.decide_review(&b.trace_id, ReviewState::Rejected, "sam", Some("off-brand"), T + 7 * S, 0).await.unwrap();
        assert_eq!(rejected.map(|r| (r.state, r.bytes_held)), Some((ReviewState::Rejected, 0)), "{name}");
        assert_eq!(db.review_images(&b.trace_id).await.unwrap(), vec![], "{name}");
        assert_eq!(db.review_totals().await.unwrap(), (vec![], 100), "{name}");

        // Expiry finds pending items whose time has come, oldest first.
        let c = item(&"c".repeat(32), "main", T + 2 * S, 10);
        let d = item(&"d".repeat(32), "main", T + 3 * S, 10);
        db.insert_review(&c, &images()).await.unwrap();
        db.insert_review(&d, &images()).await.unwrap();
        assert_eq!(db.due_reviews(c.expires_unix_nano - 1, 10).await.unwrap(), Vec::<String>::new(), "{name}");
        assert_eq!(
            db.due_reviews(d.expires_unix_nano, 10).await.unwrap(),
            vec![c.trace_id.clone(), d.trace_id.clone()]
        );
        assert_eq!(db.due_reviews(d.expires_unix_nano, 1).await.unwrap(), vec![c.trace_id.clone()], "{name}");

        // Approved images are deleted once kept long enough.
        assert_eq!(db.drop_collected_reviews(keep - 1).await.unwrap(), 0, "{name}");
        assert_eq!(db.drop_collected_reviews(keep).await.unwrap(), 100, "{name}");
        assert_eq!(db.review_images(&a.trace_id).await.unwrap(), vec![], "{name}");
        assert_eq!(db.review(&a.trace_id).await.unwrap().unwrap().state, ReviewState::Approved, "{name}");
        assert_eq!(db.review_totals().await.unwrap(), (vec![("main".to_string(), 2)], 20), "{name}");
        db.close().await;
        store.cleanup().await;
    }
}
