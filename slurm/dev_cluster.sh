#!/usr/bin/env bash
# A single-node Slurm on localhost, for development and CI: munge, MariaDB, slurmdbd,
# slurmctld and slurmd, all run by hand (no systemd), all state under ONE directory.
#
#   slurm/dev_cluster.sh start     start what is not running (idempotent), wait until idle
#   slurm/dev_cluster.sh stop      stop everything it started, by pidfile
#   slurm/dev_cluster.sh status    print what runs, and sinfo
#   slurm/dev_cluster.sh env       print the export line clients need (SLURM_CONF)
#
# Directory: $GONKA_SLURM_DIR, default <repo>/.slurm-dev. It holds etc/ (slurm.conf,
# slurmdbd.conf), run/ (pidfiles, munge socket), log/, state/ (slurmctld, slurmd, munge seed)
# and mysql/ (MariaDB's datadir). Delete it after `stop` to start from nothing.
#
# Config: the daemons and every client find it through SLURM_CONF=<dir>/etc/slurm.conf;
# nothing is written to /etc/slurm, so a real site config on the machine is never touched.
# Clients (sbatch, squeue, sacct, scontrol) need it exported: eval "$(slurm/dev_cluster.sh env)".
# run-tests.sh does that, and the pytest fixture in tests/test_slurm_node.py sets it itself.
#
# The node is `hostname -s` at 127.0.0.1, advertising 8 CPUs (config_overrides) and 16 GB, so
# 8 array tasks run at once on a 2-core machine. Plugins: proctrack/linuxproc and task/none
# (cgroups are not usable in containers), cons_tres with CR_Core_Memory and DefMemPerCPU=1000.
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge slurmdbd mariadb-server
# (installing them is .ci/run's job, not this script's). Ports: slurmctld 6817, slurmd 6818,
# slurmdbd 6819 (Slurm's defaults), MariaDB $GONKA_SLURM_DB_PORT (default 13306, 127.0.0.1).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${GONKA_SLURM_DIR:-$REPO/.slurm-dev}
DB_PORT=${GONKA_SLURM_DB_PORT:-13306}
CLUSTER=gonkadev
NODE=$(hostname -s)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

die() { echo "dev_cluster: ERROR $*" >&2; exit 2; }
say() { echo "dev_cluster: $*" >&2; }

scale=${GONKA_TIMEOUT_SCALE:-1}
[[ $scale =~ ^[0-9]+([.][0-9]+)?$ ]] && [ "$scale" != 0 ] \
  || die "GONKA_TIMEOUT_SCALE=$scale is not a positive number (e.g. 1 or 2.5)"
TIMEOUT=$(awk -v s="$scale" 'BEGIN{t = int(30 * s); print (t < 1 ? 1 : t)}')

need_binaries() {
  local missing=()
  for b in munged slurmctld slurmd slurmdbd mariadbd mariadb-install-db sinfo sacctmgr; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing ${missing[*]}; install with: apt-get install -y slurm-wlm munge slurmdbd mariadb-server"
  fi
  [ "$(id -u)" = 0 ] || die "the dev cluster runs its daemons as root; run as root"
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s until it succeeds.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      die "$what not ready after ${limit}s; logs in $DIR/log"
    fi
    sleep 0.1
  done
}

pidfile() {  # MariaDB runs as user mysql: its socket, pidfile and log live in mysql-owned dirs
  if [ "$1" = mysqld ]; then echo "$DIR/run/mysql/mysqld.pid"; else echo "$DIR/run/$1.pid"; fi
}

alive() {  # alive NAME: the pidfile's process runs
  local pf; pf=$(pidfile "$1")
  [ -s "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null
}

write_configs() {
  mkdir -p "$DIR"/{etc,run,log,state/ctld,state/slurmd,state/munge}
  # Job ids must not repeat across clusters on one machine: MPICH names its start-up shared
  # memory after the PMI kvsname (<job id>.<step id> under srun), and a segment left in
  # /dev/shm by a killed step of an earlier cluster's job with the same id is opened as if it
  # were new, which breaks or hangs MPI_Init. A fresh cluster would restart at 1.
  local first_job_id=$(( $(date +%s) % 60000000 + 1 ))
  cat >"$CONF" <<EOF
# Written by slurm/dev_cluster.sh; regenerated on every start.
ClusterName=$CLUSTER
FirstJobId=$first_job_id
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF; owner SlurmUser, mode 600.
  (umask 077; cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by slurm/dev_cluster.sh; regenerated on every start.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=gonka-dev
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

MUNGE_SOCKET=/run/munge/munge.socket.2  # Slurm's clients use munge's default socket

start_munge() {
  # munge is per machine: reuse a munged that already answers (a site's own), else start one.
  alive munged && return
  if munge -n </dev/null >/dev/null 2>&1; then return; fi
  [ -r /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (reinstall munge)"
  mkdir -p /run/munge
  /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/state/munge/seed" \
    --key-file=/etc/munge/munge.key
  wait_until "$TIMEOUT" munged munge -n
}

mysql_cli() { mariadb --socket="$DIR/run/mysql/mysqld.sock" -u root "$@"; }

start_mariadb() {
  alive mysqld && return
  mkdir -p "$DIR/run/mysql" "$DIR/log/mysql"
  chown mysql:mysql "$DIR/run/mysql" "$DIR/log/mysql"
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mkdir -p "$DIR/mysql"
    chown mysql:mysql "$DIR/mysql"
    mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
  fi
  # mysqld writes its pidfile itself; setsid detaches it from this shell.
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DIR/run/mysql/mysqld.sock" \
    --pid-file="$DIR/run/mysql/mysqld.pid" --log-error="$DIR/log/mysql/mariadb.log" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  wait_until "$TIMEOUT" MariaDB mysql_cli -e "SELECT 1"
  wait_until "$TIMEOUT" "MariaDB pidfile" test -s "$(pidfile mysqld)"
  mysql_cli -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'gonka-dev';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  alive slurmdbd && return
  /usr/sbin/slurmdbd
  wait_until "$TIMEOUT" slurmdbd sacctmgr -n -P show cluster
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  if ! alive slurmctld; then /usr/sbin/slurmctld -f "$CONF"; fi
  wait_until "$TIMEOUT" slurmctld scontrol ping
  if ! alive slurmd; then /usr/sbin/slurmd -f "$CONF"; fi
  local deadline=$((SECONDS + TIMEOUT)) state=""
  while :; do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) break ;;
      drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    [ $SECONDS -lt $deadline ] || die "node state '${state:-?}' after ${TIMEOUT}s; logs in $DIR/log"
    sleep 0.1
  done
}

cmd_start() {
  need_binaries
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  say "up: $(sinfo -h -o '%N %T %c CPUs')  (SLURM_CONF=$CONF)"
}

stop_one() {  # stop_one NAME: TERM the pidfile's process, wait for it to go
  local pf pid
  pf=$(pidfile "$1")
  [ -s "$pf" ] || return 0
  pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    local deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then say "$1 ($pid) ignores TERM; killing"; kill -KILL "$pid"; fi
      sleep 0.1
    done
    say "stopped $1 ($pid)"
  fi
  rm -f "$pf"
}

kill_strays() {  # job processes that outlived their job (proctrack/linuxproc loses a rank
  # whose srun or slurmstepd was killed): found by this cluster's SLURM_CONF and a job id
  local p env n=0
  for p in /proc/[0-9]*; do
    case "${p#/proc/}" in "$$"|"$PPID"|"$BASHPID") continue ;; esac
    env=$({ tr '\0' '\n' <"$p/environ"; } 2>/dev/null) || continue  # (it may be gone)
    if grep -qx "SLURM_CONF=$CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; then
      kill -9 "${p#/proc/}" 2>/dev/null && n=$((n + 1))
    fi
  done
  [ "$n" = 0 ] || say "killed $n process(es) left by jobs of this cluster"
}

cmd_stop() {
  for d in slurmd slurmctld slurmdbd mysqld munged; do stop_one "$d"; done
  kill_strays
}

cmd_status() {
  local any=0
  for d in munged mysqld slurmdbd slurmctld slurmd; do
    if alive "$d"; then echo "$d running (pid $(cat "$(pidfile "$d")"))"; any=1
    else echo "$d not running"; fi
  done
  echo "dir $DIR"
  if [ $any = 1 ] && alive slurmctld; then sinfo; fi
  alive slurmctld && alive slurmd
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$(printf %q "$CONF")" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
