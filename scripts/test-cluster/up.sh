#!/usr/bin/env bash
# Bring up the test cluster on loopback, everything under STATE_DIR (default /tmp/harness-test-cluster):
#   - munged: a private instance (own key and socket in STATE_DIR/munge), so the host's munge is untouched;
#   - Slurm 22.05: slurmctld plus two slurmd (nodes n1 and n2, 2 CPUs each, partition `debug`), both
#     slurmd on this host with distinct ports (Debian builds slurmd with MULTIPLE_SLURMD);
#   - sshd on 127.0.0.1, 127.0.0.2 and 127.0.0.3 port 2222, key auth only, with a client config that
#     maps node1 -> 127.0.0.2 and node2 -> 127.0.0.3 and an `ssh` wrapper in STATE_DIR/bin that adds
#     `-F <that config>`, so pdsh and DeepSpeed's PDSH runner reach node1/node2; ~/.ssh is not used.
#
#   scripts/test-cluster/install.sh           # once: the Debian packages
#   scripts/test-cluster/up.sh [STATE_DIR]    # then: source STATE_DIR/env.sh
#   scripts/test-cluster/down.sh [STATE_DIR]
#
# Idempotent: a daemon whose pid file names a live process and whose config is unchanged is left
# running; one that died, or whose config changed, is (re)started. Removes STATE_DIR/env.sh first and
# writes it last, once sinfo shows n1 and n2 up and `ssh node1 true` / `ssh node2 true` work.
# Knobs (environment): HARNESS_TEST_CLUSTER_SSH_PORT (2222), HARNESS_TEST_CLUSTER_SLURM_PORT (6817;
# the slurmd of n1 and n2 take the next two ports), HARNESS_TEST_CLUSTER_CRED_EXPIRE_S (10).
# Touches nothing outside STATE_DIR except creating /run/sshd (sshd's privilege-separation directory).
set -euo pipefail
# The ERR trap below must also fire inside functions (wait_until).
set -o errtrace

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

state_dir="${1:-/tmp/harness-test-cluster}"
ssh_port="${HARNESS_TEST_CLUSTER_SSH_PORT:-2222}"
slurmctld_port="${HARNESS_TEST_CLUSTER_SLURM_PORT:-6817}"
# Slurm 22.05 keeps a requeued job pending until the old job credential has expired: begin time =
# requeue time + cred_expire + 1 s. The default of 120 s would make every requeue (scontrol requeue,
# node failure, preemption) wait two minutes; 10 s still leaves ample time for a step launch here.
cred_expire_s="${HARNESS_TEST_CLUSTER_CRED_EXPIRE_S:-10}"
cpus_per_node=2
slurm_nodes=(n1 n2)
ssh_hosts=(node1 node2)
ssh_addrs=(127.0.0.2 127.0.0.3)

die() {
  echo "up: $*" >&2
  exit 1
}

[[ "$(id -u)" -eq 0 ]] || die "must run as root (Slurm daemons run as root here); run it with sudo"
for cmd in munged mungekey munge unmunge slurmctld slurmd sinfo scontrol ssh-keygen pdsh flock; do
  command -v "$cmd" >/dev/null || die "'$cmd' not found; run scripts/test-cluster/install.sh first"
done
[[ -x /usr/sbin/sshd ]] || die "/usr/sbin/sshd not found; run scripts/test-cluster/install.sh first"
for port in "$ssh_port" "$slurmctld_port" "$cred_expire_s"; do
  [[ "$port" =~ ^[0-9]+$ ]] || die "expected a number, got '$port' (check HARNESS_TEST_CLUSTER_* variables)"
done
((cred_expire_s >= 5)) || die "HARNESS_TEST_CLUSTER_CRED_EXPIRE_S=$cred_expire_s: Slurm ignores values under 5"

start_ns="$(date +%s%N)"
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd -P)"
[[ "$state_dir" != / ]] || die "STATE_DIR must not be /"
[[ "$state_dir" =~ ^[A-Za-z0-9_./-]+$ ]] ||
  die "STATE_DIR '$state_dir' has characters that daemon config files cannot carry; use [A-Za-z0-9_./-] only"

# One up/down at a time per STATE_DIR. Every daemon below is started with fd 9 closed, or it would
# hold this lock for its whole life.
exec 9>"$state_dir/.lock"
flock -w 120 9 || die "another up.sh/down.sh holds $state_dir/.lock"

on_error() {
  echo "up: FAILED after $(seconds_since "$start_ns") s; last lines of the logs in $state_dir:" >&2
  local log
  for log in "$state_dir"/munge/munged.log "$state_dir"/slurm/log/*.log "$state_dir"/ssh/sshd.log; do
    [[ -s "$log" ]] || continue
    echo "---- $log" >&2
    tail -n 15 "$log" >&2
  done
  rm -f "$state_dir/env.sh"
}
trap on_error ERR
# env.sh exists only while the last up.sh has completed: a run that dies half-way (even by a signal,
# which skips the ERR trap) leaves no env.sh behind for tests to trust.
rm -f "$state_dir/env.sh"

# write_if_changed FILE MODE: stdin becomes FILE unless FILE already holds exactly that. Succeeds only
# when it wrote (the caller then restarts the daemon reading FILE).
write_if_changed() {
  local file="$1" mode="$2" tmp
  tmp="$(mktemp "$file.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f "$file" ]] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$file"
}

# wait_until SECONDS WHAT CMD...: run CMD every 0.1 s until it succeeds or SECONDS have passed.
wait_until() {
  local timeout_s="$1" what="$2"
  local deadline_ns=$(($(date +%s%N) + timeout_s * 1000000000))
  shift 2
  until "$@"; do
    if (($(date +%s%N) > deadline_ns)); then
      echo "up: timed out after ${timeout_s} s waiting for $what" >&2
      return 1
    fi
    sleep 0.1
  done
}

# fail_if_port_taken PORT WHAT: before starting a daemon, make sure nothing else listens on PORT (a
# daemon that cannot bind dies, or, like sshd, quietly serves the other addresses only).
fail_if_port_taken() {
  local port="$1" what="$2" listeners
  command -v ss >/dev/null || return 0
  listeners="$(ss -Hltnp "sport = :$port" 2>/dev/null)" || return 0
  if [[ -n "$listeners" ]]; then
    echo "up: port $port, needed by $what, is taken:" >&2
    echo "$listeners" >&2
    echo "up: stop that process, or choose another port (see HARNESS_TEST_CLUSTER_* at the top of up.sh)" >&2
    return 1
  fi
}

# Single-quoted for a shell (and for tests/cluster_env.py, which parses env.sh without a shell).
shell_quote() {
  local squote="'"
  printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
}

# ---------------------------------------------------------------------------------------------- munge
munge_dir="$state_dir/munge"
munge_socket="$munge_dir/munge.socket"
install -d -m 0755 "$munge_dir"
[[ -s "$munge_dir/munge.key" ]] || mungekey --create --keyfile="$munge_dir/munge.key"
chmod 0600 "$munge_dir/munge.key"

munge_works() {
  munge -n --socket="$munge_socket" 2>/dev/null | unmunge --socket="$munge_socket" >/dev/null 2>&1
}
if pid="$(live_pid "$munge_dir/munged.pid")" && munge_works; then
  echo "up: munged already running (pid $pid)"
else
  stop_pidfiles "$munge_dir/munged.pid"
  # As root, like the Slurm daemons. --force: munged otherwise refuses a socket below a directory that
  # not everyone may traverse (pytest's tmp_path is 0700); every client here runs as root.
  /usr/sbin/munged --force \
    --socket="$munge_socket" --key-file="$munge_dir/munge.key" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" \
    </dev/null >/dev/null 2>&1 9>&-
  wait_until 10 "munged to answer on $munge_socket" munge_works
  echo "up: started munged (pid $(live_pid "$munge_dir/munged.pid"))"
fi

# ---------------------------------------------------------------------------------------------- Slurm
slurm_dir="$state_dir/slurm"
slurm_conf="$slurm_dir/slurm.conf"
mkdir -p "$slurm_dir/state" "$slurm_dir/log"
for node in "${slurm_nodes[@]}"; do
  mkdir -p "$slurm_dir/spool/$node"
done
mem_total_mb="$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
# RealMemory above physical memory puts a node in INVAL ("Low RealMemory"); CR_CPU never schedules by
# memory, so any value below physical will do.
real_memory_mb=$((mem_total_mb / 2 < 4096 ? mem_total_mb / 2 : 4096))
host_short="$(hostname -s)"

slurm_conf_changed=0
if {
  cat <<EOF
# Written by scripts/test-cluster/up.sh; regenerated on every run.
ClusterName=harnesstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$slurmctld_port
# Both daemons as root: no chown of state directories, and jobs may run as root.
SlurmUser=root
SlurmdUser=root
# The private munged; cred_expire: see up.sh (requeued jobs wait cred_expire + 1 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket,cred_expire=$cred_expire_s
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool/%n
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd-%n.pid
SlurmctldLogFile=$slurm_dir/log/slurmctld.log
SlurmdLogFile=$slurm_dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes tracked by parent pid, no task binding, no accounting daemons.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# CR_CPU: only CPUs are consumable, so jobs need no --mem.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# batch_sched_delay=0: a batch job starts about 1 s after submission instead of about 3 s.
# sched_interval=1: a job that becomes eligible by time (a requeued job, --begin) starts within a
# second, not at the next 60 s main-scheduler pass (about 17 s after eligibility here with defaults).
SchedulerParameters=batch_sched_delay=0,sched_interval=1
# The node lines are the truth, whatever the hardware says (2 CPUs per node even on a 1-core box).
SlurmdParameters=config_overrides
# Batch jobs may be requeued (scontrol requeue, node failure) unless submitted with --no-requeue.
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=5
MinJobAge=300
EOF
  for i in "${!slurm_nodes[@]}"; do
    printf 'NodeName=%s NodeHostname=%s NodeAddr=127.0.0.1 Port=%d CPUs=%d RealMemory=%d State=UNKNOWN\n' \
      "${slurm_nodes[$i]}" "$host_short" $((slurmctld_port + 1 + i)) "$cpus_per_node" "$real_memory_mb"
  done
  echo "PartitionName=debug Nodes=$(
    IFS=,
    echo "${slurm_nodes[*]}"
  ) Default=YES MaxTime=INFINITE State=UP"
} | write_if_changed "$slurm_conf" 0644; then
  slurm_conf_changed=1
fi

export SLURM_CONF="$slurm_conf"
slurm_pidfiles=("$slurm_dir/slurmctld.pid")
for node in "${slurm_nodes[@]}"; do
  slurm_pidfiles+=("$slurm_dir/slurmd-$node.pid")
done
if ((slurm_conf_changed)); then
  # Daemons read slurm.conf only at start; restart any that run with an older one.
  stop_pidfiles "${slurm_pidfiles[@]}"
fi

if pid="$(live_pid "$slurm_dir/slurmctld.pid")"; then
  echo "up: slurmctld already running (pid $pid)"
else
  fail_if_port_taken "$slurmctld_port" slurmctld
  # -c: start from a clean state (no jobs or node states from an earlier run).
  slurmctld -c -f "$slurm_conf" </dev/null >>"$slurm_dir/log/slurmctld.out" 2>&1 9>&-
  echo "up: started slurmctld"
fi
for i in "${!slurm_nodes[@]}"; do
  node="${slurm_nodes[$i]}"
  if pid="$(live_pid "$slurm_dir/slurmd-$node.pid")"; then
    echo "up: slurmd $node already running (pid $pid)"
  else
    fail_if_port_taken $((slurmctld_port + 1 + i)) "slurmd $node"
    slurmd -f "$slurm_conf" -N "$node" </dev/null >>"$slurm_dir/log/slurmd-$node.out" 2>&1 9>&-
    echo "up: started slurmd $node"
  fi
done

# `scontrol ping` answers at once; sinfo and squeue retry a controller that is not up yet for about 9 s.
slurmctld_answers() { scontrol ping >/dev/null 2>&1; }
# A node that registered and is usable: idle, or busy with a job left from before (mix, alloc, comp).
# Any other state (down, drain, inval, or a trailing '*' for not responding) keeps us waiting.
nodes_up() {
  local states node
  states="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null)" || return 1
  for node in "${slurm_nodes[@]}"; do
    grep -Eq "^$node (idle|mix|alloc|comp)\$" <<<"$states" || return 1
  done
}
all_pidfiles_live() {
  local pidfile
  for pidfile in "$@"; do
    live_pid "$pidfile" >/dev/null || return 1
  done
}
wait_until 20 "slurmctld to answer on port $slurmctld_port" slurmctld_answers
wait_until 30 "nodes ${slurm_nodes[*]} to register (sinfo)" nodes_up
wait_until 10 "Slurm pid files" all_pidfiles_live "${slurm_pidfiles[@]}"

# ------------------------------------------------------------------------------------------------ ssh
ssh_dir="$state_dir/ssh"
bin_dir="$state_dir/bin"
mkdir -p "$ssh_dir" "$bin_dir"
chmod 0700 "$ssh_dir"
[[ -s "$ssh_dir/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C harness-test-cluster-host -f "$ssh_dir/host_ed25519"
[[ -s "$ssh_dir/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C harness-test-cluster-client -f "$ssh_dir/id_ed25519"
cp "$ssh_dir/id_ed25519.pub" "$ssh_dir/authorized_keys"
chmod 0600 "$ssh_dir/authorized_keys"
# The client trusts exactly this host key, under one alias for every address and port.
printf 'harness-test-cluster %s\n' "$(cut -d' ' -f1,2 "$ssh_dir/host_ed25519.pub")" >"$ssh_dir/known_hosts"

sshd_conf_changed=0
if {
  echo "# Written by scripts/test-cluster/up.sh; regenerated on every run."
  echo "Port $ssh_port"
  echo "ListenAddress 127.0.0.1"
  for addr in "${ssh_addrs[@]}"; do
    echo "ListenAddress $addr"
  done
  cat <<EOF
HostKey $ssh_dir/host_ed25519
PidFile $ssh_dir/sshd.pid
AuthorizedKeysFile $ssh_dir/authorized_keys
# /tmp is 1777, which StrictModes rejects for a key file below it.
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitUserEnvironment no
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
# DeepSpeed's PDSH runner opens one connection per host at once; allow bursts.
MaxStartups 100:30:200
MaxSessions 100
LogLevel INFO
EOF
} | write_if_changed "$ssh_dir/sshd_config" 0600; then
  sshd_conf_changed=1
fi

{
  for i in "${!ssh_hosts[@]}"; do
    printf 'Host %s\n  HostName %s\n' "${ssh_hosts[$i]}" "${ssh_addrs[$i]}"
  done
  # Only the cluster's names and addresses get these settings; any other host gets ssh's defaults.
  cat <<EOF
Host ${ssh_hosts[*]} localhost 127.0.0.1 ${ssh_addrs[*]}
  Port $ssh_port
  User root
  IdentityFile $ssh_dir/id_ed25519
  IdentitiesOnly yes
  # Classic curve25519 instead of the default post-quantum hybrid: 0.3 s instead of 0.5 s per connection here.
  KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
  HostKeyAlias harness-test-cluster
  UserKnownHostsFile $ssh_dir/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  # Also bounds the SSH handshake, so a stray listener on the port cannot hang a caller.
  ConnectTimeout 10
  LogLevel ERROR
EOF
} | write_if_changed "$ssh_dir/ssh_config" 0644 || true

{
  echo '#!/bin/sh'
  echo "# Written by scripts/test-cluster/up.sh: ssh with the test cluster's client config (node1, node2)."
  echo "exec /usr/bin/ssh -F $(shell_quote "$ssh_dir/ssh_config") \"\$@\""
} | write_if_changed "$bin_dir/ssh" 0755 || true

# sshd refuses to start without its privilege-separation directory (Debian's is /run/sshd).
[[ -d /run/sshd ]] || install -d -m 0755 /run/sshd
if ((sshd_conf_changed)); then
  stop_pidfiles "$ssh_dir/sshd.pid"
fi
if pid="$(live_pid "$ssh_dir/sshd.pid")"; then
  echo "up: sshd already running (pid $pid)"
else
  fail_if_port_taken "$ssh_port" sshd
  /usr/sbin/sshd -t -f "$ssh_dir/sshd_config"
  # sshd must be started by absolute path (it re-executes itself per connection).
  /usr/sbin/sshd -f "$ssh_dir/sshd_config" -E "$ssh_dir/sshd.log" </dev/null >/dev/null 2>&1 9>&-
  echo "up: started sshd on 127.0.0.1, ${ssh_addrs[*]} port $ssh_port"
fi
# In parallel: each connection costs about 0.5 s here, most of it the remote login shell's start-up.
ssh_reaches_all() {
  local host pid status=0
  local -a pids=()
  for host in "${ssh_hosts[@]}"; do
    "$bin_dir/ssh" -o ConnectTimeout=3 "$host" true </dev/null >/dev/null 2>&1 &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || status=1
  done
  return "$status"
}
wait_until 10 "ssh ${ssh_hosts[*]} true" ssh_reaches_all
wait_until 5 "sshd pid file" all_pidfiles_live "$ssh_dir/sshd.pid"

# ------------------------------------------------------------------------------------ env.sh, hostfile
{
  for host in "${ssh_hosts[@]}"; do
    echo "$host slots=1"
  done
} | write_if_changed "$state_dir/hostfile" 0644 || true

{
  echo "# Written by scripts/test-cluster/up.sh; sourced by shells, parsed (not executed) by tests/cluster_env.py."
  echo "# Only: export NAME='literal', with \"\$PATH\" as the one expansion."
  echo "export HARNESS_TEST_CLUSTER=$(shell_quote "$state_dir")"
  echo "export SLURM_CONF=$(shell_quote "$slurm_conf")"
  echo "export PDSH_RCMD_TYPE='ssh'"
  echo "export HARNESS_TEST_SLURM_NODES=$(shell_quote "$(
    IFS=,
    echo "${slurm_nodes[*]}"
  )")"
  echo "export HARNESS_TEST_SSH_HOSTS=$(shell_quote "$(
    IFS=,
    echo "${ssh_hosts[*]}"
  )")"
  echo "export HARNESS_TEST_SSH_ADDRS=$(shell_quote "$(
    IFS=,
    echo "${ssh_addrs[*]}"
  )")"
  echo "export HARNESS_TEST_MASTER_ADDR=$(shell_quote "${ssh_addrs[0]}")"
  echo "export HARNESS_TEST_HOSTFILE=$(shell_quote "$state_dir/hostfile")"
  echo "export HARNESS_TEST_SSH_CONFIG=$(shell_quote "$ssh_dir/ssh_config")"
  echo "export PATH=$(shell_quote "$bin_dir"):\"\$PATH\""
} | write_if_changed "$state_dir/env.sh" 0644 || true

sinfo -N -p debug -o '%N %t %c'
echo "up: test cluster up in $(seconds_since "$start_ns") s; source $state_dir/env.sh"
