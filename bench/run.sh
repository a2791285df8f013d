#!/usr/bin/env bash
# Performance benchmark: direct mock vs nginx reverse proxy vs acc (plain, with a 100% mirror to a
# slow candidate, with evaluators), loopback only.
# See bench/README.md. Usage: bench/run.sh   (env knobs below)
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"

SECONDS_PER_CELL="${BENCH_SECONDS:-10}"        # measured wrk duration per cell
WARMUP="${BENCH_WARMUP:-2}"                     # un-measured wrk run before each cell
# acc: trace records on (the default SQLite store, in the run directory); acc-notrace: [store]
# enabled = false; nginx-log: nginx with a buffered access log (the like-for-like baseline of acc
# with traces); acc-mirror: acc + every request mirrored to a slow second mock; acc-eval:
# sanity+safety on, large payload only; acc-limits: rate limits per key and tenant and a tenant
# spend limit, in memory; acc-redis: the same limits shared through a local redis-server
# ([cluster], issue #16); neither keeps traces
TARGETS="${BENCH_TARGETS:-direct nginx nginx-log acc acc-notrace acc-mirror acc-eval}"
REPEAT="${BENCH_REPEAT:-1}"                     # rounds of every cell, interleaved (medians reported)
MIRROR_LATENCY_MS="${BENCH_MIRROR_LATENCY_MS:-200}"   # the slow candidate's answer delay
MIRROR_MAX_IN_FLIGHT="${BENCH_MIRROR_MAX_IN_FLIGHT:-4}"   # the policy default; mirrors beyond it are dropped, counted
PAYLOADS="${BENCH_PAYLOADS:-small large}"
CONCURRENCY="${BENCH_CONCURRENCY:-1 64}"
MOCK_THREADS="${BENCH_MOCK_THREADS:-1}"
NGINX_WORKERS="${BENCH_NGINX_WORKERS:-auto}"
# glibc's dynamic mmap/trim thresholds make nginx (system malloc) fault its ~2 MB of proxy
# buffers back in on every request in some runs and not in others (bimodal CPU/request);
# keep its heap resident so the baseline is stable. Set to "" to run nginx untuned.
NGINX_GLIBC_TUNABLES="${BENCH_NGINX_GLIBC_TUNABLES-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456}"
RESULTS="${BENCH_RESULTS:-$BENCH_DIR/results.md}"
ACC_BIN="${ACC_BIN:-}"                          # prebuilt acc binary; default: cargo build --profile dist
LOADGEN="${BENCH_LOADGEN:-wrk}"                 # wrk, or hey (a second load generator, Go, from Debian)
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
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive integer"
for t in $TARGETS; do
    case $t in direct | nginx | nginx-log | acc | acc-notrace | acc-mirror | acc-eval | acc-limits | acc-redis) ;; *) die "unknown target $t" ;; esac
done

# ---------------------------------------------------------------- cleanup ---
PIDS=()
REDIS_URL=""                                    # acc-redis: the redis-server scripts/redis.sh started
BENCH_KEY="sk-acc-bench-limits"                 # acc-limits, acc-redis: the client's API key
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in {1..50}; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true   # still there after 5 s
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
    # Redis after its clients, so their logs show no failure of our making.
    if [[ -n "$REDIS_URL" ]]; then
        "$REPO/scripts/redis.sh" stop "$RUN/redis" || true
        REDIS_URL=""
    fi
}
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------- dependencies ---
NGINX_BIN="$(command -v nginx || true)"
[[ -z "$NGINX_BIN" && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
need_pkgs=()
case $LOADGEN in wrk | hey) ;; *) die "BENCH_LOADGEN must be wrk or hey" ;; esac
command -v "$LOADGEN" >/dev/null || need_pkgs+=("$LOADGEN")
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
if { has_target acc || has_target acc-notrace || has_target acc-mirror || has_target acc-eval || has_target acc-limits || has_target acc-redis; } && [[ -z "$ACC_BIN" ]]; then
    log "building acc (cargo build --profile dist)"
    (cd "$REPO" && cargo build --profile dist --quiet --bin acc) || die "acc dist build failed"
    ACC_BIN="$REPO/target/dist/acc"
fi
if has_target acc-eval; then
    "$REPO/scripts/setup-onnx.sh" >/dev/null || die "scripts/setup-onnx.sh failed (ONNX Runtime and models for acc-eval)"
fi

rm -rf "$RUN"
mkdir -p "$RUN"
python3 "$BENCH_DIR/lib/gen_png.py" "$WORK/payloads" | sed 's/^/[bench] payload /' >&2
RAW="$RUN/raw.tsv"
# peak_rss_kib: the proxy's VmHWM over the cell (sum over nginx's processes); cand_ticks: CPU of the
# slow mirror candidate; mirrored/mirror_ok/mirror_dropped: acc_mirror_* counter deltas over the
# measured run ("-" where they do not apply).
printf 'payload\tconcurrency\ttarget\trequests\tduration_us\tp50_us\tp90_us\tp99_us\tproxy_ticks\tmock_ticks\terrors\tclk_tck\twrk_ticks\tsystem_ticks\tncpu\trep\tpeak_rss_kib\tcand_ticks\tmirrored\tmirror_ok\tmirror_dropped\n' >"$RAW"

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

# reset_peak_rss PID...: restart the processes' VmHWM from their current RSS (Linux >= 4.0)
reset_peak_rss() {
    local p
    for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || RSS_NOT_RESET=1; done
}
RSS_NOT_RESET=""

# peak_rss_kib PID...: sum of the processes' VmHWM in KiB
peak_rss_kib() {
    local total=0 p v
    for p in "$@"; do
        v="$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null)" || die "process $p vanished during the run"
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# mirror_counts ADMIN_PORT: "requests ok dropped" summed over acc_mirror_requests_total /
# acc_mirror_dropped_total (all routes, candidates, results and reasons) from acc's /metrics
mirror_counts() {
    curl -sS --max-time 10 "http://127.0.0.1:$1/metrics" | awk '
        $1 ~ /^acc_mirror_requests_total([{]|$)/ { r += $NF; if ($1 ~ /result="ok"/) ok += $NF }
        $1 ~ /^acc_mirror_dropped_total([{]|$)/ { d += $NF }
        END { printf "%d %d %d\n", r, ok, d }'
}

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
    local auth=()
    [[ -n "${VERIFY_AUTH:-}" ]] && auth=(-H "Authorization: Bearer $VERIFY_AUTH")
    code="$(curl -sS --max-time 20 -o "$RUN/verify-$name.body" -D "$RUN/verify-$name.headers" \
        -w '%{http_code}' -H 'Content-Type: application/json' "${auth[@]}" --data "$REQ_BODY" \
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
# start_mock PNG NAME [LATENCY_MS]: sets STARTED_PID and STARTED_PORT
start_mock() {
    local png=$1 out="$RUN/mock-$2.out"
    "$MOCK_BIN" --listen 127.0.0.1:0 --png "$png" --threads "$MOCK_THREADS" --latency-ms "${3:-0}" \
        >"$out" 2>"$RUN/mock-$2.err" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_line "$out" '^listening ' 10 "$STARTED_PID" || die "mock did not start: $(cat "$RUN/mock-$2.err")"
    STARTED_PORT="$(sed -n 's/^listening 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
}

# start_nginx NAME [log]: with "log", a buffered access log (64 KiB buffer, flushed every second).
start_nginx() {
    local prefix="$RUN/nginx-$1" user_line="" access="access_log off;"
    mkdir -p "$prefix"
    [[ "${2:-}" == log ]] && access="access_log $prefix/access.log combined buffer=64k flush=1s;"
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
    $access
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

# start_acc NAME [ROUTE_EXTRA [PROVIDERS_EXTRA]]: ROUTE_EXTRA is appended to the route (evaluators,
# mirror), PROVIDERS_EXTRA to the provider tables. Sets STARTED_PID, STARTED_PORT, STARTED_ADMIN.
start_acc() {
    local name="$1"
    local pol="$RUN/$name-policies" out="$RUN/$name.out"
    mkdir -p "$pol"
    cat >"$pol/bench.toml" <<EOF
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "BENCH_MOCK_API_KEY"
${3:-}

[[routes]]
name = "bench"
match = { model = "bench" }
targets = [{ provider = "mock", model = "mock-model" }]
${2:-}

[store]
${4:-path = \"$RUN/$name.db\"}
EOF
    BENCH_MOCK_API_KEY=bench-dummy-key "$ACC_BIN" serve --policies "$pol" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$out" 2>"$RUN/$name.err" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_line "$out" '^listening proxy=' 30 "$STARTED_PID" ||
        die "acc did not start: $(tail -n 20 "$RUN/$name.err")"
    STARTED_PORT="$(sed -n 's/^listening proxy=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
    STARTED_ADMIN="$(sed -n 's/^listening proxy=.* admin=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")"
    log "$name pid $STARTED_PID on :$STARTED_PORT (admin :$STARTED_ADMIN)"
}

# --------------------------------------------------------------- measure ----
# Per target, set for each payload by the main loop: the port wrk hits, the proxy processes whose
# CPU and peak RSS are measured, the acc admin port whose mirror counters are read, and the
# mirror candidate's process (its CPU is recorded apart, so it is not "other" load).
declare -A T_PORT=() T_PROCS=() T_ADMIN=() T_CAND=() T_AUTH=()

# load THREADS CONC SECONDS URL OUT: the load generator's run, ending with one line
# `BENCH requests=.. duration_us=.. p50_us=.. p90_us=.. p99_us=.. err_*=..` in OUT (wrk: from
# lib/post.lua's done(); hey: computed from its per-request CSV, the same request body).
load() {
    local threads=$1 conc=$2 secs=$3 url=$4 out=$5
    if [[ "$LOADGEN" == wrk ]]; then
        wrk -t"$threads" -c"$conc" -d"${secs}s" --timeout 10s --latency -s "$LUA" "$url" >"$out"
        return
    fi
    local auth=()
    [[ -n "${BENCH_AUTH:-}" ]] && auth=(-H "Authorization: Bearer $BENCH_AUTH")
    hey -z "${secs}s" -c "$conc" -t 10 -m POST -T application/json "${auth[@]}" -d "$HEY_BODY" -o csv \
        "$url/v1/images/generations" >"$out.csv"
    python3 - "$out.csv" "$secs" >"$out" <<'PY'
import csv, sys
lat, errors = [], 0
with open(sys.argv[1]) as f:
    for row in csv.DictReader(f):
        lat.append(float(row["response-time"]))
        errors += row["status-code"] != "200"
lat.sort()
pct = lambda p: int(lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1e6) if lat else 0
print(f"BENCH requests={len(lat)} duration_us={int(float(sys.argv[2]) * 1e6)} bytes=0 "
      f"p50_us={pct(50)} p90_us={pct(90)} p99_us={pct(99)} max_us={pct(100)} "
      f"err_connect=0 err_read=0 err_write=0 err_status={errors} err_timeout=0")
PY
}
HEY_BODY='{"model":"bench","prompt":"a red fox","n":1,"size":"1024x1024","response_format":"b64_json"}'

# run_cell PAYLOAD CONC TARGET REP
run_cell() {
    local payload=$1 conc=$2 target=$3 rep=$4
    local -a proxy=()
    read -r -a proxy <<<"${T_PROCS[$target]:-}"
    local admin=${T_ADMIN[$target]:-} cand=${T_CAND[$target]:-}
    local threads=1 out="$RUN/wrk-$payload-c$conc-$target-r$rep.txt"
    ((conc > 1)) && threads=2
    local url="http://127.0.0.1:${T_PORT[$target]}"
    export BENCH_AUTH="${T_AUTH[$target]:-}"
    # peak RSS covers the whole cell, warm-up included
    ((${#proxy[@]})) && reset_peak_rss "${proxy[@]}"
    if ((WARMUP > 0)); then
        load "$threads" "$conc" "$WARMUP" "$url" /dev/null
    fi
    local p0=0 p1=0 m0 m1 s0 s1 w0 w1 c0=0 c1=0 mc0="" mc1=""
    [[ -n "$admin" ]] && mc0="$(mirror_counts "$admin")"
    ((${#proxy[@]})) && p0="$(cpu_ticks "${proxy[@]}")"
    [[ -n "$cand" ]] && c0="$(cpu_ticks "$cand")"
    m0="$(cpu_ticks "$MOCK_PID")"
    child_ticks
    w0=$CHILD_TICKS
    s0="$(sys_ticks)"
    local perf_pid=""
    if [[ -n "$PERF" && "$target" == acc ]]; then
        perf record -q -F 999 -p "${proxy[0]}" -o "$RUN/perf-$payload-c$conc-r$rep.data" \
            -- sleep "$SECONDS_PER_CELL" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    load "$threads" "$conc" "$SECONDS_PER_CELL" "$url" "$out"
    s1="$(sys_ticks)"
    child_ticks
    w1=$CHILD_TICKS
    ((${#proxy[@]})) && p1="$(cpu_ticks "${proxy[@]}")"
    [[ -n "$cand" ]] && c1="$(cpu_ticks "$cand")"
    m1="$(cpu_ticks "$MOCK_PID")"
    [[ -n "$admin" ]] && mc1="$(mirror_counts "$admin")"
    local rss="-"
    ((${#proxy[@]})) && rss="$(peak_rss_kib "${proxy[@]}")"
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || true
        perf report -i "$RUN/perf-$payload-c$conc-r$rep.data" --stdio --percent-limit 0.5 \
            --sort dso,symbol 2>/dev/null | grep -v '^#' | sed 's/[ -]*$//' | grep . \
            >"$RUN/perf-$payload-c$conc-r$rep.txt" || true
        log "perf profile: $RUN/perf-$payload-c$conc-r$rep.txt"
    fi
    local line
    line="$(grep '^BENCH ' "$out")" || die "no BENCH line in $out"
    local -A v=()
    local kv
    for kv in ${line#BENCH }; do v[${kv%%=*}]=${kv#*=}; done
    local errors=$((v[err_connect] + v[err_read] + v[err_write] + v[err_status] + v[err_timeout]))
    local pt="-" ct="-" mirrored="-" mok="-" mdrop="-"
    ((${#proxy[@]})) && pt=$((p1 - p0))
    [[ -n "$cand" ]] && ct=$((c1 - c0))
    if [[ -n "$admin" ]]; then
        local -a a0 a1
        read -r -a a0 <<<"$mc0"
        read -r -a a1 <<<"$mc1"
        mirrored=$((a1[0] - a0[0])) mok=$((a1[1] - a0[1])) mdrop=$((a1[2] - a0[2]))
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$payload" "$conc" "$target" \
        "${v[requests]}" "${v[duration_us]}" "${v[p50_us]}" "${v[p90_us]}" "${v[p99_us]}" \
        "$pt" "$((m1 - m0))" "$errors" "$CLK_TCK" "$((w1 - w0))" "$((s1 - s0))" "$NCPU" \
        "$rep" "$rss" "$ct" "$mirrored" "$mok" "$mdrop" >>"$RAW"
    local extra=""
    [[ "$rss" != - ]] && extra+="  peak RSS $((rss / 1024)) MiB"
    [[ -n "$admin" ]] && extra+="  mirrored $mirrored (ok $mok) dropped $mdrop"
    log "$(awk -v p="$payload" -v c="$conc" -v t="$target" -v r="$rep" -v n="${v[requests]}" -v d="${v[duration_us]}" \
        -v p50="${v[p50_us]}" -v p99="${v[p99_us]}" -v e="$errors" \
        'BEGIN { printf "%-5s c=%-3s %-10s r%-2s %9.1f req/s  p50 %8.2f ms  p99 %8.2f ms  errors %d", p, c, t, r, n * 1e6 / d, p50 / 1e3, p99 / 1e3, e }')$extra"
}

# wait_mirrored ADMIN_PORT N: until acc has finished N mirrors with result ok (10 s at most)
wait_mirrored() {
    local i c
    local -a a
    for ((i = 0; i < 100; i++)); do
        c="$(mirror_counts "$1")"
        read -r -a a <<<"$c"
        ((a[1] >= $2)) && return 0
        sleep 0.1
    done
    return 1
}

log "targets: $TARGETS | payloads: $PAYLOADS | concurrency: $CONCURRENCY | ${SECONDS_PER_CELL}s/cell (+${WARMUP}s warm-up) x $REPEAT round(s)"
for payload in $PAYLOADS; do
    png="$WORK/payloads/$payload.png"
    [[ -f "$png" ]] || die "unknown payload $payload (have: small large)"
    T_PORT=() T_PROCS=() T_ADMIN=() T_CAND=() T_AUTH=()
    start_mock "$png" "$payload"
    MOCK_PID=$STARTED_PID MOCK_PORT=$STARTED_PORT
    T_PORT[direct]=$MOCK_PORT
    verify "direct-$payload" "http://127.0.0.1:$MOCK_PORT"
    if has_target nginx; then
        start_nginx "$payload"
        T_PORT[nginx]=$NGINX_PORT T_PROCS[nginx]="${NGINX_PROCS[*]}"
        verify "nginx-$payload" "http://127.0.0.1:$NGINX_PORT"
    fi
    if has_target nginx-log; then
        start_nginx "log-$payload" log
        T_PORT[nginx-log]=$NGINX_PORT T_PROCS[nginx-log]="${NGINX_PROCS[*]}"
        verify "nginx-log-$payload" "http://127.0.0.1:$NGINX_PORT"
    fi
    if has_target acc; then
        start_acc "acc-$payload"
        T_PORT[acc]=$STARTED_PORT T_PROCS[acc]=$STARTED_PID
        verify "acc-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-route: *bench'
    fi
    if has_target acc-notrace; then
        start_acc "acc-notrace-$payload" "" "" "enabled = false"
        T_PORT[acc-notrace]=$STARTED_PORT T_PROCS[acc-notrace]=$STARTED_PID
        verify "acc-notrace-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-route: *bench'
    fi
    # The same route with every request also sent to a slow candidate (a second mock that waits
    # MIRROR_LATENCY_MS before answering the same body); the client only ever waits for the primary.
    if has_target acc-mirror; then
        start_mock "$png" "$payload-slow" "$MIRROR_LATENCY_MS"
        SLOW_PID=$STARTED_PID SLOW_PORT=$STARTED_PORT
        start_acc "acc-mirror-$payload" \
            "mirror = [{ provider = \"slow\", model = \"mock-model\", sample = 1.0, max_in_flight = $MIRROR_MAX_IN_FLIGHT }]" \
            "[providers.slow]
kind = \"openai\"
base_url = \"http://127.0.0.1:$SLOW_PORT/v1\"
api_key_env = \"BENCH_MOCK_API_KEY\""
        T_PORT[acc-mirror]=$STARTED_PORT T_PROCS[acc-mirror]=$STARTED_PID
        T_ADMIN[acc-mirror]=$STARTED_ADMIN T_CAND[acc-mirror]=$SLOW_PID
        verify "acc-mirror-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-route: *bench'
        wait_mirrored "$STARTED_ADMIN" 1 ||
            die "acc-mirror: the verify request was not mirrored to the slow mock (metrics: $(mirror_counts "$STARTED_ADMIN"); $(tail -n 5 "$RUN/acc-mirror-$payload.err"))"
        log "acc-mirror-$payload ok: verify request mirrored to the slow mock (${MIRROR_LATENCY_MS} ms)"
    fi
    # Limits on every request (key and tenant requests/images per minute, tenant spend per day,
    # all far above what the run reaches): in memory (acc-limits), then shared through Redis
    # (acc-redis: one script per request for the limits and the spend hold, the settle riding on
    # a later one). No trace store on either: a writer that drops records at saturation but
    # writes them at a lower rate would charge the slower target for more records.
    if has_target acc-limits || has_target acc-redis; then
        LIMITS_TOML="[[keys]]
sha256 = \"$(printf %s "$BENCH_KEY" | sha256sum | cut -d' ' -f1)\"
tenant = \"bench\"
requests_per_minute = 100000000
images_per_minute = 100000000

[tenants.bench]
requests_per_minute = 100000000
images_per_minute = 100000000
spend_usd_per_day = 100000000.0"
        PRICE_TOML="price = { per_image_usd = 0.0001 }"
        VERIFY_AUTH=$BENCH_KEY
        if has_target acc-limits; then
            start_acc "acc-limits-$payload" "" "$PRICE_TOML

$LIMITS_TOML" "enabled = false"
            T_PORT[acc-limits]=$STARTED_PORT T_PROCS[acc-limits]=$STARTED_PID T_AUTH[acc-limits]=$BENCH_KEY
            verify "acc-limits-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-route: *bench'
        fi
        if has_target acc-redis; then
            [[ -n "$REDIS_URL" ]] || REDIS_URL="$("$REPO/scripts/redis.sh" start "$RUN/redis")"
            start_acc "acc-redis-$payload" "" "$PRICE_TOML

$LIMITS_TOML

[cluster]
redis_url = \"$REDIS_URL\"
key_prefix = \"bench-$payload:\"
# A deadline the saturated machine still meets: the cells measure shared state, not the
# per-replica fallback (a miss is reported below the table).
timeout_ms = 1000" "enabled = false"
            T_PORT[acc-redis]=$STARTED_PORT T_PROCS[acc-redis]=$STARTED_PID T_AUTH[acc-redis]=$BENCH_KEY
            verify "acc-redis-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-route: *bench'
            curl -fsS "http://127.0.0.1:$STARTED_ADMIN/readyz" | grep -q '"state":"shared"' ||
                die "acc-redis: /readyz does not say the state is shared: $(curl -sS "http://127.0.0.1:$STARTED_ADMIN/readyz")"
        fi
        VERIFY_AUTH=""
    fi
    # The evaluated path: sanity + safety on every image (1024x1024 payload only: the request
    # asks for 1024x1024, so sanity would rightly fail the small one).
    if has_target acc-eval && [[ "$payload" == large ]]; then
        start_acc "acc-eval-$payload" 'evaluators = ["sanity", "safety"]
eval_budget_ms = 30000'
        T_PORT[acc-eval]=$STARTED_PORT T_PROCS[acc-eval]=$STARTED_PID
        verify "acc-eval-$payload" "http://127.0.0.1:$STARTED_PORT" '^x-acc-eval: *sanity=pass'
    fi
    read -r -a order <<<"$TARGETS"
    for conc in $CONCURRENCY; do
        for ((rep = 1; rep <= REPEAT; rep++)); do
            # ABBA: every other round runs the targets in reverse order, so a slow drift of the
            # machine's speed does not favour whichever target comes first.
            local_order=("${order[@]}")
            if ((rep % 2 == 0)); then
                local_order=()
                for ((i = ${#order[@]} - 1; i >= 0; i--)); do local_order+=("${order[i]}"); done
            fi
            for target in "${local_order[@]}"; do
                [[ "$target" == acc-eval && "$payload" != large ]] && continue
                run_cell "$payload" "$conc" "$target" "$rep"
            done
        done
    done
    if has_target nginx && grep -q 'buffered to a temporary file' "$RUN/nginx-$payload/error.log"; then
        log "WARNING: nginx spooled responses to disk (see $RUN/nginx-$payload/error.log)"
    fi
    stop_all
done
if [[ -n "$RSS_NOT_RESET" ]]; then
    log "WARNING: could not reset VmHWM (/proc/PID/clear_refs): peak RSS is since process start, not per cell"
fi
python3 "$BENCH_DIR/lib/report.py" "$RAW" "$RESULTS" \
    --meta "cpus=$(nproc)" \
    --meta "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)" \
    --meta "seconds=$SECONDS_PER_CELL" --meta "warmup=$WARMUP" \
    --meta "nginx=$("$NGINX_BIN" -v 2>&1 | sed 's/.*version: //')" \
    --meta "wrk=$(if [[ "$LOADGEN" == wrk ]]; then wrk -v 2>&1 | head -n1 | awk '{print $2}'; else echo "not used: hey $(dpkg-query -W -f='${Version}' hey 2>/dev/null) generated the load"; fi)" \
    --meta "small=$(wc -c <"$WORK/payloads/small.png")" \
    --meta "large=$(wc -c <"$WORK/payloads/large.png")"
if has_target acc-redis; then
    # Time on local state is not Redis's cost: say when a call missed its deadline.
    missed="$(cat "$RUN"/acc-redis-*.err 2>/dev/null | grep -c 'shared state (Redis) unavailable' || true)"
    if ((missed > 0)); then
        printf '\nWARNING: acc-redis fell back to per-replica state %s time(s) (a Redis call missed its deadline; see %s): those seconds did not pay for Redis.\n' \
            "$missed" "$RUN/acc-redis-*.err" >>"$RESULTS"
        log "WARNING: acc-redis fell back to local state $missed time(s)"
    fi
fi
log "raw results: $RAW; table written to $RESULTS"
