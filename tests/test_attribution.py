"""Gradient x activation attribution against the plain computation (retain_grad on hook_sae_acts_post)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import attribution as attr
from sae_mcp.errors import InvalidInput

from helpers.plain import first_token_ids, spliced_grad_x_act

PROMPT = "the cat sat on the mat and the dog"


def plain_attribution(engine, sae, tokens, a, c, pos):
    """The tutorial way (helpers.plain.spliced_grad_x_act) on logit[a] - logit[c] at `pos` -> (the metric, the
    logits [1, S, V], gradient x activation [S, d_sae])."""
    run = spliced_grad_x_act(engine, sae, tokens, lambda logits: logits[0, pos, a] - logits[0, pos, c])
    return run.metric, run.logits, run.grad_x_act[0]


def plain_hook_gradient(engine, sae, tokens, a, c, pos):
    """x at the hook and d metric / d x there, from the plain model with no SAE."""
    model, kept = engine.model, {}

    def leaf(x, hook):
        x = x.detach().requires_grad_(True)
        kept["x"] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, leaf)])
        (logits[0, pos, a] - logits[0, pos, c]).backward()
    engine.clean_model()
    return kept["x"].detach()[0], kept["x"].grad[0]  # [S, d_in] each


def test_single_sae_attributions_equal_the_plain_grad_times_activation(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    metric, logits, plain = plain_attribution(e, s, tokens, a, c, -2)
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=15, position=-2)
    assert res.metric_value == pytest.approx(metric, abs=1e-5)
    assert res.position == tokens.shape[1] - 2 and "logit['mat'] - logit['park']" in res.metric
    assert_close(torch.tensor(res.per_token[s.key]), plain.sum(-1), atol=2e-5, rtol=1e-4)
    expected = sorted(((p, f) for p in range(plain.shape[0]) for f in range(plain.shape[1])),
                      key=lambda pf: -abs(float(plain[pf])))[:15]
    assert [(t.position, t.feature) for t in res.top] == expected
    for t in res.top:
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-5)
        assert t.token == e.str_tokens(tokens)[t.position]
    assert all(t.position <= res.position for t in res.top)  # causal: later positions get no gradient
    with torch.inference_mode():
        assert_close(logits, e.model(tokens))  # the error term kept the model's output


def test_error_attribution_is_gradient_dot_error_and_the_parts_sum_to_gradient_dot_input(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    x, g = plain_hook_gradient(e, s, tokens, a, c, -1)
    with torch.inference_mode():
        x_hat = s.sae.decode(s.sae.encode(x))  # [S, d_in]
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park")
    err, rec = float((g * (x - x_hat)).sum()), float((g * x_hat).sum())
    assert res.error_attribution[s.key] == pytest.approx(err, abs=1e-4)  # the signed totals, BOS included
    assert res.reconstruction_attribution[s.key] == pytest.approx(rec, abs=1e-4)
    # per position p: g_p . e_p; the share sums |.| per position over 1..last, BOS (position 0) left out
    err_p, rec_p = (g * (x - x_hat)).sum(-1), (g * x_hat).sum(-1)  # [S]
    assert_close(torch.tensor(res.error_attribution_per_token[s.key]), err_p, atol=1e-5, rtol=1e-4)
    num = sum(abs(float(v)) for v in err_p[1:])
    share = num / (num + sum(abs(float(v)) for v in rec_p[1:]))
    assert res.error_share[s.key] == pytest.approx(share, abs=1e-3)
    assert res.error_share_positions == [1, tokens.shape[1] - 1]
    assert abs(share - abs(err) / (abs(err) + abs(rec))) > 1e-2  # the old signed-total formula differs here
    # completeness (the decoder is linear): features + g.b_dec + error = g.x
    b_dec = float((g * s.sae.b_dec).sum())
    assert sum(res.per_token[s.key]) + b_dec + err == pytest.approx(float((g * x).sum()), abs=1e-3)
    assert res.error_share[s.key] != 0.5  # a ratio of gradient norms would always say 0.5


def test_error_share_is_taken_over_positions_one_to_the_metric_position_without_bos(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    pos = tokens.shape[1] - 3
    x, g = plain_hook_gradient(e, s, tokens, a, c, pos)
    with torch.inference_mode():
        x_hat = s.sae.decode(s.sae.encode(x))
    err_p, rec_p = (g * (x - x_hat)).sum(-1).abs(), (g * x_hat).sum(-1).abs()  # [S]
    res = attr.attribute(e, PROMPT, " mat", counterfactual=" park", position=pos)
    per = res.error_attribution_per_token[s.key]
    assert per[0] != 0.0 and all(v == 0.0 for v in per[pos + 1:])  # BOS has some; after the metric, none
    assert res.error_share_positions == [1, pos]
    share = float(err_p[1 : pos + 1].sum() / (err_p[1 : pos + 1].sum() + rec_p[1 : pos + 1].sum()))
    with_bos = float(err_p.sum() / (err_p.sum() + rec_p.sum()))
    assert res.error_share[s.key] == pytest.approx(share, abs=2e-4)  # rounded to 4 places
    assert res.error_share[s.key] != pytest.approx(with_bos, abs=2e-4)  # BOS left out (it counts here)


def test_answer_alone_differentiates_the_log_probability_of_the_answer_not_its_raw_logit(tiny_engine):
    """One metric convention: without a counterfactual the metric is log P(answer) (a raw logit moves with the whole
    distribution). Its value and its gradient x activation against the plain computation."""
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = e.to_tokens(PROMPT)
    (a,) = first_token_ids(e, " mat")
    run = spliced_grad_x_act(e, s, tokens, lambda logits: logits[0, -1].log_softmax(-1)[a])
    log_p, logits, plain = run.metric, run.logits, run.grad_x_act[0]  # [S, d_sae]
    res = attr.attribute(e, PROMPT, " mat", top_k=5)
    assert res.metric_value == pytest.approx(float(log_p), abs=1e-4)
    assert res.metric_value != pytest.approx(float(logits[0, -1, a]), abs=1e-2)  # not the raw logit
    assert res.metric.startswith("log P('mat') at position") and res.metric_kind == "log_probability"
    for t in res.top:
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-4)


def test_a_multi_token_answer_or_counterfactual_is_scored_on_its_first_token_and_the_result_says_so(tiny_engine):
    e = tiny_engine
    tokens = e.to_tokens(PROMPT)
    a, c = first_token_ids(e, " mat", " park")
    with torch.inference_mode():
        logits = e.model(tokens)[0, -1]
    res = attr.attribute(e, PROMPT, " mat on", counterfactual=" park and")
    assert res.metric_value == pytest.approx(float(logits[a] - logits[c]), abs=1e-4)  # the first tokens only
    assert (res.answer_tokens, res.multi_token) == (["mat", "on"], True)
    assert (res.counterfactual_tokens, res.counterfactual_multi_token) == (["park", "and"], True)
    single = attr.attribute(e, PROMPT, " mat")
    assert (single.answer_tokens, single.multi_token) == (["mat"], False)
    assert (single.counterfactual_tokens, single.counterfactual_multi_token) == (None, None)


def test_several_saes_in_one_pass_give_each_saes_attributions_alone(two_sae_engine):
    e = two_sae_engine
    both = attr.attribute(e, PROMPT, " mat", counterfactual=" park", top_k=30)
    assert set(both.per_token) == set(e.saes)
    for key in e.saes:
        alone = attr.attribute(e, PROMPT, " mat", counterfactual=" park", sae=key, top_k=30)
        assert_close(torch.tensor(both.per_token[key]), torch.tensor(alone.per_token[key]), atol=1e-4, rtol=1e-3)
        assert both.error_attribution[key] == pytest.approx(alone.error_attribution[key], abs=1e-3)
        mine = [(t.position, t.feature, t.attribution) for t in both.top if t.sae == key]
        theirs = {(t.position, t.feature): t.attribution for t in alone.top}
        for p, f, v in mine:
            assert v == pytest.approx(theirs[(p, f)], abs=1e-4)
    assert {t.sae for t in both.top} == set(e.saes)
    assert [abs(t.attribution) for t in both.top] == sorted((abs(t.attribution) for t in both.top), reverse=True)
    assert e.is_clean()


def test_attribute_rejects_bad_input_with_what_to_change(tiny_engine, two_sae_engine):
    with pytest.raises(InvalidInput, match="same token"):
        attr.attribute(tiny_engine, PROMPT, " mat", counterfactual=" mat")
    with pytest.raises(InvalidInput, match=r"position 99 is out of range: the prompt has \d+ tokens \(use 0\.\.\d+,"):
        attr.attribute(tiny_engine, PROMPT, " mat", position=99)
    with pytest.raises(InvalidInput, match="not both"):
        attr.attribute(two_sae_engine, PROMPT, " mat", sae="blocks.1.hook_resid_pre", saes=["blocks.1.hook_resid_pre"])
    assert tiny_engine.is_clean()


def test_attribution_on_the_real_model_matches_the_plain_computation(stories_engine):
    e, s = stories_engine, stories_engine.sae(None)
    prompt = "Once upon a time, there was a little girl named Lily. She"
    tokens = e.to_tokens(prompt)
    a, c = first_token_ids(e, " was", " saw")
    metric, _, plain = plain_attribution(e, s, tokens, a, c, -1)
    res = attr.attribute(e, prompt, " was", counterfactual=" saw", top_k=10)
    assert res.metric_value == pytest.approx(metric, abs=1e-4)
    assert_close(torch.tensor(res.per_token[s.key]), plain.sum(-1), atol=1e-4, rtol=1e-3)
    for t in res.top:
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-4)
    assert 0 < res.error_share[s.key] < 1
