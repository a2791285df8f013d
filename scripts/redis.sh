#!/usr/bin/env bash
# A throw-away Redis server for the integration tests (tests/cluster.rs), on 127.0.0.1 only.
#
#   scripts/redis.sh install     makes sure redis-server is present (Debian package
#                                `redis-server`, installed with apt-get, through sudo when not
#                                root); prints its path
#   scripts/redis.sh start DIR   starts redis-server on a free 127.0.0.1 port (or $ACC_REDIS_PORT)
#                                with DIR as its working directory, no persistence, waits until
#                                it answers PING and prints one line, redis://127.0.0.1:PORT,
#                                also written to DIR/url. Log: DIR/log. Idempotent: on a DIR
#                                whose server runs it prints the same URL again; on a stopped
#                                one it starts again on the same port (tests restart Redis
#                                mid-run this way).
#   scripts/redis.sh stop DIR    stops the server (SIGTERM, waits); removes nothing
#
# Everything but the URL (and `install`'s path) goes to stderr.
set -euo pipefail

me="redis.sh"

die() {
    echo "$me: $*" >&2
    exit 1
}

install_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        command -v redis-server
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "redis-server is not installed and there is no apt-get; install Redis 6.2 or later"
    local as=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as=(sudo -n)
        else
            die "redis-server is not installed and this user cannot install it (not root, no password-less sudo); run as root: apt-get install -y redis-server"
        fi
    fi
    echo "$me: installing the Debian package redis-server with apt-get" >&2
    exec 8>"${TMPDIR:-/tmp}/acc-redis-install.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 8
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        local apt=(apt-get -y -q --no-install-recommends -o Dpkg::Use-Pty=0)
        if ! "${as[@]}" "${apt[@]}" install redis-server >&2; then
            echo "$me: apt-get install failed; updating the package lists and trying again" >&2
            "${as[@]}" apt-get -q update >&2
            "${as[@]}" "${apt[@]}" install redis-server >&2
        fi
        # The package starts a system-wide server on 6379 where there is an init system; the
        # tests do not use it.
    fi
    command -v redis-server || die "redis-server still not found after apt-get install"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

ping() {
    # RESP PING over bash's /dev/tcp: no redis-cli needed.
    local port=$1 reply
    exec 9<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
    printf 'PING\r\n' >&9
    read -r -t 1 reply <&9 || true
    exec 9>&-
    [[ "$reply" == +PONG* ]]
}

start() {
    local dir=$1
    [ -n "$dir" ] || die "usage: $me start DIR"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local port
    if [ -f "$dir/port" ]; then
        port="$(cat "$dir/port")"
        if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && ping "$port"; then
            cat "$dir/url"
            return 0
        fi
    else
        port="${ACC_REDIS_PORT:-$(free_port)}"
        echo "$port" >"$dir/port"
    fi
    local bin
    bin="$(install_redis)"
    "$bin" --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/pid" --logfile "$dir/log" >&2
    local i
    for i in $(seq 1 100); do
        if ping "$port"; then
            echo "redis://127.0.0.1:$port" >"$dir/url"
            cat "$dir/url"
            return 0
        fi
        sleep 0.05
    done
    die "redis-server did not answer on 127.0.0.1:$port within 5 s; see $dir/log"
}

stop() {
    local dir=$1
    [ -f "$dir/pid" ] || return 0
    local pid
    pid="$(cat "$dir/pid")"
    kill "$pid" 2>/dev/null || return 0
    local i
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
    install) install_redis ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $me install | start DIR | stop DIR" ;;
esac
