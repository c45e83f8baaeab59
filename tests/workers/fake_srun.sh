#!/bin/bash
# A stand-in for srun in tests of the rendered sbatch script (tests/test_launch_pure.py): no Slurm needed.
# Records its argv (NUL-separated) and the rendezvous it was given in $FAKE_DIR, then acts out
# $FAKE_SRUN_MODE: complete | crash | silent | wait (until USR1, then "preempted" like a rank would).
set -euo pipefail
printf '%s\0' "$@" >"$FAKE_DIR/srun.argv"
printf '%s\n' "${MASTER_ADDR:-}" "${MASTER_PORT:-}" "${RANK:-unset}" >"$FAKE_DIR/srun.env"
run_dir="${*: -1}"
case "$FAKE_SRUN_MODE" in
  complete) printf '{"state": "complete", "step": 6}\n' >"$run_dir/status.json" ;;
  crash) exit 3 ;;
  silent) exit 0 ;;
  wait)
    trap 'printf "{\"state\": \"preempted\", \"step\": 3}\n" >"$run_dir/status.json"; echo USR1 >>"$FAKE_DIR/srun.signals"; exit 0' USR1
    touch "$FAKE_DIR/srun.started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 9
    ;;
esac
