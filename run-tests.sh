#!/usr/bin/env bash
# The whole test suite, as CI runs it: layering contract, lint, the pytest suite (real MPI
# validators, real HDF5, the real local model), then the MPI tests under mpiexec.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup-venv.sh
export GONKA_HOME=${GONKA_HOME:-$HOME/.cache/gonka-hpc}
.venv/bin/lint-imports
.venv/bin/ruff check .
.venv/bin/python -m pytest -ra -m "not mpi" "$@"
.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -m mpi -q -p no:cacheprovider tests/
