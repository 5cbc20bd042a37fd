#!/usr/bin/env bash
# gonka-hpc validators as ONE Slurm job: one MPI rank per validator, each with its own key
# (KEYDIR/validator-<rank>.key) and chain dir (LEDGER_DIR/validator-<rank>/). Records arrive
# through the signed inbox; blocks finalize with > 2/3 of the validators' weight.
#
#SBATCH --job-name=gonka-validators
#SBATCH --ntasks=4                     # = the number of validators in genesis (checked)
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out        # relative to the submit dir; logs/ must exist
#
# Settings (environment; sbatch passes the submitter's environment by default):
#   GONKA_GENESIS      the network's genesis.json                 (default: $PWD/genesis.json)
#   GONKA_KEY_DIR      dir holding validator-<rank>.key (0600)     (default: $PWD/keys)
#   GONKA_LEDGER_DIR   dir for the validators' chain dirs          (default: $PWD/ledger)
#   GONKA_INBOX        the signed inbox records are posted to      (default: $PWD/inbox)
#   GONKA_PYTHON       python with gonka-hpc installed (default: $PWD/.venv/bin/python, else python3)
#   GONKA_LEDGER_ARGS  extra `python -m ledger run` flags, e.g. "--interval 0.05" (split like
#                      shell words)
#   GONKA_INIT_ATTEMPTS  srun starts when MPI_Init fails in MPICH's start-up exchange (default 3)
#   GONKA_INIT_TIMEOUT   seconds for every rank to get through MPI_Init (default 60)
# The python, genesis, key dir and a leftover STOP are checked before srun starts the ranks
# (exit 2, an ERROR line naming the setting).
# Launch: `srun --mpi=pmi2 --kill-on-bad-exit=1`. The MPICH wheel speaks PMI-2 (--mpi=pmix
# fails with "unsupported PMI version"; --mpi=none would start N single-rank worlds, which the
# ledger's size check refuses), and a rank that fails takes the whole step down instead of
# leaving the others spinning in a collective.
# Stop: `touch $GONKA_INBOX/STOP`: the validators finish what is valid and exit 0 (remove STOP
# before the next start: the script refuses to start while it exists). A restart resumes every chain; a validator behind catches up.
#
# example:  mkdir -p logs && sbatch --ntasks=4 slurm/gonka_validators.sh
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
GENESIS=${GONKA_GENESIS:-$PWD/genesis.json}
KEY_DIR=${GONKA_KEY_DIR:-$PWD/keys}
LEDGER_DIR=${GONKA_LEDGER_DIR:-$PWD/ledger}
INBOX=${GONKA_INBOX:-$PWD/inbox}
if [ -n "${GONKA_PYTHON:-}" ]; then PY=$GONKA_PYTHON
elif [ -x "$PWD/.venv/bin/python" ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
die() { echo "gonka-validators: ERROR $*"; exit 2; }
# GONKA_LEDGER_ARGS as shell words (quotes and backslashes as the shell reads them, nothing run)
EXTRA=()
if [ -n "${GONKA_LEDGER_ARGS:-}" ]; then
  words=$(xargs -r printf '%s\0' <<<"$GONKA_LEDGER_ARGS" 2>&1 | tr '\0' '\036') \
    || die "GONKA_LEDGER_ARGS=$GONKA_LEDGER_ARGS does not split into words: $words"
  IFS=$'\036' read -r -a EXTRA <<<"$words"
fi
# Checked here, once, rather than by every rank with a traceback:
"$PY" -c 'import ledger, mpi4py' 2>/dev/null \
  || die "GONKA_PYTHON=$PY cannot import ledger and mpi4py: point GONKA_PYTHON at the python of the venv gonka-hpc is installed in"
[ -f "$GENESIS" ] && [ -r "$GENESIS" ] || die "GONKA_GENESIS=$GENESIS is not a readable file"
[ -d "$KEY_DIR" ] || die "GONKA_KEY_DIR=$KEY_DIR is not a directory"
if [ -e "$INBOX/STOP" ]; then  # it would stop the new run at once, at height 0
  die "$INBOX/STOP exists: a stop request left from an earlier run. Remove it to start the validators"
fi
mkdir -p "$LEDGER_DIR" "$INBOX"
# One node: UCX over shared memory only (self,sm). Those are the transports UCX picks between
# ranks of one node anyway, but by default each rank's address also packs its TCP interfaces,
# and that address exchange inside MPI_Init is where intermittent UCX start-up failures were
# seen ("failed to unpack address", pmodels/mpich#7417; once in our CI, "Message truncated").
# Jobs across nodes keep UCX's choice. An exported UCX_TLS always wins.
if [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ] && [ -z "${UCX_TLS:-}" ]; then export UCX_TLS=self,sm; fi
echo "gonka-validators: ${SLURM_NTASKS:-?} ranks on ${SLURM_JOB_NODELIST:-?}, genesis $GENESIS," \
  "UCX_TLS=${UCX_TLS:-unset (UCX default)}"
# MPICH's start-up exchange can fail under srun --mpi=pmi2, with UCX_TLS=self,sm too: inside
# MPI_Init, with "Fatal error in internal_Init_thread: Message truncated" (from
# MPIDI_UCX_comm_set_vcis) or by hanging. Both were seen in our CI; one cause was a stale
# /dev/shm segment of a killed step with the same job and step id (see docs/operations.md).
# No rank has opened its chain then, so starting the step again is safe: up to
# GONKA_INIT_ATTEMPTS times (default 3), when the step failed that way or no rank said
# "MPI started" within GONKA_INIT_TIMEOUT seconds (default 60). Anything else ends the job
# with the step's exit code.
attempts=${GONKA_INIT_ATTEMPTS:-3}
init_timeout=${GONKA_INIT_TIMEOUT:-60}
[[ $attempts =~ ^[1-9][0-9]*$ ]] || die "GONKA_INIT_ATTEMPTS=$attempts is not a positive whole number"
[[ $init_timeout =~ ^[1-9][0-9]*$ ]] || die "GONKA_INIT_TIMEOUT=$init_timeout is not a positive whole number of seconds"
out=$(mktemp -d "${TMPDIR:-/tmp}/gonka-validators.XXXXXX")
trap 'rm -rf "$out"' EXIT
set +e
for ((attempt = 1; ; attempt++)); do
  : >"$out/log"
  rm -f "$out/pid" "$out/rc"
  # srun's output goes to the job log through tee, and into $out/log for the checks below;
  # the subshell records srun's pid (to stop a hung step) and its exit code
  {
    srun --mpi=pmi2 --kill-on-bad-exit=1 "$PY" -m ledger run --genesis "$GENESIS" \
      --keys "$KEY_DIR" --data "$LEDGER_DIR" --inbox "$INBOX" \
      --expect-size "${SLURM_NTASKS:-1}" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 &
    echo $! >"$out/pid"
    wait $!
    echo $? >"$out/rc"
  } | tee -a "$out/log" &
  piped=$!
  while [ ! -s "$out/pid" ]; do sleep 0.1; done
  step=$(cat "$out/pid")
  started=0 hung=0
  for ((waited = 0; ; waited++)); do
    [ "$started" = 1 ] || ! grep -q "] MPI started" "$out/log" || started=1
    kill -0 "$step" 2>/dev/null || break
    if [ "$started" = 0 ] && [ "$waited" -ge "$init_timeout" ]; then
      echo "gonka-validators: no rank got through MPI_Init in ${init_timeout}s: stopping the step"
      hung=1
      kill -TERM "$step" 2>/dev/null  # srun passes it on to the ranks
      for ((i = 0; i < 10; i++)); do kill -0 "$step" 2>/dev/null || break; sleep 1; done
      kill -KILL "$step" 2>/dev/null
      break
    fi
    sleep 1
  done
  wait "$piped"  # tee has written everything, and the subshell its rc
  rc=$(cat "$out/rc" 2>/dev/null || echo 1)
  grep -q "] MPI started" "$out/log" && started=1
  if [ "$hung" = 0 ] && { [ "$rc" = 0 ] || [ "$started" = 1 ] \
      || ! grep -q "Fatal error in internal_Init_thread" "$out/log"; }; then
    break
  fi
  [ "$hung" = 0 ] || rc=124
  if [ "$attempt" -ge "$attempts" ]; then
    echo "gonka-validators: ERROR MPI_Init failed $attempts time(s); giving up"
    break
  fi
  echo "gonka-validators: MPI_Init failed in MPICH's start-up exchange (an intermittent" \
    "MPICH/UCX failure); starting the step again, attempt $((attempt + 1)) of $attempts"
  sleep 2
done
exit "$rc"
