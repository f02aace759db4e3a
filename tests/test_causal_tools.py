"""steer_generate, ablate_and_test, attribute through the in-memory MCP client: schemas, results, errors."""

from __future__ import annotations

import time

import anyio
import pytest
from mcp import Client

from sae_mcp.engine import generation, steering_plan
from sae_mcp.errors import NotFound
from sae_mcp.server.app import build_server

from helpers.servers import services_at
from mcp_client import call_many, call_tool, cancel_after_first_progress, error_text, instructions_and_tools, list_tools

PROMPT = "the cat sat on the mat and the dog"
CAUSAL = ("steer_generate", "ablate_and_test", "attribute")


@pytest.fixture
def server(tiny_server):
    return tiny_server


def server_with_examples(engine, tmp_path, examples):
    services = services_at(engine, tmp_path, examples=examples)
    return build_server(engine, services=services)


def test_causal_tools_are_listed_read_only_with_bounded_inputs(server):
    tools = {t.name: t for t in list_tools(server)}
    for name in CAUSAL:
        t = tools[name]
        assert t.annotations.read_only_hint and not t.annotations.destructive_hint
        assert t.output_schema is not None
    steer = tools["steer_generate"].input_schema
    assert steer["properties"]["max_new_tokens"]["maximum"] == 256
    assert steer["properties"]["features"]["maxItems"] == 16
    assert steer["properties"]["calibration"]["enum"] == ["max_activation", "absolute"]


def test_steer_generate_tool_returns_unsteered_and_steered_side_by_side(server):
    res = call_tool(server, "steer_generate", {
        "prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
        "max_new_tokens": 6, "temperature": 0, "strengths": [0.5, 2.0], "answer": " mat", "controls": True,
        "n_controls": 3,
    })
    assert not res.is_error, error_text(res)
    out = res.structured_content
    assert out["features"][0]["coefficient"] == 4.0
    assert [r["coefficients"] for r in out["steered"]] == [[2.0], [8.0]]
    assert out["unsteered"][0]["n_tokens"] == 6 and out["unsteered_answer_probability"] > 0
    assert [c["scale"] for c in out["controls"]] == [0.5, 2.0]  # controls at every dose
    assert all(len(c["runs"]) == 3 and "weak evidence" in c["caution"] for c in out["controls"])
    assert (out["answer_tokens"], out["multi_token"]) == (["mat"], False)
    for run in out["steered"]:
        (cont,) = run["continuations"]  # one seed by default
        assert cont["changed"] == (cont["text"] != out["unsteered"][0]["text"])
        assert (cont["first_divergent_token"] is None) == (not cont["changed"])
        assert len(cont["concept_readout"]) == 1 and run["concept_readout"] == cont["concept_readout"]


def test_the_metric_convention_is_said_once_and_the_ablation_effect_in_the_description(server):
    """What is scored is said once, in the server's instructions (every tool's answer/counterfactual/metric follow
    it), and what each result field means in the output schema; no tool repeats the convention."""
    instructions, listed = instructions_and_tools(server)
    assert "logit[answer] - logit[counterfactual]" in instructions and "log P(answer)" in instructions
    assert "leading space" in instructions and "the first token counts" in instructions
    tools = {t.name: t for t in listed}
    assert not [t.name for t in listed if "logit[answer]" in (t.description or "")], "the convention is repeated"
    steer = tools["steer_generate"]
    run = steer.output_schema["$defs"]["SteerRun"]["properties"]
    assert "next-token position" in run["answer_probability"]["description"]
    cont = steer.output_schema["$defs"]["Continuation"]["properties"]
    assert {"changed", "first_divergent_token", "concept_readout", "degenerate"} <= set(cont)
    assert "UNSTEERED model" in cont["concept_readout"]["description"]
    abl = tools["ablate_and_test"]
    assert "with the error term (the causal effect)" in abl.description
    feat = abl.output_schema["$defs"]["AblatedFeature"]["properties"]
    assert {"fired", "activation_sum", "max_activation"} <= set(feat) and "activation" not in feat


def test_steer_generate_tool_runs_several_seeds_and_controls_at_every_dose_or_one(server):
    args = {"prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
            "max_new_tokens": 5, "strengths": [0, 1, 2], "seeds": [4, 7], "controls": True, "n_controls": 2}
    every, one, over = call_many(server, [
        ("steer_generate", args), ("steer_generate", {**args, "control_strength": 2}),
        ("steer_generate", {**args, "strengths": list(range(12)), "seeds": list(range(8)), "n_controls": 5})])
    assert over.is_error and f"over the {steering_plan.MAX_BATCH_ROWS}" in error_text(over)  # the limit, when hit
    assert not every.is_error, error_text(every)
    out = every.structured_content
    assert out["seeds"] == [4, 7] and [c["seed"] for c in out["unsteered"]] == [4, 7]
    assert [c["scale"] for c in out["controls"]] == [1.0, 2.0]
    assert all(len(r["continuations"]) == 2 for c in out["controls"] for r in c["runs"])
    for run in out["steered"]:
        assert [c["seed"] for c in run["continuations"]] == [4, 7] and len(run["concept_readout_std"]) == 1
    assert [c["scale"] for c in one.structured_content["controls"]] == [2.0]
    assert one.structured_content["controls"][0] == out["controls"][1]
    tool = next(t for t in list_tools(server) if t.name == "steer_generate")
    assert tool.input_schema["properties"]["seeds"]["maxItems"] == steering_plan.MAX_SEEDS


@pytest.mark.parametrize(
    "args,message",
    [
        ({"seed": 1, "seeds": [2, 3]}, "seed=1 and seeds=[2, 3] disagree"),
        ({"seeds": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, "seeds"),
        ({"strengths": [1, 2], "controls": True, "control_strength": 5}, "control_strength=5 is not one of"),
        ({"strengths": list(range(1, 13)), "controls": True, "n_controls": 16}, "over the 128"),
    ],
)
def test_steer_generate_bad_seeds_doses_or_batch_say_what_to_change_and_the_next_call_works(server, args, message):
    base = {"prompt": PROMPT, "features": [{"feature": 5, "strength": 1.0}], "calibration": "absolute",
            "max_new_tokens": 2}
    bad, good = call_many(server, [("steer_generate", {**base, **args}), ("steer_generate", base)])
    assert message in error_text(bad)
    assert not good.is_error, error_text(good)


def test_steer_generate_max_activation_calibration_reads_the_example_source(tiny_engine, tmp_path):
    asked = []

    class Source:
        def max_activation(self, sae, feature, max_scan_tokens):
            asked.append((sae, feature))
            return 3.0, "index"

    server = server_with_examples(tiny_engine, tmp_path, Source())
    res = call_tool(server, "steer_generate", {
        "prompt": PROMPT, "features": [{"feature": 5, "strength": 2.0}], "max_new_tokens": 2,
    })
    assert not res.is_error, error_text(res)
    f = res.structured_content["features"][0]
    assert (f["max_activation"], f["max_activation_source"], f["coefficient"]) == (3.0, "index", 6.0)
    assert asked == [("blocks.1.hook_resid_pre", 5)]


def test_max_activation_calibration_without_a_corpus_says_to_pass_corpus_or_absolute(server, tiny_engine, tmp_path):
    # the real example source: the tiny SAE has no dataset and the server no --corpus
    res = call_tool(server, "steer_generate", {"prompt": PROMPT, "features": [{"feature": 5}], "max_new_tokens": 2})
    msg = error_text(res)
    assert "--corpus" in msg and "calibration='absolute'" in msg

    class NoCorpus:
        def max_activation(self, sae, feature, max_scan_tokens):
            raise NotFound("no corpus")

    no_source = server_with_examples(tiny_engine, tmp_path, NoCorpus())
    msg = error_text(call_tool(no_source, "steer_generate", {"prompt": PROMPT, "features": [{"feature": 5}]}))
    assert "no corpus" in msg and "--corpus" in msg


def test_ablate_and_test_tool_returns_four_tables_and_controls(server):
    res = call_tool(server, "ablate_and_test", {
        "prompt": PROMPT, "answer": " mat", "features": [3, 7], "position": [-1, -2], "top_k": 3,
        "controls": True, "n_controls": 2, "seed": 1,
    })
    assert not res.is_error, error_text(res)
    out = res.structured_content
    for name in ("baseline", "reconstruction_only", "ablated", "ablated_without_error_term"):
        assert len(out[name]["top"]) == 3 and out[name]["answer_rank"] >= 0
    assert out["answer"]["token"] == "mat"
    assert out["positions"] == [len(out["tokens"]) - 2, len(out["tokens"]) - 1]
    assert out["baseline"]["answer_logit_change"] == 0.0
    assert out["controls"]["seed"] == 1
    assert "ablated vs baseline" in out["summary"]
    no_err = out["ablated_without_error_term"]
    assert {"answer_probability_change_vs_reconstruction", "kl_from_reconstruction"} <= set(no_err)
    assert [set(f) for f in out["features"]] == [{"feature", "fired", "activation_sum", "max_activation"}] * 2


def test_attribute_tool_returns_top_features_and_error_share(server):
    res = call_tool(server, "attribute", {"prompt": PROMPT, "answer": " mat", "counterfactual": " park", "top_k": 5})
    assert not res.is_error, error_text(res)
    out = res.structured_content
    key = "blocks.1.hook_resid_pre"
    assert len(out["top"]) == 5 and len(out["per_token"][key]) == len(out["tokens"])
    assert 0 <= out["error_share"][key] <= 1
    assert (out["answer_tokens"], out["multi_token"], out["counterfactual_tokens"]) == (["mat"], False, ["park"])


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("steer_generate", {"features": [{"feature": 5, "strength": 5000}], "calibration": "absolute"}, "1000"),
        ("steer_generate", {"features": [{"feature": 999}], "calibration": "absolute"}, "less than or equal to 127"),
        ("steer_generate", {"features": [], "calibration": "absolute"}, "features"),
        ("steer_generate", {"features": [{"feature": 5}], "calibration": "absolute", "max_new_tokens": 999},
         "max_new_tokens"),
        ("ablate_and_test", {"answer": " mat", "features": [3], "position": 40}, "out of range"),
        ("ablate_and_test", {"answer": "", "features": [3]}, "answer is empty"),
        ("attribute", {"answer": " mat", "counterfactual": " mat"}, "same token"),
        ("attribute", {"answer": " mat", "sae": "nope"}, "unknown SAE"),
    ],
)
def test_bad_input_is_an_error_that_says_what_to_change_and_the_next_call_works(server, name, args, message):
    bad, good = call_many(server, [
        (name, {"prompt": PROMPT, **args}),
        ("ablate_and_test", {"prompt": PROMPT, "answer": " mat", "features": [3]}),
    ])
    assert message in error_text(bad)
    assert not good.is_error


# ------------------------------------------------------------------------------------- progress and cancellation


def test_steer_generate_reports_progress_per_generated_token(server):
    seen = []

    async def progress(done, total, message):
        seen.append((done, total))

    async def go():
        async with Client(server) as client:
            res = await client.call_tool("steer_generate", {
                "prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
                "max_new_tokens": 7, "temperature": 0, "strengths": [1.0, 2.0],
            }, progress_callback=progress)
            await anyio.sleep(0.05)  # progress callbacks run as their own tasks: let the last ones land
            return res

    res = anyio.run(go)
    assert not res.is_error, error_text(res)
    steps = max(r["continuations"][0]["n_tokens"] for r in res.structured_content["steered"])
    assert sorted(seen) == [(i, 7) for i in range(1, len(seen) + 1)]  # one per generated token, out of 7
    assert len(seen) >= max(steps, 1)


def test_a_client_cancel_stops_steer_generate_between_tokens(server, tiny_engine, monkeypatch):
    sampled = []
    real = generation._sample

    def slow_sample(*a):
        sampled.append(1)
        time.sleep(0.02)
        return real(*a)

    monkeypatch.setattr(generation, "_sample", slow_sample)

    steer = {"prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
             "max_new_tokens": 50, "temperature": 0}
    # the next call waits for the engine, which is free once the generation has stopped
    after = cancel_after_first_progress(server, "steer_generate", steer,
                                        then=("ablate_and_test", {"prompt": PROMPT, "answer": " mat", "features": [3]}))
    assert not after.is_error, error_text(after)
    assert len(sampled) < 25, f"generation ran {len(sampled)} of 50 steps after the client cancelled"
    assert tiny_engine.is_clean()
