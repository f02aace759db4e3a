"""Loaders: local folders load for real; SAEs that do not fit the model are refused at start with the reason;
offline with nothing cached fails fast with what to download or pass instead."""

from __future__ import annotations

import pytest
import torch

from sae_mcp.engine.hub import hf_file_cached
from sae_mcp.engine.loading import check_compatible, load_model
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import load_sae, split_alias
from sae_mcp.errors import LoadError

from helpers.models import STORIES_HF, make_sae_folder


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
    with pytest.raises(LoadError, match=r"gpt2-small-res-jb"):
        load_sae("gpt2-small-res-jbb/blocks.7.hook_resid_pre", "cpu", torch.float32)
    with pytest.raises(LoadError, match=r"has no SAE id 'blocks.70.hook_resid_pre'"):
        load_sae("gpt2-small-res-jb/blocks.70.hook_resid_pre", "cpu", torch.float32)


def test_folder_without_cfg_json_is_refused(tmp_path):
    with pytest.raises(LoadError, match="cfg.json"):
        load_sae(str(tmp_path), "cpu", torch.float32)


def test_official_model_offline_without_cache_says_what_to_download():
    if hf_file_cached("gpt2", "config.json"):
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
    hook_path = "gpt2-small-res-jb/blocks.7.hook_resid_pre"
    assert split_alias("res7=gpt2-small-res-jb/blocks.7.hook_resid_pre") == ("res7", hook_path)
    assert split_alias("gpt2-small-res-jb/blocks.7.hook_resid_pre") == (None, hook_path)
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


# ------------------------------------------------------------------ model processing recorded by the SAE


def _tiny_gpt2_folder(folder):
    """A random-weight GPT-2 (LayerNorm, so processing matters) saved as a real local HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    # n_ctx: real GPT-2 config.json files carry it, and transformer-lens 3.9 reads it (transformers 5 no longer sets it)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _sae_with_processing(folder, kwargs, d_in=32, hook="blocks.1.hook_resid_pre"):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook, model_name="tiny-gpt2", context_size=32, prepend_bos=True,
                       model_from_pretrained_kwargs=kwargs)
    StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=meta)).save_model(str(folder))
    return folder


def test_model_is_processed_as_the_sae_was_trained_so_activations_match_hugging_face(tmp_path):
    """An SAE trained on the unprocessed residual stream (center_writing_weights=False, sae-lens' training default)
    must read the residual stream Hugging Face computes, not transformer-lens' centred one."""
    from transformers import AutoModelForCausalLM

    from sae_mcp.settings import Settings

    model_dir = _tiny_gpt2_folder(tmp_path / "gpt2")
    sae_dir = _sae_with_processing(tmp_path / "sae", {"center_writing_weights": False})
    engine = Engine.from_settings(Settings(model=str(model_dir), saes=(str(sae_dir),), device="cpu", data_dir=tmp_path))
    assert engine.loaded_model.processing["center_writing_weights"] is False
    assert engine.loaded_model.architecture == "GPT2LMHeadModel"
    s = engine.sae(None)
    tokens = engine.to_tokens("the cat sat on the mat")
    ours = engine.forward_to_hook(tokens, s)[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        theirs = hf(tokens, output_hidden_states=True).hidden_states[1][0]  # the input of block 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # and with transformer-lens' default processing the residual stream is centred, i.e. different
    centred = Engine.from_settings(
        Settings(
            model=str(model_dir),
            saes=(str(_sae_with_processing(tmp_path / "sae2", {})),),
            device="cpu",
            data_dir=tmp_path,
        )
    )
    assert not torch.allclose(centred.forward_to_hook(tokens, centred.sae(None))[0], theirs, atol=1e-3)


def test_saes_that_need_different_model_processing_are_refused_together(tmp_path):
    from sae_mcp.settings import Settings

    model_dir = _tiny_gpt2_folder(tmp_path / "gpt2")
    a = _sae_with_processing(tmp_path / "a", {"center_writing_weights": False})
    b = _sae_with_processing(tmp_path / "b", {"center_writing_weights": True})
    with pytest.raises(LoadError, match="center_writing_weights.*separate servers"):
        Engine.from_settings(Settings(model=str(model_dir), saes=(f"a={a}", f"b={b}"), device="cpu", data_dir=tmp_path))


def test_train_sae_records_its_corpus_and_model_processing(trained_sae_dir, stories_loaded):
    from helpers.models import STORIES_CORPUS

    s = load_sae(str(trained_sae_dir), "cpu", torch.float32)
    assert s.dataset_path == str(STORIES_CORPUS)  # so scans default to the corpus it was trained on
    assert s.model_kwargs == stories_loaded.processing
