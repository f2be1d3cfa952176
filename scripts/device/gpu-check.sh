#!/usr/bin/env bash
# Everything a session with the GPU machine should run, in one device call of at most 9
# minutes on a bare machine (see ../shared/device/README.md). Prepare once on the dev machine:
#   bash ../shared/device/make-kit.sh .devkit libgloo-dev && cp ../shared/device/install-kit.sh .devkit/
#   echo /.devkit/ >> .git/info/exclude
# then run it with carry [".devkit"] and timeout_s 560:
#   bash scripts/device/gpu-check.sh
# Parts, with the time each is expected to take on an H100/H200 machine (16 cores):
#   kit + configure      ~30 s
#   build                ~3-4 min (only gpt2-finetune and the C++ tests, all cores)
#   ctest -L gpu         ~2 min   (CUDA parity, fp16/bf16 training, fused AdamW, the planner
#                                  against measured peaks of gpt2 at micro 1/8/32, NCCL, the
#                                  chunked loss on CUDA; the golden data comes first)
#   offload              ~2-3 min (gpt2-xl T=1024 bf16 micro 4 x 4: as configured, checkpointing
#                                  all, and plan's levers for a 24 GiB cap under cuda.memory_limit;
#                                  the host AdamW step for 1.56B parameters on all cores)
#   plan --measure       ~40 s    (gpt2-medium, micro 1 and 8)
#   benchmark            ~1-2 min (gpt2 T=1024 bf16 micro 8: ours, ours with the eager loss,
#                                  PyTorch eager, HF Trainer)
# That is more than one call's 9 minutes on a bare machine: GPT2FT_GPU_PARTS (default "ctest
# offload plan bench") picks the parts after the build, in that order. Every part has its own
# time limit, so the script ends within its budget and still prints the summary (a part the
# budget did not reach says so). The 8 files under $OUT (at most 8 come back): build.log,
# nvidia-smi.txt, ctest-gpu.log, offload.log, plan.log, bench.log, bench-train-gpu.json,
# summary.txt (also printed last).
# GPT2FT_GPU_BUDGET_S (default 540) is the whole script's budget, GPT2FT_GPU_BUILD_S (default 330) the
# build's (a dry run on the 2-core dev machine needs more: the rest then reports no CUDA).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: every part runs from another folder
py="${PYTHON:-python3}"
build="${GPT2FT_GPU_BUILD_DIR:-$root/build-gpu}"
budget="${GPT2FT_GPU_BUDGET_S:-540}"
start=$(date +%s)
summary=()

left() { echo $((budget - ($(date +%s) - start))); }
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
    return 1
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >> "$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  local what="exit $rc"
  ((rc == 124 || rc == 137)) && what="timed out after ${limit}s"
  summary+=("| $name | $what | ${took}s |")
  echo "[gpu-check] $name: $what in ${took}s (log: $(basename "$log"))"
  return $rc
}

configure_and_build() {
  if [[ -d .devkit ]]; then
    eval "$(bash .devkit/install-kit.sh .devkit)" || return 1
  fi
  local prefix
  prefix="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return 1
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGPT2FT_USE_CCACHE=OFF \
    -DCMAKE_PREFIX_PATH="$prefix;${CMAKE_PREFIX_PATH:-}" -DGPT2FT_PYTHON="$(command -v "$py")" || return 1
  cmake --build "$build" -j "$(nproc)" --target gpt2-finetune gpt2ft_tests
}

export root out py build
export -f configure_and_build
# The kit's libraries must be found at run time too.
if [[ -d .devkit ]]; then eval "$(bash .devkit/install-kit.sh .devkit)"; fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$out/nvidia-smi.txt"
if ! part build "${GPT2FT_GPU_BUILD_S:-330}" "$out/build.log" configure_and_build; then
  tail -n 30 "$out/build.log"
else
  parts=" ${GPT2FT_GPU_PARTS:-ctest offload plan bench} "
  if [[ $parts == *" ctest "* ]]; then
    part "ctest -L gpu" 200 "$out/ctest-gpu.log" \
      bash -c "cd '$build' && ctest -L gpu --output-on-failure --timeout 180"
  fi
  if [[ $parts == *" offload "* ]]; then
    GPT2FT_BUILD_DIR="$build" part "offload gpt2-xl" 200 "$out/offload.log" \
      "$py" scripts/bench/offload_bench.py --mode gpu --out "$(mktemp --suffix=.json)"  # offload.log has it all
  fi
  # gpt2-medium: the planner against one measured run per micro batch.
  plan_measure() {
    local cfg
    cfg="$(mktemp --suffix=.json)"
    printf '%s\n' '{"model": {"preset": "gpt2-medium", "dropout": 0.0}, "data": {"train": "'"$1"'", "seq_len": 1024},' \
      '"train": {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 8}, "amp": {"dtype": "bfloat16"},' \
      '"device": "cuda"}' > "$cfg"
    for micro in 1 8; do
      "$build/gpt2-finetune" plan --config "$cfg" --measure --set "train.micro_batch_size=$micro" \
        --set "train.global_batch_size=$micro" || return 1
    done
  }
  export -f plan_measure
  shard="$(mktemp -d)/train_000000.bin"
  "$py" -c "
import numpy as np, sys
h = np.zeros(256, np.int32); h[:3] = (20240520, 1, 40 * 1025)
t = (np.arange(40 * 1025, dtype=np.int64) * 2654435761 % 50257).astype(np.uint16)
open(sys.argv[1], 'wb').write(h.tobytes() + t.tobytes())" "$shard"
  if [[ $parts == *" plan "* ]]; then
    part "plan --measure gpt2-medium" 90 "$out/plan.log" plan_measure "$shard"
  fi
  if [[ $parts == *" bench "* ]]; then
    GPT2FT_BUILD_DIR="$build" part benchmark 150 "$out/bench.log" \
      "$py" scripts/bench/train_bench.py --mode gpu --preset gpt2 --dtype bf16 --micro 8 --also-eager-loss \
      --warmup 3 --steps 12 --out "$out/bench-train-gpu.json"
  fi
fi

{
  echo "## GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(head -n 12 "$out/nvidia-smi.txt" | grep -oE 'NVIDIA [A-Z0-9]+[^|]*' | head -n 1)"
  echo
  echo "| part | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo "| total | | $(($(date +%s) - start))s |"
  echo
  echo "### gpu tests"
  grep -E "^ *[0-9]+/[0-9]+ Test|tests passed|\*\*\*" "$out/ctest-gpu.log" 2>/dev/null || echo "(none ran)"
  echo
  echo "### planner vs measured"
  grep -hE "^\[planner\]|measured peak allocated" "$out/ctest-gpu.log" "$out/plan.log" 2>/dev/null || echo "(none)"
  echo
  echo "### offload (gpt2-xl)"
  sed -n '/^GPU:/,$p' "$out/offload.log" 2>/dev/null || echo "(none)"
  echo
  echo "### benchmark"
  sed -n '/^| dtype/,$p' "$out/bench.log" 2>/dev/null || echo "(none)"
  echo
  echo "### process-group shutdown warnings (must be none)"
  grep -h "has NOT been destroyed\|destroy_process_group" "$out"/*.log 2>/dev/null || echo "none"
} > "$out/summary.txt"
cat "$out/summary.txt"
