#!/usr/bin/env bash
# Runs setup if needed, then the whole test suite through ctest.
# Tests labelled `gpu` report as skipped on machines without CUDA.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
build_dir="${GPT2FT_BUILD_DIR:-build}"
cd "$build_dir"
ctest --output-on-failure -j "${GPT2FT_TEST_JOBS:-2}" "$@"
