"""A stand-in for the deepspeed runner in tests of ``harness train``'s outcome logic (no ranks started).

    python fake_launcher.py MODE RUN_DIR RECORD_JSON

Records what a launcher would see of the env file (its mode, whether the listed variables are in it,
whether they were left in its own environment), then acts out MODE: complete | preempted | silent |
crash (exit 7) | killed (SIGKILL itself, like an OOM-killed launcher).
"""

import json
import os
import signal
import sys
from pathlib import Path

mode, run_dir, record = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
seen = {"own_env_has_secret": "HF_TOKEN" in os.environ}
ds_env_file = os.environ.get("DS_ENV_FILE")
if ds_env_file:
    env_file = Path(Path(ds_env_file).read_text().strip().split("=", 1)[1])
    seen["env_file"] = str(env_file)
    seen["env_file_mode"] = oct(env_file.stat().st_mode & 0o777)
    seen["env_file_values"] = json.loads(env_file.read_text())
record.write_text(json.dumps(seen))
if mode in ("complete", "preempted"):
    (run_dir / "status.json").write_text(json.dumps({"state": mode, "step": 4}) + "\n")
elif mode == "crash":
    sys.exit(7)
elif mode == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
