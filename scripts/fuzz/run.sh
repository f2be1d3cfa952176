#!/usr/bin/env bash
# Fuzzes the readers of untrusted files with libFuzzer (clang, AddressSanitizer + UBSan):
#   scripts/fuzz/run.sh [MINUTES_PER_TARGET] [TARGET ...]
# Targets (tests/fuzz/*.cpp): safetensors_header shard_header model_config train_config
# checkpoint_state adapter_config tokenizer_json chat_template (tests/fuzz/targets.txt); all by default, 2 minutes each. Builds into build-fuzz (needs clang-14 and
# libclang-rt-14-dev from Debian), starts from the seed corpus tests/fuzz/corpus/<target> and
# works in fuzz-work/<target> (new inputs, crash-* reproducers). Prints executions and
# findings per target. A reproducer replays with: build-fuzz/tests/fuzz/fuzz_<target> CRASH_FILE
# Worth keeping new corpus inputs? Copy them into tests/fuzz/corpus/<target>: CI replays it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
minutes="${1:-2}"
[[ "$minutes" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: MINUTES must be a whole number >= 1, got '$minutes'" >&2; exit 2; }
shift || true
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(grep -E "^[a-z_]+$" tests/fuzz/targets.txt)
command -v clang++-14 >/dev/null || { echo "fuzz: clang++-14 not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 3; }
if [[ ! -f build-fuzz/CMakeCache.txt ]]; then
  CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGPT2FT_FUZZ=ON \
    -DGPT2FT_BUILD_TESTS=OFF -DGPT2FT_USE_PCH=OFF \
    -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DCUDAToolkit_ROOT=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc > /dev/null
fi
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]/#/fuzz_}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
printf '| target | minutes | executions | exec/s | corpus | findings |\n|---|---|---|---|---|---|\n' > fuzz-work.md 2>/dev/null || true
for t in "${targets[@]}"; do
  work="fuzz-work/$t"
  mkdir -p "$work/corpus"
  log="$work/fuzz.log"
  bin="$root/build-fuzz/tests/fuzz/fuzz_$t"
  [[ -x "$bin" ]] || { echo "fuzz: $bin was not built" >&2; exit 1; }
  (cd "$work" && "$bin" -max_total_time=$((minutes * 60)) -print_final_stats=1 -timeout=10 \
      -rss_limit_mb=4096 corpus "$root/tests/fuzz/corpus/$t" > fuzz.log 2>&1) || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  found=$(find "$work" -maxdepth 1 -name 'crash-*' -o -maxdepth 1 -name 'timeout-*' -o -maxdepth 1 -name 'oom-*' | wc -l)
  size=$(find "$work/corpus" -type f | wc -l)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$minutes" "${execs:-?}" "${rate:-?}" "$size" "$found" | tee -a fuzz-work.md
done
