#!/usr/bin/env bash
# Prepares, on the dev machine, what a GPU session carries to the device machine:
#   .devkit/  the Debian packages the C++ build and the binaries need (../shared/device/make-kit.sh)
#   .devbin/  the binaries built here (gpt2-finetune with its libgpt2ft_cli.so, gpt2ft_tests), so that the device machine,
#             whose torch is the same version, runs them without spending 3-4 of its 15 minutes
#             building; gpu-check.sh builds there only when these do not load.
# Both are git-ignored. Then one device call: carry [".devkit", ".devbin"], timeout_s 560,
#   bash scripts/device/gpu-check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
build="${GPT2FT_BUILD_DIR:-build}"
shared="${GPT2FT_SHARED:-$root/../shared}"
if [[ ! -f .devkit/install-kit.sh ]]; then
  bash "$shared/device/make-kit.sh" .devkit libgloo-dev
  cp "$shared/device/install-kit.sh" .devkit/
fi
cmake --build "$build" --target gpt2-finetune gpt2ft_tests bench_optimizer
rm -rf .devbin
mkdir -p .devbin
cp "$build/gpt2-finetune" "$build/libgpt2ft_cli.so" "$build/tests/gpt2ft_tests" "$build/bench_optimizer" .devbin/
strip --strip-debug .devbin/* 2>/dev/null || true
# What the binaries need beside libtorch (which the device machine's torch provides).
ldd .devbin/gpt2-finetune .devbin/libgpt2ft_cli.so .devbin/gpt2ft_tests .devbin/bench_optimizer | awk '/=>/ {print $1}' | sort -u |
  grep -vE '^lib(torch|c10|gomp|cudart|nvrtc|cublas|cudnn|nccl|cusparse|cufft|curand|cusolver|nvJitLink|nvToolsExt|cupti)' \
  > .devbin/needed-libraries.txt
git rev-parse HEAD > .devbin/commit.txt
git diff --quiet HEAD -- src include tests CMakeLists.txt || echo "(with uncommitted changes)" >> .devbin/commit.txt
echo "prepared: .devkit ($(du -sh .devkit | cut -f1)), .devbin ($(du -sh .devbin | cut -f1)) from $(head -c 12 .devbin/commit.txt)"
