#!/usr/bin/env bash
# The one test command: set-up, then the whole cargo test suite. Exits non-zero on failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Python venv with the official openai SDK (tests/sdk.rs).
scripts/python-env.sh >/dev/null

cargo test --all-targets "$@"
