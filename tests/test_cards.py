"""Feature cards (resource, tool, HTML), feature_stats / token_set_enrichment tools, and the MCP prompts."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp import Client

from sae_mcp.cards import text as card_text
from sae_mcp.cards.data import NOT_INDEXED
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.pages import routes as pages
from sae_mcp.server.app import build_server
from sae_mcp.server.prompts import load_prompts
from sae_mcp.server.tools import tool_map
from sae_mcp.services import Services
from sae_mcp.settings import Settings

from helpers.models import only_sae
from helpers.servers import FakeIndex, server_at, services_at
from mcp_client import call_many, error_text, read_resource

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("lexical_only")


def test_resource_template_matches_a_dotted_hook_name(tiny_engine, tmp_path):
    s = only_sae(tiny_engine)
    assert "." in s.key  # blocks.1.hook_resid_pre
    res = read_resource(server_at(tiny_engine, tmp_path), f"feature://{s.key}/5")
    text = res.contents[0].text
    assert res.contents[0].mime_type == "text/markdown"
    assert text.startswith(f"# Feature 5 · {s.key}")
    assert "not indexed: call build_index" in text
    assert "promotes:" in text and "kurtosis" in text


def test_card_holds_labels_imports_logit_lens_and_moments(tiny_engine, tmp_path):
    from sae_mcp.engine import logits as lg

    s = only_sae(tiny_engine)
    services = services_at(tiny_engine, tmp_path)
    services.explanations.import_rows(s.store_key, [(9, "imported: about dogs", "gpt-4o-mini")], "neuronpedia")
    services.explanations.add_label(s.store_key, 9, "dog and cat words", evidence="get_feature_acts on 'the dog'")
    md = card_text.card_markdown(services, 9, s.key, n_tokens=3)
    assert '- label: "dog and cat words" (evidence: "get_feature_acts on \'the dog\'")' in md
    assert '- "imported: about dogs" (neuronpedia, gpt-4o-mini)' in md
    proj = lg.project_to_vocab(tiny_engine, 9, top_k=3)
    assert "promotes: " + ", ".join(f"{t.token!r} {t.logit:.3g}" for t in proj.top_positive) in md
    full = (s.sae.W_dec[9].detach().float() @ tiny_engine.model.W_U.detach().float())
    assert f"mean {full.mean().item():.3g}" in md


def test_card_uses_the_index_when_built_and_marks_the_firing_token(tiny_engine, tmp_path):
    s = only_sae(tiny_engine)
    fake = FakeIndex(s.key)
    services = services_at(tiny_engine, tmp_path, examples=fake)
    md = card_text.card_markdown(services, 3, s.key, n_examples=4)
    assert "density 0.0123 · of 10,000 tokens · max activation 4.2" in md
    assert "histogram `█▂▁` (0.1 .. 4.2)" in md
    assert "1. 4.2: <s>the« cat» sat on" in md
    assert fake.calls == ["summary", "top_examples k=4"]  # index reads only, no scan
    html = pages.feature_page(services, 3, s.key)  # the person's page of the same card
    assert "<span class='t max' style='background:rgba(255,140,0,1.000)' data-act='4.2'" in html
    assert "id='histogram'" in html


def test_card_never_scans_when_the_index_has_no_summary(tiny_engine, tmp_path):
    class Empty(FakeIndex):
        def feature_summary(self, sae, feature):
            return None

        def cached_top_examples(self, *a, **k):
            return None

        def top_examples(self, *a, **k):  # pragma: no cover - must not be called
            raise AssertionError("a card must not start a scan")

    services = services_at(tiny_engine, tmp_path, examples=Empty(only_sae(tiny_engine).key))
    assert NOT_INDEXED in card_text.card_markdown(services, 3)


def test_card_shows_a_cached_on_demand_scan_instead_of_not_indexed(tiny_engine, tiny_sae_dir, tmp_path, monkeypatch):
    """top_examples already scanned feature 4 (no index): its card shows that scan and says it is one; a feature
    never scanned still says not indexed; and the card itself never scans."""
    from sae_mcp.index.source import DEFAULT_CONTEXT, ExampleSource
    from sae_mcp.index.view import View

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and Lily saw it", "Tom ran to the park with a red ball"] * 10)
                      + "\n", encoding="utf-8")
    st = Settings(model="tiny", saes=(str(tiny_sae_dir),), corpus=str(corpus), data_dir=tmp_path / "d")
    src = ExampleSource(tiny_engine, st)
    scanned = src.top_examples(None, 4, View(3, DEFAULT_CONTEXT), max_scan_tokens=120)
    assert scanned.source == "scan" and scanned.examples
    monkeypatch.setattr(src, "_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a card must not scan")))
    services = Services(tiny_engine, st, tools=tool_map(), examples=src)
    md = card_text.card_markdown(services, 4, n_examples=2)
    assert NOT_INDEXED not in md
    assert f"from an on-demand top_examples scan of this feature over {scanned.tokens_scanned:,} tokens" in md
    assert f"density {scanned.density:.3g} · of {scanned.tokens_scanned:,} tokens · max activation " \
           f"{scanned.max_activation:.3g} · computed in float32" in md
    ex = scanned.examples[0]
    assert f"1. {ex.activation:.3g}: " in md and f"«{ex.token}»" in md and "\n3. " not in md
    assert "on-demand" in pages.feature_page(services, 4)
    assert NOT_INDEXED in card_text.card_markdown(services, 5)


def test_card_moments_read_as_feature_stats_reports_them(tiny_engine, tmp_path, monkeypatch):
    """A mean-centred unembedding makes the mean float noise (e.g. -1.3e-08): the card rounds it as feature_stats
    does (0.0), instead of printing the noise."""
    from sae_mcp.engine import stats

    real = stats.logit_weights
    # Centred, plus the float noise a centred W_U leaves on real models (stories260K's card read mean -1.3e-08).
    monkeypatch.setattr(stats, "logit_weights",
                        lambda e, sae, idx: real(e, sae, idx) - real(e, sae, idx).mean(1, keepdim=True) - 1.3e-8)
    md = card_text.card_markdown(services_at(tiny_engine, tmp_path), 9)
    (f,) = LogitWeightStats(tiny_engine).feature_stats(features=[9]).features
    assert f.mean == 0.0
    assert (
        f"logit weights: mean {f.mean:.3g}, std {f.std:.3g}, skewness {f.skewness:.3g}, kurtosis {f.kurtosis:.3g}"
        in md
    )
    assert "logit weights: mean 0," in md


def test_an_index_read_failure_shows_on_that_card_and_the_next_card_reads_the_index(tiny_engine, tmp_path):
    """One failure to read the corpus index (a locked file, say) must not break the card, nor leave later cards
    'not indexed' until a restart: that card says why, the next reads the index again."""

    class Flaky(FakeIndex):
        def __init__(self, key):
            super().__init__(key)
            self.failures = [RuntimeError("index file locked")]

        def feature_summary(self, sae, feature):
            if self.failures:
                raise self.failures.pop()
            return super().feature_summary(sae, feature)

    services = services_at(tiny_engine, tmp_path, examples=Flaky(only_sae(tiny_engine).key))
    first = card_text.card_markdown(services, 3)
    assert "index unavailable (RuntimeError: index file locked)" in first and "promotes:" in first
    second = card_text.card_markdown(services, 3)
    assert "density 0.0123 · of 10,000 tokens · max activation 4.2" in second


def test_feature_card_tool_and_bad_inputs(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)

    async def go():
        async with Client(server) as c:
            ok = await c.call_tool("feature_card", {"feature": 4})
            bad = await c.call_tool("feature_card", {"feature": 128})
            errors = []
            for uri in ("feature://nope/5", f"feature://{only_sae(tiny_engine).key}/500", f"feature://{only_sae(tiny_engine).key}/x"):
                try:
                    await c.read_resource(uri)
                    errors.append(None)
                except Exception as exc:
                    errors.append(str(exc))
            again = await c.read_resource(f"feature://{only_sae(tiny_engine).key}/4")
            return ok, bad, errors, again

    ok, bad, errors, again = anyio.run(go)
    assert ok.structured_content["uri"] == f"feature://{only_sae(tiny_engine).key}/4"
    assert ok.structured_content["markdown"].startswith("# Feature 4")
    assert bad.is_error and "less than or equal to 127" in bad.content[0].text
    assert "unknown SAE 'nope'" in errors[0]
    assert "out of range" in errors[1]
    assert "not an integer" in errors[2]
    assert again.contents[0].text == ok.structured_content["markdown"]


def test_stats_tools_through_the_client(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    kurt, dens, pets, builtin, bad_set, too_many = call_many(server, [
        ("feature_stats", {"sort_by": "kurtosis", "top": 3}),
        ("feature_stats", {"sort_by": "density"}),
        ("token_set_enrichment", {"token_sets": {"pets": ["cat", "dog"]}, "top": 2}),
        ("token_set_enrichment", {"top": 1}),
        ("token_set_enrichment", {"sets": ["nope"]}),
        ("feature_stats", {"top": 1000}),
    ])
    rows = kurt.structured_content["features"]
    assert len(rows) == 3 and rows[0]["kurtosis"] >= rows[1]["kurtosis"] >= rows[2]["kurtosis"]
    assert "sae-mcp index" in error_text(dens)
    (pet,) = pets.structured_content["sets"]
    assert pet["name"] == "pets" and pet["size"] == 2 and len(pet["promoted"]) <= 2
    assert all(e["score"] > 0 for e in pet["promoted"])
    assert {s["name"] for s in builtin.structured_content["sets"]} >= {"all_digits", "capitalised", "punctuation"}
    assert "starts_with_space" in builtin.structured_content["skipped"]  # a word-level vocabulary has none
    assert "built-in sets" in error_text(bad_set)
    assert too_many.is_error  # top is bounded by the schema


def test_feature_stats_uses_index_densities(tiny_engine, tmp_path):
    server = build_server(tiny_engine, services=services_at(tiny_engine, tmp_path, examples=FakeIndex("k")))
    (res,) = call_many(server, [("feature_stats", {"sort_by": "density", "top": 2, "max_density": 0.25})])
    out = res.structured_content
    assert [f["feature"] for f in out["features"]] == [63, 62]  # linspace(0, .5, 128): 63 is the last <= 0.25
    assert out["densities"] == "indexed"


def test_feature_stats_of_given_densities(tiny_engine):
    dens = FakeIndex("k").densities(None)
    out = LogitWeightStats(tiny_engine).feature_stats(sort_by="density", top=2, densities=dens, max_density=0.25)
    assert [f.feature for f in out.features] == [63, 62]  # linspace(0, .5, 128): 63 is the last <= 0.25
    assert out.densities == "indexed"


def test_prompts_are_served_with_their_arguments(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)

    async def go():
        async with Client(server) as c:
            listed = (await c.list_prompts()).prompts
            got = await c.get_prompt("investigate_feature", {"feature": "42", "sae": "blocks.1.hook_resid_pre"})
            pred = await c.get_prompt("explain_prediction", {"prompt": "The capital of France is"})
            paris = await c.get_prompt("explain_prediction", {"prompt": "The capital of France is", "answer": " Paris"})
            return listed, got, pred, paris

    listed, got, pred, paris = anyio.run(go)
    by = {p.name: p for p in listed}
    assert set(by) == {"investigate_feature", "find_concept_features", "explain_prediction", "steering_study",
                       "score_my_explanations"}
    assert [(a.name, a.required) for a in by["investigate_feature"].arguments] == [("feature", True), ("sae", False)]
    text = got.messages[0].content.text
    assert "Investigate feature 42 (SAE: blocks.1.hook_resid_pre" in text
    for name in ("top_examples", "project_to_vocab", "get_feature_acts", "ablate_and_test", "label_feature"):
        assert name in text
    assert "The capital of France is" in pred.messages[0].content.text
    assert "{" + "answer}" not in pred.messages[0].content.text  # optional argument left out: placeholder filled
    assert "answer (if given): ` Paris`" in paris.messages[0].content.text  # its leading space stays visible


def test_each_recipe_names_the_tools_it_relies_on():
    recipes = {p.name: p for p in load_prompts()}
    needs = {
        "investigate_feature": ["top_examples", "project_to_vocab", "label_feature", "ablate_and_test",
                                "score_explanation"],
        "score_my_explanations": ["score_explanation", "submit_predictions", "label_feature", "feature_card"],
        "find_concept_features": ["search_explanations", "compare_prompts", "attribute"],
        "explain_prediction": ["next_token", "attribute", "ablate_and_test"],
        "steering_study": ["steer_generate", "get_feature_acts", "next_token"],
    }
    for name, tools in needs.items():
        body = recipes[name].fn(**{a.name: "X" for a in recipes[name].arguments})
        for t in tools:
            assert f"`{t}`" in body, (name, t)


def test_the_served_recipes_are_the_top_level_prompts_folder_itself():
    """prompts/ is the only copy: the installed package sae_mcp.prompts reads those very files (no hand copies)."""
    from sae_mcp.server.prompts import recipe_files

    top = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "prompts").glob("*.md")}
    served = {f.name: f.read_text(encoding="utf-8") for f in recipe_files()}
    assert top and served == top
    assert {p.name for p in load_prompts()} == {name.removesuffix(".md") for name in top}


def test_mcp_http_app_serves_the_card_page_next_to_mcp(tiny_engine, tmp_path):
    """Over streamable HTTP the same server also answers /features/{sae}/{feature} with the HTML card."""
    from starlette.testclient import TestClient

    server = server_at(tiny_engine, tmp_path)
    client = TestClient(server.streamable_http_app())
    key = only_sae(tiny_engine).key
    page = client.get(f"/features/{key}/2")
    assert page.status_code == 200 and f"Feature 2 · {key}" in page.text
    assert client.get(f"/features/{key}/999").status_code == 404


def test_card_of_an_sae_off_the_residual_stream_says_why_there_is_no_logit_lens(tiny_loaded, tmp_path):
    """An SAE on hook_mlp_out's neighbour blocks.0.mlp.hook_post (width d_mlp) has no direct logit lens."""

    from helpers.models import engine_on, make_sae_folder

    folder = make_sae_folder(tmp_path / "mlp_sae", 64, 16, "blocks.0.mlp.hook_post")
    engine = engine_on(tiny_loaded, folder)
    md = card_text.card_markdown(services_at(engine, tmp_path), 2)
    assert "no logit lens:" in md and "residual stream" in md
