"""Schema-driven fuzz of every tool: arguments drawn from each tool's published input schema, some pushed off it
(wrong types, out of range, too long, unknown or missing arguments). Every call must come back as a result or an
isError with a reason, never a protocol error or a hang; afterwards the model is clean and a reference call gives
bit-identical output to before.

Seeded (hypothesis' derandomize), bounded: SAE_MCP_FUZZ_CALLS calls (default 300, at least), each under
CALL_TIMEOUT_S; one hypothesis example calls every tool once, in a drawn order, over one client connection.
Expensive knobs (generated tokens, seeds, doses, controls, gradient steps, scanned tokens) are drawn from a capped
range so the run stays within minutes on two CPU cores; above their schema maximum they are still tried, as
off-schema values, where validation refuses them.
"""

from __future__ import annotations

import json
import os
import random

import anyio
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from sae_mcp.server.app import build_server
from sae_mcp.settings import Settings

from helpers.models import only_sae
from mcp_client import list_tools, text_of

CALLS = int(os.environ.get("SAE_MCP_FUZZ_CALLS", "300"))
CALL_TIMEOUT_S = 120.0
COST_CAPS = {"max_new_tokens": 6, "n_controls": 2, "steps": 4, "max_scan_tokens": 2000, "tokens": 2000}
ITEM_CAPS = {"seeds": 2, "strengths": 3, "prompts_a": 4, "prompts_b": 4}
MAX_ITEMS = 8  # any other list: its schema's maxItems beyond this is left to off-schema draws
MAX_CHARS = 120  # drawn strings; maxLength + 1 comes as an off-schema value
# Arguments that go together, one group or the other, which a JSON schema does not say: without this almost no
# drawn compare_prompts call would get past its first check.
EXCLUSIVE = {"compare_prompts": (("prompt_a", "prompt_b"), ("prompts_a", "prompts_b"))}
WORDS = "the a cat dog sat on mat ran to park Lily Tom ball red big and was . , ! ? 1 2 3".split()
REFERENCE = ("ablate_and_test", {"prompt": "the cat sat on the mat", "answer": " mat", "features": [3, 7],
                                 "controls": True, "n_controls": 2, "counterfactual": " park"})
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def from_schema(schema: dict, defs: dict, name: str = "") -> st.SearchStrategy:
    """A JSON schema (the subset pydantic writes for tool inputs) -> a strategy for values it accepts."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, name)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, name) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        hi = min(schema.get("maximum", 2**31), COST_CAPS.get(name, 2**63))
        return st.integers(schema.get("minimum", -(2**31)), hi)
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1e6))
        return st.floats(lo, schema.get("maximum", 1e6), exclude_min="exclusiveMinimum" in schema, allow_nan=False)
    if kind == "string":
        return strings(schema.get("minLength", 0), min(schema.get("maxLength", MAX_CHARS), MAX_CHARS))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        most = min(schema.get("maxItems", MAX_ITEMS), ITEM_CAPS.get(name, MAX_ITEMS))
        return st.lists(from_schema(schema["items"], defs, name), min_size=schema.get("minItems", 0), max_size=most)
    if kind == "object" and "properties" in schema:
        return arguments(schema, defs)
    if kind == "object":
        keys = strings(0, schema.get("propertyNames", {}).get("maxLength", MAX_CHARS))
        values = from_schema(schema.get("additionalProperties", {}), defs, name)
        return st.dictionaries(keys, values, max_size=min(schema.get("maxProperties", 4), 4))
    return ANY_JSON


def strings(least: int, most: int) -> st.SearchStrategy:
    """Any text, or words the tiny tokenizer knows (so prompts reach the model rather than all being <unk>)."""
    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
    return st.one_of(st.text(min_size=least, max_size=most), words.filter(lambda s: least <= len(s) <= most))


def arguments(schema: dict, defs: dict, named: dict | None = None) -> st.SearchStrategy:
    """An object schema -> its argument dicts; `named` replaces the strategy of the arguments it names (None stays
    possible where the schema allows it)."""
    named, props = named or {}, {}
    for k, v in schema.get("properties", {}).items():
        nullable = any(branch.get("type") == "null" for branch in v.get("anyOf", []))
        props[k] = from_schema(v, defs, k) if k not in named else st.none() | named[k] if nullable else named[k]
    required = {k: v for k, v in props.items() if k in schema.get("required", [])}
    return st.fixed_dictionaries(required, optional={k: v for k, v in props.items() if k not in required})


@st.composite
def off_schema(draw, args: dict, schema: dict) -> dict:
    """One argument pushed off the schema: a wrong type, past a bound, too long, unknown, or a required one dropped."""
    args = dict(args)
    props = schema.get("properties", {})
    how = draw(st.sampled_from(["wrong", "past", "unknown", "drop"]))
    if how == "unknown" or not props:
        args[draw(st.sampled_from(["k", "prompt_c", "featurez", ""]))] = draw(ANY_JSON)
    elif how == "drop" and schema.get("required"):
        args.pop(draw(st.sampled_from(schema["required"])), None)
    else:
        key = draw(st.sampled_from(sorted(props)))
        args[key] = draw(ANY_JSON) if how == "wrong" else past_bound(props[key])
    return args


def past_bound(schema: dict):
    """A value just outside the first bound found in the schema (or its anyOf branches)."""
    for s in [schema, *schema.get("anyOf", [])]:
        if "maximum" in s:
            return s["maximum"] + 1
        if "maxLength" in s:
            return "x" * (s["maxLength"] + 1)
        if "maxItems" in s:
            return [0] * (s["maxItems"] + 1)
    return {"not": "this"}


def shapes(tool: str, schema: dict) -> list[dict]:
    """The schema, or one copy per group of EXCLUSIVE arguments: that group required and not null, the other
    groups left out."""
    groups = EXCLUSIVE.get(tool)
    if not groups:
        return [schema]
    out = []
    for keep in groups:
        props = {k: v for k, v in schema["properties"].items() if k in keep or not any(k in g for g in groups)}
        for k in keep:
            props[k] = {"anyOf": [b for b in props[k].get("anyOf", [props[k]]) if b.get("type") != "null"]}
        out.append({**schema, "properties": props, "required": [*schema.get("required", []), *keep]})
    return out


def tool_calls(tools, sae_key: str) -> st.SearchStrategy:
    """One call to every tool, in a drawn order. Text arguments are mostly words the model knows, `sae` mostly
    omitted or the loaded key: arbitrary values there only exercise the first check, so they come less often."""
    sae = st.sampled_from([None, sae_key, sae_key, "nope"]) | strings(0, 20)
    prose = st.lists(st.sampled_from(WORDS), min_size=1, max_size=10).map(" ".join) | strings(0, MAX_CHARS)
    answer = st.sampled_from([" mat", " cat", " park", "mat", ".", " Lily"]) | strings(0, 8)
    named = {"sae": sae, "saes": st.lists(sae, max_size=2), "answer": answer, "counterfactual": answer,
             "prompts_a": st.lists(prose, min_size=1, max_size=4), "prompts_b": st.lists(prose, min_size=1, max_size=4),
             **{k: prose for k in ("prompt", "prompt_a", "prompt_b", "query", "label", "evidence")}}
    per_tool = []
    for t in tools:
        schema = t.input_schema
        on = st.one_of([arguments(shape, schema.get("$defs", {}), named) for shape in shapes(t.name, schema)])
        args = st.one_of(on, on, on, on.flatmap(lambda a, s=schema: off_schema(a, s)))  # 1 in 4 off the schema
        per_tool.append(st.tuples(st.just(t.name), args))
    return st.tuples(*per_tool).flatmap(lambda calls: st.permutations(list(calls)))


def run_session(server, calls: list[tuple[str, dict]]) -> list:
    async def go():
        out = []
        async with Client(server) as client:
            for name, args in calls:
                with anyio.fail_after(CALL_TIMEOUT_S):  # a hang fails here, naming the call
                    out.append(await client.call_tool(name, args))
        return out

    return anyio.run(go)


def model_state(engine) -> tuple[torch.Tensor, dict]:
    with torch.inference_mode():
        logits = engine.model(engine.to_tokens("the cat sat on the mat and the dog")).clone()
    return logits, {k: v.clone() for k, v in only_sae(engine).sae.state_dict().items()}


@pytest.fixture(scope="module")
def fuzz_server(tiny_engine, tmp_path_factory):
    """The tiny engine's server with a small corpus of the tokenizer's words, so the corpus tools (top_examples,
    build_index, steering calibrated on max activations) run rather than stop at "no corpus"."""
    folder = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(60)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return build_server(tiny_engine, Settings(corpus=str(folder / "corpus.jsonl"), data_dir=folder / "data"))


@pytest.mark.timeout(1800)
def test_every_tool_answers_every_drawn_call_and_leaves_the_model_as_it_was(tiny_engine, fuzz_server):
    tools = list_tools(fuzz_server)
    logits, weights = model_state(tiny_engine)
    (reference,) = run_session(fuzz_server, [REFERENCE])
    made: list[str] = []

    @settings(max_examples=-(-CALLS // len(tools)), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(tool_calls(tools, only_sae(tiny_engine).key))
    def fuzz(calls):
        for (name, args), res in zip(calls, run_session(fuzz_server, calls)):
            made.append(name)
            if res.is_error:
                assert text_of(res).strip(), f"{name}({args}): an error without a reason"
            else:
                assert res.structured_content is not None and text_of(res).strip(), f"{name}({args})"

    fuzz()
    assert len(made) >= CALLS and {t.name for t in tools} <= set(made)
    assert tiny_engine.is_clean()
    after_logits, after_weights = model_state(tiny_engine)
    assert torch.equal(after_logits, logits)
    assert all(torch.equal(after_weights[k], v) for k, v in weights.items())
    (again,) = run_session(fuzz_server, [REFERENCE])
    assert not again.is_error and {k: v for k, v in again.structured_content.items() if k != "run_id"} == {
        k: v for k, v in reference.structured_content.items() if k != "run_id"}  # run_id: each call's own
