-- Trace records: one row per request (and per mirror copy). Portable SQL: the same file
-- migrates SQLite and PostgreSQL (TEXT, BIGINT, CREATE ... IF NOT EXISTS).
--
-- `record` is the full TraceRecord as JSON text; the other columns copy the fields the trace
-- queries filter and sort on. Times are Unix nanoseconds (BIGINT: good until 2262).
-- A trace may hold several records: a client that continues one W3C trace over several
-- requests sends the same trace id each time; each record is one request's server span.
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    start_time_unix_nano BIGINT NOT NULL,
    kind TEXT NOT NULL,
    route TEXT,
    tenant TEXT,
    cohort TEXT,
    prompt_template TEXT,
    asset_type TEXT,
    decision TEXT NOT NULL,
    -- The multi-valued filters as one delimited text: ",provider=openai,provider=spare,
    -- verdict=safety:pass," (TraceRecord::providers and ::verdicts). Matched with LIKE on a
    -- whole ",tag=value," (the value escaped), so a value never matches a longer one.
    tags TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);

-- Newest first, with trace_id and span_id breaking ties: the keyset every listing pages on, and the path
-- every filter takes (rows are checked newest first until a page is full). One index only:
-- each index is a B-tree insert per record on the request rate, the trace store's main cost.
-- A deployment whose queries filter on a rare value over millions of rows can add its own,
-- e.g. CREATE INDEX traces_cohort ON traces (cohort, start_time_unix_nano).
CREATE INDEX IF NOT EXISTS traces_time ON traces (start_time_unix_nano, trace_id, span_id);
