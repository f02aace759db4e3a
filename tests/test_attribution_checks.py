"""attribute's checks against plain computations written here: the exact contribution of every returned entry, the
totals beside the metric, integrated gradients (a plain Riemann loop over features and error, and completeness),
the warnings, bounds and hygiene."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import attribution as attr
from sae_mcp.engine import attribution_checks as checks
from sae_mcp.errors import InvalidInput

from helpers.plain import first_token_ids, spliced_grad_x_act
from mcp_client import call_many, error_text

PROMPT = "the cat sat on the mat and the dog"
# Found by trying prompts and answers on the tiny model: here the top entry's gradient x activation is 2.4x its
# exact contribution (the plain computations below show it); on PROMPT / ' mat' vs ' park' the top 3 agree within
# 20%.
NONLINEAR = ("Lily saw a big red ball . she", " dog", " cat")
LINEAR = (PROMPT, " mat", " park")


def spliced_metric(engine, saes, tokens, a, c, pos, zero=None):
    """The metric with the SAEs spliced with the error term; zero = (hook_name, position, feature) zeroed by a plain
    hook on that SAE's hook_sae_acts_post, or (hook_name, None, None): all its features at every position."""
    model, hooks = engine.model, []
    if zero:
        name, p, f = zero

        def hook(acts, hook):
            acts = acts.clone()
            if p is None:
                return torch.zeros_like(acts)
            acts[:, p, f] = 0.0
            return acts

        hooks = [(f"{name}.hook_sae_acts_post", hook)]
    with torch.inference_mode(), model.saes(saes=[s.sae for s in saes], use_error_term=True):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    engine.clean_model()
    return float(logits[0, pos, a] - logits[0, pos, c])


def plain_grad_x_act(engine, sae, tokens, a, c, pos):
    """acts * d metric / d acts [S, d_sae], the SAE spliced with the error term (helpers.plain.spliced_grad_x_act)."""
    return spliced_grad_x_act(engine, sae, tokens, lambda logits: logits[0, pos, a] - logits[0, pos, c]).grad_x_act[0]


def plain_integrated_gradients(engine, sae, tokens, a, c, pos, steps, hook="hook_sae_acts_post"):
    """A plain Riemann loop on one path: the nodes at `hook` (hook_sae_acts_post: the features; hook_sae_error: the
    error, which sae-lens computes from the unchanged input, hooks off) scaled by alpha, the others left clean,
    gradients averaged over the midpoints, times the clean values: [S, d_sae] or [S, d_in]."""
    model, kept, total = engine.model, {}, 0.0
    for k in range(steps):
        alpha = (k + 0.5) / steps

        def scale(v, hook):
            kept["clean"] = v.detach().clone()
            scaled = (v.detach() * alpha).requires_grad_(True)
            scaled.retain_grad()
            kept["scaled"] = scaled
            return scaled

        with torch.enable_grad(), model.saes(saes=[sae.sae], use_error_term=True):
            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"{sae.hook_name}.{hook}", scale)])
            (logits[0, pos, a] - logits[0, pos, c]).backward()
        total = total + kept["scaled"].grad[0]
    engine.clean_model()
    return kept["clean"][0] * total / steps


def error_zeroed_metric(engine, saes, tokens, a, c, pos):
    """The metric with every SAE's error zeroed, the features kept."""
    model = engine.model
    zero = [(f"{s.hook_name}.hook_sae_error", lambda v, hook: torch.zeros_like(v)) for s in saes]
    with torch.inference_mode(), model.saes(saes=[s.sae for s in saes], use_error_term=True):
        logits = model.run_with_hooks(tokens, fwd_hooks=zero)
    engine.clean_model()
    return float(logits[0, pos, a] - logits[0, pos, c])


def linearity_warnings(res):
    return [w for w in res.warnings or [] if "exact contribution" in w]


# ---------------------------------------------------------------------------------------------------------------
# Exact contributions


def test_every_returned_entry_gets_its_exact_contribution_the_metric_minus_the_metric_with_it_zeroed(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=30)
    clean = spliced_metric(e, [s], tokens, a, c, -1)
    assert len(res.top) == 30 and all(t.exact_contribution is not None for t in res.top)  # not only the top 3
    for t in res.top:
        zeroed = spliced_metric(e, [s], tokens, a, c, -1, zero=(s.hook_name, t.position, t.feature))
        assert t.exact_contribution == pytest.approx(clean - zeroed, abs=1e-4)
    off = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=8, verify=False)
    assert all(t.exact_contribution is None for t in off.top)
    assert e.is_clean()


def test_exact_contributions_are_chunked_under_the_memory_bound_with_the_same_numbers(tiny_engine, monkeypatch):
    """top_k=100 under a bound of 7 rows a forward: 15 forwards, the same numbers as one (up to float noise)."""
    e = tiny_engine
    whole = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=100)
    forwards = []
    real = checks._zeroed_metrics
    monkeypatch.setattr(checks, "MAX_ROWS", 7)
    monkeypatch.setattr(checks, "_zeroed_metrics", lambda *a: forwards.append(len(a[-1])) or real(*a))
    chunked = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=100)
    assert len(chunked.top) == 100 and max(forwards) == 7 and sum(forwards) == 101  # + the clean row
    for x, y in zip(whole.top, chunked.top):
        assert (x.position, x.feature) == (y.position, y.feature)
        assert x.exact_contribution == pytest.approx(y.exact_contribution, abs=1e-5)


def test_exact_contributions_with_two_saes_zero_one_feature_with_both_spliced(two_sae_engine):
    e = two_sae_engine
    saes = sorted(e.saes.values(), key=lambda s: s.layer)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=10)
    assert {t.sae for t in res.top} == set(e.saes)  # entries of both SAEs are verified
    clean = spliced_metric(e, saes, tokens, a, c, -1)
    for t in res.top:
        hook = e.saes[t.sae].hook_name
        zeroed = spliced_metric(e, saes, tokens, a, c, -1, zero=(hook, t.position, t.feature))
        assert t.exact_contribution == pytest.approx(clean - zeroed, abs=1e-4)
    assert e.is_clean()


# ---------------------------------------------------------------------------------------------------------------
# The linearity warning


@pytest.mark.parametrize("case,top_k,expect_warning", [(NONLINEAR, 1, True), (LINEAR, 3, False)])
def test_warns_where_gradient_x_activation_is_far_from_the_exact_contribution_and_only_there(
    tiny_engine, case, top_k, expect_warning
):
    e, s = tiny_engine, tiny_engine.sae(None)
    prompt, answer, counterfactual = case
    tokens = e.to_tokens(prompt)
    a, c = first_token_ids(e, answer, counterfactual)
    plain = plain_grad_x_act(e, s, tokens, a, c, -1)
    clean = spliced_metric(e, [s], tokens, a, c, -1)
    res = attr.attribute(e, prompt, answer, counterfactual=counterfactual, top_k=top_k)
    floor = max(0.01, 0.05 * abs(clean))
    for t in res.top:
        first_order = float(plain[t.position, t.feature])
        exact = clean - spliced_metric(e, [s], tokens, a, c, -1, zero=(s.hook_name, t.position, t.feature))
        assert t.attribution == pytest.approx(first_order, abs=1e-4)
        assert t.exact_contribution == pytest.approx(exact, abs=1e-4)
        if expect_warning:  # the plain numbers disagree (here by more than 2x) ...
            assert abs(first_order) > 2 * abs(exact) > 0
        else:  # ... or agree within 20%
            assert abs(first_order - exact) < 0.2 * abs(exact)
        named = any(f" {t.feature} at {t.position} {t.token!r} " in w for w in linearity_warnings(res))
        assert named == (abs(first_order - exact) > 0.5 * max(abs(exact), floor))
    assert bool(linearity_warnings(res)) == expect_warning
    if expect_warning:
        (w,) = linearity_warnings(res)
        assert "method='integrated_gradients'" in w and "exact_contribution" in w


# ---------------------------------------------------------------------------------------------------------------
# Totals beside the metric


@pytest.mark.parametrize("case", [
    (PROMPT, " mat", " park"),  # features + error: -0.98 against a metric of +1.70
    ("Lily saw a big red ball . she", " ball", " sad"),  # 0.85 of the metric
])
def test_totals_are_the_plain_sums_reported_beside_the_metric(tiny_engine, case):
    e, s = tiny_engine, tiny_engine.sae(None)
    prompt, answer, counterfactual = case
    tokens = e.to_tokens(prompt)
    a, c = first_token_ids(e, answer, counterfactual)
    plain = plain_grad_x_act(e, s, tokens, a, c, -1)
    res = attr.attribute(e, prompt, answer, counterfactual=counterfactual, verify=False)
    assert res.method == "gradient" and res.integrated_gradients is None
    assert res.feature_attribution_total[s.key] == pytest.approx(float(plain.sum()), abs=1e-4)
    total = float(plain.sum()) + res.error_attribution[s.key]
    assert res.attribution_total == pytest.approx(total, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Integrated gradients


def test_integrated_gradients_equal_a_plain_riemann_loop_for_features_and_error(tiny_engine):
    """Every number of method='integrated_gradients' is of that path, the error's and the error share included (they
    were the plain gradient's)."""
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    plain = plain_integrated_gradients(e, s, tokens, a, c, -1, steps=8)
    plain_err = plain_integrated_gradients(e, s, tokens, a, c, -1, steps=8, hook="hook_sae_error").sum(-1)  # [S]
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=8, top_k=10)
    assert res.method == "integrated_gradients" and res.integrated_gradients.steps == 8
    assert_close(torch.tensor(res.per_token[s.key]), plain.sum(-1), atol=1e-4, rtol=1e-3)
    for t in res.top:
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-4)
    assert res.feature_attribution_total[s.key] == pytest.approx(float(plain.sum()), abs=1e-4)
    assert_close(torch.tensor(res.error_attribution_per_token[s.key]), plain_err, atol=1e-4, rtol=1e-3)
    assert res.error_attribution[s.key] == pytest.approx(float(plain_err.sum()), abs=1e-4)
    feat_p = plain.sum(-1)  # [S]: the reconstruction's part per position under the path
    p0, p1 = res.error_share_positions
    share = float(plain_err[p0 : p1 + 1].abs().sum() / (plain_err[p0 : p1 + 1].abs().sum()
                                                         + feat_p[p0 : p1 + 1].abs().sum()))
    assert res.error_share[s.key] == pytest.approx(share, abs=2e-4)
    assert res.integrated_gradients.attribution_sum == pytest.approx(float(plain.sum()), abs=1e-4)
    assert res.integrated_gradients.error_attribution_sum == pytest.approx(float(plain_err.sum()), abs=1e-4)
    grad = attr.attribute(e, PROMPT, " mat", counterfactual=" park", verify=False)
    assert abs(res.error_attribution[s.key] - grad.error_attribution[s.key]) > 1e-3  # not the gradient's any more


def test_integrated_gradients_are_complete_with_enough_steps_and_warn_with_too_few(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    clean = spliced_metric(e, [s], tokens, a, c, -1)
    endpoint = clean - spliced_metric(e, [s], tokens, a, c, -1, zero=(s.hook_name, None, None))
    error_endpoint = clean - error_zeroed_metric(e, [s], tokens, a, c, -1)
    fine = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=32)
    check = fine.integrated_gradients
    assert check.endpoint_difference == pytest.approx(endpoint, abs=1e-4)
    assert check.error_endpoint_difference == pytest.approx(error_endpoint, abs=1e-4)
    assert sum(fine.feature_attribution_total.values()) == pytest.approx(endpoint, rel=0.01)  # complete
    assert sum(fine.error_attribution.values()) == pytest.approx(error_endpoint, rel=0.01, abs=1e-3)
    assert check.relative_error < 0.01 and check.error_relative_error < 0.01
    assert not [w for w in fine.warnings or [] if "integrated gradients with steps" in w]
    coarse = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=8)
    off = abs(coarse.integrated_gradients.attribution_sum - endpoint) / abs(endpoint)
    assert off > 0.05 and coarse.integrated_gradients.relative_error == pytest.approx(off, abs=1e-3)
    (w,) = [w for w in coarse.warnings if "integrated gradients with steps=8" in w]
    assert "steps=16" in w and "features' attributions sum to" in w


def test_integrated_gradients_over_two_saes_sum_to_the_metric_with_every_feature_part_removed(two_sae_engine):
    """With several SAEs each passes on what earlier ones changed, so the features' path ends at the plain model
    with every SAE's clean feature part (decode(a) - decode(0)) subtracted at its hook."""
    e = two_sae_engine
    saes = sorted(e.saes.values(), key=lambda s: s.layer)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    model = e.model
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens)
        parts = {}
        for s in saes:
            acts = s.sae.encode(cache[s.hook_name])
            parts[s.hook_name] = s.sae.decode(acts) - s.sae.decode(torch.zeros_like(acts))
        hooks = [(name, lambda x, hook, p=p: x - p) for name, p in parts.items()]
        ablated = model.run_with_hooks(tokens, fwd_hooks=hooks)
    e.clean_model()
    endpoint = float((logits[0, -1, a] - logits[0, -1, c]) - (ablated[0, -1, a] - ablated[0, -1, c]))
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=32)
    assert res.integrated_gradients.endpoint_difference == pytest.approx(endpoint, abs=1e-4)
    assert sum(res.feature_attribution_total.values()) == pytest.approx(endpoint, rel=0.02)
    assert all(abs(v) > 0.1 for v in res.feature_attribution_total.values())  # the later SAE screens nothing off
    assert e.is_clean()


# ---------------------------------------------------------------------------------------------------------------
# Shared guards


def test_a_prompt_longer_than_the_saes_training_context_warns(tiny_engine):
    long_prompt = " ".join([PROMPT] * 5)  # 45 words; the tiny SAE was trained on 32-token contexts
    res = attr.attribute(tiny_engine, long_prompt, " mat", counterfactual=" park", verify=False)
    assert [w for w in res.warnings if "32-token contexts" in w and "shorten" in w]
    short = attr.attribute(tiny_engine, PROMPT, " mat", counterfactual=" park", verify=False)
    assert not [w for w in short.warnings or [] if "contexts" in w]


def test_an_answer_whose_space_variant_is_far_more_likely_warns(stories_engine):
    prompt = "Once upon a time, there was a little girl named Lily. She"
    res = attr.attribute(stories_engine, prompt, "was", verify=False)
    assert [w for w in res.warnings if "' was'" in w and "pass answer=' was'" in w]
    good = attr.attribute(stories_engine, prompt, " was", verify=False)
    assert not [w for w in good.warnings or [] if "pass answer=" in w]


# ---------------------------------------------------------------------------------------------------------------
# Bounds, bad input, hygiene


def test_bad_options_are_refused_with_what_to_change(tiny_engine):
    with pytest.raises(InvalidInput, match="method 'ig' is unknown; pass method='gradient'"):
        attr.attribute(tiny_engine, PROMPT, " mat", method="ig")
    with pytest.raises(InvalidInput, match=r"steps=0 is out of range; pass 1\.\.32"):
        attr.attribute(tiny_engine, PROMPT, " mat", method="integrated_gradients", steps=0)
    with pytest.raises(InvalidInput, match=r"top_k=101 is out of range; pass 1\.\.100"):
        attr.attribute(tiny_engine, PROMPT, " mat", top_k=101)
    assert tiny_engine.is_clean()


@pytest.mark.parametrize("args,message", [
    ({"verify": "some"}, "valid boolean"),
    ({"top_k": 101}, "less than or equal to 100"),
    ({"method": "integrated_gradients", "steps": 33}, "less than or equal to 32"),
    ({"method": "integrated_gradients", "steps": 0}, "greater than or equal to 1"),
    ({"method": "ig"}, "'gradient' or 'integrated_gradients'"),
])
def test_the_tool_refuses_out_of_range_options_and_the_next_call_works(tiny_server, args, message):
    base = {"prompt": PROMPT, "answer": " mat", "counterfactual": " park"}
    bad, good = call_many(tiny_server, [("attribute", {**base, **args}),
                                        ("attribute", {**base, "method": "integrated_gradients", "steps": 2})])
    text = error_text(bad)
    assert message in text and list(args)[-1] in text  # names the argument to change
    assert not good.is_error, error_text(good)
    out = good.structured_content
    assert out["method"] == "integrated_gradients" and out["integrated_gradients"]["steps"] == 2
    assert all(t.get("exact_contribution") is not None for t in out["top"])


@pytest.mark.parametrize("where", ["path", "ablation"])
def test_a_failure_inside_the_checks_leaves_the_model_clean(tiny_engine, monkeypatch, where):
    e = tiny_engine
    tokens = e.to_tokens(PROMPT)
    with torch.inference_mode():
        before = e.model(tokens).clone()

    def boom(*args, **kwargs):
        raise RuntimeError("inside a spliced hook")

    if where == "path":
        monkeypatch.setattr(checks.PathCapture, "_scaled_error", boom)
    else:
        monkeypatch.setattr(checks, "_zero_hook", lambda rows, cells: boom)
    with pytest.raises(RuntimeError, match="inside a spliced hook"):
        attr.attribute(e, PROMPT, " mat", method="integrated_gradients" if where == "path" else "gradient")
    monkeypatch.undo()
    assert e.is_clean() and not e.model.acts_to_saes
    with torch.inference_mode():
        assert torch.equal(e.model(tokens), before)
