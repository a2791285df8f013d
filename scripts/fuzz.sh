#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes with cargo fuzz (libFuzzer), on stable Rust
# (`--sanitizer none`: coverage-guided, without AddressSanitizer, which needs nightly).
#
#   scripts/fuzz.sh                 every target for FUZZ_SECONDS (default 15) each
#   scripts/fuzz.sh policy 600      one target for ten minutes
#
# Targets and their seed corpora are in tests/fuzz/ (fuzz_targets/, corpus/). New inputs a run
# finds go to a temporary corpus, not the repository; a crash leaves its input under
# tests/fuzz/artifacts/TARGET/ and fails the script: add it to the target's regression test
# (tests/fuzz_regressions.rs) before fixing it. Installs cargo-fuzz from crates.io when missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fuzz_dir=tests/fuzz
seconds="${2:-${FUZZ_SECONDS:-15}}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2 >&2
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 || -z "${targets[0]}" ]]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
else
    targets=("$1")
fi

cargo fuzz build --fuzz-dir "$fuzz_dir" --sanitizer none -O >&2

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "$fuzz_dir/artifacts/$t"
    echo "fuzz: $t for ${seconds}s" >&2
    # -rss_limit_mb bounds memory (the image decoder's own limits must hold within it).
    cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer none -O "$t" "$work/$t" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
        -artifact_prefix="$fuzz_dir/artifacts/$t/" >"$work/$t.log" 2>&1 || {
        tail -40 "$work/$t.log" >&2
        echo "fuzz: $t found a failing input (see $fuzz_dir/artifacts/$t/)" >&2
        exit 1
    }
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$work/$t.log" | sed "s/^/fuzz: $t /" >&2 || true
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a failure" >&2
