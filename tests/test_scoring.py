"""Scored explanations (issue 13): score_explanation hands out a blind set of held-out corpus contexts, and
submit_predictions scores predictions on it; auto asks the client's model through MCP sampling. On the real
stories260K model with the SAE trained in the session, through the real MCP protocol.

The truth the perfect scorer uses is recomputed here the tutorial's way (run_with_cache_with_saes over each
context's window), independently of the server's own forward."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import anyio
import numpy as np
import pytest
import torch
from mcp import Client, types

from sae_mcp.cards.data import gather_card
from sae_mcp.scoring import blind_set as sc
from sae_mcp.scoring.metrics import metrics
from sae_mcp.scoring.prompt import read_predictions, scorer_prompt
from sae_mcp.scoring.runs import BlindSetRequest, ExplanationScorer
from sae_mcp.server.app import build_server

from helpers.models import REPO, only_sae
from helpers.plain import tutorial_sae_acts
from helpers.servers import indexed_stories_services
from mcp_client import call_many, error_text, text_of

pytestmark = [pytest.mark.usefixtures("lexical_only")]
INDEX_TOKENS = 60_000  # enough held-out contexts of one feature for every test's answered blind sets


@pytest.fixture(scope="module")
def setup(stories_engine, stories_sae_dir, tmp_path_factory):
    """(server, services) over one data dir with an index of INDEX_TOKENS tokens, shared by the module."""
    services = indexed_stories_services(stories_engine, stories_sae_dir, tmp_path_factory.mktemp("scoring"),
                                        INDEX_TOKENS)
    return build_server(stories_engine, services.settings, services=services), services


def challenge(services, out: dict):
    """The server-side challenge behind a score_explanation result."""
    return services.scores.challenge(out["challenge"]["challenge_id"])


def ask(server, feature: int, **kw) -> dict:
    (res,) = call_many(server, [("score_explanation", {"feature": feature, "explanation": "x", **kw})])
    assert not res.is_error, text_of(res)
    return res.structured_content


def submit(server, out: dict, predictions: dict):
    """submit_predictions on the blind set of a score_explanation result (its challenge id and submit secret)."""
    (res,) = call_many(server, [("submit_predictions", {"challenge_id": out["challenge"]["challenge_id"],
                                                        "submit_secret": out["submit_secret"],
                                                        "predictions": predictions})])
    return res


def true_activations(engine, services, c) -> dict[str, list[float]]:
    """Each context's activations recomputed the tutorial way over its window (the truth, independently)."""
    s = only_sae(engine)
    index = services.examples.index_store(s, create=False)
    out = {}
    for a in c.answers["items"]:
        (_, _, ids) = index.get_windows([a["window"]])[a["window"]]
        acts = tutorial_sae_acts(engine, torch.tensor([ids]))[0, :, c.feature]
        out[a["id"]] = acts[a["start"] : a["start"] + len(a["tokens"])].tolist()
    return out


def perfect(engine, services, c) -> dict[str, bool]:
    thr = c.answers["threshold"]
    acts = true_activations(engine, services, c)
    if c.method == "fuzzing":
        return {a["id"]: acts[a["id"]][a["mark"]] >= thr for a in c.answers["items"]}
    return {a["id"]: max(acts[a["id"]]) >= thr for a in c.answers["items"]}


def group_by_hand(a: dict, truth: bool, bands: list, top: float) -> str:
    """The group of a context from its true max activation: the band whose range holds it (firing; fuzzing: a
    decoy when its marked token is silent), else 'near miss' / 'silent'."""
    if a["kind"] != "firing":
        return a["kind"].replace("_", " ")
    if a["mark"] is not None and not truth:
        return "decoy"
    # the highest band (1 = highest) whose lower edge the max reaches, within the tolerance of two computation paths
    # (a max 6e-7 under a band's edge by the plain forward reads as that band, as the server's forward put it there)
    number = min(k for k, lo, _ in bands if lo <= top * (1 + 1e-4))
    return f"band {number}"


def top_token_feature(engine, services) -> tuple[int, str]:
    """A feature that fires on one token: its top examples all on it, and it fires at >= 95% of that token's
    occurrences in the first corpus windows. Among those, tokens a keyword rule over text finds exactly (a whole
    word, or punctuation no other token holds), the most frequent -> (feature, token text)."""
    s = only_sae(engine)
    index = services.examples.index_store(s, create=False)
    row = services.examples.feature_row(None, 0)[1]
    length = services.examples.window_length(s)
    wins = [w[2] for w in index.get_windows(list(range(40))).values() if len(w[2]) == length]
    acts = tutorial_sae_acts(engine, torch.tensor(wins))[:, 1:-1]  # [B, T-2, d_sae]: no BOS, a next token each
    ids, after = torch.tensor(wins)[:, 1:-1], torch.tensor(wins)[:, 2:]
    vocab = engine.str_tokens(torch.arange(engine.model.cfg.d_vocab))
    new_word = torch.tensor([not t[:1].isalpha() for t in vocab])  # a token that does not continue a word
    tops = {p // length for v, p in zip(row.top_vals[:20].ravel(), row.top_pos[:20].ravel()) if v > 0}
    top_wins = index.get_windows(list(tops))
    best = (0, -1, "")
    for f in range(s.d_sae):
        tokens = {top_wins[p // length][2][p % length] for v, p in zip(row.top_vals[:20, f], row.top_pos[:20, f])
                  if v > 0}
        if len(tokens) != 1:
            continue
        (tid,) = tokens
        at = ids == tid
        key = vocab[tid].strip()
        word = key.isalpha() and vocab[tid].startswith(" ") and bool(new_word[after[at]].float().mean() >= 0.9)
        punctuation = not key.isalnum() and all(t == vocab[tid] for t in vocab if key in t)
        if at.sum() < 10 or not (word or punctuation) or float((acts[..., f][at] > 0).float().mean()) < 0.95:
            continue
        if int(at.sum()) > best[0]:
            best = (int(at.sum()), f, vocab[tid])
    assert best[1] >= 0, "no feature fires on one token"
    return best[1], best[2]


@pytest.fixture(scope="module")
def token_feature(setup, stories_engine) -> tuple[int, str]:
    return top_token_feature(stories_engine, setup[1])


def keyword_rule(token: str):
    """Predict true when the context holds the token: as a word (letters), else as a substring (punctuation)."""
    k = token.strip()
    if k.isalpha():
        pattern = re.compile(r"(?<![A-Za-z])" + re.escape(k) + r"(?![A-Za-z])")
        return lambda text: bool(pattern.search(text))
    return lambda text: k in text


# ------------------------------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("method", ["detection", "fuzzing"])
def test_perfect_scorer_gets_1_and_constant_scorers_get_half(setup, stories_engine, token_feature, method):
    server, services = setup
    feature = token_feature[0]
    scores, kinds = {}, {}
    for name, seed in (("perfect", 11), ("all true", 12), ("all false", 13)):
        out = ask(server, feature, n=20, method=method, seed=seed)
        c = challenge(services, out)
        truth = perfect(stories_engine, services, c)
        assert truth == {a["id"]: a["truth"] for a in c.answers["items"]}  # the server's truth is the tutorial's
        kinds[name] = [group_by_hand(a, truth[a["id"]], c.answers["bands"], max(acts))
                       for a, acts in zip(c.answers["items"], true_activations(stories_engine, services, c).values())]
        preds = {"perfect": truth, "all true": dict.fromkeys(truth, True), "all false": dict.fromkeys(truth, False)}
        res = submit(server, out, preds[name])
        assert not res.is_error, text_of(res)
        scores[name] = res.structured_content
    assert scores["perfect"]["metrics"]["balanced_accuracy"] == 1.0 and not scores["perfect"].get("misjudged")
    for name in ("all true", "all false"):
        assert scores[name]["metrics"]["balanced_accuracy"] == 0.5
    for name, right in (("all true", True), ("all false", False), ("perfect", None)):  # per group, counted here
        want = Counter(kinds[name])
        got = {g["group"]: (g["n"], g["correct"]) for g in scores[name]["groups"]}
        assert {g: n for g, (n, _) in got.items()} == dict(want)
        assert all(ok == (n if right is None or (g.startswith("band") == right) else 0) for g, (n, ok) in got.items())
    wrong = scores["all true"]["misjudged"]
    assert len(wrong) == scores["all true"]["metrics"]["counts"]["fp"] and all(not x["truth"] for x in wrong)
    assert all((x["marked_activation"] if method == "fuzzing" else x["max_activation"]) == 0 for x in wrong)


def test_a_keyword_scorer_beats_the_constant_one_on_a_feature_that_fires_on_its_top_token(setup, token_feature):
    server, services = setup
    feature, token = token_feature
    rule = keyword_rule(token)
    t0 = time.perf_counter()
    out = ask(server, feature, n=40, seed=5, explanation=f"the token {token!r}")
    seconds = time.perf_counter() - t0
    preds = {x["id"]: rule(x["text"]) for x in out["challenge"]["contexts"]}
    res = submit(server, out, preds)
    score = res.structured_content["metrics"]["balanced_accuracy"]
    print(f"feature {feature} {token!r}: keyword scorer balanced accuracy {score}, score_explanation {seconds:.2f} s")
    assert score >= 0.75


def test_metrics_and_their_interval():
    m = metrics([True, True, False, False], [True, False, False, False])
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 0, 2, 1) and m.balanced_accuracy == 0.75 and m.precision == 1.0
    assert m.f1 == pytest.approx(2 / 3) and m.interval[0] < 0.75 < m.interval[1]
    none = metrics([True, False], [False, False])
    assert none.precision is None and none.f1 == 0.0 and none.balanced_accuracy == 0.5
    wide, narrow = metrics([True, False] * 5, [True, False] * 5), metrics([True, False] * 50, [True, False] * 50)
    assert wide.interval[0] < narrow.interval[0] and wide.interval[1] == narrow.interval[1] == 1.0


# ------------------------------------------------------------------------------------------------- the blind set


def test_the_blind_set_has_the_stated_composition(setup, stories_engine):
    """n//2 firing (across bands), the rest silent with up to half near misses (a top token where it does not
    fire); never a window holding an entry the index keeps of the feature (its top 50 and every interval sample,
    read here from the row itself); every context CONTEXT_TOKENS tokens; all distinct."""
    server, services = setup
    s = only_sae(stories_engine)
    found = None
    for feature in range(0, s.d_sae, 3):  # a feature whose top tokens also occur where it does not fire
        c = challenge(services, ask(server, feature, n=20, seed=1))
        kinds = Counter(a["kind"] for a in c.answers["items"])
        if kinds["near_miss"] and len({a["band"] for a in c.answers["items"] if a["band"]}) >= 2:
            found = feature, c
            break
    assert found, "no feature with near misses"
    feature, c = found
    items = c.answers["items"]
    index, row, col, _ = services.examples.feature_row(None, feature)
    length = services.examples.window_length(s)
    top_pos = [int(p) for v, p in zip(row.top_vals[:, col], row.top_pos[:, col]) if v > 0]
    kept = {p // length for p in top_pos + [int(p) for p in row.samp_pos[col].ravel() if p != 2**32 - 1]}
    top_windows = index.get_windows([p // length for p in top_pos])
    counts = Counter(top_windows[p // length][2][p % length] for p in top_pos)
    top_tokens = {t for t, k in counts.most_common(sc.NEAR_MISS_TOKENS) if k >= 2}
    assert len(items) == 20 and kinds["firing"] == 10 and kinds["near_miss"] <= 5
    assert kinds["near_miss"] + kinds["silent"] == 10
    thr = c.answers["threshold"]
    acts = true_activations(stories_engine, services, c)
    windows = index.get_windows([a["window"] for a in items])
    for a in items:
        assert a["window"] not in kept and len(a["tokens"]) == sc.CONTEXT_TOKENS
        assert max(acts[a["id"]]) >= thr if a["kind"] == "firing" else max(acts[a["id"]]) == 0
        if a["kind"] == "near_miss":
            ids = windows[a["window"]][2][a["start"] : a["start"] + sc.CONTEXT_TOKENS]
            assert set(ids) & top_tokens  # a token it fires on most, here where it does not
    assert len({a["window"] for a in items}) == len({tuple(a["tokens"]) for a in items}) == len(items)


def test_nothing_in_the_blind_set_correlates_with_the_answer(setup, token_feature):
    """Ids number the contexts in their shown order, which is shuffled: over several blind sets the firing ones
    sit anywhere (no correlation of position with the truth); every context has the same number of tokens; the
    result holds ids and texts only: no activation, no band, no kind."""
    server, services = setup
    feature = token_feature[0]
    positions, truths = [], []
    for seed in range(20, 26):
        out = ask(server, feature, n=20, seed=seed, method="fuzzing" if seed % 2 else "detection")
        blind = out["challenge"]
        assert set(blind) <= {"challenge_id", "sae", "feature", "explanation", "method", "seed", "min_activation",
                              "expires_in_s", "question", "n_true", "contexts", "warnings"}
        assert all(set(x) == {"id", "text"} and "«" not in x["text"] for x in blind["contexts"])
        assert [x["id"] for x in blind["contexts"]] == [str(i) for i in range(1, len(blind["contexts"]) + 1)]
        c = challenge(services, out)
        assert {len(a["tokens"]) for a in c.answers["items"]} == {sc.CONTEXT_TOKENS}
        positions += list(range(len(c.answers["items"])))
        truths += [a["truth"] for a in c.answers["items"]]
    r = np.corrcoef(positions, truths)[0, 1]
    assert abs(r) < 0.3, r  # 120 contexts: |r| of a random order stays under 0.3 (3.3 standard deviations)


def spans(c) -> set[tuple[int, int]]:
    """(window, token index in it) of every token the challenge's contexts show."""
    return {(a["window"], a["start"] + i) for a in c.answers["items"] for i in range(len(a["tokens"]))}


def test_the_same_seed_gives_the_same_contexts_until_its_answers_are_shown(setup, token_feature):
    server, services = setup
    feature = token_feature[0]
    a, b = ask(server, feature, n=10, seed=77), ask(server, feature, n=10, seed=77)
    assert a["challenge"]["contexts"] == b["challenge"]["contexts"]
    assert a["challenge"]["challenge_id"] != b["challenge"]["challenge_id"]
    assert ask(server, feature, n=10, seed=78)["challenge"]["contexts"] != a["challenge"]["contexts"]
    c = challenge(services, a)
    assert not submit(server, a, {x["id"]: True for x in a["challenge"]["contexts"]}).is_error
    again = submit(server, b, {x["id"]: True for x in b["challenge"]["contexts"]})
    assert "no longer blind" in error_text(again) and f"10 context(s) with challenge {c.id}" in error_text(again)
    # asked again after its answers were shown, the same seed leaves every token of them out
    fresh = challenge(services, ask(server, feature, n=10, seed=77))
    assert len(fresh.answers["items"]) == 10 and not spans(fresh) & spans(c)


def test_answered_contexts_are_never_shown_blind_again(setup, token_feature):
    """Whatever the seed, n or method: a new blind set shares no token with one whose answers were revealed, and an
    open one drawn before the reveal that shares some is refused."""
    server, services = setup
    feature = token_feature[0]
    first_out = ask(server, feature, n=16, seed=40)
    first = challenge(services, first_out)
    outs = [ask(server, feature, n=n, seed=40, method=m) for n, m in ((16, "fuzzing"), (18, "detection"))]
    same_draw = [challenge(services, out) for out in outs]
    assert all(len(spans(x) & spans(first)) >= 8 * 32 for x in same_draw)  # before the reveal: mostly the same
    assert not submit(server, first_out, {a["id"]: a["truth"] for a in first.answers["items"]}).is_error
    for out, x in zip(outs, same_draw):
        res = submit(server, out, {a["id"]: False for a in x.answers["items"]})
        assert "no longer blind" in error_text(res) and first.id in error_text(res)
    for n, m in ((16, "fuzzing"), (18, "detection")):
        later = challenge(services, ask(server, feature, n=n, seed=40, method=m))
        assert not spans(later) & spans(first)
        assert sum(a["kind"] == "firing" for a in later.answers["items"]) == n // 2


def test_two_overlapping_challenges_submitted_at_once_are_not_both_scored(setup, token_feature, monkeypatch):
    """The check that a challenge is still blind and the storing of its score are one step: of two challenges that
    share contexts, submitted together from two threads, exactly one is scored, every time. The store is slowed
    (a slow disk) so that both submissions are surely inside submit at once."""
    import threading
    import time

    server, services = setup
    feature = token_feature[0]
    store_record = services.scores.record

    def slow_record(*args, **kw):
        time.sleep(0.3)
        return store_record(*args, **kw)

    monkeypatch.setattr(services.scores, "record", slow_record)
    for seed in (60, 61, 62):
        outs = [ask(server, feature, n=16, seed=seed, method=m) for m in ("detection", "fuzzing")]
        a, b = (challenge(services, out) for out in outs)
        assert spans(a) & spans(b)
        go, results = threading.Barrier(2), {}

        def answer(out, c):
            go.wait()
            results[c.id] = submit(server, out, {x["id"]: x["truth"] for x in c.answers["items"]})

        threads = [threading.Thread(target=answer, args=pair) for pair in zip(outs, (a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(r.is_error for r in results.values()) == [False, True], [text_of(r) for r in results.values()]


# ------------------------------------------------------------------------------------------------- attacks


def test_a_challenge_is_answered_once_and_bad_predictions_leave_it_open(setup, token_feature):
    server, services = setup
    feature = token_feature[0]
    out = ask(server, feature, n=8, seed=90)
    cid = out["challenge"]["challenge_id"]
    ids = [x["id"] for x in out["challenge"]["contexts"]]
    key = {"challenge_id": cid, "submit_secret": out["submit_secret"]}
    res = call_many(server, [
        ("submit_predictions", {**key, "predictions": {**dict.fromkeys(ids, True), "99": True}}),
        ("submit_predictions", {**key, "predictions": dict.fromkeys(ids[:-2], True)}),
        ("submit_predictions", {**key, "challenge_id": "ch_000000000000", "predictions": {"1": True}}),
        ("submit_predictions", {**key, "predictions": {"1": "maybe"}}),
        ("submit_predictions", {**key, "predictions": dict.fromkeys(ids, False)}),
        ("submit_predictions", {**key, "predictions": dict.fromkeys(ids, True)}),
    ])
    unknown, missing, nosuch, notbool, ok, twice = res
    assert "no context has the id(s) '99'" in error_text(unknown) and "stays open" in error_text(unknown)
    assert f"no prediction for the id(s) {ids[-2]!r}, {ids[-1]!r}" in error_text(missing)
    assert "no challenge 'ch_000000000000'" in error_text(nosuch) and "score_explanation" in error_text(nosuch)
    assert "predictions.1" in error_text(notbool)
    assert not ok.is_error and ok.structured_content["metrics"]["balanced_accuracy"] == 0.5
    assert f"challenge {cid} was already answered" in error_text(twice) and "again for a new" in error_text(twice)


def test_an_expired_challenge_is_refused(setup, token_feature):
    server, services = setup
    feature = token_feature[0]
    out = ask(server, feature, n=8, seed=91)
    cid = out["challenge"]["challenge_id"]
    services.scores.conn.execute("UPDATE challenges SET expires = ? WHERE id = ?", (time.time() - 120, cid))
    res = submit(server, out, {x["id"]: True for x in out["challenge"]["contexts"]})
    assert f"challenge {cid} expired 2 min ago" in error_text(res) and "seed 91 gives the same" in error_text(res)


def test_bad_requests_say_what_to_change(setup, stories_engine):
    server, services = setup
    res = call_many(server, [
        ("score_explanation", {"feature": 3}),
        ("score_explanation", {"feature": 3, "explanation": "x", "n": 2}),
        ("score_explanation", {"feature": 3, "explanation": "x", "method": "vibes"}),
        ("score_explanation", {"feature": 3, "label_id": 9999}),
    ])
    assert "pass `explanation`" in error_text(res[0])
    assert "n: Input should be greater than or equal to 4" in error_text(res[1])
    assert "method" in error_text(res[2]) and "detection" in error_text(res[2])
    assert "label_id 9999 is not a label of feature 3" in error_text(res[3])


# ------------------------------------------------------------------------------------------------- persistence


def test_scores_persist_with_the_label_and_show_in_search_label_and_card(setup, stories_engine, token_feature):
    server, services = setup
    feature, token = token_feature
    label = f"fires on {token.strip()!r} tokens everywhere"
    (rec,) = call_many(server, [("label_feature", {"feature": feature, "label": label})])
    label_id = rec.structured_content["label_id"]
    out = ask(server, feature, n=10, seed=31, explanation=None, label_id=label_id)
    assert out["challenge"]["explanation"] == label
    c = challenge(services, out)
    score = submit(server, out, perfect(stories_engine, services, c)).structured_content
    assert score["label_id"] == label_id and score["metrics"]["balanced_accuracy"] == 1.0
    # a new server over the same data dir: the score was stored, not kept in memory
    fresh = build_server(stories_engine, services.settings)
    found, card, again = call_many(fresh, [
        ("search_explanations", {"query": label}),
        ("feature_card", {"feature": feature, "examples": 1}),
        ("label_feature", {"feature": feature, "label": label}),
    ])
    (match,) = [m for m in found.structured_content["matches"] if m["description"] == label]
    assert match["scored"] == [{"method": "detection", "balanced_accuracy": 1.0, "n": 10,
                                "score_id": score["score_id"]}]
    assert "[scored: detection 1.00 (n=10)]" in text_of(found)
    (line,) = [x for x in text_of(card).splitlines() if x.startswith("- label: ") and label in x]  # quoted or not
    assert " · scored (balanced accuracy, 0.5 = chance): detection 1.00" in line
    assert again.structured_content["scored"][0]["score_id"] == score["score_id"]
    # re-scored: the newest score per method is the one shown (and the card's data holds them all)
    for seed, method in ((32, "detection"), (33, "fuzzing")):
        out = ask(server, feature, n=10, seed=seed, label_id=label_id, explanation=None, method=method)
        submit(server, out, dict.fromkeys([x["id"] for x in out["challenge"]["contexts"]], False))
    (found,) = call_many(fresh, [("search_explanations", {"query": label})])
    (match,) = [m for m in found.structured_content["matches"] if m["description"] == label]
    assert [(m["method"], m["balanced_accuracy"]) for m in match["scored"]] == [("fuzzing", 0.5), ("detection", 0.5)]
    card = gather_card(services, feature)
    assert sum(x.explanation == label for x in card.scores) == 3 and len(card.scores_of(label)) == 2


# ------------------------------------------------------------------------------------------------- sampling


def keyword_scorer_client(server, calls, mode="auto", reply=None):
    """A client whose model scores like a real one, from the prompt alone: it reads the explanation ("the token
    ','") and the contexts, answers true where the keyword rule holds (fuzzing: on the marked token), in a fenced
    JSON block after a sentence (or answers `reply`) -> (results, prompts, the predictions it sent)."""
    prompts, sent = [], []

    async def sample(context, params: types.CreateMessageRequestParams):
        text = params.messages[0].content.text
        prompts.append(text)
        if reply is not None:
            return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=reply),
                                             model="keyword-model")
        (token,) = re.findall(r"^EXPLANATION: the token '(.+)'$", text, re.M)
        rule = keyword_rule(token)
        lines = dict(re.findall(r"^(\d+): (.*)$", text, re.M))
        marked = "one token is marked" in text  # the fuzzing prompt's instructions
        said = {i: (rule(re.search(r"<<(.*?)>>", s).group(1)) if marked else rule(s)) for i, s in lines.items()}
        sent.append(said)
        answer = "I judged each context from the explanation.\n```json\n" + json.dumps(said) + "\n```"
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=answer),
                                         model="keyword-model")

    async def go():
        async with Client(server, sampling_callback=sample, mode=mode) as client:
            return [await client.call_tool(n, a) for n, a in calls]

    return anyio.run(go), prompts, sent


@pytest.mark.parametrize("mode", ["auto", "legacy"])  # 2026 wire (input-required round) / older (back-channel)
@pytest.mark.parametrize("method", ["detection", "fuzzing"])
def test_auto_scores_what_a_real_scorer_answers_from_the_prompt(setup, token_feature, mode, method):
    """The sampled model sees only the fixed prompt: the explanation and the blind contexts as the two-step
    protocol shows them (no activation, nothing else); its answer is scored like submit_predictions would, here
    recomputed by hand from the server's truth."""
    server, services = setup
    feature, token = token_feature
    (res,), prompts, sent = keyword_scorer_client(server, [("score_explanation", {
        "feature": feature, "explanation": f"the token {token!r}", "n": 16, "method": method, "auto": True})], mode)
    assert not res.is_error, text_of(res)
    score = res.structured_content["score"]
    c = services.scores.challenge(score["challenge_id"])
    (prompt,), (said,) = prompts, sent
    blind_lines = [f"{x['id']}: {x['text']}" for x in c.blind["contexts"]]
    assert "\n".join(blind_lines) in prompt and len(re.findall(r"^\d+: ", prompt, re.M)) == len(blind_lines)
    template = (REPO / "prompts" / "scoring" / f"{method}.md").read_text(encoding="utf-8")
    head, tail = template.split("{contexts}")
    assert prompt.endswith(tail) and prompt.startswith(head.split("{explanation}")[0])
    truth = {a["id"]: a["truth"] for a in c.answers["items"]}
    pos = [i for i in truth if truth[i]]
    neg = [i for i in truth if not truth[i]]
    balanced = (sum(said[i] for i in pos) / len(pos) + sum(not said[i] for i in neg) / len(neg)) / 2
    assert score["metrics"]["balanced_accuracy"] == pytest.approx(balanced, abs=1e-3)
    assert score["scorer"] == "sampling: keyword-model" and score["metrics"]["balanced_accuracy"] >= 0.75
    assert [x["id"] for x in score["misjudged"]] == [i for i in truth if said[i] != truth[i]]


def test_the_scorer_prompt_keeps_the_explanation_as_written(setup, token_feature):
    """Braces in an explanation are not template slots: '{contexts}' in it is not replaced by the contexts."""
    server, services = setup
    request = BlindSetRequest(None, token_feature[0], "odd {contexts} and {n}", None, 8, "detection", 123)
    blind = ExplanationScorer(services).issue(request).blind
    prompt = scorer_prompt(blind)
    assert "EXPLANATION: odd {contexts} and {n}\n" in prompt and prompt.count(blind.contexts[0].text) == 1


def test_auto_without_sampling_says_so_and_hands_out_the_blind_set(setup, token_feature):
    server, services = setup
    feature = token_feature[0]
    (res,) = call_many(server, [("score_explanation", {"feature": feature, "explanation": "x", "n": 8,
                                                        "auto": True})])
    out = res.structured_content
    assert "does not offer MCP sampling" in out["note"] and "submit_predictions" in out["note"]
    assert len(out["challenge"]["contexts"]) == 8 and "note: the client does not offer" in text_of(res)


def test_an_unreadable_sampled_answer_leaves_the_challenge_to_the_agent(setup, token_feature):
    server, services = setup
    feature = token_feature[0]
    (res,), _, _ = keyword_scorer_client(server, [
        ("score_explanation", {"feature": feature, "explanation": "x", "n": 8, "auto": True})], reply="no idea")
    out = res.structured_content
    assert "could not be read" in out["note"] and out["challenge"]["contexts"]
    ok = submit(server, out, {x["id"]: True for x in out["challenge"]["contexts"]})
    assert not ok.is_error and ok.structured_content["scorer"] == "agent"


def test_contexts_are_shorter_only_for_a_corpus_of_short_documents():
    assert sc.context_length([[1] * 128] * 3 + [[1] * 10] * 2, nbos=1) == sc.CONTEXT_TOKENS
    assert sc.context_length([[1] * 21] * 3 + [[1] * 128] * 2, nbos=1) == 20  # one sentence a line: their median
    assert sc.context_length([[1] * 4] * 5, nbos=1) == sc.MIN_CONTEXT_TOKENS


def test_reading_a_scorers_reply():
    ids = ["1", "2", "3"]
    assert read_predictions('Sure! {"1": true, "2": "no", "3": 1}', ids) == {"1": True, "2": False, "3": True}
    assert read_predictions("1: yes\n2) no\n3 - true", ids) == {"1": True, "2": False, "3": True}
    assert read_predictions("In order: [true, false, true]", ids) == {"1": True, "2": False, "3": True}
    with pytest.raises(Exception, match="no true/false for 1 of the 3"):
        read_predictions('{"1": true, "2": false}', ids)
    with pytest.raises(Exception, match="no true/false for 3 of the 3"):
        read_predictions("[true, false]", ids)  # a list must have one value per context
