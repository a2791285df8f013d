-- Feedback on traces: one row per (trace, image, end user). Portable SQL: the same file
-- migrates SQLite and PostgreSQL (TEXT, BIGINT, DOUBLE PRECISION, CREATE ... IF NOT EXISTS).
--
-- `image_index` is -1 for a rating of the whole answer. `end_user` is the rater: the OpenAI
-- `user` field the app sent, else the client key's name. `rating` is in [-1, 1] (up = 1,
-- down = -1). `labels` is a JSON array of strings. `source` is 'explicit' (POST /v1/feedback)
-- or 'regeneration' (the implicit -1 a regeneration leaves on the trace it regenerated).
-- The cohort fields and the provider are copied from the trace, so the release gate reads
-- this table alone. Times are Unix nanoseconds.
CREATE TABLE IF NOT EXISTS feedback (
    trace_id TEXT NOT NULL,
    image_index BIGINT NOT NULL,
    end_user TEXT NOT NULL,
    tenant TEXT,
    route TEXT,
    cohort TEXT,
    prompt_template TEXT,
    asset_type TEXT,
    provider TEXT,
    rating DOUBLE PRECISION NOT NULL,
    comment TEXT,
    labels TEXT,
    source TEXT NOT NULL,
    created_unix_nano BIGINT NOT NULL,
    PRIMARY KEY (trace_id, image_index, end_user)
);

-- The release gate reads a time window (`acc gate --store --since`).
CREATE INDEX IF NOT EXISTS feedback_time ON feedback (created_unix_nano);
