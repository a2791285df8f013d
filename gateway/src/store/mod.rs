//! The trace store: one durable record per request that reaches routing
//! ([`record::TraceRecord`]), written off the request path and read back by the admin API and
//! `acc traces`.
//!
//! - [`record`]: the record's shape (serde JSON).
//! - [`db`]: the database behind it — an embedded SQLite file by default (`[store] path`,
//!   default `data/acc.db`), PostgreSQL when `[store] url = "postgres://..."` is set; schema
//!   created or migrated on open from the versioned migrations in `gateway/migrations/`.
//! - [`writer`]: the bounded queue and the batching writer task; losses counted in
//!   `acc_trace_dropped_total{reason}`; retention by age and row count in the background.
//! - [`feedback`]: the `feedback` table: ratings tied to a trace (one per trace, image and
//!   end user), from `POST /v1/feedback` and regeneration detection.
//! - [`review`]: the review queue's tables (held answers, their images, decisions), written
//!   on the request path, not through the writer.
//! - [`query`]: filters and keyset pagination for `GET /admin/traces` and `acc traces`.
//! - [`overview`]: bounded aggregates over a recent window for the console's overview.

pub mod db;
pub mod feedback;
pub mod overview;
pub mod query;
pub mod record;
pub mod review;
pub mod writer;

pub use db::{mask_url, Backend, RatingRow, StoreConfig, StoreError, TraceDb};
pub use feedback::FeedbackEntry;
pub use query::{Cursor, TraceFilter, TracePage};
pub use record::TraceRecord;
pub use review::{HeldImage, ReviewFilter, ReviewItem, ReviewState};
pub use writer::{DropReason, RecordHook, TraceWriter};

#[cfg(test)]
mod review_tests;
#[cfg(test)]
mod tests;
