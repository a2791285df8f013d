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

# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [[ ${#missing[@]} -gt 0 ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "node-env.sh: ${missing[*]} missing and no apt-get to install it; install Node.js 18+ with npm" >&2
        exit 1
    fi
    apt_install node-env.sh "${missing[@]}" || {
        echo "node-env.sh: cannot install ${missing[*]}; install Node.js 18+ with npm" >&2
        exit 1
    }
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if (( major < 18 )); then
    echo "node-env.sh: Node.js $(node --version) is too old; openai@$OPENAI_VERSION needs Node.js 18+" >&2
    exit 1
fi

npm_pin node-env.sh "$dir" openai "$OPENAI_VERSION"

echo "$dir/node_modules"
