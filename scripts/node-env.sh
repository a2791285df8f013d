#!/usr/bin/env bash
# Installs (idempotently) the official `openai` Node SDK used by the SDK compatibility test
# (tests/sdk.rs) into .cache/node-sdk at the repository root, from the npm registry at a pinned
# version. Installs Node.js and npm (Debian's packages) when missing.
# Prints nothing on stdout except, on the last line, the node_modules directory (for NODE_PATH).
set -euo pipefail

# 5.x supports Node.js 18 (Debian 12's nodejs) and later; 6.x and 7.x need newer Node.js.
OPENAI_VERSION="5.23.2"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.cache/node-sdk"

apt_install() {
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo -n)
    echo "node-env.sh: installing $* (Debian packages)" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "$@" >&2; }
}

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [[ ${#missing[@]} -gt 0 ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "node-env.sh: ${missing[*]} missing and no apt-get to install it; install Node.js 18+ with npm" >&2
        exit 1
    fi
    apt_install "${missing[@]}" || {
        echo "node-env.sh: cannot install ${missing[*]}; install Node.js 18+ with npm" >&2
        exit 1
    }
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if (( major < 18 )); then
    echo "node-env.sh: Node.js $(node --version) is too old; openai@$OPENAI_VERSION needs Node.js 18+" >&2
    exit 1
fi

mkdir -p "$dir"
# One installer at a time (scripts/test.sh and the sdk test may both call this).
exec 9>"$root/.cache/node-sdk.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

ready() {
    [[ -f "$dir/node_modules/openai/package.json" ]] && node -e '
        const v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version;
        process.exit(v === process.argv[2] ? 0 : 1);' "$dir/node_modules/openai/package.json" "$OPENAI_VERSION"
}

if ! ready; then
    echo "node-env.sh: installing openai@$OPENAI_VERSION into $dir" >&2
    npm install --prefix "$dir" --no-audit --no-fund --no-package-lock --loglevel=error \
        "openai@$OPENAI_VERSION" >&2
    if ! ready; then
        echo "node-env.sh: openai@$OPENAI_VERSION is still not installed in $dir" >&2
        exit 1
    fi
fi

echo "$dir/node_modules"
