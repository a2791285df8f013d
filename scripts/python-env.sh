#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment used by the SDK compatibility test:
# .cache/venv at the repository root, with the official `openai` SDK installed from PyPI.
# Prints nothing on stdout except, on the last line, the path of the venv's python.
set -euo pipefail

OPENAI_VERSION="3.57.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/venv"
py="$venv/bin/python"

if ! command -v python3 >/dev/null 2>&1; then
    echo "python-env.sh: python3 is not installed; the OpenAI SDK test needs Python 3.8+ (apt-get install python3 python3-venv)" >&2
    exit 1
fi

mkdir -p "$root/.cache"
# One creator at a time (scripts/test.sh and the sdk test may both call this).
exec 9>"$root/.cache/venv.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

ready() {
    [ -x "$py" ] && "$py" - "$OPENAI_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys
import openai
sys.exit(0 if openai.__version__ == sys.argv[1] else 1)
PYEOF
}

if ! ready; then
    echo "python-env.sh: setting up $venv (openai==$OPENAI_VERSION)" >&2
    if [ ! -x "$py" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv" >&2 || {
            echo "python-env.sh: 'python3 -m venv' failed; install the venv module (apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    "$py" -m pip install --disable-pip-version-check --quiet "openai==$OPENAI_VERSION" >&2
    if ! ready; then
        echo "python-env.sh: openai==$OPENAI_VERSION is still not importable from $py" >&2
        exit 1
    fi
fi

echo "$py"
