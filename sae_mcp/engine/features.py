"""Feature activations per token, top features per position, and prompt comparisons.

Activations are the SAE's post-activation values on the model's real activations at the SAE's hook, with BOS
prepended as the SAE was trained (metadata.prepend_bos). That equals `hook_sae_acts_post` from the tutorial's
run_with_cache_with_saes, but we stop the forward after the SAE's layer and never splice the SAE in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_mcp.engine.runtime import Engine, context_warning, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import (
    FeatureActivation,
    FeatureActs,
    FeatureDiff,
    PositionTopFeatures,
    PromptComparison,
    collect_warnings,
    rounded,
)

MAX_LISTED_ACTIVATIONS = 25_000  # positions x top_k in one get_feature_acts answer (~0.5 MB of JSON)
POOR_RECONSTRUCTION = 0.5  # relative squared error above which the SAE "misses" an activation (warned about)


@dataclass
class PromptActs:
    """One prompt through the model to the SAE's hook, encoded."""

    tokens: torch.Tensor  # [S] token ids
    acts: torch.Tensor  # [S, d_sae] float32 feature activations (hook_sae_acts_post)
    recon_error: torch.Tensor  # [S] float32 on the CPU: ||x - x_hat||^2 / ||x||^2 per position


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The SAE's input x [S, d_in] and its reconstruction x_hat [S, d_in] -> ||x - x_hat||^2 / ||x||^2 [S] on the
    CPU: the share of the activation's squared norm the error term carries."""
    x, x_hat = x.float(), x_hat.float().reshape(x.shape)
    return ((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).cpu()


def prompt_feature_acts(engine: Engine, sae: LoadedSAE, prompt: str) -> PromptActs:
    """prompt -> its tokens, feature activations and reconstruction error. Call inside device_work()."""
    tokens = engine.to_tokens(prompt, prepend_bos=sae.prepend_bos)
    x = engine.forward_to_hook(tokens, sae)[0]  # [S, d_in]
    acts = engine.encode(sae, x)  # [S, d_sae]
    with torch.inference_mode():
        x_hat = sae.sae.decode(acts)  # [S, d_in]
    return PromptActs(tokens[0], acts.float(), relative_error(x, x_hat))


def reconstruction_warning(sae: LoadedSAE, err: torch.Tensor, positions: list[int], str_tokens: list[str],
                           what: str = "") -> str | None:
    """A warning when the SAE reconstructs the activation poorly at positions the answer reads (BOS aside: SAEs
    are not meant to reconstruct it). err [S] relative squared error per position."""
    first = 1 if sae.prepend_bos else 0
    poor = [p for p in positions if p >= first and float(err[p]) > POOR_RECONSTRUCTION]
    if not poor:
        return None
    shown = ", ".join(f"{p} {str_tokens[p]!r} ({float(err[p]):.0%})" for p in poor[:5])
    more = f" and {len(poor) - 5} more" if len(poor) > 5 else ""
    return (f"SAE {sae.key} reconstructs the activation poorly at {what}position(s) {shown}{more} (share of its "
            "squared norm left in the error term): features there miss much of what the model computes, so an "
            "absent feature is no evidence; read such positions with care or use another SAE")


def get_feature_acts(
    engine: Engine, prompt: str, sae: str | None = None, top_k: int = 5, features: list[int] | None = None,
    position: int | None = None,
) -> FeatureActs:
    """The top_k features at every position (or the one `position`), each position's L0, and the named features'
    activations at the same positions."""
    s = engine.sae(sae)
    features = engine.check_features(s, features, unique=True)  # keyed by feature: a repeat would be lost
    with engine.device_work():
        pa = prompt_feature_acts(engine, s, prompt)
        seq = len(pa.tokens)
        positions = list(range(seq)) if position is None else [position_index(position, seq)]
        if len(positions) * top_k > MAX_LISTED_ACTIVATIONS:
            raise InvalidInput(
                f"{len(positions)} tokens x top_k {top_k} would list {len(positions) * top_k} activations (at most "
                f"{MAX_LISTED_ACTIVATIONS}); lower top_k, pass one position, or shorten the prompt"
            )
        acts = pa.acts[positions]  # [P, d_sae]
        values, indices = acts.topk(min(top_k, s.d_sae), dim=-1)  # [P, k] each: only these leave the device
        l0 = (acts > 0).sum(-1).cpu().tolist()  # [P]
        values, indices = values.cpu(), indices.cpu()
        traces = acts[:, features].T.cpu() if features else None  # [n_features, P]
    str_tokens = engine.str_tokens(pa.tokens)
    rows = [
        PositionTopFeatures(
            position=p, token=str_tokens[p], l0=int(l0[i]),
            top=[FeatureActivation(feature=int(f), activation=rounded(v))
                 for v, f in zip(values[i].tolist(), indices[i].tolist()) if v > 0],
        )
        for i, p in enumerate(positions)
    ]
    return FeatureActs(
        sae=s.key,
        tokens=str_tokens,
        positions=rows,
        features={str(f): [rounded(a) for a in traces[i].tolist()] for i, f in enumerate(features)}
        if features and traces is not None else None,
        warnings=collect_warnings(context_warning(s, seq),
                                  reconstruction_warning(s, pa.recon_error, positions, str_tokens)),
    )


def compare_prompts(
    engine: Engine, prompt_a: str, prompt_b: str, sae: str | None = None, top_k: int = 10, position: int = -1
) -> PromptComparison:
    """Features whose activation at `position` differs most between two prompts."""
    s = engine.sae(sae)
    with engine.device_work():
        run_a, run_b = prompt_feature_acts(engine, s, prompt_a), prompt_feature_acts(engine, s, prompt_b)
        tok_a, tok_b = run_a.tokens, run_b.tokens
        pa = position_index(position, len(tok_a), "prompt_a")
        pb = position_index(position, len(tok_b), "prompt_b")
        a, b = run_a.acts[pa], run_b.acts[pb]  # [d_sae] each
        diff = a - b
        k = min(top_k, s.d_sae)
        idx = diff.abs().topk(k).indices
        rows = torch.stack([idx.float(), a[idx], b[idx], diff[idx]], dim=1).cpu().tolist()  # [k, 4]
        n_differ = int((diff != 0).sum())
    str_a, str_b = engine.str_tokens(tok_a), engine.str_tokens(tok_b)
    return PromptComparison(
        sae=s.key,
        mode="pair",
        position=position,
        token_a=str_a[pa],
        token_b=str_b[pb],
        diffs=[
            FeatureDiff(feature=int(f), activation_a=rounded(x), activation_b=rounded(y), difference=rounded(d))
            for f, x, y, d in rows
            if d != 0
        ],
        warnings=collect_warnings(
            few_differ_note(n_differ, k),
            context_warning(s, max(len(tok_a), len(tok_b))),
            reconstruction_warning(s, run_a.recon_error, [pa], str_a, "prompt_a's "),
            reconstruction_warning(s, run_b.recon_error, [pb], str_b, "prompt_b's "),
        ),
    )


def few_differ_note(n_differ: int, top_k: int) -> str | None:
    """Why fewer rows than top_k: only that many features differ at the position (every other is equal, mostly 0
    in both prompts). The list is then complete; a minimal pair differing elsewhere needs another position."""
    if n_differ >= top_k:
        return None
    return (f"only {n_differ} feature(s) differ between the prompts at this position (every other is equal in both, "
            f"mostly 0), so {n_differ} rows, not {top_k}: the list is complete; compare another position for more")
