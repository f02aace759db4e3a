"""Feature activations per token, top features per position, and prompt comparisons.

Activations are the SAE's post-activation values on the model's real activations at the SAE's hook, with BOS
prepended as the SAE was trained (metadata.prepend_bos). That equals `hook_sae_acts_post` from the tutorial's
run_with_cache_with_saes, but we stop the forward after the SAE's layer and never splice the SAE in.
"""

from __future__ import annotations

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.loading import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import (
    FeatureActivation,
    FeatureActs,
    FeatureDiff,
    FeatureSetDiff,
    FeatureTrace,
    PositionTopFeatures,
    PromptComparison,
    r,
)


MAX_LISTED_ACTIVATIONS = 25_000  # positions x top_k in one get_feature_acts answer (~0.5 MB of JSON)


def prompt_feature_acts(engine: Engine, sae: LoadedSAE, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt -> (tokens [seq], feature activations [seq, d_sae]) on the device. Call inside device_work()."""
    tokens = engine.to_tokens(prompt, prepend_bos=sae.prepend_bos)
    acts = engine.forward_to_hook(tokens, sae)  # [1, seq, d_in]
    return tokens[0], engine.encode(sae, acts)[0].float()  # [seq, d_sae]


def _check_features(engine: Engine, sae: LoadedSAE, features: list[int] | None) -> list[int]:
    features = list(features or [])
    if len(features) > engine.limits.max_features_per_call:
        raise InvalidInput(
            f"{len(features)} features asked for; at most {engine.limits.max_features_per_call} per call"
        )
    for f in features:
        engine.check_feature(sae, f)
    return features


def get_feature_acts(
    engine: Engine, prompt: str, sae: str | None = None, top_k: int = 5, features: list[int] | None = None
) -> FeatureActs:
    s = engine.sae(sae)
    features = _check_features(engine, s, features)
    with engine.device_work():
        tokens, acts = prompt_feature_acts(engine, s, prompt)  # [seq], [seq, d_sae]
        if len(tokens) * top_k > MAX_LISTED_ACTIVATIONS:
            raise InvalidInput(
                f"{len(tokens)} tokens x top_k {top_k} would list {len(tokens) * top_k} activations (at most "
                f"{MAX_LISTED_ACTIVATIONS}); lower top_k or shorten the prompt"
            )
        k = min(top_k, s.d_sae)
        values, indices = acts.topk(k, dim=-1)  # [seq, k] each: only these leave the device
        values, indices = values.cpu(), indices.cpu()
        traces = acts[:, features].T.cpu() if features else None  # [n_features, seq]
    str_tokens = engine.str_tokens(tokens)
    positions = [
        PositionTopFeatures(
            position=p,
            token=str_tokens[p],
            top=[
                FeatureActivation(feature=int(f), activation=r(v))
                for v, f in zip(values[p].tolist(), indices[p].tolist())
                if v > 0
            ],
        )
        for p in range(len(str_tokens))
    ]
    return FeatureActs(
        sae=s.key,
        tokens=str_tokens,
        positions=positions,
        features=[FeatureTrace(feature=f, activations=[r(a) for a in traces[i].tolist()]) for i, f in enumerate(features)]
        if features
        else None,
    )


def _position_index(position: int, seq_len: int, which: str) -> int:
    if not -seq_len <= position < seq_len:
        raise InvalidInput(
            f"position {position} is outside prompt {which}, which has {seq_len} tokens "
            f"(valid: {-seq_len}..{seq_len - 1}; -1 = last token)"
        )
    return position % seq_len


def compare_prompts(
    engine: Engine, prompt_a: str, prompt_b: str, sae: str | None = None, top_k: int = 10, position: int = -1
) -> PromptComparison:
    """Features whose activation at `position` differs most between two prompts."""
    s = engine.sae(sae)
    with engine.device_work():
        tok_a, acts_a = prompt_feature_acts(engine, s, prompt_a)
        tok_b, acts_b = prompt_feature_acts(engine, s, prompt_b)
        pa = _position_index(position, len(tok_a), "a")
        pb = _position_index(position, len(tok_b), "b")
        a, b = acts_a[pa], acts_b[pb]  # [d_sae] each
        diff = a - b
        k = min(top_k, s.d_sae)
        idx = diff.abs().topk(k).indices
        rows = torch.stack([idx.float(), a[idx], b[idx], diff[idx]], dim=1).cpu().tolist()  # [k, 4]
    return PromptComparison(
        sae=s.key,
        mode="pair",
        position=position,
        token_a=engine.str_tokens(tok_a[pa])[0],
        token_b=engine.str_tokens(tok_b[pb])[0],
        diffs=[
            FeatureDiff(feature=int(f), activation_a=r(x), activation_b=r(y), difference=r(d))
            for f, x, y, d in rows
            if d != 0
        ],
    )


def compare_prompt_sets(
    engine: Engine,
    prompts_a: list[str],
    prompts_b: list[str],
    sae: str | None = None,
    top_k: int = 10,
    position: int = -1,
    sort_by: str = "difference",
) -> PromptComparison:
    """Mean activation at `position` over each set, per feature, with Cohen's d (pooled sd)."""
    s = engine.sae(sae)
    cap = engine.limits.max_prompts_per_set
    for name, ps in (("prompts_a", prompts_a), ("prompts_b", prompts_b)):
        if not ps:
            raise InvalidInput(f"{name} is empty; give at least one prompt per set")
        if len(ps) > cap:
            raise InvalidInput(f"{name} has {len(ps)} prompts; at most {cap} per set")
    if sort_by not in ("difference", "effect_size"):
        raise InvalidInput("sort_by must be 'difference' or 'effect_size'")
    if sort_by == "effect_size" and (len(prompts_a) < 2 or len(prompts_b) < 2):
        raise InvalidInput("sort_by='effect_size' needs at least two prompts in each set")

    def stack(prompts: list[str], which: str) -> torch.Tensor:
        rows = []
        for i, p in enumerate(prompts):
            tok, acts = prompt_feature_acts(engine, s, p)
            rows.append(acts[_position_index(position, len(tok), f"{which}[{i}]")])
        return torch.stack(rows)  # [n, d_sae]

    with engine.device_work():
        A, B = stack(prompts_a, "a"), stack(prompts_b, "b")
        mean_a, mean_b = A.mean(0), B.mean(0)
        diff = mean_a - mean_b
        na, nb = A.shape[0], B.shape[0]
        if na >= 2 and nb >= 2:
            pooled = (((na - 1) * A.var(0) + (nb - 1) * B.var(0)) / (na + nb - 2)).sqrt()  # [d_sae]
            # Constant within both sets (typical for minimal pairs at the differing token): d is unbounded when the
            # means differ (perfect separation, flagged and ranked first) and undefined (0) when they agree.
            # "Constant" up to float noise: the same token after different suffix lengths can differ in the last bits.
            constant = pooled <= 1e-6 * (mean_a.abs() + mean_b.abs()) + 1e-9
            separated = constant & (diff.abs() > 1e-6)
            effect = torch.where(constant, torch.zeros_like(diff), diff / pooled.clamp_min(1e-30))
        else:
            separated = effect = None
        k = min(top_k, s.d_sae)
        if sort_by == "effect_size":
            # separated features first (by |difference|), then the rest by |d|
            sep = separated.nonzero()[:, 0]
            rest = (~separated).nonzero()[:, 0]
            idx = torch.cat([sep[diff[sep].abs().argsort(descending=True)], rest[effect[rest].abs().argsort(descending=True)]])[:k]
        else:
            idx = diff.abs().topk(k).indices
        cols = [idx.float(), mean_a[idx], mean_b[idx], diff[idx]]
        if effect is not None:
            cols += [effect[idx], separated[idx].float()]
        rows = torch.stack(cols, dim=1).cpu().tolist()
    return PromptComparison(
        sae=s.key,
        mode="sets",
        position=position,
        n_a=na,
        n_b=nb,
        sort_by=sort_by,
        diffs=[
            FeatureSetDiff(
                feature=int(row[0]),
                mean_a=r(row[1]),
                mean_b=r(row[2]),
                difference=r(row[3]),
                effect_size=r(row[4], 3) if effect is not None and not row[5] else None,
                separated=bool(effect is not None and row[5]),
            )
            for row in rows
            if row[3] != 0 or (effect is not None and row[4] != 0)
        ],
    )
