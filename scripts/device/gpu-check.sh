#!/usr/bin/env bash
# Everything a session with the GPU machine should run, in one device call (see
# ../shared/device/README.md). Prepare once on the dev machine:
#   bash ../shared/device/make-kit.sh .devkit libgloo-dev && cp ../shared/device/install-kit.sh .devkit/
# then run this with carry [".devkit"]. Logs and JSON land in $OUT (default ./gpu-out):
#   build.log, ctest-gpu.log (ctest -L gpu), plan-measure.log (planner vs measured peak),
#   bench-train-gpu.json / bench.log (ours vs PyTorch eager vs HF Trainer, with the eager loss).
# GPT2FT_GPU_QUICK=1 runs micro 8 only.
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
eval "$(bash .devkit/install-kit.sh .devkit)"
py="${PYTHON:-python3}"
prefix="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DGPT2FT_USE_CCACHE=OFF \
  -DCMAKE_PREFIX_PATH="$prefix;${CMAKE_PREFIX_PATH:-}" -DGPT2FT_PYTHON="$(command -v "$py")" > "$out/configure.log" 2>&1 \
  || { tail -n 40 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" > "$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
(cd build-gpu && ctest -L gpu --output-on-failure > "../$out/ctest-gpu.log" 2>&1)
tail -n 15 "$out/ctest-gpu.log"
micro=(8 16 32)
[[ "${GPT2FT_GPU_QUICK:-0}" == 1 ]] && micro=(8)
GPT2FT_BUILD_DIR=build-gpu "$py" scripts/bench/train_bench.py --mode gpu --preset gpt2 --dtype bf16 \
  --micro "${micro[@]}" --also-eager-loss --steps 20 --out "$out/bench-train-gpu.json" > "$out/bench.log" 2>&1
tail -n 12 "$out/bench.log"
