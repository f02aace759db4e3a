"""The bundled demo: the wheel carries it, `--demo` loads exactly it offline and indexes its corpus on first use, and
its SAEs are trained SAEs (not random weights) with the fidelity their sources note states.

CI installs the package in editable mode, which reads the demo from the source tree and would hide package data
missing from a wheel, so the wheel is built here from a copy of the tracked files and opened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sae_mcp import demo

from helpers.models import REPO, STORIES_CORPUS, only_sae

DEMO_FILES = [
    "stories260K/config.json", "stories260K/model.safetensors", "stories260K/tokenizer.json",
    "stories260K/tokenizer_config.json", "stories260K/generation_config.json", "stories260K/LICENSE-llama2.c-MIT.txt",
    "stories260K/LICENSE-llama2.zig-MIT.txt", "corpus/tinystories.jsonl", "corpus/LICENSE-TinyStories.md",
    "saes/blocks.1.hook_resid_pre/cfg.json", "saes/blocks.1.hook_resid_pre/sae_weights.safetensors",
    "saes/blocks.3.hook_resid_pre/cfg.json", "saes/blocks.3.hook_resid_pre/sae_weights.safetensors", "SOURCES.md",
]


def _source_files() -> list[str]:
    """What a clean checkout holds: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and (REPO / line).is_file()]


def test_the_built_wheel_carries_the_demo_model_saes_corpus_and_their_licenses(tmp_path):
    src = tmp_path / "src"
    for name in _source_files():
        if name.startswith(("sae_mcp/", "prompts/")) or name in ("pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("sae_mcp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in DEMO_FILES if f"sae_mcp/demo/{f}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    # Every module of the package, in every folder (a folder left out of pyproject's packages installs nothing)
    modules = [str(p.relative_to(REPO)) for p in (REPO / "sae_mcp").rglob("*.py")]
    assert len(modules) > 100 and [m for m in modules if m not in names] == []
    for f in ("model.safetensors", "sae_weights.safetensors"):  # whole files, not LFS pointers or truncations
        local = next(p for p in demo.HERE.rglob(f))
        inside = zipfile.ZipFile(wheel).getinfo(f"sae_mcp/demo/{local.relative_to(demo.HERE)}")
        assert inside.file_size == local.stat().st_size > 100_000


def test_every_demo_file_is_present_in_this_installation():
    assert demo.missing() == []
    assert all((demo.HERE / f).is_file() for f in DEMO_FILES)


def _cli(*args: str, cwd: Path, data: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sae_mcp", *args, "--data-dir", str(data)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_call_demo_answers_offline_from_any_folder_and_indexes_the_corpus_once(tmp_path):
    """From a folder with nothing in it: the first call indexes the bundled corpus for both SAEs (stderr says so),
    then top_examples answers from that index; a second call reuses it."""
    data = tmp_path / "data"
    acts = _cli("call", "get_feature_acts", "--demo", "--no-ledger", "--json",
                json.dumps({"prompt": "Once upon a time", "sae": "blocks.1.hook_resid_pre", "top_k": 3}),
                cwd=tmp_path, data=data)
    assert acts.returncode == 0, acts.stderr[-2000:]
    assert json.loads(acts.stdout)["tokens"] == ["<s>", " Once", " upon", " a", " time"]
    assert acts.stderr.count("demo: indexed 384,448 corpus tokens") == 2  # both SAEs, the whole corpus
    top = _cli("call", "top_examples", "--demo", "--no-ledger", "--json",
               json.dumps({"feature": 7, "sae": "blocks.3.hook_resid_pre", "k": 2}), cwd=tmp_path, data=data)
    assert top.returncode == 0, top.stderr[-2000:]
    out = json.loads(top.stdout)
    assert out["source"] == "index" and out["tokens_scanned"] == 384_448
    assert "demo: indexed" not in top.stderr  # reused


def test_demo_beside_model_sae_or_corpus_is_refused_with_what_to_drop(tmp_path):
    for flag, value in (("--model", "gpt2-small"), ("--sae", "x/y"), ("--corpus", str(STORIES_CORPUS))):
        res = _cli("call", "model_info", "--demo", flag, value, cwd=tmp_path, data=tmp_path / "d", timeout=120)
        assert res.returncode == 2
        assert f"drop {flag}, or drop --demo" in res.stderr


def test_doctor_demo_names_the_bundled_files(tmp_path):
    res = _cli("doctor", "--demo", cwd=tmp_path, data=tmp_path / "d", timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{demo.MODEL_DIR}: local folder" in res.stdout
    assert all(f"{d}: local folder" in res.stdout for d in demo.SAE_DIRS)


@pytest.fixture(scope="module")
def demo_engine(stories_loaded):
    from helpers.models import engine_on

    return engine_on(stories_loaded, *demo.SAE_DIRS)


def test_the_demo_saes_are_trained_and_reconstruct_held_out_stories(demo_engine):
    """Each SAE at its own hook, 1024 features, recording the public dataset; on stories it never saw in training
    (documents 900 on) it explains >= 0.85 of the variance with a handful of features per token: the plain
    computation (encode, decode, variance) written here."""
    from sae_mcp.engine.corpus import iter_windows, resolve_corpus

    assert [s.hook_name for s in demo_engine.saes.values()] == ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"]
    rows = [w.ids for w in iter_windows(resolve_corpus(str(STORIES_CORPUS)), demo_engine.corpus_tokenizer, 128, 1)
            if w.document >= 900 and len(w.ids) == 128][:32]
    tokens = torch.tensor(rows)
    for s in demo_engine.saes.values():
        assert s.d_sae == 1024 and s.dataset_path == "roneneldan/TinyStories" and s.context_size == 128
        with torch.inference_mode():
            _, cache = demo_engine.model.run_with_cache(tokens, names_filter=[s.hook_name])
            x = cache[s.hook_name][:, 1:].flatten(0, 1)  # [N, 64], BOS left out
            acts = s.sae.encode(x)
            ev = 1 - (x - s.sae.decode(acts)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        l0 = float((acts > 0).sum(-1).float().mean())
        assert float(ev) > 0.85 and 2 < l0 < 30, (s.key, float(ev), l0)


def test_stories_sae_fixture_is_the_bundled_layer_3_sae(stories_engine):
    assert only_sae(stories_engine).source == str(demo.SAE_DIRS[1])


def test_nothing_in_the_repo_refers_to_files_beside_it():
    """The repo stands alone: no path into a folder beside the checkout (the demo bundles what tests need)."""
    needles = ("../" + "shared", "SAE_MCP_" + "SHARED", "parents[1] / " + '"shared"', 'parent / "' + 'shared"')
    hits = []
    for name in _source_files():
        path = REPO / name
        if path.suffix in (".safetensors", ".png") or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{name}: {n}" for n in needles if n in text]
    assert not hits
