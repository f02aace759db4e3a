"""Sound inference: the cases where an agent investigating "which features carry that the subject is a girl" on
stories260K was misled by exact numbers under wrong names, replayed on the bundled real model and its layer-3 SAE,
each against an independent computation written here (plain transformer-lens + sae-lens hooks).

Prompt, answer and counterfactual as the agent used them; ' doll' tokenizes as [' do', 'll'], so the metric is
logit[' do'] - logit[' b'] (the first token of each).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from sae_mcp.engine import ablation, steering
from sae_mcp.engine import attribution as attr
from sae_mcp.engine.attribution_checks import disagrees
from sae_mcp.engine.logits import answer_token_ids

from helpers.models import only_sae
from helpers.plain import plain_greedy, spliced_grad_x_act

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play with her"
ANSWER, COUNTERFACTUAL = " doll", " ball"


def ids(engine):
    return answer_token_ids(engine, ANSWER)[0], answer_token_ids(engine, COUNTERFACTUAL)[0]


def spliced_metric(engine, tokens, zero: tuple[int, int] | None = None) -> float:
    """logit[a] - logit[c] after the prompt, the SAE spliced with its error term (the plain model's output), with
    `zero` = (position, feature) zeroed on hook_sae_acts_post."""
    s, (a, c) = only_sae(engine), ids(engine)
    hooks = []
    if zero is not None:
        p, f = zero

        def hook(acts, hook):
            acts = acts.clone()
            acts[:, p, f] = 0.0
            return acts

        hooks = [(f"{s.hook_name}.hook_sae_acts_post", hook)]
    with torch.inference_mode(), engine.model.saes(saes=[s.sae], use_error_term=True):
        logits = engine.model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1]
    engine.clean_model()
    return float(logits[a] - logits[c])


def plain_grad_x_act(engine, tokens) -> torch.Tensor:
    """acts * d metric / d acts [S, d_sae], the SAE spliced with the error term, one backward
    (helpers.plain.spliced_grad_x_act)."""
    a, c = ids(engine)
    return spliced_grad_x_act(engine, only_sae(engine), tokens,
                              lambda logits: logits[0, -1, a] - logits[0, -1, c]).grad_x_act[0]


@pytest.fixture(scope="module")
def attributed(stories_engine):
    return attr.attribute(stories_engine, PROMPT, ANSWER, counterfactual=COUNTERFACTUAL, top_k=30)


# 1 ------------------------------------------------------------------------------------------------------------


def test_the_verified_value_is_the_contribution_and_zeroing_moves_the_metric_by_minus_it(stories_engine, attributed):
    """The value beside each attribution is metric - metric with the feature zeroed (its contribution): the
    strongest entry's ablation in ablate_and_test changes the metric by minus that, not by it."""
    e, res = stories_engine, attributed
    tokens = e.to_tokens(PROMPT)
    clean = spliced_metric(e, tokens)
    top = max(res.top, key=lambda t: abs(t.exact_contribution))
    zeroed = spliced_metric(e, tokens, zero=(top.position, top.feature))
    assert top.exact_contribution == pytest.approx(clean - zeroed, abs=1e-4)
    ablated = ablation.ablate_and_test(e, PROMPT, ANSWER, [top.feature], position=top.position,
                                       counterfactual=COUNTERFACTUAL)
    assert ablated.ablated.metric_change == pytest.approx(zeroed - clean, abs=1e-3)
    assert ablated.ablated.metric_change == pytest.approx(-top.exact_contribution, abs=1e-3)
    dumped = res.model_dump()
    assert "exact_effect" not in str(dumped) and all("exact_contribution" in t for t in dumped["top"])


# 2 ------------------------------------------------------------------------------------------------------------


def test_every_returned_entry_is_checked_and_every_disagreement_is_named(stories_engine, attributed):
    """All 30 entries carry their exact contribution (not only the top 3), each equal to a plain zeroing; the
    warning names exactly the entries the disagreement rule flags on the plain numbers, here some far down."""
    e, res = stories_engine, attributed
    tokens = e.to_tokens(PROMPT)
    clean, plain = spliced_metric(e, tokens), plain_grad_x_act(e, tokens)
    flagged = []
    for i, t in enumerate(res.top):
        exact = clean - spliced_metric(e, tokens, zero=(t.position, t.feature))
        assert t.exact_contribution == pytest.approx(exact, abs=1e-4)
        assert t.attribution == pytest.approx(float(plain[t.position, t.feature]), abs=1e-4)
        if disagrees(float(plain[t.position, t.feature]), exact, clean):
            flagged.append((i, t))
    assert len(res.top) == 30 and any(i >= 3 for i, _ in flagged)  # beyond what verify=3 used to check
    (warning,) = [w for w in res.warnings if "exact contribution" in w]
    assert warning.startswith(f"{len(flagged)} entr")
    for _, t in flagged:
        assert f" {t.feature} at {t.position} {t.token!r} " in warning
    assert len(re.findall(r"\(-?[\d.e+-]+ vs -?[\d.e+-]+\)", warning)) == len(flagged)  # those and no other


# 3 ------------------------------------------------------------------------------------------------------------


def test_integrated_gradients_is_labelled_as_itself_and_its_error_share_is_its_own(stories_engine):
    from sae_mcp.server.tools.attribute import render as agent_text

    grad = attr.attribute(stories_engine, PROMPT, ANSWER, counterfactual=COUNTERFACTUAL, top_k=5, verify=False)
    ig = attr.attribute(stories_engine, PROMPT, ANSWER, counterfactual=COUNTERFACTUAL, top_k=5, verify=False,
                        method="integrated_gradients", steps=16)
    key = next(iter(ig.error_share))
    assert "first order" not in agent_text(ig) and "first order" in agent_text(grad)
    assert ig.error_attribution[key] != pytest.approx(grad.error_attribution[key], abs=1e-4)
    assert ig.integrated_gradients.error_endpoint_difference is not None


# 4 ------------------------------------------------------------------------------------------------------------


def test_controls_for_the_strongest_feature_at_her_are_matched_and_no_known_cause_or_none_with_why(stories_engine,
                                                                                                   attributed):
    """At ' her' alone no other feature fires within 0.5-2x of the strongest one there outside the known causes:
    no control rather than a poor one, and a note that says so. Over every position, the controls drawn fire
    within 0.5-2x of it and none is among the 20 largest |attribution| (computed here)."""
    e = stories_engine
    s = only_sae(e)
    tokens = e.to_tokens(PROMPT)
    last = tokens.shape[1] - 1
    target = max((t for t in attributed.top if t.position == last), key=lambda t: abs(t.exact_contribution))
    with torch.inference_mode():
        _, cache = e.model.run_with_cache(tokens, names_filter=[s.hook_name])
        acts = s.sae.encode(cache[s.hook_name])[0]  # [S, d_sae]
    plain = plain_grad_x_act(e, tokens)  # [S, d_sae]
    for position in (-1, None):
        rows = [last] if position == -1 else list(range(tokens.shape[1]))
        total, attribution = acts[rows].sum(0), plain[rows].sum(0)
        causes = set(attribution.abs().topk(20).indices.tolist())
        lo, hi = 0.5 * float(total[target.feature]), 2 * float(total[target.feature])
        matches = {f for f in range(s.d_sae) if f != target.feature and f not in causes and total[f] > 0
                   and lo - 1e-4 <= float(total[f]) <= hi + 1e-4}
        res = ablation.ablate_and_test(e, PROMPT, ANSWER, [target.feature], position=position,
                                       counterfactual=COUNTERFACTUAL, controls=True, n_controls=5)
        drawn = [run.features[0] for run in res.controls.runs]
        assert set(drawn) <= matches and len(drawn) == min(5, len(matches))
        if len(matches) < 5:
            assert f"{len(matches)} of 5 control sets" in res.controls.note
    assert "0.5-2x" in res.controls.matched_on


# 5 ------------------------------------------------------------------------------------------------------------


def test_one_metric_convention_and_significance_only_on_the_metric_and_kl(stories_engine):
    """Without a counterfactual every causal tool scores log P(answer), never the raw logit; controls state z and
    'exceeds every control' on the metric and KL only, the raw logit change staying a plain number."""
    e = stories_engine
    tokens = e.to_tokens(PROMPT)
    a = ids(e)[0]
    with torch.inference_mode():
        logits = e.model(tokens)[0, -1]
    log_p = float(logits.log_softmax(-1)[a])
    res = attr.attribute(e, PROMPT, ANSWER, top_k=3, verify=False)
    assert res.metric_kind == "log_probability" and res.metric_value == pytest.approx(log_p, abs=1e-4)
    abl = ablation.ablate_and_test(e, PROMPT, ANSWER, [res.top[0].feature], controls=True, n_controls=5)
    assert abl.metric_kind == "log_probability" and abl.baseline.metric == pytest.approx(log_p, abs=1e-3)
    assert {st.metric for st in abl.controls.stats} <= {"metric_change", "kl_next_token"}
    assert all("answer_logit_change" in run.effects for run in abl.controls.runs)


# 6 ------------------------------------------------------------------------------------------------------------


def plain_max(engine, feature: int, n_windows: int = 200) -> float:
    """The feature's max activation over the corpus' first windows, the plain way (encode at the hook)."""
    from sae_mcp.engine.corpus import iter_windows, pad_windows, resolve_corpus

    from helpers.models import STORIES_CORPUS

    s = only_sae(engine)
    windows = []
    for w in iter_windows(resolve_corpus(str(STORIES_CORPUS)), engine.corpus_tokenizer, 128, 1):
        windows.append(w)
        if len(windows) == n_windows:
            break
    tokens, mask = pad_windows(windows, 0, True)
    with torch.inference_mode():
        _, cache = engine.model.run_with_cache(tokens, names_filter=[s.hook_name])
        acts = s.sae.encode(cache[s.hook_name])[..., feature]  # [B, T]
    return float(acts[mask.bool()].max())


def plain_loss_and_entropy(engine, prompt_ids: torch.Tensor, new: torch.Tensor) -> tuple[float, float]:
    """Mean per-token loss of `new` [T] after the prompt [1, S] under the plain model, and the mean entropy of its
    next-token distributions there."""
    S = prompt_ids.shape[1]
    seq = torch.cat([prompt_ids, new[None]], dim=1)
    with torch.inference_mode():
        lp = engine.model(seq)[0, S - 1 : -1].log_softmax(-1)  # [T, V]
    nll = -lp[torch.arange(len(new)), new]
    return float(nll.mean()), float(-(lp.exp() * lp).sum(-1).mean())


@pytest.mark.parametrize("feature", [858, 440])  # two features whose 2x continuation reads as a story (measured)
def test_fluent_steering_is_not_flagged_and_word_salad_far_above_the_max_is_with_the_multiple_named(stories_engine,
                                                                                                   feature):
    e, s = stories_engine, only_sae(stories_engine)
    mx = plain_max(e, feature)
    tokens = e.to_tokens(PROMPT)
    request = steering.SteeringRequest(PROMPT, ((feature, mx),), calibration="absolute", strengths=(2.0, 290.0),
                                       max_new_tokens=30, temperature=0.0)
    res = steering.steer_generate(e, request, known_max_fn=lambda sae, f: mx)
    _, reference = plain_loss_and_entropy(e, tokens, plain_greedy(e, tokens, s.hook_name, 0.0 * s.sae.W_dec[0], 30))
    for run in res.steered:
        (cont,) = run.continuations
        new = plain_greedy(e, tokens, s.hook_name, run.scale * mx * s.sae.W_dec[feature], 30)
        loss, _ = plain_loss_and_entropy(e, tokens, new)
        assert cont.loss_ratio == pytest.approx(loss / reference, rel=1e-3)
    fluent, salad = res.steered
    assert not fluent.degenerate and fluent.continuations[0].loss_ratio < 3
    assert salad.degenerate and salad.continuations[0].loss_ratio > 3
    far = [w for w in res.warnings if "far above the feature's max activation" in w]
    assert len(far) == 1 and f"feature {feature} at 290x" in far[0]
    assert any("dose 290 degenerated" in w and "read dose 2" in w for w in res.warnings)
    calm = steering.steer_generate(e, dataclasses.replace(request, strengths=(2.0,)), known_max_fn=lambda sae, f: mx)
    assert not [w for w in calm.warnings or [] if "far above" in w]


# 7 ------------------------------------------------------------------------------------------------------------


def test_fewer_rows_than_top_k_say_why_and_ranks_say_they_are_0_based(stories_server):
    from mcp_client import call_many

    pair, nxt = call_many(stories_server, [
        ("compare_prompts", {"prompt_a": "Lily was happy.", "prompt_b": "Lily was sad.", "top_k": 50}),
        ("next_token", {"prompt": PROMPT, "answer": ANSWER}),
    ])
    diffs = pair.structured_content["diffs"]
    assert len(diffs) < 50
    (why,) = [w for w in pair.structured_content["warnings"] if "differ between the prompts" in w]
    assert f"only {len(diffs)} feature(s)" in why and f"{len(diffs)} rows, not 50" in why
    text = "".join(c.text for c in nxt.content)
    assert "(0-based)" in text
