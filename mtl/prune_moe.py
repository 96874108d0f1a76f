"""Fixed inference architecture from a trained task-expert MoE (DESIGN.md §4.4).

``fix_moe`` freezes every task's (or domain's) route: its top-k experts per MoE layer with
the router's weights, computed from its embedding exactly as the routed model computes them.
The result is one static module, with no router, that equals the routed model in eval mode:

    * streams with the same route prefix (same experts and weights at every MoE layer so far)
      are one stream, computed once; before the first MoE layer there is one stream;
    * each kept expert runs once per layer, on its input streams stacked on the batch dim;
      experts no route uses are removed;
    * a stream's MoE output is ``post(Σ_e w_e · expert_e(h))`` summed in ascending expert
      order, the order of the routed model's ``index_add``s.

Multi-domain: the fixed model takes the domain, ``fixed(x, domain)``. Every distinct domain
stream runs on the whole batch and each sample then takes its domain's features (static
shapes, so ``torch.export`` works; it costs up to one pass per distinct route, where the
routed model groups samples). If every domain shares one route, ``domain`` may be omitted.

A model with input-conditioned routing (``model.moe.input_routing``) has no per-task route to
freeze: ``fix_moe`` refuses it rather than fix an approximation (e.g. each task's top-k of
its mean routing over a calibration batch) whose outputs would differ from the trained model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl.models.flops import count_flops
from mtl.models.moe import MoEBlock, TaskMoE
from mtl.models.router import top_k_routes


def batched(fn: Callable[[Tensor], Tensor], streams: list[Tensor]) -> list[Tensor]:
    """``fn`` in one call over the streams stacked on the batch dim, split back."""
    if len(streams) == 1:
        return [fn(streams[0])]
    out = fn(torch.cat(streams))
    return list(out.split([s.shape[0] for s in streams]))


class FixedShared(nn.Module):
    """A shared block, run once over every stream."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, streams: list[Tensor]) -> list[Tensor]:
        return batched(self.block, streams)


class FixedMoELayer(nn.Module):
    """One MoE layer with frozen routes.

    Args:
        block: The MoE block holding only the kept experts (``MoEBlock.keep``).
        inputs: Per kept expert, the input streams it runs on.
        outputs: Per output stream, (its input stream, ``[(kept expert, weight), ...]`` in
            ascending expert id).
    """

    def __init__(
        self,
        block: MoEBlock,
        inputs: list[list[int]],
        outputs: list[tuple[int, list[tuple[int, float]]]],
    ) -> None:
        super().__init__()
        self.block = block
        self.inputs = inputs
        self.sources = [src for src, _ in outputs]
        self.terms: list[list[tuple[int, int]]] = []  # (kept expert, index into weights)
        weights: list[float] = []
        for _, terms in outputs:
            self.terms.append([(p, len(weights) + i) for i, (p, _) in enumerate(terms)])
            weights.extend(w for _, w in terms)
        device = next(block.parameters()).device
        self.register_buffer("weights", torch.tensor(weights, device=device))

    def forward(self, streams: list[Tensor]) -> list[Tensor]:
        sizes = [s.shape[0] for s in streams]
        residual, h = self.block.pre(torch.cat(streams) if len(streams) > 1 else streams[0])
        hs = h.split(sizes)
        rs = residual.split(sizes) if residual is not None else [None] * len(streams)
        ys: dict[tuple[int, int], Tensor] = {}
        for p, (expert, srcs) in enumerate(zip(self.block.experts, self.inputs, strict=True)):
            for src, y in zip(srcs, batched(expert, [hs[s] for s in srcs]), strict=True):
                ys[p, src] = y
        out = []
        for src, terms in zip(self.sources, self.terms, strict=True):
            mixed = None
            for p, i in terms:
                y = ys[p, src]
                term = self.weights[i].to(y.dtype) * y
                mixed = term if mixed is None else mixed + term
            out.append(self.block.post(rs[src], mixed))
        return out


class FixedMoE(nn.Module):
    """The static network read off a routed ``TaskMoE``: stem, fixed layers, neck, heads.

    Args:
        stem: Shared stem.
        layers: ``FixedShared`` and ``FixedMoELayer`` modules in order.
        neck: Stream -> feature map.
        heads: Head name -> head.
        streams: Key (task, or domain for a multi-domain set) -> its final stream.
        domains: The task set's domains (empty for a multi-task set); the value of
            ``domain`` indexes them. Domains not in ``streams`` read stream 0: a model fixed
            for some domains (e.g. to count their FLOPs) must be given only those.
    """

    def __init__(
        self,
        stem: nn.Module,
        layers: list[nn.Module],
        neck: nn.Module,
        heads: nn.ModuleDict,
        streams: dict[str, int],
        domains: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.neck = neck
        self.heads = heads
        self.streams = dict(streams)
        self.by_domain = bool(domains)
        table = [streams.get(d, 0) for d in domains]
        self.register_buffer("domain_stream", torch.tensor(table, dtype=torch.long))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        size = (x.shape[-2], x.shape[-1])
        streams = [self.stem(x)]
        for layer in self.layers:
            streams = layer(streams)
        features = batched(self.neck, streams)
        if not self.by_domain:
            return {t: head(features[self.streams[t]], size) for t, head in self.heads.items()}
        if len(features) == 1:
            chosen = features[0]
        elif domain is None:
            raise ValueError("domains route differently in this model: pass domain (B,)")
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            chosen = torch.stack(features)[self.domain_stream[domain], rows]  # (B, C, h, w)
        return {name: head(chosen, size) for name, head in self.heads.items()}


def _fix_layer(
    block: MoEBlock, routes: dict[str, tuple[int, list[int], list[float]]]
) -> tuple[FixedMoELayer, dict[str, int]]:
    """Key -> (input stream, experts, weights) at one layer -> the fixed layer and every
    key's output stream; keys with the same input stream and route share one."""
    outputs: dict[tuple[int, tuple[int, ...], tuple[float, ...]], int] = {}
    stream_of = {}
    for key, (src, ids, weights) in routes.items():
        stream_of[key] = outputs.setdefault((src, tuple(ids), tuple(weights)), len(outputs))
    used = sorted({e for _, ids, _ in outputs for e in ids})
    kept = {e: p for p, e in enumerate(used)}
    inputs = [sorted({src for src, ids, _ in outputs if e in ids}) for e in used]
    plan = [(src, [(kept[e], w) for e, w in zip(ids, ws, strict=True)]) for src, ids, ws in outputs]
    return FixedMoELayer(block.keep(used), inputs, plan), stream_of


@torch.no_grad()
def fix_moe(model: TaskMoE, keys: list[str] | None = None) -> FixedMoE:
    """The static, pruned network equal to ``model`` in eval mode.

    Args:
        model: A routed model without input routing; it is not modified.
        keys: Tasks (domains for a multi-domain set) to keep; None keeps all. A subset
            gives the cost of serving only those, e.g. per-task FLOPs.

    Raises:
        ValueError: Input-conditioned routing (see the module docstring), or unknown keys.
    """
    if model.router.input_embed is not None:
        raise ValueError(
            "fix_moe: this model routes on the image (model.moe.input_routing), so a task "
            "has no single route to freeze; train with input_routing: false to fix it"
        )
    keys = list(model.keys) if keys is None else list(keys)
    unknown = sorted(set(keys) - set(model.keys))
    if unknown or not keys:
        raise ValueError(f"fix_moe: keys {keys} must be a non-empty subset of {model.keys}")
    ids, weights = top_k_routes(model.key_probs(), model.top_k, model.renormalize)  # (K, L, k)
    index = {key: model.keys.index(key) for key in keys}
    stream_of = dict.fromkeys(keys, 0)
    layers: list[nn.Module] = []
    for block in model.blocks:
        if not isinstance(block, MoEBlock):
            layers.append(FixedShared(copy.deepcopy(block)))
            continue
        m = sum(isinstance(layer, FixedMoELayer) for layer in layers)
        routes = {
            key: (stream_of[key], ids[i, m].tolist(), weights[i, m].tolist())
            for key, i in index.items()
        }
        layer, stream_of = _fix_layer(block, routes)
        layers.append(layer)
    heads = list(model.heads) if model.by_domain else keys
    fixed = FixedMoE(
        copy.deepcopy(model.stem),
        layers,
        copy.deepcopy(model.neck),
        nn.ModuleDict({t: copy.deepcopy(model.heads[t]) for t in heads}),
        stream_of,
        model.taskset.domains,
    )
    return fixed.to(next(model.parameters()).device).eval()


def moe_flops(model: TaskMoE, x: Tensor) -> dict[str, int]:
    """FLOPs of the fixed model on images ``x``: ``"all"`` (every task or domain in one pass)
    and, per task or domain, a model fixed for it alone. For a multi-domain set, ``"all"``
    is the mixed-domain pass (every distinct domain stream over the whole batch)."""
    domain = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    flops = {"all": count_flops(fix_moe(model), x, domain)}
    for i, key in enumerate(model.keys):
        own = domain + i if model.by_domain else None
        flops[key] = count_flops(fix_moe(model, [key]), x, own)
    return flops


__all__ = ["FixedMoE", "FixedMoELayer", "FixedShared", "batched", "fix_moe", "moe_flops"]
