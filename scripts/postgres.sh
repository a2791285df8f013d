#!/usr/bin/env bash
# A throw-away PostgreSQL server for the integration tests, on 127.0.0.1 only.
#
#   scripts/postgres.sh install     makes sure the server binaries are present (Debian package
#                                   `postgresql`, installed with apt-get, through sudo when not
#                                   root); prints their directory (e.g. /usr/lib/postgresql/15/bin)
#   scripts/postgres.sh start DIR   initdb into DIR/data (superuser `acc`, trust auth, database
#                                   `acc`), starts the server on a free 127.0.0.1 port with its
#                                   unix socket in DIR, waits until it accepts connections and
#                                   prints one line, postgres://acc@127.0.0.1:PORT/acc, also
#                                   written to DIR/url. Server log: DIR/log.
#   scripts/postgres.sh stop DIR    fast shutdown; removes nothing (the caller deletes DIR)
#
# `start` installs the binaries when they are missing, and is idempotent: on a DIR whose server is
# running it prints the same URL again; on a stopped one it starts the old data on a new port.
# PostgreSQL refuses to run as root: as root the server runs as the user $ACC_PG_USER (default
# `postgres` when that user exists, else `nobody`): DIR is chown'ed to it, and root-owned parent
# directories it cannot pass (a `mktemp -d` holding DIR) get search permission (o+x).
# $ACC_PG_BIN overrides the binaries' directory; $ACC_PG_PORT picks the port (else a free one). Durability is switched off (fsync=off): test data only.
# Everything but the URL (and `install`'s directory) goes to stderr.
set -euo pipefail

me="postgres.sh"

die() {
    echo "$me: $*" >&2
    exit 1
}

# The newest /usr/lib/postgresql/<ver>/bin with the three server programs, or $ACC_PG_BIN.
find_bin() {
    if [ -n "${ACC_PG_BIN:-}" ]; then
        echo "$ACC_PG_BIN"
        return 0
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
            echo "$d"
            return 0
        fi
    done
    # Other layouts (e.g. a distribution that puts them on PATH).
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

install_pg() {
    local bin
    if bin="$(find_bin)"; then
        echo "$bin"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "the PostgreSQL server is not installed and there is no apt-get; install PostgreSQL (initdb, pg_ctl, postgres) and set ACC_PG_BIN to its bin directory"
    local as=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as=(sudo -n)
        else
            die "the PostgreSQL server is not installed and this user cannot install it (not root, no password-less sudo); run as root: apt-get install -y postgresql"
        fi
    fi
    echo "$me: installing the Debian package postgresql with apt-get" >&2
    local t0=$SECONDS
    # One apt-get at a time (parallel tests may all call install).
    exec 8>"${TMPDIR:-/tmp}/acc-postgres-install.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 8
    fi
    if ! bin="$(find_bin)"; then
        export DEBIAN_FRONTEND=noninteractive
        local apt=(apt-get -y -q --no-install-recommends -o Dpkg::Use-Pty=0)
        if ! "${as[@]}" "${apt[@]}" install postgresql >&2; then
            echo "$me: apt-get install failed; updating the package lists and trying again" >&2
            "${as[@]}" apt-get -q update >&2
            "${as[@]}" "${apt[@]}" install postgresql >&2
        fi
        bin="$(find_bin)" || die "apt-get installed postgresql but initdb/pg_ctl/postgres are not under /usr/lib/postgresql/*/bin"
        echo "$me: installed in $((SECONDS - t0))s" >&2
    fi
    exec 8>&-
    echo "$bin"
}

# Runs a command as the server's user: directly when not root, else through runuser (or su).
as_pg() {
    if [ -z "$pg_user" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$pg_user" -- "$@"
    else
        local q
        q="$(printf '%q ' "$@")"
        su -s /bin/bash "$pg_user" -c "$q"
    fi
}

pick_user() {
    pg_user=""
    if [ "$(id -u)" = 0 ]; then
        if [ -n "${ACC_PG_USER:-}" ]; then
            pg_user="$ACC_PG_USER"
        elif id -u postgres >/dev/null 2>&1; then
            pg_user=postgres
        else
            pg_user=nobody
        fi
        id -u "$pg_user" >/dev/null 2>&1 || die "user $pg_user does not exist (set ACC_PG_USER)"
    fi
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' 2>/dev/null && return 0
    # No python3: try random ports until one is not listening.
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

fail_with_log() {
    echo "$me: $*" >&2
    if [ -f "$dir/log" ]; then
        echo "$me: last lines of $dir/log:" >&2
        tail -n 30 "$dir/log" | sed 's/^/    /' >&2
    fi
    exit 1
}

# The port of a running server on $dir (from postmaster.pid), or nothing.
running_port() {
    [ -f "$dir/data/postmaster.pid" ] || return 1
    as_pg "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1 || return 1
    sed -n 4p "$dir/data/postmaster.pid"
}

start_pg() {
    bin="$(install_pg)"
    pick_user
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    cd "$dir" # the server's user may not be able to enter the caller's working directory
    touch "$dir/log"
    if [ -n "$pg_user" ]; then
        # A DIR inside a root-only temp dir (mktemp -d, Rust's tempfile): let the server's user
        # pass through (search permission only, no listing).
        local p="$dir"
        while p="$(dirname "$p")" && [ "$p" != / ]; do
            if ! as_pg test -x "$p" && [ "$(stat -c %u "$p")" = 0 ]; then
                echo "$me: chmod o+x $p so that $pg_user can reach $dir" >&2
                chmod o+x "$p"
            fi
        done
        chown "$pg_user" "$dir" "$dir/log"
        [ ! -d "$dir/data" ] || chown -R "$pg_user" "$dir/data"
        as_pg test -w "$dir" -a -x "$dir" ||
            die "the server's user $pg_user cannot write $dir (is a parent directory closed to it?); use a directory under /tmp or set ACC_PG_USER"
    fi

    local port url
    if port="$(running_port)"; then
        url="postgres://acc@127.0.0.1:$port/acc"
        echo "$url" >"$dir/url"
        echo "$url"
        return 0
    fi

    if [ ! -f "$dir/data/PG_VERSION" ]; then
        rm -rf "$dir/data"
        as_pg mkdir -m 0700 "$dir/data"
        as_pg "$bin/initdb" -D "$dir/data" -U acc --auth-local=trust --auth-host=trust \
            -E UTF8 --locale=C --no-sync --no-instructions >>"$dir/log" 2>&1 ||
            fail_with_log "initdb failed"
        # Loopback only (listen_addresses below); no IPv6, no replication entries.
        as_pg sh -c 'cat > "$1"' sh "$dir/data/pg_hba.conf" <<'EOF'
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  trust
EOF
        as_pg sh -c 'echo "include_if_exists = '"'"'acc-test.conf'"'"'" >> "$1"' sh "$dir/data/postgresql.conf"
    fi

    # A unix socket path is limited to 107 bytes; with a longer DIR only TCP is offered.
    local sockdir="$dir"
    if [ ${#dir} -gt 80 ]; then
        sockdir=""
    fi
    local attempt
    for attempt in 1 2 3 4 5; do
        # $ACC_PG_PORT: this port (a restart on the port clients already know), else a free one.
        port="${ACC_PG_PORT:-$(free_port)}" || die "found no free port on 127.0.0.1"
        as_pg sh -c 'cat > "$1"' sh "$dir/data/acc-test.conf" <<EOF
# Written by scripts/postgres.sh start; rewritten on every start.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sockdir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
        if as_pg "$bin/pg_ctl" start -D "$dir/data" -l "$dir/log" -w -t 60 >>"$dir/log" 2>&1; then
            break
        fi
        # Lost the race for the port to another process: try another one.
        if tail -n 20 "$dir/log" | grep -q "Address already in use" && [ "$attempt" -lt 5 ]; then
            echo "$me: port $port was taken meanwhile; trying another" >&2
            continue
        fi
        as_pg "$bin/pg_ctl" stop -D "$dir/data" -m immediate >/dev/null 2>&1 || true
        fail_with_log "the server did not start"
    done

    local isready="$bin/pg_isready" psql="$bin/psql"
    [ -x "$isready" ] || isready="$(command -v pg_isready || true)"
    [ -x "$psql" ] || psql="$(command -v psql || true)"
    [ -n "$psql" ] || die "psql is not installed (apt-get install postgresql-client)"
    local ok=""
    for _ in $(seq 1 100); do
        if [ -n "$isready" ]; then
            "$isready" -q -h 127.0.0.1 -p "$port" -U acc -d postgres && ok=1 && break
        elif "$psql" -X -q -h 127.0.0.1 -p "$port" -U acc -d postgres -c 'select 1' >/dev/null 2>&1; then
            ok=1 && break
        fi
        sleep 0.1
    done
    [ -n "$ok" ] || fail_with_log "the server started but does not accept connections on 127.0.0.1:$port"

    if ! "$psql" -X -q -At -h 127.0.0.1 -p "$port" -U acc -d postgres \
        -c "select 1 from pg_database where datname = 'acc'" 2>>"$dir/log" | grep -q 1; then
        "$psql" -X -q -h 127.0.0.1 -p "$port" -U acc -d postgres -c 'create database acc' >>"$dir/log" 2>&1 ||
            fail_with_log "could not create the database acc"
    fi

    url="postgres://acc@127.0.0.1:$port/acc"
    echo "$url" >"$dir/url.tmp"
    mv "$dir/url.tmp" "$dir/url"
    echo "$url"
}

stop_pg() {
    [ -d "$dir/data" ] || die "$dir/data does not exist (nothing was started there)"
    [ -f "$dir/data/postmaster.pid" ] || return 0
    bin="$(find_bin)" || die "PostgreSQL binaries not found (scripts/postgres.sh install)"
    pg_user=""
    if [ "$(id -u)" = 0 ]; then
        pg_user="$(stat -c %U "$dir/data")"
        [ "$pg_user" != root ] || pg_user=""
    fi
    cd "$dir"
    if ! as_pg "$bin/pg_ctl" stop -D "$dir/data" -m fast -w -t 60 >>"$dir/log" 2>&1; then
        # Not running after all (stale pid file) is fine; anything else is not.
        if as_pg "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
            fail_with_log "pg_ctl stop failed"
        fi
    fi
}

cmd="${1:-}"
case "$cmd" in
    install)
        [ $# -eq 1 ] || die "usage: $0 install"
        install_pg
        ;;
    start | stop)
        [ $# -eq 2 ] && [ -n "$2" ] || die "usage: $0 $cmd DIR"
        dir="$2"
        if [ "$cmd" = start ]; then
            start_pg
        else
            [ -d "$dir" ] || die "$dir does not exist"
            dir="$(cd "$dir" && pwd -P)"
            stop_pg
        fi
        ;;
    *)
        die "usage: $0 install | start DIR | stop DIR"
        ;;
esac
