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
# spool dir per line; surrounding blanks, '#' comments and blank lines ignored), or, without a
# list, every directory directly under $GONKA_SPOOL_ROOT, sorted by name. With N shares, share
# i runs spools i, i+N, i+2N, ... one after another. The shares are the array's tasks in order
# (--array=0-7, 1-8 or 0-14:2 all make 8 shares); to re-run some tasks of an array, set
# GONKA_SHARES to the original array's size, and then task id i runs share i. A spool's key is
# $GONKA_KEY_DIR/<spool name>.key (the participant's ed25519 key, mode 0600). Two tasks never
# run one spool at once: each holds a lock (flock) on <spool>/.gonka-node.lock while it runs
# it, and a task that finds a spool locked skips it.
#
# Settings (environment; sbatch passes the submitter's environment by default):
#   GONKA_SPOOL_ROOT   dir whose subdirs are executor spools        (default: $PWD/spool)
#   GONKA_SPOOL_LIST   file listing spool dirs, one per line         (overrides GONKA_SPOOL_ROOT)
#   GONKA_KEY_DIR      dir holding <participant>.key                 (default: $PWD/keys)
#   GONKA_INBOX        the validators' inbox dir                     (default: $PWD/inbox)
#   GONKA_MODEL        network model name                            (default: gonka-tiny)
#   GONKA_HOME         model cache dir, passed through to the worker
#   GONKA_PYTHON       python with gonka-hpc installed   (default: $PWD/.venv/bin/python, else python3)
#   GONKA_NODE_ARGS    extra `gonka-hpc node` flags, e.g. "--batch-size 32 --threads 8" (split
#                      like shell words: quote a value that holds spaces)
#   GONKA_SHARES       number of shares, when re-running some tasks of an array (see above)
#   GONKA_REQUEUE_WAIT seconds to wait for Slurm to end this run after `scontrol requeue`
#                      (default 60)
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
#   - A USR2 or TERM that comes while the worker is still starting (before it can checkpoint)
#     ends it before it has done anything: the same as a checkpoint.
#   - A worker that stops with code 75 on a signal sent to it alone is requeued too.
# Every setting is checked before the first worker starts: the python, the spools, the inbox
# and the key of every spool of the task's share.
# Exit codes: 0 every share done (or requeued); 2 bad setup; the worker's code if it failed (2
# bad setup, 3 a signature problem); 75 stopped by TERM with its checkpoint written.
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
TASK=${SLURM_ARRAY_TASK_ID:-0}
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then SELF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else SELF=${SLURM_JOB_ID:-}; fi
EXIT_PREEMPTED=75

log() { echo "[$(date -u +%FT%TZ) gonka_node ${SELF:-local} task $TASK] $*"; }
die() { log "ERROR $*"; exit 2; }
is_count() { [[ $1 =~ ^[0-9]+$ ]]; }

# GONKA_NODE_ARGS as shell words (quotes and backslashes as the shell reads them, nothing run)
EXTRA=()
if [ -n "${GONKA_NODE_ARGS:-}" ]; then
  words=$(xargs -r printf '%s\0' <<<"$GONKA_NODE_ARGS" 2>&1 | tr '\0' '\036') \
    || die "GONKA_NODE_ARGS=$GONKA_NODE_ARGS does not split into words: $words"
  IFS=$'\036' read -r -a EXTRA <<<"$words"
fi
"$PY" -c 'import gonka_hpc' 2>/dev/null \
  || die "GONKA_PYTHON=$PY cannot import gonka_hpc: point GONKA_PYTHON at the python of the venv gonka-hpc is installed in"
wait_s=${GONKA_REQUEUE_WAIT:-60}
is_count "$wait_s" || die "GONKA_REQUEUE_WAIT=$wait_s is not a whole number of seconds"

# This task's share: its place among the array's tasks, or its id when GONKA_SHARES is given.
if [ -n "${GONKA_SHARES:-}" ]; then
  is_count "$GONKA_SHARES" && [ "$GONKA_SHARES" -ge 1 ] || die "GONKA_SHARES=$GONKA_SHARES is not a positive whole number"
  SHARES=$GONKA_SHARES SHARE=$TASK
else
  SHARES=${SLURM_ARRAY_TASK_COUNT:-1} first=${SLURM_ARRAY_TASK_MIN:-0}
  step=${SLURM_ARRAY_TASK_STEP:-1} last=${SLURM_ARRAY_TASK_MAX:-$(( ${SLURM_ARRAY_TASK_MIN:-0} + (SHARES - 1) * ${SLURM_ARRAY_TASK_STEP:-1} ))}
  if [ "$step" -lt 1 ] || [ $(( last - first )) -ne $(( (SHARES - 1) * step )) ] \
      || [ $(( (TASK - first) % step )) -ne 0 ]; then
    die "array task ids $first-$last (step $step, $SHARES tasks) are not an evenly spaced range: submit --array=0-N, or set GONKA_SHARES (then task id i runs share i)"
  fi
  SHARE=$(( (TASK - first) / step ))
  if [ "$SHARES" = 1 ] && [ "$TASK" != 0 ]; then  # a one-task array whose id is not 0
    die "a one-task array with task id $TASK: to re-run task $TASK of a bigger array set GONKA_SHARES to that array's size; to run every spool in one task submit --array=0"
  fi
fi
[ "$SHARE" -lt "$SHARES" ] || die "task $TASK is share $SHARE, beyond the $SHARES share(s) (GONKA_SHARES)"

spools=()
if [ -n "$SPOOL_LIST" ]; then
  [ -f "$SPOOL_LIST" ] && [ -r "$SPOOL_LIST" ] || die "GONKA_SPOOL_LIST=$SPOOL_LIST is not a readable file"
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    line="${line#"${line%%[![:space:]]*}"}"  # surrounding blanks
    line="${line%"${line##*[![:space:]]}"}"
    case "$line" in ''|'#'*) continue ;; esac
    spools+=("$line")
  done <"$SPOOL_LIST"
  [ ${#spools[@]} -gt 0 ] || die "GONKA_SPOOL_LIST=$SPOOL_LIST lists no spool"
else
  [ -d "$SPOOL_ROOT" ] || die "GONKA_SPOOL_ROOT=$SPOOL_ROOT is not a directory"
  for d in "$SPOOL_ROOT"/*/; do [ -d "$d" ] && spools+=("${d%/}"); done
  [ ${#spools[@]} -gt 0 ] || die "GONKA_SPOOL_ROOT=$SPOOL_ROOT holds no spool directory"
fi
mine=()
for ((i = SHARE; i < ${#spools[@]}; i += SHARES)); do mine+=("${spools[$i]}"); done
# Everything this task's share needs, before the first worker starts: one typo must not
# surface hours later, after other spools took their GPU time.
[ -d "$INBOX" ] && [ -w "$INBOX" ] || die "GONKA_INBOX=$INBOX is not a writable directory"
for spool in "${mine[@]}"; do
  [ -d "$spool" ] || die "spool $spool is not a directory"
  key="$KEY_DIR/$(basename "$spool").key"
  [ -f "$key" ] && [ -r "$key" ] || die "spool $spool has no readable key $key (GONKA_KEY_DIR)"
done
LOCK=1
command -v flock >/dev/null || { LOCK=0; log "flock not found: spools are not locked against a second task"; }
# --gres=gpu:N -> one engine over the task's N GPUs (tensor parallelism), unless set already
if [ -z "${GONKA_TENSOR_PARALLEL_SIZE:-}" ] && [ "${SLURM_GPUS_ON_NODE:-0}" -ge 1 ] 2>/dev/null; then
  export GONKA_TENSOR_PARALLEL_SIZE=$SLURM_GPUS_ON_NODE
fi
log "start (restart count ${SLURM_RESTART_COUNT:-0}); share $SHARE of $SHARES: ${#mine[@]} of ${#spools[@]} spool(s): ${mine[*]:-none}"
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
  if [ "$LOCK" = 1 ]; then
    exec {lockfd}>>"$spool/.gonka-node.lock" || die "cannot open the lock $spool/.gonka-node.lock"
    flock -n -E 111 "$lockfd"
    lrc=$?
    if [ "$lrc" = 111 ]; then
      log "spool $name is being run by another task (it holds $spool/.gonka-node.lock): skipped"
      exec {lockfd}>&-
      continue
    elif [ "$lrc" != 0 ]; then
      log "could not lock $spool/.gonka-node.lock (the file system may not support flock): running it unlocked"
    fi
  fi
  "$PY" -m gonka_hpc.cli.main node --spool "$spool" --key "$KEY_DIR/$name.key" \
    --inbox "$INBOX" --model "$MODEL" ${EXTRA[@]+"${EXTRA[@]}"} &
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
  [ "$LOCK" = 1 ] && exec {lockfd}>&-
  log "worker for $name exited with $rc"
  if [ -n "$signalled" ] && [ "$rc" -gt 128 ]; then
    # killed by the forwarded signal before it could install its handler: it had done
    # nothing yet, which is as good as a checkpoint
    log "the worker was still starting; nothing to checkpoint"
    rc=$EXIT_PREEMPTED
  fi
  if [ "$rc" = "$EXIT_PREEMPTED" ]; then
    if [ -z "$signalled" ]; then  # a signal sent to the worker alone: the rest still has to run
      log "the worker stopped with its checkpoint on a signal this script did not get: requeueing"
      signalled=USR2
    fi
    break
  fi
  if [ "$rc" != 0 ]; then exit "$rc"; fi
done

if [ "$signalled" = USR2 ]; then
  if [ -z "$SELF" ]; then log "not under Slurm: nothing to requeue"; exit "$EXIT_PREEMPTED"; fi
  log "checkpointed; requeueing $SELF"
  scontrol requeue "$SELF" || { log "ERROR scontrol requeue $SELF failed"; exit "$EXIT_PREEMPTED"; }
  # Let the requeue end this run (Slurm TERMs it, the trap below `wait` returns) rather than
  # racing Slurm's kill with our own exit.
  sleep "$wait_s" &
  worker=$!
  wait "$worker"
  exit 0
fi
if [ "$signalled" = TERM ]; then log "stopped by TERM, checkpoint written"; exit "$EXIT_PREEMPTED"; fi
log "all shares done"
