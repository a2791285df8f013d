#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable for the same
# binary and inputs whatever else the machine does, so two builds can be compared without the
# noise of wall-clock runs. Starts the mock provider and `acc serve --workers 1` under callgrind
# (loopback, free ports), sends CALLGRIND_WARMUP requests, zeroes the counters, sends
# CALLGRIND_REQUESTS requests one at a time on one keep-alive connection, dumps, and prints
# `instructions/request` for each payload. Everything it started is stopped on exit.
#
#   bench/callgrind.sh                              # target/dist/acc (built if missing)
#   ACC_BIN=/path/to/other/acc bench/callgrind.sh   # another build, for an A/B
#
# Knobs: CALLGRIND_REQUESTS (default 2000), CALLGRIND_WARMUP (200), CALLGRIND_PAYLOADS
# ("small large"). Output lines: `callgrind payload=small requests=2000 instructions_per_request=N`.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
REQUESTS="${CALLGRIND_REQUESTS:-2000}"
WARMUP="${CALLGRIND_WARMUP:-200}"
PAYLOADS="${CALLGRIND_PAYLOADS:-small large}"
# on: trace records written (the default SQLite store, in the run directory); off: [store]
# enabled = false; nodigest: records without image digests (image_sha256 = false: valgrind runs
# SHA-256 without the CPU's SHA extensions, so the digest dominates its count).
TRACES="${CALLGRIND_TRACES:-on}"
[[ "$TRACES" == on || "$TRACES" == off || "$TRACES" == nodigest ]] ||
    { echo "callgrind.sh: CALLGRIND_TRACES must be on, nodigest or off" >&2; exit 2; }
# off: no limits; memory: key and tenant rate limits and a tenant spend limit in memory (the
# bench/run.sh acc-limits target); redis: the same limits shared through a redis-server that
# scripts/redis.sh starts (acc-redis). Redis's own CPU is not counted: only acc's.
LIMITS="${CALLGRIND_LIMITS:-off}"
[[ "$LIMITS" == off || "$LIMITS" == memory || "$LIMITS" == redis ]] ||
    { echo "callgrind.sh: CALLGRIND_LIMITS must be off, memory or redis" >&2; exit 2; }
BENCH_KEY="sk-acc-bench-limits"
ACC_BIN="${ACC_BIN:-}"
WORK="$BENCH_DIR/.work"
RUN="$WORK/callgrind"

log() { echo "[callgrind] $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v valgrind >/dev/null || { log "installing valgrind"; apt-get install -y valgrind >/dev/null; }
command -v callgrind_control >/dev/null || die "callgrind_control not found (valgrind package)"
[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || die "CALLGRIND_REQUESTS must be a positive integer"

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -z "$REDIS_URL" ]] || "$REPO/scripts/redis.sh" stop "$RUN/redis" >/dev/null 2>&1 || true
}
REDIS_URL=""
trap cleanup EXIT

(cd "$BENCH_DIR/mock-provider" && cargo build --release --quiet)
MOCK_BIN="$BENCH_DIR/mock-provider/target/release/mock-provider"
if [[ -z "$ACC_BIN" ]]; then
    (cd "$REPO" && cargo build --profile dist --quiet --bin acc)
    ACC_BIN="$REPO/target/dist/acc"
fi
rm -rf "$RUN"
mkdir -p "$RUN"
[[ "$LIMITS" != redis ]] || REDIS_URL="$("$REPO/scripts/redis.sh" start "$RUN/redis")"
python3 "$BENCH_DIR/lib/gen_png.py" "$WORK/payloads" >/dev/null

# wait_line FILE REGEX SECONDS
wait_line() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# records_settled N: with traces on, waits (up to 10 min: valgrind slows acc ~50x) until N
# trace records are written or counted as dropped (acc_trace_written_total and
# acc_trace_dropped_total on the admin port, but for images_not_digested: such a record is still
# written), then 2 s more for the batched implicit ratings
# of regenerations. Does nothing with traces off.
records_settled() {
    [[ "$TRACES" != off ]] || return 0
    local want=$1 i got
    for ((i = 0; i < 1200; i++)); do
        got="$(curl -sf "http://127.0.0.1:$admin/metrics" |
            awk '/^acc_trace_(written|dropped)_total/ && !/images_not_digested/ {n += $NF} END {printf "%d", n}')" || got=0
        ((got >= want)) && { sleep 2; return 0; }
        sleep 0.5
    done
    die "trace records: $got of $want written or dropped after 10 min"
}

for payload in $PAYLOADS; do
    png="$WORK/payloads/$payload.png"
    [[ -f "$png" ]] || die "no payload $png"
    "$MOCK_BIN" --listen 127.0.0.1:0 --png "$png" --threads 1 --latency-ms 0 >"$RUN/mock-$payload.out" 2>&1 &
    mock_pid=$!
    PIDS+=("$mock_pid")
    wait_line "$RUN/mock-$payload.out" '^listening ' 10 || die "mock did not start"
    mock_port="$(sed -n 's/^listening 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$RUN/mock-$payload.out")"
    pol="$RUN/policies-$payload"
    mkdir -p "$pol"
    cat >"$pol/bench.toml" <<EOF
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$mock_port/v1"
api_key_env = "BENCH_MOCK_API_KEY"
$([[ "$LIMITS" == off ]] || echo 'price = { per_image_usd = 0.0001 }  # a spend hold needs an estimate')

[[routes]]
name = "bench"
match = { model = "bench" }
targets = [{ provider = "mock", model = "mock-model" }]

[store]
$(case "$TRACES" in
    on) echo "path = \"$RUN/traces-$payload.db\"" ;;
    nodigest) printf 'path = "%s"\nimage_sha256 = false\n' "$RUN/traces-$payload.db" ;;
    *) echo "enabled = false" ;;
esac)
$(if [[ "$LIMITS" != off ]]; then cat <<LIMITS
[[keys]]
sha256 = "$(printf %s "$BENCH_KEY" | sha256sum | cut -d' ' -f1)"
tenant = "bench"
requests_per_minute = 100000000
images_per_minute = 100000000

[tenants.bench]
requests_per_minute = 100000000
images_per_minute = 100000000
spend_usd_per_day = 100000000.0
LIMITS
fi)
$(if [[ "$LIMITS" == redis ]]; then printf '[cluster]\nredis_url = "%s"\nkey_prefix = "callgrind-%s:"\n# valgrind slows acc ~50x: a deadline that it still meets\ntimeout_ms = 5000\n' "$REDIS_URL" "$payload"; fi)
EOF
    rm -f "$RUN/traces-$payload.db"*
    out="$RUN/acc-$payload.out"
    prof="$RUN/callgrind.out.$payload"
    BENCH_MOCK_API_KEY=bench-dummy-key valgrind --tool=callgrind --callgrind-out-file="$prof" \
        "$ACC_BIN" serve --policies "$pol" --workers 1 --eval-threads 1 \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$out" 2>"$RUN/acc-$payload.err" &
    acc_pid=$!
    PIDS+=("$acc_pid")
    wait_line "$out" '^listening proxy=' 120 || die "acc did not start: $(tail -n 20 "$RUN/acc-$payload.err")"
    port="$(sed -n 's/^listening proxy=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
    admin="$(sed -n 's/^listening proxy=.* admin=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
    python3 - "$port" "$WARMUP" "$LIMITS" "$BENCH_KEY" <<'EOF'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
h = {"content-type": "application/json"}
if sys.argv[3] != "off": h["authorization"] = "Bearer " + sys.argv[4]
body = b'{"model":"bench","prompt":"a red fox","n":1,"size":"1024x1024","response_format":"b64_json"}'
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    c.request("POST", "/v1/images/generations", body, h)
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
EOF
    # The trace writer runs at idle CPU priority and batches: under valgrind, which runs one
    # thread at a time, it may write nothing until the requests stop. The counters are zeroed
    # once the warm-up's records are written and dumped once the measured ones are, so its work
    # lands in the measured part whatever the scheduling.
    records_settled "$WARMUP"
    callgrind_control --zero "$acc_pid" >/dev/null
    [[ -z "$REDIS_URL" ]] || redis-cli -u "$REDIS_URL" CONFIG RESETSTAT >/dev/null
    t0=$(date +%s.%N)
    python3 - "$port" "$REQUESTS" "$LIMITS" "$BENCH_KEY" <<'EOF'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
h = {"content-type": "application/json"}
if sys.argv[3] != "off": h["authorization"] = "Bearer " + sys.argv[4]
body = b'{"model":"bench","prompt":"a red fox","n":1,"size":"1024x1024","response_format":"b64_json"}'
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    c.request("POST", "/v1/images/generations", body, h)
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
EOF
    t1=$(date +%s.%N)
    records_settled $((WARMUP + REQUESTS))
    callgrind_control --dump="measured" "$acc_pid" >/dev/null
    if [[ -n "$REDIS_URL" ]]; then
        # Scripts Redis ran for acc in the measured part (under valgrind requests are ~50x
        # slower, so background flushes that a native run folds into the next request show here).
        calls="$(redis-cli -u "$REDIS_URL" INFO commandstats | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p')"
        log "redis: ${calls:-0} scripts for $REQUESTS requests in $(echo "$t1 - $t0" | bc) s"
    fi
    kill "$acc_pid" "$mock_pid" 2>/dev/null || true
    wait "$acc_pid" 2>/dev/null || true
    # The dump taken after zeroing holds exactly the measured requests (all threads).
    total=0
    for f in "$prof"*; do
        grep -q '^desc: Trigger: .*measured' "$f" 2>/dev/null || continue
        n="$(sed -n 's/^summary: //p; s/^totals: //p' "$f" | head -n 1 | awk '{print $1}')"
        total=$((total + ${n:-0}))
    done
    ((total > 0)) || die "no measured dump found in $prof*"
    echo "callgrind payload=$payload traces=$TRACES limits=$LIMITS requests=$REQUESTS instructions_per_request=$((total / REQUESTS))"
done
