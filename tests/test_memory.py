"""Will it fit: the memory estimate against counted parameters and measured RSS, and the refusal before loading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sae_mcp.engine import memory
from sae_mcp.errors import LoadError

from helpers.models import STORIES_HF


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS"])
def test_the_parameter_count_is_every_parameter_of_the_built_model(norm):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=48, n_ctx=64, d_head=12, n_heads=4, d_mlp=96, d_vocab=300,
                                  act_fn="gelu_new", normalization_type=norm)
    model = HookedTransformer(cfg)
    assert memory.model_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_the_parameter_count_of_the_real_llama_fixture_matches_its_loaded_weights(stories_loaded):
    m = stories_loaded.model
    counted = sum(p.numel() for p in m.parameters())
    assert memory.model_parameters(m.cfg) == pytest.approx(counted, rel=0.02)


RSS_SCRIPT = """
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
cfg = HookedTransformerConfig(n_layers=4, d_model=512, n_ctx=256, d_head=64, n_heads=8, d_mlp=2048, d_vocab=20000,
                              act_fn="gelu_new", normalization_type="LN")
before = rss()
model = HookedTransformer(cfg)
after = rss()
from sae_mcp.engine.memory import model_parameters
print(after - before, model_parameters(cfg) * 4)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read RSS")
def test_the_weight_estimate_matches_the_rss_a_model_adds():
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured, estimated = map(int, out.stdout.split())
    assert estimated == pytest.approx(measured, rel=0.15)  # ~37M parameters: ~150 MB measured and estimated


def test_a_model_too_big_for_the_free_memory_is_refused_with_what_to_pass(monkeypatch):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN")
    est = memory.estimate(cfg, [(768, 24576)], torch.float32)
    # gpt2-small in transformer-lens: 124M parameters plus an untied copy of the 38.6M embedding = 163M, fp32
    assert 163e6 * 4 * 0.99 < est.weights < 163e6 * 4 * 1.01
    monkeypatch.setattr(memory, "available", lambda device, n=1: int(0.5 * memory.GB))
    with pytest.raises(LoadError, match=r"needs ~1\.\d GB .* has 0\.5 GB free: pass --dtype bfloat16"):
        memory.check_fits(est, "cpu", 1, "gpt2-small", torch.float32)
    monkeypatch.setattr(memory, "available", lambda device, n=1: 64 * memory.GB)
    memory.check_fits(est, "cpu", 1, "gpt2-small", torch.float32)  # fits: nothing raised


def test_loading_is_refused_before_any_weight_is_read_when_it_cannot_fit(monkeypatch):
    import transformers

    from sae_mcp.engine.loading import Placement, load_model

    def never(*a, **k):
        raise AssertionError("the weights were read although the model cannot fit")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(memory, "available", lambda device, n=1: 1000)
    with pytest.raises(LoadError, match="stories260K with its SAEs needs"):
        load_model(str(STORIES_HF), "cpu", torch.float32, placement=Placement("cpu", 1, ((64, 4096),)))


def test_several_devices_need_that_many_gpus():
    from sae_mcp.engine.devices import check_n_devices

    assert check_n_devices("cpu", 1) == 1
    with pytest.raises(LoadError, match="--n-devices 2 splits the model over GPUs"):
        check_n_devices("cpu", 2)
    with pytest.raises(LoadError, match="pass 1 or more"):
        check_n_devices("cuda", 0)
