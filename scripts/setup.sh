#!/usr/bin/env bash
# Installs everything the project needs and builds it into build/. Idempotent: when nothing
# changed it only runs an incremental build (seconds).
#   scripts/setup.sh [TARGET...]   build only these (quickstart.sh: gpt2-finetune); default all
#   GPT2FT_SKIP_APT=1    skip the Debian package step (e.g. no root)
#   GPT2FT_BUILD_DIR     build folder (default build)
# On a fresh machine the steps overlap where they can: torch's download starts beside the
# Debian packages when Python can already make a venv, and the Python references (everything
# but torch: tests and benchmarks only) install while the C++ builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build_dir="${GPT2FT_BUILD_DIR:-build}"

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: compilers' helpers and the C++ libraries (libgloo-dev: the headers
#    c10d's ProcessGroupGloo.hpp includes, which the torch wheel leaves out). Then, for the
#    Slurm tests only, slurm-wlm and munge: if they cannot be installed, those tests report
#    skipped with the reason and the rest of the project is unaffected.
apt_packages=(cmake ninja-build ccache pkg-config g++ python3-venv
  libsentencepiece-dev nlohmann-json3-dev libcli11-dev libspdlog-dev
  libgtest-dev libgmock-dev libpcre2-dev libgloo-dev)
test_packages=(slurm-wlm munge)
missing_of() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
targets=("$@")

# 2a. The project venv and torch (libtorch is what the build needs), started first: in the
#     background beside the Debian packages when this Python has venv and ensurepip already.
python_bin="${PYTHON:-python3}"
req="scripts/requirements.txt"
stamp=".venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
torch_pin="$(grep -E '^torch==' "$req")"
python_packages_current() { [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; }
install_torch() {
  if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    "$python_bin" -m venv .venv
  fi
  if ! python_packages_current; then
    log "installing $torch_pin into .venv (large: a few minutes the first time)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "$torch_pin"
  fi
}
torch_pid=""
if "$python_bin" -c 'import venv, ensurepip' 2>/dev/null; then
  install_torch &
  torch_pid=$!
fi

if [[ "${GPT2FT_SKIP_APT:-0}" != 1 ]]; then
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  mapfile -t missing < <(missing_of "${apt_packages[@]}")
  mapfile -t missing_tests < <(missing_of "${test_packages[@]}")
  if ((${#missing[@]} + ${#missing_tests[@]})); then
    "${sudo_cmd[@]}" apt-get update -qq
  fi
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#missing_tests[@]})); then
    log "installing Debian packages for the Slurm tests: ${missing_tests[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
      "${missing_tests[@]}" >/dev/null || log "could not install ${missing_tests[*]}: the Slurm tests will skip"
  fi
fi

# 2b. torch, if Python needed the Debian packages first (python3-venv); then the rest of the
#     requirements in the background while the C++ configures and builds.
if [[ -n $torch_pid ]]; then
  wait "$torch_pid" || { log "installing torch failed"; exit 1; }
else
  install_torch
fi
rest_pid=""
rest_log=".venv/pip-requirements.log"
trap '[[ -n $rest_pid ]] && kill "$rest_pid" 2>/dev/null || true' EXIT  # a failed build stops it too
if ! python_packages_current; then
  log "installing the rest of $req in the background (log: $rest_log)"
  .venv/bin/python -m pip install -q -r "$req" > "$rest_log" 2>&1 &
  rest_pid=$!
fi

# 3. Configure and build.
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  torch_prefix="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  log "configuring $build_dir"
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DCUDAToolkit_ROOT=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    -DPython3_EXECUTABLE="$root/.venv/bin/python" >/dev/null
fi
jobs="${GPT2FT_BUILD_JOBS:-$(nproc)}"
log "building $build_dir ($jobs jobs)${targets[*]:+: ${targets[*]}}"
cmake --build "$build_dir" -j "$jobs" ${targets[@]:+--target "${targets[@]}"}

if [[ -n $rest_pid ]]; then
  if ! wait "$rest_pid"; then
    log "installing $req failed:"
    cat "$rest_log"
    exit 1
  fi
  echo "$want" > "$stamp"
fi
