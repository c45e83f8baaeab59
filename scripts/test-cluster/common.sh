# shellcheck shell=bash
# Helpers shared by up.sh and down.sh; sourced, never run.
#
# Pid-file convention: every daemon the test cluster runs writes STATE_DIR/<component>/<daemon>[-<node>].pid
# (munge/munged.pid, slurm/slurmctld.pid, slurm/slurmd-n1.pid, ssh/sshd.pid). down.sh and
# tests/cluster_env.py rely on that layout.

set -euo pipefail

# The file name of a pid file without directory, node suffix and extension is the daemon's comm
# (slurmd-n1.pid -> slurmd): a pid is only trusted while /proc/PID/comm still says so, so a recycled
# pid never gets signalled.
daemon_name_of() {
  local base
  base="$(basename "$1" .pid)"
  printf '%s\n' "${base%%-*}"
}

# alive PID [COMM]: the process exists, is not a zombie (PID 1 here reaps orphans late, and `kill -0`
# succeeds on a zombie) and, when COMM is given, is that program.
alive() {
  local pid="$1" comm="${2:-}" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
  if [[ -n "$comm" ]]; then
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
  fi
}

# live_pid PIDFILE: print the pid in PIDFILE when that daemon is alive; fail otherwise.
live_pid() {
  local pidfile="$1" pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(tr -dc '0-9' <"$pidfile")"
  alive "$pid" "$(daemon_name_of "$pidfile")" || return 1
  printf '%s\n' "$pid"
}

# stop_pidfiles PIDFILE...: SIGTERM every live daemon named, wait for all of them (10 s, then SIGKILL),
# and remove the pid files. Signals only pids whose comm matches the pid file's daemon name.
stop_pidfiles() {
  local pidfile pid name
  local -a pids=() names=()
  for pidfile in "$@"; do
    [[ -e "$pidfile" ]] || continue
    if pid="$(live_pid "$pidfile")"; then
      name="$(basename "$pidfile" .pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$name")
    fi
    rm -f "$pidfile"
  done
  local i _
  for i in "${!pids[@]}"; do
    for _ in $(seq 100); do
      alive "${pids[$i]}" || break
      sleep 0.1
    done
    if alive "${pids[$i]}"; then
      echo "$(basename "$0" .sh): ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    echo "$(basename "$0" .sh): stopped ${names[$i]} (pid ${pids[$i]})"
  done
}

# Seconds since $1 (a `date +%s%N` value), two decimals.
seconds_since() {
  local elapsed_ns=$(($(date +%s%N) - $1))
  printf '%d.%02d' $((elapsed_ns / 1000000000)) $((elapsed_ns / 10000000 % 100))
}
