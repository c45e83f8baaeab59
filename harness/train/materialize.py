"""Weights for what a rank keeps, only: a model built on the meta device, then filled unit by unit.

The model is constructed with ``accelerate.init_empty_weights`` (parameters on the meta device, buffers
such as rotary frequencies real), which costs no memory at any size. Its parameters are then filled one
*init unit* at a time -- a decoder layer, an embedding, the final norm, the LM head (:func:`init_units`)
-- and only for the parameters this rank keeps (``keep``): a pipeline stage its layers, a
tensor-parallel rank its slices (``shard``), a plain data-parallel rank everything. The working set
on top of what is kept is one unit in fp32.

Fresh weights are a function of the parameter's name and the seed, not of construction order
(:class:`FreshInit`): each module of a unit is initialized by the model's own ``_init_weights`` with
the global RNG seeded from ``(seed, module name)``. So a pipeline stage, a tensor-parallel slice and a
single process that holds everything get the same values for the same name. Weights from a
safetensors checkpoint (:class:`SafetensorsWeights`) are read tensor by tensor, each from the one
file the index names, so a rank reads only its tensors.

Kept weights are stored in the run's dtype (bf16/fp16 runs never hold an fp32 copy of the model:
DeepSpeed builds the fp32 master copy only for the partition the rank owns).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

Shard = Callable[[str, torch.Tensor], torch.Tensor]
"""(parameter name, full fp32 value) -> the part this rank keeps (tensor parallel), else the value."""


def empty_model(cfg, attn_implementation: str) -> nn.Module:
    """The causal LM of ``cfg`` with every parameter on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.tie_weights()  # accelerate's empty parameters come untied
    return model


def init_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model cut into units that are initialized (and materialized) as a whole: the children of
    the model, its base model and their module lists, descended no further (a decoder layer, an
    embedding, a norm, the LM head). A container's own parameters, if any, are a unit of their own."""
    from transformers import PreTrainedModel

    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        container = isinstance(module, PreTrainedModel | nn.ModuleList | nn.ModuleDict)
        if not container:
            units.append((prefix, module))
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append((prefix, module))  # its direct parameters only (see _unit_params)
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return units


def _unit_params(name: str, unit: nn.Module, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of a unit; a container unit owns only its direct parameters."""
    recurse = unit is not model and not isinstance(unit, nn.ModuleList | nn.ModuleDict) and not _is_hf(unit)
    for local, param in unit.named_parameters(recurse=recurse, remove_duplicate=False):
        yield (f"{name}.{local}" if name else local), param


def owned_params(
    name: str, unit: nn.Module, model: nn.Module, owners: dict[int, str] | None = None
) -> list[str]:
    """Qualified names of the unit's parameters it owns (not the alias of a weight tied elsewhere)."""
    owners = param_owners(model) if owners is None else owners
    return [q for q, p in _unit_params(name, unit, model) if owners.get(id(p), q) == q]


def _is_hf(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def param_owners(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first qualified name (the owner of a tied weight: the input embedding)."""
    owners: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), name)
    return owners


def seed_for(seed: int, name: str) -> int:
    """A 63-bit RNG seed from the run's seed and a module's qualified name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class FreshInit:
    """Fresh weights: each module of a unit through the model's ``_init_weights``, seeded by its name."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.init_fn = model._init_weights
        self.seed = seed
        self.owners = param_owners(model)
        self.read: list[str] = []
        """Qualified names of the parameters computed so far (tests check what a rank touched)."""

    def unit_values(self, name: str, unit: nn.Module, wanted: list[str]) -> dict[str, torch.Tensor]:
        """fp32 values of the unit's parameters named in ``wanted`` (computed on a real copy of the unit)."""
        real, names = _real_copy(name, unit, self.owners)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            modules = list(real.named_modules(prefix=name))
            for qualified, module in reversed(modules):  # children first, as transformers does
                if not any(True for _ in module.parameters()):
                    continue  # dropout, activations: nothing to initialize
                torch.manual_seed(seed_for(self.seed, qualified))
                self.init_fn(module)
        values = {names[id(p)]: p.detach() for p in real.parameters() if names.get(id(p)) in wanted}
        self.read.extend(values)
        return values


def _real_copy(name: str, unit: nn.Module, owners: dict[int, str]) -> tuple[nn.Module, dict[int, str]]:
    """A copy of the (meta) unit with real, uninitialized fp32 parameters; buffers are kept as they are.
    Returns it and id(copy's parameter) -> qualified name. A parameter owned outside the unit (the tied
    LM head's weight) is flagged as initialized so that the unit's init leaves it alone."""
    memo = {id(b): b for b in unit.buffers()}  # buffers shared, not copied
    real = copy.deepcopy(unit, memo)
    names: dict[int, str] = {}
    fresh: dict[int, nn.Parameter] = {}
    for (local, meta_module, attr), (_, module, _) in zip(
        _param_slots(unit), _param_slots(real), strict=True
    ):
        meta_param = meta_module._parameters[attr]
        qualified = f"{name}.{local}" if name else local
        if id(meta_param) not in fresh:
            value = nn.Parameter(torch.empty(meta_param.shape, dtype=torch.float32), meta_param.requires_grad)
            if owners.get(id(meta_param), qualified) != qualified:
                value._is_hf_initialized = True  # tied to a parameter of another unit
            fresh[id(meta_param)] = value
            names[id(value)] = owners.get(id(meta_param), qualified)
        module._parameters[attr] = fresh[id(meta_param)]
    return real, names


def _param_slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Every (qualified local name, module, attribute) holding a parameter, tied duplicates included."""
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, param in mod._parameters.items():
            if param is not None:
                yield (f"{mod_name}.{attr}" if mod_name else attr), mod, attr


class SafetensorsWeights:
    """Weights from a safetensors checkpoint directory (``model.safetensors`` or a sharded index),
    each tensor read on its own from the file that holds it."""

    def __init__(self, directory: Path, base_prefix: str = "") -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        else:
            from safetensors import safe_open

            with safe_open(str(self.directory / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        self.base_prefix = base_prefix
        self.read: list[str] = []
        """Checkpoint keys read so far (tests check that a rank read only its own)."""

    @staticmethod
    def available(directory: Path) -> bool:
        """True when ``directory`` holds safetensors weights this class reads."""
        directory = Path(directory)
        return (directory / "model.safetensors.index.json").is_file() or (
            directory / "model.safetensors"
        ).is_file()

    def key_of(self, name: str) -> str | None:
        """The checkpoint key of a model parameter (with or without the base model's prefix)."""
        if name in self.files:
            return name
        prefix = f"{self.base_prefix}." if self.base_prefix else ""
        if prefix and name.startswith(prefix) and name[len(prefix) :] in self.files:
            return name[len(prefix) :]
        if prefix and f"{prefix}{name}" in self.files:
            return f"{prefix}{name}"
        return None

    def unit_values(self, name: str, unit: nn.Module, wanted: list[str]) -> dict[str, torch.Tensor]:
        """fp32 values of ``wanted`` parameters, each read alone; a missing key raises KeyError."""
        from safetensors import safe_open

        keys = {w: self.key_of(w) for w in wanted}
        missing = [w for w, k in keys.items() if k is None]
        if missing:
            raise KeyError(", ".join(missing))
        by_file: dict[str, list[str]] = {}
        for wanted_name, key in keys.items():
            by_file.setdefault(self.files[key], []).append(wanted_name)
        values: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with safe_open(str(self.directory / file), framework="pt") as f:
                for wanted_name in names:
                    values[wanted_name] = f.get_tensor(keys[wanted_name]).float()
                    self.read.append(keys[wanted_name])
        return values


def materialize(
    model: nn.Module,
    source: FreshInit | SafetensorsWeights,
    dtype: torch.dtype,
    keep: Callable[[str], bool] | None = None,
    shard: Shard | None = None,
    layout: nn.Module | None = None,
    optimizer=None,
) -> list[str]:
    """Give every kept meta parameter of ``model`` its real value in ``dtype``, unit by unit; the rest stay
    on the meta device. Returns the qualified names materialized.

    Parameters keep their identity (their storage is swapped in), so ties, module slots, attributes
    DeepSpeed set on them and optimizers already holding them all stay valid. ``layout`` is the
    model whose units and full shapes define the values (default ``model``): pass an untouched empty
    copy when ``model``'s modules were rewritten since (AutoTP replaced its linears with slices);
    ``optimizer``, one already built over ``model``'s parameters (see :func:`fill`)."""
    layout = model if layout is None else layout
    targets = dict(model.named_parameters(remove_duplicate=False))
    owners = param_owners(layout)
    names: list[str] = []
    replaced: dict[int, nn.Parameter] = {}
    for unit_name, unit in init_units(layout):
        wanted = [
            q
            for q in owned_params(unit_name, unit, layout, owners)
            if q in targets and targets[q].is_meta and (keep is None or keep(q))
        ]
        if not wanted:
            continue
        values = source.unit_values(unit_name, unit, wanted)
        for qualified in wanted:
            value = shard(qualified, values[qualified]) if shard is not None else values[qualified]
            old = targets[qualified]
            new = fill(old, value.to(dtype).contiguous())
            if new is not old:
                replaced[id(old)] = new
            names.append(qualified)
        del values
    if replaced:
        replace_params(model, replaced, optimizer)
    return names


def fill(param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """Make the (meta) parameter ``param`` hold ``value``, keeping the Python object and its attributes;
    returns it. When something holds a weak reference to it (torch then refuses to swap its storage), a
    new parameter with the same attributes is returned instead: put it where the old one was with
    :func:`replace_params`."""
    real = nn.Parameter(value, requires_grad=param.requires_grad)
    real.__dict__.update(param.__dict__)
    try:
        torch.utils.swap_tensors(param, real)
    except RuntimeError:
        return real
    return param


def replace_params(model: nn.Module, replaced: dict[int, nn.Parameter], optimizer=None) -> None:
    """Put each new parameter in every module slot (and optimizer param group) that held the old one."""
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is not None and id(param) in replaced:
                module._parameters[attr] = replaced[id(param)]
    for group in getattr(optimizer, "param_groups", ()):
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
