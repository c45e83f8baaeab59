"""Read a run spec from YAML strictly: safe YAML, no duplicate keys, no tags, typed fields, ``--set``.

Every problem found in one pass is collected and raised together as :class:`SpecErrors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.errors import SpecError, SpecErrors
from harness.spec import PrecisionSection, RunSpec

_CONTROL_CHARS = {chr(c) for c in range(32)} - {"\t"} | {"\x7f"}


# Tags whose values are not plain data (bytes, sets, dates): a spec and a DeepSpeed JSON config hold
# none of them, and json.dumps cannot write them.
_NON_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("binary", "timestamp", "omap", "pairs", "set")}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently).

    It also reads an unquoted date as a string, and refuses the tags of non-plain values.
    """

    yaml_constructors = {
        tag: fn for tag, fn in yaml.SafeLoader.yaml_constructors.items() if tag not in _NON_PLAIN_TAGS
    }
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _NON_PLAIN_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise SpecError(
                    "spec",
                    "a list" if isinstance(key, list) else "a mapping",
                    f"use a plain name as the key (line {key_node.start_mark.line + 1})",
                    reason="a list or mapping used as a YAML key",
                ) from None
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SpecError(
                    f"{key}",
                    key,
                    f"remove one of the two '{key}' keys (the second is on line {line})",
                    reason="duplicate key in the YAML mapping",
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `lr: 1e-4` would load as the string '1e-4'.
# Read exponent floats the YAML 1.2 way, as every user expects.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    """Parse YAML text with ``safe_load`` semantics, refusing tags and duplicate keys."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise SpecError(
            source,
            tag.split("'")[1] if "'" in tag else tag,
            "remove the YAML tag: a run spec holds plain values only (tags such as !!python/... are refused)",
            reason="YAML tag not allowed",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(
            source, getattr(exc, "problem", str(exc)), f"fix the YAML syntax{where}", "not valid YAML"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(
            source, type(data).__name__, "write the spec as a mapping of sections (run:, model:, ...)"
        )
    return data


SHORTHAND_KEYS = {"precision": "precision.dtype"}
"""Sections whose scalar YAML shorthand (``precision: bf16``) names one of their keys."""


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Parse ``section.key=value`` pairs; one string may hold several, separated by whitespace.

    Values are YAML scalars (``1e-4`` → float, ``true`` → bool, ``[0.9, 0.95]`` → list). A section
    with a YAML shorthand takes it here too: ``precision=bf16`` is ``precision.dtype=bf16``.
    """
    out: list[tuple[str, Any]] = []
    for raw in pairs:
        for item in _split_pairs(raw):
            key, sep, value = item.partition("=")
            key = SHORTHAND_KEYS.get(key.strip(), key)
            if not sep or not key or "." not in key:
                raise SpecError(
                    "--set",
                    item,
                    "write overrides as section.key=value, e.g. --set train.steps=10 optimizer.lr=1e-4",
                )
            out.append((key.strip(), parse_yaml(f"v: {value}", "--set").get("v") if value.strip() else ""))
    return out


def _split_pairs(raw: str) -> list[str]:
    """Split ``a.b=1 c.d=[1, 2]`` on whitespace that starts a new ``key=``."""
    items: list[str] = []
    for token in raw.split():
        if items and ("=" not in token or token.startswith(("=", ",")) or _open_brackets(items[-1])):
            items[-1] += " " + token
        else:
            items.append(token)
    return items


def _open_brackets(text: str) -> bool:
    return text.count("[") > text.count("]") or text.count("{") > text.count("}")


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in the raw mapping (creating sections as needed)."""
    for dotted, value in overrides:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if node is data and part == "precision" and isinstance(child, str):
                child = {"dtype": child}  # `precision: bf16` is short for `precision: {dtype: bf16}`
                node[part] = child
            if not isinstance(child, dict):
                child = {} if child is None or part not in node else child
                if not isinstance(child, dict):
                    raise SpecError(dotted, value, f"'{part}' is not a section; set a key that exists")
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


MAX_SPEC_BYTES = 1_000_000
"""Specs are a few KB; a bigger file is a wrong path (a data file), and YAML parsing it takes minutes."""


def load_spec(
    path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None
) -> RunSpec:
    """Load, override and type-check a run spec. Raises SpecError(s) naming every problem."""
    if text is None:
        if path is None:
            raise SpecError("SPEC", None, "pass the path of a run spec YAML file")
        p = Path(path)
        if not p.is_file():
            raise SpecError(
                "SPEC", str(path), "pass the path of an existing run spec YAML file", "no such file"
            )
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                "SPEC",
                str(path),
                "pass the run spec itself (a few KB of YAML); data belongs in data.files",
                reason=f"{size:,} bytes, over the {MAX_SPEC_BYTES:,}-byte limit for a spec",
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(
                "SPEC", str(path), "save the spec as UTF-8 text", f"not UTF-8 (byte {exc.start})"
            ) from None
    data = parse_yaml(text, str(path or "<spec>"))
    data = apply_overrides(data, parse_overrides(overrides or []))
    return spec_from_dict(data)


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    """Build a typed RunSpec from a plain mapping, collecting every problem."""
    errors: list[SpecError] = []
    spec = _build(RunSpec, data, "", errors)
    if errors:
        raise SpecErrors(errors)
    return spec


def _build(cls: type, data: Any, prefix: str, errors: list[SpecError]) -> Any:
    if cls is PrecisionSection and isinstance(data, str):
        data = {"dtype": data}
    where = prefix.rstrip(".") or "spec"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(SpecError(where, data, f"write '{where}' as a mapping of keys ({_field_list(cls)})"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            errors.append(_unknown_key(path, str(key), names))
            continue
        kwargs[key] = _coerce(hints[key], value, path, errors)
    return cls(**kwargs)


def _unknown_key(path: str, key: str, names: list[str]) -> SpecError:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
    return SpecError(path, key, f"remove it or rename it; {hint}", reason="unknown key")


def _field_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(tp: Any, value: Any, path: str, errors: list[SpecError]) -> Any:
    """Check ``value`` against the annotation ``tp``; append an error and return the value if it fails."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".", errors)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        problems: list[SpecError] = []
        for member in members:
            if member is type(None):
                continue
            trial: list[SpecError] = []
            result = _coerce(member, value, path, trial)
            if not trial:
                return result
            problems.extend(trial)
        errors.append(SpecError(path, value, f"use {_describe(tp)}", reason="wrong type"))
        return value
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options and type(value) is type(options[options.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        errors.append(SpecError(path, value, f"use one of {', '.join(map(str, options))}{hint}"))
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            errors.append(SpecError(path, value, f"use a list, e.g. [{_example(item_tp)}]"))
            return value
        return [_coerce(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(SpecError(path, value, "use a mapping of key: value pairs"))
        else:
            _check_plain(value, path, errors)
        return value
    if tp is Any:
        _check_plain(value, path, errors)
        return value
    return _coerce_scalar(tp, value, path, errors)


def _coerce_scalar(tp: type, value: Any, path: str, errors: list[SpecError]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML is a float; accept whole numbers
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                errors.append(SpecError(path, value, "use a finite number", reason="not a finite number"))
            return float(value)
    elif tp is str and isinstance(value, str):
        if _CONTROL_CHARS & set(value):
            errors.append(SpecError(path, value, "remove newlines and control characters", "control char"))
        return value
    errors.append(SpecError(path, value, f"use {_describe(tp)}", reason="wrong type"))
    return value


def _check_plain(value: Any, path: str, errors: list[SpecError]) -> None:
    """Free-form values (raw deepspeed keys, HF overrides) end up in JSON: finite numbers, clean strings."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, path, errors)
            _check_plain(item, f"{path}.{key}", errors)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]", errors)
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(SpecError(path, value, "use a finite number", reason="not a finite number"))
    elif isinstance(value, str) and _CONTROL_CHARS & set(value):
        errors.append(SpecError(path, value, "remove newlines and control characters", "control character"))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(m) for m in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(o) for o in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _example(tp: Any) -> str:
    return {int: "1, 2", float: "0.9, 0.95", str: "NAME"}.get(tp, "...")


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """The spec as plain data (for writing the resolved spec into the run directory)."""
    return dataclasses.asdict(spec)


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML that :func:`load_spec` reads back to an equal spec."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=False)
