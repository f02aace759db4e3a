"""Steering against independent plain computations (the tutorial's way, hooks written plainly)."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import generation, steering, steering_readout
from sae_mcp.engine.metric import Metric
from sae_mcp.engine.runtime import CancelToken
from sae_mcp.engine.steering_plan import DEFAULT_TOP_P
from sae_mcp.errors import Cancelled, InvalidInput

from helpers.plain import plain_greedy, tokens_of, tutorial_sae_acts

PROMPT = "the cat sat on the mat and the dog"


def steer(engine, prompt, features, max_activation_fn=None, known_max_fn=None, use_cache=True, cancel=None,
          progress=None, **asked):
    """steer_generate with the SteeringRequest built from keyword arguments, lists as tuples (as the tool builds
    it)."""
    asked = {k: tuple(v) if isinstance(v, list) else v for k, v in asked.items()}
    request = steering.SteeringRequest(prompt, tuple(features), **asked)
    return steering.steer_generate(engine, request, max_activation_fn, known_max_fn, use_cache, cancel, progress)


def rows(tokens, hook_name, vectors, max_new_tokens, temperature, top_p, seed, metric=None):
    """A RowBatch: every row of vectors [B, d_in] seeded with `seed`."""
    decoding = generation.Decoding(max_new_tokens, temperature, top_p)
    return generation.RowBatch(tokens, hook_name, vectors, (seed,) * vectors.shape[0], decoding, metric=metric)


def plain_kl_per_position(p_logits, q_logits):
    """KL(P || Q) at each position [S] from logits [S, V], written out."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_steering_adds_coefficient_times_decoder_at_every_prompt_position(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    with torch.inference_mode():
        plain = e.model(tokens)[0]  # [S, V]
        expected = e.model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, lambda x, hook: x + vec)])[0]
    batch = rows(tokens, s.hook_name, torch.stack([torch.zeros_like(vec), vec]), 1, 0.0, 1.0, 0,
                 metric=Metric(7, None, "x", None))
    _, stats, _ = generation.generate_rows(e, batch)
    assert stats.last_logits.shape == (2, plain.shape[-1])  # only the last position is kept
    assert_close(stats.last_logits[1], expected[-1], atol=1e-5, rtol=1e-5)
    # every prompt position enters the mean KL: it equals the plain per-position KL averaged
    assert stats.kl_mean[1] == pytest.approx(float(plain_kl_per_position(plain, expected).mean()), abs=1e-5)
    assert stats.kl_last[1] == pytest.approx(float(plain_kl_per_position(plain, expected)[-1]), abs=1e-5)
    assert stats.p_answer[1] == pytest.approx(float(expected[-1].softmax(-1)[7]), abs=1e-6)
    assert stats.metric[1] == pytest.approx(float(expected[-1].log_softmax(-1)[7]), abs=1e-5)  # log P(answer)
    assert stats.kl_mean[0] == 0.0 and stats.kl_last[0] == 0.0
    assert e.is_clean()


@pytest.mark.parametrize("chunk_elements", [1, 3 * 64, 2**24])
def test_prompt_stats_chunked_over_rows_and_positions_equal_the_plain_full_tensor_computation(monkeypatch,
                                                                                              chunk_elements):
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 64) * 3  # [B, S, V]
    monkeypatch.setattr(generation, "KL_CHUNK_ELEMENTS", chunk_elements)  # 1 position, 3 positions, all at once
    stats = generation.PromptStats.from_logits(logits, Metric(5, 7, "a", "b"))
    for b in range(4):
        kl = plain_kl_per_position(logits[0], logits[b])  # [S]
        assert stats.kl_mean[b] == pytest.approx(float(kl.mean()), abs=1e-5)
        assert stats.kl_last[b] == pytest.approx(float(kl[-1]), abs=1e-5)
        assert stats.p_answer[b] == pytest.approx(float(logits[b, -1].softmax(-1)[5]), abs=1e-6)
        assert stats.metric[b] == pytest.approx(float(logits[b, -1, 5] - logits[b, -1, 7]), abs=1e-5)
    assert torch.equal(stats.last_logits, logits[:, -1])
    assert generation.PromptStats.from_logits(logits, None).p_answer is None


def test_steer_generate_kl_and_answer_probability_equal_a_plain_computation(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    res = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=3,
                temperature=0.0, answer=" mat", strengths=[1.0, 2.5])
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    a = int(e.model.to_tokens(" mat", prepend_bos=False)[0, 0])
    with torch.inference_mode():
        plain = e.model(tokens)[0]  # [S, V]
        assert res.unsteered_answer_probability == pytest.approx(float(plain[-1].softmax(-1)[a]), abs=1e-6)
        for run, x in zip(res.steered, (1.0, 2.5)):
            steered = e.model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, lambda t, hook: t + x * vec)])[0]
            kl = plain_kl_per_position(plain, steered)
            assert run.kl_next_token == pytest.approx(float(kl[-1]), abs=1e-5)
            assert run.mean_kl_prompt == pytest.approx(float(kl.mean()), abs=1e-5)
            assert run.answer_probability == pytest.approx(float(steered[-1].softmax(-1)[a]), abs=1e-6)
            log_p, base = steered[-1].log_softmax(-1)[a], plain[-1].log_softmax(-1)[a]
            assert run.metric == pytest.approx(float(log_p), abs=1e-5)  # the metric: log P(answer)
            assert run.metric_change == pytest.approx(float(log_p - base), abs=1e-5)
    assert res.metric == "log P('mat')" and res.unsteered_metric == pytest.approx(float(base), abs=1e-5)
    assert e.is_clean()


def test_generation_keeps_no_prompt_sized_logits_while_generating(tiny_engine):
    import gc

    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    B, S, V = 3, tokens.shape[1], e.model.cfg.d_vocab
    vectors = torch.stack([torch.zeros(s.d_in), s.sae.W_dec[5], 2 * s.sae.W_dec[5]])
    held = []

    def progress(step, total):  # after each step: is a [B, S, V] tensor (the prompt's logits) still alive?
        gc.collect()
        held.append(any(isinstance(o, torch.Tensor) and tuple(o.shape) == (B, S, V) for o in gc.get_objects()))

    generation.generate_rows(e, rows(tokens, s.hook_name, vectors, 3, 0.0, 1.0, 0), progress=progress)
    assert held == [False, False, False]


def test_greedy_steered_generation_matches_a_plain_decoding_loop(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    res = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=8,
                temperature=0.0)
    tokens = tokens_of(e, PROMPT)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    steered = plain_greedy(e, tokens, s.hook_name, vec, 8)
    unsteered = plain_greedy(e, tokens, s.hook_name, torch.zeros_like(vec), 8)
    tok = e.model.tokenizer
    assert res.steered[0].continuations[0].text == tok.decode(steered.tolist())
    assert res.unsteered[0].text == tok.decode(unsteered.tolist())
    assert res.steered[0].continuations[0].text != res.unsteered[0].text
    assert [f.coefficient for f in res.features] == [3.0, -2.0]


def test_each_run_says_whether_its_text_changed_and_the_first_generated_token_where_it_diverged(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    res = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=8,
                temperature=0.0, strengths=[0.0, 1.0])
    tokens = tokens_of(e, PROMPT)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    steered = plain_greedy(e, tokens, s.hook_name, vec, 8).tolist()
    unsteered = plain_greedy(e, tokens, s.hook_name, torch.zeros_like(vec), 8).tolist()
    first = next(i for i, (x, y) in enumerate(zip(steered, unsteered)) if x != y)
    zero, one = (r.continuations[0] for r in res.steered)
    assert (zero.changed, zero.first_divergent_token) == (False, None)  # a zero dose is the unsteered run
    assert (one.changed, one.first_divergent_token) == (True, first)
    assert [r.changed_fraction for r in res.steered] == [0.0, 1.0]
    assert (res.unsteered[0].changed, res.unsteered[0].first_divergent_token) == (None, None)
    assert generation.first_divergence([1, 2, 3], [1, 2]) == 2  # a run that stopped earlier diverges where it ends
    assert generation.first_divergence([1, 2], [1, 2]) is None


def test_a_multi_token_answer_is_scored_on_its_first_token_and_the_result_says_so(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=2, temperature=0.0)
    multi = steer(e, PROMPT, [(5, 3.0)], answer=" cat sat", **kw)
    single = steer(e, PROMPT, [(5, 3.0)], answer=" cat", **kw)
    assert (multi.answer_tokens, multi.multi_token) == (["cat", "sat"], True)
    assert (single.answer_tokens, single.multi_token) == (["cat"], False)
    assert multi.steered[0].answer_probability == single.steered[0].answer_probability
    none = steer(e, PROMPT, [(5, 3.0)], **kw)
    assert (none.answer_tokens, none.multi_token) == (None, None)


def test_fewer_than_five_steering_controls_carry_a_caution_that_they_are_weak_evidence(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=2, temperature=0.0, answer=" mat", controls=True)
    few = steer(e, PROMPT, [(5, 3.0)], n_controls=3, **kw)
    enough = steer(e, PROMPT, [(5, 3.0)], n_controls=5, **kw)
    assert "3 control" in few.controls[0].caution and "weak evidence" in few.controls[0].caution
    assert enough.controls[0].caution is None


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9)])
def test_steered_generation_is_the_same_with_and_without_the_kv_cache(stories_engine, temperature, top_p):
    e = stories_engine
    kw = dict(calibration="absolute", max_new_tokens=20, temperature=temperature, top_p=top_p, seed=3,
              strengths=[0.0, 1.0, 4.0])
    cached = steer(e, "Once upon a time, Lily", [(7, 2.0)], use_cache=True, **kw)
    uncached = steer(e, "Once upon a time, Lily", [(7, 2.0)], use_cache=False, **kw)
    assert cached.steered == uncached.steered
    assert cached.unsteered == uncached.unsteered
    # a zero dose is the unsteered run exactly, and the strongest dose changes the text
    zero, plain = cached.steered[0].continuations[0], cached.unsteered[0]
    assert (zero.text, zero.n_tokens, zero.concept_readout) == (plain.text, plain.n_tokens, plain.concept_readout)
    assert cached.steered[0].kl_next_token == 0.0
    assert cached.steered[2].continuations[0].text != cached.unsteered[0].text
    assert cached.steered[2].mean_kl_prompt > cached.steered[1].mean_kl_prompt > 0


def test_sampling_is_reproducible_by_seed_and_a_tiny_top_p_is_greedy(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=10)
    a = steer(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=11, **kw)
    b = steer(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=11, **kw)
    c = steer(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=12, **kw)
    assert a == b
    texts = [(r.unsteered[0].text, r.steered[0].continuations[0].text) for r in (a, c)]
    assert texts[0] != texts[1]
    nucleus = steer(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1e-6, seed=11, **kw)
    greedy = steer(e, PROMPT, [(5, 1.0)], temperature=0.0, **kw)
    assert nucleus.steered[0].continuations[0].text == greedy.steered[0].continuations[0].text


def test_generation_stops_at_eos(tiny_engine):
    e = tiny_engine
    eos = e.model.tokenizer.eos_token_id
    push = e.model.W_U[:, eos] - e.model.W_U.mean(-1)  # a direction that makes EOS the argmax after ln_final
    vec = 1e3 * push / push.norm()
    batch = rows(tokens_of(e, PROMPT), "blocks.1.hook_resid_post", torch.stack([torch.zeros_like(vec), vec]), 6, 0.0,
                 1.0, 0)
    new, _, stopped = generation.generate_rows(e, batch)
    assert stopped[1] and new[1, 0] == eos
    cont = generation.continuation(e, new[1], eos, stopped[1])
    assert cont.text == "" and cont.n_tokens == 0 and cont.stopped_at_eos


def test_max_activation_calibration_scales_strength_by_the_features_max(tiny_engine):
    e = tiny_engine
    maxes = {5: (2.5, "index"), 9: (4.0, "scan")}
    res = steer(e, PROMPT, [(5, 2.0), (9, -0.5)], max_new_tokens=2, temperature=0.0,
                calibration="max_activation", max_activation_fn=lambda sae, f: maxes[f],
                strengths=[1.0, 3.0])
    assert [(f.max_activation, f.max_activation_source, f.coefficient) for f in res.features] == [
        (2.5, "index", 5.0), (4.0, "scan", -2.0)
    ]
    assert res.steered[1].coefficients == [15.0, -6.0]
    with pytest.raises(InvalidInput, match="--corpus.*calibration='absolute'"):
        steer(e, PROMPT, [(5, 1.0)], calibration="max_activation", max_activation_fn=None)
    with pytest.raises(InvalidInput, match="never fired"):
        steer(e, PROMPT, [(5, 1.0)], max_activation_fn=lambda sae, f: (0.0, "index"))


def test_steering_controls_match_decoder_norm_and_coefficient(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    norms = s.sae.W_dec.norm(dim=-1)
    res = steer(e, PROMPT, [(5, 4.0)], calibration="absolute", max_new_tokens=4, temperature=0.0,
                answer=" mat", controls=True, n_controls=5, seed=1, strengths=[1.0, -2.0])
    again = steer(e, PROMPT, [(5, 4.0)], calibration="absolute", max_new_tokens=4, temperature=0.0,
                  answer=" mat", controls=True, n_controls=5, seed=1, strengths=[1.0, -2.0])
    assert res.controls == again.controls
    block = res.controls[1]
    assert len(block.runs) == 5 and "scale -2" in block.matched_on and block.scale == -2.0
    nearest = (norms - norms[5]).abs().argsort()[1:21].tolist()  # the pool: 20 nearest in norm, target excluded
    for run in block.runs:
        assert run.features[0] != 5 and run.features[0] in nearest
    kl = next(st for st in block.stats if st.metric == "kl_next_token")
    assert kl.target == pytest.approx(res.steered[1].kl_next_token, abs=1e-5)
    ans = next(st for st in block.stats if st.metric == "metric_change")
    assert ans.target == pytest.approx(res.steered[1].metric_change, abs=1e-5)
    assert {st.metric for st in block.stats} <= {"metric_change", "kl_next_token", "concept_readout_change"}
    assert res.steered[0].answer_probability == pytest.approx(
        res.unsteered_answer_probability + res.steered[0].answer_probability_change, abs=1e-5
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(features=[(5, math.nan)]), "finite"),
        (dict(features=[(5, math.inf)]), "finite"),
        (dict(features=[(5, 2000.0)]), "<= 1000"),
        (dict(features=[(5, 1.0)], strengths=[1.0, math.nan]), "finite"),
        (dict(features=[(5, 1.0)], max_new_tokens=10_000), "max_new_tokens"),
        (dict(features=[(5, 1.0)], max_new_tokens=60), "exceeds the model's context"),
        (dict(features=[(500, 1.0)]), "out of range"),
        (dict(features=[(5, 1.0), (5, 2.0)]), "repeat"),
        (dict(features=[]), "no features"),
        (dict(features=[(5, 1.0)], top_p=0.0), "top_p"),
        (dict(features=[(5, 1.0)], seeds=list(range(9))), r"9 seeds given; pass 1\.\.8"),
        (dict(features=[(5, 1.0)], seeds=[1, 1]), "repeat a seed"),
        (dict(features=[(5, 1.0)], seeds=[-1]), "each seed must be in 0"),
        (dict(features=[(5, 1.0)], seed=3, seeds=[1, 3]), "disagree.*pass only seeds"),
        (dict(features=[(5, 1.0)], strengths=[1.0, 2.0], controls=True, control_strength=3.0),
         r"control_strength=3 is not one of the nonzero strengths \(1, 2\)"),
        (dict(features=[(5, 1.0)], strengths=[0.0, 1.0], controls=True, control_strength=0.0), "not one of"),
        (dict(features=[(5, 1.0)], control_strength=1.0), "only used with controls=true"),
        (dict(features=[(5, 1.0)], strengths=[0.0], controls=True), "every strength is 0"),
        # 1 + 12 doses + 12 x 16 controls = 205 rows > 128; one control dose: 1 + 12 + 16 = 29 rows x 8 seeds > 128
        (dict(features=[(5, 1.0)], strengths=[float(x) for x in range(1, 13)], controls=True, n_controls=16),
         "205 rows, over the 128.*control_strength=one dose"),
        (dict(features=[(5, 1.0)], strengths=[float(x) for x in range(1, 13)], controls=True, n_controls=16,
              control_strength=2.0, seeds=list(range(8))), "29 runs.*x 8 seeds = 232 rows.*fewer seeds"),
    ],
)
def test_steer_generate_rejects_bad_input_with_what_to_change(tiny_engine, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        steer(tiny_engine, PROMPT, calibration="absolute", **kwargs)
    assert tiny_engine.is_clean()


def test_a_cancelled_token_stops_generation_between_steps_and_leaves_the_model_clean(tiny_engine):
    e = tiny_engine
    tokens = tokens_of(e, PROMPT)
    with torch.inference_mode():
        before = e.model(tokens).clone()
    token, steps = CancelToken(), []

    def progress(step, total):
        steps.append((step, total))
        if step == 3:
            token.cancel()  # as the tool does when the client cancels

    with pytest.raises(Cancelled, match="cancelled"):
        steer(e, PROMPT, [(5, 3.0)], calibration="absolute", max_new_tokens=20, temperature=0.0,
              strengths=[1.0, 2.0], controls=True, n_controls=3, cancel=token, progress=progress)
    assert steps == [(1, 20), (2, 20), (3, 20)]  # stopped before the 4th step
    assert e.is_clean()
    with torch.inference_mode():
        assert torch.equal(e.model(tokens), before)
    ok = steer(e, PROMPT, [(5, 3.0)], calibration="absolute", max_new_tokens=4, temperature=0.0)
    assert ok.steered[0].continuations[0].n_tokens <= 4  # the engine is free again


def test_engine_and_tool_default_to_the_same_sampling_settings(tiny_engine):
    from sae_mcp.server.app import build_server

    from mcp_client import list_tools

    engine_defaults = {f.name: f.default for f in dataclasses.fields(steering.SteeringRequest)}
    tool = next(t for t in list_tools(build_server(tiny_engine)) if t.name == "steer_generate")
    props = tool.input_schema["properties"]
    for name in ("temperature", "top_p", "max_new_tokens", "seed", "seeds", "calibration", "n_controls",
                 "control_strength"):
        assert props[name].get("default") == engine_defaults[name], name  # a null default: left unsaid
        assert name not in tool.input_schema.get("required", []), name
    assert (props["temperature"]["default"], props["top_p"]["default"]) == (1.0, 0.9)
    assert "greedy" in props["temperature"]["description"]


def test_kv_cached_steered_greedy_text_equals_an_independent_full_forward_loop(stories_engine):
    e, s = stories_engine, stories_engine.sae(None)
    prompt, n = "Once upon a time, Lily", 24
    res = steer(e, prompt, [(7, 2.0), (30, -1.0)], calibration="absolute", max_new_tokens=n,
                temperature=0.0, strengths=[1.0, 4.0], use_cache=True)
    tokens = tokens_of(e, prompt)
    base = 2.0 * s.sae.W_dec[7] - 1.0 * s.sae.W_dec[30]
    model, tok = e.model, e.model.tokenizer

    def plain(vector):
        # the whole sequence through the model every step, the vector added by a plain hook; argmax; stop at EOS
        seq, out = tokens, []
        with torch.inference_mode(), model.hooks(fwd_hooks=[(s.hook_name, lambda x, hook: x + vector)]):
            for _ in range(n):
                nxt = int(model(seq, attention_mask=torch.ones_like(seq))[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return tok.decode(out)

    assert res.unsteered[0].text == plain(torch.zeros_like(base))
    assert [r.continuations[0].text for r in res.steered] == [plain(1.0 * base), plain(4.0 * base)]
    assert res.steered[1].continuations[0].text != res.unsteered[0].text  # the strong dose does steer
    assert e.is_clean()


# ------------------------------------------------------------------------ controls per dose, seeds, readout, loops


def plain_text(engine, tokens, hook_name, vector, n):
    """The plain greedy loop's generated ids, cut at the first EOS, and their text."""
    eos = engine.model.tokenizer.eos_token_id
    ids = plain_greedy(engine, tokens, hook_name, vector, n).tolist()
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return ids, engine.model.tokenizer.decode(ids)


def test_controls_run_at_every_nonzero_dose_each_at_that_doses_scale_against_that_doses_target(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens, W, hook = tokens_of(e, PROMPT), s.sae.W_dec, s.hook_name
    a = int(e.model.to_tokens(" mat", prepend_bos=False)[0, 0])
    kw = dict(calibration="absolute", max_new_tokens=4, temperature=0.0, answer=" mat", controls=True, n_controls=3)
    res = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], strengths=[0.0, 1.0, -2.0, 4.0], **kw)
    assert [b.scale for b in res.controls] == [1.0, -2.0, 4.0]  # a zero dose steers nothing: no controls there
    assert len({tuple(tuple(r.features) for r in b.runs) for b in res.controls}) == 1  # same controls at every dose
    unsteered_text = res.unsteered[0].text
    with torch.inference_mode():
        plain = e.model(tokens)[0]  # [S, V]
        for block in res.controls:
            x = block.scale
            target = next(r for r in res.steered if r.scale == x)
            for run in block.runs:
                c5, c9 = run.features  # one control per target, with the target's coefficient, at this dose
                vec = x * (3.0 * W[c5] - 2.0 * W[c9])
                steered = e.model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda t, hook: t + vec)])[0]
                kl = plain_kl_per_position(plain, steered)
                assert run.effects["kl_next_token"] == pytest.approx(float(kl[-1]), abs=1e-5)
                assert run.effects["mean_kl_prompt"] == pytest.approx(float(kl.mean()), abs=1e-5)
                p_change = float(steered[-1].softmax(-1)[a] - plain[-1].softmax(-1)[a])
                assert run.effects["answer_probability_change"] == pytest.approx(p_change, abs=1e-5)
                text = plain_text(e, tokens, hook, vec, 4)[1]
                assert run.continuations == [text]
                assert run.effects["changed_fraction"] == float(text != unsteered_text)
            stats = {st.metric: st for st in block.stats}
            vals = [r.effects["kl_next_token"] for r in block.runs]
            assert stats["kl_next_token"].target == pytest.approx(target.kl_next_token, abs=1e-5)
            assert stats["kl_next_token"].control_mean == pytest.approx(statistics.mean(vals), abs=1e-5)
            assert stats["kl_next_token"].exceeds_all_controls == (target.kl_next_token > max(vals))
            assert stats["metric_change"].target == pytest.approx(target.metric_change, abs=1e-5)
            assert "answer_probability_change" not in stats  # a plain number in each run, no significance claimed
            readout_change = statistics.mean(
                [t - u for t, u in zip(target.continuations[0].concept_readout, res.unsteered[0].concept_readout)]
            )
            assert stats["concept_readout_change"].target == pytest.approx(readout_change, abs=1e-5)
    one = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], strengths=[0.0, 1.0, -2.0, 4.0],
                control_strength=-2.0, **kw)
    assert [b.scale for b in one.controls] == [-2.0] and one.controls[0] == res.controls[1]
    assert e.is_clean()


def test_each_seed_of_a_several_seed_call_is_the_one_seed_call_with_that_seed(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    kw = dict(calibration="absolute", max_new_tokens=10, temperature=1.0, strengths=[0.5, 2.0], answer=" mat",
              controls=True, n_controls=2)
    both = steer(e, PROMPT, [(5, 3.0)], seeds=[3, 5], **kw)
    first = steer(e, PROMPT, [(5, 3.0)], seed=3, **kw)
    second = steer(e, PROMPT, [(5, 3.0)], seeds=[5], **kw)
    assert steer(e, PROMPT, [(5, 3.0)], seed=3, seeds=[3, 5], **kw) == both  # they agree: fine
    assert both.seeds == [3, 5] and first.seeds == [3]
    assert both.unsteered[0].text != both.unsteered[1].text  # the seeds do sample different texts
    for k, one in enumerate((first, second)):
        assert both.unsteered[k] == one.unsteered[0]
        for run, single in zip(both.steered, one.steered):
            assert run.continuations[k] == single.continuations[0]
            # the prompt's effects do not depend on the seed: reported once, as a one-seed call reports them
            assert (run.kl_next_token, run.mean_kl_prompt, run.answer_probability) == pytest.approx(
                (single.kl_next_token, single.mean_kl_prompt, single.answer_probability), rel=1e-5, abs=1e-7)
    # controls are drawn by seeds[0]: the seed-3 call's controls, and their seed-3 texts
    for block, single in zip(both.controls, first.controls):
        assert [r.features for r in block.runs] == [r.features for r in single.runs]
        assert [r.continuations[0] for r in block.runs] == [r.continuations[0] for r in single.runs]
    # their seed-5 texts: a plain batch of those vectors sampled with seed 5
    tokens, eos = tokens_of(e, PROMPT), e.model.tokenizer.eos_token_id
    block = both.controls[1]
    vecs = torch.stack([block.scale * 3.0 * s.sae.W_dec[r.features[0]] for r in block.runs])
    new, _, stopped = generation.generate_rows(e, rows(tokens, s.hook_name, vecs, 10, 1.0, DEFAULT_TOP_P, 5))
    texts = [generation.continuation(e, new[i], eos, stopped[i]).text for i in range(len(block.runs))]
    assert [r.continuations[1] for r in block.runs] == texts


def test_seed_aggregates_are_the_plain_mean_and_std_of_the_per_seed_values(tiny_engine):
    e = tiny_engine
    res = steer(e, PROMPT, [(5, 3.0), (9, 1.0)], calibration="absolute", max_new_tokens=12,
                temperature=1.0, seeds=[1, 2, 3, 4], strengths=[1.0, 30.0], controls=True,
                n_controls=2)
    for run in res.steered:
        per_seed = [c.concept_readout for c in run.continuations]
        for j in range(2):
            assert run.concept_readout[j] == pytest.approx(statistics.mean(v[j] for v in per_seed), abs=1e-5)
            assert run.concept_readout_std[j] == pytest.approx(statistics.stdev(v[j] for v in per_seed), abs=1e-5)
        assert run.changed_fraction == statistics.mean(c.changed for c in run.continuations)
        assert run.degenerate_fraction == statistics.mean(bool(c.degenerate) for c in run.continuations)
        assert run.degenerate == (run.degenerate_fraction >= 0.5)
    for j in range(2):
        assert res.unsteered_concept_readout[j] == pytest.approx(
            statistics.mean(c.concept_readout[j] for c in res.unsteered), abs=1e-5)
    # the controls' comparison uses the same means: readout change = mean over seeds and features of (run - unsteered)
    for block in res.controls:
        target = next(r for r in res.steered if r.scale == block.scale)
        change = statistics.mean(t - u for c, b in zip(target.continuations, res.unsteered)
                                 for t, u in zip(c.concept_readout, b.concept_readout))
        stat = next(st for st in block.stats if st.metric == "concept_readout_change")
        assert stat.target == pytest.approx(change, abs=1e-5)
    one = steer(e, PROMPT, [(5, 3.0)], calibration="absolute", max_new_tokens=12, seed=1)
    assert one.steered[0].concept_readout_std is None  # one seed: no spread


def test_concept_readout_equals_the_tutorial_sae_acts_over_the_generated_tokens(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e, PROMPT)
    res = steer(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=8,
                temperature=0.0)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    for v, cont in ((torch.zeros_like(vec), res.unsteered[0]), (vec, res.steered[0].continuations[0])):
        ids, text = plain_text(e, tokens, s.hook_name, v, 8)
        assert cont.text == text and len(ids) > 0
        full = torch.cat([tokens, torch.tensor([ids])], dim=1)  # prompt + generated ids, read by the plain model
        acts = tutorial_sae_acts(e, full)[0, tokens.shape[1]:]  # [n, d_sae]: the generated positions
        assert cont.concept_readout == pytest.approx(acts[:, [5, 9]].mean(0).tolist(), abs=1e-5)
    assert e.is_clean()


@pytest.mark.parametrize("chunked", [False, True])
def test_concept_readout_of_rows_of_different_lengths_reads_each_row_alone(tiny_engine, monkeypatch, chunked):
    e, s = tiny_engine, tiny_engine.sae(None)
    if chunked:  # one row per forward, 3 positions per encode
        monkeypatch.setattr(steering_readout, "READOUT_CHUNK_TOKENS", 1)
        monkeypatch.setattr(steering_readout, "ENCODE_CHUNK_ELEMENTS", 3 * s.d_sae)
    tokens, eos = tokens_of(e, PROMPT), e.model.tokenizer.eos_token_id
    new = torch.tensor([[4, 5, 6, 7, 8], [9, 10, eos, eos, eos], [eos] * 5])  # 5 tokens; 2 then EOS; none
    with e.device_work():
        got = steering_readout.concept_readout(e, s, tokens, new, [5, 2, 0], [5, 9, 30])
    for row, n in ((0, 5), (1, 2)):
        full = torch.cat([tokens, new[row : row + 1, :n]], dim=1)  # the row alone, without its EOS filler
        acts = tutorial_sae_acts(e, full)[0, tokens.shape[1]:]  # [n, d_sae]
        assert got[row] == pytest.approx(acts[:, [5, 9, 30]].mean(0).tolist(), abs=1e-5)
    assert got[2] is None


def test_steer_rows_name_every_run_and_batch_row():
    rows = steering.SteerRows(scales=[1.0, 2.0, -1.0], control_scales=[2.0, -1.0], control_sets=[[7], [8]], n_seeds=3)
    assert rows.n_runs == 1 + 3 + 2 * 2
    assert [rows.dose_row(i) for i in range(3)] == [1, 2, 3]
    assert [rows.control_row(j, i) for j in range(2) for i in range(2)] == [4, 5, 6, 7]
    assert [rows.target_row(j) for j in range(2)] == [2, 3]  # the doses 2 and -1
    layout = rows.batch_layout()
    assert len(layout) == 3 * 8 and all(rows.batch_row(run, k) == b for b, (run, k) in enumerate(layout))
    assert layout[:8] == [(run, 0) for run in range(8)]  # the first seed's rows come first (the prompt stats')


def test_the_degeneration_rule_on_constructed_token_lists():
    rep, bad = steering_readout.repetition, steering_readout.is_degenerate
    assert rep([1] * 7) is None and not bad([1] * 7)  # under 8 tokens: not judged
    assert rep(list(range(20))) == 0.0 and not bad(list(range(20)))
    loop = [1, 2, 3] * 4  # 10 trigrams, 3 distinct
    assert rep(loop) == pytest.approx(1 - 3 / 10) and bad(loop)
    same = [7] * 10  # 8 trigrams, 1 distinct
    assert rep(same) == pytest.approx(1 - 1 / 8) and bad(same)
    edge = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]  # 10 trigrams, 5 distinct: exactly 0.5 is a loop
    assert rep(edge) == pytest.approx(0.5) and bad(edge)
    twice = list(range(10)) * 2  # a phrase said twice: 18 trigrams, 10 distinct (0.44): not a loop
    assert rep(twice) == pytest.approx(1 - 10 / 18) and not bad(twice)
    thrice = list(range(6)) * 3  # 16 trigrams, 6 distinct (0.625): a loop
    assert rep(thrice) == pytest.approx(1 - 6 / 16) and bad(thrice)
    every_other = [7, 10, 7, 11, 7, 12, 7, 13, 7, 14, 7]  # no trigram repeats, but 7 is 6 of 11 tokens
    assert rep(every_other) == 0.0 and bad(every_other)
    half = every_other[:-1]  # 7 is 5 of 10 tokens: not more than half
    assert not bad(half)


def test_a_huge_dose_degenerates_and_the_warning_names_it_and_the_doses_that_read(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    kw = dict(calibration="absolute", max_new_tokens=20, temperature=0.0)
    res = steer(e, PROMPT, [(5, 3.0)], strengths=[1.0, 1000.0], **kw)
    ids, _ = plain_text(e, tokens_of(e, PROMPT), s.hook_name, 3000.0 * s.sae.W_dec[5], 20)
    assert len(set(ids)) == 1  # independently: the huge dose repeats one token
    assert [r.degenerate for r in res.steered] == [False, True]
    loop = res.steered[1].continuations[0]
    assert loop.degenerate and loop.repetition == pytest.approx(1 - 1 / 18, abs=1e-4)
    assert any("dose 1000 degenerated" in w and "read dose 1," in w for w in res.warnings)
    # the tiny random model loops greedily on its own: the result says so, and what to do
    assert res.unsteered[0].degenerate
    assert any("unsteered continuation loops too (1 of 1 seeds)" in w and "temperature 1" in w for w in res.warnings)
    only = steer(e, PROMPT, [(5, 3.0)], strengths=[1000.0], **kw)
    assert any(w.startswith("every dose (1000) degenerated") and "lower the strengths" in w for w in only.warnings)


def test_a_clean_call_has_no_warnings_and_a_long_one_warns_past_the_saes_context(tiny_engine):
    e = tiny_engine  # the tiny SAE was trained on 32-token contexts; the prompt is 10 tokens with BOS
    kw = dict(calibration="absolute", temperature=1.0, seed=1)
    short = steer(e, PROMPT, [(5, 1.0)], max_new_tokens=12, **kw)
    assert short.warnings is None and "warnings" not in short.model_dump(exclude_none=True)
    long = steer(e, PROMPT, [(5, 1.0)], max_new_tokens=30, **kw)
    assert any("32-token contexts" in w for w in long.warnings)


def test_an_answer_whose_space_variant_is_far_more_likely_is_warned_about(stories_engine):
    e = stories_engine
    kw = dict(calibration="absolute", max_new_tokens=4, temperature=0.0)
    prompt = "Once upon a time, there was a little girl named"
    bare = steer(e, prompt, [(7, 1.0)], answer="Lily", **kw)
    spaced = steer(e, prompt, [(7, 1.0)], answer=" Lily", **kw)
    assert any("answer=' Lily'" in w for w in bare.warnings)
    assert not any("answer=" in w for w in spaced.warnings or [])


def test_control_statistics_give_no_z_score_when_the_controls_do_not_vary():
    """Controls that all read ~0 (a concept no random feature moves): std is float noise, and a z-score in the
    hundreds would read as certainty."""
    from sae_mcp.engine.controls import control_stats
    from sae_mcp.results.causal import ControlRun

    flat = [ControlRun(features=[i], effects={"m": 1e-9 * i}) for i in range(5)]
    (stat,) = control_stats({"m": 0.5}, flat)
    assert stat.z_score is None and stat.exceeds_all_controls
    varied = [ControlRun(features=[i], effects={"m": 0.1 * i}) for i in range(5)]
    (stat,) = control_stats({"m": 0.5}, varied)
    mean, std = 0.2, float(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64).std())
    assert stat.z_score == pytest.approx((0.5 - mean) / std, abs=1e-3)


def test_a_vanishing_temperature_or_top_p_samples_the_most_likely_token_instead_of_failing():
    """The fuzz found top_p=5e-324 (0 in float32: no token kept, NaN draw); a temperature of 1e-300 overflows
    logits / temperature the same way. Both must mean 'the most likely token'."""
    from sae_mcp.engine.generation import _sample

    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.0, 2.9]])
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert _sample(logits, 1.0, 5e-324, gens).tolist() == [1, 0]
    assert _sample(logits, 1e-300, 0.9, gens).tolist() == [1, 0]
