#!/usr/bin/env bash
# An OTLP receiver for the integration tests (no OpenTelemetry Collector ships in the registries
# this project reaches): scripts/otlp_receiver.py, on the PyPI packages below, on 127.0.0.1 only.
#
#   scripts/otlp-receiver.sh setup       creates (idempotently) the venv .cache/otlp-venv with the
#                                        pinned packages; prints the venv's python on the last line
#   scripts/otlp-receiver.sh start DIR   runs the receiver in the background on a free port and
#                                        prints one line, its base URL http://127.0.0.1:PORT
#                                        (OTLP/HTTP traces endpoint: URL/v1/traces); also written
#                                        to DIR/url, the PID to DIR/pid, the log to DIR/log.
#                                        Spans land in DIR/spans.jsonl and at GET URL/spans; OTLP/gRPC
#                                        is served too, at the URL in DIR/grpc_url.
#   scripts/otlp-receiver.sh stop DIR    stops it (SIGTERM, then SIGKILL after 5 s); removes nothing
#                                        else (the caller deletes DIR)
#
# `start` runs `setup` when needed. See scripts/otlp_receiver.py for the JSON span format.
set -euo pipefail

OTLP_PROTO_VERSION="1.45.2"
PROTOBUF_VERSION="7.36.2"
# Optional (OTLP/gRPC); without it the receiver speaks OTLP/HTTP only.
GRPCIO_VERSION="1.85.3"
TYPING_EXTENSIONS_VERSION="4.16.0" # grpcio's one dependency

me="otlp-receiver.sh"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/otlp-venv"
py="$venv/bin/python"

die() {
    echo "$me: $*" >&2
    exit 1
}

ready() {
    [ -x "$py" ] && "$py" - "$OTLP_PROTO_VERSION" "$PROTOBUF_VERSION" "$GRPCIO_VERSION" "$venv/.no-grpc" >/dev/null 2>&1 <<'PYEOF'
import os, sys
from importlib.metadata import version, PackageNotFoundError
proto, protobuf, grpcio, no_grpc = sys.argv[1:]
import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
ok = version("opentelemetry-proto") == proto and version("protobuf") == protobuf
if not os.path.exists(no_grpc):
    try:
        ok = ok and version("grpcio") == grpcio
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PYEOF
}

setup() {
    if ! command -v python3 >/dev/null 2>&1; then
        die "python3 is not installed (apt-get install python3 python3-venv)"
    fi
    mkdir -p "$root/.cache"
    # One creator at a time (parallel tests may all call start).
    exec 9>"$root/.cache/otlp-venv.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    if ! ready; then
        local t0=$SECONDS
        echo "$me: setting up $venv (opentelemetry-proto==$OTLP_PROTO_VERSION protobuf==$PROTOBUF_VERSION grpcio==$GRPCIO_VERSION)" >&2
        if [ ! -x "$py" ]; then
            rm -rf "$venv"
            python3 -m venv "$venv" >&2 || die "'python3 -m venv' failed; install the venv module (apt-get install python3-venv)"
        fi
        rm -f "$venv/.no-grpc"
        local pip=("$py" -m pip install --disable-pip-version-check --quiet)
        if ! "${pip[@]}" "opentelemetry-proto==$OTLP_PROTO_VERSION" "protobuf==$PROTOBUF_VERSION" "grpcio==$GRPCIO_VERSION" \
            "typing_extensions==$TYPING_EXTENSIONS_VERSION" >&2; then
            echo "$me: installing with grpcio failed; going on without OTLP/gRPC" >&2
            "${pip[@]}" "opentelemetry-proto==$OTLP_PROTO_VERSION" "protobuf==$PROTOBUF_VERSION" >&2 ||
                die "pip install opentelemetry-proto==$OTLP_PROTO_VERSION failed (is PyPI reachable?)"
            touch "$venv/.no-grpc"
        fi
        ready || die "opentelemetry-proto==$OTLP_PROTO_VERSION is still not importable from $py"
        echo "$me: set up in $((SECONDS - t0))s" >&2
    fi
    exec 9>&-
}

# Whether PID is running (a zombie waiting for its reaper is not).
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# The receiver's PID from DIR/pid, when that process is alive and is the receiver.
receiver_pid() {
    local pid
    pid="$(cat "$dir/pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "otlp_receiver.py" || return 1
    echo "$pid"
}

fail_with_log() {
    echo "$me: $*" >&2
    if [ -f "$dir/log" ]; then
        echo "$me: last lines of $dir/log:" >&2
        tail -n 30 "$dir/log" | sed 's/^/    /' >&2
    fi
    exit 1
}

start() {
    setup
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    if receiver_pid >/dev/null && [ -s "$dir/url" ]; then
        cat "$dir/url"
        return 0
    fi
    rm -f "$dir/url" "$dir/grpc_url"
    # Output to the log, not to our stdout: a caller reading our stdout to EOF must not wait on it.
    "$py" "$root/scripts/otlp_receiver.py" "$dir" </dev/null >>"$dir/log" 2>&1 &
    local pid=$!
    echo "$pid" >"$dir/pid"
    for _ in $(seq 1 300); do
        if [ -s "$dir/url" ]; then
            cat "$dir/url"
            return 0
        fi
        alive "$pid" || fail_with_log "the receiver exited during start"
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    fail_with_log "the receiver did not come up within 15 s"
}

stop() {
    local pid
    pid="$(receiver_pid)" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        alive "$pid" || return 0
        sleep 0.05
    done
    echo "$me: the receiver (pid $pid) ignored SIGTERM; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

cmd="${1:-}"
case "$cmd" in
    setup)
        [ $# -eq 1 ] || die "usage: $0 setup"
        setup
        echo "$py"
        ;;
    start | stop)
        [ $# -eq 2 ] && [ -n "$2" ] || die "usage: $0 $cmd DIR"
        dir="$2"
        if [ "$cmd" = start ]; then
            start
        else
            [ -d "$dir" ] || die "$dir does not exist"
            stop
        fi
        ;;
    *)
        die "usage: $0 setup | start DIR | stop DIR"
        ;;
esac
