"""Test-only fault (tests/test_failures.py): one rank raises in the middle of a run.

On PYTHONPATH this runs in every interpreter of a launch, but acts only in the rank whose ``RANK`` is
``$HARNESS_TEST_FAIL_RANK``: its loop's stop check (called once per step) raises a RuntimeError at step
``$HARNESS_TEST_FAIL_STEP``, while its peers go on into the next collective.
"""

import os

if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("HARNESS_TEST_FAIL_RANK"):
    from harness.train import signals

    _real = signals.agree_to_stop
    _steps = [0]

    def _agree_then_fail(device):
        _steps[0] += 1
        if _steps[0] >= int(os.environ.get("HARNESS_TEST_FAIL_STEP", "2")):
            raise RuntimeError(f"injected fault in rank {os.environ['RANK']} at step {_steps[0]}")
        return _real(device)

    signals.agree_to_stop = _agree_then_fail
