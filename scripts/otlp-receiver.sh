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
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"

die() {
    echo "$me: $*" >&2
    exit 1
}

setup() {
    local module=opentelemetry.proto.collector.trace.v1.trace_service_pb2
    local pins=("opentelemetry-proto==$OTLP_PROTO_VERSION" "protobuf==$PROTOBUF_VERSION")
    # Where grpcio could not be installed once (no wheel for this Python), the marker beside
    # the venv keeps later calls from trying again; delete it to retry.
    if [ ! -e "$venv.no-grpc" ]; then
        venv_pin "$me" "$venv" "$module,grpc" "${pins[@]}" "grpcio==$GRPCIO_VERSION" \
            "typing_extensions==$TYPING_EXTENSIONS_VERSION" && return 0
        echo "$me: installing with grpcio failed; going on without OTLP/gRPC" >&2
        touch "$venv.no-grpc"
    fi
    venv_pin "$me" "$venv" "$module" "${pins[@]}" || die "opentelemetry-proto==$OTLP_PROTO_VERSION cannot be installed in $venv"
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
