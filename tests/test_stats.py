"""Logit-weight statistics and token-set enrichment, checked against plain computations written here."""

from __future__ import annotations

import math
import re
import unicodedata

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import stats
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.engine.token_sets import BUILTIN_SETS, vocab_strings
from sae_mcp.errors import InvalidInput

from helpers.models import only_sae


def full_logit_weights(engine) -> torch.Tensor:
    """W_dec @ W_U for every feature at once, the tutorial's way (the tiny SAE reads the residual stream)."""
    s = only_sae(engine)
    return (s.sae.W_dec.detach().float() @ engine.model.W_U.detach().float()).cpu()  # [d_sae, d_vocab]


def plain_moments(row: list[float]) -> tuple[float, float, float, float]:
    n = len(row)
    mean = sum(row) / n
    var = sum((v - mean) ** 2 for v in row) / n
    std = math.sqrt(var)
    skew = sum(((v - mean) / std) ** 3 for v in row) / n
    kurt = sum(((v - mean) / std) ** 4 for v in row) / n
    return mean, std, skew, kurt


def test_moments_match_plain_formulas_on_the_full_matrix(tiny_engine, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_BYTES", 7 * 3 * 4 * tiny_engine.model.cfg.d_vocab)  # chunks of 7 features
    s = only_sae(tiny_engine)
    with tiny_engine.device_work():
        got = LogitWeightStats(tiny_engine).moments(s)  # [d_sae, 4]
    full = full_logit_weights(tiny_engine)
    want = torch.tensor([plain_moments(row) for row in full.double().tolist()], dtype=torch.float32)
    assert got.shape == (s.d_sae, 4)
    assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_feature_stats_sorts_by_skewness_and_respects_top(tiny_engine):
    out = LogitWeightStats(tiny_engine).feature_stats(sort_by="skewness", top=5)
    skews = [f.skewness for f in out.features]
    assert len(skews) == 5 and skews == sorted(skews, reverse=True)
    full = full_logit_weights(tiny_engine)
    best = max(range(full.shape[0]), key=lambda f: plain_moments(full[f].double().tolist())[2])
    assert out.features[0].feature == best
    assert out.densities.startswith("not indexed")
    assert out.features[0].density is None


def test_feature_stats_named_features_and_density_filter(tiny_engine):
    dens = torch.linspace(0, 1, only_sae(tiny_engine).d_sae)
    out = LogitWeightStats(tiny_engine).feature_stats(
        features=[3, 5, 120], sort_by="density", descending=False, densities=dens, min_density=0.03
    )
    assert [f.feature for f in out.features] == [5, 120]  # feature 3's density is 3/127 < 0.03
    assert out.features[0].density == pytest.approx(5 / 127, abs=1e-6)


def test_feature_stats_density_filter_that_keeps_nothing_says_the_range(tiny_engine):
    dens = torch.linspace(0, 0.5, only_sae(tiny_engine).d_sae)
    with pytest.raises(InvalidInput, match=r"no feature of the 3 considered has a density in \[0.6, 1\]; their "
                       r"densities run from 0.01181 to 0.4724: widen"):
        LogitWeightStats(tiny_engine).feature_stats(features=[3, 5, 120], densities=dens, min_density=0.6)


def test_feature_stats_density_sort_without_index_says_run_index(tiny_engine):
    with pytest.raises(InvalidInput, match="sae-mcp index"):
        LogitWeightStats(tiny_engine).feature_stats(sort_by="density")


def plain_rank_biserial(row: list[float], members: set[int]) -> float:
    """P(x_set > x_rest) + 1/2 P(tie), by a loop over every pair; mapped to 2*AUC-1."""
    wins = 0.0
    inside = [row[i] for i in members]
    outside = [row[j] for j in range(len(row)) if j not in members]
    for a in inside:
        for b in outside:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return 2 * wins / (len(inside) * len(outside)) - 1


def test_enrichment_score_matches_a_pairwise_loop(tiny_engine, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_BYTES", 5 * 16 * tiny_engine.model.cfg.d_vocab)  # chunks of 5 features
    s = only_sae(tiny_engine)
    vocab = vocab_strings(tiny_engine)
    digits = [i for i, t in enumerate(vocab) if re.fullmatch(r" ?[0-9]+", t)]
    some = [3, 7, 11]
    idx = torch.arange(s.d_sae)
    with tiny_engine.device_work():
        score, z = stats.enrichment_scores(tiny_engine, s, idx, [digits, some])
    full = full_logit_weights(tiny_engine).double().tolist()
    want = torch.tensor(
        [[plain_rank_biserial(row, set(digits)), plain_rank_biserial(row, set(some))] for row in full],
        dtype=torch.float64,
    )
    assert_close(score.double(), want, rtol=1e-5, atol=1e-5)
    # z is a monotone function of the score for a fixed set size: same sign
    assert torch.equal(torch.sign(z), torch.sign(score))


def test_enrichment_detects_a_planted_direction(tiny_engine):
    """A decoder row set to the mean unembedding of the digit tokens must be the top 'promotes' feature."""
    s = only_sae(tiny_engine)
    vocab = vocab_strings(tiny_engine)
    digits = [i for i, t in enumerate(vocab) if re.fullmatch(r" ?[0-9]+", t)]
    W_U = tiny_engine.model.W_U.detach()
    planted = W_U[:, digits].mean(1) - W_U.mean(1)  # [d_model]
    W_dec = s.sae.W_dec
    saved = W_dec.detach().clone()  # the engine is session-wide: put every weight back afterwards
    try:
        with torch.no_grad():
            W_dec[17] = planted / planted.norm()
            W_dec[18] = -planted / planted.norm()
        out = LogitWeightStats(tiny_engine).token_set_enrichment(sets=["all_digits"], top=3)
    finally:
        with torch.no_grad():
            W_dec.copy_(saved)
    res = out.sets[0]
    assert res.name == "all_digits" and res.size == len(digits)
    assert res.promoted[0].feature == 17 and res.promoted[0].score > 0  # promotes the set
    assert res.suppressed[0].feature == 18 and res.suppressed[0].score < 0  # suppresses it
    assert res.promoted[0].score > 0.5 and res.suppressed[0].score < -0.5


def test_token_lists_and_regex_sets_build_with_unmatched_reported(tiny_engine):
    named, _ = LogitWeightStats(tiny_engine).token_sets(
        token_sets={"pets": ["cat", "dog", "unicorn"]}, regex_sets={"short": r"^.{1}$"}
    )
    by = {ts.name: (ts.ids, ts.unmatched) for ts in named}
    vocab = vocab_strings(tiny_engine)
    assert sorted(vocab[i] for i in by["pets"][0]) == ["cat", "dog"]
    assert by["pets"][1] == ["unicorn"]
    assert all(len(vocab[i]) == 1 for i in by["short"][0])


def test_a_set_of_one_or_two_tokens_is_scored_with_a_warning_and_a_large_set_without(tiny_engine):
    """A 2-token set's r is two tokens' rank: with many features some reach |r| near 1 by chance, so the answer
    says so; the built-in digits set (dozens of tokens) carries no such warning."""
    st = LogitWeightStats(tiny_engine)
    small = st.token_set_enrichment(token_sets={"pets": ["cat", "dog", "unicorn"]}, top=3)
    assert small.sets[0].size == 2
    (w,) = small.warnings
    assert "'pets' (2)" in w and "project_to_vocab" in w
    large = st.token_set_enrichment(sets=["all_digits"], top=3)
    assert large.sets[0].size >= 5 and large.warnings is None


def test_bad_sets_say_what_to_change(tiny_engine):
    st = LogitWeightStats(tiny_engine)
    with pytest.raises(InvalidInput, match="built-in sets"):
        st.token_sets(sets=["nope"])
    with pytest.raises(InvalidInput, match="neither empty"):
        st.token_sets(token_sets={"none": ["zzz"]})
    with pytest.raises(InvalidInput, match="does not compile"):
        st.token_sets(regex_sets={"bad": "("})
    with pytest.raises(InvalidInput, match="out of range"):
        LogitWeightStats(tiny_engine).feature_stats(features=[10_000])


def test_real_model_moments_and_builtin_sets_on_a_sentencepiece_vocab(stories_engine):
    """stories260K (Llama SentencePiece, 512 tokens): moments match the plain formulas; spaces are restored, so
    starts_with_space is a real set; the planted-free scores stay in [-1, 1]."""
    s = only_sae(stories_engine)
    with stories_engine.device_work():
        got = LogitWeightStats(stories_engine).moments(s, list(range(20)))
    full = (s.sae.W_dec[:20].detach().float() @ stories_engine.model.W_U.detach().float()).double().tolist()
    assert_close(got, torch.tensor([plain_moments(row) for row in full], dtype=torch.float32), rtol=1e-4, atol=1e-5)
    out = LogitWeightStats(stories_engine).token_set_enrichment(top=3)
    names = {x.name for x in out.sets}
    assert {"starts_with_space", "capitalised", "punctuation"} <= names
    for x in out.sets:
        assert all(-1 <= e.score <= 1 for e in x.promoted + x.suppressed)


def test_mean_of_a_centred_unembedding_reads_zero_not_minus_zero(tiny_engine, monkeypatch):
    """With W_U mean-centred over the vocabulary (transformer-lens' center_unembed), every feature's logit-weight
    mean is float noise around 0: it is reported as +0.0, and the other moments are the plain ones."""
    s = only_sae(tiny_engine)
    W_U = tiny_engine.model.W_U.detach().float()
    centred = W_U - W_U.mean(dim=1, keepdim=True)  # what center_unembed does to the weights
    real = stats.logit_weights
    monkeypatch.setattr(stats, "logit_weights",
                        lambda e, sae, idx: real(e, sae, idx) - real(e, sae, idx).mean(1, keepdim=True))
    out = LogitWeightStats(tiny_engine).feature_stats(sort_by="feature", descending=False, top=s.d_sae)
    full = (s.sae.W_dec.detach().float() @ centred).double().tolist()
    plain = [plain_moments(row) for row in full]
    assert max(abs(p[0]) for p in plain) < 5e-5  # ~0 by construction
    assert [f.feature for f in out.features] == list(range(s.d_sae))
    assert all(f.mean == 0.0 and math.copysign(1.0, f.mean) == 1.0 for f in out.features)
    assert [f.std for f in out.features] == pytest.approx([p[1] for p in plain], abs=2e-4)


def test_builtin_sets_leave_out_byte_fallback_and_control_tokens(stories_engine):
    """stories260K's Llama vocabulary has 256 byte-fallback pieces <0x00>..<0xFF>; decoded alone they are control
    characters or U+FFFD, which a regex like punctuation's [^\\w\\s] would take. Written plainly: a token is left
    out of every built-in set when it is a special token, a byte piece other than space/tab/newline/CR (the
    newline byte <0x0A> is Llama's only newline token and stays), or text with a control character (Unicode
    category C*) other than tab/newline/CR."""
    tok = stories_engine.model.tokenizer
    V = stories_engine.model.cfg.d_vocab
    pieces = tok.convert_ids_to_tokens(list(range(V)))
    texts = vocab_strings(stories_engine)
    special = set(tok.all_special_ids)

    def left_out(i: int) -> bool:
        t = texts[i]
        if i in special:
            return True
        if pieces[i].startswith("<0x") and t not in (" ", "\t", "\n", "\r"):
            return True
        return any(unicodedata.category(c).startswith("C") and c not in "\t\n\r" for c in t)

    kept = [i for i in range(V) if not left_out(i)]
    # at most the 4 whitespace bytes kept
    assert sum(p.startswith("<0x") for p in pieces) == 256 and len(kept) <= V - 3 - 256 + 4
    st = LogitWeightStats(stories_engine)
    built = {ts.name: ts.ids for ts in st.token_sets(list(BUILTIN_SETS)[:5])[0]}
    for name, ids in built.items():
        assert ids == [i for i in kept if re.search(BUILTIN_SETS[name], texts[i])], name
    assert all(not pieces[i].startswith("<0x") for i in built["punctuation"])
    assert len(built["punctuation"]) < 40  # was 218 of 512, nearly all byte pieces
    (newline,) = st.token_sets(["contains_newline"])[0]
    assert [pieces[i] for i in newline.ids] == ["<0x0A>"]
