"""User-facing errors: one clear message naming the field, the value seen and the fix; exit code 2."""

from __future__ import annotations

# Exit codes of `harness train` (and the rank entry), one per run state, so a scheduler can act on them.
EXIT_COMPLETE = 0
"""The run finished (status.json: complete)."""
EXIT_FAILED = 1
"""A rank raised or died (status.json: failed, naming the rank); rerunning repeats the failure."""
EXIT_USER_ERROR = 2
"""Bad input, refused before anything started; nothing was written."""
EXIT_PREEMPTED = 75
"""Stopped by a signal after a complete checkpoint (EX_TEMPFAIL): run the same command to resume."""
EXIT_STALLED = 76
"""A rank stopped making progress and the run was ended (status.json: stalled): resume like a preemption."""
EXIT_ABORTED = 130
"""A second Ctrl-C: ended at once, without waiting for a checkpoint (128 + SIGINT)."""


class SpecError(Exception):
    """A mistake in the user's input that the user can fix.

    Every instance names the spec field (``section.key``) or input it is about, the value seen,
    and what to do instead. The CLI prints it without a traceback and exits with code 2.
    """

    def __init__(self, field: str, value: object, fix: str, reason: str = "") -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.reason = reason
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line (or few-line) message shown to the user."""
        shown = _show_value(self.value)
        why = f": {self.reason}" if self.reason else ""
        return f"{self.field} = {shown}{why}. Fix: {self.fix}"


class SpecErrors(SpecError):
    """Several problems found in one pass, reported together so a user fixes them in one go."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.field, first.value, first.fix, first.reason)

    @property
    def message(self) -> str:
        if len(self.errors) == 1:
            return self.errors[0].message
        lines = [f"{len(self.errors)} problems in the run spec:"]
        lines += [f"  - {e.message}" for e in self.errors]
        return "\n".join(lines)


def _show_value(value: object) -> str:
    """Render a value for an error message, short enough for one line."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."
