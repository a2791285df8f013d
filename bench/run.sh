#!/usr/bin/env bash
# Performance benchmark: direct mock vs nginx reverse proxy vs acc, loopback only.
# See bench/README.md. Usage: bench/run.sh   (env knobs below)
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"

SECONDS_PER_CELL="${BENCH_SECONDS:-10}"        # measured wrk duration per cell
WARMUP="${BENCH_WARMUP:-2}"                     # un-measured wrk run before each cell
TARGETS="${BENCH_TARGETS:-direct nginx acc acc-eval}"   # acc-eval: sanity+safety on, large payload only
PAYLOADS="${BENCH_PAYLOADS:-small large}"
CONCURRENCY="${BENCH_CONCURRENCY:-1 64}"
MOCK_THREADS="${BENCH_MOCK_THREADS:-1}"
NGINX_WORKERS="${BENCH_NGINX_WORKERS:-auto}"
# glibc's dynamic mmap/trim thresholds make nginx (system malloc) fault its ~2 MB of proxy
# buffers back in on every request in some runs and not in others (bimodal CPU/request);
# keep its heap resident so the baseline is stable. Set to "" to run nginx untuned.
NGINX_GLIBC_TUNABLES="${BENCH_NGINX_GLIBC_TUNABLES-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456}"
RESULTS="${BENCH_RESULTS:-$BENCH_DIR/results.md}"
ACC_BIN="${ACC_BIN:-}"                          # prebuilt acc binary; default: cargo build --release
PERF="${BENCH_PERF:-}"                          # 1: perf record acc during its measured cells

WORK="$BENCH_DIR/.work"
RUN="$WORK/run"
LUA="$BENCH_DIR/lib/post.lua"
REQ_BODY='{"model":"bench","prompt":"a red fox","n":1,"size":"1024x1024","response_format":"b64_json"}'
CLK_TCK="$(getconf CLK_TCK)"
NCPU="$(nproc)"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- cleanup ---
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in {1..50}; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true   # still there after 5 s
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------- dependencies ---
NGINX_BIN="$(command -v nginx || true)"
[[ -z "$NGINX_BIN" && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
if has_target nginx && [[ -z "$NGINX_BIN" ]]; then need_pkgs+=(nginx); fi
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]} with apt-get"
    SUDO=""; [[ "$(id -u)" -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_pkgs[@]}" >/dev/null
    NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
fi
command -v python3 >/dev/null || die "python3 is required"
if [[ -n "$PERF" ]]; then command -v perf >/dev/null || die "BENCH_PERF=1 needs perf (apt-get install linux-perf)"; fi

load1="$(cut -d' ' -f1 /proc/loadavg)"   # checked before our own builds raise it
if awk -v l="$load1" -v n="$NCPU" 'BEGIN { exit !(l > n / 2) }'; then
    log "WARNING: load average is $load1 on $NCPU CPU(s): other work on this machine will skew the numbers"
fi

# ----------------------------------------------------------------- builds ---
log "building mock provider (release)"
(cd "$BENCH_DIR/mock-provider" && cargo build --release --quiet)
MOCK_BIN="$BENCH_DIR/mock-provider/target/release/mock-provider"
if { has_target acc || has_target acc-eval; } && [[ -z "$ACC_BIN" ]]; then
    log "building acc (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet) || die "acc release build failed"
    ACC_BIN="$REPO/target/release/acc"
fi
if has_target acc-eval; then
    "$REPO/scripts/setup-onnx.sh" >/dev/null || die "scripts/setup-onnx.sh failed (ONNX Runtime and models for acc-eval)"
fi

rm -rf "$RUN"
mkdir -p "$RUN"
python3 "$BENCH_DIR/lib/gen_png.py" "$WORK/payloads" | sed 's/^/[bench] payload /' >&2
RAW="$RUN/raw.tsv"
printf 'payload\tconcurrency\ttarget\trequests\tduration_us\tp50_us\tp90_us\tp99_us\tproxy_ticks\tmock_ticks\terrors\tclk_tck\twrk_ticks\tsystem_ticks\tncpu\n' >"$RAW"

# ---------------------------------------------------------------- helpers ---
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_line FILE REGEX TIMEOUT_S PID: wait until FILE has a line matching REGEX
wait_line() {
    local file=$1 re=$2 t=$3 pid=$4 i
    for ((i = 0; i < t * 20; i++)); do
        if grep -Eq "$re" "$file" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

wait_port() {
    local port=$1 t=$2 i
    for ((i = 0; i < t * 20; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# cpu_ticks PID...: sum of utime+stime (clock ticks) of the given processes
cpu_ticks() {
    local total=0 p s
    local -a f
    for p in "$@"; do
        s="$(cat "/proc/$p/stat" 2>/dev/null)" || die "process $p vanished during the run"
        s="${s##*) }"          # drop "pid (comm) "; field 3 (state) is now f[0]
        read -r -a f <<<"$s"
        total=$((total + f[11] + f[12]))  # fields 14 (utime) and 15 (stime)
    done
    echo "$total"
}

# busy ticks of the whole machine (user+nice+system+irq+softirq+steal, all CPUs)
sys_ticks() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# CHILD_TICKS := CPU ticks used so far by this shell's waited-for children (bash `times`,
# 2nd line). Must not run in a subshell: a subshell's `times` starts from zero.
child_ticks() {
    times >"$RUN/times.txt"
    CHILD_TICKS=$(awk -v hz="$CLK_TCK" 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
        printf "%d\n", t * hz + 0.5 }' "$RUN/times.txt")
}

children_of() {
    local parent=$1 f s
    local -a x
    for f in /proc/[0-9]*/stat; do
        s="$(cat "$f" 2>/dev/null)" || continue
        s="${s##*) }"
        read -r -a x <<<"$s"
        [[ "${x[1]}" == "$parent" ]] && echo "${f//[^0-9]/}"
    done
}

# verify NAME URL [HEADER_REGEX]: one request must be 200 with b64_json in the body
verify() {
    local name=$1 url=$2 hdr_re=${3:-} code
    code="$(curl -sS --max-time 20 -o "$RUN/verify-$name.body" -D "$RUN/verify-$name.headers" \
        -w '%{http_code}' -H 'Content-Type: application/json' --data "$REQ_BODY" \
        "$url/v1/images/generations")" || die "$name: request failed"
    [[ "$code" == 200 ]] || die "$name: expected HTTP 200, got $code: $(head -c 300 "$RUN/verify-$name.body")"
    grep -q '"b64_json"' "$RUN/verify-$name.body" || die "$name: response has no b64_json"
    if [[ -n "$hdr_re" ]]; then
        grep -Eiq "$hdr_re" "$RUN/verify-$name.headers" ||
            die "$name: response lacks header matching /$hdr_re/: $(tr -d '\r' <"$RUN/verify-$name.headers" | tr '\n' ' ')"
    fi
    log "$name ok: 200, $(wc -c <"$RUN/verify-$name.body") bytes"
}

# --------------------------------------------------------------- servers ----
start_mock() {
    local png=$1 out="$RUN/mock-$2.out"
    "$MOCK_BIN" --listen 127.0.0.1:0 --png "$png" --threads "$MOCK_THREADS" >"$out" 2>"$RUN/mock-$2.err" &
    MOCK_PID=$!
    PIDS+=("$MOCK_PID")
    wait_line "$out" '^listening ' 10 "$MOCK_PID" || die "mock did not start: $(cat "$RUN/mock-$2.err")"
    MOCK_PORT="$(sed -n 's/^listening 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
}

start_nginx() {
    local prefix="$RUN/nginx-$1" user_line=""
    mkdir -p "$prefix"
    NGINX_PORT="$(free_port)"
    [[ "$(id -u)" -eq 0 ]] && user_line="user root;"
    cat >"$prefix/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes $NGINX_WORKERS;
$user_line
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_max_body_size 64m;
    client_body_buffer_size 128k;
    client_body_temp_path $prefix/client_body;
    proxy_temp_path $prefix/proxy;
    fastcgi_temp_path $prefix/fastcgi;
    uwsgi_temp_path $prefix/uwsgi;
    scgi_temp_path $prefix/scgi;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            # up to 4 MiB of response in memory per request; never spool to disk
            proxy_buffer_size 64k;
            proxy_buffers 64 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }
    }
}
EOF
    GLIBC_TUNABLES="$NGINX_GLIBC_TUNABLES" "$NGINX_BIN" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" >"$prefix/stdout" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_port "$NGINX_PORT" 10 || die "nginx did not start: $(cat "$prefix/error.log" "$prefix/stdout" 2>/dev/null)"
    local i
    NGINX_PROCS=()
    for ((i = 0; i < 100 && ${#NGINX_PROCS[@]} < 2; i++)); do
        mapfile -t NGINX_PROCS < <(echo "$NGINX_PID"; children_of "$NGINX_PID")
        ((${#NGINX_PROCS[@]} >= 2)) || sleep 0.05
    done
    log "nginx master $NGINX_PID + $((${#NGINX_PROCS[@]} - 1)) worker(s) on :$NGINX_PORT"
}

# start_acc PAYLOAD [ROUTE_EXTRA]: ROUTE_EXTRA is appended to the route (e.g. evaluators).
start_acc() {
    local name="$1${2:+-eval}"
    local pol="$RUN/acc-$name-policies" out="$RUN/acc-$name.out"
    mkdir -p "$pol"
    cat >"$pol/bench.toml" <<EOF
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "BENCH_MOCK_API_KEY"

[[routes]]
name = "bench"
match = { model = "bench" }
targets = [{ provider = "mock", model = "mock-model" }]
${2:-}
EOF
    BENCH_MOCK_API_KEY=bench-dummy-key "$ACC_BIN" serve --policies "$pol" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$out" 2>"$RUN/acc-$name.err" &
    ACC_PID=$!
    PIDS+=("$ACC_PID")
    wait_line "$out" '^listening proxy=' 30 "$ACC_PID" ||
        die "acc did not start: $(tail -n 20 "$RUN/acc-$name.err")"
    ACC_PORT="$(sed -n 's/^listening proxy=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
    log "acc pid $ACC_PID on :$ACC_PORT"
}

# --------------------------------------------------------------- measure ----
# run_cell PAYLOAD CONC TARGET PORT PROXY_PID...
run_cell() {
    local payload=$1 conc=$2 target=$3 port=$4
    shift 4
    local -a proxy=("$@")
    local threads=1 out="$RUN/wrk-$payload-c$conc-$target.txt"
    ((conc > 1)) && threads=2
    local url="http://127.0.0.1:$port"
    if ((WARMUP > 0)); then
        wrk -t"$threads" -c"$conc" -d"${WARMUP}s" --timeout 10s -s "$LUA" "$url" >/dev/null
    fi
    local p0=0 p1=0 m0 m1 s0 s1 w0 w1
    ((${#proxy[@]})) && p0="$(cpu_ticks "${proxy[@]}")"
    m0="$(cpu_ticks "$MOCK_PID")"
    child_ticks
    w0=$CHILD_TICKS
    s0="$(sys_ticks)"
    local perf_pid=""
    if [[ -n "$PERF" && "$target" == acc ]]; then
        perf record -q -F 999 -p "$ACC_PID" -o "$RUN/perf-$payload-c$conc.data" \
            -- sleep "$SECONDS_PER_CELL" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    wrk -t"$threads" -c"$conc" -d"${SECONDS_PER_CELL}s" --timeout 10s --latency -s "$LUA" "$url" >"$out"
    s1="$(sys_ticks)"
    child_ticks
    w1=$CHILD_TICKS
    ((${#proxy[@]})) && p1="$(cpu_ticks "${proxy[@]}")"
    m1="$(cpu_ticks "$MOCK_PID")"
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || true
        perf report -i "$RUN/perf-$payload-c$conc.data" --stdio --percent-limit 0.5 \
            --sort dso,symbol 2>/dev/null | grep -v '^#' | sed 's/[ -]*$//' | grep . \
            >"$RUN/perf-$payload-c$conc.txt" || true
        log "perf profile: $RUN/perf-$payload-c$conc.txt"
    fi
    local line
    line="$(grep '^BENCH ' "$out")" || die "no BENCH line in $out"
    local -A v=()
    local kv
    for kv in ${line#BENCH }; do v[${kv%%=*}]=${kv#*=}; done
    local errors=$((v[err_connect] + v[err_read] + v[err_write] + v[err_status] + v[err_timeout]))
    local pt="-"
    ((${#proxy[@]})) && pt=$((p1 - p0))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$payload" "$conc" "$target" \
        "${v[requests]}" "${v[duration_us]}" "${v[p50_us]}" "${v[p90_us]}" "${v[p99_us]}" \
        "$pt" "$((m1 - m0))" "$errors" "$CLK_TCK" "$((w1 - w0))" "$((s1 - s0))" "$NCPU" >>"$RAW"
    log "$(awk -v p="$payload" -v c="$conc" -v t="$target" -v n="${v[requests]}" -v d="${v[duration_us]}" \
        -v p50="${v[p50_us]}" -v p99="${v[p99_us]}" -v e="$errors" \
        'BEGIN { printf "%-5s c=%-3s %-6s %9.1f req/s  p50 %8.2f ms  p99 %8.2f ms  errors %d", p, c, t, n * 1e6 / d, p50 / 1e3, p99 / 1e3, e }')"
}

log "targets: $TARGETS | payloads: $PAYLOADS | concurrency: $CONCURRENCY | ${SECONDS_PER_CELL}s/cell (+${WARMUP}s warm-up)"
for payload in $PAYLOADS; do
    png="$WORK/payloads/$payload.png"
    [[ -f "$png" ]] || die "unknown payload $payload (have: small large)"
    start_mock "$png" "$payload"
    verify "direct-$payload" "http://127.0.0.1:$MOCK_PORT"
    if has_target nginx; then
        start_nginx "$payload"
        verify "nginx-$payload" "http://127.0.0.1:$NGINX_PORT"
    fi
    if has_target acc; then
        start_acc "$payload"
        verify "acc-$payload" "http://127.0.0.1:$ACC_PORT" '^x-acc-route: *bench'
    fi
    # The evaluated path: sanity + safety on every image (1024x1024 payload only: the request
    # asks for 1024x1024, so sanity would rightly fail the small one).
    if has_target acc-eval && [[ "$payload" == large ]]; then
        ACC_PLAIN_PORT="${ACC_PORT:-}" ACC_PLAIN_PID="${ACC_PID:-}"
        start_acc "$payload" 'evaluators = ["sanity", "safety"]
eval_budget_ms = 30000'
        EVAL_PORT="$ACC_PORT" EVAL_PID="$ACC_PID"
        ACC_PORT="$ACC_PLAIN_PORT" ACC_PID="$ACC_PLAIN_PID"
        verify "acc-eval-$payload" "http://127.0.0.1:$EVAL_PORT" '^x-acc-eval: *sanity=pass'
    fi
    for conc in $CONCURRENCY; do
        for target in $TARGETS; do
            case $target in
            direct) run_cell "$payload" "$conc" direct "$MOCK_PORT" ;;
            nginx) run_cell "$payload" "$conc" nginx "$NGINX_PORT" "${NGINX_PROCS[@]}" ;;
            acc) run_cell "$payload" "$conc" acc "$ACC_PORT" "$ACC_PID" ;;
            acc-eval) [[ "$payload" == large ]] && run_cell "$payload" "$conc" acc-eval "$EVAL_PORT" "$EVAL_PID" ;;
            *) die "unknown target $target" ;;
            esac
        done
    done
    if has_target nginx && grep -q 'buffered to a temporary file' "$RUN/nginx-$payload/error.log"; then
        log "WARNING: nginx spooled responses to disk (see $RUN/nginx-$payload/error.log)"
    fi
    stop_all
done

python3 "$BENCH_DIR/lib/report.py" "$RAW" "$RESULTS" \
    --meta "cpus=$(nproc)" \
    --meta "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)" \
    --meta "seconds=$SECONDS_PER_CELL" --meta "warmup=$WARMUP" \
    --meta "nginx=$("$NGINX_BIN" -v 2>&1 | sed 's/.*version: //')" \
    --meta "wrk=$(wrk -v 2>&1 | head -n1 | awk '{print $2}')" \
    --meta "small=$(wc -c <"$WORK/payloads/small.png")" \
    --meta "large=$(wc -c <"$WORK/payloads/large.png")"
log "raw results: $RAW; table written to $RESULTS"
