#!/usr/bin/env bash
# Wait for a Slurm job to reach a terminal state; print that state; exit 0 only for COMPLETED.
#
#   scripts/test-cluster/sbatch_wait.sh JOBID [timeout_s]      (default timeout 300 s)
#
# Polls `scontrol show job` every 0.2 s: a trivial job is seen finished within 0.2 s of its end, where
# `sbatch --wait` polls with a back-off (about 10 s here). A requeued job (scontrol requeue, node
# failure) passes through REQUEUED and PENDING and runs again; only a terminal state ends the wait.
# stdout: the final state (e.g. COMPLETED, FAILED, CANCELLED). stderr: job id, exit code, restarts,
# time waited. Exit: 0 COMPLETED, 1 any other terminal state or the job is unknown to slurmctld,
# 2 usage error, 124 timeout (stdout then says TIMEOUT_WAITING, stderr the last state seen).
set -euo pipefail

usage() {
  echo "usage: sbatch_wait.sh JOBID [timeout_s]" >&2
  exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
job_id="$1"
timeout_s="${2:-300}"
[[ "$job_id" =~ ^[0-9]+(_[0-9]+)?$ ]] || usage
[[ "$timeout_s" =~ ^[0-9]+$ ]] || usage

start_ns="$(date +%s%N)"
deadline_ns=$((start_ns + timeout_s * 1000000000))
elapsed() {
  local ns=$(($(date +%s%N) - start_ns))
  printf '%d.%01d' $((ns / 1000000000)) $((ns / 100000000 % 10))
}

# Field NAME of a one-line `scontrol show job -o` record.
field() {
  local name="$1" record="$2"
  sed -n "s/.*[[:space:]]$name=\([^[:space:]]*\).*/\1/p; s/^$name=\([^[:space:]]*\).*/\1/p" <<<"$record" | head -n 1
}

# Not terminal: the job may still run (again). SPECIAL_EXIT is a held requeue that only an admin
# releases, so it counts as terminal here.
is_terminal() {
  case "$1" in
    PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | REQUEUE_FED | REQUEUE_HOLD | \
      RESIZING | SIGNALING | STAGE_OUT | STOPPED | RESV_DEL_HOLD) return 1 ;;
    *) return 0 ;;
  esac
}

state="UNSEEN"
record=""
while :; do
  if output="$(scontrol show job -o "$job_id" 2>&1)"; then
    # An array or heterogeneous job prints one line per component; wait for all of them.
    record="$(head -n 1 <<<"$output")"
    # The state reported is the first component's that is not COMPLETED, else COMPLETED.
    all_terminal=1
    state=COMPLETED
    while IFS= read -r line; do
      [[ -n "$line" ]] || continue
      line_state="$(field JobState "$line")"
      is_terminal "$line_state" || all_terminal=0
      if [[ "$state" == COMPLETED && "$line_state" != COMPLETED ]]; then
        state="$line_state"
      fi
    done <<<"$output"
    if ((all_terminal)); then
      echo "$state"
      echo "sbatch_wait: job $job_id $state exit=$(field ExitCode "$record") restarts=$(field Restarts "$record") after $(elapsed) s" >&2
      [[ "$state" == COMPLETED ]] && exit 0
      exit 1
    fi
  elif grep -qi 'invalid job id' <<<"$output"; then
    # Purged (MinJobAge after the end) or never existed: the final state is gone with it.
    echo "UNKNOWN"
    echo "sbatch_wait: job $job_id is unknown to slurmctld (last state seen: $state) after $(elapsed) s" >&2
    exit 1
  fi
  # Any other scontrol failure (slurmctld busy or restarting) is retried until the deadline.
  if (($(date +%s%N) >= deadline_ns)); then
    echo "TIMEOUT_WAITING"
    echo "sbatch_wait: job $job_id still $state after $(elapsed) s (timeout ${timeout_s} s)" >&2
    exit 124
  fi
  sleep 0.2
done
