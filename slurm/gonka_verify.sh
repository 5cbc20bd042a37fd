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
#   GONKA_VERIFY_ARGS  extra `gonka-hpc epoch stage verify` flags (split like shell words)
#   GONKA_SHARES       number of shares, when re-running some tasks of an array: task id i
#                      then verifies share i (by default the shares are the array's tasks)
# `gonka-hpc epoch schedule` submits this script for you, after the finalize stage.
# Exit codes: 0 every batch of this task's share verified and its verdict final; 2 bad setup
# or a ledger problem (the log says which); 3 a signature problem.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
EPOCH_DIR=${GONKA_EPOCH_DIR:-$PWD}
if [ -n "${GONKA_PYTHON:-}" ]; then PY=$GONKA_PYTHON
elif [ -x "$PWD/.venv/bin/python" ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
ID=${SLURM_ARRAY_TASK_ID:-0}
die() { echo "[$(date -u +%FT%TZ) gonka_verify ${SLURM_JOB_ID:-local} task $ID] ERROR $*"; exit 2; }
# GONKA_VERIFY_ARGS as shell words (quotes and backslashes as the shell reads them, nothing run)
EXTRA=()
if [ -n "${GONKA_VERIFY_ARGS:-}" ]; then
  words=$(xargs -r printf '%s\0' <<<"$GONKA_VERIFY_ARGS" 2>&1 | tr '\0' '\036') \
    || die "GONKA_VERIFY_ARGS=$GONKA_VERIFY_ARGS does not split into words: $words"
  IFS=$'\036' read -r -a EXTRA <<<"$words"
fi
"$PY" -c 'import gonka_hpc' 2>/dev/null \
  || die "GONKA_PYTHON=$PY cannot import gonka_hpc: point GONKA_PYTHON at the python of the venv gonka-hpc is installed in"
# This task's share: its place among the array's tasks (--array=0-3, 1-4 and 0-6:2 all make
# 4 shares), or its id when GONKA_SHARES is given (to re-run some tasks of an array).
if [ -n "${GONKA_SHARES:-}" ]; then
  NTASKS=$GONKA_SHARES TASK=$ID
else
  NTASKS=${SLURM_ARRAY_TASK_COUNT:-1} first=${SLURM_ARRAY_TASK_MIN:-0} step=${SLURM_ARRAY_TASK_STEP:-1}
  last=${SLURM_ARRAY_TASK_MAX:-$(( first + (NTASKS - 1) * step ))}
  if [ "$step" -lt 1 ] || [ $(( last - first )) -ne $(( (NTASKS - 1) * step )) ] \
      || [ $(( (ID - first) % step )) -ne 0 ]; then
    die "array task ids $first-$last (step $step, $NTASKS tasks) are not an evenly spaced range: submit --array=0-N, or set GONKA_SHARES (then task id i runs share i)"
  fi
  TASK=$(( (ID - first) / step ))
  if [ "$NTASKS" = 1 ] && [ "$ID" != 0 ]; then
    die "a one-task array with task id $ID: to re-run task $ID of a bigger array set GONKA_SHARES to that array's size"
  fi
fi
echo "[$(date -u +%FT%TZ) gonka_verify ${SLURM_JOB_ID:-local} task $ID: share $TASK/$NTASKS] epoch $EPOCH_DIR"
exec "$PY" -m gonka_hpc.cli.main epoch stage verify --dir "$EPOCH_DIR" --task "$TASK" \
  --tasks "$NTASKS" ${EXTRA[@]+"${EXTRA[@]}"}
