#!/usr/bin/env bash
# local_cluster.sh — a real SLURM cluster on this one host, for tests and local experiments.
#
#   local_cluster.sh start  [--nodes N] [--cpus-per-node C]   install if needed, start, wait idle
#   local_cluster.sh stop   [--purge]                         stop what `start` started
#   local_cluster.sh status                                   daemons + sinfo; exit 0 iff all up
#
# Needs root on Debian 12 (Slurm 22.05, munge 0.5.15, MariaDB 10.11). No systemd, no cgroups.
# Everything lives under $MEGATRAIN_SLURM_ROOT (default /tmp/megatrain_slurm); outside it the script
# only touches what apt-get installs. Clients: `source $ROOT/slurm.env` (exports SLURM_CONF).
#
# Daemons, all run as root, each identified by its pid file under $ROOT/run:
#   munged     own key and socket (never the system one)
#   mariadbd   127.0.0.1:3307, accounting DB      — submitit polls `sacct`: without accounting every
#   slurmdbd   127.0.0.1:6819                       job state reads UNKNOWN and job.result() can hang
#   slurmctld  127.0.0.1:6817
#   slurmd     one per emulated node node1..nodeN, ports 6830..6830+N-1, all on this host
# Partitions: `debug` (default) and `cpu`, both over all nodes.
#
# Design notes (why, not what):
# - Nodes are emulated: node names do not resolve, every NodeAddr is 127.0.0.1, so distributed jobs
#   must use MASTER_ADDR=127.0.0.1 rather than the first host name of the allocation.
# - CPUs per node are declared, not probed (SlurmdParameters=config_overrides): the default 4 per node
#   oversubscribes a 2-core VM on purpose so that a 2-task job fits on a single node.
# - AuthInfo cred_expire=10: a requeued job may start again ~10 s after it ended (default 120 s),
#   which keeps preemption/requeue tests short.
# - Exit status 69 (EX_UNAVAILABLE) means "cannot run here" (not root / packages not installable):
#   the pytest fixture turns exactly that into a skip; anything else is a failure.
set -euo pipefail

readonly ROOT=${MEGATRAIN_SLURM_ROOT:-/tmp/megatrain_slurm}
readonly ETC=$ROOT/etc RUN=$ROOT/run LOG=$ROOT/log STATE=$ROOT/state
readonly CONF=$ETC/slurm.conf DBD_CONF=$ETC/slurmdbd.conf
readonly MUNGE_DIR=$ROOT/munge MUNGE_SOCK=$ROOT/run/munge.socket
readonly DB_DIR=$ROOT/mariadb DB_SOCK=$ROOT/run/mariadb.sock
readonly CLUSTER=megatrain PARTITION=debug SECOND_PARTITION=cpu
readonly CTLD_PORT=6817 DBD_PORT=6819 DB_PORT=3307 SLURMD_PORT0=6830
readonly DB_USER=slurm DB_PASS=megatrain DB_NAME=slurm_acct_db
readonly WAIT_S=${MEGATRAIN_SLURM_WAIT_S:-90}
readonly EX_UNAVAILABLE=69
readonly PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
export SLURM_CONF=$CONF
# Daemons inherit this: together with the program name it proves a pid file's process is ours.
export MEGATRAIN_SLURM_ROOT=$ROOT

T0=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - ${1:-$T0}) / 1000000)); printf '%d.%03ds' $((ms / 1000)) $((ms % 1000)); }
log() { printf '[local_cluster +%s] %s\n' "$(elapsed)" "$*" >&2; }
die() { local code=${2:-1}; log "ERROR: $1"; exit "$code"; }

# ------------------------------------------------------------------------------------------------
# Processes we own

pidfile_of() { # pidfile_of DAEMON [NODE]
    case $1 in
        slurmd) echo "$RUN/slurmd-$2.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}

# owned_pid PIDFILE DAEMON: print the pid if it is a live (non-zombie) DAEMON started for this ROOT.
# PID 1 here reaps exited daemons late, so a zombie counts as dead.
owned_pid() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
    [[ $(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "MEGATRAIN_SLURM_ROOT=$ROOT" || return 1
    echo "$pid"
}

# slurmd_pidfiles: every slurmd pid file present (nodes of the current or of an earlier shape)
slurmd_pidfiles() { compgen -G "$RUN/slurmd-*.pid" || true; }

# stop_pidfile PIDFILE DAEMON: SIGTERM, SIGKILL after 20 s; a foreign or stale pid is left alone.
stop_pidfile() {
    local pf=$1 name=$2 pid t
    if ! pid=$(owned_pid "$pf" "$name"); then
        [[ -e $pf ]] && { log "$name: not running (stale $pf removed)"; rm -f "$pf"; }
        return 0
    fi
    t=$(date +%s%N)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do owned_pid "$pf" "$name" >/dev/null || break; sleep 0.1; done
    if owned_pid "$pf" "$name" >/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pf"
    log "$name stopped (pid $pid, $(elapsed "$t"))"
}

port_busy() { command -v ss >/dev/null && [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# check_ports_free NODES: before starting anything, every port a not-yet-running daemon of ours needs
# must be free. A busy one means some other cluster (another MEGATRAIN_SLURM_ROOT?) holds it: say so
# now rather than leave half a cluster and a bind error in some log.
check_ports_free() {
    local entry name port pf n
    local wanted=("mariadbd:$DB_PORT:$(pidfile_of mariadbd)" "slurmdbd:$DBD_PORT:$(pidfile_of slurmdbd)"
        "slurmctld:$CTLD_PORT:$(pidfile_of slurmctld)")
    for n in $(seq 1 "$1"); do wanted+=("slurmd:$((SLURMD_PORT0 + n - 1)):$(pidfile_of slurmd node$n)"); done
    for entry in "${wanted[@]}"; do
        IFS=: read -r name port pf <<<"$entry"
        if ! owned_pid "$pf" "$name" >/dev/null && port_busy "$port"; then
            die "port $port (for $name) is held by a process this root ($ROOT) did not start: another cluster? (ss -ltnp 'sport = :$port')"
        fi
    done
}

# launch DAEMON PIDFILE CMD...: start CMD unless our DAEMON already runs; sets LAUNCHED=0|1 for the
# log of the following wait_until.
LAUNCHED=0
launch() {
    local name=$1 pf=$2 pid; shift 2
    LAUNCHED=0
    if pid=$(owned_pid "$pf" "$name"); then log "$(basename "$pf" .pid) already running (pid $pid)"; return 0; fi
    rm -f "$pf"
    # stdio to a file: a daemon holding the caller's pipe would make `subprocess.run` wait forever;
    # and not the lock fd either, or the next start/stop would wait for the daemon to exit.
    setsid -f "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&-
    LAUNCHED=1
}

# wait_until DAEMON PIDFILE LOGFILE CHECK...: poll CHECK until it succeeds; fail fast with the
# daemon's log tail if the daemon died (e.g. bad config) or after WAIT_S seconds.
wait_until() {
    local name=$1 pf=$2 logf=$3; shift 3
    local t deadline=$(($(date +%s) + WAIT_S))
    t=$(date +%s%N)
    until owned_pid "$pf" "$name" >/dev/null && "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= deadline)); then
            tail -n 20 "$logf" >&2 2>/dev/null || true
            die "$name not ready after ${WAIT_S}s (log: $logf)"
        fi
        # give a just-launched daemon a moment to write its pid file before calling it dead
        if (($(date +%s%N) - t > 3000000000)) && ! owned_pid "$pf" "$name" >/dev/null; then
            tail -n 20 "$logf" >&2 2>/dev/null || true
            die "$name exited during start-up (log: $logf)"
        fi
        sleep 0.2
    done
    ((LAUNCHED)) && log "$name up (pid $(<"$pf"), $(elapsed "$t"))"
    return 0
}

# take_lock: serialise start/stop of one ROOT (two test sessions starting at once, say)
take_lock() {
    exec 9>"$ROOT/.lock"
    flock -w 300 9 || die "another local_cluster.sh holds $ROOT/.lock for 300 s"
}

# ------------------------------------------------------------------------------------------------
# start

ensure_packages() {
    local missing=() p t created_policy=0
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get" $EX_UNAVAILABLE
    t=$(date +%s%N)
    log "installing ${missing[*]} (apt log: $LOG/apt.log)"
    # policy-rc.d exit 101 keeps the maintainer scripts from starting the packaged daemons, which
    # would grab the standard ports and /run/munge; we run our own instances instead.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=2 -qq)
    export DEBIAN_FRONTEND=noninteractive
    # refresh the lists first: a fresh image has none, and stale ones point at removed versions
    { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; } \
        >"$LOG/apt.log" 2>&1 ||
        { tail -n 15 "$LOG/apt.log" >&2; die "could not install ${missing[*]} (log: $LOG/apt.log)" $EX_UNAVAILABLE; }
    ((created_policy)) && { rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
    log "installed ${missing[*]} ($(elapsed "$t"))"
}

# node_list N: "node1" or "node[1-N]" (Slurm hostlist syntax)
node_list() { if (($1 == 1)); then echo node1; else echo "node[1-$1]"; fi; }
port_list() { if (($1 == 1)); then echo $SLURMD_PORT0; else echo "[$SLURMD_PORT0-$((SLURMD_PORT0 + $1 - 1))]"; fi; }

# write_slurm_conf NODES CPUS FILE
write_slurm_conf() {
    local nodes=$1 cpus=$2 real_mem_mb node_mem_mb
    real_mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    # under the real total (split across the emulated nodes), else slurmd reports too little memory
    node_mem_mb=$((real_mem_mb * 90 / 100 / nodes))
    cat >"$3" <<EOF
# Generated by megatrain slurm/local_cluster.sh — edits are overwritten on the next start.
# megatrain-shape: nodes=$nodes cpus-per-node=$cpus
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmctldPidFile=$(pidfile_of slurmctld)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdParameters=config_overrides
# no systemd/cgroups in this VM
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# schedule every 2 s instead of every minute: a test cluster should feel instant
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# connections to slurmdbd ignore AuthInfo and take the munge socket from here
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$(node_list "$nodes") NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$(port_list "$nodes") CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$node_mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=$SECOND_PARTITION Nodes=ALL MaxTime=INFINITE State=UP
EOF
}

write_slurmdbd_conf() {
    cat >"$1" <<EOF
# Generated by megatrain slurm/local_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$(pidfile_of slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    chmod 600 "$1" # slurmdbd refuses to start if its config (holding a password) is readable by others
}

running_shape() { sed -n 's/^# megatrain-shape: //p' "$CONF" 2>/dev/null; }

# any_slurm_daemon_up: slurmctld or some slurmd of ours is alive
any_slurm_daemon_up() {
    local pf
    owned_pid "$(pidfile_of slurmctld)" slurmctld >/dev/null && return 0
    for pf in $(slurmd_pidfiles); do owned_pid "$pf" slurmd >/dev/null && return 0; done
    return 1
}

# cluster_up NODES: every daemon of ours is alive and every node answers (idle/mixed/allocated)
cluster_up() {
    local d n
    for d in munged mariadbd slurmdbd slurmctld; do owned_pid "$(pidfile_of $d)" $d >/dev/null || return 1; done
    for n in $(seq 1 "$1"); do owned_pid "$(pidfile_of slurmd node$n)" slurmd >/dev/null || return 1; done
    nodes_ready "$1"
}

# nodes_ready N: all N nodes registered and usable; a drained/down node (stale state from an earlier
# run) is resumed on the way.
nodes_ready() {
    local states
    states=$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null) || return 1
    (($(wc -l <<<"$states") == $1)) || return 1
    local n st ok=0
    while read -r n st; do
        case $st in
            idle | mixed | allocated | completing) ;;
            down* | drain* | fail*) scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; ok=1 ;;
            *) ok=1 ;;
        esac
    done <<<"$states"
    return $ok
}

start_munge() {
    mkdir -p "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then # our own key: nothing outside ROOT can mint credentials
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    fi
    launch munged "$(pidfile_of munged)" /usr/sbin/munged --socket="$MUNGE_SOCK" \
        --key-file="$MUNGE_DIR/munge.key" --pid-file="$(pidfile_of munged)" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_until munged "$(pidfile_of munged)" "$LOG/munged.log" \
        bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'"
}

start_accounting() {
    if [[ ! -d $DB_DIR/mysql ]]; then
        local t
        t=$(date +%s%N)
        mkdir -p "$DB_DIR"
        mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install-db.log" 2>&1 ||
            die "mariadb-install-db failed (log: $LOG/mariadb-install-db.log)"
        log "created MariaDB datadir $DB_DIR ($(elapsed "$t"))"
    fi
    # small buffers: the accounting DB holds a few rows and the machine is shared
    launch mariadbd "$(pidfile_of mariadbd)" /usr/sbin/mariadbd --no-defaults --user=root \
        --datadir="$DB_DIR" --socket="$DB_SOCK" --pid-file="$(pidfile_of mariadbd)" \
        --port=$DB_PORT --bind-address=127.0.0.1 --skip-name-resolve --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --max-allowed-packet=16M
    wait_until mariadbd "$(pidfile_of mariadbd)" "$LOG/mariadb.log" \
        mariadb-admin --no-defaults --socket="$DB_SOCK" ping
    mariadb --no-defaults --socket="$DB_SOCK" -u root -e "
        CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';"

    # slurmdbd finds slurmdbd.conf next to $SLURM_CONF
    launch slurmdbd "$(pidfile_of slurmdbd)" /usr/sbin/slurmdbd
    wait_until slurmdbd "$(pidfile_of slurmdbd)" "$LOG/slurmdbd.log" sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        log "registered cluster '$CLUSTER' in slurmdbd"
    fi
}

# registered_since EPOCH NODE...: each NODE's slurmd registered with slurmctld at or after EPOCH.
# Without this, a node whose old slurmd just died still looks idle (slurmctld notices the death
# only after SlurmdTimeout) and a relaunch would be reported ready before it registered.
registered_since() {
    local since=$1 n started; shift
    for n in "$@"; do
        started=$(scontrol show node -o "$n" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
        [[ -n $started && $started != None ]] || return 1
        (($(date -d "$started" +%s 2>/dev/null || echo 0) >= since - 1)) || return 1
    done
}

start_slurm() {
    local nodes=$1 n t since launched=()
    mkdir -p "$STATE/slurmctld"
    launch slurmctld "$(pidfile_of slurmctld)" /usr/sbin/slurmctld -f "$CONF"
    wait_until slurmctld "$(pidfile_of slurmctld)" "$LOG/slurmctld.log" \
        bash -c "scontrol ping | grep -q 'is UP'"
    since=$(date +%s)
    t=$(date +%s%N)
    for n in $(seq 1 "$nodes"); do
        mkdir -p "$STATE/slurmd-node$n"
        launch slurmd "$(pidfile_of slurmd node$n)" /usr/sbin/slurmd -f "$CONF" -N "node$n"
        ((LAUNCHED)) && launched+=("node$n")
    done
    ((${#launched[@]})) || return 0
    local deadline=$(($(date +%s) + WAIT_S))
    until registered_since "$since" "${launched[@]}" && nodes_ready "$nodes"; do
        for n in "${launched[@]}"; do
            # slurmd writes its pid file right after daemonizing; missing after 3 s means it died
            if (($(date +%s%N) - t > 3000000000)) && ! owned_pid "$(pidfile_of slurmd "$n")" slurmd >/dev/null; then
                tail -n 20 "$LOG/slurmd-$n.log" >&2 2>/dev/null || true
                die "slurmd $n exited during start-up (log: $LOG/slurmd-$n.log)"
            fi
        done
        if (($(date +%s) >= deadline)); then
            sinfo -N >&2 || true
            die "nodes not idle after ${WAIT_S}s (logs: $LOG/slurmd-node*.log, $LOG/slurmctld.log)"
        fi
        sleep 0.3
    done
    log "slurmd up on ${launched[*]}; nodes $(node_list "$nodes") idle ($(elapsed "$t"))"
}

# cmd_start NODES CPUS: an empty NODES/CPUS keeps the running cluster's value (default 1 node, 4 CPUs),
# so a bare `start` never reshapes a cluster that someone started with --nodes 2.
cmd_start() {
    local nodes=$1 cpus=$2 shape
    [[ $(id -u) == 0 ]] || die "must run as root (starts system daemons, may apt-get install)" $EX_UNAVAILABLE
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE"
    chmod 755 "$ROOT" "$RUN"
    take_lock

    if any_slurm_daemon_up; then
        nodes=${nodes:-$(running_shape | sed -n 's/.*nodes=\([0-9]*\).*/\1/p')}
        cpus=${cpus:-$(running_shape | sed -n 's/.*cpus-per-node=\([0-9]*\).*/\1/p')}
    fi
    nodes=${nodes:-1} cpus=${cpus:-4}
    shape="nodes=$nodes cpus-per-node=$cpus"

    if [[ $(running_shape) == "$shape" ]] && cluster_up "$nodes"; then
        log "already up ($shape, root $ROOT): nothing to do"
        write_env_file
        return 0
    fi
    ensure_packages
    check_ports_free "$nodes"

    write_slurm_conf "$nodes" "$cpus" "$CONF.new"
    write_slurmdbd_conf "$DBD_CONF.new"
    # A changed shape (or a changed generator) needs slurmctld and the slurmds restarted; munge,
    # MariaDB and slurmdbd do not depend on the node set and keep running.
    if ! cmp -s "$CONF.new" "$CONF" && any_slurm_daemon_up; then
        log "reconfiguring: running cluster has '$(running_shape)', asked for '$shape'"
        cancel_jobs
        stop_slurm_daemons
    fi
    if ! cmp -s "$DBD_CONF.new" "$DBD_CONF"; then stop_pidfile "$(pidfile_of slurmdbd)" slurmdbd; fi
    mv -f "$CONF.new" "$CONF"
    mv -f "$DBD_CONF.new" "$DBD_CONF"

    start_munge
    start_accounting
    start_slurm "$nodes"
    write_env_file
    log "cluster ready in $(elapsed): $shape, partitions $PARTITION (default), $SECOND_PARTITION"
    log "clients: source $ROOT/slurm.env"
}

write_env_file() {
    cat >"$ROOT/slurm.env" <<EOF
# source me: points Slurm clients (sbatch, sacct, submitit) at the local megatrain cluster
export SLURM_CONF=$CONF
EOF
}

# ------------------------------------------------------------------------------------------------
# stop / status

# cancel_jobs: so that no slurmstepd or job process outlives its slurmd
cancel_jobs() {
    owned_pid "$(pidfile_of slurmctld)" slurmctld >/dev/null || return 0
    local jobs t
    jobs=$(squeue -h -t PD,R,CG,S,CF,RQ,RS,SO,ST -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    t=$(date +%s%N)
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 60); do
        [[ -z $(squeue -h -t R,CG,S,CF,SO,ST -o '%A' 2>/dev/null) ]] && break
        sleep 0.5
    done
    log "cancelled jobs ${jobs% } ($(elapsed "$t"))"
}

stop_slurm_daemons() {
    local pf
    for pf in $(slurmd_pidfiles); do stop_pidfile "$pf" slurmd; done
    stop_pidfile "$(pidfile_of slurmctld)" slurmctld
}

cmd_stop() {
    local purge=$1 d
    if [[ -d $RUN ]]; then
        take_lock
        cancel_jobs
        stop_slurm_daemons
        for d in slurmdbd mariadbd munged; do stop_pidfile "$(pidfile_of $d)" $d; done
    else
        log "nothing to stop under $ROOT"
    fi
    if ((purge)); then
        rm -rf "$ETC" "$RUN" "$LOG" "$STATE" "$MUNGE_DIR" "$DB_DIR" "$ROOT/slurm.env"
        log "purged configs, state, accounting DB, logs and munge key under $ROOT"
    fi
    log "stopped in $(elapsed)"
}

# cmd_status: exit 0 if every daemon is up, 3 (LSB "not running") if none is, 1 if some are
cmd_status() {
    local nodes names=(munged mariadbd slurmdbd slurmctld) d n pid up=0 down=0
    nodes=$(sed -n 's/^# megatrain-shape: nodes=\([0-9]*\).*/\1/p' "$CONF" 2>/dev/null || true)
    printf 'root %s, %s\n' "$ROOT" "$(running_shape || echo 'never started')"
    for d in "${names[@]}" $(for n in $(seq 1 "${nodes:-0}"); do echo "slurmd:node$n"; done); do
        if [[ $d == slurmd:* ]]; then n=${d#slurmd:}; d=slurmd; else n=""; fi
        if pid=$(owned_pid "$(pidfile_of $d "$n")" $d); then
            printf '  %-16s up (pid %s)\n' "$d${n:+ $n}" "$pid"; up=$((up + 1))
        else
            printf '  %-16s down\n' "$d${n:+ $n}"; down=$((down + 1))
        fi
    done
    if owned_pid "$(pidfile_of slurmctld)" slurmctld >/dev/null; then sinfo || true; fi
    if ((up == 0)); then return 3; elif ((down == 0)); then return 0; else return 1; fi
}

# ------------------------------------------------------------------------------------------------

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

main() {
    local cmd=${1:-} nodes="" cpus="" purge=0
    [[ -n $cmd ]] || usage
    shift
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            --cpus-per-node) cpus=${2:?--cpus-per-node needs a value}; shift 2 ;;
            --cpus-per-node=*) cpus=${1#*=}; shift ;;
            --purge) purge=1; shift ;;
            -h | --help) usage ;;
            *) log "unknown argument: $1"; usage ;;
        esac
    done
    [[ -z $nodes || $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1..99, got '$nodes'" 2
    [[ -z $cpus || $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-node must be a positive integer, got '$cpus'" 2
    case $cmd in
        start) cmd_start "$nodes" "$cpus" ;;
        stop) cmd_stop "$purge" ;;
        status) cmd_status ;;
        *) usage ;;
    esac
}

main "$@"
