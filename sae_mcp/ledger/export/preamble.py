"""The first cells of an exported script/notebook: what it needs, the recorded setup, loading the model and the
SAEs without sae-mcp, and the helpers the run cells call (each a few lines of plain transformer-lens + sae-lens).

Only torch, transformer-lens, sae-lens and pandas are imported (transformers, which transformer-lens depends on,
converts a local model folder). Helpers are included only when a run needs them: each tool names the blocks its
cells call (ExportRule.helpers, in its module), METRIC_HELPER below being one several tools share.
"""

from __future__ import annotations

from sae_mcp.ledger.export.session import Cell, SessionData, lit, md_code, md_text

IMPORTS = '''\
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch
from sae_lens import SAE, HookedSAETransformer

torch.set_grad_enabled(False)  # attribution turns it on where it takes a gradient
'''

LOADING = '''\
def load_model():
    """The model, processed as the SAEs were trained (PROCESSING changes the residual stream itself)."""
    if not Path(MODEL).is_dir():  # an official transformer-lens name: downloaded and converted by transformer-lens
        return HookedSAETransformer.from_pretrained(MODEL, device=DEVICE, dtype=getattr(torch, DTYPE),
                                                    **PROCESSING).eval()
    # A local Hugging Face folder. transformer-lens 3.9's from_pretrained accepts only official names, so the folder
    # is converted by hand: transformer-lens' config for it, the HF model's weights in transformer-lens' layout,
    # then the recorded weight processing.
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, DTYPE)
    cfg = get_pretrained_model_config(MODEL, fold_ln=PROCESSING["fold_ln"], device=DEVICE, dtype=dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, use_safetensors=True)
    state_dict = get_pretrained_state_dict(MODEL, cfg, hf_model=hf_model, dtype=dtype)
    model = HookedSAETransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(MODEL), move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    model.to(DEVICE)
    return model.eval()


def load_sae(source):
    if "folder" in source:  # a SAELens folder: cfg.json + sae_weights.safetensors
        return SAE.load_from_disk(source["folder"], device=DEVICE, dtype=DTYPE).eval()
    return SAE.from_pretrained(source["release"], source["sae_id"], device=DEVICE, dtype=DTYPE).eval()


def folder_weights_id(folder):
    """SHA-256 of cfg.json + sae_weights.safetensors, first 16 hex digits (how sae-mcp names a folder's weights)."""
    h = hashlib.sha256()
    for name in ("cfg.json", "sae_weights.safetensors"):
        if (Path(folder) / name).exists():
            h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()[:16]


model = load_model()
SAES = {key: load_sae(source) for key, source in SAE_SOURCES.items()}
for key, source in SAE_SOURCES.items():
    if "folder" in source and CHECK_WEIGHTS:
        assert folder_weights_id(source["folder"]) == source["weights_id"], (
            f"SAE {key}: {source['folder']} holds other weights than the recorded ones; set CHECK_WEIGHTS = False "
            "to run against them anyway")
'''

METRIC_HELPER = '''\
def metric_of(logits, answer_id, cf_id):
    """logit[answer] - logit[counterfactual]; without a counterfactual log P(answer)."""
    logits = logits.float()
    return logits[answer_id] - logits[cf_id] if cf_id is not None else logits.log_softmax(-1)[answer_id]
'''

CHECKS = '''\
def close(got, recorded, what, atol=ATOL, rtol=RTOL):
    got = float(got)
    assert abs(got - recorded) <= atol + rtol * abs(recorded), f"{what}: got {got:.6g}, recorded {recorded:.6g}"


def check_rank(logits, token_id, recorded, what):
    """A token's rank (how many tokens have a larger logit), ties within ATOL either way."""
    x = logits[token_id]
    lo, hi = int((logits > x + ATOL).sum()), int((logits > x - ATOL).sum())
    assert lo <= recorded <= hi, f"{what}: rank {lo}..{hi}, recorded {recorded}"


def kl(p_logits, q_logits):
    """KL(P || Q) over the vocabulary, from logits."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def hook_of(key):
    return SAES[key].cfg.metadata.hook_name


def tokens_of(prompt, prepend_bos):
    return model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)


def sae_acts(key, prompt, prepend_bos):
    """The SAE's feature activations [seq, d_sae], the tutorial's way: the SAE spliced in with
    run_with_cache_with_saes, read at <hook>.hook_sae_acts_post. (An all-ones attention mask: transformer-lens would
    otherwise mask a literal pad token inside the prompt.)"""
    tokens = tokens_of(prompt, prepend_bos)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[SAES[key]], attention_mask=torch.ones_like(tokens))
    return cache[f"{hook_of(key)}.hook_sae_acts_post"][0].float()


def check_top(values, recorded, k, what):
    """Nothing outside the recorded top-k list is larger than its smallest entry (0 when fewer fired)."""
    rest = values.clone()
    rest[[f for f, _ in recorded]] = -float("inf")
    floor = recorded[-1][1] if len(recorded) == k else 0.0
    assert float(rest.max()) <= floor + ATOL + RTOL * abs(floor), f"{what}: a feature outside the recorded top {k}"


def decoder_in_resid(key, features):
    """W_dec rows as residual-stream directions (an SAE on hook_z goes through its layer's W_O)."""
    sae, hook = SAES[key], hook_of(key)
    w = sae.W_dec[features]
    if hook.endswith("hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.W_O[layer]  # [n_heads, d_head, d_model]
        return torch.einsum("nhd,hdm->nm", w.reshape(w.shape[0], *W_O.shape[:2]), W_O)
    return w
'''


def config_cell(data: SessionData) -> str:
    """The recorded setup as constants a person can edit (paths, device, tolerance)."""
    env, model = data.env, data.env.get("model", {})
    versions = env.get("versions", {})
    sources = {}
    for s in env.get("saes", []):
        if s.get("release"):
            sources[s["key"]] = {"release": s["release"], "sae_id": s["sae_id"]}
        else:
            sources[s["key"]] = {"folder": s["source"], "weights_id": s.get("weights_id")}
    dtype = model.get("dtype", "float32")
    loose = dtype != "float32"
    name = model.get("source") if model.get("source") not in (None, "official") else model.get("name")
    return "\n".join([
        f"# Recorded with sae-mcp {versions.get('sae-mcp')}: torch {versions.get('torch')}, transformer-lens "
        f"{versions.get('transformer-lens')}, sae-lens {versions.get('sae-lens')}, on {model.get('device')}.",
        f"MODEL = {lit(name)}  # a local Hugging Face folder, or an official transformer-lens name",
        f"PROCESSING = {lit(model.get('processing', {}), 13)}  # weight processing the SAEs were trained with",
        f"SAE_SOURCES = {lit(sources, 14)}",
        "CHECK_WEIGHTS = True  # stop if an SAE folder holds other weights than the recorded ones",
        f"DTYPE = {dtype!r}",
        "DEVICE = \"cuda\" if torch.cuda.is_available() else \"cpu\"" if str(model.get("device", "")).startswith("cuda")
        else f"DEVICE = {str(model.get('device', 'cpu'))!r}",
        "# Tolerance of every numeric check: |got - recorded| <= ATOL + RTOL * |recorded|. Recorded values are",
        "# rounded to 4-6 decimals; float32 on the recorded device reproduces them to ~1e-6. Ranks, token ids, L0 (up",
        "# to 1 feature at the threshold) and greedy generations are checked exactly.",
        f"ATOL, RTOL = {'2e-2, 2e-2' if loose else '1e-3, 1e-3'}",
    ])


def preamble(data: SessionData, tools: set[str], extra: dict[str, list[str]]) -> list[Cell]:
    """The setup cells, with the helper code of the tools the session used (extra: tool -> its helper blocks; a
    block two tools share is written once)."""
    blocks = dict.fromkeys(block for t in sorted(tools) if t in extra for block in extra[t])
    helpers = CHECKS + "".join("\n\n" + block for block in blocks)
    intro = (f"# Session {md_code(data.id)}, redone without sae-mcp\n\nEach cell below redoes one recorded run with "
             "plain transformer-lens + sae-lens, on the same model and SAE(s), and asserts that it gets the recorded "
             "numbers (tolerance in the setup cell). The agent's labels and the server's warnings are shown with "
             "the runs they cite." + (f"\n\nThe question: *{md_text(data.question)}*" if data.question else ""))
    return [("markdown", intro), ("code", IMPORTS), ("code", config_cell(data)), ("code", LOADING),
            ("code", helpers)]
