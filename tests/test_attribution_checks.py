"""attribute's checks against plain computations written here: exact effects of the top entries, the totals beside
the metric, integrated gradients (a plain Riemann loop, and completeness), the warnings, bounds and hygiene."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import attribution as attr
from sae_mcp.engine import attribution_checks as checks
from sae_mcp.errors import InvalidInput

from conftest import engine_on, make_sae_folder
from mcp_client import call_many, error_text

PROMPT = "the cat sat on the mat and the dog"
# Found by trying prompts and answers on the tiny model: here the top entry's gradient x activation is 2.4x its
# exact effect (the plain computations below show it); on PROMPT / ' mat' vs ' park' the top 3 agree within 20%.
NONLINEAR = ("Lily saw a big red ball . she", " dog", " cat")
LINEAR = (PROMPT, " mat", " park")


def ids(engine, *words):
    return [int(engine.model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words]


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
    """acts * d metric / d acts [S, d_sae], the SAE spliced with the error term."""
    model, kept = engine.model, {}

    def keep(acts, hook):
        acts.requires_grad_(True)
        acts.retain_grad()
        kept["acts"] = acts
        return acts

    with torch.enable_grad(), model.saes(saes=[sae.sae], use_error_term=True):
        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"{sae.hook_name}.hook_sae_acts_post", keep)])
        (logits[0, pos, a] - logits[0, pos, c]).backward()
    engine.clean_model()
    return (kept["acts"].grad * kept["acts"].detach())[0]


def plain_integrated_gradients(engine, sae, tokens, a, c, pos, steps):
    """A plain Riemann loop: acts scaled by alpha at hook_sae_acts_post (sae-lens computes the error from the
    unchanged input, hooks off, so it stays at its clean value), gradients averaged over the midpoints, times acts."""
    model, kept, total = engine.model, {}, 0.0
    for k in range(steps):
        alpha = (k + 0.5) / steps

        def scale(acts, hook):
            kept["clean"] = acts.detach().clone()
            scaled = acts.detach() * alpha
            scaled.requires_grad_(True)
            scaled.retain_grad()
            kept["scaled"] = scaled
            return scaled

        with torch.enable_grad(), model.saes(saes=[sae.sae], use_error_term=True):
            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"{sae.hook_name}.hook_sae_acts_post", scale)])
            (logits[0, pos, a] - logits[0, pos, c]).backward()
        total = total + kept["scaled"].grad[0]
    engine.clean_model()
    return kept["clean"][0] * total / steps  # [S, d_sae]


def linearity_warnings(res):
    return [w for w in res.warnings or [] if "exact effect" in w]


@pytest.fixture(scope="module")
def two_sae_engine(tiny_loaded, tiny_dir, tiny_sae_dir):
    l0 = make_sae_folder(tiny_dir / "checks_sae_l0", 32, 96, "blocks.0.hook_resid_post", seed=3)
    return engine_on(tiny_loaded, tiny_sae_dir, l0)


# ---------------------------------------------------------------------------------------------------------------
# Exact effects


def test_exact_effect_of_each_verified_entry_is_the_metric_change_when_zeroing_it(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = ids(e, " mat", " park")
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=8, verify=5)
    clean = spliced_metric(e, [s], tokens, a, c, -1)
    assert [t.exact_effect is not None for t in res.top] == [True] * 5 + [False] * 3
    for t in res.top[:5]:
        zeroed = spliced_metric(e, [s], tokens, a, c, -1, zero=(s.hook_name, t.position, t.feature))
        assert t.exact_effect == pytest.approx(clean - zeroed, abs=1e-4)
    assert len({t.exact_effect for t in res.top[:5]}) == 5  # each row zeroed its own feature
    off = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=8, verify=0)
    assert all(t.exact_effect is None for t in off.top)
    assert e.is_clean()


def test_exact_effects_with_two_saes_zero_one_feature_with_both_spliced(two_sae_engine):
    e = two_sae_engine
    saes = sorted(e.saes.values(), key=lambda s: s.layer)
    tokens = e.to_tokens(PROMPT)
    a, c = ids(e, " mat", " park")
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=10, verify=10)
    assert {t.sae for t in res.top} == set(e.saes)  # entries of both SAEs are verified
    clean = spliced_metric(e, saes, tokens, a, c, -1)
    for t in res.top:
        hook = e.saes[t.sae].hook_name
        zeroed = spliced_metric(e, saes, tokens, a, c, -1, zero=(hook, t.position, t.feature))
        assert t.exact_effect == pytest.approx(clean - zeroed, abs=1e-4)
    assert e.is_clean()


# ---------------------------------------------------------------------------------------------------------------
# The linearity warning


@pytest.mark.parametrize("case,verify,expect_warning", [(NONLINEAR, 1, True), (LINEAR, 3, False)])
def test_warns_where_gradient_x_activation_is_far_from_the_exact_effect_and_only_there(
    tiny_engine, case, verify, expect_warning
):
    e, s = tiny_engine, tiny_engine.sae(None)
    prompt, answer, counterfactual = case
    tokens = e.to_tokens(prompt)
    a, c = ids(e, answer, counterfactual)
    plain = plain_grad_x_act(e, s, tokens, a, c, -1)
    clean = spliced_metric(e, [s], tokens, a, c, -1)
    res = attr.attribute(e, prompt, answer, counterfactual=counterfactual, verify=verify)
    floor = max(0.01, 0.05 * abs(clean))
    for t in res.top[:verify]:
        first_order = float(plain[t.position, t.feature])
        exact = clean - spliced_metric(e, [s], tokens, a, c, -1, zero=(s.hook_name, t.position, t.feature))
        assert t.attribution == pytest.approx(first_order, abs=1e-4)
        assert t.exact_effect == pytest.approx(exact, abs=1e-4)
        if expect_warning:  # the plain numbers disagree (here by more than 2x) ...
            assert abs(first_order) > 2 * abs(exact) > 0
        else:  # ... or agree within 20%
            assert abs(first_order - exact) < 0.2 * abs(exact)
        named = any(f"feature {t.feature} at position {t.position}" in w for w in linearity_warnings(res))
        assert named == (abs(first_order - exact) > 0.5 * max(abs(exact), floor))
    assert bool(linearity_warnings(res)) == expect_warning
    if expect_warning:
        (w,) = linearity_warnings(res)
        assert "method='integrated_gradients'" in w and "exact_effect" in w


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
    a, c = ids(e, answer, counterfactual)
    plain = plain_grad_x_act(e, s, tokens, a, c, -1)
    res = attr.attribute(e, prompt, answer, counterfactual=counterfactual, verify=0)
    assert res.method == "gradient" and res.integrated_gradients is None
    assert res.feature_attribution_total[s.key] == pytest.approx(float(plain.sum()), abs=1e-4)
    total = float(plain.sum()) + res.error_attribution[s.key]
    assert res.attribution_total == pytest.approx(total, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Integrated gradients


def test_integrated_gradients_equal_a_plain_riemann_loop(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = ids(e, " mat", " park")
    plain = plain_integrated_gradients(e, s, tokens, a, c, -1, steps=8)
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=8, top_k=10)
    assert res.method == "integrated_gradients" and res.integrated_gradients.steps == 8
    assert_close(torch.tensor(res.per_token[s.key]), plain.sum(-1), atol=1e-4, rtol=1e-3)
    for t in res.top:
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-4)
    assert res.feature_attribution_total[s.key] == pytest.approx(float(plain.sum()), abs=1e-4)
    assert res.integrated_gradients.attribution_sum == pytest.approx(float(plain.sum()), abs=1e-4)
    grad = attr.attribute(e, PROMPT, " mat", counterfactual=" park", verify=0)
    assert res.error_attribution == grad.error_attribution  # the error fields stay first order
    assert abs(res.feature_attribution_total[s.key] - grad.feature_attribution_total[s.key]) > 0.1  # not the same


def test_integrated_gradients_are_complete_with_enough_steps_and_warn_with_too_few(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = ids(e, " mat", " park")
    endpoint = spliced_metric(e, [s], tokens, a, c, -1) - spliced_metric(e, [s], tokens, a, c, -1,
                                                                         zero=(s.hook_name, None, None))
    fine = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=32)
    check = fine.integrated_gradients
    assert check.endpoint_difference == pytest.approx(endpoint, abs=1e-4)
    assert sum(fine.feature_attribution_total.values()) == pytest.approx(endpoint, rel=0.01)
    assert check.relative_error < 0.01
    assert not [w for w in fine.warnings or [] if "integrated gradients with steps" in w]
    coarse = attr.attribute(e, PROMPT, " mat", counterfactual=" park", method="integrated_gradients", steps=8)
    off = abs(coarse.integrated_gradients.attribution_sum - endpoint) / abs(endpoint)
    assert off > 0.05 and coarse.integrated_gradients.relative_error == pytest.approx(off, abs=1e-3)
    (w,) = [w for w in coarse.warnings if "integrated gradients with steps=8" in w]
    assert "steps=16" in w


def test_integrated_gradients_over_two_saes_sum_to_the_metric_with_every_feature_part_removed(two_sae_engine):
    """With several SAEs each passes on what earlier ones changed, so the path's end is the plain model with every
    SAE's clean feature part (decode(a) - decode(0)) subtracted at its hook."""
    e = two_sae_engine
    saes = sorted(e.saes.values(), key=lambda s: s.layer)
    tokens = e.to_tokens(PROMPT)
    a, c = ids(e, " mat", " park")
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
    res = attr.attribute(tiny_engine, long_prompt, " mat", counterfactual=" park", verify=0)
    assert [w for w in res.warnings if "32-token contexts" in w and "shorten" in w]
    short = attr.attribute(tiny_engine, PROMPT, " mat", counterfactual=" park", verify=0)
    assert not [w for w in short.warnings or [] if "contexts" in w]


def test_an_answer_whose_space_variant_is_far_more_likely_warns(stories_engine):
    prompt = "Once upon a time, there was a little girl named Lily. She"
    res = attr.attribute(stories_engine, prompt, "was", verify=0)
    assert [w for w in res.warnings if "' was'" in w and "pass answer=' was'" in w]
    good = attr.attribute(stories_engine, prompt, " was", verify=0)
    assert not [w for w in good.warnings or [] if "pass answer=" in w]


# ---------------------------------------------------------------------------------------------------------------
# Bounds, bad input, hygiene


def test_bad_options_are_refused_with_what_to_change(tiny_engine):
    with pytest.raises(InvalidInput, match="method 'ig' is unknown; pass method='gradient'"):
        attr.attribute(tiny_engine, PROMPT, " mat", method="ig")
    with pytest.raises(InvalidInput, match=r"steps=0 is out of range; pass 1\.\.32"):
        attr.attribute(tiny_engine, PROMPT, " mat", method="integrated_gradients", steps=0)
    with pytest.raises(InvalidInput, match=r"verify=11 is out of range; pass 0\.\.10"):
        attr.attribute(tiny_engine, PROMPT, " mat", verify=11)
    assert tiny_engine.is_clean()


@pytest.mark.parametrize("args,message", [
    ({"verify": 11}, "less than or equal to 10"),
    ({"verify": -1}, "greater than or equal to 0"),
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
    assert [t.get("exact_effect") is not None for t in out["top"][:4]] == [True, True, True, False]


@pytest.mark.parametrize("where", ["path", "ablation"])
def test_a_failure_inside_the_checks_leaves_the_model_clean(tiny_engine, monkeypatch, where):
    e = tiny_engine
    tokens = e.to_tokens(PROMPT)
    with torch.inference_mode():
        before = e.model(tokens).clone()

    def boom(*args, **kwargs):
        raise RuntimeError("inside a spliced hook")

    if where == "path":
        monkeypatch.setattr(checks.PathCapture, "_held_error", boom)
    else:
        monkeypatch.setattr(checks, "_zero_hook", lambda rows, cells: boom)
    with pytest.raises(RuntimeError, match="inside a spliced hook"):
        attr.attribute(e, PROMPT, " mat", method="integrated_gradients" if where == "path" else "gradient")
    monkeypatch.undo()
    assert e.is_clean() and not e.model.acts_to_saes
    with torch.inference_mode():
        assert torch.equal(e.model(tokens), before)
