"""Shared fixtures: a generated tiny model + SAE (no files needed), and the real stories260K model with the two SAEs
and the corpus that the package bundles for `--demo` (sae_mcp/demo/), so nothing outside the repo is needed.

Everything is offline and CPU, one thread (a busy 2-core box stalls 50x with two).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# A server built without a data dir (Settings() defaults) must never write into the user's real one
# (~/.local/share/sae-mcp: the ledger, labels, indexes); subprocesses inherit this too.
if "SAE_MCP_DATA_DIR" not in os.environ:
    import tempfile

    os.environ["SAE_MCP_DATA_DIR"] = tempfile.mkdtemp(prefix="sae-mcp-tests-")

import pytest
import torch

from sae_mcp import demo
from sae_mcp.index.view import View
from sae_mcp.results.corpus import Example, FeatureSummary, Histogram, TopExamples

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
STORIES_HF = demo.MODEL_DIR
STORIES_CORPUS = demo.CORPUS
STORIES_SAE_L1, STORIES_SAE_L3 = demo.SAE_DIRS  # 1024 features each, at blocks.1 / blocks.3.hook_resid_pre
STORIES_HOOK = "blocks.3.hook_resid_pre"  # the hook of stories_sae_dir


def stories_texts(n: int | None = None) -> list[str]:
    texts = [json.loads(line)["text"] for line in STORIES_CORPUS.open(encoding="utf-8") if line.strip()]
    return texts[:n] if n else texts


def volatile(tool: str) -> tuple[str, ...]:
    """The result fields a registered tool's ledger rule leaves out of the digest (none for a name not registered)."""
    from sae_mcp.ledger.rule import rule_of
    from sae_mcp.server.tools import tool_map

    return rule_of(tool_map(), tool).volatile


def only_sae(engine):
    """The engine's one loaded SAE (a LoadedSAE)."""
    (s,) = engine.saes.values()
    return s


def tutorial_sae_acts(engine, tokens: torch.Tensor) -> torch.Tensor:
    """The SAE's feature activations the tutorial way, the independent reference for every engine path: splice
    the SAE in with run_with_cache_with_saes and read <hook>.hook_sae_acts_post. tokens [B, S] -> [B, S, d_sae]."""
    s = only_sae(engine)
    with torch.inference_mode():
        _, cache = engine.model.run_with_cache_with_saes(tokens, saes=[s.sae])
    engine.model.reset_saes()
    return cache[f"{s.hook_name}.hook_sae_acts_post"]


def assert_ranked_like(ids: list[int], ref: torch.Tensor, tol: float = 1e-4) -> None:
    """`ids` (a listing, largest first) are a top-len(ids) of `ref` [n] computed along another path: two float paths
    are never bit-equal across CPUs, so entries within `tol` of each other may trade places, and nothing else."""
    assert len(set(ids)) == len(ids), ids
    if not ids:
        return
    kth = float(ref.sort(descending=True).values[len(ids) - 1])
    vals = [float(ref[i]) for i in ids]
    assert all(v >= kth - tol for v in vals), (ids, vals, kth)  # none of them is below the k-th largest
    assert all(a >= b - tol for a, b in zip(vals, vals[1:])), (ids, vals)  # in order, up to near-ties


def assert_tables_close(a, b, tol: float = 1e-5) -> None:
    """Two next-token tables (lists of TokenProb) from two float paths: the same tokens with the same probabilities
    and logits up to `tol`, in the same order except where probabilities tie within it."""
    pa, pb = {t.token_id: t.probability for t in a}, {t.token_id: t.probability for t in b}
    assert pa.keys() == pb.keys(), (a, b)
    assert all(abs(pa[k] - pb[k]) <= tol for k in pa), (a, b)
    probs = [t.probability for t in a]
    assert all(x >= y - tol for x, y in zip(probs, probs[1:]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeIndex:
    """Stands in for the example source (services.examples) with its real result models: an index that exists,
    recording what was asked of it."""

    def __init__(self, key: str):
        self.key = key
        self.calls: list[str] = []

    def _summary(self, feature: int) -> dict:
        return dict(sae=self.key, feature=feature, max_activation=4.2, density=0.0123, n_fired=123,
                    tokens_scanned=10_000, histogram=Histogram(edges=[0.1, 1.0, 2.0, 4.2], counts=[100, 20, 3]))

    def feature_summary(self, sae, feature):
        self.calls.append("summary")
        return FeatureSummary(**self._summary(feature))

    def top_examples(self, sae, feature, view, *args, **kw):
        self.calls.append(f"top_examples k={view.k}")
        ex = Example(activation=4.2, token=" cat", tokens=["<s>", "the", " cat", " sat", " on"], position=2, document=0,
                     offset=1)
        return TopExamples(**self._summary(feature), source="index", corpus="fake", context_size=8, examples=[ex])

    def cached_top_examples(self, sae, feature, k=10, **kw):
        self.calls.append(f"cached_top_examples k={k}")
        return self.top_examples(sae, feature, View(k, 10))

    def densities(self, sae):
        self.calls.append("densities")
        return torch.linspace(0, 0.5, 128)

    def max_activation(self, sae, feature, max_scan_tokens=None):
        self.calls.append(f"max_activation {feature}")
        return 4.2, "index"


@pytest.fixture
def lexical_only(monkeypatch):
    """Explanation search ranks lexically: the optional MiniLM model is never loaded by accident."""
    monkeypatch.setenv("SAE_MCP_SEMANTIC", "0")


# ------------------------------------------------------------------------------------------ generated tiny


def _make_tiny_tokenizer(folder: Path):
    """A word-level tokenizer over a small vocabulary, saved and reloaded (transformer-lens reloads by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = (
        "the a cat dog sat on mat ran to park Lily Tom ball red big little girl boy saw played happy sad "
        "and was is in of one day she he it they with . , ! ? 0 1 2 3 4 5 6 7 8 9"
    ).split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    """A 2-layer random-weight transformer with a real tokenizer, as a LoadedModel."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from sae_mcp.engine.loading import LoadedModel

    tok = _make_tiny_tokenizer(tiny_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tok),
        act_fn="gelu_new", normalization_type="LN", device="cpu", seed=0,
    )
    model = HookedSAETransformer(cfg, tokenizer=tok)
    model.eval()
    return LoadedModel(model=model, name="tiny", source=str(tiny_dir), architecture="generated")


def make_sae_folder(folder: Path, d_in: int, d_sae: int, hook_name: str, kind: str = "standard", seed: int = 0) -> Path:
    """A random SAE saved as a real SAELens folder (cfg.json + sae_weights.safetensors)."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook_name, model_name="tiny", context_size=32, prepend_bos=True)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        # Random init leaves b_enc at 0 and W_enc = W_dec.T; a small positive bias makes more features fire.
        sae.b_enc.add_(0.05)
    sae.save_model(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_dir) -> Path:
    return make_sae_folder(tiny_dir / "sae_l1", 32, 128, "blocks.1.hook_resid_pre")


def engine_on(loaded, *sae_folders: Path, **engine_kwargs):
    """An Engine over a loaded model and the SAE folders, each checked against the model, as a server loads them."""
    from sae_mcp.engine.loading import check_compatible
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.engine.saes import load_sae

    saes = [load_sae(str(folder), "cpu", torch.float32) for folder in sae_folders]
    for s in saes:
        check_compatible(loaded, s)
    return Engine(loaded, saes, "cpu", **engine_kwargs)


@pytest.fixture(scope="session")
def tiny_engine(tiny_loaded, tiny_sae_dir):
    return engine_on(tiny_loaded, tiny_sae_dir)


# ----------------------------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="session")
def stories_loaded():
    from sae_mcp.engine.loading import load_model

    return load_model(str(STORIES_HF), "cpu", torch.float32)


@pytest.fixture(scope="session")
def stories_sae_dir() -> Path:
    """The bundled layer-3 SAE (1024 features at blocks.3.hook_resid_pre), trained by `sae-mcp train-sae`."""
    return STORIES_SAE_L3


@pytest.fixture(scope="session")
def trained_sae_dir(stories_loaded, tmp_path_factory) -> Path:
    """A standard SAE trained in this session on the real model by sae-lens' runner (~20 s, 300k tokens)."""
    from sae_mcp.engine.corpus import resolve_corpus
    from sae_mcp.engine.training import train_sae

    out = tmp_path_factory.mktemp("stories_sae")
    return train_sae(
        stories_loaded.model, resolve_corpus(str(STORIES_CORPUS)), hook_name=STORIES_HOOK, out_dir=out, d_sae=256,
        training_tokens=300_000, context_size=128, model_name="stories260K",
        dataset_path=str(STORIES_CORPUS), model_processing=stories_loaded.processing,
    )


@pytest.fixture(scope="session")
def stories_engine(stories_loaded, stories_sae_dir):
    return engine_on(stories_loaded, stories_sae_dir)


# ------------------------------------------------------------------------------------------------ MCP servers


@pytest.fixture(scope="module")
def tiny_server(tiny_engine, tmp_path_factory):
    """The MCP server over the tiny engine (no corpus), its stores in a temporary data dir of the module's own."""
    from sae_mcp.server.app import build_server
    from sae_mcp.settings import Settings

    return build_server(tiny_engine, Settings(data_dir=tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture
def stories_settings(stories_sae_dir, tmp_path):
    """Settings of a server over stories260K and its TinyStories corpus, stores in this test's tmp_path."""
    from sae_mcp.settings import Settings

    return Settings(model=str(STORIES_HF), saes=(str(stories_sae_dir),), corpus=str(STORIES_CORPUS), data_dir=tmp_path)


@pytest.fixture
def stories_server(stories_engine, stories_settings):
    from sae_mcp.server.app import build_server

    return build_server(stories_engine, stories_settings)


def indexed_stories_services(engine, sae_dir: Path, data_dir: Path, tokens: int = 30_000):
    """Services over stories260K whose corpus is indexed (`tokens` of it, ~2 s), stores in `data_dir`: what the
    feature pages show from."""
    from sae_mcp.server.tools import tool_map
    from sae_mcp.services import Services
    from sae_mcp.settings import Settings

    settings = Settings(model=str(STORIES_HF), saes=(str(sae_dir),), corpus=str(STORIES_CORPUS), data_dir=data_dir)
    services = Services(engine, settings, tools=tool_map())
    services.examples.build_index(None, tokens)
    return services
