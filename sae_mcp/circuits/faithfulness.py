"""Faithfulness of a circuit, as Marks et al. (2024) define it, with zero ablation:

    faithfulness = (m(C) - m(empty)) / (m(M) - m(empty))      completeness = (m(M \\ C) - m(empty)) / (m(M) - m(empty))

m(M) the model's metric; m(C) with every node outside the circuit zeroed at every traced SAE (every SAE spliced with
its error term, so the circuit's nodes are recomputed from what still reaches them); m(empty) with every node
zeroed (each SAE then writes its b_dec); m(M \\ C) with the circuit's nodes zeroed. BOS is never ablated.

Both are ratios over m(M) - m(empty). Where that gap is small, or the circuit overshoots what the model does, they
leave [0, 1] and stop being shares of the behaviour (measured on the demo: 'Once upon a time, there was a little girl
named Lily. She' -> ' was', 10 nodes: gap 0.44, faithfulness 5.33, completeness -0.90); ratio_warning says so.
"""

from __future__ import annotations

import torch

from sae_mcp.circuits.nodes import Node
from sae_mcp.engine.attribution_checks import ERROR, MetricAt
from sae_mcp.engine.runtime import Engine, FwdHooks
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import rounded
from sae_mcp.results.circuits import Faithfulness


def _masked_metric(engine: Engine, saes: list[LoadedSAE], tokens: torch.Tensor, at: MetricAt,
                   keep: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The metric with every traced SAE spliced (error term on), its features multiplied by keep[i][0] [S, d_sae]
    and its error by keep[i][1] [S] (1 = kept, 0 = zero-ablated)."""
    model = engine.model
    hooks: FwdHooks = []
    for s, (feat, err) in zip(saes, keep):
        hooks.append((f"{s.hook_name}.hook_sae_acts_post", lambda a, hook, m=feat: a * m.to(a.dtype)))
        hooks.append((f"{s.hook_name}.hook_sae_error",
                      lambda e, hook, m=err: e * m.to(e.dtype).reshape(1, -1, *[1] * (e.ndim - 2))))
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
                 metric: float, circuit: list[Node]) -> Faithfulness:
    """The metric of the model, the circuit alone, without it and with nothing, and the two ratios."""
    S, first = tokens.shape[1], 1 if prepend_bos else 0
    empty = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, [], inside=True))
    with_c = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, circuit, inside=True))
    without = _masked_metric(engine, saes, tokens, at, _masks(saes, S, first, circuit, inside=False))
    gap = metric - empty
    return Faithfulness(
        ablation="zero", metric_full=rounded(metric, 6), metric_empty=rounded(empty, 6),
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
