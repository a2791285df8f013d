#!/usr/bin/env bash
# Trace soak: acc with the default SQLite trace store under wrk at the proxy benchmark's rate
# for SOAK_SECONDS (default 600), then checks that every request was either recorded or counted
# as lost: acc_trace_written_total + acc_trace_dropped_total (all reasons but
# images_not_digested, which loses no record) = requests that reached routing
# (acc_requests_total{route="bench"}), and that the store holds as many rows as were written.
# Prints one line `soak seconds=.. requests=.. written=.. dropped=.. rows=..` and exits 1 on a
# mismatch. Loopback only. Knobs: SOAK_SECONDS, SOAK_CONCURRENCY (64), SOAK_PAYLOAD (small),
# ACC_BIN (default: cargo build --profile dist). Disk: about 2 KB per record written.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
SECONDS_RUN="${SOAK_SECONDS:-600}"
CONC="${SOAK_CONCURRENCY:-64}"
PAYLOAD="${SOAK_PAYLOAD:-small}"
ACC_BIN="${ACC_BIN:-}"
RUN="$BENCH_DIR/.work/soak"
PNG="$BENCH_DIR/.work/payloads/$PAYLOAD.png"

log() { printf '[soak] %s\n' "$*" >&2; }
die() { printf '[soak] ERROR: %s\n' "$*" >&2; exit 1; }
[[ -f "$PNG" ]] || die "no payload $PNG: run bench/run.sh once (it makes the payloads)"
command -v wrk >/dev/null || die "wrk is missing (bench/run.sh installs it)"
(cd "$BENCH_DIR/mock-provider" && cargo build --release --quiet)
MOCK_BIN="$BENCH_DIR/mock-provider/target/release/mock-provider"
if [[ -z "$ACC_BIN" ]]; then
    (cd "$REPO" && cargo build --profile dist --quiet --bin acc)
    ACC_BIN="$REPO/target/dist/acc"
fi
rm -rf "$RUN"
mkdir -p "$RUN"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

# shellcheck source=lib/serve.sh
source "$BENCH_DIR/lib/serve.sh"
start_mock "$MOCK_BIN" "$PNG" "$RUN"
# max_rows: no pruning during the soak (rows are compared with records written).
start_acc "$ACC_BIN" "$RUN" "path = \"$RUN/traces.db\"
max_rows = 1000000000"
port=$ACC_PORT admin=$ACC_ADMIN

log "wrk -c$CONC for ${SECONDS_RUN}s on the $PAYLOAD payload, traces to $RUN/traces.db"
wrk -t"$(( CONC > 1 ? 2 : 1 ))" -c"$CONC" -d"${SECONDS_RUN}s" --timeout 10s -s "$BENCH_DIR/lib/post.lua" "http://127.0.0.1:$port" >"$RUN/wrk.out"

# requests, written, dropped (lost records only) from one scrape.
counts() {
    python3 - "$admin" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
req = written = dropped = 0
for line in text.splitlines():
    if line.startswith("#") or not line.strip():
        continue
    name, value = line.rsplit(" ", 1)
    if name.startswith("acc_requests_total{") and 'route="bench"' in name:
        req += float(value)
    elif name == "acc_trace_written_total":
        written += float(value)
    elif name.startswith("acc_trace_dropped_total{") and "images_not_digested" not in name:
        dropped += float(value)
print(int(req), int(written), int(dropped))
PY
}
for ((i = 0; i < 120; i++)); do
    read -r req written dropped < <(counts)
    ((written + dropped == req)) && break
    sleep 0.5
done
rows="$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from traces").fetchone()[0])' "$RUN/traces.db")"
echo "soak seconds=$SECONDS_RUN concurrency=$CONC payload=$PAYLOAD requests=$req written=$written dropped=$dropped rows=$rows"
((written + dropped == req)) || die "records + dropped ($written + $dropped) != requests ($req)"
((rows == written)) || die "the store holds $rows rows, $written were written"
