"""Loaders: local folders load for real; SAEs that do not fit the model are refused at start with the reason;
offline with nothing cached fails fast with what to download or pass instead."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import make_sae_folder, needs_stories, STORIES_HF
from sae_mcp.engine.loading import _hf_repo_cached, check_compatible, load_model, load_sae, split_alias
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import LoadError


def test_sae_on_a_hook_the_model_lacks_is_refused_with_the_reason(tiny_loaded, tmp_path):
    folder = make_sae_folder(tmp_path / "deep", 32, 64, "blocks.7.hook_resid_pre")
    s = load_sae(str(folder), "cpu", torch.float32)
    with pytest.raises(LoadError, match=r"blocks.7.hook_resid_pre.*does not have.*2 layers"):
        check_compatible(tiny_loaded, s)


def test_sae_whose_d_in_does_not_fit_the_hook_is_refused(tiny_loaded, tmp_path):
    folder = make_sae_folder(tmp_path / "wide", 48, 64, "blocks.1.hook_resid_pre")
    s = load_sae(str(folder), "cpu", torch.float32)
    with pytest.raises(LoadError, match=r"d_in=48.*width 32.*different model"):
        check_compatible(tiny_loaded, s)


def test_sae_on_the_mlp_output_hook_checks_its_width(tiny_loaded, tmp_path):
    folder = make_sae_folder(tmp_path / "mlp", 64, 64, "blocks.0.mlp.hook_post")  # d_mlp = 64
    s = load_sae(str(folder), "cpu", torch.float32)
    check_compatible(tiny_loaded, s)  # fits: no exception
    assert s.layer == 0 and s.d_in == 64


def test_unknown_release_fails_at_once_with_a_suggestion():
    t0 = time.perf_counter()
    with pytest.raises(LoadError, match=r"gpt2-small-res-jb"):
        load_sae("gpt2-small-res-jbb/blocks.7.hook_resid_pre", "cpu", torch.float32)
    with pytest.raises(LoadError, match=r"has no SAE id 'blocks.70.hook_resid_pre'"):
        load_sae("gpt2-small-res-jb/blocks.70.hook_resid_pre", "cpu", torch.float32)
    assert time.perf_counter() - t0 < 60  # a bound on hanging, not a performance claim


def test_folder_without_cfg_json_is_refused(tmp_path):
    with pytest.raises(LoadError, match="cfg.json"):
        load_sae(str(tmp_path), "cpu", torch.float32)


def test_official_model_offline_without_cache_says_what_to_download():
    if _hf_repo_cached("gpt2", "config.json"):
        pytest.skip("gpt2 is in this machine's Hugging Face cache, so offline loading would succeed")
    with pytest.raises(LoadError, match=r"not in the Hugging Face cache.*--model /path"):
        load_model("gpt2-small", "cpu", torch.float32)


def test_pretrained_sae_offline_without_cache_says_what_to_do():
    with pytest.raises(LoadError, match=r"not in the Hugging Face cache.*local/saelens/folder"):
        load_sae("gpt2-small-res-jb/blocks.7.hook_resid_pre", "cpu", torch.float32)


def test_unknown_model_name_is_explained():
    with pytest.raises(LoadError, match="neither a transformer-lens official model name nor a local"):
        load_model("no-such-model-xyz", "cpu", torch.float32)


def test_alias_prefix_is_split_but_paths_with_equals_are_not(tmp_path):
    assert split_alias("res7=gpt2-small-res-jb/blocks.7.hook_resid_pre") == ("res7", "gpt2-small-res-jb/blocks.7.hook_resid_pre")
    assert split_alias("gpt2-small-res-jb/blocks.7.hook_resid_pre") == (None, "gpt2-small-res-jb/blocks.7.hook_resid_pre")
    weird = tmp_path / "a=b"
    weird.mkdir()
    assert split_alias(str(weird)) == (None, str(weird))


def test_two_saes_on_one_hook_need_an_alias(tiny_loaded, tmp_path):
    a = load_sae(str(make_sae_folder(tmp_path / "a", 32, 64, "blocks.1.hook_resid_pre")), "cpu", torch.float32)
    b = load_sae(str(make_sae_folder(tmp_path / "b", 32, 64, "blocks.1.hook_resid_pre", seed=1)), "cpu", torch.float32)
    with pytest.raises(LoadError, match="give one an alias"):
        Engine(tiny_loaded, [a, b], "cpu")
    b.key = "second"
    engine = Engine(tiny_loaded, [a, b], "cpu")
    assert engine.sae("second") is b and engine.sae("blocks.1.hook_resid_pre") is a


@needs_stories
def test_local_llama_folder_matches_hugging_face_log_probs(stories_loaded):
    """transformer-lens' conversion of the local folder gives the same next-token log-probs as HF itself."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(STORIES_HF), dtype=torch.float32)
    tokens = stories_loaded.model.to_tokens("Once upon a time, there was a little girl")
    with torch.no_grad():
        ours = stories_loaded.model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert stories_loaded.architecture == "LlamaForCausalLM"
