"""Guards against answers that could mislead, and the protocol rules an agent relies on, each checked against a
plain computation: the answer's space variant, prompts longer than the SAE's context, poor reconstruction,
SAE fidelity, unknown argument names, validation messages, prompts missing an argument, the server's version."""

from __future__ import annotations

from importlib.metadata import version

import anyio
import pytest
import torch
from mcp import Client

from sae_mcp.engine import features as F
from sae_mcp.engine import logits as L
from sae_mcp.engine.features import POOR_RECONSTRUCTION
from sae_mcp.server.app import build_server
from sae_mcp.server.tools import tool_map
from sae_mcp.services import Services
from sae_mcp.settings import Settings

from helpers.models import engine_on, make_sae_folder, only_sae
from helpers.plain import assert_ranked_like, tutorial_sae_acts
from helpers.servers import server_at
from mcp_client import call_many, error_text

# ----------------------------------------------------------------------------------------------- protocol rules


def test_an_unknown_argument_name_is_an_error_naming_the_valid_ones_and_the_next_call_works(tiny_server):
    bad, good = call_many(tiny_server, [("next_token", {"prompt": "the cat", "k": 3}),
                                        ("next_token", {"prompt": "the cat", "top_k": 3})])
    msg = error_text(bad)
    assert "'k'" in msg and "answer, prompt, top_k" in msg
    assert len(good.structured_content["top"]) == 3


def test_a_validation_error_names_the_argument_and_value_without_documentation_links(tiny_server):
    (bad,) = call_many(tiny_server, [("get_feature_acts", {"prompt": "the cat", "top_k": 5000})])
    msg = error_text(bad)
    assert "top_k: Input should be less than or equal to 100 (given 5000)" in msg
    assert "http" not in msg and "\n" not in msg


def test_a_prompt_without_its_required_argument_names_it_and_the_server_reports_its_version(tiny_server):
    async def go():
        async with Client(tiny_server) as c:
            info = c.server_info
            try:
                await c.get_prompt("investigate_feature", {})
            except Exception as exc:  # the SDK raises the JSON-RPC error
                return info, str(exc)
            return info, None

    info, err = anyio.run(go)
    assert err is not None and "needs the argument(s) feature" in err
    assert info.version == version("sae-mcp")


# ----------------------------------------------------------------------------------------------- answer variant


def test_an_answer_without_its_leading_space_is_warned_about_naming_the_likely_variant(stories_engine):
    """stories260K after '... named': ' Lily' is the likely token, 'Lily' (no space) a rare one."""
    prompt = "Once upon a time, there was a little girl named"
    e = stories_engine
    tokens = e.model.to_tokens(prompt)
    with torch.inference_mode():
        probs = e.model(tokens)[0, -1].softmax(-1)
    p_space, p_bare = (float(probs[L.answer_token_ids(e, a)[0]]) for a in (" Lily", "Lily"))
    assert p_space >= L.VARIANT_RATIO * p_bare and p_space >= L.VARIANT_MIN_PROBABILITY  # the plain numbers
    (warning,) = L.next_token(e, prompt, answer="Lily").warnings
    assert "' Lily'" in warning and "answer=' Lily'" in warning
    assert L.next_token(e, prompt, answer=" Lily").warnings is None


# ----------------------------------------------------------------------------------------------- context size


def test_a_prompt_longer_than_the_saes_training_context_is_answered_with_a_warning(tiny_engine):
    s = only_sae(tiny_engine)  # trained (metadata) on 32-token contexts; the model's context is 64
    long_prompt = " ".join(["the cat sat on the mat"] * 7)  # 42 tokens + BOS
    out = F.get_feature_acts(tiny_engine, long_prompt, top_k=1)
    assert len(out.tokens) > s.context_size
    assert any(f"trained on {s.context_size}-token contexts" in w for w in out.warnings)
    short = F.get_feature_acts(tiny_engine, "the cat sat", top_k=1)
    assert not any("contexts" in w for w in short.warnings or [])


# ----------------------------------------------------------------------------------------------- reconstruction


def exact_sae_folder(folder, d_in: int, hook: str):
    """An SAE that reconstructs exactly: relu(x) - relu(-x) = x, with W_enc = [I, -I], W_dec = [I; -I]."""
    from sae_lens import SAE

    make_sae_folder(folder, d_in, 2 * d_in, hook)
    sae = SAE.load_from_disk(str(folder))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(str(folder))
    return folder


def plain_relative_error(engine, prompt: str) -> torch.Tensor:
    """||x - x_hat||^2 / ||x||^2 per position, the tutorial's way (hook_sae_input and hook_sae_recons)."""
    s = only_sae(engine)
    tokens = engine.model.to_tokens(prompt)
    with torch.inference_mode():
        _, cache = engine.model.run_with_cache_with_saes(tokens, saes=[s.sae])
    engine.model.reset_saes()
    x, x_hat = cache[f"{s.hook_name}.hook_sae_input"][0], cache[f"{s.hook_name}.hook_sae_recons"][0]
    return (x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1)


def test_poor_reconstruction_is_warned_about_at_exactly_the_positions_the_plain_error_flags(tiny_engine, tiny_loaded,
                                                                                            tmp_path):
    prompt = "the cat sat on the mat and the dog"
    err = plain_relative_error(tiny_engine, prompt)
    flagged = [p for p in range(1, len(err)) if float(err[p]) > POOR_RECONSTRUCTION]
    assert flagged, "the random tiny SAE should reconstruct some positions poorly"
    out = F.get_feature_acts(tiny_engine, prompt, top_k=1)
    (warning,) = [w for w in out.warnings if "reconstructs the activation poorly" in w]
    shown = [int(part.split(" ")[0]) for part in warning.split("position(s) ")[1].split(" (share")[0].split(", ")
             if part and part.split(" ")[0].isdigit()]
    assert shown == flagged[:5]
    exact = engine_on(tiny_loaded, exact_sae_folder(tmp_path / "exact", 32, "blocks.1.hook_resid_pre"))
    assert float(plain_relative_error(exact, prompt).max()) < 1e-6
    assert F.get_feature_acts(exact, prompt, top_k=1).warnings is None


# ----------------------------------------------------------------------------------------------- fidelity


def test_model_info_reports_each_saes_fidelity_measured_on_its_corpus(stories_engine, stories_settings):
    from sae_mcp.engine.corpus import iter_windows, resolve_corpus
    from sae_mcp.index.fidelity import FIDELITY_WINDOWS

    server = build_server(stories_engine, stories_settings)
    (info,) = call_many(server, [("model_info", {})])
    fid = info.structured_content["saes"][0]["fidelity"]
    # the plain computation on the same windows: the corpus' first full 128-token windows
    e, s = stories_engine, only_sae(stories_engine)
    windows = [w.ids for w in iter_windows(resolve_corpus(str(stories_settings.corpus)), e.model.tokenizer, 128, 1)
               if len(w.ids) == 128][:FIDELITY_WINDOWS]
    tokens = torch.tensor(windows)
    with torch.inference_mode():
        _, cache = e.model.run_with_cache_with_saes(tokens, saes=[s.sae])
        clean = float(e.model(tokens, return_type="loss"))
        spliced = float(e.model.run_with_saes(tokens, saes=[s.sae], return_type="loss"))
        e.model.reset_saes()
        zero = [(s.hook_name, lambda act, hook: act * 0)]
        zeroed = float(e.model.run_with_hooks(tokens, fwd_hooks=zero, return_type="loss"))
    x = cache[f"{s.hook_name}.hook_sae_input"][:, 1:].flatten(0, 1)
    x_hat = cache[f"{s.hook_name}.hook_sae_recons"][:, 1:].flatten(0, 1)
    acts = cache[f"{s.hook_name}.hook_sae_acts_post"][:, 1:].flatten(0, 1)
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fid["tokens"] == x.shape[0]
    assert fid["explained_variance"] == pytest.approx(ev, abs=1e-3)
    assert fid["l0"] == pytest.approx(float((acts > 0).sum(-1).float().mean()), abs=0.01)
    assert fid["dead_in_sample"] == int((acts <= 0).all(0).sum())
    assert fid["loss_clean"] == pytest.approx(clean, abs=1e-3)
    assert fid["loss_spliced"] == pytest.approx(spliced, abs=1e-3)
    assert fid["loss_zero_ablated"] == pytest.approx(zeroed, abs=1e-3)
    assert fid["loss_recovered"] == pytest.approx((zeroed - spliced) / (zeroed - clean), abs=1e-3)


def test_model_info_says_why_there_is_no_fidelity_without_a_corpus(tiny_engine, tmp_path):
    (info,) = call_many(server_at(tiny_engine, tmp_path), [("model_info", {})])
    sae = info.structured_content["saes"][0]
    assert sae["fidelity"] is None and "--corpus" in sae["fidelity_note"]


def test_fidelity_is_measured_once_per_server(tiny_engine, tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and Lily saw it " * 4] * 6) + "\n", encoding="utf-8")
    services = Services(tiny_engine, Settings(corpus=str(corpus), data_dir=tmp_path), tools=tool_map())
    calls = []
    import sae_mcp.services as services_module

    real = services_module.measure_fidelity
    monkeypatch.setattr(services_module, "measure_fidelity", lambda *a: calls.append(1) or real(*a))
    first = services.fidelity(only_sae(tiny_engine).key)
    assert first[0] is not None and services.fidelity(only_sae(tiny_engine).key) == first and calls == [1]


# ----------------------------------------------------------------------------------------------- knobs


def test_get_feature_acts_at_one_position_gives_its_top_features_l0_and_traces(tiny_engine):
    prompt = "the cat sat on the mat"
    tokens = tiny_engine.model.to_tokens(prompt)
    ref = tutorial_sae_acts(tiny_engine, tokens)[0]  # [S, d_sae]
    out = F.get_feature_acts(tiny_engine, prompt, top_k=3, features=[2, 9], position=-2)
    (row,) = out.positions
    p = tokens.shape[1] - 2
    assert row.position == p and len(out.tokens) == tokens.shape[1]
    assert row.l0 == int((ref[p] > 0).sum())
    assert_ranked_like([x.feature for x in row.top], ref[p])
    assert len(row.top) == min(3, int((ref[p] > 0).sum()))
    assert out.features["2"] == [pytest.approx(float(ref[p, 2]), abs=2e-4)]
    assert out.features["9"] == [pytest.approx(float(ref[p, 9]), abs=2e-4)]


def test_compare_prompt_sets_name_the_token_compared_in_each_prompt(tiny_engine):
    from sae_mcp.engine.prompt_sets import compare_prompt_sets

    a, b = ["the cat sat", "a cat ran"], ["the dog sat", "the big dog ran"]
    out = compare_prompt_sets(tiny_engine, a, b, position=2)
    plain = [tiny_engine.model.to_str_tokens(p)[2] for p in a + b]
    assert out.tokens_a + out.tokens_b == plain  # 'cat', 'cat', 'dog', 'big': the misaligned prompt shows


def test_ablate_and_test_with_a_counterfactual_scores_attributes_metric_in_every_table(tiny_engine):
    from helpers.plain import plain_ablation_logits, tokens_of

    PROMPT = "the cat sat on the mat and the dog"

    from sae_mcp.engine import ablation

    e = tiny_engine
    tokens = tokens_of(e, PROMPT)
    feats = [int(f) for f in tutorial_sae_acts(e, tokens)[0].sum(0).topk(2).indices]
    plain = plain_ablation_logits(e, tokens, feats)
    res = ablation.ablate_and_test(e, PROMPT, " mat", feats, counterfactual=" park")
    a, c = res.answer.token_id, res.counterfactual.token_id

    def metric(logits):
        return float(logits[a] - logits[c])

    for name, key in (("baseline", "base"), ("reconstruction_only", "recon"), ("ablated", "with_err"),
                      ("ablated_without_error_term", "no_err")):
        table = getattr(res, name)
        assert table.metric == pytest.approx(metric(plain[key]), abs=1e-3), name
        assert table.metric_change == pytest.approx(metric(plain[key]) - metric(plain["base"]), abs=1e-3), name
    alone = metric(plain["no_err"]) - metric(plain["recon"])
    assert res.ablated_without_error_term.metric_change_vs_reconstruction == pytest.approx(alone, abs=1e-3)
    assert f"metric {metric(plain['with_err']) - metric(plain['base']):+.4g}" in res.summary
    without = ablation.ablate_and_test(e, PROMPT, " mat", feats)  # no counterfactual: log P(answer), never None
    assert without.baseline.metric == pytest.approx(float(plain["base"].log_softmax(-1)[a]), abs=1e-4)


def test_project_to_vocab_can_leave_special_tokens_out(tiny_engine):
    s = only_sae(tiny_engine)
    weights = s.sae.W_dec[4].detach() @ tiny_engine.model.W_U.detach()  # [d_vocab]
    special = frozenset(tiny_engine.model.tokenizer.all_special_ids)
    out = L.project_to_vocab(tiny_engine, 4, top_k=5, exclude=special)
    kept = [i for i in weights.argsort(descending=True).tolist() if i not in special]
    assert [t.token_id for t in out.top_positive] == kept[:5]
    assert [t.token_id for t in out.top_negative] == kept[::-1][:5]
