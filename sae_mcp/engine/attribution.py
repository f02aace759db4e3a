"""Gradient x activation attribution of SAE features and SAE error nodes, several SAEs in one backward pass.

metric = logit[answer] - logit[counterfactual] at `position` (or logit[answer] alone; the first token of each is
scored, and the result says when there are more: answer_tokens, multi_token). Every SAE is spliced in
WITH the error term, so the forward pass gives the plain model's logits. Hooks (inside context managers):

  <hook>.hook_sae_input      keeps x, the SAE's input (in the autograd graph when an earlier SAE made it so)
  <hook>.hook_sae_acts_post  acts -> a leaf that requires grad: attribution = acts * d metric / d acts
  <hook>.hook_sae_error      err  -> a leaf e plus (x - x.detach()) (exactly 0): d metric / d e is the gradient
                             at the hook, and the gradient reaches x through the identity

Why the identity: sae-lens computes the error under torch.no_grad(), which would leave upstream SAEs a gradient
through this SAE's encoder/decoder only, so an upstream feature's attribution would change with which downstream
SAEs are loaded. With the identity path every node sees the plain model's gradient, and each SAE's attributions
are the same alone or together (tested). Model parameters keep requires_grad=False (the Engine turns it off).

Error share, honestly: at position p the first-order contribution of the error to the metric is g_p . e_p, that
of the reconstruction g_p . x_hat_p (g_p = gradient at the hook). The share is

    sum_p |g_p . e_p| / (sum_p |g_p . e_p| + sum_p |g_p . x_hat_p|)   over p = 1 .. metric position

absolute per position, so contributions of opposite sign at different positions cannot cancel into a small
share, and without BOS (position 0 when the SAE prepends it: its large norms would dominate, and an SAE is not
meant to reconstruct it); later positions have zero gradient. The per-position g_p . e_p is reported too
(error_attribution_per_token), to show where the SAE fails. error_attribution / reconstruction_attribution stay
the signed totals over all positions (BOS included), so features + g.b_dec + error = g.x holds exactly. A ratio
of gradient norms would be useless here: both nodes receive the same gradient g, so such a ratio is always 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae_mcp.engine.loading import LoadedSAE
from sae_mcp.engine.logits import answer_token_ids
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.results import r
from sae_mcp.results.causal import Attribution, AttributionEntry


def _resolve_saes(engine: Engine, sae: str | None, saes: Sequence[str] | None) -> list[LoadedSAE]:
    if sae and saes:
        raise InvalidInput("pass sae= (one SAE) or saes= (several), not both")
    if saes:
        out = [engine.sae(k) for k in saes]
        if len({s.hook_name for s in out}) != len(out):
            raise InvalidInput(f"saes {list(saes)} name two SAEs at one hook; one SAE per hook can be spliced at once")
        return sorted(out, key=lambda s: s.layer)
    if sae:
        return [engine.sae(sae)]
    if not engine.saes:
        engine.sae(None)  # raises the 'no SAE loaded' error
    by_hook: dict[str, LoadedSAE] = {}
    for s in engine.saes.values():
        by_hook.setdefault(s.hook_name, s)
    return sorted(by_hook.values(), key=lambda s: s.layer)


def attribute(
    engine: Engine,
    prompt: str,
    answer: str,
    counterfactual: str | None = None,
    sae: str | None = None,
    saes: Sequence[str] | None = None,
    top_k: int = 20,
    position: int = -1,
) -> Attribution:
    """Gradient x activation of every SAE feature (and each SAE's error) on the metric; one backward pass.
    A multi-token answer or counterfactual is scored on its first token only (answer_tokens / multi_token say so)."""
    loaded = _resolve_saes(engine, sae, saes)
    a_ids = answer_token_ids(engine, answer)
    c_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    if c_ids and c_ids[0] == a_ids[0]:
        raise InvalidInput(
            f"answer {answer!r} and counterfactual {counterfactual!r} start with the same token; the metric would be 0"
        )
    bos = {s.prepend_bos for s in loaded}
    if len(bos) > 1:
        raise InvalidInput("these SAEs disagree on prepending BOS; attribute them one at a time (sae=...)")
    prepend_bos = bos.pop()
    model = engine.model
    with engine.device_work():
        tokens = engine.to_tokens(prompt, prepend_bos=prepend_bos)  # [1, S]
        S = tokens.shape[1]
        if not -S <= position < S:
            raise InvalidInput(
                f"position {position} is out of range: the prompt has {S} tokens (0..{S - 1} or -{S}..-1)"
            )
        pos = position % S
        # positions the error share is taken over: 1..pos without BOS (0..pos without a BOS, or when pos is BOS)
        first = 1 if prepend_bos and pos >= 1 else 0
        store: dict[str, dict[str, torch.Tensor]] = {s.hook_name: {} for s in loaded}

        def keep_input(h: str):
            def hook(x: torch.Tensor, hook):
                store[h]["x"] = x  # [1, S, d_in] (flattened at hook_z)
                return x

            return hook

        def leaf_acts(h: str):
            def hook(acts: torch.Tensor, hook):
                leaf = acts.detach().requires_grad_(True)  # [1, S, d_sae]
                store[h]["acts"] = leaf
                return leaf

            return hook

        def leaf_error(h: str):
            def hook(err: torch.Tensor, hook):
                # called under sae-lens' torch.no_grad(); re-enable to build the identity path to x
                with torch.enable_grad():
                    leaf = err.detach().requires_grad_(True)  # [1, S, d_in] or [1, S, n_heads, d_head]
                    x = store[h]["x"]
                    store[h]["err"] = leaf
                    return leaf + (x - x.detach()).reshape(leaf.shape)

            return hook

        def keep_output(h: str):
            def hook(out: torch.Tensor, hook):
                store[h]["out"] = out.detach()  # x_hat + err, the value that flows on
                return out

            return hook

        fwd_hooks = []
        for s in loaded:
            h = s.hook_name
            fwd_hooks += [
                (f"{h}.hook_sae_input", keep_input(h)),
                (f"{h}.hook_sae_acts_post", leaf_acts(h)),
                (f"{h}.hook_sae_error", leaf_error(h)),
                (f"{h}.hook_sae_output", keep_output(h)),
            ]
        with torch.enable_grad():
            with model.saes(saes=[s.sae for s in loaded], use_error_term=True):
                with model.hooks(fwd_hooks=fwd_hooks):
                    logits = model(tokens, return_type="logits")[0, pos]  # [V]
                    metric = logits[a_ids[0]] - (logits[c_ids[0]] if c_ids else 0.0)
                    leaves = [store[s.hook_name][k] for s in loaded for k in ("acts", "err")]
                    grads = torch.autograd.grad(metric, leaves, allow_unused=True)

        str_tokens = engine.str_tokens(tokens)
        per_token: dict[str, list[float]] = {}
        err_per_token: dict[str, list[float]] = {}
        err_attr: dict[str, float] = {}
        rec_attr: dict[str, float] = {}
        share: dict[str, float] = {}
        candidates = []  # (|attr|, sae key, position, feature, act, attr) of each SAE's top_k
        for i, s in enumerate(loaded):
            st = store[s.hook_name]
            g_acts = grads[2 * i] if grads[2 * i] is not None else torch.zeros_like(st["acts"])
            g_err = grads[2 * i + 1] if grads[2 * i + 1] is not None else torch.zeros_like(st["err"])
            acts = st["acts"].detach()[0].float()  # [S, d_sae]
            attr = (acts * g_acts[0].float())  # [S, d_sae]
            per_token[s.key] = [r(v, 6) for v in attr.sum(-1).tolist()]
            g = g_err[0].float().reshape(S, -1)  # [S, d_in]: the gradient at the hook's output
            e = st["err"].detach()[0].float().reshape(S, -1)
            x_hat = st["out"][0].float().reshape(S, -1) - e  # the reconstruction
            ea_p, ra_p = (g * e).sum(-1), (g * x_hat).sum(-1)  # [S] each: g_p . e_p, g_p . x_hat_p
            err_per_token[s.key] = [r(v, 6) for v in ea_p.tolist()]
            err_attr[s.key], rec_attr[s.key] = r(float(ea_p.sum()), 6), r(float(ra_p.sum()), 6)  # signed totals
            num = float(ea_p[first : pos + 1].abs().sum())
            den = num + float(ra_p[first : pos + 1].abs().sum())
            share[s.key] = r(num / den, 4) if den > 0 else 0.0
            k = min(top_k, attr.numel())
            vals, flat = attr.flatten().abs().topk(k)
            for v, j in zip(vals.tolist(), flat.tolist()):
                p, f = divmod(j, s.d_sae)
                if v > 0:
                    candidates.append((v, s.key, p, f, float(acts[p, f]), float(attr[p, f])))
        metric_value = float(metric.detach())

    candidates.sort(key=lambda c: -c[0])
    top = [
        AttributionEntry(sae=k, position=p, token=str_tokens[p], feature=f, activation=r(a), attribution=r(at, 6))
        for _, k, p, f, a, at in candidates[:top_k]
    ]
    a_tok = engine.str_tokens(torch.tensor(a_ids[:1]))[0]
    what = f"logit[{a_tok!r}]" + (f" - logit[{engine.str_tokens(torch.tensor(c_ids[:1]))[0]!r}]" if c_ids else "")
    return Attribution(
        metric=f"{what} at position {pos}",
        answer_tokens=engine.str_tokens(torch.tensor(a_ids)),
        multi_token=len(a_ids) > 1,
        counterfactual_tokens=engine.str_tokens(torch.tensor(c_ids)) if c_ids else None,
        counterfactual_multi_token=len(c_ids) > 1 if c_ids else None,
        metric_value=r(metric_value, 6),
        position=pos,
        tokens=str_tokens,
        top=top,
        per_token=per_token,
        error_attribution=err_attr,
        error_attribution_per_token=err_per_token,
        reconstruction_attribution=rec_attr,
        error_share=share,
        error_share_positions=[first, pos],
    )
