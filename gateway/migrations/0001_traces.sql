-- Trace records: one row per request (and per mirror copy). Portable SQL: the same file
-- migrates SQLite and PostgreSQL (TEXT, BIGINT, CREATE ... IF NOT EXISTS).
--
-- `record` is the full TraceRecord as JSON text; the other columns copy the fields the trace
-- queries filter and sort on. Times are Unix nanoseconds (BIGINT: good until 2262).
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    start_time_unix_nano BIGINT NOT NULL,
    kind TEXT NOT NULL,
    route TEXT,
    tenant TEXT,
    cohort TEXT,
    prompt_template TEXT,
    asset_type TEXT,
    decision TEXT NOT NULL,
    record TEXT NOT NULL
);

-- Newest first, with trace_id breaking ties: the keyset every listing pages on.
CREATE INDEX IF NOT EXISTS traces_time ON traces (start_time_unix_nano, trace_id);
CREATE INDEX IF NOT EXISTS traces_route ON traces (route, start_time_unix_nano);
CREATE INDEX IF NOT EXISTS traces_tenant ON traces (tenant, start_time_unix_nano);
CREATE INDEX IF NOT EXISTS traces_cohort ON traces (cohort, start_time_unix_nano);
CREATE INDEX IF NOT EXISTS traces_template ON traces (prompt_template, start_time_unix_nano);
CREATE INDEX IF NOT EXISTS traces_asset_type ON traces (asset_type, start_time_unix_nano);
CREATE INDEX IF NOT EXISTS traces_decision ON traces (decision, start_time_unix_nano);

-- The multi-valued filters, one row per value: tag 'provider' (every attempt's provider,
-- TraceRecord::providers) and tag 'verdict' ('evaluator:verdict', TraceRecord::verdicts).
-- Matched by equality, so a value never matches a longer one that contains it.
CREATE TABLE IF NOT EXISTS trace_tags (
    trace_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (trace_id, tag, value)
);

CREATE INDEX IF NOT EXISTS trace_tags_value ON trace_tags (tag, value, trace_id);
