#!/usr/bin/env bash
# Installs (idempotently) what the console's browser test (tests/console.rs) drives: Debian's
# `chromium` package (apt-get, when missing) and Playwright's `playwright-core` from npm at a
# pinned version into .cache/console-browser at the repository root. Playwright never downloads
# a browser here: the test points it at Debian's chromium.
# Prints nothing on stdout except two lines: the chromium executable, then the node_modules
# directory (for NODE_PATH).
set -euo pipefail

PLAYWRIGHT_VERSION="1.49.1"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.cache/console-browser"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"

# Node.js and npm: the same installer as the SDK test's.
"$root/scripts/node-env.sh" >/dev/null

chromium=""
for c in chromium chromium-browser; do
    if command -v "$c" >/dev/null 2>&1; then chromium="$(command -v "$c")"; break; fi
done
if [[ -z "$chromium" ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "chromium.sh: chromium missing and no apt-get to install it; install Chromium" >&2
        exit 1
    fi
    apt_install chromium.sh chromium fonts-dejavu-core || { echo "chromium.sh: cannot install chromium" >&2; exit 1; }
    chromium="$(command -v chromium)"
fi

npm_pin chromium.sh "$dir" playwright-core "$PLAYWRIGHT_VERSION"

echo "$chromium"
echo "$dir/node_modules"
