"""Independent reference computations, the tutorial's way (sae-lens' and transformer-lens' own calls, hooks written
plainly), that the engine's paths are checked against; and the comparisons of two float paths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE

from helpers.models import only_sae


def tokens_of(engine: Engine, prompt: str) -> torch.Tensor:
    """The prompt's token ids [1, S], with BOS as the engine's (first) SAE was trained."""
    return engine.to_tokens(prompt, prepend_bos=engine.sae(None).prepend_bos)


def first_token_ids(engine: Engine, *words: str) -> list[int]:
    """Each word's first token id, no BOS (a metric reads the first token of its answer)."""
    return [int(engine.model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words]


def tutorial_sae_acts(engine: Engine, tokens: torch.Tensor) -> torch.Tensor:
    """The SAE's feature activations the tutorial way, the independent reference for every engine path: splice
    the SAE in with run_with_cache_with_saes and read <hook>.hook_sae_acts_post. tokens [B, S] -> [B, S, d_sae]."""
    s = only_sae(engine)
    with torch.inference_mode():
        _, cache = engine.model.run_with_cache_with_saes(tokens, saes=[s.sae])
    engine.model.reset_saes()
    return cache[f"{s.hook_name}.hook_sae_acts_post"]


@dataclass
class Spliced:
    """One forward and one backward with an SAE spliced in, its error term on (the plain model's output)."""

    metric: float  # the metric's value
    logits: torch.Tensor  # [B, S, V], detached
    grad_x_act: torch.Tensor  # acts * d metric / d acts at the SAE's hook_sae_acts_post [B, S, d_sae]


def spliced_grad_x_act(engine: Engine, sae: LoadedSAE, tokens: torch.Tensor,
                       metric: Callable[[torch.Tensor], torch.Tensor]) -> Spliced:
    """Gradient x activation the tutorial way: the SAE spliced with its error term, hook_sae_acts_post made to
    require grad, one backward of metric(logits [B, S, V]) (a scalar)."""
    kept: dict[str, torch.Tensor] = {}

    def keep(acts, hook):
        acts.requires_grad_(True)  # nothing upstream requires grad, so acts is a leaf here
        acts.retain_grad()
        kept["acts"] = acts
        return acts

    with torch.enable_grad(), engine.model.saes(saes=[sae.sae], use_error_term=True):
        logits = engine.model.run_with_hooks(tokens, fwd_hooks=[(f"{sae.hook_name}.hook_sae_acts_post", keep)])
        value = metric(logits)
        value.backward()
    engine.clean_model()
    acts = kept["acts"]
    return Spliced(float(value), logits.detach(), acts.grad * acts.detach())


def plain_greedy(engine: Engine, tokens: torch.Tensor, hook_name: str, vector: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the plain way: the whole sequence each step, the vector added by run_with_hooks -> the n
    new token ids [n]."""
    seq = tokens
    for _ in range(n):
        with torch.inference_mode():
            logits = engine.model.run_with_hooks(seq, fwd_hooks=[(hook_name, lambda x, hook: x + vector)])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, tokens.shape[1]:]


def plain_ablation_logits(engine: Engine, tokens: torch.Tensor, feats: list[int]) -> dict[str, torch.Tensor]:
    """Last-position logits [d_vocab] of the plain model ('base'), the SAE spliced without its error term
    ('recon'), `feats` zeroed on hook_sae_acts_post without ('no_err') and with ('with_err') the error term,
    each with the tutorial's own calls (run_with_saes, run_with_hooks_with_saes, model.saes)."""
    s = engine.sae(None)
    hook = f"{s.hook_name}.hook_sae_acts_post"

    def zero(acts, hook):
        acts[:, :, feats] = 0.0
        return acts

    with torch.inference_mode():
        out = {
            "base": engine.model(tokens)[0, -1],
            "recon": engine.model.run_with_saes(tokens, saes=[s.sae], use_error_term=False)[0, -1],
            "no_err": engine.model.run_with_hooks_with_saes(tokens, saes=[s.sae], fwd_hooks=[(hook, zero)])[0, -1],
        }
        with engine.model.saes(saes=[s.sae], use_error_term=True):
            out["with_err"] = engine.model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])[0, -1]
    engine.clean_model()
    return out


def assert_ranked_like(ids: list[int], ref: torch.Tensor, tol: float = 1e-4) -> None:
    """`ids` (a listing, largest first) are a top-len(ids) of `ref` [n] computed along another path: two float paths
    are never bit-equal across CPUs, so entries within `tol` of each other may trade places, and nothing else."""
    assert len(set(ids)) == len(ids), ids
    if not ids:
        return
    kth = float(ref.sort(descending=True).values[len(ids) - 1])
    vals = [float(ref[i]) for i in ids]
    assert all(v >= kth - tol for v in vals), (ids, vals, kth)  # none of them is below the k-th largest
    assert all(a >= b - tol for a, b in zip(vals, vals[1:])), (ids, vals)  # in order, up to near-ties


def assert_tables_close(a, b, tol: float = 1e-5) -> None:
    """Two next-token tables (lists of TokenProb) from two float paths: the same tokens with the same probabilities
    and logits up to `tol`, in the same order except where probabilities tie within it."""
    pa, pb = {t.token_id: t.probability for t in a}, {t.token_id: t.probability for t in b}
    assert pa.keys() == pb.keys(), (a, b)
    assert all(abs(pa[k] - pb[k]) <= tol for k in pa), (a, b)
    probs = [t.probability for t in a]
    assert all(x >= y - tol for x, y in zip(probs, probs[1:]))
