#!/usr/bin/env bash
# The whole test suite, as CI runs it: layering contract, lint, the pytest suite (real MPI
# validators, real HDF5, the real local model, the real local Slurm, real vLLM on CPU), then the
# MPI tests under mpiexec. The local Slurm (slurm/dev_cluster.sh) is started first and stopped
# at exit if this script started it; without Slurm's Debian packages it fails, naming the
# apt-get line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup-venv.sh
# vLLM's CPU build, so the vLLM engine's tests run for real (about 2 minutes and 2 GB once)
scripts/setup-vllm.sh
export GONKA_REQUIRE_VLLM=1
export GONKA_HOME=${GONKA_HOME:-$HOME/.cache/gonka-hpc}
.venv/bin/lint-imports
.venv/bin/ruff check .
if ! slurm/dev_cluster.sh status >/dev/null 2>&1; then
  slurm/dev_cluster.sh start
  trap 'slurm/dev_cluster.sh stop' EXIT
fi
eval "$(slurm/dev_cluster.sh env)"
.venv/bin/python -m pytest -ra -m "not mpi" "$@"
.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -m mpi -q -p no:cacheprovider tests/
