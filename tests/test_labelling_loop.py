"""The two-call labelling loop (issue 23): describe_features gives the evidence for several features in one read,
label_feature(score=...) records a label and hands out its blind set, submit_predictions answers it. On the real
stories260K model and its layer-3 SAE over an indexed TinyStories corpus, through the real MCP client.

The logit lens is recomputed here from the weights (W_dec[f] @ W_U, the tutorial's way); what describe_features
shows of the corpus is compared with top_examples, whose numbers other tests check against a plain forward. That no
described window reaches a blind set is proven with the other views in test_scoring_blind.py."""

from __future__ import annotations

import anyio
import pytest
import torch
from mcp import Client

from sae_mcp.server.app import build_server

from helpers.models import only_sae
from helpers.servers import indexed_stories_services
from mcp_client import call_many, error_text, text_of

pytestmark = [pytest.mark.usefixtures("lexical_only")]


@pytest.fixture(scope="module")
def setup(stories_engine, stories_sae_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("labelling_loop")
    services = indexed_stories_services(stories_engine, stories_sae_dir, data, tokens=30_000)
    _, row, _, _ = services.examples.feature_row(None, 0)
    density = row.n_fired / row.tokens
    fired = [f for f in range(len(density)) if 0.003 < density[f] < 0.05]  # firing often enough for a blind set
    return build_server(stories_engine, services.settings, services=services), services, fired


def plain_lens(engine, feature: int, k: int, excluded: set[int]) -> tuple[list[str], list[str]]:
    """The tutorial's logit lens: the decoder row through the unembedding, special tokens left out."""
    s = only_sae(engine)
    with torch.inference_mode():
        logits = (s.sae.W_dec[feature] @ engine.model.W_U).float()  # [d_vocab]
    keep = torch.tensor([i not in excluded for i in range(logits.shape[0])])
    ids = torch.arange(logits.shape[0])[keep]
    vals = logits[keep]
    tok = engine.model.tokenizer

    def shown(i) -> str:  # sentencepiece marks a leading space with U+2581
        return tok.convert_ids_to_tokens(int(i)).replace("\u2581", " ")

    return [shown(i) for i in ids[vals.argsort(descending=True)[:k]]], [shown(i) for i in ids[vals.argsort()[:k]]]


def test_describe_features_shows_top_examples_bands_and_the_plain_logit_lens(setup, stories_engine):
    server, services, fired = setup
    features = fired[:3]
    described, *tops = call_many(server, [
        ("describe_features", {"features": features, "examples": 3, "per_band": 2, "tokens": 5}),
        *[("top_examples", {"feature": f, "k": 3, "intervals": 4, "per_interval": 2}) for f in features],
    ])
    assert not described.is_error, text_of(described)
    out = described.structured_content
    assert [d["feature"] for d in out["features"]] == features
    excluded = services.stats.builtin_excluded()
    for d, top in zip(out["features"], tops):
        t = top.structured_content
        assert d["density"] == pytest.approx(t["density"]) and d["max_activation"] == pytest.approx(t["max_activation"])
        assert [(e["document"], e["offset"]) for e in d["top"]] == [(e["document"], e["offset"]) for e in t["examples"]]
        assert len(d["bands"]) == 4 and all(len(b["examples"]) <= 2 for b in d["bands"])
        assert d["bands"][0]["lower"] >= d["bands"][-1]["lower"], "highest band first"
        want_top, want_bottom = plain_lens(stories_engine, d["feature"], 5, set(excluded))
        assert [x["token"] for x in d["promotes"]] == want_top
        assert [x["token"] for x in d["suppresses"]] == want_bottom
    text = text_of(described)
    for d in out["features"]:
        e = d["top"][0]
        assert f"«{e['token']}»".replace("\n", "⏎") in text, "the max token is marked in the text"


def test_describe_features_keeps_to_its_budget_and_names_what_it_left_out(setup):
    server, _, fired = setup
    features = fired[:12]
    (res,) = call_many(server, [("describe_features", {"features": features, "examples": 6, "context": 16,
                                                       "budget": 2500})])
    assert not res.is_error, text_of(res)
    out = res.structured_content
    shown = [d["feature"] for d in out["features"]]
    assert shown and out["left_out"] and shown + out["left_out"] == features
    assert len(text_of(res)) <= 2500
    assert str(out["left_out"]) in text_of(res)


def test_describe_features_refuses_unknown_features_and_too_many(setup, stories_engine):
    server, _, _ = setup
    d_sae = only_sae(stories_engine).d_sae
    bad, many, after = call_many(server, [
        ("describe_features", {"features": [1, d_sae]}),
        ("describe_features", {"features": list(range(33))}),
        ("describe_features", {"features": [1], "budget": 500}),
    ])
    assert bad.is_error and str(d_sae) in error_text(bad)
    assert many.is_error
    assert not after.is_error, "the server keeps working"


def test_a_new_label_shows_up_in_the_description(setup):
    server, _, fired = setup
    f = fired[3]
    _, res = call_many(server, [("label_feature", {"feature": f, "label": "the word 'park'"}),
                                ("describe_features", {"features": [f]})])
    assert res.structured_content["features"][0]["labels"][0] == "the word 'park'"


def run_session(server, steps):
    """steps: functions (previous structured result) -> (tool, arguments); one connection, one conversation."""

    async def go():
        out, prev = [], None
        async with Client(server) as client:
            for step in steps:
                name, args = step(prev)
                res = await client.call_tool(name, args)
                out.append(res)
                prev = res.structured_content
        return out

    return anyio.run(go)


def test_label_with_score_hands_out_the_blind_set_and_the_answer_is_filed_under_that_label(setup):
    """Two calls: label_feature(score=...) then submit_predictions. The score sits on the label (label_feature's
    scored, the card); predictions of all true score a balanced accuracy of exactly 0.5 (recall 1, specificity 0),
    whatever the set holds."""
    server, services, fired = setup
    f = fired[4]
    label = "names of people"
    labelled, submitted, again = run_session(server, [
        lambda _: ("label_feature", {"feature": f, "label": label, "score": {"method": "detection", "n": 12,
                                                                             "seed": 5}}),
        lambda r: ("submit_predictions", {"challenge_id": r["challenge"]["challenge_id"],
                                          "submit_secret": r["submit_secret"],
                                          "predictions": {c["id"]: True for c in r["challenge"]["contexts"]}}),
        lambda _: ("label_feature", {"feature": f, "label": label}),
    ])
    assert not labelled.is_error, text_of(labelled)
    blind = labelled.structured_content["challenge"]
    assert blind["explanation"] == label and blind["feature"] == f and len(blind["contexts"]) == 12
    assert labelled.structured_content["submit_secret"] in text_of(labelled), "the secret is shown once, in the text"
    assert not submitted.is_error, text_of(submitted)
    assert submitted.structured_content["metrics"]["balanced_accuracy"] == pytest.approx(0.5)
    scored = again.structured_content["scored"]
    assert scored and scored[0]["method"] == "detection"
    label_id = labelled.structured_content["label_id"]
    assert services.scores.latest([(only_sae(services.engine).store_key, f, label)]), "filed under the label's text"
    assert label_id == again.structured_content["label_id"]


def test_the_blind_set_needs_its_secret_and_the_ledger_never_holds_it(setup):
    server, services, fired = setup
    f = fired[5]
    labelled, wrong, right = _label_then_submit(server, f)
    assert not labelled.is_error, text_of(labelled)
    assert wrong.is_error and "secret" in error_text(wrong)
    assert not right.is_error, text_of(right)
    secret = labelled.structured_content["submit_secret"]
    path = services.ledger.store.path
    for file in path.parent.glob(path.name + "*"):  # the database and its write-ahead log
        assert secret.encode() not in file.read_bytes(), f"the secret reached {file.name}"
    assert len(list(path.parent.glob(path.name + "*"))) >= 1


def _label_then_submit(server, f):
    """label_feature(score) for f, a submission with a wrong secret, then with the right one."""
    kept = {}

    def label(_):
        return "label_feature", {"feature": f, "label": "a verb", "score": {"n": 8}}

    def wrong(r):
        kept.update(r)
        return "submit_predictions", {"challenge_id": r["challenge"]["challenge_id"], "submit_secret": "x" * 32,
                                      "predictions": {c["id"]: False for c in r["challenge"]["contexts"]}}

    def right(_):
        return "submit_predictions", {"challenge_id": kept["challenge"]["challenge_id"],
                                      "submit_secret": kept["submit_secret"],
                                      "predictions": {c["id"]: False for c in kept["challenge"]["contexts"]}}

    return run_session(server, [label, wrong, right])


def test_a_label_that_cannot_be_scored_is_still_recorded_with_a_warning(tiny_server):
    """A server without a corpus has no blind set to hand out: the label stays recorded and the result says why and
    what to do, rather than an error after the label was written; the server keeps working."""
    res, again = call_many(tiny_server, [("label_feature", {"feature": 3, "label": "dead", "score": {"n": 8}}),
                                         ("label_feature", {"feature": 3, "label": "dead"})])
    assert not res.is_error, text_of(res)
    out = res.structured_content
    assert out["challenge"] is None and out["submit_secret"] is None
    assert "no blind set" in out["warnings"][0] and "score_explanation" in out["warnings"][0]
    assert "no blind set" in text_of(res)
    assert again.structured_content["label_id"] == out["label_id"], "the label was recorded once"
