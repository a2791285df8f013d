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

# venv_pin NAME VENV IMPORTS PACKAGE==VERSION...: makes VENV a Python virtual environment in
# which every PACKAGE (its name on PyPI) is installed at exactly VERSION and every module in
# IMPORTS (comma-separated, may be empty) imports; nothing happens when it already is. One
# installer at a time (a lock file VENV.lock). A venv that is there but not ready (other pins,
# a broken interpreter, an interrupted install) is made afresh, never repaired in place.
# Returns 1 (after saying why on stderr) when it cannot; the caller decides whether to exit.
venv_pin() {
    local name="$1" venv="$2" imports="$3"
    shift 3
    if ! command -v python3 >/dev/null 2>&1; then
        echo "$name: python3 is not installed (apt-get install python3 python3-venv)" >&2
        return 1
    fi
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    local py="$venv/bin/python" status=0
    if ! _venv_ready "$py" "$imports" "$@"; then
        echo "$name: setting up $venv ($*)" >&2
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >&2; then
            echo "$name: 'python3 -m venv' failed; install the venv module (apt-get install python3-venv)" >&2
            status=1
        elif ! "$py" -m pip install --disable-pip-version-check --quiet "$@" >&2; then
            echo "$name: pip install $* failed (is PyPI reachable?)" >&2
            status=1
        elif ! _venv_ready "$py" "$imports" "$@"; then
            echo "$name: $* still not importable from $py" >&2
            status=1
        fi
    fi
    exec 9>&-
    return "$status"
}

# _venv_ready PY IMPORTS PACKAGE==VERSION...: whether PY runs, has each PACKAGE at VERSION and
# imports each module of IMPORTS.
_venv_ready() {
    local py="$1" imports="$2"
    shift 2
    [[ -x "$py" ]] && "$py" - "$imports" "$@" >/dev/null 2>&1 <<'PYEOF'
import importlib, sys
from importlib.metadata import version
for module in filter(None, sys.argv[1].split(",")):
    importlib.import_module(module)
pins = [arg.split("==", 1) for arg in sys.argv[2:]]
sys.exit(0 if all(version(name) == want for name, want in pins) else 1)
PYEOF
}
