-- wrk script: POST an OpenAI Images generation request and, when the run is
-- over, print one machine-readable line with exact numbers (latency in us).
wrk.method = "POST"
wrk.path = "/v1/images/generations"
wrk.body = '{"model":"bench","prompt":"a red fox","n":1,"size":"1024x1024","response_format":"b64_json"}'
wrk.headers["Content-Type"] = "application/json"
-- The acc-limits and acc-redis targets authenticate (their limits count per API key and tenant).
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
