"""Quoting for every value that reaches a shell: a command line, a remote pdsh string, an sbatch script.

Two rules, applied everywhere a launcher builds text a shell will read:

* control characters (newline, CR, NUL, tab, escape, ... — Unicode category Cc) are refused: a newline
  ends an ``#SBATCH`` directive and starts a command, and no quoting survives every consumer;
* everything else is quoted with :func:`shlex.quote`, so it arrives byte for byte — or, where a consumer
  re-splits or re-quotes the text itself (DeepSpeed's PDSH runner), it must be a plain token
  (:func:`require_plain`) and anything else is refused with the field that fixes it.
"""

from __future__ import annotations

import re
import shlex
import unicodedata

from harness.errors import SpecError

PLAIN_CHARS = "A-Za-z0-9_@%+=:,./-"
"""Characters that mean nothing to a POSIX shell (the set DeepSpeed's PDSH runner leaves unquoted)."""
_PLAIN = re.compile(f"[{PLAIN_CHARS}]+")


def control_chars(value: str) -> list[str]:
    """The control characters in ``value``, as escapes (``['\\n', '\\x00']``), in order of appearance."""
    return [repr(c)[1:-1] for c in dict.fromkeys(value) if unicodedata.category(c) == "Cc"]


def reject_control(field: str, value: str) -> str:
    """Return ``value`` unchanged, or raise SpecError naming ``field`` if it holds a control character."""
    found = control_chars(value)
    if found:
        raise SpecError(
            field,
            value,
            "remove newlines, tabs and other control characters",
            reason=f"control character {', '.join(found)} would break the launch script or command line",
        )
    return value


def quote(field: str, value: str) -> str:
    """``value`` shell-quoted (byte for byte through ``sh``/``bash``); control characters refused."""
    return shlex.quote(reject_control(field, value))


def join(cmd: list[str], field: str = "command") -> str:
    """A command line as one shell-quoted string (what ``--dry-run`` prints and a script runs)."""
    return " ".join(quote(field, part) for part in cmd)


def is_plain(value: str) -> bool:
    """True if ``value`` is non-empty and needs no quoting in any shell."""
    return bool(_PLAIN.fullmatch(value))


def require_plain(field: str, value: str, why: str) -> str:
    """Return ``value`` if it is a plain token (see :data:`PLAIN_CHARS`); else raise SpecError.

    For values that a consumer outside the harness places unquoted into a shell string (``why`` says
    which), so quoting them here would not survive.
    """
    reject_control(field, value)
    if not is_plain(value):
        bad = sorted({c for c in value if not _PLAIN.fullmatch(c)})
        raise SpecError(
            field,
            value,
            f"use only letters, digits and {PLAIN_CHARS[9:]} here",
            reason=f"{why}; {''.join(bad)!r} would be read by the remote shell",
        )
    return value
