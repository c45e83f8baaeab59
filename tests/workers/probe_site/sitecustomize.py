"""Test-only probe (tests/test_launch_cluster.py): what environment a training rank ended up with.

On PYTHONPATH (the PDSH runner forwards PYTHONPATH to remote hosts) this runs in every interpreter, but
records only in a rank of ``python -m harness.train.entry``, at exit, after the entry has loaded the
launcher's env file. It writes ``$HARNESS_TEST_PROBE_DIR/rank<RANK>.json`` with the marker variable's
value and a SHA-256 of HF_TOKEN, never the token itself.
"""

import atexit
import hashlib
import json
import os
import sys


def _record() -> None:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    probe_dir = os.environ.get("HARNESS_TEST_PROBE_DIR")
    if spec is None or spec.name != "harness.train.entry" or not probe_dir:
        return
    token = os.environ.get("HF_TOKEN")
    seen = {
        "rank": os.environ.get("RANK"),
        "marker": os.environ.get("HARNESS_TEST_MARKER"),
        "hf_token_sha256": hashlib.sha256(token.encode()).hexdigest() if token is not None else None,
        "env_file_var": os.environ.get("HARNESS_ENV_FILE"),
    }
    with open(os.path.join(probe_dir, f"rank{seen['rank']}.json"), "w") as f:
        json.dump(seen, f)


atexit.register(_record)
