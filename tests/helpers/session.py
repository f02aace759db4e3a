"""The investigation session the ledger tests record and the export tests replay: one call of every tool (and one
that fails), the answer to its blind set, and labels citing its runs."""

from __future__ import annotations

from pathlib import Path

import anyio
from mcp import Client

from sae_mcp.engine.runtime import Engine

from helpers.models import only_sae
from helpers.servers import stories_settings_at

PROMPT = "Once upon a time, there was a little girl named Lily"


def session_calls() -> list[tuple[str, dict]]:
    """One investigation touching every tool (and one call that fails)."""
    return [
        ("model_info", {}),
        ("get_feature_acts", {"prompt": PROMPT, "top_k": 3, "features": [5, 9]}),
        ("compare_prompts", {"prompt_a": "She was happy.", "prompt_b": "She was sad.", "top_k": 5}),
        ("compare_prompts", {"prompts_a": ["He was happy.", "She was happy."],
                             "prompts_b": ["He was sad.", "She was sad."], "sort_by": "effect_size", "top_k": 5}),
        ("next_token", {"prompt": PROMPT, "answer": " Lily"}),
        ("next_token", {"prompt": "Once upon a", "answer": " time there"}),
        ("project_to_vocab", {"feature": 3, "top_k": 5}),
        ("project_to_vocab", {"feature": 4, "top_k": 5, "skip_special": True}),
        ("top_examples", {"feature": 7, "k": 5, "max_scan_tokens": 4000}),
        ("ablate_and_test", {"prompt": PROMPT, "answer": " Lily", "counterfactual": " Tom", "features": [7, 8],
                             "controls": True, "n_controls": 3}),
        ("attribute", {"prompt": PROMPT, "answer": " Lily", "counterfactual": " Tom", "top_k": 5}),
        ("attribute", {"prompt": PROMPT, "answer": " Lily", "method": "integrated_gradients", "steps": 4, "top_k": 3}),
        ("steer_generate", {"prompt": "Once upon a time", "features": [{"feature": 7, "strength": 2.0}],
                            "calibration": "absolute", "temperature": 0, "max_new_tokens": 8, "strengths": [1, 4],
                            "answer": " there"}),
        ("steer_generate", {"prompt": "Once upon a time", "features": [{"feature": 7, "strength": 1.0}],
                            "max_new_tokens": 8, "seeds": [0, 1]}),
        ("patch_features", {"prompt": "Lily saw a cat. She", "source_prompt": "Lily saw a dog. She", "answer": " was",
                            "top_k": 4}),
        ("patch_features", {"prompt": "Lily saw a cat. She", "source_prompt": "Lily saw a dog. She", "answer": " was",
                            "counterfactual": " had", "features": [5, 9]}),
        ("trace_circuit", {"prompt": PROMPT, "answer": " was", "max_nodes": 12}),
        ("trace_circuit", {"prompt": PROMPT, "answer": " was", "max_nodes": 12, "ablation": "mean"}),
        ("project_to_vocab", {"feature": 99999}),  # fails: out of range
        ("build_index", {"tokens": 20000}),
        ("search_explanations", {"query": "girl"}),
        ("feature_stats", {"top": 3}),
        ("token_set_enrichment", {"top": 2}),
        ("feature_card", {"feature": 7}),
        ("score_explanation", {"feature": 5, "explanation": "a word ending", "n": 8}),  # its seed drawn
    ]


def label_calls(rid: dict[str, str]) -> list[tuple[str, dict]]:
    """The agent's labels, citing the runs of the session (and one citing a run that does not exist)."""
    return [
        ("label_feature", {"feature": 7, "label": "Lily's name", "evidence": "ablation moves P(' Lily')",
                           "evidence_runs": [rid["ablate_and_test"], rid["top_examples"]]}),
        ("label_feature", {"feature": 8, "label": "no such evidence", "evidence_runs": ["r00000000"]}),
        ("label_feature", {"feature": 9, "label": "an uncited hunch", "score": {"n": 8}}),  # its blind set's seed drawn
    ]


def score_calls(blind: dict | None) -> list[tuple[str, dict]]:
    """After the session's score_explanation (a blind set drawn with no seed given): the agent's answer to it."""
    if blind is None:
        return []
    ids = [c["id"] for c in blind["challenge"]["contexts"]]
    answer = {i: n % 2 == 0 for n, i in enumerate(ids)}
    secret = {"submit_secret": blind["submit_secret"]} if blind.get("submit_secret") else {}
    return [("submit_predictions", {"challenge_id": blind["challenge"]["challenge_id"], "predictions": answer,
                                    **secret})]


def record_session(engine: Engine, data_dir: Path):
    """The session on a fresh server, over one connection (one conversation: the labels cite its runs);
    -> (server, calls, results, the labels' results)."""
    from sae_mcp.server.app import build_server

    server = build_server(engine, stories_settings_at(data_dir, only_sae(engine).source))
    calls = session_calls()

    async def go():
        async with Client(server) as client:
            results = [await client.call_tool(name, args) for name, args in calls]
            for name, args in score_calls(results[-1].structured_content if calls[-1][0] == "score_explanation"
                                          else None):
                calls.append((name, args))
                results.append(await client.call_tool(name, args))
            rid = {n: r.structured_content["run_id"] for (n, _), r in zip(calls, results) if not r.is_error}
            return results, [await client.call_tool(n, a) for n, a in label_calls(rid)]

    results, labels = anyio.run(go)
    return server, calls, results, labels


# Runs an exported file (`python -c WITHOUT_SAE_MCP <file>`) with sae_mcp made unimportable: it must need nothing
# of ours.
WITHOUT_SAE_MCP = "import runpy, sys; sys.modules['sae_mcp'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
