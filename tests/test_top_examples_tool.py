"""The top_examples tool through the in-memory MCP client: structured examples, the PNG histogram, progress
notifications during an on-demand scan, and bad inputs as isError results after which the server still works."""

from __future__ import annotations

import base64

import pytest

from sae_mcp.index.source import ExampleSource
from sae_mcp.server.app import build_server
from sae_mcp.settings import Settings

from helpers.servers import stories_settings_at
from mcp_client import call_many, cancel_after_first_progress, error_text, text_of, tools_by_name


@pytest.fixture
def server(stories_server):
    return stories_server


def test_top_examples_scans_on_demand_reports_progress_and_plots(server):
    seen = []

    async def progress(done, total, message):
        seen.append((done, total))

    (res,) = call_many(server, [("top_examples", {"feature": 7, "k": 3, "context": 5, "max_scan_tokens": 8000,
                                                  "plot": True})], progress=progress)
    assert not res.is_error, text_of(res)
    out = res.structured_content
    assert out["source"] == "scan" and out["feature"] == 7 and out["tokens_scanned"] >= 8000
    assert len(out["examples"]) == min(3, out["n_fired"]) and out["n_fired"] > 0  # exactly k when it fired k times
    acts = [e["activation"] for e in out["examples"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == out["max_activation"]
    for e in out["examples"]:
        assert 0 <= e["position"] < len(e["tokens"]) <= 11 and e["offset"] >= 0 and e["document"] >= 0
    assert 0 < out["density"] < 1 and sum(out["histogram"]["counts"]) == out["n_fired"]
    assert len(out["histogram"]["edges"]) == len(out["histogram"]["counts"]) + 1 <= 17
    images = [c for c in res.content if getattr(c, "type", "") == "image"]
    assert len(images) == 1 and base64.b64decode(images[0].data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen and seen[-1][1] == 8000 and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_inputs_are_errors_that_say_what_to_change_and_the_next_call_works(server):
    r_range, r_k, r_ctx, ok = call_many(server, [
        ("top_examples", {"feature": 1024, "max_scan_tokens": 2000}),
        ("top_examples", {"feature": 1, "k": 51}),
        ("top_examples", {"feature": 1, "context": -1}),
        ("top_examples", {"feature": 1, "k": 2, "max_scan_tokens": 2000}),
    ])
    assert "less than or equal to 1023" in error_text(r_range)
    assert "less than or equal to 50" in error_text(r_k)
    assert "greater than or equal to 0" in error_text(r_ctx)
    assert not ok.is_error and ok.structured_content["source"] == "scan"


def test_missing_corpus_file_is_an_error_and_the_server_keeps_working(stories_engine, stories_sae_dir, tmp_path):
    st = stories_settings_at(tmp_path, stories_sae_dir, corpus=str(tmp_path / "missing.jsonl"))
    srv = build_server(stories_engine, st)
    bad, info = call_many(srv, [("top_examples", {"feature": 3}), ("model_info", {})])
    assert "missing.jsonl does not exist" in error_text(bad) and "--corpus" in error_text(bad)
    assert not info.is_error


def test_top_examples_answers_from_the_index_when_built(stories_engine, stories_settings):
    ExampleSource(stories_engine, stories_settings).build_index(None, 4000)  # e.g. `sae-mcp index`, beforehand
    (res,) = call_many(build_server(stories_engine, stories_settings), [("top_examples", {"feature": 9, "k": 2})])
    assert not res.is_error and res.structured_content["source"] == "index"
    assert res.structured_content["tokens_scanned"] >= 4000


def test_top_examples_is_annotated_as_a_cache_write_that_may_stream_a_dataset(tiny_engine, tmp_path):
    """It writes scan rows to the index (not read-only, but idempotent) and reaches out only for a hub corpus."""
    local = tmp_path / "c.txt"
    local.write_text("the cat sat\n", encoding="utf-8")

    for corpus, remote in ((str(local), False), ("roneneldan/TinyStories", True), (None, True)):
        server = build_server(tiny_engine, Settings(corpus=corpus, data_dir=tmp_path))
        ann = tools_by_name(server)["top_examples"].annotations
        assert ann.read_only_hint is False and ann.destructive_hint is False and ann.idempotent_hint is True
        assert ann.open_world_hint is remote, corpus


def test_a_client_cancel_stops_an_on_demand_scan_between_batches(server, stories_engine, monkeypatch):
    """The SDK cancels the handler's scope but the worker thread runs on; the scan must notice and stop."""
    import time

    batches = []
    real = stories_engine.forward_to_hook

    def slow_forward(tokens, sae):
        batches.append(tokens.shape[0])
        time.sleep(0.05)
        return real(tokens, sae)

    monkeypatch.setattr(stories_engine, "forward_to_hook", slow_forward)

    after = cancel_after_first_progress(server, "top_examples", {"feature": 3, "max_scan_tokens": 300_000},
                                        then=("model_info", {}))
    assert not after.is_error
    time.sleep(0.5)  # let the worker thread reach its next batch boundary
    n = len(batches)
    assert n < 15, f"the scan ran {n} batches (of ~36) after the client cancelled"
    assert stories_engine.is_clean()


def test_each_example_names_its_max_token_and_the_schema_calls_the_histogram_bins(server):
    tool = tools_by_name(server)["top_examples"]
    (res,) = call_many(server, [("top_examples", {"feature": 5, "k": 4, "context": 3, "max_scan_tokens": 3000})])
    assert not res.is_error, text_of(res)
    out = res.structured_content
    assert out["examples"] and all(e["token"] == e["tokens"][e["position"]] for e in out["examples"])
    assert out["compute_dtype"] == "float32"  # a CPU scan computes as loaded
    hist = tool.output_schema["$defs"]["Histogram"]["properties"]
    assert "[edges[i], edges[i+1])" in hist["counts"]["description"]
    assert "len(counts) + 1" in hist["edges"]["description"]


def test_build_index_tool_indexes_every_feature_reports_progress_and_then_top_examples_reads_it(server, stories_engine):
    seen = []

    async def progress(done, total, message):
        seen.append((done, total))

    built, again, ex, bad = call_many(server, [
        ("build_index", {"tokens": 20_000}),
        ("build_index", {"tokens": 20_000}),
        ("top_examples", {"feature": 5, "k": 3}),
        ("build_index", {"tokens": 10_000_000}),
    ], progress=progress)
    assert not built.is_error, text_of(built)
    report = built.structured_content
    assert report["tokens_scanned"] >= 20_000 and report["reused"] is False
    assert again.structured_content["reused"] is True  # same budget: nothing scanned again
    assert ex.structured_content["source"] == "index"
    assert ex.structured_content["tokens_scanned"] == report["tokens_scanned"]
    assert seen and all(total == 20_000 for _, total in seen)
    assert "less than or equal to 2000000" in error_text(bad)


def test_intervals_through_mcp_give_bands_by_quantile_with_sampled_examples(server):
    (plain, res, bad_n, bad_per) = call_many(server, [
        ("top_examples", {"feature": 7, "k": 3, "max_scan_tokens": 8000}),
        ("top_examples", {"feature": 7, "k": 3, "intervals": 4, "per_interval": 2, "max_scan_tokens": 8000}),
        ("top_examples", {"feature": 7, "intervals": 9}),
        ("top_examples", {"feature": 7, "intervals": 2, "per_interval": 5}),
    ])
    assert plain.structured_content["intervals"] is None and "band [" not in text_of(plain)  # default: as before
    assert not res.is_error, text_of(res)
    out = res.structured_content
    assert out["examples"] == plain.structured_content["examples"]
    bands = out["intervals"]
    assert 1 <= len(bands) <= 4 and text_of(res).count("band [") == len(bands)
    assert sum(b["tokens"] for b in bands) == out["n_fired"]  # the bands span every firing token
    assert bands[0]["upper"] == out["max_activation"] and bands[0]["quantiles"][1] == 1.0
    assert bands[-1]["quantiles"][0] == 0.0
    for hi, lo in zip(bands, bands[1:]):  # highest first, adjacent
        assert lo["upper"] == hi["lower"] and lo["quantiles"][1] == hi["quantiles"][0]
    for b in bands:
        assert 1 <= len(b["examples"]) <= 2
        for e in b["examples"]:
            assert b["lower"] <= e["activation"] <= b["upper"] and e["token"] == e["tokens"][e["position"]]
    assert "less than or equal to 8" in error_text(bad_n) and "less than or equal to 4" in error_text(bad_per)


def test_an_index_from_before_interval_samples_answers_through_mcp_with_a_warning(stories_engine, stories_settings):
    from helpers.index import make_format_1

    first = ExampleSource(stories_engine, stories_settings)
    path = first.build_index(None, 3000).path
    first.index_store(stories_engine.sae(None)).close()
    make_format_1(path)
    (res,) = call_many(build_server(stories_engine, stories_settings), [("top_examples", {"feature": 9,
                                                                                          "intervals": 3})])
    assert not res.is_error and res.structured_content["source"] == "index"
    assert res.structured_content["examples"] and res.structured_content["intervals"] is None
    (warning,) = res.structured_content["warnings"]
    assert "build_index" in warning and warning in text_of(res)
