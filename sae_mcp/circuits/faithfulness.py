"""Faithfulness of a circuit, as Marks et al. (2024) define it, with zero or mean ablation:

    faithfulness = (m(C) - m(empty)) / (m(M) - m(empty))      completeness = (m(M \\ C) - m(empty)) / (m(M) - m(empty))

m(M) the model's metric; m(C) with every node outside the circuit ablated at every traced SAE (every SAE spliced
with its error term, so the circuit's nodes are recomputed from what still reaches them); m(empty) with every node
ablated; m(M \\ C) with the circuit's nodes ablated. BOS is never ablated. Zero ablation sets a node to 0 (with
every node zeroed an SAE writes its b_dec); mean ablation sets a feature to its mean activation and an error node to
the SAE's mean error vector, both over corpus tokens (ablation_means; Marks et al.'s choice: a zeroed error term
removes what the SAE misses, often far from anything the model sees).

Both are ratios over m(M) - m(empty). Where that gap is small, or the circuit overshoots what the model does, they
leave [0, 1] and stop being shares of the behaviour (measured on the demo: 'Once upon a time, there was a little girl
named Lily. She' -> ' was', 10 nodes: gap 0.44, faithfulness 5.33, completeness -0.90); ratio_warning says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_mcp.circuits.nodes import Node
from sae_mcp.engine.attribution_checks import ERROR, MetricAt
from sae_mcp.engine.runtime import Engine, FwdHooks
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import rounded
from sae_mcp.results.circuits import Faithfulness


@dataclass(frozen=True)
class AblationMeans:
    """What mean ablation sets one SAE's nodes to: means over corpus document tokens (BOS left out)."""

    features: torch.Tensor  # [d_sae] each feature's mean activation (its zeros included)
    error: torch.Tensor  # [d_in] the mean error term x - decode(encode(x))
    tokens: int  # document tokens averaged over


MEAN_CHUNK_ELEMENTS = 1 << 25  # activations held at once while averaging: 128 MB of fp32 (24576 wide: ~1.4k tokens)


def ablation_means(engine: Engine, s: LoadedSAE, tokens: torch.Tensor,
                   after_chunk: Callable[[int], None] | None = None) -> AblationMeans:
    """tokens [B, T] (corpus windows) -> the SAE's AblationMeans over their document tokens, a few windows at a
    time (the [tokens, d_sae] activations of all of them could be GBs), taking the device per chunk: other calls
    answer between chunks, and an abandoned call stops at the next one. `after_chunk(chunks done)` runs after each,
    off the device. The error is the one the spliced model's hook_sae_error sees: the SAE's input minus its
    reconstruction."""
    first = 1 if s.prepend_bos else 0  # BOS is context, not a document token
    per_chunk = max(1, MEAN_CHUNK_ELEMENTS // (tokens.shape[1] * s.d_sae))  # windows at a time
    # chunk sums in fp32 on the device, added up in fp64 on the CPU (MPS has no fp64)
    feat_sum, err_sum = torch.zeros(s.d_sae, dtype=torch.float64), torch.zeros(s.d_in, dtype=torch.float64)
    n = 0
    for i, chunk in enumerate(tokens.split(per_chunk)):
        with engine.device_work(), torch.inference_mode():
            x = engine.forward_to_hook(chunk.to(engine.device), s)[:, first:].flatten(0, 1)  # [N, d_in]
            acts = engine.encode(s, x)  # [N, d_sae]
            feat_sum += acts.sum(0, dtype=torch.float32).cpu()
            err_sum += (x.to(acts.dtype) - s.sae.decode(acts)).sum(0, dtype=torch.float32).cpu()  # [d_in]
            n += int(x.shape[0])
        if after_chunk is not None:
            after_chunk(i + 1)
    return AblationMeans(features=(feat_sum / max(n, 1)).float(), error=(err_sum / max(n, 1)).float(), tokens=n)


def _masked_metric(engine: Engine, saes: list[LoadedSAE], tokens: torch.Tensor, at: MetricAt,
                   keep: list[tuple[torch.Tensor, torch.Tensor]], means: list[AblationMeans] | None) -> float:
    """The metric with every traced SAE spliced (error term on), its features kept where keep[i][0] [S, d_sae] is
    True and its error where keep[i][1] [S] is; elsewhere zeroed (means None) or set to means[i]."""
    model = engine.model
    hooks: FwdHooks = []
    for i, (s, (feat, err)) in enumerate(zip(saes, keep)):
        if means is None:
            hooks.append((f"{s.hook_name}.hook_sae_acts_post", lambda a, hook, m=feat: a * m.to(a.dtype)))
            hooks.append((f"{s.hook_name}.hook_sae_error",
                          lambda e, hook, m=err: e * m.to(e.dtype).reshape(1, -1, *[1] * (e.ndim - 2))))
            continue
        mf, me = means[i].features, means[i].error  # [d_sae], [d_in]
        hooks.append((f"{s.hook_name}.hook_sae_acts_post",  # a [1, S, d_sae]
                      lambda a, hook, m=feat, v=mf: torch.where(m.to(a.device), a, v.to(a.device, a.dtype))))
        hooks.append((f"{s.hook_name}.hook_sae_error",  # e [1, S, d_in]
                      lambda e, hook, m=err, v=me: torch.where(m.to(e.device)[:, None], e, v.to(e.device, e.dtype))))
    with engine.device_work(), torch.inference_mode(), model.saes(saes=[s.sae for s in saes], use_error_term=True):
        with model.hooks(fwd_hooks=hooks):
            return float(at.of(model(tokens, return_type="logits"))[0])


def _masks(saes: list[LoadedSAE], S: int, first: int, nodes: list[Node], inside: bool
           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per SAE (feature mask [S, d_sae], error mask [S]): `nodes` kept and the rest ablated (inside=True), or
    `nodes` ablated and the rest kept; BOS always kept."""
    out = []
    for i, s in enumerate(saes):
        feat = torch.full((S, s.d_sae), not inside, dtype=torch.bool)
        err = torch.full((S,), not inside, dtype=torch.bool)
        feat[:first], err[:first] = True, True
        for n in nodes:
            if n.sae == i:
                if n.feature == ERROR:
                    err[n.position] = inside
                else:
                    feat[n.position, n.feature] = inside
        out.append((feat, err))
    return out


def faithfulness(engine: Engine, saes: list[LoadedSAE], prepend_bos: bool, tokens: torch.Tensor, at: MetricAt,
                 metric: float, circuit: list[Node], means: list[AblationMeans] | None = None) -> Faithfulness:
    """The metric of the model, the circuit alone, without it and with nothing, and the two ratios; ablated nodes
    zeroed, or set to `means` (one per SAE) when given."""
    S, first = tokens.shape[1], 1 if prepend_bos else 0
    empty = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, [], inside=True), means)
    with_c = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, circuit, inside=True), means)
    without = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, circuit, inside=False), means)
    gap = metric - empty
    return Faithfulness(
        ablation="zero" if means is None else "mean",
        mean_tokens=None if means is None else min(m.tokens for m in means),
        metric_full=rounded(metric, 6), metric_empty=rounded(empty, 6),
        metric_circuit=rounded(with_c, 6), metric_without_circuit=rounded(without, 6),
        faithfulness=rounded((with_c - empty) / gap, 4) if abs(gap) > 1e-9 else None,
        completeness=rounded((without - empty) / gap, 4) if abs(gap) > 1e-9 else None,
    )




OVERSHOOT = 0.2  # a ratio further than this outside [0, 1] is not read as a share (a 0.2 margin for near-1 noise)


def ratio_warning(f: Faithfulness) -> str | None:
    """Faithfulness or completeness outside [0, 1] by more than OVERSHOOT: say they are not shares, and why."""
    outside = [f"{name} {value:.3g}" for name, value in (("faithfulness", f.faithfulness),
                                                         ("completeness", f.completeness))
               if value is not None and not -OVERSHOOT <= value <= 1 + OVERSHOOT]
    if not outside:
        return None
    gap = f.metric_full - f.metric_empty
    return (f"{' and '.join(outside)} outside [0, 1]: not a share of the behaviour. Both divide by m(model) - "
            f"m(nothing) = {gap:.3g}; the circuit alone gives {f.metric_circuit:.4g} and without it "
            f"{f.metric_without_circuit:.4g} against the model's {f.metric_full:.4g} and nothing's "
            f"{f.metric_empty:.4g}: read those, or trace an answer the traced SAEs carry more of")
