# Sourced by the bench scripts that run one acc in front of the mock provider (threads.sh,
# soak-traces.sh): start the mock, write the `bench` route's policy, start acc. Everything
# listens on 127.0.0.1 with ports the kernel picks. The caller defines `die` and keeps `PIDS`
# (an array) to stop on exit; each start appends its process there.

# wait_line FILE REGEX PID: waits up to 30 s for a line of FILE to match, failing at once when
# PID exits first.
wait_line() {
    local i
    for ((i = 0; i < 600; i++)); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# start_mock MOCK_BIN PNG DIR: the mock provider answering with PNG (one thread, no added
# latency), its output in DIR/mock.out. Sets MOCK_PORT.
start_mock() {
    "$1" --listen 127.0.0.1:0 --png "$2" --threads 1 --latency-ms 0 >"$3/mock.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_line "$3/mock.out" '^listening ' "$pid" || die "mock did not start: $(tail -n 5 "$3/mock.out")"
    MOCK_PORT="$(sed -n 's/^listening 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$3/mock.out")"
}

# start_acc ACC_BIN DIR STORE_LINES: acc serving DIR/policies/bench.toml, the route `bench` to
# the mock on MOCK_PORT, with STORE_LINES as its [store] table; output in DIR/acc.out and
# DIR/acc.err. Sets ACC_PID, ACC_PORT (proxy) and ACC_ADMIN (admin listener).
start_acc() {
    mkdir -p "$2/policies"
    cat >"$2/policies/bench.toml" <<EOF
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "BENCH_MOCK_API_KEY"

[[routes]]
name = "bench"
match = { model = "bench" }
targets = [{ provider = "mock", model = "mock-model" }]

[store]
$3
EOF
    BENCH_MOCK_API_KEY=bench-dummy-key "$1" serve --policies "$2/policies" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$2/acc.out" 2>"$2/acc.err" &
    ACC_PID=$!
    PIDS+=("$ACC_PID")
    wait_line "$2/acc.out" '^listening proxy=' "$ACC_PID" || die "acc did not start: $(tail -n 5 "$2/acc.err")"
    ACC_PORT="$(sed -n 's/^listening proxy=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$2/acc.out")"
    ACC_ADMIN="$(sed -n 's/^listening proxy=.* admin=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$2/acc.out")"
}
