"""What each rank's model-parallel shard holds: pipeline stages split like DeepSpeed's partitioner,
AutoTP's split of the decoder projections. The memory and speed models read parameters off these."""

from __future__ import annotations

from dataclasses import dataclass

from harness.planner.layout import Context, Layout


@dataclass(frozen=True, slots=True)
class Shard:
    """What one rank's model-parallel shard holds: parameters, decoder layers, head, biggest tensor."""

    params: int
    layers: int
    has_head: bool
    largest_tensor: int
    largest_layer: int


def _partition(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous split of ``weights`` into ``parts`` non-empty runs minimizing the heaviest run
    (what DeepSpeed's ``partition_balanced`` aims for); returns (start, stop) index pairs."""
    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        runs, acc = 1, 0
        for w in weights:
            if acc + w > mid:
                runs, acc = runs + 1, w
            else:
                acc += w
        if runs <= parts:
            hi = mid
        else:
            lo = mid + 1
    bounds, start, acc = [], 0, 0
    for i, w in enumerate(weights):
        left = len(weights) - i
        if i > start and (acc + w > lo or left < parts - len(bounds)):
            bounds.append((start, i))
            start, acc = i, 0
        acc += w
    bounds.append((start, len(weights)))
    while len(bounds) < parts:  # more parts than runs needed: split the longest run
        k = max(range(len(bounds)), key=lambda j: bounds[j][1] - bounds[j][0])
        a, b = bounds[k]
        bounds[k : k + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return bounds


def pipeline_shards(ctx: Context, stages: int) -> list[Shard]:
    """The parameters of each pipeline stage: [embedding, layer 0..L-1, final norm, head] split by
    parameter count (``parameters``) or by layer count (anything else). A tied head repeats the
    embedding on the last stage (DeepSpeed's TiedLayerSpec keeps a copy there)."""
    key = ("pipeline", stages)
    if key in ctx.cache:
        return ctx.cache[key]
    st = ctx.stats
    # A tied head is the embedding itself, except across stages: TiedLayerSpec keeps a copy on the last.
    head = st.lm_head_params or (st.vocab * st.hidden if st.tied and stages > 1 else 0)
    weights = [st.embed_params] + [st.layer_params] * st.layers + [st.final_params + head]
    layer_tensor = max(n for name, n in st.tensors if ".layers.0." in name or ".h.0." in name)
    if stages == 1:
        bounds = [(0, len(weights))]
    elif ctx.partition_method == "parameters":
        bounds = _partition(weights, stages)
    else:  # uniform: decoder layers spread evenly, embedding first, head last
        per, extra = divmod(st.layers, stages)
        bounds, start = [], 1
        for i in range(stages):
            stop = start + per + (1 if i < extra else 0)
            bounds.append((0 if i == 0 else start, len(weights) if i == stages - 1 else stop))
            start = stop
    shards = []
    for start, stop in bounds:
        layers = sum(1 for i in range(start, stop) if 0 < i <= st.layers)
        has_embed, has_head = start == 0, stop == len(weights)
        biggest = [layer_tensor] if layers else []
        if has_embed:
            biggest.append(st.vocab * st.hidden)
        if has_head and head:
            biggest.append(head)
        shards.append(
            Shard(
                params=sum(weights[start:stop]),
                layers=layers,
                has_head=has_head,
                largest_tensor=max(biggest or [st.hidden]),
                largest_layer=max(biggest or [st.hidden]),
            )
        )
    ctx.cache[key] = shards
    return shards


def tensor_parallel_shard(ctx: Context, tp: int) -> Shard:
    """One AutoTP rank's parameters: decoder-layer projections split t ways; norms, the embedding and
    the head replicated (AutoTP shards Linear layers inside the decoder blocks)."""
    key = ("tp", tp)
    if key in ctx.cache:
        return ctx.cache[key]
    st = ctx.stats
    prefix = ".layers.0." if st.model_type != "gpt2" else ".h.0."
    layer = [(name, n) for name, n in st.tensors if prefix in name]
    norms = sum(n for name, n in layer if "norm" in name or ".ln_" in name)
    split = st.layer_params - norms
    params = st.embed_params + st.final_params + st.lm_head_params + st.layers * (norms + -(-split // tp))
    largest = max([st.vocab * st.hidden, max(n for _, n in layer) // tp])
    shard = Shard(params, st.layers, True, largest, largest)
    ctx.cache[key] = shard
    return shard


def shards_of(ctx: Context, layout: Layout) -> list[Shard]:
    """The distinct model-parallel shards of a layout (one per pipeline stage; one under TP)."""
    if layout.pipeline_stages > 1:
        return pipeline_shards(ctx, layout.pipeline_stages)
    if layout.tensor_parallel > 1:
        return [tensor_parallel_shard(ctx, layout.tensor_parallel)]
    return pipeline_shards(ctx, 1)
