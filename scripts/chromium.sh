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

apt_install() {
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo -n)
    echo "chromium.sh: installing $* (Debian packages)" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "$@" >&2; }
}

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
    apt_install chromium fonts-dejavu-core || { echo "chromium.sh: cannot install chromium" >&2; exit 1; }
    chromium="$(command -v chromium)"
fi

mkdir -p "$dir"
# One installer at a time.
exec 9>"$root/.cache/console-browser.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

ready() {
    [[ -f "$dir/node_modules/playwright-core/package.json" ]] && node -e '
        const v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version;
        process.exit(v === process.argv[2] ? 0 : 1);' "$dir/node_modules/playwright-core/package.json" "$PLAYWRIGHT_VERSION"
}

if ! ready; then
    echo "chromium.sh: installing playwright-core@$PLAYWRIGHT_VERSION into $dir" >&2
    npm install --prefix "$dir" --no-audit --no-fund --no-package-lock --loglevel=error \
        "playwright-core@$PLAYWRIGHT_VERSION" >&2
    if ! ready; then
        echo "chromium.sh: playwright-core@$PLAYWRIGHT_VERSION is still not installed in $dir" >&2
        exit 1
    fi
fi

echo "$chromium"
echo "$dir/node_modules"
