#!/usr/bin/env bash
# Everything a session with the GPU machine should run, in one device call of at most 9
# minutes on a bare machine (see ../shared/device/README.md). Prepare on the dev machine:
#   bash scripts/device/prepare.sh        # .devkit (Debian packages) + .devbin (binaries built here)
# then one device call with carry [".devkit", ".devbin"] and timeout_s 560:
#   bash scripts/device/gpu-check.sh
#
# Binaries: the ones built here are tried first (the device machine's torch is the same
# version; its torch/lib and the kit's libraries go on LD_LIBRARY_PATH). Only when one of them
# does not load (ldd finds a library missing, or it does not start) is the project built there,
# which costs 3-4 minutes. The summary says which path was taken.
#
# Parts, most wanted first, each with its own time limit (seconds on an H100/H200 machine):
#   gpu tests     each `gpu` test group in its own process, as ctest runs them, each under its
#                 own limit (300 in all, make_golden.py included), the trainer's last: CUDA setup 20 (the allocator before the first
#                 tensor, expandable segments and pinned memory one step each way), parity with
#                 transformers 30, NCCL with one rank 25, the chunked loss 25, packed documents
#                 and 8-bit AdamW 45 (against the CPU; varlen against the mask; the SDPA kernel
#                 each call picks in bf16/fp16/fp32 with and without dropout; PyTorch issue
#                 196678's pattern at T=704 and 1024, cuDNN alone against our path; evaluation
#                 of document shards), training 135 (fp16 scaler, bf16, fused AdamW,
#                 checkpointing with dropout, offload during backward, DPO with each reference
#                 in bf16 and fp16, the planner against measured peaks of gpt2 at micro 1/8/32)
#   attention     45  instruction_bench on CUDA: packed documents (mask and varlen) against
#                     plain text, T=1024, bf16 and fp32, every loss finite
#   bench        100  gpt2 T=1024 bf16 micro 8: ours, ours with the eager loss, PyTorch
#                     eager, HF Trainer (no model is saved, 3 warm-up + 10 timed steps)
#   plan          35  plan --measure, gpt2-medium at micro 1 and 8 (no model saved)
#   optim         25  the optimizer step for gpt2-xl's shapes: 8-bit AdamW (ATen ops) against
#                     AdamW unfused and fused (bench_optimizer, medians of 5)
#   offload     rest  gpt2-xl T=1024 bf16 micro 4 x 4, as configured and with plan's levers
#                     under a 24 GiB cuda.memory_limit (1 warm-up + 2 timed steps each); run
#                     only with at least 90 s left (a dry run, which counts every limit as
#                     spent, leaves it 35 s: not run)
# GPT2FT_GPU_PARTS (default "tests attention bench plan optim offload") picks parts, in that
# order. A part that the budget does not reach is listed as not run. At most 8 files come back
# from $OUT; this writes 7: setup.log (nvidia-smi, which binaries, the build if one ran),
# gpu-tests.log, attention.log, bench.log, measure.log (plan and optim), offload.log and
# summary.txt (every part's figures; also printed last). Benchmark JSON stays outside $OUT.
# GPT2FT_GPU_BUDGET_S (default 540) is the whole script's budget, GPT2FT_GPU_BUILD_S (default
# 330) the build's, if one is needed. GPT2FT_GPU_DRY_RUN=1 runs nothing on a GPU: each part
# logs the command it would run and its planned seconds, and the files are written as for real
# (tests/python/test_device_check.py counts them).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: every part runs from another folder
py="${PYTHON:-python3}"
budget="${GPT2FT_GPU_BUDGET_S:-540}"
dry="${GPT2FT_GPU_DRY_RUN:-0}"
start=$(date +%s)
summary=()
planned=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Seconds left of the budget; a dry run counts each part's limit as spent.
left() {
  if [[ $dry == 1 ]]; then echo $((budget - planned)); else echo $((budget - ($(date +%s) - start))); fi
}
# part NAME LIMIT_S LOG COMMAND...: runs COMMAND (a program or one of the functions below,
# exported) with its output in LOG, within LIMIT_S seconds or what is left of the budget,
# whichever is less; records exit code and time.
part() {
  local name=$1 limit=$2 log=$3
  shift 3
  local avail
  avail=$(left)
  ((avail < limit)) && limit=$avail
  if ((limit <= 5)); then
    summary+=("| $name | not run (budget spent) | - |")
    echo "[gpu-check] $name: not run (budget spent)"
    return 1
  fi
  local t0 rc
  t0=$(date +%s)
  planned=$((planned + limit))
  if [[ $dry == 1 ]]; then
    echo "dry run: $name, ${limit}s: $*" >> "$log"
    rc=0
  else
    echo "=== part $name (limit ${limit}s)" >> "$log"
    timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >> "$log" 2>&1
    rc=$?
  fi
  local took=$(($(date +%s) - t0))
  local what="exit $rc"
  [[ $dry == 1 ]] && what="dry run"
  ((rc == 124 || rc == 137)) && what="timed out after ${limit}s"
  summary+=("| $name | $what | ${took}s of ${limit}s |")
  echo "[gpu-check] $name: $what in ${took}s (log: $(basename "$log"))"
  return $rc
}

# The kit's libraries and the machine's torch/lib, for the loader and for CMake.
if [[ -d .devkit ]]; then eval "$(bash .devkit/install-kit.sh .devkit)"; fi
# The wheel's CUDA runtime (libcudart.so.13 and friends) lives beside torch in nvidia/cu13/lib;
# the binaries built here found it through /usr/local/cuda, which that machine may not have.
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
cuda_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "lib"))' 2>/dev/null)"
export LD_LIBRARY_PATH="${torch_lib}${cuda_lib:+:$cuda_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Prebuilt binaries usable here? Every library found and both start.
prebuilt_ok() {
  [[ -x .devbin/gpt2-finetune && -f .devbin/libgpt2ft_cli.so && -x .devbin/gpt2ft_tests ]] ||
    { echo "no .devbin (run scripts/device/prepare.sh)"; return 1; }
  local missing
  missing="$(ldd .devbin/gpt2-finetune .devbin/libgpt2ft_cli.so .devbin/gpt2ft_tests | grep 'not found' | sort -u)"
  if [[ -n $missing ]]; then echo "missing libraries:"; echo "$missing"; return 1; fi
  .devbin/gpt2-finetune --help > /dev/null || return 1
  .devbin/gpt2ft_tests --gtest_list_tests --gtest_filter='CudaSetup.*' || return 1
  echo "prebuilt binaries from $(cat .devbin/commit.txt 2>/dev/null) load"
}
configure_and_build() {
  local prefix
  prefix="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return 1
  local nvcc  # our own kernels need it (8-bit AdamW's step); the gpu tests check they were built
  nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGPT2FT_USE_CCACHE=OFF \
    -DCMAKE_PREFIX_PATH="$prefix;${CMAKE_PREFIX_PATH:-}" -DGPT2FT_PYTHON="$(command -v "$py")" \
    -DCMAKE_CUDA_COMPILER="$nvcc" || return 1
  cmake --build "$build" -j "$(nproc)" --target gpt2-finetune gpt2ft_cli gpt2ft_tests bench_optimizer
}
# The gpu-labelled ctest entries, run straight from the test binary (ctest's files hold the
# build machine's paths): one process each, most wanted first, each under its own limit, so
# CudaSetup runs before any CUDA tensor exists and a hang costs one group, not the part.
gpu_group() {
  local name=$1 filter=$2 limit=$3
  echo "=== gpu.$name ($filter, limit ${limit}s)"
  # --foreground: this timeout stays in the part's process group, so the part's own limit
  # kills it and the test binary with it (without, it would outlive the part).
  GPT2FT_GOLDEN_DIR="$golden" timeout --foreground --kill-after=5 "$limit" "$tests_bin" --gtest_filter="$filter" \
    --gtest_brief=0
  local r=$?
  ((r == 124 || r == 137)) && echo "gpu.$name: timed out after ${limit}s"
  echo "=== gpu.$name: exit $r"
  return $r
}
gpu_tests() {
  local rc=0
  golden="$(mktemp -d)"
  export golden
  "$py" tests/python/make_golden.py "$golden" > /dev/null || { echo "golden data failed"; return 1; }
  gpu_group setup "CudaSetup.*" 20 || rc=1
  gpu_group parity "Shapes/CudaParity.*" 30 || rc=1
  gpu_group nccl "DistributedCuda.*" 25 || rc=1
  gpu_group linear_cross_entropy "LinearCrossEntropyCuda.*" 25 || rc=1
  gpu_group packed "CudaPacked.*" 45 || rc=1
  gpu_group training "CudaTraining.*" 135 || rc=1
  return $rc
}
plan_measure() {
  local cfg
  cfg="$(mktemp --suffix=.json)"
  printf '%s\n' '{"model": {"preset": "gpt2-medium", "dropout": 0.0}, "data": {"train": "'"$1"'", "seq_len": 1024},' \
    '"train": {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 8}, "amp": {"dtype": "bfloat16"},' \
    '"device": "cuda"}' > "$cfg"
  for micro in 1 8; do
    "$bin_dir/gpt2-finetune" plan --config "$cfg" --measure --set "train.micro_batch_size=$micro" \
      --set "train.global_batch_size=$micro" || return 1
  done
}

setup_log="$out/setup.log"
{ echo "=== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi failed"; echo "=== binaries"; } > "$setup_log"
build_path=""
if [[ $dry == 1 ]]; then
  bin_dir="$root/.devbin"
  tests_bin="$bin_dir/gpt2ft_tests"
  build_path="dry run: none checked"
elif prebuilt_ok >> "$setup_log" 2>&1; then
  bin_dir="$root/.devbin"
  tests_bin="$bin_dir/gpt2ft_tests"
  build_path="prebuilt binaries ($(head -n 1 .devbin/commit.txt | head -c 12))"
  summary+=("| binaries | prebuilt, loaded | 0s |")
else
  tail -n 20 "$setup_log"
  build="${GPT2FT_GPU_BUILD_DIR:-$root/build-gpu}"
  export build
  bin_dir="$build"
  tests_bin="$build/tests/gpt2ft_tests"
  build_path="built on the device machine (prebuilt did not load: see setup.log)"
  export py
  export -f configure_and_build
  echo "=== build" >> "$setup_log"
  if ! part build "${GPT2FT_GPU_BUILD_S:-330}" "$setup_log" configure_and_build; then
    tail -n 30 "$setup_log"
    bin_dir=""
    build_path="none: prebuilt did not load and the build failed (setup.log); nothing else ran"
  fi
fi
echo "[gpu-check] binaries: $build_path"

if [[ -n $bin_dir ]]; then
  export root out py bin_dir tests_bin
  export -f gpu_group gpu_tests plan_measure
  parts=" ${GPT2FT_GPU_PARTS:-tests attention bench plan optim offload} "
  scratch="$(mktemp -d)"  # benchmark JSON: outside $OUT, the logs print every row
  shard="$(mktemp -d)/train_000000.bin"
  [[ $dry == 1 ]] || "$py" -c "
import numpy as np, sys
h = np.zeros(256, np.int32); h[:3] = (20240520, 1, 40 * 1025)
t = (np.arange(40 * 1025, dtype=np.int64) * 2654435761 % 50257).astype(np.uint16)
open(sys.argv[1], 'wb').write(h.tobytes() + t.tobytes())" "$shard"
  for p in $parts; do
    case $p in
      tests) part "gpu tests" 300 "$out/gpu-tests.log" gpu_tests ;;
      attention) GPT2FT_BUILD_DIR="$bin_dir" part "packed documents vs plain text, T=1024" 45 "$out/attention.log" \
                   "$py" scripts/bench/instruction_bench.py --device cuda --seq-len 1024 --micro 8 --warmup 2 \
                   --steps 6 --repeats 1 --dtypes bf16 fp32 --attention mask varlen ;;
      bench) GPT2FT_BUILD_DIR="$bin_dir" part "bench gpt2 vs HF Trainer and eager" 100 "$out/bench.log" \
               "$py" scripts/bench/train_bench.py --mode gpu --preset gpt2 --dtype bf16 --micro 8 --also-eager-loss \
               --warmup 3 --steps 10 --out "$scratch/bench-train-gpu.json" ;;
      plan) part "plan --measure gpt2-medium" 35 "$out/measure.log" plan_measure "$shard" ;;
      optim) part "8-bit AdamW step vs AdamW, gpt2-xl shapes" 25 "$out/measure.log" \
               "$bin_dir/bench_optimizer" cuda 1600 48 50257 5 ;;
      offload)  # gpt2-xl's start alone takes a minute: with less left it would only be killed
        if (($(left) < 90)); then
          summary+=("| offload gpt2-xl | not run ($(left)s left, it needs 90s) | - |")
          echo "[gpu-check] offload gpt2-xl: not run ($(left)s left, it needs 90s)"
        else
          GPT2FT_BUILD_DIR="$bin_dir" part "offload gpt2-xl" "$(left)" "$out/offload.log" \
            "$py" scripts/bench/offload_bench.py --mode gpu --runs configured,levers --warmup 1 --steps 2 \
            --out "$scratch/offload.json"  # offload.log has it all
        fi ;;
      *) echo "[gpu-check] unknown part $p" ;;
    esac
  done
fi

{
  echo "## GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(grep -oE 'NVIDIA [A-Z0-9]+[^|]*' "$setup_log" | head -n 1)"
  echo
  echo "binaries: $build_path"
  echo
  echo "| part | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo "| total | | $(($(date +%s) - start))s (planned at most ${planned}s) |"
  echo
  echo "### gpu tests"
  grep -E "^=== gpu\..*exit|timed out|^\[  PASSED  \] [0-9]|^\[  SKIPPED \] [0-9]|^\[  FAILED  \] [A-Z]" "$out/gpu-tests.log" 2>/dev/null ||
    echo "(none ran)"
  grep -hE "^\[(cuda|cuda setup|planner|cuda packed|cuda attention|cuda 8-bit|cuda eval)" "$out/gpu-tests.log" 2>/dev/null
  echo
  echo "### packed documents vs plain text (attention)"
  grep -hE "^(bf16|fp32):|attention on|non-finite" "$out/attention.log" 2>/dev/null || echo "(none)"
  echo
  echo "### benchmark"
  grep -q '^| dtype' "$out/bench.log" 2>/dev/null && sed -n '/^| dtype/,$p' "$out/bench.log" || echo "(none)"
  echo
  echo "### planner vs measured (plan --measure)"
  grep -hE "measured peak allocated" "$out/measure.log" 2>/dev/null || echo "(none)"
  echo
  echo "### optimizer step, gpt2-xl shapes (optim)"
  grep -hiE "median|ratio|adamw" "$out/measure.log" 2>/dev/null | grep -v "^dry run" || echo "(none)"
  echo
  echo "### offload (gpt2-xl)"
  grep -q '^GPU:' "$out/offload.log" 2>/dev/null && sed -n '/^GPU:/,$p' "$out/offload.log" || echo "(none)"
  echo
  echo "### process-group shutdown warnings (must be none)"
  grep -h "has NOT been destroyed\|destroy_process_group" "$out"/*.log 2>/dev/null || echo "none"
} > "$out/summary.txt"
cat "$out/summary.txt"
