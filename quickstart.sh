#!/usr/bin/env bash
# From a fresh clone: set up .venv, build the local model (cached), run one epoch of the
# quickstart network on this machine. Extra arguments go to `gonka-hpc run`
# (e.g. ./quickstart.sh --cheater dc-c).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup-venv.sh
exec .venv/bin/gonka-hpc run jobs/quickstart.jsonl "$@"
