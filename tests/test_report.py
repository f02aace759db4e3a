"""The exported markdown report reads as a report: the question, then per feature what was found (each label with
its blind scores, from this session or a later one, and the runs it cites, linked to the appendix; a text scored
but never recorded as a label), the setup, then an appendix holding every run under its anchor."""

from __future__ import annotations

import re

import anyio
import pytest
from markdown_it import MarkdownIt
from mcp import Client

from sae_mcp.ledger.store import LedgerStore
from sae_mcp.server.app import build_server

from helpers.models import only_sae
from helpers.servers import cli, stories_settings_at

PROMPT = "Lily said, \"Can we play?\" Tom said, \"Can I"


def answer_blind(client, blind: dict):
    """Every context judged 'true' (the score is what it is: the report shows it whatever it is)."""
    challenge = blind["challenge"]
    return client.call_tool("submit_predictions", {
        "challenge_id": challenge["challenge_id"], "submit_secret": blind["submit_secret"],
        "predictions": {c["id"]: True for c in challenge["contexts"]}})


@pytest.fixture(scope="module")
def sessions(stories_engine, tmp_path_factory):
    """Session 1: examples and an ablation of feature 7, a label citing both, scored blind in the same call; a text
    of feature 5 scored but not labelled; a call that fails; a label citing nothing. Session 2 (a later
    conversation): the label of feature 7 scored again, by its label_id."""
    data_dir = tmp_path_factory.mktemp("report_data")
    server = build_server(stories_engine, stories_settings_at(data_dir, only_sae(stories_engine).source))

    async def first():
        async with Client(server) as client:
            top = await client.call_tool("top_examples", {"feature": 7, "k": 4, "max_scan_tokens": 4000})
            ablate = await client.call_tool("ablate_and_test", {"prompt": PROMPT, "answer": " play",
                                                                "features": [7]})
            cited = [top.structured_content["run_id"], ablate.structured_content["run_id"]]
            label = await client.call_tool("label_feature", {
                "feature": 7, "label": "'an' of 'Can' opening a question", "evidence": "top examples: C«an» I",
                "evidence_runs": cited, "score": {"method": "detection", "n": 8, "seed": 1}})
            scored = await answer_blind(client, label.structured_content)
            blind = await client.call_tool("score_explanation", {"feature": 5, "explanation": "a word ending",
                                                                 "n": 8, "seed": 2})
            unlabelled = await answer_blind(client, blind.structured_content)
            failed = await client.call_tool("project_to_vocab", {"feature": 99999})
            hunch = await client.call_tool("label_feature", {"feature": 9, "label": "an uncited hunch"})
            return dict(cited=cited, label=label, scored=scored, unlabelled=unlabelled, failed=failed, hunch=hunch)

    async def second(label_id: int):
        async with Client(server) as client:
            blind = await client.call_tool("score_explanation", {"feature": 7, "label_id": label_id, "n": 8,
                                                                 "seed": 3})
            return await answer_blind(client, blind.structured_content)

    one = anyio.run(first)
    assert not any(one[k].is_error for k in ("label", "scored", "unlabelled", "hunch")) and one["failed"].is_error
    one["later"] = anyio.run(second, one["label"].structured_content["label_id"])
    assert not one["later"].is_error
    store = LedgerStore.for_data_dir(data_dir)
    sid = store.runs(tool="top_examples")[0].session
    path = tmp_path_factory.mktemp("report") / "report.md"
    assert cli("ledger", "export", "--data-dir", str(data_dir), "--session", sid, "--format", "md",
               "--out", str(path))[0] == 0
    return dict(one, text=path.read_text(encoding="utf-8"), runs=store.runs(session=sid))


def section(text: str, heading: str) -> str:
    """The lines under `heading` up to the next heading of its level or above."""
    level = heading.split(" ")[0]
    body = text.split(heading + "\n", 1)[1]
    ends = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), body, re.MULTILINE)]
    return body[:ends[0]] if ends else body


def test_the_report_reads_question_findings_setup_then_the_appendix(sessions):
    text = sessions["text"]
    headings = re.findall(r"^(#{1,3}) (.*)$", text, re.MULTILINE)
    top = [h for level, h in headings if len(level) <= 2]
    assert top[0].startswith("sae-mcp session ") and top[1:] == ["Findings", "Setup", "Appendix: every run"]
    assert text.index("**Question**: ") < text.index("## Findings")
    features = [h for level, h in headings if level == "###" and h.startswith("Feature ")]
    assert [f.split(" (")[0] for f in features] == ["Feature 7", "Feature 5", "Feature 9"]  # as they appeared
    assert "8 runs from " in text and ": 2 labels, 2 blind scores, 1 failed; every run is in the appendix." in text


def test_a_label_shows_its_scores_and_the_runs_it_cites_linked_to_the_appendix(sessions):
    feature = section(sessions["text"], "### Feature 7 (`" + sessions["runs"][0].resolved["sae"] + "`)")
    label_run = sessions["label"].structured_content["run_id"]
    assert f"- Label *'an' of 'Can' opening a question* ([`{label_run}`](#{label_run}))" in feature
    for key, where in (("scored", "#"), ("later", "")):  # this session's score, linked; the later one, named
        s = sessions[key].structured_content
        m = s["metrics"]
        line = next(x for x in feature.splitlines() if s["run_id"] in x)
        assert line.startswith(f"  - Score: detection balanced accuracy **{m['balanced_accuracy']:.4g}** (95% "
                               f"{m['interval_95'][0]:.4g}-{m['interval_95'][1]:.4g}) over 8 contexts (")
        assert (f"(#{s['run_id']})" in line) == bool(where)
    later = sessions["later"].structured_content["run_id"]
    assert re.search(rf"`{later}` \(session `s[0-9a-z]+`\), 20", feature)  # then its time
    top, ablate = sessions["cited"]
    assert f"  - Cites [`{top}`](#{top}) top_examples: max " in feature
    assert f"  - Cites [`{ablate}`](#{ablate}) ablate_and_test: ablated vs baseline" in feature
    assert "  - Evidence: top examples: C«an» I" in feature
    unlabelled = section(sessions["text"], "### Feature 5 (`" + sessions["runs"][0].resolved["sae"] + "`)")
    assert unlabelled.strip().startswith("- Scored, not recorded as a label: *a word ending*\n  - Score: detection ")
    hunch = section(sessions["text"], "### Feature 9 (`" + sessions["runs"][0].resolved["sae"] + "`)")
    assert "*an uncited hunch*" in hunch and "  - Not scored blind" in hunch and "  - Cites no run" in hunch


def test_the_appendix_lists_every_run_and_every_link_lands_on_one(sessions):
    appendix = sessions["text"].split("## Appendix: every run\n", 1)[1]
    anchors = re.findall(r'<a id="([0-9a-z]+)"></a>\n### `([0-9a-z]+)` ', appendix)
    assert [a for a, _ in anchors] == [r.id for r in sessions["runs"]] == [b for _, b in anchors]
    failed = sessions["runs"][[r.tool for r in sessions["runs"]].index("project_to_vocab")]
    assert f"### `{failed.id}` project_to_vocab (failed)" in appendix and "less than or equal" in appendix
    top = sessions["cited"][0]
    assert "- cited by the label on feature 7: *'an' of 'Can' opening a question*" in section(appendix, f"### `{top}` "
                                                                                             "top_examples")
    page = MarkdownIt("commonmark").render(sessions["text"])
    targets = set(re.findall(r'href="#([^"]+)"', page))
    assert targets and targets <= {a for a, _ in anchors}
