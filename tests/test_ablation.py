"""Ablation against independent plain computations (the tutorial's way, hooks written plainly)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import ablation
from sae_mcp.engine.runtime import resolve_positions
from sae_mcp.errors import InvalidInput

from helpers.plain import (
    assert_tables_close,
    first_token_ids,
    plain_ablation_logits,
    spliced_grad_x_act,
    tokens_of,
    tutorial_sae_acts,
)

PROMPT = "the cat sat on the mat and the dog"


def plain_acts(engine, tokens):
    """The SAE's feature activations [S, d_sae] the tutorial way."""
    return tutorial_sae_acts(engine, tokens)[0]


def silent_warning(res) -> str | None:
    """The result's warning that a target does not fire where it is ablated, if any."""
    return next((w for w in res.warnings or [] if "zero activation at the ablated positions" in w), None)


def test_error_term_with_nothing_ablated_gives_the_plain_models_logits(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    with e.device_work(), torch.inference_mode():
        plain = e.model(tokens)[0, -1]
        spliced = ablation._spliced_logits(e, s, tokens, [[]], list(range(tokens.shape[1])), error_term=True)[0]
        tutorial = e.model.run_with_saes(tokens, saes=[s.sae], use_error_term=True)[0, -1]
    assert_close(spliced, plain)
    assert_close(tutorial, plain)
    assert e.is_clean()


def test_ablation_with_error_term_removes_exactly_act_times_decoder_at_the_positions(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    acts = plain_acts(e, tokens)  # [S, d_sae]
    positions = [2, 4, -1]
    pos = [p % tokens.shape[1] for p in positions]
    feats = [int(f) for f in acts[pos].sum(0).topk(3).indices]  # features that fire there

    # plain: subtract sum_f act[p, f] * W_dec[f] at the hook, no SAE anywhere
    delta = torch.zeros(tokens.shape[1], s.d_in)
    delta[pos] = acts[pos][:, feats] @ s.sae.W_dec[feats]  # [n_pos, d_in]

    def remove(x, hook):
        return x - delta[None]

    with torch.inference_mode():
        expected = e.model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, remove)])[0, -1]
    with e.device_work(), torch.inference_mode():
        got = ablation._spliced_logits(e, s, tokens, [feats], pos, error_term=True)[0]
    assert_close(got, expected, atol=1e-5, rtol=1e-5)

    res = ablation.ablate_and_test(e, PROMPT, " mat", feats, position=positions)
    answer_id = res.answer.token_id
    assert res.positions == sorted(pos)
    assert res.ablated.answer_logit == pytest.approx(float(expected[answer_id]), abs=1e-3)
    assert res.ablated.answer_logit_change != 0.0
    assert [f.feature for f in res.features] == feats
    for f, got_f in zip(feats, res.features):
        assert got_f.activation_sum == pytest.approx(float(acts[pos, f].sum()), abs=1e-3)
        assert got_f.max_activation == pytest.approx(float(acts[pos, f].max()), abs=1e-3)
        assert got_f.fired
    assert silent_warning(res) is None


def test_without_the_error_term_the_ablation_is_measured_against_reconstruction_only(tiny_engine):
    e = tiny_engine
    tokens = tokens_of(e, PROMPT)
    feats = [int(f) for f in plain_acts(e, tokens).sum(0).topk(2).indices]
    plain = plain_ablation_logits(e, tokens, feats)
    base, recon, no_err, with_err = plain["base"], plain["recon"], plain["no_err"], plain["with_err"]

    def kl(p, q):  # KL(P || Q) from logits, written out
        lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
        return float((lp.exp() * (lp - lq)).sum())

    res = ablation.ablate_and_test(e, PROMPT, " mat", feats)
    a = res.answer.token_id
    t = res.ablated_without_error_term
    p_no, p_rec = float(no_err.softmax(-1)[a]), float(recon.softmax(-1)[a])
    assert t.answer_probability_change_vs_reconstruction == pytest.approx(p_no - p_rec, abs=1e-5)
    assert t.answer_logit_change_vs_reconstruction == pytest.approx(float(no_err[a] - recon[a]), abs=1e-3)
    assert t.kl_from_reconstruction == pytest.approx(kl(recon, no_err), abs=1e-5)
    # the change from baseline mixes in the SAE's own distortion, so the two differ
    assert t.kl_from_baseline == pytest.approx(kl(base, no_err), abs=1e-5)
    assert abs(t.kl_from_baseline - t.kl_from_reconstruction) > 1e-3
    # the summary names the causal effect (with the error term, vs baseline) and the SAE's distortion, in numbers,
    # on the metric (log P(answer) without a counterfactual), never the raw logit
    def log_p(logits):
        return float(torch.log_softmax(logits, -1)[a])

    line = res.summary
    assert "\n" not in line and "ablated vs baseline" in line and "vs reconstruction_only" in line
    assert f"metric {log_p(with_err) - log_p(base):+.4g}" in line
    assert f"metric {log_p(no_err) - log_p(recon):+.4g}" in line
    assert f"distortion (reconstruction_only vs baseline): KL {kl(base, recon):.4g}" in line
    assert "logit" not in line
    assert res.metric == "log P('mat')" and res.metric_kind == "log_probability"
    assert res.ablated.metric_change == pytest.approx(log_p(with_err) - log_p(base), abs=1e-4)


def test_tables_without_error_term_match_tutorial_run_with_saes(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    feats = [int(f) for f in plain_acts(e, tokens).sum(0).topk(2).indices]
    plain = plain_ablation_logits(e, tokens, feats)
    base, recon, ablated = plain["base"], plain["recon"], plain["no_err"]
    res = ablation.ablate_and_test(e, PROMPT, " mat", feats)
    a = res.answer.token_id
    assert res.baseline.answer_logit == pytest.approx(float(base[a]), abs=1e-3)
    assert res.reconstruction_only.answer_logit == pytest.approx(float(recon[a]), abs=1e-3)
    assert res.ablated_without_error_term.answer_logit == pytest.approx(float(ablated[a]), abs=1e-3)
    assert res.reconstruction_only.answer_logit_change == pytest.approx(float(recon[a] - base[a]), abs=1e-3)
    assert res.reconstruction_only.kl_from_baseline > 0  # a random SAE distorts; the table says by how much
    assert e.is_clean() and not s.sae.use_error_term


def test_ablating_a_feature_that_does_not_fire_changes_nothing(tiny_engine):
    e = tiny_engine
    acts = plain_acts(e, tokens_of(e, PROMPT))
    silent = int((acts.sum(0) == 0).nonzero()[0])
    res = ablation.ablate_and_test(e, PROMPT, " mat", [silent], controls=True, n_controls=3)
    assert res.features[0].activation_sum == 0.0 and not res.features[0].fired
    assert res.ablated.answer_logit == pytest.approx(res.baseline.answer_logit, abs=1e-4)
    assert "do not fire" in res.controls.note


def test_a_target_that_never_fires_is_flagged_per_feature_and_in_a_note_even_without_controls(tiny_engine):
    e = tiny_engine
    acts = plain_acts(e, tokens_of(e, PROMPT))  # [S, d_sae]
    silent = int((acts[-1] == 0).nonzero()[0])
    firing = int(acts[-1].argmax())
    alone = ablation.ablate_and_test(e, PROMPT, " mat", [silent], position=-1)
    assert alone.controls is None
    assert [(f.fired, f.activation_sum, f.max_activation) for f in alone.features] == [(False, 0.0, 0.0)]
    note = silent_warning(alone)
    assert str(silent) in note and "changes nothing" in note and "by construction" in note
    # Equal up to float error, not bit-equal: the plain model and the model with the SAE spliced in (its error term
    # on) are two computations (0.036457 vs 0.036456 on an AVX-512 CPU).
    assert_tables_close(alone.ablated.top, alone.baseline.top)
    assert_tables_close(alone.ablated_without_error_term.top, alone.reconstruction_only.top)
    mixed = ablation.ablate_and_test(e, PROMPT, " mat", [firing, silent], position=-1)
    assert [f.fired for f in mixed.features] == [True, False]
    assert mixed.features[0].max_activation == pytest.approx(float(acts[-1, firing]), abs=1e-3)
    assert str(silent) in silent_warning(mixed) and "by construction" not in silent_warning(mixed)
    assert silent_warning(ablation.ablate_and_test(e, PROMPT, " mat", [firing], position=-1)) is None


def plain_attribution_sum(engine, tokens, answer_id, positions) -> torch.Tensor:
    """Gradient x activation of every feature on log P(answer) after the prompt, summed over `positions` [d_sae]:
    the tutorial way (helpers.plain.spliced_grad_x_act)."""
    run = spliced_grad_x_act(engine, engine.sae(None), tokens, lambda logits: logits[0, -1].log_softmax(-1)[answer_id])
    return run.grad_x_act[0, positions].sum(0)


def test_ablation_controls_fire_within_half_to_twice_their_targets_activation_and_are_no_known_cause(tiny_engine):
    """Controls could have shown the effect and are not themselves known causes: each fires at the ablated
    positions with a summed activation within 0.5-2x its target's, and none is a target or among the 20 features of
    largest |attribution| to the metric there (computed here the plain way)."""
    e = tiny_engine
    tokens = tokens_of(e, PROMPT)
    acts = plain_acts(e, tokens)  # [S, d_sae]
    total = acts.sum(0)  # every position is ablated
    order = total.argsort(descending=True)
    feats = [int(order[10]), int(order[12])]  # mid-range targets: several features fire within 0.5-2x of each
    one = ablation.ablate_and_test(e, PROMPT, " mat", feats, controls=True, n_controls=4, seed=7)
    two = ablation.ablate_and_test(e, PROMPT, " mat", feats, controls=True, n_controls=4, seed=7)
    other = ablation.ablate_and_test(e, PROMPT, " mat", feats, controls=True, n_controls=4, seed=8)
    assert one.controls == two.controls
    assert [r.features for r in one.controls.runs] != [r.features for r in other.controls.runs]
    attribution = plain_attribution_sum(e, tokens, one.answer.token_id, list(range(tokens.shape[1])))
    known_causes = set(attribution.abs().topk(20).indices.tolist())
    for run in one.controls.runs + other.controls.runs:
        assert len(run.features) == 2 and not set(run.features) & (set(feats) | known_causes)
        for target, control in zip(feats, run.features):
            assert 0.5 * float(total[target]) - 1e-4 <= float(total[control]) <= 2 * float(total[target]) + 1e-4
    # significance only on the metric and KL; the raw logit change stays a plain number in each run
    assert {st.metric for st in one.controls.stats} == {"metric_change", "kl_next_token"}
    assert all("answer_logit_change" in run.effects for run in one.controls.runs)
    st = next(st for st in one.controls.stats if st.metric == "metric_change")
    assert st.target == pytest.approx(one.ablated.metric_change, abs=1e-3)
    assert st.control_min <= st.control_mean <= st.control_max
    assert "0.5-2x" in one.controls.matched_on and "20 of largest |attribution|" in one.controls.matched_on


def test_fewer_matched_controls_than_asked_come_back_fewer_with_why_never_filled_with_poor_matches(tiny_engine):
    """The strongest feature at the last position has few features within 0.5-2x of it there: fewer control sets
    than asked, each a real match, and a note saying why."""
    e = tiny_engine
    tokens = tokens_of(e, PROMPT)
    acts = plain_acts(e, tokens)[-1]  # [d_sae] at the ablated position
    top = int(acts.argmax())
    attribution = plain_attribution_sum(e, tokens, ablation_answer_id(e), [tokens.shape[1] - 1])
    excluded = set(attribution.abs().topk(20).indices.tolist()) | {top}
    matches = [f for f in range(acts.numel()) if f not in excluded and acts[f] > 0
               and 0.5 * acts[top] <= acts[f] <= 2 * acts[top]]
    assert len(matches) < 16  # the premise: fewer matches than asked
    res = ablation.ablate_and_test(e, PROMPT, " mat", [top], position=-1, controls=True, n_controls=16)
    assert sorted(f for run in res.controls.runs for f in run.features) == sorted(matches)
    assert f"{len(matches)} of 16 control sets" in res.controls.note and f"target {top}" in res.controls.note


def ablation_answer_id(engine) -> int:
    (answer,) = first_token_ids(engine, " mat")
    return answer


def test_positions_resolve_negative_indices_and_reject_out_of_range():
    assert resolve_positions(None, 4) == [0, 1, 2, 3]
    assert resolve_positions(-1, 4) == [3]
    assert resolve_positions([0, -4, 2], 4) == [0, 2]
    with pytest.raises(InvalidInput, match=r"out of range: the prompt has 4 tokens \(use 0\.\.3, or -4\.\.-1 counting"):
        resolve_positions([4], 4)
    with pytest.raises(InvalidInput, match="empty list"):
        resolve_positions([], 4)


def test_fewer_than_five_ablation_controls_carry_a_caution_that_they_are_weak_evidence(tiny_engine):
    e = tiny_engine
    feats = [int(f) for f in plain_acts(e, tokens_of(e, PROMPT))[-1].topk(2).indices]
    abl = ablation.ablate_and_test(e, PROMPT, " mat", feats, position=-1, controls=True, n_controls=2)
    assert "weak evidence" in abl.controls.caution
