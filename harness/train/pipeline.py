"""Pipeline stages for any Hugging Face decoder-only causal LM, found by module structure.

    token embedding [+ position embedding, dropout] -> decoder layer 0..L-1 -> final norm -> LM head -> loss

:func:`plan_split` reads the structure off the model (no per-family copy): the base model under
``base_model_prefix``, ``get_input_embeddings()`` / ``get_output_embeddings()``, the one
``nn.ModuleList`` of ``num_hidden_layers`` decoder layers, a learned position embedding and dropout
before it, the final norm after it and a rotary embedding anywhere. Anything else makes it refuse with
the module it does not understand. :func:`check_split` then runs the composed pieces against the
model's own forward on a fixed batch and refuses if the logits differ, so a family whose forward does
more than its modules show (scaled embeddings, logit soft-capping) is refused rather than trained wrong.

Each pipeline layer wraps the HF modules themselves, so weights come from the model the
non-pipeline path builds (same constructor, same seed: identical initial weights) or from an HF
checkpoint. Only the hidden-state tensor crosses stage boundaries: every decoder layer makes its own
position ids, rotary (cos, sin) and causal mask. Tied input/output embeddings are a DeepSpeed
``TiedLayerSpec``. Layer checkpoints (``layer_XX-model_states.pt``) carry the HF names of what they
hold, which is how ``harness.train.mp_shards.pipeline_state_dict`` maps them back for ``harness export``.
The engine around the stages is built in ``harness.train.pipeline_engine``.

The model is built on the meta device; a stage fills only its own layers as DeepSpeed builds them
(:class:`ModelModules`), with the same values a single process would give them (fresh weights are a
function of the parameter's name and the seed). :func:`check_split` runs on a small model of the same
family (:func:`small_config`), so no rank ever materializes the whole model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import SpecError

TIED_KEY = "embed"
"""TiedLayerSpec key of a token embedding shared with the LM head."""


@dataclass(frozen=True)
class SplitPlan:
    """Where the pipeline pieces of an HF causal LM live, as qualified module names."""

    family: str
    token_embedding: str
    position_embedding: str | None
    embedding_dropout: str | None
    layers: tuple[str, ...]
    rotary: str | None
    final_norm: str
    head: str
    tied: bool
    """The LM head's weight is the token embedding's (GPT-2, small Qwen2)."""


def _refuse(family: str, what: str) -> SpecError:
    return SpecError(
        "parallel.pipeline_stages",
        family,
        "train this model with parallel.pipeline_stages: 1 (ZeRO or tensor_parallel split it instead)",
        reason=f"the {family} model cannot be split into pipeline stages: {what}",
    )


def plan_split(model: nn.Module) -> SplitPlan:
    """Find the embedding(s), decoder layers, final norm, rotary embedding and LM head of ``model``."""
    family = str(getattr(model.config, "model_type", type(model).__name__))
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        raise _refuse(family, f"no base model under base_model_prefix {prefix!r}")
    tok, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(tok, nn.Embedding):
        raise _refuse(family, f"its input embedding is {type(tok).__name__}, not an nn.Embedding")
    if not isinstance(head, nn.Linear):
        raise _refuse(family, f"its output embedding (LM head) is {type(head).__name__}, not an nn.Linear")
    head_name = None
    for name, child in model.named_children():
        if child is head:
            head_name = name
        elif child is not base:
            raise _refuse(
                family, f"it has {name!r} ({type(child).__name__}) beside the base model and LM head"
            )
    if head_name is None:
        raise _refuse(family, "its LM head is not a direct child of the model")

    num_layers = getattr(model.config, "num_hidden_layers", None)
    token = position = dropout = layers = rotary = norm = None
    for name, child in base.named_children():
        qualified = f"{prefix}.{name}"
        kind = type(child).__name__
        if child is tok:
            token = qualified
        elif isinstance(child, nn.ModuleList):
            if layers is not None:
                raise _refuse(family, f"more than one ModuleList under {prefix!r} ({layers}, {qualified})")
            if len(child) != num_layers:
                raise _refuse(
                    family, f"{qualified} holds {len(child)} modules, not num_hidden_layers={num_layers}"
                )
            layers = qualified
        elif "rotary" in kind.lower() and not any(True for _ in child.parameters()):
            rotary = qualified
        elif layers is None and isinstance(child, nn.Embedding) and position is None:
            position = qualified
        elif isinstance(child, nn.Dropout) and dropout is None and (layers is None or "emb" in name):
            dropout = qualified  # registered after the layers by some families (Phi: embed_dropout)
        elif layers is not None and "norm" in kind.lower() and norm is None:
            norm = qualified
        else:
            raise _refuse(
                family,
                f"{qualified} ({kind}) is none of: token/position embedding or dropout before the decoder "
                "layers, the decoder layers, the final norm after them, a rotary embedding",
            )
    if token is None:
        raise _refuse(family, f"its input embedding is not a direct child of {prefix!r}")
    if layers is None:
        raise _refuse(family, f"no ModuleList of decoder layers under {prefix!r}")
    if norm is None:
        raise _refuse(family, f"no final norm after {layers}")
    tied = head.weight is tok.weight
    if tied and head.bias is not None:
        raise _refuse(family, "its LM head shares the embedding weight but has its own bias")
    return SplitPlan(
        family=family,
        token_embedding=token,
        position_embedding=position,
        embedding_dropout=dropout,
        layers=tuple(f"{layers}.{i}" for i in range(num_layers)),
        rotary=rotary,
        final_norm=norm,
        head=head_name,
        tied=tied,
    )


class ModelModules:
    """The full model's modules by qualified name, released once this stage has taken its layers.

    ``fill(names)`` gives the parameters under those module names their values (the model is built on
    the meta device; see ``harness.train.materialize``): a stage's layers call it when DeepSpeed builds
    them, so a rank fills only the layers of its own stage."""

    def __init__(self, model: nn.Module, fill=None) -> None:
        self._by_name: dict[str, nn.Module] | None = dict(model.named_modules())
        self.config = model.config
        self._fill = fill

    def get(self, name: str) -> nn.Module:
        assert self._by_name is not None, "stage layers are built before the full model is released"
        return self._by_name[name]

    def take(self, names) -> None:
        """Fill the parameters of the modules ``names`` (and their children), if they are still empty."""
        if self._fill is None:
            return
        prefixes = tuple(f"{n}." for n in names)
        self._fill(keep=lambda qualified: qualified.startswith(prefixes))

    def release(self) -> None:
        self._by_name = None


class StageLayer(nn.Module):
    """A pipeline layer made of HF modules; its checkpoint records their HF names (extra state)."""

    def __init__(self, modules: ModelModules, hf_names: dict[str, str], tied_key: str | None = None) -> None:
        super().__init__()
        modules.take(hf_names.values())
        for local, qualified in hf_names.items():
            self.add_module(local, modules.get(qualified))
        self.hf_names = dict(hf_names)
        self.tied_key = tied_key

    def get_extra_state(self) -> dict[str, Any]:
        return {"hf_names": self.hf_names, "tied_key": self.tied_key}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("hf_names") != self.hf_names:
            raise RuntimeError(
                f"checkpoint layer holds {state.get('hf_names')} but this pipeline layer is {self.hf_names}"
            )


class TokenEmbedding(StageLayer):
    """input ids -> token embeddings (the first layer; also the tied LM head's weight)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class EmbeddingExtras(StageLayer):
    """Learned absolute positions and embedding dropout, as GPT-2 applies them after the token embedding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if "positions" in self.hf_names:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            hidden = hidden + self.positions(position_ids)
        if "dropout" in self.hf_names:
            hidden = self.dropout(hidden)
        return hidden


class DecoderLayer(StageLayer):
    """One HF decoder layer; makes its own position ids, rotary embedding and causal mask."""

    def __init__(self, modules: ModelModules, hf_names: dict[str, str], attention_type: str) -> None:
        super().__init__(modules, hf_names)
        self.config = modules.config
        self.attention_type = attention_type

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        make_mask = (
            create_sliding_window_causal_mask
            if self.attention_type == "sliding_attention"
            else create_causal_mask
        )
        kwargs: dict[str, Any] = {
            "attention_mask": make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            ),
            "position_ids": position_ids,
        }
        if "rotary" in self.hf_names:
            kwargs["position_embeddings"] = self.rotary(hidden, position_ids)
        out = self.layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class FinalNorm(StageLayer):
    """The norm after the last decoder layer."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class LMHead(StageLayer):
    """hidden states -> logits (an untied head)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def tied_lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: logits from the token embedding's weight (``nn.Linear`` without bias)."""
    return F.linear(hidden, embedding.embed.weight)


class CausalLMLoss:
    """The HF model's own causal-LM loss on (logits, labels); labels are the inputs, shifted inside."""

    def __init__(self, loss_function, vocab_size: int) -> None:
        self.loss_function = loss_function
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)


@functools.cache
def _decoder_class(hf_class: type) -> type:
    # Named after the HF class so that `partition_method: type:<regex>` can match either
    # "DecoderLayer" or the family's own name (LlamaDecoderLayer, GPT2Block, ...).
    return type(f"DecoderLayer_{hf_class.__name__}", (DecoderLayer,), {"__module__": __name__})


def _attention_type(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def layer_specs(plan: SplitPlan, modules: ModelModules) -> list:
    """DeepSpeed layer specs for ``plan``: embedding, [extras], decoder layers, final norm, LM head."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = {"embed": plan.token_embedding}
    specs: list = []
    if plan.tied:
        specs.append(TiedLayerSpec(TIED_KEY, TokenEmbedding, modules, embed, tied_key=TIED_KEY,
                                   tied_weight_attr=["embed.weight"]))  # fmt: skip
    else:
        specs.append(LayerSpec(TokenEmbedding, modules, embed))
    extras = {"positions": plan.position_embedding, "dropout": plan.embedding_dropout}
    extras = {k: v for k, v in extras.items() if v}
    if extras:
        specs.append(LayerSpec(EmbeddingExtras, modules, extras))
    for i, name in enumerate(plan.layers):
        names = {"layer": name, **({"rotary": plan.rotary} if plan.rotary else {})}
        cls = _decoder_class(type(modules.get(name)))
        specs.append(LayerSpec(cls, modules, names, attention_type=_attention_type(modules.config, i)))
    specs.append(LayerSpec(FinalNorm, modules, {"norm": plan.final_norm}))
    if plan.tied:
        specs.append(TiedLayerSpec(TIED_KEY, TokenEmbedding, modules, embed, tied_key=TIED_KEY,
                                   forward_fn=tied_lm_head, tied_weight_attr=["embed.weight"]))  # fmt: skip
    else:
        specs.append(LayerSpec(LMHead, modules, {"head": plan.head}))
    return specs


def _compose(specs: list) -> list:
    """Build every spec locally, as one pipeline stage holding all layers would (for the split check)."""
    from deepspeed.pipe import TiedLayerSpec

    tied: dict[str, nn.Module] = {}
    funcs = []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            funcs.append(functools.partial(spec.forward_fn, module) if spec.forward_fn else module)
        else:
            funcs.append(spec.build())
    return funcs


_WINDOW_KEYS = ("sliding_window", "window_size", "attention_window")


def check_split(model: nn.Module, plan: SplitPlan, specs: list, seq_len: int = 8) -> None:
    """Refuse the split unless the composed pipeline layers give the model's own logits on a fixed batch.

    The batch is 8 tokens long, or one token longer than the config's attention window when training
    sequences (``seq_len``) exceed it, so that a local-attention mask the layers do not rebuild shows.
    """
    windows = [w for k in _WINDOW_KEYS if isinstance(w := getattr(model.config, k, None), int) and w > 0]
    length = min(windows) + 1 if windows and seq_len > min(windows) else min(seq_len, 8)
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(2 * length).reshape(2, length) * 7919 + 13) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits
            got = ids
            for func in _compose(specs):
                got = func(got)
    except Exception as exc:  # noqa: BLE001 - any failure means the pieces do not compose
        raise _refuse(
            plan.family,
            f"its decoder layers need more than hidden states, position ids, rotary embedding and a "
            f"causal mask ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
        ) from None
    finally:
        model.train(was_training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise _refuse(
            plan.family,
            f"its embedding, decoder layers, final norm and LM head composed give different logits than its "
            f"forward (max |diff| {diff}); its forward does more than these modules",
        )
