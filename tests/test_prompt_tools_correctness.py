"""The prompt-level tools against the tutorial computation, written plainly here.

Reference: run_with_cache_with_saes(tokens, saes=[sae]) and its `<hook>.hook_sae_acts_post`; softmax of the
last logits; W_dec @ W_U. The engine computes these differently (stop_at_layer, no splicing, top-k on device),
so agreement is evidence, not tautology.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import features as F
from sae_mcp.engine import logits as L
from sae_mcp.engine import prompt_sets as PS

from helpers.plain import assert_ranked_like, tutorial_sae_acts

PROMPTS = ["Once upon a time there was a little girl named Lily.", "The dog ran to the park and saw a big red ball!"]


def tutorial_feature_acts(engine, prompt):
    """tokens [seq] and the tutorial's hook_sae_acts_post [seq, d_sae] for one prompt, BOS prepended."""
    tokens = engine.model.to_tokens(prompt, prepend_bos=True)
    return tokens[0], tutorial_sae_acts(engine, tokens)[0]


@pytest.fixture(params=["tiny", "stories"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def prompts_for(engine):
    # the tiny word-level vocabulary has no punctuation-free unknown words; keep to its words
    if engine.loaded_model.name == "tiny":
        return ["the cat sat on the mat .", "Lily saw a big red ball and was happy"]
    return PROMPTS


def test_get_feature_acts_matches_run_with_cache_with_saes(engine):
    for prompt in prompts_for(engine):
        tokens, ref = tutorial_feature_acts(engine, prompt)
        feats = [0, 5, 17]
        out = F.get_feature_acts(engine, prompt, top_k=4, features=feats)
        assert len(out.tokens) == tokens.shape[0]
        assert out.tokens[0] == engine.model.tokenizer.decode([tokens[0].item()])  # BOS first, as trained
        for i, f in enumerate(feats):
            assert_close(torch.tensor(out.features[str(f)]), ref[:, f], atol=2e-4, rtol=1e-4)
        for p, pos in enumerate(out.positions):
            ref_top = ref[p].topk(4)
            expected = [(int(i), float(v)) for v, i in zip(ref_top.values, ref_top.indices) if v > 0]
            assert_ranked_like([x.feature for x in pos.top], ref[p])
            assert len(pos.top) == len(expected)
            assert_close(
                torch.tensor([x.activation for x in pos.top]),
                torch.tensor([v for _, v in expected]),
                atol=2e-4,
                rtol=1e-4,
            )
            assert all(x.activation > 0 for x in pos.top)


def test_compare_prompts_ranks_by_absolute_difference_at_last_token(engine):
    a, b = prompts_for(engine)
    _, ref_a = tutorial_feature_acts(engine, a)
    _, ref_b = tutorial_feature_acts(engine, b)
    diff = ref_a[-1] - ref_b[-1]
    order = diff.abs().argsort(descending=True)[:6]
    out = F.compare_prompts(engine, a, b, top_k=6, position=-1)
    assert [d.feature for d in out.diffs] == [int(i) for i in order if diff[i] != 0]
    for d in out.diffs:
        assert d.difference == pytest.approx(float(diff[d.feature]), abs=1e-3)
        assert d.activation_a == pytest.approx(float(ref_a[-1, d.feature]), abs=1e-3)


def test_compare_prompt_sets_reports_means_and_cohens_d(engine):
    a, b = prompts_for(engine)
    set_a = [a, a.replace("the", "a", 1) if "the" in a else a + " .", b]
    set_b = [b, b + " .", a + " ."]
    rows_a = torch.stack([tutorial_feature_acts(engine, p)[1][1] for p in set_a])  # position 1 in each prompt
    rows_b = torch.stack([tutorial_feature_acts(engine, p)[1][1] for p in set_b])
    out = PS.compare_prompt_sets(engine, set_a, set_b, top_k=5, position=1)
    for d in out.diffs:
        xa, xb = rows_a[:, d.feature].tolist(), rows_b[:, d.feature].tolist()
        mean_a, mean_b = sum(xa) / 3, sum(xb) / 3
        var_a = sum((x - mean_a) ** 2 for x in xa) / 2
        var_b = sum((x - mean_b) ** 2 for x in xb) / 2
        pooled = ((2 * var_a + 2 * var_b) / 4) ** 0.5
        assert d.mean_a == pytest.approx(mean_a, abs=1e-3)
        assert d.mean_b == pytest.approx(mean_b, abs=1e-3)
        if pooled > 1e-6:
            assert d.effect_size == pytest.approx((mean_a - mean_b) / pooled, rel=2e-3, abs=2e-3)
    # sorted by |difference|
    diffs = [abs(d.difference) for d in out.diffs]
    assert diffs == sorted(diffs, reverse=True)


def plain_token_text(tokenizer, token_id: int) -> str:
    """A vocabulary piece as text, the plain way: SentencePiece's U+2581 and GPT-2's U+0120 are spaces."""
    return tokenizer.convert_ids_to_tokens(token_id).replace("\u2581", " ").replace("\u0120", " ")


def test_next_token_matches_softmax_of_last_logits(engine):
    prompt = prompts_for(engine)[0]
    model = engine.model
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    probs = logits.softmax(-1)
    top = probs.topk(5)
    out = L.next_token(engine, prompt, top_k=5)
    assert_ranked_like([t.token_id for t in out.top], probs, tol=1e-6)
    assert_close(torch.tensor([t.probability for t in out.top]), top.values, atol=1e-5, rtol=1e-4)
    assert_close(torch.tensor([t.logit for t in out.top]), logits[top.indices], atol=1e-3, rtol=1e-4)


def test_answers_are_scored_as_continuations_on_a_sentencepiece_model(stories_engine):
    """Every one of the 8 likeliest next tokens, given as text, is scored at its own rank: '.' is not
    mis-tokenized as a dummy-prefix piece plus '.', and ' Lily' differs from 'Lily'."""
    model = stories_engine.model
    prompt = "Lily went to the park"
    with torch.no_grad():
        probs = model(model.to_tokens(prompt))[0, -1].softmax(-1)
    order = probs.argsort(descending=True)[:8].tolist()
    for rank, token_id in enumerate(order):
        text = plain_token_text(model.tokenizer, token_id)
        if text.startswith("<"):  # byte-fallback pieces such as <0x0A> have no plain text form
            continue
        out = L.next_token(stories_engine, prompt, answer=text, top_k=3)
        assert out.answer.token_id == token_id, (text, out.answer)
        assert out.answer.rank == rank
        assert out.answer.probability == pytest.approx(float(probs[token_id]), abs=1e-5)
    no_space = L.next_token(stories_engine, prompt, answer="Lily").answer
    with_space = L.next_token(stories_engine, prompt, answer=" Lily").answer
    assert no_space.token_id != with_space.token_id and not with_space.multi_token


def test_project_to_vocab_matches_W_dec_times_W_U(engine):
    s = next(iter(engine.saes.values()))
    for feature in (0, 7, s.d_sae - 1):
        ref = s.sae.W_dec[feature] @ engine.model.W_U
        out = L.project_to_vocab(engine, feature, top_k=6)
        assert [t.token_id for t in out.top_positive] == ref.topk(6).indices.tolist()
        assert [t.token_id for t in out.top_negative] == (-ref).topk(6).indices.tolist()
        assert_close(torch.tensor([t.logit for t in out.top_positive]), ref.topk(6).values, atol=1e-3, rtol=1e-4)


def test_real_model_prefers_lily_after_named(stories_engine):
    """A fact of the real pretrained model (SOURCES.md's greedy continuation names Lily)."""
    out = L.next_token(stories_engine, "Once upon a time, there was a little girl named", answer=" Lily", top_k=3)
    assert out.answer.rank == 0
    assert out.top[0].token.strip() == "Lily"
    assert not out.answer.multi_token


def test_multi_token_answer_is_scored_on_its_first_token_and_says_so(tiny_engine):
    out = L.next_token(tiny_engine, "the cat sat on the", answer="mat dog", top_k=3)
    assert out.answer.multi_token
    assert out.answer.answer_tokens == ["mat", "dog"]
    assert out.answer.token == "mat"


def test_engine_is_left_clean_after_every_read(engine):
    F.get_feature_acts(engine, prompts_for(engine)[0])
    L.next_token(engine, prompts_for(engine)[0])
    assert engine.is_clean()


def test_perfectly_separated_minimal_pairs_rank_first_and_are_flagged(tiny_engine):
    """At the differing token of minimal pairs every feature is constant within each set, so the pooled sd is 0:
    a feature that differs between the sets is the strongest evidence and must not read as d = 0."""
    set_a = ["the cat sat on the mat", "the dog ran to the park", "the girl saw a ball"]
    set_b = ["a cat sat on the mat", "a dog ran to the park", "a girl saw a ball"]
    out = PS.compare_prompt_sets(tiny_engine, set_a, set_b, top_k=8, position=1, sort_by="effect_size")
    acts_a = tutorial_feature_acts(tiny_engine, set_a[0])[1][1]  # position 1 = "the" in every prompt of set A
    acts_b = tutorial_feature_acts(tiny_engine, set_b[0])[1][1]  # position 1 = "a"
    differing = (acts_a - acts_b).abs()
    expected = [int(i) for i in differing.argsort(descending=True)[:8] if differing[i] > 1e-6]
    assert expected, "the random SAE should have features that tell 'the' from 'a'"
    assert [d.feature for d in out.diffs[: len(expected)]] == expected
    for d in out.diffs[: len(expected)]:
        assert d.separated and d.effect_size is None
        assert d.difference == pytest.approx(float(acts_a[d.feature] - acts_b[d.feature]), abs=1e-3)


def test_separated_flags_from_small_sets_warn_that_chance_separates_them_often(tiny_engine):
    words = ["cat", "dog", "girl", "boy"]
    small = PS.compare_prompt_sets(tiny_engine, [f"the {w} sat" for w in words[:3]],
                                   [f"a {w} sat" for w in words[:3]], position=1)
    enough = PS.compare_prompt_sets(tiny_engine, [f"the {w} sat" for w in words], [f"a {w} sat" for w in words],
                                    position=1)
    assert any(d.separated for d in small.diffs) and any(d.separated for d in enough.diffs)
    # 2 / C(6, 3) = 0.1 of exchangeable 3 vs 3 values are separated; 2 / C(8, 4) = 0.029 for 4 vs 4
    assert any("separated by chance with probability 0.1 " in w for w in small.warnings or [])
    assert not any("by chance" in w for w in enough.warnings or [])


def test_set_statistics_match_plain_formulas_and_flag_non_overlapping_sets():
    """Per feature: Cohen's d with pooled sd, the rank-biserial correlation over all pairs, and separation when
    the sets do not overlap, even with spread inside each set (the review's A=[0,0] vs B=[1.55,1.59] case)."""
    A = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 2.0, 0.0], [0.0, 2.0, 2.0, 0.0]])
    B = torch.tensor([[1.55, 2.0, 2.0, 0.0], [1.59, 0.5, 2.0, 0.0]])
    st = PS.set_statistics(A, B)
    for f in range(4):
        a, b = A[:, f].tolist(), B[:, f].tolist()
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
        vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
        pooled = (((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2)) ** 0.5
        wins = sum(x > y for x in a for y in b)
        ties = sum(x == y for x in a for y in b)
        assert st.difference[f].item() == pytest.approx(ma - mb, abs=1e-6)
        assert st.rank_biserial[f].item() == pytest.approx((2 * wins + ties) / (len(a) * len(b)) - 1, abs=1e-6)
        if pooled > 0:
            assert st.cohens_d[f].item() == pytest.approx((ma - mb) / pooled, rel=1e-5)
        else:
            assert math.isnan(st.cohens_d[f].item())  # constant in both sets: d is undefined, not 0
    assert st.separated.tolist() == [True, False, False, False]  # spread in B, no overlap with A
    assert st.rank_biserial[0].item() == -1.0


def test_one_prompt_per_set_has_no_cohens_d_but_a_rank_biserial():
    st = PS.set_statistics(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    assert math.isnan(st.cohens_d[0].item())
    assert st.rank_biserial.tolist() == [1.0, 0.0] and st.separated.tolist() == [True, False]


def test_byte_fallback_tokens_show_their_bytes_instead_of_replacement_characters(stories_engine):
    out = F.get_feature_acts(stories_engine, "Lily 😀 saw", top_k=1)
    emoji = [t for t in out.tokens if t.startswith("<0x")]
    assert "".join(emoji) == "".join(f"<0x{b:02X}>" for b in "😀".encode())
    assert "\ufffd" not in "".join(out.tokens)


def test_an_ascii_byte_piece_shows_its_character_and_the_lens_filter_reads_whole_texts(stories_engine):
    """SentencePiece's '<0x20>' (the space) decodes to '' alone: shown as ' ', not as an empty token in a logit
    lens. And the built-in sets' filter keeps a byte piece only when its whole text is one whitespace character:
    '' (which `in " \t\n\r"` would let through) is left out with the other byte pieces."""
    from sae_mcp.engine.token_sets import excluded_from_builtin, vocab_strings

    tok = stories_engine.model.tokenizer
    space, cr, e2 = tok.convert_tokens_to_ids(["<0x20>", "<0x0D>", "<0xE2>"])
    assert tok.decode([space]) == ""  # the loss this puts right
    assert stories_engine.str_tokens(torch.tensor([space, cr, e2])) == [" ", "\r", "<0xE2>"]
    vocab = vocab_strings(stories_engine)
    excluded = excluded_from_builtin(stories_engine, vocab)
    assert space not in excluded and cr not in excluded and e2 in excluded
    vocab[space] = ""  # as str_tokens wrote it before
    assert space in excluded_from_builtin(stories_engine, vocab)


def test_byte_level_bpe_pieces_map_back_to_their_utf8_bytes():
    """Against the tokenizers library's own byte-level alphabet and pre-tokenizer (GPT-2, Llama 3, Qwen style)."""
    from tokenizers.pre_tokenizers import ByteLevel

    from sae_mcp.engine.pieces import _BYTE_LEVEL, _bytes_of_piece

    assert set(_BYTE_LEVEL) == set(ByteLevel.alphabet())
    for text in ("😀", " 東京", "é"):
        (piece, _), = ByteLevel(add_prefix_space=False).pre_tokenize_str(text)[:1]
        assert _bytes_of_piece(piece) == "".join(f"<0x{b:02X}>" for b in text.encode())


def test_multi_token_answer_gets_its_whole_sequence_log_probability_by_teacher_forcing(stories_engine):
    """log P(' toys' | prompt) = sum of each answer token's log-prob after the prompt and the earlier answer
    tokens, computed here one token at a time with separate forwards."""
    model = stories_engine.model
    prompt = "Lily loved to play with her"
    out = L.next_token(stories_engine, prompt, answer=" toys", top_k=2).answer
    assert out.multi_token and len(out.answer_tokens) >= 2
    ids = model.to_tokens(prompt)[0].tolist()
    answer_ids = [model.tokenizer.convert_tokens_to_ids(t.replace(" ", "\u2581")) for t in out.answer_tokens]
    total = 0.0
    with torch.no_grad():
        for a in answer_ids:
            total += model(torch.tensor([ids]))[0, -1].log_softmax(-1)[a].item()
            ids.append(a)
    assert out.sequence_log_probability == pytest.approx(total, abs=1e-3)
    single = L.next_token(stories_engine, prompt, answer=" Lily").answer
    assert single.sequence_log_probability is None
