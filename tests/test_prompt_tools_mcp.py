"""Every prompt-level tool through the SDK's in-memory client: schemas with bounds, structured results, and
bad input answered with isError + a message that says what to change, after which the next call works."""

from __future__ import annotations

import pytest

from sae_mcp.server.app import build_server

from mcp_client import call_many, call_tool, error_text, list_tools

PROMPT_TOOLS = {"model_info", "get_feature_acts", "compare_prompts", "next_token", "project_to_vocab"}


@pytest.fixture
def server(tiny_server):
    return tiny_server


def test_tools_publish_bounded_input_schemas_and_output_schemas(server):
    tools = {t.name: t for t in list_tools(server)}
    assert PROMPT_TOOLS <= set(tools)
    top_k = tools["get_feature_acts"].input_schema["properties"]["top_k"]
    assert top_k["minimum"] == 1 and top_k["maximum"] == 100
    assert tools["project_to_vocab"].input_schema["properties"]["feature"]["minimum"] == 0
    for name in PROMPT_TOOLS:
        assert tools[name].output_schema is not None, name
        assert tools[name].annotations.read_only_hint is True, name


def test_model_info_lists_model_and_sae(server, tiny_engine):
    res = call_tool(server, "model_info")
    assert not res.is_error
    info = res.structured_content
    assert info["n_layers"] == 2 and info["d_model"] == 32 and info["d_vocab"] == tiny_engine.model.cfg.d_vocab
    (sae,) = info["saes"]
    assert sae["hook_name"] == "blocks.1.hook_resid_pre" and sae["d_sae"] == 128 and sae["d_in"] == 32
    assert sae["architecture"] == "standard" and sae["prepend_bos"] is True


def test_every_prompt_tool_answers(server):
    calls = [
        ("get_feature_acts", {"prompt": "the cat sat", "top_k": 3, "features": [1, 2]}),
        ("compare_prompts", {"prompt_a": "the cat sat", "prompt_b": "the dog ran"}),
        ("compare_prompts", {"prompts_a": ["the cat sat", "a cat sat"], "prompts_b": ["the dog ran", "a dog ran"]}),
        ("next_token", {"prompt": "the cat sat on the", "answer": "mat"}),
        ("project_to_vocab", {"feature": 3, "top_k": 4}),
    ]
    results = call_many(server, calls)
    for (name, _), res in zip(calls, results):
        assert not res.is_error, (name, res.content)
        assert res.structured_content, name
    acts, pair, sets, nxt, proj = (r.structured_content for r in results)
    assert acts["tokens"] == ["<s>", "the", "cat", "sat"]
    assert len(acts["features"]) == 2 and all(len(trace) == 4 for trace in acts["features"].values())
    assert pair["token_a"] == "sat" and pair["token_b"] == "ran"
    assert sets["n_a"] == 2 and all("effect_size" in d for d in sets["diffs"])
    assert nxt["answer"]["token"] == "mat" and 0 <= nxt["answer"]["rank"] < 100
    assert len(proj["top_positive"]) == 4 and len(proj["top_negative"]) == 4


BAD_INPUTS = [
    ("feature_out_of_range", "project_to_vocab", {"feature": 128}, "less than or equal to 127"),
    (
        "trace_feature_out_of_range",
        "get_feature_acts",
        {"prompt": "the cat", "features": [500]},
        "less than or equal to 127",
    ),
    ("negative_feature", "project_to_vocab", {"feature": -1}, "feature"),
    ("unknown_sae", "get_feature_acts", {"prompt": "the cat", "sae": "blocks.9.hook_resid_pre"}, "unknown SAE"),
    ("empty_prompt", "get_feature_acts", {"prompt": "   "}, "empty"),
    ("prompt_longer_than_context", "next_token", {"prompt": "the cat " * 40}, "context is 64"),
    ("top_k_too_large", "get_feature_acts", {"prompt": "the cat", "top_k": 5000}, "top_k"),
    ("top_k_zero", "next_token", {"prompt": "the cat", "top_k": 0}, "top_k"),
    ("answer_that_tokenizes_to_nothing", "next_token", {"prompt": "the cat", "answer": "   "}, "tokenizes to nothing"),
    ("empty_answer", "next_token", {"prompt": "the cat", "answer": ""}, "answer is empty"),
    (
        "position_outside_prompt",
        "compare_prompts",
        {"prompt_a": "the cat", "prompt_b": "the dog", "position": 9},
        "position 9",
    ),
    ("pair_and_sets_mixed", "compare_prompts", {"prompt_a": "the cat", "prompts_b": ["the dog"]}, "either"),
    ("one_prompt_only", "compare_prompts", {"prompt_a": "the cat"}, "both"),
    (
        "effect_size_needs_two",
        "compare_prompts",
        {"prompts_a": ["the cat"], "prompts_b": ["the dog"], "sort_by": "effect_size"},
        "two prompts",
    ),
    ("too_many_prompts", "compare_prompts", {"prompts_a": ["the cat"] * 65, "prompts_b": ["the dog"]}, "prompts_a"),
]


@pytest.mark.parametrize("case,tool,args,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_an_error_that_says_what_to_change_and_the_next_call_works(
    server, tiny_engine, case, tool, args, needle
):
    bad, good = call_many(server, [(tool, args), ("get_feature_acts", {"prompt": "the cat sat", "top_k": 2})])
    assert needle.lower() in error_text(bad).lower()
    assert not good.is_error and good.structured_content["tokens"] == ["<s>", "the", "cat", "sat"]
    assert tiny_engine.is_clean()


def test_every_prompt_tool_on_the_real_model(stories_engine):
    server = build_server(stories_engine)
    res = call_many(
        server,
        [
            ("model_info", {}),
            ("get_feature_acts", {"prompt": "Once upon a time", "top_k": 3}),
            ("next_token", {"prompt": "Once upon a time, there was a little girl named", "answer": " Lily"}),
            ("project_to_vocab", {"feature": 0}),
            ("compare_prompts", {"prompt_a": "She was happy.", "prompt_b": "She was sad."}),
        ],
    )
    assert not any(r.is_error for r in res), [r.content for r in res if r.is_error]
    info, acts, nxt, _, _ = (r.structured_content for r in res)
    assert info["architecture"] == "LlamaForCausalLM" and info["n_layers"] == 5 and info["d_vocab"] == 512
    assert acts["tokens"][0] == "<s>"
    assert nxt["answer"]["rank"] == 0


def test_a_call_that_cannot_get_the_device_answers_busy_and_the_next_one_works(tiny_loaded, tiny_engine):
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.settings import Limits

    engine = Engine(tiny_loaded, list(tiny_engine.saes.values()), "cpu", Limits(busy_timeout_s=0.2))
    server = build_server(engine)
    engine._lock.acquire()  # another call holds the device
    try:
        busy = call_tool(server, "next_token", {"prompt": "the cat"})
    finally:
        engine._lock.release()
    assert "busy" in error_text(busy)
    assert not call_tool(server, "next_token", {"prompt": "the cat"}).is_error


def test_schemas_bound_features_positions_and_text_by_the_loaded_model(server):
    tools = {t.name: t for t in list_tools(server)}
    feature = tools["project_to_vocab"].input_schema["properties"]["feature"]
    assert feature["maximum"] == 127  # d_sae 128
    props = tools["compare_prompts"].input_schema["properties"]
    position = props["position"]
    assert position["minimum"] == -64 and position["maximum"] == 63  # n_ctx 64
    prompt = tools["get_feature_acts"].input_schema["properties"]["prompt"]
    assert prompt["maxLength"] == 64 * 32


def test_an_answer_listing_too_many_activations_is_refused_with_what_to_lower(tiny_loaded, tiny_engine):
    from sae_mcp.engine import features as F
    from sae_mcp.errors import InvalidInput

    with pytest.raises(InvalidInput, match="lower top_k"):
        F.get_feature_acts(tiny_engine, "the cat " * 30, top_k=F.MAX_LISTED_ACTIVATIONS // 50)


def test_a_feature_valid_for_the_widest_sae_but_not_the_addressed_one_gets_the_engine_message(
    tiny_loaded, tiny_engine, tmp_path
):
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.engine.saes import load_sae

    from helpers.models import make_sae_folder

    narrow_dir = make_sae_folder(tmp_path / "narrow", 32, 16, "blocks.0.hook_resid_pre")
    narrow = load_sae(str(narrow_dir), "cpu", tiny_engine.sae(None).sae.dtype)
    engine = Engine(tiny_loaded, [tiny_engine.sae(None), narrow], "cpu")
    server = build_server(engine)
    bad, good = call_many(server, [("project_to_vocab", {"feature": 100, "sae": "blocks.0.hook_resid_pre"}),
                                   ("project_to_vocab", {"feature": 100, "sae": "blocks.1.hook_resid_pre"})])
    assert "feature 100 is out of range: SAE blocks.0.hook_resid_pre has 16 features (0..15)" in error_text(bad)
    assert not good.is_error
