-- The human review queue: images a route's policy withheld until a person decides. Portable
-- SQL: the same file migrates SQLite and PostgreSQL (TEXT, BIGINT, no BLOB: images are kept
-- as base64 text, exactly as they would have been answered).
--
-- One row per held answer, keyed by the request's trace id. `state` is pending, approved,
-- rejected or expired; a decision moves a row out of pending once (the UPDATE names
-- state = 'pending', so two reviewers or replicas cannot both decide it). Times are Unix
-- nanoseconds. `expires_unix_nano` is when a pending item expires, and once approved, when its
-- images are deleted (the client had review_ttl_secs to collect them).
CREATE TABLE IF NOT EXISTS reviews (
    trace_id TEXT NOT NULL PRIMARY KEY,
    route TEXT NOT NULL,
    tenant TEXT,
    cohort TEXT,
    prompt_template TEXT,
    asset_type TEXT,
    end_user TEXT,
    -- The client's response_format: b64_json or url.
    response_format TEXT NOT NULL,
    state TEXT NOT NULL,
    held_unix_nano BIGINT NOT NULL,
    expires_unix_nano BIGINT NOT NULL,
    decided_unix_nano BIGINT,
    reviewer TEXT,
    reason TEXT,
    image_count BIGINT NOT NULL,
    -- Decoded image bytes when held, and those still stored (0 once the images are deleted):
    -- the byte budget is the sum of bytes_held.
    bytes BIGINT NOT NULL,
    bytes_held BIGINT NOT NULL,
    -- JSON: [{"image", "evaluator", "verdict", "score", "reason"}] of the held attempt.
    verdicts TEXT NOT NULL,
    -- JSON: ["sanity: the image is blank", ...], the failures that sent it to review.
    reasons TEXT NOT NULL
);

-- The reviewers' listing (by state, oldest first) and the expiry sweep (pending, by time).
CREATE INDEX IF NOT EXISTS reviews_state ON reviews (state, held_unix_nano, trace_id);

-- The held images, base64 text as the client would have received it in b64_json.
CREATE TABLE IF NOT EXISTS review_images (
    trace_id TEXT NOT NULL,
    image_index BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    b64 TEXT NOT NULL,
    PRIMARY KEY (trace_id, image_index)
);
