"""What the agent reads: characters of one fixed investigation's tool results, and of the tool list.

A chat host shows the model each result's text content, and the tool list (names, descriptions, input schemas)
once per conversation. This runs a fixed investigation of 16 calls across every tool, the way an agent follows the
SAELens tutorial, through the real MCP client on the bundled stories260K model and its layer-3 SAE (sae_mcp/demo),
and prints:

    per call: the characters of its text content (what the agent reads), and of its structured content
    total text characters of the investigation
    the labelling loop for N_LABELLED features, both ways: four calls a feature (feature_card, label_feature,
        score_explanation, submit_predictions) and two (one describe_features for all, then label_feature with
        score and submit_predictions per feature): calls and text characters per labelled + scored feature
    tools/list: characters of the descriptions + input schemas (JSON with json.dumps' default separators, the
        figure issue 23 was measured with; compact, as the SDK sends it, beside it)

Characters, not tokens: the ratio between two versions is what matters, and it is deterministic (greedy or
seeded calls only). Run it on two checkouts to compare them:

    python bench/bench_transcript.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import anyio
import torch
from common import CORPUS, STORIES_HF, STORIES_SAE  # first: the hub offline, the repo importable
from mcp import Client

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
          "dog. One day, Lily saw a big red ball under a tree. She ran to the ball and")


def text_of(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


N_LABELLED = 4  # features labelled and scored each way


def guess(blind: dict, evidence_tokens: set[str]) -> dict[str, bool]:
    """A stand-in scorer: a context fires if it holds a token the evidence showed at the max (what a careless agent
    does; the bench measures characters and calls, not the scorer's skill)."""
    return {c["id"]: any(t.strip() and t in c["text"] for t in evidence_tokens) for c in blind["contexts"]}


async def label_loop(c, features: list[int], two_calls: bool) -> tuple[int, int, list[float]]:
    """Label and blind-score `features`: -> (calls, text characters read, balanced accuracies)."""
    calls, chars, scores = 0, 0, []

    async def call(name: str, args: dict):
        nonlocal calls, chars
        res = await c.call_tool(name, args)
        assert not res.is_error, (name, text_of(res))
        calls, chars = calls + 1, chars + len(text_of(res))
        return res.structured_content

    if two_calls:
        described = await call("describe_features", {"features": features})
        tokens = {d["feature"]: {e["token"] for e in d["top"]} for d in described["features"]}
    for f in features:
        label = f"{'B' if two_calls else 'A'}: fires on the tokens of its top examples"
        if two_calls:
            out = await call("label_feature", {"feature": f, "label": label, "score": {"n": 20, "seed": f}})
            assert out["challenge"], out.get("warnings")  # a feature too rare for a blind set: choose others
            blind, secret, seen = out["challenge"], out["submit_secret"], tokens.get(f, set())
        else:
            card = await call("feature_card", {"feature": f})
            seen = {t for t in card["markdown"].split("«")[1:] for t in [t.split("»")[0]]}
            await call("label_feature", {"feature": f, "label": label})
            out = await call("score_explanation", {"feature": f, "explanation": label, "n": 20, "seed": f})
            blind, secret = out["challenge"], out["submit_secret"]
        score = await call("submit_predictions", {"challenge_id": blind["challenge_id"], "submit_secret": secret,
                                                  "predictions": guess(blind, seen)})
        scores.append(score["metrics"]["balanced_accuracy"])
    return calls, chars, scores


async def investigate(server, show: bool = False) -> tuple[list[tuple[str, int, int]], int]:
    """The fixed investigation -> ([(call, text chars, structured chars)], tools/list chars); `show` prints each
    result's text as the agent reads it."""
    rows = []
    async with Client(server) as c:
        tools = (await c.list_tools()).tools
        listing = sum(len(t.description or "") + len(json.dumps(t.input_schema)) for t in tools)
        compact = sum(len(t.description or "") + len(json.dumps(t.input_schema, separators=(",", ":"))) for t in tools)

        async def call(name: str, args: dict):
            res = await c.call_tool(name, args)
            assert not res.is_error, (name, text_of(res))
            rows.append((name, len(text_of(res)), len(json.dumps(res.structured_content or {}))))
            if show:
                print(f"\n--- {name} {json.dumps(args)}\n{text_of(res)}")
            return res.structured_content

        await call("model_info", {})
        acts = await call("get_feature_acts", {"prompt": PROMPT, "top_k": 3})
        feature = acts["positions"][-1]["top"][0]["feature"]  # the strongest feature at the last token
        await call("compare_prompts", {"prompt_a": "Lily saw a big red ball", "prompt_b": "Lily saw a big red dog"})
        await call("compare_prompts", {"prompts_a": ["Lily saw a red ball", "Tom saw a red ball"],
                                       "prompts_b": ["Lily saw a red dog", "Tom saw a red dog"], "position": -1})
        await call("next_token", {"prompt": "Once upon a time, there was a little girl named", "answer": " Lily"})
        await call("build_index", {"tokens": 20_000})
        await call("top_examples", {"feature": feature, "k": 5})
        await call("project_to_vocab", {"feature": feature})
        await call("feature_card", {"feature": feature})
        await call("steer_generate", {"prompt": "One day, Lily", "features": [{"feature": feature, "strength": 2.0}],
                                      "max_new_tokens": 20, "temperature": 0, "strengths": [0.5, 1, 2],
                                      "controls": True})
        await call("ablate_and_test", {"prompt": PROMPT, "answer": " play", "features": [feature], "controls": True})
        await call("attribute", {"prompt": PROMPT, "answer": " play", "counterfactual": " run", "top_k": 10})
        await call("label_feature", {"feature": feature, "label": "fires at the end of a clause before a verb",
                                     "evidence": "top_examples 1-5; ablation lowers P(' play')"})
        await call("search_explanations", {"query": "verb clause"})
        await call("feature_stats", {"top": 10})
        await call("token_set_enrichment", {"top": 5})
        firing = [x["feature"] for p in acts["positions"][1:] for x in p["top"]]  # features of the prompt, in order
        chosen = list(dict.fromkeys(firing))[:2 * N_LABELLED]  # each way its own features: a blind set leaves out
        loops = {"four calls": await label_loop(c, chosen[0::2], False),  # the contexts answered before
                 "two calls": await label_loop(c, chosen[1::2], True)}
    return rows, listing, compact, loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--show", action="store_true", help="print every result's text as the agent reads it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.server.app import build_server
    from sae_mcp.settings import Settings

    with tempfile.TemporaryDirectory() as d:
        settings = Settings(model=str(STORIES_HF), saes=(str(STORIES_SAE),), corpus=str(CORPUS),
                            device="cpu", data_dir=Path(d) / "data")
        server = build_server(Engine.from_settings(settings), settings)
        rows, listing, compact, loops = anyio.run(investigate, server, args.show)
    total = sum(t for _, t, _ in rows)
    for name, t, s in rows:
        print(f"{name:22s} text {t:7,d} chars   structured {s:7,d}")
    print(f"investigation ({len(rows)} calls): text {total:,} chars")
    for name, (calls, chars, scores) in loops.items():
        print(f"labelling loop, {name}: {calls / N_LABELLED:.2f} calls and {chars / N_LABELLED:,.0f} text chars per "
              f"labelled + scored feature ({N_LABELLED} features; balanced accuracy of the stand-in scorer "
              f"{', '.join(f'{x:.2f}' for x in scores)})")
    print(f"tools/list descriptions + input schemas: {listing:,} chars ({compact:,} as sent, compact JSON)")
    if args.json:
        args.json.write_text(json.dumps({"calls": rows, "text_total": total, "tools_list": listing,
                                         "tools_list_compact": compact, "loops": loops}, indent=1))


if __name__ == "__main__":
    main()
