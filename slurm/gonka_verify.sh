#!/usr/bin/env bash
# gonka-hpc verifiers as a Slurm job array: task i of N re-scores committed artifact batches
# i, i+N, i+2N, ... of the epoch (sorted by job and shard id), each with the key of the
# verifier the ledger assigned to it, and posts the signed verdicts to the validators' inbox.
# Which inferences are re-scored is drawn from the batch's commit block and the executor's
# reputation (100% for a new participant); see docs/verification.md.
#
#SBATCH --job-name=gonka-verify
#SBATCH --array=0-0                    # verifier tasks; override: sbatch --array=0-3
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=1
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out     # relative to the submit dir; logs/ must exist
##SBATCH --gres=gpu:1                  # GPU sites: re-scoring is one prefill per inference
#
# Settings (environment; sbatch passes the submitter's environment by default):
#   GONKA_EPOCH_DIR    the epoch dir written by `gonka-hpc epoch schedule` (default: $PWD)
#   GONKA_HOME         model cache dir, passed through
#   GONKA_PYTHON       python with gonka-hpc installed   (default: $PWD/.venv/bin/python, else python3)
#   GONKA_VERIFY_ARGS  extra `gonka-hpc epoch stage verify` flags
# `gonka-hpc epoch schedule` submits this script for you, after the finalize stage.
# Exit codes: 0 every batch of this task's share verified and its verdict final; 2 bad setup
# or a ledger problem (the log says which); 3 a signature problem.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
EPOCH_DIR=${GONKA_EPOCH_DIR:-$PWD}
if [ -n "${GONKA_PYTHON:-}" ]; then PY=$GONKA_PYTHON
elif [ -x "$PWD/.venv/bin/python" ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
read -r -a EXTRA <<<"${GONKA_VERIFY_ARGS:-}"
TASK=${SLURM_ARRAY_TASK_ID:-0}
NTASKS=${SLURM_ARRAY_TASK_COUNT:-1}
echo "[$(date -u +%FT%TZ) gonka_verify ${SLURM_JOB_ID:-local} task $TASK/$NTASKS] epoch $EPOCH_DIR"
exec "$PY" -m gonka_hpc.cli.main epoch stage verify --dir "$EPOCH_DIR" --task "$TASK" \
  --tasks "$NTASKS" "${EXTRA[@]}"
