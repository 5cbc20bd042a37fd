#!/usr/bin/env bash
# gonka-hpc ML nodes as a Slurm job array: each array task runs `gonka-hpc node` over its share
# of the site's executor spools. Preemptible: on the warning signal it checkpoints and requeues
# itself; on restart it resumes, and every request is still answered exactly once.
#
#SBATCH --job-name=gonka-node
#SBATCH --array=0-0                    # one task per ML node; override: sbatch --array=0-7
#SBATCH --time=04:00:00                # wall-clock limit of one run (a requeue starts afresh)
#SBATCH --cpus-per-task=1
#SBATCH --requeue                      # let Slurm (and this script) requeue the task
#SBATCH --signal=B:USR2@120            # USR2 to this script 120 s before the time limit
#SBATCH --open-mode=append             # keep one log per task across requeues
#SBATCH --output=logs/%x-%A_%a.out     # relative to the submit dir; logs/ must exist
##SBATCH --gres=gpu:1                  # GPU sites: remove one '#' (needs GresTypes=gpu and a
##SBATCH --partition=preemptible       #   gres.conf on the nodes); see docs/operations.md
#
# Which spools a task runs ("its share"): the spools are the lines of $GONKA_SPOOL_LIST (one
# spool dir per line, '#' comments and blank lines ignored), or, without a list, every
# directory directly under $GONKA_SPOOL_ROOT, sorted by name. With N array tasks, task i runs
# spools i, i+N, i+2N, ... one after another. A spool's key is $GONKA_KEY_DIR/<spool name>.key
# (the participant's ed25519 key, mode 0600).
#
# Settings (environment; sbatch passes the submitter's environment by default):
#   GONKA_SPOOL_ROOT   dir whose subdirs are executor spools        (default: $PWD/spool)
#   GONKA_SPOOL_LIST   file listing spool dirs, one per line         (overrides GONKA_SPOOL_ROOT)
#   GONKA_KEY_DIR      dir holding <participant>.key                 (default: $PWD/keys)
#   GONKA_INBOX        the validators' inbox dir                     (default: $PWD/inbox)
#   GONKA_MODEL        network model name                            (default: gonka-tiny)
#   GONKA_HOME         model cache dir, passed through to the worker
#   GONKA_PYTHON       python with gonka-hpc installed   (default: $PWD/.venv/bin/python, else python3)
#   GONKA_NODE_ARGS    extra `gonka-hpc node` flags, e.g. "--batch-size 32 --threads 8"
#   GONKA_TENSOR_PARALLEL_SIZE  GPUs one vLLM engine spans (default: the task's GPUs, i.e.
#                      N of --gres=gpu:N, from $SLURM_GPUS_ON_NODE; see docs/operations.md)
# ($PWD is the submit dir, $SLURM_SUBMIT_DIR.) Slurm settings are overridden on the command
# line as usual: sbatch --array=0-3 --time=1:00:00 --partition=gpu --gres=gpu:1 slurm/gonka_node.sh
#
# Preemption and requeue:
#   - USR2 (from --signal, or `scancel --signal=USR2 --batch JOB`): forwarded to the worker,
#     which finishes the engine batch in flight, checkpoints it, exits 75; this script then
#     runs `scontrol requeue` on its own task and exits 0.
#   - TERM (scancel, `scontrol requeue`, preemption with GraceTime): forwarded too, the worker
#     checkpoints and exits; Slurm decides what comes next (requeue or cancel).
#   - On every start the worker resumes: done shards are skipped, checkpointed batches reused.
# Exit codes: 0 every share done (or requeued); the worker's code if it failed (2 bad setup,
# 3 a signature problem); 75 stopped by TERM with its checkpoint written.
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 2
SPOOL_ROOT=${GONKA_SPOOL_ROOT:-$PWD/spool}
SPOOL_LIST=${GONKA_SPOOL_LIST:-}
KEY_DIR=${GONKA_KEY_DIR:-$PWD/keys}
INBOX=${GONKA_INBOX:-$PWD/inbox}
MODEL=${GONKA_MODEL:-gonka-tiny}
if [ -n "${GONKA_PYTHON:-}" ]; then PY=$GONKA_PYTHON
elif [ -x "$PWD/.venv/bin/python" ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
read -r -a EXTRA <<<"${GONKA_NODE_ARGS:-}"
TASK=${SLURM_ARRAY_TASK_ID:-0}
NTASKS=${SLURM_ARRAY_TASK_COUNT:-1}
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then SELF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else SELF=${SLURM_JOB_ID:-}; fi
EXIT_PREEMPTED=75

log() { echo "[$(date -u +%FT%TZ) gonka_node ${SELF:-local} task $TASK] $*"; }

spools=()
if [ -n "$SPOOL_LIST" ]; then
  [ -r "$SPOOL_LIST" ] || { log "ERROR GONKA_SPOOL_LIST=$SPOOL_LIST is not readable"; exit 2; }
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    spools+=("$line")
  done <"$SPOOL_LIST"
else
  [ -d "$SPOOL_ROOT" ] || { log "ERROR GONKA_SPOOL_ROOT=$SPOOL_ROOT is not a directory"; exit 2; }
  for d in "$SPOOL_ROOT"/*/; do [ -d "$d" ] && spools+=("${d%/}"); done
fi
mine=()
for ((i = TASK; i < ${#spools[@]}; i += NTASKS)); do mine+=("${spools[$i]}"); done
# --gres=gpu:N -> one engine over the task's N GPUs (tensor parallelism), unless set already
if [ -z "${GONKA_TENSOR_PARALLEL_SIZE:-}" ] && [ "${SLURM_GPUS_ON_NODE:-0}" -ge 1 ] 2>/dev/null; then
  export GONKA_TENSOR_PARALLEL_SIZE=$SLURM_GPUS_ON_NODE
fi
log "start (restart count ${SLURM_RESTART_COUNT:-0}); ${#mine[@]} of ${#spools[@]} spool(s): ${mine[*]:-none}"
log "tensor parallel size ${GONKA_TENSOR_PARALLEL_SIZE:-1} (GPUs on this node: ${SLURM_GPUS_ON_NODE:-none})"

worker=""
signalled=""
interrupted=0
forward() {  # forward SIG: pass the signal on to the worker; `wait` below resumes waiting
  signalled=$1
  interrupted=1
  log "got SIG$1; forwarding to the worker${worker:+ ($worker)}"
  if [ -n "$worker" ]; then kill -s "$1" "$worker" 2>/dev/null || true; fi
}
trap 'forward USR2' USR2
trap 'forward TERM' TERM

for spool in "${mine[@]}"; do
  [ -z "$signalled" ] || break
  name=$(basename "$spool")
  "$PY" -m gonka_hpc.cli.main node --spool "$spool" --key "$KEY_DIR/$name.key" \
    --inbox "$INBOX" --model "$MODEL" "${EXTRA[@]}" &
  worker=$!
  while :; do  # wait until the worker has really exited, not just until a trap ran
    interrupted=0
    wait "$worker"
    rc=$?
    if [ "$interrupted" = 1 ] && kill -0 "$worker" 2>/dev/null; then continue; fi
    if [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ]; then wait "$worker"; rc=$?; fi
    break
  done
  worker=""
  log "worker for $name exited with $rc"
  if [ "$rc" = "$EXIT_PREEMPTED" ]; then break; fi
  if [ "$rc" != 0 ]; then exit "$rc"; fi
done

if [ "$signalled" = USR2 ]; then
  if [ -z "$SELF" ]; then log "not under Slurm: nothing to requeue"; exit "$EXIT_PREEMPTED"; fi
  log "checkpointed; requeueing $SELF"
  scontrol requeue "$SELF" || { log "ERROR scontrol requeue $SELF failed"; exit "$EXIT_PREEMPTED"; }
  # Let the requeue end this run (Slurm TERMs it, the trap below `wait` returns) rather than
  # racing Slurm's kill with our own exit.
  sleep "${GONKA_REQUEUE_WAIT:-60}" &
  worker=$!
  wait "$worker"
  exit 0
fi
if [ "$signalled" = TERM ]; then log "stopped by TERM, checkpoint written"; exit "$EXIT_PREEMPTED"; fi
log "all shares done"
