#!/usr/bin/env bash
# Stop the test cluster that up.sh started in STATE_DIR (default /tmp/harness-test-cluster):
# cancel leftover Slurm jobs, then stop every daemon by its pid file (STATE_DIR/*/*.pid), munged last.
#
#   scripts/test-cluster/down.sh [STATE_DIR]
#
# Safe when nothing is up. Signals only pids whose /proc/PID/comm is the daemon the pid file names.
# Removes only STATE_DIR/env.sh and the pid files; keys, configs and logs stay for the next up.sh and
# for post-mortems.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

state_dir="${1:-/tmp/harness-test-cluster}"
if [[ ! -d "$state_dir" ]]; then
  echo "down: nothing to stop ($state_dir does not exist)"
  exit 0
fi
state_dir="$(cd "$state_dir" && pwd -P)"
start_ns="$(date +%s%N)"

exec 9>"$state_dir/.lock"
flock -w 120 9 || {
  echo "down: another up.sh/down.sh holds $state_dir/.lock" >&2
  exit 1
}
# From here on tests see the cluster as down.
rm -f "$state_dir/env.sh"

slurm_conf="$state_dir/slurm/slurm.conf"
# Only ask a live slurmctld: client commands retry a dead one for about 10 s.
if [[ -f "$slurm_conf" ]] && live_pid "$state_dir/slurm/slurmctld.pid" >/dev/null; then
  export SLURM_CONF="$slurm_conf"
  mapfile -t job_ids < <(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
  if ((${#job_ids[@]} > 0)); then
    echo "down: cancelling ${#job_ids[@]} leftover job(s): ${job_ids[*]}"
    timeout 10 scancel --quiet "${job_ids[@]}" 2>/dev/null || true
    # Let the job steps end (KillWait is 5 s) before the slurmd that supervise them go.
    for _ in $(seq 100); do
      [[ -z "$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)" ]] && break
      sleep 0.1
    done
  fi
fi

shopt -s nullglob
daemon_pidfiles=()
munge_pidfiles=()
for pidfile in "$state_dir"/*/*.pid; do
  if [[ "$(daemon_name_of "$pidfile")" == munged ]]; then
    munge_pidfiles+=("$pidfile")
  else
    daemon_pidfiles+=("$pidfile")
  fi
done
if ((${#daemon_pidfiles[@]} + ${#munge_pidfiles[@]} == 0)); then
  echo "down: nothing running in $state_dir"
  exit 0
fi
# Slurm daemons authenticate through munged until they exit, so munged goes last.
stop_pidfiles "${daemon_pidfiles[@]}"
stop_pidfiles "${munge_pidfiles[@]}"
echo "down: test cluster in $state_dir stopped in $(seconds_since "$start_ns") s"
