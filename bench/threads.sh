#!/usr/bin/env bash
# CPU per request of each of acc's threads (by thread name: acc-proxy-N, acc-trace, sqlx's
# workers, ...) over one wrk run against the mock provider: which thread a change moved cost
# to or from, where bench/run.sh only sees the process. utime+stime from /proc/PID/task/*/stat
# (clock ticks: run long enough, 20 s or more, for a per-request figure to be exact to ~1 µs).
#
#   bench/threads.sh                                  # target/dist/acc, small payload, c=1, 20 s
#   ACC_BIN=/path/to/acc THREADS_CONC=64 bench/threads.sh
#   THREADS_STORE="enabled = false" bench/threads.sh  # lines added to the policy's [store]
#
# Knobs: ACC_BIN, THREADS_PAYLOAD (small | large), THREADS_CONC (default 1), THREADS_SECONDS
# (default 20, after a 2 s warm-up), THREADS_STORE. Prints one `thread us_per_request` line per
# thread name (threads of one name summed), then `TOTAL us_per_request requests p99_us`.
# Everything it starts listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
PAYLOAD="${THREADS_PAYLOAD:-small}"
CONC="${THREADS_CONC:-1}"
SECS="${THREADS_SECONDS:-20}"
STORE="${THREADS_STORE:-}"
ACC_BIN="${ACC_BIN:-}"
WORK="$BENCH_DIR/.work"
RUN="$(mktemp -d "${TMPDIR:-/tmp}/acc-threads.XXXXXX")"

log() { echo "[threads] $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$CONC" =~ ^[1-9][0-9]*$ ]] || die "THREADS_CONC must be a positive integer"
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || die "THREADS_SECONDS must be a positive integer"
command -v wrk >/dev/null || die "wrk not found (apt-get install wrk; bench/run.sh installs it)"

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

(cd "$BENCH_DIR/mock-provider" && cargo build --release --quiet)
if [[ -z "$ACC_BIN" ]]; then
    (cd "$REPO" && cargo build --profile dist --quiet --bin acc)
    ACC_BIN="$REPO/target/dist/acc"
fi
python3 "$BENCH_DIR/lib/gen_png.py" "$WORK/payloads" >/dev/null
png="$WORK/payloads/$PAYLOAD.png"
[[ -f "$png" ]] || die "unknown payload $PAYLOAD (have: small large)"

# shellcheck source=lib/serve.sh
source "$BENCH_DIR/lib/serve.sh"
start_mock "$BENCH_DIR/mock-provider/target/release/mock-provider" "$png" "$RUN"
start_acc "$ACC_BIN" "$RUN" "path = \"$RUN/acc.db\"
$STORE"

# Ticks per thread name, summed over the threads of one name.
snapshot() {
    local t
    for t in /proc/"$ACC_PID"/task/*; do
        # A thread may end between the listing and the read: it is skipped.
        local name ticks
        if name="$(tr ' ' _ <"$t/comm" 2>/dev/null)" && ticks="$(awk '{print $14 + $15}' "$t/stat" 2>/dev/null)" &&
            [[ -n "$ticks" ]]; then
            printf '%s %s\n' "$name" "$ticks"
        fi
    done | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}

url="http://127.0.0.1:$ACC_PORT"
wrk -t1 -c"$CONC" -d2s -s "$BENCH_DIR/lib/post.lua" "$url" >/dev/null
snapshot >"$RUN/before"
log "$ACC_BIN: $PAYLOAD payload, c=$CONC, ${SECS}s"
wrk -t1 -c"$CONC" -d"${SECS}s" --timeout 10s --latency -s "$BENCH_DIR/lib/post.lua" "$url" >"$RUN/wrk.txt"
snapshot >"$RUN/after"
requests="$(sed -n 's/.*BENCH requests=\([0-9]*\).*/\1/p' "$RUN/wrk.txt")"
p99="$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' "$RUN/wrk.txt")"
[[ -n "$requests" && "$requests" -gt 0 ]] || die "wrk completed no requests: $(cat "$RUN/wrk.txt")"
# A thread that started during the run has no "before" line: it counts from zero.
join -a2 -e0 -o 0,1.2,2.2 "$RUN/before" "$RUN/after" |
    awk -v r="$requests" -v hz="$(getconf CLK_TCK)" -v p99="$p99" '
        { d = ($3 - $2) * 1e6 / hz / r; total += d; printf "%s %.1f\n", $1, d }
        END { printf "TOTAL %.1f requests=%d p99_us=%d\n", total, r, p99 }'
