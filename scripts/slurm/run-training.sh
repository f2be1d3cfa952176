#!/usr/bin/env bash
# The body of the sbatch scripts: one srun task per GPU, and what to do with the exit code.
#   run-training.sh CONFIG [--set key=value ...]
# Exit codes of gpt2-finetune (README: "Exit codes"):
#   0   done
#   75  out of GPU memory; a checkpoint was saved with a smaller micro batch: requeue the job,
#       passing that micro batch explicitly with --set (the global batch is unchanged)
#   76  stopped by a signal (Slurm's --signal=USR1@120 before the time limit, preemption)
#       or train.time_limit; a checkpoint was saved: requeue the job
#   77  out of GPU memory even at the smallest micro batch: a rerun would fail the same way, so
#       the job is not requeued; the log says what would make it fit (gpt2-finetune plan)
# A requeued job starts this script again; checkpoint.resume "auto" continues at the exact
# next sample. GPT2FT_MAX_REQUEUES (default 20) bounds the loop.
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above is the help
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
root="${GPT2FT_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}"
bin="${GPT2FT_BIN:-$root/build/gpt2-finetune}"
config="${1:?usage: run-training.sh CONFIG [--set key=value ...]}"
shift
restarts="${SLURM_RESTART_COUNT:-0}"
max_requeues="${GPT2FT_MAX_REQUEUES:-20}"
log() { printf '[slurm job %s, start %s] %s\n' "${SLURM_JOB_ID:-?}" "$restarts" "$*"; }

# The run folder, from the resolved config (defaults and --set applied).
out_dir="$("$bin" train --config "$config" "$@" --print-config | sed -n 's/^  "output_dir": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "$out_dir" ]] || { log "could not resolve output_dir from $config"; exit 1; }
[[ "$out_dir" = /* ]] || out_dir="$PWD/$out_dir"

# After an out-of-memory exit the latest checkpoint records the smaller micro batch.
extra=()
latest="$out_dir/checkpoints/latest"
if [[ -f "$latest" ]]; then
  state="$out_dir/checkpoints/$(tr -d '[:space:]' < "$latest")/trainer_state.json"
  if grep -q '"micro_batch_from_oom": true' "$state" 2>/dev/null; then
    micro="$(sed -n 's/^  "micro_batch": \([0-9]*\),$/\1/p' "$state")"
    log "the last attempt ran out of memory: continuing with train.micro_batch_size=$micro (same global batch)"
    extra+=(--set "train.micro_batch_size=$micro")
  fi
fi

# Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without it each rank gets
# one CPU and the data loader's workers starve.
cpus=()
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
log "srun: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST${cpus:+, ${SLURM_CPUS_PER_TASK} CPUs each}, run folder $out_dir"
srun --kill-on-bad-exit=1 "${cpus[@]}" "$bin" train --config "$config" "$@" "${extra[@]}"
rc=$?
case "$rc" in
  0) log "training finished" ;;
  75 | 76)
    why=$([[ $rc == 75 ]] && echo "out of memory" || echo "stopped by a signal or the time limit")
    if ((restarts >= max_requeues)); then
      log "$why (exit $rc), but the job was already requeued $restarts times (GPT2FT_MAX_REQUEUES); giving up"
      exit "$rc"
    fi
    log "$why (exit $rc): checkpoint saved; requeueing the job"
    # slurmctld can refuse a requeue while it is still closing the step: retry a few times.
    for attempt in 1 2 3 4 5; do
      scontrol requeue "$SLURM_JOB_ID" && exit 0
      log "scontrol requeue failed (attempt $attempt of 5)"
      sleep 3
    done
    exit "$rc"
    ;;
  77) log "out of memory even at the smallest micro batch (exit 77): not requeueing; see the advice above"; exit "$rc" ;;
  *) log "gpt2-finetune failed (exit $rc); not requeueing"; exit "$rc" ;;
esac
