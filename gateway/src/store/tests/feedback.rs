//! The `feedback` table on both engines: exact values back, one entry per (trace, image, end
//! user) replaced on repeat, and a regeneration's implicit entry never replacing an explicit one.

use super::super::feedback::{FeedbackEntry, EXPLICIT, REGENERATION};
use super::*;

fn entry(trace_id: &str, image_index: i64, end_user: &str, rating: f64) -> FeedbackEntry {
    FeedbackEntry {
        trace_id: trace_id.into(),
        image_index,
        end_user: end_user.into(),
        tenant: Some("acme".into()),
        route: Some("main".into()),
        cohort: Some("beta".into()),
        prompt_template: Some("hero@3".into()),
        asset_type: Some("banner".into()),
        provider: Some("first".into()),
        rating,
        comment: Some("too dark".into()),
        labels: vec!["dark".into(), "off-brand".into()],
        source: EXPLICIT.into(),
        created_unix_nano: T,
    }
}

async fn check_feedback(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    let t = id(1);
    let whole = entry(&t, -1, "u1", 1.0);
    let image = FeedbackEntry { comment: None, labels: vec![], ..entry(&t, 0, "u1", -0.25) };
    let other_user = entry(&t, 0, "u2", 0.0);
    for e in [&whole, &image, &other_user] {
        assert!(db.upsert_feedback(e).await.expect("upsert"), "{}", s.name);
    }
    assert!(db.upsert_feedback(&entry(&id(2), -1, "u1", -1.0)).await.expect("upsert"));
    assert_eq!(
        db.feedback_of(&t).await.expect("read"),
        vec![whole.clone(), image.clone(), other_user.clone()],
        "{}: ordered by image, then end user",
        s.name
    );

    // The same trace, image and end user again: replaced, not added.
    let again =
        FeedbackEntry { comment: Some("better now".into()), created_unix_nano: T + 5, ..entry(&t, -1, "u1", -1.0) };
    assert!(db.upsert_feedback(&again).await.expect("upsert"));
    let stored = db.feedback_of(&t).await.expect("read");
    assert_eq!(stored, vec![again.clone(), image.clone(), other_user.clone()], "{}", s.name);

    // A regeneration's implicit -1 does not replace what the user said...
    let implicit = FeedbackEntry {
        rating: -1.0,
        comment: None,
        labels: vec![format!("regenerated_by:{}", id(3)), "how:implicit".into()],
        source: REGENERATION.into(),
        created_unix_nano: T + 9,
        ..entry(&t, 0, "u2", -1.0)
    };
    assert!(!db.upsert_feedback(&implicit).await.expect("upsert"), "{}", s.name);
    assert_eq!(db.feedback_of(&t).await.expect("read")[2], other_user, "{}", s.name);
    // ...lands where there is nothing, replaces an earlier implicit one...
    let implicit_u3 = FeedbackEntry { end_user: "u3".into(), ..implicit.clone() };
    assert!(db.upsert_feedback(&implicit_u3).await.expect("upsert"));
    let later = FeedbackEntry { created_unix_nano: T + 20, ..implicit_u3.clone() };
    assert!(db.upsert_feedback(&later).await.expect("upsert"));
    assert_eq!(db.feedback_of(&t).await.expect("read")[3], later, "{}", s.name);
    // ...and an explicit rating replaces it.
    let explicit_u3 = entry(&t, 0, "u3", 1.0);
    assert!(db.upsert_feedback(&explicit_u3).await.expect("upsert"));
    assert_eq!(db.feedback_of(&t).await.expect("read")[3], explicit_u3, "{}", s.name);
    assert_eq!(db.feedback_of(&id(9)).await.expect("read"), vec![], "{}", s.name);

    // What the release gate reads: plain columns, rating as a number, labels as JSON text.
    let row = sqlx::query::<sqlx::Any>(
        "SELECT rating, labels, source, created_unix_nano FROM feedback WHERE trace_id = $1 AND image_index = -1",
    )
    .bind(t.clone())
    .fetch_one(db.pool())
    .await
    .expect("select");
    assert_eq!(row.try_get::<f64, _>(0).unwrap(), -1.0);
    assert_eq!(row.try_get::<String, _>(1).unwrap(), r#"["dark","off-brand"]"#);
    assert_eq!(row.try_get::<String, _>(2).unwrap(), "explicit");
    assert_eq!(row.try_get::<i64, _>(3).unwrap(), (T + 5) as i64);
    db.close().await;
}

#[tokio::test]
async fn feedback_is_one_entry_per_trace_image_and_user_replaced_on_repeat() {
    for s in stores().await {
        check_feedback(&s).await;
        s.cleanup().await;
    }
}
