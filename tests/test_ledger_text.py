"""ledger(run=...) reads as the agent read the call when it answered: one line naming the run (id, time, session,
tool(arguments), ok or its error), then the tool's own rendering of the recorded result, not the run as JSON; a cut
copy renders from what it kept and says so; a blind set's secret is not recorded and not shown. Listings say how
many runs match in all."""

from __future__ import annotations

from sae_mcp.ledger.bounds import SECRET_MARK
from sae_mcp.server.text import compact_json

from mcp_client import call_many, text_of

PROMPT = "Once upon a time, there was a little girl named Lily. Lily"


def without_run_id(result) -> str:
    return text_of(result).removesuffix(f"\nrun_id: {result.structured_content['run_id']}")


def test_ledger_run_reads_as_the_tools_own_rendering_far_shorter_than_json(stories_server):
    attr, ablate, failed = call_many(stories_server, [
        ("attribute", {"prompt": PROMPT, "answer": " was", "counterfactual": " had", "top_k": 5}),
        ("ablate_and_test", {"prompt": PROMPT, "answer": " was", "counterfactual": " had", "features": [465, 413],
                             "controls": True, "n_controls": 3}),
        ("project_to_vocab", {"feature": 99999}),
    ])
    rid = attr.structured_content["run_id"]
    one, ablated = call_many(stories_server, [("ledger", {"run": rid}),
                                              ("ledger", {"run": ablate.structured_content["run_id"]})])
    head, body = text_of(one).split("\n", 1)
    assert head.startswith(f"run {rid} ") and " attribute(prompt='Once upon" in head and "counterfactual=' had'" in head
    assert " -> ok in " in head
    assert body == without_run_id(attr)  # what the agent read when the call answered
    assert text_of(ablated).split("\n", 1)[1] == without_run_id(ablate)
    whole = one.structured_content["run"]  # the run whole stays in the structured content
    assert whole["resolved"]["counterfactual"] == " had" and whole["result"]["metric_value"] is not None
    for shown in (one, ablated):  # what ledger(run=) printed before: the run as compact JSON
        json_text = "run " + compact_json(shown.structured_content["run"])
        assert len(text_of(shown)) < len(json_text)
    assert len(text_of(ablated)) * 2 < len("run " + compact_json(ablated.structured_content["run"]))
    (bad,) = call_many(stories_server, [("ledger", {"tool": "project_to_vocab"})])
    bad_id = bad.structured_content["runs"][0]["run_id"]
    (shown,) = call_many(stories_server, [("ledger", {"run": bad_id})])
    assert failed.is_error and text_of(shown).startswith(f"run {bad_id} ")
    assert "project_to_vocab(feature=99999) -> failed: " in text_of(shown) and "\n" not in text_of(shown)


def test_a_blind_set_run_reads_without_its_secret(stories_server):
    (blind,) = call_many(stories_server, [("score_explanation", {"feature": 7, "explanation": "the word can",
                                                                 "n": 6, "seed": 1})])
    secret = blind.structured_content["submit_secret"]
    (one,) = call_many(stories_server, [("ledger", {"run": blind.structured_content["run_id"]})])
    text = text_of(one)
    challenge = blind.structured_content["challenge"]["challenge_id"]
    assert f"challenge {challenge}: detection of 'the word can'" in text
    assert secret not in text and "submit_secret" not in text and SECRET_MARK not in text
    assert all(c["text"] in text for c in blind.structured_content["challenge"]["contexts"])


def test_a_cut_copy_renders_from_what_it_kept_and_says_so(stories_server):
    long_prompt = " ".join(["Lily and Tom played in the park with a red ball."] * 25)  # 451 tokens
    (acts,) = call_many(stories_server, [("get_feature_acts", {"prompt": long_prompt, "top_k": 50,
                                                                "features": list(range(64))})])
    run = stories_server.ledger.store.run(acts.structured_content["run_id"])
    assert run.truncated  # more than the ledger keeps whole
    (one,) = call_many(stories_server, [("ledger", {"run": run.id})])
    lines = text_of(one).splitlines()
    assert lines[1].startswith("(the ledger kept a cut copy: lists to their first 32 items, ")
    assert lines[1].endswith(" items left out)")
    assert lines[2].startswith("sae ") and "per position: index token L0" in lines[2]
    assert len(text_of(one)) < len(text_of(acts))


def test_a_listing_says_how_many_runs_match_in_all(stories_server):
    call_many(stories_server, [("next_token", {"prompt": "Once upon a"}), ("next_token", {"prompt": "Lily saw"}),
                               ("project_to_vocab", {"feature": 7, "top_k": 3})])
    latest, of_tool, everything = call_many(stories_server, [
        ("ledger", {"limit": 2}), ("ledger", {"tool": "next_token", "limit": 1}), ("ledger", {})])
    assert text_of(latest).startswith("2 of 3 runs, newest first")
    assert latest.structured_content["total"] == 3 and len(latest.structured_content["runs"]) == 2
    assert text_of(of_tool).startswith("1 of 2 runs, newest first") and of_tool.structured_content["total"] == 2
    assert text_of(everything).startswith("3 of 3 runs, newest first")
    store = stories_server.ledger.store
    assert store.count(tool="next_token") == 2 and store.count(feature=7) == len(store.runs(feature=7)) == 1
