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
        regenerated_by: None,
        regeneration_how: None,
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

    // A regeneration's implicit -1 does not replace what the user said: it only leaves its
    // link on it...
    let implicit = FeedbackEntry {
        rating: -1.0,
        comment: None,
        labels: vec![format!("regenerated_by:{}", id(3)), "how:implicit".into()],
        source: REGENERATION.into(),
        created_unix_nano: T + 9,
        regenerated_by: Some(id(3)),
        regeneration_how: Some("implicit".into()),
        ..entry(&t, 0, "u2", -1.0)
    };
    assert!(db.upsert_feedback(&implicit).await.expect("upsert"), "{}", s.name);
    let linked =
        FeedbackEntry { regenerated_by: Some(id(3)), regeneration_how: Some("implicit".into()), ..other_user.clone() };
    assert_eq!(db.feedback_of(&t).await.expect("read")[2], linked, "{}", s.name);
    // ...lands where there is nothing, replaces an earlier implicit one...
    let implicit_u3 = FeedbackEntry { end_user: "u3".into(), ..implicit.clone() };
    assert!(db.upsert_feedback(&implicit_u3).await.expect("upsert"));
    let later = FeedbackEntry { created_unix_nano: T + 20, ..implicit_u3.clone() };
    assert!(db.upsert_feedback(&later).await.expect("upsert"));
    assert_eq!(db.feedback_of(&t).await.expect("read")[3], later, "{}", s.name);
    // ...and an explicit rating replaces it, keeping the link.
    let explicit_u3 = entry(&t, 0, "u3", 1.0);
    assert!(db.upsert_feedback(&explicit_u3).await.expect("upsert"));
    let kept =
        FeedbackEntry { regenerated_by: Some(id(3)), regeneration_how: Some("implicit".into()), ..explicit_u3.clone() };
    assert_eq!(db.feedback_of(&t).await.expect("read")[3], kept, "{}", s.name);
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

/// A regeneration's implicit -1 on `trace_id` by `end_user`, written at `at`.
fn implicit(trace_id: &str, end_user: &str, by: u64, at: u64) -> FeedbackEntry {
    FeedbackEntry {
        rating: -1.0,
        comment: None,
        labels: vec![format!("regenerated_by:{}", id(by)), "how:implicit".into()],
        source: REGENERATION.into(),
        created_unix_nano: at,
        regenerated_by: Some(id(by)),
        regeneration_how: Some("implicit".into()),
        ..entry(trace_id, -1, end_user, -1.0)
    }
}

async fn check_feedback_batch(s: &TestStore) {
    let db = TraceDb::open(&s.cfg).await.expect("open");
    // What the user said first: a batch's implicit entry must not replace it.
    let said = entry(&id(1), -1, "u1", 1.0);
    assert!(db.upsert_feedback(&said).await.expect("upsert"));
    // 70 regenerations (statements of 64, 4, 1 and 1 rows), one trace regenerated twice by the
    // same user inside the batch, one trace the user rated, and an explicit entry among them.
    let mut batch: Vec<FeedbackEntry> = (100..170).map(|n| implicit(&id(n), "u1", n + 1000, T + n)).collect();
    batch.push(implicit(&id(100), "u1", 2000, T + 500));
    batch.push(implicit(&id(1), "u1", 2001, T + 501));
    let explicit = entry(&id(2), 0, "u2", -0.5);
    batch.insert(3, explicit.clone());
    let written = db.upsert_feedback_batch(&batch).await.expect("batch");
    assert_eq!(
        written, 72,
        "{}: 70 regenerated traces (one twice: its later entry), the link on the rated one, and the explicit entry",
        s.name
    );
    // The later of the two entries of one (trace, image, end user) is the one kept.
    assert_eq!(
        db.feedback_of(&id(100)).await.expect("read"),
        vec![implicit(&id(100), "u1", 2000, T + 500)],
        "{}",
        s.name
    );
    assert_eq!(
        db.feedback_of(&id(169)).await.expect("read"),
        vec![implicit(&id(169), "u1", 1169, T + 169)],
        "{}",
        s.name
    );
    let said_linked =
        FeedbackEntry { regenerated_by: Some(id(2001)), regeneration_how: Some("implicit".into()), ..said.clone() };
    assert_eq!(
        db.feedback_of(&id(1)).await.expect("read"),
        vec![said_linked],
        "{}: what the user said stays, with the regeneration's link",
        s.name
    );
    assert_eq!(db.feedback_of(&id(2)).await.expect("read"), vec![explicit], "{}", s.name);
    let row = sqlx::query::<sqlx::Any>("SELECT COUNT(*) FROM feedback").fetch_one(db.pool()).await.expect("count");
    assert_eq!(row.try_get::<i64, _>(0).unwrap(), 72, "{}", s.name);
    assert_eq!(db.upsert_feedback_batch(&[]).await.expect("empty batch"), 0);
    db.close().await;
}

#[tokio::test]
async fn a_batch_of_feedback_is_written_as_the_entries_one_by_one_would_be() {
    for s in stores().await {
        check_feedback_batch(&s).await;
        s.cleanup().await;
    }
}
