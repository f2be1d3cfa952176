#!/usr/bin/env bash
# The C++ code under AddressSanitizer + UndefinedBehaviorSanitizer (run by .ci/run after the
# test suite): builds everything instrumented into build-asan (-O1, so it builds in minutes)
# and runs, under it, the C++ tests that need no second process or GPU, the fuzz targets over
# their seed corpus, and the command line's bad-input, damaged-checkpoint, perimeter and
# instruction-data input tests. Any
# sanitizer report fails the run. Needs scripts/setup.sh to have run (the .venv, packages).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${GPT2FT_ASAN_BUILD_DIR:-build-asan}"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1" -DGPT2FT_SANITIZE=ON \
    -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DCUDAToolkit_ROOT=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    -DPython3_EXECUTABLE="$root/.venv/bin/python" > /dev/null
fi
targets=(gpt2-finetune gpt2ft_tests)
mapfile -t fuzz_targets < <(grep -E '^[a-z_]+$' tests/fuzz/targets.txt)
for t in "${fuzz_targets[@]}"; do targets+=("fuzz_${t}_replay"); done
cmake --build "$build" -j "${GPT2FT_BUILD_JOBS:-$(nproc)}" --target "${targets[@]}"

# libtorch is not instrumented and keeps allocations until exit: no leak checking. Every
# report is fatal.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
golden="$root/$build/test-data/golden"
echo "[sanitize] reference data"
.venv/bin/python tests/python/make_golden.py "$golden" > /dev/null
.venv/bin/python tests/python/make_scaler_golden.py "$golden/scaler.json" > /dev/null
(cd tests/python && ../../.venv/bin/python make_lora_golden.py "$golden" > /dev/null)
.venv/bin/python tests/python/make_adamw8bit_golden.py "$golden/adamw8bit.safetensors" > /dev/null
.venv/bin/python tests/python/make_dpo_golden.py "$golden/dpo.safetensors" > /dev/null

echo "[sanitize] C++ tests (no second process, no GPU)"
GPT2FT_GOLDEN_DIR="$golden" GPT2FT_ROUNDTRIP_DIR="$root/$build/test-data/roundtrip" "$build/tests/gpt2ft_tests" --gtest_brief=1 \
  --gtest_filter='-Distributed*:Cuda*:*CudaParity*:LinearCrossEntropyCuda*'
echo "[sanitize] fuzz corpus"
for t in "${fuzz_targets[@]}"; do
  "$build/tests/fuzz_${t}_replay" "tests/fuzz/corpus/$t"
done
echo "[sanitize] command line: bad inputs, damaged checkpoints, the perimeter's hostile inputs"
(cd tests/python && GPT2FT_BIN="$root/$build/gpt2-finetune" GPT2FT_GOLDEN_DIR="$golden" \
  ../../.venv/bin/python -m unittest -q test_cli.CliTest.test_bad_input_gives_a_clear_error_and_a_plain_exit \
  test_resilience.ResilienceTest.test_damaged_or_mismatched_checkpoints_are_clear_errors \
  test_perimeter.PerimeterTest.test_no_user_file_is_overwritten_or_deleted \
  test_perimeter.PerimeterTest.test_non_finite_values_are_stopped \
  test_perimeter.PerimeterTest.test_adapters_are_applied_whole_or_refused \
  test_perimeter.PerimeterTest.test_flags_have_ranges_and_files_must_be_regular \
  test_perimeter.PerimeterTest.test_two_processes_never_write_one_folder \
  test_perimeter4.Perimeter4Test.test_a_resumed_optimizer_state_has_its_exact_dtypes_ranges_and_step_counts \
  test_perimeter4.Perimeter4Test.test_values_out_of_range_are_refused_with_their_range \
  test_instruction.InstructionTest.test_malformed_lines_are_errors_naming_file_line_and_field_or_skipped_and_counted \
  test_instruction.InstructionTest.test_damaged_shards_and_impossible_settings_are_clear_errors)
echo "[sanitize] clean"
