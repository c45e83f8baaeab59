#!/bin/bash
# A stand-in for scontrol in tests of the rendered sbatch script: hostnames, node address, requeue.
set -euo pipefail
case "$1 $2" in
  "show hostnames") printf '%s\n' fake-n1 fake-n2 ;;
  "show node") echo "NodeName=fake-n1 Arch=x86_64 NodeAddr=127.0.0.9 NodeHostName=box State=IDLE" ;;
  requeue*) printf '%s\n' "$2" >>"$FAKE_DIR/requeued" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
