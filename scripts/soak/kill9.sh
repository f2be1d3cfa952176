#!/usr/bin/env bash
# kill -9 soak of a training run with checkpoints every step: scripts/soak/kill9.sh N
# (N SIGKILLs at random moments, each followed by a resume; see kill9.py). Exit 0 only when
# every resume worked and every completed round equals an uninterrupted run bitwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "$root/.venv/bin/python" "$root/scripts/soak/kill9.py" "$@"
