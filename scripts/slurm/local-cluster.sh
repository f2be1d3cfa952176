#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and for trying the sbatch scripts:
#   scripts/slurm/local-cluster.sh start DIR   # munged + slurmctld + slurmd; prints SLURM_CONF=...
#   scripts/slurm/local-cluster.sh stop DIR
# Needs Debian's slurm-wlm and munge (scripts/setup.sh installs them) and root, because
# slurmd launches tasks as the submitting user. The node advertises two generic "gpu"
# resources without devices, so the GPU sbatch scripts can be submitted unchanged; the jobs
# train on the CPU. Everything lives under DIR; nothing in /etc is changed.
set -euo pipefail
cmd="${1:?usage: local-cluster.sh start|stop DIR}"
dir="$(mkdir -p "${2:?usage: local-cluster.sh start|stop DIR}" && cd "$2" && pwd)"
conf="$dir/slurm.conf"

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
}

if [[ "$cmd" == stop ]]; then
  stop
  exit 0
fi
[[ "$cmd" == start ]] || { echo "local-cluster.sh: unknown command $cmd (start|stop)" >&2; exit 2; }

for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "local-cluster.sh: $tool not installed (run scripts/setup.sh)" >&2; exit 3; }
done
[[ $(id -u) -eq 0 ]] || { echo "local-cluster.sh: must run as root (slurmd starts jobs as their user)" >&2; exit 3; }

node="$(hostname -s)"
cpus="$(nproc)"
port_base="${GPT2FT_SLURM_PORT:-6817}"
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
# munge: a key of this cluster's own and a socket under DIR.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=128 status=none
chmod 600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

cat > "$conf" <<CONF
ClusterName=gpt2ft-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port_base
SlurmdPort=$((port_base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MessageTimeout=30
KillWait=10
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
# Slurm drops GPUs without device files; two empty files stand in for them.
mkdir -p "$dir/dev"
touch "$dir/dev/gpu0" "$dir/dev/gpu1"
echo "NodeName=$node Name=gpu File=$dir/dev/gpu[0-1]" > "$dir/gres.conf"

export SLURM_CONF="$conf"
slurmctld -f "$conf" -i
slurmd -f "$conf"
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "local-cluster.sh: the node did not become idle; logs under $dir" >&2
sinfo 2>&1 >&2 || true
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop
exit 4
