"""Steering against independent plain computations (the tutorial's way, hooks written plainly)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import generation, steering
from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import Cancelled, InvalidInput

from conftest import needs_stories

PROMPT = "the cat sat on the mat and the dog"


def tokens_of(engine, prompt=PROMPT):
    s = engine.sae(None)
    return engine.to_tokens(prompt, prepend_bos=s.prepend_bos)


def plain_greedy(engine, tokens, hook_name, vector, n):
    """Greedy decoding the plain way: the whole sequence each step, the vector added by run_with_hooks."""
    seq = tokens
    for _ in range(n):
        with torch.inference_mode():
            logits = engine.model.run_with_hooks(seq, fwd_hooks=[(hook_name, lambda x, hook: x + vector)])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, tokens.shape[1]:]


def plain_kl_per_position(p_logits, q_logits):
    """KL(P || Q) at each position [S] from logits [S, V], written out."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_steering_adds_coefficient_times_decoder_at_every_prompt_position(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    with torch.inference_mode():
        plain = e.model(tokens)[0]  # [S, V]
        expected = e.model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, lambda x, hook: x + vec)])[0]
    with e.device_work():
        _, stats, _ = generation.generate_rows(e, tokens, s.hook_name, torch.stack([torch.zeros_like(vec), vec]),
                                               1, 0.0, 1.0, 0, answer_id=7)
    assert stats.last_logits.shape == (2, plain.shape[-1])  # only the last position is kept
    assert_close(stats.last_logits[1], expected[-1], atol=1e-5, rtol=1e-5)
    # every prompt position enters the mean KL: it equals the plain per-position KL averaged
    assert stats.kl_mean[1] == pytest.approx(float(plain_kl_per_position(plain, expected).mean()), abs=1e-5)
    assert stats.kl_last[1] == pytest.approx(float(plain_kl_per_position(plain, expected)[-1]), abs=1e-5)
    assert stats.p_answer[1] == pytest.approx(float(expected[-1].softmax(-1)[7]), abs=1e-6)
    assert stats.kl_mean[0] == 0.0 and stats.kl_last[0] == 0.0
    assert e.is_clean()


@pytest.mark.parametrize("chunk_elements", [1, 3 * 64, 2**24])
def test_prompt_stats_chunked_over_rows_and_positions_equal_the_plain_full_tensor_computation(monkeypatch,
                                                                                              chunk_elements):
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 64) * 3  # [B, S, V]
    monkeypatch.setattr(generation, "KL_CHUNK_ELEMENTS", chunk_elements)  # 1 position, 3 positions, all at once
    stats = generation.PromptStats.from_logits(logits, answer_id=5)
    for b in range(4):
        kl = plain_kl_per_position(logits[0], logits[b])  # [S]
        assert stats.kl_mean[b] == pytest.approx(float(kl.mean()), abs=1e-5)
        assert stats.kl_last[b] == pytest.approx(float(kl[-1]), abs=1e-5)
        assert stats.p_answer[b] == pytest.approx(float(logits[b, -1].softmax(-1)[5]), abs=1e-6)
    assert torch.equal(stats.last_logits, logits[:, -1])
    assert generation.PromptStats.from_logits(logits, answer_id=None).p_answer is None


def test_steer_generate_kl_and_answer_probability_equal_a_plain_computation(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e)
    res = steering.steer_generate(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=3,
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
    assert e.is_clean()


def test_generation_keeps_no_prompt_sized_logits_while_generating(tiny_engine):
    import gc

    e, s = tiny_engine, tiny_engine.sae(None)
    tokens = tokens_of(e)
    B, S, V = 3, tokens.shape[1], e.model.cfg.d_vocab
    vectors = torch.stack([torch.zeros(s.d_in), s.sae.W_dec[5], 2 * s.sae.W_dec[5]])
    held = []

    def progress(step, total):  # after each step: is a [B, S, V] tensor (the prompt's logits) still alive?
        gc.collect()
        held.append(any(isinstance(o, torch.Tensor) and tuple(o.shape) == (B, S, V) for o in gc.get_objects()))

    with e.device_work():
        generation.generate_rows(e, tokens, s.hook_name, vectors, 3, 0.0, 1.0, 0, progress=progress)
    assert held == [False, False, False]


def test_greedy_steered_generation_matches_a_plain_decoding_loop(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    res = steering.steer_generate(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=8,
                                  temperature=0.0)
    tokens = tokens_of(e)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    steered = plain_greedy(e, tokens, s.hook_name, vec, 8)
    unsteered = plain_greedy(e, tokens, s.hook_name, torch.zeros_like(vec), 8)
    tok = e.model.tokenizer
    assert res.steered[0].continuation.text == tok.decode(steered.tolist())
    assert res.unsteered.text == tok.decode(unsteered.tolist())
    assert res.steered[0].continuation.text != res.unsteered.text
    assert [f.coefficient for f in res.features] == [3.0, -2.0]


def test_each_run_says_whether_its_text_changed_and_the_first_generated_token_where_it_diverged(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    res = steering.steer_generate(e, PROMPT, [(5, 3.0), (9, -2.0)], calibration="absolute", max_new_tokens=8,
                                  temperature=0.0, strengths=[0.0, 1.0])
    tokens = tokens_of(e)
    vec = 3.0 * s.sae.W_dec[5] - 2.0 * s.sae.W_dec[9]
    steered = plain_greedy(e, tokens, s.hook_name, vec, 8).tolist()
    unsteered = plain_greedy(e, tokens, s.hook_name, torch.zeros_like(vec), 8).tolist()
    first = next(i for i, (x, y) in enumerate(zip(steered, unsteered)) if x != y)
    zero, one = res.steered
    assert (zero.changed, zero.first_divergent_token) == (False, None)  # a zero dose is the unsteered run
    assert (one.changed, one.first_divergent_token) == (True, first)
    assert generation.first_divergence([1, 2, 3], [1, 2]) == 2  # a run that stopped earlier diverges where it ends
    assert generation.first_divergence([1, 2], [1, 2]) is None


def test_a_multi_token_answer_is_scored_on_its_first_token_and_the_result_says_so(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=2, temperature=0.0)
    multi = steering.steer_generate(e, PROMPT, [(5, 3.0)], answer=" cat sat", **kw)
    single = steering.steer_generate(e, PROMPT, [(5, 3.0)], answer=" cat", **kw)
    assert (multi.answer_tokens, multi.multi_token) == (["cat", "sat"], True)
    assert (single.answer_tokens, single.multi_token) == (["cat"], False)
    assert multi.steered[0].answer_probability == single.steered[0].answer_probability
    none = steering.steer_generate(e, PROMPT, [(5, 3.0)], **kw)
    assert (none.answer_tokens, none.multi_token) == (None, None)


def test_fewer_than_five_steering_controls_carry_a_caution_that_they_are_weak_evidence(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=2, temperature=0.0, answer=" mat", controls=True)
    few = steering.steer_generate(e, PROMPT, [(5, 3.0)], n_controls=3, **kw)
    enough = steering.steer_generate(e, PROMPT, [(5, 3.0)], n_controls=5, **kw)
    assert "3 control" in few.controls.caution and "weak evidence" in few.controls.caution
    assert enough.controls.caution is None


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9)])
def test_steered_generation_is_the_same_with_and_without_the_kv_cache(stories_engine, temperature, top_p):
    e = stories_engine
    kw = dict(calibration="absolute", max_new_tokens=20, temperature=temperature, top_p=top_p, seed=3,
              strengths=[0.0, 1.0, 4.0])
    cached = steering.steer_generate(e, "Once upon a time, Lily", [(7, 2.0)], use_cache=True, **kw)
    uncached = steering.steer_generate(e, "Once upon a time, Lily", [(7, 2.0)], use_cache=False, **kw)
    assert [r.continuation for r in cached.steered] == [r.continuation for r in uncached.steered]
    assert cached.unsteered == uncached.unsteered
    # a zero dose is the unsteered run exactly, and the strongest dose changes the text
    assert cached.steered[0].continuation == cached.unsteered
    assert cached.steered[0].kl_next_token == 0.0
    assert cached.steered[2].continuation.text != cached.unsteered.text
    assert cached.steered[2].mean_kl_prompt > cached.steered[1].mean_kl_prompt > 0


def test_sampling_is_reproducible_by_seed_and_a_tiny_top_p_is_greedy(tiny_engine):
    e = tiny_engine
    kw = dict(calibration="absolute", max_new_tokens=10)
    a = steering.steer_generate(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=11, **kw)
    b = steering.steer_generate(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=11, **kw)
    c = steering.steer_generate(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1.0, seed=12, **kw)
    assert a == b
    assert (a.unsteered.text, a.steered[0].continuation.text) != (c.unsteered.text, c.steered[0].continuation.text)
    nucleus = steering.steer_generate(e, PROMPT, [(5, 1.0)], temperature=1.0, top_p=1e-6, seed=11, **kw)
    greedy = steering.steer_generate(e, PROMPT, [(5, 1.0)], temperature=0.0, **kw)
    assert nucleus.steered[0].continuation == greedy.steered[0].continuation


def test_generation_stops_at_eos(tiny_engine):
    e = tiny_engine
    eos = e.model.tokenizer.eos_token_id
    push = e.model.W_U[:, eos] - e.model.W_U.mean(-1)  # a direction that makes EOS the argmax after ln_final
    vec = 1e3 * push / push.norm()
    with e.device_work():
        new, _, stopped = generation.generate_rows(e, tokens_of(e), "blocks.1.hook_resid_post",
                                                   torch.stack([torch.zeros_like(vec), vec]), 6, 0.0, 1.0, 0)
    assert stopped[1] and new[1, 0] == eos
    cont = generation.continuation(e, new[1], eos, stopped[1])
    assert cont.text == "" and cont.n_tokens == 0 and cont.stopped_at_eos


def test_max_activation_calibration_scales_strength_by_the_features_max(tiny_engine):
    e = tiny_engine
    maxes = {5: (2.5, "index"), 9: (4.0, "scan")}
    res = steering.steer_generate(e, PROMPT, [(5, 2.0), (9, -0.5)], max_new_tokens=2, temperature=0.0,
                                  calibration="max_activation", max_activation_fn=lambda sae, f: maxes[f],
                                  strengths=[1.0, 3.0])
    assert [(f.max_activation, f.max_activation_source, f.coefficient) for f in res.features] == [
        (2.5, "index", 5.0), (4.0, "scan", -2.0)
    ]
    assert res.steered[1].coefficients == [15.0, -6.0]
    with pytest.raises(InvalidInput, match="--corpus.*calibration='absolute'"):
        steering.steer_generate(e, PROMPT, [(5, 1.0)], calibration="max_activation", max_activation_fn=None)
    with pytest.raises(InvalidInput, match="never fired"):
        steering.steer_generate(e, PROMPT, [(5, 1.0)], max_activation_fn=lambda sae, f: (0.0, "index"))


def test_steering_controls_match_decoder_norm_and_coefficient(tiny_engine):
    e, s = tiny_engine, tiny_engine.sae(None)
    norms = s.sae.W_dec.norm(dim=-1)
    res = steering.steer_generate(e, PROMPT, [(5, 4.0)], calibration="absolute", max_new_tokens=4, temperature=0.0,
                                  answer=" mat", controls=True, n_controls=5, seed=1, strengths=[1.0, -2.0])
    again = steering.steer_generate(e, PROMPT, [(5, 4.0)], calibration="absolute", max_new_tokens=4, temperature=0.0,
                                    answer=" mat", controls=True, n_controls=5, seed=1, strengths=[1.0, -2.0])
    assert res.controls == again.controls
    assert len(res.controls.runs) == 5 and "scale -2" in res.controls.matched_on
    nearest = (norms - norms[5]).abs().argsort()[1:21].tolist()  # the pool: 20 nearest in norm, target excluded
    for run in res.controls.runs:
        assert run.features[0] != 5 and run.features[0] in nearest
    kl = next(st for st in res.controls.stats if st.metric == "kl_next_token")
    assert kl.target == pytest.approx(res.steered[1].kl_next_token, abs=1e-5)
    ans = next(st for st in res.controls.stats if st.metric == "answer_probability_change")
    assert ans.target == pytest.approx(res.steered[1].answer_probability_change, abs=1e-5)
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
    ],
)
def test_steer_generate_rejects_bad_input_with_what_to_change(tiny_engine, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        steering.steer_generate(tiny_engine, PROMPT, calibration="absolute", **kwargs)
    assert tiny_engine.is_clean()


def test_a_cancelled_token_stops_generation_between_steps_and_leaves_the_model_clean(tiny_engine):
    e = tiny_engine
    tokens = tokens_of(e)
    with torch.inference_mode():
        before = e.model(tokens).clone()
    token, steps = CancelToken(), []

    def progress(step, total):
        steps.append((step, total))
        if step == 3:
            token.cancel()  # as the tool does when the client cancels

    with pytest.raises(Cancelled, match="cancelled"):
        steering.steer_generate(e, PROMPT, [(5, 3.0)], calibration="absolute", max_new_tokens=20, temperature=0.0,
                                strengths=[1.0, 2.0], controls=True, n_controls=3, cancel=token, progress=progress)
    assert steps == [(1, 20), (2, 20), (3, 20)]  # stopped before the 4th step
    assert e.is_clean()
    with torch.inference_mode():
        assert torch.equal(e.model(tokens), before)
    ok = steering.steer_generate(e, PROMPT, [(5, 3.0)], calibration="absolute", max_new_tokens=4, temperature=0.0)
    assert ok.steered[0].continuation.n_tokens <= 4  # the engine is free again


def test_engine_and_tool_default_to_the_same_sampling_settings(tiny_engine):
    from sae_mcp.server.app import build_server

    from mcp_client import list_tools

    engine_defaults = inspect.signature(steering.steer_generate).parameters
    tool = next(t for t in list_tools(build_server(tiny_engine)) if t.name == "steer_generate")
    props = tool.input_schema["properties"]
    for name in ("temperature", "top_p", "max_new_tokens", "seed", "calibration", "n_controls"):
        assert props[name]["default"] == engine_defaults[name].default, name
    assert (props["temperature"]["default"], props["top_p"]["default"]) == (1.0, 0.9)
    assert "greedy" in props["temperature"]["description"]


@needs_stories
def test_kv_cached_steered_greedy_text_equals_an_independent_full_forward_loop(stories_engine):
    e, s = stories_engine, stories_engine.sae(None)
    prompt, n = "Once upon a time, Lily", 24
    res = steering.steer_generate(e, prompt, [(7, 2.0), (30, -1.0)], calibration="absolute", max_new_tokens=n,
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

    assert res.unsteered.text == plain(torch.zeros_like(base))
    assert [r.continuation.text for r in res.steered] == [plain(1.0 * base), plain(4.0 * base)]
    assert res.steered[1].continuation.text != res.unsteered.text  # the strong dose does steer
    assert e.is_clean()
