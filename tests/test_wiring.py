"""build_server's explicit wiring: one set of services, constructed once and handed to every tool module, so a
stand-in injected through the constructor is what every tool reads (no module keeps a source of its own)."""

from __future__ import annotations

from sae_mcp.server.app import build_server

from helpers.models import only_sae
from helpers.servers import FakeIndex, server_at, services_at
from mcp_client import call_many

PROMPT = "the cat sat on the mat and the dog"


def test_every_tool_reads_the_one_injected_example_source(tiny_engine, tmp_path):
    fake = FakeIndex(only_sae(tiny_engine).key)
    services = services_at(tiny_engine, tmp_path, examples=fake)
    server = build_server(tiny_engine, services=services)
    top, card, stats, steer = call_many(server, [
        ("top_examples", {"feature": 3, "k": 1}),
        ("feature_card", {"feature": 4, "examples": 1}),
        ("feature_stats", {"sort_by": "density", "top": 1}),
        ("steer_generate", {"prompt": PROMPT, "features": [{"feature": 5, "strength": 1.0}], "max_new_tokens": 1}),
    ])
    assert [r.is_error for r in (top, card, stats, steer)] == [False] * 4
    assert top.structured_content["corpus"] == "fake"
    assert "max activation 4.2" in card.structured_content["markdown"]
    assert stats.structured_content["densities"] == "indexed"
    assert steer.structured_content["features"][0]["max_activation"] == 4.2
    assert fake.calls == ["top_examples k=1", "summary", "top_examples k=1", "densities", "max_activation 5"]


def test_a_server_built_without_services_builds_its_own_from_the_settings(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path / "data")
    (lab,) = call_many(server, [("label_feature", {"feature": 2, "label": "cats"})])
    assert not lab.is_error
    assert list((tmp_path / "data" / "explanations").glob("*/explanations.sqlite"))  # the settings' data dir
