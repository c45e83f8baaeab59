"""DeepSpeed hostfiles (``host slots=N`` per line), parsed strictly before anything launches.

DeepSpeed's own parser accepts any non-blank token as a host (``-oProxyCommand=...`` included, which
later lands in an ssh command line), ignores text after ``slots=N`` and finds duplicates only one at
a time. Here every problem is reported at once, each with its line number:

    node1 slots=8          # a comment
    node2 slots=8

Include/exclude filters use DeepSpeed's syntax (``node1@node2:0,1``) and must name hosts and slots
the hostfile has; after filtering, the slot count must equal the run's world size.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from harness.errors import SpecError, SpecErrors
from harness.launch.shell import control_chars

HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
"""A host as ssh, pdsh and DeepSpeed's include syntax all read it literally (no leading ``-``, no ``:``)."""
_SLOTS_RE = re.compile(r"slots=(\S*)")


@dataclass(frozen=True)
class HostSlots:
    """One hostfile line: a host, its slot (GPU) count and where it was written."""

    host: str
    slots: int
    line: int


def check_hostname(field: str, host: str, where: str = "") -> SpecError | None:
    """The problem with ``host`` as a hostname, or None if ssh/pdsh/DeepSpeed take it literally."""
    prefix = f"{where}: " if where else ""
    if control_chars(host):
        reason = f"{prefix}control character {', '.join(control_chars(host))} in the hostname"
    elif host.startswith("-"):
        reason = f"{prefix}a hostname starting with '-' is read by ssh and pdsh as an option"
    elif not HOSTNAME_RE.fullmatch(host):
        bad = "".join(sorted({c for c in host if not re.fullmatch(r"[A-Za-z0-9._-]", c)}))
        reason = (
            f"{prefix}characters {bad!r} are not allowed in a hostname (shell metacharacters or separators)"
        )
    else:
        return None
    return SpecError(
        field, host, "use a hostname of letters, digits, '.', '_' and '-' (not starting with '-')", reason
    )


def parse_hostfile(text: str, source: str = "hostfile", field: str = "launch.hostfile") -> list[HostSlots]:
    """Parse hostfile text; raise SpecErrors listing every bad line (with its number) at once."""
    errors: list[SpecError] = []
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        where = f"{source} line {number}"
        content = line.split("#", 1)[0].strip(" \t")
        if not content:
            continue
        if control_chars(content):
            errors.append(
                SpecError(
                    field,
                    line,
                    "remove control characters from the line",
                    f"{where}: control character {', '.join(control_chars(content))}",
                )
            )
            continue
        host, *rest = content.split()
        problem = check_hostname(field, host, where)
        if problem:
            errors.append(SpecError(field, line, problem.fix, problem.reason))
            continue
        if not rest:
            errors.append(
                SpecError(
                    field, line, f"write '{host} slots=N' (N GPUs on that host)", f"{where}: no slots=N"
                )
            )
            continue
        match = _SLOTS_RE.fullmatch(rest[0])
        slots = match.group(1) if match else None
        if slots is None or not re.fullmatch(r"[+-]?\d+", slots) or int(slots) < 1:
            errors.append(
                SpecError(
                    field,
                    line,
                    f"write '{host} slots=N' with N a positive whole number",
                    f"{where}: slots must be a positive integer, got {rest[0]!r}",
                )
            )
            continue
        if len(rest) > 1:
            errors.append(
                SpecError(
                    field,
                    line,
                    "keep only 'host slots=N' (and an optional # comment) on the line",
                    f"{where}: unexpected {' '.join(rest[1:])!r} after slots=N",
                )
            )
            continue
        if host in seen:
            errors.append(
                SpecError(
                    field,
                    line,
                    f"list {host} once (merge the two lines' slots)",
                    f"{where}: duplicate host, already on line {seen[host]}",
                )
            )
            continue
        seen[host] = number
        hosts.append(HostSlots(host, int(slots), number))
    if not hosts and not errors:
        errors.append(
            SpecError(field, source, "add one 'host slots=N' line per machine", "the hostfile lists no hosts")
        )
    if errors:
        raise SpecErrors(errors)
    return hosts


def load_hostfile(path: str, field: str = "launch.hostfile") -> list[HostSlots]:
    """Read and parse the hostfile at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            field,
            path,
            "point launch.hostfile at a readable 'host slots=N' file",
            f"cannot read it ({exc.__class__.__name__}: {exc})",
        ) from None
    return parse_hostfile(text, source=path, field=field)


def parse_filter(text: str, hosts: list[HostSlots], field: str) -> OrderedDict[str, list[int]]:
    """Parse an include/exclude filter (``node1@node2:0,2``) against the hostfile's hosts and slots.

    Returns host -> slot ids (all of the host's slots when none are named).
    """
    known = {h.host: h.slots for h in hosts}
    errors: list[SpecError] = []
    out: OrderedDict[str, list[int]] = OrderedDict()
    reject = control_chars(text)
    if reject:
        raise SpecError(field, text, "remove control characters", f"control character {', '.join(reject)}")
    for spec in text.split("@"):
        host, sep, slot_text = spec.partition(":")
        if host not in known:
            errors.append(
                SpecError(
                    field,
                    spec,
                    f"name hosts from the hostfile ({', '.join(known)})",
                    f"host {host!r} is not in the hostfile",
                )
            )
            continue
        if not sep:
            out[host] = list(range(known[host]))
            continue
        slots: list[int] = []
        for item in slot_text.split(","):
            if not item.isdigit() or int(item) >= known[host]:
                errors.append(
                    SpecError(
                        field,
                        spec,
                        f"use slot numbers 0..{known[host] - 1} (the hostfile gives "
                        f"{host} slots={known[host]})",
                        f"no slot {item!r} on {host}",
                    )
                )
                continue
            slots.append(int(item))
        out[host] = sorted(set(out.get(host, []) + slots))
    if errors:
        raise SpecErrors(errors)
    return out


def active_slots(
    hosts: list[HostSlots], include: str | None = None, exclude: str | None = None
) -> OrderedDict[str, list[int]]:
    """Host -> slot ids the launch uses after launch.include / launch.exclude, in hostfile order."""
    if include and exclude:
        raise SpecError("launch.include", include, "set launch.include or launch.exclude, not both")
    pool: OrderedDict[str, list[int]] = OrderedDict((h.host, list(range(h.slots))) for h in hosts)
    if include:
        chosen = parse_filter(include, hosts, "launch.include")
        pool = OrderedDict((h, chosen[h]) for h in pool if h in chosen)
    elif exclude:
        dropped = parse_filter(exclude, hosts, "launch.exclude")
        pool = OrderedDict(
            (h, [s for s in slots if s not in dropped.get(h, [])]) for h, slots in pool.items()
        )
    return OrderedDict((h, s) for h, s in pool.items() if s)


def check_world_size(
    active: OrderedDict[str, list[int]], world_size: int, field: str = "launch.hostfile"
) -> None:
    """Raise SpecError unless the active slots add up to the run's world size."""
    total = sum(len(s) for s in active.values())
    if total != world_size:
        shown = " + ".join(f"{h}:{len(s)}" for h, s in active.items()) or "no slots"
        raise SpecError(
            field,
            f"{total} slots ({shown})",
            f"make the hostfile (after launch.include/exclude) give {world_size} slots, or set "
            f"launch.nodes × launch.gpus_per_node to {total}",
            reason=f"the run is compiled for world size {world_size}",
        )


def render_hostfile(hosts: list[HostSlots]) -> str:
    """The validated hostfile in canonical form (what the launcher is given)."""
    return "".join(f"{h.host} slots={h.slots}\n" for h in hosts)
