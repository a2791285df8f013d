# Shared install steps for the test command's scripts (sourced, not run). Everything goes to
# stderr: the scripts that source this print only paths on stdout.

# apt_install NAME PACKAGE...: installs Debian packages (sudo -n when not root), updating the
# package lists once if the first try fails. NAME prefixes the log line.
apt_install() {
    local name="$1"
    shift
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo -n)
    echo "$name: installing $* (Debian packages)" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "$@" >&2; }
}

# npm_pin NAME DIR PACKAGE VERSION: makes DIR/node_modules hold PACKAGE at exactly VERSION
# (from the npm registry; nothing when it is already there), one installer at a time (a lock
# file beside DIR). Exits 1 when it cannot.
npm_pin() {
    local name="$1" dir="$2" package="$3" version="$4"
    mkdir -p "$dir"
    exec 9>"$dir.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    local manifest="$dir/node_modules/$package/package.json"
    _npm_ready() {
        [[ -f "$manifest" ]] && node -e '
            const v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version;
            process.exit(v === process.argv[2] ? 0 : 1);' "$manifest" "$version"
    }
    if ! _npm_ready; then
        echo "$name: installing $package@$version into $dir" >&2
        npm install --prefix "$dir" --no-audit --no-fund --no-package-lock --loglevel=error \
            "$package@$version" >&2
        if ! _npm_ready; then
            echo "$name: $package@$version is still not installed in $dir" >&2
            exit 1
        fi
    fi
    exec 9>&-
}
