"""The env file: how launch.env values (secrets included) reach ranks on other machines.

DeepSpeed's PDSH runner forwards variables by writing ``export K=V; ...`` into the one shell string it
hands to pdsh, and it logs that string (``cmd = pdsh ... export HF_TOKEN=hf_...``). So values never go
that way. The launcher writes them into ``<run>/launch/rank_env.json`` (mode 0600, created fresh,
removed after the run) and forwards only that file's path, as ``HARNESS_ENV_FILE``; every rank loads
it in :func:`harness.launch.rankenv.apply_scheduler_env` before anything else. JSON keeps every value
byte for byte (quotes, ``$(...)``, newlines): nothing in the file is ever read by a shell.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from harness.errors import SpecError, SpecErrors

ENV_FILE_VAR = "HARNESS_ENV_FILE"
"""Names the env file for the ranks; its value (a path) is the only thing on the command line."""
ALWAYS_FORWARDED = ("TORCH_EXTENSIONS_DIR",)
"""Forwarded when set, listed or not: the JIT op cache, so remote ranks reuse the launching machine's builds."""
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_names(names: Iterable[str], field: str = "launch.env") -> list[str]:
    """Return ``names`` de-duplicated, or raise SpecErrors for any that is not a variable name."""
    errors = [
        SpecError(
            f"{field}[{i}]",
            name,
            "list variable names only (letters, digits, _; not starting with a digit)",
            reason="not an environment variable name",
        )
        for i, name in enumerate(names)
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name)
    ]
    if errors:
        raise SpecErrors(errors)
    return list(dict.fromkeys(names))


def collect_env(names: Iterable[str], environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Values to forward (``launch.env`` plus :data:`ALWAYS_FORWARDED`, when set) and the listed names not set."""
    wanted = check_env_names(names)
    values = {n: environ[n] for n in [*wanted, *ALWAYS_FORWARDED] if n in environ}
    missing = [n for n in wanted if n not in environ]
    return values, missing


def masked(values: Mapping[str, str]) -> str:
    """The env file as ``--dry-run`` shows it: names only, every value hidden."""
    if not values:
        return "{}\n"
    shown = ",\n".join(f'  "{n}": "{"<hidden>" if v else ""}"' for n, v in values.items())
    return "{\n" + shown + "\n}\n"


def write_env_file(path: Path, values: Mapping[str, str]) -> Path:
    """Create ``path`` with mode 0600 holding ``values`` as JSON; a stale file is replaced, never reused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    # O_EXCL + O_NOFOLLOW: never write through a link someone planted; 0600 from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(dict(values), f)
    return path


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables in an env file written by :func:`write_env_file`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of string values")
    return data


def remove_env_file(path: Path | None) -> None:
    """Delete the env file (after the run, also when it failed)."""
    if path is not None:
        Path(path).unlink(missing_ok=True)
